"""Models with loops of a length known when the graph is built: unrolled.

`tf.compat.v1.nn.dynamic_rnn`, `tf.scan`, `tf.map_fn` and `tf.while_loop`
build a `While` op under control flow v2: a function for its condition,
one for its body, and `TensorList`s for their `TensorArray`s. The walk
cannot follow a loop, but where the number of iterations is known when the
graph is built (a sequence of static length), the model is a model
without loops. `unrolled(xs, ys, path)` builds it: the ops from the loops to
`ys`, copied with every loop replaced by its body's ops, once for each
iteration, and every `TensorList` by the Python list of its tensors; the
ops before the loops are not copied.

The number of iterations is found by evaluating the condition on the
copies of the loop's values (`tensor_util.try_evaluate_constant`, which
knows the static dimensions of shapes): a condition that depends on `x` or
on a value known only at run time (the largest `sequence_length` given to
`dynamic_rnn`) is not unrolled, unless the loop has a static bound
(`maximum_iterations`): it is then unrolled to the bound. Control flow v1
loops (`Enter`, `Merge`, `Switch`, `NextIteration`, `Exit` frames, with
`TensorArray`s) are unrolled the same way, from their while context; one
imported from a GraphDef has none and is not.

Function calls (`PartitionedCall`, `StatefulPartitionedCall`: a
`tf.function` called while a graph is built, or a loop that TensorFlow wrapped
in one because a `tf.GradientTape` was recording it) are inlined the same
way: the copy holds their function's ops.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import tensor_util  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_util_v2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import while_v2  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _rows
from tf1hess.forward import conds
from tf1hess.forward import registry

WHILE = frozenset(["While", "StatelessWhile"])
CALLS = frozenset(["PartitionedCall", "StatefulPartitionedCall"])
# The ops by which a control flow v1 loop hands out its values.
EXIT = frozenset(["Exit", "RefExit"])
_ENTER = frozenset(["Enter", "RefEnter"])


def on_path(path):
  """Whether an op of `path` (the walk's ops) is a loop's or calls a
  function."""
  return any(op.type in WHILE | EXIT | CALLS for op in path)


def v1_error(loop, reason=None):
  """The message of the `ValueError` for `ys` computed through the control
  flow v1 loop whose op is named `loop`, which the engine cannot follow for
  `reason` (or which is not for the engine)."""
  if _rows.LOOP_NAME in loop.split("/"):
    return (
      f"`ys` is computed through the row loop of an earlier tf1hess op"
      f" ({loop}: method='while_loop', or 'auto' where it took the rows),"
      " a control-flow-v1 tf.while_loop under"
      " tf.compat.v1.disable_v2_behavior(), and TensorFlow cannot take"
      " second-order gradients through v1 loops. Build that op with"
      " method='auto', 'forward' or 'pfor', or take the derivatives of both"
      " orders in one op: tf1hess.batch_derivatives(ys, xs, order), or"
      " Derivatives."
    )
  engine = (
    f" The forward engine, which differentiates such a loop unrolled where"
    f" its length is known when the graph is built, cannot follow it: {reason}."
    if reason
    else ""
  )
  return (
    "`ys` is computed through a control-flow-v1 tf.while_loop "
    f"({loop}; e.g. tf.compat.v1.nn.dynamic_rnn or tf.scan after "
    "tf.compat.v1.disable_v2_behavior(), or such a model loaded from a "
    "GraphDef), and TensorFlow cannot take second-order gradients through "
    "v1 loops, nor any gradient through one loaded from a GraphDef."
    f"{engine} Call tf.compat.v1.enable_control_flow_v2() right after "
    "disable_v2_behavior(), before building the model (a loaded model: "
    "build it that way and save it again)."
  )


def _while_context(op):
  """The innermost control flow v1 loop that `op` is in, or `None`."""
  return _loop_of(op._control_flow_context)  # pylint: disable=protected-access


def _loop_of(context):
  """The innermost `WhileContext` of `context` and those it is in."""
  while context is not None and not isinstance(
    context, control_flow_ops.WhileContext
  ):
    context = context.outer_context
  return context


def unrolled(xs, ys, path, max_ops, values=None):
  """The copies of `ys` with the loops of `path` (the walk's ops from `xs`,
  a `Tensor` or a list, to `ys`) unrolled and its function calls inlined
  (see module), in the current graph.

  With `values` (a `Tensor` per input), the copies compute `ys` from them in
  place of `xs`: every op that reads one is copied too.

  Raises:
    registry.Unsupported: where a loop's number of iterations is not known
      when the graph is built, unrolling takes more than `max_ops` ops
      (`Plan.max_unrolled_ops`), a loop holds a random or stateful op (a
      copy would draw again), or an op reads a `TensorList` in a way that
      is not unrolled.
  """
  contexts = [_while_context(op.inputs[0].op) for op in path if op.type in EXIT]
  if None in contexts:
    raise registry.Unsupported(
      "a control flow v1 loop was loaded from a GraphDef, which keeps no"
      " while context"
    )
  xs = xs if isinstance(xs, (list, tuple)) else [xs]
  unroller = _Unroller(
    xs, [op for op in path if op.type in WHILE | CALLS] + contexts, max_ops
  )
  for x, value in zip(xs, values or ()):
    unroller.replace(x, value)
  for op in unroller.order(ys):
    unroller.visit(op, inner=False)
  copies = [unroller.value(y) for y in ys]
  if any(isinstance(t, _List) for t in copies):
    raise registry.Unsupported("an output of the model is a TensorList")
  return copies


# The outputs of a loop that no op of the model reads (the accumulators of
# its gradient): not unrolled.
_UNUSED = object()


def _is_variant(t):
  return not isinstance(t, _List) and t.dtype == tf.variant


class _List:
  """A `TensorList` unrolled: its tensors, `None` where none was set."""

  def __init__(self, items):
    self.items = list(items)

  def item(self, index, op):
    if not 0 <= index < len(self.items) or self.items[index] is None:
      raise registry.Unsupported(
        f"{op.name} reads item {index} of a TensorList of"
        f" {len(self.items)} that holds no tensor there"
      )
    return self.items[index]

  def replaced(self, index, value, op):
    if not 0 <= index < len(self.items):
      raise registry.Unsupported(
        f"{op.name} sets item {index} of a TensorList of {len(self.items)}"
      )
    items = list(self.items)
    items[index] = value
    return _List(items)


def _static(t, op, what):
  """The value of `t` (a `Tensor` or a Python number) known when the graph
  is built, as a NumPy value; raises `registry.Unsupported` naming `op`."""
  if isinstance(t, _List):
    raise registry.Unsupported(f"{op.name} reads a TensorList as {what}")
  value = _known(t)
  if value is None:
    raise registry.Unsupported(
      f"{what} of {op.type} ({op.name}) is not known when the graph is built"
    )
  return value


# Functions of integers and booleans that `_known` evaluates.
_NUMPY = {
  **registry.FOLDED,
  "Less": np.less,
  "LessEqual": np.less_equal,
  "Greater": np.greater,
  "GreaterEqual": np.greater_equal,
  "Equal": np.equal,
  "NotEqual": np.not_equal,
  "LogicalAnd": np.logical_and,
  "LogicalOr": np.logical_or,
  "LogicalNot": np.logical_not,
}


def _known(t):
  """The value of the integer or boolean `t` known when the graph is built,
  or `None`: TensorFlow's constant evaluation, or (where that does not
  know static dimensions of shapes, TensorFlow < 2.13) the dimensions a
  slice of a shape takes, through `_NUMPY`'s functions."""
  value = tensor_util.try_evaluate_constant(t)
  if value is not None or not (t.dtype.is_integer or t.dtype == tf.bool):
    return value
  op = t.op
  if op.type == "StridedSlice" and op.inputs[0].op.type == "Shape":
    return _dimension(op)
  if op.type in _NUMPY:
    values = [_known(s) for s in op.inputs]
    if all(v is not None for v in values):
      return np.asarray(_NUMPY[op.type](*values))
  return None


