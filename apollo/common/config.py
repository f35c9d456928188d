"""Config blocks every trainer shares, and the checks every trainer runs first.

* `optimizer_config` (read by `apollo.common.training.build_optimizer`) and
  `mesh_config` (`apollo.common.mesh.make_mesh`): each trainer's config file calls
  these with its own defaults, so a field is named and documented once and
  `--config.optimizer.x=y` means the same in every trainer.
* `check_config(config, reference)`: unknown fields (with the closest known name)
  and values that cannot work (a learning rate <= 0, a negative step count, a log /
  eval / checkpoint interval of 0) are one `ConfigError` before any work, naming each
  `--config.` flag; `unknown_field_error` does the same for override paths.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config field that does not exist or a value that cannot work; names the flags."""


def _closest(name: str, known: Iterable[str]) -> str:
  """' (did you mean X?)' for the closest of `known`, else ' (known: a, b, ...)'."""
  known = sorted(known)
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  if close:
    return f" (did you mean {close[0]}?)"
  return f" (known: {', '.join(known)})"


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
      raise ConfigError(f"optimizer_config has no field {key!r}{_closest(key, c.keys())}.")
    c[key] = value
  return c


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """The `mesh` block: axis sizes of ('data', 'fsdp', 'tensor')."""
  c = ml_collections.ConfigDict()
  c.data = data  # Data-parallel axis; -1 = the devices left over.
  c.fsdp = fsdp  # Params and optimizer state sharded over this axis.
  c.tensor = tensor  # Tensor (model) parallelism inside layers.
  return c


def _is_block(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def unknown_field_error(config, path: str, prefix: str = "--config.") -> str | None:
  """Why `path` ('optimizer.learnin_rate') names no field of `config`, with the closest
  known name at the first wrong level; None if it names one."""
  node, done = config, []
  for part in path.split("."):
    if not _is_block(node):
      return f"{prefix}{path}: {prefix}{'.'.join(done)} is a value, not a block of fields."
    if part not in node:
      where = f" in {prefix}{'.'.join(done)}" if done else ""
      close = difflib.get_close_matches(part, sorted(node.keys()), n=1, cutoff=0.6)
      hint = (
        f" (did you mean {prefix}{'.'.join([*done, close[0]])}?)"
        if close
        else f" (known: {', '.join(sorted(node.keys()))})"
      )
      return f"Unknown config field {prefix}{path}: no {part!r}{where}{hint}."
    node, done = node[part], [*done, part]
  return None


def _unknown_fields(config, reference, root=None, path: tuple[str, ...] = ()) -> list[str]:
  """One message per field of `config` that `reference` lacks (not looking inside it)."""
  root = reference if root is None else root
  out = []
  for key in config.keys():
    if key not in reference:
      out.append(unknown_field_error(root, ".".join([*path, key])))
    elif _is_block(config[key]) and _is_block(reference[key]) and len(reference[key]):
      out.extend(_unknown_fields(config[key], reference[key], root, (*path, key)))
  return out


# Fields that must be > 0 wherever a config has them (0 is allowed where a trainer gives 0
# a meaning: `zero_means`). Counts are integers.
POSITIVE_COUNTS = (
  "train_steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "max_checkpoints",
  "data.batch_size",
)
NON_NEGATIVE = (
  "optimizer.warmup_steps",
  "optimizer.grad_clip_norm",
  "optimizer.weight_decay",
)


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if not _is_block(node) or part not in node:
      return None
    node = node[part]
  return node


def check_config(
  config: ml_collections.ConfigDict,
  reference: ml_collections.ConfigDict | None = None,
  zero_means: Mapping[str, str] | None = None,
) -> None:
  """Refuses a config that cannot train as meant, before any work; every trainer calls it.

  Args:
    config: the trainer's config.
    reference: a config with every known field (the trainer's `get_config()`); a field
      of `config` not in it is an error naming the closest known field.
    zero_means: fields of `POSITIVE_COUNTS` where 0 has a meaning (fine-tuning:
      train_steps 0 = `num_epochs`, eval_every 0 = once per epoch), with that meaning.

  Raises:
    ConfigError: one line per problem, each naming its `--config.` flag.
  """
  zero_means = dict(zero_means or {})
  problems = []
  if reference is not None:
    problems.extend(_unknown_fields(config, reference))
  for path in POSITIVE_COUNTS:
    value = _get(config, path)
    if value is None:
      continue
    if not isinstance(value, int) or isinstance(value, bool):
      problems.append(f"--config.{path}={value!r} must be a whole number.")
    elif value < 0 or (value == 0 and path not in zero_means):
      allowed = f" (or 0: {zero_means[path]})" if path in zero_means else ""
      problems.append(f"--config.{path}={value} must be > 0{allowed}.")
  if "train_steps" in zero_means and _get(config, "train_steps") == 0:
    epochs = _get(config, "num_epochs")
    if epochs is not None and not (isinstance(epochs, (int, float)) and epochs > 0):
      problems.append(f"--config.num_epochs={epochs} must be > 0 when train_steps is 0.")
  lr = _get(config, "optimizer.learning_rate")
  if lr is not None and not (
    isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
  ):
    problems.append(f"--config.optimizer.learning_rate={lr} must be a finite number > 0.")
  for path in NON_NEGATIVE:
    value = _get(config, path)
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
      problems.append(f"--config.{path}={value} must be >= 0.")
  for path in ("optimizer.end_lr_fraction", "optimizer.warmup_fraction"):
    value = _get(config, path)
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
      problems.append(f"--config.{path}={value} must be between 0 and 1.")
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
