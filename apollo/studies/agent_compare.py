"""The paper's comparison on the built-in research environment: variants (a)..(e).

Apollo (D. Fu et al., "Interaction as Intelligence Part II: Asynchronous
Human-Agent Rollout for Long-Horizon Task Training", arXiv 2510.27630, 2025)
trains on human-guided rollouts with sub-optimal actions masked, and compares that
with an untrained policy and with outcome-filtered autonomous rollouts. This study
runs the same comparison at small scale. `run_comparison(config, workdir)` (entry
point: `experiments/agent_compare.py`):

0. Tokenizer: a byte-level BPE (`collect.train_tokenizer`) trained on the text of
   a few scripted rollouts, so the agent's strings are short.
1. The base policy (a): a tiny decoder warm-started by behaviour cloning (SFT with
   `apollo.agents.training.sft`) on scripted rollouts of TRAIN seeds:
   `bc_episodes` without a human (the scripted policy drifts: default or random
   learning rates, GPU 0, rarely filters labels, kills runs on loss plateaus) and
   `bc_guided_episodes` with the simulated human, its advice kept in the context,
   so the base policy has seen advice being followed (as an instruction-tuned
   model has). Unparseable calls are masked; everything else is imitated, drift
   included. The result acts plausibly and drifts.
2. Per pipeline seed: rollouts on fresh TRAIN tasks, `collect_episodes` without a
   human and as many with the simulated human (asynchronous advice,
   `delay_steps` late, at most `budget` messages). Every action of the guided
   rollouts is judged by the rules and the human's flags
   (`judging.judge_sessions`; the human's flags decide where present). Training
   sets, all rendered through the compact view the policy acts on
   (`compact_view.policy_view`):
     (b) the no-human rollouts, outcome-filtered (successful episodes; if none
         succeeded, the best quartile by score with a score > 0), every parseable
         action trained;
     (c) the human-guided rollouts, judged-bad actions masked (kept as context),
         human messages removed from the context;
     (d) as (c), no action masked (only unparseable calls);
     (e) as (c), human messages kept in the context.
   Each is fine-tuned from the base for `sft_steps` (same steps, same optimizer).
3. Every variant (and the base, (a)) plays `eval_episodes` held-out TEST tasks
   without a human. Reported per variant: mean and standard deviation over seeds
   of the score and the success rate, interventions per episode of its training
   rollouts, the fraction of actions masked, and the cost in environment steps.

The policy sees the compact view (a one-line system prompt and the last
`history_messages` messages) rather than the loop's full context, which would make
every CPU prefill and training row several times longer; the training samples
are rendered through the same view, so training and inference agree.

Who acts in the training rollouts (b..e), `rollout_agent`: 'policy' is the real
thing (the Flax base policy acts, the human steers it); 'scripted' (the
quickstart default) lets the scripted policy act instead: it drifts like an
untrained model and follows advice. results.json records which agent collected
the data. Evaluation is always the fine-tuned Flax policies on TEST tasks without
a human.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging
from matplotlib.figure import Figure

from apollo.agents import guidance as guidance_lib
from apollo.agents import storage
from apollo.agents.backends import compact_view, flax_policy
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.supervision import judging
from apollo.agents.training import collect, sft
from apollo.agents.training import samples as samples_lib
from apollo.models import chat_template as chat_lib

VARIANTS = ("a", "b", "c", "d", "e")
VARIANT_NAMES = {
  "a": "untrained base policy",
  "b": "outcome-filtered autonomous rollouts (no human)",
  "c": "Apollo: human-guided, action-level filtering, human messages removed",
  "d": "human-guided, no filtering",
  "e": "human-guided, filtering, human messages kept",
}
# A bounded dictionary of the BC seeds' starts: collection and eval seeds never overlap.
_BC_SEED_START = 0
_COLLECT_SEED_START = 10_000


# -----------------------------------------------------------------------------
# Training sets
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingSet:
  """One variant's samples and what collecting them cost."""

  samples: list[samples_lib.Sample]
  stats: samples_lib.SampleStats
  episodes: int
  env_steps: int


