"""Supervised fine-tuning of the agent policy on masked samples.

`train_and_evaluate(config, workdir)` is the whole job (config:
`apollo/agents/configs/sft.py`; entry point: `experiments/agent_sft.py`). It has
the shape of the project's other trainers (`apollo.common.training`): a mesh
('data', 'fsdp', 'tensor') with Auto axes, a state `{params, opt_state, step, rng}`
created in its shards, a module-level pure `train_step` jitted once with the state
donated, Apollo by default, checkpoints every `checkpoint_every` steps, at the end
and on SIGTERM (with the data position, so a resumed run sees exactly the batches
an uninterrupted one would), metrics as sums and counts, a progress line, and a
stop on a non-finite loss.

The policy: `config.init_from` names a checkpoint (a registered name such as
`smollm2-135m-instruct`, a `.gguf` file or a Hugging Face directory, resolved by
`apollo.models.registry.resolve`), fully fine-tuned; empty, a random decoder of
`config.model`. The samples' tokenizer and chat template are the checkpoint's own
(`apollo.models.chat_template.from_pretrained`); a workdir whose samples were
tokenized otherwise is refused.

Data: `samples.Sample`s, of which the trainer uses `input_ids` (token ids of one
rendered context + response) and `loss_mask` (True on the tokens to imitate: an
assistant turn's content, tool calls and end-of-turn token; see
`apollo.models.chat_template`). They come from a JSON-lines file
(`config.data.train_path`, written by `samples.write_jsonl`), or are passed in
(`samples=`), or, for the quickstart, are built from scripted rollouts inside the
workdir (`collect.write_demo_samples`, with the checkpoint's template, or ChatML
over a BPE trained on the rollouts for a random decoder).

Sequence packing (`pack_samples`): samples are laid end to end into rows of
`seq_len` tokens. Every token keeps its loss mask; each packed sample gets its own
segment id (0 = padding) and positions restarting at 0, and the decoder's
`segment_ids` argument makes attention block-diagonal-causal, so a packed row
computes exactly the logits of its samples run one by one. A sample longer than
`seq_len` keeps its *last* `seq_len` tokens (the response to imitate sits at the
end). The data order is a pure function of (seed, epoch): each epoch shuffles the
samples, packs them, and the row stream runs across epochs; its position
`{epoch, row}` is the data state saved with each checkpoint.

Loss: the next-token cross-entropy averaged over the masked target tokens of the
batch (tokens with `loss_mask` False contribute nothing, not even to the mean).

Export: at the end, the policy is written as a Hugging Face directory
(`workdir/policy`: config.json with the token ids, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template) that
`apollo.models.load` and the 'flax' rollout backend load
(`make_flax_backend(seed, checkpoint=workdir/policy)`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from apollo.agents import guidance as guidance_lib
from apollo.agents.configs import sft as sft_configs
from apollo.agents.training import collect
from apollo.agents.training import samples as samples_lib
from apollo.common import checkpoint as checkpoint_lib
from apollo.common import config as config_lib
from apollo.common import mesh as mesh_lib
from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.models import chat_template as chat_lib
from apollo.models import hf, registry
from apollo.models.llama import model as decoder_lib
from apollo.models.llama import params as llama_params

# Decoder fields that decide parameter shapes: a workdir may only be resumed with these.
SHAPE_FIELDS = (
  "vocab_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "intermediate_size",
  "tie_word_embeddings",
  "attention_bias",
)
BATCH_KEYS = ("input_ids", "targets", "weights", "segment_ids", "positions")
POLICY_DIR = "policy"
# config.json fields an exported policy takes from its checkpoint (generation stops at eos).
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# -----------------------------------------------------------------------------
# Packing
# -----------------------------------------------------------------------------


def pack_samples(
  samples: Iterable[samples_lib.Sample], seq_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """Packs samples (in order, next-fit) into rows of `seq_len` tokens.

  Args:
    samples: their `input_ids` and `loss_mask` (same length) are packed.
    seq_len: tokens per row.
    pad_id: id written on padding.

  Returns:
    int32/float32 arrays [rows, seq_len]: `input_ids`; `targets` (the next token of
    the same sample); `weights` (1.0 where that target is a masked-in token, else
    0, also on each sample's last token and on padding); `segment_ids` (1, 2, ...
    per sample in the row, 0 on padding); `positions` (restart at 0 per sample);
    plus `truncated` (int: samples cut to their last `seq_len` tokens) and
    `dropped` (samples with fewer than 2 tokens or no target).
  """
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
  row: list[tuple[np.ndarray, np.ndarray]] = []
  used = truncated = dropped = 0
  for sample in samples:
    ids = np.asarray(sample.input_ids, np.int32)
    mask = np.asarray(sample.loss_mask, bool)
    if ids.shape != mask.shape:
      raise ValueError(f"input_ids {ids.shape} and loss_mask {mask.shape} differ.")
    if len(ids) > seq_len:
      ids, mask = ids[-seq_len:], mask[-seq_len:]
      truncated += 1
    if len(ids) < 2 or not mask[1:].any():
      dropped += 1
      continue
    if used + len(ids) > seq_len:
      rows.append(row)
      row, used = [], 0
    row.append((ids, mask))
    used += len(ids)
  if row:
    rows.append(row)
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in BATCH_KEYS}
  out["input_ids"][:] = pad_id
  out["weights"] = np.zeros((len(rows), seq_len), np.float32)
  for r, parts in enumerate(rows):
    start = 0
    for segment, (ids, mask) in enumerate(parts, start=1):
      n, end = len(ids), start + len(ids)
      out["input_ids"][r, start:end] = ids
      out["targets"][r, start : end - 1] = ids[1:]
      out["weights"][r, start : end - 1] = mask[1:]
      out["segment_ids"][r, start:end] = segment
      out["positions"][r, start:end] = np.arange(n)
      start = end
  out["truncated"] = np.asarray(truncated)
  out["dropped"] = np.asarray(dropped)
  return out


class PackedRowStream:
  """Batches of packed rows; epoch e = pack(shuffle(samples, (seed, e))).

  The rows run on across epochs (a batch may hold the end of one epoch and the
  start of the next), so no row is padded away. `get_state()` / `set_state()` are
  JSON-able `{epoch, row}`: the position of the next batch.
  """

  def __init__(
    self,
    samples: Sequence[samples_lib.Sample],
    seq_len: int,
    batch_size: int,
    seed: int,
    pad_id: int = 0,
  ):
    if not samples:
      raise ValueError("No training samples.")
    self.samples, self.seq_len, self.batch_size = samples, seq_len, batch_size
    self.seed, self.pad_id = seed, pad_id
    self.epoch, self.row = 0, 0
    self._packed_epoch, self._rows = -1, None

  def _epoch_rows(self) -> dict[str, np.ndarray]:
    if self._packed_epoch != self.epoch:
      order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
      self._rows = pack_samples((self.samples[i] for i in order), self.seq_len, self.pad_id)
      self._packed_epoch = self.epoch
      if not len(self._rows["input_ids"]):
        raise ValueError("Every sample was dropped (no target tokens).")
    return self._rows

  def get_state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "row": int(self.row)}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.epoch, self.row = int(state["epoch"]), int(state["row"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = {k: [] for k in BATCH_KEYS}
    needed = self.batch_size
    while needed:
      rows = self._epoch_rows()
      take = min(needed, len(rows["input_ids"]) - self.row)
      for k in BATCH_KEYS:
        parts[k].append(rows[k][self.row : self.row + take])
      self.row += take
      needed -= take
      if self.row >= len(rows["input_ids"]):
        self.epoch, self.row = self.epoch + 1, 0
    return {k: np.concatenate(v) for k, v in parts.items()}


def eval_batches(
  samples: Sequence[samples_lib.Sample], seq_len: int, batch_size: int, pad_id: int = 0
) -> list[dict[str, np.ndarray]]:
  """The held-out samples packed in order, in batches (the last padded with empty rows)."""
  rows = pack_samples(samples, seq_len, pad_id)
  n = len(rows["input_ids"])
  batches = []
  for start in range(0, n, batch_size):
    batch = {k: rows[k][start : start + batch_size] for k in BATCH_KEYS}
    short = batch_size - len(batch["input_ids"])
    if short:
      batch = {
        k: np.concatenate([v, np.zeros((short, seq_len), v.dtype)]) for k, v in batch.items()
      }
    batches.append(batch)
  return batches


# -----------------------------------------------------------------------------
# Loss and steps (pure functions)
# -----------------------------------------------------------------------------


def packed_logits(model: decoder_lib.Decoder, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Logits [B, L, vocab] of packed rows: attention stays inside each segment."""
  segments = batch["segment_ids"]
  logits, _ = model(
    batch["input_ids"],
    positions=batch["positions"],
    attention_mask=segments > 0,
    segment_ids=segments,
  )
  return logits


