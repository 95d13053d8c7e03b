"""Tests of the graph ops against analytic Hessians, tf.hessians and FD."""

import itertools
import os
import subprocess
import sys
import textwrap

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess import _compat
import tf1hess.dde

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TOL = {
  tf.float16: 3e-2,
  tf.bfloat16: 1e-1,
  tf.float32: 1e-4,
  tf.float64: 1e-10,
}


def _quadratic(x, a):
  """Per-sample `x^T A x` for `x (N, K)`; its Hessian is `A + A^T`."""
  return tf.einsum("ni,ij,nj->n", x, tf.constant(a, x.dtype), x)


class BatchHessiansTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_third_derivatives_compiled_by_xla2",
    "test_third_derivatives_of_dynamic_features_compiled_by_xla1",
    "test_third_derivatives_of_dynamic_features_compiled_by_xla2",
    "test_weight_gradients_compiled_by_xla0",
    "test_weight_gradients_compiled_by_xla1",
  )

  @parameterized.product(
    n=[0, 1, 7, 64],
    dtype=[tf.float16, tf.bfloat16, tf.float32, tf.float64],
    cf=[1, 2],
  )
  def test_quadratic_form_matches_analytic(self, n, dtype, cf):
    self.control_flow(cf)
    k = 4
    a = np.random.default_rng(1).normal(size=(k, k)).round(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(dtype, [None, k])
      h = tf1hess.batch_hessians(_quadratic(x, a), x)
      self.assertEqual(h.shape.as_list(), [None, k, k])
      x_val = np.random.default_rng(2).normal(size=(n, k))
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {x: x_val})
    expected = np.broadcast_to(a + a.T, (n, k, k))
    self.assertEqual(out.shape, (n, k, k))
    self.assertAllClose(
      out.astype(np.float64), expected, atol=_TOL[dtype] * 10, rtol=_TOL[dtype]
    )

  @parameterized.product(n=[1, 7], cf=[1, 2], dtype=[tf.float32, tf.float64])
  def test_tanh_mlp_matches_tf_hessians_blocks_and_analytic(self, n, cf, dtype):
    self.control_flow(cf)
    weights = testing_utils.mlp_weights(5)
    x_val = np.random.default_rng(3).normal(size=(n, 5))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(dtype, [None, 5])
      y = testing_utils.tanh_mlp(x, *weights)
      h = tf1hess.batch_hessians(y, x)
      full = tf.hessians(y, x)[0]
      with tf.compat.v1.Session() as sess:
        out, full_val = sess.run([h, full], {x: x_val})
    tol = _TOL[dtype]
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val), atol=tol)
    self.assertAllClose(
      out, testing_utils.tanh_mlp_hessians(x_val, *weights), atol=tol * 10
    )

  def test_dynamic_number_of_features(self):
    weights = testing_utils.mlp_weights(3)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, None])
      y = testing_utils.tanh_mlp(tf.reshape(x, [-1, 3]), *weights)
      h = tf1hess.batch_hessians(y, x)
      self.assertEqual(h.shape.as_list(), [None, None, None])
      with tf.compat.v1.Session() as sess:
        for n in (0, 1, 6):
          x_val = np.random.default_rng(n).normal(size=(n, 3))
          self.assertAllClose(
            sess.run(h, {x: x_val}),
            testing_utils.tanh_mlp_hessians(x_val, *weights),
          )

  def test_static_shape_is_kept(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [5, 2, 3])
      h = tf1hess.batch_hessians(tf.reduce_sum(x**3), x)
      self.assertEqual(h.shape.as_list(), [5, 2, 3, 2, 3])

  @parameterized.parameters(1, 2)
  def test_rank3_xs_matches_tf_hessians_blocks(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2, 3])
      w = tf.constant(np.random.default_rng(0).normal(size=(3, 3)))
      y = tf.reduce_sum(tf.sin(tf.einsum("nab,bc->nac", x, w)) * x, [1, 2])
      h = tf1hess.batch_hessians(y, x)
      full = tf.hessians(y, x)[0]
      x_val = np.random.default_rng(1).normal(size=(4, 2, 3))
      with tf.compat.v1.Session() as sess:
        out, full_val = sess.run([h, full], {x: x_val})
    self.assertEqual(out.shape, (4, 2, 3, 2, 3))
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val))

  def test_list_of_xs_returns_list(self):
    testing_utils.check_list_of_xs(
      self,
      lambda x1, x2: tf.reduce_sum(tf.sin(x1), 1) * tf.reduce_sum(x2**2, 1),
      lambda y, xs: tf1hess.batch_hessians([y], xs),
    )

  def test_list_of_ys_is_summed(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      h_list = tf1hess.batch_hessians([x[:, 0] ** 3, x[:, 1] ** 3], x)
      h_sum = tf1hess.batch_hessians(x[:, 0] ** 3 + x[:, 1] ** 3, x)
      with tf.compat.v1.Session() as sess:
        a, b = sess.run([h_list, h_sum], {x: [[1.0, 2.0]]})
    self.assertAllClose(a, [[[6.0, 0.0], [0.0, 12.0]]])
    self.assertAllClose(a, b)

  @parameterized.parameters(1, 2)
  def test_unconnected_and_linear_give_zeros(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      other = tf.compat.v1.placeholder(tf.float32, [None, 3])
      linear = tf.reduce_sum(x * 2.0, axis=1)
      h_linear = tf1hess.batch_hessians(linear, x)
      h_unconnected = tf1hess.batch_hessians(tf.reduce_sum(other**2), x)
      with tf.compat.v1.Session() as sess:
        a, b = sess.run(
          [h_linear, h_unconnected],
          {x: np.ones((4, 3)), other: np.ones((4, 3))},
        )
    self.assertAllEqual(a, np.zeros((4, 3, 3)))
    self.assertAllEqual(b, np.zeros((4, 3, 3)))

  @parameterized.parameters("auto", "while_loop", "pfor", "forward")
  def test_weight_gradients_compiled_by_xla(self, method):
    # A loss of Hessians trained in a tf.function with jit_compile=True and
    # a batch of None: XLA needs a bound it knows on the loops whose
    # gradients it compiles ("XLA compilation requires a fixed tensor list
    # size"). The rows' loop has one; the engine takes no chunks of N.
    version = _compat.parse_version(tf.__version__)
    if method == "pfor" and version < (2, 17):
      self.skipTest(
        "XLA of TensorFlow <= 2.15 (2.16 not measured) cannot prove pfor's "
        "dynamic dimensions equal ('Fail to proof the equality of two "
        "dimensions at compile time')"
      )
    rng = np.random.default_rng(31)
    shapes = ((10, 64), (64, 64), (64, 1))
    weights = [tf.Variable(rng.normal(size=s) / s[0]) for s in shapes]

    def loss(x):
      with tf.GradientTape() as tape:
        y = tf.matmul(tf.tanh(tf.matmul(x, weights[0])), weights[1])
        y = tf.matmul(tf.tanh(y), weights[2])
        value = tf.reduce_sum(tf1hess.batch_hessians(y, x, method=method) ** 2)
      return value, tape.gradient(value, weights)

    spec = [tf.TensorSpec([None, 10], tf.float64)]
    x_val = rng.normal(size=(700, 10))
    compiled = tf.function(loss, input_signature=spec, jit_compile=True)
    self.assertAllClose(
      compiled(x_val), tf.function(loss, input_signature=spec)(x_val)
    )

  @parameterized.parameters("auto", "while_loop", "pfor", "forward")
  def test_third_derivatives_compiled_by_xla(self, method):
    # Under XLA the levels of rows that are differentiated again are
    # unrolled: a `tf.while_loop` of rows in the gradient of another does
    # not compile ("Cannot find body function"), and pfor's vectorized
    # gradients of pfor's rows mix up branch shapes.
    version = _compat.parse_version(tf.__version__)
    if method == "pfor" and version < (2, 17):
      self.skipTest("XLA of TensorFlow <= 2.15 cannot compile pfor's rows")
    w = np.random.default_rng(32).normal(size=(3, 4))

    def fn(x):
      product = x[:, 0] * x[:, 1] ** 2
      return tf.reduce_sum(tf.sin(tf.matmul(x, w)), axis=1) + product

    spec = [tf.TensorSpec([None, 3], tf.float64)]
    compiled = tf.function(
      lambda x: tf1hess.eager.batch_derivatives(fn, x, 3, method=method),
      input_signature=spec,
      jit_compile=True,
    )
    x = np.random.default_rng(33).normal(size=(5, 3))
    # d3/dx_i dx_j dx_k of sum_u sin(z_u), z = x w: -cos(z_u) w_iu w_ju w_ku.
    expected = np.einsum("nu,iu,ju,ku->nijk", -np.cos(x @ w), w, w, w)
    for i, j, k in set(itertools.permutations((0, 1, 1))):
      expected[:, i, j, k] += 2.0  # Of x0 x1^2.
    self.assertAllClose(compiled(x), expected)
    if method != "pfor":  # pfor's vectorized gradients fail on N = 0 there.
      self.assertEqual(compiled(np.zeros((0, 3))).shape, (0, 3, 3, 3))

  @parameterized.parameters("auto", "while_loop", "pfor")
  def test_third_derivatives_of_dynamic_features_compiled_by_xla(self, method):
    # With K known only at run time the rows differentiated again are
    # vectorized without chunks, not looped.
    version = _compat.parse_version(tf.__version__)
    if version < (2, 17):
      self.skipTest("XLA of TensorFlow <= 2.15 cannot compile pfor's rows")
    compiled = tf.function(
      lambda x: tf1hess.eager.batch_derivatives(
        lambda x: tf.reduce_sum(tf.sin(x) ** 3, axis=1), x, 3, method=method
      ),
      input_signature=[tf.TensorSpec([None, None], tf.float64)],
      jit_compile=True,
    )
    x = np.random.default_rng(34).normal(size=(4, 3))
    s, c = np.sin(x), np.cos(x)
    expected = np.zeros((4, 3, 3, 3))
    for i in range(3):  # The third derivative of sin^3.
      expected[:, i, i, i] = 6 * c[:, i] ** 3 - 21 * s[:, i] ** 2 * c[:, i]
    self.assertAllClose(compiled(x), expected)

  @parameterized.product(
    method=["auto", "while_loop", "pfor", "forward"], cf=[1, 2]
  )
  def test_no_features(self, method, cf):
    """`x` of shape `(N, 0)`: empty derivatives, of every order."""
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 0])
      y = tf.reduce_sum(tf.tanh(x), axis=1) + 1.0
      outs = {
        "hessians": tf1hess.batch_hessians(y, x, method=method),
        "diagonals": tf1hess.batch_hessian_diagonals(y, x, method=method),
        "laplacians": tf1hess.batch_laplacians(y, x, method=method),
      }
      if method != "forward":
        outs["third"] = tf1hess.batch_derivatives(y, x, 3, method=method)
      with tf.compat.v1.Session() as sess:
        got = sess.run(outs, {x: np.zeros((3, 0))})
    self.assertEqual(got["hessians"].shape, (3, 0, 0))
    self.assertEqual(got["diagonals"].shape, (3, 0))
    self.assertAllEqual(got["laplacians"], np.zeros(3))
    if method != "forward":
      self.assertEqual(got["third"].shape, (3, 0, 0, 0))

  def test_unconnected_none_gives_none(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      other = tf.compat.v1.placeholder(tf.float32, [None, 3])
      self.assertIsNone(
        tf1hess.batch_hessians(
          tf.reduce_sum(x * 2.0), x, unconnected_gradients="none"
        )
      )
      self.assertIsNone(
        tf1hess.batch_hessians(
          tf.reduce_sum(other**2),
          x,
          unconnected_gradients=tf.UnconnectedGradients.NONE,
        )
      )
      self.assertIsNotNone(
        tf1hess.batch_hessians(
          tf.reduce_sum(x**2), x, unconnected_gradients="none"
        )
      )

  def test_name_scope_is_used(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      h = tf1hess.batch_hessians(tf.reduce_sum(x**3), x, name="my_hess")
      d = tf1hess.batch_hessian_diagonals(tf.reduce_sum(x**3), x)
    self.assertStartsWith(h.name, "my_hess/")
    self.assertStartsWith(d.name, "batch_hessian_diagonals/")

  def test_inside_tf_function_with_none_batch(self):
    weights = testing_utils.mlp_weights(4)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float64)])
    def hessians(x):
      return tf1hess.batch_hessians(testing_utils.tanh_mlp(x, *weights), x)

    for n in (0, 1, 7):
      x_val = np.random.default_rng(n).normal(size=(n, 4))
      self.assertAllClose(
        hessians(x_val), testing_utils.tanh_mlp_hessians(x_val, *weights)
      )

  def test_scan_model_under_control_flow_v2(self):
    self.control_flow(2)
    testing_utils.check_scan_model_hessians(self, tf1hess.batch_hessians)

  def test_loop_outside_the_path_from_xs_is_fine_under_v1(self):
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      scale = tf.while_loop(
        lambda i, s: i < 3,
        lambda i, s: (i + 1, s * 1.5),
        [0, tf.constant(1.0, tf.float64)],
      )[1]
      h = tf1hess.batch_hessians(scale * tf.reduce_sum(x**3, 1), x)
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {x: [[1.0, 2.0]]})
    self.assertAllClose(out, [np.diag([1.5**3 * 6.0, 1.5**3 * 12.0])])

  def test_scan_model_under_control_flow_v1(self):
    # TensorFlow takes no second derivatives through the v1 loop: the
    # engine does, unrolled; the rows raise clearly.
    self.control_flow(1)
    testing_utils.check_scan_model_hessians(self, tf1hess.batch_hessians)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = testing_utils.scan_model(x)
      with self.assertRaisesRegex(ValueError, "enable_control_flow_v2"):
        tf1hess.batch_hessians(y, x, method="while_loop")


class IndependenceCheckTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("square_of_batch_sum", lambda x: tf.reduce_sum(x) ** 2),
    (
      "batch_norm_training",
      lambda x: tf.reduce_sum(
        tf.tanh(
          (x - tf.reduce_mean(x, 0)) / tf.sqrt(tf.math.reduce_variance(x, 0))
        )
        ** 3
      ),
    ),
  )
  def test_fires_on_coupled_samples(self, fn):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      h = tf1hess.batch_hessians(fn(x), x, check_independence=True)
      with tf.compat.v1.Session() as sess:
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, "are not independent"
        ):
          sess.run(h, {x: np.random.default_rng(0).normal(size=(16, 3))})

  @parameterized.parameters(tf.float16, tf.float32, tf.float64)
  def test_silent_on_independent_samples(self, dtype):
    weights = testing_utils.mlp_weights(6, hidden=32)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(dtype, [None, 6])
      y = testing_utils.tanh_mlp(x, *weights)
      h = tf1hess.batch_hessians(y, x, check_independence=True)
      with tf.compat.v1.Session() as sess:
        for n in (0, 1, 64):
          x_val = np.random.default_rng(n).normal(size=(n, 6))
          out = sess.run(h, {x: x_val})
          self.assertEqual(out.shape, (n, 6, 6))


class CompanionsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(0, 1, 7)
  def test_gradients_diagonals_and_products(self, n):
    weights = testing_utils.mlp_weights(4)
    rng = np.random.default_rng(n)
    x_val, v_val = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      v = tf.compat.v1.placeholder(tf.float64, [None, 4])
      y = testing_utils.tanh_mlp(x, *weights)
      ops = [
        tf1hess.batch_gradients(y, x),
        tf1hess.batch_hessian_diagonals(y, x),
        tf1hess.batch_hessian_vector_products(y, x, v),
      ]
      for op in ops:
        self.assertEqual(op.shape.as_list(), [None, 4])
      with tf.compat.v1.Session() as sess:
        grads, diagonals, products = sess.run(ops, {x: x_val, v: v_val})
    hessians = testing_utils.tanh_mlp_hessians(x_val, *weights)
    self.assertAllClose(
      grads, testing_utils.tanh_mlp_gradients(x_val, *weights)
    )
    self.assertAllClose(diagonals, np.einsum("nii->ni", hessians))
    self.assertAllClose(products, np.einsum("nij,nj->ni", hessians, v_val))

  def test_products_of_a_batch_gathered_are_dense(self):
    # TensorFlow's gradient of a `tf.gather` is `IndexedSlices`.
    x_val = np.random.default_rng(3).normal(size=(4, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      reverse = tf.range(tf.shape(x)[0])[::-1]
      y = tf.reduce_sum(tf.sin(tf.gather(x, reverse)) ** 2, 1)
      hv = tf1hess.batch_hessian_vector_products(y, x, tf.ones_like(x))
      self.assertIsInstance(hv, tf.Tensor)
      with tf.compat.v1.Session() as sess:
        out = sess.run(hv, {x: x_val})
    self.assertAllClose(out, 2 * np.cos(2 * x_val))

  def test_companions_give_zeros_for_linear(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      y = tf.reduce_sum(3.0 * x)
      d = tf1hess.batch_hessian_diagonals(y, x)
      hv = tf1hess.batch_hessian_vector_products(y, x, tf.ones_like(x))
      with tf.compat.v1.Session() as sess:
        out = sess.run([d, hv], {x: np.ones((3, 2))})
    self.assertAllEqual(out[0], np.zeros((3, 2)))
    self.assertAllEqual(out[1], np.zeros((3, 2)))

  def test_vector_products_argument_errors(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      y = tf.reduce_sum(x**3)
      with self.assertRaisesRegex(ValueError, r"`vs` must hold one tensor"):
        tf1hess.batch_hessian_vector_products(y, x, [x, x])
      with self.assertRaisesRegex(ValueError, r"`vs` must have the shape"):
        tf1hess.batch_hessian_vector_products(y, x, tf.ones([3, 5]))
      with self.assertRaisesRegex(TypeError, r"`vs` must have the dtype"):
        tf1hess.batch_hessian_vector_products(y, x, tf.ones([3, 2], tf.float64))
      v = tf.compat.v1.placeholder(tf.float32, [None, None])
      hv = tf1hess.batch_hessian_vector_products(tf.sin(x), x, v)
      with tf.compat.v1.Session() as sess:
        feed = {x: np.ones((3, 2)), v: np.ones((3, 2))}
        self.assertAllClose(sess.run(hv, feed), -np.sin(feed[x]))
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, r"`vs` must have the shape of `xs`"
        ):
          sess.run(hv, {x: np.ones((3, 2)), v: np.ones((3, 3))})


class LegacyModelsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """Models built the way TF1 code builds them, against tf.hessians blocks."""

  slow_cases = (
    "test_lstm_dynamic_rnn_under_control_flow_v2",
    "test_lstm_unrolled0",
  )

  def _compare_with_tf_hessians(self, build, x_shape, n=3, atol=1e-6):
    with tf.Graph().as_default():
      tf.compat.v1.set_random_seed(0)
      x = tf.compat.v1.placeholder(tf.float64, [None] + x_shape)
      y = build(x)
      h = tf1hess.batch_hessians(y, x)
      full = tf.hessians(y, x)[0]
      x_val = np.random.default_rng(0).normal(size=[n] + x_shape)
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        out, full_val = sess.run([h, full], {x: x_val})
    self.assertEqual(out.shape, (n,) + tuple(x_shape) * 2)
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val), atol=atol)
    return out

  @parameterized.parameters(1, 2)
  def test_dense_stack(self, cf):
    self.control_flow(cf)

    def build(x):
      h = tf.compat.v1.layers.dense(x, 16, activation=tf.nn.softplus)
      h = tf.compat.v1.layers.dense(h, 16, activation=tf.tanh)
      return tf.compat.v1.layers.dense(h, 1)

    self._compare_with_tf_hessians(build, [5])

  def test_conv_net(self):
    def build(x):
      h = tf.compat.v1.layers.conv2d(
        x, 4, 3, padding="same", activation=tf.tanh
      )
      h = tf.compat.v1.layers.conv2d(h, 2, 3, activation=tf.nn.elu)
      return tf.compat.v1.layers.dense(tf.compat.v1.layers.flatten(h), 1)

    self._compare_with_tf_hessians(build, [4, 4, 1], n=2)

  @parameterized.parameters(1, 2)
  def test_lstm_unrolled(self, cf):
    self.control_flow(cf)

    def build(x):
      cell = tf.compat.v1.nn.rnn_cell.LSTMCell(6)
      inputs = tf.unstack(tf.reshape(x, [-1, 3, 2]), axis=1)
      outputs, _ = tf.compat.v1.nn.static_rnn(cell, inputs, dtype=tf.float64)
      return tf.compat.v1.layers.dense(outputs[-1], 1)

    self._compare_with_tf_hessians(build, [6])

  def test_lstm_dynamic_rnn_under_control_flow_v2(self):
    self.control_flow(2)

    def build(x):
      cell = tf.compat.v1.nn.rnn_cell.LSTMCell(5)
      outputs, _ = tf.compat.v1.nn.dynamic_rnn(
        cell, tf.reshape(x, [-1, 3, 2]), dtype=tf.float64
      )
      return tf.compat.v1.layers.dense(outputs[:, -1], 1)

    self._compare_with_tf_hessians(build, [6])

  def test_lstm_dynamic_rnn_under_control_flow_v1(self):
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3, 2])
      cell = tf.compat.v1.nn.rnn_cell.LSTMCell(4, dtype=tf.float64)
      outputs, _ = tf.compat.v1.nn.dynamic_rnn(cell, x, dtype=tf.float64)
      y = tf.reduce_sum(tf.tanh(outputs[:, -1]), axis=1)
      for method in ("while_loop", "pfor"):
        with self.assertRaisesRegex(ValueError, "enable_control_flow_v2"):
          tf1hess.batch_hessians(y, x, method=method)
      h = tf1hess.batch_hessians(y, x)
      (g,) = tf.gradients(y, x)
      x_val = np.random.default_rng(3).normal(size=(4, 3, 2))
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        out = sess.run(h, {x: x_val}).reshape(4, 6, 6)
        reference = testing_utils.central_difference_jacobian(
          lambda v: sess.run(g, {x: v.reshape(-1, 3, 2)}).reshape(-1, 6),
          x_val.reshape(4, 6),
        )
    self.assertAllClose(out, reference, atol=1e-6)

  def test_softmax_cross_entropy_loss(self):
    labels = np.eye(3)[[0, 2, 1]]

    def build(x):
      logits = tf.compat.v1.layers.dense(x, 3, activation=None)
      return tf.compat.v1.losses.softmax_cross_entropy(
        labels, logits, reduction=tf.compat.v1.losses.Reduction.NONE
      )

    with tf.Graph().as_default():
      tf.compat.v1.set_random_seed(0)
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      logits = tf.compat.v1.layers.dense(x, 3)
      p = tf.nn.softmax(logits)
      loss = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
      h = tf1hess.batch_hessians(loss, x)
      w = tf.compat.v1.trainable_variables()[0]
      x_val = np.random.default_rng(0).normal(size=(3, 4))
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        out, p_val, w_val = sess.run([h, p, w], {x: x_val})
    # d^2 CE / dz dz^T = diag(p) - p p^T, so H = W (diag(p) - p p^T) W^T.
    expected = np.einsum(
      "kc,ncd,ld->nkl",
      w_val,
      np.einsum("nc,cd->ncd", p_val, np.eye(3))
      - np.einsum("nc,nd->ncd", p_val, p_val),
      w_val,
    )
    self.assertAllClose(out, expected)