def training_set(
  store_path: str,
  episodes: Sequence[collect.Episode],
  template: chat_lib.ChatTemplate,
  history: int,
  judged: bool = False,
  keep_guidance: bool = False,
) -> TrainingSet:
  """One sample per trained action of `episodes`, rendered through the compact view.

  `judged`: the stored verdicts decide (masked actions stay in later contexts);
  otherwise every parseable action is trained.
  """
  store = storage.SQLiteStore(store_path)
  try:
    built, stats = samples_lib.build_samples(
      store,
      template,
      [e.session_id for e in episodes],
      verdicts="judged" if judged else "parseable",
      human_messages="keep" if keep_guidance else "remove",
      view=functools.partial(compact_view.policy_view, history=history),
    )
  finally:
    store.close()
  return TrainingSet(built, stats, len(episodes), sum(e.env_steps for e in episodes))


def variant_training_sets(
  store_path: str,
  solo: Sequence[collect.Episode],
  guided: Sequence[collect.Episode],
  template: chat_lib.ChatTemplate,
  history: int,
  variants: Sequence[str] = ("b", "c", "d", "e"),
) -> tuple[dict[str, TrainingSet], str]:
  """The training sets of (b)..(e) from one seed's rollouts, and how (b) was filtered.

  Judges every action of the `guided` rollouts (rules + the human's flags, which
  decide where present), then: (b) the `solo` rollouts outcome-filtered (the
  successes; if none, the best quartile with a score > 0), every parseable action
  trained; (c) the guided ones, judged-bad actions masked, human messages removed;
  (d) as (c), nothing masked but unparseable calls; (e) as (c), human messages kept.
  (b)'s `env_steps` count every autonomous rollout, not only the kept ones.
  Returns ({variant: TrainingSet} for the requested `variants`, 'success' or
  'best_quartile').
  """
  with contextlib.closing(storage.SQLiteStore(store_path)) as store:
    if guided:
      judging.judge_sessions(store, [e.session_id for e in guided])
    kept_ids = samples_lib.outcome_filter(
      store, session_ids=[e.session_id for e in solo], best_fraction=0.25
    )
  by_id = {e.session_id: e for e in solo}
  kept = [by_id[sid] for sid in kept_ids]
  how = "success" if any(e.result.get("success") for e in solo) else "best_quartile"
  build = {
    "b": lambda: training_set(store_path, kept, template, history),
    "c": lambda: training_set(store_path, guided, template, history, judged=True),
    "d": lambda: training_set(store_path, guided, template, history),
    "e": lambda: training_set(
      store_path, guided, template, history, judged=True, keep_guidance=True
    ),
  }
  sets = {v: build[v]() for v in variants if v in build}
  if "b" in sets:
    sets["b"].env_steps = sum(e.env_steps for e in solo)
  return sets, how


# -----------------------------------------------------------------------------
# The comparison
# -----------------------------------------------------------------------------


def _sft_config(
  config: ml_collections.ConfigDict, steps: int, lr: float, seed: int, init_from: str
) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  with c.unlocked():
    del c["compare"]
  c.seed, c.train_steps, c.init_from = seed, steps, init_from
  c.optimizer.learning_rate = lr
  c.checkpoint_every = max(steps, 1)
  c.eval_every = max(steps, 1)
  c.log_every = max(1, min(c.log_every, steps))
  return c


class _PolicyCache:
  """Loads each exported policy once; hands out Flax backends on it."""

  def __init__(self, p: ml_collections.ConfigDict):
    self.p, self._models = p, {}

  def agent(self, policy_dir: str, sample_seed: int):
    if policy_dir not in self._models:
      self._models[policy_dir] = sft.load_policy(policy_dir)
    model, tokenizer = self._models[policy_dir]
    inner = flax_policy.FlaxPolicyBackend(
      model,
      tokenizer,
      max_new_tokens=self.p.max_new_tokens,
      temperature=self.p.temperature,
      seed=sample_seed,
      prompt_bucket=self.p.prompt_bucket,
    )
    return compact_view.ViewedBackend(inner, self.p.history_messages)


