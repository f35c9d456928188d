"""Part-of-speech tagging behind a small interface, with an offline default.

S-MLM masks words by part of speech and the contradiction perturbations need to
find verbs, so the pipeline tags every sentence. A `Tagger` maps a list of words
to `(word, Penn Treebank tag)` pairs. Two implementations:

* `PerceptronTagger` (the default, OUR choice): the pretrained greedy averaged-
  perceptron Penn Treebank tagger by Matthew Honnibal that ships as a pickle
  (weights, tag dictionary, classes) inside the PyPI wheel `textblob-aptagger`.
  textblob itself wants NLTK data downloads, so we do not import it: we read the
  pickle (a Python 2 pickle, hence `encoding="latin1"`) and re-implement the
  prediction and feature extraction of `textblob_aptagger/taggers.py` line for
  line. The only difference: the previous-tag context restarts at every call
  (one call = one sentence), where textblob carried it across sentences.
* `SpacyTagger`: spaCy's `tag_` attribute, for users who have spaCy and an
  English model installed (spaCy models cannot be downloaded here). Imported
  lazily; a missing package or model is a clear error.

`word_tokenize` splits a sentence into Penn-Treebank-like words with their
character spans, so masking can map words onto subword tokens by offsets.

References: the tagger of github.com/sloria/textblob-aptagger (M. Honnibal, "A Good
Part-of-Speech Tagger in about 200 Lines of Python", 2013).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import os
import pickle
import re
from collections.abc import Sequence
from typing import Protocol

TaggedWord = tuple[str, str]


class Tagger(Protocol):
  """Assigns a Penn Treebank tag to every word of one sentence."""

  def tag(self, words: Sequence[str]) -> list[TaggedWord]: ...


@dataclasses.dataclass(frozen=True)
class Word:
  text: str
  start: int  # sentence[start:end] == text
  end: int


# Penn-Treebank-like: "doesn't" -> "does" "n't", "John's" -> "John" "'s",
# punctuation split off, numbers and hyphenated words kept whole.
_WORD_PATTERN = re.compile(
  r"""
    \w+(?=n't\b)                # "does" of "doesn't", "ca" of "can't"
  | n't\b
  | '(?:s|re|ve|ll|d|m)\b       # clitics
  | \d+(?:[.,]\d+)+             # 3.5, 1,000
  | \w+(?:-\w+)*                # words, hyphenated words
  | \.\.\.
  | [^\w\s]                     # any other symbol, one at a time
""",
  re.VERBOSE | re.IGNORECASE,
)


def word_tokenize(sentence: str) -> list[Word]:
  """Splits a sentence into words with character spans."""
  return [Word(m.group(0), m.start(), m.end()) for m in _WORD_PATTERN.finditer(sentence)]


def _default_perceptron_path() -> str:
  # Located without importing the package: its __init__ imports textblob,
  # which does not import cleanly without NLTK data.
  spec = importlib.util.find_spec("textblob_aptagger")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "The perceptron tagger model ships in the textblob-aptagger wheel; "
      "pip install textblob-aptagger, or pass the pickle's path."
    )
  return os.path.join(list(spec.submodule_search_locations)[0], "trontagger-0.1.0.pickle")


class PerceptronTagger:
  """Greedy averaged-perceptron Penn Treebank tagger (textblob-aptagger model)."""

  START = ("-START-", "-START2-")
  END = ("-END-", "-END2-")

  def __init__(self, path: str | None = None):
    path = path or _default_perceptron_path()
    if not os.path.exists(path):
      raise FileNotFoundError(f"Perceptron tagger model not found at {path}.")
    with open(path, "rb") as f:
      # A Python 2 pickle of (weights, tagdict, classes); latin1 maps its byte
      # strings one-to-one onto str.
      self.weights, self.tagdict, classes = pickle.load(f, encoding="latin1")
    self.classes = frozenset(classes)

  @functools.cached_property
  def vocabulary(self) -> frozenset[str]:
    """Lower-cased words the model has a feature for (used by lemmatisation)."""
    prefix = "i word "
    return frozenset(f[len(prefix) :] for f in self.weights if f.startswith(prefix))

  def tag(self, words: Sequence[str]) -> list[TaggedWord]:
    prev, prev2 = self.START
    context = list(self.START) + [self._normalize(w) for w in words] + list(self.END)
    tagged = []
    for i, word in enumerate(words):
      tag = self.tagdict.get(word)
      if not tag:
        tag = self._predict(self._features(i, word, context, prev, prev2))
      tagged.append((word, tag))
      prev2, prev = prev, tag
    return tagged

  def _predict(self, features: dict[str, int]) -> str:
    scores = collections.defaultdict(float)
    for feature, value in features.items():
      weights = self.weights.get(feature)
      if weights is None or value == 0:
        continue
      for label, weight in weights.items():
        scores[label] += value * weight
    # Secondary alphabetic sort, for stability (as in the original).
    return max(self.classes, key=lambda label: (scores[label], label))

  @staticmethod
  def _normalize(word: str) -> str:
    if "-" in word and word[0] != "-":
      return "!HYPHEN"
    if word.isdigit() and len(word) == 4:
      return "!YEAR"
    if word[0].isdigit():
      return "!DIGITS"
    return word.lower()

  def _features(
    self, i: int, word: str, context: Sequence[str], prev: str, prev2: str
  ) -> dict[str, int]:
    features = collections.defaultdict(int)

    def add(name, *args):
      features[" ".join((name,) + tuple(args))] += 1

    i += len(self.START)
    add("bias")
    add("i suffix", word[-3:])
    add("i pref1", word[0])
    add("i-1 tag", prev)
    add("i-2 tag", prev2)
    add("i tag+i-2 tag", prev, prev2)
    add("i word", context[i])
    add("i-1 tag+i word", prev, context[i])
    add("i-1 word", context[i - 1])
    add("i-1 suffix", context[i - 1][-3:])
    add("i-2 word", context[i - 2])
    add("i+1 word", context[i + 1])
    add("i+1 suffix", context[i + 1][-3:])
    add("i+2 word", context[i + 2])
    return features


class SpacyTagger:
  """spaCy's fine-grained (Penn) tags; needs spaCy and a local English model."""

  def __init__(self, model: str = "en_core_web_sm"):
    try:
      import spacy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        "--tagger=spacy needs the spacy package (pip install spacy) and a local model."
      ) from e
    try:
      self._nlp = spacy.load(model, exclude=["parser", "ner", "lemmatizer"])
    except OSError as e:
      raise OSError(
        f"spaCy model {model!r} is not installed; install it locally or use --tagger=perceptron."
      ) from e

  def tag(self, words: Sequence[str]) -> list[TaggedWord]:
    from spacy.tokens import Doc  # pylint: disable=g-import-not-at-top

    doc = Doc(self._nlp.vocab, words=list(words))  # Keep our word split.
    for _, component in self._nlp.pipeline:
      doc = component(doc)
    return [(token.text, token.tag_) for token in doc]


TAGGERS = ("perceptron", "spacy")


@functools.lru_cache(maxsize=4)
def make_tagger(name: str = "perceptron", spacy_model: str = "en_core_web_sm") -> Tagger:
  """The tagger called `name` (cached: loading the model takes ~0.1 s)."""
  if name == "perceptron":
    return PerceptronTagger()
  if name == "spacy":
    return SpacyTagger(spacy_model)
  raise ValueError(f"Unknown --tagger={name!r}; expected one of {TAGGERS}.")
