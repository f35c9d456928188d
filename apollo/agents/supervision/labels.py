"""Per-step judge labels: the `Label` record and a sidecar table in the trajectory DB.

The trajectory store (`apollo.agents.storage`) has one judge field per step, `quality`
(good / bad / unknown) with `quality_reason`: room for the *combined* verdict
only. Supervision control runs several judges per step (rules, the human's
flags, an LLM) and the training-data stage wants to know which judge said what,
so every judge's label is kept here, in a table of its own inside the same
SQLite file (the store's own schema is untouched):

    step_labels(session_id, step_index, judge, verdict, reason, detail, labelled_at,
                PRIMARY KEY(session_id, step_index, judge))
        verdict: keep | mask
        reason: a short code ('invalid_call', 'repeated_noop+ignores_advice',
          'human_flag', 'judge_error', ...; several rule codes are joined by '+')
        detail: free text (the rule's evidence, the human's own words, the LLM's
          explanation)

Re-judging a session replaces the labels of the judges that ran again
(`replace_session_labels`), so the table never holds two labels of one judge
for one step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence

from apollo.agents import storage as storage_lib

KEEP = "keep"
MASK = "mask"
VERDICTS = (KEEP, MASK)

_SCHEMA = """CREATE TABLE IF NOT EXISTS step_labels(
  session_id TEXT NOT NULL,
  step_index INTEGER NOT NULL,
  judge TEXT NOT NULL,
  verdict TEXT NOT NULL,
  reason TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '',
  labelled_at REAL NOT NULL,
  PRIMARY KEY(session_id, step_index, judge)
)"""


@dataclasses.dataclass(frozen=True)
class Label:
  """One judge's verdict on one action.

  Attributes:
    verdict: 'keep' (may be imitated) or 'mask' (stays in the context, not trained).
    reason: short code; '+'-joined when several criteria fired.
    judge: name of the judge that produced it ('rules', 'human', 'llm', 'combined').
    detail: free-text evidence.
  """

  verdict: str
  reason: str
  judge: str
  detail: str = ""

  def __post_init__(self):
    if self.verdict not in VERDICTS:
      raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

  @property
  def masked(self) -> bool:
    return self.verdict == MASK

  @property
  def reason_codes(self) -> list[str]:
    return [r for r in self.reason.split("+") if r]

  def to_json(self) -> dict[str, str]:
    return dataclasses.asdict(self)


class LabelStore:
  """The `step_labels` table in the trajectory store's SQLite file (WAL).

  Opens one short-lived connection per call, so it is safe to use next to a
  running `SQLiteStore` on the same file and from several threads.
  """

  def __init__(self, path: str):
    self.path = path
    conn = self._connect()
    try:
      conn.execute(_SCHEMA)
    finally:
      conn.close()

  def _connect(self) -> sqlite3.Connection:
    conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=60000")
    return conn

  @contextlib.contextmanager
  def _write(self) -> Iterator[sqlite3.Connection]:
    conn = self._connect()
    try:
      with storage_lib.write_transaction(conn):
        yield conn
    finally:
      conn.close()

  def replace_session_labels(
    self, session_id: str, judges: Sequence[str], labels: Mapping[int, Sequence[Label]]
  ) -> int:
    """Atomically drops the labels of `judges` for the session and stores `labels`.

    Returns the number of rows written. A label whose judge is not in `judges`
    is stored too (and replaces an older one of the same judge and step).
    """
    now = time.time()
    rows = [
      (session_id, step, l.judge, l.verdict, l.reason, l.detail, now)
      for step, step_labels in labels.items()
      for l in step_labels
    ]
    with self._write() as conn:
      for judge in judges:
        conn.execute(
          "DELETE FROM step_labels WHERE session_id = ? AND judge = ?", (session_id, judge)
        )
      conn.executemany("INSERT OR REPLACE INTO step_labels VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)

  def get(self, session_id: str) -> dict[int, list[Label]]:
    """step_index -> that step's labels (ordered by judge name)."""
    conn = self._connect()
    try:
      rows = conn.execute(
        "SELECT step_index, judge, verdict, reason, detail FROM "
        "step_labels WHERE session_id = ? ORDER BY step_index, judge",
        (session_id,),
      ).fetchall()
    finally:
      conn.close()
    out: dict[int, list[Label]] = {}
    for step, judge, verdict, reason, detail in rows:
      out.setdefault(step, []).append(Label(verdict, reason, judge, detail))
    return out

  def delete(self, session_id: str, judge: str | None = None) -> None:
    with self._write() as conn:
      if judge is None:
        conn.execute("DELETE FROM step_labels WHERE session_id = ?", (session_id,))
      else:
        conn.execute(
          "DELETE FROM step_labels WHERE session_id = ? AND judge = ?", (session_id, judge)
        )
