"""Tests for keyword matching, document sources and the resumable selection job."""

import filecmp
import json
import os
import subprocess
import sys

import pytest

from apollo.lm.data import generated_corpus, keywords, selection, text_sources
from tests.lm import pretraining_data_helpers as helpers


def _found(text, matcher=None):
  matcher = matcher or keywords.KeywordMatcher()
  return [(m.keyword, m.group, text[m.start : m.end]) for m in matcher.find(text)]


def test_keywords_match_whole_words_in_any_case():
  assert _found("THEREFORE it holds; Hence so.") == [
    ("therefore", "conclusion", "THEREFORE"),
    ("hence", "conclusion", "Hence"),
    ("so", "conclusion", "so"),
  ]
  # Keywords inside other words never match.
  assert _found("Also, the notable ifs and buttons are nonsense.") == []
  assert _found("Nothing is known; nobody came.") == []


def test_multi_word_keywords_and_longest_match():
  assert _found("As  a\nresult, it rained.") == [("as a result", "conclusion", "As  a\nresult")]
  assert _found("It follows that x holds only if y holds.") == [
    ("it follows that", "conclusion", "It follows that"),
    ("only if", "conditional", "only if"),
  ]  # Not also "if".
  assert [k for k, _, _ in _found("Given that it is due to rain")] == ["given that", "due to"]


def test_custom_keyword_groups():
  groups = keywords.parse_keyword_groups("cause=because,on account of;neg=not")
  matcher = keywords.KeywordMatcher(groups)
  assert _found("On account of rain it did not happen, so what.", matcher) == [
    ("on account of", "cause", "On account of"),
    ("not", "neg", "not"),
  ]
  with pytest.raises(ValueError, match="two groups"):
    keywords.KeywordMatcher({"a": ["so"], "b": ["so"]})
  with pytest.raises(ValueError, match="group=kw1"):
    keywords.parse_keyword_groups("justwords")


def test_generated_corpus_is_deterministic_and_filler_has_no_keywords():
  config = generated_corpus.GeneratedCorpusConfig(num_documents=5, seed=1)
  assert generated_corpus.generate_document(3, config) == generated_corpus.generate_document(
    3, config
  )
  assert generated_corpus.generate_document(3, config) != generated_corpus.generate_document(
    4, config
  )
  matcher = keywords.KeywordMatcher()
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for _ in range(20):
    for template in generated_corpus.FILLER_TEMPLATES:
      assert not matcher.find(generated_corpus._fill(template, rng)), template
    for group, templates in generated_corpus.LOGICAL_TEMPLATES.items():
      for template in templates:
        found = {m.group for m in matcher.find(generated_corpus._fill(template, rng))}
        assert group in found, template


def test_counts_on_known_mini_corpus(tmp_path):
  path = helpers.write_mini_corpus(str(tmp_path))
  out = str(tmp_path / "out")
  counts = selection.run_selection(
    text_sources.TextFileSource([path]), out, selection.SelectionConfig(num_workers=1)
  )
  assert counts.documents_read == 3  # Three blank-line-separated paragraphs.
  assert counts.sentences_seen == 9  # 3 + 4 + 2.
  assert counts.sentences_kept == 4
  assert counts.kept_per_group == {"conclusion": 2, "conditional": 1, "contrast": 1, "negation": 1}
  with open(os.path.join(out, "counts.json")) as f:
    assert json.load(f) == counts.to_json()
  records = list(selection.iter_records(out))
  assert [r["text"] for r in records] == [
    "It rained, so the match was cancelled.",
    "If the pitch dries, the match will be replayed on Sunday.",
    "Although tickets were cheap, the stands were NOT full.",
    "As a result the club lost money.",
  ]
  assert records[2]["groups"] == ["contrast", "negation"]
  assert records[2]["keywords"] == [["although", "contrast", 0, 8], ["not", "negation", 45, 48]]
  assert records[2]["doc_id"] == f"{path}#1"
  assert records[2]["sentence_id"] == "1:2"


def test_text_file_unit_and_jsonl_source(tmp_path):
  path = helpers.write_mini_corpus(str(tmp_path))
  docs = list(text_sources.TextFileSource([path], unit="file").iter_documents())
  assert len(docs) == 1 and docs[0].doc_id == path
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text('{"body": "A.", "id": 7}\n\n{"body": "B."}\n')
  source = text_sources.JsonlSource([str(jsonl)], text_field="body")
  docs = list(source.iter_documents())
  assert [(d.index, d.doc_id, d.text) for d in docs] == [(0, "7", "A."), (1, f"{jsonl}:3", "B.")]
  assert [d.text for d in source.iter_documents(start=1)] == ["B."]
  with pytest.raises(KeyError, match="no field 'text'"):
    list(text_sources.JsonlSource([str(jsonl)]).iter_documents())
  with pytest.raises(FileNotFoundError, match="nowhere"):
    text_sources.TextFileSource([str(tmp_path / "nowhere")])


