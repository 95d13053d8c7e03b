"""A drop-in for DeepXDE's `dde.grad`, backed by `tf1hess.Derivatives`.

DeepXDE (`tensorflow.compat.v1` or `tensorflow` backend) computes the
derivatives of a PDE residual with `dde.grad.jacobian(ys, xs, i=, j=)` and
`dde.grad.hessian(ys, xs, component=, i=, j=)`. The functions here take the
same arguments and return the same `(N, 1)` tensors, with one
`tf1hess.Derivatives` per `(ys, xs)` pair:

    import tf1hess.dde as grad   # instead of dde.grad

    def pde(x, y):
      return -grad.hessian(y, x, i=0, j=0) - grad.hessian(y, x, i=1, j=1) - 1

Entries are built as DeepXDE builds them (one gradient per output, one more
backward pass per Hessian row asked for); `laplacian(ys, xs)` and
`hessian(ys, xs, i=None, j=None)` build the whole trace or Hessian at once
with `tf1hess.batch_hessian_diagonals` and `tf1hess.batch_hessians`. This
module does not import DeepXDE.
"""

import weakref

import tensorflow as tf

from tf1hess import cache

# The cache of a graph is an attribute of the graph, and goes with it: a
# sweep that builds one graph per model keeps none of the old ones alive.
# Tensors outside any graph (executing eagerly) are cached here.
_ATTRIBUTE = "_tf1hess_dde_derivatives"
_GRAPHS = weakref.WeakSet()
_EAGER = {}


def _cache_of(t):
  graph = getattr(t, "graph", None)  # An eager tensor has none.
  if graph is None:
    return _EAGER
  if not hasattr(graph, _ATTRIBUTE):
    setattr(graph, _ATTRIBUTE, {})
    _GRAPHS.add(graph)
  return getattr(graph, _ATTRIBUTE)


def _derivatives(ys, xs):
  for arg, value in (("ys", ys), ("xs", xs)):
    if not isinstance(value, (tf.Tensor, tf.Variable)):
      raise TypeError(
        f"`{arg}` must be a tf.Tensor of shape (batch_size, dim_{arg[0]}); saw "
        f"{type(value).__name__}."
      )
    if value.shape.rank != 2:
      raise ValueError(
        f"`{arg}` must have shape (batch_size, dim_{arg[0]}); saw shape "
        f"{value.shape}."
      )
  derivatives = _cache_of(ys)
  key = (ys.ref(), xs.ref())
  if key not in derivatives:
    d = cache.Derivatives(ys, xs)
    _check_connected(d.ys, d.xs[0], xs)
    derivatives[key] = d
  return derivatives[key]


def _check_connected(ys, x, given):
  """Raises `ValueError` where `ys` does not depend on `x` at all (no path
  that `tf.gradients` differentiates): there `dde.grad` gets `None` and
  DeepXDE fails, where zeros would let a model train on a wrong residual."""
  with ys.graph.as_default():
    if tf.gradients(ys, x)[0] is not None:
      return
  raise ValueError(
    f"`ys` ({ys.name}) does not depend on `xs` ({given.name}): no path in "
    "the graph leads from `xs` to `ys`, so every derivative would be zero "
    "(dde.grad's are None, and DeepXDE fails). A slice of the network's "
    "input such as `x[:, 1:2]` is a new tensor, not an input of the "
    "network: differentiate with respect to the input `x` and pick the "
    "feature with `j` (`jacobian(y, x, j=1)`)."
  )


