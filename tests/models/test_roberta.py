"""Tests for apollo.models.roberta.model: shapes, RoBERTa specifics, dropout, bf16, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from apollo.common import mesh as mesh_lib
from apollo.models.roberta import model as M

PAD = 1


@pytest.fixture(scope="module")
def config():
  return M.get_config("tiny")


@pytest.fixture(scope="module")
def model(config):
  """A shared tiny pretraining model; tests that mutate it make their own."""
  return M.PretrainingModel(config, rngs=nnx.Rngs(0))


def _jit_call(model, *args, **kwargs):
  """model(*args, **kwargs) compiled as one program (eager op-by-op is slower here)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def _batch(config, batch=4, length=12, seed=0):
  """Random ids in [5, vocab) framed as <s> ... </s> with trailing padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.vocab_size, size=(batch, length))
  ids[:, 0] = 0
  for i, n in enumerate(rng.integers(length // 2, length + 1, size=batch)):
    ids[i, n - 1] = 2
    ids[i, n:] = PAD
  ids = jnp.asarray(ids, jnp.int32)
  return ids, (ids != PAD).astype(jnp.int32)


def test_presets():
  base, large = M.get_config("base"), M.get_config("large")
  assert (base.hidden_size, base.num_layers, base.num_heads, base.intermediate_size) == (
    768,
    12,
    12,
    3072,
  )
  assert (large.hidden_size, large.num_layers, large.num_heads, large.intermediate_size) == (
    1024,
    24,
    16,
    4096,
  )
  assert base.vocab_size == 50265 and base.max_position_embeddings == 514
  assert base.max_sequence_length == 512
  assert M.get_config("tiny", dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="Unknown encoder preset"):
    M.get_config("huge")
  with pytest.raises(ValueError, match="divisible"):
    M.get_config("tiny", num_heads=5)


def test_roberta_base_parameter_count():
  # roberta-base (RobertaModel with pooler) has 124,645,632 parameters.
  abstract = nnx.eval_shape(lambda: M.Encoder(M.get_config("base"), rngs=nnx.Rngs(0)))
  assert mesh_lib.count_params(abstract) == 124_645_632


def test_position_ids_follow_roberta():
  ids = jnp.array([[0, 7, 8, 2, PAD, PAD], [0, 7, PAD, 9, 2, PAD]])
  np.testing.assert_array_equal(
    M.roberta_position_ids(ids, PAD), [[2, 3, 4, 5, 1, 1], [2, 3, 1, 4, 5, 1]]
  )


def test_pretraining_model_shapes_and_padding_invariance(config, model):
  ids, mask = _batch(config)
  out = _jit_call(model, ids, mask)
  assert out.mlm_logits.shape == (4, 12, config.vocab_size)
  assert out.ecls_logits.shape == (4, 2)
  assert out.mlm_logits.dtype == jnp.float32
  # Extra padding must not change the real tokens' outputs (mask + position ids).
  padded = jnp.pad(ids, ((0, 0), (0, 5)), constant_values=PAD)
  out_padded = _jit_call(model, padded, (padded != PAD).astype(jnp.int32))
  np.testing.assert_allclose(
    out_padded.mlm_logits[:, :12] * mask[..., None], out.mlm_logits * mask[..., None], atol=1e-5
  )
  np.testing.assert_allclose(out_padded.ecls_logits, out.ecls_logits, atol=1e-5)
  # mlm_positions gathers the same logits.
  positions = jnp.array([[1, 3]] * 4)
  gathered = _jit_call(model, ids, mask, mlm_positions=positions).mlm_logits
  np.testing.assert_allclose(gathered, out.mlm_logits[:, [1, 3]], atol=1e-6)


def test_mlm_decoder_is_tied_to_word_embeddings(config):
  model = M.PretrainingModel(config, rngs=nnx.Rngs(0))
  ids, mask = _batch(config)
  before = _jit_call(model, ids, mask).mlm_logits
  emb = model.encoder.embeddings.word_embeddings.embedding
  # Only the tied decoder sees a change to the row of a token absent from ids.
  unused_token = int(np.setdiff1d(np.arange(5, config.vocab_size), np.asarray(ids))[0])
  emb.set_value(emb.get_value().at[unused_token].add(1.0))
  after = _jit_call(model, ids, mask).mlm_logits
  changed = np.abs(np.asarray(after - before)).max(axis=(0, 1)) > 1e-6
  assert np.flatnonzero(changed).tolist() == [unused_token]
  assert {path for path, _ in nnx.to_flat_state(nnx.state(model.mlm_head))} == {
    ("bias",),
    ("dense", "kernel"),
    ("dense", "bias"),
    ("layer_norm", "scale"),
    ("layer_norm", "bias"),
  }


def test_multiple_choice_model(config):
  model = M.MultipleChoiceModel(config, rngs=nnx.Rngs(0))
  ids, mask = _batch(config)
  logits = _jit_call(model, ids.reshape(2, 2, -1), mask.reshape(2, 2, -1))
  assert logits.shape == (2, 2)
  # Each choice is scored independently: as if scored alone.
  hidden = _jit_call(model.encoder, ids, mask)
  alone = model.scorer(model.encoder.pooler(hidden))[:, 0].reshape(2, 2)
  np.testing.assert_allclose(logits, alone, atol=1e-5)


def test_dropout_is_off_by_default_and_keyed(config, model):
  # The model holds Params only: dropout keys come with the call.
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
  ids, mask = _batch(config)
  eval_out = _jit_call(model, ids, mask).mlm_logits
  graphdef, state = nnx.split(model)

  @jax.jit
  def train(state, key):
    model = nnx.merge(graphdef, state)
    return model(ids, mask, deterministic=False, rngs=key).mlm_logits

  a, b = train(state, jax.random.key(1)), train(state, jax.random.key(1))
  c = train(state, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - eval_out).max()) > 1e-3
  assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 4, 16, 16)])
def test_threefry_bernoulli_is_jax_bernoulli_bit_for_bit(shape):
  key = jax.random.fold_in(jax.random.key(3), 7)
  fast = jax.jit(M.threefry_bernoulli, static_argnums=(1, 2))(key, 0.9, shape)
  np.testing.assert_array_equal(fast, jax.random.bernoulli(key, 0.9, shape))


def test_dropout_masks_equal_nnx_dropout(config, model, monkeypatch):
  ids, mask = _batch(config)
  key = jax.random.PRNGKey(5)
  fast = _jit_call(model, ids, mask, deterministic=False, rngs=key)
  monkeypatch.setattr(M.Dropout, "__call__", nnx.Dropout.__call__)
  reference = _jit_call(model, ids, mask, deterministic=False, rngs=key)
  for a, b in zip(fast, reference):
    np.testing.assert_array_equal(a, b)


def test_tied_decoder_gradient_matches_autodiff():
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (3, 5, 16))
  embedding, bias = jax.random.normal(k[1], (40, 16)), jax.random.normal(k[2], (40,))
  cotangent = jax.random.normal(k[3], (3, 5, 40))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * cotangent)
  reference = lambda x, e, b: x @ e.T + b
  got = jax.grad(loss(M.tied_decoder), (0, 1, 2))(x, embedding, bias)
  want = jax.grad(loss(reference), (0, 1, 2))(x, embedding, bias)
  np.testing.assert_allclose(
    M.tied_decoder(x, embedding, bias), reference(x, embedding, bias), rtol=1e-5, atol=1e-5
  )
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter(config, model):
  ids, mask = _batch(config)
  graphdef, state = nnx.split(model)

  def loss_fn(state):
    out = nnx.merge(graphdef, state)(ids, mask)
    mlm = optax_free_xent(out.mlm_logits, ids)
    return (mlm * mask).sum() / mask.sum() + out.ecls_logits.sum()

  grads = jax.jit(jax.grad(loss_fn))(state)
  norms = {path: float(jnp.linalg.norm(g)) for path, g in nnx.to_flat_state(grads)}
  assert all(n > 0 for n in norms.values()), [p for p, n in norms.items() if n == 0]


def optax_free_xent(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def test_bfloat16_compute_stays_close_and_params_stay_float32(config, model):
  ids, mask = _batch(config)
  bf16 = M.PretrainingModel(M.get_config("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out32, out16 = _jit_call(model, ids, mask), _jit_call(bf16, ids, mask)
  assert out16.mlm_logits.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(out16.mlm_logits, np.float32) - np.asarray(out32.mlm_logits))
  scale = np.abs(np.asarray(out32.mlm_logits)).max()
  assert diff.max() < 0.05 * scale, (diff.max(), scale)
  np.testing.assert_allclose(
    np.asarray(out16.ecls_logits, np.float32), out32.ecls_logits, atol=0.05 * scale
  )


def test_logical_partition_specs(config):
  abstract = nnx.eval_shape(lambda: M.PretrainingModel(config, rngs=nnx.Rngs(0)))
  specs = M.logical_partition_specs(nnx.state(abstract))
  layer = specs["encoder"]["layers"][0]
  embeddings = specs["encoder"]["embeddings"]
  assert embeddings["word_embeddings"]["embedding"] == P("tensor", "fsdp")
  assert embeddings["position_embeddings"]["embedding"] == P(None, "fsdp")
  assert layer["attention"]["query"]["kernel"] == P("fsdp", "tensor", None)
  assert layer["attention"]["output"]["kernel"] == P("tensor", None, "fsdp")
  assert layer["intermediate"]["kernel"] == P("fsdp", "tensor")
  assert layer["output"]["kernel"] == P("tensor", "fsdp")
  assert layer["output_layer_norm"]["scale"] == P(None)
  assert specs["mlm_head"]["bias"] == P("tensor")
  # Other rules, other specs: pure data parallelism replicates everything.
  replicated = M.logical_partition_specs(
    nnx.state(abstract), [(name, None) for name, _ in M.LOGICAL_AXIS_RULES]
  )
  assert all(
    all(a is None for a in p)
    for p in jax.tree.leaves(replicated, is_leaf=lambda x: isinstance(x, P))
  )


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_model_matches_unsharded(config, model, axis_type):
  """Params are created in their shards on a 2x2x2 mesh; outputs match 1 device.

  With Explicit axes, the forward runs inside ``jax.sharding.auto_axes`` (the
  compiler then places the collectives, as under Auto axes).
  """
  kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}[axis_type]
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(kind,) * 3)
  make = lambda: M.PretrainingModel(config, rngs=nnx.Rngs(0))
  ids, mask = _batch(config)
  expected = _jit_call(model, ids, mask)  # The same seed, on one device.

  sharded = M.create_sharded_model(make, mesh)
  kernel = sharded.encoder.layers[0].intermediate.kernel.get_value()
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (
    config.hidden_size // 2,
    config.intermediate_size // 2,
  )
  emb = sharded.encoder.embeddings.word_embeddings.embedding.get_value()
  assert emb.sharding.spec == P("tensor", "fsdp")

  graphdef, state = nnx.split(sharded)

  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  if axis_type == "explicit":
    forward = jax.sharding.auto_axes(
      forward, out_sharding=M.PretrainingOutput(P("data"), P("data"))
    )
  with jax.set_mesh(mesh):
    batch_sharding = NamedSharding(mesh, P("data"))
    out = jax.jit(forward)(
      state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding)
    )
  assert out.mlm_logits.sharding.spec[0] == "data"
  np.testing.assert_allclose(out.mlm_logits, expected.mlm_logits, atol=1e-5)
  np.testing.assert_allclose(out.ecls_logits, expected.ecls_logits, atol=1e-5)
