"""Per-sample Hessians for the models old code bases leave on disk.

A TF1 SavedModel (tag "serve"), a frozen GraphDef (`.pb`) or a MetaGraph with
its checkpoint is loaded into a frozen `tf.compat.v1.GraphDef` (variables
folded into constants), its input and output tensors are found by name
(`"x:0"`, `"y:0"`), and the per-sample Hessian and gradient ops are added to
it with `tf1hess.batch_hessians` and `tf1hess.batch_gradients`:

    model = tf1hess.legacy.load(xs="x:0", ys="y:0", saved_model="/tmp/model")
    with tf.compat.v1.Session(graph=model.graph) as sess:
      h = sess.run(model.hessians, {model.xs: batch})  # (N, K, K)

`tf1hess.export` writes such a graph back to disk so that plain TensorFlow
runs it.
"""

import collections
import difflib
import os

from absl import logging
from google.protobuf import message as pb_message
from google.protobuf import text_format
import tensorflow as tf

from tensorflow.core.framework import types_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.core.protobuf import meta_graph_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.core.protobuf import rewriter_config_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.framework import graph_util_impl  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.framework import op_def_registry  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.grappler import tf_optimizer  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.saved_model import loader_impl  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.util import deprecation  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _checks
from tf1hess import _tf_errors
from tf1hess import ops

# Ops that hold variables: a frozen graph has none of them.
VARIABLE_OPS = frozenset(
  ("Variable", "VariableV2", "VarHandleOp", "AutoReloadVariable")
)

# Ops that change state or talk to checkpoints. They and every op that
# depends on them (initializers, savers, train ops) are no part of the model
# that is frozen. Ops with a reference input (`Assign`, `ApplyAdam`, ...) are
# found through their OpDef.
_STATE_OP_PREFIXES = (
  "Assign",
  "ResourceApply",
  "ResourceSparseApply",
  "ResourceScatter",
  "ResourceStridedSliceAssign",
  "Save",
  "Restore",
  "MergeV2Checkpoints",
  "InitializeTable",
  "LookupTableImport",
)
_STATE_OPS = frozenset(
  (
    "VarIsInitializedOp",
    "IsVariableInitialized",
    "DestroyResourceOp",
    "ShardedFilename",
    "ShardedFilespec",
  )
)

# Where a model's input comes from: a placeholder, a `tf.data` iterator's
# next element, a queue's, or a floating placeholder with a default (a
# `Saver`'s file name is a string one).
_FEED_OPS = frozenset(
  (
    "Placeholder",
    "IteratorGetNext",
    "IteratorGetNextSync",
    "QueueDequeueV2",
    "QueueDequeueManyV2",
    "QueueDequeueUpToV2",
  )
)


def _is_feed(node):
  if node.op == "PlaceholderWithDefault":
    return tf.as_dtype(node.attr["dtype"].type).is_floating
  return node.op in _FEED_OPS


HessianModel = collections.namedtuple(
  "HessianModel", ["graph", "xs", "ys", "hessians", "gradients"]
)
HessianModel.__doc__ = """A model graph with its per-sample Hessian ops.

`load` returns one; for a graph built in Python, make one from the ops that
`add_hessian_ops` adds:
`HessianModel(graph, x, y, **add_hessian_ops(graph, x, y))`.
`tf1hess.export` writes it to disk.

Fields:
  graph: the `tf.Graph` holding the model and the added ops.
  xs: the input `Tensor` `(N, K)` (or `(N, d...)`) to feed, or a list of
    them (`x` and `t` of a physics-informed network).
  ys: the output `Tensor` (or list of them) whose per-sample values are
    differentiated.
  hessians: `Tensor` `(N, K, K)` (`(N, d..., d...)`); a list, one per
    tensor of `xs`, when `xs` is a list.
  gradients: `Tensor` `(N, K)` (`(N, d...)`); a list as `hessians`.
"""


