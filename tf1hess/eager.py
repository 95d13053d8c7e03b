"""Per-sample derivatives of a function with `tf.GradientTape`.

The twin of `tf1hess.ops` for code that holds a function instead of a graph:
`tf1hess.eager.batch_hessians(fn, x)` gives the numbers of
`tf1hess.batch_hessians(fn(x), x)`. It runs eagerly, inside a `tf.function`
(also with a `None` batch in the `input_signature`), and while building a TF1
graph, and uses the same row loop as the graph ops.
"""

import functools
import inspect
import types
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.autograph.impl import api as autograph_api  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _checks
from tf1hess import _core
from tf1hess import _tf_errors
from tf1hess import ops
from tf1hess import plan as plan_lib
from tf1hess import per_output
from tf1hess.forward import dispatch as forward_dispatch


def _converting_fn(public):
  """`public(fn, ...)` with `fn` converted by AutoGraph where the code that
  calls it is (a `tf.function`'s), as `tf.map_fn` does: a Python `if` on a
  tensor in `fn` then builds a `tf.cond`, as where `fn` is called directly.
  The ops' own code is not converted (`do_not_convert`), and would call
  `fn` as it is. Functions and methods only: Keras models and
  `tf.function`s convert themselves."""

  @functools.wraps(public)
  def wrapped(fn, *args, **kwargs):
    context = ag_ctx.control_status_ctx()
    if context.status == ag_ctx.Status.ENABLED and (
      inspect.isfunction(fn) or inspect.ismethod(fn)
    ):
      fn = _with_autograph(autograph_api.tf_convert(fn, context), context)
    return public(fn, *args, **kwargs)

  return wrapped


def _with_autograph(converted, context):
  """`converted` called with AutoGraph on: a lambda of converted code is
  converted already, and converts what it calls where AutoGraph is on,
  which is not so in the ops' code."""

  def call(*args, **kwargs):
    with ag_ctx.ControlStatusCtx(ag_ctx.Status.ENABLED, context.options):
      return converted(*args, **kwargs)

  return call


def _as_input(fn, x):
  """Checks `fn`; converts `x` to a floating `Tensor` of rank >= 2 or raises."""
  if not callable(fn):
    raise TypeError(
      "`fn` must be a callable mapping a batch to per-sample outputs; saw "
      f"{type(fn).__name__}."
    )
  if isinstance(x, np.ndarray) and not _checks.is_floating_array(x.dtype):
    raise TypeError(
      "`x` must be a floating tensor (float16, bfloat16, float32 or "
      f"float64); saw dtype {x.dtype}."
    )
  if x is None:
    raise TypeError("`x` must be a floating tensor `(N, d...)`; saw None.")
  if isinstance(x, (list, tuple)) and any(
    isinstance(a, (tf.Tensor, tf.Variable, np.ndarray)) for a in x
  ):
    # `tf.convert_to_tensor` would stack them: a batch of the inputs.
    raise TypeError(
      "`x` must be one tensor `(N, d...)`; saw a "
      f"{type(x).__name__} of {len(x)} tensors. Concatenate the inputs "
      "(`tf.concat([x, t], axis=1)`) and split them in `fn`, or call the "
      "graph ops in a tf.function, whose `xs` may be a list."
    )
  if isinstance(x, (tf.RaggedTensor, tf.SparseTensor, tf.IndexedSlices)):
    raise TypeError(
      "`x` must be a dense floating tensor `(N, d...)`; saw a "
      f"{type(x).__name__}. Make it dense first (`x.to_tensor()`, "
      "`tf.sparse.to_dense(x)`), with the features of every sample."
    )
  if not isinstance(x, (tf.Tensor, tf.Variable)):
    x = tf.convert_to_tensor(x)
  _checks.check_float(x, "x")
  _checks.check_batched(x, "x")
  if not tf.executing_eagerly() and (
    isinstance(x, tf.Variable) or not hasattr(x, "graph")
  ):
    # A variable, or an eager tensor captured by a `tf.function`: `fn` and
    # the derivatives are built on a tensor of the graph being built.
    x = tf.identity(x)
  return x


