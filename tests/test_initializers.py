"""initializers.py: host-side initialisation."""

import jax
import jax.numpy as jnp
import numpy as np

from amended_darts_jax import initializers, supernet


def test_host_init_follows_the_declared_initializers():
  """initializers.init_variables draws what module.init would: same tree, constants, bounds."""
  model = supernet.Supernet("s2", C=4, layers=2, num_classes=5)  # cell 1 after a reduction
  x = jnp.zeros((2, 8, 8, 3))
  alpha = model.init_alpha(jax.random.PRNGKey(0))
  host = initializers.init_variables(model, 0, x, alpha, train=False)
  ref = jax.jit(lambda key: model.init(key, x, alpha, train=False))(jax.random.PRNGKey(0))
  assert jax.tree.structure(host) == jax.tree.structure(ref)
  flat_host = jax.tree_util.tree_flatten_with_path(host)[0]
  flat_ref = jax.tree.leaves(ref)
  for (path, h), r in zip(flat_host, flat_ref):
    name = jax.tree_util.keystr(path)
    assert h.shape == r.shape and h.dtype == r.dtype, name
    if np.all(np.asarray(r) == np.asarray(r).ravel()[0]):  # a constant: ones or zeros
      np.testing.assert_array_equal(h, r, err_msg=name)
    else:  # random: U(+-1/sqrt(fan_in)) in both; fan_in of a kernel, or of a bias's kernel
      kernel = h if name.endswith("['kernel']") else None
      if kernel is None:
        kernel_path = name.replace("['bias']", "['kernel']")
        kernel = next(x for p, x in flat_host if jax.tree_util.keystr(p) == kernel_path)
      shape = kernel.shape[1:] if initializers.STACKED_PREFIX in name else kernel.shape
      fan_in = shape[0] * shape[1] if len(shape) == 3 else int(np.prod(shape[:-1]))
      bound = 1.0 / np.sqrt(fan_in)
      for values in (h, r):
        assert float(np.abs(values).max()) <= bound * (1 + 1e-6), name
        if values.size >= 200:
          assert float(np.abs(values).max()) > 0.9 * bound, name
