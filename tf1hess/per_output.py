"""Per-output and joint per-sample derivatives as TF1 graph ops.

`tf.gradients` and the ops of `tf1hess.ops` sum `ys`: a network with two
outputs gives `H_0 + H_1`. The ops here keep the outputs apart. For `ys` of
shape `(N, m...)` (M = prod(m) outputs per sample; `(N,)` is one output with
no output dimensions) and `x` of shape `(N, d...)` (K features):

* `batch_jacobians(ys, x)`: `(N, m..., d...)`, `J[n, a, b] = d y[n, a] /
  d x[n, b]`.
* `batch_output_hessians(ys, x)`: `(N, m..., d..., d...)`.
* `batch_output_hessian_diagonals(ys, x)`: `(N, m..., d...)`.
* `batch_output_laplacians(ys, x)`: `(N, m...)`, the traces.

For several inputs `xs = [x, t]` (e.g. the `(None, 1)` placeholders of space
and time in PINN code), the Hessian is that of the joint input, the
concatenation of the flattened inputs in the order of `xs`, returned as
nested blocks: `H[a][b]` of shape `(N, m..., d_a..., d_b...)`, with
`H[a][b][n, o, i, j] = d^2 y[n, o] / d xs[a][n, i] d xs[b][n, j]`; the cross
blocks (`a != b`, e.g. `u_xt`) are included and `H[b][a]` is the transpose of
`H[a][b]`. The diagonal of the joint Hessian is that of the per-input blocks,
and the Laplacian its trace, summed over all of `xs`.

The Jacobians are one build of the shared row machinery of the package (M
rows, one backward pass each: vectorized, unrolled or looped, as `method`
says). The Hessians of each output are `tf1hess.batch_hessians` of that
output (one input), or, for several, `tf1hess.batch_hessians` of the
output of a copy of the model that reads the joint input as one tensor
(`dispatch.joint_input`: the engine takes it in one walk), or the same rows
over the joint input where the model cannot be copied; the diagonals are
`tf1hess.batch_hessian_diagonals` of each output. The forward pass is
shared; each output takes its own K rows (see `_output_hessian`).
"""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _checks
from tf1hess import _core
from tf1hess import ops
from tf1hess import plan as plan_lib
from tf1hess.forward import dispatch

_ZERO = tf.UnconnectedGradients.ZERO
_UNBUILT = object()


