"""Moves weights between local Hugging Face Llama / Qwen2 checkpoints and :class:`Decoder`.

Nothing here downloads: a checkpoint is a local directory with ``config.json`` and
the weights, read by :mod:`apollo.models.hf`. Typical use::

    model, report = from_pretrained('/data/Qwen2-0.5B-Instruct', dtype='bfloat16')
    print(report.summary())
    ...
    export_hf(model, '/tmp/policy')  # loadable by transformers again

Name correspondence, HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` -> ours (``L.``
is ``model.layers.{i}.`` -> ``layers[i].``)::

    model.embed_tokens                    -> embed_tokens (embedding [vocab, embed])
    L.input_layernorm                     -> .input_layernorm.scale
    L.self_attn.{q,k,v,o}_proj            -> .self_attn.{q,k,v,o}_proj
    L.post_attention_layernorm            -> .post_attention_layernorm.scale
    L.mlp.{gate,up,down}_proj             -> .mlp.{gate,up,down}_proj
    model.norm                            -> norm.scale
    lm_head                               -> lm_head (absent when tied)

PyTorch ``Linear`` weights are [out, in]; our kernels are [in, out] with heads
split out ([embed, heads, kv], [heads, kv, embed]), so kernels are transposed and
reshaped on the way in and back on the way out (the head split is HF's own
``view(..., heads, head_dim)``, so no permutation is needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from apollo.models import hf
from apollo.models.hf import HFTensor, ImportReport
from apollo.models.llama.model import (
  LOGICAL_AXIS_RULES,
  Decoder,
  DecoderConfig,
  logical_partition_specs,
  named_shardings,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Non-parameter buffers some older checkpoints store.
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


# -----------------------------------------------------------------------------
# Config conversion
# -----------------------------------------------------------------------------


def _rope_fields(h: dict) -> dict[str, Any]:
  """RoPE settings from either layout: transformers 5's ``rope_parameters`` dict
  or the older top-level ``rope_theta`` + ``rope_scaling``."""
  params = dict(h.get("rope_parameters") or {})
  scaling = dict(h.get("rope_scaling") or {})
  theta = params.get("rope_theta", h.get("rope_theta", 10_000.0))
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  source = params if params.get("rope_type") not in (None, "default") else scaling
  fields: dict[str, Any] = {"rope_theta": float(theta)}
  if rope_type in (None, "default"):
    return fields
  if rope_type != "llama3":
    raise ValueError(f"RoPE scaling {rope_type!r} is not supported (only 'llama3').")
  fields.update(
    rope_scaling="llama3",
    rope_scaling_factor=float(source["factor"]),
    rope_low_freq_factor=float(source["low_freq_factor"]),
    rope_high_freq_factor=float(source["high_freq_factor"]),
    rope_original_max_position_embeddings=int(source["original_max_position_embeddings"]),
  )
  return fields


def config_from_hf(hf_config: dict | str | os.PathLike, **overrides: Any) -> DecoderConfig:
  """Builds a :class:`DecoderConfig` from a HF Llama or Qwen2 ``config.json``.

  Args:
    hf_config: the parsed dict, a path to ``config.json``, or a checkpoint directory.
    **overrides: fields to set on top (e.g. ``dtype='bfloat16'``).

  Raises:
    ValueError: for a model type or option this decoder cannot reproduce (another
      activation, MLP biases, sliding-window attention, other RoPE scalings).
  """
  h = hf.read_config(hf_config)
  model_type = h.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}."
    )
  act = h.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act={act!r} is not supported (only 'silu').")
  if h.get("mlp_bias", False):
    raise ValueError("mlp_bias=True is not supported.")
  if model_type == "qwen2" and h.get("use_sliding_window", False):
    raise ValueError("use_sliding_window=True is not supported (full attention only).")
  heads = h["num_attention_heads"]
  fields = dict(
    vocab_size=h["vocab_size"],
    hidden_size=h["hidden_size"],
    num_layers=h["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=h.get("num_key_value_heads") or heads,
    head_dim=h.get("head_dim") or h["hidden_size"] // heads,
    intermediate_size=h["intermediate_size"],
    rms_norm_eps=h.get("rms_norm_eps", 1e-6),
    max_position_embeddings=h.get("max_position_embeddings", 32768),
    tie_word_embeddings=bool(h.get("tie_word_embeddings", False)),
    # Qwen2 always has q/k/v biases; Llama has them when attention_bias is set.
    attention_bias=True if model_type == "qwen2" else bool(h.get("attention_bias", False)),
    initializer_range=h.get("initializer_range", 0.02),
    **_rope_fields(h),
  )
  return DecoderConfig(**{**fields, **overrides})


def default_model_type(config: DecoderConfig) -> str:
  """'qwen2' for models with q/k/v biases (Qwen2 always has them), else 'llama'."""
  return "qwen2" if config.attention_bias else "llama"


def config_to_hf(config: DecoderConfig, model_type: str | None = None) -> dict:
  """The HF ``config.json`` dict describing ``config`` as ``model_type``."""
  c = config
  model_type = model_type or default_model_type(c)
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}.")
  if model_type == "qwen2" and not c.attention_bias:
    raise ValueError("Qwen2 always has q/k/v biases; export a model without them as 'llama'.")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling == "llama3":
    rope = {
      "rope_type": "llama3",
      "rope_theta": c.rope_theta,
      "factor": c.rope_scaling_factor,
      "low_freq_factor": c.rope_low_freq_factor,
      "high_freq_factor": c.rope_high_freq_factor,
      "original_max_position_embeddings": c.rope_original_max_position_embeddings,
    }
  hf = {
    "architectures": [_ARCHITECTURES[model_type]],
    "model_type": model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "intermediate_size": c.intermediate_size,
    "hidden_act": "silu",
    "rms_norm_eps": c.rms_norm_eps,
    "max_position_embeddings": c.max_position_embeddings,
    "tie_word_embeddings": c.tie_word_embeddings,
    "initializer_range": c.initializer_range,
    # Both layouts: transformers >= 5 reads rope_parameters, older ones the rest.
    "rope_parameters": rope,
    "rope_theta": c.rope_theta,
    "rope_scaling": None if c.rope_scaling is None else rope,
    "attention_dropout": 0.0,
    "use_cache": True,
    "torch_dtype": "float32",
  }
  if model_type == "llama":
    hf.update(attention_bias=c.attention_bias, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
  return hf


# -----------------------------------------------------------------------------
# The name/layout correspondence
# -----------------------------------------------------------------------------


def _linear(name: str, layer: nnx.LinearGeneral, num_in: int = 1):
  yield HFTensor(f"{name}.weight", layer.kernel, "kernel", num_in)
  if layer.bias is not None:
    yield HFTensor(f"{name}.bias", layer.bias, "bias")


def _decoder_tensors(model: Decoder) -> list[HFTensor]:
  """Every Param of ``model`` with its HF name (the full, bijective correspondence)."""
  tensors = [HFTensor("model.embed_tokens.weight", model.embed_tokens.embedding)]
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}."
    att, mlp = layer.self_attn, layer.mlp
    tensors.append(HFTensor(p + "input_layernorm.weight", layer.input_layernorm.scale))
    for name in ("q_proj", "k_proj", "v_proj"):
      tensors += _linear(p + "self_attn." + name, getattr(att, name))
    tensors += _linear(p + "self_attn.o_proj", att.o_proj, num_in=2)
    tensors.append(
      HFTensor(p + "post_attention_layernorm.weight", layer.post_attention_layernorm.scale)
    )
    for name in ("gate_proj", "up_proj", "down_proj"):
      tensors += _linear(p + "mlp." + name, getattr(mlp, name))
  tensors.append(HFTensor("model.norm.weight", model.norm.scale))
  if model.lm_head is not None:
    tensors += _linear("lm_head", model.lm_head)
  return tensors


def hf_shapes(model: Decoder) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, for every Param of ``model`` (abstract models too)."""
  return {t.hf_name: t.hf_shape() for t in _decoder_tensors(model)}


