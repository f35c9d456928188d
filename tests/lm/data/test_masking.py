"""Tests for S-MLM selective masking."""

import unicodedata

import numpy as np
import pytest

from apollo.lm.data import keywords, masking, tagging
from tests.lm import pretraining_data_helpers as helpers

MASK_ID, VOCAB, SPECIAL = 4, 1000, (0, 1, 2, 3, 4)


def _mask(token_ids, token_words, candidates, seed, config=masking.MaskingConfig()):
  return masking.mask_selected_words(
    np.asarray(token_ids),
    np.asarray(token_words),
    candidates,
    np.random.default_rng(seed),
    config,
    MASK_ID,
    VOCAB,
    SPECIAL,
  )


def test_candidates_are_pos_selected_words_and_keywords():
  text = "The cat quickly ran because it was scared."
  words = tagging.word_tokenize(text)
  tags = [t for _, t in tagging.make_tagger().tag([w.text for w in words])]
  matches = keywords.KeywordMatcher().find(text)
  chosen = [
    words[i].text for i in masking.candidate_words(words, tags, matches, masking.MaskingConfig())
  ]
  assert chosen == ["quickly", "ran", "because", "was", "scared"]
  no_keywords = masking.MaskingConfig(mask_keywords=False)
  assert "because" not in [
    words[i].text for i in masking.candidate_words(words, tags, matches, no_keywords)
  ]
  verbs_only = masking.MaskingConfig(candidate_tag_prefixes=("VB",), mask_keywords=False)
  assert [words[i].text for i in masking.candidate_words(words, tags, matches, verbs_only)] == [
    "ran",
    "was",
    "scared",
  ]


def test_budget_and_80_10_10_statistics():
  # 200 one-token words, every other one a candidate: budget 30 of 200 tokens.
  ids = np.arange(100, 300)
  candidates = list(range(0, 200, 2))
  outcomes = {"mask": 0, "random": 0, "keep": 0}
  for seed in range(300):
    result = _mask(ids, np.arange(200), candidates, seed)
    targets = np.flatnonzero(result.labels != masking.IGNORE_LABEL)
    assert result.budget == 30 and len(targets) == 30
    assert not result.too_few_candidates
    assert set(targets) <= set(candidates)  # Never a non-candidate.
    np.testing.assert_array_equal(result.labels[targets], ids[targets])
    untouched = np.setdiff1d(np.arange(200), targets)
    np.testing.assert_array_equal(result.input_ids[untouched], ids[untouched])
    replaced = result.input_ids[targets]
    outcomes["mask"] += int((replaced == MASK_ID).sum())
    outcomes["keep"] += int((replaced == ids[targets]).sum())
    outcomes["random"] += int(((replaced != MASK_ID) & (replaced != ids[targets])).sum())
    assert not np.isin(replaced[replaced != MASK_ID], SPECIAL).any()
  total = sum(outcomes.values())  # 9000 draws: +-0.01 is > 3 standard errors.
  assert abs(outcomes["mask"] / total - 0.8) < 0.015
  assert abs(outcomes["random"] / total - 0.1) < 0.012
  assert abs(outcomes["keep"] / total - 0.1) < 0.012


def test_masking_is_deterministic_for_a_seed():
  ids, words = np.arange(100, 140), np.arange(40)
  first = _mask(ids, words, list(range(40)), seed=7)
  again = _mask(ids, words, list(range(40)), seed=7)
  other = _mask(ids, words, list(range(40)), seed=8)
  np.testing.assert_array_equal(first.input_ids, again.input_ids)
  np.testing.assert_array_equal(first.labels, again.labels)
  assert not np.array_equal(first.labels, other.labels)


def test_all_subwords_of_a_word_are_masked_together():
  # Word w has tokens 2w and 2w+1.
  token_words = np.repeat(np.arange(10), 2)
  for seed in range(20):
    result = _mask(
      np.arange(100, 120), token_words, [1, 4, 7], seed, masking.MaskingConfig(mask_ratio=0.2)
    )
    targets = result.labels != masking.IGNORE_LABEL
    assert targets.sum() == 4  # Two whole words fill the budget of 4.
    for w in range(10):
      assert targets[2 * w] == targets[2 * w + 1]
      # One draw per word: both tokens masked or neither.
      assert (result.input_ids[2 * w] == MASK_ID) == (result.input_ids[2 * w + 1] == MASK_ID)


def test_too_few_candidates_are_flagged_not_filled_with_random_tokens():
  ids = np.arange(100, 120)  # Budget 3.
  result = _mask(ids, np.arange(20), [5], seed=0)
  assert result.budget == 3 and result.too_few_candidates
  assert list(np.flatnonzero(result.labels != masking.IGNORE_LABEL)) == [5]
  none = _mask(ids, np.arange(20), [], seed=0)
  assert none.too_few_candidates
  assert (none.labels == masking.IGNORE_LABEL).all()
  np.testing.assert_array_equal(none.input_ids, ids)