class _Tapes:
  """Nested persistent tapes, one per derivative level, all watching `x`.

  Level 1 is the innermost tape. `gradient_fn(level)` stops the tape of that
  level (the outer ones keep recording, so that the next level can
  differentiate this one) and returns its vector-Jacobian product.
  """

  def __init__(self, x, order):
    self._x = x
    self._tapes = [tf.GradientTape(persistent=True) for _ in range(order)]
    self._stopped = {}

  def __enter__(self):
    for tape in self._tapes:
      tape.__enter__()
      tape.watch(self._x)
    return self

  def __exit__(self, *exc):
    while self._tapes:
      self._tapes.pop().__exit__(*exc)

  def tape(self, level):
    """Stops (once) and returns the tape that differentiates level `level`."""
    if level not in self._stopped:
      tape = self._tapes.pop()
      tape.__exit__(None, None, None)
      self._stopped[level] = tape
    return self._stopped[level]

  def gradient_fn(self, level, unconnected):
    tape = self.tape(level)

    def gradient(target, cotangent, source=None):
      return _core.dense(
        tape.gradient(
          target,
          self._x if source is None else source,
          output_gradients=cotangent,
          unconnected_gradients=unconnected,
        )
      )

    return gradient


# Graph-building code: AutoGraph (a tf.function around a caller) must not
# rewrite it.
@tf.autograph.experimental.do_not_convert
def _derivatives(
  fn,
  x,
  order,
  unconnected_gradients="zero",
  plan=None,
  diagonal=False,
  check_independence=False,
  laplacian=False,
):
  """Shared body of the public functions: per-sample derivatives of `order`."""
  unconnected = _checks.check_unconnected(unconnected_gradients)
  plan = plan or plan_lib.Plan()
  x = _as_input(fn, x)
  _checks.check_output_fits(x, 1 if diagonal or laplacian else order)
  # The forward engine walks a graph: always for `"forward"`; for `"auto"`
  # and the Laplacian where a graph is being built (a `tf.function`), whose
  # cost model then picks the engine or the rows. Executing eagerly, the
  # others keep the tapes (a walk would trace `fn` again at every call), but
  # where they would be wrong (`_tapes_fail`).
  walk = plan.method == "forward"
  if (plan.method == "auto" or laplacian) and not tf.executing_eagerly():
    walk = True

  def walked():
    return _graph_walk(
      fn,
      x,
      unconnected_gradients,
      plan,
      diagonal=diagonal,
      laplacian=laplacian,
      check_independence=check_independence,
    )

  # Known before `fn` runs where it could be traced: a function whose tapes
  # fail is not also run under them, which would repeat its side effects
  # (the updates of a batch normalization's moving statistics).
  fail = order == 2 and not walk and _tapes_fail(fn, x, False)
  if order == 2 and (walk or (fail and plan.method == "auto")):
    return walked()
  if order >= 3 and _core.control_flow_v1():
    # The levels below the last are differentiated again, and they hold v1
    # control flow (the row loop, a tf.cond on an empty batch) that a tape
    # cannot differentiate; tf.gradients can.
    return ops.batch_derivatives(
      fn(x),
      x,
      order,
      unconnected_gradients=unconnected_gradients,
      plan=plan,
    )
  try:
    with _Tapes(x, order) as tapes:
      ys = _outputs(fn, x)
      if fail is None:
        fail = _tapes_fail(fn, x, True)
      if not fail or plan.method != "auto":
        grad = _core.dense(
          tapes.tape(1).gradient(ys, x, unconnected_gradients=unconnected)
        )
        if grad is None or order == 1:
          return grad
        if order == 2 and not tf.executing_eagerly():  # In a tf.function.
          ys_list = _checks.as_list(ys)[0]
          fail = forward_dispatch.tensorflow_fails(ys_list, x, grad)
        if fail:
          _core.warn_once(
            _owner(fn) if tf.executing_eagerly() else x.graph,
            "tf1hess: TensorFlow's second derivatives of the function are"
            " wrong or missing here (a max pool that keeps its input's shape,"
            " a bilinear resize, a Euclidean norm, tf.nn.moments, ...), and"
            f" method={plan.method!r} takes them; method='auto' takes the"
            " forward engine, exact there.",
          )
        result = _core.per_sample_derivatives(
          x,
          grad,
          lambda level: tapes.gradient_fn(level, unconnected),
          order,
          plan,
          diagonal=diagonal or laplacian,
          check_independence=check_independence,
        )
        if laplacian and result is not None:
          result = tf.reduce_sum(result, axis=list(range(1, x.shape.rank)))
        return result
    # The tapes' second derivatives would be wrong or fail (the curvature
    # through the mean of tf.nn.moments, a bilinear resize, ...); the
    # engine's are exact. Built after the tapes stop: a function called
    # while they record is differentiated, through ops that TensorFlow may
    # have no gradient of.
    return walked()
  except (LookupError, TypeError) as e:
    # TensorFlow has no gradient of an op of the first derivative (the
    # gradient of `tf.nn.softsign` has none), or one that cannot take the
    # gradient of a segment sum's gradient (`IndexedSlices`): the forward
    # engine needs neither.
    if isinstance(e, TypeError) and not _tf_errors.is_sparse_gradient_error(e):
      raise
    if order != 2 or plan.method != "auto":
      raise
    _core.warn_once(
      None, f"tf1hess: the rows cannot be built ({e}); taking the engine."
    )
    return walked()


