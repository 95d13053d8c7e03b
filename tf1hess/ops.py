"""Per-sample derivatives as TF1 graph ops, in the style of `tf.gradients`.

For a batch `x` of shape `(N, d1, ..., dm)` whose `N` may only be known at run
time, `batch_hessians(ys, x)` is the tensor `(N, d1, ..., dm, d1, ..., dm)` of
per-sample Hessians `d^2 sum(ys) / d x[i, ...] d x[i, ...]`: the diagonal
blocks of the `(N, K, N, K)` tensor `tf.hessians` would build, computed with
K backward passes whatever N is.
"""

import contextlib

import tensorflow as tf

from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _checks
from tf1hess import _core
from tf1hess import _tf_errors
from tf1hess import forward
from tf1hess import plan as plan_lib
from tf1hess.forward import conds
from tf1hess.forward import dispatch
from tf1hess.forward import engine
from tf1hess.forward import loops as loops_lib

_ZERO = tf.UnconnectedGradients.ZERO
_NONE = tf.UnconnectedGradients.NONE


def _is_tensor_like(value):
  return isinstance(value, (tf.Tensor, tf.Variable))


def _captures(graph):
  """`{id(internal): external}` of the tensors that `graph` captures."""
  return {id(internal): external for external, internal in graph.captures}


def _captured(graph, ys_list, xs_list, op_name):
  """`ys` and `xs` as tensors of one graph, for a call in a function graph.

  In a branch of a control flow v2 `tf.cond`, a loop body or a
  `tf.function`, the ops read the tensors of the graphs around them
  through captures. Where `ys` and `xs` are all of one graph, the ops
  built here read them so (as TensorFlow's gradients do, and auto's own
  `tf.cond` on N). Where the model is built here on a captured `x`, `x`
  stands for its capture: the tensor that `ys` read. A path from `x` to
  `ys` through another capture (a layer built outside on `x`, the rest
  here) would be missed: it raises.
  """
  if len({t.graph for t in ys_list + xs_list}) == 1:
    return ys_list, xs_list
  captures = _captures(graph)
  ys_list = [y if y.graph is graph else graph.capture(y) for y in ys_list]
  outside = {x.op for x in xs_list if x.graph is not graph}
  xs_list = [x if x.graph is graph else graph.capture(x) for x in xs_list]
  xs_inside = {x.op for x in xs_list}
  for op in _core.ancestor_ops(ys_list):
    external = (
      captures.get(id(op.outputs[0])) if op.type == "Placeholder" else None
    )
    if (
      op not in xs_inside and external is not None and _reads(external, outside)
    ):
      raise ValueError(
        f"`ys` depend on `xs` through {external.name}, which is computed "
        f"outside the function graph {graph.name} where `{op_name}` is "
        "built (a tf.cond branch, a loop body or a tf.function): build the "
        f"ops from `xs` to `ys` and `{op_name}` in the same graph."
      )
  return ys_list, xs_list


def _reads(tensor, ops):
  """Whether `tensor` is computed from an op of `ops`, through the
  captures of function graphs too."""
  seen, stack = set(), [tensor]
  while stack:
    t = stack.pop()
    if t.op in ops:
      return True
    if t.op not in seen:
      seen.add(t.op)
      stack.extend(t.op.inputs)
      if t.op.type == "Placeholder" and hasattr(t.graph, "captures"):
        external = _captures(t.graph).get(id(t))
        stack.extend([] if external is None else [external])
  return False


