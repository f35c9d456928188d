"""Chat templates: a checkpoint's own Jinja template, rendered to tokens with roles and loss masks.

A conversation (OpenAI chat messages) is rendered with the model's own Jinja chat
template (``tokenizer_config.json``'s ``chat_template``, or the GGUF metadata) in
the sandboxed jinja2 environment transformers uses, with the variables it passes
(``messages``, ``tools``, ``add_generation_prompt`` and the named special tokens;
``apply_chat_template`` in ``transformers/utils/chat_template_utils.py``), and the
text is tokenized as transformers tokenizes it, so the ids are those the model was
tuned on. :class:`ChatTemplate` does both and returns, for every token, the role of
its message, the message index (segment) and a loss mask.

Where each message's tokens lie comes from rendering prefixes of the conversation:
message i ends where ``messages[:i+1]`` rendered alone ends, and an assistant turn's
own text starts where ``messages[:i]`` rendered with the generation prompt ends. That
holds for any template that renders a conversation prefix-consistently (ChatML,
SmolLM2, Qwen2.5, Llama 3); a template that does not (one that rewrites earlier turns,
e.g. drops their reasoning) is refused with an error that names it.

The loss mask is True exactly on the *targets* of trainable assistant turns: the
turn's content, its tool calls as the template writes them, **and its end-of-turn
token** (the turn's last special token, e.g. ``<|im_end|>``). The end-of-turn token
is a target on purpose: it is how the model learns to stop after one action. Masking
it out taught one model to run on after its tool call and emit further calls in the
same turn. The header (``<|im_start|>assistant\\n``) is not a target (it is the
prompt at inference), nor is the ``\\n`` after ``<|im_end|>`` (generation stops at
``<|im_end|>``).

Templates differ in what they know about tools, so a conversation is adapted to the
template in hand (:func:`adapt_messages`; the OpenAI server uses the same function):

- A template that renders ``tools`` gets them. One that does not (SmolLM2's) gets
  them described in the system message, with the call syntax of the model's
  tool-call format (Hermes' wording, as Qwen2.5's template writes it).
- An assistant message's ``tool_calls`` go to a template that renders them;
  otherwise they are written into its content in the model's format
  (:func:`apollo.models.tool_calls.render`), as the model would have written them.
- A ``tool`` message goes to a template that knows the role; otherwise it becomes a
  user message ``<tool_response>...</tool_response>`` (the Hermes convention).

Message content is tokenized literally: a ``<|im_end|>`` typed into a message (or
printed by a program into an observation) is encoded as plain text, never as the
special token, so no message can end its turn early or open a new one. (On content
without special-token strings this is exactly transformers' tokenization.)

Human guidance (Fu et al., 2025) is an ordinary user-role message whose content opens
a tag the caller names (the agents pass ``guidance_tag='human_guidance'``); it gets
its own role id so a trainer can keep, drop or mask it.

:data:`CHATML_TEMPLATE` is ChatML as Qwen2 writes it, without a default system prompt:
the template of the toy policies, whose tokenizer :func:`train_chat_tokenizer` trains
(a tiny byte-level BPE with the ChatML special tokens). :func:`from_pretrained` reads
a checkpoint directory's tokenizer and template.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from apollo.models import tokenizer as tokenizer_lib
from apollo.models import tool_calls as tool_calls_lib

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2's order (ids 151643-151645 there; 0-2 in a tokenizer trained here).
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# How tool calls are written as text when nothing says how the model writes them:
# the agent's own action form, a bare JSON object {"tool": ..., "arguments": ...}.
DEFAULT_TOOL_CALL_FORMAT = "json"

# Per-token role ids.
ROLE_SYSTEM = 0
ROLE_USER = 1
ROLE_GUIDANCE = 2  # A user-role message carrying the human's <human_guidance> tag.
ROLE_ASSISTANT = 3
ROLE_TOOL = 4  # A tool result (a 'tool' message, whatever role the template gives it).
ROLE_IDS = {
  "system": ROLE_SYSTEM,
  "user": ROLE_USER,
  "guidance": ROLE_GUIDANCE,
  "assistant": ROLE_ASSISTANT,
  "tool": ROLE_TOOL,
}
_MESSAGE_ROLES = {
  "system": ROLE_SYSTEM,
  "developer": ROLE_SYSTEM,  # OpenAI's newer name for the system role.
  "user": ROLE_USER,
  "assistant": ROLE_ASSISTANT,
  "tool": ROLE_TOOL,
}


class ChatTemplateError(ValueError):
  """A conversation the template cannot render (or cannot cut into turns)."""


@dataclasses.dataclass(frozen=True)
class RenderedChat:
  """A tokenized conversation; all arrays have one entry per token.

  Attributes:
    ids: int32 token ids.
    roles: int8 role id (:data:`ROLE_IDS`) of the message each token belongs to
      (the generation prompt counts as assistant).
    segments: int32 index of that message in the input list (the generation
      prompt gets ``len(messages)``; a system message added to describe tools, -1).
    loss_mask: bool; True on the content, tool calls and end-of-turn token of
      trainable assistant turns, False everywhere else.
  """

  ids: np.ndarray
  roles: np.ndarray
  segments: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


# -----------------------------------------------------------------------------
# The Jinja environment (transformers')
# -----------------------------------------------------------------------------


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # transformers' override: jinja's own tojson escapes HTML characters and sorts keys.
  return json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


@functools.lru_cache(maxsize=16)
def compile_jinja(template: str) -> jinja2.Template:
  """Compiles ``template`` in the environment transformers renders chat templates in."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render_jinja(
  template: str,
  messages: Sequence[Mapping[str, object]],
  *,
  tools: Sequence[Mapping[str, object]] | None = None,
  add_generation_prompt: bool = False,
  special_tokens: Mapping[str, str] | None = None,
  **kwargs: object,
) -> str:
  """Renders ``messages`` with a checkpoint's Jinja chat template, as transformers does.

  Args:
    template: the Jinja source (``tokenizer_config.json``'s ``chat_template``).
    messages: OpenAI-style chat messages.
    tools: tool definitions in the OpenAI ``tools`` format (JSON Schemas), or None.
    add_generation_prompt: end with the header of an assistant turn.
    special_tokens: e.g. ``{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}``.
    **kwargs: further template variables.
  """
  return compile_jinja(template).render(
    messages=list(messages),
    tools=None if tools is None else list(tools),
    add_generation_prompt=add_generation_prompt,
    **dict(special_tokens or {}),
    **kwargs,
  )