def _model_kind(saved_model, graph, meta_graph, checkpoint):
  """Returns which kind of model was given, or raises `ValueError`."""
  given = [
    name
    for name, value in (
      ("saved_model", saved_model),
      ("graph", graph),
      ("meta_graph", meta_graph),
      ("checkpoint", checkpoint),
    )
    if value
  ]
  if given == ["checkpoint"]:
    raise ValueError(
      "`checkpoint` needs `meta_graph` (the .meta file written with it); "
      "saw `checkpoint` alone."
    )
  if given == ["meta_graph"]:
    raise ValueError(
      "`meta_graph` needs `checkpoint` (the prefix of the variables' "
      "checkpoint, e.g. /tmp/model.ckpt); saw `meta_graph` alone."
    )
  if given not in (["saved_model"], ["graph"], ["meta_graph", "checkpoint"]):
    saw = " and ".join(f"`{name}`" for name in given) or "none"
    raise ValueError(
      "Give exactly one model: `saved_model`, `graph`, or `meta_graph` "
      f"with `checkpoint`; saw {saw}."
    )
  return given[0]


def _op_changes_state(op):
  if op in _STATE_OPS or op.startswith(_STATE_OP_PREFIXES):
    return True
  op_def = op_def_registry.get(op)
  return op_def is not None and any(arg.is_ref for arg in op_def.input_arg)


def _called_functions(node, names):
  """The functions (of those named `names`) that `node` runs.

  Those in its attributes (the branches of `If` and `Case`, the condition
  and body of `While`, the `f` of `PartitionedCall`, ...), and the one its
  op names when it calls a library function directly.
  """
  if node.op in names:
    yield node.op
  for value in node.attr.values():
    if value.HasField("func"):
      yield value.func.name
    elif value.HasField("list"):
      yield from (func.name for func in value.list.func)


def _state_changing_functions(library, names):
  """Names of the functions of `library` (named `names`) that change state.

  A function changes state when one of its nodes does, or runs a function
  that does (a `While` body holding an `If` whose branch assigns, ...).
  """
  callers = collections.defaultdict(set)
  stack = []
  for function in library.function:
    name = function.signature.name
    for node in function.node_def:
      if _op_changes_state(node.op):
        stack.append(name)
      for callee in _called_functions(node, names):
        callers[callee].add(name)
  found = set()
  while stack:
    name = stack.pop()
    if name not in found:
      found.add(name)
      stack.extend(callers[name])
  return found


def _input_node(name):
  return name.lstrip("^").split(":")[0]


def model_node_names(graph_def):
  """Names of the nodes of `graph_def` that belong to the model proper.

  Drops variables themselves (freezing brings back those the model reads),
  ops that change state or read and write checkpoints (initializers, savers,
  train ops), every op that reads a value of one of those, and every op
  whose outputs only feed dropped ops. An op that only runs after one of
  those (`tf.control_dependencies(UPDATE_OPS)` around the output) is kept,
  without that control input (`_without_control_inputs`), where it reads a
  feed (a placeholder, a floating one with a default, or the next element
  of a `tf.data` iterator or of a queue). An op that runs
  functions (`If`, `While`, `PartitionedCall`, ...) changes state when one
  of its functions does, directly or through the functions that one runs:
  the control flow v2 conds that update a batch normalization's moving
  averages (`training` a placeholder) are dropped, as their control flow
  v1 form (`Switch`, `AssignSub`) is.

  Args:
    graph_def: a `tf.compat.v1.GraphDef`.

  Returns:
    A `list` of node names, in the order of `graph_def`.
  """
  consumers = collections.defaultdict(list)
  inputs, data_inputs, ops = {}, {}, {}
  for node in graph_def.node:
    ops[node.name] = node.op
    inputs[node.name] = [_input_node(name) for name in node.input]
    data_inputs[node.name] = [
      _input_node(name) for name in node.input if not name.startswith("^")
    ]
    for name in inputs[node.name]:
      consumers[name].append(node.name)
  names = {function.signature.name for function in graph_def.library.function}
  changing = _state_changing_functions(graph_def.library, names)
  changes = {
    node.name
    for node in graph_def.node
    if _op_changes_state(node.op)
    or any(f in changing for f in _called_functions(node, names))
  }
  dropped, stack = set(), list(changes)
  while stack:  # What depends on a state op.
    name = stack.pop()
    if name not in dropped:
      dropped.add(name)
      stack.extend(consumers[name])
  # But what only runs after one, and reads a feed (a placeholder, an
  # iterator's or a queue's next element) and no state op, is the model's
  # (`y` under `tf.control_dependencies(UPDATE_OPS)`).
  fed = _reads_a_feed(graph_def, data_inputs, changes)
  dropped = {n for n in dropped if ops[n] == "NoOp" or fed[n] is not True}
  stack = list(dropped)
  while stack:  # What only feeds dropped ops (saver constants, ...).
    for name in inputs.get(stack.pop(), ()):
      if name not in dropped and all(c in dropped for c in consumers[name]):
        dropped.add(name)
        stack.append(name)
  return [
    node.name
    for node in graph_def.node
    if node.name not in dropped and node.op not in VARIABLE_OPS
  ]


