"""Where the public ops choose between the forward engine and the row loop.

`method="forward"` always takes the engine and raises when it cannot follow
the model; `method="auto"` walks a copy of the model first, falls back to the
row loop with one warning that names the op when the engine cannot follow
the model, and builds the engine's ops only when `choose` estimates them
cheaper than the rows, for the static batch size, or for some batch sizes
when it is not static: then both are built, and a `tf.cond` on the batch
size runs one of them.
"""

import contextlib
import dataclasses
from typing import Optional

from absl import logging
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _core
from tf1hess import _shortcuts
from tf1hess import plan as plan_lib
from tf1hess.forward import chunks
from tf1hess.forward import conds
from tf1hess.forward import engine
from tf1hess.forward import jacobians
from tf1hess.forward import loops
from tf1hess.forward import reductions
from tf1hess.forward import registry


# Seconds per unit of `engine.Work`, and what a row of the row loop costs
# per unit of the gradient graph it differentiates: on this machine (2 CPU
# cores), the ops' measured by `tools/cost_model_measure.py --measure_ops`,
# the others fitted by its `--calibrate`; see `choose`.
_SECONDS_PER_FLOP = 2.6e-12
_SECONDS_PER_ENTRY = 2.5e-10
_SECONDS_PER_OP = 1.3e-6
_ROW_FLOPS = 1.2
_ROW_ENTRIES = 0.73
_ROW_OTHER_ENTRIES = 0.30
_ROW_OPS = 2.5
# Full Hessians take the rows only when their estimated time is under this
# fraction of the engine's: a wrong pick costs more one way than the other
# (see `choose`).
_ROWS_MARGIN = 0.9
# The functions that the backward pass of the gradient of an op evaluates
# again, per row, on the op's input (in TensorFlow's gradient functions:
# `cos(x)` in the gradient of `Sin` is differentiated by `-sin(x)`, ...).
# Other ops' second derivatives read their outputs (`Tanh`, `Exp`, ...) or
# are products and sums. tests/forward_dispatch_test.py checks this table
# against TensorFlow's gradients.
ROW_EVALUATES = {
  "Sin": ("Sin",),
  "Cos": ("Cos",),
  "Tan": ("Sin",),
  "Sinh": ("Sinh",),
  "Cosh": ("Cosh",),
  "Asinh": ("Cosh", "Sinh"),
  "Pow": ("Pow", "Log"),
}
# The name scope of the engine's ops in the graph of `ys`.
SCOPE = "forward"
# The batch size the costs are compared at when it is not static and no
# choice at run time can be built (see `try_forward`).
ASSUMED_BATCH = 1024
# The batch sizes a choice at run time tells apart: under the first, both
# take little time; above the second, the choice made there.
SWITCH_RANGE = (16, 1 << 20)


def seconds(work, n):
  """The estimated run time of `work` (an `engine.Work`) at batch size `n`."""
  at = work.at(n)
  if at is None:
    return None
  flops, entries, ops = at
  return (
    flops * _SECONDS_PER_FLOP
    + entries * _SECONDS_PER_ENTRY
    + ops * _SECONDS_PER_OP
  )


def _shortcut(x, grad, plan):
  """The rows' shortcut that needs no backward pass per row, if any.

  `"shared"` when the rows are the same in every sample; the width H of
  the dense layer when all rows come from one matmul by it (one dense
  layer, then elementwise ops); else `None` (see `_shortcuts.whole`).
  """
  k = tf.compat.dimension_value(x.shape[1]) if x.shape.rank == 2 else None
  if k is None or grad.shape.rank != 2:
    return None
  kind, _, layer = _shortcuts.whole(grad, x, k, k, plan)
  if kind == "elementwise":
    return tf.compat.dimension_value(layer[0].shape[1])
  return kind


def row_parts(ys, x, grad, mode, plan=None):
  """What `rows_work` weighs, or `None` when a shape is not static.

  A row is a backward pass through the gradient graph, the ops from `x` to
  `grad`: per sample, their `flops` and `products` / `others` (the entries
  of matmuls / of other ops; `engine.pass_work` with `guess`), without the
  transcendental functions; those the model evaluates once, with the
  output (`once`), but `again` the entries of those that each row
  evaluates again (see `ROW_EVALUATES`).

  Returns:
    A dict of those, with `k` rows, the `ops` of the gradient graph, and
    `shortcut` (see `_shortcut`).
  """
  k = x.shape[1:].num_elements() if x.shape[1:].is_fully_defined() else None
  if k is None:
    return None
  out = {jacobians.HESSIAN: k * k, jacobians.DIAGONAL: k}.get(mode, 1)
  path = engine.path_ops(x, ys)
  batch = tf.compat.dimension_value(x.shape[0])
  full = engine.pass_work(path, batch=batch)
  plain = engine.pass_work(path, transcendental=0, batch=batch)
  if not full.known:
    return None
  backward = engine.path_ops(x, [grad])
  products = engine.pass_work(
    backward, other_weight=0, transcendental=0, guess=True, batch=batch
  )
  everything = engine.pass_work(
    backward, transcendental=0, guess=True, batch=batch
  )
  again = 0
  for op in path:
    functions = ROW_EVALUATES.get(op.type, ())
    shape = op.outputs[0].shape
    if functions and shape.rank and shape[1:].is_fully_defined():
      again += shape[1:].num_elements() * sum(
        1 + engine.extra_entries(fn) for fn in functions
      )
  return {
    "k": k,
    "flops": everything.flops[1],
    "products": products.entries[1],
    "others": everything.entries[1] - products.entries[1],
    "once": full.entries[1] - plain.entries[1] + out,
    "again": again,
    "ops": len(backward),
    "shortcut": _shortcut(x, grad, plan or plan_lib.Plan()),
    "wide": k * k if mode == jacobians.HESSIAN else k,
  }


