"""Forward rules of reductions over entry axes: sums, extrema, products,
Euclidean norms; of `tf.nn.l2_loss`; of cumulative products; and of the
mean that `tf.nn.moments` stops the gradient of.

A reduction over the batch axis mixes samples: a sum is linear and marks
its output `MIXED`; an extremum or a product is not, and the engine
declines it.

`Prod` is the one that curves: with `v = prod_i u_i` over a group of
reduced entries, `dv/du_i = prod_{l != i} u_l` and `d2v/du_i du_j =
prod_{l != i, j} u_l` (`i != j`; 0 on the diagonal). Both come from
products of the entries themselves, never from divisions by them: the
exclusive cumulative products from both ends give the first derivatives,
and `prod_{i < l < j} u_l` (an exclusive cumulative product of each row of
the matrix `u_l if l > i else 1`) the second ones, so that zeros among the
entries (one, two or more) are exact, as are entries near zero. The second
derivatives cost `M^2` per group of `M` reduced entries (and `N K M^2` to
apply them to the Jacobian): fine for the small groups that products
reduce in practice.
"""

import numpy as np
import tensorflow as tf

from tf1hess.forward import jacobians
from tf1hess.forward import registry


def _axes_within_samples(op, does):
  """The reduction axes of `op`; raises `Unsupported` for the batch axis."""
  axes = reduction_axes(op)
  if 0 in axes:
    raise registry.MixesSamples(
      f"{op.type} ({op.name}) {does} over the batch axis"
    )
  return axes


def reduction_axes(op, ctx=None):
  """The axes, sorted and non-negative, that the reduction `op` reduces.

  With the walk's `ctx`, also those of TensorFlow's gradient of a
  broadcasting op where N is not static (`registry.broadcast_reductions`).
  """
  rank = registry.static_rank(op.inputs[0], op)
  batch_first = getattr(ctx, "batch_first", None)
  axes = None
  if batch_first is not None:
    axes = registry.broadcast_reductions(op.inputs[1], batch_first)
  if axes is None:
    axes = registry.static_value(op.inputs[1], "axis", op)
  axes = np.reshape(axes, [-1])
  return sorted({int(a) % rank for a in axes}) if rank else []


def count(u, axes):
  """The entries of `u` that a `Mean` over `axes` averages: an `int` where
  the sizes are static, else a scalar tensor."""
  sizes = [tf.compat.dimension_value(u.shape[a]) for a in axes]
  if None not in sizes:
    return int(np.prod(sizes, dtype=np.int64))
  return tf.reduce_prod(tf.gather(tf.shape(u), axes))


def _diagonal_sum(op, j, axes, keepdims):
  """`Sum`/`Mean` of a tensor of diagonal Jacobian `j` over `axes`."""
  u, out = op.inputs[0], op.outputs[0]
  rank = u.shape.rank
  # Broadcast `d` over the entries first: a sum counts every entry.
  d = tf.broadcast_to(
    j.value,
    jacobians.concat(jacobians.dims(j.value, 0, 1), jacobians.dims(u, 1)),
  )
  if op.type == "Mean":
    d = d / tf.cast(count(u, axes), d.dtype)
  if rank - 1 not in axes:
    return jacobians.diagonal(tf.reduce_sum(d, axis=axes, keepdims=keepdims))
  # The feature axis is summed: entry e' of the output holds d[..., k] for
  # tangent k, a dense (or, with a batch of 1, shared) Jacobian.
  rest = [a for a in axes if a != rank - 1]
  if rest:
    d = tf.reduce_sum(d, axis=rest, keepdims=True)
  perm = [0, rank - 1] + list(range(1, rank - 1))
  value = tf.reshape(
    tf.transpose(d, perm),
    jacobians.concat(
      jacobians.dims(d, 0, 1), jacobians.dims(d, -1), jacobians.dims(out, 1)
    ),
  )
  if tf.compat.dimension_value(d.shape[0]) == 1:
    return jacobians.shared(value[0])
  return jacobians.dense(value)


