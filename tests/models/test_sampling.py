"""Tests for the decoding fast paths: blocked cached attention, prompt buckets (no
recompilation per prompt length), last-position logits, and greedy tokens equal to
the uncached model's argmax whatever the padding and the cache size."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apollo.models.llama import model as D
from apollo.models.llama import sampling


@pytest.fixture(scope="module")
def model():
  return D.create_sharded_model(lambda: D.Decoder(D.get_config("tiny"), rngs=nnx.Rngs(0)), None)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, attention_mask=mask)[0]


def _logits(model, ids, mask=None):
  """Uncached logits of every position (a plain causal forward)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, ids, jnp.ones(ids.shape, bool) if mask is None else mask)


@contextlib.contextmanager
def _count_compilations(fun_name: str):
  """Counts backend compilations of the jitted function ``fun_name`` in the block."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == (
      f"jit({fun_name})"
    ):
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# ----------------------------------------------------------------------------- attention


def _attention_inputs(slots, length, index, seed=0, batch=2, kv_heads=2, groups=3, dim=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, kv_heads, groups, length, dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, kv_heads, slots, dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, kv_heads, slots, dim)), jnp.float32)
  # Row 1 is left-padded by 5 slots; nothing after the last query is valid yet.
  written = np.arange(slots) < index + length
  valid = np.stack([written, written & (np.arange(slots) >= 5)])
  return q, k, v, jnp.asarray(valid), jnp.int32(index)


@pytest.mark.parametrize(
  "slots, length, index, block",
  [
    (64, 1, 0, 16),  # The first token alone.
    (64, 1, 37, 16),  # A decoding step inside the third block.
    (64, 1, 47, 16),  # The last slot of a block.
    (50, 1, 49, 16),  # The last slot; 50 is no multiple of 16 (the last block moves back).
    (50, 12, 30, 16),  # A chunk across blocks, ending in the moved last block.
    (40, 20, 0, 64),  # A prefill; the block is clipped to the cache.
  ],
)
def test_blocked_attention_equals_dense(slots, length, index, block):
  q, k, v, valid, index = _attention_inputs(slots, length, index)
  got = D.cached_attention(q, k, v, valid, index, block=block)
  expected = D.dense_cached_attention(q, k, v, valid, index)
  # A query with no key to attend (a padding slot) gets some finite output.
  assert np.isfinite(got).all()
  slot = index + np.arange(length)
  has_key = np.asarray([[valid[b, : s + 1].any() for s in slot] for b in range(len(valid))])
  compared = np.broadcast_to(has_key[:, None, None, :, None], got.shape)
  np.testing.assert_allclose(
    np.asarray(got)[compared], np.asarray(expected)[compared], atol=1e-5, rtol=1e-5
  )


def test_blocked_attention_reads_only_the_blocks_in_use():
  """NaN in every block after the one of the last query changes nothing."""
  q, k, v, valid, index = _attention_inputs(64, 1, 20)
  expected = D.cached_attention(q, k, v, valid, index, block=16)
  k, v = k.at[:, :, 32:].set(jnp.nan), v.at[:, :, 32:].set(jnp.nan)
  np.testing.assert_array_equal(D.cached_attention(q, k, v, valid, index, block=16), expected)
  # The dense reference reads them all.
  assert np.isnan(D.dense_cached_attention(q, k, v, valid, index)).any()


def test_cached_logits_equal_uncached_across_blocks(model):
  """A cache of several CACHE_BLOCKs: prefill, then single steps across a block edge."""
  config = model.config
  total, prefill = D.CACHE_BLOCK + 6, D.CACHE_BLOCK - 3
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, total)))
  mask = jnp.asarray([[True] * total, [False] * 4 + [True] * (total - 4)])
  full = _logits(model, ids, mask)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, mask, cache):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)

  cache = model.init_cache(2, 3 * D.CACHE_BLOCK + 5)
  logits, cache = step(state, ids[:, :prefill], mask[:, :prefill], cache)
  pieces = [logits]
  for i in range(prefill, total):
    logits, cache = step(state, ids[:, i : i + 1], mask[:, i : i + 1], cache)
    pieces.append(logits)
  cached = jnp.concatenate(pieces, 1)
  np.testing.assert_allclose(cached[0], full[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(cached[1, 4:], full[1, 4:], atol=1e-5, rtol=0)


def test_last_logits_only(model):
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 9)))
  graphdef, state = nnx.split(model)
  last = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, last_logits_only=True)[0])(state, ids)
  assert last.shape == (2, 1, model.config.vocab_size)
  np.testing.assert_allclose(last, _logits(model, ids)[:, -1:], atol=1e-5)


# ----------------------------------------------------------------------------- generate


def test_prompt_bucket():
  buckets = {n: sampling.prompt_bucket(n) for n in (1, 16, 17, 32, 33, 200, 256, 257, 600)}
  assert buckets == {
    1: 16,
    16: 16,
    17: 32,
    32: 32,
    33: 64,
    200: 256,
    256: 256,
    257: 512,
    600: 768,
  }


def _greedy_reference(model, prompt, mask, steps):
  """Greedy tokens from uncached forwards over the whole sequence, one at a time."""
  ids, mask = prompt, mask
  for _ in range(steps):
    next_token = jnp.argmax(_logits(model, ids, mask)[:, -1], -1).astype(jnp.int32)
    ids = jnp.concatenate([ids, next_token[:, None]], 1)
    mask = jnp.concatenate([mask, jnp.ones((ids.shape[0], 1), bool)], 1)
  return ids[:, prompt.shape[1] :]


def test_greedy_tokens_equal_uncached_argmax_with_buckets_and_large_caches(model):
  """Left-padded prompt, bucketed, decoding across a cache block edge, any cache size."""
  prompt = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 21)), jnp.int32)
  mask = jnp.asarray([[True] * 21, [False] * 6 + [True] * 15])
  steps = D.CACHE_BLOCK - 20  # 21 prompt tokens (bucket 32) + steps cross a block edge.
  expected = _greedy_reference(model, prompt, mask, steps)
  for cache_size in (None, 21 + steps, 5 * D.CACHE_BLOCK + 3):
    out = sampling.generate(
      model, prompt, steps, temperature=0, prompt_mask=mask, cache_size=cache_size
    )
    np.testing.assert_array_equal(out.tokens, expected)
  exact = sampling.generate(
    model, prompt, steps, temperature=0, prompt_mask=mask, bucket_prompt=False
  )
  np.testing.assert_array_equal(exact.tokens, expected)


def test_new_prompt_length_in_the_same_bucket_does_not_recompile(model):
  rng = np.random.default_rng(3)
  first = jnp.asarray(rng.integers(0, 512, (1, 18)), jnp.int32)
  second = jnp.asarray(rng.integers(0, 512, (1, 29)), jnp.int32)  # Both pad to 32.
  third = jnp.asarray(rng.integers(0, 512, (1, 40)), jnp.int32)  # Pads to 64.
  with _count_compilations("_generate") as compiled:
    sampling.generate(model, first, 4, temperature=0)
    assert compiled[0] == 1
    out = sampling.generate(model, second, 4, temperature=0)
    assert compiled[0] == 1
    sampling.generate(model, third, 4, temperature=0)
    assert compiled[0] == 2
  # The padded run gives the unpadded tokens.
  np.testing.assert_array_equal(out.tokens, _greedy_reference(model, second, second >= 0, 4))