class Problem:
  """Checked `ys` (one tensor, static outputs) and `xs` of one op call.

  Attributes:
    y: the `Tensor` `ys`.
    xs: the list of inputs.
    was_sequence: whether `xs` was a list or tuple.
    out_dims: `list` of the static output dimensions after the batch.
    num_outputs: `int` M, their product (1 for `(N,)`).
    n: the batch size (`int` or scalar `Tensor`).
    x_dims: per input, the `list` of feature dimensions.
    x_cols: per input, the `int` number of features.

  With `joined`, the op's results join the features of `xs`, which must
  then have one dtype.
  """

  def __init__(self, ys, xs, op_name, plan, joined=True):
    ys_list, self.xs, self.was_sequence = ops._prepare(ys, xs, op_name)  # pylint: disable=protected-access
    self._op_name = op_name
    if len(ys_list) != 1:
      raise ValueError(
        f"`ys` must be one tensor of per-sample outputs (N, m...) for "
        f"`{op_name}`; saw a list of {len(ys_list)}. Concatenate the outputs "
        "(tf.concat(ys, axis=1)) to get them all."
      )
    self.y = tf.convert_to_tensor(ys_list[0])
    rank = self.y.shape.rank
    if rank is None or rank < 1 or not self.y.shape[1:].is_fully_defined():
      raise ValueError(
        f"`ys` must have a batch dimension and static dimensions after it "
        f"(N, m...) for `{op_name}`; saw shape {self.y.shape}."
      )
    self.out_dims = self.y.shape[1:].as_list()
    self.num_outputs = int(self.y.shape[1:].num_elements())
    for x in self.xs:
      if not x.shape[1:].is_fully_defined():
        raise ValueError(
          f"`xs` must have static dimensions after the batch (N, d...) for "
          f"`{op_name}`; saw shape {x.shape} ({x.name})."
        )
    if joined and len({x.dtype.base_dtype for x in self.xs}) > 1:
      seen = ", ".join(f"{x.name}: {x.dtype.name}" for x in self.xs)
      raise TypeError(
        f"`xs` must have one dtype for `{op_name}`, whose results join "
        f"their features; saw {seen}. Cast them to one dtype."
      )
    self.x_dims = [x.shape[1:].as_list() for x in self.xs]
    self.x_cols = [int(x.shape[1:].num_elements()) for x in self.xs]
    self.n = _core.batch_size(self.xs[0])
    self._plan = plan
    self._model = None
    self._joint = _UNBUILT
    self._checked = set()  # The orders `check_loops` passed.
    self._moments = None

  def build_context(self):
    """Where to build second derivatives (`tf1hess.ops.build_context`)."""
    return ops.build_context([self.y], self.xs, 2, self._op_name)

  @property
  def model(self):
    """`y`, or for methods auto and forward its copy with the loops between
    `xs` and it unrolled where they can be, as `tf1hess.ops` differentiates
    it (a session that ran the model's loop cannot run TensorFlow's
    gradients of it; control flow v1 loops have no second derivatives)."""
    if self._model is None:
      with self.y.graph.as_default():
        (self._model,) = dispatch.without_loops([self.y], self.xs, self._plan)
    return self._model

  @property
  def joint(self):
    """`(z, model)` for several inputs: the inputs as one `(N, K)` tensor
    and `y` computed from it (`dispatch.joint_input`), whose Hessians over
    `z` hold the cross blocks, from one walk of the engine; or `None`, where
    they are the rows over the inputs."""
    if self._joint is _UNBUILT:
      with self.y.graph.as_default():
        found = dispatch.joint_input([self.y], self.xs, self._plan)
      self._joint = None if found is None else (found[0], found[1][0])
    return self._joint

  def check_loops(self, order):
    """Raises `ValueError` where a control flow v1 loop that is left in
    `model` stops derivatives of `order` (`tf1hess.ops`); once per order."""
    if order not in self._checked:
      ops._v1_loops([[self.model]] * len(self.xs), self.xs, order, False)  # pylint: disable=protected-access
      self._checked.add(order)

  def rows_miss_moments(self, warn=False):
    """Whether TensorFlow's rows miss curvature through `tf.nn.moments`
    (`dispatch.rows_miss_moments`), once auto has given them what it can
    (`dispatch.differentiate_moments_for_rows`); with `warn`, warns once
    if so that the rows over the joint input are built."""
    if self._moments is None:
      dispatch.differentiate_moments_for_rows([self.model], self.xs, self._plan)
      self._moments = dispatch.rows_miss_moments([self.model], self.xs)
    if warn and self._moments:
      dispatch.warn_of_moments(self.y.graph, "the rows over several inputs")
    return self._moments

  def through_v1_loop(self):
    """Whether a control flow v1 loop is left between `xs` and `model`."""
    between = ops.ops_between([self.model], self.xs)
    return any(control_flow_util.IsLoopEnter(op) for op in between)

  def output(self, m, model=None):
    """Output `m` of every sample of `model` (default `model`), `(N,)`."""
    model = self.model if model is None else model
    if model.shape.rank == 1:
      return model
    n = _core.batch_size(model)
    return _core.flatten_samples(model, n, self.num_outputs)[:, m]

  def hessian(self, m):
    """The Hessian `(N, K, K)` of output `m` over the joint input: of one
    input or of `joint` by `tf1hess.batch_hessians`, else the rows over the
    inputs."""
    if len(self.xs) == 1:
      return ops.batch_hessians(self.output(m), self.xs[0], plan=self._plan)
    if self.joint is not None:
      z, model = self.joint
      return ops.batch_hessians(self.output(m, model), z, plan=self._plan)
    self.check_loops(2)
    self.rows_miss_moments(warn=True)
    return joint_hessian_rows(self.gradient(m), self.xs, self._plan)

  def gradient(self, m):
    """The gradient of output `m` over the joint input, `(N, K)`."""
    grads = tf.gradients(self.output(m), self.xs, unconnected_gradients=_ZERO)
    flat = [_flat(g, self.n, k) for g, k in zip(grads, self.x_cols)]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)

  def shape(self, *dims):
    """The shape `(N, dims...)`, static where known."""
    dims = [d for group in dims for d in group]
    if isinstance(self.n, int):
      return [self.n] + dims
    return tf.concat([tf.reshape(self.n, [1]), dims], axis=0)

  def static_shape(self, *dims):
    return tf.TensorShape([self.xs[0].shape[0]] + [d for g in dims for d in g])

  def reshape(self, t, *dims):
    """`t` reshaped to `(N, dims...)`, with the static shape set."""
    out = tf.reshape(t, self.shape(*dims))
    out.set_shape(self.static_shape(*dims))
    return out


