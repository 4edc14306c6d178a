r"""CIFAR-10 retraining as DARTS and the paper do: 36 channels, 20 cells, 600 epochs.

  python -m amended_darts_jax.train --workdir=runs/c10_train \
      --config=amended_darts_jax/configs/train_cifar10.py [--config.genotype=PATH_OR_NAME]

Batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, weight decay 3e-4, cutout 16,
drop-path 0.2 ramped linearly, auxiliary weight 0.4, gradient clip 5. Needs
CIFAR-10 prepared for tensorflow-datasets. DARTS_V2 here has 3.35M parameters;
DARTS reports 2.76 +- 0.09 % test error for it, the paper 2.81 +- 0.21 % (S1) and
2.60 +- 0.15 % (S2, `--config.genotype=runs/s2/genotype.json --config.layers=20`).
"""

from amended_darts_jax.configs import train_default


def get_config():
  c = train_default.get_config()
  c.dataset = "cifar10"
  c.init_channels = 36
  c.layers = 20
  c.epochs = 600
  c.batch_size = 96
  c.cutout = 16
  c.crop_padding = 4
  c.flip = True
  c.log_every = 50
  c.checkpoint_every = 1000
  return c
