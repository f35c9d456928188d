r"""Apollo, ApolloW, AdamW and SGD train the same small network on real data.

The data is scikit-learn's bundled `load_digits` (1,797 8x8 handwritten digits,
shipped inside the wheel: no download), split 80/20 with a fixed seed. The model
is a small Flax NNX MLP; the train step is a JAX-pure function of
(params, optimizer state, batch), data-parallel over every local device (a 1-D
'data' mesh, the batch sharded and the state replicated) with the state donated.
Every optimizer starts from the same initial parameters and sees the same batches.

Per epoch it logs the train loss, test loss and test accuracy; at the end it saves
`loss.png`, `accuracy.png` and `results.json` under `--workdir` and prints a table.

Optimizer settings (the reference's CIFAR-10 settings, scaled to ~25 updates per
epoch), each with a cosine decay of the peak rate over the whole run:
  apollo  lr 0.01, linear warmup from 1e-5 over 100 updates, L2 decay 2.5e-4
  apollow as apollo, decoupled decay 2.5e-2 instead of L2
  adamw   lr 1e-3, linear warmup from 0 over 100 updates, decoupled decay 1e-2
  sgd     lr 0.1, momentum 0.9, L2 decay 5e-4, no warmup

The entry point is `experiments/optim_demo.py`:

    python -m experiments.optim_demo --flagfile=experiments/flags/optim_demo.flags

References:
  X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
  Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020; the CIFAR-10 settings
  of the reference implementation, github.com/XuezheMax/apollo.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from apollo.optim import apollo

OPTIMIZERS = ("apollo", "apollow", "adamw", "sgd")


class MLP(nnx.Module):
  """A two-hidden-layer perceptron for 8x8 images."""

  def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(features, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.logits = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.logits(x)


def load_digits_split(seed: int, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
  """The 1,797 bundled digits as float32 [N, 64] in [0, 1], split with `seed`."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(test_fraction * len(labels)))
  test, train = order[:n_test], order[n_test:]
  return {
    "train_image": images[train],
    "train_label": labels[train],
    "test_image": images[test],
    "test_label": labels[test],
  }


def make_optimizer(name: str, total_steps: int, warmup_steps: int) -> optax.GradientTransformation:
  """The optimizers compared, each with a cosine decay over `total_steps`."""
  cosine = lambda peak: optax.cosine_decay_schedule(peak, max(total_steps, 1))
  if name == "apollo":
    # The built-in warmup ramps from init_lr up to the cosine's current value.
    return apollo(
      cosine(1e-2), warmup=warmup_steps, init_lr=1e-5, weight_decay=2.5e-4, weight_decay_type="L2"
    )
  if name == "apollow":
    return apollo(
      cosine(1e-2),
      warmup=warmup_steps,
      init_lr=1e-5,
      weight_decay=2.5e-2,
      weight_decay_type="decoupled",
    )
  if name == "adamw":
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1e-3, min(warmup_steps, total_steps - 1), max(total_steps, 1)
    )
    return optax.adamw(schedule, weight_decay=1e-2)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(cosine(0.1), momentum=0.9))
  raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")


def cross_entropy_sums(model: MLP, image: jax.Array, label: jax.Array, weight: jax.Array):
  """Summed loss, correct predictions and example count (weight 0 marks padding)."""
  logits = model(image)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
  return {
    "loss": jnp.sum(weight * loss),
    "correct": jnp.sum(weight * correct),
    "count": jnp.sum(weight),
  }


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state, batch):
  """One update: (params, opt_state), batch -> new (params, opt_state), metric sums."""
  params, opt_state = state

  def loss_fn(params):
    sums = cross_entropy_sums(
      nnx.merge(graphdef, params), batch["image"], batch["label"], batch["weight"]
    )
    return sums["loss"] / sums["count"], sums

  grads, sums = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state), sums


def eval_step(graphdef: nnx.GraphDef, params, batch):
  return cross_entropy_sums(
    nnx.merge(graphdef, params), batch["image"], batch["label"], batch["weight"]
  )


def _padded_batches(images, labels, batch_size: int, order=None, drop_last=False):
  """Yields batches of exactly `batch_size`; the last one padded with weight 0."""
  n = len(labels)
  order = np.arange(n) if order is None else order
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    pad = batch_size - len(idx)
    weight = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
    idx = np.concatenate([idx, np.zeros(pad, idx.dtype)])
    yield {"image": images[idx], "label": labels[idx], "weight": weight}


