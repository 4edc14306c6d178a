"""batch_norm.py against flax."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amended_darts_jax import batch_norm


@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_equals_flax_to_second_order(x64, affine):
  """batch_norm.BatchNorm (one broadcast of the stacked per-channel values) against flax's
  nn.BatchNorm with the same settings, in float64: the variables' tree, the output and
  new statistics in train mode, the output in eval mode, the gradient in the input and
  the parameters, and a forward-over-reverse product of that gradient."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=(3, 5, 4, 6)))
  ours = lambda train: batch_norm.BatchNorm(use_running_average=not train, affine=affine)
  ref = lambda train: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                   use_scale=affine, use_bias=affine)
  v_ours, v_ref = ours(True).init(jax.random.PRNGKey(0), x), ref(True).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
  variables = {"batch_stats": {"mean": jnp.asarray(rng.normal(size=6)),
                               "var": jnp.asarray(rng.uniform(0.5, 2.0, size=6))}}
  if affine:
    variables["params"] = {"scale": jnp.asarray(rng.normal(size=6)),
                           "bias": jnp.asarray(rng.normal(size=6))}
  y, new = ours(True).apply(variables, x, mutable=["batch_stats"])
  y_ref, new_ref = ref(True).apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(new, new_ref, rtol=1e-12)
  np.testing.assert_allclose(ours(False).apply(variables, x), ref(False).apply(variables, x),
                             rtol=1e-12, atol=1e-12)

  def loss(module):
    def f(x, params):
      v = {**variables, **({"params": params} if affine else {})}
      out, _ = module.apply(v, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)
    return f

  params = variables.get("params", {})
  g = jax.grad(loss(ours(True)), (0, 1))(x, params)
  g_ref = jax.grad(loss(ref(True)), (0, 1))(x, params)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-12)
  t = (jnp.asarray(rng.normal(size=x.shape)), jax.tree.map(jnp.ones_like, params))
  hv = jax.jvp(lambda *a: jax.grad(loss(ours(True)), (0, 1))(*a), (x, params), t)[1]
  hv_ref = jax.jvp(lambda *a: jax.grad(loss(ref(True)), (0, 1))(*a), (x, params), t)[1]
  chex.assert_trees_all_close(hv, hv_ref, rtol=1e-9, atol=1e-11)
