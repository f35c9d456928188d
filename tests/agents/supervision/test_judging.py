"""Supervision control: rule and human-flag judges, combine, stored labels.

Trajectories come from the real loop and store: canned responses (`ListBackend`)
drive the research environment through `agent.run_episode`, so every rule is
checked on the observations, step records and snapshots the environment really produces.
"""

import os

import pytest

from apollo.agents import agent, storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import judging, labels, simulated_human
from tests.agents.helpers import call, run_canned

# Seed 1: no noisy labels, learning rates above 5e-4 diverge, no GPU conflict.
# Seed 4: noisy labels only.
HEALTHY_SEED, NOISY_SEED = 1, 4


@pytest.fixture
def store(tmp_path):
  s = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  yield s
  s.close()


def run(store, session_id, seed, responses, guidance_after=None):
  """Plays canned responses (see `run_canned`) and returns the judges' view."""
  run_canned(store, session_id, seed, responses, guidance_after)
  return judging.TrajectoryView.load(store, session_id)


def fired(judge, view):
  """step -> reason codes of every masked step."""
  out = {}
  for step in view.action_steps():
    label = judge.judge(view, step.step_index)
    if label is not None and label.masked:
      out[step.step_index] = label.reason_codes
  return out


# --------------------------------------------------------------------------- rules


def test_invalid_call_rule_fires_on_each_kind_of_bad_call(store):
  view = run(
    store,
    "a",
    HEALTHY_SEED,
    [
      '{"tool": "sleep", "arguments": {"hours": 0.5}',  # unparseable
      call("launch_rocket"),  # unknown tool
      call("launch_run", gpu=5),  # fails the schema
      call("check_run", run_id="r9"),  # env: unknown run
      call("launch_run", gpu=0, data="filtered"),  # env: no filtered data yet
      call("list_files"),
      call("read_file", path="README.md"),
    ],
  )
  judge = judging.RuleJudge(rules=["invalid_call"])
  assert fired(judge, view) == {i: ["invalid_call"] for i in range(5)}
  label = judge.judge(view, 5)
  assert (label.verdict, label.reason, label.judge) == ("keep", "ok", "rules")
  assert "unparseable" in judge.judge(view, 0).detail


def test_repeated_noop_rule(store):
  view = run(
    store,
    "a",
    HEALTHY_SEED,
    [
      call("read_file", path="README.md"),
      call("read_file", path="README.md"),  # 1: same read-only call
      call("set_config", key="learning_rate", value=0.0005),
      call("launch_run", gpu=0),
      call("check_run", run_id="r1"),
      call("check_run", run_id="r1"),  # 5: nothing happened in between
      call("sleep", hours=0.5),
      call("sleep", hours=0.5),  # 7: waiting is not a no-op
      call("check_run", run_id="r1"),  # 8: time passed: new information
      '{"tool": "sleep"',  # 9: invalid, changes nothing
      call("check_run", run_id="r1"),  # 10: repeats step 8
      call("list_jobs"),
      call("list_jobs"),  # 12: repeat, but advice arrived
      call("set_config", key="learning_rate", value=0.0005),
      call("set_config", key="learning_rate", value=0.0005),  # 14: same observation
    ],
    guidance_after={11: "Keep an eye on the jobs."},
  )
  assert fired(judging.RuleJudge(rules=["repeated_noop"]), view) == {
    1: ["repeated_noop"],
    5: ["repeated_noop"],
    10: ["repeated_noop"],
    14: ["repeated_noop"],
  }


DESTROY_SCRIPT = [
  call("set_config", key="learning_rate", value=0.0005),
  call("launch_run", gpu=1),  # r1: healthy (stable lr, clean labels)
  call("check_run", run_id="r1"),
  call("sleep", hours=0.5),
  call("kill_run", run_id="r1"),  # 4: destroys progress
  call("set_config", key="learning_rate", value=0.003),
  call("launch_run", gpu=1),  # r2: lr 3e-3 diverges on this task
  call("check_run", run_id="r2"),
  call("kill_run", run_id="r2"),  # 8: doomed run: fine to kill
  call("kill_run", run_id="r2"),  # 9: not running any more: nothing destroyed
  call("launch_run", gpu=0),  # r3: never looked at
  call("kill_run", run_id="r3"),  # 11
]


