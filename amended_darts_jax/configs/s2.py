r"""The paper's S2 search on CIFAR-10: 20 cells, each with its own alphas, ops {skip, sep_conv_3x3}.

  python -m amended_darts_jax.search --workdir=runs/s2 \
      --config=amended_darts_jax/configs/s2.py [--config.remat=True]

2^160 architectures. The paper reports 2.60 +- 0.15 % CIFAR-10 error, and
24.3 % / 7.4 % ImageNet top-1 / top-5 error with 42 channels (590M
multiply-adds). 20 cells at 36 channels need a lot of memory for the amended
step; `remat=True` rematerializes each cell (1.9x and 2.1x less XLA:CPU
buffer memory for the amended step at 5 and 8 cells of a small `s2` supernet
under jax 0.12, none under jax 0.10; BUILD_NOTES.md). On GPU and TPU the
default `scan_cells=auto` computes the three runs of normal cells (2-5, 8-12,
15-19) as scans, so that the program holds each of those cells once; on CPU
`--config.scan_cells=on` compiles faster but steps slower (BUILD_NOTES.md,
"Compile time").
"""

from amended_darts_jax.configs import cifar10_darts


def get_config():
  c = cifar10_darts.get_config()
  c.space = "s2"
  c.layers = 20
  c.init_channels = 36
  c.batch_size = 96
  c.epochs = 100
  return c
