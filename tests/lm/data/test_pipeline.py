"""Tests for the APOLLO pretraining input pipeline (grain)."""

import dataclasses
import json

import numpy as np
import pytest

from apollo.lm.data import masking, negatives, pipeline, selection
from apollo.models import tokenizer as tokenizer_lib
from tests.lm import pretraining_data_helpers as helpers

_CONFIG = pipeline.PretrainDataConfig(max_len=40, batch_size=8, eval_fraction=0.2, read_threads=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  shard_dir = str(tmp_path_factory.mktemp("shards"))
  helpers.make_generated_shards(shard_dir, num_documents=60, docs_per_shard=20)
  tok = helpers.train_small_tokenizer(shard_dir, shard_dir + "/tokenizer")
  return shard_dir, tok


def _batches(corpus, config=_CONFIG, split="train", n=None):
  shard_dir, tok = corpus
  iterator = iter(pipeline.make_pretrain_dataset(shard_dir, tok, config, split))
  if n is None:
    return list(iterator)
  return [next(iterator) for _ in range(n)]


def _assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_keys_shapes_and_conventions(corpus):
  batch = _batches(corpus, n=1)[0]
  b, l = _CONFIG.batch_size, _CONFIG.max_len
  expected = dict(
    input_ids=((b, l), np.int32),
    attention_mask=((b, l), np.int32),
    mlm_labels=((b, l), np.int32),
    mlm_weights=((b, l), np.float32),
    ecls_label=((b,), np.int32),
    ecls_perturbation=((b,), np.int32),
    mlm_too_few_candidates=((b,), np.int32),
    example_mask=((b,), np.int32),
  )
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  lengths = batch["attention_mask"].sum(1)
  for row, length in enumerate(lengths):
    ids = batch["input_ids"][row]
    assert ids[0] == 0 and ids[length - 1] == 2  # <s> ... </s>
    assert (ids[length:] == 1).all()  # <pad>
    assert (batch["attention_mask"][row, :length] == 1).all()
    assert (batch["mlm_labels"][row, [0, length - 1]] == masking.IGNORE_LABEL).all()
    assert (batch["mlm_labels"][row, length:] == masking.IGNORE_LABEL).all()
  np.testing.assert_array_equal(batch["mlm_weights"], batch["mlm_labels"] != masking.IGNORE_LABEL)
  targets = batch["mlm_labels"] != masking.IGNORE_LABEL
  assert targets.any()
  # <mask> appears only at targets; the labels there are real tokens.
  assert ((batch["input_ids"] == 4) <= targets).all()
  assert (batch["mlm_labels"][targets] > 4).all()
  assert ((batch["ecls_label"] == 0) == (batch["ecls_perturbation"] == 0)).all()
  assert (batch["example_mask"] == 1).all()


def test_pipeline_is_deterministic_for_a_seed(corpus):
  first, again = _batches(corpus, n=3), _batches(corpus, n=3)
  _assert_equal_batches(first, again)
  other = _batches(corpus, dataclasses.replace(_CONFIG, seed=1), n=3)
  assert not np.array_equal(first[0]["input_ids"], other[0]["input_ids"])


def test_iterator_state_restores_the_exact_data_order(corpus):
  shard_dir, tok = corpus
  config = dataclasses.replace(_CONFIG, num_epochs=None)
  iterator = iter(pipeline.make_pretrain_dataset(shard_dir, tok, config))
  for _ in range(2):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # As a checkpoint holds it.
  # Run past the end of the first epoch, where the order is reshuffled.
  reference = [next(iterator) for _ in range(45)]  # An epoch: 43.

  restored = iter(pipeline.make_pretrain_dataset(shard_dir, tok, config))
  restored.set_state(state)
  _assert_equal_batches(reference, [next(restored) for _ in range(45)])


def test_labels_are_balanced_and_coverage_is_counted(corpus):
  shard_dir, tok = corpus
  everything = dataclasses.replace(_CONFIG, eval_fraction=1.0)  # One full pass.
  batches = _batches(corpus, everything, split="eval")
  real = np.concatenate([b["example_mask"] for b in batches]) == 1
  labels = np.concatenate([b["ecls_label"] for b in batches])[real]
  kinds = np.concatenate([b["ecls_perturbation"] for b in batches])[real]
  assert (labels == 0).sum() == (labels == 1).sum() > 100
  assert set(kinds[labels == 1]) == {1, 2, 3}
  coverage = pipeline.measure_objective_coverage(shard_dir, tok, everything, split="eval")
  assert (labels == 0).sum() == coverage["sentences"] - coverage["no_perturbation"]
  too_few = np.concatenate([b["mlm_too_few_candidates"] for b in batches])[real]
  assert too_few[labels == 0].sum() == coverage["too_few_mask_candidates"]
  greedy = dataclasses.replace(everything, mask_ratio=0.6)
  short = pipeline.measure_objective_coverage(shard_dir, tok, greedy, "eval")
  assert 0 < short["too_few_mask_candidates"] < short["sentences"]
  # The padded tail: rows beyond the data carry no targets and no label weight.
  last = batches[-1]
  padded = last["example_mask"] == 0
  assert len(batches) * _CONFIG.batch_size - real.sum() == padded.sum()
  assert (last["mlm_weights"][padded] == 0).all()
  assert (last["input_ids"][padded] == 1).all()

  # With only the keyword swap, sentences without a swappable keyword drop out.
  swap_only = dataclasses.replace(everything, perturbations=("keyword_swap",))
  narrow = pipeline.measure_objective_coverage(shard_dir, tok, swap_only, "eval")
  assert narrow["no_perturbation"] > coverage["no_perturbation"]
  kinds = np.concatenate(
    [b["ecls_perturbation"] for b in _batches(corpus, swap_only, split="eval")]
  )
  assert set(kinds) <= {0, negatives.PERTURBATION_IDS["keyword_swap"]}


def test_eval_split_is_a_stable_hash_of_the_text(corpus):
  shard_dir, tok = corpus
  assert pipeline.in_eval_split("A b.", 0.3) == pipeline.in_eval_split("A  b.", 0.3)
  held_out = pipeline.measure_objective_coverage(shard_dir, tok, _CONFIG, "eval")
  train = pipeline.measure_objective_coverage(shard_dir, tok, _CONFIG, "train")
  total = held_out["sentences"] + train["sentences"]
  assert 0.1 < held_out["sentences"] / total < 0.3  # eval_fraction = 0.2.
  eval_batches = _batches(corpus, split="eval")
  labels = np.concatenate([b["ecls_label"][b["example_mask"] == 1] for b in eval_batches])
  assert (labels == 0).sum() == held_out["sentences"] - held_out["no_perturbation"]


def test_perturbed_rows_can_go_without_mlm_targets(corpus):
  config = dataclasses.replace(_CONFIG, mlm_on_perturbed=False)
  for batch in _batches(corpus, config, n=3):
    perturbed = batch["ecls_label"] == 1
    assert (batch["mlm_weights"][perturbed] == 0).all()
    assert (batch["mlm_weights"][~perturbed].sum(1) > 0).any()
    # Their inputs are still masked, so masks do not give the label away.
    assert (batch["input_ids"][perturbed] == 4).any()


def test_missing_shards_are_a_clear_error(corpus, tmp_path):
  _, tok = corpus
  with pytest.raises(FileNotFoundError, match="select_sentences"):
    pipeline.make_pretrain_dataset(str(tmp_path), tok, _CONFIG)
  with pytest.raises(ValueError, match="split"):
    pipeline.make_pretrain_dataset(corpus[0], tok, _CONFIG, split="test")


def test_wordpiece_batches_are_bert_shaped_and_mask_whole_words(corpus):
  """With a checkpoint's uncased WordPiece: [CLS] ... [SEP] [PAD]..., and every piece
  of a chosen word is a target (a "##" piece never without the piece before it)."""
  shard_dir, _ = corpus
  texts = (r["text"] for r in selection.iter_records(shard_dir))
  wordpiece = helpers.train_small_wordpiece(texts, vocab_size=200)
  special = tokenizer_lib.special_ids(wordpiece)
  assert special.family == "bert" and special.pad == 0
  batches = _batches((shard_dir, wordpiece), n=4)
  multi_piece_targets = 0
  for batch in batches:
    for row, length in enumerate(batch["attention_mask"].sum(1)):
      ids, labels = batch["input_ids"][row], batch["mlm_labels"][row]
      assert ids[0] == special.bos and ids[length - 1] == special.eos
      assert (ids[length:] == special.pad).all()
      targets = labels != masking.IGNORE_LABEL
      assert ((ids == special.mask) <= targets).all()
      original = np.where(targets, labels, ids)
      for t in range(1, length - 1):
        continuation = wordpiece.id_to_token(int(original[t])).startswith("##")
        if continuation:
          assert targets[t] == targets[t - 1], wordpiece.decode(original[:length].tolist())
          multi_piece_targets += int(targets[t])
  assert multi_piece_targets > 10
