"""Asynchronous human-agent rollout service (Apollo, Fu et al., 2025).

Interactive (serves the web console and the HTTP API on localhost):

    python -m experiments.rollout --flagfile=experiments/flags/rollout_quickstart.flags

Headless (N episodes with the simulated human, then a JSON-lines export):

    python -m experiments.rollout --headless --episodes=24 --workdir=runs/rollout_headless

A real model, in process or behind the OpenAI-compatible server (`experiments.serve`),
with native tool calls (`--tool_mode=text` for servers without tool support):

    python -m experiments.rollout --headless --backend=flax --model=smollm2-135m-instruct \
        --split=test --episodes=4 --max_steps=16 --workdir=runs/rollout_smollm2
    python -m experiments.serve --model=smollm2-135m-instruct --port=8000 &
    python -m experiments.rollout --headless --backend=openai \
        --openai_base_url=http://127.0.0.1:8000/v1 --openai_model=smollm2-135m-instruct \
        --judge_base_url=http://127.0.0.1:8000/v1 --judge_model=smollm2-135m-instruct ...

Only the operator chooses what runs: the backends a session may name are configured
here, at launch (`--backends`, from the `--openai_*` / `--model` flags, and any named in
a `--backend_config` JSON file, e.g. `{"glm": {"factory": "openai", "options":
{"base_url": "http://10.0.0.5:8000/v1", "model": "zai-org/GLM-4.5", "api_key_env":
"GLM_KEY"}}}`); a request picks one by name and may set only its sampling knobs, never
a server URL, model or key. Sessions in the `workspace` environment run shell commands:
the API creates them only when `--api_envs` (or `--env`) names it, and then only with
the token when one is set. A second process on the same --workdir refuses to start
(`service.lock`).

Everything lives in --workdir: `trajectories.sqlite` (the store), `trajectories.jsonl`
(one line per episode: its trajectory as OpenAI chat messages) and `summary.json`
(scores, and per episode and overall how the model's tool calls fared: parsed,
schema-valid, unknown tool, malformed, none, several; steps per second; the LLM
judge's verdicts when `--judge_base_url` is set). Re-running the same command
resumes: active sessions continue from their last completed step (also after
`kill -9`) and finished episodes are not run again.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import threading
import time

from absl import app, flags

from apollo.agents import storage
from apollo.agents.envs import research as research_env
from apollo.agents.service import app as app_lib
from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib
from apollo.agents.supervision import judging, llm_judge, simulated_human

_WORKDIR = flags.DEFINE_string("workdir", "runs/rollout", "Store, export and summary go here.")
_HEADLESS = flags.DEFINE_bool("headless", False, "Run --episodes to the end and exit.")
_EPISODES = flags.DEFINE_integer("episodes", 1, "Episodes (sessions) to run.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Headless: sessions running at once.")
_ENV = flags.DEFINE_enum("env", "research", ["research", "workspace"], "Environment.")
_UNSAFE_NO_SANDBOX = flags.DEFINE_bool(
  "unsafe_no_sandbox",
  False,
  "Operator only: where bubblewrap cannot run, workspace sessions run the agent's "
  "commands unconfined instead of refusing to start (UNSAFE: they see the machine's "
  "files, network and this service's environment). No request can set this.",
)
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "test"], "Research task split.")
_SEED_START = flags.DEFINE_integer("seed_start", 0, "Index of the first task seed in the split.")
_BACKEND = flags.DEFINE_string(
  "backend", "scripted", "The sessions' backend: one of --backends or --backend_config."
)
_BACKENDS = flags.DEFINE_list(
  "backends",
  [],
  "Operator: backends the service offers, configured from this command line: scripted, "
  "openai (--openai_base_url, --openai_model, --openai_api_key_env), flax (--model). "
  "Always includes scripted and --backend.",
)
_BACKEND_CONFIG = flags.DEFINE_string(
  "backend_config",
  None,
  'Operator: a JSON file of more named backends, {"name": {"factory": "openai", '
  '"options": {"base_url": ..., "model": ..., "api_key_env": ...}}}.',
)
_API_ENVS = flags.DEFINE_list(
  "api_envs",
  [],
  "Operator: environments the API may create sessions in (research always; --env too). "
  "workspace runs shell commands on this machine.",
)
_TOOL_MODE = flags.DEFINE_enum(
  "tool_mode",
  "native",
  ["native", "text"],
  "native: tools sent beside the messages (OpenAI `tools`, or the checkpoint's template), "
  "calls read back by the backend. text: calls written as JSON in the reply's text, for "
  "servers without tool support.",
)
_TOOL_CHOICE = flags.DEFINE_enum(
  "tool_choice",
  "auto",
  ["auto", "required"],
  "openai / flax --model, native mode: 'required' makes the model open a call.",
)
_MODEL = flags.DEFINE_string(
  "model", None, "flax backend: a checkpoint for apollo.models.load (smollm2-135m-instruct, ...)."
)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
  "max_new_tokens", 256, "flax / openai backends: the longest reply, in tokens."
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "flax / openai backends: sampling.")
_MODEL_MAX_BATCH = flags.DEFINE_integer(
  "model_max_batch", 8, "flax --model: sessions decoded together in one batch at most."
)
_MODEL_LATENCY_S = flags.DEFINE_float(
  "model_latency_s",
  0.02,
  "Scripted backend: seconds per turn, standing in for model time. At 0 an episode "
  "ends within a fraction of a second, before a polling human can react.",
)
_OPENAI_BASE_URL = flags.DEFINE_string(
  "openai_base_url", "http://127.0.0.1:8000/v1", "OpenAI-compatible server (vLLM, SGLang)."
)
_OPENAI_MODEL = flags.DEFINE_string("openai_model", "zai-org/GLM-4.5", "Served model name.")
_OPENAI_API_KEY_ENV = flags.DEFINE_string(
  "openai_api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key."
)
_TIME_SCALE_S = flags.DEFINE_float(
  "time_scale_s", 0.0, "Research env: real seconds per simulated hour of sleep."
)
_MAX_STEPS = flags.DEFINE_integer("max_steps", 400, "Steps per episode at most.")
_CONTEXT_TOKENS = flags.DEFINE_integer(
  "context_token_threshold", 100_000, "Summarise the older half of the context above this."
)
_SIMULATED_HUMAN = flags.DEFINE_bool(
  "simulated_human", True, "Let the simulated human watch and advise."
)
_HUMAN_DELAY_STEPS = flags.DEFINE_integer(
  "human_delay_steps", 2, "Agent steps between noticing drift and advising."
)
_HUMAN_DELAY_S = flags.DEFINE_float("human_delay_s", 0.0, "Extra real-time delay of advice.")
_HUMAN_BUDGET = flags.DEFINE_integer("human_budget", 4, "Advice messages per session at most.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address (non-loopback needs --token).")
_PORT = flags.DEFINE_integer("port", 8765, "Port (0: any free port).")
_TOKEN = flags.DEFINE_string("token", None, "API token; defaults to $APOLLO_TOKEN.")
_JUDGE_BASE_URL = flags.DEFINE_string(
  "judge_base_url", None, "Headless: also ask an LLM judge on this OpenAI-compatible server."
)
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "The judge's served model name.")
_JUDGE_STEPS = flags.DEFINE_integer(
  "judge_steps", 4, "LLM judge: the first N action steps of each episode."
)


def _backends() -> dict[str, manager_lib.BackendProfile]:
  """The backends this service offers, as the operator configured them."""
  from_flags = {
    "scripted": manager_lib.BackendProfile("scripted"),
    "openai": manager_lib.BackendProfile(
      "openai",
      {
        "base_url": _OPENAI_BASE_URL.value,
        "model": _OPENAI_MODEL.value,
        "api_key_env": _OPENAI_API_KEY_ENV.value,
      },
    ),
    "flax": manager_lib.BackendProfile(
      "flax",
      {"max_batch": _MODEL_MAX_BATCH.value, **({"model": _MODEL.value} if _MODEL.value else {})},
    ),
  }
  backends = {}
  for name in {"scripted", *_BACKENDS.value, _BACKEND.value}:
    if name in from_flags:
      backends[name] = from_flags[name]
  if _BACKEND_CONFIG.value:
    with open(_BACKEND_CONFIG.value, encoding="utf-8") as f:
      for name, entry in json.load(f).items():
        backends[name] = manager_lib.BackendProfile(entry["factory"], entry.get("options", {}))
  if _BACKEND.value not in backends:
    raise app.UsageError(
      f"--backend={_BACKEND.value} is neither built in ({sorted(from_flags)}) nor in "
      "--backend_config"
    )
  return backends


def _session_spec(index: int) -> dict:
  if _ENV.value == "research":
    seed = research_env.seeds_for(_SPLIT.value, 1, start=_SEED_START.value + index)[0]
    env_options = {"time_scale_s": _TIME_SCALE_S.value}
  else:
    seed, env_options = _SEED_START.value + index, {}
  # Per-session knobs only: servers, models and keys are the operator's (`_backends`).
  factory = _backends()[_BACKEND.value].factory
  if factory == "scripted":
    backend_options = {"latency_s": _MODEL_LATENCY_S.value}
  elif factory == "openai":
    backend_options = {
      "tool_choice": _TOOL_CHOICE.value,
      "max_tokens": _MAX_NEW_TOKENS.value,
      "temperature": _TEMPERATURE.value,
    }
  elif factory == "flax":
    backend_options = {
      "tool_choice": _TOOL_CHOICE.value,
      "max_new_tokens": _MAX_NEW_TOKENS.value,
      "temperature": _TEMPERATURE.value,
    }
  else:
    backend_options = {}
  return {
    "session_id": f"{_ENV.value}-{seed}",
    "env": _ENV.value,
    "seed": seed,
    "backend": _BACKEND.value,
    "env_options": env_options,
    "backend_options": backend_options,
    "agent": {
      "max_steps": _MAX_STEPS.value,
      "context_token_threshold": _CONTEXT_TOKENS.value,
      "tool_mode": _TOOL_MODE.value,
    },
  }


# Per-step tool-call counters (`agent.CallCheck`) summed in summaries.
_CALL_COUNTERS = ("parsed", "schema_ok", "unknown_tool", "malformed", "no_call", "multiple")


def tool_call_stats(steps: list[storage.StepRecord]) -> dict:
  """How the action steps' tool calls fared: counts and fractions of `_CALL_COUNTERS`."""
  checks = [s.call for s in steps if s.kind == "action" and s.call is not None]
  counts = {key: sum(bool(c.get(key)) for c in checks) for key in _CALL_COUNTERS}
  n = len(checks)
  return {
    "action_steps": n,
    **counts,
    "parse_rate": counts["parsed"] / n if n else 0.0,
    "schema_pass_rate": counts["schema_ok"] / n if n else 0.0,
  }


