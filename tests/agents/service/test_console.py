"""The web console in headless Chromium: live view, guidance, pause/resume, flags,
and each step's full reply, parsed call and exact messages.

Needs Debian's `chromium` and the Python `playwright` package (no browser download);
skipped with the reason when either is missing.
"""

import os
import shutil
import threading

import pytest

from apollo.agents import storage
from apollo.agents.envs import research
from apollo.agents.service import app as app_lib
from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib
from tests.agents.helpers import call, run_canned, wait_for

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


class _GatedResearchEnv(research.ResearchEnv):
  """The research env whose 7th step waits for `gate`: the session cannot finish
  before the test has clicked pause, however slow the machine."""

  gate = threading.Event()

  def __init__(self, **options):
    super().__init__(**options)
    self._steps = 0

  def step(self, action):
    self._steps += 1
    if self._steps == 7:
      self.gate.wait(60)
    return super().step(action)


def test_console_steers_a_live_session(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  gated = lambda session_id, workdir, **options: _GatedResearchEnv(**options)  # noqa: E731
  _GatedResearchEnv.gate.clear()
  manager = manager_lib.SessionManager(
    store, env_factories={**manager_lib.ENV_FACTORIES, "research": gated}
  )
  server = app_lib.RolloutServer(manager, "127.0.0.1", 0).start()
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

      # The flag buttons show text and an inline icon (emoji glyphs are missing here).
      for flag in ("good", "bad"):
        button = f'#steps tr[data-step="0"] .flag-{flag}'
        assert page.text_content(button).strip() == flag
        assert page.query_selector(button + " svg") is not None
        assert page.locator(button).bounding_box()["width"] > 20

      page.click("#pause-btn")
      wait_for(lambda: manager.session_json(sid)["paused"], timeout=20)
      _GatedResearchEnv.gate.set()  # the 7th step ends; the loop pauses before the 8th
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
    _GatedResearchEnv.gate.set()
    server.stop()
    manager.shutdown()
    store.close()


# A reply that looks like markup, long enough to be cut in the row's preview.
HTML_REPLY = (
  '<b id="injected">bold</b><img src="x" onerror="window.__injected = 1">'
  + " thinking it over. " * 60
  + "\n"
  + call("list_files")
)
UNPARSED_REPLY = '{"tool": "sleep", "arguments": {"hours": 0.5}'  # the closing brace is missing


def test_console_shows_replies_parse_failures_and_messages(tmp_path):
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  run_canned(store, "canned", 0, [HTML_REPLY, UNPARSED_REPLY, call("gpu_status")])
  manager = manager_lib.SessionManager(store)
  server = app_lib.RolloutServer(manager, "127.0.0.1", 0).start()
  row = '#steps tr[data-step="{}"] '.format
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
      page = browser.new_page()
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(server.url + "/")
      page.click('.session-item[data-id="canned"]', timeout=10_000)
      page.wait_for_selector(row(2), timeout=10_000)

      # A parsed call: its tool in the row, no failure badge; the reply stays text.
      assert "list_files" in page.text_content(row(0) + ".call-line")
      assert page.query_selector(row(0) + ".badge.parse-error") is None
      # A reply that did not parse: a visible badge, the parse error as its tooltip.
      assert page.is_visible(row(1) + ".badge.parse-error")
      assert "unparsed" in page.get_attribute(row(1), "class")
      assert page.get_attribute(row(1) + ".badge.parse-error", "title") == (
        store.get_step("canned", 1).parse_error
      )

      # Expanding the full reply shows it verbatim, as text; the parsed call beside it.
      assert not page.is_visible(row(0) + ".reply-text")
      page.click(row(0) + "details.reply > summary")
      assert page.is_visible(row(0) + ".reply-text")
      assert page.text_content(row(0) + ".reply-text") == HTML_REPLY
      assert '"tool": "list_files"' in page.text_content(row(0) + ".parsed-call")
      page.click(row(1) + "details.reply > summary")
      assert page.text_content(row(1) + ".parsed-call").startswith("none: ")
      assert page.query_selector("#injected") is None and page.query_selector("#steps img") is None
      assert page.evaluate("window.__injected") is None

      # The exact messages, fetched on demand: those the model was given, then its reply.
      step = store.get_step("canned", 1)
      assert page.query_selector(row(1) + ".messages details.msg") is None
      page.click(row(1) + "button.load-messages")
      page.wait_for_selector(row(1) + ".messages details.msg", timeout=10_000)
      items = page.query_selector_all(row(1) + ".messages details.msg")
      assert len(items) == len(step.messages) + 1
      contents = [i.query_selector(".msg-content").text_content() for i in items]
      assert contents == [m["content"] for m in step.messages] + [UNPARSED_REPLY]
      assert "reply-msg" in items[-1].get_attribute("class")
      assert "role-system" in items[0].get_attribute("class")

      # Flagging updates the row in place: what was opened stays open.
      page.click(row(1) + ".flag-bad")
      page.wait_for_selector(row(1).strip() + ".flag-bad-row", timeout=10_000)
      wait_for(lambda: store.get_step("canned", 1).human_flag == "bad")
      assert page.get_attribute(row(0) + "details.reply", "open") is not None
      assert page.is_visible(row(1) + ".messages details.msg")
      browser.close()
    assert errors == []
  finally:
    server.stop()
    manager.shutdown()
    store.close()
