"""Per-example losses: summed for input gradients (batch-size independent), averaged for training."""
import jax
import jax.numpy as jnp
import optax


def at_least_f32(x: jax.Array) -> jax.Array:
  """bfloat16/float16 -> float32; float32 and float64 unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy in (at least) float32, shape (n,).

  `label_smoothing` s uses PyTorch's targets (`CrossEntropyLoss(label_smoothing=s)`, which the
  2024-26 fast-AT benchmark trains with): 1 - s + s / C on the label, s / C elsewhere. s = 0 is
  the plain integer-label cross-entropy, bit for bit.
  """
  logits = at_least_f32(logits)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return soft_cross_entropy(logits, smoothed_targets(labels, logits.shape[-1], label_smoothing))


def smoothed_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """(n, C) targets: 1 - s + s / C on the label, s / C elsewhere (PyTorch's rule)."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example cross-entropy against probability targets (n, C), float32."""
  return -jnp.sum(targets * jax.nn.log_softmax(at_least_f32(logits)), axis=-1)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Per-example KL(p || q) between the softmax outputs of two logit arrays, float32."""
  log_p = jax.nn.log_softmax(at_least_f32(p_logits))
  log_q = jax.nn.log_softmax(at_least_f32(q_logits))
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)
