"""Trajectory storage: sessions, steps, guidance and control events.

`TrajectoryStore` is the interface the rollout service uses; `SQLiteStore` is the
default implementation (one SQLite file in WAL mode, safe for many rollout threads
and readers at once). Schema (version 2; a version-1 file gains the new columns
when opened, and its steps read as text-mode steps):

    sessions(session_id PK, created_at, updated_at, status, env_name, seed, backend,
             config_json, result_json, error)
        status: created | running | paused | finished | stopped | failed
    steps(session_id, step_index, kind, started_at, model_started_at,
          model_finished_at, finished_at, env_hours_before, env_hours_after,
          messages_json, response, action_json, parse_error, observation, reward, done,
          prompt_tokens, completion_tokens, context_tokens, guidance_ids_json,
          info_json, env_state_json, policy_state_json, human_flag,
          human_flag_reason, quality, quality_reason, assistant_json, call_json,
          PRIMARY KEY(session_id, step_index))
        kind: action (one model turn) | summary (context compression)
        messages_json: the exact messages sent to the model, in the OpenAI chat
          format (for summaries: the context that was compressed), stored as a
          JSON list of message ids into `messages`; response: the exact text the
          model produced (for summaries: the summary)
        assistant_json: the assistant message as it entered the context (OpenAI
          format, with `tool_calls` in native mode); NULL in version-1 steps,
          read as {"role": "assistant", "content": response}
        call_json: how the reply's tool call fared (`agent.CallCheck`: parsed,
          schema_ok, unknown_tool, malformed, no_call, multiple)
        human_flag: NULL | good | bad, set by a human; quality: good | bad | unknown,
          the judge's label (filled by the judging stage)
    guidance(guidance_id PK autoincrement, session_id, source, text, sent_at,
             delivered_at, delivered_step, client_msg_id, meta_json,
             UNIQUE(session_id, client_msg_id))
    messages(message_id PK, role, content, extra_json)
        content-addressed (message_id = sha256 of role, content and the other
        fields): consecutive prompts share almost all their messages, so each is
        stored once and the store grows linearly with the episode, not
        quadratically. extra_json: the fields besides role and content
        (`tool_calls`, `tool_call_id`), NULL when there are none
    events(event_id PK autoincrement, session_id, at, kind, data_json)
        kind: pause | resume | interrupt | stop | flag | resume_after_crash | ...

Export (`export_jsonl`, the HTTP API's `export.jsonl`): one JSON line per episode
whose `messages` are the whole trajectory in the OpenAI chat format (system, task,
assistant turns with their `tool_calls`, tool results, the human's tagged user
messages; context summaries are left out, every turn is there), with `tools`,
the session's fields and one entry per action step (`steps`), so another SFT
stack can read it as is; an assistant message judged bad has `"weight": 0`.

Times are unix seconds (float). Steps are inserted with `INSERT OR IGNORE` on their
primary key, in the same transaction that marks the guidance they delivered, so a
rollout that is killed (even with SIGKILL) and resumed never stores a step or a
delivery twice and never loses a committed one. Durability: WAL with
`synchronous=NORMAL` survives a killed process (committed pages are in the OS
cache); pass `synchronous='FULL'` to also survive power loss.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from apollo.agents import guidance as guidance_lib

SCHEMA_VERSION = 2
SESSION_STATUSES = ("created", "running", "paused", "finished", "stopped", "failed")
ACTIVE_STATUSES = ("created", "running", "paused")
FLAGS = ("good", "bad")
QUALITIES = ("good", "bad", "unknown")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions(
  session_id TEXT PRIMARY KEY,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  status TEXT NOT NULL,
  env_name TEXT NOT NULL,
  seed INTEGER NOT NULL,
  backend TEXT NOT NULL,
  config_json TEXT NOT NULL,
  result_json TEXT,
  error TEXT
);
CREATE TABLE IF NOT EXISTS steps(
  session_id TEXT NOT NULL,
  step_index INTEGER NOT NULL,
  kind TEXT NOT NULL,
  started_at REAL,
  model_started_at REAL,
  model_finished_at REAL,
  finished_at REAL,
  env_hours_before REAL,
  env_hours_after REAL,
  messages_json TEXT NOT NULL,
  response TEXT NOT NULL,
  action_json TEXT,
  parse_error TEXT,
  observation TEXT NOT NULL,
  reward REAL,
  done INTEGER NOT NULL DEFAULT 0,
  prompt_tokens INTEGER,
  completion_tokens INTEGER,
  context_tokens INTEGER,
  guidance_ids_json TEXT NOT NULL DEFAULT '[]',
  info_json TEXT NOT NULL DEFAULT '{}',
  env_state_json TEXT,
  policy_state_json TEXT,
  human_flag TEXT,
  human_flag_reason TEXT,
  quality TEXT NOT NULL DEFAULT 'unknown',
  quality_reason TEXT,
  assistant_json TEXT,
  call_json TEXT,
  PRIMARY KEY(session_id, step_index)
);
CREATE TABLE IF NOT EXISTS guidance(
  guidance_id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL,
  source TEXT NOT NULL,
  text TEXT NOT NULL,
  sent_at REAL NOT NULL,
  delivered_at REAL,
  delivered_step INTEGER,
  client_msg_id TEXT,
  meta_json TEXT NOT NULL DEFAULT '{}',
  UNIQUE(session_id, client_msg_id)
);
CREATE INDEX IF NOT EXISTS guidance_by_session ON guidance(session_id, delivered_step);
CREATE TABLE IF NOT EXISTS messages(
  message_id TEXT PRIMARY KEY,
  role TEXT NOT NULL,
  content TEXT NOT NULL,
  extra_json TEXT
);
CREATE TABLE IF NOT EXISTS events(
  event_id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL,
  at REAL NOT NULL,
  kind TEXT NOT NULL,
  data_json TEXT NOT NULL DEFAULT '{}'
);
"""


