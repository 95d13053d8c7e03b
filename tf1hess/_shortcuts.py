"""The linear shortcuts: fast paths of the row loop that read the graph.

The plain rows (`_rows.reference`) make one backward pass from `target` per
row, with a one-hot cotangent. Around a graph-mode input `source`, most of
that pass is often wasted: the cotangent of a row is shared by all samples
through the linear ops that end `target` (`tail_terms`), and a first dense
layer `source @ W` can be applied once to all rows at the end (`head`).
Where what lies between them is simple enough, no row needs a backward pass
of its own (`_shared_rows`, `_elementwise_rows`). These shortcuts only
change which tensors the backward passes start and end at, never the
numbers; `rows` is their one entry point, and `_core.stack_rows` falls back
to the plain rows when building them fails.

What they match is the structure of TensorFlow's own gradient graphs: the
`Fill` (or `OnesLike`) that seeds `tf.gradients`, the `Sum` over
`BroadcastGradientArgs` axes and `Reshape` in the gradients of broadcasting
ops. Checked on TensorFlow 2.12 to 2.21 (COMPATIBILITY.md); a graph that
does not match simply takes the plain rows.
"""

import tensorflow as tf
from tensorflow.python.framework import func_graph  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _rows

# Ops through which no gradient flows: a tensor that reaches `x` only through
# them does not depend on `x` for differentiation.
NO_GRADIENT = frozenset(
  ["Shape", "ShapeN", "Size", "Rank", "StopGradient", "ZerosLike", "OnesLike"]
)

# Ops whose output entries each depend on the entries at the same place of
# their inputs (after broadcasting).
_ELEMENTWISE = frozenset(
  """Abs AddN Add AddV2 Cast Cos Div DivNoNan Elu EluGrad Equal Exp Expm1
  Greater GreaterEqual Identity Inv InvGrad Less LessEqual Log Log1p
  LogicalAnd LogicalNot LogicalOr Maximum Minimum Mul MulNoNan Neg NotEqual
  Pow RealDiv Reciprocal ReciprocalGrad Relu Relu6 Relu6Grad ReluGrad
  Rsqrt RsqrtGrad Select SelectV2 Selu SeluGrad Sigmoid SigmoidGrad Sign
  Sin Snapshot Softplus SoftplusGrad Softsign SoftsignGrad Sqrt SqrtGrad
  Square SquaredDifference Sub Tanh TanhGrad""".split()
)


class Graph:
  """What the linear shortcuts need to know about the graph around `x`.

  `depends(t)` tells whether a gradient can flow from `source` to `t`.
  """

  def __init__(self, source):
    self.source = source
    self._memo = {}
    self._captures = {}

  def captured(self, op):
    """The outer tensor that `op` captures, when it is a placeholder of a
    function graph (a `tf.cond` branch, a loop body) standing for one."""
    graph = op.graph
    if op.type != "Placeholder" or not isinstance(graph, func_graph.FuncGraph):
      return None
    if graph not in self._captures:
      # Graph tensors only: a `tf.function` also captures eager tensors
      # (constants, variables' values), which no gradient passes through.
      self._captures[graph] = {
        internal.op: external
        for external, internal in graph.captures
        if not isinstance(external, tf_ops.EagerTensor)
      }
    return self._captures[graph].get(op)

  def ancestors(self, tensors):
    """Ops that a gradient from `tensors` can reach, `tensors`' ops included.

    The walk goes on from a function graph's captures (a `tf.cond` branch
    that builds rows of tensors of the graph around it) to what they
    capture.
    """
    seen, stack = set(), [t.op for t in tensors]
    while stack:
      op = stack.pop()
      if op in seen:
        continue
      seen.add(op)
      if op.type not in NO_GRADIENT:
        stack.extend(t.op for t in op.inputs)
      outer = self.captured(op)
      if outer is not None:
        stack.append(outer.op)
    return seen

  def depends(self, t):
    key = (t.op.name, t.value_index)
    if key not in self._memo:
      self._memo[key] = self.source.op in self.ancestors([t])
    return self._memo[key]


def _static_dims(t):
  dims = t.shape[1:] if t.shape.rank is not None else None
  if dims is None or not dims.is_fully_defined():
    return None
  return dims.as_list()


def _same_tensor(a, b):
  return a.op is b.op and a.value_index == b.value_index


