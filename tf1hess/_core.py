"""The row loop's one entry point, and the derivatives built from it.

Every path of the package (graph ops, the eager path, higher orders, the
diagonals, the per-output ops) builds its per-sample derivatives through
`stack_rows`: given a per-sample tensor `target` of shape `(N, M)` and a
vector-Jacobian product `vjp(targets, cotangents, source)`, it returns the
per-sample Jacobian `(N, M, K)` of `target` with respect to the `(N, K)`
input, using M backward passes whose cost does not depend on N.

`stack_rows` picks, from the call's `Plan`, which strategies to try in
order: the fast paths (rows vectorized by `pfor`, rows unrolled in the
graph, the linear shortcuts of `_shortcuts`), then the reference design of
`_rows` (a `tf.while_loop` over one-hot rows, which reads no graph). A fast
path that cannot be built raises one of the errors it is known to raise,
and the next strategy is tried, with one WARNING; any other error is a bug
and propagates.
"""

import collections
import contextlib
import itertools
import weakref

from absl import logging
import tensorflow as tf

from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _rows
from tf1hess import _shortcuts


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


def dense(gradient):
  """`gradient` as a `Tensor`: that of an `x` gathered along its batch axis
  (`tf.gather(x, indices)`) is `IndexedSlices`."""
  if isinstance(gradient, tf.IndexedSlices):
    return tf.convert_to_tensor(gradient)
  return gradient


def batch_size(x):
  """Returns `N` of `x`: a Python int when static, else a scalar `Tensor`."""
  n = tf.compat.dimension_value(x.shape[0])
  return n if n is not None else tf.shape(x)[0]


def derivative_shape(x, order):
  """The shape `(N,) + (d1, ..., dm) * order` of derivatives of `order` of
  `x` `(N, d1, ..., dm)`: a list, or a `Tensor` where a dimension is
  dynamic, and the static `tf.TensorShape`."""
  n, dims = batch_size(x), x.shape[1:]
  if dims.is_fully_defined():
    shape = [n] + dims.as_list() * order
  else:
    tail = tf.shape(x)[1:]
    shape = tf.concat([tf.reshape(n, [1])] + [tail] * order, axis=0)
  static = tf.TensorShape([x.shape[0]]).concatenate(
    tf.TensorShape(dims.as_list() * order)
  )
  return shape, static


def statically_empty(x):
  """Whether the batch of `x` is empty in its static shape, `(0, ...)`.

  The derivatives of such a batch are known to be empty when the graph is
  built. TensorFlow's arithmetic optimizer divides by that zero (SIGFPE,
  in `ReplaceMulWithBroadcastByTile`) on a product of a tensor of static
  batch 0 with one it folds to an empty constant, as a `tf.function` with
  an input signature `[0, K]` has them in the second derivatives of many
  models: the ops build none.
  """
  return tf.compat.dimension_value(x.shape[0]) == 0


def empty_derivatives(x, order):
  """Zeros of `derivative_shape(x, order)`, for a `statically_empty` `x`."""
  shape, static = derivative_shape(x, order)
  result = tf.zeros(shape, x.dtype)
  result.set_shape(static)
  return result


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


# One strategy of `stack_rows`: how rows are stacked (`_rows.LOOPS`), and
# whether the linear shortcuts are tried first.
Attempt = collections.namedtuple("Attempt", ["loop", "shortcuts"])

