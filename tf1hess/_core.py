"""The row loop: the one place where derivative tensors are stacked row by row.

Every path of the package (graph ops, the eager path, higher orders, the
diagonals) builds its per-sample derivatives through `stack_rows`: given a
per-sample tensor `target` of shape `(N, M)` and a vector-Jacobian product
`vjp(target, cotangent)`, it returns the per-sample Jacobian `(N, M, K)` of
`target` with respect to the `(N, K)` input, using M backward passes whose
cost does not depend on N.

Row `j` of sample `i` is `d target[i, j] / d x[i, :]`. It is obtained as the
vector-Jacobian product of `target` with the one-hot cotangent that selects
column `j` in every sample at once. That is only valid when sample `i` of
`target` depends on `x[i]` alone (see `check_independence` in `ops.py`).
"""

import tensorflow as tf

from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import


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
  """Reshapes `t` of shape `(N, ...)` into `(N, k)`, also when `N == 0`."""
  return tf.reshape(t, tf.stack([n, k]) if _is_dynamic(n, k) else [n, k])


def _is_dynamic(*dims):
  return any(isinstance(d, tf.Tensor) for d in dims)


def control_flow_v1(graph=None):
  """Whether ops built now in `graph` (default: current) use v1 loops."""
  if tf.executing_eagerly():
    return False
  graph = graph or tf.compat.v1.get_default_graph()
  return not control_flow_util.EnableControlFlowV2(graph)


def stack_rows(
  vjp, target, num_cols, x_cols, parallel_iterations=None, select_column=False
):
  """Per-sample Jacobian of `target` by one backward pass per column.

  Args:
    vjp: callable `(target, cotangent) -> Tensor (N, x_cols)` giving the
      vector-Jacobian product of `target` with respect to the flattened input;
      it must return a tensor (zeros when unconnected), never `None`.
    target: `Tensor` of shape `(N, num_cols)`.
    num_cols: `int` or scalar `Tensor`: the number of columns of `target`.
    x_cols: `int` or scalar `Tensor`: the number of input features K.
    parallel_iterations: `int` or `None`: passed to `tf.while_loop`.
    select_column: `bool`: keep only element `j` of row `j` (the diagonal);
      requires `num_cols == x_cols`.

  Returns:
    A `Tensor` of shape `(N, num_cols, x_cols)`, or `(N, num_cols)` when
    `select_column` is set.
  """
  n = tf.shape(target)[0]
  dtype = target.dtype

  def row(j):
    cotangent = tf.one_hot(tf.fill([n], j), num_cols, dtype=dtype)
    r = vjp(target, cotangent)
    if select_column:
      r = r[:, j]
    return r

  element_shape = tf.TensorShape(
    [target.shape[0]]
    + ([] if select_column else [x_cols if isinstance(x_cols, int) else None])
  )
  ta = tf.TensorArray(dtype, size=num_cols, element_shape=element_shape)

  def body(j, ta):
    return j + 1, ta.write(j, row(j))

  _, ta = tf.while_loop(
    lambda j, _: j < num_cols,
    body,
    [tf.constant(0), ta],
    parallel_iterations=parallel_iterations or 10,
  )
  stacked = ta.stack()  # (num_cols, N, ...)
  perm = [1, 0] if select_column else [1, 0, 2]
  return tf.transpose(stacked, perm)


def per_sample_derivatives(
  x,
  grad,
  gradient_fn,
  order,
  parallel_iterations=None,
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
      `gradient(target, cotangent)` is the vector-Jacobian product of `target`
      with respect to `x` (shape of `x`), or `None` when unconnected. Called
      for each level (2, 3, ...) just before that level is built, which lets
      the eager path stop the matching tape first.
    order: `int` >= 1.
    parallel_iterations: passed to `stack_rows`.
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
  dims = x.shape[1:]
  unconnected = []

  def vjp(level):
    gradient = gradient_fn(level)

    def flat_vjp(target, cotangent):
      g = gradient(target, cotangent)
      if g is None:
        unconnected.append(level)
        return tf.zeros(tf.stack([tf.shape(target)[0], k]), target.dtype)
      return flatten_samples(g, n, k)

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


def independence_check(x, hessian, full_hvp_fn, name):
  """Returns an assert that block-diagonal and full Hessian products agree.

  The row trick is only valid when sample `i` of the output depends on `x[i]`
  alone. For one random `v`, the full product `H_full v` (one backward pass
  through the whole batch) must then equal `H_i v_i` for every sample; a
  coupling across samples (batch norm in training mode, `(sum x)^2`, ...)
  makes them differ.

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
  err = tf.reduce_max(tf.abs(full - block))
  scale = tf.maximum(
    tf.reduce_max(tf.abs(full)) + tf.reduce_max(tf.abs(block)),
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
