"""Apollo: asynchronous human-agent rollout with action-level filtering (Fu et al., 2025).

Rollout service (read in this order):
- `env`: the environment interface (text observations, schema-checked tool calls);
  `research_env`: the built-in simulated ML-research task family with hidden facts;
  `workspace_env`: real shell sessions and files in a per-episode directory.
- `agent`: the loop (one tool call per turn, every step stored, resumable);
  `backends`: OpenAI-compatible client, scripted policy, local-policy hook;
  `guidance`: the tagged human-guidance format; `summarize`: context compression;
  `tokens`: token counting.
- `storage`: the SQLite (WAL) trajectory store and JSON-lines export.
- `service`: concurrent sessions and the HTTP API (+ `console/`); `cli`: its client.
- `simulated_human`: rule-based supervisor for experiments; `research_metrics`:
  the environment's measured properties.
Entry point: `python -m experiments.rollout --flagfile=experiments/flags/rollout_quickstart.flags`.
"""