class ErrorsTest(tf.test.TestCase, parameterized.TestCase):
  def test_integer_xs(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.int32, [None, 3])
      with self.assertRaisesRegex(
        TypeError, r"`xs` must be a floating tensor .* saw dtype int32"
      ):
        tf1hess.batch_hessians(tf.cast(x, tf.float32), x)

  def test_integer_ys(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(TypeError, r"`ys` must be a floating"):
        tf1hess.batch_hessians(tf.cast(x, tf.int32), x)

  @parameterized.parameters(([None],), ([],))
  def test_rank_below_two(self, shape):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, shape)
      with self.assertRaisesRegex(
        ValueError, r"`xs` must have rank >= 2 \(batch, features...\); saw rank"
      ):
        tf1hess.batch_hessians(x * x, x)

  def test_unknown_rank(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, None)
      with self.assertRaisesRegex(ValueError, "known rank >= 2"):
        tf1hess.batch_hessians(x * x, x)

  def test_eager_mode(self):
    x = tf.ones([2, 3])
    with self.assertRaisesRegex(RuntimeError, "needs graph mode"):
      tf1hess.batch_hessians(x * x, x)

  def test_eager_tensor_while_building_graph(self):
    eager_x = tf.ones([2, 3])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(ValueError, "`xs` holds an eager tensor"):
        tf1hess.batch_hessians(tf.reduce_sum(x), eager_x)
      with self.assertRaisesRegex(ValueError, "`ys` holds an eager tensor"):
        tf1hess.batch_hessians(eager_x, x)

  def test_numpy_xs(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(
        TypeError, r"`xs` must be a tf.Tensor .* saw ndarray"
      ):
        tf1hess.batch_hessians(tf.reduce_sum(x), np.ones((2, 3)))

  def test_variable_xs(self):
    # Resource and reference variables, each read by ops of its own.
    for resource in (True, False):
      with self.subTest(resource=resource), tf.Graph().as_default():
        v = tf.compat.v1.get_variable(
          "x", initializer=np.ones((4, 2)), use_resource=resource
        )
        y = tf.reduce_sum(v**3, 1)
        for build in (
          tf1hess.batch_hessians,
          lambda y, v: tf1hess.Derivatives(y, v).hessian(),
          lambda y, v: tf1hess.dde.hessian(y[:, None], v, i=0, j=0),
        ):
          with self.assertRaisesRegex(
            TypeError, r"`xs` must be tensors .* saw the variable x"
          ):
            build(y, v)

  def test_tensor_of_another_graph(self):
    with tf.Graph().as_default():
      other = tf.compat.v1.placeholder(tf.float32, [None, 3])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(ValueError, "`xs` holds a tensor of another"):
        tf1hess.batch_hessians(tf.reduce_sum(x), other)

  def test_finalized_graph(self):
    graph = tf.Graph()
    with graph.as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      y = tf.reduce_sum(x**2)
      graph.finalize()
      with self.assertRaisesRegex(RuntimeError, "graph is finalized"):
        tf1hess.batch_hessians(y, x)

  def test_empty_lists(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(ValueError, "`xs` must be a tensor or a"):
        tf1hess.batch_hessians(tf.reduce_sum(x), [])
      with self.assertRaisesRegex(ValueError, "`ys` must be a tensor or a"):
        tf1hess.batch_hessians([], x)

  def test_unknown_unconnected_gradients(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(
        ValueError, r"`unconnected_gradients` must be 'zero' or 'none'"
      ):
        tf1hess.batch_hessians(tf.reduce_sum(x), x, unconnected_gradients="x")

  @parameterized.parameters(0, -1, 1.5, True)
  def test_bad_order(self, order):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(ValueError, "`order` must be a positive int"):
        tf1hess.batch_derivatives(tf.reduce_sum(x), x, order)


_MODE_SCRIPT = textwrap.dedent(
  """
  import os, sys
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
  import numpy as np
  import tensorflow as tf
  import tf1hess
  getattr(tf.compat.v1, sys.argv[1])()
  if sys.argv[2] == "enable_cf2":
    tf.compat.v1.enable_control_flow_v2()
  # A model without loops works in every entry; compare with tf.hessians.
  x = tf.compat.v1.placeholder(tf.float32, [None, 3])
  y = tf.compat.v1.layers.dense(
    tf.compat.v1.layers.dense(x, 8, activation=tf.tanh), 1)
  h, full = tf1hess.batch_hessians(y, x), tf.hessians(y, x)[0]
  with tf.compat.v1.Session() as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    assert sess.run(h, {x: np.zeros((0, 3))}).shape == (0, 3, 3)
    xv = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    out, ref = sess.run([h, full], {x: xv})
    ref = np.stack([ref[i, :, i] for i in range(4)])
    np.testing.assert_allclose(out, ref, atol=1e-5)
  print("MLP OK")
  x = tf.compat.v1.placeholder(tf.float32, [None, 3, 2])
  cell = tf.compat.v1.nn.rnn_cell.LSTMCell(4)
  outputs, _ = tf.compat.v1.nn.dynamic_rnn(cell, x, dtype=tf.float32)
  y = tf.compat.v1.layers.dense(outputs[:, -1], 1)
  try:
    h = tf1hess.batch_hessians(y, x)
  except ValueError as e:
    print("ERROR", e)
    sys.exit(0)
  g = tf.gradients(y, x)[0]
  with tf.compat.v1.Session() as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    for n in (0, 1, 5):
      xv = np.random.default_rng(n).normal(size=(n, 3, 2)).astype(np.float32)
      out = sess.run(h, {x: xv})
      assert out.shape == (n, 3, 2, 3, 2), out.shape
      if n:
        # Central differences of the gradient, per feature.
        ref = np.zeros((n, 6, 6))
        eps = 1e-2
        for j in range(6):
          d = np.zeros((n, 6), np.float32)
          d[:, j] = eps
          d = d.reshape(n, 3, 2)
          ref[:, :, j] = (
            sess.run(g, {x: xv + d}) - sess.run(g, {x: xv - d})
          ).reshape(n, 6) / (2 * eps)
        np.testing.assert_allclose(out.reshape(n, 6, 6), ref, atol=2e-3)
  print("OK")
  """
)


def _run_child(test, script, *args):
  """The lines `script` prints, run in a child Python; fails `test` where
  the child fails (or dies)."""
  result = subprocess.run(
    [sys.executable, "-c", script, *args],
    capture_output=True,
    text=True,
    cwd=_ROOT,
    timeout=600,
    check=False,
  )
  test.assertEqual(result.returncode, 0, result.stderr[-3000:])
  return result.stdout.strip().splitlines()


class GraphModeEntriesTest(tf.test.TestCase, parameterized.TestCase):
  """The two global ways into graph mode, in fresh processes."""

  @parameterized.named_parameters(
    ("disable_eager_execution", "disable_eager_execution", ""),
    ("disable_v2_behavior", "disable_v2_behavior", ""),
    ("disable_v2_behavior_then_cf2", "disable_v2_behavior", "enable_cf2"),
  )
  def test_dynamic_rnn_model(self, entry, extra):
    lines = _run_child(self, _MODE_SCRIPT, entry, extra)
    self.assertEqual(lines[0], "MLP OK")
    self.assertEqual(lines[-1], "OK")


_STATIC_EMPTY_SCRIPT = textwrap.dedent(
  """
  import os
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
  import tensorflow as tf
  import tf1hess

  def layer_norm(x):
    mean, variance = tf.nn.moments(x, [1], keepdims=True)
    z = (x - mean) * tf.math.rsqrt(variance + 1.0)
    return tf.reduce_sum(z ** 2, 1) * x[:, 0]

  def product(x):
    return tf.reduce_sum(x ** 2, 1) * x[:, 0]

  calls = {
    "hessians": lambda y, x, m: tf1hess.batch_hessians(y, x, method=m),
    "diagonals": lambda y, x, m: tf1hess.batch_hessian_diagonals(
      y, x, method=m),
    "laplacians": lambda y, x, m: tf1hess.batch_laplacians(y, x, method=m),
    "order 3": lambda y, x, m: tf1hess.batch_derivatives(y, x, 3),
    "products": lambda y, x, m: tf1hess.batch_hessian_vector_products(
      y, x, tf.ones_like(x)),
    "joint blocks": lambda y, x, m: tf1hess.batch_output_hessians(
      tf.stack([y, 2 * y], 1), [x[:, :1] + 0, x], method=m)[0][1],
    "entry": lambda y, x, m: tf1hess.Derivatives(y, x).hessian(0, 1),
  }
  for model in (layer_norm, product):
    for name, call in calls.items():
      for method in ("auto", "forward"):

        @tf.function(input_signature=[tf.TensorSpec([0, 3], tf.float32)])
        def f(x):
          return call(model(x), x, method)

        print(model.__name__, name, method, f(tf.zeros([0, 3])).shape)
  """
)


class StaticEmptyBatchTest(tf.test.TestCase):
  def test_tf_function_with_an_empty_signature(self):
    # TensorFlow's arithmetic optimizer divided by the static batch of 0 in
    # second derivatives of these models (float32): the process died of
    # SIGFPE. In a child process.
    lines = _run_child(self, _STATIC_EMPTY_SCRIPT)
    shapes = {
      "hessians": "(0, 3, 3)",
      "diagonals": "(0, 3)",
      "laplacians": "(0,)",
      "order 3": "(0, 3, 3, 3)",
      "products": "(0, 3)",
      "joint blocks": "(0, 2, 1, 3)",
      "entry": "(0, 1)",
    }
    expected = [
      f"{model} {name} {method} {shape}"
      for model in ("layer_norm", "product")
      for name, shape in shapes.items()
      for method in ("auto", "forward")
    ]
    self.assertEqual(lines, expected)


if __name__ == "__main__":
  tf.test.main()
