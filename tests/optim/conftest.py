"""Fixtures of the optimizer tests."""

import importlib

import jax
import pytest

apollo_module = importlib.import_module("apollo.optim.apollo")


@pytest.fixture(params=["separate_sums", "one_pass_sums"])
def sums_form(request, monkeypatch):
  """Runs a test with both forms of the per-tensor sums (see `_tensor_reductions`).

  'one_pass_sums' lowers the size threshold so that every tensor of a small test
  tree takes the one-pass variadic reduction that large tensors take. Caches are
  cleared so that no step compiled under the other form is reused.
  """
  if request.param == "one_pass_sums":
    monkeypatch.setattr(apollo_module, "FUSED_SUMS_MIN_SIZE", 1)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()
