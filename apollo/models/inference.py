"""Running a loaded checkpoint: a chat reply, and how well a model predicts a text.

Both work on what :func:`apollo.models.load` returns::

    policy = models.load("smollm2-135m-instruct")
    print(chat_reply(policy, [{"role": "user", "content": "What is the capital of France?"}]))
    print(nats_per_token(policy, open("page.txt").read()))

The prompt is rendered with the checkpoint's own Jinja chat template
(:func:`apollo.models.chat_template.render_jinja`), as transformers'
``apply_chat_template`` would, and decoded with the project's sampler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apollo.models import chat_template as chat_lib
from apollo.models import hf, registry
from apollo.models import tokenizer as tokenizer_lib
from apollo.models.llama import sampling
from apollo.models.roberta import model as encoder_lib

MLM_MASK_RATE = 0.15


class NoMLMHeadError(ValueError):
  """An encoder checkpoint without a masked-LM head cannot score text."""


def _token_text(value: Any) -> str | None:
  # tokenizer_config.json stores a special token as a string or as an AddedToken dict.
  return value.get("content") if isinstance(value, Mapping) else value


def special_tokens(loaded: registry.LoadedModel) -> dict[str, str]:
  """The named special tokens (``bos_token``, ``eos_token``, ...) the template may use."""
  names = ("bos_token", "eos_token", "pad_token", "unk_token")
  found = {n: _token_text(loaded.tokenizer_config.get(n)) for n in names}
  return {n: t for n, t in found.items() if t is not None}


def stop_ids(loaded: registry.LoadedModel) -> tuple[int, ...]:
  """Token ids that end a reply: the eos token and the config's ``eos_token_id`` (s)."""
  ids = []
  eos = special_tokens(loaded).get("eos_token")
  if eos is not None and loaded.tokenizer.token_to_id(eos) is not None:
    ids.append(loaded.tokenizer.token_to_id(eos))
  config_eos = hf.read_config(loaded.hf_dir).get("eos_token_id")
  ids += [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
  return tuple(dict.fromkeys(ids))


def render_prompt(
  loaded: registry.LoadedModel,
  messages: Sequence[Mapping[str, Any]],
  tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
  """Token ids of ``messages`` in the model's own template, ending with an assistant header."""
  if not loaded.chat_template:
    raise ValueError(f"{loaded.hf_dir}: tokenizer_config.json has no chat_template.")
  text = chat_lib.render_jinja(
    loaded.chat_template,
    messages,
    tools=tools,
    add_generation_prompt=True,
    special_tokens=special_tokens(loaded),
  )
  return loaded.tokenizer.encode(text, add_special_tokens=False).ids


def chat_reply(
  loaded: registry.LoadedModel,
  messages: Sequence[Mapping[str, Any]],
  *,
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_p: float | None = None,
  seed: int = 0,
) -> str:
  """The model's reply to ``messages`` (greedy when ``temperature`` is 0)."""
  if loaded.family != "decoder":
    raise ValueError(f"{loaded.name} is an encoder ({loaded.model_type}); it cannot chat.")
  prompt = render_prompt(loaded, messages)
  out = sampling.generate(
    loaded.model,
    jnp.asarray([prompt], jnp.int32),
    max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    rng=jax.random.key(seed),
    eos_id=stop_ids(loaded),
  )
  length = int(out.lengths[0])
  tokens = [int(t) for t in np.asarray(out.tokens[0, :length])]
  stops = set(stop_ids(loaded))
  return loaded.tokenizer.decode([t for t in tokens if t not in stops]).strip()


def _decoder_nats(loaded: registry.LoadedModel, ids: np.ndarray) -> float:
  logits, _ = loaded.model(jnp.asarray(ids[None], jnp.int32))
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits[0, :-1].astype(jnp.float32), jnp.asarray(ids[1:])
  )
  return float(jnp.mean(losses))


def _encoder_nats(loaded: registry.LoadedModel, ids: np.ndarray, seed: int) -> float:
  model = loaded.model
  head_missing = any(n.startswith(("lm_head.", "cls.predictions.")) for n in loaded.report.missing)
  if not isinstance(model, encoder_lib.PretrainingModel) or head_missing:
    raise NoMLMHeadError(
      f"{loaded.hf_dir} has no masked-LM head, so it cannot score text: its head would be "
      "random. Continue its pretraining first (experiments.pretrain --config.init_from=...)."
    )
  special = tokenizer_lib.special_ids(loaded.tokenizer)
  ids = np.concatenate([[special.bos], ids, [special.eos]])
  candidates = np.arange(1, len(ids) - 1)
  count = max(1, int(round(MLM_MASK_RATE * len(candidates))))
  positions = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
  masked = ids.copy()
  masked[positions] = special.mask
  out = model(jnp.asarray(masked[None]), mlm_positions=jnp.asarray(positions[None]))
  losses = optax.softmax_cross_entropy_with_integer_labels(
    out.mlm_logits[0].astype(jnp.float32), jnp.asarray(ids[positions])
  )
  return float(jnp.mean(losses))


def nats_per_token(loaded: registry.LoadedModel, text: str, seed: int = 0) -> float:
  """Mean loss of ``text`` in nats per predicted token.

  A decoder predicts every next token. An encoder with an MLM head predicts a
  fixed, seeded 15% of the tokens, each replaced by the mask token; one without
  raises :class:`NoMLMHeadError`. Long texts are cut to the model's positions.
  """
  ids = np.asarray(loaded.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
  # An encoder adds its two special tokens (RoBERTa's positions also start at 2).
  reserved = 0 if loaded.family == "decoder" else 4
  ids = ids[: loaded.model.config.max_position_embeddings - reserved]
  if len(ids) < 2:
    raise ValueError("The text is too short to score: it needs at least two tokens.")
  if loaded.family == "decoder":
    return _decoder_nats(loaded, ids)
  return _encoder_nats(loaded, ids, seed)