def rows_work(ys, x, grad, mode, plan=None):
  """The `engine.Work` of the row loop that `method="auto"` would build.

  K rows (one per feature), each a backward pass through the gradient
  graph (`row_parts`): about `_ROW_FLOPS` times its flops, `_ROW_ENTRIES`
  times the entries of its products (matmuls) and `_ROW_OTHER_ENTRIES`
  times those of its other ops, and `_ROW_OPS` ops per op; the
  transcendental functions and the output once, but those that every row
  evaluates again (`ROW_EVALUATES`) K times. When a
  shortcut of `_shortcut` applies, its one pass instead.
  """
  work = engine.Work()
  parts = row_parts(ys, x, grad, mode, plan)
  if parts is None:
    work.known = False
    return work
  k, shortcut = parts["k"], parts["shortcut"]
  entries = parts["products"] + parts["others"]
  if shortcut == "shared":
    work.add(entries=(0, parts["once"]), ops=5)
  elif shortcut is not None:
    # One backward pass, then (N, H) by (H, K K) (or (H, K)).
    work.add(
      flops=(0, parts["flops"] + 2 * shortcut * parts["wide"]),
      entries=(0, entries + parts["once"]),
      ops=_ROW_OPS * parts["ops"],
    )
  else:
    row = (
      _ROW_ENTRIES * parts["products"]
      + _ROW_OTHER_ENTRIES * parts["others"]
      + parts["again"]
    )
    work.add(
      flops=(0, k * _ROW_FLOPS * parts["flops"]),
      entries=(0, k * row + parts["once"]),
      ops=k * _ROW_OPS * parts["ops"],
    )
  return work


def _without_gradient(x, grad):
  """An op from `x` to `grad` that TensorFlow has no gradient for, or
  `None`."""
  for op in engine.path_ops(x, [grad]):
    try:
      tf_ops.get_gradient_function(op)
    except LookupError:
      return op
  return None


# Ops whose gradient's gradient is IndexedSlices (their gradient gathers
# the adjoint by segment), which the gradients of TanhGrad, SigmoidGrad and
# others cannot take: TensorFlow's second derivatives through them raise
# TypeError (tf.hessians and GradientTape too), whenever such a gradient
# lies on the way back.
_SPARSE_SECOND_DERIVATIVES = frozenset(["SegmentSum", "UnsortedSegmentSum"])


def rows_can_differentiate(x, grad):
  """Whether TensorFlow has a gradient for every op from `x` to `grad`.

  The rows differentiate the gradient graph; some gradients have none
  (`SoftsignGrad`, the gradient of `tf.nn.softsign`), and then only the
  engine can build the second derivatives. Through a segment sum they may
  fail (`_SPARSE_SECOND_DERIVATIVES`): the engine is taken where it can
  follow the model.
  """
  return _without_gradient(x, grad) is None and not _gradient_graph_has(
    x, grad, _SPARSE_SECOND_DERIVATIVES
  )


# Gradients whose TensorFlow gradient (the rows' second derivative) is
# wrong, with what the rows' warning says of it:
# - `MaxPoolGradGrad` of a max pool whose output has its input's shape
#   (stride 1 with SAME padding, 1 x 1 windows of stride 1; 2-D and 3-D)
#   differs from the engine's Hessians and float64 differences by as much
#   as the Hessian itself; of other pools it is right (`_inexact`);
# - TensorFlow declares `ResizeBilinearGrad` not differentiable: the rows
#   take the second derivative through a bilinear resize as 0 (off by half
#   the Hessian on a tanh layer, resize and sine); older TensorFlow (2.12)
#   has no gradient of it at all, and the rows raise (`try_forward`);
# - TensorFlow's gradient of `EuclideanNorm` (`tf.math.reduce_euclidean_
#   norm`) is `u / (norm / adjoint)`: its derivative is not a number
#   wherever the adjoint is 0 (an entry of the norm that is not used, a
#   ReLU that is off after it).
# - `tf.nn.moments` stops the gradient of the mean in the variance, which
#   changes no first derivative but drops the curvature through the mean
#   (`reductions.stops_a_variance_mean`; the walk follows such a
#   `StopGradient` only there and into TensorFlow's gradient of the
#   variance): layer normalization built on it is off by as much as the
#   Hessian, and so are functions of its gradients.
# The engine's rules of max pools (and of their gradients), resizes, norms
# and moments are exact there.
_MAX_POOL_GRAD = (
  "a max pool's gradient with TensorFlow's gradient of it (MaxPoolGradGrad,"
  " MaxPool3DGradGrad), which is wrong where the pool keeps its input's"
  " shape (stride 1 with SAME padding, or 1 x 1 windows of stride 1)"
)
_MAX_POOL_GRADS = frozenset(["MaxPoolGrad", "MaxPoolGradV2", "MaxPool3DGrad"])
# The reason of `_inexact_gradients` for a `StopGradient` of a mean over the
# batch axis, of which the engine has no exact derivatives either.
_BATCH_MEAN = "StopGradient of a batch mean"
_INEXACT_SECOND_DERIVATIVES = {
  "MaxPoolGrad": _MAX_POOL_GRAD,
  "MaxPoolGradV2": _MAX_POOL_GRAD,
  "MaxPool3DGrad": _MAX_POOL_GRAD,
  "ResizeBilinearGrad": (
    "a bilinear resize's gradient, which TensorFlow declares not"
    " differentiable: they miss the curvature through the resize"
  ),
  "EuclideanNorm": (
    "a Euclidean norm's gradient, which TensorFlow computes as u / (norm /"
    " adjoint): its derivative is NaN wherever the adjoint is 0"
  ),
  "StopGradient": (
    "the variance of tf.nn.moments with the gradient of its mean stopped,"
    " exact to first order only: they miss the curvature through the mean"
  ),
  "SoftmaxCrossEntropyWithLogits": (
    "the gradient of tf.nn.softmax_cross_entropy_with_logits of labels that"
    " depend on x, which TensorFlow differentiates without the labels' part:"
    " they miss the curvature through the labels"
  ),
  "Cumprod": (
    "a product's gradient (tf.reduce_prod, tf.math.cumprod), which"
    " TensorFlow computes with cumulative products, and theirs by dividing"
    " by the input: wrong (or NaN) wherever an entry of it is 0"
  ),
  _BATCH_MEAN: (
    "the variance of tf.nn.moments over the batch axis (a batch"
    " normalization in training), which mixes the samples: no method gives"
    " per-sample Hessians of such a model, and check_independence=True"
    " says so when it runs"
  ),
}


def _gradient_graph_has(x, grad, op_types):
  """Whether an op of `op_types` is among the ops from `x` to `grad`."""
  return any(op.type in op_types for op in engine.path_ops(x, [grad]))


def _inexact(op, path):
  """Whether TensorFlow's gradient of `op`, of a type of
  `_INEXACT_SECOND_DERIVATIVES`, is wrong: a max pool's gradient's only
  where the pool's output has the shape of its input (or a shape not
  known), a cross-entropy's where its labels are on `path` (a set of
  ops)."""
  if op.type == "SoftmaxCrossEntropyWithLogits":
    return op.inputs[1].op in path
  if op.type not in _MAX_POOL_GRADS:
    return True
  original, pooled = op.inputs[0].shape[1:], op.inputs[1].shape[1:]
  known = original.is_fully_defined() and pooled.is_fully_defined()
  return not known or original == pooled


