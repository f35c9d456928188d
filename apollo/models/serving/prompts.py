"""From a chat-completions request to the model's prompt tokens.

The messages are rendered with the checkpoint's own Jinja template
(:func:`apollo.models.inference.render_prompt`). Templates differ in what they
know about tools, so a request is adapted to the template in hand:

- A template that renders ``tools`` gets them. One that does not (SmolLM2's) gets
  them described in the system message, with the call syntax of the model's
  tool-call format (Hermes' wording, as Qwen2.5's template writes it).
- An assistant message's ``tool_calls`` go to a template that renders them;
  otherwise they are written into its content in the model's format
  (:func:`apollo.models.tool_calls.render`), as the model would have written them.
- A ``tool`` message goes to a template that knows the role; otherwise it becomes
  a user message ``<tool_response>...</tool_response>`` (the Hermes convention).
- ``tool_choice='required'`` or a named function starts the reply with the
  opening of a call (``<tool_call>`` and, for a named function, its name), so even
  a small model writes a call; the opening counts as prompt and is put back in
  front of the reply before it is parsed. ``'none'`` hides the tools.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from apollo.models import inference, registry, tool_calls
from apollo.models.serving import protocol

# The format tool calls are read in when the checkpoint does not name one.
DEFAULT_TOOL_CALL_FORMAT = "json"

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


def _text(content: protocol.Content | None) -> str:
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  return "\n".join(part.text for part in content)


def _arguments(arguments: str) -> Any:
  # Templates expect the arguments as an object (transformers' convention); OpenAI
  # sends a JSON string.
  try:
    return json.loads(arguments)
  except json.JSONDecodeError:
    return arguments


def _mentions(template: str, *words: str) -> bool:
  return any(re.search(rf"""['"]{w}['"]|\b{w}\b""", template) for w in words)


def tools_system_text(tools: list[dict[str, Any]], tool_format: str) -> str:
  """Tool definitions and call syntax for a system message (Hermes / Qwen2.5 wording)."""
  example = tool_calls.render(
    [tool_calls.ToolCall("<function-name>", {"<argument>": "<value>"}, id="")], tool_format
  )
  listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
  return (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{listed}\n</tools>\n\nFor each function call, write it exactly in this form:\n{example}"
  )


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


def template_messages(
  messages: list[protocol.Message],
  template: str,
  tools: list[dict[str, Any]] | None,
  tool_format: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
  """(messages as the template expects them, the tools to pass to the template)."""
  renders_calls = _mentions(template, "tool_calls")
  knows_tool_role = _mentions(template, "tool")
  out: list[dict[str, Any]] = []
  for m in messages:
    if isinstance(m, protocol.SystemMessage):
      out.append({"role": "system", "content": _text(m.content)})
    elif isinstance(m, protocol.UserMessage):
      out.append({"role": "user", "content": _text(m.content)})
    elif isinstance(m, protocol.AssistantMessage):
      message: dict[str, Any] = {"role": "assistant", "content": _text(m.content)}
      calls = [
        {
          "id": c.id,
          "type": "function",
          "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
        }
        for c in m.tool_calls or ()
      ]
      if calls and renders_calls:
        message["tool_calls"] = calls
      elif calls:
        written = tool_calls.render(calls, tool_format)
        message["content"] = "\n".join(t for t in (message["content"], written) if t)
      out.append(message)
    elif knows_tool_role:
      out.append({"role": "tool", "content": _text(m.content), "tool_call_id": m.tool_call_id})
    else:
      content = f"<tool_response>\n{_text(m.content)}\n</tool_response>"
      out.append({"role": "user", "content": content})
  if not tools or _mentions(template, "tools"):
    return out, tools or None
  described = tools_system_text(tools, tool_format)
  if out and out[0]["role"] == "system":
    out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}".lstrip()}
  else:
    out.insert(0, {"role": "system", "content": described})
  return out, None


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
  tool_format = (loaded.tool_call_format or DEFAULT_TOOL_CALL_FORMAT) if tools else None
  messages, template_tools = template_messages(
    request.messages, loaded.chat_template or "", tools, tool_format or DEFAULT_TOOL_CALL_FORMAT
  )
  ids = inference.render_prompt(loaded, messages, tools=template_tools)
  prefix = reply_prefix(choice, tool_format) if tool_format else ""
  if prefix:
    ids = ids + loaded.tokenizer.encode(prefix, add_special_tokens=False).ids
  return Prompt(ids=ids, reply_prefix=prefix, tool_format=tool_format)
