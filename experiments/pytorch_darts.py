r"""Our search steps against the PyTorch DARTS code, side by side in one run.

  pip install torch==2.13.0        # not a dependency of the project
  python experiments/pytorch_darts.py --darts_dir=/path/to/darts/cnn --size=tiny_darts
  python experiments/pytorch_darts.py --darts_dir=/path/to/darts/cnn --size=darts_5 --steps=5

`--darts_dir` is the `cnn` folder of a checkout of quark0/darts (its
`model_search.py`, `architect.py`, `operations.py`, `genotypes.py`; nothing of
it is shipped here). Its code is written for PyTorch 0.3 on a GPU; the shims
are that `.cuda()` returns the tensor or module unchanged, so it runs on the
CPU as it is, and that below three cells (where every cell reduces and
`alphas_normal` goes unused) `torch.autograd.grad` returns zeros for unused
inputs and the unrolled copy of the second-order step starts its alphas with a
zero gradient, instead of failing on None.

Timed one step at a time, each framework in its own worker process (in one
process each slowed the other), the two taking turns round by round so that
both see the same machine load. In its turn a worker runs `--turn_warmup`
untimed steps of a variant right before the timed one, as steps follow each
other in a search; the first step after waiting out the other worker's turn
is slow on this VM for a reason outside either framework (memory the host took
back meanwhile; BUILD_NOTES.md, "Performance on XLA:CPU"). The
steps:
- PyTorch, DARTS' own steps: `weight` (train_search.py's weight step: forward,
  backward, clip the gradient norm at 5, SGD with momentum), `first_order` and
  `second_order` (`Architect.step` with `unrolled` false / true), and
  `amended_fd`, the amended architecture step with finite differences written
  on top of DARTS' model: g1 and v = dLval/dw from one backward pass,
  u = (H + wd I) v by central differences of dLtrain/dw with DARTS' step
  0.01 / |v|, then M u by DARTS' own `Architect._hessian_vector_product`
  (central differences of dLtrain/dalpha, step 0.01 / |u|), and Adam on
  g1 - eta M u.
- JAX, ours (`common.step_fn`, as `benchmark.py` times them): `weight_only`, and
  the full search step (architecture and weight step together) of each
  method in `--methods`.

Prints the parameter count of both networks (they must agree: the same
construction), the median step times and two ratios: our weight step
against DARTS', and our full step against DARTS' architecture step plus its
weight step. Writes `results.json` under `--out`.
"""

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from absl import app, flags

import common
from common import SIZES

_DARTS_DIR = flags.DEFINE_string("darts_dir", "", "The cnn/ folder of a quark0/darts checkout.")
_SIZE = flags.DEFINE_enum("size", "tiny_darts", [s for s in SIZES if SIZES[s]["space"] == "darts"],
                          "Named network and batch size (a `darts` space one).")
_METHODS = flags.DEFINE_list("methods", ["weight_only", "first_order", "amended/exact",
                                         "amended/fd"], "Our steps to time beside DARTS'.")
_TORCH_STEPS = flags.DEFINE_list("torch_steps", ["weight", "first_order", "second_order",
                                                 "amended_fd"], "DARTS' steps to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed rounds (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed rounds after compiling.")
_TURN_WARMUP = flags.DEFINE_integer(
    "turn_warmup", 1, "Untimed steps of each variant just before its timed step in every "
    "round, so that every timed step follows a step the way it does in a search. After a "
    "worker has waited out the other's turn, its first step runs on memory the machine took "
    "back meanwhile (BUILD_NOTES.md, 'Performance on XLA:CPU').")
_THREADS = flags.DEFINE_integer("threads", 2, "PyTorch's intra-op threads.")
_OUT = flags.DEFINE_string("out", "runs/pytorch_darts", "Output directory.")
_WORKER = flags.DEFINE_enum("worker", "", ["", "jax", "torch"], "Internal: run one framework's "
                            "steps for the driver.")

