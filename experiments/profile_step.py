r"""Where the time of a search step goes: its parts timed side by side in one run.

  python experiments/profile_step.py --size=tiny --rounds=30

Jits each part of the amended and first-order steps on the same synthetic
batches of a named size (`experiments/common.py`) and times them in
interleaved rounds (one call of every part per round, in a shuffled order, so
machine noise hits all alike), reporting the median per part and its ratio to one training
forward+backward (`grad_w`). Parts:

  forward         the training loss alone
  grad_w          dLt/dw (the weight step's gradient)
  grad_wa         dLv/d(w, a) (what every method spends on the validation batch)
  grad_a          dLv/da alone
  jvp_grad_w      dLt/dw and (H + wd I) v in one jvp
  jvp_grad_a      M u in one jvp
  amended_2jvp    the amended term by two jvps, dLt/dw and H v, then M H v (an
                  alternative, not used: it repeats the primal pass)
  amended_linear  the same as the library computes it, one `jax.linearize` of
                  grad(Lt) over (w, a) and two evaluations of its tangent map
  amended_fd      the amended term by central differences, plus dLt/dw
  step_first_order, step_amended_exact, step_amended_fd: whole search steps

With `--edge_groups=true,false` every part is built for both cell layouts
(edge groups, one op per edge; `supernet.py`), with `--remat=false,true` with
and without per-cell rematerialization, and all are timed in the same
interleaved rounds, named e.g. `part@grouped` and `part@per_edge` or
`part@remat`; the unit is then the `grad_w` of the same variant. The table
also gives XLA's temporary buffers of each part (`memory_analysis()`).

Writes `profile.jsonl` and `profile.md` under `--out`.
"""

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import dataclasses
import functools
import itertools
import json
import os
import random
import statistics
import sys
import time

from absl import app, flags
import jax

import common
from amended_darts_jax import hypergrad as hg
from amended_darts_jax import search

_SIZE = flags.DEFINE_enum("size", "tiny", list(common.SIZES), "Named network and batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed rounds (median reported).")
_PARTS = flags.DEFINE_list("parts", [], "Parts to time (default: all).")
_DEPTHWISE = flags.DEFINE_string("conv_pool_impl", "auto", "auto | conv | kernel | shift | dense.")
_BATCH_EDGES = flags.DEFINE_list("edge_groups", ["true"], "Cell layouts: true (edge groups), "
                                 "false (one op per edge) or both.")
_REMAT = flags.DEFINE_list("remat", ["false"], "Rematerialize per cell: false, true or both.")
_SPACE = flags.DEFINE_string("space", "", "Override the size's space.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Override the size's number of cells (0: keep).")
_OUT = flags.DEFINE_string("out", "runs/profile", "Output directory.")