def _dimension(op):
  """The static dimension that the `StridedSlice` `op` takes from a
  shape (`tf.shape(u)[i]`), or `None`."""
  shape = op.inputs[0].op.inputs[0].shape
  begin = tensor_util.constant_value(op.inputs[1])
  if (
    shape.rank is None
    or begin is None
    or begin.shape != (1,)
    or op.get_attr("shrink_axis_mask") != 1
    or op.get_attr("begin_mask") & 1
  ):
    return None
  index = int(begin[0])
  if not -shape.rank <= index < shape.rank:
    return None
  dim = tf.compat.dimension_value(shape[index])
  return (
    None if dim is None else np.asarray(dim, op.outputs[0].dtype.as_numpy_dtype)
  )


def _index(t, op):
  return int(_static(t, op, "the index"))


def _from_tensor(op, inputs):
  tensor = inputs[0]
  n = tf.compat.dimension_value(tensor.shape[0]) if tensor.shape.rank else None
  if n is None:
    raise registry.Unsupported(
      f"{op.name} makes a TensorList of a tensor of unknown length"
      f" {tensor.shape}"
    )
  return [_List(tf.unstack(tensor, num=n))]


def _stack(op, inputs):
  items = inputs[0].items
  if not items or any(t is None for t in items):
    raise registry.Unsupported(f"{op.name} stacks a TensorList with no tensor")
  return [tf.stack(items)]


