"""The training entry points (`experiments/{pretrain,finetune,agent_sft}.py`): a config that
cannot work is one clear message and exit status 1, never a traceback, before any work.

Each case runs the entry point in a subprocess, as a user would (`apollo.common.cli`).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(module, *args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", f"experiments.{module}", f"--workdir={workdir}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
    check=False,
  )


def _assert_clean_failure(out, *expected):
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  for text in expected:
    assert text in out.stderr, out.stderr[-3000:]


def test_bad_values_are_one_clean_error_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  out = _run(
    "pretrain",
    "--config.optimizer.learning_rate=-0.01",
    "--config.checkpoint_every=0",
    "--config.train_steps=-5",
    "--start_over",
    workdir=workdir,
  )
  _assert_clean_failure(
    out,
    "Invalid config",
    "--config.optimizer.learning_rate=-0.01 must be a finite number > 0",
    "--config.checkpoint_every=0 must be > 0",
    "--config.train_steps=-5 must be > 0",
  )
  assert "Done at step" not in out.stderr + out.stdout
  assert not workdir.exists()  # Refused before anything was written.


def test_unknown_field_without_config_flag_suggests_the_closest(tmp_path):
  # No --config: ml_collections applies the overrides while the flag is defined.
  out = _run("pretrain", "--config.optimizer.learnin_rate=0.1", workdir=tmp_path / "w")
  _assert_clean_failure(
    out,
    "Unknown config field --config.optimizer.learnin_rate",
    "did you mean --config.optimizer.learning_rate?",
  )


@pytest.mark.parametrize(
  "module, spec", [("finetune", "apollo/lm/configs/finetune.py:quickstart"), ("agent_sft", "")]
)
def test_unknown_field_with_config_flag_names_the_known_fields(module, spec, tmp_path):
  config = [f"--config={spec}"] if spec else ["--config=apollo/agents/configs/sft.py:quickstart"]
  out = _run(module, *config, "--config.bogus_field=1", workdir=tmp_path / "w")
  _assert_clean_failure(out, "Unknown config field --config.bogus_field", "known:", "train_steps")


def test_agent_sft_refuses_a_zero_interval(tmp_path):
  out = _run("agent_sft", "--config.eval_every=0", workdir=tmp_path / "w")
  _assert_clean_failure(out, "--config.eval_every=0 must be > 0")
