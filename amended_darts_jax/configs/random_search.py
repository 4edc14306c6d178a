r"""Random search on the embedded 8x8 digits: 20 samples of s2 in 5 cells, the best 2 retrained.

  python -m amended_darts_jax.random_search --workdir=runs/random_s2

The paper's baseline (20 samples, the best 2 retrained). Every field of the
retraining config (configs/train_default.py) sets the recipe shared by the
ranking and the retraining; the fields below add the search. For the paper's
CIFAR-10 setting start from configs/train_cifar10.py's values instead, e.g.
`--config.dataset=cifar10 --config.layers=8 --config.init_channels=16`.
"""

from amended_darts_jax.configs import train_default


def get_config():
  c = train_default.get_config()
  c.space = "s2"  # any space of amended_darts_jax/spaces.py
  c.samples = 20  # architectures drawn
  c.top = 2  # retrained with the full recipe
  c.rank_epochs = 2  # the short training that ranks every sample ...
  c.rank_holdout = 0.2  # ... evaluated on this share of the training split
  return c
