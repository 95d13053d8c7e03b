"""Writes a graph with its per-sample Hessians for plain TensorFlow to run.

The exports hold the Hessian's row loop as ordinary TensorFlow ops, with the
model's variables folded into constants: whoever loads them needs
TensorFlow, not tf1hess, and may feed any batch size the model's input
accepts.

- `export_saved_model`: a TF1 SavedModel (tag "serve") with a signature
  "hessians": input key "x", outputs "hessians" `(N, K, K)`, "gradients"
  `(N, K)` and the model's outputs (keyed by their op names, e.g. "y").
- `export_frozen_graph`: a frozen GraphDef (`.pb`, or text `.pbtxt`) where
  the Hessians are "hessians:0" and the gradients "gradients:0"; the input
  and the outputs keep their names.
- `write_graph_log`: a TensorBoard log of the exported graph.
- `export_hessian_graph`: any of the three at once, all or nothing.

A model of a list of inputs (`xs=["x:0", "t:0"]`) has the Hessians and
gradients of each: "hessians_0", "gradients_0" for the first, "hessians_1",
... in the order of `xs`, and its SavedModel signature keys every input by
its op name ("x", "t").

Example:

    model = tf1hess.legacy.load("x:0", "y:0", saved_model="/tmp/model")
    tf1hess.export.export_saved_model(model, "/tmp/model_hessians")
"""

import collections
import contextlib
import os

from google.protobuf import text_format
import tensorflow as tf

from tensorflow.python.util import deprecation  # pylint: disable=g-direct-tensorflow-import

from tf1hess import _checks
from tf1hess import _files
from tf1hess import legacy

HESSIANS = "hessians"
GRADIENTS = "gradients"
INPUT_KEY = "x"
SIGNATURE_NAME = "hessians"


_Checked = collections.namedtuple(
  "_Checked", ["graph", "xs_list", "xs_sequence", "ys_list", "aliases"]
)


def _check_model(model, session):
  """Returns the `_Checked` fields of a `HessianModel`, or raises:
  `xs_sequence` whether `model.xs` is a list; `aliases` the `(name,
  tensor)` of its Hessians and gradients, under the names the export gives
  them ("hessians", or "hessians_0", ... for a list of `xs`)."""
  if not isinstance(model, legacy.HessianModel):
    raise TypeError(
      "`model` must be a tf1hess.legacy.HessianModel (from "
      f"tf1hess.legacy.load); saw {type(model).__name__}."
    )
  graph = model.graph
  xs_list, xs_sequence = _checks.as_list(model.xs)
  ys_list, _ = _checks.as_list(model.ys)
  fields = {"xs": xs_list, "ys": ys_list}
  for arg in ("hessians", "gradients"):
    values, sequence = _checks.as_list(getattr(model, arg))
    if sequence != xs_sequence or len(values) != len(xs_list):
      raise ValueError(
        f"`model.{arg}` must be one tensor for each of `model.xs` (a list "
        f"where `model.xs` is one); saw {len(values)} for {len(xs_list)}."
      )
    fields[arg] = values
  for arg, values in fields.items():
    for value in values:
      if not isinstance(value, tf.Tensor) or value.graph is not graph:
        raise ValueError(
          f"`model.{arg}` must be a tensor of `model.graph`; saw "
          f"{getattr(value, 'name', type(value).__name__)}."
        )
  if session is not None and session.graph is not graph:
    raise ValueError("`session` must run `model.graph`; it runs another graph.")
  aliases = []
  for alias in (HESSIANS, GRADIENTS):
    values = fields[alias.lower()]
    if xs_sequence:
      aliases += [(f"{alias}_{i}", t) for i, t in enumerate(values)]
    else:
      aliases.append((alias, values[0]))
  return _Checked(graph, xs_list, xs_sequence, ys_list, aliases)


def _unique_key(t, taken):
  """The signature key of `t`: its op's name (with its output's index where
  not 0), and a suffix `_1`, `_2`, ... where an earlier key is the same;
  added to `taken`."""
  key = t.op.name if t.value_index == 0 else f"{t.op.name}_{t.value_index}"
  unique, suffix = key, 0
  while unique in taken:
    suffix += 1
    unique = f"{key}_{suffix}"
  taken.add(unique)
  return unique


def _node_input(t):
  return t.op.name if t.value_index == 0 else t.name


