"""Smoke tests of experiments.lm_compare at its tiniest sizes (1 seed, a few steps).

The arms start from a tiny random BERT checkpoint (MiniLM's family and tokenizer
type, 1 layer of width 32) instead of MiniLM, to stay fast. Checks the plumbing
only: both continued pretrainings and all three arms run on the generated set,
results.json, results.md and comparison.png are written; a rerun with
--reclor_dir reuses the finished runs and adds ReClor; bad arms and flags are
errors naming the flag; the plain-MLM baseline's data have no E-CLS. The numbers
at this size mean nothing.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.lm.data import selection
from apollo.lm.datasets import logic_mc
from apollo.studies import lm_compare
from tests.lm import pretraining_data_helpers as helpers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random HF BERT (bare trunk + pooler, like MiniLM) with a WordPiece."""
  root = tmp_path_factory.mktemp("lm_compare_checkpoint")
  shard_dir = str(root / "sentences")
  helpers.make_generated_shards(shard_dir, num_documents=60, docs_per_shard=60)
  texts = [r["text"] for r in selection.iter_records(shard_dir)]
  helpers.train_small_wordpiece(texts, str(root / "wordpiece"), vocab_size=250)
  return helpers.export_random_encoder(
    "bert", str(root / "bert"), str(root / "wordpiece" / "tokenizer.json")
  )


def _compare(root, checkpoint, **kwargs):
  return lm_compare.compare(
    str(root),
    dict(lm_compare.SMOKE_SIZES),
    pretrain_configs.get_config("minilm"),
    finetune_configs.get_config("minilm"),
    init_from=checkpoint,
    **kwargs,
  )


