"""Device-side input processing, run inside the jitted step: uint8 -> float, random crop/flip.

Host-side loading is datasets.py; keeping augmentation on the device (one key per example) makes
it part of the pure step, independent of the device split and of resumption.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fastadv_jax import randomness


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def augment(keys: jax.Array, images: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """Random crop with zero padding and/or random horizontal flip, one key per example."""
  if crop_padding <= 0 and not flip:
    return images
  crop_keys, flip_keys = randomness.split_keys(keys, 2)

  def one(img, ck, fk):
    if crop_padding > 0:
      p = crop_padding
      padded = jnp.pad(img, ((p, p), (p, p), (0, 0)))
      dy, dx = jax.random.randint(ck, (2,), 0, 2 * p + 1)
      img = jax.lax.dynamic_slice(padded, (dy, dx, 0), img.shape)
    if flip:
      img = jnp.where(jax.random.bernoulli(fk), img[:, ::-1, :], img)
    return img

  return jax.vmap(one)(images, crop_keys, flip_keys)
