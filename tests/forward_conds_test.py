"""The forward engine on models with `tf.cond`s (`forward/conds.py`).

Conds on one predicate that does not depend on x (Keras' learning phase,
a `training` placeholder) are walked one branch at a time, each in its
branch of a `tf.cond` on the predicate. Every result is compared, for both
values of the predicate and under control flow v1 (`Switch`/`Merge`) and v2
(`If`), with the row loop (`method="while_loop"`) on the same graph, which
differentiates the model's own conds.
"""

from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import testing_utils

import tf1hess
from tf1hess import _core
from tf1hess.forward import dispatch

_K = 4
_RNG = np.random.default_rng(5)
_OPS = {
  "hessian": tf1hess.batch_hessians,
  "diagonal": tf1hess.batch_hessian_diagonals,
  "laplacian": tf1hess.batch_laplacians,
}


def _weights(m, n):
  return tf.constant(_RNG.normal(size=(m, n)) / np.sqrt(m))


def _two_conds(x, training):
  """Two conds on `training`, the second reading the first."""
  h = tf.tanh(tf.matmul(x, _weights(_K, 6)) + 0.2)
  h = tf.cond(training, lambda: tf.tanh(h) * 2.0 + h * h, lambda: tf.sin(h))
  h = tf.cond(training, lambda: tf.nn.softplus(h), lambda: tf.identity(h))
  return tf.matmul(h, _weights(6, 1))


def _nested_conds(x, training):
  """A cond inside a branch of another, on the same predicate."""
  h = tf.matmul(x, _weights(_K, 5))

  def outer_true():
    inner = tf.cond(training, lambda: tf.exp(-h * h), lambda: h)
    return tf.sigmoid(inner) * h

  h = tf.cond(training, outer_true, lambda: tf.square(tf.tanh(h)))
  return tf.reduce_sum(h * tf.sin(x[:, :1]), axis=1)


def _cond_of_a_product(x, training):
  """A branch that multiplies two tensors of x, one read from outside."""
  u = tf.matmul(x, _weights(_K, 3))
  v = tf.tanh(u)
  h = tf.cond(training, lambda: u * v, lambda: v / (1.0 + u * u))
  return tf.reduce_sum(h, axis=1)


def _constant_branch(x, training):
  """A branch of constants only (under v1 they live by a control input)."""
  h = tf.tanh(tf.matmul(x, _weights(_K, 3)))
  extra = tf.cond(
    training,
    lambda: tf.reduce_sum(tf.sin(h) * h, axis=1),
    lambda: tf.constant(0.5, tf.float64),
  )
  return tf.reduce_sum(h * h, axis=1) + extra


def _weights_by_another_cond(x, training):
  """Weights chosen by a cond on another predicate, which x does not reach."""
  scale = tf.compat.v1.placeholder_with_default(True, [])
  w = _weights(6, 1)
  w = tf.cond(scale, lambda: 2.0 * w, lambda: w)
  h = tf.tanh(tf.matmul(x, _weights(_K, 6)))
  h = tf.cond(training, lambda: tf.nn.softplus(h), lambda: h * h)
  return tf.matmul(tf.sin(h), w)


_MODELS = {
  "two_conds": _two_conds,
  "nested_conds": _nested_conds,
  "cond_of_a_product": _cond_of_a_product,
  "constant_branch": _constant_branch,
  "weights_by_another_cond": _weights_by_another_cond,
}


@tf.custom_gradient
def _own_square(u):
  """`u * u` with a custom gradient (the exact one), which the engine does
  not follow."""
  return u * u, lambda dy: 2.0 * u * dy


def _custom_gradient_in_a_branch(x, cond, custom):
  """`custom` (`tf.nn.silu` or `_own_square`) of a tensor from outside the
  branch: its gradient function reads that tensor.

  `cond(true_fn, false_fn)` is a `tf.cond` on `training`, or calls one of
  them (a model without the cond).
  """
  u = tf.tanh(tf.matmul(x, _weights(_K, 5)) + 0.1)
  fn = {"silu": tf.nn.silu, "own": _own_square}[custom]
  h = cond(lambda: fn(u) + tf.sin(u), lambda: tf.sin(u) * u)
  return tf.reduce_sum(h, axis=1)


