"""The Apollo transformation: the reference algorithm, number for number, and the optax contract."""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apollo.optim import ScaleByApolloState, apollo, apollo_learning_rate, scale_by_apollo
from tests.optim.reference import NumpyApollo

apollo_module = importlib.import_module("apollo.optim.apollo")  # The module, not the function.

SHAPES = {"w": (16, 8), "b": (8,), "s": ()}
COMBOS = [(r, w) for r in ("constant", "belief") for w in ("L2", "decoupled", "stable")]


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "target": {k: rng.normal(size=s) for k, s in SHAPES.items()},
    "curv": {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()},
    "init": {k: rng.normal(size=s) for k, s in SHAPES.items()},
    "rng": rng,
  }


@pytest.mark.parametrize("rebound,weight_decay_type", COMBOS)
def test_matches_float64_numpy_reference(rebound, weight_decay_type, sums_form):
  """Hundreds of steps with warmup and decay against the spec's float64 oracle.

  Both sides get the same gradient stream. A closed loop (gradients at each side's
  own params) measures the problem's sensitivity instead: there the reference
  algorithm itself, run in float32, drifts ~1e-3 from float64.
  """
  steps = 300 if rebound == "constant" else 60  # 'belief' amplifies rounding.
  kw = dict(rebound=rebound, warmup=50, weight_decay=1e-2, weight_decay_type=weight_decay_type)
  ref, tx = NumpyApollo(0.01, **kw), apollo(0.01, **kw)
  pb = _problem()
  p_ref = dict(pb["init"])
  p = {k: jnp.asarray(v, jnp.float32) for k, v in pb["init"].items()}
  state = tx.init(p)
  update = jax.jit(tx.update)
  for t in range(steps):
    g = {
      k: pb["curv"][k] * (np.sin(0.05 * t) + pb["target"][k]) + 0.1 * pb["rng"].normal(size=s)
      for k, s in SHAPES.items()
    }
    p_ref = ref.step(p_ref, g)
    updates, state = update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, updates)
    for k in SHAPES:
      # Relative 2e-5, with an absolute floor at 2e-5 of the tensor's scale so that
      # entries crossing zero do not turn rounding into "relative" noise.
      np.testing.assert_allclose(
        p[k], p_ref[k], rtol=2e-5, atol=2e-5 * np.max(np.abs(p_ref[k])), err_msg=f"{k} @ {t}"
      )
    d_ref = ref.state["w"]["d"]
    np.testing.assert_allclose(
      state[0].direction["w"], d_ref, rtol=2e-5, atol=2e-5 * np.max(np.abs(d_ref))
    )


def test_first_step_directions():
  g = {"w": jnp.array([0.5, -2.0, 1.0])}
  p = {"w": jnp.zeros(3)}
  tx = scale_by_apollo(rebound="constant")
  d, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(d["w"], g["w"] / 0.01, rtol=1e-6)  # g / sigma
  tx = scale_by_apollo(rebound="belief")
  d, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(d["w"], g["w"] / (2.0 + 1e-4), rtol=1e-6)  # g / (max|g| + eps)
  # The learning rate of the first update is init_lr = lr / 1000.
  u, _ = apollo(0.1).update(g, apollo(0.1).init(p), p)
  np.testing.assert_allclose(u["w"], -1e-4 * g["w"] / 0.01, rtol=1e-6)


def test_curvature_tracks_lr_times_hessian():
  """On a noise-free quadratic 0.5 h x^2 with beta = 0, B -> lr * h."""
  lr, h = 0.1, 2.0
  tx = apollo(lr, beta=0.0, warmup=0)
  x = jnp.array([3.0])
  state = tx.init(x)
  for _ in range(5):
    updates, state = tx.update(h * x, state, x)
    x = x + updates
  np.testing.assert_allclose(state[0].curvature, [lr * h], rtol=1e-4)


def _passes_over_inputs(jitted, *args, **kwargs) -> int:
  """Top-level ops of the compiled computation that read one of its inputs."""
  entry = jitted.lower(*args, **kwargs).compile().as_text().split("\nENTRY ", 1)[1].splitlines()[1:]
  inputs = [l.split("=")[0].strip() for l in entry if " parameter(" in l]
  readers = [
    l
    for l in entry
    if " parameter(" not in l
    and any(re.search(re.escape(name) + r"\b", l.split("=", 1)[-1]) for name in inputs)
  ]
  return len(readers)


