"""Tests of multiple-choice fine-tuning (tiny encoder, 2x2x2 CPU mesh).

* tokenisation: each family's pair format (RoBERTa's `<s> a </s></s> b </s>`, BERT's
  `[CLS] a [SEP] b [SEP]` with token types 0 / 1), the context cut first, blanks filled;
* end to end from scratch: checkpoints, metrics, predictions, results.json; a
  SIGTERM at step 2 and a rerun end bit-for-bit equal to an uninterrupted run;
* from a tiny pretraining workdir (made once per module): the encoder weights are
  the pretrained ones, the pooler and scorer new;
* ReClor: Test-E / Test-H and the leaderboard file, on tiny fixture files;
* bad input: a clear error naming the flag or file.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import metrics as metrics_lib
from apollo.common import training as train_lib
from apollo.lm import finetune, pretrain
from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs
from apollo.lm.data import selection
from apollo.lm.datasets import logic_mc, multiple_choice
from apollo.models import tokenizer as tokenizer_lib
from tests.lm import pretraining_data_helpers as helpers

STEPS = 4
MAX_LEN = 40


pytestmark = pytest.mark.usefixtures("disk_compilation_cache")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Sentence shards + tokenizer, and a tiny generated logic set in ReClor's files."""
  root = tmp_path_factory.mktemp("finetune_data")
  shard_dir, tokenizer_dir = helpers.shards_and_tokenizer(root)
  logic_dir = str(root / "logic_mc")
  logic_mc.write_reclor_format(logic_dir, dict(train=24, validation=8, test=8), seed=1)
  return dict(shards=shard_dir, tokenizer=tokenizer_dir, logic=logic_dir, root=root)


@pytest.fixture(scope="module")
def tokenizer(dirs):
  return tokenizer_lib.load_tokenizer(dirs["tokenizer"])


def tiny_config(dirs, **overrides):
  c = finetune_configs.get_config("quickstart")
  c.init_from_pretrain = ""
  c.train_steps = STEPS
  c.log_every = 1
  c.eval_every = 1000  # Only at the end.
  c.checkpoint_every = 2
  c.model.hidden_size, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.model.intermediate_size = 64
  c.data.data_dir, c.data.tokenizer_path = dirs["logic"], dirs["tokenizer"]
  c.data.max_len, c.data.batch_size, c.data.eval_batch_size = MAX_LEN, 8, 8
  c.optimizer.learning_rate = 1e-3
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return helpers.override(c, overrides)


# -----------------------------------------------------------------------------
# Tokenisation
# -----------------------------------------------------------------------------


def test_pair_format_and_context_cut_first(tokenizer):
  special = tokenizer_lib.special_ids(tokenizer)
  assert special.family == "roberta"
  ids, types, mask, cut = finetune.encode_pair([10, 11, 12], [20, 21], special, 12)
  s, e, p = special.bos, special.eos, special.pad
  assert ids.tolist() == [s, 10, 11, 12, e, e, 20, 21, e, p, p, p] and not cut
  assert mask.tolist() == [1] * 9 + [0] * 3 and not types.any()  # One token type.
  # Too long: the context loses its end first; the second text stays whole.
  ids, _, mask, cut = finetune.encode_pair(list(range(10, 20)), [20, 21], special, 10)
  assert ids.tolist() == [s, 10, 11, 12, 13, e, e, 20, 21, e] and cut and mask.all()
  # A second text that alone is too long is cut too, and the context dropped.
  ids, _, _, cut = finetune.encode_pair([10, 11], list(range(20, 30)), special, 8)
  assert ids.tolist() == [s, e, e, 20, 21, 22, 23, e] and cut


def test_bert_pair_format_has_segment_types_and_one_separator():
  special = tokenizer_lib.SpecialIds(bos=101, pad=0, eos=102, unk=100, mask=103, family="bert")
  ids, types, mask, cut = finetune.encode_pair([10, 11, 12], [20, 21], special, 10)
  assert ids.tolist() == [101, 10, 11, 12, 102, 20, 21, 102, 0, 0] and not cut
  assert types.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]  # Segment B from after [SEP].
  assert mask.tolist() == [1] * 8 + [0] * 2
  # Three special tokens, not four: one more context token fits than with RoBERTa.
  ids, types, _, cut = finetune.encode_pair(list(range(10, 20)), [20, 21], special, 10)
  assert ids.tolist() == [101, 10, 11, 12, 13, 14, 102, 20, 21, 102] and cut
  assert types.tolist() == [0] * 7 + [1] * 3
  with pytest.raises(ValueError, match="3 special tokens"):
    finetune.encode_pair([1], [2], special, 3)


