"""Security probes of issue 15 (items 2-5) against the rollout service: who chooses
what runs, cross-site requests, exhaustion, and malformed input. Each probe got
through (or crashed) the http.server API this replaced."""

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

from apollo.agents import storage
from apollo.agents.envs import research as research_env
from apollo.agents.service import app as app_lib
from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib
from tests.agents.helpers import raw_request, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def make_service(tmp_path):
  """make_service(manager options..., server=dict(server options)) -> (store, manager,
  server, client); everything is shut down after the test."""
  made = []

  def make(server=None, **manager_options):
    store = storage.SQLiteStore(os.path.join(tmp_path, f"store{len(made)}.sqlite"))
    manager = manager_lib.SessionManager(store, workdir=str(tmp_path), **manager_options)
    service = app_lib.RolloutServer(manager, "127.0.0.1", 0, **(server or {})).start()
    made.append((store, manager, service))
    token = (server or {}).get("token")
    return store, manager, service, client_lib.HttpClient(service.url, token, timeout_s=20)

  yield make
  for store, manager, service in made:
    service.stop()
    manager.shutdown()
    store.close()


def _socket(server, source="127.0.0.1"):
  sock = socket.create_connection(
    (server.host, server.port), timeout=10, source_address=(source, 0)
  )
  return sock


def _read_reply(sock) -> bytes:
  data = b""
  with contextlib.suppress(ConnectionResetError):
    while chunk := sock.recv(65536):
      data += chunk
  return data


# ------------------------------------------------------------------ item 2
def test_requests_cannot_choose_model_servers_keys_or_command_envs(make_service):
  glm = manager_lib.BackendProfile(
    "openai", {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "GLM_KEY"}
  )
  store, _, server, client = make_service(backends={**manager_lib.DEFAULT_BACKENDS, "glm": glm})
  probes = [
    ({"backend_options": {"base_url": "http://attacker.example/v1"}}, "backend_options.base_url"),
    ({"backend_options": {"api_key_env": "AWS_SECRET_ACCESS_KEY"}}, "backend_options.api_key_env"),
    (
      {"backend": "glm", "backend_options": {"base_url": "http://x/v1"}},
      "backend_options.base_url",
    ),
    ({"backend": "glm", "backend_options": {"model": "other"}}, "backend_options.model"),
    ({"backend": "openai"}, "backend"),  # a factory, but not a configured backend
    ({"env": "workspace"}, "env"),  # runs commands: not enabled by this operator
  ]
  for spec, field in probes:
    with pytest.raises(manager_lib.ApiError) as refused:
      client.create_session(**spec)
    assert refused.value.status == 400 and refused.value.field == field, (spec, refused.value)
  assert store.list_sessions() == []
  # The operator's backend by name, with a per-session knob; its URL and key stay the
  # operator's and are neither stored with the session nor shown.
  sid = client.create_session(backend="glm", backend_options={"temperature": 0.1}, paused=True)[
    "session_id"
  ]
  assert store.get_session(sid).config["backend_options"] == {"temperature": 0.1}
  offered = client.request("GET", "/api/backends")
  assert offered["backends"]["glm"] == {
    "factory": "openai",
    "operator_options": ["api_key_env", "base_url", "model"],
  }
  assert "127.0.0.1:9" not in json.dumps(offered) and offered["envs"] == ["research"]
  client.control(sid, "stop")


def test_workspace_sessions_need_the_token_even_from_loopback(make_service):
  store, _, server, client = make_service(
    envs=("research", "workspace"), server={"token": "s3cret"}
  )
  status, payload = raw_request(
    server, "POST", "/api/sessions", b'{"env": "workspace", "paused": true}', JSON
  )
  assert status == 401 and payload["field"] == "env"
  assert store.list_sessions() == []
  # Research sessions need no token from loopback; workspace ones do, and get it.
  assert raw_request(server, "POST", "/api/sessions", b'{"paused": true}', JSON)[0] == 201
  sid = client.create_session(env="workspace", paused=True)["session_id"]
  assert store.get_session(sid).env_name == "workspace"


class _SandboxedEnv(research_env.ResearchEnv):
  def describe(self):
    return {"sandbox": "bubblewrap", "limits": {"max_processes": 64}}


