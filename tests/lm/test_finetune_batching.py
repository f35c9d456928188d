"""Tests of fine-tuning's length-bucketed batches (`finetune.TrainOrder`, `eval_batches`).

* the bucketed batches of an epoch take a handful of shapes and visit every question once;
* on a skewed-length set, bucketing pads far less than padding to `max_len`;
* the loss, accuracy and logits of the same questions are equal (within float
  tolerance) whether they are padded to their bucket or to `max_len`;
* end to end with several buckets: a SIGTERM and a rerun end equal to an
  uninterrupted run, a changed bucketing is refused, results.json has questions/s;
* the split files: a missing one names what was looked for, the reader's odd
  records are reported with the size check.
"""

import json
import logging
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from apollo.common import metrics as metrics_lib
from apollo.lm import finetune
from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.datasets import logic_mc, multiple_choice
from apollo.models import tokenizer as tokenizer_lib
from apollo.models.roberta import model as model_lib
from tests.lm import pretraining_data_helpers as helpers

MAX_LEN = 96
BUCKET = 32  # Buckets 32 / 64 / 96.

pytestmark = pytest.mark.usefixtures("disk_compilation_cache")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("batching")
  _, tokenizer_dir = helpers.shards_and_tokenizer(root)
  logic_dir = str(root / "logic_mc")
  logic_mc.write_reclor_format(logic_dir, dict(train=24, validation=12, test=12), seed=1)
  skewed_dir = root / "skewed"  # The skewed set in ReClor's files (read as logic_mc).
  skewed_dir.mkdir()
  for name, n in (("train.json", 24), ("val.json", 8), ("test.json", 8)):
    rows = [
      dict(
        context=e["context"],
        question=e["question"],
        answers=e["options"],
        label=e["label"],
        id_string=f"{name[:-5]}_{i}",
      )
      for i, e in enumerate(skewed_examples(n))
    ]
    (skewed_dir / name).write_text(json.dumps(rows))
  return dict(tokenizer=tokenizer_dir, logic=logic_dir, skewed=str(skewed_dir))


@pytest.fixture(scope="module")
def tokenizer(dirs):
  return tokenizer_lib.load_tokenizer(dirs["tokenizer"])


def skewed_examples(n: int = 40) -> list[dict]:
  """Mostly short questions, a few long ones: the case bucketing is for."""
  examples = []
  for i in range(n):
    context = "The match was cancelled because it rained. " * 12 if i % 10 == 0 else "It rained."
    examples.append(
      dict(
        id=f"q{i}",
        context=context,
        question="Which must be true?",
        options=["rain", "sun", "snow", "wind"],
        label=i % 4,
      )
    )
  return examples


@pytest.fixture(scope="module")
def skewed(tokenizer):
  return finetune.encode_examples(skewed_examples(), tokenizer, MAX_LEN)


def test_bucket_lengths():
  assert finetune.bucket_lengths(256, 64) == (64, 128, 192, 256)
  assert finetune.bucket_lengths(100, 32) == (32, 64, 96, 100)
  assert finetune.bucket_lengths(128, 0) == finetune.bucket_lengths(128, 128) == (128,)


