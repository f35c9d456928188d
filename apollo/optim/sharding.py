"""Optimizer state created already sharded like the parameters.

Trainers never materialise an optimizer state on one device and then move it: the
state's shardings are derived from the params' (`jax.eval_shape` -> shardings), and
`optimizer.init` runs under `jax.jit(..., out_shardings=...)` so that every device
allocates only its own shard. Works for any optax transformation, not only Apollo.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec


def _param_shardings(params: Any, mesh: Mesh | None) -> Any:
  """The params' shardings, on the concrete `mesh` where they name an abstract one."""

  def sharding_of(p):
    sharding = getattr(p, "sharding", None)
    if sharding is None:
      raise ValueError(
        "init_sharded needs params with shardings: sharded jax.Arrays, or "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))."
      )
    # `jax.eval_shape` under Explicit axes returns shardings on an AbstractMesh.
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, AbstractMesh):
      if mesh is None:
        raise ValueError("params carry an abstract mesh: pass the concrete `mesh`.")
      sharding = NamedSharding(mesh, sharding.spec)
    return sharding

  return jax.tree.map(sharding_of, params)


def state_shardings(
  optimizer: optax.GradientTransformation, params: Any, mesh: Mesh | None = None
) -> Any:
  """Shardings for `optimizer.init(params)`: each per-parameter leaf like its param.

  Leaves of the state that are not per-parameter (step counts, injected
  hyperparameters) are replicated over the params' mesh.

  Args:
    optimizer: any optax transformation.
    params: sharded arrays or `jax.ShapeDtypeStruct`s carrying a `NamedSharding`.
    mesh: the concrete mesh, needed only when the params' shardings name an
      `AbstractMesh` (what `jax.eval_shape` returns under Explicit axes).

  Returns:
    A tree of `jax.sharding.Sharding` with the structure of the optimizer state.
  """
  param_shardings = _param_shardings(params, mesh)
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_state = jax.eval_shape(optimizer.init, params)
  return optax.tree.map_params(
    optimizer,
    lambda _, sharding: sharding,
    abstract_state,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )


def init_sharded(
  optimizer: optax.GradientTransformation, params: Any, mesh: Mesh | None = None
) -> optax.OptState:
  """`optimizer.init(params)`, created directly with `state_shardings`.

  `params` may be abstract (`jax.ShapeDtypeStruct` with shardings, e.g. from
  `jax.eval_shape` of a sharded model init): optimizers whose `init` reads only
  shapes and dtypes (Apollo, Adam, SGD with momentum, ...) never need the values.

  Example:
    >>> mesh = jax.make_mesh((8,), ('fsdp',))
    >>> params = jax.device_put(params, NamedSharding(mesh, P('fsdp')))
    >>> opt_state = init_sharded(apollo(1e-2), params)
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
    # Inside jit or eval_shape: the enclosing computation decides placement.
    return optimizer.init(params)
  shardings = state_shardings(optimizer, params, mesh)
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
    return jax.jit(optimizer.init, out_shardings=shardings)(params)
  # Abstract params: init from shapes and dtypes only; out_shardings places it.
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  return jax.jit(lambda: optimizer.init(shapes), out_shardings=shardings)()
