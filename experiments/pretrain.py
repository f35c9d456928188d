r"""APOLLO continued pretraining (S-MLM + E-CLS): a thin absl main over the trainer.

  python -m experiments.pretrain --flagfile=experiments/flags/quickstart.flags
  python -m experiments.pretrain --flagfile=experiments/flags/minilm_pretrain.flags
  python -m experiments.pretrain --workdir=runs/pretrain \
      --config=apollo/lm/configs/pretrain.py:quickstart --config.train_steps=100

Rerunning the same command resumes from `--workdir` (checkpoints, data position).
If no checkpoint there restores, every rerun refuses until `--start_over` (the damaged
checkpoints move to WORKDIR/checkpoints.damaged/<n>/). A config that cannot work
(unknown field, learning rate <= 0, step counts or intervals <= 0) is one error line.
Multi-host jobs call `jax.distributed.initialize()` when the launcher sets the
usual variables (see `apollo.common.mesh.initialize_distributed`). The trainer is
`apollo.lm.pretrain.train_and_evaluate`; the config fields and presets are in
`apollo/lm/configs/pretrain.py`.
"""

from absl import app, flags, logging

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import cli
from apollo.lm import pretrain

_CONFIG = cli.define_config_flag(
  "apollo/lm/configs/pretrain.py:quickstart",
  "Config file and preset (quickstart, minilm, base, large); override fields with "
  "--config.x=y, e.g. --config.init_from=minilm-l6 to continue a checkpoint.",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoints, metrics and prepared data go here.", required=True
)
_START_OVER = cli.define_start_over_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint_lib.quiet_orbax_logs()
  result = pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)
  train, evaluation = result["train"], result["eval"]
  logging.info("Done at step %d%s.", result["step"], " (preempted)" if result["preempted"] else "")
  print(
    f"step {result['step']}"
    + (f" | train loss {train['loss']:.4f}" if train else "")
    + (
      f" | eval mlm_acc {evaluation['mlm_acc']:.4f} ecls_acc {evaluation['ecls_acc']:.4f}"
      if evaluation
      else ""
    )
  )


if __name__ == "__main__":
  cli.run(main)
