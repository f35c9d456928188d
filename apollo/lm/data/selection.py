"""Logic-sentence selection: a streaming, resumable, multi-core job.

APOLLO pretrains on the sentences of a corpus that contain a logical-inference
keyword (`keywords.py`). This module turns a `DocumentSource` into sentence
shards that the pretraining input pipeline (`pipeline.py`) reads:

  source -> documents -> pysbd sentence splitting -> keyword matching
         -> ArrayRecord shards + counts.json

Output directory layout (single host)::

  sentences-00000.array_record   one JSON record per kept sentence (below)
  sentences-00001.array_record   ...
  counts.json                    documents read, sentences seen / kept, kept per
                                 keyword group and per keyword, files skipped
  state.json                     the resume marker (see "Resuming")

A record is the UTF-8 JSON of::

  {"text": "If it rains, the match is not played.",
   "doc_id": "generated:17:...", "sentence_id": "17:3",
   "groups": ["conditional", "negation"],
   "keywords": [["if", "conditional", 0, 2], ["not", "negation", 26, 29]]}

where each keyword entry is `[keyword, group, start, end]`, a character span of
`text`.

Sharding and resuming. Shard `k` holds the sentences of documents
`[k * docs_per_shard, (k + 1) * docs_per_shard)` (positions in the source's order,
counted on this host's documents), so shard contents do not depend on when the
job was stopped. A shard is written under a temporary name and renamed when
complete; then `state.json` (itself written to a temporary file and renamed)
records the next document position, the next shard number and the running
counts. That rename is the commit. A job restarted with the same arguments reads
`state.json`, deletes temporary files and any shard written after the last
commit, and continues at the recorded document: no shard is duplicated or lost,
and the output is byte-identical to an uninterrupted run. A shard with no kept
sentence writes no file (ArrayRecord readers reject empty files).

Cores. The main process streams documents and cuts them into tasks of
`docs_per_task` documents; a `multiprocessing` pool (spawned processes, so a
parent that already runs JAX threads is safe) splits and matches them; results
come back in order. One shard's documents are in flight at a time, which bounds
memory by the shard size, never by the corpus.

More than one machine. The document positions are the unit of work: run the
same command on `host_count` machines with `host_index = 0 .. host_count - 1`;
host `h` keeps the documents whose position `i` has `i % host_count == h` (a
source with random access, such as TFDS or the generated corpus, could instead
hand each host a contiguous range). Every host writes into the same (shared)
output directory with its own names, `sentences-h003of008-00000.array_record`,
`counts-h003of008.json`, `state-h003of008.json`, so hosts never race on a file
and each resumes independently. The pipeline reads every `sentences-*` file in
the directory; `merge_counts` sums the per-host counts.

Unreadable input. A file that is not UTF-8 text (or, for JSON lines, holds a
line that is not a JSON object) stops the job with `text_sources.UnreadableFileError`
naming the file, line and byte offset; the shards committed before it stay. With
`skip_bad_files=True` such files are skipped whole and listed in the counts
(`bad_files: [{path, error}]`). Because a bad file yields no document in either
mode, a job that stopped on one resumes with `skip_bad_files=True` into the same
output as a run that skipped from the start.

OUR choices (documented defaults): sentences shorter than `min_words` words or
longer than `max_chars` characters are dropped before matching (fragments and
splitter failures); a sentence counts once for each group it matches.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
  N. Sadvilkar and M. Neumann, "PySBD: Pragmatic Sentence Boundary Disambiguation",
  NLP-OSS 2020 (github.com/nipunsadvilkar/pySBD).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from apollo.lm.data import keywords as keywords_lib
from apollo.lm.data import text_sources

STATE_VERSION = 1


class EmptySourceError(ValueError):
  """The source produced no documents."""


class NoLogicSentencesError(ValueError):
  """The source produced documents but no sentence with a logical keyword."""


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  keyword_groups: Mapping[str, Sequence[str]] | None = None  # None: the default list.
  docs_per_shard: int = 5000  # Documents per output shard (and per commit).
  docs_per_task: int = 32  # Documents per multiprocessing task.
  num_workers: int = 0  # Worker processes; 0: one per core; 1: no pool.
  min_words: int = 4  # Shorter sentences are dropped (fragments, headings).
  max_chars: int = 1000  # Longer "sentences" are dropped (splitter failures).
  host_index: int = 0  # This machine's index in a multi-host job.
  host_count: int = 1  # Number of machines sharing the source.
  log_every_seconds: float = 10.0  # Progress log period.

  def fingerprint(self) -> dict[str, Any]:
    """The settings that decide the output; a resume must not change them."""
    groups = keywords_lib.KeywordMatcher(self.keyword_groups).groups
    return dict(
      keyword_groups={k: list(v) for k, v in groups.items()},
      docs_per_shard=self.docs_per_shard,
      min_words=self.min_words,
      max_chars=self.max_chars,
      host_index=self.host_index,
      host_count=self.host_count,
    )


@dataclasses.dataclass
class SelectionCounts:
  documents_read: int = 0
  sentences_seen: int = 0
  sentences_kept: int = 0
  kept_per_group: dict[str, int] = dataclasses.field(default_factory=dict)
  kept_per_keyword: dict[str, int] = dataclasses.field(default_factory=dict)
  # Files skipped as unreadable (`skip_bad_files`): [{"path", "error"}], one per path.
  bad_files: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def add_bad_files(self, bad_files: Sequence[Mapping[str, str]]) -> None:
    """Adds skipped files not yet listed (a resumed job, or another host, sees them again)."""
    known = {b["path"] for b in self.bad_files}
    for bad in bad_files:
      if bad["path"] not in known:
        known.add(bad["path"])
        self.bad_files.append(dict(path=bad["path"], error=bad["error"]))
    self.bad_files.sort(key=lambda b: b["path"])

  def add(self, other: SelectionCounts) -> None:
    self.documents_read += other.documents_read
    self.sentences_seen += other.sentences_seen
    self.sentences_kept += other.sentences_kept
    for mine, theirs in (
      (self.kept_per_group, other.kept_per_group),
      (self.kept_per_keyword, other.kept_per_keyword),
    ):
      for key, value in theirs.items():
        mine[key] = mine.get(key, 0) + value
    self.add_bad_files(other.bad_files)

  def to_json(self) -> dict[str, Any]:
    return dict(
      documents_read=self.documents_read,
      sentences_seen=self.sentences_seen,
      sentences_kept=self.sentences_kept,
      kept_per_group=dict(sorted(self.kept_per_group.items())),
      kept_per_keyword=dict(sorted(self.kept_per_keyword.items())),
      bad_files=[dict(b) for b in self.bad_files],
    )

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> SelectionCounts:
    return cls(
      d["documents_read"],
      d["sentences_seen"],
      d["sentences_kept"],
      dict(d["kept_per_group"]),
      dict(d["kept_per_keyword"]),
      [dict(b) for b in d.get("bad_files", [])],  # Absent in counts written before.
    )


# ---------------------------------------------------------------------------
# Per-document work (runs in the worker processes).

_WORKER_CACHE: dict[str, Any] = {}


def _worker_tools(keyword_groups) -> tuple[Any, keywords_lib.KeywordMatcher]:
  """The splitter and matcher, built once per process."""
  key = json.dumps(keyword_groups, sort_keys=True)
  if _WORKER_CACHE.get("key") != key:
    import pysbd  # pylint: disable=g-import-not-at-top

    _WORKER_CACHE.update(
      key=key,
      segmenter=pysbd.Segmenter(language="en", clean=False),
      matcher=keywords_lib.KeywordMatcher(keyword_groups),
    )
  return _WORKER_CACHE["segmenter"], _WORKER_CACHE["matcher"]


def select_from_documents(
  documents: Sequence[tuple[int, str, str]],
  keyword_groups: Mapping[str, Sequence[str]] | None,
  min_words: int,
  max_chars: int,
) -> tuple[list[bytes], SelectionCounts]:
  """Splits `(index, doc_id, text)` documents and keeps the logic sentences.

  Returns:
    The kept sentences as serialised records (see the module docstring), in
    document and sentence order, and the counts for these documents.
  """
  segmenter, matcher = _worker_tools(None if keyword_groups is None else dict(keyword_groups))
  counts = SelectionCounts(documents_read=len(documents))
  group_counts, keyword_counts = collections.Counter(), collections.Counter()
  records = []
  for index, doc_id, text in documents:
    for number, sentence in enumerate(
      s.strip() for s in segmenter.segment(" ".join(text.split())) if s.strip()
    ):
      counts.sentences_seen += 1
      if len(sentence.split()) < min_words or len(sentence) > max_chars:
        continue
      matches = matcher.find(sentence)
      if not matches:
        continue
      groups = sorted({m.group for m in matches})
      group_counts.update(groups)
      keyword_counts.update({m.keyword for m in matches})
      records.append(
        json.dumps(
          dict(
            text=sentence,
            doc_id=doc_id,
            sentence_id=f"{index}:{number}",
            groups=groups,
            keywords=[[m.keyword, m.group, m.start, m.end] for m in matches],
          ),
          ensure_ascii=False,
        ).encode("utf-8")
      )
  counts.sentences_kept = len(records)
  counts.kept_per_group = dict(group_counts)
  counts.kept_per_keyword = dict(keyword_counts)
  return records, counts


def _select_task(args):
  return select_from_documents(*args)


# ---------------------------------------------------------------------------
# Files: shard names, atomic writes, state.


def _host_tag(config: SelectionConfig) -> str:
  if config.host_count == 1:
    return ""
  return f"-h{config.host_index:03d}of{config.host_count:03d}"


def shard_path(out_dir: str, config: SelectionConfig, shard: int) -> str:
  return os.path.join(out_dir, f"sentences{_host_tag(config)}-{shard:05d}.array_record")


def state_path(out_dir: str, config: SelectionConfig) -> str:
  return os.path.join(out_dir, f"state{_host_tag(config)}.json")


def counts_path(out_dir: str, config: SelectionConfig) -> str:
  return os.path.join(out_dir, f"counts{_host_tag(config)}.json")


def _write_json_atomically(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)  # Atomic on POSIX: readers see the old or the new file.


def write_shard(path: str, records: Sequence[bytes]) -> None:
  """Writes an ArrayRecord file under a temporary name, then renames it."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  tmp = path + ".tmp"
  # group_size:1 gives the cheapest random access, which the grain pipeline uses.
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(tmp, path)


