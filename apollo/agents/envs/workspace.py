"""A real workspace environment: shell sessions, files, sleep and submit.

Everything happens inside a per-episode working directory (`root`). Tools:

- `run_command(command, session="main", wait_s=5)`: starts `bash -c command` in a
  named background session, inside a fresh sandbox (`apollo.agents.envs.sandbox`:
  bubblewrap; cwd = root) and waits up to `wait_s` seconds for it; returns the output
  so far and whether it is still running. Long jobs keep running in the background
  while the agent does other things; what a command leaves behind (`cmd &`, `setsid`,
  orphans) ends when the command ends, so a long job gets a session of its own.
- `read_output(session, max_chars)`: output produced since the last read.
- `is_idle(session)`: whether the session's command has exited (and its exit code).
- `kill_session(session)`: kills every process the session's command started (its
  sandbox's PID namespace: background jobs, `setsid` children and orphans included).
- `view_file(path, start_line, end_line)`, `write_file(path, content)`,
  `edit_file(path, old, new)` (exactly one occurrence of `old` is replaced).
- `sleep(seconds)`: waits (at most 300 s per call).
- `submit(answer)`: ends the episode; the task's checker scores the answer 0-100.

Limits: file tools reach only `root` (symbolic links are followed only while they
stay inside it; FIFOs and devices are refused; files over `max_file_bytes` are
refused by `view_file` and `edit_file`); each session keeps at most
`max_output_bytes` of output (older output is dropped and marked); a watchdog kills a
command `command_timeout_s` after it started, while it runs; the episode ends after
`time_budget_s` of wall clock. Commands see only the workspace, a private /tmp and a
read-only system, with no network, no service environment and the process, memory,
CPU-time and file-size limits of `sandbox.Limits` (`max_processes`, ...). Where
bubblewrap cannot run, the environment refuses to start, unless the operator passes
`unsafe_no_sandbox=True`: then commands run unconfined, a warning is logged, and
`describe()["sandbox"]` and every snapshot say "NONE (unsafe)" (else "bubblewrap").

`interrupt()` (the API's "interrupt command") cuts short the running tool call: a
`sleep` ends, and a `run_command` still being waited on gets SIGINT, like Ctrl-C.

Resume: files persist in `root`, and the clock, the read positions and the
submission are in the snapshot; background processes do not survive a crash of
the service (the sandboxes die with it), and the agent is told that their sessions
were lost.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from apollo.agents import env as env_lib
from apollo.agents.envs import sandbox as sandbox_lib

MAX_SLEEP_S = 300.0


class _Session:
  """One background shell command (in its own sandbox) and its captured output."""

  def __init__(
    self,
    command: str,
    runner: sandbox_lib.Sandbox | sandbox_lib.Unconfined,
    max_bytes: int,
    timeout_s: float,
  ):
    self.command = command
    self.process = runner.start(command)
    self.proc = self.process.proc
    self.timeout_s = timeout_s
    self.timed_out = False
    self.max_bytes = max_bytes
    self.buffer = bytearray()
    self.dropped = 0
    self.read_pos = 0
    self.started = time.monotonic()
    self.lock = threading.Lock()
    self.reader = threading.Thread(target=self._pump, daemon=True)
    self.reader.start()
    self.watchdog = threading.Thread(target=self._watch, daemon=True)
    self.watchdog.start()

  def _watch(self) -> None:
    """Kills the command once it has run for `timeout_s`, whatever the agent does."""
    try:
      self.proc.wait(timeout=self.timeout_s)
    except subprocess.TimeoutExpired:
      self.timed_out = True
      self.process.kill()

  def _pump(self) -> None:
    for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
      with self.lock:
        self.buffer += chunk
        if len(self.buffer) > self.max_bytes:
          cut = len(self.buffer) - self.max_bytes
          del self.buffer[:cut]
          self.dropped += cut
          self.read_pos = max(0, self.read_pos - cut)

  def interrupt(self) -> None:
    """Ctrl-C: SIGINT to every process of the command."""
    self.process.interrupt()

  def kill(self) -> None:
    """Kills every process of the command and waits for them."""
    self.process.kill()

  def release(self) -> None:
    self.process.release()

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
    max_file_bytes: int = 8 << 20,
    max_processes: int = sandbox_lib.Limits.max_processes,
    max_memory_mb: int = sandbox_lib.Limits.max_memory_mb,
    max_cpu_s: int = sandbox_lib.Limits.max_cpu_s,
    max_file_mb: int = sandbox_lib.Limits.max_file_mb,
    max_tmp_mb: int = sandbox_lib.Limits.max_tmp_mb,
    unsafe_no_sandbox: bool = False,
  ):
    os.makedirs(root, exist_ok=True)
    # The real path: a root reached through a symbolic link works like any other, and
    # the agent may name files by either absolute path.
    self.aliases = (os.path.abspath(root),)
    self.root = os.path.realpath(root)
    self.limits = sandbox_lib.Limits(
      max_processes=max_processes,
      max_memory_mb=max_memory_mb,
      max_cpu_s=max_cpu_s,
      max_file_mb=max_file_mb,
      max_tmp_mb=max_tmp_mb,
    )
    # Raises SandboxUnavailable (the session does not start) unless the operator opted out.
    self.sandbox = sandbox_lib.make(self.root, self.limits, unsafe_no_sandbox)
    if not isinstance(self.sandbox, sandbox_lib.Sandbox):
      logging.warning(
        "UNSAFE: workspace %s runs the agent's commands WITHOUT A SANDBOX "
        "(unsafe_no_sandbox=True): they can read and write every file this service can, "
        "reach the network, see its environment and outlive their sessions. Reason the "
        "sandbox is unavailable: %s",
        self.root,
        sandbox_lib.unavailable_reason(),
      )
    self.max_file_bytes = max_file_bytes
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

  def describe(self) -> dict[str, Any]:
    """What confines this workspace, for consoles: `sandbox` is "bubblewrap" or
    "NONE (unsafe)"."""
    return {
      "sandbox": self.sandbox.name,
      "root": self.root,
      "limits": dataclasses.asdict(self.limits),
      "command_timeout_s": self.command_timeout_s,
      "max_file_bytes": self.max_file_bytes,
    }

  def reset(self, seed: int) -> str:
    self.seed = seed
    self.task = make_task(seed)
    marker = os.path.join(self.root, ".apollo_task_seed")
    if not os.path.lexists(marker):  # a resumed episode keeps the agent's edits
      for name, content in self.task["files"].items():
        self._write(name, content)
      self._write(".apollo_task_seed", str(seed))
    self.started = time.monotonic()
    self.elapsed_before = 0.0
    self.submission = None
    confined = (
      "Commands run in a sandbox: only this directory and a private /tmp are writable. "
      if isinstance(self.sandbox, sandbox_lib.Sandbox)
      else ""
    )
    return (
      f"TASK: {self.task['description']}\nYou work in {self.root} (your current "
      f"directory). Files: {', '.join(sorted(self._listing()))}. No network access. "
      f"{confined}Time budget: {self.time_budget_s / 60:.0f} minutes. Submit with the "
      "submit tool."
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
      self._waiting_on.interrupt()
    self._interrupt.set()
    return True

  def close(self) -> None:
    for session in self.sessions.values():
      session.kill()
      session.release()
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
      "sandbox": self.sandbox.name,
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    self.elapsed_before = float(state["elapsed_s"])
    self.started = time.monotonic()
    self.submission = state["submission"]
    self.lost = set(state["sessions"]) - set(self.sessions)

  # ------------------------------------------------------------------ helpers
  def _open(self, path: str, flags: int, create: bool = False) -> int:
    """A descriptor of the regular file `path` inside root (see `sandbox.open_in_root`)."""
    return sandbox_lib.open_in_root(
      self.root, path, flags, create=create, owner=self.sandbox.owner, aliases=self.aliases
    )

  def _write(self, path: str, content: str) -> None:
    with os.fdopen(self._open(path, os.O_WRONLY | os.O_TRUNC, create=True), "wb") as f:
      f.write(content.encode("utf-8"))

  def _read(self, f: Any, errors: str = "strict") -> str | None:
    """The text of the open file `f`, or None when it is over `max_file_bytes`."""
    if os.fstat(f.fileno()).st_size > self.max_file_bytes:
      return None
    data = f.read(self.max_file_bytes + 1)  # never more, even if the file grows meanwhile
    return None if len(data) > self.max_file_bytes else data.decode("utf-8", errors=errors)

  def _too_big(self, path: str) -> str:
    return (
      f"ERROR: {path} is larger than {self.max_file_bytes} bytes; look at parts of it "
      "with run_command (head, sed -n, grep)."
    )

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

  def _status(self, name: str, session: _Session) -> str:
    code = session.proc.poll()
    if code is None:
      return f"session {name}: running for {time.monotonic() - session.started:.1f}s"
    if session.timed_out:
      return (
        f"session {name}: killed after the command timeout of {session.timeout_s:g}s "
        f"(exit code {code})"
      )
    return f"session {name}: exited with exit code {code}"

  # ------------------------------------------------------------------ tools
  def _tool_run_command(self, command: str, session: str = "main", wait_s: float = 5.0) -> str:
    old = self.sessions.get(session)
    if old is not None and old.proc.poll() is None:
      return (
        f"ERROR: session {session!r} is still running {old.command!r}; read its "
        "output, wait, or kill it first (or use another session name)."
      )
    if old is None and len(self.sessions) >= self.max_sessions:
      return f"ERROR: at most {self.max_sessions} sessions; reuse or kill one."
    self.lost.discard(session)
    if old is not None:
      old.release()
    proc = _Session(command, self.sandbox, self.max_output_bytes, self.command_timeout_s)
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
    s.kill()
    return f"killed session {session}."

  def _tool_view_file(self, path: str, start_line: int = 1, end_line: int = 200) -> str:
    with os.fdopen(self._open(path, os.O_RDONLY), "rb") as f:
      text = self._read(f, errors="replace")
    if text is None:
      return self._too_big(path)
    lines = text.splitlines()
    chosen = lines[start_line - 1 : end_line]
    numbered = "\n".join(f"{i:5d}  {line}" for i, line in enumerate(chosen, start=start_line))
    return f"{path} ({len(lines)} lines)\n{numbered}"

  def _tool_write_file(self, path: str, content: str) -> str:
    self._write(path, content)
    return f"written {path} ({len(content)} characters)."

  def _tool_edit_file(self, path: str, old: str, new: str) -> str:
    # One descriptor from reading to writing: the file edited is the file read.
    with os.fdopen(self._open(path, os.O_RDWR), "r+b") as f:
      text = self._read(f)
      if text is None:
        return self._too_big(path)
      count = text.count(old)
      if count != 1:
        return f"ERROR: `old` occurs {count} times in {path}; it must occur exactly once."
      f.seek(0)
      f.truncate()
      f.write(text.replace(old, new, 1).encode("utf-8"))
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
    "Run a bash command in a background session and wait up to wait_s seconds for it. "
    "Processes it leaves behind (`cmd &`) end when it ends: give a long job its own session.",
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