def _prepare(ys, xs, op_name):
  """Checks `ys` and `xs`; returns `(ys_list, xs_list, xs_was_sequence)`."""
  if tf.executing_eagerly():
    raise RuntimeError(
      f"`{op_name}` builds graph ops and needs graph mode "
      "(tf.compat.v1.disable_eager_execution(), a tf.Graph().as_default() "
      "block, or a tf.function); for eager tensors use "
      f"tf1hess.eager.{op_name}(fn, x)."
    )
  ys_list, _ = _checks.as_list(ys)
  xs_list, was_sequence = _checks.as_list(xs)
  if not ys_list:
    raise ValueError("`ys` must be a tensor or a non-empty list; saw [].")
  if not xs_list:
    raise ValueError("`xs` must be a tensor or a non-empty list; saw [].")
  graph = tf.compat.v1.get_default_graph()
  for arg, values in (("ys", ys_list), ("xs", xs_list)):
    for value in values:
      if isinstance(value, tf_ops.EagerTensor):
        raise ValueError(
          f"`{arg}` holds an eager tensor while a graph is being built; "
          "pass tensors of the graph (e.g. a tf.compat.v1.placeholder and "
          "the ops built on it), or use tf1hess.eager with a function."
        )
      if not _is_tensor_like(value):
        raise TypeError(
          f"`{arg}` must be a tf.Tensor (or a list of them) of the graph "
          "being built, e.g. a tf.compat.v1.placeholder; saw "
          f"{type(value).__name__}."
        )
      if arg == "xs" and isinstance(value, tf.Variable):
        # The derivatives follow the ops from `x`; a variable's reads are
        # ops of their own, one per read.
        raise TypeError(
          "`xs` must be tensors of the graph, the batch that `ys` is "
          f"computed from; saw the variable {value.name}. Read it once, "
          "`x = tf.identity(variable)`, and compute `ys` from `x`."
        )
      if not _core.graph_within(graph, value.graph):
        raise ValueError(
          f"`{arg}` holds a tensor of another graph ({value.name}); build "
          f"`{op_name}` inside `with {arg}.graph.as_default():`."
        )
  ys_list, xs_list = _captured(graph, ys_list, xs_list, op_name)
  if graph.finalized:
    raise RuntimeError(
      f"The graph is finalized and `{op_name}` cannot add its ops to it; "
      "call it before the graph is finalized (e.g. before creating a "
      "tf.compat.v1.train.MonitoredSession)."
    )
  for y in ys_list:
    _checks.check_float(y, "ys")
  for x in xs_list:
    _checks.check_float(x, "xs")
    _checks.check_batched(x, "xs")
  return ys_list, xs_list, was_sequence


def ops_between(ys_list, xs_list):
  """The ops on a path from any of `xs` to any of `ys` (`xs`' ops excluded).

  Args:
    ys_list: a list of `Tensor`s.
    xs_list: a list of `Tensor`s (or variables) of the same graph.

  Returns:
    A `set` of `tf.Operation`s; empty when `ys` does not depend on `xs`.
  """
  x_ops = {x.op for x in xs_list}
  upstream = _core.ancestor_ops(ys_list)  # Not the graph's other readers.
  between, stack = set(), [c for x in xs_list for c in x.consumers()]
  while stack:
    op = stack.pop()
    if op in upstream and op not in between and op not in x_ops:
      between.add(op)
      stack.extend(c for t in op.outputs for c in t.consumers())
  return between


def _imported(op):
  """Whether a v1 loop op came from a GraphDef: it has no while context."""
  return op._get_control_flow_context() is None  # pylint: disable=protected-access


def _v1_loops(models, xs_list, order, walked):
  """Whether control-flow-v1 loops stop the row loop's differentiation of
  `models` (the outputs for each of `xs`); raises `ValueError` where
  nothing can differentiate through them.

  TensorFlow takes no second-order gradients through a v1 loop, and no
  gradient at all through one imported from a GraphDef (it lost its while
  context). The forward engine can take second derivatives through a loop
  that is not imported, unrolled: `models` are unrolled already where the
  method lets them be (`dispatch.without_loops`); a loop left in them
  could not be, and with `walked` (order 2, and the engine's result taken
  where it can follow the model) `True` is returned for
  `dispatch.try_forward` to take the engine alone, which says why.
  """
  loops = sorted(
    (
      op
      for ys_list, x in zip(models, xs_list)
      for op in ops_between(ys_list, [x])
      if control_flow_util.IsLoopEnter(op) and (order > 1 or _imported(op))
    ),
    key=lambda op: op.name,
  )
  if loops and (not walked or any(_imported(op) for op in loops)):
    raise ValueError(loops_lib.v1_error(loops[0].name))
  return bool(loops)