def frozen_graph_def(model, session=None):
  """Returns the model's graph for export: frozen, pruned, outputs named.

  Keeps what the Hessians, the gradients and `ys` need, folds variables into
  constants, and names the Hessians "hessians" and the gradients "gradients"
  ("hessians_0", "gradients_0", ... for a list of `xs`; Identity ops added
  when they are named otherwise).

  Args:
    model: a `tf1hess.legacy.HessianModel`.
    session: a `tf.compat.v1.Session` on `model.graph` holding the values of
      its variables; needed only when the graph has variables.

  Returns:
    A `tf.compat.v1.GraphDef`.

  Raises:
    TypeError: when `model` is not a `HessianModel`.
    ValueError: when the graph has variables and no `session` is given, a
      tensor is not of `model.graph`, or the graph already has another op
      named "hessians" or "gradients".
  """
  return _frozen(_check_model(model, session), session)


def _frozen(checked, session):
  """`frozen_graph_def` of a model checked by `_check_model`."""
  graph, _, _, ys_list, aliases = checked
  outputs = [t.op.name for _, t in aliases] + [y.op.name for y in ys_list]
  variables = [
    op.name for op in graph.get_operations() if op.type in legacy.VARIABLE_OPS
  ]
  if variables and session is None:
    raise ValueError(
      f"`session` is needed: the graph holds variables ({variables[0]!r}, "
      "...) whose values the export folds into constants; pass the "
      "tf.compat.v1.Session that holds them."
    )
  if session is None:
    with tf.compat.v1.Session(graph=graph) as sess:
      graph_def = legacy.freeze_session_graph(sess, outputs)
  else:
    graph_def = legacy.freeze_session_graph(session, outputs)
  names = {node.name for node in graph_def.node}
  for alias, t in aliases:
    if t.name == alias + ":0":
      continue
    if alias in names:
      raise ValueError(
        f"The model already has an op named {alias!r}, the name the export "
        f"gives `{alias}`; rename that op of the model."
      )
    node = graph_def.node.add(name=alias, op="Identity")
    node.input.append(_node_input(t))
    node.attr["T"].type = t.dtype.as_datatype_enum
  return graph_def


