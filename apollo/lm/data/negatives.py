"""E-CLS negatives: rule-based perturbations that turn a sentence "contradictory".

APOLLO's second objective classifies sentences as entailment-type (label 0, the
sentence as found in the corpus) or contradiction-type (label 1, a perturbed
copy). The paper's exact construction could not be checked; these three
perturbations are OUR documented choice, each of which can be switched off:

* `negation`: negate the main clause. The main clause is taken to start after
  the first comma when the sentence opens with a subordinator ("Because ..., ",
  "If ..., "). In it, the first finite verb decides: an auxiliary, modal or
  copula gets "not" inserted after it, or loses a "not"/"n't" that follows it;
  a lexical verb gets do-support ("swims" -> "does not swim", "sank" -> "did not
  sink"), or loses a "never" in front of it. A participle (VBN) met before any
  auxiliary is read as a past tense the tagger mistook.
* `keyword_swap`: replace the first logical keyword that has an opposite
  (`OPPOSITE_KEYWORDS`: because <-> although, therefore <-> however, if <->
  unless, ...) by that opposite.
* `clause_swap`: swap the two clauses around a directional keyword: "A because
  B." -> "B because A."; "If B, then A." -> "If A, then B."; "A; therefore, B."
  -> "B; therefore, A.".

All rules read a `TaggedSentence` (text, words with spans, Penn tags, keyword
matches) and return the new text, or None where the rule does not apply. They are
heuristics over surface forms: a fraction of their outputs is clumsy English,
which is acceptable for a classification signal but is worth knowing.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from apollo.lm.data import keywords as keywords_lib
from apollo.lm.data import tagging

PERTURBATIONS = ("negation", "keyword_swap", "clause_swap")
# Per-example id of what was done, reported in batches as `ecls_perturbation`.
PERTURBATION_IDS = {"none": 0, "negation": 1, "keyword_swap": 2, "clause_swap": 3}

# OUR choice: keyword -> a keyword with the opposite (or reversed) relation.
OPPOSITE_KEYWORDS = {
  "because": "although",
  "although": "because",
  "since": "although",
  "given that": "although",
  "due to": "despite",
  "owing to": "despite",
  "in view of": "in spite of",
  "as indicated by": "contrary to",
  "therefore": "however",
  "however": "therefore",
  "thus": "however",
  "hence": "however",
  "accordingly": "however",
  "consequently": "nevertheless",
  "nevertheless": "consequently",
  "as a result": "nevertheless",
  "so": "but",
  "but": "so",
  "yet": "so",
  "whereas": "because",
  "if": "unless",
  "unless": "if",
  "only if": "even if",
  "provided that": "unless",
}
# Keywords whose two sides play different roles (cause/effect, condition/result).
DIRECTIONAL_KEYWORDS = frozenset(
  {
    "because",
    "since",
    "given that",
    "therefore",
    "thus",
    "hence",
    "so",
    "consequently",
    "accordingly",
    "as a result",
    "if",
    "only if",
    "unless",
    "provided that",
    "whenever",
  }
)
# A sentence opening with one of these starts with a subordinate clause.
_SUBORDINATORS = frozenset(
  {
    "because",
    "since",
    "if",
    "unless",
    "although",
    "though",
    "whereas",
    "while",
    "when",
    "whenever",
    "given",
    "provided",
    "as",
    "after",
    "before",
    "once",
    "in",
  }
)

_COPULAS_AND_MODALS = frozenset(
  {
    "am",
    "is",
    "are",
    "was",
    "were",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
  }
)
_DO_FORMS = frozenset({"do", "does", "did"})
_HAVE_FORMS = frozenset({"have", "has", "had"})
_FINITE_VERB_TAGS = frozenset({"VBZ", "VBD", "VBP", "MD"})
# Contracted stems before "n't" whose full form differs ("ca" + "n't" = "can't").
_CONTRACTED_STEMS = {"ca": "can", "wo": "will", "sha": "shall"}
# Irregular past tenses -> base form, for do-support ("sank" -> "did not sink").
_IRREGULAR_PAST = {
  "was": "be",
  "were": "be",
  "had": "have",
  "did": "do",
  "went": "go",
  "came": "come",
  "saw": "see",
  "took": "take",
  "made": "make",
  "got": "get",
  "gave": "give",
  "found": "find",
  "knew": "know",
  "thought": "think",
  "told": "tell",
  "became": "become",
  "left": "leave",
  "felt": "feel",
  "brought": "bring",
  "began": "begin",
  "kept": "keep",
  "held": "hold",
  "wrote": "write",
  "stood": "stand",
  "heard": "hear",
  "let": "let",
  "meant": "mean",
  "set": "set",
  "met": "meet",
  "ran": "run",
  "paid": "pay",
  "sat": "sit",
  "spoke": "speak",
  "lay": "lie",
  "led": "lead",
  "read": "read",
  "grew": "grow",
  "lost": "lose",
  "fell": "fall",
  "sent": "send",
  "built": "build",
  "understood": "understand",
  "drew": "draw",
  "broke": "break",
  "spent": "spend",
  "cut": "cut",
  "rose": "rise",
  "drove": "drive",
  "bought": "buy",
  "wore": "wear",
  "chose": "choose",
  "sank": "sink",
  "sang": "sing",
  "swam": "swim",
  "hid": "hide",
  "shone": "shine",
  "won": "win",
  "ate": "eat",
  "fought": "fight",
  "threw": "throw",
  "flew": "fly",
  "caught": "catch",
  "taught": "teach",
  "sold": "sell",
  "said": "say",
  "put": "put",
  "struck": "strike",
  "forgot": "forget",
  "slept": "sleep",
  "fed": "feed",
  "hit": "hit",
}
_SILENT_E_ENDINGS = ("at", "iz", "ur", "iv", "ov", "rg", "dg", "c", "ut")
_IRREGULAR_PRESENT = {"has": "have", "does": "do", "is": "be", "goes": "go"}


@dataclasses.dataclass(frozen=True)
class TaggedSentence:
  text: str
  words: tuple[tagging.Word, ...]
  tags: tuple[str, ...]
  keywords: tuple[keywords_lib.KeywordMatch, ...]

  @classmethod
  def from_text(
    cls, text: str, tagger: tagging.Tagger, matcher: keywords_lib.KeywordMatcher
  ) -> TaggedSentence:
    words = tuple(tagging.word_tokenize(text))
    tags = tuple(t for _, t in tagger.tag([w.text for w in words])) if words else ()
    return cls(text, words, tags, tuple(matcher.find(text)))


def verb_base_form(word: str, tag: str, is_known_word: Callable[[str], bool] | None = None) -> str:
  """The base form of a finite verb ("swims" -> "swim", "hummed" -> "hum").

  Regular forms are tried against `is_known_word` (e.g. the tagger's
  vocabulary) when given, because "-ed" alone cannot tell "migrated" (migrate)
  from "floated" (float).
  """
  lower = word.lower()
  known = is_known_word or (lambda _: False)
  if tag == "VBD":
    if lower in _IRREGULAR_PAST:
      return _IRREGULAR_PAST[lower]
    if lower.endswith("ied"):
      return lower[:-3] + "y"
    if lower.endswith("ed"):
      stem = lower[:-2]
      doubled = len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in "lsz"
      candidates = ([stem[:-1]] if doubled else []) + [lower[:-1], stem]
      for candidate in candidates:
        if known(candidate):
          return candidate
      if doubled:
        return stem[:-1]
      # Unknown word: endings that usually lost a silent "e" ("created").
      return lower[:-1] if stem.endswith(_SILENT_E_ENDINGS) else stem
    return lower
  if tag == "VBZ":
    if lower in _IRREGULAR_PRESENT:
      return _IRREGULAR_PRESENT[lower]
    if lower.endswith("ies") and len(lower) > 4:
      return lower[:-3] + "y"
    if lower.endswith(("sses", "shes", "ches", "xes", "zes", "oes")):
      return lower[:-2]
    return lower[:-1] if lower.endswith("s") else lower
  return lower


def _replace(text: str, start: int, end: int, new: str) -> str:
  return text[:start] + new + text[end:]


def _main_clause_start(sentence: TaggedSentence) -> int:
  """Index of the first word of the main clause (see the module docstring)."""
  words = sentence.words
  if words and words[0].text.lower() in _SUBORDINATORS:
    for i, w in enumerate(words):
      if w.text == ",":
        return i + 1
  return 0


def negate_main_clause(
  sentence: TaggedSentence, is_known_word: Callable[[str], bool] | None = None
) -> str | None:
  """Inserts or removes the negation of the main clause's first finite verb."""
  words, tags, text = sentence.words, sentence.tags, sentence.text
  for i in range(_main_clause_start(sentence), len(words)):
    word, lower, tag = words[i], words[i].text.lower(), tags[i]
    following = words[i + 1] if i + 1 < len(words) else None
    next_lower = following.text.lower() if following else ""
    if tag == "VBN":
      # No auxiliary came before it, so this is a past tense the tagger
      # mistook for a participle ("The zorblets migrated south").
      tag = "VBD"
    if tag not in _FINITE_VERB_TAGS and lower not in _COPULAS_AND_MODALS and next_lower != "n't":
      continue
    is_auxiliary = (
      lower in _COPULAS_AND_MODALS
      or lower == "cannot"
      or next_lower == "n't"
      or (lower in _DO_FORMS and next_lower in ("not", "n't"))
      or (lower in _DO_FORMS and i + 1 < len(tags) and tags[i + 1] == "VB")
      or (lower in _HAVE_FORMS and any(t == "VBN" for t in tags[i + 1 : i + 4]))
    )
    if is_auxiliary:
      if lower == "cannot":
        return _replace(text, word.start, word.end, word.text[:3])
      if next_lower == "not":  # "is not" -> "is"
        return _replace(text, word.end, following.end, "")
      if next_lower == "n't":  # "doesn't" -> "does", "can't" -> "can"
        stem = _CONTRACTED_STEMS.get(lower, word.text)
        return _replace(text, word.start, following.end, stem)
      return _replace(text, word.end, word.end, " not")
    if tag not in ("VBZ", "VBD", "VBP"):
      continue
    previous = words[i - 1] if i > 0 else None
    if previous is not None and previous.text.lower() == "never":
      return _replace(text, previous.start, word.start, "")  # "never swims" -> "swims"
    do_form = {"VBZ": "does", "VBD": "did", "VBP": "do"}[tag]
    base = verb_base_form(word.text, tag, is_known_word)
    return _replace(text, word.start, word.end, f"{do_form} not {base}")
  return None