# What building a fast path is known to raise when it cannot be built:
# `pfor` meets an op without a converter (ValueError) or one it cannot
# convert (NotImplementedError); a shortcut builds an op whose shapes or
# dtypes TensorFlow refuses (ValueError, TypeError). Executing eagerly, the
# rows also run as they are built: an op a vectorized row cannot run raises
# InvalidArgumentError or UnimplementedError.
FALLBACK_ERRORS = (
  ValueError,
  TypeError,
  NotImplementedError,
  tf.errors.InvalidArgumentError,
  tf.errors.UnimplementedError,
)


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
  plan,
  select_column=False,
  source=None,
  differentiated=False,
  chunk_size=None,
  through_v1_loop=False,
):
  """Per-sample Jacobian of `target`, one vector-Jacobian product per column.

  Row `j` of every sample comes from one backward pass with the cotangent
  that selects column `j` of every sample. `plan.method` chooses how the
  rows are built:

  * `"while_loop"`: the reference design (`_rows.reference`), a
    `tf.while_loop` over the rows, each a backward pass with a one-hot
    cotangent `(N, M)`.
  * `"pfor"`: all the rows of a chunk in one vectorized backward pass
    (`pfor` of the row), with the linear shortcuts. When `pfor` cannot
    vectorize an op (`pfor`'s own fallback, a while loop around the op, is
    off: it builds graphs that can fail when run), the rows fall back to
    the loops of `"auto"`.
  * `"auto"` (and `"forward"`, for what the forward engine leaves to the
    rows): from `plan.vectorize_from()` rows on, `"pfor"`; up to
    `plan.unroll_max_rows` rows in a graph, one backward pass per row
    unrolled in the graph; otherwise a `tf.while_loop` over rows with the
    linear shortcuts, and the plain loop when even the shortcuts cannot be
    built. Decided when the graph is built.

  Under control flow v1, TensorFlow cannot differentiate a while loop inside
  another, so rows that will be differentiated again (`differentiated`, the
  levels below the last of a derivative of order >= 3) are vectorized
  without chunks, or else unrolled in Python (static `num_cols`). Under XLA
  (`compiled_by_xla`) they are unrolled (static `num_cols`), or else
  vectorized without chunks: XLA compiles neither loop's gradient inside
  another loop, nor, for some models, pfor's gradients of pfor's rows.

  Args:
    vjp: callable `(targets, cotangents, source) -> Tensor (N, P)`: the
      vector-Jacobian product of the list `targets` with the list
      `cotangents` with respect to `source` (`None`: the input itself,
      `P = x_cols`), flattened per sample; never `None` (zeros when
      unconnected).
    target: `Tensor` of shape `(N, num_cols)`.
    num_cols: `int` or scalar `Tensor`: the number of columns of `target`.
    x_cols: `int` or scalar `Tensor`: the number of input features K.
    plan: the call's `Plan`: method, chunk size (rows per vectorized
      backward pass), parallel iterations and thresholds.
    select_column: `bool`: keep only element `j` of row `j` (the diagonal);
      requires `num_cols == x_cols`.
    source: the input `Tensor` `(N, K)` that `vjp` differentiates with
      respect to, for the linear shortcuts; `None` turns them off.
    differentiated: `bool`: whether the result will be differentiated again.
    chunk_size: `int`, scalar `Tensor` or `None`: rows per vectorized
      backward pass in place of `plan.chunk_size` (`None`: the plan's).
    through_v1_loop: `bool`: `vjp` differentiates a control flow v1 loop
      (static `num_cols`). TensorFlow builds no gradient of such a loop in
      another loop (the rows' `tf.while_loop`), and `pfor`'s fails when
      run: the rows are unrolled in Python, whatever `plan.method`. The
      same holds, found from the graph, for a `target` built by
      TensorFlow's gradient of a fused batch norm's gradient (see
      `_taped_in_v1_loop`).

  Returns:
    A `Tensor` of shape `(N, num_cols, x_cols)`, or `(N, num_cols)` when
    `select_column` is set.
  """
  if isinstance(num_cols, int) and num_cols == 0:
    # No features: no rows to stack (a stack of none has no shape).
    n = tf.shape(target)[0]
    shape = [n, 0] if select_column else [n, 0, x_cols]
    return tf.zeros(tf.stack(shape), target.dtype)
  source = _graph_source(source)
  static = isinstance(num_cols, int)
  xla_levels = differentiated and compiled_by_xla()
  no_loops = (
    (differentiated and control_flow_v1())
    or _v1_loop_output(source)
    or (xla_levels and not static)
  )
  through_v1_loop = (
    through_v1_loop
    or _taped_in_v1_loop(target, num_cols)
    or (xla_levels and static)
  )
  if no_loops:
    chunk_size = None
  elif chunk_size is None:
    chunk_size = plan.chunk_size
  attempts = _attempts(
    plan, num_cols, source is not None, no_loops, through_v1_loop
  )

  def build(attempt):
    pieces = None
    if attempt.loop == "unrolled" and not select_column:
      pieces = _stacked_pieces(target)
    if pieces:
      # The rows of each piece apart: from `target`, every row would run
      # back through all the pieces (a level of rows below, for orders >=
      # 3), with zero cotangents that TensorFlow does not prune.
      return tf.concat(
        [vectorized(attempt, p, int(p.shape[1])) for p in pieces], axis=1
      )
    if attempt.loop == "pfor" and (
      tf.executing_eagerly() or _batched_matmuls(target)
    ):
      return _one_sample_by_loop(
        target,
        lambda: vectorized(attempt),
        lambda: _rows.reference(
          vjp, target, num_cols, x_cols, plan, select_column
        ),
      )
    return vectorized(attempt)

  def vectorized(attempt, target=target, num_cols=num_cols):
    if attempt.shortcuts:
      rows = _shortcuts.rows(
        vjp,
        target,
        num_cols,
        x_cols,
        source,
        plan,
        select_column,
        attempt.loop,
        chunk_size,
      )
      if rows is not None:
        return rows
    elif attempt.loop == "while_loop":
      return _rows.reference(vjp, target, num_cols, x_cols, plan, select_column)
    row = _rows.one_hot_row(
      vjp, target, num_cols, select_column, attempt.loop == "pfor"
    )
    width = None if select_column else x_cols
    return _rows.stack(
      row, num_cols, width, target.dtype, attempt.loop, plan, target, chunk_size
    )

  for attempt, after in zip(attempts, attempts[1:]):
    graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
    try:
      with _kept_control_flow_context(graph), _quiet_tensorflow_logger():
        return build(attempt)
    except FALLBACK_ERRORS as error:
      warn_once(
        graph,
        f"tf1hess: the rows could not be built by {_describe(attempt)} "
        f"({type(error).__name__}: {_gist(error)}); falling "
        f"back to {_describe(after)}.",
      )
  return build(attempts[-1])


