r"""Multiple-choice fine-tuning (ReClor, LogiQA, the generated logic set): a thin absl main.

  python -m experiments.finetune --flagfile=experiments/flags/quickstart_finetune.flags
  python -m experiments.finetune --flagfile=experiments/flags/minilm_finetune.flags
  python -m experiments.finetune --flagfile=experiments/flags/reclor_roberta_large.flags
  python -m experiments.finetune --workdir=runs/finetune \
      --config=apollo/lm/configs/finetune.py:quickstart --config.train_steps=50

Rerunning the same command resumes from `--workdir`.
If no checkpoint there restores, every rerun refuses until `--start_over` (the damaged
checkpoints move to WORKDIR/checkpoints.damaged/<n>/). A config that cannot work
(unknown field, learning rate <= 0, step counts or intervals <= 0) is one error line.
The trainer is
`apollo.lm.finetune.train_and_evaluate`; the config fields and presets are in
`apollo/lm/configs/finetune.py`.
"""

from absl import app, flags, logging

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import cli
from apollo.lm import finetune

_CONFIG = cli.define_config_flag(
  "apollo/lm/configs/finetune.py:quickstart",
  "Config file and preset (quickstart, minilm, reclor_base, reclor_large, logiqa_base, "
  "logiqa_large); override fields with --config.x=y.",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoints, metrics, predictions and results go here.", required=True
)
_START_OVER = cli.define_start_over_flag()


def format_result(result) -> str:
  """One line: step, then accuracy per evaluated split (and Test-E/H where known)."""
  parts = [f"step {result['step']}"]
  for name, summary in result["eval"].items():
    if "accuracy" in summary:
      parts.append(f"{name} accuracy {summary['accuracy']:.4f}")
    for key in ("test_e_accuracy", "test_h_accuracy"):
      if key in summary:
        parts.append(f"{key.split('_accuracy')[0]} {summary[key]:.4f}")
  best = result.get("best") or {}
  if best:
    parts.append(f"best validation {best['validation']['accuracy']:.4f} at step {best['step']}")
  return " | ".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint_lib.quiet_orbax_logs()
  result = finetune.train_and_evaluate(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)
  logging.info("Done at step %d%s.", result["step"], " (preempted)" if result["preempted"] else "")
  print(format_result(result))


if __name__ == "__main__":
  cli.run(main)
