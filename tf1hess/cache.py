"""A derivative cache per `(ys, xs)`: each quantity built once, on first use.

A PDE residual asks for several derivatives of the same output (`u_x`,
`u_xx`, `u_yy`, the Laplacian, ...); calling an op for each builds a new
subgraph for each. A `Derivatives` object builds each one the first time it
is asked for and serves it, or a slice of a wider one already built (an
entry of a full Hessian, a trace of its diagonal), from then on.
"""

import numbers

import numpy as np
import tensorflow as tf

from tf1hess import _core
from tf1hess import _rows
from tf1hess import ops
from tf1hess import per_output
from tf1hess import plan as plan_lib


# Up to this many joint features, `method=None` builds the full Hessian and
# the diagonal of an output whose entries have built rows, and the full
# Hessian over several inputs, from the cache's own rows: one backward pass
# per row, as `dde.grad` does, shared with the entries. A full Hessian over
# one input asked before any entry comes from `tf1hess.batch_hessians`: on
# DeepXDE's FNN([d] + [64] * 3 + [1], "tanh") at N = 4096
# (`scripts/pinn_benchmark.py`, 2 CPU cores) it was as fast as the own rows
# at d = 2 and 1.5x to 2x faster at d = 5, 10 and 20.
ROWS_MAX_FEATURES = 64


