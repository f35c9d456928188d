"""Measured properties of the research environment family.

`measure` runs the scripted (plausible but untrained) policy on a set of task seeds,
with or without the simulated human, through the real loop and store, and reports
success rate, score and episode length. The properties the environment must hold:

- a typical episode needs at least 50 steps (median episode length);
- outcome-only sampling rarely succeeds (success rate without a human is low);
- the knowledge a human gives raises success a lot (with the simulated human);
- train and test task sets are separate (`research_env.seeds_for`).

    python -m apollo.agents.research_metrics --episodes 60 --split test
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

from apollo.agents import agent, storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import simulated_human


def measure(
  split: str = "train",
  episodes: int = 24,
  with_human: bool = False,
  delay_steps: int = 2,
  budget: int = 4,
  start: int = 0,
  store_path: str | None = None,
) -> dict[str, Any]:
  """Runs `episodes` seeded episodes; returns aggregate metrics."""
  tmp = None
  if store_path is None:
    tmp = tempfile.TemporaryDirectory()
    store_path = os.path.join(tmp.name, "metrics.sqlite")
  store = storage.SQLiteStore(store_path)
  human = simulated_human.SimulatedHuman(
    client_lib.LocalClient.for_store(store), delay_steps=delay_steps, budget=budget
  )
  rows = []
  try:
    for seed in research_env.seeds_for(split, episodes, start=start):
      sid = f"{split}-{seed}-{'human' if with_human else 'solo'}"
      result = agent.run_episode(
        sid,
        research_env.ResearchEnv(),
        research_policy.ScriptedResearchPolicy(seed),
        store,
        seed,
        listeners=[human.on_step] if with_human else (),
      )
      rows.append(
        {"seed": seed, **result, **{f"human_{k}": v for k, v in human.interventions(sid).items()}}
      )
  finally:
    store.close()
    if tmp is not None:
      tmp.cleanup()
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
