"""The research environment's answers to judges come from step records, not text."""

import os

import pytest

from apollo.agents import storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_facts
from apollo.agents.supervision import judging
from tests.agents.helpers import call, run_canned

SEED = 1  # no noisy labels, learning rates above 5e-4 diverge, no GPU conflict

SCRIPT = [
  call("set_config", key="learning_rate", value=0.0005),
  call("launch_run", gpu=1),  # 1: r1, healthy
  call("check_run", run_id="r1"),
  call("kill_run", run_id="r1"),  # 3: destroys progress
  call("set_config", key="learning_rate", value=0.003),
  call("launch_run", gpu=0),  # 5: r2, diverges; against the advice below
  call("kill_run", run_id="r2"),  # 6: after "don't kill", but r2 went against the advice
  call("list_jobs"),
  call("list_jobs"),  # 8: a repeated read
]
ADVICE = {4: "Launch on gpu 1 instead, and don't kill runs."}


@pytest.fixture
def store(tmp_path):
  s = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  yield s
  s.close()


def test_steps_record_what_they_did(store):
  run_canned(store, "a", SEED, SCRIPT)
  steps = store.get_steps("a", full=False)
  assert research_facts.launched(steps[1].info) == research_env.RunSetup("r1", 1, "raw", 0.0005)
  assert research_facts.killed(steps[3].info) == "r1"
  assert research_facts.killed(steps[6].info) == "r2"
  assert [r["run_id"] for r in steps[7].info["runs_seen"]] == ["r1", "r2"]
  assert all(s.observation.endswith("\n" + s.info["status_line"]) for s in steps)
  task = research_env.generate_task(SEED)
  assert task.run_problems(research_facts.launched(steps[1].info)) == {}
  assert set(task.run_problems(research_facts.launched(steps[5].info))) == {"lr_diverges"}


@pytest.mark.parametrize("privileged", [True, False])
def test_verdicts_do_not_depend_on_the_wording_of_observations(store, privileged):
  run_canned(store, "a", SEED, SCRIPT, guidance_after=ADVICE)
  view = judging.TrajectoryView.load(store, "a", privileged=privileged)
  judge = judging.RuleJudge()
  before = [judge.judge(view, s.step_index) for s in view.action_steps()]
  assert {i for i, l in enumerate(before) if l.masked} == {3, 5, 8}
  for step in view.steps:  # every message reworded, every status line with it
    step.observation = step.observation.replace("run", "job").replace("clock", "time")
    step.info = {
      k: v.replace("clock", "time") if k == "status_line" else v for k, v in step.info.items()
    }
  assert [judge.judge(view, s.step_index) for s in view.action_steps()] == before
