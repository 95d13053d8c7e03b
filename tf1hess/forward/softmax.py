"""Forward rules of the softmax family, over the last axis.

With `s = softmax(u)` and the tangent `du`, `m = <s, du>` (a sum over the
last axis) is itself a Jacobian, `J_m = sum(s * J_u)`, so every second
derivative below is a sum of `jacobians.Term`s of `J_u` and `J_m`:

- `log_softmax`: `d2 v_i = -(<s, du^2> - m^2)` for every `i`;
- `softmax`: `sum_i a_i d2 s_i = <(a - A) s, du^2> - 2 m <a s, du> + 2 A m^2`
  with `A = <a, s>`;
- cross-entropy `-<labels, log_softmax(u)>`: `L (<s, du^2> - m^2)` with
  `L = sum(labels)`. TensorFlow's kernel and gradient of
  `SoftmaxCrossEntropyWithLogits` take `L = 1` (labels are probabilities);
  with other labels the loss, its gradient and these terms disagree. Its
  second output, `s - labels`, which TensorFlow's gradient of the loss
  reads, has the derivatives of `softmax`. Labels that depend on x make
  the loss the composition `-<labels, log_softmax(u)>` (`composite.walk`).
"""

import tensorflow as tf

from tf1hess.forward import composite
from tf1hess.forward import jacobians
from tf1hess.forward import registry


def _last_axis_sum(jac):
  """The Jacobian of `sum(v, -1, keepdims=True)` from that of `v`."""
  return jacobians.apply_per_sample(
    jac, lambda m: tf.reduce_sum(m, axis=-1, keepdims=True)
  )


def _weighted_mean(jac, s):
  """`J_m` of `m = <s, v>` over the last axis, entries `(..., 1)`."""
  return _last_axis_sum(jacobians.scale(jac, s))


def _minus(a, b):
  return jacobians.add(a, jacobians.negate(b))


@registry.register("LogSoftmax")
def _log_softmax(op, jacs, ctx):
  (j,) = jacs
  if j is None:
    return [None]
  v = op.outputs[0]
  s = tf.exp(v)
  jm = _weighted_mean(j, s)

  def build(adj):
    total = tf.reduce_sum(adj, axis=-1, keepdims=True)
    return [jacobians.Term(-total * s, j), jacobians.Term(total, jm)]

  ctx.curvature(v, build)
  return [jacobians.fit(_minus(j, jm), v)]


@registry.register("Softmax")
def _softmax(op, jacs, ctx):
  (j,) = jacs
  if j is None:
    return [None]
  s = op.outputs[0]
  return [_softmax_jacobian(j, s, s, ctx)]


def _softmax_jacobian(j, s, out, ctx):
  """The Jacobian of `out`, `s = softmax(u)` (`u` of Jacobian `j`) or `s`
  minus a constant, and its curvature."""
  jm = _weighted_mean(j, s)

  def build(adj):
    total = tf.reduce_sum(adj * s, axis=-1, keepdims=True)
    jq = _weighted_mean(j, adj * s)
    return [
      jacobians.Term((adj - total) * s, j),
      jacobians.Term(-tf.ones_like(total), jm, jq, symmetric=True),
      jacobians.Term(2 * total, jm),
    ]

  ctx.curvature(out, build)
  return jacobians.fit(
    _minus(jacobians.scale(j, s), jacobians.scale(jm, s)), out
  )


def _cross_entropy(op, jacs, ctx, labels, label_sum):
  """Rule of `loss = -<labels, log_softmax(u)>`, `(N,)`, for `u` `(N, C)`."""
  j = jacs[0]
  if j is None:
    return [None, None]
  u, loss = op.inputs[0], op.outputs[0]
  if registry.static_rank(u, op) != 2:
    raise registry.Unsupported(f"{op.type} ({op.name}) has logits of rank != 2")
  s = tf.nn.softmax(u)
  jm = _weighted_mean(j, s)
  slope = label_sum * s - labels
  grad = jacobians.apply_per_sample(
    jacobians.scale(j, slope), lambda m: tf.reduce_sum(m, axis=-1)
  )

  def build(adj):
    c = tf.expand_dims(adj, -1) * label_sum  # (N, 1)
    return [jacobians.Term(c * s, j), jacobians.Term(-c, jm)]

  ctx.curvature(loss, build)
  # The backprop output, `softmax(u) - labels` (the kernel's, whatever the
  # labels sum to), which TensorFlow's gradient of the loss reads: walked
  # where the path reads it (a function of that gradient in `ys`).
  backprop = op.outputs[1]
  if not any(use in ctx.path for use in backprop.consumers()):
    return [grad, None]
  return [grad, _softmax_jacobian(j, s, backprop, ctx)]


@registry.register("SoftmaxCrossEntropyWithLogits")
def _softmax_cross_entropy(op, jacs, ctx):
  if jacs[1] is not None:
    return _with_labels_of_x(op, jacs, ctx)
  labels = tf.cast(op.inputs[1], op.inputs[0].dtype)
  return _cross_entropy(
    op, jacs, ctx, labels, tf.reduce_sum(labels, -1, keepdims=True)
  )


def _with_labels_of_x(op, jacs, ctx):
  """The loss of labels that depend on x (soft targets made by the model,
  distillation): the composition `-<labels, log_softmax(u)>`, as the
  kernel computes it. TensorFlow's gradient of its second output, `s -
  labels`, has no part for the labels, so the rows miss the curvature
  through them (`dispatch`)."""
  if any(use in ctx.path for use in op.outputs[1].consumers()):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has labels that depend on x, and its gradient "
      "is read"
    )
  if registry.static_rank(op.inputs[0], op) != 2:
    raise registry.Unsupported(f"{op.type} ({op.name}) has logits of rank != 2")

  def loss(u, labels):
    return -tf.reduce_sum(labels * tf.nn.log_softmax(u), axis=-1)

  return composite.walk(op, jacs, ctx, loss) + [None]


@registry.register("SparseSoftmaxCrossEntropyWithLogits")
def _sparse_softmax_cross_entropy(op, jacs, ctx):
  u = op.inputs[0]
  depth = tf.shape(u)[-1]
  labels = tf.one_hot(op.inputs[1], depth, dtype=u.dtype)
  return _cross_entropy(op, jacs, ctx, labels, tf.ones([], u.dtype))


registry.rowwise(
  "Softmax",
  "LogSoftmax",
  "SoftmaxCrossEntropyWithLogits",
  "SparseSoftmaxCrossEntropyWithLogits",
)
