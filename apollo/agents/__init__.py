"""Apollo: asynchronous human-agent rollout for long-horizon tasks, and training on it.

D. Fu et al., "Interaction as Intelligence Part II: Asynchronous Human-Agent
Rollout for Long-Horizon Task Training", arXiv 2510.27630, 2025. An agent works on
a long task while a human supervises it asynchronously (advice never blocks the
agent); every step is stored; every action is judged keep or mask; the policy is
fine-tuned on the masked trajectories.

The rollout core (read in this order):
- `env`: the environment interface (text observations, schema-checked tool calls,
  and `EpisodeFacts`, what an environment tells judges about an episode);
- `agent`: the loop (one tool call per turn, every step stored, resumable);
  `guidance`: the tagged human-guidance format; `summarize`: context compression;
  `tokens`: token counting; `storage`: the SQLite (WAL) trajectory store.

By concept:
- `envs/`: the research task family (`research`, its scripted policy
  `research_policy`, its answers to judges `research_facts`) and shell
  workspaces (`workspace`);
- `backends/`: the backend protocol and registry, an OpenAI-compatible client, the
  project's Flax policy, and the compact context view for small policies;
- `service/`: concurrent sessions, the HTTP API and web console, the client
  protocol (local and HTTP) and the CLI;
- `supervision/`: judging every action (rules, human flags, an LLM judge), the
  label table, the simulated human;
- `training/`: training samples and their file format, episode collection, SFT;
- `configs/`: the SFT and comparison configs.
Entry point: `python -m experiments.rollout --flagfile=experiments/flags/rollout_quickstart.flags`.
"""