@registry.register("Sum", "Mean", linear=True, diagonal=True)
@registry.of_first_input
def _sum(op, j, ctx):
  axes = reduction_axes(op, ctx)
  if 0 in axes or not axes and op.inputs[0].shape.rank == 0:
    return [registry.MIXED]
  keepdims = op.get_attr("keep_dims")
  reduce = tf.reduce_sum if op.type == "Sum" else tf.reduce_mean
  if not axes:
    return [j]
  if j.diagonal:
    return [_diagonal_sum(op, j, axes, keepdims)]
  summed = jacobians.summed_parts(j, axes, keepdims, ctx.n, ctx.k)
  if summed is None:
    summed = jacobians.summed_by_roots(j, axes, keepdims, ctx.n)
  if summed is not None:
    if op.type == "Mean":
      summed = jacobians.scale(summed, 1 / count(op.inputs[0], axes))
    return [summed]
  return [
    jacobians.apply_per_sample(
      j, lambda m: reduce(m, axis=axes, keepdims=keepdims)
    )
  ]


@registry.register("Max", "Min")
@registry.of_first_input
def _max(op, j, ctx):
  """As TensorFlow's gradient: ties share the derivative equally."""
  axes = _axes_within_samples(op, "takes the extremum")
  u = op.inputs[0]
  picked = tf.reduce_max(u, axes, keepdims=True)
  if op.type == "Min":
    picked = tf.reduce_min(u, axes, keepdims=True)
  mask = tf.cast(tf.equal(u, picked), u.dtype)
  weights = mask / tf.reduce_sum(mask, axes, keepdims=True)
  keepdims = op.get_attr("keep_dims")
  return [
    jacobians.apply_per_sample(
      jacobians.scale(j, weights),
      lambda m: tf.reduce_sum(m, axis=axes, keepdims=keepdims),
    )
  ]


def _grouped(axes, rank):
  """A per-sample map of `(B, *e)` to `(B, *kept, M)`: the reduced axes,
  moved last and merged into one of `M` entries."""
  kept = [a for a in range(1, rank) if a not in axes]
  perm = [0] + kept + list(axes)

  def group(m):
    moved = tf.transpose(m, perm)
    shape = tf.shape(moved)
    merged = tf.reduce_prod(shape[1 + len(kept) :])
    return tf.reshape(moved, tf.concat([shape[: 1 + len(kept)], [merged]], 0))

  return group


def _pair_products(u, left, right):
  """`h[..., i, j] = prod_{l != i, j} u[..., l]` (`i != j`), 0 for `i == j`.

  `left`, `right`: the exclusive cumulative products of `u` from the left
  and from the right (`prod_{l < i}`, `prod_{l > j}`).
  """
  m = tf.shape(u)[-1]
  index = tf.range(m)
  after = index[None, :] > index[:, None]  # [i, l]: l > i
  rows = tf.where(after, tf.expand_dims(u, -2), tf.ones_like(u)[..., None, :])
  between = tf.math.cumprod(rows, axis=-1, exclusive=True)  # i < l < j
  upper = tf.expand_dims(left, -1) * between * tf.expand_dims(right, -2)
  upper = tf.where(after, upper, tf.zeros_like(upper))
  return upper + tf.linalg.matrix_transpose(upper)


def _times(jac, matrices):
  """`out[n, k, ..., i] = sum_j J[n, k, ..., j] matrices[n, ..., j, i]`.

  The tangents of `jac` (shared or dense, entries `(*kept, M)`) times each
  sample's matrices `(N, *kept, M, M)`: one matmul per sample (and kept
  index), where `tf.linalg.matvec` of the broadcast makes one per tangent.
  Returns a dense `Jacobian`.
  """
  kept = "abcdefgh"[: matrices.shape.rank - 3]
  lead = "k" if jac.shared else "nk"
  return jacobians.dense(
    tf.einsum(f"{lead}{kept}j,n{kept}ji->nk{kept}i", jac.value, matrices)
  )


