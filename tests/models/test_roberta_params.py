"""Tests for apollo.models.roberta.params: config conversion, export/import round trips, errors,
and (when torch + transformers are importable) equality with HF's PyTorch RoBERTa."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from apollo.models import hf
from apollo.models.roberta import model as M
from apollo.models.roberta import params as roberta_params

PAD = 1


def _jit_call(model, *args, **kwargs):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def _params(model):
  state = nnx.state(model, nnx.Param)
  return {path: np.asarray(v) for path, v in nnx.to_flat_state(state)}


def _batch(vocab_size, batch=3, length=10, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab_size, size=(batch, length))
  ids[:, 0] = 0
  ids[:, -1] = 2
  ids[0, 6:] = PAD  # One padded row exercises the mask and position ids.
  ids[0, 5] = 2
  return ids.astype(np.int32), (ids != PAD).astype(np.int32)


@pytest.fixture(scope="module")
def config():
  return M.get_config("tiny")


@pytest.fixture(scope="module")
def pretraining_model(config):
  return M.PretrainingModel(config, rngs=nnx.Rngs(3))


def test_config_round_trip(config):
  hf = roberta_params.config_to_hf(config)
  assert hf["num_hidden_layers"] == 2 and hf["hidden_act"] == "gelu"
  assert roberta_params.config_from_hf(hf) == config
  assert roberta_params.config_from_hf(hf, dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="hidden_act"):
    roberta_params.config_from_hf({**hf, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="position_embedding_type"):
    roberta_params.config_from_hf({**hf, "position_embedding_type": "relative_key"})


def test_hf_layout_names_and_shapes(config, pretraining_model):
  state = roberta_params.hf_state_dict(pretraining_model)
  h, i = config.hidden_size, config.intermediate_size
  assert state["roberta.embeddings.word_embeddings.weight"].shape == (512, h)
  assert state["roberta.encoder.layer.1.attention.self.query.weight"].shape == (h, h)
  assert state["roberta.encoder.layer.1.attention.self.query.bias"].shape == (h,)
  assert state["roberta.encoder.layer.0.intermediate.dense.weight"].shape == (i, h)
  assert state["roberta.encoder.layer.0.output.dense.weight"].shape == (h, i)
  assert state["lm_head.bias"].shape == (512,)
  assert state["classifier.out_proj.weight"].shape == (2, h)
  assert not any(k.startswith("roberta.pooler") for k in state)
  assert len(state) == 5 + 2 * 16 + 5 + 4  # embeddings, layers, lm_head, classifier
  # Torch Linear computes x @ W.T + b: our kernel must equal W.T (heads flattened).
  query = pretraining_model.encoder.layers[1].attention.query
  np.testing.assert_array_equal(
    np.asarray(query.kernel.get_value()).reshape(h, h),
    state["roberta.encoder.layer.1.attention.self.query.weight"].T,
  )


def test_round_trip_is_exact(tmp_path, config, pretraining_model):
  out_dir = roberta_params.export_hf(pretraining_model, tmp_path / "ckpt")
  assert json.loads((out_dir / "config.json").read_text())["architectures"] == [
    "RobertaForMaskedLM"
  ]
  loaded, report = roberta_params.from_pretrained(out_dir, M.PretrainingModel, seed=99)
  assert report.missing == [] and report.unused == []
  assert loaded.config == config
  expected, actual = _params(pretraining_model), _params(loaded)
  assert expected.keys() == actual.keys()
  for path in expected:
    np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))
  ids, mask = _batch(config.vocab_size)
  a, b = _jit_call(pretraining_model, ids, mask), _jit_call(loaded, ids, mask)
  np.testing.assert_array_equal(a.mlm_logits, b.mlm_logits)
  np.testing.assert_array_equal(a.ecls_logits, b.ecls_logits)


def test_multiple_choice_round_trip_and_transfer(tmp_path, config, pretraining_model):
  # Pretrained trunk -> fine-tuning model: pooler and scorer are new, as in HF.
  ckpt = roberta_params.export_hf(pretraining_model, tmp_path / "pretrained")
  mc, report = roberta_params.from_pretrained(ckpt, M.MultipleChoiceModel)
  assert report.missing == [
    "roberta.pooler.dense.weight",
    "roberta.pooler.dense.bias",
    "classifier.weight",
    "classifier.bias",
  ]
  assert report.unused == sorted(
    k for k in load_file(ckpt / "model.safetensors") if k.startswith(("lm_head.", "classifier."))
  )
  np.testing.assert_array_equal(
    mc.encoder.layers[0].intermediate.kernel.get_value(),
    pretraining_model.encoder.layers[0].intermediate.kernel.get_value(),
  )
  # And a multiple-choice model survives its own round trip, pooler included.
  ckpt2 = roberta_params.export_hf(mc, tmp_path / "mc")
  mc2, report2 = roberta_params.from_pretrained(ckpt2, M.MultipleChoiceModel, seed=5)
  assert report2.missing == [] and report2.unused == []
  for path, value in _params(mc).items():
    np.testing.assert_array_equal(_params(mc2)[path], value, err_msg=str(path))


def test_bare_encoder_checkpoint_and_tied_copies(tmp_path, config, pretraining_model):
  state = roberta_params.hf_state_dict(pretraining_model)
  # HF also stores the tied decoder (and its bias) and buffers; all are accepted.
  state["lm_head.decoder.weight"] = state["roberta.embeddings.word_embeddings.weight"]
  state["lm_head.decoder.bias"] = state["lm_head.bias"]
  state["roberta.embeddings.position_ids"] = np.arange(130)[None]
  model = M.PretrainingModel(config, rngs=nnx.Rngs(0))
  report = roberta_params.import_hf_state_dict(model, state)
  assert report.unused == [] and report.missing == []
  # A decoder that is not the embedding cannot be represented.
  state["lm_head.decoder.weight"] = state["lm_head.decoder.weight"] + 1
  with pytest.raises(ValueError, match="ties the MLM decoder"):
    roberta_params.import_hf_state_dict(model, state)
  # A bare RobertaModel checkpoint has no 'roberta.' prefix.
  encoder = M.Encoder(config, add_pooler=False, rngs=nnx.Rngs(0))
  bare = {k.removeprefix("roberta."): v for k, v in state.items() if k.startswith("roberta.")}
  report = roberta_params.import_hf_state_dict(encoder, bare)
  assert report.unused == [] and len(report.loaded) == 5 + 2 * 16
  np.testing.assert_array_equal(
    encoder.embeddings.word_embeddings.embedding.get_value(),
    pretraining_model.encoder.embeddings.word_embeddings.embedding.get_value(),
  )


def test_shape_mismatch_names_file_and_tensor(tmp_path, config, pretraining_model):
  ckpt = roberta_params.export_hf(pretraining_model, tmp_path / "ckpt")
  wrong = M.PretrainingModel(M.get_config("tiny", vocab_size=500), rngs=nnx.Rngs(0))
  before = _params(wrong)
  tensors, source = hf.load_hf_state_dict(ckpt)
  with pytest.raises(
    ValueError,
    match=r"model\.safetensors: tensor "
    r"'roberta\.embeddings\.word_embeddings\.weight' has shape "
    r"\(512, 64\).*expects \(500, 64\)",
  ):
    roberta_params.import_hf_state_dict(wrong, tensors, source=source)
  # A failed import changes nothing.
  for path, value in _params(wrong).items():
    np.testing.assert_array_equal(value, before[path])
  # A missing trunk tensor is an error; a missing head is not.
  del tensors["roberta.encoder.layer.1.output.LayerNorm.bias"]
  with pytest.raises(ValueError, match="layer.1.output.LayerNorm.bias' is missing"):
    roberta_params.import_hf_state_dict(M.PretrainingModel(config, rngs=nnx.Rngs(0)), tensors)
  with pytest.raises(FileNotFoundError):
    hf.load_hf_state_dict(tmp_path)


def test_bfloat16_checkpoint_and_sharded_index(tmp_path, config, pretraining_model):
  state = roberta_params.hf_state_dict(pretraining_model)
  names = sorted(state)
  d = tmp_path / "sharded"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(roberta_params.config_to_hf(config)))
  halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
  for file, keys in halves.items():
    save_file({k: state[k].astype(jnp.bfloat16) for k in keys}, d / file)
  (d / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}})
  )
  model, report = roberta_params.from_pretrained(d, M.PretrainingModel)
  assert report.missing == [] and report.unused == []
  got = model.encoder.layers[0].intermediate.kernel.get_value()
  assert got.dtype == jnp.float32
  want = pretraining_model.encoder.layers[0].intermediate.kernel.get_value()
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-4)


def test_pytorch_bin_needs_torch_only_when_used(tmp_path, monkeypatch, config, pretraining_model):
  d = tmp_path / "bin"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(roberta_params.config_to_hf(config)))
  state = roberta_params.hf_state_dict(pretraining_model)
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    torch.save(
      {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, d / "pytorch_model.bin"
    )
    model, report = roberta_params.from_pretrained(d, M.PretrainingModel)
    assert report.missing == [] and report.unused == []
    np.testing.assert_array_equal(
      model.mlm_head.bias.get_value(), pretraining_model.mlm_head.bias.get_value()
    )
  else:
    (d / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # As if torch were not installed.
  with pytest.raises(ImportError, match="torch is not installed"):
    hf.load_hf_state_dict(d)


def test_import_into_sharded_model(tmp_path, config, pretraining_model):
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  ckpt = roberta_params.export_hf(pretraining_model, tmp_path / "ckpt")
  model, report = roberta_params.from_pretrained(ckpt, M.PretrainingModel, mesh=mesh)
  assert report.missing == []
  kernel = model.encoder.layers[1].attention.query.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  np.testing.assert_array_equal(
    kernel, pretraining_model.encoder.layers[1].attention.query.kernel.get_value()
  )


# -----------------------------------------------------------------------------
# Against Hugging Face's PyTorch implementation (optional dependencies).
# -----------------------------------------------------------------------------


def _tiny_hf_config(transformers):
  return transformers.RobertaConfig(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=130,
    type_vocab_size=1,
    pad_token_id=PAD,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
  )


def test_matches_transformers_roberta(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = _tiny_hf_config(transformers)
  mlm = transformers.RobertaForMaskedLM(hf_config).eval()
  with torch.no_grad():  # Non-trivial LayerNorm and bias values.
    for name, p in mlm.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  mlm.save_pretrained(tmp_path / "mlm")
  ids, mask = _batch(512)

  model, report = roberta_params.from_pretrained(tmp_path / "mlm", M.PretrainingModel)
  assert report.unused == []
  assert set(report.missing) == {
    "classifier.dense.weight",
    "classifier.dense.bias",
    "classifier.out_proj.weight",
    "classifier.out_proj.bias",
  }
  with torch.no_grad():
    want = mlm(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).logits.numpy()
  got = np.asarray(_jit_call(model, ids, mask).mlm_logits)
  valid = mask.astype(bool)  # HF's outputs at padded positions are arbitrary.
  diff = np.abs(got - want)[valid].max()
  print(f"RobertaForMaskedLM max |diff| = {diff:.3g}")
  assert diff < 1e-4

  # The trunk alone, with pooler, against RobertaModel.
  base = transformers.RobertaModel(hf_config).eval()
  base.save_pretrained(tmp_path / "base")
  encoder, report = roberta_params.from_pretrained(tmp_path / "base", M.Encoder)
  assert report.missing == [] and report.unused == []
  with torch.no_grad():
    out = base(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  hidden = np.asarray(_jit_call(encoder, ids, mask))
  pooled = np.asarray(encoder.pooler(hidden))
  diff_hidden = np.abs(hidden - out.last_hidden_state.numpy())[valid].max()
  diff_pooled = np.abs(pooled - out.pooler_output.numpy()).max()
  print(f"RobertaModel max |diff| hidden = {diff_hidden:.3g}, pooled = {diff_pooled:.3g}")
  assert diff_hidden < 1e-4 and diff_pooled < 1e-4


def test_export_loads_in_transformers(tmp_path, pretraining_model, config):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ckpt = roberta_params.export_hf(pretraining_model, tmp_path / "ours")
  ids, mask = _batch(config.vocab_size)
  mlm = transformers.RobertaForMaskedLM.from_pretrained(ckpt).eval()
  classifier = transformers.RobertaForSequenceClassification.from_pretrained(ckpt).eval()
  torch_ids = torch.from_numpy(ids).long()
  torch_mask = torch.from_numpy(mask).long()
  with torch.no_grad():
    want_mlm = mlm(input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()
    want_ecls = classifier(input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()
  got = _jit_call(pretraining_model, ids, mask)
  valid = mask.astype(bool)
  assert np.abs(np.asarray(got.mlm_logits) - want_mlm)[valid].max() < 1e-4
  assert np.abs(np.asarray(got.ecls_logits) - want_ecls).max() < 1e-4

  mc_model = M.MultipleChoiceModel(config, rngs=nnx.Rngs(1))
  mc = transformers.RobertaForMultipleChoice.from_pretrained(
    roberta_params.export_hf(mc_model, tmp_path / "mc")
  ).eval()
  choices_ids, choices_mask = ids.reshape(1, 3, -1), mask.reshape(1, 3, -1)
  with torch.no_grad():
    want_mc = mc(
      input_ids=torch.from_numpy(choices_ids).long(),
      attention_mask=torch.from_numpy(choices_mask).long(),
    ).logits.numpy()
  got_mc = np.asarray(_jit_call(mc_model, choices_ids, choices_mask))
  assert np.abs(got_mc - want_mc).max() < 1e-4