def loss_sums(model: decoder_lib.Decoder, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Sum of the cross-entropy and of correct argmax over the weighted targets, and their count."""
  logits = packed_logits(model, batch).astype(jnp.float32)
  weights = batch["weights"].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return dict(
    loss_sum=jnp.sum(nll * weights), correct=jnp.sum(hit * weights), count=jnp.sum(weights)
  )


def train_step(
  state: dict[str, Any],
  batch: Mapping[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One update on the masked-token mean cross-entropy; a pure function of (state, batch).

  Returns:
    (new state, metrics): loss sums and counts, loss, grad_norm (before clipping),
    update_norm and this update's learning rate.
  """

  def loss_fn(params):
    sums = loss_sums(nnx.merge(graphdef, params), batch)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

  return train_lib.gradient_step(state, loss_fn, optimizer, lr_schedule)


def eval_step(
  params: Any, batch: Mapping[str, jax.Array], *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
  return loss_sums(nnx.merge(graphdef, params), batch)


class _Window:
  """Host-side sums of per-step metrics -> means."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.steps = 0
    self.lr = None

  def add(self, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(v))
    self.lr = float(np.asarray(metrics.get("learning_rate", np.nan)))
    self.steps += 1

  def summary(self) -> dict[str, float]:
    s = self.sums
    if not self.steps:
      return {}
    out = dict(
      loss=s["loss_sum"] / max(s["count"], 1.0),
      token_acc=s["correct"] / max(s["count"], 1.0),
      target_tokens=s["count"],
    )
    for k in ("grad_norm", "update_norm"):
      if k in s:
        out[k] = s[k] / self.steps
    if self.lr is not None and "learning_rate" in s:
      out["learning_rate"] = self.lr
    return out


# -----------------------------------------------------------------------------
# Set-up
# -----------------------------------------------------------------------------


def split_eval(
  samples: Sequence[samples_lib.Sample], fraction: float, seed: int
) -> tuple[list, list]:
  """(train, eval): a fixed random `fraction` of the samples held out (at least 1 if > 0)."""
  if fraction <= 0 or len(samples) < 2:
    return list(samples), []
  order = np.random.default_rng([seed, 7]).permutation(len(samples))
  n_eval = max(1, int(round(fraction * len(samples))))
  held = set(order[:n_eval].tolist())
  return (
    [s for i, s in enumerate(samples) if i not in held],
    [s for i, s in enumerate(samples) if i in held],
  )


def checkpoint_template(name_or_path: str) -> chat_lib.ChatTemplate:
  """The chat template (and tokenizer) of a registered checkpoint name, a `.gguf`, a
  checkpoint directory or a bare tokenizer.json (ChatML; see `chat_template.from_pretrained`)."""
  named = registry.NAMED_CHECKPOINTS.get(name_or_path)
  path = registry.resolve(name_or_path) if named or name_or_path.endswith(".gguf") else name_or_path
  return chat_lib.from_pretrained(
    path, guidance_lib.GUIDANCE_TAG, named.tool_call_format if named else None
  )


def prepare_data(
  config: ml_collections.ConfigDict, workdir: str, template: chat_lib.ChatTemplate | None
) -> tuple[list, list, str]:
  """(train samples, eval samples, where their tokenizer and template are) from the config.

  An empty `data.train_path` builds demo samples from scripted rollouts into
  `workdir/data` (idempotent), rendered with `template` (the checkpoint's) or,
  without one, with ChatML over a BPE trained on the rollouts.
  """
  d = config.data
  if d.train_path:
    samples = list(samples_lib.read_jsonl(d.train_path))
    tokenizer_path = d.tokenizer_path or config.init_from
  else:
    tokenizer_path = os.path.join(workdir, "data")
    train_path = os.path.join(tokenizer_path, "samples.jsonl")
    if jax.process_index() == 0 and not os.path.isfile(train_path):
      collect.write_demo_samples(
        tokenizer_path, episodes=d.demo_episodes, seed=config.seed, template=template
      )
    train_lib.sync("sft_demo_data")
    samples = list(samples_lib.read_jsonl(train_path))
  if not tokenizer_path:
    raise ValueError("Set --config.data.tokenizer_path (a tokenizer.json) or --config.init_from.")
  if d.eval_path:
    return samples, list(samples_lib.read_jsonl(d.eval_path)), tokenizer_path
  train, held = split_eval(samples, d.eval_fraction, config.seed)
  return train, held, tokenizer_path


def model_config_from(
  config: ml_collections.ConfigDict, init_dir: str, vocab_size: int
) -> decoder_lib.DecoderConfig:
  """The decoder of `init_dir` (the resolved `init_from`), or of `config.model` if ''."""
  m = config.model
  if init_dir:
    return llama_params.config_from_hf(init_dir, dtype=m.dtype)
  overrides = {
    k: int(m[k])
    for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    if m[k] > 0
  }
  max_pos = max(int(config.data.seq_len), 2 * int(config.data.seq_len))
  return decoder_lib.get_config(
    m.preset, vocab_size=vocab_size, dtype=m.dtype, max_position_embeddings=max_pos, **overrides
  )


def make_setup(config, model_config, mesh) -> train_lib.TrainSetup:
  """Shapes and shardings of the state, computed abstractly."""
  return train_lib.make_setup(
    lambda: decoder_lib.Decoder(model_config, rngs=nnx.Rngs(config.seed)),
    model_config,
    config.optimizer,
    config.train_steps,
    mesh,
    decoder_lib.LOGICAL_AXIS_RULES,
  )


def init_state(config, setup: train_lib.TrainSetup, init_dir: str) -> dict[str, Any]:
  """A fresh state: the policy of `init_dir` (or a random init), created in its shards."""
  if init_dir:
    model, report = llama_params.from_pretrained(
      init_dir,
      mesh=setup.mesh,
      rules=decoder_lib.LOGICAL_AXIS_RULES,
      dtype=config.model.dtype,
    )
    logging.info("Initialised from %s (%s): %s", config.init_from, init_dir, report.summary())
  else:
    model = decoder_lib.create_sharded_model(
      lambda: decoder_lib.Decoder(setup.model_config, rngs=nnx.Rngs(config.seed)),
      setup.mesh,
      decoder_lib.LOGICAL_AXIS_RULES,
    )
  return train_lib.new_train_state(
    nnx.to_pure_dict(nnx.state(model)),
    setup.optimizer,
    setup.mesh,
    setup.state_shardings,
    config.seed,
  )


def export_policy(
  setup: train_lib.TrainSetup,
  params: Any,
  template: chat_lib.ChatTemplate,
  out_dir: str,
  init_dir: str = "",
) -> str:
  """Writes the policy as a Hugging Face directory (`apollo.models.load` reads it).

  config.json takes the token ids of `init_dir`'s (else the template's stop and pad
  ids); tokenizer.json and tokenizer_config.json (with the chat template) are the
  template's; `init_dir`'s generation_config.json is copied.
  """

  if train_lib.is_main():
    host = jax.device_get(params)
    abstract = nnx.eval_shape(lambda: decoder_lib.Decoder(setup.model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, host)
    model = nnx.merge(graphdef, state)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    llama_params.export_hf(model, tmp)
    if init_dir:
      source = hf.read_config(init_dir)
      token_ids = {k: source[k] for k in TOKEN_ID_FIELDS if source.get(k) is not None}
      generation = os.path.join(init_dir, "generation_config.json")
      if os.path.isfile(generation):
        shutil.copy(generation, os.path.join(tmp, "generation_config.json"))
    else:
      token_ids = {"eos_token_id": list(template.stop_ids), "pad_token_id": template.pad_id}
    config_path = os.path.join(tmp, hf.CONFIG_NAME)
    with open(config_path) as f:
      exported = json.load(f)
    with open(config_path, "w") as f:
      json.dump({**exported, **token_ids}, f, indent=2)
    template.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
  train_lib.sync("sft_export")
  return out_dir


def load_policy(policy_dir: str, **overrides: Any) -> tuple[decoder_lib.Decoder, Any]:
  """(model, tokenizer) of an exported policy directory."""

  model, _ = llama_params.from_pretrained(policy_dir, **overrides)
  return model, chat_lib.load_chat_tokenizer(policy_dir)


# -----------------------------------------------------------------------------
# The job
# -----------------------------------------------------------------------------


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  samples: Sequence[samples_lib.Sample] | None = None,
  eval_samples: Sequence[samples_lib.Sample] | None = None,
  tokenizer_path: str = "",
  on_step: Callable[[int], None] | None = None,
  start_over: bool = False,
) -> dict[str, Any]:
  """Fine-tunes (or resumes) in `workdir` until `config.train_steps`; exports the policy.

  Args:
    config: see `apollo/agents/configs/sft.py`.
    workdir: checkpoints/, metrics.jsonl, tensorboard/, config.json, policy/ (and
      data/ for demo samples); a rerun resumes from it.
    samples / eval_samples / tokenizer_path: in-memory data instead of
      `config.data` (the comparison passes its samples this way; they must be the
      same on a resume); `tokenizer_path` is what `checkpoint_template` reads
      (default `config.data.tokenizer_path`, else `config.init_from`).
    on_step: called after each update is dispatched (tests send SIGTERM from it).
    start_over: if no checkpoint in the workdir restores (a `CheckpointError`
      otherwise, on every rerun), move the damaged ones aside and start from step 0.

  Returns:
    {'step', 'preempted', 'train': last train summary, 'eval': last eval summary,
     'policy_dir': the exported policy ('' if preempted)}.

  Raises:
    ConfigError: an unknown field or a value that cannot work, before any work.
    CheckpointError: checkpoints exist but none restores (and not `start_over`).
  """
  # The comparison preset has every field (its `compare` block included).
  config_lib.check_config(config, sft_configs.get_config("compare"))
  mesh_lib.initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  train_lib.build_optimizer(config.optimizer, config.train_steps)  # Bad names fail before any work.
  init_dir = os.fspath(registry.resolve(config.init_from)) if config.init_from else ""
  init_template = checkpoint_template(config.init_from) if config.init_from else None
  if samples is None:
    samples, eval_samples, tokenizer_path = prepare_data(config, workdir, init_template)
  elif not tokenizer_path:
    tokenizer_path = config.data.tokenizer_path or config.init_from
  eval_samples = list(eval_samples or [])
  same_source = init_template is not None and tokenizer_path == config.init_from
  template = init_template if same_source else checkpoint_template(tokenizer_path)
  if (
    init_template is not None
    and template.tokenizer.get_vocab() != init_template.tokenizer.get_vocab()
  ):
    raise ValueError(
      f"The samples were tokenized with {tokenizer_path}, whose vocabulary is not that of "
      f"--config.init_from={config.init_from}; render them with the checkpoint's template."
    )
  model_config = model_config_from(config, init_dir, template.tokenizer.get_vocab_size())
  train_lib.check_saved_config(workdir, model_config, SHAPE_FIELDS)
  mesh = mesh_lib.make_mesh(
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, axis_type="auto"
  )
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % (shards * jax.process_count()) and config.data.batch_size % shards:
    raise ValueError(
      f"--config.data.batch_size={config.data.batch_size} is not divisible by data*fsdp={shards}."
    )
  setup = make_setup(config, model_config, mesh)
  logging.info(
    "Mesh %s; %d train / %d eval samples; model %s",
    mesh_lib.describe(mesh),
    len(samples),
    len(eval_samples),
    model_config,
  )

  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints
  )
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    train_lib.check_checkpoint_shapes(ckpt, setup.abstract_state)
    train_lib.write_config(workdir, config, model_config)
    stream = PackedRowStream(
      samples, config.data.seq_len, config.data.batch_size, config.seed, template.pad_id
    )
    state, start_step, data = train_lib.resume_or_init(
      ckpt,
      setup.abstract_state,
      lambda: init_state(config, setup, init_dir),
      required_data=["train_iterator"],  # Without it the resume would see other data.
      start_over=start_over,
    )
    if "train_iterator" in data:
      stream.set_state(data["train_iterator"])
    evals = (
      eval_batches(eval_samples, config.data.seq_len, config.data.batch_size, template.pad_id)
      if eval_samples
      else []
    )
    result = _train_loop(config, setup, state, start_step, stream, evals, ckpt, writer, on_step)
    result["policy_dir"] = ""
    if not result["preempted"] and config.export_policy:
      result["policy_dir"] = export_policy(
        setup, result.pop("params"), template, os.path.join(workdir, POLICY_DIR), init_dir
      )
    result.pop("params", None)
    return result
  finally:
    ckpt.close()
    writer.close()


def _host_slice(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of the global batch."""
  n, hosts, index = len(batch["input_ids"]), jax.process_count(), jax.process_index()
  per = n // hosts
  return {k: v[index * per : (index + 1) * per] for k, v in batch.items()}


def _train_loop(
  config, setup: train_lib.TrainSetup, state, start_step, stream, evals, ckpt, writer, on_step
) -> dict[str, Any]:
  step_fn = train_lib.jit_train_step(
    functools.partial(
      train_step, graphdef=setup.graphdef, optimizer=setup.optimizer, lr_schedule=setup.lr_schedule
    ),
    setup,
  )
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=setup.graphdef))
  log = train_lib.TrainLog(
    writer,
    _Window,
    start_step=start_step,
    total_steps=config.train_steps,
    every=config.log_every,
    units_per_step=config.data.batch_size * config.data.seq_len,
    unit="tokens",
  )
  result: dict[str, Any] = dict(step=start_step, preempted=False, train={}, eval={})

  def next_batch(step):
    batch = next(stream)
    # Saved with this step: the stream's position after its batch.
    return (
      mesh_lib.shard_batch(_host_slice(batch), setup.mesh),
      dict(train_iterator=stream.get_state(), step=step),
    )

  def evaluate_now(step, params):
    acc = _Window()
    for batch in evals:
      acc.add(jax.device_get(eval_fn(params, mesh_lib.shard_batch(_host_slice(batch), setup.mesh))))
    result["eval"] = {
      k: v for k, v in acc.summary().items() if k in ("loss", "token_acc", "target_tokens")
    }
    writer.write(step, result["eval"], split="eval")
    log.restart_clock()  # Throughput counts training time only.

  state, result["step"], result["preempted"] = train_lib.train_loop(
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
    evaluate=evaluate_now if evals else None,
    on_step=on_step,
  )
  result["train"], result["params"] = log.last, state["params"]
  return result
