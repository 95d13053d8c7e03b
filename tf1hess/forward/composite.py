"""Forward rules of ops that are compositions of ops with rules.

TensorFlow runs `tf.nn.local_response_normalization` (`LRN`, in TF1 image
models after a convolution or a pool) as one kernel, and has no gradient of
its gradient, so neither the rows nor `tape.batch_jacobian` differentiate
it twice. It is a composition of ops that have rules: the rule builds that
composition beside the op, from the op's inputs, and walks it with their
rules (`walk`). A curvature term of a tensor of the composition reads that
tensor's adjoint, pulled back from the op's through the composition
(`tf.gradients` with the op's adjoint as `grad_ys`); the op's outputs keep
the model's values, the composition's Jacobians stand for theirs.

`tf.linalg.cross` (`Cross`) and `tf.math.cumulative_logsumexp`
(`CumulativeLogsumexp`) have first derivatives that TensorFlow can
differentiate, but no rule of their own: they are walked the same way, as
products of gathered components and as log-sum-exps of shifted entries.
"""

import numpy as np
import tensorflow as tf

from tf1hess.forward import jacobians
from tf1hess.forward import registry


class _Within:
  """The `_Context` of the ops of a composition standing for `op`."""

  def __init__(self, ctx, op, outputs, ops):
    self._ctx = ctx
    self._op = op
    self._outputs = outputs
    registry.of_samples(self, ctx)
    # Rows that are parts of samples are the composition's samples; `ctx`
    # regroups its curvature terms by sample.
    self.samples = ctx.n
    self.path = ctx.path | frozenset(ops)

  def dense_matmul(self):
    self._ctx.dense_matmul()

  def curvature(self, tensor, build, elementwise=False):
    del elementwise  # The adjoint is pulled back whole.

    def pulled_back(adj):
      # The composition's output holds the op's entries, in the shape of
      # its own inputs (`walk`'s `inputs`).
      adj = tf.reshape(adj, tf.shape(self._outputs))
      (inner,) = tf.gradients(
        self._outputs,
        tensor,
        grad_ys=[adj],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
      )
      return build(inner)

    self._ctx.curvature(self._op.outputs[0], pulled_back)


def walk(op, jacs, ctx, compose, inputs=None):
  """The Jacobians of `op`'s first output, `compose(*inputs)`.

  Args:
    op: the `tf.Operation` the composition stands for.
    jacs: the Jacobians of `inputs` (the first ones: the others do not
      depend on x).
    ctx: the walk's context at `op`.
    compose: callable `(*inputs) -> Tensor`: `op`'s first output.
    inputs: the tensors `compose` reads (default: `op.inputs`, whose rows
      must be samples): views of `op`'s inputs built before `walk`, such as
      the rows of `(1, N G, ...)` tensors of a layer normalization
      (`lead_one`, G rows per sample), whose Jacobians `jacs` are already.

  Raises:
    registry.Unsupported: where an op of the composition has no rule, or
      gives what the walk of the model would have to regroup.
  """
  if inputs is None and (ctx.group != 1 or ctx.lead_one):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) reads a tensor whose rows are not samples"
    )
  if any(isinstance(j, registry.Moved) for j in jacs):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) reads a tensor whose batch axis is moved"
    )
  # Where ops are built: in a branch of a `tf.cond` (`dispatch`'s choice
  # on N), a function graph, not `op`'s.
  graph = tf.compat.v1.get_default_graph()
  before = len(graph.get_operations())
  inputs = op.inputs if inputs is None else inputs
  jacs = list(jacs) + [None] * (len(inputs) - len(jacs))
  with tf.name_scope(f"{op.name.split('/')[-1]}_composed"):
    # Views made here of the inputs that depend on x, that the composition
    # reads as they are: within a control flow context (a walk in a `tf.
    # cond`'s branch), an op reads a tensor from outside through a `Switch`
    # (v1) or a placeholder (v2).
    inputs = [t if j is None else tf.identity(t) for t, j in zip(inputs, jacs)]
    output = compose(*inputs)
  ops = graph.get_operations()[before:]
  within = _Within(ctx, op, output, ops)
  known = {t.ref(): j for t, j in zip(inputs, jacs) if j is not None}
  for inner in ops:
    ins = [known.get(t.ref()) for t in inner.inputs]
    if all(j is None for j in ins):
      continue
    rule = registry.RULES.get(inner.type)
    if rule is None:
      raise registry.Unsupported(
        f"no forward rule for op type {inner.type} in {op.type} ({op.name})"
      )
    if not rule.diagonal:
      ins = [
        jacobians.materialize(j)
        if isinstance(j, jacobians.Jacobian) and j.diagonal
        else j
        for j in ins
      ]
    for t, j in zip(inner.outputs, rule.fn(inner, ins, within)):
      if j is not None and not isinstance(j, jacobians.Jacobian):
        raise registry.Unsupported(
          f"{inner.type} in {op.type} ({op.name}) gives {j!r}"
        )
      if j is not None:
        known[t.ref()] = j
  return [known.get(output.ref())]


