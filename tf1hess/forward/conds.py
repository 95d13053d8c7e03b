"""Models with `tf.cond`s on one predicate: walked one branch at a time.

Keras' `Dropout` and `BatchNormalization`, called without `training=`, and
`tf.compat.v1.layers.dropout(training=placeholder)` build a `tf.cond` on
the learning phase: `If` ops under control flow v2, `Switch` and `Merge`
ops under v1. The walk cannot follow control flow, but where every cond
between `x` and `ys` tests the same predicate, which does not depend on
`x`, the model is one of two models without conds. `Resolved.copy(branch)`
builds that model: the ops from the conds to `ys`, copied with every cond
replaced by the ops of the branch that `branch` takes (a `If`'s function
inlined, or a `Switch`'s output that the branch reads); the ops before the
conds are not copied. `dispatch` walks both copies, each in a branch of a
`tf.cond` on the same predicate, so that a run walks the branch the model
took.
"""

from tensorflow.python.ops import cond_v2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_ops  # pylint: disable=g-direct-tensorflow-import

import tensorflow as tf

from tf1hess import _shortcuts
from tf1hess.forward import registry

# The ops of conds: under control flow v2, and under v1.
_IF = frozenset(["If", "StatelessIf"])
SWITCH = frozenset(["Switch", "RefSwitch"])
MERGE = frozenset(["Merge", "RefMerge"])
CONDS = _IF | SWITCH | MERGE
# Stateful ops that a copy may repeat: they read, and draw nothing.
READS = frozenset(["ReadVariableOp", "Assert", "PrintV2", "Print"])
# The outputs of a `Switch` that a branch does not read.
_DEAD = object()


def on_path(path):
  """Whether an op of `path` (the walk's ops) is part of a cond, other than
  one the ops being built are in (`enclosing`)."""
  return any(op.type in CONDS and not enclosing(op) for op in path)


def enclosing(op):
  """Whether `op` is a `Switch` of a control flow v1 cond whose branch the
  ops being built are in: a model built in the branch of a user's cond
  (`tf.cond(p, lambda: batch_hessians(model(x), x), ...)`) reads `x`
  through it, and so do the ops built there. Where they run, the branch
  runs: the `Switch` passes its input on."""
  return op.type in SWITCH and _building_in(op.graph, op._control_flow_context)  # pylint: disable=protected-access


def built_in_a_branch(graph):
  """Whether the ops built now in `graph` go in a branch of a control flow
  v1 cond."""
  context = graph._get_control_flow_context()  # pylint: disable=protected-access
  return _nested_in(context, control_flow_ops.CondContext)


def in_the_branch_built(op):
  """Whether `op` is in the control flow v1 context that the ops built now
  are in, or in a context nested in it."""
  context = op._control_flow_context  # pylint: disable=protected-access
  while context is not None:
    if _building_in(op.graph, context):
      return True
    context = context.outer_context
  return False


def _building_in(graph, context):
  """Whether the ops being built in `graph` are in the v1 control flow
  context `context` (directly or in a context nested in it)."""
  current = graph._get_control_flow_context()  # pylint: disable=protected-access
  while current is not None and current is not context:
    current = current.outer_context
  return context is not None and current is not None


@registry.register("Switch", "RefSwitch", linear=True, diagonal=True)
def _switch(op, jacs, ctx):
  """A `Switch` around the ops being built (`enclosing`): its output of the
  branch they are in is its input."""
  del ctx  # Unused.
  if not enclosing(op):
    raise registry.Unsupported(f"{op.type} ({op.name}) is part of a cond")
  outs = [None, None]
  outs[op._control_flow_context.branch] = jacs[0]  # pylint: disable=protected-access
  return outs


def custom_gradient_in_branch(path):
  """The name of an op with a gradient of its own (`tf.custom_gradient`:
  `tf.nn.silu`) in a branch of a cond of `path`, or `None`.

  TensorFlow's second derivatives through such an op fail where its
  gradient function reads a tensor from outside the branch, as
  `tf.nn.silu`'s does when applied to the branch's input: under control
  flow v1 the rows' result is dead when the cond takes the other branch
  ("Retval[0] does not have value" at run time); under v2 the row loop
  fails to build (an `AssertionError` in the gradient of `If`).
  """
  stack = [(op, False) for op in path]
  while stack:
    op, in_function = stack.pop()
    if op.type in _IF:
      for graph in cond_v2.get_func_graphs(op):
        stack.extend((inner, True) for inner in graph.get_operations())
    elif registry.gradient_overridden(op) and (
      in_function or _in_v1_branch(op)
    ):
      return op.name
  return None


