r"""The paper's comparison (a)..(e) on a real pretrained policy (SmolLM2-135M-Instruct).

`run_comparison(config, workdir)` (entry point: `experiments/agent_compare.py` with
`--config=apollo/studies/policy_compare.py:cpu|gpu`) asks the paper's question with a
checkpoint that can read and write (Apollo, Fu et al., arXiv 2510.27630, 2025):

0. Optional format warm-up (`warmup_demos` > 0): a few dozen actions of scripted
   rollouts (native tool calls, no human) rendered with the checkpoint's own
   template, `warmup_steps` of full fine-tuning. The result is the base of EVERY
   variant, (a) included, and the table says so.
1. Per pipeline seed, rollouts on fresh TRAIN tasks, by the collector
   (`collector`): 'scripted_drift' (the drifting scripted policy, a cheap stand-in
   for a capable model that drifts) or 'self' (the base policy itself, the paper's
   setting; its episodes decode together through one shared `DecodeBatcher`).
   `collect_episodes` without a human and as many with the simulated human.
2. Training sets (b)..(e) exactly as the tiny comparison builds them
   (`agent_compare.variant_training_sets`: judged by rules + human flags; (b)
   outcome-filtered), rendered through the compact view the policy acts on; each
   variant is the base fully fine-tuned for `sft_steps` with `apollo.optim`.
3. Every variant plays `eval_episodes` held-out TEST tasks without a human, as a
   `CheckpointBackend` (the checkpoint's template, native tools, Hermes calls)
   behind the compact view; the episodes run concurrently on one batcher per policy.
   Reported: score, success rate, the fraction of actions whose tool call parsed,
   steps per episode; mean and std over seeds.

Resume by file presence (each written atomically): `seed*/collect_*.json` (the
rollouts), `*/sft_*/done.json` (a trained policy), `seed*/eval_*.json` (a finished
evaluation). Every such marker, and the `*.started.json` written before its work
begins (the rollouts store and the SFT checkpoints resume too), records the config
fields that determine that piece of work (`stage_fields`) and their fingerprint.
Before any work the run checks every marker it would reuse and refuses a workdir made
with other fields (`StaleWorkdirError`, naming the stage, the file and the fields):
it never reuses or overwrites work made with another config. `results['work']`
counts what this call actually did.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from apollo import models
from apollo.agents import guidance as guidance_lib
from apollo.agents import storage
from apollo.agents.backends import compact_view, flax_policy
from apollo.agents.configs import sft as sft_configs
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.training import collect, sft
from apollo.models import batching, registry
from apollo.models import chat_template as chat_lib
from apollo.studies import agent_compare

VARIANTS = agent_compare.VARIANTS
COLLECTORS = ("scripted_drift", "self")
PRESETS = ("cpu", "gpu", "test")
# The paper's reported gains of (c): over the untrained model and over no-human data.
PAPER_GAINS = {"c_over_a": 0.50, "c_over_b": 0.28}
_WARMUP_SEED_START = 0
_COLLECT_SEED_START = 10_000


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  """The trainer fields of SFT's `smollm2` preset plus `compare.*` for `preset`."""
  preset = preset or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"Unknown policy_compare preset {preset!r}; choose from {PRESETS}.")
  c = sft_configs.get_config("smollm2")
  c.init_from = ""  # Set per fine-tune (the model, or the warm-up policy).
  c.data.eval_fraction = 0.0  # The yardstick is the test tasks.
  c.data.seq_len = 2048  # A compact view with native tools is ~1,500 SmolLM2 tokens.
  c.data.batch_size = 1
  c.log_every = 1
  p = c.compare = ml_collections.ConfigDict()
  p.model = "smollm2-135m-instruct"  # apollo.models.load name or a local HF directory / .gguf.
  p.collector = "scripted_drift"  # Who collects (b..e)'s rollouts: scripted_drift or self.
  p.variants = "a,b,c,d,e"  # Variants to train and evaluate (comma-separated).
  p.seeds = (0,)  # Pipeline seeds: collection tasks, sampling and SFT data order.
  p.label = "indicative"  # Printed above the table (CPU numbers are indicative).
  p.history_messages = 2  # The policy sees a one-line system prompt, tools and N messages.
  p.max_steps = 6  # Step cap per episode (collection and evaluation).
  p.max_new_tokens = 48  # Longest reply (one Hermes call).
  p.collect_temperature = 0.7  # Sampling temperature of the 'self' collector.
  p.eval_temperature = 0.0  # Evaluation sampling (0 = greedy).
  p.max_batch = 4  # Sessions decoded together on one policy's batcher.
  p.max_len = 2048  # KV-cache slots per session (prompt + reply).
  p.warmup_demos = 24  # Scripted actions of the shared format warm-up (0 = none).
  p.warmup_episodes = 2  # Scripted rollouts they are drawn from.
  p.warmup_steps = 4  # Its SFT updates.
  p.warmup_learning_rate = 1e-4
  p.collect_episodes = 3  # Episodes for (b) without a human, and for (c, d, e) with one.
  p.human_delay_steps = 1  # The simulated human answers this many steps late.
  p.human_budget = 3  # Its messages per episode at most.
  p.sft_steps = 4  # SFT updates of every fine-tuned variant.
  p.sft_learning_rate = 5e-5
  p.eval_episodes = 3  # Held-out TEST tasks per variant and seed (no human).
  if preset == "gpu":
    p.label = "GPU size"
    p.collector = "self"
    p.seeds = (0, 1, 2)
    p.history_messages = 4
    p.max_steps = 12
    p.max_new_tokens = 64
    p.max_batch = 20
    p.max_len = 3072
    p.warmup_demos = 48
    p.warmup_episodes = 4
    p.warmup_steps = 24
    p.collect_episodes = 12
    p.human_delay_steps = 2
    p.human_budget = 4
    p.sft_steps = 40
    p.eval_episodes = 20
    c.data.seq_len = 3072
    c.data.batch_size = 8
  if preset == "test":  # Unit tests: a tiny local checkpoint (compare.model set by the test).
    p.label = "test"
    p.max_steps, p.max_new_tokens, p.max_batch, p.max_len = 3, 8, 2, 2048
    p.warmup_demos, p.warmup_episodes, p.warmup_steps = 4, 1, 1
    p.collect_episodes, p.sft_steps, p.eval_episodes = 1, 1, 2
    c.data.seq_len, c.data.batch_size = 512, 8
  return c


