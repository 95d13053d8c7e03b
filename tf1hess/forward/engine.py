"""The forward engine: per-sample Hessians from forward Jacobians, op by op.

For an input `x` `(N, d...)` and outputs `ys`, the walk visits the ops on a
path from `x` to `ys` in topological order and builds, with the rule of each
op type (`registry.RULES`), the per-sample Jacobian of every tensor on the
way (see `jacobians`). A rule also says how its op curves: the per-sample
Hessian of `sum(ys)` is

  H = sum over nonlinear ops of J_in^T [adj_out . d2 op] J_in,

where `adj_out = d sum(ys) / d out` comes from one ordinary `tf.gradients`
pass for all such ops at once (Dangel et al., "Modular block-diagonal
curvature approximations", AISTATS 2020; the forward Laplacian of Li et al.,
Nature Machine Intelligence 2024, takes the trace of the same sum). The
diagonal and the trace contract the same terms more cheaply.

Linear ops that do not keep samples apart (a sum over the batch, a reshape
that merges it) are followed as "mixed": no Jacobian is needed past them as
long as only linear ops follow. An op without a rule, or a nonlinear op on a
mixed tensor, raises `Unsupported`, and the caller falls back to the row loop.
"""

import collections
import contextlib

import numpy as np
import tensorflow as tf

from tf1hess import _core
from tf1hess import _shortcuts
from tf1hess.forward import jacobians
from tf1hess.forward import reductions
from tf1hess.forward import registry

# Ops through which no gradient flows.
_NO_GRADIENT = _shortcuts.NO_GRADIENT

Unsupported = registry.Unsupported

# What `second_derivatives` returns: the result, whether any op curves, the
# `Work` it estimates for the cost model of `dispatch`, and whether a tensor
# of the walk mixes samples (a sum over the batch axis: `registry.MIXED`).
Result = collections.namedtuple(
  "Result", ["value", "connected", "work", "mixes_samples"]
)


class Work:
  """Estimated work of a computation on a batch of N, from static shapes.

  `flops` (multiply-adds count 2) and `entries` (tensor entries read or
  written, the memory traffic) are each `fixed + N * per_sample`, kept as
  two numbers because N is known only at run time; `ops` counts graph ops
  run. `known` is `False` when a shape the estimate needs is not static.
  """

  def __init__(self):
    self.flops = [0, 0]  # fixed, per sample
    self.entries = [0, 0]
    self.ops = 0
    self.known = True
    # Entries counted for tensors that may not run, and those read instead
    # when they do not: `(tensor, (fixed, per_sample), (fixed,
    # per_sample))` (`drop_unrun`).
    self.maybe_unrun = []
    # The Jacobians' values with their entries per sample, and the most of
    # those that run (`drop_unrun`): what a chunk of samples holds at once.
    self.jacobians = []
    self.largest = None
    # The pushes whose Jacobians' values may not run: a folded matmul
    # reads only their scales (`jacobians.scale_chain`), no term reads
    # those past the last curvature. `(values, work)` (`drop_unrun`).
    self.pushes = []

  def add(self, flops=(0, 0), entries=(0, 0), ops=0):
    """Adds `(fixed, per_sample)` pairs of flops and entries, and ops."""
    for total, more in ((self.flops, flops), (self.entries, entries)):
      if more is None:
        self.known = False
      else:
        total[0] += more[0]
        total[1] += more[1]
    self.ops += ops

  def drop_unrun(self, ran, new_ops):
    """Takes off the work of the `pushes` whose values' ops are in
    `new_ops` but not in `ran`, counts the entries read instead for the
    tensors of `maybe_unrun` whose ops are not in `ran`, and sets `largest`
    from those of `jacobians` that are."""
    dropped = set()
    for values, push in self.pushes:
      if all(t.op in new_ops and t.op not in ran for t in values):
        self.add(
          flops=[-f for f in push.flops], entries=[-e for e in push.entries]
        )
        dropped.update(id(item) for item in push.maybe_unrun)
    self.pushes = []
    self.maybe_unrun = [i for i in self.maybe_unrun if id(i) not in dropped]
    for t, (fixed, per_sample), instead in self.maybe_unrun:
      if t.op not in ran:
        self.add(entries=(instead[0] - fixed, instead[1] - per_sample))
    self.maybe_unrun = []
    sizes = [size for t, size in self.jacobians if t.op in ran]
    self.largest = max(sizes, default=0)
    self.jacobians = []

  def at(self, n):
    """`(flops, entries, ops)` at batch size `n`, or `None` if not known."""
    if not self.known:
      return None
    return (
      self.flops[0] + n * self.flops[1],
      self.entries[0] + n * self.entries[1],
      self.ops,
    )

  def __repr__(self):
    return (
      f"Work(flops={self.flops}, entries={self.entries}, ops={self.ops}, "
      f"known={self.known})"
    )


def sample_size(shape, batch=None):
  """The entries per sample of a tensor of static `shape`, or `None`.

  Those after its first axis, the batch axis of most tensors (a weight
  matrix counts one row); but where the batch size `batch` is static and
  the first axis is not it while exactly one other axis is (a time-major
  `(T, N, F)`), all but that axis. `batch` is `None` for tensors that do
  not depend on x (a weight matrix whose columns are as many as the
  samples). (Where N is not static, the estimates of `dispatch` are made on
  a copy of the model where it is.)
  """
  if shape.rank is None:
    return None
  dims = shape.as_list()
  if batch is not None and dims and dims[0] not in (None, batch):
    inner = [i for i, d in enumerate(dims) if d == batch]
    others = [d for i, d in enumerate(dims) if i not in inner]
    if len(inner) == 1 and None not in others:
      return int(np.prod(others, dtype=np.int64))
  return jacobians.static_size(shape[1:])


# Ops whose outputs are views of their inputs: TensorFlow copies nothing.
VIEWS = frozenset(
  """EnsureShape ExpandDims Identity IdentityN PreventGradient Reshape
  Snapshot Squeeze StopGradient""".split()
)


def op_flops(op, batch=None):
  """Flops of `op` per sample, or `None` if unknown (`batch`: see
  `sample_size`).

  Products: 2 per multiply-add; convolutions (`_CONVOLUTIONS`)
  `_CONV_FLOP_WEIGHT` times that; views (`VIEWS`): none; any other op: one
  per entry of its outputs (a transcendental function costs more, but
  moves its entries as well, which `entries` counts).
  """
  if op.type in VIEWS:
    return 0
  outs = [sample_size(t.shape, batch) for t in op.outputs if t.shape.rank]
  if any(size is None for size in outs):
    return None
  out = sum(outs)
  inner = _inner_length(op)
  if inner is None:
    return out
  weight = _CONV_FLOP_WEIGHT if op.type in _CONVOLUTIONS else 1
  return 2 * out * inner * weight