def _in_v1_branch(op):
  """Whether `op` is in a branch of a control flow v1 cond."""
  return _in_context(op, control_flow_ops.CondContext)


def key(t):
  return (id(t.graph), t.op.name, t.value_index)


def _in_loop(op):
  """Whether `op` is in a v1 `tf.while_loop` (directly or in a cond in it)."""
  return _in_context(op, control_flow_ops.WhileContext)


def _in_context(op, kind):
  """Whether `op` is in a v1 control flow context of type `kind`, directly
  or through the contexts it is nested in."""
  return _nested_in(op._control_flow_context, kind)  # pylint: disable=protected-access


def _nested_in(context, kind):
  """Whether the v1 control flow context `context`, or one it is nested in,
  is of type `kind`."""
  while context is not None:
    if isinstance(context, kind):
      return True
    context = context.outer_context
  return False


def _source(predicate):
  """`predicate` through its `Identity`s and `Switch`es (a v1 cond tests an
  identity of its own, of a `Switch` of the outer cond's when nested)."""
  while predicate.op.type in ("Identity", "Switch", "RefSwitch"):
    predicate = predicate.op.inputs[0]
  return predicate


class Resolved:
  """The model between `x` and `ys` with its conds resolved (see module).

  Attributes:
    predicate: the boolean scalar `Tensor` that every cond tests.
  """

  def __init__(self, x, ys, path):
    """Finds the conds' predicate; raises `registry.Unsupported` where the
    conds of `path` do not test one predicate independent of `x`."""
    self._x, self._ys = x, ys
    predicates = {}
    for op in path:
      if op.type in _IF:
        predicate = _source(op.inputs[0])
        predicates[key(predicate)] = predicate
      elif op.type in CONDS and not enclosing(op):
        # A cond's `Switch` is in its context, its `Merge` after it.
        context = op._control_flow_context  # pylint: disable=protected-access
        if _in_loop(op):
          raise registry.Unsupported(
            f"{op.type} ({op.name}) is part of a loop, not of a cond"
          )
        if op.type in SWITCH and context is None:
          # Imported from a GraphDef, or a copy of a model's ops, which
          # have no contexts: which branch each op is in is not known.
          raise registry.Unsupported(
            f"{op.type} ({op.name}) is part of a cond without its control"
            " flow context (imported from a GraphDef, or copied)"
          )
        if op.type in SWITCH:
          predicate = _source(context.pred)
          predicates[key(predicate)] = predicate
    if len(predicates) != 1:
      raise registry.Unsupported(
        f"the conds test {len(predicates)} different predicates"
      )
    (self.predicate,) = predicates.values()
    if _shortcuts.Graph(x).depends(self.predicate):
      raise registry.Unsupported(
        f"a cond tests {self.predicate.name}, which depends on x"
      )
    self._order = ancestors_in_order(ys)

  def copy(self, branch):
    """The copies of `ys` with every cond taking `branch` (a `bool`), in the
    current graph.

    Returns:
      `(ys, random)`: the copies, and the name of a random or stateful op
      that was copied (dropout's mask in training), or `None`. Such a copy
      draws again: its Hessians would not be those of the model's own
      outputs in the same run.

    Raises:
      registry.Unsupported: see `__init__`.
    """
    copier = _Copier(self._x, self.predicate, branch)
    for op in self._order:
      copier.visit(op)
    return [copier.value(y) for y in self._ys], copier.random


def ancestors_in_order(ys, stop=frozenset()):
  """The ops that `ys` depend on, each after the ops of its inputs, but for
  the ops of `stop` and what only they depend on.

  Not the graph's order: a v1 cond adds the `Switch` of an op's input after
  the op.
  """
  order, done, started = [], set(), set()
  stack = [(y.op, False) for y in ys if y.op not in stop]
  while stack:
    op, expanded = stack.pop()
    if op in done or (op in started and not expanded):
      continue  # Done, or a loop's edge back to an op started.
    if expanded:
      done.add(op)
      order.append(op)
      continue
    started.add(op)
    stack.append((op, True))
    stack.extend(
      (t.op, False)
      for t in op.inputs
      if t.op not in started and t.op not in stop
    )
  return order


def _stateful_before(op):
  """The name of a stateful op (but for `READS`) that the control inputs of
  `op` run, or `None`."""
  seen, stack = set(), list(op.control_inputs)
  while stack:
    before = stack.pop()
    if before in seen:
      continue
    seen.add(before)
    if before.op_def.is_stateful and before.type not in READS:
      return before.name
    stack.extend(t.op for t in before.inputs)
    stack.extend(before.control_inputs)
  return None


