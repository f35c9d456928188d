"""Multiple-choice fine-tuning (ReClor, LogiQA, the generated logic set), resumable.

`train_and_evaluate(config, workdir)` is the whole job (config:
`apollo/lm/configs/finetune.py`; entry point: `experiments/finetune.py`). It
follows `pretrain.py`'s conventions: one mesh ('data', 'fsdp', 'tensor') with
Auto axes, state `{params, opt_state, step, rng}` created in its shards, pure
module-level `train_step` / `eval_step`, checkpoints with the data position,
SIGTERM handling, metrics.jsonl + TensorBoard, a refused workdir when shapes
differ. The optimizer, schedule, weight-decay mask and workdir checks are
`apollo.common.training`'s (shared with pretraining).

The standard recipe (RoBERTa / BERT for multiple choice): each question becomes
`NUM_CHOICES` sequences, the pair (context, second) in the tokenizer family's format
(`SpecialIds.pair`): `<s> context </s></s> second </s>` for RoBERTa, `[CLS] context
[SEP] second [SEP]` with token types 0 / 1 for BERT (passed to the model), with
`second` from `multiple_choice.choice_texts` (question + " " + option, or the option
filling the question's blank); when a pair is longer than `max_len`, the context is
cut first (from its end), then the second text. `MultipleChoiceModel` scores the
pooled first token of each; softmax cross-entropy over the options.

Initialisation (exactly one source, or none):
* `init_from_pretrain`: a workdir of `experiments.pretrain`. Its config.json
  gives the encoder shapes and its tokenizer (the one it was pretrained with: a
  trained BPE, or its own `init_from` checkpoint's), its latest checkpoint the
  encoder weights. The pooler and the scorer are new (the pretraining model has no
  pooler), initialised from `seed`.
* `init_from`: a checkpoint, any name or path `apollo.models.load` accepts
  (`minilm-l6`, a local HF BERT or RoBERTa directory), with its own tokenizer; the
  scorer (and a pooler the checkpoint lacks) are new, listed in
  `workdir/init_report.json`.
* neither: random init of `config.model` (needs `data.tokenizer_path`).
The weights are imported only for a new run; a resume restores its own.

Batches and data order (`TrainOrder`): the training batches are a pure function
of the step. Epoch `e` visits the training questions in `permutation([seed, e])`,
`ceil(N / B)` steps; a short batch is padded with masked rows. With length buckets
(`data.bucket_multiple`: padded lengths are its multiples up to `max_len`), each
batch holds questions of one bucket (the epoch's leftovers share batches padded to
their longest), cut to that bucket's length, so jit compiles one program per
bucket and short questions do not pay for `max_len`; the batches of an epoch are
then shuffled. Evaluation batches (`eval_batch_size` questions) go bucket by bucket.
The checkpoint records the position (`examples_seen`), the split size and the
padded lengths, so a resume continues exactly, and a changed training set or
bucketing is refused.

Evaluation (every `eval_every` steps and at the end) on `eval_splits`:
accuracy per split (where labels exist), ReClor's Test-E / Test-H where the
test labels exist, `predictions_<split>.json` (id, prediction, label, logits
per question), and for ReClor's test split the leaderboard file
`reclor_test_predictions.json` (a list of indices in `id_string` order). At the
end, `results.json` holds the last evaluation and the evaluation at the step of
best validation accuracy.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
  The recipe is HF transformers' `RobertaForMultipleChoice` (the pooled first token,
  one score per option) and its example examples/pytorch/multiple-choice/run_swag.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tokenizers
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import config as config_lib
from apollo.common import mesh as mesh_lib
from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.lm import pretrain
from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.datasets import logic_mc, multiple_choice
from apollo.models import tokenizer as tokenizer_lib
from apollo.models.roberta import model as model_lib

SPLITS = ("train", "validation", "test")
# Dataset name -> (reader, file name of each split).
DATASETS: dict[str, tuple[Callable[..., list], dict[str, str]]] = {
  "reclor": (multiple_choice.read_reclor, logic_mc.RECLOR_FILE_NAMES),
  "logiqa": (
    multiple_choice.read_logiqa,
    {"train": "Train.txt", "validation": "Eval.txt", "test": "Test.txt"},
  ),
  "logiqa2": (
    multiple_choice.read_logiqa2,
    {"train": "train.txt", "validation": "dev.txt", "test": "test.txt"},
  ),
  # The generated logic set (`logic_mc`), in ReClor's files (labels kept on test).
  "logic_mc": (multiple_choice.read_reclor, logic_mc.RECLOR_FILE_NAMES),
}
# Model fields that decide parameter shapes: a workdir may only be resumed with these.
SHAPE_FIELDS = (
  "vocab_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "intermediate_size",
  "max_position_embeddings",
  "type_vocab_size",
)
_DEVICE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "label", "example_mask")
_VOCAB_MULTIPLE = 128  # As pretraining: a trained tokenizer's vocabulary is padded.


# -----------------------------------------------------------------------------
# Tokenisation
# -----------------------------------------------------------------------------


def encode_pair(
  first: Sequence[int], second: Sequence[int], special: tokenizer_lib.SpecialIds, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """A (first, second) pair in the family's format (`SpecialIds.pair`), padded to `max_len`.

  RoBERTa: `<s> first </s></s> second </s> <pad>...`, token types all 0; BERT:
  `[CLS] first [SEP] second [SEP] [PAD]...`, token types 0 up to the first [SEP],
  1 after it (0 on padding). Too long: `first` (the context) is cut from its end
  first; if `second` alone does not fit, it is cut too and `first` is dropped.

  Returns:
    (input_ids, token_type_ids, attention_mask, truncated); arrays [max_len] int32.
  """
  budget = max_len - special.pair_overhead
  if budget < 1:
    raise ValueError(
      f"max_len={max_len} leaves no room for text ({special.pair_overhead} special tokens)."
    )
  first, second = list(first), list(second)
  truncated = len(first) + len(second) > budget
  second = second[:budget]
  first = first[: budget - len(second)]
  ids, types = special.pair(first, second)
  input_ids = np.full(max_len, special.pad, np.int32)
  input_ids[: len(ids)] = ids
  token_type_ids = np.zeros(max_len, np.int32)
  token_type_ids[: len(types)] = types
  mask = np.zeros(max_len, np.int32)
  mask[: len(ids)] = 1
  return input_ids, token_type_ids, mask, truncated


@dataclasses.dataclass
class EncodedSplit:
  """One split, tokenised: arrays over questions, plus their ids."""

  ids: list[str]
  input_ids: np.ndarray  # [N, C, L] int32.
  token_type_ids: np.ndarray  # [N, C, L] int32; BERT's segments (0 / 1), RoBERTa's all 0.
  attention_mask: np.ndarray  # [N, C, L] int32.
  label: np.ndarray  # [N] int32; -1 where the split hides the label.
  truncated: int  # Sequences (of N * C) that had to be cut.

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def has_labels(self) -> bool:
    return bool(len(self.label)) and bool(np.all(self.label >= 0))

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """[N] int: each question's longest sequence (of its options), special tokens included."""
    return self.attention_mask.sum(-1).max(-1) if len(self) else np.zeros(0, np.int64)

  def rows(self, index: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
    """The model inputs (cut to `length` tokens, which must hold every real one) of `index`."""
    cut = slice(None, length)
    return dict(
      input_ids=self.input_ids[index, :, cut],
      token_type_ids=self.token_type_ids[index, :, cut],
      attention_mask=self.attention_mask[index, :, cut],
      label=self.label[index],
    )


def encode_examples(
  examples: Sequence[Mapping[str, Any]], tokenizer: tokenizers.Tokenizer, max_len: int
) -> EncodedSplit:
  """Reader examples -> `EncodedSplit` ([N, NUM_CHOICES, max_len] arrays)."""
  special = tokenizer_lib.special_ids(tokenizer)
  pairs = [multiple_choice.choice_texts(e) for e in examples]
  texts = sorted({t for ps in pairs for pair in ps for t in pair})
  encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
  token_ids = {t: e.ids for t, e in zip(texts, encoded)}
  n = len(examples)
  shape = (n, multiple_choice.NUM_CHOICES, max_len)
  input_ids, token_type_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  attention_mask = np.zeros(shape, np.int32)
  truncated = 0
  for i, ps in enumerate(pairs):
    if len(ps) != multiple_choice.NUM_CHOICES:
      raise ValueError(
        f"Example {examples[i]['id']!r} has {len(ps)} options, "
        f"expected {multiple_choice.NUM_CHOICES}."
      )
    for c, (first, second) in enumerate(ps):
      a, b = token_ids[first], token_ids[second]
      input_ids[i, c], token_type_ids[i, c], attention_mask[i, c], cut = encode_pair(
        a, b, special, max_len
      )
      truncated += cut
  label = np.asarray([-1 if e["label"] is None else e["label"] for e in examples], np.int32)
  return EncodedSplit(
    [e["id"] for e in examples], input_ids, token_type_ids, attention_mask, label, truncated
  )


# -----------------------------------------------------------------------------
# Data: files, batches
# -----------------------------------------------------------------------------


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The split files' directory; the generated set is written into the workdir once."""
  d = config.data
  if d.dataset not in DATASETS:
    raise ValueError(f"Unknown --config.data.dataset={d.dataset!r}; choose from {tuple(DATASETS)}.")
  if d.data_dir:
    if not os.path.isdir(d.data_dir):
      raise FileNotFoundError(f"--config.data.data_dir={d.data_dir} does not exist.")
    return d.data_dir
  if d.dataset != "logic_mc":
    raise ValueError(
      f"--config.data.data_dir is required for {d.dataset} (the directory "
      f"with {sorted(DATASETS[d.dataset][1].values())})."
    )
  directory = os.path.join(workdir, "data", "logic_mc")
  if train_lib.is_main() and not os.path.isfile(os.path.join(directory, "test.json")):
    tmp = directory + ".tmp"  # Renamed when complete: a crash never leaves half a set.
    logic_mc.write_reclor_format(
      tmp,
      dict(train=d.logic_mc_train, validation=d.logic_mc_validation, test=d.logic_mc_test),
      seed=d.logic_mc_seed,
    )
    os.replace(tmp, directory)
  train_lib.sync("apollo_finetune_logic_mc")
  return directory


def read_split(
  config: ml_collections.ConfigDict, directory: str, split: str
) -> multiple_choice.Examples:
  """One split's examples; its size is checked (and the reader's odd records reported).

  Raises:
    MissingSplitError: (a FileNotFoundError) no file for the split; the message names
      the names looked for (in any case) and what the directory holds.
  """
  dataset = config.data.dataset
  reader, names = DATASETS[dataset]
  path = multiple_choice.find_split_file(
    directory, dataset, split, names=(names[split],), hint="(--config.data.data_dir)"
  )
  examples = reader(path)
  multiple_choice.check_split_size(dataset, split, len(examples), report=examples)
  return examples


def bucket_lengths(max_len: int, multiple: int) -> tuple[int, ...]:
  """The padded lengths batches use: the multiples of `multiple` below `max_len`, and `max_len`.

  `multiple` <= 0 (or >= max_len) gives `(max_len,)`: every batch padded to the maximum.
  """
  if multiple <= 0 or multiple >= max_len:
    return (max_len,)
  return (*range(multiple, max_len, multiple), max_len)


def _bucket_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """The index of the shortest bucket that holds each length (lengths never exceed the last)."""
  return np.searchsorted(np.asarray(buckets), lengths, side="left")


def _bucket_batches(
  order: np.ndarray, bucket: np.ndarray, buckets: Sequence[int], size: int
) -> list[tuple[np.ndarray, int]]:
  """Questions `order` in batches of `size` by bucket: [(indices, padded length)].

  Each bucket's questions (in `order`) fill whole batches; the leftovers of all buckets,
  shortest first, fill the last ones, each padded to its longest question's bucket: at
  most one batch is short, and at most `len(buckets)` shapes.
  """
  plan, rest = [], []
  for b, length in enumerate(buckets):
    members = order[bucket[order] == b]
    full = len(members) // size * size
    plan += [(members[i : i + size], length) for i in range(0, full, size)]
    rest.append(members[full:])
  rest = np.concatenate(rest)
  for i in range(0, len(rest), size):
    chunk = rest[i : i + size]
    plan.append((chunk, buckets[int(bucket[chunk].max())]))
  return plan


def _padded_rows(
  split: EncodedSplit, index: np.ndarray, length: int, rows: int
) -> dict[str, np.ndarray]:
  """Questions `index` cut to `length` tokens, then padded to `rows` rows with example_mask 0."""
  pad = rows - len(index)
  take = np.concatenate([index, np.zeros(pad, np.int64)]).astype(np.int64)
  example_mask = np.concatenate([np.ones(len(index), np.int32), np.zeros(pad, np.int32)])
  return dict(split.rows(take, length), example_mask=example_mask)


class TrainOrder:
  """Which questions each training step takes, at which padded length: a function of the step.

  Epoch `e` visits the questions in `permutation([seed, e])`, `ceil(N / B)` steps.
  Without length buckets (one bucket, `max_len`) the steps take that order in slices
  of B, the last one short. With buckets, each bucket's questions (in that order) fill
  batches of B; the leftovers of all buckets, shortest first, fill the remaining
  batches, each padded to its longest question's bucket; then the epoch's batches
  are shuffled with `[seed, e, 1]`. A short batch is padded with rows whose
  `example_mask` is 0 (no loss, no gradient), so every question counts once per epoch.
  """

  def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, buckets: Sequence[int]):
    self.num_examples, self.batch_size, self.seed = len(lengths), batch_size, seed
    self.buckets = tuple(int(b) for b in buckets)
    self._bucket = _bucket_of(np.asarray(lengths), self.buckets)
    self.steps_per_epoch = max(1, math.ceil(self.num_examples / batch_size))
    self._plan: tuple[int, list[tuple[np.ndarray, int]]] | None = None

  def epoch(self, epoch: int) -> list[tuple[np.ndarray, int]]:
    """[(question indices, padded length)] of every step of `epoch`, in order."""
    if self._plan is not None and self._plan[0] == epoch:
      return self._plan[1]
    n, size = self.num_examples, self.batch_size
    order = np.random.default_rng([self.seed, epoch]).permutation(n)
    if len(self.buckets) == 1:
      plan = [(order[i : i + size], self.buckets[0]) for i in range(0, n, size)]
    else:
      plan = _bucket_batches(order, self._bucket, self.buckets, size)
      shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(plan))
      plan = [plan[i] for i in shuffle]
    self._plan = (epoch, plan)
    return plan

  def step(self, step: int) -> tuple[np.ndarray, int]:
    """(question indices, padded length) of 0-based `step`."""
    epoch, k = divmod(step, self.steps_per_epoch)
    return self.epoch(epoch)[k]

  def examples_seen(self, steps: int) -> int:
    """Questions visited by the first `steps` steps."""
    epoch, k = divmod(steps, self.steps_per_epoch)
    return epoch * self.num_examples + sum(len(i) for i, _ in self.epoch(epoch)[:k])

  def batch(
    self, split: EncodedSplit, step: int, shard_index: int = 0, shard_count: int = 1
  ) -> dict[str, np.ndarray]:
    """This host's rows of the global batch of 0-based `step` (B rows, padding masked)."""
    index, length = self.step(step)
    batch = _padded_rows(split, index, length, self.batch_size)
    per_host = self.batch_size // shard_count
    return {k: v[shard_index * per_host : (shard_index + 1) * per_host] for k, v in batch.items()}


