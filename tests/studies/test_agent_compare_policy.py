"""The comparison on a checkpoint (`apollo.studies.policy_compare`) at its tiniest.

A small random Llama written as a local HF directory stands in for SmolLM2: every
variant gets a row, the collector is named, a rerun reuses the rollouts, policies and
evaluations, and bad flags are refused by name."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from apollo.agents import env as env_lib
from apollo.agents.backends import compact_view
from apollo.agents.envs import research as research_env
from apollo.models import chat_template
from apollo.models.llama import model as decoder
from apollo.models.llama import params as llama_params
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
  config = decoder.get_config(
    "tiny",
    vocab_size=tokenizer.get_vocab_size(),
    hidden_size=32,
    intermediate_size=64,
    max_position_embeddings=8192,
  )
  llama_params.export_hf(decoder.Decoder(config, rngs=nnx.Rngs(0)), path)
  hf_config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": 2}))
  template = chat_template.ChatTemplate(
    tokenizer, template=native_helpers.CHATML, special_tokens={"eos_token": "<|im_end|>"}
  )
  template.save_pretrained(path)
  return str(path)


def _config(checkpoint, **compare):
  c = policy_compare.get_config("test")
  c.compare.model = checkpoint
  c.model.hidden_size, c.model.intermediate_size = 32, 64
  for k, v in compare.items():
    c.compare[k] = v
  return c


def test_all_variants_with_the_scripted_collector_and_a_rerun_reuses_everything(
  tmp_path, tiny_checkpoint
):
  config = _config(tiny_checkpoint, warmup_demos=0)  # the warm-up runs in the next test
  first = policy_compare.run_comparison(config, str(tmp_path))
  assert list(first["variants"]) == list(agent_compare.VARIANTS)
  for v in agent_compare.VARIANTS:
    for key in ("score_mean", "success_rate_mean", "parse_rate_mean", "steps_per_episode_mean"):
      assert key in first["variants"][v], (v, key)
  assert first["work"]["collected_episodes"] > 0 and first["work"]["trained_policies"] > 0
  assert first["work"]["evaluations"] == 5
  assert first["collection"]["human_env_steps"] > 0
  report = (tmp_path / "results.md").read_text()
  assert "collector: scripted_drift" in report and "no format warm-up" in report
  assert "paper: +50%" in report
  assert (tmp_path / "results.png").is_file()
  stamps = {p: os.path.getmtime(p) for p in tmp_path.glob("**/*.json") if "results" not in p.name}

  again = policy_compare.run_comparison(config, str(tmp_path))
  assert again["work"] == {}  # nothing recollected, retrained or re-evaluated
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
  assert again["variants"]["c"]["score_mean"] == first["variants"]["c"]["score_mean"]


def test_the_policy_collects_its_own_rollouts(tmp_path, tiny_checkpoint):
  config = _config(tiny_checkpoint, collector="self", variants="a,c")
  results = policy_compare.run_comparison(config, str(tmp_path))
  assert list(results["variants"]) == ["a", "c"]
  assert results["collector"] == "self" and results["warmup"]["demos"] > 0
  assert results["collection"]["human_env_steps"] > 0
  report = (tmp_path / "results.md").read_text()
  assert "collector: self" in report and "including (a)" in report


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
