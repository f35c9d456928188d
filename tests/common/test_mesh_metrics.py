"""Mesh construction, logical-axis rules, batch sharding, metrics files, progress."""

import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from apollo.common import mesh as mesh_lib
from apollo.common.metrics import MetricsWriter, NonFiniteLossError, Progress, check_finite, read_metrics

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("vocab", "tensor"))


def test_make_mesh_fills_the_remaining_axis():
  mesh = mesh_lib.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh_lib.make_mesh(axis_type="auto").shape["data"] == 8
  with pytest.raises(ValueError, match="needs 12 devices"):
    mesh_lib.make_mesh(data=3, fsdp=2, tensor=2)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="axis_type"):
    mesh_lib.make_mesh(axis_type="manual")


def test_logical_to_spec():
  assert mesh_lib.logical_to_spec(("vocab", "embed"), RULES) == P("tensor", "fsdp")
  assert mesh_lib.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
  assert mesh_lib.logical_to_spec(("batch", None), RULES) == P(("data", "fsdp"), None)
  assert mesh_lib.logical_to_spec(("heads", "kv"), RULES) == P(None, None)  # no rule: replicated
  assert mesh_lib.logical_to_spec(("embed", "embed"), RULES) == P("fsdp", None)  # axis used once


def test_shard_batch_splits_the_leading_axis():
  mesh = mesh_lib.make_mesh(data=2, fsdp=4, tensor=1)
  batch = mesh_lib.shard_batch({"ids": np.arange(32).reshape(16, 2), "label": np.arange(16)}, mesh)
  assert batch["ids"].sharding.spec == P(("data", "fsdp"), None)
  assert len(batch["ids"].addressable_shards) == 8
  assert batch["ids"].addressable_shards[0].data.shape == (2, 2)
  np.testing.assert_array_equal(batch["label"], np.arange(16))


def test_metrics_writer_writes_jsonl_and_tensorboard(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)})
  writer.write(1, {"accuracy": 0.75}, split="eval")
  writer.close()
  rows = read_metrics(tmp_path)
  assert rows[0] == {"step": 1, "split": "train", "loss": 2.5, "lr": pytest.approx(1e-3)}
  assert read_metrics(tmp_path, "eval") == [{"step": 1, "split": "eval", "accuracy": 0.75}]
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
  json.dumps(rows)


def test_check_finite_names_step_and_metric():
  check_finite({"loss": 1.0}, step=3)
  with pytest.raises(NonFiniteLossError, match="loss is nan at step 7"):
    check_finite({"loss": math.nan}, step=7)


def test_progress_reports_rate_and_eta():
  progress = Progress(total_steps=100, start_step=0, unit="tokens", every=10)
  assert progress.update(5, 1000) is None
  line = progress.update(10, 1000, {"loss": 1.23456})
  assert line.startswith("step 10/100 (10.0%) | loss 1.235 |") and "tokens/s" in line and "ETA" in line