def _reads_a_feed(graph_def, data_inputs, changes):
  """`{name: whether}` each node reads a feed (`_is_feed`) through data
  inputs: `None` where it reads a node of `changes` (or is one).

  In the order of `graph_def`, inputs first (a loop's edge back reads as
  `False`).
  """
  fed = {}
  for node in graph_def.node:
    reads = [fed.get(name, False) for name in data_inputs[node.name]]
    if node.name in changes or None in reads:
      fed[node.name] = None
    else:
      fed[node.name] = _is_feed(node) or any(reads)
  return fed


def _without_control_inputs(graph_def, kept):
  """Drops the control inputs from nodes of `graph_def` on nodes neither in
  `kept` nor variables (`model_node_names` dropped them)."""
  known = set(kept) | {n.name for n in graph_def.node if n.op in VARIABLE_OPS}
  for node in graph_def.node:
    node.input[:] = [
      ref for ref in node.input if not ref.startswith("^") or ref[1:] in known
    ]


def freeze_session_graph(session, outputs=None):
  """Returns the graph of `session` with its variables folded into constants.

  Args:
    session: a `tf.compat.v1.Session` whose variables hold the values to keep.
    outputs: optional node to keep (with what it needs), or a `list` of
      them: names of ops ("y") or tensors ("y:0"), tensors or ops; default:
      every node of the model proper (see `model_node_names`).

  Returns:
    A `tf.compat.v1.GraphDef` without variables.

  Raises:
    TypeError: when an output is neither a name, a tensor nor an op.
    ValueError: when a name names nothing in the graph; the message lists
      the closest names.
  """
  graph_def = session.graph.as_graph_def()
  if outputs is None:
    outputs = model_node_names(graph_def)
    _without_control_inputs(graph_def, outputs)
  else:
    outputs = [
      _node_name(session.graph, output)
      for output in _checks.as_list(outputs)[0]
    ]
  with deprecation.silence():  # TF1 APIs warn on every use.
    if not any(node.op in VARIABLE_OPS for node in graph_def.node):
      return graph_util_impl.extract_sub_graph(graph_def, outputs)
    frozen = (
      convert_to_constants.convert_variables_to_constants_from_session_graph(
        session, graph_def, outputs
      )
    )
  return _with_functions_mended(frozen)


def _node_name(graph, output):
  """The name of the op of `output` (see `freeze_session_graph`)."""
  if isinstance(output, tf.Tensor):
    return output.op.name
  if isinstance(output, tf.Operation):
    return output.name
  if not isinstance(output, str):
    raise TypeError(
      "`outputs` must hold names of ops or tensors ('y', 'y:0'), tensors or "
      f"ops; saw {type(output).__name__}."
    )
  if ":" not in output:
    try:
      return graph.get_operation_by_name(output).name
    except KeyError:
      pass
  return find_tensor(graph, output, "outputs").op.name


def _with_functions_mended(graph_def):
  """`graph_def` with two leftovers of freezing in its functions mended.

  TensorFlow's freezing turns the variables that a function reads (the
  branches of a control flow v2 cond: a Keras 2 BatchNormalization built
  after `disable_eager_execution()`) into constants, but:
  - a `ReadVariableOp` becomes an `Identity` that keeps its output's name,
    `value`, where the function returns it or another node reads it;
    TensorFlow then refuses to run the graph ("Return readvariableop ->
    ReadVariableOp:value:0 is not found"). An `Identity`'s output is
    `output`.
  - an argument that was a variable's handle keeps the handle's data (its
    variable's shape) though it is now the value; TensorFlow then fails to
    differentiate the graph ("Shapes must be equal rank, but are 1 and 0",
    giving it the shape `[]` of a handle).
  """
  for function in graph_def.library.function:
    signature = function.signature
    for arg in [*signature.input_arg, *signature.output_arg]:
      if arg.type != types_pb2.DT_RESOURCE:
        del arg.handle_data[:]
    identities = {n.name for n in function.node_def if n.op == "Identity"}

    def renamed(ref, identities=identities):
      name, _, rest = ref.partition(":")
      if name in identities and rest.startswith("value:"):
        return f"{name}:output:{rest[len('value:') :]}"
      return ref

    for key in list(function.ret):
      function.ret[key] = renamed(function.ret[key])
    for node in function.node_def:
      node.input[:] = [renamed(ref) for ref in node.input]
  return graph_def


