"""Human guidance: the message format and the per-session buffer.

A human (or the simulated human) may send a message at any time. It is stored at
once (the sender never waits for the agent) and delivered at the agent's next turn
as a separate user-role message:

    <human_guidance id="12" source="human" sent_at="2026-11-20T10:31:07Z">
    That run needs about ten more hours; don't kill it.
    </human_guidance>

The system prompt tells the agent that such messages come from the human
supervising it and to follow them. Two escapes keep the tag trustworthy: text
inside a guidance message cannot close the tag early, and environment output
(observations) cannot open one, so a program's output can never pose as the human.

The buffer lives in the trajectory store (table `guidance`), not in memory: a
message that was sent but not yet delivered survives a crash and is delivered
after the rollout resumes, and a message is marked delivered in the same
transaction as the step whose context first contained it, so it is never shown
twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any

GUIDANCE_TAG = "human_guidance"
_OPEN_RE = re.compile(r"<\s*(/?)\s*human_guidance", re.IGNORECASE)
_BLOCK_RE = re.compile(r"<human_guidance([^>]*)>\n?(.*?)\n?</human_guidance>", re.DOTALL)
_ATTR_RE = re.compile(r'(\w+)="([^"]*)"')

# Sources a guidance message may come from; counted separately in session summaries.
SOURCES = ("human", "simulated_human")


@dataclasses.dataclass
class Guidance:
  """One guidance message as stored."""

  guidance_id: int
  session_id: str
  text: str
  source: str
  sent_at: float  # unix seconds when the API accepted it
  delivered_at: float | None = None  # unix seconds when it entered the agent's context
  delivered_step: int | None = None  # index of the step whose prompt first held it
  client_msg_id: str | None = None  # sender's idempotency key (a retry is not stored twice)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def neutralise_tags(text: str) -> str:
  """Makes any `<human_guidance` / `</human_guidance` in `text` inert."""
  return _OPEN_RE.sub(lambda m: f"&lt;{m.group(1)}human_guidance", text)


def format_guidance(g: Guidance) -> str:
  """The user-role message content the agent sees for `g`."""
  when = datetime.datetime.fromtimestamp(g.sent_at, datetime.UTC)
  stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
  return (
    f'<{GUIDANCE_TAG} id="{g.guidance_id}" source="{g.source}" sent_at="{stamp}">\n'
    f"{neutralise_tags(g.text)}\n</{GUIDANCE_TAG}>"
  )


def parse_guidance_blocks(text: str) -> list[dict[str, str]]:
  """All guidance blocks in a message: [{"id": ..., "source": ..., "text": ...}]."""
  blocks = []
  for m in _BLOCK_RE.finditer(text):
    attrs = dict(_ATTR_RE.findall(m.group(1)))
    attrs["text"] = m.group(2)
    blocks.append(attrs)
  return blocks


def is_guidance_message(message: dict[str, str]) -> bool:
  return message.get("role") == "user" and message["content"].startswith(f"<{GUIDANCE_TAG} ")
