"""Readers for the multiple-choice benchmarks ReClor, LogiQA and LogiQA 2.0.

Every reader takes ONE split's file and returns a list of examples, each a dict
with exactly these keys:

  id        str: ReClor's `id_string`, LogiQA 2.0's `id`, and for LogiQA (v1),
            which has no ids, `f"{file_stem}_{record_index}"` (e.g. "Train_0").
  context   str: the passage, kept byte for byte (the real files carry artefacts
            such as "Ttherefore" or "family' s"; models are compared on them).
  question  str
  options   list of 4 str
  label     int in 0..3, or None where the split hides it (ReClor test).

No TFDS or TensorFlow is needed here; `apollo.lm.datasets.tfds_builders` wraps these
readers for users who want TFDS / ArrayRecord data sources.

What the readers accept. UTF-8 with or without a byte order mark, "\\n" or "\\r\\n"
line ends, a final newline or none, and fields beyond the ones read. LogiQA (v1)
is read by position, as its published English files need (their option lines
are usually prefixed "A." to "D.", but not always): see `read_logiqa`. What was
odd but read is counted per kind in the returned `Examples.odd`, and
`check_split_size(..., report=examples)` shows it with the size check.

Errors. Two kinds, both `ValueError`s whose message starts with the file:
- `UnreadableFileError`: the file as a whole is not the format (an empty file,
  a binary or compressed file, text that is not UTF-8, another dataset's
  format), naming the line and, for undecoded bytes, the byte offset. Never
  skipped.
- `MalformedRecordError`: one record is broken (a missing line, an answer
  letter outside a-d, a field of the wrong type), naming the record and the
  line. With `skip_malformed=True` the reader drops such records instead; the
  returned `Examples` then says how many (`.skipped`) and why (`.errors`). A
  file none of whose records can be read is an `UnreadableFileError`.

    examples = read_logiqa("LogiQA/Train.txt", skip_malformed=True)
    print(len(examples), "read,", examples.skipped, "skipped", dict(examples.odd))
    check_split_size("logiqa", "train", len(examples), report=examples)

`find_split_file` finds a split's file in a dataset directory. The
multiple-choice recipe (`choice_texts`) and the ReClor leaderboard helpers
(`reclor_test_subsets`, `write_reclor_predictions`) live here too.

References:
  W. Yu et al., "ReClor: A Reading Comprehension Dataset Requiring Logical
  Reasoning", ICLR 2020 (whyu.me/reclor, github.com/yuweihao/reclor).
  J. Liu et al., "LogiQA: A Challenge Dataset for Machine Reading Comprehension with
  Logical Reasoning", IJCAI 2020 (github.com/lgw863/LogiQA-dataset).
  H. Liu et al., "LogiQA 2.0: An Improved Dataset for Logical Reasoning in Natural
  Language Understanding", IEEE/ACM TASLP 2023 (github.com/csitfun/LogiQA2.0).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from apollo.lm.data.text_sources import UnreadableFileError, decode_utf8

NUM_CHOICES = 4
_LETTERS = "ABCD"

# Published split sizes (ReClor: Yu et al., ICLR 2020; LogiQA: Liu et al., IJCAI
# 2020). LogiQA 2.0 is left out: its released files have not been checked here.
PUBLISHED_SPLIT_SIZES: dict[str, dict[str, int]] = {
  "reclor": {"train": 4638, "validation": 500, "test": 1000},
  "logiqa": {"train": 7376, "validation": 651, "test": 651},
}
# The file names and split names the datasets use, mapped to one vocabulary.
_SPLIT_ALIASES = {
  "train": "train",
  "val": "validation",
  "dev": "validation",
  "eval": "validation",
  "validation": "validation",
  "test": "test",
}
# Each split's file name(s) in the released directories, matched in any case.
SPLIT_FILE_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
  "reclor": {"train": ("train.json",), "validation": ("val.json",), "test": ("test.json",)},
  "logiqa": {"train": ("Train.txt",), "validation": ("Eval.txt",), "test": ("Test.txt",)},
  # The release names them .txt; .jsonl / .json are common re-exports.
  "logiqa2": {
    split: (f"{stem}.txt", f"{stem}.jsonl", f"{stem}.json")
    for split, stem in (("train", "train"), ("validation", "dev"), ("test", "test"))
  },
}
# ReClor's test set is ordered: "test_0".."test_439" are EASY, the rest HARD.
RECLOR_TEST_EASY_COUNT = 440


class MalformedRecordError(ValueError):
  """A record that does not follow its dataset's format.

  Attributes:
    path: the file the record came from.
    record: 1-based position of the record in the file.
    line: 1-based line where the problem was found, or None for formats whose
      records are not lines (ReClor's JSON array).
    reason: what was wrong.
  """

  def __init__(self, path: str, record: int, reason: str, line: int | None = None):
    self.path = str(path)
    self.record = record
    self.line = line
    self.reason = reason
    where = f"record {record}" + (f" (line {line})" if line is not None else "")
    super().__init__(f"{self.path}: {where}: {reason}")


class MissingSplitError(FileNotFoundError):
  """A dataset directory without a file for one split.

  Attributes:
    directory: the directory searched.
    dataset: "reclor", "logiqa" or "logiqa2".
    split: the split, as "train", "validation" or "test".
    looked_for: the file names looked for (matched in any case).
    present: the names the directory holds (empty if it does not exist).
  """

  def __init__(
    self,
    directory: str,
    dataset: str,
    split: str,
    looked_for: Sequence[str],
    present: Sequence[str],
    hint: str = "",
  ):
    self.directory, self.dataset, self.split = str(directory), dataset, split
    self.looked_for, self.present = tuple(looked_for), sorted(present)
    names = " or ".join(repr(n) for n in self.looked_for)
    if not os.path.isdir(self.directory):
      found = f"{self.directory} is not a directory"
    elif self.present:
      shown = ", ".join(self.present[:20]) + (", ..." if len(self.present) > 20 else "")
      found = f"it holds: {shown}"
    else:
      found = "it is empty"
    message = (
      f"{dataset}: no file for the {split!r} split in {self.directory}: looked for {names} "
      f"(in any case); {found}"
    )
    super().__init__(message + (f"\n{hint}" if hint else ""))


class Examples(list):
  """The list of examples a reader returns, plus what it skipped and found odd.

  A plain `list` of example dicts in every other respect (slicing it gives a
  plain list).

  Attributes:
    errors: one `MalformedRecordError` per skipped record; empty unless the
      reader was called with `skip_malformed=True`.
    odd: what was unusual but read, per kind (a `collections.Counter`); the
      kinds are listed in `ODDITIES`.
    path: the file read, or None.
  """

  def __init__(
    self,
    examples: Iterable[dict[str, Any]] = (),
    errors: Iterable[MalformedRecordError] = (),
    odd: Mapping[str, int] | None = None,
    path: str | None = None,
  ):
    super().__init__(examples)
    self.errors: list[MalformedRecordError] = list(errors)
    self.odd: collections.Counter[str] = collections.Counter(odd or {})
    self.path = path

  @property
  def skipped(self) -> int:
    """How many malformed records were skipped."""
    return len(self.errors)

  def summary(self) -> str:
    """What was skipped and what was odd, e.g. "skipped 1 malformed record; ...".

    Empty when there is nothing to say.
    """
    parts = []
    if self.skipped:
      parts.append(f"skipped {self.skipped:,} malformed record(s) (first: {self.errors[0]})")
    if self.odd:
      kinds = ", ".join(f"{kind}={count:,}" for kind, count in sorted(self.odd.items()))
      parts.append(f"read despite oddities: {kinds}")
    return "; ".join(parts)


# Kinds of `Examples.odd`: unusual but readable, counted rather than rejected.
ODDITIES = {
  "utf8_byte_order_mark": "the file starts with a UTF-8 byte order mark (dropped)",
  "crlf_line_ends": "lines ending in \\r\\n (the \\r is dropped)",
  "answer_upper_case": "LogiQA: an answer letter in upper case",
  "missing_blank_line": "LogiQA: a record not separated from the previous one by a blank line",
  "option_without_prefix": "LogiQA: an option line without its letter (kept whole)",
  "option_letter_without_dot": "LogiQA: 'A No ...', the letter and a space (stripped)",
  "option_lower_case_letter": "LogiQA: 'a.' (stripped)",
  "option_full_width_dot": "LogiQA: 'A\\uff0e', a full-width dot (stripped)",
  "option_other_letter_prefix": "LogiQA: another option's letter, e.g. 'C.' on line B (kept)",
  "option_empty": "LogiQA: an option with no text after its letter",
  "option_with_chinese": "LogiQA: an option with Chinese characters",
}


class _Collector:
  """Gathers parsed records into `Examples`, raising or skipping errors."""

  def __init__(self, path: str, skip_malformed: bool, odd: Mapping[str, int]):
    self.skip_malformed = skip_malformed
    self.examples = Examples(odd=odd, path=path)

  def add(self, parse: Callable[..., dict[str, Any]], *args, odd=None) -> bool:
    """Keeps `parse(*args)`; returns False if the record was skipped.

    `odd`, a Counter that `parse` fills, is added to the report only if the
    record is kept.
    """
    try:
      self.examples.append(parse(*args))
    except MalformedRecordError as error:
      if not self.skip_malformed:
        raise
      logging.warning("Skipping malformed record: %s", error)
      self.examples.errors.append(error)
      return False
    if odd:
      self.examples.odd.update(odd)
    return True

  def finish(self) -> Examples:
    """The examples; an error if there are none (every record was skipped)."""
    examples = self.examples
    if not examples and not examples.errors:
      raise UnreadableFileError(examples.path, "no record found")
    if not examples:
      first = examples.errors[0]
      where = f"record {first.record}" + (f" (line {first.line})" if first.line else "")
      raise UnreadableFileError(
        examples.path,
        f"no record could be read: {examples.skipped:,} malformed "
        f"(the first, {where}: {first.reason})",
        line=first.line,
      )
    summary = examples.summary()
    logging.info(
      "%s: read %d examples%s", examples.path, len(examples), f"; {summary}" if summary else ""
    )
    return examples


def _example(
  id_: str, context: str, question: str, options: Sequence[str], label: int | None
) -> dict[str, Any]:
  return {
    "id": id_,
    "context": context,
    "question": question,
    "options": list(options),
    "label": label,
  }


class _RecordChecks:
  """Field checks that raise `MalformedRecordError` at one record."""

  def __init__(self, path: str, record: int, line: int | None = None):
    self.path, self.record, self.line = path, record, line

  def fail(self, reason: str, line: int | None = None):
    raise MalformedRecordError(
      self.path, self.record, reason, line=self.line if line is None else line
    )

  def text(self, record: Mapping[str, Any], key: str) -> str:
    if key not in record:
      self.fail(f"missing field {key!r}")
    if not isinstance(record[key], str):
      self.fail(f"field {key!r} should be a string, got {type(record[key]).__name__}")
    return record[key]

  def options(self, record: Mapping[str, Any], key: str) -> list[str]:
    options = record.get(key)
    if (
      not isinstance(options, list)
      or len(options) != NUM_CHOICES
      or not all(isinstance(o, str) for o in options)
    ):
      self.fail(f"field {key!r} should be a list of {NUM_CHOICES} strings, got {options!r}")
    return options

  def label(self, label: Any) -> int:
    # bool is an int subclass, but True is not an answer index.
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_CHOICES:
      self.fail(f"expected a label in 0..{NUM_CHOICES - 1}, got {label!r}")
    return label


# ---------------------------------------------------------------------------
# Reading a file: bytes -> text, and what format the text seems to be in.


def _read_text(path: str) -> tuple[str, collections.Counter[str]]:
  """The file's text, and its file-level oddities (byte order mark, "\\r\\n").

  Raises:
    UnreadableFileError: binary, compressed, not UTF-8, or empty.
  """
  with open(path, "rb") as f:
    data = f.read()
  text, had_bom = decode_utf8(path, data)
  if not text.strip():
    what = "only whitespace" if text else f"{len(data)} bytes"
    raise UnreadableFileError(path, f"the file is empty ({what}): a split file must hold examples")
  odd = collections.Counter()
  if had_bom:
    odd["utf8_byte_order_mark"] = 1
  if "\r\n" in text:
    odd["crlf_line_ends"] = text.count("\r\n")
  return text, odd


def _first_content_line(text: str) -> tuple[int, str]:
  """(1-based number, stripped text) of the first line that is not blank."""
  match = re.search(r"\S", text)
  if match is None:
    return 1, ""
  start = text.rfind("\n", 0, match.start()) + 1
  end = text.find("\n", start)
  return text.count("\n", 0, start) + 1, text[start : len(text) if end < 0 else end].strip()


_FORMATS = {
  "reclor": "a JSON array (ReClor's format, read by read_reclor)",
  "logiqa2": "JSON lines (LogiQA 2.0's format, read by read_logiqa2)",
  "logiqa": "LogiQA v1 text (read by read_logiqa)",
}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _looks_like(text: str) -> str | None:
  """Which benchmark's format `text` seems to be in (a key of `_FORMATS`)."""
  _, first = _first_content_line(text)
  if first.startswith("["):
    return "reclor"
  if first.startswith("{"):
    return "logiqa2"
  if _is_answer_letter(first):
    return "logiqa"
  return None


def _wrong_format(
  path: str, text: str, dataset: str, expected: str, detail: str = "", line: int | None = None
) -> UnreadableFileError:
  """The error for a file of `dataset`'s reader that is not `expected` (a format)."""
  first_line, first = _first_content_line(text)
  reason = f"not {expected}" + (f" ({detail})" if detail else "")
  looks = _looks_like(text)
  if looks is not None and looks != dataset:
    reason += f"; this looks like {_FORMATS[looks]}"
  elif not detail:
    reason += f"; it starts with {first[:60]!r}"
  return UnreadableFileError(path, reason, line=first_line if line is None else line)


# ---------------------------------------------------------------------------
# ReClor: one JSON array per split.


def _parse_reclor_record(path: str, number: int, record: Any) -> dict[str, Any]:
  check = _RecordChecks(path, number)
  if not isinstance(record, dict):
    check.fail(f"expected a JSON object, got {type(record).__name__}")
  label = record.get("label")
  hidden = label is None or label == -1
  return _example(
    check.text(record, "id_string"),
    check.text(record, "context"),
    check.text(record, "question"),
    check.options(record, "answers"),
    None if hidden else check.label(label),
  )


def read_reclor(path: str | os.PathLike[str], *, skip_malformed: bool = False) -> Examples:
  """Reads one ReClor split (`train.json`, `val.json` or `test.json`).

  Each record is `{context, question, answers: [4 str], label, id_string}`;
  other fields are ignored. The test split hides its labels: a record without
  `label` (or with `null` or -1, as some re-exports write) gets `label=None`.
  The array may be on one line or pretty-printed, with any line ends.

  Args:
    path: the split's JSON file.
    skip_malformed: skip malformed records (counted in `.skipped`) instead of
      raising.

  Returns:
    `Examples`, in file order.

  Raises:
    MalformedRecordError: a record is malformed and `skip_malformed` is False.
    UnreadableFileError: the file is not a JSON array of example objects (never
      skipped), naming the line; or no record could be read.
  """
  path = os.fspath(path)
  text, odd = _read_text(path)
  expected = "a JSON array of ReClor examples"
  try:
    records = json.loads(text)
  except json.JSONDecodeError as error:
    detail = f"{error.msg}, column {error.colno}"
    raise _wrong_format(path, text, "reclor", expected, detail, line=error.lineno) from None
  if not isinstance(records, list):
    kind = _JSON_TYPES.get(type(records), type(records).__name__)
    raise _wrong_format(path, text, "reclor", expected, f"the file holds a JSON {kind}")
  if not records:
    line, _ = _first_content_line(text)
    raise UnreadableFileError(path, "no example: the JSON array is empty", line=line)
  if not any(isinstance(record, dict) for record in records):
    line, _ = _first_content_line(text)
    kind = _JSON_TYPES.get(type(records[0]), type(records[0]).__name__)
    raise UnreadableFileError(
      path, f"a JSON array of {kind}s, not of example objects (a predictions file?)", line=line
    )
  collector = _Collector(path, skip_malformed, odd)
  for number, record in enumerate(records, start=1):
    collector.add(_parse_reclor_record, path, number, record)
  return collector.finish()


# ---------------------------------------------------------------------------
# LogiQA (v1): 8-line text records, read by position.

_LOGIQA_RECORD_LINES = 7  # answer, context, question, 4 options (+ a blank).
# A leading option letter: the letter, then a dot (ASCII or full-width) or spaces.
_OPTION_PREFIX = re.compile(r"([A-Da-d])([.\uff0e]|\s+)")
_CHINESE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _is_answer_letter(line: str) -> bool:
  return line.strip().lower() in ("a", "b", "c", "d")


def _logiqa_option(line: str, letter: str, odd: collections.Counter[str]) -> str:
  """The text of option `letter`'s line, its prefix stripped; oddities into `odd`.

  The prefix is stripped only if it is `letter`'s: "A.", "A．", "a.", or "A"
  and spaces when the next character is not a lower-case letter (so the article
  in an unprefixed "A person ..." stays). Anything else is kept as text.
  """
  option = line.strip()
  if _CHINESE.search(option):
    odd["option_with_chinese"] += 1
  match = _OPTION_PREFIX.match(option)
  if match is None:
    odd["option_without_prefix"] += 1
    return option
  found, separator = match.groups()
  rest = option[match.end() :].strip()
  dotted = not separator.isspace()
  if found.upper() != letter:
    odd["option_other_letter_prefix" if dotted else "option_without_prefix"] += 1
    return option
  if not dotted:
    if found.islower() or rest[:1].islower():  # "a ..." or "A person": words, not a prefix.
      odd["option_without_prefix"] += 1
      return option
    odd["option_letter_without_dot"] += 1
  elif separator == "\uff0e":
    odd["option_full_width_dot"] += 1
  if found.islower():
    odd["option_lower_case_letter"] += 1
  if not rest:
    odd["option_empty"] += 1
  return rest


def _parse_logiqa_record(
  path: str,
  stem: str,
  index: int,
  lines: Sequence[str],
  first_line: int,
  odd: collections.Counter[str],
) -> dict[str, Any]:
  """Parses one record: `lines` (non-blank) start at 1-based line `first_line`."""
  check = _RecordChecks(path, index + 1, line=first_line)
  layout = "the answer letter, the context, the question and 4 options"
  if not _is_answer_letter(lines[0]):
    check.fail(f"expected an answer letter a-d, got {lines[0].strip()!r}")
  last = first_line + len(lines) - 1
  if len(lines) < _LOGIQA_RECORD_LINES:
    check.fail(
      f"record ends early: {len(lines)} lines (lines {first_line}-{last}) before a blank "
      f"line or the end of the file, expected {_LOGIQA_RECORD_LINES}: {layout}"
    )
  if len(lines) > _LOGIQA_RECORD_LINES:
    check.fail(
      f"record runs on: {len(lines)} lines (lines {first_line}-{last}) before a blank line, "
      f"expected {_LOGIQA_RECORD_LINES}: {layout}",
      line=first_line + _LOGIQA_RECORD_LINES,
    )
  answer = lines[0].strip()
  if answer.isupper():
    odd["answer_upper_case"] += 1
  options = [_logiqa_option(lines[3 + k], letter, odd) for k, letter in enumerate(_LETTERS)]
  label = "abcd".index(answer.lower())
  return _example(f"{stem}_{index}", lines[1], lines[2], options, label)


def _logiqa_blocks(lines: Sequence[str]) -> Iterable[tuple[int, list[str]]]:
  """(1-based first line, lines) of each run of non-blank lines."""
  block, start = [], 0
  for number, line in enumerate(lines, start=1):
    if line.strip():
      if not block:
        start = number
      block.append(line)
    elif block:
      yield start, block
      block = []
  if block:
    yield start, block


def read_logiqa(path: str | os.PathLike[str], *, skip_malformed: bool = False) -> Examples:
  """Reads one LogiQA v1 split (`Train.txt`, `Eval.txt` or `Test.txt`).

  Records are read by position: a blank line, the answer letter (a-d), the
  context, the question, then the four option lines, A to D. An option line's
  letter prefix is stripped only when it is that line's letter: "A." (the usual
  form), "A．" (full-width dot), "a." and "A " before a word that does not start
  in lower case (the published English files have all four). Any other line is
  kept whole as the option's text: one without a prefix, one starting with
  another option's letter, text with a stray "C." inside. Each such case is
  counted in the returned `Examples.odd` (kinds in `ODDITIES`). Extra blank lines
  between records, records run together without their blank line, and a last
  record without a final newline are read.

  A record is malformed only if it is truly broken: an answer letter outside
  a-d, or a line missing or extra (a record is the run of non-blank lines
  between two blank lines; it must have 7). Ids are `f"{file_stem}_{i}"` with
  `i` the 0-based position of the record in the file, counting skipped
  records, so that ids do not shift when a malformed record is dropped.

  Lines are split on "\\n" only (a trailing "\\r" is dropped): `str.splitlines`
  would also split on characters such as U+2028 that can occur inside a context.

  Args:
    path: the split's text file.
    skip_malformed: skip malformed records (counted in `.skipped`) instead of
      raising; reading resumes at the next blank line.

  Returns:
    `Examples`, in file order.

  Raises:
    MalformedRecordError: a record is malformed and `skip_malformed` is False.
    UnreadableFileError: the file is not LogiQA v1 text (JSON, binary, not
      UTF-8, empty), or no record could be read.
  """
  path = os.fspath(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  text, odd = _read_text(path)
  if _first_content_line(text)[1].startswith(("[", "{")):
    raise _wrong_format(path, text, "logiqa", "LogiQA v1 text")
  lines = [line.removesuffix("\r") for line in text.split("\n")]

  collector = _Collector(path, skip_malformed, odd)
  index = 0
  for first_line, block in _logiqa_blocks(lines):
    size = _LOGIQA_RECORD_LINES
    starts = range(0, len(block), size)
    run_together = (
      len(block) > size
      and len(block) % size == 0
      and all(_is_answer_letter(block[s]) for s in starts)
    )
    records = [(s, block[s : s + size]) for s in starts] if run_together else [(0, block)]
    for k, (offset, record) in enumerate(records):
      record_odd = collections.Counter()
      if k:
        record_odd["missing_blank_line"] = 1
      collector.add(
        _parse_logiqa_record,
        path,
        stem,
        index,
        record,
        first_line + offset,
        record_odd,
        odd=record_odd,
      )
      index += 1
  return collector.finish()


# ---------------------------------------------------------------------------
# LogiQA 2.0: JSON lines.


def _parse_logiqa2_line(path: str, number: int, line_number: int, line: str) -> dict[str, Any]:
  check = _RecordChecks(path, number, line=line_number)
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    check.fail(f"not valid JSON: {error.msg} (column {error.colno})")
  if not isinstance(record, dict):
    check.fail(f"expected a JSON object, got {type(record).__name__}")
  for key in ("id", "answer"):
    if key not in record:
      check.fail(f"missing field {key!r}")
  if isinstance(record["id"], bool) or not isinstance(record["id"], (int, str)):
    check.fail(f"field 'id' should be an int or a string, got {record['id']!r}")
  return _example(
    str(record["id"]),
    check.text(record, "text"),
    check.text(record, "question"),
    check.options(record, "options"),
    check.label(record["answer"]),
  )


def read_logiqa2(path: str | os.PathLike[str], *, skip_malformed: bool = False) -> Examples:
  """Reads one LogiQA 2.0 split (JSON lines).

  Each line is `{id, answer: int 0-3, text, question, options: [4 str], type}`;
  `text` becomes `context`, `answer` becomes `label`, `id` is turned into a
  str; `type` and any other field are ignored. Blank lines are skipped.

  Args:
    path: the split's JSON-lines file.
    skip_malformed: skip malformed lines (counted in `.skipped`) instead of
      raising.

  Returns:
    `Examples`, in file order.

  Raises:
    MalformedRecordError: a line is malformed and `skip_malformed` is False.
    UnreadableFileError: the file is not JSON lines (its first line is not a
      JSON object: another format, binary, not UTF-8, empty), or no record
      could be read.
  """
  path = os.fspath(path)
  text, odd = _read_text(path)
  if not _first_content_line(text)[1].startswith("{"):
    raise _wrong_format(path, text, "logiqa2", "JSON lines (one LogiQA 2.0 object per line)")
  collector = _Collector(path, skip_malformed, odd)
  number = 0
  for line_number, line in enumerate(text.split("\n"), start=1):
    if line.strip():
      number += 1
      collector.add(_parse_logiqa2_line, path, number, line_number, line)
  return collector.finish()


# ---------------------------------------------------------------------------
# Split files, split sizes, ReClor's test subsets and leaderboard file.


def canonical_split(split: str) -> str:
  """Maps a split or file name ("val", "Eval.txt") to train/validation/test."""
  stem = os.path.splitext(os.path.basename(split))[0].lower()
  if stem not in _SPLIT_ALIASES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_ALIASES)}")
  return _SPLIT_ALIASES[stem]