def _generated(num_documents=60):
  return text_sources.GeneratedSource(
    generated_corpus.GeneratedCorpusConfig(num_documents=num_documents, seed=5)
  )


def _same_output(dir_a, dir_b):
  names_a = sorted(os.listdir(dir_a))
  assert names_a == sorted(os.listdir(dir_b))
  for name in names_a:
    assert filecmp.cmp(os.path.join(dir_a, name), os.path.join(dir_b, name), shallow=False), name


def test_resume_after_crash_gives_identical_output(tmp_path, monkeypatch):
  config = selection.SelectionConfig(docs_per_shard=10, num_workers=1)
  reference = str(tmp_path / "reference")
  selection.run_selection(_generated(), reference, config)
  assert len(selection.list_shards(reference)) == 6

  # Crash right after shard 2 is renamed into place but before its commit.
  crashed = str(tmp_path / "crashed")
  real_commit = selection.commit_state
  commits = []

  def crashing_commit(path, state):
    if state["next_shard"] == 3:
      raise KeyboardInterrupt("simulated kill")
    commits.append(state["next_shard"])
    real_commit(path, state)

  monkeypatch.setattr(selection, "commit_state", crashing_commit)
  with pytest.raises(KeyboardInterrupt):
    selection.run_selection(_generated(), crashed, config)
  assert commits == [1, 2]
  assert os.path.exists(selection.shard_path(crashed, config, 2))  # Uncommitted.
  open(selection.shard_path(crashed, config, 3) + ".tmp", "wb").close()  # Debris.
  assert not os.path.exists(os.path.join(crashed, "counts.json"))

  monkeypatch.setattr(selection, "commit_state", real_commit)
  counts = selection.run_selection(_generated(), crashed, config)
  _same_output(reference, crashed)
  assert counts.documents_read == 60
  # Running a finished job again changes nothing.
  selection.run_selection(_generated(), crashed, config)
  _same_output(reference, crashed)


def test_max_shards_stops_and_resumes(tmp_path):
  config = selection.SelectionConfig(docs_per_shard=10, num_workers=1)
  reference, staged = str(tmp_path / "a"), str(tmp_path / "b")
  selection.run_selection(_generated(), reference, config)
  partial = selection.run_selection(_generated(), staged, config, max_shards=4)
  assert partial.documents_read == 40
  assert not os.path.exists(os.path.join(staged, "counts.json"))
  selection.run_selection(_generated(), staged, config, max_shards=1)
  selection.run_selection(_generated(), staged, config)
  _same_output(reference, staged)


def test_resume_refuses_other_settings(tmp_path):
  out = str(tmp_path / "out")
  selection.run_selection(
    _generated(), out, selection.SelectionConfig(docs_per_shard=10, num_workers=1), max_shards=1
  )
  with pytest.raises(ValueError, match="same arguments"):
    selection.run_selection(
      _generated(), out, selection.SelectionConfig(docs_per_shard=20, num_workers=1)
    )


def test_worker_pool_and_hosts_give_the_same_sentences(tmp_path):
  single = str(tmp_path / "single")
  selection.run_selection(
    _generated(40),
    single,
    selection.SelectionConfig(docs_per_shard=20, docs_per_task=3, num_workers=1),
  )
  pooled = str(tmp_path / "pooled")
  selection.run_selection(
    _generated(40),
    pooled,
    selection.SelectionConfig(docs_per_shard=20, docs_per_task=3, num_workers=2),
  )
  _same_output(single, pooled)

  hosts = str(tmp_path / "hosts")
  for host in range(2):
    selection.run_selection(
      _generated(40),
      hosts,
      selection.SelectionConfig(docs_per_shard=20, num_workers=1, host_index=host, host_count=2),
    )
  ids = lambda d: sorted(r["sentence_id"] for r in selection.iter_records(d))
  assert ids(hosts) == ids(single)
  assert selection.merge_counts(hosts).to_json() == selection.merge_counts(single).to_json()


