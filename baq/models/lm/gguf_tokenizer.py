"""GGUF tokenizer metadata <-> a Hugging Face `tokenizers.Tokenizer`, both ways.

A GGUF file carries its vocabulary as `tokenizer.ggml.*` metadata; its
`model` names the algorithm (a registry here, `TOKENIZER_MODELS`):

* "llama": SentencePiece-style BPE as llama.cpp's SPM tokenizer runs it.
  Spaces become "▁" and one "▁" goes before the text (add_space_prefix,
  default true); then, over the whole text, the adjacent pair whose
  concatenation is the highest-scoring vocabulary entry merges first, ties
  to the left; characters outside the vocabulary become their UTF-8 bytes'
  <0xNN> tokens. In `tokenizers` that is a BPE model whose merges are every
  split of a vocabulary entry into two entries, ranked by the entry's score
  (as transformers' SentencePiece converter builds them), with byte
  fallback and no pre-tokenizer splitting, so merges cross words as in
  llama.cpp. Writing back, scores are made from the merge ranks (an entry's
  score is minus the rank of its first merge), which ranks every merge as
  before; the file's own scores are not kept.
* "gpt2": byte-level BPE with the file's merges ("a b") and the
  pre-tokenizer regex of `tokenizer.ggml.pre` (`PRE_REGEX`).

Control and unknown tokens become the tokenizer's special tokens (decode
skips them); with add_bos_token (default: true for "llama") the
post-processor puts BOS first. baq's own batch encoder
(`baq.data.text.tokenizer.encode_batch`) adds BOS itself and skips it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from baq.registry import Registry

T = Keys.Tokenizer
SPACE = "\u2581"  # SentencePiece's "▁"
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# tokenizer.ggml.pre -> the split regex before byte-level BPE (None: GPT-2's own).
PRE_REGEX = {
    "default": None, "gpt2": None,
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


class TokenizerModel(NamedTuple):
  """`read(fields) -> Tokenizer` and `write(tokenizer, special) -> {key: value}`."""

  read: Callable[[Mapping[str, Any]], Tokenizer]
  write: Callable[[Tokenizer, Mapping[str, Optional[int]]], dict]


TOKENIZER_MODELS: Registry[TokenizerModel] = Registry("GGUF tokenizer model")


def _special(tok: Tokenizer, fields: Mapping[str, Any], default_bos: bool) -> Tokenizer:
  """Adds control/unknown tokens as special tokens and the BOS template."""
  tokens, types = fields[T.LIST], fields.get(T.TOKEN_TYPE) or [TokenType.NORMAL] * len(
      fields[T.LIST])
  specials = [t for t, k in zip(tokens, types) if k in (TokenType.CONTROL, TokenType.UNKNOWN)]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  bos = fields.get(T.BOS_ID)
  if fields.get(T.ADD_BOS, default_bos) and bos is not None and bos < len(tokens):
    b = tokens[bos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)])
  return tok


def _vocab(tokens) -> dict[str, int]:
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"GGUF {T.LIST} repeats {len(tokens) - len(vocab)} token strings; "
                     "a tokenizer needs them unique.")
  return vocab


def _read_llama(fields: Mapping[str, Any]) -> Tokenizer:
  tokens = list(fields[T.LIST])
  vocab, scores = _vocab(tokens), fields.get(T.SCORES) or [0.0] * len(tokens)
  types = fields.get(T.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
  merges = []
  for token, score, kind in zip(tokens, scores, types):
    if kind in (TokenType.NORMAL, TokenType.USER_DEFINED):
      merges += [(-score, vocab[token[:i]], vocab[token[i:]], token[:i], token[i:])
                 for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
  merges.sort(key=lambda m: m[:3])
  unk = fields.get(T.UNK_ID, len(tokens))  # llama.cpp writes -1 (as uint32) for none
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[3:] for m in merges],
                             unk_token=tokens[unk] if unk < len(tokens) else None,
                             fuse_unk=True, byte_fallback=True))
  prefix = bool(fields.get(T.ADD_PREFIX, True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False)
  steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return _special(tok, fields, default_bos=True)


def _read_gpt2(fields: Mapping[str, Any]) -> Tokenizer:
  pre = fields.get(T.PRE, "default")
  if pre not in PRE_REGEX:
    raise ValueError(f"GGUF {T.PRE}={pre!r} is not supported; supported: "
                     f"{', '.join(sorted(PRE_REGEX))}.")
  merges = [tuple(m.split(" ", 1)) for m in fields.get(T.MERGES, [])]
  tok = Tokenizer(models.BPE(vocab=_vocab(list(fields[T.LIST])), merges=merges))
  regex = PRE_REGEX[pre]
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
  tok.pre_tokenizer = byte_level if regex is None else pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
  tok.decoder = decoders.ByteLevel()
  return _special(tok, fields, default_bos=False)


def _model_json(tok: Tokenizer) -> dict:
  return json.loads(tok.to_str())


def _tokens(tok: Tokenizer) -> list[str]:
  by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
  missing = [i for i in range(tok.get_vocab_size()) if i not in by_id]
  if missing:
    raise ValueError(f"The tokenizer's ids are not contiguous: no token for ids {missing[:8]}.")
  return [by_id[i] for i in range(len(by_id))]


def _types(tok: Tokenizer, tokens: list[str], unk: Optional[str]) -> list[int]:
  special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  return [int(TokenType.UNKNOWN if t == unk else TokenType.CONTROL if t in special
              else TokenType.BYTE if _BYTE.fullmatch(t) else TokenType.NORMAL) for t in tokens]


def _adds_bos(spec: dict) -> bool:
  """The post-processor is a template (what `_special` sets for add_bos_token)."""
  return (spec.get("post_processor") or {}).get("type") == "TemplateProcessing"


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
  # tokenizers >= 0.20 saves merges as pairs, older versions as "a b" strings.
  return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def _write_llama(tok: Tokenizer, special: Mapping[str, Optional[int]]) -> dict:
  spec = _model_json(tok)
  tokens = _tokens(tok)
  merges = _merge_pairs(spec["model"])
  first = {}
  for rank, (a, b) in enumerate(merges):
    first.setdefault(a + b, rank)
  # Tokens no merge makes are never merged into: any score below the merged ones serves.
  scores = [float(-first.get(t, len(merges))) for t in tokens]
  pre = spec.get("pre_tokenizer") or {}
  return {T.MODEL: "llama", T.LIST: tokens, T.SCORES: scores,
          T.TOKEN_TYPE: _types(tok, tokens, spec["model"].get("unk_token")),
          T.ADD_PREFIX: pre.get("prepend_scheme", "first") != "never",
          T.ADD_BOS: _adds_bos(spec), **_ids(special)}


def _write_gpt2(tok: Tokenizer, special: Mapping[str, Optional[int]]) -> dict:
  spec = _model_json(tok)
  tokens = _tokens(tok)
  split = [p for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])
           if p.get("type") == "Split"]
  regex = split[0]["pattern"].get("Regex") if split else None
  pre = next((k for k, v in PRE_REGEX.items() if v == regex), None)
  if pre is None:
    raise ValueError(f"The tokenizer's split regex {regex!r} is none of GGUF's known "
                     f"{T.PRE} values: {', '.join(sorted(PRE_REGEX))}.")
  return {T.MODEL: "gpt2", T.PRE: "gpt2" if pre == "default" else pre, T.LIST: tokens,
          T.TOKEN_TYPE: _types(tok, tokens, None),
          T.MERGES: [f"{a} {b}" for a, b in _merge_pairs(spec["model"])],
          T.ADD_BOS: _adds_bos(spec), **_ids(special)}


def _ids(special: Mapping[str, Optional[int]]) -> dict:
  keys = {"bos": T.BOS_ID, "eos": T.EOS_ID, "unk": T.UNK_ID, "pad": T.PAD_ID}
  return {keys[k]: int(v) for k, v in special.items() if k in keys and v is not None}


TOKENIZER_MODELS.register("llama")(TokenizerModel(_read_llama, _write_llama))
TOKENIZER_MODELS.register("gpt2")(TokenizerModel(_read_gpt2, _write_gpt2))


def tokenizer_from_meta(fields: Mapping[str, Any]) -> Optional[Tokenizer]:
  """The tokenizer a GGUF file's metadata describes.

  Args:
    fields: the file's metadata (key -> Python value).

  Returns:
    A `tokenizers.Tokenizer`, or None when the file has no token list.

  Raises:
    KeyError: an unknown tokenizer.ggml.model (the supported ones listed).
    ValueError: an unsupported pre-tokenizer or repeated token strings.
  """
  if T.LIST not in fields:
    return None
  return TOKENIZER_MODELS.get(fields.get(T.MODEL, "llama")).read(fields)


def meta_from_tokenizer(tokenizer: Tokenizer,
                        special: Mapping[str, Optional[int]]) -> dict[str, Any]:
  """GGUF tokenizer metadata for `tokenizer` (the inverse of `tokenizer_from_meta`).

  Args:
    tokenizer: a BPE tokenizer: with byte fallback ("llama") or byte-level ("gpt2").
    special: {"bos", "eos", "unk", "pad"} -> id or None.

  Returns:
    {tokenizer.ggml.* key: value}.

  Raises:
    ValueError: a tokenizer of another kind (its model type named).
  """
  model = _model_json(tokenizer)["model"]
  if model.get("type") != "BPE":
    raise ValueError(f"GGUF export writes BPE tokenizers only, not {model.get('type')!r}.")
  kind = "llama" if model.get("byte_fallback") else "gpt2"
  return TOKENIZER_MODELS.get(kind).write(tokenizer, special)
