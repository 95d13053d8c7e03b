"""Tests for tf1hess.legacy: loading legacy artifacts and adding Hessian ops.

The artifacts (SavedModel, frozen GraphDef, MetaGraph + checkpoint) of a
small tanh MLP with variables are written here, and the Hessians read from
them are compared with the analytic Hessian of y = w2^T tanh(W1^T x + b1).
"""

import os
import shutil
import tempfile

from absl.testing import parameterized
from google.protobuf import text_format
import numpy as np
import tensorflow as tf
import testing_utils

from tensorflow.python.saved_model import loader_impl  # pylint: disable=g-direct-tensorflow-import

import tf1hess
from tf1hess import legacy

_K, _H = 3, 5


def _write_artifacts(directory, use_resource=False, seed=0):
  """Writes the tanh MLP as SavedModel, frozen .pb/.pbtxt and MetaGraph.

  The graph also has a loss, a train op and a saver, as training code
  leaves them.

  Returns:
    A dict of paths, and the weights `(w1 (K, H), b1 (H,), w2 (H,))`.
  """
  weights = testing_utils.mlp_weights(_K, _H, seed, np.float32)
  paths = {
    "saved_model": os.path.join(directory, "saved_model"),
    "graph": os.path.join(directory, "frozen.pb"),
    "graph_text": os.path.join(directory, "frozen.pbtxt"),
    "meta_graph": os.path.join(directory, "ckpt", "model.ckpt.meta"),
    "checkpoint": os.path.join(directory, "ckpt", "model.ckpt"),
    "checkpoint_dir": os.path.join(directory, "ckpt"),
  }
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
    labels = tf.compat.v1.placeholder(tf.float32, [None], name="labels")
    w1, b1, w2 = [
      tf.compat.v1.get_variable(
        name, initializer=tf.zeros_like(value), use_resource=use_resource
      )
      for name, value in zip(("w1", "b1", "w2"), weights)
    ]
    y = tf.identity(tf.linalg.matvec(tf.tanh(x @ w1 + b1), w2), name="y")
    loss = tf.reduce_mean((y - labels) ** 2)
    tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for variable, value in zip((w1, b1, w2), weights):
        variable.load(value, sess)
      tf.compat.v1.saved_model.simple_save(
        sess, paths["saved_model"], {"x": x}, {"y": y}
      )
      saver.save(sess, paths["checkpoint"])
      frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
        sess, sess.graph.as_graph_def(), ["y"]
      )
  tf.io.write_graph(frozen, directory, "frozen.pb", as_text=False)
  # Not tf.io.write_graph(as_text=True): TensorFlow 2.20's passes an argument
  # that protobuf 7 removed (MessageToString(float_format=...)).
  with open(os.path.join(directory, "frozen.pbtxt"), "w") as f:
    f.write(text_format.MessageToString(frozen))
  return paths, weights


_KINDS = (
  ("saved_model", lambda p: {"saved_model": p["saved_model"]}),
  ("frozen_pb", lambda p: {"graph": p["graph"]}),
  ("frozen_pbtxt", lambda p: {"graph": p["graph_text"]}),
  (
    "meta_graph",
    lambda p: {"meta_graph": p["meta_graph"], "checkpoint": p["checkpoint"]},
  ),
  (
    "checkpoint_dir",
    lambda p: {
      "meta_graph": p["meta_graph"],
      "checkpoint": p["checkpoint_dir"],
    },
  ),
)


class LoadGraphDefTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.paths, cls.weights = _write_artifacts(os.path.join(cls.dir, "ref"))
    cls.resource_paths, cls.resource_weights = _write_artifacts(
      os.path.join(cls.dir, "resource"), use_resource=True, seed=1
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def _check_hessians(self, graph_def, weights):
    graph = legacy.import_graph_def(graph_def)
    added = legacy.add_hessian_ops(graph, "x:0", "y:0")
    rng = np.random.default_rng(7)
    with tf.compat.v1.Session(graph=graph) as sess:
      for n in (1, 6):
        x = rng.normal(size=(n, _K)).astype(np.float32)
        h, g = sess.run([added["hessians"], added["gradients"]], {"x:0": x})
        want_h = testing_utils.tanh_mlp_hessians(x, *weights)
        want_g = testing_utils.tanh_mlp_gradients(x, *weights)
        self.assertEqual(h.shape, (n, _K, _K))
        self.assertAllClose(h, want_h, atol=1e-5, rtol=1e-4)
        self.assertAllClose(g, want_g, atol=1e-5, rtol=1e-4)

  @parameterized.named_parameters(*_KINDS)
  def test_hessians_match_analytic(self, kwargs):
    graph_def = legacy.load_graph_def(**kwargs(self.paths))
    self.assertIsInstance(graph_def, tf.compat.v1.GraphDef)
    self._check_hessians(graph_def, self.weights)

  @parameterized.named_parameters(
    (name, kwargs) for name, kwargs in _KINDS if "pb" not in name
  )
  def test_resource_variables(self, kwargs):
    graph_def = legacy.load_graph_def(**kwargs(self.resource_paths))
    self._check_hessians(graph_def, self.resource_weights)

  @parameterized.named_parameters(
    ("saved_model", "saved_model"), ("meta_graph", "meta_graph")
  )
  def test_frozen_without_state_ops(self, kind):
    for paths in (self.paths, self.resource_paths):
      kwargs = dict(_KINDS)[kind](paths)
      nodes = legacy.load_graph_def(**kwargs).node
      ops = {node.op for node in nodes}
      self.assertContainsSubset({"Placeholder", "Tanh", "Const"}, ops)
      for op in ops:
        self.assertNotIn(op, legacy.VARIABLE_OPS)
        self.assertFalse(
          op.startswith(("Assign", "Apply", "ResourceApply", "Save")), op
        )
        self.assertNotIn(op, ("RestoreV2", "VarIsInitializedOp"))
      for node in nodes:  # Saver and optimizer constants are dropped too.
        self.assertFalse(
          node.name.startswith(("save", "GradientDescent")), node.name
        )

  def test_load_returns_model(self):
    model = legacy.load("x", "y:0", saved_model=self.paths["saved_model"])
    self.assertIsInstance(model, legacy.HessianModel)
    self.assertEqual(model.xs.name, "x:0")
    self.assertEqual(model.ys.name, "y:0")
    self.assertEqual(model.hessians.name, "tf1hess/hessians:0")
    self.assertEqual(model.gradients.name, "tf1hess/gradients:0")
    self.assertEqual(model.hessians.shape.as_list(), [None, _K, _K])
    x = np.random.default_rng(3).normal(size=(4, _K)).astype(np.float32)
    with tf.compat.v1.Session(graph=model.graph) as sess:
      h = sess.run(model.hessians, {model.xs: x})
    want = testing_utils.tanh_mlp_hessians(x, *self.weights)
    self.assertAllClose(h, want, atol=1e-5, rtol=1e-4)

  def test_load_list_of_ys_sums_them(self):
    model = legacy.load(
      "x:0", ["y:0", "y:0"], graph=self.paths["graph"], name="twice"
    )
    self.assertLen(model.ys, 2)
    self.assertEqual(model.hessians.name, "twice/hessians:0")
    x = np.random.default_rng(4).normal(size=(2, _K)).astype(np.float32)
    with tf.compat.v1.Session(graph=model.graph) as sess:
      h = sess.run(model.hessians, {model.xs: x})
    want = 2 * testing_utils.tanh_mlp_hessians(x, *self.weights)
    self.assertAllClose(h, want, atol=1e-5, rtol=1e-4)

  @parameterized.named_parameters(
    ("none", {}, r"exactly one model.*saw none\."),
    (
      "saved_model_and_graph",
      {"saved_model": "a", "graph": "b"},
      r"exactly one model.*saw `saved_model` and `graph`\.",
    ),
    (
      "graph_and_checkpoint",
      {"graph": "b", "checkpoint": "c"},
      r"exactly one model.*saw `graph` and `checkpoint`\.",
    ),
    (
      "all",
      {"saved_model": "a", "graph": "b", "meta_graph": "m", "checkpoint": "c"},
      r"saw `saved_model` and `graph` and `meta_graph` and `checkpoint`\.",
    ),
    ("meta_alone", {"meta_graph": "m"}, r"`meta_graph` needs `checkpoint`"),
    ("checkpoint_alone", {"checkpoint": "c"}, r"`checkpoint` needs `meta_"),
  )
  def test_model_flags_error(self, kwargs, regex):
    with self.assertRaisesRegex(ValueError, regex):
      legacy.load_graph_def(**kwargs)

  def test_missing_paths_error(self):
    missing = os.path.join(self.dir, "missing")
    cases = (
      ({"saved_model": missing}, r"`saved_model` names no directory: '.*'"),
      ({"graph": missing}, r"`graph` names no file: '.*missing'"),
      (
        {"meta_graph": missing, "checkpoint": self.paths["checkpoint"]},
        r"`meta_graph` names no file",
      ),
      (
        {"meta_graph": self.paths["meta_graph"], "checkpoint": missing},
        r"`checkpoint` names no checkpoint: '.*missing' \(expected the "
        r"prefix of '.*missing.index'\)",
      ),
      (
        {"meta_graph": self.paths["meta_graph"], "checkpoint": self.dir},
        r"`checkpoint` names a directory without a checkpoint",
      ),
      (
        {"saved_model": self.paths["checkpoint_dir"]},
        r"`saved_model` must be a SavedModel directory .* holds none",
      ),
    )
    for kwargs, regex in cases:
      with self.subTest(regex=regex):
        with self.assertRaisesRegex(FileNotFoundError, regex):
          legacy.load_graph_def(**kwargs)

  def test_saved_model_of_several_tags(self):
    """A MetaGraph tagged {serve, gpu}: its tags separated by commas, in any
    order, or a list."""
    path = os.path.join(self.dir, "two_tags")
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      w1, b1, w2 = (tf.constant(w) for w in self.weights)
      y = tf.identity(tf.linalg.matvec(tf.tanh(x @ w1 + b1), w2), name="y")
      with tf.compat.v1.Session() as sess:
        builder = tf.compat.v1.saved_model.Builder(path)
        signature = tf.compat.v1.saved_model.predict_signature_def(
          {"x": x}, {"y": y}
        )
        builder.add_meta_graph_and_variables(
          sess, ["serve", "gpu"], {"serving_default": signature}
        )
        builder.save()
    for tag in ("serve,gpu", "gpu, serve", ["gpu", "serve"]):
      with self.subTest(tag=tag):
        graph_def = legacy.load_graph_def(saved_model=path, tag=tag)
        self._check_hessians(graph_def, self.weights)
    with self.assertRaisesRegex(
      ValueError,
      r"`tag` 'serve' names no MetaGraph .* tag sets are \[\['gpu', 'serve'\]\]"
      r" \(give a set of several tags separated by commas",
    ):
      legacy.load_graph_def(saved_model=path, tag="serve")

  def test_unknown_tag_error(self):
    with self.assertRaisesRegex(
      ValueError, r"`tag` 'train' names no MetaGraph .* tag sets are \[\['s"
    ):
      legacy.load_graph_def(saved_model=self.paths["saved_model"], tag="train")

  def test_not_a_graph_def_error(self):
    path = os.path.join(self.dir, "garbage.pb")
    with open(path, "wb") as f:
      f.write(b"\xff\xfe not a graph {{{")
    with self.assertRaisesRegex(
      ValueError, r"`graph` must be a GraphDef file .*is neither\."
    ):
      legacy.load_graph_def(graph=path)

  def test_unfrozen_graph_error(self):
    with tf.Graph().as_default() as graph:
      tf.compat.v1.get_variable("w", [2])
    path = tf.io.write_graph(graph, self.dir, "unfrozen.pb", as_text=False)
    with self.assertRaisesRegex(
      ValueError, r"`graph` must be a frozen GraphDef .* holds 1 variables"
    ):
      legacy.load_graph_def(graph=path)


def _tanh_mlp(x, w1, b1, w2):
  return tf.reduce_sum(tf.tanh(x @ w1 + b1) * w2, axis=1)


class FunctionCallTest(tf.test.TestCase):
  """Models computed in function calls: TF2 SavedModels, tf.function."""

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
    self.weights = testing_utils.mlp_weights(_K, _H, 2, np.float32)
    self.x = np.random.default_rng(5).normal(size=(4, _K)).astype(np.float32)

  def _check(self, graph_def, xs, ys):
    self.assertEmpty(
      [n.op for n in graph_def.node if n.op.endswith("PartitionedCall")]
    )
    graph = legacy.import_graph_def(graph_def)
    added = legacy.add_hessian_ops(graph, xs, ys)
    with tf.compat.v1.Session(graph=graph) as sess:
      h = sess.run(added["hessians"], {xs: self.x})
    want = testing_utils.tanh_mlp_hessians(self.x, *self.weights)
    self.assertAllClose(h, want, atol=1e-5, rtol=1e-4)

  def test_tf2_saved_model(self):
    module = tf.Module()
    module.w = [tf.Variable(w) for w in self.weights]
    module.f = tf.function(
      lambda x: {"y": _tanh_mlp(x, *module.w)},
      input_signature=[tf.TensorSpec([None, _K], tf.float32, name="x")],
    )
    path = os.path.join(self.dir, "tf2")
    tf.saved_model.save(module, path, signatures=module.f)
    signature = (
      loader_impl.parse_saved_model(path)
      .meta_graphs[0]
      .signature_def["serving_default"]
    )
    self._check(
      legacy.load_graph_def(saved_model=path),
      signature.inputs["x"].name,
      signature.outputs["y"].name,
    )

  def test_frozen_graph_with_function_call(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      y = tf.function(_tanh_mlp)(x, *self.weights)
      tf.identity(y, name="y")
    self.assertIn("PartitionedCall", [op.type for op in graph.get_operations()])
    path = tf.io.write_graph(graph, self.dir, "call.pb", as_text=False)
    self._check(legacy.load_graph_def(graph=path), "x:0", "y:0")


class WhileLoopTest(tf.test.TestCase, parameterized.TestCase):
  """Frozen graphs whose model holds a tf.while_loop: y = sum(x^3)."""

  def _write_cube(self, control_flow_v1):
    if control_flow_v1:
      tf.compat.v1.disable_control_flow_v2()
    try:
      with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float64, [None, 2], name="x")
        _, cube = tf.while_loop(
          lambda i, a: i < 2, lambda i, a: (i + 1, a * x), [0, x]
        )
        tf.identity(tf.reduce_sum(cube, axis=1), name="y")
    finally:
      tf.compat.v1.enable_control_flow_v2()
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return tf.io.write_graph(graph, directory, "cube.pb", as_text=False)

  def test_control_flow_v2_loop(self):
    model = legacy.load("x:0", "y:0", graph=self._write_cube(False))
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    with tf.compat.v1.Session(graph=model.graph) as sess:
      h = sess.run(model.hessians, {model.xs: x})
    self.assertAllClose(h, np.stack([np.diag(6 * row) for row in x]))

  def test_control_flow_v1_loop_error(self):
    with self.assertRaisesRegex(
      ValueError,
      r"`ys` is computed through a control-flow-v1 tf.while_loop "
      r"\(while/\S*Enter\S*; .* loaded from a GraphDef\)",
    ):
      legacy.load("x:0", "y:0", graph=self._write_cube(True))

  def test_control_flow_v1_loop_error_for_gradients_too(self):
    graph = legacy.import_graph_def(
      legacy.load_graph_def(graph=self._write_cube(True))
    )
    with graph.as_default():
      x, y = graph.get_tensor_by_name("x:0"), graph.get_tensor_by_name("y:0")
      with self.assertRaisesRegex(
        ValueError, r"nor any gradient through one loaded from a GraphDef"
      ):
        tf1hess.batch_gradients(y, x)


class CondTest(tf.test.TestCase):
  def test_saved_model_with_a_variable_read_in_a_cond_branch(self):
    # As a v1 batch_normalization(training=placeholder) under control flow
    # v2: freezing makes the branch's variable handle a value, and the
    # frozen graph must still be differentiable.
    directory = os.path.join(tempfile.mkdtemp(), "cond")
    self.addCleanup(shutil.rmtree, os.path.dirname(directory), True)
    mean = np.array([0.5, -0.5, 1.0], np.float32)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
      training = tf.compat.v1.placeholder_with_default(False, [])
      variable = tf.compat.v1.get_variable(
        "mean", initializer=mean, use_resource=True
      )
      h = tf.cond(
        training, lambda: x - tf.reduce_mean(x, 0), lambda: x - variable
      )
      y = tf.identity(tf.reduce_sum(tf.sin(h) ** 2, axis=1), name="y")
      self.assertTrue(any(op.type == "If" for op in x.graph.get_operations()))
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.saved_model.simple_save(
          sess, directory, {"x": x}, {"y": y}
        )
    model = legacy.load("x:0", "y:0", saved_model=directory)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with tf.compat.v1.Session(graph=model.graph) as sess:
      h = sess.run(model.hessians, {model.xs: x})
    # d2/du2 sin(u)^2 = 2 cos(2u), u = x - mean, per feature.
    want = np.stack([np.diag(2 * np.cos(2 * (row - mean))) for row in x])
    self.assertAllClose(h, want, atol=1e-5)


class BatchNormalizationTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """Models with `tf.compat.v1.layers.batch_normalization(training=t)`.

  `t` a placeholder: the updates of the moving averages are conds that
  assign variables, in their branch functions under control flow v2 (an
  `If`), as plain graph ops under control flow v1 (`Switch`/`Merge`).
  """

  slow_cases = ("test_hessians_match_tf_hessians_cf2_resource_float64",)

  def _write(self, directory, dtype, use_resource, x, after_updates):
    """Writes the model as SavedModel, MetaGraph + checkpoint and frozen
    GraphDef; with `after_updates`, `y` runs after the updates of the moving
    averages (`tf.control_dependencies(UPDATE_OPS)`), as TF1 training code
    writes.

    Returns:
      The op types of the graph; a `dict` from `training` (False, True) to
      `y` and `tf.hessians` of `sum(y)` `(N, K, N, K)` at `x`; the `load`
      keyword arguments of the artifacts.
    """
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4)).astype(dtype.as_numpy_dtype)
    with tf.Graph().as_default() as graph:
      xs = tf.compat.v1.placeholder(dtype, [None, 3], name="x")
      training = tf.compat.v1.placeholder_with_default(False, [], "training")
      with tf.compat.v1.variable_scope("bn", use_resource=use_resource):
        h = tf.compat.v1.layers.batch_normalization(xs @ w, training=training)
      updates = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
      with tf.control_dependencies(updates if after_updates else []):
        y = tf.identity(tf.reduce_sum(tf.tanh(h) ** 2, axis=1), name="y")
      full = tf.hessians(tf.reduce_sum(y), xs)[0]
      saver = tf.compat.v1.train.Saver()
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        for variable in tf.compat.v1.global_variables():  # Not 0 and 1.
          value = rng.uniform(0.5, 1.5, variable.shape.as_list())
          variable.load(value.astype(dtype.as_numpy_dtype), sess)
        saved_model = os.path.join(directory, "saved_model")
        tf.compat.v1.saved_model.simple_save(
          sess, saved_model, {"x": xs}, {"y": y}
        )
        prefix = saver.save(sess, os.path.join(directory, "model.ckpt"))
        # Frozen by TensorFlow itself, as TF1 code froze graphs: under
        # control flow v2 the branch functions of the conds keep leftovers
        # of the variables (`load` must mend them). With `after_updates`,
        # TensorFlow's frozen graph keeps the assignments and does not
        # import.
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
          sess, graph.as_graph_def(), ["y"]
        )
        frozen_path = tf.io.write_graph(frozen, directory, "frozen.pb", False)
        # After saving: with `after_updates` a run in training moves the
        # averages.
        want = {
          t: sess.run([y, full], {xs: x, training: t}) for t in (False, True)
        }
    types = {op.type for op in graph.get_operations()}
    return (
      types,
      want,
      (
        {"saved_model": saved_model},
        {"meta_graph": prefix + ".meta", "checkpoint": prefix},
      )
      + (() if after_updates else ({"graph": frozen_path},)),
    )

  @parameterized.named_parameters(
    ("cf2_resource_float32", 2, True, tf.float32),
    ("cf2_resource_float64", 2, True, tf.float64),
    ("cf1_ref_float32", 1, False, tf.float32),
    ("cf1_resource_float64", 1, True, tf.float64),
    ("cf2_after_updates", 2, True, tf.float64, True),
    ("cf1_after_updates", 1, False, tf.float64, True),
  )
  def test_hessians_match_tf_hessians(
    self, cf, use_resource, dtype, after_updates=False
  ):
    # (Keras cannot update a ref variable's moving average in a v2 cond.)
    self.control_flow(cf)
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    x = (
      np.random.default_rng(2).normal(size=(3, 3)).astype(dtype.as_numpy_dtype)
    )
    types, want, kinds = self._write(
      directory, dtype, use_resource, x, after_updates
    )
    self.assertEqual("If" in types, cf == 2)
    self.assertEqual("Switch" in types, cf == 1)
    tolerance = 1e-5 if dtype == tf.float32 else 1e-10
    for kwargs in kinds:
      model = legacy.load("x:0", "y:0", **kwargs)
      with tf.compat.v1.Session(graph=model.graph) as sess:
        for training in (False, True):
          with self.subTest(kind=sorted(kwargs)[-1], training=training):
            y, h = sess.run(
              [model.ys, model.hessians],
              {model.xs: x, "training:0": training},
            )
            want_y, full = want[training]
            if training:
              # Batch statistics couple the samples: no per-sample Hessian
              # exists (check_independence says so), and the row trick gives
              # for sample n the sum over m of the blocks (m, n).
              want_h = np.moveaxis(full.sum(axis=0), 1, 0)
            else:
              want_h = testing_utils.diagonal_blocks(full)
            self.assertAllClose(y, want_y, atol=tolerance, rtol=tolerance)
            self.assertAllClose(h, want_h, atol=tolerance, rtol=tolerance)

  @parameterized.named_parameters(
    ("placeholder_with_default", "default"),
    ("iterator", "iterator"),
  )
  def test_input_not_a_placeholder_after_updates(self, kind):
    # `y` runs after the updates and reads no `Placeholder`: its input is a
    # placeholder with a default, or a tf.data iterator's next batch.
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    with tf.Graph().as_default():
      if kind == "default":
        xs = tf.compat.v1.placeholder_with_default(x[:1], [None, 3], "x")
      else:
        dataset = tf.data.Dataset.from_tensor_slices(x).batch(2)
        iterator = tf.compat.v1.data.make_one_shot_iterator(dataset)
        xs = tf.identity(iterator.get_next(), name="x")
      h = tf.compat.v1.layers.batch_normalization(
        xs @ w, training=tf.compat.v1.placeholder_with_default(False, [])
      )
      updates = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
      with tf.control_dependencies(updates):
        y = tf.identity(tf.reduce_sum(tf.sin(h), axis=1), name="y")
      full = tf.hessians(tf.reduce_sum(y), xs)[0]
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        want = testing_utils.diagonal_blocks(sess.run(full, {xs: x}))
        prefix = tf.compat.v1.train.Saver().save(
          sess, os.path.join(directory, "model.ckpt")
        )
    model = legacy.load(
      "x:0", "y:0", meta_graph=prefix + ".meta", checkpoint=prefix
    )
    with tf.compat.v1.Session(graph=model.graph) as sess:
      got = sess.run(model.hessians, {model.xs: x})
    self.assertAllClose(got, want, atol=1e-5, rtol=1e-5)

  def test_input_of_unknown_rank(self):
    # A queue's dequeue has no shape in the saved graph: `load` says how to
    # give it one, and that way gives the Hessians.
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    with tf.Graph().as_default():
      queue = tf.queue.FIFOQueue(8, tf.float32, shapes=[[3]])
      xs = tf.identity(queue.dequeue_many(4), name="x")
      y = tf.identity(tf.reduce_sum(tf.sin(xs @ w), axis=1), name="y")
      full = tf.hessians(tf.reduce_sum(y), xs)[0]
      tf.compat.v1.Variable(1.0)  # A checkpoint needs a variable.
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        want = testing_utils.diagonal_blocks(sess.run(full, {xs: x}))
        prefix = tf.compat.v1.train.Saver().save(
          sess, os.path.join(directory, "model.ckpt")
        )
    paths = {"meta_graph": prefix + ".meta", "checkpoint": prefix}
    with self.assertRaisesRegex(
      ValueError, r"`xs` must have a known rank .* x:0 has none .*set_shape"
    ):
      legacy.load("x:0", "y:0", **paths)
    graph = legacy.import_graph_def(legacy.load_graph_def(**paths))
    graph.get_tensor_by_name("x:0").set_shape([None, 3])
    added = legacy.add_hessian_ops(graph, "x:0", "y:0")
    with tf.compat.v1.Session(graph=graph) as sess:
      got = sess.run(added["hessians"], {"x:0": x})
    self.assertAllClose(got, want, atol=1e-5, rtol=1e-5)

  def test_ops_running_functions_that_assign_are_left_out(self):
    # An assignment inside a cond inside a loop body, and one in a call.
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      flag = tf.compat.v1.placeholder_with_default(True, [], name="flag")
      counter = tf.compat.v1.get_variable(
        "counter", initializer=0.0, use_resource=True
      )

      def body(i):
        changed = tf.cond(
          flag, lambda: counter.assign_add(1.0), counter.read_value
        )
        with tf.control_dependencies([changed]):
          return i + 1

      tf.while_loop(lambda i: i < 3, body, [0])
      tf.function(lambda: counter.assign_add(2.0))()
      tf.identity(tf.reduce_sum(tf.sin(x), axis=1), name="y")
    graph_def = graph.as_graph_def()
    functions = {f.signature.name: f for f in graph_def.library.function}
    loops = [node for node in graph_def.node if node.op == "While"]
    self.assertLen(loops, 1)  # Its body assigns in an If, not itself.
    body_ops = {
      n.op for n in functions[loops[0].attr["body"].func.name].node_def
    }
    self.assertIn("If", body_ops)
    self.assertFalse(any(op.startswith("Assign") for op in body_ops))
    names = legacy.model_node_names(graph_def)
    self.assertContainsSubset(["x", "y"], names)
    ops = {node.name: node.op for node in graph_def.node}
    self.assertContainsSubset(
      {"While", "StatefulPartitionedCall"}, ops.values()
    )
    self.assertNoCommonElements(
      {ops[name] for name in names}, {"While", "StatefulPartitionedCall", "If"}
    )


class FindTensorTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      self.y = tf.identity(tf.reduce_sum(self.x, 1), name="output")
      tf.split(self.x, 2, axis=1, name="halves")

  @parameterized.named_parameters(
    ("tensor_name", "x:0", "x:0"),
    ("op_name", "output", "output:0"),
    ("second_output", "halves:1", "halves:1"),
  )
  def test_finds(self, name, want):
    self.assertEqual(legacy.find_tensor(self.graph, name, "xs").name, want)

  @parameterized.named_parameters(
    (
      "typo",
      "outptu:0",
      r"`ys` names no tensor of the model: 'outptu:0'\. "
      r"Closest names: 'output:0'",
    ),
    ("op_name", "outpt", r"'outpt:0'\. Closest names: 'output:0'"),
    ("index", "x:3", r"'x:3'\. Closest names: 'x:0'"),
    (
      "nothing_close",
      "logits/BiasAdd:0",
      r"'logits/BiasAdd:0'\. No name is close; the model's placeholders are "
      r"'x:0'\.",
    ),
  )
  def test_unknown_name_error(self, name, regex):
    with self.assertRaisesRegex(ValueError, regex):
      legacy.find_tensor(self.graph, name, "ys")

  def test_type_errors(self):
    with self.assertRaisesRegex(TypeError, r"`graph` must be a tf.Graph"):
      legacy.find_tensor(self.graph.as_graph_def(), "x:0", "xs")
    with self.assertRaisesRegex(TypeError, r"`xs` must be a tensor name"):
      legacy.find_tensor(self.graph, 3, "xs")


class FreezeSessionGraphTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.graph = tf.Graph()
    with self.graph.as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2], name="x")
      w = tf.compat.v1.get_variable(
        "w", initializer=np.array([[1.0], [-2.0]]), use_resource=False
      )
      self.y = tf.identity(tf.reduce_sum(tf.tanh(x @ w), 1), name="y")
      tf.identity(x * 2.0, name="other")
    self.session = tf.compat.v1.Session(graph=self.graph)
    self.addCleanup(self.session.close)
    self.session.run(w.initializer)

  @parameterized.named_parameters(
    ("op_name", ["y"]),
    ("tensor_name", ["y:0"]),
    ("one_name", "y"),
    ("tensor", None),
  )
  def test_outputs_by_op_or_tensor(self, outputs):
    frozen = legacy.freeze_session_graph(self.session, outputs or [self.y])
    names = {node.name for node in frozen.node}
    self.assertIn("y", names)
    self.assertNotIn("other", names)
    self.assertEmpty([n for n in frozen.node if n.op in legacy.VARIABLE_OPS])
    with tf.Graph().as_default():
      tf.compat.v1.import_graph_def(frozen, name="")
      with tf.compat.v1.Session() as sess:
        got = sess.run("y:0", {"x:0": [[0.5, 0.25]]})
    self.assertAllClose(got, [0.0])

  def test_unknown_name_error(self):
    with self.assertRaisesRegex(
      ValueError,
      r"`outputs` names no tensor of the model: 'yy:0'\. "
      r"Closest names: 'y:0'",
    ):
      legacy.freeze_session_graph(self.session, ["yy"])
    with self.assertRaisesRegex(TypeError, r"`outputs` must hold names"):
      legacy.freeze_session_graph(self.session, [3])


