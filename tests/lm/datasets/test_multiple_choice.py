"""Tests for the ReClor / LogiQA / LogiQA 2.0 readers and the MC helpers.

Fixtures are tiny files written in each dataset's real format.
"""

import json
import logging

import numpy as np
import pytest

from apollo.lm.datasets import multiple_choice

KEYS = {"id", "context", "question", "options", "label"}

RECLOR_RECORDS = [
  {
    "context": "All birds fly. Ttherefore, the family' s parrot flies.",
    "question": "Which one of the following is an assumption?",
    "answers": ["A one", "B two", "C three", "D four"],
    "label": 2,
    "id_string": "train_0",
  },
  {
    "context": "Context two.",
    "question": "Which one weakens it?",
    "answers": ["a", "b", "c", "d"],
    "label": 0,
    "id_string": "train_1",
    "source": "extra field",
    "type": {"sufficient": True},
  },
]

LOGIQA_RECORDS = [
  ("a", "Context one, with a comma.", "Which is true?", ["First.", "Second.", "Third.", "Fourth."]),
  ("d", "Context two.", "Which is false?", ["w", "x", "y", "z"]),
  ("b", "Context three.", "The blank: the cat _ the dog.", ["chased", "saw", "met", "fed"]),
]


def write_reclor(path, records=RECLOR_RECORDS):
  path.write_text(json.dumps(records), encoding="utf-8")
  return path


def reclor_test_records(n):
  return [
    {
      "context": f"c{i}",
      "question": f"q{i}",
      "answers": ["a", "b", "c", "d"],
      "id_string": f"test_{i}",
    }
    for i in range(n)
  ]


def logiqa_text(records=LOGIQA_RECORDS, final_newline=False):
  lines = []
  for answer, context, question, options in records:
    lines += ["", answer, context, question]
    lines += [f"{letter}.{option}" for letter, option in zip("ABCD", options)]
  return "\n".join(lines) + ("\n" if final_newline else "")


def write_logiqa(path, **kwargs):
  path.write_text(logiqa_text(**kwargs), encoding="utf-8")
  return path


LOGIQA2_RECORDS = [
  {
    "id": 1001,
    "answer": 3,
    "text": "Text one.",
    "question": "Q one?",
    "options": ["o1", "o2", "o3", "o4"],
    "type": {"Categorical Reasoning": True, "Sufficient Conditional": False},
  },
  {
    "id": 1002,
    "answer": 0,
    "text": "Text two.",
    "question": "Q two?",
    "options": ["p1", "p2", "p3", "p4"],
    "type": {},
    "extra": [1, 2],
  },
]


def write_logiqa2(path, records=LOGIQA2_RECORDS):
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
  return path


# --- ReClor -----------------------------------------------------------------


def test_read_reclor_parses_and_ignores_extra_fields(tmp_path):
  examples = multiple_choice.read_reclor(write_reclor(tmp_path / "train.json"))
  assert len(examples) == 2 and examples.skipped == 0
  assert all(set(e) == KEYS for e in examples)
  first = examples[0]
  assert first["id"] == "train_0"
  # Artefacts of the real text are kept as they are.
  assert first["context"] == RECLOR_RECORDS[0]["context"]
  assert first["options"] == ["A one", "B two", "C three", "D four"]
  assert first["label"] == 2
  assert examples[1]["label"] == 0


def test_read_reclor_hidden_test_labels_are_none(tmp_path):
  records = reclor_test_records(3)
  records[1]["label"] = None
  records[2]["label"] = -1
  examples = multiple_choice.read_reclor(write_reclor(tmp_path / "test.json", records))
  assert [e["label"] for e in examples] == [None, None, None]


def test_read_reclor_malformed_record_names_file_and_record(tmp_path):
  records = [dict(RECLOR_RECORDS[0]), dict(RECLOR_RECORDS[1])]
  records[1]["answers"] = ["only", "three", "answers"]
  path = write_reclor(tmp_path / "val.json", records)
  with pytest.raises(
    multiple_choice.MalformedRecordError, match=r"val\.json: record 2: .*answers"
  ) as error:
    multiple_choice.read_reclor(path)
  assert isinstance(error.value, ValueError)
  assert error.value.record == 2 and error.value.path == str(path)

  examples = multiple_choice.read_reclor(path, skip_malformed=True)
  assert [e["id"] for e in examples] == ["train_0"]
  assert examples.skipped == 1 and examples.errors[0].record == 2


