"""The Apollo optimizer as optax gradient transformations.

Apollo (Ma, 2020) is an adaptive parameter-wise diagonal quasi-Newton method. For
each parameter tensor it keeps a bias-corrected moving average of the gradient `m`,
a diagonal Hessian approximation `B` updated by a weak secant condition, and the
previous update direction `d`. The update direction is `m / rectify(B)`.

This module restates the author's reference PyTorch implementation
(github.com/XuezheMax/apollo, optim/apollo.py, the sigma = 0.01 version) number for
number. Every reduction (the 4-norm of `d`, the secant coefficient, the belief
rebound, the 'stable' decay's mean) is over ONE tensor, never over the whole tree:
that is what "parameter-wise" means. Under sharding these reductions become
cross-device reductions and the answer does not change.

Composition follows optax: `scale_by_apollo` produces the direction `d` (including
decoupled or stable weight decay, because `d` feeds the next curvature update), and
`apollo` chains it with the built-in linear warmup and the learning rate.

References:
  X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
  Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020; reference
  implementation github.com/XuezheMax/apollo.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | jax.Array | optax.Schedule
MaskOrFn = Any | Callable[[optax.Params], Any] | None

REBOUNDS = ("constant", "belief")
WEIGHT_DECAY_TYPES = ("L2", "decoupled", "stable")


class ScaleByApolloState(NamedTuple):
  """State of `scale_by_apollo`: three tensors per parameter, like the reference."""

  count: jax.Array  # int32, updates applied so far (saturating).
  mu: optax.Updates  # `m`: moving average of the gradient, already bias-corrected.
  curvature: optax.Updates  # `B`: diagonal Hessian approximation (tracks lr * H).
  direction: optax.Updates  # `d`: previous direction, before the learning rate.


def _is_number(x: Any) -> bool:
  """True for Python numbers; False for arrays and tracers (inject_hyperparams)."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _validate(**hparams) -> None:
  """Raises ValueError naming the argument; skips values that are arrays or tracers.

  `optax.inject_hyperparams` calls the factory again with traced hyperparameters,
  so only concrete Python numbers can be checked (they were checked at
  construction already).
  """
  lr = hparams.get("learning_rate")
  if _is_number(lr) and lr <= 0:
    raise ValueError(f"learning_rate must be > 0, got {lr}.")
  beta = hparams["beta"]
  if _is_number(beta) and not 0.0 <= beta < 1.0:
    raise ValueError(f"beta must be in [0, 1), got {beta}.")
  for name in ("eps", "weight_decay", "sigma"):
    value = hparams[name]
    if _is_number(value) and value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}.")
  if _is_number(hparams["sigma"]) and hparams["sigma"] == 0:
    raise ValueError("sigma must be > 0 (it is the rectification floor).")
  warmup = hparams.get("warmup")
  if _is_number(warmup) and warmup < 0:
    raise ValueError(f"warmup must be >= 0, got {warmup}.")
  init_lr = hparams.get("init_lr")
  if _is_number(init_lr):
    if init_lr < 0:
      raise ValueError(f"init_lr must be >= 0, got {init_lr}.")
    if _is_number(lr) and init_lr > lr:
      raise ValueError(f"init_lr must be <= learning_rate, got {init_lr} > {lr}.")
  if hparams["rebound"] not in REBOUNDS:
    raise ValueError(f"rebound must be one of {REBOUNDS}, got {hparams['rebound']!r}.")
  wd_type = hparams["weight_decay_type"]
  if wd_type is not None and wd_type not in WEIGHT_DECAY_TYPES:
    raise ValueError(
      f"weight_decay_type must be one of {WEIGHT_DECAY_TYPES} or None, got {wd_type!r}."
    )


def _default_weight_decay_type(rebound: str, weight_decay_type: str | None) -> str:
  if weight_decay_type is not None:
    return weight_decay_type
  return "L2" if rebound == "constant" else "decoupled"


def _decay_rates(weight_decay, mask: MaskOrFn, params) -> Any:
  """Per-leaf weight decay: `weight_decay` where the mask is True, else 0."""
  if mask is None:
    return jax.tree.map(lambda _: weight_decay, params)
  mask_tree = mask(params) if callable(mask) else mask
  return jax.tree.map(lambda _, keep: weight_decay if keep else 0.0, params, mask_tree)


