"""A built-in long-horizon environment family modelled on ML-research work.

Apollo trains agents on tasks that take hours and that an untrained agent rarely
solves alone (D. Fu et al., "Interaction as Intelligence Part II: Asynchronous
Human-Agent Rollout for Long-Horizon Task Training", arXiv 2510.27630, 2025). This
family is such a task, simulated so that it runs anywhere, fast and reproducibly.

Each seed generates one task: train a model for a (fictional) dataset, with training
runs that take simulated hours, a limited number of scored submissions, and a score
from 0 to 100. The agent configures, launches, monitors, evaluates and submits runs
with one tool call per turn, and must fit all of it into a simulated time budget.

Every task hides facts that an experienced human knows and an untrained agent tends
to miss (the failure modes observed on InnovatorBench):

- `long_run` (always): a run needs `hours_needed` (12-18) simulated hours to converge,
  and its loss is flat for several hours in the middle. Impatient agents kill it.
- `noisy_labels`: 25-40% of the training labels are wrong; training on the raw data
  caps the score well below the target. `filter_labels` (a background job of 1.5-3
  hours) fixes it.
- `lr_diverges`: the default learning rate (3e-3) diverges after 1-3 hours; the
  largest stable rate is 1e-3 or 5e-4.
- `gpu_conflict`: GPU 0 is shared with another team's job for the whole episode;
  anything running on it trains at less than half speed. GPU 1 is free.

Success means a best submitted score >= the task's target (72-78). A run that
converged on clean data with a stable learning rate scores about 90; undertrained,
noisy or diverged runs score far less.

Sleep is capped at half an hour per call (a cluster's monitoring cadence), so an
episode takes many tool calls. Time is simulated; `time_scale_s` real seconds per
simulated hour slows sleeps down for live demos, and `interrupt()` cuts a sleep
short.

Splits: seeds in [0, 1_000_000) are the train set, seeds >= 1_000_000 the test set;
the two draw the task's domain from disjoint pools (same hidden-fact distribution).

Each step's `info` records what the call did, for judges and supervisors
(`research_facts` reads it): `status_line` (the clock line appended to the
observation), `launched` ({run_id, gpu, data, config} of a run it started),
`killed` (the id of a running run it stopped), `runs_seen` ({run_id, status,
train_loss, recent_losses} of every run its observation described, as shown;
None where it showed nan), and at the end the episode's result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from apollo.agents import env as env_lib

TEST_SEED_OFFSET = 1_000_000
DEFAULT_LR = 3e-3
MAX_SLEEP_HOURS = 0.5
MAX_CONCURRENT_RUNS = 3
NUM_GPUS = 2

_TRAIN_DOMAINS = (
  ("image classification", "leaf-disease photos", "accuracy"),
  ("sentiment classification", "product reviews", "macro-F1"),
  ("speech command recognition", "short voice clips", "accuracy"),
  ("document topic classification", "news articles", "accuracy"),
  ("intent detection", "customer-support chats", "accuracy"),
  ("protein family classification", "amino-acid sequences", "macro-F1"),
)
_TEST_DOMAINS = (
  ("galaxy morphology classification", "telescope cut-outs", "accuracy"),
  ("code defect detection", "function bodies", "F1"),
  ("toxicity classification", "forum comments", "macro-F1"),
  ("sound event classification", "street recordings", "accuracy"),
)


def split_of(seed: int) -> str:
  """'train' or 'test' for a task seed."""
  return "test" if seed >= TEST_SEED_OFFSET else "train"


def seeds_for(split: str, count: int, start: int = 0) -> list[int]:
  """`count` consecutive task seeds of `split`, starting at index `start`."""
  base = TEST_SEED_OFFSET if split == "test" else 0
  if split not in ("train", "test"):
    raise ValueError(f"unknown split {split!r}")
  return [base + start + i for i in range(count)]


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """How a training run was launched and, when known, how far it got."""

  run_id: str
  gpu: int | None
  data: str | None
  learning_rate: float | None
  status: str | None = None  # running | finished | killed | diverged
  trained_h: float | None = None  # simulated hours trained at full speed


@dataclasses.dataclass(frozen=True)
class ResearchTask:
  """One generated task: what the agent is told and the hidden facts."""

  seed: int
  split: str
  domain: str
  dataset: str
  metric: str
  target_score: float
  time_budget_h: float
  max_submissions: int
  # Hidden facts.
  hours_needed: float  # simulated training hours to converge at full speed
  plateau: tuple[float, float]  # progress fractions between which the loss is flat
  noisy_labels: bool
  noise_rate: float
  filter_hours: float
  lr_diverges: bool
  max_stable_lr: float
  gpu_conflict: bool

  def run_problems(self, setup: RunSetup) -> dict[str, str]:
    """What keeps a run set up like `setup` from reaching the target, by hidden fact.

    Keys are the facts the setup runs into ('noisy_labels': trained on raw data,
    'lr_diverges': learning rate above the stable one, 'gpu_conflict': on the
    shared GPU); values say how. Empty: the run only needs time.
    """
    problems = {}
    if self.noisy_labels and setup.data != "filtered":
      problems["noisy_labels"] = (
        f"data={setup.data} while {100 * self.noise_rate:.0f}% of labels are wrong"
      )
    if (
      self.lr_diverges
      and setup.learning_rate is not None
      and setup.learning_rate > self.max_stable_lr * 1.01
    ):
      problems["lr_diverges"] = (
        f"lr={setup.learning_rate:g} diverges (stable up to {self.max_stable_lr:g})"
      )
    if self.gpu_conflict and setup.gpu == 0:
      problems["gpu_conflict"] = "gpu0 is shared and trains at under half speed"
    return problems

  def hidden_facts(self) -> dict[str, Any]:
    facts = {
      "long_run": {
        "hours_needed": self.hours_needed,
        "plateau_hours": [
          round(self.plateau[0] * self.hours_needed, 1),
          round(self.plateau[1] * self.hours_needed, 1),
        ],
      }
    }
    if self.noisy_labels:
      facts["noisy_labels"] = {"noise_rate": self.noise_rate, "filter_hours": self.filter_hours}
    if self.lr_diverges:
      facts["lr_diverges"] = {"max_stable_lr": self.max_stable_lr}
    if self.gpu_conflict:
      facts["gpu_conflict"] = {"busy_gpu": 0, "free_gpu": 1}
    return facts


def generate_task(seed: int) -> ResearchTask:
  """The task of `seed` (pure function of the seed)."""
  rng = random.Random(f"apollo-research-task-{seed}")
  split = split_of(seed)
  domain, dataset, metric = rng.choice(_TEST_DOMAINS if split == "test" else _TRAIN_DOMAINS)
  # Optional facts: at least one is active so every task has a trap besides patience.
  while True:
    noisy, lr_div, conflict = (rng.random() < 0.55 for _ in range(3))
    if noisy or lr_div or conflict:
      break
  hours_needed = round(rng.uniform(12.0, 18.0), 1)
  filter_hours = round(rng.uniform(1.5, 3.0), 1)
  slack = rng.uniform(7.0, 10.0)
  budget = math.ceil(hours_needed + (filter_hours if noisy else 0.0) + slack)
  return ResearchTask(
    seed=seed,
    split=split,
    domain=domain,
    dataset=dataset,
    metric=metric,
    target_score=float(rng.choice((72, 74, 75, 76, 78))),
    time_budget_h=float(budget),
    max_submissions=3,
    hours_needed=hours_needed,
    plateau=(round(rng.uniform(0.2, 0.3), 2), round(rng.uniform(0.55, 0.65), 2)),
    noisy_labels=noisy,
    noise_rate=round(rng.uniform(0.25, 0.4), 2),
    filter_hours=filter_hours,
    lr_diverges=lr_div,
    max_stable_lr=rng.choice((1e-3, 5e-4)),
    gpu_conflict=conflict,
  )


@dataclasses.dataclass
class _Run:
  run_id: str
  gpu: int
  data: str
  config: dict[str, float]
  started_at: float
  status: str = "running"  # running | finished | killed | diverged
  trained_h: float = 0.0
  ended_at: float | None = None
  diverge_at_h: float | None = None
  losses: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Job:
  job_id: str
  kind: str
  started_at: float
  hours: float
  status: str = "running"  # running | finished


def _unit_noise(*key: Any) -> float:
  """Deterministic pseudo-random number in [-1, 1] for `key` (reproducible scores)."""
  digest = hashlib.sha256(repr(key).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**63 - 1.0


_CONFIG_KEYS = ("learning_rate", "batch_size", "warmup_steps", "weight_decay")
_ACTION_COST_H = {  # simulated hours a tool call takes
  "list_files": 0.02,
  "read_file": 0.02,
  "gpu_status": 0.02,
  "list_jobs": 0.02,
  "check_run": 0.03,
  "inspect_data": 0.1,
  "set_config": 0.02,
  "launch_run": 0.05,
  "kill_run": 0.02,
  "filter_labels": 0.05,
  "evaluate": 0.5,
  "submit": 0.25,
  "finish": 0.0,
}


class ResearchEnv(env_lib.Environment):
  """The simulated ML-research task family (see module docstring)."""

  name = "research"

  def __init__(self, time_scale_s: float = 0.0):
    """Args:
    time_scale_s: real seconds a one-hour `sleep` takes (0: instantaneous). Only for
      live demos: everything else about the environment is simulated.
    """
    self.time_scale_s = time_scale_s
    self._interrupt = threading.Event()
    self._sleeping = threading.Event()
    self.task: ResearchTask | None = None
    self._step_info: dict[str, Any] = {}

  # ------------------------------------------------------------------ interface
  def tools(self) -> Sequence[env_lib.ToolSpec]:
    return _TOOLS

  def reset(self, seed: int) -> str:
    self.task = generate_task(seed)
    self.runs: dict[str, _Run] = {}
    self.jobs: dict[str, _Job] = {}
    self.t = 0.0
    self.config = {
      "learning_rate": DEFAULT_LR,
      "batch_size": 128,
      "warmup_steps": 500,
      "weight_decay": 0.01,
    }
    self.filtered_ready = False
    self.submissions: list[dict[str, Any]] = []
    self.finished = False
    self.counter = 0
    t = self.task
    return (
      f"TASK (seed {t.seed}, {t.split} split): train a {t.domain} model on the "
      f"{t.dataset} dataset and submit it. Test {t.metric} is reported on a 0-100 "
      f"scale; the task counts as solved when your best submitted score is at least "
      f"{t.target_score:.0f}. You have {t.time_budget_h:.0f} simulated hours and "
      f"{t.max_submissions} submissions. Training runs take hours: launch them, "
      f"monitor them with check_run and sleep (at most {MAX_SLEEP_HOURS:g} hours per "
      f"call), evaluate on the dev set, then submit. The episode ends when the time "
      f"or the submissions run out, or when you call finish.\n" + self._footer()
    )

  def step(self, action: env_lib.Action) -> env_lib.StepResult:
    assert self.task is not None, "reset() first"
    if self.finished:
      return env_lib.StepResult("ERROR: the episode is over.", done=True, info=self.result())
    self._step_info: dict[str, Any] = {}  # structured facts the tool records
    handler = getattr(self, f"_tool_{action.tool}")
    obs = handler(**action.arguments)
    if action.tool != "sleep":
      self._advance(_ACTION_COST_H.get(action.tool, 0.02))
    if self.t >= self.task.time_budget_h - 1e-9 and not self.finished:
      self.finished = True
      obs += "\nTIME BUDGET EXHAUSTED: the episode is over."
    if len(self.submissions) >= self.task.max_submissions and not self.finished:
      self.finished = True
      obs += "\nNo submissions left: the episode is over."
    result = self.result() if self.finished else {}
    if self.finished:
      obs += f"\nFINAL SCORE: {result['score']:.1f} (target {self.task.target_score:.0f})."
    footer = self._footer()
    return env_lib.StepResult(
      observation=obs + "\n" + footer,
      reward=result.get("score", 0.0) if self.finished else 0.0,
      done=self.finished,
      info={**self._step_info, "status_line": footer, **result},
    )

  def now_hours(self) -> float:
    return getattr(self, "t", 0.0)

  def interrupt(self) -> bool:
    if self._sleeping.is_set():
      self._interrupt.set()
      return True
    return False

  def hidden_facts(self) -> dict[str, Any]:
    return self.task.hidden_facts() if self.task else {}

  def result(self) -> dict[str, Any]:
    best = max((s["score"] for s in self.submissions), default=0.0)
    return {
      "score": best,
      "success": best >= self.task.target_score,
      "target_score": self.task.target_score,
      "submissions": len(self.submissions),
      "sim_hours": round(self.t, 3),
    }

  def snapshot(self) -> dict[str, Any]:
    return {
      "seed": self.task.seed,
      "t": self.t,
      "config": dict(self.config),
      "filtered_ready": self.filtered_ready,
      "submissions": list(self.submissions),
      "finished": self.finished,
      "counter": self.counter,
      "runs": [dataclasses.asdict(r) for r in self.runs.values()],
      "jobs": [dataclasses.asdict(j) for j in self.jobs.values()],
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    self.reset(int(state["seed"]))
    self.t = float(state["t"])
    self.config = dict(state["config"])
    self.filtered_ready = bool(state["filtered_ready"])
    self.submissions = [dict(s) for s in state["submissions"]]
    self.finished = bool(state["finished"])
    self.counter = int(state["counter"])
    self.runs = {r["run_id"]: _Run(**r) for r in state["runs"]}
    self.jobs = {j["job_id"]: _Job(**j) for j in state["jobs"]}

  # ------------------------------------------------------------------ dynamics
  def _speed(self, run: _Run) -> float:
    speed = 1.0
    if self.task.gpu_conflict and run.gpu == 0:
      speed *= 0.45
    sharing = sum(1 for r in self.runs.values() if r.status == "running" and r.gpu == run.gpu)
    if sharing > 1:  # the agent's own runs competing for one GPU
      speed /= sharing
    if run.config["learning_rate"] < 1e-4:
      speed *= 0.5  # a tiny learning rate converges slowly
    return speed

  def _advance(self, hours: float) -> None:
    """Moves the simulated clock forward, integrating every background process."""
    end = min(self.t + hours, self.task.time_budget_h)
    while self.t < end - 1e-12:
      dt = min(0.25, end - self.t)
      speeds = {rid: self._speed(r) for rid, r in self.runs.items() if r.status == "running"}
      for rid, speed in speeds.items():
        run = self.runs[rid]
        run.trained_h += speed * dt
        if run.diverge_at_h is not None and run.trained_h >= run.diverge_at_h:
          run.status, run.ended_at = "diverged", self.t + dt
        elif run.trained_h >= self.task.hours_needed:
          run.trained_h = self.task.hours_needed
          run.status, run.ended_at = "finished", self.t + dt
      for job in self.jobs.values():
        if job.status == "running" and self.t + dt >= job.started_at + job.hours:
          job.status = "finished"
          if job.kind == "filter_labels":
            self.filtered_ready = True
      self.t += dt

  def _loss(self, run: _Run) -> float:
    if run.status == "diverged":
      return float("nan")
    p = run.trained_h / self.task.hours_needed
    a, b = self.task.plateau
    if p < a:
      f = 1.0 - 0.45 * p / a
    elif p < b:
      f = 0.55 - 0.02 * (p - a) / (b - a)  # the flat stretch that tempts agents to kill
    else:
      f = 0.53 * (1.0 - (p - b) / (1.0 - b)) ** 1.5
    floor = 0.35
    if self.task.noisy_labels and run.data == "raw":
      floor += self.task.noise_rate * 2.0
    noise = 0.004 * _unit_noise(self.task.seed, run.run_id, round(self.t, 3))
    return floor + (2.3 - floor) * f + noise

  def _run_score(self, run: _Run, salt: str) -> float:
    """Test-quality of the run's latest checkpoint, 0-100."""
    if run.status == "diverged":
      return round(max(0.0, 4.0 + 3.0 * _unit_noise(self.task.seed, run.run_id, salt)), 1)
    p = min(1.0, run.trained_h / self.task.hours_needed)
    score = 25.0 + 65.0 * p * p
    if self.task.noisy_labels and run.data == "raw":
      score -= 80.0 * self.task.noise_rate
    if not self.task.noisy_labels and run.data == "filtered":
      score -= 2.0  # filtering clean data only throws examples away
    score += 2.0 * _unit_noise(self.task.seed, run.run_id, salt)
    return round(min(100.0, max(0.0, score)), 1)

  def _footer(self) -> str:
    left = self.task.max_submissions - len(self.submissions)
    return f"[clock {self.t:.2f}h / {self.task.time_budget_h:.0f}h | submissions left: {left}]"

  def _next_id(self, prefix: str) -> str:
    self.counter += 1
    return f"{prefix}{self.counter}"

  def _describe_run(self, run: _Run) -> str:
    """The run's status line; what it shows is also recorded in `runs_seen`."""
    loss = self._loss(run)
    recent = ", ".join("nan" if math.isnan(x) else f"{x:.3f}" for x in run.losses[-4:])
    shown = lambda x: None if math.isnan(x) else float(f"{x:.3f}")  # noqa: E731
    self._step_info.setdefault("runs_seen", []).append(
      {
        "run_id": run.run_id,
        "status": run.status,
        "train_loss": shown(loss),
        "recent_losses": [shown(x) for x in run.losses[-4:]],
      }
    )
    return (
      f"run {run.run_id}: status={run.status} gpu={run.gpu} data={run.data} "
      f"lr={run.config['learning_rate']:g} batch_size={run.config['batch_size']:g} "
      f"elapsed={self.t - run.started_at:.2f}h step={int(run.trained_h * 1000)} "
      f"train_loss={'nan' if math.isnan(loss) else f'{loss:.3f}'} "
      f"recent_losses=[{recent}]"
    )

  # ------------------------------------------------------------------ tools
  def _tool_list_files(self) -> str:
    return "README.md\nconfig.yaml\ndata/DATA_CARD.md\ndata/train.jsonl\ndata/dev.jsonl"

  def _tool_read_file(self, path: str) -> str:
    t = self.task
    if path == "README.md":
      return (
        f"# {t.domain} on {t.dataset}\nBaseline recipe: train.py with config.yaml "
        f"on one GPU. Report {t.metric} on the hidden test set via submit. "
        f"{NUM_GPUS} GPUs are available to this project."
      )
    if path == "config.yaml":
      return "\n".join(f"{k}: {v:g}" for k, v in self.config.items())
    if path == "data/DATA_CARD.md":
      note = (
        "Labels were crowd-sourced in one pass without adjudication."
        if t.noisy_labels
        else "Labels were double-annotated and adjudicated."
      )
      return f"# Data card\n{t.dataset}: 48k train / 4k dev examples. {note}"
    if path in ("data/train.jsonl", "data/dev.jsonl"):
      return "ERROR: file too large to print; use inspect_data."
    return f"ERROR: no such file {path!r}."

  def _tool_inspect_data(self, split: str = "train") -> str:
    t = self.task
    agreement = 1.0 - t.noise_rate if (t.noisy_labels and split == "train") else 0.97
    if split == "train" and self.filtered_ready:
      return (
        "train (filtered): 41k examples, label agreement with a reference "
        "annotator on 200 examples: 96%."
      )
    return (
      f"{split}: {48000 if split == 'train' else 4000} examples, 12 classes, "
      f"label agreement with a reference annotator on 200 examples: "
      f"{100 * agreement:.0f}%."
    )

  def _tool_gpu_status(self) -> str:
    lines = []
    for gpu in range(NUM_GPUS):
      mine = [r.run_id for r in self.runs.values() if r.status == "running" and r.gpu == gpu]
      foreign = 1 if (self.task.gpu_conflict and gpu == 0) else 0
      util = min(100, 60 * foreign + 95 * len(mine))
      lines.append(
        f"gpu{gpu}: utilization={util}% your_runs={mine or 'none'} other_processes={foreign}"
      )
    return "\n".join(lines)

  def _tool_set_config(self, key: str, value: float) -> str:
    if key == "learning_rate" and not 1e-6 <= value <= 1.0:
      return "ERROR: learning_rate must be in [1e-6, 1]."
    self.config[key] = float(value)
    return f"config.yaml: {key} set to {value:g} (applies to runs launched from now on)."

  def _tool_launch_run(self, gpu: int, data: str = "raw") -> str:
    if data == "filtered" and not self.filtered_ready:
      return "ERROR: no filtered data yet; run filter_labels and wait for it to finish."
    active = [r for r in self.runs.values() if r.status == "running"]
    if len(active) >= MAX_CONCURRENT_RUNS:
      return f"ERROR: at most {MAX_CONCURRENT_RUNS} runs at once; kill one first."
    run = _Run(
      run_id=self._next_id("r"), gpu=gpu, data=data, config=dict(self.config), started_at=self.t
    )
    if run.config["learning_rate"] > self.task.max_stable_lr * 1.01 and self.task.lr_diverges:
      run.diverge_at_h = 1.0 + 2.0 * abs(_unit_noise(self.task.seed, run.run_id, "div"))
    self.runs[run.run_id] = run
    self._step_info["launched"] = {
      "run_id": run.run_id,
      "gpu": gpu,
      "data": data,
      "config": dict(run.config),
    }
    return f"launched {run.run_id} on gpu{gpu} with data={data} config={json.dumps(run.config)}"

  def _tool_check_run(self, run_id: str) -> str:
    run = self.runs.get(run_id)
    if run is None:
      return f"ERROR: unknown run {run_id!r}; runs: {sorted(self.runs) or 'none'}."
    loss = self._loss(run)
    if run.status == "running":
      run.losses.append(round(loss, 4))
    text = self._describe_run(run)
    if run.status == "diverged":
      text += "\nlog tail: loss became NaN; training stopped."
    elif run.status == "finished":
      text += "\nlog tail: training complete; final checkpoint saved."
    return text

  def _tool_list_jobs(self) -> str:
    lines = [self._describe_run(r) for r in self.runs.values()]
    for j in self.jobs.values():
      left = max(0.0, j.started_at + j.hours - self.t)
      lines.append(
        f"job {j.job_id}: kind={j.kind} status={j.status} "
        f"elapsed={self.t - j.started_at:.2f}h"
        + (f" eta={left:.1f}h" if j.status == "running" else "")
      )
    return "\n".join(lines) or "no runs or jobs."

  def _tool_kill_run(self, run_id: str) -> str:
    run = self.runs.get(run_id)
    if run is None:
      return f"ERROR: unknown run {run_id!r}."
    if run.status != "running":
      return f"run {run_id} is not running (status={run.status})."
    run.status, run.ended_at = "killed", self.t
    self._step_info["killed"] = run_id
    return f"killed {run_id} after {self.t - run.started_at:.2f}h."

  def _tool_filter_labels(self, method: str = "confidence") -> str:
    if any(j.kind == "filter_labels" for j in self.jobs.values()):
      return "filter_labels already started; see list_jobs."
    job = _Job(
      job_id=self._next_id("j"),
      kind="filter_labels",
      started_at=self.t,
      hours=self.task.filter_hours,
    )
    self.jobs[job.job_id] = job
    return (
      f"started job {job.job_id} (filter_labels, method={method}); it runs in the "
      f"background, estimated {job.hours:.1f}h. Then launch runs with data=filtered."
    )

  def _tool_evaluate(self, run_id: str) -> str:
    run = self.runs.get(run_id)
    if run is None:
      return f"ERROR: unknown run {run_id!r}."
    if run.trained_h < 0.5:
      return f"ERROR: run {run_id} has no checkpoint yet."
    score = self._run_score(run, f"eval{self.t:.3f}")
    score = round(min(100.0, max(0.0, score + 2.0 * _unit_noise(self.t, run_id))), 1)
    return f"dev {self.task.metric} of {run_id} (latest checkpoint, status={run.status}): {score}"

  def _tool_submit(self, run_id: str) -> str:
    run = self.runs.get(run_id)
    if run is None:
      return f"ERROR: unknown run {run_id!r}."
    if run.trained_h < 0.5:
      return f"ERROR: run {run_id} has no checkpoint yet."
    score = self._run_score(run, "test")
    self.submissions.append({"run_id": run_id, "score": score, "t": round(self.t, 3)})
    left = self.task.max_submissions - len(self.submissions)
    return (
      f"submission {len(self.submissions)}: test {self.task.metric} of {run_id} = "
      f"{score} ({left} submissions left; best so far "
      f"{max(s['score'] for s in self.submissions)})."
    )

  def _tool_sleep(self, hours: float) -> str:
    start = self.t
    if self.time_scale_s > 0:
      # Real waiting only for demos; interrupt() ends it early. The simulated clock
      # advances by the fraction of the wait that actually happened.
      self._interrupt.clear()
      self._sleeping.set()
      began = time.monotonic()
      try:
        interrupted = self._interrupt.wait(hours * self.time_scale_s)
      finally:
        self._sleeping.clear()
      if interrupted:
        fraction = min(1.0, (time.monotonic() - began) / (hours * self.time_scale_s))
        self._advance(max(0.01, hours * fraction))
        return f"sleep interrupted by the human after {self.t - start:.2f}h."
    self._advance(hours)
    events = [
      f"{r.run_id} {r.status}"
      for r in self.runs.values()
      if r.ended_at is not None and start < r.ended_at <= self.t + 1e-9
    ]
    events += [
      f"job {j.job_id} finished"
      for j in self.jobs.values()
      if j.status == "finished" and start < j.started_at + j.hours <= self.t + 1e-9
    ]
    return f"slept {self.t - start:.2f}h." + (f" Events: {'; '.join(events)}." if events else "")

  def _tool_finish(self) -> str:
    self.finished = True
    return "finished by the agent."


