"""The registry of forward rules, keyed by op type.

A rule is a small function `rule(op, jacs, ctx) -> [Jacobian or None]`, one
per output of `op`, in the spirit of `@ops.RegisterGradient`: `jacs` holds
the Jacobian of each input (`None` when it does not depend on the input of
the walk), and the rule adds the op's curvature with `ctx.curvature(out,
build)`, where `build(adj)` returns `jacobians.Term`s once the adjoint `adj`
of `out` is known (`elementwise=True` when `build` only multiplies `adj`
elementwise: it may then get `adj` with axes of 1 where `out` is summed).
A rule returns `MIXED` for an output that no longer keeps samples apart,
and raises `Unsupported` when it cannot follow the op.
"""

import collections

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import execute  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_util_v2  # pylint: disable=g-direct-tensorflow-import

try:  # TensorFlow 2.13 and later.
  from tensorflow.python.eager import record as _tape  # pylint: disable=g-direct-tensorflow-import
except ImportError:
  from tensorflow.python.eager import tape as _tape  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _core
from tf1hess.forward import jacobians


class Unsupported(ValueError):
  """The forward engine cannot follow an op; the message says why."""


class MixesSamples(Unsupported):
  """An op combines the samples nonlinearly (a product, an extremum or a
  norm over the batch axis, a function of a sum over it), or may: a
  gather along the batch axis only moves them."""


class _Mixed:
  """The Jacobian marker of a tensor that mixes samples (a batch sum)."""

  def __repr__(self):
    return "MIXED"


MIXED = _Mixed()


class Unfollowed:
  """The Jacobian marker of an output a rule does not follow.

  The walk raises `Unsupported` (with `reason`) only if an op on the way
  to `ys` reads it, other than one of the op types `readers`, whose rules
  do not need it (they recompute what it holds).
  """

  def __init__(self, reason, readers=()):
    self.reason = reason
    self.readers = frozenset(readers)


class Moved:
  """The Jacobian marker of a tensor whose batch axis is not its first.

  The tensor is `tf.transpose(b, perm)` of a tensor `b` whose batch axis is
  first and whose Jacobian is `jacobian` (Keras' recurrent layers with
  `unroll=True` go time-major, `(T, N, F)`, and unstack the time steps).
  Only `MOVES` ops read it: a transpose, an unstack, a reverse, a slice or
  gather that takes the batch axis whole (time-major code's `x_tm[t]`),
  which bring the batch axis first again or keep the tensor `Moved`. Other
  ops take it as mixing samples (`MIXED`).
  """

  def __init__(self, jacobian, perm):
    self.jacobian = jacobian
    self.perm = [int(p) for p in perm]


# Op types whose rules read `Moved` Jacobians.
MOVES = set()


def moves(*op_types):
  """Declares that the rules of `op_types` read `Moved` (see `MOVES`)."""
  _declare(MOVES, op_types)


def _declare(kind, op_types):
  """Adds `op_types`, each with a rule, to the set `kind`."""
  unknown = set(op_types) - set(RULES)
  if unknown:
    raise ValueError(f"No forward rules for {sorted(unknown)}.")
  kind.update(op_types)


Rule = collections.namedtuple("Rule", ["fn", "linear", "diagonal"])

RULES = {}

# Op types whose rules follow tensors whose rows are parts of samples (see
# `Regrouped`): they treat the first axis as rows, whatever those are.
ROWWISE = set()


def rowwise(*op_types):
  """Declares that the rules of `op_types` work row by row (`ROWWISE`)."""
  _declare(ROWWISE, op_types)


