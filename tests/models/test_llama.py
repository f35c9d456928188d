"""Tests for apollo.models.llama.model: configs, attention (causal, padding, GQA), the KV
cache (cached logits == uncached), sampling, and sharded creation/forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from apollo.common import mesh as mesh_lib
from apollo.models.llama import model as D
from apollo.models.llama import params as DI
from apollo.models.llama import sampling


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, mask=None, cache=None):
  return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)


def _call(model, ids, mask=None, cache=None):
  """A jitted forward; one compilation per (model structure, shapes), across tests."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, ids, mask, cache)


def _ids(config, batch=2, length=12, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def config():
  return D.get_config("tiny")


@pytest.fixture(scope="module")
def model(config):
  # One compiled initializer: faster than eager op-by-op init.
  return D.create_sharded_model(lambda: D.Decoder(config, rngs=nnx.Rngs(0)), None)


# ----------------------------------------------------------------------------- config


def test_presets_and_overrides():
  for name in D.PRESET_NAMES:
    c = D.get_config(name)
    assert c.num_heads % c.num_kv_heads == 0 and c.head_dim % 2 == 0
  c = D.get_config("tiny", dtype="bfloat16", num_kv_heads=1)
  assert c.dtype == jnp.bfloat16 and c.num_query_groups == 4 and c.head_dim == 16
  with pytest.raises(ValueError, match="num_kv_heads"):
    D.get_config("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="Unknown decoder preset"):
    D.get_config("gpt5")
  with pytest.raises(ValueError, match="rope_scaling"):
    D.get_config("tiny", rope_scaling="yarn")


@pytest.mark.parametrize(
  "name, expected",
  [
    ("qwen2_0_5b", 494_032_768),  # Qwen2-0.5B (tied head).
    ("llama_7b", 6_738_415_616),  # Llama-2-7b.
  ],
)
def test_parameter_counts_match_published_models(name, expected):
  abstract = nnx.eval_shape(lambda: D.Decoder(D.get_config(name), rngs=nnx.Rngs(0)))
  assert mesh_lib.count_params(abstract) == expected


def test_params_carry_logical_axes(model):
  specs = D.logical_partition_specs(nnx.state(model), D.LOGICAL_AXIS_RULES)
  layer = specs["layers"][0]
  assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor", None)
  assert layer["self_attn"]["k_proj"]["kernel"] == P("fsdp", "tensor", None)
  assert layer["self_attn"]["q_proj"]["bias"] == P("tensor", None)
  assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", None, "fsdp")
  assert layer["mlp"]["gate_proj"]["kernel"] == P("fsdp", "tensor")
  assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
  assert layer["input_layernorm"]["scale"] == P(None)
  assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_causality(config, model):
  ids = _ids(config)
  logits, cache = _call(model, ids)
  assert logits.shape == (2, 12, config.vocab_size) and cache is None
  changed = ids.at[:, 7].set((ids[:, 7] + 1) % config.vocab_size)
  logits2, _ = _call(model, changed)
  np.testing.assert_array_equal(logits[:, :7], logits2[:, :7])
  assert not np.allclose(logits[:, 7:], logits2[:, 7:])


def test_left_padding_is_invisible(config, model):
  """A left-padded row gives the logits of the same tokens unpadded."""
  ids = _ids(config, length=8)
  padded = jnp.concatenate([jnp.full((2, 4), 7, jnp.int32), ids], axis=1)
  mask = jnp.broadcast_to(jnp.arange(12) >= 4, (2, 12))
  expected, _ = _call(model, ids)
  got, _ = _call(model, padded, mask)
  np.testing.assert_allclose(got[:, 4:], expected, atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads(config, model):
  """GQA == multi-head attention whose kv heads are copies (HF's repeat_kv order)."""
  assert config.num_kv_heads < config.num_heads
  groups, head_dim = config.num_query_groups, config.head_dim
  tensors = {}
  for name, value in DI.hf_state_dict(model).items():
    if ".k_proj." in name or ".v_proj." in name:
      # kv head g serves query heads g*groups .. g*groups + groups - 1.
      blocks = value.reshape(config.num_kv_heads, head_dim, -1)
      value = np.repeat(blocks, groups, axis=0).reshape(-1, *value.shape[1:])
    tensors[name] = value
  mha = DI.abstract_decoder(D.get_config("tiny", num_kv_heads=config.num_heads))
  DI.import_hf_state_dict(mha, tensors)
  ids = _ids(config)
  np.testing.assert_allclose(_call(mha, ids)[0], _call(model, ids)[0], atol=1e-5)


def test_tied_embeddings_have_no_head():
  tied = DI.abstract_decoder(D.get_config("tiny", tie_word_embeddings=True))
  rng = np.random.default_rng(0)
  DI.import_hf_state_dict(
    tied,
    {
      name: rng.normal(0, 0.2, shape).astype(np.float32)
      for name, shape in DI.hf_shapes(tied).items()
    },
  )
  assert tied.lm_head is None
  logits, _ = _call(tied, _ids(tied.config))
  graphdef, state = nnx.split(tied)
  hidden = jax.jit(lambda s, ids: _final_hidden(nnx.merge(graphdef, s), ids))(
    state, _ids(tied.config)
  )
  expected = jnp.einsum("ble,ve->blv", hidden, tied.embed_tokens.embedding.get_value())
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def _final_hidden(model, ids):
  x = model.embed_tokens(ids)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  mask = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))[None]
  inv_freq = D.rope_inverse_frequencies(model.config)
  for layer in model.layers:
    x, _ = layer(x, positions, inv_freq, mask)
  return model.norm(x)


def test_rope_matches_rotate_half_formula():
  """Checks apply_rope against HF's formula written out in numpy."""
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  pos = np.array([[0, 5, 17]])
  inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
  ang = np.concatenate([pos[..., None] * inv] * 2, -1)[:, :, None]
  rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  expected = x * np.cos(ang) + rot * np.sin(ang)
  got = D.apply_rope(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv, jnp.float32))
  np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------- cache


