"""Rollout loop overhead and guidance latency with concurrent sessions.

    python -m benchmarks.rollout_overhead [--sessions 16] [--model_latency_s 0.05]

Runs N research-task sessions at once in one service (SQLite store, HTTP API on
127.0.0.1) with the scripted policy standing in for a model that takes
`model_latency_s` per turn. Meanwhile a client sends guidance over HTTP to random
running sessions. Reports:

- loop overhead per step: the time between the starts of consecutive steps minus
  the model call (prompt building, guidance lookup, parsing, environment step,
  SQLite commit of the full step record, notifications); model time excluded;
- guidance latency: from the client's POST to the moment the message entered the
  agent's context (`delivered_at`), i.e. what the human waits before the agent sees
  it. It is bounded below by the model call under way when the message arrives.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time

from apollo.agents import storage
from apollo.agents.service import client as client_lib
from apollo.agents.service import http_api
from apollo.agents.service import manager as manager_lib


def _pct(values: list[float], q: float) -> float:
  values = sorted(values)
  return values[min(len(values) - 1, int(q * len(values)))]


def run(sessions: int, model_latency_s: float, max_steps: int, guidance_interval_s: float) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    store = storage.SQLiteStore(os.path.join(tmp, "bench.sqlite"))
    manager = manager_lib.SessionManager(store, workdir=tmp)
    server = http_api.RolloutHTTPServer(manager, "127.0.0.1", 0).start()
    client = client_lib.HttpClient(server.url)
    began = time.perf_counter()
    ids = [
      client.create_session(
        seed=i,
        backend_options={"latency_s": model_latency_s, "invalid_rate": 0.0},
        agent={"max_steps": max_steps},
      )["session_id"]
      for i in range(sessions)
    ]
    sent: dict[int, float] = {}
    stop = threading.Event()

    def send_guidance() -> None:
      rng = random.Random(0)
      while not stop.is_set():
        sid = rng.choice(ids)
        t0 = time.time()
        try:
          reply = client.send_guidance(sid, "Keep monitoring the run; report progress.")
          sent[reply["guidance"]["guidance_id"]] = t0
        except manager_lib.ApiError:
          pass  # that session already finished
        stop.wait(guidance_interval_s)

    sender = threading.Thread(target=send_guidance, daemon=True)
    sender.start()
    manager.join(ids, timeout=600)
    wall = time.perf_counter() - began
    stop.set()
    sender.join()
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
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sessions", type=int, default=16)
  parser.add_argument("--model_latency_s", type=float, default=0.05)
  parser.add_argument("--max_steps", type=int, default=100)
  parser.add_argument("--guidance_interval_s", type=float, default=0.02)
  args = parser.parse_args()
  print(f"cpu cores: {os.cpu_count()}")
  print(
    "| sessions | model latency | steps | steps/s | loop overhead p50 / p95 / mean (ms) "
    "| guidance latency p50 / p95 / max (ms) | guidance msgs |"
  )
  print("|---|---|---|---|---|---|---|")
  for sessions in sorted({1, args.sessions}):
    r = run(sessions, args.model_latency_s, args.max_steps, args.guidance_interval_s)
    o = [1000 * x for x in r["overhead"]]
    g = [1000 * x for x in r["latency"]]
    print(
      f"| {sessions} | {1000 * args.model_latency_s:.0f} ms | {r['steps']} | "
      f"{r['steps'] / r['wall_s']:.0f} | {_pct(o, 0.5):.1f} / {_pct(o, 0.95):.1f} / "
      f"{statistics.fmean(o):.1f} | {_pct(g, 0.5):.0f} / {_pct(g, 0.95):.0f} / {max(g):.0f} | "
      f"{len(g)} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
