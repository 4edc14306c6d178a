r"""Retraining a NAS-Bench-201 cell with the benchmark's 200-epoch recipe on CIFAR-10.

  python -m amended_darts_jax.train --workdir=runs/nb201_train \
      --config=amended_darts_jax/configs/train_nb201.py \
      --config.genotype=runs/nb201_first/genotype.json
  python -m amended_darts_jax.train --workdir=runs/nb201_best \
      --config=amended_darts_jax/configs/train_nb201.py \
      '--config.genotype=|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|'

The genotype is a genotype.json of an nb201 search or the benchmark's
architecture string. The network is the benchmark's: C=16, three stages of 5
cells with residual reduction blocks, no auxiliary head, no drop-path. SGD with
Nesterov momentum 0.9, lr 0.1 cosine to 0, weight decay 5e-4, batch 256, 200
epochs, crop and flip, no gradient clipping. `--config.dry_run=True` prints the
parameter count (the benchmark's: 1.531546 MB for the all-nor_conv_3x3 cell,
0.073306 MB for a cell without parameters, on CIFAR-10; tests/test_networks.py).
"""

from amended_darts_jax.configs import train_default


def get_config():
  c = train_default.get_config()
  c.genotype = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
  c.dataset = "cifar10"
  c.init_channels = 16
  c.layers = 15
  c.auxiliary = False
  c.drop_path_prob = 0.0
  c.epochs = 200
  c.batch_size = 256
  c.lr = 0.1
  c.lr_min = 0.0
  c.nesterov = True
  c.weight_decay = 5e-4
  c.grad_clip = 0.0  # the benchmark does not clip
  c.crop_padding = 4
  c.flip = True
  c.log_every = 50
  c.checkpoint_every = 1000
  return c
