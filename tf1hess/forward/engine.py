"""The forward engine: per-sample Hessians from forward Jacobians, op by op.

For an input `x` `(N, d...)` and outputs `ys`, the walk visits the ops on a
path from `x` to `ys` in topological order and builds, with the rule of each
op type (`registry.RULES`), the per-sample Jacobian of every tensor on the
way (see `jacobians`). A rule also says how its op curves: the per-sample
Hessian of `sum(ys)` is

  H = sum over nonlinear ops of J_in^T [adj_out . d2 op] J_in,

where `adj_out = d sum(ys) / d out` comes from one ordinary `tf.gradients`
pass for all such ops at once (Dangel et al., "Modular block-diagonal
curvature approximations", AISTATS 2020; the forward Laplacian of Li et al.,
Nature Machine Intelligence 2024, takes the trace of the same sum). The
diagonal and the trace contract the same terms more cheaply.

Linear ops that do not keep samples apart (a sum over the batch, a reshape
that merges it) are followed as "mixed": no Jacobian is needed past them as
long as only linear ops follow. An op without a rule, or a nonlinear op on a
mixed tensor, raises `Unsupported`, and the caller falls back to the row loop.
"""

import collections

import tensorflow as tf

from tf1hess.forward import jacobians
from tf1hess.forward import registry

# Ops through which no gradient flows (as in `_core._NO_GRADIENT`).
_NO_GRADIENT = frozenset(
  [
    "Shape",
    "ShapeN",
    "Size",
    "Rank",
    "StopGradient",
    "ZerosLike",
    "OnesLike",
  ]
)

Unsupported = registry.Unsupported

# What `second_derivatives` returns: the result, whether any op curves, and
# what the cost model of `dispatch` reads (see `second_derivatives`).
Result = collections.namedtuple(
  "Result", ["value", "connected", "widest", "dense_matmuls"]
)


def _differentiable(t):
  """Whether a gradient can flow through `t`: not an integer, bool, string.

  Variant and resource tensors count: a `tf.scan` passes its values to its
  loop in a variant tensor list, and the loop op (which has no rule) must
  be seen as depending on `x`, not skipped.
  """
  dtype = t.dtype.base_dtype
  return not (dtype.is_integer or dtype.is_bool or dtype == tf.string)


def _dependent_tensors(x):
  """The tensors a gradient can flow to from `x`."""
  out, stack = {_key(x)}, [x]
  while stack:
    t = stack.pop()
    for op in t.consumers():
      if op.type in _NO_GRADIENT:
        continue
      for o in op.outputs:
        if _differentiable(o) and _key(o) not in out:
          out.add(_key(o))
          stack.append(o)
  return out


def _key(t):
  return (t.op.name, t.value_index)


def _ordered_ops(x, ys, dependent):
  """Ops with a dependent input on a path to `ys`, inputs before consumers."""
  order, state = [], {}
  stack = [
    (y.op, False) for y in ys if _key(y) in dependent and y.op is not x.op
  ]
  while stack:
    op, done = stack.pop()
    if done:
      if state.get(op) != 2:
        state[op] = 2
        order.append(op)
      continue
    if state.get(op):
      continue
    state[op] = 1
    stack.append((op, True))
    for t in op.inputs:
      if _key(t) in dependent and t.op is not x.op:
        stack.append((t.op, False))
  return order


class _Context:
  """What a rule sees: the batch size, `K`, and where to put curvature."""

  def __init__(self, n, k, dtype):
    self.n = n
    self.k = k
    self.dtype = dtype
    self.pending = []  # (tensor, adj -> [Term])
    self.dense_matmuls = 0

  def dense_matmul(self):
    """Counts a matmul of a dense Jacobian (N K rows), for the cost model."""
    self.dense_matmuls += 1

  def curvature(self, tensor, build):
    """Adds the terms `build(adj)` of `tensor`'s adjoint `adj` (its shape)."""
    self.pending.append((tensor, build))


def _identity_jacobian(x, k):
  """The Jacobian of `x` `(N, d...)`: the identity.

  Diagonal (ones `(1, K)`) for `(N, K)` with a static K, else shared,
  `(K, d...)`.
  """
  if x.shape.rank == 2 and tf.compat.dimension_value(x.shape[1]) is not None:
    return jacobians.diagonal(tf.ones([1, x.shape[1]], x.dtype))
  eye = tf.eye(k, dtype=x.dtype)
  return jacobians.shared(
    tf.reshape(eye, tf.concat([[k], tf.shape(x)[1:]], axis=0))
  )


def _gradient_overridden(op):
  try:
    op.get_attr("_gradient_op_type")
  except ValueError:
    return False
  return True


