"""Runs the forward engine on chunks of the batch, one after another.

The engine's tensors carry the K tangents of every sample: `(N, K, M)` for
a layer of `M` units, 10-20 MB at N = 4096. Every elementwise op and every
contraction reads and writes them from memory, where the row loop's
passes over `(N, M)` stay in cache. Walked on chunks of a few hundred
samples, the same ops keep their tensors in cache: on a 3 x 64 tanh MLP
at N = 4096 (2 CPU cores) that took 24-28% off the Hessians and 5-26% off
the Laplacians (docs/forward.md).

A chunk's walk runs on a copy of the model's ops from `x` to `ys`, made in
a `tf.while_loop` that slices `x`: every other input of those ops is read
as it is, outside the loop. So chunks are only made where that gives each
sample the same values as the whole batch does (`plan`): the ops keep
samples apart (no sum over the batch axis in the walk), do not draw random
numbers or hold state, the model is not inside a control flow construct,
and no input other than `x` may have the batch axis. Chunks are not made
where a GPU is visible: their gain was measured on a CPU's caches, and a
GPU is at its best on the whole batch.
"""

from absl import logging
import numpy as np
import tensorflow as tf

from tf1hess import _core
from tf1hess.forward import engine
from tf1hess.forward import jacobians
from tf1hess.forward import registry

# The bytes of the largest Jacobian of one chunk (samples times the
# entries per sample of the largest Jacobian written), near the 2 MiB
# of one core's L2 cache here: on the 3 x 64 MLP at N = 4096, chunks of 512
# (K = 20) and 1024 (K = 10) were the fastest of 256, 512 and 1024.
CHUNK_BYTES = 2**21
# No chunks smaller than this: each chunk runs all of the engine's ops, at
# a few microseconds each.
MIN_CHUNK = 128
# No chunks larger than this: the whole batch is walked at once where a
# sample's Jacobians are so small (under 2 KiB) that a chunk would hold
# more samples. Those walks were as fast or faster whole (a sigmoid MLP
# 2 x 32 at 8192 x 4, 3.8 ms whole and 4.3 in chunks of 4096; a sine and
# softplus network of 48 units at 8192 x 3, 15.5 and 17.3 ms), where
# larger Jacobians gained (the same network at 2048 x 12, chunks of 1024:
# 9.5 to 8.0 ms; the 3 x 64 tanh MLP at 1024 x 16, chunks of 512: 7.0 to
# 5.5 ms).
MAX_CHUNK = 1024
# Control flow: its ops cannot be copied one by one.
_CONTROL_FLOW = frozenset(
  """Enter RefEnter Exit RefExit Switch RefSwitch Merge RefMerge
  NextIteration RefNextIteration LoopCond While StatelessWhile If
  StatelessIf Case StatelessCase""".split()
)


class Chunks:
  """How to copy the model's ops into a chunk's walk (see `plan`).

  Attributes:
    size: the samples per chunk.
  """

  def __init__(self, x, ys, path, copied, size):
    self.size = size
    self._x, self._ys = x, ys
    self._walked = frozenset(path)
    # The ops copied per chunk, inputs first: the walk's, and the integer
    # ops between them and `x` (shapes read for reshapes).
    self._ops = [op for op in x.graph.get_operations() if op in copied]

  def copy(self, x_chunk):
    """The copies of `ys` where `x` is `x_chunk`, in the current graph."""
    mapped = {_key(self._x): x_chunk}
    for op in self._ops:
      inputs = [mapped.get(_key(t), t) for t in op.inputs]
      outputs = registry.copied_outputs(op, inputs)
      for old, t in zip(op.outputs, outputs):
        # The static shapes that Python code set on the model's tensors
        # (`tf.tensordot` does), but for the batch size.
        shape = old.shape
        if shape.rank and op in self._walked:
          shape = tf.TensorShape([None]).concatenate(shape[1:])
        t.set_shape(shape)
        mapped[_key(old)] = t
    return [mapped[_key(y)] for y in self._ys if _key(y) in mapped]

  def second_derivatives(self, mode):
    """`engine.second_derivatives(ys, x, mode)`, one chunk after another.

    Returns:
      An `engine.Result` whose `value` is the concatenation of the chunks'
      values; `connected` and `work` are those of the first chunk's walk
      (per sample).
    """
    x = self._x
    n = tf.shape(x)[0]
    count = (n + self.size - 1) // self.size
    walks = []
    hoisting = jacobians.Hoisting()

    def body(i, values):
      start = i * self.size
      x_chunk = tf.identity(x[start : start + self.size])
      ys_chunk = self.copy(x_chunk)
      with hoisting:
        walked = engine.second_derivatives(ys_chunk, x_chunk, mode)
      walks.append(walked)
      return i + 1, values.write(i, walked.value)

    k = x.shape[1:].num_elements()
    tail = {jacobians.HESSIAN: [k, k], jacobians.DIAGONAL: [k]}.get(mode, [])
    values = tf.TensorArray(
      x.dtype, size=count, infer_shape=False, element_shape=[None] + tail
    )
    _, values = tf.while_loop(
      lambda i, _: i < count,
      body,
      (tf.constant(0), values),
      parallel_iterations=2,
      name="chunks",
    )
    first = walks[0]
    return first._replace(value=values.concat())


