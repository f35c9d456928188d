"""The project's decoder in process as a rollout backend (registry name ``'flax'``).

Two kinds, both implementing the loop's ``Backend`` protocol
(:mod:`apollo.agents.backends.base`: ``complete(messages, tools) -> ModelResponse``,
``snapshot``, ``restore``):

- :class:`CheckpointBackend`: a real checkpoint, loaded by name through
  :func:`apollo.models.load` (``model='smollm2-135m-instruct'``, a ``.gguf`` file or
  a HF directory). Each turn is rendered exactly as the project's OpenAI-compatible
  server renders a request (:func:`apollo.models.serving.prompts.build_prompt`: the
  checkpoint's own Jinja template, tools described the way the template or the
  model's tool-call format expects), generated through a
  :class:`~apollo.models.batching.DecodeBatcher` shared by every backend of that
  checkpoint in the process (so concurrent sessions decode in one batch), and,
  with tools, parsed back with :func:`apollo.models.tool_calls.parse` in the
  checkpoint's format (``hermes`` for SmolLM2). Native tool calls by default.
- :class:`FlaxPolicyBackend`: a bare decoder with a ChatML tokenizer (the tiny
  policies the comparison trains from scratch, or a Qwen2 directory via
  ``checkpoint=``), rendered with :mod:`apollo.models.chat_template` and sampled
  with :func:`apollo.models.llama.sampling.generate`. It speaks the JSON-in-text
  format; it also implements the ``TextGenerator`` protocol (``generate(messages)
  -> (text, prompt_tokens, completion_tokens)``).

::

    from apollo.agents.backends import registry
    backend = registry.make_backend('flax', seed=0, model='smollm2-135m-instruct',
                                    temperature=0.7, max_new_tokens=128)

Sampling randomness is a function of ``(seed, turn)``, and the turn counter is the
backend's snapshot, so a resumed rollout draws the same samples it would have.
:class:`FlaxPolicyBackend` left-pads prompts to a multiple of ``prompt_bucket``
tokens, so a long rollout compiles the sampler once per bucket, not once per turn
(the batcher buckets its shapes itself).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jinja2
import numpy as np
import pydantic
import tokenizers
from flax import nnx

from apollo import models
from apollo.agents import env as env_lib
from apollo.agents import guidance as guidance_lib
from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import registry
from apollo.models import batching, inference, tool_calls
from apollo.models import chat_template as chat_lib
from apollo.models import registry as model_registry
from apollo.models.llama import model as decoder_lib
from apollo.models.llama import params as llama_params
from apollo.models.llama import sampling
from apollo.models.serving import prompts, protocol

# Seeds of successive turns: far apart, so no two (seed, turn) pairs collide.
_TURN_STRIDE = 1_000_003


class CheckpointBackend:
  """A loaded checkpoint as a rollout backend, rendered and parsed as the server does.

  Args:
    loaded: what :func:`apollo.models.load` returned (a decoder).
    generator: a :class:`~apollo.models.batching.DecodeBatcher` over ``loaded.model``
      (or a stand-in with its ``submit`` and ``max_len``).
    max_new_tokens: the longest reply, in tokens.
    temperature: 0 = greedy; else the sampling temperature.
    top_p: nucleus mass (1 = off).
    seed: sampling seed.
    tool_choice: with tools: 'auto', or 'required' (the reply is started with the
      opening of a call in the checkpoint's format, as the server does).
    name: the backend's name in session records.
  """

  tool_mode = "native"

  def __init__(
    self,
    loaded: model_registry.LoadedModel,
    generator: Any,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    tool_choice: str = "auto",
    name: str = "flax",
  ):
    if loaded.family != "decoder":
      raise ValueError(f"{loaded.name} is an encoder ({loaded.model_type}); it cannot act.")
    if tool_choice not in ("auto", "required"):
      raise ValueError(f"tool_choice must be 'auto' or 'required', got {tool_choice!r}")
    self.loaded = loaded
    self.generator = generator
    self.max_new_tokens = max_new_tokens
    self.temperature = temperature
    self.top_p = top_p
    self.seed = seed
    self.tool_choice = tool_choice
    self.name = name
    self.stop_ids = inference.stop_ids(loaded)
    self.turn = 0

  def _prompt(
    self, messages: backends_lib.Messages, tools: Sequence[env_lib.ToolSpec]
  ) -> prompts.Prompt:
    body: dict[str, Any] = {"model": self.name, "messages": [dict(m) for m in messages]}
    if tools:
      body["tools"] = env_lib.tools_as_openai(tools)
      body["tool_choice"] = self.tool_choice
    try:
      request = protocol.ChatCompletionRequest.model_validate(body)
      return prompts.build_prompt(self.loaded, request)
    except (pydantic.ValidationError, prompts.ToolChoiceError, jinja2.TemplateError) as e:
      raise backends_lib.BackendError(f"{self.loaded.name}: cannot render the prompt: {e}") from e

  def complete(
    self, messages: backends_lib.Messages, tools: Sequence[env_lib.ToolSpec] = ()
  ) -> backends_lib.ModelResponse:
    """The next reply; with ``tools``, its calls read in the checkpoint's format.

    Raises:
      backends_lib.BackendError: the prompt does not render, or it leaves no room
        for ``max_new_tokens`` in the model's context (the loop's context
        management should summarise first), or generation failed.
    """
    prompt = self._prompt(messages, tools)
    length = len(prompt.ids)
    if length + self.max_new_tokens > self.generator.max_len:
      raise backends_lib.BackendError(
        f"prompt of {length} tokens + max_new_tokens={self.max_new_tokens} exceeds the "
        f"context of {self.generator.max_len} tokens; compress the context first "
        "(a lower context_token_threshold)."
      )
    request = batching.GenerationRequest(
      prompt.ids,
      self.max_new_tokens,
      temperature=self.temperature,
      top_p=self.top_p,
      seed=(self.seed * _TURN_STRIDE + self.turn) % 2**32,
      stop_ids=self.stop_ids,
    )
    try:
      tokens = self.generator.submit(request).result()
    except Exception as e:  # pylint: disable=broad-except
      raise backends_lib.BackendError(f"generation failed: {type(e).__name__}: {e}") from e
    turn, self.turn = self.turn, self.turn + 1
    stops = set(self.stop_ids)
    text = prompt.reply_prefix + self.loaded.tokenizer.decode(
      [t for t in tokens if t not in stops], skip_special_tokens=True
    )
    if not tools:
      return backends_lib.ModelResponse(
        text=text, prompt_tokens=length, completion_tokens=len(tokens)
      )
    parsed = tool_calls.parse(text, prompt.tool_format)
    # As the server answers: a reply with no readable call is all content, so the
    # model sees what it wrote at its next turn.
    content = parsed.content if parsed.tool_calls else text
    return backends_lib.ModelResponse(
      text=text,
      prompt_tokens=length,
      completion_tokens=len(tokens),
      tool_calls=[
        tool_calls.ToolCall(c.name, c.arguments, id=f"call_{turn}_{i}").to_openai()
        for i, c in enumerate(parsed.tool_calls)
      ],
      content=content,
      call_errors=list(parsed.errors),
    )

  def snapshot(self) -> dict[str, Any]:
    return {"turn": self.turn}

  def restore(self, state: Mapping[str, Any]) -> None:
    self.turn = int(state.get("turn", 0))


# One loaded checkpoint and one batcher per (model, options) in the process: the
# backends of concurrent sessions share them, and so share decode batches.
_SHARED: dict[tuple[Any, ...], tuple[model_registry.LoadedModel, batching.DecodeBatcher]] = {}
_SHARED_LOCK = threading.Lock()


def shared_checkpoint(
  model: str | os.PathLike,
  cache_dir: str | os.PathLike | None = None,
  max_batch: int = 8,
  max_len: int | None = None,
  dtype: str | None = None,
) -> tuple[model_registry.LoadedModel, batching.DecodeBatcher]:
  """The process's loaded ``model`` and its decode batcher (loaded on first use)."""
  key = (os.fspath(model), os.fspath(cache_dir) if cache_dir else None, max_batch, max_len, dtype)
  with _SHARED_LOCK:
    if key not in _SHARED:
      overrides = {} if dtype is None else {"dtype": dtype}
      loaded = models.load(model, cache_dir=cache_dir, **overrides)
      if loaded.family != "decoder":
        raise ValueError(f"{model} is an encoder ({loaded.model_type}); it cannot act.")
      batcher = batching.DecodeBatcher(loaded.model, max_batch=max_batch, max_len=max_len)
      # Stopped before the interpreter tears JAX down under the batcher's thread.
      atexit.register(batcher.close)
      _SHARED[key] = (loaded, batcher)
    return _SHARED[key]


