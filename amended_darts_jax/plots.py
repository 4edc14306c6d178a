"""Plots of a search in the style of the paper's Figure 1."""

from __future__ import annotations

import os

from amended_darts_jax import metrics


def figure1(workdir: str, out: str | None = None) -> str | None:
  """Per epoch: mean weight of `none`, skip-dominated normal edges, validation accuracy."""
  records = metrics.read(workdir, "epoch")
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = [r["epoch"] for r in records]
  panels = [("none_weight", "mean weight of none", "tab:red"),
            ("skip_dominated_edges", "edges dominated by skip_connect", "tab:green"),
            ("eval_val_acc", "supernet validation accuracy", "tab:blue")]
  panels = [p for p in panels if any(p[0] in r for r in records)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (key, label, color) in zip(axes[0], panels):
    xs = [e for e, r in zip(epochs, records) if key in r]
    ax.plot(xs, [r[key] for r in records if key in r], color=color, marker="o", ms=3)
    ax.set_xlabel("search epoch")
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  out = out or os.path.join(workdir, "figure1.png")
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
