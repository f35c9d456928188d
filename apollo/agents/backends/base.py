"""The backend protocol: what turns a chat context into the next response.

The agent loop hands a backend the exact list of chat messages it sends the model
and gets back the text of the next assistant message plus token counts
(`ModelResponse`). Backends may keep state between turns; `snapshot` / `restore`
save it with every step, so a resumed rollout continues with the same policy state.

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

Messages = Sequence[Mapping[str, str]]


@dataclasses.dataclass
class ModelResponse:
  """The model's answer to one context."""

  text: str
  prompt_tokens: int
  completion_tokens: int
  raw: dict[str, Any] | None = None  # the server's full JSON answer, when there is one


class Backend(Protocol):
  """What the agent loop needs from a model."""

  name: str

  def complete(self, messages: Messages, tools: Sequence[env_lib.ToolSpec]) -> ModelResponse: ...

  def snapshot(self) -> dict[str, Any]: ...

  def restore(self, state: Mapping[str, Any]) -> None: ...


class BackendError(RuntimeError):
  """The model could not be reached or answered garbage after all retries."""


class TextGenerator(Protocol):
  """An in-process policy (the project's Flax policy implements this)."""

  def generate(self, messages: Messages) -> tuple[str, int, int]:
    """Returns (response text, prompt tokens, completion tokens)."""


class LocalPolicyBackend:
  """Adapts an in-process `TextGenerator` to the `Backend` protocol."""

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