def _flat(t, n, k):
  return _core.flatten_samples(t, n, k)


def joint_vjp(xs, n, x_cols):
  """The vector-Jacobian product of `stack_rows` over the joint input.

  With `source=None` it returns the products with respect to every input,
  flattened and concatenated `(N, sum K_a)`; with a `source` (one input, the
  linear shortcuts of `stack_rows`) the product with respect to it.
  """

  def vjp(targets, cotangents, source=None):
    if source is not None:
      (g,) = tf.gradients(
        targets, source, grad_ys=cotangents, unconnected_gradients=_ZERO
      )
      return _flat(g, n, _core.num_columns(source))
    grads = tf.gradients(
      targets, xs, grad_ys=cotangents, unconnected_gradients=_ZERO
    )
    flat = [_flat(g, n, k) for g, k in zip(grads, x_cols)]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)

  return vjp


def joint_hessian_rows(gradient, xs, plan):
  """The per-sample Hessian over the joint input, from its gradient.

  Args:
    gradient: a `Tensor` `(N, K)`: the gradient of one output with respect
      to `xs`, flattened and concatenated in the order of `xs`.
    xs: the list of inputs `(N, d...)` with static feature dimensions.
    plan: the call's `tf1hess.Plan`.

  Returns:
    A `Tensor` `(N, K, K)`: row `r` is the derivative of column `r` of
    `gradient` with respect to the joint input, one backward pass each.
  """
  n = _core.batch_size(xs[0])
  x_cols = [int(x.shape[1:].num_elements()) for x in xs]
  return _core.stack_rows(
    joint_vjp(xs, n, x_cols),
    gradient,
    sum(x_cols),
    sum(x_cols),
    plan,
    source=xs[0] if len(xs) == 1 else None,
  )


def batch_jacobians(
  ys, xs, name=None, method="auto", chunk_size=None, plan=None
):
  """Per-sample Jacobians of every output of `ys`, per `x` of `xs`.

  Unlike `tf.gradients`, the outputs are not summed: for `ys` of shape
  `(N, m...)` and `x` of shape `(N, d...)` the result is `(N, m..., d...)`
  with `J[n, a, b] = d ys[n, a] / d x[n, b]`, one backward pass per output
  (rows of the shared row machinery). `ys` of shape `(N,)` gives the
  gradients, `(N, d...)`.

  Args:
    ys: a `Tensor` `(N, m...)` with static dimensions after the batch.
    xs: a `Tensor` `(N, d...)` of rank >= 2 with static feature dimensions,
      or a list of them.
    name: `str`, optional; default "batch_jacobians".
    method: as in `tf1hess.batch_hessians`; default `"auto"`.
    chunk_size: as in `tf1hess.batch_hessians`.
    plan: as in `tf1hess.batch_hessians`.

  Returns:
    A `Tensor` `(N, m..., d...)` per `x`, in the structure of `xs`; zeros
    where an output does not depend on an input.

  Raises:
    ValueError: when `ys` is a list or has dynamic dimensions after the
      batch, an `x` has rank < 2 or dynamic feature dimensions, and as
      `tf1hess.batch_hessians`.
    TypeError: as `tf1hess.batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   y = tf.stack([x[:, 0] * x[:, 1], x[:, 1] ** 2], axis=1)
    ...   j = tf1hess.batch_jacobians(y, x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(j, {x: [[2., 3.]]}))
    [[[3. 2.]
      [0. 6.]]]
  """
  plan = plan_lib.make(plan, method, chunk_size)
  with tf.name_scope(name or "batch_jacobians"):
    p = Problem(ys, xs, "batch_jacobians", plan)
    p.check_loops(1)
    if p.num_outputs == 1:
      grads = tf.gradients(p.model, p.xs, unconnected_gradients=_ZERO)
      rows = tf.concat(
        [_flat(g, p.n, k) for g, k in zip(grads, p.x_cols)], axis=1
      )[:, None, :]
    else:
      y = _flat(p.model, p.n, p.num_outputs)
      dtypes = {x.dtype for x in p.xs}
      if len(dtypes) == 1 and y.dtype not in dtypes:
        # The rows are derivatives with respect to `xs`, in their dtype
        # (a float32 loss of a float64 model: `tf.compat.v1.losses`).
        y = tf.cast(y, dtypes.pop())
      n, x_cols = p.n, p.x_cols
      rows = _core.stack_rows(
        joint_vjp(p.xs, n, x_cols),
        y,
        p.num_outputs,
        sum(x_cols),
        plan,
        source=p.xs[0] if len(p.xs) == 1 else None,
        through_v1_loop=p.through_v1_loop(),
      )
    results = []
    for a, block in enumerate(_split(rows, p.x_cols, axis=2)):
      results.append(p.reshape(block, p.out_dims, p.x_dims[a]))
    return _checks.restore_structure(results, p.was_sequence)


