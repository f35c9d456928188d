"""An embedded, procedurally generated multiple-choice logic benchmark.

The project cannot ship ReClor or LogiQA, so this module generates a small
stand-in in the same shape: a context of premises over invented entities and
properties, a question, four options and exactly one correct answer. Nothing
comes from third-party text; every example is a function of `(seed, split,
position)`.

Premises are conditionals ("If a brelon is vorpish, then it is talmic."),
universals ("All zellant brelons are skoolic."), negations ("No ..."; "Tovin is
not ..."), disjunctions and "unless", "only if", contrasts ("Although Tovin is
..., it is not ...") and causal chains ("Being ... makes a brelon ..., which in
turn makes it ..."). Four question types, each with a provably determined
answer:

  must_be_true           exactly one option follows from the premises.
  cannot_be_true         exactly one option contradicts them ("... EXCEPT").
  sufficient_assumption  the context argues for a conclusion with a link
                         missing; exactly one option, added to the premises,
                         makes the conclusion follow.
  refutes_conclusion     the context draws a fallacious conclusion (affirming
                         the consequent, denying the antecedent); exactly one
                         option, with the premises, shows it false ("weakens").

Correctness does not rest on the templates: every statement is compiled to a
truth table over the example's properties and checked by model enumeration.
Sentences only relate properties of one individual, so each named individual
(and a fresh, unnamed one for universal claims) is checked separately: at most
2**7 assignments, a few integer operations per check.

Distractors are the classic fallacies (converse, inverse, affirming the
consequent, denying the antecedent, the negated conclusion, the right property
on the wrong individual, irrelevant statements), also verified. Surface cues
are damped on purpose: no option restates or is settled by a single premise;
options use only words the context uses and never repeat a meaning;
distractors share the answer's form (about an individual, or general);
complementary pairs appear among distractors as often as around the answer; a
light adversarial filter redraws option sets whose answer is the one sharing
most words with the others; the answer position is balanced exactly. The tests
check that picking the longest / shortest option, the one with most word overlap
with the context or with the other options scores under 40% (chance is 25%; the
README gives the measured rates).

Usage:

    splits = generate_splits({"train": 2000, "validation": 500, "test": 500})
    write_reclor_format("/tmp/logic_mc", {"train": 2000, ...})
    apollo.lm.datasets.multiple_choice.read_reclor("/tmp/logic_mc/val.json")

References: the format and question types follow ReClor (W. Yu et al., "ReClor: A
Reading Comprehension Dataset Requiring Logical Reasoning", ICLR 2020).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Mapping
from typing import Any

QUESTION_TYPES = ("must_be_true", "cannot_be_true", "sufficient_assumption", "refutes_conclusion")
SPLITS = ("train", "validation", "test")
# ReClor's file names, so that `multiple_choice.read_reclor` reads our files too.
RECLOR_FILE_NAMES = {"train": "train.json", "validation": "val.json", "test": "test.json"}
DEFAULT_SIZES = {"train": 4000, "validation": 500, "test": 500}
_ID_PREFIX = {"train": "train", "validation": "val", "test": "test"}  # ReClor's

_QUESTIONS = {
  "must_be_true": (
    "Which of the following must be true?",
    "Which one of the following can be properly inferred from the statements above?",
    "If the statements above are true, which of the following must also be true?",
    "Which of the following follows logically from the statements above?",
  ),
  "cannot_be_true": (
    "Which of the following cannot be true?",
    "If the statements above are true, each of the following could be true EXCEPT:",
    "If the statements above are true, which one of the following must be false?",
  ),
  "sufficient_assumption": (
    "The conclusion follows logically if which one of the following is assumed?",
    "Which one of the following, if assumed, allows the conclusion above to be properly drawn?",
  ),
  "refutes_conclusion": (
    "Which of the following, if true, most seriously weakens the argument?",
    "Which of the following, if true, shows that the conclusion above is false?",
  ),
}
_CONCLUSION_MARKERS = ("Therefore,", "Hence,", "So", "Thus,", "It follows that")

# ---------------------------------------------------------------------------
# Invented words. Onsets are consonants, so "a <kind>" is always right.

_ONSETS = (
  "b",
  "br",
  "d",
  "dr",
  "f",
  "fl",
  "g",
  "gl",
  "gr",
  "k",
  "kl",
  "l",
  "m",
  "n",
  "p",
  "pl",
  "pr",
  "r",
  "s",
  "sk",
  "sl",
  "sn",
  "st",
  "t",
  "tr",
  "v",
  "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ee", "oo")
_CODAS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "nd", "rk", "lt", "sk")
_ADJECTIVE_SUFFIXES = ("ish", "ic", "ous", "y", "al", "ive", "ant", "ed")
_NOUN_SUFFIXES = ("", "et", "on", "ar", "ix")


def _syllable(rng: random.Random) -> str:
  return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


@dataclasses.dataclass(frozen=True)
class _World:
  """The invented vocabulary of one example."""

  kind: str  # singular noun, e.g. "brelon"
  kinds: str  # its plural
  names: tuple[str, ...]  # individuals; names[0] is the one reasoned about
  props: tuple[str, ...]  # adjectives; index = truth-table variable


def _sample_world(rng: random.Random, num_names=3, num_props=7) -> _World:
  def distinct(make, count):
    words = []
    while len(words) < count:
      word = make()
      if word not in words:
        words.append(word)
    return tuple(words)

  kind = _syllable(rng) + rng.choice(_NOUN_SUFFIXES)
  plural = kind + ("es" if kind.endswith(("s", "x", "sk")) else "s")
  names = distinct(
    lambda: (rng.choice(_ONSETS) + rng.choice(_VOWELS)).capitalize() + _syllable(rng), num_names
  )
  props = distinct(lambda: _syllable(rng) + rng.choice(_ADJECTIVE_SUFFIXES), num_props)
  return _World(kind, plural, names, props)


# ---------------------------------------------------------------------------
# Logic: statements as truth tables over the world's properties.

Literal = tuple[int, bool]  # (property index, holds)


class _TruthTables:
  """Truth tables over n boolean properties, each a 2**n-bit integer."""

  def __init__(self, num_props: int):
    assignments = range(1 << num_props)
    self.full = (1 << (1 << num_props)) - 1
    self.atoms = [sum(1 << a for a in assignments if a >> p & 1) for p in range(num_props)]

  def literal(self, lit: Literal) -> int:
    prop, holds = lit
    return self.atoms[prop] if holds else self.full ^ self.atoms[prop]

  def implies(self, a: Literal, b: Literal) -> int:
    return (self.full ^ self.literal(a)) | self.literal(b)

  def negate(self, table: int) -> int:
    return self.full ^ table


@dataclasses.dataclass(frozen=True)
class _Statement:
  """A sentence and its meaning.

  `subject` is an individual's name, or None for a statement about every member
  of the kind; `table` is the truth table (over one individual's properties) of
  what the sentence says about its subject.
  """

  subject: str | None
  table: int
  text: str


class _Theory:
  """A set of premises; entailment and consistency by model enumeration."""

  def __init__(self, tables: _TruthTables, names, statements=()):
    self.tables = tables
    self.rules = tables.full  # what holds of every member
    self.facts = {name: tables.full for name in names}
    for statement in statements:
      self._add(statement)

  def _add(self, statement: _Statement):
    if statement.subject is None:
      self.rules &= statement.table
    else:
      self.facts[statement.subject] &= statement.table

  def plus(self, statement: _Statement) -> _Theory:
    theory = _Theory(self.tables, ())
    theory.rules, theory.facts = self.rules, dict(self.facts)
    theory._add(statement)
    return theory

  def _models(self, subject: str | None) -> int:
    # A universal claim is checked on a fresh individual: one the premises
    # say nothing particular about, so only the universal premises bind it.
    return self.rules & (self.facts[subject] if subject else self.tables.full)

  def consistent(self) -> bool:
    return bool(self.rules) and all(self.rules & f for f in self.facts.values())

  def entails(self, statement: _Statement) -> bool:
    return not self._models(statement.subject) & ~statement.table

  def contradicts(self, statement: _Statement) -> bool:
    return not self.plus(statement).consistent()


# ---------------------------------------------------------------------------
# Sentences. Templates are keyed by the polarities of the two literals.

_RULE_TEMPLATES = {
  (True, True): (
    "Every {a} {k} is {b}.",
    "All {a} {ks} are {b}.",
    "If a {k} is {a}, then it is {b}.",
    "A {k} is {a} only if it is {b}.",
    "Being {a} makes a {k} {b}.",
    "Any {k} that is {a} is also {b}.",
  ),
  (True, False): (
    "No {a} {k} is {b}.",
    "If a {k} is {a}, then it is not {b}.",
    "Any {k} that is {a} is not {b}.",
    "A {k} is {b} only if it is not {a}.",
  ),
  (False, True): (
    "Every {k} is {a} or {b}.",
    "A {k} is {b} unless it is {a}.",
    "If a {k} is not {a}, then it is {b}.",
    "Any {k} that is not {a} is {b}.",
  ),
  (False, False): (
    "If a {k} is not {a}, then it is not {b}.",
    "Only {a} {ks} are {b}.",
    "A {k} is {b} only if it is {a}.",
  ),
}
_CAUSAL_CHAIN = "Being {a} makes a {k} {b}, which in turn makes it {c}."
_PAIR_FACT_TEMPLATES = {
  (True, True): ("{n} is both {a} and {b}.",),
  (True, False): ("{n} is {a}, but it is not {b}.", "Although {n} is {a}, it is not {b}."),
  (False, True): ("{n} is not {a}, yet it is {b}.", "Although {n} is not {a}, it is {b}."),
  (False, False): ("{n} is neither {a} nor {b}.",),
}


class _Sentences:
  """Makes `_Statement`s with varied wording for one world."""

  def __init__(self, world: _World, rng: random.Random):
    self.world, self.rng = world, rng
    self.tables = _TruthTables(len(world.props))

  def fact(self, name: str, lit: Literal) -> _Statement:
    prop, holds = lit
    text = f"{name} is {'' if holds else 'not '}{self.world.props[prop]}."
    return _Statement(name, self.tables.literal(lit), text)

  def pair_fact(self, name: str, a: Literal, b: Literal) -> _Statement:
    template = self.rng.choice(_PAIR_FACT_TEMPLATES[a[1], b[1]])
    text = template.format(n=name, a=self.world.props[a[0]], b=self.world.props[b[0]])
    return _Statement(name, self.tables.literal(a) & self.tables.literal(b), text)

  def rule(self, a: Literal, b: Literal) -> _Statement:
    """ "a -> b" for every member of the kind."""
    template = self.rng.choice(_RULE_TEMPLATES[a[1], b[1]])
    text = template.format(
      a=self.world.props[a[0]], b=self.world.props[b[0]], k=self.world.kind, ks=self.world.kinds
    )
    return _Statement(None, self.tables.implies(a, b), text)

  def causal_chain(self, a: Literal, b: Literal, c: Literal) -> _Statement:
    """ "a -> b -> c" in one sentence (all three literals positive)."""
    text = _CAUSAL_CHAIN.format(
      a=self.world.props[a[0]],
      b=self.world.props[b[0]],
      c=self.world.props[c[0]],
      k=self.world.kind,
    )
    return _Statement(None, self.tables.implies(a, b) & self.tables.implies(b, c), text)

  def conclusion(self, statement: _Statement) -> str:
    marker = self.rng.choice(_CONCLUSION_MARKERS)
    return f"{marker} {statement.text}"


def _negated(lit: Literal) -> Literal:
  return lit[0], not lit[1]


# ---------------------------------------------------------------------------
# One problem.


class _Rejected(Exception):
  """The sampled premises do not give a clean problem; sample again."""


@dataclasses.dataclass
class _Problem:
  context: str
  question: str
  answer: str
  distractors: list[str]


def _sample_premises(rng, say: _Sentences, chain, gap: int | None):
  """Rules along `chain` (a list of literals), the link `gap` left out."""
  premises, i = [], 0
  while i < len(chain) - 1:
    if i == gap:
      i += 1
      continue
    # Two positive links may be told as one causal chain.
    if (
      i + 1 != gap
      and i + 2 < len(chain)
      and rng.random() < 0.25
      and all(holds for _, holds in chain[i : i + 3])
    ):
      premises.append(say.causal_chain(*chain[i : i + 3]))
      i += 2
    else:
      premises.append(say.rule(chain[i], chain[i + 1]))
      i += 1
  return premises


def _sample_problem(rng: random.Random, question_type: str) -> _Problem:
  world = _sample_world(rng)
  say = _Sentences(world, rng)
  main, other, third = world.names
  k = rng.choice((2, 3))  # links in the reasoning chain
  chain = [(p, rng.random() < 0.7) for p in range(k + 1)]
  side = [(p, rng.random() < 0.5) for p in range(k + 1, len(world.props))]
  first, last = chain[0], chain[-1]

  gap = rng.randrange(k) if question_type == "sufficient_assumption" else None
  premises = _sample_premises(rng, say, chain, gap)
  conclusion = None

  # Baits for the fallacies, as side facts about the other individuals:
  # `other` has the chain's consequent (affirming the consequent tempts one to
  # give it the antecedent), `third` lacks the antecedent (denying the
  # antecedent tempts one to deny it the consequent).
  if rng.random() < 0.7:
    premises.append(
      say.pair_fact(other, last, side[2]) if rng.random() < 0.4 else say.fact(other, last)
    )
  if rng.random() < 0.6:
    premises.append(say.fact(third, _negated(first)))
  if rng.random() < 0.6:
    premises.append(say.rule(side[0], side[1]))  # an irrelevant rule

  candidates: list[_Statement] = []  # tempting distractors, in no order
  if question_type in ("must_be_true", "cannot_be_true"):
    modes = ("forward", "backward", "universal")
    if question_type == "cannot_be_true":
      modes = modes[:2]  # a universal's contrary is existential: not expressed
    mode = rng.choice(modes)
    if mode == "forward":  # modus ponens along the chain
      premises.append(say.fact(main, first))
      j = rng.randint(2, k)
      follows = chain[j]
      candidates += [
        say.fact(other, first),
        say.fact(third, _negated(follows)),
        say.fact(other, follows),
        say.fact(main, chain[1]),
      ]
    elif mode == "backward":  # modus tollens along the chain
      premises.append(say.fact(main, _negated(last)))
      j = rng.randint(0, k - 2)
      follows = _negated(chain[j])
      candidates += [
        say.fact(main, first),
        say.fact(third, _negated(last)),
        say.fact(other, chain[j]),
        say.fact(main, last),
      ]
    else:  # hypothetical syllogism
      follows = None
      i = rng.randint(0, k - 2)
      j = rng.randint(i + 2, k)
      target = (
        say.rule(chain[i], chain[j])
        if rng.random() < 0.5
        else say.rule(_negated(chain[j]), _negated(chain[i]))
      )
      candidates += [
        say.rule(chain[j], chain[i]),
        say.rule(_negated(chain[i]), _negated(chain[j])),
        say.rule(chain[i], _negated(chain[j])),
        say.rule(side[0], chain[j]),
        say.rule(chain[i], side[1]),
      ]
    if follows is not None:
      # must_be_true: what follows, its negation a distractor; cannot_be_true:
      # the other way round.
      if question_type == "cannot_be_true":
        follows = _negated(follows)
      target = say.fact(main, follows)
      candidates.append(say.fact(main, _negated(follows)))
  elif question_type == "sufficient_assumption":
    premises.append(say.fact(main, first))
    conclusion = say.fact(main, last)
    a, b = chain[gap], chain[gap + 1]
    # Assuming the conclusion itself (b == last) would be no answer at all.
    target = say.fact(main, b) if b != last and rng.random() < 0.3 else say.rule(a, b)
    candidates += [
      say.rule(b, a),
      say.rule(_negated(a), _negated(b)),
      say.rule(a, _negated(b)),
      say.rule(side[0], b),
      say.fact(other, b),
      say.fact(main, _negated(b)),
      say.fact(main, side[0]),
    ]
  else:  # refutes_conclusion
    lure = side[-1]
    if rng.random() < 0.5:  # affirming the consequent
      premises.append(say.fact(main, last))
      conclusion = say.fact(main, first)
      premises.append(say.rule(lure, _negated(first)))
    else:  # denying the antecedent
      premises.append(say.fact(main, _negated(first)))
      conclusion = say.fact(main, _negated(last))
      premises.append(say.rule(lure, last))
    target = say.fact(main, lure)
    candidates += [
      say.fact(main, _negated(lure)),
      say.fact(other, lure),
      say.fact(main, chain[1]),
      say.fact(main, side[0]),
      say.fact(third, lure),
    ]

  # Generic fill: every fact about every individual, so that enough verified
  # distractors exist and the tempting ones do not stand out.
  generic = [
    say.fact(name, (p, holds))
    for name in world.names
    for p in range(len(world.props))
    for holds in (True, False)
  ]
  return _assemble(rng, say, question_type, premises, conclusion, target, candidates, generic)


def _decided_by_one_premise(statement: _Statement, premises, tables: _TruthTables) -> bool:
  """Whether a single premise already settles `statement` (a give-away)."""
  for premise in premises:
    if premise.subject is None or premise.subject == statement.subject:
      if not premise.table & ~statement.table:
        return True  # the premise alone entails it
      if statement.subject is not None and not premise.table & statement.table:
        return True  # the premise alone contradicts it
  return False


def _assemble(
  rng, say, question_type, premises, conclusion, target, candidates, generic
) -> _Problem:
  names = say.world.names
  theory = _Theory(say.tables, names, premises)
  if not theory.consistent():
    raise _Rejected()
  if conclusion is not None and theory.entails(conclusion):
    raise _Rejected()  # the argument must need the missing link

  def is_answer(s: _Statement) -> bool:
    if question_type == "must_be_true":
      return theory.entails(s)
    if question_type == "cannot_be_true":
      return theory.contradicts(s)
    extended = theory.plus(s)
    if not extended.consistent():
      return False  # an inconsistent assumption proves anything: never valid
    if question_type == "sufficient_assumption":
      return extended.entails(conclusion)
    return extended.contradicts(conclusion)  # refutes_conclusion

  def is_fair(s: _Statement) -> bool:
    return not _decided_by_one_premise(s, premises, say.tables)

  if not (is_answer(target) and is_fair(target)):
    raise _Rejected()
  premise_texts = {p.text for p in premises}
  # Two options that say the same thing in other words could both be ruled
  # out at once, so no meaning is offered twice.
  seen = {(target.subject, target.table)}
  # An option naming an individual or property the context never mentions
  # would be an easy reject: offer only words the context uses.
  invented = set(say.world.names) | set(say.world.props)
  mentioned = {w.strip(".,") for p in premises for w in p.text.split()}
  unmentioned = invented - mentioned

  def usable(pool):
    kept = []
    for s in pool:
      words = {w.strip(".,") for w in s.text.split()}
      if (
        (s.subject, s.table) not in seen
        and s.text not in premise_texts
        and not words & unmentioned
        and not is_answer(s)
        and is_fair(s)
      ):
        seen.add((s.subject, s.table))
        kept.append(s)
    return kept

  # Distractors of the answer's own form (about an individual, or general),
  # so that the form does not give the answer away.
  same_form = lambda s: (s.subject is None) == (target.subject is None)
  tempting = usable([s for s in candidates if same_form(s)])
  rng.shuffle(tempting)
  rng.shuffle(generic)
  filler = usable([s for s in generic if same_form(s) or rng.random() < 0.1])
  # Distractors are perturbations of the answer, which makes the answer the
  # option sharing most words with the others. A light adversarial filter
  # redraws (a few times) the triples where it is that option.
  for _ in range(4):
    distractors = _pick_distractors(rng, say, target, tempting, filler)
    if distractors is None:
      raise _Rejected()
    if not _is_central([target.text] + [d.text for d in distractors]):
      break
    rng.shuffle(tempting)

  context = [p.text for p in premises]
  rng.shuffle(context)
  if conclusion is not None:
    context.append(say.conclusion(conclusion))
  question = rng.choice(_QUESTIONS[question_type])
  return _Problem(" ".join(context), question, target.text, [d.text for d in distractors])


def _is_central(options: list[str]) -> bool:
  """Whether options[0] alone shares the most words with the other options."""
  words = [set(o.rstrip(".").split()) for o in options]
  shared = [sum(len(w & v) for v in words if v is not w) for w in words]
  return all(shared[0] > s for s in shared[1:])


def _pick_distractors(rng, say, target, tempting, filler):
  """Three distractors, with complementary pairs as likely away from the answer.

  A reader who learns "the answer is one of two contradictory options" must not
  be rewarded, so the answer's own negation is offered only as often as some
  pair of mutually contradictory distractors is.
  """

  def complement(a, b):
    return a.subject == b.subject and a.table == say.tables.negate(b.table)

  pool = tempting + filler
  target_pair = [s for s in pool if complement(s, target)]
  others = [s for s in pool if not complement(s, target)]
  structure = rng.choice(("answer_pair", "distractor_pair", "no_pair"))
  chosen = []
  if structure == "answer_pair" and target_pair:
    chosen.append(target_pair[0])
  elif structure == "distractor_pair":
    for s in others:
      partner = next((t for t in others if complement(s, t)), None)
      if partner is not None:
        chosen += [s, partner]
        break
  for s in others:
    if len(chosen) == 3:
      break
    if s not in chosen and not any(complement(s, c) for c in chosen):
      chosen.append(s)
  return chosen if len(chosen) == 3 else None


# ---------------------------------------------------------------------------
# Splits.


def _split_of(context: str) -> str:
  """The one split a context may appear in: disjoint splits by construction."""
  digest = hashlib.sha256(context.encode("utf-8")).digest()
  return SPLITS[digest[0] % len(SPLITS)]


def generate_split(
  split: str, num_examples: int, *, seed: int = 0, question_types=QUESTION_TYPES
) -> list[dict[str, Any]]:
  """Generates one split of the benchmark.

  Examples are reader-shaped dicts (`id`, `context`, `question`, `options`,
  `label`) plus `question_type`. A context belongs to exactly one split (a hash
  of its text decides), so splits never share a context whatever their sizes,
  and a split does not change when another split's size does.

  Args:
    split: "train", "validation" or "test".
    num_examples: how many examples.
    seed: the benchmark's seed; the same (seed, split, num_examples) always
      gives the same examples, and a longer split extends a shorter one.
    question_types: the question types to draw from, uniformly.

  Returns:
    The examples; answer positions are balanced exactly (counts differ by at
    most one).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  unknown = set(question_types) - set(QUESTION_TYPES)
  if unknown:
    raise ValueError(f"unknown question types {sorted(unknown)}")
  rng = random.Random(f"apollo.logic_mc/{seed}/{split}")
  examples, contexts, labels = [], set(), []
  while len(examples) < num_examples:
    # The type is drawn first and kept until a problem of that type is
    # accepted: types reject at different rates, and the mix must stay uniform.
    question_type = rng.choice(question_types)
    while True:
      try:
        problem = _sample_problem(rng, question_type)
      except _Rejected:
        continue
      if _split_of(problem.context) == split and problem.context not in contexts:
        break
    contexts.add(problem.context)
    if not labels:  # a fresh permutation of the positions every 4 examples
      labels = rng.sample(range(4), 4)
    label = labels.pop()
    options = list(problem.distractors)
    rng.shuffle(options)
    options.insert(label, problem.answer)
    examples.append(
      {
        "id": f"{_ID_PREFIX[split]}_{len(examples)}",
        "context": problem.context,
        "question": problem.question,
        "options": options,
        "label": label,
        "question_type": question_type,
      }
    )
  return examples


def generate_splits(
  sizes: Mapping[str, int] | None = None, *, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
  """`generate_split` for each split in `sizes` (default `DEFAULT_SIZES`)."""
  sizes = DEFAULT_SIZES if sizes is None else sizes
  return {split: generate_split(split, n, seed=seed) for split, n in sizes.items()}


def write_reclor_format(
  directory: str | os.PathLike[str], sizes: Mapping[str, int] | None = None, *, seed: int = 0
) -> dict[str, str]:
  """Writes the splits as ReClor files (train.json, val.json, test.json).

  Records are `{context, question, answers, label, id_string, question_type}`;
  unlike ReClor's test split, ours keeps its labels. `read_reclor` reads the
  files (ignoring `question_type`).

  Args:
    directory: created if missing.
    sizes: examples per split (default `DEFAULT_SIZES`).
    seed: the benchmark's seed.

  Returns:
    The path written for each split.
  """
  os.makedirs(directory, exist_ok=True)
  paths = {}
  for split, examples in generate_splits(sizes, seed=seed).items():
    records = [
      {
        "context": e["context"],
        "question": e["question"],
        "answers": e["options"],
        "label": e["label"],
        "id_string": e["id"],
        "question_type": e["question_type"],
      }
      for e in examples
    ]
    paths[split] = os.path.join(directory, RECLOR_FILE_NAMES[split])
    with open(paths[split], "w", encoding="utf-8") as f:
      json.dump(records, f, indent=1, ensure_ascii=False)
  return paths
