r"""Configs of the multiple-choice fine-tuning trainer (`apollo/lm/finetune.py`), with presets.

Launch (after the quickstart pretraining, `make demo`; on a CPU)::

  python -m experiments.finetune --flagfile=experiments/flags/quickstart_finetune.flags

ReClor / LogiQA at RoBERTa scale (accelerator; data and weights in local dirs)::

  python -m experiments.finetune --flagfile=experiments/flags/reclor_roberta_large.flags \
      --config.init_from=/data/roberta-large --config.data.data_dir=/data/reclor

or directly with a preset and overrides::

  python -m experiments.finetune --workdir=runs/finetune \
      --config=apollo/lm/configs/finetune.py:quickstart \
      --config.init_from_pretrain=runs/pretrain_quickstart --config.train_steps=50

Presets:
  quickstart    the generated logic set (apollo.lm.datasets.logic_mc), tiny encoder, CPU.
  minilm        the generated logic set after the MiniLM continued pretraining
                (experiments/flags/minilm_finetune.flags), CPU.
  reclor_base   ReClor, RoBERTa-base (accelerator).
  reclor_large  ReClor, RoBERTa-large: the reference settings (max length 256,
                batch 24, lr 1e-5, 10 epochs, 10% warmup, weight decay 0.01).
  logiqa_base   LogiQA (v1), RoBERTa-base.
  logiqa_large  LogiQA (v1), RoBERTa-large, the same reference settings.

Every field has a one-line comment.
"""

from __future__ import annotations

import ml_collections

from apollo.common.config import mesh_config, optimizer_config

PRESETS = (
  "quickstart",
  "minilm",
  "reclor_base",
  "reclor_large",
  "logiqa_base",
  "logiqa_large",
)


def _base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # New-head init, dropout keys (folded with the step) and the data order.
  c.train_steps = 0  # Optimizer updates; 0 = num_epochs over the training split.
  c.num_epochs = 10.0  # Passes over the training split when train_steps is 0.
  c.log_every = 20  # Train metrics are averaged and written every this many steps.
  c.eval_every = 0  # Evaluate every this many steps (and at the end); 0 = once per epoch.
  c.eval_splits = ("validation", "test")  # Splits evaluated (test: predictions written).
  c.checkpoint_every = 500  # Save every this many steps (also at the end and on SIGTERM).
  c.max_checkpoints = 2  # Checkpoints kept in workdir/checkpoints.
  c.init_from_pretrain = ""  # A workdir of experiments.pretrain (latest checkpoint's encoder).
  # A checkpoint: any name or path `apollo.models.load` accepts (minilm-l6, a local HF
  # BERT or RoBERTa directory), with its own tokenizer; the scorer (and a pooler it
  # lacks) are new. Neither this nor init_from_pretrain = random init of `model`.
  c.init_from = ""

  c.model = ml_collections.ConfigDict()
  c.model.preset = (
    "tiny"  # From scratch only: apollo.models.roberta.model preset (tiny/small/base/large).
  )
  c.model.hidden_size = 0  # From scratch only: > 0 overrides the preset's width.
  c.model.num_layers = 0  # From scratch only: > 0 overrides the preset's depth.
  c.model.num_heads = 0  # From scratch only: > 0 overrides the preset's heads.
  c.model.intermediate_size = 0  # From scratch only: > 0 overrides the feed-forward width.
  c.model.hidden_dropout_rate = 0.1  # Dropout on embeddings, residual branches, the scorer.
  c.model.attention_dropout_rate = 0.1  # Dropout on attention probabilities.
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "reclor"  # reclor, logiqa, logiqa2 or logic_mc (the generated set).
  # Directory of the split files (ReClor: train/val/test.json; LogiQA: Train/Eval/Test.txt;
  # LogiQA 2.0: train/dev/test.txt); "" with logic_mc = generate into workdir/data/logic_mc.
  c.data.data_dir = ""
  c.data.logic_mc_train = 4000  # logic_mc: training questions generated.
  c.data.logic_mc_validation = 500  # logic_mc: validation questions generated.
  c.data.logic_mc_test = 500  # logic_mc: test questions generated.
  c.data.logic_mc_seed = 0  # logic_mc: the benchmark's seed (not the training seed).
  c.data.max_train_examples = 0  # > 0 keeps only the first this many training questions.
  c.data.max_eval_examples = 0  # > 0 evaluates only the first this many of each eval split.
  # tokenizer.json or a directory with it or vocab.json + merges.txt; "" = the init
  # source's (the pretraining workdir's or the checkpoint's). Required from scratch.
  c.data.tokenizer_path = ""
  c.data.max_len = 256  # Tokens per (context, option) sequence; the context is cut first.
  c.data.batch_size = 24  # Questions per global batch (x4 sequences); divisible by data*fsdp.
  c.data.eval_batch_size = 0  # Questions per eval batch (no gradients: larger); 0 = 4 x batch_size.
  # Length buckets: a batch is padded to the smallest multiple of this (or max_len) that
  # holds its questions, so jit compiles a few shapes; 0 = pad every batch to max_len.
  c.data.bucket_multiple = 64

  c.optimizer = optimizer_config(
    name="adamw",
    learning_rate=1e-5,
    schedule="linear",
    warmup_steps=0,
    weight_decay=0.01,
    apollo_weight_decay_type="decoupled",
  )
  c.optimizer.warmup_fraction = 0.1  # > 0: warmup = this share of the updates (else warmup_steps).

  c.mesh = mesh_config()
  return c