def variant_list(config: ml_collections.ConfigDict) -> list[str]:
  """`compare.variants` as a list, in a..e order."""
  names = [v.strip() for v in str(config.compare.variants).split(",") if v.strip()]
  return [v for v in VARIANTS if v in names]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses an unknown variant, collector or model, naming the flag (before any work)."""
  p = config.compare
  names = [v.strip() for v in str(p.variants).split(",") if v.strip()]
  bad = [v for v in names if v not in VARIANTS]
  if bad or not names:
    raise ValueError(f"--variants={p.variants}: unknown {bad}; choose from {list(VARIANTS)}.")
  if p.collector not in COLLECTORS:
    raise ValueError(f"--collector={p.collector}: choose from {list(COLLECTORS)}.")
  if not model_exists(p.model):
    raise ValueError(
      f"--model={p.model}: neither a registered checkpoint "
      f"({sorted(registry.NAMED_CHECKPOINTS)}) nor a local HF directory or .gguf file."
    )


def model_exists(model: str) -> bool:
  """A registered checkpoint name, a local HF directory (config.json) or a .gguf file."""
  if model in registry.NAMED_CHECKPOINTS:
    return True
  return os.path.isfile(os.path.join(model, "config.json")) or (
    model.endswith(".gguf") and os.path.isfile(model)
  )


# -----------------------------------------------------------------------------
# Files written once (atomic), read on a rerun
# -----------------------------------------------------------------------------


class StaleWorkdirError(ValueError):
  """The workdir holds work made with other config fields than this run's."""