# Columns added since version 1: (table, column, declaration).
_ADDED_COLUMNS = (
  ("steps", "assistant_json", "TEXT"),
  ("steps", "call_json", "TEXT"),
  ("messages", "extra_json", "TEXT"),
)


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
  """BEGIN IMMEDIATE ... COMMIT on `conn`, rolled back on any exception.

  IMMEDIATE takes the write lock up front, so concurrent writers wait (busy
  timeout) instead of failing half-way through a transaction.
  """
  conn.execute("BEGIN IMMEDIATE")
  try:
    yield conn
  except BaseException:
    conn.execute("ROLLBACK")
    raise
  conn.execute("COMMIT")


def format_observation(step_index: int, tool: str | None, observation: str, is_error: bool) -> str:
  """The text that carries an observation to the model (tags in `observation`
  neutralised, so a program's output cannot pose as the human)."""
  attrs = f'step="{step_index}" tool="{tool or ""}"' + (' error="true"' if is_error else "")
  return f"<observation {attrs}>\n{guidance_lib.neutralise_tags(observation)}\n</observation>"


@dataclasses.dataclass
class StepRecord:
  """One stored step (see the module docstring for the meaning of each field)."""

  session_id: str
  step_index: int
  kind: str
  messages: list[dict[str, Any]]
  response: str
  observation: str
  action: dict[str, Any] | None = None
  parse_error: str | None = None
  started_at: float | None = None
  model_started_at: float | None = None
  model_finished_at: float | None = None
  finished_at: float | None = None
  env_hours_before: float | None = None
  env_hours_after: float | None = None
  reward: float = 0.0
  done: bool = False
  prompt_tokens: int | None = None
  completion_tokens: int | None = None
  context_tokens: int | None = None
  guidance_ids: list[int] = dataclasses.field(default_factory=list)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  env_state: dict[str, Any] | None = None
  policy_state: dict[str, Any] | None = None
  human_flag: str | None = None
  human_flag_reason: str | None = None
  quality: str = "unknown"
  quality_reason: str | None = None
  assistant: dict[str, Any] | None = None
  call: dict[str, Any] | None = None
  # How many messages the step has when `messages` was not read (light reads).
  num_messages: int | None = dataclasses.field(default=None, repr=False)

  @property
  def assistant_message(self) -> dict[str, Any]:
    """The assistant message of this step as it entered the context (OpenAI format).

    Native mode: `{"role": "assistant", "content": ..., "tool_calls": [...]}`;
    text mode and steps stored before tool calls were native:
    `{"role": "assistant", "content": response}`. With `messages`, this is the
    step's conversation: `messages + [assistant_message]`.
    """
    if self.assistant is not None:
      return self.assistant
    return {"role": "assistant", "content": self.response}

  @property
  def tool_calls(self) -> list[dict[str, Any]]:
    """The OpenAI `tool_calls` of the step's assistant message ([] in text mode)."""
    return list(self.assistant_message.get("tool_calls") or ())

  def observation_messages(self) -> list[dict[str, Any]]:
    """The messages that brought this step's observation to the model: a tool
    message per call of its assistant message (each answers its `tool_call_id`),
    or one user message when the reply made no call (text mode, or no call read).
    The context after an action step is `messages + [assistant_message] + these`."""
    tool = self.action["tool"] if self.action else None
    is_error = bool(
      self.parse_error or self.info.get("invalid_action") or self.info.get("tool_exception")
    )
    content = format_observation(self.step_index, tool, self.observation, is_error)
    calls = self.assistant_message.get("tool_calls") or ()
    if calls:
      return [{"role": "tool", "tool_call_id": c["id"], "content": content} for c in calls]
    return [{"role": "user", "content": content}]

  def reply_text(self) -> str:
    """The reply as one text: its content, then each native call as a JSON object
    `{"tool": ..., "arguments": ...}` (for readers that show a step as text, such
    as the LLM judge). In text mode this is the response."""
    message = self.assistant_message
    calls = [
      json.dumps({"tool": c["function"]["name"], "arguments": _json_or_text(c["function"])})
      for c in message.get("tool_calls") or ()
    ]
    return "\n".join(t for t in [message.get("content") or "", *calls] if t)

  def to_json(self, full: bool = True) -> dict[str, Any]:
    """JSON view; `full=False` drops the bulky messages and state snapshots.
    Both carry `num_messages`, the number of messages the step was given."""
    data = dataclasses.asdict(self)
    if self.num_messages is None:
      data["num_messages"] = len(self.messages)
    if not full:
      for key in ("messages", "env_state", "policy_state"):
        data.pop(key)
    return data


