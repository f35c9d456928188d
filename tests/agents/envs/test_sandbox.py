"""The workspace sandbox: each probe that once got out of a workspace, kept working.

The tests reproduce the escapes found by probing `WorkspaceEnv` when its commands ran
as plain `bash -c` in a directory, and each failed on that code; the last ones guard
the sandbox's own mechanics (a command outlives the thread that started it; the env
reports which sandbox it has). Tests that need bubblewrap skip, saying why, where it
cannot run. Nothing here is unbounded: the fork test spawns at most 10,000 sleeping
children, is stopped at a limit of 32, and every command has a short timeout.
"""

import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from apollo.agents import env as env_lib
from apollo.agents.envs import sandbox as sandbox_lib
from apollo.agents.envs import workspace as workspace_env
from tests.agents.helpers import wait_for

REASON = sandbox_lib.unavailable_reason()
requires_bwrap = pytest.mark.skipif(REASON is not None, reason=f"no sandbox here: {REASON}")
# The Python the sandbox offers to commands (the system one under /usr, if any).
SANDBOX_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin")
requires_python = pytest.mark.skipif(
  SANDBOX_PYTHON is None, reason="no python3 under /usr for sandboxed commands"
)


def _call(env, tool, **arguments) -> str:
  return env.step_or_error(env_lib.Action(tool, arguments)).observation


def _marker() -> str:
  """A `sleep` duration no other process on the machine uses: the test's fingerprint."""
  return f"4545.{uuid.uuid4().int % 10**9}"