def commit_state(path: str, state: Mapping[str, Any]) -> None:
  _write_json_atomically(path, state)


def list_shards(out_dir: str) -> list[str]:
  """All sentence shards in `out_dir` (every host's), in a fixed order."""
  return sorted(glob.glob(os.path.join(out_dir, "sentences*.array_record")))


def iter_records(out_dir: str) -> Iterator[dict[str, Any]]:
  """Yields the decoded sentence records of every shard in `out_dir`, streaming."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  for path in list_shards(out_dir):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        yield json.loads(reader.read([i])[0])
    finally:
      reader.close()


def merge_counts(out_dir: str) -> SelectionCounts:
  """Sums `counts*.json` of every host in `out_dir`."""
  total = SelectionCounts()
  paths = sorted(glob.glob(os.path.join(out_dir, "counts*.json")))
  if not paths:
    raise FileNotFoundError(f"No counts*.json in {out_dir}; run the selection job.")
  for path in paths:
    with open(path, encoding="utf-8") as f:
      total.add(SelectionCounts.from_json(json.load(f)))
  return total


def _clean_uncommitted(out_dir: str, config: SelectionConfig, next_shard: int) -> None:
  """Removes temp files and shards written after the last commit (a crash)."""
  tag = _host_tag(config)
  for path in glob.glob(os.path.join(out_dir, f"sentences{tag}-*.array_record*")):
    name = os.path.basename(path)
    number = name[len(f"sentences{tag}-") :].split(".", 1)[0]
    if not number.isdigit():
      continue  # Another host's file (its name has an -hNNNofNNN tag).
    if path.endswith(".tmp") or int(number) >= next_shard:
      logging.info("Removing uncommitted %s", path)
      os.remove(path)


# ---------------------------------------------------------------------------
# The job.


def _host_documents(
  source: text_sources.DocumentSource,
  start: int,
  config: SelectionConfig,
  bad_files: list[dict[str, Any]] | None,
) -> Iterator[text_sources.Document]:
  # Only a skipping job passes `bad_files`, so sources written before it still work.
  documents = (
    source.iter_documents(start)
    if bad_files is None
    else source.iter_documents(start, bad_files=bad_files)
  )
  for doc in documents:
    if doc.index % config.host_count == config.host_index:
      yield doc


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
  return [items[i : i + size] for i in range(0, len(items), size)]


def run_selection(
  source: text_sources.DocumentSource,
  out_dir: str,
  config: SelectionConfig = SelectionConfig(),
  max_shards: int | None = None,
  skip_bad_files: bool = False,
) -> SelectionCounts:
  """Selects the logic sentences of `source` into shards under `out_dir`.

  Resumes from `out_dir`'s state file when one exists (see the module
  docstring). Calling it again after it finished returns the final counts.

  Args:
    source: where the documents come from.
    out_dir: output directory (created if needed).
    config: selection settings; must equal those of the run being resumed.
    max_shards: stop after committing this many shards in this call (for
      time-limited or preemptible jobs; the next call continues).
    skip_bad_files: skip files that are not UTF-8 text (or not JSON lines) and
      list them in the counts' `bad_files`, instead of stopping. It may differ
      from the run being resumed.

  Returns:
    The counts over all documents processed so far (all calls).

  Raises:
    text_sources.UnreadableFileError: a file cannot be read and
      `skip_bad_files` is False (naming the file, line and byte offset).
    EmptySourceError: the source produced no document.
    NoLogicSentencesError: no sentence of the source holds a keyword.
    ValueError: `out_dir` holds a run with another source or other settings.
  """
  if not 0 <= config.host_index < config.host_count:
    raise ValueError(
      f"host_index={config.host_index} is not in [0, host_count={config.host_count})."
    )
  os.makedirs(out_dir, exist_ok=True)
  fingerprint = config.fingerprint()
  state_file = state_path(out_dir, config)
  if os.path.exists(state_file):
    with open(state_file, encoding="utf-8") as f:
      state = json.load(f)
    if state["source"] != source.name or state["config"] != fingerprint:
      raise ValueError(
        f"{out_dir} holds a selection run of {state['source']} with settings "
        f"{state['config']}; this run is {source.name} with {fingerprint}. "
        f"Use another --out_dir or the same arguments."
      )
    logging.info(
      "Resuming %s at document %d, shard %d.",
      source.name,
      state["next_document"],
      state["next_shard"],
    )
  else:
    state = dict(
      version=STATE_VERSION,
      source=source.name,
      config=fingerprint,
      next_document=0,
      next_shard=0,
      shards=[],
      done=False,
      counts=SelectionCounts().to_json(),
    )
  counts = SelectionCounts.from_json(state["counts"])
  if state["done"]:
    return counts
  _clean_uncommitted(out_dir, config, state["next_shard"])

  num_workers = config.num_workers or os.cpu_count() or 1
  pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 1 else None
  bad_files = [] if skip_bad_files else None
  documents = _host_documents(source, state["next_document"], config, bad_files)
  start_time, last_log, docs_this_run, shards_this_run = time.time(), 0.0, 0, 0
  try:
    while True:
      if max_shards is not None and shards_this_run >= max_shards:
        logging.info("Stopping after %d shards (max_shards); run again to resume.", shards_this_run)
        return counts
      try:
        batch = [
          (d.index, d.doc_id, d.text) for _, d in zip(range(config.docs_per_shard), documents)
        ]
      except text_sources.UnreadableFileError as error:
        error.add_note(
          "Pass --skip_bad_files (run_selection(skip_bad_files=True)) to skip such files and "
          "list them in counts.json; the shards committed so far are kept."
        )
        raise
      counts.add_bad_files(bad_files or [])
      if not batch:
        break
      tasks = [
        (chunk, config.keyword_groups, config.min_words, config.max_chars)
        for chunk in _chunks(batch, config.docs_per_task)
      ]
      results = pool.map(_select_task, tasks) if pool else map(_select_task, tasks)
      shard_records, shard_counts = [], SelectionCounts()
      for records, task_counts in results:
        shard_records.extend(records)
        shard_counts.add(task_counts)

      shard = state["next_shard"]
      if shard_records:
        path = shard_path(out_dir, config, shard)
        write_shard(path, shard_records)
        state["shards"].append(os.path.basename(path))
      counts.add(shard_counts)
      state.update(next_document=batch[-1][0] + 1, next_shard=shard + 1, counts=counts.to_json())
      commit_state(state_file, state)
      shards_this_run += 1
      docs_this_run += len(batch)

      now = time.time()
      if now - last_log >= config.log_every_seconds:
        last_log = now
        logging.info(
          "shard %d committed: %d docs (%.1f docs/s), %d sentences seen, %d kept, per group %s",
          shard,
          counts.documents_read,
          docs_this_run / max(now - start_time, 1e-9),
          counts.sentences_seen,
          counts.sentences_kept,
          counts.kept_per_group,
        )
  finally:
    if pool:
      pool.close()
      pool.join()

  if counts.documents_read == 0:
    skipped = ""
    if counts.bad_files:
      paths = [b["path"] for b in counts.bad_files]
      skipped = f" ({len(paths)} unreadable file(s) skipped: {paths[:5]})"
    raise EmptySourceError(f"Source {source.name} produced no documents{skipped}.")
  if counts.sentences_kept == 0:
    raise NoLogicSentencesError(
      f"Source {source.name}: none of its {counts.sentences_seen} sentences "
      f"({counts.documents_read} documents) contains a logical keyword."
    )
  state["done"] = True
  state["counts"] = counts.to_json()  # Bad files found after the last shard.
  _write_json_atomically(counts_path(out_dir, config), counts.to_json())
  commit_state(state_file, state)
  if counts.bad_files:
    logging.warning(
      "Skipped %d unreadable file(s), listed in %s.",
      len(counts.bad_files),
      counts_path(out_dir, config),
    )
  logging.info("Selection done: %s", counts.to_json())
  return counts
