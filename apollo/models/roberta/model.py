"""A RoBERTa/BERT encoder in Flax NNX, with the heads APOLLO needs.

The trunk reproduces Hugging Face's ``RobertaModel`` exactly (post-LN layers, exact
erf GELU, RoBERTa's padding-offset position ids), so pretrained RoBERTa weights load
unchanged through :mod:`apollo.models.roberta.params`. BERT (``BertModel``, e.g.
all-MiniLM-L6-v2) is the same network with absolute position ids from 0 and two token
types: ``EncoderConfig(position_scheme='absolute', type_vocab_size=2, ...)``, built by
:mod:`apollo.models.bert.model` and loaded through :mod:`apollo.models.bert.params`.

Modules:

* :class:`Encoder`: embeddings + transformer layers (+ optional pooler), the trunk.
* :class:`PretrainingModel`: encoder + S-MLM head + E-CLS head (continued pretraining).
* :class:`MultipleChoiceModel`: encoder with pooler + one score per choice
  (ReClor / LogiQA fine-tuning), like ``RobertaForMultipleChoice``.
* :func:`mean_pool`: masked mean of the hidden states (sentence embeddings, as
  sentence-transformers pools all-MiniLM-L6-v2).

Every parameter carries *logical* axis names ('vocab', 'embed', 'mlp', 'heads',
'kv', 'position', or None for replicated) as NNX ``out_sharding`` metadata; a table
of rules (:data:`LOGICAL_AXIS_RULES`) maps them to the mesh axes
('data', 'fsdp', 'tensor'). :func:`create_sharded_model` builds a sharded model::

    make = lambda: PretrainingModel(config, rngs=nnx.Rngs(0))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    specs = logical_partition_specs(abstract_state, LOGICAL_AXIS_RULES)
    state = jax.jit(lambda: nnx.state(make()),
                    out_shardings=named_shardings(specs, mesh))()
    model = nnx.merge(graphdef, state)

The forward pass needs no annotations on a mesh with ``AxisType.Auto`` axes (the
compiler places the collectives). On an ``AxisType.Explicit`` mesh, run it inside
``jax.sharding.auto_axes(forward, out_sharding=...)``; both are tested.

Dropout is stateless at construction: the model holds only ``nnx.Param`` s, and the
caller passes ``deterministic=False, rngs=key`` (a PRNG key, e.g.
``jax.random.fold_in(rng, step)``) when training, so a train step stays a pure
function of (params, batch, key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apollo.common import mesh as mesh_lib
from apollo.common.mesh import logical_init, named_shardings  # noqa: F401  (re-exported)

# Logical axis name -> mesh axis (None = replicated). 'embed' is split over 'fsdp'
# (ZeRO-3 style parameter sharding); vocabulary, MLP and heads are split over
# 'tensor' (Megatron-style tensor parallelism). The head dimension ('kv') and the
# position table are small and stay replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("position", None),
)


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------

POSITION_SCHEMES = ("roberta", "absolute")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyperparameters of the encoder (names follow HF's RobertaConfig / BertConfig)."""

  vocab_size: int = 50265  # Rows of the (tied) word embedding / MLM output.
  hidden_size: int = 768  # Model width ('embed').
  num_layers: int = 12  # Transformer layers.
  num_heads: int = 12  # Attention heads; hidden_size must be divisible by it.
  intermediate_size: int = 3072  # Feed-forward width ('mlp').
  # RoBERTa reserves positions 0..pad_token_id, so 514 = 512 usable positions.
  max_position_embeddings: int = 514
  type_vocab_size: int = 1  # RoBERTa has a single token type; BERT two (segments A, B).
  # Position ids: 'roberta' (from pad_token_id + 1, padding not counted; HF
  # RobertaEmbeddings) or 'absolute' (0, 1, 2, ... in every row; HF BertEmbeddings).
  position_scheme: str = "roberta"
  layer_norm_eps: float = 1e-5
  hidden_dropout_rate: float = 0.1  # Embeddings, residual branches, heads.
  attention_dropout_rate: float = 0.1  # On the attention probabilities.
  # Dropout inside the E-CLS head; None = hidden_dropout_rate (HF classifier_dropout).
  classifier_dropout_rate: float | None = None
  pad_token_id: int = 1  # RoBERTa: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4. BERT: [PAD]=0.
  initializer_range: float = 0.02  # Std of the normal init of weights (as HF).
  num_ecls_labels: int = 2  # E-CLS: 0 = entailment-type, 1 = contradiction-type.
  dtype: Any = jnp.float32  # Compute dtype (float32 or bfloat16).
  param_dtype: Any = jnp.float32  # Parameter storage dtype; keep float32.

  def __post_init__(self):
    # Accept 'bfloat16' etc. from flags/config files; store canonical numpy dtypes.
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    if self.position_scheme not in POSITION_SCHEMES:
      raise ValueError(f"position_scheme={self.position_scheme!r}; choose from {POSITION_SCHEMES}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}."
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def max_sequence_length(self) -> int:
    """Longest input the position table supports (RoBERTa's start after pad)."""
    if self.position_scheme == "absolute":
      return self.max_position_embeddings
    return self.max_position_embeddings - self.pad_token_id - 1


_PRESETS: dict[str, dict[str, Any]] = {
  # For unit tests and CPU quickstarts.
  "tiny": dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    max_position_embeddings=130,
  ),
  # A few-minute CPU/GPU scale model that still has a real vocabulary.
  "small": dict(
    vocab_size=50265,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    intermediate_size=1024,
    max_position_embeddings=514,
  ),
  # roberta-base.
  "base": dict(
    vocab_size=50265,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
  ),
  # roberta-large (the APOLLO paper's backbone).
  "large": dict(
    vocab_size=50265,
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    intermediate_size=4096,
    max_position_embeddings=514,
  ),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> EncoderConfig:
  """Returns a preset ('tiny', 'small', 'base', 'large') with fields overridden.

  Example: ``get_config('large', dtype='bfloat16', vocab_size=50265)``.
  """
  if name not in _PRESETS:
    raise ValueError(f"Unknown encoder preset {name!r}; choose from {PRESET_NAMES}.")
  return EncoderConfig(**{**_PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Sharding helpers
# -----------------------------------------------------------------------------


def logical_partition_specs(
  state: Any, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> Any:
  """`apollo.common.mesh.logical_partition_specs` with the encoder's rules by default."""
  return mesh_lib.logical_partition_specs(state, rules)


def create_sharded_model(
  make_model: Callable[[], nnx.Module],
  mesh: jax.sharding.Mesh | None,
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> nnx.Module:
  """`apollo.common.mesh.create_sharded_model` with the encoder's rules by default."""
  return mesh_lib.create_sharded_model(make_model, mesh, rules)


# -----------------------------------------------------------------------------
# Building blocks
# -----------------------------------------------------------------------------


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
  """RoBERTa's position ids: pad tokens get ``pad_token_id``, others count from it.

  Matches HF ``create_position_ids_from_input_ids``: the first real token is at
  ``pad_token_id + 1``, and padding anywhere in the sequence does not advance
  the count.
  """
  is_token = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(is_token, axis=-1) * is_token + pad_token_id


def compute_position_ids(input_ids: jax.Array, config: EncoderConfig) -> jax.Array:
  """Position ids of ``input_ids`` [..., L] under ``config.position_scheme``.

  'absolute' is BERT's ``0 .. L-1`` in every row, padding or not (HF
  ``BertEmbeddings``); 'roberta' is :func:`roberta_position_ids`.
  """
  if config.position_scheme == "absolute":
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
  return roberta_position_ids(input_ids, config.pad_token_id)


def _dropout_rngs(rngs: nnx.Rngs | jax.Array | None) -> nnx.Rngs | None:
  # A bare key would give every dropout layer the same mask; an Rngs object hands
  # each call a fresh key.
  if rngs is None or isinstance(rngs, nnx.Rngs):
    return rngs
  return nnx.Rngs(dropout=rngs)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry_bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)`` for a threefry key, bit for bit.

  The same Threefry-2x32 hash of the same counters (JAX's partitionable layout:
  element i hashes the pair (i >> 32, i & 0xffffffff), its bits are the XOR of the
  two words) and the same float conversion, written as plain uint32 arithmetic.
  JAX lowers its threefry to a rolled loop on CPU, one pass over memory per round
  group; unrolled, XLA fuses the hash, the compare and the caller's select into one
  loop (3x faster dropout in the pretraining step). Shapes below 2**32 elements.
  """
  k1, k2 = jax.random.key_data(key)
  counter = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    counter = counter + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
    stride *= shape[dim]
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  x0, x1 = jnp.zeros(shape, jnp.uint32) + ks[0], counter + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  # jax.random.uniform: 23 random mantissa bits under exponent 0, minus 1.
  mantissa = ((x0 ^ x1) >> np.uint32(9)) | np.uint32(0x3F800000)
  uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  return uniform < np.float32(p)


class Dropout(nnx.Dropout):
  """``nnx.Dropout`` with the same masks, drawn by :func:`threefry_bernoulli`.

  Falls back to ``nnx.Dropout`` for what that does not cover (broadcast dims,
  another PRNG implementation, JAX's non-partitionable threefry, 2**32+ elements).
  """

  def __call__(self, inputs, *, deterministic=None, rngs=None):
    deterministic = self.deterministic if deterministic is None else deterministic
    size = int(np.prod(inputs.shape))
    if (
      deterministic is not False
      or not 0.0 < self.rate < 1.0
      or self.broadcast_dims
      or not isinstance(rngs, nnx.Rngs)
      or not jax.config.jax_threefry_partitionable
      or size >= 2**32
    ):
      return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    key = rngs[self.rng_collection]()
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.wrap_key_data(key)
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return super().__call__(inputs, deterministic=False, rngs=key)
    keep_prob = 1.0 - self.rate
    mask = threefry_bernoulli(key, keep_prob, inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout (Roberta/BertEmbeddings)."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    init = nnx.initializers.normal(c.initializer_range)
    common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.word_embeddings = nnx.Embed(
      c.vocab_size, c.hidden_size, embedding_init=logical_init(init, ("vocab", "embed")), **common
    )
    self.position_embeddings = nnx.Embed(
      c.max_position_embeddings,
      c.hidden_size,
      embedding_init=logical_init(init, ("position", "embed")),
      **common,
    )
    self.token_type_embeddings = nnx.Embed(
      c.type_vocab_size, c.hidden_size, embedding_init=logical_init(init, (None, "embed")), **common
    )
    self.layer_norm = _layer_norm(c, rngs)
    self.dropout = Dropout(c.hidden_dropout_rate)

  def __call__(self, input_ids, token_type_ids=None, *, deterministic=True, rngs=None):
    c = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (
      self.word_embeddings(input_ids)
      + self.token_type_embeddings(token_type_ids)
      + self.position_embeddings(compute_position_ids(input_ids, c))
    )
    x = self.layer_norm(x)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)


def _layer_norm(c: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Vectors of width 'embed' are replicated: sharding them saves nothing and would
  # cost a gather per use. Exact (two-pass) variance to match PyTorch's LayerNorm.
  return nnx.LayerNorm(
    c.hidden_size,
    epsilon=c.layer_norm_eps,
    use_fast_variance=False,
    dtype=c.dtype,
    param_dtype=c.param_dtype,
    scale_init=logical_init(nnx.initializers.ones_init(), (None,)),
    bias_init=logical_init(nnx.initializers.zeros_init(), (None,)),
    rngs=rngs,
  )


def _dense(
  c: EncoderConfig,
  in_features: int,
  out_features: int,
  axes: tuple[str | None, str | None],
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """A Linear layer with HF's init and logical names ``axes`` for its kernel.

  The bias follows the output axis, except that 'embed'-wide biases are replicated
  like the LayerNorms.
  """
  bias_axis = None if axes[1] == "embed" else axes[1]
  return nnx.Linear(
    in_features,
    out_features,
    dtype=c.dtype,
    param_dtype=c.param_dtype,
    kernel_init=logical_init(nnx.initializers.normal(c.initializer_range), axes),
    bias_init=logical_init(nnx.initializers.zeros_init(), (bias_axis,)),
    rngs=rngs,
  )


class SelfAttention(nnx.Module):
  """Multi-head self-attention followed by the output projection (no residual/LN).

  Projections keep heads as their own axis (kernel [embed, heads, kv]) so tensor
  parallelism splits whole heads.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    init = nnx.initializers.normal(c.initializer_range)
    heads = (c.num_heads, c.head_dim)

    def projection():
      return nnx.LinearGeneral(
        c.hidden_size,
        heads,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        kernel_init=logical_init(init, ("embed", "heads", "kv")),
        bias_init=logical_init(nnx.initializers.zeros_init(), ("heads", "kv")),
        rngs=rngs,
      )

    self.query = projection()
    self.key = projection()
    self.value = projection()
    self.output = nnx.LinearGeneral(
      heads,
      c.hidden_size,
      axis=(-2, -1),
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      kernel_init=logical_init(init, ("heads", "kv", "embed")),
      bias_init=logical_init(nnx.initializers.zeros_init(), (None,)),
      rngs=rngs,
    )
    self.dropout = Dropout(c.attention_dropout_rate)

  def __call__(self, x, mask, *, deterministic=True, rngs=None):
    """x: [B, L, embed]; mask: bool [B, 1, 1, L], True where a key may be attended."""
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, L, heads, kv]
    q = q / jnp.sqrt(self.config.head_dim).astype(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    # Softmax in float32 whatever the compute dtype: bf16 logits lose the small
    # differences between attention scores.
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.output(context)


class TransformerLayer(nnx.Module):
  """One post-LN encoder layer, as HF's RobertaLayer.

  ``h = LN(x + Drop(Attn(x)))``; ``out = LN(h + Drop(W2 gelu(W1 h)))``.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.attention = SelfAttention(c, rngs=rngs)
    self.attention_layer_norm = _layer_norm(c, rngs)
    self.intermediate = _dense(c, c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs)
    self.output = _dense(c, c.intermediate_size, c.hidden_size, ("mlp", "embed"), rngs)
    self.output_layer_norm = _layer_norm(c, rngs)
    self.dropout = Dropout(c.hidden_dropout_rate)

  def __call__(self, x, mask, *, deterministic=True, rngs=None):
    drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
    attended = self.attention(x, mask, deterministic=deterministic, rngs=rngs)
    x = self.attention_layer_norm(x + drop(attended))
    # HF's "gelu" is the exact erf form, not the tanh approximation.
    y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.output_layer_norm(x + drop(y))


class Pooler(nnx.Module):
  """dense + tanh on the first (``<s>`` / ``[CLS]``) token, as HF's Roberta/BertPooler."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.dense = _dense(c, c.hidden_size, c.hidden_size, ("embed", "mlp"), rngs)

  def __call__(self, hidden_states):
    return jnp.tanh(self.dense(hidden_states[..., 0, :]))


def mean_pool(
  hidden_states: jax.Array, attention_mask: jax.Array, *, normalize: bool = False
) -> jax.Array:
  """Sentence embeddings: the mean of the hidden states over real tokens.

  As sentence-transformers' mean ``Pooling`` (+ ``Normalize`` when ``normalize``),
  the head all-MiniLM-L6-v2 was trained with. Computed in float32.

  Args:
    hidden_states: [B, L, embed], e.g. :class:`Encoder`'s output.
    attention_mask: [B, L], 1 (or True) for real tokens, 0 for padding.
    normalize: divide each embedding by its L2 norm (cosine similarity becomes a
      dot product).

  Returns:
    [B, embed] float32.
  """
  mask = attention_mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden_states.astype(jnp.float32) * mask, axis=-2)
  pooled = summed / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


class Encoder(nnx.Module):
  """The trunk: embeddings, ``num_layers`` post-LN layers, optional pooler.

  Attributes:
    embeddings: :class:`Embeddings` (``word_embeddings`` is tied to the MLM decoder).
    layers: ``nnx.List`` of :class:`TransformerLayer`.
    pooler: :class:`Pooler`, or None when built with ``add_pooler=False`` (as HF's
      ``RobertaForMaskedLM``, which has no pooler).
  """

  def __init__(self, config: EncoderConfig, *, add_pooler: bool = True, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([TransformerLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.pooler = Pooler(config, rngs=rngs) if add_pooler else None

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | jax.Array | None = None,
  ) -> jax.Array:
    """Encodes a batch of token ids.

    Args:
      input_ids: int [B, L].
      attention_mask: [B, L], 1 (or True) for real tokens, 0 for padding. Defaults
        to ``input_ids != pad_token_id``.
      token_type_ids: int [B, L] (BERT: 0 for segment A, 1 for B); defaults to zeros.
      deterministic: if False, dropout is applied (needs ``rngs``).
      rngs: ``nnx.Rngs`` with a 'dropout' stream, or a PRNG key.

    Returns:
      Hidden states [B, L, hidden_size] in the compute dtype.
    """
    c = self.config
    rngs = _dropout_rngs(rngs)
    if input_ids.shape[-1] > c.max_sequence_length:
      raise ValueError(
        f"Sequence length {input_ids.shape[-1]} exceeds the position table "
        f"({c.max_sequence_length} tokens)."
      )
    if attention_mask is None:
      attention_mask = input_ids != c.pad_token_id
    mask = attention_mask.astype(bool)[:, None, None, :]
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
    for layer in self.layers:
      x = layer(x, mask, deterministic=deterministic, rngs=rngs)
    return x


# -----------------------------------------------------------------------------
# Heads and task models
# -----------------------------------------------------------------------------


@jax.custom_vjp
def tied_decoder(x: jax.Array, embedding: jax.Array, bias: jax.Array) -> jax.Array:
  """``x @ embedding.T + bias``: MLM logits [..., vocab] from the tied word embedding.

  The same function as ``nnx.Embed.attend`` plus the bias, with a hand-written
  gradient: XLA's CPU backend turned the automatic one into a transposed copy of
  the [N, vocab] cotangent before the embedding's gradient and a slow column sum
  for the bias'; here the embedding gradient contracts the cotangent in place and
  the bias gradient is a vector-matrix product. Same arithmetic, same results.
  """
  return jnp.einsum("...d,vd->...v", x, embedding) + bias


def _tied_decoder_fwd(x, embedding, bias):
  return tied_decoder(x, embedding, bias), (x, embedding)


def _tied_decoder_bwd(residuals, g):
  x, embedding = residuals
  rows_x = x.reshape(-1, x.shape[-1])
  rows_g = g.reshape(-1, g.shape[-1])
  d_x = jnp.einsum("...v,vd->...d", g, embedding)
  d_embedding = jax.lax.dot_general(rows_g, rows_x, (((0,), (0,)), ((), ())))
  d_bias = jnp.ones((rows_g.shape[0],), rows_g.dtype) @ rows_g
  return d_x, d_embedding.astype(embedding.dtype), d_bias


tied_decoder.defvjp(_tied_decoder_fwd, _tied_decoder_bwd)


class MLMHead(nnx.Module):
  """HF RobertaLMHead / BertLMPredictionHead: dense, GELU, LayerNorm, tied decoder.

  The decoder weight is the encoder's word embedding (passed at call time, so the
  head owns only ``dense``, ``layer_norm`` and the output ``bias``).
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.dense = _dense(c, c.hidden_size, c.hidden_size, ("embed", "mlp"), rngs)
    self.layer_norm = _layer_norm(c, rngs)
    self.bias = nnx.Param(
      logical_init(nnx.initializers.zeros_init(), ("vocab",))(
        rngs.params(), (c.vocab_size,), c.param_dtype
      )
    )

  def __call__(self, hidden_states, word_embeddings: nnx.Embed):
    x = jax.nn.gelu(self.dense(hidden_states), approximate=False)
    x = self.layer_norm(x)
    embedding = word_embeddings.embedding[...].astype(x.dtype)
    return tied_decoder(x, embedding, self.bias[...].astype(x.dtype))


class ClassificationHead(nnx.Module):
  """HF RobertaClassificationHead on ``<s>``: dropout, dense, tanh, dropout, out_proj."""

  def __init__(self, config: EncoderConfig, num_labels: int, *, rngs: nnx.Rngs):
    c = config
    rate = c.hidden_dropout_rate if c.classifier_dropout_rate is None else c.classifier_dropout_rate
    self.dense = _dense(c, c.hidden_size, c.hidden_size, ("embed", "mlp"), rngs)
    self.out_proj = _dense(c, c.hidden_size, num_labels, ("mlp", None), rngs)
    self.dropout = Dropout(rate)

  def __call__(self, hidden_states, *, deterministic=True, rngs=None):
    drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
    x = drop(hidden_states[:, 0, :])
    x = drop(jnp.tanh(self.dense(x)))
    return self.out_proj(x)


class PretrainingOutput(NamedTuple):
  """Outputs of :class:`PretrainingModel` (a pytree, so it can leave ``jax.jit``)."""

  mlm_logits: jax.Array  # [B, L, vocab] or [B, M, vocab] with mlm_positions.
  ecls_logits: jax.Array  # [B, num_ecls_labels].


class PretrainingModel(nnx.Module):
  """Encoder + S-MLM head + E-CLS head for APOLLO continued pretraining.

  Parameter layout mirrors HF: ``encoder`` <-> ``roberta.*`` (``bert.*``), ``mlm_head``
  <-> ``lm_head.*`` (``cls.predictions.*``), ``ecls_head`` <-> ``classifier.*``
  (RobertaClassificationHead).
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    # No pooler, as RobertaForMaskedLM: neither loss uses it.
    self.encoder = Encoder(config, add_pooler=False, rngs=rngs)
    self.mlm_head = MLMHead(config, rngs=rngs)
    self.ecls_head = ClassificationHead(config, config.num_ecls_labels, rngs=rngs)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    mlm_positions: jax.Array | None = None,
    deterministic: bool = True,
    rngs: nnx.Rngs | jax.Array | None = None,
  ) -> PretrainingOutput:
    """Runs the encoder once and both heads.

    Args:
      input_ids, attention_mask, token_type_ids: as :meth:`Encoder.__call__`.
      mlm_positions: optional int [B, M] token positions; if given, MLM logits are
        computed only there ([B, M, vocab]), which saves the [B, L, vocab] matmul
        when few tokens are masked.
      deterministic, rngs: dropout control, as :meth:`Encoder.__call__`.

    Returns:
      :class:`PretrainingOutput` (mlm_logits, ecls_logits), float in compute dtype.
    """
    rngs = _dropout_rngs(rngs)
    hidden = self.encoder(
      input_ids, attention_mask, token_type_ids, deterministic=deterministic, rngs=rngs
    )
    mlm_hidden = hidden
    if mlm_positions is not None:
      mlm_hidden = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)
    mlm_logits = self.mlm_head(mlm_hidden, self.encoder.embeddings.word_embeddings)
    ecls_logits = self.ecls_head(hidden, deterministic=deterministic, rngs=rngs)
    return PretrainingOutput(mlm_logits=mlm_logits, ecls_logits=ecls_logits)


class MultipleChoiceModel(nnx.Module):
  """Encoder with pooler + a linear scorer per choice, as Roberta/BertForMultipleChoice.

  Parameter layout: ``encoder`` <-> ``roberta.*`` / ``bert.*`` (pooler included),
  ``scorer`` <-> ``classifier.*``.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = config
    self.encoder = Encoder(c, add_pooler=True, rngs=rngs)
    self.dropout = Dropout(c.hidden_dropout_rate)
    self.scorer = _dense(c, c.hidden_size, 1, ("mlp", None), rngs)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | jax.Array | None = None,
  ) -> jax.Array:
    """Scores each choice.

    Args:
      input_ids: int [B, num_choices, L]; attention_mask / token_type_ids the same
        shape (or None).
      deterministic, rngs: dropout control, as :meth:`Encoder.__call__`.

    Returns:
      Logits [B, num_choices] (softmax over choices gives the answer distribution).
    """
    rngs = _dropout_rngs(rngs)
    batch, num_choices, length = input_ids.shape
    flat = lambda a: None if a is None else a.reshape(batch * num_choices, length)
    hidden = self.encoder(
      flat(input_ids),
      flat(attention_mask),
      flat(token_type_ids),
      deterministic=deterministic,
      rngs=rngs,
    )
    pooled = self.encoder.pooler(hidden)
    pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
    return self.scorer(pooled).reshape(batch, num_choices)
