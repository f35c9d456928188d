"""The optimizer benchmark script runs and reports what its table claims (not timings)."""

import json
import subprocess
import sys


def test_optim_step_benchmark_reports_state_and_passes(tmp_path):
  out = tmp_path / "optim_step.json"
  # A tiny tree whose embedding (65536 x 64 = 2^22) takes the one-pass sums.
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.optim_step",
    "--size=tiny",
    "--vocab=65536",
    "--steps=3",
    "--trials=2",
    "--warmup_steps=1",
    "--optimizers=apollo,apollo_separate_sums,adamw",
    f"--json_out={out}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| apollo_separate_sums |" in proc.stdout
  report = json.loads(out.read_text())
  results = report["results"]
  assert report["largest_leaf"] == 65536 * 64
  for name in ("apollo", "apollo_separate_sums"):
    assert results[name]["state_array_ratio_to_adamw"] == 1.5
    assert len(results[name]["times_ms"]) == 6
    assert len(results[name]["trial_ratios_to_adamw"]) == 2
    # No full-size temporary: scratch memory under a tenth of the largest tensor.
    assert results[name]["temp_bytes"] < 0.1 * 4 * report["largest_leaf"]
  # One pass for the three sums of the largest tensor instead of three, plus the
  # four update loops; adamw needs three loops.
  assert results["apollo"]["hlo"]["passes_over_largest"] == 5
  assert results["apollo_separate_sums"]["hlo"]["passes_over_largest"] == 7
  assert results["adamw"]["hlo"]["passes_over_largest"] == 3
  assert results["adamw"]["paired_ratio_to_adamw"] == 1.0
