"""The README's example of the library on one's own bilevel problem runs and says what it prints."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example():
  text = open(README).read()
  marker = text.index("<!-- example: tests/test_readme.py runs this block -->")
  block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
  after = text[marker + block.end():]
  return block.group(1), after


def test_readme_example_gives_the_true_derivative_at_the_inner_optimum(capsys):
  code, after = _example()
  scope: dict = {}
  exec(compile(code, README, "exec"), scope)  # noqa: S102 (the README's own example)
  results = scope["results"]
  (xt, yt), (xv, yv) = scope["train"], scope["val"]

  def outer(log_l2):  # ridge regression's inner optimum in closed form, then Lv
    n, d = xt.shape
    w_star = jnp.linalg.solve(xt.T @ xt / n + jnp.exp(log_l2) * jnp.eye(d), xt.T @ yt / n)
    return jnp.mean((xv @ w_star - yv) ** 2)

  true = float(jax.grad(outer)(scope["a"]["log_l2"]))
  np.testing.assert_allclose(results["implicit"], true, rtol=1e-4)
  assert results["first_order"] == 0.0
  # The figures the README quotes after the block are these, rounded.
  quoted = dict(re.findall(r"'(\w+)': (-?[\d.]+)", after[:300].replace("\n", " ")))
  assert set(quoted) == set(results)
  for method, value in results.items():
    assert float(quoted[method]) == round(value, 3 if value else 1), (method, value)
  assert str(round(true, 3)) in after[:500]
