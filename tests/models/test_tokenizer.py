"""Tests for training and loading the byte-level BPE tokenizer."""

import json
import os
import shutil

import pytest

from apollo.models import tokenizer as tokenizer_lib

_TEXTS = [
  "If it rains, the match is cancelled.",
  "Therefore the club lost money.",
  "Although tickets were cheap, the stands were not full.",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  return out, tokenizer_lib.train_bpe_tokenizer(_TEXTS, out, vocab_size=350)


def test_special_tokens_have_ids_0_to_4(trained):
  out, tok = trained
  assert tokenizer_lib.special_ids(tok) == tokenizer_lib.SpecialIds(0, 1, 2, 3, 4)
  assert sorted(os.listdir(out)) == ["merges.txt", "tokenizer.json", "vocab.json"]
  encoding = tok.encode("If it rains, the club lost.")
  assert encoding.ids[0] == 0 and encoding.ids[-1] == 2  # <s> ... </s>
  assert tok.decode(encoding.ids) == "If it rains, the club lost."
  # Byte-level: any text round-trips, never <unk>.
  assert tok.decode(tok.encode("Ünïcödé ☃").ids) == "Ünïcödé ☃"
  assert tokenizer_lib.special_ids(tok).unk not in tok.encode("Ünïcödé ☃").ids


def test_load_tokenizer_json_and_vocab_merges(trained, tmp_path):
  out, tok = trained
  text = "Although the match is cancelled, the club lost money."
  from_json = tokenizer_lib.load_tokenizer(os.path.join(out, "tokenizer.json"))
  assert from_json.encode(text).ids == tok.encode(text).ids
  pair_dir = tmp_path / "pair"
  pair_dir.mkdir()
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(out, name), pair_dir / name)
  from_pair = tokenizer_lib.load_tokenizer(str(pair_dir))
  assert from_pair.encode(text).ids == tok.encode(text).ids
  assert tokenizer_lib.special_ids(from_pair) == tokenizer_lib.special_ids(tok)


def test_missing_files_and_tokens_are_clear_errors(trained, tmp_path):
  out, _ = trained
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "nothing_here"))
  only_vocab = tmp_path / "only_vocab"
  only_vocab.mkdir()
  shutil.copy(os.path.join(out, "vocab.json"), only_vocab / "vocab.json")
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    tokenizer_lib.load_tokenizer(str(only_vocab))
  no_mask = tmp_path / "no_mask"
  no_mask.mkdir()
  with open(os.path.join(out, "vocab.json")) as f:
    vocab = json.load(f)
  del vocab["<mask>"]
  (no_mask / "vocab.json").write_text(json.dumps(vocab))
  shutil.copy(os.path.join(out, "merges.txt"), no_mask / "merges.txt")
  with pytest.raises(ValueError, match="<mask>"):
    tokenizer_lib.load_tokenizer(str(no_mask))