def find_split_file(
  directory: str | os.PathLike[str],
  dataset: str,
  split: str,
  *,
  names: Sequence[str] | None = None,
  hint: str = "",
) -> str:
  """The file of one split in a dataset's directory, its name matched in any case.

  Args:
    directory: the directory holding the split files.
    dataset: "reclor", "logiqa" or "logiqa2".
    split: a split name ("train", "val", "dev", "eval", "validation", "test").
    names: the file names to look for, in order of preference; by default
      `SPLIT_FILE_NAMES[dataset][split]`.
    hint: appended to the error message (e.g. where to get the files).

  Returns:
    The path of the first name found.

  Raises:
    MissingSplitError: (a FileNotFoundError) no such file; the message names the
      split, the directory, the names looked for and the names present.
    ValueError: an unknown dataset or split.
  """
  directory = os.fspath(directory)
  if names is None and dataset not in SPLIT_FILE_NAMES:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(SPLIT_FILE_NAMES)}")
  split = canonical_split(split)
  names = tuple(names or SPLIT_FILE_NAMES[dataset][split])
  present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  files = {name.lower(): name for name in present if os.path.isfile(os.path.join(directory, name))}
  for name in names:
    if name.lower() in files:
      return os.path.join(directory, files[name.lower()])
  raise MissingSplitError(directory, dataset, split, names, present, hint)