def check_index(value, arg, size, what, allow_none=False):
  """Returns `value` if it indexes `size` items, else raises.

  Args:
    value: the index given.
    arg: the argument's name, for the message.
    size: `int`, the number of items.
    what: `str`, what is indexed (e.g. "outputs of `ys`").
    allow_none: `bool`, whether `None` is accepted (and returned).

  Returns:
    `value`.

  Raises:
    TypeError: when `value` is not an `int` (nor `None` where allowed).
    ValueError: when `value` is out of range.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, numbers.Integral
  ):
    raise TypeError(
      f"`{arg}` must be an int{' or None' if allow_none else ''} indexing the "
      f"{size} {what}; saw {value!r}."
    )
  value = int(value)  # A numpy integer too (a loop over np.arange(d)).
  if not 0 <= value < size:
    raise ValueError(
      f"`{arg}` must be in [0, {size}) for the {size} {what}; saw {value}."
    )
  return value


class Derivatives:
  """Per-sample derivatives of one `(ys, xs)` pair, each built once.

  `ys` is a `Tensor` `(N, M)` (or `(N,)`, or `(N, m...)` flattened to M
  outputs) and `xs` a `Tensor` `(N, K)` or a list of inputs whose flattened
  features, concatenated in the order of `xs`, make the K joint features
  (`xs=[x, t]` with two `(None, 1)` placeholders: feature 0 is `x`, feature
  1 is `t`, and `hessian(0, 1)` is `u_xt`). Every quantity is built in the
  graph of `ys` the first time it is asked for:

  * `gradient(component)`: `(N, K)`, one backward pass;
  * `hessian(i, j, component)`: an entry `(N, 1)` from the row `j` of the
    Hessian (one backward pass more, as `dde.grad.hessian`), or from a full
    Hessian or diagonal already built; `hessian(component=c)` is the full
    `(N, K, K)`, cross blocks between the inputs included;
  * `diagonal(component)`: `(N, K)`, or the diagonal of a full Hessian
    already built;
  * `laplacian(component)`: `(N, 1)` (or `(N,)` with `keepdims=False`), the
    trace of the diagonal.

  With `method=None` (the default) and at most `ROWS_MAX_FEATURES` joint
  features, the full Hessian and the diagonal of an output are the cache's
  own rows (one backward pass each) once an entry of that output has built
  a row, so that they share the rows. A full Hessian, a diagonal or a
  Laplacian asked before any entry comes from `tf1hess.batch_hessians` or
  `tf1hess.batch_hessian_diagonals` (`method="auto"`: the forward engine
  where it applies, without K backward passes), the faster for PINN-sized
  networks (see `ROWS_MAX_FEATURES`); over several inputs, the full
  Hessian is that op over a copy of the model that reads the joint input
  as one tensor (`per_output.Problem.hessian`), or the cache's rows where
  the model cannot be copied. Beyond `ROWS_MAX_FEATURES`, and with a
  `method` given, they are those ops.

  A full Hessian built first serves every entry, diagonal and Laplacian
  after it for free. By default, entries built first build rows that a
  full Hessian, diagonal or Laplacian after them reuse; with a `method`,
  ask for the widest quantity first. A diagonal built first does not make
  the full Hessian any cheaper.

  `component` picks the output and may be left out when `ys` has one.

  Args:
    ys: a floating `Tensor` of per-sample outputs, static dimensions after
      the batch.
    xs: a floating `Tensor` of rank >= 2 with static feature dimensions, or
      a list of them.
    method: `None` (default; see above), or a method of
      `tf1hess.batch_hessians` for the full Hessians and diagonals.
    chunk_size: as in `tf1hess.batch_hessians`.
    name: `str`, the name scope of the ops built; default "derivatives".
    plan: a `tf1hess.Plan` in place of `method` and `chunk_size` (as in
      `tf1hess.batch_hessians`); given, it is used as a `method`.

  Raises:
    RuntimeError: when executing eagerly (the cache lives in a graph; see
      `tf1hess.eager` for functions of eager tensors).
    ValueError, TypeError: as `tf1hess.batch_output_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   u = tf.reduce_sum(x ** 3, axis=1, keepdims=True)  # (N, 1)
    ...   d = tf1hess.Derivatives(u, x)
    ...   residual = -d.laplacian() - 1.0  # (N, 1), no broadcasting surprise
    ...   same = d.laplacian() is d.laplacian()  # built once
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run([residual, d.hessian(1, 1)], {x: [[1., 2.]]}))
    [array([[-19.]], dtype=float32), array([[12.]], dtype=float32)]
    >>> same
    True
  """

  def __init__(
    self, ys, xs, method=None, chunk_size=None, name=None, plan=None
  ):
    if tf.executing_eagerly():
      raise RuntimeError(
        "`Derivatives` caches graph ops and needs graph mode (a "
        "tf.Graph().as_default() block, tf.compat.v1.disable_eager_execution()"
        " or a tf.function); for eager tensors use tf1hess.eager."
        "batch_output_hessians(fn, x) and its siblings."
      )
    self._plan = plan_lib.make(
      plan, "auto" if method is None else method, chunk_size
    )
    self._problem = per_output.Problem(ys, xs, "Derivatives", self._plan)
    self._choose_rows = method is None and plan is None
    self._graph = self._problem.y.graph
    with self._graph.as_default():
      with tf.compat.v1.name_scope(name or "derivatives") as scope:
        self._scope = scope
    self._built = {}

  @property
  def ys(self):
    """The `Tensor` of outputs."""
    return self._problem.y

  @property
  def xs(self):
    """The list of inputs."""
    return list(self._problem.xs)

  @property
  def num_outputs(self):
    """`int` M, the outputs per sample."""
    return self._problem.num_outputs

  @property
  def num_features(self):
    """`int` K, the joint features per sample."""
    return sum(self._problem.x_cols)

  def _get(self, key, build):
    if key not in self._built:
      with self._graph.as_default(), self._problem.build_context():
        with tf.compat.v1.name_scope(self._scope):
          self._built[key] = build()
    return self._built[key]

  def _component(self, component):
    m = self.num_outputs
    if component is None:
      if m != 1:
        raise ValueError(
          f"`component` must be given: `ys` has {m} outputs per sample; saw "
          "None."
        )
      return 0
    return check_index(component, "component", m, "outputs of `ys`")

  def _feature(self, value, arg, allow_none=True):
    return check_index(
      value, arg, self.num_features, "features of `xs`", allow_none
    )

  def _joint(self, tensors):
    """Flattens per-input `(N, d_a...)` tensors into one `(N, K)`."""
    p = self._problem
    flat = [_core.flatten_samples(t, p.n, k) for t, k in zip(tensors, p.x_cols)]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)

  def gradient(self, component=None):
    """The gradient of output `component`, `(N, K)`.

    Args:
      component: `int` in `[0, M)`; may be `None` when M is 1.

    Returns:
      A `Tensor` `(N, K)` over the joint features.

    Raises:
      TypeError: when `component` is not an int.
      ValueError: when it is out of range, or `None` with several outputs.
    """
    c = self._component(component)
    return self._get(("gradient", c), lambda: self._problem.gradient(c))

  def jacobian(self, i=None, j=None):
    """Entry, row, column or all of the per-sample Jacobian `J[i, j]`.

    `J[n, i, j] = d ys[n, i] / d z[n, j]` over the joint features `z`.

    Args:
      i: `int` output index, or `None` for all outputs.
      j: `int` feature index, or `None` for all features.

    Returns:
      `(N, 1)` for an entry, `(N, K)` for `j=None` (the gradient of output
      `i`), `(N, M)` for `i=None`, `(N, M, K)` for both `None`.

    Raises:
      TypeError: when `i` or `j` is neither an int nor `None`.
      ValueError: when `i` or `j` is out of range.
    """
    if i is not None:
      i = check_index(i, "i", self.num_outputs, "outputs of `ys`")
    j = self._feature(j, "j")
    if i is not None and j is None:
      return self.gradient(i)
    if i is not None:
      return self._get(
        ("jacobian", i, j), lambda: self.gradient(i)[:, j : j + 1]
      )
    grads = [self.gradient(m) for m in range(self.num_outputs)]
    if j is not None:
      return self._get(
        ("jacobian", None, j), lambda: tf.stack([g[:, j] for g in grads], 1)
      )
    return self._get(("jacobian", None, None), lambda: tf.stack(grads, 1))

  def _hessian(self, c):
    if ("hessian", c) in self._built:
      return self._built["hessian", c]
    return None

  def _row(self, c, i):
    """Row `i` of the Hessian of output `c`, `(N, K)`: one backward pass,
    or of the full Hessian where TensorFlow's rows would miss curvature of
    one input (`tf.nn.moments`: the forward engine's is exact)."""
    full = self._hessian(c)
    if full is None and self._rows_miss_moments() and self._one_walk():
      full = self.hessian(component=c)
    if full is not None:
      return full[:, i]
    p = self._problem
    if _core.statically_empty(p.xs[0]):
      return self._get(
        ("row", c, i), lambda: tf.zeros([0, self.num_features], p.xs[0].dtype)
      )
    self._rows_miss_moments(warn=True)
    p.check_loops(2)
    g = self.gradient(c)
    vjp = per_output.joint_vjp(p.xs, p.n, p.x_cols)
    row = _rows.one_hot_row(vjp, g, self.num_features, False, False)
    return self._get(("row", c, i), lambda: row(i))

  def _stacked_rows(self, c, diagonal):
    """All rows of output `c`'s Hessian (or their diagonal entries), each
    the cached row: the rows of the row loop, unrolled."""
    g = self.gradient(c)
    k = self.num_features

    def row(j):
      r = self._row(c, j)
      return _rows.column(r, j, vectorized=False) if diagonal else r

    width = None if diagonal else k
    return _rows.stack(row, k, width, g.dtype, "unrolled", self._plan, g)

  def hessian(self, i=None, j=None, component=None):
    """Entry, row or all of the per-sample Hessian of output `component`.

    `H[n, i, j] = d^2 ys[n, component] / d z[n, i] d z[n, j]` over the joint
    features `z` (cross terms between the inputs of `xs` included).

    Args:
      i: `int` feature index, or `None`.
      j: `int` feature index, or `None`.
      component: `int` output index; may be `None` when M is 1.

    Returns:
      `(N, 1)` for an entry; `(N, K)` for a row (`j=None`) or a column
      (`i=None`); `(N, K, K)` for both `None` (see the class docstring for
      how it is built).

    Raises:
      TypeError: when an index is neither an int nor `None`.
      ValueError: when an index is out of range, or `component` is `None`
        with several outputs.
    """
    c = self._component(component)
    i = self._feature(i, "i")
    j = self._feature(j, "j")
    if i is None and j is None:
      return self._get(("hessian", c), lambda: self._full_hessian(c))
    if i is None or j is None:
      return self._row(c, j if i is None else i)
    full = self._hessian(c)
    if full is None and i == j and ("diagonal", c) in self._built:
      return self._get(
        ("entry", c, i, j), lambda: self._built["diagonal", c][:, i : i + 1]
      )
    # Column i of row j, as `dde.grad.hessian` takes it.
    return self._get(("entry", c, i, j), lambda: self._row(c, j)[:, i : i + 1])

  def _has_rows(self, c):
    """Whether a row of output `c`'s Hessian is built (an entry was asked)."""
    return any(key[:2] == ("row", c) for key in self._built)

  def _rows_miss_moments(self, warn=False):
    """Whether TensorFlow's rows miss curvature through `tf.nn.moments`
    (`per_output.Problem.rows_miss_moments`)."""
    with self._graph.as_default():
      return self._problem.rows_miss_moments(warn)

  def _own_rows(self):
    """Whether full Hessians and diagonals come from the cache's rows."""
    return (
      self._choose_rows
      and self.num_features <= ROWS_MAX_FEATURES
      and not self._rows_miss_moments()
    )

  def _full_hessian(self, c):
    p = self._problem
    k = self.num_features
    if self._own_rows() and (self._has_rows(c) or not self._one_walk()):
      return self._stacked_rows(c, diagonal=False)
    return p.reshape(p.hessian(c), [k, k])

  def _one_walk(self):
    """Whether the full Hessians come from the engine's op over one tensor
    (`per_output.Problem.hessian`): one input, or a copy of the model that
    reads the joint input."""
    return len(self.xs) == 1 or self._problem.joint is not None

  def diagonal(self, component=None):
    """The diagonal of the Hessian of output `component`, `(N, K)`.

    Args:
      component: `int` output index; may be `None` when M is 1.

    Returns:
      A `Tensor` `(N, K)`: the diagonal of the full Hessian when that is
      already built, else from the cache's rows or
      `tf1hess.batch_hessian_diagonals` (see the class docstring).

    Raises:
      As `gradient`.
    """
    c = self._component(component)
    full = self._hessian(c)
    if full is not None:
      return self._get(("diagonal", c), lambda: tf.linalg.diag_part(full))
    if self._own_rows() and self._has_rows(c):
      return self._get(
        ("diagonal", c), lambda: self._stacked_rows(c, diagonal=True)
      )
    p = self._problem
    return self._get(
      ("diagonal", c),
      lambda: self._joint(
        ops.batch_hessian_diagonals(p.output(c), p.xs, plan=self._plan)
      ),
    )

  def laplacian(self, component=None, keepdims=True):
    """The Laplacian (Hessian trace) of output `component`.

    Args:
      component: `int` output index; may be `None` when M is 1.
      keepdims: `bool`, default `True`: shape `(N, 1)`, which subtracts from
        a source term `(N, 1)` elementwise; `False` gives `(N,)`.

    Returns:
      A `Tensor` `(N, 1)` (or `(N,)`), the sum of `diagonal(component)`.

    Raises:
      As `gradient`.
    """
    c = self._component(component)
    lap = self._get(
      ("laplacian", c),
      lambda: tf.reduce_sum(self.diagonal(c), axis=1, keepdims=True),
    )
    if keepdims:
      return lap
    return self._get(("laplacian_flat", c), lambda: lap[:, 0])