class Regrouped:
  """What a rule returns for an output whose rows group differently.

  A reshape `(N, *e) -> (N G, *e')` (as `tf.tensordot` and Keras `Dense`
  on rank-3 inputs build) gives each sample G rows: `jacobian` is
  `(N G, K, *e')`, row `n G + g` holding part `g` of sample `n`, and
  `group` is G. Only `ROWWISE` ops may follow such a tensor; the walk
  regroups their curvature by sample. A reshape back gives `group` 1.

  With `lead_one`, the tensor is `(1, N G, *e')`: the rows are its second
  axis, behind an axis of 1 (Keras `LayerNormalization` reshapes to `(1,
  N G, M, 1)` for a fused batch normalization whose channels are the
  rows); only `LEAD_ONE` ops may follow it.

  With `time_major`, row `g N + n` holds part `g` of sample `n`: the
  reshape of a time-major tensor `(T, N, *e)` to `(T N, *e)` (TF1 recurrent
  code's `tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, F])` before
  `tf.split(..., T, 0)` or a dense layer). `jacobian` is `(T N, K, *e')`,
  its rows in the same order. A reshape back to `(T, N, *e')` gives a
  `Moved` `jacobian` of `group` 1.
  """

  def __init__(self, jacobian, group, lead_one=False, time_major=False):
    self.jacobian = jacobian
    self.group = group
    self.lead_one = lead_one
    self.time_major = time_major

  @property
  def rows(self):
    """How the rows group: `(group, lead_one, time_major)`."""
    return (self.group, self.lead_one, self.time_major)


def of_samples(inner, ctx):
  """Gives `inner`, a context that stands for the walk's `ctx` on tensors
  whose rows are samples (a twin's, a composition's), `ctx`'s sizes."""
  inner.n, inner.samples, inner.k, inner.dtype = (
    ctx.n,
    ctx.samples,
    ctx.k,
    ctx.dtype,
  )
  inner.group, inner.lead_one, inner.time_major = 1, False, False


# Op types whose rules follow tensors `(1, N G, *e')` (see `Regrouped`).
LEAD_ONE = (
  frozenset("Reshape FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3".split())
  | _core.TAPED_GRADIENTS
)


def register(*op_types, linear=False, diagonal=False):
  """Registers the decorated rule for `op_types`.

  Args:
    *op_types: `str` op types (`"Tanh"`, ...).
    linear: `bool`, or a callable `(op, jacs) -> bool`: the op is linear
      in its inputs that depend on `x`, with coefficients that do not, so
      that it may follow a tensor that mixes samples (its outputs then mix
      them too).
    diagonal: `bool`: the rule keeps diagonal Jacobians (see `jacobians`);
      other rules receive them materialized.

  Returns:
    The decorator.
  """

  def decorate(fn):
    for op_type in op_types:
      if op_type in RULES:
        raise ValueError(f"A forward rule for {op_type} exists already.")
      RULES[op_type] = Rule(fn, linear, diagonal)
    return fn

  return decorate


# Op types whose TensorFlow gradient the walk's adjoint pass must not take
# (`engine._adjoints`), each with `fn(op, path)`: `None` where it may
# (`path` the walk's ops), or `vjp(adj) -> [(input, adjoint)]` that gives
# the adjoints of `op`'s inputs from `adj`, that of its output.
ADJOINTS = {}
# The op types of `ADJOINTS` whose TensorFlow gradient is missing or wrong
# (not only its derivative): the first derivatives of models with them are
# taken by the adjoint pass too (`engine.needs_own_gradient`).
FIRST_ORDER = set()


def adjoint(*op_types, first_order=True):
  """Registers the decorated `fn(op, path)` of `ADJOINTS` for `op_types`,
  and with `first_order` in `FIRST_ORDER`."""

  def decorate(fn):
    for op_type in op_types:
      ADJOINTS[op_type] = fn
      if first_order:
        FIRST_ORDER.add(op_type)
    return fn

  return decorate


def of_first_input(rule):
  """A rule `rule(op, j, ctx)` of ops whose first input alone may depend on x.

  `j` is that input's Jacobian; an op whose first input does not depend on
  x has no Jacobian.
  """

  def wrapped(op, jacs, ctx):
    if any(j is not None for j in jacs[1:]):
      raise Unsupported(
        f"{op.type} ({op.name}) has an input other than the first that "
        "depends on x"
      )
    if jacs[0] is None:
      return [None] * len(op.outputs)
    return rule(op, jacs[0], ctx)

  return wrapped


# Integer ops that `fold` evaluates where `tf.get_static_value` does not.
FOLDED = {
  "Add": np.add,
  "AddV2": np.add,
  "Sub": np.subtract,
  "Mul": np.multiply,
  "FloorDiv": np.floor_divide,
  "FloorMod": np.mod,
  "Maximum": np.maximum,
  "Minimum": np.minimum,
  "Neg": np.negative,
  "Identity": lambda v: v,
  # TensorFlow's gradient of a transpose inverts its permutation.
  "InvertPermutation": np.argsort,
}
# Other ops that `fold` evaluates: `tf.repeat` reshapes its count to a
# scalar and stacks it into the multiples of a `Tile`.
_FOLDED_SHAPES = ("Range", "Pack", "ConcatV2", "Reshape")
# How many ops deep `fold` looks.
_FOLD_DEPTH = 8