def _split(t, sizes, axis):
  if len(sizes) == 1:
    return [t]
  return tf.split(t, sizes, axis=axis)


def _output_hessian(p, m):
  """The Hessian `(N, K, K)` of output `m` over the joint input of `p`.

  Each output takes its own K rows: rows of the gradients of all outputs
  stacked into one target would each run back through every output's
  gradient (zero cotangents are not pruned), twice as slow on a tanh network
  with 3 outputs (K = 5 and 10, N = 4096).
  """
  k = sum(p.x_cols)
  return tf.reshape(p.hessian(m), p.shape([k, k]))


def batch_output_hessians(
  ys, xs, name=None, method="auto", chunk_size=None, plan=None
):
  """Per-sample Hessians of every output of `ys`, with the cross blocks.

  For `ys` of shape `(N, m...)` and one `x` of shape `(N, d...)`: a `Tensor`
  `(N, m..., d..., d...)`, the Hessian of each output apart (not of their
  sum, as `tf1hess.batch_hessians` gives). For a list `xs`, the Hessian over
  the joint input as nested blocks `H[a][b]` of shape
  `(N, m..., d_a..., d_b...)`, cross blocks included:
  `H[a][b][n, o, i, j] = d^2 ys[n, o] / d xs[a][n, i] d xs[b][n, j]`.

  Each output is `tf1hess.batch_hessians` of that output (one input), or
  its K rows over the joint input (several): M * K backward passes in all.

  Args:
    ys: a `Tensor` `(N, m...)` with static dimensions after the batch;
      `(N,)` or `(N, 1)` for a single output.
    xs: a `Tensor` `(N, d...)` of rank >= 2 with static feature dimensions,
      or a list of them.
    name: `str`, optional; default "batch_output_hessians".
    method: as in `tf1hess.batch_hessians`; default `"auto"`.
    chunk_size: as in `tf1hess.batch_hessians`.
    plan: as in `tf1hess.batch_hessians`.

  Returns:
    For a tensor `xs`, a `Tensor` `(N, m..., d..., d...)`; for a list of L
    inputs, a list of L lists of L `Tensor`s `(N, m..., d_a..., d_b...)`.

  Raises:
    As `batch_jacobians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 1])
    ...   t = tf.compat.v1.placeholder(tf.float32, [None, 1])
    ...   u = tf.concat([x * x * t, x + t ** 3], axis=1)  # 2 outputs
    ...   h = tf1hess.batch_output_hessians(u, [x, t])
    ...   with tf.compat.v1.Session() as sess:
    ...     u_xt = sess.run(h[0][1], {x: [[3.]], t: [[2.]]})
    >>> u_xt.reshape(2)  # d2(x^2 t)/dxdt = 2x, d2(x + t^3)/dxdt = 0
    array([6., 0.], dtype=float32)
  """
  plan = plan_lib.make(plan, method, chunk_size)
  with tf.name_scope(name or "batch_output_hessians"):
    p = Problem(ys, xs, "batch_output_hessians", plan)
    with p.build_context():
      k = sum(p.x_cols)
      rows = tf.stack(
        [_output_hessian(p, m) for m in range(p.num_outputs)],
        axis=1,
      )  # (N, M, K, K)
      if not p.was_sequence:
        return p.reshape(rows, p.out_dims, p.x_dims[0], p.x_dims[0])
      rows = tf.reshape(rows, p.shape([p.num_outputs, k, k]))
      blocks = []
      for a, row_block in enumerate(_split(rows, p.x_cols, axis=2)):
        blocks.append([])
        for b, block in enumerate(_split(row_block, p.x_cols, axis=3)):
          blocks[-1].append(
            p.reshape(block, p.out_dims, p.x_dims[a], p.x_dims[b])
          )
      return blocks