TORCH_STEPS = ("weight", "first_order", "second_order", "amended_fd")


def _import_darts(darts_dir: str):
  """(torch, model_search, architect) from the checkout, with `.cuda()` a no-op."""
  try:
    import torch
  except ImportError:
    sys.exit("error: PyTorch is not installed; `pip install torch==2.13.0` (CPU) first.")
  missing = [f for f in ("model_search.py", "architect.py", "operations.py", "genotypes.py")
             if not os.path.isfile(os.path.join(darts_dir, f))]
  if not darts_dir or missing:
    sys.exit(f"error: --darts_dir={darts_dir!r} is not the cnn/ folder of a quark0/darts "
             f"checkout (missing {', '.join(missing) or 'the flag'}).")
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.nn.Module.cuda = lambda self, *args, **kwargs: self
  # Below three cells every cell is a reduction cell, so alphas_normal is unused and
  # DARTS' torch.autograd.grad calls fail; zeros for unused inputs let them run.
  torch.autograd.grad = functools.partial(torch.autograd.grad, allow_unused=True,
                                          materialize_grads=True)
  sys.path.insert(0, darts_dir)
  import architect  # noqa: E402  (DARTS' modules import each other by bare name)
  import model_search
  # The same for `.backward()`, which DARTS' second-order step calls on its unrolled
  # copy (`Network.new`) and then reads every alpha's `.grad`: an unused alpha's is None
  # there. Each copy's alphas start with a zero gradient instead, to which backward adds.
  new = model_search.Network.new

  def new_with_zero_alpha_grads(self):
    model = new(self)
    for a in model.arch_parameters():
      a.grad = torch.zeros_like(a)
    return model

  model_search.Network.new = new_with_zero_alpha_grads
  return torch, model_search, architect


class _TorchSearch:
  """DARTS' network, weight optimizer and Architect with DARTS' default arguments."""

  def __init__(self, torch, model_search, architect, cfg, size, seed=0):
    self.torch = torch
    torch.manual_seed(seed)
    criterion = torch.nn.CrossEntropyLoss()
    self.model = model_search.Network(size["C"], size["classes"], size["layers"], criterion)
    self.optimizer = torch.optim.SGD(self.model.parameters(), cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)

    class Args:
      momentum, weight_decay = cfg.momentum, cfg.weight_decay
      arch_learning_rate, arch_weight_decay = cfg.arch_lr, cfg.arch_weight_decay

    self.architect = architect.Architect(self.model, Args)
    self.cfg = cfg
    gen = torch.Generator().manual_seed(seed)
    shape = (size["batch"], size["image"][2], size["image"][0], size["image"][1])
    self.xt, self.xv = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    self.yt = torch.randint(0, size["classes"], (size["batch"],), generator=gen)
    self.yv = torch.randint(0, size["classes"], (size["batch"],), generator=gen)

  def param_count(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def weight(self):
    self.model.train()
    self.optimizer.zero_grad()
    loss = self.model._loss(self.xt, self.yt)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
    self.optimizer.step()

  def first_order(self):
    self.architect.step(self.xt, self.yt, self.xv, self.yv, self.cfg.lr, self.optimizer,
                        unrolled=False)

  def second_order(self):
    self.architect.step(self.xt, self.yt, self.xv, self.yv, self.cfg.lr, self.optimizer,
                        unrolled=True)

  def amended_fd(self):
    """alpha <- Adam(g1 - eta M (H + wd I) v), both products by central differences."""
    torch, model, cfg = self.torch, self.model, self.cfg
    params, alphas = list(model.parameters()), model.arch_parameters()
    self.architect.optimizer.zero_grad()
    grads = torch.autograd.grad(model._loss(self.xv, self.yv), alphas + params)
    g1, v = grads[:len(alphas)], [g.detach() for g in grads[len(alphas):]]
    eps = cfg.fd_r / torch.cat([x.reshape(-1) for x in v]).norm()

    def train_grad_w(scale):
      with torch.no_grad():
        for p, d in zip(params, v):
          p.add_(d, alpha=float(scale))
      g = torch.autograd.grad(model._loss(self.xt, self.yt), params)
      with torch.no_grad():
        for p, d in zip(params, v):
          p.sub_(d, alpha=float(scale))
      return g

    plus, minus = train_grad_w(eps), train_grad_w(-eps)
    u = [(a - b) / (2 * eps) + cfg.weight_decay * d for a, b, d in zip(plus, minus, v)]
    # DARTS' own product at the model's weights: (vector, input, target, r).
    mu = self.architect._hessian_vector_product(u, self.xt, self.yt, r=cfg.fd_r)
    for a, g, m in zip(alphas, g1, mu):
      a.grad = (g - cfg.eta * m).detach()
    self.architect.optimizer.step()  # unclipped, as DARTS' Architect.step and the paper


def _jax_timers() -> tuple[dict, dict, int]:
  """({name: one step}, {name: compile row}, parameter count) of our steps."""
  import jax

  timers, rows, params = {}, {}, 0
  for spec in _METHODS.value:
    *_, state, batch, step = common.setup_step(_SIZE.value, spec)
    train_batch, val_batch = batch(), batch()
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, train_batch, val_batch).compile()
    rows[f"jax {spec}"] = {"compile_s": round(time.perf_counter() - t0, 1)}
    params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    box = {"state": state}

    def run(compiled=compiled, box=box, train_batch=train_batch, val_batch=val_batch):
      box["state"], _ = compiled(box["state"], train_batch, val_batch)
      jax.block_until_ready(box["state"])

    timers[f"jax {spec}"] = run
  return timers, rows, params


