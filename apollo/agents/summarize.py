"""Context compression for long sessions.

When the next prompt would exceed a token threshold, the older half of the history
(everything after the system prompt and the task message, up to a turn boundary
near the token midpoint) is replaced by one structured snapshot:

    <context_summary covers_steps="0-41" method="rule-based">
    ## State
    ...the last status line the environment printed...
    ## Actions so far
    ...tool-call counts and the last actions with the first line of their result...
    ## Facts learned
    ...observation lines that report launches, results, errors, scores...
    ## Human guidance (one reflection per message; keep following it)
    - [guidance id=3 step=12] "The labels are noisy; filter first." Reflection: ...
    </context_summary>

Human advice must survive compression (Apollo keeps "one reflection per human
message"): every guidance message in the compressed half gets exactly one
reflection line, and reflection lines of an earlier summary are carried over
verbatim, so after any number of compressions each human message still has
exactly one. The summary is stored as a step of kind `summary` (its messages are
the context that was compressed, its response the summary text), so per-step
training samples can be rebuilt later.

`RuleBasedSummarizer` needs no model. `ModelSummarizer` asks a backend for the
snapshot in the same format and then repairs the guidance section with the same
rules if the model dropped or duplicated a reflection.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from apollo.agents import guidance as guidance_lib
from apollo.agents import tokens as tokens_lib

SUMMARY_TAG = "context_summary"
GUIDANCE_HEADER = "## Human guidance (one reflection per message; keep following it)"
_OBS_RE = re.compile(
  r'<observation step="(\d+)"(?: tool="([^"]*)")?[^>]*>\n?(.*?)\n?</observation>', re.DOTALL
)
_REFLECTION_RE = re.compile(r"^- \[guidance id=(\d+)[^\]]*\].*$", re.MULTILINE)
_FACT_RE = re.compile(
  r"(launched|killed|submission|dev |ERROR|started job|FINAL|diverged|"
  r"finished|interrupted|agreement|exit code|written|edited)",
  re.IGNORECASE,
)
_STATE_RE = re.compile(r"^\[.*\]$", re.MULTILINE)

Message = dict[str, Any]

# Roles of the messages that carry observations: tool results in native mode, user
# messages in text mode (and for replies that made no call).
_OBSERVATION_ROLES = ("user", "tool")


@dataclasses.dataclass
class HumanMessage:
  guidance_id: int
  text: str
  step: int | None  # first step whose prompt held it
  reflection_line: str | None = None  # set when carried over from an earlier summary


class Summarizer(Protocol):
  name: str

  def summarize(
    self, old: Sequence[Message], humans: Sequence[HumanMessage], covered: tuple[int, int]
  ) -> str:
    """The full `<context_summary ...>` text for the messages in `old`."""


def is_summary_message(message: Mapping[str, str]) -> bool:
  return message["role"] == "user" and message["content"].startswith(f"<{SUMMARY_TAG}")


def choose_split(
  messages: Sequence[Message], counter: tokens_lib.TokenCounter = tokens_lib.approx_token_count
) -> int | None:
  """Index where the kept recent half starts (an assistant turn), or None.

  Messages 0 and 1 (system prompt, task) are always kept. The split is the first
  assistant message at or after the token midpoint of the rest, so a model turn is
  never separated from the observation that answers it (nor, in native mode, a
  tool call from its tool message).
  """
  history = list(range(2, len(messages)))
  sizes = {i: counter(tokens_lib.message_text(messages[i])) for i in history}
  total = sum(sizes.values())
  running = 0
  for i in history:
    if running >= total / 2 and messages[i]["role"] == "assistant":
      return i
    running += sizes[i]
  return None


def collect_human_messages(old: Sequence[Message]) -> list[HumanMessage]:
  """Human messages of the compressed half, including those of earlier summaries."""
  humans: dict[int, HumanMessage] = {}
  next_step: int | None = None
  # The step a guidance message was delivered in is the step of the next observation.
  for m in reversed(old):
    if is_summary_message(m):
      for line_match in _REFLECTION_RE.finditer(m["content"]):
        gid = int(line_match.group(1))
        humans.setdefault(gid, HumanMessage(gid, "", None, line_match.group(0)))
      continue
    obs = _OBS_RE.search(m["content"])
    if obs and m["role"] in _OBSERVATION_ROLES:
      next_step = int(obs.group(1))
    if guidance_lib.is_guidance_message(m):
      for block in guidance_lib.parse_guidance_blocks(m["content"]):
        gid = int(block.get("id", -1))
        humans[gid] = HumanMessage(gid, block["text"], next_step)
  return [humans[k] for k in sorted(humans)]


def _actions_after(old: Sequence[Message], step: int | None, limit: int = 4) -> list[str]:
  """Tool names the agent called from `step` on (as far as `old` reaches)."""
  if step is None:
    return []
  names = []
  for m in old:
    obs = _OBS_RE.search(m["content"]) if m["role"] in _OBSERVATION_ROLES else None
    if obs and int(obs.group(1)) >= step and obs.group(2):
      names.append(obs.group(2))
  return names[:limit]


def reflection_line(h: HumanMessage, old: Sequence[Message]) -> str:
  """One line: the advice verbatim plus what was done about it."""
  if h.reflection_line:
    return h.reflection_line
  text = " ".join(h.text.split())
  done = _actions_after(old, h.step)
  after = (
    f"afterwards I called {', '.join(done)}" if done else "it arrived just before this summary"
  )
  return (
    f'- [guidance id={h.guidance_id} step={h.step}] "{text}" Reflection: the human '
    f"knows this task better than I do; {after}. I keep applying this advice "
    f"until the task ends."
  )


def ensure_reflections(summary: str, humans: Sequence[HumanMessage], old: Sequence[Message]) -> str:
  """Rewrites the guidance section so each human message has exactly one line."""
  body = summary
  for closing in (f"</{SUMMARY_TAG}>",):
    body = body.replace(closing, "")
  head, _, _ = body.partition(GUIDANCE_HEADER)
  # Drop any reflection lines a model may have scattered elsewhere.
  head = _REFLECTION_RE.sub("", head).rstrip()
  lines = [reflection_line(h, old) for h in humans]
  section = "\n".join([GUIDANCE_HEADER] + (lines or ["- (none so far)"]))
  return f"{head}\n{section}\n</{SUMMARY_TAG}>"


class RuleBasedSummarizer:
  """Structured snapshot built from the observations, no model needed."""

  name = "rule-based"

  def __init__(self, max_actions: int = 10, max_facts: int = 20):
    self.max_actions = max_actions
    self.max_facts = max_facts

  def summarize(
    self, old: Sequence[Message], humans: Sequence[HumanMessage], covered: tuple[int, int]
  ) -> str:
    counts: collections.Counter[str] = collections.Counter()
    recent: list[str] = []
    facts: list[str] = []
    state = ""
    for m in old:
      if is_summary_message(m):
        # Carry the earlier snapshot's facts forward (its guidance is handled apart).
        previous = m["content"].partition("## Facts learned")[2].partition("## ")[0]
        facts.extend(line[2:] for line in previous.strip().splitlines() if line.startswith("- "))
        continue
      if m["role"] not in _OBSERVATION_ROLES:
        continue
      for obs in _OBS_RE.finditer(m["content"]):
        step, tool, text = int(obs.group(1)), obs.group(2) or "?", obs.group(3)
        counts[tool] += 1
        first = text.strip().splitlines()[0][:160] if text.strip() else ""
        recent.append(f"step {step}: {tool} -> {first}")
        for line in text.splitlines():
          if _STATE_RE.match(line.strip()):
            state = line.strip()
          elif _FACT_RE.search(line):
            facts.append(f"step {step}: {line.strip()[:200]}")
    # Most recent facts matter most; keep order, drop duplicates.
    facts = list(dict.fromkeys(facts))[-self.max_facts :]
    parts = [
      f'<{SUMMARY_TAG} covers_steps="{covered[0]}-{covered[1]}" method="{self.name}">',
      "Earlier turns were compressed into this snapshot.",
      "## State",
      state or "(no status line seen)",
      "## Actions so far",
      "tool calls: " + json.dumps(dict(counts.most_common())),
      *[f"- {a}" for a in recent[-self.max_actions :]],
      "## Facts learned",
      *[f"- {f}" for f in facts],
    ]
    return ensure_reflections("\n".join(parts), humans, old)


class ModelSummarizer:
  """Asks a backend for the snapshot; the guidance section is enforced by rules."""

  name = "model"

  def __init__(self, backend: Any, max_chars: int = 200_000):
    self.backend = backend
    self.max_chars = max_chars

  def summarize(
    self, old: Sequence[Message], humans: Sequence[HumanMessage], covered: tuple[int, int]
  ) -> str:
    turns = [f"[{m['role']}]\n{tokens_lib.message_text(m)}" for m in old]
    transcript = "\n\n".join(turns)[-self.max_chars :]
    prompt = [
      {
        "role": "system",
        "content": "You compress an agent's working history into a "
        "structured snapshot that lets it continue the task.",
      },
      {
        "role": "user",
        "content": f'History:\n{transcript}\n\nWrite the snapshot with the sections "## State", '
        f'"## Actions so far", "## Facts learned" and "{GUIDANCE_HEADER}". In the last '
        "section write exactly one line per human_guidance message, starting "
        '"- [guidance id=N]", quoting the advice and reflecting on how to follow it.',
      },
    ]
    text = self.backend.complete(prompt, ()).text
    head = f'<{SUMMARY_TAG} covers_steps="{covered[0]}-{covered[1]}" method="{self.name}">'
    return ensure_reflections(f"{head}\n{text}", humans, old)


@dataclasses.dataclass
class Compression:
  """Result of compressing one context."""

  new_messages: list[Message]
  summary: str
  keep_from: int
  covered: tuple[int, int]
  guidance_ids: list[int]


def covered_steps(old: Sequence[Message]) -> tuple[int, int]:
  steps = [
    int(m.group(1))
    for msg in old
    if msg["role"] in _OBSERVATION_ROLES
    for m in _OBS_RE.finditer(msg["content"])
  ]
  spans = [
    tuple(int(x) for x in m.group(1).split("-"))
    for msg in old
    if is_summary_message(msg)
    for m in [re.search(r'covers_steps="(\d+-\d+)"', msg["content"])]
    if m
  ]
  lows = steps + [s[0] for s in spans]
  highs = steps + [s[1] for s in spans]
  return (min(lows), max(highs)) if lows else (0, 0)


def compress(
  messages: Sequence[Message],
  summarizer: Summarizer,
  counter: tokens_lib.TokenCounter = tokens_lib.approx_token_count,
) -> Compression | None:
  """Summarises the older half of `messages`; None if there is nothing to compress."""
  keep_from = choose_split(messages, counter)
  if keep_from is None or keep_from <= 3:
    return None
  old = list(messages[2:keep_from])
  humans = collect_human_messages(old)
  covered = covered_steps(old)
  summary = summarizer.summarize(old, humans, covered)
  new_messages = [dict(messages[0]), dict(messages[1]), {"role": "user", "content": summary}]
  new_messages += [dict(m) for m in messages[keep_from:]]
  return Compression(
    new_messages=new_messages,
    summary=summary,
    keep_from=keep_from,
    covered=covered,
    guidance_ids=[h.guidance_id for h in humans],
  )


def apply_summary(messages: Sequence[Message], summary: str, keep_from: int) -> list[Message]:
  """Rebuilds the compressed context from a stored summary step (used on resume)."""
  return [dict(messages[0]), dict(messages[1]), {"role": "user", "content": summary}] + [
    dict(m) for m in messages[keep_from:]
  ]
