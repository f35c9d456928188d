"""The research task family: generation, splits, dynamics, snapshots, interrupts."""

import threading

from apollo.agents import env as env_lib
from apollo.agents.envs import research as research_env
from tests.agents.helpers import wait_for


def test_invalid_actions_become_error_observations():
  env = research_env.ResearchEnv()
  env.reset(0)
  for action in (
    env_lib.Action("no_such_tool", {}),
    env_lib.Action("sleep", {"hours": "long"}),
    env_lib.Action("sleep", {"hours": 99}),
    env_lib.Action("check_run", {}),
    env_lib.Action("list_files", {"extra": 1}),
  ):
    result = env.step_or_error(action)
    assert result.observation.startswith("ERROR:"), action
    assert not result.done
  assert env.now_hours() == 0.0  # invalid calls cost no simulated time


def test_task_generation_is_deterministic_and_splits_are_disjoint():
  assert research_env.generate_task(5) == research_env.generate_task(5)
  train = research_env.seeds_for("train", 50)
  test = research_env.seeds_for("test", 50)
  assert not set(train) & set(test)
  assert {research_env.split_of(s) for s in train} == {"train"}
  assert {research_env.split_of(s) for s in test} == {"test"}
  train_domains = {research_env.generate_task(s).domain for s in train}
  test_domains = {research_env.generate_task(s).domain for s in test}
  assert not train_domains & test_domains
  for s in train:
    facts = research_env.generate_task(s).hidden_facts()
    assert "long_run" in facts and len(facts) >= 2  # patience plus at least one trap


def _play(env, actions):
  return [env.step_or_error(env_lib.Action(t, a)).observation for t, a in actions]


def test_snapshot_restore_continues_identically():
  plan = [
    ("set_config", {"key": "learning_rate", "value": 5e-4}),
    ("launch_run", {"gpu": 1, "data": "raw"}),
    ("sleep", {"hours": 0.5}),
    ("check_run", {"run_id": "r1"}),
    ("sleep", {"hours": 0.5}),
  ]
  rest = [("check_run", {"run_id": "r1"}), ("evaluate", {"run_id": "r1"}), ("list_jobs", {})]
  a = research_env.ResearchEnv()
  a.reset(3)
  _play(a, plan)
  state = a.snapshot()
  b = research_env.ResearchEnv()
  b.restore(state)
  assert _play(a, rest) == _play(b, rest)


def test_converged_clean_run_reaches_target_and_budget_ends_episode():
  seed = next(s for s in range(100) if not research_env.generate_task(s).noisy_labels)
  task = research_env.generate_task(seed)
  env = research_env.ResearchEnv()
  env.reset(seed)
  env.step_or_error(env_lib.Action("set_config", {"key": "learning_rate", "value": 5e-4}))
  env.step_or_error(env_lib.Action("launch_run", {"gpu": 1}))
  steps = 0
  while (
    "status=finished"
    not in env.step_or_error(env_lib.Action("check_run", {"run_id": "r1"})).observation
  ):
    env.step_or_error(env_lib.Action("sleep", {"hours": 0.5}))
    steps += 2
  assert steps >= 2 * task.hours_needed  # long horizon: sleeps are capped at 0.5 h
  result = env.step_or_error(env_lib.Action("submit", {"run_id": "r1"}))
  score = float(result.observation.split("= ")[1].split(" ")[0])
  assert score >= task.target_score
  last = None
  while not (last := env.step_or_error(env_lib.Action("sleep", {"hours": 0.5}))).done:
    pass
  assert "TIME BUDGET EXHAUSTED" in last.observation
  assert last.info["success"] is True


def test_interrupt_cuts_a_real_time_sleep_short():
  env = research_env.ResearchEnv(time_scale_s=120.0)  # a 0.5 h sleep would take 60 s
  env.reset(1)
  out = {}
  thread = threading.Thread(
    target=lambda: out.update(r=env.step_or_error(env_lib.Action("sleep", {"hours": 0.5})))
  )
  thread.start()
  wait_for(env.interrupt, timeout=5)
  thread.join(timeout=5)
  assert not thread.is_alive()
  assert "interrupted by the human" in out["r"].observation
  assert env.now_hours() < 0.5
  assert env.interrupt() is False  # nothing is running now
