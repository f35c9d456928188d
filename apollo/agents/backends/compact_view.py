"""A compact view of the loop's context, for policies too small for all of it.

The loop's context is long: its system prompt lists every tool schema and the
guidance rules, and the history grows with every step. A small policy (the tiny
decoder the comparison trains on CPU) is shown `policy_view(messages, history)`
instead: a one-line system prompt and the last `history` messages. The
observations carry the clock, the budget and the submissions left, so the window
holds what the next action needs. `ViewedBackend` puts the view in front of any
backend; training samples are rendered through the same view
(`training.samples.SampleBuilder(view=...)`), so training and acting agree, while
the store keeps the exact full messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from apollo.agents import env as env_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents.backends import base as backends_lib

COMPACT_SYSTEM_PROMPT = "Research agent. One JSON tool call per reply. Follow <human_guidance>."


def policy_view(
  messages: Sequence[Mapping[str, Any]], history: int, keep_guidance: bool = True
) -> list[dict[str, Any]]:
  """A one-line system prompt + the last `history` messages (the task message first).

  Guidance messages ride along on top of the window (they arrive between an
  observation and the next action), so advice is seen for `history` turns. A
  native-mode tool message whose call fell out of the window is left out too
  (a tool result must follow the call it answers).
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
  window.reverse()
  while window and window[0]["role"] == "tool":
    window.pop(0)
  return [{"role": "system", "content": COMPACT_SYSTEM_PROMPT}] + window


class ViewedBackend:
  """A backend that is shown `policy_view(messages, history)` instead of the context."""

  def __init__(self, inner: backends_lib.Backend, history: int):
    self.inner, self.history = inner, history
    self.name = getattr(inner, "name", "flax")
    self.tool_mode = getattr(inner, "tool_mode", "text")

  def complete(
    self, messages: backends_lib.Messages, tools: Sequence[env_lib.ToolSpec] = ()
  ) -> backends_lib.ModelResponse:
    return self.inner.complete(policy_view(messages, self.history), tools)

  def snapshot(self) -> dict[str, Any]:
    return self.inner.snapshot()

  def restore(self, state: Mapping[str, Any]) -> None:
    self.inner.restore(state)
