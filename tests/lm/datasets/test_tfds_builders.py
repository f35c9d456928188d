"""The TFDS builders prepare tiny manual directories and read back without TF.

TensorFlow is not installed in this environment: the builders write
ArrayRecord files, and `as_data_source` / `tfds.data_source` read them with
array_record alone. The test only skips where that module is missing.
"""

import importlib.util
import logging

import pytest

from tests.lm.datasets import test_multiple_choice as fixtures

tfds = pytest.importorskip("tensorflow_datasets")
if importlib.util.find_spec("array_record") is None:
  pytest.skip("array_record is needed to write/read ArrayRecord files", allow_module_level=True)

from apollo.lm.datasets import tfds_builders  # noqa: E402  (after the skips)


def _decode(record):
  """Text features come back as bytes from a data source."""
  return {
    k: (
      v.decode() if isinstance(v, bytes) else [o.decode() for o in v] if k == "options" else int(v)
    )
    for k, v in record.items()
  }


def test_reclor_builder(tmp_path, caplog):
  manual = tmp_path / "manual"
  manual.mkdir()
  fixtures.write_reclor(manual / "train.json")
  fixtures.write_reclor(manual / "val.json", fixtures.RECLOR_RECORDS[:1])
  fixtures.write_reclor(manual / "test.json", fixtures.reclor_test_records(3))
  data_dir = tmp_path / "tfds"
  with caplog.at_level(logging.WARNING):
    builder = tfds_builders.prepare("reclor", manual, data_dir)
  assert "published split has 4,638" in caplog.text  # reported, not fatal

  source = builder.as_data_source()
  assert {s: len(source[s]) for s in source} == {"train": 2, "validation": 1, "test": 3}
  first = _decode(source["train"][0])
  assert first == {
    "id": "train_0",
    "context": fixtures.RECLOR_RECORDS[0]["context"],
    "question": fixtures.RECLOR_RECORDS[0]["question"],
    "options": fixtures.RECLOR_RECORDS[0]["answers"],
    "label": 2,
  }
  assert [_decode(r)["label"] for r in source["test"]] == [-1, -1, -1]

  # The registered name works too, once the package is imported.
  by_name = tfds.data_source("reclor", data_dir=str(data_dir))
  assert _decode(by_name["test"][2])["id"] == "test_2"


def test_logiqa_builders(tmp_path):
  manual = tmp_path / "logiqa"
  manual.mkdir()
  for name in ("Train.txt", "Eval.txt", "Test.txt"):
    fixtures.write_logiqa(manual / name)
  source = tfds_builders.prepare("logiqa", manual, tmp_path / "tfds").as_data_source()
  record = _decode(source["validation"][1])
  assert record["id"] == "Eval_1" and record["label"] == 3
  assert record["options"] == ["w", "x", "y", "z"]

  manual2 = tmp_path / "logiqa2"
  manual2.mkdir()
  for name in ("train.txt", "dev.txt", "test.txt"):
    fixtures.write_logiqa2(manual2 / name)
  source2 = tfds_builders.prepare("logiqa2", manual2, tmp_path / "tfds").as_data_source()
  assert [_decode(r)["id"] for r in source2["test"]] == ["1001", "1002"]
  assert _decode(source2["train"][0])["label"] == 3


def test_missing_split_file_says_what_to_provide(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  fixtures.write_reclor(manual / "train.json")
  with pytest.raises(FileNotFoundError, match="val.json"):
    tfds_builders.prepare("reclor", manual, tmp_path / "tfds")


def test_missing_split_names_split_and_present_files(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("Train.txt", "Test.txt", "readme.md"):
    (manual / name).write_text(fixtures.logiqa_text())
  with pytest.raises(FileNotFoundError, match=r"'validation'.*'Eval\.txt'.*readme\.md"):
    tfds_builders.prepare("logiqa", manual, tmp_path / "tfds")


def test_empty_split_file_is_an_error(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("Train.txt", "Eval.txt"):
    fixtures.write_logiqa(manual / name)
  (manual / "Test.txt").write_bytes(b"")
  with pytest.raises(ValueError, match=r"Test\.txt.*empty"):
    tfds_builders.prepare("logiqa", manual, tmp_path / "tfds")


def test_logiqa_builder_reads_the_published_artefacts_and_reports_them(tmp_path, caplog):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("Train.txt", "Eval.txt", "Test.txt"):
    (manual / name).write_text("\n".join(fixtures.LOGIQA_ARTEFACT_LINES), encoding="utf-8")
  with caplog.at_level(logging.INFO):
    source = tfds_builders.prepare("logiqa", manual, tmp_path / "tfds").as_data_source()
  assert _decode(source["test"][0])["options"] == ["First.", "No second.", "third.", "fourth."]
  assert "option_without_prefix=2" in caplog.text
