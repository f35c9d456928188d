"""The session manager: many concurrent rollouts, steered while they run.

`SessionManager` runs each session's `agent.Rollout` in its own thread (model calls
and tool commands block on I/O, so threads overlap them fine) and offers the
operations a supervising human needs: create, pause, resume (also a failed
session, from its last completed step), interrupt the running command, stop,
send guidance that the agent sees at its next turn, and flag steps. It validates
every request and raises `ApiError` with the HTTP status the API answers with, so
the HTTP API (`http_api`) and the in-process client (`client.LocalClient`) apply
the same rules. A change feed (`version` / `wait_for_change`) lets event streams
follow a session without polling the store in a loop.

This is the asynchronous rollout service of Apollo (D. Fu et al., "Interaction as
Intelligence Part II: Asynchronous Human-Agent Rollout for Long-Horizon Task
Training", arXiv 2510.27630, 2025): the human never blocks the agent, and the
agent never waits for the human.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from apollo.agents import agent as agent_lib
from apollo.agents import env as env_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib
from apollo.agents.backends import registry as backend_registry
from apollo.agents.envs import research as research_env
from apollo.agents.envs import workspace as workspace_env

MAX_GUIDANCE_CHARS = 8000

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


class ApiError(Exception):
  """A refused request, with its HTTP status: raised by the manager, the HTTP API's
  request parser and every client (`client.RolloutAPI`), local or remote."""

  def __init__(self, status: int, message: str):
    super().__init__(f"HTTP {status}: {message}")
    self.status = status
    self.message = message


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
  ):
    self.store = store
    self.workdir = workdir
    self.env_factories = dict(env_factories or ENV_FACTORIES)
    self.listeners = list(listeners)
    self._live: dict[str, _Live] = {}
    self._lock = threading.Lock()
    self._changed = threading.Condition()
    self._versions: dict[str, int] = {}
    self.closing = False

  # ------------------------------------------------------------------ change feed
  def notify(self, session_id: str) -> None:
    with self._changed:
      self._versions[session_id] = self._versions.get(session_id, 0) + 1
      self._changed.notify_all()

  def version(self, session_id: str) -> int:
    with self._changed:
      return self._versions.get(session_id, 0)

  def wait_for_change(self, session_id: str, version: int, timeout: float) -> int:
    """Blocks until the session's version differs from `version` (or timeout)."""
    with self._changed:
      self._changed.wait_for(
        lambda: self._versions.get(session_id, 0) != version or self.closing, timeout
      )
      return self._versions.get(session_id, 0)

  # ------------------------------------------------------------------ lifecycle
  def create_session(self, spec: Mapping[str, Any]) -> storage_lib.SessionRecord:
    """Validates `spec` (the POST /api/sessions body), stores and starts a session."""
    if not isinstance(spec, Mapping):
      raise ApiError(400, "body must be a JSON object")
    allowed = {
      "env",
      "seed",
      "backend",
      "env_options",
      "backend_options",
      "agent",
      "paused",
      "session_id",
    }
    unknown = sorted(set(spec) - allowed)
    if unknown:
      raise ApiError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    env_name = spec.get("env", "research")
    if env_name not in self.env_factories:
      raise ApiError(400, f"unknown env {env_name!r}; known: {sorted(self.env_factories)}")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
      raise ApiError(400, "seed must be a non-negative integer")
    backend = spec.get("backend", "scripted")
    if backend not in backend_registry.known_backends():
      raise ApiError(
        400, f"unknown backend {backend!r}; known: {backend_registry.known_backends()}"
      )
    for key in ("env_options", "backend_options", "agent"):
      if not isinstance(spec.get(key, {}), Mapping):
        raise ApiError(400, f"{key} must be a JSON object")
    if "api_key" in spec.get("backend_options", {}):
      raise ApiError(
        400,
        "do not send api_key (it would be stored); set api_key_env to "
        "the name of an environment variable of the service instead",
      )
    agent_fields = {f.name for f in dataclasses.fields(agent_lib.AgentConfig)}
    bad_agent = sorted(set(spec.get("agent", {})) - agent_fields)
    if bad_agent:
      raise ApiError(400, f"unknown agent option(s) {bad_agent}; allowed: {sorted(agent_fields)}")
    tool_mode = spec.get("agent", {}).get("tool_mode")
    if tool_mode is not None and tool_mode not in agent_lib.TOOL_MODES:
      raise ApiError(400, f"agent.tool_mode must be one of {list(agent_lib.TOOL_MODES)} or null")
    session_id = spec.get("session_id") or uuid.uuid4().hex[:12]
    if not isinstance(session_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session_id):
      raise ApiError(400, "session_id must match [A-Za-z0-9_-]{1,64}")
    config = {
      "env_options": dict(spec.get("env_options", {})),
      "backend_options": dict(spec.get("backend_options", {})),
      "agent": dict(spec.get("agent", {})),
    }
    record = storage_lib.SessionRecord(
      session_id=session_id, env_name=env_name, seed=seed, backend=backend, config=config
    )
    if not self.store.create_session(record):
      raise ApiError(409, f"session {session_id!r} already exists")
    self.start(session_id, paused=bool(spec.get("paused", False)))
    return self.store.get_session(session_id)

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
    session = self.store.get_session(session_id)
    try:
      env = self.env_factories[session.env_name](
        session_id=session_id, workdir=self.workdir, **session.config["env_options"]
      )
      backend = backend_registry.make_backend(
        session.backend, seed=session.seed, **session.config["backend_options"]
      )
      config = agent_lib.AgentConfig(**session.config["agent"])
      rollout = agent_lib.Rollout(
        session_id,
        env,
        backend,
        self.store,
        config,
        control=control,
        listeners=[lambda step: self.notify(session_id), *self.listeners],
        on_status=lambda status: self.notify(session_id),
      )
      rollout.run()
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      self._live[session_id].error = f"{type(e).__name__}: {e}"
      current = self.store.get_session(session_id)
      if current is not None and current.status in storage_lib.ACTIVE_STATUSES:
        self.store.update_session(session_id, status="failed", error=self._live[session_id].error)
    finally:
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
    data["live"] = bool(live and live.thread.is_alive())
    data["paused"] = bool(live and live.control.paused)
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
    self.notify(session_id)
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
    self.notify(session_id)
