"""A scripted policy for the research environment: a plausible but untrained agent.

Tests, demos, the scripted baseline measurement and the data-collection side of
the comparison need an agent that behaves like an untrained model on
`research.ResearchEnv`: impatient with flat losses, keeping default
hyperparameters, skipping label filtering, using the first GPU, and following
human guidance when it gets some. `ScriptedResearchPolicy` is that agent, behind
the same `Backend` protocol as a served model. Like a model, it acts only on what
the messages say: it reads the observations' text and the guidance it is shown.

It answers in either tool mode, like a model behind a server with or without
tool support: given the tools (native mode), its call comes back as an OpenAI
`tool_calls` entry beside its one line of reasoning; given none (text mode), the
call is a JSON object in its text. Its decisions do not depend on the mode.

Its state is its snapshot, saved with every step, so a resumed rollout continues
with the same plans; its random draws are hashes of (seed, turn), so an episode is
a pure function of its seed and the guidance it received.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from apollo.agents import env as env_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents import tokens as tokens_lib
from apollo.agents.backends import base as backends_lib


def _rand(*key: Any) -> float:
  """Deterministic uniform [0, 1) from `key`: the policy needs no RNG state to save."""
  digest = hashlib.sha256(repr(key).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64


_CLOCK_RE = re.compile(r"\[clock ([\d.]+)h / ([\d.]+)h \| submissions left: (\d+)\]")
_RUN_RE = re.compile(
  r"run (r\d+): status=(\w+) gpu=(\d) data=(\w+) lr=([\d.e+-]+)"
  r".*?train_loss=([\w.]+)"
)
_LAUNCH_RE = re.compile(r"launched (r\d+) on gpu(\d) with data=(\w+)")
_LR_RE = re.compile(r"\d*\.\d+(?:e-?\d+)?|\d+e-?\d+")


@dataclasses.dataclass
class _PolicyState:
  turn: int = 0
  plan: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  last_action: dict[str, Any] | None = None
  clock: float = 0.0
  budget: float = 1.0
  submissions_left: int = 3
  run_id: str | None = None  # the run it is currently betting on
  run_status: str | None = None
  run_data: str = "raw"
  run_gpu: int = 0
  losses: list[float] = dataclasses.field(default_factory=list)
  runs_launched: int = 0
  filter_started: bool = False
  filter_ready: bool = False
  best_submit: float = -1.0
  submitted_runs: list[str] = dataclasses.field(default_factory=list)
  # What human guidance has taught it.
  advice_filter: bool = False
  advice_lr: float | None = None
  advice_gpu: int | None = None
  advice_patient: bool = False
  guidance_seen: int = 0


class ScriptedResearchPolicy:
  """A plausible but untrained agent for `ResearchEnv`, steerable by guidance.

  Its drifts, each drawn per episode from the seed:
  - keeps the default learning rate (75%) or picks another one at random;
  - launches on GPU 0 (75%) without looking at `gpu_status`;
  - sees the label-agreement statistic but filters only 15% of the time;
  - impatient: when the last three losses improved by under 2%, kills the run with
    probability 0.6 per check (0.05 for a "patient" draw, 30% of episodes) and
    relaunches with a tweaked learning rate.
  Guidance it understands (simple keyword rules, like a model that reads advice):
  "filter" -> filter labels and train on data=filtered; "learning rate ... X" -> use
  at most X; "gpu 1" -> launch there; "don't kill" / "needs ... hours" -> stop
  killing runs. Advice that makes the current run pointless (wrong data, learning
  rate or GPU) makes it kill that run and relaunch.
  A small fraction of responses (`invalid_rate`) is malformed on purpose so the
  error path is exercised in every long run (a truncated JSON call in text mode,
  truncated JSON arguments in native mode).

  Args:
    seed: the episode's draws.
    latency_s: seconds each turn sleeps (stands in for model time).
    invalid_rate: fraction of malformed calls.
    tool_mode: the mode it prefers when the loop is not told one. 'text' by
      default: the compact-view training data of `training.collect` is rendered
      with a ChatML template that has no tool messages; the service and
      `experiments.rollout` run it native.
  """

  name = "scripted"

  def __init__(
    self, seed: int, latency_s: float = 0.0, invalid_rate: float = 0.02, tool_mode: str = "text"
  ):
    if tool_mode not in backends_lib.TOOL_MODES:
      raise ValueError(f"tool_mode must be one of {backends_lib.TOOL_MODES}, got {tool_mode!r}")
    self.seed = seed
    self.latency_s = latency_s
    self.invalid_rate = invalid_rate
    self.tool_mode = tool_mode
    self.state = _PolicyState()
    self.patient_draw = _rand(seed, "patient") < 0.3
    self.keep_default_lr = _rand(seed, "lr") < 0.75
    self.first_gpu = 0 if _rand(seed, "gpu") < 0.75 else 1
    self.filters_unprompted = _rand(seed, "filter") < 0.15
    self.inspects = _rand(seed, "inspect") < 0.5

  def snapshot(self) -> dict[str, Any]:
    return dataclasses.asdict(self.state)

  def restore(self, state: Mapping[str, Any]) -> None:
    self.state = _PolicyState(**state)

  # ------------------------------------------------------------------ observe
  def _observe(self, messages: backends_lib.Messages) -> None:
    """Updates the state from the messages that arrived since its last turn."""
    s = self.state
    new: list[Mapping[str, str]] = []
    for m in reversed(messages):
      if m["role"] == "assistant":
        break
      new.append(m)
    new.reverse()
    for m in new:
      text = m["content"]
      if guidance_lib.is_guidance_message(m):
        for block in guidance_lib.parse_guidance_blocks(text):
          self._take_advice(block["text"])
        continue
      clock = _CLOCK_RE.search(text)
      if clock:
        s.clock, s.budget = float(clock.group(1)), float(clock.group(2))
        s.submissions_left = int(clock.group(3))
      launch = _LAUNCH_RE.search(text)
      if launch:
        s.run_id, s.run_gpu, s.run_data = launch.group(1), int(launch.group(2)), launch.group(3)
        s.run_status, s.losses = "running", []
      for run in _RUN_RE.finditer(text):
        if run.group(1) == s.run_id:
          s.run_status = run.group(2)
          if run.group(2) == "running" and s.last_action and s.last_action["tool"] == "check_run":
            s.losses.append(float(run.group(6)))
      if "filter_labels" in text and "started job" in text:
        s.filter_started = True
      if "kind=filter_labels status=finished" in text or (
        s.filter_started and "job j" in text and "finished" in text and "Events" in text
      ):
        s.filter_ready = True
      sub = re.search(r"submission \d+: test .* of (r\d+) = ([\d.]+)", text)
      if sub:
        s.submitted_runs.append(sub.group(1))
        s.best_submit = max(s.best_submit, float(sub.group(2)))

  def _take_advice(self, text: str) -> None:
    s = self.state
    s.guidance_seen += 1
    low = text.lower()
    invalidates_run = False
    if "filter" in low:
      s.advice_filter = True
      invalidates_run |= s.run_status == "running" and s.run_data == "raw"
    if "learning rate" in low or "learning_rate" in low or re.search(r"\blr\b", low):
      # Learning rates are small decimals ("0.001", "5e-4"); GPU ids and hours are not.
      numbers = [float(x) for x in _LR_RE.findall(low) if 0.0 < float(x) < 0.1]
      if numbers:
        s.advice_lr = min(numbers)
        invalidates_run |= s.run_status == "running"
    gpu = re.search(r"gpu ?(\d)", low)
    if gpu and ("instead" in low or "use" in low or "launch" in low):
      # "GPU 0 is shared ...; use gpu 1 instead": the last GPU named is the advice.
      s.advice_gpu = int(re.findall(r"gpu ?(\d)", low)[-1])
      invalidates_run |= s.run_status == "running" and s.run_gpu != s.advice_gpu
    if "don't kill" in low or "do not kill" in low or "needs about" in low or "patient" in low:
      s.advice_patient = True
    # A launch planned before the advice arrived would ignore it: plan it again.
    s.plan = [a for a in s.plan if a["tool"] != "launch_run"]
    if invalidates_run and s.run_id:
      s.plan = [{"tool": "kill_run", "arguments": {"run_id": s.run_id}}]
      s.run_status = "killed"

  # ------------------------------------------------------------------ decide
  def _decide(self) -> dict[str, Any]:
    s = self.state
    r = lambda tag: _rand(self.seed, s.turn, tag)  # noqa: E731
    if s.plan:
      return s.plan.pop(0)
    if s.turn == 0:
      s.plan = [
        {"tool": "read_file", "arguments": {"path": "README.md"}},
        {"tool": "read_file", "arguments": {"path": "config.yaml"}},
      ]
      if self.inspects:
        s.plan.append({"tool": "inspect_data", "arguments": {"split": "train"}})
      return {"tool": "list_files", "arguments": {}}
    time_left = s.budget - s.clock
    wants_filter = s.advice_filter or (self.filters_unprompted and self.inspects)
    # Running out of time: submit whatever it has rather than nothing.
    if time_left < 1.0 and s.run_id and s.run_id not in s.submitted_runs and s.submissions_left > 0:
      return {"tool": "submit", "arguments": {"run_id": s.run_id}}
    if wants_filter and not s.filter_started:
      return {"tool": "filter_labels", "arguments": {"method": "confidence"}}
    if s.run_status in (None, "killed", "diverged") or (
      s.run_status == "finished" and s.run_id in s.submitted_runs
    ):
      if s.best_submit >= 0 and (time_left < 6.0 or s.best_submit >= 80):
        return {"tool": "finish", "arguments": {}}
      if wants_filter and not s.filter_ready:
        return self._wait("list_jobs")
      return self._launch(diverged=s.run_status == "diverged")
    if s.run_status == "finished":
      if s.last_action and s.last_action["tool"] == "evaluate":
        return {"tool": "submit", "arguments": {"run_id": s.run_id}}
      return {"tool": "evaluate", "arguments": {"run_id": s.run_id}}
    # Monitoring a running run: alternate sleeping and checking.
    if s.last_action and s.last_action["tool"] == "check_run":
      if self._stalled() and not s.advice_patient:
        kill_p = 0.05 if self.patient_draw else 0.6
        if r("kill") < kill_p:
          s.run_status = "killed"
          return {
            "tool": "kill_run",
            "arguments": {"run_id": s.run_id},
            "thought": "The loss has been flat for hours; this run is stuck.",
          }
      return {"tool": "sleep", "arguments": {"hours": 0.5}}
    return {"tool": "check_run", "arguments": {"run_id": s.run_id}}

  def _wait(self, check_tool: str) -> dict[str, Any]:
    s = self.state
    if s.last_action and s.last_action["tool"] == check_tool:
      return {"tool": "sleep", "arguments": {"hours": 0.5}}
    return {"tool": check_tool, "arguments": {}}

  def _stalled(self) -> bool:
    losses = [x for x in self.state.losses[-3:] if not math.isnan(x)]
    return len(losses) == 3 and (losses[0] - losses[-1]) < 0.02 * losses[0]

  def _launch(self, diverged: bool) -> dict[str, Any]:
    s = self.state
    s.runs_launched += 1
    lr = 3e-3
    if s.runs_launched > 1:
      # Relaunching after a failure: an untrained agent tweaks the learning rate.
      lr = 1e-3 if diverged else (3e-3 * (0.5 if _rand(self.seed, s.turn, "tw") < 0.5 else 2.0))
    elif not self.keep_default_lr:
      lr = (1e-3, 1e-2, 3e-4)[int(_rand(self.seed, "lrpick") * 3)]
    if s.advice_lr is not None:
      lr = min(lr, s.advice_lr)
    gpu = s.advice_gpu if s.advice_gpu is not None else self.first_gpu
    data = "filtered" if s.filter_ready else "raw"
    s.plan = [{"tool": "launch_run", "arguments": {"gpu": gpu, "data": data}}]
    return {"tool": "set_config", "arguments": {"key": "learning_rate", "value": lr}}

  def complete(
    self, messages: backends_lib.Messages, tools: Sequence[env_lib.ToolSpec]
  ) -> backends_lib.ModelResponse:
    """The next action: a native `tool_calls` entry if given `tools`, else JSON text."""
    if self.latency_s:
      time.sleep(self.latency_s)  # stands in for model time in demos and benchmarks
    self._observe(messages)
    s = self.state
    action = self._decide()
    s.last_action = {"tool": action["tool"], "arguments": action["arguments"]}
    s.turn += 1
    thought = action.get("thought") or _THOUGHTS.get(action["tool"], "Next step.")
    invalid = _rand(self.seed, s.turn, "invalid") < self.invalid_rate
    if invalid:
      s.last_action = None
    prompt_tokens = tokens_lib.count_message_tokens(messages)
    if tools:
      arguments = json.dumps(action["arguments"])
      if invalid:
        arguments = arguments[:-1]  # truncated, unparseable arguments
      call = {
        "id": f"call_{s.turn}",
        "type": "function",
        "function": {"name": action["tool"], "arguments": arguments},
      }
      return backends_lib.ModelResponse(
        text=thought,
        prompt_tokens=prompt_tokens,
        completion_tokens=tokens_lib.approx_token_count(thought + arguments),
        tool_calls=[call],
      )
    call = json.dumps({"tool": action["tool"], "arguments": action["arguments"]})
    if invalid:
      call = call[:-2]  # a truncated, unparseable call
    text = f"{thought}\n{call}"
    return backends_lib.ModelResponse(
      text=text,
      prompt_tokens=prompt_tokens,
      completion_tokens=tokens_lib.approx_token_count(text),
    )


_THOUGHTS = {
  "list_files": "Let me look at the project first.",
  "read_file": "Reading the project files.",
  "inspect_data": "Checking the data.",
  "filter_labels": "Cleaning the labels before training.",
  "set_config": "Setting the learning rate for the next run.",
  "launch_run": "Launching a training run.",
  "check_run": "Checking on the run.",
  "sleep": "Waiting for training to progress.",
  "list_jobs": "Checking background jobs.",
  "evaluate": "The run is done; evaluating on dev.",
  "submit": "Submitting.",
  "finish": "Done.",
  "kill_run": "Stopping this run.",
}
