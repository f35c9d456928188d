"""Checkpointer: exact resume, retention, damaged and half-written checkpoints, preemption."""

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from apollo.common.checkpoint import Checkpointer, CheckpointError, PreemptionGuard
from apollo.optim import apollo, init_sharded

TX = apollo(1e-2, warmup=3, weight_decay=1e-4)
DATA = jax.random.normal(jax.random.key(0), (64, 8))
TARGET = jnp.sin(DATA @ jnp.arange(32.0).reshape(8, 4) / 8)


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)


def _shardings(mesh):
  return {
    "w1": NamedSharding(mesh, P("fsdp")),
    "w2": NamedSharding(mesh, P(None, "fsdp")),
    "b": NamedSharding(mesh, P()),
  }


def _init(mesh):
  params = {
    "w1": jax.random.normal(jax.random.key(1), (8, 16)) * 0.3,
    "w2": jax.random.normal(jax.random.key(2), (16, 4)) * 0.3,
    "b": jnp.zeros(4),
  }
  params = jax.device_put(params, _shardings(mesh))
  return {"params": params, "opt_state": init_sharded(TX, params), "step": jnp.array(0, jnp.int32)}


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]
  return jnp.mean((h - y) ** 2)


@jax.jit
def _train_step(state, x, y):
  grads = jax.grad(_loss)(state["params"], x, y)
  updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
  return {
    "params": optax.apply_updates(state["params"], updates),
    "opt_state": opt_state,
    "step": state["step"] + 1,
  }


def _batches(position, count):
  """A deterministic data order; `position` is the iterator state that is saved."""
  order = np.random.default_rng(0).permutation(10_000) % 8
  for i in range(position, position + count):
    rows = slice(int(order[i]) * 8, int(order[i]) * 8 + 8)
    yield DATA[rows], TARGET[rows]


def test_interrupted_run_resumes_bit_identically(tmp_path):
  mesh = _mesh()
  with jax.set_mesh(mesh):
    straight = _init(mesh)
    for x, y in _batches(0, 10):
      straight = _train_step(straight, x, y)

    first = _init(mesh)
    for x, y in _batches(0, 6):
      first = _train_step(first, x, y)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(6, first, data={"position": 6})
    ckpt.close()
    del first

    # A new process would only know the workdir and the config.
    ckpt = Checkpointer(tmp_path / "ckpt")
    abstract = jax.eval_shape(lambda: _init(mesh))
    abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      jax.tree.map(lambda x: x.sharding, _init(mesh)),
    )
    restored = ckpt.restore_latest(abstract)
    assert restored.step == 6 and restored.data == {"position": 6}
    assert restored.state["params"]["w1"].sharding == _shardings(mesh)["w1"]
    resumed = restored.state
    for x, y in _batches(restored.data["position"], 4):
      resumed = _train_step(resumed, x, y)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


def _small_state(value):
  return {"w": jnp.full((4,), float(value)), "step": jnp.array(value, jnp.int32)}


def test_keeps_last_n(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=2)
  for step in range(1, 6):
    ckpt.save(step, _small_state(step))
  ckpt.wait()
  assert ckpt.all_steps() == [4, 5]
  assert ckpt.save(5, _small_state(5)) is False  # an existing step is not overwritten
  ckpt.close()


def _damage(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if root.endswith(os.path.join("state", "d")) or name == "manifest.ocdbt":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")


def test_damaged_checkpoint_falls_back_to_previous_and_is_kept(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, _small_state(step), data={"position": step})
  ckpt.close()
  _damage(tmp_path / "2")

  ckpt = Checkpointer(tmp_path, max_to_keep=3)
  restored = ckpt.restore_latest(jax.eval_shape(lambda: _small_state(0)))
  assert restored.step == 1 and restored.data == {"position": 1}
  np.testing.assert_array_equal(restored.state["w"], 1.0)
  assert (tmp_path / "2.corrupt").is_dir()  # moved aside, not deleted
  # Training goes on and can save step 2 again.
  assert ckpt.save(2, _small_state(2))
  ckpt.close()


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, _small_state(1))
  ckpt.close()
  _damage(tmp_path / "1")
  ckpt = Checkpointer(tmp_path)
  with pytest.raises(CheckpointError, match=str(tmp_path)):
    ckpt.restore_latest(jax.eval_shape(lambda: _small_state(0)))


def test_half_written_checkpoint_is_ignored(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, _small_state(1))
  ckpt.close()
  # What a crash in the middle of saving step 2 leaves behind.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"partial")
  ckpt = Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  assert ckpt.restore_latest(jax.eval_shape(lambda: _small_state(0))).step == 1
  ckpt.close()


def test_fresh_directory_restores_nothing(tmp_path):
  ckpt = Checkpointer(tmp_path / "new")
  assert ckpt.restore_latest(jax.eval_shape(lambda: _small_state(0))) is None
  ckpt.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
  assert signal.getsignal(signal.SIGTERM) == before