def test_encode_examples_with_a_wordpiece_tokenizer(dirs):
  texts = [r["text"] for r in selection.iter_records(dirs["shards"])]
  wordpiece = helpers.train_small_wordpiece(texts, vocab_size=300)
  special = tokenizer_lib.special_ids(wordpiece)
  example = multiple_choice.read_reclor(os.path.join(dirs["logic"], "val.json"))[0]
  split = finetune.encode_examples([example], wordpiece, 512)
  assert split.truncated == 0
  for c, (first, second) in enumerate(multiple_choice.choice_texts(example)):
    real = split.attention_mask[0, c] == 1
    ids, types = split.input_ids[0, c][real].tolist(), split.token_type_ids[0, c][real].tolist()
    sep = ids.index(special.eos)
    assert ids[0] == special.bos and ids[-1] == special.eos and ids[sep + 1] != special.eos
    assert types == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)
    assert wordpiece.decode(ids[1:sep]) == wordpiece.decode(wordpiece.encode(first).ids)
    assert wordpiece.decode(ids[sep + 1 : -1]) == wordpiece.decode(wordpiece.encode(second).ids)


def test_encode_examples_fills_blanks_and_counts_truncation(tokenizer):
  special = tokenizer_lib.special_ids(tokenizer)
  example = dict(
    id="x",
    context="If it rains, the match is cancelled.",
    question="It rained, so the match was _.",
    options=["cancelled", "played", "won", "lost"],
    label=0,
  )
  hidden = dict(example, id="y", question="Which must be true?", label=None)
  split = finetune.encode_examples([example, hidden], tokenizer, 64)
  assert split.input_ids.shape == (2, 4, 64) and split.truncated == 0
  assert split.label.tolist() == [0, -1] and not split.has_labels
  for c, option in enumerate(example["options"]):
    ids = split.input_ids[0, c][split.attention_mask[0, c] == 1].tolist()
    assert ids[0] == special.bos and ids[-1] == special.eos
    sep = ids.index(special.eos)
    assert ids[sep + 1] == special.eos  # </s></s> between the two texts.
    assert tokenizer.decode(ids[1:sep]) == example["context"]
    assert tokenizer.decode(ids[sep + 2 : -1]) == f"It rained, so the match was {option}."
    assert f"It rained, so the match was {option}." == multiple_choice.choice_texts(example)[c][1]
  second = split.input_ids[1, 2][split.attention_mask[1, 2] == 1].tolist()
  assert tokenizer.decode(second[second.index(special.eos) + 2 : -1]) == "Which must be true? won"
  assert finetune.encode_examples([example], tokenizer, 12).truncated == 4


def test_train_batches_are_a_function_of_the_step(dirs, tokenizer):
  split = finetune.encode_examples(
    multiple_choice.read_reclor(os.path.join(dirs["logic"], "train.json")), tokenizer, MAX_LEN
  )
  a = finetune.train_batch(split, 5, 8, seed=3)
  b = finetune.train_batch(split, 5, 8, seed=3)
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  # Two hosts' halves make the one-host batch; an epoch visits every question once.
  halves = [finetune.train_batch(split, 5, 8, 3, shard_index=i, shard_count=2) for i in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), a["label"])
  epoch = np.concatenate([finetune.train_batch(split, s, 8, 3)["input_ids"] for s in range(3)])
  assert len({row.tobytes() for row in epoch}) == len({row.tobytes() for row in split.input_ids})


# -----------------------------------------------------------------------------
# End to end
# -----------------------------------------------------------------------------


def restore(workdir, config):
  source = finetune.resolve_init(config)
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  setup = finetune.make_setup(config, source.model_config, mesh, STEPS, 0)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.restore_latest(setup.abstract_state)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def scratch_run(dirs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("scratch"))
  return workdir, finetune.train_and_evaluate(tiny_config(dirs), workdir)