def tail_terms(target, graph, max_terms):
  """Pulls the cotangent back through linear ops at the end of `target`.

  The row cotangent is the same one-hot vector for every sample. While the
  ops that produced `target` are linear in their `x`-dependent input with
  `x`-independent coefficients (a matmul by weights, a reshape, a sum, a
  scaling), the cotangent of that input is still shared by all samples and
  costs nothing per sample: for `target = a @ w` it is a row of `w`, which
  saves the matmul of the one-hot rows with `w` that a plain backward pass
  makes.

  Args:
    target: the `(N, M)` tensor whose rows are stacked.
    graph: a `Graph` around the input.
    max_terms: `int`: the most tensors to return; a longer sum is left
      whole.

  Returns:
    A list of `(tensor, steps)`: the tensors to differentiate, and for each
    the functions that map shared cotangents `(R, M)` of `target` (R rows,
    each the same for every sample) to those of the tensor,
    `(R, *tensor.shape[1:])`.
  """
  done, todo = [], [(target, ())]
  while todo:
    if len(done) + len(todo) > max_terms:
      return [(target, ())]
    t, steps = todo.pop()
    # The input itself may be made by a linear op (`tf.identity(x)`, `x +
    # c`): its cotangent is not pulled back past it.
    pulled = None if _same_tensor(t, graph.source) else _pull_back(t, graph)
    if pulled is None:
      done.append((t, steps))
    else:
      todo.extend((u, steps + more) for u, more in pulled)
  return done


def _pull(cotangents, steps):
  """Applies the `steps` of `tail_terms` to shared `cotangents` `(R, M)`."""
  for step in steps:
    cotangents = step(cotangents)
  return cotangents


def _every_row(steps, num_rows, width, dtype):
  """The shared cotangents `(num_rows, width)` of all rows, after `steps`."""
  c = _pull(tf.eye(num_rows, dtype=dtype), steps)
  return tf.reshape(tf.cast(c, dtype), [num_rows, width])


def _pull_back(t, graph):
  """One linear op back from `t`: `[(input, steps)]`, or `None` to stop."""
  op = t.op
  t_dims = _static_dims(t)
  outer = graph.captured(op)
  if outer is not None:
    # Rows built in a function graph (a `tf.cond` branch) of tensors of the
    # graph around it: differentiated there, not at the placeholder.
    return [(outer, ())]
  if op.type in ("Identity", "Snapshot"):
    return [(op.inputs[0], ())]
  if op.type == "Reshape":
    u = op.inputs[0]
    unbroadcast = _unbroadcast_input(u, t, graph)
    if unbroadcast is not None:
      return [(unbroadcast, ())]
    u_dims = _static_dims(u)
    # Equal per-sample sizes make the reshape keep the batch dimension.
    if (
      t_dims is None
      or u_dims is None
      or u.shape.rank < 2
      or _prod(t_dims) != _prod(u_dims)
    ):
      return None
    return [(u, (lambda c, d=u_dims: tf.reshape(c, [-1] + d),))]
  if op.type == "Neg":
    return [(op.inputs[0], (tf.negative,))]
  if op.type in ("AddN", "Add", "AddV2", "Sub"):
    out = []
    for position, u in enumerate(op.inputs):
      if not graph.depends(u):
        continue
      if not _same_shape(u, t):
        return None  # Broadcasting: the cotangent would be reduced.
      negate = op.type == "Sub" and position == 1
      out.append((u, (tf.negative,) if negate else ()))
    return out
  if op.type == "MatMul":
    a, w = op.inputs
    if op.get_attr("transpose_a") or graph.depends(w):
      return None
    if not graph.depends(a):
      return []
    transpose_b = op.get_attr("transpose_b")
    # t = a @ op(w), so the cotangent of `a` is c @ op(w)^T.
    return [
      (
        a,
        (
          lambda c, w=w, tb=transpose_b: tf.matmul(
            c, tf.cast(w, c.dtype), transpose_b=not tb
          ),
        ),
      )
    ]
  if op.type == "Mul":
    a, b = op.inputs
    for u, s in ((a, b), (b, a)):
      if graph.depends(s) or not graph.depends(u):
        continue
      if t_dims is None or not _same_shape(u, t):
        return None
      shared = s.shape.rank is not None and (
        s.shape.rank < t.shape.rank
        or tf.compat.dimension_value(s.shape[0]) == 1
      )
      if not shared:
        # A tensor of equal entries (the ones that start a backward pass,
        # broadcast over the batch) scales every sample alike.
        s = fill_value(s)
        if s is None:
          return None
      return [(u, (lambda c, s=s: c * tf.cast(s, c.dtype),))]
  return None


