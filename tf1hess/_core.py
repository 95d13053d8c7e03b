"""The row loop: the one place where derivative tensors are stacked row by row.

Every path of the package (graph ops, the eager path, higher orders, the
diagonals) builds its per-sample derivatives through `stack_rows`: given a
per-sample tensor `target` of shape `(N, M)` and a vector-Jacobian product
`vjp(targets, cotangents, source)`, it returns the per-sample Jacobian
`(N, M, K)` of `target` with respect to the `(N, K)` input, using M backward
passes whose cost does not depend on N.

Row `j` of sample `i` is `d target[i, j] / d x[i, :]`. It is obtained as the
vector-Jacobian product of `target` with the one-hot cotangent that selects
column `j` in every sample at once. That is only valid when sample `i` of
`target` depends on `x[i]` alone (see `check_independence` in `ops.py`).

The rows are built by one of the strategies of `METHODS`: the reference
`tf.while_loop` over rows, or all rows of a chunk vectorized into one backward
pass (`pfor`), with linear shortcuts that skip the matmuls a one-hot cotangent
wastes; `"auto"` falls back to the loop when `pfor` cannot vectorize an op.
"""

import contextlib
import os

from absl import logging
import tensorflow as tf

from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops.parallel_for import control_flow_ops as pfor_ops  # pylint: disable=g-direct-tensorflow-import


def num_columns(x):
  """Returns the number of features per sample of `x`: a Python int if known.

  Args:
    x: a `Tensor` of shape `(N, d1, ..., dm)`.

  Returns:
    `d1 * ... * dm` as a Python `int` when every `di` is static, else a scalar
    `int32` `Tensor`.
  """
  dims = x.shape[1:]
  if dims.is_fully_defined():
    return int(dims.num_elements())
  return tf.reduce_prod(tf.shape(x)[1:])


def batch_size(x):
  """Returns `N` of `x`: a Python int when static, else a scalar `Tensor`."""
  n = tf.compat.dimension_value(x.shape[0])
  return n if n is not None else tf.shape(x)[0]


def flatten_samples(t, n, k):
  """Reshapes `t` of shape `(N, ...)` into `(N, k)`, also when `N == 0`.

  `t` must hold `k` elements per sample; a `t` of rank 2 is then already
  `(N, k)` and is returned as is (which keeps the ops that made it visible
  to the linear shortcuts of `stack_rows`).
  """
  if t.shape.rank == 2 and (
    _is_dynamic(k) or tf.compat.dimension_value(t.shape[1]) == k
  ):
    return t
  return tf.reshape(t, tf.stack([n, k]) if _is_dynamic(n, k) else [n, k])


def _is_dynamic(*dims):
  return any(isinstance(d, tf.Tensor) for d in dims)


def control_flow_v1(graph=None):
  """Whether ops built now in `graph` (default: current) use v1 loops."""
  if tf.executing_eagerly():
    return False
  graph = graph or tf.compat.v1.get_default_graph()
  return not control_flow_util.EnableControlFlowV2(graph)


METHODS = ("auto", "forward", "pfor", "while_loop")

# "auto" vectorizes the rows from this many rows (a static count) on, and
# below it loops over rows with the linear shortcuts. In graphs (and
# `tf.function`s) on 2 CPU cores with TensorFlow's BFC CPU allocator
# (`TF_CPU_ALLOCATOR_USE_BFC=true`), `pfor` was 10 to 25% faster than the
# loop at 256 rows (batches of 256 to 2048; even at 4096), and the loop,
# `parallel_iterations` rows at a time, up to 15% faster at 64 rows and at
# 128 rows from batches of 4096 on (the softplus net of BENCHMARKS.md). The
# default allocator page-faults on `pfor`'s large (K, N, ...) intermediates
# at every run: there the loop was faster up to K = 256 (twice as fast at
# 1024 x 256). Executing eagerly, `pfor` traces a function on every call,
# which costs more than a Python loop over a few rows.
PFOR_MIN_ROWS = 256
PFOR_MIN_ROWS_DEFAULT_ALLOCATOR = 512
EAGER_PFOR_MIN_ROWS = 64

