"""The OpenAI-compatible client against a fake local server."""

import http.server
import json
import threading

import pytest

from apollo.agents import agent
from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import openai_chat


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


def test_native_tool_calls_become_the_json_action_format(fake):
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
