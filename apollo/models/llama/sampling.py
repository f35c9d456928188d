"""Sampling from the decoder: prefill, then cached decoding steps in one compiled loop.

:func:`generate` runs the prompt through :class:`~apollo.models.llama.model.Decoder`
once (prefill), then a ``jax.lax.while_loop`` of single-token steps over the
preallocated KV cache, with greedy, temperature, top-k and top-p (nucleus) sampling
as in Holtzman et al. (2020), "The Curious Case of Neural Text Degeneration".

Prompts are left-padded up to a bucket length (:func:`prompt_bucket`), so prompts
of different lengths share one compiled function; the padding is masked, and a
decoding step reads only the cache blocks in use, so neither the padding nor a
large cache changes the tokens or costs much. ``benchmarks/generate.py`` measures
the speed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from apollo.models.llama.model import Decoder


class GenerateOutput(NamedTuple):
  """What :func:`generate` returns (a pytree)."""

  tokens: jax.Array  # int32 [B, max_new_tokens]; pad_id after a row's stop token.
  lengths: jax.Array  # int32 [B]: generated tokens per row, its stop token included.
  finished: jax.Array  # bool [B]: the row produced a stop token.


# Prompt lengths are padded up to a power of two from this one ...
MIN_PROMPT_BUCKET = 16
# ... up to this one, then to a multiple of it: a long prompt wastes at most a
# fraction of its length in padding, a short one at most as many tokens as it has.
PROMPT_BUCKET_STEP = 256


def prompt_bucket(length: int) -> int:
  """The padded length of a ``length``-token prompt (one compilation per bucket).

  Powers of two from :data:`MIN_PROMPT_BUCKET` to :data:`PROMPT_BUCKET_STEP`, then
  multiples of :data:`PROMPT_BUCKET_STEP`: 1-16 -> 16, 17-32 -> 32, ..., 257-512 ->
  512, 513-768 -> 768.
  """
  if length <= PROMPT_BUCKET_STEP:
    return max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())
  return -(-length // PROMPT_BUCKET_STEP) * PROMPT_BUCKET_STEP


def sample_logits(
  logits: jax.Array,
  rng: jax.Array,
  temperature: float | jax.Array,
  top_k: int = 0,
  top_p: float | None = None,
) -> jax.Array:
  """Draws one token per row from ``logits`` [B, V] (float32 math).

  ``temperature`` 0 is greedy (argmax). ``top_k`` > 0 keeps the k most likely
  tokens; ``top_p`` < 1 keeps the smallest set whose probability reaches
  ``top_p`` (nucleus), always at least the most likely token.
  """
  logits = logits.astype(jnp.float32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token is kept if the mass strictly before it is below top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "max_new_tokens", "cache_size", "greedy", "top_k", "use_top_p"),
)
def _generate(
  graphdef,
  state,
  prompt_ids,
  prompt_mask,
  rng,
  temperature,
  top_p,
  stop_ids,
  pad_id,
  *,
  max_new_tokens,
  cache_size,
  greedy,
  top_k,
  use_top_p,
):
  model = nnx.merge(graphdef, state)
  batch = prompt_ids.shape[0]
  cache = model.init_cache(batch, cache_size)
  logits, cache = model(prompt_ids, attention_mask=prompt_mask, cache=cache, last_logits_only=True)

  def pick(logits, step):
    if greedy:
      return sample_logits(logits, rng, 0)
    return sample_logits(
      logits, jax.random.fold_in(rng, step), temperature, top_k, top_p if use_top_p else None
    )

  def is_stop(token):
    return jnp.any(token[:, None] == stop_ids[None, :], axis=-1)

  first = pick(logits[:, -1], 0)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  init = (jnp.int32(1), first, is_stop(first), jnp.ones((batch,), jnp.int32), tokens, cache)

  def cond(carry):
    step, _, finished, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(finished)

  def body(carry):
    step, last, finished, lengths, tokens, cache = carry
    logits, cache = model(last[:, None], cache=cache)
    token = jnp.where(finished, pad_id, pick(logits[:, -1], step))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    lengths = lengths + (~finished).astype(jnp.int32)
    finished = finished | is_stop(token)
    return step + 1, token, finished, lengths, tokens, cache

  _, _, finished, lengths, tokens, _ = jax.lax.while_loop(cond, body, init)
  return GenerateOutput(tokens=tokens, lengths=lengths, finished=finished)


def generate(
  model: Decoder,
  prompt_ids: jax.Array,
  max_new_tokens: int,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float | None = None,
  rng: jax.Array | None = None,
  eos_id: int | Sequence[int] | None = None,
  prompt_mask: jax.Array | None = None,
  pad_id: int = 0,
  cache_size: int | None = None,
  bucket_prompt: bool = True,
) -> GenerateOutput:
  """Samples continuations of a batch of (left-padded) prompts with a KV cache.

  The prompt is processed in one prefill call, then one token per iteration of a
  ``jax.lax.while_loop`` (it stops early when every row has produced a stop
  token). One compilation per (batch size, prompt bucket, ``max_new_tokens``,
  cache size, greedy / top_k / top_p-on switches, number of stop ids);
  temperature, top_p, the stop ids and pad_id are traced, so changing them does
  not recompile. The prompt is left-padded (masked) up to :func:`prompt_bucket`
  of its length, which changes neither the tokens nor the RoPE positions.

  Args:
    model: the :class:`Decoder`.
    prompt_ids: int [B, P], left-padded if rows differ in length.
    max_new_tokens: tokens to generate per row (at most).
    temperature: 0 = greedy (argmax), else softmax temperature.
    top_k: keep the k most likely tokens (0 = all).
    top_p: nucleus sampling mass (None = off).
    rng: PRNG key (needed unless greedy).
    eos_id: stop token id(s); a row stops after producing one.
    prompt_mask: [B, P], 0 on left padding; default all ones.
    pad_id: written after a row has stopped.
    cache_size: KV cache slots; default ``prompt_bucket(P) + max_new_tokens``. A
      step reads only the slots in use, so a larger cache costs memory, not time.
    bucket_prompt: pad the prompt to :func:`prompt_bucket` (to at most
      ``cache_size - max_new_tokens``); False compiles for the exact length.

  Returns:
    :class:`GenerateOutput` (tokens [B, max_new_tokens], lengths, finished).
  """
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  batch, prompt_len = prompt_ids.shape
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
  needed = prompt_len + max_new_tokens
  if cache_size is not None and cache_size < needed:
    raise ValueError(
      f"cache_size={cache_size} < prompt ({prompt_len}) + max_new_tokens ({max_new_tokens})."
    )
  if prompt_mask is None:
    prompt_mask = jnp.ones((batch, prompt_len), bool)
  prompt_mask = jnp.asarray(prompt_mask, bool)
  padded_len = prompt_bucket(prompt_len) if bucket_prompt else prompt_len
  if cache_size is None:
    cache_size = padded_len + max_new_tokens
  padded_len = min(padded_len, cache_size - max_new_tokens)
  if padded_len > prompt_len:
    # Masked padding on the left; token 0 is a valid id for the embedding lookup.
    padding = ((0, 0), (padded_len - prompt_len, 0))
    prompt_ids = jnp.pad(prompt_ids, padding)
    prompt_mask = jnp.pad(prompt_mask, padding)
  greedy = temperature == 0
  if rng is None:
    if not greedy:
      raise ValueError("Sampling with temperature > 0 needs an rng key.")
    rng = jax.random.key(0)
  # Stop ids and pad are traced (no recompilation per value); -1 matches no token.
  if eos_id is None:
    eos_id = (-1,)
  stop_ids = jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))
  graphdef, state = nnx.split(model)
  return _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    rng,
    jnp.float32(temperature if not greedy else 1.0),
    jnp.float32(1.0 if top_p is None else top_p),
    stop_ids,
    jnp.int32(pad_id),
    max_new_tokens=max_new_tokens,
    cache_size=cache_size,
    greedy=greedy,
    top_k=int(top_k),
    use_top_p=top_p is not None,
  )
