"""Smoke test of experiments.lm_compare at its tiniest sizes (1 seed, a few steps).

Checks the plumbing only: both pretraining objectives and all three fine-tuning
variants run, and results.json, results.md and comparison.png are written with
one row per variant. The numbers at this size mean nothing.
"""

import json
import os

import pytest

from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.studies import lm_compare


@pytest.mark.slow
def test_smoke_writes_results_table_and_plot(tmp_path):
  results = lm_compare.compare(
    str(tmp_path),
    dict(lm_compare.SMOKE_SIZES),
    pretrain_configs.get_config("quickstart"),
    finetune_configs.get_config("quickstart"),
  )
  assert {r["variant"] for r in results["runs"]} == set(lm_compare.VARIANTS)
  for name in ("results.json", "results.md", "comparison.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert set(saved["summary"]) == set(lm_compare.VARIANTS)
  for row in saved["summary"].values():
    assert 0.0 <= row["test_mean"] <= 1.0 and row["seeds"] == 1
  table = (tmp_path / "results.md").read_text()
  for label in lm_compare.LABELS.values():
    assert f"| {label} |" in table
  # The plain-MLM pretraining trained no E-CLS; the APOLLO one did.
  with open(tmp_path / "seed0" / "pretrain_mlm" / "config.json") as f:
    assert json.load(f)["config"]["objective"] == "mlm"


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
