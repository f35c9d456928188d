"""Document sources for sentence selection: streaming iterators, never in memory.

A source yields `Document`s in a fixed order, each with its position `index` in
that order; `iter_documents(start)` begins at position `start`, which is how a
resumed selection job skips the documents it already processed (and how a host
of a multi-machine job finds its range). Four sources:

* `GeneratedSource`: the project's procedural corpus (`generated_corpus.py`);
  random access, the default.
* `TextFileSource`: local UTF-8 text files. OUR choice: by default one document
  per blank-line-separated paragraph (the shape of most plain-text Wikipedia
  dumps, e.g. WikiExtractor output), or one document per file with
  `unit="file"`. Directories are walked for `*.txt` files; files are read in
  sorted path order so the document order is reproducible.
* `JsonlSource`: JSON-lines files, one document per line, text in a configurable
  field (`text` by default).
* `TfdsSource`: a TFDS dataset (e.g. `wikipedia/20230601.en`, features `title`
  and `text`) that the user has already prepared in a local data dir. Nothing is
  downloaded: a dataset that is not prepared there is an error naming the dir.
  Reading goes through `tfds` data sources (random access over ArrayRecord), so
  the dataset must have been prepared with `file_format="array_record"`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

from apollo.lm.data import generated_corpus


@dataclasses.dataclass(frozen=True)
class Document:
  index: int  # Position of the document in its source's order.
  doc_id: str  # Stable identifier kept with every sentence selected from it.
  text: str


class DocumentSource(Protocol):
  """What the selection job reads."""

  name: str  # Human-readable description, used in logs and error messages.

  def iter_documents(self, start: int = 0) -> Iterator[Document]:
    """Yields the documents at positions `start, start + 1, ...` in order."""
    ...


class GeneratedSource:
  """The procedurally generated corpus; see `generated_corpus`."""

  def __init__(self, config: generated_corpus.GeneratedCorpusConfig | None = None):
    self.config = config or generated_corpus.GeneratedCorpusConfig()
    self.name = f"generated(num_documents={self.config.num_documents}, seed={self.config.seed})"

  def iter_documents(self, start: int = 0) -> Iterator[Document]:
    for index, title, text in generated_corpus.iter_generated_documents(self.config, start):
      yield Document(index, f"generated:{index}:{title}", text)


def expand_paths(patterns: Sequence[str], suffixes: Sequence[str]) -> list[str]:
  """Files named by `patterns` (files, globs or directories), sorted, deduplicated.

  Raises:
    FileNotFoundError: naming every pattern that matched no file.
  """
  files, missing = set(), []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = [
        os.path.join(root, f)
        for root, _, names in os.walk(pattern)
        for f in names
        if f.endswith(tuple(suffixes))
      ]
    else:
      found = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    if not found:
      missing.append(pattern)
    files.update(found)
  if missing:
    raise FileNotFoundError(
      f"No input files found for {missing} (looked for files, globs, or "
      f"directories holding {list(suffixes)} files)."
    )
  return sorted(files)


class TextFileSource:
  """Plain-text files: one document per paragraph (default) or per file."""

  def __init__(self, paths: Sequence[str], unit: str = "paragraph"):
    if unit not in ("paragraph", "file"):
      raise ValueError(f"unit must be 'paragraph' or 'file', got {unit!r}.")
    self.files = expand_paths(paths, suffixes=(".txt",))
    self.unit = unit
    self.name = f"text({', '.join(paths)}; one document per {unit})"

  def _iter_texts(self) -> Iterator[tuple[str, str]]:
    for path in self.files:
      with open(path, encoding="utf-8") as f:
        if self.unit == "file":
          yield path, f.read()
          continue
        paragraph, number = [], 0
        for line in f:  # Streams: a huge file is never held whole.
          if line.strip():
            paragraph.append(line.strip())
          elif paragraph:
            yield f"{path}#{number}", " ".join(paragraph)
            paragraph, number = [], number + 1
        if paragraph:
          yield f"{path}#{number}", " ".join(paragraph)

  def iter_documents(self, start: int = 0) -> Iterator[Document]:
    for index, (doc_id, text) in enumerate(self._iter_texts()):
      if index >= start:
        yield Document(index, doc_id, text)


class JsonlSource:
  """JSON-lines files; each non-empty line is one document."""

  def __init__(self, paths: Sequence[str], text_field: str = "text", id_field: str | None = "id"):
    self.files = expand_paths(paths, suffixes=(".jsonl", ".json"))
    self.text_field = text_field
    self.id_field = id_field
    self.name = f"jsonl({', '.join(paths)}; field {text_field!r})"

  def iter_documents(self, start: int = 0) -> Iterator[Document]:
    index = 0
    for path in self.files:
      with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
          if not line.strip():
            continue
          if index >= start:
            record = json.loads(line)
            if self.text_field not in record:
              raise KeyError(
                f"{path}:{line_number} has no field {self.text_field!r} (fields: {sorted(record)})."
              )
            doc_id = record.get(self.id_field) if self.id_field else None
            doc_id = str(doc_id) if doc_id is not None else f"{path}:{line_number}"
            yield Document(index, doc_id, str(record[self.text_field]))
          index += 1


class TfdsSource:
  """A TFDS dataset already prepared under a local data dir; no downloads."""

  def __init__(
    self,
    dataset: str,
    data_dir: str,
    split: str = "train",
    text_feature: str = "text",
    title_feature: str = "title",
  ):
    self.dataset = dataset
    self.data_dir = data_dir
    self.split = split
    self.text_feature = text_feature
    self.title_feature = title_feature
    self.name = f"tfds({dataset}, split={split}, data_dir={data_dir})"

  def _data_source(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if not os.path.isdir(self.data_dir):
      raise FileNotFoundError(f"TFDS data dir {self.data_dir} does not exist.")
    try:
      builder = tfds.builder(self.dataset, data_dir=self.data_dir)
    except Exception as e:  # tfds raises several types for unknown names/configs.
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise FileNotFoundError(
        f"TFDS dataset {self.dataset!r} is not prepared in {self.data_dir} ({first_line})."
      ) from e
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"TFDS dataset {self.dataset!r} is not prepared in {self.data_dir} "
        f"(expected files under {builder.data_dir}). Prepare it with "
        f"file_format='array_record' on a machine with network access and "
        f"point --tfds_data_dir at that directory."
      )
    try:
      return builder.as_data_source(split=self.split)
    except Exception as e:
      raise ValueError(
        f"TFDS dataset {self.dataset!r} in {self.data_dir} cannot be read "
        f"without TensorFlow; it must be prepared with "
        f"file_format='array_record': {e}"
      ) from e

  def iter_documents(self, start: int = 0) -> Iterator[Document]:
    source = self._data_source()
    for index in range(start, len(source)):
      example = source[index]
      text, title = example[self.text_feature], example.get(self.title_feature, "")
      text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
      title = title.decode("utf-8") if isinstance(title, bytes) else str(title)
      yield Document(index, f"{self.dataset}:{index}:{title}", text)