def _torch_timers() -> tuple[dict, dict, int]:
  """({name: one step}, {name: {}}, parameter count) of DARTS' steps."""
  from amended_darts_jax.configs import default

  torch, model_search, architect = _import_darts(_DARTS_DIR.value)
  # DARTS' PyTorch 0.3 calls (add_(scalar, tensor), clip_grad_norm) warn on every step.
  warnings.filterwarnings("ignore", category=UserWarning)
  warnings.filterwarnings("ignore", category=FutureWarning)
  torch.set_num_threads(_THREADS.value)
  ts = _TorchSearch(torch, model_search, architect, default.get_config(), SIZES[_SIZE.value])
  timers = {f"torch {name}": getattr(ts, name) for name in _TORCH_STEPS.value}
  return timers, {name: {"version": torch.__version__} for name in timers}, ts.param_count()


def _worker(framework: str) -> None:
  """Sets up one framework's steps, says READY, then times one step of each per ROUND line."""
  timers, rows, params = (_jax_timers if framework == "jax" else _torch_timers)()
  print("READY " + json.dumps({"rows": rows, "params": params}), flush=True)
  for line in sys.stdin:
    if line.strip() != "ROUND":
      break
    times = {}
    for name, fn in timers.items():
      for _ in range(_TURN_WARMUP.value):
        fn()
      t0, sys0 = time.perf_counter(), os.times().system
      fn()
      # Wall seconds, and the kernel's CPU seconds in this process (page faults, zeroing).
      times[name] = [time.perf_counter() - t0, os.times().system - sys0]
    print("TIMES " + json.dumps(times), flush=True)


def _reply(proc, tag: str) -> dict:
  for line in proc.stdout:
    if line.startswith(tag + " "):
      return json.loads(line[len(tag) + 1:])
  code = proc.wait()
  proc.stderr_file.seek(0)
  lines = [line.strip() for line in proc.stderr_file.read().splitlines() if line.strip()]
  # The exception's own line, not the notes JAX prints after a traceback.
  raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
  lines = raised or lines
  why = (f"its last words: {lines[-1]}" if lines else
         "it said nothing (killed by the system, e.g. for memory)" if code < 0 else
         "it said nothing")
  sys.exit(f"error: the {proc.args[-1].removeprefix('--worker=')} worker ended with code "
           f"{code} before its {tag.lower()} reply; {why}")