def _pop_back(op, inputs):
  items = inputs[0].items
  if not items or items[-1] is None:
    raise registry.Unsupported(f"{op.name} pops from an empty TensorList")
  return [_List(items[:-1]), items[-1]]


def _scatter(op, inputs):
  """`TensorArrayScatterV3` (`TensorArray.unstack`): the items of `value`
  set at `indices`."""
  _, indices, value, flow = inputs
  indices = [int(i) for i in _static(indices, op, "the indices")]
  items = list(flow.items)
  for i, item in zip(indices, tf.unstack(value, num=len(indices))):
    if not 0 <= i < len(items):
      raise registry.Unsupported(
        f"{op.name} sets item {i} of a TensorArray of {len(items)}"
      )
    items[i] = item
  return [_List(items)]


def _gather(op, inputs):
  """`TensorArrayGatherV3` (`TensorArray.stack`): the items at `indices`."""
  _, indices, flow = inputs
  indices = [int(i) for i in _static(indices, op, "the indices")]
  return _stack(op, [_List([flow.item(i, op) for i in indices])])


# The `TensorList` ops that an unrolled loop follows: each maps the op and
# its inputs (`_List`s for lists) to its outputs.
_LIST_OPS = {
  "EmptyTensorList": lambda op, inputs: [_List([])],
  "TensorListReserve": lambda op, inputs: [
    _List([None] * _index(inputs[1], op))
  ],
  "TensorListFromTensor": _from_tensor,
  "TensorListGetItem": lambda op, inputs: [
    inputs[0].item(_index(inputs[1], op), op)
  ],
  "TensorListSetItem": lambda op, inputs: [
    inputs[0].replaced(_index(inputs[1], op), inputs[2], op)
  ],
  "TensorListPushBack": lambda op, inputs: [
    _List(inputs[0].items + [inputs[1]])
  ],
  "TensorListPopBack": _pop_back,
  "TensorListStack": _stack,
  "TensorListLength": lambda op, inputs: [
    tf.constant(len(inputs[0].items), tf.int32)
  ],
  # Control flow v1's `TensorArray`s: a list is the array's flow (the
  # handle, read by every op of the array, is not followed).
  "TensorArrayV3": lambda op, inputs: [
    op.outputs[0],
    _List([None] * _index(inputs[0], op)),
  ],
  "TensorArrayScatterV3": _scatter,
  "TensorArrayReadV3": lambda op, inputs: [
    inputs[2].item(_index(inputs[1], op), op)
  ],
  "TensorArrayWriteV3": lambda op, inputs: [
    inputs[3].replaced(_index(inputs[1], op), inputs[2], op)
  ],
  "TensorArrayGatherV3": _gather,
  "TensorArraySizeV3": lambda op, inputs: [
    tf.constant(len(inputs[1].items), tf.int32)
  ],
}


def _function_graphs(op):
  """The condition's and the body's `FuncGraph`s of the `While` `op`."""
  return (
    while_v2._get_graph(op, "cond", "_cond_graph"),  # pylint: disable=protected-access
    while_v2._get_graph(op, "body", "_body_graph"),  # pylint: disable=protected-access
  )


def _read_inputs(graph, outputs):
  """The indices of the inputs of `graph` that `outputs` (tensors of it)
  are computed from."""
  index = {conds.key(t): i for i, t in enumerate(graph.inputs)}
  read = set()
  for op in conds.ancestors_in_order(outputs):
    for t in op.outputs:
      if conds.key(t) in index:
        read.add(index[conds.key(t)])
  for t in outputs:
    if conds.key(t) in index:
      read.add(index[conds.key(t)])
  return read