_CONV_BACKPROP_INPUT = frozenset(
  """Conv2DBackpropInput Conv3DBackpropInputV2
  DepthwiseConv2dNativeBackpropInput""".split()
)
_CONVOLUTIONS = _CONV_BACKPROP_INPUT | {
  "Conv2D",
  "Conv3D",
  "DepthwiseConv2dNative",
}
# Convolutions ran at 19 to 57 GFlop/s on this machine (a width-3 kernel,
# 8 channels, batches of 256 to 4096; matmuls of the same flops 87 to 150),
# where the cost model (`dispatch._SECONDS_PER_FLOP`, fitted on models of
# matmuls and elementwise ops, whose entries carry most of their time)
# prices a flop at 2.6e-12 s: a convolution's flops count 10 times.
_CONV_FLOP_WEIGHT = 10


def _inner_length(op):
  """The length of the sums in each output entry of a product, or `None`."""

  def dim(t, axis):
    return tf.compat.dimension_value(t.shape[axis]) if t.shape.rank else None

  if op.type == "MatMul":
    return dim(op.inputs[0], 0 if op.get_attr("transpose_a") else 1)
  if op.type.startswith("BatchMatMul"):
    return dim(op.inputs[0], -2 if op.get_attr("adj_x") else -1)
  if op.type in ("Conv2D", "Conv3D", "DepthwiseConv2dNative"):
    kernel = op.inputs[1].shape
    kept = -2 if op.type == "DepthwiseConv2dNative" else -1
    return jacobians.static_size(kernel[:kept]) if kernel.rank else None
  if op.type in _CONV_BACKPROP_INPUT:
    # Each entry of the input's gradient sums over the kernel's window and
    # its output channels (or multiplier): all of the kernel but the input
    # channels (stride 1; larger strides sum over fewer).
    kernel = op.inputs[1].shape
    if kernel.rank is None or not kernel.is_fully_defined():
      return None
    dims = kernel.as_list()
    return int(np.prod(dims[:-2] + dims[-1:], dtype=np.int64))
  if op.type == "Einsum":
    equation = op.get_attr("equation").decode().replace(" ", "")
    if "->" not in equation or "." in equation:
      return None
    operands, result = equation.split("->")
    sizes = {}
    for sub, t in zip(operands.split(","), op.inputs):
      if t.shape.rank != len(sub):
        return None
      sizes.update(zip(sub, t.shape.as_list()))
    summed = [sizes[c] for c in set(sizes) - set(result)]
    if any(s is None for s in summed):
      return None
    return int(np.prod(summed, dtype=np.int64)) if summed else 1
  return None


def _jacobian_entries(jac):
  """`(fixed, per_sample)` entries of a `jacobians.Jacobian`, or `None`."""
  if isinstance(jac, registry.Moved):
    jac = jac.jacobian
  if not isinstance(jac, jacobians.Jacobian):
    return (0, 0)
  shape = jac.value.shape
  if jac.diagonal:
    size = jacobians.static_size(shape[1:])
    batch_of_one = tf.compat.dimension_value(shape[0]) == 1
    if size is None:
      return None
    return (size, 0) if batch_of_one else (0, size)
  size = jacobians.static_size(shape[1:] if not jac.shared else shape)
  if size is None:
    return None
  return (size, 0) if jac.shared else (0, size)


def _materialize(jac, work):
  """`jacobians.materialize(jac)`, adding the work of writing it."""
  if not isinstance(jac, jacobians.Jacobian) or not jac.diagonal:
    return jac
  jac = jacobians.materialize(jac)
  work.add(entries=_jacobian_entries(jac))
  return jac


def _push(op, ins, outs, work, group=1):
  """Adds the work of pushing the Jacobians `ins` of `op` to `outs`.

  On tensors of `group` rows per sample, each sample's work is `group`
  times a row's.
  """
  if op.type in VIEWS:
    return
  flops = op_flops(op)
  out_size = sum(
    jacobians.static_size(t.shape[1:]) or 0 for t in op.outputs if t.shape.rank
  )
  per_entry = flops / out_size if flops and out_size else 1
  mine = Work()
  for j in ins:
    size = _jacobian_entries(j)
    mine.add(entries=size)
    _unwritten(j, size, group, mine)
  for j in outs:
    size, rows = _jacobian_entries(j), 1
    if isinstance(j, registry.Regrouped):
      j, size, rows = j.jacobian, _jacobian_entries(j.jacobian), j.group / group
    if size is not None:
      size = (size[0], rows * size[1])
    mine.add(
      flops=None if size is None else [s * per_entry for s in size],
      entries=size,
    )
    _unwritten(j, size, group, mine)
    if isinstance(j, jacobians.Jacobian) and size is not None:
      mine.jacobians.append((j.value, group * size[1]))
  if not mine.known:
    work.known = False
  mine.flops[1] *= group
  mine.entries[1] *= group
  work.add(flops=mine.flops, entries=mine.entries)
  work.maybe_unrun.extend(mine.maybe_unrun)
  work.jacobians.extend(mine.jacobians)
  values = [
    j.value
    for j in outs
    if isinstance(j, jacobians.Jacobian) and j.parts is None
  ]
  if values and len(values) == len(outs) and mine.known:
    # A rule may read the scales of these instead (a matmul by weights
    # of `sin(tanh(x W))`), or nothing may read them: then their values do
    # not run.
    work.pushes.append((values, mine))


def _unwritten(jac, size, group, work):
  """Adds the `size` of `jac`'s value to `work.maybe_unrun` where `jac` has
  unwritten `parts`: only a rule that reads the value writes it, and a sum
  of the parts reads their bases and factors instead (about as many
  flops)."""
  if not (isinstance(jac, jacobians.Jacobian) and jac.parts and size):
    return
  instead = Work()
  for base, factor in jac.parts:
    instead.add(entries=_jacobian_entries(base))
    if isinstance(factor, tf.Tensor):  # Else 1, or a number.
      instead.add(entries=_factor_entries(factor, jac.entry_rank))
  if instead.known:
    work.maybe_unrun.append(
      (
        jac.value,
        (size[0], group * size[1]),
        (instead.entries[0], group * instead.entries[1]),
      )
    )


def _factor_entries(factor, entry_rank):
  """`(fixed, per_sample)` entries of a `factor` that broadcasts against
  `(N, *e)` (`entry_rank` axes `e`), or `None`: per sample when it has the
  batch axis, not of size 1."""
  shape = factor.shape
  if shape.rank is None:
    return None
  batched = (
    shape.rank == entry_rank + 1 and tf.compat.dimension_value(shape[0]) != 1
  )
  count = jacobians.static_size(shape[1:] if batched else shape)
  if count is None:
    return None
  return (0, count) if batched else (count, 0)


def _ran_ops(value, new_ops):
  """The ops of `new_ops` that running `value` runs."""
  ran, stack = set(), [value.op]
  while stack:
    op = stack.pop()
    if op in ran or op not in new_ops:
      continue
    ran.add(op)
    stack.extend(t.op for t in op.inputs)
    stack.extend(op.control_inputs)
  return ran