def fold(t, depth=_FOLD_DEPTH):
  """The value of an integer tensor computed from constants, or `None`.

  `tf.get_static_value`, with the arithmetic it leaves out: TensorFlow's
  wrappers build axes and permutations at run time from static ranks
  (`tf.nn.softmax` over an axis other than the last transposes by a
  permutation made of `range` and `rank(logits) - 1`).
  """
  value = tf.get_static_value(t)
  if value is not None or depth == 0 or not t.dtype.is_integer:
    return value
  op = t.op
  if op.type not in FOLDED and op.type not in _FOLDED_SHAPES:
    return None
  values = [fold(u, depth - 1) for u in op.inputs]
  if any(v is None for v in values):
    return None
  if op.type == "Range":
    value = np.arange(*values)
  elif op.type == "Pack":
    value = np.stack(values, axis=op.get_attr("axis"))
  elif op.type == "ConcatV2":
    value = np.concatenate(values[:-1], axis=int(values[-1]))
  elif op.type == "Reshape":
    value = np.reshape(*values)
  else:
    value = FOLDED[op.type](*values)
  return np.asarray(value, dtype=t.dtype.as_numpy_dtype)


def _shape_source(s):
  """The tensor whose shape `s` is (a `Shape`, an output of `ShapeN`), or
  `None`."""
  if s.op.type == "Shape":
    return s.op.inputs[0]
  if s.op.type == "ShapeN":
    return s.op.inputs[s.value_index]
  return None


# An entry of a shape vector known only at run time, but for N (`None`).
_UNKNOWN = "unknown"


def _entries(t, batch_first, depth=_FOLD_DEPTH):
  """The entries of a shape vector or scalar `t`, or `None` where it is not
  read from shapes and constants: `int`s, `None` for the first axis of a
  tensor `u` with `batch_first(u)`, `_UNKNOWN` for other entries static
  shapes do not know.

  Followed through `Shape`, `ShapeN`, plain slices (those that take one
  entry too, and `tf.slice`s), scalars made vectors, concatenations, stacks
  of scalars, gathers by constant indices, stitches and products of static
  entries.
  """
  value = fold(t)
  if value is not None:
    return [int(v) for v in np.reshape(value, [-1])]
  rank = t.shape.rank
  if depth == 0 or rank not in (0, 1) or not t.dtype.is_integer:
    return None
  u = _shape_source(t)
  if u is not None:
    return _shape_entries(u, batch_first, depth - 1)
  op = t.op

  def inner(i):
    return _entries(op.inputs[i], batch_first, depth - 1)

  if op.type == "StridedSlice":
    return _sliced(op, inner(0))
  if op.type == "Slice":
    # `tf.slice(shape, [rank - 1], [1])`: the last entry (TensorFlow's
    # softmax cross-entropy flattens its logits to rows of it).
    entries, begin, size = inner(0), fold(op.inputs[1]), fold(op.inputs[2])
    if entries is None or begin is None or size is None or len(begin) != 1:
      return None
    start, size = int(begin[0]), int(size[0])
    return entries[start:] if size == -1 else entries[start : start + size]
  if op.type in ("ExpandDims", "Reshape") and op.inputs[0].shape.rank == 0:
    return inner(0)  # A scalar as a vector of one entry (`zero_state`).
  if op.type == "ConcatV2" and fold(op.inputs[-1]) == 0:
    parts = [inner(i) for i in range(len(op.inputs) - 1)]
    return None if None in parts else sum(parts, [])
  if op.type == "Pack" and op.get_attr("axis") == 0:
    parts = [inner(i) or [_UNKNOWN] for i in range(len(op.inputs))]
    return sum(parts, [])
  if op.type == "GatherV2" and fold(op.inputs[2]) == 0:
    entries, indices = inner(0), fold(op.inputs[1])
    if entries is None or indices is None:
      return None
    return [entries[int(i)] for i in np.reshape(indices, [-1])]
  if op.type == "DynamicStitch":
    half = len(op.inputs) // 2
    merged = {}
    for part in range(half):
      indices, data = fold(op.inputs[part]), inner(half + part)
      if indices is None or data is None:
        return None
      merged.update(zip((int(i) for i in np.reshape(indices, [-1])), data))
    if sorted(merged) != list(range(len(merged))):
      return None
    return [merged[i] for i in range(len(merged))]
  if op.type in FOLDED or op.type == "Prod":
    # Arithmetic of static entries (`tf.repeat`'s `shape(u)[1] * repeats`).
    parts = [inner(i) for i in range(len(op.inputs))]
    if any(p is None or not all(isinstance(e, int) for e in p) for p in parts):
      return None
    if op.type == "Prod":
      # Of a vector: over its only axis, or over none.
      value = np.prod(parts[0], dtype=np.int64) if parts[1] else parts[0]
    else:
      ranks = [[-1] if i.shape.rank else [] for i in op.inputs]
      value = FOLDED[op.type](*map(np.reshape, parts, ranks))
    return [int(v) for v in np.reshape(value, [-1])]
  return None


