"""The real workspace environment: background sessions, files, limits, interrupt."""

import json
import os
import threading

import pytest

from apollo.agents import agent, storage
from apollo.agents import env as env_lib
from apollo.agents.envs import sandbox as sandbox_lib
from apollo.agents.envs import workspace as workspace_env
from tests.agents.helpers import ListBackend, wait_for

_NO_SANDBOX = sandbox_lib.unavailable_reason()
pytestmark = pytest.mark.skipif(_NO_SANDBOX is not None, reason=f"no sandbox here: {_NO_SANDBOX}")


def _call(env, tool, **arguments):
  return env.step_or_error(env_lib.Action(tool, arguments))


@pytest.fixture
def ws(tmp_path):
  env = workspace_env.WorkspaceEnv(root=os.path.join(tmp_path, "ws"), max_output_bytes=4096)
  env.reset(1)
  yield env
  env.close()


def test_background_sessions_read_idle_kill(ws):
  out = _call(
    ws, "run_command", command="echo start; sleep 30; echo never", session="bg", wait_s=0.2
  ).observation
  assert "running" in out and "start" in out
  assert "idle=False" in _call(ws, "is_idle", session="bg").observation
  # Other work goes on while the job runs.
  assert "exit code 0" in _call(ws, "run_command", command="echo hi", wait_s=5).observation
  assert "killed session bg" in _call(ws, "kill_session", session="bg").observation
  assert "idle=True" in _call(ws, "is_idle", session="bg").observation
  assert "never" not in _call(ws, "read_output", session="bg").observation
  assert _call(ws, "read_output", session="nope").observation.startswith("ERROR")


def test_output_is_capped_and_paths_are_confined(ws):
  out = _call(ws, "run_command", command="yes x | head -c 100000", wait_s=5).observation
  assert "earlier bytes dropped" in out and len(out) < 9000
  assert _call(ws, "view_file", path="../../etc/passwd").observation.startswith("ERROR")
  assert _call(ws, "write_file", path="/tmp/evil", content="x").observation.startswith("ERROR")


def test_fix_and_submit_task_through_the_agent_loop(tmp_path):
  task = workspace_env.make_task(1)
  actions = [
    {"tool": "view_file", "arguments": {"path": "stats.py"}},
    {
      "tool": "edit_file",
      "arguments": {"path": "stats.py", "old": "(len(vals) - 1)", "new": "len(vals)"},
    },
    {"tool": "run_command", "arguments": {"command": "python3 stats.py", "wait_s": 10}},
    {"tool": "submit", "arguments": {"answer": task["answer"]}},
  ]
  store = storage.SQLiteStore(os.path.join(tmp_path, "s.sqlite"))
  env = workspace_env.WorkspaceEnv(root=os.path.join(tmp_path, "ws"))
  result = agent.run_episode("w", env, ListBackend([json.dumps(a) for a in actions]), store, 1)
  steps = store.get_steps("w")
  assert task["answer"] in steps[2].observation
  assert result["success"] and result["score"] == 100.0 and steps[-1].done
  store.close()


def test_interrupt_sends_sigint_to_the_waited_command(ws):
  out = {}
  thread = threading.Thread(
    target=lambda: out.update(
      r=_call(
        ws, "run_command", command='trap "echo got-int; exit 3" INT; sleep 30 & wait', wait_s=30
      )
    )
  )
  thread.start()
  wait_for(ws.interrupt, timeout=5)
  thread.join(timeout=10)
  assert "interrupted by the human" in out["r"].observation
  wait_for(lambda: "exit code" in _call(ws, "is_idle", session="main").observation, timeout=5)
  assert ws.interrupt() is False


def test_resume_keeps_files_and_reports_lost_sessions(tmp_path):
  root = os.path.join(tmp_path, "ws")
  env = workspace_env.WorkspaceEnv(root=root)
  env.reset(0)
  _call(env, "write_file", path="notes.txt", content="hello")
  _call(env, "run_command", command="sleep 30", session="job", wait_s=0)
  state = env.snapshot()
  env.close()
  again = workspace_env.WorkspaceEnv(root=root)
  again.reset(0)
  again.restore(state)
  assert "hello" in _call(again, "view_file", path="notes.txt").observation
  assert "lost" in _call(again, "is_idle", session="job").observation
  again.close()
