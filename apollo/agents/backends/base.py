"""The backend protocol: what turns a chat context into the next response.

The agent loop hands a backend the exact list of chat messages it sends the model
(OpenAI chat format: assistant messages may carry `tool_calls`, tool results come
as `role: "tool"` messages) and the environment's tools, and gets back the next
assistant message plus token counts (`ModelResponse`). Backends may keep state
between turns; `snapshot` / `restore` save it with every step, so a resumed
rollout continues with the same policy state.

Tool calling has two modes (`TOOL_MODES`), chosen by the loop:
- 'native': the loop passes the tools; the backend offers them the model's native
  way (the OpenAI `tools` field, or the checkpoint's own template and tool-call
  format) and returns the calls it read in `ModelResponse.tool_calls`.
- 'text': the loop passes no tools (they are described in its system prompt, with
  the JSON-in-text call format) and parses `ModelResponse.text` itself. Judges and
  summarisers also call with no tools and read the text.
A backend's `tool_mode` attribute is the mode it prefers when the loop is not told
one (a backend without the attribute is taken to speak text only).

Implementations: `openai_chat.OpenAIChatBackend` (any OpenAI-compatible server),
`flax_policy.FlaxPolicyBackend` (the project's own decoder, in process),
`LocalPolicyBackend` here (any in-process `TextGenerator`), and the research
environment's scripted policy (`apollo.agents.envs.research_policy`); `registry`
makes them selectable by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from apollo.agents import env as env_lib

Messages = Sequence[Mapping[str, Any]]

TOOL_MODES = ("native", "text")


@dataclasses.dataclass
class ModelResponse:
  """The model's answer to one context.

  Attributes:
    text: the raw text the model produced (from a server: the message's content).
    prompt_tokens, completion_tokens: token counts.
    raw: the server's full JSON answer, when there is one.
    tool_calls: native mode: the calls read from the reply, as OpenAI `tool_calls`
      entries (`{"id", "type": "function", "function": {"name", "arguments"}}`,
      arguments a JSON string).
    content: native mode: the reply's text outside its tool calls (None: `text`).
    call_errors: native mode: calls the backend saw in the text but could not read.
  """

  text: str
  prompt_tokens: int
  completion_tokens: int
  raw: dict[str, Any] | None = None
  tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  content: str | None = None
  call_errors: list[str] = dataclasses.field(default_factory=list)


class Backend(Protocol):
  """What the agent loop needs from a model."""

  name: str

  def complete(self, messages: Messages, tools: Sequence[env_lib.ToolSpec]) -> ModelResponse:
    """The next assistant message; `tools` non-empty = native tool calling."""
    ...

  def snapshot(self) -> dict[str, Any]: ...

  def restore(self, state: Mapping[str, Any]) -> None: ...


class BackendError(RuntimeError):
  """The model could not be reached or answered garbage after all retries."""


class TextGenerator(Protocol):
  """An in-process policy (the project's Flax policy implements this)."""

  def generate(self, messages: Messages) -> tuple[str, int, int]:
    """Returns (response text, prompt tokens, completion tokens)."""


class LocalPolicyBackend:
  """Adapts an in-process `TextGenerator` to the `Backend` protocol (text mode)."""

  tool_mode = "text"

  def __init__(self, generator: TextGenerator, name: str = "local"):
    self.generator = generator
    self.name = name

  def complete(self, messages: Messages, tools: Sequence[env_lib.ToolSpec]) -> ModelResponse:
    del tools
    text, prompt_tokens, completion_tokens = self.generator.generate(messages)
    return ModelResponse(
      text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )

  def snapshot(self) -> dict[str, Any]:
    return {}

  def restore(self, state: Mapping[str, Any]) -> None:
    del state
