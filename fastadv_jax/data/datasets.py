"""Host-side data: datasets as in-memory uint8 arrays, and the batches of a run.

The paper's datasets are small (<= 73k images), so each split is loaded once from TFDS into a
uint8 NumPy array; batches are sliced on the host (a pure function of (seed, batch number)) and
augmented on the device (augment.py). This keeps the input pipeline off the critical path
without tf.data in the training process.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import tempfile
from typing import Callable

import numpy as np

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the library knows of a TFDS dataset without loading it."""
  name: str                          # the TFDS name, and config.dataset
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int
  how_to_get: str                    # the advice when it is missing; {data_dir} is filled in
  # Local files that prepare_offline(data_dir, offline_dir) turns into the TFDS dataset without
  # network, when the folder exists (Debian's Fashion-MNIST).
  offline_dir: str | None = None
  prepare_offline: Callable[[str, str], None] | None = None

  def advice(self, data_dir: str) -> str:
    """How to get the dataset into `data_dir`."""
    return self.how_to_get.format(data_dir=data_dir)


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither prepared in data_dir nor obtainable; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8, NHWC
  labels: np.ndarray  # int32

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def default_data_dir(data_dir: str = "") -> str:
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepare_fashion_mnist_offline(data_dir: str,
                                  source_dir: str = DEBIAN_FASHION_MNIST_DIR) -> None:
  """Prepares TFDS `fashion_mnist` in `data_dir` from Debian's IDX files, without network.

  Debian's gzip headers differ from upstream's, so the stock builder rejects them by checksum
  even with manual_dir. This subclass keeps the stock builder's name, version and features and
  only points its split generators at the local files; afterwards the stock
  `tfds.load('fashion_mnist', data_dir=...)` reads the result.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist as tfds_mnist

  files = {
      "train_data": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
      "test_data": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
  }
  missing = [f for f in files.values() if not os.path.exists(os.path.join(source_dir, f))]
  if missing:
    raise DatasetUnavailableError(
        f"fashion_mnist: files {missing} not found in {source_dir}; "
        + DATASETS["fashion_mnist"].advice(data_dir))

  class LocalFashionMNIST(tfds_mnist.FashionMNIST, skip_registration=True):
    name = "fashion_mnist"

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      tmp = tempfile.mkdtemp(prefix="fashion_mnist_idx_")
      paths = {}
      for key, fname in files.items():
        paths[key] = os.path.join(tmp, fname[:-3])
        with gzip.open(os.path.join(source_dir, fname), "rb") as src, open(paths[key], "wb") as dst:
          shutil.copyfileobj(src, dst)
      return [
          tfds.core.SplitGenerator(name=tfds.Split.TRAIN, gen_kwargs=dict(
              num_examples=60000, data_path=paths["train_data"], label_path=paths["train_labels"])),
          tfds.core.SplitGenerator(name=tfds.Split.TEST, gen_kwargs=dict(
              num_examples=10000, data_path=paths["test_data"], label_path=paths["test_labels"])),
      ]

  LocalFashionMNIST(data_dir=data_dir).download_and_prepare()


DATASETS = {spec.name: spec for spec in (
    DatasetSpec("cifar10", (32, 32, 3), 10,
                "on a machine with internet access run `tfds build cifar10 --data_dir={data_dir}` "
                "(or train with --config.download=True) and copy the folder here"),
    DatasetSpec("svhn_cropped", (32, 32, 3), 10,
                "on a machine with internet access run `tfds build svhn_cropped "
                "--data_dir={data_dir}` and copy the folder here"),
    DatasetSpec("mnist", (28, 28, 1), 10,
                "on a machine with internet access run `tfds build mnist --data_dir={data_dir}`"),
    DatasetSpec("fashion_mnist", (28, 28, 1), 10,
                "install Debian's files with `apt-get install dataset-fashion-mnist` "
                "(scripts/setup.sh does this); they are prepared automatically",
                offline_dir=DEBIAN_FASHION_MNIST_DIR,
                prepare_offline=prepare_fashion_mnist_offline),
)}
NUM_CLASSES = {name: spec.num_classes for name, spec in DATASETS.items()}
IMAGE_SHAPES = {name: spec.image_shape for name, spec in DATASETS.items()}


def get(name: str) -> DatasetSpec:
  """The record of dataset `name`; a one-line ValueError naming the known ones."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {tuple(DATASETS)}")
  return DATASETS[name]


def _tfds_arrays(name: str, split: str, data_dir: str, download: bool):
  # Batched reads, not batch_size=-1: TF aborts on that for datasets of unknown cardinality
  # (tfds.testing.mock_data's), and batches cost nothing more for real ones.
  import tensorflow_datasets as tfds
  ds = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True, download=download)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds.batch(8192)):
    images.append(x)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


def load_split(name: str, split: str, data_dir: str = "", download: bool = True) -> Split:
  """Loads a whole TFDS split as uint8 images (NHWC) and int32 labels."""
  spec, data_dir = get(name), default_data_dir(data_dir)
  arrays = None
  if spec.prepare_offline is not None and os.path.isdir(spec.offline_dir):
    try:  # already prepared (or mocked)?
      arrays = _tfds_arrays(name, split, data_dir, download=False)
    except Exception:  # pylint: disable=broad-except
      spec.prepare_offline(data_dir, spec.offline_dir)
  try:
    images, labels = arrays if arrays is not None else _tfds_arrays(name, split, data_dir,
                                                                     download)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetUnavailableError(
        f"dataset {name!r} (split {split!r}) is not prepared in {data_dir} and could not be "
        f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). To get it: "
        + spec.advice(data_dir)) from e
  images = np.asarray(images, np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  return Split(images=images, labels=np.asarray(labels, np.int32))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The shuffling order of one data epoch; a pure function of (seed, epoch) so resumes agree."""
  return np.random.default_rng([seed, epoch]).permutation(n)


class TrainBatches:
  """Batch `b` of the run (b = 0, 1, ...) as host arrays, a pure function of (seed, b). Each
  batch carries its examples' training-set positions (`index`), which per-example method state
  is keyed on."""

  def __init__(self, split: Split, batch_size: int, seed: int):
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.batches_per_epoch = len(split) // batch_size
    self._perm_epoch, self._perm = -1, None

  def get(self, b: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(b, self.batches_per_epoch)
    if epoch != self._perm_epoch:
      self._perm_epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, len(self.split))
    idx = np.sort(self._perm[i * self.batch_size:(i + 1) * self.batch_size])
    return {"image": self.split.images[idx], "label": self.split.labels[idx],
            "index": idx.astype(np.int32)}


def fixed_subset(split: Split, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The same n points for every diagnostic evaluation of a run."""
  idx = np.sort(np.random.default_rng([seed, 12345]).permutation(len(split))[:n])
  return split.images[idx], split.labels[idx]


def hold_out(split: Split, n: int) -> tuple[Split, Split | None]:
  """(training part, validation part): the last n examples held out (the 2024-26 benchmark's
  validation split: CIFAR-10 train indices 49,000-49,999), in their stored order; (split, None)
  for n = 0. Training positions (`index`, per-example state) then count in the first part."""
  if n <= 0:
    return split, None
  if n >= len(split):
    raise ValueError(f"a validation split of {n} leaves no training example of {len(split)}")
  cut = len(split) - n
  return (Split(split.images[:cut], split.labels[:cut]),
          Split(split.images[cut:], split.labels[cut:]))