def test_destroys_progress_with_hidden_facts(store):
  view = run(store, "a", HEALTHY_SEED, DESTROY_SCRIPT)
  assert view.task is not None and view.task.lr_diverges and not view.task.noisy_labels
  judge = judging.RuleJudge(rules=["destroys_progress"])
  assert fired(judge, view) == {4: ["destroys_progress"]}
  assert "healthy run" in judge.judge(view, 4).detail
  # The snapshot is the first signal; the launch step's record alone gives the same answer.
  for step in view.steps:
    step.env_state = None
  assert fired(judge, view) == {4: ["destroys_progress"]}


def test_destroys_progress_from_the_log_without_hidden_facts(store):
  run(store, "a", HEALTHY_SEED, DESTROY_SCRIPT)
  view = judging.TrajectoryView.load(store, "a", privileged=False)
  assert view.task is None
  # Only what the agent saw: r1 and r2 both looked fine when last checked (r2's
  # divergence is hidden), r3 was never checked.
  assert fired(judging.RuleJudge(rules=["destroys_progress"]), view) == {
    4: ["destroys_progress"],
    8: ["destroys_progress"],
  }
  no_facts = judging.RuleJudge(
    rules=["destroys_progress"], config=judging.RuleConfig(use_hidden_facts=False)
  )
  assert fired(no_facts, judging.TrajectoryView.load(store, "a")) == fired(
    judging.RuleJudge(rules=["destroys_progress"]), view
  )


def test_ignores_advice_rule(store):
  gpu_and_lr = (
    "GPU 0 is shared with another team's job all day. Launch on gpu 1 instead. "
    "A learning rate of 0.003 diverges here; set the learning rate to 0.0005."
  )
  patience = (
    "Run r3 is set up well. It needs about 13 hours of training; don't kill it: "
    "sleep and check back."
  )
  view = run(
    store,
    "a",
    HEALTHY_SEED,
    [
      call("launch_run", gpu=0),  # 0: no advice yet
      call("launch_run", gpu=0),  # 1: against gpu + lr advice
      call("set_config", key="learning_rate", value=0.003),  # 2: against lr advice
      call("set_config", key="learning_rate", value=0.0005),  # 3
      call("launch_run", gpu=1),  # 4: r3, as advised
      call("check_run", run_id="r3"),
      call("kill_run", run_id="r3"),  # 6: "don't kill"
      call("kill_run", run_id="r1"),  # 7: r1 goes against advice
    ],
    guidance_after={0: gpu_and_lr, 4: patience},
  )
  judge = judging.RuleJudge(rules=["ignores_advice"])
  assert fired(judge, view) == {1: ["ignores_advice"], 2: ["ignores_advice"], 6: ["ignores_advice"]}
  detail = judge.judge(view, 1).detail
  assert "gpu=0" in detail and "lr=0.003" in detail
  # All rules together: the kill of the healthy r3 is both destructive and disobedient.
  assert judging.RuleJudge().judge(view, 6).reason == "destroys_progress+ignores_advice"


def test_ignores_filter_advice(store):
  view = run(
    store,
    "a",
    NOISY_SEED,
    [
      call("list_files"),
      call("launch_run", gpu=0, data="raw"),  # 1: against the advice
      call("filter_labels"),
    ],
    guidance_after={0: "The labels are noisy. Run filter_labels first and train on data=filtered."},
  )
  assert fired(judging.RuleJudge(rules=["ignores_advice"]), view) == {1: ["ignores_advice"]}


@pytest.mark.parametrize("tool_mode", ["native", "text"])
def test_rules_on_a_guided_scripted_episode(store, tool_mode):
  """The scripted policy follows advice: only its malformed calls and re-checks are
  masked, and the runs it kills on the human's advice are not 'destroyed'."""
  human = simulated_human.SimulatedHuman(client_lib.LocalClient.for_store(store))
  agent.run_episode(
    "s",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(0, tool_mode=tool_mode),
    store,
    0,
    listeners=[human.on_step],
  )
  assert store.list_guidance("s"), "the simulated human should have advised"
  result = judging.judge_session(store, "s", [judging.RuleJudge(), judging.HumanFlagJudge()])
  reasons = {c for l in result.combined.values() for c in l.reason_codes}
  assert reasons <= {"ok", "invalid_call", "repeated_noop"}
  for step in store.get_steps("s", full=False):
    if step.parse_error:
      assert result.combined[step.step_index].reason_codes == ["invalid_call"]
  kills = [
    s.step_index
    for s in store.get_steps("s", full=False)
    if s.action and s.action["tool"] == "kill_run"
  ]
  assert all(not result.combined[i].masked for i in kills)


