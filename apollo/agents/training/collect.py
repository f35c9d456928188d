"""Collecting training data: seeded research episodes, a tokenizer, demo samples.

`run_episodes` plays one research task per seed through the real loop and store,
with any agent, optionally supervised by the simulated human (advice arrives
asynchronously, as from a person), and reuses episodes a store already holds, so
an interrupted collection resumes. `train_tokenizer` fits a byte-level BPE to the
text of such episodes, so a small policy's sequences stay short.
`write_demo_samples` is the SFT quickstart's data: scripted rollouts of TRAIN
tasks rendered through the compact view, one sample per parseable action, with a
checkpoint's own chat template or ChatML over such a BPE.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import tokenizers

from apollo.agents import agent as agent_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents import storage
from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import compact_view
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import simulated_human
from apollo.agents.training import samples as samples_lib
from apollo.models import chat_template as chat_lib


@dataclasses.dataclass
class Episode:
  """One collected episode."""

  session_id: str
  seed: int
  result: dict[str, Any]
  interventions: int  # messages the simulated human sent
  env_steps: int  # stored steps (summaries included)


def run_episodes(
  store_path: str,
  prefix: str,
  seeds: Sequence[int],
  make_agent: Callable[[int], backends_lib.Backend],
  with_human: bool,
  max_steps: int,
  delay_steps: int = 2,
  budget: int = 4,
  workers: int = 1,
) -> list[Episode]:
  """Runs (or, from the store, resumes / reuses) session `{prefix}-{seed}` per seed.

  Args:
    store_path: the SQLite trajectory store.
    prefix: session ids are `{prefix}-{seed}`.
    seeds: research task seeds.
    make_agent: seed -> the backend that acts.
    with_human: let the simulated human watch and advise.
    max_steps: step cap per episode.
    delay_steps: the simulated human answers this many steps late.
    budget: its messages per episode at most.
    workers: episodes played at once, each on its own thread (agents on one shared
      decode batcher then decode in one batch); episodes come back in `seeds` order.
  """
  store = storage.SQLiteStore(store_path)

  def play(seed: int) -> Episode:
    sid = f"{prefix}-{seed}"
    # One human per episode: its delay and budget count per session.
    human = simulated_human.SimulatedHuman(
      client_lib.LocalClient.for_store(store), delay_steps=delay_steps, budget=budget
    )
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
    return Episode(sid, seed, dict(result), messages, int(store.num_steps(sid)))

  try:
    if workers <= 1:
      return [play(seed) for seed in seeds]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return list(pool.map(play, seeds))
  finally:
    store.close()


def scripted_rollouts(
  store_path: str, seeds: Sequence[int], with_human: bool, max_steps: int, prefix: str
) -> list[Episode]:
  """`run_episodes` with the scripted policy acting."""
  return run_episodes(
    store_path,
    prefix,
    seeds,
    lambda s: research_policy.ScriptedResearchPolicy(seed=s),
    with_human,
    max_steps,
  )


def train_tokenizer(
  store_path: str, episodes: Sequence[Episode], vocab_size: int, out_dir: str
) -> tokenizers.Tokenizer:
  """A BPE trained on the compact views of `episodes` (plus the demo corpus)."""
  store = storage.SQLiteStore(store_path)
  texts = list(chat_lib.DEMO_CORPUS) + [compact_view.COMPACT_SYSTEM_PROMPT]
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
  data_dir: str,
  episodes: int = 6,
  seed: int = 0,
  history: int = 2,
  vocab_size: int = 1024,
  template: chat_lib.ChatTemplate | None = None,
) -> int:
  """Scripted rollouts of TRAIN seeds -> data_dir/{samples.jsonl, tokenizer files}.

  One sample per parseable action, rendered through the compact view with the
  last `history` messages, with `template` (a checkpoint's own, e.g.
  `chat_template.from_pretrained(...)`), or without one with ChatML over a BPE of
  `vocab_size` trained on the rollouts. The template's tokenizer.json and
  tokenizer_config.json are saved beside the samples (`ChatTemplate.save_pretrained`),
  so `chat_template.from_pretrained(data_dir)` reads it back. Returns the number of
  samples.
  """
  os.makedirs(data_dir, exist_ok=True)
  store_path = os.path.join(data_dir, "rollouts.sqlite")
  eps = scripted_rollouts(
    store_path, research_env.seeds_for("train", episodes, seed * 100), False, 200, "demo"
  )
  if template is None:
    tokenizer = train_tokenizer(store_path, eps, vocab_size, data_dir)
    template = chat_lib.ChatTemplate(tokenizer, guidance_tag=guidance_lib.GUIDANCE_TAG)
  template.save_pretrained(data_dir)
  store = storage.SQLiteStore(store_path)
  try:
    built, _ = samples_lib.build_samples(
      store,
      template,
      [e.session_id for e in eps],
      verdicts="parseable",
      human_messages="remove",
      view=functools.partial(compact_view.policy_view, history=history),
    )
  finally:
    store.close()
  return samples_lib.write_jsonl(built, os.path.join(data_dir, "samples.jsonl"))
