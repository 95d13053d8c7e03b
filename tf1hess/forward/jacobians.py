"""Per-sample Jacobians with structure, and the curvature terms built on them.

A tensor `v` of shape `(N, *e)` that depends on the input `x` `(N, K)` has
the per-sample Jacobian `J_v[n, k, *e] = d v[n, *e] / d x[n, k]`: the K
tangents are one extra axis, right after the batch axis, so that a matmul by
weights is one matmul of `(N * K, units)`. Two structures are kept:

- shared: the Jacobian is the same in every sample and is stored once as
  `(K, *e)` (`x` itself is the identity; a matmul of a shared Jacobian by
  weights is the weight matrix);
- dense: `(N, K, *e)`.

A shared Jacobian is a dense one with a batch of 1: TensorFlow's
broadcasting combines the two without copies. A tensor that does not depend
on `x` has no Jacobian (`None`).

A curvature term `sum_e c[n, e] J_a[n, :, e] J_b[n, :, e]^T` (plus its
transpose when symmetric) is contracted into the full per-sample Hessian
`(N, K, K)`, its diagonal `(N, K)` or its trace `(N,)`; shared Jacobians make
each contraction one matmul with the weights instead of a batched one.
"""

import tensorflow as tf

HESSIAN = "hessian"
DIAGONAL = "diagonal"
LAPLACIAN = "laplacian"
MODES = (HESSIAN, DIAGONAL, LAPLACIAN)


class Jacobian:
  """`value` `(K, *e)` when `shared`, else `(N, K, *e)`."""

  __slots__ = ("value", "shared")

  def __init__(self, value, shared):
    self.value = value
    self.shared = shared

  @property
  def entry_rank(self):
    return self.value.shape.rank - (1 if self.shared else 2)

  def entry_shape(self):
    """The dynamic shape `*e` of the entries."""
    return tf.shape(self.value)[1 if self.shared else 2 :]


def dense(value):
  return Jacobian(value, False)


def shared(value):
  return Jacobian(value, True)


def apply_per_sample(jac, fn):
  """Applies the per-sample linear map `fn` to every tangent of `jac`.

  `fn` maps a batch `(B, *e)` to `(B, *e')` sample by sample (a reshape of
  the entries, a transpose that keeps the batch axis, a slice, a sum over
  entry axes, ...). A shared Jacobian is such a batch with `B = K`; a dense
  one is reshaped to `B = N * K` and back.
  """
  if jac.shared:
    return shared(fn(jac.value))
  shape = tf.shape(jac.value)
  merged = tf.reshape(
    jac.value, tf.concat([[shape[0] * shape[1]], shape[2:]], axis=0)
  )
  out = fn(merged)
  value = tf.reshape(out, tf.concat([shape[:2], tf.shape(out)[1:]], axis=0))
  return dense(value)


def scale(jac, s):
  """`J` of `s * v` for a `v` of Jacobian `jac` and `s` independent of `x`.

  `s` broadcasts against `v` `(N, *e)`: when it has no batch axis (fewer
  dimensions than `v`, or a static batch of 1), a shared `jac` stays shared.
  """
  s = tf.cast(s, jac.value.dtype)
  rank = jac.entry_rank
  if s.shape.rank is not None and s.shape.rank <= rank:
    return Jacobian(jac.value * s, jac.shared)
  if s.shape.rank == rank + 1 and tf.compat.dimension_value(s.shape[0]) == 1:
    return Jacobian(jac.value * s[0], jac.shared)
  return dense(tf.expand_dims(s, 1) * jac.value)


def add(a, b):
  """The sum of two Jacobians (or `None`s) of tensors of the same entries."""
  if a is None:
    return b
  if b is None:
    return a
  return Jacobian(a.value + b.value, a.shared and b.shared)


