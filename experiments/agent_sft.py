r"""Agent-policy SFT on masked per-step samples: a thin absl main over the trainer.

  python -m experiments.agent_sft --flagfile=experiments/flags/agent_sft_quickstart.flags
  python -m experiments.agent_sft --flagfile=experiments/flags/agent_sft_smollm2.flags
  python -m experiments.agent_sft --workdir=runs/sft \
      --config=apollo/agents/configs/sft.py:smollm2 \
      --config.init_from=/path/to/hf_dir --config.data.train_path=runs/data/train.jsonl
  python -m experiments.agent_sft --workdir=runs/sft \
      --config=apollo/agents/configs/sft.py:quickstart \
      --config.data.train_path=runs/data/train.jsonl \
      --config.data.tokenizer_path=runs/data/tokenizer.json

`--config.init_from` takes any name or path `apollo.models.load` takes; the samples
must be rendered with that checkpoint's tokenizer and chat template. Rerunning the
same command resumes from `--workdir` (checkpoints, data position). At the end the
policy is exported to `WORKDIR/policy`, which `apollo.models.load` and the 'flax'
rollout backend load (`make_flax_backend(seed, checkpoint='WORKDIR/policy')`). The trainer
is `apollo.agents.training.sft.train_and_evaluate`; the fields are in
`apollo/agents/configs/sft.py`.

If no checkpoint there restores, every rerun refuses until `--start_over` (the damaged
checkpoints move to WORKDIR/checkpoints.damaged/<n>/). A config that cannot work
(unknown field, learning rate <= 0, step counts or intervals <= 0) is one error line.
"""

from absl import app, flags

from apollo.agents.training import sft
from apollo.common import checkpoint as checkpoint_lib
from apollo.common import cli

_CONFIG = cli.define_config_flag(
  "apollo/agents/configs/sft.py:quickstart",
  "Config file and preset (quickstart, compare, smollm2, qwen2_0_5b); override with --config.x=y.",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoints, metrics and the policy go here.", required=True
)
_START_OVER = cli.define_start_over_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint_lib.quiet_orbax_logs()
  result = sft.train_and_evaluate(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)
  train, evaluation = result["train"], result["eval"]
  print(
    f"step {result['step']}"
    + (" (preempted)" if result["preempted"] else "")
    + (f" | train loss {train['loss']:.4f}" if train else "")
    + (
      f" | eval loss {evaluation['loss']:.4f} token_acc {evaluation['token_acc']:.3f}"
      if evaluation
      else ""
    )
    + (f" | policy {result['policy_dir']}" if result["policy_dir"] else "")
  )


if __name__ == "__main__":
  cli.run(main)
