"""Per-example losses: summed for input gradients (batch-size independent), averaged for training."""
import jax
import jax.numpy as jnp
import optax


def at_least_f32(x: jax.Array) -> jax.Array:
  """bfloat16/float16 -> float32; float32 and float64 unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in (at least) float32, shape (n,)."""
  return optax.softmax_cross_entropy_with_integer_labels(at_least_f32(logits), labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)