# Ops whose output holds the entries of their first input, rearranged or
# repeated: when all entries of the input are equal, so are the output's.
_SAME_ENTRIES = frozenset(
  [
    "Identity",
    "Snapshot",
    "Reshape",
    "BroadcastTo",
    "Tile",
    "ExpandDims",
    "Squeeze",
  ]
)


def fill_value(t):
  """The scalar that every entry of `t` equals, if known from the graph.

  Recognizes `tf.fill` (and `tf.ones`, which makes one), `tf.ones_like`,
  and reshapes, tilings, broadcasts and scalings by a scalar of them: the
  cotangents that `tf.gradients` starts from and spreads over a sum or a
  mean.

  Returns:
    A scalar `Tensor`, or `None`.
  """
  op = t.op
  if op.type in _SAME_ENTRIES:
    return fill_value(op.inputs[0])
  if op.type == "Fill":
    return op.inputs[1]
  if op.type == "OnesLike":
    return tf.ones([], t.dtype)
  if op.type in ("Mul", "RealDiv"):
    # A scaling by a scalar, as in the gradient of a mean.
    a, b = op.inputs
    if b.shape.rank == 0:
      value = fill_value(a)
      if value is not None:
        return value * b if op.type == "Mul" else value / b
    if op.type == "Mul" and a.shape.rank == 0:
      value = fill_value(b)
      if value is not None:
        return a * value
  return None


def _unbroadcast_input(u, t, graph):
  """`v` when `t = reshape(reduce_sum(v, axes), shape)` sums over nothing.

  Gradients of broadcasting ops (`Mul`, `Add`, ...) with unknown batch sizes
  sum their result over the axes `BroadcastGradientArgs` finds broadcast at
  run time, and reshape it back to the shape of the op's input. When `v`
  depends on the input, it has the batch dimension, and when it has the
  static shape of `t` there is nothing to sum: `t` equals `v`.
  """
  if u.op.type != "Sum" or u.op.inputs[1].op.type != "BroadcastGradientArgs":
    return None
  v = u.op.inputs[0]
  if not graph.depends(v) or _static_dims(v) is None:
    return None
  if not _same_shape(v, t):
    return None
  return v


def _same_shape(u, t):
  """Whether `u` has the shape of `t` (no broadcasting), as far as known."""
  if u.shape.rank != t.shape.rank or _static_dims(u) != _static_dims(t):
    return False
  u_n, t_n = (tf.compat.dimension_value(v.shape[0]) for v in (u, t))
  return u_n == t_n or u_n is None or t_n is None and u_n != 1


def _prod(dims):
  out = 1
  for d in dims:
    out *= d
  return out


def head(source, tensors, graph):
  """The dense layer through which all of `tensors` see `source`, if any.

  When `source` `(N, K)` reaches `tensors` only through `pre = source @ W`
  with `W` independent of `source`, a row of derivatives with respect to
  `source` is the row with respect to `pre` times `W^T`. Stacking rows of
  `pre` (width H) and applying `W^T` once to all of them lays the result out
  without transposing the `(N, K, K)` output, and gives the diagonal from a
  dot product of width H instead of a full row.

  Returns:
    `(pre, w, transpose_b)` of the matmul `pre = source @ op(w)`, or `None`.
  """
  if source.shape.rank != 2:
    return None
  reached = graph.ancestors(tensors)
  consumers = [
    op
    for op in source.consumers()
    if op in reached and op.type not in NO_GRADIENT
  ]
  if len(consumers) != 1:
    return None
  op = consumers[0]
  if (
    op.type != "MatMul"
    or not _same_tensor(op.inputs[0], source)
    or op.get_attr("transpose_a")
    or graph.depends(op.inputs[1])
  ):
    return None
  return op.outputs[0], op.inputs[1], op.get_attr("transpose_b")


