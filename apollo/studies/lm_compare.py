r"""Does APOLLO's continued pretraining help MiniLM? S-MLM + E-CLS vs plain MLM vs none.

  python -m experiments.lm_compare --flagfile=experiments/flags/lm_compare_cpu.flags
  python -m experiments.lm_compare --flagfile=experiments/flags/lm_compare_gpu.flags \
      --reclor_dir=/data/reclor --logiqa_dir=/data/logiqa

Three arms, all starting from the same checkpoint (`init_from`, by default
`minilm-l6`: all-MiniLM-L6-v2 through `apollo.models.load`):
  apollo  continued pretraining with S-MLM + E-CLS (`objective=apollo`), then fine-tuning;
  mlm     continued pretraining with plain MLM (`objective=mlm`: a random 15% of all
          tokens, no E-CLS), the same steps, batch and optimizer, then fine-tuning;
  none    fine-tuning straight from the checkpoint.
The pretraining sentences (selected from the embedded generated corpus) and the
generated logic set (`apollo.lm.datasets.logic_mc`) are prepared once in
WORKDIR/shared. Each arm is fine-tuned on the generated set and on ReClor / LogiQA
where their directories are given (absent: skipped, and results.json says so). The
seed sets the pretraining heads, dropout and data order, the new scorer and the
fine-tuning order.

Writes WORKDIR/results.json (every run, the per-dataset, per-arm mean and sample
standard deviation, the skipped datasets), WORKDIR/results.md (a table per dataset,
mean ± std next to the paper's RoBERTa-large numbers from its Table 2, labelled
indicative at a size far smaller than the paper's) and WORKDIR/comparison.png.
Every run is resumable in its own sub-workdir; finished runs are skipped, so
rerunning the same command continues where it stopped.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from apollo.common import training as train_lib
from apollo.lm import finetune, pretrain
from apollo.lm.datasets import logic_mc

ARMS = ("apollo", "mlm", "none")
LABELS = {
  "apollo": "S-MLM + E-CLS",
  "mlm": "plain MLM",
  "none": "no continued pretraining",
}
# The generated set always runs; the benchmarks where the user gives their directory.
DATASETS = ("logic_mc", "reclor", "logiqa")
DATASET_NAMES = {"logic_mc": "generated logic set", "reclor": "ReClor", "logiqa": "LogiQA"}
# The paper's Table 2 (RoBERTa-large backbone, accuracy %), as in the spec: 'none' is
# RoBERTa-large fine-tuned directly, 'apollo' is APOLLO. Plain MLM has no number there.
PAPER = {
  "reclor": {
    "none": dict(validation=62.6, test=55.6),
    "apollo": dict(validation=67.2, test=58.2),
  },
  "logiqa": {
    "none": dict(validation=35.0, test=35.3),
    "apollo": dict(validation=41.6, test=42.1),
  },
}
_DONE = "done.json"  # Written into a pretraining workdir when it has finished.

# The tiniest sizes (tests; pass a tiny checkpoint as init_from).
SMOKE_SIZES = dict(
  seeds=1,
  documents=200,
  pretrain_steps=3,
  pretrain_batch=8,
  pretrain_max_len=24,
  mlm_max_predictions=4,
  finetune_steps=2,
  finetune_batch=8,
  eval_batch=16,
  max_len=64,
  bucket_multiple=32,
  train_questions=32,
  eval_questions=16,
  benchmark_steps=2,
  benchmark_max_len=64,
  benchmark_train_questions=16,
  benchmark_eval_questions=8,
)


def check_arms(arms: Sequence[str]) -> tuple[str, ...]:
  """The arms in canonical order; an unknown or missing one is an error naming --arms."""
  unknown = [a for a in arms if a not in ARMS]
  if unknown or not arms:
    raise ValueError(f"--arms={','.join(arms)}: unknown arm(s) {unknown}; choose from {ARMS}.")
  return tuple(a for a in ARMS if a in arms)


def check_benchmark_dirs(dirs: Mapping[str, str]) -> dict[str, str]:
  """{dataset: directory} of the given ones; a missing directory names its flag."""
  out = {}
  for dataset, directory in dirs.items():
    if dataset not in ("reclor", "logiqa"):
      raise ValueError(f"No --{dataset}_dir: only --reclor_dir and --logiqa_dir exist.")
    if directory:
      if not os.path.isdir(directory):
        raise FileNotFoundError(f"--{dataset}_dir={directory} is not a directory.")
      out[dataset] = os.path.abspath(directory)
  return out


def pretrain_config(base, init_from: str, shared: str, s: Mapping[str, int], arm: str, seed: int):
  """`base` (the pretraining `minilm` preset) resized for one arm's continued pretraining."""
  c = copy.deepcopy(base)
  c.init_from = init_from
  c.objective = arm
  c.seed = seed
  c.train_steps = s["pretrain_steps"]
  c.log_every = max(1, min(25, s["pretrain_steps"]))
  c.eval_every = c.checkpoint_every = s["pretrain_steps"]  # Evaluate and save at the end.
  c.eval_batches = 4
  c.max_checkpoints = 1
  c.mlm_max_predictions = s["mlm_max_predictions"]
  c.optimizer.warmup_steps = max(1, s["pretrain_steps"] // 8)
  c.data.shard_dir = os.path.join(shared, "data", "sentences")
  c.data.batch_size = s["pretrain_batch"]
  c.data.max_len = s["pretrain_max_len"]
  c.data.eval_fraction = max(c.data.eval_fraction, 0.2 if s["documents"] < 1000 else 0.05)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c


def finetune_config(
  base,
  init_from: str,
  root: str,
  s: Mapping[str, int],
  dataset: str,
  data_dir: str,
  arm: str,
  seed: int,
):
  """`base` (the fine-tuning `minilm` preset) resized for one (dataset, arm, seed) run."""
  c = copy.deepcopy(base)
  c.seed = seed
  c.init_from_pretrain = (
    os.path.join(root, f"seed{seed}", f"pretrain_{arm}") if arm != "none" else ""
  )
  c.init_from = init_from if arm == "none" else ""
  c.data.tokenizer_path = ""  # The checkpoint's own (as the pretraining used).
  c.data.dataset = dataset
  c.data.data_dir = data_dir
  benchmark = dataset != "logic_mc"
  c.data.max_len = s["benchmark_max_len"] if benchmark else s["max_len"]
  c.data.bucket_multiple = s["bucket_multiple"]
  c.data.batch_size = s["finetune_batch"]
  c.data.eval_batch_size = s["eval_batch"]
  c.data.max_train_examples = s["benchmark_train_questions"] if benchmark else 0
  c.data.max_eval_examples = s["benchmark_eval_questions"] if benchmark else 0
  c.train_steps = s["benchmark_steps"] if benchmark else s["finetune_steps"]
  c.log_every = max(1, min(25, c.train_steps))
  c.eval_every = c.train_steps  # Only at the end: evaluation costs as much as training.
  c.checkpoint_every = c.train_steps
  c.max_checkpoints = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c


def prepare_shared(pretrain_base, init_from: str, root: str, s: Mapping[str, int]) -> str:
  """The selected sentences and the generated logic set, once for all runs."""
  shared = os.path.join(root, "shared")
  c = copy.deepcopy(pretrain_base)
  c.init_from = init_from  # Its tokenizer: no BPE is trained.
  c.data.shard_dir = ""
  c.data.generated_documents = s["documents"]
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


class Preempted(RuntimeError):
  """A run stopped on SIGTERM after saving; rerun the same command to continue."""


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _pretrain(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one continued pretraining; its last evaluation."""
  done = os.path.join(workdir, _DONE)
  if not os.path.isfile(done):
    result = pretrain.train_and_evaluate(config, workdir)
    if result["preempted"]:
      raise Preempted(f"{workdir} was preempted at step {result['step']}.")
    train_lib.write_json_atomically(done, dict(step=result["step"], eval=result["eval"]))
  return _read_json(done)["eval"]


def _finetune(config, workdir: str) -> dict[str, Any]:
  results_path = os.path.join(workdir, "results.json")
  if not os.path.isfile(results_path):
    result = finetune.train_and_evaluate(config, workdir)
    if result["preempted"]:
      raise Preempted(f"{workdir} was preempted at step {result['step']}.")
  return _read_json(results_path)


def run_all(
  root: str,
  s: Mapping[str, int],
  pretrain_base,
  finetune_base,
  *,
  init_from: str,
  arms: Sequence[str],
  benchmark_dirs: Mapping[str, str],
) -> dict[str, Any]:
  """Every pretraining and fine-tuning (skipping finished ones); returns per-run numbers."""
  root = os.path.abspath(root)
  shared = prepare_shared(pretrain_base, init_from, root, s)
  datasets = {"logic_mc": os.path.join(shared, "logic_mc"), **benchmark_dirs}
  runs = []
  for seed in range(s["seeds"]):
    pretrain_eval = {}
    for arm in arms:
      if arm == "none":
        continue
      workdir = os.path.join(root, f"seed{seed}", f"pretrain_{arm}")
      config = pretrain_config(pretrain_base, init_from, shared, s, arm, seed)
      pretrain_eval[arm] = _pretrain(config, workdir)
      logging.info("seed %d pretrain %s: %s", seed, arm, pretrain_eval[arm])
    for dataset, data_dir in datasets.items():
      for arm in arms:
        workdir = os.path.join(root, f"seed{seed}", f"finetune_{dataset}_{arm}")
        start = time.perf_counter()
        config = finetune_config(finetune_base, init_from, root, s, dataset, data_dir, arm, seed)
        res = _finetune(config, workdir)
        accuracy = lambda split: res["eval"].get(split, {}).get("accuracy")
        run = dict(
          seed=seed,
          dataset=dataset,
          arm=arm,
          seconds=time.perf_counter() - start,
          validation=accuracy("validation"),
          test=accuracy("test"),  # None where the split hides its labels (ReClor test).
          train_questions_per_s=res.get("throughput", {}).get("train_questions_per_s"),
        )
        if arm != "none":
          ev = pretrain_eval[arm]
          # The plain-MLM run never trains E-CLS (its data are all label 0): not reported.
          keys = ("mlm_acc", "mlm_loss") + (("ecls_acc",) if arm == "apollo" else ())
          run["pretrain"] = {k: ev[k] for k in keys if k in ev}
        runs.append(run)
        logging.info("seed %d %s %s: %s", seed, dataset, arm, run)
  skipped = {
    d: f"no --{d}_dir given: skipped" for d in ("reclor", "logiqa") if d not in benchmark_dirs
  }
  return dict(
    sizes=dict(s),
    init_from=init_from,
    arms=list(arms),
    datasets={d: datasets[d] for d in datasets},
    skipped=skipped,
    runs=runs,
    summary=summarize(runs),
  )


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
  """{dataset: {arm: mean and sample std (ddof=1; 0 for one seed) of each accuracy}}."""
  out: dict[str, dict[str, dict[str, float]]] = {}
  for run in runs:
    out.setdefault(run["dataset"], {}).setdefault(run["arm"], {})
  for dataset, by_arm in out.items():
    for arm in by_arm:
      rows = [r for r in runs if r["dataset"] == dataset and r["arm"] == arm]
      row: dict[str, float] = dict(seeds=len(rows))
      for key in ("validation", "test"):
        values = np.asarray([r[key] for r in rows if r[key] is not None], np.float64)
        if len(values):
          row[f"{key}_mean"] = float(values.mean())
          row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      by_arm[arm] = row
  return out


def markdown_table(results: Mapping[str, Any]) -> str:
  """results.md: one table per dataset, mean ± std over seeds, the paper's numbers beside."""
  s = results["sizes"]
  lines = [
    f"Continued pretraining of `{results['init_from']}` ({s['pretrain_steps']} steps of "
    f"{s['pretrain_batch']} sentences), then multiple-choice fine-tuning; {s['seeds']} "
    f"seed(s); accuracy % at the last step, mean ± sample std over seeds; chance 25%.",
    "",
    "**Indicative only**: CPU-sized runs, far shorter than the paper's; the paper's "
    "columns are RoBERTa-large (Sanyal et al., 2023, Table 2), not this backbone.",
  ]
  for dataset, by_arm in results["summary"].items():
    paper = PAPER.get(dataset, {})
    header = "| encoder | validation | test |" + (
      " paper validation | paper test |" if paper else ""
    )
    lines += ["", f"### {DATASET_NAMES[dataset]}", "", header]
    lines.append("|---|---|---|" + ("---|---|" if paper else ""))
    for arm, row in by_arm.items():
      cell = lambda k, row=row: (
        f"{100 * row[k + '_mean']:.1f} ± {100 * row[k + '_std']:.1f}" if k + "_mean" in row else "-"
      )
      line = f"| {LABELS[arm]} | {cell('validation')} | {cell('test')} |"
      if paper:
        p = paper.get(arm)
        line += f" {p['validation']:.1f} | {p['test']:.1f} |" if p else " - | - |"
      lines.append(line)
  for dataset, reason in results["skipped"].items():
    lines += ["", f"{DATASET_NAMES[dataset]}: {reason}."]
  pre = [r for r in results["runs"] if "pretrain" in r and r["dataset"] == "logic_mc"]
  if pre:
    parts = []
    for arm in ("apollo", "mlm"):
      rows = [r["pretrain"] for r in pre if r["arm"] == arm]
      if rows:
        text = f"{LABELS[arm]}: MLM {100 * np.mean([r.get('mlm_acc', np.nan) for r in rows]):.1f}%"
        if arm == "apollo":
          text += f", E-CLS {100 * np.mean([r.get('ecls_acc', np.nan) for r in rows]):.1f}%"
        parts.append(text)
    lines += ["", "Pretraining held-out accuracy (mean over seeds): " + "; ".join(parts)]
  return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: str) -> None:
  """comparison.png: per dataset, validation and test accuracy per arm (mean ± std, seeds)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  datasets = list(results["summary"])
  fig, axes = plt.subplots(
    1, len(datasets), figsize=(4.2 * len(datasets), 3.8), sharey=True, squeeze=False
  )
  for ax, dataset in zip(axes[0], datasets):
    by_arm = results["summary"][dataset]
    for i, arm in enumerate(by_arm):
      for j, key in enumerate(("validation", "test")):
        row = by_arm[arm]
        if f"{key}_mean" not in row:
          continue
        x = i + (j - 0.5) * 0.38
        ax.bar(
          x,
          100 * row[f"{key}_mean"],
          width=0.36,
          yerr=100 * row[f"{key}_std"],
          capsize=3,
          color=f"C{j}",
          alpha=0.7,
          label=key if i == 0 else None,
        )
        seeds = [
          100 * r[key]
          for r in results["runs"]
          if r["dataset"] == dataset and r["arm"] == arm and r[key] is not None
        ]
        ax.scatter([x] * len(seeds), seeds, color="k", s=10, zorder=3)
    ax.axhline(25, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(by_arm)), [LABELS[a] for a in by_arm], fontsize=7)
    ax.set_title(DATASET_NAMES[dataset])
  axes[0][0].set_ylabel("accuracy % (dashed: chance)")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(
    f"Continued pretraining of {results['init_from']}: indicative, CPU size "
    f"({results['sizes']['seeds']} seeds)"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare(
  root: str,
  s: Mapping[str, int],
  pretrain_base,
  finetune_base,
  *,
  init_from: str = "minilm-l6",
  arms: Sequence[str] = ARMS,
  benchmark_dirs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
  """Runs everything and writes results.json, results.md and comparison.png into root.

  Args:
    root: the study's workdir; a rerun skips the finished runs.
    s: the sizes (`SMOKE_SIZES` has every key).
    pretrain_base, finetune_base: the trainers' `minilm` presets
      (`apollo/lm/configs/{pretrain,finetune}.py`); every run resizes a copy.
    init_from: the checkpoint every arm starts from (`apollo.models.load` names or paths).
    arms: a subset of `ARMS`.
    benchmark_dirs: {'reclor': dir, 'logiqa': dir}; empty or missing ones are skipped.

  Raises:
    ValueError / FileNotFoundError: an unknown arm, a missing benchmark directory
      (naming the flag), before any work.
    Preempted: a run stopped on SIGTERM (rerun to continue).
  """
  arms = check_arms(arms)
  benchmark_dirs = check_benchmark_dirs(dict(benchmark_dirs or {}))
  missing = sorted(set(SMOKE_SIZES) - set(s))
  if missing:
    raise ValueError(f"Sizes lack {missing}.")
  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  start = time.perf_counter()
  results = run_all(
    root,
    s,
    pretrain_base,
    finetune_base,
    init_from=init_from,
    arms=arms,
    benchmark_dirs=benchmark_dirs,
  )
  results["seconds_this_invocation"] = time.perf_counter() - start  # Finished runs are skipped.
  train_lib.write_json_atomically(os.path.join(root, "results.json"), results)
  with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(results))
  plot(results, os.path.join(root, "comparison.png"))
  return results