class FlaxPolicyBackend:
  """Serves a bare :class:`~apollo.models.llama.model.Decoder` with a ChatML
  tokenizer to the agent loop (JSON-in-text tool calls).

  Args:
    model: the policy.
    tokenizer: a ``tokenizers.Tokenizer`` with the ChatML special tokens.
    max_new_tokens: the longest response, in tokens.
    temperature: 0 = greedy; else the sampling temperature.
    top_k: keep the k most likely tokens (0 = all).
    top_p: nucleus mass (None = off).
    seed: sampling seed.
    max_context: longest prompt + response; default the model's
      ``max_position_embeddings``.
    prompt_bucket: prompts are left-padded to a multiple of this many tokens.
    name: the backend's name in session records.
  """

  tool_mode = "text"

  def __init__(
    self,
    model: decoder_lib.Decoder,
    tokenizer: tokenizers.Tokenizer,
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int = 0,
    max_context: int | None = None,
    prompt_bucket: int = 256,
    name: str = "flax",
  ):
    self.model = model
    self.template = chat_lib.ChatTemplate(tokenizer, guidance_tag=guidance_lib.GUIDANCE_TAG)
    self.max_new_tokens = max_new_tokens
    self.temperature = temperature
    self.top_k = top_k
    self.top_p = top_p
    self.seed = seed
    self.max_context = max_context or model.config.max_position_embeddings
    self.prompt_bucket = prompt_bucket
    self.name = name
    self.turn = 0

  def generate(self, messages: backends_lib.Messages) -> tuple[str, int, int]:
    """Samples the next assistant message: (text, prompt tokens, completion tokens).

    Raises:
      backends_lib.BackendError: if the prompt leaves no room for ``max_new_tokens``
        in ``max_context`` (the loop's context management should summarise first).
    """
    prompt = self.template.render(messages, add_generation_prompt=True).ids
    length = len(prompt)
    room = self.max_context - self.max_new_tokens
    if length > room:
      raise backends_lib.BackendError(
        f"prompt of {length} tokens + max_new_tokens={self.max_new_tokens} exceeds "
        f"max_context={self.max_context}; compress the context first."
      )
    padded = min(room, self.prompt_bucket * math.ceil(length / self.prompt_bucket))
    ids = np.full((1, padded), self.template.pad_id, np.int32)
    mask = np.zeros((1, padded), bool)
    ids[0, padded - length :], mask[0, padded - length :] = prompt, True
    rng = jax.random.fold_in(jax.random.key(self.seed), self.turn)
    out = sampling.generate(
      self.model,
      jnp.asarray(ids),
      self.max_new_tokens,
      temperature=self.temperature,
      top_k=self.top_k,
      top_p=self.top_p,
      rng=rng,
      eos_id=self.template.stop_ids,
      prompt_mask=jnp.asarray(mask),
      pad_id=self.template.pad_id,
    )
    self.turn += 1
    completion = int(out.lengths[0])
    text = self.template.decode_response(np.asarray(out.tokens[0, :completion]))
    return text, length, completion

  def complete(
    self, messages: backends_lib.Messages, tools: Sequence[env_lib.ToolSpec] = ()
  ) -> backends_lib.ModelResponse:
    """The next reply, as text (the loop reads the JSON call in it).

    Raises:
      backends_lib.BackendError: given ``tools`` (native mode): this policy writes
        calls as JSON text only.
    """
    if tools:
      raise backends_lib.BackendError(
        f"the {self.name!r} policy without a checkpoint's chat template writes tool calls as "
        "JSON text only: run it with --tool_mode=text (agent option tool_mode='text')."
      )
    text, prompt_tokens, completion_tokens = self.generate(messages)
    return backends_lib.ModelResponse(
      text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )

  def snapshot(self) -> dict[str, Any]:
    return {"turn": self.turn}

  def restore(self, state: Mapping[str, Any]) -> None:
    self.turn = int(state.get("turn", 0))