def _differentiable(t):
  """Whether a gradient can flow through `t`: not an integer, bool, string.

  Variant and resource tensors count: a `tf.scan` passes its values to its
  loop in a variant tensor list, and the loop op (which has no rule) must
  be seen as depending on `x`, not skipped.
  """
  dtype = t.dtype.base_dtype
  return not (dtype.is_integer or dtype.is_bool or dtype == tf.string)


def _dependent_tensors(x, within, stops=frozenset()):
  """The tensors of the ops `within` that a gradient can flow to from `x`,
  and the outputs of the `StopGradient`s of `tf.nn.moments` but for
  `stops` (`reductions.stops_a_variance_mean`: there the stop changes no
  first derivative, and drops curvature)."""
  out, stack = {_key(x)}, [x]
  while stack:
    t = stack.pop()
    for op in t.consumers():
      if op not in within or (
        op.type in _NO_GRADIENT
        and (op in stops or not reductions.stops_a_variance_mean(op))
      ):
        continue
      for o in op.outputs:
        if _differentiable(o) and _key(o) not in out:
          out.add(_key(o))
          stack.append(o)
  return out


def _key(t):
  return (t.op.name, t.value_index)


def _path(x, ys):
  """`(path_ops(x, ys), the dependent tensors)`.

  A `StopGradient` of `tf.nn.moments` is followed only where every op of
  the path that reads it is a variance about the mean it stops, or
  TensorFlow's gradient of one (`reductions.variance_of`): not where the
  model reads it otherwise.
  """
  stops, upstream = set(), _core.ancestor_ops(ys)
  while True:
    dependent = _dependent_tensors(x, upstream, stops)
    path = _ordered_ops(x, ys, dependent)
    on_path = set(path)
    wrong = {
      op
      for op in path
      if op.type == "StopGradient"
      and any(
        use in on_path and not reductions.variance_of(use, op, on_path)
        for use in op.outputs[0].consumers()
      )
    }
    if not wrong:
      return path, dependent
    stops |= wrong


def path_ops(x, ys):
  """The ops the walk visits: on a path from `x` to `ys`, inputs first."""
  return _path(x, ys)[0]


def gradient(ys, x):
  """`d sum(ys) / dx` by the walk's adjoint pass (`_adjoints`), which has
  its own gradients of some ops TensorFlow has none of (`SoftsignGrad`, in
  the forces of a softsign model)."""
  return _adjoints(ys, [x], path_ops(x, ys))[0]


def needs_own_gradient(ys, x):
  """Whether TensorFlow's gradient of an op from `x` to `ys` is missing or
  wrong, and the walk's adjoint pass has its own (`registry.FIRST_ORDER`):
  then `gradient`."""
  path = path_ops(x, ys)
  return any(
    op.type in registry.FIRST_ORDER
    and registry.ADJOINTS[op.type](op, path) is not None
    for op in path
  )


def stopped_means(x, ys, path=None):
  """The `StopGradient`s of `tf.nn.moments` that the walk follows from `x`
  to `ys` (on `path`, their `path_ops` if given), where TensorFlow's
  second derivatives miss the curvature through the mean (`reductions.
  stops_a_variance_mean`), but for those that a walk made differentiable
  (`_differentiate_stops`)."""
  return [
    op
    for op in (path_ops(x, ys) if path is None else path)
    if op.type == "StopGradient" and not differentiated(op)
  ]


def differentiated(op):
  """Whether `op`, a `StopGradient`, has the identity as its gradient in
  TensorFlow (`_differentiate_stops`)."""
  return op._gradient_function is _identity_gradient  # pylint: disable=protected-access


def differentiate_stops_for_rows(x, ys):
  """Where TensorFlow's rows of `ys` are to be built: makes their
  curvature through the means that `tf.nn.moments` stops from `x` to `ys`
  exact, as the walk's (`_differentiate_stops` of `stopped_means`).

  The rows differentiate the first derivative, whose gradient of each
  variance, `2 adj (u - stop_gradient(m))`, reads the stop: with the
  identity as its gradient, the rows take the curvature through `m`
  (whenever the first derivative was built). Not where `ys` read such a
  gradient themselves (forces of a normalized network: a `Sub` of the
  stop on the way to `ys`): the first derivative then holds the model's
  second derivatives, which missed the curvature when it was built, and
  the rows stay TensorFlow's, which `stopped_means` still reports. Nor
  where the mean is over the batch axis (a batch normalization in
  training): that model mixes samples, and has no per-sample Hessians to
  make exact.
  """
  path = path_ops(x, ys)
  stops = [
    op
    for op in stopped_means(x, ys, path)
    if reductions.stops_a_mean_within_samples(op)
  ]
  on_path = set(path)
  if not any(
    use.type == "Sub" and use in on_path
    for stop in stops
    for use in stop.outputs[0].consumers()
  ):
    _differentiate_stops(stops)


def _identity_gradient(op, grad):
  del op  # Unused.
  return grad


def _differentiate_stops(path):
  """Gives the `StopGradient`s of `tf.nn.moments` that the walk followed
  (those of `path`) the identity as their gradient in TensorFlow.

  The walk takes them as the identity, the derivative of the function
  the model computes; the result reads their outputs (in its Jacobians and
  adjoints), and TensorFlow's derivatives of it (with respect to weights,
  to train on it) must read them the same way, or they miss what flows
  through the mean. The model's own first derivatives stay the same (the
  stop holds back zero there), and TensorFlow's second derivatives of it
  built from then on are exact (`stopped_means` leaves these stops out).
  """
  for op in path:
    if op.type == "StopGradient":
      op._gradient_function = _identity_gradient  # pylint: disable=protected-access


# Elementwise functions that cost several plain entries each (measured on
# (4096, 512): `sin` 8, `exp` 6, `tanh` 2 times the time of `x * x`), and
# those that cost more (`Pow` with an exponent known only at run time, as
# in TensorFlow's gradient of `Pow`: 6 to 25 times).
_TRANSCENDENTAL = frozenset(
  """Asinh Atan Cos Cosh Digamma Elu Erf Erfc Erfinv Exp Expm1 Lgamma Log
  Log1p Ndtri Pow Rsqrt Selu Sigmoid Sin Sinh Softplus Softsign Sqrt Tan
  Tanh""".split()
)
_TRANSCENDENTAL_ENTRIES = 4
_EXTRA_ENTRIES = {"Pow": 20}


def extra_entries(op_type, transcendental=_TRANSCENDENTAL_ENTRIES):
  """The entries more that a function of `op_type` costs per output entry.

  `transcendental` for the functions of `_TRANSCENDENTAL` (their own
  number for those of `_EXTRA_ENTRIES`, unless `transcendental` is 0),
  0 for any other op.
  """
  if not transcendental or op_type not in _TRANSCENDENTAL:
    return 0
  return _EXTRA_ENTRIES.get(op_type, transcendental)


