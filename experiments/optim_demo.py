"""Apollo, ApolloW, AdamW and SGD on the bundled digits: the optimizer demo's entry point.

    python -m experiments.optim_demo --flagfile=experiments/flags/optim_demo.flags
    python -m experiments.optim_demo --workdir=runs/optim_demo --epochs=5

The demo itself is `apollo.studies.optim_demo` (data, model, optimizers, plots).
"""

import time

from absl import app, flags

from apollo.studies.optim_demo import OPTIMIZERS, run_demo

_WORKDIR = flags.DEFINE_string("workdir", "runs/optim_demo", "Where plots and results go.")
_EPOCHS = flags.DEFINE_integer("epochs", 40, "Passes over the training set.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch (divisible by devices).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, the init and the batch order.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ",".join(OPTIMIZERS), f"Subset of {OPTIMIZERS}.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 100, "Warmup of apollo(w) and adamw.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  run_demo(
    _WORKDIR.value,
    epochs=_EPOCHS.value,
    batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
    optimizers=_OPTIMIZERS.value,
    warmup_steps=_WARMUP_STEPS.value,
  )
  print(
    f"\nwrote loss.png, accuracy.png, results.json to {_WORKDIR.value} "
    f"({time.perf_counter() - start:.1f} s)"
  )


if __name__ == "__main__":
  app.run(main)
