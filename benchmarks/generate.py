r"""Generation speed of the decoder's sampler against transformers' PyTorch `generate`.

For every batch size, the same random prompts (``--prompt_tokens`` ids each, no
padding) are continued greedily by :func:`apollo.models.llama.sampling.generate`
at every ``--cache_sizes`` entry and, when torch and transformers are installed
(they are not dependencies), by ``AutoModelForCausalLM.generate(do_sample=False)``
with ``torch.set_num_threads(--torch_threads)`` on the same weights. Every row is
forced to produce exactly the requested tokens (no stop token; transformers gets
``min_new_tokens``). Each implementation is timed twice per round, for 1 and for
``--new_tokens`` new tokens:

    prefill tokens/s = batch * prompt_tokens / t(1 new token)
    ms per decode step = (t(new_tokens) - t(1)) / (new_tokens - 1)
    decode tokens/s = batch / step

After one untimed call of each (compilation), the implementations are timed
round-robin (one call of each per round, in a shuffled order) so that a busy
shared machine slows all of them alike; the table reports medians over rounds and
ratios to transformers' tokens/s at the same batch size, measured in the same run.
transformers' cache grows with the tokens (no allocated size): its rows say
"dynamic". torch runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise
(`--omp_wait_policy`): with libgomp's spinning default, transformers ran 6-7x
slower on this shared 2-core machine while other processes held the cores.

    python -m benchmarks.generate                      # SmolLM2-135M, batch 1 and 8
    python -m benchmarks.generate --model=tiny --rounds=2 --new_tokens=8  # smoke run
    python -m benchmarks.generate --json_out=/tmp/generate.json

The measured table is in the README ("Generation speed").
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from apollo.models.llama import model as decoder_lib
from apollo.models.llama import sampling

_MODEL = flags.DEFINE_enum(
  "model", "smollm2", ["smollm2", "tiny"], "SmolLM2-135M-Instruct, or a random tiny decoder."
)
_MODEL_DIR = flags.DEFINE_string(
  "model_dir", "/tmp/smollm2_hf", "SmolLM2 converted to a HF directory (made if missing)."
)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_CACHE_SIZES = flags.DEFINE_list("cache_sizes", ["128", "1064"], "KV cache slots (JAX rows).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 64, "Prompt length of every row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (one call of each per round).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_TRANSFORMERS = flags.DEFINE_bool(
  "transformers", True, "Time transformers too when torch and transformers are installed."
)
# libgomp's default lets idle torch threads spin; on a shared machine whose other
# processes hold the cores, that made transformers' decoding 6-7x slower here
# (1,000 against 140 ms per token at batch 1). PASSIVE is its fairer setting there.
_OMP_WAIT_POLICY = flags.DEFINE_string(
  "omp_wait_policy", "PASSIVE", "OMP_WAIT_POLICY for torch, set before it loads ('' = unset)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompts (and of the tiny model).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the full report here.")

# Prompt ids are drawn above the special tokens of SmolLM2 (ids 0-16).
_FIRST_ORDINARY_ID = 17


def load_jax_model(name: str, model_dir: str, seed: int) -> tuple[decoder_lib.Decoder, str | None]:
  """The decoder, and the HF directory transformers can load it from (None for tiny)."""
  if name == "tiny":
    config = decoder_lib.get_config("tiny")
    make = lambda: decoder_lib.Decoder(config, rngs=nnx.Rngs(seed))
    return decoder_lib.create_sharded_model(make, None), None
  from apollo.models import gguf  # pylint: disable=import-outside-toplevel
  from apollo.models.llama import params  # pylint: disable=import-outside-toplevel

  if not os.path.exists(os.path.join(model_dir, "config.json")):
    gguf.convert_gguf(gguf.smollm2_gguf_path(), model_dir)
  model, _ = params.from_pretrained(model_dir)
  return model, model_dir


def _transformers_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


class JaxRunner:
  """`sampling.generate`, greedy, on one batch of prompts with one cache size."""

  def __init__(self, model, prompts: np.ndarray, cache_size: int, new_tokens: int):
    self.model, self.cache_size, self.new_tokens = model, cache_size, new_tokens
    self.prompts = jnp.asarray(prompts, jnp.int32)
    self.name, self.batch = "jax", prompts.shape[0]
    self.cache_label = str(cache_size)

  def generate(self, new_tokens: int) -> np.ndarray:
    out = sampling.generate(
      self.model, self.prompts, new_tokens, temperature=0, cache_size=self.cache_size
    )
    return np.asarray(jax.block_until_ready(out.tokens))


class TransformersRunner:
  """transformers' `generate(do_sample=False)` on the same prompts (CPU, float32)."""

  def __init__(self, hf_model, prompts: np.ndarray, new_tokens: int):
    import torch  # pylint: disable=import-outside-toplevel

    self.model, self.new_tokens = hf_model, new_tokens
    self.prompts = torch.from_numpy(prompts.astype(np.int64))
    self.mask = torch.ones_like(self.prompts)
    self.name, self.batch, self.cache_label = "transformers", prompts.shape[0], "dynamic"

  def generate(self, new_tokens: int) -> np.ndarray:
    import torch  # pylint: disable=import-outside-toplevel

    with torch.no_grad():
      out = self.model.generate(
        self.prompts,
        attention_mask=self.mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
      )
    return out[:, self.prompts.shape[1] :].numpy()


