r"""Does the amended term prevent the collapse into skip-connections?

  python experiments/collapse.py --out=runs/collapse
  python experiments/collapse.py --out=runs/collapse_s1 \
      --config=amended_darts_jax/configs/s1.py --config.epochs=50      # CIFAR-10, GPU

Runs the library's search once per setting, first-order DARTS and the amended
gradient with each `--etas` value (eta = 0 computes the products and drops
them: it must follow the first-order trajectory), all from one config (default:
the embedded digits, s2 space, 5 cells; `--config.FIELD=VALUE` overrides any
field for every run). Each run lives in `--out/<setting>` with its metrics,
genotype and cell pictures, and resumes if started again; a finished run is
not repeated. Then draws the paper's Figure 1 for all settings together
(per epoch: mean weight of `none` where the space has it, normal edges whose
strongest operation is skip_connect, supernet validation accuracy) into
`figure1.png` and writes `summary.md`.
"""

import copy
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from amended_darts_jax import cli, metrics, rundir, search

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(search.__file__)), "configs",
                           "default.py"), "Search config shared by all runs.")
_ETAS = flags.DEFINE_list("etas", ["0", "0.01", "0.1", "1"], "Amended runs, one per eta.")
_FIRST_ORDER = flags.DEFINE_bool("first_order", True, "Also run first-order DARTS.")
_OUT = flags.DEFINE_string("out", "runs/collapse", "Output directory.")


def settings() -> list[tuple[str, dict]]:
  runs = [("first_order", dict(method="first_order"))] if _FIRST_ORDER.value else []
  for eta in _ETAS.value:
    runs.append((f"amended_eta{float(eta):g}", dict(method="amended", eta=float(eta))))
  return runs


def run_all() -> list[dict]:
  results = []
  for name, changes in settings():
    workdir = os.path.join(_OUT.value, name)
    done_path = os.path.join(workdir, "collapse_run.json")
    if os.path.exists(done_path):
      with open(done_path) as f:
        results.append(json.load(f))
      logging.info("%s: finished earlier, kept", name)
      continue
    cfg = copy.deepcopy(_CONFIG.value)
    with cfg.unlocked():
      cfg.update(changes)
    logging.info("%s: searching in %s", name, workdir)
    t0 = time.perf_counter()
    summary = search.run(cfg, workdir)
    result = dict(setting=name, **changes, wall_s=time.perf_counter() - t0,
                  compile_s=summary["compile_s"], genotype=summary["genotype"])
    rundir.write_json(done_path, result)  # atomic: a killed sweep reruns this setting
    results.append(result)
  return results


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = {r["setting"]: metrics.read(os.path.join(_OUT.value, r["setting"]), "epoch")
             for r in results}
  panels = [("none_weight", "mean weight of none"),
            ("skip_dominated_edges", "normal edges dominated by skip_connect"),
            ("eval_val_acc", "supernet validation accuracy")]
  panels = [p for p in panels if any(p[0] in x for recs in records.values() for x in recs)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
  for ax, (key, title) in zip(axes[0], panels):
    for name, recs in records.items():
      sel = [x for x in recs if key in x]
      ax.plot([x["epoch"] for x in sel], [x[key] for x in sel], marker="o", ms=2.5,
              label=name, linestyle="--" if name == "first_order" else "-")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("search epoch")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary(results) -> str:
  lines = ["| setting | epochs | skip-dominated normal edges (first epoch -> last) | "
           "none weight (last) | supernet val acc (last) | compile s | wall s | cells |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    recs = metrics.read(os.path.join(_OUT.value, r["setting"]), "epoch")
    first, last = recs[0], recs[-1]
    none = f"{last['none_weight']:.3f}" if "none_weight" in last else "(no none op)"
    acc = f"{last['eval_val_acc']:.4f}" if "eval_val_acc" in last else "-"
    lines.append(
        f"| {r['setting']} | {last['epoch']} | {first['skip_dominated_edges']:.0f} -> "
        f"{last['skip_dominated_edges']:.0f} of {last['normal_edges']:.0f} | {none} | {acc} | "
        f"{r['compile_s']:.0f} | {r['wall_s']:.0f} | {r['setting']}/cells.png |")
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    [float(eta) for eta in _ETAS.value]
  except ValueError:
    sys.exit(f"error: --etas must be numbers, got {','.join(_ETAS.value)}")
  os.makedirs(_OUT.value, exist_ok=True)
  results = cli.run_or_exit(run_all)
  plot(results, os.path.join(_OUT.value, "figure1.png"))
  table = summary(results)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(f"command: `python experiments/collapse.py {' '.join(sys.argv[1:])}`\n\n"
            f"{table}\n")
  print(table)


if __name__ == "__main__":
  cli.quiet_libraries()
  app.run(main)
