"""Tool calls written as text by a model, read back into structured calls (and written).

Models that call tools natively still emit text; each family has its own form, and
an OpenAI-compatible server (vLLM's ``--tool-call-parser``, SGLang's) parses it
into the ``tool_calls`` of a chat completion. The forms read here:

- ``hermes`` (Hermes 2 Pro, Qwen2.5, SmolLM2; vLLM's ``hermes`` parser)::

      <tool_call>
      {"name": "check_run", "arguments": {"run_id": "r1"}}
      </tool_call>

- ``glm45`` (GLM-4.5; vLLM's ``glm45`` parser), with an optional ``<think>`` block::

      <tool_call>check_run
      <arg_key>run_id</arg_key>
      <arg_value>r1</arg_value>
      </tool_call>

- ``json``: a bare JSON object ``{"tool": name, "arguments": {...}}`` (or ``"name"``)
  anywhere in the reply, for servers and models without tool support.

A reply may hold several calls; text outside them is the reply's content. A
malformed call is kept as an error string, never raised, so an agent loop can turn
it into an error observation.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("hermes", "glm45", "json")

# An unclosed <tool_call> at the end (generation stopped at its stop token) still counts.
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_GLM_ARG_RE = re.compile(
  r"<arg_key>\s*(.*?)\s*</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL
)
_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One call: the tool's name and its arguments (a JSON object)."""

  name: str
  arguments: dict[str, Any]
  id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

  def to_openai(self) -> dict[str, Any]:
    """As an entry of an OpenAI assistant message's ``tool_calls``."""
    return {
      "id": self.id,
      "type": "function",
      "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
    }


@dataclasses.dataclass(frozen=True)
class ParsedReply:
  """A reply split into its text and its tool calls.

  Attributes:
    content: the text outside tool calls (and outside ``<think>`` blocks).
    tool_calls: the well-formed calls, in order.
    errors: one message per call that could not be read.
    reasoning: the text of ``<think>`` blocks, if any.
  """

  content: str
  tool_calls: list[ToolCall]
  errors: list[str]
  reasoning: str = ""


def _arguments(value: Any, where: str) -> tuple[dict[str, Any] | None, str | None]:
  if isinstance(value, str):  # Some models double-encode the arguments.
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      return None, f"{where}: arguments are not a JSON object"
  if value is None:
    value = {}
  if not isinstance(value, dict):
    return None, f"{where}: arguments must be a JSON object, got {type(value).__name__}"
  return value, None


def _call_from_object(obj: Any, where: str) -> tuple[ToolCall | None, str | None]:
  if not isinstance(obj, dict):
    return None, f"{where}: expected a JSON object"
  name = obj.get("name", obj.get("tool"))
  if not isinstance(name, str) or not name:
    return None, f"{where}: no tool name (expected a 'name' field)"
  arguments, error = _arguments(obj.get("arguments", obj.get("parameters", {})), where)
  if error:
    return None, error
  return ToolCall(name, arguments), None


def _parse_hermes(text: str) -> tuple[str, list[ToolCall], list[str]]:
  calls, errors = [], []
  for i, match in enumerate(_TOOL_CALL_RE.finditer(text)):
    body = match.group(1)
    try:
      obj = json.loads(body)
    except json.JSONDecodeError as e:
      errors.append(f"tool call {i + 1}: invalid JSON ({e.msg} at character {e.pos})")
      continue
    call, error = _call_from_object(obj, f"tool call {i + 1}")
    if call:
      calls.append(call)
    else:
      errors.append(error)
  return _TOOL_CALL_RE.sub("", text), calls, errors


def _glm_value(raw: str) -> Any:
  # GLM-4.5 writes strings bare and other types as JSON (vLLM's glm45 parser does the same).
  raw = raw.strip()
  try:
    return json.loads(raw)
  except json.JSONDecodeError:
    return raw


def _parse_glm45(text: str) -> tuple[str, list[ToolCall], list[str]]:
  calls, errors = [], []
  for i, match in enumerate(_TOOL_CALL_RE.finditer(text)):
    body = match.group(1)
    name, _, args = body.partition("<arg_key>")
    name, args = name.strip(), "<arg_key>" + args if args else ""
    if not name or "<" in name:
      errors.append(f"tool call {i + 1}: no tool name before the first <arg_key>")
      continue
    arguments = {k.strip(): _glm_value(v) for k, v in _GLM_ARG_RE.findall(args)}
    leftover = _GLM_ARG_RE.sub("", args)
    if leftover.strip():
      errors.append(f"tool call {i + 1}: unpaired <arg_key>/<arg_value> in {leftover.strip()!r}")
      continue
    calls.append(ToolCall(name, arguments))
  return _TOOL_CALL_RE.sub("", text), calls, errors


def _json_objects(text: str) -> list[tuple[int, int, Any]]:
  """Every top-level JSON object in ``text``: (start, end, value)."""
  decoder = json.JSONDecoder()
  found, i = [], text.find("{")
  while i != -1:
    try:
      value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
      i = text.find("{", i + 1)
      continue
    found.append((i, end, value))
    i = text.find("{", end)
  return found


def _parse_json(text: str) -> tuple[str, list[ToolCall], list[str]]:
  objects = [o for o in _json_objects(text) if isinstance(o[2], dict)]
  if not objects:
    return text, [], (["no JSON object in the reply"] if "{" in text else [])
  calls, errors, content, last = [], [], [], 0
  for i, (start, end, obj) in enumerate(objects):
    call, error = _call_from_object(obj, f"tool call {i + 1}")
    if call:
      calls.append(call)
    else:
      errors.append(error)
    content.append(text[last:start])
    last = end
  content.append(text[last:])
  return "".join(content), calls, errors


_PARSERS = {"hermes": _parse_hermes, "glm45": _parse_glm45, "json": _parse_json}


def parse(text: str, format: str) -> ParsedReply:
  """Splits a model's reply into content and tool calls written in ``format``.

  Raises:
    ValueError: for an unknown format (a reply is never an error: see ``errors``).
  """
  if format not in _PARSERS:
    raise ValueError(f"Unknown tool-call format {format!r}; choose from {FORMATS}.")
  reasoning = "\n".join(m.group(0) for m in _THINK_RE.finditer(text))
  reasoning = reasoning.replace("<think>", "").replace("</think>", "").strip()
  text = _THINK_RE.sub("", text)
  content, calls, errors = _PARSERS[format](text)
  return ParsedReply(content.strip(), calls, errors, reasoning)


def render(calls: Sequence[ToolCall | Mapping[str, Any]], format: str) -> str:
  """The text a model of ``format`` writes for ``calls`` (the inverse of :func:`parse`).

  ``calls`` may be :class:`ToolCall` s or OpenAI ``tool_calls`` entries.
  """
  if format not in _PARSERS:
    raise ValueError(f"Unknown tool-call format {format!r}; choose from {FORMATS}.")
  parts = []
  for call in calls:
    if not isinstance(call, ToolCall):
      function = call["function"]
      arguments = function["arguments"]
      call = ToolCall(
        function["name"], json.loads(arguments) if isinstance(arguments, str) else arguments
      )
    if format == "hermes":
      body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
      parts.append(f"<tool_call>\n{body}\n</tool_call>")
    elif format == "glm45":
      args = "".join(
        f"<arg_key>{k}</arg_key>\n<arg_value>"
        f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</arg_value>\n"
        for k, v in call.arguments.items()
      )
      parts.append(f"<tool_call>{call.name}\n{args}</tool_call>")
    else:
      parts.append(json.dumps({"tool": call.name, "arguments": call.arguments}))
  return "\n".join(parts)
