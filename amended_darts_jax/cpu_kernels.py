"""A depthwise convolution for XLA:CPU as C++ custom calls (`depthwise_cpu.cc`).

XLA:CPU has no fast depthwise convolution (ops.py). The kernels here make one
pass over the activation for the forward pass, one for the input gradient and
one for the kernel gradient, on XLA's own thread pool. They are compiled on
first use with the C++ compiler found on the machine (`$CXX`, else `c++`/`g++`)
against the XLA FFI headers that jaxlib ships, and cached under
`$AMENDED_DARTS_KERNEL_CACHE` (default `~/.cache/amended_darts_jax/kernels`),
keyed by the source, jaxlib's version and the CPU. Without a compiler, or with
`AMENDED_DARTS_CPU_KERNEL=0` in the environment, `available()` is False and
ops.py's "auto" keeps its pure-JAX formulations (a failed build logs one
warning saying why).

Derivatives. `depthwise_conv(x, k)` is a `jax.custom_vjp` whose backward pass
calls the input-gradient and kernel-gradient kernels. Each of the three kernels
is bilinear in its two operands, so each is a `jax.custom_jvp` whose tangent is
two calls of itself: forward-over-reverse products (`jax.jvp` of `jax.grad`,
what hypergrad.py computes) are exact. As with any `jax.custom_vjp`, forward
mode on the convolution alone, outside a reverse pass, is not defined.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("depthwise_cpu.cc")
CACHE_ENV = "AMENDED_DARTS_KERNEL_CACHE"
SWITCH_ENV = "AMENDED_DARTS_CPU_KERNEL"  # "0": do not build or use the kernel
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_TARGETS = {"forward": "DepthwiseForward", "input_grad": "DepthwiseInputGrad",
            "kernel_grad": "DepthwiseKernelGrad"}
_PREFIX = "amended_darts_depthwise_"

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str once tried


def _cpu_key() -> str:
  try:
    flags = next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
  except (OSError, StopIteration):
    flags = platform.processor()
  return flags


def library_path() -> pathlib.Path:
  import jaxlib
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), jaxlib.__version__.encode(), platform.machine().encode(),
      _cpu_key().encode()])).hexdigest()[:16]
  root = pathlib.Path(os.environ.get(CACHE_ENV) or
                      pathlib.Path.home() / ".cache" / "amended_darts_jax" / "kernels")
  return root / f"depthwise_cpu_{key}.so"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build(path: pathlib.Path) -> None:
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written to a temporary name and renamed: a concurrent process never loads
  # a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-fno-math-errno", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
      last = (out.stderr.strip().splitlines() or ["no message"])[-1]
      raise RuntimeError(f"{cxx} failed on {SOURCE.name} (exit status {out.returncode}): "
                         f"{last}\ncommand: {' '.join(cmd)}\n{out.stderr[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def available() -> bool:
  """Whether the kernels are built (building them now if need be) and registered."""
  with _lock:
    if "ok" not in _state and os.environ.get(SWITCH_ENV, "1") == "0":
      _state.update(ok=False, why=f"turned off by {SWITCH_ENV}=0")
    if "ok" not in _state:
      try:
        path = library_path()
        if not path.exists():
          _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for short, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(_PREFIX + short, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
        _state.update(ok=True, why="")
      except Exception as e:  # noqa: BLE001 (any failure means: use the fallback)
        _state.update(ok=False, why=str(e))
        logging.warning("the C++ depthwise kernel is not available (%s); using the "
                        "pure-JAX formulations on CPU", str(e).splitlines()[0])
    return _state["ok"]


def why_unavailable() -> str:
  available()
  return _state["why"]


def supports(dtype) -> bool:
  return np.dtype(dtype) in DTYPES


def _call(short, shape, dtype, a, b, stride, pad, dilation):
  return jax.ffi.ffi_call(_PREFIX + short, jax.ShapeDtypeStruct(shape, dtype),
                          vmap_method="broadcast_all")(
      a, b, stride=np.int64(stride), pad=np.int64(pad), dilation=np.int64(dilation))


# The three bilinear kernels. Each takes its geometry as static arguments, and
# its jvp is the sum of two calls of itself (product rule); a symbolic zero
# tangent skips its call.

def _bilinear(fn):
  fn = jax.custom_jvp(fn, nondiff_argnums=(2, 3, 4, 5))

  def jvp(stride, pad, dilation, shape, primals, tangents):
    a, b = primals
    ta, tb = tangents
    out = fn(a, b, stride, pad, dilation, shape)
    parts = []
    if not isinstance(ta, jax.custom_derivatives.SymbolicZero):
      parts.append(fn(ta, b, stride, pad, dilation, shape))
    if not isinstance(tb, jax.custom_derivatives.SymbolicZero):
      parts.append(fn(a, tb, stride, pad, dilation, shape))
    tangent = functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(out)
    return out, tangent

  fn.defjvp(jvp, symbolic_zeros=True)
  return fn


@_bilinear
def _forward(x, k, stride, pad, dilation, shape):
  del shape
  from amended_darts_jax.ops import out_size  # here: ops imports this module
  n, h, w, c = x.shape
  kk = k.shape[0]
  return _call("forward", (n, out_size(h, kk, stride, pad, dilation),
                           out_size(w, kk, stride, pad, dilation), c), x.dtype,
               x, k, stride, pad, dilation)


@_bilinear
def _input_grad(g, k, stride, pad, dilation, shape):
  return _call("input_grad", shape, g.dtype, g, k, stride, pad, dilation)


@_bilinear
def _kernel_grad(x, g, stride, pad, dilation, shape):
  return _call("kernel_grad", shape, x.dtype, x, g, stride, pad, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv(x_NHWC, kernel_KKC, stride, pad, dilation):
  """Depthwise convolution of x (N, H, W, C) with kernel (k, k, C), zero padding `pad`."""
  return _forward(x_NHWC, kernel_KKC, stride, pad, dilation, None)


def _depthwise_conv_fwd(x_NHWC, kernel_KKC, stride, pad, dilation):
  return _forward(x_NHWC, kernel_KKC, stride, pad, dilation, None), (x_NHWC, kernel_KKC)


def _depthwise_conv_bwd(stride, pad, dilation, residuals, g_NHWC):
  x_NHWC, kernel_KKC = residuals
  dx = _input_grad(g_NHWC, kernel_KKC, stride, pad, dilation, x_NHWC.shape)
  dk = _kernel_grad(x_NHWC, g_NHWC, stride, pad, dilation, kernel_KKC.shape)
  return dx, dk


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)
