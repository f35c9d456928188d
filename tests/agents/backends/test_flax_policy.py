"""The Flax policy as a rollout backend (apollo.agents.backends.flax_policy)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import flax_policy, registry
from apollo.agents.envs import research as research_env
from apollo.models import chat_template as C
from apollo.models.llama import model as D
from apollo.models.llama import params as DI
from apollo.models.llama import sampling
from tests.agents.backends import native_helpers

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


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path):
  return native_helpers.tiny_checkpoint(tmp_path)


def test_checkpoint_backend_renders_like_the_server_and_parses_hermes_calls(checkpoint):
  tools = research_env.ResearchEnv().tools()
  generator = native_helpers.CannedGenerator(
    checkpoint.tokenizer,
    [
      "Reading first.\n" + native_helpers.hermes("read_file", path="README.md"),
      '<tool_call>\n{"name": "sleep", "arguments": {"hours": 0.5}\n</tool_call>',
      "plain words",
    ],
  )
  backend = flax_policy.CheckpointBackend(checkpoint, generator, seed=3, max_new_tokens=64)
  messages = [
    {"role": "system", "content": "Act."},
    {"role": "user", "content": "Task."},
    {
      "role": "assistant",
      "content": "",
      "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "list_files", "arguments": "{}"}}
      ],
    },
    {"role": "tool", "tool_call_id": "c0", "content": "<observation>README.md</observation>"},
  ]
  reply = backend.complete(messages, tools)
  assert reply.content == "Reading first." and reply.call_errors == []
  assert reply.tool_calls == [
    {
      "id": "call_0_0",
      "type": "function",
      "function": {"name": "read_file", "arguments": '{"path": "README.md"}'},
    }
  ]
  assert reply.text.startswith("Reading first.\n<tool_call>")
  # The prompt is the server's: tools described in the system message, the earlier
  # call written in Hermes form, the tool result as a <tool_response>.
  prompt = generator.prompt_text()
  assert "<tools>" in prompt and '"name": "launch_run"' in prompt
  assert '<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>' in prompt
  assert "<tool_response>\n<observation>README.md</observation>\n</tool_response>" in prompt
  assert reply.prompt_tokens == len(generator.requests[0].prompt_ids)
  # A broken call is reported, not raised; without tools the reply is plain text.
  broken = backend.complete(messages, tools)
  assert broken.tool_calls == [] and "invalid JSON" in broken.call_errors[0]
  assert broken.content == broken.text  # kept whole, so the model sees what it wrote
  assert backend.complete(messages[:2], ()).text == "plain words"
  # Each turn samples with its own seed; the turn counter is the snapshot.
  seeds = [r.seed for r in generator.requests]
  assert len(set(seeds)) == 3 and backend.snapshot() == {"turn": 3}
  backend.restore({"turn": 0})
  backend.complete(messages[:2], ())
  assert generator.requests[-1].seed == seeds[0]


def test_checkpoint_backend_required_tool_choice_and_context_limit(checkpoint):
  tools = research_env.ResearchEnv().tools()
  generator = native_helpers.CannedGenerator(
    checkpoint.tokenizer, ['{"name": "gpu_status", "arguments": {}}\n</tool_call>'], max_len=4096
  )
  backend = flax_policy.CheckpointBackend(checkpoint, generator, tool_choice="required")
  reply = backend.complete([{"role": "user", "content": "Go."}], tools)
  # The reply was started with the call's opening (as the server does) and read whole.
  assert generator.prompt_text().endswith("<|im_start|>assistant\n<tool_call>\n")
  assert [c["function"]["name"] for c in reply.tool_calls] == ["gpu_status"]
  long = [{"role": "user", "content": "word " * 5000}]
  with pytest.raises(backends_lib.BackendError, match="compress the context"):
    backend.complete(long, tools)
  with pytest.raises(ValueError, match="tool_choice"):
    flax_policy.CheckpointBackend(checkpoint, generator, tool_choice="none")


def test_tiny_policy_refuses_native_mode(policy, tokenizer):
  backend = flax_policy.FlaxPolicyBackend(policy, tokenizer, max_new_tokens=4)
  with pytest.raises(backends_lib.BackendError, match="--tool_mode=text"):
    backend.complete(MESSAGES[:2], research_env.ResearchEnv().tools())


def test_checkpoint_backend_reads_calls_in_the_checkpoints_format(checkpoint):
  glm = dataclasses.replace(checkpoint, tool_call_format="glm45")
  reply_text = (
    "<think>The run id is r1.</think>Checking.\n"
    "<tool_call>check_run\n<arg_key>run_id</arg_key>\n<arg_value>r1</arg_value>\n</tool_call>"
  )
  generator = native_helpers.CannedGenerator(glm.tokenizer, [reply_text])
  backend = flax_policy.CheckpointBackend(glm, generator)
  reply = backend.complete([{"role": "user", "content": "Go."}], research_env.ResearchEnv().tools())
  assert [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls] == [
    ("check_run", '{"run_id": "r1"}')
  ]
  assert reply.content == "Checking." and reply.call_errors == []
  # The tools were described with GLM-4.5's call syntax.
  assert "<arg_key>" in generator.prompt_text()
