"""The rollout service: many concurrent sessions, an HTTP API, live updates.

`SessionManager` runs each session's `agent.Rollout` in its own thread (model calls
and tool commands block on I/O, so threads overlap them fine) and exposes the
control operations; `RolloutHTTPServer` puts them behind a JSON API on
`http.server.ThreadingHTTPServer` (standard library only).

HTTP API (all bodies and answers are JSON; errors are `{"error": "..."}` with a 4xx
status; POST bodies must be `Content-Type: application/json`, at most 64 KiB):

    GET  /api/health                         {"ok": true, "sessions": N}
    GET  /api/sessions                       {"sessions": [session, ...]}
    POST /api/sessions                       create and start a session; body:
         {"env": "research", "seed": 3, "backend": "scripted",
          "env_options": {...}, "backend_options": {...},
          "agent": {"max_steps": 400, "context_token_threshold": 100000},
          "paused": false, "session_id": optional}              -> 201 session
    GET  /api/sessions/{id}                  session, with its guidance and counts
    GET  /api/sessions/{id}/steps?since=-1&limit=200&full=0      {"steps": [...]}
    GET  /api/sessions/{id}/steps/{i}        one step with its exact messages
    POST /api/sessions/{id}/guidance         {"text": "...", "client_msg_id": opt.}
                                             -> 202 {"guidance": {...}, "created": bool}
    GET  /api/sessions/{id}/guidance         {"guidance": [...]}
    POST /api/sessions/{id}/pause | resume | interrupt | stop          -> 200
                                             (resume also restarts a failed session
                                             from its last completed step)
    POST /api/sessions/{id}/steps/{i}/flag   {"flag": "good"|"bad"|null, "reason": "..."}
    GET  /api/sessions/{id}/events           server-sent events: `step` (one per
                                             stored step, id = step index), `session`
                                             (status/guidance/flag changes), `end`
    GET  /api/sessions/{id}/export.jsonl     one JSON line per step
    GET  /                                   the web console

Errors: 400 malformed JSON or invalid fields, 401 missing/wrong token, 403 foreign
Host header, 404 unknown session/step/route, 409 guidance or control sent to a
finished session, 413 body or guidance text too large, 415 non-JSON body.

Access: the server binds 127.0.0.1 by default and then needs no token. Binding any
other address requires a token; every request that does not come from loopback
must then carry `Authorization: Bearer <token>` (or `?token=` for the console and
its event stream, which cannot set headers). Unauthenticated loopback requests
must name a loopback Host, which defeats DNS-rebinding pages in a local browser.
"""

from __future__ import annotations

import dataclasses
import hmac
import http.server
import ipaddress
import json
import os
import re
import threading
import time
import traceback
import urllib.parse
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