def _json_or_text(function: Mapping[str, Any]) -> Any:
  try:
    return json.loads(function.get("arguments") or "{}")
  except json.JSONDecodeError:
    return function.get("arguments")


@dataclasses.dataclass
class SessionRecord:
  session_id: str
  env_name: str
  seed: int
  backend: str
  config: dict[str, Any]
  status: str = "created"
  created_at: float = 0.0
  updated_at: float = 0.0
  result: dict[str, Any] | None = None
  error: str | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class TrajectoryStore(abc.ABC):
  """Where sessions, steps and guidance live (SQLite by default)."""

  @abc.abstractmethod
  def create_session(self, session: SessionRecord) -> bool:
    """Inserts a session; returns False (and changes nothing) if the id exists."""

  @abc.abstractmethod
  def get_session(self, session_id: str) -> SessionRecord | None: ...

  @abc.abstractmethod
  def list_sessions(self, statuses: Sequence[str] | None = None) -> list[SessionRecord]: ...

  @abc.abstractmethod
  def update_session(
    self,
    session_id: str,
    *,
    status: str | None = None,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
  ) -> None: ...

  @abc.abstractmethod
  def append_step(self, step: StepRecord, delivered: Sequence[tuple[int, float]] = ()) -> bool:
    """Atomically stores `step` and marks `delivered` (guidance id, time) as shown
    in it. Returns False, storing nothing, if the step index already exists."""

  @abc.abstractmethod
  def last_step(self, session_id: str) -> StepRecord | None: ...

  @abc.abstractmethod
  def get_steps(
    self, session_id: str, since: int = -1, limit: int | None = None, full: bool = True
  ) -> list[StepRecord]:
    """Steps with index > `since`, in order."""

  @abc.abstractmethod
  def get_step(self, session_id: str, step_index: int) -> StepRecord | None: ...

  @abc.abstractmethod
  def num_steps(self, session_id: str) -> int: ...

  @abc.abstractmethod
  def set_flag(
    self, session_id: str, step_index: int, flag: str | None, reason: str | None
  ) -> bool:
    """Human flag of one step (None clears it). False if the step does not exist."""

  @abc.abstractmethod
  def set_quality(
    self, session_id: str, step_index: int, quality: str, reason: str | None = None
  ) -> bool:
    """The judge's label of one step."""

  @abc.abstractmethod
  def add_guidance(
    self,
    session_id: str,
    text: str,
    source: str = "human",
    client_msg_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
  ) -> tuple[guidance_lib.Guidance, bool]:
    """Buffers a message; returns (message, created). A repeated `client_msg_id`
    returns the stored message with created=False."""

  @abc.abstractmethod
  def pending_guidance(self, session_id: str) -> list[guidance_lib.Guidance]: ...

  @abc.abstractmethod
  def list_guidance(self, session_id: str) -> list[guidance_lib.Guidance]: ...

  @abc.abstractmethod
  def log_event(
    self, session_id: str, kind: str, data: Mapping[str, Any] | None = None
  ) -> None: ...

  @abc.abstractmethod
  def list_events(self, session_id: str) -> list[dict[str, Any]]: ...

  def export_jsonl(self, path: str, session_ids: Iterable[str] | None = None) -> int:
    """Writes one JSON line per episode (see the module docstring); returns the count."""
    ids = (
      list(session_ids) if session_ids is not None else [s.session_id for s in self.list_sessions()]
    )
    count = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for line in self.iter_export(ids):
        f.write(line + "\n")
        count += 1
    os.replace(tmp, path)  # readers never see a half-written export
    return count

  def iter_export(self, session_ids: Iterable[str]) -> Iterator[str]:
    """One JSON line per session: `episode_record`."""
    for sid in session_ids:
      session = self.get_session(sid)
      if session is None:
        continue
      record = episode_record(session, self.get_steps(sid), self.list_guidance(sid))
      yield json.dumps(record, ensure_ascii=False)