# A tensor this large (16 MiB in float32) does not stay in cache, and reading g,
# m, B and d once for its three sums (and belief's max) beats separate
# reductions; smaller tensors' separate reductions are faster, since they run
# concurrently with other tensors' work. Measured on a 2-core CPU
# (benchmarks/optim_step.py, 25M params, largest tensor 6.3M): the whole step is
# 5-9% faster than with separate sums everywhere (its apollo_separate_sums row);
# thresholds 2^21 and 2^22 measure alike.
FUSED_SUMS_MIN_SIZE = 1 << 22
# The one-pass form sums each last-axis row sequentially in float32; rows up to
# this length keep the error within about 1e-6 of the sum of absolute terms.
FUSED_SUMS_MAX_ROW = 4096


def _tensor_reductions(g, m, b, d, max_delta: bool = False):
  """(sum d^4, sum (g - m) d, sum B d^2) over one tensor, and max |g - m| if asked.

  Large tensors take one pass: a variadic reduction over the last axis gives a
  vector of row results per quantity, each then reduced by `jnp.sum` (or
  `jnp.max`). Others take separate reductions. Both compute the same values;
  only the order of the float32 additions differs. Under sharding either form
  becomes a cross-device reduction.
  """
  sums = (jnp.square(jnp.square(d)), (g - m) * d, (b * d) * d)
  maxes = (jnp.abs(m - g),) if max_delta else ()
  if d.ndim == 0 or d.size < FUSED_SUMS_MIN_SIZE or d.shape[-1] > FUSED_SUMS_MAX_ROW:
    return tuple(jnp.sum(t) for t in sums) + tuple(jnp.max(t) for t in maxes)
  inits = tuple(jnp.zeros((), t.dtype) for t in sums + maxes)  # |g - m| >= 0.

  def combine(xs, ys):
    added = tuple(x + y for x, y in zip(xs[: len(sums)], ys[: len(sums)]))
    return added + tuple(jnp.maximum(x, y) for x, y in zip(xs[len(sums) :], ys[len(sums) :]))

  rows = jax.lax.reduce(sums + maxes, inits, combine, (d.ndim - 1,))
  return tuple(jnp.sum(r) for r in rows[: len(sums)]) + tuple(jnp.max(r) for r in rows[len(sums) :])