def _owner(fn):
  """What a warning about `fn` executed eagerly is given once for: a model
  (any callable object) itself; a Python function by its code, so that a
  lambda made again at each step of a training loop warns once."""
  if isinstance(fn, types.FunctionType):
    return fn.__code__
  return fn


def _outputs(fn, x):
  """`fn(x)`, checked: floating tensors of TensorFlow's ops, which the tapes
  record (a numpy array is no function of `x` to them)."""
  ys = fn(x)
  for y in _checks.as_list(ys)[0]:
    if not isinstance(y, (tf.Tensor, tf.Variable)):
      raise TypeError(
        "`fn` must return tf.Tensors computed from `x` by TensorFlow ops, "
        f"which the gradient tapes record; saw {type(y).__name__}."
      )
    _checks.check_float(y, "fn(x)")
  return ys


# Per function (weakly held): its input signatures and whether TensorFlow's
# second derivatives of it fail (`_tapes_fail`), or that it could not be
# traced: before it had run (`_NOT_YET`), or at all (`_UNTRACEABLE`).
_TRACED = weakref.WeakKeyDictionary()
_NOT_YET = "not yet"
_UNTRACEABLE = "untraceable"


def _tapes_fail(fn, x, ran):
  """Whether TensorFlow's second derivatives of `fn` at inputs like `x` are
  wrong or cannot be built (`dispatch.tensorflow_fails`: the curvature
  through the mean that `tf.nn.moments` stops, a bilinear resize, a
  Euclidean norm, the gradient of `tf.nn.softsign`, ...), executing
  eagerly: from a trace of `fn` and its gradient, once per function and
  signature. The signature has a batch of `None`, or, where `fn` cannot
  be traced so (it reads the static batch size, or is a `tf.function` of
  a fixed signature), the shape of `x`.

  Returns `False` where a graph is being built or `fn` cannot be traced,
  and `None` where it could not be traced before it `ran` once (a model
  whose first call makes its variables): then ask again after a run.
  """
  if not tf.executing_eagerly():
    return False
  try:
    seen = _TRACED.setdefault(fn, {})
  except TypeError:  # Not weakly referenceable: traced every call.
    seen = {}
  for spec in (
    tf.TensorSpec([None, *x.shape[1:]], x.dtype),
    tf.TensorSpec(x.shape, x.dtype),
  ):
    known = seen.get(spec)
    if known is None or (ran and known is _NOT_YET):
      known = seen[spec] = _trace_fails(fn, spec, ran)
    if isinstance(known, bool):
      return known
  return False if ran else None


def _trace_fails(fn, spec, ran):
  """`_tapes_fail` of a trace of `fn` at `spec`: a `bool`, or `_NOT_YET`
  or `_UNTRACEABLE` where it cannot be traced."""
  found = []

  def trace(inputs):
    ys, _ = _checks.as_list(fn(inputs))
    # The ops of the functions it calls (a `tf.function` model) and loops
    # it runs, which the tapes differentiate as well.
    ys = forward_dispatch.without_loops(ys, inputs, plan_lib.Plan())
    (grad,) = tf.gradients(ys, inputs)
    found.append(
      grad is not None and forward_dispatch.tensorflow_fails(ys, inputs, grad)
    )
    return ys

  try:
    tf.function(trace, autograph=False).get_concrete_function(spec)
  except Exception:  # pylint: disable=broad-except
    return _UNTRACEABLE if ran else _NOT_YET
  return found[-1]