def trajectory_messages(steps: Sequence[StepRecord]) -> tuple[list[dict[str, Any]], list[int]]:
  """The whole trajectory of an episode as one OpenAI chat, and where each action
  step's assistant message sits in it.

  The chat is the first prompt (system prompt, task), then per action step the
  human messages delivered with it, its assistant message and its observation
  messages. Context summaries are left out: they replaced turns the model had
  seen, and every one of those turns is in the chat.
  """
  actions = [s for s in steps if s.kind == "action"]
  if not actions:
    return [], []
  first = actions[0]
  fresh = len(first.guidance_ids)
  chat = [dict(m) for m in first.messages[: len(first.messages) - fresh]]
  positions = []
  for step in actions:
    delivered = len(step.guidance_ids)
    if delivered:
      chat += [dict(m) for m in step.messages[-delivered:]]
    positions.append(len(chat))
    chat.append(dict(step.assistant_message))
    chat += step.observation_messages()
  return chat, positions


def episode_record(
  session: SessionRecord, steps: Sequence[StepRecord], guidance: Sequence[guidance_lib.Guidance]
) -> dict[str, Any]:
  """One episode as an export line: an OpenAI chat-format trajectory plus metadata.

  Keys: `session_id`, `env_name`, `seed`, `backend`, `status`, `result`, `tools`
  (the episode's tools in the OpenAI format), `messages` (`trajectory_messages`;
  an assistant message whose step was judged or flagged bad carries `"weight": 0`,
  the OpenAI fine-tuning convention for a turn not to train on), `steps` (per
  action step: `message_index` into `messages`, the call check, the action, the
  parse error, the judge's quality and the human's flag) and `guidance` (every
  human message with its delivery).
  """
  chat, positions = trajectory_messages(steps)
  actions = [s for s in steps if s.kind == "action"]
  tools = actions[0].info.get("tools") if actions else None
  step_rows = []
  for step, position in zip(actions, positions):
    bad = step.quality == "bad" or step.human_flag == "bad"
    chat[position]["weight"] = 0 if bad else 1
    step_rows.append(
      {
        "step_index": step.step_index,
        "message_index": position,
        "action": step.action,
        "parse_error": step.parse_error,
        "call": step.call,
        "quality": step.quality,
        "human_flag": step.human_flag,
        "reward": step.reward,
        "done": step.done,
      }
    )
  return {
    "session_id": session.session_id,
    "env_name": session.env_name,
    "seed": session.seed,
    "backend": session.backend,
    "status": session.status,
    "result": session.result,
    "tools": tools,
    "messages": chat,
    "steps": step_rows,
    "guidance": [g.to_json() for g in guidance],
  }