def test_sessions_show_what_their_environment_reports_about_its_sandbox(make_service):
  factories = {"research": lambda session_id, workdir, **options: _SandboxedEnv(**options)}
  _, _, _, client = make_service(env_factories=factories)
  sid = client.create_session(paused=True)["session_id"]
  wait_for(lambda: client.get_session(sid)["sandbox"] == "bubblewrap")
  assert client.get_session(sid)["environment"]["limits"] == {"max_processes": 64}
  assert client.list_sessions()[0]["sandbox"] == "bubblewrap"
  client.control(sid, "stop")


# ------------------------------------------------------------------ item 3
def test_cross_site_requests_are_refused(make_service):
  store, _, server, client = make_service()
  sid = client.create_session(seed=1, backend_options={"latency_s": 0.05})["session_id"]
  wait_for(lambda: store.get_session(sid).status == "running")
  foreign = {"Origin": "http://attacker.example", **JSON}
  own = {"Origin": server.url, **JSON}
  probes = [
    ("POST", f"/api/sessions/{sid}/pause", b"", {}, 415),  # bodiless (a form, a beacon)
    ("POST", f"/api/sessions/{sid}/stop", b"{}", {"Content-Type": "text/plain"}, 415),
    ("POST", "/api/sessions", b'{"seed": 9}', {"Content-Type": "text/plain"}, 415),
    ("POST", "/api/sessions", b"", {}, 415),
    (
      "POST",
      "/api/sessions",
      b"seed=9",
      {"Content-Type": "application/x-www-form-urlencoded"},
      415,
    ),
    ("POST", f"/api/sessions/{sid}/stop", b"{}", foreign, 403),
    ("POST", f"/api/sessions/{sid}/stop", b"", {"Origin": "null", "X-Apollo-Request": "1"}, 403),
    ("OPTIONS", f"/api/sessions/{sid}/stop", b"", {"Origin": "http://attacker.example"}, 403),
    ("GET", f"/api/sessions/{sid}/export.jsonl", b"", {"Origin": "http://attacker.example"}, 403),
  ]
  for method, path, body, headers, status in probes:
    got, payload = raw_request(server, method, path, body, headers)
    assert got == status, (method, path, headers, got, payload)
  assert len(store.list_sessions()) == 1
  assert store.get_session(sid).status == "running"
  assert not {"pause", "stop"} & {e["kind"] for e in store.list_events(sid)}
  # The console's own requests (same origin, JSON) still work.
  assert raw_request(server, "POST", f"/api/sessions/{sid}/stop", b"{}", own)[0] == 200
  wait_for(lambda: store.get_session(sid).status == "stopped", timeout=20)


# ------------------------------------------------------------------ item 4
def test_slow_heads_and_bodies_are_cut_off(make_service):
  _, _, server, _ = make_service(
    server={"header_timeout_s": 0.5, "body_timeout_s": 0.5, "keepalive_s": 1}
  )
  began = time.monotonic()
  with _socket(server) as sock:  # half a request head, then silence
    sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert _read_reply(sock) == b""  # closed without an answer
  assert time.monotonic() - began < 5
  with _socket(server) as sock:  # a head, then a tenth of the promised body
    sock.sendall(
      b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      b'Content-Length: 100\r\n\r\n{"seed": 1'
    )
    reply = _read_reply(sock)
  assert reply.startswith(b"HTTP/1.1 408") and b'"field":"body"' in reply
  with _socket(server) as sock:  # an idle keep-alive connection
    sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _read_reply(sock).startswith(b"HTTP/1.1 200")  # answered, then closed
  assert server.config.backlog == 2048  # uvicorn's listen backlog (http.server: 5)
  assert server.config.timeout_keep_alive == 1


def test_the_token_is_checked_before_the_body_is_read(make_service):
  _, _, server, _ = make_service(server={"token": "s3cret", "trust_loopback": False})
  began = time.monotonic()
  with _socket(server) as sock:
    sock.sendall(
      b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      b"Content-Length: 60000\r\n\r\n"
    )
    reply = _read_reply(sock)
  assert reply.startswith(b"HTTP/1.1 401")
  assert time.monotonic() - began < app_lib.BODY_TIMEOUT_S  # did not wait for the body


