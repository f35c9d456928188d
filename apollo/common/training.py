"""Pieces shared by every trainer (APOLLO pretraining and fine-tuning, agent SFT).

* the optimizer named by a config (`build_optimizer`: Apollo, AdamW, Adam or SGD
  after global-norm clipping), its learning-rate schedule and the weight-decay
  mask;
* workdir checks: `config.json` records the model shapes of a run, and a
  workdir whose shapes differ from the config's is refused before anything is
  touched (`check_saved_config`, `check_checkpoint_shapes`);
* the train state `{params, opt_state, step, rng}`: its abstract, sharded form
  (`abstract_train_state`, for restoring) and a fresh one (`new_train_state`);
* what stays fixed over a run (`TrainSetup`, `make_setup`), one optimizer update
  on a trainer's loss (`gradient_step`) and the jitted, donated train step
  (`jit_train_step`);
* the step loop itself (`train_loop`): batches, metrics read one step late
  (`LateMetrics`, so the host never waits on the device between steps),
  evaluation, checkpoints and SIGTERM. Each trainer supplies its batches, its
  metric summaries and its evaluation as callbacks.

The shape (pure module-level steps, resumable `train_and_evaluate(config, workdir)`)
is that of the Flax examples (github.com/google/flax/tree/main/examples).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apollo import optim as apollo_optim
from apollo.common import checkpoint as checkpoint_lib
from apollo.common import mesh as mesh_lib
from apollo.common import metrics as metrics_lib

OPTIMIZERS = ("apollo", "adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


# -----------------------------------------------------------------------------
# Optimizer and learning rate
# -----------------------------------------------------------------------------


def decay_mask(params: Any) -> Any:
  """True for weight matrices and embeddings; False for biases and LayerNorm scales."""

  def decays(path, _):
    name = getattr(path[-1], "key", None)
    return name in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(
  opt: ml_collections.ConfigDict, train_steps: int
) -> tuple[optax.Schedule, optax.Schedule]:
  """(schedule after warmup, full schedule with warmup) of the update count.

  The decay (constant / cosine / linear to `end_lr_fraction * peak`) runs over the
  updates after warmup. Warmup: Apollo's own (from peak / 1000, see
  `apollo.optim.apollo_learning_rate`); for the others a linear ramp from 0.
  """
  if opt.schedule not in SCHEDULES:
    raise ValueError(
      f"Unknown --config.optimizer.schedule={opt.schedule!r}; choose from {SCHEDULES}."
    )
  peak, warmup = float(opt.learning_rate), int(opt.warmup_steps)
  end = peak * float(opt.end_lr_fraction)
  decay_steps = max(int(train_steps) - warmup, 1)
  if opt.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(opt.end_lr_fraction))
  else:
    decay = optax.linear_schedule(peak, end, decay_steps)

  def after_warmup(count):
    return decay(jnp.maximum(count - warmup, 0))

  if opt.name == "apollo":
    return after_warmup, apollo_optim.apollo_learning_rate(after_warmup, warmup)

  def with_warmup(count):
    ramp = peak * count / max(warmup, 1)
    return jnp.where(count < warmup, ramp, after_warmup(count))

  return after_warmup, with_warmup


def build_optimizer(
  opt: ml_collections.ConfigDict, train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer named by `opt.name`, after global-norm clipping; and its lr schedule.

  Weight decay never touches biases or LayerNorm parameters (`decay_mask`).
  """
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"Unknown --config.optimizer.name={opt.name!r}; choose from {OPTIMIZERS}.")
  after_warmup, lr = learning_rate_schedule(opt, train_steps)
  wd = float(opt.weight_decay)
  if opt.name == "apollo":
    core = apollo_optim.apollo(
      after_warmup,
      beta=opt.apollo_beta,
      eps=opt.apollo_eps,
      rebound=opt.apollo_rebound,
      warmup=int(opt.warmup_steps),
      weight_decay=wd,
      weight_decay_type=opt.apollo_weight_decay_type,
      mask=decay_mask,
    )
  elif opt.name == "adamw":
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd, mask=decay_mask)
  else:
    # Adam and SGD take weight decay as an L2 term added to the gradient.
    base = (
      optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
      if opt.name == "adam"
      else optax.sgd(lr, momentum=float(opt.momentum) or None)
    )
    core = optax.chain(optax.add_decayed_weights(wd, decay_mask), base) if wd else base
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    core = optax.chain(optax.clip_by_global_norm(float(opt.grad_clip_norm)), core)
  return core, lr


