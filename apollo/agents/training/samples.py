"""Training samples from masked trajectories: one sample type, its views, one file format.

Every stored action step holds the exact messages the model was sent and its
exact response (`storage.StepRecord`), and supervision gives every action a keep /
mask verdict (`apollo.agents.supervision.judging`). Apollo trains on the *masked
trajectory*: sub-optimal actions stay in the context but are not imitated (D. Fu
et al., "Interaction as Intelligence Part II: Asynchronous Human-Agent Rollout for
Long-Horizon Task Training", arXiv 2510.27630, 2025). `SampleBuilder` renders those
into `Sample`s (token ids, a loss mask, roles, segments) with the policy's own chat
template (`chat_template.ChatTemplate.render(..., tools=, trainable=)`: the
checkpoint's Jinja template, `chat_template.from_pretrained`, or ChatML for the toy
policies):

- `mode='per_step'`: one sample per kept action. Input: the messages of step t,
  then the stored response as the only target. A masked action gives no sample of
  its own but stays, untrained, in the context of every later step that saw it.
  `view` chooses what the policy is shown of the messages: the exact stored
  messages (default) or a compact view (`backends.compact_view.policy_view`).
- `mode='per_segment'`: one sample per segment of the episode, a maximal run of
  steps whose prompts extend one another (a context compression, stored as a
  `summary` step, starts a new segment). The sample is the segment's final
  conversation; every assistant turn of the segment's own steps is a target if
  kept, masked actions stay as context, and turns carried over from before the
  compression are context only (they were targets of the previous segment).
  Token for token this is the union of the per-step samples of the segment, in
  one sequence.

Both forms of a stored step are accepted: text mode (the call is JSON in the
response's text, the observation a user message) and native mode (the assistant
message carries OpenAI `tool_calls`, the observation comes back as a `tool`
message, and the tools went beside the messages: the episode's tools, stored with
its first step, are rendered as the template renders tools). A
step's assistant turn is its stored assistant message (`StepRecord.assistant_message`),
and the template renders it as the model writes it: `tool_calls` through a template
that renders them, or as text in the model's tool-call format otherwise (SmolLM2's
Hermes `<tool_call>` blocks; see `chat_template.adapt_messages`, which the OpenAI
server uses too, so training and serving see the same tokens).

Loss masks come from the chat template: only the content, the tool calls and the
end-of-turn token (e.g. `<|im_end|>`) of kept assistant turns are trained (the
end-of-turn token is a target: it teaches the model to stop after one tool call);
headers, the system prompt, observations, guidance and masked actions are not.

Which actions are targets (`verdicts`): 'judged', the stored verdicts (judge
labels, else the store's quality field, else the human's flag); 'parseable',
every action whose call parsed (no judging); 'all', every action.

Human messages (`human_messages`): 'keep' leaves the tagged
`<human_guidance>` user messages in the context (the model learns to follow
advice); 'remove' drops them (at test time no human speaks). The summaries'
one-line reflections on the advice are the agent's own text and stay in both
modes. Which is better is an experiment; `SampleStats` reports the tokens either
way.

Files: JSON lines (`write_jsonl` / `read_jsonl`, what the SFT trainer reads) or
ArrayRecord (`write_array_record` / `ArrayRecordSamples`, random access, one JSON
record per sample, usable as a grain data source with `decode_record`).

Baseline: `outcome_filter` keeps the sessions whose outcome was good enough, and
`build_outcome_baseline` trains every action of them (rejection sampling, no
judging).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module

from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib
from apollo.agents.supervision import judging
from apollo.agents.supervision import labels as labels_lib
from apollo.models import chat_template as chat_template_lib

MODES = ("per_step", "per_segment")
HUMAN_MESSAGE_MODES = ("keep", "remove")
VERDICT_SOURCES = ("judged", "parseable", "all")

Message = dict[str, Any]
View = Callable[[Sequence[Mapping[str, Any]]], list[Message]]


@dataclasses.dataclass
class Sample:
  """One training sample; all arrays have one entry per token.

  Attributes:
    input_ids: int32 token ids.
    loss_mask: bool; True on the targets (kept assistant turns' content, tool calls
      and end-of-turn token).
    roles: int8 role id per token (`chat_template.ROLE_IDS`; guidance is 2), or
      None where unknown (the trainer needs only ids and mask).
    segment_ids: int32 index of the message each token belongs to, or None.
    meta: session id, mode, the assistant turns' steps and verdicts, counts.
  """

  input_ids: np.ndarray
  loss_mask: np.ndarray
  roles: np.ndarray | None = None
  segment_ids: np.ndarray | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.input_ids)

  def to_json(self) -> dict[str, Any]:
    data: dict[str, Any] = {
      "input_ids": np.asarray(self.input_ids).tolist(),
      "loss_mask": np.asarray(self.loss_mask).astype(np.int8).tolist(),
    }
    if self.roles is not None:
      data["roles"] = np.asarray(self.roles).tolist()
    if self.segment_ids is not None:
      data["segment_ids"] = np.asarray(self.segment_ids).tolist()
    data["meta"] = self.meta
    return data

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> Sample:
    """A sample from `to_json`'s dict; only `input_ids` and `loss_mask` are required."""
    if "input_ids" not in data or "loss_mask" not in data:
      raise ValueError("a sample needs 'input_ids' and 'loss_mask'")
    optional = lambda key, dtype: (  # noqa: E731
      np.asarray(data[key], dtype) if data.get(key) is not None else None
    )
    return cls(
      input_ids=np.asarray(data["input_ids"], np.int32),
      loss_mask=np.asarray(data["loss_mask"], bool),
      roles=optional("roles", np.int8),
      segment_ids=optional("segment_ids", np.int32),
      meta=dict(data.get("meta") or {}),
    )


