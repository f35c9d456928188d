"""Device meshes, logical-axis sharding rules, and global batches.

Every trainer runs on one mesh with axes ('data', 'fsdp', 'tensor'):
- 'data': pure data parallelism (params replicated along it);
- 'fsdp': data parallelism with params and optimizer state sharded along it;
- 'tensor': tensor (model) parallelism inside layers.
Parameters carry logical axis names ('embed', 'mlp', 'heads', 'vocab', ...); a
list of rules maps each logical name to a mesh axis (or None: replicated), as in
MaxText and the Flax examples. Batches are split over ('data', 'fsdp').
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LogicalRules = Sequence[tuple[str, Optional[str | tuple[str, ...]]]]


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
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(f"{n} devices cannot be split into mesh axes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n}")
  types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
  if axis_type not in types:
    raise ValueError(f"axis_type must be 'explicit' or 'auto', got {axis_type!r}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(types[axis_type],) * 3)


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules: LogicalRules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; unknown names stay replicated.

  A mesh axis is used at most once per spec: a later dimension whose rule names
  an axis already taken is replicated instead (e.g. ('embed', 'embed')).
  """
  table = dict(rules)
  used, out = set(), []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    if any(a in used for a in axes):
      axes = ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*out)


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
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({jax.devices()[0].platform})"


def tree_shardings(logical_axes_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """A tree of logical-axis tuples -> a tree of NamedShardings on `mesh`."""
  return jax.tree.map(
      lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
      logical_axes_tree,
      is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
  )
