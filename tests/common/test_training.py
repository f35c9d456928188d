"""The trainers' shared step loop: logging, evaluation and checkpoint cadence, NaN, SIGTERM."""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.common.checkpoint import Checkpointer


class _Sums:
  """A minimal metrics window: the mean loss."""

  def __init__(self):
    self.total, self.steps = 0.0, 0

  def add(self, metrics):
    self.total += float(metrics["loss"])
    self.steps += 1

  def summary(self):
    return {"loss": self.total / self.steps}


def _run(tmp_path, total=5, start_step=0, state=None, losses=None, on_step=None):
  """Runs `train_loop` on a counter state; the loss of step s is losses[s] (default s)."""
  mesh = jax.make_mesh((8,), ("data",))
  losses = losses or {}
  evaluated, batches = [], []

  def next_batch(step):
    batches.append(step)
    return jnp.float32(step), dict(step=step)

  def step_fn(state, batch):
    loss = losses.get(int(batch), float(batch))
    state = dict(params=state["params"] + batch, step=state["step"] + 1)
    return state, dict(loss=jnp.float32(loss), grad_norm=jnp.float32(1.0))

  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=10)
  log = train_lib.TrainLog(
    writer,
    _Sums,
    start_step=start_step,
    total_steps=total,
    every=2,
    units_per_step=4,
    unit="rows",
    extra=lambda step: {"seen": 4.0 * step},
  )
  if state is None:
    state = dict(params=jnp.float32(0.0), step=jnp.int32(0))
  try:
    state, step, preempted = train_lib.train_loop(
      state,
      mesh=mesh,
      step_fn=step_fn,
      next_batch=next_batch,
      start_step=start_step,
      total_steps=total,
      ckpt=ckpt,
      log_step=log,
      log_every=2,
      checkpoint_every=2,
      eval_every=3,
      evaluate=lambda step, params: evaluated.append((step, float(params))),
      on_step=on_step,
    )
  finally:
    ckpt.close()
    writer.close()
  return dict(
    state=state,
    step=step,
    preempted=preempted,
    evaluated=evaluated,
    batches=batches,
    log=log,
    steps_saved=Checkpointer(tmp_path / "checkpoints").all_steps(),
  )


def test_cadence_of_logs_evaluations_and_checkpoints(tmp_path):
  out = _run(tmp_path)
  assert (out["step"], out["preempted"], out["batches"]) == (5, False, [1, 2, 3, 4, 5])
  assert float(out["state"]["params"]) == 15.0
  assert out["evaluated"] == [(3, 6.0), (5, 15.0)]  # Every 3 steps and at the end.
  assert out["steps_saved"] == [2, 4, 5]  # Every 2 steps and at the end.
  rows = metrics_lib.read_metrics(tmp_path, split="train")
  assert [r["step"] for r in rows] == [2, 4, 5]
  assert [r["loss"] for r in rows] == [1.5, 3.5, 5.0]  # Window means, reset after each row.
  assert rows[-1]["seen"] == 20.0 and rows[-1]["rows_per_s"] > 0
  assert out["log"].last == {
    k: v for k, v in rows[-1].items() if k not in ("step", "split", "time")
  }


def test_resume_runs_only_the_remaining_steps(tmp_path):
  out = _run(tmp_path, start_step=3, state=dict(params=jnp.float32(6.0), step=jnp.int32(3)))
  assert out["batches"] == [4, 5] and float(out["state"]["params"]) == 15.0
  assert out["steps_saved"] == [4, 5]


def test_non_finite_loss_stops_before_its_step_is_saved(tmp_path):
  with pytest.raises(metrics_lib.NonFiniteLossError, match="step 4"):
    _run(tmp_path, losses={4: float("nan")})
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]


def test_sigterm_saves_the_current_step_and_stops(tmp_path):
  def on_step(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  out = _run(tmp_path, on_step=on_step)
  assert (out["step"], out["preempted"]) == (3, True)
  assert out["steps_saved"] == [2, 3]
  np.testing.assert_array_equal(out["batches"], [1, 2, 3])


def test_eval_every_zero_evaluates_only_at_the_end(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  seen = []
  ckpt = Checkpointer(tmp_path / "checkpoints")
  try:
    train_lib.train_loop(
      dict(params=jnp.float32(0.0)),
      mesh=mesh,
      step_fn=lambda s, b: (dict(params=s["params"] + b), dict(loss=b, grad_norm=b)),
      next_batch=lambda step: (jnp.float32(step), {}),
      start_step=0,
      total_steps=4,
      ckpt=ckpt,
      log_step=lambda step, metrics: None,
      log_every=10,
      checkpoint_every=10,
      eval_every=0,
      evaluate=lambda step, params: seen.append(step),
    )
  finally:
    ckpt.close()
  assert seen == [4]


def test_resume_or_init_needs_the_data_state_and_refuses_until_start_over(tmp_path):
  def state(v):
    return dict(params=jnp.full((4,), float(v)), step=jnp.int32(v))

  abstract = jax.eval_shape(lambda: state(0))
  ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=5)
  ckpt.save(2, state(2), data=dict(train_iterator={"position": 2}))
  ckpt.save(4, state(4), data=dict(step=4))  # The iterator state is missing.
  ckpt.close()

  def resume(**kwargs):
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=5)
    try:
      return train_lib.resume_or_init(
        ckpt, abstract, lambda: state(0), required_data=["train_iterator"], **kwargs
      )
    finally:
      ckpt.close()

  _, step, data = resume()
  assert (step, data) == (2, dict(train_iterator={"position": 2}))  # Not 4 with a reset.
  shutil.rmtree(tmp_path / "checkpoints" / "2" / "data")
  for _ in range(2):
    with pytest.raises(checkpoint_lib.CheckpointError, match="--start_over"):
      resume()
  restored, step, data = resume(start_over=True)
  assert (step, data, float(restored["params"][0])) == (0, {}, 0.0)
  assert sorted(os.listdir(tmp_path / "checkpoints.damaged" / "1")) == ["2.corrupt", "4.corrupt"]
