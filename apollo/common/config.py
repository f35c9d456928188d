"""Config blocks every trainer shares: the optimizer (read by
`apollo.common.training.build_optimizer`) and the mesh (`apollo.common.mesh.make_mesh`).

Each trainer's config file calls these with its own defaults, so a field is named
and documented once and `--config.optimizer.x=y` means the same in every trainer.
"""

import ml_collections


def optimizer_config(**defaults) -> ml_collections.ConfigDict:
  """The `optimizer` block; keyword arguments replace the defaults below."""
  c = ml_collections.ConfigDict()
  c.name = "apollo"  # apollo (default), adamw, adam or sgd.
  c.learning_rate = 1e-2  # Peak learning rate.
  c.schedule = "cosine"  # After warmup: constant, cosine or linear decay to end_lr.
  c.warmup_steps = 50  # Linear warmup updates (apollo: its built-in warmup).
  c.end_lr_fraction = 0.0  # Final lr = this * peak (cosine / linear).
  c.grad_clip_norm = 1.0  # Global-norm clipping before the optimizer; 0 = off.
  c.weight_decay = 0.0  # Decay coefficient (biases and LayerNorms never decay).
  c.apollo_beta = 0.9  # Apollo: moving-average coefficient.
  c.apollo_eps = 1e-4  # Apollo: denominator epsilon.
  c.apollo_rebound = "constant"  # Apollo: constant or belief.
  c.apollo_weight_decay_type = "L2"  # Apollo: L2, decoupled or stable.
  c.b1 = 0.9  # Adam(W): first-moment decay.
  c.b2 = 0.98  # Adam(W): second-moment decay (RoBERTa uses 0.98).
  c.eps = 1e-6  # Adam(W): epsilon (RoBERTa uses 1e-6).
  c.momentum = 0.9  # SGD: momentum (0 = none).
  for key, value in defaults.items():
    if key not in c:
      raise KeyError(f"optimizer_config has no field {key!r}")
    c[key] = value
  return c


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """The `mesh` block: axis sizes of ('data', 'fsdp', 'tensor')."""
  c = ml_collections.ConfigDict()
  c.data = data  # Data-parallel axis; -1 = the devices left over.
  c.fsdp = fsdp  # Params and optimizer state sharded over this axis.
  c.tensor = tensor  # Tensor (model) parallelism inside layers.
  return c