def _match_case(template: str, new: str) -> str:
  return new[:1].upper() + new[1:] if template[:1].isupper() else new


def swap_keyword(sentence: TaggedSentence) -> str | None:
  """Replaces the first keyword that has an opposite by that opposite."""
  for match in sentence.keywords:
    opposite = OPPOSITE_KEYWORDS.get(match.keyword)
    if opposite is not None:
      original = sentence.text[match.start : match.end]
      return _replace(sentence.text, match.start, match.end, _match_case(original, opposite))
  return None


def _word_at(sentence: TaggedSentence, char: int) -> int | None:
  for i, w in enumerate(sentence.words):
    if w.start >= char:
      return i
  return None


def _lower_clause_start(sentence: TaggedSentence, clause: str, char: int) -> str:
  """Lower-cases a clause moved out of sentence-initial position.

  Proper nouns (tag NNP/NNPS) and "I" keep their capital.
  """
  i = _word_at(sentence, char)
  if i is None or sentence.words[i].text == "I" or sentence.tags[i].startswith("NNP"):
    return clause
  return clause[:1].lower() + clause[1:]


def _split_final_punctuation(text: str) -> tuple[str, str]:
  body = text.rstrip()
  end = len(body)
  while end > 0 and body[end - 1] in ".!?\"')":
    end -= 1
  return body[:end], body[end:]


