"""The policy's chat template (ChatML, as Qwen2) with per-token roles and loss masks.

A conversation is rendered as::

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    ...
    <|im_start|>assistant\\n          (the generation prompt, when asked for)

which is Qwen2's template (without its default system prompt), so a Qwen2
checkpoint sees the format it was tuned on. Human guidance (Fu et al., 2025) is an
ordinary user-role message whose content opens a tag the caller names (the agents
pass ``guidance_tag='human_guidance'``); it gets its own role id so a trainer can
keep, drop or mask it.

Besides the token ids, :meth:`ChatTemplate.render` returns for every token the
role of its message, the message index (segment) and a loss mask. The loss mask
is True exactly on the *targets* of trainable assistant turns: the content tokens
**and the turn's closing ``<|im_end|>``**. The end-of-turn token is a target on
purpose: it is how the model learns to stop after one action. Masking it out
(training only on the content) taught one model to run on after its tool call and
emit further calls in the same turn. The ``<|im_start|>assistant\\n`` header is
not a target (it is the prompt at inference), nor is the ``\\n`` after
``<|im_end|>`` (generation stops at ``<|im_end|>``).

Message content is tokenized literally: a ``<|im_end|>`` typed into a message (or
printed by a program into an observation) is encoded as plain text, never as the
special token, so no message can end its turn early or open a new one. Content is
tokenized together with its role header (``"assistant\\n" + content``, split at
special tokens exactly as a whole-string encoding would), and tokens are assigned
to header or content by their character offsets.

Tokenizers: :func:`load_chat_tokenizer` reads a local ``tokenizer.json`` (a
Qwen2 checkpoint's works as is); :func:`train_chat_tokenizer` trains a tiny
byte-level BPE with the ChatML special tokens for tests and demos.

A checkpoint's own Jinja template (``tokenizer_config.json``'s ``chat_template``,
or the GGUF metadata) renders with :func:`render_jinja`, in the sandboxed jinja2
environment transformers uses (``apply_chat_template`` in
``transformers/utils/chat_template_utils.py``), with the same variables.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from apollo.models import tokenizer as tokenizer_lib

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2's order (ids 151643-151645 there; 0-2 in a tokenizer trained here).
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Per-token role ids.
ROLE_SYSTEM = 0
ROLE_USER = 1
ROLE_GUIDANCE = 2  # A user-role message carrying the human's <human_guidance> tag.
ROLE_ASSISTANT = 3
ROLE_IDS = {
  "system": ROLE_SYSTEM,
  "user": ROLE_USER,
  "guidance": ROLE_GUIDANCE,
  "assistant": ROLE_ASSISTANT,
}
_CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class RenderedChat:
  """A tokenized conversation; all arrays have one entry per token.

  Attributes:
    ids: int32 token ids.
    roles: int8 role id (:data:`ROLE_IDS`) of the message each token belongs to
      (the generation prompt counts as assistant).
    segments: int32 index of that message in the input list (the generation
      prompt gets ``len(messages)``).
    loss_mask: bool; True on the content and closing ``<|im_end|>`` of trainable
      assistant turns, False everywhere else.
  """

  ids: np.ndarray
  roles: np.ndarray
  segments: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


def _literal_copy(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """A copy of ``tokenizer`` that encodes special-token strings as plain text."""
  literal = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  literal.encode_special_tokens = True
  return literal


class ChatTemplate:
  """Renders chat messages to token ids (ChatML) and decodes model output.

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` holding ``<|im_start|>`` and
      ``<|im_end|>`` as special tokens.
    guidance_tag: a user message whose content starts with ``<{guidance_tag} `` is
      guidance (role id :data:`ROLE_GUIDANCE`); None: no message is.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, guidance_tag: str | None = None):
    self.tokenizer = tokenizer
    self.guidance_tag = guidance_tag
    ids = {t: tokenizer.token_to_id(t) for t in (IM_START, IM_END)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(
        f"The tokenizer has no {missing} token(s); the ChatML template "
        f"needs {IM_START} and {IM_END}."
      )
    self.im_start_id = ids[IM_START]
    self.im_end_id = ids[IM_END]
    endoftext = tokenizer.token_to_id(ENDOFTEXT)
    # Generation stops at the end of the assistant turn (or of the document).
    self.stop_ids: tuple[int, ...] = (self.im_end_id,) + (() if endoftext is None else (endoftext,))
    self.pad_id: int = self.im_end_id if endoftext is None else endoftext
    self._literal = _literal_copy(tokenizer)
    self._newline = self._encode_plain("\n")

  def _encode_plain(self, text: str) -> list[int]:
    return self._literal.encode(text, add_special_tokens=False).ids

  def role_of(self, message: Mapping[str, str]) -> int:
    """The role id of ``message`` (guidance-tagged user messages are separate)."""
    role = message["role"]
    if role not in _CHAT_ROLES:
      raise ValueError(f"Unknown message role {role!r}; expected one of {_CHAT_ROLES}.")
    if (
      self.guidance_tag is not None
      and role == "user"
      and message["content"].startswith(f"<{self.guidance_tag} ")
    ):
      return ROLE_GUIDANCE
    return ROLE_IDS[role]

  def render_text(
    self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
  ) -> str:
    """The template as a string (for reading; :meth:`render` is what the model sees)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

  def render(
    self,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    trainable: Sequence[bool] | None = None,
  ) -> RenderedChat:
    """Tokenizes ``messages`` with roles, segments and the loss mask.

    Args:
      messages: dicts with 'role' ('system', 'user', 'assistant') and 'content'.
      add_generation_prompt: append ``<|im_start|>assistant\\n`` (for sampling).
      trainable: one flag per message; an assistant message is a training target
        only if its flag is True (e.g. False for actions the judge filtered out:
        they stay in the context but are not imitated). Default: every assistant
        message is trainable. Flags of other roles are ignored.

    Returns:
      A :class:`RenderedChat`.
    """
    if trainable is not None and len(trainable) != len(messages):
      raise ValueError(f"{len(trainable)} trainable flags for {len(messages)} messages.")
    ids: list[int] = []
    roles: list[int] = []
    segments: list[int] = []
    mask: list[bool] = []

    def add(token_ids, role, segment, target):
      ids.extend(token_ids)
      roles.extend([role] * len(token_ids))
      segments.extend([segment] * len(token_ids))
      mask.extend([target] * len(token_ids) if isinstance(target, bool) else target)

    for index, message in enumerate(messages):
      role = self.role_of(message)
      is_target = role == ROLE_ASSISTANT and (trainable is None or bool(trainable[index]))
      header = f"{message['role']}\n"
      encoding = self._literal.encode(header + message["content"], add_special_tokens=False)
      # A token belongs to the content if it ends inside it.
      in_content = [end > len(header) for _, end in encoding.offsets]
      add([self.im_start_id], role, index, False)
      add(encoding.ids, role, index, [is_target and c for c in in_content])
      add([self.im_end_id], role, index, is_target)
      add(self._newline, role, index, False)
    if add_generation_prompt:
      add(
        [self.im_start_id] + self._encode_plain("assistant\n"), ROLE_ASSISTANT, len(messages), False
      )
    return RenderedChat(
      ids=np.asarray(ids, np.int32),
      roles=np.asarray(roles, np.int8),
      segments=np.asarray(segments, np.int32),
      loss_mask=np.asarray(mask, bool),
    )

  def decode_response(self, ids: Sequence[int]) -> str:
    """The text of generated ids, cut at the first stop token."""
    ids = [int(i) for i in ids]
    for i, token in enumerate(ids):
      if token in self.stop_ids:
        ids = ids[:i]
        break
    return self.tokenizer.decode(ids, skip_special_tokens=False)


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


# -----------------------------------------------------------------------------
# A checkpoint's own Jinja template
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
