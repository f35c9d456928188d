"""A few steps of a research episode acted by the real SmolLM2-135M-Instruct, in process."""

import os

import pytest

from apollo.agents import agent, storage
from apollo.agents.backends import registry
from apollo.agents.envs import research as research_env
from apollo.models import gguf


@pytest.mark.slow
def test_smollm2_acts_natively_for_a_few_steps(tmp_path):
  try:  # Located without importing it: its __init__ imports packages it was installed without.
    gguf.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  backend = registry.make_backend(
    "flax", seed=0, model="smollm2-135m-instruct", max_new_tokens=48, temperature=0.0
  )
  assert backend.tool_mode == "native" and backend.loaded.tool_call_format == "hermes"
  store = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  try:
    result = agent.run_episode(
      "smol",
      research_env.ResearchEnv(),
      backend,
      store,
      research_env.seeds_for("test", 1)[0],
      config=agent.AgentConfig(max_steps=3),
    )
    steps = store.get_steps("smol")
  finally:
    store.close()
  # Whatever the small model writes, every step is stored with its call check.
  assert result["steps"] == 3 and len(steps) == 3
  for step in steps:
    assert step.call["mode"] == "native" and step.completion_tokens > 0
    assert step.response and step.prompt_tokens > 500  # the tools are in the prompt
    assert step.call["parsed"] == (step.action is not None)
