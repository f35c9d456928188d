r"""Throughput and MFU of the APOLLO pretraining step (encoder + S-MLM + E-CLS + update).

Times `apollo.lm.pretrain.train_step` (the trainer's own jitted, donated step) with
Apollo and with AdamW on synthetic batches, and, when torch and transformers import,
the same-size Hugging Face `RobertaForMaskedLM` (`BertForMaskedLM` for the BERT
presets) + `RobertaClassificationHead` step with `torch.optim.AdamW` (same batch,
length, MLM positions, loss, global-norm clipping): a table of tokens/s, model
FLOP/s, MFU and the JAX/PyTorch ratio for every `--sizes` entry.

After warm-up steps (compilation), the steps are timed round-robin: every round runs
one step of each implementation of a size, in a shuffled order, so that a busy
shared machine slows all of them alike. The table reports medians over `--rounds`
and the ratio of PyTorch's median step time to JAX's (> 1 = JAX faster), with the
range of the per-round ratios. torch runs with OMP_WAIT_POLICY=PASSIVE unless told
otherwise (`--omp_wait_policy`; libgomp's spinning default made PyTorch several
times slower on a shared 2-core machine while other processes held the cores).

  python -m benchmarks.encoder_step          # small (RoBERTa) and minilm-l6 (BERT), 16 x 128
  python -m benchmarks.encoder_step --sizes=base --batch_size=32 --seq_len=128
  python -m benchmarks.encoder_step --sizes=large --dtype=bfloat16 --notorch  # a GPU/TPU

Sizes: `apollo.models.roberta.model` presets (tiny, small, base, large) and
`apollo.models.bert.model`'s minilm-l6 (all-MiniLM-L6-v2: 6 layers, width 384, 12
heads, MLP 1536, vocabulary 30522), all with fresh random weights.

FLOPs. "Model FLOPs" are counted analytically (as in the PaLM paper's MFU): per
token and layer 2 * (4 d^2 + 2 d f) for the matmuls plus 4 L d for attention
scores and values; the S-MLM head 2 (d^2 + d V) per predicted position (only the
`mlm_max_predictions` positions are scored), the E-CLS head per sequence; a
train step is 3x the forward. XLA's own count
(`jit(...).lower(...).compile().cost_analysis()['flops']`) is printed beside it
as a cross-check (it includes the optimizer and the elementwise work).

Peak FLOP/s (`--peak_flops`, 0 = the platform default): on CPU the measured rate
of a large jitted float32 matmul on this machine (so CPU MFU means "share of
achievable matmul throughput"); on GPU/TPU the vendor's dense peak for the
compute dtype, from the table `_PEAK_FLOPS` (H100/H200 SXM: 989 TFLOP/s bf16,
494 TFLOP/s TF32 which XLA uses for float32 matmuls by default; A100: 312 / 156;
TPU v4: 275, v5e: 197, v5p: 459, v6e: 918 bf16).

Tokens/s counts all B * L positions (padding included; the synthetic batches
have none). Only the CPU row of the PyTorch comparison is meaningful (torch here
is the CPU build).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from apollo.common import mesh as mesh_lib
from apollo.lm import pretrain
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.models.bert import model as bert_model
from apollo.models.roberta import model as model_lib

_BERT_SIZES = ("minilm-l6",)
_SIZES = flags.DEFINE_list(
  "sizes",
  ["small", "minilm-l6"],
  f"Encoder presets: {', '.join(model_lib.PRESET_NAMES)} (RoBERTa) or "
  f"{', '.join(_BERT_SIZES)} (BERT).",
)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed rounds (one step of each per round).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps of each (compilation, caches).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["apollo", "adamw"], "JAX optimizers to time.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' step if importable.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s for MFU; 0 = platform default.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads; 0 = all cores.")
_OMP_WAIT_POLICY = flags.DEFINE_string(
  "omp_wait_policy", "PASSIVE", "OMP_WAIT_POLICY for torch, set before it loads ('' = unset)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Synthetic batch and round order.")


# Dense peak FLOP/s by device kind substring: (bf16, float32-as-executed).
_PEAK_FLOPS = {
  "H100": (989e12, 494e12),
  "H200": (989e12, 494e12),
  "A100": (312e12, 156e12),
  "TPU v4": (275e12, 275e12),
  "TPU v5 lite": (197e12, 197e12),
  "TPU v5e": (197e12, 197e12),
  "TPU v5p": (459e12, 459e12),
  "TPU v6": (918e12, 918e12),
}


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted float32 n x n matmul (the CPU's achievable peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def peak_flops(dtype: str) -> tuple[float, str]:
  if _PEAK.value > 0:
    return _PEAK.value, "--peak_flops"
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measured_matmul_flops(), "measured f32 matmul"
  for key, (bf16, f32) in _PEAK_FLOPS.items():
    if key.lower() in device.device_kind.lower():
      return (bf16 if dtype == "bfloat16" else f32), f"{device.device_kind} spec"
  raise ValueError(f"No peak FLOP/s known for {device.device_kind!r}: pass --peak_flops.")


def model_flops_per_step(
  c: model_lib.EncoderConfig, batch: int, length: int, predictions: int
) -> float:
  """Analytic training FLOPs of one step (3x forward; see the module docstring)."""
  d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
  per_token_layer = 2 * (4 * d * d + 2 * d * f) + 4 * length * d
  forward = batch * length * c.num_layers * per_token_layer
  forward += batch * predictions * 2 * (d * d + d * v)  # S-MLM head at the targets.
  forward += batch * 2 * (d * d + d * c.num_ecls_labels)  # E-CLS head on <s>.
  return 3.0 * forward


def synthetic_batch(
  c: model_lib.EncoderConfig, batch: int, length: int, predictions: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Full-length sentences with `predictions` S-MLM targets each."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, c.vocab_size, size=(batch, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 0, 2
  weights = np.zeros((batch, length), np.float32)
  for row in range(batch):
    weights[row, rng.choice(np.arange(1, length - 1), predictions, replace=False)] = 1.0
  labels = np.where(weights > 0, ids, -100).astype(np.int32)
  ids = np.where(weights > 0, 4, ids).astype(np.int32)  # <mask>
  ecls = rng.integers(0, 2, size=batch).astype(np.int32)
  return dict(
    input_ids=ids,
    attention_mask=np.ones_like(ids),
    mlm_labels=labels,
    mlm_weights=weights,
    ecls_label=ecls,
    ecls_perturbation=ecls,
    example_mask=np.ones(batch, np.int32),
  )


def encoder_config(size: str, dtype: str, length: int) -> model_lib.EncoderConfig:
  """The preset `size` (RoBERTa or BERT) with room for `length` tokens."""
  get = bert_model.get_config if size in _BERT_SIZES else model_lib.get_config
  base = get(size)
  return get(
    size, dtype=dtype, max_position_embeddings=max(length + 2, base.max_position_embeddings)
  )


class JaxStep:
  """The trainer's jitted, donated `pretrain.train_step` with `optimizer`, on one batch."""

  def __init__(self, optimizer: str, model_config, batch_np, predictions: int):
    self.name = f"JAX/Flax NNX + {optimizer}"
    config = pretrain_configs.get_config("quickstart")
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = 1e-2 if optimizer == "apollo" else 1e-4
    config.train_steps = 1000
    config.mlm_max_predictions = predictions
    config.mesh.data = jax.device_count()
    mesh = mesh_lib.make_mesh(jax.device_count(), 1, 1, axis_type="auto")
    setup = pretrain.make_setup(config, model_config, mesh)
    self.state = pretrain.init_state(config, setup)
    step = jax.jit(
      functools.partial(
        pretrain.train_step,
        graphdef=setup.graphdef,
        optimizer=setup.optimizer,
        lr_schedule=setup.lr_schedule,
        ecls_weight=1.0,
        max_predictions=predictions,
      ),
      out_shardings=(setup.state_shardings, None),
      donate_argnums=0,
    )
    self.batch = mesh_lib.shard_batch(batch_np, mesh)
    self._step = step.lower(self.state, self.batch).compile()
    cost = self._step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_flops = float((cost or {}).get("flops", float("nan")))

  def __call__(self) -> None:
    self.state, metrics = self._step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))


