"""Shared fixtures: float64 on demand, tiny problems with known derivatives."""

import os

# Tests run on the CPU, with eight fake devices for the data-parallel checks.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax
import pytest


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting after it."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)
