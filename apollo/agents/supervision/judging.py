"""Supervision control: judging every action of a stored trajectory keep / mask.

Apollo (D. Fu et al., "Interaction as Intelligence Part II: Asynchronous
Human-Agent Rollout for Long-Horizon Task Training", arXiv 2510.27630, 2025) turns
a raw trajectory into a *masked trajectory*: sub-optimal actions stay in the
context (later steps saw them) but are not imitated. This module decides
which actions those are. A judge looks at one action step of a stored session,
with everything around it, and returns a `labels.Label` (verdict 'keep' or
'mask', a short reason code, its own name, free-text evidence) or None when it
has no opinion. Three judges:

- `RuleJudge`: deterministic rules, each a small function below with its
  criterion in the docstring: `invalid_call`, `repeated_noop`,
  `destroys_progress`, `ignores_advice`.
- `HumanFlagJudge`: the human's per-step flags from the console (`bad` -> mask
  with the human's reason, `good` -> keep, no flag -> no opinion).
- `llm_judge.LLMJudge`: an LLM behind any OpenAI-compatible server.

`combine` merges the labels of one step: a label of an authoritative judge (the
human, by default) decides; otherwise any mask wins. `judge_session` runs the
judges over a session, stores every judge's label in the sidecar table
(`labels.LabelStore`) and the combined verdict in the store's per-step
`quality` field ('good' = keep, 'bad' = mask), and `masking_stats` reports the
fraction of actions masked, per judge and per reason.

    store = storage.SQLiteStore(path)
    judges = [RuleJudge(), HumanFlagJudge(), llm_judge.LLMJudge.from_openai(url, 'judge-model')]
    result = judge_session(store, 'sess-1', judges, labels.LabelStore(path))
    print(masking_stats([result]))
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from apollo.agents import env as env_lib
from apollo.agents import envs
from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib
from apollo.agents.supervision import labels as labels_lib

# --------------------------------------------------------------------------- view


@dataclasses.dataclass
class TrajectoryView:
  """One stored session as the judges see it.

  Attributes:
    session: the session record (env name, seed, result).
    steps: every stored step in order (actions and summaries), with messages,
      `info` and environment snapshots.
    guidance: every guidance message of the session (delivered or not).
    facts: what the session's environment can tell about the episode
      (`env.EpisodeFacts`), with the task's hidden facts when privileged.
  """

  session: storage_lib.SessionRecord
  steps: list[storage_lib.StepRecord]
  guidance: list[guidance_lib.Guidance]
  facts: env_lib.EpisodeFacts = dataclasses.field(default_factory=env_lib.EpisodeFacts)

  def __post_init__(self):
    self._position = {s.step_index: i for i, s in enumerate(self.steps)}

  @classmethod
  def load(
    cls, store: storage_lib.TrajectoryStore, session_id: str, privileged: bool = True
  ) -> TrajectoryView:
    session = store.get_session(session_id)
    if session is None:
      raise KeyError(f"unknown session {session_id!r}")
    return cls(
      session=session,
      steps=store.get_steps(session_id),
      guidance=store.list_guidance(session_id),
      facts=envs.episode_facts(session.env_name, session.seed, privileged),
    )

  @property
  def session_id(self) -> str:
    return self.session.session_id

  @property
  def task(self) -> Any:
    """The task with its hidden facts (privileged views of known environments)."""
    return self.facts.task

  def step(self, step_index: int) -> storage_lib.StepRecord:
    return self.steps[self._position[step_index]]

  def earlier(self, step_index: int) -> list[storage_lib.StepRecord]:
    """Steps stored before `step_index`, oldest first."""
    return self.steps[: self._position[step_index]]

  def previous(self, step_index: int) -> storage_lib.StepRecord | None:
    position = self._position[step_index]
    return self.steps[position - 1] if position else None

  def action_steps(self) -> list[storage_lib.StepRecord]:
    return [s for s in self.steps if s.kind == "action"]

  def task_text(self) -> str:
    """The task statement (the first user message of the episode)."""
    for step in self.steps:
      for message in step.messages[:3]:
        if message["role"] == "user":
          return message["content"]
    return ""

  def delivered_guidance(self, step_index: int) -> list[guidance_lib.Guidance]:
    """Guidance shown to the agent at or before `step_index`, in delivery order."""
    shown = [
      g for g in self.guidance if g.delivered_step is not None and g.delivered_step <= step_index
    ]
    return sorted(shown, key=lambda g: (g.delivered_step, g.guidance_id))


class Judge(Protocol):
  """Labels one action step; None means no opinion."""

  name: str

  def judge(self, view: TrajectoryView, step_index: int) -> labels_lib.Label | None: ...


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class RuleConfig:
  """Tool knowledge the rules use (defaults: research + workspace envs)."""

  # Tools that only read state: repeating one with nothing executed in between is a no-op.
  read_only_tools: frozenset[str] = frozenset(
    {
      "list_files",
      "read_file",
      "inspect_data",
      "gpu_status",
      "list_jobs",
      "check_run",
      "evaluate",
      "view_file",
      "is_idle",
    }
  )
  # Tools whose repetition is how time passes (never a no-op by themselves).
  wait_tools: frozenset[str] = frozenset({"sleep"})
  # Let the environment use the task's hidden facts (privileged) to judge a job's health.
  use_hidden_facts: bool = True


Rule = Callable[[TrajectoryView, storage_lib.StepRecord, RuleConfig], "str | None"]


def _first_line(text: str, limit: int = 160) -> str:
  line = text.strip().splitlines()[0] if text.strip() else ""
  return line[:limit]


def _executed(step: storage_lib.StepRecord) -> bool:
  return step.kind == "action" and step.action is not None and not step.parse_error


def rule_invalid_call(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires when the call did not do what a call is for.

  Criterion: the response had no single parseable tool call (`parse_error`), the
  call failed schema validation (`info.invalid_action`: unknown tool, bad
  arguments), the tool raised (`info.tool_exception`), or the environment
  rejected it (the observation starts with 'ERROR', e.g. an unknown run id or
  data=filtered before filtering finished).
  """
  del view, config
  if step.parse_error:
    return f"unparseable tool call: {step.parse_error}"
  if step.info.get("invalid_action"):
    return f"invalid call: {_first_line(step.observation)}"
  if step.info.get("tool_exception"):
    return f"the tool failed: {_first_line(step.observation)}"
  if step.observation.lstrip().startswith("ERROR"):
    return f"the environment rejected the call: {_first_line(step.observation)}"
  return None