def load_transformers(model_dir: str, threads: int):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads)
  return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_benchmark(
  model,
  hf_model,
  batch_sizes,
  cache_sizes,
  prompt_tokens: int,
  new_tokens: int,
  rounds: int,
  seed: int,
) -> dict[str, Any]:
  """Compiles / warms up every runner, then times them round-robin for `rounds` rounds."""
  if new_tokens < 2:
    raise ValueError(f"new_tokens={new_tokens}: at least 2 to time a decoding step.")
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  runners = []
  for batch in batch_sizes:
    prompts = rng.integers(_FIRST_ORDINARY_ID, vocab, (batch, prompt_tokens))
    if hf_model is not None:
      runners.append(TransformersRunner(hf_model, prompts, new_tokens))
    for cache_size in cache_sizes:
      runners.append(JaxRunner(model, prompts, cache_size, new_tokens))

  tokens, warmup_s = {}, {}
  for i, runner in enumerate(runners):
    start = time.perf_counter()
    runner.generate(1)
    tokens[i] = runner.generate(new_tokens)
    warmup_s[i] = time.perf_counter() - start
    print(
      f"{runner.name} batch {runner.batch} cache {runner.cache_label}: first calls "
      f"(compilation included) {warmup_s[i]:.1f} s",
      flush=True,
    )

  first_s = {i: [] for i in range(len(runners))}
  full_s = {i: [] for i in range(len(runners))}
  for _ in range(rounds):
    for i in rng.permutation(len(runners)):
      for n, times in ((1, first_s), (new_tokens, full_s)):
        start = time.perf_counter()
        runners[i].generate(n)
        times[i].append(time.perf_counter() - start)

  rows = []
  for i, runner in enumerate(runners):
    first = np.asarray(first_s[i])
    steps = (np.asarray(full_s[i]) - first) / (new_tokens - 1)
    step_s = float(np.median(steps))
    rows.append(
      dict(
        implementation=runner.name,
        batch=runner.batch,
        cache=runner.cache_label,
        prefill_tokens_per_s=runner.batch * prompt_tokens / float(np.median(first)),
        decode_tokens_per_s=runner.batch / step_s,
        ms_per_decode_step=1e3 * step_s,
        first_token_ms=1e3 * float(np.median(first)),
        warmup_s=warmup_s[i],
        step_ms_per_round=(1e3 * steps).tolist(),
        tokens=tokens[i],
      )
    )
  reference = {r["batch"]: r for r in rows if r["implementation"] == "transformers"}
  for row in rows:
    ref = reference.get(row["batch"])
    for kind in ("prefill", "decode"):
      row[f"{kind}_ratio_to_transformers"] = (
        None if ref is None else row[f"{kind}_tokens_per_s"] / ref[f"{kind}_tokens_per_s"]
      )
    # Greedy tokens equal to transformers' (near-ties may flip over long runs).
    row["tokens_equal_to_transformers"] = (
      None if ref is None else float(np.mean(row["tokens"] == ref["tokens"]))
    )
  for row in rows:
    row.pop("tokens")
  return {"rows": rows}


