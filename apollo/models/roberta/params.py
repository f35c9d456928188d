"""Moves weights between local Hugging Face RoBERTa checkpoints and our NNX models.

Nothing here downloads: a checkpoint is a local directory holding ``config.json`` and
the weights, read by :mod:`apollo.models.hf`. Typical use::

    model, report = from_pretrained('/data/roberta-large', PretrainingModel,
                                    dtype='bfloat16')
    print(report.summary())
    ...
    export_hf(model, '/tmp/apollo-roberta')  # loadable by transformers again

Name correspondence, HF ``RobertaFor*`` -> ours (``L.`` is
``roberta.encoder.layer.{i}.`` -> ``encoder.layers[i].``)::

    roberta.embeddings.*                  -> encoder.embeddings.*
    L.attention.self.{query,key,value}    -> .attention.{query,key,value}
    L.attention.output.dense              -> .attention.output
    L.attention.output.LayerNorm          -> .attention_layer_norm
    L.intermediate.dense                  -> .intermediate
    L.output.dense                        -> .output
    L.output.LayerNorm                    -> .output_layer_norm
    roberta.pooler.dense                  -> encoder.pooler.dense
    lm_head.{dense,layer_norm,bias}       -> mlm_head.{dense,layer_norm,bias}
    lm_head.decoder.weight                -> (tied to the word embeddings)
    classifier.{dense,out_proj}           -> ecls_head.{dense,out_proj} (pretraining)
    classifier                            -> scorer (multiple choice)

PyTorch ``Linear`` weights are [out, in]; our kernels are [in, out] with attention
heads split out ([embed, heads, kv] and [heads, kv, embed]), so kernels are
transposed and reshaped on the way in and back on the way out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from apollo.models import hf
from apollo.models.hf import HFTensor, ImportReport
from apollo.models.roberta.model import (
  LOGICAL_AXIS_RULES,
  Encoder,
  EncoderConfig,
  MultipleChoiceModel,
  PretrainingModel,
  create_sharded_model,
)

log = logging.getLogger(__name__)

# HF keeps these as non-parameter buffers in some versions; they carry no weights.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


# -----------------------------------------------------------------------------
# Config conversion
# -----------------------------------------------------------------------------


def config_from_hf(hf_config: dict | str | os.PathLike, **overrides: Any) -> EncoderConfig:
  """Builds an :class:`EncoderConfig` from a HF RoBERTa ``config.json``.

  Args:
    hf_config: the parsed dict, a path to ``config.json``, or a checkpoint directory.
    **overrides: fields to set on top (e.g. ``dtype='bfloat16'``, dropout rates).

  Raises:
    ValueError: for a config this architecture cannot reproduce (another
      activation, relative position embeddings).
  """
  h = hf.read_config(hf_config)
  act = h.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"hidden_act={act!r} is not supported (only exact 'gelu').")
  pos = h.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"position_embedding_type={pos!r} is not supported.")
  if h.get("model_type", "roberta") != "roberta":
    log.warning("config model_type=%r; loading it as RoBERTa.", h.get("model_type"))
  fields = dict(
    vocab_size=h["vocab_size"],
    hidden_size=h["hidden_size"],
    num_layers=h["num_hidden_layers"],
    num_heads=h["num_attention_heads"],
    intermediate_size=h["intermediate_size"],
    max_position_embeddings=h["max_position_embeddings"],
    type_vocab_size=h.get("type_vocab_size", 1),
    layer_norm_eps=h.get("layer_norm_eps", 1e-5),
    hidden_dropout_rate=h.get("hidden_dropout_prob", 0.1),
    attention_dropout_rate=h.get("attention_probs_dropout_prob", 0.1),
    classifier_dropout_rate=h.get("classifier_dropout"),
    pad_token_id=h.get("pad_token_id", 1),
    initializer_range=h.get("initializer_range", 0.02),
  )
  return EncoderConfig(**{**fields, **overrides})


def config_to_hf(config: EncoderConfig, architecture: str = "RobertaForMaskedLM") -> dict:
  """The HF ``config.json`` dict describing ``config``."""
  c = config
  return {
    "architectures": [architecture],
    "model_type": "roberta",
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "intermediate_size": c.intermediate_size,
    "hidden_act": "gelu",
    "max_position_embeddings": c.max_position_embeddings,
    "type_vocab_size": c.type_vocab_size,
    "layer_norm_eps": c.layer_norm_eps,
    "hidden_dropout_prob": c.hidden_dropout_rate,
    "attention_probs_dropout_prob": c.attention_dropout_rate,
    "classifier_dropout": c.classifier_dropout_rate,
    "initializer_range": c.initializer_range,
    "position_embedding_type": "absolute",
    "pad_token_id": c.pad_token_id,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "num_labels": c.num_ecls_labels,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
  }


# -----------------------------------------------------------------------------
# The name/layout correspondence
# -----------------------------------------------------------------------------


def _linear(name: str, layer: nnx.Module, num_in: int = 1, required: bool = True):
  yield HFTensor(f"{name}.weight", layer.kernel, "kernel", num_in, required)
  yield HFTensor(f"{name}.bias", layer.bias, "bias", required=required)


def _layer_norm(name: str, norm: nnx.LayerNorm, required: bool = True):
  yield HFTensor(f"{name}.weight", norm.scale, required=required)
  yield HFTensor(f"{name}.bias", norm.bias, required=required)


def _encoder_tensors(encoder: Encoder, prefix: str) -> Iterator[HFTensor]:
  emb = encoder.embeddings
  p = prefix + "embeddings."
  yield HFTensor(p + "word_embeddings.weight", emb.word_embeddings.embedding)
  yield HFTensor(p + "position_embeddings.weight", emb.position_embeddings.embedding)
  yield HFTensor(p + "token_type_embeddings.weight", emb.token_type_embeddings.embedding)
  yield from _layer_norm(p + "LayerNorm", emb.layer_norm)
  for i, layer in enumerate(encoder.layers):
    p = f"{prefix}encoder.layer.{i}."
    att = layer.attention
    yield from _linear(p + "attention.self.query", att.query)
    yield from _linear(p + "attention.self.key", att.key)
    yield from _linear(p + "attention.self.value", att.value)
    yield from _linear(p + "attention.output.dense", att.output, num_in=2)
    yield from _layer_norm(p + "attention.output.LayerNorm", layer.attention_layer_norm)
    yield from _linear(p + "intermediate.dense", layer.intermediate)
    yield from _linear(p + "output.dense", layer.output)
    yield from _layer_norm(p + "output.LayerNorm", layer.output_layer_norm)
  if encoder.pooler is not None:
    # Not required: a checkpoint saved from a masked-LM model has no pooler.
    yield from _linear(prefix + "pooler.dense", encoder.pooler.dense, required=False)


def _model_tensors(model: nnx.Module, encoder_prefix: str) -> list[HFTensor]:
  """Every Param of ``model`` with its HF name (the full, bijective correspondence)."""
  if isinstance(model, Encoder):
    return list(_encoder_tensors(model, encoder_prefix))
  tensors = list(_encoder_tensors(model.encoder, encoder_prefix))
  if isinstance(model, PretrainingModel):
    head = model.mlm_head
    tensors += _linear("lm_head.dense", head.dense, required=False)
    tensors += _layer_norm("lm_head.layer_norm", head.layer_norm, required=False)
    tensors.append(HFTensor("lm_head.bias", head.bias, required=False))
    tensors += _linear("classifier.dense", model.ecls_head.dense, required=False)
    tensors += _linear("classifier.out_proj", model.ecls_head.out_proj, required=False)
  elif isinstance(model, MultipleChoiceModel):
    tensors += _linear("classifier", model.scorer, required=False)
  else:
    raise TypeError(f"No HF layout known for {type(model).__name__}.")
  return tensors


def _architecture(model: nnx.Module) -> str:
  if isinstance(model, PretrainingModel):
    return "RobertaForMaskedLM"
  if isinstance(model, MultipleChoiceModel):
    return "RobertaForMultipleChoice"
  return "RobertaModel"


# -----------------------------------------------------------------------------
# Import
# -----------------------------------------------------------------------------


def _encoder_prefix(names: set[str]) -> str:
  # Task checkpoints nest the trunk under 'roberta.'; a bare RobertaModel does not.
  return "roberta." if any(n.startswith("roberta.") for n in names) else ""


def import_hf_state_dict(
  model: nnx.Module,
  tensors: dict[str, np.ndarray],
  *,
  source: str = "<state dict>",
  strict: bool = False,
) -> ImportReport:
  """Copies HF-named tensors into ``model`` (in place).

  Args:
    model: an :class:`Encoder`, :class:`PretrainingModel` or
      :class:`MultipleChoiceModel` whose config matches the checkpoint.
    tensors: HF name -> array (as from :func:`apollo.models.hf.load_hf_state_dict`).
    source: the file name, for messages.
    strict: if True, any missing tensor is an error (by default only missing
      trunk tensors are; pooler and heads keep their initialisation).

  Returns:
    An :class:`ImportReport`.

  Raises:
    ValueError: on a shape mismatch (naming ``source`` and the tensor), a missing
      required tensor, or an MLM decoder that is not tied to the word embeddings.
  """
  tied: set[str] = set()
  if isinstance(model, PretrainingModel):
    tensors, tied = _resolve_tied_lm_head(tensors, source)
  return hf.copy_into_model(
    _model_tensors(model, _encoder_prefix(set(tensors))),
    tensors,
    source=source,
    config_name="EncoderConfig",
    required=strict or None,
    used=tied,
    buffer_suffixes=_BUFFER_SUFFIXES,
  )


def _resolve_tied_lm_head(
  tensors: dict[str, np.ndarray], source: str
) -> tuple[dict[str, np.ndarray], set[str]]:
  """Accepts the tied copies a HF masked-LM checkpoint may store; refuses untied ones.

  Our MLM decoder *is* the word embedding (as in RoBERTa), so a checkpoint whose
  ``lm_head.decoder.weight`` differs from it cannot be represented.

  Returns:
    (tensors, with ``lm_head.bias`` filled from ``lm_head.decoder.bias`` where only
    the latter exists; the names of the tied copies, which count as used).
  """
  tied = set()
  emb_name = _encoder_prefix(set(tensors)) + "embeddings.word_embeddings.weight"
  decoder = tensors.get("lm_head.decoder.weight")
  if decoder is not None and emb_name in tensors:
    if not np.array_equal(
      np.asarray(decoder, np.float32), np.asarray(tensors[emb_name], np.float32)
    ):
      raise ValueError(
        f"{source}: lm_head.decoder.weight differs from {emb_name}; this model "
        "ties the MLM decoder to the word embeddings."
      )
    tied.add("lm_head.decoder.weight")
  decoder_bias = tensors.get("lm_head.decoder.bias")
  if decoder_bias is not None:
    tied.add("lm_head.decoder.bias")
    if "lm_head.bias" not in tensors:
      # Some exports keep only the decoder's (tied) copy of the output bias.
      tensors = {**tensors, "lm_head.bias": decoder_bias}
    elif not np.array_equal(
      np.asarray(decoder_bias, np.float32), np.asarray(tensors["lm_head.bias"], np.float32)
    ):
      raise ValueError(f"{source}: lm_head.decoder.bias differs from lm_head.bias.")
  return tensors, tied


def from_pretrained(
  checkpoint_dir: str | os.PathLike,
  model_cls: Callable[..., nnx.Module] = PretrainingModel,
  *,
  seed: int = 0,
  strict: bool = False,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
  **config_overrides: Any,
) -> tuple[nnx.Module, ImportReport]:
  """Builds ``model_cls`` from a local HF RoBERTa checkpoint directory.

  Args:
    checkpoint_dir: directory with ``config.json`` and the weights.
    model_cls: :class:`PretrainingModel`, :class:`MultipleChoiceModel` or
      :class:`Encoder`.
    seed: initialises whatever the checkpoint lacks (new heads, pooler).
    strict: see :func:`import_hf_state_dict`.
    mesh: if given, the model is created sharded on it (by ``rules``) and each
      tensor is placed straight into its shards; None: the default device.
    rules: logical-to-mesh axis rules, used with ``mesh``.
    **config_overrides: e.g. ``dtype='bfloat16'`` or dropout rates.

  Returns:
    (model, :class:`ImportReport`).
  """
  config = config_from_hf(checkpoint_dir, **config_overrides)
  make = lambda: model_cls(config, rngs=nnx.Rngs(seed))
  model = make() if mesh is None else create_sharded_model(make, mesh, rules)
  tensors, source = hf.load_hf_state_dict(checkpoint_dir)
  report = import_hf_state_dict(model, tensors, source=source, strict=strict)
  return model, report


# -----------------------------------------------------------------------------
# Export
# -----------------------------------------------------------------------------


def hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's Params under HF names and layouts (float32 numpy).

  The tied MLM decoder is not written separately: HF re-ties it on load.
  """
  prefix = "" if isinstance(model, Encoder) else "roberta."
  return hf.state_dict(_model_tensors(model, prefix))


def export_hf(model: nnx.Module, output_dir: str | os.PathLike) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` that transformers can load.

  A :class:`PretrainingModel` is written as ``RobertaForMaskedLM`` (its E-CLS head as
  the ``classifier.*`` of a RobertaClassificationHead), a
  :class:`MultipleChoiceModel` as ``RobertaForMultipleChoice``, an
  :class:`Encoder` as ``RobertaModel``.

  Returns:
    The output directory.
  """
  config = config_to_hf(model.config, _architecture(model))
  return hf.write_checkpoint(output_dir, config, hf_state_dict(model))
