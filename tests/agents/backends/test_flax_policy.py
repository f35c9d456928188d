"""The Flax policy as a rollout backend (apollo.agents.backends.flax_policy)."""

import jax.numpy as jnp
import numpy as np
import pytest

from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import flax_policy, registry
from apollo.models import chat_template as C
from apollo.models.llama import model as D
from apollo.models.llama import params as DI
from apollo.models.llama import sampling

MESSAGES = [
  {"role": "system", "content": "You are a research agent."},
  {"role": "user", "content": "Train the model."},
  {"role": "assistant", "content": 'Reading.\n{"tool": "read_file"}'},
  {"role": "user", "content": "[observation] README: train.py"},
]


@pytest.fixture(scope="module")
def tokenizer():
  return C.train_chat_tokenizer()


@pytest.fixture(scope="module")
def template(tokenizer):
  return C.ChatTemplate(tokenizer, guidance_tag="human_guidance")


@pytest.fixture(scope="module")
def policy(tokenizer):
  config = D.get_config("tiny", vocab_size=tokenizer.get_vocab_size())
  model = DI.abstract_decoder(config)
  rng = np.random.default_rng(0)
  DI.import_hf_state_dict(
    model, {n: rng.normal(0, 0.2, s).astype(np.float32) for n, s in DI.hf_shapes(model).items()}
  )
  return model


def test_backend_returns_text(policy, tokenizer):
  backend = flax_policy.FlaxPolicyBackend(
    policy, tokenizer, max_new_tokens=12, temperature=0.8, top_k=50, seed=1, prompt_bucket=64
  )
  response = backend.complete(MESSAGES[:2], tools=())
  assert isinstance(response, backends_lib.ModelResponse) and isinstance(response.text, str)
  assert response.prompt_tokens == len(
    backend.template.render(MESSAGES[:2], add_generation_prompt=True)
  )
  assert 1 <= response.completion_tokens <= 12
  assert "<|im_end|>" not in response.text
  # Resuming from a snapshot redraws the same sample; the next turn differs in key.
  state = backend.snapshot()
  assert state == {"turn": 1}
  second = backend.complete(MESSAGES[:4], tools=()).text
  backend.restore(state)
  assert backend.complete(MESSAGES[:4], tools=()).text == second
  # TextGenerator protocol: plugs into LocalPolicyBackend as well.
  text, prompt_tokens, completion_tokens = backend.generate(MESSAGES[:2])
  assert isinstance(text, str) and prompt_tokens > 0 and completion_tokens > 0


def test_backend_greedy_text_is_the_models_argmax(policy, tokenizer, template):
  backend = flax_policy.FlaxPolicyBackend(
    policy, tokenizer, max_new_tokens=6, temperature=0, prompt_bucket=64
  )
  text, _, completion = backend.generate(MESSAGES[:2])
  prompt = template.render(MESSAGES[:2], add_generation_prompt=True).ids
  expected = sampling.generate(
    policy, jnp.asarray(prompt)[None], 6, temperature=0, eos_id=template.stop_ids
  ).tokens[0, :completion]
  assert text == template.decode_response(np.asarray(expected))


def test_backend_refuses_an_overlong_context(policy, tokenizer):
  backend = flax_policy.FlaxPolicyBackend(policy, tokenizer, max_new_tokens=8, max_context=32)
  with pytest.raises(backends_lib.BackendError, match="max_context"):
    backend.complete([{"role": "user", "content": "word " * 100}], tools=())


def test_registered_as_flax_backend():
  backend = registry.make_backend("flax", seed=0, max_new_tokens=4, temperature=0, prompt_bucket=64)
  assert isinstance(backend, flax_policy.FlaxPolicyBackend) and backend.name == "flax"
  assert isinstance(backend.complete(MESSAGES[:2], tools=()).text, str)