def _carried(cond, body, wanted):
  """The indices of the loop's values that the outputs `wanted` and the
  condition are computed from, over any number of iterations."""
  needed = set(wanted) | _read_inputs(cond, cond.outputs[:1])
  while True:
    more = _read_inputs(body, [body.outputs[i] for i in needed]) - needed
    if not more:
      return sorted(needed)
    needed |= more


def _kept(alive, new, old, read, op):
  """`new` where the loop is `alive` (a boolean scalar known at run time),
  else `old`; see `_Unroller._iterate`."""
  if new is old:
    return old
  if isinstance(new, _List) or isinstance(old, _List):
    if not read:
      return new
    if (
      not isinstance(new, _List)
      or not isinstance(old, _List)
      or len(new.items) != len(old.items)
    ):
      raise registry.Unsupported(
        f"{op.name}, whose number of iterations is known only at run time,"
        " adds to a TensorArray or TensorList that the model reads after it"
      )
    # An item that no iteration wrote reads as zeros (a `TensorList`'s, and
    # a `TensorArray`'s of a known element shape: `dynamic_rnn`'s outputs
    # after the longest sequence).
    return _List(
      a
      if a is b
      else _kept(alive, b, tf.zeros_like(b) if a is None else a, True, op)
      for a, b in zip(old.items, new.items)
    )
  if not read and (new.dtype.is_integer or new.dtype == tf.bool):
    return new
  return tf.raw_ops.SelectV2(condition=alive, t=new, e=old)


def _consumer(t, types):
  """The op of one of `types` that reads `t`."""
  ops = [op for op in t.consumers() if op.type in types]
  if not ops:
    raise registry.Unsupported(f"no {sorted(types)[0]} reads {t.name}")
  return ops[0].outputs[0]


