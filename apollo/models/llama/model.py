"""A Llama / Qwen2-style decoder-only transformer in Flax NNX (the agent policy).

The architecture reproduces Hugging Face's ``LlamaForCausalLM`` and
``Qwen2ForCausalLM`` exactly (pre-RMSNorm layers, rotary position embeddings in
HF's ``rotate_half`` convention, grouped-query attention, SwiGLU MLP; Qwen2 adds
biases to the q/k/v projections), so their checkpoints load unchanged through
:mod:`apollo.models.llama.params`.

Pieces:

* :class:`DecoderConfig` and :func:`get_config` (presets from ``tiny`` to 7B).
* :class:`Decoder`: ``model(input_ids, positions, attention_mask, cache) ->
  (logits, new_cache)``.
* :class:`KVCache` / :func:`init_cache`: a preallocated, fixed-size cache, so a
  decoding step is one compiled function with static shapes. Cached attention
  visits only the cache blocks up to the last written slot
  (:func:`cached_attention`, an online softmax over blocks of
  :data:`CACHE_BLOCK` slots), so a step costs what the tokens in the cache cost,
  whatever the cache's allocated size.
Sampling lives in :mod:`apollo.models.llama.sampling`. References: Touvron et al.
(2023), "LLaMA"; Su et al. (2021), "RoFormer" (rotary embeddings); Ainslie et al.
(2023), "GQA"; the reference implementation is transformers' ``modeling_llama.py``.

Sharding follows the encoder's (:mod:`apollo.common.mesh` helpers): every
parameter carries logical axis names ('vocab', 'embed', 'mlp', 'heads',
'kv_heads', 'kv'), :data:`LOGICAL_AXIS_RULES` maps them to the mesh axes
('data', 'fsdp', 'tensor'), and :func:`create_sharded_model` creates the
parameters directly in their shards::

    config = get_config('qwen2_0_5b', dtype='bfloat16')
    model = create_sharded_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), mesh)

Padding convention: batches of prompts are *left*-padded (``attention_mask`` 0 on
the padding), so every row's next token goes to the same cache slot. Positions
default to ``cumsum(attention_mask) - 1``, i.e. each row counts only its real
tokens, as HF ``generate`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# Generic helpers shared with the encoder (logical names -> specs -> shardings).
from apollo.common import mesh as mesh_lib
from apollo.common.mesh import (
  logical_init,
  named_shardings,  # noqa: F401  (re-exported)
)

# Logical axis name -> mesh axis (None = replicated). As the encoder: 'embed' over
# 'fsdp' (ZeRO-3 style), vocabulary / MLP / heads over 'tensor' (Megatron style).
# Key/value heads are split over 'tensor' too, so each tensor shard holds the kv
# heads its query heads read; num_kv_heads must then be divisible by the 'tensor'
# axis (map 'kv_heads' to None for models with fewer kv heads than that).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
)


def logical_partition_specs(
  state: Any, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> Any:
  """`apollo.common.mesh.logical_partition_specs` with the decoder's rules by default."""
  return mesh_lib.logical_partition_specs(state, rules)