@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096)])
def test_large_tensor_reductions_take_one_accurate_pass(shape):
  """At the size threshold the reductions read g, m, B and d once, still accurately."""
  assert np.prod(shape) == apollo_module.FUSED_SUMS_MIN_SIZE
  assert shape[-1] <= apollo_module.FUSED_SUMS_MAX_ROW
  keys = jax.random.split(jax.random.key(0), 4)
  g, m, b, d = (s * jax.random.normal(k, shape) for s, k in zip((1e-3, 1e-3, 1e-2, 0.1), keys))
  g64, m64, b64, d64 = (np.asarray(x, np.float64) for x in (g, m, b, d))
  terms = (d64**4, (g64 - m64) * d64, b64 * d64 * d64)
  # A summation's error is bounded by its terms' absolute sum (<g - m, d> cancels).
  scale = np.array([np.sum(np.abs(t)) for t in terms])
  reductions = jax.jit(apollo_module._tensor_reductions, static_argnames="max_delta")
  got = np.asarray(reductions(g, m, b, d, max_delta=True), np.float64)
  np.testing.assert_array_less(np.abs(got[:3] - [np.sum(t) for t in terms]), 2e-6 * scale)
  assert got[3] == np.max(np.abs(np.asarray(m - g)))  # A max is exact.
  for max_delta in (False, True):
    assert _passes_over_inputs(reductions, g, m, b, d, max_delta=max_delta) == 1
  # Just below the threshold: separate reductions, the same values.
  small = [x[:-1] for x in (g, m, b, d)]
  assert _passes_over_inputs(reductions, *small) == 3
  got = np.asarray(reductions(*small), np.float64)
  np.testing.assert_array_less(np.abs(got - [np.sum(t[:-1]) for t in terms]), 2e-6 * scale)


def test_reductions_are_per_tensor():
  """Updating a two-tensor tree equals updating each tensor alone."""
  pb = _problem(1)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in pb["init"].items()}
  tx = apollo(0.01, warmup=5, weight_decay=1e-2, weight_decay_type="stable")
  state = tx.init(p)
  singles = {k: tx.init({k: p[k]}) for k in p}
  for i in range(10):
    g = jax.tree.map(lambda x: jnp.sin(x + i), p)
    u, state = tx.update(g, state, p)
    for k in p:
      u_k, singles[k] = tx.update({k: g[k]}, singles[k], {k: p[k]})
      np.testing.assert_array_equal(u[k], u_k[k])
    p = optax.apply_updates(p, u)


def test_transformation_type_state_and_extra_args():
  tx = apollo(0.01)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  p = {"w": jnp.ones(4)}
  state = tx.init(p)
  assert isinstance(state[0], ScaleByApolloState)
  assert state[0].count.dtype == jnp.int32
  # Unknown keyword arguments (e.g. `value=` from optax line searches) are accepted.
  u1, _ = tx.update(p, state, p, value=jnp.array(1.0), unknown_flag=True)
  u2, _ = tx.update(p, state, p)
  np.testing.assert_array_equal(u1["w"], u2["w"])


def test_no_recompilation_on_second_step():
  traces = []
  tx = apollo(0.01, weight_decay=1e-3)

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.tree.map(jnp.cos, p), s, p)
    return optax.apply_updates(p, u), s

  p = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  s = tx.init(p)
  for _ in range(3):
    p, s = step(p, s)
  assert len(traces) == 1


def test_inject_hyperparams_gives_identical_updates():
  kw = dict(beta=0.8, eps=1e-4, warmup=3, init_lr=1e-4, weight_decay=1e-2)
  static = ("rebound", "weight_decay_type", "mask", "state_dtype")
  injected = optax.inject_hyperparams(apollo, static_args=static)(
    learning_rate=0.01, rebound="belief", weight_decay_type="stable", **kw
  )
  plain = apollo(0.01, rebound="belief", weight_decay_type="stable", **kw)
  p = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  s1, s2 = injected.init(p), plain.init(p)
  assert float(s1.hyperparams["learning_rate"]) == pytest.approx(0.01)
  for i in range(6):
    g = jax.tree.map(lambda x: jnp.sin(3 * x + i), p)
    u1, s1 = jax.jit(injected.update)(g, s1, p)
    u2, s2 = jax.jit(plain.update)(g, s2, p)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=1e-9)
    p = optax.apply_updates(p, u2)