def test_read_reclor_rejects_bad_labels(tmp_path):
  records = [dict(RECLOR_RECORDS[0], label=4), dict(RECLOR_RECORDS[1], label=True)]
  path = write_reclor(tmp_path / "train.json", records + [RECLOR_RECORDS[1]])
  examples = multiple_choice.read_reclor(path, skip_malformed=True)
  assert len(examples) == 1 and examples.skipped == 2


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("end", ["", "\n", "\r\n"])
def test_read_reclor_bom_crlf_and_trailing_newline(tmp_path, bom, indent, end):
  text = json.dumps(RECLOR_RECORDS, indent=indent).replace("\n", "\r\n") + end
  path = tmp_path / "val.json"
  path.write_bytes(bom + text.encode("utf-8"))
  examples = multiple_choice.read_reclor(path)
  assert [e["id"] for e in examples] == ["train_0", "train_1"]
  assert examples[0]["context"] == RECLOR_RECORDS[0]["context"]
  if bom:
    assert examples.odd["utf8_byte_order_mark"] == 1


def test_read_reclor_not_an_array(tmp_path):
  path = tmp_path / "train.json"
  path.write_text('{"context": "x"}')
  with pytest.raises(ValueError, match="train.json"):
    multiple_choice.read_reclor(path, skip_malformed=True)


# --- LogiQA -----------------------------------------------------------------


@pytest.mark.parametrize("final_newline", [False, True])
def test_read_logiqa(tmp_path, final_newline):
  path = write_logiqa(tmp_path / "Train.txt", final_newline=final_newline)
  examples = multiple_choice.read_logiqa(path)
  assert len(examples) == 3 and all(set(e) == KEYS for e in examples)
  assert [e["id"] for e in examples] == ["Train_0", "Train_1", "Train_2"]
  assert [e["label"] for e in examples] == [0, 3, 1]
  assert examples[0]["context"] == "Context one, with a comma."
  assert examples[0]["question"] == "Which is true?"
  # The "A." .. "D." prefixes are stripped.
  assert examples[0]["options"] == ["First.", "Second.", "Third.", "Fourth."]
  assert examples[2]["options"] == ["chased", "saw", "met", "fed"]


def test_read_logiqa_crlf_and_spaced_prefixes(tmp_path):
  text = logiqa_text().replace("A.First.", "A. First.").replace("\n", "\r\n")
  path = tmp_path / "Eval.txt"
  path.write_bytes(text.encode("utf-8"))
  examples = multiple_choice.read_logiqa(path)
  assert examples[0]["options"][0] == "First."
  assert examples[0]["context"] == "Context one, with a comma."


# The artefacts of the published English files (specs: LogiQA v1 CORRECTION), one
# per option line, and what the reader keeps of each line.
LOGIQA_ARTEFACT_LINES = [
  "",
  "a",
  "Context one.",
  "Which is true?",
  "A.First.",
  "B No second.",  # the letter and a space, no dot
  "c.third.",  # a lower-case letter
  "D\uff0efourth.",  # a full-width dot
  "",
  "b",
  "Context two.",
  "Which is false?",
  "The firm sells more on the C.S City market.",  # no prefix; a stray "C." inside
  "B.Only the \u516c\u53f8 grew.",  # partly in Chinese
  "C.It rose on the C.S City market.",
  "D.None.",
  "",
  "d",
  "Context three.",
  "Question three?",
  "A person who waits.",  # no prefix: this "A" is the article, kept
  "B.x",
  "C.y",
  "D.z",  # the last record, without a final newline
]


def test_read_logiqa_loads_the_published_artefacts(tmp_path):
  path = tmp_path / "Test.txt"
  path.write_text("\n".join(LOGIQA_ARTEFACT_LINES), encoding="utf-8")
  examples = multiple_choice.read_logiqa(path)
  assert [e["id"] for e in examples] == ["Test_0", "Test_1", "Test_2"]
  assert [e["label"] for e in examples] == [0, 1, 3]
  assert examples[0]["options"] == ["First.", "No second.", "third.", "fourth."]
  assert examples[1]["options"] == [
    "The firm sells more on the C.S City market.",
    "Only the \u516c\u53f8 grew.",
    "It rose on the C.S City market.",
    "None.",
  ]
  assert examples[2]["options"] == ["A person who waits.", "x", "y", "z"]
  assert examples.skipped == 0
  assert dict(examples.odd) == {
    "option_letter_without_dot": 1,
    "option_lower_case_letter": 1,
    "option_full_width_dot": 1,
    "option_without_prefix": 2,
    "option_with_chinese": 1,
  }
  # The oddities are part of the split-size report, even when the size is right.
  message = multiple_choice.check_split_size("logiqa", "test", len(examples), report=examples)
  assert "651" in message and "option_without_prefix=2" in message
  assert "option_full_width_dot=1" in message


