r"""What a lowered search step is made of: its operations by kind, its loops and calls.

  python experiments/program_ops.py --size=tiny --layers=20 --scan_cells=true

Lowers (does not compile) the step of `--method` at a named size of benchmark.py
and prints the operation count (`common.program_ops`), the `stablehlo.while`
loops, the most frequent operation kinds and the most called functions.
"""

import collections
import re

from absl import app, flags
import jax

import common

_SIZE = flags.DEFINE_enum("size", "tiny", list(common.SIZES), "Named network and batch size.")
_METHOD = flags.DEFINE_string("method", "amended/exact", "method or method/products.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Override the size's number of cells (0: keep).")
_SCAN = flags.DEFINE_bool("scan_cells", True, "Runs of identical cells as one scan.")
_TOP = flags.DEFINE_integer("top", 12, "Kinds and callees listed.")


def main(argv):
  del argv
  _, _, _, _, state, batch, step = common.setup_step(_SIZE.value, _METHOD.value,
                                                     layers=_LAYERS.value, scan_cells=_SCAN.value)
  lowered = jax.jit(step, donate_argnums=0).lower(state, batch(), batch())
  text = lowered.as_text()
  kinds = collections.Counter(re.findall(r"= \"?([a-z_]+\.[a-z_]+)", text))
  calls = collections.Counter(re.sub(r"_\d+$", "", c)
                              for c in re.findall(r"func\.call @([A-Za-z_0-9]+)", text))
  print(f"program ops {common.program_ops(lowered)}, while loops {text.count('stablehlo.while')}, "
        f"function calls {kinds['func.call']}")
  print("kinds: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common(_TOP.value)))
  print("callees: " + ", ".join(f"{k} {n}" for k, n in calls.most_common(_TOP.value)))


if __name__ == "__main__":
  app.run(main)