def test_state_metadata_gives_saved_shapes_without_reading_arrays(tmp_path, caplog):
  mesh = _mesh()
  state = _init(mesh)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, state, data={"note": "x"})
  ckpt.close()
  reopened = Checkpointer(tmp_path / "ckpt")  # A fresh manager: nothing restored yet.
  with caplog.at_level("WARNING"):
    tree = reopened.state_metadata(3)
  reopened.close()
  assert tree["params"]["w1"].shape == (8, 16) and tree["params"]["w2"].shape == (16, 4)
  assert not [r for r in caplog.records if "does not exist" in r.getMessage()]


def test_checkpoint_without_its_data_state_is_damaged_and_falls_back(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=5)
  ckpt.save(1, _small_state(1), data={"position": 1})
  ckpt.save(2, _small_state(2), data={"position": 2})
  ckpt.save(3, _small_state(3), data={"other": 3})  # Saved, but without the position.
  ckpt.close()
  shutil.rmtree(tmp_path / "2" / "data")  # The iterator state is lost.

  ckpt = Checkpointer(tmp_path, max_to_keep=5)
  restored = ckpt.restore_latest(
    jax.eval_shape(lambda: _small_state(0)), required_data=["position"]
  )
  ckpt.close()
  # Not step 3 or 2 with the iterator reset: the run would no longer be exact.
  assert restored.step == 1 and restored.data == {"position": 1}
  assert (tmp_path / "3.corrupt").is_dir() and (tmp_path / "2.corrupt").is_dir()
  assert "no data state" in (tmp_path / "2.corrupt" / "RESTORE_ERROR.txt").read_text()
  assert "position" in (tmp_path / "3.corrupt" / "RESTORE_ERROR.txt").read_text()


def test_after_all_checkpoints_failed_every_rerun_refuses_until_start_over(tmp_path):
  directory = tmp_path / "checkpoints"
  abstract = jax.eval_shape(lambda: _small_state(0))
  ckpt = Checkpointer(directory)
  ckpt.save(1, _small_state(1), data={"position": 1})
  ckpt.close()
  _damage(directory / "1")
  for _ in range(3):  # The first failure, then two reruns: the same refusal each time.
    ckpt = Checkpointer(directory)
    with pytest.raises(CheckpointError) as refused:
      ckpt.restore_latest(abstract, required_data=["position"])
    ckpt.close()
    message = str(refused.value)
    assert str(directory) in message and "1.corrupt" in message and "--start_over" in message
    assert "could not be restored" in message  # The reason recorded at the first failure.
  assert sorted(os.listdir(directory)) == ["1.corrupt"]

  ckpt = Checkpointer(directory)
  assert ckpt.restore_latest(abstract, start_over=True) is None  # A fresh start ...
  # ... with what was saved moved aside, not deleted.
  assert (tmp_path / "checkpoints.damaged" / "1" / "1.corrupt" / "state").is_dir()
  assert ckpt.damaged() == []
  ckpt.save(1, _small_state(5), data={"position": 5})
  ckpt.close()
  ckpt = Checkpointer(directory)
  assert ckpt.restore_latest(abstract, required_data=["position"]).data == {"position": 5}
  ckpt.close()


def test_start_over_never_discards_a_restorable_checkpoint(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, _small_state(1), data={"position": 1})
  ckpt.close()
  ckpt = Checkpointer(tmp_path)
  assert ckpt.restore_latest(jax.eval_shape(lambda: _small_state(0)), start_over=True).step == 1
  ckpt.close()


_FALLBACK_SCRIPT = """
import os, sys
import jax
import jax.numpy as jnp
from apollo.common.checkpoint import Checkpointer

def state(v):  # Many arrays: orbax reads them concurrently.
  return {f"w{i}": jnp.full((128, 512), float(v + i)) for i in range(48)}

d = sys.argv[1]
for attempt in range(4):
  ckpt = Checkpointer(os.path.join(d, str(attempt)))
  for step in (1, 2):
    ckpt.save(step, state(step), data={"position": step})
  ckpt.close()
  for root, _, files in os.walk(os.path.join(d, str(attempt), "2", "state", "d")):
    for name in files:
      os.remove(os.path.join(root, name))
  ckpt = Checkpointer(os.path.join(d, str(attempt)))
  assert ckpt.restore_latest(jax.eval_shape(lambda: state(0))).step == 1
  ckpt.close()
print("fell back")
"""


def test_fallback_prints_no_event_loop_tracebacks(tmp_path):
  """A damaged checkpoint leaves orbax's other reads in flight after its event loop closed;
  their callbacks used to print one 'Event loop is closed' traceback each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run(
    [sys.executable, "-c", _FALLBACK_SCRIPT, str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "fell back" in out.stdout
  assert "falling back to the previous checkpoint" in out.stderr  # The one line it should log.
  assert "Event loop is closed" not in out.stderr
  assert "Traceback" not in out.stderr