def _local_response_normalization(u, op):
  """`u / (bias + alpha s)^beta`, `s` the sum of squares of `u` over
  `depth_radius` channels each side, as TensorFlow's `LRN` kernel."""
  channels = tf.compat.dimension_value(u.shape[-1])
  if u.shape.rank != 4 or channels is None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has channels known only at run time"
    )
  radius = op.get_attr("depth_radius")
  bias, alpha, beta = (op.get_attr(a) for a in ("bias", "alpha", "beta"))
  i = np.arange(channels)
  window = (np.abs(i[:, None] - i[None, :]) <= radius).astype(np.float64)
  s = tf.einsum("nhwc,cd->nhwd", tf.square(u), tf.constant(window, u.dtype))
  return u * tf.pow(bias + alpha * s, tf.constant(-beta, u.dtype))


@registry.register("LRN")
@registry.of_first_input
def _lrn(op, j, ctx):
  return walk(op, [j], ctx, lambda u: _local_response_normalization(u, op))


def _cross(a, b):
  """`a x b` over the last axis: products of components taken by gathers."""

  def components(t, order):
    return tf.gather(t, order, axis=-1)

  return components(a, [1, 2, 0]) * components(b, [2, 0, 1]) - components(
    a, [2, 0, 1]
  ) * components(b, [1, 2, 0])


@registry.register("Cross")
def _cross_rule(op, jacs, ctx):
  """`tf.linalg.cross`: bilinear in its two vectors of 3 entries."""
  if registry.static_rank(op.inputs[0], op) < 2:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) reads the batch axis as the vectors' axis"
    )
  return walk(op, jacs, ctx, _cross)


def _cumulative_logsumexp(u, axis, op):
  """`v_j = log sum_{i <= j} exp(u_i)` along `axis` (`i >= j` reversed),
  written `v_j + log sum_{i <= j} exp(u_i - v_j)` with the op's own `v` as
  a constant: the same derivatives, and no exponential of a positive
  number (`u_i <= v_j` where `i <= j`)."""
  rank = registry.static_rank(u, op)
  axis = int(registry.static_value(axis, "axis", op)) % rank
  size = tf.compat.dimension_value(u.shape[axis])
  if axis == 0 or size is None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) runs along the batch axis or an axis whose "
      "size is known only at run time"
    )
  if op.get_attr("exclusive"):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) is exclusive: its first entries are -inf"
    )
  v = op.outputs[0]
  i = np.arange(size)
  # Row j, column i: the entries summed into v_j.
  summed = (
    i[None, :] >= i[:, None]
    if op.get_attr("reverse")
    else (i[None, :] <= i[:, None])
  )
  outside = np.where(summed, 0.0, -np.inf).reshape(
    [size, size] + [1] * (rank - 1 - axis)
  )
  shifted = tf.expand_dims(u, axis) - tf.expand_dims(v, axis + 1)
  terms = tf.exp(shifted + tf.constant(outside, u.dtype))
  return v + tf.math.log(tf.reduce_sum(terms, axis + 1))


@registry.register("CumulativeLogsumexp")
@registry.of_first_input
def _cumulative_logsumexp_rule(op, j, ctx):
  return walk(op, [j], ctx, lambda u, axis: _cumulative_logsumexp(u, axis, op))
