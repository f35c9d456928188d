"""A page from another origin, in headless Chromium, cannot steer the rollout service.

The page (served on another port of this machine: another origin) tries what needs no
CORS permission: bodiless and text/plain POSTs, a form, and a JSON fetch (which the
browser preflights). None of them pauses, stops or creates a session. Needs Debian's
`chromium` and the Python `playwright` package; skipped when either is missing.
"""

import http.server
import os
import threading

import pytest

from apollo.agents import storage
from apollo.agents.service import app as app_lib
from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib
from tests.agents.helpers import wait_for
from tests.agents.service.test_console import CHROMIUM, CHROMIUM_ARGS, sync_playwright

pytestmark = [
  pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed"),
  pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
]

ATTACK = """<!doctype html><html><body>
<form id="f" method="POST" enctype="text/plain" target="sink">
<input name='{"x":"' value='"}'></form>
<iframe name="sink"></iframe>
<script>
async function attack(service, sid) {
  const tries = [
    [`/api/sessions/${sid}/pause`, {method: 'POST', mode: 'no-cors'}],
    [`/api/sessions/${sid}/stop`, {method: 'POST', mode: 'no-cors',
                                   headers: {'Content-Type': 'text/plain'}, body: '{}'}],
    ['/api/sessions', {method: 'POST', mode: 'no-cors'}],
    ['/api/sessions', {method: 'POST', mode: 'no-cors',
                       headers: {'Content-Type': 'text/plain'}, body: '{"seed": 9}'}],
    [`/api/sessions/${sid}/stop`, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                   body: '{}'}],
    ['/api/sessions', {method: 'POST', headers: {'X-Apollo-Request': '1'}}],
  ];
  const outcomes = [];
  for (const [path, init] of tries) {
    try {
      const reply = await fetch(service + path, init);
      outcomes.push(reply.type === 'opaque' ? 'opaque' : String(reply.status));
    } catch (e) {
      outcomes.push('blocked');  // the preflight was refused
    }
  }
  return outcomes;
}
function submitForm(action) {
  const form = document.getElementById('f');
  form.action = action;
  form.submit();
}
</script></body></html>"""


class _AttackPage(http.server.BaseHTTPRequestHandler):
  def do_GET(self):  # pylint: disable=invalid-name
    body = ATTACK.encode()
    self.send_response(200)
    self.send_header("Content-Type", "text/html; charset=utf-8")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args


def test_a_page_from_another_origin_cannot_pause_stop_or_create(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  manager = manager_lib.SessionManager(store)
  server = app_lib.RolloutServer(manager, "127.0.0.1", 0).start()
  attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AttackPage)
  threading.Thread(target=attacker.serve_forever, daemon=True).start()
  client = client_lib.HttpClient(server.url)
  sid = client.create_session(seed=0, session_id="victim", backend_options={"latency_s": 0.05})[
    "session_id"
  ]
  try:
    wait_for(lambda: store.get_session(sid).status == "running")
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
      page = browser.new_page()
      page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
      outcomes = page.evaluate("([url, sid]) => attack(url, sid)", [server.url, sid])
      # The JSON fetch was preflighted and refused; the rest went out blind (opaque).
      assert outcomes[4] == "blocked" and outcomes[5] == "blocked", outcomes
      for path in (f"/api/sessions/{sid}/pause", f"/api/sessions/{sid}/stop", "/api/sessions"):
        target = server.url + path
        with page.expect_response(lambda r, target=target: r.url == target) as answer:
          page.evaluate("(url) => submitForm(url)", target)
        assert answer.value.status in (403, 415)
      browser.close()
    # Everything the page sent has been answered by now (fetches awaited, forms' answers
    # seen).
    assert [s.session_id for s in store.list_sessions()] == [sid]
    assert store.get_session(sid).status == "running"
    assert not {"pause", "stop"} & {e["kind"] for e in store.list_events(sid)}
    client.control(sid, "pause")  # the service itself still obeys its own client
    wait_for(lambda: store.get_session(sid).status == "paused", timeout=20)
  finally:
    attacker.shutdown()
    attacker.server_close()
    server.stop()
    manager.shutdown()
    store.close()
