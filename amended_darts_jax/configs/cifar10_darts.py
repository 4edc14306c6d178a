r"""DARTS' original CIFAR-10 search (darts space, 8 cells, C=16, batch 64, 50 epochs).

  python -m amended_darts_jax.search --workdir=runs/cifar10_darts \
      --config=amended_darts_jax/configs/cifar10_darts.py [--config.method=first_order]

Needs CIFAR-10 prepared for tensorflow-datasets (the error message says how).
Expect one epoch (390 steps) to take on the order of 0.02 GPU-days on one GPU,
as the paper reports; on a CPU it is impractically slow. The paper reports that
with method=first_order and 200 epochs the normal cell collapses to
skip-connects (its Figure 1) and that the amended gradient (eta=0.1) does not;
neither has been reproduced with this code (README, "Collapse").
"""

from amended_darts_jax.configs import default


def get_config():
  c = default.get_config()
  c.dataset = "cifar10"
  c.space = "darts"
  c.init_channels = 16
  c.layers = 8
  c.epochs = 50
  c.batch_size = 64
  c.arch_lr = 3e-4  # DARTS' (the digits default raises it)
  c.crop_padding = 4
  c.flip = True
  c.log_every = 50
  c.checkpoint_every = 500
  return c
