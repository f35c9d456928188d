"""Does the logic pretraining help at toy scale? The comparison's entry point.

    python -m experiments.lm_compare --workdir=runs/lm_compare --seeds=3   # ~25-30 min, 2 CPU cores
    python -m experiments.lm_compare --workdir=/tmp/smoke --smoke          # the tiniest sizes

What it runs and writes is described in `apollo.studies.lm_compare`; rerunning the command
continues where an interrupted run stopped.
"""

import os

from absl import app, flags

from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.studies.lm_compare import SMOKE_SIZES, compare, markdown_table

_WORKDIR = flags.DEFINE_string("workdir", None, "Everything goes here.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 (each: 2 pretrainings, 3 fine-tunings).")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 300, "Pretraining updates per run.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 200, "Fine-tuning updates per run.")
_MAX_LEN = flags.DEFINE_integer("max_len", 160, "Fine-tuning tokens per (context, option).")
_TRAIN_QUESTIONS = flags.DEFINE_integer("train_questions", 2000, "Generated training questions.")
_EVAL_QUESTIONS = flags.DEFINE_integer(
  "eval_questions", 300, "Generated validation and test questions (each)."
)
_DOCUMENTS = flags.DEFINE_integer("documents", 4000, "Documents of the generated corpus.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiniest sizes (a test of the plumbing).")


def sizes() -> dict[str, int]:
  """The sizes the flags ask for."""
  if _SMOKE.value:
    return dict(SMOKE_SIZES)
  return dict(
    smoke=0,
    seeds=_SEEDS.value,
    pretrain_steps=_PRETRAIN_STEPS.value,
    finetune_steps=_FINETUNE_STEPS.value,
    max_len=_MAX_LEN.value,
    train_questions=_TRAIN_QUESTIONS.value,
    eval_questions=_EVAL_QUESTIONS.value,
    documents=_DOCUMENTS.value,
    hidden=128,
    layers=2,
    heads=4,
    intermediate=256,
    vocab=2048,
    pretrain_batch=32,
    finetune_batch=8,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root = os.path.abspath(_WORKDIR.value)
  results = compare(
    root,
    sizes(),
    pretrain_configs.get_config("quickstart"),
    finetune_configs.get_config("quickstart"),
  )
  print(markdown_table(results))
  print(
    f"Wrote {root}/results.json, results.md and comparison.png "
    f"({results['seconds_this_invocation'] / 60:.1f} min)."
  )


if __name__ == "__main__":
  app.run(main)