def pass_work(
  ops,
  other_weight=1,
  transcendental=_TRANSCENDENTAL_ENTRIES,
  guess=False,
  batch=None,
):
  """The `Work` per sample of one pass (forward or backward) through `ops`.

  Flops from `op_flops`; entries: every floating input and output, counted
  by its entries per sample (`sample_size` with the static N `batch`: after
  the first axis, a weight matrix one row), and `extra_entries` more per
  output entry of a transcendental function (`transcendental` for most; 0:
  none); the entries of ops other than products weigh `other_weight`;
  views (`VIEWS`) cost nothing. With
  `guess`, a tensor whose size is not static counts as the largest static
  one of its op (TensorFlow's gradients of broadcasts sum over axes known
  only at run time), and unknown flops as none; without, the `Work` is
  then not `known`, unless only inputs are not static: those count as the
  largest output (the labels of a softmax cross-entropy, reshaped by
  TensorFlow to `(None, None)`, are the size of its logits).
  """
  work = Work()
  walked = set(ops)  # Their outputs carry the batch; weights do not.
  for op in ops:
    if op.type in VIEWS:
      continue
    flops = op_flops(op, batch)
    if flops is None and guess:
      flops = 0
    work.add(flops=None if flops is None else (0, flops))
    weight = 1 if _inner_length(op) is not None else other_weight
    extra = extra_entries(op.type, transcendental)
    tensors = [
      (t, scale)
      for t, scale in [(t, 1) for t in op.inputs]
      + [(t, 1 + extra) for t in op.outputs]
      if t.dtype.is_floating and t.shape.rank
    ]
    sizes = [
      sample_size(t.shape, batch if t.op in walked else None)
      for t, _ in tensors
    ]
    outputs = [size for size, (t, _) in zip(sizes, tensors) if t.op is op]
    if guess:
      largest = max([size for size in sizes if size is not None], default=0)
      sizes = [largest if size is None else size for size in sizes]
    elif outputs and None not in outputs:
      sizes = [max(outputs) if size is None else size for size in sizes]
    for size, (_, scale) in zip(sizes, tensors):
      work.add(entries=None if size is None else (0, size * scale * weight))
  return work


def _ordered_ops(x, ys, dependent):
  """Ops with a dependent input on a path to `ys`, inputs before consumers."""
  order, state = [], {}
  stack = [
    (y.op, False) for y in ys if _key(y) in dependent and y.op is not x.op
  ]
  while stack:
    op, done = stack.pop()
    if done:
      if state.get(op) != 2:
        state[op] = 2
        order.append(op)
      continue
    if state.get(op):
      continue
    state[op] = 1
    stack.append((op, True))
    for t in [*registry.followed_inputs(op), *registry.shape_sources(op)]:
      if _key(t) in dependent and t.op is not x.op:
        stack.append((t.op, False))
  return order


class _Context:
  """What a rule sees: the batch size, `K`, and where to put curvature.

  `n` is the number of rows of the tensors the rule reads: the batch size
  `samples`, times `group` where a reshape gave each sample `group` rows
  (`registry.Regrouped`).
  """

  def __init__(self, n, k, dtype, path=(), jacs=None, groups=None):
    self.n = n
    self.samples = n
    self.group = 1
    self.lead_one = False
    self.time_major = False
    self.k = k
    self.dtype = dtype
    self.path = frozenset(path)  # The ops the walk follows.
    self.pending = []  # (tensor, adj -> [Term])
    # The walk's Jacobians and groups (`second_derivatives`), which
    # `batch_first` reads.
    self.jacobians = {} if jacs is None else jacs
    self.groups = {} if groups is None else groups

  def batch_first(self, t):
    """Whether `t` holds the samples along its first axis, one row each:
    a tensor of x whose Jacobian is an ordinary one."""
    key = _key(t)
    return (
      isinstance(self.jacobians.get(key), jacobians.Jacobian)
      and key not in self.groups
    )

  def dense_matmul(self):
    """Marks a matmul of a dense Jacobian (N K rows).

    Nothing to do: the walk's `Work` counts every product from the shapes
    of its Jacobians (`op_flops`).
    """

  def curvature(self, tensor, build, elementwise=False):
    """Adds the terms `build(adj)` of `tensor`'s adjoint `adj` (its shape).

    With `elementwise`, `build` only multiplies `adj` elementwise
    (broadcasting), and may get it with axes of 1 where `tensor` is summed
    (`_summed_by`).
    """
    self.pending.append((tensor, build, elementwise))


# Elementwise ops of several inputs that broadcast as NumPy does: their
# rules follow tensors whose batch axis moved through an `_unmoved_twin`.
# (Those of one input follow `registry.Moved` themselves: `MOVES`.)
_BROADCASTING = frozenset(
  """Add AddV2 AddN Atan2 Div DivNoNan FloorMod Maximum Minimum Mul Pow
  RealDiv SelectV2 SquaredDifference Sub Xdivy Xlog1py Xlogy""".split()
)


def _unmoved_twin(op, ins, groups):
  """`(twin, jacobians, _MovedTwin)` for the elementwise `op` whose inputs
  of `x` are `registry.Moved` by one permutation, or `None`.

  The twin is `op` on its inputs transposed back (the batch axis first),
  each of rank lower than the output given leading axes of 1 first, so
  that it broadcasts as `op` does: its rule follows the moved Jacobians,
  and its outputs' Jacobians are moved again. An input of `x` whose batch
  axis is first (`h` `(N, D)` against states `(T, N, D)`) takes part where
  broadcasting puts its batch axis on the moved one: the twin reads it
  with the axes of 1 and the permutation of the others inserted per
  sample (`_batch_first_twin`).
  """
  if op.type in _REDUCTIONS:
    return _unmoved_reduction(op, ins)
  if op.type in _BATCH_MATMULS:
    return _unmoved_matmul(op, ins)
  if op.type not in _BROADCASTING:
    return None
  moved = [j for j in ins if isinstance(j, registry.Moved)]
  perm = moved[0].perm
  if any(j.perm != perm for j in moved) or any(
    t.shape.rank is None or t.shape.rank > len(perm) for t in op.inputs
  ):
    return None
  rank = len(perm)
  inverse = [int(p) for p in np.argsort(perm)]
  inputs, jacs = [], []
  for t, j in zip(op.inputs, ins):
    if j is None or isinstance(j, registry.Moved):
      if t.shape.rank < rank:
        t = tf.reshape(
          t,
          tf.concat([tf.ones([rank - t.shape.rank], tf.int32), tf.shape(t)], 0),
        )
      inputs.append(tf.transpose(t, inverse))
      jacs.append(None if j is None else j.jacobian)
      continue
    if (
      not isinstance(j, jacobians.Jacobian)
      or _key(t) in groups
      or rank - t.shape.rank != inverse[0]
    ):
      return None  # Its batch axis meets another axis of the moved ones.
    fn = _batch_first_twin(rank - t.shape.rank, inverse)
    inputs.append(fn(t))
    jacs.append(jacobians.apply_per_sample(j, fn))
  outputs = registry.copied_outputs(op, inputs)
  twin = _MovedTwin(perm, inverse, dict(zip(map(_key, outputs), op.outputs)))
  for t, copy, j in zip(op.inputs, inputs, ins):
    if isinstance(j, registry.Moved):
      twin.originals[_key(copy)] = t
  return outputs[0].op, jacs, twin