def _by_predicate(graph):
  return [op for op in graph.get_operations() if "by_predicate" in op.name]


class CondsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_auto_walks_the_branches_where_the_engine_is_chosen1",
    "test_batch_norm_in_training_takes_the_rows1",
    "test_cond_in_a_tf_function1",
    "test_keras_dropout1",
    "test_layers_dropout_with_a_training_placeholder1",
    "test_model_both_branches2",
    "test_model_both_branches3",
    "test_rows_in_a_branch_take_the_curvature_through_moments1",
    "test_rows_of_an_imported_cond_take_the_curvature_through_moments1",
    "test_state_changed_in_a_branch_falls_back1",
    "test_weight_gradients_through_dropout3",
    "test_weight_gradients_through_dropout5",
    "test_weight_gradients_through_dropout7",
  )

  def _check(self, x, feeds, method="forward", variables=False, branches=True):
    """The ops of `method` against the rows, on each feed; walked by branch
    (or, without `branches`, the rows of the whole model)."""
    graph = x.graph
    y = graph.get_tensor_by_name("y:0")
    outs = {name: op(y, x, method=method) for name, op in _OPS.items()}
    if branches:
      self.assertNotEmpty(_by_predicate(graph))
    else:
      self.assertEmpty(_by_predicate(graph))
    rows = tf1hess.batch_hessians(y, x, method="while_loop")
    with tf.compat.v1.Session() as sess:
      if variables:
        sess.run(tf.compat.v1.global_variables_initializer())
      for feed in feeds:
        values, h = sess.run([outs, rows], feed)
        self.assertAllClose(values["hessian"], h, atol=1e-10, rtol=1e-10)
        self.assertAllClose(values["diagonal"], np.einsum("nii->ni", h))
        self.assertAllClose(values["laplacian"], np.einsum("nii->n", h))

  @parameterized.product(model=list(_MODELS), cf=[1, 2])
  def test_model_both_branches(self, model, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      tf.identity(_MODELS[model](x, training), name="y")
      x_val = _RNG.normal(size=(5, _K))
      self._check(x, [{x: x_val}, {x: x_val, training: True}])

  @parameterized.parameters(1, 2)
  def test_auto_walks_the_branches_where_the_engine_is_chosen(self, cf):
    self.control_flow(cf)
    for engine in (True, False):
      with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float64, [None, _K])
        training = tf.compat.v1.placeholder_with_default(False, [])
        tf.identity(_two_conds(x, training), name="y")
        x_val = _RNG.normal(size=(5, _K))
        choice = dispatch.Choice(engine)
        with mock.patch.object(dispatch, "choose", return_value=choice):
          if engine:
            self._check(x, [{x: x_val}, {x: x_val, training: True}], "auto")
          else:
            tf1hess.batch_hessians(graph.get_tensor_by_name("y:0"), x)
            self.assertEmpty(_by_predicate(graph))

  @parameterized.parameters(1, 2)
  def test_keras_dropout(self, cf):
    keras = testing_utils.legacy_keras(self)
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = keras.layers.Dense(6, "tanh", dtype="float64")(x)
      h = keras.layers.Dropout(0.3, dtype="float64")(h)
      out = keras.layers.Dense(1, "softplus", dtype="float64")(h)
      tf.identity(out, name="y")
      self.assertTrue(
        any(
          op.type in ("If", "StatelessIf", "Merge")
          for op in x.graph.get_operations()
        )
      )
      phase = keras.backend.learning_phase()
      x_val = _RNG.normal(size=(5, _K))
      self._check_dropout(x, [{x: x_val}, {x: x_val, phase: True}], cf)

  @parameterized.parameters(1, 2)
  def test_layers_dropout_with_a_training_placeholder(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder(tf.bool, [])
      h = tf.compat.v1.layers.dense(x, 6, tf.tanh, name="d0")
      h = tf.compat.v1.layers.dropout(h, 0.5, training=training)
      tf.identity(tf.compat.v1.layers.dense(h, 1, tf.sin, name="d1"), "y")
      x_val = _RNG.normal(size=(5, _K))
      self._check_dropout(
        x, [{x: x_val, training: False}, {x: x_val, training: True}], cf
      )

  def _check_dropout(self, x, feeds, cf):
    """Inference walked, training on the rows (the model's own mask); under
    control flow v1 the rows of the whole model (`_rows_in_a_branch`)."""
    y = x.graph.get_tensor_by_name("y:0")
    with self.assertRaisesRegex(ValueError, "random or stateful"):
      tf1hess.batch_hessians(y, x, method="forward")
    choice = dispatch.Choice(True)
    with (
      self.assertLogs(level="WARNING") as logs,
      mock.patch.object(dispatch, "choose", return_value=choice),
    ):
      self._check(x, feeds, "auto", variables=True, branches=cf == 2)
    self.assertRegex(
      "\n".join(logs.output),
      ("is True" if cf == 2 else r"falls back to the row loop for \S+")
      + ": .* random or stateful",
    )

  @parameterized.product(
    op=["diagonal", "laplacian", "hessian"], cf=[1, 2], dropout=[0.0, 0.3]
  )
  def test_weight_gradients_through_dropout(self, op, cf, dropout):
    """Training on the second derivatives of a network with dropout behind
    a `training` placeholder (DeepXDE's `dropout_rate`): the gradient with
    respect to the weights is that of TensorFlow's nested gradients, in the
    same run (the same mask), in training and in inference."""
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      training = tf.compat.v1.placeholder(tf.bool, [])
      weights = [
        tf.Variable(_RNG.normal(size=shape) / np.sqrt(shape[0]))
        for shape in ((2, 8), (8, 8), (8, 1))
      ]
      h = x
      for w in weights[:-1]:
        h = tf.compat.v1.layers.dropout(
          tf.tanh(h @ w), dropout, training=training
        )
      y = h @ weights[-1]
      (g,) = tf.gradients(y, x)
      rows = tf.stack([tf.gradients(g[:, i], x)[0] for i in range(2)], 1)
      want = {
        "hessian": rows,
        "diagonal": tf.linalg.diag_part(rows),
        "laplacian": tf.linalg.trace(rows),
      }[op]
      got = _OPS[op](y, x)
      gradients = [
        tf.gradients(tf.reduce_sum(tf.square(value - 1.0)), weights)
        for value in (got, want)
      ]
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        x_val = _RNG.normal(size=(5, 2))
        for phase in (False, True):
          got_val, want_val = sess.run(gradients, {x: x_val, training: phase})
          self.assertAllClose(got_val, want_val, atol=1e-10, rtol=1e-10)

  @parameterized.parameters(1, 2)
  def test_a_branch_neither_can_differentiate_raises_when_taken(self, cf):
    # TensorFlow has no gradient of SoftsignGrad: no rows of this model.
    # Inference (the default) is walked; the dropout branch, which the
    # engine cannot follow, raises when a run takes it, instead of failing
    # the build.
    self.control_flow(cf)
    w0, w1 = _RNG.normal(size=(_K, 6)), _RNG.normal(size=(6, 1))
    x_val = _RNG.normal(size=(5, _K))

    def model(x, softsign):
      training = tf.compat.v1.placeholder_with_default(False, [])
      h = softsign(tf.matmul(x, tf.constant(w0)))
      h = tf.compat.v1.layers.dropout(h, 0.5, training=training)
      return tf.reduce_sum(tf.sin(tf.matmul(h, tf.constant(w1))), 1), training

    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      # The same function, written with ops TensorFlow differentiates twice.
      y, _ = model(x, lambda v: v / (1.0 + tf.abs(v)))
      expected = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        expected = sess.run(expected, {x: x_val})
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y, training = model(x, tf.nn.softsign)
      with self.assertLogs(level="WARNING") as logs:
        outs = {name: op(y, x) for name, op in _OPS.items()}
      self.assertRegex(
        "\n".join(logs.output),
        "falls back to an error at run time .* SoftsignGrad.* is True",
      )
      with tf.compat.v1.Session() as sess:
        values = sess.run(outs, {x: x_val})
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError,
          "no second derivatives .* is True: .* random or stateful.*"
          " no gradient of SoftsignGrad",
        ):
          sess.run(outs["hessian"], {x: x_val, training: True})
    self.assertAllClose(values["hessian"], expected, atol=1e-10, rtol=1e-10)
    self.assertAllClose(values["diagonal"], np.einsum("nii->ni", expected))
    self.assertAllClose(values["laplacian"], np.einsum("nii->n", expected))

  @parameterized.parameters(1, 2)
  def test_batch_norm_in_training_takes_the_rows(self, cf):
    # In its branch under control flow v2; under v1 the whole model's.
    keras = testing_utils.legacy_keras(self)
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = keras.layers.Dense(6, "tanh", dtype="float64")(x)
      h = keras.layers.BatchNormalization(dtype="float64")(h)
      tf.identity(tf.reduce_sum(tf.sin(h), axis=1), name="y")
      phase = keras.backend.learning_phase()
      x_val = _RNG.normal(size=(5, _K))
      choice = dispatch.Choice(True)
      with (
        self.assertLogs(level="WARNING") as logs,
        mock.patch.object(dispatch, "choose", return_value=choice),
      ):
        self._check(
          x,
          [{x: x_val}, {x: x_val, phase: True}],
          "auto",
          variables=True,
          branches=cf == 2,
        )
    self.assertRegex(
      "\n".join(logs.output),
      "falls back to the row loop " + (".* is True" if cf == 2 else "for"),
    )
    # The op named is the model's (in the copy's scope where it is copied).
    self.assertRegex("\n".join(logs.output), r"\(\S*batch_normalization/\S+\)")

  @parameterized.parameters(1, 2)
  def test_independence_checked_in_the_rows_of_a_branch(self, cf):
    # The batch norm's statistics in training (`tf.nn.moments` over the
    # batch) couple the samples; there TensorFlow's full product, which the
    # check of the whole result compares with, is wrong, and the rows that
    # the engine leaves the branch must check the samples themselves.
    keras = testing_utils.legacy_keras(self)
    self.control_flow(cf)
    x_val = _RNG.normal(size=(4, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      h = keras.layers.Dense(6, dtype="float64")(x)
      h = tf.compat.v1.layers.batch_normalization(h, training=training)
      y = tf.reduce_sum(tf.tanh(h), axis=1)
      checked = tf1hess.batch_hessians(y, x, check_independence=True)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        got, expected = sess.run([checked, rows], {x: x_val})
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, "not independent"
        ):
          sess.run(checked, {x: x_val, training: True})
    self.assertAllClose(got, expected, atol=1e-10, rtol=1e-10)

  @parameterized.parameters((1, "silu"), (2, "silu"), (1, "own"))
  def test_custom_gradient_in_a_branch(self, cf, custom):
    # TensorFlow's second derivatives through such a branch fail (v1: when
    # the cond takes the other branch; v2: the row loop does not build).
    # Auto takes the engine, even where the cost model prefers the rows;
    # under v1, the rows in the branch of a custom gradient it cannot
    # follow. (Under v2 no rows of that one build and run.)
    self.control_flow(cf)
    rng = np.random.default_rng(11)
    x_val = rng.normal(size=(4, _K))
    expected = {}
    for taken in (True, False):
      with tf.Graph().as_default():
        _RNG.bit_generator.state = np.random.default_rng(3).bit_generator.state
        x = tf.compat.v1.placeholder(tf.float64, [None, _K])
        y = _custom_gradient_in_a_branch(
          x, lambda a, b, t=taken: a() if t else b(), custom
        )
        rows = tf1hess.batch_hessians(y, x, method="while_loop")
        with tf.compat.v1.Session() as sess:
          expected[taken] = sess.run(rows, {x: x_val})
    with tf.Graph().as_default():
      _RNG.bit_generator.state = np.random.default_rng(3).bit_generator.state
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      y = _custom_gradient_in_a_branch(
        x, lambda a, b: tf.cond(training, a, b), custom
      )
      rows_preferred = dispatch.Choice(False)
      with mock.patch.object(dispatch, "choose", return_value=rows_preferred):
        auto = tf1hess.batch_hessians(y, x)
      with tf.compat.v1.Session() as sess:
        for taken in (True, False):
          self.assertAllClose(
            sess.run(auto, {x: x_val, training: taken}),
            expected[taken],
            atol=1e-10,
            rtol=1e-10,
          )

  @parameterized.parameters(1, 2)
  def test_conds_on_two_predicates_fall_back(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      a, b = (tf.compat.v1.placeholder_with_default(False, []) for _ in "ab")
      h = tf.cond(a, lambda: tf.tanh(x), lambda: tf.sin(x))
      y = tf.reduce_sum(tf.cond(b, lambda: h * h, lambda: tf.exp(h)), axis=1)
      with self.assertRaisesRegex(ValueError, "2 different predicates"):
        tf1hess.batch_hessians(y, x, method="forward")
      with self.assertLogs(level="WARNING") as logs:
        auto = tf1hess.batch_hessians(y, x)
      self.assertRegex("\n".join(logs.output), "2 different predicates")
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        feed = {x: _RNG.normal(size=(3, _K)), b: True}
        self.assertAllClose(*sess.run([auto, rows], feed))

  @parameterized.parameters(1, 2)
  def test_conds_of_an_imported_graph(self, cf):
    # A GraphDef keeps no v1 cond contexts: auto takes the rows there.
    self.control_flow(cf)
    with tf.Graph().as_default() as model:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K], name="x")
      training = tf.compat.v1.placeholder_with_default(False, [], "training")
      h = tf.cond(training, lambda: tf.sin(x) * 2.0, lambda: tf.sin(x))
      tf.reduce_sum(h * h, axis=1, name="y")
    with tf.Graph().as_default() as graph:
      tf.compat.v1.import_graph_def(model.as_graph_def(), name="m")
      x, y, training = (
        graph.get_tensor_by_name(f"m/{name}:0")
        for name in ("x", "y", "training")
      )
      if cf == 1:
        with self.assertRaisesRegex(ValueError, "cond without its control"):
          tf1hess.batch_hessians(y, x, method="forward")
      outs = {name: op(y, x) for name, op in _OPS.items()}
      x_val = _RNG.normal(size=(3, _K))
      with tf.compat.v1.Session() as sess:
        for scale in (1.0, 2.0):
          values = sess.run(outs, {x: x_val, training: scale == 2.0})
          # d2/dx2 (s sin x)^2 = 2 s^2 cos 2x, per feature.
          want = 2 * scale**2 * np.cos(2 * x_val)
          self.assertAllClose(values["diagonal"], want)
          hessians = np.stack([np.diag(w) for w in want])
          self.assertAllClose(values["hessian"], hessians)
          self.assertAllClose(values["laplacian"], want.sum(1))

  def _check_moments_rows(self, x, y, feeds):
    """Auto's rows of `y`, a model normalized by `tf.nn.moments`, against
    float64 differences of its gradient, with no warning of the moments."""
    with mock.patch.object(_core, "warn_once", wraps=_core.warn_once) as warn:
      outs = {name: op(y, x) for name, op in _OPS.items()}
    for call in warn.call_args_list:
      self.assertNotIn("tf.nn.moments", call.args[1])
    (grad,) = tf.gradients(y, x)
    x_val = _RNG.normal(size=(3, _K))
    with tf.compat.v1.Session() as sess:
      for feed in feeds:
        values = sess.run(outs, {x: x_val, **feed})
        want = testing_utils.central_difference_jacobian(
          lambda v, feed=feed: sess.run(grad, {x: v, **feed}), x_val
        )
        self.assertAllClose(values["hessian"], want, atol=1e-7)
        self.assertAllClose(values["diagonal"], np.einsum("nii->ni", want))
        self.assertAllClose(values["laplacian"], np.einsum("nii->n", want))

  @parameterized.parameters(1, 2)
  def test_rows_of_an_imported_cond_take_the_curvature_through_moments(
    self, cf
  ):
    """Auto falls back to the rows on an imported v1 cond; they get the
    curvature through the mean that `tf.nn.moments` stops, which
    TensorFlow's rows miss (by 10% of the Hessian here)."""
    self.control_flow(cf)
    with tf.Graph().as_default() as model:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K], name="x")
      training = tf.compat.v1.placeholder_with_default(False, [], "training")
      h = tf.matmul(x, _weights(_K, 6))
      h = tf.cond(training, lambda: tf.sin(h), lambda: h * 0.5)
      mean, variance = tf.nn.moments(h, axes=[1], keepdims=True)
      h = (h - mean) * tf.math.rsqrt(variance + 1e-3)
      tf.reduce_sum(tf.nn.softplus(h) * tf.range(1.0, 7.0, dtype=h.dtype), 1)
      tf.identity(model.get_operations()[-1].outputs[0], name="y")
    with tf.Graph().as_default() as graph:
      tf.compat.v1.import_graph_def(model.as_graph_def(), name="m")
      x, y, training = (
        graph.get_tensor_by_name(f"m/{name}:0")
        for name in ("x", "y", "training")
      )
      self._check_moments_rows(x, y, [{training: False}, {training: True}])

  @parameterized.parameters(1, 2)
  def test_rows_in_a_branch_take_the_curvature_through_moments(self, cf):
    """The branch the engine cannot follow (`Dawsn` has no forward rule)
    gets the rows, with the curvature through `tf.nn.moments`' mean."""
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      h = tf.matmul(x, _weights(_K, 6))
      h = tf.cond(training, lambda: tf.math.special.dawsn(h), lambda: h * h)
      mean, variance = tf.nn.moments(h, axes=[1], keepdims=True)
      h = (h - mean) * tf.math.rsqrt(variance + 1e-3)
      y = tf.reduce_sum(tf.sin(h), 1)
      self._check_moments_rows(x, y, [{training: False}, {training: True}])

  @parameterized.parameters(1, 2)
  def test_cond_in_a_tf_function(self, cf):
    """A Python `if` on a tensor in a `tf.function` is a cond in the body
    of the function the model calls: its copies' branches must be found
    from the graph they are made in."""
    self.control_flow(cf)

    @tf.function
    def model(x, training):
      if training:
        h = tf.sin(x) * 2.0
      else:
        h = tf.sin(x)
      return tf.reduce_sum(h * h, axis=1)

    @tf.function
    def of_x(x):
      if tf.reduce_sum(x) > 0.0:
        return tf.reduce_sum(tf.sin(x) ** 2, axis=1)
      return tf.reduce_sum(tf.sin(x) ** 2, axis=1) * 0.5

    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      y = model(x, training)
      outs = [
        op(y, x, method=method)
        for method in ("forward", "auto")
        for op in _OPS.values()
      ]
      with self.assertLogs(level="WARNING"):  # Falls back: a cond of x.
        outs.append(tf1hess.batch_hessians(of_x(x), x))
      outs.append(tf1hess.batch_hessians(y, x, method="while_loop"))
      with tf.compat.v1.Session() as sess:
        for scale in (1.0, 2.0):
          *values, by_x, rows = sess.run(
            outs, {x: x_val, training: scale == 2.0}
          )
          want = 2 * scale**2 * np.cos(2 * x_val)
          for h, d, lap in (values[:3], values[3:]):
            self.assertAllClose(h, [np.diag(w) for w in want])
            self.assertAllClose(d, want)
            self.assertAllClose(lap, want.sum(1))
          self.assertAllClose(rows, values[0])
          half = 1.0 if x_val.sum() > 0 else 0.5
          self.assertAllClose(
            by_x, [np.diag(w) for w in 2 * half * np.cos(2 * x_val)]
          )

  @parameterized.parameters(1, 2)
  def test_state_changed_in_a_branch_falls_back(self, cf):
    # A copy of the branch would not update the counter: auto takes the
    # rows, which run the model's cond, once per run.
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      counter = tf.Variable(0, dtype=tf.int64)
      u = tf.matmul(x, _weights(_K, 5))

      def counted():
        with tf.control_dependencies([counter.assign_add(1)]):
          return tf.reduce_sum(tf.tanh(u), 1)

      y = tf.cond(training, counted, lambda: tf.reduce_sum(u * u, 1))
      with self.assertRaisesRegex(ValueError, "AssignAddVariableOp"):
        tf1hess.batch_hessians(y, x, method="forward")
      auto = tf1hess.batch_hessians(y, x)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        sess.run(counter.initializer)
        feed = {x: _RNG.normal(size=(3, _K)), training: True}
        self.assertAllClose(sess.run(auto, feed), sess.run(rows, feed))
        sess.run(auto, feed)
        self.assertEqual(sess.run(counter), 3)

  @parameterized.parameters(1, 2)
  def test_predicate_of_x_falls_back(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      positive = tf.reduce_sum(x) > 0.0  # Of every sample: mixes them.
      y = tf.reduce_sum(tf.cond(positive, lambda: x**3, lambda: x**2), 1)
      with self.assertRaisesRegex(ValueError, "which depends on x"):
        tf1hess.batch_hessians(y, x, method="forward")


def _in_a_cond(pred, build, like):
  """`build()` in the true branch of a user's `tf.cond` on `pred`, zeros
  in the other."""
  return tf.cond(
    pred, build, lambda: tf.nest.map_structure(tf.zeros_like, like)
  )


class CallsInAUsersCondTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """The ops called in a branch of the user's own `tf.cond`, against the
  row loop outside it (nested `tf.gradients` of the same model)."""

  slow_cases = (
    "test_model_without_conds0",
    "test_model_without_conds2",
    "test_model_without_conds3",
  )

  _METHODS = ("auto", "forward", "while_loop")

  def _compare(self, pairs, feeds):
    with tf.compat.v1.Session() as sess:
      for feed in feeds:
        for got, want in sess.run(pairs, feed):
          self.assertAllClose(got, want, atol=1e-10, rtol=1e-10)

  @parameterized.product(cf=[1, 2], built=["outside", "inside"])
  def test_model_without_conds(self, cf, built):
    # Under control flow v2 a branch is a function graph: the model outside
    # is read through captures, and a model built in the branch reads the
    # capture of `x`. Under v1 the model inside reads `x` through the
    # cond's `Switch`.
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      p = tf.compat.v1.placeholder(tf.bool, [])
      w1, w2 = _weights(_K, 6), _weights(6, 1)

      def model():
        h = tf.nn.softplus(tf.matmul(x, w1)) * tf.sin(x[:, :1])
        return tf.reduce_sum(tf.tanh(tf.matmul(h, w2)), axis=1)

      y = model()
      want = tf1hess.batch_hessians(y, x, method="while_loop")
      pairs = []
      for method in self._METHODS:
        for name, op in _OPS.items():

          def build(op=op, method=method):
            return op(y if built == "outside" else model(), x, method=method)

          like = {"hessian": want}.get(name, op(y, x, method="while_loop"))
          pairs.append((_in_a_cond(p, build, like), like))
      x_val = _RNG.normal(size=(5, _K))
      self._compare(pairs, [{x: x_val, p: True}, {x: x_val[:0], p: True}])

  def test_v2_model_built_in_the_branch_of_a_layer_outside_raises(self):
    # `ys` read `x` through another capture: a walk in the branch from the
    # capture of `x` would miss that path.
    self.control_flow(2)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = tf.tanh(tf.matmul(x, _weights(_K, 3)))
      with self.assertRaisesRegex(ValueError, "depend on `xs` through Tanh"):
        tf.cond(
          tf.constant(True),
          lambda: tf1hess.batch_hessians(tf.reduce_sum(h * x[:, :3], 1), x),
          lambda: tf.zeros([tf.shape(x)[0], _K, _K], tf.float64),
        )

  def test_eager_ops_under_a_python_if_in_a_tf_function(self):
    # AutoGraph makes the `if` a cond: `fn(x)` is built in its branch.
    def fn(x):
      return tf.reduce_sum(tf.sin(x) ** 2, axis=1)

    @tf.function
    def hessians(x, flag):
      if flag > 0:
        return tf1hess.eager.batch_hessians(fn, x)
      return tf1hess.eager.batch_hessians(fn, x, method="while_loop") * 0.5

    x_val = _RNG.normal(size=(4, 3))
    want = np.stack([np.diag(2 * np.cos(2 * r)) for r in x_val])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      flag = tf.compat.v1.placeholder(tf.int32, [])
      out = hessians(x, flag)
      with tf.compat.v1.Session() as sess:
        self.assertAllClose(sess.run(out, {x: x_val, flag: 1}), want)
        self.assertAllClose(sess.run(out, {x: x_val, flag: 0}), want / 2)

  def test_model_with_a_v1_cond_outside_a_users_v1_cond(self):
    # TensorFlow's second derivatives through the model's cond, of a
    # gradient built in the user's branch, were wrong (all methods, and
    # the per-output ops): the ops are built outside the branch.
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      p = tf.compat.v1.placeholder(tf.bool, [])
      training = tf.compat.v1.placeholder_with_default(False, [])
      y = tf.squeeze(_two_conds(x, training), 1)
      y2 = tf.stack([y, tf.reduce_sum(tf.sin(x), 1) * y], 1)
      v = tf.ones_like(x)
      builds = {
        "auto": lambda: tf1hess.batch_hessians(y, x),
        "while_loop": lambda: tf1hess.batch_hessians(y, x, method="while_loop"),
        "pfor": lambda: tf1hess.batch_hessians(y, x, method="pfor"),
        "diagonals": lambda: tf1hess.batch_hessian_diagonals(y, x),
        "laplacians": lambda: tf1hess.batch_laplacians(y, x),
        "products": lambda: tf1hess.batch_hessian_vector_products(y, x, v),
        "outputs": lambda: tf1hess.batch_output_hessians(y2, x),
        "output laplacians": lambda: tf1hess.batch_output_laplacians(y2, x),
        "Derivatives": lambda: tf1hess.Derivatives(y2, x).hessian(component=1),
      }
      pairs = {}
      for name, build in builds.items():
        want = build()
        pairs[name] = (_in_a_cond(p, build, want), want)
      want = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        x_val = _RNG.normal(size=(5, _K))
        for phase in (False, True):
          feed = {x: x_val, p: True, training: phase}
          hessians = sess.run(want, feed)
          # The reference: central differences of the gradient.
          (g,) = tf.gradients(y, x)
          steps = [1e-5 * np.eye(_K)[i] for i in range(_K)]
          differences = (
            np.stack(
              [
                sess.run(g, {**feed, x: x_val + s})
                - sess.run(g, {**feed, x: x_val - s})
                for s in steps
              ],
              axis=1,
            )
            / 2e-5
          )
          self.assertAllClose(hessians, differences, atol=1e-6)
          for name, (got, outside) in pairs.items():
            got, outside = sess.run([got, outside], feed)
            self.assertAllClose(got, outside, atol=1e-10, msg=name)
          got = sess.run(pairs["auto"][0], feed)
          self.assertAllClose(got, hessians, atol=1e-10)

  def test_model_with_a_v1_cond_built_in_a_users_v1_cond_raises(self):
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      training = tf.compat.v1.placeholder_with_default(False, [])
      y = tf.squeeze(_two_conds(x, training), 1)
      zeros = tf.zeros([tf.shape(x)[0], _K, _K], tf.float64)
      for build, where in (
        (
          lambda: tf1hess.batch_hessians(
            tf.squeeze(_two_conds(x, training), 1), x
          ),
          "built in that branch",
        ),
        (lambda: tf1hess.batch_hessians(y * 2.0, x), "built in that branch"),
      ):
        with self.assertRaisesRegex(ValueError, f"cond of its own.*{where}"):
          tf.cond(tf.constant(True), build, lambda: zeros)

      def under_a_dependency():
        with tf.control_dependencies([tf.no_op()]):
          return tf1hess.batch_hessians(y, x)

      with self.assertRaisesRegex(ValueError, "control dependencies"):
        tf.cond(tf.constant(True), under_a_dependency, lambda: zeros)


if __name__ == "__main__":
  tf.compat.v1.disable_eager_execution()
  tf.test.main()
