"""The Flax policy as a rollout backend.

:class:`FlaxPolicyBackend` implements the rollout loop's ``Backend`` protocol
(:mod:`apollo.agents.backends.base`: ``complete(messages, tools) -> ModelResponse``,
``snapshot``, ``restore``) and its ``TextGenerator`` protocol (``generate(messages)
-> (text, prompt_tokens, completion_tokens)``). Each turn it renders the messages
with the ChatML template (:mod:`apollo.models.chat_template`), samples with the KV
cache (:func:`apollo.models.llama.sampling.generate`) until ``<|im_end|>``, and decodes
the text. It is backend ``'flax'`` of the registry (loaded on first use)::

    from apollo.agents.backends import registry
    backend = registry.make_backend('flax', seed=0, checkpoint='/data/Qwen2-0.5B-Instruct',
                                    temperature=0.6, max_new_tokens=512)

Sampling randomness is ``fold_in(key(seed), turn)``, and the turn counter is the
backend's snapshot, so a resumed rollout draws the same samples it would have.
Prompts are left-padded to a multiple of ``prompt_bucket`` tokens, so a long
rollout compiles the sampler once per bucket, not once per turn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from apollo.agents import guidance as guidance_lib
from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import registry
from apollo.models import chat_template as chat_lib
from apollo.models.llama import model as decoder_lib
from apollo.models.llama import params as llama_params
from apollo.models.llama import sampling


class FlaxPolicyBackend:
  """Serves a :class:`~apollo.models.llama.model.Decoder` to the agent loop.

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
    self, messages: backends_lib.Messages, tools: Sequence[Any] = ()
  ) -> backends_lib.ModelResponse:
    del tools  # Described in the system prompt; the action format is plain JSON.
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
  checkpoint: str | os.PathLike | None = None,
  tokenizer: str | os.PathLike | None = None,
  preset: str = "tiny",
  dtype: str | None = None,
  **options: Any,
) -> FlaxPolicyBackend:
  """The ``'flax'`` backend factory.

  Args:
    seed: sampling seed (and the init seed of a random model).
    checkpoint: a local HF Llama / Qwen2 directory (config.json, safetensors and,
      unless ``tokenizer`` is given, tokenizer.json). None: a randomly initialised
      ``preset`` model (for smoke tests and demos).
    tokenizer: a ``tokenizer.json`` path or directory; None: the checkpoint's, or
      without a checkpoint a tiny demo BPE trained on the spot.
    preset: the :func:`~apollo.models.llama.model.get_config` preset of a random model.
    dtype: compute dtype override (e.g. 'bfloat16').
    **options: :class:`FlaxPolicyBackend` keyword arguments (temperature, ...).
  """
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