def jacobian(ys, xs, i=None, j=None):
  """`J[i, j] = d ys[:, i] / d xs[:, j]`, as `dde.grad.jacobian`.

  Args:
    ys: a `Tensor` of shape `(batch_size, dim_y)`.
    xs: a `Tensor` of shape `(batch_size, dim_x)`.
    i: `int` or `None`: the output; `None` gives the column `J[:, j]`.
    j: `int` or `None`: the input feature; `None` gives the row `J[i, :]`,
      the gradient of output `i`. `i` and `j` may both be `None` only when
      `J` has one element.

  Returns:
    `(batch_size, 1)` for an entry (and for a row or column when `dim_x` or
    `dim_y` is 1, as DeepXDE returns), `(batch_size, dim_x)` for a row,
    `(batch_size, dim_y)` for a column.

  Raises:
    TypeError: when `ys`/`xs` are not tensors, or `i`/`j` not ints.
    ValueError: when `ys`/`xs` are not of rank 2, `ys` does not depend on
      `xs`, `i` or `j` is out of range, or both are `None` for a Jacobian
      with more than one element.

  Example:
    >>> import tensorflow as tf
    >>> import tf1hess.dde as grad
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   y = x[:, :1] ** 2 * x[:, 1:]
    ...   y_x = grad.jacobian(y, x, i=0, j=0)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(y_x, {x: [[3., 2.]]}))
    [[12.]]
  """
  d = _derivatives(ys, xs)
  dim_y, dim_x = d.num_outputs, d.num_features
  if i is None and j is None:
    if dim_x > 1 or dim_y > 1:
      raise ValueError(
        "`i` and `j` cannot both be None: the Jacobian has "
        f"dim_y * dim_x = {dim_y} * {dim_x} elements; pass `i` (the output) "
        "and/or `j` (the input feature)."
      )
    i = j = 0
  cache.check_index(i, "i", dim_y, "outputs of `ys`", allow_none=True)
  cache.check_index(j, "j", dim_x, "features of `xs`", allow_none=True)
  if i is None and dim_y == 1:
    i = 0
  if i is None:
    return d.jacobian(None, j)
  if j is None or dim_x == 1:
    return d.gradient(i)
  return d.jacobian(i, j)


def hessian(ys, xs, component=0, i=0, j=0):
  """`H[i, j] = d^2 ys[:, component] / d xs[:, i] d xs[:, j]`, as DeepXDE's.

  Unlike `dde.grad.hessian`, `i=None, j=None` gives the whole Hessian at once
  (`tf1hess.batch_hessians`), and `i=None` or `j=None` a row.

  Args:
    ys: a `Tensor` of shape `(batch_size, dim_y)`.
    xs: a `Tensor` of shape `(batch_size, dim_x)`.
    component: `int`, default 0: the output.
    i: `int` (default 0) or `None`: the row.
    j: `int` (default 0) or `None`: the column.

  Returns:
    `(batch_size, 1)` for an entry, `(batch_size, dim_x)` for a row,
    `(batch_size, dim_x, dim_x)` for `i=None, j=None`.

  Raises:
    TypeError: when `ys`/`xs` are not tensors, or an index is not an int.
    ValueError: when `ys`/`xs` are not of rank 2, `ys` does not depend on
      `xs`, or `component`, `i` or `j` is out of range.

  Example:
    >>> import tensorflow as tf
    >>> import tf1hess.dde as grad
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   y = x[:, :1] ** 2 * x[:, 1:]
    ...   y_xt = grad.hessian(y, x, i=0, j=1)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(y_xt, {x: [[3., 2.]]}))
    [[6.]]
  """
  return _derivatives(ys, xs).hessian(i, j, component=component)


def laplacian(ys, xs, component=0):
  """The Laplacian of `ys[:, component]` over all of `xs`, `(batch_size, 1)`.

  The sum of `hessian(ys, xs, component, i=k, j=k)` over `k`, built at once
  with `tf1hess.batch_hessian_diagonals` (or from a full Hessian already
  built for the same `(ys, xs)`).

  Args:
    ys: a `Tensor` of shape `(batch_size, dim_y)`.
    xs: a `Tensor` of shape `(batch_size, dim_x)`.
    component: `int`, default 0: the output.

  Returns:
    A `Tensor` `(batch_size, 1)`.

  Raises:
    As `hessian`.

  Example:
    >>> import tensorflow as tf
    >>> import tf1hess.dde as grad
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   lap = grad.laplacian(tf.reduce_sum(x ** 3, 1, keepdims=True), x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(lap, {x: [[1., 2.]]}))
    [[18.]]
  """
  return _derivatives(ys, xs).laplacian(component=component)


def clear():
  """Forgets the cached derivatives of every `(ys, xs)`, as `dde.grad.clear`."""
  for graph in list(_GRAPHS):
    delattr(graph, _ATTRIBUTE)
  _GRAPHS.clear()
  _EAGER.clear()