def _set_static_shape(jac, t, x):
  """Gives `jac` the static shape that `t` and `x` know (for `fit`)."""
  k = x.shape[1:].num_elements() if x.shape[1:].is_fully_defined() else None
  if jac.diagonal:
    lead = [None]  # N or 1
  else:
    lead = [k] if jac.shared else [x.shape[0], k]
  if t.shape.rank is None:
    return
  shape = tf.TensorShape(lead).concatenate(t.shape[1:])
  if not jac.value.shape.is_compatible_with(shape):
    raise Unsupported(
      f"the Jacobian of {t.name} has shape {jac.value.shape}, not {shape}"
    )
  jac.value.set_shape(shape)


def check_input(x):
  """Raises `Unsupported` unless `x` is a graph tensor the walk can start at."""
  if not isinstance(x, tf.Tensor) or not hasattr(x, "op"):
    raise Unsupported(
      f"the input is a {type(x).__name__}, not a graph tensor (variables are"
      " read through ops the walk does not follow)"
    )


@tf.autograph.experimental.do_not_convert
def second_derivatives(ys, x, mode):
  """Per-sample Hessians, diagonals or Laplacians of `sum(ys)` by the walk.

  Args:
    ys: a list of `Tensor`s.
    x: a `Tensor` `(N, d...)` of the graph of `ys`.
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.

  Returns:
    A `Result`: `value` a `Tensor` `(N, K, K)`, `(N, K)` or `(N,)` with
    `K = prod(d...)`, in `x.dtype`; `connected` whether any op curves
    (`False`: the value is zeros); for the cost model, `widest` the largest
    number of entries per sample of a curvature term whose Jacobians are not
    both diagonal (0 if none; `None` when not static) and `dense_matmuls`
    the number of matmuls of dense Jacobians.

  Raises:
    Unsupported: when an op on the way has no rule, or a rule cannot follow
      it; the message says which op and why.
  """
  check_input(x)
  n, k = tf.shape(x)[0], tf.reduce_prod(tf.shape(x)[1:])
  dependent = _dependent_tensors(x)
  ctx = _Context(n, k, x.dtype)
  jacs = {_key(x): _identity_jacobian(x, k)}
  for op in _ordered_ops(x, ys, dependent):
    rule = registry.RULES.get(op.type)
    if rule is None:
      raise Unsupported(f"no forward rule for op type {op.type} ({op.name})")
    if _gradient_overridden(op):
      raise Unsupported(
        f"{op.type} ({op.name}) has its gradient overridden "
        "(gradient_override_map): its rule would not match its gradient"
      )
    ins = [
      jacs.get(_key(t)) if _key(t) in dependent else None for t in op.inputs
    ]
    for j in ins:
      if isinstance(j, registry.Unfollowed):
        raise Unsupported(f"{op.type} ({op.name}) reads {j.reason}")
    if any(j is registry.MIXED for j in ins):
      linear = rule.linear(op, ins) if callable(rule.linear) else rule.linear
      if not linear:
        raise Unsupported(
          f"{op.type} ({op.name}) is nonlinear in a tensor that mixes samples"
          " (a sum or reshape over the batch axis before it)"
        )
      outs = [registry.MIXED] * len(op.outputs)
    else:
      if not rule.diagonal:
        ins = [
          jacobians.materialize(j) if isinstance(j, jacobians.Jacobian) else j
          for j in ins
        ]
      outs = rule.fn(op, ins, ctx)
    for t, j in zip(op.outputs, outs):
      if j is not None and _key(t) in dependent:
        if isinstance(j, jacobians.Jacobian):
          _set_static_shape(j, t, x)
        jacs[_key(t)] = j
  if not ctx.pending:
    shape = {
      jacobians.HESSIAN: tf.stack([n, k, k]),
      jacobians.DIAGONAL: tf.stack([n, k]),
      jacobians.LAPLACIAN: tf.reshape(n, [1]),
    }[mode]
    return Result(tf.zeros(shape, x.dtype), False, 0, ctx.dense_matmuls)
  adjoints = tf.gradients(
    ys,
    [t for t, _ in ctx.pending],
    unconnected_gradients=tf.UnconnectedGradients.ZERO,
  )
  grouped = {}
  for (_, build), adj in zip(ctx.pending, adjoints):
    for term in build(adj):
      key = (id(term.a), id(term.b), term.symmetric)
      if key in grouped:
        old = grouped[key]
        term = jacobians.Term(
          old.c + tf.cast(term.c, old.c.dtype), old.a, old.b, old.symmetric
        )
      grouped[key] = term
  parts = [
    tf.cast(jacobians.contract(term, mode, n, k), x.dtype)
    for term in grouped.values()
  ]
  return Result(
    tf.add_n(parts), True, _widest(grouped.values()), ctx.dense_matmuls
  )


def _widest(terms):
  widest = 0
  for term in terms:
    if term.a.diagonal and term.b.diagonal:
      continue
    entries = term.a.value.shape[term.a.lead :]
    if not entries.is_fully_defined():
      return None
    widest = max(widest, entries.num_elements())
  return widest
