r"""Does APOLLO pretraining help at toy scale? S-MLM + E-CLS vs plain MLM vs no pretraining.

  python -m experiments.lm_compare --workdir=runs/lm_compare            # 3 seeds
  python -m experiments.lm_compare --workdir=runs/lm_compare --seeds=5

For each seed, on the same selected corpus and tokenizer (prepared once in
WORKDIR/shared): pretrain a tiny encoder with (i) S-MLM + E-CLS
(`objective=apollo`) and (ii) plain MLM (`objective=mlm`: random 15% of all
tokens, no E-CLS), the same steps, batch, optimizer and architecture; then
fine-tune each, and (iii) the same architecture from random init, on the
generated logic set (`apollo.lm.datasets.logic_mc`, generated once). The seed sets the
pretraining init and data order, the new heads and the fine-tuning order.

Writes WORKDIR/results.json (every run's numbers and the per-variant mean and
sample standard deviation), WORKDIR/results.md (the table) and
WORKDIR/comparison.png (accuracy per variant: mean +- std and each seed).
Every run is resumable in its own sub-workdir; finished runs are skipped, so
rerunning the command after an interruption continues where it stopped.

Sizes: the flags of `experiments/lm_compare.py` (the README gives the time the
defaults take); `--smoke` is the tiniest version (tests).

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.lm import finetune, pretrain
from apollo.lm.datasets import logic_mc

VARIANTS = ("apollo", "mlm", "none")
LABELS = {"apollo": "S-MLM + E-CLS", "mlm": "plain MLM", "none": "no pretraining"}


SMOKE_SIZES = dict(
  seeds=1,
  pretrain_steps=3,
  finetune_steps=2,
  max_len=48,
  train_questions=32,
  eval_questions=16,
  documents=200,
  hidden=32,
  layers=1,
  heads=2,
  intermediate=64,
  vocab=400,
  pretrain_batch=8,
  finetune_batch=8,
  smoke=1,
)


def _architecture(config, s: dict[str, int]) -> None:
  # The 'small' preset's 514 positions (the quickstart's 'tiny' has 128), at the
  # quickstart's width and depth: fine-tuning sequences need up to ~200 tokens.
  config.model.preset = "small"
  config.model.hidden_size, config.model.num_layers = s["hidden"], s["layers"]
  config.model.num_heads, config.model.intermediate_size = s["heads"], s["intermediate"]


def pretrain_config(base, shared: str, s: dict[str, int], objective: str, seed: int):
  """`base` (the pretraining quickstart preset) resized for one comparison run."""
  c = copy.deepcopy(base)
  _architecture(c, s)
  c.objective = objective
  c.seed = seed
  c.train_steps = s["pretrain_steps"]
  c.log_every = max(1, min(50, s["pretrain_steps"]))
  c.eval_every = c.checkpoint_every = s["pretrain_steps"]
  c.eval_batches = 10
  c.optimizer.warmup_steps = max(1, s["pretrain_steps"] // 12)
  c.data.shard_dir = os.path.join(shared, "data", "sentences")
  c.data.tokenizer_path = os.path.join(shared, "data", "tokenizer", "tokenizer.json")
  c.data.batch_size = s["pretrain_batch"]
  if s["smoke"]:
    c.mlm_max_predictions = 4
    c.data.max_len, c.data.eval_fraction = 24, 0.2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c


def finetune_config(base, shared: str, s: dict[str, int], variant: str, seed: int, root: str):
  """`base` (the fine-tuning quickstart preset) resized for one comparison run."""
  c = copy.deepcopy(base)
  _architecture(c, s)
  c.seed = seed
  c.init_from_pretrain = (
    os.path.join(root, f"seed{seed}", f"pretrain_{variant}") if variant != "none" else ""
  )
  c.data.tokenizer_path = os.path.join(shared, "data", "tokenizer", "tokenizer.json")
  c.data.data_dir = os.path.join(shared, "logic_mc")
  c.data.max_len = s["max_len"]
  c.data.batch_size = s["finetune_batch"]
  c.data.eval_batch_size = 2 * s["finetune_batch"]
  c.train_steps = s["finetune_steps"]
  c.log_every = max(1, min(25, s["finetune_steps"]))
  c.eval_every = s["finetune_steps"]  # Only at the end: evaluation costs as much as training.
  c.checkpoint_every = s["finetune_steps"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c


def prepare_shared(pretrain_base, root: str, s: dict[str, int]) -> str:
  """The selected corpus + tokenizer, and the generated logic set, once for all runs."""
  shared = os.path.join(root, "shared")
  c = copy.deepcopy(pretrain_base)
  c.data.generated_documents = s["documents"]
  c.data.tokenizer_vocab_size = s["vocab"]
  pretrain.prepare_data(c, shared)
  logic_dir = os.path.join(shared, "logic_mc")
  if not os.path.isfile(os.path.join(logic_dir, "test.json")):
    logic_mc.write_reclor_format(
      logic_dir + ".tmp",
      dict(train=s["train_questions"], validation=s["eval_questions"], test=s["eval_questions"]),
      seed=0,
    )
    os.replace(logic_dir + ".tmp", logic_dir)
  return shared


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_all(root: str, s: dict[str, int], pretrain_base, finetune_base) -> dict[str, Any]:
  """Every pretraining and fine-tuning (skipping finished ones); returns per-run numbers."""
  root = os.path.abspath(root)
  shared = prepare_shared(pretrain_base, root, s)
  runs = []
  for seed in range(s["seeds"]):
    pretrain_eval = {}
    for objective in ("apollo", "mlm"):
      workdir = os.path.join(root, f"seed{seed}", f"pretrain_{objective}")
      pretrain.train_and_evaluate(
        pretrain_config(pretrain_base, shared, s, objective, seed), workdir
      )
      pretrain_eval[objective] = metrics_lib.read_metrics(workdir, "eval")[-1]
      logging.info("seed %d pretrain %s: %s", seed, objective, pretrain_eval[objective])
    for variant in VARIANTS:
      workdir = os.path.join(root, f"seed{seed}", f"finetune_{variant}")
      results_path = os.path.join(workdir, "results.json")
      start = time.perf_counter()
      if not os.path.isfile(results_path):
        finetune.train_and_evaluate(
          finetune_config(finetune_base, shared, s, variant, seed, root), workdir
        )
      res = _read_json(results_path)
      run = dict(
        seed=seed,
        variant=variant,
        seconds=time.perf_counter() - start,
        validation=res["eval"]["validation"]["accuracy"],
        test=res["eval"]["test"]["accuracy"],
        best_step=res["best"].get("step"),
        best_validation=res["best"].get("validation", {}).get("accuracy"),
        test_at_best_validation=res["best"].get("test", {}).get("accuracy"),
      )
      if variant != "none":
        ev = pretrain_eval[variant]
        # The plain-MLM run never trains E-CLS (its data are all label 0): not reported.
        keys = ("mlm_acc", "mlm_loss") + (("ecls_acc",) if variant == "apollo" else ())
        run["pretrain"] = {k: ev[k] for k in keys if k in ev}
      runs.append(run)
      logging.info(
        "seed %d %s: validation %.4f test %.4f", seed, variant, run["validation"], run["test"]
      )
  return dict(sizes=s, runs=runs, summary=summarize(runs))


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean and sample std (ddof=1; 0 for one seed) of each metric per variant."""
  out = {}
  for variant in VARIANTS:
    rows = [r for r in runs if r["variant"] == variant]
    if not rows:
      continue
    out[variant] = dict(seeds=len(rows))
    for key in ("validation", "test", "test_at_best_validation"):
      values = np.asarray([r[key] for r in rows if r[key] is not None], np.float64)
      out[variant][f"{key}_mean"] = float(values.mean())
      out[variant][f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return out


def markdown_table(results: dict[str, Any]) -> str:
  s = results["sizes"]
  lines = [
    f"Generated logic set, {s['train_questions']} training questions, "
    f"{s['eval_questions']} validation / test; {s['seeds']} seeds; chance 25%. "
    f"Accuracy % at the last step (mean ± sample std over seeds).",
    "",
    "| encoder | validation | test |",
    "|---|---|---|",
  ]
  for variant, row in results["summary"].items():
    cell = lambda k: f"{100 * row[k + '_mean']:.1f} ± {100 * row[k + '_std']:.1f}"
    lines.append(f"| {LABELS[variant]} | {cell('validation')} | {cell('test')} |")
  pre = [r for r in results["runs"] if "pretrain" in r]
  if pre:
    mean = lambda v, k: 100 * np.mean([r["pretrain"][k] for r in pre if r["variant"] == v])
    parts = [
      f"{LABELS['apollo']}: MLM {mean('apollo', 'mlm_acc'):.1f}%, "
      f"E-CLS {mean('apollo', 'ecls_acc'):.1f}%",
      f"{LABELS['mlm']}: MLM {mean('mlm', 'mlm_acc'):.1f}%",
    ]
    lines += ["", "Pretraining held-out accuracy (mean over seeds): " + "; ".join(parts)]
  return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  variants = list(results["summary"])
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
  for ax, key in zip(axes, ("validation", "test")):
    for i, variant in enumerate(variants):
      row = results["summary"][variant]
      ax.bar(
        i,
        100 * row[f"{key}_mean"],
        yerr=100 * row[f"{key}_std"],
        capsize=4,
        color=("C0", "C1", "C7")[i % 3],
        alpha=0.7,
      )
      seeds = [100 * r[key] for r in results["runs"] if r["variant"] == variant]
      ax.scatter([i] * len(seeds), seeds, color="k", s=12, zorder=3)
    ax.axhline(25, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(variants)), [LABELS[v] for v in variants], fontsize=8)
    ax.set_title(f"{key} accuracy (%)")
  axes[0].set_ylabel("accuracy % (dashed: chance)")
  fig.suptitle(f"Generated logic set after tiny pretraining ({results['sizes']['seeds']} seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare(root: str, s: dict[str, int], pretrain_base, finetune_base) -> dict[str, Any]:
  """Runs everything and writes results.json, results.md and comparison.png into root.

  `pretrain_base` and `finetune_base` are the trainers' quickstart presets
  (`apollo/lm/configs/{pretrain,finetune}.py`); every run resizes a copy.
  """
  root = os.path.abspath(root)
  start = time.perf_counter()
  results = run_all(root, s, pretrain_base, finetune_base)
  results["seconds_this_invocation"] = time.perf_counter() - start  # Finished runs are skipped.
  train_lib.write_json_atomically(os.path.join(root, "results.json"), results)
  with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(results))
  plot(results, os.path.join(root, "comparison.png"))
  return results
