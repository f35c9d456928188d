"""S-MLM: selective masked language modelling over POS-chosen words.

APOLLO masks only words whose prediction needs reasoning. OUR documented
defaults (the paper's exact set could not be checked): the candidates are verbs
(Penn tags VB*), adjectives (JJ*), adverbs (RB*) and the logical keywords
themselves; the budget is 15% of the sequence's tokens, taken from candidates
only; a chosen word is replaced 80% of the time by `<mask>`, 10% by random
tokens and 10% left as is.

Masking works on subword tokens but chooses whole words: all subword tokens of
a chosen word are targets together and share one 80/10/10 draw (OUR choice:
per-word, so a half-masked word never leaks its other half). Tokens are mapped
onto the tagged words by the encoding's character offsets and word ids
(`tokens_to_words`), so this holds for WordPiece (BERT, MiniLM: "##" pieces,
a lower-casing normaliser) and byte-level BPE (RoBERTa) alike. Words are drawn in
a random order and taken while they fit in the remaining budget (as in BERT's
whole-word masking); if that leaves the budget short, the shortest word left is
added, so the targets exceed the budget by less than one word at most.

A sentence whose candidate tokens are fewer than the budget gets all of them
(possibly none) and is flagged `too_few_candidates`: there is no silent
fallback to random non-candidate tokens; the pipeline reports the flag per
example so the trainer can count it.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
  J. Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding", NAACL 2019 (the 80/10/10 rule; whole-word masking as in
  github.com/google-research/bert, create_pretraining_data.py).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from apollo.lm.data import keywords as keywords_lib
from apollo.lm.data import tagging

IGNORE_LABEL = -100  # Label of a position that is not a masked-LM target.


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  mask_ratio: float = 0.15  # Target tokens per (non-special) token.
  candidate_tag_prefixes: tuple[str, ...] = ("VB", "JJ", "RB")  # Penn tag prefixes.
  mask_keywords: bool = True  # Logical keywords are candidates too.
  mask_token_prob: float = 0.8  # Chosen word -> <mask> tokens.
  random_token_prob: float = 0.1  # Chosen word -> random tokens (rest: kept).

  def __post_init__(self):
    if not 0.0 < self.mask_ratio <= 1.0:
      raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}.")
    if self.mask_token_prob + self.random_token_prob > 1.0:
      raise ValueError("mask_token_prob + random_token_prob must be <= 1.")


@dataclasses.dataclass(frozen=True)
class MaskedTokens:
  input_ids: np.ndarray  # [T] int32, the corrupted tokens.
  labels: np.ndarray  # [T] int32, original id at targets, IGNORE_LABEL elsewhere.
  budget: int  # Target tokens wanted: round(mask_ratio * T), at least 1.
  too_few_candidates: bool  # The candidates hold fewer than `budget` tokens.


def candidate_words(
  words: Sequence[tagging.Word],
  tags: Sequence[str],
  keyword_matches: Sequence[keywords_lib.KeywordMatch],
  config: MaskingConfig,
) -> list[int]:
  """Indices of the words that may be masked: POS-selected or keyword words."""
  chosen = set()
  for i, tag in enumerate(tags):
    if tag.startswith(tuple(config.candidate_tag_prefixes)):
      chosen.add(i)
  if config.mask_keywords:
    for match in keyword_matches:
      for i, w in enumerate(words):
        if w.start < match.end and w.end > match.start:
          chosen.add(i)
  return sorted(chosen)


def tokens_to_words(
  token_offsets: Sequence[tuple[int, int]],
  words: Sequence[tagging.Word],
  token_word_ids: Sequence[int | None] | None = None,
) -> np.ndarray:
  """For each token, the index of the tagged word it belongs to (-1: none).

  The tokenizer and our word split disagree at the edges ("doesn" + "'t" vs
  "does" + "n't"); the largest character overlap decides. Offsets are the
  encoding's, into the original text (tokenizers keeps them aligned through a
  normaliser, e.g. BERT's lower-casing and accent stripping), never token strings.

  Args:
    token_offsets: `Encoding.offsets`, (start, end) characters of each token.
    words: the tagged words of the same text, sorted by position.
    token_word_ids: `Encoding.word_ids`, the tokenizer's own word of each token
      (None for a token outside any). Given, all pieces of one tokenizer word
      (WordPiece's "##" continuations, a byte-level BPE word's pieces) go to one
      tagged word, decided by the overlap of their joint span: a chosen word
      then never leaves a piece of itself visible.

  Returns:
    [T] int32 word indices.
  """
  spans = list(token_offsets)
  if token_word_ids is not None:
    # Runs of tokens with the same word id share the span of the whole run.
    t = 0
    while t < len(spans):
      end_run = t + 1
      if token_word_ids[t] is not None:
        while end_run < len(spans) and token_word_ids[end_run] == token_word_ids[t]:
          end_run += 1
      joint = (min(s for s, _ in spans[t:end_run]), max(e for _, e in spans[t:end_run]))
      spans[t:end_run] = [joint] * (end_run - t)
      t = end_run
  word_ends = [w.end for w in words]  # Sorted, as the words are.
  result = np.full(len(spans), -1, dtype=np.int32)
  for t, (start, end) in enumerate(spans):
    first = bisect.bisect_right(word_ends, start)  # The first word ending after `start`.
    best, best_overlap = -1, 0
    i = first
    while i < len(words) and words[i].start < end:
      overlap = min(end, words[i].end) - max(start, words[i].start)
      if overlap > best_overlap:
        best, best_overlap = i, overlap
      i += 1
    if best < 0 and first < len(words) and words[first].start == end:
      best = first  # An empty/space-only token ("Ġ" before "ran") joins the next word.
    result[t] = best
  return result


def mask_selected_words(
  token_ids: np.ndarray,
  token_words: np.ndarray,
  candidates: Sequence[int],
  rng: np.random.Generator,
  config: MaskingConfig,
  mask_id: int,
  vocab_size: int,
  special_ids: Sequence[int],
) -> MaskedTokens:
  """Applies S-MLM to one sentence's tokens (no special tokens in `token_ids`).

  Args:
    token_ids: [T] token ids of the sentence.
    token_words: [T] word index of each token (`tokens_to_words`), -1 for none.
    candidates: indices of the words that may be masked.
    rng: the only source of randomness (determinism per seed).
    config: ratio and 80/10/10 probabilities.
    mask_id: id of `<mask>`.
    vocab_size: random replacements are drawn from `[0, vocab_size)`...
    special_ids: ...minus these ids.

  Returns:
    The corrupted ids, the labels and the too-few-candidates flag.
  """
  token_ids = np.asarray(token_ids, dtype=np.int32)
  num_tokens = len(token_ids)
  budget = max(1, int(round(config.mask_ratio * num_tokens)))
  tokens_of_word: dict[int, list[int]] = {}
  for t, w in enumerate(token_words):
    if w >= 0:
      tokens_of_word.setdefault(int(w), []).append(t)
  words = [w for w in candidates if w in tokens_of_word]  # Drop truncated words.

  chosen_words, num_chosen = [], 0
  order = [words[k] for k in rng.permutation(len(words))]
  for w in order:
    size = len(tokens_of_word[w])
    if num_chosen + size <= budget:
      chosen_words.append(w)
      num_chosen += size
    if num_chosen == budget:
      break
  if num_chosen < budget:
    # Every word left is longer than the budget still open; take the shortest
    # (ties: the random order) so a sentence with enough candidate tokens always
    # reaches its budget, overshooting by less than one word.
    left = [w for w in order if w not in chosen_words]
    if left:
      shortest = min(left, key=lambda w: len(tokens_of_word[w]))
      chosen_words.append(shortest)
      num_chosen += len(tokens_of_word[shortest])

  input_ids = token_ids.copy()
  labels = np.full(num_tokens, IGNORE_LABEL, dtype=np.int32)
  for w in sorted(chosen_words):  # Sorted: the draws do not depend on set order.
    positions = tokens_of_word[w]
    labels[positions] = token_ids[positions]
    u = rng.random()
    if u < config.mask_token_prob:
      input_ids[positions] = mask_id
    elif u < config.mask_token_prob + config.random_token_prob:
      input_ids[positions] = _random_tokens(rng, len(positions), vocab_size, special_ids)
  too_few = sum(len(tokens_of_word[w]) for w in words) < budget
  return MaskedTokens(input_ids, labels, budget, too_few)


def _random_tokens(
  rng: np.random.Generator, n: int, vocab_size: int, special_ids: Sequence[int]
) -> np.ndarray:
  """`n` ids drawn uniformly from the vocabulary minus the special tokens."""
  special = np.asarray(special_ids)
  ids = rng.integers(0, vocab_size, size=n)
  while (bad := np.isin(ids, special)).any():  # Rejection: specials are few.
    ids[bad] = rng.integers(0, vocab_size, size=int(bad.sum()))
  return ids