def test_tokens_map_to_words_by_character_overlap():
  words = tagging.word_tokenize("Kalo doesn't swim.")  # Kalo does n't swim .
  # Tokens "Ka" "lo" " doesn" "'t" " " "swim" "."; the byte-level tokenizer
  # gives the lone space token an empty span, and it joins the next word.
  offsets = [(0, 2), (2, 4), (4, 10), (10, 12), (13, 13), (13, 17), (17, 18)]
  np.testing.assert_array_equal(masking.tokens_to_words(offsets, words), [0, 0, 1, 2, 3, 3, 4])


def test_config_is_validated():
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.MaskingConfig(mask_ratio=0.0)
  with pytest.raises(ValueError, match="<= 1"):
    masking.MaskingConfig(mask_token_prob=0.95, random_token_prob=0.1)


def test_budget_is_reached_with_one_long_word_when_short_words_run_out():
  # Budget 3 (20 tokens); candidates: word 0 (1 token) and word 1 (4 tokens).
  token_words = np.array([0, 1, 1, 1, 1] + list(range(2, 17)))
  for seed in range(10):
    result = _mask(np.arange(100, 120), token_words, [0, 1], seed)
    targets = np.flatnonzero(result.labels != masking.IGNORE_LABEL)
    assert not result.too_few_candidates
    assert set(targets) >= {1, 2, 3, 4}  # The 4-token word, whole.


# -----------------------------------------------------------------------------
# WordPiece (BERT, MiniLM): whole words over "##" pieces, offsets through lower-casing
# -----------------------------------------------------------------------------

_WORDPIECE_TEXTS = [
  "Zorblaxes quickly disappeared, because the owners weren't watching.",
  "The café stayed open although nobody came; therefore it closed.",
  "If Kalo doesn't swim, the river is cold.",
] * 5


@pytest.fixture(scope="module")
def wordpiece():
  # A small vocabulary: most words become several "##" pieces.
  return helpers.train_small_wordpiece(_WORDPIECE_TEXTS, vocab_size=80)


def test_wordpiece_pieces_of_a_word_map_to_one_tagged_word(wordpiece):
  text = "Zorblaxes quickly DISAPPEARED, because the Café owners weren't watching: Kalo doesn't."
  words = tagging.word_tokenize(text)
  encoding = wordpiece.encode(text, add_special_tokens=False)
  token_words = masking.tokens_to_words(encoding.offsets, words, encoding.word_ids)
  assert any(t.startswith("##") for t in encoding.tokens)
  by_piece_word = {}
  for t, word_id in enumerate(encoding.word_ids):
    by_piece_word.setdefault(word_id, set()).add(int(token_words[t]))
  assert all(len(tagged) == 1 for tagged in by_piece_word.values())  # Never split.
  # The lower-cased, accent-stripped pieces spell each tagged word (offsets, not strings;
  # "were" and "does" keep the "n" of "n't", below).
  for w, word in enumerate(words):
    pieces = [encoding.tokens[t].removeprefix("##") for t in np.flatnonzero(token_words == w)]
    if word.text.isalpha() and word.text not in ("were", "does"):
      folded = unicodedata.normalize("NFD", word.text.lower())
      assert "".join(pieces) == "".join(c for c in folded if not unicodedata.combining(c))
  # "doesn't": WordPiece's word "doesn" (do ##es ##n) goes whole to "does", "'" and
  # "t" to "n't"; piece by piece, "##n" would have gone to "n't".
  does = [w.text for w in words].index("does")
  assert [encoding.tokens[t] for t in np.flatnonzero(token_words == does)] == ["do", "##es", "##n"]
  assert [encoding.tokens[t] for t in np.flatnonzero(token_words == does + 1)] == ["'", "t"]
  piecewise = masking.tokens_to_words(encoding.offsets, words)
  assert [encoding.tokens[t] for t in np.flatnonzero(piecewise == does + 1)] == ["##n", "'", "t"]


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(wordpiece):
  text = "Zorblaxes quickly DISAPPEARED, because the owners weren't watching."
  words = tagging.word_tokenize(text)
  encoding = wordpiece.encode(text, add_special_tokens=False)
  token_words = masking.tokens_to_words(encoding.offsets, words, encoding.word_ids)
  chosen = [w.text for w in words].index("DISAPPEARED")
  pieces = np.flatnonzero(token_words == chosen)
  assert len(pieces) > 1 and encoding.tokens[pieces[1]].startswith("##")
  ids = np.asarray(encoding.ids)
  outcomes = set()
  for seed in range(30):
    result = _mask(ids, token_words, [chosen], seed)
    targets = np.flatnonzero(result.labels != masking.IGNORE_LABEL)
    np.testing.assert_array_equal(targets, pieces)  # All pieces, nothing else.
    replaced = result.input_ids[pieces]
    if (replaced == MASK_ID).all():
      outcomes.add("mask")
    elif (replaced == ids[pieces]).all():
      outcomes.add("keep")
    else:
      assert not (replaced == MASK_ID).any()  # One draw per word: never half-masked.
      outcomes.add("random")
  assert "mask" in outcomes and len(outcomes) >= 2
