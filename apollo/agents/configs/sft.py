r"""Configs of agent-policy SFT (`apollo/agents/training/sft.py`) and of the comparison.

Launch the trainer (demo samples from scripted rollouts, a tiny decoder, CPU)::

  python -m experiments.agent_sft --flagfile=experiments/flags/agent_sft_quickstart.flags

full fine-tuning of SmolLM2-135M-Instruct (any name or path `apollo.models.load` takes
works as `init_from`; the tokenizer and chat template are the checkpoint's own)::

  python -m experiments.agent_sft --flagfile=experiments/flags/agent_sft_smollm2.flags

or on exported samples (`apollo.agents.training.samples.write_jsonl`)::

  python -m experiments.agent_sft --workdir=runs/sft \
      --config=apollo/agents/configs/sft.py:quickstart \
      --config.data.train_path=runs/data/train.jsonl \
      --config.data.tokenizer_path=runs/data/tokenizer.json

The comparison (variants a..e; `apollo/studies/agent_compare.py`)::

  python -m experiments.agent_compare --flagfile=experiments/flags/compare_quickstart.flags

Presets:
  quickstart  tiny decoder on CPU, demo samples built in the workdir.
  compare     the quickstart trainer plus the comparison's fields (`compare.*`).
  smollm2     SmolLM2-135M-Instruct, full fine-tuning on CPU; demo samples rendered
              with its own template.
  qwen2_0_5b  fine-tune an exported Qwen2-0.5B directory (accelerator).

Fields whose default is OUR choice (not from the paper) say so in the README.
"""

from __future__ import annotations

import ml_collections

from apollo.common.config import mesh_config, optimizer_config

PRESETS = ("quickstart", "compare", "smollm2", "qwen2_0_5b")


def _base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Model init (random init only) and the data order (shuffle per epoch).
  c.train_steps = 200  # Optimizer updates in the whole run (a resume continues to it).
  c.log_every = 20  # Train metrics are averaged and written every this many steps.
  c.eval_every = 100  # Held-out loss every this many steps (and at the end).
  c.checkpoint_every = 100  # Save every this many steps (also at the end and on SIGTERM).
  c.max_checkpoints = 2  # Checkpoints kept in workdir/checkpoints.
  # The policy to fine-tune: a name or path apollo.models.load takes (smollm2-135m-instruct,
  # a .gguf, an HF directory); its tokenizer and chat template render the samples.
  # "" = a random `model.preset` decoder with ChatML.
  c.init_from = ""
  c.export_policy = True  # Write workdir/policy (loadable by apollo.models.load) at the end.

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # apollo.models.llama.model preset of a random init.
  c.model.hidden_size = 0  # > 0 overrides the preset's width.
  c.model.num_layers = 0  # > 0 overrides the preset's depth.
  c.model.num_heads = 0  # > 0 overrides the preset's query heads.
  c.model.num_kv_heads = 0  # > 0 overrides the preset's key/value heads.
  c.model.intermediate_size = 0  # > 0 overrides the preset's SwiGLU width.
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""  # JSONL samples (samples.write_jsonl); "" = demo samples in workdir.
  c.data.eval_path = ""  # JSONL held-out samples; "" = hold out eval_fraction of train.
  c.data.eval_fraction = 0.05  # Share of samples held out when eval_path is "".
  c.data.tokenizer_path = ""  # Checkpoint dir or tokenizer.json of the samples; "" = init_from's.
  c.data.demo_episodes = 6  # Scripted rollouts behind the demo samples (train_path "").
  c.data.seq_len = 512  # Tokens per packed row.
  c.data.batch_size = 8  # Packed rows per update (global); divisible by data*fsdp.

  c.optimizer = optimizer_config(warmup_steps=20, end_lr_fraction=0.1)

  c.mesh = mesh_config()
  return c