_CALL_OPS = frozenset(("PartitionedCall", "StatefulPartitionedCall"))


def inline_function_calls(graph_def):
  """Returns `graph_def` with its function calls inlined, if it has any.

  TensorFlow cannot take the second derivative of a function call imported
  from a GraphDef (`SymbolicGradient` has no gradient), and TF2 SavedModels
  compute everything in `(Stateful)PartitionedCall` ops. Grappler's function
  optimizer inlines the calls; control flow (`While`, `If`) keeps its v2
  form, through which second derivatives work.

  Args:
    graph_def: a frozen `tf.compat.v1.GraphDef`.

  Returns:
    A `tf.compat.v1.GraphDef` without call ops (`graph_def` itself when it
    has none).
  """
  if not any(node.op in _CALL_OPS for node in graph_def.node):
    return graph_def
  graph_def = convert_to_constants.disable_lower_using_switch_merge(graph_def)
  with deprecation.silence():
    meta_graph = tf.compat.v1.train.export_meta_graph(
      graph_def=graph_def, graph=import_graph_def(graph_def)
    )
  fetch = meta_graph_pb2.CollectionDef()  # Keep every node.
  fetch.node_list.value.extend(node.name for node in graph_def.node)
  meta_graph.collection_def["train_op"].CopyFrom(fetch)
  config = config_pb2.ConfigProto()
  rewrite = config.graph_options.rewrite_options
  rewrite.min_graph_nodes = -1
  rewrite.optimizers.append("function")
  rewrite.function_optimization = rewriter_config_pb2.RewriterConfig.AGGRESSIVE
  return tf_optimizer.OptimizeGraph(config, meta_graph)


def _check_exists(path, arg, directory=False):
  exists = os.path.isdir(path) if directory else os.path.isfile(path)
  if not exists:
    what = "directory" if directory else "file"
    raise FileNotFoundError(f"`{arg}` names no {what}: {path!r}.")


def _read_graph_def(path):
  """Parses a binary or text GraphDef file."""
  with open(path, "rb") as f:
    data = f.read()
  graph_def = tf.compat.v1.GraphDef()
  if not path.endswith(".pbtxt"):
    try:
      graph_def.ParseFromString(data)
      return graph_def
    except pb_message.DecodeError:
      pass
  try:
    text_format.Parse(data.decode("utf-8"), graph_def)
  except (text_format.ParseError, UnicodeDecodeError):
    raise ValueError(
      f"`graph` must be a GraphDef file (binary .pb or text .pbtxt); "
      f"{path!r} is neither."
    ) from None
  return graph_def


def _load_frozen(path):
  _check_exists(path, "graph")
  graph_def = _read_graph_def(path)
  variables = [n.name for n in graph_def.node if n.op in VARIABLE_OPS]
  if variables:
    raise ValueError(
      f"`graph` must be a frozen GraphDef (variables folded into "
      f"constants); {path!r} holds {len(variables)} variables "
      f"({variables[0]!r}, ...) whose values it does not contain. Give "
      "`meta_graph` and `checkpoint` (or `saved_model`) instead."
    )
  # Frozen by TensorFlow's `convert_variables_to_constants`, whose functions
  # keep the leftovers `freeze_session_graph` mends.
  return _with_functions_mended(graph_def)


def _tag_set(tag):
  """The sorted tags of `tag`: one tag, tags separated by commas, or a list
  of tags."""
  if isinstance(tag, str):
    tag = tag.split(",")
  if not isinstance(tag, (list, tuple)) or not all(
    isinstance(t, str) for t in tag
  ):
    raise TypeError(
      f"`tag` must be a string (tags separated by commas) or a list of "
      f"strings; saw {tag!r}."
    )
  return sorted({t.strip() for t in tag})


