r"""This tree's C++ depthwise kernels against another version of `kernels.cc`, interleaved.

  git show REV:amended_darts_jax/cpu/kernels.cc > runs/other_kernels.cc
  python experiments/kernel_ab.py --other=runs/other_kernels.cc [--rounds=60]

Builds the other source into its own library (cached beside this tree's, keyed
by its text), registers its three depthwise calls under other names, and times
each call of both versions on the same operands in interleaved rounds, the
order alternating from round to round, at stride 1 and padding 1 with a 3x3
kernel: the edge-group shapes of the default search's supernet (batch 64; 8x8,
4x4 and 2x2 maps at 8, 16 and 32 channels; 4 edges sharing an input where a
group has them) and two of DARTS' CIFAR networks. Prints, per call and shape,
the median time of each and the ratio this / other, after checking that both
give the same result to float32 rounding (relative to the largest entry). Kernel calls only: what a change
costs a whole step is `benchmark.py`'s to say.
"""

import pathlib
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from amended_darts_jax.cpu import kernels

_OTHER = flags.DEFINE_string("other", None, "The other version of kernels.cc.")
_ROUNDS = flags.DEFINE_integer("rounds", 60, "Timed rounds.")
_CALLS = flags.DEFINE_list("calls", ["forward", "input_grad", "kernel_grad"], "Which calls.")

# (images, map side, channels, edges sharing the input)
SHAPES = ((64, 8, 8, 4), (64, 4, 16, 4), (64, 2, 32, 1), (64, 8, 8, 1), (96, 32, 36, 1),
          (32, 16, 32, 4))
_SYMBOLS = {"forward": "DepthwiseForward", "input_grad": "DepthwiseInputGrad",
            "kernel_grad": "DepthwiseKernelGrad"}


def _register_other(source: pathlib.Path) -> str:
  """Builds `source` and registers its calls as other_<call>; returns the prefix."""
  import ctypes
  import hashlib
  path = kernels.library_path().with_name(
      f"other_{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}.so")
  if not path.exists():
    kernels.build(path, source)
  lib = ctypes.cdll.LoadLibrary(str(path))
  for call, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(f"other_{call}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  return "other_"


def _operands(call, n, side, c, edges):
  shared = edges > 1
  key = jax.random.split(jax.random.PRNGKey(n * side + c), 2)
  x = jax.random.normal(key[0], (n, side, side, c))
  e = (edges,) if shared else ()
  k = jax.random.normal(key[1], (*e, 3, 3, c))
  gy = jax.random.normal(key[1], (*e, n, side, side, c))
  a, b, out = {"forward": (x, k, gy.shape), "input_grad": (gy, k, x.shape),
               "kernel_grad": (x, gy, k.shape)}[call]
  return a, b, jax.ShapeDtypeStruct(out, np.float32), shared


def _fn(target, out, shared):
  return jax.jit(lambda a, b: jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")(
      a, b, stride=np.int64(1), pad=np.int64(1), dilation=np.int64(1), shared=np.int64(shared)))


def main(argv):
  del argv
  if not kernels.available():
    raise SystemExit(f"error: the C++ kernels are not available: {kernels.why_unavailable()}")
  if not _OTHER.value or not pathlib.Path(_OTHER.value).is_file():
    raise SystemExit("error: --other must name a kernels.cc to compare with")
  other = _register_other(pathlib.Path(_OTHER.value))
  print("| call | images, map, channels, edges | this, us | other, us | this / other |")
  print("| --- | --- | --- | --- | --- |")
  for call in _CALLS.value:
    for n, side, c, edges in SHAPES:
      a, b, out, shared = _operands(call, n, side, c, edges)
      fns = {"this": _fn(f"amended_darts_cpu_{call}", out, shared),
             "other": _fn(f"{other}{call}", out, shared)}
      mine, theirs = np.asarray(fns["this"](a, b)), np.asarray(fns["other"](a, b))
      # Sums of many float32 products in other orders: rounding relative to the largest sum.
      np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
      reps = max(1, int(2e6 / (n * side * side * c)))
      times = {name: [] for name in fns}
      for r in range(_ROUNDS.value):
        for name in (("this", "other") if r % 2 else ("other", "this")):
          t0 = time.perf_counter()
          for _ in range(reps):
            y = fns[name](a, b)
          y.block_until_ready()
          times[name].append((time.perf_counter() - t0) / reps)
      this, that = statistics.median(times["this"]), statistics.median(times["other"])
      print(f"| {call} | {n}, {side}x{side}, {c}, {edges} | {this * 1e6:.1f} | {that * 1e6:.1f} "
            f"| {this / that:.3f} |")


if __name__ == "__main__":
  flags.mark_flag_as_required("other")
  app.run(main)