_RUN_ID = {"type": "string", "maxLength": 16, "description": 'e.g. "r3"'}
_TOOLS = (
  env_lib.tool("list_files", "List the files of the project."),
  env_lib.tool(
    "read_file", "Print a project file.", {"path": {"type": "string", "maxLength": 200}}, ["path"]
  ),
  env_lib.tool(
    "inspect_data",
    "Summary statistics of a data split.",
    {"split": {"type": "string", "enum": ["train", "dev"]}},
  ),
  env_lib.tool("gpu_status", "Utilisation and processes of each GPU."),
  env_lib.tool(
    "set_config",
    "Set a training hyperparameter in config.yaml.",
    {"key": {"type": "string", "enum": list(_CONFIG_KEYS)}, "value": {"type": "number"}},
    ["key", "value"],
  ),
  env_lib.tool(
    "launch_run",
    "Start a training run in the background with the current config.",
    {
      "gpu": {"type": "integer", "minimum": 0, "maximum": NUM_GPUS - 1},
      "data": {"type": "string", "enum": ["raw", "filtered"]},
    },
    ["gpu"],
  ),
  env_lib.tool(
    "check_run", "Status, elapsed time and training loss of a run.", {"run_id": _RUN_ID}, ["run_id"]
  ),
  env_lib.tool("list_jobs", "All runs and background jobs."),
  env_lib.tool(
    "kill_run",
    "Stop a running run (its latest checkpoint is kept).",
    {"run_id": _RUN_ID},
    ["run_id"],
  ),
  env_lib.tool(
    "filter_labels",
    "Start a background job that removes likely-wrong training labels.",
    {"method": {"type": "string", "enum": ["confidence", "agreement"]}},
  ),
  env_lib.tool(
    "evaluate",
    "Dev-set score of a run's latest checkpoint (takes 0.5h).",
    {"run_id": _RUN_ID},
    ["run_id"],
  ),
  env_lib.tool(
    "submit",
    "Submit a run's latest checkpoint for the test score (limited submissions).",
    {"run_id": _RUN_ID},
    ["run_id"],
  ),
  env_lib.tool(
    "sleep",
    f"Wait (at most {MAX_SLEEP_HOURS:g} hours per call).",
    {"hours": {"type": "number", "minimum": 0.05, "maximum": MAX_SLEEP_HOURS}},
    ["hours"],
  ),
  env_lib.tool("finish", "End the episode now; your best submission counts."),
)