def _load_saved_model(path, tag):
  _check_exists(path, "saved_model", directory=True)
  if not loader_impl.contains_saved_model(path):
    raise FileNotFoundError(
      f"`saved_model` must be a SavedModel directory (with saved_model.pb); "
      f"{path!r} holds none."
    )
  loader = loader_impl.SavedModelLoader(path)
  tag_sets = [
    sorted(meta.meta_info_def.tags) for meta in loader.saved_model.meta_graphs
  ]
  tags = _tag_set(tag)
  if tags not in tag_sets:
    raise ValueError(
      f"`tag` {tag!r} names no MetaGraph of the SavedModel {path!r}; its tag "
      f"sets are {tag_sets} (give a set of several tags separated by commas:"
      " 'serve,gpu')."
    )
  meta_graph = loader.get_meta_graph_def_from_tags(tags)
  outputs = None
  if meta_graph.object_graph_def.nodes:
    # Written by tf.saved_model.save (TF2): its graph also holds the
    # functions that save and restore the objects. Keep what the signatures
    # compute.
    outputs = sorted(
      {
        _input_node(info.name)
        for signature in meta_graph.signature_def.values()
        for info in signature.outputs.values()
      }
    )
  with tf.Graph().as_default():
    with tf.compat.v1.Session() as sess:
      loader.load(sess, tags, clear_devices=True)
      return inline_function_calls(freeze_session_graph(sess, outputs))


def _checkpoint_prefix(checkpoint):
  if os.path.isdir(checkpoint):
    prefix = tf.train.latest_checkpoint(checkpoint)
    if prefix is None:
      raise FileNotFoundError(
        f"`checkpoint` names a directory without a checkpoint: {checkpoint!r}."
      )
    return prefix
  if not os.path.isfile(checkpoint + ".index"):
    raise FileNotFoundError(
      f"`checkpoint` names no checkpoint: {checkpoint!r} (expected the "
      f"prefix of {checkpoint + '.index'!r})."
    )
  return checkpoint


def _load_meta_graph(meta_graph, checkpoint):
  _check_exists(meta_graph, "meta_graph")
  prefix = _checkpoint_prefix(checkpoint)
  with tf.Graph().as_default():
    saver = tf.compat.v1.train.import_meta_graph(meta_graph, clear_devices=True)
    with tf.compat.v1.Session() as sess:
      if saver is None and tf.compat.v1.global_variables():
        saver = tf.compat.v1.train.Saver()
      if saver is not None:
        saver.restore(sess, prefix)
      return freeze_session_graph(sess)


def load_graph_def(
  saved_model=None, graph=None, meta_graph=None, checkpoint=None, tag="serve"
):
  """Loads a legacy model as a frozen `GraphDef`, variables made constants.

  Exactly one kind of model must be given: a TF1 SavedModel directory, a
  frozen GraphDef file, or a MetaGraph file with its checkpoint. Variables
  are folded into constants; initializers, savers, train ops and the
  updates of batch normalization's moving averages are left out (see
  `model_node_names`; so is, for a SavedModel, its init op: lookup tables
  are not initialized in the result). Function calls are inlined (see
  `inline_function_calls`), so a SavedModel written by TF2's
  `tf.saved_model.save` loads too: what its signatures compute, with
  tensors named like "serving_default_x:0" and "StatefulPartitionedCall:0".

  Args:
    saved_model: `str`, optional: a SavedModel directory (TF1 builder,
      `tf.compat.v1.saved_model.simple_save`, or `tf.saved_model.save`).
    graph: `str`, optional: a frozen GraphDef, binary (`.pb`) or text
      (`.pbtxt`).
    meta_graph: `str`, optional: a `.meta` file written by
      `tf.compat.v1.train.Saver`; needs `checkpoint`.
    checkpoint: `str`, optional: the checkpoint prefix (e.g.
      `/tmp/model.ckpt-100`) or a directory (its latest checkpoint); only
      with `meta_graph`.
    tag: `str`, default "serve": the tag of the SavedModel's MetaGraph;
      several separated by commas ("serve,gpu"), or a list of them, for a
      MetaGraph of several tags.

  Returns:
    A `tf.compat.v1.GraphDef` without variables.

  Raises:
    ValueError: when no model, more than one, or a `meta_graph` without
      `checkpoint` (or the reverse) is given; when `tag` is not in the
      SavedModel; when `graph` is not a GraphDef or holds variables.
    FileNotFoundError: when a given file, directory or checkpoint is missing.
    tf.errors.OpError: when the checkpoint does not hold the variables.

  Example:
    >>> import tempfile, tensorflow as tf, tf1hess
    >>> directory = tempfile.mkdtemp()
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    ...   w = tf.compat.v1.get_variable("w", initializer=[[1.], [2.]])
    ...   y = tf.identity(tf.matmul(x, w), name="y")
    ...   saver = tf.compat.v1.train.Saver()
    ...   with tf.compat.v1.Session() as sess:
    ...     sess.run(w.initializer)
    ...     prefix = saver.save(sess, directory + "/model.ckpt")
    >>> graph_def = tf1hess.legacy.load_graph_def(
    ...   meta_graph=prefix + ".meta", checkpoint=prefix)
    >>> sorted({node.op for node in graph_def.node})
    ['Const', 'Identity', 'MatMul', 'Placeholder']
  """
  kind = _model_kind(saved_model, graph, meta_graph, checkpoint)
  if kind == "saved_model":
    return _load_saved_model(saved_model, tag)
  if kind == "graph":
    return inline_function_calls(_load_frozen(graph))
  return inline_function_calls(_load_meta_graph(meta_graph, checkpoint))