# Reductions over axes given by their second input, and squeezes: their
# rules follow a `registry.Moved` tensor reduced over axes other than its
# batch axis (a sum or mean over the time axis of time-major states)
# through an `_unmoved_reduction`.
_REDUCTIONS = frozenset("EuclideanNorm Max Mean Min Prod Squeeze Sum".split())


def _unmoved_reduction(op, ins):
  """`(twin, jacobians, _MovedTwin)` for the reduction or squeeze `op` of
  a tensor `registry.Moved` over axes other than its batch axis, or `None`.

  The twin reduces the tensor transposed back (the batch axis first) over
  the same axes; the model's output is the twin's output transposed by
  what is left of the permutation, batch first again where the axes
  before the batch axis are reduced away (`tf.reduce_sum(x_tm, 0)`).
  """
  j = ins[0]
  if not isinstance(j, registry.Moved) or any(i is not None for i in ins[1:]):
    return None
  if op.type == "Squeeze":
    axes = op.get_attr("squeeze_dims") or None
  else:
    axes = tf.get_static_value(op.inputs[1])
  if axes is None:
    return None
  perm, rank = j.perm, len(j.perm)
  axes = sorted({int(a) % rank for a in np.reshape(axes, [-1])})
  if perm.index(0) in axes:
    return None  # Over the batch axis: it mixes samples.
  inverse = [int(p) for p in np.argsort(perm)]
  twin_axes = [perm[a] for a in axes]
  copy = tf.transpose(op.inputs[0], inverse)
  if op.type == "Squeeze":
    outputs, keep = [tf.squeeze(copy, twin_axes)], False
  else:
    twin_axes = tf.constant(twin_axes, op.inputs[1].dtype)
    outputs = registry.copied_outputs(op, [copy, twin_axes])
    keep = op.get_attr("keep_dims")
  left = perm
  if not keep:
    kept = [perm[a] for a in range(rank) if a not in axes]
    left = [sorted(kept).index(a) for a in kept]
  twin = _MovedTwin(
    left,
    [int(p) for p in np.argsort(left)],
    dict(zip(map(_key, outputs), op.outputs)),
  )
  return outputs[0].op, [j.jacobian] + [None] * (len(ins) - 1), twin


_BATCH_MATMULS = frozenset(["BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"])


def _unmoved_matmul(op, ins):
  """`(twin, jacobians, _MovedTwin)` for a matmul of a `registry.Moved`
  tensor by a matrix that does not depend on `x` (`states_tm @ W`), or
  `None`: where the moved tensor's last axis, the one contracted, is its
  own, the twin multiplies the tensor transposed back by the matrix."""
  j = ins[0]
  if (
    not isinstance(j, registry.Moved)
    or ins[1] is not None
    or op.get_attr("adj_x")
    or op.inputs[1].shape.rank != 2
    or j.perm[-1] != len(j.perm) - 1
  ):
    return None
  inverse = [int(p) for p in np.argsort(j.perm)]
  copy = tf.transpose(op.inputs[0], inverse)
  outputs = registry.copied_outputs(op, [copy, op.inputs[1]])
  twin = _MovedTwin(j.perm, inverse, dict(zip(map(_key, outputs), op.outputs)))
  return outputs[0].op, [j.jacobian, None], twin


def _batch_first_twin(lead, inverse):
  """The per-sample map that gives a tensor `(B, *e)` the axes of a twin
  transposed by `inverse`, where broadcasting gives it `lead` leading axes
  of 1 and puts its batch axis at `lead`."""
  # Axis `a` of the broadcast tensor `(1,) * lead + (B, *e)` is this axis
  # of `(B,) + (1,) * lead + e`.
  axis = [a + 1 if a < lead else (0 if a == lead else a) for a in inverse]

  def fn(v):
    shape = tf.shape(v)
    v = tf.reshape(
      v, tf.concat([shape[:1], tf.ones([lead], tf.int32), shape[1:]], 0)
    )
    return tf.transpose(v, axis)

  return fn


class _MovedTwin:
  """The `_Context` of an `_unmoved_twin`, made by calling it with the
  walk's: its curvature terms read the adjoints of the model's tensors
  that the twin's stand for, transposed back."""

  def __init__(self, perm, inverse, originals):
    self.perm = perm
    self._inverse = inverse
    self.originals = originals
    self._ctx = None

  def __call__(self, ctx):
    self._ctx = ctx
    registry.of_samples(self, ctx)
    self.path = ctx.path
    return self

  def moved(self, jacobian):
    """The Jacobian of a twin's output as that of the model's."""
    if jacobian is registry.MIXED:
      return jacobian
    if self.perm[0] != 0:
      return registry.Moved(jacobian, self.perm)
    if self.perm == sorted(self.perm):
      return jacobian
    return jacobians.apply_per_sample(
      jacobian, lambda m: tf.transpose(m, self.perm)
    )

  def dense_matmul(self):
    self._ctx.dense_matmul()

  def curvature(self, tensor, build, elementwise=False):
    del elementwise  # The adjoint is that of the whole tensor.
    original = self.originals.get(_key(tensor))
    if original is None:
      raise Unsupported(f"no adjoint of {tensor.name} of a transposed twin")
    self._ctx.curvature(
      original, lambda adj: build(tf.transpose(adj, self._inverse))
    )


class _GroupedContext:
  """The `_Context` of an op on tensors of `group` rows per sample.

  Its curvature terms are made terms per sample (`jacobians.ungroup_term`).
  `rows` is `registry.Regrouped.rows`.
  """

  def __init__(self, ctx, rows, ungrouped):
    self._ctx = ctx
    self.group, self.lead_one, self.time_major = rows
    self.n = ctx.samples * self.group
    self.samples = ctx.samples
    self.path = ctx.path
    self.k = ctx.k
    self.dtype = ctx.dtype
    self._ungrouped = ungrouped

  def dense_matmul(self):
    self._ctx.dense_matmul()

  def curvature(self, tensor, build, elementwise=False):
    def per_sample(adj):
      return [
        jacobians.ungroup_term(
          t, self.group, self.samples, self._ungrouped, self.time_major
        )
        for t in build(adj)
      ]

    self._ctx.curvature(tensor, per_sample, elementwise)


# The rows of tensors whose rows are samples (see `registry.Regrouped.rows`).
_SAMPLES = (1, False, False)


