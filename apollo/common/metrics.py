"""Metrics for every trainer: JSON lines + TensorBoard, progress with throughput and ETA.

One writer, on process 0 only. Each call to `MetricsWriter.write` appends one JSON
object per line to `<workdir>/metrics.jsonl` ({"step": ..., "split": ..., name:
value, ...}) and the same scalars to TensorBoard event files under
`<workdir>/tensorboard` (tensorboardX, no TensorFlow needed).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; training stops instead of saving garbage."""


def check_finite(metrics: Mapping[str, float], step: int, keys=("loss",)) -> None:
  """Raises NonFiniteLossError naming the step and the metric."""
  for key in keys:
    if key in metrics and not math.isfinite(float(metrics[key])):
      raise NonFiniteLossError(
        f"{key} is {metrics[key]} at step {step}; stopping. The last checkpoint "
        "before this step is intact: lower the learning rate or check the data, then resume."
      )


class MetricsWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; a no-op on other processes."""

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported here: heavy, and optional.

      self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", value, int(step))

  def drop_after(self, step: int) -> int:
    """Removes the rows of steps after `step` (and a half-written last line).

    A job resumed from the checkpoint of `step` redoes the later steps; without
    this their rows would be in metrics.jsonl twice. The file is rewritten
    atomically. TensorBoard keeps its events (it shows the redone steps' values
    as the latest). Returns the number of rows removed.
    """
    if not self.enabled:
      return 0
    self._file.close()
    kept, dropped = [], 0
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a crash.
          dropped += 1
          continue
        if row["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
        else:
          dropped += 1
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    return dropped

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str | os.PathLike, split: str | None = None) -> list[dict]:
  """All rows of `<workdir>/metrics.jsonl` (optionally of one split)."""
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


class Progress:
  """Throughput and ETA of a loop, logged every `every` steps.

  Example line: `step 120/1000 (12.0%) | loss 3.412 | 5,310 tokens/s | ETA 0:02:45`.
  """

  def __init__(self, total_steps: int, start_step: int = 0, unit: str = "tokens", every: int = 10):
    self.total, self.unit, self.every = total_steps, unit, every
    self._t0, self._step0, self._units = time.perf_counter(), start_step, 0.0

  def update(self, step: int, units: float, scalars: Mapping[str, float] = ()) -> str | None:
    """Counts `units` done by `step`; returns (and logs) the line when due."""
    self._units += units
    if step % self.every and step != self.total:
      return None
    elapsed = max(time.perf_counter() - self._t0, 1e-9)
    rate = self._units / elapsed
    steps_done = max(step - self._step0, 1)
    eta = elapsed / steps_done * (self.total - step)
    parts = [f"step {step}/{self.total} ({100 * step / self.total:.1f}%)"]
    parts += [f"{k} {float(v):.4g}" for k, v in dict(scalars).items()]
    parts += [f"{rate:,.0f} {self.unit}/s", f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
    line = " | ".join(parts)
    logging.info(line)
    return line

  @property
  def rate(self) -> float:
    return self._units / max(time.perf_counter() - self._t0, 1e-9)