def _inexact_gradients(ys, x, grad):
  """The keys of `_INEXACT_SECOND_DERIVATIVES` for the ops from `x` to
  `grad` whose gradient is wrong there (`_inexact`), and for the
  `StopGradient`s of `tf.nn.moments` from `x` to `ys`: their op types, but
  `_BATCH_MEAN` for a stop of a mean over the batch axis."""
  path = engine.path_ops(x, [grad])
  on_path = set(path)
  stops = [op for op in path if op.type == "StopGradient"]
  stops += engine.stopped_means(x, ys)
  types = {
    op.type
    for op in path
    if op.type in _INEXACT_SECOND_DERIVATIVES
    and op.type != "StopGradient"
    and _inexact(op, on_path)
  }
  for op in stops:
    if not engine.differentiated(op):
      within = reductions.stops_a_mean_within_samples(op)
      types.add("StopGradient" if within else _BATCH_MEAN)
  return sorted(types)


def differentiate_moments_for_rows(ys, xs, plan):
  """Where `plan` (`method="auto"`) takes TensorFlow's rows of `ys`: gives
  them the curvature through the means that `tf.nn.moments` stops
  (`engine.differentiate_stops_for_rows`), as the engine has it. The other
  methods keep TensorFlow's derivatives, and warn."""
  if plan.method == "auto":
    for x in xs:
      engine.differentiate_stops_for_rows(x, ys)


def rows_miss_moments(ys, xs):
  """Whether TensorFlow's second derivatives of `ys` miss curvature through
  a mean that `tf.nn.moments` stops between one of `xs` and `ys`
  (`engine.stopped_means`)."""
  return any(engine.stopped_means(x, ys) for x in xs)


def warn_of_moments(graph, what):
  """Warns once that `what`, TensorFlow's rows, miss curvature through
  `tf.nn.moments` (`rows_miss_moments`)."""
  _core.warn_once(
    graph,
    f"tf1hess: {what} differentiate"
    f" {_INEXACT_SECOND_DERIVATIVES['StopGradient']}; the Hessians of one"
    " input with method='auto' or 'forward' are exact there.",
  )


def rows_are_exact(ys, x, grad):
  """Whether TensorFlow's gradients of the ops from `x` to `grad` are exact
  (see `_INEXACT_SECOND_DERIVATIVES`)."""
  return not _inexact_gradients(ys, x, grad)


def tensorflow_fails(ys, x, grad):
  """Whether TensorFlow's second derivatives of `ys` with respect to `x`
  (its gradients of `grad`, the gradient of `sum(ys)`) are wrong
  (`rows_are_exact`) or cannot be built (`rows_can_differentiate`): those
  of the rows, the tapes and the backward pass of Hessian-vector
  products."""
  return not rows_can_differentiate(x, grad) or not rows_are_exact(ys, x, grad)


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `method="auto"` builds for a batch of N samples.

  Attributes:
    engine: whether the engine is taken for N under `switch`, or for every
      N when `switch` is `None`.
    switch: `None`, or the batch size from which the other is taken: both
      are built, and a `tf.cond` on N runs one of them.
  """

  engine: bool
  switch: Optional[int] = None

  def at(self, n):
    """Whether the engine is taken for a batch of `n`."""
    return self.engine != (self.switch is not None and n >= self.switch)


def choose(ys, x, grad, mode, walked, plan=None):
  """The cost model of `method="auto"`: the engine, the rows, or either by N.

  The engine whenever the rows cannot be built (`rows_can_differentiate`)
  or would inherit a wrong second derivative of TensorFlow's
  (`rows_are_exact`: max pooling, bilinear resizes, Euclidean norms,
  `tf.nn.moments`, products).

  Diagonals and Laplacians, and the Hessians of one feature (their own
  diagonals), take the engine unless the rows need no pass per row
  (`_shortcut`: a Hessian shared by all samples, or one dense layer then
  elementwise ops): the engine contracts its terms in `N K M`
  where the rows make K backward passes, and it was the faster (or within
  5%) on every model measured without such a shortcut: the 9 of
  `tools/cost_model_measure.py` and the 6 of the benchmark, among them a
  residual MLP with layer normalization and attention (engine 0.41x to
  0.53x the rows' time).

  Full Hessians compare the estimated run times (`seconds`) of the
  engine's `Work` (`walked.work`, from the walk) and of the rows'
  (`rows_work`); when a shape either estimate needs is not static, the
  rows. Where N not being static lost other dimensions, the estimates are
  made on a copy of the model with a static N (`_static_batch_copy`).
  The rows are taken when their estimate is under `_ROWS_MARGIN` (0.9)
  times the engine's: over the 49 cases of 24 models measured with
  `tools/cost_model_measure.py` (docs/forward.md), the rows, where faster,
  were so by up to 2.6x (3.4x for a quadratic form, whose rows need no
  pass per row), and the engine by up to 22x, so a near tie goes to the
  engine.

  Both estimates are a fixed time plus a time per sample, and the rows'
  fixed time (their K passes through the ops of the gradient graph) is
  the larger one: the engine tends to win at small N, the rows at large
  N. At a static batch size the choice is made for it. When N is known
  only at run time, the choice is made at both ends of `SWITCH_RANGE`;
  where they differ, the batch size at which the estimates cross is the
  `switch` of the result.

  The costs of ops were measured (`--measure_ops` of that tool); the other
  constants were fitted (least squares of the log errors of both times
  and of their ratio; the medians of three fits) to full Hessians of 22
  cases of 7 models that are in no benchmark (`CALIBRATION` there):
  sigmoid MLPs 2 x 32 and 4 x 128, a Gaussian-kernel log-density of 8
  centers, `sum(sin(x) exp(-x^2))`, a swish MLP 3 x 64, a layer with RMS
  normalization, a gated (GLU) layer; N = 256 to 8192, K = 2 to 128. The
  estimated ratio rows / engine is 0.62x to 1.71x the measured one
  (1.71x: glu at 512 x 48, where the rows are the faster).
  docs/forward.md validates them on 17 other models, none in the fit.

  Where XLA compiles the graph (`_core.compiled_by_xla`), the engine: XLA
  compiles both branches of a switch on N, and failed to compile the
  weight gradients of a loss of Hessians in a switch with a batch of `None`
  ("Incompatible shapes" in TensorFlow's gradient of a `BroadcastTo` of the
  branch that a run did not take).

  Args:
    ys: the list of outputs.
    x: the input `Tensor` `(N, d...)`.
    grad: `d sum(ys) / dx`.
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.
    walked: the `engine.Result` of the walk.
    plan: the call's `tf1hess.Plan` (the shortcuts' thresholds); `None`:
      the default plan.

  Returns:
    A `Choice`.
  """
  plan = plan or plan_lib.Plan()
  if tensorflow_fails(ys, x, grad) or _core.compiled_by_xla():
    return Choice(True)
  if engine.walked_mode(x, mode) != jacobians.HESSIAN:
    # Diagonals, Laplacians, and a Hessian the engine walks as a diagonal.
    return Choice(_shortcut(x, grad, plan) is None)
  rows = rows_work(ys, x, grad, mode, plan)
  if seconds(rows, 1) is None:
    rows = _rows_work_with_static_batch(ys, x, mode, plan)
  if seconds(walked.work, 1) is None or seconds(rows, 1) is None:
    return Choice(False)

  def engine_at(n):
    return seconds(rows, n) >= _ROWS_MARGIN * seconds(walked.work, n)

  n = tf.compat.dimension_value(x.shape[0]) if x.shape.rank else None
  if n is not None:
    return Choice(engine_at(n))
  low, high = SWITCH_RANGE
  below = engine_at(low)
  if engine_at(high) == below:
    return Choice(below)
  # Both estimates are linear in N: they cross once.
  while high - low > 1:
    middle = (low + high) // 2
    if engine_at(middle) == below:
      low = middle
    else:
      high = middle
  return Choice(below, high)


def prefers_forward(ys, x, grad, mode, walked, plan=None):
  """Whether `choose` takes the engine at the static N, or `ASSUMED_BATCH`."""
  n = tf.compat.dimension_value(x.shape[0]) if x.shape.rank else None
  choice = choose(ys, x, grad, mode, walked, plan)
  return choice.at(ASSUMED_BATCH if n is None else n)


def shaped(result, x, mode):
  """`result` `(N, K, K)`, `(N, K)` or `(N,)` in the shape of `x`'s dims."""
  dims = x.shape[1:]
  copies = {jacobians.HESSIAN: 2, jacobians.DIAGONAL: 1, jacobians.LAPLACIAN: 0}
  count = copies[mode]
  if count == 0:
    result.set_shape(x.shape[:1])
    return result
  tail = tf.shape(x)[1:]
  shape = tf.concat([tf.shape(x)[:1]] + [tail] * count, axis=0)
  result = tf.reshape(result, shape)
  result.set_shape(x.shape[:1].concatenate(dims.as_list() * count))
  return result


