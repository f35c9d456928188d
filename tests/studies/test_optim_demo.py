"""Smoke test of experiments/optim_demo.py: every optimizer trains the digits MLP.

Runs the demo's `run_demo` in-process at a tiny size (3 epochs, a short warmup) on
the 8 forced CPU devices of the root conftest, so the batch is really sharded.
"""

import json
import os

from apollo.studies.optim_demo import OPTIMIZERS, run_demo


def test_optim_demo_trains_every_optimizer(tmp_path):
  workdir = str(tmp_path / "optim_demo")
  results = run_demo(
    workdir,
    epochs=3,
    batch_size=64,
    seed=0,
    warmup_steps=10,
    train_examples=640,
    log=lambda _: None,
  )

  for filename in ("loss.png", "accuracy.png", "results.json"):
    assert os.path.getsize(os.path.join(workdir, filename)) > 0, filename
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["config"]["devices"] == 8
  assert set(saved["optimizers"]) == set(OPTIMIZERS)

  for name, curves in results["optimizers"].items():
    assert len(curves["train_loss"]) == 3, name
    assert curves["train_loss"][-1] < curves["train_loss"][0], (name, curves["train_loss"])
  # Ten classes: chance is 10%.
  assert results["optimizers"]["apollo"]["test_accuracy"][-1] > 0.5
  assert results["optimizers"]["apollow"]["test_accuracy"][-1] > 0.5
