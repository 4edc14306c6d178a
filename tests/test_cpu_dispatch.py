"""cpu/dispatch.py: which formulation runs where."""

import jax
import jax.numpy as jnp
import pytest

from amended_darts_jax.cpu import dispatch, kernels
from amended_darts_jax.errors import ConfigError


def test_conv_pool_impl_resolution(monkeypatch):
  assert dispatch.resolve("conv", 3) == "conv"
  if jax.default_backend() == "cpu":
    assert kernels.available(), kernels.why_unavailable()
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the tests have eight
    assert dispatch.resolve("auto", 3, 16) == "kernel"
    assert dispatch.resolve("auto", 5, 256, dtype=jnp.float64) == "kernel"
    # float16 has no C++ kernel: the pure-JAX rule below.
    assert dispatch.resolve("auto", 3, 16, dtype=jnp.float16) == "dense"
    with pytest.raises(ConfigError, match="takes float32 or float64, not float16"):
      dispatch.resolve("kernel", 3, 16, dtype=jnp.float16)
    # Several devices: XLA would gather the sharded batch for a custom call.
    with monkeypatch.context() as m:
      m.setattr(jax, "device_count", lambda: 2)
      assert dispatch.resolve("auto", 3, 64) == "shift"
    # Without the kernel, "auto" picks among the pure-JAX forms.
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert dispatch.resolve("auto", 3, 16) == "dense"
    assert dispatch.resolve("auto", 5, dispatch.DENSE_MAX_CHANNELS) == "dense"
    assert dispatch.resolve("auto", 5, dispatch.DENSE_MAX_CHANNELS + 1) == "shift"
    # Batched kernels over a batched input: the dense form would become a grouped conv.
    assert dispatch.resolve("auto", 3, 16, edge_group="per_edge") == "shift"
    # A kernel whose extent reaches the map's side: the dense form leaves XLA:CPU's
    # fast path, so the shifted sum.
    assert dispatch.resolve("auto", 5, 16, size=8) == "dense"
    assert dispatch.resolve("auto", 5, 16, size=5) == "shift"
    assert dispatch.resolve("auto", 5, 16, dilation=2, size=8) == "shift"
    assert dispatch.resolve("auto", 3, 16, dilation=2, size=8) == "dense"
  with pytest.raises(ValueError, match="conv_pool_impl must be one of"):
    dispatch.resolve("winograd", 3)


def test_cpu_kernel_that_cannot_build_leaves_auto_on_pure_jax(monkeypatch, tmp_path, caplog):
  # A fresh attempt with a "compiler" that fails and an empty cache directory.
  monkeypatch.setattr(kernels, "_state", {})
  monkeypatch.setenv("CXX", "false")
  monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
  assert not kernels.available()
  assert "failed" in kernels.why_unavailable()
  assert "the C++ depthwise kernel is not available" in caplog.text
  assert list(tmp_path.iterdir()) == []  # no half-written library left behind
  if jax.default_backend() == "cpu":
    assert dispatch.resolve("auto", 3, 64) == "shift"
    with pytest.raises(ConfigError, match="conv_pool_impl='kernel' could not be built: .*false"):
      dispatch.resolve("kernel", 3, 64)
  # The switch turns it off without trying to build.
  monkeypatch.setattr(kernels, "_state", {})
  monkeypatch.setenv(kernels.SWITCH_ENV, "0")
  assert not kernels.available()
  assert kernels.why_unavailable() == "turned off by AMENDED_DARTS_CPU_KERNEL=0"


def test_auto_takes_xla_convolutions_on_gpu_and_tpu(monkeypatch):
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert dispatch.resolve("auto", 3, 16) == "conv"