@registry.register("Prod")
@registry.of_first_input
def _prod(op, j, ctx):
  axes = _axes_within_samples(op, "multiplies entries")
  if not axes:
    return [j]
  u, out = op.inputs[0], op.outputs[0]
  group = _grouped(axes, u.shape.rank)
  grouped = group(u)  # (N, *kept, M)
  jg = jacobians.apply_per_sample(j, group)
  left = tf.math.cumprod(grouped, axis=-1, exclusive=True)
  right = tf.math.cumprod(grouped, axis=-1, exclusive=True, reverse=True)
  first = jacobians.apply_per_sample(
    jacobians.scale(jg, left * right),
    lambda m: tf.reshape(
      tf.reduce_sum(m, axis=-1),
      tf.concat([tf.shape(m)[:1], tf.shape(out)[1:]], axis=0),
    ),
  )

  def build(adj):
    # sum_{i, j} adj h_ij J_i J_j^T: a term of J and of h J, both grouped.
    h = _pair_products(grouped, left, right)  # (N, *kept, M, M)
    c = tf.expand_dims(tf.reshape(adj, tf.shape(grouped)[:-1]), -1)
    return [jacobians.Term(c, jg, _times(jg, h))]

  ctx.curvature(out, build)
  return [first]


def _products_between(u):
  """`q[..., a, c] = prod_{a <= l < c} u[..., l]` for `a, c` in `0..M`
  (1 where `c <= a`): `(..., M + 1, M + 1)`, made by multiplying only."""
  m = tf.shape(u)[-1]
  from_a = tf.range(m)[None, :] >= tf.range(m + 1)[:, None]  # [a, l]
  rows = tf.where(from_a, tf.expand_dims(u, -2), tf.ones_like(u)[..., None, :])
  products = tf.math.cumprod(rows, axis=-1)  # prod_{a <= l <= c}
  ones = tf.ones_like(products[..., :1])
  return tf.concat([ones, products], axis=-1)


@registry.register("Cumprod")
@registry.of_first_input
def _cumprod(op, j, ctx):
  """`tf.math.cumprod` along an entry axis: `v_i = prod_{l < c_i} u_l`,
  with `c_i = i + 1` (`i` when exclusive; a reversed one is the same of
  the reversed entries).

  `dv_i / du_j = q[0, j] q[j + 1, c_i]` for `j < c_i`, and `d2 v_i / du_j
  du_k = q[0, j] q[j + 1, k] q[k + 1, c_i]` for `j < k < c_i`, with `q` the
  products between (`_products_between`): summed against the adjoint, the
  second derivatives are `q[0, j] q[j + 1, k] r_k` with `r_k = sum_i
  adj_i q[k + 1, c_i]`. No division: the rule is exact where entries are
  0. (TensorFlow's gradient of `Cumprod` divides by the entries with
  `div_no_nan`: at an entry that is 0 it is 0, and so are the adjoints
  that the engine takes from it, as the rows' and `tf.gradients`' first
  derivatives.)
  """
  u, out = op.inputs[0], op.outputs[0]
  rank = registry.static_rank(u, op)
  axis = int(registry.static_value(op.inputs[1], "axis", op)) % rank
  if axis == 0:
    raise registry.MixesSamples(
      f"{op.type} ({op.name}) multiplies entries over the batch axis"
    )
  exclusive, reverse = op.get_attr("exclusive"), op.get_attr("reverse")
  kept = [a for a in range(1, rank) if a != axis]
  perm = [0] + kept + [axis]
  back = [perm.index(a) for a in range(rank)]

  def group(m):  # `(B, *kept, M)`, reversed entries for a reversed one.
    m = tf.transpose(m, perm)
    return tf.reverse(m, [-1]) if reverse else m

  def ungroup(m):
    return tf.transpose(tf.reverse(m, [-1]) if reverse else m, back)

  grouped = group(u)
  jg = jacobians.apply_per_sample(j, group)
  q = _products_between(grouped)
  index = tf.range(tf.shape(grouped)[-1])
  before = q[..., 0, :-1]  # q[0, j]
  # [j, i]: q[j + 1, c_i], where j < c_i.
  within = index[:, None] < index[None, :] + (0 if exclusive else 1)
  ends = q[..., 1:, :-1] if exclusive else q[..., 1:, 1:]
  ends = tf.where(within, ends, tf.zeros_like(ends))
  first = tf.expand_dims(before, -1) * ends  # [j, i]: dv_i / du_j
  result = jacobians.apply_per_sample(_times(jg, first), ungroup)

  def build(adj):
    r = tf.linalg.matvec(ends, group(adj))  # r_k
    upper = tf.expand_dims(before, -1) * q[..., 1:, :-1] * r[..., None, :]
    upper = tf.where(
      index[:, None] < index[None, :], upper, tf.zeros_like(upper)
    )
    h = upper + tf.linalg.matrix_transpose(upper)
    ones = tf.ones_like(r[..., :1])
    return [jacobians.Term(ones, jg, _times(jg, h))]

  ctx.curvature(out, build)
  return [result]