def check_split_size(
  dataset: str, split: str, num_examples: int, *, report: Examples | None = None
) -> str | None:
  """Compares a split's size with the published one, and reports what was odd.

  Never fails: fixtures and partial copies are legitimately smaller, so a size
  mismatch is logged as a warning and returned rather than raised. With
  `report` (the reader's `Examples`), the skipped records and the per-kind
  oddities are part of the report too (skipped records make it a warning,
  oddities alone are logged at INFO).

  Args:
    dataset: "reclor" or "logiqa" (others have no published size here).
    split: a split or file name, e.g. "val", "Eval.txt", "test".
    num_examples: how many examples were read.
    report: the `Examples` the reader returned, for its `skipped` and `odd`.

  Returns:
    The report, e.g. "logiqa test: read 650 examples, the published split has
    651; skipped 1 malformed record(s) ...; read despite oddities:
    option_without_prefix=12", or None if there is nothing to report (also
    when no published size is known and `report` has nothing to say).
  """
  split = canonical_split(split)
  expected = PUBLISHED_SPLIT_SIZES.get(dataset.lower(), {}).get(split)
  size_differs = expected is not None and expected != num_examples
  parts = []
  if size_differs:
    parts.append(f"read {num_examples:,} examples, the published split has {expected:,}")
  summary = report.summary() if report is not None else ""
  if summary:
    parts.append(summary)
  if not parts:
    return None
  message = f"{dataset} {split}: " + "; ".join(parts)
  warn = size_differs or (report is not None and report.skipped > 0)
  logging.log(logging.WARNING if warn else logging.INFO, message)
  return message