def create_sharded_model(
  make_model, mesh: jax.sharding.Mesh | None, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> nnx.Module:
  """`apollo.common.mesh.create_sharded_model` with the decoder's rules by default."""
  return mesh_lib.create_sharded_model(make_model, mesh, rules)


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyperparameters of the decoder (names follow HF's LlamaConfig / Qwen2Config)."""

  vocab_size: int = 151936  # Rows of the token embedding and of the LM head.
  hidden_size: int = 896  # Model width ('embed').
  num_layers: int = 24  # Transformer layers (HF num_hidden_layers).
  num_heads: int = 14  # Query heads.
  num_kv_heads: int = 2  # Key/value heads (GQA); must divide num_heads.
  head_dim: int | None = None  # Per-head width; None = hidden_size // num_heads.
  intermediate_size: int = 4864  # SwiGLU width ('mlp').
  rope_theta: float = 1_000_000.0  # RoPE base frequency.
  # Llama 3 frequency scaling ('llama3') or None; the four fields below apply to it.
  rope_scaling: str | None = None
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768  # Longest context the model was trained for.
  tie_word_embeddings: bool = True  # LM head = token embedding (Qwen2-0.5B, Llama 3.2).
  attention_bias: bool = True  # Biases on q/k/v (Qwen2: True, Llama: False).
  initializer_range: float = 0.02  # Std of the normal init of weights (as HF).
  dtype: Any = jnp.float32  # Compute dtype (float32 or bfloat16).
  param_dtype: Any = jnp.float32  # Parameter storage dtype.

  def __post_init__(self):
    # Accept 'bfloat16' etc. from flags/config files; store canonical numpy dtypes.
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_heads={self.num_heads}; set head_dim."
        )
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.rope_scaling not in (None, "llama3"):
      raise ValueError(
        f"rope_scaling={self.rope_scaling!r}: only None and 'llama3' are implemented."
      )

  @property
  def num_query_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads


_LLAMA = dict(
  rope_theta=10_000.0, rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=False
)
_QWEN2 = dict(
  rope_theta=1_000_000.0, rms_norm_eps=1e-6, attention_bias=True, max_position_embeddings=32768
)
_LLAMA3_ROPE = dict(
  rope_theta=500_000.0,
  rope_scaling="llama3",
  rope_scaling_factor=32.0,
  rope_low_freq_factor=1.0,
  rope_high_freq_factor=4.0,
  rope_original_max_position_embeddings=8192,
  max_position_embeddings=131072,
)

_PRESETS: dict[str, dict[str, Any]] = {
  # Unit tests and CPU quickstarts: GQA (4 query heads share 2 kv heads), Qwen2
  # biases, untied head, so every code path is exercised.
  "tiny": dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    attention_bias=True,
    tie_word_embeddings=False,
  ),
  # A minutes-scale model for CPU/GPU experiments (about 25M parameters).
  "small": dict(
    vocab_size=8192,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=1408,
    max_position_embeddings=4096,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    attention_bias=True,
    tie_word_embeddings=True,
  ),
  # Qwen/Qwen2-0.5B(-Instruct) and Qwen2.5-0.5B.
  "qwen2_0_5b": dict(
    _QWEN2,
    vocab_size=151936,
    hidden_size=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=4864,
    tie_word_embeddings=True,
  ),
  # Qwen/Qwen2-1.5B(-Instruct) and Qwen2.5-1.5B.
  "qwen2_1_5b": dict(
    _QWEN2,
    vocab_size=151936,
    hidden_size=1536,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    intermediate_size=8960,
    tie_word_embeddings=True,
  ),
  # Qwen/Qwen2-7B(-Instruct) and Qwen2.5-7B.
  "qwen2_7b": dict(
    _QWEN2,
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    tie_word_embeddings=False,
  ),
  # meta-llama/Llama-3.2-1B.
  "llama_1b": dict(
    _LLAMA,
    **_LLAMA3_ROPE,
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=8192,
    tie_word_embeddings=True,
  ),
  # meta-llama/Llama-2-7b-hf (multi-head attention: kv heads = heads).
  "llama_7b": dict(
    _LLAMA,
    vocab_size=32000,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    intermediate_size=11008,
    max_position_embeddings=4096,
  ),
  # meta-llama/Llama-3.1-8B.
  "llama3_8b": dict(
    _LLAMA,
    **{**_LLAMA3_ROPE, "rope_scaling_factor": 8.0},
    vocab_size=128256,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=14336,
  ),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> DecoderConfig:
  """Returns a preset (see :data:`PRESET_NAMES`) with fields overridden.

  Example: ``get_config('qwen2_0_5b', dtype='bfloat16')``.
  """
  if name not in _PRESETS:
    raise ValueError(f"Unknown decoder preset {name!r}; choose from {PRESET_NAMES}.")
  return DecoderConfig(**{**_PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# KV cache
# -----------------------------------------------------------------------------


# Cache slots per block of cached attention: a step reads ceil(used / CACHE_BLOCK)
# blocks. Smaller blocks waste less on a partly used block, larger ones cost fewer
# loop iterations (each is a few microseconds on a CPU).
CACHE_BLOCK = 64


class LayerCache(NamedTuple):
  """Keys and values of one layer, for every cache slot.

  Heads come before slots, so attention reads a block of slots of every head as
  contiguous rows (no transpose of the cache in a decoding step).
  """

  k: jax.Array  # [B, kv_heads, T, head_dim], post-RoPE keys.
  v: jax.Array  # [B, kv_heads, T, head_dim].


class KVCache(NamedTuple):
  """A preallocated decoding cache with ``T = max_len`` slots (a pytree).

  Every row writes its next token to the same slot ``index`` (prompts are
  left-padded); ``valid`` marks the slots holding real tokens and ``positions``
  each row's next RoPE position, so rows of different lengths share one cache.
  Writing past ``T`` is not checked inside ``jit`` (``dynamic_update_slice`` would
  clamp): size the cache for prompt + generated tokens (:func:`generate` does).
  """

  layers: tuple[LayerCache, ...]
  valid: jax.Array  # bool [B, T]: the slot holds a real (non-padding) token.
  index: jax.Array  # int32 []: the next slot to write.
  positions: jax.Array  # int32 [B]: the RoPE position of each row's next token.

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


def init_cache(config: DecoderConfig, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens.

  ``dtype`` defaults to the compute dtype. Memory: ``2 * num_layers * batch_size *
  max_len * num_kv_heads * head_dim`` elements.
  """
  c = config
  dtype = c.dtype if dtype is None else jnp.dtype(dtype)
  shape = (batch_size, c.num_kv_heads, max_len, c.head_dim)
  layers = tuple(
    LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers)
  )
  return KVCache(
    layers=layers,
    valid=jnp.zeros((batch_size, max_len), bool),
    index=jnp.zeros((), jnp.int32),
    positions=jnp.zeros((batch_size,), jnp.int32),
  )


# -----------------------------------------------------------------------------
# Building blocks
# -----------------------------------------------------------------------------


def rope_inverse_frequencies(config: DecoderConfig) -> jax.Array:
  """``1 / theta^(2i/head_dim)`` (float32 [head_dim/2]), Llama-3-scaled if configured.

  The ``llama3`` scaling is HF's ``_compute_llama3_parameters``: long wavelengths
  are divided by ``factor``, short ones kept, and the band between interpolated.
  """
  c = config
  exponents = jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim
  inv_freq = 1.0 / (c.rope_theta**exponents)
  if c.rope_scaling == "llama3":
    old_len = c.rope_original_max_position_embeddings
    low_wavelen = old_len / c.rope_low_freq_factor
    high_wavelen = old_len / c.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / c.rope_scaling_factor, inv_freq)
    smooth = (old_len / wavelen - c.rope_low_freq_factor) / (
      c.rope_high_freq_factor - c.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / c.rope_scaling_factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in HF's convention (``x * cos + rotate_half(x) * sin``).

  HF pairs dimension ``i`` with ``i + head_dim/2`` (not adjacent dimensions, as
  the original RoPE paper), so weights need no permutation.

  Args:
    x: [B, L, heads, head_dim].
    positions: int [B, L].
    inv_freq: float32 [head_dim/2].
  """
  # Angles in float32 (as HF, which disables autocast here), then cast to x.dtype.
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nnx.Module):
  """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.eps = c.rms_norm_eps
    # Vectors of width 'embed' are replicated, as the encoder's LayerNorms.
    self.scale = nnx.Param(
      logical_init(nnx.initializers.ones_init(), (None,))(
        rngs.params(), (c.hidden_size,), c.param_dtype
      )
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * x32.astype(dtype)


def _projection(
  c: DecoderConfig, in_features, out_features, axes, *, bias: bool, rngs: nnx.Rngs, axis=-1
) -> nnx.LinearGeneral:
  """A (possibly multi-axis) Linear with HF's init and logical names ``axes``."""
  out_axes = axes[-len(out_features) :] if isinstance(out_features, tuple) else axes[-1:]
  return nnx.LinearGeneral(
    in_features,
    out_features,
    axis=axis,
    use_bias=bias,
    dtype=c.dtype,
    param_dtype=c.param_dtype,
    kernel_init=logical_init(nnx.initializers.normal(c.initializer_range), axes),
    bias_init=logical_init(nnx.initializers.zeros_init(), tuple(out_axes)),
    rngs=rngs,
  )


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE and an optional KV cache.

  Kernels keep heads as their own axis ([embed, heads, kv] for queries,
  [embed, kv_heads, kv] for keys/values, [heads, kv, embed] for the output), so
  tensor parallelism splits whole heads.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.q_proj = _projection(
      c,
      c.hidden_size,
      (c.num_heads, c.head_dim),
      ("embed", "heads", "kv"),
      bias=c.attention_bias,
      rngs=rngs,
    )
    self.k_proj = _projection(
      c,
      c.hidden_size,
      (c.num_kv_heads, c.head_dim),
      ("embed", "kv_heads", "kv"),
      bias=c.attention_bias,
      rngs=rngs,
    )
    self.v_proj = _projection(
      c,
      c.hidden_size,
      (c.num_kv_heads, c.head_dim),
      ("embed", "kv_heads", "kv"),
      bias=c.attention_bias,
      rngs=rngs,
    )
    self.o_proj = _projection(
      c,
      (c.num_heads, c.head_dim),
      c.hidden_size,
      ("heads", "kv", "embed"),
      bias=False,
      rngs=rngs,
      axis=(-2, -1),
    )

  def __call__(self, x, positions, inv_freq, key_mask, layer_cache=None, index=None):
    """Attends each query to the keys ``key_mask`` allows.

    Args:
      x: [B, L, embed].
      positions: int [B, L] RoPE positions.
      inv_freq: float32 [head_dim/2].
      key_mask: without a cache, bool [B, L, L]: query i may attend key j. With a
        cache, bool [B, T]: the slots holding real tokens, this input's included;
        query i (written to slot ``index + i``) attends the real slots up to its own.
      layer_cache: this layer's :class:`LayerCache`, or None (keys = this input).
      index: int32 [] slot where this input's keys are written in the cache.

    Returns:
      (output [B, L, embed], the updated LayerCache or None).
    """
    c = self.config
    q = apply_rope(self.q_proj(x), positions, inv_freq)  # [B, L, H, D]
    k = apply_rope(self.k_proj(x), positions, inv_freq)  # [B, L, KV, D]
    v = self.v_proj(x)
    batch, length = q.shape[:2]
    # GQA: query heads h = g * groups + j read kv head g (HF's repeat_kv order);
    # grouping the query heads leaves the kv heads unrepeated.
    q = q.reshape(batch, length, c.num_kv_heads, c.num_query_groups, c.head_dim)
    q = q * jnp.asarray(c.head_dim**-0.5, q.dtype)
    if layer_cache is not None:
      start = (0, 0, index, 0)
      k = jnp.swapaxes(k, 1, 2).astype(layer_cache.k.dtype)  # [B, KV, L, D]
      v = jnp.swapaxes(v, 1, 2).astype(layer_cache.v.dtype)
      layer_cache = LayerCache(
        jax.lax.dynamic_update_slice(layer_cache.k, k, start),
        jax.lax.dynamic_update_slice(layer_cache.v, v, start),
      )
      context = cached_attention(
        jnp.moveaxis(q, 1, 3), layer_cache.k, layer_cache.v, key_mask, index, CACHE_BLOCK
      )  # [B, KV, G, L, D]
      context = jnp.moveaxis(context, 3, 1)
    else:
      logits = jnp.einsum("blkgd,bskd->bkgls", q, k)
      # Softmax in float32 whatever the compute dtype.
      logits = jnp.where(key_mask[:, None, None], logits.astype(jnp.float32), _MASKED)
      probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      context = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    context = context.reshape(batch, length, c.num_heads, c.head_dim)
    return self.o_proj(context), layer_cache


# The score of a masked key. Finite, so that a query with no key to attend (left
# padding) averages the values instead of producing NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def cached_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  valid: jax.Array,
  index: jax.Array,
  block: int = CACHE_BLOCK,
) -> jax.Array:
  """Causal attention of ``L`` queries at slots ``index .. index+L-1`` over a cache.

  Only the blocks of ``block`` slots up to the last query's slot are read (a
  ``fori_loop`` with a traced trip count, combined by an online softmax as in
  Milakov & Gimelshein (2018), "Online normalizer calculation for softmax"), so
  the cost follows the tokens written, not the cache's size. Equal to a softmax
  over every slot with masked scores (:func:`dense_cached_attention`) up to
  float32 rounding.

  Args:
    q: [B, KV, G, L, D] queries, already scaled by ``1/sqrt(D)``.
    k: [B, KV, T, D] cached keys, this input's included.
    v: [B, KV, T, D] cached values.
    valid: bool [B, T]: slots holding real tokens (left padding is False).
    index: int32 []: the slot of the first query.
    block: slots per block (clipped to T).

  Returns:
    [B, KV, G, L, D] in the dtype of ``v``; a query with no real slot to attend
    (left padding) gets a finite average of values, used by nothing.
  """
  batch, kv_heads, groups, length, head_dim = q.shape
  slots = k.shape[2]
  block = min(block, slots)
  query_slot = index + jnp.arange(length)
  num_blocks = (index + length + block - 1) // block

  def attend_block(j, carry):
    running_max, norm, acc = carry
    # The last block is moved back to end at T when T is not a multiple of
    # `block`; slots before j * block were already counted and are masked.
    start = jnp.minimum(j * block, slots - block)
    k_block = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)
    v_block = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
    slot = start + jnp.arange(block)
    allowed = (slot[None, :] <= query_slot[:, None]) & (slot >= j * block)[None, :]  # [L, blk]
    allowed = allowed[None] & jax.lax.dynamic_slice_in_dim(valid, start, block, axis=1)[:, None]
    scores = jnp.einsum("bkgld,bksd->bkgls", q, k_block.astype(q.dtype))
    scores = jnp.where(allowed[:, None, None], scores.astype(jnp.float32), _MASKED)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    rescale = jnp.exp(running_max - new_max)
    norm = norm * rescale + probs.sum(axis=-1)
    update = jnp.einsum("bkgls,bksd->bkgld", probs.astype(v.dtype), v_block)
    acc = acc * rescale[..., None] + update.astype(jnp.float32)
    return new_max, norm, acc

  stats_shape = (batch, kv_heads, groups, length)
  init = (
    jnp.full(stats_shape, _MASKED, jnp.float32),
    jnp.zeros(stats_shape, jnp.float32),
    jnp.zeros((*stats_shape, head_dim), jnp.float32),
  )
  _, norm, acc = jax.lax.fori_loop(0, num_blocks, attend_block, init)
  return (acc / norm[..., None]).astype(v.dtype)


def dense_cached_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, index: jax.Array
) -> jax.Array:
  """:func:`cached_attention` as one softmax over every slot (the reference)."""
  length, slots = q.shape[3], k.shape[2]
  causal = jnp.arange(slots)[None, :] <= (index + jnp.arange(length))[:, None]
  allowed = causal[None] & valid[:, None, :]  # [B, L, T]
  scores = jnp.einsum("bkgld,bksd->bkgls", q, k.astype(q.dtype))
  scores = jnp.where(allowed[:, None, None], scores.astype(jnp.float32), _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgls,bksd->bkgld", probs, v)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.gate_proj = _projection(
      c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False, rngs=rngs
    )
    self.up_proj = _projection(
      c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False, rngs=rngs
    )
    self.down_proj = _projection(
      c, c.intermediate_size, c.hidden_size, ("mlp", "embed"), bias=False, rngs=rngs
    )

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm layer: ``h = x + Attn(RMSNorm(x))``; ``out = h + MLP(RMSNorm(h))``."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config, rngs=rngs)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, inv_freq, key_mask, layer_cache=None, index=None):
    attended, layer_cache = self.self_attn(
      self.input_layernorm(x), positions, inv_freq, key_mask, layer_cache, index
    )
    x = x + attended
    return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