def _group_of(op, ins, groups):
  """How the rows of the dependent inputs of `op` group (`_SAMPLES`, or
  `registry.Regrouped.rows`)."""
  found = {
    groups.get(_key(t), _SAMPLES)
    for t, j in zip(op.inputs, ins)
    if isinstance(j, jacobians.Jacobian)
  }
  if len(found) > 1:
    raise Unsupported(
      f"{op.type} ({op.name}) combines tensors whose rows are samples with"
      " tensors whose rows are parts of samples (after a reshape that merges"
      " the batch with other axes)"
    )
  rows = found.pop() if found else _SAMPLES
  group, lead_one, _ = rows
  if lead_one and op.type not in registry.LEAD_ONE:
    raise Unsupported(
      f"{op.type} ({op.name}) reads a tensor whose batch axis is its second"
      " (a reshape to (1, N, ...))"
    )
  if group > 1 and not lead_one and op.type not in registry.ROWWISE:
    raise Unsupported(
      f"{op.type} ({op.name}) reads a tensor whose rows are parts of samples"
      " (a reshape merged the batch with other axes, as tf.tensordot does);"
      " only ops that work row by row may follow it"
    )
  return rows


def _identity_jacobian(x, k):
  """The Jacobian of `x` `(N, d...)`: the identity.

  Diagonal (ones `(1, K)`) for `(N, K)` with a static K, else shared,
  `(K, d...)`.
  """
  if x.shape.rank == 2 and tf.compat.dimension_value(x.shape[1]) is not None:
    return jacobians.diagonal(
      jacobians.invariant(lambda: tf.ones([1, x.shape[1]], x.dtype))
    )
  eye = tf.eye(k, dtype=x.dtype)
  return jacobians.shared(
    tf.reshape(eye, jacobians.concat([k], jacobians.dims(x, 1)))
  )


def gradient_overridden(op):
  """Whether `op` has a gradient of its own that its rule may not match
  (`tf.custom_gradient`, `gradient_override_map`)."""
  return registry.gradient_overridden(op) and not (
    registry.exact_custom_gradient(op)
  )


def _set_static_shape(jac, t, x, group=1, lead_one=False):
  """Gives `jac` the static shape that `t` and `x` know (for `fit`)."""
  k = x.shape[1:].num_elements() if x.shape[1:].is_fully_defined() else None
  if jac.diagonal:
    lead = [None]  # N or 1
  else:
    rows = None
    if group == 1 and not lead_one:
      # The rows of `t`: x's samples, or B x theirs in a block of
      # SpaceToBatchND.
      rows = t.shape[0] if t.shape.rank else x.shape[0]
      rows = tf.compat.dimension_value(rows) or x.shape[0]
    lead = [k] if jac.shared else [rows, k]
  if t.shape.rank is None:
    return
  shape = tf.TensorShape(lead).concatenate(t.shape[2 if lead_one else 1 :])
  if not jac.value.shape.is_compatible_with(shape):
    raise Unsupported(
      f"the Jacobian of {t.name} has shape {jac.value.shape}, not {shape}"
    )
  jac.value.set_shape(shape)


def check_input(x):
  """Raises `Unsupported` unless `x` is a graph tensor the walk can start at."""
  if not isinstance(x, tf.Tensor) or not hasattr(x, "op"):
    raise Unsupported(
      f"the input is a {type(x).__name__}, not a graph tensor (variables are"
      " read through ops the walk does not follow)"
    )


def zero_result(n, k, mode, dtype):
  """Zeros shaped like the result of `second_derivatives` for `n` samples
  of `k` features (`int`s or scalar `Tensor`s): `(n, k, k)`, `(n, k)` or
  `(n,)` by `mode`."""
  shape = {
    jacobians.HESSIAN: tf.stack([n, k, k]),
    jacobians.DIAGONAL: tf.stack([n, k]),
    jacobians.LAPLACIAN: tf.reshape(n, [1]),
  }[mode]
  return tf.zeros(shape, dtype)


def _mixed_by(op, mixed_by, lost=False):
  """What mixed the samples of the outputs of `op`, said of the op that did
  (`lost`: `op` reads a moved batch axis that it cannot follow)."""
  if lost:
    return (
      f"{op.type} ({op.name}) reads a tensor whose batch axis a transpose"
      " moved, and cannot follow it there"
    )
  found = [mixed_by[_key(t)] for t in op.inputs if _key(t) in mixed_by]
  if found:
    return found[0]
  return f"{op.type} ({op.name}) sums, reshapes or slices over the batch axis"


@tf.autograph.experimental.do_not_convert
def walked_mode(x, mode):
  """The mode `second_derivatives` walks for `mode` at `x`: `DIAGONAL` for
  the full Hessian `(N, 1, 1)` of one feature, its own diagonal, whose
  contractions are elementwise where the Hessian's are N matmuls of
  `(1, M)` by `(M, 1)` (a PINN's `u_xx`: 1.6x faster, measured); else
  `mode`."""
  if mode == jacobians.HESSIAN and x.shape[1:].num_elements() == 1:
    return jacobians.DIAGONAL
  return mode