def _joined(t):
  """The tensors that `t` joins on axis 1 (a `Pack` or a `ConcatV2`), or
  `None`."""
  if t.op.type == "Pack" and t.op.get_attr("axis") == 1:
    return list(t.op.inputs)
  if t.op.type == "ConcatV2":
    if tf.get_static_value(t.op.inputs[-1]) in (1, -1):
      return list(t.op.inputs[:-1])
  return None


def _stacked_pieces(target):
  """The tensors `(N, w_i)` that `target` `(N, sum w_i)` joins, or `None`.

  Rows unrolled and flattened (`_rows.stack`, `flatten_samples`: a `Pack` on
  axis 1 under a `Reshape`), or the columns of several rows that a level of
  `_symmetric_levels` differentiates (a `ConcatV2` on axis 1).
  """
  if target.shape.rank != 2:
    return None
  joined = target
  if target.op.type == "Reshape":  # Of a `Pack` only.
    joined = target.op.inputs[0]
    if joined.op.type != "Pack":
      return None
  pieces = _joined(joined)
  if pieces is None:
    return None
  widths = [
    tf.compat.dimension_value(p.shape[-1]) if p.shape.rank == 2 else None
    for p in pieces
  ]
  if None in widths or tf.compat.dimension_value(target.shape[1]) != sum(
    widths
  ):
    return None
  return pieces


def _rows_of(stacked, num_rows):
  """The `num_rows` rows `(N, K)` of `stacked` `(N, R, K)`: the tensors that
  it stacks where `stack_rows` unrolled them (a `Pack` on axis 1, or a
  `ConcatV2` of those), so that differentiating one row does not run back
  through the others; else slices."""
  if tf.executing_eagerly():
    return tf.unstack(stacked, num=num_rows, axis=1)
  parts = [stacked]
  if stacked.op.type == "ConcatV2":
    parts = _joined(stacked) or parts
  rows = []
  for part in parts:
    packed = _joined(part) if part.op.type == "Pack" else None
    if packed is not None:
      rows.extend(packed)
    elif tf.compat.dimension_value(part.shape[1]) is not None:
      rows.extend(tf.unstack(part, axis=1))
    else:  # A loop's rows, their number unknown to the graph.
      return tf.unstack(stacked, num=num_rows, axis=1)
  return rows


# Batched products: `pfor` vectorizes a `(N, T, F) @ (F, U)` of the model's
# gradient as `(R, N, T, F) @ (F, U)`, R rows at once.
_BATCHED_MATMULS = frozenset(
  ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")
)


