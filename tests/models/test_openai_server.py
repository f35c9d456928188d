"""Tests for apollo.models.serving, driven by the official ``openai`` client.

The app runs under uvicorn in a thread on 127.0.0.1 (a free port). A tiny random
decoder with a tiny ChatML tokenizer serves plain and streamed completions
through the real batcher; a scripted generator (the app's ``TokenGenerator`` seam)
returns fixed text for tool calls and stop strings; one test asks the real
SmolLM2-135M-Instruct for the capital of France.
"""

import json
import threading
import time

import httpx2
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from apollo.models import batching, gguf, inference, registry, serving
from apollo.models import chat_template as chat_lib
from apollo.models.llama import model as decoder_lib
from apollo.models.llama import sampling
from apollo.models.serving import prompts, protocol, replies
from tests import servers

MODEL = "tiny-chat"
# ChatML without tool support (as SmolLM2's template): tools go to the system message.
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
  " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER_TOOL = {
  "type": "function",
  "function": {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
      "type": "object",
      "properties": {"city": {"type": "string"}},
      "required": ["city"],
    },
  },
}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class _Server(servers.ThreadedUvicorn):
  """The app under test, with an official client pointed at it."""

  def client(self, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


class _Scripted:
  """A TokenGenerator that answers every request with the tokens of ``text``.

  ``delay`` seconds between tokens; ``forever``: repeat until cancelled.
  """

  def __init__(self, tokenizer, text, *, delay=0.0, forever=False, max_len=512):
    self.tokens = tokenizer.encode(text, add_special_tokens=False).ids
    self.delay, self.forever, self.max_len = delay, forever, max_len
    self.generations: list[batching.Generation] = []

  def submit(self, request, notify=None):
    gen = batching.Generation(request, notify)
    self.generations.append(gen)
    threading.Thread(target=self._produce, args=(gen,), daemon=True).start()
    return gen

  def _produce(self, gen):
    gen.stats.queue_wait_s, gen.stats.batch_rows = 0.0, 1
    while True:
      for token in self.tokens:
        if gen.cancelled:
          return gen.finish(batching.CANCELLED)
        time.sleep(self.delay)
        gen.put(token)
      if not self.forever:
        break
    gen.put(gen.request.stop_ids[0])
    gen.finish(batching.STOP)

  def stats(self):
    return {}


class _Recording:
  """The real batcher, recording its generations and slowing its thread per token."""

  def __init__(self, batcher, delay):
    self.batcher, self.delay, self.max_len = batcher, delay, batcher.max_len
    self.generations: list[batching.Generation] = []

  def submit(self, request, notify=None):
    def slow_notify():
      time.sleep(self.delay)
      if notify is not None:
        notify()

    gen = self.batcher.submit(request, slow_notify)
    self.generations.append(gen)
    return gen

  def stats(self):
    return self.batcher.stats()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny-chat")
  (directory / "config.json").write_text(json.dumps({"eos_token_id": 2}))
  config = decoder_lib.get_config("tiny", initializer_range=0.2)
  return registry.LoadedModel(
    name=MODEL,
    family="decoder",
    model_type="llama",
    hf_dir=directory,
    model=decoder_lib.create_sharded_model(
      lambda: decoder_lib.Decoder(config, rngs=nnx.Rngs(0)), None
    ),
    tokenizer=chat_lib.train_chat_tokenizer(),
    chat_template=CHATML,
    tokenizer_config={"eos_token": "<|im_end|>"},
    report=None,
    tool_call_format="hermes",
  )


@pytest.fixture(scope="module")
def batcher(tiny):
  with batching.DecodeBatcher(tiny.model, max_batch=4, min_cache_len=64) as b:
    yield b


@pytest.fixture(scope="module")
def server(tiny, batcher):
  s = _Server(serving.create_app(tiny, batcher, model_name=MODEL))
  yield s
  s.close()


def _scripted_server(tiny, text, **kwargs):
  generator = _Scripted(tiny.tokenizer, text, **kwargs)
  return _Server(serving.create_app(tiny, generator, model_name=MODEL)), generator


def _greedy_text(loaded, messages, max_tokens):
  ids = inference.render_prompt(loaded, messages)
  out = sampling.generate(loaded.model, jnp.asarray([ids]), max_tokens, temperature=0, eos_id=2)
  tokens = [int(t) for t in np.asarray(out.tokens[0, : int(out.lengths[0])])]
  finish = "stop" if tokens[-1] == 2 else "length"
  return loaded.tokenizer.decode([t for t in tokens if t != 2]), len(ids), len(tokens), finish


# ----------------------------------------------------------------------------- plain and streamed


def test_models_docs_and_schema(server):
  (card,) = server.client().models.list().data
  assert card.id == MODEL
  assert httpx2.get(f"{server.url}/docs").status_code == 200
  schema = httpx2.get(f"{server.url}/openapi.json").json()
  assert "/v1/chat/completions" in schema["paths"]
  assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_plain_completion_is_greedy_generate_with_usage(server, tiny):
  raw = server.client().chat.completions.with_raw_response.create(
    model=MODEL, messages=QUESTION, max_tokens=12, temperature=0
  )
  reply = raw.parse()
  text, prompt_tokens, completion_tokens, finish = _greedy_text(tiny, QUESTION, 12)
  assert reply.choices[0].message.content == text
  assert reply.choices[0].finish_reason == finish
  assert reply.usage.prompt_tokens == prompt_tokens
  assert reply.usage.completion_tokens == completion_tokens
  assert reply.usage.total_tokens == prompt_tokens + completion_tokens
  assert float(raw.headers["x-queue-wait-ms"]) >= 0 and int(raw.headers["x-batch-rows"]) >= 1


def test_streamed_completion_sends_chunks_then_done(server, tiny):
  chunks = list(
    server.client().chat.completions.create(
      model=MODEL,
      messages=QUESTION,
      max_tokens=12,
      temperature=0,
      stream=True,
      stream_options={"include_usage": True},
    )
  )
  text, prompt_tokens, completion_tokens, finish = _greedy_text(tiny, QUESTION, 12)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert chunks[-2].choices[0].finish_reason == finish
  assert chunks[-1].usage.completion_tokens == completion_tokens
  assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
  # On the wire: server-sent events ending in [DONE].
  body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True}
  with httpx2.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines() if line]
  assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