# -----------------------------------------------------------------------------
# Import
# -----------------------------------------------------------------------------


def import_hf_state_dict(
  model: Decoder,
  tensors: dict[str, np.ndarray],
  *,
  source: str = "<state dict>",
) -> ImportReport:
  """Copies HF-named tensors into ``model`` (in place; every tensor is required).

  A tied model accepts a checkpoint that also stores ``lm_head.weight`` if it
  equals the embedding.

  Returns:
    An :class:`apollo.models.hf.ImportReport` (``missing`` is always empty).

  Raises:
    ValueError: on a shape mismatch (naming ``source`` and the tensor), a missing
      tensor, or an ``lm_head.weight`` that differs from the embedding of a tied
      model. The model is left untouched when an error is raised.
  """
  tied: set[str] = set()
  if model.lm_head is None and "lm_head.weight" in tensors:
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None or not np.array_equal(
      np.asarray(tensors["lm_head.weight"], np.float32), np.asarray(emb, np.float32)
    ):
      raise ValueError(
        f"{source}: lm_head.weight differs from model.embed_tokens.weight, but the "
        "config ties them (tie_word_embeddings=True)."
      )
    tied.add("lm_head.weight")
  hint = " (an untied LM head: is tie_word_embeddings right?)"
  return hf.copy_into_model(
    _decoder_tensors(model),
    tensors,
    source=source,
    config_name="DecoderConfig",
    required=True,
    used=tied,
    buffer_suffixes=_BUFFER_SUFFIXES,
    missing_hint={"lm_head.weight": hint},
  )


