r"""ImageNet (mobile setting) retraining as the paper does for its S2 genotype.

  python -m amended_darts_jax.train --workdir=runs/imagenet_train \
      --config=amended_darts_jax/configs/train_imagenet.py \
      --config.genotype=runs/s2/genotype.json

42 channels, 14 cells (20 for a per-cell s2 genotype), 250 epochs, SGD lr 0.5
decayed linearly, momentum 0.9, weight decay 3e-5, label smoothing 0.1,
auxiliary tower, 224x224 crops. Needs imagenet2012 prepared for
tensorflow-datasets (a manual download). The paper reports 24.3 % top-1 and
7.4 % top-5 error at 590M multiply-adds. Reports top-5 as well as top-1.
"""

from amended_darts_jax.configs import train_default


def get_config():
  c = train_default.get_config()
  c.dataset = "imagenet2012"
  c.init_channels = 42
  c.layers = 14
  c.epochs = 250
  c.batch_size = 128
  c.lr = 0.5
  c.lr_schedule = "linear"
  c.weight_decay = 3e-5
  c.label_smoothing = 0.1
  c.drop_path_prob = 0.0
  c.crop_padding = 0
  c.flip = True
  c.log_every = 100
  c.checkpoint_every = 2000
  return c
