"""A real workspace environment: shell sessions, files, sleep and submit.

Everything happens inside a per-episode working directory (`root`). Tools:

- `run_command(command, session="main", wait_s=5)`: starts `bash -c command` in a
  named background session (own process group, cwd = root) and waits up to `wait_s`
  seconds for it; returns the output so far and whether it is still running. Long
  jobs keep running in the background while the agent does other things.
- `read_output(session, max_chars)`: output produced since the last read.
- `is_idle(session)`: whether the session's command has exited (and its exit code).
- `kill_session(session)`: kills the session's whole process group.
- `view_file(path, start_line, end_line)`, `write_file(path, content)`,
  `edit_file(path, old, new)` (exactly one occurrence of `old` is replaced).
- `sleep(seconds)`: waits (at most 300 s per call).
- `submit(answer)`: ends the episode; the task's checker scores the answer 0-100.

Limits: paths must stay inside `root`; each session keeps at most
`max_output_bytes` of output (older output is dropped and marked); commands are
killed after `command_timeout_s`; the episode ends after `time_budget_s` of wall
clock. No network access is assumed or provided: tasks are solvable offline.

`interrupt()` (the API's "interrupt command") cuts short the running tool call: a
`sleep` ends, and a `run_command` still being waited on gets SIGINT, like Ctrl-C.

Resume: files persist in `root`, and the clock, the read positions and the
submission are in the snapshot; background processes do not survive a crash of
the service, and the agent is told that their sessions were lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from apollo.agents import env as env_lib

MAX_SLEEP_S = 300.0


class _Session:
  """One background shell command and its captured output."""

  def __init__(self, command: str, cwd: str, max_bytes: int):
    self.command = command
    self.proc = subprocess.Popen(
      ["bash", "-c", command],
      cwd=cwd,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    self.max_bytes = max_bytes
    self.buffer = bytearray()
    self.dropped = 0
    self.read_pos = 0
    self.started = time.monotonic()
    self.lock = threading.Lock()
    self.reader = threading.Thread(target=self._pump, daemon=True)
    self.reader.start()

  def _pump(self) -> None:
    for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
      with self.lock:
        self.buffer += chunk
        if len(self.buffer) > self.max_bytes:
          cut = len(self.buffer) - self.max_bytes
          del self.buffer[:cut]
          self.dropped += cut
          self.read_pos = max(0, self.read_pos - cut)

  def signal(self, sig: int) -> None:
    try:
      os.killpg(self.proc.pid, sig)
    except ProcessLookupError:
      pass

  def new_output(self, max_chars: int) -> str:
    with self.lock:
      data = bytes(self.buffer[self.read_pos :])
      self.read_pos = len(self.buffer)
      note = f"[{self.dropped} earlier bytes dropped]\n" if self.dropped else ""
    text = data.decode(errors="replace")
    if len(text) > max_chars:
      text = f"[... {len(text) - max_chars} characters cut ...]\n" + text[-max_chars:]
    return note + text


def make_task(seed: int) -> dict[str, Any]:
  """The task of `seed`: description, expected answer and the files to create."""
  rng = random.Random(f"apollo-workspace-{seed}")
  if seed % 2 == 0:
    numbers = [rng.randint(-1000, 1000) for _ in range(rng.randint(200, 400))]
    return {
      "description": "data.csv has a header line and one integer per line. Compute "
      "the sum of all values and submit it as the answer.",
      "answer": str(sum(numbers)),
      "files": {"data.csv": "value\n" + "\n".join(map(str, numbers)) + "\n"},
    }
  values = [rng.randint(1, 100) for _ in range(rng.randint(20, 40))]
  return {
    "description": "stats.py should print the mean of the numbers in values.txt with "
    "three decimals, but it has a bug. Fix it, run it, and submit the "
    "printed mean.",
    "answer": f"{sum(values) / len(values):.3f}",
    "files": {
      "values.txt": " ".join(map(str, values)) + "\n",
      "stats.py": 'vals = [int(x) for x in open("values.txt").read().split()]\n'
      "mean = sum(vals) / (len(vals) - 1)  # off by one\n"
      'print(f"{mean:.3f}")\n',
    },
  }


class WorkspaceEnv(env_lib.Environment):
  """Shell sessions and files in a per-episode directory (see module docstring)."""

  name = "workspace"

  def __init__(
    self,
    root: str,
    time_budget_s: float = 3600.0,
    command_timeout_s: float = 600.0,
    max_output_bytes: int = 1 << 20,
    max_observation_chars: int = 8000,
    max_sessions: int = 8,
  ):
    self.root = os.path.abspath(root)
    self.time_budget_s = time_budget_s
    self.command_timeout_s = command_timeout_s
    self.max_output_bytes = max_output_bytes
    self.max_chars = max_observation_chars
    self.max_sessions = max_sessions
    self.sessions: dict[str, _Session] = {}
    self.lost: set[str] = set()
    self._interrupt = threading.Event()
    self._busy = threading.Event()
    self._waiting_on: _Session | None = None
    self.elapsed_before = 0.0
    self.started = time.monotonic()
    self.submission: str | None = None
    self.task: dict[str, Any] | None = None
    self.seed = 0

  # ------------------------------------------------------------------ interface
  def tools(self) -> Sequence[env_lib.ToolSpec]:
    return _TOOLS

  def reset(self, seed: int) -> str:
    self.seed = seed
    os.makedirs(self.root, exist_ok=True)
    self.task = make_task(seed)
    marker = os.path.join(self.root, ".apollo_task_seed")
    if not os.path.exists(marker):  # a resumed episode keeps the agent's edits
      for name, content in self.task["files"].items():
        with open(os.path.join(self.root, name), "w", encoding="utf-8") as f:
          f.write(content)
      with open(marker, "w", encoding="utf-8") as f:
        f.write(str(seed))
    self.started = time.monotonic()
    self.elapsed_before = 0.0
    self.submission = None
    return (
      f"TASK: {self.task['description']}\nYou work in {self.root} (your current "
      f"directory). Files: {', '.join(sorted(self._listing()))}. No network access. "
      f"Time budget: {self.time_budget_s / 60:.0f} minutes. Submit with the submit tool."
    )

  def _listing(self) -> list[str]:
    return [n for n in os.listdir(self.root) if not n.startswith(".")]

  def now_hours(self) -> float:
    return (self.elapsed_before + time.monotonic() - self.started) / 3600.0

  def step(self, action: env_lib.Action) -> env_lib.StepResult:
    if self.submission is not None:
      return env_lib.StepResult("ERROR: the episode is over.", done=True, info=self.result())
    obs = getattr(self, f"_tool_{action.tool}")(**action.arguments)
    if len(obs) > self.max_chars:
      obs = obs[: self.max_chars // 2] + "\n[... cut ...]\n" + obs[-self.max_chars // 2 :]
    done = self.submission is not None
    if not done and self.now_hours() * 3600 >= self.time_budget_s:
      self.submission = ""
      done = True
      obs += "\nTIME BUDGET EXHAUSTED: the episode is over."
    return env_lib.StepResult(
      obs,
      reward=self.result()["score"] if done else 0.0,
      done=done,
      info=self.result() if done else {},
    )

  def interrupt(self) -> bool:
    if not self._busy.is_set():
      return False
    if self._waiting_on is not None:
      self._waiting_on.signal(signal.SIGINT)
    self._interrupt.set()
    return True

  def close(self) -> None:
    for session in self.sessions.values():
      session.signal(signal.SIGKILL)
    self.sessions.clear()

  def result(self) -> dict[str, Any]:
    answer = (self.submission or "").strip()
    correct = self.task is not None and answer == self.task["answer"]
    return {
      "score": 100.0 if correct else 0.0,
      "success": correct,
      "submitted": self.submission is not None,
    }

  def snapshot(self) -> dict[str, Any]:
    return {
      "seed": self.seed,
      "elapsed_s": self.now_hours() * 3600,
      "submission": self.submission,
      "sessions": sorted(set(self.sessions) | self.lost),
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    self.elapsed_before = float(state["elapsed_s"])
    self.started = time.monotonic()
    self.submission = state["submission"]
    self.lost = set(state["sessions"]) - set(self.sessions)

  # ------------------------------------------------------------------ helpers
  def _path(self, path: str) -> str:
    full = os.path.realpath(os.path.join(self.root, path))
    if full != self.root and not full.startswith(self.root + os.sep):
      raise ValueError(f"path {path!r} is outside the working directory")
    return full

  def _session(self, name: str) -> _Session:
    if name in self.lost:
      raise KeyError(f"session {name!r} was lost when the service restarted; start it again")
    if name not in self.sessions:
      raise KeyError(f"no session {name!r}; sessions: {sorted(self.sessions) or 'none'}")
    return self.sessions[name]

  def _wait(self, seconds: float, session: _Session | None = None) -> bool:
    """Waits until `seconds` pass, the session exits, or an interrupt. True if interrupted."""
    self._interrupt.clear()
    self._waiting_on = session
    self._busy.set()
    try:
      deadline = time.monotonic() + seconds
      while time.monotonic() < deadline:
        if session is not None and session.proc.poll() is not None:
          return False
        if self._interrupt.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
          return True
      return False
    finally:
      self._busy.clear()
      self._waiting_on = None

  def _reap_timeouts(self) -> None:
    for session in self.sessions.values():
      if (
        session.proc.poll() is None and time.monotonic() - session.started > self.command_timeout_s
      ):
        session.signal(signal.SIGKILL)

  def _status(self, name: str, session: _Session) -> str:
    code = session.proc.poll()
    return (
      f"session {name}: running for {time.monotonic() - session.started:.1f}s"
      if code is None
      else f"session {name}: exited with exit code {code}"
    )

  # ------------------------------------------------------------------ tools
  def _tool_run_command(self, command: str, session: str = "main", wait_s: float = 5.0) -> str:
    self._reap_timeouts()
    old = self.sessions.get(session)
    if old is not None and old.proc.poll() is None:
      return (
        f"ERROR: session {session!r} is still running {old.command!r}; read its "
        "output, wait, or kill it first (or use another session name)."
      )
    if old is None and len(self.sessions) >= self.max_sessions:
      return f"ERROR: at most {self.max_sessions} sessions; reuse or kill one."
    self.lost.discard(session)
    proc = _Session(command, self.root, self.max_output_bytes)
    self.sessions[session] = proc
    interrupted = self._wait(wait_s, proc)
    if interrupted:
      try:  # give Ctrl-C a moment to take effect so the exit code can be reported
        proc.proc.wait(timeout=1.0)
      except subprocess.TimeoutExpired:
        pass
    if proc.proc.poll() is not None:
      proc.reader.join(timeout=1.0)  # collect the last output of a finished command
    out = proc.new_output(self.max_chars)
    head = "interrupted by the human (SIGINT sent). " if interrupted else ""
    return f"{head}{self._status(session, proc)}\n{out}".rstrip()

  def _tool_read_output(self, session: str = "main", max_chars: int = 4000) -> str:
    s = self._session(session)
    if s.proc.poll() is not None:
      s.reader.join(timeout=1.0)
    return f"{self._status(session, s)}\n{s.new_output(min(max_chars, self.max_chars))}".rstrip()

  def _tool_is_idle(self, session: str = "main") -> str:
    s = self._session(session)
    return f"idle={s.proc.poll() is not None}; {self._status(session, s)}"

  def _tool_kill_session(self, session: str) -> str:
    s = self._session(session)
    if s.proc.poll() is not None:
      return f"session {session} had already exited (exit code {s.proc.returncode})."
    s.signal(signal.SIGKILL)
    s.proc.wait(timeout=5)
    return f"killed session {session}."

  def _tool_view_file(self, path: str, start_line: int = 1, end_line: int = 200) -> str:
    with open(self._path(path), encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
    chosen = lines[start_line - 1 : end_line]
    numbered = "\n".join(f"{i:5d}  {line}" for i, line in enumerate(chosen, start=start_line))
    return f"{path} ({len(lines)} lines)\n{numbered}"

  def _tool_write_file(self, path: str, content: str) -> str:
    full = self._path(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
      f.write(content)
    return f"written {path} ({len(content)} characters)."

  def _tool_edit_file(self, path: str, old: str, new: str) -> str:
    full = self._path(path)
    with open(full, encoding="utf-8") as f:
      text = f.read()
    count = text.count(old)
    if count != 1:
      return f"ERROR: `old` occurs {count} times in {path}; it must occur exactly once."
    with open(full, "w", encoding="utf-8") as f:
      f.write(text.replace(old, new, 1))
    return f"edited {path}."

  def _tool_sleep(self, seconds: float) -> str:
    began = time.monotonic()
    interrupted = self._wait(seconds)
    took = time.monotonic() - began
    return (
      f"sleep interrupted by the human after {took:.1f}s." if interrupted else f"slept {took:.1f}s."
    )

  def _tool_submit(self, answer: str) -> str:
    self.submission = answer
    result = self.result()
    return f"submitted {answer!r}: score {result['score']:.0f}."


_SESSION = {"type": "string", "maxLength": 32}
_TOOLS = (
  env_lib.tool(
    "run_command",
    "Run a bash command in a background session and wait up to wait_s seconds for it.",
    {
      "command": {"type": "string", "maxLength": 10000},
      "session": _SESSION,
      "wait_s": {"type": "number", "minimum": 0, "maximum": 60},
    },
    ["command"],
  ),
  env_lib.tool(
    "read_output",
    "New output of a session since the last read.",
    {"session": _SESSION, "max_chars": {"type": "integer", "minimum": 1, "maximum": 100000}},
  ),
  env_lib.tool("is_idle", "Whether a session's command has exited.", {"session": _SESSION}),
  env_lib.tool("kill_session", "Kill a session's command.", {"session": _SESSION}, ["session"]),
  env_lib.tool(
    "view_file",
    "Show lines of a file.",
    {
      "path": {"type": "string", "maxLength": 500},
      "start_line": {"type": "integer", "minimum": 1},
      "end_line": {"type": "integer", "minimum": 1},
    },
    ["path"],
  ),
  env_lib.tool(
    "write_file",
    "Create or overwrite a file.",
    {
      "path": {"type": "string", "maxLength": 500},
      "content": {"type": "string", "maxLength": 200000},
    },
    ["path", "content"],
  ),
  env_lib.tool(
    "edit_file",
    "Replace the single occurrence of `old` with `new` in a file.",
    {
      "path": {"type": "string", "maxLength": 500},
      "old": {"type": "string"},
      "new": {"type": "string"},
    },
    ["path", "old", "new"],
  ),
  env_lib.tool(
    "sleep",
    f"Wait (at most {MAX_SLEEP_S:.0f} seconds).",
    {"seconds": {"type": "number", "minimum": 0, "maximum": MAX_SLEEP_S}},
    ["seconds"],
  ),
  env_lib.tool(
    "submit",
    "Submit the final answer; ends the episode.",
    {"answer": {"type": "string", "maxLength": 1000}},
    ["answer"],
  ),
)