def with_axes_kept(t, u, axes):
  """`t`, a reduction of `u` over `axes`, with those axes kept as 1."""
  kept = [1 if i in axes else d for i, d in enumerate(jacobians.dims(u))]
  return tf.reshape(t, jacobians.concat(kept))


@registry.register("EuclideanNorm")
@registry.of_first_input
def _euclidean_norm(op, j, ctx):
  """`v = sqrt(sum u^2)`: `dv = <u, du> / v` and `d2v = (sum du^2 - dv^2)
  / v`, a term of `J_u` and one of `J_v` (infinite where `v = 0`, where
  TensorFlow's gradient is not a number either)."""
  axes = _axes_within_samples(op, "takes the norm")
  u, out = op.inputs[0], op.outputs[0]
  keepdims = op.get_attr("keep_dims")
  kept = with_axes_kept(out, u, axes)
  first = jacobians.apply_per_sample(
    jacobians.scale(j, u / kept),
    lambda m: tf.reduce_sum(m, axis=axes, keepdims=keepdims),
  )

  def build(adj):
    c = with_axes_kept(adj, u, axes) / kept
    return [jacobians.Term(c, j), jacobians.Term(-adj / out, first)]

  ctx.curvature(out, build)
  return [first]


@registry.register("L2Loss")
@registry.of_first_input
def _l2_loss(op, j, ctx):
  """`tf.nn.l2_loss`: `v = sum(u^2) / 2` over every entry, samples too.

  Its output mixes samples (`MIXED`: only linear ops may follow it, as a
  loss summed over the batch); its curvature is `adj J_u^T J_u` per
  sample, whatever the order of the axes of `u` (`registry.Moved`).
  """
  u = op.inputs[0]
  if isinstance(j, registry.Moved):
    u = tf.transpose(u, np.argsort(j.perm))
    j = j.jacobian
  ctx.curvature(
    op.outputs[0], lambda adj: [jacobians.Term(adj * tf.ones_like(u), j)]
  )
  return [registry.MIXED]


def _same_reduction(op, axes):
  """Whether `op` is a `Mean` or `Sum` of its input over exactly `axes`."""
  if op.type not in ("Mean", "Sum"):
    return False
  try:
    return reduction_axes(op) == axes
  except registry.Unsupported:
    return False


def _stopped_mean(op):
  """`(u, axes)` of the `Mean` with `keep_dims` that `op`, a
  `StopGradient`, stops; `None` for any other op."""
  mean = op.inputs[0].op if op.type == "StopGradient" else None
  if mean is None or mean.type != "Mean" or not mean.get_attr("keep_dims"):
    return None
  try:
    return mean.inputs[0], reduction_axes(mean)
  except registry.Unsupported:
    return None


