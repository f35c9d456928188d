"""Supervision control: judging every action of a stored trajectory keep / mask.

Apollo turns a raw trajectory into a *masked trajectory*: sub-optimal actions stay
in the context (later steps saw them) but are not imitated. This module decides
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
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib
from apollo.agents.envs import research as research_env
from apollo.agents.supervision import labels as labels_lib

Label = labels_lib.Label
KEEP = labels_lib.KEEP
MASK = labels_lib.MASK


# --------------------------------------------------------------------------- view


@dataclasses.dataclass
class TrajectoryView:
  """One stored session as the judges see it.

  Attributes:
    session: the session record (env name, seed, result).
    steps: every stored step in order (actions and summaries), with messages and
      environment snapshots.
    guidance: every guidance message of the session (delivered or not).
    task: the research task (with its hidden facts) when the session ran the
      built-in research environment and privileged signals are allowed, else None.
  """

  session: storage_lib.SessionRecord
  steps: list[storage_lib.StepRecord]
  guidance: list[guidance_lib.Guidance]
  task: research_env.ResearchTask | None = None

  def __post_init__(self):
    self._position = {s.step_index: i for i, s in enumerate(self.steps)}

  @classmethod
  def load(
    cls, store: storage_lib.TrajectoryStore, session_id: str, privileged: bool = True
  ) -> TrajectoryView:
    session = store.get_session(session_id)
    if session is None:
      raise KeyError(f"unknown session {session_id!r}")
    task = (
      research_env.generate_task(session.seed)
      if privileged and session.env_name == research_env.ResearchEnv.name
      else None
    )
    return cls(
      session=session,
      steps=store.get_steps(session_id),
      guidance=store.list_guidance(session_id),
      task=task,
    )

  @property
  def session_id(self) -> str:
    return self.session.session_id

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

  def judge(self, view: TrajectoryView, step_index: int) -> Label | None: ...


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class RuleConfig:
  """Environment knowledge the rules use (defaults: research + workspace envs)."""

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
  # Tools that kill a job -> the argument naming the job.
  kill_tools: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"kill_run": "run_id"})
  # Use the research task's hidden facts (privileged) to judge a run's health.
  use_hidden_facts: bool = True


Rule = Callable[[TrajectoryView, storage_lib.StepRecord, RuleConfig], "str | None"]

_STATUS_LINE_RE = re.compile(r"^\[clock [^\]]*\]$", re.MULTILINE)
_LAUNCH_RE = re.compile(r"launched (r\d+) on gpu(\d+) with data=(\w+) config=(\{.*?\})")
_RUN_LINE_RE = re.compile(
  r"run (r\d+): status=(\w+) .*?train_loss=(\S+)"
  r"(?: recent_losses=\[([^\]]*)\])?"
)
_LR_RE = re.compile(r"\d*\.\d+(?:e-?\d+)?|\d+e-?\d+")
_NO_KILL_RE = re.compile(r"\b(?:don't|don’t|do not|never)\s+kill\b|\bbe patient\b")


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


def _strip_status(observation: str) -> str:
  return _STATUS_LINE_RE.sub("", observation).strip()


def rule_repeated_noop(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires on an action that repeats the previous one and learns nothing new.

  Criterion: the previous *executed* action (invalid calls and summaries in
  between are skipped: they change nothing) had the same tool and arguments, no
  new human guidance arrived with this step, the tool is not a wait tool
  (`sleep`), and either the observation is identical apart from the clock status
  line, or the tool is read-only (`check_run`, `read_file`, ...) so nothing
  can have changed.
  """
  if not _executed(step) or step.guidance_ids:
    return None
  tool = step.action["tool"]
  if tool in config.wait_tools:
    return None
  previous = next((s for s in reversed(view.earlier(step.step_index)) if _executed(s)), None)
  if previous is None or previous.action != step.action:
    return None
  if _strip_status(step.observation) == _strip_status(previous.observation):
    return f"repeats step {previous.step_index} ({tool}) and got the same observation"
  if tool in config.read_only_tools:
    return (
      f"repeats the read-only call of step {previous.step_index} ({tool}) with "
      "nothing executed in between"
    )
  return None


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """How a training run was launched (from the env snapshot or the launch log)."""

  run_id: str
  gpu: int | None
  data: str | None
  learning_rate: float | None
  status: str | None = None
  trained_h: float | None = None