def _batched_matmuls(target):
  """Whether `target` is computed from a batched product of rank >= 3."""
  return any(
    op.type in _BATCHED_MATMULS
    and any(t.shape.rank is None or t.shape.rank >= 3 for t in op.inputs)
    for op in ancestor_ops([target])
  )


def ancestor_ops(ys, control_inputs=False):
  """The ops whose outputs `ys` read, theirs included, through data inputs
  (and the ops that run before them, with `control_inputs`).

  The graph's other ops may be many: earlier Hessians of the same model
  read `x` too, and a walk forward from `x` alone would visit them all.
  """
  seen, stack = set(), [y.op for y in ys]
  while stack:
    op = stack.pop()
    if op not in seen:
      seen.add(op)
      stack.extend(t.op for t in op.inputs)
      if control_inputs:
        stack.extend(op.control_inputs)
  return seen


def graph_within(graph, other):
  """Whether `graph` is `other` or a function graph built within it (a
  cond's branch, a loop's body, a `tf.function`), through `outer_graph`."""
  while graph is not None and graph is not other:
    graph = getattr(graph, "outer_graph", None)
  return graph is not None


def _one_sample_by_loop(target, vectorized, looped):
  """`vectorized()`, but `looped()` for a batch of one sample.

  oneDNN's batched product (TensorFlow's CPU kernel) gives wrong numbers,
  or corrupts memory, on the `(R, 1, T, F) @ (F, U)` that `pfor` makes of
  a rank-3 product's gradient for one sample (seen with R = 6, T = 3,
  F = U = 2, and not with R = 2): a loop over the rows, for one sample,
  costs little. Executing eagerly, where no graph tells, every batch of
  one sample is looped.
  """
  n = tf.compat.dimension_value(target.shape[0])
  if n is None and tf.executing_eagerly():
    n = int(tf.shape(target)[0])
  if n is not None:
    return looped() if n == 1 else vectorized()
  return tf.cond(tf.equal(tf.shape(target)[0], 1), looped, vectorized)