class TorchStep:
  """transformers' masked-LM model + RobertaClassificationHead, AdamW, same loss and batch."""

  name = "PyTorch transformers + AdamW"
  xla_flops = float("nan")

  def __init__(self, model_config, batch_np, predictions: int):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from transformers.models.roberta import modeling_roberta  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count() or 1)
    c = model_config
    bert = c.position_scheme == "absolute"
    hf_config = (transformers.BertConfig if bert else transformers.RobertaConfig)(
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads,
      intermediate_size=c.intermediate_size,
      max_position_embeddings=c.max_position_embeddings,
      type_vocab_size=c.type_vocab_size,
      layer_norm_eps=c.layer_norm_eps,
      pad_token_id=c.pad_token_id,
      num_labels=c.num_ecls_labels,
    )
    masked_lm = (transformers.BertForMaskedLM if bert else transformers.RobertaForMaskedLM)(
      hf_config
    ).train()
    trunk, mlm_head = (
      (masked_lm.bert, masked_lm.cls) if bert else (masked_lm.roberta, masked_lm.lm_head)
    )
    ecls = modeling_roberta.RobertaClassificationHead(hf_config).train()
    dtype = torch.bfloat16 if c.dtype == jnp.bfloat16 else torch.float32
    masked_lm, ecls = masked_lm.to(dtype), ecls.to(dtype)
    params = list(masked_lm.parameters()) + list(ecls.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.from_numpy(batch_np["input_ids"]).long()
    mask = torch.from_numpy(batch_np["attention_mask"]).long()
    weights = torch.from_numpy(batch_np["mlm_weights"])
    positions = torch.argsort(-weights, dim=1, stable=True)[:, :predictions]
    labels = torch.gather(torch.from_numpy(batch_np["mlm_labels"]).long(), 1, positions)
    ecls_labels = torch.from_numpy(batch_np["ecls_label"]).long()

    def step():
      hidden = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
      picked = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
      mlm_logits = mlm_head(picked).float()
      loss = torch.nn.functional.cross_entropy(
        mlm_logits.reshape(-1, c.vocab_size), labels.reshape(-1)
      )
      loss = loss + torch.nn.functional.cross_entropy(ecls(hidden).float(), ecls_labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()

    self._step = step

  def __call__(self) -> None:
    self._step()


def time_round_robin(runners, rounds: int, warmup: int, rng) -> list[np.ndarray]:
  """Seconds of every timed step of each runner: `warmup` untimed steps each, then
  `rounds` rounds of one step of each in a shuffled order."""
  for runner in runners:
    for _ in range(warmup):
      runner()
  seconds = [[] for _ in runners]
  for _ in range(rounds):
    for i in rng.permutation(len(runners)):
      start = time.perf_counter()
      runners[i]()
      seconds[i].append(time.perf_counter() - start)
  return [np.asarray(s) for s in seconds]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _OMP_WAIT_POLICY.value and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = _OMP_WAIT_POLICY.value
  batch, length = _BATCH.value, _SEQ_LEN.value
  predictions = max(1, round(0.15 * (length - 2)))
  tokens = batch * length
  peak, peak_source = peak_flops(_DTYPE.value)
  device = jax.devices()[0]
  rng = np.random.default_rng(_SEED.value)
  print(
    f"# APOLLO pretraining step, batch {batch} x {length}, {predictions} S-MLM positions/row, "
    f"{_DTYPE.value}; medians of {_ROUNDS.value} round-robin rounds"
  )
  print(
    f"# device: {jax.device_count()} x {device.device_kind} ({device.platform}), "
    f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start; "
    f"peak {peak / 1e12:.3f} TFLOP/s ({peak_source})"
  )
  table = [
    "| model | step | ms/step | tokens/s | model TFLOP/s | MFU | XLA GFLOP/step "
    "| vs PyTorch (per-round range) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for size in _SIZES.value:
    model_config = encoder_config(size, _DTYPE.value, length)
    batch_np = synthetic_batch(model_config, batch, length, predictions, seed=_SEED.value)
    flops = model_flops_per_step(model_config, batch, length, predictions)
    params = mesh_lib.count_params(
      nnx.eval_shape(lambda c=model_config: model_lib.PretrainingModel(c, rngs=nnx.Rngs(0)))
    )
    label = f"{size} ({params / 1e6:.1f}M)"
    runners = [JaxStep(name, model_config, batch_np, predictions) for name in _OPTIMIZERS.value]
    if _TORCH.value:
      try:
        runners.append(TorchStep(model_config, batch_np, predictions))
      except ImportError as e:
        print(f"# PyTorch comparison skipped: {e}")
    seconds = time_round_robin(runners, _ROUNDS.value, _WARMUP.value, rng)
    torch_s = next((s for r, s in zip(runners, seconds) if isinstance(r, TorchStep)), None)
    for runner, s in zip(runners, seconds):
      median = float(np.median(s))
      ratio = "-"
      if torch_s is not None:
        per_round = torch_s / s
        ratio = (
          f"{float(np.median(torch_s)) / median:.2f}x ({per_round.min():.2f}-{per_round.max():.2f})"
        )
      xla = "-" if math.isnan(runner.xla_flops) else f"{runner.xla_flops / 1e9:.2f}"
      table.append(
        f"| {label} | {runner.name} | {median * 1e3:.0f} | {tokens / median:,.0f} | "
        f"{flops / median / 1e12:.4f} | {100 * flops / median / peak:.1f}% | {xla} | {ratio} |"
      )
    print(f"# {size}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
  print("\n".join(table))


if __name__ == "__main__":
  app.run(main)