# -----------------------------------------------------------------------------
# Adapting a conversation to what the template knows about tools
# -----------------------------------------------------------------------------

_PROBE_NAME = "probe_function_c4f1e2"


@dataclasses.dataclass(frozen=True)
class ToolSupport:
  """What a template does with tools (found by rendering probes, or by its source)."""

  tools: bool  # renders the `tools` definitions it is given
  tool_calls: bool  # renders an assistant message's `tool_calls`
  tool_role: bool  # has its own rendering of 'tool' messages


def _renders(template: str, text: str, messages: list[dict[str, Any]], **kwargs: Any) -> bool:
  try:
    return text in render_jinja(template, messages, **kwargs)
  except Exception:  # noqa: BLE001 - any failure of a probe means "not supported".
    return False


@functools.lru_cache(maxsize=16)
def tool_support(template: str) -> ToolSupport:
  """What ``template`` does with tools: probed by rendering (tools, tool_calls), and
  for the 'tool' role by its source (a template that prints any role verbatim, such
  as ChatML, would render a tool message too, as a role the model never saw)."""
  user = {"role": "user", "content": "hi"}
  call = {"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}
  tool = {"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object"}}}
  return ToolSupport(
    tools=_renders(template, _PROBE_NAME, [user], tools=[tool]),
    tool_calls=_renders(
      template, _PROBE_NAME, [user, {"role": "assistant", "content": "", "tool_calls": [call]}]
    ),
    tool_role=bool(re.search(r"""['"]tool['"]|\btool\b""", template)),
  )