def test_connections_and_event_streams_are_capped(make_service):
  _, _, server, client = make_service(
    server={"max_streams": 3, "max_streams_per_client": 2, "limit_concurrency": 8}
  )
  sid = client.create_session(paused=True)["session_id"]
  request = f"GET /api/sessions/{sid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
  streams = []

  def open_stream(source):
    sock = _socket(server, source)
    sock.sendall(request)
    head = sock.recv(65536)
    streams.append(sock)
    return head

  assert open_stream("127.0.0.1").startswith(b"HTTP/1.1 200")
  assert open_stream("127.0.0.1").startswith(b"HTTP/1.1 200")
  assert open_stream("127.0.0.1").startswith(b"HTTP/1.1 429")  # per client
  assert open_stream("127.0.0.2").startswith(b"HTTP/1.1 200")
  assert open_stream("127.0.0.3").startswith(b"HTTP/1.1 429")  # in total
  for sock in streams:
    sock.close()
  streams.clear()
  wait_for(lambda: not app_lib.streams_open(server.app))  # slots given back
  assert open_stream("127.0.0.1").startswith(b"HTTP/1.1 200")
  # Connections beyond limit_concurrency get 503 (idle ones count too).
  idle = [_socket(server) for _ in range(8)]
  try:
    wait_for(lambda: raw_request(server, "GET", "/api/health")[0] == 503)
  finally:
    for sock in idle + streams:
      sock.close()


def test_events_carry_what_changed_not_whole_lists(make_service):
  store, _, _, client = make_service()
  sid = client.create_session(seed=2, paused=True, backend_options={"latency_s": 0.01})[
    "session_id"
  ]
  wait_for(lambda: client.get_session(sid)["status"] == "paused")
  events = queue.Queue()
  reader = threading.Thread(target=lambda: [events.put(e) for e in client.events(sid)], daemon=True)
  reader.start()

  def next_event(kind):
    deadline = time.monotonic() + 20
    while True:
      got, data = events.get(timeout=max(0.01, deadline - time.monotonic()))
      if got == kind:
        return data

  first = next_event("session")
  assert first["guidance"] == []  # the first event: the whole session
  sent = [client.send_guidance(sid, f"hint {i}")["guidance"] for i in range(3)]
  for message in sent:  # one event per message, holding just that message
    assert next_event("guidance") == message
  client.control(sid, "resume")
  seen = []
  while not (
    any(k == "step" and d["step_index"] == 0 for k, d in seen)
    and any(k == "guidance" and d["delivered_step"] == 0 for k, d in seen)
    and any(k == "session" and d["status"] == "running" for k, d in seen)
  ):
    seen.append(events.get(timeout=20))
  for kind, data in seen:
    if kind == "session":
      assert "guidance" not in data and "flags" not in data  # status fields only
    if kind == "guidance":  # delivered at the first step
      assert data["delivered_step"] == 0 and data["guidance_id"] in {m["guidance_id"] for m in sent}
  client.control(sid, "pause")
  wait_for(lambda: client.get_session(sid)["status"] == "paused")
  client.flag_step(sid, 0, "bad", "wasteful")
  while (step := next_event("step"))["step_index"] != 0:
    pass  # the flagged step comes again, with its flag
  assert step["human_flag"] == "bad"
  client.control(sid, "stop")
  next_event("end")
  assert len(store.list_guidance(sid)) == 3


class _Crash(BaseException):
  """Not an Exception: what `except Exception` does not catch."""


class _CrashingEnv(research_env.ResearchEnv):
  def step(self, action):
    if self.t > 0:
      raise _Crash("the tool took the thread down")
    return super().step(action)


def test_a_dead_rollout_thread_marks_its_session_failed(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "s.sqlite"))
  factories = {"research": lambda session_id, workdir, **options: _CrashingEnv(**options)}
  manager = manager_lib.SessionManager(store, env_factories=factories)
  try:
    sid = manager.create_session({"seed": 0}).session_id
    assert manager.join([sid], timeout=20)
    session = manager.session_json(sid)
    assert session["status"] == "failed" and not session["live"]
    assert "_Crash: the tool took the thread down" in session["error"]
  finally:
    manager.shutdown()
    store.close()


