"""Tokenizers: train a byte-level BPE offline, or load local files (BPE or WordPiece).

`train_byte_level_bpe` is the one BPE trainer of the project (GPT-2's byte-level
scheme, so no text is ever out of vocabulary); the chat template
(`apollo.models.chat_template`) trains its ChatML tokenizer with it.

APOLLO continues the pretraining of RoBERTa, whose tokenizer is a byte-level
BPE with special tokens `<s> <pad> </s> <unk> <mask>`. Without network access
there are two ways to get one:

* `train_bpe_tokenizer` trains a byte-level BPE with the `tokenizers` library on
  the selected sentences (offline; the special tokens get ids 0-4 in that
  order, as in RoBERTa), and saves `tokenizer.json` (plus `vocab.json` and
  `merges.txt`, the GPT-2/RoBERTa file pair).
* `load_tokenizer` reads a local `tokenizer.json`, or a `vocab.json` +
  `merges.txt` pair (e.g. the files of a RoBERTa checkpoint). A RoBERTa vocab
  puts `<mask>` at 50264, so ids are looked up, never assumed: `special_ids`.

BERT-family checkpoints (e.g. all-MiniLM-L6-v2) ship an uncased WordPiece
`tokenizer.json` whose special tokens are `[CLS] [PAD] [SEP] [UNK] [MASK]`;
`special_ids` recognises both families and says which it found, and
`SpecialIds.pair` formats a pair the family's way: `<s> a </s></s> b </s>` or
`[CLS] a [SEP] b [SEP]` (with BERT's segment ids 0 / 1).

The pipeline encodes with `add_special_tokens=False` and adds the special tokens
itself, so the same code serves trained and loaded tokenizers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # Ids 0-4 when trained.
# The same five roles (bos, pad, eos, unk, mask) in each family's vocabulary.
SPECIAL_TOKENS_BY_FAMILY: dict[str, tuple[str, ...]] = {
  "roberta": SPECIAL_TOKENS,
  "bert": ("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"),
}


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  bos: int  # <s> / [CLS]
  pad: int  # <pad> / [PAD]
  eos: int  # </s> / [SEP]
  unk: int  # <unk> / [UNK]
  mask: int  # <mask> / [MASK]
  family: str = "roberta"  # Whose conventions: 'roberta' or 'bert'.

  def as_tuple(self) -> tuple[int, ...]:
    return (self.bos, self.pad, self.eos, self.unk, self.mask)

  def single(self, ids: Sequence[int]) -> list[int]:
    """`<s> ids </s>` / `[CLS] ids [SEP]`."""
    return [self.bos, *ids, self.eos]

  def pair(self, first: Sequence[int], second: Sequence[int]) -> tuple[list[int], list[int]]:
    """A text pair the family's way, with its token-type (segment) ids.

    RoBERTa: `<s> first </s></s> second </s>`, all type 0 (it has one token type).
    BERT: `[CLS] first [SEP] second [SEP]`, type 0 up to the first `[SEP]`, then 1.

    Returns:
      (input ids, token type ids), of equal length.
    """
    if self.family == "bert":
      head = [self.bos, *first, self.eos]
      tail = [*second, self.eos]
      return head + tail, [0] * len(head) + [1] * len(tail)
    ids = [self.bos, *first, self.eos, self.eos, *second, self.eos]
    return ids, [0] * len(ids)

  @property
  def pair_overhead(self) -> int:
    """How many special tokens :meth:`pair` adds (4 for RoBERTa, 3 for BERT)."""
    return 3 if self.family == "bert" else 4


def special_ids(tokenizer: tokenizers.Tokenizer) -> SpecialIds:
  """Looks up the five special tokens of a RoBERTa or a BERT vocabulary.

  The family is the one with more of its special tokens in the vocabulary (RoBERTa
  on a tie); a token of it that is missing is an error naming it.
  """
  found = {
    family: [tokenizer.token_to_id(token) for token in tokens]
    for family, tokens in SPECIAL_TOKENS_BY_FAMILY.items()
  }
  family = max(found, key=lambda f: sum(i is not None for i in found[f]))
  tokens = SPECIAL_TOKENS_BY_FAMILY[family]
  for token, token_id in zip(tokens, found[family]):
    if token_id is None:
      raise ValueError(
        f"The tokenizer has no {token!r} token; APOLLO needs all of {tokens} "
        f"(or all of one of {list(SPECIAL_TOKENS_BY_FAMILY.values())})."
      )
  return SpecialIds(*found[family], family=family)


def _add_roberta_pieces(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.RobertaProcessing(
    ("</s>", tokenizer.token_to_id("</s>")),
    ("<s>", tokenizer.token_to_id("<s>")),
    trim_offsets=True,
    add_prefix_space=False,
  )
  return tokenizer


def train_byte_level_bpe(
  texts: Iterable[str], special_tokens: Sequence[str], vocab_size: int, min_frequency: int
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE (GPT-2's scheme) with ``special_tokens`` at ids 0, 1, ...

  Every byte is in the vocabulary, so no text is ever out of vocabulary.

  Args:
    texts: training text, streamed.
    special_tokens: added first, in this order.
    vocab_size: target size, special tokens and the 256 byte symbols included.
    min_frequency: a merge must occur this often.
  """
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=list(special_tokens),
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return tokenizer


def train_bpe_tokenizer(
  texts: Iterable[str], out_dir: str, vocab_size: int = 8192, min_frequency: int = 2
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE on `texts`; writes `out_dir/tokenizer.json`.

  Args:
    texts: training text, streamed (e.g. `selection.iter_records` texts).
    out_dir: where `tokenizer.json`, `vocab.json` and `merges.txt` go.
    vocab_size: target vocabulary size, special tokens and the 256 byte
      symbols included.
    min_frequency: a merge must occur this often.

  Returns:
    The trained tokenizer, special tokens at ids 0-4.
  """
  tokenizer = train_byte_level_bpe(texts, SPECIAL_TOKENS, vocab_size, min_frequency)
  _add_roberta_pieces(tokenizer)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  tokenizer.model.save(out_dir)  # vocab.json + merges.txt
  return tokenizer


def _from_json(path: str) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer.from_file(path)
  # Callers pad and truncate themselves; a file's settings (all-MiniLM-L6-v2 pads
  # every encoding to 128 tokens and cuts there) would do it behind their back.
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Loads `tokenizer.json`, or a directory holding it or vocab.json + merges.txt.

  Padding and truncation set in a `tokenizer.json` are switched off: encodings
  have the text's own length.

  Raises:
    FileNotFoundError: naming the path(s) that were looked for.
  """
  if os.path.isfile(path):
    return _from_json(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"No tokenizer at {path} (expected tokenizer.json "
      f"or a directory with vocab.json + merges.txt)."
    )
  tokenizer_json = os.path.join(path, "tokenizer.json")
  if os.path.isfile(tokenizer_json):
    return _from_json(tokenizer_json)
  vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  missing = [p for p in (vocab, merges) if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f"No tokenizer in {path}: neither {tokenizer_json} nor {' and '.join(missing)} exist."
    )
  tokenizer = tokenizers.Tokenizer(models.BPE.from_file(vocab, merges))
  special_ids(tokenizer)  # Fail early, naming the missing token.
  return _add_roberta_pieces(tokenizer)