def build_context(ys_list, xs_list, order, op_name):
  """Where to build derivatives of `order` of `ys`: a context manager.

  TensorFlow's second derivatives through a control flow v1 cond of a
  model (batch normalization or dropout on a `training` placeholder) are
  wrong, off by half the largest entry, where the gradient they
  differentiate was built in the branch of another v1 cond (a user's
  `tf.cond(p, lambda: batch_hessians(y, x), ...)`): its `Switch`es of the
  model's predicate take the context of that branch, whose gradient then
  reads them as the branch's own. So the ops of a model outside the branch
  are built outside it (`tf.control_dependencies(None)`, as TensorFlow
  lifts initializers); they then run whether the branch does or not. A
  model built in the branch, or control dependencies given around the
  call, raise.
  """
  graph = tf.compat.v1.get_default_graph()
  if order < 2 or not conds.built_in_a_branch(graph):
    return contextlib.nullcontext()
  between = ops_between(ys_list, xs_list) | {x.op for x in xs_list}
  own = sorted(
    op.name
    for op in between
    if op.type in conds.SWITCH | conds.MERGE and not conds.enclosing(op)
  )
  if not own:
    return contextlib.nullcontext()
  where = None
  if any(conds.in_the_branch_built(op) for op in between):
    where = "the model (`xs` to `ys`) is built in that branch too"
  elif graph._control_dependencies_stack:  # pylint: disable=protected-access
    where = "control dependencies are given around the call"
  if where is not None:
    raise ValueError(
      f"`{op_name}` is built in the branch of a control flow v1 tf.cond, "
      f"of a model with a cond of its own ({own[0]}), and {where}: "
      "TensorFlow's second derivatives through that cond are wrong there. "
      f"Build `{op_name}` outside the tf.cond (a branch may read its "
      "result), or use control flow v2 "
      "(tf.compat.v1.disable_eager_execution())."
    )
  return tf.control_dependencies(None)


def _models(ys_list, xs_list, plan):
  """For each of `xs`, the outputs to differentiate: where `plan` (a
  `tf1hess.Plan`) takes the engine, the model's loops unrolled where they
  can be (`dispatch.without_loops`: the rows then differentiate a model
  without loops too); otherwise, and for an `x` with no loop before `ys`,
  `ys_list` itself."""
  return [dispatch.without_loops(ys_list, x, plan) for x in xs_list]


def _gradients(models, xs_list, unconnected, engine_may):
  """The gradient of each of `models` with respect to its `x`.

  Where TensorFlow's gradient of an op of a model is missing, declared
  not differentiable or wrong, and the engine's adjoint pass has its own
  (`engine.needs_own_gradient`: TensorFlow's gradients of softsign and of
  resizes, in the forces of such models), that pass's gradient, if the
  engine may be taken (`engine_may`): the rows cannot differentiate such a
  model, or would be wrong, and auto takes the engine.
  """
  own = [
    engine_may and engine.needs_own_gradient(model, x)
    for model, x in zip(models, xs_list)
  ]
  if not any(own) and all(model is models[0] for model in models):
    grads = tf.gradients(models[0], xs_list, unconnected_gradients=unconnected)
  else:
    grads = [
      engine.gradient(model, x)
      if mine
      else tf.gradients(model, x, unconnected_gradients=unconnected)[0]
      for model, x, mine in zip(models, xs_list, own)
    ]
  return [_core.dense(g) for g in grads]


def _graph_gradient(x, unconnected):
  """Returns `(target, cotangent, source=x) -> d <target, cotangent> / dsource`.

  The gradient is `None` when unconnected (with `unconnected='none'`).
  """

  def gradient(target, cotangent, source=None):
    try:
      return _core.dense(
        tf.gradients(
          target,
          x if source is None else source,
          grad_ys=cotangent,
          unconnected_gradients=unconnected,
        )[0]
      )
    except TypeError as e:
      if not _tf_errors.is_sparse_gradient_error(e):
        raise
      raise TypeError(
        f"TensorFlow cannot differentiate the gradient of `ys` with respect "
        f"to {x.name} again ({e}): the gradient of a segment sum "
        "(tf.math.segment_sum, unsorted_segment_sum) gathers, and the "
        "gradient of that gather is IndexedSlices, which the gradient "
        "functions after it cannot take (tf.hessians and GradientTape fail "
        "alike). method='forward' follows segment sums over axes other "
        "than the batch axis; one over the batch axis mixes samples."
      ) from e

  return gradient