def test_bucketed_epoch_has_few_shapes_and_visits_every_question_once(skewed):
  buckets = finetune.bucket_lengths(MAX_LEN, BUCKET)
  order = finetune.TrainOrder(skewed.lengths, 8, seed=3, buckets=buckets)
  assert order.steps_per_epoch == 5
  seen, shapes = [], set()
  for step in range(order.steps_per_epoch):
    index, length = order.step(step)
    batch = order.batch(skewed, step)
    shapes.add(batch["input_ids"].shape)
    n = len(index)
    assert batch["example_mask"].tolist() == [1] * n + [0] * (8 - n)
    np.testing.assert_array_equal(batch["input_ids"][:n], skewed.input_ids[index, :, :length])
    assert not skewed.attention_mask[index, :, length:].any()  # Only padding was cut.
    seen += index.tolist()
  assert sorted(seen) == list(range(len(skewed)))
  assert len(shapes) <= len(buckets) and all(s[:2] == (8, 4) for s in shapes)
  assert len(shapes) > 1  # Short and long questions are padded differently.
  # A pure function of the step: a fresh order, or two hosts' halves, give the same rows.
  again = finetune.TrainOrder(skewed.lengths, 8, seed=3, buckets=buckets)
  np.testing.assert_array_equal(
    again.batch(skewed, 7)["input_ids"], order.batch(skewed, 7)["input_ids"]
  )
  halves = [order.batch(skewed, 7, shard_index=i, shard_count=2) for i in (0, 1)]
  np.testing.assert_array_equal(
    np.concatenate([h["input_ids"] for h in halves]), order.batch(skewed, 7)["input_ids"]
  )
  assert order.examples_seen(order.steps_per_epoch) == len(skewed)
  assert order.examples_seen(2 * order.steps_per_epoch + 1) == 2 * len(skewed) + len(
    order.step(2 * order.steps_per_epoch)[0]
  )


def test_padding_fraction_drops_on_a_skewed_set(skewed):
  buckets = finetune.bucket_lengths(MAX_LEN, BUCKET)
  report = finetune.batching_report(skewed, finetune.eval_plan(skewed, 8, buckets))
  assert report["padding_fraction"] < 0.5 * report["padding_fraction_at_max_len"]
  order = finetune.TrainOrder(skewed.lengths, 8, seed=0, buckets=buckets)
  train = finetune.batching_report(skewed, order.epoch(0))
  assert train["padding_fraction"] < 0.5 * report["padding_fraction_at_max_len"]
  assert sum(train["questions_per_length"].values()) == len(skewed)
  flat = finetune.batching_report(skewed, finetune.eval_plan(skewed, 8))
  assert flat["padding_fraction"] == flat["padding_fraction_at_max_len"]
  # Leftovers of all buckets share batches: no more short batches than one.
  plan = finetune.eval_plan(skewed, 16, buckets)
  assert sum(len(i) < 16 for i, _ in plan) <= 1 and len(plan) == 3