@pytest.mark.slow
def test_smoke_writes_results_then_a_rerun_adds_reclor_and_reuses_runs(tmp_path, checkpoint):
  results = _compare(tmp_path, checkpoint)
  assert {(r["dataset"], r["arm"]) for r in results["runs"]} == {
    ("logic_mc", a) for a in lm_compare.ARMS
  }
  for name in ("results.json", "results.md", "comparison.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert set(saved["summary"]["logic_mc"]) == set(lm_compare.ARMS)
  for row in saved["summary"]["logic_mc"].values():
    assert 0.0 <= row["test_mean"] <= 1.0 and row["seeds"] == 1
  assert set(saved["skipped"]) == {"reclor", "logiqa"}
  assert "--reclor_dir" in saved["skipped"]["reclor"]
  table = (tmp_path / "results.md").read_text()
  for label in lm_compare.LABELS.values():
    assert f"| {label} |" in table
  assert "Indicative" in table and "LogiQA: no --logiqa_dir given" in table
  # The plain-MLM pretraining trained no E-CLS; both continued the checkpoint.
  with open(tmp_path / "seed0" / "pretrain_mlm" / "config.json") as f:
    saved_config = json.load(f)["config"]
  assert saved_config["objective"] == "mlm" and saved_config["init_from"] == checkpoint
  with open(tmp_path / "seed0" / "finetune_logic_mc_none" / "results.json") as f:
    assert json.load(f)["init"] == dict(kind="checkpoint", path=checkpoint)

  # A rerun with tiny ReClor-format files: the finished runs are reused, ReClor is added.
  reclor = tmp_path / "reclor_data"
  logic_mc.write_reclor_format(str(reclor), dict(train=16, validation=8, test=8), seed=2)
  finished = os.path.getmtime(tmp_path / "seed0" / "finetune_logic_mc_apollo" / "results.json")
  again = _compare(tmp_path, checkpoint, benchmark_dirs=dict(reclor=str(reclor)))
  assert finished == os.path.getmtime(
    tmp_path / "seed0" / "finetune_logic_mc_apollo" / "results.json"
  )
  old = {(r["dataset"], r["arm"]): r["test"] for r in results["runs"]}
  assert all(
    old[d, a] == t
    for d, a, t in ((r["dataset"], r["arm"], r["test"]) for r in again["runs"])
    if d == "logic_mc"
  )
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert set(saved["summary"]["reclor"]) == set(lm_compare.ARMS)
  assert set(saved["skipped"]) == {"logiqa"} and saved["datasets"]["reclor"] == str(reclor)
  for row in saved["summary"]["reclor"].values():
    assert 0.0 <= row["validation_mean"] <= 1.0 and np.isfinite(row["test_mean"])
  table = (tmp_path / "results.md").read_text()
  assert "### ReClor" in table and "67.2" in table  # APOLLO's paper number beside ours.


def test_bad_arms_and_directories_name_the_flag(tmp_path):
  with pytest.raises(ValueError, match=r"--arms=apollo,bert: unknown arm\(s\) \['bert'\]"):
    lm_compare.check_arms(["apollo", "bert"])
  assert lm_compare.check_arms(["none", "apollo"]) == ("apollo", "none")
  with pytest.raises(FileNotFoundError, match="--reclor_dir=.*nowhere"):
    lm_compare.check_benchmark_dirs(dict(reclor=str(tmp_path / "nowhere")))
  assert lm_compare.check_benchmark_dirs(dict(reclor="", logiqa="")) == {}


@pytest.mark.parametrize(
  "args, named",
  [(["--arms=apollo,bert"], "--arms=apollo,bert"), (["--rclor_dir=/data"], "rclor_dir")],
)
def test_entry_point_refuses_unknown_arms_and_flags(tmp_path, args, named):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.lm_compare", f"--workdir={tmp_path}", *args],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0 and named in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "shared")  # Refused before any work.


def test_plain_mlm_objective_masks_any_token_and_has_no_ecls(tmp_path):
  """The baseline's data: each sentence once, label 0, ~15% of all its tokens as targets."""
  import numpy as np

  from apollo.lm import pretrain
  from apollo.lm.configs import pretrain as pretrain_configs
  from apollo.lm.data import pipeline
  from tests.lm import pretraining_data_helpers as helpers

  shard_dir = str(tmp_path / "sentences")
  helpers.make_generated_shards(shard_dir, num_documents=40, docs_per_shard=40)
  tokenizer = helpers.train_small_tokenizer(shard_dir, str(tmp_path / "tok"))
  config = pipeline.PretrainDataConfig(
    max_len=32, batch_size=16, objective="mlm", eval_fraction=0.0, num_epochs=1
  )
  batches = list(pipeline.make_pretrain_dataset(shard_dir, tokenizer, config))
  labels = np.concatenate([b["ecls_label"] for b in batches])
  assert labels.size and not labels.any()
  assert not np.concatenate([b["ecls_perturbation"] for b in batches]).any()
  targets = sum(float(b["mlm_weights"].sum()) for b in batches)
  tokens = sum(float(b["attention_mask"].sum() - 2 * len(b["attention_mask"])) for b in batches)
  assert 0.12 < targets / tokens < 0.25  # round(15%) per sentence, at least one.
  apollo = pipeline.PretrainDataConfig(max_len=32, batch_size=16, eval_fraction=0.0, num_epochs=1)
  # APOLLO makes two examples (original + perturbed) of each usable sentence
  # (the last partial batch is dropped, so the balance is near, not at, 50/50).
  apollo_labels = np.concatenate(
    [b["ecls_label"] for b in pipeline.make_pretrain_dataset(shard_dir, tokenizer, apollo)]
  )
  assert 0.4 < apollo_labels.mean() < 0.6

  c = pretrain_configs.get_config("quickstart")
  assert c.objective == "apollo" and pretrain.effective_ecls_weight(c) == 1.0
  c.objective = "mlm"
  assert pretrain.effective_ecls_weight(c) == 0.0
  c.objective = "bert"
  with pytest.raises(ValueError, match="objective='bert'"):
    pretrain.train_and_evaluate(c, str(tmp_path / "w"))


@pytest.mark.parametrize("name", ["lm_compare_cpu", "lm_compare_gpu"])
def test_flagfiles_parse(tmp_path, name):
  """Every flag in the flagfile exists (absl refuses unknown ones); a bad --arms after it
  stops the run before any work, so this parses the file without running the study."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.lm_compare",
      f"--flagfile=experiments/flags/{name}.flags",
      f"--workdir={tmp_path}",
      "--arms=x",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0 and "--arms=x: unknown arm" in proc.stderr, proc.stderr[-2000:]