def _quickstart(c: ml_collections.ConfigDict) -> None:
  # The generated logic set after the quickstart pretraining (runs/pretrain_quickstart,
  # 128 positions: hence max_len 128, which cuts long contexts; see the flagfile).
  c.init_from_pretrain = "runs/pretrain_quickstart"
  c.data.dataset = "logic_mc"
  c.data.logic_mc_train, c.data.logic_mc_validation, c.data.logic_mc_test = 2000, 300, 300
  c.data.max_len = 128
  c.data.bucket_multiple = 32  # 64 / 96 / 128: the generated pairs are 60-150 tokens.
  c.data.batch_size = 16
  c.data.eval_batch_size = 64
  c.train_steps = 375  # 3 epochs of 2,000 questions.
  c.log_every = 25
  c.eval_every = 125
  c.checkpoint_every = 125
  c.optimizer.learning_rate = 1e-3  # A tiny encoder wants a far larger lr than RoBERTa.
  c.optimizer.weight_decay = 0.01


def _minilm(c: ml_collections.ConfigDict) -> None:
  # The generated logic set after the MiniLM continued pretraining (runs/pretrain_minilm:
  # its WordPiece, BERT pairs with token types 0 / 1, 512 positions). 128 tokens hold 99%
  # of the (context, question + option) pairs; a new pooler + scorer.
  c.init_from_pretrain = "runs/pretrain_minilm"
  c.data.dataset = "logic_mc"
  c.data.logic_mc_train, c.data.logic_mc_validation, c.data.logic_mc_test = 2000, 300, 300
  c.data.max_len = 128
  c.data.bucket_multiple = 32  # 64 / 96 / 128: the generated pairs are 60-150 tokens.
  c.data.batch_size = 8
  c.data.eval_batch_size = 64
  c.train_steps = 250  # One epoch of 2,000 questions.
  c.log_every = 25
  c.eval_every = 125
  c.checkpoint_every = 125
  c.optimizer.learning_rate = 1e-4  # A small BERT's usual fine-tuning rate.


def _benchmark(c: ml_collections.ConfigDict, dataset: str, size: str) -> None:
  c.data.dataset = dataset
  c.data.data_dir = f"/data/{dataset}"
  c.init_from = f"/data/roberta-{size}"
  c.model.dtype = "bfloat16"
  c.data.max_len = 256
  c.data.batch_size = 24
  c.data.eval_batch_size = 96
  c.data.bucket_multiple = 64  # 64 / 128 / 192 / 256: four compiled shapes.
  c.num_epochs = 10.0
  c.log_every = 50
  c.checkpoint_every = 1000
  c.optimizer.learning_rate = 1e-5 if size == "large" else 2e-5
  c.optimizer.warmup_fraction = 0.1
  c.optimizer.weight_decay = 0.01
  c.mesh.data = -1
  c.mesh.fsdp = 1


def get_config(preset: str = "quickstart") -> ml_collections.ConfigDict:
  """The config of `preset` (see the module docstring)."""
  preset = preset or "quickstart"
  if preset not in PRESETS:
    raise ValueError(f"Unknown finetune preset {preset!r}; choose from {PRESETS}.")
  c = _base_config()
  if preset == "quickstart":
    _quickstart(c)
  elif preset == "minilm":
    _minilm(c)
  else:
    dataset, size = preset.split("_")
    _benchmark(c, dataset, size)
  return c