def make_flax_backend(
  seed: int,
  model: str | None = None,
  checkpoint: str | os.PathLike | None = None,
  tokenizer: str | os.PathLike | None = None,
  preset: str = "tiny",
  dtype: str | None = None,
  model_cache_dir: str | None = None,
  max_batch: int = 8,
  max_len: int | None = None,
  **options: Any,
) -> CheckpointBackend | FlaxPolicyBackend:
  """The ``'flax'`` backend factory.

  Args:
    seed: sampling seed (and the init seed of a random model).
    model: a checkpoint for :func:`apollo.models.load` (``'smollm2-135m-instruct'``,
      a ``.gguf`` file, a HF directory): a :class:`CheckpointBackend` on the
      process's shared copy (``model_cache_dir``, ``max_batch`` and ``max_len`` go to
      :func:`shared_checkpoint`). Otherwise a :class:`FlaxPolicyBackend`:
    checkpoint: a local HF Llama / Qwen2 directory (config.json, safetensors and,
      unless ``tokenizer`` is given, tokenizer.json) rendered with ChatML. None: a
      randomly initialised ``preset`` model (for smoke tests and demos).
    tokenizer: a ``tokenizer.json`` path or directory; None: the checkpoint's, or
      without a checkpoint a tiny demo BPE trained on the spot.
    preset: the :func:`~apollo.models.llama.model.get_config` preset of a random model.
    dtype: compute dtype override (e.g. 'bfloat16').
    **options: :class:`CheckpointBackend` / :class:`FlaxPolicyBackend` keyword
      arguments (temperature, max_new_tokens, ...).
  """
  if model is not None:
    loaded, batcher = shared_checkpoint(model, model_cache_dir, max_batch, max_len, dtype)
    return CheckpointBackend(loaded, batcher, seed=seed, **options)
  overrides = {} if dtype is None else {"dtype": dtype}
  if checkpoint is not None:
    model, _ = llama_params.from_pretrained(checkpoint, **overrides)
    tok = chat_lib.load_chat_tokenizer(tokenizer or checkpoint)
  else:
    tok = (
      chat_lib.load_chat_tokenizer(tokenizer)
      if tokenizer is not None
      else chat_lib.train_chat_tokenizer()
    )
    config = decoder_lib.get_config(preset, vocab_size=tok.get_vocab_size(), **overrides)
    model = decoder_lib.Decoder(config, rngs=nnx.Rngs(seed))
  return FlaxPolicyBackend(model, tok, seed=seed, **options)


registry.register_backend("flax", make_flax_backend)