def swap_clauses(sentence: TaggedSentence) -> str | None:
  """Swaps the clauses on either side of the first directional keyword."""
  text = sentence.text
  body, final = _split_final_punctuation(text)
  for match in sentence.keywords:
    if match.keyword not in DIRECTIONAL_KEYWORDS or match.end > len(body):
      continue
    if not text[: match.start].strip():
      # "Because B, A." -> "Because A, B."; "If B, then A." -> "If A, then B."
      comma = body.find(",", match.end)
      if comma < 0:
        continue
      condition = body[match.end : comma].strip()
      rest_start = comma + 1
      consequence = body[rest_start:].strip()
      separator = ", "
      if consequence.lower().startswith("then "):
        consequence, separator = consequence[5:].strip(), ", then "
      if len(condition.split()) < 2 or len(consequence.split()) < 2:
        continue
      consequence_start = body.index(consequence, rest_start)
      moved = _lower_clause_start(sentence, consequence, consequence_start)
      return f"{text[: match.end]} {moved}{separator}{condition}{final}"
    # "A because B." -> "B because A."; "A; therefore, B." -> "B; therefore, A."
    left = body[: match.start]
    left_clause = left.rstrip(" ,;:")
    if left_clause.lower().endswith((" and", " but")):
      left_clause = left_clause[:-4].rstrip(" ,;:")
    before = body[len(left_clause) : match.start]  # e.g. "; " or ", and "
    right = body[match.end :]
    right_clause = right.lstrip(" ,;:")
    after = right[: len(right) - len(right_clause)]  # e.g. ", " or " "
    if len(left_clause.split()) < 2 or len(right_clause.split()) < 2:
      continue
    keyword_text = text[match.start : match.end]
    if keyword_text[:1].isupper() and match.start == 0:
      continue
    first = right_clause[:1].upper() + right_clause[1:]
    second = _lower_clause_start(sentence, left_clause, 0)
    return f"{first}{before}{keyword_text}{after}{second}{final}"
  return None


