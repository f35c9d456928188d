"""Decoding many requests at once: a background thread that shares one decode batch.

A :class:`DecodeBatcher` owns a :class:`~apollo.models.llama.model.Decoder` and one
thread. Callers :meth:`~DecodeBatcher.submit` a :class:`GenerationRequest` (prompt
ids, token budget, temperature, top-p, seed, stop ids) from any thread and get a
:class:`Generation` back, whose tokens arrive one decode step at a time (so a
server can stream them) and which can be cancelled (a client that went away)::

    batcher = DecodeBatcher(loaded.model, max_batch=16)
    gen = batcher.submit(GenerationRequest(prompt_ids, max_new_tokens=64, stop_ids=(2,)))
    for token in gen:          # or gen.result(); gen.cancel() frees its row
      ...

The batching is continuous: a request joins the running batch at the next step
instead of waiting for the batch to finish. Its prompt is prefilled on its own
(with other newcomers) into a small cache, then copied into a free row of the
shared cache so that its last prompt token sits just before the shared write slot
(the decoder's :class:`~apollo.models.llama.model.KVCache` has one write index for
all rows; each row keeps its own RoPE positions and valid slots, so rows of any
age share it). When the shared cache runs out of slots, or rows leave, the cache
is re-laid out: rows are packed to the front of the batch, slots are shifted so
the oldest live token is at slot 0, and the cache grows or shrinks. A finished or
cancelled row stops counting at once and its slot goes to the next newcomer.

Every shape is bucketed (batch rows and cache slots to powers of two, prompt
lengths to :func:`~apollo.models.llama.sampling.prompt_bucket`), and temperature, top-p, seed
and step count are traced per row, so a new request compiles nothing unless it
brings a new bucket. Greedy decoding of a single request gives the tokens of
:func:`apollo.models.llama.sampling.generate`; sampling draws each row's token with
the key ``fold_in(key(seed), step)``, so a seeded request samples the same tokens
whatever it shares its batch with.

Each :class:`Generation` records how long it waited in the queue and how many rows
decoded beside it (:class:`GenerationStats`); :meth:`DecodeBatcher.stats` sums up
the batcher (decode steps per second, tokens per second, queue waits).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apollo.models.llama import model as decoder_lib
from apollo.models.llama import sampling

# Why a generation ended.
STOP = "stop"  # It produced one of its stop ids (the last token).
LENGTH = "length"  # It reached max_new_tokens.
CANCELLED = "cancelled"  # Generation.cancel() was called (e.g. the client disconnected).
ERROR = "error"  # The batcher failed or closed; see Generation.error.


def batch_bucket(n: int, max_batch: int) -> int:
  """Rows of the decode batch for ``n`` live rows: a power of two, at most ``max_batch``."""
  return min(max_batch, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# -----------------------------------------------------------------------------
# Requests and their results
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """What to generate.

  Attributes:
    prompt_ids: the prompt's token ids (at least one).
    max_new_tokens: most tokens to generate (the stop token included).
    temperature: 0 = greedy (argmax); else the softmax temperature.
    top_p: nucleus mass (1 = off).
    seed: sampling seed (any int; taken modulo 2^32); None = a random one.
    stop_ids: token ids that end the generation (the stop token is kept).
  """

  prompt_ids: Sequence[int]
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int | None = None
  stop_ids: Sequence[int] = ()


@dataclasses.dataclass
class GenerationStats:
  """Where one generation's time went (seconds; monotonic clock)."""

  submitted_at: float
  queue_wait_s: float | None = None  # From submit to the start of its prefill.
  prefill_s: float | None = None  # Its prefill (shared with the newcomers of that step).
  first_token_s: float | None = None  # From submit to its first token.
  batch_rows: int = 0  # Live rows in the batch right after it joined (itself included).
  decode_steps: int = 0  # Decode steps it took part in (its first token comes from prefill).
  row_steps: int = 0  # Sum over those steps of the live rows in the batch.

  @property
  def mean_batch_rows(self) -> float:
    """Mean live rows per decode step it took part in (1 = it decoded alone)."""
    return self.row_steps / self.decode_steps if self.decode_steps else float(self.batch_rows)


class Generation:
  """One submitted request: its tokens as they arrive, how it ended, its stats.

  Thread-safe. The consumer reads with :meth:`read` (non-blocking, for event
  loops woken by ``notify``), iterates (blocking), or waits for :meth:`result`.
  The producer (the batcher, or a stand-in in tests) calls :meth:`put` and
  :meth:`finish`.
  """

  def __init__(self, request: GenerationRequest, notify: Callable[[], None] | None = None):
    self.request = request
    self.stats = GenerationStats(submitted_at=time.monotonic())
    self._notify = notify
    self._tokens: list[int] = []
    self._cond = threading.Condition()
    self._finish_reason: str | None = None
    self._error: BaseException | None = None
    self._cancelled = threading.Event()
    self._on_cancel: Callable[[], None] | None = None

  # -- consumer side

  @property
  def tokens(self) -> list[int]:
    """The tokens so far (a copy)."""
    with self._cond:
      return list(self._tokens)

  @property
  def finish_reason(self) -> str | None:
    """None while running; then STOP, LENGTH, CANCELLED or ERROR."""
    return self._finish_reason

  @property
  def error(self) -> BaseException | None:
    return self._error

  @property
  def done(self) -> bool:
    return self._finish_reason is not None

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  def cancel(self) -> None:
    """Asks the producer to stop; the row is freed at its next step."""
    self._cancelled.set()
    if self._on_cancel is not None:
      self._on_cancel()

  def read(self, start: int = 0) -> tuple[list[int], bool]:
    """(the tokens from index ``start`` on, whether the generation has ended), atomically."""
    with self._cond:
      return self._tokens[start:], self._finish_reason is not None

  def wait(self, timeout: float | None = None) -> bool:
    """Blocks until the generation ends; False on timeout."""
    with self._cond:
      return self._cond.wait_for(lambda: self._finish_reason is not None, timeout)

  def __iter__(self) -> Iterator[int]:
    """Yields the tokens as they arrive (blocking); raises the producer's error, if any."""
    seen = 0
    while True:
      with self._cond:
        self._cond.wait_for(lambda: len(self._tokens) > seen or self._finish_reason is not None)
        new, ended = self._tokens[seen:], self._finish_reason is not None
      yield from new
      seen += len(new)
      if ended and seen == len(self._tokens):
        if self._error is not None:
          raise self._error
        return

  def result(self, timeout: float | None = None) -> list[int]:
    """All tokens once it has ended; raises TimeoutError, or the producer's error."""
    if not self.wait(timeout):
      raise TimeoutError(f"generation not finished after {timeout} s")
    if self._error is not None:
      raise self._error
    return self.tokens

  # -- producer side

  def _call_notify(self) -> None:
    if self._notify is not None:
      try:
        self._notify()
      except Exception:  # A consumer's bug must not stop the producer.
        logging.exception("Generation notify callback failed")

  def put(self, token: int) -> None:
    with self._cond:
      self._tokens.append(int(token))
      self._cond.notify_all()
    self._call_notify()

  def finish(self, reason: str, error: BaseException | None = None) -> None:
    with self._cond:
      if self._finish_reason is not None:
        return
      self._error = error
      self._finish_reason = reason
      self._cond.notify_all()
    self._call_notify()


# -----------------------------------------------------------------------------
# Compiled pieces (module level: one compilation per model structure and shape)
# -----------------------------------------------------------------------------


def _sample_rows(logits, temperature, top_p, seed, step):
  """One token per row; row i greedy if ``temperature[i] == 0``, else sampled with its key.

  Args:
    logits: [B, V]. temperature, top_p: float32 [B]. seed: uint32 [B]. step: int32 [B],
      the index of the token being drawn in its row's generation.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  hot = temperature > 0

  def draw(use_top_p):
    def one(row_logits, t, p, s, k):
      key = jax.random.fold_in(jax.random.key(s), k)
      return sampling.sample_logits(row_logits[None], key, t, top_p=p if use_top_p else None)[0]

    # Rows with top_p = 1 keep every token (a mass below 2 is always reached after all).
    p = jnp.where(top_p < 1, top_p, 2.0)
    return jax.vmap(one)(logits, jnp.where(hot, temperature, 1.0), p, seed, step)

  def sampled():
    # Sorting the vocabulary for top-p only when some row asks for it.
    drawn = jax.lax.cond(jnp.all(top_p >= 1), lambda: draw(False), lambda: draw(True))
    return jnp.where(hot, drawn, greedy)

  return jax.lax.cond(jnp.any(hot), sampled, lambda: greedy)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, ids, mask, temperature, top_p, seed):
  """Newcomers' prompts [n, P] (left-padded) into a fresh n x P cache, and their first tokens."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(*ids.shape)
  logits, cache = model(ids, attention_mask=mask, cache=cache, last_logits_only=True)
  first = _sample_rows(logits[:, -1], temperature, top_p, seed, jnp.zeros_like(ids[:, 0]))
  return first, cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_step(graphdef, state, cache, last, temperature, top_p, seed, step):
  """Every row's next token after ``last`` [B]; the cache advances one slot."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(last[:, None], cache=cache)
  return _sample_rows(logits[:, -1], temperature, top_p, seed, step), cache


def cache_slot_axis(config: decoder_lib.DecoderConfig) -> int:
  """The axis of the cache's key/value arrays that indexes slots (the decoder's layout)."""
  shapes = [
    jax.tree.leaves(jax.eval_shape(lambda n=n: decoder_lib.init_cache(config, 1, n).layers))[0]
    for n in (2, 3)
  ]
  (axis,) = [i for i, (a, b) in enumerate(zip(shapes[0].shape, shapes[1].shape)) if a != b]
  return axis


@functools.partial(jax.jit, static_argnames="axis", donate_argnums=0)
def _insert(cache: decoder_lib.KVCache, part: decoder_lib.KVCache, rows, index, *, axis: int):
  """Copies the prefilled ``part`` (n rows, P slots) into ``rows`` of ``cache``.

  The part's slots land at ``[index - P, index)``, so each newcomer's next token
  goes to the shared write slot ``index``. A row index >= the batch is dropped
  (padding rows of the newcomers' batch). ``axis``: the slot axis of the keys and values.
  """
  length = part.valid.shape[1]
  start = index - length

  def put(big, small, axis=axis):
    window = jax.lax.dynamic_slice_in_dim(big, start, length, axis=axis)
    window = window.at[rows].set(small.astype(big.dtype), mode="drop")
    return jax.lax.dynamic_update_slice_in_dim(big, window, start, axis=axis)

  # The row's earlier occupant leaves nothing valid behind.
  valid = put(cache.valid.at[rows].set(False, mode="drop"), part.valid, axis=1)
  return cache._replace(
    layers=jax.tree.map(put, cache.layers, part.layers),
    valid=valid,
    positions=cache.positions.at[rows].set(part.positions, mode="drop"),
  )


@functools.partial(jax.jit, static_argnames=("batch", "length", "axis"))
def _relayout(cache: decoder_lib.KVCache, rows, shift, *, batch: int, length: int, axis: int):
  """A ``batch`` x ``length`` cache whose row i is old row ``rows[i]`` (-1: empty) and
  whose slot t is old slot ``t + shift``; the write index moves back by ``shift``.

  Keys are stored after RoPE with each row's own positions, so moving slots
  changes nothing a query sees as long as valid slots move with them. ``axis``:
  the slot axis of the keys and values.
  """
  source = jnp.maximum(rows, 0)

  def move(x, axis=axis):
    x = jnp.take(x, source, axis=0)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (length, length)
    x = jnp.pad(x, pad)  # Zeros, or False for the valid mask.
    x = jax.lax.dynamic_slice_in_dim(x, length + shift, length, axis=axis)
    live = (rows >= 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(live, x, jnp.zeros_like(x))

  return cache._replace(
    layers=jax.tree.map(move, cache.layers),
    valid=move(cache.valid, axis=1),
    index=cache.index - shift,
    positions=jnp.where(rows >= 0, cache.positions[source], 0),
  )


# -----------------------------------------------------------------------------
# The batcher
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
  """A live row of the decode batch (host-side bookkeeping)."""

  gen: Generation
  start: int  # First cache slot of its window (its prompt's bucket, padding included).
  stop_ids: frozenset[int]
  count: int = 0  # Tokens produced so far.


class DecodeBatcher:
  """Serves :class:`GenerationRequest` s from many threads in one shared decode batch.

  Args:
    model: the decoder (its weights are captured at construction).
    max_batch: most rows decoded together; further requests wait in a queue.
    max_len: longest prompt + generation per request; default the model's
      ``max_position_embeddings``.
    min_cache_len: smallest compiled cache length.
    cache_headroom: free slots left after a re-layout, so the cache does not
      re-layout again at the next step.
  """

  def __init__(
    self,
    model: decoder_lib.Decoder,
    *,
    max_batch: int = 16,
    max_len: int | None = None,
    min_cache_len: int = 64,
    cache_headroom: int = 32,
  ):
    if max_batch < 1:
      raise ValueError(f"max_batch={max_batch} must be at least 1.")
    self.max_batch = max_batch
    self.max_len = max_len or model.config.max_position_embeddings
    self.min_cache_len = min_cache_len
    self.cache_headroom = cache_headroom
    self._config = model.config
    self._slot_axis = cache_slot_axis(model.config)
    self._graphdef, self._state = nnx.split(model)

    self._cond = threading.Condition()
    self._waiting: collections.deque[Generation] = collections.deque()
    self._closed = False

    # Loop-thread state: the shared cache, its host-side index, the rows.
    self._cache: decoder_lib.KVCache | None = None
    self._index = 0
    self._rows: list[_Row | None] = []
    self._last = np.zeros((0,), np.int32)
    self._temperature = np.zeros((0,), np.float32)
    self._top_p = np.ones((0,), np.float32)
    self._seed = np.zeros((0,), np.uint32)

    # Totals for stats().
    self._started = time.monotonic()
    self._totals = collections.Counter()
    self._recent_waits: collections.deque[float] = collections.deque(maxlen=1000)

    self._thread = threading.Thread(target=self._run, name="DecodeBatcher", daemon=True)
    self._thread.start()

  # -- public API

  def submit(
    self, request: GenerationRequest, notify: Callable[[], None] | None = None
  ) -> Generation:
    """Queues ``request``; ``notify`` (if given) is called from the batcher's thread
    after every new token and at the end (e.g. to wake an event loop).

    Raises:
      ValueError: for an empty prompt, a prompt + max_new_tokens over ``max_len``,
        or out-of-range sampling parameters.
      RuntimeError: once the batcher is closed.
    """
    prompt = len(request.prompt_ids)
    if prompt < 1:
      raise ValueError("The prompt is empty.")
    if request.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={request.max_new_tokens} must be at least 1.")
    if prompt + request.max_new_tokens > self.max_len:
      raise ValueError(
        f"prompt of {prompt} tokens + max_new_tokens={request.max_new_tokens} exceeds "
        f"the model's context of {self.max_len} tokens."
      )
    if request.temperature < 0:
      raise ValueError(f"temperature={request.temperature} must be >= 0.")
    if not 0 < request.top_p <= 1:
      raise ValueError(f"top_p={request.top_p} must be in (0, 1].")
    gen = Generation(request, notify)
    gen._on_cancel = self._wake
    with self._cond:
      if self._closed:
        raise RuntimeError("The batcher is closed.")
      self._waiting.append(gen)
      self._cond.notify_all()
    return gen

  def stats(self) -> dict[str, Any]:
    """Totals since start: decode steps and tokens per second, rows per step, queue waits."""
    with self._cond:
      t = dict(self._totals)
      waits = sorted(self._recent_waits)
      waiting = len(self._waiting)
    steps, decode_s = t.get("decode_steps", 0), t.get("decode_ns", 0) / 1e9
    row_steps = t.get("row_steps", 0)

    def quantile(q):
      return waits[min(len(waits) - 1, int(q * len(waits)))] if waits else None

    rows, cache = self._rows, self._cache  # A racy snapshot: fine for monitoring.
    return {
      "max_batch": self.max_batch,
      "live_rows": sum(r is not None for r in rows),
      "waiting": waiting,
      "cache_shape": [len(rows), cache.max_len if cache is not None else 0],
      "requests_admitted": t.get("admitted", 0),
      "requests_finished": t.get("finished", 0),
      "decode_steps": steps,
      "decode_seconds": decode_s,
      "decode_steps_per_s": steps / decode_s if decode_s else None,
      "decode_tokens_per_s": row_steps / decode_s if decode_s else None,
      "mean_batch_rows": row_steps / steps if steps else None,
      "prefill_tokens": t.get("prefill_tokens", 0),
      "prefill_seconds": t.get("prefill_ns", 0) / 1e9,
      "relayouts": t.get("relayouts", 0),
      "queue_wait_s": {
        "count": len(waits),
        "mean": sum(waits) / len(waits) if waits else None,
        "p50": quantile(0.5),
        "p90": quantile(0.9),
        "max": waits[-1] if waits else None,
      },
    }

  def recent_queue_waits(self) -> list[float]:
    """Queue waits (submit to prefill, seconds) of the last admitted requests, oldest
    first: at most the last 1,000."""
    with self._cond:
      return list(self._recent_waits)

  def close(self, timeout: float | None = 30.0) -> None:
    """Stops the thread; unfinished generations end with ERROR."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join(timeout)

  def __enter__(self) -> DecodeBatcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- the loop (batcher thread only below this line)

  def _wake(self) -> None:
    with self._cond:
      self._cond.notify_all()

  def _live(self) -> list[int]:
    return [i for i, r in enumerate(self._rows) if r is not None]

  def _run(self) -> None:
    while True:
      self._drop_cancelled()  # First, so that their rows go to this round's newcomers.
      if self._cache is not None and not self._live():
        self._reset()  # Nothing left to decode: free the cache.
      with self._cond:
        self._cond.wait_for(lambda: self._closed or self._waiting or self._live())
        if self._closed:
          break
        for gen in [g for g in self._waiting if g.cancelled]:
          self._waiting.remove(gen)
          gen.finish(CANCELLED)
        free = self.max_batch - len(self._live())
        newcomers = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
      try:
        if newcomers:
          self._admit(newcomers)
        elif self._live():
          self._maybe_shrink()
        if self._live():
          self._step()
        if not self._live():
          self._reset()
      except Exception as e:  # A failed step fails its rows, not the batcher.
        for gen in newcomers + [r.gen for r in self._rows if r is not None]:
          gen.finish(ERROR, e)
        self._reset()
    error = RuntimeError("The batcher was closed.")
    with self._cond:
      pending = list(self._waiting) + [r.gen for r in self._rows if r is not None]
      self._waiting.clear()
    for gen in pending:
      gen.finish(ERROR, error)
    self._reset()

  def _reset(self) -> None:
    self._cache, self._index, self._rows = None, 0, []
    self._resize_host(0)

  def _resize_host(self, batch: int, order: Sequence[int] | None = None) -> None:
    """Host per-row arrays for ``batch`` rows; new row i takes old row ``order[i]`` (-1: none)."""
    order = np.full((batch,), -1) if order is None else np.asarray(order)
    keep = order >= 0

    def take(a, fill):
      out = np.full((batch,), fill, a.dtype)
      out[keep] = a[order[keep]]
      return out

    self._last = take(self._last, 0)
    self._temperature = take(self._temperature, 0)
    self._top_p = take(self._top_p, 1)
    self._seed = take(self._seed, 0)

  def _finish(self, slot: int, reason: str) -> None:
    row = self._rows[slot]
    self._rows[slot] = None
    self._temperature[slot] = 0  # An empty row decodes greedily (the cheap path).
    row.gen.finish(reason)
    with self._cond:
      self._totals["finished"] += 1

  def _drop_cancelled(self) -> None:
    for slot in self._live():
      if self._rows[slot].gen.cancelled:
        self._finish(slot, CANCELLED)

  def _emit(self, slot: int, token: int) -> None:
    row = self._rows[slot]
    row.gen.put(token)
    row.count += 1
    if token in row.stop_ids:
      self._finish(slot, STOP)
    elif row.count >= row.gen.request.max_new_tokens:
      self._finish(slot, LENGTH)

  def _relayout(self, batch: int, first_index: int) -> None:
    """Packs the live rows into ``batch`` rows and shifts their slots so the oldest
    live slot is 0 and the write index is at least ``first_index``; sizes the cache
    for the write index plus headroom."""
    live = self._live()
    oldest = min(self._rows[i].start for i in live)
    index = max(self._index - oldest, first_index)
    shift = self._index - index
    length = self._cache_len(index + 1)
    order = live + [-1] * (batch - len(live))
    self._cache = _relayout(
      self._cache,
      jnp.asarray(order, jnp.int32),
      jnp.int32(shift),
      batch=batch,
      length=length,
      axis=self._slot_axis,
    )
    self._index = index
    rows = [self._rows[i] for i in live] + [None] * (batch - len(live))
    for row in rows[: len(live)]:
      row.start -= shift
    self._rows = rows
    self._resize_host(batch, order)
    with self._cond:
      self._totals["relayouts"] += 1

  def _maybe_shrink(self) -> None:
    """After rows left: a smaller batch bucket, a cache twice longer than needed, or
    dead slots before the oldest live one that a step would still read."""
    live = self._live()
    batch = batch_bucket(len(live), self.max_batch)
    oldest = min(self._rows[i].start for i in live)
    length = self._cache_len(self._index - oldest + 1)
    dead = oldest >= max(decoder_lib.CACHE_BLOCK, self._index // 2)
    if batch < len(self._rows) or 2 * length <= self._cache.max_len or dead:
      self._relayout(batch, first_index=0)

  def _admit(self, newcomers: list[Generation]) -> None:
    """Prefills the newcomers together and puts them into free rows of the batch."""
    started = time.monotonic()
    requests = [g.request for g in newcomers]
    prompt_len = sampling.prompt_bucket(max(len(r.prompt_ids) for r in requests))
    live = self._live()
    batch = batch_bucket(len(live) + len(newcomers), self.max_batch)
    if not live:
      self._reset()
    if self._cache is None:
      length = self._cache_len(prompt_len + 1)
      cache = decoder_lib.init_cache(self._config, batch, length)
      self._cache = cache._replace(index=jnp.int32(prompt_len))
      self._index = prompt_len
      self._rows = [None] * batch
      self._resize_host(batch)
    elif batch > len(self._rows) or self._index < prompt_len or self._index >= self._cache.max_len:
      self._relayout(max(batch, len(self._rows)), first_index=prompt_len)

    # Left-pad the newcomers into one [n, prompt_len] batch (n a power of two).
    n = batch_bucket(len(newcomers), self.max_batch)
    ids = np.zeros((n, prompt_len), np.int32)
    mask = np.zeros((n, prompt_len), bool)
    temperature = np.zeros((n,), np.float32)
    top_p = np.ones((n,), np.float32)
    seed = np.zeros((n,), np.uint32)
    for i, r in enumerate(requests):
      ids[i, prompt_len - len(r.prompt_ids) :] = r.prompt_ids
      mask[i, prompt_len - len(r.prompt_ids) :] = True
      temperature[i], top_p[i] = r.temperature, r.top_p
      seed[i] = (random.getrandbits(32) if r.seed is None else r.seed) % (1 << 32)
    free = [i for i, row in enumerate(self._rows) if row is None][: len(newcomers)]
    targets = np.full((n,), len(self._rows), np.int32)  # Out of range: dropped.
    targets[: len(free)] = free
    for gen in newcomers:
      gen.stats.queue_wait_s = started - gen.stats.submitted_at
    first, part = _prefill(self._graphdef, self._state, ids, mask, temperature, top_p, seed)
    self._cache = _insert(
      self._cache, part, jnp.asarray(targets), jnp.int32(self._index), axis=self._slot_axis
    )
    first = np.asarray(first)
    now = time.monotonic()
    for i, (slot, gen) in enumerate(zip(free, newcomers, strict=True)):
      self._rows[slot] = _Row(gen, self._index - prompt_len, frozenset(gen.request.stop_ids))
      self._last[slot] = first[i]
      self._temperature[slot], self._top_p[slot], self._seed[slot] = (
        temperature[i],
        top_p[i],
        seed[i],
      )
      gen.stats.prefill_s = now - started
      gen.stats.first_token_s = now - gen.stats.submitted_at
    rows_now = len(self._live())
    for i, (slot, gen) in enumerate(zip(free, newcomers, strict=True)):
      gen.stats.batch_rows = rows_now
      self._emit(slot, int(first[i]))
    with self._cond:
      self._totals["admitted"] += len(newcomers)
      self._totals["prefill_tokens"] += sum(len(r.prompt_ids) for r in requests)
      self._totals["prefill_ns"] += int((now - started) * 1e9)
      self._recent_waits.extend(g.stats.queue_wait_s for g in newcomers)

  def _cache_len(self, needed: int) -> int:
    # Powers of two: each cache length compiles a decode step, so few of them.
    return max(self.min_cache_len, 1 << math.ceil(math.log2(needed + self.cache_headroom)))

  def _step(self) -> None:
    """One decode step for every row; rows that end are freed."""
    if self._index >= self._cache.max_len:
      self._relayout(len(self._rows), first_index=0)
    live = self._live()
    started = time.monotonic()
    step = np.asarray([r.count if r is not None else 0 for r in self._rows], np.int32)
    tokens, self._cache = _decode_step(
      self._graphdef,
      self._state,
      self._cache,
      self._last,
      self._temperature,
      self._top_p,
      self._seed,
      step,
    )
    tokens = np.asarray(tokens)
    elapsed = time.monotonic() - started
    self._index += 1
    self._last = tokens.astype(np.int32)
    for slot in live:
      stats = self._rows[slot].gen.stats
      stats.decode_steps += 1
      stats.row_steps += len(live)
      self._emit(slot, int(tokens[slot]))
    with self._cond:
      self._totals["decode_steps"] += 1
      self._totals["row_steps"] += len(live)
      self._totals["decode_ns"] += int(elapsed * 1e9)
