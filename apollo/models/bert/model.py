"""BERT configurations of the shared encoder (:mod:`apollo.models.roberta.model`).

A BERT checkpoint is the same network as RoBERTa's: the differences are all config
fields (:data:`BERT_FIELDS`): positions numbered from 0 whatever the padding, two
token types (segment A = 0, B = 1), LayerNorm eps 1e-12 and ``[PAD]`` = 0. Build
the models from :mod:`apollo.models.roberta.model` with a config from here::

    config = get_config('minilm-l6', dtype='bfloat16')
    model = PretrainingModel(config, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from typing import Any

from apollo.models.roberta import model as roberta_model
from apollo.models.roberta.model import EncoderConfig

# What makes an EncoderConfig a BERT one (HF BertConfig's defaults).
BERT_FIELDS: dict[str, Any] = dict(
  position_scheme="absolute",
  type_vocab_size=2,
  layer_norm_eps=1e-12,
  pad_token_id=0,
)

# BERT's WordPiece vocabulary (bert-base-uncased, MiniLM) and its 512 positions.
_BERT_VOCAB: dict[str, Any] = dict(vocab_size=30522, max_position_embeddings=512)

# Each BERT preset is a RoBERTa preset's shape with these fields changed.
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
  # For unit tests: RoBERTa's tiny, with its 128 positions all usable from 0.
  "tiny": ("tiny", dict(max_position_embeddings=128)),
  # all-MiniLM-L6-v2 / nreimers/MiniLM-L6-H384-uncased.
  "minilm-l6": (
    "base",
    dict(_BERT_VOCAB, hidden_size=384, num_layers=6, intermediate_size=1536),
  ),
  # bert-base-uncased.
  "base": ("base", _BERT_VOCAB),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> EncoderConfig:
  """A BERT preset ('tiny', 'minilm-l6', 'base') with fields overridden."""
  if name not in _PRESETS:
    raise ValueError(f"Unknown BERT preset {name!r}; choose from {PRESET_NAMES}.")
  shape_of, fields = _PRESETS[name]
  return roberta_model.get_config(shape_of, **{**BERT_FIELDS, **fields, **overrides})
