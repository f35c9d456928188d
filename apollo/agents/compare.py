"""The paper's comparison on the built-in research environment: variants (a)..(e).

`run_comparison(config, workdir)` (entry point: `experiments/agent_compare.py`):

0. Tokenizer: a byte-level BPE (`chat_template.train_chat_tokenizer`) trained on
   the text of a few scripted rollouts, so the agent's strings are short.
1. The base policy (a): a tiny decoder warm-started by behaviour cloning (SFT with
   `apollo.agents.sft`) on scripted rollouts of TRAIN seeds: `bc_episodes`
   without a human (the scripted policy drifts: default or random learning rates,
   GPU 0, rarely filters labels, kills runs on loss plateaus) and
   `bc_guided_episodes` with the simulated human, its advice kept in the context,
   so the base policy has seen advice being followed (as an instruction-tuned
   model has). Invalid calls are masked; everything else is imitated, drift
   included. The result acts plausibly and drifts.
2. Per pipeline seed: the base policy rolls out on fresh TRAIN tasks,
   `collect_episodes` without a human and as many with the simulated human
   (asynchronous advice, `delay_steps` late, at most `budget` messages). Every
   action is judged by `judging.RuleJudge` + `judging.HumanFlagJudge` (the human's
   flags decide where present). Training sets, all rendered through the same
   compact view the policy acts on:
     (b) the no-human rollouts, outcome-filtered (successful episodes; if none
         succeeded, the best quartile by score with a score > 0), every action trained;
     (c) the human-guided rollouts, judged-bad actions masked (kept as context),
         human messages removed from the context;
     (d) as (c), no action masked;
     (e) as (c), human messages kept in the context.
   Each is fine-tuned from the base for `sft_steps` (same steps, same optimizer).
3. Every variant (and the base, (a)) plays `eval_episodes` held-out TEST tasks
   without a human. Reported per variant: mean and standard deviation over seeds
   of the score and the success rate, interventions per episode of its training
   rollouts, the fraction of actions masked, and the cost in environment steps.

The policy's view of the context (`policy_view`): a one-line system prompt (one
JSON tool call per reply, follow human guidance) and the last `history_messages`
messages (the observations carry the clock, budget and submissions left). The full
loop context (its system prompt alone is
~3k characters) would make every CPU prefill and training row several times
longer; the stored steps keep the exact full messages, and the training samples
are rendered through the same view the policy sees, so training and inference
agree. (`apollo.agents.sft_data` renders the exact stored messages; it is what a
real-size policy trains on.)

Who acts in the training rollouts (b..e), `rollout_agent`: 'policy' is the real
thing (the Flax base policy acts, the human steers it); 'scripted' (the quickstart
default) lets the scripted policy act instead: it drifts like an untrained model and
follows advice. Measured on the quickstart's tiny CPU policy, 'policy' rollouts never
launch a valid run within 110 steps (more than half the calls are broken), so the
human never has anything to correct and every variant's data is empty or identical;
results.json records which agent collected the data. Evaluation is always the
fine-tuned Flax policies on TEST tasks without a human.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from apollo.agents import agent as agent_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents import storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import judging, simulated_human
from apollo.models import chat_template as chat_lib

VARIANTS = ("a", "b", "c", "d", "e")
VARIANT_NAMES = {
  "a": "untrained base policy",
  "b": "outcome-filtered autonomous rollouts (no human)",
  "c": "Apollo: human-guided, action-level filtering, human messages removed",
  "d": "human-guided, no filtering",
  "e": "human-guided, filtering, human messages kept",
}
_TOOL_NAMES = ", ".join(t.name for t in research_env.ResearchEnv().tools())
COMPACT_SYSTEM_PROMPT = "Research agent. One JSON tool call per reply. Follow <human_guidance>."
# A bounded dictionary of the BC seeds' starts: collection and eval seeds never overlap.
_BC_SEED_START = 0
_COLLECT_SEED_START = 10_000


# -----------------------------------------------------------------------------
# The policy's view of the context
# -----------------------------------------------------------------------------


def policy_view(
  messages: Sequence[Mapping[str, str]], history: int, keep_guidance: bool = True
) -> list[dict[str, str]]:
  """A one-line system prompt + the last `history` messages (the task message first).

  Guidance messages ride along on top of the window (they arrive between an
  observation and the next action), so advice is seen for `history` turns.
  """
  rest = [dict(m) for m in messages[1:]]
  if not keep_guidance:
    rest = [m for m in rest if not guidance_lib.is_guidance_message(m)]
  window, plain = [], 0
  for m in reversed(rest):
    if plain >= history:
      break
    window.append(m)
    plain += not guidance_lib.is_guidance_message(m)
  return [{"role": "system", "content": COMPACT_SYSTEM_PROMPT}] + window[::-1]


class ViewedBackend:
  """A backend that sees `policy_view(messages)` instead of the whole context."""

  def __init__(self, inner: Any, history: int):
    self.inner, self.history = inner, history
    self.name = getattr(inner, "name", "flax")

  def complete(self, messages, tools=()):
    return self.inner.complete(policy_view(messages, self.history), tools)

  def snapshot(self) -> dict[str, Any]:
    return self.inner.snapshot()

  def restore(self, state: Mapping[str, Any]) -> None:
    self.inner.restore(state)


# -----------------------------------------------------------------------------
# Rollouts, judging and samples
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Episode:
  session_id: str
  seed: int
  result: dict[str, Any]
  interventions: int
  env_steps: int


def run_episodes(
  store_path: str,
  prefix: str,
  seeds: Sequence[int],
  make_agent: Callable[[int], Any],
  with_human: bool,
  max_steps: int,
  delay_steps: int = 2,
  budget: int = 4,
) -> list[Episode]:
  """Runs (or, from the store, resumes / reuses) one episode per seed."""
  store = storage.SQLiteStore(store_path)
  human = simulated_human.SimulatedHuman(
    client_lib.LocalClient.for_store(store), delay_steps=delay_steps, budget=budget
  )
  episodes = []
  try:
    for seed in seeds:
      sid = f"{prefix}-{seed}"
      result = agent_lib.run_episode(
        sid,
        research_env.ResearchEnv(),
        make_agent(seed),
        store,
        seed,
        config=agent_lib.AgentConfig(max_steps=max_steps),
        listeners=[human.on_step] if with_human else (),
      )
      messages = sum(1 for g in store.list_guidance(sid) if g.source == simulated_human.SOURCE)
      episodes.append(Episode(sid, seed, dict(result), messages, int(store.num_steps(sid))))
  finally:
    store.close()
  return episodes


def judge_episodes(store_path: str, episodes: Sequence[Episode]) -> dict[str, dict[int, bool]]:
  """session -> {step: masked} by RuleJudge + HumanFlagJudge (the human's flag decides)."""
  store = storage.SQLiteStore(store_path)
  try:
    judges = [judging.RuleJudge(), judging.HumanFlagJudge()]
    return {
      e.session_id: {
        i: l.masked
        for i, l in judging.judge_session(
          store, e.session_id, judges, write_quality=True
        ).combined.items()
      }
      for e in episodes
    }
  finally:
    store.close()


@dataclasses.dataclass
class SampleSet:
  samples: list[dict[str, Any]]
  actions: int = 0
  masked: int = 0
  episodes: int = 0
  env_steps: int = 0

  @property
  def fraction_masked(self) -> float:
    return self.masked / self.actions if self.actions else 0.0


def build_samples(
  store_path: str,
  episodes: Sequence[Episode],
  template: chat_lib.ChatTemplate,
  history: int,
  masked: Mapping[str, Mapping[int, bool]] | None = None,
  keep_guidance: bool = False,
) -> SampleSet:
  """One sample per action step, rendered through `policy_view`.

  The target is the step's stored response; it is trained unless the judge masked
  it (`masked` None: every parseable action is trained; unparseable ones never are).
  A masked action yields no sample of its own but stays in later steps' context.
  """
  out = SampleSet(samples=[], episodes=len(episodes))
  store = storage.SQLiteStore(store_path)
  try:
    for e in episodes:
      out.env_steps += e.env_steps
      verdicts = (masked or {}).get(e.session_id, {})
      for step in store.get_steps(e.session_id):
        if step.kind != "action":
          continue
        out.actions += 1
        bad = (
          verdicts.get(step.step_index, False)
          if masked is not None
          else (step.parse_error is not None)
        )
        if bad:
          out.masked += 1
          continue
        messages = policy_view(step.messages, history, keep_guidance) + [
          {"role": "assistant", "content": step.response}
        ]
        rendered = template.render(messages)  # Only the final assistant turn is a target.
        mask = rendered.loss_mask & (rendered.segments == len(messages) - 1)
        out.samples.append({"input_ids": rendered.ids, "loss_mask": mask})
  finally:
    store.close()
  return out


def outcome_filtered(episodes: Sequence[Episode]) -> tuple[list[Episode], str]:
  """(b)'s episodes: the successes; if none, the best quartile with a score > 0."""
  wins = [e for e in episodes if e.result.get("success")]
  if wins:
    return wins, "success"
  scored = sorted(
    (e for e in episodes if e.result.get("score", 0) > 0), key=lambda e: -e.result["score"]
  )
  return scored[: max(1, len(episodes) // 4)] if scored else [], "best_quartile"


# -----------------------------------------------------------------------------
# Tokenizer and demo data
# -----------------------------------------------------------------------------


def scripted_rollouts(
  store_path: str, seeds: Sequence[int], with_human: bool, max_steps: int, prefix: str
) -> list[Episode]:
  return run_episodes(
    store_path,
    prefix,
    seeds,
    lambda s: research_policy.ScriptedResearchPolicy(seed=s),
    with_human,
    max_steps,
  )


def train_tokenizer(store_path: str, episodes: Sequence[Episode], vocab_size: int, out_dir: str):
  """A BPE trained on the compact views of `episodes` (plus the demo corpus)."""
  store = storage.SQLiteStore(store_path)
  texts = list(chat_lib.DEMO_CORPUS) + [COMPACT_SYSTEM_PROMPT]
  try:
    for e in episodes:
      steps = store.get_steps(e.session_id)
      if steps:
        texts.append(steps[0].messages[1]["content"])
      texts += [s.response for s in steps] + [s.observation for s in steps]
      texts += [g.text for g in store.list_guidance(e.session_id)]
  finally:
    store.close()
  return chat_lib.train_chat_tokenizer(texts, vocab_size=vocab_size, out_dir=out_dir)


def write_demo_samples(
  data_dir: str, episodes: int = 6, seed: int = 0, history: int = 2, vocab_size: int = 1024
) -> int:
  """Scripted rollouts of TRAIN seeds -> data_dir/{tokenizer.json, samples.jsonl}."""
  from apollo.agents import sft  # pylint: disable=g-import-not-at-top

  os.makedirs(data_dir, exist_ok=True)
  store_path = os.path.join(data_dir, "rollouts.sqlite")
  eps = scripted_rollouts(
    store_path, research_env.seeds_for("train", episodes, seed * 100), False, 200, "demo"
  )
  tokenizer = train_tokenizer(store_path, eps, vocab_size, data_dir)
  built = build_samples(
    store_path,
    eps,
    chat_lib.ChatTemplate(tokenizer, guidance_tag=guidance_lib.GUIDANCE_TAG),
    history,
  )
  return sft.write_jsonl_samples(os.path.join(data_dir, "samples.jsonl"), built.samples)


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
    from apollo.agents import sft  # pylint: disable=g-import-not-at-top
    from apollo.agents.backends import flax_policy  # pylint: disable=g-import-not-at-top

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
    return ViewedBackend(inner, self.p.history_messages)


def _summary(values: Sequence[float]) -> tuple[float, float]:
  vals = [float(v) for v in values]
  if not vals:
    return float("nan"), float("nan")
  return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole comparison in `workdir`; returns results.json's content."""
  from apollo.agents import sft  # pylint: disable=g-import-not-at-top

  p = config.compare
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  timings: dict[str, float] = {}

  # 0-1. Tokenizer and base policy (shared by every seed).
  bc_store = os.path.join(workdir, "bc", "rollouts.sqlite")
  os.makedirs(os.path.dirname(bc_store), exist_ok=True)
  bc_solo = scripted_rollouts(
    bc_store,
    research_env.seeds_for("train", p.bc_episodes, _BC_SEED_START),
    False,
    p.max_steps,
    "bc-solo",
  )
  bc_guided = scripted_rollouts(
    bc_store,
    research_env.seeds_for("train", p.bc_guided_episodes, _BC_SEED_START + p.bc_episodes),
    True,
    p.max_steps,
    "bc-guided",
  )
  tok_dir = os.path.join(workdir, "tokenizer")
  tokenizer = train_tokenizer(bc_store, bc_solo + bc_guided, p.tokenizer_vocab, tok_dir)
  tokenizer_path = os.path.join(tok_dir, "tokenizer.json")
  template = chat_lib.ChatTemplate(tokenizer, guidance_tag=guidance_lib.GUIDANCE_TAG)
  bc = build_samples(bc_store, bc_solo, template, p.history_messages)
  bc_g = build_samples(bc_store, bc_guided, template, p.history_messages, keep_guidance=True)
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
    collect = research_env.seeds_for("train", p.collect_episodes, _COLLECT_SEED_START + 1000 * seed)
    if p.rollout_agent == "scripted":
      make_agent = lambda s: research_policy.ScriptedResearchPolicy(seed=s)
    elif p.rollout_agent == "policy":
      make_agent = lambda s, seed=seed: policies.agent(base_dir, 7919 * seed + s)
    else:
      raise ValueError(
        f"--config.compare.rollout_agent={p.rollout_agent!r}: 'policy' or 'scripted'."
      )
    solo = run_episodes(store_path, "solo", collect, make_agent, False, p.max_steps)
    guided = run_episodes(
      store_path,
      "human",
      collect,
      make_agent,
      True,
      p.max_steps,
      p.human_delay_steps,
      p.human_budget,
    )
    verdicts = judge_episodes(store_path, guided)
    kept, how = outcome_filtered(solo)
    sets = {
      "b": build_samples(store_path, kept, template, p.history_messages),
      "c": build_samples(store_path, guided, template, p.history_messages, verdicts),
      "d": build_samples(store_path, guided, template, p.history_messages),
      "e": build_samples(
        store_path, guided, template, p.history_messages, verdicts, keep_guidance=True
      ),
    }
    # (b) pays for every autonomous rollout, not only the kept ones.
    sets["b"].env_steps = sum(e.env_steps for e in solo)
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
      eps = run_episodes(
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
        fraction_masked=data.fraction_masked if data else 0.0,
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
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib is not installed: no results.png.")
    return
  names = list(results["variants"])
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
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
      color=["#999999", "#6baed6", "#d62728", "#fd8d3c", "#74c476"],
    )
    ax.set_title(label)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "results.png"), dpi=120)
  plt.close(fig)
