"""The APOLLO pretraining input pipeline: shards -> fixed-shape numpy batches.

Reads the sentence shards of `selection.py` and yields batches that carry both
objectives' data, S-MLM (`masking.py`) and E-CLS (`negatives.py`):

  key                      shape   dtype    meaning
  input_ids                [B, L]  int32    <s> sentence </s> <pad>... (RoBERTa) or
                                            [CLS] sentence [SEP] [PAD]... (BERT);
                                            masked
  attention_mask           [B, L]  int32    1 on real tokens, 0 on padding
  mlm_labels               [B, L]  int32    original id at S-MLM targets, -100 elsewhere
  mlm_weights              [B, L]  float32  1.0 at S-MLM targets, 0.0 elsewhere
  ecls_label               [B]     int32    0 = entailment-type (original sentence),
                                            1 = contradiction-type (perturbed)
  ecls_perturbation        [B]     int32    0 none, 1 negation, 2 keyword_swap,
                                            3 clause_swap (`negatives.PERTURBATION_IDS`)
  mlm_too_few_candidates   [B]     int32    1 where the S-MLM candidates could not
                                            fill the mask budget (count and log it)
  example_mask             [B]     int32    1 on real rows, 0 on padding rows (only
                                            the last batch of a finite eval pass)

How examples are made (OUR choices, documented):
* E-CLS balance: every usable sentence appears twice per epoch, as itself
  (label 0) and as one perturbed copy (label 1), at independent shuffled
  positions, so labels are exactly 50/50 over an epoch and near it per batch.
  A sentence to which no enabled perturbation applies is dropped in both roles
  (so the balance holds); `measure_objective_coverage` counts such sentences.
* The perturbation of a label-1 copy is drawn among those that apply.
* S-MLM masks the (possibly perturbed) sentence the same way for both labels,
  so the presence of masks says nothing about the label. With
  `mlm_on_perturbed=False` the perturbed copies keep their masks but carry no
  MLM targets (the model is then never taught to reconstruct perturbed text).
* Held-out split: a sentence is in `eval` when a hash of its text falls below
  `eval_fraction` (deterministic, and duplicates of a sentence share a split).
* Sequences longer than `max_len` are truncated before `</s>`.
* The tokenizer decides the family (`tokenizer.special_ids`): a trained or
  RoBERTa byte-level BPE, or a checkpoint's own WordPiece (BERT, MiniLM). A
  single sentence is one segment, token type 0 everywhere, which is the
  encoder's default, so batches carry no token types. Whole-word masking maps
  pieces to words by the encoding's offsets and word ids (`masking.tokens_to_words`).

Determinism and resuming. The pipeline is a grain `MapDataset` over example
indices (`range(2 * num_sentences)`: sentence `i // 2`, label `i % 2`), shuffled
with `seed` (a new order each epoch), made into examples by a `random_map`
whose generator grain derives from `(seed, index)`, then converted to an
`IterDataset` and batched. Every example is therefore a pure function of its
index, and the iterator's `get_state()` (a small JSON-able dict) saved with a
checkpoint and given back to `set_state()` continues with exactly the batches
an uninterrupted run would have produced::

  it = iter(make_pretrain_dataset(shard_dir, tok, config))
  batch = next(it)
  state = it.get_state()        # save with the model checkpoint
  ...
  it = iter(make_pretrain_dataset(shard_dir, tok, config))
  it.set_state(state)           # continues the same data order

Multi-host: call with `shard_index=jax.process_index(),
shard_count=jax.process_count()`; each host reads a disjoint slice of the
shuffled example order (`MapDataset` slicing), so global batches are
`shard_count * batch_size` examples.

References:
  S. Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
  Models for Logical Reasoning", ACL 2023.
  grain's MapDataset guide (google-grain.readthedocs.io).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from apollo.lm.data import keywords as keywords_lib
from apollo.lm.data import masking, negatives, selection, tagging
from apollo.models import tokenizer as tokenizer_lib

SPLITS = ("train", "eval")
# "apollo": S-MLM + E-CLS (above). "mlm": the plain-MLM baseline on the same
# sentences: each sentence once (ecls_label 0, no perturbation, no tagging), and
# 15% of ALL its tokens masked at random (token level, 80/10/10); the trainer
# gives E-CLS weight 0.
OBJECTIVES = ("apollo", "mlm")


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
  max_len: int = 128  # L: tokens per sequence, <s> and </s> included.
  batch_size: int = 32  # B: examples per batch (per host).
  seed: int = 0  # Shuffle order, masking and perturbation draws.
  mask_ratio: float = 0.15  # S-MLM budget: target tokens per sentence token.
  mask_pos_prefixes: tuple[str, ...] = ("VB", "JJ", "RB")  # Candidate Penn tags.
  mask_keywords: bool = True  # Logical keywords are S-MLM candidates too.
  mask_token_prob: float = 0.8  # 80/10/10: chosen word -> <mask>...
  random_token_prob: float = 0.1  # ...-> random tokens; the rest is kept.
  perturbations: tuple[str, ...] = negatives.PERTURBATIONS  # E-CLS rules on.
  mlm_on_perturbed: bool = True  # Perturbed copies carry S-MLM targets too.
  tagger: str = "perceptron"  # POS tagger: "perceptron" or "spacy".
  spacy_model: str = "en_core_web_sm"  # Used only with tagger="spacy".
  eval_fraction: float = 0.02  # Share of sentences held out (hash of text).
  num_epochs: int | None = None  # Train passes; None: repeat forever.
  read_threads: int = 2  # Threads making examples in this process.
  # >0: grain worker processes (tagging is CPU-bound); grain then needs absl
  # flags parsed, i.e. a program started with absl.app.run.
  num_workers: int = 0
  objective: str = "apollo"  # "apollo" (S-MLM + E-CLS) or "mlm" (plain MLM baseline).

  @property
  def masking(self) -> masking.MaskingConfig:
    return masking.MaskingConfig(
      mask_ratio=self.mask_ratio,
      candidate_tag_prefixes=tuple(self.mask_pos_prefixes),
      mask_keywords=self.mask_keywords,
      mask_token_prob=self.mask_token_prob,
      random_token_prob=self.random_token_prob,
    )


def in_eval_split(text: str, eval_fraction: float) -> bool:
  """Whether a sentence is held out: a stable hash of its text, not its position."""
  digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def open_sentence_records(shard_dir: str) -> grain.sources.ArrayRecordDataSource:
  """Random access to the serialised sentence records of every shard."""
  paths = selection.list_shards(shard_dir)
  if not paths:
    raise FileNotFoundError(
      f"No sentences*.array_record shards in {shard_dir}; run "
      f"`python -m experiments.select_sentences --out_dir={shard_dir}` first."
    )
  return grain.sources.ArrayRecordDataSource(paths)


class SentenceAnalyzer:
  """Tags, matches keywords and perturbs sentences; loads the tagger lazily.

  Lazy so that the object pickles cheaply into grain worker processes.
  """

  def __init__(self, config: PretrainDataConfig):
    self.config = config
    self._tagger = None
    self._matcher = keywords_lib.KeywordMatcher()

  def __getstate__(self):
    return dict(self.__dict__, _tagger=None)

  @property
  def tagger(self) -> tagging.Tagger:
    if self._tagger is None:
      self._tagger = tagging.make_tagger(self.config.tagger, self.config.spacy_model)
    return self._tagger

  def analyze(self, text: str) -> negatives.TaggedSentence:
    return negatives.TaggedSentence.from_text(text, self.tagger, self._matcher)

  def perturbations(self, sentence: negatives.TaggedSentence) -> dict[str, str]:
    vocabulary = getattr(self.tagger, "vocabulary", None)
    return negatives.applicable_perturbations(
      sentence,
      self.config.perturbations,
      vocabulary.__contains__ if vocabulary is not None else None,
    )


class MakeExample(grain.transforms.RandomMap):
  """(sentence index, label) -> one example of both objectives, or None (dropped)."""

  def __init__(
    self, records, tokenizer: tokenizers.Tokenizer, config: PretrainDataConfig, split: str
  ):
    self._records = records
    self._tokenizer = tokenizer
    self._config = config
    self._want_eval = split == "eval"
    self._analyzer = SentenceAnalyzer(config)
    self._special = tokenizer_lib.special_ids(tokenizer)
    self._vocab_size = tokenizer.get_vocab_size()
    # Word ids come from the pre-tokenizer; without one a whole sentence is one "word",
    # and pieces are then matched to words one by one.
    self._use_word_ids = tokenizer.pre_tokenizer is not None

  def random_map(self, element, rng: np.random.Generator) -> dict[str, Any] | None:
    sentence_index, label = (int(x) for x in element)
    text = json.loads(self._records[sentence_index])["text"]
    if in_eval_split(text, self._config.eval_fraction) != self._want_eval:
      return None
    if self._config.objective == "mlm":
      return self._encode_plain_mlm(text, rng)
    sentence = self._analyzer.analyze(text)
    options = self._analyzer.perturbations(sentence)
    if not options:
      return None  # Dropped as both copies, which keeps E-CLS balanced.
    kind = "none"
    if label == 1:
      kind = sorted(options)[int(rng.integers(len(options)))]
      sentence = self._analyzer.analyze(options[kind])
    return self._encode(sentence, label, kind, rng)

  def _encode(
    self, sentence: negatives.TaggedSentence, label: int, kind: str, rng: np.random.Generator
  ) -> dict[str, Any]:
    config, special = self._config, self._special
    encoding = self._tokenizer.encode(sentence.text, add_special_tokens=False)
    content = config.max_len - 2
    token_ids = np.asarray(encoding.ids[:content], dtype=np.int32)
    word_ids = encoding.word_ids[:content] if self._use_word_ids else None
    token_words = masking.tokens_to_words(encoding.offsets[:content], sentence.words, word_ids)
    candidates = masking.candidate_words(
      sentence.words, sentence.tags, sentence.keywords, config.masking
    )
    masked = masking.mask_selected_words(
      token_ids,
      token_words,
      candidates,
      rng,
      config.masking,
      mask_id=special.mask,
      vocab_size=self._vocab_size,
      special_ids=special.as_tuple(),
    )
    labels = masked.labels
    if label == 1 and not config.mlm_on_perturbed:
      labels = np.full_like(labels, masking.IGNORE_LABEL)
    return self._pack(masked.input_ids, labels, label, kind, masked.too_few_candidates)

  def _pack(
    self,
    masked_ids: np.ndarray,
    labels: np.ndarray,
    label: int,
    kind: str,
    too_few_candidates: bool,
  ) -> dict[str, Any]:
    """<s> masked sentence </s> <pad>... and the arrays of the module docstring."""
    config, special = self._config, self._special
    sequence = special.single(masked_ids.tolist())
    length = len(sequence)
    input_ids = np.full(config.max_len, special.pad, dtype=np.int32)
    input_ids[:length] = sequence
    mlm_labels = np.full(config.max_len, masking.IGNORE_LABEL, dtype=np.int32)
    mlm_labels[1 : length - 1] = labels
    attention_mask = np.zeros(config.max_len, dtype=np.int32)
    attention_mask[:length] = 1
    return dict(
      input_ids=input_ids,
      attention_mask=attention_mask,
      mlm_labels=mlm_labels,
      mlm_weights=(mlm_labels != masking.IGNORE_LABEL).astype(np.float32),
      ecls_label=np.int32(label),
      ecls_perturbation=np.int32(negatives.PERTURBATION_IDS[kind]),
      mlm_too_few_candidates=np.int32(too_few_candidates),
      example_mask=np.int32(1),
    )

  def _encode_plain_mlm(self, text: str, rng: np.random.Generator) -> dict[str, Any]:
    """Plain MLM: every token is its own candidate "word", so any 15% may be masked."""
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    token_ids = np.asarray(encoding.ids[: self._config.max_len - 2], dtype=np.int32)
    positions = np.arange(len(token_ids))
    masked = masking.mask_selected_words(
      token_ids,
      positions,
      positions.tolist(),
      rng,
      self._config.masking,
      mask_id=self._special.mask,
      vocab_size=self._vocab_size,
      special_ids=self._special.as_tuple(),
    )
    return self._pack(masked.input_ids, masked.labels, 0, "none", False)


def _stack_and_pad(batch_size: int, pad_id: int):
  """A grain batch_fn: stacks examples and pads a short batch with empty rows."""

  def batch_fn(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    missing = batch_size - len(examples)
    if missing:
      for key, value in batch.items():
        filler = np.zeros((missing,) + value.shape[1:], value.dtype)
        if key == "input_ids":
          filler[:] = pad_id
        elif key == "mlm_labels":
          filler[:] = masking.IGNORE_LABEL
        batch[key] = np.concatenate([value, filler])
    return batch

  return batch_fn


def _sentence_and_label(example_index: int) -> tuple[int, int]:
  return example_index // 2, example_index % 2


def _sentence_only(example_index: int) -> tuple[int, int]:
  return example_index, 0


def make_pretrain_dataset(
  shard_dir: str,
  tokenizer: tokenizers.Tokenizer,
  config: PretrainDataConfig = PretrainDataConfig(),
  split: str = "train",
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """The batched APOLLO pretraining dataset (keys in the module docstring).

  Args:
    shard_dir: output directory of the selection job.
    tokenizer: from `tokenizer.train_bpe_tokenizer` or `tokenizer.load_tokenizer`.
    config: sequence length, batch size, masking and perturbation settings.
    split: "train" (shuffled, `config.num_epochs` passes, full batches only) or
      "eval" (shuffled once, one pass, last batch padded; see `example_mask`).
    shard_index: this host's index, for multi-host training.
    shard_count: number of hosts.

  Returns:
    A grain `IterDataset`; `iter()` of it has `get_state()` / `set_state()`.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  if config.objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {config.objective!r}.")
  records = open_sentence_records(shard_dir)
  is_train = split == "train"
  plain_mlm = config.objective == "mlm"
  examples = (
    grain.MapDataset.range((1 if plain_mlm else 2) * len(records))
    .map(_sentence_only if plain_mlm else _sentence_and_label)
    .shuffle(seed=config.seed)
    .repeat(config.num_epochs if is_train else 1)
  )
  if shard_count > 1:
    examples = examples[shard_index::shard_count]
  examples = examples.random_map(MakeExample(records, tokenizer, config, split), seed=config.seed)
  dataset = examples.to_iter_dataset(
    grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=64)
  )
  # Each split drops the other split's sentences by design (98% of records for
  # "eval"): grain's warning about heavy filtering would only be noise here.
  dataset = grain.experimental.WithOptionsIterDataset(
    dataset, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None)
  )
  if config.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return dataset.batch(
    config.batch_size,
    drop_remainder=is_train,
    batch_fn=_stack_and_pad(config.batch_size, tokenizer_lib.special_ids(tokenizer).pad),
  )


