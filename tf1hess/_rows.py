"""The reference row loop, and the loops that stack rows: no graph is read.

Row `j` of sample `i` of the per-sample Jacobian of `target` `(N, M)` is
`d target[i, j] / d x[i, :]`: the vector-Jacobian product of `target` with
the one-hot cotangent that selects column `j` in every sample at once. That
is only valid when sample `i` of `target` depends on `x[i]` alone (see
`check_independence` in `ops.py`).

`reference` is the design every other strategy is tested against: a
`tf.while_loop` over the rows, one backward pass each. `stack` is how any
strategy puts its rows together (a loop, vectorized chunks, or rows
unrolled in the graph); the linear shortcuts (`_shortcuts`) only change the
row function it is given. Nothing here inspects the graph around `x`.
"""

import tensorflow as tf

from tensorflow.python.ops.parallel_for import control_flow_ops as pfor_ops  # pylint: disable=g-direct-tensorflow-import

# The name of the loops over rows (and chunks of rows), by which errors
# tell them from a model's loops.
LOOP_NAME = "tf1hess_rows"

LOOPS = ("while_loop", "pfor", "unrolled")


def one_hot_row(vjp, target, num_cols, select_column, vectorized):
  """The plain row function: one backward pass from `target` per row.

  Args:
    vjp: callable `(targets, cotangents, source) -> (N, P)`, see
      `_core.stack_rows`.
    target: `Tensor` `(N, num_cols)`.
    num_cols: `int` or scalar `Tensor`.
    select_column: `bool`: keep only element `j` of row `j`.
    vectorized: `bool`: whether `pfor` will vectorize the row (a slice at a
      loop index does not vectorize; a gather does).

  Returns:
    A callable `j -> Tensor` `(N, K)`, or `(N,)` with `select_column`.
  """
  n = tf.shape(target)[0]

  def row(j):
    cotangent = tf.one_hot(tf.fill([n], j), num_cols, dtype=target.dtype)
    r = vjp([target], [cotangent], None)
    return column(r, j, vectorized) if select_column else r

  return row


def column(r, j, vectorized):
  """Column `j` of the rows `r` `(N, K)`: a gather where `pfor` vectorizes
  (a slice at a loop index does not vectorize), else a slice."""
  return tf.gather(r, j, axis=1) if vectorized else r[:, j]


def stack(row, num_rows, width, dtype, loop, plan, target, chunk_size=None):
  """Stacks `row(j)` for `j < num_rows` into `(N, num_rows, ...)`.

  Args:
    row: callable `j -> Tensor`: a row `(N, width)`, or `(N,)`.
    num_rows: `int` or scalar `Tensor`.
    width: `int` or scalar `Tensor`: the width of a row, or `None` for rows
      of shape `(N,)`.
    dtype: the rows' `tf.DType`.
    loop: one of `LOOPS`: `"while_loop"` (`plan.parallel_iterations` rows
      at a time), `"pfor"` (vectorized, by chunks of `chunk_size` rows), or
      `"unrolled"` (one backward pass per row in the graph; a static
      `num_rows`).
    plan: the call's `Plan` (parallel iterations, `max_reads`).
    target: the tensor whose rows these are: its batch size tells whether
      the batch is empty, which `pfor` cannot vectorize.
    chunk_size: `int`, scalar `Tensor` or `None` (all rows at once): rows
      per vectorized backward pass.

  Returns:
    A `Tensor` `(N, num_rows, width)`, or `(N, num_rows)`.
  """
  widths = [] if width is None else [width]
  static = [w if isinstance(w, int) else None for w in widths]
  row_shape = [target.shape[0]] + static
  if tf.compat.dimension_value(target.shape[0]) == 0:
    # Known empty: no backward pass to build (`_core.statically_empty`).
    empty = tf.zeros(tf.stack([0, num_rows] + widths), dtype)
    empty.set_shape(
      [0, num_rows if isinstance(num_rows, int) else None] + static
    )
    return empty
  if loop == "unrolled":
    if not isinstance(num_rows, int):
      raise ValueError(
        "Under control flow v1 (tf.compat.v1.disable_v2_behavior()) or XLA "
        "(tf.function(jit_compile=True)), derivatives of order >= 3 of a "
        "model that `pfor` cannot vectorize unroll the rows that are "
        "differentiated again, which needs a static number of features: saw "
        "one known only at run time. Give `xs` a static shape after the "
        "batch axis, or, under control flow v1, call "
        "tf.compat.v1.enable_control_flow_v2() before building the model."
      )
    return tf.stack([row(j) for j in range(num_rows)], axis=1)
  if loop == "pfor":
    stacked = _nonempty(
      target,
      lambda: _pfor_rows(row, num_rows, dtype, row_shape, plan, chunk_size),
      [num_rows] + widths,
      dtype,
    )
    return _samples_first(stacked)
  ta = tf.TensorArray(
    dtype, size=num_rows, element_shape=tf.TensorShape(row_shape)
  )
  _, ta = tf.while_loop(
    lambda j, _: j < num_rows,
    lambda j, ta: (j + 1, ta.write(j, row(j))),
    (tf.constant(0), ta),  # A tuple, as the body's: with a bound, v1 compares.
    parallel_iterations=plan.parallel_iterations or 10,
    # A bound XLA knows (`jit_compile=True`): its gradient's accumulators
    # need one.
    maximum_iterations=num_rows if isinstance(num_rows, int) else None,
    name=LOOP_NAME,
  )
  if isinstance(num_rows, int) and 0 < num_rows <= plan.max_reads:
    # One copy into the (N, M, ...) layout, not a stack and a transpose.
    return tf.stack([ta.read(j) for j in range(num_rows)], axis=1)
  return _samples_first(ta.stack())


def reference(vjp, target, num_cols, x_cols, plan, select_column=False):
  """The reference design: a `tf.while_loop` of one backward pass per row.

  Args:
    vjp, target, num_cols, x_cols, select_column: see `_core.stack_rows`.
    plan: the call's `Plan` (its `parallel_iterations` and `max_reads`).

  Returns:
    A `Tensor` `(N, num_cols, x_cols)`, or `(N, num_cols)` with
    `select_column`.
  """
  row = one_hot_row(vjp, target, num_cols, select_column, vectorized=False)
  width = None if select_column else x_cols
  return stack(row, num_cols, width, target.dtype, "while_loop", plan, target)


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


def _pfor_rows(row, num_rows, dtype, row_shape, plan, chunk_size):
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
      lambda: _pfor_rows(row, num_rows, dtype, row_shape, plan, chunk_size),
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
    parallel_iterations=plan.parallel_iterations or 1,
    name=LOOP_NAME,
  )
  stacked = ta.stack()  # (num_chunks, chunk_size, N, ...)
  rows = tf.reshape(
    stacked,
    tf.concat([[num_chunks * chunk_size], tf.shape(stacked)[2:]], axis=0),
  )
  if isinstance(num_rows, int) and num_rows % chunk_size == 0:
    return rows
  return rows[:num_rows]