# Trainer fields that do not determine a fine-tune's result: set per fine-tune by
# `_fine_tune` (seed, steps, init_from, learning rate), logging and checkpoint cadence,
# and the device mesh (how the same training is laid out, not what it computes).
_TRAINER_FIELDS_SET_PER_RUN = (
  "seed",
  "train_steps",
  "init_from",
  "optimizer.learning_rate",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "max_checkpoints",
)
_TRAINER_SECTIONS_IGNORED = ("compare", "mesh")
_WARMUP_CAP = "max(compare.max_steps, 30)"  # The warm-up rollouts' step cap.


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _jsonable(fields: Mapping[str, Any]) -> dict[str, Any]:
  """`fields` as they read back from JSON (tuples become lists), keys sorted."""
  return json.loads(json.dumps(dict(sorted(fields.items())), default=str))


def fingerprint(fields: Mapping[str, Any]) -> str:
  """A stable hash of `fields` (key order and tuple/list do not matter)."""
  blob = json.dumps(_jsonable(fields), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trainer_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The non-`compare` fields that determine a fine-tune (model, data, optimizer, ...)."""
  flat = _flat(json.loads(config.to_json_best_effort()))
  return {
    k: v
    for k, v in flat.items()
    if k not in _TRAINER_FIELDS_SET_PER_RUN and k.split(".")[0] not in _TRAINER_SECTIONS_IGNORED
  }


def stage_fields(
  config: ml_collections.ConfigDict, stage: str, seed: int = 0, variant: str = ""
) -> dict[str, Any]:
  """The config fields that determine one piece of work (what its marker records).

  stage: 'warmup_collect' (the scripted warm-up rollouts), 'base' (the policy every
  variant starts from: the model, and the warm-up fine-tune if any), 'collect_solo' /
  'collect_human' (seed's rollouts without / with the human), 'sft' (variant's
  fine-tune: its base, its rollouts and the training fields) or 'eval' (variant's
  evaluation: its policy and the evaluation fields). `seed` is the pipeline seed.
  """
  p = config.compare

  def cmp(*names: str) -> dict[str, Any]:
    return {f"compare.{n}": p[n] for n in names}

  if stage == "warmup_collect":
    return {**cmp("warmup_episodes"), _WARMUP_CAP: max(p.max_steps, 30)}
  if stage == "base":
    out = cmp("model", "warmup_demos")
    if p.warmup_demos > 0:
      out.update(stage_fields(config, "warmup_collect"))
      out.update(cmp("warmup_steps", "warmup_learning_rate", "history_messages"))
      out.update(trainer_fields(config))
    return out
  if stage in ("collect_solo", "collect_human"):
    out = {"seed": seed, **cmp("collector", "collect_episodes", "max_steps")}
    if stage == "collect_human":
      out.update(cmp("human_delay_steps", "human_budget"))
    if p.collector == "self":  # The base policy decodes them (a scripted policy: no model).
      out.update(stage_fields(config, "base"))
      out.update(cmp("collect_temperature", "max_new_tokens", "history_messages"))
      out.update(cmp("max_batch", "max_len"), **{"model.dtype": config.model.dtype})
    return out
  if stage == "sft":
    rollouts = "collect_solo" if variant == "b" else "collect_human"
    out = {**stage_fields(config, "base"), **stage_fields(config, rollouts, seed)}
    out.update(cmp("sft_steps", "sft_learning_rate", "history_messages"), variant=variant)
    out.update(trainer_fields(config))
    return out
  if stage == "eval":
    policy = stage_fields(config, "base" if variant == "a" else "sft", seed, variant)
    out = {**policy, "seed": seed, "variant": variant}
    out.update(cmp("eval_episodes", "max_steps", "max_new_tokens", "eval_temperature"))
    out.update(
      cmp("history_messages", "max_batch", "max_len"), **{"model.dtype": config.model.dtype}
    )
    return out
  raise ValueError(f"Unknown stage {stage!r}.")


def _stamp(fields: Mapping[str, Any], **data: Any) -> dict[str, Any]:
  return dict(fingerprint=fingerprint(fields), made_with=_jsonable(fields), **data)


def _started_path(marker: str) -> str:
  """Written before the marker's work begins: the store and checkpoints resume too."""
  return marker[: -len(".json")] + ".started.json"


def _mismatch(path: str, fields: Mapping[str, Any]) -> str | None:
  """None when `path` is absent or was made with `fields`, else what differs."""
  if not os.path.isfile(path):
    return None
  data = _read_json(path)
  if not isinstance(data, dict) or "fingerprint" not in data:
    return "no recorded config (made before markers recorded one)"
  if data["fingerprint"] == fingerprint(fields):
    return None
  old, new = data.get("made_with", {}), _jsonable(fields)
  changed = [f"{k}={old[k]!r}, now {new[k]!r}" for k in old if k in new and old[k] != new[k]]
  added = [f"{k}={new[k]!r}" for k in new if k not in old]
  dropped = [f"{k}={old[k]!r}" for k in old if k not in new]
  why = "; ".join(changed) or "other fields"
  if added:
    why += f" (now it also depends on {', '.join(added)})"
  if dropped:
    why += f" (it no longer depends on {', '.join(dropped)})"
  return why


def check_workdir(workdir: str, plan: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
  """Refuses (StaleWorkdirError) when a planned (stage, marker, fields) disagrees on disk.

  Checks the marker and its `.started.json`; names the workdir, the stage, the file
  and the differing fields, and what to delete. Reads only: nothing is written.
  """
  bad = []
  for stage, marker, fields in plan:
    for path in (marker, _started_path(marker)):
      why = _mismatch(path, fields)
      if why:
        bad.append((stage, os.path.relpath(path, workdir), why))
        break
  if not bad:
    return
  stage, rel, why = bad[0]
  redo = sorted({os.path.join(workdir, r.split(os.sep)[0]) for _, r, _ in bad})
  more = f"; {len(bad) - 1} more file(s) disagree too" if len(bad) > 1 else ""
  raise StaleWorkdirError(
    f"--workdir={workdir} holds work made with another config: the {stage} {rel} was "
    f"made with {why}{more}. Refusing to reuse or overwrite it: use a new --workdir or "
    f"delete {', '.join(redo)} (deleting only the marker is not enough: the rollouts "
    "store and the fine-tune checkpoints resume too)."
  )


def plan_markers(
  config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[str, str, dict[str, Any]]]:
  """(stage, marker path, fields) of every marker this config's run reads or writes."""
  plan = []

  def add(stage: str, path: str, kind: str, seed: int = 0, variant: str = "") -> None:
    plan.append((stage, os.path.join(workdir, path), stage_fields(config, kind, seed, variant)))

  if config.compare.warmup_demos > 0:
    add("warm-up collection", "warmup/collect_demo.json", "warmup_collect")
    add("warm-up fine-tune", "warmup/sft/done.json", "base")
  variants = variant_list(config)
  for seed in config.compare.seeds:
    if "b" in variants:
      add("collection", f"seed{seed}/collect_solo.json", "collect_solo", seed)
    if set(variants) & {"c", "d", "e"}:
      add("collection", f"seed{seed}/collect_human.json", "collect_human", seed)
    for v in variants:
      if v != "a":
        add("fine-tune", f"seed{seed}/sft_{v}/done.json", "sft", seed, v)
    for v in variants:
      add("evaluation", f"seed{seed}/eval_{v}.json", "eval", seed, v)
  return plan


def _write_json(path: str, data: Any) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, default=float)
  os.replace(path + ".tmp", path)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _cached_episodes(
  path: str, fields: Mapping[str, Any], run: Callable[[], list[collect.Episode]], work
) -> list:
  if os.path.isfile(path):
    return [collect.Episode(**e) for e in _read_json(path)["episodes"]]
  _write_json(_started_path(path), _stamp(fields))
  episodes = run()
  work["collected_episodes"] += len(episodes)
  _write_json(path, _stamp(fields, episodes=[dataclasses.asdict(e) for e in episodes]))
  return episodes


# -----------------------------------------------------------------------------
# Policies: a loaded checkpoint and its shared decode batcher
# -----------------------------------------------------------------------------


def tool_format(model: str) -> str:
  """How the model writes tool calls: the registered one, else Hermes (SmolLM2's)."""
  named = registry.NAMED_CHECKPOINTS.get(model)
  return named.tool_call_format if named and named.tool_call_format else "hermes"


def sample_template(model: str) -> chat_lib.ChatTemplate:
  """The checkpoint's own template, for rendering training samples as the backend prompts."""
  path = registry.resolve(model) if model in registry.NAMED_CHECKPOINTS else model
  return chat_lib.from_pretrained(path, guidance_lib.GUIDANCE_TAG, tool_format(model))


@contextlib.contextmanager
def policy_agents(path: str, p: ml_collections.ConfigDict, fmt: str, dtype: str, temperature):
  """Yields seed -> agent: CheckpointBackends of `path` on one shared batcher (closed after)."""
  loaded = models.load(path, dtype=dtype)
  loaded.tool_call_format = fmt  # An exported policy directory does not record it.
  batcher = batching.DecodeBatcher(loaded.model, max_batch=p.max_batch, max_len=p.max_len)
  try:

    def agent(seed: int):
      inner = flax_policy.CheckpointBackend(
        loaded,
        batcher,
        max_new_tokens=p.max_new_tokens,
        temperature=temperature,
        seed=seed,
      )
      return compact_view.ViewedBackend(inner, p.history_messages)

    yield agent
  finally:
    batcher.close()


def _fine_tune(
  config: ml_collections.ConfigDict,
  init_from: str,
  samples: Sequence[Any],
  steps: int,
  lr: float,
  seed: int,
  workdir: str,
  fields: Mapping[str, Any],
  work: collections.Counter,
) -> str:
  """Full fine-tuning of `init_from` on `samples` (skipped when workdir/done.json exists)."""
  done = os.path.join(workdir, "done.json")
  if os.path.isfile(done):
    return _read_json(done)["policy_dir"]
  os.makedirs(workdir, exist_ok=True)
  _write_json(_started_path(done), _stamp(fields))
  c = copy.deepcopy(config)
  with c.unlocked():
    del c["compare"]
  c.seed, c.train_steps, c.init_from = seed, steps, init_from
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 4)
  c.checkpoint_every = c.eval_every = max(steps, 1)
  c.log_every = max(1, min(c.log_every, steps))
  out = sft.train_and_evaluate(c, workdir, samples=list(samples))
  work["trained_policies"] += 1
  _write_json(
    done,
    _stamp(
      fields, policy_dir=out["policy_dir"], loss=out["train"].get("loss"), samples=len(samples)
    ),
  )
  return out["policy_dir"]


