"""Tests for the embedded procedural logic benchmark."""

import collections
import random
import re

import pytest

from apollo.lm.datasets import logic_mc, multiple_choice


@pytest.fixture(scope="module")
def train_2000():
  return logic_mc.generate_split("train", 2000, seed=0)


def test_examples_are_well_formed(train_2000):
  for example in train_2000[:200]:
    assert set(example) == {"id", "context", "question", "options", "label", "question_type"}
    assert len(example["options"]) == 4
    assert len(set(example["options"])) == 4
    assert example["label"] in range(4)
  assert {e["question_type"] for e in train_2000} == set(logic_mc.QUESTION_TYPES)


def test_generation_is_deterministic():
  first = logic_mc.generate_split("validation", 30, seed=7)
  assert first == logic_mc.generate_split("validation", 30, seed=7)
  # A longer split extends a shorter one; another seed gives other examples.
  assert logic_mc.generate_split("validation", 40, seed=7)[:30] == first
  other = logic_mc.generate_split("validation", 30, seed=8)
  assert {e["context"] for e in other}.isdisjoint(e["context"] for e in first)


def test_splits_do_not_share_contexts():
  splits = logic_mc.generate_splits({"train": 300, "validation": 150, "test": 150}, seed=0)
  contexts = {s: {e["context"] for e in examples} for s, examples in splits.items()}
  assert {s: len(c) for s, c in contexts.items()} == {"train": 300, "validation": 150, "test": 150}
  assert contexts["train"].isdisjoint(contexts["validation"])
  assert contexts["train"].isdisjoint(contexts["test"])
  assert contexts["validation"].isdisjoint(contexts["test"])


def test_answer_positions_are_balanced(train_2000):
  counts = collections.Counter(e["label"] for e in train_2000)
  assert max(counts.values()) - min(counts.values()) <= 1


def _words(text):
  return re.findall(r"\w+", text.lower())


def _accuracy(examples, pick):
  return sum(pick(e) == e["label"] for e in examples) / len(examples)


def _longest_option(example):
  lengths = [len(o) for o in example["options"]]
  return lengths.index(max(lengths))


def _max_word_overlap(example):
  context = set(_words(example["context"]))
  overlaps = [sum(w in context for w in _words(o)) for o in example["options"]]
  return overlaps.index(max(overlaps))


def _shortest_option(example):
  lengths = [len(o) for o in example["options"]]
  return lengths.index(min(lengths))


def _most_shared_with_other_options(example):
  words = [set(_words(o)) for o in example["options"]]
  shared = [sum(len(w & v) for v in words if v is not w) for w in words]
  return shared.index(max(shared))


@pytest.mark.parametrize(
  "baseline",
  [_longest_option, _max_word_overlap, _shortest_option, _most_shared_with_other_options],
)
def test_surface_baselines_stay_near_chance(train_2000, baseline):
  accuracy = _accuracy(train_2000, baseline)
  assert 0.15 < accuracy < 0.40, (baseline.__name__, accuracy)


def test_written_files_load_with_the_reclor_reader(tmp_path):
  sizes = {"train": 20, "validation": 8, "test": 8}
  paths = logic_mc.write_reclor_format(tmp_path, sizes, seed=3)
  assert sorted(p.rsplit("/", 1)[-1] for p in paths.values()) == [
    "test.json",
    "train.json",
    "val.json",
  ]
  generated = logic_mc.generate_splits(sizes, seed=3)
  for split, path in paths.items():
    examples = multiple_choice.read_reclor(path)
    expected = [
      {k: e[k] for k in ("id", "context", "question", "options", "label")} for e in generated[split]
    ]
    assert examples == expected
  # Our test split keeps its labels, unlike ReClor's.
  assert all(e["label"] is not None for e in multiple_choice.read_reclor(paths["test"]))
  assert multiple_choice.read_reclor(paths["validation"])[0]["id"] == "val_0"


def test_theory_knows_the_fallacies():
  """The checker behind every answer: valid forms hold, fallacies do not."""
  world = logic_mc._World("grell", "grells", ("Tovin", "Bela"), ("brisk", "vorpish", "talmic"))
  say = logic_mc._Sentences(world, random.Random(0))
  brisk, vorpish = (0, True), (1, True)
  rule = say.rule(brisk, vorpish)
  theory = logic_mc._Theory(
    say.tables, world.names, [rule, say.fact("Tovin", brisk), say.fact("Bela", vorpish)]
  )
  assert theory.consistent()
  assert theory.entails(say.fact("Tovin", vorpish))  # ponens
  assert theory.contradicts(say.fact("Tovin", (1, False)))
  assert not theory.entails(say.fact("Bela", brisk))  # affirming cons.
  assert not theory.contradicts(say.fact("Bela", brisk))
  assert not theory.entails(say.rule(vorpish, brisk))  # converse
  assert not theory.entails(say.rule((0, False), (1, False)))  # inverse
  assert theory.entails(say.rule((1, False), (0, False)))  # contrapositive
  with_denial = theory.plus(say.fact("Bela", (0, False)))
  assert with_denial.consistent()
  assert not with_denial.plus(say.fact("Tovin", (1, False))).consistent()
