"""HTTP API, live events, concurrency, bad input, access control and the CLI."""

import json
import os

import pytest

from apollo.agents import storage
from apollo.agents.service import app as app_lib
from apollo.agents.service import cli
from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib
from tests.agents.helpers import raw_request, wait_for


@pytest.fixture
def stack(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  # An operator-configured backend whose model server is unreachable.
  down = manager_lib.BackendProfile(
    "openai",
    {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0, "timeout_s": 1},
  )
  manager = manager_lib.SessionManager(
    store, workdir=str(tmp_path), backends={**manager_lib.DEFAULT_BACKENDS, "down": down}
  )
  server = app_lib.RolloutServer(manager, "127.0.0.1", 0).start()
  yield store, manager, server, client_lib.HttpClient(server.url, timeout_s=20)
  server.stop()
  manager.shutdown()
  store.close()


def _finished(client, sid):
  return client.get_session(sid)["status"] in ("finished", "stopped", "failed")


def test_session_lifecycle_and_live_events(stack):
  store, _, _, client = stack
  created = client.create_session(seed=3, backend_options={"latency_s": 0.001})
  sid = created["session_id"]
  events = list(client.events(sid))  # follows the stream until the `end` event
  kinds = [k for k, _ in events]
  assert kinds[-1] == "end" and events[-1][1]["status"] == "finished"
  step_events = [d["step_index"] for k, d in events if k == "step"]
  assert step_events == list(range(store.num_steps(sid)))
  session = client.get_session(sid)
  assert session["result"]["steps"] == session["num_steps"] >= 50
  step = client.request("GET", f"/api/sessions/{sid}/steps/0")
  assert step["messages"][0]["role"] == "system"
  [line] = client.export(sid).splitlines()  # one line per episode
  episode = json.loads(line)
  assert episode["session_id"] == sid and len(episode["steps"]) == session["num_steps"]
  # The service's scripted policy calls tools natively.
  assert all(s["call"]["mode"] == "native" for s in episode["steps"])
  assert sum(m["role"] == "tool" for m in episode["messages"]) >= session["num_steps"] - 5
  # Reconnecting with Last-Event-ID style `since` replays only newer steps.
  replay = [d for k, d in client.events(sid, since=session["num_steps"] - 3) if k == "step"]
  assert [d["step_index"] for d in replay] == list(
    range(session["num_steps"] - 2, session["num_steps"])
  )


def test_sixteen_sessions_run_concurrently_and_take_guidance(stack):
  store, manager, _, client = stack
  # Created paused, so that all 16 start together however loaded this machine is.
  ids = [
    client.create_session(
      seed=i, backend_options={"latency_s": 0.02}, paused=True, agent={"max_steps": 30}
    )["session_id"]
    for i in range(16)
  ]
  wait_for(lambda: all(client.get_session(s)["status"] == "paused" for s in ids))
  for sid in ids:
    client.control(sid, "resume")
  wait_for(lambda: all(store.num_steps(s) >= 1 for s in ids), timeout=30)
  sent = {}
  for sid in ids:  # while they run
    try:
      sent[sid] = client.send_guidance(sid, "GPU 0 is shared; use gpu 1 instead.")["guidance"]
    except manager_lib.ApiError as e:
      assert e.status == 409  # only if that session already finished
  assert len(sent) >= 8
  assert manager.join(ids, timeout=60)
  spans = []
  for sid in ids:
    steps = store.get_steps(sid, full=False)
    assert len(steps) == 30 and [s.step_index for s in steps] == list(range(30))
    spans.append((steps[0].started_at, steps[-1].finished_at))
    if sid in sent:
      [g] = store.list_guidance(sid)
      assert g.guidance_id == sent[sid]["guidance_id"]
      # Delivered at the next turn, unless it arrived after the last turn had begun.
      assert g.delivered_step is not None or g.sent_at > steps[-1].started_at
  # Every session was running while every other one was: nobody waited for a slot.
  assert max(start for start, _ in spans) < min(end for _, end in spans)


def test_bad_input_gets_4xx_and_the_service_keeps_running(stack):
  store, _, server, client = stack
  sid = client.create_session(seed=1, backend_options={"latency_s": 0.0})["session_id"]
  wait_for(lambda: _finished(client, sid), timeout=30)
  json_h = {"Content-Type": "application/json"}
  cases = [
    ("POST", f"/api/sessions/{sid}/guidance", b'{"text": ', json_h, 400, "malformed JSON"),
    ("POST", f"/api/sessions/{sid}/guidance", b"[1, 2]", json_h, 400, "JSON object"),
    ("POST", f"/api/sessions/{sid}/guidance", b'{"txt": "hi"}', json_h, 400, "unknown field"),
    (
      "POST",
      f"/api/sessions/{sid}/guidance",
      b'{"text": "hi"}',
      {"Content-Type": "text/plain"},
      415,
      "application/json",
    ),
    (
      "POST",
      f"/api/sessions/{sid}/guidance",
      b"x" * (app_lib.MAX_BODY_BYTES + 1),
      json_h,
      413,
      "exceeds",
    ),
    (
      "POST",
      f"/api/sessions/{sid}/guidance",
      json.dumps({"text": "y" * (manager_lib.MAX_GUIDANCE_CHARS + 1)}).encode(),
      json_h,
      413,
      "limit",
    ),
    ("POST", "/api/sessions/nope/guidance", b'{"text": "hi"}', json_h, 404, "unknown session"),
    ("GET", "/api/sessions/nope", b"", {}, 404, "unknown session"),
    ("GET", "/api/sessions/nope/steps", b"", {}, 404, "unknown session"),
    ("GET", "/api/sessions/nope/events", b"", {}, 404, "unknown session"),
    ("POST", f"/api/sessions/{sid}/guidance", b'{"text": "too late"}', json_h, 409, "finished"),
    ("POST", f"/api/sessions/{sid}/pause", b"{}", json_h, 409, "finished"),
    ("POST", f"/api/sessions/{sid}/pause", b"", {"X-Apollo-Request": "1"}, 409, "finished"),
    ("POST", f"/api/sessions/{sid}/pause", b"", {}, 415, "Content-Type"),
    ("POST", f"/api/sessions/{sid}/steps/999999/flag", b'{"flag": "bad"}', json_h, 404, "no step"),
    ("POST", f"/api/sessions/{sid}/steps/1/flag", b'{"flag": "meh"}', json_h, 400, "flag"),
    ("GET", f"/api/sessions/{sid}/steps/999999", b"", {}, 404, "no step"),
    ("GET", f"/api/sessions/{sid}/steps?since=abc", b"", {}, 400, "since"),
    ("POST", "/api/sessions", b'{"env": "mars"}', json_h, 400, "unknown env"),
    ("POST", "/api/sessions", b'{"seed": -1}', json_h, 400, "seed"),
    (
      "POST",
      "/api/sessions",
      b'{"backend": "down", "backend_options": {"api_key": "k"}}',
      json_h,
      400,
      "backend_options.api_key",
    ),
    (
      "POST",
      "/api/sessions",
      json.dumps({"session_id": sid}).encode(),
      json_h,
      409,
      "already exists",
    ),
    ("GET", "/api/nothing", b"", {}, 404, "no route"),
    ("DELETE", f"/api/sessions/{sid}", b"", {"X-Apollo-Request": "1"}, 405, "not allowed"),
  ]
  for method, path, body, headers, status, fragment in cases:
    got, payload = raw_request(server, method, path, body, headers)
    assert got == status, (method, path, got, payload)
    assert fragment in payload["error"], (path, payload)
  assert store.list_guidance(sid) == []  # nothing was stored by any refused request
  assert len(store.list_sessions()) == 1
  assert client.request("GET", "/api/health")["ok"]
  # Same client id twice: stored once.
  sid2 = client.create_session(seed=2, paused=True)["session_id"]
  a = client.send_guidance(sid2, "filter first", client_msg_id="same")
  b = client.send_guidance(sid2, "filter first", client_msg_id="same")
  assert a["created"] and not b["created"] and len(store.list_guidance(sid2)) == 1
  client.control(sid2, "stop")


def test_pause_resume_flag_and_cli_over_http(stack, capsys):
  store, _, server, client = stack
  sid = client.create_session(seed=5, paused=True, backend_options={"latency_s": 0.002})[
    "session_id"
  ]
  wait_for(lambda: client.get_session(sid)["status"] == "paused")
  assert store.num_steps(sid) == 0
  url = ["--url", server.url]
  assert cli.main(url + ["guide", sid, "Launch", "on", "gpu", "1", "instead."]) == 0
  assert cli.main(url + ["resume", sid]) == 0
  wait_for(lambda: store.num_steps(sid) >= 3)
  assert store.get_step(sid, 0).guidance_ids  # delivered at the first turn after resume
  assert cli.main(url + ["pause", sid]) == 0
  wait_for(lambda: client.get_session(sid)["status"] == "paused")
  assert cli.main(url + ["flag", sid, "1", "bad", "--reason", "wasteful"]) == 0
  assert cli.main(url + ["flag", sid, "2", "good"]) == 0
  assert store.get_step(sid, 1).human_flag == "bad"
  assert store.get_step(sid, 1).human_flag_reason == "wasteful"
  assert client.get_session(sid)["flags"] == {"good": 1, "bad": 1}
  assert cli.main(url + ["interrupt", sid]) == 0  # nothing running: answered, not an error
  assert cli.main(url + ["resume", sid]) == 0
  assert cli.main(url + ["steps", sid, "--limit", "2"]) == 0
  assert cli.main(url + ["list"]) == 0
  out = capsys.readouterr().out
  assert sid in out and "buffered" in out
  wait_for(lambda: _finished(client, sid), timeout=30)
  assert cli.main(url + ["guide", sid, "late"]) == 1
  assert "409" in capsys.readouterr().err
  kinds = [e["kind"] for e in store.list_events(sid)]
  assert kinds.count("pause") == 1 and kinds.count("resume") == 2 and "flag" in kinds


def test_tool_mode_is_a_session_option(stack, capsys):
  store, _, server, client = stack
  url = ["--url", server.url]
  assert cli.main(url + ["create", "--seed", "4", "--tool_mode", "text", "--paused"]) == 0
  sid = capsys.readouterr().out.strip()
  assert store.get_session(sid).config["agent"] == {"tool_mode": "text"}
  client.control(sid, "resume")
  wait_for(lambda: store.num_steps(sid) >= 2)
  client.control(sid, "stop")
  steps = store.get_steps(sid)
  assert steps[0].call["mode"] == "text" and not steps[0].tool_calls
  assert '"tool": ' in steps[0].response  # the JSON-in-text call
  with pytest.raises(manager_lib.ApiError, match="tool_mode"):
    client.create_session(seed=1, agent={"tool_mode": "xml"})


def test_access_rules():
  # Loopback clients need no token; others need the right one.
  assert app_lib.check_access("127.0.0.1", "127.0.0.1:8765", None, None, None) is None
  assert app_lib.check_access("::1", "localhost:1", None, None, "tok") is None
  assert app_lib.check_access("10.1.2.3", "h:1", None, None, None)[0] == 401
  assert app_lib.check_access("10.1.2.3", "h:1", None, None, "tok")[0] == 401
  assert app_lib.check_access("10.1.2.3", "h:1", "Bearer nope", None, "tok")[0] == 401
  assert app_lib.check_access("10.1.2.3", "h:1", "Bearer tok", None, "tok") is None
  assert app_lib.check_access("10.1.2.3", "h:1", None, "tok", "tok") is None
  # A web page that rebinds its own domain to 127.0.0.1 is refused.
  assert app_lib.check_access("127.0.0.1", "evil.example:8765", None, None, None)[0] == 403
  with pytest.raises(ValueError, match="token"):
    app_lib.RolloutServer(None, "0.0.0.0", 0, token=None)


def test_token_is_enforced_for_untrusted_clients(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "s.sqlite"))
  manager = manager_lib.SessionManager(store)
  # trust_loopback=False treats this loopback test client like a remote one.
  server = app_lib.RolloutServer(
    manager, "127.0.0.1", 0, token="s3cret", trust_loopback=False
  ).start()
  try:
    status, payload = raw_request(server, "GET", "/api/sessions")
    assert status == 401 and "token" in payload["error"]
    status, _ = raw_request(
      server, "GET", "/api/sessions", headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401
    assert client_lib.HttpClient(server.url, token="s3cret").list_sessions() == []
    status, _ = raw_request(server, "GET", "/?token=s3cret")
    assert status == 200
  finally:
    server.stop()
    manager.shutdown()
    store.close()


def test_a_failed_session_restarts_from_its_last_step(stack):
  store, _, _, client = stack
  # The model server is unreachable: the session fails after its retries...
  sid = client.create_session(seed=0, backend="down")["session_id"]
  wait_for(lambda: client.get_session(sid)["status"] == "failed", timeout=20)
  session = client.get_session(sid)
  assert "BackendError" in session["error"] and session["num_steps"] == 0
  # ...and `resume` restarts it (here it fails again the same way, with nothing lost).
  client.control(sid, "resume")
  wait_for(lambda: [e["kind"] for e in store.list_events(sid)].count("restart") == 1)
  wait_for(lambda: client.get_session(sid)["status"] == "failed", timeout=20)
