"""Data module: every dataset on mock data, augmentation, real offline Fashion-MNIST."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fastadv_jax.data import augment, datasets

SHAPES = {"cifar10": (32, 32, 3), "svhn_cropped": (32, 32, 3), "mnist": (28, 28, 1),
          "fashion_mnist": (28, 28, 1)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_mock_datasets_load_as_uint8_arrays(name, tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    split = datasets.load_split(name, "train", str(tmp_path))
  assert split.images.shape == (20,) + SHAPES[name]
  assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
  assert split.labels.min() >= 0 and split.labels.max() < datasets.NUM_CLASSES[name]
  x = np.asarray(augment.to_float(split.images))
  assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
  assert x.max() > 0.5  # really scaled by 1/255, not clipped to 0


@pytest.mark.parametrize("padding,flip", [(4, True), (4, False), (0, True)])
def test_augmentation_keeps_shape_and_range(padding, flip):
  x = jax.random.uniform(jax.random.key(0), (32, 32, 32, 3))
  keys = jax.random.split(jax.random.key(1), 32)
  y = augment.augment(keys, x, padding, flip)
  assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  assert not np.allclose(y, x)  # some example was changed


def test_crop_is_a_zero_padded_shift_and_flip_mirrors():
  x = jax.random.uniform(jax.random.key(0), (64, 8, 8, 1)) + 1.0  # no zeros in the image
  keys = jax.random.split(jax.random.key(2), 64)
  y = np.asarray(augment.augment(keys, x, 2, False))
  xp = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(64):  # each output is one of the 25 windows of the padded image
    windows = [xp[i, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
    assert any(np.array_equal(y[i], w) for w in windows)
  z = np.asarray(augment.augment(keys, x, 0, True))
  flipped = [np.array_equal(z[i], np.asarray(x)[i, :, ::-1]) for i in range(64)]
  kept = [np.array_equal(z[i], np.asarray(x)[i]) for i in range(64)]
  assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_no_augmentation_is_identity():
  x = jnp.ones((4, 28, 28, 1))
  assert augment.augment(jax.random.split(jax.random.key(0), 4), x, 0, False) is x


def test_shuffling_is_seeded_and_covers_the_epoch():
  split = datasets.Split(np.zeros((50, 2, 2, 1), np.uint8), np.arange(50, dtype=np.int32))
  a, b = datasets.TrainBatches(split, 10, seed=3), datasets.TrainBatches(split, 10, seed=3)
  epoch0 = np.concatenate([a.get(i)["label"] for i in range(5)])
  assert sorted(epoch0) == list(range(50))
  assert all(np.array_equal(a.get(i)["label"], b.get(i)["label"]) for i in range(12))
  assert not np.array_equal(a.get(0)["label"], a.get(5)["label"])  # a new order next epoch
  c = datasets.TrainBatches(split, 10, seed=4)
  assert not all(np.array_equal(a.get(i)["label"], c.get(i)["label"]) for i in range(5))


def test_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(datasets.DatasetUnavailableError, match="tfds build cifar10"):
    datasets.load_split("cifar10", "test", str(tmp_path), download=False)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.load_split("imagenet", "test")


@pytest.mark.skipif(not os.path.isdir(datasets.DEBIAN_FASHION_MNIST_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh)")
def test_real_fashion_mnist_offline():
  test = datasets.load_split("fashion_mnist", "test")  # prepared from the Debian files if needed
  train = datasets.load_split("fashion_mnist", "train")
  assert len(test) == 10000 and len(train) == 60000
  assert test.images.shape == (10000, 28, 28, 1) and test.images.dtype == np.uint8
  assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10  # balanced classes
  assert 60 < test.images.mean() < 85  # real clothing images (mean pixel ~73), not noise
  assert test.images.max() == 255 and test.images.min() == 0