def test_chain_with_gradient_clipping():
  p = {"w": jnp.ones(3)}
  g = {"w": jnp.array([30.0, -40.0, 0.0])}  # global norm 50 -> scaled by 1/50
  chained = optax.chain(optax.clip_by_global_norm(1.0), apollo(0.01, warmup=0))
  alone = apollo(0.01, warmup=0)
  u1, _ = chained.update(g, chained.init(p), p)
  u2, _ = alone.update(jax.tree.map(lambda x: x / 50.0, g), alone.init(p), p)
  np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


def test_multisteps_accumulates_then_updates():
  p = {"w": jnp.array([1.0, -2.0])}
  tx = optax.MultiSteps(apollo(0.01, warmup=0), every_k_schedule=2)
  ref = apollo(0.01, warmup=0)
  s, s_ref = tx.init(p), ref.init(p)
  g1, g2 = {"w": jnp.array([1.0, 3.0])}, {"w": jnp.array([3.0, -1.0])}
  u, s = tx.update(g1, s, p)
  np.testing.assert_array_equal(u["w"], 0.0)  # first micro-step: no update
  u, s = tx.update(g2, s, p)
  u_ref, _ = ref.update({"w": (g1["w"] + g2["w"]) / 2}, s_ref, p)
  np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6)


def test_tree_map_params_touches_only_per_param_state():
  tx = apollo(0.01)
  p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  state = tx.init(p)
  marked = optax.tree.map_params(tx, lambda x: x + 7.0, state)
  assert int(marked[0].count) == 0
  for field in ("mu", "curvature", "direction"):
    np.testing.assert_array_equal(getattr(marked[0], field)["w"], 7.0)


def test_init_on_abstract_params():
  tx = apollo(0.01)
  abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)}
  state = tx.init(abstract)
  assert state[0].mu["w"].shape == (4, 3)
  assert state[0].mu["w"].dtype == jnp.bfloat16
  assert jax.eval_shape(tx.init, abstract)[0].direction["w"].shape == (4, 3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_preserved(dtype):
  tx = apollo(0.01, weight_decay=1e-2, weight_decay_type="stable")
  p = {"w": jnp.ones((3, 2), dtype)}
  s = tx.init(p)
  for _ in range(3):
    u, s = tx.update(jax.tree.map(lambda x: 0.5 * x, p), s, p)
    p = optax.apply_updates(p, u)
  assert u["w"].dtype == dtype and p["w"].dtype == dtype
  for field in ("mu", "curvature", "direction"):
    assert getattr(s[0], field)["w"].dtype == dtype
  assert bool(jnp.all(jnp.isfinite(p["w"].astype(jnp.float32))))


def test_state_dtype_option():
  tx = apollo(0.01, state_dtype=jnp.bfloat16)
  p = {"w": jnp.ones(3, jnp.float32)}
  s = tx.init(p)
  u, s = tx.update(p, s, p)
  assert s[0].mu["w"].dtype == jnp.bfloat16 and u["w"].dtype == jnp.float32


def test_state_keeps_shape_and_dtype_through_lax_cond():
  tx = apollo(0.01, weight_decay=1e-3)
  p = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(3)}
  s = tx.init(p)

  @jax.jit
  def maybe_update(pred, s):
    return jax.lax.cond(pred, lambda s: tx.update(p, s, p)[1], lambda s: s, s)

  s_new = maybe_update(True, s)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), s_new) == jax.tree.map(
    lambda x: (x.shape, x.dtype), s
  )
  assert int(maybe_update(False, s_new)[0].count) == 1


def _parabola():
  final = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), final, lambda p: jnp.sum((p - final) ** 2)


def _rosenbrock():
  a, b = 1.0, 100.0
  return jnp.zeros(2), jnp.array([a, a**2]), lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2


def _matrix():
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]])
  return jnp.zeros((2, 2)), final, lambda p: jnp.sum((p - final) ** 2)


def _mixed():
  f1, f2 = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  obj = lambda p: jnp.sum((p[0] - f1) ** 2) + jnp.sum((p[1] - f2) ** 2)
  return (jnp.zeros(3), jnp.zeros((2, 2))), (f1, f2), obj