def test_a_second_service_on_a_workdir_refuses(tmp_path):
  workdir = str(tmp_path)
  held = manager_lib.lock_workdir(workdir)
  try:
    with pytest.raises(manager_lib.WorkdirLocked, match="in use by pid"):
      manager_lib.lock_workdir(workdir)
    # Two headless runs on one workdir used to crash at export; the second now stops
    # at once with the reason.
    done = subprocess.run(
      [sys.executable, "-m", "experiments.rollout", "--headless", f"--workdir={workdir}"],
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert done.returncode != 0 and "in use by pid" in done.stderr, done.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "trajectories.sqlite"))
  finally:
    held.close()
  manager_lib.lock_workdir(workdir).close()  # free again


# ------------------------------------------------------------------ item 5
def test_malformed_requests_are_400s_that_name_the_field(make_service):
  store, _, server, client = make_service()
  sid = client.create_session(paused=True)["session_id"]
  big = str(10**23).encode()
  probes = [
    ("POST", f"/api/sessions/{sid}/guidance", b'{"text": "\\ud800 hi"}', "text"),
    (
      "POST",
      f"/api/sessions/{sid}/guidance",
      b'{"text": "hi", "meta": {"n": ' + big + b"}}",
      "meta.n",
    ),
    ("POST", f"/api/sessions/{sid}/guidance", b'{"text": "hi", "\\udfff": 1}', "\\udfff"),
    ("POST", "/api/sessions", b'{"seed": ' + big + b"}", "seed"),
    ("POST", "/api/sessions", b'{"seed": ' + b"9" * 5000 + b"}", "body"),
    ("POST", "/api/sessions", b'{"seed": NaN}', "body"),
    ("POST", "/api/sessions", b'{"seed": 1e999}', "seed"),
    ("POST", "/api/sessions", b"[" * 30000 + b"]" * 30000, "body"),
    ("POST", "/api/sessions", b'{"a": ' * 100 + b"1" + b"}" * 100, ".".join(["a"] * 65)),
    ("POST", "/api/sessions", b'{"env_options": {"bogus": 1}}', "env_options.bogus"),
    ("POST", "/api/sessions", b'{"agent": {"max_steps": "x"}}', "agent.max_steps"),
    ("POST", "/api/sessions", b'{"agent": {"max_steps": ' + big + b"}}", "agent.max_steps"),
    (
      "POST",
      "/api/sessions",
      b'{"backend_options": {"latency_s": "slow"}}',
      "backend_options.latency_s",
    ),
    ("POST", "/api/sessions", b'{"session_id": "a/b"}', "session_id"),
    ("POST", "/api/sessions", b'{"paused": [1]}', "paused"),
    ("POST", "/api/sessions", b"\xff\xfe", "body"),
    ("GET", f"/api/sessions/{sid}/steps?since=" + big.decode(), b"", "since"),
    ("GET", f"/api/sessions/{sid}/steps/" + big.decode(), b"", "step_index"),
    ("POST", f"/api/sessions/{sid}/steps/{big.decode()}/flag", b'{"flag": "bad"}', "step_index"),
    ("GET", f"/api/sessions/{sid}/events?since=-" + big.decode(), b"", "since"),
  ]
  for method, path, body, field in probes:
    status, payload = raw_request(server, method, path, body, JSON if body else {})
    assert status == 400 and payload["field"] == field, (path, body[:60], status, payload)
  with _socket(server) as sock:  # a negative Content-Length
    sock.sendall(
      b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      b"Content-Length: -1\r\n\r\n{}"
    )
    reply = _read_reply(sock)
  assert reply.startswith(b"HTTP/1.1 400") and b'"field": "Content-Length"' in reply
  # Nothing was stored, and the service carries on.
  assert [s.session_id for s in store.list_sessions()] == [sid]
  assert store.list_guidance(sid) == []
  assert client.request("GET", "/api/health")["ok"]
  client.control(sid, "stop")


def test_session_options_are_validated_before_anything_is_stored(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "s.sqlite"))
  manager = manager_lib.SessionManager(store)
  client = client_lib.LocalClient(manager)
  try:
    for spec, field in [
      ({"env_options": {"bogus": 1}}, "env_options.bogus"),
      ({"agent": {"max_steps": "x"}}, "agent.max_steps"),
      ({"env_options": {"time_scale_s": -1}}, "env_options.time_scale_s"),
    ]:
      with pytest.raises(manager_lib.ApiError) as refused:
        client.manager.create_session(spec)
      assert refused.value.status == 400 and refused.value.field == field
    assert store.list_sessions() == []
  finally:
    manager.shutdown()
    store.close()