@tf.autograph.experimental.do_not_convert
def _graph_walk(fn, x, unconnected_gradients, plan, **kwargs):
  """Second derivatives by the graph ops: the forward engine walks a graph.

  While a graph is being built (a `tf.function`, a TF1 graph) `fn(x)` is
  built into it; executing eagerly, inside a one-off `tf.function`.
  """
  laplacian = kwargs.pop("laplacian")
  diagonal = kwargs.pop("diagonal")
  if laplacian:
    op = ops.batch_laplacians
    kwargs.pop("check_independence")
  elif diagonal:
    op = ops.batch_hessian_diagonals
    kwargs.pop("check_independence")
  else:
    op = ops.batch_hessians

  def build(x):
    return op(
      fn(x),
      x,
      unconnected_gradients=unconnected_gradients,
      plan=plan,
      **kwargs,
    )

  if isinstance(x, tf.Variable):
    x = tf.convert_to_tensor(x)
  if not tf.executing_eagerly():
    return build(x)
  return _traced_call(build, x)


def _traced_call(fn, *args):
  """`fn(*args)` in a `tf.function` traced for the call, executing eagerly.

  Where the independence check fails in it, the error says so first:
  TensorFlow's starts with the traceback of the assert's node.
  """
  try:
    return tf.function(fn, autograph=False)(*args)
  except tf.errors.InvalidArgumentError as e:
    message = _tf_errors.assertion_message(e, _core.INDEPENDENCE_MESSAGE_START)
    if message is None:
      raise
    raise tf.errors.InvalidArgumentError(e.node_def, e.op, message) from e


