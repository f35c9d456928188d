"""Shared helpers of the agent tests: bounded waiting, controllable backends, and
research episodes played from canned responses."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from apollo.agents import agent
from apollo.agents.backends import base as backends_lib
from apollo.agents.envs import research as research_env


def raw_request(server: Any, method: str, path: str, body: bytes = b"", headers=None):
  """(status, JSON body or raw bytes) of one request to `server` (`.host`, `.port`)."""
  conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
  conn.request(method, path, body=body, headers=headers or {})
  reply = conn.getresponse()
  data = reply.read()
  conn.close()
  return reply.status, (json.loads(data) if data.startswith(b"{") else data)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005) -> Any:
  """Polls `predicate` until truthy; fails the test after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while True:
    value = predicate()
    if value:
      return value
    if time.monotonic() > deadline:
      raise AssertionError(f"condition not met within {timeout}s")
    time.sleep(interval)


class GatedBackend:
  """Wraps a backend; each model call waits for a permit from the test."""

  def __init__(self, inner: Any):
    self.inner = inner
    self.name = "gated"
    self.tool_mode = getattr(inner, "tool_mode", "text")
    self.permits = threading.Semaphore(0)
    self.calls = 0
    self.entered = threading.Event()

  def release(self, n: int = 1) -> None:
    for _ in range(n):
      self.permits.release()

  def complete(
    self, messages: Sequence[Mapping[str, str]], tools: Any
  ) -> backends_lib.ModelResponse:
    self.entered.set()
    assert self.permits.acquire(timeout=30), "test never released the model call"
    self.calls += 1
    return self.inner.complete(messages, tools)

  def snapshot(self) -> dict[str, Any]:
    return self.inner.snapshot()

  def restore(self, state: Mapping[str, Any]) -> None:
    self.inner.restore(state)


class ListBackend:
  """Returns canned responses in order (then repeats the last)."""

  name = "list"

  def __init__(self, responses: Sequence[str]):
    self.responses = list(responses)
    self.seen: list[list[dict[str, str]]] = []

  def complete(self, messages, tools):
    del tools
    self.seen.append([dict(m) for m in messages])
    text = self.responses[min(len(self.seen) - 1, len(self.responses) - 1)]
    return backends_lib.ModelResponse(text=text, prompt_tokens=1, completion_tokens=1)

  def snapshot(self):
    return {"n": len(self.seen)}

  def restore(self, state):
    del state


def call(tool: str, **arguments: Any) -> str:
  """A model response holding one tool call."""
  return f"Next.\n{json.dumps({'tool': tool, 'arguments': arguments})}"


def run_canned(
  store: Any,
  session_id: str,
  seed: int,
  responses: Sequence[str],
  guidance_after: Mapping[int, str] | None = None,
) -> None:
  """Plays `responses` on the research task `seed` through the real loop and store;
  guidance_after[k] is sent once step k is stored (so it is delivered with step k + 1)."""
  guidance_after = guidance_after or {}

  def listener(step):
    if step.step_index in guidance_after:
      store.add_guidance(session_id, guidance_after[step.step_index])

  agent.run_episode(
    session_id,
    research_env.ResearchEnv(),
    ListBackend(responses),
    store,
    seed,
    config=agent.AgentConfig(max_steps=len(responses)),
    listeners=[listener],
  )
  assert store.num_steps(session_id) == len(responses)