# Graph-building code: AutoGraph (a `tf.function` around a caller) must not
# rewrite it: it would only slow the tracing down (9 s against 0.5 s for a
# Hessian of a 3-layer MLP) and trip over the walks of the graph.
@tf.autograph.experimental.do_not_convert
def _derivatives(
  ys,
  xs,
  name,
  default_name,
  order,
  unconnected_gradients,
  plan,
  check_independence=False,
  diagonal=False,
  laplacian=False,
):
  """Shared body of the public ops: per-sample derivatives of `order`."""
  unconnected = _checks.check_unconnected(unconnected_gradients)
  if plan.method == "forward" and order > 2:
    raise ValueError(
      "`method`='forward' computes derivatives of order <= 2; saw order "
      f"{order}. Use method='auto' for higher orders."
    )
  ys_list, xs_list, was_sequence = _prepare(ys, xs, default_name)
  for x in xs_list:
    _checks.check_output_fits(x, 1 if diagonal or laplacian else order)
  if laplacian:
    mode = forward.LAPLACIAN
  else:
    mode = forward.DIAGONAL if diagonal else forward.HESSIAN
  context = build_context(ys_list, xs_list, order, default_name)
  with context, tf.name_scope(name or default_name):
    ys_list = [tf.convert_to_tensor(y) for y in ys_list]
    walked = order == 2 and plan.may_take_engine and not check_independence
    models = _models(ys_list, xs_list, plan)
    v1_loops = _v1_loops(models, xs_list, order, walked)
    engine_may = walked or (order == 1 and plan.may_take_engine)
    grads = _gradients(models, xs_list, unconnected, engine_may)
    if order == 1:
      return _checks.restore_structure(grads, was_sequence)
    results = []
    for x, g, ys_list in zip(xs_list, grads, models):
      # Whether the engine's result is checked as a whole (`_checked`);
      # where it cannot be, rows that the engine's result holds (in a
      # branch of a cond on N or of the model's cond) check themselves.
      whole = (
        check_independence
        and g is not None
        and not dispatch.tensorflow_fails(ys_list, x, g)
      )

      def rows(
        check=check_independence and not whole,
        x=x,
        g=g,
        model=None,
        plan=plan,
      ):
        if model is not None:
          # In a branch of `dispatch`'s `tf.cond` on N: the rows of this
          # copy of the model `(ys, x)`, so that a run that takes the other
          # branch makes none of their forward or backward pass.
          copied_ys, x = model
          (g,) = tf.gradients(copied_ys, [x], unconnected_gradients=unconnected)
        result = _core.per_sample_derivatives(
          x,
          g,
          lambda level: _graph_gradient(x, unconnected),
          order,
          plan,
          diagonal=diagonal or laplacian,
          check_independence=check,
          input_name=x.name,
        )
        if laplacian and result is not None:
          result = tf.reduce_sum(result, axis=list(range(1, x.shape.rank)))
        return result

      result, done = (None, True) if g is None else (None, False)
      if not done and _core.statically_empty(x):
        out_order = 1 if diagonal else 0 if laplacian else order
        result, done = _core.empty_derivatives(x, out_order), True
      if not done and order == 2:
        result, done = dispatch.try_forward(
          ys_list, x, g, mode, plan, unconnected, None if v1_loops else rows
        )
        if done and result is not None and whole:
          result = _checked(x, g, result, unconnected)
      if not done and order > 2:
        # TensorFlow's second derivatives, differentiated again: exact
        # through `tf.nn.moments` by default, as the engine's Hessians are;
        # a warning where they are wrong.
        dispatch.tensorflow_rows(
          ys_list,
          x,
          g,
          plan,
          f"the derivatives of order {order} for {x.name}",
          " the forward engine, exact there, computes order 2 only"
          if plan.method == "auto"
          else " method='auto' is exact at any order through tf.nn.moments,"
          " and the forward engine at order 2 through the others",
        )
      if not done:
        result = rows(check_independence)
      results.append(result)
    return _checks.restore_structure(results, was_sequence)


def _checked(x, grad, hessian, unconnected):
  """`hessian` of the engine after `_core.independence_check` passes at run
  time.

  Not where TensorFlow's full Hessian-vector product, which the check
  compares with, is wrong or cannot be built (`dispatch.tensorflow_fails`):
  the walk checks the samples there (it declines a model where an op that
  curves reads several samples: a sum, reshape or slice over the batch
  axis, a transpose that moves it), and the rows it leaves a branch to
  check their own (TensorFlow's products on both sides).
  """
  gradient = _graph_gradient(x, unconnected)
  check = _core.independence_check(
    x, hessian, lambda v: gradient(grad, v), x.name
  )
  if check is None:
    return hessian
  with tf.control_dependencies([check]):
    return tf.identity(hessian)


