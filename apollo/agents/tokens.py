"""Token counting for context management.

The loop needs a token count for every context it sends (to decide when to
summarise) and for every response. Served models report exact counts in their
`usage` field and those are stored when present; otherwise a `TokenCounter` is
used. The default is a cheap heuristic (about four characters per token for
English text and JSON, plus a few tokens of chat-template overhead per message);
`tokenizer_counter` plugs in an exact Hugging Face `tokenizers` tokenizer file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tokenizers

TokenCounter = Callable[[str], int]

# Chat templates add role markers and separators around every message.
MESSAGE_OVERHEAD_TOKENS = 4


def approx_token_count(text: str) -> int:
  """About one token per four characters (never zero for non-empty text)."""
  return (len(text) + 3) // 4


def tokenizer_counter(tokenizer_json_path: str) -> TokenCounter:
  """Exact counts from a `tokenizer.json` (Hugging Face `tokenizers`)."""
  tokenizer = tokenizers.Tokenizer.from_file(tokenizer_json_path)
  return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def message_text(message: Mapping[str, Any]) -> str:
  """The text a message puts in front of the model: its content, then its native
  tool calls (name and arguments), which a template writes out as text too."""
  text = message.get("content") or ""
  for call in message.get("tool_calls") or ():
    function = call.get("function") or {}
    text += "\n" + json.dumps(
      {"name": function.get("name"), "arguments": function.get("arguments")}
    )
  return text


def count_message_tokens(
  messages: Sequence[Mapping[str, Any]], counter: TokenCounter = approx_token_count
) -> int:
  """Tokens of a chat context: content and tool calls plus per-message template overhead."""
  return sum(counter(message_text(m)) + MESSAGE_OVERHEAD_TOKENS for m in messages)