def _tensor_names(graph):
  return [t.name for op in graph.get_operations() for t in op.outputs]


def find_tensor(graph, name, arg):
  """Returns the tensor of `graph` named `name`, or says what exists.

  Args:
    graph: a `tf.Graph`.
    name: `str`, a tensor name like "x:0"; an op name "x" means "x:0".
    arg: `str`, the argument or flag the name came from, for the message.

  Returns:
    The `tf.Tensor`.

  Raises:
    TypeError: when `graph` is not a `tf.Graph` or `name` not a `str`.
    ValueError: when no tensor has that name; the message lists the closest
      names that exist.

  Example:
    >>> import tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    >>> tf1hess.legacy.find_tensor(g, "x", "xs").name
    'x:0'
  """
  if not isinstance(graph, tf.Graph):
    raise TypeError(f"`graph` must be a tf.Graph; saw {type(graph).__name__}.")
  if not isinstance(name, str):
    raise TypeError(
      f"`{arg}` must be a tensor name like 'x:0' (a str); saw "
      f"{type(name).__name__}."
    )
  full = _checks.full_tensor_names(name)
  try:
    return graph.get_tensor_by_name(full)
  except (KeyError, ValueError):
    pass
  names = _tensor_names(graph)
  close = difflib.get_close_matches(full, names, n=5, cutoff=0.6)
  if close:
    hint = "Closest names: " + ", ".join(repr(n) for n in close) + "."
  else:
    inputs = [
      op.outputs[0].name
      for op in graph.get_operations()
      if op.type in ("Placeholder", "PlaceholderWithDefault")
    ]
    hint = (
      "No name is close; the model's placeholders are "
      + (", ".join(repr(n) for n in inputs) or "none")
      + "."
    )
  raise ValueError(f"`{arg}` names no tensor of the model: {full!r}. {hint}")


def _as_graph_tensor(graph, value, arg):
  if isinstance(value, str):
    return find_tensor(graph, value, arg)
  if not isinstance(value, tf.Tensor):
    raise TypeError(
      f"`{arg}` must be a tf.Tensor of `graph` or a tensor name like 'x:0'; "
      f"saw {type(value).__name__}."
    )
  if value.graph is not graph:
    raise ValueError(
      f"`{arg}` must be a tensor of `graph`; saw {value.name} of another graph."
    )
  return value