# -----------------------------------------------------------------------------
# Processes, JSON files, workdir checks
# -----------------------------------------------------------------------------


def is_main() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def write_json_atomically(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)


def model_config_json(model_config: Any) -> dict:
  return {
    k: (str(v) if k in ("dtype", "param_dtype") else v)
    for k, v in dataclasses.asdict(model_config).items()
  }


def check_saved_config(workdir: str, model_config: Any, shape_fields: Sequence[str]) -> None:
  """Refuses a workdir whose `config.json` records other model shapes.

  Raises:
    ValueError: naming `workdir/config.json` and each differing field.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  resolved = model_config_json(model_config)
  with open(path, encoding="utf-8") as f:
    saved = json.load(f).get("model_resolved", {})
  diffs = {k: (saved.get(k), resolved[k]) for k in shape_fields if saved.get(k) != resolved[k]}
  if diffs:
    lines = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diffs.items())
    raise ValueError(
      f"{path} belongs to a run with other model shapes ({lines}); its checkpoints "
      f"cannot be resumed with this config. Use a new --workdir or the saved config."
    )


def write_config(
  workdir: str, config: ml_collections.ConfigDict, model_config: Any, **extra: Any
) -> None:
  """Records the config of this run (and the resolved model config) in workdir/config.json."""
  if is_main():
    write_json_atomically(
      os.path.join(workdir, "config.json"),
      dict(
        config=json.loads(config.to_json_best_effort()),
        model_resolved=model_config_json(model_config),
        **extra,
      ),
    )


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """'encoder/layers/0/attention/query/kernel' -> shape (dict keys compared as strings)."""

  def name(entry):
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)

  return {
    "/".join(name(e) for e in path): tuple(getattr(x, "shape", None) or ())
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_checkpoint_shapes(ckpt: checkpoint_lib.Checkpointer, abstract_state: Any) -> None:
  """The latest checkpoint's parameter shapes must equal the config's (checked before restoring).

  Restoring a mismatched checkpoint would fail and set it aside as damaged; this
  reports the mismatch instead and leaves the checkpoint alone.
  """
  step = ckpt.latest_step()
  if step is None:
    return
  path = os.path.join(ckpt.directory, str(step), "state")
  try:
    tree = ckpt.state_metadata(step)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not read the metadata of %s (%s); restoring will tell.", path, e)
    return
  saved = _shapes_by_path(tree.get("params", {}) if isinstance(tree, Mapping) else {})
  if not saved:
    logging.warning("No parameter metadata in %s; restoring will tell.", path)
    return
  wanted = _shapes_by_path(abstract_state["params"])
  diffs = [
    f"{k}: checkpoint {saved[k]} vs config {v}"
    for k, v in wanted.items()
    if k in saved and saved[k] != v
  ]
  missing = [k for k in wanted if k not in saved]
  if diffs or missing:
    detail = "; ".join(diffs[:5] + [f"{k} missing" for k in missing[:5]])
    raise ValueError(
      f"Checkpoint {os.path.dirname(path)} does not match the configured "
      f"model ({len(diffs)} parameter shape differences, {len(missing)} "
      f"missing parameters: {detail}). Use a new --workdir or the config it was "
      f"written with."
    )


# -----------------------------------------------------------------------------
# Train state
# -----------------------------------------------------------------------------


def abstract_train_state(
  make_model: Callable[[], nnx.Module],
  optimizer: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  rules: mesh_lib.LogicalRules,
) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract state, state shardings) of `{params, opt_state, step, rng}`.

  Computed abstractly (no memory used); the ShapeDtypeStructs carry their
  NamedShardings (parameters by the model's logical-axis `rules`, the optimizer state
  by `apollo.optim.state_shardings`), ready for `Checkpointer.restore_latest`.
  """
  graphdef, abstract_nnx = nnx.split(nnx.eval_shape(make_model))
  specs = nnx.to_pure_dict(mesh_lib.logical_partition_specs(abstract_nnx, rules))
  abstract_params = jax.tree.map(
    lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
    nnx.to_pure_dict(abstract_nnx),
    specs,
  )
  opt_shardings = apollo_optim.state_shardings(optimizer, abstract_params, mesh)
  abstract_opt = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(optimizer.init, abstract_params),
    opt_shardings,
  )
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_state = dict(
    params=abstract_params,
    opt_state=abstract_opt,
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
  )
  return graphdef, abstract_state, jax.tree.map(lambda x: x.sharding, abstract_state)