def _compare_fields(c: ml_collections.ConfigDict) -> None:
  """The comparison's knobs (OUR defaults, sized for ~20-30 min on 2 CPU cores)."""
  p = c.compare = ml_collections.ConfigDict()
  p.seeds = (0, 1, 2)  # Pipeline seeds: collection tasks, sampling and SFT data order.
  p.tokenizer_vocab = 1024  # BPE trained on scripted rollout text (shorter sequences).
  p.history_messages = 2  # The policy sees a one-line system prompt and the last N messages.
  p.max_steps = 110  # Step cap per episode (rollouts of a confused policy stay bounded).
  p.max_new_tokens = 40  # Longest response (a thought + one JSON call).
  p.temperature = 0.0  # Flax policy sampling temperature (0 = greedy), collection and eval.
  p.prompt_bucket = 128  # Prompts are left-padded to a multiple of this (fewer compiles).
  # The base policy: behaviour cloning on scripted rollouts of TRAIN seeds.
  p.bc_episodes = 6  # Scripted rollouts without a human (drifting behaviour).
  p.bc_guided_episodes = 3  # Scripted rollouts with the human, advice kept in context,
  #                           so the base follows advice as an instruction-tuned model would.
  p.bc_steps = 1200  # SFT updates of the warm start.
  p.bc_learning_rate = 1e-2  # Its peak learning rate.
  # Per seed: rollouts of the base policy on fresh TRAIN seeds.
  # Who acts in the training rollouts: 'policy' (the Flax base policy; the real thing)
  # or 'scripted' (the scripted policy, which drifts and follows advice). The tiny CPU
  # base policy breaks too many calls to reach a submission or trigger advice.
  p.rollout_agent = "scripted"
  p.collect_episodes = 6  # Episodes for (b) without a human, and for (c, d, e) with one.
  p.outcome_filter = "success"  # (b): keep 'success' episodes; none -> the best quartile.
  p.human_delay_steps = 2  # The simulated human answers this many steps late.
  p.human_budget = 4  # Messages per episode at most.
  p.sft_steps = 150  # SFT updates of every fine-tuned variant.
  p.sft_learning_rate = 3e-3  # Their peak learning rate.
  p.eval_episodes = 6  # Held-out TEST tasks per variant and seed (no human).


def _quickstart(c: ml_collections.ConfigDict) -> None:
  c.train_steps = 200
  c.data.seq_len = 512
  c.data.batch_size = 8
  c.optimizer.learning_rate = 1e-2


def _smollm2(c: ml_collections.ConfigDict) -> None:
  """A few dozen full fine-tuning steps of SmolLM2-135M-Instruct, sized for 2 CPU cores."""
  c.init_from = "smollm2-135m-instruct"
  c.train_steps = 30
  c.log_every = 5
  c.eval_every = 15
  c.checkpoint_every = 15
  c.data.seq_len = 512  # Compact-view samples are 130-240 of its tokens: 2-3 per row.
  c.data.batch_size = 2
  c.optimizer.learning_rate = 1e-4  # Fine-tuning a pretrained model: far below the toys' 1e-2.
  c.optimizer.warmup_steps = 5


def get_config(preset: str = "quickstart") -> ml_collections.ConfigDict:
  """The config of `preset` ('quickstart', 'compare', 'smollm2' or 'qwen2_0_5b')."""
  preset = preset or "quickstart"
  if preset not in PRESETS:
    raise ValueError(f"Unknown agent_sft preset {preset!r}; choose from {PRESETS}.")
  c = _base_config()
  if preset in ("quickstart", "compare"):
    _quickstart(c)
  if preset == "compare":
    _compare_fields(c)
    c.data.seq_len = 512  # Compact views are ~150-250 tokens: 2-3 samples per row.
    c.data.batch_size = 4
    c.data.eval_fraction = 0.0  # The comparison's yardstick is the test tasks.
  if preset == "smollm2":
    _smollm2(c)
  if preset == "qwen2_0_5b":
    c.init_from = "/data/Qwen2-0.5B-Instruct"
    c.model.dtype = "bfloat16"
    c.data.seq_len = 4096
    c.data.batch_size = 16
    c.train_steps = 2000
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.log_every = 20
    c.eval_every = 500
    c.checkpoint_every = 500
    c.mesh.fsdp = -1
    c.mesh.data = 1
  return c