def _summarise(store: storage.SQLiteStore, session_ids: list[str], started: float) -> dict:
  rows, all_steps = [], []
  for sid in session_ids:
    session = store.get_session(sid)
    guidance = store.list_guidance(sid)
    steps = store.get_steps(sid, full=False)
    all_steps += steps
    rows.append(
      {
        "session_id": sid,
        "seed": session.seed,
        "status": session.status,
        "steps": len(steps),
        "result": session.result,
        "human_messages": sum(g.source == "human" for g in guidance),
        "simulated_human_messages": sum(g.source == "simulated_human" for g in guidance),
        "bad_flags": sum(s.human_flag == "bad" for s in steps),
        "tool_calls": tool_call_stats(steps),
      }
    )
  results = [r["result"] or {} for r in rows]
  # Throughput of this invocation: the steps it stored over its wall time.
  wall_s = time.time() - started
  recent = [s for s in all_steps if (s.finished_at or 0.0) >= started]
  model_s = sum(
    s.model_finished_at - s.model_started_at
    for s in recent
    if s.model_started_at is not None and s.model_finished_at is not None
  )
  return {
    "episodes": len(rows),
    "success_rate": (sum(bool(r.get("success")) for r in results) / len(rows)) if rows else 0.0,
    "mean_score": statistics.fmean(r.get("score", 0.0) for r in results) if rows else 0.0,
    "median_steps": statistics.median(r["steps"] for r in rows) if rows else 0,
    "interventions": sum(r["simulated_human_messages"] + r["human_messages"] for r in rows),
    "tool_calls": tool_call_stats(all_steps),
    "steps_per_s": len(recent) / wall_s if wall_s > 0 else None,
    "wall_s": wall_s,
    "model_s_per_step": model_s / len(recent) if recent else None,
    "sessions": rows,
  }