def _raising(x, mode, message):
  """Zeros shaped like the result, after an assertion that fails with
  `message` when run: the branch of a `tf.cond` that cannot be built."""
  k = tf.reduce_prod(tf.shape(x)[1:])
  failed = tf.debugging.Assert(tf.constant(False), [message])
  with tf.control_dependencies([failed]):
    zeros = engine.zero_result(tf.shape(x)[0], k, mode, x.dtype)
    return shaped(zeros, x, mode)


def _copy_name(t, names, nodes, taken, shaped):
  """The name in the copy of tensor `t` (see `_copy`), adding its nodes."""
  key = (t.op.name, t.value_index)
  if key in names:
    return names[key]
  dtype = t.dtype.base_dtype
  if (dtype.is_integer or key in shaped) and not any(
    value.HasField("func") for value in t.op.node_def.attr.values()
  ):
    # Shapes, axes, indices: rules read their values, so copy their ops;
    # and those of tensors whose shapes they read, made of the shapes of
    # tensors of x (`registry.shape_sources`: a zero state).
    _copy_node(t.op, names, nodes, taken, shaped)
    return names[key]
  # Anything else (weights, other inputs, ...) only needs its dtype and
  # static shape: a placeholder, whatever the value (no large constants).
  name = f"{t.op.name}/tf1hess_input_{t.value_index}"
  while name in taken:
    name += "_"
  taken.add(name)
  node = tf.compat.v1.NodeDef(name=name, op="Placeholder")
  node.attr["dtype"].type = dtype.as_datatype_enum
  node.attr["shape"].shape.CopyFrom(t.shape.as_proto())
  nodes.append(node)
  names[key] = name
  return name


def _copy_node(op, names, nodes, taken, shaped):
  """Adds the `NodeDef` of `op`, its data inputs renamed, no control inputs.

  A `Switch` of the cond that the ops are built in (`conds.enclosing`)
  adds none: its output there is its input.
  """
  if conds.enclosing(op):
    branch = op._control_flow_context.branch  # pylint: disable=protected-access
    names[(op.name, branch)] = _copy_name(
      op.inputs[0], names, nodes, taken, shaped
    )
    return
  node = op.node_def
  node.ClearField("device")
  if "_class" in node.attr:
    del node.attr["_class"]  # Colocation with ops that are not copied.
  taken.add(op.name)
  for i in range(len(op.outputs)):
    names.setdefault((op.name, i), f"{op.name}:{i}")
  inputs = [
    _copy_name(t, names, nodes, taken, shaped)
    for t in registry.followed_inputs(op)
  ]
  if registry.exact_custom_gradient(op):
    # Its gradient function reads tensors of the model, not of the copy.
    node.attr["_gradient_op_type"].s = registry.COPY_GRADIENT.encode()
    # The value it wraps (not walked) is computed from `u`, of its shape:
    # `u` in its place keeps that shape (a static N in a static copy).
    inputs = inputs[:1] + inputs
  del node.input[:]
  node.input.extend(inputs)
  nodes.append(node)