def fit(jac, out):
  """Broadcasts `jac` to the entries of `out` `(N, *e)` when they differ."""
  if jac is None:
    return None
  lead = 1 if jac.shared else 2
  have = jac.value.shape[lead:]
  want = out.shape[1:]
  if have.is_fully_defined() and want.is_fully_defined() and have == want:
    return jac
  shape = tf.concat([tf.shape(jac.value)[:lead], tf.shape(out)[1:]], axis=0)
  return Jacobian(tf.broadcast_to(jac.value, shape), jac.shared)


def cast(jac, dtype):
  if jac.value.dtype == dtype:
    return jac
  return Jacobian(tf.cast(jac.value, dtype), jac.shared)


def to_dense(jac, n):
  """`jac` as a dense `(N, K, *e)` value."""
  if not jac.shared:
    return jac.value
  shape = tf.concat([[n], tf.shape(jac.value)], axis=0)
  return tf.broadcast_to(jac.value, shape)


def zeros_like_entries(t, k, dtype):
  """A shared zero Jacobian for a tensor `t` independent of `x`."""
  return shared(tf.zeros(tf.concat([[k], tf.shape(t)[1:]], axis=0), dtype))


class Term:
  """`sum_e c[n, e] J_a[n, :, e] J_b[n, :, e]^T` (+ transpose if symmetric).

  `c` broadcasts against the entries `(N, *e)` of `a` and `b` (which have
  the same entries).
  """

  __slots__ = ("c", "a", "b", "symmetric")

  def __init__(self, c, a, b=None, symmetric=False):
    self.c = c
    self.a = a
    self.b = a if b is None else b
    self.symmetric = symmetric


def _size(jac):
  """The number of entries `M = prod(*e)` (no `-1` in reshapes: N may be 0)."""
  return tf.reduce_prod(jac.entry_shape())


def _flat(jac):
  """`(K, M)` or `(N, K, M)`."""
  lead = tf.shape(jac.value)[: 1 if jac.shared else 2]
  return tf.reshape(jac.value, tf.concat([lead, [_size(jac)]], axis=0))


def _flat_c(c, jac, n):
  """`c` broadcast to the entries of `jac` and flattened to `(N, M)`."""
  c = tf.cast(c, jac.value.dtype)
  shape = tf.concat([[n], jac.entry_shape()], axis=0)
  return tf.reshape(tf.broadcast_to(c, shape), tf.stack([n, _size(jac)]))


def contract(term, mode, n, k):
  """The term's Hessian `(N, K, K)`, diagonal `(N, K)` or trace `(N,)`."""
  a, b = term.a, term.b
  c = _flat_c(term.c, a, n)  # (N, M)
  fa, fb = _flat(a), _flat(b)
  m = _size(a)
  if mode == HESSIAN:
    if b.shared:
      # (N K, M) @ (M, K): one matmul by the shared factor.
      left = tf.reshape(tf.expand_dims(c, 1) * fa, tf.stack([n * k, m]))
      out = tf.reshape(
        tf.matmul(left, fb, transpose_b=True), tf.stack([n, k, k])
      )
    elif a.shared:
      left = tf.reshape(tf.expand_dims(c, 1) * fb, tf.stack([n * k, m]))
      out = tf.reshape(
        tf.matmul(left, fa, transpose_b=True), tf.stack([n, k, k])
      )
      out = tf.transpose(out, [0, 2, 1])
    else:
      out = tf.matmul(tf.expand_dims(c, 1) * fa, fb, transpose_b=True)
    return out + tf.transpose(out, [0, 2, 1]) if term.symmetric else out
  if a.shared and b.shared:
    prod = fa * fb  # (K, M)
    if mode == DIAGONAL:
      out = tf.matmul(c, prod, transpose_b=True)
    else:
      out = tf.linalg.matvec(c, tf.reduce_sum(prod, axis=0))
  else:
    prod = fa * fb  # (N, K, M), broadcast
    if mode == DIAGONAL:
      out = tf.reduce_sum(tf.expand_dims(c, 1) * prod, axis=2)
    else:
      out = tf.reduce_sum(c * tf.reduce_sum(prod, axis=1), axis=1)
  return 2.0 * out if term.symmetric else out