def second_derivatives(ys, x, mode):
  """Per-sample Hessians, diagonals or Laplacians of `sum(ys)` by the walk.

  Args:
    ys: a list of `Tensor`s.
    x: a `Tensor` `(N, d...)` of the graph of `ys`.
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.

  Returns:
    A `Result`: `value` a `Tensor` `(N, K, K)`, `(N, K)` or `(N,)` with
    `K = prod(d...)`, in `x.dtype`; `connected` whether any op curves
    (`False`: the value is zeros); `work`, the `Work` the ops built for
    this result do when run, for the cost model of `dispatch`: the pushes
    of the Jacobians, the adjoint pass and the contractions.

  Raises:
    Unsupported: when an op on the way has no rule, or a rule cannot follow
      it; the message says which op and why.
  """
  check_input(x)
  walked_as = walked_mode(x, mode)
  if walked_as != mode:
    walked = second_derivatives(ys, x, walked_as)
    return walked._replace(value=walked.value[:, :, None])
  graph = tf.compat.v1.get_default_graph()  # A cond's branch: not x's.
  ops_before = len(graph.get_operations())
  n = tf.shape(x)[0]
  k = x.shape[1:].num_elements()  # Static where it can be: fewer shape ops.
  if k is None:
    k = tf.reduce_prod(tf.shape(x)[1:])
  path, dependent = _path(x, ys)
  work = Work()
  jacs = {_key(x): _identity_jacobian(x, k)}
  # Rows per sample of the tensors where a reshape changed them, and the
  # Jacobians made per sample again for their terms (`_GroupedContext`).
  groups, ungrouped = {}, {}
  ctx = _Context(n, k, x.dtype, path, jacs, groups)
  mixed = False
  # What mixed the samples of a tensor, said where a nonlinear op reads it.
  mixed_by = {}
  for op in path:
    rule = registry.RULES.get(op.type)
    if rule is None:
      raise Unsupported(f"no forward rule for op type {op.type} ({op.name})")
    if gradient_overridden(op):
      raise Unsupported(
        f"{op.type} ({op.name}) has its gradient overridden "
        "(gradient_override_map): its rule would not match its gradient"
      )
    ins = [
      jacs.get(_key(t)) if _key(t) in dependent else None for t in op.inputs
    ]
    for j in ins:
      if isinstance(j, registry.Unfollowed) and op.type not in j.readers:
        raise Unsupported(f"{op.type} ({op.name}) reads {j.reason}")
    moved = any(isinstance(j, registry.Moved) for j in ins)
    twin = None
    lost = False
    if moved and op.type not in registry.MOVES:
      twin = _unmoved_twin(op, ins, groups)
      lost = twin is None
      if lost:
        ins = [
          registry.MIXED if isinstance(j, registry.Moved) else j for j in ins
        ]
    if twin is not None:
      twin_op, ins, moved_ctx = twin
      if not rule.diagonal:
        ins = [_materialize(j, work) for j in ins]
      outs = rule.fn(twin_op, ins, moved_ctx(ctx))
      _push(twin_op, ins, outs, work)
      outs = [None if j is None else moved_ctx.moved(j) for j in outs]
      rows = _SAMPLES
    elif any(j is registry.MIXED for j in ins):
      linear = rule.linear(op, ins) if callable(rule.linear) else rule.linear
      if not linear:
        raise registry.MixesSamples(
          f"{op.type} ({op.name}) is nonlinear in a tensor that mixes samples"
          f" ({_mixed_by(op, mixed_by, lost)})"
        )
      outs = [registry.MIXED] * len(op.outputs)
      rows = _SAMPLES
    else:
      rows = _group_of(op, ins, groups)
      if not rule.diagonal:
        ins = [_materialize(j, work) for j in ins]
      rule_ctx = ctx
      if rows != _SAMPLES:
        rule_ctx = _GroupedContext(ctx, rows, ungrouped)
      outs = rule.fn(op, ins, rule_ctx)
      if rows != _SAMPLES:
        # A moved batch axis of rows that are parts of samples: not followed.
        outs = [
          registry.MIXED if isinstance(j, registry.Moved) else j for j in outs
        ]
      _push(op, ins, outs, work, rows[0])
    mixed = mixed or any(j is registry.MIXED for j in outs)
    for t, j in zip(op.outputs, outs):
      if j is registry.MIXED:
        mixed_by[_key(t)] = _mixed_by(op, mixed_by, lost)
      out = rows
      if isinstance(j, registry.Regrouped):
        j, out = j.jacobian, j.rows
      if j is not None and _key(t) in dependent:
        if isinstance(j, jacobians.Jacobian):
          _set_static_shape(j, t, x, *out[:2])
        if out != _SAMPLES:
          groups[_key(t)] = out
        jacs[_key(t)] = j

  _differentiate_stops(path)

  def zeros():
    value = zero_result(n, k, mode, x.dtype)
    work.ops += len(graph.get_operations()) - ops_before
    return Result(value, False, work, mixed)

  if not ctx.pending:
    return zeros()
  # An elementwise op's adjoint is taken after the sum or mean that is its
  # output's only use: one entry per summed group, not broadcast.
  sums = [_summed_by(t, ctx.path, ys) if e else None for t, _, e in ctx.pending]
  adjoints = _adjoints(
    ys,
    [
      t if summed is None else summed[0].outputs[0]
      for (t, _, _), summed in zip(ctx.pending, sums)
    ],
    ctx.path,
  )
  grouped = {}
  batch = tf.compat.dimension_value(x.shape[0])
  for (t, build, _), adj, summed in zip(ctx.pending, adjoints, sums):
    if summed is not None:
      adj = _adjoint_before(summed, t, adj)
    for whole in build(adj):
      whole = jacobians.pulled_back(whole, n)
      for term in jacobians.by_summands(whole, mode, batch):
        key = (id(term.a), id(term.b), term.symmetric)
        if key in grouped:
          old = grouped[key]
          term = jacobians.Term(
            old.c + jacobians.in_dtype(term.c, old.c.dtype),
            old.a,
            old.b,
            old.symmetric,
          )
        grouped[key] = term

  def deferred(term):
    # A symmetric term's Hessian `X + X^T`: its `X` is summed with the
    # others', then transposed once.
    return (
      mode == jacobians.HESSIAN
      and term.symmetric
      and not (term.a.diagonal and term.b.diagonal)
      and not jacobians.symmetric_outer(term, mode, batch)
    )

  if not grouped:
    # Ops that may curve did not here (`x / 2`: a division by a constant).
    return zeros()
  terms = [_summed_over_broadcasts(t, n, x, work) for t in grouped.values()]
  if mode == jacobians.HESSIAN:
    terms = _merged_by_factor(terms, n, x, work)
  parts, halves = [], []
  together, terms_apart = _together(terms, mode, batch)
  for group in together:
    value = jacobians.contract_outer_of_shared(group, n, k)
    parts.append(tf.cast(value, x.dtype))
  diagonals = []  # Of full Hessians, `(N, K)`: added to the sum's diagonal.
  for term in terms_apart:
    if mode == jacobians.HESSIAN and term.a.diagonal and term.b.diagonal:
      value = jacobians.contract(term, jacobians.DIAGONAL, n, k)
      diagonals.append(tf.cast(value, x.dtype))
      continue
    half = deferred(term)
    value = jacobians.contract(term, mode, n, k, half, batch)
    value = tf.cast(value, x.dtype)
    (halves if half else parts).append(value)
  if halves:
    half = tf.add_n(halves)
    parts.append(half + tf.transpose(half, [0, 2, 1]))
  value = jacobians.plus_diagonal(
    tf.add_n(parts) if parts else None,
    tf.add_n(diagonals) if diagonals else None,
  )
  # The adjoints: one backward pass, about the work of the forward one.
  backward = pass_work(path, batch=tf.compat.dimension_value(x.shape[0]))
  work.add(flops=backward.flops, entries=backward.entries)
  if not backward.known:
    work.known = False
  for term in terms:
    _contract_work(term, mode, x, batch, work)
  out = {jacobians.HESSIAN: 2, jacobians.DIAGONAL: 1}.get(mode, 0)
  size = jacobians.static_size(x.shape[1:])
  # The sum of the parts, and of the halves with their transpose.
  sums = len(parts) + (len(halves) + 1 if halves else 0)
  work.add(entries=None if size is None else (0, sums * size**out))
  # Not the values of Jacobians that only their parts or scales were read
  # of, or that nothing reads.
  new_ops = graph.get_operations()[ops_before:]
  built = set(new_ops)
  work.drop_unrun(_ran_ops(value, built), built)
  work.ops += len(new_ops)
  return Result(value, True, work, mixed)