def batch_hessians(
  ys,
  xs,
  name=None,
  unconnected_gradients="zero",
  check_independence=False,
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample Hessians of `sum(ys)` with respect to each `x` in `xs`.

  Like `tf.hessians`, but only the per-sample diagonal blocks: for `x` of
  shape `(N, d1, ..., dm)` (N may be `None`) the result has shape
  `(N, d1, ..., dm, d1, ..., dm)` with
  `H[i, a, b] = d^2 sum(ys) / d x[i, a] d x[i, b]`; for `(N, K)` it is
  `(N, K, K)`. It is built with a `tf.while_loop` of K backward passes whose
  cost does not grow with the number of rows of `tf.gradients` outputs it
  reads, never through the `(N, K, N, K)` tensor.

  The result is only meaningful when the output of sample `i` depends on
  `x[i]` alone; `check_independence=True` verifies that at run time.

  Args:
    ys: a `Tensor` or list of tensors to be differentiated; summed like
      `tf.gradients` does, so per-sample outputs `(N,)`, `(N, 1)` or their
      scalar sum all give the same result.
    xs: a `Tensor` of rank >= 2 (batch first), or a list of them.
    name: `str`, optional name of the op's scope; default "batch_hessians".
    unconnected_gradients: 'zero' (default) gives zeros for an `x` that `ys`
      does not depend on, or whose gradient is constant (a linear model);
      'none' gives `None` there, like `tf.gradients`.
    check_independence: `bool`, default `False`. Adds a run-time check that
      compares one random full Hessian-vector product with the per-sample
      product, and fails with `tf.errors.InvalidArgumentError` when samples
      are coupled (batch norm in training mode, reductions over the batch).
      It costs one more backward pass. Where TensorFlow's second
      derivatives are wrong or missing (see
      `batch_hessian_vector_products`), that product is too; the engine's
      Hessians there are checked by its walk instead, which declines a
      model where an op that curves reads several samples.
    parallel_iterations: `int` or `None`: iterations of the row loop that
      may run in parallel (`tf.while_loop`'s argument; default 10).
    method: `str`, how the K rows of each Hessian are built; default
      `"auto"`. `"while_loop"` is the reference design: a `tf.while_loop`
      of one backward pass per row. `"pfor"` vectorizes the rows of a chunk
      into one backward pass, and skips the matmuls that one-hot rows waste
      in the first and last dense layers. `"auto"` vectorizes from
      `Plan.vectorize_from()` rows on (a static K: 256 with TensorFlow's
      BFC CPU allocator, else 512), unrolls up to `Plan.unroll_max_rows`
      (16) rows into the graph, and otherwise loops over rows, with the
      same shortcuts. Where an op cannot be vectorized or a shortcut cannot
      be built, the rows fall back to the loop when the graph is built,
      with one WARNING. See docs/speed.md. `"forward"` takes the forward
      engine (forward Jacobians op by op, see docs/forward.md), and raises
      `ValueError` naming an op it has no rule for; `"auto"` takes it where
      its cost model says so, and falls back to the rows, with a warning,
      where the engine cannot follow the model. When the batch size is not
      static and the cost model's choice depends on it, `"auto"` builds
      both, and a `tf.cond` on N runs one.
    chunk_size: `int` or `None` (default: all rows at once): rows per
      vectorized backward pass. Smaller chunks keep the intermediate
      activations of only `chunk_size` rows alive, at some cost in speed
      (the output and its assembly still take 1 to 3 times the output's
      size). Unused when the rows are built by a loop, which holds
      `parallel_iterations` rows at a time, and when the shortcuts need no
      rows one by one (a Hessian shared by all samples; a dense layer
      followed by elementwise ops: one matmul, with a factor of at most
      `Plan.max_factor_bytes`, 256 MiB).
    plan: a `tf1hess.Plan` or `None`: `method`, `chunk_size`,
      `parallel_iterations` and the thresholds of `"auto"` in one frozen
      object; when given, those three arguments must keep their defaults.

  Returns:
    A `Tensor` of shape `(N, d..., d...)` for each `x`, in the structure of
    `xs` (a tensor or a list). Static dimensions of `x` are kept.

  Raises:
    RuntimeError: when called eagerly outside a `tf.function`, or on a
      finalized graph.
    TypeError: when `ys` or `xs` is not a floating tensor of the graph, or
      `plan` is not a `tf1hess.Plan`.
    ValueError: when an `x` has rank < 2, a tensor is eager or from another
      graph, `unconnected_gradients` or `method` is unknown, `chunk_size`
      is not a positive int, `plan` comes with `method`, `chunk_size` or
      `parallel_iterations`. `tf1hess.ForwardUnsupportedError`, a
      `ValueError` that names the op: when the forward engine cannot follow
      the model where it must (`method='forward'`, or `ys` computed
      through a control flow v1 loop).
    LookupError: when the rows are built (the engine cannot follow the
      model, or another `method` is asked) and TensorFlow has no gradient
      of an op of the first derivative (`SoftsignGrad`, ...), naming it.
    tf.errors.InvalidArgumentError: at run time, when `check_independence`
      finds samples that are not independent.

  Example:
    >>> import tensorflow as tf, numpy as np, tf1hess
    >>> g = tf.Graph()
    >>> with g.as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 3])
    ...   h = tf1hess.batch_hessians(tf.reduce_sum(x * x, axis=1), x)
    ...   with tf.compat.v1.Session() as sess:
    ...     out = sess.run(h, {x: np.ones((5, 3), np.float32)})
    >>> out.shape
    (5, 3, 3)
    >>> out[0]
    array([[2., 0., 0.],
           [0., 2., 0.],
           [0., 0., 2.]], dtype=float32)
  """
  return _derivatives(
    ys,
    xs,
    name,
    "batch_hessians",
    2,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
    check_independence=check_independence,
  )


def batch_hessian_diagonals(
  ys,
  xs,
  name=None,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Diagonals of the per-sample Hessians, shape of each `x`.

  `D[i, a] = d^2 sum(ys) / d x[i, a]^2`. Uses the same row loop as
  `batch_hessians` (K backward passes) but keeps only one element per row.

  Args:
    ys: as in `batch_hessians`.
    xs: as in `batch_hessians`.
    name: `str`, optional; default "batch_hessian_diagonals".
    unconnected_gradients: as in `batch_hessians`.
    parallel_iterations: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` of the shape of each `x`, in the structure of `xs`.

  Raises:
    As `batch_hessians`.

  Example:
    >>> import tensorflow as tf, numpy as np, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   d = tf1hess.batch_hessian_diagonals(tf.reduce_sum(x ** 3), x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(d, {x: [[1., 2.]]}))
    [[ 6. 12.]]
  """
  return _derivatives(
    ys,
    xs,
    name,
    "batch_hessian_diagonals",
    2,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
    diagonal=True,
  )