def measure_objective_coverage(
  shard_dir: str,
  tokenizer: tokenizers.Tokenizer,
  config: PretrainDataConfig = PretrainDataConfig(),
  split: str = "train",
  max_sentences: int | None = None,
) -> dict[str, Any]:
  """Counts, over a split, what the two objectives can use.

  Returns a dict with `sentences` (in the split), `no_perturbation` (dropped
  from training: no enabled rule applies), `too_few_mask_candidates` (of the
  original sentences), and `perturbation_applies` per rule.
  """
  records = open_sentence_records(shard_dir)
  maker = MakeExample(records, tokenizer, config, split)
  analyzer = SentenceAnalyzer(config)
  counts = dict(
    sentences=0,
    no_perturbation=0,
    too_few_mask_candidates=0,
    perturbation_applies={p: 0 for p in config.perturbations},
  )
  rng = np.random.default_rng(config.seed)
  for index in range(len(records)):
    if max_sentences is not None and counts["sentences"] >= max_sentences:
      break
    text = json.loads(records[index])["text"]
    if in_eval_split(text, config.eval_fraction) != (split == "eval"):
      continue
    counts["sentences"] += 1
    sentence = analyzer.analyze(text)
    options = analyzer.perturbations(sentence)
    counts["no_perturbation"] += not options
    for name in options:
      counts["perturbation_applies"][name] += 1
    example = maker._encode(sentence, 0, "none", rng)  # pylint: disable=protected-access
    counts["too_few_mask_candidates"] += int(example["mlm_too_few_candidates"])
  return counts
