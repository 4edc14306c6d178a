r"""The paper's S1 search on CIFAR-10: fixed edges, 7 ops, eta=0.1, batch 96, 100 epochs.

  python -m amended_darts_jax.search --workdir=runs/s1 \
      --config=amended_darts_jax/configs/s1.py [--config.init_channels=36]

The paper searches 8 cells with 16 base channels (its "consistent" setting
searches 8 cells at 36 channels and retrains the result at 8 and at 20 cells)
and reports 2.81 +- 0.21 % CIFAR-10 test error after retraining the genotype
(amended_darts_jax.train), and a search validation accuracy of 91.5 % (90.5 %
for first-order DARTS). Neither figure has been reproduced with this code.
"""

from amended_darts_jax.configs import cifar10_darts


def get_config():
  c = cifar10_darts.get_config()
  c.space = "s1"
  c.batch_size = 96
  c.epochs = 100
  return c