def train_one(
  name: str,
  data: dict[str, np.ndarray],
  epochs: int,
  batch_size: int,
  seed: int,
  warmup_steps: int,
  mesh: jax.sharding.Mesh,
  log: Callable[[str], None],
) -> dict[str, Any]:
  """Trains one optimizer from the seed's initial parameters; returns its curves."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  steps_per_epoch = len(data["train_label"]) // batch_size
  tx = make_optimizer(name, epochs * steps_per_epoch, warmup_steps)

  model = MLP(data["train_image"].shape[1], 128, 10, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  state = jax.device_put((params, tx.init(params)), replicated)
  train = jax.jit(
    functools.partial(train_step, graphdef, tx),
    donate_argnums=0,
    in_shardings=(replicated, batch_sharding),
    out_shardings=(replicated, replicated),
  )
  evaluate = jax.jit(
    functools.partial(eval_step, graphdef),
    in_shardings=(replicated, batch_sharding),
    out_shardings=replicated,
  )
  put = lambda batch: jax.make_array_from_process_local_data(batch_sharding, batch)
  put_batch = lambda batch: {k: put(v) for k, v in batch.items()}

  curves = {"train_loss": [], "train_accuracy": [], "test_loss": [], "test_accuracy": []}
  start = time.perf_counter()
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(data["train_label"]))
    sums = []
    for batch in _padded_batches(
      data["train_image"], data["train_label"], batch_size, order, drop_last=True
    ):
      state, step_sums = train(state, put_batch(batch))
      sums.append(step_sums)
    train_sums = jax.tree.map(lambda *x: float(np.sum(x)), *sums)
    test_sums = jax.tree.map(
      lambda *x: float(np.sum(x)),
      *[
        evaluate(state[0], put_batch(b))
        for b in _padded_batches(data["test_image"], data["test_label"], batch_size)
      ],
    )
    train_loss = train_sums["loss"] / train_sums["count"]
    if not np.isfinite(train_loss):
      raise FloatingPointError(f"{name}: non-finite train loss at epoch {epoch + 1}.")
    curves["train_loss"].append(train_loss)
    curves["train_accuracy"].append(train_sums["correct"] / train_sums["count"])
    curves["test_loss"].append(test_sums["loss"] / test_sums["count"])
    curves["test_accuracy"].append(test_sums["correct"] / test_sums["count"])
    log(
      f"{name:8s} epoch {epoch + 1:3d}: train loss {train_loss:.4f}  test loss "
      f"{curves['test_loss'][-1]:.4f}  test acc {curves['test_accuracy'][-1]:.4f}"
    )
  curves["wall_s"] = time.perf_counter() - start
  curves["steps"] = epochs * steps_per_epoch
  return curves


def save_plots(results: dict[str, dict[str, Any]], workdir: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  for metric, ylabel, filename in (
    ("loss", "cross-entropy", "loss.png"),
    ("accuracy", "accuracy", "accuracy.png"),
  ):
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, curves) in enumerate(results.items()):
      epochs = np.arange(1, len(curves[f"test_{metric}"]) + 1)
      color = f"C{i}"
      ax.plot(epochs, curves[f"train_{metric}"], color=color, label=f"{name} train")
      ax.plot(epochs, curves[f"test_{metric}"], color=color, ls="--", label=f"{name} test")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if metric == "loss":
      ax.set_yscale("log")
    ax.set_title(f"digits MLP: {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, filename), dpi=120)
    plt.close(fig)


def format_table(results: dict[str, dict[str, Any]]) -> str:
  rows = [
    "| optimizer | final train loss | final test loss | test accuracy | best test "
    "accuracy | wall s |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name, c in results.items():
    rows.append(
      f"| {name} | {c['train_loss'][-1]:.4f} | {c['test_loss'][-1]:.4f} | "
      f"{c['test_accuracy'][-1]:.4f} | {max(c['test_accuracy']):.4f} | "
      f"{c['wall_s']:.1f} |"
    )
  return "\n".join(rows)


def run_demo(
  workdir: str,
  epochs: int = 40,
  batch_size: int = 64,
  seed: int = 0,
  optimizers: Sequence[str] = OPTIMIZERS,
  warmup_steps: int = 100,
  train_examples: int | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains every optimizer, writes loss.png, accuracy.png, results.json; returns them.

  `train_examples` keeps only the first N training examples (for smoke tests).
  """
  unknown = set(optimizers) - set(OPTIMIZERS)
  if unknown:
    raise ValueError(f"Unknown optimizers {sorted(unknown)}; choose from {OPTIMIZERS}.")
  n_devices = jax.device_count()
  if batch_size % n_devices:
    raise ValueError(f"batch_size {batch_size} must be divisible by {n_devices} devices.")
  mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(AxisType.Auto,))
  data = load_digits_split(seed)
  if train_examples is not None:
    data["train_image"] = data["train_image"][:train_examples]
    data["train_label"] = data["train_label"][:train_examples]
  if len(data["train_label"]) < batch_size:
    raise ValueError(f"{len(data['train_label'])} training examples < batch_size {batch_size}.")
  os.makedirs(workdir, exist_ok=True)
  log(
    f"digits: {len(data['train_label'])} train / {len(data['test_label'])} test examples; "
    f"{n_devices} {jax.default_backend()} device(s); batch {batch_size}; {epochs} epochs"
  )

  curves = {
    name: train_one(name, data, epochs, batch_size, seed, warmup_steps, mesh, log)
    for name in optimizers
  }
  save_plots(curves, workdir)
  results = {
    "config": {
      "epochs": epochs,
      "batch_size": batch_size,
      "seed": seed,
      "warmup_steps": warmup_steps,
      "train_examples": len(data["train_label"]),
      "test_examples": len(data["test_label"]),
      "devices": n_devices,
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
    },
    "optimizers": curves,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  log("\n" + format_table(curves))
  return results