def new_train_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  state_shardings: Any,
  seed: int,
) -> dict[str, Any]:
  """Step 0 of `{params, opt_state, step, rng}`; `rng` (dropout) comes from seed + 1."""
  params = jax.device_put(params, state_shardings["params"])
  replicated = state_shardings["step"]
  return dict(
    params=params,
    opt_state=apollo_optim.init_sharded(optimizer, params, mesh),
    step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
    rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(seed + 1)), replicated),
  )


@dataclasses.dataclass
class TrainSetup:
  """What stays fixed over a run: mesh, model structure, optimizer, shardings."""

  mesh: jax.sharding.Mesh
  model_config: Any
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_state: Any  # ShapeDtypeStructs carrying their NamedShardings.
  state_shardings: Any


def make_setup(
  make_model: Callable[[], nnx.Module],
  model_config: Any,
  optimizer_config: ml_collections.ConfigDict,
  train_steps: int,
  mesh: jax.sharding.Mesh,
  rules: mesh_lib.LogicalRules,
) -> TrainSetup:
  """The optimizer of `optimizer_config` and the state's shapes and shardings (abstract)."""
  optimizer, lr_schedule = build_optimizer(optimizer_config, train_steps)
  graphdef, abstract_state, state_shardings = abstract_train_state(
    make_model, optimizer, mesh, rules
  )
  return TrainSetup(
    mesh, model_config, graphdef, optimizer, lr_schedule, abstract_state, state_shardings
  )


def resume_or_init(
  ckpt: checkpoint_lib.Checkpointer,
  abstract_state: Any,
  init: Callable[[], Any],
  *,
  required_data: Sequence[str] = (),
  start_over: bool = False,
) -> tuple[Any, int, dict[str, Any]]:
  """(state, step, saved data) of the latest checkpoint, or (init(), 0, {}) if none.

  A checkpoint whose saved data lacks a key of `required_data` (the data iterator's
  state: without it the resumed run would see other data) is damaged, like one whose
  files do not restore: set aside, and the previous one is tried. If none restores,
  this raises `CheckpointError` on every rerun, unless `start_over` (then the damaged
  checkpoints are moved aside, see `Checkpointer.restore_latest`, and `init()` runs).
  """
  restored = ckpt.restore_latest(abstract_state, required_data=required_data, start_over=start_over)
  if restored is None:
    return init(), 0, {}
  logging.info("Resumed from %s at step %d.", ckpt.directory, restored.step)
  return restored.state, restored.step, restored.data or {}


def gradient_step(
  state: dict[str, Any],
  loss_fn: Callable[[Any], tuple[jax.Array, dict]],
  optimizer: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimizer update of `{params, opt_state, step, rng}` on `loss_fn(params) ->
  (loss, sums)`; the metrics are the sums plus loss, grad_norm (before clipping),
  update_norm and this update's learning rate."""
  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  new_state = dict(
    params=optax.apply_updates(state["params"], updates),
    opt_state=opt_state,
    step=state["step"] + 1,
    rng=state["rng"],
  )
  metrics = dict(
    sums,
    loss=loss,
    grad_norm=optax.tree.norm(grads),
    update_norm=optax.tree.norm(updates),
    learning_rate=jnp.asarray(lr_schedule(state["step"]), jnp.float32),
  )
  return new_state, metrics


def jit_train_step(train_step: Callable, setup: TrainSetup) -> Callable:
  """`train_step(state, batch) -> (state, metrics)` jitted: the state donated and kept
  in its shardings, the metrics replicated."""
  return jax.jit(
    train_step,
    out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, PartitionSpec())),
    donate_argnums=0,
  )


# -----------------------------------------------------------------------------
# The loop
# -----------------------------------------------------------------------------