def _copy(x, ys, path, batch=None):
  """The ops of `path` in a new `tf.Graph`: `(graph, x, ys)` there.

  `x` becomes a placeholder (of static batch size `batch` if given);
  every other floating input of the path a placeholder of its shape; the
  integer tensors the path reads (shapes, axes) are copied with the ops
  that compute them, and so are the tensors whose shapes they read where
  those are made of other shapes (`registry.shape_made`: a recurrent
  cell's zero state). The copies keep their names and static shapes, so
  that the walk meets the same ops as in the original graph and says the
  same when it cannot follow one.
  """
  names, nodes, taken = {}, [], {op.name for op in path}
  x_name = f"{x.op.name}/tf1hess_x"
  while x_name in taken:
    x_name += "_"
  taken.add(x_name)
  node = tf.compat.v1.NodeDef(name=x_name, op="Placeholder")
  node.attr["dtype"].type = x.dtype.base_dtype.as_datatype_enum
  shape = x.shape
  if batch is not None:
    shape = tf.TensorShape([batch]).concatenate(shape[1:])
  node.attr["shape"].shape.CopyFrom(shape.as_proto())
  nodes.append(node)
  names[(x.op.name, x.value_index)] = x_name
  shaped = {
    (t.op.name, t.value_index): t
    for op in path
    for t in registry.shape_sources(op)
    if registry.shape_made(t)
  }
  for op in path:
    _copy_node(op, names, nodes, taken, shaped)
  graph_def = tf.compat.v1.GraphDef()
  graph_def.node.extend(nodes)
  graph_def.versions.CopyFrom(x.graph.graph_def_versions)
  graph = tf.Graph()
  with graph.as_default():
    tf.graph_util.import_graph_def(graph_def, name="")
  outputs = [t for op in path for t in op.outputs] + list(shaped.values())
  for t in outputs:
    key = (t.op.name, t.value_index)
    if key in names:
      graph.get_tensor_by_name(names[key]).set_shape(t.shape)
  wanted = [(y.op.name, y.value_index) for y in ys]
  ys_copy = [graph.get_tensor_by_name(names[w]) for w in wanted if w in names]
  return graph, graph.get_tensor_by_name(x_name + ":0"), ys_copy


def dry_run(ys, x, mode):
  """The engine's `Result` for `x`, walked on a copy of the model.

  The copy lives in a throwaway graph, so that the graph of `ys` gets the
  engine's ops only when they are used (`method="auto"` decides first).

  Returns:
    The `engine.Result` of the walk on the copy (its `value` a tensor of
    the throwaway graph), or `None` when the model could not be copied.

  Raises:
    engine.Unsupported: when the walk cannot follow an op.
  """
  engine.check_input(x)
  path = engine.path_ops(x, ys)
  for op in path:
    if op.type not in registry.RULES:
      raise engine.Unsupported(
        f"no forward rule for op type {op.type} ({op.name})"
      )
  # Where N is not static, shape inference can lose other dimensions that
  # the estimates need (`_static_batch_copy`; a time-major `(T, None, F)`
  # has no size per sample): the copy with a static N is walked first, and
  # its `Work`, per sample and per run, holds for every N.
  static = _static_batch_copy(x, ys, path)
  if static is not None:
    graph, x_copy, ys_copy = static
    try:
      with graph.as_default():
        walked = engine.second_derivatives(ys_copy, x_copy, mode)
      if walked.work.known:
        return walked
    except engine.Unsupported:
      pass
    except (ValueError, TypeError) as e:
      # A rule that cannot build with N static: the copy without follows.
      logging.info("tf1hess: no walk with a static batch size (%s).", e)
  try:
    graph, x_copy, ys_copy = _copy(x, ys, path)
  except (ValueError, TypeError, tf.errors.OpError) as e:
    logging.info("tf1hess: the model could not be copied (%s).", e)
    return None
  with graph.as_default():
    return engine.second_derivatives(ys_copy, x_copy, mode)


def _static_batch_copy(x, ys, path):
  """`_copy` with the batch size `ASSUMED_BATCH`, or `None`.

  When N is not static, TensorFlow's shape inference can lose other
  dimensions too (`tf.nn.softmax_cross_entropy_with_logits` reshapes the
  logits `(None, C)` to `(None, None)`), which the estimates need; with a
  static N it keeps them. `None` when N is static already, the features
  are not, or the copy fails (another input with a static batch size).
  """
  if x.shape.rank is None or x.shape[:1].is_fully_defined():
    return None
  if not x.shape[1:].is_fully_defined():
    return None
  try:
    return _copy(x, ys, path, batch=ASSUMED_BATCH)
  except (ValueError, TypeError, tf.errors.OpError) as e:
    logging.info("tf1hess: no copy with a static batch size (%s).", e)
    return None


def _rows_work_with_static_batch(ys, x, mode, plan):
  """`rows_work` on a `_static_batch_copy` of the model, or unknown work."""
  unknown = engine.Work()
  unknown.known = False
  static = _static_batch_copy(x, ys, engine.path_ops(x, ys))
  if static is None:
    return unknown
  graph, x_copy, ys_copy = static
  with graph.as_default():
    grad = tf.gradients(ys_copy, x_copy)[0]
    if grad is None:
      return unknown
    return rows_work(ys_copy, x_copy, grad, mode, plan)


class ForwardUnsupportedError(ValueError):
  """The forward engine cannot follow the model, and nothing else may.

  Raised by `method="forward"`, and where `ys` is computed through a
  control flow v1 loop (which TensorFlow does not differentiate twice, so
  the engine is the only way). A `ValueError`: `reason` is the engine's,
  naming the op (`registry.Unsupported`).
  """

  def __init__(self, message, reason):
    super().__init__(message)
    self.reason = reason


def _unsupported(x, method, error):
  """Raises for `method="forward"`; warns once for `"auto"`."""
  if method == "forward":
    raise ForwardUnsupportedError(
      f"`method`='forward' cannot differentiate `ys` with respect to "
      f"{x.name}: {error}. Use method='auto' to fall back to the row loop.",
      error,
    ) from None
  mixing = ""
  if isinstance(error, registry.MixesSamples):
    mixing = (
      " If the model mixes samples there (a mean, a norm or a"
      " normalization over the batch), its per-sample Hessians are not"
      " defined, and the rows give each sample the sum of its row of"
      " blocks of the whole batch's Hessian, not its own block;"
      " check_independence=True makes that an error"
    )
  _core.warn_once(
    x.graph,
    f"tf1hess: the forward engine falls back to the row loop for {x.name}:"
    f" {error}.{mixing}",
  )


def _rows_fit_in_cond(x, grad, fragile=None):
  """Whether the rows of `grad` may be built in a branch of a `tf.cond`.

  Under control flow v2 they may, unless the model has a custom gradient
  `fragile` in a cond's branch (`conds.custom_gradient_in_branch`): the
  gradient of that cond then fails to build in a branch of another. Under
  control flow v1 they may unless `grad` holds TensorFlow's gradient of a
  fused batch normalization, whose own gradient runs a `tf.GradientTape`:
  inside a `tf.cond` that raises, or in the rows' loop inside one comes out
  wrong (Keras `LayerNormalization` in float32).
  """
  if tf.compat.v1.control_flow_v2_enabled():
    return fragile is None
  return not _gradient_graph_has(x, grad, _core.TAPED_GRADIENTS)


