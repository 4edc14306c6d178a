"""Depthwise convolution and max pooling for XLA:CPU as C++ custom calls (`kernels.cc`).

XLA:CPU has no fast depthwise convolution (depthwise.py), and its max pooling and
that pooling's gradient (a window reduction that tracks indices, then a
scatter) are slow too. The kernels here make one pass over the activation
for each of the convolution's forward pass, input gradient and kernel
gradient, and for each of the pooling and its gradient, on XLA's own thread
pool. They are compiled on first use with the C++ compiler found on the
machine (`$CXX`, else `c++`/`g++`) against the XLA FFI headers that jaxlib
ships, and cached under `$AMENDED_DARTS_KERNEL_CACHE` (default
`~/.cache/amended_darts_jax/kernels`), keyed by the source, jaxlib's version
and the CPU. Without a compiler, or with `AMENDED_DARTS_CPU_KERNEL=0` in the
environment, `available()` is False and dispatch.py's "auto" keeps the pure-JAX
formulations (a failed build logs one warning saying why).

Derivatives. `depthwise_conv(x, k)` is a `jax.custom_vjp` whose backward pass
calls the input-gradient and kernel-gradient kernels. Each of the three kernels
is bilinear in its two operands, so each is a JAX primitive whose JVP,
f(a', b) + f(a, b'), is one call of itself on two operand pairs (the kernels
sum over pairs in one pass): forward-over-reverse products (`jax.jvp` of
`jax.grad`, what hypergrad.py computes) are exact, inside `lax.scan` too. As with
any `jax.custom_vjp`, forward mode on the convolution alone, outside a reverse
pass, is not defined. The same holds for `max_pool` (its kernels are linear in
their second operand).

Edge groups. Under the supernet's `vmap` over the edges that leave one state,
the first depthwise convolution of every `sep_conv` and `dil_conv` sees one
input and E kernels. `depthwise_conv_edges` turns that into one call over all
edges whose input gradient is summed inside the kernel; a plain `vmap` would
write E input gradients and sum them afterwards, which cost 16% of a
5-cell DARTS weight step (BUILD_NOTES.md).
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
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from amended_darts_jax.cpu.depthwise import out_size

SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
CACHE_ENV = "AMENDED_DARTS_KERNEL_CACHE"
SWITCH_ENV = "AMENDED_DARTS_CPU_KERNEL"  # "0": do not build or use the kernel
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_TARGETS = {"forward": "DepthwiseForward", "input_grad": "DepthwiseInputGrad",
            "kernel_grad": "DepthwiseKernelGrad", "max_gather": "MaxPoolGather",
            "max_scatter": "MaxPoolScatter"}
_PREFIX = "amended_darts_cpu_"
PRIMITIVE_PREFIX = _PREFIX  # the primitives' names (a checkpoint policy's test)

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
  return root / f"cpu_kernels_{key}.so"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def build(path: pathlib.Path, source: pathlib.Path = SOURCE) -> None:
  """Compiles `source` (by default this package's kernels.cc) into the library `path`."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written to a temporary name and renamed: a concurrent process never loads
  # a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-fno-math-errno", f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
      last = (out.stderr.strip().splitlines() or ["no message"])[-1]
      raise RuntimeError(f"{cxx} failed on {source.name} (exit status {out.returncode}): "
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
          build(path)
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


def _ffi(short, shape, dtype, *operands, **attributes):
  """One custom call of kernels.cc, its integer attributes as int64 (leading axes of
  the operands beyond the kernel's own are a batch of independent problems)."""
  return jax.ffi.ffi_call(_PREFIX + short, jax.ShapeDtypeStruct(shape, dtype))(
      *operands, **{name: np.int64(value) for name, value in attributes.items()})


def _primitive(short, jvp_rule):
  """kernels.cc's `short` as a JAX primitive, so that every transformation,
  partial evaluation inside `lax.scan` included, sees its derivative.

  (A `jax.custom_jvp` around the custom call loses its rule when a scan's body
  is partially evaluated for a reverse pass, and the forward pass over it then
  meets the bare call.) Parameters: `shape` and `dtype` of one result,
  `batch` the sizes of the leading axes that `vmap` added to every operand and
  the result (the custom call takes them as a batch of independent problems),
  and the kernel's integer attributes. `jvp_rule(prim)` is its JVP rule.
  """
  prim = jax.extend.core.Primitive(_PREFIX + short)
  prim.def_impl(lambda *operands, **params: jax.jit(
      functools.partial(prim.bind, **params))(*operands))
  prim.def_abstract_eval(lambda *operands, shape, dtype, batch, **attributes:
                         jax.core.ShapedArray((*batch, *shape), dtype))
  mlir.register_lowering(prim, mlir.lower_fun(
      lambda *operands, shape, dtype, batch, **attributes: _ffi(
          short, (*batch, *shape), dtype, *operands, **attributes), multiple_results=False),
      platform="cpu")

  def batch_rule(operands, dims, *, batch, **params):
    size = next(o.shape[d] for o, d in zip(operands, dims) if d is not None)
    operands = [jnp.broadcast_to(o, (size, *o.shape)) if d is None else jnp.moveaxis(o, d, 0)
                for o, d in zip(operands, dims)]
    return prim.bind(*operands, batch=(size, *batch), **params), 0

  batching.primitive_batchers[prim] = batch_rule
  ad.primitive_jvps[prim] = jvp_rule(prim)
  return prim


# The three bilinear kernels. Each takes its geometry (`shared`: E kernels on one
# input, kernels.cc; `shape`: the result's) and one or more operand pairs
# (a_t, b_t), and computes sum_t f(a_t, b_t) in one custom call. Its JVP is the
# product rule, sum_t f(a_t', b_t) + f(a_t, b_t'), again one call (of up to
# _MAX_TERMS pairs; more are split), so a tangent costs one pass over the
# activations rather than two calls and their sum. A zero tangent drops its pair.

_MAX_TERMS = 4  # kernels.cc's kMaxTerms


class _Geometry(NamedTuple):
  stride: int
  pad: int
  dilation: int
  shape: tuple | None
  shared: bool


def _bilinear_jvp(prim):
  def jvp(primals, tangents, **params):
    out = prim.bind(*primals, **params)
    pairs = []
    for a, b, ta, tb in zip(primals[::2], primals[1::2], tangents[::2], tangents[1::2]):
      if not isinstance(ta, ad.Zero):
        pairs += [ta, b]
      if not isinstance(tb, ad.Zero):
        pairs += [a, tb]
    parts = [prim.bind(*pairs[i:i + 2 * _MAX_TERMS], **params)
             for i in range(0, len(pairs), 2 * _MAX_TERMS)]
    return out, functools.reduce(jnp.add, parts) if parts else ad.Zero.from_primal_value(out)
  return jvp


_BILINEAR = {short: _primitive(short, _bilinear_jvp)
             for short in ("forward", "input_grad", "kernel_grad")}


def _call(short, shape, dtype, geometry, operands):
  return _BILINEAR[short].bind(*operands, shape=tuple(shape), dtype=np.dtype(dtype), batch=(),
                               stride=int(geometry.stride), pad=int(geometry.pad),
                               dilation=int(geometry.dilation), shared=bool(geometry.shared))


def _forward(geometry, x, k, *more):
  stride, pad, dilation = geometry.stride, geometry.pad, geometry.dilation
  n, h, w, c = x.shape
  kk = k.shape[-2]
  edges = k.shape[:1] if geometry.shared else ()  # k is (E, k, k, C) when shared, else (k, k, C)
  return _call("forward", (*edges, n, out_size(h, kk, stride, pad, dilation),
                           out_size(w, kk, stride, pad, dilation), c), x.dtype,
               geometry, (x, k, *more))


def _input_grad(geometry, g, k, *more):
  return _call("input_grad", geometry.shape, g.dtype, geometry, (g, k, *more))


def _kernel_grad(geometry, x, g, *more):
  return _call("kernel_grad", geometry.shape, x.dtype, geometry, (x, g, *more))


def _make_conv(shared: bool):
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def conv(x, kernel, stride, pad, dilation):
    return _forward(_Geometry(stride, pad, dilation, None, shared), x, kernel)

  def fwd(x, kernel, stride, pad, dilation):
    return _forward(_Geometry(stride, pad, dilation, None, shared), x, kernel), (x, kernel)

  def bwd(stride, pad, dilation, residuals, g):
    x, kernel = residuals
    return (_input_grad(_Geometry(stride, pad, dilation, x.shape, shared), g, kernel),
            _kernel_grad(_Geometry(stride, pad, dilation, kernel.shape, shared), x, g))

  conv.defvjp(fwd, bwd)
  return conv


depthwise_conv = _make_conv(shared=False)
depthwise_conv.__doc__ = """Depthwise convolution of x (N, H, W, C) with kernel (k, k, C), zero padding `pad`."""

depthwise_conv_shared = _make_conv(shared=True)
depthwise_conv_shared.__doc__ = """The edges' convolutions of one input: x (N, H, W, C), kernels (E, k, k, C) -> (E, N, Ho, Wo, C).

Its input gradient is summed over the edges inside the kernel, where
`jax.vmap(depthwise_conv, (None, 0))` writes E input gradients and then sums them.
"""


@functools.lru_cache(maxsize=None)
def _edge_conv(stride: int, pad: int, dilation: int):
  @jax.custom_batching.custom_vmap
  def conv(x, kernel):
    return depthwise_conv(x, kernel, stride, pad, dilation)

  @conv.def_vmap
  def rule(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if kernel_batched and not x_batched:
      return depthwise_conv_shared(x, kernel, stride, pad, dilation), True
    del axis_size
    return jax.vmap(lambda a, b: depthwise_conv(a, b, stride, pad, dilation),
                    in_axes=(0 if x_batched else None, 0 if kernel_batched else None))(
                        x, kernel), True

  return conv


def depthwise_conv_edges(x_NHWC, kernel_KKC, stride, pad, dilation):
  """`depthwise_conv` for a module under the edge group's `vmap` whose input the edges share.

  Under that vmap (input unbatched, kernel batched) it becomes `depthwise_conv_shared`.
  It must run under a vmap: `jax.custom_batching.custom_vmap`, which picks the
  form, has no reverse-mode rule of its own, so `jax.grad` works only when the
  vmap is applied inside it (as the supernet's EdgeGroup is).
  """
  return _edge_conv(int(stride), int(pad), int(dilation))(x_NHWC, kernel_KKC)


# Max pooling. gather(x, t) reads t at each window's first maximum of x, so the
# pooling is gather(x, x); scatter(x, g) is gather's transpose in t. Both are
# linear in their second operand and, the maxima being constant almost
# everywhere, have no derivative in x: the tangent of each is a call of itself
# on the second operand's tangent.

def _linear_in_second_jvp(prim):
  def jvp(primals, tangents, **params):
    x, t = primals
    out = prim.bind(x, t, **params)
    return out, (ad.Zero.from_primal_value(out) if isinstance(tangents[1], ad.Zero)
                 else prim.bind(x, tangents[1], **params))
  return jvp


_MAX = {short: _primitive(short, _linear_in_second_jvp) for short in ("max_gather", "max_scatter")}


def _max_gather(x, t, window, stride, pad):
  n, h, w, c = x.shape
  shape = (n, out_size(h, window, stride, pad), out_size(w, window, stride, pad), c)
  return _MAX["max_gather"].bind(x, t, shape=shape, dtype=np.dtype(x.dtype), batch=(),
                                 window=int(window), stride=int(stride), pad=int(pad))


def _max_scatter(x, g, window, stride, pad):
  return _MAX["max_scatter"].bind(x, g, shape=tuple(x.shape), dtype=np.dtype(x.dtype), batch=(),
                                  window=int(window), stride=int(stride), pad=int(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x_NHWC, window, stride, pad):
  """Max pooling of x (N, H, W, C) over window x window, padding that never wins.

  The gradient goes to each window's first maximum in row-major order (PyTorch's
  rule); forward-over-reverse products are exact (the gather and scatter above).
  """
  return _max_gather(x_NHWC, x_NHWC, window, stride, pad)


def _max_pool_fwd(x_NHWC, window, stride, pad):
  return _max_gather(x_NHWC, x_NHWC, window, stride, pad), x_NHWC


def _max_pool_bwd(window, stride, pad, x_NHWC, g_NHWC):
  return (_max_scatter(x_NHWC, g_NHWC, window, stride, pad),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
