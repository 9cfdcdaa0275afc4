"""A word-level tokenizer for the small text models, and batch encoding for any.

`word_tokenizer` builds a Hugging Face `tokenizers` WordLevel model: lower-cased
text, split on whitespace with every punctuation character its own token,
special tokens <pad>=0, <unk>=1, <bos>=2, <eos>=3, then the words ordered by
count (ties alphabetically). The vocabulary is counted here rather than by
`WordLevelTrainer` so that the ids are a documented function of the sentences
alone. It is saved with `Tokenizer.save` and read back with `load_tokenizer`
as an ordinary tokenizer.json, so pretrained BPE tokenizers (GPT-2's
tokenizer.json) load through the same function.

`encode_batch` adds no special tokens through the tokenizer's post-processor;
the caller says which BOS/EOS ids to add. GPT-2-style tokenizers have no BOS,
and the usual choice there is `<|endoftext|>` as the first token, which is
what `special_ids` returns for "bos" on such a tokenizer.
"""

from __future__ import annotations

import collections
import os
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
FILENAME = "tokenizer.json"

# Names under which the common tokenizers keep their special tokens, in the
# order they are tried. GPT-2's one <|endoftext|> serves as BOS and EOS.
_NAMES = {
    "bos": (BOS, "<s>", "[CLS]", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": (EOS, "</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>"),
    "pad": (PAD, "[PAD]", "<|pad|>", "<|padding|>"),
    "unk": (UNK, "[UNK]", "<|unk|>"),
}


def _empty_tokenizer(vocab: dict) -> Tokenizer:
  """A WordLevel tokenizer over `vocab` with baq's normalizer and pre-tokenizer."""
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
  return tok


def word_tokenizer(sentences: Sequence[str], *, min_count: int = 1) -> Tokenizer:
  """Builds the word-level tokenizer of `sentences`.

  Args:
    sentences: the training text, one string per sentence (or line).
    min_count: words seen fewer times map to <unk>.

  Returns:
    A `tokenizers.Tokenizer` (WordLevel) with <pad>=0, <unk>=1, <bos>=2,
    <eos>=3 and the kept words from id 4, most frequent first.
  """
  if min_count < 1:
    raise ValueError(f"min_count must be >= 1, got {min_count}.")
  splitter = _empty_tokenizer({UNK: 0})
  counts = collections.Counter()
  for s in sentences:
    # The encoder matches special tokens in the raw text before normalizing,
    # so they are not words to count.
    for special in SPECIAL_TOKENS:
      s = s.replace(special, " ")
    text = splitter.normalizer.normalize_str(s)
    counts.update(w for w, _ in splitter.pre_tokenizer.pre_tokenize_str(text))
  words = sorted((w for w, c in counts.items() if c >= min_count),
                 key=lambda w: (-counts[w], w))
  vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + tuple(words))}
  tok = _empty_tokenizer(vocab)
  # Registered as special so that decode() skips them and the normalizer
  # never lower-cases or splits them.
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def save_tokenizer(tokenizer: Tokenizer, folder: str) -> str:
  """Writes `folder/tokenizer.json` (the native format).

  Args:
    tokenizer: any `tokenizers.Tokenizer`.
    folder: created if missing.

  Returns:
    The file's path.
  """
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, FILENAME)
  tokenizer.save(path)
  return path


def load_tokenizer(path: str) -> Tokenizer:
  """Reads a tokenizer.json, or the one inside a folder.

  Args:
    path: the file, or a folder holding tokenizer.json.

  Returns:
    The `tokenizers.Tokenizer`.

  Raises:
    FileNotFoundError: naming the file that is missing.
  """
  file = os.path.join(path, FILENAME) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"Tokenizer file not found: {file}")
  return Tokenizer.from_file(file)


def special_ids(tokenizer: Tokenizer) -> dict:
  """The ids of the usual BOS/EOS/PAD/UNK tokens that the tokenizer has.

  Args:
    tokenizer: any `tokenizers.Tokenizer`.

  Returns:
    dict(bos, eos, pad, unk): the id of the first name found for each
    (see `_NAMES`), or None when the tokenizer has none of them.
  """
  out = {}
  for role, names in _NAMES.items():
    ids = (tokenizer.token_to_id(n) for n in names)
    out[role] = next((i for i in ids if i is not None), None)
  return out


def encode_batch(tokenizer: Tokenizer, sentences: Sequence[str], *,
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: int = 0, max_len: Optional[int] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Encodes sentences to right-padded ids.

  Args:
    tokenizer: any `tokenizers.Tokenizer`; its post-processor is not applied.
    sentences: the strings.
    bos_id: prepended to every sequence when not None (for GPT-2 pass the
      <|endoftext|> id, `special_ids(tok)["bos"]`).
    eos_id: appended to every sequence when not None.
    pad_id: the padding value after each sequence's end.
    max_len: sequences (BOS and EOS included) are cut to this many tokens from
      the right, so a cut sequence loses its EOS; the width is max_len. None:
      the width is the longest sequence.

  Returns:
    (ids int32 [n, t], lengths int32 [n]): ids[i, :lengths[i]] is sentence
    i's sequence and the rest is pad_id.
  """
  if max_len is not None and max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}.")
  head = [] if bos_id is None else [int(bos_id)]
  tail = [] if eos_id is None else [int(eos_id)]
  encoded = tokenizer.encode_batch(list(sentences), add_special_tokens=False)
  seqs = [(head + e.ids + tail)[:max_len] for e in encoded]
  lengths = np.array([len(s) for s in seqs], np.int32)
  width = max_len if max_len is not None else int(lengths.max(initial=0))
  ids = np.full((len(seqs), width), pad_id, np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
  return ids, lengths