def _rows_in_a_branch(x, grad, fragile, missing):
  """Whether the rows of a branch that the engine cannot follow are built
  in that branch of `_try_forward_with_conds`' `tf.cond`, rather than the
  rows of the whole model taken.

  Under control flow v2, where they fit (`_rows_fit_in_cond`). Under v1,
  only where the whole model's rows would not do: a custom gradient in a
  branch (`fragile`, see `_try_forward_with_conds`), or TensorFlow has no
  gradient of an op of the gradient graph (`missing`: the branch raises
  when a run takes it). Elsewhere in a v1 cond, the rows of a model with
  conds of its own (dropout behind a `training` placeholder) have values,
  but TensorFlow's gradients of them (with respect to weights, to train
  on a Laplacian) have none when a run takes that branch ("Retval[0] does
  not have value"; inside `optimizer.minimize`, the updates of the weights
  they reach do not run).
  """
  if not _rows_fit_in_cond(x, grad, fragile):
    return False
  v1 = not tf.compat.v1.control_flow_v2_enabled()
  return not v1 or fragile is not None or missing is not None


def _walk(ys, x, mode, planned):
  """The engine's `Result` for `x` in the graph of `ys`: in the chunks of
  the batch `planned` (`chunks.plan`), or whole where it is `None`."""
  with tf.name_scope(SCOPE):
    if planned is None:
      return engine.second_derivatives(ys, x, mode)
    return planned.second_derivatives(mode)


def _chunks_past_a_small_switch(choice, planned):
  """Whether `choice` takes the rows only for batches of fewer samples than
  a chunk holds (`chunks.MAX_CHUNK`), and the engine in the chunks
  `planned` above.

  The engine is then better taken for every N: in a `tf.cond` the chunks'
  loop ran slower (DeepXDE's 3 x 64 tanh MLP at 4096 x 10: 11.8 ms against
  9.8 outside a cond under control flow v1, 12.7 and 10.8 under v2; the
  same without chunks: 16.2 ms both), and under `MAX_CHUNK` samples either
  takes little time.
  """
  return (
    choice.switch is not None
    and not choice.engine
    and choice.switch <= chunks.MAX_CHUNK
    and planned is not None
  )


def _by_batch_size(ys, x, mode, choice, rows, planned, walked, plan):
  """A `tf.cond` on N between the engine and `rows()` (see `Choice`)."""
  # What a branch reads from outside the cond is computed by every run,
  # whichever branch it takes. Where the model can be copied (`chunks.
  # copier`; always where the engine walks chunks, each on a copy), the
  # rows differentiate a copy of the model made in their branch: no
  # backward pass of the model outside, which the engine's branch would
  # pay for (about a fifth of the engine's time on a 3 x 64 MLP at 8192 x
  # 2). Otherwise the rows' gradient stays the one made outside (a
  # gradient made in a branch of a control flow v2 cond, of tensors
  # outside it, then differentiated again, missed terms: a per-sample
  # scaled quadratic form was wrong).
  copies = planned or chunks.copier(x, ys, walked)

  def walk():
    return shaped(_walk(ys, x, mode, planned).value, x, mode)

  # Rows that run only from the switch on are not unrolled: there a loop
  # over them took 0.93x to 1.2x the unrolled rows' time (1024 to 8192
  # samples: a 3 x 64 tanh MLP at K = 10, 6 tanh layers of 16, a 5-step
  # LSTM of 16 units at K = 15), and unrolled, each row is a backward pass
  # to build (the LSTM's rows: 7.2 s to build and 4.6 s to run first,
  # against 1.5 and 0.85 s for the loop).
  if choice.engine:
    plan = dataclasses.replace(plan, unroll_max_rows=0)

  def own_rows():
    if copies is None:
      return rows(plan=plan)
    x_copy = tf.identity(x)
    return rows(model=(copies.copy(x_copy), x_copy), plan=plan)

  below, above = (walk, own_rows) if choice.engine else (own_rows, walk)
  return tf.cond(
    tf.shape(x)[0] < choice.switch, below, above, name="by_batch_size"
  )


def without_loops(ys, xs, plan):
  """`ys`, or their copies with the loops between `xs` (a `Tensor` or a
  list) and them unrolled, where `plan` (a `tf1hess.Plan`) takes the
  engine (`method` "auto" or "forward").

  The copies (`loops.unrolled`) are the same function of `x` without the
  loops' ops, so that every build differentiates them, the rows too:
  TensorFlow's gradient of a control flow v2 loop adds outputs to the loop's
  op, which a `tf.compat.v1.Session` that has already run the op does not
  see (its run then fails with "Connecting to invalid output"), and it has
  no second derivative of a control flow v1 loop. Where a loop cannot be
  unrolled (`plan.max_unrolled_ops`, a length known only at run time
  without a bound, ...) `ys` is returned unchanged; `_try_forward` says why.
  """
  xs = list(xs) if isinstance(xs, (list, tuple)) else [xs]
  if not plan.may_take_engine:
    return ys
  path = [op for x in xs for op in engine.path_ops(x, ys)]
  if not loops.on_path(path):
    return ys
  try:
    return loops.unrolled(xs, ys, path, plan.max_unrolled_ops)
  except engine.Unsupported:
    return ys