def _gist(error):
  """The line of `error`'s message that says what went wrong: its first,
  or its last where the first only announces the others (pfor's "in user
  code:" before a traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return ""
  gist = lines[-1] if lines[0].endswith(":") else lines[0]
  return gist.removeprefix(f"{type(error).__name__}: ")


# TensorFlow's gradients of the fused batch normalization: op types whose own
# gradient (`_FusedBatchNormGradGrad` of nn_fused_batch_norm_grad.py) builds
# its ops with a `GradientTape`.
TAPED_GRADIENTS = frozenset(
  ("FusedBatchNormGrad", "FusedBatchNormGradV2", "FusedBatchNormGradV3")
)


def _v1_loop_output(source):
  """Whether `source` (`x`) is an output of a control flow v1 loop (the
  final state of a `dynamic_rnn`): TensorFlow's gradients with respect to
  it cannot be built in a v1 `tf.while_loop` ("Cannot use ... in different
  while loops"), so its rows are vectorized or unrolled."""
  return (
    source is not None
    and not tf.executing_eagerly()
    and control_flow_util.IsLoopExit(source.op)
  )


def _taped_in_v1_loop(target, num_cols):
  """Whether the rows of `target` must be unrolled: under control flow v1,
  `target` holds ops built by TensorFlow's gradient of a fused batch norm's
  gradient (a function of gradients of Keras `BatchNormalization` or
  `LayerNormalization`, or of `tf.compat.v1.nn.fused_batch_norm`).

  Differentiated again inside a v1 `tf.while_loop` or `pfor`, those ops
  give wrong rows (off by half the Hessian's largest entry), with no error;
  rows unrolled in the graph are right. Raises `ValueError` when they
  cannot be unrolled (`num_cols` known only at run time).
  """
  if tf.executing_eagerly() or not control_flow_v1(target.graph):
    return False
  seen = ancestor_ops([target], control_inputs=True)
  scopes = [f"{op.name}_grad/" for op in seen if op.type in TAPED_GRADIENTS]
  if not any(s in op.name for op in seen for s in scopes):
    return False
  if not isinstance(num_cols, int):
    raise ValueError(
      f"`{target.name}` is built by TensorFlow's gradient of the gradient "
      "of a fused batch normalization, which gives wrong rows inside a "
      "control flow v1 loop (tf.compat.v1.disable_v2_behavior()); the rows "
      "are then unrolled, which needs a static number of features: saw "
      f"`xs` with features known only at run time ({target.shape}). Give "
      "`xs` a static shape after the batch axis, or use control flow v2: "
      "tf.compat.v1.enable_control_flow_v2() before building the model."
    )
  return True


def _attempts(plan, num_rows, shortcuts, no_loops, through_v1_loop):
  """The strategies (`Attempt`s) `plan` tries, in order.

  The errors of the last one propagate; the others fall back to the next
  when building them raises one of `FALLBACK_ERRORS` (e.g. `pfor` meets an
  op it cannot vectorize).
  """
  if through_v1_loop:
    return [Attempt("unrolled", shortcuts)]
  if no_loops:
    return [Attempt("pfor", shortcuts), Attempt("unrolled", shortcuts)]
  if plan.method == "while_loop":
    return [Attempt("while_loop", False)]
  out = []
  eager = tf.executing_eagerly()
  static = isinstance(num_rows, int)
  if plan.method == "pfor" or static and num_rows >= plan.vectorize_from(eager):
    out.append(Attempt("pfor", shortcuts))
  elif static and num_rows <= plan.unroll_max_rows and not eager:
    out.append(Attempt("unrolled", shortcuts))
  if shortcuts:
    out.append(Attempt("while_loop", True))
  out.append(Attempt("while_loop", False))
  return out


@contextlib.contextmanager
def _kept_control_flow_context(graph):
  """Restores `graph`'s control flow context when building the rows fails.

  Under control flow v1 a `tf.while_loop` (of the rows, or of chunks of
  rows) whose body raises while it is built leaves its `WhileContext`
  entered on the graph: TensorFlow exits it only on success. The next
  strategy must be built outside it. There is no public API for this.
  """
  # pylint: disable=protected-access
  context = graph._get_control_flow_context() if graph is not None else None
  try:
    yield
  except BaseException:
    if graph is not None:
      graph._set_control_flow_context(context)
    raise


@contextlib.contextmanager
def _quiet_tensorflow_logger():
  """Mutes `pfor`'s error log for an attempt that may fall back.

  `pfor` logs the op it cannot convert, with its stack trace, at ERROR
  before raising; the fallback's one WARNING says the same in one line.
  """
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel("CRITICAL")
  try:
    yield
  finally:
    logger.setLevel(level)


def _describe(attempt):
  return attempt.loop + (" with linear shortcuts" if attempt.shortcuts else "")


# Messages already logged, per graph or per function executed eagerly
# (`None`: once per process): one warning per model and reason, not one per
# op built on the same model or per call in a training loop.
_WARNED = weakref.WeakKeyDictionary()
_WARNED_EAGERLY = set()


def warn_once(owner, message):
  """Logs `message` at WARNING once per `owner`.

  Args:
    owner: the `tf.Graph` the ops are built in, or the function (a Keras
      model, say) executed eagerly; `None`: once per process. An owner that
      cannot be referred to weakly gets the message every time.
    message: `str`.
  """
  if owner is None:
    seen = _WARNED_EAGERLY
  else:
    try:
      seen = _WARNED.setdefault(owner, set())
    except TypeError:  # Not weakly referable.
      seen = set()
  if message not in seen:
    seen.add(message)
    logging.warning("%s", message)


@tf.autograph.experimental.do_not_convert
def per_sample_derivatives(
  x,
  grad,
  gradient_fn,
  order,
  plan,
  diagonal=False,
  check_independence=False,
  input_name="x",
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
    plan: the call's `Plan`, passed to `stack_rows`. With no `chunk_size`,
      all K rows of the Hessian level are vectorized at once; higher levels
      (M = K^(l-1) rows) then go by chunks of K rows, so that a chunk's
      cotangents are no larger than the output.
    diagonal: `bool`: for `order == 2`, return only the diagonals.
    check_independence: `bool`: for `order == 2`, make the result depend on
      `independence_check`.
    input_name: `str`: how error messages name `x`.
  Returns:
    A `Tensor` of shape `(N,) + (d1, ..., dm) * order`, or `(N, d1, ..., dm)`
    when `diagonal` is set; `None` when a level of derivatives is unconnected
    and `gradient_fn` returned `None`.
  """
  n, k = batch_size(x), num_columns(x)
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
  symmetric = order > 2 and isinstance(k, int) and k > 0 and not diagonal
  if symmetric:
    result = _symmetric_levels(vjp, result, n, k, order, plan, x)
  cols = k
  for level in () if symmetric else range(2, order + 1):
    result = stack_rows(
      vjp(level),
      result,
      cols,
      k,
      plan,
      select_column=diagonal,
      source=x,
      differentiated=level < order,
      chunk_size=k if plan.chunk_size is None and level > 2 else None,
    )
    if diagonal:
      break
    cols = cols * k
    result = flatten_samples(result, n, cols)
  shape, static_shape = derivative_shape(x, 1 if diagonal else order)
  result = tf.reshape(result, shape)
  result.set_shape(static_shape)
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


def _symmetric_levels(vjp, grad, n, k, order, plan, x):
  """The derivatives of `order` >= 3, flattened `(N, K**order)`, from the
  flattened gradient `grad` `(N, K)` and its rows of sorted indices only.

  Derivatives do not depend on the order of their indices. The row of level
  `l` for the sorted indices `m` (`l - 1` of them) holds the entries
  `m + (b,)` for every `b`; those with `b < m[-1]` are entries of another
  sorted row. So level `l + 1` differentiates only the columns
  `b >= m[-1]` of each row of level `l`: C(K + l - 1, l) rows in place of
  K**l (K = 2, order 4: 2 + 3 + 4 backward passes in place of
  2 + 4 + 8), and the entries of unsorted indices are copies.

  Args:
    vjp: callable `level -> flat_vjp`, as in `per_sample_derivatives`.
    grad: `Tensor` `(N, K)`.
    n: the batch size (`int` or scalar `Tensor`).
    k: `int` K.
    order: `int` >= 3.
    plan: the call's `Plan`.
    x: the input, the source of the linear shortcuts.

  Returns:
    A `Tensor` `(N, K**order)`.
  """
  rows = {(): grad}  # Sorted indices -> the row of their derivative.
  for level in range(2, order + 1):
    # The columns to differentiate, taken before `vjp(level)` (where the
    # eager path stops the tape that records them).
    firsts = [m[-1] if m else 0 for m in rows]
    columns = [
      row[:, first:] if first else row
      for row, first in zip(rows.values(), firsts)
    ]
    target = columns[0] if len(columns) == 1 else tf.concat(columns, axis=1)
    stacked = stack_rows(
      vjp(level),
      target,
      sum(k - first for first in firsts),
      k,
      plan,
      source=x,
      differentiated=level < order,
      chunk_size=k if plan.chunk_size is None and level > 2 else None,
    )
    keys = [m + (b,) for m, first in zip(rows, firsts) for b in range(first, k)]
    rows = dict(zip(keys, _rows_of(stacked, len(keys))))
  position = {m: i for i, m in enumerate(rows)}
  flat = flatten_samples(
    tf.stack(list(rows.values()), axis=1), n, len(rows) * k
  )
  entries = (sorted(m) for m in itertools.product(range(k), repeat=order))
  return tf.gather(
    flat, [position[tuple(m[:-1])] * k + m[-1] for m in entries], axis=1
  )


# How the message of a failed independence check starts.
INDEPENDENCE_MESSAGE_START = "The samples of `"
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
      f"{INDEPENDENCE_MESSAGE_START}{name}` are not independent: a random full "
      "Hessian-vector product differs from the per-sample (block-diagonal)"
      " one, so the output of sample i also depends on other samples "
      "(batch norm in training mode, a reduction over the batch such as "
      "(sum x)^2, ...) and per-sample Hessians are not defined by the row "
      "trick. Remove the coupling (e.g. batch norm in inference mode) or "
      "compute the full Hessian."
    ),
  )


def compiled_by_xla():
  """Whether the graph being built is compiled by XLA: a `tf.function` with
  `jit_compile=True` (Keras' `jit_compile`, which Keras 3 turns on where
  there is a GPU). The gradients of a loop there need a bound XLA knows
  (a static number of iterations), and both branches of a cond compile."""
  graph = tf.compat.v1.get_default_graph()
  return control_flow_util.GraphOrParentsInXlaContext(graph)