# Ops whose output's first axis is that of their inputs of its rank
# (broadcasting): elementwise functions and arithmetic, as a recurrent
# cell computes them from its zero initial state.
_ELEMENTWISE = frozenset(
  """Abs Add AddV2 BiasAdd BiasAddV1 Cast Cos Elu Exp Identity IsFinite
  LeakyRelu Log Maximum Minimum Mul Neg OnesLike RealDiv Relu Relu6 Rsqrt
  Select SelectV2 Selu Sigmoid Sin Softplus Softsign Sqrt Square
  SquaredDifference StopGradient Sub Tanh ZerosLike""".split()
)

# Reductions: their output's first axis is their input's where the axes
# they reduce leave the first one out (the maximum `tf.reduce_logsumexp`
# subtracts, a mean over features kept for broadcasting).
_REDUCTIONS = frozenset("All Any Max Mean Min Prod Sum".split())


def _made_to(u):
  """`(shape, firsts)`: the shape vector the op of `u` makes it to (a
  `Reshape`, `BroadcastTo` or `Fill`), else `None`; the inputs whose first
  axis `u`'s first axis is (`_ELEMENTWISE`, a `MatMul`'s first factor, the
  value of a split or the parts of a concatenation along another axis, the
  input of a reduction over other axes).
  """
  op = u.op
  if op.type in ("Reshape", "BroadcastTo"):
    return op.inputs[1], []
  if op.type == "Fill":
    return op.inputs[0], []
  rank = u.shape.rank
  # Input of the axis, and the inputs split or concatenated along it.
  along = {"Split": (0, [1]), "SplitV": (2, [0]), "ConcatV2": (-1, None)}
  if op.type in along:
    axis, parts = along[op.type]
    axis = fold(op.inputs[axis])
    if rank is None or axis is None or int(axis) % rank == 0:
      return None, []
    if parts is None:
      return None, list(op.inputs)[:-1]
    return None, [op.inputs[i] for i in parts]
  if op.type == "MatMul" and not op.get_attr("transpose_a"):
    return None, [op.inputs[0]]
  if op.type in _REDUCTIONS:
    axes, in_rank = fold(op.inputs[1]), op.inputs[0].shape.rank
    if axes is None or not in_rank or 0 in np.reshape(axes, [-1]) % in_rank:
      return None, []
    return None, [op.inputs[0]]
  if op.type in _ELEMENTWISE:
    return None, [t for t in op.inputs if t.shape.rank == rank]
  return None, []


# Ops whose first output has the shape of their first input: a layer
# normalization's fused batch normalization, whose shape its gradient reads.
_SHAPED_LIKE_INPUT = frozenset(
  ["FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"]
)


def _shaped_like(u):
  """The input whose shape `u` has (`_SHAPED_LIKE_INPUT`), or `None`."""
  if u.op.type in _SHAPED_LIKE_INPUT and u.value_index == 0:
    return u.op.inputs[0]
  return None


def shape_made(u):
  """Whether `_shape_entries` reads `u`'s shape from its op's inputs
  (`_made_to`, `_shaped_like`): then a copy of the model copies that op
  (`dispatch`)."""
  shape, firsts = _made_to(u)
  return shape is not None or bool(firsts) or _shaped_like(u) is not None