def run_setup(view: TrajectoryView, step_index: int, run_id: str) -> RunSetup | None:
  """The run as it was right before `step_index`.

  Signals, in order: the environment snapshot stored with the previous step
  (`env_state['runs']`, research env), else the launch observation
  ('launched r3 on gpu1 with data=filtered config={...}').
  """
  previous = view.previous(step_index)
  state = previous.env_state if previous is not None else None
  for run in (state or {}).get("runs", ()):
    if run.get("run_id") == run_id:
      return RunSetup(
        run_id,
        run.get("gpu"),
        run.get("data"),
        (run.get("config") or {}).get("learning_rate"),
        run.get("status"),
        run.get("trained_h"),
      )
  for earlier in reversed(view.earlier(step_index)):
    match = _LAUNCH_RE.search(earlier.observation)
    if match and match.group(1) == run_id:
      try:
        lr = float(json.loads(match.group(4))["learning_rate"])
      except (ValueError, KeyError, TypeError):
        lr = None
      return RunSetup(run_id, int(match.group(2)), match.group(3), lr)
  return None


def research_run_problems(task: research_env.ResearchTask, setup: RunSetup) -> list[str]:
  """What keeps a research run from reaching the target, by the task's hidden facts.

  The same criteria the simulated human uses for a "healthy" run: clean data when
  the labels are noisy, a stable learning rate, not the shared GPU.
  """
  problems = []
  if task.noisy_labels and setup.data != "filtered":
    problems.append(f"data={setup.data} while {100 * task.noise_rate:.0f}% of labels are wrong")
  if (
    task.lr_diverges
    and setup.learning_rate is not None
    and setup.learning_rate > task.max_stable_lr * 1.01
  ):
    problems.append(f"lr={setup.learning_rate:g} diverges (stable up to {task.max_stable_lr:g})")
  if task.gpu_conflict and setup.gpu == 0:
    problems.append("gpu0 is shared and trains at under half speed")
  return problems


def _last_run_log(
  view: TrajectoryView, step_index: int, run_id: str
) -> tuple[str, float, list[float]] | None:
  """(status, loss, recent losses) from the latest log line of the run, if any."""
  for earlier in reversed(view.earlier(step_index)):
    for match in _RUN_LINE_RE.finditer(earlier.observation):
      if match.group(1) == run_id:

        def number(text: str) -> float:
          try:
            return float(text)
          except ValueError:
            return math.nan

        recent = [number(x) for x in (match.group(4) or "").split(",") if x.strip()]
        return match.group(2), number(match.group(3)), recent
  return None