def machine_info() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    cpus = os.cpu_count() or 1
  info = {
    "cpu": cpu,
    "cpu_count": cpus,
    "platform": platform.platform(),
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "load_average_at_start": os.getloadavg()[0],
  }
  if _transformers_available():
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    info["torch_version"] = torch.__version__
    info["transformers_version"] = transformers.__version__
  return info


def format_table(report: dict[str, Any]) -> str:
  """The rows as a markdown table."""
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
  lines = [
    "| implementation | batch | cache slots | prefill tok/s | decode tok/s | ms / decode step "
    "| prefill x transformers | decode x transformers |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in report["rows"]:
    lines.append(
      f"| {r['implementation']} | {r['batch']} | {r['cache']} | "
      f"{r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
      f"{r['ms_per_decode_step']:.1f} | {fmt(r['prefill_ratio_to_transformers'])} | "
      f"{fmt(r['decode_ratio_to_transformers'])} |"
    )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  cache_sizes = [int(c) for c in _CACHE_SIZES.value]
  prompt_tokens, new_tokens = _PROMPT_TOKENS.value, _NEW_TOKENS.value
  if min(cache_sizes) < prompt_tokens + new_tokens:
    raise app.UsageError(
      f"--cache_sizes={min(cache_sizes)} < prompt_tokens + new_tokens = "
      f"{prompt_tokens + new_tokens}."
    )
  if _OMP_WAIT_POLICY.value and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = _OMP_WAIT_POLICY.value
  model, hf_dir = load_jax_model(_MODEL.value, _MODEL_DIR.value, _SEED.value)
  hf_model = None
  if not _TRANSFORMERS.value or hf_dir is None:
    print("transformers rows: off (--notransformers or --model=tiny)")
  elif not _transformers_available():
    print("transformers rows: skipped, torch or transformers is not installed")
  else:
    hf_model = load_transformers(hf_dir, _TORCH_THREADS.value)
  report = run_benchmark(
    model,
    hf_model,
    batch_sizes,
    cache_sizes,
    prompt_tokens,
    new_tokens,
    _ROUNDS.value,
    _SEED.value,
  )
  machine = machine_info()
  machine["load_average_at_end"] = os.getloadavg()[0]
  if hf_model is not None:
    import torch  # pylint: disable=import-outside-toplevel

    machine["torch_threads"] = torch.get_num_threads()
    machine["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
  report.update(
    machine=machine,
    model=_MODEL.value,
    prompt_tokens=prompt_tokens,
    prompt_bucket=sampling.prompt_bucket(prompt_tokens),
    new_tokens=new_tokens,
    rounds=_ROUNDS.value,
  )
  m = machine
  print(
    f"\nmachine: {m['cpu']}, {m['cpu_count']} CPUs (load average {m['load_average_at_start']:.1f}"
    f" at start, {m['load_average_at_end']:.1f} at end) | jax {m['jax_version']} "
    f"({m['backend']}) | "
    + (
      f"torch {m['torch_version']} ({m['torch_threads']} threads, OMP_WAIT_POLICY="
      f"{m['omp_wait_policy'] or 'unset'}), transformers "
      f"{m['transformers_version']}"
      if hf_model is not None
      else "no transformers rows"
    )
  )
  print(
    f"model: {_MODEL.value}, float32 | prompts: {prompt_tokens} tokens (padded to "
    f"{report['prompt_bucket']}) | {new_tokens} new tokens, greedy | medians of "
    f"{_ROUNDS.value} rounds\n"
  )
  print(format_table(report))
  print(
    "\nprefill tok/s: batch * prompt tokens / time to the first new token; decode: "
    "per step of (t(new_tokens) - t(1)) / (new_tokens - 1); ratios: tokens/s over "
    "transformers' at the same batch size, in this run."
  )
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=2)
    print(f"\nwrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