def joint_input(ys, xs, plan):
  """`(z, copies)`: the inputs `xs` as one input, and `ys` computed from it.

  `z` is `(N, K)`, the flattened features of `xs` (a list of `(N, d...)`
  with static feature dimensions) concatenated in their order, and `copies`
  are `ys` copied with each input replaced by its columns of `z` (and the
  loops between unrolled, as `without_loops`). The per-sample Hessian of a
  copy over `z` holds the cross blocks between the inputs, and the engine,
  which walks from one tensor, takes it in one walk instead of `K` rows.

  `None` where `plan` does not take the engine, where the inputs are not
  distinct or not of one dtype, where an input depends on another
  (the copies would hold it fixed), where an op between has its
  gradient overridden (a copy's gradient would read the model's tensors),
  or where a loop or call between cannot be copied (`loops.unrolled`); the
  rows over the inputs then differentiate `ys`.
  """
  if not plan.may_take_engine or len(xs) < 2:
    return None
  if (
    len({conds.key(x) for x in xs}) < len(xs) or len({x.dtype for x in xs}) > 1
  ):
    return None
  path = [op for x in xs for op in engine.path_ops(x, ys)]
  if any(engine.path_ops(a, [b]) for a in xs for b in xs if a is not b):
    return None
  if any(engine.gradient_overridden(op) for op in path):
    return None
  n = _core.batch_size(xs[0])
  cols = [x.shape[1:].num_elements() for x in xs]
  with tf.compat.v1.name_scope(SCOPE):
    checks = [
      tf.debugging.assert_equal(
        tf.shape(x)[0],
        tf.shape(xs[0])[0],
        message=(
          f"`xs` must have one batch size N; {x.name} and {xs[0].name} were"
          " fed with different ones"
        ),
      )
      for x in xs[1:]
    ]
    flat = [_core.flatten_samples(x, n, k) for x, k in zip(xs, cols)]
    with tf.control_dependencies(checks):
      z = tf.concat(flat, 1, name="joint_input")  # Named in warnings.
    parts = tf.split(z, cols, axis=1)
    values = [
      tf.reshape(part, [-1] + x.shape[1:].as_list())
      for x, part in zip(xs, parts)
    ]
    try:
      copies = loops.unrolled(xs, ys, path, plan.max_unrolled_ops, values)
    except engine.Unsupported:
      return None
  # Where a copy reads the model's tensors that depend on `xs`, some of the
  # model was not copied, and the Hessians over `z` would miss its terms.
  model = {conds.key(t) for op in path for t in op.outputs}
  model.update(conds.key(x) for x in xs)
  read = list(copies) + [
    t for op in engine.path_ops(z, copies) for t in op.inputs
  ]
  if any(conds.key(t) in model for t in read):
    return None
  return z, copies


def try_forward(ys, x, grad, mode, plan, unconnected, rows):
  """`(result, True)` from the engine for `x`, or `(None, False)` for rows.

  Warns once when the rows will inherit a wrong second derivative of
  TensorFlow's (`rows_are_exact`). With `rows=None` (`ys` computed through
  a control flow v1 loop, which TensorFlow does not differentiate twice)
  the engine is taken whatever the method, and a model it cannot follow
  raises `ValueError` saying so. See `_try_forward` for the rest.

  Raises:
    LookupError: when the rows are to be built but TensorFlow has no
      gradient of an op of the gradient graph (`Dilation2DBackpropInput`:
      neither can build the second derivatives), naming it.
  """
  if rows is None:
    # Through a control flow v1 loop: no rows, the engine alone.
    try:
      return _try_forward(
        ys, x, grad, mode, plan.replace(method="forward"), unconnected, rows
      )
    except ForwardUnsupportedError as e:
      exits = [op for op in engine.path_ops(x, ys) if op.type in loops.EXIT]
      loop = exits[-1].name if exits else "a loop"
      raise ForwardUnsupportedError(
        loops.v1_error(loop, e.reason), e.reason
      ) from None
  result = _try_forward(ys, x, grad, mode, plan, unconnected, rows)
  missing = None if result[1] else _without_gradient(x, grad)
  if missing is not None:
    engine_too = (
      ", and the forward engine cannot follow the model (see the warning)"
      if plan.method == "auto"
      else "; method='auto' takes the forward engine where it can follow"
      " the model"
    )
    raise LookupError(
      f"no second derivatives of `ys` with respect to {x.name}:"
      f" TensorFlow has no gradient of {missing.type} ({missing.name}), which"
      f" the row loop differentiates{engine_too}."
    )
  if not result[1]:
    # Auto takes the engine wherever the rows are inexact (`choose`): here
    # it could not follow the model.
    engine_too = (
      " the forward engine, exact there, cannot follow the model (see its"
      " warning)"
      if plan.method == "auto"
      else " method='forward' is exact there, where it can follow the model"
    )
    tensorflow_rows(ys, x, grad, plan, f"the rows for {x.name}", engine_too)
  return result


def tensorflow_rows(ys, x, grad, plan, what, engine_too):
  """Readies TensorFlow's second derivatives of `ys` through `grad` for
  `what`, which is to differentiate them: the curvature through
  `tf.nn.moments` where `plan` gives it (`differentiate_moments_for_rows`),
  and a warning once per reason where they inherit a wrong gradient of
  TensorFlow's (`rows_are_exact`); `engine_too` says what of the engine."""
  differentiate_moments_for_rows(ys, [x], plan)
  for t in _inexact_gradients(ys, x, grad):
    reason = _INEXACT_SECOND_DERIVATIVES[t]
    if t != _BATCH_MEAN:  # The engine cannot differentiate that either.
      reason = f"{reason};{engine_too}"
    _core.warn_once(x.graph, f"tf1hess: {what} differentiate {reason}.")