@dataclasses.dataclass(frozen=True)
class ReclorTestSubsets:
  """Positions (in the order given) of ReClor's Test-E and Test-H questions."""

  easy: list[int]
  hard: list[int]


def reclor_test_index(id_string: str) -> int:
  """The number in a ReClor test id: "test_17" -> 17."""
  match = re.fullmatch(r"test_(\d+)", id_string)
  if match is None:
    raise ValueError(f"not a ReClor test id: {id_string!r}")
  return int(match.group(1))


def reclor_test_subsets(examples_or_ids: Sequence[Mapping[str, Any] | str]) -> ReclorTestSubsets:
  """Splits ReClor test questions into Test-E (EASY) and Test-H (HARD).

  The subset is decided by the id ("test_0".."test_439" are EASY), not by list
  position, so a shuffled or partial list is split correctly.

  Args:
    examples_or_ids: reader examples or their `id` strings.

  Returns:
    `ReclorTestSubsets` with the positions, in `examples_or_ids`, of the EASY
    and HARD questions. Select with e.g. `[preds[i] for i in subsets.easy]`.
  """
  easy, hard = [], []
  for position, item in enumerate(examples_or_ids):
    id_string = item if isinstance(item, str) else item["id"]
    subset = easy if reclor_test_index(id_string) < RECLOR_TEST_EASY_COUNT else hard
    subset.append(position)
  return ReclorTestSubsets(easy=easy, hard=hard)


