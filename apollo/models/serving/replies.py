"""From generated tokens to what a chat completion returns: text, stops, tool calls.

Three stages, each fed incrementally so that a streamed reply and a whole one
come out the same:

- :class:`Detokenizer`: token ids to text as they arrive. A byte-level BPE token
  can end inside a UTF-8 character, so text is released only once it decodes
  cleanly (the prefix/read-offset scheme of vLLM and TGI).
- :class:`StopStrings`: cuts the text at the first of the request's ``stop``
  strings, holding back a tail that could still grow into one.
- :class:`ToolCallSplitter`: separates content from tool calls written in the
  model's format (:mod:`apollo.models.tool_calls`). Content before a call's
  opening streams as it comes; from the opening on, text is held until a call is
  complete and is then released as a call (as vLLM streams tool calls). A reply
  whose held text parses into no call gets it back as content.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

from apollo.models import tool_calls


def _held_tail(text: str, markers: Sequence[str]) -> int:
  """Length of the longest tail of ``text`` that is a proper prefix of a marker."""
  longest = 0
  for marker in markers:
    for n in range(min(len(marker) - 1, len(text)), longest, -1):
      if text.endswith(marker[:n]):
        longest = n
        break
  return longest


class Detokenizer:
  """Incremental decoding; ``skip_ids`` (the stop tokens) never become text."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, skip_ids: Sequence[int] = ()):
    self._tokenizer = tokenizer
    self._skip = set(skip_ids)
    self._ids: list[int] = []
    self._prefix = 0  # Start of the window decoded for context.
    self._read = 0  # End of the text already released.

  def _decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def add(self, ids: Sequence[int]) -> str:
    """The new text after ``ids`` ('' while a character is still incomplete)."""
    self._ids.extend(i for i in ids if i not in self._skip)
    before = self._decode(self._ids[self._prefix : self._read])
    after = self._decode(self._ids[self._prefix :])
    if len(after) <= len(before) or after.endswith("\ufffd"):
      return ""
    self._prefix, self._read = self._read, len(self._ids)
    return after[len(before) :]

  def flush(self) -> str:
    """Whatever is left (an incomplete character decodes as U+FFFD)."""
    before = self._decode(self._ids[self._prefix : self._read])
    after = self._decode(self._ids[self._prefix :])
    self._prefix = self._read = len(self._ids)
    return after[len(before) :]


class StopStrings:
  """Cuts a growing text at the first stop string (not included)."""

  def __init__(self, stops: Sequence[str]):
    self._stops = [s for s in stops if s]
    self._text = ""
    self._released = 0
    self.stopped = False

  def add(self, text: str) -> str:
    """The text that is now certain to come before any stop string."""
    if self.stopped:
      return ""
    start = max(0, self._released - max((len(s) for s in self._stops), default=0))
    self._text += text
    hits = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
    if hits:
      self.stopped = True
      end = min(hits)
    else:
      end = len(self._text) - _held_tail(self._text, self._stops)
    out = self._text[self._released : end]
    self._released = max(self._released, end)
    return out

  def flush(self) -> str:
    if self.stopped:
      return ""
    out = self._text[self._released :]
    self._released = len(self._text)
    return out


class ToolCallSplitter:
  """Splits a reply into content and tool calls as it streams.

  Args:
    tool_format: 'hermes', 'glm45' or 'json' (:data:`apollo.models.tool_calls.FORMATS`).
    opener: the text that opens a call ('<tool_call>'), or None when a call can only
      be recognised in the whole reply (then everything is held to the end).
    prefix: text the reply was forced to start with (part of a call's opening).
  """

  def __init__(self, tool_format: str, opener: str | None, prefix: str = ""):
    self._format = tool_format
    self._opener = opener
    self._content = ""  # Text before the first opening, not yet released.
    self._held: str | None = prefix or ("" if opener is None else None)  # From the opening on.
    self._calls = 0  # Calls released.
    self.calls: list[tool_calls.ToolCall] = []

  def add(self, text: str) -> tuple[str, list[tool_calls.ToolCall]]:
    """(content to release, calls completed by ``text``)."""
    if self._held is None:
      self._content += text
      at = self._content.find(self._opener)
      if at < 0:
        end = len(self._content) - _held_tail(self._content, [self._opener])
        out, self._content = self._content[:end], self._content[end:]
        return out, []
      out, self._held, self._content = self._content[:at], self._content[at:], ""
      return out, self._complete_calls()
    self._held += text
    return "", self._complete_calls()

  def _complete_calls(self) -> list[tool_calls.ToolCall]:
    if self._opener is None or "</tool_call>" not in self._held:
      return []
    closed = self._held[: self._held.rindex("</tool_call>") + len("</tool_call>")]
    calls = tool_calls.parse(closed, self._format).tool_calls
    new = calls[self._calls :]
    self._calls = len(calls)
    self.calls += new
    return new

  def flush(self) -> tuple[str, list[tool_calls.ToolCall]]:
    """(the rest of the content, the calls not yet released) at the end of the reply."""
    if self._held is None:
      out, self._content = self._content, ""
      return out, []
    parsed = tool_calls.parse(self._held, self._format)
    if not parsed.tool_calls:
      # No call after all: the held text is the reply's.
      out, self._held = self._held, ""
      return out, []
    new = parsed.tool_calls[self._calls :]
    self._calls = len(parsed.tool_calls)
    self.calls += new
    # Text between or after calls (hermes) is content; it comes after the calls here.
    return ("\n" + parsed.content if parsed.content and self.calls else parsed.content), new
