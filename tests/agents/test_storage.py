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


@pytest.mark.parametrize("tool_mode", ["native", "text"])
def test_flags_quality_and_jsonl_export(store, tmp_path, tool_mode):
  agent.run_episode(
    "e",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(4),
    store,
    4,
    config=agent.AgentConfig(tool_mode=tool_mode),
  )
  store.add_guidance("e", "unused")  # never delivered: listed, not in the messages
  n = store.num_steps("e")
  assert store.set_flag("e", 3, "bad", "killed a healthy run")
  assert store.set_quality("e", 3, "bad", "judge")
  assert not store.set_flag("e", n + 5, "good", None)
  with pytest.raises(ValueError):
    store.set_flag("e", 1, "great", None)
  path = os.path.join(tmp_path, "out.jsonl")
  assert store.export_jsonl(path) == 1  # one line per episode
  with open(path) as f:
    [episode] = [json.loads(line) for line in f]
  assert episode["session_id"] == "e" and episode["seed"] == 4
  assert episode["result"] == store.get_session("e").result
  assert [t["function"]["name"] for t in episode["tools"]] == [
    t.name for t in research_env.ResearchEnv().tools()
  ]
  steps, messages = episode["steps"], episode["messages"]
  assert [s["step_index"] for s in steps] == list(range(n))
  assert steps[3]["human_flag"] == "bad" and steps[3]["quality"] == "bad"
  assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
  for row in steps:
    turn = messages[row["message_index"]]
    assert turn["role"] == "assistant" and turn["weight"] == (0 if row["step_index"] == 3 else 1)
    assert row["call"]["mode"] == tool_mode
  # OpenAI chat format: every call is answered by the tool message with its id, next.
  for i, m in enumerate(messages):
    calls = m.get("tool_calls") or []
    if m["role"] == "assistant" and calls:
      answers = messages[i + 1 : i + 1 + len(calls)]
      assert [a["role"] for a in answers] == ["tool"] * len(calls)
      assert [a["tool_call_id"] for a in answers] == [c["id"] for c in calls]
      for c in calls:
        assert c["type"] == "function" and isinstance(c["function"]["arguments"], str)
    if m["role"] == "tool":
      assert messages[i - 1]["role"] in ("assistant", "tool")
  if tool_mode == "native":
    # Every readable call travels natively; the few malformed ones stay text.
    readable = sum(not row["call"]["malformed"] for row in steps)
    assert sum(bool(m.get("tool_calls")) for m in messages) == readable >= n - 8
  else:
    assert not any(m["role"] == "tool" for m in messages)
  # The export is the whole trajectory: every step's reply, in order, once.
  assert [m for m in messages if m["role"] == "assistant"] == [
    {**s.assistant_message, "weight": 0 if s.step_index == 3 else 1} for s in store.get_steps("e")
  ]
  assert episode["guidance"][0]["text"] == "unused"


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
        config=agent.AgentConfig(tool_mode="native"),  # as experiments.rollout runs it
      )
      ref_steps = ref_store.get_steps("ref")
      assert [s.response for s in ref_steps] == [s.response for s in steps]
      assert [s.tool_calls for s in ref_steps] == [s.tool_calls for s in steps]
      assert ref_store.get_session("ref").result["score"] == session.result["score"]
  with open(os.path.join(workdir, "summary.json")) as f:
    calls = json.load(f)["tool_calls"]
  # The scripted policy's calls travel natively; about 2% are malformed on purpose.
  assert calls["action_steps"] == sum(store.num_steps(s.session_id) for s in sessions)
  assert calls["parse_rate"] > 0.9 and calls["schema_pass_rate"] == pytest.approx(
    calls["parse_rate"]
  )
  assert calls["parsed"] + calls["malformed"] == calls["action_steps"]
  with open(os.path.join(workdir, "trajectories.jsonl")) as f:
    episodes = [json.loads(line) for line in f]
  assert sorted(len(e["steps"]) for e in episodes) == sorted(
    store.num_steps(s.session_id) for s in sessions
  )
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
  # A light step still says how many messages it was given (the console shows it).
  assert [s.to_json(full=False)["num_messages"] for s in light] == [len(s.messages) for s in steps]
  assert steps[-1].to_json()["num_messages"] == len(steps[-1].messages)


def test_a_version_1_store_stays_readable_and_resumes(tmp_path):
  """A store written before tool calls were native (no assistant/call columns, no
  message extras) opens, reads its steps as text-mode steps and resumes."""
  path = os.path.join(tmp_path, "v1.sqlite")
  store = storage.SQLiteStore(path)
  agent.run_episode(
    "old",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(3),
    store,
    3,
    config=agent.AgentConfig(max_steps=6),
  )
  expected = store.get_steps("old")
  store.close()
  with sqlite3.connect(path) as conn:  # back to version 1's schema
    for table, column in (("steps", "assistant_json"), ("steps", "call_json")):
      conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("ALTER TABLE messages DROP COLUMN extra_json")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
  store = storage.SQLiteStore(path)
  try:
    steps = store.get_steps("old")
    assert [s.messages for s in steps] == [s.messages for s in expected]
    assert all(s.assistant is None and s.call is None for s in steps)
    assert [s.assistant_message for s in steps] == [s.assistant_message for s in expected]
    assert agent.context_after(steps[-1]) == agent.context_after(expected[-1])
    # The episode goes on where it stopped, now storing the new fields.
    agent.Rollout(
      "old",
      research_env.ResearchEnv(),
      research_policy.ScriptedResearchPolicy(3),
      store,
      agent.AgentConfig(max_steps=9),
    ).run()
    later = store.get_steps("old", since=5)
    assert [s.step_index for s in later] == [6, 7, 8]
    assert later[0].messages[: len(agent.context_after(expected[-1]))] == agent.context_after(
      expected[-1]
    )
    assert all(s.call["mode"] == "text" for s in later)
    with sqlite3.connect(path) as conn:
      version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(storage.SCHEMA_VERSION),)
  finally:
    store.close()


def test_native_messages_keep_their_tool_fields(store):
  messages = [
    {"role": "user", "content": "go"},
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "sleep", "arguments": "{}"}}
      ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "slept"},
    {"role": "tool", "tool_call_id": "c2", "content": "slept"},  # same text, other call
  ]
  store.create_session(storage.SessionRecord("n", "research", 0, "x", {}))
  step = storage.StepRecord("n", 0, "action", messages, "r", "o")
  assert store.append_step(step)
  assert store.get_step("n", 0).messages == messages
  with sqlite3.connect(store.path) as conn:
    assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4
