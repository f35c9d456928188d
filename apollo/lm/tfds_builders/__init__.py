"""TFDS builders for ReClor, LogiQA and LogiQA 2.0 (manual download only).

Importing this package registers the builders "reclor", "logiqa" and
"logiqa2". They read a directory the user prepared (the datasets are licensed
for research use and cannot be downloaded automatically) with the plain readers
of `apollo.lm.benchmarks`, and write ArrayRecord files, so the prepared data is
read with `tfds.data_source` / grain, without TensorFlow:

    import tensorflow_datasets as tfds
    from apollo.lm import tfds_builders

    tfds_builders.prepare("reclor", manual_dir="~/data/reclor",
                          data_dir="~/tensorflow_datasets")
    source = tfds.data_source("reclor", data_dir="~/tensorflow_datasets")
    source["validation"][0]  # {'id': b'val_0', 'context': b'...', ...}
"""

from apollo.lm.tfds_builders.multiple_choice import (
  FEATURES,
  HIDDEN_LABEL,
  Logiqa,
  Logiqa2,
  Reclor,
  prepare,
)

__all__ = ["FEATURES", "HIDDEN_LABEL", "Logiqa", "Logiqa2", "prepare", "Reclor"]
