"""The OpenAI-compatible client against a fake local server and against the
project's own server (`apollo.models.serving`) with a canned generator."""

import http.server
import json
import os
import threading

import pytest

from apollo.agents import agent, storage
from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import openai_chat
from apollo.agents.envs import research as research_env
from apollo.models import serving
from tests import servers
from tests.agents.backends import native_helpers


class _FakeServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, script):
    self.script = list(script)  # (status, payload) answered in order
    self.requests = []
    super().__init__(("127.0.0.1", 0), _FakeHandler)


class _FakeHandler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):
    del args

  def do_POST(self):  # pylint: disable=invalid-name
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    self.server.requests.append((self.path, dict(self.headers), body))
    status, payload = self.server.script.pop(0) if self.server.script else (500, {})
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)


@pytest.fixture
def fake():
  servers = []

  def make(script):
    server = _FakeServer(script)
    threading.Thread(
      target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    servers.append(server)
    return server

  yield make
  for server in servers:
    server.shutdown()
    server.server_close()


def _ok(content, tool_calls=None):
  message = {"role": "assistant", "content": content}
  if tool_calls:
    message["tool_calls"] = tool_calls
  return 200, {
    "choices": [{"message": message}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7},
  }


def test_openai_client_retries_then_succeeds(fake):
  server = fake(
    [
      (503, {"error": "busy"}),
      (429, {"error": "slow down"}),
      _ok('ok {"tool": "sleep", "arguments": {"hours": 0.5}}'),
    ]
  )
  client = openai_chat.OpenAIChatBackend(
    f"http://127.0.0.1:{server.server_address[1]}/v1",
    model="glm-4.5",
    api_key="k",
    backoff_s=0.01,
    max_retries=3,
    timeout_s=5,
  )
  messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
  reply = client.complete(messages, ())
  assert reply.text.endswith('{"tool": "sleep", "arguments": {"hours": 0.5}}')
  assert (reply.prompt_tokens, reply.completion_tokens) == (11, 7)
  assert len(server.requests) == 3
  path, headers, body = server.requests[-1]
  assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
  assert body["model"] == "glm-4.5" and body["messages"] == messages


def test_openai_client_does_not_retry_client_errors(fake):
  server = fake([(400, {"error": "bad request"})])
  client = openai_chat.OpenAIChatBackend(
    f"http://127.0.0.1:{server.server_address[1]}/v1", model="m", backoff_s=0.01, timeout_s=5
  )
  with pytest.raises(backends_lib.BackendError, match="HTTP 400"):
    client.complete([{"role": "user", "content": "x"}], ())
  assert len(server.requests) == 1


def test_openai_client_gives_up_after_retries(fake):
  server = fake([])  # always 500
  client = openai_chat.OpenAIChatBackend(
    f"http://127.0.0.1:{server.server_address[1]}/v1",
    model="m",
    backoff_s=0.01,
    max_retries=2,
    timeout_s=5,
  )
  with pytest.raises(backends_lib.BackendError, match="3 attempts"):
    client.complete([{"role": "user", "content": "x"}], ())


def test_text_mode_writes_returned_tool_calls_as_json_actions(fake):
  call = {
    "id": "c1",
    "type": "function",
    "function": {"name": "check_run", "arguments": '{"run_id": "r1"}'},
  }
  server = fake([_ok(None, [call])])
  client = openai_chat.OpenAIChatBackend(
    f"http://127.0.0.1:{server.server_address[1]}", model="m", timeout_s=5
  )
  action, error = agent.parse_tool_call(
    client.complete([{"role": "user", "content": "x"}], ()).text
  )
  assert error is None and action.tool == "check_run" and action.arguments == {"run_id": "r1"}


def test_native_mode_sends_tools_and_returns_tool_calls(fake):
  call = {
    "id": "c1",
    "type": "function",
    "function": {"name": "check_run", "arguments": '{"run_id": "r1"}'},
  }
  server = fake([_ok("Checking.", [call])])
  client = openai_chat.OpenAIChatBackend(
    f"http://127.0.0.1:{server.server_address[1]}", model="m", timeout_s=5, tool_choice="required"
  )
  tools = research_env.ResearchEnv().tools()
  reply = client.complete([{"role": "user", "content": "x"}], tools)
  assert reply.tool_calls == [call] and reply.content == reply.text == "Checking."
  _, _, body = server.requests[-1]
  assert body["tool_choice"] == "required"
  assert body["tools"] == [t.to_openai() for t in tools]
  assert body["tools"][0] == {
    "type": "function",
    "function": {
      "name": "list_files",
      "description": tools[0].description,
      "parameters": dict(tools[0].parameters),
    },
  }


def test_a_server_that_refuses_tools_names_the_text_fallback(fake):
  refusal = {"error": {"message": '"auto" tool choice requires --enable-auto-tool-choice'}}
  server = fake([(400, refusal), (400, refusal)])
  client = openai_chat.OpenAIChatBackend(
    f"http://127.0.0.1:{server.server_address[1]}", model="m", timeout_s=5
  )
  with pytest.raises(backends_lib.BackendError, match="--tool_mode=text"):
    client.complete([{"role": "user", "content": "x"}], research_env.ResearchEnv().tools())
  # Without tools the same answer is an ordinary client error.
  with pytest.raises(backends_lib.BackendError) as error:
    client.complete([{"role": "user", "content": "x"}], ())
  assert "--tool_mode" not in str(error.value) and len(server.requests) == 2


def test_episode_against_the_projects_server_with_native_tool_calls(tmp_path):
  """The loop -> OpenAIChatBackend -> apollo.models.serving (Hermes parsing) -> back."""
  checkpoint = native_helpers.tiny_checkpoint(tmp_path)
  h = native_helpers.hermes
  generator = native_helpers.CannedGenerator(
    checkpoint.tokenizer,
    [
      "Let me look.\n" + h("list_files"),
      h("read_file", path="README.md"),
      '<tool_call>\n{"name": "sleep", "arguments": {"hours": 0.5}\n</tool_call>',
      h("launch_rocket"),
      h("sleep", hours=-1),
      "I am not sure what to do.",
      h("gpu_status") + "\n" + h("list_jobs"),
      h("finish"),
    ],
  )
  server = servers.ThreadedUvicorn(
    serving.create_app(checkpoint, generator, model_name="tiny-chat")
  )
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  try:
    backend = openai_chat.OpenAIChatBackend(
      server.url + "/v1", model="tiny-chat", timeout_s=10, max_tokens=256
    )
    result = agent.run_episode("e2e", research_env.ResearchEnv(), backend, store, seed=0)
    steps = store.get_steps("e2e")
  finally:
    server.close()
    store.close()
  assert result["steps"] == 8 and steps[-1].done
  checks = [s.call for s in steps]
  assert [c["parsed"] for c in checks] == [True, True, False, True, True, False, False, True]
  assert [c["schema_ok"] for c in checks] == [True, True, False, False, False, False, False, True]
  assert checks[2]["malformed"] and checks[3]["unknown_tool"] and checks[5]["no_call"]
  assert checks[6]["multiple"] and checks[6]["calls"] == 2
  assert steps[0].assistant_message["content"] == "Let me look."
  assert steps[0].action == {"tool": "list_files", "arguments": {}}
  # The server saw the tools and, on later turns, the calls and results in its format.
  first, last = generator.prompt_text(0), generator.prompt_text(-1)
  assert "<tools>" in first and '"name": "finish"' in first
  assert '<tool_call>\n{"name": "read_file", "arguments": {"path": "README.md"}}' in last
  assert '<tool_response>\n<observation step="0" tool="list_files">' in last
  assert "ERROR: unknown tool 'launch_rocket'" in last