class SQLiteStore(TrajectoryStore):
  """`TrajectoryStore` on one SQLite file (WAL), shared by many threads."""

  def __init__(self, path: str, synchronous: str = "NORMAL", pool_size: int = 32):
    self.path = path
    self.synchronous = synchronous
    self._pool: list[sqlite3.Connection] = []
    self._pool_lock = threading.Lock()
    self._pool_size = pool_size
    self._closed = False
    with self._connection() as conn:
      conn.executescript(_SCHEMA)
      with write_transaction(conn):
        for table, column, declaration in _ADDED_COLUMNS:
          present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
          if column not in present:  # a version-1 file: old rows read as NULL
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        conn.execute(
          "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
          ("schema_version", str(SCHEMA_VERSION)),
        )

  # ------------------------------------------------------------------ plumbing
  def _connect(self) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; writes use BEGIN IMMEDIATE so
    # two writers never deadlock upgrading a read lock.
    conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={self.synchronous}")
    conn.execute("PRAGMA busy_timeout=60000")
    return conn

  @contextlib.contextmanager
  def _connection(self) -> Iterator[sqlite3.Connection]:
    with self._pool_lock:
      conn = self._pool.pop() if self._pool else None
    if conn is None:
      conn = self._connect()
    try:
      yield conn
    finally:
      with self._pool_lock:
        if len(self._pool) < self._pool_size and not self._closed:
          self._pool.append(conn)
          conn = None
      if conn is not None:
        conn.close()

  @contextlib.contextmanager
  def _write(self) -> Iterator[sqlite3.Connection]:
    with self._connection() as conn, write_transaction(conn):
      yield conn

  def close(self) -> None:
    with self._pool_lock:
      self._closed = True
      pool, self._pool = self._pool, []
    for conn in pool:
      conn.close()

  # ------------------------------------------------------------------ sessions
  def create_session(self, session: SessionRecord) -> bool:
    now = time.time()
    with self._write() as conn:
      cur = conn.execute(
        "INSERT OR IGNORE INTO sessions(session_id, created_at, updated_at, status, "
        "env_name, seed, backend, config_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
          session.session_id,
          session.created_at or now,
          now,
          session.status,
          session.env_name,
          session.seed,
          session.backend,
          json.dumps(session.config),
        ),
      )
      return cur.rowcount == 1

  def get_session(self, session_id: str) -> SessionRecord | None:
    with self._connection() as conn:
      row = conn.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return _session_from_row(row) if row else None

  def list_sessions(self, statuses: Sequence[str] | None = None) -> list[SessionRecord]:
    query, args = "SELECT * FROM sessions", ()
    if statuses:
      query += f" WHERE status IN ({','.join('?' * len(statuses))})"
      args = tuple(statuses)
    with self._connection() as conn:
      rows = conn.execute(query + " ORDER BY created_at, session_id", args).fetchall()
    return [_session_from_row(r) for r in rows]

  def update_session(
    self,
    session_id: str,
    *,
    status: str | None = None,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
  ) -> None:
    sets, args = ["updated_at = ?"], [time.time()]
    if status is not None:
      if status not in SESSION_STATUSES:
        raise ValueError(f"bad status {status!r}")
      sets.append("status = ?")
      args.append(status)
    if result is not None:
      sets.append("result_json = ?")
      args.append(json.dumps(result))
    if error is not None:
      sets.append("error = ?")
      args.append(error)
    with self._write() as conn:
      conn.execute(
        f"UPDATE sessions SET {', '.join(sets)} WHERE session_id = ?", (*args, session_id)
      )

  # ------------------------------------------------------------------ steps
  def append_step(self, step: StepRecord, delivered: Sequence[tuple[int, float]] = ()) -> bool:
    message_rows = [_message_row(m) for m in step.messages]
    row = (
      step.session_id,
      step.step_index,
      step.kind,
      step.started_at,
      step.model_started_at,
      step.model_finished_at,
      step.finished_at,
      step.env_hours_before,
      step.env_hours_after,
      json.dumps([r[0] for r in message_rows]),
      step.response,
      json.dumps(step.action) if step.action is not None else None,
      step.parse_error,
      step.observation,
      step.reward,
      int(step.done),
      step.prompt_tokens,
      step.completion_tokens,
      step.context_tokens,
      json.dumps(step.guidance_ids),
      json.dumps(step.info),
      _dumps_or_none(step.env_state),
      _dumps_or_none(step.policy_state),
      step.human_flag,
      step.human_flag_reason,
      step.quality,
      step.quality_reason,
      _dumps_or_none(step.assistant),
      _dumps_or_none(step.call),
    )
    with self._write() as conn:
      cur = conn.execute(
        f"INSERT OR IGNORE INTO steps({', '.join(_STEP_COLUMNS)}) "
        f"VALUES ({','.join('?' * len(row))})",
        row,
      )
      if cur.rowcount != 1:
        return False
      conn.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?)", message_rows)
      for guidance_id, at in delivered:
        # Only the first delivery counts; the WHERE clause makes a repeat a no-op.
        conn.execute(
          "UPDATE guidance SET delivered_at = ?, delivered_step = ? "
          "WHERE guidance_id = ? AND delivered_step IS NULL",
          (at, step.step_index, guidance_id),
        )
      conn.execute(
        "UPDATE sessions SET updated_at = ? WHERE session_id = ?", (time.time(), step.session_id)
      )
      return True

  def last_step(self, session_id: str) -> StepRecord | None:
    with self._connection() as conn:
      row = conn.execute(
        "SELECT * FROM steps WHERE session_id = ? ORDER BY step_index DESC LIMIT 1", (session_id,)
      ).fetchone()
      return _step_from_row(row, _load_messages(conn, [row])) if row else None

  def get_steps(
    self, session_id: str, since: int = -1, limit: int | None = None, full: bool = True
  ) -> list[StepRecord]:
    columns = "*" if full else ", ".join(_LIGHT_COLUMNS + (_NUM_MESSAGES,))
    query = (
      f"SELECT {columns} FROM steps WHERE session_id = ? AND step_index > ? ORDER BY step_index"
    )
    args: tuple[Any, ...] = (session_id, since)
    if limit is not None:
      query += " LIMIT ?"
      args += (limit,)
    with self._connection() as conn:
      rows = conn.execute(query, args).fetchall()
      messages = _load_messages(conn, rows) if full else {}
    return [_step_from_row(r, messages) for r in rows]

  def get_step(self, session_id: str, step_index: int) -> StepRecord | None:
    with self._connection() as conn:
      row = conn.execute(
        "SELECT * FROM steps WHERE session_id = ? AND step_index = ?", (session_id, step_index)
      ).fetchone()
      return _step_from_row(row, _load_messages(conn, [row])) if row else None

  def num_steps(self, session_id: str) -> int:
    with self._connection() as conn:
      return conn.execute(
        "SELECT COUNT(*) FROM steps WHERE session_id = ?", (session_id,)
      ).fetchone()[0]

  def set_flag(
    self, session_id: str, step_index: int, flag: str | None, reason: str | None
  ) -> bool:
    if flag is not None and flag not in FLAGS:
      raise ValueError(f"flag must be one of {FLAGS} or null")
    with self._write() as conn:
      cur = conn.execute(
        "UPDATE steps SET human_flag = ?, human_flag_reason = ? "
        "WHERE session_id = ? AND step_index = ?",
        (flag, reason, session_id, step_index),
      )
      return cur.rowcount == 1

  def set_quality(
    self, session_id: str, step_index: int, quality: str, reason: str | None = None
  ) -> bool:
    if quality not in QUALITIES:
      raise ValueError(f"quality must be one of {QUALITIES}")
    with self._write() as conn:
      cur = conn.execute(
        "UPDATE steps SET quality = ?, quality_reason = ? WHERE session_id = ? AND step_index = ?",
        (quality, reason, session_id, step_index),
      )
      return cur.rowcount == 1

  # ------------------------------------------------------------------ guidance
  def add_guidance(
    self,
    session_id: str,
    text: str,
    source: str = "human",
    client_msg_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
  ) -> tuple[guidance_lib.Guidance, bool]:
    with self._write() as conn:
      cur = conn.execute(
        "INSERT OR IGNORE INTO guidance(session_id, source, text, sent_at, client_msg_id, "
        "meta_json) VALUES (?, ?, ?, ?, ?, ?)",
        (session_id, source, text, time.time(), client_msg_id, json.dumps(meta or {})),
      )
      created = cur.rowcount == 1
      if created:
        row = conn.execute(
          "SELECT * FROM guidance WHERE guidance_id = ?", (cur.lastrowid,)
        ).fetchone()
      else:
        row = conn.execute(
          "SELECT * FROM guidance WHERE session_id = ? AND client_msg_id = ?",
          (session_id, client_msg_id),
        ).fetchone()
    return _guidance_from_row(row), created

  def pending_guidance(self, session_id: str) -> list[guidance_lib.Guidance]:
    with self._connection() as conn:
      rows = conn.execute(
        "SELECT * FROM guidance WHERE session_id = ? AND "
        "delivered_step IS NULL ORDER BY guidance_id",
        (session_id,),
      ).fetchall()
    return [_guidance_from_row(r) for r in rows]

  def list_guidance(self, session_id: str) -> list[guidance_lib.Guidance]:
    with self._connection() as conn:
      rows = conn.execute(
        "SELECT * FROM guidance WHERE session_id = ? ORDER BY guidance_id", (session_id,)
      ).fetchall()
    return [_guidance_from_row(r) for r in rows]

  # ------------------------------------------------------------------ events
  def log_event(self, session_id: str, kind: str, data: Mapping[str, Any] | None = None) -> None:
    with self._write() as conn:
      conn.execute(
        "INSERT INTO events(session_id, at, kind, data_json) VALUES (?, ?, ?, ?)",
        (session_id, time.time(), kind, json.dumps(data or {})),
      )

  def list_events(self, session_id: str) -> list[dict[str, Any]]:
    with self._connection() as conn:
      rows = conn.execute(
        "SELECT * FROM events WHERE session_id = ? ORDER BY event_id", (session_id,)
      ).fetchall()
    return [
      {
        "event_id": r["event_id"],
        "at": r["at"],
        "kind": r["kind"],
        "data": json.loads(r["data_json"]),
      }
      for r in rows
    ]


