"""The session manager: many concurrent rollouts, steered while they run.

`SessionManager` runs each session's `agent.Rollout` in its own thread (model calls
and tool commands block on I/O, so threads overlap them fine) and offers the
operations a supervising human needs: create, pause, resume (also a failed
session, from its last completed step), interrupt the running command, stop,
send guidance that the agent sees at its next turn, and flag steps. It validates
every request (pydantic models: `SessionSpec`, `AgentOptions`, the per-environment
and per-backend option models) and raises `ApiError` with the HTTP status the API
answers with and the field at fault, so the HTTP API (`app`) and the in-process
client (`client.LocalClient`) apply the same rules. A change feed (`version`,
`wait_for_change`, `changes_since`, `add_watcher`) lets event streams follow a session
and send only what changed.

Only the operator chooses what runs. Backends are configured when the manager is
made (`BackendProfile`: a registry factory plus the options the operator fixes, such
as the server URL, the model and the name of the API-key variable); a session names
one and may set only that backend's harmless knobs (temperature, token limits, the
scripted policy's latency). Environments that run commands (`workspace`) can be
created only where the operator enabled them (`envs`).

`lock_workdir` takes an exclusive lock file in a work directory, so that a second
service process on the same directory refuses to start instead of corrupting it.

This is the asynchronous rollout service of Apollo (D. Fu et al., "Interaction as
Intelligence Part II: Asynchronous Human-Agent Rollout for Long-Horizon Task
Training", arXiv 2510.27630, 2025): the human never blocks the agent, and the
agent never waits for the human.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pydantic

from apollo.agents import agent as agent_lib
from apollo.agents import env as env_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib
from apollo.agents.backends import registry as backend_registry
from apollo.agents.envs import research as research_env
from apollo.agents.envs import workspace as workspace_env

MAX_GUIDANCE_CHARS = 8000
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Changes kept per session for event streams; a stream further behind resynchronises.
CHANGE_LOG_SIZE = 512
LOCK_FILE = "service.lock"

EnvFactory = Callable[..., env_lib.Environment]


def _research_factory(session_id: str, workdir: str, **options: Any) -> env_lib.Environment:
  del session_id, workdir
  return research_env.ResearchEnv(**options)


def _workspace_factory(session_id: str, workdir: str, **options: Any) -> env_lib.Environment:
  return workspace_env.WorkspaceEnv(root=os.path.join(workdir, "workspaces", session_id), **options)


ENV_FACTORIES: dict[str, EnvFactory] = {
  "research": _research_factory,
  "workspace": _workspace_factory,
}
# Environments whose tools run commands on this machine: the API creates them only
# where the operator enabled them, and with the token even from loopback.
COMMAND_ENVS = frozenset({"workspace"})
# Environments the API may create when the operator says nothing.
DEFAULT_ENVS = ("research",)
# Backend options only the operator sets (in a `BackendProfile`), never a request.
OPERATOR_BACKEND_OPTIONS = frozenset(
  {"base_url", "api_key", "api_key_env", "model", "checkpoint", "tokenizer", "model_cache_dir"}
)


class ApiError(Exception):
  """A refused request, with its HTTP status and, for invalid input, the field at
  fault (`agent.max_steps`): raised by the manager, the HTTP API's request parser
  and every client (`client.RolloutAPI`), local or remote."""

  def __init__(self, status: int, message: str, field: str | None = None):
    super().__init__(f"HTTP {status}: {message}")
    self.status = status
    self.message = message
    self.field = field

  def to_json(self) -> dict[str, Any]:
    return {"error": self.message, **({"field": self.field} if self.field else {})}


class WorkdirLocked(RuntimeError):
  """Another process serves the same work directory."""


def lock_workdir(workdir: str) -> Any:
  """Takes the exclusive lock of `workdir` (`service.lock`, `fcntl.flock`) for as
  long as the returned file stays open; raises `WorkdirLocked` if another process
  (or another open of the file) holds it. The lock ends with the process."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise WorkdirLocked(
      f"{workdir} is in use by {holder} (lock file {path}); stop it or choose another --workdir"
    ) from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()}\n")
  f.flush()
  return f