# Up to this many rows (a static count), "auto" builds one backward pass per
# row in the graph instead of a loop: no loop overhead, and the rows run in
# parallel (5 to 25% faster on the softplus net of BENCHMARKS.md).
UNROLL_MAX_ROWS = 16

# Ops through which no gradient flows: a tensor that reaches `x` only through
# them does not depend on `x` for differentiation.
_NO_GRADIENT = frozenset(
  ["Shape", "ShapeN", "Size", "Rank", "StopGradient", "ZerosLike", "OnesLike"]
)

# At most this many tensors to differentiate per row after the linear
# shortcuts; a longer sum is left whole.
_MAX_TERMS = 16

# The largest factor `P` (H x M x K entries) of `_elementwise_rows`.
_MAX_FACTOR_BYTES = 1 << 28

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

# Up to this many rows, the rows of a loop are read one by one into place;
# beyond it, stacked and transposed (fewer ops in the graph).
_MAX_READS = 1024


def check_method(method, chunk_size):
  """Raises `ValueError` unless `method` and `chunk_size` are valid.

  Args:
    method: one of `METHODS`.
    chunk_size: `None` or a positive `int`.
  """
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(
      "`method` must be one of 'auto', 'forward', 'pfor' or 'while_loop'; "
      f"saw {method!r}."
    )
  if chunk_size is not None and (
    isinstance(chunk_size, bool)
    or not isinstance(chunk_size, int)
    or chunk_size < 1
  ):
    raise ValueError(
      f"`chunk_size` must be None or a positive int; saw {chunk_size!r}."
    )


class _Graph:
  """What the linear shortcuts need to know about the graph around `x`.

  `depends(t)` tells whether a gradient can flow from `source` to `t`.
  """

  def __init__(self, source):
    self.source = source
    self._memo = {}

  def ancestors(self, tensors):
    """Ops that a gradient from `tensors` can reach, `tensors`' ops included."""
    seen, stack = set(), [t.op for t in tensors]
    while stack:
      op = stack.pop()
      if op in seen:
        continue
      seen.add(op)
      if op.type not in _NO_GRADIENT:
        stack.extend(t.op for t in op.inputs)
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


