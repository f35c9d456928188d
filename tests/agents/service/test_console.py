"""The web console in headless Chromium: live view, guidance, pause/resume, flags.

Needs Debian's `chromium` and the Python `playwright` package (no browser download);
skipped with the reason when either is missing.
"""

import os
import shutil

import pytest

from apollo.agents import storage
from apollo.agents.service import client as client_lib
from apollo.agents.service import http_api
from apollo.agents.service import manager as manager_lib
from tests.agents.helpers import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  sync_playwright = None

pytestmark = [
  pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed"),
  pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
]

CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
]


def test_console_steers_a_live_session(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  manager = manager_lib.SessionManager(store)
  server = http_api.RolloutHTTPServer(manager, "127.0.0.1", 0).start()
  client = client_lib.HttpClient(server.url)
  sid = client.create_session(
    seed=0, paused=True, session_id="web", backend_options={"latency_s": 0.05}
  )["session_id"]
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
      page = browser.new_page()
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(server.url + "/")
      page.click(f'.session-item[data-id="{sid}"]', timeout=10_000)
      page.wait_for_selector("#status.paused", timeout=10_000)

      # Guidance sent while paused waits for the agent's next turn.
      page.fill("#guidance-text", "The labels are noisy; run filter_labels first.")
      page.click("#send-guidance")
      page.wait_for_selector("#guidance-list li.pending", timeout=10_000)
      assert [g.text for g in store.list_guidance(sid)] == [
        "The labels are noisy; run filter_labels first."
      ]

      # Resume: steps stream in live; the first one carries the guidance.
      page.click("#resume-btn")
      page.wait_for_selector('#steps tr[data-step="5"]', timeout=20_000)
      assert "guided" in page.get_attribute('#steps tr[data-step="0"]', "class")
      page.wait_for_selector("#guidance-list li.delivered", timeout=10_000)

      page.click("#pause-btn")
      wait_for(lambda: store.get_session(sid).status == "paused", timeout=20)
      page.wait_for_selector("#status.paused", timeout=20_000)

      # Flag a step bad with a reason.
      page.fill("#flag-reason", "wasted an hour")
      page.click('#steps tr[data-step="2"] .flag-bad')
      wait_for(lambda: store.get_step(sid, 2).human_flag == "bad")
      assert store.get_step(sid, 2).human_flag_reason == "wasted an hour"
      page.wait_for_selector('#steps tr[data-step="2"].flag-bad-row', timeout=10_000)

      page.click("#stop-btn")
      wait_for(lambda: store.get_session(sid).status == "stopped", timeout=20)
      try:
        page.wait_for_selector("#status.stopped", timeout=20_000)
      except Exception:
        raise AssertionError(
          "console did not show the stop; message: " + page.text_content("#message")
        ) from None
      browser.close()
    assert errors == []
    assert store.get_session(sid).status == "stopped"
  finally:
    server.stop()
    manager.shutdown()
    store.close()
