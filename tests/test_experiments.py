"""The experiment scripts' own logic: the kernel profile reads XLA's real output; the
benchmark's FLOP count and epoch extrapolation; the collapse table and the studies' tables
and figures are rebuilt from the committed raw results."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import collapse_settings  # noqa: E402
import common  # noqa: E402
import profile_kernels  # noqa: E402

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
RESULTS = os.path.join(EXPERIMENTS, "results")


def test_attribution_of_op_names():
  backward = ("jit(step)/transpose(jvp(Supernet))/cell1/vmap(stacked_from0)/dil_conv_5x5/"
              "DilConv_0/DepthwiseConv_0/conv_general_dilated")
  assert profile_kernels.attribution(backward) == (
      "backward", "dil_conv_5x5", "dil_conv_5x5/DilConv_0/DepthwiseConv_0")
  assert profile_kernels.attribution("jit(step)/jvp(Supernet)/stem_conv/conv_general_dilated") \
      == ("forward", "stem_conv", "stem_conv")
  assert profile_kernels.attribution("jit(step)/add")[1] == "(outside the network: add)"
  assert profile_kernels.attribution("")[1] == "(no metadata)"


class Supernet(nn.Module):  # the name the attribution looks for
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(jnp.tanh(nn.Conv(4, (3, 3), name="body")(x)).mean((1, 2)))


def test_every_profiled_kernel_is_found_and_attributed():
  x = jnp.ones((2, 8, 8, 3))
  params = Supernet().init(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(lambda p, x: Supernet().apply(p, x).sum()))
  compiled = grad.lower(params, x).compile()
  index = profile_kernels.hlo_index(compiled.as_text())

  per_kernel, walls = profile_kernels.kernel_times(
      lambda: jax.block_until_ready(compiled(params, x)), index, steps=3)
  assert len(walls) == 3 and per_kernel
  # No control flow: every kernel of the program ran once a step.
  assert {count for count, _ in per_kernel.values()} == {3}
  modules = {profile_kernels.attribution(index[op]["op_name"]) for op in per_kernel}
  assert any(m[2] == "body" and m[0] == "backward" for m in modules), modules
  assert any(m[2] == "body" and m[0] == "forward" for m in modules), modules
  assert any(m[2] == "head" and m[0] == "backward" for m in modules), modules


def test_step_flops_is_xlas_count_of_a_matrix_product():
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
  assert common.step_flops(compiled) == 2 * 8 * 16 * 4  # a multiply and an add per term


def test_epoch_minutes_counts_the_last_short_batch():
  # DARTS' CIFAR-10 search: 25,000 training images at batch 64 is 390 full steps and one short.
  assert common.epoch_minutes(1.0, 64) == pytest.approx(391 / 60)
  assert common.epoch_minutes(0.5, 100) == pytest.approx(250 * 0.5 / 60)


def test_collapse_rule_on_constructed_final_records():
  shared = dict(normal_edges=14.0)
  assert collapse_settings.collapsed({**shared, "skip_dominated_edges": 11.0})  # 78%
  assert not collapse_settings.collapsed({**shared, "skip_dominated_edges": 10.0})  # 71%
  # Per-cell spaces: the upper third decides, whatever the rest does.
  per_cell = dict(normal_edges=144.0, skip_dominated_edges=144.0, upper_normal_edges=48.0)
  assert collapse_settings.collapsed({**per_cell, "upper_skip_dominated_edges": 36.0})
  assert not collapse_settings.collapsed({**per_cell, "upper_skip_dominated_edges": 35.0})


def test_collapse_table_and_figure_are_rebuilt_from_the_committed_results(tmp_path):
  source = os.path.join(RESULTS, "collapse_settings")
  runs = [f for f in sorted(os.listdir(source)) if f.endswith(".json")]
  assert runs, "experiments/results/collapse_settings holds the raw results"
  for f in runs:
    shutil.copy(os.path.join(source, f), tmp_path)
  table = collapse_settings.table(str(tmp_path))
  for f in runs:
    r = json.load(open(os.path.join(source, f)))
    last = r["epochs"][-1]
    row = next(line for line in table.splitlines()
               if line.startswith(f"| {r['setting']} |") and f"| {r['seed']} |" in line)
    assert f"{last['skip_dominated_edges']:.0f} of {last['normal_edges']:.0f}" in row
    assert row.endswith("| yes |" if collapse_settings.collapsed(last) else "| no |")
  collapse_settings.figure(str(tmp_path), str(tmp_path / "skip_weight.png"))
  assert os.path.getsize(tmp_path / "skip_weight.png") > 10_000


@pytest.mark.parametrize("script, results, raw, figures", [
    ("compare_products.py", "compare_products", "results.csv",
     ("error_vs_r.png", "error_along_search.png")),
    ("angle_study.py", "angle_study", "results.jsonl", ("angles.png",)),
    ("ground_truth.py", "ground_truth", "results.json", ()),
    ("ground_truth.py", "ground_truth_zero_center", "results.json", ()),
])
def test_study_tables_and_figures_are_rebuilt_from_the_committed_rows(tmp_path, script, results,
                                                                      raw, figures):
  """`--from_results` rebuilds summary.md, as committed, and the figures from the raw rows
  alone (in a subprocess: the scripts switch float64 on at import)."""
  source = os.path.join(RESULTS, results)
  shutil.copy(os.path.join(source, raw), tmp_path)
  proc = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, script),
                         f"--out={tmp_path}", "--from_results"], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "summary.md").read_text() == open(os.path.join(source, "summary.md")).read()
  for name in figures:
    assert os.path.getsize(tmp_path / name) > 10_000


def test_the_benchmarks_weight_only_step_is_the_search_steps_weight_update(monkeypatch):
  """`weight_only` (benchmark.py, pytorch_darts.py) moves the weights and the batch
  statistics exactly as the first-order search step does, and leaves alpha alone."""
  monkeypatch.setitem(common.SIZES, "one_cell", dict(space="s2", C=2, layers=1, batch=8,
                                                     image=(8, 8, 1), classes=10))
  _, _, sc, state, batch = common.setup("one_cell", method="first_order")
  train, val = batch(), batch()
  after, metrics = jax.jit(common.step_fn(sc, "weight_only"))(state, train, val)
  searched, _ = jax.jit(common.step_fn(sc, "first_order"))(state, train, val)
  assert int(after.step) == int(state.step) + 1 and float(metrics["train_loss"]) > 0
  for a, b in zip(jax.tree.leaves((after.params, after.batch_stats)),
                  jax.tree.leaves((searched.params, searched.batch_stats))):
    assert jnp.allclose(a, b, rtol=1e-6, atol=1e-7)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(after.alpha),
                                                   jax.tree.leaves(state.alpha)))
  assert any(not bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(after.params),
                                                       jax.tree.leaves(state.params)))


def test_scan_table_is_rebuilt_from_the_committed_results_and_quoted_in_the_notes():
  import scan_cells_table
  source = os.path.join(RESULTS, "scan_cells")
  table = scan_cells_table.table(source)
  rows = [json.loads(line) for line in open(os.path.join(source, "search_s2_search_20",
                                                          "results.jsonl"))]
  eight = json.loads(open(os.path.join(source, "search_s2_search_8", "results.jsonl")).readline())
  scanned = next(r for r in rows if r["scan_cells"])
  plain = next(r for r in rows if not r["scan_cells"])
  ratios = (f"{scanned['program_ops'] / eight['program_ops']:.2f} | "
            f"{scanned['compile_s'] / eight['compile_s']:.2f} | "
            f"{scanned['median_step_s'] / plain['median_step_s']:.2f} |")
  assert f"| search `s2_search`, amended exact | scanned | {ratios}" in table
  notes = open(os.path.join(EXPERIMENTS, "..", "BUILD_NOTES.md")).read()
  assert (f"{scanned['program_ops'] / eight['program_ops']:.2f} ({scanned['program_ops']:,}) | "
          f"{scanned['compile_s'] / eight['compile_s']:.2f} ({scanned['compile_s']:.1f} s)") in notes
