"""Tests for the E-CLS perturbations."""

import numpy as np
import pytest

from apollo.lm.data import keywords, negatives, selection, tagging
from tests.lm import pretraining_data_helpers as helpers

_TAGGER = tagging.make_tagger()
_KNOWN = _TAGGER.vocabulary.__contains__


def _sentence(text):
  return negatives.TaggedSentence.from_text(text, _TAGGER, keywords.KeywordMatcher())


@pytest.mark.parametrize(
  "text, negated",
  [
    ("Kalomi is brittle.", "Kalomi is not brittle."),
    ("Kalomi is not brittle.", "Kalomi is brittle."),
    ("She doesn't know.", "She does know."),
    ("He can't swim.", "He can swim."),
    (
      "The cat quickly ran because it was scared.",
      "The cat quickly did not run because it was scared.",
    ),
    ("Tom has a dog.", "Tom does not have a dog."),
    ("The birds have left the island.", "The birds have not left the island."),
    ("Mira hummed loudly.", "Mira did not hum loudly."),
    ("The zorblets migrated south.", "The zorblets did not migrate south."),
    ("Kalomi never swims in Harrowmere.", "Kalomi swims in Harrowmere."),
    # The main clause follows a leading subordinate clause.
    (
      "Because it was raining, the ground is wet.",
      "Because it was raining, the ground is not wet.",
    ),
  ],
)
def test_negation_of_the_main_clause(text, negated):
  assert negatives.negate_main_clause(_sentence(text), _KNOWN) == negated


@pytest.mark.parametrize(
  "text, swapped",
  [
    ("It rained because the sky was grey.", "It rained although the sky was grey."),
    ("Although it rained, we played.", "Because it rained, we played."),
    ("It rained; therefore, we stayed.", "It rained; however, we stayed."),
    ("However, the club lost money.", "Therefore, the club lost money."),
    ("If it rains, we stay.", "Unless it rains, we stay."),
    ("Kalo swims only if the lake is warm.", "Kalo swims even if the lake is warm."),
  ],
)
def test_keyword_swap(text, swapped):
  assert negatives.swap_keyword(_sentence(text)) == swapped


@pytest.mark.parametrize(
  "text, swapped",
  [
    (
      "Kalomi is luminous because every quandril is luminous.",
      "Every quandril is luminous because Kalomi is luminous.",
    ),
    ("Because it rained, the ground is wet.", "Because the ground is wet, it rained."),
    ("If a quandril is luminous, then it glows.", "If it glows, then a quandril is luminous."),
    (
      "All zorblets are heavy; therefore, Belmi is heavy.",
      "Belmi is heavy; therefore, all zorblets are heavy.",
    ),
    (
      "The river flooded, and as a result the town was evacuated.",
      "The town was evacuated, and as a result the river flooded.",
    ),
  ],
)
def test_clause_swap_around_a_directional_keyword(text, swapped):
  assert negatives.swap_clauses(_sentence(text)) == swapped


def test_rules_that_do_not_apply_return_none():
  no_keyword = _sentence("Kalomi is not brittle.")
  assert negatives.swap_keyword(no_keyword) is None
  assert negatives.swap_clauses(no_keyword) is None
  # "but" is not directional: no clause swap; one-word clauses are too short.
  assert negatives.swap_clauses(_sentence("Tom is tall, but Ann is short.")) is None
  assert negatives.swap_clauses(_sentence("Hence, yes.")) is None
  assert negatives.negate_main_clause(_sentence("Yes, indeed.")) is None


def test_enabled_perturbations_and_random_choice():
  sentence = _sentence("Kalo is warm because the sun shines.")
  everything = negatives.applicable_perturbations(sentence, is_known_word=_KNOWN)
  assert set(everything) == set(negatives.PERTURBATIONS)
  only_swap = negatives.applicable_perturbations(sentence, ["keyword_swap"])
  assert only_swap == {"keyword_swap": "Kalo is warm although the sun shines."}
  with pytest.raises(ValueError, match="Unknown perturbations"):
    negatives.applicable_perturbations(sentence, ["shuffle"])
  draws = [negatives.make_contradiction(sentence, np.random.default_rng(s)) for s in range(30)]
  assert {name for name, _ in draws} == set(negatives.PERTURBATIONS)
  assert draws[3] == negatives.make_contradiction(sentence, np.random.default_rng(3))
  assert negatives.make_contradiction(_sentence("Yes, indeed."), np.random.default_rng(0)) is None


@pytest.mark.parametrize(
  "word, tag, base",
  [
    ("swims", "VBZ", "swim"),
    ("watches", "VBZ", "watch"),
    ("carries", "VBZ", "carry"),
    ("has", "VBZ", "have"),
    ("sank", "VBD", "sink"),
    ("studied", "VBD", "study"),
    ("stopped", "VBD", "stop"),
    ("created", "VBD", "create"),
    ("walked", "VBD", "walk"),
  ],
)
def test_verb_base_form(word, tag, base):
  assert negatives.verb_base_form(word, tag, _KNOWN) == base


def test_perturbations_survive_an_uncased_wordpiece(tmp_path):
  """E-CLS negatives are made on text, before tokenization: through BERT's lower-casing
  WordPiece every perturbed sentence still differs from its original."""
  shard_dir = str(tmp_path / "shards")
  helpers.make_generated_shards(shard_dir, num_documents=30, docs_per_shard=30)
  texts = [r["text"] for r in selection.iter_records(shard_dir)]
  wordpiece = helpers.train_small_wordpiece(texts, vocab_size=200)
  kinds = dict.fromkeys(negatives.PERTURBATIONS, 0)
  for text in texts:
    original = wordpiece.encode(text).ids
    options = negatives.applicable_perturbations(_sentence(text), negatives.PERTURBATIONS, _KNOWN)
    for kind, perturbed in options.items():
      assert wordpiece.encode(perturbed).ids != original, (kind, text, perturbed)
      kinds[kind] += 1
  assert min(kinds.values()) > 10, kinds
