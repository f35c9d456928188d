"""The HTTP API of the rollout service and its web console, on FastAPI + uvicorn.

`create_app(manager, ...)` puts a `manager.SessionManager` behind a JSON API and
serves the console (`console/`: a live trajectory, guidance, pause / resume, step
flags) at `/`; `RolloutServer` runs it with uvicorn in a background thread. FastAPI
serves the OpenAPI schema at `/openapi.json` and its pages at `/docs`.

HTTP API (all bodies and answers are JSON; errors are `{"error": "...", "field":
"agent.max_steps"}` with a 4xx status, `field` naming the input at fault):

    GET  /api/health                         {"ok": true, "sessions": N}
    GET  /api/backends                       the backends and environments the operator
                                             configured: {"backends": {...}, "envs": [...]}
    GET  /api/sessions                       {"sessions": [session, ...]}
    POST /api/sessions                       create and start a session; body
                                             (`manager.SessionSpec`):
         {"env": "research", "seed": 3, "backend": "scripted",
          "env_options": {...}, "backend_options": {"latency_s": 0.1},
          "agent": {"max_steps": 400, "context_token_threshold": 100000,
                    "tool_mode": "native" | "text" | null (the backend's)},
          "paused": false, "session_id": optional}              -> 201 session
    GET  /api/sessions/{id}                  session, with its guidance, counts and the
                                             environment's `sandbox` report
    GET  /api/sessions/{id}/steps?since=-1&limit=200&full=0      {"steps": [...]}
    GET  /api/sessions/{id}/steps/{i}        one step with its exact messages
    POST /api/sessions/{id}/guidance         {"text": "...", "client_msg_id": opt.}
                                             -> 202 {"guidance": {...}, "created": bool}
    GET  /api/sessions/{id}/guidance         {"guidance": [...]}
    POST /api/sessions/{id}/pause | resume | interrupt | stop   body {} -> 200
                                             (resume also restarts a failed session
                                             from its last completed step)
    POST /api/sessions/{id}/steps/{i}/flag   {"flag": "good"|"bad"|null, "reason": "..."}
    GET  /api/sessions/{id}/events           server-sent events, each carrying what
                                             changed: first `session` (the whole session,
                                             as GET returns it), then `step` (each new
                                             step, id = its index; again when its flag
                                             changes), `guidance` (one message, when sent
                                             and when delivered), `session` (the status
                                             fields, without lists, when they change) and
                                             `end`
    GET  /api/sessions/{id}/export.jsonl     one JSON line per episode: its trajectory
    GET  /api/export.jsonl                   as OpenAI chat `messages` (tool calls,
                                             tool results, tagged guidance) + `tools`,
                                             `steps`, `guidance` (`storage.episode_record`)
    GET  /                                   the web console

Errors: 400 malformed JSON or invalid fields (lone surrogates, integers beyond 64
bits, non-finite numbers, nesting deeper than 64, a bad Content-Length included),
401 missing/wrong token, 403 foreign Host or Origin header, 404 unknown
session/step/route, 405 wrong method, 408 body not received in time, 409 guidance or
control sent to a finished session, 411 chunked body, 413 body over 64 KiB or
guidance text too large, 415 a state-changing request that is neither
`Content-Type: application/json` nor carries `X-Apollo-Request`, 429 too many event
streams, 503 too many connections.

Access: the server binds 127.0.0.1 by default and then needs no token. Binding any
other address requires a token; every request that does not come from loopback
must then carry `Authorization: Bearer <token>` (or `?token=` for the console and
its event stream, which cannot set headers). Unauthenticated loopback requests
must name a loopback Host, which defeats DNS-rebinding pages in a local browser.
Creating a session in an environment that runs commands (`workspace`, only where
the operator enabled it) needs the token even from loopback when one is set.

Cross-site requests are refused: a request with a foreign `Origin` gets 403, and
every state-changing request needs `Content-Type: application/json` (with a body,
at least `{}`) or an `X-Apollo-Request` header, neither of which a page on another
origin can send without the browser asking this server first (CORS preflight, which
it never grants). These checks, and the token's, come before the body is read.

Exhaustion: request heads must arrive within `HEADER_TIMEOUT_S` and bodies within
`BODY_TIMEOUT_S`; idle keep-alive connections close after `KEEPALIVE_S`; uvicorn
refuses connections beyond `limit_concurrency` (503) and event streams are capped per
client and in total (429); the listen backlog is uvicorn's 2048.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import math
import os
import socket
import threading
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, Literal

import fastapi
import h11
import pydantic
import uvicorn
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette import concurrency, datastructures
from starlette import exceptions as starlette_exceptions
from uvicorn.protocols.http import h11_impl

from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib
from apollo.agents.service import manager as manager_lib

MAX_BODY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's limit)
MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**63 - 1
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
KEEPALIVE_S = 5
LIMIT_CONCURRENCY = 1024  # open connections (event streams included); 503 beyond
MAX_STREAMS = 512  # open event streams in all
MAX_STREAMS_PER_CLIENT = 64  # open event streams per client address
KEEPALIVE_COMMENT_S = 15.0  # an idle event stream sends a comment this often
# An event stream sends at most this often: changes in between go out together, so
# many consoles cost the rollouts little (each send takes the interpreter's lock).
STREAM_INTERVAL_S = 0.25
STEPS_PER_BATCH = 200
CONSOLE_DIR = os.path.join(os.path.dirname(__file__), "console")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REQUEST_HEADER = "x-apollo-request"


# ---------------------------------------------------------------------- access rules
def is_loopback(address: str) -> bool:
  try:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback
  except ValueError:
    return address == "localhost"


def _host_name(host_header: str | None) -> str:
  host = host_header or ""
  return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


def bearer_token(auth_header: str | None, query_token: str | None) -> str | None:
  if auth_header and auth_header.startswith("Bearer "):
    return auth_header[len("Bearer ") :].strip()
  return query_token


def token_matches(supplied: str | None, token: str | None) -> bool:
  return (
    token is not None
    and supplied is not None
    and hmac.compare_digest(supplied.encode(), token.encode())
  )


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
    host = _host_name(host_header)
    if host not in ("127.0.0.1", "localhost", "[::1]", ""):
      return 403, f"Host {host_header!r} is not a loopback name"
    return None
  if token is None:
    return 401, "this server accepts local requests only (no token configured)"
  if not token_matches(bearer_token(auth_header, query_token), token):
    return 401, "missing or wrong token (send Authorization: Bearer <token>)"
  return None


def check_origin(
  origin: str | None, host_header: str | None, scheme: str
) -> tuple[int, str] | None:
  """Refuses (403) a request sent by a page of another origin."""
  if origin is None:
    return None  # not sent by a browser's script on another page
  if host_header and origin.lower() == f"{scheme}://{host_header}".lower():
    return None
  return 403, f"cross-origin request from {origin!r} refused"


# ---------------------------------------------------------------------- JSON bodies
def _reject_constant(name: str) -> Any:
  raise ValueError(f"{name} is not a JSON number")


def _path(parts: tuple[Any, ...]) -> str:
  path = ".".join(str(p) for p in parts) or "body"
  return path.encode("utf-8", "backslashreplace").decode("utf-8")  # a key may be the culprit


def _check_string(value: str, parts: tuple[Any, ...]) -> None:
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise manager_lib.ApiError(
      400, f"{_path(parts)}: string holds a lone UTF-16 surrogate", field=_path(parts)
    ) from None


def parse_json(raw: bytes) -> Any:
  """Parses a request body; anything the store or the models could choke on later
  (lone surrogates, integers beyond 64 bits, NaN / Infinity, deep nesting) is a 400
  that names the field."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise manager_lib.ApiError(
      400, f"body: not UTF-8 ({e.reason} at byte {e.start})", field="body"
    ) from None
  try:
    value = json.loads(text, parse_constant=_reject_constant)
  except RecursionError:
    raise manager_lib.ApiError(
      400, f"body: malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels", field="body"
    ) from None
  except json.JSONDecodeError as e:
    raise manager_lib.ApiError(400, f"body: malformed JSON: {e}", field="body") from None
  except ValueError as e:  # NaN, Infinity, integers of more than 4300 digits
    raise manager_lib.ApiError(400, f"body: malformed JSON: {e}", field="body") from None
  stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
  while stack:
    parts, item = stack.pop()
    if len(parts) > MAX_JSON_DEPTH:
      raise manager_lib.ApiError(
        400, f"{_path(parts)}: nested deeper than {MAX_JSON_DEPTH} levels", field=_path(parts)
      )
    if isinstance(item, dict):
      for key, child in item.items():
        _check_string(key, (*parts, key))
        stack.append(((*parts, key), child))
    elif isinstance(item, list):
      stack.extend(((*parts, i), child) for i, child in enumerate(item))
    elif isinstance(item, str):
      _check_string(item, parts)
    elif isinstance(item, bool) or item is None:
      pass
    elif isinstance(item, int):
      if abs(item) > MAX_JSON_INT:
        raise manager_lib.ApiError(
          400, f"{_path(parts)}: integer out of range (at most 2^63 - 1)", field=_path(parts)
        )
    elif isinstance(item, float) and not math.isfinite(item):
      raise manager_lib.ApiError(400, f"{_path(parts)}: number out of range", field=_path(parts))
  return value