def _shape_entries(u, batch_first, depth):
  """The entries of `u`'s shape, as `_entries` gives them: static shapes;
  N where `batch_first(u)`; else, where static shapes do not know them,
  for a tensor made to a shape (a `Reshape`, `Fill` or `BroadcastTo`, as
  TensorFlow's gradients make them from the shapes of the model's
  tensors), the entries of that shape, and the first axis of the inputs
  that carry it (`_made_to`; N where one is N and the others N or 1)."""
  if u.shape.rank is None:
    return None
  dims = [_UNKNOWN if d is None else d for d in u.shape.as_list()]
  if dims and dims[0] is _UNKNOWN and batch_first(u):
    dims[0] = None
  if _UNKNOWN not in dims or depth == 0:
    return dims
  like = _shaped_like(u)
  if like is not None:
    inner = _shape_entries(like, batch_first, depth - 1)
    if inner is not None and len(inner) == len(dims):
      dims = [i if d is _UNKNOWN else d for d, i in zip(dims, inner)]
    return dims
  shape, firsts = _made_to(u)
  if shape is not None:
    made = _entries(shape, batch_first, depth - 1)
    if made is not None and -1 not in made and len(made) == len(dims):
      dims = [m if d is _UNKNOWN else d for d, m in zip(dims, made)]
  if dims[0] is _UNKNOWN and firsts:
    carried = set()
    for t in firsts:
      entries = _shape_entries(t, batch_first, depth - 1)
      carried.add(_UNKNOWN if not entries else entries[0])
    if None in carried and carried <= {None, 1}:
      dims[0] = None
    elif len(carried) == 1:
      dims[0] = carried.pop()
  return dims


def sample_shape(s, batch_first):
  """The entries of a shape vector `s`, static but for the batch size N
  (`None`) of tensors that hold the samples first, a row each
  (`batch_first(u)`), or `None`.

  TensorFlow's gradients read the shapes of the model's tensors at run
  time where N is not static (`reshape(sum(g, axes), shape(a))`, the
  slices of a concatenation's gradient, the shape a sum's gradient
  reshapes to, stitched from `shape(u)` and ones): with N the only
  unknown, and the same in every tensor of samples, what they compute is
  known (see `_entries`).
  """
  entries = _entries(s, batch_first) if s.shape.rank == 1 else None
  if entries is None or _UNKNOWN in entries:
    return None
  return entries


def shape_sources(op):
  """The tensors whose shapes the integer inputs of `op` read (a `Shape`
  of them, up to `_FOLD_DEPTH` integer ops back: see `sample_shape`): a
  walk reaches them before `op`, to know whether they hold the samples
  first."""
  sources, seen = [], set()
  stack = [(t, _FOLD_DEPTH) for t in op.inputs if t.dtype.is_integer]
  while stack:
    t, depth = stack.pop()
    if t.ref() in seen:
      continue
    seen.add(t.ref())
    u = _shape_source(t)
    if u is None and depth > 0:
      stack += [(i, depth - 1) for i in t.op.inputs if i.dtype.is_integer]
    # And the tensors whose shapes `u` is made to (`_shape_entries`).
    made = [] if u is None else [(u, depth)]
    while made:
      u, depth = made.pop()
      if u.ref() in seen:
        continue
      seen.add(u.ref())
      sources.append(u)
      if depth > 0:
        shape, firsts = _made_to(u)
        if shape is not None:
          stack.append((shape, depth - 1))
        made += [(t, depth - 1) for t in firsts]
        like = _shaped_like(u)
        if like is not None:
          made.append((like, depth - 1))
  return sources


def broadcast_reductions(t, batch_first):
  """The value of an output `t` of a `BroadcastGradientArgs` of shapes of
  `sample_shape`, or `None`.

  TensorFlow's gradient of a broadcasting op (`a * b`, ...) sums over the
  axes that `BroadcastGradientArgs` gives for the shapes of `a` and `b`,
  then reshapes to them. N is taken larger than 1: at N = 1, TensorFlow
  sums over axes of size 1 (or not), and the reshape after it gives the
  same values.
  """
  op = t.op
  if op.type != "BroadcastGradientArgs":
    return None
  shapes = [sample_shape(s, batch_first) for s in op.inputs]
  if None in shapes:
    return None
  shapes = [[2 if d is None else d for d in shape] for shape in shapes]
  if shapes[0] == shapes[1]:
    return np.zeros([0], t.dtype.as_numpy_dtype)
  rank = max(len(shape) for shape in shapes)
  padded = [[1] * (rank - len(shape)) + shape for shape in shapes]
  axes = [i for i, d in enumerate(padded[t.value_index]) if d == 1]
  return np.asarray(axes, t.dtype.as_numpy_dtype)