def main(argv):
  del argv
  import jax
  import numpy as np

  if _WORKER.value:
    _worker(_WORKER.value)
    return
  unknown = [s for s in _TORCH_STEPS.value if s not in TORCH_STEPS]
  if unknown:
    sys.exit(f"error: unknown --torch_steps {', '.join(unknown)}; known: {', '.join(TORCH_STEPS)}")
  if _TURN_WARMUP.value < 0 or _STEPS.value < 1:
    sys.exit(f"error: --turn_warmup must be 0 or more and --steps 1 or more, got "
             f"{_TURN_WARMUP.value} and {_STEPS.value}")
  # Exits with one sentence if torch or the checkout is missing.
  torch, _, _ = _import_darts(_DARTS_DIR.value)

  # One process per framework, so that neither's thread pool or allocator slows the
  # other; they take turns, one round each, so both see the same machine load.
  procs, rows, params = {}, {}, {}
  for framework in ("jax", "torch"):
    # Its stderr goes to a file that `_reply` reads back if the worker dies.
    stderr = tempfile.TemporaryFile("w+")
    procs[framework] = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--worker={framework}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    procs[framework].stderr_file = stderr
    ready = _reply(procs[framework], "READY")
    rows.update(ready["rows"])
    params[framework] = ready["params"]
    print(f"{framework} ready: {json.dumps(ready['rows'])}", flush=True)
  print(f"parameters: ours {params['jax']:,}, DARTS' {params['torch']:,}", flush=True)
  times = {name: [] for name in rows}
  system = {name: [] for name in rows}
  for round_ in range(_WARMUP.value + _STEPS.value):
    for proc in procs.values():
      proc.stdin.write("ROUND\n")
      proc.stdin.flush()
      for name, (seconds, sys_seconds) in _reply(proc, "TIMES").items():
        if round_ >= _WARMUP.value:
          times[name].append(seconds)
          system[name].append(sys_seconds)
  for proc in procs.values():
    proc.stdin.close()
    proc.wait()
  for name in rows:
    rows[name]["median_step_s"] = round(statistics.median(times[name]), 4)
    rows[name]["min_step_s"] = round(min(times[name]), 4)
    rows[name]["median_system_s"] = round(statistics.median(system[name]), 3)

  med = {name: row["median_step_s"] for name, row in rows.items()}
  ratios = {}
  if "jax weight_only" in med and "torch weight" in med:
    ratios["ours weight / DARTS weight"] = med["jax weight_only"] / med["torch weight"]
  for ours, theirs in (("first_order", "first_order"), ("amended/exact", "amended_fd"),
                       ("amended/fd", "amended_fd"), ("darts/exact", "second_order"),
                       ("darts/fd", "second_order")):
    if f"jax {ours}" in med and f"torch {theirs}" in med and "torch weight" in med:
      ratios[f"ours {ours} step / DARTS {theirs} + weight"] = (
          med[f"jax {ours}"] / (med[f"torch {theirs}"] + med["torch weight"]))
  print(f"size {_SIZE.value}: {json.dumps(SIZES[_SIZE.value])}; torch {torch.__version__} "
        f"on {_THREADS.value} threads; jax {jax.__version__}")
  print("| step | compile s | median s | min s | median system s |\n"
        "| --- | --- | --- | --- | --- |")
  for name, row in rows.items():
    print(f"| {name} | {row.get('compile_s', '')} | {row['median_step_s']} | "
          f"{row['min_step_s']} | {row['median_system_s']} |")
  for name, value in ratios.items():
    print(f"{name} = {value:.3f}")
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump({"size": _SIZE.value, "argv": sys.argv[1:], "params": {
        "ours": params["jax"], "darts": params["torch"]}, "rows": rows,
        "ratios": ratios, "torch": torch.__version__, "jax": jax.__version__,
        "numpy": np.__version__}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
