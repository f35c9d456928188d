"""The OpenAI chat-completions wire format, as pydantic models (requests and responses).

Field names, types and defaults follow OpenAI's API reference (and vLLM's
``protocol.py``, which serves the same clients). Requests ignore fields this
server does not use (clients send ``user``, ``metadata``, ...), but reject values
it cannot honour (``n`` > 1, ``logprobs``) with an error that names the field.
The models also give ``/docs`` and ``/openapi.json`` their schema.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
  model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
  """A text part of a message's content (images and audio are not served)."""

  type: Literal["text"]
  text: str


Content = str | list[TextPart]


class FunctionCall(_Request):
  name: str
  arguments: str = Field(description="The arguments as a JSON object, encoded as a string.")


class ToolCall(_Request):
  id: str | None = None
  type: Literal["function"] = "function"
  function: FunctionCall


class SystemMessage(_Request):
  role: Literal["system", "developer"]
  content: Content
  name: str | None = None


class UserMessage(_Request):
  role: Literal["user"]
  content: Content
  name: str | None = None


class AssistantMessage(_Request):
  role: Literal["assistant"]
  content: Content | None = None
  tool_calls: list[ToolCall] | None = None
  name: str | None = None


class ToolMessage(_Request):
  role: Literal["tool"]
  content: Content
  tool_call_id: str


Message = Annotated[
  SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class FunctionDefinition(_Request):
  name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
  description: str | None = None
  parameters: dict[str, Any] | None = Field(None, description="A JSON Schema object.")
  strict: bool | None = None


class Tool(_Request):
  type: Literal["function"]
  function: FunctionDefinition


class NamedFunction(_Request):
  name: str


class NamedToolChoice(_Request):
  type: Literal["function"]
  function: NamedFunction


class StreamOptions(_Request):
  include_usage: bool = False


class ChatCompletionRequest(_Request):
  """``POST /v1/chat/completions``."""

  model: str
  messages: list[Message] = Field(min_length=1)
  tools: list[Tool] | None = None
  tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
    None, description="Default 'auto' with tools. 'none' hides the tools from the model."
  )
  parallel_tool_calls: bool | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
  max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
  temperature: float | None = Field(None, ge=0, le=2, description="Default 1; 0 is greedy.")
  top_p: float | None = Field(None, gt=0, le=1, description="Default 1 (off).")
  stop: str | list[str] | None = Field(None, description="Text that ends the reply (cut off).")
  seed: int | None = None
  n: int | None = Field(None, description="Only 1.")
  logprobs: bool | None = Field(None, description="Not supported.")
  user: str | None = None

  @field_validator("n")
  @classmethod
  def _one_choice(cls, n):
    if n is not None and n != 1:
      raise ValueError(f"only n=1 is supported, got {n}")
    return n

  @field_validator("logprobs")
  @classmethod
  def _no_logprobs(cls, value):
    if value:
      raise ValueError("logprobs are not supported")
    return value

  @field_validator("stop")
  @classmethod
  def _nonempty_stops(cls, stop):
    stops = [stop] if isinstance(stop, str) else stop or []
    if any(not s for s in stops):
      raise ValueError("stop strings must not be empty")
    return stop


# -----------------------------------------------------------------------------
# Responses
# -----------------------------------------------------------------------------


def completion_id() -> str:
  return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


class FunctionCallOut(BaseModel):
  name: str
  arguments: str


class ToolCallOut(BaseModel):
  id: str
  type: Literal["function"] = "function"
  function: FunctionCallOut


class ToolCallDelta(BaseModel):
  index: int
  id: str
  type: Literal["function"] = "function"
  function: FunctionCallOut


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class ResponseMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str | None
  tool_calls: list[ToolCallOut] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
  index: int = 0
  message: ResponseMessage
  finish_reason: FinishReason
  logprobs: None = None


class ChatCompletion(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[Choice]
  usage: Usage


class Delta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None
  tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
  index: int = 0
  delta: Delta
  finish_reason: FinishReason | None = None
  logprobs: None = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[ChunkChoice]
  usage: Usage | None = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "apollo"
  max_model_len: int


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorBody(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorBody
