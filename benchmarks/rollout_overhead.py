"""Rollout loop overhead and guidance latency with concurrent sessions.

    python -m benchmarks.rollout_overhead [--sessions 16] [--model_latency_s 0.05] [--listeners 200]

Runs N research-task sessions at once in one service (SQLite store, HTTP API on
127.0.0.1) with the scripted policy standing in for a model that takes
`model_latency_s` per turn. Meanwhile a client in another process (as a person's
browser is) sends guidance over HTTP to random running sessions. Reports:

- loop overhead per step: the time between the starts of consecutive steps minus
  the model call (prompt building, guidance lookup, parsing, environment step,
  SQLite commit of the full step record, notifications); model time excluded;
- guidance latency: from the client's POST to the moment the message entered the
  agent's context (`delivered_at`), i.e. what the human waits before the agent sees
  it. It is bounded below by the model call under way when the message arrives.

The last row runs the same sessions with `--listeners` server-sent event streams open
(consoles watching, spread over the sessions, read by one selector in another process,
as browsers are) and also
reports the fan-out latency: from the POST to the `guidance` event reaching a
listener of that session.

With `--model=smollm2-135m-instruct` (any name `apollo.models.load` takes) a second
table runs the real model in process: 1 session and `--sessions` sessions, each for
`--model_steps` steps with native tool calls, all sharing one decode batcher (as
sessions of one service do). It reports steps/s, the speed-up of N sessions over 1,
the model's mean turn time, the decode batch's mean rows, and the time a turn's
request waits in the batcher's queue before its prefill starts (p50 / p90 / max).
Compilation is excluded by a warm-up run of N sessions for one step first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import selectors
import socket
import statistics
import tempfile
import time
from typing import Any

from apollo.agents import storage
from apollo.agents.backends import flax_policy
from apollo.agents.service import app as app_lib
from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib


def _pct(values: list[float], q: float) -> float:
  values = sorted(values)
  return values[min(len(values) - 1, int(q * len(values)))]


def _listen(host: str, port: int, session_ids: list[str], n: int, stop: Any, out: Any) -> None:
  """In its own process: `n` event streams over `session_ids` (round robin), read with
  one selector until `stop` is set; then puts {guidance id: first-receive times} on `out`."""
  selector = selectors.DefaultSelector()
  first_seen: dict[int, list[float]] = {}
  buffers: dict[socket.socket, bytes] = {}
  seen: dict[socket.socket, set[int]] = {}
  for i in range(n):
    sock = socket.create_connection((host, port))
    sid = session_ids[i % len(session_ids)]
    sock.sendall(f"GET /api/sessions/{sid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ)
    buffers[sock], seen[sock] = b"", set()
  while not stop.is_set():
    for key, _ in selector.select(timeout=0.1):
      sock = key.fileobj
      try:
        data = sock.recv(1 << 16)
      except BlockingIOError:
        continue
      if not data:
        selector.unregister(sock)
        continue
      now = time.time()
      *events, buffers[sock] = (buffers[sock] + data).split(b"\n\n")
      for event in events:
        if b"event: guidance\n" not in event:
          continue
        payload = event.split(b"data: ", 1)[1].split(b"\r\n")[0]
        gid = json.loads(payload)["guidance_id"]
        if gid not in seen[sock]:
          seen[sock].add(gid)
          first_seen.setdefault(gid, []).append(now)
  for sock in buffers:
    sock.close()
  out.put(first_seen)


def _send_guidance(
  url: str, session_ids: list[str], interval_s: float, stop: Any, out: Any
) -> None:
  """In its own process: guidance to random sessions every `interval_s` until `stop`;
  then puts {guidance id: time sent} on `out`."""
  client = client_lib.HttpClient(url)
  rng = random.Random(0)
  sent: dict[int, float] = {}
  while not stop.is_set():
    sid = rng.choice(session_ids)
    t0 = time.time()
    try:
      reply = client.send_guidance(sid, "Keep monitoring the run; report progress.")
      sent[reply["guidance"]["guidance_id"]] = t0
    except manager_lib.ApiError:
      pass  # that session already finished
    stop.wait(interval_s)
  out.put(sent)


class _Listeners:
  """`n` event streams read in another process, as consoles are: their reading does not
  compete with the service for its interpreter lock."""

  def __init__(self, server: app_lib.RolloutServer, session_ids: list[str], n: int):
    context = multiprocessing.get_context("spawn")
    self.stop, self.out = context.Event(), context.Queue()
    self.first_seen: dict[int, list[float]] = {}
    self.process = context.Process(
      target=_listen, args=(server.host, server.port, session_ids, n, self.stop, self.out)
    )
    self.process.start()

  def close(self) -> None:
    self.stop.set()
    self.first_seen = self.out.get(timeout=120)
    self.process.join(30)


def run(
  sessions: int,
  model_latency_s: float,
  max_steps: int,
  guidance_interval_s: float,
  listeners: int = 0,
) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    store = storage.SQLiteStore(os.path.join(tmp, "bench.sqlite"))
    manager = manager_lib.SessionManager(store, workdir=tmp)
    server = app_lib.RolloutServer(
      manager, "127.0.0.1", 0, max_streams_per_client=max(listeners, app_lib.MAX_STREAMS_PER_CLIENT)
    ).start()
    client = client_lib.HttpClient(server.url)
    # Created paused, so that the listeners are connected before any step runs.
    ids = [
      client.create_session(
        seed=i,
        backend_options={"latency_s": model_latency_s, "invalid_rate": 0.0},
        agent={"max_steps": max_steps},
        paused=True,
      )["session_id"]
      for i in range(sessions)
    ]
    watchers = _Listeners(server, ids, listeners) if listeners else None
    if watchers is not None:
      deadline = time.monotonic() + 60
      while sum(app_lib.streams_open(server.app).values()) < listeners:
        if time.monotonic() > deadline:
          raise RuntimeError("the listeners did not connect")
        time.sleep(0.01)
    began = time.perf_counter()
    for sid in ids:
      client.control(sid, "resume")
    # The human's client is another process too, as a browser is.
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    sender = context.Process(
      target=_send_guidance, args=(server.url, ids, guidance_interval_s, stop, out)
    )
    sender.start()
    manager.join(ids, timeout=600)
    wall = time.perf_counter() - began
    stop.set()
    sent: dict[int, float] = out.get(timeout=120)
    sender.join(30)
    fanout = []
    if watchers is not None:
      watchers.close()
      for gid, times in watchers.first_seen.items():
        if gid in sent:
          fanout += [t - sent[gid] for t in times]
    overhead, model, steps_total = [], [], 0
    for sid in ids:
      steps = store.get_steps(sid, full=False)
      steps_total += len(steps)
      for a, b in zip(steps, steps[1:]):
        if a.kind == "action":
          model_time = a.model_finished_at - a.model_started_at
          model.append(model_time)
          overhead.append(b.started_at - a.started_at - model_time)
    latency, accept_latency, undelivered = [], [], 0
    for sid in ids:
      for g in store.list_guidance(sid):
        if g.delivered_at is None:
          undelivered += 1  # sent after the session's last turn
          continue
        latency.append(g.delivered_at - sent[g.guidance_id])
        accept_latency.append(g.delivered_at - g.sent_at)
    server.stop()
    manager.shutdown()
    store.close()
  return {
    "sessions": sessions,
    "model_latency_s": model_latency_s,
    "steps": steps_total,
    "wall_s": wall,
    "overhead": overhead,
    "model": model,
    "latency": latency,
    "accept_latency": accept_latency,
    "undelivered": undelivered,
    "listeners": listeners,
    "fanout": fanout,
  }


def run_model(
  sessions: int, model: str, max_batch: int, steps: int, max_new_tokens: int, seed: int = 0
) -> dict:
  """`sessions` research sessions acting with `model` in process for `steps` steps."""
  _, batcher = flax_policy.shared_checkpoint(model, max_batch=max_batch)
  before = batcher.stats()
  with tempfile.TemporaryDirectory() as tmp:
    store = storage.SQLiteStore(os.path.join(tmp, "bench.sqlite"))
    backends = {
      "flax": manager_lib.BackendProfile("flax", {"model": model, "max_batch": max_batch})
    }
    manager = manager_lib.SessionManager(store, workdir=tmp, backends=backends)
    ids = [
      manager.create_session(
        {
          "seed": seed + i,
          "backend": "flax",
          "backend_options": {"max_new_tokens": max_new_tokens, "temperature": 0.7},
          "agent": {"max_steps": steps},
          "paused": True,
        }
      ).session_id
      for i in range(sessions)
    ]
    began = time.perf_counter()
    for sid in ids:
      manager.resume(sid)
    manager.join(ids, timeout=3600)
    wall = time.perf_counter() - began
    model_s, steps_total = [], 0
    for sid in ids:
      for step in store.get_steps(sid, full=False):
        steps_total += 1
        if step.kind == "action":
          model_s.append(step.model_finished_at - step.model_started_at)
    manager.shutdown()
    store.close()
  after = batcher.stats()
  admitted = after["requests_admitted"] - before["requests_admitted"]
  waits = batcher.recent_queue_waits()[-admitted:] if admitted else []
  decode_steps = after["decode_steps"] - before["decode_steps"]
  row_steps = (after["mean_batch_rows"] or 0) * after["decode_steps"] - (
    before["mean_batch_rows"] or 0
  ) * before["decode_steps"]
  return {
    "sessions": sessions,
    "steps": steps_total,
    "wall_s": wall,
    "model_s": model_s,
    "waits": waits,
    "mean_batch_rows": row_steps / decode_steps if decode_steps else 0.0,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sessions", type=int, default=16)
  parser.add_argument("--model_latency_s", type=float, default=0.05)
  parser.add_argument("--max_steps", type=int, default=100)
  parser.add_argument("--guidance_interval_s", type=float, default=0.02)
  parser.add_argument("--listeners", type=int, default=200, help="event streams, last row")
  parser.add_argument(
    "--model", default="", help="also the real-model table (e.g. smollm2-135m-instruct)"
  )
  parser.add_argument("--model_steps", type=int, default=3, help="real model: steps per session")
  parser.add_argument("--max_new_tokens", type=int, default=48, help="real model: tokens per turn")
  parser.add_argument("--skip_scripted", action="store_true", help="only the real-model table")
  args = parser.parse_args()
  if not args.skip_scripted:
    _scripted_table(args)
  if args.model:
    _model_table(args)


def _model_table(args: argparse.Namespace) -> None:
  print(f"\nreal model {args.model} in process, {args.model_steps} steps per session:")
  run_model(args.sessions, args.model, args.sessions, 1, args.max_new_tokens, seed=100)  # warm-up
  print(
    "| sessions | steps | steps/s | x 1 session | model turn mean (s) | mean decode rows "
    "| batcher queue wait p50 / p90 / max (s) |"
  )
  print("|---|---|---|---|---|---|---|")
  base = None
  for sessions in sorted({1, args.sessions}):
    r = run_model(sessions, args.model, args.sessions, args.model_steps, args.max_new_tokens)
    rate = r["steps"] / r["wall_s"]
    base = base or rate
    w = r["waits"]
    waits = f"{_pct(w, 0.5):.2f} / {_pct(w, 0.9):.2f} / {max(w):.2f}" if w else "-"
    print(
      f"| {sessions} | {r['steps']} | {rate:.3f} | {rate / base:.2f} | "
      f"{statistics.fmean(r['model_s']):.2f} | {r['mean_batch_rows']:.1f} | {waits} |",
      flush=True,
    )


def _scripted_table(args: argparse.Namespace) -> None:
  print(f"cpu cores: {os.cpu_count()}")
  print(
    "| sessions | SSE listeners | model latency | steps | steps/s "
    "| loop overhead p50 / p95 / mean (ms) | guidance latency p50 / p95 / max (ms) "
    "| guidance event to listeners p50 / p95 (ms) | guidance msgs |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  rows = [(n, 0) for n in sorted({1, args.sessions})] + [(args.sessions, args.listeners)]
  for sessions, listeners in rows:
    r = run(sessions, args.model_latency_s, args.max_steps, args.guidance_interval_s, listeners)
    o = [1000 * x for x in r["overhead"]]
    g = [1000 * x for x in r["latency"]]
    f = [1000 * x for x in r["fanout"]]
    fanout = f"{_pct(f, 0.5):.0f} / {_pct(f, 0.95):.0f}" if f else "-"
    print(
      f"| {sessions} | {listeners} | {1000 * args.model_latency_s:.0f} ms | {r['steps']} | "
      f"{r['steps'] / r['wall_s']:.0f} | {_pct(o, 0.5):.1f} / {_pct(o, 0.95):.1f} / "
      f"{statistics.fmean(o):.1f} | {_pct(g, 0.5):.0f} / {_pct(g, 0.95):.0f} / {max(g):.0f} | "
      f"{fanout} | {len(g)} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
