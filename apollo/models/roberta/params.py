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

BERT checkpoints (``BertFor*``) hold the same network under other names: the trunk
under ``bert.`` and the MLM head as ``cls.predictions.{transform.dense,
transform.LayerNorm, bias, decoder}``. :class:`CheckpointFamily` holds what differs;
:data:`ROBERTA` here and ``apollo.models.bert.params.BERT`` are its two instances, and
each module's functions are that instance's methods.

PyTorch ``Linear`` weights are [out, in]; our kernels are [in, out] with attention
heads split out ([embed, heads, kv] and [heads, kv, embed]), so kernels are
transposed and reshaped on the way in and back on the way out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
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


# -----------------------------------------------------------------------------
# One family's names and conventions
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CheckpointFamily:
  """How one HF encoder family (RoBERTa, BERT) names and configures our encoder.

  Everything else (the per-layer names, shape checks, tied decoder, export) is shared.
  """

  model_type: str  # config.json 'model_type'.
  display_name: str  # In messages: 'RoBERTa'.
  class_prefix: str  # HF classes: f'{class_prefix}ForMaskedLM', f'{class_prefix}Model'.
  trunk_prefix: str  # Where task checkpoints nest the trunk: 'roberta.'.
  mlm_dense: str  # HF name of the MLM head's dense layer: 'lm_head.dense'.
  mlm_layer_norm: str  # ... its LayerNorm: 'lm_head.layer_norm'.
  mlm_bias: str  # ... its output bias: 'lm_head.bias'.
  mlm_decoder: str  # ... its decoder (tied to the word embeddings): 'lm_head.decoder'.
  position_scheme: str  # EncoderConfig.position_scheme of the family.
  # EncoderConfig fields a config.json may leave out, with the family's defaults.
  config_defaults: Mapping[str, Any]
  extra_hf_config: Mapping[str, Any]  # Written into config.json as is (bos / eos ids).

  # ---------------------------------------------------------------------------
  # Config conversion
  # ---------------------------------------------------------------------------

  def config_from_hf(self, hf_config: dict | str | os.PathLike, **overrides: Any) -> EncoderConfig:
    """Builds an :class:`EncoderConfig` from a HF ``config.json`` of this family.

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
    if h.get("model_type", self.model_type) != self.model_type:
      log.warning("config model_type=%r; loading it as %s.", h.get("model_type"), self.display_name)
    d = self.config_defaults
    fields = dict(
      vocab_size=h["vocab_size"],
      hidden_size=h["hidden_size"],
      num_layers=h["num_hidden_layers"],
      num_heads=h["num_attention_heads"],
      intermediate_size=h["intermediate_size"],
      max_position_embeddings=h["max_position_embeddings"],
      type_vocab_size=h.get("type_vocab_size", d["type_vocab_size"]),
      position_scheme=self.position_scheme,
      layer_norm_eps=h.get("layer_norm_eps", d["layer_norm_eps"]),
      hidden_dropout_rate=h.get("hidden_dropout_prob", 0.1),
      attention_dropout_rate=h.get("attention_probs_dropout_prob", 0.1),
      classifier_dropout_rate=h.get("classifier_dropout"),
      pad_token_id=h.get("pad_token_id", d["pad_token_id"]),
      initializer_range=h.get("initializer_range", 0.02),
    )
    return EncoderConfig(**{**fields, **overrides})

  def config_to_hf(self, config: EncoderConfig, architecture: str | None = None) -> dict:
    """The HF ``config.json`` dict describing ``config``.

    Args:
      config: the encoder's config.
      architecture: the HF class named in ``architectures``; default the family's
        masked-LM class (``RobertaForMaskedLM``).

    Raises:
      ValueError: if ``config`` numbers positions another way than this family.
    """
    c = config
    if c.position_scheme != self.position_scheme:
      raise ValueError(
        f"{self.display_name} checkpoints number positions the {self.position_scheme!r} "
        f"way; this config uses {c.position_scheme!r}. Export it with the params module "
        "of its own family (apollo.models.roberta.params or apollo.models.bert.params)."
      )
    return {
      "architectures": [architecture or f"{self.class_prefix}ForMaskedLM"],
      "model_type": self.model_type,
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
      **self.extra_hf_config,
      "num_labels": c.num_ecls_labels,
      "tie_word_embeddings": True,
      "torch_dtype": "float32",
    }

  # ---------------------------------------------------------------------------
  # Names
  # ---------------------------------------------------------------------------

  def _model_tensors(self, model: nnx.Module, encoder_prefix: str) -> list[HFTensor]:
    """Every Param of ``model`` with its HF name (the full, bijective correspondence)."""
    if isinstance(model, Encoder):
      return list(_encoder_tensors(model, encoder_prefix))
    tensors = list(_encoder_tensors(model.encoder, encoder_prefix))
    if isinstance(model, PretrainingModel):
      head = model.mlm_head
      tensors += _linear(self.mlm_dense, head.dense, required=False)
      tensors += _layer_norm(self.mlm_layer_norm, head.layer_norm, required=False)
      tensors.append(HFTensor(self.mlm_bias, head.bias, required=False))
      # HF has no E-CLS head; ours is RobertaClassificationHead-shaped in both families.
      tensors += _linear("classifier.dense", model.ecls_head.dense, required=False)
      tensors += _linear("classifier.out_proj", model.ecls_head.out_proj, required=False)
    elif isinstance(model, MultipleChoiceModel):
      tensors += _linear("classifier", model.scorer, required=False)
    else:
      raise TypeError(f"No HF layout known for {type(model).__name__}.")
    return tensors

  def _architecture(self, model: nnx.Module) -> str:
    if isinstance(model, PretrainingModel):
      return f"{self.class_prefix}ForMaskedLM"
    if isinstance(model, MultipleChoiceModel):
      return f"{self.class_prefix}ForMultipleChoice"
    return f"{self.class_prefix}Model"

  def _encoder_prefix(self, names: set[str]) -> str:
    # Task checkpoints nest the trunk under 'roberta.' / 'bert.'; a bare *Model does not.
    return self.trunk_prefix if any(n.startswith(self.trunk_prefix) for n in names) else ""

  # ---------------------------------------------------------------------------
  # Import
  # ---------------------------------------------------------------------------

  def import_hf_state_dict(
    self,
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
        trunk tensors are; pooler and heads keep their initialisation and are
        listed in ``report.missing``).

    Returns:
      An :class:`ImportReport`.

    Raises:
      ValueError: on a shape mismatch (naming ``source`` and the tensor), a missing
        required tensor, or an MLM decoder that is not tied to the word embeddings.
    """
    tied: set[str] = set()
    if isinstance(model, PretrainingModel):
      tensors, tied = self._resolve_tied_lm_head(tensors, source)
    return hf.copy_into_model(
      self._model_tensors(model, self._encoder_prefix(set(tensors))),
      tensors,
      source=source,
      config_name="EncoderConfig",
      required=strict or None,
      used=tied,
      buffer_suffixes=_BUFFER_SUFFIXES,
    )

  def _resolve_tied_lm_head(
    self, tensors: dict[str, np.ndarray], source: str
  ) -> tuple[dict[str, np.ndarray], set[str]]:
    """Accepts the tied copies a HF masked-LM checkpoint may store; refuses untied ones.

    Our MLM decoder *is* the word embedding (as in RoBERTa and BERT), so a checkpoint
    whose decoder weight differs from it cannot be represented.

    Returns:
      (tensors, with the output bias filled from the decoder's bias where only the
      latter exists; the names of the tied copies, which count as used).
    """
    tied = set()
    emb_name = self._encoder_prefix(set(tensors)) + "embeddings.word_embeddings.weight"
    decoder_name, decoder_bias_name = self.mlm_decoder + ".weight", self.mlm_decoder + ".bias"
    decoder = tensors.get(decoder_name)
    if decoder is not None and emb_name in tensors:
      if not np.array_equal(
        np.asarray(decoder, np.float32), np.asarray(tensors[emb_name], np.float32)
      ):
        raise ValueError(
          f"{source}: {decoder_name} differs from {emb_name}; this model "
          "ties the MLM decoder to the word embeddings."
        )
      tied.add(decoder_name)
    decoder_bias = tensors.get(decoder_bias_name)
    if decoder_bias is not None:
      tied.add(decoder_bias_name)
      if self.mlm_bias not in tensors:
        # Some exports keep only the decoder's (tied) copy of the output bias.
        tensors = {**tensors, self.mlm_bias: decoder_bias}
      elif not np.array_equal(
        np.asarray(decoder_bias, np.float32), np.asarray(tensors[self.mlm_bias], np.float32)
      ):
        raise ValueError(f"{source}: {decoder_bias_name} differs from {self.mlm_bias}.")
    return tensors, tied

  def from_pretrained(
    self,
    checkpoint_dir: str | os.PathLike,
    model_cls: Callable[..., nnx.Module] = PretrainingModel,
    *,
    seed: int = 0,
    strict: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
    **config_overrides: Any,
  ) -> tuple[nnx.Module, ImportReport]:
    """Builds ``model_cls`` from a local HF checkpoint directory of this family.

    Args:
      checkpoint_dir: directory with ``config.json`` and the weights.
      model_cls: :class:`PretrainingModel`, :class:`MultipleChoiceModel` or
        :class:`Encoder`.
      seed: initialises whatever the checkpoint lacks (new heads, pooler); those
        tensors are listed in ``report.missing``.
      strict: see :meth:`import_hf_state_dict`.
      mesh: if given, the model is created sharded on it (by ``rules``) and each
        tensor is placed straight into its shards; None: the default device.
      rules: logical-to-mesh axis rules, used with ``mesh``.
      **config_overrides: e.g. ``dtype='bfloat16'`` or dropout rates.

    Returns:
      (model, :class:`ImportReport`).
    """
    config = self.config_from_hf(checkpoint_dir, **config_overrides)
    make = lambda: model_cls(config, rngs=nnx.Rngs(seed))
    model = make() if mesh is None else create_sharded_model(make, mesh, rules)
    tensors, source = hf.load_hf_state_dict(checkpoint_dir)
    report = self.import_hf_state_dict(model, tensors, source=source, strict=strict)
    return model, report

  # ---------------------------------------------------------------------------
  # Export
  # ---------------------------------------------------------------------------

  def hf_state_dict(self, model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's Params under HF names and layouts (float32 numpy).

    The tied MLM decoder is not written separately: HF re-ties it on load.
    """
    prefix = "" if isinstance(model, Encoder) else self.trunk_prefix
    return hf.state_dict(self._model_tensors(model, prefix))

  def export_hf(self, model: nnx.Module, output_dir: str | os.PathLike) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that transformers can load.

    A :class:`PretrainingModel` is written as ``*ForMaskedLM`` (its E-CLS head as
    the ``classifier.*`` of a RobertaClassificationHead), a
    :class:`MultipleChoiceModel` as ``*ForMultipleChoice``, an :class:`Encoder` as
    ``*Model`` (``*`` = Roberta or Bert).

    Returns:
      The output directory.
    """
    config = self.config_to_hf(model.config, self._architecture(model))
    return hf.write_checkpoint(output_dir, config, self.hf_state_dict(model))


ROBERTA = CheckpointFamily(
  model_type="roberta",
  display_name="RoBERTa",
  class_prefix="Roberta",
  trunk_prefix="roberta.",
  mlm_dense="lm_head.dense",
  mlm_layer_norm="lm_head.layer_norm",
  mlm_bias="lm_head.bias",
  mlm_decoder="lm_head.decoder",
  position_scheme="roberta",
  config_defaults={"type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1},
  extra_hf_config={"bos_token_id": 0, "eos_token_id": 2},
)

config_from_hf = ROBERTA.config_from_hf
config_to_hf = ROBERTA.config_to_hf
import_hf_state_dict = ROBERTA.import_hf_state_dict
from_pretrained = ROBERTA.from_pretrained
hf_state_dict = ROBERTA.hf_state_dict
export_hf = ROBERTA.export_hf