@_converting_fn
def batch_hessians(
  fn,
  x,
  unconnected_gradients="zero",
  check_independence=False,
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample Hessians of `fn` at the batch `x`.

  Args:
    fn: callable mapping a batch `(N, d...)` to per-sample outputs (`(N,)`,
      `(N, 1)`, ...) or to their sum; a Keras model works.
    x: a floating `Tensor`, `tf.Variable` or numpy array of rank >= 2,
      batch first; inside a `tf.function` also a tensor of the eager
      context it captures, or a variable: the derivatives at their values.
    unconnected_gradients: 'zero' (default) or 'none', as in
      `tf1hess.batch_hessians`.
    check_independence: `bool`, default `False`: check that samples are
      independent (raises `tf.errors.InvalidArgumentError` otherwise).
    parallel_iterations: `int` or `None`, for the row loop.
    method: `str`, default `"auto"`; `"forward"`, `"pfor"` or
      `"while_loop"`, as in `tf1hess.batch_hessians`. `"forward"` builds the
      graph ops of the forward engine (in a `tf.function` when called
      eagerly); `"auto"` builds the graph ops inside a `tf.function` (their
      cost model picks the engine or the rows) and keeps the tape when
      executing eagerly.
    chunk_size: `int` or `None` (default: all rows at once): rows per
      vectorized backward pass, as in `tf1hess.batch_hessians`.
    plan: a `tf1hess.Plan` in place of `parallel_iterations`, `method` and
      `chunk_size`, as in `tf1hess.batch_hessians`.

  Returns:
    A `Tensor` of shape `(N, d..., d...)`, or `None` with
    `unconnected_gradients='none'` when the Hessian is not connected.

  Raises:
    TypeError: when `fn` is not callable or `x`/`fn(x)` is not floating.
    ValueError: when `x` has rank < 2, `unconnected_gradients` or `method`
      is unknown, or `chunk_size` is not a positive int.
    tf.errors.InvalidArgumentError: when `check_independence` fails.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> x = tf.constant([[1., 2.]])
    >>> tf1hess.eager.batch_hessians(lambda x: tf.reduce_sum(x ** 3, 1), x)
    <tf.Tensor: shape=(1, 2, 2), dtype=float32, numpy=
    array([[[ 6.,  0.],
            [ 0., 12.]]], dtype=float32)>
  """
  return _derivatives(
    fn,
    x,
    2,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
    check_independence=check_independence,
  )


@_converting_fn
def batch_hessian_diagonals(
  fn,
  x,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Diagonals of the per-sample Hessians of `fn` at `x`, shape of `x`.

  Args:
    fn: as in `batch_hessians`.
    x: as in `batch_hessians`.
    unconnected_gradients: as in `batch_hessians`.
    parallel_iterations: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` of the shape of `x`.

  Raises:
    As `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_hessian_diagonals(
    ...     lambda x: tf.reduce_sum(x ** 3), tf.constant([[1., 2.]])).numpy()
    array([[ 6., 12.]], dtype=float32)
  """
  return _derivatives(
    fn,
    x,
    2,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
    diagonal=True,
  )


@_converting_fn
def batch_laplacians(
  fn,
  x,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample Laplacians (Hessian traces) of `fn` at `x`, shape `(N,)`.

  The numbers of `tf1hess.batch_laplacians(fn(x), x)`: built by the graph
  ops (the forward engine where it can) inside a `tf.function`; executing
  eagerly, the sum of the tapes' diagonal (as `batch_hessian_diagonals`),
  but with `method="forward"` or where the tapes would be wrong, inside a
  `tf.function` traced at each call (wrap the caller in a `tf.function` to
  trace once).

  Args:
    fn: as in `batch_hessians`.
    x: as in `batch_hessians`.
    unconnected_gradients: as in `batch_hessians`.
    parallel_iterations: as in `batch_hessians`.
    method: as in `tf1hess.batch_laplacians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` of shape `(N,)`.

  Raises:
    ValueError: with `method='forward'`, when the forward engine cannot
      follow an op of `fn`, and as `batch_hessians`.
    TypeError: as `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_laplacians(
    ...     lambda x: tf.reduce_sum(x ** 3, 1), tf.constant([[1., 2.]])).numpy()
    array([18.], dtype=float32)
  """
  return _derivatives(
    fn,
    x,
    2,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
    laplacian=True,
  )


@_converting_fn
def batch_gradients(fn, x, unconnected_gradients="zero"):
  """Per-sample gradients of `fn` at `x`, shape of `x`.

  Args:
    fn: as in `batch_hessians`.
    x: as in `batch_hessians`.
    unconnected_gradients: as in `batch_hessians`.

  Returns:
    A `Tensor` of the shape of `x`.

  Raises:
    As `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_gradients(
    ...     lambda x: tf.reduce_sum(x * x), tf.constant([[1., 2.]])).numpy()
    array([[2., 4.]], dtype=float32)
  """
  return _derivatives(fn, x, 1, unconnected_gradients)


@_converting_fn
def batch_derivatives(
  fn,
  x,
  order,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample derivative tensors of `fn` of order `order`.

  While a control-flow-v1 graph is being built
  (`tf.compat.v1.disable_v2_behavior()`), orders >= 3 are taken with
  `tf.gradients` (`tf1hess.batch_derivatives(fn(x), x, order)`): a tape
  cannot differentiate the v1 row loop of the levels below the last.

  Args:
    fn: as in `batch_hessians`.
    x: as in `batch_hessians`.
    order: `int` >= 1.
    unconnected_gradients: as in `batch_hessians`.
    parallel_iterations: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `tf1hess.batch_derivatives`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` of shape `(N,) + (d...) * order`.

  Raises:
    ValueError: when `order` is not a positive int, when the output would
      exceed the machine's memory, and as `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> d = tf1hess.eager.batch_derivatives(
    ...     lambda x: tf.math.log(x + 2.), tf.constant([[1.]], tf.float64), 4)
    >>> float(d.numpy().ravel()[0])  # -6/81
    -0.07407407407407407
  """
  order = _checks.check_count(order, "order")
  return _derivatives(
    fn,
    x,
    order,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
  )


@tf.autograph.experimental.do_not_convert
def _per_output(op, fn, x, method, chunk_size, plan):
  """`op(fn(x), x)` of `tf1hess.per_output`, in the graph being built.

  Executing eagerly, the tapes (`_taped_per_output`) for every method but
  `"forward"`, where TensorFlow's second derivatives are right
  (`_tapes_fail`); else `op` in a `tf.function` traced for this call.
  """
  plan = plan_lib.make(plan, method, chunk_size)
  x = _as_input(fn, x)

  def build(v):
    return op(fn(v), v, plan=plan)

  if not tf.executing_eagerly():
    return build(x)
  order = 1 if op is per_output.batch_jacobians else 2
  if plan.method != "forward" and (order == 1 or not _tapes_fail(fn, x, False)):
    return _taped_per_output(op, fn, x, order)
  return _traced_call(build, x)


def _taped_per_output(op, fn, x, order):
  """Executing eagerly, `op(fn(x), x)` by persistent tapes: one gradient
  per output for the Jacobians `(N, m..., d...)`, and for `order` 2 one
  per output and feature for the Hessians `(N, m..., d..., d...)`, reduced
  to what `op` returns. (Not `tf.GradientTape.batch_jacobian`, which traces
  a `tf.function` at every call where it vectorizes.)"""
  zero = tf.UnconnectedGradients.ZERO
  n = tf.shape(x)[0]
  k = x.shape[1:].num_elements()
  with tf.GradientTape(persistent=True) as outer:
    outer.watch(x)
    with tf.GradientTape(persistent=True) as inner:
      inner.watch(x)
      y = _outputs(fn, x)
      if not isinstance(y, (tf.Tensor, tf.Variable)):
        raise TypeError(
          "`fn` must return one tensor of per-sample outputs; saw "
          f"{type(y).__name__}."
        )
      m = y.shape[1:].num_elements()
      outputs = tf.reshape(y, [n, m])
      columns = [outputs[:, i] for i in range(m)]
    # Each `(N, K)`: the samples are independent.
    rows = [
      tf.reshape(inner.gradient(c, x, unconnected_gradients=zero), [n, k])
      for c in columns
    ]
    jacobians = tf.stack(rows, axis=1)  # (N, M, K)
    entries = [r[:, j] for r in rows for j in range(k)] if order == 2 else []
  if order == 1:
    return tf.reshape(jacobians, tf.concat([tf.shape(y), tf.shape(x)[1:]], 0))
  hessians = tf.reshape(
    tf.stack(
      [
        tf.reshape(outer.gradient(e, x, unconnected_gradients=zero), [n, k])
        for e in entries
      ],
      axis=1,
    ),
    [n, m, k, k],
  )
  if op is per_output.batch_output_laplacians:
    return tf.reshape(tf.linalg.trace(hessians), tf.shape(y))
  if op is per_output.batch_output_hessian_diagonals:
    diagonals = tf.linalg.diag_part(hessians)
    return tf.reshape(diagonals, tf.concat([tf.shape(y), tf.shape(x)[1:]], 0))
  dims = tf.shape(x)[1:]
  return tf.reshape(hessians, tf.concat([tf.shape(y), dims, dims], 0))


@_converting_fn
def batch_jacobians(fn, x, method="auto", chunk_size=None, plan=None):
  """Per-sample Jacobians of every output of `fn` at `x`, not summed.

  Runs `tf1hess.batch_jacobians(fn(x), x)`; executing eagerly, a tape's
  gradient of each output (in a `tf.function` traced for the call for
  `method="forward"`).

  Args:
    fn: callable mapping a batch `(N, d...)` to per-sample outputs
      `(N, m...)` with static dimensions after the batch.
    x: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` `(N, m..., d...)`.

  Raises:
    As `batch_hessians`, and `ValueError` when `fn(x)` has dynamic
    dimensions after the batch.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_jacobians(
    ...     lambda x: tf.stack([x[:, 0] * x[:, 1], x[:, 1] ** 2], 1),
    ...     tf.constant([[2., 3.]])).numpy()
    array([[[3., 2.],
            [0., 6.]]], dtype=float32)
  """
  return _per_output(
    per_output.batch_jacobians, fn, x, method, chunk_size, plan
  )


@_converting_fn
def batch_output_hessians(fn, x, method="auto", chunk_size=None, plan=None):
  """Per-sample Hessians of every output of `fn` at `x`, not summed.

  Runs `tf1hess.batch_output_hessians(fn(x), x)`; executing eagerly,
  nested tapes' gradients of each output and feature where TensorFlow's
  second derivatives of `fn` are right (else, and for `method="forward"`,
  the graph op in a `tf.function` traced for the call).

  Args:
    fn: as in `batch_jacobians`.
    x: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` `(N, m..., d..., d...)`.

  Raises:
    As `batch_jacobians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> h = tf1hess.eager.batch_output_hessians(
    ...     lambda x: tf.stack([x[:, 0] * x[:, 1], x[:, 1] ** 2], 1),
    ...     tf.constant([[2., 3.]]))
    >>> h.shape
    TensorShape([1, 2, 2, 2])
    >>> h.numpy()[0, 1]
    array([[0., 0.],
           [0., 2.]], dtype=float32)
  """
  return _per_output(
    per_output.batch_output_hessians, fn, x, method, chunk_size, plan
  )


@_converting_fn
def batch_output_hessian_diagonals(
  fn, x, method="auto", chunk_size=None, plan=None
):
  """Diagonals of the per-sample Hessians of every output of `fn` at `x`.

  Runs `tf1hess.batch_output_hessian_diagonals(fn(x), x)`; executing
  eagerly, the diagonals of `batch_output_hessians`' tapes, as there.

  Args:
    fn: as in `batch_jacobians`.
    x: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` `(N, m..., d...)`.

  Raises:
    As `batch_jacobians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_output_hessian_diagonals(
    ...     lambda x: tf.stack([x[:, 0] * x[:, 1], x[:, 1] ** 2], 1),
    ...     tf.constant([[2., 3.]])).numpy()
    array([[[0., 0.],
            [0., 2.]]], dtype=float32)
  """
  return _per_output(
    per_output.batch_output_hessian_diagonals, fn, x, method, chunk_size, plan
  )


@_converting_fn
def batch_output_laplacians(fn, x, method="auto", chunk_size=None, plan=None):
  """Per-sample Laplacians of every output of `fn` at `x`, shape of `fn(x)`.

  Runs `tf1hess.batch_output_laplacians(fn(x), x)`; executing eagerly,
  the traces of `batch_output_hessians`' tapes, as there.

  Args:
    fn: as in `batch_jacobians`.
    x: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` `(N, m...)`: `(N, 1)` for outputs `(N, 1)`.

  Raises:
    As `batch_jacobians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_output_laplacians(
    ...     lambda x: tf.reduce_sum(x ** 3, 1, keepdims=True),
    ...     tf.constant([[1., 2.]])).numpy()
    array([[18.]], dtype=float32)
  """
  return _per_output(
    per_output.batch_output_laplacians, fn, x, method, chunk_size, plan
  )


@_converting_fn
def batch_hessian_vector_products(fn, x, v, unconnected_gradients="zero"):
  """Per-sample Hessian-vector products of `fn` at `x` with `v`.

  Executing eagerly, by two nested tapes (but where their second
  derivatives miss curvature through `tf.nn.moments`); inside a
  `tf.function`, by `tf1hess.batch_hessian_vector_products` in its graph.

  Args:
    fn: as in `batch_hessians`.
    x: as in `batch_hessians`.
    v: a `Tensor` of the shape and dtype of `x`.
    unconnected_gradients: as in `batch_hessians`.

  Returns:
    A `Tensor` of the shape of `x`.

  Raises:
    ValueError: when `v` does not have the shape of `x`, and as
      `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> tf1hess.eager.batch_hessian_vector_products(
    ...     lambda x: tf.reduce_sum(x ** 3), tf.constant([[1., 2.]]),
    ...     tf.ones([1, 2])).numpy()
    array([[ 6., 12.]], dtype=float32)
  """
  unconnected = _checks.check_unconnected(unconnected_gradients)
  x = _as_input(fn, x)
  v = tf.convert_to_tensor(v, dtype=x.dtype)
  if not v.shape.is_compatible_with(x.shape):
    raise ValueError(
      f"`v` must have the shape of `x` ({x.shape}); saw {v.shape}."
    )
  if not tf.executing_eagerly():
    # Built into a graph (a `tf.function`): the graph op's products, exact
    # through `tf.nn.moments` too (`ops.batch_hessian_vector_products`).
    return ops.batch_hessian_vector_products(
      fn(x), x, v, unconnected_gradients=unconnected_gradients
    )
  fail = _tapes_fail(fn, x, False)  # Before `fn` runs: see `_derivatives`.
  if not fail:
    with _Tapes(x, 2) as tapes:
      ys = _outputs(fn, x)
      if fail is None:
        fail = _tapes_fail(fn, x, True)
      if not fail:
        grad = _core.dense(
          tapes.tape(1).gradient(ys, x, unconnected_gradients=unconnected)
        )
        if grad is None:
          return None
        return tapes.gradient_fn(2, unconnected)(grad, v)
  # Exact where the tapes' products would not be, after the tapes stop
  # (see `_derivatives`).
  return _traced_call(
    batch_hessian_vector_products,
    fn,
    tf.convert_to_tensor(x),
    v,
    unconnected_gradients,
  )