def write_reclor_predictions(
  path: str | os.PathLike[str], predictions: Mapping[str, int]
) -> list[int]:
  """Writes ReClor leaderboard predictions: a list with entry i for "test_i".

  The list is written as JSON; a path ending in ".npy" gets a NumPy array
  instead (the format of `test_preds.npy` in ReClor's reference code).

  Args:
    path: the file to write.
    predictions: predicted answer index (0-3) for every test id; the ids must
      be exactly "test_0".."test_{n-1}" so that no entry is misaligned.
      `dict(zip(ids, predicted))` builds it from parallel lists.

  Returns:
    The list written.

  Raises:
    ValueError: ids missing or not test ids, or a prediction outside 0-3.
  """
  by_index = {}
  for id_string, prediction in predictions.items():
    prediction = int(prediction)  # numpy integers are not JSON-serialisable.
    if not 0 <= prediction < NUM_CHOICES:
      raise ValueError(
        f"prediction for {id_string!r} is {prediction}, expected 0..{NUM_CHOICES - 1}"
      )
    by_index[reclor_test_index(id_string)] = prediction
  missing = sorted(set(range(len(by_index))) - set(by_index))
  if missing:
    shown = [f"test_{i}" for i in missing[:5]]
    raise ValueError(f"predictions are not for test_0..test_{len(by_index) - 1}: missing {shown}")
  check_split_size("reclor", "test", len(by_index))
  ordered = [by_index[i] for i in range(len(by_index))]
  if os.fspath(path).endswith(".npy"):
    np.save(path, np.asarray(ordered, dtype=np.int64))
  else:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(ordered, f)
  return ordered


# ---------------------------------------------------------------------------
# Multiple-choice encoding.

_BLANK = re.compile(r"_+")


def choice_texts(example: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The four (first, second) text pairs of the standard multiple-choice recipe.

  first = context; second = question + " " + option, or, if the question holds
  a blank ("_"), the question with the option filling the blank. A run of
  underscores ("____") is one blank; for single "_" blanks this is exactly the
  reference `question.replace("_", option)`. The tokenizer then builds
  `<s> first </s></s> second </s>` for each pair.

  Args:
    example: a reader example (uses `context`, `question`, `options`).

  Returns:
    A list with one (first, second) pair per option, in option order.
  """
  context, question = example["context"], example["question"]
  pairs = []
  for option in example["options"]:
    if "_" in question:
      # A function replacement: the option is inserted literally, backslashes
      # and all (a string replacement would interpret "\1" etc.).
      second = _BLANK.sub(lambda _, option=option: option, question)
    else:
      second = f"{question} {option}"
    pairs.append((context, second))
  return pairs
