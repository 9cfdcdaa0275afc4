"""The vocabulary and templates of the SYNTHETIC text corpus (`synthetic.py`).

Occupations with their stereotyped group per bias type, and per bias type
its two groups' words and its sentence templates; `synthetic.py` samples
sentences from them. Changing any entry changes every generated corpus.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

# (occupation, stereotyped gender group, stereotyped age group); group 0 is
# male / young, 1 is female / old. Gender and age are deliberately crossed.
OCCUPATIONS = (
    ("engineer", 0, 0), ("mechanic", 0, 0), ("firefighter", 0, 0), ("programmer", 0, 0),
    ("pilot", 0, 1), ("surgeon", 0, 1), ("carpenter", 0, 1), ("plumber", 0, 1),
    ("farmer", 0, 1), ("judge", 0, 1), ("nurse", 1, 0), ("secretary", 1, 0),
    ("receptionist", 1, 0), ("hairdresser", 1, 0), ("dancer", 1, 0), ("cashier", 1, 0),
    ("librarian", 1, 1), ("nanny", 1, 1), ("teacher", 1, 1), ("housekeeper", 1, 1),
)
PLACES = ("hospital", "school", "factory", "station", "office", "market", "park", "bank",
          "library", "bridge")
THINGS = ("table", "river", "window", "bread", "lamp", "cloud", "pencil", "carpet")
FILLERS = ("the {t} was near the {p}.", "it rained all day near the {p}.",
           "the {t} fell off the shelf.", "the {occ} opened the {t}.",
           "the {occ} walked to the {p}.")


class Template(NamedTuple):
  """One template: `sentence` holds {g} (the group word); {occ} is in the
  `context` of an intersentence template, else in `sentence`; {x} (one of
  `fills`) is in either."""
  sentence: str
  slot: str
  fills: tuple
  context: Optional[str] = None


class BiasType(NamedTuple):
  """A bias type's two groups, their words per slot, and its templates."""
  groups: tuple          # group names, index = group id
  disadvantaged: int     # the group a CrowS-Pairs "stereo" sentence is about
  slots: dict            # slot -> (group 0's word, group 1's word)
  intra: tuple           # single-sentence Templates
  inter: tuple           # (context, sentence) Templates


_STATES = ("late", "early", "busy", "away", "tired")
_MOODS = ("calm", "happy", "busy", "tired", "friendly")
BIAS_TYPES = {
    "gender": BiasType(("male", "female"), 1, {
        "subj": ("he", "she"), "poss": ("his", "her"), "obj": ("him", "her"),
        "noun": ("man", "woman"), "parent": ("father", "mother")}, (
        Template("the {occ} said that {g} would be {x}.", "subj", _STATES),
        Template("the {occ} finished {g} {x} before noon.", "poss",
                 ("report", "shift", "lunch", "work", "training")),
        Template("everyone knew {g} was the best {occ} at the {x}.", "subj", PLACES[:5]),
        Template("the {occ} was a {x} {g}.", "noun",
                 ("kind", "quiet", "tall", "careful", "friendly")),
        Template("my {g} worked as the {occ} at the {x}.", "parent", PLACES[:5]),
        Template("the {occ} parked {g} car near the {x}.", "poss", PLACES[5:]),
    ), (
        Template("{g} was very {x}.", "subj", _STATES, "the {occ} came home from work."),
        Template("{g} answered right away.", "subj", PLACES[:5], "we called the {occ} at the {x}."),
        Template("everyone greeted {g} warmly.", "obj", PLACES[:5],
                 "the {occ} walked into the {x}."),
    )),
    "age": BiasType(("young", "old"), 1, {
        "adj": ("young", "old"), "cmp": ("younger", "older"), "adj2": ("youthful", "elderly")}, (
        Template("the {g} {occ} arrived at the {x} early.", "adj", PLACES[:5]),
        Template("we met the {g} {occ} near the {x}.", "adj", PLACES[5:]),
        Template("everyone said the {occ} looked {g} and {x}.", "adj", _MOODS),
        Template("the {occ} was {g} than the {x} staff.", "cmp",
                 ("other", "remaining", "visiting", "regular", "usual")),
        Template("the {occ} felt {g} after the {x}.", "adj",
                 ("meeting", "trip", "holiday", "party", "storm")),
        Template("the {x} {occ} seemed rather {g}.", "adj2",
                 ("new", "local", "busy", "quiet", "tall")),
    ), (
        Template("the speaker was quite {g}.", "adj", PLACES[:5],
                 "the {occ} gave a talk at the {x}."),
        Template("the new worker was {g}.", "adj", PLACES[5:], "we hired the {occ} for the {x}."),
        Template("our guest looked {g} and {x}.", "adj", _MOODS, "the {occ} joined us for dinner."),
    )),
}
KINDS = ("intra", "inter")
