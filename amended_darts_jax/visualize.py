"""Pictures of genotypes: DOT text always, PNG and SVG by graphviz or matplotlib.

`render(genotype, prefix)` writes `prefix.dot`, `prefix.png` and `prefix.svg`.
With the `dot` program on PATH graphviz lays the cells out; otherwise matplotlib
draws the same graph (inputs left, nodes in a column, output right). Shared
genotypes give a normal and a reduction cell side by side; per-cell genotypes
(s2) one small panel per cell; NAS-Bench-201 genotypes their one cell (input 0,
nodes 1-3, node 3 the output; `none` edges dotted).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from amended_darts_jax import spaces

OP_COLORS = {
    "max_pool_3x3": "#8c564b", "avg_pool_3x3": "#e377c2", "skip_connect": "#7f7f7f",
    "sep_conv_3x3": "#1f77b4", "sep_conv_5x5": "#17becf", "dil_conv_3x3": "#2ca02c",
    "dil_conv_5x5": "#bcbd22", "noise": "#d62728", "nor_conv_1x1": "#9467bd",
    "nor_conv_3x3": "#1f77b4", "none": "#bbbbbb",
}


# Short names for the edges of many small panels (per-cell genotypes).
OP_SHORT = {
    "max_pool_3x3": "max3", "avg_pool_3x3": "avg3", "skip_connect": "skip",
    "sep_conv_3x3": "sep3", "sep_conv_5x5": "sep5", "dil_conv_3x3": "dil3",
    "dil_conv_5x5": "dil5", "noise": "noise", "nor_conv_1x1": "conv1", "nor_conv_3x3": "conv3",
}


def _state_name(i: int) -> str:
  """A state's label as matplotlib mathtext: the inputs c_{k-2}, c_{k-1}, then nodes 0-3."""
  return {0: "$c_{k-2}$", 1: "$c_{k-1}$"}.get(i, str(i - 2))


def _panels(genotype: spaces.Genotype) -> list[tuple[str, spaces.Gene, tuple[int, ...]]]:
  if genotype.per_cell:
    layers = len(genotype.cells)
    reductions = spaces.reduction_cells(layers)
    return [(f"cell {i}{' (reduce)' if i in reductions else ''}", g,
             genotype.gene(i, i in reductions)[1]) for i, g in enumerate(genotype.cells)]
  return [("normal", genotype.normal, genotype.normal_concat),
          ("reduce", genotype.reduce, genotype.reduce_concat)]


def _nb201_dot(genotype: spaces.Genotype) -> str:
  lines = ["digraph genotype {", "  rankdir=LR;", "  node [shape=box, style=filled];",
           f'  label="{genotype.arch_str}";', '  s0 [label="input", fillcolor=darkseagreen2];',
           '  s1 [label="1", fillcolor=lightblue];', '  s2 [label="2", fillcolor=lightblue];',
           '  s3 [label="3 (output)", fillcolor=palegoldenrod];']
  for (op, src), (_, dst) in zip(genotype.nb201, spaces.NB201_EDGES):
    color = OP_COLORS.get(op, "black")
    style = ", style=dotted" if op == "none" else ""
    lines.append(f'  s{src} -> s{dst} [label="{op}", color="{color}", fontcolor="{color}"{style}];')
  return "\n".join(lines + ["}"]) + "\n"


def to_dot(genotype: spaces.Genotype) -> str:
  """The genotype as one DOT digraph with a cluster per cell."""
  if genotype.is_nb201:
    return _nb201_dot(genotype)
  lines = ["digraph genotype {", "  rankdir=LR;", "  node [shape=box, style=filled];"]
  for p, (title, gene, concat) in enumerate(_panels(genotype)):
    pre = f"p{p}_"
    lines += [f"  subgraph cluster_{p} {{", f'    label="{title}";']
    lines.append(f'    {pre}s0 [label="c_{{k-2}}", fillcolor=darkseagreen2];')
    lines.append(f'    {pre}s1 [label="c_{{k-1}}", fillcolor=darkseagreen2];')
    steps = len(gene) // 2
    for node in range(steps):
      lines.append(f'    {pre}s{node + 2} [label="{node}", fillcolor=lightblue];')
    lines.append(f'    {pre}out [label="c_{{k}}", fillcolor=palegoldenrod];')
    for k, (op, src) in enumerate(gene):
      color = OP_COLORS.get(op, "black")
      lines.append(f'    {pre}s{src} -> {pre}s{k // 2 + 2} [label="{op}", color="{color}", '
                   f'fontcolor="{color}"];')
    for i in concat:
      lines.append(f"    {pre}s{i} -> {pre}out [color=gray];")
    lines.append("  }")
  lines.append("}")
  return "\n".join(lines) + "\n"


