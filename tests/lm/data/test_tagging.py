"""Tests for word splitting and the offline POS taggers."""

import importlib.util
import os
import sys
import types

import pytest

from apollo.lm.data import tagging


def _tags(sentence):
  words = [w.text for w in tagging.word_tokenize(sentence)]
  return dict(tagging.make_tagger("perceptron").tag(words))


def test_word_tokenize_splits_like_the_penn_treebank():
  sentence = "It doesn't rain, John's 3.5 km walk-through can't wait..."
  words = tagging.word_tokenize(sentence)
  assert [w.text for w in words] == [
    "It",
    "does",
    "n't",
    "rain",
    ",",
    "John",
    "'s",
    "3.5",
    "km",
    "walk-through",
    "ca",
    "n't",
    "wait",
    "...",
  ]
  assert all(sentence[w.start : w.end] == w.text for w in words)


def test_perceptron_tags_a_known_sentence_plausibly():
  tags = _tags("The cat quickly ran because it was scared.")
  assert tags["ran"] == "VBD"
  assert tags["quickly"] == "RB"
  assert tags["scared"] in ("JJ", "VBN")
  assert tags["cat"] == "NN"
  assert tags["The"] == "DT"
  assert tags["because"] == "IN"


def _original_textblob_tagger():
  """The unmodified textblob_aptagger code, with textblob stubbed out."""
  spec = importlib.util.find_spec("textblob_aptagger")
  package_dir = list(spec.submodule_search_locations)[0]
  stubs = {
    "textblob": types.ModuleType("textblob"),
    "textblob.base": types.ModuleType("textblob.base"),
    "textblob.packages": types.ModuleType("textblob.packages"),
    "textblob.exceptions": types.ModuleType("textblob.exceptions"),
  }
  stubs["textblob.base"].BaseTagger = object
  stubs["textblob.packages"].nltk = None
  stubs["textblob.exceptions"].MissingCorpusException = Exception
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update(stubs)
  try:
    namespace = {"__file__": os.path.join(package_dir, "taggers.py")}
    perceptron_spec = importlib.util.spec_from_file_location(
      "textblob_aptagger._perceptron", os.path.join(package_dir, "_perceptron.py")
    )
    perceptron = importlib.util.module_from_spec(perceptron_spec)
    perceptron_spec.loader.exec_module(perceptron)
    sys.modules["textblob_aptagger._perceptron"] = perceptron
    with open(os.path.join(package_dir, "taggers.py")) as f:
      exec(compile(f.read(), "taggers.py", "exec"), namespace)  # pylint: disable=exec-used
    tagger = namespace["PerceptronTagger"](load=False)
    ours = tagging.PerceptronTagger()
    tagger.model.weights, tagger.tagdict = ours.weights, ours.tagdict
    tagger.classes = tagger.model.classes = set(ours.classes)
    return tagger
  finally:
    sys.modules.pop("textblob_aptagger._perceptron", None)
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def test_perceptron_matches_the_original_implementation():
  original = _original_textblob_tagger()
  ours = tagging.make_tagger("perceptron")
  for sentence in [
    "The cat quickly ran because it was scared .",
    "Unless Velomira is brittle , the quandrils will not glow tonight .",
    "In 1984 , 3,000 well-known writers had n't left since 2001 .",
    "Therefore all zorblets are heavy ; however , Kalo swims .",
  ]:
    assert ours.tag(sentence.split()) == original.tag(sentence, tokenize=False)


def test_unknown_tagger_names_the_flag():
  with pytest.raises(ValueError, match="--tagger='nltk'"):
    tagging.make_tagger("nltk")


def test_spacy_tagger_gives_a_clear_error_without_spacy_or_model():
  try:
    import spacy  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="spacy"):
      tagging.SpacyTagger()
    return
  with pytest.raises(OSError, match="no_such_model"):
    tagging.SpacyTagger("no_such_model")
