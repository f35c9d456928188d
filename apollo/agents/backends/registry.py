"""Backends by name: what a session's `backend` field resolves to.

The service stores a session's backend as a name plus options (`"scripted"`,
`{"latency_s": 0.3}`), so a restarted service rebuilds the same backend;
`make_backend(name, seed, **options)` does that. `register_backend` adds a name.
Every backend made here prefers native tool calls (`tool_mode`), the scripted
policy included, unless its options say otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import openai_chat
from apollo.agents.envs import research_policy


def make_scripted_backend(
  seed: int, tool_mode: str = "native", **options: Any
) -> research_policy.ScriptedResearchPolicy:
  """The `'scripted'` backend: the research task's scripted policy, native by default."""
  return research_policy.ScriptedResearchPolicy(seed, tool_mode=tool_mode, **options)


# name -> factory(seed=..., **options) -> Backend.
BACKEND_FACTORIES: dict[str, Callable[..., backends_lib.Backend]] = {
  "openai": openai_chat.make_openai_backend,
  "scripted": make_scripted_backend,
}

# Backends with heavy imports (jax, flax) register themselves when first asked for.
_LAZY_BACKENDS = {"flax": "apollo.agents.backends.flax_policy"}


def register_backend(name: str, factory: Callable[..., backends_lib.Backend]) -> None:
  """Makes `factory(seed=..., **options)` selectable as backend `name`."""
  BACKEND_FACTORIES[name] = factory


def known_backends() -> list[str]:
  """Every name `make_backend` accepts (including ones not loaded yet)."""
  return sorted({*BACKEND_FACTORIES, *_LAZY_BACKENDS})


def make_backend(name: str, seed: int, **options: Any) -> backends_lib.Backend:
  if name not in BACKEND_FACTORIES and name in _LAZY_BACKENDS:
    importlib.import_module(_LAZY_BACKENDS[name])
  if name not in BACKEND_FACTORIES:
    raise ValueError(f"unknown backend {name!r}; known: {known_backends()}")
  return BACKEND_FACTORIES[name](seed=seed, **options)