def test_empty_and_logic_free_sources_are_errors(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(selection.EmptySourceError, match="empty.txt"):
    selection.run_selection(
      text_sources.TextFileSource([str(empty)]),
      str(tmp_path / "o1"),
      selection.SelectionConfig(num_workers=1),
    )
  plain = tmp_path / "plain.txt"
  plain.write_text("The stadium holds ten thousand people. Tickets cost twelve euros.")
  with pytest.raises(selection.NoLogicSentencesError, match="plain.txt"):
    selection.run_selection(
      text_sources.TextFileSource([str(plain)]),
      str(tmp_path / "o2"),
      selection.SelectionConfig(num_workers=1),
    )


def test_tfds_source_needs_a_prepared_local_dir(tmp_path):
  missing = str(tmp_path / "no_tfds_here")
  source = text_sources.TfdsSource("wikipedia/20230601.en", missing)
  with pytest.raises(FileNotFoundError, match="no_tfds_here"):
    next(source.iter_documents())
  empty_dir = tmp_path / "tfds"
  empty_dir.mkdir()
  source = text_sources.TfdsSource("wikipedia/20230601.en", str(empty_dir))
  with pytest.raises(FileNotFoundError, match=str(empty_dir)):
    next(source.iter_documents())


def test_tfds_source_reads_a_prepared_array_record_dataset(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyWiki(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Two Wikipedia-shaped articles, prepared locally (no download).

    Not registered: TfdsSource must find it from the prepared files alone,
    as it finds a Wikipedia prepared elsewhere.
    """

    # A one-part module name stops tfds from looking for the builder's package
    # resources (that path needs importlib_resources, which is not installed).
    __module__ = "tiny_wiki_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {"title": tfds.features.Text(), "text": tfds.features.Text()}
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"title": "Rain", "text": "It rained. Therefore the match was off."}
      yield 1, {"title": "Sun", "text": "The sun shone all day long today."}

  TinyWiki(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = text_sources.TfdsSource("tiny_wiki", str(tmp_path))
  docs = list(source.iter_documents())
  assert [(d.index, d.text) for d in docs] == [
    (0, "It rained. Therefore the match was off."),
    (1, "The sun shone all day long today."),
  ]
  assert docs[0].doc_id == "tiny_wiki:0:Rain"
  assert [d.index for d in source.iter_documents(start=1)] == [1]
  counts = selection.run_selection(
    source, str(tmp_path / "out"), selection.SelectionConfig(num_workers=1)
  )
  assert counts.sentences_kept == 1 and counts.kept_per_group == {"conclusion": 1}


# --- Undecodable input ------------------------------------------------------

_GOOD_TEXT = "It rained, so the match was off.\n\nIf it dries, the match is replayed on Sunday.\n"


def _bad_corpus(tmp_path):
  """a.txt (good), b.txt (Latin-1 in its second paragraph), c.txt (good)."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text(_GOOD_TEXT, encoding="utf-8")
  latin1 = "Caf\u00e9s close early, so nobody came.\n\nBecause of it, the owners are not happy.\n"
  (corpus / "b.txt").write_bytes(("Fine first line.\n" + latin1).encode("latin-1"))
  (corpus / "c.txt").write_text("Although it was late, the owners did not close.\n")
  return corpus


def test_text_source_names_the_file_line_and_byte_of_undecodable_input(tmp_path):
  corpus = _bad_corpus(tmp_path)
  bad = str(corpus / "b.txt")
  with pytest.raises(text_sources.UnreadableFileError, match=r"b\.txt: line 2, byte 20: .*UTF-8"):
    list(text_sources.TextFileSource([str(corpus)]).iter_documents())
  with pytest.raises(text_sources.UnreadableFileError) as error:
    selection.run_selection(
      text_sources.TextFileSource([str(corpus)]),
      str(tmp_path / "out"),
      selection.SelectionConfig(num_workers=1),
    )
  assert (error.value.path, error.value.line, error.value.offset) == (bad, 2, 20)
  assert "skip_bad_files" in "".join(getattr(error.value, "__notes__", []))


@pytest.mark.parametrize("unit", ["paragraph", "file"])
def test_text_source_rejects_binary_files(tmp_path, unit):
  path = tmp_path / "weights.txt"
  path.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00")
  with pytest.raises(text_sources.UnreadableFileError, match=r"weights\.txt.*zip"):
    list(text_sources.TextFileSource([str(path)], unit=unit).iter_documents())
  path.write_bytes(b"abc\n\x00\x00\x00\x01")
  with pytest.raises(text_sources.UnreadableFileError, match=r"line 2, byte 4: .*binary"):
    list(text_sources.TextFileSource([str(path)], unit=unit).iter_documents())


def test_jsonl_source_names_the_file_and_line_of_bad_input(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_bytes(b'{"text": "A."}\n{"text": "Caf\xe9."}\n')
  with pytest.raises(text_sources.UnreadableFileError, match=r"docs\.jsonl: line 2, byte 28: "):
    list(text_sources.JsonlSource([str(path)]).iter_documents())
  path.write_bytes(b'{"text": "A."}\n\n{"text": oops}\n')
  with pytest.raises(text_sources.UnreadableFileError, match=r"docs\.jsonl: line 3, .*JSON"):
    list(text_sources.JsonlSource([str(path)]).iter_documents())
  path.write_bytes(b'{"text": "A."}\n["a list"]\n')
  with pytest.raises(text_sources.UnreadableFileError, match=r"line 2.*object"):
    list(text_sources.JsonlSource([str(path)]).iter_documents())


def test_byte_order_marks_are_not_text(tmp_path):
  path = tmp_path / "bom.txt"
  path.write_bytes(b"\xef\xbb\xbfIt rained, so the match was off.\n")
  docs = list(text_sources.TextFileSource([str(path)]).iter_documents())
  assert docs[0].text == "It rained, so the match was off."
  jsonl = tmp_path / "bom.jsonl"
  jsonl.write_bytes(b'\xef\xbb\xbf{"text": "A."}\r\n')
  assert [d.text for d in text_sources.JsonlSource([str(jsonl)]).iter_documents()] == ["A."]


def test_skip_bad_files_skips_whole_files_and_counts_them(tmp_path):
  corpus = _bad_corpus(tmp_path)
  out = str(tmp_path / "out")
  config = selection.SelectionConfig(num_workers=1, docs_per_shard=1)
  counts = selection.run_selection(
    text_sources.TextFileSource([str(corpus)]), out, config, skip_bad_files=True
  )
  # b.txt is skipped whole (its first, readable paragraph too): 2 + 1 documents.
  assert counts.documents_read == 3
  assert [r["doc_id"].split("#")[0] for r in selection.iter_records(out)] == [
    str(corpus / "a.txt"),
    str(corpus / "a.txt"),
    str(corpus / "c.txt"),
  ]
  with open(os.path.join(out, "counts.json")) as f:
    bad_files = json.load(f)["bad_files"]
  assert [b["path"] for b in bad_files] == [str(corpus / "b.txt")]
  assert "line 2, byte 20" in bad_files[0]["error"]
  assert selection.merge_counts(out).bad_files == bad_files


def test_stopped_on_a_bad_file_then_resumed_with_skip(tmp_path):
  """The default stops at the bad file; rerunning with the flag resumes, same output."""
  corpus = _bad_corpus(tmp_path)
  config = selection.SelectionConfig(num_workers=1, docs_per_shard=1)
  reference = str(tmp_path / "reference")
  selection.run_selection(
    text_sources.TextFileSource([str(corpus)]), reference, config, skip_bad_files=True
  )
  staged = str(tmp_path / "staged")
  with pytest.raises(text_sources.UnreadableFileError):
    selection.run_selection(text_sources.TextFileSource([str(corpus)]), staged, config)
  assert len(selection.list_shards(staged)) == 2  # a.txt's two documents were committed.
  selection.run_selection(
    text_sources.TextFileSource([str(corpus)]), staged, config, skip_bad_files=True
  )
  _same_output(reference, staged)


def test_only_bad_files_is_an_empty_source_that_says_why(tmp_path):
  path = tmp_path / "only.txt"
  path.write_bytes(b"caf\xe9\n")
  with pytest.raises(selection.EmptySourceError, match=r"1 unreadable file.*only\.txt"):
    selection.run_selection(
      text_sources.TextFileSource([str(path)]),
      str(tmp_path / "out"),
      selection.SelectionConfig(num_workers=1),
      skip_bad_files=True,
    )


def test_select_sentences_cli_skip_bad_files(tmp_path):
  corpus = _bad_corpus(tmp_path)
  command = [
    sys.executable,
    "-m",
    "experiments.select_sentences",
    "--source=text",
    f"--inputs={corpus}",
    "--num_workers=1",
  ]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  failed = subprocess.run(
    command + [f"--out_dir={tmp_path / 'a'}"], cwd=root, capture_output=True, text=True
  )
  assert failed.returncode != 0
  assert "b.txt: line 2, byte 20" in failed.stderr and "--skip_bad_files" in failed.stderr
  done = subprocess.run(
    command + [f"--out_dir={tmp_path / 'b'}", "--skip_bad_files"],
    cwd=root,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  with open(tmp_path / "b" / "counts.json") as f:
    assert [b["path"] for b in json.load(f)["bad_files"]] == [str(corpus / "b.txt")]
