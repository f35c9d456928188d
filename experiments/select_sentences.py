r"""Selects logic sentences from a corpus into ArrayRecord shards (APOLLO data).

Examples::

  # The project's own generated corpus (default), plus a BPE tokenizer:
  python -m experiments.select_sentences --source=generated \
      --generated_documents=20000 --out_dir=/tmp/apollo_sentences \
      --tokenizer_vocab_size=8192

  # Local text (one document per blank-line-separated paragraph):
  python -m experiments.select_sentences --source=text \
      --inputs=/data/wiki_txt --out_dir=/tmp/wiki_sentences

  # JSON lines with the text in field "body":
  python -m experiments.select_sentences --source=jsonl \
      --inputs='/data/dump/*.jsonl' --jsonl_text_field=body --out_dir=...

  # A TFDS Wikipedia already prepared (file_format=array_record) locally:
  python -m experiments.select_sentences --source=tfds \
      --tfds_name=wikipedia/20230601.en --tfds_data_dir=/data/tfds --out_dir=...

Re-running the same command after an interruption resumes (see
`apollo/lm/data/selection.py`); on several machines pass --host_index/--host_count.
A file that is not UTF-8 text stops the job with an error naming the file, line and
byte offset; re-run with --skip_bad_files to skip such files (listed in counts.json
under `bad_files`) and continue where it stopped.
"""

from absl import app, flags, logging

from apollo.lm.data import generated_corpus, keywords, selection, text_sources
from apollo.models import tokenizer as tokenizer_lib

_SOURCE = flags.DEFINE_enum(
  "source", "generated", ["generated", "text", "jsonl", "tfds"], "Where the documents come from."
)
_OUT_DIR = flags.DEFINE_string(
  "out_dir", None, "Output directory (shards, counts.json, state.json).", required=True
)
_INPUTS = flags.DEFINE_list("inputs", [], "Files, globs or directories (--source=text or jsonl).")
_TEXT_UNIT = flags.DEFINE_enum(
  "text_unit", "paragraph", ["paragraph", "file"], "One document per paragraph or per file (text)."
)
_JSONL_TEXT_FIELD = flags.DEFINE_string("jsonl_text_field", "text", "JSONL field holding the text.")
_TFDS_NAME = flags.DEFINE_string(
  "tfds_name", "wikipedia/20230601.en", "TFDS dataset name/config (--source=tfds)."
)
_TFDS_DATA_DIR = flags.DEFINE_string(
  "tfds_data_dir", None, "Local TFDS data dir holding the prepared dataset."
)
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "TFDS split.")
_GENERATED_DOCUMENTS = flags.DEFINE_integer(
  "generated_documents", 2000, "Documents of the generated corpus."
)
_GENERATED_SEED = flags.DEFINE_integer("generated_seed", 0, "Generated corpus seed.")
_KEYWORD_GROUPS = flags.DEFINE_string(
  "keyword_groups",
  None,
  "Replace the default keyword list: 'group=kw1,kw2;group2=kw3' (multi-word keywords allowed).",
)
_DOCS_PER_SHARD = flags.DEFINE_integer(
  "docs_per_shard", 5000, "Documents per output shard / commit."
)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Worker processes; 0: one per core.")
_MIN_WORDS = flags.DEFINE_integer("min_words", 4, "Drop shorter sentences.")
_HOST_INDEX = flags.DEFINE_integer("host_index", 0, "This machine's index.")
_HOST_COUNT = flags.DEFINE_integer("host_count", 1, "Machines sharing the job.")
_MAX_SHARDS = flags.DEFINE_integer(
  "max_shards", None, "Stop after this many shards (resume later)."
)
_SKIP_BAD_FILES = flags.DEFINE_bool(
  "skip_bad_files",
  False,
  "Skip input files that are not UTF-8 text (or not JSON lines) and list them in "
  "counts.json (bad_files); by default such a file stops the job with an error.",
)
_TOKENIZER_VOCAB_SIZE = flags.DEFINE_integer(
  "tokenizer_vocab_size",
  0,
  "If > 0, train a byte-level BPE of this size on "
  "the selected sentences into OUT_DIR/tokenizer/ when selection is done.",
)


def _make_source() -> text_sources.DocumentSource:
  if _SOURCE.value == "generated":
    return text_sources.GeneratedSource(
      generated_corpus.GeneratedCorpusConfig(
        num_documents=_GENERATED_DOCUMENTS.value, seed=_GENERATED_SEED.value
      )
    )
  if _SOURCE.value in ("text", "jsonl") and not _INPUTS.value:
    raise app.UsageError(f"--source={_SOURCE.value} needs --inputs.")
  if _SOURCE.value == "text":
    return text_sources.TextFileSource(_INPUTS.value, unit=_TEXT_UNIT.value)
  if _SOURCE.value == "jsonl":
    return text_sources.JsonlSource(_INPUTS.value, text_field=_JSONL_TEXT_FIELD.value)
  if not _TFDS_DATA_DIR.value:
    raise app.UsageError("--source=tfds needs --tfds_data_dir.")
  return text_sources.TfdsSource(_TFDS_NAME.value, _TFDS_DATA_DIR.value, split=_TFDS_SPLIT.value)


def main(argv):
  del argv
  config = selection.SelectionConfig(
    keyword_groups=(
      keywords.parse_keyword_groups(_KEYWORD_GROUPS.value) if _KEYWORD_GROUPS.value else None
    ),
    docs_per_shard=_DOCS_PER_SHARD.value,
    num_workers=_NUM_WORKERS.value,
    min_words=_MIN_WORDS.value,
    host_index=_HOST_INDEX.value,
    host_count=_HOST_COUNT.value,
  )
  counts = selection.run_selection(
    _make_source(),
    _OUT_DIR.value,
    config,
    max_shards=_MAX_SHARDS.value,
    skip_bad_files=_SKIP_BAD_FILES.value,
  )
  logging.info("Counts: %s", counts.to_json())
  if _TOKENIZER_VOCAB_SIZE.value > 0 and _MAX_SHARDS.value is None:
    tokenizer_dir = f"{_OUT_DIR.value}/tokenizer"
    tokenizer_lib.train_bpe_tokenizer(
      (r["text"] for r in selection.iter_records(_OUT_DIR.value)),
      tokenizer_dir,
      vocab_size=_TOKENIZER_VOCAB_SIZE.value,
    )
    logging.info("Tokenizer written to %s/tokenizer.json", tokenizer_dir)


if __name__ == "__main__":
  app.run(main)