def plan(x, ys, walked):
  """The `Chunks` to walk `x` in, or `None` to walk the whole batch at once.

  Args:
    x: the input `Tensor` `(N, d...)`.
    ys: the list of outputs.
    walked: an `engine.Result` of a walk of the model (on a copy, or
      `None` when there was none).

  Returns:
    A `Chunks`, or `None` when the batch is too small, the sizes are not
    static, a GPU is visible, or the model does not let its samples be
    walked apart (see the module's docstring; the reason is logged at
    INFO).
  """
  if not _apart(walked):
    return None
  path = engine.path_ops(x, ys)
  size = _size(x, path, walked.work.largest)
  return None if size is None else _copies(x, ys, path, size)


def copier(x, ys, walked):
  """A `Chunks` of the whole batch (`size` `None`) for its `copy` of the
  model's ops, or `None` where `plan` could not walk the model in chunks
  for the model's sake (whatever the sizes)."""
  return (
    _copies(x, ys, engine.path_ops(x, ys), None) if _apart(walked) else None
  )


def _apart(walked):
  """Whether the walk `walked` keeps the samples apart (see `plan`)."""
  return walked is not None and walked.connected and not walked.mixes_samples


def _copies(x, ys, path, size):
  """`Chunks(x, ys, path, ..., size)`, or `None` where a chunk cannot be
  walked alone (`_copied_ops`; logged at INFO where chunks are planned)."""
  try:
    copied = _copied_ops(x, path)
  except _Shared as e:
    if size is not None:
      logging.info("tf1hess: the engine walks %s whole: %s.", x.name, e)
    return None
  return Chunks(x, ys, path, copied, size)


def may_chunk(x, ys):
  """Whether `plan` may make chunks for `x`, from the static shapes alone:
  when not, a walk to plan them from is not needed."""
  return _size(x, engine.path_ops(x, ys)) is not None


def _size(x, path, largest=None):
  """The samples per chunk for the walk of the ops `path` (`_chunk_size`),
  or `None` when the sizes are not static, a chunk would hold more than
  `MAX_CHUNK`, a GPU is visible, XLA compiles the graph, or the static
  batch size is under two chunks."""
  size = _chunk_size(x, path, largest) if x.shape.rank else None
  if size is None or size > MAX_CHUNK:
    return None
  batch = tf.compat.dimension_value(x.shape[0]) if x.shape.rank else None
  if batch is not None and batch < 2 * size:
    return None
  if tf.config.list_physical_devices("GPU") or _core.compiled_by_xla():
    return None  # Under XLA, a loop of chunks of N has no bound it knows.
  return size


class _Shared(Exception):
  """Why the samples of a chunk may see other values than in the batch."""


def _chunk_size(x, path, largest=None):
  """Samples per chunk from `CHUNK_BYTES` for the walk of the ops `path`,
  or `None` if sizes are unknown.

  `largest`: the most entries per sample of a Jacobian that the walk wrote
  (`engine.Work.largest`), or `None` (or 0) for K times the entries of the
  largest tensor of `path`. Diagonal Jacobians and unwritten products
  (`Jacobian.parts`) hold fewer: sized for the largest tensor, an RBF
  network's chunks held a tenth of what fits, and the walk in chunks took
  1.6-1.9x the time of the whole batch's.
  """
  k = x.shape[1:].num_elements()
  if not k:
    return None
  entries = 0
  for op in path:
    for t in op.outputs:
      if t.shape.rank:
        entries = max(entries, t.shape[1:].num_elements() or 0)
  if not entries:
    return None
  per_sample = (largest or k * entries) * x.dtype.size
  size = 2 ** int(np.round(np.log2(max(CHUNK_BYTES / per_sample, 1))))
  return max(size, MIN_CHUNK)


