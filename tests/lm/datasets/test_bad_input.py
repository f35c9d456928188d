"""The readers given files they cannot read: errors that name the file and the line.

Each case is a file a user could plausibly pass by mistake (another dataset's
format, an empty file, a binary file, text in another encoding) or a directory
that lacks a split. The error must say which file, where in it, and what was
expected, and it is never skipped by `skip_malformed` (the whole file is wrong,
not one record).
"""

import json
import re

import pytest

from apollo.lm.datasets import multiple_choice
from tests.lm.datasets import test_multiple_choice as fixtures

READERS = {
  "reclor": (multiple_choice.read_reclor, "val.json"),
  "logiqa": (multiple_choice.read_logiqa, "Eval.txt"),
  "logiqa2": (multiple_choice.read_logiqa2, "dev.txt"),
}


def _read(dataset, path, **kwargs):
  reader, _ = READERS[dataset]
  return reader(path, **kwargs)


def _write(tmp_path, dataset, data: bytes):
  path = tmp_path / READERS[dataset][1]
  path.write_bytes(data)
  return path


def _expect_unreadable(dataset, path, pattern):
  """Both with and without skip_malformed: a file-level error, naming the file."""
  for skip in (False, True):
    with pytest.raises(multiple_choice.UnreadableFileError, match=pattern) as error:
      _read(dataset, path, skip_malformed=skip)
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith(str(path))
    assert error.value.path == str(path)
  return error.value


@pytest.mark.parametrize("dataset", READERS)
@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, dataset, content):
  path = _write(tmp_path, dataset, content)
  _expect_unreadable(dataset, path, "empty")


@pytest.mark.parametrize("dataset", READERS)
def test_binary_file_names_line_and_byte(tmp_path, dataset):
  data = b"\n\nsome text\nmore\x00\x01\x02\x03binary"
  path = _write(tmp_path, dataset, data)
  error = _expect_unreadable(dataset, path, r"line 4, byte 16: .*binary")
  assert (error.line, error.offset) == (4, 16)


