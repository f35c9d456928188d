"""Mesh construction, logical-axis rules, batch sharding, metrics files, progress."""

import json
import math

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from apollo.common import mesh as mesh_lib
from apollo.common.metrics import (
  MetricsWriter,
  NonFiniteLossError,
  Progress,
  check_finite,
  read_metrics,
)

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


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Param(mesh_lib.logical_init(init, ("vocab", "embed"))(rngs.params(), (16, 8)))
    self.mlp = nnx.Param(mesh_lib.logical_init(init, ("embed", "mlp"))(rngs.params(), (8, 32)))
    self.scale = nnx.Param(mesh_lib.logical_init(init, ("heads",))(rngs.params(), (8,)))


def test_logical_axes_map_through_rules_and_params_are_created_sharded():
  specs = mesh_lib.logical_partition_specs(
    nnx.state(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0)))), RULES
  )
  assert specs["embed"] == P("tensor", "fsdp") and specs["mlp"] == P("fsdp", "tensor")
  assert specs["scale"] == P("heads")  # no rule: the name passes through (a mesh axis name works)
  mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2, axis_type="auto")
  rules = RULES + (("heads", None),)
  model = mesh_lib.create_sharded_model(lambda: _Tiny(nnx.Rngs(0)), mesh, rules)
  assert model.scale.value.sharding.spec == P(None)
  assert model.embed.value.sharding.spec == P("tensor", "fsdp")
  np.testing.assert_allclose(
    model.mlp.value, _Tiny(nnx.Rngs(0)).mlp.value, atol=1e-7
  )  # compiled vs eager


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
  assert (
    line.startswith("step 10/100 (10.0%) | loss 1.235 |") and "tokens/s" in line and "ETA" in line
  )


def test_drop_after_removes_redone_steps_and_a_cut_line(tmp_path):
  from apollo.common.metrics import MetricsWriter, read_metrics

  writer = MetricsWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)})
  writer.write(2, {"acc": 0.5}, split="eval")
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "split": "tr')  # A crash mid-write.
  writer = MetricsWriter(tmp_path, tensorboard=False)
  assert writer.drop_after(2) == 3  # Steps 3 and 4, and the cut line.
  writer.write(3, {"loss": 30.0})
  writer.close()
  rows = read_metrics(tmp_path)
  assert [(r["step"], r["split"]) for r in rows] == [
    (1, "train"),
    (2, "train"),
    (2, "eval"),
    (3, "train"),
  ]
  assert rows[-1]["loss"] == 30.0