def test_scratch_run_writes_everything(scratch_run):
  workdir, result = scratch_run
  assert result["step"] == STEPS and not result["preempted"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  rows = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))
  for split in ("validation", "test"):
    (row,) = [r for r in rows if r["split"] == split]
    assert 0 <= row["accuracy"] <= 1 and row["examples"] == 8
    with open(os.path.join(workdir, f"predictions_{split}.json")) as f:
      predictions = json.load(f)
    assert predictions["step"] == STEPS and len(predictions["predictions"]) == 8
    first = predictions["predictions"][0]
    assert first["id"] == f"{'val' if split == 'validation' else 'test'}_0"
    assert first["prediction"] in range(4) and len(first["logits"]) == 4
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["best"]["step"] == STEPS and results["init"]["kind"] == "scratch"
  assert results["eval"]["test"]["accuracy"] == result["eval"]["test"]["accuracy"]
  assert not os.path.exists(os.path.join(workdir, "reclor_test_predictions.json"))


def test_sigterm_and_resume_are_bit_exact(dirs, scratch_run, tmp_path):
  reference_dir, _ = scratch_run
  workdir, config = str(tmp_path / "preempted"), tiny_config(dirs)

  def preempt_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  first = finetune.train_and_evaluate(config, workdir, on_step=preempt_at_2)
  assert first["preempted"] and first["step"] == 2
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  second = finetune.train_and_evaluate(config, workdir)
  assert second["step"] == STEPS
  loss = lambda d: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(d, "train")}
  assert loss(workdir) == loss(reference_dir)
  ours, theirs = restore(workdir, config), restore(reference_dir, config)
  assert ours.data == theirs.data
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(ours.state), jax.device_get(theirs.state)
  )


@pytest.fixture(scope="module")
def pretrain_dir(dirs, tmp_path_factory):
  """A 2-step pretraining workdir with the same tiny encoder."""
  c = pretrain_configs.get_config("quickstart")
  c.train_steps, c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 2, 1, 1000, 1, 2
  c.mlm_max_predictions = 4
  c.model.preset = "tiny"
  c.model.hidden_size, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.model.intermediate_size = 64
  c.data.shard_dir, c.data.tokenizer_path = dirs["shards"], dirs["tokenizer"]
  c.data.max_len, c.data.batch_size, c.data.eval_fraction = 24, 8, 0.2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  pretrain.train_and_evaluate(c, workdir)
  return workdir


def test_init_from_pretrain_uses_its_encoder_and_tokenizer(dirs, pretrain_dir, tmp_path):
  config = tiny_config(dirs, init_from_pretrain=pretrain_dir, **{"data.tokenizer_path": ""})
  source = finetune.resolve_init(config)
  assert source.kind == "pretrain" and source.tokenizer_path == dirs["tokenizer"]
  assert source.model_config.hidden_size == 32
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  setup = finetune.make_setup(config, source.model_config, mesh, STEPS, 0)
  state = finetune.init_state(config, setup, source)
  encoder, step = finetune.restore_pretrained_encoder(pretrain_dir, mesh)
  assert step == 2
  got = jax.device_get(state["params"]["encoder"])
  assert "pooler" in got and "pooler" not in encoder  # The pooler is new.
  jax.tree.map(np.testing.assert_array_equal, {k: got[k] for k in encoder}, jax.device_get(encoder))
  result = finetune.train_and_evaluate(config, str(tmp_path / "ft"))
  assert result["step"] == STEPS and result["best"]["step"] == STEPS


def _reclor_fixture(directory, logic_dir, num_test):
  """ReClor files from the generated questions; test ids test_0..test_{n-1} (Test-E/H)."""
  os.makedirs(directory, exist_ok=True)
  for name in ("train.json", "val.json"):
    with open(os.path.join(logic_dir, name)) as f, open(os.path.join(directory, name), "w") as g:
      g.write(f.read())
  with open(os.path.join(logic_dir, "test.json")) as f:
    pool = json.load(f)
  test = [dict(pool[i % len(pool)], id_string=f"test_{i}") for i in range(num_test)]
  with open(os.path.join(directory, "test.json"), "w") as f:
    json.dump(test, f)
  return directory