def _copied_ops(x, path):
  """The ops a chunk copies: `path`, and the ops between it and `x` that read
  shapes (for reshapes) or compare values sample by sample; raises `_Shared`
  where a chunk cannot be walked alone."""
  batch = tf.compat.dimension_value(x.shape[0])
  for op in path:
    for t in op.outputs:
      lead = tf.compat.dimension_value(t.shape[0]) if t.shape.rank else None
      if batch is None and lead is not None:
        raise _Shared(f"{t.name} has a static batch size, the input none")
      if batch and t.shape.rank and batch in t.shape.as_list()[1:]:
        raise _Shared(f"{t.name} may have the batch axis inside")
  kinds = {x.op: _VALUES}
  kinds.update((op, _VALUES) for op in path)
  copied = set(path)
  stack = list(path)
  while stack:
    op = stack.pop()
    _check_copyable(op)
    for t in registry.followed_inputs(op):
      if _copied_exponent(op, t):
        copied.add(t.op)
        continue
      kind = _kind(t.op, kinds)
      if kind is None and t.dtype.is_integer and _copyable(t.op):
        # Axes, shapes, permutations: rules read their values, which the
        # walk can only fold (`registry.fold`) on the ops that compute them.
        kind = _SHAPES
        if batch and t.op.type == "Const":
          value = np.reshape(tf.get_static_value(t), [-1])
          if np.any((value >= batch) & (value % batch == 0)):
            raise _Shared(f"{t.name} may be a shape with the batch size")
      if kind is None:
        if t.shape.rank is None or (
          t.shape.rank
          and tf.compat.dimension_value(t.shape[0]) in (None, batch)
        ):
          raise _Shared(f"{t.name} may have the batch axis")
      elif t.op not in copied and t.op is not x.op:
        copied.add(t.op)
        stack.append(t.op)
  return copied


def _copied_exponent(op, t):
  """Whether `t`, an input of `op`, is a `Pow`'s scalar constant exponent,
  which a chunk copies into its loop.

  TensorFlow's graph optimizers then see it in the loop body as in the
  model, and take `u ** 3` (an approximate GELU), its derivatives in the
  walk and TensorFlow's gradient of it by products and squares, instead of
  the `Pow` kernel of an exponent captured from outside the loop, which
  costs tens of products per entry (the walk's own derivatives and adjoint
  of the `Pow` take the exponent as a number, `elementwise.
  constant_exponent`).
  """
  return (
    op.type == "Pow"
    and t is op.inputs[1]
    and t.op.type == "Const"
    and t.shape.rank == 0
  )


# What an op's outputs depend on: the values of `x` (the walked ops, and
# `_SAMPLEWISE` ops of them), only its shape (`_SHAPE_READERS`, and ops of
# their results), or neither (`None`: inputs a chunk reads whole).
_VALUES, _SHAPES = "values", "shapes"
# Ops whose outputs depend only on the shapes of their inputs.
_SHAPE_READERS = registry.SHAPE_READS | {"ZerosLike", "OnesLike"}
# Ops that are not walked (no gradient flows through them) but that a chunk
# computes on its own samples as the batch does: elementwise.
_SAMPLEWISE = frozenset(
  """StopGradient PreventGradient Greater GreaterEqual Less LessEqual Equal
  NotEqual LogicalAnd LogicalOr LogicalNot IsNan IsInf IsFinite Sign Floor
  Ceil Round Rint Cast""".split()
)


def _kind(op, kinds):
  """`_VALUES`, `_SHAPES` or `None` for the outputs of `op` (see above)."""
  stack = [(op, False)]
  while stack:
    top, done = stack.pop()
    if top in kinds and not done:
      continue
    if not done:
      kinds[top] = None  # Until its inputs are known; a loop's edge: None.
      stack.append((top, True))
      stack.extend((t.op, False) for t in top.inputs)
      continue
    seen = {kinds.get(t.op) for t in top.inputs}
    if seen <= {None}:
      kinds[top] = None
    elif top.type in _SHAPE_READERS:
      kinds[top] = _SHAPES
    elif _VALUES in seen:
      if top.type not in _SAMPLEWISE:
        raise _Shared(f"{top.type} ({top.name}) reads the input, not walked")
      kinds[top] = _VALUES
    elif top.type == "Cast" and top.outputs[0].dtype.is_floating:
      raise _Shared(
        f"{top.name} makes a number of a shape (it may count samples)"
      )
    else:
      kinds[top] = _SHAPES
  return kinds[op]


def _copyable(op):
  try:
    _check_copyable(op)
  except _Shared:
    return False
  return op.type not in ("Placeholder", "PlaceholderWithDefault")


def _check_copyable(op):
  if op.type in _CONTROL_FLOW or op._control_flow_context is not None:  # pylint: disable=protected-access
    raise _Shared(f"{op.name} is in a control flow construct")
  if op.op_def.is_stateful:
    raise _Shared(f"{op.type} ({op.name}) is stateful or random")
  if any(value.HasField("func") for value in op.node_def.attr.values()):
    raise _Shared(f"{op.type} ({op.name}) calls a function")
  if registry.gradient_overridden(op) and not registry.exact_custom_gradient(
    op
  ):
    raise _Shared(f"{op.type} ({op.name}) has its gradient overridden")


def _key(t):
  return (t.op.name, t.value_index)