def _tail_terms(target, graph):
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
    graph: a `_Graph` around the input.

  Returns:
    A list of `(tensor, steps)`: the tensors to differentiate, and for each
    the functions that map shared cotangents `(R, M)` of `target` (R rows,
    each the same for every sample) to those of the tensor,
    `(R, *tensor.shape[1:])`.
  """
  done, todo = [], [(target, ())]
  while todo:
    if len(done) + len(todo) > _MAX_TERMS:
      return [(target, ())]
    t, steps = todo.pop()
    pulled = _pull_back(t, graph)
    if pulled is None:
      done.append((t, steps))
    else:
      todo.extend((u, steps + more) for u, more in pulled)
  return done


def _pull(cotangents, steps):
  """Applies the `steps` of `_tail_terms` to shared `cotangents` `(R, M)`."""
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
        s = _fill_value(s)
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


def _fill_value(t):
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
    return _fill_value(op.inputs[0])
  if op.type == "Fill":
    return op.inputs[1]
  if op.type == "OnesLike":
    return tf.ones([], t.dtype)
  if op.type in ("Mul", "RealDiv"):
    # A scaling by a scalar, as in the gradient of a mean.
    a, b = op.inputs
    if b.shape.rank == 0:
      value = _fill_value(a)
      if value is not None:
        return value * b if op.type == "Mul" else value / b
    if op.type == "Mul" and a.shape.rank == 0:
      value = _fill_value(b)
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


def _head(source, tensors, graph):
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
    if op in reached and op.type not in _NO_GRADIENT
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


def _graph_source(source):
  """`source` when the graph around it can be read, else `None`."""
  if source is None or tf.executing_eagerly():
    return None
  if not isinstance(source, tf.Tensor) or not hasattr(source, "op"):
    return None
  return source


# Graph-building code: AutoGraph (a tf.function around a caller) must not
# rewrite it.
@tf.autograph.experimental.do_not_convert
def stack_rows(
  vjp,
  target,
  num_cols,
  x_cols,
  parallel_iterations=None,
  select_column=False,
  method="auto",
  chunk_size=None,
  source=None,
  differentiated=False,
):
  """Per-sample Jacobian of `target`, one vector-Jacobian product per column.

  Row `j` of every sample comes from one backward pass with the cotangent
  that selects column `j` of every sample. `method` chooses how the rows are
  built:

  * `"while_loop"`: the reference design, a `tf.while_loop` over the rows,
    each a backward pass with a one-hot cotangent `(N, M)`.
  * `"pfor"`: all the rows of a chunk in one vectorized backward pass
    (`pfor` of the row), with the linear shortcuts below. When `pfor`
    cannot vectorize an op (`pfor`'s own fallback, a while loop around the
    op, is off: it builds graphs that can fail when run), the rows fall
    back to the loops of `"auto"`.
  * `"auto"`: from `pfor_min_rows()` rows on (256 with TensorFlow's BFC
    CPU allocator, else 512; executing eagerly, 64), `"pfor"` if every op
    vectorizes; up to `UNROLL_MAX_ROWS` rows in a graph, one backward pass
    per row unrolled in the graph; otherwise a `tf.while_loop` over rows
    with the linear shortcuts, and the plain loop when even the shortcuts
    cannot be built. Decided when the graph is built.

  Under control flow v1, TensorFlow cannot differentiate a while loop inside
  another, so rows that will be differentiated again (`differentiated`, the
  levels below the last of a derivative of order >= 3) are vectorized
  without chunks, or else unrolled in Python (static `num_cols`).

  The linear shortcuts (graph mode, including `tf.function`): cotangents are
  pulled back through the linear ops that end `target` (`_tail_terms`), and
  when `source` enters through one dense layer the rows are taken with
  respect to its output (`_head`). When every cotangent is pulled back to
  `source` itself, the rows are the same for every sample and need no
  backward pass (`_shared_rows`); when what lies between that dense layer
  and the cotangents is elementwise, one backward pass and one matmul give
  all rows (`_elementwise_rows`). The shortcuts only change which tensors
  the backward passes start and end at, never the numbers.

  Args:
    vjp: callable `(targets, cotangents, source) -> Tensor (N, P)`: the
      vector-Jacobian product of the list `targets` with the list
      `cotangents` with respect to `source` (`None`: the input itself,
      `P = x_cols`), flattened per sample; never `None` (zeros when
      unconnected).
    target: `Tensor` of shape `(N, num_cols)`.
    num_cols: `int` or scalar `Tensor`: the number of columns of `target`.
    x_cols: `int` or scalar `Tensor`: the number of input features K.
    parallel_iterations: `int` or `None`: passed to `tf.while_loop`.
    select_column: `bool`: keep only element `j` of row `j` (the diagonal);
      requires `num_cols == x_cols`.
    method: `str`, one of `METHODS`; default `"auto"`.
    chunk_size: `int`, `Tensor` or `None`: rows per vectorized backward
      pass (`None`: all). Bounds the memory of `"pfor"`, at the price of a
      `tf.while_loop` over chunks. Unused by `_shared_rows` and
      `_elementwise_rows`, which build no rows one by one.
    source: the input `Tensor` `(N, K)` that `vjp` differentiates with
      respect to, for the linear shortcuts; `None` turns them off.
    differentiated: `bool`: whether the result will be differentiated again.

  Returns:
    A `Tensor` of shape `(N, num_cols, x_cols)`, or `(N, num_cols)` when
    `select_column` is set.
  """
  source = _graph_source(source)
  no_loops = differentiated and control_flow_v1()
  if no_loops:
    chunk_size = None
  *fallible, last = _attempts(method, num_cols, source is not None, no_loops)

  def build(attempt):
    loop, shortcuts = attempt
    return _rows(
      vjp,
      target,
      num_cols,
      x_cols,
      loop=loop,
      source=source if shortcuts else None,
      parallel_iterations=parallel_iterations,
      select_column=select_column,
      chunk_size=chunk_size,
    )

  for attempt in fallible:
    graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
    context = graph._get_control_flow_context() if graph else None  # pylint: disable=protected-access
    try:
      with _quiet_tensorflow_logger():
        return build(attempt)
    except Exception as error:  # pylint: disable=broad-except
      if graph is not None:
        graph._set_control_flow_context(context)  # pylint: disable=protected-access
      logging.info(
        "tf1hess: the rows could not be built by %s (%s: %s); falling back.",
        _describe(attempt),
        type(error).__name__,
        str(error).splitlines()[0] if str(error) else "",
      )
  return build(last)


def pfor_min_rows(eager):
  """The number of rows from which "auto" vectorizes (see PFOR_MIN_ROWS)."""
  if eager:
    return EAGER_PFOR_MIN_ROWS
  # The variable TensorFlow reads when it makes its CPU allocator.
  if bfc_allocator(os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "")):
    return PFOR_MIN_ROWS
  return PFOR_MIN_ROWS_DEFAULT_ALLOCATOR


def bfc_allocator(value):
  """Whether `value` of `TF_CPU_ALLOCATOR_USE_BFC` turns the BFC one on."""
  return value.strip().lower() in ("1", "true")


def _attempts(method, num_rows, shortcuts, no_loops):
  """The `(loop, shortcuts)` strategies `method` tries, in order.

  The errors of the last one propagate; the others fall back to the next
  when building them raises (e.g. `pfor` meets an op it cannot vectorize).
  """
  if no_loops:
    return [("pfor", shortcuts), ("unrolled", shortcuts)]
  if method == "while_loop":
    return [("while_loop", False)]
  out = []
  eager = tf.executing_eagerly()
  threshold = pfor_min_rows(eager)
  static = isinstance(num_rows, int)
  if method == "pfor" or static and num_rows >= threshold:
    out.append(("pfor", shortcuts))
  elif static and num_rows <= UNROLL_MAX_ROWS and not eager:
    out.append(("unrolled", shortcuts))
  if shortcuts:
    out.append(("while_loop", True))
  out.append(("while_loop", False))
  return out


@contextlib.contextmanager
def _quiet_tensorflow_logger():
  """Mutes `pfor`'s error log for an attempt that may fall back."""
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel("CRITICAL")
  try:
    yield
  finally:
    logger.setLevel(level)


