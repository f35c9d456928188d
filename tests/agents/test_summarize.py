"""Context compression keeps one reflection per human message, across compressions."""

import os
import re

import pytest

from apollo.agents import agent, storage, summarize
from apollo.agents import guidance as guidance_lib
from apollo.agents.backends import base as backends_lib
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import simulated_human


def _reflection_ids(summary):
  section = summary.partition(summarize.GUIDANCE_HEADER)[2]
  return [int(x) for x in re.findall(r"^- \[guidance id=(\d+)", section, re.MULTILINE)]


def _context(n_turns, guidance_at):
  messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}]
  for step in range(n_turns):
    if step in guidance_at:
      g = guidance_lib.Guidance(guidance_at[step], "s", f"advice {guidance_at[step]}", "human", 0.0)
      messages.append({"role": "user", "content": guidance_lib.format_guidance(g)})
    messages.append(
      {
        "role": "assistant",
        "content": f'thinking {step}\n{{"tool": "sleep", "arguments": {{"hours": 0.5}}}}',
      }
    )
    messages.append(
      {
        "role": "user",
        "content": storage.format_observation(
          step,
          "sleep",
          f"slept 0.50h. launched r{step}\n[clock {step}h / 30h | submissions left: 3]",
          False,
        ),
      }
    )
  return messages


def test_one_reflection_per_human_message_across_repeated_compression():
  messages = _context(40, {3: 1, 9: 2, 10: 3, 30: 4})
  first = summarize.compress(messages, summarize.RuleBasedSummarizer())
  assert first is not None
  assert _reflection_ids(first.summary) == [1, 2, 3]  # those in the older half
  assert "advice 2" in first.summary and "## State" in first.summary
  # Grow the context and compress again: old reflections carried over, new one added.
  grown = first.new_messages + _context(30, {5: 5})[2:]
  second = summarize.compress(grown, summarize.RuleBasedSummarizer())
  ids = _reflection_ids(second.summary)
  assert ids == sorted(set(ids)) and {1, 2, 3, 4} <= set(ids)


def test_model_summary_is_repaired_to_one_line_per_message():
  class Sloppy:
    def complete(self, messages, tools):
      del messages, tools
      return backends_lib.ModelResponse(
        "## State\nok\n- [guidance id=1] dup\n- [guidance id=1] dup", 1, 1
      )

  messages = _context(20, {2: 1, 4: 2})
  result = summarize.compress(messages, summarize.ModelSummarizer(Sloppy()))
  assert _reflection_ids(result.summary) == [1, 2]


@pytest.mark.parametrize("tool_mode", ["native", "text"])
def test_long_session_compresses_and_stores_summary_steps(tmp_path, tool_mode):
  store = storage.SQLiteStore(os.path.join(tmp_path, "s.sqlite"))
  human = simulated_human.SimulatedHuman(client_lib.LocalClient.for_store(store), delay_steps=1)
  seed = next(s for s in range(100) if len(research_env.generate_task(s).hidden_facts()) >= 3)
  store.create_session(storage.SessionRecord("long", "research", seed, "scripted", {}))
  rollout = agent.Rollout(
    "long",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(seed, tool_mode=tool_mode),
    store,
    agent.AgentConfig(context_token_threshold=3000),
    listeners=[human.on_step],
  )
  outcome = rollout.run()
  steps = store.get_steps("long")
  summaries = [s for s in steps if s.kind == "summary"]
  assert len(summaries) >= 2 and outcome["success"]
  delivered_before = lambda i: sorted(g for s in steps[:i] for g in s.guidance_ids)  # noqa: E731
  for s in summaries:
    assert s.info["tokens_after"] < s.context_tokens
    reflected = _reflection_ids(s.response)
    assert reflected == sorted(set(reflected))  # exactly one line per message
    # Every message already out of the kept half is reflected.
    assert set(s.info["guidance_reflected"]) == set(reflected)
    assert set(reflected) <= set(delivered_before(s.step_index))
  # Prompts after a summary start with it and stay under the threshold + one turn.
  after = steps[summaries[-1].step_index + 1]
  assert summarize.is_summary_message(after.messages[2])
  # Resuming right after a summary rebuilds the same context (the next prompt may
  # only add guidance to it).
  rebuilt = agent.context_after(summaries[-1])
  assert after.messages[: len(rebuilt)] == rebuilt
  # In native mode the kept half never starts with a tool result cut off from its call.
  for s in summaries:
    kept = agent.context_after(s)[3:]
    assert kept and kept[0]["role"] == "assistant"
    assert (kept[0].get("tool_calls") is not None) == (tool_mode == "native")
  store.close()