_STEP_COLUMNS = (
  "session_id",
  "step_index",
  "kind",
  "started_at",
  "model_started_at",
  "model_finished_at",
  "finished_at",
  "env_hours_before",
  "env_hours_after",
  "messages_json",
  "response",
  "action_json",
  "parse_error",
  "observation",
  "reward",
  "done",
  "prompt_tokens",
  "completion_tokens",
  "context_tokens",
  "guidance_ids_json",
  "info_json",
  "env_state_json",
  "policy_state_json",
  "human_flag",
  "human_flag_reason",
  "quality",
  "quality_reason",
  "assistant_json",
  "call_json",
)

# A light read (lists, event streams) skips the exact messages and the snapshots.
_LIGHT_COLUMNS = tuple(
  c for c in _STEP_COLUMNS if c not in ("messages_json", "env_state_json", "policy_state_json")
)

# What a light read selects instead of the message ids: their count.
_NUM_MESSAGES = "json_array_length(messages_json) AS num_messages"


def _dumps_or_none(value: Any) -> str | None:
  return None if value is None else json.dumps(value)


def _loads_or_none(value: str | None) -> Any:
  return None if value is None else json.loads(value)


def _session_from_row(row: sqlite3.Row) -> SessionRecord:
  return SessionRecord(
    session_id=row["session_id"],
    env_name=row["env_name"],
    seed=row["seed"],
    backend=row["backend"],
    config=json.loads(row["config_json"]),
    status=row["status"],
    created_at=row["created_at"],
    updated_at=row["updated_at"],
    result=_loads_or_none(row["result_json"]),
    error=row["error"],
  )


