"""The scripted baseline on the research environment: how hard the tasks are.

Apollo's environments must be long-horizon, rarely solved by autonomous rollouts,
and much easier with the knowledge a human gives (D. Fu et al., "Interaction as
Intelligence Part II: Asynchronous Human-Agent Rollout for Long-Horizon Task
Training", arXiv 2510.27630, 2025). `measure` checks that on the built-in research
family: it runs the scripted (plausible but untrained) policy on a set of task
seeds, with or without the simulated human, through the real loop and store, and
reports success rate, score, episode length and interventions. The README holds
the measured table.

    python -m apollo.studies.research_baseline --episodes 60 --split test
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.training import collect


def measure(
  split: str = "train",
  episodes: int = 24,
  with_human: bool = False,
  delay_steps: int = 2,
  budget: int = 4,
  start: int = 0,
  store_path: str | None = None,
  max_steps: int = 400,
) -> dict[str, Any]:
  """Runs `episodes` seeded episodes; returns aggregate metrics."""
  with tempfile.TemporaryDirectory() as tmp:
    eps = collect.run_episodes(
      store_path or os.path.join(tmp, "metrics.sqlite"),
      f"{split}-{'human' if with_human else 'solo'}",
      research_env.seeds_for(split, episodes, start=start),
      lambda seed: research_policy.ScriptedResearchPolicy(seed),
      with_human,
      max_steps,
      delay_steps,
      budget,
    )
  rows = [{"seed": e.seed, **e.result, "human_messages": e.interventions} for e in eps]
  steps = [r["steps"] for r in rows]
  return {
    "split": split,
    "episodes": len(rows),
    "with_human": with_human,
    "success_rate": sum(r["success"] for r in rows) / len(rows),
    "mean_score": statistics.fmean(r["score"] for r in rows),
    "median_steps": statistics.median(steps),
    "min_steps": min(steps),
    "max_steps": max(steps),
    "mean_interventions": statistics.fmean(r["human_messages"] for r in rows),
    "rows": rows,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--episodes", type=int, default=40)
  parser.add_argument("--split", default="train", choices=["train", "test"])
  args = parser.parse_args()
  print(
    "| split | human | episodes | success | mean score | median steps | min steps "
    "| interventions/episode |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for with_human in (False, True):
    m = measure(args.split, args.episodes, with_human)
    print(
      f"| {m['split']} | {'yes' if with_human else 'no'} | {m['episodes']} | "
      f"{m['success_rate']:.0%} | {m['mean_score']:.1f} | {m['median_steps']:g} | "
      f"{m['min_steps']} | {m['mean_interventions']:.2f} |"
    )


if __name__ == "__main__":
  main()