def _parts(sc, cfg):
  loss = functools.partial(search.supernet_loss, sc.model)
  plain = lambda w, a, b: loss(w, a, b)[0]
  wd, eta, r = cfg.weight_decay, cfg.eta, cfg.fd_r

  def with_stats(fn):
    def part(state, train_b, val_b):
      train = {**train_b, "batch_stats": state.batch_stats}
      val = {**val_b, "batch_stats": state.batch_stats}
      return fn(state.params, state.alpha, train, val)
    return part

  def v_of(w, a, val):
    return jax.grad(plain)(w, a, val)

  def two_jvps(w, a, t, val):  # the alternative: each product its own jvp
    g_w, u, _ = hg.grad_and_hvp(plain, w, a, t, v_of(w, a, val), weight_decay=wd)
    return g_w, hg.tree_scale(-eta, hg.mixed_vp(plain, w, a, t, u))

  def linearized(w, a, t, val):  # what the library does (hypergrad.arch_gradient, amended)
    g_w, tangent, _ = hg.linearized_grad(plain, w, a, t)
    v = v_of(w, a, val)
    u = hg.tree_axpy(wd, v, tangent(v)[0])
    return g_w, hg.tree_scale(-eta, tangent(u)[1])

  def fd(w, a, t, val):
    g2 = hg.amended_term(plain, w, a, t, v_of(w, a, val), eta=eta, weight_decay=wd,
                         products="fd", r=r)
    return jax.grad(plain)(w, a, t), g2

  parts = {
      "forward": lambda w, a, t, val: plain(w, a, t),
      "grad_w": lambda w, a, t, val: jax.grad(plain)(w, a, t),
      "grad_wa": lambda w, a, t, val: jax.grad(plain, (0, 1))(w, a, val),
      "grad_a": lambda w, a, t, val: jax.grad(plain, 1)(w, a, val),
      "jvp_grad_w": lambda w, a, t, val: hg.grad_and_hvp(plain, w, a, t, w, weight_decay=wd)[:2],
      "jvp_grad_a": lambda w, a, t, val: hg.mixed_vp(plain, w, a, t, w),
      "amended_2jvp": two_jvps,
      "amended_linear": linearized,
      "amended_fd": fd,
  }
  return {name: with_stats(fn) for name, fn in parts.items()}


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  layouts = common.switches("edge_groups", _BATCH_EDGES.value)
  remats = common.switches("remat", _REMAT.value)
  parts, inputs, unit_of = {}, {}, {}
  for edges, remat in itertools.product(layouts, remats):
    size, cfg, sc, state, make_batch = common.setup(
        _SIZE.value, conv_pool_impl=_DEPTHWISE.value, space=_SPACE.value, layers=_LAYERS.value,
        edge_groups=edges, remat=remat)
    train_b, val_b = make_batch(), make_batch()
    these = _parts(sc, cfg)
    for method, products in (("first_order", "exact"), ("amended", "exact"), ("amended", "fd")):
      step_sc = dataclasses.replace(sc, method=method, products=products)
      these[f"step_{method}_{products}" if method == "amended" else f"step_{method}"] = (
          lambda s, t, v, step_sc=step_sc: search.search_step(step_sc, s, t, v))
    suffix = ((f"@{'grouped' if edges else 'per_edge'}" if len(layouts) > 1 else "")
              + (f"@{'remat' if remat else 'no_remat'}" if len(remats) > 1 else ""))
    for name, fn in these.items():
      if not _PARTS.value or name in _PARTS.value:
        parts[name + suffix] = fn
        inputs[name + suffix] = (state, train_b, val_b)
        unit_of[name + suffix] = "grad_w" + suffix
  unknown = [p for p in _PARTS.value if p not in these]
  if unknown:
    sys.exit(f"error: unknown parts {unknown}; known: {', '.join(these)}")
  chosen = list(parts)

  compiled, compile_s, temp_mb = {}, {}, {}
  for name in chosen:
    t0 = time.perf_counter()
    compiled[name] = jax.jit(parts[name]).lower(*inputs[name]).compile()
    compile_s[name] = time.perf_counter() - t0
    temp_mb[name] = getattr(compiled[name].memory_analysis(), "temp_size_in_bytes", 0) / 2**20
    jax.block_until_ready(compiled[name](*inputs[name]))  # warm-up
    print(f"compiled {name} in {compile_s[name]:.1f} s", flush=True)
  times = {name: [] for name in chosen}
  order = list(chosen)
  shuffle = random.Random(0).shuffle
  for _ in range(_ROUNDS.value):
    shuffle(order)  # no part always follows the same one
    for name in order:
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](*inputs[name]))
      times[name].append(time.perf_counter() - t0)
  rows = []
  for name in chosen:
    med = statistics.median(times[name])
    unit = statistics.median(times[unit_of[name]]) if unit_of[name] in times else None
    rows.append(dict(size=_SIZE.value, part=name, median_ms=round(1e3 * med, 3),
                     per_grad_w=round(med / unit, 3) if unit else None,
                     compile_s=round(compile_s[name], 2), xla_temp_mb=round(temp_mb[name], 1),
                     rounds=_ROUNDS.value,
                     device=jax.devices()[0].device_kind))
  with open(os.path.join(_OUT.value, "profile.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  lines = [f"size `{_SIZE.value}`, command: `python experiments/profile_step.py "
           f"{' '.join(sys.argv[1:])}`", "",
           "| part | median ms | / grad_w | compile s | XLA temp MB |",
           "| --- | --- | --- | --- | --- |"]
  lines += [f"| {r['part']} | {r['median_ms']} | {r['per_grad_w']} | {r['compile_s']} | "
            f"{r['xla_temp_mb']} |" for r in rows]
  table = "\n".join(lines)
  with open(os.path.join(_OUT.value, "profile.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