class AddHessianOpsTest(tf.test.TestCase, parameterized.TestCase):
  def test_second_call_gets_own_scope(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 2], name="x")
      y = tf.reduce_sum(x**3, axis=1)
    first = legacy.add_hessian_ops(graph, x, y)
    second = legacy.add_hessian_ops(graph, x, y)
    self.assertEqual(second["hessians"].name, "tf1hess_1/hessians:0")
    with tf.compat.v1.Session(graph=graph) as sess:
      h1, h2 = sess.run(
        [first["hessians"], second["hessians"]], {x: [[1.0, -2.0]]}
      )
    self.assertAllClose(h1, [[[6.0, 0.0], [0.0, -12.0]]])
    self.assertAllClose(h2, h1)

  @parameterized.named_parameters(
    ("while_loop", "while_loop", None),
    ("pfor_chunks", "pfor", 1),
    ("forward", "forward", None),
  )
  def test_method_and_chunk_size_reach_the_rows(self, method, chunk_size):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 5))
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 3], name="x")
      y = tf.reduce_sum(tf.tanh(tf.matmul(x, w)) ** 2, axis=1)
    added = legacy.add_hessian_ops(
      graph, x, y, method=method, chunk_size=chunk_size
    )
    x_val = rng.normal(size=(4, 3))
    with tf.compat.v1.Session(graph=graph) as sess:
      h = sess.run(added["hessians"], {x: x_val})
    # sum_h tanh(a_h)^2: d2/da2 = 2 (1 - t^2) (1 - 3 t^2), a = x w.
    t = np.tanh(x_val @ w)
    expected = np.einsum("nh,ah,bh->nab", 2 * (1 - t**2) * (1 - 3 * t**2), w, w)
    self.assertAllClose(h, expected, atol=1e-10)
    with self.assertRaisesRegex(ValueError, r"`method` must be one of"):
      legacy.add_hessian_ops(graph, x, y, method="rows")

  def test_check_independence_catches_coupling(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      y = tf.reduce_sum(x, axis=1) * tf.reduce_sum(x)  # couples the samples
    added = legacy.add_hessian_ops(graph, x, y, check_independence=True)
    with tf.compat.v1.Session(graph=graph) as sess:
      with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, r"are not independent"
      ):
        sess.run(added["hessians"], {x: np.ones((3, 2), np.float32)})

  def _graph(self, x_dtype=tf.float32, x_shape=(None, 2)):
    graph = tf.Graph()
    with graph.as_default():
      x = tf.compat.v1.placeholder(x_dtype, x_shape, name="x")
      tf.identity(tf.reduce_sum(tf.cast(x, tf.float32) ** 2), name="y")
      tf.compat.v1.placeholder(tf.float32, [None, 2], name="other")
      tf.constant([1, 2], name="ints")
    return graph

  def test_errors(self):
    graph = self._graph()
    cases = (
      (TypeError, r"`graph` must be a tf.Graph", (None, "x:0", "y:0")),
      (ValueError, r"`xs` names no tensor .* 'x:0'", (graph, "xx", "y:0")),
      (ValueError, r"`ys` names no tensor", (graph, "x:0", "why:0")),
      (
        ValueError,
        r"`ys` must be a tensor or a non-empty list",
        (graph, "x", []),
      ),
      (TypeError, r"`xs` must be a tf.Tensor of `graph`", (graph, 1.0, "y")),
      (
        ValueError,
        r"`ys` must depend on `xs`; y:0 is not computed from other:0\.",
        (graph, "other:0", "y:0"),
      ),
      (TypeError, r"`ys` must be a floating tensor", (graph, "x", "ints")),
      (
        ValueError,
        r"`xs` must be a tensor of `graph`; saw x:0 of another graph",
        (graph, self._graph().get_tensor_by_name("x:0"), "y:0"),
      ),
    )
    for error, regex, args in cases:
      with self.subTest(regex=regex):
        with self.assertRaisesRegex(error, regex):
          legacy.add_hessian_ops(*args)

  def test_scalar_ys_warns(self):
    # A batch mean (a loss) as `ys`: its per-sample Hessians depend on the
    # batch size.
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      loss = tf.reduce_mean(tf.reduce_sum(x**3, axis=1), name="loss")
      with self.assertLogs(level="WARNING") as logs:
        added = legacy.add_hessian_ops(graph, x, loss)
      with tf.compat.v1.Session() as sess:
        h = sess.run(added["hessians"], {x: [[1.0, 2.0], [0.0, 1.0]]})
    self.assertIn("`ys` loss:0 is a scalar", "\n".join(logs.output))
    self.assertAllClose(h, [[[3, 0], [0, 6]], [[0, 0], [0, 3]]])

  def test_integer_xs_error(self):
    with self.assertRaisesRegex(
      TypeError, r"`xs` must be a floating tensor .* saw dtype int32\."
    ):
      legacy.add_hessian_ops(self._graph(x_dtype=tf.int32), "x:0", "y:0")

  def test_no_second_derivative_error(self):
    # TensorFlow has no gradient of Dilation2DBackpropInput, and the forward
    # engine no rule of Dilation2D.
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
      images = tf.nn.dilation2d(
        tf.reshape(tf.tanh(x), [-1, 1, 2, 2]),
        tf.ones([1, 1, 2]),
        [1, 1, 1, 1],
        "SAME",
        "NHWC",
        [1, 1, 1, 1],
      )
      y = tf.reduce_sum(images, [1, 2, 3])
    with self.assertRaisesRegex(
      ValueError,
      r"`ys` must be twice differentiable with respect to `xs`; no second "
      r"derivatives of `ys` with respect to x:0: TensorFlow has no gradient "
      r"of Dilation2DBackpropInput \(.*\)",
    ):
      legacy.add_hessian_ops(graph, x, y)

  def test_rank_one_xs_error(self):
    with self.assertRaisesRegex(
      ValueError, r"`xs` must have rank >= 2 \(batch, features...\)"
    ):
      legacy.add_hessian_ops(self._graph(x_shape=(None,)), "x:0", "y:0")


if __name__ == "__main__":
  tf.test.main()
