r"""Step time and state bytes of `apollo` against `optax.adamw` and `optax.adam`.

Every optimizer updates the same transformer-shaped parameter tree with the same
fixed gradients. The timed step is

    jax.jit(step, donate_argnums=(0, 1))
    step(params, opt_state, grads) -> (params, opt_state)   # tx.update + apply_updates

so only the optimizer is measured. After one compile-and-warm-up pass per
optimizer, the optimizers are timed round-robin (one step each per round, with
`jax.block_until_ready`), so that noise from a shared machine hits all of them
alike; the table reports medians, p10/p90, the ratio of medians to adamw's and
the median of per-round ratios ("paired"). `apollo_separate_sums` is an
ablation: apollo with every tensor's sums as three separate reductions, which is
what large tensors did before their one-pass form. When torch is
installed (it is not a dependency), `torch_apollo` times the reference PyTorch
algorithm (`benchmarks/torch_apollo.py`) on the same tree.

Targets: apollo's step <= 2.0x adamw's (memory traffic bound ~1.86x: apollo reads
g, m, B, d for its per-tensor reductions, then reads g, m, B, d, p and writes m, B,
d, p; adamw reads four arrays and writes three); optimizer state exactly 1.5x
adamw's (three arrays per parameter against two); no full-size temporaries
(`temp_size_in_bytes` of the compiled step); faster than the PyTorch reference.

    python -m benchmarks.optim_step                       # ~25M params, CPU
    python -m benchmarks.optim_step --size=tiny --steps=5 # smoke run
    python -m benchmarks.optim_step --size=gpu350m        # on a GPU
    python -m benchmarks.optim_step --optimizers=apollo,apollo_separate_sums,adamw \
        --json_out=/tmp/optim_step.json

The measured tables are in the README ("Speed and memory").

References:
  X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
  Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020; reference
  implementation github.com/XuezheMax/apollo.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import sys
import time
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from apollo.optim import apollo

apollo_lib = importlib.import_module("apollo.optim.apollo")  # The module, not the function.

# name: (vocab, d_model, layers). ~params = vocab*d + layers*(12 d^2 + 13 d) + 2 d.
SIZES = {
  "tiny": (512, 64, 2),  # ~0.13M: a smoke run in seconds.
  "cpu25m": (12288, 512, 6),  # ~25.2M.
  "gpu350m": (50304, 1024, 24),  # ~354M.
}
# apollo_separate_sums: apollo with every tensor's three sums as separate
# reductions (the one-pass form of large tensors switched off), an ablation.
JAX_OPTIMIZERS = ("apollo", "apollo_separate_sums", "adamw", "adam")
TORCH_OPTIMIZERS = ("torch_apollo", "torch_adamw")

_SIZE = flags.DEFINE_enum("size", "cpu25m", list(SIZES), "Preset tree size.")
_D_MODEL = flags.DEFINE_integer("d_model", None, "Overrides the preset's width.")
_LAYERS = flags.DEFINE_integer("layers", None, "Overrides the preset's depth.")
_VOCAB = flags.DEFINE_integer("vocab", None, "Overrides the preset's vocabulary.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed rounds per trial (one step per optimizer each).")
_TRIALS = flags.DEFINE_integer("trials", 5, "Trials, each with fresh buffers for every optimizer.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compiling.")
_OPTIMIZERS = flags.DEFINE_list(
  "optimizers",
  "apollo,adamw,adam,torch_apollo",
  f"Any of {JAX_OPTIMIZERS + TORCH_OPTIMIZERS}; torch_* are skipped without torch.",
)
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Parameter, gradient and state dtype."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and gradients.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def transformer_shapes(vocab: int, d_model: int, layers: int) -> dict[str, Any]:
  """Shapes of a decoder-only transformer: big matrices and many small vectors."""
  d, f = d_model, 4 * d_model

  def layer():
    return {
      "ln1": {"scale": (d,), "bias": (d,)},
      "attn": {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d)},
      "ln2": {"scale": (d,), "bias": (d,)},
      "mlp": {"w_in": (d, f), "b_in": (f,), "w_out": (f, d), "b_out": (d,)},
    }

  tree = {"embed": (vocab, d), "final_ln": {"scale": (d,), "bias": (d,)}}
  tree.update({f"layer_{i:02d}": layer() for i in range(layers)})
  return tree


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def random_tree(shapes, key: jax.Array, scale: float, dtype) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(key, len(leaves))
  arrays = [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, [a.astype(dtype) for a in arrays])


def make_jax_optimizer(name: str) -> optax.GradientTransformation:
  if name in ("apollo", "apollo_separate_sums"):
    return apollo(1e-2, warmup=100)
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=1e-2)
  if name == "adam":
    return optax.adam(1e-3)
  raise ValueError(f"Unknown optimizer {name!r}.")


def _tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _percentiles(times_s: list[float]) -> dict[str, float]:
  ms = 1e3 * np.asarray(times_s)
  return {
    "median_ms": float(np.median(ms)),
    "p10_ms": float(np.percentile(ms, 10)),
    "p90_ms": float(np.percentile(ms, 90)),
  }


class JaxRunner:
  """One optax optimizer: its own params and state, advanced by a donated jit step."""

  def __init__(self, name: str, params, grads):
    self.name = name
    tx = make_jax_optimizer(name)

    def step(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._source, self.grads = params, grads
    self._init = jax.jit(tx.init)
    self.reset()
    self.state_bytes = _tree_bytes(self.opt_state)
    self.state_array_bytes = _tree_bytes([x for x in jax.tree.leaves(self.opt_state) if x.ndim])
    self.state_leaves = len(jax.tree.leaves(self.opt_state))
    one_pass_from = (
      sys.maxsize if name == "apollo_separate_sums" else apollo_lib.FUSED_SUMS_MIN_SIZE
    )
    with mock.patch.object(apollo_lib, "FUSED_SUMS_MIN_SIZE", one_pass_from):
      compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.opt_state, grads).compile()
      )
    memory = compiled.memory_analysis()
    self.temp_bytes = None if memory is None else int(memory.temp_size_in_bytes)
    self.hlo_text = compiled.as_text()
    self._step = compiled

  def reset(self) -> None:
    """Fresh copies of the params and a fresh state (the step donates its inputs)."""
    self.params = self.opt_state = None  # Freed first: one copy in memory at a time.
    self.params = jax.tree.map(jnp.copy, self._source)
    self.opt_state = self._init(self.params)

  def step(self) -> float:
    start = time.perf_counter()
    self.params, self.opt_state = self._step(self.params, self.opt_state, self.grads)
    jax.block_until_ready((self.params, self.opt_state))
    return time.perf_counter() - start


class TorchRunner:
  """A torch optimizer on a copy of the same tree (CPU, the same thread count)."""

  def __init__(self, name: str, params, grads):
    import torch  # pylint: disable=import-outside-toplevel

    if name not in TORCH_OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {name!r}.")
    torch.set_num_threads(_cpu_count())
    self.name, self.temp_bytes, self.hlo_text = name, None, ""
    self._source, self._grads = params, grads
    self.reset()
    state = [
      t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]
    self.state_bytes = int(sum(t.numel() * t.element_size() for t in state))
    self.state_array_bytes = int(sum(t.numel() * t.element_size() for t in state if t.ndim))
    self.state_leaves = len(state)

  def reset(self) -> None:
    """Fresh parameter tensors and a fresh optimizer (its state made by one step)."""
    import torch  # pylint: disable=import-outside-toplevel

    self.params = self.optimizer = None
    to_torch = lambda x: torch.from_numpy(np.array(x, np.float32))
    if jnp.dtype(jax.tree.leaves(self._source)[0].dtype) == jnp.bfloat16:
      to_torch_dtype = lambda x: to_torch(x).to(torch.bfloat16)
    else:
      to_torch_dtype = to_torch
    self.params = [torch.nn.Parameter(to_torch_dtype(p)) for p in jax.tree.leaves(self._source)]
    for p, g in zip(self.params, jax.tree.leaves(self._grads)):
      p.grad = to_torch_dtype(g)
    if self.name == "torch_apollo":
      from benchmarks.torch_apollo import TorchApollo  # pylint: disable=import-outside-toplevel

      self.optimizer = TorchApollo(self.params, lr=1e-2, warmup=100)
    else:
      self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=1e-2)
    self.optimizer.step()  # Creates the state, like `init`.

  def step(self) -> float:
    start = time.perf_counter()
    self.optimizer.step()
    return time.perf_counter() - start


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


_HLO_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_HLO_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_HLO_FREE = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def _hlo_arrays(type_text: str) -> list[tuple[int, int]]:
  """(elements, bytes) of every array in an HLO type such as `(f32[4,8]{1,0}, s32[])`."""
  out = []
  for dtype, dims in _HLO_ARRAY.findall(type_text):
    elements = int(np.prod([int(n) for n in dims.split(",") if n]))
    out.append((elements, elements * _HLO_BYTES[dtype]))
  return out


def hlo_traffic(hlo_text: str, largest: int) -> dict[str, int]:
  """What the compiled step's top level does to memory, from `compiled.as_text()`.

  Every top-level instruction of the entry computation (a fusion, a copy, a
  library call) reads its operands from memory and writes its result; summing
  their sizes estimates the step's memory traffic, and counting the
  instructions that touch the largest tensor counts the passes over it (an ideal
  apollo needs two: one fused reduction, one fused update; adamw needs one).
  """
  lines = hlo_text.split("\nENTRY ", 1)[-1].splitlines()[1:]
  sizes: dict[str, list[tuple[int, int]]] = {}
  traffic = passes = ops = 0
  for line in lines:
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if not match:
      continue
    name, rest = match.group(1), line[match.end() :]
    if rest.startswith("("):  # A tuple type: up to its matching parenthesis.
      depth = 0
      for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
          break
      type_text, rest = rest[: i + 1], rest[i + 1 :].lstrip()
    else:
      type_text, _, rest = rest.partition(" ")
    opcode = rest.split("(", 1)[0]
    sizes[name] = _hlo_arrays(type_text)
    if opcode in _HLO_FREE:
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    arrays = sizes[name] + [a for op in operands for a in sizes.get(op, [])]
    ops += 1
    traffic += sum(b for _, b in arrays)
    passes += any(e == largest for e, _ in arrays)
  return {"top_level_ops": ops, "passes_over_largest": passes, "traffic_bytes": traffic}


def run_benchmark(
  shapes, optimizers, steps: int, warmup_steps: int, dtype, seed: int, trials: int = 1
) -> dict[str, Any]:
  """Builds the tree, compiles every optimizer, then times them in `trials` trials.

  Each trial gives every optimizer fresh buffers (after a spacer allocation of
  random size, which moves where they land) and warms it up, then runs `steps`
  rounds of one step per optimizer in a shuffled order. On the 2-core CPU here,
  adamw's step moved by up to 25% between trials of one run while interleaved
  with the other optimizers; fresh buffers and shuffled rounds spread such
  effects over all optimizers, and the per-trial ratios show how large they are.
  """
  key_p, key_g = jax.random.split(jax.random.key(seed))
  params = random_tree(shapes, key_p, 0.02, dtype)
  grads = random_tree(shapes, key_g, 1e-3, dtype)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))

  runners = []
  for name in optimizers:
    if name in TORCH_OPTIMIZERS and not _torch_available():
      print(f"skipping {name}: torch is not installed")
      continue
    runner_cls = TorchRunner if name in TORCH_OPTIMIZERS else JaxRunner
    start = time.perf_counter()
    runners.append(runner_cls(name, params, grads))
    print(f"{name}: set up and compiled in {time.perf_counter() - start:.1f} s")

  rng = np.random.default_rng(seed)
  times = {r.name: [] for r in runners}
  trial_medians = {r.name: [] for r in runners}
  for _ in range(trials):
    jnp.ones(int(rng.integers(1, 1 << 22)), jnp.uint8)  # Kept for the trial.
    for runner in runners:
      runner.reset()
      for _ in range(warmup_steps):
        runner.step()
    trial_times = {r.name: [] for r in runners}
    for _ in range(steps):
      for i in rng.permutation(len(runners)):
        trial_times[runners[i].name].append(runners[i].step())
    for name, ts in trial_times.items():
      times[name].extend(ts)
      trial_medians[name].append(1e3 * float(np.median(ts)))

  largest = max(x.size for x in jax.tree.leaves(params))
  results = {}
  for runner in runners:
    entry = dict(
      _percentiles(times[runner.name]),
      min_ms=1e3 * min(times[runner.name]),
      state_bytes=runner.state_bytes,
      state_array_bytes=runner.state_array_bytes,
      state_leaves=runner.state_leaves,
      temp_bytes=runner.temp_bytes,
      hlo=hlo_traffic(runner.hlo_text, largest) if runner.hlo_text else None,
      times_ms=[1e3 * t for t in times[runner.name]],
      trial_median_ms=trial_medians[runner.name],
    )
    results[runner.name] = entry
  base = results.get("adamw")
  ratio = lambda a, b: None if a is None or not b else a / b
  for entry in results.values():
    entry["time_ratio_to_adamw"] = ratio(entry["median_ms"], base and base["median_ms"])
    # The median over rounds of this round's time / adamw's time in the same round:
    # a slow stretch of a shared machine hits both sides of each ratio.
    entry["paired_ratio_to_adamw"] = (
      None
      if base is None
      else float(np.median(np.asarray(entry["times_ms"]) / np.asarray(base["times_ms"])))
    )
    entry["trial_ratios_to_adamw"] = (
      None
      if base is None
      else [a / b for a, b in zip(entry["trial_median_ms"], base["trial_median_ms"])]
    )
    entry["state_ratio_to_adamw"] = ratio(entry["state_bytes"], base and base["state_bytes"])
    entry["state_array_ratio_to_adamw"] = ratio(
      entry["state_array_bytes"], base and base["state_array_bytes"]
    )
    entry["traffic_ratio_to_adamw"] = ratio(
      entry["hlo"] and entry["hlo"]["traffic_bytes"],
      base and base["hlo"] and base["hlo"]["traffic_bytes"],
    )
  return {
    "n_params": n_params,
    "param_bytes": _tree_bytes(params),
    "n_leaves": len(jax.tree.leaves(params)),
    "largest_leaf": int(largest),
    "results": results,
  }


def machine_info() -> dict[str, Any]:
  device = jax.devices()[0]
  info = {
    "cpu_count": _cpu_count(),
    "platform": platform.platform(),
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
  }
  if _torch_available():
    import torch  # pylint: disable=import-outside-toplevel

    info["torch_version"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  return info


def format_table(report: dict[str, Any]) -> str:
  """The results as a markdown table."""
  fmt = lambda x, f: "n/a" if x is None else format(x, f)
  rows = [
    "| optimizer | median ms | p10 ms | p90 ms | time x adamw | paired x adamw | "
    "trials x adamw | state bytes (arrays + counts) | state x adamw (arrays) | temp "
    "bytes | passes over largest | HLO traffic x adamw |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in report["results"].items():
    hlo = r["hlo"] or {}
    ratios = r["trial_ratios_to_adamw"]
    trials = "n/a" if not ratios else f"{min(ratios):.2f}-{max(ratios):.2f}"
    rows.append(
      f"| {name} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
      f"{fmt(r['time_ratio_to_adamw'], '.2f')} | "
      f"{fmt(r['paired_ratio_to_adamw'], '.2f')} | {trials} | {r['state_array_bytes']:,} + "
      f"{r['state_bytes'] - r['state_array_bytes']} | "
      f"{fmt(r['state_array_ratio_to_adamw'], '.4f')} | {fmt(r['temp_bytes'], ',')} | "
      f"{fmt(hlo.get('passes_over_largest'), 'd')} | "
      f"{fmt(r['traffic_ratio_to_adamw'], '.2f')} |"
    )
  return "\n".join(rows)


def main(argv):
  del argv
  vocab, d_model, layers = SIZES[_SIZE.value]
  vocab = _VOCAB.value or vocab
  d_model = _D_MODEL.value or d_model
  layers = _LAYERS.value or layers
  unknown = set(_OPTIMIZERS.value) - set(JAX_OPTIMIZERS + TORCH_OPTIMIZERS)
  if unknown:
    raise app.UsageError(f"Unknown optimizers {sorted(unknown)}.")
  dtype = jnp.dtype(_DTYPE.value)
  shapes = transformer_shapes(vocab, d_model, layers)
  report = run_benchmark(
    shapes, _OPTIMIZERS.value, _STEPS.value, _WARMUP_STEPS.value, dtype, _SEED.value, _TRIALS.value
  )
  report.update(
    machine=machine_info(),
    dtype=str(dtype),
    steps=_STEPS.value,
    warmup_steps=_WARMUP_STEPS.value,
    trials=_TRIALS.value,
    tree={"vocab": vocab, "d_model": d_model, "layers": layers},
  )
  m = report["machine"]
  print(
    f"\nmachine: {m['cpu_count']} CPUs | jax {m['jax_version']} | backend "
    f"{m['backend']} ({m['device_kind']}) | "
    + (
      f"torch {m['torch_version']} ({m['torch_threads']} threads)"
      if "torch_version" in m
      else "torch not installed"
    )
  )
  print(
    f"tree: vocab {vocab}, d_model {d_model}, {layers} layers -> "
    f"{report['n_params']:,} params in {report['n_leaves']} leaves "
    f"({report['param_bytes']:,} bytes, {report['dtype']}); "
    f"{report['trials']} trials x {report['steps']} rounds in shuffled order\n"
  )
  print(format_table(report))
  print(
    "\npaired: median over rounds of (this step / adamw's step in the same round); "
    "trials: the lowest and highest ratio of one trial's medians; "
    "temp bytes: the compiled step's scratch memory (memory_analysis); passes over "
    "largest: top-level HLO ops reading or writing the largest tensor; HLO traffic: "
    "bytes read + written by the top-level ops of the compiled step."
  )
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=2)
    print(f"\nwrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
