"""The generation benchmark script runs on a tiny random decoder and reports its table
and JSON (not timings)."""

import json
import subprocess
import sys


def test_generate_benchmark_prints_the_table_and_writes_the_report(tmp_path):
  out = tmp_path / "generate.json"
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.generate",
    "--model=tiny",
    "--batch_sizes=1,2",
    "--cache_sizes=48,130",
    "--prompt_tokens=10",
    "--new_tokens=4",
    "--rounds=2",
    f"--json_out={out}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| implementation | batch | cache slots | prefill tok/s | decode tok/s |" in proc.stdout
  assert "| jax | 2 | 130 |" in proc.stdout
  report = json.loads(out.read_text())
  assert {"rows", "machine", "model", "prompt_tokens", "prompt_bucket", "new_tokens"} <= set(report)
  assert report["prompt_bucket"] == 16 and report["machine"]["jax_version"]
  rows = report["rows"]
  # The tiny model has no transformers twin: JAX rows only, without ratios.
  assert [(r["implementation"], r["batch"], r["cache"]) for r in rows] == [
    ("jax", 1, "48"),
    ("jax", 1, "130"),
    ("jax", 2, "48"),
    ("jax", 2, "130"),
  ]
  for row in rows:
    assert {
      "prefill_tokens_per_s",
      "decode_tokens_per_s",
      "ms_per_decode_step",
      "prefill_ratio_to_transformers",
      "decode_ratio_to_transformers",
      "tokens_equal_to_transformers",
    } <= set(row)
    assert row["decode_ratio_to_transformers"] is None
    assert len(row["step_ms_per_round"]) == 2
