"""Tests for apollo.models.llama.params: config conversion, exact export/import round
trips, errors, sharded checkpoints, and (when torch + transformers are importable)
equality with HF's PyTorch LlamaForCausalLM / Qwen2ForCausalLM logits."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from apollo.models.llama import model as D
from apollo.models.llama import params as DI
from apollo.models.llama import sampling

HF_ATOL = 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, mask=None, positions=None):
  return nnx.merge(graphdef, state)(ids, positions=positions, attention_mask=mask)[0]


def _logits(model, ids, mask=None, positions=None):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, jnp.asarray(ids), mask, positions)


def _random_model(config, seed=0):
  """Every Param drawn (norm scales and biases included), so nothing maps by luck.

  Filled through the importer from random HF-layout tensors: no initializer to
  compile, which keeps these tests fast.
  """
  model = DI.abstract_decoder(config)
  rng = np.random.default_rng(seed)
  DI.import_hf_state_dict(
    model,
    {
      name: rng.normal(0, 0.2, shape).astype(np.float32)
      for name, shape in DI.hf_shapes(model).items()
    },
  )
  return model


def _params(model):
  return {
    path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


LLAMA_OVERRIDES = dict(attention_bias=False, tie_word_embeddings=True, rope_theta=500_000.0)
LLAMA3_ROPE = dict(
  rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_position_embeddings=64
)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "model_type, overrides",
  [
    ("qwen2", {}),
    ("llama", LLAMA_OVERRIDES),
    ("llama", {**LLAMA_OVERRIDES, **LLAMA3_ROPE, "head_dim": 32}),
  ],
)
def test_config_round_trip(model_type, overrides):
  config = D.get_config("tiny", **overrides)
  hf = DI.config_to_hf(config, model_type)
  assert hf["model_type"] == model_type and hf["num_key_value_heads"] == 2
  assert DI.config_from_hf(hf) == config
  # The pre-transformers-5 layout (top-level rope_theta / rope_scaling) reads the same.
  legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
  assert DI.config_from_hf(legacy) == config
  assert DI.config_from_hf(hf, dtype="bfloat16").dtype == jnp.bfloat16


def test_config_errors():
  hf = DI.config_to_hf(D.get_config("tiny"), "qwen2")
  for change, message in [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True}, "sliding"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
  ]:
    with pytest.raises(ValueError, match=message):
      DI.config_from_hf({**hf, **change})
  with pytest.raises(ValueError, match="Qwen2 always has"):
    DI.config_to_hf(D.get_config("tiny", attention_bias=False), "qwen2")


def test_qwen2_0_5b_config_from_published_config_json():
  # Qwen/Qwen2-0.5B-Instruct's config.json (the fields that matter).
  published = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
  }
  assert DI.config_from_hf(published) == D.get_config("qwen2_0_5b")


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("model_type, overrides", [("qwen2", {}), ("llama", LLAMA_OVERRIDES)])
def test_export_import_round_trip_is_exact(tmp_path, model_type, overrides):
  config = D.get_config("tiny", **overrides)
  model = _random_model(config, seed=2)
  DI.export_hf(model, tmp_path, model_type)
  saved = load_file(tmp_path / "model.safetensors")
  assert ("lm_head.weight" in saved) == (not config.tie_word_embeddings)
  assert ("model.layers.0.self_attn.q_proj.bias" in saved) == (model_type == "qwen2")
  assert saved["model.layers.1.self_attn.o_proj.weight"].shape == (64, 64)
  assert saved["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)

  restored, report = DI.from_pretrained(tmp_path)
  assert restored.config == config
  assert not report.missing and not report.unused and len(report.loaded) == len(saved)
  original, loaded = _params(model), _params(restored)
  assert original.keys() == loaded.keys()
  for path in original:
    np.testing.assert_array_equal(loaded[path], original[path], err_msg=str(path))


def test_import_onto_a_mesh(tmp_path):
  config = D.get_config("tiny")
  model = _random_model(config, seed=3)
  DI.export_hf(model, tmp_path)
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  sharded, _ = DI.from_pretrained(tmp_path, mesh=mesh)
  kernel = sharded.layers[0].mlp.up_proj.kernel.get_value()
  assert kernel.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(kernel, model.layers[0].mlp.up_proj.kernel.get_value())


def test_sharded_safetensors_index(tmp_path):
  config = D.get_config("tiny")
  model = _random_model(config, seed=4)
  tensors = DI.hf_state_dict(model)
  names = sorted(tensors)
  shards = {
    "model-00001-of-00002.safetensors": names[::2],
    "model-00002-of-00002.safetensors": names[1::2],
  }
  for file, part in shards.items():
    save_file({n: tensors[n] for n in part}, tmp_path / file)
  weight_map = {n: f for f, part in shards.items() for n in part}
  (tmp_path / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": weight_map})
  )
  (tmp_path / "config.json").write_text(json.dumps(DI.config_to_hf(config)))
  restored, report = DI.from_pretrained(tmp_path)
  assert report.source.endswith("model.safetensors.index.json")
  np.testing.assert_array_equal(restored.norm.scale.get_value(), model.norm.scale.get_value())


def test_import_errors_name_file_and_tensor(tmp_path):
  config = D.get_config("tiny")
  model = _random_model(config)
  tensors = DI.hf_state_dict(model)
  before = _params(model)

  bad = dict(tensors)
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
  with pytest.raises(
    ValueError,
    match=r"ckpt\.safetensors.*'model\.layers\.1\.mlp\.up_proj"
    r"\.weight' has shape \(100, 64\).*\(128, 64\)",
  ):
    DI.import_hf_state_dict(model, bad, source="ckpt.safetensors")

  missing = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
  with pytest.raises(ValueError, match="'lm_head.weight' is missing.*tie_word_embeddings"):
    DI.import_hf_state_dict(model, missing)

  tied = _random_model(D.get_config("tiny", tie_word_embeddings=True))
  tied_tensors = DI.hf_state_dict(tied)
  # A stored copy of a tied head is accepted when equal, refused when not.
  same = {**tied_tensors, "lm_head.weight": tied_tensors["model.embed_tokens.weight"]}
  assert "lm_head.weight" not in DI.import_hf_state_dict(tied, same).unused
  with pytest.raises(ValueError, match="differs"):
    DI.import_hf_state_dict(
      tied, {**tied_tensors, "lm_head.weight": tensors["lm_head.weight"][:, :64]}
    )

  # A failed import leaves the model untouched.
  after = _params(model)
  for path in before:
    np.testing.assert_array_equal(after[path], before[path])
  with pytest.raises(FileNotFoundError):
    DI.from_pretrained(tmp_path)  # No weights there.


# ----------------------------------------------------------------------------- vs PyTorch

HF_CASES = {
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
  "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
  "llama": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(tie_word_embeddings=False, rope_theta=500_000.0),
  ),
  "llama3_rope_tied": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      tie_word_embeddings=True,
      rope_theta=500_000.0,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
      },
    ),
  ),
}


def _hf_model(case, tmp_path):
  """A tiny random HF model, every parameter drawn, saved with save_pretrained."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config_name, model_name, extra = HF_CASES[case]
  hf_config = getattr(transformers, config_name)(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    **extra,
  )
  torch.manual_seed(0)
  hf_model = getattr(transformers, model_name)(hf_config).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.normal_(0.0, 0.2)
  hf_model.save_pretrained(tmp_path)
  return hf_model, torch


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_pytorch(case, tmp_path):
  hf_model, torch = _hf_model(case, tmp_path)
  model, report = DI.from_pretrained(tmp_path)
  assert not report.unused, report.unused
  assert model.config.attention_bias == case.startswith("qwen2")

  # Long enough that RoPE's low frequencies (and llama3 scaling) matter.
  ids = np.random.default_rng(0).integers(0, 512, (2, 160))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  got = np.asarray(_logits(model, ids))
  diff = np.abs(got - expected).max()
  print(
    f"\n{case}: max |logits - torch logits| = {diff:.2e} (logit scale {np.abs(expected).max():.1f})"
  )
  np.testing.assert_allclose(got, expected, atol=HF_ATOL, rtol=0)

  # Left padding: HF with an attention mask and explicit position ids.
  mask = np.ones_like(ids)
  mask[1, :7] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    expected = hf_model(
      torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits.numpy()
  got = np.asarray(_logits(model, ids, jnp.asarray(mask, bool)))
  np.testing.assert_allclose(
    got[mask.astype(bool)], expected[mask.astype(bool)], atol=HF_ATOL, rtol=0
  )


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_exported_checkpoint_loads_in_transformers(case, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model_type = case
  overrides = {} if case == "qwen2" else dict(attention_bias=False)
  model = _random_model(D.get_config("tiny", **overrides), seed=5)
  DI.export_hf(model, tmp_path, model_type)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == HF_CASES[case][1]
  ids = np.random.default_rng(1).integers(0, 512, (2, 40))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  got = np.asarray(_logits(model, ids))
  print(f"\nexported {case}: max diff {np.abs(got - expected).max():.2e}")
  np.testing.assert_allclose(got, expected, atol=HF_ATOL, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path):
  hf_model, torch = _hf_model("qwen2", tmp_path)
  model, _ = DI.from_pretrained(tmp_path)
  prompt = np.random.default_rng(2).integers(0, 512, (1, 6))
  with torch.no_grad():
    expected = hf_model.generate(
      torch.tensor(prompt), max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0
    )[0, 6:].numpy()
  got = sampling.generate(model, jnp.asarray(prompt), 10, temperature=0).tokens[0]
  np.testing.assert_array_equal(got, expected)