def whole(target, source, num_cols, x_cols, plan, graph=None):
  """Which shortcut builds all rows of `target` without a pass per row.

  Args:
    target, source, num_cols, x_cols, plan: as in `rows`.
    graph: a `Graph` around `source`, or `None` for a new one.

  Returns:
    `(kind, terms, layer)`: `kind` is `"shared"` (every cotangent reaches
    `source` through linear ops: the rows are the same in every sample,
    `_shared_rows`), `"elementwise"` (one dense layer `layer`, then
    elementwise ops: all rows from one matmul, `_elementwise_rows`) or
    `None`; `terms` are `tail_terms(target)` and `layer` is
    `head(source, terms)`, which `rows` goes on with.
  """
  graph = graph or Graph(source)
  terms = tail_terms(target, graph, plan.max_terms)
  layer = head(source, [t for t, _ in terms], graph)
  static = (
    isinstance(num_cols, int)
    and 0 < num_cols <= plan.shortcut_max_rows
    and isinstance(x_cols, int)
  )
  if terms and static:
    if all(_same_tensor(t, source) for t, _ in terms):
      return "shared", terms, layer
    if layer is not None and elementwise_rows_fit(
      layer, terms, num_cols, x_cols, target.dtype, plan.max_factor_bytes
    ):
      return "elementwise", terms, layer
  return None, terms, layer


def rows(
  vjp, target, num_cols, x_cols, source, plan, select_column, loop, chunk_size
):
  """The rows of `target` with the linear shortcuts, or `None`.

  Args:
    vjp, target, num_cols, x_cols, select_column: see `_core.stack_rows`.
    source: the graph-mode input `Tensor` `(N, K)` that `vjp`
      differentiates with respect to.
    plan: the call's `Plan` (its shortcut thresholds, chunks and loops).
    loop: one of `_rows.LOOPS`: how rows that still need a backward pass
      each are stacked.
    chunk_size: rows per vectorized backward pass, see `_rows.stack`.

  Returns:
    What `_rows.reference` returns, or `None` when no shortcut applies
    (nothing to skip, or nothing connected: the plain rows then give the
    zeros or the `None` that `unconnected_gradients` asks for).
  """
  dtype = target.dtype
  graph = Graph(source)
  kind, terms, layer = whole(target, source, num_cols, x_cols, plan, graph)
  if kind == "shared":
    return _shared_rows(terms, source, num_cols, x_cols, select_column, dtype)
  if kind == "elementwise":
    return _elementwise_rows(
      vjp, terms, layer, num_cols, x_cols, select_column, dtype
    )
  if layer is not None and not select_column:
    width = tf.compat.dimension_value(layer[0].shape[1])
    # Rows of `pre` pay off unless they are wider than rows of `x`: at
    # equal widths, one matmul of all rows beats a small one per row.
    if width is None or not isinstance(x_cols, int) or width > x_cols:
      layer = None
  if not terms or (layer is None and len(terms) == 1 and terms[0][0] is target):
    return None
  wrt = None if layer is None else layer[0]

  def row(j):
    shared = tf.one_hot(tf.reshape(j, [1]), num_cols, dtype=dtype)
    tensors, cotangents = [], []
    for t, steps in terms:
      c = tf.cast(_pull(shared, steps), t.dtype)
      tensors.append(t)
      cotangents.append(tf.broadcast_to(c, tf.shape(t)))
    r = vjp(tensors, cotangents, wrt)
    if not select_column:
      return r
    if layer is None:
      return _rows.column(r, j, vectorized=loop == "pfor")
    _, w, transpose_b = layer
    w_row = tf.gather(tf.cast(w, r.dtype), j, axis=1 if transpose_b else 0)
    return tf.reduce_sum(r * w_row, axis=1)

  if select_column:
    width = None
  elif layer is None:
    width = x_cols
  else:
    width = tf.compat.dimension_value(wrt.shape[1]) or tf.shape(wrt)[1]
  out = _rows.stack(row, num_cols, width, dtype, loop, plan, target, chunk_size)
  if select_column or layer is None:
    return out
  _, w, transpose_b = layer
  n = tf.shape(target)[0]
  out = tf.matmul(
    tf.reshape(out, tf.stack([n * num_cols, tf.shape(wrt)[1]])),
    tf.cast(w, dtype),
    transpose_b=not transpose_b,
  )
  return tf.reshape(out, tf.stack([n, num_cols, x_cols]))


