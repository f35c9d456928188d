"""A seeded procedural generator of logical passages: the project's own corpus.

Wikipedia cannot be downloaded here and no third-party text is shipped, so the
default corpus for the selection job, the tests and the CPU-sized demos is
generated: short documents about invented entities (names such as "Velomira",
kinds such as "quandrils", properties such as "luminous") whose sentences are
premises, conditionals, conclusions, contrasts and negations, mixed with plain
descriptive filler sentences that contain no logical keyword (so the selection
step has something to reject).

Every document is a pure function of `(seed, document index)`, so the corpus has
random access: document 1,000,000 costs the same as document 0, and a resumed
selection job re-creates exactly the documents it skipped. The templates and
vocabularies below are OUR choice; they are meant to exercise the pipeline
(keyword groups, POS-selective masking, every contradiction perturbation), not to
be a realistic language sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

_SYLLABLES = (
  "ka",
  "lo",
  "mi",
  "ra",
  "zen",
  "tu",
  "vo",
  "bel",
  "dar",
  "fen",
  "gor",
  "hal",
  "isk",
  "jor",
  "lym",
  "mar",
  "nev",
  "pel",
  "quin",
  "sar",
  "tev",
  "ul",
  "wyn",
  "xan",
  "zim",
  "dro",
  "cal",
  "bri",
)
# (singular, plural) invented kinds of thing.
_KINDS = (
  ("quandril", "quandrils"),
  ("zorblet", "zorblets"),
  ("fennock", "fennocks"),
  ("skarrow", "skarrows"),
  ("mubbin", "mubbins"),
  ("trellisaur", "trellisaurs"),
  ("glimmet", "glimmets"),
  ("vostrel", "vostrels"),
  ("pelliwick", "pelliwicks"),
  ("draskin", "draskins"),
)
_PROPERTIES = (
  "brittle",
  "luminous",
  "heavy",
  "restless",
  "transparent",
  "fragrant",
  "nocturnal",
  "venomous",
  "hollow",
  "magnetic",
  "silent",
  "ancient",
  "fragile",
  "striped",
  "poisonous",
  "warm",
)
# (base, third person singular, past) verbs, regular and irregular.
_VERBS = (
  ("glow", "glows", "glowed"),
  ("float", "floats", "floated"),
  ("migrate", "migrates", "migrated"),
  ("hum", "hums", "hummed"),
  ("sink", "sinks", "sank"),
  ("sing", "sings", "sang"),
  ("dissolve", "dissolves", "dissolved"),
  ("swim", "swims", "swam"),
  ("hibernate", "hibernates", "hibernated"),
  ("grow", "grows", "grew"),
  ("hide", "hides", "hid"),
  ("shine", "shines", "shone"),
)
_PLACES = (
  "Harrowmere",
  "the Velk Valley",
  "the eastern marsh",
  "Ostrellin",
  "the Copper Hills",
  "Lake Ambrin",
  "the northern forest",
  "Quillport",
)
_OBJECTS = ("baskets", "lanterns", "maps", "bridges", "wells", "towers")

# Each template is filled from a dict of slots; "{N}" a name, "{kind}"/"{kinds}"
# a kind, "{p}"/"{p2}" properties, "{v}"/"{vs}"/"{vd}" a verb's three forms.
LOGICAL_TEMPLATES: dict[str, tuple[str, ...]] = {
  "conclusion": (
    "All {kinds} are {p}, and {N} is a {kind}; therefore, {N} is {p}.",
    "{N} is a {kind}, so {N} is {p}.",
    "Every {kind} {vs} at night; thus {N} {vs} at night.",
    "The {kinds} multiplied quickly, and as a result {place} became {p}.",
    "{N} {vd} yesterday; consequently, the {kinds} are {p}.",
    "Each {kind} in {place} is {p}, hence {N} is {p}.",
  ),
  "premise": (
    "{N} is {p} because every {kind} is {p}.",
    "Since {N} {vs} often, {N} must be a {kind}.",
    "Given that the {kinds} are {p}, {N} can {v}.",
    "The {kinds} {vd} due to the {p} weather.",
    "{N} is {p} owing to its {p2} shell.",
    "In view of the evidence, {N} is a {kind}.",
  ),
  "conditional": (
    "If a {kind} is {p}, then it {vs}.",
    "Unless {N} is {p}, {N} will {v} tonight.",
    "{N} {vs} only if {place} is {p}.",
    "Provided that the {kinds} are {p}, {N} can {v}.",
    "Whenever {N} is {p}, the {kinds} {v}.",
  ),
  "contrast": (
    "{N} is {p}, but {N2} is {p2}.",
    "Although {N} is a {kind}, {N} is {p}.",
    "The {kinds} are {p}, whereas the {kinds2} are {p2}.",
    "{N} is {p}; however, {N2} {vs} every day.",
    "{N} is {p}; nevertheless, {N} {vs}.",
    "{N} is small, yet {N} is {p}.",
  ),
  "negation": (
    "{N} is not {p}.",
    "No {kind} can {v}.",
    "{N} never {vs} in {place}.",
    "Neither {N} nor {N2} is a {kind}.",
    "The {kinds} did not {v} last winter.",
  ),
}
# Filler sentences contain no keyword of the default list (tests check this).
FILLER_TEMPLATES: tuple[str, ...] = (
  "{N} lives near {place}.",
  "The village of {place} has {num} old {objects}.",
  "{N} visited {place} in {year}.",
  "{N} and {N2} are good friends.",
  "Many {kinds} live in {place}.",
  "The weather in {place} was mild last spring.",
  "{N} wrote a long letter to {N2}.",
  "{N} sells {objects} at the market.",
)


@dataclasses.dataclass(frozen=True)
class GeneratedCorpusConfig:
  num_documents: int = 2000  # How many documents the corpus has.
  seed: int = 0  # Documents are a pure function of (seed, index).
  min_sentences: int = 3  # Sentences per document, inclusive range.
  max_sentences: int = 8
  logical_fraction: float = 0.6  # Chance that a sentence is a logical one.


def _name(rng: np.random.Generator) -> str:
  syllables = rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))
  return "".join(syllables).capitalize()


def _capitalize_first(sentence: str) -> str:
  return sentence[:1].upper() + sentence[1:]


def _fill(template: str, rng: np.random.Generator) -> str:
  first, second = rng.choice(len(_KINDS), size=2, replace=False)
  p1, p2 = rng.choice(_PROPERTIES, size=2, replace=False)
  verb = _VERBS[int(rng.integers(len(_VERBS)))]
  name1 = _name(rng)
  name2 = _name(rng)
  while name2 == name1:
    name2 = _name(rng)
  slots = dict(
    N=name1,
    N2=name2,
    kind=_KINDS[first][0],
    kinds=_KINDS[first][1],
    kinds2=_KINDS[second][1],
    p=p1,
    p2=p2,
    v=verb[0],
    vs=verb[1],
    vd=verb[2],
    place=str(rng.choice(_PLACES)),
    objects=str(rng.choice(_OBJECTS)),
    num=int(rng.integers(3, 40)),
    year=int(rng.integers(1820, 2020)),
  )
  return _capitalize_first(template.format(**slots))


def generate_document(index: int, config: GeneratedCorpusConfig) -> tuple[str, str]:
  """Returns `(title, text)` of document `index`; a pure function of its args."""
  rng = np.random.default_rng([config.seed, index])
  groups = sorted(LOGICAL_TEMPLATES)
  sentences = []
  for _ in range(int(rng.integers(config.min_sentences, config.max_sentences + 1))):
    if rng.random() < config.logical_fraction:
      templates = LOGICAL_TEMPLATES[groups[int(rng.integers(len(groups)))]]
    else:
      templates = FILLER_TEMPLATES
    sentences.append(_fill(templates[int(rng.integers(len(templates)))], rng))
  title = f"{_name(rng)} of {rng.choice(_PLACES)}"
  return title, " ".join(sentences)


def iter_generated_documents(
  config: GeneratedCorpusConfig, start: int = 0
) -> Iterator[tuple[int, str, str]]:
  """Yields `(index, title, text)` for documents `start, start+1, ...`."""
  for index in range(start, config.num_documents):
    title, text = generate_document(index, config)
    yield index, title, text