def concat_offset(t, batch_first):
  """The value of an output `t` of a `ConcatOffset` (where the gradient of a
  concatenation slices it) of shapes of `sample_shape`, along another axis
  than the batch's, or `None`."""
  op = t.op
  if op.type != "ConcatOffset":
    return None
  axis = fold(op.inputs[0])
  shapes = [sample_shape(s, batch_first) for s in op.inputs[1:]]
  if axis is None or None in shapes or int(axis) == 0:
    return None
  before = [shape[int(axis)] for shape in shapes[: t.value_index]]
  if None in before:
    return None
  offset = [0] * len(shapes[0])
  offset[int(axis)] = sum(before)
  return np.asarray(offset, t.dtype.as_numpy_dtype)


def concat_slice(begin_t, size_t, batch_first):
  """The begin and size of a slice of a concatenation's gradient along
  another axis than the batch's, where one of the concatenated tensors
  holds the samples first (`batch_first`), or `None`.

  The begin is a `ConcatOffset` of the `ShapeN` of the concatenated
  tensors and the size one of those shapes. `ConcatOffset` checks when it
  runs that the shapes agree but along the axis joined, so every tensor
  has the N rows of the one of samples, even one that does not depend on
  x (`tf.concat([x, t], 1)` differentiated with respect to `x`).
  """
  op = begin_t.op
  if op.type != "ConcatOffset" or size_t.op.type != "ShapeN":
    return None
  shapes = list(op.inputs[1:])
  refs = [s.ref() for s in shapes]
  rank = tf.compat.dimension_value(size_t.shape[0])
  axis = fold(op.inputs[0])
  if size_t.ref() not in refs or rank is None or axis is None:
    return None
  axis = int(axis) % rank
  sources = [_shape_source(s) for s in shapes]
  if axis == 0 or None in sources or not any(map(batch_first, sources)):
    return None
  dims = []
  for u in sources:
    if u.shape.rank != rank or None in u.shape.as_list()[1:]:
      return None
    dims.append([None] + u.shape.as_list()[1:])
  offset = [0] * rank
  offset[axis] = sum(d[axis] for d in dims[: begin_t.value_index])
  return offset, dims[refs.index(size_t.ref())]


def partial_shape(t):
  """The entries of a shape vector `t`, each an `int` or `None`, or `None`.

  What `fold` gives, and what it leaves unknown entry by entry: the
  products of static dimensions that `tf.tensordot` reshapes by
  (`prod(gather(shape(a), axes))`) beside those of the batch size.
  """
  entries = _entries(t, lambda u: False) if t.shape.rank == 1 else None
  if entries is None:
    return None
  return [None if e is _UNKNOWN else e for e in entries]


def _sliced(op, entries):
  """`entries[b:e:s]`, or `[entries[b]]` where the slice takes one entry, for
  the plain slice `op` (a `StridedSlice` of a shape vector whose `entries`
  are known), or `None`."""
  masks = [op.get_attr(m) for m in ("ellipsis_mask", "new_axis_mask")]
  begin, end, strides = (fold(u) for u in op.inputs[1:4])
  if (
    entries is None
    or any(masks)
    or any(v is None or np.size(v) != 1 for v in (begin, end, strides))
  ):
    return None
  begin, end, strides = (int(np.ravel(v)[0]) for v in (begin, end, strides))
  if op.get_attr("shrink_axis_mask"):
    return [entries[begin]] if -len(entries) <= begin < len(entries) else None
  begin = None if op.get_attr("begin_mask") & 1 else begin
  end = None if op.get_attr("end_mask") & 1 else end
  return entries[begin:end:strides]


def static_value(t, what, op):
  """The constant value of `t`, or raises `Unsupported` naming `what`."""
  value = fold(t)
  if value is None:
    article = "an" if what[0] in "aeiou" else "a"
    raise Unsupported(
      f"{op.type} ({op.name}) has {article} {what} known only at run time"
    )
  return value