def test_cached_logits_equal_uncached(config, model):
  """Prefill 5 tokens, a chunk of 3, then one token at a time: same logits."""
  ids = _ids(config, batch=2, length=12)
  full, _ = _call(model, ids)
  cache = model.init_cache(2, 16)
  pieces = []
  for start, stop in [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 12)]:
    logits, cache = _call(model, ids[:, start:stop], None, cache)
    pieces.append(logits)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.positions, [12, 12])
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5, rtol=0)


def test_cached_logits_equal_uncached_with_left_padding(config, model):
  ids = _ids(config, seed=3)
  mask = jnp.asarray([[True] * 12, [False] * 3 + [True] * 9])
  full, _ = _call(model, ids, mask)
  cache = model.init_cache(2, 16)
  first, cache = _call(model, ids[:, :5], mask[:, :5], cache)
  pieces = [first]
  for i in range(5, 12):
    logits, cache = _call(model, ids[:, i : i + 1], None, cache)
    pieces.append(logits)
  np.testing.assert_array_equal(cache.positions, [12, 9])
  cached = jnp.concatenate(pieces, 1)
  np.testing.assert_allclose(cached[0], full[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(cached[1, 3:], full[1, 3:], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- generate


def test_greedy_generate_equals_argmax_of_full_forward(config, model):
  prompt = _ids(config, length=4, seed=1)
  out = sampling.generate(model, prompt, 8, temperature=0)
  assert out.tokens.shape == (2, 8)
  np.testing.assert_array_equal(out.lengths, [8, 8])
  full, _ = _call(model, jnp.concatenate([prompt, out.tokens], 1))
  np.testing.assert_array_equal(jnp.argmax(full[:, 3:-1], -1), out.tokens)


def test_generate_stops_at_eos_and_pads(config, model):
  prompt = _ids(config, length=4, seed=1)
  greedy = np.asarray(sampling.generate(model, prompt, 8, temperature=0).tokens)
  eos = int(greedy[0, 2])  # Row 0 emits it at step 2 (row 1 maybe too, or not).
  out = sampling.generate(model, prompt, 8, temperature=0, eos_id=eos, pad_id=-1)
  tokens = np.asarray(out.tokens)
  for row in range(2):
    hits = np.flatnonzero(greedy[row] == eos)
    stop = hits[0] + 1 if len(hits) else 8
    np.testing.assert_array_equal(tokens[row, :stop], greedy[row, :stop])
    assert (tokens[row, stop:] == -1).all() and out.lengths[row] == stop
    assert bool(out.finished[row]) == bool(len(hits))


def test_sampling(config, model):
  prompt = _ids(config, length=4, seed=2)
  greedy = sampling.generate(model, prompt, 8, temperature=0).tokens
  kwargs = dict(rng=jax.random.key(0), top_k=5, top_p=0.9)
  a = sampling.generate(model, prompt, 8, temperature=1.0, **kwargs).tokens
  b = sampling.generate(model, prompt, 8, temperature=1.0, **kwargs).tokens
  np.testing.assert_array_equal(a, b)  # Same key, same sample.
  # A tiny temperature is greedy; no recompilation for another temperature.
  cache_size = getattr(sampling._generate, "_cache_size", lambda: 0)  # Private jax API.
  compiled = cache_size()
  cold = sampling.generate(model, prompt, 8, temperature=1e-4, **kwargs).tokens
  np.testing.assert_array_equal(cold, greedy)
  assert cache_size() == compiled
  with pytest.raises(ValueError, match="rng"):
    sampling.generate(model, prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match="cache_size"):
    sampling.generate(model, prompt, 4, temperature=0, cache_size=7)


def test_sample_logits_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4096))
  keys = jax.random.key(0)
  top2 = sampling.sample_logits(logits, keys, 1.0, top_k=2)
  assert set(np.unique(top2)) == {0, 1}
  nucleus = sampling.sample_logits(logits, keys, 1.0, top_p=0.7)  # 0.5 < 0.7 <= 0.8.
  assert set(np.unique(nucleus)) == {0, 1}
  assert set(np.unique(sampling.sample_logits(logits, keys, 1.0, top_p=0.01))) == {0}
  full = sampling.sample_logits(logits, keys, 1.0)
  assert set(np.unique(full)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(sampling.sample_logits(logits, keys, 0), 0)


# ----------------------------------------------------------------------------- sharding


def _sharded_copy(model, mesh):
  copy = DI.abstract_decoder(model.config, mesh, D.LOGICAL_AXIS_RULES)
  DI.import_hf_state_dict(copy, DI.hf_state_dict(model))
  return copy


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_forward_matches_unsharded(config, model, axis_type):
  """Params are created in their shards on a 2x2x2 mesh; logits match 1 device."""
  kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}[axis_type]
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(kind,) * 3)
  ids = _ids(config, batch=4, length=8)
  mask = jnp.arange(8)[None] >= jnp.asarray([[0], [2], [0], [5]])
  expected, _ = _call(model, ids, mask)  # Same seed, one device.

  if axis_type == "auto":  # Created in its shards (same seed as `model`).
    sharded = D.create_sharded_model(
      lambda: D.Decoder(config, rngs=nnx.Rngs(0)), mesh, D.LOGICAL_AXIS_RULES
    )
  else:  # Imported into its shards (no initializer to compile).
    sharded = _sharded_copy(model, mesh)
  k_kernel = sharded.layers[0].self_attn.k_proj.kernel.get_value()
  assert k_kernel.sharding.spec == P("fsdp", "tensor", None)
  assert k_kernel.addressable_shards[0].data.shape == (
    config.hidden_size // 2,
    config.num_kv_heads // 2,
    config.head_dim,
  )

  graphdef, state = nnx.split(sharded)

  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)[0]

  if axis_type == "explicit":
    forward = jax.sharding.auto_axes(forward, out_sharding=P("data"))
  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P("data"))
    logits = jax.jit(forward)(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
  assert logits.sharding.spec[0] == "data"
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_sharded_generate_matches_unsharded(config, model):
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  prompt = _ids(config, length=4, seed=1)
  expected = sampling.generate(model, prompt, 8, temperature=0).tokens
  sharded = _sharded_copy(model, mesh)
  with jax.set_mesh(mesh):
    got = sampling.generate(sharded, prompt, 8, temperature=0).tokens
  np.testing.assert_array_equal(got, expected)
