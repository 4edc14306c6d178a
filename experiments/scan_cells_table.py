r"""The tables of `scan_cells.sh`'s results: program size, compile and step time by depth.

  python experiments/scan_cells_table.py experiments/results/scan_cells

Prints markdown: one row per measurement, then each 20-cell figure over the
8-cell one (the targets: program ops at most 1.3x, compile at most 1.5x) and the
scanned 20-cell step over the unscanned one.
"""

import glob
import json
import os
import sys

from amended_darts_jax import networks


def _rows(out):
  rows = []
  for path in sorted(glob.glob(os.path.join(out, "search_*", "results.jsonl"))):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if "error" in r:
          sys.exit(f"error: {path} has a failed measurement: {r['error']}")
        step = "weight step" if r["method"] == "weight_only" else f"{r['method']} {r['products']}"
        rows.append(dict(what=f"search `{r['size']}`, {step}", layers=r["layers"],
                         scan=r["scan_cells"], ops=r["program_ops"], compile_s=r["compile_s"],
                         step_s=r["median_step_s"], temp_mb=r["xla_temp_mb"]))
  with open(os.path.join(out, "train.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows.append(dict(what=f"retraining {r['genotype']}, C={r['C']}, batch {r['batch']}",
                       layers=r["layers"], scan=r["scan_cells"], ops=r["program_ops"],
                       compile_s=r["compile_s"], step_s=r["median_step_s"], temp_mb=None))
  return rows


def table(out):
  rows = _rows(out)
  lines = ["| network and step | cells | scan | program ops | compile s | median step s "
           "| XLA temp MB |", "|" + " --- |" * 7]
  for r in rows:
    scan = ("yes" if r["scan"] else "no") if networks.cell_runs(r["layers"]) else "nothing to scan"
    lines.append(f"| {r['what']} | {r['layers']} | {scan} | {r['ops']} "
                 f"| {r['compile_s']} | {r['step_s']} | "
                 f"{'' if r['temp_mb'] is None else r['temp_mb']} |")
  lines += ["", "| network and step | 20 cells | ops / 8 cells | compile / 8 cells "
            "| step / unscanned step |", "|" + " --- |" * 5]
  for what in dict.fromkeys(r["what"] for r in rows):
    eight = next(r for r in rows if r["what"] == what and r["layers"] == 8)
    plain = next(r for r in rows if r["what"] == what and r["layers"] == 20 and not r["scan"])
    for r in (r for r in rows if r["what"] == what and r["layers"] == 20):
      lines.append(f"| {what} | {'scanned' if r['scan'] else 'unscanned'} | "
                   f"{r['ops'] / eight['ops']:.2f} | {r['compile_s'] / eight['compile_s']:.2f} | "
                   f"{r['step_s'] / plain['step_s']:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python experiments/scan_cells_table.py OUT")
  print(table(sys.argv[1]))