def train_batch(
  split: EncodedSplit,
  step: int,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
  """This host's part of the global batch of `step` (0-based); see `TrainOrder`.

  `buckets` (from `bucket_lengths`): the padded lengths; None = the split's full length.
  """
  buckets = buckets or (split.input_ids.shape[-1],)
  order = TrainOrder(split.lengths, batch_size, seed, buckets)
  return order.batch(split, step, shard_index, shard_count)


def eval_batches(split: EncodedSplit, batch_size: int, buckets: Sequence[int] | None = None):
  """(batch, question indices) of `batch_size` rows, by length bucket (`_bucket_batches`).

  The one short batch is padded with rows whose `example_mask` is 0; `buckets` None =
  everything at the split's full length, in split order.
  """
  for index, length in eval_plan(split, batch_size, buckets):
    yield _padded_rows(split, index, length, batch_size), index


def eval_plan(
  split: EncodedSplit, batch_size: int, buckets: Sequence[int] | None = None
) -> list[tuple[np.ndarray, int]]:
  """[(question indices, padded length)] of the evaluation batches (`eval_batches`)."""
  buckets = buckets or (split.input_ids.shape[-1],)
  bucket = _bucket_of(split.lengths, buckets)
  return _bucket_batches(np.arange(len(split)), bucket, buckets, batch_size)


def padding_fraction(split: EncodedSplit, padded_lengths: np.ndarray) -> float:
  """The share of the questions' token slots that are padding, at these per-question lengths."""
  slots = float(np.sum(padded_lengths)) * multiple_choice.NUM_CHOICES
  return 1.0 - float(split.attention_mask.sum()) / max(slots, 1.0)


def batching_report(split: EncodedSplit, plan: Sequence[tuple[np.ndarray, int]]) -> dict[str, Any]:
  """Questions per padded length and the padding share, in `plan` and padded to the maximum.

  `plan`: [(question indices, padded length)], e.g. `TrainOrder.epoch(0)` or `eval_plan`.
  """
  padded = np.zeros(len(split), np.int64)
  for index, length in plan:
    padded[index] = length
  values, counts = np.unique(padded, return_counts=True)
  return dict(
    questions_per_length={str(int(v)): int(c) for v, c in zip(values, counts)},
    padding_fraction=padding_fraction(split, padded),
    padding_fraction_at_max_len=padding_fraction(
      split, np.full(len(split), split.input_ids.shape[-1])
    ),
  )


# -----------------------------------------------------------------------------
# Loss and steps (pure functions)
# -----------------------------------------------------------------------------


def choice_sums(
  model: model_lib.MultipleChoiceModel,
  batch: Mapping[str, jax.Array],
  *,
  deterministic: bool = True,
  rngs: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
  """(sums and counts of cross-entropy and hits over labelled rows, logits [B, C])."""
  logits = model(
    batch["input_ids"],
    batch["attention_mask"],
    batch["token_type_ids"],
    deterministic=deterministic,
    rngs=rngs,
  ).astype(jnp.float32)
  labelled = batch["example_mask"].astype(jnp.float32) * (batch["label"] >= 0)
  labels = jnp.maximum(batch["label"], 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return dict(
    loss_sum=jnp.sum(nll * labelled), correct=jnp.sum(hit * labelled), count=jnp.sum(labelled)
  ), logits


def train_step(
  state: dict[str, Any],
  batch: Mapping[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One update on the mean cross-entropy over the batch; dropout key = fold_in(rng, step)."""
  step = state["step"]
  dropout_key = jax.random.fold_in(state["rng"], step)

  def loss_fn(params):
    sums, _ = choice_sums(nnx.merge(graphdef, params), batch, deterministic=False, rngs=dropout_key)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

  return train_lib.gradient_step(state, loss_fn, optimizer, lr_schedule)


def eval_step(
  params: Any, batch: Mapping[str, jax.Array], *, graphdef: nnx.GraphDef
) -> tuple[dict[str, jax.Array], jax.Array]:
  """Sums, counts and logits on one batch (no dropout)."""
  return choice_sums(nnx.merge(graphdef, params), batch)


# -----------------------------------------------------------------------------
# Initialisation sources
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class InitSource:
  """Where the weights and the tokenizer come from (see the module docstring)."""

  kind: str  # "pretrain", "checkpoint" or "scratch".
  path: str  # The pretrain workdir, or the checkpoint as configured; "" for scratch.
  model_config: model_lib.EncoderConfig
  tokenizer: tokenizers.Tokenizer
  tokenizer_path: str
  checkpoint: pretrain.InitCheckpoint | None = None  # kind "checkpoint": its local directory.


def _load_tokenizer(path: str, flag: str) -> tokenizers.Tokenizer:
  try:
    tokenizer = tokenizer_lib.load_tokenizer(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{flag}={path}: {e}") from e
  tokenizer_lib.special_ids(tokenizer)  # A missing special token is an error naming it.
  return tokenizer


def _saved_pretrain_config(pretrain_dir: str) -> dict:
  if not os.path.isdir(pretrain_dir):
    raise FileNotFoundError(
      f"--config.init_from_pretrain={pretrain_dir} does not exist; "
      f"run `python -m experiments.pretrain --workdir={pretrain_dir}` first."
    )
  path = os.path.join(pretrain_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"--config.init_from_pretrain={pretrain_dir} is not a pretraining workdir: no {path}."
    )
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _saved_encoder_config(saved: Mapping[str, Any], **overrides: Any) -> model_lib.EncoderConfig:
  """The encoder config a pretraining workdir recorded (its `model_resolved`)."""
  names = {f.name for f in dataclasses.fields(model_lib.EncoderConfig)}
  resolved = {k: v for k, v in saved["model_resolved"].items() if k in names}
  return model_lib.EncoderConfig(**{**resolved, **overrides})


def resolve_init(config: ml_collections.ConfigDict) -> InitSource:
  """The model config and tokenizer of the configured initialisation source.

  Raises:
    ValueError / FileNotFoundError: naming the flag and the path.
  """
  m = config.model
  common = dict(
    hidden_dropout_rate=m.hidden_dropout_rate,
    attention_dropout_rate=m.attention_dropout_rate,
    dtype=m.dtype,
  )
  tokenizer_path = config.data.tokenizer_path
  checkpoint = None
  if config.init_from_pretrain and config.init_from:
    raise ValueError("Set at most one of --config.init_from_pretrain and --config.init_from.")
  if config.init_from_pretrain:
    path, kind = config.init_from_pretrain, "pretrain"
    saved = _saved_pretrain_config(path)
    model_config = _saved_encoder_config(saved, **common)
    # The tokenizer it was pretrained with: configured, its checkpoint's own, or trained.
    tokenizer_path = tokenizer_path or pretrain.tokenizer_path_of(
      ml_collections.ConfigDict(saved["config"]), path
    )
    flag = "the tokenizer of --config.init_from_pretrain"
  elif config.init_from:
    path, kind = config.init_from, "checkpoint"
    checkpoint = pretrain.resolve_init_from(path)
    model_config = checkpoint.encoder_config(**common)
    tokenizer_path = tokenizer_path or checkpoint.hf_dir
    flag = f"the tokenizer of {checkpoint.flag}"
  else:
    path, kind = "", "scratch"
    if not tokenizer_path:
      raise ValueError(
        "Fine-tuning from scratch needs --config.data.tokenizer_path (or set "
        "--config.init_from_pretrain / --config.init_from)."
      )
  if config.data.tokenizer_path:
    flag = "--config.data.tokenizer_path"
  tokenizer = _load_tokenizer(tokenizer_path, flag)
  if kind == "scratch":
    overrides = {
      k: m[k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if m[k] > 0
    }
    vocab = -(-tokenizer.get_vocab_size() // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    model_config = model_lib.get_config(m.preset, vocab_size=vocab, **overrides, **common)
  if tokenizer.get_vocab_size() > model_config.vocab_size:
    raise ValueError(
      f"The tokenizer at {tokenizer_path} has {tokenizer.get_vocab_size()} "
      f"tokens but the model only {model_config.vocab_size} embeddings."
    )
  if config.data.max_len > model_config.max_sequence_length:
    raise ValueError(
      f"--config.data.max_len={config.data.max_len} exceeds the model's "
      f"{model_config.max_sequence_length} positions."
    )
  return InitSource(kind, path, model_config, tokenizer, tokenizer_path, checkpoint)


def restore_pretrained_encoder(pretrain_dir: str, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
  """(encoder params, step) of the latest checkpoint of a pretraining workdir."""
  saved = _saved_pretrain_config(pretrain_dir)
  pconfig = ml_collections.ConfigDict(saved["config"])
  setup = pretrain.make_setup(pconfig, _saved_encoder_config(saved), mesh)
  directory = os.path.join(pretrain_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"--config.init_from_pretrain={pretrain_dir} has no checkpoints "
      f"({directory}); let the pretraining run save one."
    )
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    train_lib.check_checkpoint_shapes(ckpt, setup.abstract_state)
    restored = ckpt.restore_latest(setup.abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(
      f"--config.init_from_pretrain={pretrain_dir}: no checkpoint in {directory}."
    )
  return restored.state["params"]["encoder"], restored.step


def _graft(target: dict, source: dict, where: str = "encoder") -> dict:
  """`target` with every leaf of `source` put in (same shapes); extra target leaves stay."""
  out = dict(target)
  for key, value in source.items():
    if key not in target:
      raise ValueError(f"The pretrained {where}/{key} has no counterpart in the model.")
    if isinstance(value, Mapping):
      out[key] = _graft(target[key], value, f"{where}/{key}")
    else:
      if tuple(value.shape) != tuple(target[key].shape):
        raise ValueError(
          f"Shape mismatch at {where}/{key}: pretrained {value.shape} vs model {target[key].shape}."
        )
      out[key] = value
  return out


# -----------------------------------------------------------------------------
# Set-up and the job
# -----------------------------------------------------------------------------


def resolve_schedule(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(train_steps, warmup_steps): from num_epochs and warmup_fraction where set."""
  steps = int(config.train_steps)
  if steps <= 0:  # An epoch is ceil(N / B) steps (`TrainOrder`).
    steps = max(1, math.ceil(config.num_epochs * math.ceil(num_train / config.data.batch_size)))
  warmup = int(config.optimizer.warmup_steps)
  if config.optimizer.warmup_fraction > 0:
    warmup = int(round(config.optimizer.warmup_fraction * steps))
  return steps, warmup


def make_setup(
  config: ml_collections.ConfigDict,
  model_config: model_lib.EncoderConfig,
  mesh: jax.sharding.Mesh,
  train_steps: int,
  warmup_steps: int,
) -> train_lib.TrainSetup:
  """Shapes and shardings of the state, for the resolved schedule (`resolve_schedule`)."""
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt.warmup_steps = warmup_steps
  return train_lib.make_setup(
    lambda: model_lib.MultipleChoiceModel(model_config, rngs=nnx.Rngs(config.seed)),
    model_config,
    opt,
    train_steps,
    mesh,
    model_lib.LOGICAL_AXIS_RULES,
  )


def init_state(
  config: ml_collections.ConfigDict,
  setup: train_lib.TrainSetup,
  source: InitSource,
  workdir: str | None = None,
) -> dict[str, Any]:
  """A fresh state from the init source, every array created in its shards.

  What was initialised fresh (the scorer, a pooler the source lacks) is logged and,
  with `workdir`, listed in `workdir/init_report.json`.
  """
  m = config.model
  if source.kind == "checkpoint":
    params = pretrain.import_checkpoint(
      source.checkpoint,
      "multiple_choice",
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
      lambda: model_lib.MultipleChoiceModel(setup.model_config, rngs=nnx.Rngs(config.seed)),
      setup.mesh,
    )
    params = nnx.to_pure_dict(nnx.state(model))
    if source.kind == "pretrain":
      encoder, step = restore_pretrained_encoder(source.path, setup.mesh)
      params = dict(params, encoder=_graft(params["encoder"], encoder))
      fresh = sorted(set(_leaf_names(params)) - {f"encoder/{n}" for n in _leaf_names(encoder)})
      logging.info("Encoder from %s (step %d); initialised fresh: %s", source.path, step, fresh)
      if workdir is not None and train_lib.is_main():
        train_lib.write_json_atomically(
          os.path.join(workdir, pretrain.INIT_REPORT),
          dict(init_from_pretrain=source.path, step=step, seed=config.seed, fresh=fresh),
        )
  return train_lib.new_train_state(
    params, setup.optimizer, setup.mesh, setup.state_shardings, config.seed
  )


def _leaf_names(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
  """'encoder/pooler/dense/kernel', ... of a pure-dict parameter tree."""
  names = []
  for key, value in tree.items():
    name = f"{prefix}{key}"
    names += _leaf_names(value, name + "/") if isinstance(value, Mapping) else [name]
  return names


def data_buckets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The padded lengths of the configured length buckets (`bucket_lengths`)."""
  return bucket_lengths(config.data.max_len, config.data.bucket_multiple)


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """Questions per evaluation batch: `data.eval_batch_size`, or 0 = 4 x `data.batch_size`."""
  return config.data.eval_batch_size or 4 * config.data.batch_size


def _device_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return mesh_lib.shard_batch({k: batch[k] for k in _DEVICE_KEYS}, mesh)


def _check_reclor_test_ids(split: EncodedSplit) -> None:
  """The leaderboard file needs ids test_0..test_{n-1}: checked before training."""
  indices = sorted(multiple_choice.reclor_test_index(i) for i in split.ids)
  if indices != list(range(len(indices))):
    raise ValueError(
      f"ReClor test ids are not test_0..test_{len(indices) - 1}; the "
      f"leaderboard file could not be written."
    )


def evaluate_split(
  config,
  setup: train_lib.TrainSetup,
  eval_fn,
  params,
  name: str,
  split: EncodedSplit,
  workdir: str,
  step: int,
) -> dict[str, float]:
  """Accuracy (and Test-E/H for ReClor test) of one split; writes its prediction files."""
  sums = dict(loss_sum=0.0, correct=0.0, count=0.0)
  logits = np.zeros((len(split), multiple_choice.NUM_CHOICES), np.float32)
  batch_size = eval_batch_size(config)
  per_host, host = batch_size // jax.process_count(), jax.process_index()
  start = time.perf_counter()
  for batch, index in eval_batches(split, batch_size, data_buckets(config)):
    # Every host builds the whole batch and passes its rows; outputs come back replicated.
    local = {k: v[host * per_host : (host + 1) * per_host] for k, v in batch.items()}
    out, batch_logits = jax.device_get(eval_fn(params, _device_batch(local, setup.mesh)))
    for k in sums:
      sums[k] += float(out[k])
    logits[index] = np.asarray(batch_logits)[: len(index)]
  seconds = time.perf_counter() - start
  predicted = logits.argmax(-1)
  result = dict(
    examples=float(len(split)),
    truncated_sequences=float(split.truncated),
    questions_per_s=len(split) / max(seconds, 1e-9),
  )
  if sums["count"]:
    result["accuracy"] = sums["correct"] / sums["count"]
    result["loss"] = sums["loss_sum"] / sums["count"]
  reclor_test = config.data.dataset == "reclor" and name == "test"
  if reclor_test and split.has_labels:
    subsets = multiple_choice.reclor_test_subsets(split.ids)
    for key, rows in (("test_e_accuracy", subsets.easy), ("test_h_accuracy", subsets.hard)):
      if rows:
        result[key] = float(np.mean(predicted[rows] == split.label[rows]))
  if train_lib.is_main():
    rows = [
      dict(
        id=i,
        prediction=int(p),
        label=(int(l) if l >= 0 else None),
        logits=[round(float(x), 5) for x in row],
      )
      for i, p, l, row in zip(split.ids, predicted, split.label, logits)
    ]
    train_lib.write_json_atomically(
      os.path.join(workdir, f"predictions_{name}.json"),
      dict(step=step, split=name, predictions=rows),
    )
    if reclor_test:
      multiple_choice.write_reclor_predictions(
        os.path.join(workdir, "reclor_test_predictions.json"),
        dict(zip(split.ids, predicted.tolist())),
      )
  return result


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  on_step: Callable[[int], None] | None = None,
  start_over: bool = False,
) -> dict[str, Any]:
  """Fine-tunes (or resumes) in `workdir`; evaluates every `eval_every` steps and at the end.

  Args:
    config: see `apollo/lm/configs/finetune.py`; checked first (`check_config`).
    workdir: checkpoints/, metrics.jsonl, tensorboard/, config.json, predictions_*.json,
      results.json (and, for the generated set, data/) go here; a rerun resumes.
    on_step: called with the step number after each update is dispatched (tests).
    start_over: if no checkpoint in the workdir restores (a `CheckpointError`
      otherwise, on every rerun), move the damaged ones aside and start from step 0.

  Returns:
    {'step', 'preempted', 'train': last train summary, 'eval': {split: summary},
     'best': {'step', split: summary} at the best validation accuracy (or {})}.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; nothing of that step is saved.
    ValueError / FileNotFoundError: bad input, naming the flag or file.
    ConfigError: an unknown field or a value that cannot work, before any work.
    CheckpointError: checkpoints exist but none restores (and not `start_over`).
  """
  config_lib.check_config(
    config,
    finetune_configs.get_config(),
    zero_means=dict(train_steps="num_epochs over the training split", eval_every="each epoch"),
  )
  mesh_lib.initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if config.optimizer.name not in train_lib.OPTIMIZERS:  # Bad names fail before any work.
    train_lib.build_optimizer(config.optimizer, 1)
  for name in config.eval_splits:
    if name not in ("validation", "test"):
      raise ValueError(f"Unknown split {name!r} in --config.eval_splits; use validation/test.")
  source = resolve_init(config)
  directory = data_dir(config, workdir)
  max_len = config.data.max_len
  train_examples = read_split(config, directory, "train")
  if config.data.max_train_examples > 0:
    train_examples = train_examples[: config.data.max_train_examples]
  train_split = encode_examples(train_examples, source.tokenizer, max_len)
  if not train_split.has_labels or not len(train_split):
    raise ValueError(f"The training split in {directory} is empty or lacks labels.")
  eval_splits = {
    name: encode_examples(
      read_split(config, directory, name)[: config.data.max_eval_examples or None],
      source.tokenizer,
      max_len,
    )
    for name in config.eval_splits
  }
  if config.data.dataset == "reclor" and "test" in eval_splits:
    _check_reclor_test_ids(eval_splits["test"])
  buckets = data_buckets(config)
  train_order = TrainOrder(train_split.lengths, config.data.batch_size, config.seed, buckets)
  batching = dict(train=batching_report(train_split, train_order.epoch(0)))
  for name, split in eval_splits.items():
    batching[name] = batching_report(split, eval_plan(split, eval_batch_size(config), buckets))
  for name, split in (("train", train_split), *eval_splits.items()):
    logging.info(
      "%s: %d questions, %d of %d sequences truncated to %d tokens; padded lengths %s, "
      "padding %.1f%% of token slots (%.1f%% if all were padded to %d).",
      name,
      len(split),
      split.truncated,
      len(split) * multiple_choice.NUM_CHOICES,
      max_len,
      batching[name]["questions_per_length"],
      100 * batching[name]["padding_fraction"],
      100 * batching[name]["padding_fraction_at_max_len"],
      max_len,
    )

  train_lib.check_saved_config(workdir, source.model_config, SHAPE_FIELDS)
  mesh = mesh_lib.make_mesh(
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, axis_type="auto"
  )
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    size = config.data[key]
    if size and (size % batch_shards or size % jax.process_count()):
      raise ValueError(
        f"--config.data.{key}={size} is not divisible by data*fsdp="
        f"{batch_shards} and the {jax.process_count()} processes."
      )
  train_steps, warmup_steps = resolve_schedule(config, len(train_split))
  setup = make_setup(config, source.model_config, mesh, train_steps, warmup_steps)
  logging.info(
    "Mesh %s; model %s; %d steps (%d warmup) of %d questions.",
    mesh_lib.describe(mesh),
    source.model_config,
    train_steps,
    warmup_steps,
    config.data.batch_size,
  )

  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints
  )
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    train_lib.check_checkpoint_shapes(ckpt, setup.abstract_state)
    train_lib.write_config(
      workdir,
      config,
      source.model_config,
      init=dict(kind=source.kind, path=source.path, tokenizer=source.tokenizer_path),
      schedule=dict(train_steps=train_steps, warmup_steps=warmup_steps),
    )
    state, start_step, data = train_lib.resume_or_init(
      ckpt,
      setup.abstract_state,
      lambda: init_state(config, setup, source, workdir),
      required_data=["num_train_examples"],  # What a resume checks the split against.
      start_over=start_over,
    )
    if data.get("num_train_examples", len(train_split)) != len(train_split):
      raise ValueError(
        f"{ckpt.directory} was trained on {data['num_train_examples']} "
        f"questions, the training split now has {len(train_split)}; use a new "
        f"--workdir."
      )
    if list(data.get("bucket_lengths", buckets)) != list(buckets):  # The order would change.
      raise ValueError(
        f"{ckpt.directory} was trained with padded lengths {data['bucket_lengths']}, "
        f"--config.data.max_len / bucket_multiple now give {list(buckets)}; use a new "
        f"--workdir or the old values."
      )
    result = _train_loop(
      config,
      setup,
      train_steps,
      state,
      start_step,
      train_split,
      train_order,
      eval_splits,
      ckpt,
      writer,
      workdir,
      on_step,
    )
  finally:
    ckpt.close()  # Waits for in-flight saves: earlier checkpoints are complete.
    writer.close()
  if not result["preempted"]:
    result["best"] = best_evaluation(workdir)
    if train_lib.is_main():
      train_lib.write_json_atomically(
        os.path.join(workdir, "results.json"),
        dict(
          step=result["step"],
          eval=result["eval"],
          best=result["best"],
          init=dict(kind=source.kind, path=source.path),
          throughput=throughput(workdir, result["eval"]),
          batching=dict(bucket_lengths=list(buckets), **batching),
        ),
      )
  return result


def throughput(workdir: str, evaluation: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
  """Questions/s: training (the median over logged windows) and each split's last evaluation.

  The median leaves out the windows slowed by compilation (one per padded length).
  """
  rates = [r["questions_per_s"] for r in metrics_lib.read_metrics(workdir, "train")]
  return dict(
    train_questions_per_s=float(np.median(rates)) if rates else None,
    eval_questions_per_s={k: v.get("questions_per_s") for k, v in evaluation.items()},
  )


def best_evaluation(workdir: str) -> dict[str, Any]:
  """The evaluation at the step of best validation accuracy (earliest on ties), from metrics."""
  rows = metrics_lib.read_metrics(workdir)
  by_step: dict[int, dict[str, dict]] = {}
  for row in rows:
    if row["split"] in ("validation", "test"):
      by_step.setdefault(row["step"], {})[row["split"]] = {
        k: v for k, v in row.items() if k not in ("step", "split")
      }
  scored = [(s, e) for s, e in sorted(by_step.items()) if "accuracy" in e.get("validation", {})]
  if not scored:
    return {}
  step, evaluation = max(scored, key=lambda se: (se[1]["validation"]["accuracy"], -se[0]))
  return dict(step=step, **evaluation)


class _TrainWindow:
  """Host-side sums of the train steps' metrics -> means (and the last learning rate)."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.steps = 0
    self.learning_rate = float("nan")

  def add(self, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.learning_rate = float(metrics["learning_rate"])
    self.steps += 1

  def summary(self) -> dict[str, float]:
    s, n = self.sums, max(self.steps, 1)
    return dict(
      loss=s["loss"] / n,
      accuracy=s["correct"] / max(s["count"], 1.0),
      grad_norm=s["grad_norm"] / n,
      update_norm=s["update_norm"] / n,
      learning_rate=self.learning_rate,
    )


def _train_loop(
  config,
  setup: train_lib.TrainSetup,
  total: int,
  state,
  start_step,
  train_split: EncodedSplit,
  train_order: TrainOrder,
  eval_splits,
  ckpt,
  writer,
  workdir,
  on_step,
) -> dict[str, Any]:
  step_fn = train_lib.jit_train_step(
    functools.partial(
      train_step, graphdef=setup.graphdef, optimizer=setup.optimizer, lr_schedule=setup.lr_schedule
    ),
    setup,
  )
  eval_fn = jax.jit(
    functools.partial(eval_step, graphdef=setup.graphdef),
    out_shardings=NamedSharding(setup.mesh, PartitionSpec()),
  )
  batch_size = config.data.batch_size
  steps_per_epoch = train_order.steps_per_epoch
  log = train_lib.TrainLog(
    writer,
    _TrainWindow,
    start_step=start_step,
    total_steps=total,
    every=config.log_every,
    units_per_step=batch_size,
    unit="questions",
    extra=lambda step: dict(epoch=step / steps_per_epoch),
  )
  result: dict[str, Any] = dict(step=start_step, preempted=False, train={}, eval={})
  host, hosts = jax.process_index(), jax.process_count()

  def next_batch(step):
    batch = train_order.batch(train_split, step - 1, host, hosts)
    return _device_batch(batch, setup.mesh), dict(
      step=step,
      examples_seen=train_order.examples_seen(step),
      num_train_examples=len(train_split),
      seed=config.seed,
      bucket_lengths=list(train_order.buckets),
    )

  def evaluate_now(step, params):
    for name, split in eval_splits.items():
      summary = evaluate_split(config, setup, eval_fn, params, name, split, workdir, step)
      writer.write(step, summary, split=name)
      result["eval"][name] = summary
      logging.info(
        "%s at step %d: %s", name, step, " | ".join(f"{k} {v:.4g}" for k, v in summary.items())
      )
    log.restart_clock()  # Throughput counts training time only.

  _, result["step"], result["preempted"] = train_lib.train_loop(
    state,
    mesh=setup.mesh,
    step_fn=step_fn,
    next_batch=next_batch,
    start_step=start_step,
    total_steps=total,
    ckpt=ckpt,
    log_step=log,
    log_every=config.log_every,
    checkpoint_every=config.checkpoint_every,
    eval_every=config.eval_every or steps_per_epoch,
    evaluate=evaluate_now,
    on_step=on_step,
  )
  result["train"] = log.last
  return result
