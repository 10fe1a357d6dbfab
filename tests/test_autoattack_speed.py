"""The AutoAttack speed-ups give what the plain code gives: the same permutation, the same bits,
the same per-point results."""
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax.autoattack import fab


def _reference_projection(p, w, b):
  """fab.project_onto_hyperplane_linf as it was, sorting with jnp.argsort."""
  c = b - jnp.sum(w * p, axis=1)
  direction = jnp.sign(c)[:, None] * jnp.sign(w)
  room = jnp.where(direction > 0, 1.0 - p, p)
  aw = jnp.abs(w)
  order = jnp.argsort(room, axis=1)
  r = jnp.take_along_axis(room, order, axis=1)
  a = jnp.take_along_axis(aw, order, axis=1)
  below = jnp.cumsum(a * r, axis=1) - a * r
  above = jnp.sum(a, axis=1, keepdims=True) - jnp.cumsum(a, axis=1) + a
  f_at_r = below + r * above
  need = jnp.abs(c)[:, None]
  k = jnp.sum(f_at_r < need, axis=1, keepdims=True)
  reachable = k < p.shape[1]
  k = jnp.minimum(k, p.shape[1] - 1)
  lam = (need - jnp.take_along_axis(below, k, axis=1)) / jnp.maximum(
      jnp.take_along_axis(above, k, axis=1), 1e-30)
  lam = jnp.where(reachable, jnp.maximum(lam, 0.0), jnp.inf)
  return direction * jnp.minimum(lam, room)


def test_argsort_rows_is_jnp_argsort():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(16, 200)).astype(np.float32)
  v[:, :40] = 0.0                          # ties, as the many black pixels of an image give
  v[:, 40:50] = -0.0                       # -0 ties with 0
  v[:, 50:60] = np.round(v[:, 50:60])      # more ties, negative ones among them
  v[:4, 60:64] = np.nan
  v[4:8, 64:66] = [np.inf, -np.inf]
  v[8:, 66:70] = -np.nan
  v[:, 70:72] = [1e-40, -1e-40]            # subnormals
  got = np.asarray(jax.jit(fab.argsort_rows)(jnp.asarray(v)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argsort(jnp.asarray(v), axis=1)))


def test_projection_gives_the_bits_of_the_argsort_version():
  rng = np.random.default_rng(1)
  n, d = 48, 300
  p = rng.uniform(size=(n, d)).astype(np.float32)
  p[:, :100], p[:, 100:140] = 0.0, 1.0  # image-like ties in the room to the box faces
  w = rng.normal(size=(n, d)).astype(np.float32)
  w[:, 140:150] = 0.0
  b = (np.sum(w * p, 1) + rng.normal(scale=6.0, size=n)).astype(np.float32)
  new = np.asarray(jax.jit(fab.project_onto_hyperplane_linf)(p, w, b))
  old = np.asarray(jax.jit(_reference_projection)(p, w, b))
  np.testing.assert_array_equal(new.view(np.int32), old.view(np.int32))


def test_reused_chunk_sizes_give_the_same_per_point_results(monkeypatch):
  from fastadv_jax.autoattack import device_runs, runner  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  w = rng.normal(size=(36, 5)).astype(np.float32)
  x = rng.uniform(size=(60, 6, 6, 1)).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))

  def run(slack):
    monkeypatch.setattr(device_runs, "REUSE_SLACK", slack)
    aa = runner.AutoAttack(lambda _, z, key: logits_fn(z), 5, 0.05, "apgd-t,fab-t,square",
                           apgd_steps=3, fab_steps=3, square_queries=40, batch_size=32,
                           devices=jax.local_devices()[:1], progress=False)
    return aa.run((), x, y, seed=1), aa.device.chunk_sizes

  plain, plain_sizes = run(0.0)    # a fresh (balanced) chunk size for every pass
  reused, reused_sizes = run(100.0)  # every pass in the first size (duplicated points pad it)
  assert all(len(v) == 1 for v in reused_sizes.values())
  assert sum(map(len, plain_sizes.values())) > len(plain_sizes)
  assert 0 < reused.robust.sum() < reused.clean.sum()  # some points broken, some not
  np.testing.assert_array_equal(plain.robust, reused.robust)
  np.testing.assert_array_equal(plain.broken_by, reused.broken_by)
  np.testing.assert_array_equal(plain.x_adv, reused.x_adv)
