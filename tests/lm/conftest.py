"""Fixtures of the LM tests."""

import jax
import pytest


@pytest.fixture(scope="module")
def disk_compilation_cache(tmp_path_factory):
  """Reruns of the same config compile the same programs: reuse them from disk.

  Module-scoped and reset afterwards, so other test modules never use this cache.
  """
  from jax.experimental.compilation_cache import compilation_cache

  keys = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