class Decoder(nnx.Module):
  """The causal language model: embedding, layers, final RMSNorm, LM head.

  Attributes (HF names in brackets): ``embed_tokens`` [model.embed_tokens],
  ``layers`` [model.layers], ``norm`` [model.norm], ``lm_head`` [lm_head; None
  when ``tie_word_embeddings``, the embedding is then used transposed].
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embed_tokens = nnx.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      embedding_init=logical_init(nnx.initializers.normal(c.initializer_range), ("vocab", "embed")),
      rngs=rngs,
    )
    self.layers = nnx.List([DecoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
    self.norm = RMSNorm(c, rngs=rngs)
    self.lm_head = (
      None
      if c.tie_word_embeddings
      else _projection(c, c.hidden_size, c.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs)
    )

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    """:func:`init_cache` for this model's config."""
    return init_cache(self.config, batch_size, max_len, dtype)

  def __call__(
    self,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
    segment_ids: jax.Array | None = None,
    last_logits_only: bool = False,
  ) -> tuple[jax.Array, KVCache | None]:
    """Next-token logits for every input position.

    Args:
      input_ids: int [B, L].
      positions: int [B, L] RoPE positions; default: each row counts its real
        tokens, continuing from the cache (``cache.positions + cumsum(mask) - 1``).
      attention_mask: [B, L], 1 for real tokens, 0 for padding (never attended);
        default all ones.
      cache: a :class:`KVCache`; the input is written at ``cache.index`` and
        attends to everything cached before it. None: plain causal attention
        over the input alone.
      segment_ids: int [B, L] (no cache only): packed training rows; a token
        attends only to earlier tokens of its own segment. Pass per-segment
        ``positions`` with it (they restart at 0 in each segment).
      last_logits_only: the LM head only for the last position (L becomes 1 in
        the logits): a prefill needs just the next token's, and the head over a
        whole prompt costs ``L`` times as much.

    Returns:
      (logits [B, L, vocab] in the compute dtype, the updated cache or None).
    """
    c = self.config
    batch, length = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    attention_mask = attention_mask.astype(bool)
    offset = jnp.zeros((batch,), jnp.int32) if cache is None else cache.positions
    if positions is None:
      counted = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
      positions = offset[:, None] + jnp.maximum(counted, 0)
    if cache is None:
      causal = jnp.tril(jnp.ones((length, length), bool))
      key_mask = causal[None] & attention_mask[:, None, :]
      if segment_ids is not None:
        key_mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache.")
      valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
      key_mask = valid  # Causality within the cache is cached_attention's.
    inv_freq = rope_inverse_frequencies(c)

    x = self.embed_tokens(input_ids)
    new_layers = []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache.layers[i]
      x, layer_cache = layer(
        x, positions, inv_freq, key_mask, layer_cache, None if cache is None else cache.index
      )
      new_layers.append(layer_cache)
    if last_logits_only:
      x = x[:, -1:]
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    if cache is None:
      return logits, None
    new_cache = KVCache(
      layers=tuple(new_layers),
      valid=valid,
      index=cache.index + length,
      positions=offset + attention_mask.sum(-1, dtype=jnp.int32),
    )
    return logits, new_cache
