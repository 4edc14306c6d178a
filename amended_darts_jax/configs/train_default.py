r"""Default retraining: a genotype trained from scratch on the embedded 8x8 digits.

  python -m amended_darts_jax.train --workdir=runs/digits_train \
      [--config.genotype=runs/digits/genotype.json]

With no genotype given it trains DARTS_V2 in 5 cells of 8 channels; given the
genotype.json of the default search (an s2 genotype, one gene per cell) the
network has as many cells as the genotype. A few minutes on a 2-core CPU.
`--config.dry_run=True` prints the parameter
count and multiply-adds and exits without data. The other train configs start
from this one and change only what differs.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.genotype = "DARTS_V2"  # DARTS_V1 | DARTS_V2 | path/to/genotype.json
  c.dataset = "digits"  # digits | mnist5k (embedded) | cifar10 | cifar100 | imagenet2012
  c.data_dir = ""
  c.download = False
  c.image_size = 224  # imagenet2012 only
  c.init_channels = 8
  c.layers = 5  # ignored for per-cell (s2) genotypes: one cell per gene
  c.auxiliary = True
  c.auxiliary_weight = 0.4
  c.drop_path_prob = 0.2  # ramped linearly from 0 over the epochs
  c.activation = "relu"
  c.conv_pool_impl = "auto"
  c.scan_cells = "auto"  # runs of identical cells as one scan: auto | on | off (networks.scans)

  c.epochs = 10
  c.batch_size = 64
  c.lr = 0.025
  c.lr_schedule = "cosine"  # cosine (to lr_min) | linear (to 0)
  c.lr_min = 0.0
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 3e-4
  c.grad_clip = 5.0  # global norm; 0: no clipping
  c.label_smoothing = 0.0
  c.ema_decay = 0.0  # exponential moving average of the weights; 0: off
  c.seed = 0

  c.crop_padding = 1
  c.flip = False
  c.cutout = 0

  c.max_steps = 0
  c.log_every = 10
  c.checkpoint_every = 100
  c.eval_every_epochs = 1
  # > 0: hold out this share of the training split, train on the rest and evaluate on the
  # held-out part instead of the test split (random search ranks its samples so).
  c.holdout = 0.0
  c.dry_run = False
  c.distributed = False
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  c.compilation_cache_dir = "~/.cache/amended_darts_jax/xla"
  return c
