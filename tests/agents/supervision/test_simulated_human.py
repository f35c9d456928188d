"""The simulated human: rules on hidden facts, delays, budget, flags, restarts."""

import os

import pytest

from apollo.agents import agent, storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import simulated_human
from tests.agents.helpers import ListBackend


@pytest.fixture
def store(tmp_path):
  s = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  yield s
  s.close()


@pytest.mark.parametrize("tool_mode", ["native", "text"])
def test_interventions_are_stored_counted_delayed_and_budgeted(store, tool_mode):
  seed = next(s for s in range(200) if len(research_env.generate_task(s).hidden_facts()) >= 3)
  human = simulated_human.SimulatedHuman(
    client_lib.LocalClient.for_store(store), delay_steps=3, budget=1
  )
  agent.run_episode(
    "h",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(seed, tool_mode=tool_mode),
    store,
    seed,
    listeners=[human.on_step],
  )
  guidance = store.list_guidance("h")
  assert len(guidance) == 1 == human.interventions("h")["messages"]  # the budget
  g = guidance[0]
  assert g.source == "simulated_human" and g.meta["rules"]
  launch = next(
    s.step_index
    for s in store.get_steps("h", full=False)
    if s.action and s.action["tool"] == "launch_run"
  )
  # Decided after the launch, sent once 3 more steps were seen, shown at the next turn.
  assert g.delivered_step == launch + 3 + 1


def test_rules_use_hidden_facts_and_flag_killed_healthy_runs(store):
  # A run set up well, then killed: the human flags the kill as bad.
  seed = next(s for s in range(200) if not research_env.generate_task(s).noisy_labels)
  task = research_env.generate_task(seed)
  lr = min(task.max_stable_lr, 1e-3)
  responses = [
    f'{{"tool": "set_config", "arguments": {{"key": "learning_rate", "value": {lr:g}}}}}',
    '{"tool": "launch_run", "arguments": {"gpu": 1, "data": "raw"}}',
    '{"tool": "check_run", "arguments": {"run_id": "r1"}}',
    '{"tool": "kill_run", "arguments": {"run_id": "r1"}}',
    '{"tool": "list_jobs", "arguments": {}}',
    '{"tool": "list_jobs", "arguments": {}}',
    '{"tool": "finish", "arguments": {}}',
  ]
  human = simulated_human.SimulatedHuman(client_lib.LocalClient.for_store(store), delay_steps=1)
  agent.run_episode(
    "k", research_env.ResearchEnv(), ListBackend(responses), store, seed, listeners=[human.on_step]
  )
  killed = store.get_step("k", 3)
  assert killed.human_flag == "bad" and "healthy" in killed.human_flag_reason
  [g] = store.list_guidance("k")
  assert g.meta["rules"] == ["patience"] and f"{task.hours_needed:.0f} hours" in g.text
  assert human.interventions("k") == {"messages": 1, "flags": 1}


def test_human_state_survives_a_restart(store):
  seed = 3
  human = simulated_human.SimulatedHuman(client_lib.LocalClient.for_store(store), delay_steps=0)
  store.create_session(storage.SessionRecord("r", "research", seed, "scripted", {}))
  store.add_guidance(
    "r",
    "earlier advice",
    source="simulated_human",
    meta={"rules": ["noisy_labels", "gpu_conflict"]},
  )
  watch = human._watch("r")  # pylint: disable=protected-access
  assert watch.sent == 1 and {"noisy_labels", "gpu_conflict"} <= watch.fired
