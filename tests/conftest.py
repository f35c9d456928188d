"""Test-wide set-up: every run exercises sharding on 8 forced host CPU devices.

This must run before JAX initialises its backends, so it lives at the top of the
root conftest and nothing above it imports jax.numpy or touches a device.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
