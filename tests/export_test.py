"""Tests for tf1hess.export: graphs with Hessians that plain TensorFlow runs.

Every export is reloaded in a subprocess that never imports tf1hess and run
at two batch sizes; the Hessians are compared with the analytic Hessian of
the tanh MLP y = w2^T tanh(W1^T x + b1).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import parameterized
from google.protobuf import text_format
import numpy as np
import tensorflow as tf
import testing_utils

from tf1hess import export
from tf1hess import keras as tf1hess_keras
from tf1hess import legacy
from tf1hess.forward import dispatch

_K, _H = 3, 4
_BATCH_SIZES = (1, 5)

# Loads each export with TensorFlow alone and runs it on the given inputs.
_RELOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf

jobs = json.loads(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
results = {}
for key, kind, path in jobs:
  for n in (1, 5):
    x = inputs[f"x{n}"]
    if kind == "saved_model":
      with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], path)
        sig = meta.signature_def["hessians"]
        names = sorted(sig.outputs)
        fetch = [sig.outputs[k].name for k in names]
        out = dict(zip(names, sess.run(fetch, {sig.inputs["x"].name: x})))
    elif kind == "saved_model_v2":
      fn = tf.saved_model.load(path, tags=["serve"]).signatures["hessians"]
      out = {k: v.numpy() for k, v in fn(x=tf.constant(x)).items()}
    else:
      graph_def = tf.compat.v1.GraphDef()
      with open(path, "rb") as f:
        if kind == "pbtxt":
          from google.protobuf import text_format
          text_format.Parse(f.read().decode(), graph_def)
        else:
          graph_def.ParseFromString(f.read())
      with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        tf.compat.v1.import_graph_def(graph_def, name="")
        h, g, y = sess.run(["hessians:0", "gradients:0", "y:0"], {"x:0": x})
        out = {"hessians": h, "gradients": g, "y": y}
    for name, value in out.items():
      results[f"{key}/{kind}/{n}/{name}"] = value
assert "tf1hess" not in sys.modules, "the export needed tf1hess"
np.savez(sys.argv[3], **results)
"""


def _expected(x, weights):
  """Analytic outputs (N,), gradients (N, K) and Hessians (N, K, K)."""
  w1, b1, w2 = weights
  y = np.tanh(x.astype(np.float64) @ w1 + b1) @ w2
  return (
    y,
    testing_utils.tanh_mlp_gradients(x, *weights),
    testing_utils.tanh_mlp_hessians(x, *weights),
  )


def _mlp(weights, use_resource):
  """Builds the MLP with variables in the default graph; returns (x, y)."""
  x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
  w1, b1, w2 = [
    tf.compat.v1.get_variable(
      name, initializer=value, use_resource=use_resource
    )
    for name, value in zip(("w1", "b1", "w2"), weights)
  ]
  return x, tf.identity(tf.linalg.matvec(tf.tanh(x @ w1 + b1), w2), name="y")


def _export_mlp(
  directory, weights, use_resource=False, control_flow_v1=False, switch=False
):
  """Exports the MLP with variables from a live session, in every format.

  With `switch`, the Hessians are chosen at run time by a `tf.cond` on the
  batch size: the forward engine's for 1 sample, the row loop's for 5.
  """
  paths = {
    "saved_model": os.path.join(directory, "saved_model"),
    "pb": os.path.join(directory, "hessians.pb"),
    "pbtxt": os.path.join(directory, "hessians.pbtxt"),
    "logdir": os.path.join(directory, "logs"),
  }
  os.makedirs(directory)
  if control_flow_v1:
    tf.compat.v1.disable_control_flow_v2()
  try:
    # The rows for every N, or a switch; not the cost model's choice.
    choice = dispatch.Choice(True, 3) if switch else dispatch.Choice(False)
    with (
      tf.Graph().as_default() as graph,
      mock.patch.object(dispatch, "choose", return_value=choice),
    ):
      x, y = _mlp(weights, use_resource)
      model = legacy.HessianModel(
        graph, x, y, **legacy.add_hessian_ops(graph, x, y)
      )
  finally:
    tf.compat.v1.enable_control_flow_v2()
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(
      tf.compat.v1.variables_initializer(tf.compat.v1.global_variables())
    )
    export.export_hessian_graph(
      model,
      export_dir=paths["saved_model"],
      output_graph=paths["pb"],
      logdir=paths["logdir"],
      session=sess,
    )
    export.export_frozen_graph(model, paths["pbtxt"], session=sess)
  return model, paths