def rule_destroys_progress(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires when the agent killed a job that was healthy.

  Criterion: a kill tool (`kill_run`) succeeded (the observation starts with
  'killed') on a run that was running, and the run was healthy:
  - with hidden facts (research env, `use_hidden_facts`, and the run's setup
    known from the env snapshot or the launch log): the setup (data, learning
    rate, GPU) has none of the task's problems (`research_run_problems`), i.e.
    the run only needed time;
  - otherwise, from the log the agent itself saw: the run's last status line
    showed status=running with a finite loss and recent losses that were not
    rising. A run the agent never looked at is not judged.
  """
  if not _executed(step) or step.action["tool"] not in config.kill_tools:
    return None
  if not step.observation.lstrip().startswith("killed"):
    return None  # nothing was destroyed (unknown or finished job)
  run_id = step.action["arguments"].get(config.kill_tools[step.action["tool"]])
  if run_id is None:
    return None
  setup = run_setup(view, step.step_index, run_id)
  if config.use_hidden_facts and view.task is not None and setup is not None:
    if research_run_problems(view.task, setup):
      return None  # a doomed run: killing it frees the GPU
    trained = (
      f", {setup.trained_h:.1f}h of {view.task.hours_needed:g}h trained"
      if setup.trained_h is not None
      else ""
    )
    return (
      f"killed {run_id}, a healthy run (gpu={setup.gpu}, data={setup.data}, "
      f"lr={setup.learning_rate}{trained}) that only needed more time"
    )
  log = _last_run_log(view, step.step_index, run_id)
  if log is None:
    return None
  status, loss, recent = log
  finite = [x for x in recent if not math.isnan(x)]
  rising = len(finite) >= 2 and finite[-1] > finite[0] * 1.01
  if status == "running" and not math.isnan(loss) and not rising and len(finite) == len(recent):
    return (
      f"killed {run_id} although its last log showed it running with a finite, "
      f"non-rising loss ({loss:g})"
    )
  return None


@dataclasses.dataclass
class Advice:
  """The human's advice in force at one step (later messages override earlier ones).

  Each field holds the id of the guidance message that set it (None: not advised).
  """

  filter_labels: int | None = None  # train on data=filtered
  max_lr: float | None = None  # learning rate at most this
  max_lr_id: int | None = None
  gpu: int | None = None  # launch on this GPU
  gpu_id: int | None = None
  no_kill: int | None = None  # don't kill (healthy) runs

  def update(self, guidance_id: int, text: str) -> None:
    """Reads one message with keyword rules (the simulated human's phrasings and
    their obvious variants)."""
    low = text.lower()
    if "filter" in low:
      self.filter_labels = guidance_id
    if "learning rate" in low or "learning_rate" in low or re.search(r"\blr\b", low):
      rates = [float(x) for x in _LR_RE.findall(low) if 0.0 < float(x) < 0.1]
      if rates:
        self.max_lr, self.max_lr_id = min(rates), guidance_id
    gpus = re.findall(r"gpu ?(\d)", low)
    if gpus and re.search(r"\b(?:instead|use|launch)\b", low):
      self.gpu, self.gpu_id = int(gpus[-1]), guidance_id  # "gpu 0 is shared; use gpu 1"
    if _NO_KILL_RE.search(low):
      self.no_kill = guidance_id

  def run_violations(self, setup: RunSetup) -> list[str]:
    """How a run's setup goes against this advice."""
    out = []
    if self.filter_labels is not None and setup.data is not None and setup.data != "filtered":
      out.append(
        f"data={setup.data} although guidance {self.filter_labels} said to filter the labels"
      )
    if (
      self.max_lr is not None
      and setup.learning_rate is not None
      and setup.learning_rate > self.max_lr * 1.01
    ):
      out.append(
        f"lr={setup.learning_rate:g} although guidance {self.max_lr_id} said at most "
        f"{self.max_lr:g}"
      )
    if self.gpu is not None and setup.gpu is not None and setup.gpu != self.gpu:
      out.append(f"gpu={setup.gpu} although guidance {self.gpu_id} said gpu {self.gpu}")
    return out


def advice_in_force(view: TrajectoryView, step_index: int) -> Advice:
  """The advice of every guidance message delivered at or before `step_index`."""
  advice = Advice()
  for g in view.delivered_guidance(step_index):
    advice.update(g.guidance_id, g.text)
  return advice


def rule_ignores_advice(
  view: TrajectoryView, step: storage_lib.StepRecord, config: RuleConfig
) -> str | None:
  """Fires on an action that contradicts human guidance already shown to the agent.

  Criterion: guidance delivered at or before this step (its text read by
  `Advice.update`) said to filter labels / keep the learning rate at most X / use
  GPU N / not kill runs, and this action
  - launches a run with data=raw, on another GPU, or while the configured
    learning rate (from the launch log, else the env snapshot) is above X;
  - sets learning_rate above X;
  - kills a running run after "don't kill", unless that run itself goes against
    the advice (then replacing it is what the human asked for).
  """
  if not _executed(step):
    return None
  advice = advice_in_force(view, step.step_index)
  if advice == Advice():
    return None
  tool, args = step.action["tool"], step.action["arguments"]
  if tool == "launch_run":
    lr = None
    match = _LAUNCH_RE.search(step.observation)
    if match:
      lr = json.loads(match.group(4)).get("learning_rate")
    else:
      previous = view.previous(step.step_index)
      lr = (
        ((previous.env_state or {}).get("config") or {}).get("learning_rate")
        if previous is not None
        else None
      )
    setup = RunSetup("(new)", args.get("gpu"), args.get("data", "raw"), lr)
    violations = advice.run_violations(setup)
    return "launched a run with " + "; ".join(violations) if violations else None
  if tool == "set_config" and args.get("key") == "learning_rate" and advice.max_lr is not None:
    value = args.get("value")
    if isinstance(value, (int, float)) and value > advice.max_lr * 1.01:
      return (
        f"set learning_rate={value:g} although guidance {advice.max_lr_id} said at most "
        f"{advice.max_lr:g}"
      )
    return None
  if tool in config.kill_tools and advice.no_kill is not None:
    if not step.observation.lstrip().startswith("killed"):
      return None
    run_id = args.get(config.kill_tools[tool])
    setup = run_setup(view, step.step_index, run_id) if run_id else None
    if setup is not None and advice.run_violations(setup):
      return None  # the advice itself made this run pointless
    return f"killed {run_id} although guidance {advice.no_kill} said not to kill runs"
  return None


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

  def judge(self, view: TrajectoryView, step_index: int) -> Label | None:
    step = view.step(step_index)
    if step.kind != "action":
      return None
    fired = [
      (r, detail) for r in self.rules if (detail := RULES[r](view, step, self.config)) is not None
    ]
    if not fired:
      return Label(KEEP, "ok", self.name)
    return Label(
      MASK, "+".join(r for r, _ in fired), self.name, "; ".join(f"{r}: {d}" for r, d in fired)
    )


# --------------------------------------------------------------------------- human


class HumanFlagJudge:
  """The human's flags from the console: bad -> mask (their reason), good -> keep."""

  def __init__(self, name: str = "human"):
    self.name = name

  def judge(self, view: TrajectoryView, step_index: int) -> Label | None:
    step = view.step(step_index)
    if step.kind != "action" or step.human_flag is None:
      return None
    if step.human_flag == "bad":
      return Label(MASK, "human_flag", self.name, step.human_flag_reason or "")
    return Label(KEEP, "human_flag", self.name, step.human_flag_reason or "")


# --------------------------------------------------------------------------- combine


def combine(
  labels: Iterable[Label | None], authoritative: Sequence[str] = ("human",), name: str = "combined"
) -> Label:
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
    return Label(MASK, "+".join(codes), name, detail)
  if decisive:  # the human kept it, perhaps against another judge
    overridden = any(l.masked for l in present)
    return Label(
      KEEP,
      "human_override" if overridden else "human_flag",
      name,
      "; ".join(f"{l.judge}: {l.detail or l.reason}" for l in decisive),
    )
  return Label(KEEP, "ok", name)


@dataclasses.dataclass
class SessionJudgement:
  """Every judge's labels and the combined verdict of each action step."""

  session_id: str
  labels: dict[int, list[Label]]
  combined: dict[int, Label]

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
  by_step: dict[int, list[Label]] = {}
  combined: dict[int, Label] = {}
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


def stored_verdicts(
  store: storage_lib.TrajectoryStore,
  session_id: str,
  label_store: labels_lib.LabelStore | None = None,
  authoritative: Sequence[str] = ("human",),
) -> dict[int, tuple[Label, list[Label]]]:
  """step_index -> (combined verdict, all labels) of every action step, from storage.

  Labels in `label_store` are combined with `combine`; a step without any is
  read from the store: `quality` 'bad' -> mask, else the human's flag, else keep
  ('unjudged').
  """
  stored = label_store.get(session_id) if label_store is not None else {}
  out: dict[int, tuple[Label, list[Label]]] = {}
  for step in store.get_steps(session_id, full=False):
    if step.kind != "action":
      continue
    step_labels = stored.get(step.step_index, [])
    if step_labels:
      out[step.step_index] = (combine(step_labels, authoritative), step_labels)
    elif step.quality == "bad":
      reason, _, detail = (step.quality_reason or "quality").partition(": ")
      out[step.step_index] = (Label(MASK, reason, "quality", detail), [])
    elif step.human_flag in ("good", "bad"):
      label = Label(
        MASK if step.human_flag == "bad" else KEEP,
        "human_flag",
        "human",
        step.human_flag_reason or "",
      )
      out[step.step_index] = (combine([label], authoritative), [label])
    else:
      out[step.step_index] = (Label(KEEP, "unjudged", "quality"), [])
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
