"""TFDS builders for ReClor, LogiQA and LogiQA 2.0 (manual download only).

Importing this module registers the builders "reclor", "logiqa" and "logiqa2".
They read a directory the user prepared (the datasets are licensed for research
use and cannot be downloaded automatically) with the plain readers of
`apollo.lm.datasets.multiple_choice`, and write ArrayRecord files, so the prepared
data is read with `tfds.data_source` / grain, without TensorFlow:

    import tensorflow_datasets as tfds
    from apollo.lm.datasets import tfds_builders

    tfds_builders.prepare("reclor", manual_dir="~/data/reclor",
                          data_dir="~/tensorflow_datasets")
    source = tfds.data_source("reclor", data_dir="~/tensorflow_datasets")
    source["validation"][0]  # {'id': b'val_0', 'context': b'...', ...}

Every builder has the same features, so downstream code is dataset-agnostic:

  id        Text
  context   Text
  question  Text
  options   Sequence(Text, length=4)
  label     int32, `HIDDEN_LABEL` (-1) where the split hides it (ReClor test)

Records keep their file order (shuffle with grain when training). Builders
default to the ArrayRecord file format: it is random-access (what
`tfds.data_source` and grain need) and, unlike TFRecord, is written and read
without TensorFlow. The builders follow TFDS's `GeneratorBasedBuilder` guide
(tensorflow.org/datasets/add_dataset).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from apollo.lm.datasets import multiple_choice

HIDDEN_LABEL = -1

FEATURES = tfds.features.FeaturesDict(
  {
    "id": tfds.features.Text(),
    "context": tfds.features.Text(),
    "question": tfds.features.Text(),
    "options": tfds.features.Sequence(tfds.features.Text(), length=multiple_choice.NUM_CHOICES),
    "label": tfds.features.Scalar(dtype=np.int32),
  }
)


class _MultipleChoiceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads the split files of one benchmark from the manual directory.

  Subclasses set `SPLIT_FILES` (split -> accepted file names, matched without
  regard to case), `READER` (an `apollo.lm.datasets.multiple_choice` reader) and the
  documentation attributes.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SPLIT_FILES: Mapping[str, Sequence[str]] = {}
  READER: Callable[..., list[dict[str, Any]]]
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves a packaged builder's file through the third-party
    # `importlib_resources` module, which is not a declared dependency (and not
    # installed here); the plain file path is what it would return anyway.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, file_format=None, **kwargs):
    # TFRecord (TFDS's default) needs TensorFlow to write; ArrayRecord does not.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=FEATURES,
      # Keep the files' order (records are sorted by their integer keys, the
      # file positions): ReClor's test order is its leaderboard order.
      disable_shuffling=True,
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # `manual_dir` raises with MANUAL_DOWNLOAD_INSTRUCTIONS when not given.
    manual_dir = os.fspath(dl_manager.manual_dir)
    # Every split is looked up before any is read: a missing one fails at once.
    paths = {
      split: multiple_choice.find_split_file(
        manual_dir, self.name, split, names=names, hint=self.MANUAL_DOWNLOAD_INSTRUCTIONS
      )
      for split, names in self.SPLIT_FILES.items()
    }
    return {split: self._generate_examples(path, split) for split, path in paths.items()}

  def _generate_examples(self, path: str, split: str):
    # Reader errors (an empty or unreadable split file, a malformed record) stop
    # the preparation; size mismatches and oddities are reported.
    examples = type(self).READER(path)
    multiple_choice.check_split_size(self.name, split, len(examples), report=examples)
    logging.info("%s %s: %d examples from %s", self.name, split, len(examples), path)
    for position, example in enumerate(examples):
      label = example["label"]
      yield position, {**example, "label": HIDDEN_LABEL if label is None else label}


class Reclor(_MultipleChoiceBuilder):
  """ReClor (Yu et al., ICLR 2020): logical reasoning reading comprehension."""

  SPLIT_FILES = multiple_choice.SPLIT_FILE_NAMES["reclor"]
  READER = staticmethod(multiple_choice.read_reclor)
  DESCRIPTION = (
    "ReClor: 4-way multiple choice questions from standardized "
    "graduate admission tests. Test labels are hidden (-1); the "
    "first 440 test questions are EASY, the rest HARD."
  )
  HOMEPAGE = "http://whyu.me/reclor/"
  CITATION = """@inproceedings{yu2020reclor,
  title={ReClor: A Reading Comprehension Dataset Requiring Logical Reasoning},
  author={Yu, Weihao and Jiang, Zihang and Dong, Yanfei and Feng, Jiashi},
  booktitle={International Conference on Learning Representations},
  year={2020}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request ReClor from http://whyu.me/reclor/ (a form, research use only), unzip
  it, and pass the folder holding train.json, val.json and test.json as
  `manual_dir` (tfds.download.DownloadConfig(manual_dir=...)).
  """


class Logiqa(_MultipleChoiceBuilder):
  """LogiQA v1 (Liu et al., IJCAI 2020), the English release."""

  SPLIT_FILES = multiple_choice.SPLIT_FILE_NAMES["logiqa"]
  READER = staticmethod(multiple_choice.read_logiqa)
  DESCRIPTION = (
    "LogiQA: 4-way multiple choice logical reasoning questions "
    "translated from the Chinese Civil Service Examination."
  )
  HOMEPAGE = "https://github.com/lgw863/LogiQA-dataset"
  CITATION = """@inproceedings{liu2020logiqa,
  title={LogiQA: A Challenge Dataset for Machine Reading Comprehension with
         Logical Reasoning},
  author={Liu, Jian and Cui, Leyang and Liu, Hanmeng and Huang, Dandan and
          Wang, Yile and Zhang, Yue},
  booktitle={IJCAI},
  year={2020}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Get the English files Train.txt, Eval.txt and Test.txt from
  https://github.com/lgw863/LogiQA-dataset and pass their folder as
  `manual_dir` (tfds.download.DownloadConfig(manual_dir=...)).
  """


class Logiqa2(_MultipleChoiceBuilder):
  """LogiQA 2.0 (Liu et al., IEEE/ACM TASLP 2023), the MRC task in English."""

  SPLIT_FILES = multiple_choice.SPLIT_FILE_NAMES["logiqa2"]
  READER = staticmethod(multiple_choice.read_logiqa2)
  DESCRIPTION = (
    "LogiQA 2.0: 4-way multiple choice logical reasoning "
    "questions (machine reading comprehension task)."
  )
  HOMEPAGE = "https://github.com/csitfun/LogiQA2.0"
  CITATION = """@article{liu2023logiqa2,
  title={LogiQA 2.0 -- An Improved Dataset for Logical Reasoning in Natural
         Language Understanding},
  author={Liu, Hanmeng and Liu, Jian and Cui, Leyang and Teng, Zhiyang and
          Duan, Nan and Zhou, Ming and Zhang, Yue},
  journal={IEEE/ACM Transactions on Audio, Speech, and Language Processing},
  year={2023}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Get the English MRC files (JSON lines) train.txt, dev.txt and test.txt from
  https://github.com/csitfun/LogiQA2.0 (logiqa/DATA/LOGIQA) and pass their
  folder as `manual_dir` (tfds.download.DownloadConfig(manual_dir=...)).
  """


_BUILDERS = {cls.name: cls for cls in (Reclor, Logiqa, Logiqa2)}


def prepare(
  name: str, manual_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]
) -> tfds.core.DatasetBuilder:
  """Prepares one benchmark from a manual directory; no network is used.

  Args:
    name: "reclor", "logiqa" or "logiqa2".
    manual_dir: the folder with the benchmark's split files.
    data_dir: the TFDS data directory to write to.

  Returns:
    The prepared builder; `builder.as_data_source()` gives the splits.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(_BUILDERS)}")
  builder = _BUILDERS[name](data_dir=os.path.expanduser(os.fspath(data_dir)))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(os.fspath(manual_dir)), try_download_gcs=False
    )
  )
  return builder