_VARIANTS = (
  ("ref_variables", False, False, False),
  ("resource_variables", True, False, False),
  ("control_flow_v1", False, True, False),
  ("by_batch_size", True, False, True),
  ("by_batch_size_control_flow_v1", False, True, True),
)


class ReloadTest(tf.test.TestCase, parameterized.TestCase):
  """Exports in setUpClass, reloads all of them in one subprocess."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.weights, cls.paths, jobs = {}, {}, []
    for seed, (name, use_resource, v1, switch) in enumerate(_VARIANTS):
      cls.weights[name] = testing_utils.mlp_weights(_K, _H, seed, np.float32)
      _, cls.paths[name] = _export_mlp(
        os.path.join(cls.dir, name),
        cls.weights[name],
        use_resource,
        v1,
        switch,
      )
      for kind in ("saved_model", "pb", "pbtxt"):
        jobs.append([name, kind, cls.paths[name][kind]])
      jobs.append([name, "saved_model_v2", cls.paths[name]["saved_model"]])
    rng = np.random.default_rng(42)
    cls.inputs = {
      f"x{n}": rng.normal(size=(n, _K)).astype(np.float32) for n in _BATCH_SIZES
    }
    inputs_path = os.path.join(cls.dir, "inputs.npz")
    results_path = os.path.join(cls.dir, "results.npz")
    np.savez(inputs_path, **cls.inputs)
    cls.reload = subprocess.run(
      [
        sys.executable,
        "-c",
        _RELOAD,
        json.dumps(jobs),
        inputs_path,
        results_path,
      ],
      capture_output=True,
      text=True,
      cwd=cls.dir,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
      check=False,
    )
    cls.results = (
      dict(np.load(results_path)) if cls.reload.returncode == 0 else {}
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_reload_ran_without_tf1hess(self):
    self.assertEqual(self.reload.returncode, 0, self.reload.stderr[-3000:])

  @parameterized.named_parameters(
    (f"{name}_{kind}", name, kind)
    for name, *_ in _VARIANTS
    for kind in ("saved_model", "saved_model_v2", "pb", "pbtxt")
  )
  def test_reloaded_matches_analytic(self, name, kind):
    self.assertEqual(self.reload.returncode, 0, self.reload.stderr[-3000:])
    for n in _BATCH_SIZES:
      want = _expected(self.inputs[f"x{n}"], self.weights[name])
      for key, value in zip(("y", "gradients", "hessians"), want):
        got = self.results[f"{name}/{kind}/{n}/{key}"]
        self.assertEqual(got.shape, value.shape)
        self.assertAllClose(got, value, atol=1e-5, rtol=1e-4)

  @parameterized.named_parameters((name, name) for name, *_ in _VARIANTS)
  def test_saved_model_signature(self, name):
    saved_model = os.path.join(self.paths[name]["saved_model"])
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      meta = tf.compat.v1.saved_model.load(sess, ["serve"], saved_model)
    self.assertEqual(list(meta.signature_def), ["hessians"])
    signature = meta.signature_def["hessians"]
    self.assertEqual(list(signature.inputs), ["x"])
    self.assertEqual(signature.inputs["x"].name, "x:0")
    self.assertCountEqual(signature.outputs, ["hessians", "gradients", "y"])
    shape = tf.TensorShape(signature.outputs["hessians"].tensor_shape)
    self.assertEqual(shape.as_list(), [None, _K, _K])
    self.assertEqual(meta.meta_info_def.tags, ["serve"])

  @parameterized.named_parameters((name, name) for name, *_ in _VARIANTS)
  def test_frozen_graph_has_no_variables(self, name):
    graph_def = tf.compat.v1.GraphDef()
    with open(self.paths[name]["pb"], "rb") as f:
      graph_def.ParseFromString(f.read())
    ops = {node.op for node in graph_def.node}
    self.assertEmpty(ops & legacy.VARIABLE_OPS)
    self.assertEmpty(ops & {"Assign", "AssignVariableOp", "ReadVariableOp"})
    names = {node.name for node in graph_def.node}
    self.assertContainsSubset({"x", "y", "hessians", "gradients"}, names)
    switched = any("by_batch_size" in node for node in names)
    self.assertEqual(switched, name.startswith("by_batch_size"))

  @parameterized.named_parameters((name, name) for name, *_ in _VARIANTS)
  def test_graph_log(self, name):
    logdir = self.paths[name]["logdir"]
    (events,) = os.listdir(logdir)
    graphs = []
    for event in tf.compat.v1.train.summary_iterator(
      os.path.join(logdir, events)
    ):
      if event.graph_def:
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(event.graph_def)
        graphs.append({node.name for node in graph_def.node})
    self.assertLen(graphs, 1)
    self.assertContainsSubset({"x", "hessians", "gradients"}, graphs[0])

  def test_no_temporary_files_left(self):
    for name, *_ in _VARIANTS:
      leftovers = [
        f for f in os.listdir(os.path.join(self.dir, name)) if ".tmp" in f
      ]
      self.assertEmpty(leftovers)


class ExportTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
    self.weights = testing_utils.mlp_weights(_K, _H, 3, np.float32)

  def _model(self, use_resource=False):
    with tf.Graph().as_default() as graph:
      x, y = _mlp(self.weights, use_resource)
      return legacy.HessianModel(
        graph, x, y, **legacy.add_hessian_ops(graph, x, y)
      )

  def _constant_model(self, hessians_name=None, y_name="y"):
    """A model without variables; the Hessians optionally named."""
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 2], name="x")
      y = tf.identity(tf.reduce_sum(x**3, axis=1), name=y_name)
      added = legacy.add_hessian_ops(graph, x, y)
      if hessians_name:
        added["hessians"] = tf.identity(added["hessians"], hessians_name)
      return legacy.HessianModel(graph, x, y, **added)

  def test_keras_batch_normalization_under_control_flow_v2(self):
    # Its moving averages read variables in the branches of v2 conds, whose
    # reads TensorFlow's freezing leaves returning a `value` output its
    # Identity does not have: the frozen graph runs, with the numbers of
    # the model's session, at every batch size.
    keras = testing_utils.legacy_keras(self)
    tf.compat.v1.enable_control_flow_v2()
    with tf.Graph().as_default() as graph:
      model = keras.Sequential(
        [
          keras.Input((3,), name="x"),
          keras.layers.Dense(4, activation="tanh"),
          keras.layers.BatchNormalization(),
          keras.layers.Dense(1),
        ]
      )
      x, y = model.input, model.output
      self.assertIn("If", {op.type for op in graph.get_operations()})
      hessian_model = legacy.HessianModel(
        graph, x, y, **legacy.add_hessian_ops(graph, x, y)
      )
      sess = tf1hess_keras.legacy_session()
      graph_def = export.frozen_graph_def(hessian_model, sess)
      batches = [np.ones((n, 3), np.float32) * 0.3 for n in (0, 1, 3)]
      want = [sess.run(hessian_model.hessians, {x: b}) for b in batches]
    with tf.Graph().as_default():
      tf.graph_util.import_graph_def(graph_def, name="")
      with tf.compat.v1.Session() as sess:
        got = [sess.run("hessians:0", {x.name: b}) for b in batches]
    for g, w in zip(got, want):
      self.assertAllClose(g, w)

  def test_text_graph_parses_back_with_quote_bytes(self):
    # Bytes 0x22 ('"') in a constant's tensor_content: protobuf 5's str()
    # of a GraphDef left them unescaped (TensorFlow 2.18 and 2.19).
    scale = np.frombuffer(b'""""""\xf0?""""""\x00@', np.float64)  # ~1, ~2
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 2], name="x")
      y = tf.identity(tf.reduce_sum(scale * x**3, axis=1), name="y")
      model = legacy.HessianModel(
        graph, x, y, **legacy.add_hessian_ops(graph, x, y)
      )
    path = os.path.join(self.dir, "m.pbtxt")
    export.export_frozen_graph(model, path)
    with open(path, encoding="utf-8") as f:
      graph_def = text_format.Parse(f.read(), tf.compat.v1.GraphDef())
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      tf.compat.v1.import_graph_def(graph_def, name="")
      h = sess.run("hessians:0", {"x:0": [[1.0, 2.0]]})
    self.assertAllClose(h, [np.diag(6 * scale * [1.0, 2.0])])

  def test_signature_takes_every_input_and_output(self):
    # A model of x and t, differentiated in x: the signature must take t
    # too (TF2 cannot load it otherwise), and keep two ys whose keys would
    # be the same (`split:1` and `split_1:0`).
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      t = tf.compat.v1.placeholder(tf.float32, [None, 1], name="t")
      y = tf.identity(tf.reduce_sum(tf.sin(x) * t, axis=1), name="y")
      _, second = tf.split(x**2, 2, axis=1)
      third, _ = tf.split(x**3, 2, axis=1)
      self.assertEqual([second.name, third.name], ["split:1", "split_1:0"])
      ys = [y, second, third]
      model = legacy.HessianModel(
        graph, x, ys, **legacy.add_hessian_ops(graph, x, ys)
      )
    path = os.path.join(self.dir, "saved_model")
    export.export_saved_model(model, path)
    signature = tf.saved_model.load(path).signatures["hessians"]
    self.assertCountEqual(signature.structured_input_signature[1], ["x", "t"])
    rng = np.random.default_rng(0)
    xv = rng.normal(size=(4, 2)).astype(np.float32)
    tv = rng.normal(size=(4, 1)).astype(np.float32)
    out = signature(x=tf.constant(xv), t=tf.constant(tv))
    self.assertCountEqual(
      out, ["hessians", "gradients", "y", "split_1", "split_1_1"]
    )
    self.assertAllClose(out["split_1"], xv[:, 1:] ** 2)  # split:1
    self.assertAllClose(out["split_1_1"], xv[:, :1] ** 3)  # split_1:0
    # d2/dx2 of sin(x) t + x_1^2 + x_0^3, per feature.
    want = -np.sin(xv) * tv + np.array([6.0, 0.0]) * xv * [1, 0] + [0, 2]
    self.assertAllClose(
      out["hessians"], np.stack([np.diag(row) for row in want]), atol=1e-5
    )

  def _x_and_t(self):
    """A physics-informed network of placeholders `x` (N, 2) and `t`
    (N, 1), with variables: `(graph, x, t, y)`."""
    rng = np.random.default_rng(5)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      t = tf.compat.v1.placeholder(tf.float32, [None, 1], name="t")
      w = tf.compat.v1.Variable(rng.normal(size=(3, 5)).astype(np.float32))
      v = tf.compat.v1.Variable(rng.normal(size=(5, 1)).astype(np.float32))
      h = tf.tanh(tf.matmul(tf.concat([x, t], 1), w))
      y = tf.identity(tf.matmul(h, v)[:, 0] + tf.sin(x[:, 0]) * t[:, 0], "y")
    return graph, x, t, y

  def _blocks(self, graph, x, t, y, feed):
    """TensorFlow's Hessians (diagonal blocks) and gradients of `y` in `x`
    and `t`, in a session on the model's own graph."""
    with graph.as_default():
      full = tf.hessians(tf.reduce_sum(y), [x, t])
      grads = tf.gradients(y, [x, t])
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        full, grads = sess.run([full, grads], feed)
    n = len(feed[x])
    return [np.stack([f[i, :, i, :] for i in range(n)]) for f in full], grads

  def test_list_of_xs(self):
    # Each of `x` and `t` gets its Hessians and gradients ("hessians_0",
    # "hessians_1", ...), in the frozen graph and the SavedModel, whose
    # signature keys the inputs by name.
    graph, x, t, y = self._x_and_t()
    added = legacy.add_hessian_ops(graph, [x, t], y)
    self.assertEqual(
      [h.name for h in added["hessians"]],
      ["tf1hess/hessians_0:0", "tf1hess/hessians_1:0"],
    )
    model = legacy.HessianModel(graph, [x, t], y, **added)
    rng = np.random.default_rng(6)
    xv = rng.normal(size=(4, 2)).astype(np.float32)
    tv = rng.normal(size=(4, 1)).astype(np.float32)
    hessians, gradients = self._blocks(graph, x, t, y, {x: xv, t: tv})
    saved = os.path.join(self.dir, "saved_model")
    frozen = os.path.join(self.dir, "frozen.pb")
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(
        tf.compat.v1.variables_initializer(graph.get_collection("variables"))
      )
      export.export_hessian_graph(
        model, export_dir=saved, output_graph=frozen, session=sess
      )
    names = ["hessians_0", "hessians_1", "gradients_0", "gradients_1"]
    want = dict(zip(names, hessians + gradients))
    signature = tf.saved_model.load(saved).signatures["hessians"]
    self.assertCountEqual(signature.structured_input_signature[1], ["x", "t"])
    out = signature(x=tf.constant(xv), t=tf.constant(tv))
    self.assertCountEqual(out, names + ["y"])
    graph_def = tf.compat.v1.GraphDef()
    with open(frozen, "rb") as f:
      graph_def.ParseFromString(f.read())
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      tf.compat.v1.import_graph_def(graph_def, name="")
      fetched = sess.run(
        [name + ":0" for name in names], {"x:0": xv, "t:0": tv}
      )
    for name, got in zip(names, fetched):
      self.assertAllClose(got, want[name], atol=1e-5, msg=name)
      self.assertAllClose(out[name], want[name], atol=1e-5, msg=name)

  def test_load_list_of_xs(self):
    graph, x, t, y = self._x_and_t()
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(
        tf.compat.v1.variables_initializer(graph.get_collection("variables"))
      )
      graph_def = legacy.freeze_session_graph(sess, ["y"])
    path = os.path.join(self.dir, "m.pb")
    with open(path, "wb") as f:
      f.write(graph_def.SerializeToString())
    model = legacy.load(["x:0", "t"], "y:0", graph=path)
    self.assertEqual([v.name for v in model.xs], ["x:0", "t:0"])
    rng = np.random.default_rng(7)
    xv = rng.normal(size=(3, 2)).astype(np.float32)
    tv = rng.normal(size=(3, 1)).astype(np.float32)
    want, _ = self._blocks(graph, x, t, y, {x: xv, t: tv})
    with tf.compat.v1.Session(graph=model.graph) as sess:
      got = sess.run(model.hessians, dict(zip(model.xs, (xv, tv))))
    for g, w in zip(got, want):
      self.assertAllClose(g, w, atol=1e-5)

  def test_list_of_xs_errors(self):
    graph, x, t, y = self._x_and_t()
    for xs, error, regex in (
      ([], ValueError, r"`xs` must be a tensor or a non-empty list; saw \[\]"),
      (
        [x, "x:0"],
        ValueError,
        r"`xs` must name each tensor once; saw x:0 twice",
      ),
      ([x, 3], TypeError, r"`xs` must be a tf.Tensor of `graph`"),
    ):
      with self.subTest(regex=regex):
        with self.assertRaisesRegex(error, regex):
          legacy.add_hessian_ops(graph, xs, y)
    added = legacy.add_hessian_ops(graph, [x, t], y)
    model = legacy.HessianModel(graph, x, y, **added)
    with self.assertRaisesRegex(
      ValueError,
      r"`model.hessians` must be one tensor for each of `model.xs` \(a list "
      r"where `model.xs` is one\); saw 2 for 1",
    ):
      export.frozen_graph_def(model)

  def test_graph_without_variables_needs_no_session(self):
    model = self._constant_model()
    graph_def = export.export_frozen_graph(model, os.path.join(self.dir, "m"))
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      tf.compat.v1.import_graph_def(graph_def, name="")
      h = sess.run("hessians:0", {"x:0": [[1.0, 2.0], [0.0, -1.0]]})
    self.assertAllClose(h, [[[6, 0], [0, 12]], [[0, 0], [0, -6]]])

  def test_hessians_already_named_get_no_alias(self):
    model = self._constant_model(hessians_name="hessians")
    graph_def = export.frozen_graph_def(model)
    names = [node.name for node in graph_def.node]
    self.assertEqual(names.count("hessians"), 1)
    self.assertEqual(names.count("gradients"), 1)
    hessians = [n for n in graph_def.node if n.name == "hessians"][0]
    self.assertEqual(list(hessians.input), ["tf1hess/hessians"])

  def test_export_is_pruned(self):
    with tf.Graph().as_default() as graph:
      x, y = _mlp(self.weights, False)
      loss = tf.reduce_mean(y**2)
      tf.compat.v1.train.AdamOptimizer().minimize(loss)
      model = legacy.HessianModel(
        graph, x, y, **legacy.add_hessian_ops(graph, x, y)
      )
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        graph_def = export.frozen_graph_def(model, sess)
    names = {node.name for node in graph_def.node}
    self.assertNotIn("Mean", names)
    self.assertEmpty([n for n in names if n.startswith(("Adam", "beta"))])

  def test_failed_export_leaves_nothing(self):
    model = self._constant_model()
    export_dir = os.path.join(self.dir, "saved_model")
    output_graph = os.path.join(self.dir, "hessians.pb")
    with mock.patch.object(
      export, "_write_graph_def", side_effect=OSError("disk full")
    ):
      with self.assertRaisesRegex(OSError, "disk full"):
        export.export_hessian_graph(
          model, export_dir=export_dir, output_graph=output_graph
        )
    self.assertEmpty(os.listdir(self.dir))

  def test_empty_export_dir_is_replaced(self):
    export_dir = os.path.join(self.dir, "saved_model")
    os.mkdir(export_dir)
    export.export_saved_model(self._constant_model(), export_dir)
    self.assertTrue(os.path.isfile(os.path.join(export_dir, "saved_model.pb")))
    self.assertEqual(os.listdir(self.dir), ["saved_model"])

  def test_existing_outputs_are_replaced_only_with_overwrite(self):
    model = self._constant_model()
    export_dir = os.path.join(self.dir, "saved_model")
    output_graph = os.path.join(self.dir, "hessians.pb")
    os.mkdir(export_dir)
    with open(os.path.join(export_dir, "old"), "w") as f:
      f.write("old")
    with open(output_graph, "w") as f:
      f.write("old")
    for kwargs, regex in (
      (
        {"export_dir": export_dir},
        r"`export_dir` must not exist \(or be an empty directory\); "
        r"'.*saved_model' does; pass --overwrite \(overwrite=True\)",
      ),
      (
        {"output_graph": output_graph},
        r"`output_graph` must not exist; '.*hessians\.pb' does; pass "
        r"--overwrite \(overwrite=True\) to replace it\.",
      ),
    ):
      with self.assertRaisesRegex(FileExistsError, regex):
        export.export_hessian_graph(model, **kwargs)
    with open(output_graph) as f:
      self.assertEqual(f.read(), "old")
    export.export_hessian_graph(
      model, export_dir=export_dir, output_graph=output_graph, overwrite=True
    )
    self.assertCountEqual(
      os.listdir(export_dir), ["saved_model.pb", "variables"]
    )
    graph_def = tf.compat.v1.GraphDef()
    with open(output_graph, "rb") as f:
      graph_def.ParseFromString(f.read())
    self.assertIn("hessians", [node.name for node in graph_def.node])
    self.assertCountEqual(os.listdir(self.dir), ["saved_model", "hessians.pb"])

  def test_text_graph(self):
    path = os.path.join(self.dir, "hessians.pbtxt")
    export.export_frozen_graph(self._constant_model(), path)
    with open(path) as f:
      self.assertIn('name: "hessians"', f.read())

  def test_errors(self):
    model = self._model()
    other = self._constant_model()
    with tf.compat.v1.Session(graph=other.graph) as other_sess:
      cases = (
        (TypeError, r"`model` must be a tf1hess.legacy.HessianModel", (1,), {}),
        (
          ValueError,
          r"`session` is needed: the graph holds variables \('w1', ...\)",
          (model,),
          {},
        ),
        (
          ValueError,
          r"`session` must run `model.graph`; it runs another graph",
          (model,),
          {"session": other_sess},
        ),
        (
          ValueError,
          r"`model.hessians` must be a tensor of `model.graph`; saw "
          r"tf1hess/hessians:0",
          (model._replace(hessians=other.hessians),),
          {},
        ),
        (
          ValueError,
          r"`model.ys` must be a tensor of `model.graph`; saw str",
          (model._replace(ys=["y:0"]),),
          {},
        ),
      )
      for error, regex, args, kwargs in cases:
        with self.subTest(regex=regex):
          with self.assertRaisesRegex(error, regex):
            export.frozen_graph_def(*args, **kwargs)

  @parameterized.named_parameters(
    ("hessians", "hessians", "y"), ("gradients", None, "gradients")
  )
  def test_name_taken_error(self, hessians_name, y_name):
    model = self._constant_model(y_name=y_name)
    if hessians_name:  # Another op of the model takes the name.
      with model.graph.as_default():
        tf.identity(model.ys, name=hessians_name)
      model = model._replace(
        ys=[model.ys, model.graph.get_tensor_by_name(hessians_name + ":0")]
      )
    taken = hessians_name or y_name
    with self.assertRaisesRegex(
      ValueError,
      f"The model already has an op named '{taken}', the name the export "
      f"gives `{taken}`; rename that op of the model.",
    ):
      export.frozen_graph_def(model)

  def test_output_errors(self):
    model = self._constant_model()
    full = os.path.join(self.dir, "full")
    os.mkdir(full)
    open(os.path.join(full, "f"), "w").close()
    missing = os.path.join(self.dir, "missing", "out")
    cases = (
      (ValueError, r"Give at least one output: `export_dir`", {}),
      (
        FileExistsError,
        r"`export_dir` must not exist \(or be an empty directory\); '.*full' "
        "does",
        {"export_dir": full},
      ),
      (
        FileNotFoundError,
        r"`export_dir` must be in an existing directory; '.*missing' does "
        "not exist",
        {"export_dir": missing},
      ),
      (
        FileNotFoundError,
        r"`output_graph` must be in an existing directory",
        {"output_graph": missing},
      ),
      (
        FileExistsError,
        r"`output_graph` must be a file path; '.*full' is a directory",
        {"output_graph": full},
      ),
      (
        FileExistsError,
        r"`logdir` must be a directory; '.*f' is a file",
        {"logdir": os.path.join(full, "f")},
      ),
    )
    for error, regex, kwargs in cases:
      with self.subTest(regex=regex):
        with self.assertRaisesRegex(error, regex):
          export.export_hessian_graph(model, **kwargs)
    self.assertCountEqual(os.listdir(self.dir), ["full"])


if __name__ == "__main__":
  tf.test.main()