def _alive(marker: str) -> list[int]:
  """Processes whose command line contains `marker` (zombies excluded)."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
      with open(f"/proc/{pid}/stat", "rb") as f:
        state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
      continue
    if marker.encode() in cmdline and state != b"Z":
      found.append(int(pid))
  return found


def _make(tmp_path, **options) -> workspace_env.WorkspaceEnv:
  env = workspace_env.WorkspaceEnv(root=os.path.join(tmp_path, "ws"), **options)
  env.reset(0)
  return env


@pytest.fixture
def ws(tmp_path):
  env = _make(tmp_path, command_timeout_s=30)
  yield env
  env.close()


@requires_bwrap
def test_commands_write_only_the_workspace_and_read_no_host_files(ws, tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir(mode=0o777)
  outside.chmod(0o777)  # writable by anyone: only the sandbox can stop the write
  secret = tmp_path / "secret.txt"
  secret.write_text("service-secret-42\n")
  secret.chmod(0o644)
  host_tmp = f"/tmp/apollo-sandbox-test-{uuid.uuid4().hex}"
  system_file = f"/usr/apollo-sandbox-test-{uuid.uuid4().hex}"
  out = _call(
    ws,
    "run_command",
    command=f"touch {outside}/x; touch {host_tmp}; touch {system_file}; cat {secret}; "
    "cat /etc/passwd; ls /root; ls /home; cat /etc/shadow; echo ok > inside.txt",
    wait_s=10,
  )
  assert not (outside / "x").exists() and not os.path.exists(host_tmp)
  assert not os.path.exists(system_file)
  assert "service-secret-42" not in out
  assert ws.root and os.path.exists(os.path.join(ws.root, "inside.txt"))
  with open("/etc/passwd", encoding="utf-8") as f:
    host_users = {line.split(":")[0] for line in f if ":" in line}
  for user in host_users - {"root", "nobody", "agent"}:
    assert f"\n{user}:" not in f"\n{out}", user
  assert "No such file or directory" in out  # /root and /home do not exist in there


@requires_bwrap
def test_commands_do_not_see_the_service_environment(tmp_path, monkeypatch):
  token = f"tok-{uuid.uuid4().hex}"
  monkeypatch.setenv("APOLLO_TOKEN", token)
  monkeypatch.setenv("OPENAI_API_KEY", token)
  env = _make(tmp_path)
  try:
    out = _call(env, "run_command", command="env; echo HOME=$HOME", wait_s=10)
  finally:
    env.close()
  assert token not in out and "APOLLO_TOKEN" not in out and "OPENAI_API_KEY" not in out
  assert f"HOME={env.root}" in out and "PATH=" in out


@requires_bwrap
def test_commands_cannot_reach_a_service_on_localhost(ws):
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    out = _call(
      ws,
      "run_command",
      command=f"(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo CONNECTED "
      "|| echo BLOCKED",
      wait_s=10,
    )
    listener.settimeout(0.3)
    with pytest.raises(TimeoutError):
      listener.accept()
  assert "BLOCKED" in out and "CONNECTED" not in out


@requires_bwrap
@requires_python
def test_a_fork_bomb_stops_at_the_process_limit(tmp_path):
  marker = uuid.uuid4().hex
  script = (
    f"import os, time  # {marker}\n"
    "n = 0\n"
    "for _ in range(10000):  # bounded: at worst 10,000 sleeping children\n"
    "  try:\n"
    "    pid = os.fork()\n"
    "  except OSError as e:\n"
    "    print('stopped at', n, e.errno, flush=True)\n"
    "    break\n"
    "  if pid == 0:\n"
    "    time.sleep(20)\n"
    "    os._exit(0)\n"
    "  n += 1\n"
    "time.sleep(20)\n"
  )
  env = _make(tmp_path, max_processes=32, command_timeout_s=15)
  try:
    _call(env, "write_file", path=f"bomb_{marker}.py", content=script)
    out = _call(env, "run_command", command=f"python3 bomb_{marker}.py", session="b", wait_s=0)
    out += wait_for(
      lambda: (o := _call(env, "read_output", session="b")) and "stopped at" in o and o,
      timeout=8,
    )
    spawned = int(out.split("stopped at")[1].split()[0])
    assert spawned < 32
    assert 0 < len(_alive(marker)) <= 32 + 2  # + bwrap and the sandbox's PID 1
    assert "killed session b" in _call(env, "kill_session", session="b")
    wait_for(lambda: not _alive(marker), timeout=5)
  finally:
    env.close()


@requires_bwrap
def test_kill_session_close_and_parent_exit_leave_no_process(ws):
  background, detached, orphan = _marker(), _marker(), _marker()
  # `cmd &` as the whole command: the session exits at once, the job ran on.
  _call(ws, "run_command", command=f"sleep {background} &", session="bg", wait_s=0.5)
  _call(ws, "kill_session", session="bg")
  wait_for(lambda: not _alive(background), timeout=3)
  # An orphan: its parent exited; nobody killed anything.
  out = _call(ws, "run_command", command=f"(sleep {orphan} &); echo parent-done", wait_s=5)
  assert "parent-done" in out
  wait_for(lambda: not _alive(orphan), timeout=3)
  # A new session (setsid) is no way out either; close() ends everything.
  _call(ws, "run_command", command=f"setsid sleep {detached} & sleep 30", session="s", wait_s=0)
  wait_for(lambda: _alive(detached), timeout=5)
  ws.close()
  wait_for(lambda: not _alive(detached), timeout=3)


@requires_bwrap
def test_the_watchdog_kills_an_endless_command_while_it_runs(tmp_path):
  env = _make(tmp_path, command_timeout_s=1.0)
  marker = _marker()
  try:
    _call(env, "run_command", command=f"sleep {marker}", session="forever", wait_s=0)
    wait_for(lambda: _alive(marker), timeout=5)
    began = time.monotonic()
    wait_for(lambda: not _alive(marker), timeout=5)  # no further tool call needed
    assert time.monotonic() - began < 4
    assert "command timeout" in _call(env, "is_idle", session="forever")
  finally:
    env.close()


@requires_bwrap
def test_a_command_outlives_the_thread_that_started_it(ws):
  marker = _marker()
  thread = threading.Thread(
    target=_call, args=(ws, "run_command"), kwargs={"command": f"sleep {marker}", "wait_s": 0}
  )
  thread.start()
  thread.join()
  time.sleep(0.3)
  assert _alive(marker) and "idle=False" in _call(ws, "is_idle", session="main")


@requires_bwrap
@requires_python
def test_memory_file_size_and_cpu_limits(tmp_path):
  env = _make(tmp_path, max_memory_mb=256, max_file_mb=1, max_cpu_s=1, command_timeout_s=20)
  try:
    out = _call(env, "run_command", command="python3 -c 'bytearray(1 << 30)'", wait_s=10)
    assert "MemoryError" in out
    out = _call(env, "run_command", command="head -c 3M /dev/zero > big; stat -c %s big", wait_s=10)
    assert out.strip().splitlines()[-1] == str(1 << 20)
    began = time.monotonic()
    out = _call(env, "run_command", command="while :; do :; done", wait_s=10)
    assert "exit code" in out and time.monotonic() - began < 8
  finally:
    env.close()


@requires_bwrap
def test_view_file_refuses_fifos_and_huge_files_without_hanging(ws):
  _call(ws, "run_command", command="mkfifo pipe; truncate -s 1G big.txt", wait_s=10)
  fifo = os.path.join(ws.root, "pipe")
  results = {}
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  thread = threading.Thread(
    target=lambda: results.update(
      fifo=_call(ws, "view_file", path="pipe"),
      fifo_write=_call(ws, "write_file", path="pipe", content="x"),
      big=_call(ws, "view_file", path="big.txt"),
      big_edit=_call(ws, "edit_file", path="big.txt", old="a", new="b"),
    ),
    daemon=True,
  )
  thread.start()
  thread.join(timeout=5)
  if thread.is_alive():  # before the fix: opening the FIFO blocked; unblock it
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    pytest.fail("a file tool hung on a FIFO")
  assert results["fifo"].startswith("ERROR") and "regular file" in results["fifo"]
  assert results["fifo_write"].startswith("ERROR")
  assert results["big"].startswith("ERROR") and "larger than" in results["big"]
  assert results["big_edit"].startswith("ERROR")
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB


@requires_bwrap
def test_write_file_racing_a_symlink_swap_stays_inside(ws, tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir()
  os.mkdir(os.path.join(ws.root, "real"))
  # A process keeps exchanging (atomically) the directory `real` and a link outside.
  os.symlink(outside, os.path.join(ws.root, "link"))
  swapper = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import ctypes, os, sys, time\n"
      "renameat2 = ctypes.CDLL(None, use_errno=True).renameat2\n"
      "os.chdir(sys.argv[1])\n"
      "end = time.monotonic() + 3\n"
      "while time.monotonic() < end:  # -100: AT_FDCWD, 2: RENAME_EXCHANGE\n"
      "  if renameat2(-100, b'real', -100, b'link', 2) != 0:\n"
      "    sys.exit('renameat2 failed')\n",
      ws.root,
    ]
  )
  try:
    wait_for(lambda: os.path.islink(os.path.join(ws.root, "real")), timeout=5)
    results, deadline = [], time.monotonic() + 2.5
    while time.monotonic() < deadline and not (
      len(results) >= 2000 and len({r.startswith("written") for r in results}) == 2
    ):
      results.append(_call(ws, "write_file", path="real/x", content="escaped"))
  finally:
    swapper.kill()
    swapper.wait()
  assert swapper.returncode == -9, "the swapper stopped early"
  assert not (outside / "x").exists()
  assert any(r.startswith("written") for r in results), set(results)
  assert any("outside the working directory" in r for r in results)


def _linked_root(tmp_path):
  real = tmp_path / "real"
  real.mkdir()
  os.symlink(real, tmp_path / "link")
  return os.path.join(tmp_path, "link", "ws")


@requires_bwrap
def test_a_root_whose_path_has_a_symlink_works(tmp_path):
  root = _linked_root(tmp_path)
  env = workspace_env.WorkspaceEnv(root=root)
  env.reset(0)
  try:
    assert _call(env, "write_file", path="a.txt", content="alpha\n").startswith("written")
    assert "alpha" in _call(env, "view_file", path="a.txt")
    assert "alpha" in _call(env, "view_file", path=os.path.join(root, "a.txt"))
    assert _call(env, "edit_file", path="a.txt", old="alpha", new="beta") == "edited a.txt."
    assert "beta" in _call(env, "run_command", command="cat a.txt", wait_s=10)
  finally:
    env.close()


@requires_bwrap
def test_symlinks_are_followed_inside_the_workspace_only(ws):
  _call(
    ws,
    "run_command",
    command="ln -s data.csv alias.csv; ln -s /etc/passwd pw; "
    "ln -s .. up; mkdir sub; ln -s ../data.csv sub/back",
    wait_s=10,
  )
  assert "value" in _call(ws, "view_file", path="alias.csv")
  assert "value" in _call(ws, "view_file", path="sub/back")
  assert _call(ws, "view_file", path="pw").startswith("ERROR")
  assert _call(ws, "view_file", path="up/ws/data.csv").startswith("ERROR")
  assert _call(ws, "write_file", path="up/evil", content="x").startswith("ERROR")
  assert _call(ws, "view_file", path="../ws/data.csv").startswith("ERROR")


def test_without_bubblewrap_the_workspace_refuses_to_start(tmp_path, monkeypatch):
  monkeypatch.setattr(sandbox_lib, "BWRAP", str(tmp_path / "no-bwrap"))
  with pytest.raises(sandbox_lib.SandboxUnavailable, match="bubblewrap.*unsafe_no_sandbox"):
    workspace_env.WorkspaceEnv(root=os.path.join(tmp_path, "ws"))
  warnings = []
  monkeypatch.setattr(workspace_env.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  env = workspace_env.WorkspaceEnv(root=os.path.join(tmp_path, "ws"), unsafe_no_sandbox=True)
  env.reset(0)
  try:
    assert env.describe()["sandbox"] == "NONE (unsafe)" == env.snapshot()["sandbox"]
    assert len(warnings) == 1 and "UNSAFE" in warnings[0] and "no-bwrap" in warnings[0]
    assert "exit code 0" in _call(env, "run_command", command="echo hi", wait_s=10)
  finally:
    env.close()


@requires_bwrap
def test_describe_names_the_sandbox_and_its_limits(ws):
  info = ws.describe()
  assert info["sandbox"] == "bubblewrap" == ws.snapshot()["sandbox"]
  assert info["limits"]["max_processes"] == sandbox_lib.Limits().max_processes
