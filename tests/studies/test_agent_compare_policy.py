"""The comparison on a checkpoint (`apollo.studies.policy_compare`) at its tiniest.

A small random Llama written as a local HF directory stands in for SmolLM2: every
variant gets a row, the collector is named, a rerun reuses the rollouts, policies and
evaluations, a rerun with other fields is refused by name without touching the workdir,
and bad flags are refused by name."""

import copy
import json
import os
import subprocess
import sys

import pytest

from apollo.agents import env as env_lib
from apollo.agents.backends import compact_view
from apollo.agents.envs import research as research_env
from apollo.models import chat_template
from apollo.studies import agent_compare, policy_compare
from tests.agents.backends import native_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A tiny random Llama as a HF directory with a SmolLM2-style template (Hermes calls)."""
  path = tmp_path_factory.mktemp("tiny-llama")
  # Trained on the tool schemas too, so a prompt with native tools stays short.
  tools = json.dumps(env_lib.tools_as_openai(research_env.ResearchEnv().tools()))
  texts = [*chat_template.DEMO_CORPUS, tools, compact_view.COMPACT_SYSTEM_PROMPT]
  tokenizer = chat_template.train_chat_tokenizer(texts, vocab_size=2000)
  return native_helpers.write_tiny_llama(
    path, tokenizer, native_helpers.CHATML, max_position_embeddings=8192
  )


def _config(checkpoint, **compare):
  c = policy_compare.get_config("test")
  c.compare.model = checkpoint
  c.model.hidden_size, c.model.intermediate_size = 32, 64
  for k, v in compare.items():
    c.compare[k] = v
  return c


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory, tiny_checkpoint):
  """One finished run (scripted collector, every variant), shared by the tests that read it.

  Those tests leave its rollouts, policies and evaluations as they found them (a rerun
  rewrites only results.*)."""
  workdir = tmp_path_factory.mktemp("scripted-run")
  config = _config(tiny_checkpoint, warmup_demos=0)  # the warm-up runs in the 'self' test
  results = policy_compare.run_comparison(config, str(workdir))
  return config, workdir, results


def _files(workdir):
  """Every file but the reports, with its modification time and size."""
  return {
    p: (p.stat().st_mtime_ns, p.stat().st_size)
    for p in workdir.glob("**/*")
    if p.is_file() and not p.name.startswith("results.")
  }


def test_all_variants_with_the_scripted_collector(scripted_run):
  _, workdir, first = scripted_run
  assert list(first["variants"]) == list(agent_compare.VARIANTS)
  for v in agent_compare.VARIANTS:
    for key in ("score_mean", "success_rate_mean", "parse_rate_mean", "steps_per_episode_mean"):
      assert key in first["variants"][v], (v, key)
  assert first["work"]["collected_episodes"] > 0 and first["work"]["trained_policies"] > 0
  assert first["work"]["evaluations"] == 5
  assert first["collection"]["human_env_steps"] > 0
  report = (workdir / "results.md").read_text()
  assert "collector: scripted_drift" in report and "no format warm-up" in report
  assert "paper: +50%" in report
  assert (workdir / "results.png").is_file()


def test_a_rerun_reuses_everything(scripted_run):
  config, workdir, first = scripted_run
  names = ("collect_*.json", "sft_*/done*.json", "eval_*.json")
  markers = [p for name in names for p in workdir.glob(f"seed0/{name}")]
  assert len(markers) == 2 * (2 + 3 + 5)  # each with its .started.json
  assert all("fingerprint" in json.loads(p.read_text()) for p in markers)
  # The rollouts store is opened again (its judgments are refreshed); nothing else changes.
  before = {p: v for p, v in _files(workdir).items() if ".sqlite" not in p.name}
  again = policy_compare.run_comparison(config, str(workdir))
  assert again["work"] == {}  # nothing recollected, retrained or re-evaluated
  assert {p: v for p, v in _files(workdir).items() if ".sqlite" not in p.name} == before
  assert again["variants"]["c"]["score_mean"] == first["variants"]["c"]["score_mean"]
  # Fewer variants need nothing new: each marker records only the fields of its work.
  subset = policy_compare.run_comparison(_with(config, variants="a,c"), str(workdir))
  assert subset["work"] == {} and list(subset["variants"]) == ["a", "c"]
  assert {p: v for p, v in _files(workdir).items() if ".sqlite" not in p.name} == before


def _with(config, **compare):
  c = copy.deepcopy(config)
  for k, v in compare.items():
    c.compare[k] = v
  return c


@pytest.mark.parametrize(
  "change, stage, marker, field",
  [
    (
      dict(collector="self"),
      "collection",
      "collect_solo.json",
      "compare.collector='scripted_drift', now 'self'",
    ),
    (
      dict(collect_episodes=2),
      "collection",
      "collect_solo.json",
      "compare.collect_episodes=1, now 2",
    ),
    (dict(warmup_demos=4), "fine-tune", "done.json", "compare.warmup_demos=0, now 4"),
    (dict(sft_steps=2), "fine-tune", "done.json", "compare.sft_steps=1, now 2"),
    (dict(eval_episodes=3), "evaluation", "eval_a.json", "compare.eval_episodes=2, now 3"),
  ],
)
def test_a_rerun_with_other_fields_refuses_and_touches_nothing(
  scripted_run, change, stage, marker, field
):
  config, workdir, _ = scripted_run
  before = {**_files(workdir), **{p: p.stat().st_mtime_ns for p in workdir.glob("results.*")}}
  with pytest.raises(policy_compare.StaleWorkdirError) as e:
    policy_compare.run_comparison(_with(config, **change), str(workdir))
  message = str(e.value)
  assert f"--workdir={workdir}" in message and f"the {stage} seed0" in message, message
  assert marker in message and field in message and "use a new --workdir" in message, message
  after = {**_files(workdir), **{p: p.stat().st_mtime_ns for p in workdir.glob("results.*")}}
  assert after == before  # nothing written, removed or overwritten


def test_the_policy_collects_its_own_rollouts(tmp_path, tiny_checkpoint):
  config = _config(tiny_checkpoint, collector="self", variants="c")
  results = policy_compare.run_comparison(config, str(tmp_path))
  assert list(results["variants"]) == ["c"]
  assert results["collector"] == "self" and results["warmup"]["demos"] > 0
  assert results["collection"]["human_env_steps"] > 0
  report = (tmp_path / "results.md").read_text()
  assert "collector: self" in report and "including (a)" in report


def test_fingerprints_record_only_the_fields_of_the_work():
  config = policy_compare.get_config("test")
  fields = policy_compare.stage_fields
  scripted = fields(config, "collect_human", seed=0)
  assert "compare.model" not in scripted and "compare.sft_steps" not in scripted
  assert "compare.human_budget" in scripted and scripted["seed"] == 0
  own = fields(_with(config, collector="self"), "collect_human", seed=0)
  assert own["compare.model"] == config.compare.model and "compare.warmup_steps" in own
  sft = fields(config, "sft", seed=1, variant="c")
  assert sft["compare.sft_steps"] == 1 and sft["data.seq_len"] == 512 and sft["seed"] == 1
  assert "compare.eval_episodes" not in sft and "compare.variants" not in sft
  assert "log_every" not in sft and "compare.seeds" not in sft
  evaluation = fields(config, "eval", seed=0, variant="a")
  assert evaluation["compare.eval_episodes"] == 2 and "compare.sft_steps" not in evaluation
  fp = policy_compare.fingerprint
  assert fp({"a": (1, 2), "b": "x"}) == fp({"b": "x", "a": [1, 2]}) != fp({"a": [1, 3], "b": "x"})


def test_an_unfinished_or_unstamped_piece_of_work_is_refused_too(tmp_path):
  config = policy_compare.get_config("test")
  plan = policy_compare.plan_markers(config, str(tmp_path))
  policy_compare.check_workdir(str(tmp_path), plan)  # an empty workdir: nothing to refuse
  # A crash mid-fine-tune leaves only the started file; its checkpoints would resume.
  (tmp_path / "seed0" / "sft_c").mkdir(parents=True)
  other = policy_compare.stage_fields(_with(config, sft_steps=9), "sft", seed=0, variant="c")
  started = tmp_path / "seed0" / "sft_c" / "done.started.json"
  started.write_text(json.dumps(policy_compare._stamp(other)))
  with pytest.raises(policy_compare.StaleWorkdirError, match=r"sft_steps=9, now 1"):
    policy_compare.check_workdir(str(tmp_path), plan)
  started.unlink()
  (tmp_path / "seed0" / "eval_a.json").write_text(json.dumps({"score": 1.0}))
  with pytest.raises(policy_compare.StaleWorkdirError, match="eval_a.json .*no recorded config"):
    policy_compare.check_workdir(str(tmp_path), plan)


def test_bad_variant_collector_or_model_names_the_flag(tiny_checkpoint):
  for field, value, flag in (
    ("variants", "a,z", "--variants"),
    ("collector", "oracle", "--collector"),
    ("model", "no-such-model", "--model"),
  ):
    with pytest.raises(ValueError, match=flag):
      policy_compare.check_config(_config(tiny_checkpoint, **{field: value}))
  with pytest.raises(ValueError, match="preset"):
    policy_compare.get_config("huge")


def test_the_command_refuses_an_unknown_collector_without_a_traceback(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.agent_compare",
      "--flagfile=experiments/flags/compare_cpu.flags",
      "--collector=oracle",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert "--collector" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert not os.listdir(tmp_path)


def test_presets_are_sized_as_the_issue_asks():
  cpu, gpu = policy_compare.get_config("cpu"), policy_compare.get_config("gpu")
  assert len(cpu.compare.seeds) == 1 and cpu.compare.label == "indicative"
  assert len(gpu.compare.seeds) >= 3 and gpu.compare.eval_episodes >= 20
  for c in (cpu, gpu):
    policy_compare.check_config(c)  # the registered SmolLM2 name, every variant
    assert c.compare.collector in policy_compare.COLLECTORS
