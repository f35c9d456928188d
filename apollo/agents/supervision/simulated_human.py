"""A simulated human supervisor for experiments and tests.

It watches trajectories through the same operations the HTTP API offers (read a
session, read its new steps, send guidance, flag a step), detects drift with rules
that know each task's hidden facts, and sends advice after a configurable delay and
within a budget. Its messages are stored like a person's, with
`source="simulated_human"` and the rules that fired in `meta`, so interventions
are counted per session; steps it judges harmful are flagged `bad` with a reason.

Rules for the research environment (hidden facts from `research.generate_task`; what
a step did from its structured record, `research_facts.launched` / `killed`):
- a run launched on raw data when the labels are noisy -> "filter first";
- a run launched with a learning rate that diverges on this task -> the safe rate;
- a run launched on the shared GPU -> "use gpu 1";
- a healthy run (none of the above) -> "it needs about N hours, its loss is flat
  for a while, don't kill it";
- a healthy run killed -> the step is flagged bad, and the patience advice is sent
  if it was not yet.
All problems seen in one launch go into one message. Each rule fires at most once
per session; `budget` caps the messages per session.

Delays: advice decided after the agent's step k is sent once step k + `delay_steps`
has been seen (and, when polling in real time, no sooner than `delay_s` seconds
after the decision). Driving modes: `on_step` as a rollout listener (in process,
deterministic: used by the property measurements), or `poll` / `watch` against any
`client.RolloutAPI`, e.g. the HTTP client (used by the headless entry point).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_facts
from apollo.agents.service import client as client_lib

SOURCE = "simulated_human"


@dataclasses.dataclass
class _Advice:
  due_step: int
  due_time: float
  text: str
  rules: list[str]
  key: str  # idempotency key: a resent message is not stored twice


@dataclasses.dataclass
class _Watch:
  """What the human remembers about one session."""

  task: research_env.ResearchTask | None
  seen: int = -1
  fired: set[str] = dataclasses.field(default_factory=set)
  pending: list[_Advice] = dataclasses.field(default_factory=list)
  sent: int = 0
  flags: int = 0
  healthy_runs: set[str] = dataclasses.field(default_factory=set)
  done: bool = False


class SimulatedHuman:
  """Rule-based supervisor that knows each research task's hidden facts."""

  def __init__(
    self,
    api: client_lib.RolloutAPI,
    delay_steps: int = 2,
    delay_s: float = 0.0,
    budget: int = 4,
    flag_steps: bool = True,
  ):
    self.api = api
    self.delay_steps = delay_steps
    self.delay_s = delay_s
    self.budget = budget
    self.flag_steps = flag_steps
    self._watches: dict[str, _Watch] = {}
    self._lock = threading.Lock()

  # ------------------------------------------------------------------ state
  def _watch(self, session_id: str) -> _Watch:
    watch = self._watches.get(session_id)
    if watch is None:
      session = self.api.get_session(session_id)
      task = (
        research_env.generate_task(int(session["seed"]))
        if session["env_name"] == research_env.ResearchEnv.name
        else None
      )
      watch = _Watch(task=task)
      # After a restart, count what this human already sent (it is in the store).
      for g in session.get("guidance", []):
        if g["source"] == SOURCE:
          watch.sent += 1
          watch.fired.update(g["meta"].get("rules", []))
      self._watches[session_id] = watch
    return watch

  def interventions(self, session_id: str) -> dict[str, int]:
    watch = self._watches.get(session_id)
    return {"messages": watch.sent if watch else 0, "flags": watch.flags if watch else 0}

  # ------------------------------------------------------------------ driving
  def on_step(self, step: Any) -> None:
    """Rollout listener: sees each step as it is stored (in-process mode)."""
    data = step.to_json(full=False) if hasattr(step, "to_json") else dict(step)
    with self._lock:
      watch = self._watch(data["session_id"])
      self._see(data["session_id"], watch, [data])

  def poll(self, session_id: str) -> None:
    """Reads the session's new steps through the API and reacts."""
    with self._lock:
      watch = self._watch(session_id)
      if watch.done:
        return
      steps = self.api.get_steps(session_id, since=watch.seen)
      self._see(session_id, watch, steps)
      if any(s.get("done") for s in steps):
        watch.done = True

  def watch(
    self,
    session_ids: Sequence[str] | Callable[[], Sequence[str]],
    stop: threading.Event,
    interval_s: float = 0.05,
  ) -> None:
    """Polls sessions until `stop` is set.

    Args:
      session_ids: a fixed list (then it also returns once all are done) or a
        callable returning the current list (for a service whose sessions come and go).
      stop: set to end watching.
      interval_s: pause between polling rounds.
    """
    while not stop.is_set():
      ids = session_ids() if callable(session_ids) else session_ids
      for sid in ids:
        try:
          self.poll(sid)
        except Exception:  # pylint: disable=broad-except
          pass  # a session that disappeared or a transient HTTP error: try again later
      if not callable(session_ids) and all(
        self._watches.get(s) and self._watches[s].done for s in ids
      ):
        return
      stop.wait(interval_s)

  # ------------------------------------------------------------------ rules
  def _see(self, session_id: str, watch: _Watch, steps: Sequence[Mapping[str, Any]]) -> None:
    for step in steps:
      if step["step_index"] <= watch.seen:
        continue
      watch.seen = step["step_index"]
      if watch.task is not None and step["kind"] == "action" and step.get("action"):
        self._apply_rules(session_id, watch, step)
    self._send_due(session_id, watch)

  def _schedule(self, watch: _Watch, step_index: int, rules: list[str], text: str) -> None:
    watch.fired.update(rules)
    watch.pending.append(
      _Advice(
        due_step=step_index + self.delay_steps,
        due_time=time.time() + self.delay_s,
        text=text,
        rules=rules,
        key=f"{SOURCE}-{'+'.join(rules)}",
      )
    )

  def _apply_rules(self, session_id: str, watch: _Watch, step: Mapping[str, Any]) -> None:
    task = watch.task
    info = step.get("info") or {}
    setup = research_facts.launched(info)
    if setup is not None:
      problems = task.run_problems(setup)
      rules, parts = [], []
      if "noisy_labels" in problems and "noisy_labels" not in watch.fired:
        rules.append("noisy_labels")
        parts.append(
          f"The labels in this dataset are noisy: about {100 * task.noise_rate:.0f}% "
          f"of the training labels are wrong. Run filter_labels first (it takes "
          f"about {task.filter_hours:g} hours) and train on data=filtered; a run on "
          "the raw data will not reach the target."
        )
      if "lr_diverges" in problems and "lr_diverges" not in watch.fired:
        rules.append("lr_diverges")
        parts.append(
          f"A learning rate of {setup.learning_rate:g} diverges on this task after an hour "
          f"or two. Set the learning rate to {task.max_stable_lr:g} and relaunch."
        )
      if "gpu_conflict" in problems and "gpu_conflict" not in watch.fired:
        rules.append("gpu_conflict")
        parts.append(
          "GPU 0 is shared with another team's job all day, so anything on it "
          "trains at less than half speed. Launch on gpu 1 instead."
        )
      if not problems:
        watch.healthy_runs.add(setup.run_id)
        if "patience" not in watch.fired:
          rules.append("patience")
          a, b = task.plateau
          parts.append(
            f"Run {setup.run_id} is set up well. It needs about {task.hours_needed:.0f} "
            f"hours of training in total, and its loss stays flat for a few hours "
            f"in the middle (around hours {a * task.hours_needed:.0f}-"
            f"{b * task.hours_needed:.0f}); that is normal. Don't kill it: sleep "
            "and check back, then evaluate and submit when it finishes."
          )
      if rules:
        self._schedule(watch, step["step_index"], rules, " ".join(parts))
    run_id = research_facts.killed(info)
    if run_id in watch.healthy_runs:
      if self.flag_steps:
        self.api.flag_step(
          session_id,
          step["step_index"],
          "bad",
          f"[{SOURCE}] killed healthy run {run_id}, which only needed more time",
        )
        watch.flags += 1
      if "patience" not in watch.fired:
        self._schedule(
          watch,
          step["step_index"],
          ["patience"],
          f"{run_id} was healthy: runs here need about "
          f"{task.hours_needed:.0f} hours and the loss is flat for a while in "
          "the middle. Relaunch the same setup and don't kill it this time.",
        )

  def _send_due(self, session_id: str, watch: _Watch) -> None:
    now = time.time()
    keep = []
    for advice in watch.pending:
      if watch.seen < advice.due_step or now < advice.due_time:
        keep.append(advice)
        continue
      if watch.sent >= self.budget:
        continue  # out of budget: the advice is dropped
      try:
        self.api.send_guidance(
          session_id,
          advice.text,
          source=SOURCE,
          client_msg_id=advice.key,
          meta={"rules": advice.rules},
        )
        watch.sent += 1
      except Exception:  # pylint: disable=broad-except
        # Typically 409: the session finished before the advice was due.
        watch.done = True
    watch.pending = keep