def batch_output_hessian_diagonals(
  ys, xs, name=None, method="auto", chunk_size=None, plan=None
):
  """Diagonals of the per-sample Hessians of every output of `ys`.

  `D[n, o, i] = d^2 ys[n, o] / d x[n, i]^2`: for each output, the op
  `tf1hess.batch_hessian_diagonals` of that output. The diagonal of the
  joint Hessian over several inputs is that of the per-input blocks.

  Args:
    ys: as in `batch_output_hessians`.
    xs: as in `batch_output_hessians`.
    name: `str`, optional; default "batch_output_hessian_diagonals".
    method: as in `tf1hess.batch_hessians`; default `"auto"`.
    chunk_size: as in `tf1hess.batch_hessians`.
    plan: as in `tf1hess.batch_hessians`.

  Returns:
    A `Tensor` `(N, m..., d...)` per `x`, in the structure of `xs`.

  Raises:
    As `batch_jacobians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   y = tf.stack([tf.reduce_sum(x ** 3, 1), x[:, 0] ** 2], axis=1)
    ...   d = tf1hess.batch_output_hessian_diagonals(y, x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(d, {x: [[1., 2.]]}))
    [[[ 6. 12.]
      [ 2.  0.]]]
  """
  plan = plan_lib.make(plan, method, chunk_size)
  with tf.name_scope(name or "batch_output_hessian_diagonals"):
    p = Problem(ys, xs, "batch_output_hessian_diagonals", plan, joined=False)
    with p.build_context():
      per_output = [
        ops.batch_hessian_diagonals(p.output(m), p.xs, plan=plan)
        for m in range(p.num_outputs)
      ]
      results = []
      for a in range(len(p.xs)):
        stacked = tf.stack(
          [_flat(d[a], p.n, p.x_cols[a]) for d in per_output], 1
        )
        results.append(p.reshape(stacked, p.out_dims, p.x_dims[a]))
      return _checks.restore_structure(results, p.was_sequence)


def batch_output_laplacians(
  ys, xs, name=None, method="auto", chunk_size=None, plan=None
):
  """Per-sample Laplacians of every output of `ys` over all of `xs`.

  `L[n, o] = sum_i d^2 ys[n, o] / d z[n, i]^2` where `z` is the joint input
  (every feature of every `x`): the trace of the per-output Hessian. For a
  list `xs` the result is one tensor, the Laplacian over all of them (pass
  only the spatial inputs for a spatial Laplacian). `ys` of shape `(N, 1)`
  gives `(N, 1)`, ready for a PDE residual with a source term `(N, 1)`.

  Args:
    ys: as in `batch_output_hessians`.
    xs: as in `batch_output_hessians`.
    name: `str`, optional; default "batch_output_laplacians".
    method: as in `tf1hess.batch_hessians`; default `"auto"`.
    chunk_size: as in `tf1hess.batch_hessians`.
    plan: as in `tf1hess.batch_hessians`.

  Returns:
    A `Tensor` of the shape of `ys`, `(N, m...)`.

  Raises:
    As `batch_jacobians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   u = tf.reduce_sum(x ** 3, axis=1, keepdims=True)
    ...   lap = tf1hess.batch_output_laplacians(u, x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(lap, {x: [[1., 2.]]}))
    [[18.]]
  """
  plan = plan_lib.make(plan, method, chunk_size)
  with tf.name_scope(name or "batch_output_laplacians"):
    p = Problem(ys, xs, "batch_output_laplacians", plan)
    with p.build_context():
      diagonals = batch_output_hessian_diagonals(p.y, p.xs, plan=plan)
      num_out = len(p.out_dims)
      terms = [
        tf.reduce_sum(d, axis=list(range(1 + num_out, d.shape.rank)))
        for d in diagonals
      ]
      out = tf.add_n(terms) if len(terms) > 1 else terms[0]
      out.set_shape(p.static_shape(p.out_dims))
      return out