def _message_row(message: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
  """(message_id, role, content, extra_json) of one message.

  A message with only a role and a content keeps version 1's id, so old and new
  steps share their messages.
  """
  content = message.get("content")
  content = "" if content is None else content
  extra = {k: v for k, v in message.items() if k not in ("role", "content")}
  key = f"{message['role']}\0{content}"
  extra_json = None
  if extra:
    extra_json = json.dumps(extra, sort_keys=True, ensure_ascii=False)
    key += f"\0{extra_json}"
  return hashlib.sha256(key.encode()).hexdigest()[:32], message["role"], content, extra_json


def _load_messages(
  conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]
) -> dict[str, dict[str, Any]]:
  """message_id -> message for every message referenced by `rows`."""
  ids = sorted({i for r in rows for i in json.loads(r["messages_json"])})
  found: dict[str, dict[str, Any]] = {}
  for start in range(0, len(ids), 500):  # stay under SQLite's variable limit
    chunk = ids[start : start + 500]
    for r in conn.execute(
      "SELECT message_id, role, content, extra_json FROM messages WHERE message_id "
      f"IN ({','.join('?' * len(chunk))})",
      chunk,
    ):
      found[r[0]] = {"role": r[1], "content": r[2], **(json.loads(r[3]) if r[3] else {})}
  return found