def static_rank(t, op):
  rank = t.shape.rank
  if rank is None:
    raise Unsupported(f"{op.type} ({op.name}) has an input of unknown rank")
  return rank


# Custom gradients that are the exact gradients of the functions they wrap:
# (module, function) where the gradient function is defined. `tf.nn.silu`
# has one only to recompute its sigmoid when backpropagating; its rule
# differentiates `u sigmoid(beta u)` itself.
_EXACT_CUSTOM_GRADIENTS = frozenset(
  [
    ("tensorflow.python.ops.nn_impl", "swish"),
    ("tf1hess.forward.registry", "_silu_gradient"),
  ]
)
# Ops whose integer outputs read only the shapes of their inputs.
SHAPE_READS = frozenset(["Shape", "ShapeN", "Size", "Rank"])
# The gradient of such an `IdentityN` in copies of the model, where the
# custom gradient's function (which reads tensors of the model) cannot run.
COPY_GRADIENT = "Tf1hessSilu"


@tf_ops.RegisterGradient(COPY_GRADIENT)
def _silu_gradient(op, *grads):
  """The gradient of `tf.nn.silu`'s `IdentityN` (`u sigmoid(beta u)`, `u`,
  `beta` of inputs that value, `u`, `beta`), as TensorFlow's own."""
  _, u, beta = op.inputs
  s = tf.sigmoid(beta * u)
  ds = s * (1 - s)
  grad_u, grad_beta = (
    grads[0] * (s + beta * u * ds),
    tf.reduce_sum(grads[0] * u * u * ds),
  )
  if grads[1] is not None:
    grad_u += grads[1]
  if grads[2] is not None:
    grad_beta += grads[2]
  return [None, grad_u, grad_beta]


def _gradient_op_type(op):
  try:
    return op.get_attr("_gradient_op_type").decode()
  except ValueError:
    return None


def gradient_overridden(op):
  """Whether `op` has a gradient of its own (`tf.custom_gradient`,
  `gradient_override_map`)."""
  return _gradient_op_type(op) is not None


def exact_custom_gradient(op):
  """Whether `op` is the `IdentityN` of a custom gradient that is the exact
  gradient of the function it wraps (`_EXACT_CUSTOM_GRADIENTS`)."""
  name = _gradient_op_type(op)
  if op.type != "IdentityN" or name is None:
    return False
  try:
    grad_fn = tf_ops._gradient_registry.lookup(name)  # pylint: disable=protected-access
  except LookupError:
    return False
  return _defined_in(grad_fn, _EXACT_CUSTOM_GRADIENTS)


def twin(op, **inputs):
  """`op` built again by its `tf.raw_ops` twin, reading `inputs` (by the
  names of its op def, such as the tangents for `input`) where given and
  its own inputs elsewhere, with its own attrs (but the types, which the
  twin infers from what it reads: tangents may have another dtype)."""
  names = [arg.name for arg in op.op_def.input_arg]
  args = dict(zip(names, op.inputs))
  args.update(inputs)
  attrs = {
    a.name: op.get_attr(a.name)
    for a in op.op_def.attr
    if a.type not in ("type", "list(type)")
  }
  return getattr(tf.raw_ops, op.type)(**args, **attrs)


def on_tangents(op, j):
  """`j` through `op` itself (`twin`): the Jacobian of an op linear in its
  first input that works sample by sample (a resize, a pool, a diagonal),
  the tangents as its first input, a `padding_value` (if any) 0."""
  first = op.op_def.input_arg[0].name
  padding = "padding_value" in [arg.name for arg in op.op_def.input_arg]

  def apply(m):
    zeros = {"padding_value": tf.zeros([], m.dtype)} if padding else {}
    return twin(op, **{first: m}, **zeros)

  return jacobians.apply_per_sample(j, apply)


# The function attributes of the ops that TensorFlow's gradient rewrites.
_BRANCHES = {
  "If": ("then_branch", "else_branch"),
  "StatelessIf": ("then_branch", "else_branch"),
}


