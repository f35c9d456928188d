r"""The paper's comparison, variants (a)..(e), on the research environment's TEST tasks.

  python -m experiments.agent_compare \
      --flagfile=experiments/flags/compare_quickstart.flags --workdir=runs/compare

Writes WORKDIR/results.json (per variant: mean and std over seeds of the score and
success rate, interventions per episode, fraction of actions masked, cost in
environment steps; plus every seed's rows), WORKDIR/results.md (the table) and
WORKDIR/results.png. Rerunning resumes: finished rollouts are reused from the
stores and every fine-tune resumes from its checkpoints. The pipeline is
`apollo.studies.agent_compare.run_comparison`; the fields are `compare.*` in
`apollo/agents/configs/sft.py` (preset `compare`).
"""

from absl import app, flags
from ml_collections import config_flags

from apollo.common import checkpoint as checkpoint_lib
from apollo.studies import agent_compare

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "apollo/agents/configs/sft.py:compare",
  "Config file and preset (compare); override with --config.compare.x=y.",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Rollouts, policies and results go here.", required=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint_lib.quiet_orbax_logs()
  results = agent_compare.run_comparison(_CONFIG.value, _WORKDIR.value)
  print(agent_compare.markdown_table(results))
  print(f"results: {_WORKDIR.value}/results.json ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