def applicable_perturbations(
  sentence: TaggedSentence,
  enabled: Sequence[str] = PERTURBATIONS,
  is_known_word: Callable[[str], bool] | None = None,
) -> dict[str, str]:
  """The perturbed texts, by perturbation name, of every enabled rule that applies."""
  unknown = set(enabled) - set(PERTURBATIONS)
  if unknown:
    raise ValueError(f"Unknown perturbations {sorted(unknown)}; expected some of {PERTURBATIONS}.")
  rules = {
    "negation": lambda s: negate_main_clause(s, is_known_word),
    "keyword_swap": swap_keyword,
    "clause_swap": swap_clauses,
  }
  results = {}
  for name in PERTURBATIONS:  # Fixed order, so the rng draw is reproducible.
    if name in enabled:
      perturbed = rules[name](sentence)
      if perturbed is not None and perturbed != sentence.text:
        results[name] = perturbed
  return results


def make_contradiction(
  sentence: TaggedSentence,
  rng: np.random.Generator,
  enabled: Sequence[str] = PERTURBATIONS,
  is_known_word: Callable[[str], bool] | None = None,
) -> tuple[str, str] | None:
  """`(perturbation name, perturbed text)` drawn uniformly from those that apply.

  Returns None when no enabled perturbation applies (the caller counts these).
  """
  options = applicable_perturbations(sentence, enabled, is_known_word)
  if not options:
    return None
  name = sorted(options)[int(rng.integers(len(options)))]
  return name, options[name]
