"""Logical-inference keywords and the matcher that finds them in sentences.

APOLLO keeps only the sentences of a corpus that contain a logical-inference
keyword (Sanyal et al., 2023, Sec. 3). The paper's exact list could not be
checked, so `DEFAULT_KEYWORD_GROUPS` below is OUR documented choice: five groups
(conclusion, premise, conditional, contrast, negation).
The group a keyword belongs to is kept as metadata with every selected sentence,
so the corpus can be analysed or re-balanced per group later.

Matching is whole-word and case-insensitive; multi-word keywords ("as a result",
"it follows that") match across any run of whitespace. When keywords overlap the
longest one wins ("only if" is reported once, as "only if", not also as "if").

Example::

  matcher = KeywordMatcher()
  [m.keyword for m in matcher.find("If it rains, the match is NOT played.")]
  # ['if', 'not']

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

# OUR choice (see the module docstring): group name -> keywords, lower case.
DEFAULT_KEYWORD_GROUPS: Mapping[str, tuple[str, ...]] = {
  "conclusion": (
    "therefore",
    "thus",
    "hence",
    "consequently",
    "accordingly",
    "as a result",
    "so",
    "it follows that",
  ),
  "premise": (
    "because",
    "since",
    "given that",
    "due to",
    "owing to",
    "as indicated by",
    "in view of",
  ),
  "conditional": ("if", "unless", "only if", "provided that", "whenever"),
  "contrast": ("but", "however", "although", "whereas", "nevertheless", "yet"),
  "negation": ("not", "no", "never", "neither", "nor"),
}


@dataclasses.dataclass(frozen=True)
class KeywordMatch:
  """One keyword occurrence: `sentence[start:end]` is the matched text."""

  keyword: str  # The canonical (lower-case, single-spaced) keyword.
  group: str
  start: int
  end: int


class KeywordMatcher:
  """Finds logical keywords (whole words, any case) in a piece of text.

  Attributes:
    groups: group name -> tuple of canonical keywords.
  """

  def __init__(self, groups: Mapping[str, Sequence[str]] | None = None):
    groups = DEFAULT_KEYWORD_GROUPS if groups is None else groups
    self.groups = {name: tuple(_canonical(k) for k in kws) for name, kws in groups.items()}
    self._group_of: dict[str, str] = {}
    for name, keywords in self.groups.items():
      for keyword in keywords:
        if not keyword:
          raise ValueError(f"Empty keyword in group {name!r}.")
        if keyword in self._group_of and self._group_of[keyword] != name:
          raise ValueError(
            f"Keyword {keyword!r} is in two groups: {self._group_of[keyword]!r} and {name!r}."
          )
        self._group_of[keyword] = name
    if not self._group_of:
      raise ValueError("The keyword list is empty.")
    # Longest first, so the regex alternation prefers "only if" over "if".
    ordered = sorted(self._group_of, key=lambda k: (-len(k), k))
    alternatives = "|".join(r"\s+".join(map(re.escape, k.split())) for k in ordered)
    # Lookarounds instead of \b: keywords are words, so a match must not touch
    # another word character on either side ("so" must not match "also").
    self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

  @property
  def keywords(self) -> tuple[str, ...]:
    return tuple(self._group_of)

  def group_of(self, keyword: str) -> str:
    return self._group_of[_canonical(keyword)]

  def find(self, text: str) -> list[KeywordMatch]:
    """Returns the non-overlapping keyword matches in `text`, left to right."""
    matches = []
    for m in self._pattern.finditer(text):
      keyword = _canonical(m.group(0))
      matches.append(KeywordMatch(keyword, self._group_of[keyword], m.start(), m.end()))
    return matches


def _canonical(keyword: str) -> str:
  return " ".join(keyword.lower().split())


def parse_keyword_groups(spec: str) -> dict[str, tuple[str, ...]]:
  """Parses `group=kw1,kw2;group2=kw3` (the command-line form) into groups.

  Example: `"conclusion=therefore,as a result;contrast=but"`.
  """
  groups: dict[str, tuple[str, ...]] = {}
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, sep, keywords = part.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"Bad keyword group {part!r}: expected 'group=kw1,kw2'.")
    groups[name.strip()] = tuple(k.strip() for k in keywords.split(",") if k.strip())
  if not groups:
    raise ValueError(f"No keyword groups in {spec!r}.")
  return groups