def test_reclor_reports_test_e_h_and_writes_the_leaderboard_file(dirs, tmp_path):
  data = _reclor_fixture(
    str(tmp_path / "reclor"), dirs["logic"], multiple_choice.RECLOR_TEST_EASY_COUNT + 8
  )
  config = tiny_config(
    dirs,
    train_steps=1,
    **{"data.dataset": "reclor", "data.data_dir": data, "data.eval_batch_size": 64},
  )
  workdir = str(tmp_path / "ft")
  result = finetune.train_and_evaluate(config, workdir)
  test = result["eval"]["test"]
  assert test["examples"] == 448 and {"test_e_accuracy", "test_h_accuracy"} <= set(test)
  with open(os.path.join(workdir, "predictions_test.json")) as f:
    rows = json.load(f)["predictions"]
  with open(os.path.join(workdir, "reclor_test_predictions.json")) as f:
    leaderboard = json.load(f)
  assert leaderboard == [r["prediction"] for r in rows]  # Entry i is "test_i".
  easy = [r["prediction"] == r["label"] for r in rows[: multiple_choice.RECLOR_TEST_EASY_COUNT]]
  assert test["test_e_accuracy"] == pytest.approx(np.mean(easy))
  hard = [r["prediction"] == r["label"] for r in rows[multiple_choice.RECLOR_TEST_EASY_COUNT :]]
  assert test["test_h_accuracy"] == pytest.approx(np.mean(hard))


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------


def test_missing_or_empty_pretrain_workdir_names_the_flag(dirs, tmp_path):
  config = tiny_config(dirs, init_from_pretrain=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="init_from_pretrain=.*nowhere does not exist"):
    finetune.train_and_evaluate(config, str(tmp_path / "a"))
  (tmp_path / "empty").mkdir()
  config = tiny_config(dirs, init_from_pretrain=str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="not a pretraining workdir"):
    finetune.train_and_evaluate(config, str(tmp_path / "b"))


def test_other_bad_inputs_name_the_flag(dirs, tmp_path):
  cases = [
    (dict(**{"data.tokenizer_path": ""}), ValueError, "needs --config.data.tokenizer_path"),
    (dict(**{"data.dataset": "race"}), ValueError, "data.dataset='race'"),
    (dict(**{"data.data_dir": str(tmp_path / "none")}), FileNotFoundError, "data_dir=.*none"),
    (dict(**{"optimizer.name": "lamb"}), ValueError, "optimizer.name='lamb'"),
    (dict(**{"data.max_len": 4096}), ValueError, "max_len=4096 exceeds"),
    (dict(init_from=str(tmp_path)), ValueError, "at most one"),
  ]
  for overrides, error, match in cases:
    config = tiny_config(dirs, **overrides)
    if "init_from" in overrides:
      config.init_from_pretrain = str(tmp_path)
    with pytest.raises(error, match=match):
      finetune.train_and_evaluate(config, str(tmp_path / "w"))


def test_mismatched_shapes_are_refused(dirs, scratch_run, tmp_path):
  import shutil

  reference_dir, _ = scratch_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_dir, workdir)
  wider = tiny_config(dirs, **{"model.hidden_size": 64})
  with pytest.raises(ValueError, match=r"config.json.*hidden_size: saved 32 vs now 64"):
    finetune.train_and_evaluate(wider, workdir)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(ValueError, match=r"Checkpoint .*checkpoints/4 does not match"):
    finetune.train_and_evaluate(wider, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


@pytest.mark.parametrize(
  "name",
  [
    "quickstart_finetune",
    "reclor_roberta_base",
    "reclor_roberta_large",
    "logiqa_roberta_base",
    "logiqa_roberta_large",
    "minilm_finetune",
  ],
)
def test_flagfiles_parse(name):
  workdir, config = helpers.parse_flagfile("apollo/lm/configs/finetune.py:quickstart", name)
  assert workdir and config.data.dataset in finetune.DATASETS
  assert bool(config.init_from_pretrain) != bool(config.init_from)
  train_lib.build_optimizer(config.optimizer, 10)  # Valid names.
  if name not in ("quickstart_finetune", "minilm_finetune"):
    assert (config.data.max_len, config.data.batch_size, config.num_epochs) == (256, 24, 10)
    assert config.optimizer.warmup_fraction == 0.1 and config.optimizer.weight_decay == 0.01
