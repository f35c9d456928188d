"""Apollo under sharding: jit + NamedSharding (FSDP, tensor parallel), shard_map, pmap.

The root conftest forces 8 host CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from apollo.optim import apollo, init_sharded, state_shardings

SHAPES = {"embed": (16, 32), "mlp": (32, 16), "bias": (32,), "scale": ()}
SPECS = {
  # Fully sharded: every big tensor split over all 8 devices along one axis.
  "fsdp": {
    "embed": P(("fsdp", "tensor")),
    "mlp": P(("fsdp", "tensor")),
    "bias": P(("fsdp", "tensor")),
    "scale": P(),
  },
  # Megatron-style: matrices split on both axes, vectors on the tensor axis.
  "tensor": {
    "embed": P("fsdp", "tensor"),
    "mlp": P("tensor", "fsdp"),
    "bias": P("tensor"),
    "scale": P(),
  },
}
TX = apollo(0.05, warmup=2, weight_decay=1e-2, weight_decay_type="stable", rebound="belief")


def _tree(seed):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SHAPES.items())}


def _step(params, state, grads):
  updates, state = TX.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _run_unsharded(steps=4):
  params, state = _tree(0), TX.init(_tree(0))
  for i in range(steps):
    params, state = jax.jit(_step)(params, state, jax.tree.map(jnp.sin, _tree(i + 1)))
  return params, state


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("layout", ["fsdp", "tensor"])
def test_sharded_update_matches_unsharded_and_keeps_shardings(layout, axis_type, sums_form):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)
  shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS[layout].items()}
  params = jax.device_put(_tree(0), shardings)
  state = init_sharded(TX, params)
  expected = state_shardings(TX, params)
  assert state[0].mu["embed"].sharding == shardings["embed"]
  step = jax.jit(_step, donate_argnums=(0, 1))
  with jax.set_mesh(mesh):
    for i in range(4):
      grads = jax.device_put(jax.tree.map(jnp.sin, _tree(i + 1)), shardings)
      params, state = step(params, state, grads)
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  for k in SHAPES:
    assert params[k].sharding.is_equivalent_to(shardings[k], params[k].ndim)
  ref_params, ref_state = _run_unsharded()
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), params, ref_params
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), state, ref_state
  )


def test_per_tensor_reductions_become_cross_device_reductions():
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("fsdp"))
  params = jax.device_put({"w": jnp.arange(64.0).reshape(16, 4) / 64}, sharding)
  state = init_sharded(TX, params)
  grads = jax.tree.map(jnp.cos, params)
  with jax.set_mesh(mesh):
    # Two steps so that the previous direction (and its 4-norm) is non-zero.
    params, state = jax.jit(_step)(params, state, grads)
    hlo = jax.jit(_step).lower(params, state, grads).compile().as_text()
    params, state = jax.jit(_step)(params, state, grads)
  assert "all-reduce" in hlo  # sum(d**4), <delta, d>, <B, d**2>, max|delta|, mean(den)
  single = {"w": jnp.arange(64.0).reshape(16, 4) / 64}
  s = TX.init(single)
  for _ in range(2):
    single, s = jax.jit(_step)(
      single, s, jax.tree.map(jnp.cos, {"w": jnp.arange(64.0).reshape(16, 4) / 64})
    )
  np.testing.assert_allclose(params["w"], single["w"], rtol=1e-6, atol=1e-7)


def test_init_sharded_from_abstract_params():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 2)
  abstract = {
    k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, SPECS["tensor"][k]))
    for k, s in SHAPES.items()
  }
  state = init_sharded(TX, abstract)
  assert state[0].curvature["mlp"].sharding.spec == P("tensor", "fsdp")
  assert state[0].count.sharding.spec == P()
  np.testing.assert_array_equal(state[0].direction["embed"], 0.0)
  with pytest.raises(ValueError, match="shardings"):
    init_sharded(TX, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


# Data parallelism changes the gradient's summation order; a realistic setting
# keeps that rounding from being amplified into visible differences.
DP_TX = apollo(1e-2, warmup=2, weight_decay=1e-4)


def _dp_step(params, state, grads):
  updates, state = DP_TX.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _loss(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def _data_parallel_reference(steps=3):
  params = {
    "w1": jax.random.normal(jax.random.key(0), (4, 8)),
    "w2": jax.random.normal(jax.random.key(1), (8, 2)),
  }
  x = jax.random.normal(jax.random.key(2), (16, 4))
  y = jax.random.normal(jax.random.key(3), (16, 2))
  state = DP_TX.init(params)
  for _ in range(steps):
    params, state = _dp_step(params, state, jax.grad(_loss)(params, x, y))
  return params, x, y


def test_shard_map_data_parallel_with_pmean_matches_full_batch():
  ref_params, x, y = _data_parallel_reference()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  params = {
    "w1": jax.random.normal(jax.random.key(0), (4, 8)),
    "w2": jax.random.normal(jax.random.key(1), (8, 2)),
  }
  state = DP_TX.init(params)

  def local_step(params, state, x, y):
    # Per-device gradients, then pmean: the classic data-parallel step. Marking
    # the replicated params as device-varying first keeps shard_map from summing
    # their gradient across devices by itself (its transpose of a broadcast).
    local_params = jax.lax.pcast(params, "data", to="varying")
    grads = jax.lax.pmean(jax.grad(_loss)(local_params, x, y), "data")
    return _dp_step(params, state, grads)

  step = jax.jit(
    jax.shard_map(
      local_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
    )
  )
  # Explicit axes: the batch is placed sharded, params and state replicated.
  x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  params, state = jax.device_put((params, state), NamedSharding(mesh, P()))
  for _ in range(3):
    params, state = step(params, state, x, y)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params
  )


def test_legacy_pmap_path_matches_full_batch():
  ref_params, x, y = _data_parallel_reference()
  n = jax.local_device_count()
  params = {
    "w1": jax.random.normal(jax.random.key(0), (4, 8)),
    "w2": jax.random.normal(jax.random.key(1), (8, 2)),
  }
  replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * n), tree)
  params, state = replicate(params), replicate(DP_TX.init(params))

  def local_step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(_loss)(params, x, y), "batch")
    return _dp_step(params, state, grads)

  step = jax.pmap(local_step, axis_name="batch")
  xs, ys = x.reshape(n, -1, 4), y.reshape(n, -1, 2)
  for _ in range(3):
    params, state = step(params, state, xs, ys)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), params, ref_params
  )
  jax.tree.map(lambda a: np.testing.assert_array_equal(a[0], a[-1]), params)