MAX_BODY_BYTES = 64 * 1024
MAX_GUIDANCE_CHARS = 8000
CONSOLE_DIR = os.path.join(os.path.dirname(__file__), "console")

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
  """An error with an HTTP status, raised by the manager and the request parser."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
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


class LocalClient:
  """`simulated_human.RolloutAPI` over a manager in this process (no HTTP)."""

  def __init__(self, manager: SessionManager):
    self.manager = manager

  def get_session(self, session_id: str) -> dict[str, Any]:
    return self.manager.session_json(session_id)

  def get_steps(self, session_id: str, since: int = -1) -> list[dict[str, Any]]:
    return [
      s.to_json(full=False)
      for s in self.manager.store.get_steps(session_id, since=since, full=False)
    ]

  def send_guidance(
    self,
    session_id: str,
    text: str,
    source: str = "human",
    client_msg_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    message, created = self.manager.send_guidance(session_id, text, source, client_msg_id, meta)
    return {"guidance": message.to_json(), "created": created}

  def flag_step(
    self, session_id: str, step_index: int, flag: str | None, reason: str | None = None
  ) -> dict[str, Any]:
    self.manager.flag(session_id, step_index, flag, reason)
    return {"ok": True}


# --------------------------------------------------------------------------- HTTP


def is_loopback(address: str) -> bool:
  try:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback
  except ValueError:
    return address == "localhost"


def check_access(
  client_ip: str,
  host_header: str | None,
  auth_header: str | None,
  query_token: str | None,
  token: str | None,
  trust_loopback: bool = True,
) -> tuple[int, str] | None:
  """Access rule of the API; returns (status, error) to refuse, None to allow."""
  if trust_loopback and is_loopback(client_ip):
    host = (
      (host_header or "").rsplit(":", 1)[0]
      if not (host_header or "").startswith("[")
      else (host_header or "").split("]")[0] + "]"
    )
    if host not in ("127.0.0.1", "localhost", "[::1]", ""):
      return 403, f"Host {host_header!r} is not a loopback name"
    return None
  if token is None:
    return 401, "this server accepts local requests only (no token configured)"
  supplied = None
  if auth_header and auth_header.startswith("Bearer "):
    supplied = auth_header[len("Bearer ") :].strip()
  elif query_token:
    supplied = query_token
  if supplied is None or not hmac.compare_digest(supplied.encode(), token.encode()):
    return 401, "missing or wrong token (send Authorization: Bearer <token>)"
  return None


class _Handler(http.server.BaseHTTPRequestHandler):
  server: RolloutHTTPServer
  protocol_version = "HTTP/1.1"

  # Silence per-request logging; the store is the record.
  def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
    del format, args

  # ---------------------------------------------------------------- helpers
  def _send_json(self, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    if status >= 400:
      # A refused request's body may be unread; closing keeps the stream in sync.
      self.close_connection = True
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(body)

  def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _read_json(self) -> Any:
    length = self.headers.get("Content-Length")
    if length is None:
      if self.headers.get("Transfer-Encoding"):
        self.close_connection = True
        raise ApiError(411, "send a Content-Length (chunked bodies are not accepted)")
      return {}
    try:
      size = int(length)
    except ValueError:
      self.close_connection = True
      raise ApiError(400, "bad Content-Length") from None
    if size > MAX_BODY_BYTES:
      # The body is not read; closing the connection keeps the stream in sync.
      self.close_connection = True
      raise ApiError(413, f"body of {size} bytes exceeds the limit of {MAX_BODY_BYTES}")
    raw = self.rfile.read(size) if size else b""
    if not raw:
      return {}
    content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
      raise ApiError(415, "Content-Type must be application/json")
    try:
      return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ApiError(400, f"malformed JSON: {e}") from None

  def _authorize(self, query: Mapping[str, list[str]]) -> bool:
    refusal = check_access(
      self.client_address[0],
      self.headers.get("Host"),
      self.headers.get("Authorization"),
      (query.get("token") or [None])[0],
      self.server.token,
      self.server.trust_loopback,
    )
    if refusal is not None:
      self._send_json(refusal[0], {"error": refusal[1]})
      return False
    return True

  def do_GET(self) -> None:  # pylint: disable=invalid-name
    self._dispatch("GET")

  def do_POST(self) -> None:  # pylint: disable=invalid-name
    self._dispatch("POST")

  def do_PUT(self) -> None:  # pylint: disable=invalid-name
    self._dispatch("PUT")

  def do_DELETE(self) -> None:  # pylint: disable=invalid-name
    self._dispatch("DELETE")

  def _dispatch(self, method: str) -> None:
    url = urllib.parse.urlsplit(self.path)
    query = urllib.parse.parse_qs(url.query)
    try:
      if not self._authorize(query):
        return
      for route_method, pattern, handler in _ROUTES:
        match = pattern.fullmatch(url.path)
        if match:
          if route_method != method:
            continue
          handler(self, query, *match.groups())
          return
      if any(p.fullmatch(url.path) for _, p, _ in _ROUTES):
        raise ApiError(405, f"{method} is not allowed on {url.path}")
      raise ApiError(404, f"no route {method} {url.path}")
    except ApiError as e:
      self._send_json(e.status, {"error": e.message})
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      self._send_json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

  # ---------------------------------------------------------------- routes
  def h_console(self, query: Any, name: str | None = None) -> None:
    del query
    name = name or "index.html"
    path = os.path.join(CONSOLE_DIR, os.path.basename(name))
    if not os.path.isfile(path):
      raise ApiError(404, f"no console file {name!r}")
    kind = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}.get(
      os.path.splitext(path)[1], "application/octet-stream"
    )
    with open(path, "rb") as f:
      self._send_bytes(200, f.read(), kind + "; charset=utf-8")

  def h_health(self, query: Any) -> None:
    del query
    self._send_json(200, {"ok": True, "sessions": len(self.server.manager.store.list_sessions())})

  def h_list(self, query: Any) -> None:
    del query
    manager = self.server.manager
    self._send_json(
      200,
      {
        "sessions": [
          manager.session_json(s.session_id, detail=False) for s in manager.store.list_sessions()
        ]
      },
    )

  def h_create(self, query: Any) -> None:
    del query
    session = self.server.manager.create_session(self._read_json())
    self._send_json(201, self.server.manager.session_json(session.session_id))

  def h_session(self, query: Any, sid: str) -> None:
    del query
    self._send_json(200, self.server.manager.session_json(sid))

  def h_steps(self, query: Mapping[str, list[str]], sid: str) -> None:
    self.server.manager.session(sid)
    try:
      since = int((query.get("since") or ["-1"])[0])
      limit = min(1000, int((query.get("limit") or ["200"])[0]))
    except ValueError:
      raise ApiError(400, "since and limit must be integers") from None
    full = (query.get("full") or ["0"])[0] in ("1", "true")
    steps = self.server.manager.store.get_steps(sid, since=since, limit=limit, full=full)
    self._send_json(200, {"steps": [s.to_json(full=full) for s in steps]})

  def h_step(self, query: Any, sid: str, index: str) -> None:
    del query
    self.server.manager.session(sid)
    step = self.server.manager.store.get_step(sid, int(index))
    if step is None:
      raise ApiError(404, f"session {sid!r} has no step {index}")
    self._send_json(200, step.to_json())

  def h_guidance_post(self, query: Any, sid: str) -> None:
    del query
    body = self._read_json()
    if not isinstance(body, dict):
      raise ApiError(400, "body must be a JSON object")
    unknown = sorted(set(body) - {"text", "client_msg_id", "source", "meta"})
    if unknown:
      raise ApiError(400, f"unknown field(s) {unknown}")
    message, created = self.server.manager.send_guidance(
      sid,
      body.get("text"),
      body.get("source", "human"),
      body.get("client_msg_id"),
      body.get("meta"),
    )
    self._send_json(202, {"guidance": message.to_json(), "created": created})

  def h_guidance_list(self, query: Any, sid: str) -> None:
    del query
    self.server.manager.session(sid)
    self._send_json(
      200, {"guidance": [g.to_json() for g in self.server.manager.store.list_guidance(sid)]}
    )

  def h_control(self, query: Any, sid: str, what: str) -> None:
    del query
    self._read_json()  # accept (and ignore) an empty JSON body
    manager = self.server.manager
    result: dict[str, Any] = {"ok": True}
    if what == "interrupt":
      result["interrupted"] = manager.interrupt(sid)
    else:
      getattr(manager, what)(sid)
    self._send_json(200, result)

  def h_flag(self, query: Any, sid: str, index: str) -> None:
    del query
    body = self._read_json()
    if not isinstance(body, dict) or "flag" not in body:
      raise ApiError(400, 'body must be {"flag": "good"|"bad"|null, "reason": "..."}')
    self.server.manager.flag(sid, int(index), body["flag"], body.get("reason"))
    self._send_json(200, {"ok": True})

  def h_export(self, query: Any, sid: str | None = None) -> None:
    del query
    store = self.server.manager.store
    if sid is not None:
      self.server.manager.session(sid)
    ids = [sid] if sid else [s.session_id for s in store.list_sessions()]
    body = "".join(line + "\n" for line in store.iter_export(ids)).encode()
    self._send_bytes(200, body, "application/x-ndjson")

  def h_events(self, query: Mapping[str, list[str]], sid: str) -> None:
    manager = self.server.manager
    manager.session(sid)
    try:
      last = int(self.headers.get("Last-Event-ID") or (query.get("since") or ["-1"])[0])
    except ValueError:
      raise ApiError(400, "since must be an integer") from None
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-store")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
    version, status = -1, "created"
    self._last_write = time.monotonic()
    while not manager.closing and not self.server.closing:
      current = manager.version(sid)
      steps = manager.store.get_steps(sid, since=last, limit=200, full=False)
      for step in steps:
        self._event("step", step.to_json(full=False), event_id=str(step.step_index))
        last = step.step_index
      if current != version:
        session = manager.session_json(sid)
        self._event("session", session)
        version, status = current, session["status"]
      if status not in storage_lib.ACTIVE_STATUSES and not steps:
        self._event("end", {"status": status})
        return
      if len(steps) == 200:
        continue  # catching up: no waiting
      # Short waits so a stopping server is noticed; a comment line every 15 s keeps
      # proxies from closing an idle stream.
      if (
        manager.wait_for_change(sid, current, timeout=1.0) == current
        and time.monotonic() - self._last_write > 15.0
      ):
        self.wfile.write(b": keepalive\n\n")
        self.wfile.flush()
        self._last_write = time.monotonic()

  def _event(self, kind: str, data: Any, event_id: str | None = None) -> None:
    chunk = ""
    if event_id is not None:
      chunk += f"id: {event_id}\n"
    chunk += f"event: {kind}\ndata: {json.dumps(data)}\n\n"
    self.wfile.write(chunk.encode())
    self.wfile.flush()
    self._last_write = time.monotonic()


_SID = r"([A-Za-z0-9_-]{1,64})"
_ROUTES = [
  ("GET", re.compile(r"/"), _Handler.h_console),
  ("GET", re.compile(r"/console/([\w.-]+)"), _Handler.h_console),
  ("GET", re.compile(r"/api/health"), _Handler.h_health),
  ("GET", re.compile(r"/api/sessions"), _Handler.h_list),
  ("POST", re.compile(r"/api/sessions"), _Handler.h_create),
  ("GET", re.compile(r"/api/export\.jsonl"), _Handler.h_export),
  ("GET", re.compile(rf"/api/sessions/{_SID}"), _Handler.h_session),
  ("GET", re.compile(rf"/api/sessions/{_SID}/steps"), _Handler.h_steps),
  ("GET", re.compile(rf"/api/sessions/{_SID}/steps/(\d+)"), _Handler.h_step),
  ("POST", re.compile(rf"/api/sessions/{_SID}/steps/(\d+)/flag"), _Handler.h_flag),
  ("POST", re.compile(rf"/api/sessions/{_SID}/guidance"), _Handler.h_guidance_post),
  ("GET", re.compile(rf"/api/sessions/{_SID}/guidance"), _Handler.h_guidance_list),
  ("POST", re.compile(rf"/api/sessions/{_SID}/(pause|resume|interrupt|stop)"), _Handler.h_control),
  ("GET", re.compile(rf"/api/sessions/{_SID}/events"), _Handler.h_events),
  ("GET", re.compile(rf"/api/sessions/{_SID}/export\.jsonl"), _Handler.h_export),
]


class RolloutHTTPServer(http.server.ThreadingHTTPServer):
  """The HTTP API over a `SessionManager` (see the module docstring)."""

  daemon_threads = True

  def __init__(
    self,
    manager: SessionManager,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    trust_loopback: bool = True,
  ):
    if not is_loopback(host) and not token:
      raise ValueError(f"binding {host!r} exposes the service beyond this machine: set a token")
    self.manager = manager
    self.token = token
    self.trust_loopback = trust_loopback
    self.closing = False
    self._thread: threading.Thread | None = None
    super().__init__((host, port), _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> RolloutHTTPServer:
    """Serves in a background thread."""
    self._thread = threading.Thread(
      target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="rollout-http", daemon=True
    )
    self._thread.start()
    return self

  def stop(self) -> None:
    self.closing = True
    with self.manager._changed:  # pylint: disable=protected-access
      self.manager._changed.notify_all()  # pylint: disable=protected-access
    self.shutdown()
    self.server_close()


class StoreClient:
  """`simulated_human.RolloutAPI` straight on a store (no manager, no threads).

  Used where rollouts run synchronously in the caller's thread (measurements,
  tests); applies the same rules as the API: guidance only to active sessions.
  """

  def __init__(self, store: storage_lib.TrajectoryStore):
    self.store = store

  def get_session(self, session_id: str) -> dict[str, Any]:
    session = self.store.get_session(session_id)
    if session is None:
      raise ApiError(404, f"unknown session {session_id!r}")
    data = session.to_json()
    data["guidance"] = [g.to_json() for g in self.store.list_guidance(session_id)]
    return data

  def get_steps(self, session_id: str, since: int = -1) -> list[dict[str, Any]]:
    return [
      s.to_json(full=False) for s in self.store.get_steps(session_id, since=since, full=False)
    ]

  def send_guidance(
    self,
    session_id: str,
    text: str,
    source: str = "human",
    client_msg_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    session = self.store.get_session(session_id)
    if session is None or session.status not in storage_lib.ACTIVE_STATUSES:
      raise ApiError(409, f"session {session_id!r} is not active")
    message, created = self.store.add_guidance(session_id, text, source, client_msg_id, meta)
    return {"guidance": message.to_json(), "created": created}

  def flag_step(
    self, session_id: str, step_index: int, flag: str | None, reason: str | None = None
  ) -> dict[str, Any]:
    if not self.store.set_flag(session_id, step_index, flag, reason):
      raise ApiError(404, f"session {session_id!r} has no step {step_index}")
    return {"ok": True}
