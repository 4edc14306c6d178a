r"""DARTS on NAS-Bench-201 (Dong & Yang, 2020): the benchmark's own search settings on CIFAR-10.

  python -m amended_darts_jax.search --workdir=runs/nb201_first \
      --config=amended_darts_jax/configs/nb201.py --config.method=first_order \
      [--config.nb201_benchmark=PATH/NATS-tss-v1_0-3ffb9-simple]
  python -m amended_darts_jax.search --workdir=runs/nb201_amended \
      --config=amended_darts_jax/configs/nb201.py --config.method=amended --config.eta=0.1

The `nb201` space: the benchmark's one-input cell (6 edges, none, skip_connect,
nor_conv_1x1, nor_conv_3x3, avg_pool_3x3) with one alpha for all 15 cells of its
skeleton (C=16, three stages of 5 cells, residual reduction blocks), searched
as the benchmark searched it: 50 epochs, batch 64, SGD with Nesterov momentum
0.9 at 0.025 cosine to 0.001, weight decay 5e-4, clip 5; Adam on alpha at 3e-4,
betas (0.5, 0.999), decay 1e-3; the training split halved into search-train and
search-validation; crop and flip. The cell is the strongest operation of each
edge, `none` included, written to genotype.json and, as the benchmark's
architecture string, to nb201_arch.txt.

The benchmark reports that first- and second-order DARTS both return the
all-skip cell here, 54.30 % CIFAR-10 test accuracy against 94.37 % for the best
cell: the best-known collapse in the literature. The commands above make that
comparison for first-order DARTS and the amended gradient; with the benchmark's
file and its API installed (`pip install nats_bench`), `nb201_benchmark` writes
the searched cell's recorded accuracies to nb201_lookup.json, and without it
configs/train_nb201.py retrains the cell. Needs CIFAR-10 prepared for
tensorflow-datasets and, in practice, a GPU; none of these figures has been
reproduced with this code.
"""

from amended_darts_jax.configs import default


def get_config():
  c = default.get_config()
  c.dataset = "cifar10"
  c.space = "nb201"
  c.init_channels = 16
  c.layers = 15  # three stages of 5 cells
  c.epochs = 50
  c.batch_size = 64
  c.lr = 0.025
  c.lr_min = 0.001
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.arch_lr = 3e-4
  c.crop_padding = 4
  c.flip = True
  c.log_every = 50
  c.checkpoint_every = 500
  return c