def _text(content: Any) -> str:
  """A message's content as text (OpenAI content may be None or a list of text parts)."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  return "\n".join(part["text"] for part in content if part.get("type", "text") == "text")


def _arguments(arguments: Any) -> Any:
  # Templates expect the arguments as an object (transformers' convention); OpenAI
  # sends a JSON string.
  if not isinstance(arguments, str):
    return arguments
  try:
    return json.loads(arguments)
  except json.JSONDecodeError:
    return arguments


def tools_system_text(tools: Sequence[Mapping[str, Any]], tool_format: str) -> str:
  """Tool definitions and call syntax for a system message (Hermes / Qwen2.5 wording)."""
  example = tool_calls_lib.render(
    [tool_calls_lib.ToolCall("<function-name>", {"<argument>": "<value>"}, id="")], tool_format
  )
  listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
  return (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{listed}\n</tools>\n\nFor each function call, write it exactly in this form:\n{example}"
  )


def adapt_messages(
  messages: Sequence[Mapping[str, Any]],
  template: str,
  tools: Sequence[Mapping[str, Any]] | None = None,
  tool_format: str = DEFAULT_TOOL_CALL_FORMAT,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
  """(``messages`` as ``template`` expects them, the tools to pass to it).

  See the module docstring. Messages map one to one, except that tools a template
  cannot render are described in a system message, inserted first if there is none.
  Assistant ``tool_calls`` arguments given as JSON strings (OpenAI) become objects.

  Raises:
    ChatTemplateError: for a role other than system/developer/user/assistant/tool.
  """
  support = tool_support(template)
  out: list[dict[str, Any]] = []
  for m in messages:
    role = m.get("role")
    if role in ("system", "developer", "user"):
      out.append({"role": "user" if role == "user" else "system", "content": _text(m["content"])})
    elif role == "assistant":
      message: dict[str, Any] = {"role": "assistant", "content": _text(m.get("content"))}
      calls = [
        {
          "id": c.get("id"),
          "type": "function",
          "function": {
            "name": c["function"]["name"],
            "arguments": _arguments(c["function"].get("arguments", {})),
          },
        }
        for c in m.get("tool_calls") or ()
      ]
      if calls and support.tool_calls:
        message["tool_calls"] = calls
      elif calls:
        written = tool_calls_lib.render(calls, tool_format)
        message["content"] = "\n".join(t for t in (message["content"], written) if t)
      out.append(message)
    elif role == "tool":
      if support.tool_role:
        out.append(
          {"role": "tool", "content": _text(m["content"]), "tool_call_id": m.get("tool_call_id")}
        )
      else:
        content = f"<tool_response>\n{_text(m['content'])}\n</tool_response>"
        out.append({"role": "user", "content": content})
    else:
      raise ChatTemplateError(
        f"Unknown message role {role!r}; expected one of {sorted(_MESSAGE_ROLES)}."
      )
  if not tools or support.tools:
    return out, [dict(t) for t in tools] if tools else None
  described = tools_system_text(tools, tool_format)
  if out and out[0]["role"] == "system":
    out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}".lstrip()}
  else:
    out.insert(0, {"role": "system", "content": described})
  return out, None


# -----------------------------------------------------------------------------
# The template: text, tokens, roles, segments and loss masks
# -----------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
  # tokenizer_config.json stores a special token as a string or as an AddedToken dict.
  return value.get("content") if isinstance(value, Mapping) else value


def special_tokens_from_config(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
  """The named special tokens of a ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
  ``pad_token``, ``unk_token``): the variables a template may use."""
  names = ("bos_token", "eos_token", "pad_token", "unk_token")
  found = {n: _token_text(tokenizer_config.get(n)) for n in names}
  return {n: t for n, t in found.items() if t is not None}


def _copy(tokenizer: tokenizers.Tokenizer, literal: bool) -> tokenizers.Tokenizer:
  """A copy of ``tokenizer`` without post-processing (it never changes ids without
  added special tokens, but may trim offsets); ``literal``: special-token strings
  encode as plain text."""
  copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  copy.post_processor = None
  copy.encode_special_tokens = literal
  return copy


def _first_difference(a: str, b: str) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


class ChatTemplate:
  """Renders chat messages with a Jinja chat template to token ids, roles and loss masks.

  Args:
    tokenizer: the checkpoint's ``tokenizers.Tokenizer``.
    guidance_tag: a user message whose content starts with ``<{guidance_tag} `` is
      guidance (role id :data:`ROLE_GUIDANCE`); None: no message is.
    template: the Jinja source; default :data:`CHATML_TEMPLATE` (which needs
      ``<|im_start|>`` and ``<|im_end|>`` in the tokenizer).
    special_tokens: the template's special-token variables (``eos_token`` ...); for
      ChatML by default ``eos_token=<|im_end|>`` and ``pad_token=<|endoftext|>``.
    tool_call_format: how the model writes tool calls (``apollo.models.tool_calls``
      formats), used where the template does not render ``tool_calls``; default
      :data:`DEFAULT_TOOL_CALL_FORMAT`.
    name: how errors name the template (e.g. the checkpoint's path).
    tokenizer_config: the checkpoint's ``tokenizer_config.json`` (kept by
      :meth:`save_pretrained`).

  Attributes:
    end_of_turn_id: the token that closes an assistant turn (found by rendering one).
    stop_ids: generation stops at these: the end of turn, the eos token, ``<|endoftext|>``.
    pad_id: the pad token (else the eos token).
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    guidance_tag: str | None = None,
    *,
    template: str = CHATML_TEMPLATE,
    special_tokens: Mapping[str, str] | None = None,
    tool_call_format: str | None = None,
    name: str | None = None,
    tokenizer_config: Mapping[str, Any] | None = None,
  ):
    self.tokenizer = tokenizer
    self.guidance_tag = guidance_tag
    self.source = template
    is_chatml = template == CHATML_TEMPLATE
    digest = hashlib.sha256(template.encode()).hexdigest()[:10]
    self.name = name or ("the ChatML template" if is_chatml else f"chat template {digest}")
    self.tool_call_format = tool_call_format or DEFAULT_TOOL_CALL_FORMAT
    if is_chatml:
      missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
      if missing:
        raise ValueError(
          f"The tokenizer has no {missing} token(s); the ChatML template "
          f"needs {IM_START} and {IM_END}."
        )
      if special_tokens is None:
        pad = ENDOFTEXT if tokenizer.token_to_id(ENDOFTEXT) is not None else IM_END
        special_tokens = {"eos_token": IM_END, "pad_token": pad}
    self.special_tokens = dict(special_tokens or {})
    self.tokenizer_config = dict(tokenizer_config or {})
    self._plain = _copy(tokenizer, literal=False)
    self._literal = _copy(tokenizer, literal=True)
    added = tokenizer.get_added_tokens_decoder()
    self._special_ids = frozenset(i for i, t in added.items() if t.special)
    specials = sorted((t.content for t in added.values() if t.special), key=len, reverse=True)
    self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    self.end_of_turn_id = self._probe_end_of_turn()
    token_id = lambda t: None if t is None else tokenizer.token_to_id(t)
    eos = token_id(self.special_tokens.get("eos_token"))
    stops = (self.end_of_turn_id, eos, tokenizer.token_to_id(ENDOFTEXT))
    self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))
    pad = token_id(self.special_tokens.get("pad_token"))
    self.pad_id: int = next((i for i in (pad, eos, self.end_of_turn_id) if i is not None), 0)

  # Tokens the ChatML-era code and tests name directly.
  @property
  def im_start_id(self) -> int | None:
    return self.tokenizer.token_to_id(IM_START)

  @property
  def im_end_id(self) -> int | None:
    return self.tokenizer.token_to_id(IM_END)

  def role_of(self, message: Mapping[str, Any]) -> int:
    """The role id of ``message`` (guidance-tagged user messages are separate).

    Raises:
      ValueError: for an unknown role, or a 'tool' message without a ``tool_call_id``.
    """
    role = message.get("role")
    if role not in _MESSAGE_ROLES:
      raise ChatTemplateError(
        f"Unknown message role {role!r}; expected one of {sorted(_MESSAGE_ROLES)}."
      )
    if role == "tool" and not message.get("tool_call_id"):
      raise ChatTemplateError(
        "A 'tool' role message answers a call: it needs the 'tool_call_id' of that call."
      )
    if (
      self.guidance_tag is not None
      and role == "user"
      and _text(message.get("content")).startswith(f"<{self.guidance_tag} ")
    ):
      return ROLE_GUIDANCE
    return _MESSAGE_ROLES[role]

  def _jinja(
    self,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
  ) -> str:
    try:
      return render_jinja(
        self.source,
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        special_tokens=self.special_tokens,
      )
    except (jinja2.TemplateError, TypeError) as e:
      raise ChatTemplateError(f"{self.name} cannot render this conversation: {e}") from e

  def render_text(
    self,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
  ) -> str:
    """The rendered text (for reading; :meth:`render` gives what the model sees)."""
    for m in messages:
      self.role_of(m)
    adapted, template_tools = adapt_messages(messages, self.source, tools, self.tool_call_format)
    return self._jinja(adapted, template_tools, add_generation_prompt)

  def render(
    self,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    trainable: Sequence[bool] | None = None,
    add_generation_prompt: bool = False,
  ) -> RenderedChat:
    """Tokenizes ``messages`` with roles, segments and the loss mask.

    Args:
      messages: OpenAI chat messages: 'system', 'user', 'assistant' (content and/or
        ``tool_calls``), 'tool' (content and ``tool_call_id``).
      tools: tool definitions (OpenAI ``tools`` format) the model is given, or None.
      trainable: one flag per message; an assistant message is a training target
        only if its flag is True (e.g. False for actions the judge filtered out:
        they stay in the context but are not imitated). Default: every assistant
        message is trainable. Flags of other roles are ignored.
      add_generation_prompt: end with the header of an assistant turn (for sampling).

    Returns:
      A :class:`RenderedChat`.

    Raises:
      ChatTemplateError (a ValueError): an unknown role, a template error, or a
        template whose renderings of the conversation's prefixes are not prefixes
        of its rendering of the whole (turns could not be cut out of it).
    """
    if trainable is not None and len(trainable) != len(messages):
      raise ValueError(f"{len(trainable)} trainable flags for {len(messages)} messages.")
    roles = [self.role_of(m) for m in messages]
    adapted, template_tools = adapt_messages(messages, self.source, tools, self.tool_call_format)
    shift = len(adapted) - len(messages)  # 1 if a system message describes the tools
    n = len(adapted)
    jinja = lambda msgs, generation_prompt: self._jinja(msgs, template_tools, generation_prompt)
    full = jinja(adapted, add_generation_prompt)

    def is_target(j: int) -> bool:
      i = j - shift
      return i >= 0 and roles[i] == ROLE_ASSISTANT and (trainable is None or bool(trainable[i]))

    # ends[j]: where adapted message j ends in `full`; None where the template renders
    # it together with the next one (e.g. consecutive tool results in one user turn).
    ends: list[int | None] = [None] * n
    for j in range(n):
      text = full if j == n - 1 and not add_generation_prompt else jinja(adapted[: j + 1], False)
      if full.startswith(text):
        ends[j] = len(text)
      elif j == n - 1 or adapted[j]["role"] == "assistant" or adapted[j + 1]["role"] == "assistant":
        raise self._not_a_prefix(j + 1, text, full)
    starts: dict[int, int] = {}  # where a target turn's own text starts (after its header)
    for j in filter(is_target, range(n)):
      head = jinja(adapted[:j], True)
      if not full.startswith(head) or not (ends[j - 1] if j else 0) <= len(head) <= ends[j]:
        raise self._not_a_prefix(j, head, full, generation_prompt=True)
      starts[j] = len(head)

    literal = self._literal_spans(adapted, template_tools, add_generation_prompt, full)
    ids, token_ends = self._encode(full, literal)
    token_ends = np.asarray(token_ends, np.int64)
    # A token belongs to the message its last character is in; past the last message,
    # to the generation prompt (adapted index n).
    owners = [j for j, e in enumerate(ends) if e is not None] + [n]
    boundaries = np.asarray([e for e in ends if e is not None], np.int64)
    segments = np.asarray(owners, np.int32)[np.searchsorted(boundaries, token_ends)] - shift
    # Segment -1 (a system message describing the tools) is system; len(messages), the
    # generation prompt, is assistant.
    role_table = np.asarray([ROLE_SYSTEM, *roles, ROLE_ASSISTANT], np.int8)
    role_ids = role_table[segments + 1]
    mask = np.zeros(len(ids), bool)
    for j, start in starts.items():
      span = np.flatnonzero((token_ends > start) & (token_ends <= ends[j]))
      closing = [k for k in span if ids[k] in self._special_ids]
      # Through the turn's last special token (its end of turn), not what follows it.
      mask[span[span <= closing[-1]] if closing else span] = True
    return RenderedChat(
      ids=np.asarray(ids, np.int32).reshape(-1),
      roles=role_ids,
      segments=segments,
      loss_mask=mask,
    )

  def _not_a_prefix(
    self, count: int, text: str, full: str, generation_prompt: bool = False
  ) -> ChatTemplateError:
    at = _first_difference(text, full)
    what = f"the first {count} message(s)" + (
      " with the generation prompt" if generation_prompt else ""
    )
    return ChatTemplateError(
      f"{self.name} does not render conversations prefix-consistently: {what} render as "
      f"text the whole conversation does not start with (at character {at}: "
      f"{text[at : at + 40]!r} against {full[at : at + 40]!r}), so its turns cannot be "
      "cut out for loss masks. Templates that rewrite earlier turns (e.g. drop their "
      "reasoning) are not supported for training."
    )

  def _literal_spans(
    self,
    adapted: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    full: str,
  ) -> list[tuple[int, int]]:
    """Character spans of `full` holding message content with special-token strings.

    Found by rendering the conversation again with that content replaced by unique
    markers; the template must pass such content through unchanged.
    """
    if self._special_re is None:
      return []
    holders = [j for j, m in enumerate(adapted) if self._special_re.search(m.get("content") or "")]
    if not holders:
      return []
    marker = lambda j: f"\ue000{j}\ue001"  # Private-use characters: never in a template.
    marked = [dict(m, content=marker(j)) if j in holders else m for j, m in enumerate(adapted)]
    skeleton = self._jinja(marked, tools, add_generation_prompt)
    found = sorted((skeleton.find(marker(j)), j) for j in holders)
    spans, pieces, last, growth = [], [], 0, 0
    for position, j in found:
      if position < 0 or skeleton.count(marker(j)) != 1:
        break
      content = adapted[j]["content"]
      start = position + growth
      spans.append((start, start + len(content)))
      pieces += [skeleton[last:position], content]
      last = position + len(marker(j))
      growth += len(content) - len(marker(j))
    pieces.append(skeleton[last:])
    if len(spans) != len(holders) or "".join(pieces) != full:
      raise ChatTemplateError(
        f"{self.name} does not render message content verbatim, so special-token text in "
        "a message could not be kept as plain text."
      )
    return spans

  def _encode(self, text: str, literal: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(token ids, each token's end offset in characters) of `text`.

    Without literal spans this is the tokenizer's own encoding (as transformers'). With
    them, the text is cut at the special tokens outside those spans (as the tokenizer
    itself does) and each piece encoded with special-token strings as plain text.
    """
    if not literal:
      encoding = self._plain.encode(text, add_special_tokens=False)
      return list(encoding.ids), [end for _, end in encoding.offsets]
    ids: list[int] = []
    ends: list[int] = []

    def add_piece(start: int, stop: int) -> None:
      if start < stop:
        encoding = self._literal.encode(text[start:stop], add_special_tokens=False)
        ids.extend(encoding.ids)
        ends.extend(start + end for _, end in encoding.offsets)

    position = 0
    for match in self._special_re.finditer(text):
      if any(a < match.end() and match.start() < b for a, b in literal):
        continue
      add_piece(position, match.start())
      ids.append(self.tokenizer.token_to_id(match.group()))
      ends.append(match.end())
      position = match.end()
    add_piece(position, len(text))
    return ids, ends

  def _probe_end_of_turn(self) -> int | None:
    """The last special token of a rendered assistant turn (None if it has none)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
      rendered = self.render(probe)
    except ChatTemplateError:
      return None
    targets = rendered.ids[rendered.loss_mask]
    return int(targets[-1]) if len(targets) and int(targets[-1]) in self._special_ids else None

  def decode_response(self, ids: Sequence[int]) -> str:
    """The text of generated ids, cut at the first stop token."""
    ids = [int(i) for i in ids]
    for i, token in enumerate(ids):
      if token in self.stop_ids:
        ids = ids[:i]
        break
    return self.tokenizer.decode(ids, skip_special_tokens=False)

  def save_pretrained(self, out_dir: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and a ``tokenizer_config.json`` holding the template,
    so :func:`from_pretrained`, ``apollo.models.load`` and transformers read it back."""
    os.makedirs(out_dir, exist_ok=True)
    self.tokenizer.save(os.path.join(os.fspath(out_dir), "tokenizer.json"))
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      **self.special_tokens,
      **self.tokenizer_config,
      "chat_template": self.source,
    }
    with open(os.path.join(os.fspath(out_dir), "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)


def _stored_template(config: Mapping[str, Any], directory: str) -> str | None:
  """The chat template of a checkpoint directory, if it has one."""
  template = config.get("chat_template")
  if isinstance(template, list):  # Named templates: [{"name": ..., "template": ...}].
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  path = os.path.join(directory, "chat_template.jinja")  # Newer transformers save it apart.
  if template is None and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      template = f.read()
  return template


def from_pretrained(
  path: str | os.PathLike, guidance_tag: str | None = None, tool_call_format: str | None = None
) -> ChatTemplate:
  """The chat template of a checkpoint directory (or of a bare ``tokenizer.json``).

  The directory's ``tokenizer.json`` with the template of its
  ``tokenizer_config.json`` (or ``chat_template.jinja``) and the special tokens named
  there; a bare ``tokenizer.json``, or a directory without a template, gets
  :data:`CHATML_TEMPLATE` (the toy policies' format).

  Raises:
    FileNotFoundError: naming the tokenizer file looked for.
  """
  path = os.fspath(path)
  tokenizer_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(tokenizer_file):
    raise FileNotFoundError(f"No tokenizer at {tokenizer_file}.")
  tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
  directory = os.path.dirname(os.path.abspath(tokenizer_file))
  config_file = os.path.join(directory, "tokenizer_config.json")
  config: dict[str, Any] = {}
  if os.path.isdir(path) and os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
  template = _stored_template(config, directory) if os.path.isdir(path) else None
  if template is None:
    return ChatTemplate(tokenizer, guidance_tag, tool_call_format=tool_call_format)
  return ChatTemplate(
    tokenizer,
    guidance_tag,
    template=template,
    special_tokens=special_tokens_from_config(config),
    tool_call_format=tool_call_format,
    name=config_file,
    tokenizer_config=config,
  )


# -----------------------------------------------------------------------------
# Tokenizers
# -----------------------------------------------------------------------------


def load_chat_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """Loads a local ``tokenizer.json`` (a file, or a checkpoint directory holding one).

  Raises:
    FileNotFoundError: naming the path looked for.
    ValueError: if the tokenizer lacks the ChatML special tokens.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No tokenizer at {path}.")
  tokenizer = tokenizers.Tokenizer.from_file(path)
  ChatTemplate(tokenizer)  # Fails early, naming the missing token.
  return tokenizer


# A small corpus in the agent's register (tool calls, observations, advice), so a
# demo tokenizer has merges for the strings the rollout loop actually produces.
DEMO_CORPUS: tuple[str, ...] = (
  "system user assistant: You are a research agent. Call exactly one tool per turn as JSON.",
  '{"tool": "read_file", "arguments": {"path": "README.md"}}',
  '{"tool": "launch_run", "arguments": {"gpu": 1, "data": "filtered"}}',
  '{"tool": "check_run", "arguments": {"run_id": "r1"}}',
  '{"tool": "sleep", "arguments": {"hours": 0.5}}',
  '{"tool": "set_config", "arguments": {"key": "learning_rate", "value": 0.001}}',
  "run r1: status=running gpu=1 data=filtered lr=0.001 train_loss=2.31",
  "[clock 3.5h / 24.0h | submissions left: 3]",
  '<human_guidance id="1" source="human">That run needs about ten more hours; '
  "don't kill it.</human_guidance>",
  "The loss is still going down; waiting for training to progress.",
  "Checking the data before training. The labels look noisy; filtering them first.",
)


def train_chat_tokenizer(
  texts: Iterable[str] = DEMO_CORPUS,
  vocab_size: int = 512,
  out_dir: str | os.PathLike | None = None,
) -> tokenizers.Tokenizer:
  """Trains a tiny byte-level BPE with the ChatML special tokens (ids 0-2).

  Every byte is in the vocabulary, so any text encodes. For tests and demos; a
  real policy uses its checkpoint's ``tokenizer.json``.

  Args:
    texts: training text.
    vocab_size: target size, the 3 special tokens and 256 byte symbols included.
    out_dir: if given, ``tokenizer.json`` is written there.
  """
  tokenizer = tokenizer_lib.train_byte_level_bpe(
    list(texts), CHAT_SPECIAL_TOKENS, vocab_size, min_frequency=1
  )
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(os.fspath(out_dir), "tokenizer.json"))
  return tokenizer
