"""Backends by name, and the hook for in-process policies."""

import pytest

from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import registry


def test_registry_and_local_policy_hook():
  class Echo:
    def generate(self, messages):
      return '{"tool": "finish", "arguments": {}}', len(messages), 5

  registry.register_backend("echo-test", lambda seed, **kw: backends_lib.LocalPolicyBackend(Echo()))
  backend = registry.make_backend("echo-test", seed=0)
  reply = backend.complete([{"role": "user", "content": "x"}], ())
  assert reply.completion_tokens == 5
  with pytest.raises(ValueError, match="unknown backend"):
    registry.make_backend("nope", seed=0)
  registry.BACKEND_FACTORIES.pop("echo-test")
