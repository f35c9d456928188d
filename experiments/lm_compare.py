"""Does APOLLO's continued pretraining help MiniLM? The comparison's entry point.

    python -m experiments.lm_compare --flagfile=experiments/flags/lm_compare_cpu.flags
    python -m experiments.lm_compare --flagfile=experiments/flags/lm_compare_gpu.flags \\
        --reclor_dir=/data/reclor --logiqa_dir=/data/logiqa
    python -m experiments.lm_compare --workdir=/tmp/smoke --smoke --init_from=/path/tiny_bert

What it runs and writes is described in `apollo.studies.lm_compare`; rerunning the same
command continues where an interrupted run stopped (finished runs are reused).
"""

import os

from absl import app, flags

from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.studies import lm_compare

_WORKDIR = flags.DEFINE_string("workdir", None, "Everything goes here.", required=True)
_INIT_FROM = flags.DEFINE_string(
  "init_from", "minilm-l6", "The checkpoint every arm starts from (apollo.models.load)."
)
_ARMS = flags.DEFINE_list("arms", list(lm_compare.ARMS), f"A subset of {lm_compare.ARMS}.")
_RECLOR_DIR = flags.DEFINE_string("reclor_dir", "", "ReClor's train/val/test.json; '' = skip.")
_LOGIQA_DIR = flags.DEFINE_string("logiqa_dir", "", "LogiQA's Train/Eval/Test.txt; '' = skip.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiniest sizes (a test of the plumbing).")
_SIZES = {
  "seeds": (3, "Seeds 0..N-1 (each: 2 pretrainings, 3 fine-tunings per dataset)."),
  "documents": (4000, "Documents of the generated pretraining corpus."),
  "pretrain_steps": (100, "Continued-pretraining updates per arm and seed."),
  "pretrain_batch": (32, "Sentences per pretraining batch."),
  "pretrain_max_len": (32, "Tokens per pretraining sentence."),
  "mlm_max_predictions": (6, "(S-)MLM targets per sentence."),
  "finetune_steps": (100, "Fine-tuning updates on the generated set."),
  "finetune_batch": (8, "Questions per fine-tuning batch."),
  "eval_batch": (64, "Questions per evaluation batch."),
  "max_len": (128, "Tokens per (context, option) on the generated set."),
  "bucket_multiple": (32, "Padded lengths are multiples of this (0 = all at max_len)."),
  "train_questions": (2000, "Generated training questions."),
  "eval_questions": (300, "Generated validation and test questions (each)."),
  "benchmark_steps": (300, "Fine-tuning updates on ReClor / LogiQA."),
  "benchmark_max_len": (256, "Tokens per (context, option) on ReClor / LogiQA."),
  "benchmark_train_questions": (0, "> 0: only the first this many ReClor / LogiQA questions."),
  "benchmark_eval_questions": (0, "> 0: evaluate only the first this many of each split."),
}
_SIZE_FLAGS = {k: flags.DEFINE_integer(k, v, h) for k, (v, h) in _SIZES.items()}


def sizes() -> dict[str, int]:
  """The sizes the flags ask for (`--smoke`: `lm_compare.SMOKE_SIZES`)."""
  if _SMOKE.value:
    return dict(lm_compare.SMOKE_SIZES)
  return {k: f.value for k, f in _SIZE_FLAGS.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    arms = lm_compare.check_arms(_ARMS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  root = os.path.abspath(_WORKDIR.value)
  results = lm_compare.compare(
    root,
    sizes(),
    pretrain_configs.get_config("minilm"),
    finetune_configs.get_config("minilm"),
    init_from=_INIT_FROM.value,
    arms=arms,
    benchmark_dirs=dict(reclor=_RECLOR_DIR.value, logiqa=_LOGIQA_DIR.value),
  )
  print(lm_compare.markdown_table(results))
  print(
    f"Wrote {root}/results.json, results.md and comparison.png "
    f"({results['seconds_this_invocation'] / 60:.1f} min this invocation)."
  )


if __name__ == "__main__":
  app.run(main)