def _evaluation(store_path: str, episodes: Sequence[collect.Episode]) -> dict[str, Any]:
  """Score, success, parse rate, steps per episode and the tools called, from the store."""
  parsed = actions = 0
  tools: collections.Counter = collections.Counter()
  errors: collections.Counter = collections.Counter()
  with contextlib.closing(storage.SQLiteStore(store_path)) as store:
    for e in episodes:
      for step in store.get_steps(e.session_id):
        if step.kind != "action":
          continue
        actions += 1
        if step.parse_error is None and step.action:
          parsed += 1
          tools[str(step.action.get("tool"))] += 1
        else:
          errors[(step.parse_error or "no call").split(":")[0][:60]] += 1
  return dict(
    score=statistics.fmean(e.result.get("score", 0.0) for e in episodes),
    success_rate=statistics.fmean(float(bool(e.result.get("success"))) for e in episodes),
    parse_rate=parsed / actions if actions else 0.0,
    steps_per_episode=statistics.fmean(e.env_steps for e in episodes),
    tools=dict(tools.most_common()),
    parse_errors=dict(errors.most_common(5)),
    episodes=[
      dict(seed=e.seed, score=e.result.get("score", 0.0), success=bool(e.result.get("success")))
      for e in episodes
    ],
  )


# -----------------------------------------------------------------------------
# The comparison
# -----------------------------------------------------------------------------


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the comparison in `workdir`; returns results.json's content."""
  check_config(config)
  p = config.compare
  variants = variant_list(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start, timings = time.time(), {}
  work: collections.Counter = collections.Counter()
  fmt, dtype = tool_format(p.model), config.model.dtype
  template = sample_template(p.model)
  model_dir = (
    os.fspath(registry.resolve(p.model)) if p.model in registry.NAMED_CHECKPOINTS else p.model
  )
  check_workdir(workdir, plan_markers(config, workdir))  # Before any work: refuse, not reuse.

  # 0. The shared format warm-up (the base of every variant, (a) included).
  base_dir, warmup = model_dir, dict(demos=0, steps=0, env_steps=0)
  if p.warmup_demos > 0:
    wdir = os.path.join(workdir, "warmup")
    os.makedirs(wdir, exist_ok=True)
    store_path = os.path.join(wdir, "rollouts.sqlite")
    seeds = research_env.seeds_for("train", p.warmup_episodes, _WARMUP_SEED_START)
    demos = _cached_episodes(
      os.path.join(wdir, "collect_demo.json"),
      stage_fields(config, "warmup_collect"),
      lambda: collect.run_episodes(
        store_path, "demo", seeds, _scripted_native, False, max(p.max_steps, 30)
      ),
      work,
    )
    built = agent_compare.training_set(store_path, demos, template, p.history_messages).samples
    pick = np.random.default_rng(0).permutation(len(built))[: p.warmup_demos]
    chosen = [built[i] for i in sorted(pick)]
    base_dir = _fine_tune(
      config,
      model_dir,
      chosen,
      p.warmup_steps,
      p.warmup_learning_rate,
      0,
      os.path.join(wdir, "sft"),
      stage_fields(config, "base"),
      work,
    )
    warmup = dict(
      demos=len(chosen), steps=p.warmup_steps, env_steps=sum(e.env_steps for e in demos)
    )
  timings["warmup"] = time.time() - t_start

  per_seed = []
  for seed in p.seeds:
    t_seed = time.time()
    sdir = os.path.join(workdir, f"seed{seed}")
    os.makedirs(sdir, exist_ok=True)
    store_path = os.path.join(sdir, "rollouts.sqlite")
    train_seeds = research_env.seeds_for(
      "train", p.collect_episodes, _COLLECT_SEED_START + 1000 * seed
    )
    # 1. Collection (skipped entirely, model load included, when both files exist).
    needed = [v for v in variants if v != "a"]
    solo = guided = []
    with contextlib.ExitStack() as stack:
      agents: dict[str, Any] = {}

      def collector(agents=agents, stack=stack, seed=seed):
        if "agent" not in agents:
          if p.collector == "self":
            make = stack.enter_context(
              policy_agents(base_dir, p, fmt, dtype, p.collect_temperature)
            )
            agents["agent"] = lambda s: make(7919 * seed + s)
          else:
            agents["agent"] = _scripted_native
        return agents["agent"]

      workers = p.max_batch if p.collector == "self" else 1
      if "b" in needed:
        solo = _cached_episodes(
          os.path.join(sdir, "collect_solo.json"),
          stage_fields(config, "collect_solo", seed),
          lambda: collect.run_episodes(
            store_path, "solo", train_seeds, collector(), False, p.max_steps, workers=workers
          ),
          work,
        )
      if set(needed) & {"c", "d", "e"}:
        guided = _cached_episodes(
          os.path.join(sdir, "collect_human.json"),
          stage_fields(config, "collect_human", seed),
          lambda: collect.run_episodes(
            store_path,
            "human",
            train_seeds,
            collector(),
            True,
            p.max_steps,
            p.human_delay_steps,
            p.human_budget,
            workers=workers,
          ),
          work,
        )
    timings[f"seed{seed}_collect"] = time.time() - t_seed

    # 2. Training sets (shared with the tiny comparison) and fine-tunes.
    sets, how = agent_compare.variant_training_sets(
      store_path, solo, guided, template, p.history_messages, needed
    )
    policy_dirs = {"a": base_dir}
    for v, data in sets.items():
      if not data.samples:
        logging.warning("seed %d variant %s: no training samples; it stays the base.", seed, v)
        policy_dirs[v] = base_dir
        continue
      policy_dirs[v] = _fine_tune(
        config,
        base_dir,
        data.samples,
        p.sft_steps,
        p.sft_learning_rate,
        seed,
        os.path.join(sdir, f"sft_{v}"),
        stage_fields(config, "sft", seed, v),
        work,
      )
    timings[f"seed{seed}_train"] = time.time() - t_seed - timings[f"seed{seed}_collect"]

    # 3. Evaluation on TEST tasks, no human, episodes batched on one batcher per policy.
    test = research_env.seeds_for("test", p.eval_episodes, 0)
    evals = {}
    for v in variants:
      path = os.path.join(sdir, f"eval_{v}.json")
      if not os.path.isfile(path):
        fields = stage_fields(config, "eval", seed, v)
        _write_json(_started_path(path), _stamp(fields))
        with policy_agents(policy_dirs[v], p, fmt, dtype, p.eval_temperature) as make:
          eps = collect.run_episodes(
            store_path,
            f"eval-{v}",
            test,
            lambda s, make=make, seed=seed: make(104729 * seed + s),
            False,
            p.max_steps,
            workers=p.max_batch,
          )
        _write_json(path, _stamp(fields, evaluation=_evaluation(store_path, eps)))
        work["evaluations"] += 1
      evals[v] = _read_json(path)["evaluation"]
    human_msgs = sum(e.interventions for e in guided)
    row = dict(
      seed=seed,
      outcome_filter=how,
      collection=dict(
        collector=p.collector,
        solo_episodes=len(solo),
        solo_env_steps=sum(e.env_steps for e in solo),
        solo_success_rate=_mean([float(bool(e.result.get("success"))) for e in solo]),
        solo_score=_mean([e.result.get("score", 0.0) for e in solo]),
        human_episodes=len(guided),
        human_env_steps=sum(e.env_steps for e in guided),
        human_messages=human_msgs,
        human_success_rate=_mean([float(bool(e.result.get("success"))) for e in guided]),
        human_score=_mean([e.result.get("score", 0.0) for e in guided]),
      ),
      variants={},
    )
    for v in variants:
      data = sets.get(v)
      row["variants"][v] = dict(
        evals[v],
        interventions_per_episode=(human_msgs / len(guided))
        if v in ("c", "d", "e") and guided
        else 0.0,
        fraction_masked=data.stats.fraction_masked if data else 0.0,
        train_samples=len(data.samples) if data else 0,
        collection_env_steps=data.env_steps if data else 0,
        trained=policy_dirs[v] != base_dir,
      )
    per_seed.append(row)
    timings[f"seed{seed}"] = time.time() - t_seed
    logging.info("seed %d: %s", seed, {v: round(r["score"], 1) for v, r in row["variants"].items()})

  results = aggregate(per_seed, variants)
  results.update(
    label=p.label,
    model=p.model,
    collector=p.collector,
    warmup=warmup,
    gains=gains(results["variants"]),
    paper_gains=PAPER_GAINS,
    config=json.loads(config.to_json_best_effort()),
    per_seed=per_seed,
    work=dict(work),
    timings_s=timings,
    wall_s=time.time() - t_start,
  )
  write_reports(results, workdir)
  return results


def _scripted_native(seed: int) -> research_policy.ScriptedResearchPolicy:
  """The drifting scripted policy, writing native tool calls (as the checkpoint acts)."""
  return research_policy.ScriptedResearchPolicy(seed=seed, tool_mode="native")


def _mean(values: Sequence[float]) -> float:
  return statistics.fmean(values) if values else 0.0


def aggregate(per_seed: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
  """Mean and standard deviation over seeds for every variant."""
  out = {}
  for v in variants:
    rows = [r["variants"][v] for r in per_seed]
    entry = dict(name=agent_compare.VARIANT_NAMES[v], seeds=len(rows))
    for key in ("score", "success_rate", "parse_rate", "steps_per_episode"):
      vals = [float(r[key]) for r in rows]
      entry[f"{key}_mean"] = _mean(vals)
      entry[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    for key in ("interventions_per_episode", "fraction_masked", "train_samples"):
      entry[key] = _mean([r[key] for r in rows])
    entry["collection_env_steps"] = _mean([r["collection_env_steps"] for r in rows])
    out[v] = entry
  cost = [r["collection"] for r in per_seed]
  collection = {
    k: _mean([c[k] for c in cost])
    for k in ("solo_env_steps", "human_env_steps", "human_messages", "solo_score", "human_score")
  }
  return {"variants": out, "collection": collection}


def gains(variants: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
  """(c)'s relative score gain over (a) and over (b); None where a side is missing or 0."""

  def rel(x: str, y: str) -> float | None:
    if x not in variants or y not in variants or not variants[y]["score_mean"]:
      return None
    return variants[x]["score_mean"] / variants[y]["score_mean"] - 1.0

  return {"c_over_a": rel("c", "a"), "c_over_b": rel("c", "b")}


def markdown_report(results: Mapping[str, Any]) -> str:
  """The header (model, collector, warm-up, label), the table, costs and the paper's gains."""
  w = results["warmup"]
  warm = (
    f"shared format warm-up: {w['demos']} scripted demonstrations, {w['steps']} SFT steps, "
    "applied to every variant including (a)"
    if w["demos"]
    else "no format warm-up"
  )
  lines = [
    f"Model: {results['model']}; collector: {results['collector']}; {warm}. "
    f"Numbers: {results['label']}; {len(results['per_seed'])} seed(s).",
    "",
    "| variant | score (mean ± std) | success rate | tool calls parsed | steps / episode | "
    "interventions / episode | fraction masked | train samples |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for v, r in results["variants"].items():
    lines.append(
      f"| ({v}) {r['name']} | {r['score_mean']:.1f} ± {r['score_std']:.1f} | "
      f"{100 * r['success_rate_mean']:.0f}% ± {100 * r['success_rate_std']:.0f} | "
      f"{100 * r['parse_rate_mean']:.0f}% ± {100 * r['parse_rate_std']:.0f} | "
      f"{r['steps_per_episode_mean']:.1f} | {r['interventions_per_episode']:.2f} | "
      f"{r['fraction_masked']:.2f} | {r['train_samples']:.0f} |"
    )
  c = results["collection"]
  lines += [
    "",
    f"Collection cost per seed ({results['collector']}): {c['solo_env_steps']:.0f} environment "
    f"steps without a human (score {c['solo_score']:.1f}), {c['human_env_steps']:.0f} with the "
    f"human (score {c['human_score']:.1f}), {c['human_messages']:.0f} human messages.",
  ]

  def pct(x):
    return "n/a" if x is None else f"{100 * x:+.0f}%"

  g = results["gains"]
  lines.append(
    f"(c) over (a): {pct(g['c_over_a'])} (paper: +50%); (c) over (b): {pct(g['c_over_b'])} "
    "(paper: +28%)."
  )
  return "\n".join(lines) + "\n"


def write_reports(results: Mapping[str, Any], workdir: str) -> None:
  """results.json, results.md and results.png (score and success bars)."""
  _write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown_report(results))
  agent_compare.plot_results(results, os.path.join(workdir, "results.png"))