class _Gathering(_Recording):
  """The real batcher, held at the first request's first token until `n` requests
  were submitted: they then decode together however the threads were scheduled."""

  def __init__(self, batcher, n):
    super().__init__(batcher, delay=0.0)
    self.n, self.all_in = n, threading.Event()

  def submit(self, request, notify=None):
    first = not self.generations

    def held():
      if first:
        self.all_in.wait(60)
      if notify is not None:
        notify()

    gen = self.batcher.submit(request, held)
    self.generations.append(gen)
    if len(self.generations) == self.n:
      self.all_in.set()
    return gen


def test_concurrent_requests_share_decode_steps(tiny, batcher):
  before = batcher.stats()
  server = _Server(serving.create_app(tiny, _Gathering(batcher, 4), model_name=MODEL))
  client = server.client()
  results = [None] * 4

  def ask(i):
    results[i] = client.chat.completions.with_raw_response.create(
      model=MODEL,
      messages=[{"role": "user", "content": f"Question {i}?"}],
      max_tokens=30,
      temperature=0,
    )

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  server.close()
  after = batcher.stats()
  rows = (after["mean_batch_rows"] or 0) * after["decode_steps"] - (
    before["mean_batch_rows"] or 0
  ) * before["decode_steps"]
  steps = after["decode_steps"] - before["decode_steps"]
  assert rows / steps > 1.5  # Rows per step: the requests decoded together.
  assert max(float(r.headers["x-mean-batch-rows"]) for r in results) > 1.5


# ----------------------------------------------------------------------------- tools and stops


