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

Malformed records raise `MalformedRecordError` (a `ValueError`) naming the file
and the record (and line, where the format has lines). With
`skip_malformed=True` the reader drops them instead; the returned `Examples`
list then says how many it dropped (`.skipped`) and why (`.errors`):

    examples = read_logiqa("LogiQA/Train.txt", skip_malformed=True)
    print(len(examples), "read,", examples.skipped, "skipped")
    check_split_size("logiqa", "train", len(examples))  # warns if not 7,376

The multiple-choice recipe (`choice_texts`) and the ReClor leaderboard helpers
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

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

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


class Examples(list):
  """The list of examples a reader returns, plus what it had to skip.

  A plain `list` of example dicts in every other respect (slicing it gives a
  plain list). `errors` holds one `MalformedRecordError` per skipped record;
  it is empty unless the reader was called with `skip_malformed=True`.
  """

  def __init__(
    self, examples: Iterable[dict[str, Any]] = (), errors: Iterable[MalformedRecordError] = ()
  ):
    super().__init__(examples)
    self.errors: list[MalformedRecordError] = list(errors)

  @property
  def skipped(self) -> int:
    """How many malformed records were skipped."""
    return len(self.errors)


class _Collector:
  """Gathers parsed records into `Examples`, raising or skipping errors."""

  def __init__(self, skip_malformed: bool):
    self.skip_malformed = skip_malformed
    self.examples = Examples()

  def add(self, parse, *args) -> bool:
    """Keeps `parse(*args)`; returns False if the record was skipped."""
    try:
      self.examples.append(parse(*args))
      return True
    except MalformedRecordError as error:
      if not self.skip_malformed:
        raise
      logging.warning("Skipping malformed record: %s", error)
      self.examples.errors.append(error)
      return False


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

  Args:
    path: the split's JSON file.
    skip_malformed: skip malformed records (counted in `.skipped`) instead of
      raising.

  Returns:
    `Examples`, in file order.

  Raises:
    MalformedRecordError: a record is malformed and `skip_malformed` is False.
    ValueError: the file is not a JSON array (never skipped).
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from error
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON array of examples, got {type(records).__name__}")
  collector = _Collector(skip_malformed)
  for number, record in enumerate(records, start=1):
    collector.add(_parse_reclor_record, path, number, record)
  return collector.examples


# ---------------------------------------------------------------------------
# LogiQA (v1): 8-line text records.

_LOGIQA_RECORD_LINES = 7  # answer, context, question, 4 options (+ a blank).


def _is_answer_letter(line: str) -> bool:
  return line.strip().lower() in ("a", "b", "c", "d")


def _parse_logiqa_record(
  path: str, stem: str, index: int, lines: list[str], start: int
) -> dict[str, Any]:
  """Parses the record whose answer letter is at `lines[start]`."""
  check = _RecordChecks(path, index + 1)

  def fail(reason, offset):
    check.fail(reason, line=start + offset + 1)

  if not _is_answer_letter(lines[start]):
    fail(f"expected an answer letter a-d, got {lines[start]!r}", 0)
  if start + _LOGIQA_RECORD_LINES > len(lines):
    fail(
      "record ends early: expected answer, context, question and 4 options", len(lines) - start - 1
    )
  context, question = lines[start + 1], lines[start + 2]
  options = []
  for k, letter in enumerate(_LETTERS):
    option = lines[start + 3 + k].strip()
    if not option.startswith(letter + "."):
      fail(f"expected option {letter} to start with {letter + '.'!r}, got {option!r}", 3 + k)
    options.append(option[2:].strip())
  end = start + _LOGIQA_RECORD_LINES
  if end < len(lines) and lines[end].strip():
    fail(f"expected a blank line after option D, got {lines[end]!r}", _LOGIQA_RECORD_LINES)
  label = "abcd".index(lines[start].strip().lower())
  return _example(f"{stem}_{index}", context, question, options, label)


def read_logiqa(path: str | os.PathLike[str], *, skip_malformed: bool = False) -> Examples:
  """Reads one LogiQA v1 split (`Train.txt`, `Eval.txt` or `Test.txt`).

  Each record is 8 lines: a blank line, the answer letter (a-d), the context,
  the question, then the four options prefixed "A." to "D."; the prefixes are
  stripped. The last record may lack its final newline. Extra blank lines
  between records are tolerated. Ids are `f"{file_stem}_{i}"` with `i` the
  0-based position of the record in the file, counting skipped records, so that
  ids do not shift when a malformed record is dropped.

  Lines are split on "\\n" only (a trailing "\\r" is dropped): `str.splitlines`
  would also split on characters such as U+2028 that can occur inside a context.

  Args:
    path: the split's text file.
    skip_malformed: skip malformed records (counted in `.skipped`) instead of
      raising. Reading resumes at the next blank line followed by an answer
      letter.

  Returns:
    `Examples`, in file order.

  Raises:
    MalformedRecordError: a record is malformed and `skip_malformed` is False.
  """
  path = os.fspath(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  with open(path, encoding="utf-8") as f:
    lines = [line.removesuffix("\r") for line in f.read().split("\n")]

  collector = _Collector(skip_malformed)
  i, index = 0, 0
  while True:
    while i < len(lines) and not lines[i].strip():  # separator line(s)
      i += 1
    if i == len(lines):
      return collector.examples
    if collector.add(_parse_logiqa_record, path, stem, index, lines, i):
      i += _LOGIQA_RECORD_LINES
    else:
      # Resynchronise at the next answer letter that follows a blank line.
      i += 1
      while i < len(lines) and not (not lines[i - 1].strip() and _is_answer_letter(lines[i])):
        i += 1
    index += 1


# ---------------------------------------------------------------------------
# LogiQA 2.0: JSON lines.


def _parse_logiqa2_line(path: str, number: int, line_number: int, line: str) -> dict[str, Any]:
  check = _RecordChecks(path, number, line=line_number)
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    check.fail(f"not valid JSON: {error.msg}")
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
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  collector = _Collector(skip_malformed)
  number = 0
  for line_number, line in enumerate(lines, start=1):
    if line.strip():
      number += 1
      collector.add(_parse_logiqa2_line, path, number, line_number, line)
  return collector.examples


# ---------------------------------------------------------------------------
# Split sizes, ReClor's test subsets and leaderboard file.


def canonical_split(split: str) -> str:
  """Maps a split or file name ("val", "Eval.txt") to train/validation/test."""
  stem = os.path.splitext(os.path.basename(split))[0].lower()
  if stem not in _SPLIT_ALIASES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_ALIASES)}")
  return _SPLIT_ALIASES[stem]


def check_split_size(dataset: str, split: str, num_examples: int) -> str | None:
  """Compares a split's size with the published one; warns, never fails.

  Fixtures and partial copies are legitimately smaller, so a mismatch is logged
  as a warning and returned rather than raised.

  Args:
    dataset: "reclor" or "logiqa" (others have no published size here).
    split: a split or file name, e.g. "val", "Eval.txt", "test".
    num_examples: how many examples were read.

  Returns:
    The warning message if the sizes differ, otherwise None (also None when no
    published size is known for this dataset and split).
  """
  expected = PUBLISHED_SPLIT_SIZES.get(dataset.lower(), {}).get(canonical_split(split))
  if expected is None or expected == num_examples:
    return None
  message = (
    f"{dataset} {canonical_split(split)}: read {num_examples:,} "
    f"examples, the published split has {expected:,}"
  )
  logging.warning(message)
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