def _check_parent(path, arg):
  """The directory of `path` must exist and take new files (temporaries)."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise FileNotFoundError(
      f"`{arg}` must be in an existing directory; {parent!r} does not exist."
    )
  _files.check_writable(parent, arg)


def _check_logdir(logdir):
  """`logdir`, or the directory it is to be made in, must take new files.

  Only local paths are checked: a `gs://...` log directory is left to
  TensorFlow's file system.
  """
  if os.path.isfile(logdir):
    raise FileExistsError(
      f"`logdir` must be a directory; {logdir!r} is a file."
    )
  if "://" in logdir:
    return
  existing = os.path.abspath(logdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  _files.check_writable(existing, "logdir")


def check_output_paths(
  export_dir=None, output_graph=None, logdir=None, overwrite=False
):
  """Raises when an output cannot be written, before any work is done.

  The rule for existing outputs, the same for every tf1hess program: an
  existing output is refused unless `overwrite` (`--overwrite`) asks to
  replace it (an empty `export_dir` directory counts as missing; `logdir`
  is a log directory and only gets a new event file).

  Args:
    export_dir: `str` or `None`: must not be a file or a non-empty
      directory unless `overwrite`, and its parent must exist and be
      writable.
    output_graph: `str` or `None`: must not be a directory, nor an existing
      file unless `overwrite`, and its parent must exist and be writable.
    logdir: `str` or `None`: must not be a file; a local one must be
      writable, or be creatable (its nearest existing parent writable).
    overwrite: `bool`, default `False`: replace an existing `export_dir`
      or `output_graph`.

  Raises:
    FileExistsError: when `export_dir` is a file or a non-empty directory,
      or `output_graph` a file, and `overwrite` is `False`; when
      `output_graph` is a directory, or `logdir` a file.
    FileNotFoundError: when the parent of `export_dir` or `output_graph`
      does not exist.
    PermissionError: when no file can be created in the parent of
      `export_dir` or `output_graph`, or in a local `logdir` (or where it
      is to be made).
  """
  replace = "; pass --overwrite (overwrite=True) to replace it."
  if export_dir:
    _check_parent(export_dir, "export_dir")
    if not overwrite and (
      os.path.isfile(export_dir)
      or (os.path.isdir(export_dir) and os.listdir(export_dir))
    ):
      raise FileExistsError(
        f"`export_dir` must not exist (or be an empty directory); "
        f"{export_dir!r} does{replace}"
      )
  if output_graph:
    _check_parent(output_graph, "output_graph")
    if os.path.isdir(output_graph):
      raise FileExistsError(
        f"`output_graph` must be a file path; {output_graph!r} is a directory."
      )
    if not overwrite and os.path.lexists(output_graph):
      raise FileExistsError(
        f"`output_graph` must not exist; {output_graph!r} does{replace}"
      )
  if logdir:
    _check_logdir(logdir)


def _write_graph_def(graph_def, path, as_text):
  with open(path, "wb") as f:
    if as_text:
      # Not str(graph_def): with protobuf 5 (TensorFlow 2.18, 2.19) it leaves
      # quotes in bytes fields unescaped, and the file does not parse back.
      f.write(text_format.MessageToString(graph_def).encode("utf-8"))
    else:
      f.write(graph_def.SerializeToString())


def _write_saved_model(graph_def, export_dir, checked, tag, signature):
  """Writes `graph_def`, frozen from the model `checked` (`_check_model`),
  as a SavedModel with the Hessian signature."""
  graph = legacy.import_graph_def(graph_def)
  _, xs_list, xs_sequence, ys_list, aliases = checked
  outputs = {
    alias: graph.get_tensor_by_name(alias + ":0") for alias, _ in aliases
  }
  taken = set(outputs)
  for y in ys_list:
    outputs[_unique_key(y, taken)] = graph.get_tensor_by_name(y.name)
  # The input "x"; a list of `xs` keyed by their names. Then every other
  # input the outputs read (`t` of a model of `x` and `t`): a signature
  # without it cannot be served, nor loaded by TF2.
  taken = set()
  if xs_sequence:
    inputs = {_unique_key(x, taken): x for x in xs_list}
  else:
    inputs = {INPUT_KEY: xs_list[0]}
    taken.add(INPUT_KEY)
  inputs = {key: graph.get_tensor_by_name(x.name) for key, x in inputs.items()}
  fed = {x.name for x in xs_list}
  for op in graph.get_operations():
    if op.type == "Placeholder" and op.outputs[0].name not in fed:
      inputs[_unique_key(op.outputs[0], taken)] = op.outputs[0]
  with graph.as_default(), deprecation.silence():  # TF1 APIs warn on use.
    signature_def = tf.compat.v1.saved_model.predict_signature_def(
      inputs=inputs, outputs=outputs
    )
    builder = tf.compat.v1.saved_model.Builder(export_dir)
    with tf.compat.v1.Session(graph=graph) as sess:
      builder.add_meta_graph_and_variables(
        sess,
        [tag],
        signature_def_map={signature: signature_def},
        strip_default_attrs=True,
      )
    builder.save()


def write_graph_log(graph, logdir):
  """Writes `graph` as a TensorBoard log (the Graphs tab) under `logdir`.

  Args:
    graph: a `tf.Graph` or `tf.compat.v1.GraphDef`.
    logdir: `str`, the log directory (created when missing).

  Returns:
    `logdir`.
  """
  if isinstance(graph, tf.compat.v1.GraphDef):
    graph = legacy.import_graph_def(graph)
  with graph.as_default():  # FileWriter refuses eager mode.
    writer = tf.compat.v1.summary.FileWriter(logdir, graph=graph)
    writer.close()
  return logdir


def export_hessian_graph(
  model,
  export_dir=None,
  output_graph=None,
  logdir=None,
  session=None,
  tag="serve",
  signature_name=SIGNATURE_NAME,
  overwrite=False,
):
  """Exports the model with its Hessians; every output or none.

  Each output is written under a temporary name beside its path and renamed
  when all of them are complete, so a failure leaves nothing behind.

  Args:
    model: a `tf1hess.legacy.HessianModel`.
    export_dir: `str` or `None`: the SavedModel directory to write (must not
      exist, or be empty, unless `overwrite`).
    output_graph: `str` or `None`: the frozen GraphDef file to write (must
      not exist unless `overwrite`); text format when it ends in ".pbtxt".
    logdir: `str` or `None`: a TensorBoard log directory for the exported
      graph.
    session: a `tf.compat.v1.Session` holding `model.graph`'s variables;
      needed only when the graph has variables.
    tag: `str`, default "serve": the SavedModel's MetaGraph tag.
    signature_name: `str`, default "hessians": the SavedModel's signature.
    overwrite: `bool`, default `False`: replace an existing `export_dir` or
      `output_graph` (each is swapped in only once every output is
      written).

  Returns:
    The exported `tf.compat.v1.GraphDef`.

  Raises:
    ValueError: when no output is given, and as `frozen_graph_def`.
    FileExistsError, FileNotFoundError, PermissionError: as
      `check_output_paths`.
  """
  if not (export_dir or output_graph or logdir):
    raise ValueError(
      "Give at least one output: `export_dir`, `output_graph` or `logdir`."
    )
  check_output_paths(export_dir, output_graph, logdir, overwrite)
  checked = _check_model(model, session)
  graph_def = _frozen(checked, session)
  with contextlib.ExitStack() as stack:
    if export_dir:
      tmp = stack.enter_context(
        _files.atomic_output(export_dir, directory=True)
      )
      _write_saved_model(graph_def, tmp, checked, tag, signature_name)
    if output_graph:
      tmp = stack.enter_context(_files.atomic_output(output_graph))
      _write_graph_def(graph_def, tmp, output_graph.endswith(".pbtxt"))
    if logdir:
      write_graph_log(graph_def, logdir)
  return graph_def


def export_saved_model(
  model,
  export_dir,
  session=None,
  tag="serve",
  signature_name=SIGNATURE_NAME,
  overwrite=False,
):
  """Writes a TF1 SavedModel whose signature gives the per-sample Hessians.

  The signature `signature_name` has the input key "x" (the model's `xs`),
  every other placeholder that the outputs read under its op name (`t` of
  a model of `x` and `t`), and the outputs "hessians" `(N, K, K)`,
  "gradients" `(N, K)` and each of `ys` under its op name (its output's
  index appended where not 0; `_1`, `_2`, ... where two keys would be the
  same). For a list of `xs`, each input is keyed by its op name, and the
  outputs are "hessians_0", "gradients_0", "hessians_1", ... in the order
  of `xs`. Variables are folded into constants.

  Args:
    model: a `tf1hess.legacy.HessianModel`.
    export_dir: `str`: the directory to write (must not exist, or be empty,
      unless `overwrite`).
    session: as in `export_hessian_graph`.
    tag: `str`, default "serve".
    signature_name: `str`, default "hessians".
    overwrite: `bool`, default `False`: replace an existing `export_dir`.

  Returns:
    The exported `tf.compat.v1.GraphDef`.

  Raises:
    As `export_hessian_graph`.

  Example:
    >>> import os, tempfile, numpy as np, tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    ...   y = tf.identity(tf.reduce_sum(x ** 3, 1), name="y")
    >>> m = tf1hess.legacy.HessianModel(
    ...   g, x, y, **tf1hess.legacy.add_hessian_ops(g, x, y))
    >>> out = os.path.join(tempfile.mkdtemp(), "model")
    >>> _ = tf1hess.export.export_saved_model(m, out)
    >>> with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    ...   meta = tf.compat.v1.saved_model.load(sess, ["serve"], out)
    ...   sig = meta.signature_def["hessians"]
    ...   print(sess.run(sig.outputs["hessians"].name,
    ...                  {sig.inputs["x"].name: [[1., 2.]]}))
    [[[ 6.  0.]
      [ 0. 12.]]]
  """
  return export_hessian_graph(
    model,
    export_dir=export_dir,
    session=session,
    tag=tag,
    signature_name=signature_name,
    overwrite=overwrite,
  )


def export_frozen_graph(model, output_graph, session=None, overwrite=False):
  """Writes a frozen GraphDef with "hessians:0" and "gradients:0".

  The input and `ys` keep their names; variables are folded into constants.
  For a list of `xs`: "hessians_0:0", "gradients_0:0", "hessians_1:0", ...
  in the order of `xs`.

  Args:
    model: a `tf1hess.legacy.HessianModel`.
    output_graph: `str`: the file to write (must not exist unless
      `overwrite`); text format when it ends in ".pbtxt", binary otherwise.
    session: as in `export_hessian_graph`.
    overwrite: `bool`, default `False`: replace an existing `output_graph`.

  Returns:
    The exported `tf.compat.v1.GraphDef`.

  Raises:
    As `export_hessian_graph`.

  Example:
    >>> import os, tempfile, numpy as np, tensorflow as tf, tf1hess
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    ...   y = tf.identity(tf.reduce_sum(x ** 3, 1), name="y")
    >>> m = tf1hess.legacy.HessianModel(
    ...   g, x, y, **tf1hess.legacy.add_hessian_ops(g, x, y))
    >>> path = os.path.join(tempfile.mkdtemp(), "hessians.pb")
    >>> graph_def = tf1hess.export.export_frozen_graph(m, path)
    >>> with tf.Graph().as_default() as g2:
    ...   tf.compat.v1.import_graph_def(graph_def, name="")
    ...   with tf.compat.v1.Session() as sess:
    ...     print(sess.run("hessians:0", {"x:0": [[1., 2.]]}))
    [[[ 6.  0.]
      [ 0. 12.]]]
  """
  return export_hessian_graph(
    model, output_graph=output_graph, session=session, overwrite=overwrite
  )