class _Copier:
  """Copies ops that read a copy, or that a cond holds, taking one branch."""

  def __init__(self, x, predicate, branch):
    self._x = x
    self._predicate = key(predicate)
    self._branch = branch
    self._mapped = {}
    self.random = None

  def value(self, t):
    """The copy of `t`, `t` itself where it was not copied, or `_DEAD`."""
    return self._mapped.get(key(t), t)

  def _ours(self, predicate):
    return key(_source(predicate)) == self._predicate

  def _side(self, op):
    """Where `op` sits in the v1 conds: "taken" or "other" (a branch of a
    cond on the predicate), "foreign" (only in conds on others), or
    `None` (in no cond)."""
    side = None
    context = op._control_flow_context  # pylint: disable=protected-access
    while context is not None and not _building_in(op.graph, context):
      if isinstance(context, control_flow_ops.CondContext):
        if not self._ours(context.pred):
          side = side or "foreign"
        elif context.branch != int(self._branch):
          return "other"
        else:
          side = "taken"
      context = context.outer_context
    return side

  def visit(self, op):
    """Maps the outputs of `op` (of the graph of `x` or of a branch's)."""
    if op is self._x.op:
      return
    inputs = [self.value(t) for t in op.inputs]
    changed = any(new is not old for new, old in zip(inputs, op.inputs))
    dead = any(t is _DEAD for t in inputs)
    side = self._side(op)
    if side == "other":
      # The branch not taken (a constant there lives by a control input).
      self._map(op, [_DEAD] * len(op.outputs))
    elif op.type in _IF and self._ours(inputs[0]):
      self._inline(op)
    elif op.type in SWITCH and side == "taken":
      outs = [_DEAD, _DEAD]
      outs[int(self._branch)] = inputs[0]
      self._map(op, outs)
    elif op.type in MERGE and (changed or dead):
      live = [i for i, t in enumerate(inputs) if t is not _DEAD]
      if len(live) > 1:
        raise registry.Unsupported(
          f"{op.name} merges {len(live)} live inputs of a cond"
        )
      if not live:  # A cond in the branch not taken.
        self._map(op, [_DEAD, _DEAD])
        return
      index = tf.constant(live[0], op.outputs[1].dtype)
      self._map(op, [inputs[live[0]], index])
    elif dead:
      self._map(op, [_DEAD] * len(op.outputs))
    elif changed and (side == "foreign" or _in_loop(op) or op.type in CONDS):
      raise registry.Unsupported(
        f"{op.type} ({op.name}) reads the model past a cond, but is part of"
        " a loop or of a cond on another predicate"
      )
    elif changed or side == "taken":
      self._copy(op, inputs)

  def _inline(self, op):
    """Maps the outputs of the `If` `op` to a copy of the branch's ops."""
    graphs = cond_v2.get_func_graphs(op)
    graph = graphs[0] if self._branch else graphs[1]
    for inner_op in graph.get_operations():  # Run by the branch, if stateful.
      if inner_op.op_def.is_stateful and inner_op.type not in READS:
        self.random = self.random or inner_op.name
    for inner, outer in zip(graph.inputs, op.inputs[1:]):
      self._mapped[key(inner)] = self.value(outer)
    # Not the intermediates that gradients of the cond read (variants).
    used = [t for t in graph.outputs if t.dtype != tf.variant]
    inputs = {key(t) for t in graph.inputs}
    for inner_op in ancestors_in_order(used) if used else []:
      if key(inner_op.outputs[0]) not in inputs:
        self._visit_inner(inner_op)
    self._map(
      op,
      [
        _DEAD if t.dtype == tf.variant else self.value(t) for t in graph.outputs
      ],
    )

  def _visit_inner(self, op):
    """`visit` for an op of a branch's function: always copied."""
    inputs = [self.value(t) for t in op.inputs]
    if op.type in _IF:
      if not self._ours(inputs[0]):
        raise registry.Unsupported(
          f"{op.name} is a cond on another predicate inside a cond"
        )
      self._inline(op)
      return
    self._copy(op, inputs)

  def _copy(self, op, inputs):
    if op.op_def.is_stateful and op.type not in READS:
      self.random = self.random or op.name
    # The copy has no control inputs: what the model runs before `op` (a
    # counter's update in a branch) would not run.
    self.random = self.random or _stateful_before(op)
    self._map(op, registry.copied_outputs(op, inputs))

  def _map(self, op, outs):
    for old, new in zip(op.outputs, outs):
      if new is not _DEAD and isinstance(new, tf.Tensor):
        if new.shape.rank is None or not new.shape.is_fully_defined():
          new.set_shape(new.shape.merge_with(old.shape))
      self._mapped[key(old)] = new