def _shared_rows(terms, source, num_cols, x_cols, select_column, dtype):
  """The rows when every term is the input itself: the same in every sample.

  Then the linear shortcuts have pulled the one-hot cotangent of each row
  back to the input, and the row is the sum of those cotangents: no backward
  pass, and all rows at once from the identity matrix (a quadratic form, a
  dense layer under a squared error: a Hessian that does not depend on the
  input). The batch size is taken from `source`: the result waits for no
  more of the model than the cotangents need.
  """
  rows = tf.add_n(
    [_every_row(steps, num_cols, x_cols, dtype) for _, steps in terms]
  )  # (num_cols, x_cols)
  n = tf.shape(source)[0]
  if select_column:
    return tf.broadcast_to(tf.linalg.diag_part(rows), tf.stack([n, num_cols]))
  return tf.broadcast_to(rows, tf.stack([n, num_cols, x_cols]))


def elementwise_rows_fit(layer, terms, num_cols, x_cols, dtype, max_bytes):
  """Whether `_elementwise_rows` applies, with a factor of <= `max_bytes`."""
  pre = layer[0]
  width = tf.compat.dimension_value(pre.shape[1])
  if width is None or pre.shape.rank != 2:
    return False
  if width * num_cols * x_cols * dtype.size > max_bytes:
    return False
  return elementwise(pre, [t for t, _ in terms])


def elementwise(pre, tensors):
  """Whether every entry of each of `tensors` depends on one entry of `pre`.

  True when every op between `pre` `(N, H)` and `tensors` is elementwise
  (`_ELEMENTWISE`, or a sum over broadcast axes that finds none, see
  `_unbroadcast_input`) and none broadcasts a tensor that depends on `pre`:
  then each of `tensors` has the shape of `pre`, and its Jacobian with
  respect to `pre` is diagonal in every sample.
  """
  graph = Graph(pre)
  seen, todo = set(), list(tensors)
  while todo:
    t = todo.pop()
    key = (t.op.name, t.value_index)
    if _same_tensor(t, pre) or key in seen:
      continue
    seen.add(key)
    if t.op.type == "Reshape":
      # The sum over broadcast axes in the gradient of a broadcasting op.
      v = _unbroadcast_input(t.op.inputs[0], t, graph)
      if v is None or not _same_shape(t, pre):
        return False
      todo.append(v)
      continue
    if t.op.type not in _ELEMENTWISE or not _same_shape(t, pre):
      return False
    for u in t.op.inputs:
      if graph.depends(u):
        if not _same_shape(u, t):
          return False
        todo.append(u)
  return True


def _elementwise_rows(
  vjp, terms, layer, num_cols, x_cols, select_column, dtype
):
  """All rows from one backward pass per term, when the terms are elementwise.

  When `source` enters through one dense layer `pre = source @ W` and every
  term `t` is an elementwise function of `pre` (a tanh layer under a linear
  read-out, ...), the backward pass of row `j` from `t` to `pre` only scales
  the row's shared cotangent `C[j]` by the diagonal of the Jacobian,
  `D = vjp(t, ones)` `(N, H)`. Row `j` of sample `n` is then
  `sum_h D[n, h] C[j, h] W[:, h]`, and all rows of all samples are one
  matmul: `D (N, H)` by `P (H, M K)`, `P[h, (j, k)] = C[j, h] W[k, h]`.
  """
  pre, w, transpose_b = layer
  width = tf.compat.dimension_value(pre.shape[1])
  w = tf.cast(w, dtype)
  w = tf.transpose(w) if transpose_b else w  # (K, H)
  scales, factors = [], []
  for t, steps in terms:
    scales.append(tf.cast(vjp([t], [tf.ones_like(t)], pre), dtype))
    c = _every_row(steps, num_cols, width, dtype)
    if select_column:
      factors.append(tf.transpose(c * w))  # (H, M): only k = j.
    else:
      factors.append(
        tf.reshape(tf.einsum("jh,kh->hjk", c, w), [width, num_cols * x_cols])
      )
  out = tf.matmul(tf.concat(scales, axis=1), tf.concat(factors, axis=0))
  if select_column:
    return out
  return tf.reshape(out, tf.stack([tf.shape(out)[0], num_cols, x_cols]))
