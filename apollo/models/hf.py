"""Reading and writing local Hugging Face checkpoints, for every model family.

A checkpoint is a local directory: ``config.json`` plus ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``, or a PyTorch ``pytorch_model.bin``, which
needs torch). Nothing here downloads. Each family (:mod:`apollo.models.roberta`,
:mod:`apollo.models.llama`) lists its parameters as :class:`HFTensor` s, a HF name
and a layout each; this module does the rest the same way for all of them: read the
files, check every shape before touching the model, place each value straight into
its shards, report what was loaded, missing or unused, and write a checkpoint back
that transformers loads (https://huggingface.co/docs/safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"


# -----------------------------------------------------------------------------
# Reading
# -----------------------------------------------------------------------------


def read_config(hf_config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """A parsed ``config.json``: from a dict, the file, or a checkpoint directory."""
  if isinstance(hf_config, Mapping):
    return dict(hf_config)
  path = Path(hf_config)
  if path.is_dir():
    path = path / CONFIG_NAME
  return json.loads(path.read_text())


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # bf16 arrives as ml_dtypes.bfloat16.

  return dict(load_file(path))


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # Optional: only legacy .bin checkpoints need it.
  except ImportError as e:
    raise ImportError(
      f"{path} is a PyTorch pickle and torch is not installed. Install torch, or "
      "convert the checkpoint to model.safetensors."
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  # .float() first: numpy has no bfloat16 in torch's conversion.
  return {k: v.detach().float().numpy() for k, v in state.items()}


def load_hf_state_dict(
  checkpoint_dir: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], str]:
  """Reads all tensors of a local HF checkpoint directory.

  Prefers safetensors (single file, then sharded index) over PyTorch ``.bin``.

  Returns:
    (tensors by HF name, the file(s) they came from, for error messages).

  Raises:
    FileNotFoundError: if the directory holds no known weights file.
  """
  d = Path(checkpoint_dir)
  if (d / SAFETENSORS_NAME).exists():
    return _load_safetensors(d / SAFETENSORS_NAME), str(d / SAFETENSORS_NAME)
  for index_name, loader in (
    (SAFETENSORS_INDEX_NAME, _load_safetensors),
    (PYTORCH_INDEX_NAME, _load_torch_bin),
  ):
    if (d / index_name).exists():
      weight_map = json.loads((d / index_name).read_text())["weight_map"]
      tensors: dict[str, np.ndarray] = {}
      for shard in sorted(set(weight_map.values())):
        tensors.update(loader(d / shard))
      return tensors, str(d / index_name)
  if (d / PYTORCH_NAME).exists():
    return _load_torch_bin(d / PYTORCH_NAME), str(d / PYTORCH_NAME)
  raise FileNotFoundError(
    f"No {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME} in {d}."
  )


# -----------------------------------------------------------------------------
# The name/layout correspondence
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One of our Params and how it is laid out in a HF state dict.

  kind: 'plain' (same layout), 'bias' (ours may split heads; HF is flat) or
  'kernel' (a Linear: HF [out, in], ours [*in, *out] with ``num_in`` input dims).
  ``required`` tensors must be in a checkpoint; others (pooler, task heads) keep
  their initialisation when absent, as HF does for newly added heads.
  """

  hf_name: str
  param: nnx.Param
  kind: str = "plain"
  num_in: int = 1
  required: bool = True

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    if self.kind == "kernel":
      n_in = int(np.prod(value.shape[: self.num_in]))
      return value.reshape(n_in, -1).T
    if self.kind == "bias":
      return value.reshape(-1)
    return value

  def hf_shape(self) -> tuple[int, ...]:
    shape = tuple(self.param.get_value().shape)
    if self.kind == "kernel":
      return (int(np.prod(shape[self.num_in :])), int(np.prod(shape[: self.num_in])))
    if self.kind == "bias":
      return (int(np.prod(shape)),)
    return shape

  def from_hf(self, value: np.ndarray) -> np.ndarray:
    shape = tuple(self.param.get_value().shape)
    if self.kind == "kernel":
      return value.T.reshape(shape)
    return value.reshape(shape)


