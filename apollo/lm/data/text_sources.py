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

Input that is not UTF-8 text (another encoding, a binary or compressed file, a
JSON-lines line that is not a JSON object) raises `UnreadableFileError`, naming
the file, the line and the byte offset. Each file is checked whole before its
first document is yielded, so a bad file never contributes half its documents:
`iter_documents(start, bad_files=[])` skips such files instead and appends
`{"path", "error"}` to the list (the selection job's `skip_bad_files`). A UTF-8
byte order mark is dropped. The multiple-choice readers
(`apollo.lm.datasets.multiple_choice`) report undecodable files with the same
error.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from absl import logging

from apollo.lm.data import generated_corpus

# A file's first bytes, when they say what the file is (it is then not text).
_MAGIC_NUMBERS = (
  (codecs.BOM_UTF32_LE, "UTF-32 text (little-endian byte order mark); save it as UTF-8"),
  (codecs.BOM_UTF32_BE, "UTF-32 text (big-endian byte order mark); save it as UTF-8"),
  (codecs.BOM_UTF16_LE, "UTF-16 text (little-endian byte order mark); save it as UTF-8"),
  (codecs.BOM_UTF16_BE, "UTF-16 text (big-endian byte order mark); save it as UTF-8"),
  (b"\x1f\x8b", "a gzip-compressed file; decompress it first"),
  (b"BZh", "a bzip2-compressed file; decompress it first"),
  (b"\xfd7zXZ\x00", "an xz-compressed file; decompress it first"),
  (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; decompress it first"),
  (b"PK\x03\x04", "a zip archive; unzip it first"),
  (b"%PDF", "a PDF file"),
)
_CHUNK_BYTES = 1 << 20


class UnreadableFileError(ValueError):
  """A file that cannot be read as the text it should hold; never one bad record.

  The message starts with the file, then where in it: `path: line L, byte B: reason`
  (line and byte offset are 1-based and 0-based, and given where known).

  Attributes:
    path: the file.
    reason: what is wrong, and where possible what the file seems to be instead.
    line: 1-based line of the problem, or None.
    offset: 0-based byte offset of the problem in the file, or None.
  """

  def __init__(self, path: str, reason: str, *, line: int | None = None, offset: int | None = None):
    self.path = str(path)
    self.reason = reason
    self.line = line
    self.offset = offset
    where = ", ".join(
      part
      for part in (
        f"line {line}" if line is not None else "",
        f"byte {offset}" if offset is not None else "",
      )
      if part
    )
    super().__init__(f"{self.path}: {where + ': ' if where else ''}{reason}")


def _check_head(path: str, head: bytes) -> None:
  """Rejects a file whose first bytes say it is not UTF-8 text."""
  for magic, what in _MAGIC_NUMBERS:
    if head.startswith(magic):
      raise UnreadableFileError(path, f"not UTF-8 text: {what}", line=1, offset=0)


def _binary_error(path: str, offset: int, line: int) -> UnreadableFileError:
  return UnreadableFileError(
    path, "binary data (a NUL byte), expected UTF-8 text", line=line, offset=offset
  )


def _decode_error(
  path: str, error: UnicodeDecodeError, offset: int, line: int
) -> UnreadableFileError:
  bad = error.object[error.start : error.start + 1]
  return UnreadableFileError(
    path,
    f"not UTF-8 text: byte 0x{bad.hex()} cannot be decoded ({error.reason}); "
    "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    line=line,
    offset=offset,
  )


def decode_utf8(path: str, data: bytes) -> tuple[str, bool]:
  """A whole file's bytes as text; errors name the file, line and byte offset.

  Args:
    path: the file's name, for messages.
    data: all its bytes.

  Returns:
    (text, had_bom): the text without a UTF-8 byte order mark, and whether there
    was one.

  Raises:
    UnreadableFileError: a UTF-16/32 or compressed file, binary data (a NUL
      byte), or bytes that are not UTF-8.
  """
  _check_head(path, data[:8])
  nul = data.find(b"\x00")
  if nul >= 0:
    raise _binary_error(path, nul, data.count(b"\n", 0, nul) + 1)
  had_bom = data.startswith(codecs.BOM_UTF8)
  skip = len(codecs.BOM_UTF8) if had_bom else 0
  try:
    return data[skip:].decode("utf-8"), had_bom
  except UnicodeDecodeError as error:
    offset = skip + error.start
    raise _decode_error(path, error, offset, data.count(b"\n", 0, offset) + 1) from None


def check_text_file(path: str) -> None:
  """Checks that a file is UTF-8 text, streaming (constant memory).

  Raises:
    UnreadableFileError: as `decode_utf8`, naming the line and byte offset.
  """
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset, newlines = 0, 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_CHUNK_BYTES)
      if offset == 0:
        _check_head(path, chunk[:8])
      nul = chunk.find(b"\x00")
      if nul >= 0:
        raise _binary_error(path, offset + nul, newlines + chunk.count(b"\n", 0, nul) + 1)
      pending = decoder.getstate()[0]  # An incomplete character from the last chunk.
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as error:
        # `error.object` is `pending + chunk`; `pending` holds no newline.
        line = newlines + error.object.count(b"\n", 0, error.start) + 1
        raise _decode_error(path, error, offset - len(pending) + error.start, line) from None
      if not chunk:
        return
      offset += len(chunk)
      newlines += chunk.count(b"\n")


def check_jsonl_file(path: str) -> None:
  """Checks that every non-blank line of a file is a UTF-8 JSON object.

  Raises:
    UnreadableFileError: as `check_text_file`, or a line that is not a JSON
      object, naming the line and the byte offset where it goes wrong.
  """
  with open(path, "rb") as f:
    head = f.read(_CHUNK_BYTES)  # Binary files are caught here, before reading "lines".
  _check_head(path, head[:8])
  nul = head.find(b"\x00")
  if nul >= 0:
    raise _binary_error(path, nul, head.count(b"\n", 0, nul) + 1)
  offset = 0
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      start, offset = offset, offset + len(raw)
      if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
      if b"\x00" in raw:
        raise _binary_error(path, start + raw.index(b"\x00"), line_number)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as error:
        raise _decode_error(path, error, start + error.start, line_number) from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise UnreadableFileError(
          path,
          f"not a JSON line: {error.msg} (column {error.colno})",
          line=line_number,
          offset=start + len(line[: error.pos].encode("utf-8")),
        ) from None
      if not isinstance(record, dict):
        raise UnreadableFileError(
          path,
          f"expected a JSON object on each line, got {type(record).__name__}",
          line=line_number,
          offset=start,
        )


def _readable(
  path: str, check: Callable[[str], None], bad_files: list[dict[str, Any]] | None
) -> bool:
  """Runs `check(path)`; a bad file raises, or with a `bad_files` list is recorded."""
  try:
    check(path)
    return True
  except UnreadableFileError as error:
    if bad_files is None:
      raise
    logging.warning("Skipping unreadable file: %s", error)
    bad_files.append(dict(path=path, error=str(error)))
    return False


@dataclasses.dataclass(frozen=True)
class Document:
  index: int  # Position of the document in its source's order.
  doc_id: str  # Stable identifier kept with every sentence selected from it.
  text: str


class DocumentSource(Protocol):
  """What the selection job reads."""

  name: str  # Human-readable description, used in logs and error messages.

  def iter_documents(
    self, start: int = 0, bad_files: list[dict[str, Any]] | None = None
  ) -> Iterator[Document]:
    """Yields the documents at positions `start, start + 1, ...` in order.

    A file that cannot be read raises `UnreadableFileError`; if `bad_files` is a
    list, the file is skipped whole instead (it yields no document, so positions
    do not depend on where in it the problem is) and `{"path", "error"}` is
    appended to the list. Sources without files ignore `bad_files`.
    """
    ...


class GeneratedSource:
  """The procedurally generated corpus; see `generated_corpus`."""

  def __init__(self, config: generated_corpus.GeneratedCorpusConfig | None = None):
    self.config = config or generated_corpus.GeneratedCorpusConfig()
    self.name = f"generated(num_documents={self.config.num_documents}, seed={self.config.seed})"

  def iter_documents(
    self, start: int = 0, bad_files: list[dict[str, Any]] | None = None
  ) -> Iterator[Document]:
    del bad_files  # No files.
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

  def _iter_texts(self, bad_files: list[dict[str, Any]] | None) -> Iterator[tuple[str, str]]:
    for path in self.files:
      if not _readable(path, check_text_file, bad_files):
        continue
      with open(path, encoding="utf-8-sig") as f:
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

  def iter_documents(
    self, start: int = 0, bad_files: list[dict[str, Any]] | None = None
  ) -> Iterator[Document]:
    for index, (doc_id, text) in enumerate(self._iter_texts(bad_files)):
      if index >= start:
        yield Document(index, doc_id, text)


class JsonlSource:
  """JSON-lines files; each non-empty line is one document."""

  def __init__(self, paths: Sequence[str], text_field: str = "text", id_field: str | None = "id"):
    self.files = expand_paths(paths, suffixes=(".jsonl", ".json"))
    self.text_field = text_field
    self.id_field = id_field
    self.name = f"jsonl({', '.join(paths)}; field {text_field!r})"

  def iter_documents(
    self, start: int = 0, bad_files: list[dict[str, Any]] | None = None
  ) -> Iterator[Document]:
    index = 0
    for path in self.files:
      if not _readable(path, check_jsonl_file, bad_files):
        continue
      with open(path, encoding="utf-8-sig") as f:
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

  def iter_documents(
    self, start: int = 0, bad_files: list[dict[str, Any]] | None = None
  ) -> Iterator[Document]:
    del bad_files  # TFDS checked the records when it prepared them.
    source = self._data_source()
    for index in range(start, len(source)):
      example = source[index]
      text, title = example[self.text_feature], example.get(self.title_feature, "")
      text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
      title = title.decode("utf-8") if isinstance(title, bytes) else str(title)
      yield Document(index, f"{self.dataset}:{index}:{title}", text)