def from_pretrained(
  checkpoint_dir: str | os.PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
  **config_overrides: Any,
) -> tuple[Decoder, ImportReport]:
  """Builds a :class:`Decoder` from a local HF Llama / Qwen2 checkpoint directory.

  Args:
    checkpoint_dir: directory with ``config.json`` and the weights.
    mesh: if given, the model is created sharded on it (by ``rules``) and each
      tensor placed straight into its shards; None: the default device.
    rules: logical-to-mesh axis rules, used with ``mesh``.
    **config_overrides: e.g. ``dtype='bfloat16'``, ``param_dtype='bfloat16'``.

  Returns:
    (model, report).
  """
  config = config_from_hf(checkpoint_dir, **config_overrides)
  model = abstract_decoder(config, mesh, rules)
  tensors, source = hf.load_hf_state_dict(checkpoint_dir)
  report = import_hf_state_dict(model, tensors, source=source)
  return model, report


def abstract_decoder(
  config: DecoderConfig,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Decoder:
  """A :class:`Decoder` whose Params are ``jax.ShapeDtypeStruct`` s, to be filled.

  Every Param is overwritten by an import, so none is initialised (no time, and
  no second copy of a 7B model in memory); each struct carries the sharding its
  value will be placed with (on ``mesh`` by ``rules``, or the default device).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  if mesh is not None:
    shardings = named_shardings(logical_partition_specs(state, rules), mesh)
    state = jax.tree.map(
      lambda v, sharding: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)),
      state,
      shardings,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
  return nnx.merge(graphdef, state)


# -----------------------------------------------------------------------------
# Export
# -----------------------------------------------------------------------------


def hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
  """The model's Params under HF names and layouts (float32 numpy).

  A tied LM head is not written: transformers re-ties it on load.
  """
  return hf.state_dict(_decoder_tensors(model))


def export_hf(model: Decoder, output_dir: str | os.PathLike, model_type: str | None = None) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` that transformers can load.

  Args:
    model: the decoder.
    output_dir: created if needed.
    model_type: 'llama' or 'qwen2'; default :func:`default_model_type`.

  Returns:
    The output directory.
  """
  return hf.write_checkpoint(
    output_dir, config_to_hf(model.config, model_type), hf_state_dict(model)
  )