def test_tool_call_plain_and_streamed(tiny):
  s, generator = _scripted_server(tiny, "Let me check.\n" + HERMES_CALL)
  try:
    client = s.client()
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather?"}])
    reply = client.chat.completions.create(**kwargs, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
    assert choice.message.content == "Let me check."
    # The template knows no tools, so they were described in a system message.
    prompt = tiny.tokenizer.decode(generator.generations[0].request.prompt_ids)
    assert "<tools>" in prompt and '"get_weather"' in prompt

    chunks = list(client.chat.completions.create(**kwargs, tools=[WEATHER_TOOL], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert content == "Let me check.\n" and "<tool_call>" not in content
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather")]
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # tool_choice='none': no tools in the prompt, and the text stays text.
    reply = client.chat.completions.create(**kwargs, tools=[WEATHER_TOOL], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None
    assert "<tool_call>" in reply.choices[0].message.content
    assert "<tools>" not in tiny.tokenizer.decode(generator.generations[-1].request.prompt_ids)
  finally:
    s.close()


def test_tool_results_and_calls_in_history_are_rendered(tiny):
  history = protocol.ChatCompletionRequest.model_validate(
    {
      "model": MODEL,
      "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
          "role": "assistant",
          "content": None,
          "tool_calls": [
            {
              "id": "call_1",
              "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
          ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
      ],
    }
  )
  prompt = prompts.build_prompt(tiny, history)
  text = tiny.tokenizer.decode(prompt.ids, skip_special_tokens=False)
  assert HERMES_CALL in text
  assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in text
  # A named tool_choice makes the reply open that call.
  assert prompt.reply_prefix == '<tool_call>\n{"name": "get_weather", "arguments": '
  assert text.endswith("<|im_start|>assistant\n" + prompt.reply_prefix)


def test_stop_strings_cut_the_reply_and_end_generation(tiny):
  s, generator = _scripted_server(tiny, "Hello world. Bye.", delay=0.01, forever=True)
  try:
    client = s.client()
    kwargs = dict(model=MODEL, messages=QUESTION, stop=["world", "xyz"])
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == "Hello "
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello "
    # The endless generations were cancelled once the stop string appeared.
    assert all(g.wait(10) and g.finish_reason == batching.CANCELLED for g in generator.generations)
  finally:
    s.close()


def test_reply_pipeline_pieces():
  # Stop strings are held back while they may still be forming.
  stops = replies.StopStrings(["END"])
  assert stops.add("abc E") == "abc " and stops.add("N") == "" and stops.add("D!") == ""
  assert stops.stopped
  # A call's opening is held back; the call comes out once closed.
  splitter = replies.ToolCallSplitter("hermes", "<tool_call>")
  assert splitter.add("Hi <tool") == ("Hi ", [])
  content, calls = splitter.add(HERMES_CALL[len("<tool") :])
  assert content == "" and [c.name for c in calls] == ["get_weather"]
  # Held text that turns out not to be a call is returned as content.
  splitter = replies.ToolCallSplitter("hermes", "<tool_call>")
  splitter.add("<tool_call> oops")
  assert splitter.flush() == ("<tool_call> oops", [])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "change, param, message",
  [
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"n": 2}, "n", "only n=1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": [{"role": "user"}]}, "messages.0.user.content", "Field required"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
  ],
)
def test_bad_fields_are_400_naming_the_field(server, change, param, message):
  with pytest.raises(openai.BadRequestError) as raised:
    server.client().chat.completions.create(**{"model": MODEL, "messages": QUESTION, **change})
  error = raised.value.response.json()["error"]
  assert raised.value.status_code == 400
  assert error["param"] == param and message in error["message"]
  assert error["type"] == "invalid_request_error"


def test_context_overflow_is_400(server, batcher):
  long = [{"role": "user", "content": "word " * 600}]
  with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 512 tokens"):
    server.client().chat.completions.create(model=MODEL, messages=long)
  with pytest.raises(openai.BadRequestError, match=r"max_tokens of 600 exceeds") as raised:
    server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=600)
  assert raised.value.response.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_is_404(server):
  with pytest.raises(openai.NotFoundError):
    server.client().chat.completions.create(model="gpt-9", messages=QUESTION)


def test_api_key(tiny, batcher):
  s = _Server(serving.create_app(tiny, batcher, model_name=MODEL, api_key="s3cret"))
  try:
    with pytest.raises(openai.AuthenticationError):
      s.client().models.list()
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
    assert client.models.list().data[0].id == MODEL
  finally:
    s.close()


# ----------------------------------------------------------------------------- disconnects


def test_client_disconnecting_frees_its_batch_row(tiny, batcher):
  # The real batcher, slowed to 20 ms per token so that the stream is long.
  recording = _Recording(batcher, delay=0.02)
  s = _Server(serving.create_app(tiny, recording, model_name=MODEL))
  try:
    stream = s.client().chat.completions.create(
      model=MODEL, messages=QUESTION, max_tokens=400, temperature=0.7, seed=0, stream=True
    )
    for _, _ in zip(range(3), stream, strict=False):
      pass
    stream.close()
    (gen,) = recording.generations
    assert gen.wait(20) and gen.finish_reason == batching.CANCELLED
    assert len(gen.tokens) < 400
    _wait_for_no_live_rows(batcher)
    # A plain request whose client gives up (a timeout) is cancelled as well.
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "temperature": 0.7}
    with pytest.raises(httpx2.TimeoutException):
      httpx2.post(f"{s.url}/v1/chat/completions", json=body, timeout=1.0)
    assert recording.generations[1].wait(20)
    assert recording.generations[1].finish_reason == batching.CANCELLED
    _wait_for_no_live_rows(batcher)
  finally:
    s.close()


def _wait_for_no_live_rows(batcher):
  deadline = time.monotonic() + 10
  while batcher.stats()["live_rows"]:
    assert time.monotonic() < deadline, "the row was not freed"
    time.sleep(0.05)


# ----------------------------------------------------------------------------- the real policy


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
  try:  # Located without importing it: its __init__ imports packages it was installed without.
    gguf.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  # The default conversion cache (converted once, then read in a few seconds).
  loaded = registry.load("smollm2-135m-instruct")
  with batching.DecodeBatcher(loaded.model, max_batch=4) as smol:
    s = _Server(serving.create_app(loaded, smol, model_name="smollm2-135m-instruct"))
    try:
      reply = s.client().chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=8, temperature=0
      )
    finally:
      s.close()
  assert "Paris" in reply.choices[0].message.content
