"""APOLLO continued pretraining: S-MLM + lambda * E-CLS, resumable from a workdir.

`train_and_evaluate(config, workdir)` is the whole job (config:
`apollo/lm/configs/pretrain.py`; entry point: `experiments/pretrain.py`):

1. Data: the selected-sentence shards of `config.data.shard_dir`, or, when it is
   empty, the embedded generated corpus selected into `workdir/data/sentences`
   (idempotent: a restarted job reuses or resumes it); a tokenizer from
   `config.data.tokenizer_path`, else the `init_from` checkpoint's own (WordPiece
   for BERT / MiniLM, byte-level BPE for RoBERTa; no BPE is trained), else a BPE
   trained once into `workdir/data/tokenizer`.
2. Mesh ('data', 'fsdp', 'tensor') from `config.mesh`, with **Auto** axis types: the
   forward needs no `auto_axes` wrapper, the compiler places the collectives from
   the parameters' and the batch's shardings (which `jax.jit`'s `out_shardings` pin).
3. State `{params, opt_state, step, rng}`: params are a pure dict
   (`nnx.to_pure_dict`) created directly in their shards (`create_sharded_model`,
   or `apollo.models.load(init_from, mesh=...)`), the optimizer state too
   (`apollo.optim.init_sharded`); `step` counts updates, `rng` is the base dropout
   key (folded with the step, so dropout is a pure function of the state).
4. `train_step` (module level, pure, jitted once with the state donated) and
   `eval_step`; metrics come back as sums and counts and are reduced on the host.
5. Checkpoints (`apollo.common.checkpoint`) every `checkpoint_every` steps, at the
   end and on SIGTERM, holding the state and the train iterator's state, so a
   resumed run sees exactly the batches an uninterrupted one would have seen.
   A non-finite loss raises `NonFiniteLossError` before anything of that step is
   saved; earlier checkpoints are left intact (in-flight saves are waited for).

Continued pretraining of a real encoder (`config.init_from`, the paper's setting):
any name or path `apollo.models.load` accepts (`minilm-l6`, a local HF BERT or
RoBERTa directory). The model config comes from the checkpoint, the tokenizer is
its own, and the heads it lacks (MiniLM has no MLM head; no checkpoint has an E-CLS
head) are initialised from `seed`; the MLM decoder is the word embedding (tied).
`workdir/init_report.json` and the log list what was loaded, kept fresh and left
unused. The checkpoint is imported only when the workdir has no checkpoint of its
own: a resumed run restores its weights and never re-imports.

Loss (weights are OUR documented defaults): the S-MLM cross-entropy averaged over
the target tokens of the batch, plus `ecls_weight` times the E-CLS cross-entropy
averaged over the (non-padding) examples. `config.objective='mlm'` is the plain
MLM baseline instead: random 15% token masking over all tokens, no E-CLS
(weight 0; see `data.pipeline`), on the same sentences. S-MLM logits are computed only at the
`mlm_max_predictions` target positions of each row (no [B, L, vocab] matmul).

Logged (metrics.jsonl, TensorBoard, the progress line): loss, mlm_loss, mlm_acc,
ecls_loss, ecls_acc, learning_rate, grad_norm (before clipping), update_norm,
tokens_per_s (padded tokens, B * L, per second), mlm_dropped_targets; eval:
mlm_loss, mlm_acc, ecls_loss, ecls_acc and E-CLS accuracy per perturbation kind.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
  The trainer's shape follows the Flax examples (github.com/google/flax/tree/main/examples);
  the model is HF transformers' RoBERTa / BERT (`apollo.models.roberta`, `apollo.models.bert`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import config as config_lib
from apollo.common import mesh as mesh_lib
from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.lm.data import (
  generated_corpus,
  negatives,
  pipeline,
  selection,
  tagging,
  text_sources,
)
from apollo.models import hf, registry
from apollo.models import tokenizer as tokenizer_lib
from apollo.models.bert import params as bert_params
from apollo.models.roberta import model as model_lib
from apollo.models.roberta import params as roberta_params

# Model fields that decide parameter shapes: a workdir may only be resumed with these.
SHAPE_FIELDS = (
  "vocab_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "intermediate_size",
  "max_position_embeddings",
  "type_vocab_size",
  "num_ecls_labels",
)
# Keys the device needs; the rest of a batch stays on the host.
_DEVICE_KEYS = (
  "input_ids",
  "attention_mask",
  "mlm_labels",
  "mlm_weights",
  "ecls_label",
  "ecls_perturbation",
  "example_mask",
)
_VOCAB_MULTIPLE = 128  # A trained tokenizer's vocabulary is padded up to this.


# -----------------------------------------------------------------------------
# Loss and steps (pure functions)
# -----------------------------------------------------------------------------


def cross_entropy_with_integer_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``optax.softmax_cross_entropy_with_integer_labels`` without its gather.

  The label's logit is picked by comparing with an iota, so the gradient is one
  elementwise pass over [..., vocab]; optax's `take_along_axis` becomes a scatter
  into a zero [..., vocab] array in the backward pass, slow on XLA's CPU backend.
  """
  is_label = jnp.arange(logits.shape[-1]) == labels[..., None]
  label_logits = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - label_logits