# ---------------------------------------------------------------------- the guard
def _error_response(
  status: int, message: str, field: str | None = None, close: bool = False
) -> responses.JSONResponse:
  headers = {"Cache-Control": "no-store"}
  if close:
    # The body was not read: closing keeps the connection's stream in sync.
    headers["Connection"] = "close"
  return responses.JSONResponse(
    manager_lib.ApiError(status, message, field).to_json(), status_code=status, headers=headers
  )


class _Guard:
  """ASGI middleware run before routing: access (token, Host), Origin, the
  cross-site rule for state-changing requests, and the body (size, time, JSON)."""

  def __init__(self, app: Any, settings: _Settings):
    self.app = app
    self.settings = settings

  async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    refusal, body = await self._check(scope, receive)
    if refusal is not None:
      await refusal(scope, receive, send)
      return
    if body is None:
      await self.app(scope, receive, send)
      return
    replayed = False

    async def replay() -> Any:
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()  # e.g. http.disconnect

    await self.app(scope, replay, send)

  async def _check(self, scope: Any, receive: Any) -> tuple[Any, bytes | None]:
    headers = datastructures.Headers(scope=scope)
    client = (scope.get("client") or ("", 0))[0]
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    settings = self.settings
    refusal = check_access(
      client,
      headers.get("host"),
      headers.get("authorization"),
      (query.get("token") or [None])[0],
      settings.token,
      settings.trust_loopback,
    )
    if refusal is None:
      refusal = check_origin(
        headers.get("origin"), headers.get("host"), scope.get("scheme", "http")
      )
    if refusal is not None:
      return _error_response(*refusal, close=scope["method"] not in SAFE_METHODS), None
    if scope["method"] in SAFE_METHODS:
      return None, None
    content_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
    is_json = content_type == "application/json"
    if not is_json and REQUEST_HEADER not in headers:
      return _error_response(
        415,
        "Content-Type must be application/json (send a JSON body, at least {}) or the "
        "request must carry an X-Apollo-Request header",
        "Content-Type",
        close=True,
      ), None
    length = headers.get("content-length")
    if length is None:
      if headers.get("transfer-encoding"):
        return _error_response(
          411, "send a Content-Length (chunked bodies are not accepted)", "Content-Length", True
        ), None
      size = 0
    else:
      size = int(length)  # h11 let only digits through
      if size > MAX_BODY_BYTES:
        return _error_response(
          413, f"body of {size} bytes exceeds the limit of {MAX_BODY_BYTES}", "body", True
        ), None
    chunks, received = [], 0
    deadline = time.monotonic() + settings.body_timeout_s
    more = size > 0
    while more:
      try:
        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
      except TimeoutError:
        return _error_response(
          408, f"body not received within {settings.body_timeout_s:g} s", "body", True
        ), None
      if message["type"] == "http.disconnect":
        return _error_response(400, "client went away", "body", True), None
      chunk = message.get("body", b"")
      received += len(chunk)
      if received > MAX_BODY_BYTES:
        return _error_response(
          413, f"body exceeds the limit of {MAX_BODY_BYTES}", "body", True
        ), None
      chunks.append(chunk)
      more = message.get("more_body", False)
    raw = b"".join(chunks)
    if raw.strip() and not is_json:
      return _error_response(415, "Content-Type must be application/json", "Content-Type"), None
    try:
      value = parse_json(raw) if raw.strip() else {}
    except manager_lib.ApiError as e:
      return _error_response(e.status, e.message, e.field), None
    if not isinstance(value, dict):
      return _error_response(400, "body: must be a JSON object", "body"), None
    if not raw.strip() or not is_json:
      # An empty body means {}: what the routes' models parse.
      raw = b"{}"
      scope["headers"] = [
        (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
      ] + [(b"content-type", b"application/json"), (b"content-length", b"2")]
    return None, raw


# ---------------------------------------------------------------------- request models
class GuidanceIn(pydantic.BaseModel):
  """The body of POST /api/sessions/{id}/guidance."""

  model_config = pydantic.ConfigDict(extra="forbid")
  text: str = pydantic.Field(description="shown to the agent at its next turn")
  source: Literal[guidance_lib.SOURCES] = "human"  # type: ignore[valid-type]
  client_msg_id: str | None = pydantic.Field(
    None, max_length=200, description="idempotency key: the same key is stored once"
  )
  meta: dict[str, Any] | None = None


class FlagIn(pydantic.BaseModel):
  """The body of POST /api/sessions/{id}/steps/{i}/flag."""

  model_config = pydantic.ConfigDict(extra="forbid")
  flag: Literal[storage_lib.FLAGS] | None  # type: ignore[valid-type]
  reason: str | None = pydantic.Field(None, max_length=2000)


SessionId = fastapi.Path(pattern=manager_lib.SESSION_ID_PATTERN)
StepIndex = fastapi.Path(ge=0, le=2**62)


# ---------------------------------------------------------------------- event streams
class _Feed:
  """Wakes event streams (coroutines on the server's loop) when a session changes
  (rollout and request threads call `manager.notify`)."""

  def __init__(self, manager: manager_lib.SessionManager):
    self.manager = manager
    self.loop: asyncio.AbstractEventLoop | None = None
    self.events: dict[str, asyncio.Event] = {}
    self.closing = False
    self._remove = None

  def attach(self, loop: asyncio.AbstractEventLoop) -> None:
    self.loop = loop
    self._remove = self.manager.add_watcher(self._from_thread)

  def detach(self) -> None:
    if self._remove is not None:
      self._remove()
    self.close()

  def _from_thread(self, session_id: str) -> None:
    loop = self.loop
    if loop is not None and not loop.is_closed():
      with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
        loop.call_soon_threadsafe(self._wake, session_id)

  def _wake(self, session_id: str) -> None:
    event = self.events.pop(session_id, None)
    if event is not None:
      event.set()

  def close(self) -> None:
    self.closing = True
    for event in self.events.values():
      event.set()
    self.events.clear()

  async def wait(self, session_id: str, version: int, timeout: float) -> None:
    """Returns when the session's version differs from `version`, or after `timeout`."""
    event = self.events.get(session_id)
    if event is None:
      event = self.events[session_id] = asyncio.Event()
    if self.closing or self.manager.version(session_id) != version:
      return
    with contextlib.suppress(TimeoutError):
      await asyncio.wait_for(event.wait(), timeout)


# Session fields whose change is worth a `session` event (steps have their own).
_SESSION_FIELDS = ("status", "live", "paused", "result", "error", "sandbox")


def _event(kind: str, data: Any, event_id: str | None = None) -> str:
  head = f"id: {event_id}\n" if event_id is not None else ""
  return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


class _Reads:
  """Store reads shared by the event streams of a session: what a session looks like
  at a version is read once (on the server's loop), however many consoles watch it.
  Without a cache (`shared=False`), every call reads the store."""

  def __init__(self, manager: manager_lib.SessionManager, shared: bool = True):
    self.manager = manager
    self.shared = shared
    self._sessions: dict[str, tuple[int, dict[str, Any]]] = {}
    self._steps: dict[str, dict[int, tuple[int, list[tuple[int, str, tuple[int, ...]]]]]] = {}
    self._rendered: dict[tuple[str, int], tuple[str, tuple[int, ...]]] = {}  # step events
    self._guidance: dict[str, tuple[int, list[Any]]] = {}

  def session(self, sid: str, version: int) -> dict[str, Any]:
    hit = self._sessions.get(sid)
    if hit is not None and hit[0] >= version:
      return hit[1]
    data = self.manager.session_json(sid, detail=False)
    if self.shared:
      self._sessions[sid] = (version, data)
    return data

  def steps(self, sid: str, since: int, version: int) -> list[tuple[int, str, tuple[int, ...]]]:
    """(index, rendered `step` event, guidance ids delivered) of the steps after `since`."""
    per_since = self._steps.setdefault(sid, {}) if self.shared else {}
    hit = per_since.get(since)
    if hit is not None and hit[0] >= version:
      return hit[1]
    batch = []
    for step in self.manager.store.get_steps(sid, since=since, limit=STEPS_PER_BATCH, full=False):
      key = (sid, step.step_index)
      rendered = self._rendered.get(key)
      if rendered is None:
        rendered = (
          _event("step", step.to_json(full=False), str(step.step_index)),
          tuple(step.guidance_ids or ()),
        )
        if self.shared:
          if len(self._rendered) >= 4096:
            self._rendered.clear()
          self._rendered[key] = rendered
      batch.append((step.step_index, *rendered))
    if self.shared:
      if len(per_since) >= 16:
        per_since.clear()
      per_since[since] = (version, batch)
    return batch

  def forget_step(self, sid: str, index: int) -> None:
    """Drops a step's rendering (its flag changed)."""
    self._rendered.pop((sid, index), None)
    self._steps.pop(sid, None)

  def guidance(self, sid: str, version: int) -> list[Any]:
    hit = self._guidance.get(sid)
    if hit is not None and hit[0] >= version:
      return hit[1]
    messages = self.manager.store.list_guidance(sid)
    if self.shared:
      self._guidance[sid] = (version, messages)
    return messages


class _Stream:
  """One client's event stream: sends what changed since it last looked."""

  def __init__(self, manager: manager_lib.SessionManager, session_id: str, since: int):
    self.manager = manager
    self.session_id = session_id
    self.last = since  # newest step sent
    self.version = -1  # change feed version seen (-1: nothing sent yet)
    self.shown: dict[str, Any] | None = None  # the session fields last sent
    self.ended = False
    self.more = False  # a full batch of steps was sent: look again at once

  def collect(self, reads: _Reads) -> list[str]:
    """The events due now."""
    manager, sid = self.manager, self.session_id
    version, changes = manager.changes_since(sid, self.version)
    out = []
    if self.version < 0 or changes is None:  # first look, or fell behind the change log
      session = manager.session_json(sid)
      out.append(_event("session", session))
      self.shown = {k: session.get(k) for k in _SESSION_FIELDS}
      changes = []
    sent_before = self.last
    steps = reads.steps(sid, self.last, version)
    guidance_ids: set[int] = set()
    for index, rendered, delivered in steps:
      out.append(rendered)
      self.last = index
      guidance_ids.update(delivered)  # delivered at this step
    self.more = len(steps) == STEPS_PER_BATCH
    flagged = {c["flag"] for c in changes if "flag" in c}
    for index in flagged:
      reads.forget_step(sid, index)
    for index in sorted(i for i in flagged if i <= sent_before):
      for step in manager.store.get_steps(sid, since=index - 1, limit=1, full=False):
        if step.step_index == index:  # flag changed on a step already sent
          out.append(_event("step", step.to_json(full=False), event_id=str(index)))
    guidance_ids.update(c["guidance"] for c in changes if "guidance" in c)
    if guidance_ids:
      for message in reads.guidance(sid, version):
        if message.guidance_id in guidance_ids:
          out.append(_event("guidance", message.to_json()))
    if any("session" in c for c in changes) or not self.version >= 0 or not steps:
      # Status, control or anything else: look at the session (steps, guidance and
      # flags alone leave its fields as they were).
      session = reads.session(sid, version)
      fields = {k: session.get(k) for k in _SESSION_FIELDS}
      if fields != self.shown:
        out.append(_event("session", session))
        self.shown = fields
    self.version = version
    if self.shown["status"] not in storage_lib.ACTIVE_STATUSES and not steps:
      out.append(_event("end", {"status": self.shown["status"]}))
      self.ended = True
    return out


class _Counted(responses.StreamingResponse):
  """A streaming response that gives its slot back however it ends."""

  def __init__(self, content: Any, release: Any, **kwargs: Any):
    super().__init__(content, **kwargs)
    self._release = release

  async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._release()


# ---------------------------------------------------------------------- the app
class _Settings:
  def __init__(
    self,
    token: str | None,
    trust_loopback: bool,
    max_streams: int,
    max_streams_per_client: int,
    body_timeout_s: float,
  ):
    self.token = token
    self.trust_loopback = trust_loopback
    self.max_streams = max_streams
    self.max_streams_per_client = max_streams_per_client
    self.body_timeout_s = body_timeout_s


def _loc_field(loc: tuple[Any, ...]) -> str:
  parts = list(loc)
  if parts and parts[0] in ("body", "path", "query", "header"):
    parts = parts[1:]
  return ".".join(str(p) for p in parts) or "body"


def create_app(
  manager: manager_lib.SessionManager,
  token: str | None = None,
  trust_loopback: bool = True,
  max_streams: int = MAX_STREAMS,
  max_streams_per_client: int = MAX_STREAMS_PER_CLIENT,
  body_timeout_s: float = BODY_TIMEOUT_S,
) -> fastapi.FastAPI:
  """The rollout service's ASGI app over `manager` (see the module docstring)."""
  settings = _Settings(token, trust_loopback, max_streams, max_streams_per_client, body_timeout_s)
  feed = _Feed(manager)
  reads = _Reads(manager)  # used on the server's loop only
  streams: dict[str, int] = {}  # open event streams per client address

  @contextlib.asynccontextmanager
  async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
    del app
    feed.attach(asyncio.get_running_loop())
    try:
      yield
    finally:
      feed.detach()

  app = fastapi.FastAPI(
    title="Apollo rollout service",
    description="Sessions of agents steered by humans while they run (see the README).",
    version="1",
    lifespan=lifespan,
  )
  app.state.feed = feed
  app.state.streams = streams
  app.add_middleware(_Guard, settings=settings)

  @app.exception_handler(manager_lib.ApiError)
  async def _api_error(request: fastapi.Request, e: manager_lib.ApiError):
    del request
    return _error_response(e.status, e.message, e.field)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def _invalid(request: fastapi.Request, e: fastapi_exceptions.RequestValidationError):
    del request
    parts = []
    for err in e.errors():
      msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
      parts.append(f"{_loc_field(err['loc'])}: {msg}")
    errors = e.errors()
    field = _loc_field(errors[0]["loc"]) if errors else "body"
    return _error_response(400, "; ".join(parts), field)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http_error(request: fastapi.Request, e: starlette_exceptions.HTTPException):
    method, path = request.method, request.url.path
    message = {
      404: f"no route {method} {path}",
      405: f"{method} is not allowed on {path}",
    }.get(e.status_code, str(e.detail))
    return _error_response(e.status_code, message)

  @app.exception_handler(Exception)
  async def _internal(request: fastapi.Request, e: Exception):
    del request
    traceback.print_exception(e)
    return _error_response(500, f"internal error: {type(e).__name__}: {e}")

  # ------------------------------------------------------------ console
  def console_file(name: str) -> fastapi.Response:
    path = os.path.join(CONSOLE_DIR, os.path.basename(name))
    if not os.path.isfile(path):
      raise manager_lib.ApiError(404, f"no console file {name!r}")
    kind = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}.get(
      os.path.splitext(path)[1], "application/octet-stream"
    )
    with open(path, "rb") as f:
      return fastapi.Response(f.read(), media_type=kind + "; charset=utf-8")

  @app.get("/", include_in_schema=False)
  def console() -> fastapi.Response:
    return console_file("index.html")

  @app.get("/console/{name}", include_in_schema=False)
  def console_asset(name: str = fastapi.Path(pattern=r"^[\w.-]+$")) -> fastapi.Response:
    return console_file(name)

  # ------------------------------------------------------------ API
  @app.get("/api/health")
  def health() -> dict[str, Any]:
    return {"ok": True, "sessions": len(manager.store.list_sessions())}

  @app.get("/api/backends")
  def backends() -> dict[str, Any]:
    return {
      "backends": {name: p.to_json() for name, p in sorted(manager.backends.items())},
      "envs": list(manager.envs),
    }

  @app.get("/api/sessions")
  def list_sessions() -> dict[str, Any]:
    return {
      "sessions": [
        manager.session_json(s.session_id, detail=False) for s in manager.store.list_sessions()
      ]
    }

  @app.post("/api/sessions", status_code=201)
  def create_session(spec: manager_lib.SessionSpec, request: fastapi.Request) -> dict[str, Any]:
    if spec.env in manager_lib.COMMAND_ENVS and settings.token is not None:
      supplied = bearer_token(
        request.headers.get("authorization"), request.query_params.get("token")
      )
      if not token_matches(supplied, settings.token):
        raise manager_lib.ApiError(
          401, f"env {spec.env!r} runs commands: send the token (even from loopback)", "env"
        )
    session = manager.create_session(spec)
    return manager.session_json(session.session_id)

  @app.get("/api/sessions/{session_id}")
  def get_session(session_id: str = SessionId) -> dict[str, Any]:
    return manager.session_json(session_id)

  @app.get("/api/sessions/{session_id}/steps")
  def get_steps(
    session_id: str = SessionId,
    since: int = fastapi.Query(-1, ge=-1, le=2**62),
    limit: int = fastapi.Query(200, ge=1, le=2**31),
    full: bool = False,
  ) -> dict[str, Any]:
    manager.session(session_id)
    steps = manager.store.get_steps(session_id, since=since, limit=min(limit, 1000), full=full)
    return {"steps": [s.to_json(full=full) for s in steps]}

  @app.get("/api/sessions/{session_id}/steps/{step_index}")
  def get_step(session_id: str = SessionId, step_index: int = StepIndex) -> dict[str, Any]:
    manager.session(session_id)
    step = manager.store.get_step(session_id, step_index)
    if step is None:
      raise manager_lib.ApiError(404, f"session {session_id!r} has no step {step_index}")
    return step.to_json()

  @app.post("/api/sessions/{session_id}/guidance", status_code=202)
  def send_guidance(body: GuidanceIn, session_id: str = SessionId) -> dict[str, Any]:
    message, created = manager.send_guidance(
      session_id, body.text, body.source, body.client_msg_id, body.meta
    )
    return {"guidance": message.to_json(), "created": created}

  @app.get("/api/sessions/{session_id}/guidance")
  def list_guidance(session_id: str = SessionId) -> dict[str, Any]:
    manager.session(session_id)
    return {"guidance": [g.to_json() for g in manager.store.list_guidance(session_id)]}

  @app.post("/api/sessions/{session_id}/{action}")
  def control(
    action: Literal["pause", "resume", "interrupt", "stop"], session_id: str = SessionId
  ) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": True}
    if action == "interrupt":
      result["interrupted"] = manager.interrupt(session_id)
    else:
      getattr(manager, action)(session_id)
    return result

  @app.post("/api/sessions/{session_id}/steps/{step_index}/flag")
  def flag(body: FlagIn, session_id: str = SessionId, step_index: int = StepIndex) -> dict:
    manager.flag(session_id, step_index, body.flag, body.reason)
    return {"ok": True}

  def export(ids: list[str]) -> fastapi.Response:
    body = "".join(line + "\n" for line in manager.store.iter_export(ids))
    return fastapi.Response(body, media_type="application/x-ndjson")

  @app.get("/api/sessions/{session_id}/export.jsonl")
  def export_session(session_id: str = SessionId) -> fastapi.Response:
    manager.session(session_id)
    return export([session_id])

  @app.get("/api/export.jsonl")
  def export_all() -> fastapi.Response:
    return export([s.session_id for s in manager.store.list_sessions()])

  @app.get("/api/sessions/{session_id}/events", response_class=responses.StreamingResponse)
  async def events(
    request: fastapi.Request,
    session_id: str = SessionId,
    since: int = fastapi.Query(-1, ge=-1, le=2**62),
    last_event_id: int | None = fastapi.Header(None, ge=-1, le=2**62),
  ) -> fastapi.Response:
    client = request.client.host if request.client else ""
    if sum(streams.values()) >= settings.max_streams:
      raise manager_lib.ApiError(429, f"too many event streams (at most {settings.max_streams})")
    if streams.get(client, 0) >= settings.max_streams_per_client:
      raise manager_lib.ApiError(
        429, f"too many event streams from {client} (at most {settings.max_streams_per_client})"
      )
    await concurrency.run_in_threadpool(manager.session, session_id)
    streams[client] = streams.get(client, 0) + 1
    released = False

    def release() -> None:
      nonlocal released
      if not released:
        released = True
        streams[client] -= 1
        if not streams[client]:
          del streams[client]

    stream = _Stream(manager, session_id, since if last_event_id is None else last_event_id)

    async def body() -> AsyncIterator[str]:
      last_write = time.monotonic()
      first = True
      while not feed.closing and not manager.closing:
        version = manager.version(session_id)
        if first:  # the whole session: read in a worker thread, uncached
          chunks = await concurrency.run_in_threadpool(stream.collect, _Reads(manager, False))
          first = False
        else:  # a few small reads, shared with the session's other streams
          chunks = stream.collect(reads)
        if chunks:
          yield "".join(chunks)
          last_write = time.monotonic()
        if stream.ended:
          return
        if stream.more:
          continue  # catching up: no waiting
        if chunks:
          await asyncio.sleep(STREAM_INTERVAL_S)
        await feed.wait(session_id, version, KEEPALIVE_COMMENT_S)
        if time.monotonic() - last_write > KEEPALIVE_COMMENT_S:
          yield ": keepalive\n\n"  # keeps proxies from closing an idle stream
          last_write = time.monotonic()

    return _Counted(
      body(),
      release,
      media_type="text/event-stream",
      headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

  return app


# ---------------------------------------------------------------------- the server
class _Connection(h11.Connection):
  """h11's connection, remembering why it refused a request."""

  last_error: Exception | None = None

  def next_event(self) -> Any:
    try:
      return super().next_event()
    except h11.RemoteProtocolError as e:
      self.last_error = e
      raise


class _Protocol(h11_impl.H11Protocol):
  """uvicorn's h11 protocol with a deadline for each request's head and JSON 400s
  that say what was wrong with a malformed request (e.g. a negative Content-Length)."""

  header_timeout_s = HEADER_TIMEOUT_S

  def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any):
    super().__init__(config, *args, **kwargs)
    self.conn = _Connection(
      h11.SERVER, config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
    )
    self._head_timer: asyncio.TimerHandle | None = None

  def _arm_head_timer(self) -> None:
    self._disarm_head_timer()
    self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

  def _disarm_head_timer(self) -> None:
    if self._head_timer is not None:
      self._head_timer.cancel()
      self._head_timer = None

  def _head_timeout(self) -> None:
    self._head_timer = None
    if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
      self.transport.close()  # no complete request head in time

  def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
    super().connection_made(transport)
    self._arm_head_timer()

  def connection_lost(self, exc: Exception | None) -> None:
    self._disarm_head_timer()
    super().connection_lost(exc)

  def handle_events(self) -> None:
    super().handle_events()
    if self.conn.their_state is not h11.IDLE:
      self._disarm_head_timer()

  def on_response_complete(self) -> None:
    super().on_response_complete()
    if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
      self._arm_head_timer()

  def send_400_response(self, msg: str) -> None:
    error = self.conn.last_error
    detail = f"malformed HTTP request: {error}" if error is not None else msg
    field = "Content-Length" if "Content-Length" in detail else "request"
    body = json.dumps({"error": detail, "field": field}).encode()
    headers = [
      (b"content-type", b"application/json"),
      (b"content-length", str(len(body)).encode()),
      (b"connection", b"close"),
    ]
    self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers)))
    self.transport.write(self.conn.send(h11.Data(data=body)))
    self.transport.write(self.conn.send(h11.EndOfMessage()))
    self.transport.close()