def variance_of(use, stop, path):
  """Whether `use` is a variance about the mean that `stop` stops: a
  `SquaredDifference` of the mean's input and `stop`, whose output the ops
  of `path` (the walk's) read only in means or sums over the axes of the
  mean; or TensorFlow's gradient of such a variance.

  That gradient, `2 adj (u - stop)` (the `Sub` of `u` and `stop`), is the
  exact first derivative (the stop changes none), and a function of x
  whose own derivatives are those of the model's where the stop is the
  identity: a Hessian of a function of gradients (forces, residuals) of a
  model with `tf.nn.moments`.
  """
  stopped = _stopped_mean(stop)
  if stopped is None:
    return False
  u, axes = stopped
  if use.type == "Sub":
    return [t.ref() for t in use.inputs] == [
      u.ref(),
      stop.outputs[0].ref(),
    ] and any(
      variance_of(v, stop, path)
      for v in stop.outputs[0].consumers()
      if v.type == "SquaredDifference" and v in path
    )
  if use.type != "SquaredDifference":
    return False
  if {t.ref() for t in use.inputs} != {u.ref(), stop.outputs[0].ref()}:
    return False
  readers = [r for r in use.outputs[0].consumers() if r in path]
  return all(_same_reduction(r, axes) for r in readers)


def stops_a_mean_within_samples(op):
  """Whether `op` may be the `StopGradient` of `tf.nn.moments` over axes
  of each sample (a layer normalization), not over the batch axis (a batch
  normalization in training, which mixes samples)."""
  stopped = _stopped_mean(op)
  return stopped is not None and 0 not in stopped[1]


def stops_a_variance_mean(op):
  """Whether `op` may be the `StopGradient` of `tf.nn.moments`.

  `tf.nn.moments` (and Keras 2's `LayerNormalization` outside float32,
  built on it) computes the variance as `mean((u - stop_gradient(m))^2)`
  over the axes of `m = mean(u)`. The gradient of the variance with
  respect to `m` is `-2 mean(u - m) = 0`, so the stop changes no first
  derivative, but it drops the curvature through `m`: TensorFlow's second
  derivatives of the variance are off by `-2 / M^2` for each pair of the M
  entries reduced (those of a layer normalization, by as much as the
  Hessian itself). The walk follows a stop of a `Mean` with `keep_dims`
  as the identity where the ops of its path read it only in such
  variances and their gradients (`variance_of`, checked by the walk; the
  adjoint pass carries what reaches it on: `engine._adjoints`), so that
  the engine's second derivatives are those of the function the model
  computes; the rows are TensorFlow's (`dispatch.rows_are_exact`).
  """
  return _stopped_mean(op) is not None


@registry.register("StopGradient", linear=True, diagonal=True)
def _moments_stop(op, jacs, ctx):
  """The identity: the walk follows a `StopGradient` only where it stops
  the mean of `tf.nn.moments` (`stops_a_variance_mean`)."""
  del op, ctx  # Unused.
  return [jacs[0]]


@registry.adjoint("StopGradient", first_order=False)
def _moments_stop_adjoint(op, path):
  """The identity, where the walk follows the `StopGradient` of
  `tf.nn.moments` into TensorFlow's gradient of the variance (a `Sub`:
  `variance_of`); elsewhere what it holds back is zero
  (`stops_a_variance_mean`), and TensorFlow's gradient, none, is right."""
  if not any(
    use.type == "Sub" and use in path for use in op.outputs[0].consumers()
  ):
    return None
  return lambda adj: [(op.inputs[0], adj)]


registry.rowwise(
  "Sum", "Mean", "Max", "Min", "Prod", "EuclideanNorm", "L2Loss", "StopGradient"
)
registry.moves("L2Loss", "StopGradient")