def _adjoints(ys, targets, path):
  """`d sum(ys) / d t` for each of `targets` (zeros where unconnected),
  where the ops of `path` whose TensorFlow gradient is not the one the
  walk differentiates have theirs (`registry.ADJOINTS`).

  Those are the `StopGradient` of `tf.nn.moments` that the walk follows
  into TensorFlow's gradient of a variance (the identity there:
  `reductions.variance_of`), a max pool's gradient (TensorFlow's
  `MaxPoolGradGrad` is wrong for some pools), and TensorFlow's gradients
  of softsign and of resizes (it has no gradient of them, or declares it
  none). One backward pass, in which each of those ops takes its own
  `vjp` (`_own_gradients`): the work of the model's gradient, however many
  of them the model has.
  """
  vjps = {}
  for op in path:
    vjp = registry.ADJOINTS.get(op.type, lambda op, path: None)(op, path)
    if vjp is not None:
      vjps[op] = vjp
  with _own_gradients(vjps):
    return tf.gradients(
      ys, targets, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )


@contextlib.contextmanager
def _own_gradients(vjps):
  """Within the block, TensorFlow's gradients take `vjps[op]` as the
  gradient of each op of `vjps`: `vjp(adj) -> [(input, adjoint)]`, from
  `adj`, the adjoint of the op's output.

  The op's own gradient function (`Operation._gradient_function`, which
  `ops.get_gradient_function` reads first) is set for the block and put
  back after it: the graph is not changed.
  """

  def gradient(op, adj):
    adjoints = [None] * len(op.inputs)
    for t, t_adj in vjps[op](adj):
      for i, u in enumerate(op.inputs):
        if _key(u) == _key(t):
          adjoints[i] = t_adj if adjoints[i] is None else adjoints[i] + t_adj
    return adjoints

  before = {op: op._gradient_function for op in vjps}  # pylint: disable=protected-access
  try:
    for op in vjps:
      op._gradient_function = gradient  # pylint: disable=protected-access
    yield
  finally:
    for op, fn in before.items():
      op._gradient_function = fn  # pylint: disable=protected-access


def _summed_by(tensor, path, ys):
  """`(op, axes)`: the `Sum` or `Mean` over constant axes within samples
  that is the only use of `tensor` among the ops `path` (on the way to
  `ys`: other uses add nothing to its adjoint), `tensor` not being one of
  `ys` itself; or `None`."""
  consumers = [op for op in tensor.consumers() if op in path]
  if len(consumers) != 1 or any(tensor is y for y in ys):
    return None
  op = consumers[0]
  if op.type not in ("Sum", "Mean") or op.inputs[0] is not tensor:
    return None
  try:
    axes = reductions.reduction_axes(op)
  except registry.Unsupported:  # Axes known only at run time.
    return None
  if not axes or 0 in axes:
    return None
  return op, axes


def _adjoint_before(summed, tensor, adj):
  """The adjoint of `tensor` from `adj`, that of the sum or mean `summed`
  (`_summed_by`) of it: `adj` with the summed axes kept as 1, which a
  term's `c` of it broadcasts as the sum's gradient would, and which lets
  `jacobians.contract` sum the factors over them before multiplying."""
  op, axes = summed
  adj = reductions.with_axes_kept(adj, tensor, axes)
  if op.type == "Mean":
    adj = adj / tf.cast(reductions.count(tensor, axes), adj.dtype)
  return adj


# The least static K for which terms are merged by a shared factor: below,
# a batched matmul `(K, M) x (M, K)` per sample costs about the elementwise
# passes that merging adds.
_MERGE_MIN_K = 8


def _together(terms, mode, batch):
  """`(groups, apart)`: the lists of two or more full-Hessian terms (of one
  dtype) of two factors shared by all samples, which
  `jacobians.contract_outer_of_shared` contracts as one matmul, and the
  other terms."""
  by_dtype = collections.defaultdict(list)
  apart = []
  for term in terms:
    if (
      term.a.shared
      and term.b.shared
      and jacobians.outer_of_shared(term, mode, batch)
    ):
      by_dtype[term.a.value.dtype].append(term)
    else:
      apart.append(term)
  groups = []
  for group in by_dtype.values():
    if len(group) > 1:
      groups.append(group)
    else:
      apart.extend(group)
  return groups, apart


def _merged_by_factor(terms, n, x, work):
  """`jacobians.merged_by_factor(terms, n)` for a static K of at least
  `_MERGE_MIN_K`, adding its work: `c` times a factor, summed, `(N, K, M)`
  for each term merged."""
  k = jacobians.static_size(x.shape[1:])
  if k is None or k < _MERGE_MIN_K:
    return terms
  merged = jacobians.merged_by_factor(terms, n)
  for term in terms:
    if all(term is not t for t in merged):
      m = jacobians.static_size(term.a.value.shape[term.a.lead :])
      work.add(entries=None if m is None else (0, 3 * k * m))
  return merged


def _summed_over_broadcasts(term, n, x, work):
  """`jacobians.summed_over_broadcasts(term, n)`, adding its work: `c`
  times the other factor, `(N, K, *e)`, summed."""
  summed = jacobians.summed_over_broadcasts(term, n)
  if summed is not term and term.a is not term.b:
    k = jacobians.static_size(x.shape[1:])
    m = jacobians.static_size(term.a.value.shape[term.a.lead :])
    work.add(entries=None if None in (k, m) else (0, 3 * k * m))
  return summed


def _contract_work(term, mode, x, batch, work):
  """Adds the work of `jacobians.contract(term, mode, ...)`."""
  k = jacobians.static_size(x.shape[1:])
  m = jacobians.static_size(term.a.value.shape[term.a.lead :])
  if k is None or m is None:
    work.known = False
    return
  out = {jacobians.HESSIAN: k * k, jacobians.DIAGONAL: k}.get(mode, 1)
  if term.a.diagonal and term.b.diagonal:
    # Elementwise products of two (N, M) factors, summed to (N, K): a full
    # Hessian adds them to its diagonal (`jacobians.plus_diagonal`).
    work.add(entries=(0, 3 * m + min(out, k)))
    return
  if jacobians.outer_of_shared(term, mode, batch):
    # The products `(K K, M)`, written and read once; `c` and the output.
    work.add(flops=(0, 2 * k * k * m), entries=(2 * k * k * m, m + out))
    return
  gram = jacobians.laplacian_gram(term, mode)
  if gram is not None:
    # `F^T G F` per entry (`jacobians.Gram`): `F` read twice, `G F` written.
    r = gram.size
    work.add(flops=(0, 2 * m * r * (r + 1)), entries=(r * r * m, 3 * m * r + m))
    return
  inner = k * m * (k if mode == jacobians.HESSIAN else 1)
  work.add(flops=(0, 2 * inner))
  for jac in (term.a, term.b):
    # Diagonal factors are materialized: K times their entries.
    size = _jacobian_entries(jac)
    scale = k if jac.diagonal else 1
    work.add(
      entries=None if size is None else (scale * size[0], scale * size[1])
    )
  work.add(entries=(0, m + out))
