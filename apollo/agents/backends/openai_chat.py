"""A client of OpenAI-compatible chat-completions servers as a rollout backend.

Served models (vLLM or SGLang serving GLM-4.5, Qwen, ..., or this project's
`experiments.serve`) answer `POST {base_url}/chat/completions`; `OpenAIChatBackend`
sends the loop's exact messages there over the standard library's `urllib`, with
timeouts and retries. Given tools (native mode) it sends them as `tools` with
`tool_choice` and returns the reply's `tool_calls`; the server reads them out of
the model's text with its tool-call parser. A server that refuses `tools` (vLLM
without `--enable-auto-tool-choice`, for one) gets a `BackendError` that names the
fallback, `--tool_mode=text`. The same client serves the LLM judge
(`apollo.agents.supervision.llm_judge`), which sends no tools.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from apollo.agents import env as env_lib
from apollo.agents import tokens as tokens_lib
from apollo.agents.backends import base as backends_lib


class OpenAIChatBackend:
  """Client of an OpenAI-compatible chat-completions endpoint (stdlib only).

  Retries connection errors, timeouts, HTTP 408/409/429 and 5xx with exponential
  backoff (honouring `Retry-After`); other 4xx answers fail at once because
  retrying cannot fix them. Without tools (text mode), `tool_calls` a server
  returns anyway are written into the text in the JSON action format, so the
  loop's text parser still sees them.

  Args:
    tool_choice: sent with tools: 'auto' (the model decides) or 'required'
      (servers then make the model call a tool).
  """

  name = "openai"
  tool_mode = "native"

  def __init__(
    self,
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout_s: float = 300.0,
    max_retries: int = 4,
    backoff_s: float = 1.0,
    temperature: float = 0.6,
    max_tokens: int = 4096,
    extra_body: Mapping[str, Any] | None = None,
    tool_choice: str = "auto",
  ):
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    self.api_key = api_key
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.extra_body = dict(extra_body or {})
    self.tool_choice = tool_choice

  def complete(
    self, messages: backends_lib.Messages, tools: Sequence[env_lib.ToolSpec]
  ) -> backends_lib.ModelResponse:
    body: dict[str, Any] = {
      "model": self.model,
      "messages": [dict(m) for m in messages],
      "temperature": self.temperature,
      "max_tokens": self.max_tokens,
    }
    if tools:
      body["tools"] = env_lib.tools_as_openai(tools)
      body["tool_choice"] = self.tool_choice
    body.update(self.extra_body)
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    last_error = "no attempt"
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(min(30.0, self.backoff_s * 2 ** (attempt - 1)))
      request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
          answer = json.loads(reply.read().decode())
        return self._parse(answer, messages, native=bool(tools))
      except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        last_error = f"HTTP {e.code}: {detail}"
        if e.code not in (408, 409, 429) and e.code < 500:
          if tools and "tool" in detail.lower():
            raise backends_lib.BackendError(
              f"{self.url} refused the request's tools ({last_error}). This server does not "
              "take native tool calls as configured: enable its tool-call parser, or run "
              "with --tool_mode=text (calls written as JSON in the reply's text)."
            ) from e
          raise backends_lib.BackendError(last_error) from e
        retry_after = e.headers.get("Retry-After") if e.headers else None
        if retry_after and retry_after.isdigit():
          time.sleep(min(30.0, float(retry_after)))
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        last_error = f"{type(e).__name__}: {e}"
      except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        last_error = f"malformed answer: {type(e).__name__}: {e}"
    raise backends_lib.BackendError(
      f"{self.url}: giving up after {self.max_retries + 1} attempts: {last_error}"
    )

  def _parse(
    self, answer: Mapping[str, Any], messages: backends_lib.Messages, native: bool
  ) -> backends_lib.ModelResponse:
    message = answer["choices"][0]["message"]
    text = message.get("content") or ""
    calls = list(message.get("tool_calls") or ())
    if not native:
      for call in calls:
        fn = call["function"]
        try:
          arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
          arguments = fn.get("arguments")
        text += "\n" + json.dumps({"tool": fn["name"], "arguments": arguments})
      calls = []
    usage = answer.get("usage") or {}
    completion = text + "".join(json.dumps(c) for c in calls)
    return backends_lib.ModelResponse(
      text=text,
      prompt_tokens=int(usage.get("prompt_tokens") or tokens_lib.count_message_tokens(messages)),
      completion_tokens=int(
        usage.get("completion_tokens") or tokens_lib.approx_token_count(completion)
      ),
      raw=dict(answer),
      tool_calls=calls,
      content=text,
    )

  def snapshot(self) -> dict[str, Any]:
    return {}

  def restore(self, state: Mapping[str, Any]) -> None:
    del state


def make_openai_backend(
  seed: int, api_key_env: str | None = None, **options: Any
) -> OpenAIChatBackend:
  """The `'openai'` backend factory: `options` are `OpenAIChatBackend` arguments.

  The API key is read from the environment variable `api_key_env` at start-up, so
  it is never stored with a session.
  """
  del seed
  key = os.environ.get(api_key_env) if api_key_env else None
  return OpenAIChatBackend(api_key=key, **options)
