r"""CIFAR-100 retraining, the CIFAR-10 recipe with 100 classes.

  python -m amended_darts_jax.train --workdir=runs/c100_train \
      --config=amended_darts_jax/configs/train_cifar100.py [--config.genotype=PATH_OR_NAME]

Needs CIFAR-100 prepared for tensorflow-datasets. DARTS-family papers report
roughly 17-20 % test error for CIFAR-10-searched cells transferred here.
"""

from amended_darts_jax.configs import train_cifar10


def get_config():
  c = train_cifar10.get_config()
  c.dataset = "cifar100"
  return c