@pytest.mark.parametrize("dataset", READERS)
def test_compressed_file_says_what_it_is(tmp_path, dataset):
  path = _write(tmp_path, dataset, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03")
  _expect_unreadable(dataset, path, "gzip")


@pytest.mark.parametrize("dataset", READERS)
def test_utf16_file_says_so(tmp_path, dataset):
  path = _write(tmp_path, dataset, fixtures.logiqa_text().encode("utf-16"))
  _expect_unreadable(dataset, path, "UTF-16")


@pytest.mark.parametrize("dataset", READERS)
def test_latin1_file_names_line_and_byte(tmp_path, dataset):
  text = (
    {
      "reclor": json.dumps(fixtures.RECLOR_RECORDS, indent=1, ensure_ascii=False),
      "logiqa": fixtures.logiqa_text(),
      "logiqa2": "\n".join(json.dumps(r) for r in fixtures.LOGIQA2_RECORDS),
    }[dataset]
    .replace("Context two.", "Caf\u00e9 two.")
    .replace("Text two.", "Caf\u00e9 two.")
  )
  data = text.encode("latin-1")
  offset = data.index(b"\xe9")
  line = data[:offset].count(b"\n") + 1
  path = _write(tmp_path, dataset, data)
  error = _expect_unreadable(dataset, path, rf"line {line}, byte {offset}: .*UTF-8")
  assert (error.line, error.offset) == (line, offset)
  assert "0xe9" in str(error)


def test_logiqa_text_given_to_the_json_readers(tmp_path):
  data = fixtures.logiqa_text().encode()
  path = _write(tmp_path, "reclor", data)
  _expect_unreadable("reclor", path, r"line 2.*LogiQA v1.*read_logiqa\b")
  path = _write(tmp_path, "logiqa2", data)
  _expect_unreadable("logiqa2", path, r"line 2.*LogiQA v1.*read_logiqa\b")


def test_json_given_to_the_logiqa_reader(tmp_path):
  reclor = json.dumps(fixtures.RECLOR_RECORDS).encode()
  path = _write(tmp_path, "logiqa", reclor)
  _expect_unreadable("logiqa", path, r"line 1.*JSON array.*read_reclor")
  jsonl = ("\n" + "\n".join(json.dumps(r) for r in fixtures.LOGIQA2_RECORDS)).encode()
  path = _write(tmp_path, "logiqa", jsonl)
  _expect_unreadable("logiqa", path, r"line 2.*JSON lines.*read_logiqa2")


def test_reclor_and_logiqa2_given_each_other(tmp_path):
  jsonl = "\n".join(json.dumps(r) for r in fixtures.LOGIQA2_RECORDS).encode()
  path = _write(tmp_path, "reclor", jsonl)
  _expect_unreadable("reclor", path, r"line 2.*JSON lines.*read_logiqa2")
  for indent in (None, 2):
    reclor = json.dumps(fixtures.RECLOR_RECORDS, indent=indent).encode()
    path = _write(tmp_path, "logiqa2", reclor)
    _expect_unreadable("logiqa2", path, r"line 1.*JSON array.*read_reclor")


def test_reclor_json_that_is_not_a_list_of_examples(tmp_path):
  path = _write(tmp_path, "reclor", b"[0, 1, 2, 3]")
  _expect_unreadable("reclor", path, r"line 1.*array of numbers")
  path = _write(tmp_path, "reclor", b"[]")
  _expect_unreadable("reclor", path, "no example")
  path = _write(tmp_path, "reclor", b'[{"context": "x"},\n {"context": ')
  _expect_unreadable("reclor", path, r"line 2")


def test_plain_text_given_to_the_logiqa_reader(tmp_path):
  path = _write(tmp_path, "logiqa", b"It rained.\nSo the match was off.\n")
  with pytest.raises(
    multiple_choice.MalformedRecordError, match=r"Eval\.txt: record 1 \(line 1\).*answer letter"
  ):
    multiple_choice.read_logiqa(path)
  # Skipping every record leaves nothing: an error, not an empty split.
  with pytest.raises(
    multiple_choice.UnreadableFileError, match=r"Eval\.txt: line 1: no record.*1 malformed"
  ) as error:
    multiple_choice.read_logiqa(path, skip_malformed=True)
  assert "answer letter" in str(error.value) and error.value.line == 1


@pytest.mark.parametrize("dataset", READERS)
def test_every_record_malformed_is_an_error(tmp_path, dataset):
  data = {
    "reclor": json.dumps([dict(fixtures.RECLOR_RECORDS[0], label=7)]),
    "logiqa": fixtures.logiqa_text(fixtures.LOGIQA_RECORDS[:1]).replace("\na\n", "\ne\n"),
    "logiqa2": json.dumps(dict(fixtures.LOGIQA2_RECORDS[0], answer=9)),
  }[dataset]
  path = _write(tmp_path, dataset, data.encode())
  with pytest.raises(multiple_choice.MalformedRecordError):
    _read(dataset, path)
  with pytest.raises(multiple_choice.UnreadableFileError, match="no record"):
    _read(dataset, path, skip_malformed=True)


def test_missing_file_is_file_not_found(tmp_path):
  for dataset in READERS:
    with pytest.raises(FileNotFoundError):
      _read(dataset, tmp_path / "nothing.txt")


# --- Split files in a directory ---------------------------------------------


def test_find_split_file_any_case(tmp_path):
  (tmp_path / "eval.TXT").write_text("x")
  found = multiple_choice.find_split_file(tmp_path, "logiqa", "validation")
  assert found == str(tmp_path / "eval.TXT")
  (tmp_path / "dev.jsonl").write_text("x")
  assert multiple_choice.find_split_file(tmp_path, "logiqa2", "dev") == str(tmp_path / "dev.jsonl")


def test_missing_split_names_the_split_and_what_was_looked_for(tmp_path):
  (tmp_path / "train.json").write_text("[]")
  (tmp_path / "notes.md").write_text("")
  with pytest.raises(multiple_choice.MissingSplitError) as error:
    multiple_choice.find_split_file(tmp_path, "reclor", "val")
  message = str(error.value)
  assert isinstance(error.value, FileNotFoundError)
  assert "validation" in message and "'val.json'" in message and str(tmp_path) in message
  assert "notes.md" in message and "train.json" in message  # what is there instead
  assert error.value.split == "validation" and error.value.looked_for == ("val.json",)

  with pytest.raises(multiple_choice.MissingSplitError, match=re.escape(str(tmp_path / "no"))):
    multiple_choice.find_split_file(tmp_path / "no", "logiqa", "test")
  with pytest.raises(ValueError, match="unknown dataset"):
    multiple_choice.find_split_file(tmp_path, "squad", "train")