def _step_from_row(row: sqlite3.Row, messages: Mapping[str, dict[str, Any]]) -> StepRecord:
  keys = row.keys()
  return StepRecord(
    session_id=row["session_id"],
    step_index=row["step_index"],
    kind=row["kind"],
    messages=(
      [dict(messages[i]) for i in json.loads(row["messages_json"])]
      if "messages_json" in keys
      else []
    ),
    response=row["response"],
    observation=row["observation"],
    action=_loads_or_none(row["action_json"]),
    parse_error=row["parse_error"],
    started_at=row["started_at"],
    model_started_at=row["model_started_at"],
    model_finished_at=row["model_finished_at"],
    finished_at=row["finished_at"],
    env_hours_before=row["env_hours_before"],
    env_hours_after=row["env_hours_after"],
    reward=row["reward"],
    done=bool(row["done"]),
    prompt_tokens=row["prompt_tokens"],
    completion_tokens=row["completion_tokens"],
    context_tokens=row["context_tokens"],
    guidance_ids=json.loads(row["guidance_ids_json"]),
    info=json.loads(row["info_json"]),
    env_state=_loads_or_none(row["env_state_json"]) if "env_state_json" in keys else None,
    policy_state=(
      _loads_or_none(row["policy_state_json"]) if "policy_state_json" in keys else None
    ),
    human_flag=row["human_flag"],
    human_flag_reason=row["human_flag_reason"],
    quality=row["quality"],
    quality_reason=row["quality_reason"],
    assistant=_loads_or_none(row["assistant_json"]),
    call=_loads_or_none(row["call_json"]),
    num_messages=row["num_messages"] if "num_messages" in keys else None,
  )


def _guidance_from_row(row: sqlite3.Row) -> guidance_lib.Guidance:
  return guidance_lib.Guidance(
    guidance_id=row["guidance_id"],
    session_id=row["session_id"],
    text=row["text"],
    source=row["source"],
    sent_at=row["sent_at"],
    delivered_at=row["delivered_at"],
    delivered_step=row["delivered_step"],
    client_msg_id=row["client_msg_id"],
    meta=json.loads(row["meta_json"]),
  )
