"""Log-likelihoods and generation with a `CausalLM`: the numbers LM evaluations need.

`token_log_probs` scores right-padded sequences (the causal mask already
keeps padding after a token from reaching it, so no attention mask is
needed); `sequence_log_likelihood` sums them, which is what paired-sentence
bias benchmarks (CrowS-Pairs, StereoSet) compare. Big inputs are scored in
chunks of `batch_size`, the last one padded so every chunk runs one compiled
program.

`generate` prefills the KV cache with the prompt and extends it one token a
step inside a single jitted `lax.fori_loop`, greedily or by sampling at a
temperature. A left-padded prompt (`prompt_mask`) generates as the unpadded
prompt would.

Models with a training-mode quantizer that needs a "quant" rng (diffq
noise) must be scored with `quant.replace(mode=QuantMode.EVAL)`, as deployed.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from baq.models.lm.decoder import CausalLM


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model: CausalLM, variables, tokens, lengths):
  logits = model.apply(variables, tokens)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  real = jnp.arange(1, tokens.shape[1])[None, :] < lengths[:, None]
  return jnp.where(real, picked, 0.0)


def token_log_probs(model: CausalLM, variables: Any, tokens, lengths, *,
                    batch_size: Optional[int] = None, bucket: Optional[int] = None
                    ) -> jnp.ndarray:
  """log p(token_j | tokens_<j) for j >= 1, 0 on padding.

  Args:
    model: the language model.
    variables: its variables ({"params": ...}).
    tokens: int [b, t], right-padded.
    lengths: int [b], real tokens per row (a row of length L scores L - 1 tokens).
    batch_size: rows per forward pass; None for all at once.
    bucket: with `batch_size`, rows are scored shortest first and each chunk
      only as wide as its longest row, rounded up to a multiple of `bucket`
      (at most t / bucket programs are compiled): sentences of very unequal
      lengths padded to one width cost the longest one's compute each.

  Returns:
    float32 [b, t - 1]; entry j scores token j + 1.
  """
  if bucket is not None and bucket < 1:
    raise ValueError(f"bucket={bucket} must be >= 1.")
  if bucket and batch_size:
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    b, t = tokens.shape
    out = np.zeros((b, max(t - 1, 0)), np.float32)
    order = np.argsort(lengths, kind="stable")
    batch_size = min(batch_size, b)
    for i in range(0, b, batch_size):
      rows = order[i:i + batch_size]
      width = min(t, max(2, -(-int(lengths[rows].max()) // bucket) * bucket))
      x = np.zeros((batch_size, width), np.int32)  # padding rows have length 0: they score 0
      n = np.zeros(batch_size, np.int32)
      x[:len(rows)], n[:len(rows)] = tokens[rows, :width], lengths[rows]
      out[rows, :width - 1] = np.asarray(_log_probs(model, variables, jnp.asarray(x),
                                                    jnp.asarray(n)))[:len(rows)]
    return jnp.asarray(out)
  tokens, lengths = jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
  b = tokens.shape[0]
  if batch_size is None or batch_size >= b:
    return _log_probs(model, variables, tokens, lengths)
  pad = -b % batch_size  # padding rows have length 0, so they score 0 and are cut off
  tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
  lengths = jnp.pad(lengths, (0, pad))
  chunks = [_log_probs(model, variables, tokens[i:i + batch_size], lengths[i:i + batch_size])
            for i in range(0, b + pad, batch_size)]
  return jnp.concatenate(chunks)[:b]


def sequence_log_likelihood(model: CausalLM, variables: Any, tokens, lengths, *,
                            batch_size: Optional[int] = None) -> jnp.ndarray:
  """Sum over each row's tokens after the first of log p(token | prefix).

  Args:
    model: the language model.
    variables: its variables.
    tokens: int [b, t], right-padded.
    lengths: int [b].
    batch_size: rows per forward pass; None for all at once.

  Returns:
    float32 [b].
  """
  return jnp.sum(token_log_probs(model, variables, tokens, lengths, batch_size=batch_size),
                 axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(model: CausalLM, variables, prompt, prompt_mask, rng, temperature, *,
              max_new_tokens: int, greedy: bool):
  b, t0 = prompt.shape
  decode = functools.partial(model.apply, variables, method="decode")

  def pick(logits, step):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    key = jax.random.fold_in(rng, step)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  cache = model.init_cache(b, t0 + max_new_tokens)
  logits, cache = decode(prompt, cache, attention_mask=prompt_mask)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(pick(logits[:, -1], 0))

  def step(i, carry):
    out, cache = carry
    logits, cache = decode(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)
    return jax.lax.dynamic_update_slice_in_dim(out, pick(logits[:, -1], i)[:, None], i, 1), cache

  out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache))
  return jnp.concatenate([prompt, out], axis=1)


def generate(model: CausalLM, variables: Any, prompt, max_new_tokens: int, *,
             greedy: bool = True, rng: Optional[jax.Array] = None, temperature: float = 1.0,
             prompt_mask=None) -> jnp.ndarray:
  """Continues `prompt` by `max_new_tokens` tokens with the KV cache.

  Args:
    model: the language model.
    variables: its variables.
    prompt: int [b, t0].
    max_new_tokens: tokens to add (0 returns the prompt).
    greedy: argmax at each step; else sample from softmax(logits / temperature).
    rng: PRNG key, required when sampling.
    temperature: > 0, for sampling.
    prompt_mask: optional [b, t0] bool, False on left padding.

  Returns:
    int32 [b, t0 + max_new_tokens]: the prompt, then the new tokens.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  if max_new_tokens == 0:
    return prompt
  if not greedy and (rng is None or not temperature > 0):
    raise ValueError(f"Sampling needs an rng and a temperature > 0, got rng={rng}, "
                     f"temperature={temperature}.")
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt.shape, bool)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables, prompt, jnp.asarray(prompt_mask, bool), rng,
                   jnp.float32(temperature), max_new_tokens=int(max_new_tokens),
                   greedy=bool(greedy))
