"""The HTTP API of the rollout service and its web console.

`RolloutHTTPServer` puts a `manager.SessionManager` behind a JSON API on
`http.server.ThreadingHTTPServer` (standard library only) and serves the console
(`console/`: a live trajectory, guidance, pause / resume, step flags) at `/`.

HTTP API (all bodies and answers are JSON; errors are `{"error": "..."}` with a 4xx
status; POST bodies must be `Content-Type: application/json`, at most 64 KiB):

    GET  /api/health                         {"ok": true, "sessions": N}
    GET  /api/sessions                       {"sessions": [session, ...]}
    POST /api/sessions                       create and start a session; body:
         {"env": "research", "seed": 3, "backend": "scripted",
          "env_options": {...}, "backend_options": {...},
          "agent": {"max_steps": 400, "context_token_threshold": 100000,
                    "tool_mode": "native" | "text" | null (the backend's)},
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
    GET  /api/sessions/{id}/export.jsonl     one JSON line per episode: its trajectory
    GET  /api/export.jsonl                   as OpenAI chat `messages` (tool calls,
                                             tool results, tagged guidance) + `tools`,
                                             `steps`, `guidance` (`storage.episode_record`)
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
from collections.abc import Mapping
from typing import Any

from apollo.agents import storage as storage_lib
from apollo.agents.service import manager as manager_lib

MAX_BODY_BYTES = 64 * 1024
CONSOLE_DIR = os.path.join(os.path.dirname(__file__), "console")


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
        raise manager_lib.ApiError(411, "send a Content-Length (chunked bodies are not accepted)")
      return {}
    try:
      size = int(length)
    except ValueError:
      self.close_connection = True
      raise manager_lib.ApiError(400, "bad Content-Length") from None
    if size > MAX_BODY_BYTES:
      # The body is not read; closing the connection keeps the stream in sync.
      self.close_connection = True
      raise manager_lib.ApiError(413, f"body of {size} bytes exceeds the limit of {MAX_BODY_BYTES}")
    raw = self.rfile.read(size) if size else b""
    if not raw:
      return {}
    content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
      raise manager_lib.ApiError(415, "Content-Type must be application/json")
    try:
      return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise manager_lib.ApiError(400, f"malformed JSON: {e}") from None

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
        raise manager_lib.ApiError(405, f"{method} is not allowed on {url.path}")
      raise manager_lib.ApiError(404, f"no route {method} {url.path}")
    except manager_lib.ApiError as e:
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
      raise manager_lib.ApiError(404, f"no console file {name!r}")
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
      raise manager_lib.ApiError(400, "since and limit must be integers") from None
    full = (query.get("full") or ["0"])[0] in ("1", "true")
    steps = self.server.manager.store.get_steps(sid, since=since, limit=limit, full=full)
    self._send_json(200, {"steps": [s.to_json(full=full) for s in steps]})

  def h_step(self, query: Any, sid: str, index: str) -> None:
    del query
    self.server.manager.session(sid)
    step = self.server.manager.store.get_step(sid, int(index))
    if step is None:
      raise manager_lib.ApiError(404, f"session {sid!r} has no step {index}")
    self._send_json(200, step.to_json())

  def h_guidance_post(self, query: Any, sid: str) -> None:
    del query
    body = self._read_json()
    if not isinstance(body, dict):
      raise manager_lib.ApiError(400, "body must be a JSON object")
    unknown = sorted(set(body) - {"text", "client_msg_id", "source", "meta"})
    if unknown:
      raise manager_lib.ApiError(400, f"unknown field(s) {unknown}")
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
      raise manager_lib.ApiError(400, 'body must be {"flag": "good"|"bad"|null, "reason": "..."}')
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
      raise manager_lib.ApiError(400, "since must be an integer") from None
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
    manager: manager_lib.SessionManager,
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
    self.manager.wake_waiters()
    self.shutdown()
    self.server_close()