def scale_by_apollo(
  beta: float = 0.9,
  eps: float = 1e-4,
  rebound: str = "constant",
  weight_decay: float = 0.0,
  weight_decay_type: str | None = None,
  mask: MaskOrFn = None,
  sigma: float = 0.01,
  state_dtype: jnp.dtype | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Apollo's rectified diagonal quasi-Newton preconditioner.

  For each parameter tensor :math:`\theta` with gradient :math:`g`, at step
  :math:`t` (sums and norms over this tensor only):

  .. math::

    \alpha_t &= (1 - \beta) / (1 - \beta^t) \\
    \delta_t &= g_t - m_{t-1}, \quad m_t = m_{t-1} + \alpha_t \delta_t \\
    D_t &= \|d_{t-1}\|_4 + \epsilon', \quad u = d_{t-1} / D_t \\
    B_t &= B_{t-1} - \left(\alpha_t \frac{\langle \delta_t, u\rangle}{D_t}
           + \langle B_{t-1}, u^2 \rangle\right) u^2 \\
    d_t &= m_t / \mathrm{rectify}(B_t)

  with `'constant'` rebound: :math:`\mathrm{rectify}(B) = \max(|B|, \sigma)`,
  :math:`\epsilon' = \epsilon / \sigma`; with `'belief'` rebound:
  :math:`\mathrm{rectify}(B) = \max(|B|, \|\delta_t\|_\infty) + \epsilon/\alpha_t`,
  :math:`\epsilon' = \epsilon`. Weight decay: `'L2'` adds :math:`wd\,\theta` to
  :math:`g` first; `'decoupled'` adds :math:`wd\,\theta` to :math:`d_t`;
  `'stable'` adds :math:`wd\,\theta / \mathrm{mean}(\mathrm{rectify}(B_t))`. The
  returned update is :math:`d_t` (apply a negative learning rate after it).

  Args:
    beta: moving-average coefficient, in [0, 1).
    eps: term added to the denominators, >= 0.
    rebound: 'constant' (rectify at `sigma`) or 'belief' (rectify at the
      inf-norm of the gradient's deviation from its average).
    weight_decay: decay coefficient, >= 0.
    weight_decay_type: 'L2', 'decoupled' or 'stable'; None picks the reference's
      default: 'L2' for 'constant' rebound, 'decoupled' for 'belief'.
    mask: a tree of booleans with the params' structure (or a function of the
      params returning one) saying which leaves are decayed, like `optax.adamw`.
    sigma: the rectification floor of 'constant' rebound (0.01 in the reference).
    state_dtype: dtype of `m`, `B` and `d`; None keeps each parameter's dtype.
      The arithmetic runs in (at least) float32 and is cast back.

  Returns:
    A `GradientTransformationExtraArgs`; its `update` needs `params` whenever
    weight decay is used.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from apollo.optim import scale_by_apollo
    >>> tx = optax.chain(scale_by_apollo(), optax.scale_by_learning_rate(0.01))
    >>> params = {'w': jnp.ones(3)}
    >>> updates, state = tx.update({'w': jnp.ones(3)}, tx.init(params), params)

  References:
    Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
    Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020.
  """
  _validate(
    beta=beta,
    eps=eps,
    rebound=rebound,
    weight_decay=weight_decay,
    weight_decay_type=weight_decay_type,
    sigma=sigma,
  )
  decay_type = _default_weight_decay_type(rebound, weight_decay_type)
  # A Python 0 switches decay off statically; a traced value (inject_hyperparams)
  # keeps the decay path so that it can be scheduled.
  decays = not (_is_number(weight_decay) and weight_decay == 0)

  def init_fn(params):
    return ScaleByApolloState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=state_dtype),
      curvature=optax.tree.zeros_like(params, dtype=state_dtype),
      direction=optax.tree.zeros_like(params, dtype=state_dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if decays and params is None:
      raise ValueError("scale_by_apollo needs `params` when weight_decay is used.")
    count = optax.safe_increment(state.count)
    # Bias correction in float32 whatever the state's dtype.
    t = count.astype(jnp.float32)
    alpha = (1.0 - beta) / (1.0 - jnp.asarray(beta, jnp.float32) ** t)
    if rebound == "constant":
      eps_norm = eps / sigma
    else:
      eps_norm = eps

    def leaf(g, m, b, d, p, wd):
      # Low-precision params and states compute in float32; float64 stays float64.
      f32 = jnp.promote_types(jnp.float32, g.dtype)
      g, m, b, d = g.astype(f32), m.astype(f32), b.astype(f32), d.astype(f32)
      if decays and decay_type == "L2":
        g = g + wd * p.astype(f32)
      # XLA fuses the reductions into passes over their inputs, but only if no
      # subexpression (g - m, d * d) is shared with the elementwise update: a
      # shared node is materialised as a full-size temporary (~2x slower on
      # CPU). Hence the reductions and the update are written with distinct ops.
      sum_d4, delta_dot_d, b_dot_dd, *max_delta = _tensor_reductions(
        g, m, b, d, max_delta=rebound == "belief"
      )
      norm = jnp.sqrt(jnp.sqrt(sum_d4)) + eps_norm
      inv_norm_sq = 1.0 / (norm * norm)
      # c = -alpha <delta, u> / D - <B, u^2>, with u = d / D.
      coeff = (-alpha * delta_dot_d - b_dot_dd) * inv_norm_sq
      # `+ 0 * delta_dot_d` is exact (NaN only if the step is NaN anyway); the data
      # dependency lets XLA overwrite m in place after the reduction that reads
      # it, where it would otherwise keep a full-size copy of m.
      alpha_m = alpha + 0.0 * delta_dot_d
      m_new = (1.0 - alpha_m) * m + alpha_m * g  # m + alpha * (g - m)
      b_new = b + ((coeff * inv_norm_sq) * d) * d
      if rebound == "constant":
        den = jnp.maximum(jnp.abs(b_new), sigma)
      else:
        den = jnp.maximum(jnp.abs(b_new), max_delta[0]) + eps / alpha
      d_new = m_new / den
      if decays and decay_type == "decoupled":
        d_new = d_new + wd * p.astype(f32)
      elif decays and decay_type == "stable":
        d_new = d_new + (wd / jnp.mean(den)) * p.astype(f32)
      return m_new, b_new, d_new

    if decays:
      rates = _decay_rates(weight_decay, mask, params)
    else:
      params = rates = updates  # Placeholders: `leaf` reads neither without decay.
    out = jax.tree.map(leaf, updates, state.mu, state.curvature, state.direction, params, rates)
    m_new, b_new, d_new = (jax.tree.map(lambda _, o: o[i], updates, out) for i in range(3))
    new_updates = optax.tree.cast_like(d_new, updates)
    new_state = ScaleByApolloState(
      count=count,
      mu=optax.tree.cast_like(m_new, state.mu),
      curvature=optax.tree.cast_like(b_new, state.curvature),
      direction=optax.tree.cast_like(d_new, state.direction),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apollo_learning_rate(
  learning_rate: ScalarOrSchedule,
  warmup: int = 500,
  init_lr: float | None = None,
) -> optax.Schedule:
  """Apollo's learning rate: a linear warmup from `init_lr`, then `learning_rate`.

  At update count `c` (0 for the first update), with `base = learning_rate(c)` for
  a schedule or the constant `learning_rate`:

    lr(c) = init_lr + (base - init_lr) * c / warmup   if c < warmup
    lr(c) = base                                      otherwise

  `init_lr=None` means `base / 1000` (the reference's `lr / 1000`), so with a
  schedule the warmup ramps from a thousandth of the schedule's current value up
  to the schedule itself. With a constant rate this is exactly the reference. With
  `warmup=0` the learning rate (or the schedule) decides alone from step one.
  """
  _validate(
    learning_rate=None if callable(learning_rate) else learning_rate,
    warmup=warmup,
    init_lr=init_lr,
    beta=0.0,
    eps=0.0,
    weight_decay=0.0,
    sigma=1.0,
    rebound="constant",
    weight_decay_type=None,
  )

  def schedule(count):
    base = learning_rate(count) if callable(learning_rate) else learning_rate
    start = base / 1000.0 if init_lr is None else init_lr
    progress = count / jnp.maximum(warmup, 1)
    return jnp.where(count < warmup, start + (base - start) * progress, base)

  return schedule


def apollo(
  learning_rate: ScalarOrSchedule,
  beta: float = 0.9,
  eps: float = 1e-4,
  rebound: str = "constant",
  warmup: int = 500,
  init_lr: float | None = None,
  weight_decay: float = 0.0,
  weight_decay_type: str | None = None,
  mask: MaskOrFn = None,
  sigma: float = 0.01,
  state_dtype: jnp.dtype | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Apollo optimizer (Ma, 2020), with the reference's defaults.

  `apollo = chain(scale_by_apollo(...), scale_by_learning_rate(warmup_schedule))`:
  the direction :math:`d_t` of `scale_by_apollo` (see its docstring for the exact
  rule, including where weight decay enters) times :math:`-\mathrm{lr}_t`, where
  :math:`\mathrm{lr}_t` is the built-in linear warmup of `apollo_learning_rate`.

  Args:
    learning_rate: the peak learning rate (the reference suggests 0.01 to start,
      0.1 for LSTM LMs and Transformer NMT), or an optax schedule of the update
      count. With a schedule, the built-in warmup ramps up to the schedule's
      current value; pass `warmup=0` to let the schedule decide alone.
    beta: moving-average coefficient, in [0, 1).
    eps: term added to the denominators, >= 0.
    rebound: 'constant' or 'belief'.
    warmup: number of linear-warmup updates, >= 0 (the author advises >= 100).
    init_lr: learning rate at the first update; None means learning_rate / 1000.
    weight_decay: decay coefficient, >= 0.
    weight_decay_type: 'L2', 'decoupled' or 'stable'; None means 'L2' for
      'constant' rebound and 'decoupled' for 'belief' (the reference's default).
    mask: which leaves are decayed: a tree of booleans or a function of the
      params returning one (as in `optax.adamw`).
    sigma: the rectification floor of 'constant' rebound.
    state_dtype: dtype of the optimizer state; None keeps the params' dtypes.

  Returns:
    A `GradientTransformationExtraArgs`. With `optax.inject_hyperparams`, pass
    `static_args=('rebound', 'weight_decay_type', 'mask', 'state_dtype')`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from apollo.optim import apollo
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), apollo(0.01, warmup=100))
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p['w'] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
    Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020.
  """
  _validate(
    learning_rate=None if callable(learning_rate) else learning_rate,
    beta=beta,
    eps=eps,
    rebound=rebound,
    warmup=warmup,
    init_lr=init_lr,
    weight_decay=weight_decay,
    weight_decay_type=weight_decay_type,
    sigma=sigma,
  )
  return optax.chain(
    scale_by_apollo(
      beta=beta,
      eps=eps,
      rebound=rebound,
      weight_decay=weight_decay,
      weight_decay_type=weight_decay_type,
      mask=mask,
      sigma=sigma,
      state_dtype=state_dtype,
    ),
    optax.scale_by_learning_rate(apollo_learning_rate(learning_rate, warmup, init_lr)),
  )