# ---------------------------------------------------------------------- request models
class _Options(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")


class AgentOptions(_Options):
  """`agent` of a session: the `agent.AgentConfig` knobs a request may set."""

  max_steps: int = pydantic.Field(agent_lib.AgentConfig.max_steps, ge=1, le=100_000)
  context_token_threshold: int = pydantic.Field(
    agent_lib.AgentConfig.context_token_threshold, ge=256, le=10_000_000
  )
  max_observation_chars: int = pydantic.Field(
    agent_lib.AgentConfig.max_observation_chars, ge=100, le=1_000_000
  )
  summarizer: Literal["rule-based", "model"] = agent_lib.AgentConfig.summarizer
  tool_mode: Literal["native", "text"] | None = pydantic.Field(
    None, description="native tool calls or JSON in the text; null: the backend's"
  )


class SessionSpec(_Options):
  """The body of POST /api/sessions."""

  env: str = pydantic.Field("research", description="an environment the operator enabled")
  seed: int = pydantic.Field(0, ge=0, le=2**62)
  backend: str = pydantic.Field("scripted", description="a backend the operator configured")
  env_options: dict[str, Any] = pydantic.Field(
    default_factory=dict, description="the environment's options (see ENV_OPTIONS)"
  )
  backend_options: dict[str, Any] = pydantic.Field(
    default_factory=dict, description="the backend's per-session knobs (see BACKEND_OPTIONS)"
  )
  agent: AgentOptions = pydantic.Field(default_factory=AgentOptions)
  paused: bool = False
  session_id: str | None = pydantic.Field(None, pattern=SESSION_ID_PATTERN)


class ResearchEnvOptions(_Options):
  time_scale_s: float = pydantic.Field(0.0, ge=0.0, le=60.0)


class WorkspaceEnvOptions(_Options):
  time_budget_s: float = pydantic.Field(3600.0, gt=0.0, le=7 * 24 * 3600.0)
  command_timeout_s: float = pydantic.Field(600.0, gt=0.0, le=24 * 3600.0)
  max_output_bytes: int = pydantic.Field(1 << 20, ge=1024, le=64 << 20)
  max_observation_chars: int = pydantic.Field(8000, ge=100, le=1_000_000)
  max_sessions: int = pydantic.Field(8, ge=1, le=64)


class ScriptedBackendOptions(_Options):
  latency_s: float = pydantic.Field(0.0, ge=0.0, le=60.0)
  invalid_rate: float = pydantic.Field(0.02, ge=0.0, le=1.0)
  tool_mode: Literal["native", "text"] = "native"


class OpenAIBackendOptions(_Options):
  temperature: float = pydantic.Field(0.6, ge=0.0, le=2.0)
  max_tokens: int = pydantic.Field(4096, ge=1, le=1_000_000)
  tool_choice: Literal["auto", "required"] = "auto"


class FlaxBackendOptions(_Options):
  temperature: float = pydantic.Field(0.7, ge=0.0, le=2.0)
  max_new_tokens: int = pydantic.Field(256, ge=1, le=65_536)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  tool_choice: Literal["auto", "required"] = "auto"


# What a request may put in `env_options` per environment (none for others).
ENV_OPTIONS: dict[str, type[_Options]] = {
  "research": ResearchEnvOptions,
  "workspace": WorkspaceEnvOptions,
}
# What a request may put in `backend_options` per backend factory (none for others).
BACKEND_OPTIONS: dict[str, type[_Options]] = {
  "scripted": ScriptedBackendOptions,
  "openai": OpenAIBackendOptions,
  "flax": FlaxBackendOptions,
}


@dataclasses.dataclass(frozen=True)
class BackendProfile:
  """A backend the operator configured at launch.

  Attributes:
    factory: its name in `backends.registry` ('scripted', 'openai', 'flax').
    options: what the operator fixes (`base_url`, `model`, `api_key_env`, retries...);
      a session's `backend_options` (only `BACKEND_OPTIONS[factory]` fields) are
      applied over them.
  """

  factory: str
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """What the API shows: the factory and the option names, never their values."""
    return {"factory": self.factory, "operator_options": sorted(self.options)}


DEFAULT_BACKENDS: dict[str, BackendProfile] = {"scripted": BackendProfile("scripted")}


def _field_path(prefix: str, loc: Sequence[Any]) -> str:
  return ".".join([prefix, *(str(part) for part in loc)] if prefix else map(str, loc))


def validation_error(e: pydantic.ValidationError, prefix: str = "") -> ApiError:
  """A pydantic error as a 400 that names the first field at fault."""
  errors = e.errors()
  parts = []
  for err in errors:
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    parts.append(f"{_field_path(prefix, err['loc']) or 'body'}: {msg}")
  field = _field_path(prefix, errors[0]["loc"]) if errors else None
  return ApiError(400, "; ".join(parts), field=field or prefix or None)


def _validate(model: type[pydantic.BaseModel], data: Any, prefix: str = "") -> Any:
  try:
    return model.model_validate(data)
  except pydantic.ValidationError as e:
    raise validation_error(e, prefix) from None


@dataclasses.dataclass
class _Live:
  """A session that has a thread in this process."""

  control: agent_lib.SessionControl
  thread: threading.Thread
  error: str | None = None


class SessionManager:
  """Creates, runs, steers and observes sessions; one thread per running session."""

  def __init__(
    self,
    store: storage_lib.TrajectoryStore,
    workdir: str = ".",
    env_factories: Mapping[str, EnvFactory] | None = None,
    listeners: Sequence[agent_lib.StepListener] = (),
    backends: Mapping[str, BackendProfile] | None = None,
    envs: Sequence[str] | None = None,
  ):
    """Args:
    store: where sessions live.
    workdir: per-session directories of environments that need one.
    env_factories: environment name -> factory (default `ENV_FACTORIES`).
    listeners: called with every stored step of every session.
    backends: the backends sessions may name (default: only 'scripted').
    envs: the environments requests may create (default `DEFAULT_ENVS`); list
      'workspace' here only if the service may run commands on this machine.
    """
    self.store = store
    self.workdir = workdir
    self.env_factories = dict(env_factories or ENV_FACTORIES)
    self.listeners = list(listeners)
    self.backends = dict(DEFAULT_BACKENDS if backends is None else backends)
    self.envs = tuple(DEFAULT_ENVS if envs is None else envs)
    for name in self.envs:
      if name not in self.env_factories:
        raise ValueError(f"unknown env {name!r}; known: {sorted(self.env_factories)}")
    for name, profile in self.backends.items():
      if profile.factory not in backend_registry.known_backends():
        raise ValueError(
          f"backend {name!r}: unknown factory {profile.factory!r}; "
          f"known: {backend_registry.known_backends()}"
        )
    self._live: dict[str, _Live] = {}
    self._lock = threading.Lock()
    self._changed = threading.Condition()
    self._versions: dict[str, int] = {}
    self._changes: dict[str, collections.deque[tuple[int, dict[str, Any]]]] = {}
    self._forgotten: dict[str, int] = {}  # newest version dropped from the change log
    self._watchers: list[Callable[[str], None]] = []
    self.closing = False

  # ------------------------------------------------------------------ change feed
  def notify(self, session_id: str, change: Mapping[str, Any] | None = None) -> None:
    """Bumps the session's version and logs `change` for streams that send what
    changed: `{"step": 7}` (a new step), `{"guidance": 3}` (sent or delivered),
    `{"flag": 7}`, or by default `{"session": True}` (status, control: anything)."""
    with self._changed:
      version = self._versions.get(session_id, 0) + 1
      self._versions[session_id] = version
      log = self._changes.setdefault(session_id, collections.deque(maxlen=CHANGE_LOG_SIZE))
      if len(log) == log.maxlen:
        self._forgotten[session_id] = log[0][0]
      log.append((version, dict(change) if change is not None else {"session": True}))
      self._changed.notify_all()
      watchers = list(self._watchers)
    for watcher in watchers:
      try:
        watcher(session_id)
      except Exception:  # pylint: disable=broad-except
        traceback.print_exc()  # a watcher's bug must not stop a rollout

  def add_watcher(self, watcher: Callable[[str], None]) -> Callable[[], None]:
    """Calls `watcher(session_id)` after every change (from the changing thread);
    returns a function that removes it."""
    with self._changed:
      self._watchers.append(watcher)

    def remove() -> None:
      with self._changed:
        if watcher in self._watchers:
          self._watchers.remove(watcher)

    return remove

  def version(self, session_id: str) -> int:
    with self._changed:
      return self._versions.get(session_id, 0)

  def changes_since(self, session_id: str, version: int) -> tuple[int, list[dict[str, Any]] | None]:
    """(current version, the logged changes after `version`), or (current, None) when
    some of them were dropped from the log (the caller resynchronises)."""
    with self._changed:
      current = self._versions.get(session_id, 0)
      if self._forgotten.get(session_id, 0) > version:
        return current, None
      return current, [c for v, c in self._changes.get(session_id, ()) if v > version]

  def wait_for_change(self, session_id: str, version: int, timeout: float) -> int:
    """Blocks until the session's version differs from `version` (or timeout)."""
    with self._changed:
      self._changed.wait_for(
        lambda: self._versions.get(session_id, 0) != version or self.closing, timeout
      )
      return self._versions.get(session_id, 0)

  # ------------------------------------------------------------------ lifecycle
  def validate_spec(self, spec: Any) -> SessionSpec:
    """Checks a POST /api/sessions body completely (options included) before anything
    is stored; raises `ApiError` (400, naming the field) otherwise."""
    if isinstance(spec, SessionSpec):
      spec = spec.model_dump(exclude_unset=True)
    if not isinstance(spec, Mapping):
      raise ApiError(400, "body must be a JSON object", field="body")
    parsed = _validate(SessionSpec, spec)
    if parsed.env not in self.envs:
      known = sorted(self.env_factories)
      why = (
        "unknown env" if parsed.env not in self.env_factories else "env not enabled by the operator"
      )
      raise ApiError(
        400,
        f"env: {why} {parsed.env!r}; this service creates {list(self.envs)} (known: {known})",
        field="env",
      )
    _validate(ENV_OPTIONS.get(parsed.env, _Options), parsed.env_options, "env_options")
    profile = self.backends.get(parsed.backend)
    if profile is None:
      raise ApiError(
        400,
        f"backend: unknown backend {parsed.backend!r}; the operator configured "
        f"{sorted(self.backends)}",
        field="backend",
      )
    for key in parsed.backend_options:
      if key in OPERATOR_BACKEND_OPTIONS:
        raise ApiError(
          400,
          f"backend_options.{key}: set by the operator when the service starts, never by a "
          "request (server URLs, models and API keys, e.g. api_key_env, are launch options); "
          f"choose one of the configured backends {sorted(self.backends)} by name",
          field=f"backend_options.{key}",
        )
    _validate(
      BACKEND_OPTIONS.get(profile.factory, _Options), parsed.backend_options, "backend_options"
    )
    return parsed

  def create_session(self, spec: Any) -> storage_lib.SessionRecord:
    """Validates `spec` (the POST /api/sessions body), stores and starts a session."""
    parsed = self.validate_spec(spec)
    session_id = parsed.session_id or uuid.uuid4().hex[:12]
    config = {
      "env_options": dict(parsed.env_options),
      "backend_options": dict(parsed.backend_options),
      "agent": parsed.agent.model_dump(exclude_unset=True),
    }
    record = storage_lib.SessionRecord(
      session_id=session_id,
      env_name=parsed.env,
      seed=parsed.seed,
      backend=parsed.backend,
      config=config,
    )
    if not self.store.create_session(record):
      raise ApiError(409, f"session {session_id!r} already exists", field="session_id")
    self.start(session_id, paused=parsed.paused)
    return self.store.get_session(session_id)

  def make_backend(self, session: storage_lib.SessionRecord) -> Any:
    """The session's backend: its operator profile with the session's knobs over it."""
    profile = self.backends.get(session.backend)
    if profile is None:
      raise ValueError(
        f"backend {session.backend!r} is not configured in this service "
        f"(configured: {sorted(self.backends)})"
      )
    options = {**profile.options, **session.config.get("backend_options", {})}
    return backend_registry.make_backend(profile.factory, seed=session.seed, **options)

  def start(self, session_id: str, paused: bool = False) -> None:
    """Starts (or resumes from its last step) a stored session in a thread."""
    session = self.store.get_session(session_id)
    if session is None:
      raise ApiError(404, f"unknown session {session_id!r}")
    with self._lock:
      live = self._live.get(session_id)
      if live is not None and live.thread.is_alive():
        return
      control = agent_lib.SessionControl(paused=paused)
      thread = threading.Thread(
        target=self._run, args=(session_id, control), name=f"rollout-{session_id}", daemon=True
      )
      self._live[session_id] = _Live(control=control, thread=thread)
    thread.start()

  def _run(self, session_id: str, control: agent_lib.SessionControl) -> None:
    error = None
    try:
      session = self.store.get_session(session_id)
      # Operator-only options (e.g. unsafe_no_sandbox) are bound into the factory.
      env = self.env_factories[session.env_name](
        session_id=session_id, workdir=self.workdir, **session.config["env_options"]
      )
      backend = self.make_backend(session)
      config = agent_lib.AgentConfig(**session.config["agent"])
      rollout = agent_lib.Rollout(
        session_id,
        env,
        backend,
        self.store,
        config,
        control=control,
        listeners=[
          lambda step: self.notify(session_id, {"step": step.step_index}),
          *self.listeners,
        ],
        on_status=lambda status: self.notify(session_id),
      )
      rollout.run()
    except BaseException as e:  # pylint: disable=broad-except
      # Anything, even a BaseException from a tool, ends this thread: say so in the
      # store, so the session never shows `running` while nothing runs it.
      traceback.print_exc()
      error = f"{type(e).__name__}: {e}"
    finally:
      self._finish_thread(session_id, control, error)

  def _finish_thread(
    self, session_id: str, control: agent_lib.SessionControl, error: str | None
  ) -> None:
    """Marks a session whose thread ended while it was still active as failed (unless
    a shutdown stopped it, to be resumed by the next process)."""
    shutdown = control.stop_requested and not control.stop_is_final
    if error is None and not shutdown:
      try:
        current = self.store.get_session(session_id)
        if current is not None and current.status in storage_lib.ACTIVE_STATUSES:
          error = "RuntimeError: the rollout thread ended without a final status"
      except Exception as e:  # pylint: disable=broad-except
        error = f"{type(e).__name__}: {e}"
    if error is not None:
      with self._lock:
        if session_id in self._live:
          self._live[session_id].error = error
      try:
        current = self.store.get_session(session_id)
        if current is not None and current.status in storage_lib.ACTIVE_STATUSES:
          self.store.update_session(session_id, status="failed", error=error)
      except Exception:  # pylint: disable=broad-except
        traceback.print_exc()  # `session_json` still reports the failure from memory
    self.notify(session_id)

  def resume_unfinished(self) -> list[str]:
    """Restarts every stored session that was active when the process died."""
    resumed = []
    for session in self.store.list_sessions(storage_lib.ACTIVE_STATUSES):
      if session.session_id in self._live and self._live[session.session_id].thread.is_alive():
        continue
      self.store.log_event(
        session.session_id,
        "resume_after_restart",
        {"status": session.status, "steps": self.store.num_steps(session.session_id)},
      )
      self.start(session.session_id, paused=session.status == "paused")
      resumed.append(session.session_id)
    return resumed

  def join(self, session_ids: Sequence[str] | None = None, timeout: float | None = None) -> bool:
    """Waits for sessions' threads; returns True if all ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._lock:
      lives = [l for sid, l in self._live.items() if session_ids is None or sid in session_ids]
    for live in lives:
      left = None if deadline is None else max(0.0, deadline - time.monotonic())
      live.thread.join(left)
    return not any(l.thread.is_alive() for l in lives)

  def shutdown(self, timeout: float = 10.0) -> None:
    """Stops every running session (their steps so far stay stored) and waits."""
    with self._lock:
      lives = list(self._live.values())
    for live in lives:
      live.control.stop(final=False)
    self.join(timeout=timeout)
    self.closing = True
    self.wake_waiters()

  def wake_waiters(self) -> None:
    """Wakes every `wait_for_change` caller (so it can see that the server stops)."""
    with self._changed:
      self._changed.notify_all()

  # ------------------------------------------------------------------ queries
  def session(self, session_id: str) -> storage_lib.SessionRecord:
    session = self.store.get_session(session_id)
    if session is None:
      raise ApiError(404, f"unknown session {session_id!r}")
    return session

  def session_json(self, session_id: str, detail: bool = True) -> dict[str, Any]:
    session = self.session(session_id)
    data = session.to_json()
    live = self._live.get(session_id)
    alive = bool(live and live.thread.is_alive())
    data["live"] = alive
    data["paused"] = bool(live and live.control.paused)
    if (
      live is not None
      and not alive
      and live.error
      and data["status"] in storage_lib.ACTIVE_STATUSES
    ):
      # The thread died and the store could not be told: report what happened.
      data["status"], data["error"] = "failed", live.error
    description = self.describe_env(session_id)
    data["sandbox"] = description.get("sandbox") if description else None
    if detail and description:
      data["environment"] = description
    data["num_steps"] = self.store.num_steps(session_id)
    if detail:
      guidance = self.store.list_guidance(session_id)
      data["guidance"] = [g.to_json() for g in guidance]
      counts = {source: 0 for source in guidance_lib.SOURCES}
      for g in guidance:
        counts[g.source] = counts.get(g.source, 0) + 1
      data["interventions"] = counts
      steps = self.store.get_steps(session_id, full=False)
      data["flags"] = {f: sum(1 for s in steps if s.human_flag == f) for f in storage_lib.FLAGS}
    return data

  def sandbox(self, session_id: str) -> Any:
    """What the session's environment reports about its sandbox: the `sandbox` entry
    of its `describe()` (e.g. "bubblewrap", or "NONE (unsafe)" where the operator
    turned it off), or None when it reports nothing or does not run in this process."""
    description = self.describe_env(session_id)
    return description.get("sandbox") if description else None

  def describe_env(self, session_id: str) -> dict[str, Any] | None:
    """The running environment's `describe()` (confinement, limits), if it has one."""
    live = self._live.get(session_id)
    env = live.control.env if live is not None else None
    describe = getattr(env, "describe", None)
    if not callable(describe):
      return None
    try:
      return dict(describe())
    except Exception as e:  # pylint: disable=broad-except
      return {"error": f"{type(e).__name__}: {e}"}

  def _require_active(self, session_id: str, what: str) -> storage_lib.SessionRecord:
    session = self.session(session_id)
    if session.status not in storage_lib.ACTIVE_STATUSES:
      raise ApiError(409, f"session {session_id!r} is {session.status}; cannot {what}")
    return session

  # ------------------------------------------------------------------ steering
  def send_guidance(
    self,
    session_id: str,
    text: Any,
    source: Any = "human",
    client_msg_id: Any = None,
    meta: Any = None,
  ) -> tuple[guidance_lib.Guidance, bool]:
    """Buffers a guidance message; returns at once (the agent never blocks us)."""
    if not isinstance(text, str) or not text.strip():
      raise ApiError(400, "text must be a non-empty string")
    if len(text) > MAX_GUIDANCE_CHARS:
      raise ApiError(
        413, f"guidance text has {len(text)} characters; the limit is {MAX_GUIDANCE_CHARS}"
      )
    if source not in guidance_lib.SOURCES:
      raise ApiError(400, f"source must be one of {list(guidance_lib.SOURCES)}")
    if client_msg_id is not None and (
      not isinstance(client_msg_id, str) or len(client_msg_id) > 200
    ):
      raise ApiError(400, "client_msg_id must be a string of at most 200 characters")
    if meta is not None and not isinstance(meta, Mapping):
      raise ApiError(400, "meta must be a JSON object")
    self._require_active(session_id, "receive guidance")
    message, created = self.store.add_guidance(session_id, text, source, client_msg_id, meta)
    self.notify(session_id, {"guidance": message.guidance_id})
    return message, created

  def _control(self, session_id: str, what: str) -> agent_lib.SessionControl:
    self._require_active(session_id, what)
    live = self._live.get(session_id)
    if live is None or not live.thread.is_alive():
      raise ApiError(409, f"session {session_id!r} is not running in this process")
    return live.control

  def pause(self, session_id: str) -> None:
    self._control(session_id, "pause").pause()
    self.store.log_event(session_id, "pause")
    self.notify(session_id)

  def resume(self, session_id: str) -> None:
    """Un-pauses a session; a failed one (or one without a thread here, e.g. after
    the model server came back) is restarted from its last completed step."""
    session = self.session(session_id)
    live = self._live.get(session_id)
    has_thread = live is not None and live.thread.is_alive()
    if session.status == "failed" or (
      session.status in storage_lib.ACTIVE_STATUSES and not has_thread
    ):
      self.store.log_event(
        session_id, "restart", {"status": session.status, "steps": self.store.num_steps(session_id)}
      )
      self.start(session_id)
    else:
      self._control(session_id, "resume").resume()
      self.store.log_event(session_id, "resume")
    self.notify(session_id)

  def interrupt(self, session_id: str) -> bool:
    interrupted = self._control(session_id, "interrupt").interrupt()
    self.store.log_event(session_id, "interrupt", {"interrupted": interrupted})
    self.notify(session_id)
    return interrupted

  def stop(self, session_id: str) -> None:
    self._control(session_id, "stop").stop()
    self.store.log_event(session_id, "stop")
    self.notify(session_id)

  def flag(self, session_id: str, step_index: int, flag: Any, reason: Any) -> None:
    self.session(session_id)
    if flag is not None and flag not in storage_lib.FLAGS:
      raise ApiError(400, f"flag must be one of {list(storage_lib.FLAGS)} or null")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 2000):
      raise ApiError(400, "reason must be a string of at most 2000 characters")
    if not self.store.set_flag(session_id, step_index, flag, reason):
      raise ApiError(404, f"session {session_id!r} has no step {step_index}")
    self.store.log_event(
      session_id, "flag", {"step_index": step_index, "flag": flag, "reason": reason}
    )
    self.notify(session_id, {"flag": step_index})