@dataclasses.dataclass
class SampleStats:
  """What a build produced (and what it left out)."""

  sessions: int = 0
  actions: int = 0  # action steps seen
  masked_actions: int = 0  # ... judged 'mask' (not trained)
  samples: int = 0
  tokens: int = 0
  target_tokens: int = 0
  guidance_tokens: int = 0  # tokens of human messages kept in the contexts
  guidance_messages_removed: int = 0
  dropped_too_long: int = 0  # samples over max_tokens
  masked_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def fraction_masked(self) -> float:
    return self.masked_actions / self.actions if self.actions else 0.0

  def to_json(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data["masked_by_reason"] = dict(self.masked_by_reason)
    data["fraction_masked"] = self.fraction_masked
    return data


@dataclasses.dataclass
class _Turn:
  """A message of a sample's conversation; `step` is set for assistant turns."""

  message: Message
  step: int | None = None


def _verdict_json(
  label: labels_lib.Label, all_labels: Sequence[labels_lib.Label]
) -> dict[str, Any]:
  return {
    "verdict": label.verdict,
    "reason": label.reason,
    "labels": [[l.judge, l.verdict, l.reason] for l in all_labels],
  }


def _native_tools(steps: Sequence[storage_lib.StepRecord]) -> dict[int, list[dict[str, Any]]]:
  """step -> the tools the model was given beside its messages, for native-mode steps.

  The episode's tools are stored with its first action step (`info['tools']`); a
  text-mode step listed them in its system prompt instead, and gets none.
  """
  actions = [s for s in steps if s.kind == "action"]
  tools = actions[0].info.get("tools") if actions else None
  if not tools:
    return {}
  return {s.step_index: tools for s in actions if (s.call or {}).get("mode") == "native"}


def _segments(steps: Sequence[storage_lib.StepRecord]) -> list[list[storage_lib.StepRecord]]:
  """Maximal runs of action steps whose prompts extend one another."""
  segments: list[list[storage_lib.StepRecord]] = []
  previous: storage_lib.StepRecord | None = None
  for step in steps:
    if step.kind != "action":
      previous = None  # a summary (compression) ends the segment
      continue
    extends = (
      previous is not None
      and len(step.messages) > len(previous.messages)
      and (
        step.messages[: len(previous.messages) + 1]
        == previous.messages + [previous.assistant_message]
      )
    )
    if extends:
      segments[-1].append(step)
    else:
      segments.append([step])
    previous = step
  return segments


def _conversation(steps: Sequence[storage_lib.StepRecord]) -> list[_Turn]:
  """The final conversation of a segment with each of its own responses tagged."""
  last = steps[-1]
  turns = [_Turn(dict(m)) for m in last.messages]
  turns.append(_Turn(dict(last.assistant_message)))
  for step in steps:
    # Step s's response sits right after its prompt (the prompts extend each other).
    position = len(step.messages)
    assert turns[position].message == step.assistant_message
    turns[position].step = step.step_index
  return turns


class SampleBuilder:
  """Renders stored sessions into `Sample`s.

  Args:
    store: the trajectory store.
    template: the policy's chat template.
    mode: 'per_step' or 'per_segment'.
    human_messages: 'keep' or 'remove' the tagged guidance messages.
    label_store: judge labels (`labels.LabelStore`); without one (or for steps it
      has no label for) the store's `quality` / human flag decides.
    verdicts: which actions are targets: 'judged' (the stored verdicts),
      'parseable' (every action whose call parsed) or 'all' (the outcome baseline).
    view: what the policy is shown of a step's messages (per-step mode), e.g.
      `functools.partial(compact_view.policy_view, history=2)`; None: the exact
      stored messages.
    max_tokens: drop samples longer than this (counted in the stats).
    authoritative: judges whose label decides alone (`judging.combine`).
  """

  def __init__(
    self,
    store: storage_lib.TrajectoryStore,
    template: chat_template_lib.ChatTemplate,
    *,
    mode: str = "per_step",
    human_messages: str = "keep",
    label_store: labels_lib.LabelStore | None = None,
    verdicts: str = "judged",
    view: View | None = None,
    max_tokens: int | None = None,
    authoritative: Sequence[str] = ("human",),
  ):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if human_messages not in HUMAN_MESSAGE_MODES:
      raise ValueError(
        f"human_messages must be one of {HUMAN_MESSAGE_MODES}, got {human_messages!r}"
      )
    if verdicts not in VERDICT_SOURCES:
      raise ValueError(f"verdicts must be one of {VERDICT_SOURCES}, got {verdicts!r}")
    if view is not None and mode != "per_step":
      raise ValueError("a view applies to per-step samples only")
    self.store = store
    self.template = template
    self.mode = mode
    self.human_messages = human_messages
    self.label_store = label_store
    self.verdict_source = verdicts
    self.view = view
    self.max_tokens = max_tokens
    self.authoritative = tuple(authoritative)
    self.stats = SampleStats()

  def verdicts(self, session_id: str) -> dict[int, tuple[labels_lib.Label, list[labels_lib.Label]]]:
    """step -> (verdict, all labels) as this builder applies them."""
    if self.verdict_source == "judged":
      return judging.stored_verdicts(self.store, session_id, self.label_store, self.authoritative)
    actions = [s for s in self.store.get_steps(session_id, full=False) if s.kind == "action"]
    if self.verdict_source == "all":
      keep = labels_lib.Label(labels_lib.KEEP, "outcome_filter", "outcome")
      return {s.step_index: (keep, []) for s in actions}
    return {
      s.step_index: (
        labels_lib.Label(labels_lib.MASK, "invalid_call", "parse", s.parse_error)
        if s.parse_error
        else labels_lib.Label(labels_lib.KEEP, "parseable", "parse"),
        [],
      )
      for s in actions
    }

  def session_samples(self, session_id: str) -> Iterator[Sample]:
    """The samples of one session, in step order."""
    session = self.store.get_session(session_id)
    if session is None:
      raise KeyError(f"unknown session {session_id!r}")
    verdicts = self.verdicts(session_id)
    steps = self.store.get_steps(session_id)
    tools = _native_tools(steps)
    self.stats.sessions += 1
    for index, (label, _) in verdicts.items():
      self.stats.actions += 1
      if label.masked:
        self.stats.masked_actions += 1
        self.stats.masked_by_reason.update(label.reason_codes)
    base = {
      "session_id": session_id,
      "env_name": session.env_name,
      "seed": session.seed,
      "score": (session.result or {}).get("score"),
      "mode": self.mode,
      "human_messages": self.human_messages,
    }
    if self.mode == "per_step":
      for step in steps:
        if step.kind != "action" or verdicts[step.step_index][0].masked:
          continue  # a masked action has no target of its own
        shown = self.view(step.messages) if self.view is not None else step.messages
        turns = [_Turn(dict(m)) for m in shown]
        turns.append(_Turn(dict(step.assistant_message), step.step_index))
        sample = self._render(turns, verdicts, base, {step.step_index}, tools.get(step.step_index))
        if sample is not None:
          sample.meta["step"] = step.step_index
          yield sample
    else:
      for segment in _segments(steps):
        own = {s.step_index for s in segment}
        sample = self._render(
          _conversation(segment), verdicts, base, own, tools.get(segment[-1].step_index)
        )
        if sample is not None:
          sample.meta["first_step"], sample.meta["last_step"] = min(own), max(own)
          yield sample

  def _render(
    self,
    turns: list[_Turn],
    verdicts: Mapping[int, tuple[labels_lib.Label, list]],
    base: Mapping[str, Any],
    only_steps: set[int],
    tools: list[dict[str, Any]] | None,
  ) -> Sample | None:
    if self.human_messages == "remove":
      kept = [t for t in turns if not guidance_lib.is_guidance_message(t.message)]
      self.stats.guidance_messages_removed += len(turns) - len(kept)
      turns = kept
    targets = [
      t.step is not None and t.step in only_steps and not verdicts[t.step][0].masked for t in turns
    ]
    if not any(targets):
      return None  # every action of the segment was masked
    rendered = self.template.render([t.message for t in turns], tools=tools, trainable=targets)
    if self.max_tokens is not None and len(rendered) > self.max_tokens:
      self.stats.dropped_too_long += 1
      return None
    steps = [t.step for t in turns if t.step is not None]
    meta = dict(base)
    meta.update(
      steps=steps,
      trainable_steps=[t.step for t, x in zip(turns, targets) if x],
      masked_steps=[s for s in steps if verdicts[s][0].masked],
      verdicts={str(s): _verdict_json(*verdicts[s]) for s in steps if s in only_steps},
      num_tokens=len(rendered),
      num_target_tokens=int(rendered.loss_mask.sum()),
    )
    self.stats.samples += 1
    self.stats.tokens += len(rendered)
    self.stats.target_tokens += meta["num_target_tokens"]
    self.stats.guidance_tokens += int((rendered.roles == chat_template_lib.ROLE_GUIDANCE).sum())
    return Sample(
      input_ids=rendered.ids,
      loss_mask=rendered.loss_mask,
      roles=rendered.roles,
      segment_ids=rendered.segments,
      meta=meta,
    )

  def build(self, session_ids: Iterable[str] | None = None) -> Iterator[Sample]:
    """Samples of `session_ids` (default: every session in the store)."""
    ids = (
      list(session_ids)
      if session_ids is not None
      else [s.session_id for s in self.store.list_sessions()]
    )
    for session_id in ids:
      yield from self.session_samples(session_id)


def build_samples(
  store: storage_lib.TrajectoryStore,
  template: chat_template_lib.ChatTemplate,
  session_ids: Iterable[str] | None = None,
  **options: Any,
) -> tuple[list[Sample], SampleStats]:
  """All samples of `session_ids` at once, with their stats (see `SampleBuilder`)."""
  builder = SampleBuilder(store, template, **options)
  samples = list(builder.build(session_ids))
  return samples, builder.stats


def outcome_filter(
  store: storage_lib.TrajectoryStore,
  threshold: float | None = None,
  session_ids: Iterable[str] | None = None,
  score_key: str = "score",
  best_fraction: float | None = None,
) -> list[str]:
  """Sessions whose outcome was good enough: rejection sampling's data.

  Good enough: a result `score_key` >= `threshold`; with `threshold` None, the
  environment's own verdict (`result['success']`). When no session is and
  `best_fraction` is set, the best `best_fraction` of the sessions (at least one)
  among those with a positive score, best first. Sessions without a result
  (still running, failed) are left out.
  """
  sessions = (
    store.list_sessions()
    if session_ids is None
    else [s for s in map(store.get_session, session_ids) if s is not None]
  )

  def score(session: storage_lib.SessionRecord) -> float | None:
    value = (session.result or {}).get(score_key)
    return value if isinstance(value, (int, float)) else None

  if threshold is None:
    kept = [s.session_id for s in sessions if s.result is not None and s.result.get("success")]
  else:
    kept = [s.session_id for s in sessions if (score(s) is not None and score(s) >= threshold)]
  if kept or best_fraction is None:
    return kept
  scored = sorted((s for s in sessions if (score(s) or 0) > 0), key=lambda s: -score(s))
  return [s.session_id for s in scored[: max(1, int(best_fraction * len(sessions)))]]


def build_outcome_baseline(
  store: storage_lib.TrajectoryStore,
  template: chat_template_lib.ChatTemplate,
  threshold: float,
  session_ids: Iterable[str] | None = None,
  **options: Any,
) -> tuple[list[Sample], SampleStats]:
  """Rejection-sampling baseline: every action of the sessions that reached `threshold`."""
  kept = outcome_filter(store, threshold, session_ids)
  return build_samples(store, template, kept, verdicts="all", **options)


# --------------------------------------------------------------------------- export


def encode_record(sample: Sample) -> bytes:
  return json.dumps(sample.to_json(), separators=(",", ":")).encode()


def decode_record(record: bytes) -> Sample:
  return Sample.from_json(json.loads(record))


def write_jsonl(samples: Iterable[Sample], path: str) -> int:
  """One JSON object per line; written under a temporary name, then renamed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  count = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for sample in samples:
      f.write(encode_record(sample).decode() + "\n")
      count += 1
  os.replace(tmp, path)
  return count


def read_jsonl(path: str) -> Iterator[Sample]:
  """The samples of a `write_jsonl` file (a line needs only input_ids and loss_mask)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No sample file at {path}.")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          yield decode_record(line.encode())
        except ValueError as e:
          raise ValueError(f"{path}:{n}: {e}") from None


def write_array_record(samples: Iterable[Sample], path: str) -> int:
  """One JSON record per sample (group_size:1: cheapest random access)."""
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  try:
    for sample in samples:
      writer.write(encode_record(sample))
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return count


class ArrayRecordSamples:
  """Random-access reader of a file written by `write_array_record`."""

  def __init__(self, path: str):
    self._reader = array_record_module.ArrayRecordReader(path)

  def __len__(self) -> int:
    return self._reader.num_records()

  def __getitem__(self, index: int) -> Sample:
    if not 0 <= index < len(self):
      raise IndexError(index)
    return decode_record(self._reader.read([index])[0])

  def __iter__(self) -> Iterator[Sample]:
    for i in range(len(self)):
      yield self[i]

  def close(self) -> None:
    self._reader.close()

  def __enter__(self) -> ArrayRecordSamples:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def read_array_record(path: str) -> list[Sample]:
  with ArrayRecordSamples(path) as reader:
    return list(reader)
