"""Shared tiny corpora for the APOLLO data tests (selection, tokenizer, pipeline)."""

import json
import os
import subprocess
import sys

import ml_collections

from apollo.lm.data import generated_corpus, selection, text_sources
from apollo.models import tokenizer as tokenizer_lib

# A hand-written mini corpus whose counts are known (see test_selection.py).
MINI_CORPUS = """\
It rained, so the match was cancelled. The players went home.
If the pitch dries, the match will be replayed on Sunday.

The stadium holds ten thousand people. Tickets cost twelve euros.
Although tickets were cheap, the stands were NOT full. As a result the club lost money.

Nothing logical here at all. Just plain words in a row.
"""


def write_mini_corpus(directory: str) -> str:
  path = os.path.join(directory, "mini.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write(MINI_CORPUS)
  return path


def make_generated_shards(
  out_dir: str, num_documents: int = 120, docs_per_shard: int = 40
) -> selection.SelectionCounts:
  source = text_sources.GeneratedSource(
    generated_corpus.GeneratedCorpusConfig(num_documents=num_documents, seed=3)
  )
  return selection.run_selection(
    source, out_dir, selection.SelectionConfig(docs_per_shard=docs_per_shard, num_workers=1)
  )


def train_small_tokenizer(shard_dir: str, out_dir: str):
  return tokenizer_lib.train_bpe_tokenizer(
    (r["text"] for r in selection.iter_records(shard_dir)), out_dir, vocab_size=400
  )


def shards_and_tokenizer(root) -> tuple[str, str]:
  """Selected sentence shards of a 200-document generated corpus, and a BPE on them."""
  shard_dir, tokenizer_dir = str(root / "sentences"), str(root / "tokenizer")
  make_generated_shards(shard_dir, num_documents=200, docs_per_shard=100)
  train_small_tokenizer(shard_dir, tokenizer_dir)
  return shard_dir, tokenizer_dir


def override(config, overrides):
  """Sets dotted keys of a ConfigDict: override(c, {'data.max_len': 16})."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


_PARSE_FLAGFILE = """
import json, sys
from absl import flags
from ml_collections import config_flags
config = config_flags.DEFINE_config_file("config", sys.argv.pop(1))
workdir = flags.DEFINE_string("workdir", None, "")
flags.FLAGS(sys.argv)
print(json.dumps(dict(workdir=workdir.value, config=config.value.to_dict())))
"""


def parse_flagfile(config_file: str, name: str) -> tuple[str, ml_collections.ConfigDict]:
  """(--workdir, config) of experiments/flags/NAME.flags, parsed as an absl main would,
  in a fresh process, with `config_file` (e.g. 'apollo/lm/configs/pretrain.py:quickstart')
  as the --config default."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      _PARSE_FLAGFILE,
      config_file,
      f"--flagfile=experiments/flags/{name}.flags",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
  )
  parsed = json.loads(out.stdout.strip().splitlines()[-1])
  return parsed["workdir"], ml_collections.ConfigDict(parsed["config"])