def _summary(values: Sequence[float]) -> tuple[float, float]:
  vals = [float(v) for v in values]
  if not vals:
    return float("nan"), float("nan")
  return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole comparison in `workdir`; returns results.json's content."""
  p = config.compare
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  timings: dict[str, float] = {}

  # 0-1. Tokenizer and base policy (shared by every seed).
  bc_store = os.path.join(workdir, "bc", "rollouts.sqlite")
  os.makedirs(os.path.dirname(bc_store), exist_ok=True)
  bc_solo = collect.scripted_rollouts(
    bc_store,
    research_env.seeds_for("train", p.bc_episodes, _BC_SEED_START),
    False,
    p.max_steps,
    "bc-solo",
  )
  bc_guided = collect.scripted_rollouts(
    bc_store,
    research_env.seeds_for("train", p.bc_guided_episodes, _BC_SEED_START + p.bc_episodes),
    True,
    p.max_steps,
    "bc-guided",
  )
  tok_dir = os.path.join(workdir, "tokenizer")
  tokenizer = collect.train_tokenizer(bc_store, bc_solo + bc_guided, p.tokenizer_vocab, tok_dir)
  tokenizer_path = os.path.join(tok_dir, "tokenizer.json")
  template = chat_lib.ChatTemplate(tokenizer, guidance_tag=guidance_lib.GUIDANCE_TAG)
  bc = training_set(bc_store, bc_solo, template, p.history_messages)
  bc_g = training_set(bc_store, bc_guided, template, p.history_messages, keep_guidance=True)
  bc_samples = bc.samples + bc_g.samples
  base = sft.train_and_evaluate(
    _sft_config(config, p.bc_steps, p.bc_learning_rate, 0, ""),
    os.path.join(workdir, "base"),
    samples=bc_samples,
    tokenizer_path=tokenizer_path,
  )
  base_dir = base["policy_dir"]
  timings["base"] = time.time() - t_start
  logging.info(
    "Base policy: %d BC samples, final loss %.3f",
    len(bc_samples),
    base["train"].get("loss", float("nan")),
  )
  policies = _PolicyCache(p)

  per_seed: list[dict[str, Any]] = []
  for seed in p.seeds:
    t_seed = time.time()
    sdir = os.path.join(workdir, f"seed{seed}")
    store_path = os.path.join(sdir, "rollouts.sqlite")
    os.makedirs(sdir, exist_ok=True)
    collect_seeds = research_env.seeds_for(
      "train", p.collect_episodes, _COLLECT_SEED_START + 1000 * seed
    )
    if p.rollout_agent == "scripted":
      make_agent = lambda s: research_policy.ScriptedResearchPolicy(seed=s)
    elif p.rollout_agent == "policy":
      make_agent = lambda s, seed=seed: policies.agent(base_dir, 7919 * seed + s)
    else:
      raise ValueError(
        f"--config.compare.rollout_agent={p.rollout_agent!r}: 'policy' or 'scripted'."
      )
    solo = collect.run_episodes(store_path, "solo", collect_seeds, make_agent, False, p.max_steps)
    guided = collect.run_episodes(
      store_path,
      "human",
      collect_seeds,
      make_agent,
      True,
      p.max_steps,
      p.human_delay_steps,
      p.human_budget,
    )
    sets, how = variant_training_sets(store_path, solo, guided, template, p.history_messages)
    policy_dirs = {"a": base_dir}
    for v, data in sets.items():
      if not data.samples:
        logging.warning("seed %d variant %s: no training samples; it stays the base.", seed, v)
        policy_dirs[v] = base_dir
        continue
      out = sft.train_and_evaluate(
        _sft_config(config, p.sft_steps, p.sft_learning_rate, seed, base_dir),
        os.path.join(sdir, f"sft_{v}"),
        samples=data.samples,
        tokenizer_path=tokenizer_path,
      )
      policy_dirs[v] = out["policy_dir"]
    test = research_env.seeds_for("test", p.eval_episodes, 0)
    evals = {}
    for v in VARIANTS:
      eps = collect.run_episodes(
        store_path,
        f"eval-{v}",
        test,
        lambda s, v=v: policies.agent(policy_dirs[v], 104729 * seed + s),
        False,
        p.max_steps,
      )
      evals[v] = dict(
        score=statistics.fmean(e.result.get("score", 0.0) for e in eps),
        success_rate=statistics.fmean(float(bool(e.result.get("success"))) for e in eps),
        eval_env_steps=statistics.fmean(e.env_steps for e in eps),
        episodes=[
          dict(
            seed=e.seed,
            score=e.result.get("score", 0.0),
            success=bool(e.result.get("success")),
            steps=e.env_steps,
          )
          for e in eps
        ],
      )
    human_msgs = statistics.fmean(e.interventions for e in guided) if guided else 0.0
    row = dict(
      seed=seed,
      outcome_filter=how,
      collection=dict(
        solo_success_rate=statistics.fmean(float(bool(e.result.get("success"))) for e in solo),
        solo_score=statistics.fmean(e.result.get("score", 0.0) for e in solo),
        human_success_rate=statistics.fmean(float(bool(e.result.get("success"))) for e in guided),
        human_score=statistics.fmean(e.result.get("score", 0.0) for e in guided),
      ),
      variants={},
    )
    for v in VARIANTS:
      data = sets.get(v)
      row["variants"][v] = dict(
        evals[v],
        interventions_per_episode=human_msgs if v in ("c", "d", "e") else 0.0,
        fraction_masked=data.stats.fraction_masked if data else 0.0,
        train_samples=len(data.samples) if data else 0,
        train_episodes=data.episodes if data else 0,
        collection_env_steps=data.env_steps if data else 0,
        trained=policy_dirs[v] != base_dir or v == "a",
      )
    per_seed.append(row)
    timings[f"seed{seed}"] = time.time() - t_seed
    logging.info("seed %d: %s", seed, {v: round(r["score"], 1) for v, r in row["variants"].items()})

  results = aggregate(per_seed)
  results.update(
    config=json.loads(config.to_json_best_effort()),
    rollout_agent=p.rollout_agent,
    base_policy=dict(
      bc_episodes_without_human=len(bc_solo),
      bc_episodes_with_human=len(bc_guided),
      bc_samples=len(bc_samples),
      bc_steps=p.bc_steps,
      bc_env_steps=bc.env_steps + bc_g.env_steps,
      bc_scripted_success_rate=statistics.fmean(
        float(bool(e.result.get("success"))) for e in bc_solo
      )
      if bc_solo
      else 0.0,
      final_train_loss=base["train"].get("loss"),
    ),
    per_seed=per_seed,
    timings_s=timings,
    wall_s=time.time() - t_start,
  )
  write_reports(results, workdir)
  return results


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean and standard deviation over seeds for every variant."""
  variants = {}
  for v in VARIANTS:
    rows = [r["variants"][v] for r in per_seed]
    score, score_std = _summary([r["score"] for r in rows])
    succ, succ_std = _summary([r["success_rate"] for r in rows])
    variants[v] = dict(
      name=VARIANT_NAMES[v],
      score_mean=score,
      score_std=score_std,
      success_rate_mean=succ,
      success_rate_std=succ_std,
      interventions_per_episode=_summary([r["interventions_per_episode"] for r in rows])[0],
      fraction_masked=_summary([r["fraction_masked"] for r in rows])[0],
      collection_env_steps=_summary([r["collection_env_steps"] for r in rows])[0],
      eval_env_steps_per_episode=_summary([r["eval_env_steps"] for r in rows])[0],
      train_samples=_summary([r["train_samples"] for r in rows])[0],
      seeds=len(rows),
    )
  return {"variants": variants}


def markdown_table(results: Mapping[str, Any]) -> str:
  lines = [
    "| variant | score (mean ± std) | success rate | interventions / episode | "
    "fraction masked | train samples | env steps to collect | eval steps / episode |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for v, r in results["variants"].items():
    lines.append(
      f"| ({v}) {r['name']} | {r['score_mean']:.1f} ± {r['score_std']:.1f} | "
      f"{100 * r['success_rate_mean']:.0f}% ± {100 * r['success_rate_std']:.0f} | "
      f"{r['interventions_per_episode']:.2f} | {r['fraction_masked']:.2f} | "
      f"{r['train_samples']:.0f} | {r['collection_env_steps']:.0f} | "
      f"{r['eval_env_steps_per_episode']:.0f} |"
    )
  return "\n".join(lines) + "\n"


def write_reports(results: Mapping[str, Any], workdir: str) -> None:
  """results.json, results.md (the table) and results.png (score and success bars)."""
  with open(os.path.join(workdir, "results.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, default=float)
  os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
  table = markdown_table(results)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"Rollout agent for the training data: {results.get('rollout_agent')}\n\n{table}")
  plot_results(results, os.path.join(workdir, "results.png"))


COLORS = {"a": "#999999", "b": "#6baed6", "c": "#d62728", "d": "#fd8d3c", "e": "#74c476"}


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """Bars of the test score and success rate per variant, with the std over seeds."""
  names = list(results["variants"])
  fig = Figure(figsize=(9, 3.2))  # no pyplot: no global state, no GUI backend
  axes = fig.subplots(1, 2)
  for ax, key, label in (
    (axes[0], "score", "test score"),
    (axes[1], "success_rate", "test success rate"),
  ):
    means = [results["variants"][v][f"{key}_mean"] for v in names]
    stds = [results["variants"][v][f"{key}_std"] for v in names]
    ax.bar(
      [f"({v})" for v in names],
      means,
      yerr=stds,
      capsize=4,
      color=[COLORS.get(v, "#999999") for v in names],
    )
    ax.set_title(label)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
