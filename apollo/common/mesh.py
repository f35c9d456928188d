"""Device meshes, logical-axis sharding rules, and global batches.

Every trainer runs on one mesh with axes ('data', 'fsdp', 'tensor'):
- 'data': pure data parallelism (params replicated along it);
- 'fsdp': data parallelism with params and optimizer state sharded along it;
- 'tensor': tensor (model) parallelism inside layers.
Parameters carry logical axis names ('embed', 'mlp', 'heads', 'vocab', ...); each
model's list of rules maps each logical name to a mesh axis (or None: replicated),
as in MaxText and the Flax examples, and `create_sharded_model` creates the
parameters directly in their shards. Batches are split over ('data', 'fsdp').
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, axis_type: str = "explicit") -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all devices; one size may be -1 (the rest).

  Args:
    data, fsdp, tensor: axis sizes; their product must equal the device count.
    axis_type: 'explicit' (shardings are part of array types) or 'auto' (the
      compiler propagates them); passed explicitly since JAX's default changed.
  """
  sizes = [data, fsdp, tensor]
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(
      f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(f"{n} devices cannot be split into mesh axes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n}"
    )
  types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
  if axis_type not in types:
    raise ValueError(f"axis_type must be 'explicit' or 'auto', got {axis_type!r}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(types[axis_type],) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-host numpy arrays -> one global jax.Array each, batch-sharded.

  On one host this is a device_put; on several, each host passes its own slice
  of the global batch (`jax.make_array_from_process_local_data`).
  """
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    for k, v in batch.items()
  }


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as a multi-process job.

  Detected from the coordinator variable (JAX_COORDINATOR_ADDRESS) or a cluster
  environment JAX recognises (SLURM, TPU pods set their own); a no-op otherwise.
  """
  cluster_vars = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")
  if any(os.environ.get(v) for v in cluster_vars) and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def describe(mesh: Mesh) -> str:
  return (
    " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    + f" ({jax.devices()[0].platform})"
  )


# -----------------------------------------------------------------------------
# Logical axis names -> mesh shardings (flax's rules; shared by every model)
# -----------------------------------------------------------------------------


def logical_init(init: Callable, axes: Sequence[str | None]) -> Callable:
  """Wraps an initializer so the created Param carries logical axis names.

  ``eager_sharding=False`` keeps construction mesh-free (flax would otherwise try
  to place the value on a mesh the moment it is created); sharded creation goes
  through :func:`create_sharded_model` instead.
  """
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def logical_partition_specs(state: Any, rules: LogicalRules) -> Any:
  """Maps a (possibly abstract) model state to mesh ``PartitionSpec`` s.

  Args:
    state: an ``nnx.State`` (e.g. from ``nnx.split(nnx.eval_shape(...))``) whose
      Params carry logical ``out_sharding`` metadata.
    rules: (logical name, mesh axis or None) pairs. Names without a rule are left
      as they are, so a mesh axis name may be used directly.

  Returns:
    A pytree with the structure of ``state`` whose leaves are ``PartitionSpec`` s.
  """
  # flax resolves logical names through the context rules inside get_partition_spec.
  with nn.logical_axis_rules(tuple(rules)):
    specs = nnx.get_partition_spec(state)
  return jax.tree.map(
    lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
    specs,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def named_shardings(specs: Any, mesh: Mesh) -> Any:
  """Wraps every ``PartitionSpec`` leaf of ``specs`` in a ``NamedSharding`` on mesh."""
  return jax.tree.map(
    lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def create_sharded_model(
  make_model: Callable[[], nnx.Module], mesh: Mesh | None, rules: LogicalRules
) -> nnx.Module:
  """Builds a model whose parameters are created directly in their shards.

  The model is first traced abstractly (no memory), its logical axes are mapped to
  mesh axes by ``rules``, and the initializer is compiled with those output
  shardings, so no device ever holds the full unsharded parameters. With
  ``mesh=None`` it builds on the default device (still one compiled initializer,
  much faster than eager op-by-op init). Values equal those of ``make_model()``.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
  shardings = None
  if mesh is not None:
    shardings = named_shardings(logical_partition_specs(abstract_state, rules), mesh)
  state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (``nnx.Param`` only; abstract models too)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