def _draw_cell(ax, gene, concat, short=False):
  """Inputs top-left and bottom-left, nodes on a horizontal line, output at the right.

  Input edges run diagonally and never cross a node, labelled near their node
  (with OP_SHORT's names when `short`); node-to-node edges arc above the line;
  the concat edges arc below it.
  """
  steps = len(gene) // 2
  pos = {0: (0.0, 0.95), 1: (0.0, 0.05)}
  for node in range(steps):
    pos[node + 2] = (0.32 + 0.26 * node, 0.5)
  pos["out"] = (0.32 + 0.26 * steps, 0.5)

  def arrow(src, dst, color, lw, rad):
    ax.annotate("", xy=pos[dst], xytext=pos[src],
                arrowprops=dict(arrowstyle="-|>", color=color, lw=lw, shrinkA=11, shrinkB=11,
                                connectionstyle=f"arc3,rad={rad}"))

  for k, (op, src) in enumerate(gene):
    dst = k // 2 + 2
    color = OP_COLORS.get(op, "black")
    (x0, y0), (x1, y1) = pos[src], pos[dst]
    if src < 2:  # diagonal from an input; label 70% of the way, next to the node
      arrow(src, dst, color, 1.6, 0.0)
      lx, ly = x0 + 0.7 * (x1 - x0), y0 + 0.7 * (y1 - y0)
    else:  # along the line; arcs above it when skipping nodes
      hops = dst - src
      rad = -0.5 if hops > 1 else 0.0
      arrow(src, dst, color, 1.6, rad)
      lx, ly = 0.5 * (x0 + x1), 0.5 + (0.25 * (x1 - x0) if hops > 1 else 0.035)
    ax.text(lx, ly, OP_SHORT.get(op, op) if short else op, color=color,
            fontsize=8 if short else 7, ha="center", va="center",
            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
  for i in concat:
    hops = steps + 2 - i
    arrow(i, "out", "0.65", 0.9, 0.0 if hops == 1 else 0.35)
  for key, (x, y) in pos.items():
    label = "$c_{k}$" if key == "out" else _state_name(key)
    fc = "#d9ead3" if key in (0, 1) else "#fff2cc" if key == "out" else "#cfe2f3"
    ax.text(x, y, label, ha="center", va="center", fontsize=9,
            bbox=dict(boxstyle="round,pad=0.35", fc=fc, ec="0.3"))
  ax.set_xlim(-0.1, pos["out"][0] + 0.1)
  ax.set_ylim(-0.02, 1.02)


def _draw_nb201(ax, genotype: spaces.Genotype) -> None:
  """Input, nodes 1 and 2 and the output on a line; one-hop edges straight along it,
  two-hop edges arcing above, the input-to-output edge below; `none` dotted."""
  pos = {i: (0.12 + 0.25 * i, 0.5) for i in range(4)}
  for (op, src), (_, dst) in zip(genotype.nb201, spaces.NB201_EDGES):
    hops, color = dst - src, OP_COLORS.get(op, "black")
    rad = {1: 0.0, 2: -0.6, 3: 0.45}[hops]
    ax.annotate("", xy=pos[dst], xytext=pos[src],
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.6, shrinkA=14, shrinkB=14,
                                linestyle=":" if op == "none" else "-",
                                connectionstyle=f"arc3,rad={rad}"))
    x = 0.5 * (pos[src][0] + pos[dst][0])
    y = 0.5 + {1: 0.04, 2: 0.16 + 0.05 * src, 3: -0.17}[hops]
    ax.text(x, y, op, color=color, fontsize=8, ha="center", va="center",
            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
  for i, (x, y) in pos.items():
    label = {0: "input", 3: "output"}.get(i, str(i))
    fc = "#d9ead3" if i == 0 else "#fff2cc" if i == 3 else "#cfe2f3"
    ax.text(x, y, label, ha="center", va="center", fontsize=9,
            bbox=dict(boxstyle="round,pad=0.35", fc=fc, ec="0.3"))
  ax.set_xlim(0, 1)
  ax.set_ylim(0.2, 0.8)
  ax.set_title(genotype.arch_str, fontsize=8)


def _draw_matplotlib(genotype: spaces.Genotype, png: str, svg: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if genotype.is_nb201:
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.axis("off")
    _draw_nb201(ax, genotype)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    fig.savefig(svg)
    plt.close(fig)
    return

  panels = _panels(genotype)
  shared = not genotype.per_cell  # two large panels with full names, else a grid of small ones
  cols = 2 if shared else min(len(panels), 5)
  rows = (len(panels) + cols - 1) // cols
  size = (7.5, 4.2) if shared else (4.6, 3.0)
  fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (title, gene, concat) in zip(axes.flat, panels):
    _draw_cell(ax, gene, concat, short=not shared)
    ax.set_title(title, fontsize=10)
  if not shared:  # the short names, spelled out once
    used = sorted({op for _, gene, _ in panels for op, _ in gene})
    handles = [plt.Line2D([], [], color=OP_COLORS.get(op, "black"), lw=2.5) for op in used]
    fig.legend(handles, [f"{OP_SHORT.get(op, op)}: {op}" for op in used], loc="lower center",
               ncol=min(len(used), 4), fontsize=10, frameon=False)
  legend_rows = 0 if shared else (len({op for _, g, _ in panels for op, _ in g}) + 3) // 4
  fig.tight_layout(rect=(0, 0.3 * legend_rows / (size[1] * rows), 1, 1))
  fig.savefig(png, dpi=110)
  fig.savefig(svg)
  plt.close(fig)


def render(genotype: spaces.Genotype, prefix: str) -> dict[str, str]:
  """Writes prefix.dot, prefix.png and prefix.svg; returns the paths and the renderer used."""
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  dot_path, png, svg = f"{prefix}.dot", f"{prefix}.png", f"{prefix}.svg"
  with open(dot_path, "w") as f:
    f.write(to_dot(genotype))
  renderer = "matplotlib"
  if shutil.which("dot"):
    try:
      for fmt, out in (("png", png), ("svg", svg)):
        subprocess.run(["dot", f"-T{fmt}", dot_path, "-o", out], check=True,
                       capture_output=True, timeout=60)
      renderer = "graphviz"
    except (subprocess.SubprocessError, OSError):
      renderer = "matplotlib"
  if renderer == "matplotlib":
    _draw_matplotlib(genotype, png, svg)
  return {"dot": dot_path, "png": png, "svg": svg, "renderer": renderer}