def rule_repeated_noop(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires on an action that repeats the previous one and learns nothing new.

  Criterion: the previous *executed* action (invalid calls and summaries in
  between are skipped: they change nothing) had the same tool and arguments, no
  new human guidance arrived with this step, the tool is not a wait tool
  (`sleep`), and either the observation is the same apart from what the
  environment appends to every observation (`EpisodeFacts.observation_content`:
  the research task's clock line), or the tool is read-only (`check_run`,
  `read_file`, ...) so nothing can have changed.
  """
  if not _executed(step) or step.guidance_ids:
    return None
  tool = step.action["tool"]
  if tool in config.wait_tools:
    return None
  previous = next((s for s in reversed(view.earlier(step.step_index)) if _executed(s)), None)
  if previous is None or previous.action != step.action:
    return None
  if view.facts.observation_content(step) == view.facts.observation_content(previous):
    return f"repeats step {previous.step_index} ({tool}) and got the same observation"
  if tool in config.read_only_tools:
    return (
      f"repeats the read-only call of step {previous.step_index} ({tool}) with "
      "nothing executed in between"
    )
  return None


def rule_destroys_progress(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires when the agent stopped a job that was healthy.

  Criterion: the step stopped a running job (`EpisodeFacts.stopped_job`: the
  research task's successful `kill_run`), and the environment finds the job was
  healthy (`EpisodeFacts.healthy_job`): for the research task, by the hidden
  facts when `use_hidden_facts` and the view is privileged (the run's setup had
  none of the task's problems, it only needed time), otherwise by what the agent
  itself was shown (running, a finite loss, not rising). A job the environment
  cannot judge is not judged.
  """
  if not _executed(step):
    return None
  job_id = view.facts.stopped_job(step)
  if job_id is None:
    return None
  return view.facts.healthy_job(view.earlier(step.step_index), job_id, config.use_hidden_facts)


def rule_ignores_advice(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires on an action that contradicts human guidance already shown to the agent.

  Criterion: the environment finds that the action goes against the guidance
  delivered at or before this step (`EpisodeFacts.contradicted_advice`; for the
  research task: raw data after "filter the labels", a learning rate above the
  advised one, another GPU than advised, killing a sound run after "don't kill").
  """
  del config
  if not _executed(step):
    return None
  return view.facts.contradicted_advice(
    step, view.earlier(step.step_index), view.delivered_guidance(step.step_index)
  )


RULES: dict[str, Rule] = {
  "invalid_call": rule_invalid_call,
  "repeated_noop": rule_repeated_noop,
  "destroys_progress": rule_destroys_progress,
  "ignores_advice": rule_ignores_advice,
}


class RuleJudge:
  """Masks an action when any of its rules fires (all fired rules are recorded).

  Args:
    rules: names from `RULES` to apply, in order.
    config: environment knowledge (`RuleConfig`).
    name: the judge's name in labels.
  """

  def __init__(
    self, rules: Sequence[str] = tuple(RULES), config: RuleConfig | None = None, name: str = "rules"
  ):
    unknown = [r for r in rules if r not in RULES]
    if unknown:
      raise ValueError(f"unknown rules {unknown}; known: {sorted(RULES)}")
    self.rules = tuple(rules)
    self.config = config or RuleConfig()
    self.name = name

  def judge(self, view: TrajectoryView, step_index: int) -> labels_lib.Label | None:
    step = view.step(step_index)
    if step.kind != "action":
      return None
    fired = [
      (r, detail) for r in self.rules if (detail := RULES[r](view, step, self.config)) is not None
    ]
    if not fired:
      return labels_lib.Label(labels_lib.KEEP, "ok", self.name)
    return labels_lib.Label(
      labels_lib.MASK,
      "+".join(r for r, _ in fired),
      self.name,
      "; ".join(f"{r}: {d}" for r, d in fired),
    )


# --------------------------------------------------------------------------- human


class HumanFlagJudge:
  """The human's flags from the console: bad -> mask (their reason), good -> keep."""

  def __init__(self, name: str = "human"):
    self.name = name

  def judge(self, view: TrajectoryView, step_index: int) -> labels_lib.Label | None:
    step = view.step(step_index)
    if step.kind != "action" or step.human_flag is None:
      return None
    if step.human_flag == "bad":
      return labels_lib.Label(
        labels_lib.MASK, "human_flag", self.name, step.human_flag_reason or ""
      )
    return labels_lib.Label(labels_lib.KEEP, "human_flag", self.name, step.human_flag_reason or "")


# --------------------------------------------------------------------------- combine


def combine(
  labels: Iterable[labels_lib.Label | None],
  authoritative: Sequence[str] = ("human",),
  name: str = "combined",
) -> labels_lib.Label:
  """One verdict from the labels of one step.

  Policy: if a judge named in `authoritative` (the human) labelled the step, its
  verdict decides (a human 'good' overrides a rule's mask, a human 'bad' masks);
  otherwise any mask wins. No label at all means keep. The reasons of every
  deciding mask are recorded ('+'-joined codes, judge-prefixed evidence).
  """
  present = [l for l in labels if l is not None]
  decisive = [l for l in present if l.judge in authoritative]
  masks = [l for l in (decisive or present) if l.masked]
  if masks:
    codes = list(dict.fromkeys(c for l in masks for c in l.reason_codes))
    detail = "; ".join(f"{l.judge}: {l.detail or l.reason}" for l in masks)
    return labels_lib.Label(labels_lib.MASK, "+".join(codes), name, detail)
  if decisive:  # the human kept it, perhaps against another judge
    overridden = any(l.masked for l in present)
    return labels_lib.Label(
      labels_lib.KEEP,
      "human_override" if overridden else "human_flag",
      name,
      "; ".join(f"{l.judge}: {l.detail or l.reason}" for l in decisive),
    )
  return labels_lib.Label(labels_lib.KEEP, "ok", name)


@dataclasses.dataclass
class SessionJudgement:
  """Every judge's labels and the combined verdict of each action step."""

  session_id: str
  labels: dict[int, list[labels_lib.Label]]
  combined: dict[int, labels_lib.Label]

  def masked_steps(self) -> list[int]:
    return sorted(i for i, l in self.combined.items() if l.masked)


def judge_session(
  store: storage_lib.TrajectoryStore,
  session_id: str,
  judges: Sequence[Judge],
  label_store: labels_lib.LabelStore | None = None,
  *,
  write_quality: bool = True,
  authoritative: Sequence[str] = ("human",),
  privileged: bool = True,
) -> SessionJudgement:
  """Runs `judges` over every action step of a session and stores the labels.

  Args:
    store: the trajectory store.
    session_id: the session.
    judges: judges to run; each step gets at most one label per judge.
    label_store: where every judge's label goes (replacing earlier labels of the
      same judges); None to keep them only in the returned value.
    write_quality: write the combined verdict to the store's `quality` field
      ('good' = keep, 'bad' = mask) with the reason codes and evidence.
    authoritative: judges whose label decides alone (see `combine`).
    privileged: let rule judges use the research task's hidden facts.
  """
  view = TrajectoryView.load(store, session_id, privileged=privileged)
  by_step: dict[int, list[labels_lib.Label]] = {}
  combined: dict[int, labels_lib.Label] = {}
  for step in view.action_steps():
    step_labels = [l for j in judges if (l := j.judge(view, step.step_index)) is not None]
    by_step[step.step_index] = step_labels
    combined[step.step_index] = combine(step_labels, authoritative)
  if label_store is not None:
    label_store.replace_session_labels(session_id, [j.name for j in judges], by_step)
  if write_quality:
    for index, label in combined.items():
      reason = label.reason + (f": {label.detail}" if label.detail else "")
      store.set_quality(session_id, index, "bad" if label.masked else "good", reason[:1000])
  return SessionJudgement(session_id, by_step, combined)


def judge_sessions(
  store: storage_lib.TrajectoryStore,
  session_ids: Sequence[str],
  judges: Sequence[Judge] | None = None,
  **options: Any,
) -> list[SessionJudgement]:
  """`judge_session` over several sessions; the default judges are the rules and
  the human's flags (`RuleJudge()`, `HumanFlagJudge()`)."""
  judges = list(judges) if judges is not None else [RuleJudge(), HumanFlagJudge()]
  return [judge_session(store, sid, judges, **options) for sid in session_ids]


def stored_verdicts(
  store: storage_lib.TrajectoryStore,
  session_id: str,
  label_store: labels_lib.LabelStore | None = None,
  authoritative: Sequence[str] = ("human",),
) -> dict[int, tuple[labels_lib.Label, list[labels_lib.Label]]]:
  """step_index -> (combined verdict, all labels) of every action step, from storage.

  Labels in `label_store` are combined with `combine`; a step without any is
  read from the store: `quality` 'bad' -> mask, else the human's flag, else keep
  ('unjudged').
  """
  stored = label_store.get(session_id) if label_store is not None else {}
  out: dict[int, tuple[labels_lib.Label, list[labels_lib.Label]]] = {}
  for step in store.get_steps(session_id, full=False):
    if step.kind != "action":
      continue
    step_labels = stored.get(step.step_index, [])
    if step_labels:
      out[step.step_index] = (combine(step_labels, authoritative), step_labels)
    elif step.quality == "bad":
      reason, _, detail = (step.quality_reason or "quality").partition(": ")
      out[step.step_index] = (labels_lib.Label(labels_lib.MASK, reason, "quality", detail), [])
    elif step.human_flag in ("good", "bad"):
      label = labels_lib.Label(
        labels_lib.MASK if step.human_flag == "bad" else labels_lib.KEEP,
        "human_flag",
        "human",
        step.human_flag_reason or "",
      )
      out[step.step_index] = (combine([label], authoritative), [label])
    else:
      out[step.step_index] = (labels_lib.Label(labels_lib.KEEP, "unjudged", "quality"), [])
  return out


def masking_stats(judgements: Iterable[SessionJudgement]) -> dict[str, Any]:
  """Fraction of actions masked, overall, per judge and per reason code.

  Returns:
    {'actions', 'masked', 'fraction_masked', 'by_reason': {code: count of masked
    actions}, 'judges': {judge: {'labelled', 'masked', 'fraction_masked',
    'reasons': {code: count}}}}. A step masked for two reasons counts under both.
  """
  actions = masked = 0
  by_reason: collections.Counter[str] = collections.Counter()
  judges: dict[str, dict[str, Any]] = {}
  for j in judgements:
    for index, label in j.combined.items():
      actions += 1
      if label.masked:
        masked += 1
        by_reason.update(label.reason_codes)
      for l in j.labels.get(index, []):
        entry = judges.setdefault(
          l.judge, {"labelled": 0, "masked": 0, "reasons": collections.Counter()}
        )
        entry["labelled"] += 1
        entry["masked"] += int(l.masked)
        entry["reasons"].update(l.reason_codes)
  for entry in judges.values():
    entry["fraction_masked"] = entry["masked"] / entry["labelled"] if entry["labelled"] else 0.0
    entry["reasons"] = dict(entry["reasons"])
  return {
    "actions": actions,
    "masked": masked,
    "fraction_masked": masked / actions if actions else 0.0,
    "by_reason": dict(by_reason),
    "judges": judges,
  }
