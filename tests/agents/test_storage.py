"""Trajectory store: idempotent steps, exactly-once guidance, export, kill -9 resume."""

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from apollo.agents import agent, storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from tests.agents.helpers import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def store(tmp_path):
  s = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  yield s
  s.close()


def _step(index, session="a"):
  return storage.StepRecord(
    session_id=session,
    step_index=index,
    kind="action",
    messages=[{"role": "user", "content": f"m{index}"}],
    response=f"r{index}",
    observation=f"o{index}",
  )


def test_wal_mode_and_schema(store):
  with sqlite3.connect(store.path) as conn:
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
  assert {"sessions", "steps", "guidance", "events", "meta"} <= tables


def test_step_insert_is_idempotent_and_guidance_delivered_once(store):
  store.create_session(storage.SessionRecord("a", "research", 0, "x", {}))
  assert not store.create_session(storage.SessionRecord("a", "research", 0, "x", {}))
  g, _ = store.add_guidance("a", "hello")
  assert store.append_step(_step(0), [(g.guidance_id, 1.0)])
  again = _step(0)
  again.response = "different"
  assert not store.append_step(again, [(g.guidance_id, 2.0)])
  assert store.append_step(_step(1), [(g.guidance_id, 3.0)])  # already delivered: no-op
  assert store.get_step("a", 0).response == "r0"
  stored = store.list_guidance("a")[0]
  assert (stored.delivered_step, stored.delivered_at) == (0, 1.0)
  # A retried send with the same client id is not stored twice.
  first, created1 = store.add_guidance("a", "retry me", client_msg_id="k1")
  second, created2 = store.add_guidance("a", "retry me", client_msg_id="k1")
  assert created1 and not created2 and first.guidance_id == second.guidance_id
  assert len(store.list_guidance("a")) == 2


def test_flags_quality_and_jsonl_export(store, tmp_path):
  agent.run_episode(
    "e", research_env.ResearchEnv(), research_policy.ScriptedResearchPolicy(4), store, 4
  )
  n = store.num_steps("e")
  assert store.set_flag("e", 3, "bad", "killed a healthy run")
  assert store.set_quality("e", 3, "bad", "judge")
  assert not store.set_flag("e", n + 5, "good", None)
  with pytest.raises(ValueError):
    store.set_flag("e", 1, "great", None)
  path = os.path.join(tmp_path, "out.jsonl")
  assert store.export_jsonl(path) == n
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step_index"] for r in rows] == list(range(n))
  assert rows[3]["human_flag"] == "bad" and rows[3]["quality"] == "bad"
  for key in (
    "messages",
    "response",
    "action",
    "observation",
    "started_at",
    "finished_at",
    "prompt_tokens",
    "completion_tokens",
    "session",
    "guidance",
  ):
    assert key in rows[0]


def _rollout_cmd(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "experiments.rollout",
    "--headless",
    "--episodes=2",
    f"--workdir={workdir}",
    "--model_latency_s=0.004",
    "--concurrency=2",
    *extra,
  ]


def _max_steps(db):
  try:
    with sqlite3.connect(db, timeout=5) as conn:
      return (
        conn.execute(
          "SELECT MAX(c) FROM (SELECT COUNT(*) c FROM steps GROUP BY session_id)"
        ).fetchone()[0]
        or 0
      )
  except sqlite3.OperationalError:
    return 0  # not created yet


@pytest.mark.parametrize("human", [False, True])
def test_kill_9_mid_episode_resumes_without_loss_or_duplicates(tmp_path, human):
  workdir = os.path.join(tmp_path, "run")
  extra = [f"--simulated_human={str(human).lower()}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(
    _rollout_cmd(workdir, *extra),
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  db = os.path.join(workdir, "trajectories.sqlite")
  try:
    wait_for(lambda: _max_steps(db) >= 25 or proc.poll() is not None, timeout=60, interval=0.01)
    assert proc.poll() is None, "the rollout finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
  killed_at = _max_steps(db)
  done = subprocess.run(
    _rollout_cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "resumed 2 session(s)" in done.stdout or "resumed 1 session(s)" in done.stdout
  store = storage.SQLiteStore(db)
  sessions = store.list_sessions()
  assert len(sessions) == 2 and {s.status for s in sessions} == {"finished"}
  for session in sessions:
    steps = store.get_steps(session.session_id)
    assert [s.step_index for s in steps] == list(range(len(steps)))  # contiguous, no dups
    assert steps[-1].done
    for prev, step in zip(steps, steps[1:]):
      if step.kind == "action" and prev.kind == "action":
        assert step.messages[: len(prev.messages)] == prev.messages  # context survived
    delivered = [gid for s in steps for gid in s.guidance_ids]
    assert len(delivered) == len(set(delivered))  # each message shown once
    for g in store.list_guidance(session.session_id):
      assert g.delivered_step is not None and g.guidance_id in steps[g.delivered_step].guidance_ids
    if not human:
      # Without a human the rollout is deterministic: identical to an uninterrupted one.
      ref_store = storage.SQLiteStore(os.path.join(tmp_path, f"ref-{session.seed}.sqlite"))
      agent.run_episode(
        "ref",
        research_env.ResearchEnv(),
        research_policy.ScriptedResearchPolicy(session.seed),
        ref_store,
        session.seed,
      )
      assert [s.response for s in ref_store.get_steps("ref")] == [s.response for s in steps]
      assert ref_store.get_session("ref").result["score"] == session.result["score"]
  with open(os.path.join(workdir, "trajectories.jsonl")) as f:
    assert sum(1 for _ in f) == sum(store.num_steps(s.session_id) for s in sessions)
  resumed = [
    e
    for s in sessions
    for e in store.list_events(s.session_id)
    if e["kind"] == "resume_after_restart"
  ]
  # At least one session was killed mid-episode and picked up where it stopped.
  assert killed_at >= 25 and any(e["data"]["steps"] > 0 for e in resumed)


def test_messages_are_stored_once_and_prompts_rebuilt_exactly(store):
  agent.run_episode(
    "d", research_env.ResearchEnv(), research_policy.ScriptedResearchPolicy(6), store, 6
  )
  steps = store.get_steps("d")
  with sqlite3.connect(store.path) as conn:
    distinct = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
  referenced = sum(len(s.messages) for s in steps)
  assert distinct <= 2 * len(steps) + 2 < referenced / 10  # linear, not quadratic
  assert store.get_step("d", len(steps) - 1).messages == steps[-1].messages
  assert store.last_step("d").messages == steps[-1].messages
  light = store.get_steps("d", full=False)
  assert light[0].messages == [] and light[0].response == steps[0].response
