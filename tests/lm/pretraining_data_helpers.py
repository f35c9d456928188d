"""Shared tiny corpora, tokenizers and checkpoints for the APOLLO tests.

Besides the corpora: a BERT-style uncased WordPiece (`train_small_wordpiece`, the
normaliser, pre-tokenizer and post-processor of all-MiniLM-L6-v2's tokenizer.json)
and tiny random Hugging Face checkpoints of either family (`export_random_encoder`:
a bare `BertModel` / `RobertaModel` with its tokenizer, so, like MiniLM, it has no
MLM head and no classifier).
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable

import ml_collections
import tokenizers
from flax import nnx
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from apollo.lm.data import generated_corpus, selection, text_sources
from apollo.models import tokenizer as tokenizer_lib
from apollo.models.bert import model as bert_model
from apollo.models.bert import params as bert_params
from apollo.models.roberta import model as roberta_model
from apollo.models.roberta import params as roberta_params

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


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # Ids 0-4 when trained.


def train_small_wordpiece(
  texts: Iterable[str], out_dir: str | None = None, vocab_size: int = 300
) -> tokenizers.Tokenizer:
  """An uncased BERT WordPiece: lower-casing + accent-stripping normaliser, BERT's
  pre-tokenizer, `[CLS] a [SEP] b [SEP]` post-processor; saved as out_dir/tokenizer.json.

  A small vocabulary splits most words into "##" pieces.
  """
  tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(
    vocab_size=vocab_size, special_tokens=list(BERT_SPECIAL_TOKENS), show_progress=False
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  tokenizer.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  return tokenizer


def export_random_encoder(family: str, out_dir: str, tokenizer_json: str, seed: int = 0) -> str:
  """A tiny random HF checkpoint of `family` ('bert' / 'roberta') with its tokenizer.

  The model is a bare trunk with a pooler (`BertModel` / `RobertaModel`, as MiniLM):
  no MLM head and no classifier, so importing it leaves those fresh. Its vocabulary
  is the tokenizer's, padded to a multiple of 128.
  """
  vocab = tokenizers.Tokenizer.from_file(tokenizer_json).get_vocab_size()
  shape = dict(
    vocab_size=-(-vocab // 128) * 128,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
  )
  if family == "bert":
    config, params = bert_model.get_config("tiny", **shape), bert_params
  else:
    config, params = roberta_model.get_config("tiny", **shape), roberta_params
  params.export_hf(roberta_model.Encoder(config, rngs=nnx.Rngs(seed)), out_dir)
  shutil.copy(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
  return out_dir


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