def test_check_split_size_reports_oddities_of_a_full_split(caplog):
  examples = multiple_choice.Examples([{}] * 651)
  assert multiple_choice.check_split_size("logiqa", "Eval.txt", 651, report=examples) is None
  examples.odd["option_without_prefix"] = 12
  with caplog.at_level(logging.INFO):
    message = multiple_choice.check_split_size("logiqa", "Eval.txt", 651, report=examples)
  assert "option_without_prefix=12" in message and "published" not in message
  assert "option_without_prefix=12" in caplog.text


def test_read_logiqa_other_letters_and_runs_without_a_blank_line(tmp_path):
  lines = ["", "c", "Ctx.", "Q?", "A.one", "C.two", "C\uff0ethree", "D.", "a", "Ctx 2.", "Q2?"]
  lines += ["A.p", "B.q", "C.r", "D.s", ""]
  path = tmp_path / "Eval.txt"
  path.write_text("\n".join(lines), encoding="utf-8")
  examples = multiple_choice.read_logiqa(path)
  # Option B's line starts with another letter: kept whole, and counted.
  assert examples[0]["options"] == ["one", "C.two", "three", ""]
  assert examples[1]["options"] == ["p", "q", "r", "s"] and examples[1]["id"] == "Eval_1"
  assert examples.odd["option_other_letter_prefix"] == 1
  assert examples.odd["option_full_width_dot"] == 1
  assert examples.odd["option_empty"] == 1
  assert examples.odd["missing_blank_line"] == 1


def test_read_logiqa_missing_line_is_malformed(tmp_path):
  lines = logiqa_text().split("\n")
  del lines[13]  # record 2 loses option B (line 14)
  path = tmp_path / "Test.txt"
  path.write_text("\n".join(lines), encoding="utf-8")
  with pytest.raises(
    multiple_choice.MalformedRecordError, match=r"Test\.txt: record 2 \(line 10\): .*6 lines"
  ) as error:
    multiple_choice.read_logiqa(path)
  assert error.value.line == 10 and error.value.record == 2

  examples = multiple_choice.read_logiqa(path, skip_malformed=True)
  assert examples.skipped == 1
  # Ids keep their file positions: record 2 is missing, record 3 is Test_2.
  assert [e["id"] for e in examples] == ["Test_0", "Test_2"]
  assert "skipped 1" in multiple_choice.check_split_size(
    "logiqa", "test", len(examples), report=examples
  )


def test_read_logiqa_truncated_and_bad_letter(tmp_path):
  records = list(LOGIQA_RECORDS)
  records[0] = ("e",) + records[0][1:]
  text = logiqa_text(records)
  text = text[: text.rindex("\nD.")]  # the last record loses option D
  path = tmp_path / "Train.txt"
  path.write_text(text, encoding="utf-8")
  with pytest.raises(ValueError, match=r"record 1 \(line 2\).*answer letter"):
    multiple_choice.read_logiqa(path)
  examples = multiple_choice.read_logiqa(path, skip_malformed=True)
  assert [e["id"] for e in examples] == ["Train_1"]
  assert examples.skipped == 2
  assert "ends early" in str(examples.errors[1])


def test_read_logiqa_byte_order_mark(tmp_path):
  path = tmp_path / "Train.txt"
  path.write_bytes(b"\xef\xbb\xbf" + logiqa_text().encode("utf-8"))
  examples = multiple_choice.read_logiqa(path)
  assert len(examples) == 3 and examples[0]["context"] == "Context one, with a comma."
  assert examples.odd["utf8_byte_order_mark"] == 1


# --- LogiQA 2.0 -------------------------------------------------------------