def objective_sums(
  model: model_lib.PretrainingModel,
  batch: Mapping[str, jax.Array],
  max_predictions: int,
  *,
  deterministic: bool = True,
  rngs: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Runs the model once; returns sums and counts of both objectives (float32).

  S-MLM logits are computed at `max_predictions` positions per row: the target
  positions first (in order), then filler positions of weight 0. Targets beyond
  `max_predictions` in a row are counted in `mlm_dropped_targets`.
  """
  weights = batch["mlm_weights"].astype(jnp.float32)
  length = weights.shape[1]
  num = length if max_predictions <= 0 else min(max_predictions, length)
  # Targets score in (1, 2], the rest in (-1, 0]; earlier positions first.
  score = 2.0 * weights - jnp.arange(length, dtype=jnp.float32) / length
  _, positions = jax.lax.top_k(score, num)
  out = model(
    batch["input_ids"],
    batch["attention_mask"],
    mlm_positions=positions,
    deterministic=deterministic,
    rngs=rngs,
  )

  labels = jnp.take_along_axis(batch["mlm_labels"], positions, axis=1)
  mlm_w = jnp.take_along_axis(weights, positions, axis=1)
  labels = jnp.where(mlm_w > 0, labels, 0)  # -100 filler -> any valid id, weight 0.
  mlm_logits = out.mlm_logits.astype(jnp.float32)
  mlm_nll = cross_entropy_with_integer_labels(mlm_logits, labels)
  mlm_hit = (jnp.argmax(mlm_logits, -1) == labels).astype(jnp.float32)

  example_w = batch["example_mask"].astype(jnp.float32)
  ecls_logits = out.ecls_logits.astype(jnp.float32)
  ecls_nll = optax.softmax_cross_entropy_with_integer_labels(ecls_logits, batch["ecls_label"])
  ecls_hit = (jnp.argmax(ecls_logits, -1) == batch["ecls_label"]).astype(jnp.float32)
  kinds = jax.nn.one_hot(batch["ecls_perturbation"], len(negatives.PERTURBATION_IDS))
  kinds = kinds * example_w[:, None]
  return dict(
    mlm_loss_sum=jnp.sum(mlm_nll * mlm_w),
    mlm_correct=jnp.sum(mlm_hit * mlm_w),
    mlm_count=jnp.sum(mlm_w),
    mlm_dropped_targets=jnp.sum(weights) - jnp.sum(mlm_w),
    ecls_loss_sum=jnp.sum(ecls_nll * example_w),
    ecls_correct=jnp.sum(ecls_hit * example_w),
    ecls_count=jnp.sum(example_w),
    ecls_correct_by_kind=jnp.sum(kinds * ecls_hit[:, None], axis=0),
    ecls_count_by_kind=jnp.sum(kinds, axis=0),
  )


def total_loss(sums: Mapping[str, jax.Array], ecls_weight: float) -> jax.Array:
  """Mean S-MLM cross-entropy over targets + ecls_weight * mean E-CLS cross-entropy."""
  mlm = sums["mlm_loss_sum"] / jnp.maximum(sums["mlm_count"], 1.0)
  ecls = sums["ecls_loss_sum"] / jnp.maximum(sums["ecls_count"], 1.0)
  return mlm + ecls_weight * ecls


def train_step(
  state: dict[str, Any],
  batch: Mapping[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  ecls_weight: float,
  max_predictions: int,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One update. A pure function of (state, batch); dropout key = fold_in(rng, step).

  Args:
    state: {'params': pure dict, 'opt_state', 'step': int32, 'rng': uint32 key}.
    batch: device arrays of `data.pipeline` (keys in `_DEVICE_KEYS`).
    graphdef, optimizer, lr_schedule, ecls_weight, max_predictions: static, bound
      with functools.partial before `jax.jit`.

  Returns:
    (new state, metrics): objective sums and counts, plus loss, grad_norm (before
    clipping), update_norm and the learning rate of this update.
  """
  step = state["step"]
  dropout_key = jax.random.fold_in(state["rng"], step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    sums = objective_sums(model, batch, max_predictions, deterministic=False, rngs=dropout_key)
    return total_loss(sums, ecls_weight), sums

  return train_lib.gradient_step(state, loss_fn, optimizer, lr_schedule)


def eval_step(
  params: Any, batch: Mapping[str, jax.Array], *, graphdef: nnx.GraphDef, max_predictions: int
) -> dict[str, jax.Array]:
  """Objective sums and counts on one held-out batch (no dropout)."""
  return objective_sums(nnx.merge(graphdef, params), batch, max_predictions)


# -----------------------------------------------------------------------------
# Host-side metric reduction
# -----------------------------------------------------------------------------


class _MetricAccumulator:
  """Adds per-step sums on the host; `summary()` turns them into means."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.sums: dict[str, np.ndarray] = {}
    self.steps = 0
    self.last: dict[str, float] = {}

  def add(self, metrics: Mapping[str, np.ndarray]) -> None:
    for key, value in metrics.items():
      self.sums[key] = self.sums.get(key, 0.0) + np.asarray(value, np.float64)
    self.last = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    self.steps += 1

  def summary(self) -> dict[str, float]:
    s, out = self.sums, {}
    if not s:
      return out
    out["mlm_loss"] = float(s["mlm_loss_sum"] / max(s["mlm_count"], 1.0))
    out["mlm_acc"] = float(s["mlm_correct"] / max(s["mlm_count"], 1.0))
    out["ecls_loss"] = float(s["ecls_loss_sum"] / max(s["ecls_count"], 1.0))
    out["ecls_acc"] = float(s["ecls_correct"] / max(s["ecls_count"], 1.0))
    out["mlm_targets"] = float(s["mlm_count"])
    out["mlm_dropped_targets"] = float(s["mlm_dropped_targets"])
    for name, index in negatives.PERTURBATION_IDS.items():
      count = float(s["ecls_count_by_kind"][index])
      if count:
        label = "original" if name == "none" else name
        out[f"ecls_acc_{label}"] = float(s["ecls_correct_by_kind"][index]) / count
    for key in ("loss", "grad_norm", "update_norm"):
      if key in s:
        out[key] = float(s[key] / self.steps)
    if "learning_rate" in self.last:
      out["learning_rate"] = self.last["learning_rate"]
    return out


# -----------------------------------------------------------------------------
# The checkpoint to continue from (`init_from`)
# -----------------------------------------------------------------------------

INIT_REPORT = "init_report.json"  # What the import loaded, initialised fresh, left unused.


@dataclasses.dataclass(frozen=True)
class InitCheckpoint:
  """The checkpoint named by `--config.init_from`, resolved to a local HF directory."""

  name: str  # As configured: a registered name (minilm-l6) or a path.
  hf_dir: str  # The local Hugging Face directory behind it.
  model_type: str  # 'bert' or 'roberta'.

  @property
  def flag(self) -> str:
    return f"--config.init_from={self.name}"

  def encoder_config(self, **overrides: Any) -> model_lib.EncoderConfig:
    """The encoder config of its config.json (no weights read)."""
    params = bert_params if self.model_type == "bert" else roberta_params
    return params.config_from_hf(self.hf_dir, **overrides)

  def load(
    self, head: str, *, mesh: jax.sharding.Mesh, seed: int, **overrides: Any
  ) -> registry.LoadedModel:
    """The model with `head` ('pretraining' / 'multiple_choice'), created in its shards."""
    return registry.load(self.hf_dir, head=head, mesh=mesh, seed=seed, **overrides)


def resolve_init_from(init_from: str) -> InitCheckpoint | None:
  """The encoder checkpoint behind `init_from` (None for ""); unzips a named one once.

  Raises:
    ValueError / FileNotFoundError: naming the flag: an unknown name, a path that is
      not a HF directory, a package that is not installed, or a decoder checkpoint.
  """
  if not init_from:
    return None
  flag = f"--config.init_from={init_from}"
  try:
    hf_dir = registry.resolve(init_from)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"{flag}: {e}") from e
  model_type = hf.read_config(hf_dir).get("model_type")
  if model_type not in registry.ENCODER_TYPES:
    raise ValueError(
      f"{flag}: {hf_dir} holds model_type={model_type!r}; APOLLO continues an encoder "
      f"({', '.join(registry.ENCODER_TYPES)})."
    )
  return InitCheckpoint(init_from, str(hf_dir), model_type)


def import_checkpoint(
  checkpoint: InitCheckpoint,
  head: str,
  *,
  mesh: jax.sharding.Mesh,
  seed: int,
  model_config: model_lib.EncoderConfig,
  workdir: str | None,
  **overrides: Any,
) -> Any:
  """Pure-dict params of `head` from the checkpoint; reports the fresh heads.

  The report goes to the log and, when `workdir` is given, to `workdir/init_report.json`.

  Raises:
    ValueError: if the imported model's config is not `model_config` (the shapes
      the state was set up for).
  """
  loaded = checkpoint.load(head, mesh=mesh, seed=seed, **overrides)
  if loaded.model.config != model_config:
    raise ValueError(
      f"{checkpoint.flag}: the imported config {loaded.model.config} differs from the "
      f"configured {model_config}."
    )
  report = loaded.report  # Its summary names the tensors kept at their fresh init.
  logging.info("Imported %s (%s): %s", checkpoint.name, checkpoint.hf_dir, report.summary())
  if workdir is not None and train_lib.is_main():
    train_lib.write_json_atomically(
      os.path.join(workdir, INIT_REPORT),
      dict(
        init_from=checkpoint.name,
        hf_dir=checkpoint.hf_dir,
        model_type=checkpoint.model_type,
        head=head,
        source=report.source,
        seed=seed,
        loaded=len(report.loaded),
        fresh=report.missing,
        unused=report.unused,
      ),
    )
  return nnx.to_pure_dict(nnx.state(loaded.model))


# -----------------------------------------------------------------------------
# Set-up: data, tokenizer, model config, workdir checks
# -----------------------------------------------------------------------------


def tokenizer_path_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the run's tokenizer is: the configured one, the checkpoint's own, or trained."""
  if config.data.tokenizer_path:
    return config.data.tokenizer_path
  checkpoint = resolve_init_from(config.get("init_from", ""))  # Older workdirs lack it.
  if checkpoint is not None:
    return checkpoint.hf_dir
  return os.path.join(workdir, "data", "tokenizer", "tokenizer.json")


def prepare_data(config: ml_collections.ConfigDict, workdir: str):
  """(shard_dir, tokenizer): prepared inside `workdir/data` when the config says so.

  The tokenizer is `data.tokenizer_path`, else the `init_from` checkpoint's own,
  else a byte-level BPE trained once on the selected sentences.

  Raises:
    ValueError: unknown tagger, or an `init_from` that is no encoder checkpoint.
    FileNotFoundError: a shard dir, tokenizer path or checkpoint that does not
      exist (named).
  """
  d = config.data
  if d.tagger not in tagging.TAGGERS:
    raise ValueError(
      f"Unknown --config.data.tagger={d.tagger!r}; expected one of {tagging.TAGGERS}."
    )
  checkpoint = resolve_init_from(config.init_from)  # A bad name fails before any work.
  if d.shard_dir:
    shard_dir = d.shard_dir
    if not selection.list_shards(shard_dir):
      raise FileNotFoundError(
        f"--config.data.shard_dir={shard_dir} holds no sentences*.array_record shards; "
        f"prepare it with `python -m experiments.select_sentences --out_dir={shard_dir}`."
      )
  else:
    shard_dir = os.path.join(workdir, "data", "sentences")
    if train_lib.is_main():
      source = text_sources.GeneratedSource(
        generated_corpus.GeneratedCorpusConfig(
          num_documents=d.generated_documents, seed=d.generated_seed
        )
      )
      counts = selection.run_selection(
        source, shard_dir, selection.SelectionConfig(num_workers=d.selection_workers)
      )
      logging.info(
        "Generated corpus: %d documents, %d logic sentences in %s.",
        counts.documents_read,
        counts.sentences_kept,
        shard_dir,
      )
    train_lib.sync("apollo_pretrain_selection")

  tokenizer_path = tokenizer_path_of(config, workdir)
  if d.tokenizer_path or checkpoint is not None:
    try:
      tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
    except FileNotFoundError as e:
      flag = (
        f"--config.data.tokenizer_path={d.tokenizer_path}" if d.tokenizer_path else checkpoint.flag
      )
      raise FileNotFoundError(f"{flag}: {e}") from e
  else:
    tokenizer_dir = os.path.dirname(tokenizer_path)
    if train_lib.is_main() and not os.path.isfile(tokenizer_path):
      # Train into a temporary directory and rename: a crash never leaves half a tokenizer.
      tmp = tokenizer_dir + ".tmp"
      tokenizer_lib.train_bpe_tokenizer(
        (r["text"] for r in selection.iter_records(shard_dir)),
        tmp,
        vocab_size=d.tokenizer_vocab_size,
      )
      os.replace(tmp, tokenizer_dir)
    train_lib.sync("apollo_pretrain_tokenizer")
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  special = tokenizer_lib.special_ids(tokenizer)  # A missing special token is an error naming it.
  logging.info(
    "Tokenizer %s: %s family, %d tokens.",
    tokenizer_path,
    special.family,
    tokenizer.get_vocab_size(),
  )
  return shard_dir, tokenizer


def model_config_from(
  config: ml_collections.ConfigDict, vocab_size: int
) -> model_lib.EncoderConfig:
  """The encoder config: the `init_from` checkpoint's config.json, or the preset + overrides."""
  m = config.model
  common = dict(
    hidden_dropout_rate=m.hidden_dropout_rate,
    attention_dropout_rate=m.attention_dropout_rate,
    dtype=m.dtype,
  )
  checkpoint = resolve_init_from(config.init_from)
  if checkpoint is not None:
    model_config = checkpoint.encoder_config(**common)
    if vocab_size > model_config.vocab_size:
      raise ValueError(
        f"The tokenizer has {vocab_size} tokens but {checkpoint.flag} ({checkpoint.hf_dir}) "
        f"only {model_config.vocab_size} embeddings."
      )
  else:
    overrides = {
      k: m[k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if m[k] > 0
    }
    padded = -(-vocab_size // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    model_config = model_lib.get_config(m.preset, vocab_size=padded, **overrides, **common)
  if config.data.max_len > model_config.max_sequence_length:
    raise ValueError(
      f"--config.data.max_len={config.data.max_len} exceeds the model's "
      f"{model_config.max_sequence_length} positions."
    )
  return model_config


# -----------------------------------------------------------------------------
# State creation
# -----------------------------------------------------------------------------


def make_setup(
  config: ml_collections.ConfigDict, model_config: model_lib.EncoderConfig, mesh: jax.sharding.Mesh
) -> train_lib.TrainSetup:
  """Shapes and shardings of the state, computed abstractly (no memory used)."""
  return train_lib.make_setup(
    lambda: model_lib.PretrainingModel(model_config, rngs=nnx.Rngs(config.seed)),
    model_config,
    config.optimizer,
    config.train_steps,
    mesh,
    model_lib.LOGICAL_AXIS_RULES,
  )


def init_state(
  config: ml_collections.ConfigDict, setup: train_lib.TrainSetup, workdir: str | None = None
) -> dict[str, Any]:
  """A fresh state, every array created directly in its shards.

  With `init_from`, the checkpoint's weights and fresh heads (reported in the log
  and in `workdir/init_report.json`); else a random init of `setup.model_config`.
  """
  checkpoint = resolve_init_from(config.init_from)
  if checkpoint is not None:
    m = config.model
    params = import_checkpoint(
      checkpoint,
      "pretraining",
      mesh=setup.mesh,
      seed=config.seed,
      model_config=setup.model_config,
      workdir=workdir,
      hidden_dropout_rate=m.hidden_dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate,
      dtype=m.dtype,
    )
  else:
    model = model_lib.create_sharded_model(
      lambda: model_lib.PretrainingModel(setup.model_config, rngs=nnx.Rngs(config.seed)), setup.mesh
    )
    params = nnx.to_pure_dict(nnx.state(model))
  return train_lib.new_train_state(
    params,
    setup.optimizer,
    setup.mesh,
    setup.state_shardings,
    config.seed,
  )


# -----------------------------------------------------------------------------
# The job
# -----------------------------------------------------------------------------


def effective_ecls_weight(config: ml_collections.ConfigDict) -> float:
  """lambda of the loss: `config.ecls_weight`, or 0 for the plain-MLM baseline."""
  return 0.0 if config.get("objective", "apollo") == "mlm" else float(config.ecls_weight)


def _data_config(config: ml_collections.ConfigDict) -> pipeline.PretrainDataConfig:
  d = config.data
  objective = config.get("objective", "apollo")
  if objective not in pipeline.OBJECTIVES:
    raise ValueError(
      f"Unknown --config.objective={objective!r}; choose from {pipeline.OBJECTIVES}."
    )
  hosts = jax.process_count()
  if d.batch_size % hosts:
    raise ValueError(
      f"--config.data.batch_size={d.batch_size} is not divisible by the {hosts} processes."
    )
  return pipeline.PretrainDataConfig(
    max_len=d.max_len,
    batch_size=d.batch_size // hosts,
    seed=config.seed,
    mask_ratio=d.mask_ratio,
    mask_pos_prefixes=tuple(d.mask_pos_prefixes),
    mask_keywords=d.mask_keywords,
    perturbations=tuple(d.perturbations),
    mlm_on_perturbed=d.mlm_on_perturbed,
    tagger=d.tagger,
    eval_fraction=d.eval_fraction,
    read_threads=d.read_threads,
    num_workers=d.num_workers,
    objective=objective,
  )


def _device_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return mesh_lib.shard_batch({k: batch[k] for k in _DEVICE_KEYS}, mesh)


def evaluate(
  config, setup: train_lib.TrainSetup, eval_fn, params, shard_dir, tokenizer, data_config
) -> dict[str, float]:
  """Mean objectives and accuracies over the held-out split (or `eval_batches` of it)."""
  dataset = pipeline.make_pretrain_dataset(
    shard_dir,
    tokenizer,
    data_config,
    split="eval",
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )
  acc = _MetricAccumulator()
  for i, batch in enumerate(dataset):
    if config.eval_batches and i >= config.eval_batches:
      break
    acc.add(jax.device_get(eval_fn(params, _device_batch(batch, setup.mesh))))
  if not acc.steps:
    raise ValueError(
      f"The held-out split of {shard_dir} is empty: raise "
      f"--config.data.eval_fraction (now {config.data.eval_fraction})."
    )
  out = acc.summary()
  out["loss"] = out["mlm_loss"] + effective_ecls_weight(config) * out["ecls_loss"]
  return out


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  on_step: Callable[[int], None] | None = None,
  start_over: bool = False,
) -> dict[str, Any]:
  """Trains (or resumes) in `workdir` until `config.train_steps`; evaluates on the way.

  Args:
    config: see `apollo/lm/configs/pretrain.py`; checked first (`check_config`).
    workdir: checkpoints/, metrics.jsonl, tensorboard/, config.json and (for the
      generated corpus) data/ go here; a rerun resumes from it.
    on_step: called with the step number after each update is dispatched (tests
      use it to send SIGTERM mid-run).
    start_over: if no checkpoint in the workdir restores (a `CheckpointError`
      otherwise, on every rerun), move the damaged ones aside and start from step 0.

  Returns:
    {'step': last step, 'preempted': bool, 'train': last train summary,
     'eval': last eval summary}.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; nothing of that step is saved and
      the earlier checkpoints are complete.
    ValueError / FileNotFoundError: bad input, naming the flag or file.
    ConfigError: an unknown field or a value that cannot work, before any work.
    CheckpointError: checkpoints exist but none restores (and not `start_over`).
  """
  config_lib.check_config(config, pretrain_configs.get_config())
  mesh_lib.initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  train_lib.build_optimizer(config.optimizer, config.train_steps)  # Bad names fail before any work.
  _data_config(config)
  shard_dir, tokenizer = prepare_data(config, workdir)
  model_config = model_config_from(config, tokenizer.get_vocab_size())
  train_lib.check_saved_config(workdir, model_config, SHAPE_FIELDS)
  mesh = mesh_lib.make_mesh(
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, axis_type="auto"
  )
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % batch_shards:
    raise ValueError(
      f"--config.data.batch_size={config.data.batch_size} is not divisible "
      f"by data*fsdp={batch_shards}."
    )
  logging.info("Mesh %s; model %s", mesh_lib.describe(mesh), model_config)
  data_config = _data_config(config)
  setup = make_setup(config, model_config, mesh)

  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints
  )
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    train_lib.check_checkpoint_shapes(ckpt, setup.abstract_state)
    # Only once the workdir is known to fit.
    train_lib.write_config(
      workdir,
      config,
      model_config,
      init=dict(init_from=config.init_from, tokenizer=tokenizer_path_of(config, workdir)),
    )
    # The checkpoint is imported only for a new run: a resume restores its own weights.
    state, start_step, data = train_lib.resume_or_init(
      ckpt,
      setup.abstract_state,
      lambda: init_state(config, setup, workdir),
      required_data=["train_iterator"],  # Without it the resume would see other data.
      start_over=start_over,
    )
    train_it = iter(
      pipeline.make_pretrain_dataset(
        shard_dir,
        tokenizer,
        data_config,
        split="train",
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
      )
    )
    if "train_iterator" in data:
      train_it.set_state(data["train_iterator"])
    return _train_loop(
      config,
      setup,
      state,
      start_step,
      train_it,
      ckpt,
      writer,
      shard_dir,
      tokenizer,
      data_config,
      on_step,
    )
  finally:
    ckpt.close()  # Waits for in-flight saves: earlier checkpoints are complete.
    writer.close()


def _train_loop(
  config,
  setup: train_lib.TrainSetup,
  state,
  start_step,
  train_it,
  ckpt,
  writer,
  shard_dir,
  tokenizer,
  data_config,
  on_step,
) -> dict[str, Any]:
  step_fn = train_lib.jit_train_step(
    functools.partial(
      train_step,
      graphdef=setup.graphdef,
      optimizer=setup.optimizer,
      lr_schedule=setup.lr_schedule,
      ecls_weight=effective_ecls_weight(config),
      max_predictions=config.mlm_max_predictions,
    ),
    setup,
  )
  eval_fn = jax.jit(
    functools.partial(
      eval_step, graphdef=setup.graphdef, max_predictions=config.mlm_max_predictions
    )
  )
  log = train_lib.TrainLog(
    writer,
    _MetricAccumulator,
    start_step=start_step,
    total_steps=config.train_steps,
    every=config.log_every,
    units_per_step=config.data.batch_size * config.data.max_len,
    unit="tokens",
  )
  result: dict[str, Any] = dict(step=start_step, preempted=False, train={}, eval={})

  def next_batch(step):
    batch = next(train_it)
    # Saved with this step: the data position after its batch.
    return _device_batch(batch, setup.mesh), dict(train_iterator=train_it.get_state(), step=step)

  def evaluate_now(step, params):
    result["eval"] = evaluate(config, setup, eval_fn, params, shard_dir, tokenizer, data_config)
    writer.write(step, result["eval"], split="eval")
    logging.info(
      "eval at step %d: %s", step, " | ".join(f"{k} {v:.4g}" for k, v in result["eval"].items())
    )
    log.restart_clock()  # Throughput counts training time only.

  _, result["step"], result["preempted"] = train_lib.train_loop(
    state,
    mesh=setup.mesh,
    step_fn=step_fn,
    next_batch=next_batch,
    start_step=start_step,
    total_steps=config.train_steps,
    ckpt=ckpt,
    log_step=log,
    log_every=config.log_every,
    checkpoint_every=config.checkpoint_every,
    eval_every=config.eval_every,
    evaluate=evaluate_now,
    on_step=on_step,
  )
  result["train"] = log.last
  return result