def batch_laplacians(
  ys,
  xs,
  name=None,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample Laplacians (Hessian traces) of `sum(ys)`, shape `(N,)`.

  `L[i] = sum_a d^2 sum(ys) / d x[i, a]^2`, the trace of the per-sample
  Hessian. By default it is the forward Laplacian (Li et al., Nature Machine
  Intelligence 2024) of the forward engine, which never forms a Hessian; a
  model the engine cannot follow falls back to the sum of the diagonals of
  the row loop, with a warning.

  Args:
    ys: as in `batch_hessians`.
    xs: as in `batch_hessians`.
    name: `str`, optional; default "batch_laplacians".
    unconnected_gradients: as in `batch_hessians`.
    parallel_iterations: as in `batch_hessians`, for the row loop.
    method: as in `batch_hessians`; `"auto"` (default) takes the forward
      engine where it can, `"forward"` requires it, `"pfor"` and
      `"while_loop"` sum the diagonals of the rows.
    chunk_size: as in `batch_hessians`, for the row loop.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` of shape `(N,)` for each `x`, in the structure of `xs`.

  Raises:
    ValueError: as `batch_hessians` (`tf1hess.ForwardUnsupportedError`
      with `method='forward'`, when the engine cannot follow an op of the
      model).
    RuntimeError, TypeError: as `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   lap = tf1hess.batch_laplacians(tf.reduce_sum(x ** 3, axis=1), x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(lap, {x: [[1., 2.]]}))
    [18.]
  """
  return _derivatives(
    ys,
    xs,
    name,
    "batch_laplacians",
    2,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
    laplacian=True,
  )


def batch_gradients(ys, xs, name=None, unconnected_gradients="zero"):
  """Per-sample gradients `d sum(ys) / d x[i]`, shape of each `x`.

  With independent samples, the gradient of the summed outputs is the stack
  of the per-sample gradients: one backward pass for the whole batch.

  Args:
    ys: as in `batch_hessians`.
    xs: as in `batch_hessians`.
    name: `str`, optional; default "batch_gradients".
    unconnected_gradients: as in `batch_hessians`.

  Returns:
    A `Tensor` of the shape of each `x`, in the structure of `xs`.

  Raises:
    As `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   g = tf1hess.batch_gradients(tf.reduce_sum(x * x, axis=1), x)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(g, {x: [[1., 2.]]}))
    [[2. 4.]]
  """
  return _derivatives(
    ys, xs, name, "batch_gradients", 1, unconnected_gradients, plan_lib.Plan()
  )


def batch_derivatives(
  ys,
  xs,
  order,
  name=None,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample derivative tensors of order `order`.

  For `x` of shape `(N, K)` the result has shape `(N,) + (K,) * order`:
  order 1 is `batch_gradients`, order 2 `batch_hessians`. Order n takes
  `K + K^2 + ... + K^(n-1)` backward passes (nested row loops), and its
  output has `N * K^n` elements.

  With `unconnected_gradients='none'`, `None` comes back where TensorFlow
  reports a level as unconnected. A level built by a loop over rows is
  differentiated through that loop, and a control-flow-v2 loop reports
  zeros, not `None`: orders >= 3 of a quadratic are then zeros with
  `method='while_loop'` (or a dynamic K), but `None` by default with a
  static K, where the constant Hessian is built without a loop.

  Args:
    ys: as in `batch_hessians`.
    xs: as in `batch_hessians`.
    order: `int` >= 1.
    name: `str`, optional; default "batch_derivatives".
    unconnected_gradients: as in `batch_hessians`.
    parallel_iterations: as in `batch_hessians`.
    method: as in `batch_hessians`.
    chunk_size: as in `batch_hessians`; `None` does the K rows of the
      Hessian level at once and the K^(l-1) rows of level l > 2 by chunks of
      K rows.
    plan: as in `batch_hessians`.

  Returns:
    A `Tensor` of shape `(N,) + (d1, ..., dm) * order` per `x`, in the
    structure of `xs`.

  Raises:
    ValueError: when `order` is not a positive int, when the output for a
      static K (and N, if static) would exceed the machine's memory, and as
      `batch_hessians`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float64, [None, 1])
    ...   d3 = tf1hess.batch_derivatives(tf.math.log(x + 2.), x, order=3)
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(d3, {x: [[1.]]}).ravel())
    [0.07407407]
  """
  order = _checks.check_count(order, "order")
  return _derivatives(
    ys,
    xs,
    name,
    "batch_derivatives",
    order,
    unconnected_gradients,
    plan_lib.make(plan, method, chunk_size, parallel_iterations),
  )


def batch_hessian_vector_products(
  ys, xs, vs, name=None, unconnected_gradients="zero"
):
  """Per-sample Hessian-vector products `H_i v_i`, shape of each `x`.

  One extra backward pass through the gradient, no loop over features:
  `tf.gradients(grad, x, grad_ys=v)`. Where TensorFlow's second derivatives
  are wrong or missing (the mean that `tf.nn.moments` stops in its
  variance, as layer normalization uses it; max pools that keep their
  input's shape; bilinear resizes; Euclidean norms; the gradient of
  `tf.nn.softsign`), `H v` of the forward engine's Hessian instead, at the
  cost of the full Hessian (docs/forward.md).

  Args:
    ys: as in `batch_hessians`.
    xs: as in `batch_hessians`.
    vs: a `Tensor` (or list, matching `xs`) of the shape of each `x`.
    name: `str`, optional; default "batch_hessian_vector_products".
    unconnected_gradients: as in `batch_hessians`.

  Returns:
    A `Tensor` of the shape of each `x`, in the structure of `xs`.

  Raises:
    ValueError: when `vs` does not match `xs` in length or shape, and as
      `batch_hessians`.
    TypeError: when a `v` has another dtype than its `x`.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default():
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    ...   hv = tf1hess.batch_hessian_vector_products(
    ...       tf.reduce_sum(x ** 3), x, tf.ones_like(x))
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run(hv, {x: [[1., 2.]]}))
    [[ 6. 12.]]
  """
  unconnected = _checks.check_unconnected(unconnected_gradients)
  default_name = "batch_hessian_vector_products"
  ys_list, xs_list, was_sequence = _prepare(ys, xs, default_name)
  vs_list, _ = _checks.as_list(vs)
  if len(vs_list) != len(xs_list):
    raise ValueError(
      f"`vs` must hold one tensor per tensor of `xs` ({len(xs_list)}); saw "
      f"{len(vs_list)}."
    )
  context = build_context(ys_list, xs_list, 2, default_name)
  with context, tf.name_scope(name or default_name):
    vs_list = [
      tf.convert_to_tensor(v, dtype_hint=x.dtype)
      for v, x in zip(vs_list, xs_list)
    ]
    for v, x in zip(vs_list, xs_list):
      if v.dtype.base_dtype != x.dtype.base_dtype:
        raise TypeError(
          f"`vs` must have the dtype of `xs` ({x.dtype.name}); saw "
          f"{v.dtype.name}."
        )
      if not v.shape.is_compatible_with(x.shape):
        raise ValueError(
          f"`vs` must have the shape of `xs` ({x.shape}); saw {v.shape}."
        )
    vs_list = [_fed_like(v, x) for v, x in zip(vs_list, xs_list)]
    models = _models(ys_list, xs_list, plan_lib.Plan())
    _v1_loops(models, xs_list, 2, walked=False)
    grads = _gradients(models, xs_list, unconnected, False)
    results = []
    for x, g, v, model in zip(xs_list, grads, vs_list, models):
      if g is None:
        results.append(None)
        continue
      if _core.statically_empty(x):
        results.append(_core.empty_derivatives(x, 1))
        continue
      hv = _exact_products(model, x, g, v)
      if hv is None:
        (hv,) = tf.gradients(g, x, grad_ys=v, unconnected_gradients=unconnected)
      results.append(_core.dense(hv))
    return _checks.restore_structure(results, was_sequence)


def _fed_like(v, x):
  """`v`, checked at run time to have the shape of `x` where either shape
  is not static (else a mismatch fails deep in the backward pass, naming
  none of them)."""
  if v.shape.is_fully_defined() and x.shape.is_fully_defined():
    return v
  check = tf.debugging.assert_equal(
    tf.shape(v),
    tf.shape(x),
    message=f"`vs` must have the shape of `xs` ({x.name}), as fed",
  )
  with tf.control_dependencies([check]):
    return tf.identity(v)


def _exact_products(model, x, grad, v):
  """`H v` from the engine's Hessian of `model` where TensorFlow's backward
  pass through `grad` would be wrong or cannot be built
  (`dispatch.tensorflow_fails`: max pools that keep their input's shape,
  bilinear resizes, Euclidean norms, `tf.nn.moments`, the gradient of
  `tf.nn.softsign`, ...), else `None`.

  Exact, at the cost of the full Hessian (K^2 entries per sample) where the
  backward pass is not. Where the engine cannot follow the model either,
  `None`: the backward pass, with the curvature through `tf.nn.moments`
  where it can have it (`dispatch.tensorflow_rows`), and a warning (once)
  of what it misses.
  """
  if not dispatch.tensorflow_fails(model, x, grad):
    return None
  try:
    h = batch_hessians(model, x, method="forward")
  except ValueError as e:
    dispatch.tensorflow_rows(
      model,
      x,
      grad,
      plan_lib.Plan(),
      f"the Hessian-vector products for {x.name}",
      f" the forward engine, exact there, cannot follow the model: {e}",
    )
    return None
  shape = tf.shape(x)
  k = tf.reduce_prod(shape[1:])
  hv = tf.linalg.matvec(
    tf.reshape(h, tf.stack([shape[0], k, k])),
    tf.reshape(v, tf.stack([shape[0], k])),
  )
  return tf.reshape(hv, shape)
