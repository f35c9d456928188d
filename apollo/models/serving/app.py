"""The FastAPI app: OpenAI's chat-completions API over a :class:`DecodeBatcher`.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain or streamed as
server-sent events ending in ``data: [DONE]``), ``GET /v1/stats`` (the batcher's
totals: decode steps/s, rows per step, queue waits) and ``GET /health``; FastAPI
serves the schema at ``/openapi.json`` and the docs at ``/docs``.

Each completion reports where its time went in response headers:
``x-queue-wait-ms`` (from arrival to the start of its prefill), ``x-batch-rows``
(rows decoding together when it joined) and, on plain responses,
``x-mean-batch-rows`` (rows per decode step over its whole generation).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 for a request that fails validation (``param`` names the field, e.g.
``messages.0.content``) or does not fit the context, 401 for a wrong API key, 404
for an unknown model. A client that disconnects cancels its generation, which
frees its row of the decode batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import fastapi
import jinja2
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from apollo.models import batching, inference, registry
from apollo.models.serving import prompts, protocol, replies

# How often a request waiting for tokens checks that its client is still there.
DISCONNECT_POLL_S = 0.5


class TokenGenerator(Protocol):
  """What the app generates with: a :class:`~apollo.models.batching.DecodeBatcher`,
  or a stand-in with the same two methods (tests)."""

  max_len: int

  def submit(
    self, request: batching.GenerationRequest, notify: Callable[[], None] | None = None
  ) -> batching.Generation: ...

  def stats(self) -> dict[str, Any]: ...


class ClientGone(Exception):
  """The client disconnected before its reply was complete."""


class APIError(Exception):
  """An error returned in OpenAI's shape."""

  def __init__(
    self,
    status: int,
    message: str,
    *,
    param: str | None = None,
    type: str = "invalid_request_error",
    code: str | None = None,
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

  def response(self) -> responses.JSONResponse:
    body = protocol.ErrorBody(
      message=self.message, type=self.type, param=self.param, code=self.code
    )
    return responses.JSONResponse({"error": body.model_dump()}, status_code=self.status)


def _field_path(loc: tuple[Any, ...]) -> str:
  return ".".join(str(part) for part in loc if part != "body")


def _validation_error(exc: fastapi_exceptions.RequestValidationError) -> APIError:
  errors = exc.errors()
  if errors and errors[0].get("type") == "json_invalid":
    return APIError(400, f"The body is not valid JSON: {errors[0].get('msg')}", code="json_invalid")
  parts = [f"{_field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors]
  param = _field_path(errors[0]["loc"]) if errors else None
  return APIError(400, "; ".join(parts), param=param or None, code="invalid_value")


def _sse(payload: Any) -> str:
  if isinstance(payload, protocol.BaseModel):
    payload = payload.model_dump(exclude_none=True)
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _stats_headers(gen: batching.Generation) -> dict[str, str]:
  stats = gen.stats
  headers = {"x-batch-rows": str(stats.batch_rows)}
  if stats.queue_wait_s is not None:
    headers["x-queue-wait-ms"] = f"{stats.queue_wait_s * 1e3:.1f}"
  if gen.done:
    headers["x-mean-batch-rows"] = f"{stats.mean_batch_rows:.2f}"
  return headers


class _Reply:
  """One completion's text pipeline: tokens -> text -> stop strings -> content and calls."""

  def __init__(self, loaded, stop_ids, request: protocol.ChatCompletionRequest, prompt):
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    self._detokenizer = replies.Detokenizer(loaded.tokenizer, stop_ids)
    self._stops = replies.StopStrings(stops)
    self._splitter = (
      replies.ToolCallSplitter(
        prompt.tool_format, prompts.CALL_OPENERS[prompt.tool_format], prompt.reply_prefix
      )
      if prompt.tool_format
      else None
    )

  @property
  def stopped(self) -> bool:
    """A stop string was reached (generation can end)."""
    return self._stops.stopped

  def add(self, tokens: list[int], final: bool = False) -> tuple[str, list[Any]]:
    text = self._detokenizer.add(tokens)
    if final:
      text += self._detokenizer.flush()
    text = self._stops.add(text)
    if final:
      text += self._stops.flush()
    if self._splitter is None:
      return text, []
    content, calls = self._splitter.add(text)
    if final:
      more_content, more_calls = self._splitter.flush()
      content, calls = content + more_content, calls + more_calls
    return content, calls

  @property
  def calls(self) -> list[Any]:
    return self._splitter.calls if self._splitter is not None else []


def _finish_reason(gen: batching.Generation, reply: _Reply) -> str:
  if reply.calls:
    return "tool_calls"
  return "length" if gen.finish_reason == batching.LENGTH and not reply.stopped else "stop"


def create_app(
  loaded: registry.LoadedModel,
  generator: TokenGenerator,
  *,
  model_name: str | None = None,
  api_key: str | None = None,
  max_model_len: int | None = None,
) -> fastapi.FastAPI:
  """An OpenAI-compatible app serving ``loaded`` through ``generator``.

  Args:
    loaded: the checkpoint (its tokenizer, chat template and tool-call format).
    generator: usually a :class:`~apollo.models.batching.DecodeBatcher` over ``loaded.model``.
    model_name: the id clients pass as ``model`` (default ``loaded.name``).
    api_key: if set, requests must send ``Authorization: Bearer <api_key>``.
    max_model_len: longest prompt + completion (default: the generator's ``max_len``).
  """
  model_name = model_name or str(loaded.name)
  max_model_len = min(max_model_len or generator.max_len, generator.max_len)
  stop_ids = inference.stop_ids(loaded)
  created = protocol.now()

  async def check_key(authorization: str | None = fastapi.Header(None)) -> None:
    if api_key is None:
      return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
      raise APIError(401, "Invalid or missing API key.", code="invalid_api_key")

  app = fastapi.FastAPI(
    title="Apollo OpenAI-compatible server",
    description=f"Chat completions from {model_name} with batched decoding.",
    version="1",
  )
  api = fastapi.APIRouter(prefix="/v1", dependencies=[fastapi.Depends(check_key)])

  @app.exception_handler(APIError)
  async def _api_error(request, exc: APIError):
    return exc.response()

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def _invalid(request, exc):
    return _validation_error(exc).response()

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http_error(request, exc):
    return APIError(exc.status_code, str(exc.detail), type="invalid_request_error").response()

  @app.get("/health")
  async def health() -> dict[str, str]:
    return {"status": "ok"}

  @api.get("/models", response_model=protocol.ModelList)
  async def list_models():
    card = protocol.ModelCard(id=model_name, created=created, max_model_len=max_model_len)
    return protocol.ModelList(data=[card])

  @api.get("/models/{model_id}", response_model=protocol.ModelCard)
  async def get_model(model_id: str):
    if model_id != model_name:
      raise APIError(404, f"The model {model_id!r} does not exist.", code="model_not_found")
    return protocol.ModelCard(id=model_name, created=created, max_model_len=max_model_len)

  @api.get("/stats")
  async def stats() -> dict[str, Any]:
    return generator.stats()

  def prepare(request: protocol.ChatCompletionRequest):
    if request.model != model_name:
      raise APIError(
        404, f"The model {request.model!r} does not exist.", param="model", code="model_not_found"
      )
    try:
      prompt = prompts.build_prompt(loaded, request)
    except prompts.ToolChoiceError as e:
      raise APIError(400, str(e), param="tool_choice") from e
    except jinja2.TemplateError as e:
      raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from e
    n = len(prompt.ids)
    if n >= max_model_len:
      raise APIError(
        400,
        f"prompt of {n} tokens exceeds the model's context of {max_model_len} tokens",
        param="messages",
        code="context_length_exceeded",
      )
    requested = request.max_completion_tokens or request.max_tokens
    max_tokens = requested or max_model_len - n
    if n + max_tokens > max_model_len:
      raise APIError(
        400,
        f"prompt of {n} tokens + max_tokens of {max_tokens} exceeds the model's context of "
        f"{max_model_len} tokens",
        param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
        code="context_length_exceeded",
      )
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    job = batching.GenerationRequest(
      prompt.ids,
      max_tokens,
      temperature=temperature,
      top_p=top_p,
      seed=request.seed,
      stop_ids=stop_ids,
    )
    return prompt, job

  def submit(job) -> tuple[batching.Generation, asyncio.Event]:
    loop, wake = asyncio.get_running_loop(), asyncio.Event()

    def notify():
      try:
        loop.call_soon_threadsafe(wake.set)
      except RuntimeError:  # The event loop is gone (server shutting down).
        pass

    try:
      return generator.submit(job, notify), wake
    except ValueError as e:
      raise APIError(400, str(e)) from e

  async def wait_for(until, wake: asyncio.Event, http: fastapi.Request | None) -> bool:
    """Waits until ``until()``; False if the client left first. The client is checked
    every DISCONNECT_POLL_S when ``http`` is given (not for a streaming response,
    whose own disconnect watch must not be raced for the disconnect message)."""
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while not until():
      try:
        await asyncio.wait_for(wake.wait(), DISCONNECT_POLL_S if http else None)
        wake.clear()
      except TimeoutError:
        pass
      if http is not None and time.monotonic() >= next_check:
        next_check = time.monotonic() + DISCONNECT_POLL_S
        if await http.is_disconnected():
          return False
    return True

  async def pieces(gen, wake, reply: _Reply, http=None) -> AsyncIterator[tuple[str, list]]:
    """(content, tool calls) as tokens arrive; ends with the generation."""
    read = 0
    while True:
      tokens, ended = gen.read(read)
      read += len(tokens)
      content, calls = reply.add(tokens, final=ended)
      if content or calls:
        yield content, calls
      if ended:
        return
      if reply.stopped:
        gen.cancel()  # A stop string ended the reply: no more tokens needed.
      if not await wait_for(lambda: len(gen.read(read)[0]) or gen.done, wake, http):
        raise ClientGone

  def usage(gen: batching.Generation, prompt: prompts.Prompt) -> protocol.Usage:
    completion = len(gen.tokens)
    return protocol.Usage(
      prompt_tokens=len(prompt.ids),
      completion_tokens=completion,
      total_tokens=len(prompt.ids) + completion,
    )

  def server_error(gen) -> APIError:
    return APIError(500, f"Generation failed: {gen.error}", type="server_error")

  @api.post(
    "/chat/completions",
    response_model=protocol.ChatCompletion,
    responses={
      200: {"content": {"text/event-stream": {}}, "description": "Chunks when stream=true."},
      400: {"model": protocol.ErrorResponse},
    },
  )
  async def chat_completions(request: protocol.ChatCompletionRequest, http: fastapi.Request):
    prompt, job = prepare(request)
    gen, wake = submit(job)
    reply = _Reply(loaded, stop_ids, request, prompt)
    try:
      if request.stream:
        # Headers go out before the first chunk: wait for admission to report the wait.
        admitted = lambda: gen.stats.queue_wait_s is not None or gen.done
        if not await wait_for(admitted, wake, http):
          raise ClientGone
        return responses.StreamingResponse(
          stream(gen, wake, reply, request, prompt),
          media_type="text/event-stream",
          headers=_stats_headers(gen),
        )
      content, calls = "", []
      async for more_content, more_calls in pieces(gen, wake, reply, http):
        content, calls = content + more_content, calls + more_calls
    except ClientGone:
      gen.cancel()
      return responses.Response(status_code=499)  # nginx's "client closed request".
    if gen.finish_reason == batching.ERROR:
      raise server_error(gen)
    message = protocol.ResponseMessage(
      content=(content.strip() or None) if calls else content,
      tool_calls=[protocol.ToolCallOut(**c.to_openai()) for c in calls],
    )
    completion = protocol.ChatCompletion(
      id=protocol.completion_id(),
      created=protocol.now(),
      model=model_name,
      choices=[protocol.Choice(message=message, finish_reason=_finish_reason(gen, reply))],
      usage=usage(gen, prompt),
    )
    body = completion.model_dump()
    if not calls:
      del body["choices"][0]["message"]["tool_calls"]
    return responses.JSONResponse(body, headers=_stats_headers(gen))

  async def stream(gen, wake, reply: _Reply, request, prompt) -> AsyncIterator[str]:
    completion_id, created_at = protocol.completion_id(), protocol.now()

    def chunk(delta: protocol.Delta, finish_reason=None, usage=None) -> str:
      choices = [] if usage else [protocol.ChunkChoice(delta=delta, finish_reason=finish_reason)]
      return _sse(
        protocol.ChatCompletionChunk(
          id=completion_id, created=created_at, model=model_name, choices=choices, usage=usage
        )
      )

    calls_sent = 0
    try:
      yield chunk(protocol.Delta(role="assistant", content=""))
      async for content, calls in pieces(gen, wake, reply):
        if content:
          yield chunk(protocol.Delta(content=content))
        for call in calls:
          delta = protocol.ToolCallDelta(index=calls_sent, **call.to_openai())
          calls_sent += 1
          yield chunk(protocol.Delta(tool_calls=[delta]))
      if gen.finish_reason == batching.ERROR:
        error = server_error(gen)
        yield _sse({"error": {"message": error.message, "type": error.type, "param": None}})
      else:
        yield chunk(protocol.Delta(), finish_reason=_finish_reason(gen, reply))
        if request.stream_options and request.stream_options.include_usage:
          yield chunk(protocol.Delta(), usage=usage(gen, prompt))
      yield "data: [DONE]\n\n"
    finally:
      # Starlette cancels this generator when the client disconnects: free the row.
      gen.cancel()  # (A no-op once the generation has ended.)

  app.include_router(api)
  return app