def _describe(attempt):
  loop, shortcuts = attempt
  return loop + (" with linear shortcuts" if shortcuts else "")


def _rows(
  vjp,
  target,
  num_cols,
  x_cols,
  loop,
  source,
  parallel_iterations,
  select_column,
  chunk_size,
):
  """Builds the rows with one strategy; see `stack_rows`."""
  dtype = target.dtype
  terms = head = None
  if source is not None:
    graph = _Graph(source)
    terms = _tail_terms(target, graph)
    head = _head(source, [t for t, _ in terms], graph)
    static = (
      isinstance(num_cols, int)
      and 0 < num_cols <= _MAX_READS
      and isinstance(x_cols, int)
    )
    if terms and static:
      if all(_same_tensor(t, source) for t, _ in terms):
        return _shared_rows(
          terms, source, num_cols, x_cols, select_column, dtype
        )
      if head is not None and _elementwise_rows_fit(
        head, terms, num_cols, x_cols, dtype
      ):
        return _elementwise_rows(
          vjp, terms, head, num_cols, x_cols, select_column, dtype
        )
    if head is not None and not select_column:
      width = tf.compat.dimension_value(head[0].shape[1])
      # Rows of `pre` pay off unless they are wider than rows of `x`: at
      # equal widths, one matmul of all rows beats a small one per row.
      if width is None or not isinstance(x_cols, int) or width > x_cols:
        head = None
    if not terms or (
      head is None and len(terms) == 1 and terms[0][0] is target
    ):
      # Nothing to skip (or nothing connected: the plain rows then give the
      # zeros or the `None` that `unconnected_gradients` asks for).
      terms = head = None
  wrt = None if head is None else head[0]
  n = tf.shape(target)[0]

  def row(j):
    if terms is None:
      tensors = [target]
      cotangents = [tf.one_hot(tf.fill([n], j), num_cols, dtype=dtype)]
    else:
      shared = tf.one_hot(tf.reshape(j, [1]), num_cols, dtype=dtype)
      tensors, cotangents = [], []
      for t, steps in terms:
        c = tf.cast(_pull(shared, steps), t.dtype)
        tensors.append(t)
        cotangents.append(tf.broadcast_to(c, tf.shape(t)))
    r = vjp(tensors, cotangents, wrt)
    if select_column:
      if head is None and loop != "pfor":
        r = r[:, j]
      elif head is None:
        r = tf.gather(r, j, axis=1)  # A slice at `j` does not vectorize.
      else:
        _, w, transpose_b = head
        w_row = tf.gather(tf.cast(w, r.dtype), j, axis=1 if transpose_b else 0)
        r = tf.reduce_sum(r * w_row, axis=1)
    return r

  width = x_cols if head is None else head[0].shape[1]
  if isinstance(width, tf.Tensor):
    width = None
  row_shape = [target.shape[0]] + ([] if select_column else [width])
  if loop == "unrolled":
    if not isinstance(num_cols, int):
      raise ValueError(
        "Under control flow v1 (tf.compat.v1.disable_v2_behavior()), "
        "derivatives of order >= 3 of a model that `pfor` cannot vectorize "
        "need a static number of features, or control flow v2: call "
        "tf.compat.v1.enable_control_flow_v2() before building the model."
      )
    rows = tf.stack([row(j) for j in range(num_cols)], axis=1)
  elif loop == "pfor":
    stacked = _nonempty(
      target,
      lambda: _pfor_rows(
        row,
        num_cols,
        dtype,
        row_shape,
        chunk_size,
        parallel_iterations,
      ),
      [num_cols]
      + ([] if select_column else [tf.shape(wrt)[1] if head else x_cols]),
      dtype,
    )
    rows = _samples_first(stacked)
  else:
    ta = tf.TensorArray(
      dtype, size=num_cols, element_shape=tf.TensorShape(row_shape)
    )
    _, ta = tf.while_loop(
      lambda j, _: j < num_cols,
      lambda j, ta: (j + 1, ta.write(j, row(j))),
      [tf.constant(0), ta],
      parallel_iterations=parallel_iterations or 10,
    )
    if isinstance(num_cols, int) and 0 < num_cols <= _MAX_READS:
      # One copy into the (N, M, ...) layout, not a stack and a transpose.
      rows = tf.stack([ta.read(j) for j in range(num_cols)], axis=1)
    else:
      rows = _samples_first(ta.stack())
  if select_column or head is None:
    return rows
  pre, w, transpose_b = head
  h = tf.shape(pre)[1]
  out = tf.matmul(
    tf.reshape(rows, tf.stack([n * num_cols, h])),
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


def _elementwise_rows_fit(head, terms, num_cols, x_cols, dtype):
  """Whether `_elementwise_rows` applies, within `_MAX_FACTOR_BYTES`."""
  pre = head[0]
  width = tf.compat.dimension_value(pre.shape[1])
  if width is None or pre.shape.rank != 2:
    return False
  if width * num_cols * x_cols * dtype.size > _MAX_FACTOR_BYTES:
    return False
  return _elementwise(pre, [t for t, _ in terms])


def _elementwise(pre, tensors):
  """Whether every entry of each of `tensors` depends on one entry of `pre`.

  True when every op between `pre` `(N, H)` and `tensors` is elementwise
  (`_ELEMENTWISE`, or a sum over broadcast axes that finds none, see
  `_unbroadcast_input`) and none broadcasts a tensor that depends on `pre`:
  then each of `tensors` has the shape of `pre`, and its Jacobian with
  respect to `pre` is diagonal in every sample.
  """
  graph = _Graph(pre)
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


def _elementwise_rows(vjp, terms, head, num_cols, x_cols, select_column, dtype):
  """All rows from one backward pass per term, when the terms are elementwise.

  When `source` enters through one dense layer `pre = source @ W` and every
  term `t` is an elementwise function of `pre` (a tanh layer under a linear
  read-out, ...), the backward pass of row `j` from `t` to `pre` only scales
  the row's shared cotangent `C[j]` by the diagonal of the Jacobian,
  `D = vjp(t, ones)` `(N, H)`. Row `j` of sample `n` is then
  `sum_h D[n, h] C[j, h] W[:, h]`, and all rows of all samples are one
  matmul: `D (N, H)` by `P (H, M K)`, `P[h, (j, k)] = C[j, h] W[k, h]`.
  """
  pre, w, transpose_b = head
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


def _samples_first(stacked):
  """`(M, N, ...)` rows -> `(N, M, ...)`."""
  perm = [1, 0] + list(range(2, stacked.shape.rank))
  return tf.transpose(stacked, perm)


def _plain(fn):
  """`fn` as is: `pfor` would otherwise rewrite it with AutoGraph."""
  return tf.autograph.experimental.do_not_convert(fn)


def _nonempty(target, build, row_dims, dtype):
  """`build()` `(M, N, ...)`, or zeros when the batch of `target` is empty.

  Vectorized backward passes can mix up the shapes of empty tensors (an
  `AddN` of `(M, 0, 1)` and `(M, 0, K)`), so an empty batch skips them.
  """
  n = tf.compat.dimension_value(target.shape[0])
  if n is None:
    n = tf.shape(target)[0]
    if tf.executing_eagerly():
      n = int(n)
  if isinstance(n, int) and n:
    return build()

  def zeros():
    return tf.zeros(tf.stack([row_dims[0], n] + row_dims[1:]), dtype)

  if isinstance(n, int):
    return zeros()
  return tf.cond(n > 0, build, zeros)


def _pfor_rows(
  row, num_rows, dtype, row_shape, chunk_size, parallel_iterations
):
  """Stacks `row(j)` for `j < num_rows` by vectorized chunks of rows."""
  if chunk_size is None or (
    isinstance(num_rows, int)
    and isinstance(chunk_size, int)
    and num_rows <= chunk_size
  ):
    return pfor_ops.pfor(_plain(row), num_rows, fallback_to_while_loop=False)
  static_chunk = chunk_size if isinstance(chunk_size, int) else None
  if tf.executing_eagerly():
    # One traced function for all chunks, instead of one per chunk.
    return tf.function(
      lambda: _pfor_rows(
        row,
        num_rows,
        dtype,
        row_shape,
        chunk_size,
        parallel_iterations,
      ),
      autograph=False,
    )()
  num_chunks = (num_rows + chunk_size - 1) // chunk_size

  def chunk(c, ta):
    start = c * chunk_size
    # The last chunk repeats the last row rather than being shorter: equal
    # chunks stack (and differentiate) without a concat.
    rows = pfor_ops.pfor(
      _plain(lambda i: row(tf.minimum(start + i, num_rows - 1))),
      chunk_size,
      fallback_to_while_loop=False,
    )
    return c + 1, ta.write(c, rows)

  ta = tf.TensorArray(
    dtype,
    size=num_chunks,
    element_shape=tf.TensorShape([static_chunk] + row_shape),
  )
  _, ta = tf.while_loop(
    lambda c, _: c < num_chunks,
    chunk,
    [tf.constant(0), ta],
    parallel_iterations=parallel_iterations or 1,
  )
  stacked = ta.stack()  # (num_chunks, chunk_size, N, ...)
  rows = tf.reshape(
    stacked,
    tf.concat([[num_chunks * chunk_size], tf.shape(stacked)[2:]], axis=0),
  )
  if isinstance(num_rows, int) and num_rows % chunk_size == 0:
    return rows
  return rows[:num_rows]


@tf.autograph.experimental.do_not_convert
def per_sample_derivatives(
  x,
  grad,
  gradient_fn,
  order,
  parallel_iterations=None,
  diagonal=False,
  check_independence=False,
  input_name="x",
  method="auto",
  chunk_size=None,
):
  """Per-sample derivative tensor of order `order` from the first derivative.

  Args:
    x: the input `Tensor` (or variable) of shape `(N, d1, ..., dm)`.
    grad: first derivative of the summed outputs with respect to `x`, shape of
      `x`.
    gradient_fn: callable `level -> gradient`, where
      `gradient(target, cotangent, source=None)` is the vector-Jacobian
      product of `target` (a tensor or a list) with `cotangent` (the same
      structure) with respect to `source` (default `x`), shaped like
      `source`, or `None` when unconnected. `source` is a tensor computed
      from `x` alone (the output of its first dense layer), which lets the
      rows skip that layer. Called for each level (2, 3, ...) just before
      that level is built, which lets the eager path stop the matching tape
      first.
    order: `int` >= 1.
    parallel_iterations: passed to `stack_rows`.
    diagonal: `bool`: for `order == 2`, return only the diagonals.
    check_independence: `bool`: for `order == 2`, make the result depend on
      `independence_check`.
    input_name: `str`: how error messages name `x`.
    method: `str`, passed to `stack_rows`; default `"auto"`.
    chunk_size: `int` or `None`: rows per vectorized backward pass, passed to
      `stack_rows`. `None` vectorizes all K rows of the Hessian level at
      once; higher levels (M = K^(l-1) rows) then go by chunks of K rows, so
      that a chunk's cotangents are no larger than the output.

  Returns:
    A `Tensor` of shape `(N,) + (d1, ..., dm) * order`, or `(N, d1, ..., dm)`
    when `diagonal` is set; `None` when a level of derivatives is unconnected
    and `gradient_fn` returned `None`.
  """
  n, k = batch_size(x), num_columns(x)
  dims = x.shape[1:]
  unconnected = []

  def vjp(level):
    gradient = gradient_fn(level)

    def flat_vjp(targets, cotangents, source=None):
      if source is None:
        g, width = gradient(targets, cotangents), k
      else:
        g, width = gradient(targets, cotangents, source), num_columns(source)
      if g is None:
        unconnected.append(level)
        dtype = targets[0].dtype
        return tf.zeros(tf.stack([tf.shape(targets[0])[0], width]), dtype)
      return flatten_samples(g, n, width)

    return flat_vjp

  result = flatten_samples(grad, n, k)
  cols = k
  for level in range(2, order + 1):
    result = stack_rows(
      vjp(level),
      result,
      cols,
      k,
      parallel_iterations=parallel_iterations,
      select_column=diagonal,
      method=method,
      chunk_size=k if chunk_size is None and level > 2 else chunk_size,
      source=x,
      differentiated=level < order,
    )
    if diagonal:
      break
    cols = cols * k
    result = flatten_samples(result, n, cols)
  out_order = 1 if diagonal else order
  if dims.is_fully_defined():
    shape = [n] + dims.as_list() * out_order
  else:
    tail = tf.shape(x)[1:]
    shape = tf.concat([tf.reshape(n, [1])] + [tail] * out_order, axis=0)
  result = tf.reshape(result, shape)
  result.set_shape(
    tf.TensorShape([x.shape[0]]).concatenate(
      tf.TensorShape(dims.as_list() * out_order)
    )
  )
  if unconnected:
    return None
  if check_independence:
    check = independence_check(
      x, result, lambda v: gradient_fn(2)(grad, v), input_name
    )
    if check is not None:
      with tf.control_dependencies([check]):
        result = tf.identity(result)
  return result


_INDEPENDENCE_RTOL = {
  tf.float16: 5e-2,
  tf.bfloat16: 1e-1,
  tf.float32: 1e-3,
  tf.float64: 1e-8,
}


@tf.autograph.experimental.do_not_convert
def independence_check(x, hessian, full_hvp_fn, name):
  """Returns an assert that block-diagonal and full Hessian products agree.

  The row trick is only valid when sample `i` of the output depends on `x[i]`
  alone. For one random `v`, the full product `H_full v` (one backward pass
  through the whole batch) must then equal `H_i v_i` for every sample; a
  coupling across samples (batch norm in training mode, `(sum x)^2`, ...)
  makes them differ. Samples whose input or Hessian is not finite (NaN,
  Inf) are left out: a NaN stays in its sample and is no coupling.

  Args:
    x: the input, shape `(N, d1, ..., dm)`.
    hessian: the per-sample Hessians, shape `(N, d..., d...)`.
    full_hvp_fn: callable `v -> Tensor` of the shape of `x` (or `None` when
      unconnected): the product of the full `(N K, N K)` Hessian with `v`.
    name: the name of the input, for the error message.

  Returns:
    An assert `Operation` (graph) or `None` (eager, already checked).
  """
  n, k = batch_size(x), num_columns(x)
  dtype = hessian.dtype
  v = tf.random.normal(tf.shape(x), dtype=dtype)
  full = full_hvp_fn(v)
  if full is None:
    full = tf.zeros_like(v)
  full = tf.cast(
    flatten_samples(full, n, k),
    tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype,
  )
  h = tf.cast(tf.reshape(hessian, tf.stack([n, k, k])), full.dtype)
  block = tf.einsum(
    "nij,nj->ni", h, tf.cast(flatten_samples(v, n, k), full.dtype)
  )
  # A sample whose input or Hessian is not finite (NaN, Inf) is left out:
  # its NaN is its own, not a coupling. A finite sample whose full product
  # is not finite still fails: a NaN leaked into it from another sample.
  finite = tf.logical_and(
    tf.reduce_all(tf.math.is_finite(flatten_samples(x, n, k)), axis=1),
    tf.reduce_all(tf.math.is_finite(h), axis=[1, 2]),
  )[:, None]
  diff = tf.abs(full - block)
  diff = tf.where(
    tf.math.is_finite(diff), diff, tf.fill(tf.shape(diff), diff.dtype.max)
  )
  zero = tf.zeros_like(diff)
  err = tf.reduce_max(tf.where(finite, diff, zero))
  full_abs = tf.where(tf.math.is_finite(full), tf.abs(full), zero)
  scale = tf.maximum(
    tf.reduce_max(tf.where(finite, full_abs, zero))
    + tf.reduce_max(tf.where(finite, tf.abs(block), zero)),
    tf.constant(1e-30, full.dtype),
  )
  tol = tf.constant(_INDEPENDENCE_RTOL[dtype], full.dtype) * scale
  return tf.debugging.assert_less_equal(
    err,
    tol,
    message=(
      f"The samples of `{name}` are not independent: a random full "
      "Hessian-vector product differs from the per-sample (block-diagonal)"
      " one, so the output of sample i also depends on other samples "
      "(batch norm in training mode, a reduction over the batch such as "
      "(sum x)^2, ...) and per-sample Hessians are not defined by the row "
      "trick. Remove the coupling (e.g. batch norm in inference mode) or "
      "compute the full Hessian."
    ),
  )