class _Unroller:
  """Copies the ops that read a copy, unrolling loops."""

  def __init__(self, xs, loops, max_ops):
    self._inputs = {x.op for x in xs}
    self._loops = set(loops)
    self._max_ops = max_ops
    self._mapped = {}
    self._copied = 0
    self._read = set()  # The keys of the tensors that the ops copied read.

  def order(self, outputs, stop=frozenset()):
    """The ops that `outputs` are computed from, inputs first, but for
    those of `stop` (notes what they read: a loop unrolls only the values
    that are read)."""
    ops = conds.ancestors_in_order(outputs, stop)
    self._read.update(conds.key(t) for op in ops for t in op.inputs)
    self._read.update(conds.key(t) for t in outputs)
    return ops

  def replace(self, t, value):
    """Makes `value` the copy of `t`."""
    self._mapped[conds.key(t)] = value

  def value(self, t):
    """The copy of `t`, or `t` itself where it was not copied."""
    return self._mapped.get(conds.key(t), t)

  def visit(self, op, inner):
    """Maps the outputs of `op`: of the graph of `x` (`inner=False`: copied
    only where it reads a copy) or of a loop's function (always copied)."""
    if op in self._inputs:
      return
    if not inner and op.type in EXIT:
      context = _while_context(op.inputs[0].op)
      if (
        context in self._loops
        and _loop_of(context.outer_context) is None  # Not a loop in a loop.
        and conds.key(op.outputs[0]) not in self._mapped
      ):
        self._unroll_v1(context)
      return
    if not inner and _while_context(op) is not None:
      return  # An op of a v1 loop: copied where the loop is unrolled.
    inputs = [self.value(t) for t in op.inputs]
    changed = any(new is not old for new, old in zip(inputs, op.inputs))
    lists = any(isinstance(t, _List) for t in inputs)
    if any(t is _UNUSED for t in inputs):
      raise registry.Unsupported(f"{op.name} reads an output of a loop")
    if op.type in WHILE and (inner or op in self._loops):
      self._map(op, self._unroll(op, inputs))
    elif op.type in CALLS and (inner or op in self._loops):
      self._map(op, self._inline(op, inputs))
    elif op.type in _LIST_OPS and (inner or changed or lists):
      self._map(op, _LIST_OPS[op.type](op, self._lists(op, inputs)))
    elif lists and op.type in ("Identity", "IdentityN"):
      self._map(op, inputs)
    elif lists:
      raise registry.Unsupported(
        f"{op.type} ({op.name}) reads a TensorList of an unrolled loop"
      )
    elif inner or changed:
      self._copy(op, inputs)

  def _copy(self, op, inputs):
    if op.op_def.is_stateful and op.type not in conds.READS:
      raise registry.Unsupported(
        f"{op.type} ({op.name}) is random or stateful, and a copy would draw"
        " again"
      )
    self._count(1)
    outputs = registry.copied_outputs(op, inputs)
    # Counters and indices: constants where they are known, so that the
    # next iteration's ones are not computed from all the ones before.
    for i, t in enumerate(outputs):
      if t.dtype.is_integer or t.dtype == tf.bool:
        value = _known(t)
        if value is not None:
          outputs[i] = tf.constant(value, t.dtype)
    self._map(op, outputs)

  def _count(self, more):
    """Counts `more` ops copied; raises where that makes the copy too
    large (`max_ops`)."""
    if self._copied + more > self._max_ops:
      raise registry.Unsupported(
        f"unrolling the loops (and inlining function calls) takes more than"
        f" {self._max_ops} ops (raise "
        "`tf1hess.Plan(max_unrolled_ops=...)` to unroll them: the graph then "
        "takes longer to build and runs faster)"
      )
    self._copied += more

  def _run(self, graph, values, outputs):
    """The copies of `outputs` of the function `graph` on `values` (its
    inputs' copies)."""
    for inner, value in zip(graph.inputs, values):
      self.replace(inner, value)
    inputs = {conds.key(t) for t in graph.inputs}
    for op in self.order(outputs):
      if not op.outputs or conds.key(op.outputs[0]) not in inputs:
        self.visit(op, inner=True)
    return [self.value(t) for t in outputs]

  def _inline(self, op, inputs):
    """The outputs of the function call `op` on `inputs`: its function's
    copies (`_UNUSED` for those that no op of the model reads)."""
    try:
      graph = control_flow_util_v2.get_func_graph(
        op, [t.shape for t in op.inputs], op.get_attr("f").name
      )
    except (KeyError, ValueError, TypeError) as e:
      raise registry.Unsupported(
        f"the function that {op.type} ({op.name}) calls cannot be read: {e}"
      ) from None
    read = [t.value_index for t in op.outputs if conds.key(t) in self._read]
    with tf.name_scope(op.name):
      copies = self._run(graph, inputs, [graph.outputs[i] for i in read])
    outputs = [_UNUSED] * len(op.outputs)
    for i, t in zip(read, copies):
      outputs[i] = t
    return outputs

  def _unroll(self, op, inputs):
    """The outputs of the `While` `op` on `inputs`: its body's copies."""
    cond, body = _function_graphs(op)
    read = {t.value_index for t in op.outputs if conds.key(t) in self._read}
    needed = _carried(cond, body, read)
    values = [
      self._as_list(t) if i in needed else t for i, t in enumerate(inputs)
    ]

    def step(values, iteration):
      with tf.name_scope(f"{op.name}_{iteration}"):
        nexts = self._run(body, values, [body.outputs[i] for i in needed])
      values = list(values)
      for i, t in zip(needed, nexts):
        values[i] = t
      return values

    bound = _known(self.value(op.inputs[1]))  # while_v2's; -1: none.
    values = self._iterate(
      op,
      values,
      lambda values: self._run(cond, values, cond.outputs[:1])[0],
      step,
      None if bound is None or bound < 0 else int(bound),
      read,
    )
    return [values[i] if i in needed else _UNUSED for i in range(len(values))]

  def _iterate(self, op, values, condition, step, bound, read):
    """The values of the loop `op` from `values` after its iterations.

    `condition(values)` and `step(values, iteration)` copy the condition
    and the body. Where the condition is not known when the graph is built
    (`dynamic_rnn`'s `sequence_length` fed at run time) but the loop makes
    at most `bound` iterations, it makes `bound`, each of which keeps the
    values it got where the condition has been false at run time (a loop
    stops at its first false condition): the values the model reads after
    the loop (indices `read`) and every floating one. Counters and indices
    it does not read go on, so that what they index stays known.
    """
    alive, iterations = None, 0
    while True:
      before = self._copied
      go = condition(values)
      known = None if isinstance(go, _List) else _known(go)
      if known is not None and not np.all(known):
        break
      if known is None:
        if bound is None:
          raise registry.Unsupported(
            f"the condition of {op.type} ({op.name}) is not known when the"
            " graph is built, nor the most iterations it makes"
          )
        if iterations >= bound:
          break
        alive = go if alive is None else tf.logical_and(alive, go)
      iterations += 1
      nexts = step(values, iterations)
      if iterations == 1 and bound is not None:
        # As many more for each iteration up to the bound: known now.
        self._count((self._copied - before) * (bound - 1))
      if alive is not None:
        nexts = [
          _kept(alive, new, old, i in read, op)
          for i, (new, old) in enumerate(zip(nexts, values))
        ]
      values = nexts
    return values

  def _lists(self, op, inputs):
    """`inputs` of the list op `op` with its lists as `_List`s: a list made
    from no copy (a `TensorArray` of a constant size that a copy is
    written to) was not mapped."""
    flow = len(inputs) - 1 if op.type.startswith("TensorArray") else None
    return [
      self._as_list(t) if i == flow or _is_variant(t) else t
      for i, t in enumerate(inputs)
    ]

  def _as_list(self, t):
    """`t`, a `_List` where it is a list of the graph of `x` (a
    `TensorList`, or the flow of a v1 `TensorArray`)."""
    if isinstance(t, _List):
      return t
    if t.op.type in _LIST_OPS:
      inputs = [self._as_list(self.value(s)) for s in t.op.inputs]
      return _LIST_OPS[t.op.type](t.op, inputs)[t.value_index]
    if t.op.type == "Identity":
      source = self._as_list(self.value(t.op.inputs[0]))
      return source if isinstance(source, _List) else t
    if t.dtype == tf.variant:
      raise registry.Unsupported(
        f"a loop reads {t.name}, a {t.op.type} that is not unrolled"
      )
    return t

  def _unroll_v1(self, context):
    """Maps the exits of the control flow v1 loop `context` (a
    `WhileContext`) to its body's copies."""
    merges, nexts = [], []
    for enter in context.loop_enters:
      merge = _consumer(enter, conds.MERGE)
      merges.append(merge.op)
      nexts.append(merge.op.inputs[1].op.inputs[0])  # NextIteration's.
    graph = context.pivot.graph
    constants = [
      op
      for op in graph.get_operations()
      if op.type in _ENTER
      and op.get_attr("is_constant")
      and op.get_attr("frame_name") == context.name.encode()
    ]
    for op in constants:
      self._mapped[conds.key(op.outputs[0])] = self._as_list(
        self.value(op.inputs[0])
      )
    values = [
      self._as_list(self.value(e.op.inputs[0])) for e in context.loop_enters
    ]
    pivot = context.pivot.op
    stop = frozenset(merges + constants)
    scope = pivot.name.rsplit("/", 1)[0]

    def condition(values):
      for merge, value in zip(merges, values):
        self._mapped[conds.key(merge.outputs[0])] = value
      self._walk_v1(context, pivot.inputs[:1], stop)
      return self.value(pivot.inputs[0])

    def step(values, iteration):
      del values  # Mapped by `condition`.
      with tf.name_scope(f"{scope}_{iteration}"):
        self._walk_v1(context, nexts, stop | {pivot})
      return [self.value(t) for t in nexts]

    bound = context.maximum_iterations
    bound = None if bound is None else _known(self.value(bound))
    read = {
      i for i, t in enumerate(context.loop_exits) if conds.key(t) in self._read
    }
    values = self._iterate(
      pivot,
      values,
      condition,
      step,
      None if bound is None else int(bound),
      read,
    )
    for exit_, value in zip(context.loop_exits, values):
      self._mapped[conds.key(exit_)] = value

  def _walk_v1(self, context, outputs, stop):
    """Copies the ops of the v1 loop `context` that `outputs` are computed
    from in an iteration whose values are mapped (`stop`: the loop's
    `Merge`s and `Enter`s)."""
    pivot = conds.key(context.pivot)
    for op in self.order(outputs, stop):
      if _while_context(op) is not context:
        raise registry.Unsupported(
          f"{op.type} ({op.name}) is in a loop in a control flow v1 loop"
        )
      if op.type in conds.SWITCH and conds.key(op.inputs[1]) == pivot:
        self._map(op, [_UNUSED, self.value(op.inputs[0])])
      elif op.type == "LoopCond":
        self._map(op, [self.value(op.inputs[0])])
      elif op.type in conds.CONDS:
        raise registry.Unsupported(
          f"{op.type} ({op.name}) is part of a cond in a control flow v1 loop"
        )
      else:
        self.visit(op, inner=True)

  def _map(self, op, outs):
    for old, new in zip(op.outputs, outs):
      if isinstance(new, tf.Tensor) and not new.shape.is_fully_defined():
        new.set_shape(new.shape.merge_with(old.shape))
      self._mapped[conds.key(old)] = new
