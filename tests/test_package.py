"""The package's shape: no import cycles, and importing a module starts nothing."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "amended_darts_jax")


def _module_name(path):
  rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def _imports(path, modules):
  """The package's modules that `path` imports at its top level (not inside functions)."""
  tree = ast.parse(open(path).read())
  found = set()
  for node in tree.body:
    if isinstance(node, ast.If):  # `if __name__ == "__main__":` blocks run only as a command
      continue
    for sub in ast.walk(node):
      if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
        break
      if isinstance(sub, ast.Import):
        found |= {a.name for a in sub.names if a.name in modules}
      elif isinstance(sub, ast.ImportFrom) and sub.module:
        for a in sub.names:
          full = f"{sub.module}.{a.name}"
          found.add(full if full in modules else sub.module)
  return {m for m in found if m in modules}


def test_the_modules_import_each_other_without_a_cycle():
  paths = [os.path.join(root, n) for root, _, names in os.walk(PACKAGE) for n in names
           if n.endswith(".py")]
  modules = {_module_name(p): p for p in paths}
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  assert graph["amended_darts_jax.ops"] >= {"amended_darts_jax.cpu.dispatch"}
  assert "amended_darts_jax.cpu.kernels" not in graph["amended_darts_jax.ops"]
  # Depth-first search for a back edge.
  state, cycle = {}, []

  def visit(m, path):
    state[m] = "open"
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        cycle.append(path + [n])
      elif n not in state:
        visit(n, path + [n])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycle, " -> ".join(cycle[0])
  # The CPU layer depends on nothing of the rest but the errors.
  for m in graph:
    if m.startswith("amended_darts_jax.cpu"):
      outside = {n for n in graph[m] if not n.startswith("amended_darts_jax.cpu")}
      assert outside <= {"amended_darts_jax.errors"}, (m, outside)


def test_importing_every_module_starts_no_backend_and_builds_nothing(tmp_path):
  code = (
      "import importlib, pkgutil\n"
      "import amended_darts_jax\n"
      "names = [m.name for m in pkgutil.walk_packages(amended_darts_jax.__path__,\n"
      "                                                'amended_darts_jax.')]\n"
      "for name in names:\n"
      "  importlib.import_module(name)\n"
      "from jax._src import xla_bridge\n"
      "from amended_darts_jax.cpu import kernels\n"
      "print(len(names), sorted(xla_bridge._backends), kernels._state)\n")
  cache = tmp_path / "kernels"
  env = {**os.environ, "PYTHONPATH": REPO, "AMENDED_DARTS_KERNEL_CACHE": str(cache)}
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  count, backends, state = out.stdout.split(" ", 2)
  assert int(count) >= 20
  assert backends == "[]" and state.strip() == "{}", out.stdout
  assert os.listdir(tmp_path) == []  # no kernel library, no file written
