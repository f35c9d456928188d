r"""The paper's comparison, variants (a)..(e), on the research environment's TEST tasks.

On SmolLM2-135M-Instruct (`apollo.studies.policy_compare`; CPU size, indicative, or
the GPU size: >= 3 seeds, 20 test episodes per variant)::

  python -m experiments.agent_compare \
      --flagfile=experiments/flags/compare_cpu.flags --workdir=runs/compare_cpu
  python -m experiments.agent_compare \
      --flagfile=experiments/flags/compare_gpu.flags --workdir=runs/compare_gpu

The tiny decoder trained from scratch (`apollo.studies.agent_compare`, the test
suite's size)::

  python -m experiments.agent_compare \
      --flagfile=experiments/flags/compare_quickstart.flags --workdir=runs/compare

Writes WORKDIR/results.json, WORKDIR/results.md (the table) and WORKDIR/results.png.
Rerunning the same command resumes: collected rollouts, trained policies and
finished evaluations are reused. `--collector`, `--model` and `--variants` override
the checkpoint config's `compare.*` fields (fields: `apollo/studies/policy_compare.py`).
"""

from absl import app, flags
from ml_collections import config_flags

from apollo.common import checkpoint as checkpoint_lib
from apollo.studies import agent_compare, policy_compare

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "apollo/agents/configs/sft.py:compare",
  "Config file and preset: apollo/studies/policy_compare.py:cpu|gpu (a checkpoint) or "
  "apollo/agents/configs/sft.py:compare (the tiny decoder).",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Rollouts, policies and results go here.", required=True
)
_COLLECTOR = flags.DEFINE_enum(
  "collector",
  None,
  list(policy_compare.COLLECTORS),
  "Who collects the training rollouts: the drifting scripted policy or the model itself.",
)
_MODEL = flags.DEFINE_string(
  "model", None, "The base checkpoint: a registered name, a local HF directory or a .gguf."
)
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run, e.g. a,b,c,d,e.")

flags.register_validator(
  "model",
  lambda m: m is None or policy_compare.model_exists(m),
  message="not a registered checkpoint name, a local HF directory or a .gguf file.",
)
flags.register_validator(
  "variants",
  lambda vs: vs is None or (bool(vs) and all(v in policy_compare.VARIANTS for v in vs)),
  message=f"choose from {','.join(policy_compare.VARIANTS)}.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  overrides = dict(collector=_COLLECTOR.value, model=_MODEL.value, variants=_VARIANTS.value)
  on_checkpoint = "collector" in config.get("compare", {})
  if not on_checkpoint and any(v is not None for v in overrides.values()):
    raise app.UsageError(
      "--collector, --model and --variants need --config=apollo/studies/policy_compare.py:PRESET."
    )
  checkpoint_lib.quiet_orbax_logs()
  if not on_checkpoint:
    results = agent_compare.run_comparison(config, _WORKDIR.value)
    print(agent_compare.markdown_table(results))
  else:
    for k, v in overrides.items():
      if v is not None:
        config.compare[k] = ",".join(v) if k == "variants" else v
    try:
      policy_compare.check_config(config)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    results = policy_compare.run_comparison(config, _WORKDIR.value)
    print(policy_compare.markdown_report(results))
  print(f"results: {_WORKDIR.value}/results.json ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
