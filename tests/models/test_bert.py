"""Tests for the BERT family on tiny random models: absolute positions, token types,
the HF ``Bert*`` name map (round trips, fresh heads), WordPiece special tokens, and
(when torch + transformers are importable) equality with HF's PyTorch BERT."""

import json

import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx
from tokenizers import models, pre_tokenizers

from apollo.models import tokenizer as tokenizer_lib
from apollo.models.bert import model as bert_model
from apollo.models.bert import params as bert_params
from apollo.models.roberta import model as M
from apollo.models.roberta import params as roberta_params

PAD, CLS, SEP = 0, 2, 3

MLM_HEAD = [
  "cls.predictions.transform.dense.weight",
  "cls.predictions.transform.dense.bias",
  "cls.predictions.transform.LayerNorm.weight",
  "cls.predictions.transform.LayerNorm.bias",
  "cls.predictions.bias",
]
ECLS_HEAD = [
  "classifier.dense.weight",
  "classifier.dense.bias",
  "classifier.out_proj.weight",
  "classifier.out_proj.bias",
]


def _jit_call(model, *args, **kwargs):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def _params(model):
  state = nnx.state(model, nnx.Param)
  return {path: np.asarray(v) for path, v in nnx.to_flat_state(state)}


def _batch(vocab_size, batch=3, length=10, seed=0):
  """`[CLS] a [SEP] b [SEP]` rows, one padded; segment B has token type 1."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab_size, size=(batch, length))
  ids[:, 0] = CLS
  ids[:, 4] = SEP
  ids[:, -1] = SEP
  ids[0, 6:] = PAD
  ids[0, 5] = SEP
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  types[0, 6:] = 0
  return ids.astype(np.int32), (ids != PAD).astype(np.int32), types.astype(np.int32)


@pytest.fixture(scope="module")
def config():
  return bert_model.get_config("tiny")


@pytest.fixture(scope="module")
def pretraining_model(config):
  return M.PretrainingModel(config, rngs=nnx.Rngs(3))


def test_bert_config_and_position_ids_from_zero(config):
  assert (config.position_scheme, config.type_vocab_size, config.pad_token_id) == ("absolute", 2, 0)
  assert config.layer_norm_eps == 1e-12
  ids, _, _ = _batch(config.vocab_size)
  # Every row counts 0..L-1, the padded one included (HF BertEmbeddings).
  np.testing.assert_array_equal(
    M.compute_position_ids(ids, config), np.broadcast_to(np.arange(10), ids.shape)
  )
  assert config.max_sequence_length == config.max_position_embeddings == 128
  # RoBERTa keeps its offset past the pad id, and padding does not advance it.
  roberta = M.get_config("tiny")
  roberta_ids = np.where(ids == PAD, 1, ids)
  np.testing.assert_array_equal(
    M.compute_position_ids(roberta_ids, roberta)[0], [2, 3, 4, 5, 6, 7, 1, 1, 1, 1]
  )
  assert roberta.max_sequence_length == 128
  with pytest.raises(ValueError, match="position_scheme"):
    M.EncoderConfig(position_scheme="rotary")


def test_embeddings_use_absolute_positions_and_full_table(config):
  encoder = M.Encoder(config, add_pooler=False, rngs=nnx.Rngs(0))
  emb = encoder.embeddings
  ids, _, types = _batch(config.vocab_size)
  by_hand = emb.layer_norm(
    emb.word_embeddings(ids)
    + emb.token_type_embeddings(types)
    + emb.position_embeddings.embedding[...][: ids.shape[1]]
  )
  np.testing.assert_allclose(emb(ids, types), by_hand, atol=1e-6)
  # All 128 positions are usable (no rows reserved before the pad id), not 129.
  assert _jit_call(encoder, np.full((1, 128), 7, np.int32)).shape == (1, 128, 64)
  with pytest.raises(ValueError, match="exceeds the position table"):
    encoder(np.full((1, 129), 7, np.int32))


def test_token_types_change_the_output(config):
  encoder = M.Encoder(config, add_pooler=False, rngs=nnx.Rngs(0))
  ids, mask, types = _batch(config.vocab_size)
  segment_a_only = _jit_call(encoder, ids, mask, np.zeros_like(types))
  np.testing.assert_array_equal(_jit_call(encoder, ids, mask), segment_a_only)  # None = zeros.
  with_b = _jit_call(encoder, ids, mask, types)
  valid = mask.astype(bool)
  # Every token changes (attention mixes segment B into A), not just segment B's.
  per_token = np.abs(np.asarray(with_b) - np.asarray(segment_a_only)).max(axis=-1)
  assert per_token[valid].min() > 1e-3


def test_hf_names_and_config(config, pretraining_model):
  state = bert_params.hf_state_dict(pretraining_model)
  h = config.hidden_size
  assert state["bert.embeddings.token_type_embeddings.weight"].shape == (2, h)
  assert state["bert.encoder.layer.1.attention.self.query.weight"].shape == (h, h)
  assert state["cls.predictions.transform.dense.weight"].shape == (h, h)
  assert state["cls.predictions.bias"].shape == (config.vocab_size,)
  assert set(MLM_HEAD + ECLS_HEAD) <= set(state)
  # The decoder is tied: not written; no RoBERTa names; no pooler (as BertForMaskedLM).
  assert not any(
    k.startswith(("cls.predictions.decoder", "lm_head", "roberta", "bert.pooler")) for k in state
  )
  assert len(state) == 5 + 2 * 16 + 5 + 4

  hf_config = bert_params.config_to_hf(config)
  assert hf_config["model_type"] == "bert" and hf_config["architectures"] == ["BertForMaskedLM"]
  assert bert_params.config_from_hf(hf_config) == config
  # Fields a BERT config.json may leave out take BERT's defaults, not RoBERTa's.
  sparse = {
    k: v
    for k, v in hf_config.items()
    if k not in ("type_vocab_size", "layer_norm_eps", "pad_token_id")
  }
  assert bert_params.config_from_hf(sparse) == config
  with pytest.raises(ValueError, match="number positions"):
    roberta_params.config_to_hf(config)
  with pytest.raises(ValueError, match="number positions"):
    bert_params.config_to_hf(M.get_config("tiny"))


def test_export_import_round_trip_is_exact(tmp_path, config, pretraining_model):
  out_dir = bert_params.export_hf(pretraining_model, tmp_path / "ckpt")
  assert json.loads((out_dir / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
  loaded, report = bert_params.from_pretrained(out_dir, M.PretrainingModel, seed=99)
  assert report.missing == [] and report.unused == []
  assert loaded.config == config
  expected, actual = _params(pretraining_model), _params(loaded)
  assert expected.keys() == actual.keys()
  for path in expected:
    np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))
  ids, mask, types = _batch(config.vocab_size)
  a, b = _jit_call(pretraining_model, ids, mask, types), _jit_call(loaded, ids, mask, types)
  np.testing.assert_array_equal(a.mlm_logits, b.mlm_logits)
  np.testing.assert_array_equal(a.ecls_logits, b.ecls_logits)

  mc = M.MultipleChoiceModel(config, rngs=nnx.Rngs(1))
  mc_dir = bert_params.export_hf(mc, tmp_path / "mc")
  assert json.loads((mc_dir / "config.json").read_text())["architectures"] == [
    "BertForMultipleChoice"
  ]
  mc2, report = bert_params.from_pretrained(mc_dir, M.MultipleChoiceModel, seed=5)
  assert report.missing == [] and report.unused == []
  for path, value in _params(mc).items():
    np.testing.assert_array_equal(_params(mc2)[path], value, err_msg=str(path))


def test_heads_missing_from_checkpoint_are_fresh_and_reported(tmp_path, config):
  # A bare BertModel checkpoint (as MiniLM): trunk + pooler, no prefix, no heads.
  trunk = M.Encoder(config, add_pooler=True, rngs=nnx.Rngs(1))
  ckpt = bert_params.export_hf(trunk, tmp_path / "bare")
  assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["BertModel"]
  model, report = bert_params.from_pretrained(ckpt, M.PretrainingModel, seed=7)
  assert report.missing == MLM_HEAD + ECLS_HEAD
  assert report.unused == ["pooler.dense.bias", "pooler.dense.weight"]
  np.testing.assert_array_equal(
    model.encoder.layers[1].output.kernel.get_value(), trunk.layers[1].output.kernel.get_value()
  )
  # The heads are exactly a fresh model's (same seed): initialised, not loaded.
  fresh = _params(M.PretrainingModel(config, rngs=nnx.Rngs(7)))
  for path, value in _params(model).items():
    if path[0] in ("mlm_head", "ecls_head"):
      np.testing.assert_array_equal(value, fresh[path], err_msg=str(path))
  with pytest.raises(ValueError, match="cls.predictions.transform.dense.weight' is missing"):
    bert_params.from_pretrained(ckpt, M.PretrainingModel, strict=True)
  # A missing trunk tensor is an error.
  tensors = bert_params.hf_state_dict(trunk)
  del tensors["encoder.layer.0.attention.self.key.bias"]
  with pytest.raises(ValueError, match="layer.0.attention.self.key.bias' is missing"):
    bert_params.import_hf_state_dict(M.Encoder(config, rngs=nnx.Rngs(0)), tensors)


def test_mlm_decoder_stays_tied(config, pretraining_model):
  state = bert_params.hf_state_dict(pretraining_model)
  # HF's BertForMaskedLM may store the tied decoder and its bias; both are accepted.
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
  state["cls.predictions.decoder.bias"] = state.pop("cls.predictions.bias")
  state["bert.embeddings.position_ids"] = np.arange(128)[None]
  model = M.PretrainingModel(config, rngs=nnx.Rngs(0))
  report = bert_params.import_hf_state_dict(model, state)
  assert report.unused == [] and report.missing == []
  np.testing.assert_array_equal(
    model.mlm_head.bias.get_value(), pretraining_model.mlm_head.bias.get_value()
  )
  # Logits are the word embeddings applied to the head's output: the decoder is them.
  ids, mask, types = _batch(config.vocab_size)
  hidden = _jit_call(model.encoder, ids, mask, types)
  head = model.mlm_head
  x = head.layer_norm(jax.nn.gelu(head.dense(hidden), approximate=False))
  want = (
    x @ model.encoder.embeddings.word_embeddings.embedding.get_value().T + head.bias.get_value()
  )
  np.testing.assert_allclose(_jit_call(model, ids, mask, types).mlm_logits, want, atol=1e-5)
  state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
  with pytest.raises(ValueError, match="ties the MLM decoder"):
    bert_params.import_hf_state_dict(model, state)


def test_wordpiece_special_ids_and_pair_format():
  vocab = {
    "[PAD]": 0,
    "[UNK]": 1,
    "[CLS]": 2,
    "[SEP]": 3,
    "[MASK]": 4,
    "rain": 5,
    "club": 6,
    "##s": 7,
  }
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  special = tokenizer_lib.special_ids(tok)
  assert special == tokenizer_lib.SpecialIds(2, 0, 3, 1, 4, family="bert")
  first = tok.encode("rains", add_special_tokens=False).ids
  second = tok.encode("club", add_special_tokens=False).ids
  assert (first, second) == ([5, 7], [6])
  assert special.single(first) == [2, 5, 7, 3]
  assert special.pair(first, second) == ([2, 5, 7, 3, 6, 3], [0, 0, 0, 0, 1, 1])
  assert special.pair_overhead == 3
  roberta = tokenizer_lib.SpecialIds(0, 1, 2, 3, 4)
  assert roberta.family == "roberta" and roberta.pair_overhead == 4
  assert roberta.pair([5, 7], [6]) == ([0, 5, 7, 2, 2, 6, 2], [0] * 7)
  del vocab["[MASK]"]
  no_mask = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    tokenizer_lib.special_ids(no_mask)


# -----------------------------------------------------------------------------
# Against Hugging Face's PyTorch implementation (optional dependencies).
# -----------------------------------------------------------------------------


def _tiny_hf_config(transformers):
  return transformers.BertConfig(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
    type_vocab_size=2,
    pad_token_id=PAD,
  )


def _torch_inputs(torch, ids, mask, types):
  arrays = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
  return {k: torch.from_numpy(v).long() for k, v in arrays.items()}


def test_matches_transformers_bert(tmp_path, config):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  mlm = transformers.BertForMaskedLM(_tiny_hf_config(transformers)).eval()
  with torch.no_grad():  # Non-trivial LayerNorm and bias values.
    for name, p in mlm.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  mlm.save_pretrained(tmp_path / "mlm")
  ids, mask, types = _batch(512)
  torch_inputs = _torch_inputs(torch, ids, mask, types)

  model, report = bert_params.from_pretrained(tmp_path / "mlm", M.PretrainingModel)
  assert model.config == config
  assert report.unused == [] and report.missing == ECLS_HEAD
  with torch.no_grad():
    want = mlm(**torch_inputs).logits.numpy()
  got = np.asarray(_jit_call(model, ids, mask, types).mlm_logits)
  valid = mask.astype(bool)  # HF's outputs at padded positions are arbitrary.
  diff = np.abs(got - want)[valid].max()
  print(f"BertForMaskedLM max |diff| = {diff:.3g}")
  assert diff < 1e-4


def test_export_loads_in_transformers_bert(tmp_path, config):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ids, mask, types = _batch(config.vocab_size)
  torch_inputs = _torch_inputs(torch, ids, mask, types)
  # A multiple-choice model (pooler + scorer) loads in transformers and scores the same.
  mc_model = M.MultipleChoiceModel(config, rngs=nnx.Rngs(1))
  mc = transformers.BertForMultipleChoice.from_pretrained(
    bert_params.export_hf(mc_model, tmp_path / "mc")
  ).eval()
  with torch.no_grad():
    want_mc = mc(**{k: v.reshape(1, 3, -1) for k, v in torch_inputs.items()}).logits.numpy()
  got_mc = np.asarray(
    _jit_call(mc_model, ids.reshape(1, 3, -1), mask.reshape(1, 3, -1), types.reshape(1, 3, -1))
  )
  assert np.abs(got_mc - want_mc).max() < 1e-4