class LateMetrics:
  """Holds one step's device metrics and hands them to `handle` a step later.

  The loop dispatches step N, then calls `consume()` for step N-1's metrics
  while N runs, so the host never blocks on the device in between. Before a
  checkpoint or an evaluation the loop calls `consume()` again: the metrics of
  the step about to be saved are then checked finite first.
  """

  def __init__(
    self, handle: Callable[[int, dict], None], finite_keys: Sequence[str] = ("loss", "grad_norm")
  ):
    self._handle, self._keys, self._pending = handle, tuple(finite_keys), None

  def put(self, step: int, metrics: Any) -> None:
    self.consume()
    self._pending = (step, metrics)

  def consume(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    metrics = jax.device_get(metrics)
    # A finite loss with overflowing gradients would still poison the params.
    metrics_lib.check_finite(metrics, step, keys=self._keys)
    self._handle(step, metrics)


class TrainLog:
  """The `log_step` of `train_loop`: per-step metrics into a window, a summary every
  `every` steps (and at the last one), with progress and ETA lines on the way.

  A run starting at `start_step` redoes the steps after it, so their rows (from an
  earlier, interrupted run) are dropped from metrics.jsonl first.
  `new_window()` returns an accumulator with `add(metrics)`, `summary() -> dict`
  and `steps`. Each summary gets `<unit>_per_s` (throughput over the window's
  training time; call `restart_clock()` after an evaluation so that it is not
  counted) and whatever `extra(step)` returns, is written to `writer` as split
  'train' and kept as `last`.
  """

  def __init__(
    self,
    writer: metrics_lib.MetricsWriter,
    new_window: Callable[[], Any],
    *,
    start_step: int,
    total_steps: int,
    every: int,
    units_per_step: float,
    unit: str,
    extra: Callable[[int], Mapping[str, float]] | None = None,
  ):
    self._writer, self._new_window, self._extra = writer, new_window, extra
    self._total, self._every, self._per_step, self._unit = total_steps, every, units_per_step, unit
    self._progress = metrics_lib.Progress(total_steps, start_step, unit=unit, every=every)
    self._window, self._start = new_window(), time.perf_counter()
    self.last: dict[str, float] = {}
    if writer.drop_after(start_step):  # Rows of the steps this run redoes.
      logging.info("Dropped the metrics.jsonl rows after step %d.", start_step)

  def __call__(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._window.add(metrics)
    self._progress.update(step, self._per_step, {"loss": metrics["loss"]})
    if step % self._every == 0 or step == self._total:
      now = time.perf_counter()
      summary = dict(self._window.summary())
      summary[f"{self._unit}_per_s"] = (
        self._per_step * self._window.steps / max(now - self._start, 1e-9)
      )
      if self._extra is not None:
        summary.update(self._extra(step))
      self._writer.write(step, summary, split="train")
      self.last = summary
      self._window, self._start = self._new_window(), now

  def restart_clock(self) -> None:
    self._start = time.perf_counter()


def train_loop(
  state: Any,
  *,
  mesh: jax.sharding.Mesh,
  step_fn: Callable,
  next_batch: Callable[[int], tuple[Any, Mapping[str, Any]]],
  start_step: int,
  total_steps: int,
  ckpt: checkpoint_lib.Checkpointer,
  log_step: Callable,
  log_every: int,
  checkpoint_every: int,
  eval_every: int = 0,
  evaluate: Callable[[int, Any], None] | None = None,
  on_step: Callable[[int], None] | None = None,
) -> tuple[Any, int, bool]:
  """Runs steps `start_step + 1 .. total_steps`; returns (state, last step, preempted).

  Per step: `next_batch(step)` gives the device batch and the data to checkpoint
  with it (e.g. the data iterator's position after this batch); `step_fn` runs
  the update; `log_step(step, metrics)` gets the host metrics one step later,
  checked finite first (`LateMetrics`). Every `eval_every` steps (0: never) and at
  the end, `evaluate(step, params)`; every `checkpoint_every` steps, at the end and on
  SIGTERM, a checkpoint, only after that step's metrics were checked. On SIGTERM
  the loop stops after the checkpoint; rerunning the job resumes from it.
  `on_step(step)` is called after each update is dispatched (tests use it to send
  SIGTERM mid-run).
  """
  late = LateMetrics(log_step)
  step, preempted = start_step, False
  with checkpoint_lib.PreemptionGuard() as guard, jax.set_mesh(mesh):
    for step in range(start_step + 1, total_steps + 1):
      batch, data = next_batch(step)
      state, metrics = step_fn(state, batch)
      late.put(step, metrics)  # Handles the previous step's metrics while this one runs.
      if on_step is not None:
        on_step(step)
      save = step % checkpoint_every == 0 or step == total_steps or guard.requested
      do_eval = evaluate is not None and (
        (eval_every > 0 and step % eval_every == 0) or step == total_steps
      )
      if save or do_eval or step % log_every == 0:
        late.consume()  # Checked finite before anything of this step is saved.
      if do_eval:
        evaluate(step, state["params"])
      if save:
        ckpt.save(step, state, data=data)
      if guard.requested:
        logging.warning(
          "SIGTERM: saved step %d in %s; rerun the same command to resume.", step, ckpt.directory
        )
        preempted = True
        break
    late.consume()
  return state, step, preempted