def add_hessian_ops(
  graph,
  xs,
  ys,
  name="tf1hess",
  check_independence=False,
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Adds per-sample Hessian and gradient ops of a loaded model to `graph`.

  Built with `tf1hess.batch_hessians` and `tf1hess.batch_gradients` under
  the name scope `name`, and named `"<name>/hessians"` and
  `"<name>/gradients"` (for the default name: "tf1hess/hessians:0" and
  "tf1hess/gradients:0"; a second call gets "tf1hess_1/..."). For a list
  of `xs`, those of its `i`-th tensor are `"<name>/hessians_<i>"` and
  `"<name>/gradients_<i>"`.

  Args:
    graph: the `tf.Graph` of the model (not finalized).
    xs: `tf.Tensor` or `str` name ("x:0"): the batched input `(N, K)` (or
      `(N, d...)`), floating; or a list of them (`["x:0", "t:0"]`), each
      with its own Hessians (the per-sample blocks of each input with
      itself, as `tf1hess.batch_hessians` of a list).
    ys: `tf.Tensor` or `str` name, or a list of them: the per-sample
      outputs, floating; their sum is differentiated.
    name: `str`, default "tf1hess": the name scope of the added ops.
    check_independence: `bool`, default `False`: see
      `tf1hess.batch_hessians`.
    parallel_iterations: `int` or `None`: see `tf1hess.batch_hessians`.
    method: `str`, default "auto": how the rows are built, as in
      `tf1hess.batch_hessians` (docs/speed.md, docs/forward.md).
    chunk_size: `int` or `None`: see `tf1hess.batch_hessians`.
    plan: a `tf1hess.Plan` in place of `parallel_iterations`, `method`
      and `chunk_size`, as in `tf1hess.batch_hessians`.

  Returns:
    A `dict` with "hessians", a `Tensor` `(N, K, K)` (`(N, d..., d...)`),
    and "gradients", a `Tensor` `(N, K)` (`(N, d...)`); lists of them, in
    the order of `xs`, when `xs` is a list.

  Raises:
    TypeError: when `graph` is not a `tf.Graph`, or `xs` or `ys` is not a
      floating tensor of it.
    ValueError: when a name is not in the graph (the message lists the
      closest), `xs` is an empty list or names a tensor twice, has rank
      < 2, `ys` does not depend on (each of) `xs`, an op
      between them has no second derivative in TensorFlow, or a
      control-flow-v1 loop lies between them (as in `batch_hessians`).

  Example:
    >>> import numpy as np, tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    ...   y = tf.identity(tf.reduce_sum(x ** 3, 1), name="y")
    >>> out = tf1hess.legacy.add_hessian_ops(g, "x:0", "y:0")
    >>> out["hessians"].name
    'tf1hess/hessians:0'
    >>> with tf.compat.v1.Session(graph=g) as sess:
    ...   print(sess.run(out["hessians"], {x: [[1., 2.]]}))
    [[[ 6.  0.]
      [ 0. 12.]]]
  """
  if not isinstance(graph, tf.Graph):
    raise TypeError(f"`graph` must be a tf.Graph; saw {type(graph).__name__}.")
  x_list, xs_sequence = _inputs(graph, xs)
  ys_list, was_sequence = _checks.as_list(ys)
  if not ys_list:
    raise ValueError("`ys` must be a tensor or a non-empty list; saw [].")
  ys_list = [_as_graph_tensor(graph, y, "ys") for y in ys_list]
  for y in ys_list:
    _checks.check_float(y, "ys")
    if y.shape.rank == 0:
      logging.warning(
        "tf1hess: `ys` %s is a scalar, not one output per sample: the "
        "Hessians are those of its total over the batch, and those of a "
        "mean over the batch (a loss) scale with 1 / the batch size (the "
        "last, shorter batch of a file with its own). Give the outputs per "
        "sample, (N,) or (N, ...): a loss before its reduce_mean.",
        y.name,
      )
  for x in x_list:
    between = ops.ops_between(ys_list, [x])
    if not between and not any(y.name == x.name for y in ys_list):
      raise ValueError(
        f"`ys` must depend on `xs`; {', '.join(y.name for y in ys_list)} "
        f"is not computed from {x.name}."
      )
  target = _checks.restore_structure(ys_list, was_sequence)
  inputs = _checks.restore_structure(x_list, xs_sequence)
  with graph.as_default(), tf.name_scope(name):
    try:
      hessians = ops.batch_hessians(
        target,
        inputs,
        check_independence=check_independence,
        parallel_iterations=parallel_iterations,
        method=method,
        chunk_size=chunk_size,
        plan=plan,
      )
    except LookupError as error:  # An op without a (second) gradient.
      if isinstance(error, KeyError):  # A lookup failing in TensorFlow.
        raise
      raise ValueError(
        "`ys` must be twice differentiable with respect to `xs`; "
        + _tf_errors.first_sentence(error)
        + "."
      ) from error
    gradients = ops.batch_gradients(target, inputs)
    if not xs_sequence:
      return {
        "hessians": tf.identity(hessians, name="hessians"),
        "gradients": tf.identity(gradients, name="gradients"),
      }
    return {
      key: [tf.identity(t, name=f"{key}_{i}") for i, t in enumerate(values)]
      for key, values in (("hessians", hessians), ("gradients", gradients))
    }


def _inputs(graph, xs):
  """`(list of tensors, was_sequence)` of `xs`, checked: floating, batched,
  each once."""
  names, was_sequence = _checks.as_list(xs)
  if not names:
    raise ValueError("`xs` must be a tensor or a non-empty list; saw [].")
  x_list = [_as_graph_tensor(graph, x, "xs") for x in names]
  seen = set()
  for x in x_list:
    _checks.check_float(x, "xs")
    _checks.check_batched(x, "xs")
    if x.name in seen:
      raise ValueError(f"`xs` must name each tensor once; saw {x.name} twice.")
    seen.add(x.name)
  return x_list, was_sequence


def import_graph_def(graph_def):
  """Returns a new `tf.Graph` holding `graph_def` (names unchanged)."""
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.import_graph_def(graph_def, name="")
  return graph


def load(
  xs,
  ys,
  saved_model=None,
  graph=None,
  meta_graph=None,
  checkpoint=None,
  tag="serve",
  name="tf1hess",
  check_independence=False,
  plan=None,
):
  """Loads a legacy model and adds its per-sample Hessian and gradient ops.

  `load_graph_def`, then the frozen graph is imported into a new `tf.Graph`
  and `add_hessian_ops` adds the ops. Run them in a session on that graph.

  Args:
    xs: `str`, the input tensor's name, e.g. "x:0"; or a list of names
      (`["x:0", "t:0"]`): then `hessians` and `gradients` are lists, one
      for each (see `add_hessian_ops`).
    ys: `str` or list of `str`, the output tensors' names, e.g. "y:0".
    saved_model: as in `load_graph_def`.
    graph: as in `load_graph_def` (a file path).
    meta_graph: as in `load_graph_def`.
    checkpoint: as in `load_graph_def`.
    tag: as in `load_graph_def`.
    name: `str`, default "tf1hess": the name scope of the added ops.
    check_independence: `bool`, default `False`: see
      `tf1hess.batch_hessians`.
    plan: a `tf1hess.Plan` or `None` (the default method): how the rows are
      built, as in `tf1hess.batch_hessians`.

  Returns:
    A `HessianModel(graph, xs, ys, hessians, gradients)`.

  Raises:
    As `load_graph_def` and `add_hessian_ops`; and `ValueError` when `xs`
    has no rank in the saved graph (a queue's dequeue): the message says
    how to give it one.

  Example:
    >>> import tempfile, tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    ...   y = tf.identity(tf.reduce_sum(x ** 3, 1), name="y")
    >>> path = tf.io.write_graph(g, tempfile.mkdtemp(), "m.pb", False)
    >>> m = tf1hess.legacy.load("x:0", "y:0", graph=path)
    >>> with tf.compat.v1.Session(graph=m.graph) as sess:
    ...   print(sess.run(m.hessians, {m.xs: [[1., 2.]]}))
    [[[ 6.  0.]
      [ 0. 12.]]]
  """
  graph_def = load_graph_def(
    saved_model=saved_model,
    graph=graph,
    meta_graph=meta_graph,
    checkpoint=checkpoint,
    tag=tag,
  )
  loaded = import_graph_def(graph_def)
  xs_names, xs_sequence = _checks.as_list(xs)
  x_list = [find_tensor(loaded, x, "xs") for x in xs_names]
  for x in x_list:
    if x.shape.rank is None:
      raise ValueError(
        f"`xs` must have a known rank >= 2 (batch, features...); {x.name} "
        "has none in the saved graph (a queue's dequeue records none). Give "
        "it one and add the ops: graph = tf1hess.legacy.import_graph_def("
        "tf1hess.legacy.load_graph_def(...)); "
        f"graph.get_tensor_by_name({x.name!r}).set_shape([None, ...]); "
        "tf1hess.legacy.add_hessian_ops(graph, ...)."
      )
  ys_names, was_sequence = _checks.as_list(ys)
  ys_list = [find_tensor(loaded, y, "ys") for y in ys_names]
  inputs = _checks.restore_structure(x_list, xs_sequence)
  outputs = _checks.restore_structure(ys_list, was_sequence)
  added = add_hessian_ops(
    loaded,
    inputs,
    outputs,
    name=name,
    check_independence=check_independence,
    plan=plan,
  )
  return HessianModel(
    loaded, inputs, outputs, added["hessians"], added["gradients"]
  )