class RolloutServer:
  """The app served by uvicorn (h11) in a background thread."""

  def __init__(
    self,
    manager: manager_lib.SessionManager,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    trust_loopback: bool = True,
    limit_concurrency: int = LIMIT_CONCURRENCY,
    max_streams: int = MAX_STREAMS,
    max_streams_per_client: int = MAX_STREAMS_PER_CLIENT,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
    keepalive_s: int = KEEPALIVE_S,
  ):
    if not is_loopback(host) and not token:
      raise ValueError(f"binding {host!r} exposes the service beyond this machine: set a token")
    self.manager = manager
    self.token = token
    self.app = create_app(
      manager, token, trust_loopback, max_streams, max_streams_per_client, body_timeout_s
    )
    protocol = type("_ServiceProtocol", (_Protocol,), {"header_timeout_s": header_timeout_s})
    self.config = uvicorn.Config(
      self.app,
      http=protocol,
      ws="none",
      lifespan="on",
      log_config=None,
      log_level="warning",
      access_log=False,
      timeout_keep_alive=keepalive_s,
      timeout_graceful_shutdown=2,
      limit_concurrency=limit_concurrency,
      h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    self.server = uvicorn.Server(self.config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self.socket = socket.socket(family, socket.SOCK_STREAM)
    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.socket.bind((host, port))
    self.host = host
    self.port = self.socket.getsockname()[1]
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None

  @property
  def url(self) -> str:
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}"

  def _serve(self) -> None:
    try:
      asyncio.run(self.server.serve(sockets=[self.socket]))
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e
      raise

  def start(self, timeout: float = 30.0) -> RolloutServer:
    """Serves in a background thread; returns once it accepts connections."""
    self._thread = threading.Thread(target=self._serve, name="rollout-http", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the rollout service did not start: {self._error!r}")
      time.sleep(0.01)
    return self

  def stop(self, timeout: float = 10.0) -> None:
    feed: _Feed = self.app.state.feed
    loop = feed.loop
    if loop is not None and not loop.is_closed():
      with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(feed.close)
    self.manager.wake_waiters()
    self.server.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout)
    self.socket.close()


def streams_open(app: fastapi.FastAPI) -> dict[str, int]:
  """Open event streams per client address (for tests and the benchmark)."""
  return dict(app.state.streams)