def test_bucketed_and_padded_to_max_give_the_same_loss_and_accuracy(skewed, tokenizer):
  vocab = -(-tokenizer.get_vocab_size() // 128) * 128
  config = model_lib.get_config(
    "tiny",
    vocab_size=vocab,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
  )
  model = model_lib.MultipleChoiceModel(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  eval_fn = jax.jit(lambda p, b: finetune.eval_step(p, b, graphdef=graphdef))

  def evaluate(buckets):
    sums, logits = dict(loss_sum=0.0, correct=0.0, count=0.0), np.zeros((len(skewed), 4))
    shapes = set()
    for batch, index in finetune.eval_batches(skewed, 16, buckets):
      shapes.add(batch["input_ids"].shape)
      out, batch_logits = eval_fn(params, batch)
      for k in sums:
        sums[k] += float(out[k])
      logits[index] = np.asarray(batch_logits)[: len(index)]
    return sums, logits, shapes

  bucketed, bucketed_logits, shapes = evaluate(finetune.bucket_lengths(MAX_LEN, BUCKET))
  padded, padded_logits, max_shapes = evaluate(None)
  assert len(shapes) > 1 and max_shapes == {(16, 4, MAX_LEN)}
  assert bucketed["count"] == padded["count"] == len(skewed)
  assert bucketed["correct"] == padded["correct"]
  np.testing.assert_allclose(bucketed["loss_sum"], padded["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(bucketed_logits, padded_logits, rtol=1e-4, atol=1e-5)

  # A training batch: the same questions at their bucket's length and at max_len.
  order = finetune.TrainOrder(skewed.lengths, 8, 0, finetune.bucket_lengths(MAX_LEN, BUCKET))
  index, length = min((order.step(s) for s in range(5)), key=lambda il: il[1])
  assert length < MAX_LEN
  short = finetune._padded_rows(skewed, index, length, 8)
  full = finetune._padded_rows(skewed, index, MAX_LEN, 8)
  (a, _), (b, _) = eval_fn(params, short), eval_fn(params, full)
  np.testing.assert_allclose(float(a["loss_sum"]), float(b["loss_sum"]), rtol=1e-5)


def tiny_config(dirs, **overrides):
  c = finetune_configs.get_config("quickstart")
  c.init_from_pretrain = ""
  c.train_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 1000, 2
  c.model.hidden_size, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.model.intermediate_size = 64
  c.data.data_dir, c.data.tokenizer_path = dirs["skewed"], dirs["tokenizer"]
  c.data.max_len, c.data.bucket_multiple = MAX_LEN, BUCKET
  c.data.batch_size, c.data.eval_batch_size = 4, 8
  c.optimizer.learning_rate = 1e-3
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return helpers.override(c, overrides)


@pytest.mark.slow
def test_bucketed_run_resumes_exactly_and_reports_throughput(dirs, tmp_path):
  config = tiny_config(dirs)
  reference = str(tmp_path / "reference")
  result = finetune.train_and_evaluate(config, reference)
  with open(os.path.join(reference, "results.json")) as f:
    saved = json.load(f)
  batching = saved["batching"]
  assert batching["bucket_lengths"] == [32, 64, 96]
  assert len(batching["train"]["questions_per_length"]) > 1  # Several buckets in use.
  assert batching["train"]["padding_fraction"] < batching["train"]["padding_fraction_at_max_len"]
  assert saved["throughput"]["train_questions_per_s"] > 0
  assert saved["throughput"]["eval_questions_per_s"]["validation"] > 0
  assert result["eval"]["test"]["questions_per_s"] > 0
  train_rows = metrics_lib.read_metrics(reference, "train")
  assert all(r["questions_per_s"] > 0 for r in train_rows)

  workdir = str(tmp_path / "preempted")

  def preempt_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  assert finetune.train_and_evaluate(config, workdir, on_step=preempt_at_2)["preempted"]
  assert finetune.train_and_evaluate(config, workdir)["step"] == 4
  loss = lambda d: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(d, "train")}
  assert loss(workdir) == loss(reference)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["eval"]["test"]["accuracy"] == saved["eval"]["test"]["accuracy"]
  with pytest.raises(ValueError, match="bucket_multiple"):
    finetune.train_and_evaluate(tiny_config(dirs, **{"data.bucket_multiple": 64}), workdir)


def test_missing_split_names_the_files_looked_for(dirs, tmp_path):
  data = tmp_path / "reclor"
  data.mkdir()
  for name in ("train.json", "test.json"):
    (data / name).write_text(open(os.path.join(dirs["logic"], name)).read())
  config = tiny_config(dirs, **{"data.dataset": "reclor", "data.data_dir": str(data)})
  with pytest.raises(multiple_choice.MissingSplitError, match=r"'val.json'.*test.json, train.json"):
    finetune.read_split(config, str(data), "validation")
  with pytest.raises(FileNotFoundError, match="--config.data.data_dir"):
    finetune.train_and_evaluate(config, str(tmp_path / "w"))


def test_split_size_report_has_the_readers_odd_records(tmp_path, caplog):
  """LogiQA records with an unprefixed option line: read, and said so with the size check."""
  record = "\nb\nIt rained, so the match was cancelled.\nWhy?\nA. rain\nB. sun\nsnow\nD. wind\n"
  for name in ("Train.txt", "Eval.txt", "Test.txt"):
    (tmp_path / name.lower()).write_text(record * 3)  # Found in any case.
  config = finetune_configs.get_config("logiqa_base")
  with caplog.at_level(logging.INFO):
    examples = finetune.read_split(config, str(tmp_path), "train")
  assert len(examples) == 3 and examples[0]["options"][2] == "snow"
  assert any(
    "logiqa train" in r.getMessage()
    and "option_without_prefix=3" in r.getMessage()
    and "7,376" in r.getMessage()
    for r in caplog.records
  )
