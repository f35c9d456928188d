"""Checkpoints for every trainer: one small wrapper over orbax's CheckpointManager.

A checkpoint at step N holds two items:
- `state`: any pytree of arrays (params, optimizer state, step, rng), saved with
  `StandardSave` and restored with `StandardRestore` into an abstract target, so
  arrays come back directly with the target's shardings;
- `data`: a JSON-able dict, e.g. the input pipeline's iterator state, so that a
  resumed run sees exactly the data it would have seen.

Safety:
- Saves are asynchronous and atomic: orbax writes into a temporary directory and
  renames it when complete, so a crash during a save never leaves a checkpoint
  that looks complete. Leftover temporary directories are cleaned at start-up.
- A checkpoint that fails to restore (damaged files) is reported with its path,
  moved aside to `<step>.corrupt` (never deleted), and the previous one is used.
  If checkpoints exist but none restores, that is an error, never a silent fresh
  start.

See orbax's checkpointing guide (orbax.readthedocs.io) for the manager and its args.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings stay."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """Called by the entry points: keeps absl's log readable during checkpointing."""
  handler = logging.get_absl_handler()
  for h in (handler, handler.python_handler):
    h.addFilter(_QuietOrbax())


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  data: dict | None


class Checkpointer:
  """Saves and restores (state, data) under `directory`, keeping the last N.

  Example:
    >>> ckpt = Checkpointer(workdir / 'checkpoints', max_to_keep=3)
    >>> restored = ckpt.restore_latest(abstract_state)   # None on a fresh workdir
    >>> ckpt.save(step, state, data={'iterator': it.get_state()})
    >>> ckpt.close()                                      # waits for async saves
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    # Handlers named up front, so that metadata can be read before any restore.
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler())
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata (shapes, dtypes) at `step`; reads no arrays."""
    return self._manager.item_metadata(step)["state"].tree

  def save(self, step: int, state: Any, data: dict | None = None, force: bool = False) -> bool:
    """Starts saving `state` (and `data`) as step `step`; returns whether it saves."""
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a final save right after a periodic one).
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      items["data"] = ocp.args.JsonSave(data)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any) -> Restored:
    """Restores step `step` into `abstract_state` (a pytree of ShapeDtypeStructs)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    step_dir = os.path.join(self.directory, str(step))
    has_data = os.path.isdir(os.path.join(step_dir, "data"))
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
      raise CheckpointError(f"checkpoint {step_dir} could not be restored: {e}") from e
    return Restored(step=step, state=out["state"], data=out["data"] if has_data else None)

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """The newest checkpoint that restores; None only if there is none at all.

    A damaged checkpoint is logged, moved aside to `<step>.corrupt`, and the one
    before it is tried.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        return self.restore(step, abstract_state)
      except CheckpointError as e:
        logging.error("%s; falling back to the previous checkpoint.", e)
        errors.append(str(e))
        self._set_aside(step)
    if errors:
      raise CheckpointError(
        f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors)
      )
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.corrupt"
    suffix = 1
    while os.path.exists(dst):
      dst, suffix = f"{src}.corrupt{suffix}", suffix + 1
    os.rename(src, dst)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM (and optionally SIGINT) into a flag the training loop polls.

  Cloud schedulers send SIGTERM before preempting a job; the loop sees
  `guard.requested`, saves a checkpoint and exits cleanly instead of dying
  mid-step. Handlers are restored on exit.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = signals
    self._event = threading.Event()
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
