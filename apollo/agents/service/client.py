"""The client side of the rollout service: one protocol, two transports.

`RolloutAPI` is what a supervisor does with a running session: read it and its new
steps, send guidance, flag a step. `LocalClient` implements it on a
`manager.SessionManager` in the same process; `HttpClient` over the HTTP API, and
adds the rest of the API (create and control sessions, export, the event stream).
Both apply the manager's rules (guidance only to active sessions, size limits,
valid flags) and both raise `manager.ApiError` with the HTTP status of a refusal,
so a supervisor written against `RolloutAPI` runs the same in process and remote.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from apollo.agents import storage as storage_lib
from apollo.agents.service import manager as manager_lib

DEFAULT_URL = "http://127.0.0.1:8765"


class RolloutAPI(Protocol):
  """What a supervising human (a person's tool or the simulated human) does with a
  session: read it and its new steps, send guidance, flag a step. Every method
  raises `manager.ApiError` on a refused request."""

  def get_session(self, session_id: str) -> dict[str, Any]: ...

  def get_steps(self, session_id: str, since: int = -1) -> list[dict[str, Any]]: ...

  def send_guidance(
    self,
    session_id: str,
    text: str,
    source: str = "human",
    client_msg_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]: ...

  def flag_step(
    self, session_id: str, step_index: int, flag: str | None, reason: str | None = None
  ) -> dict[str, Any]: ...


class LocalClient:
  """`RolloutAPI` on a manager in this process (no HTTP), with the manager's rules."""

  def __init__(self, manager: manager_lib.SessionManager):
    self.manager = manager

  @classmethod
  def for_store(cls, store: storage_lib.TrajectoryStore) -> LocalClient:
    """A client on `store` for rollouts that run in the caller's thread
    (`agent.run_episode`): its manager runs no sessions of its own."""
    return cls(manager_lib.SessionManager(store))

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


class HttpClient:
  """`RolloutAPI` over the service's HTTP API (plus the rest of the API: sessions,
  control, export, the event stream)."""

  def __init__(
    self, base_url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 30.0
  ):
    self.base_url = base_url.rstrip("/")
    self.token = token
    self.timeout_s = timeout_s

  def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
    data = None if body is None else json.dumps(body).encode()
    # X-Apollo-Request: what the server asks of state-changing requests (no page on
    # another origin can send it).
    headers = {"Accept": "application/json", "X-Apollo-Request": "1"}
    if data is not None:
      headers["Content-Type"] = "application/json"
    if self.token:
      headers["Authorization"] = f"Bearer {self.token}"
    request = urllib.request.Request(
      self.base_url + path, data=data, headers=headers, method=method
    )
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
        payload = reply.read()
    except urllib.error.HTTPError as e:
      text = e.read().decode(errors="replace")
      try:
        payload = json.loads(text)
        message, field = payload["error"], payload.get("field")
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        message, field = text, None
      raise manager_lib.ApiError(e.code, message, field) from None
    return payload.decode() if raw else json.loads(payload)

  # RolloutAPI
  def get_session(self, session_id: str) -> dict[str, Any]:
    return self.request("GET", f"/api/sessions/{session_id}")

  def get_steps(
    self, session_id: str, since: int = -1, limit: int = 1000, full: bool = False
  ) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"since": since, "limit": limit, "full": int(full)})
    return self.request("GET", f"/api/sessions/{session_id}/steps?{query}")["steps"]

  def send_guidance(
    self,
    session_id: str,
    text: str,
    source: str = "human",
    client_msg_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    body: dict[str, Any] = {
      "text": text,
      "source": source,
      "client_msg_id": client_msg_id or uuid.uuid4().hex,
    }
    if meta is not None:
      body["meta"] = dict(meta)
    return self.request("POST", f"/api/sessions/{session_id}/guidance", body)

  def flag_step(
    self, session_id: str, step_index: int, flag: str | None, reason: str | None = None
  ) -> dict[str, Any]:
    return self.request(
      "POST",
      f"/api/sessions/{session_id}/steps/{step_index}/flag",
      {"flag": flag, "reason": reason},
    )

  # Everything else.
  def list_sessions(self) -> list[dict[str, Any]]:
    return self.request("GET", "/api/sessions")["sessions"]

  def create_session(self, **spec: Any) -> dict[str, Any]:
    return self.request("POST", "/api/sessions", spec)

  def control(self, session_id: str, what: str) -> dict[str, Any]:
    return self.request("POST", f"/api/sessions/{session_id}/{what}", {})

  def export(self, session_id: str | None = None) -> str:
    path = f"/api/sessions/{session_id}/export.jsonl" if session_id else "/api/export.jsonl"
    return self.request("GET", path, raw=True)

  def events(self, session_id: str, since: int = -1) -> Iterator[tuple[str, Any]]:
    """Yields (event, data) from the server-sent event stream until it ends: `session`
    (first the whole session, later its changed status fields), `step`, `guidance`
    (one message, when sent and when delivered) and `end`."""
    headers = {"Accept": "text/event-stream"}
    if self.token:
      headers["Authorization"] = f"Bearer {self.token}"
    request = urllib.request.Request(
      f"{self.base_url}/api/sessions/{session_id}/events?since={since}", headers=headers
    )
    with urllib.request.urlopen(request, timeout=self.timeout_s) as stream:
      kind, data = "message", []
      for raw_line in stream:
        line = raw_line.decode().rstrip("\n")
        if not line:
          if data:
            yield kind, json.loads("\n".join(data))
            if kind == "end":
              return
          kind, data = "message", []
        elif line.startswith("event: "):
          kind = line[len("event: ") :]
        elif line.startswith("data: "):
          data.append(line[len("data: ") :])