def test_read_logiqa2(tmp_path):
  examples = multiple_choice.read_logiqa2(write_logiqa2(tmp_path / "dev.txt"))
  assert len(examples) == 2 and all(set(e) == KEYS for e in examples)
  assert examples[0] == {
    "id": "1001",
    "context": "Text one.",
    "question": "Q one?",
    "options": ["o1", "o2", "o3", "o4"],
    "label": 3,
  }


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("final_newline", [False, True])
def test_read_logiqa2_bom_crlf_and_trailing_newline(tmp_path, bom, newline, final_newline):
  text = newline.join(json.dumps(r, ensure_ascii=False) for r in LOGIQA2_RECORDS)
  path = tmp_path / "test.txt"
  path.write_bytes(bom + (text + (newline if final_newline else "")).encode("utf-8"))
  examples = multiple_choice.read_logiqa2(path)
  assert [e["id"] for e in examples] == ["1001", "1002"]
  assert examples[1]["options"] == ["p1", "p2", "p3", "p4"]


def test_read_logiqa2_malformed_line(tmp_path):
  path = tmp_path / "train.txt"
  lines = [json.dumps(LOGIQA2_RECORDS[0]), "", "{not json", json.dumps(LOGIQA2_RECORDS[1])]
  path.write_text("\n".join(lines), encoding="utf-8")
  error = r"train\.txt: record 2 \(line 3\)"
  with pytest.raises(multiple_choice.MalformedRecordError, match=error):
    multiple_choice.read_logiqa2(path)
  examples = multiple_choice.read_logiqa2(path, skip_malformed=True)
  assert [e["id"] for e in examples] == ["1001", "1002"]
  assert examples.skipped == 1


# --- Split sizes, Test-E/H, predictions -------------------------------------


def test_check_split_size_warns_but_never_fails(caplog):
  assert multiple_choice.check_split_size("reclor", "val.json", 500) is None
  assert multiple_choice.check_split_size("logiqa", "Eval.txt", 651) is None
  with caplog.at_level(logging.WARNING):
    message = multiple_choice.check_split_size("reclor", "train", 2)
  assert "4,638" in message and "4,638" in caplog.text
  assert "7,376" in multiple_choice.check_split_size("logiqa", "Train.txt", 3)
  assert multiple_choice.check_split_size("logiqa2", "dev", 3) is None


def test_reclor_test_subsets():
  ids = ["test_0", "test_439", "test_440", "test_999", "test_5"]
  subsets = multiple_choice.reclor_test_subsets(ids)
  assert subsets.easy == [0, 1, 4] and subsets.hard == [2, 3]
  full = multiple_choice.reclor_test_subsets([{"id": f"test_{i}"} for i in range(1000)])
  assert len(full.easy) == 440 and len(full.hard) == 560
  with pytest.raises(ValueError):
    multiple_choice.reclor_test_subsets(["val_3"])


def test_write_reclor_predictions(tmp_path):
  predictions = {f"test_{i}": np.int64(i % 4) for i in (2, 0, 3, 1)}
  written = multiple_choice.write_reclor_predictions(tmp_path / "p.json", predictions)
  assert written == [0, 1, 2, 3]
  assert json.loads((tmp_path / "p.json").read_text()) == [0, 1, 2, 3]
  multiple_choice.write_reclor_predictions(tmp_path / "p.npy", predictions)
  assert np.load(tmp_path / "p.npy").tolist() == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="missing"):
    multiple_choice.write_reclor_predictions(tmp_path / "q.json", {"test_0": 1, "test_2": 0})
  with pytest.raises(ValueError, match="expected 0..3"):
    multiple_choice.write_reclor_predictions(tmp_path / "q.json", {"test_0": 4})


# --- Multiple-choice text pairs ---------------------------------------------


def test_choice_texts_appends_option():
  example = {"context": "C.", "question": "Which is true?", "options": ["a", "b", "c", "d"]}
  assert multiple_choice.choice_texts(example) == [
    ("C.", "Which is true? a"),
    ("C.", "Which is true? b"),
    ("C.", "Which is true? c"),
    ("C.", "Which is true? d"),
  ]


def test_choice_texts_fills_the_blank():
  example = {
    "context": "C.",
    "question": "The cat ____ the dog, so _ ran.",
    "options": ["chased", "saw", r"met \1", "fed"],
  }
  pairs = multiple_choice.choice_texts(example)
  assert pairs[0] == ("C.", "The cat chased the dog, so chased ran.")
  assert pairs[2][1] == r"The cat met \1 the dog, so met \1 ran."
  assert len(pairs) == 4