def _renamed_branch(op, attr):
  """`op`'s function `attr` as an `AttrValue` naming a copy of it.

  The gradient of a control flow v2 cond rewrites its branches to output
  what the gradient reads, and names them after the branch
  (`cond_true_7_rewritten`). A copy of the cond that shared the model's
  branch functions would have them rewritten under the same names as the
  model's own, and a later gradient of the model would fail ("Attempting
  to add a duplicate function with name: cond_true_7_rewritten").
  """
  value = tf.compat.v1.AttrValue()
  value.CopyFrom(op.node_def.attr[attr])
  graph = control_flow_util_v2.get_func_graph(
    op, [t.shape for t in op.inputs[1:]], value.func.name
  )
  graph.name = f"{value.func.name}_copy_{tf_ops.uid()}"
  # The copy's graph must find the function: where `op` is in the body of
  # a function called by the model (a `tf.function` with a cond), not in
  # a graph around the copy's, the copy's own graph holds it.
  here = tf.compat.v1.get_default_graph()
  if not _core.graph_within(here, op.graph):
    graph.outer_graph = here
  value.func.name = control_flow_util_v2.create_new_tf_function(graph)
  return value


def copied_outputs(op, inputs):
  """The outputs of a copy of `op` in the current graph that reads `inputs`
  (no control inputs), for walks of copies of the model (`chunks`,
  `conds`), which are made in loop bodies and cond branches.

  An exact custom gradient (`tf.nn.silu`'s `IdentityN`) gets TensorFlow's
  own gradient of `u sigmoid(beta u)` instead of its gradient function,
  which reads the model's tensors, and that value from the copy's `u`. A
  tensor added to itself, `u + u`, becomes `2 u`, the same number: in a
  control flow v2 loop body whose gradients are taken, TensorFlow 2.21's
  graph optimizers left the loop without a value ("Retval[0] does not
  have value", tensorflow/tensorflow#22504).
  """
  inputs = list(inputs)
  if op.type in ("Add", "AddV2") and op.inputs[0] is op.inputs[1]:
    return [inputs[0] * tf.constant(2, inputs[0].dtype)]
  attrs = {
    name: value for name, value in op.node_def.attr.items() if name != "_class"
  }
  for name in _BRANCHES.get(op.type, ()):
    attrs[name] = _renamed_branch(op, name)
  if exact_custom_gradient(op):
    # TensorFlow's gradients of the ops of `u sigmoid(beta u)`, through an
    # `IdentityN` of its own gradient: no gradient function of the model's
    # (nor one that a SavedModel would trace without the op, and fail).
    del attrs["_gradient_op_type"]
    _, u, beta = inputs
    inputs[0] = u * tf.sigmoid(beta * u)
  copy = tf.compat.v1.get_default_graph().create_op(
    op.type,
    inputs,
    [t.dtype for t in op.outputs],
    # The model's name under the current scope: messages that name a copy
    # name the model's op too.
    name=op.name,
    attrs=attrs,
  )
  _record(copy)
  return copy.outputs


def _record(op):
  """Records `op` on the `tf.GradientTape`s that are recording, as
  TensorFlow's op functions do and `Graph.create_op` does not: a tape
  would see no path through a copy, and its gradients with respect to the
  weights (of a loss of Hessians) would miss what flows through the copy.
  """
  if not execute.must_record_gradient():
    return

  def backward(*grads):
    function = tf_ops.get_gradient_function(op)  # LookupError: none.
    if function is None:  # Not differentiable.
      return [None] * len(op.inputs)
    result = function(op, *grads)
    return list(result) if isinstance(result, (list, tuple)) else [result]

  _tape.record_operation(op.type, op.outputs, op.inputs, backward)


def followed_inputs(op):
  """The inputs of `op` the walk follows: all but the wrapped result of an
  exact custom gradient (`tf.nn.silu`: `u` and `beta`, whose rule
  differentiates the function; the ops computing it are not walked)."""
  if exact_custom_gradient(op):
    return op.inputs[1:]
  return op.inputs


def _defined_in(fn, places, depth=3):
  """Whether `fn`, or a function it closes over (`depth` levels down), is
  defined in a function of `places`, a set of (module, function name)."""
  qualname = getattr(fn, "__qualname__", "")
  if (getattr(fn, "__module__", None), qualname.split(".")[0]) in places:
    return True
  if depth == 0:
    return False
  for cell in getattr(fn, "__closure__", None) or ():
    try:
      value = cell.cell_contents
    except ValueError:  # An empty cell.
      continue
    if callable(value) and _defined_in(value, places, depth - 1):
      return True
  return False
