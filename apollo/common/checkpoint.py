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
- A checkpoint that fails to restore (damaged files, or no data state where the
  trainer needs one: resuming without it would not see the same data) is reported
  with its path, moved aside to `<step>.corrupt` (never deleted, the reason in
  its `RESTORE_ERROR.txt`), and the previous one is used.
- If checkpoints exist but none restores, that is an error, never a silent fresh
  start; and it stays one: every later run refuses the same way while the
  directory holds only set-aside checkpoints. `start_over=True` (the entry
  points' `--start_over`) moves them to `<directory>.damaged/<n>/` and starts
  from step 0.
- A failed restore leaves orbax's reads of the other arrays in flight; their
  callbacks into the closed event loop ("Event loop is closed") and their
  unretrieved errors are dropped instead of printing a traceback each: the one
  logged line per damaged checkpoint says what failed.

See orbax's checkpointing guide (orbax.readthedocs.io) for the manager and its args.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
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


ERROR_FILE = "RESTORE_ERROR.txt"  # Why a set-aside `<step>.corrupt` failed to restore.
_CORRUPT = ".corrupt"


def _is_closed_loop_callback(unraisable) -> bool:
  """An 'Event loop is closed' from asyncio's call_soon_threadsafe: a tensorstore read
  finishing after orbax gave up on a damaged checkpoint and closed its event loop."""
  exc = unraisable.exc_value
  if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
    return False
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is None or os.path.join("asyncio", "base_events.py") in tb.tb_frame.f_code.co_filename


class _QuietUnretrievedReads(std_logging.Filter):
  """Drops asyncio's 'Future/Task exception was never retrieved' for tensorstore reads:
  the reads of a damaged checkpoint that failed after orbax stopped waiting for them."""

  def filter(self, record) -> bool:
    if not str(record.msg).startswith(("Future exception was never", "Task exception was never")):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return "tensorstore" not in str(exc)


_quiet_lock = threading.Lock()
_quieted = False


def _quiet_failed_read_noise() -> None:
  """Installs (once) the two filters above, before any restore: the callbacks of a failed
  restore can fire while its exception is still on the way up. Anything else still
  reaches the previous unraisable hook and asyncio's log."""
  global _quieted
  with _quiet_lock:
    if _quieted:
      return
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_closed_loop_callback(unraisable):
        previous(unraisable)

    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(_QuietUnretrievedReads())
    _quieted = True


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

  def restore(self, step: int, abstract_state: Any, required_data: Sequence[str] = ()) -> Restored:
    """Restores step `step` into `abstract_state` (a pytree of ShapeDtypeStructs).

    Raises:
      CheckpointError: the files do not restore, or the saved data lacks a key of
        `required_data` (e.g. the data iterator's state a trainer resumes from).
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    step_dir = os.path.join(self.directory, str(step))
    has_data = os.path.isdir(os.path.join(step_dir, "data"))
    if required_data and not has_data:
      raise CheckpointError(
        f"checkpoint {step_dir} has no data state (needs {', '.join(required_data)}); "
        f"resuming from it would not see the same data"
      )
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    # If a read fails, orbax closes its event loop while the other reads are in flight.
    _quiet_failed_read_noise()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
      raise CheckpointError(f"checkpoint {step_dir} could not be restored: {e}") from e
    data = out["data"] if has_data else None
    missing = [k for k in required_data if not isinstance(data, dict) or k not in data]
    if missing:
      raise CheckpointError(
        f"checkpoint {step_dir} has no {', '.join(missing)} in its data state; resuming "
        f"from it would not see the same data"
      )
    return Restored(step=step, state=out["state"], data=data)

  def restore_latest(
    self, abstract_state: Any, required_data: Sequence[str] = (), start_over: bool = False
  ) -> Restored | None:
    """The newest checkpoint that restores; None only if there is none at all.

    A damaged checkpoint (see `restore`) is logged, moved aside to `<step>.corrupt`,
    and the one before it is tried. When none restores (now, or in an earlier run:
    only set-aside checkpoints are left), this raises, on every call, unless
    `start_over`: then the set-aside checkpoints move to `<directory>.damaged/<n>/`
    and this returns None (a fresh start).

    Raises:
      CheckpointError: no checkpoint restores, naming the directory and each damaged
        checkpoint with its reason.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        return self.restore(step, abstract_state, required_data)
      except CheckpointError as e:
        logging.error("%s; falling back to the previous checkpoint.", e)
        self._set_aside(step, str(e))
    damaged = self.damaged()
    if not damaged:
      return None
    if start_over:
      moved_to = self._move_damaged_aside(damaged)
      logging.warning(
        "start_over: no checkpoint in %s restores; moved %s to %s and starting from step 0.",
        self.directory,
        ", ".join(os.path.basename(d) for d in damaged),
        moved_to,
      )
      return None
    reasons = "\n".join(f"  {d}: {_read_reason(d)}" for d in damaged)
    raise CheckpointError(
      f"no checkpoint in {self.directory} could be restored; the damaged ones are kept, "
      f"moved aside:\n{reasons}\nTo train from step 0 in this workdir, rerun with "
      f"--start_over (start_over=True): they move to {self.directory}.damaged/, nothing is "
      f"deleted. Or use a new --workdir."
    )

  def damaged(self) -> list[str]:
    """The set-aside checkpoints (`<step>.corrupt*` directories), oldest step first."""
    if not os.path.isdir(self.directory):
      return []
    names = [n for n in os.listdir(self.directory) if _CORRUPT in n]
    names.sort(key=lambda n: (int(n.split(".")[0]) if n.split(".")[0].isdigit() else -1, n))
    return [os.path.join(self.directory, n) for n in names]

  def _set_aside(self, step: int, reason: str) -> None:
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    dst = f"{src}{_CORRUPT}"
    suffix = 1
    while os.path.exists(dst):
      dst, suffix = f"{src}{_CORRUPT}{suffix}", suffix + 1
    os.rename(src, dst)
    try:
      with open(os.path.join(dst, ERROR_FILE), "w", encoding="utf-8") as f:
        f.write(reason + "\n")
    except OSError as e:  # The reason is also in the log.
      logging.warning("Could not write %s in %s: %s", ERROR_FILE, dst, e)
    self._manager.reload()

  def _move_damaged_aside(self, damaged: Sequence[str]) -> str:
    """Moves the set-aside checkpoints to a new `<directory>.damaged/<n>/`; returns it."""
    root = f"{self.directory}.damaged"
    n = 1
    while os.path.exists(os.path.join(root, str(n))):
      n += 1
    dst = os.path.join(root, str(n))
    if jax.process_index() == 0:
      os.makedirs(dst)
      for src in damaged:
        os.rename(src, os.path.join(dst, os.path.basename(src)))
    return dst

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _read_reason(path: str) -> str:
  """The first line of a set-aside checkpoint's RESTORE_ERROR.txt, shortened."""
  try:
    with open(os.path.join(path, ERROR_FILE), encoding="utf-8") as f:
      reason = f.readline().strip()
  except OSError:
    return "damaged (no reason recorded)"
  return reason if len(reason) <= 400 else reason[:400] + "..."


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