# --------------------------------------------------------------------------- human


def test_human_flags_and_their_override(store):
  view = run(
    store,
    "a",
    HEALTHY_SEED,
    [
      call("list_files"),
      '{"tool": "sleep"',
      call("read_file", path="README.md"),
      call("list_jobs"),
    ],
  )
  store.set_flag("a", 1, "good", "the sleep was right, only malformed")
  store.set_flag("a", 2, "bad", "reading the README again wastes time")
  view = judging.TrajectoryView.load(store, "a")
  human = judging.HumanFlagJudge()
  assert human.judge(view, 0) is None
  assert human.judge(view, 1) == labels.Label(
    "keep", "human_flag", "human", "the sleep was right, only malformed"
  )
  assert human.judge(view, 2) == labels.Label(
    "mask", "human_flag", "human", "reading the README again wastes time"
  )
  rules = judging.RuleJudge()
  step1 = [rules.judge(view, 1), human.judge(view, 1)]
  assert step1[0].masked
  assert judging.combine(step1).verdict == "keep"  # the human decides
  assert judging.combine(step1).reason == "human_override"
  assert judging.combine(step1, authoritative=()).verdict == "mask"  # plain any-mask
  step2 = judging.combine([rules.judge(view, 2), human.judge(view, 2)])
  assert (step2.verdict, step2.reason) == ("mask", "human_flag")
  assert "wastes time" in step2.detail


def test_combine_any_mask_wins_and_records_all():
  keep = labels.Label("keep", "ok", "rules")
  llm = labels.Label("mask", "redundant", "llm", "same check again")
  rules = labels.Label("mask", "repeated_noop+ignores_advice", "rules", "x")
  assert judging.combine([]) == labels.Label("keep", "ok", "combined")
  assert judging.combine([keep, None]).verdict == "keep"
  merged = judging.combine([keep, rules, llm])
  assert merged.verdict == "mask" and merged.judge == "combined"
  assert merged.reason_codes == ["repeated_noop", "ignores_advice", "redundant"]
  assert "llm: same check again" in merged.detail
  with pytest.raises(ValueError):
    labels.Label("drop", "x", "y")


# --------------------------------------------------------------------------- storage


def test_judge_session_stores_labels_quality_and_stats(store):
  run(
    store,
    "a",
    HEALTHY_SEED,
    [call("list_files"), call("list_files"), '{"tool": "sleep"', call("gpu_status")],
  )
  store.set_flag("a", 3, "bad", "should have launched by now")
  label_store = labels.LabelStore(store.path)
  judges = [judging.RuleJudge(), judging.HumanFlagJudge()]
  for _ in range(2):  # re-judging replaces, never duplicates
    result = judging.judge_session(store, "a", judges, label_store)
  stored = label_store.get("a")
  assert {i: [(l.judge, l.verdict) for l in ls] for i, ls in stored.items()} == {
    0: [("rules", "keep")],
    1: [("rules", "mask")],
    2: [("rules", "mask")],
    3: [("human", "mask"), ("rules", "keep")],
  }
  assert result.masked_steps() == [1, 2, 3]
  qualities = [
    (s.quality, (s.quality_reason or "").split(":")[0]) for s in store.get_steps("a", full=False)
  ]
  assert qualities == [
    ("good", "ok"),
    ("bad", "repeated_noop"),
    ("bad", "invalid_call"),
    ("bad", "human_flag"),
  ]
  verdicts = judging.stored_verdicts(store, "a", label_store)
  assert [v.verdict for v, _ in verdicts.values()] == ["keep", "mask", "mask", "mask"]
  # Without the sidecar table the store's quality field gives the same verdicts.
  assert [v.verdict for v, _ in judging.stored_verdicts(store, "a").values()] == [
    "keep",
    "mask",
    "mask",
    "mask",
  ]
  stats = judging.masking_stats([result])
  assert stats["actions"] == 4 and stats["masked"] == 3
  assert stats["fraction_masked"] == 0.75
  assert stats["by_reason"] == {"repeated_noop": 1, "invalid_call": 1, "human_flag": 1}
  assert stats["judges"]["human"] == {
    "labelled": 1,
    "masked": 1,
    "fraction_masked": 1.0,
    "reasons": {"human_flag": 1},
  }