# Learning rates keep lr * h / sigma inside gradient descent's stable region where
# the 'constant' floor binds (h = 2 for the parabolas; up to ~1000 for Rosenbrock).
@pytest.mark.parametrize("rebound", ["constant", "belief"])
@pytest.mark.parametrize(
  "target,lr,warmup,steps",
  [
    (_parabola, 1e-3, 10, 5000),
    (_rosenbrock, 1e-4, 100, 10000),
    (_matrix, 1e-3, 10, 5000),
    (_mixed, 1e-3, 10, 5000),
  ],
  ids=["parabola", "rosenbrock", "matrix", "mixed"],
)
def test_converges_on_optax_targets(rebound, target, lr, warmup, steps):
  init, final, obj = target()
  tx = apollo(lr, warmup=warmup, rebound=rebound)

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(obj)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
    return p

  # optax's own contrib tests use rtol = atol = 3e-2 on these targets.
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=3e-2, atol=3e-2), run(init), final
  )


def test_weight_decay_mask():
  p = {"w": jnp.ones(3), "b": jnp.ones(3)}
  g = {"w": jnp.full(3, 0.2), "b": jnp.full(3, 0.2)}
  for wd_type in ("L2", "decoupled", "stable"):
    masked = apollo(0.01, weight_decay=0.5, weight_decay_type=wd_type, mask={"w": True, "b": False})
    decayed = apollo(0.01, weight_decay=0.5, weight_decay_type=wd_type)
    plain = apollo(0.01)
    u_m, _ = masked.update(g, masked.init(p), p)
    u_d, _ = decayed.update(g, decayed.init(p), p)
    u_p, _ = plain.update(g, plain.init(p), p)
    np.testing.assert_array_equal(u_m["w"], u_d["w"])
    np.testing.assert_array_equal(u_m["b"], u_p["b"])
    assert not np.allclose(u_d["w"], u_p["w"])
  callable_mask = apollo(0.01, weight_decay=0.5, mask=lambda params: {"w": True, "b": False})
  u_c, _ = callable_mask.update(g, callable_mask.init(p), p)
  np.testing.assert_array_equal(u_c["b"], u_p["b"])


def test_weight_decay_needs_params():
  tx = apollo(0.01, weight_decay=1e-2)
  p = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="params"):
    tx.update(p, tx.init(p))


def test_learning_rate_warmup_and_schedules():
  sched = apollo_learning_rate(0.1, warmup=10)
  np.testing.assert_allclose(
    [sched(0), sched(5), sched(10), sched(50)], [1e-4, 0.05005, 0.1, 0.1], rtol=1e-5
  )
  np.testing.assert_allclose(apollo_learning_rate(0.1, warmup=0)(0), 0.1)
  cosine = optax.cosine_decay_schedule(0.1, 100)
  # warmup=0: the schedule decides alone.
  alone = apollo_learning_rate(cosine, warmup=0)
  np.testing.assert_allclose(
    [alone(c) for c in (0, 30, 99)], [cosine(c) for c in (0, 30, 99)], rtol=1e-6
  )
  # With warmup, the ramp goes from init_lr to the schedule's current value.
  ramp = apollo_learning_rate(cosine, warmup=10, init_lr=0.0)
  np.testing.assert_allclose(ramp(5), 0.5 * cosine(5), rtol=1e-6)
  np.testing.assert_allclose(ramp(30), cosine(30), rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(learning_rate=0.1, beta=1.0), "beta"),
    (dict(learning_rate=0.1, beta=-0.1), "beta"),
    (dict(learning_rate=0.1, init_lr=0.5), "init_lr"),
    (dict(learning_rate=0.1, eps=-1e-8), "eps"),
    (dict(learning_rate=0.1, weight_decay=-1.0), "weight_decay"),
    (dict(learning_rate=0.1, warmup=-1), "warmup"),
    (dict(learning_rate=0.1, rebound="bounce"), "rebound"),
    (dict(learning_rate=0.1, weight_decay_type="l1"), "weight_decay_type"),
  ],
)
def test_invalid_hyperparameters_raise_at_construction(kwargs, name):
  with pytest.raises(ValueError, match=name):
    apollo(**kwargs)


def test_scale_by_apollo_validates_too():
  with pytest.raises(ValueError, match="rebound"):
    scale_by_apollo(rebound="x")
