r"""Where does first-order DARTS collapse on a CPU? A table of tried settings.

  python experiments/collapse_settings.py                      # every setting, seeds 0,1,2
  python experiments/collapse_settings.py --settings=s2_deep --seeds=0
  python experiments/collapse_settings.py --table_only         # the table from the results

Each setting is the default search config (configs/default.py) with the changes
listed in SETTINGS, searched with first-order DARTS. A run lives in
`--out/<setting>/seed<k>` (resumable; a finished run is not repeated) and its
raw result, the per-epoch collapse record and the final softmax weights of the
normal edges, goes to `--results/<setting>_seed<k>.json`. The table in
`--results/summary.md` and the figure `--results/skip_weight.png` are rebuilt
from those files alone.

A run collapses when, at the end of the search, at least 75% of the normal edges
have skip_connect as their strongest operation other than none (shared-alpha
spaces), or at least 75% of the normal edges of the cells after the second
reduction cell do (per-cell spaces: the paper fills the top of a deep supernet
with skips). A setting collapses when 2 of 3 seeds do. A run's time here is
written in its result; the settings were chosen to take at most about 30 minutes
each on a 2-core CPU.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

from amended_darts_jax import cli, metrics, rundir, search, spaces
from amended_darts_jax.configs import default

COLLAPSED = 0.75  # share of skip-led normal edges (or upper-third edges) that is a collapse

# name -> (what it tries, changes to configs/default.py). All first order.
SETTINGS = {
    "digits_s2_deep": (
        "s2 at 20 cells (the paper's depth), digits, arch lr 3e-3, 300 epochs",
        dict(space="s2", layers=20, init_channels=4, epochs=300, arch_lr=3e-3,
             eval_every_epochs=5)),
    "digits_s2_deep_fast": (
        "s2 at 20 cells, digits, arch lr 1e-2 (Adam's steps 3.3x longer), 300 epochs",
        dict(space="s2", layers=20, init_channels=4, epochs=300, arch_lr=1e-2,
             eval_every_epochs=5)),
    "digits_rdarts_s2": (
        "RobustDARTS S2 (skip, sep_conv_3x3; shared alphas), 5 cells, digits, arch lr 3e-3, "
        "200 epochs",
        dict(space="rdarts_s2", layers=5, epochs=200, arch_lr=3e-3)),
    "digits_rdarts_s2_long": (
        "RobustDARTS S2, 5 cells, digits, arch lr 3e-3, 600 epochs",
        dict(space="rdarts_s2", layers=5, epochs=600, arch_lr=3e-3, eval_every_epochs=5)),
    "digits_rdarts_s3": (
        "RobustDARTS S3 (none, skip, sep_conv_3x3), 5 cells, digits, arch lr 3e-3, 200 epochs",
        dict(space="rdarts_s3", layers=5, epochs=200, arch_lr=3e-3)),
    "digits_rdarts_s2_small_train": (
        "RobustDARTS S2, 5 cells, digits, 10% of the training split trains the weights (144 "
        "images; 90% validates), arch lr 3e-3, 1000 epochs of 2 steps",
        dict(space="rdarts_s2", layers=5, epochs=1000, arch_lr=3e-3, train_portion=0.1,
             eval_every_epochs=25)),
    "digits_rdarts_s1": (
        "RobustDARTS S1 (two preselected operations per edge, 12 of 14 normal edges offer "
        "skip), 5 cells, digits, arch lr 3e-3, 200 epochs",
        dict(space="rdarts_s1", layers=5, epochs=200, arch_lr=3e-3)),
    "mnist_rdarts_s2": (
        "RobustDARTS S2, 5 cells, 28x28 MNIST (5,000 images), arch lr 3e-3, 40 epochs",
        dict(dataset="mnist5k", space="rdarts_s2", layers=5, epochs=40, arch_lr=3e-3,
             crop_padding=2)),
    "digits_nb201": (
        "NAS-Bench-201's cell (shared alphas, none included), 6 cells at C=8, digits, the "
        "benchmark's weight step (Nesterov, decay 5e-4), arch lr 3e-3, 200 epochs",
        dict(space="nb201", layers=6, init_channels=8, epochs=200, arch_lr=3e-3, nesterov=True,
             weight_decay=5e-4, eval_every_epochs=5)),
    "digits_nb201_deep": (
        "NAS-Bench-201's cell, 15 cells (the benchmark's depth) at C=4, digits, Nesterov, "
        "decay 5e-4, arch lr 3e-3, 200 epochs",
        dict(space="nb201", layers=15, init_channels=4, epochs=200, arch_lr=3e-3, nesterov=True,
             weight_decay=5e-4, eval_every_epochs=5)),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_list("settings", list(SETTINGS), "Settings to run, by name.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per setting.")
  flags.DEFINE_string("out", "runs/collapse_settings", "Search workdirs.")
  flags.DEFINE_string("results", "experiments/results/collapse_settings",
                      "Raw results, the table and the figure.")
  flags.DEFINE_bool("table_only", False, "Rebuild the table and the figure; run nothing.")


def config_for(name: str, seed: int):
  cfg = default.get_config()
  cfg.update(SETTINGS[name][1])
  cfg.method, cfg.seed = "first_order", seed
  cfg.checkpoint_every = 1000
  return cfg


def result_of(workdir: str, name: str, seed: int, wall_s: float, compile_s: float) -> dict:
  """The small raw result of one finished run: its per-epoch record and final weights."""
  space = spaces.get_space(SETTINGS[name][1]["space"])
  keep = ("epoch", "step", "skip_dominated_edges", "normal_edges", "skip_weight",
          "strongest_weight", "none_weight", "upper_skip_dominated_edges",
          "upper_normal_edges", "eval_val_acc")
  epochs = [{k: r[k] for k in keep if k in r} for r in metrics.read(workdir, "epoch")]
  steps = metrics.read(workdir, "step")
  alphas = json.load(open(os.path.join(workdir, "alphas.json")))  # softmax weights
  return {"setting": name, "seed": seed, "what": SETTINGS[name][0],
          "changes": SETTINGS[name][1], "ops": list(space.ops), "wall_s": round(wall_s, 1),
          "compile_s": round(compile_s, 1), "final_train_acc": steps[-1]["train_acc"],
          "epochs": epochs, "final_weights": alphas,
          "genotype": json.load(open(os.path.join(workdir, "genotype.json")))}


def run_one(name: str, seed: int) -> None:
  path = os.path.join(FLAGS.results, f"{name}_seed{seed}.json")
  if os.path.exists(path):
    logging.info("%s seed %d: finished earlier, kept", name, seed)
    return
  workdir = os.path.join(FLAGS.out, name, f"seed{seed}")
  t0 = time.perf_counter()
  summary = search.run(config_for(name, seed), workdir)
  rundir.write_json(path, result_of(workdir, name, seed, time.perf_counter() - t0,
                                    summary["compile_s"]))


def collapsed(last: dict) -> bool:
  if "upper_normal_edges" in last:
    return last["upper_skip_dominated_edges"] >= COLLAPSED * last["upper_normal_edges"]
  return last["skip_dominated_edges"] >= COLLAPSED * last["normal_edges"]


def table(results_dir: str) -> str:
  runs = load(results_dir)
  lines = ["| setting | what | seed | skip-led normal edges | upper third | mean skip weight "
           "(first -> lowest (epoch) -> last) | mean none weight (first -> last) | strongest weight | "
           "supernet val acc | train acc | wall s | collapsed |",
           "| " + " | ".join(["---"] * 12) + " |"]
  verdicts = []
  for name in [n for n in SETTINGS if n in runs] + sorted(set(runs) - set(SETTINGS)):
    rs = runs[name]
    for r in rs:
      first, last = r["epochs"][0], r["epochs"][-1]
      low = min(r["epochs"], key=lambda e: e["skip_weight"])
      upper = (f"{last['upper_skip_dominated_edges']:.0f} of {last['upper_normal_edges']:.0f}"
               if "upper_normal_edges" in last else "-")
      acc = f"{last['eval_val_acc']:.3f}" if "eval_val_acc" in last else "-"
      none = (f"{first['none_weight']:.3f} -> {last['none_weight']:.3f}"
              if "none_weight" in last else "-")
      lines.append(
          f"| {name} | {r['what']} | {r['seed']} | {last['skip_dominated_edges']:.0f} of "
          f"{last['normal_edges']:.0f} | {upper} | {first['skip_weight']:.3f} -> "
          f"{low['skip_weight']:.3f} ({low['epoch']}) -> {last['skip_weight']:.3f} | {none} | {last['strongest_weight']:.3f} | {acc} | "
          f"{r['final_train_acc']:.3f} | {r['wall_s']:.0f} | "
          f"{'yes' if collapsed(last) else 'no'} |")
    k = sum(collapsed(r["epochs"][-1]) for r in rs)
    verdict = ""
    if len(rs) >= 3:
      verdict = " (the setting collapses)" if k >= 2 else " (the setting does not collapse)"
    verdicts.append(f"- `{name}`: {k} of {len(rs)} seeds collapsed{verdict}")
  return "\n".join(lines + [""] + verdicts)


def load(results_dir: str) -> dict[str, list[dict]]:
  runs = {}
  for f in sorted(os.listdir(results_dir)):
    if f.endswith(".json"):
      r = json.load(open(os.path.join(results_dir, f)))
      runs.setdefault(r["setting"], []).append(r)
  return {name: sorted(rs, key=lambda r: r["seed"]) for name, rs in runs.items()}


def figure(results_dir: str, path: str) -> None:
  """Per setting, the mean skip_connect weight and the share of skip-led normal edges
  (upper third for per-cell spaces) by epoch, one line per seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = load(results_dir)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for i, (name, rs) in enumerate(runs.items()):
    for r in rs:
      ep = [e["epoch"] for e in r["epochs"]]
      share = [(e["upper_skip_dominated_edges"] / e["upper_normal_edges"])
               if "upper_normal_edges" in e else e["skip_dominated_edges"] / e["normal_edges"]
               for e in r["epochs"]]
      kw = dict(color=f"C{i}", lw=1.2, label=name if r is rs[0] else None)
      axes[0].plot(ep, [e["skip_weight"] for e in r["epochs"]], **kw)
      axes[1].plot(ep, share, **kw)
  axes[0].set_title("mean weight of skip_connect (normal edges)", fontsize=10)
  axes[1].set_title("share of skip-led normal edges (per-cell: upper third)", fontsize=10)
  axes[1].axhline(COLLAPSED, color="k", ls=":", lw=1)
  for ax in axes:
    ax.set_xlabel("search epoch")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  unknown = [s for s in FLAGS.settings if s not in SETTINGS]
  if unknown:
    sys.exit(f"error: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    sys.exit(f"error: --seeds must be integers, got {','.join(FLAGS.seeds)}")
  os.makedirs(FLAGS.results, exist_ok=True)
  if not FLAGS.table_only:
    for seed in seeds:  # every setting once before any second seed
      for name in FLAGS.settings:
        cli.run_or_exit(lambda: run_one(name, seed))
  text = table(FLAGS.results)
  with open(os.path.join(FLAGS.results, "summary.md"), "w") as f:
    f.write("Rebuilt by `python experiments/collapse_settings.py --table_only`; criterion in "
            "the script's docstring.\n\n" + text + "\n")
  figure(FLAGS.results, os.path.join(FLAGS.results, "skip_weight.png"))
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.quiet_libraries()
  app.run(main)
