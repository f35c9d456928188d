"""End-to-end tests of the APOLLO pretraining trainer (tiny model, 2x2x2 CPU mesh).

One small corpus and tokenizer are prepared once per module; every run uses the
same tiny config, so the scenarios differ only in how they are interrupted:

* uninterrupted: 6 steps -> checkpoints, metrics.jsonl, TensorBoard events;
* SIGTERM at step 3 (sent from the loop's `on_step` hook), then a rerun: the saved
  step is 3, and the resumed run ends bit-for-bit equal to the uninterrupted one
  (params, losses per step, iterator state: the same data order);
* a NaN injected into the batch of step 4: NonFiniteLossError, step 4 not saved,
  the step-2 checkpoint intact, and a clean rerun resumes from it;
* bad input: each a clear error naming the flag or file, nothing written damaged.
"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import config as config_lib
from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.lm import pretrain
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.lm.data import selection
from tests.lm import pretraining_data_helpers as helpers

STEPS = 6


pytestmark = pytest.mark.usefixtures("disk_compilation_cache")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  return helpers.shards_and_tokenizer(tmp_path_factory.mktemp("pretrain_data"))


def tiny_config(data_dirs, **overrides):
  shard_dir, tokenizer_dir = data_dirs
  c = pretrain_configs.get_config("quickstart")
  c.train_steps = STEPS
  c.log_every = 1
  c.eval_every = 1000  # Only at the end.
  c.eval_batches = 1
  c.checkpoint_every = 2
  c.mlm_max_predictions = 4
  c.model.hidden_size, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.model.intermediate_size = 64
  c.data.shard_dir, c.data.tokenizer_path = shard_dir, tokenizer_dir
  c.data.max_len, c.data.batch_size, c.data.eval_fraction = 24, 8, 0.2
  c.optimizer.warmup_steps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return helpers.override(c, overrides)


def restore(workdir, config):
  """(step, state, data) of the latest checkpoint of `workdir`."""
  _, tokenizer = pretrain.prepare_data(config, workdir)
  model_config = pretrain.model_config_from(config, tokenizer.get_vocab_size())
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  setup = pretrain.make_setup(config, model_config, mesh)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    restored = ckpt.restore_latest(setup.abstract_state)
  finally:
    ckpt.close()
  return restored


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir, "train")}


@pytest.fixture(scope="module")
def uninterrupted(data_dirs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = pretrain.train_and_evaluate(tiny_config(data_dirs), workdir)
  return workdir, result


def test_run_writes_checkpoints_metrics_and_tensorboard(uninterrupted):
  workdir, result = uninterrupted
  assert result["step"] == STEPS and not result["preempted"]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2, 4, 6]
  rows = metrics_lib.read_metrics(workdir)
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for key in (
    "loss",
    "mlm_loss",
    "ecls_loss",
    "mlm_acc",
    "ecls_acc",
    "learning_rate",
    "grad_norm",
    "update_norm",
    "tokens_per_s",
  ):
    assert np.isfinite(train[-1][key]), key
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [STEPS] and 0 <= evals[0]["ecls_acc"] <= 1
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model_resolved"]["hidden_size"] == 32


def test_sigterm_saves_and_resume_is_bit_exact(data_dirs, uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "preempted")
  config = tiny_config(data_dirs)

  def preempt_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  first = pretrain.train_and_evaluate(config, workdir, on_step=preempt_at_3)
  assert first["preempted"] and first["step"] == 3
  assert restore(workdir, config).step == 3

  second = pretrain.train_and_evaluate(config, workdir)
  assert second["step"] == STEPS and not second["preempted"]
  # Same data order and same arithmetic: per-step losses and final params equal.
  losses, reference_losses = train_losses(workdir), train_losses(reference_dir)
  assert losses == reference_losses
  ours, theirs = restore(workdir, config), restore(reference_dir, config)
  assert ours.step == theirs.step == STEPS
  assert ours.data["train_iterator"] == theirs.data["train_iterator"]
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(ours.state), jax.device_get(theirs.state)
  )


def test_nan_stops_keeps_last_good_checkpoint_and_resumes(
  data_dirs, uninterrupted, tmp_path, monkeypatch
):
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "nan")
  config = tiny_config(data_dirs)
  calls = {"n": 0}
  device_batch = pretrain._device_batch

  def poisoned(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 4:  # The batch of step 4.
      batch = dict(batch, mlm_weights=np.full_like(batch["mlm_weights"], np.nan))
    return device_batch(batch, mesh)

  monkeypatch.setattr(pretrain, "_device_batch", poisoned)
  with pytest.raises(metrics_lib.NonFiniteLossError, match="step 4"):
    pretrain.train_and_evaluate(config, workdir)
  monkeypatch.setattr(pretrain, "_device_batch", device_batch)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert restore(workdir, config).step == 2

  result = pretrain.train_and_evaluate(config, workdir)  # Resumes from step 2.
  assert result["step"] == STEPS
  # Step 3 was logged, then redone: metrics.jsonl has each step once, the redone values.
  train = metrics_lib.read_metrics(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert train_losses(workdir) == train_losses(reference_dir)
  ours, theirs = restore(workdir, config), restore(reference_dir, config)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(ours.state["params"]),
    jax.device_get(theirs.state["params"]),
  )


def test_checkpoint_without_iterator_state_falls_back_and_stays_exact(
  data_dirs, uninterrupted, tmp_path
):
  """Step 6 lost its data state: resuming from it would reset the data order, so it is
  set aside and the run redoes steps 5-6 from step 4, ending equal to the reference."""
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6", "data"))
  config = tiny_config(data_dirs)
  result = pretrain.train_and_evaluate(config, workdir)
  assert result["step"] == STEPS
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.corrupt"))
  assert train_losses(workdir) == train_losses(reference_dir)
  ours, theirs = restore(workdir, config), restore(reference_dir, config)
  assert ours.step == STEPS and ours.data["train_iterator"] == theirs.data["train_iterator"]
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(ours.state["params"]),
    jax.device_get(theirs.state["params"]),
  )


def _damage_all(checkpoints):
  for step in os.listdir(checkpoints):
    for root, _, files in os.walk(os.path.join(checkpoints, step, "state")):
      for name in files:
        if name == "manifest.ocdbt":
          with open(os.path.join(root, name), "wb") as f:
            f.write(b"\x00garbage")


def test_unrestorable_workdir_refuses_every_rerun_until_start_over(
  data_dirs, uninterrupted, tmp_path
):
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_dir, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  _damage_all(checkpoints)
  config = tiny_config(data_dirs)
  for _ in range(2):  # Not a fresh start from step 0 on the second try either.
    with pytest.raises(checkpoint_lib.CheckpointError) as refused:
      pretrain.train_and_evaluate(config, workdir)
    message = str(refused.value)
    assert checkpoints in message and "6.corrupt" in message and "--start_over" in message
  assert sorted(os.listdir(checkpoints)) == ["2.corrupt", "4.corrupt", "6.corrupt"]

  result = pretrain.train_and_evaluate(config, workdir, start_over=True)
  assert result["step"] == STEPS
  moved = os.path.join(workdir, "checkpoints.damaged", "1")
  assert sorted(os.listdir(moved)) == ["2.corrupt", "4.corrupt", "6.corrupt"]  # Kept.
  assert train_losses(workdir) == train_losses(reference_dir)  # Trained from step 0.
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "6"]


def test_config_that_cannot_train_is_refused_before_any_work(data_dirs, tmp_path):
  config = tiny_config(data_dirs, **{"optimizer.learning_rate": -0.01, "checkpoint_every": 0})
  with pytest.raises(config_lib.ConfigError) as refused:
    pretrain.train_and_evaluate(config, str(tmp_path / "w"))
  assert "learning_rate=-0.01" in str(refused.value)
  assert "checkpoint_every=0" in str(refused.value)
  assert not (tmp_path / "w").exists()


# -----------------------------------------------------------------------------
# Bad input: a clear error naming the flag or file; nothing written is damaged.
# -----------------------------------------------------------------------------


def test_missing_tokenizer_names_the_flag(data_dirs, tmp_path):
  config = tiny_config(data_dirs, **{"data.tokenizer_path": str(tmp_path / "no_tokenizer")})
  with pytest.raises(FileNotFoundError, match="tokenizer_path=.*no_tokenizer"):
    pretrain.train_and_evaluate(config, str(tmp_path / "w"))


def test_unknown_optimizer_and_tagger_name_the_flag(data_dirs, tmp_path):
  with pytest.raises(ValueError, match=r"optimizer.name='lamb'"):
    pretrain.train_and_evaluate(
      tiny_config(data_dirs, **{"optimizer.name": "lamb"}), str(tmp_path / "a")
    )
  with pytest.raises(ValueError, match=r"data.tagger='stanza'"):
    pretrain.train_and_evaluate(
      tiny_config(data_dirs, **{"data.tagger": "stanza"}), str(tmp_path / "b")
    )


def test_empty_shard_dir_and_empty_corpus(data_dirs, tmp_path):
  (tmp_path / "empty").mkdir()
  config = tiny_config(data_dirs, **{"data.shard_dir": str(tmp_path / "empty")})
  with pytest.raises(FileNotFoundError, match="shard_dir=.*empty"):
    pretrain.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_config(data_dirs, **{"data.shard_dir": "", "data.generated_documents": 0})
  with pytest.raises(selection.EmptySourceError):
    pretrain.train_and_evaluate(config, str(tmp_path / "b"))


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_mismatched_shapes_refused_and_nothing_damaged(data_dirs, uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_dir, workdir)
  before = _snapshot(workdir)
  wider = tiny_config(data_dirs, **{"model.hidden_size": 64})
  with pytest.raises(ValueError, match=r"config.json.*hidden_size: saved 32 vs now 64"):
    pretrain.train_and_evaluate(wider, workdir)
  assert _snapshot(workdir) == before
  # Without config.json, the checkpoint's own metadata catches it; nothing set aside.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(ValueError, match=r"Checkpoint .*checkpoints/6 does not match"):
    pretrain.train_and_evaluate(wider, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


@pytest.mark.parametrize(
  "name", ["quickstart", "minilm_pretrain", "wikipedia_roberta_base", "wikipedia_roberta_large"]
)
def test_flagfiles_parse(name):
  """Every flagfile parses (as the absl main would) into a config with valid names."""
  workdir, config = helpers.parse_flagfile("apollo/lm/configs/pretrain.py:quickstart", name)
  assert workdir and config.optimizer.name == "apollo"
  train_lib.build_optimizer(config.optimizer, config.train_steps)  # Valid names.
  assert config.data.max_len <= 256 and config.train_steps > 0