def state_dict(tensors: Iterable[HFTensor]) -> dict[str, np.ndarray]:
  """The values of ``tensors`` under HF names and layouts (float32 numpy)."""
  return {
    t.hf_name: np.ascontiguousarray(t.to_hf(np.asarray(t.param.get_value(), np.float32)))
    for t in tensors
  }


# -----------------------------------------------------------------------------
# Import
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class ImportReport:
  """What an import did.

  Attributes:
    source: the file(s) read.
    loaded: HF names copied into the model.
    missing: HF names the model has but the checkpoint lacks (kept at their init;
      e.g. a fresh E-CLS head or multiple-choice scorer).
    unused: checkpoint tensors the model has no place for (e.g. ``roberta.pooler.*``
      when loading a pretraining model, which has no pooler).
  """

  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (
      f"{self.source}: loaded {len(self.loaded)} tensors; "
      f"missing (kept at init) {self.missing}; unused {self.unused}"
    )


def copy_into_model(
  expected: Iterable[HFTensor],
  tensors: Mapping[str, np.ndarray],
  *,
  source: str,
  config_name: str,
  required: bool | None = None,
  used: Iterable[str] = (),
  buffer_suffixes: tuple[str, ...] = (),
  missing_hint: Mapping[str, str] | None = None,
) -> ImportReport:
  """Copies HF-named ``tensors`` into the Params of ``expected`` (in place).

  Every shape is checked before any Param changes, so a failed import leaves the
  model intact; each value is placed straight onto its Param's sharding.

  Args:
    expected: the model's tensors with their HF names and layouts.
    tensors: HF name -> array (as from :func:`load_hf_state_dict`).
    source: the file(s) read, for messages.
    config_name: the model's config class, named in shape errors.
    required: None: each tensor's own ``required``; True: every tensor is required.
    used: checkpoint names accounted for elsewhere (tied copies).
    buffer_suffixes: non-parameter buffers some checkpoints store; never "unused".
    missing_hint: extra words for the error about a missing tensor, by HF name.

  Raises:
    ValueError: on a shape mismatch (naming ``source`` and the tensor) or a missing
      required tensor.
  """
  report = ImportReport(source=source)
  new_values: list[tuple[HFTensor, np.ndarray]] = []
  for t in expected:
    if t.hf_name not in tensors:
      if t.required or required:
        hint = (missing_hint or {}).get(t.hf_name, "")
        raise ValueError(f"{source}: tensor {t.hf_name!r} is missing from the checkpoint{hint}.")
      report.missing.append(t.hf_name)
      continue
    value = np.asarray(tensors[t.hf_name])
    if value.shape != t.hf_shape():
      raise ValueError(
        f"{source}: tensor {t.hf_name!r} has shape {value.shape}, but the model "
        f"config expects {t.hf_shape()}. Does the {config_name} match the "
        "checkpoint's config.json?"
      )
    new_values.append((t, t.from_hf(value)))
    report.loaded.append(t.hf_name)
  accounted = set(report.loaded) | set(used)
  report.unused = sorted(
    n for n in set(tensors) - accounted if not n.endswith(tuple(buffer_suffixes))
  )
  for t, value in new_values:
    old = t.param.get_value()  # A jax.Array, or a ShapeDtypeStruct of an abstract model.
    t.param.set_value(jax.device_put(value.astype(old.dtype), old.sharding))
  if report.missing:
    log.warning("%s: not in checkpoint, kept at init: %s", source, report.missing)
  if report.unused:
    log.info("%s: checkpoint tensors not used: %s", source, report.unused)
  return report


# -----------------------------------------------------------------------------
# Export
# -----------------------------------------------------------------------------


def write_checkpoint(
  output_dir: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> Path:
  """Writes ``config.json`` + ``model.safetensors`` that transformers loads.

  Returns:
    The output directory (created if needed).
  """
  from safetensors.numpy import save_file

  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
  save_file(dict(tensors), out / SAFETENSORS_NAME, metadata={"format": "pt"})
  return out
