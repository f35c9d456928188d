"""From a chat-completions request to the model's prompt tokens.

The messages are rendered with the checkpoint's own Jinja template
(:func:`apollo.models.inference.render_prompt`), adapted to what the template knows
about tools by :func:`apollo.models.chat_template.adapt_messages`, the function
that renders training samples too (tools a template cannot render are described
in the system message; tool calls it cannot render are written as the model's
text; tool results it has no role for become ``<tool_response>`` user messages).

``tool_choice='required'`` or a named function starts the reply with the opening of
a call (``<tool_call>`` and, for a named function, its name), so even a small model
writes a call; the opening counts as prompt and is put back in front of the reply
before it is parsed. ``'none'`` hides the tools.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from apollo.models import chat_template as chat_lib
from apollo.models import inference, registry
from apollo.models.serving import protocol

# Text that opens a call, per format: held back from streamed content until the
# call is complete. None: a call is a bare JSON object, only recognisable at the end.
CALL_OPENERS: dict[str, str | None] = {
  "hermes": "<tool_call>",
  "glm45": "<tool_call>",
  "json": None,
}


class ToolChoiceError(ValueError):
  """A ``tool_choice`` the request's tools cannot satisfy."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A request made ready to generate from.

  Attributes:
    ids: prompt token ids, ``reply_prefix`` included.
    reply_prefix: text the reply is forced to start with (a call's opening), or ''.
    tool_format: the format tool calls are parsed in, or None when tools are off.
  """

  ids: list[int]
  reply_prefix: str
  tool_format: str | None


def reply_prefix(tool_choice: Any, tool_format: str) -> str:
  """The opening a reply is forced to start with for ``tool_choice`` ('' = none)."""
  if tool_choice == "required":
    return {"hermes": "<tool_call>\n", "glm45": "<tool_call>", "json": '{"tool": "'}[tool_format]
  if isinstance(tool_choice, protocol.NamedToolChoice):
    name = tool_choice.function.name
    return {
      "hermes": f'<tool_call>\n{{"name": "{name}", "arguments": ',
      "glm45": f"<tool_call>{name}\n",
      "json": f'{{"tool": "{name}", "arguments": ',
    }[tool_format]
  return ""


def build_prompt(loaded: registry.LoadedModel, request: protocol.ChatCompletionRequest) -> Prompt:
  """The prompt ids for ``request`` (tools adapted to the template, see the module doc).

  Raises:
    ToolChoiceError: a ``tool_choice`` naming no given tool, or ``'required'`` without tools.
    jinja2.TemplateError: the template rejected the conversation.
  """
  tools = [t.model_dump(exclude_none=True) for t in request.tools or ()]
  choice = request.tool_choice
  if isinstance(choice, protocol.NamedToolChoice):
    names = [t["function"]["name"] for t in tools]
    if choice.function.name not in names:
      raise ToolChoiceError(
        f"tool_choice names {choice.function.name!r}, which is not in tools {names}"
      )
    tools = [t for t in tools if t["function"]["name"] == choice.function.name]
  if choice == "required" and not tools:
    raise ToolChoiceError("tool_choice='required' needs tools")
  if choice == "none":
    tools = []
  tool_format = (loaded.tool_call_format or chat_lib.DEFAULT_TOOL_CALL_FORMAT) if tools else None
  messages, template_tools = chat_lib.adapt_messages(
    [m.model_dump(exclude_none=True) for m in request.messages],
    loaded.chat_template or "",
    tools,
    tool_format or chat_lib.DEFAULT_TOOL_CALL_FORMAT,
  )
  ids = inference.render_prompt(loaded, messages, tools=template_tools)
  prefix = reply_prefix(choice, tool_format) if tool_format else ""
  if prefix:
    ids = ids + loaded.tokenizer.encode(prefix, add_special_tokens=False).ids
  return Prompt(ids=ids, reply_prefix=prefix, tool_format=tool_format)