def judge_with_llm(store: storage.SQLiteStore, session_ids: list[str]) -> dict:
  """The LLM judge on the first `--judge_steps` action steps of each session,
  beside the rule judge; the labels are reported, not stored."""
  judge = llm_judge.LLMJudge.from_openai(_JUDGE_BASE_URL.value, _JUDGE_MODEL.value)
  rules = judging.RuleJudge()
  verdicts, agree, judged = {"keep": 0, "mask": 0}, 0, []
  started = time.time()
  for sid in session_ids:
    view = judging.TrajectoryView.load(store, sid)
    for step in view.action_steps()[: _JUDGE_STEPS.value]:
      label = judge.judge(view, step.step_index)
      rule = rules.judge(view, step.step_index)
      verdicts[label.verdict] += 1
      agree += rule is not None and rule.verdict == label.verdict
      judged.append(
        {
          "session_id": sid,
          "step_index": step.step_index,
          "llm": label.to_json(),
          "rules": rule.to_json() if rule else None,
        }
      )
  return {
    "steps": len(judged),
    "verdicts": verdicts,
    "judge_errors": dict(judge.errors),
    "agreement_with_rules": agree / len(judged) if judged else None,
    "seconds": time.time() - started,
    "labels": judged,
  }


def run_headless(
  store: storage.SQLiteStore,
  manager: manager_lib.SessionManager,
  server: app_lib.RolloutServer,
  token: str | None = None,
) -> dict:
  client = client_lib.HttpClient(server.url, token)
  specs = [_session_spec(i) for i in range(_EPISODES.value)]
  ids = [s["session_id"] for s in specs]
  started = time.time()
  resumed = manager.resume_unfinished()
  if resumed:
    print(f"resumed {len(resumed)} session(s) from their last completed step: {resumed}")
  stop = threading.Event()
  watcher = None
  if _SIMULATED_HUMAN.value:
    # The simulated human sees the service only through its HTTP API, like a person.
    human = simulated_human.SimulatedHuman(
      client,
      delay_steps=_HUMAN_DELAY_STEPS.value,
      delay_s=_HUMAN_DELAY_S.value,
      budget=_HUMAN_BUDGET.value,
    )
    watcher = threading.Thread(target=human.watch, args=(ids, stop), daemon=True)
    watcher.start()
  pending = [s for s in specs if store.get_session(s["session_id"]) is None]
  while pending or not manager.join(timeout=0):
    active = len(store.list_sessions(storage.ACTIVE_STATUSES))
    while pending and active < _CONCURRENCY.value:
      client.create_session(**pending.pop(0))
      active += 1
    time.sleep(0.05)
  stop.set()
  if watcher is not None:
    watcher.join(timeout=5)
  summary = _summarise(store, ids, started)
  count = store.export_jsonl(os.path.join(_WORKDIR.value, "trajectories.jsonl"), ids)
  summary["jsonl_lines"] = count
  summary["settings"] = {
    "backend": _BACKEND.value,
    "model": _MODEL.value or (_OPENAI_MODEL.value if _BACKEND.value == "openai" else None),
    "tool_mode": _TOOL_MODE.value,
    "tool_choice": _TOOL_CHOICE.value,
    "split": _SPLIT.value,
    "max_steps": _MAX_STEPS.value,
    "max_new_tokens": _MAX_NEW_TOKENS.value,
    "temperature": _TEMPERATURE.value,
    "simulated_human": _SIMULATED_HUMAN.value,
    "context_token_threshold": _CONTEXT_TOKENS.value,
  }
  if _JUDGE_BASE_URL.value:
    summary["llm_judge"] = judge_with_llm(store, ids)
  with open(os.path.join(_WORKDIR.value, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


def _raise_keyboard_interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt


def main(argv: list[str]) -> None:
  del argv
  token = _TOKEN.value or os.environ.get("APOLLO_TOKEN") or None
  try:
    workdir_lock = manager_lib.lock_workdir(_WORKDIR.value)
  except manager_lib.WorkdirLocked as e:
    raise SystemExit(f"error: {e}") from None
  try:
    _serve(token)
  finally:
    workdir_lock.close()


def _serve(token: str | None) -> None:
  """Runs the service on the locked --workdir: headless to the end, or until Ctrl-C."""
  store = storage.SQLiteStore(os.path.join(_WORKDIR.value, "trajectories.sqlite"))
  env_factories = dict(manager_lib.ENV_FACTORIES)
  if _UNSAFE_NO_SANDBOX.value:  # an operator's choice, never a request's env_options
    env_factories["workspace"] = functools.partial(
      env_factories["workspace"], unsafe_no_sandbox=True
    )
  manager = manager_lib.SessionManager(
    store,
    workdir=_WORKDIR.value,
    backends=_backends(),
    envs=sorted({"research", _ENV.value, *_API_ENVS.value}),
    env_factories=env_factories,
  )
  if _HEADLESS.value:
    server = app_lib.RolloutServer(manager, "127.0.0.1", 0, token=token).start()
    try:
      summary = run_headless(store, manager, server, token)
    finally:
      server.stop()
      manager.shutdown()
    calls = summary["tool_calls"]
    print(
      f"episodes={summary['episodes']} success_rate={summary['success_rate']:.2f} "
      f"mean_score={summary['mean_score']:.1f} median_steps={summary['median_steps']} "
      f"interventions={summary['interventions']} jsonl_lines={summary['jsonl_lines']}\n"
      f"tool calls: parsed={calls['parse_rate']:.2f} schema_ok={calls['schema_pass_rate']:.2f} "
      f"of {calls['action_steps']} steps; steps/s={summary['steps_per_s'] or 0:.3f}"
    )
    print(f"store: {store.path}\nexport: {os.path.join(_WORKDIR.value, 'trajectories.jsonl')}")
    return
  server = app_lib.RolloutServer(manager, _HOST.value, _PORT.value, token=token).start()
  resumed = manager.resume_unfinished()
  for i in range(_EPISODES.value):
    spec = _session_spec(i)
    if store.get_session(spec["session_id"]) is None:
      manager.create_session(spec)
  stop = threading.Event()
  if _SIMULATED_HUMAN.value:
    human = simulated_human.SimulatedHuman(
      client_lib.LocalClient(manager),
      delay_steps=_HUMAN_DELAY_STEPS.value,
      delay_s=_HUMAN_DELAY_S.value,
      budget=_HUMAN_BUDGET.value,
    )
    # Watches every session, including ones created later from the console or CLI.
    live_ids = lambda: [s.session_id for s in store.list_sessions(storage.ACTIVE_STATUSES)]  # noqa: E731
    threading.Thread(target=human.watch, args=(live_ids, stop), daemon=True).start()
  url = server.url + "/"
  print(
    f"Apollo rollout console: {url}"
    + (f"?token={token}" if token and not app_lib.is_loopback(_HOST.value) else "")
  )
  print(f"resumed: {resumed or 'none'}; sessions: {[s.session_id for s in store.list_sessions()]}")
  print(
    f"CLI: python -m apollo.agents.service.cli --url {server.url} list   (Ctrl-C to stop)",
    flush=True,
  )
  signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops cleanly too
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    stop.set()
    server.stop()
    manager.shutdown()


if __name__ == "__main__":
  app.run(main)