def _try_forward(ys, x, grad, mode, plan, unconnected, rows):
  """`(result, True)` from the engine for `x`, or `(None, False)` for rows.

  Under `method="auto"` the engine first walks a copy of the model
  (`dry_run`), and `choose` compares its estimated cost with the rows';
  the engine's ops are added to the graph of `ys` only when it is taken,
  for some batch sizes (`Choice.switch`: then `rows()` too, and a
  `tf.cond` on N runs one of them) or for all.

  Args:
    ys: the list of outputs.
    x: the input `Tensor` `(N, d...)`.
    grad: `d sum(ys) / dx` (not `None`).
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.
    plan: the call's `tf1hess.Plan`; its `method`: `"forward"`, `"auto"`
      (the engine when it can follow the model and `choose` takes it), or
      another (the rows).
    unconnected: a `tf.UnconnectedGradients`.
    rows: a callable that builds the row loop's result, a `Tensor` shaped
      like this function's; `rows(model=(ys_copy, x_copy), plan=plan)`
      builds it with `plan` on a copy of the model (in a branch of a
      `tf.cond`).

  Returns:
    `(result, True)` with `result` shaped like the row loop's (`None` when
    the second derivative is unconnected and `unconnected` is NONE), or
    `(None, False)` when the row loop is to build it.

  Raises:
    ValueError: with `method="forward"`, when the engine cannot follow an op.
  """
  if not plan.may_take_engine:
    return None, False
  method = plan.method
  path = engine.path_ops(x, ys)
  if loops.on_path(path):
    # The walk follows the model with its loops unrolled; the rows
    # differentiate the model.
    try:
      ys = loops.unrolled(x, ys, path, plan.max_unrolled_ops)
    except engine.Unsupported as e:
      _unsupported(x, method, e)
      return None, False
    path = engine.path_ops(x, ys)
  if conds.on_path(path):
    return _try_forward_with_conds(
      ys, x, grad, mode, plan, unconnected, path, rows
    )
  walked = planned = None
  if method == "auto":
    try:
      walked = dry_run(ys, x, mode)
    except engine.Unsupported as e:
      _unsupported(x, method, e)
      return None, False
    if walked is not None:
      choice = choose(ys, x, grad, mode, walked, plan)
      if choice.switch is not None and not _rows_fit_in_cond(x, grad):
        choice = Choice(True)
      if choice.engine or choice.switch is not None:
        planned = chunks.plan(x, ys, walked)
      if _chunks_past_a_small_switch(choice, planned):
        choice = Choice(True)
      if choice.switch is not None and walked.connected:
        try:
          return (
            _by_batch_size(ys, x, mode, choice, rows, planned, walked, plan),
            True,
          )
        except engine.Unsupported as e:
          _unsupported(x, method, e)
          return None, False
      if not choice.engine:
        return None, False
  elif chunks.may_chunk(x, ys):
    # A walk of a copy, to plan chunks from; where it cannot follow the
    # model, the walk below raises.
    with contextlib.suppress(engine.Unsupported):
      planned = chunks.plan(x, ys, dry_run(ys, x, mode))
  try:
    real = _walk(ys, x, mode, planned)
  except engine.Unsupported as e:
    _unsupported(x, method, e)
    return None, False
  if walked is None and method == "auto":
    # Not copied: decided on the walk in the graph of `ys` (whose ops stay
    # unused when the rows are taken), at one batch size.
    if not prefers_forward(ys, x, grad, mode, real, plan):
      return None, False
  if (
    not real.connected
    and unconnected == tf.UnconnectedGradients.NONE
    and not _shortcuts.Graph(x).depends(grad)
  ):
    return None, True
  return shaped(real.value, x, mode), True


def _choose_on_copy(ys, x, mode, walked, plan):
  """`choose` on a copy of the model in a throwaway graph: whether it takes
  the engine at the static N, or `ASSUMED_BATCH`."""
  graph, x_copy, ys_copy = _copy(x, ys, engine.path_ops(x, ys))
  with graph.as_default():
    (grad,) = tf.gradients(ys_copy, x_copy)
    if grad is None:
      return True
    n = tf.compat.dimension_value(x.shape[0]) if x.shape.rank else None
    choice = choose(ys_copy, x_copy, grad, mode, walked, plan)
  return choice.at(ASSUMED_BATCH if n is None else n)


def _try_forward_with_conds(ys, x, grad, mode, plan, unconnected, path, rows):
  """`_try_forward` for a model with conds on one predicate (`conds`).

  The model's two copies (one per branch, in the graph of `ys`) are each
  walked in their branch of a `tf.cond` on the predicate, so that a run
  walks the branch that the model takes. A branch the engine cannot follow
  (Keras' batch normalization in training: samples mix) gets the rows, as
  the model's gradient takes that branch too. Under `method="auto"` the
  cost model decides once, on the copy of the `False` branch (Keras'
  inference) if the engine follows it, at the static N or
  `ASSUMED_BATCH`. Where a branch holds a custom gradient
  (`conds.custom_gradient_in_branch`), whose second derivatives
  TensorFlow may fail to build or run, the engine is taken without a
  cost: under control flow v1, the rows of the whole model fail when the
  cond takes the other branch, and rows in a branch of the `tf.cond`
  run. Under v2 rows in a branch fail to build (`_rows_fit_in_cond`).
  """
  method = plan.method
  try:
    resolved = conds.Resolved(x, ys, path)
    copies = {branch: resolved.copy(branch) for branch in (False, True)}
  except engine.Unsupported as e:
    _unsupported(x, method, e)
    return None, False
  walks, errors = {}, {}
  for branch, (ys_copy, random) in copies.items():
    try:
      if random:
        raise engine.Unsupported(
          f"{random} is random or stateful, and a copy would not run it as"
          " the model does"
        )
      walks[branch] = dry_run(ys_copy, x, mode)
    except engine.Unsupported as e:
      errors[branch] = e
  fragile = conds.custom_gradient_in_branch(path)
  # Where the rows cannot be built either (TensorFlow has no gradient of an
  # op of the gradient graph), a branch the engine cannot follow raises when
  # a run takes it, instead of failing the build for the other branch.
  missing = _without_gradient(x, grad) if errors else None
  if errors and (
    method == "forward"
    or not walks
    or not _rows_in_a_branch(x, grad, fragile, missing)
  ):
    _unsupported(x, method, next(iter(errors.values())))
    return None, False
  decided = next(iter(walks))
  if (
    method == "auto"
    and fragile is None
    and (
      walks[decided] is None
      or not _choose_on_copy(copies[decided][0], x, mode, walks[decided], plan)
    )
  ):
    return None, False
  if (
    not errors
    and not any(w is None or w.connected for w in walks.values())
    and unconnected == tf.UnconnectedGradients.NONE
    and not _shortcuts.Graph(x).depends(grad)
  ):
    return None, True
  for branch, error in errors.items():
    instead = (
      "the row loop"
      if missing is None
      else f"an error at run time (TensorFlow has no gradient of"
      f" {missing.type}, which the row loop differentiates)"
    )
    _core.warn_once(
      x.graph,
      f"tf1hess: the forward engine falls back to {instead} for {x.name}"
      f" where {resolved.predicate.name} is {branch}: {error}.",
    )

  if errors:
    differentiate_moments_for_rows(ys, [x], plan)

  def branch_fn(branch):
    if branch in errors and missing is not None:
      message = (
        f"no second derivatives of `ys` with respect to {x.name} where"
        f" {resolved.predicate.name} is {branch}: the forward engine cannot"
        f" follow the model there ({errors[branch]}), and TensorFlow has no"
        f" gradient of {missing.type} ({missing.name}), which the row loop"
        " differentiates."
      )
      return lambda: _raising(x, mode, message)
    if branch in errors:
      return rows
    ys_copy = copies[branch][0]
    return lambda: shaped(_walk(ys_copy, x, mode, None).value, x, mode)

  try:
    value = tf.cond(
      resolved.predicate,
      branch_fn(True),
      branch_fn(False),
      name="by_predicate",
    )
  except engine.Unsupported as e:
    _unsupported(x, method, e)
    return None, False
  return value, True
