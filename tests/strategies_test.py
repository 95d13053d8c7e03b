"""Every row strategy gives the numbers of the plain row loop and of references.

The strategies of `method=` (and `chunk_size=`) only change how the rows of
the per-sample Jacobians are built, or (`auto_forward`) build them with the
forward engine instead, where it can follow the model. Each one is run
through the core's matrix
(N in {0, 1, 7}, dynamic N and K, rank-3 and list `xs`, float32/float64,
control flow v1 and v2, `tf.function`, eager, a `tf.scan` model, higher
orders, diagonals) and compared with the plain `tf.while_loop` over rows built
in the same graph and with references that do not use tf1hess: analytic
Hessians, the diagonal blocks of `tf.hessians`, and float64 central
differences.
"""

import os
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess import _rows
from tf1hess import _shortcuts
from tf1hess import plan as plan_lib
from tf1hess.forward import dispatch

# A plan whose "auto" vectorizes the few rows of these tests.
_VECTORIZE = tf1hess.Plan(pfor_min_rows=1, eager_pfor_min_rows=1)

# name -> (keyword arguments, what is patched): "fail_pfor" makes
# vectorizing fail, so that "auto" falls back to its loop over rows with the
# linear shortcuts. Plain "auto" unrolls the few rows, with the shortcuts.
_STRATEGIES = {
  "while_loop": ({"method": "while_loop"}, None),
  "pfor": ({"method": "pfor"}, None),
  "pfor_chunks_of_2": ({"method": "pfor", "chunk_size": 2}, None),
  "auto": ({}, None),
  "auto_vectorized": ({"plan": _VECTORIZE}, None),
  "auto_without_pfor": ({"plan": _VECTORIZE}, "fail_pfor"),
  # "auto" with the forward engine wherever it can follow the model (the
  # cost model says yes to every call), the rows elsewhere.
  "auto_forward": ({"method": "auto"}, "forward"),
  # "auto" with both, and a tf.cond on N (as when the cost model's choice
  # depends on a batch size known only at run time): N < 2 on one side,
  # N >= 2 on the other.
  "auto_switch_engine_below": ({"method": "auto"}, "switch_engine_below"),
  "auto_switch_rows_below": ({"method": "auto"}, "switch_rows_below"),
  "auto_switch_vectorized": ({"plan": _VECTORIZE}, "switch_engine_below"),
}

_TOL = {tf.float32: 2e-4, tf.float64: 1e-9}
_WEIGHTS = testing_utils.mlp_weights(5, hidden=3)  # H < K: head shortcut.
_A = np.random.default_rng(7).normal(size=(4, 4)).round(1)


def _quadratic(x):
  """Per-sample `x^T A x`: Hessian `A + A^T`; `x` is used twice."""
  return tf.reduce_sum(x * tf.matmul(x, tf.constant(_A, x.dtype)), axis=1)


def _mlp(x):
  return testing_utils.tanh_mlp(x, *_WEIGHTS)


class StrategyMixin(testing_utils.ControlFlowMixin):
  """Applies a named strategy and a control flow version for one test."""

  def strategy(self, name):
    kwargs, patched = _STRATEGIES[name]
    patches = []
    choices = {
      "forward": dispatch.Choice(True),
      "switch_engine_below": dispatch.Choice(True, 2),
      "switch_rows_below": dispatch.Choice(False, 2),
    }
    if patched in choices:
      patches.append(
        mock.patch.object(dispatch, "choose", return_value=choices[patched])
      )
    if patched == "fail_pfor":
      patches.append(
        mock.patch.object(
          _rows, "_pfor_rows", side_effect=ValueError("no pfor here")
        )
      )
    for patch in patches:
      patch.start()
      self.addCleanup(patch.stop)
    return kwargs


class GraphStrategiesTest(
  StrategyMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_functions_of_fused_batch_norm_gradients1",
    "test_functions_of_fused_batch_norm_gradients2",
    "test_functions_of_fused_batch_norm_gradients3",
    "test_functions_of_fused_batch_norm_gradients5",
    "test_one_dense_layer_then_activations13",
    "test_scan_model_under_control_flow_v21",
    "test_scan_model_under_control_flow_v22",
    "test_scan_model_under_control_flow_v27",
  )

  @parameterized.parameters(
    testing_utils.in_turn(
      strategy=list(_STRATEGIES), dtype=[tf.float32, tf.float64], n=[0, 1, 7]
    )
  )
  def test_tanh_mlp(self, strategy, n, dtype, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    x_val = np.random.default_rng(n).normal(size=(n, 5))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(dtype, [None, 5])
      y = _mlp(x)
      h = tf1hess.batch_hessians(y, x, **kwargs)
      plain = tf1hess.batch_hessians(y, x, method="while_loop")
      full = tf.hessians(y, x)[0]
      self.assertEqual(h.shape.as_list(), [None, 5, 5])
      with tf.compat.v1.Session() as sess:
        out, plain_val = sess.run([h, plain], {x: x_val})
        blocks = testing_utils.diagonal_blocks(
          sess.run(full, {x: x_val}) if n else np.zeros((0, 5, 0, 5))
        )
    tol = _TOL[dtype]
    self.assertEqual(out.shape, (n, 5, 5))
    self.assertAllClose(out, plain_val, atol=tol)
    self.assertAllClose(out, blocks, atol=tol)
    self.assertAllClose(
      out, testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS), atol=tol
    )

  @parameterized.parameters(testing_utils.in_turn(strategy=list(_STRATEGIES)))
  def test_quadratic_form_with_dynamic_batch_and_features(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, None])
      y = _quadratic(x)
      h = tf1hess.batch_hessians(y, x, **kwargs)
      plain = tf1hess.batch_hessians(y, x, method="while_loop")
      self.assertEqual(h.shape.as_list(), [None, None, None])
      with tf.compat.v1.Session() as sess:
        for n in (0, 1, 7):
          x_val = np.random.default_rng(n).normal(size=(n, 4))
          out, plain_val = sess.run([h, plain], {x: x_val})
          self.assertAllClose(out, np.broadcast_to(_A + _A.T, (n, 4, 4)))
          self.assertAllClose(out, plain_val)

  @parameterized.parameters(
    testing_utils.in_turn(2, strategy=list(_STRATEGIES))
  )
  def test_constant_hessians(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 5])
      labels = tf.compat.v1.placeholder(tf.float64, [None, 3])
      # Mean squared error of a dense layer: Hessian 2 W W^T / 3.
      residual = tf.matmul(x, tf.constant(w)) + 0.5 - labels
      mse = tf.reduce_mean(tf.square(residual), axis=1)
      h = tf1hess.batch_hessians(mse, x, **kwargs)
      d = tf1hess.batch_hessian_diagonals(mse, x, **kwargs)
      feed = {x: rng.normal(size=(7, 5)), labels: rng.normal(size=(7, 3))}
      with tf.compat.v1.Session() as sess:
        out, diagonals = sess.run([h, d], feed)
        empty = sess.run(h, {x: np.zeros((0, 5)), labels: np.zeros((0, 3))})
    self.assertEqual(empty.shape, (0, 5, 5))
    expected = np.broadcast_to(2.0 * w @ w.T / 3.0, (7, 5, 5))
    self.assertAllClose(out, expected)
    self.assertAllClose(diagonals, np.einsum("nii->ni", expected))

  @parameterized.parameters(testing_utils.in_turn(strategy=list(_STRATEGIES)))
  def test_per_sample_scaled_quadratic_form(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    rng = np.random.default_rng(5)
    x_val, scale_val = rng.normal(size=(6, 4)), rng.normal(size=(6, 1))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      scale = tf.compat.v1.placeholder(tf.float64, [None, 1])
      # Linear gradient, but its coefficients differ from sample to sample.
      h = tf1hess.batch_hessians(
        tf.reduce_sum(scale * _quadratic(x)[:, None], axis=1), x, **kwargs
      )
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {x: x_val, scale: scale_val})
    self.assertAllClose(out, scale_val[:, :, None] * (_A + _A.T))

  @parameterized.parameters(
    testing_utils.in_turn(
      strategy=list(_STRATEGIES),
      made_by=["identity", "add", "reshape"],
      model=["square", "quadratic_form"],
    )
  )
  def test_input_made_by_a_linear_op(self, strategy, made_by, model, cf):
    # `x = tf.identity(inputs)`: the shortcuts stop at `x`, not at what
    # made it (the quadratic form came out zero by the pfor rows).
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    rng = np.random.default_rng(8)
    inputs_val = rng.normal(size=(5, 4))
    with tf.Graph().as_default():
      inputs = tf.compat.v1.placeholder(tf.float64, [None, 4])
      x = {
        "identity": lambda: tf.identity(inputs),
        "add": lambda: inputs + 0.5,
        "reshape": lambda: tf.reshape(inputs, [-1, 4]),
      }[made_by]()
      if model == "square":
        y, want = tf.reduce_sum(x * x, axis=1), 2 * np.eye(4)
      else:
        y, want = _quadratic(x), _A + _A.T
      h = tf1hess.batch_hessians(y, x, **kwargs)
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {inputs: inputs_val})
    self.assertAllClose(out, np.broadcast_to(want, out.shape))

  @parameterized.parameters(
    testing_utils.in_turn(2, strategy=list(_STRATEGIES))
  )
  def test_broadcast_inside_the_model(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    x_val = np.random.default_rng(6).normal(size=(5, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      # (N, 4) * (N, 1): the gradient sums over the broadcast axis.
      y = tf.reduce_sum(tf.tanh(x) * tf.sin(x[:, :1]) + x * x[:, 1:2], axis=1)
      h = tf1hess.batch_hessians(y, x, **kwargs)
      full = tf.hessians(y, x)[0]
      with tf.compat.v1.Session() as sess:
        out, full_val = sess.run([h, full], {x: x_val})
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val))

  @parameterized.parameters(
    testing_utils.in_turn(
      model=["activations", "mixed"], strategy=list(_STRATEGIES)
    )
  )
  def test_one_dense_layer_then_activations(self, strategy, cf, model):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    rng = np.random.default_rng(8)
    w, x_val = rng.normal(size=(3, 6)), rng.normal(size=(5, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      pre = tf.matmul(x, tf.constant(w)) + 0.1
      if model == "activations":
        # Elementwise after the dense layer: one matmul gives all rows.
        act = tf.nn.softplus(pre) * tf.sigmoid(pre) - tf.tanh(pre) ** 2
      else:
        # A sum over the units mixes them: rows one by one.
        act = tf.tanh(pre) * tf.reduce_sum(tf.sin(pre), axis=1, keepdims=True)
      y = tf.reduce_sum(act * tf.constant(rng.normal(size=6)), axis=1)
      h = tf1hess.batch_hessians(y, x, **kwargs)
      d = tf1hess.batch_hessian_diagonals(y, x, **kwargs)
      full = tf.hessians(y, x)[0]
      with tf.compat.v1.Session() as sess:
        out, diagonals, full_val = sess.run([h, d, full], {x: x_val})
    blocks = testing_utils.diagonal_blocks(full_val)
    self.assertAllClose(out, blocks)
    self.assertAllClose(diagonals, np.einsum("nii->ni", blocks))

  @parameterized.product(strategy=list(_STRATEGIES), n=[1, 7])
  def test_static_batch(self, strategy, n):
    kwargs = self.strategy(strategy)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [n, 5])
      h = tf1hess.batch_hessians(_mlp(x), x, **kwargs)
      self.assertEqual(h.shape.as_list(), [n, 5, 5])
      x_val = np.random.default_rng(n).normal(size=(n, 5))
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {x: x_val})
    self.assertAllClose(out, testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS))

  @parameterized.parameters(testing_utils.in_turn(strategy=list(_STRATEGIES)))
  def test_rank3_xs(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2, 3])
      w = tf.constant(np.random.default_rng(0).normal(size=(3, 3)))
      y = tf.reduce_sum(tf.sin(tf.einsum("nab,bc->nac", x, w)) * x, [1, 2])
      h = tf1hess.batch_hessians(y, x, **kwargs)
      plain = tf1hess.batch_hessians(y, x, method="while_loop")
      full = tf.hessians(y, x)[0]
      x_val = np.random.default_rng(1).normal(size=(4, 2, 3))
      with tf.compat.v1.Session() as sess:
        out, plain_val, full_val = sess.run([h, plain, full], {x: x_val})
    self.assertEqual(out.shape, (4, 2, 3, 2, 3))
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val))
    self.assertAllClose(out, plain_val)

  @parameterized.parameters(1, 2)
  def test_vectorized_rank3_product_of_one_sample(self, cf):
    # oneDNN's batched product of the `(6, 1, 3, 2) @ (2, 2)` that pfor
    # makes here gave wrong numbers (off by 1.7 of 6) or corrupted memory.
    self.control_flow(cf)
    w = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, None, 2])
      y = tf.reduce_sum(tf.tanh(x @ tf.constant(w)) ** 2, [1, 2])
      h = tf1hess.batch_hessians(y, x, method="pfor")
      full = tf.hessians(y, x)[0]
      with tf.compat.v1.Session() as sess:
        for n in (1, 2):
          x_val = np.random.default_rng(n).normal(size=(n, 3, 2))
          for _ in range(3):
            out, full_val = sess.run([h, full], {x: x_val})
            self.assertAllClose(
              out, testing_utils.diagonal_blocks(full_val), atol=1e-5
            )

  @parameterized.product(strategy=list(_STRATEGIES))
  def test_list_of_xs(self, strategy):
    kwargs = self.strategy(strategy)
    w = np.random.default_rng(2).normal(size=(3, 2))

    def model(x1, x2):  # A dense layer on x2: the head shortcut applies.
      return tf.reduce_sum(tf.sin(x1), 1) * tf.reduce_sum(
        tf.tanh(tf.matmul(x2, tf.constant(w))), 1
      )

    testing_utils.check_list_of_xs(
      self, model, lambda y, xs: tf1hess.batch_hessians(y, xs, **kwargs)
    )

  @parameterized.parameters(
    testing_utils.in_turn(2, strategy=list(_STRATEGIES))
  )
  def test_diagonals(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    x_val = np.random.default_rng(3).normal(size=(6, 5))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 5])
      d = tf1hess.batch_hessian_diagonals(_mlp(x), x, **kwargs)
      d_quad = tf1hess.batch_hessian_diagonals(
        _quadratic(x[:, :4]), x, **kwargs
      )
      with tf.compat.v1.Session() as sess:
        out, out_quad = sess.run([d, d_quad], {x: x_val})
    expected = testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
    self.assertAllClose(out, np.einsum("nii->ni", expected))
    quad = np.append(2.0 * np.diag(_A), 0.0)
    self.assertAllClose(out_quad, np.broadcast_to(quad, (6, 5)))

  @parameterized.parameters(testing_utils.in_turn(strategy=list(_STRATEGIES)))
  def test_third_order(self, strategy, cf):
    self.control_flow(cf)
    kwargs = self.strategy(strategy)
    x_val = np.random.default_rng(4).normal(size=(3, 5))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 5])
      d3 = tf1hess.batch_derivatives(_mlp(x), x, 3, **kwargs)
      cube = tf1hess.batch_derivatives(tf.reduce_sum(x**3), x, 3, **kwargs)
      with tf.compat.v1.Session() as sess:
        out, out_cube = sess.run([d3, cube], {x: x_val})
    self.assertEqual(out.shape, (3, 5, 5, 5))
    reference = testing_utils.central_difference_jacobian(
      lambda v: testing_utils.tanh_mlp_hessians(v, *_WEIGHTS).reshape(
        len(v), -1
      ),
      x_val,
    ).reshape(3, 5, 5, 5)
    self.assertAllClose(out, reference, atol=1e-6)
    expected_cube = np.zeros((5, 5, 5))
    expected_cube[np.arange(5), np.arange(5), np.arange(5)] = 6.0
    self.assertAllClose(out_cube, np.broadcast_to(expected_cube, (3, 5, 5, 5)))

  @parameterized.parameters(*_STRATEGIES)
  def test_scan_model_under_control_flow_v2(self, strategy):
    self.control_flow(2)
    kwargs = self.strategy(strategy)
    testing_utils.check_scan_model_hessians(
      self, lambda y, x: tf1hess.batch_hessians(y, x, **kwargs)
    )

  @parameterized.product(strategy=list(_STRATEGIES))
  def test_linear_and_unconnected(self, strategy):
    kwargs = self.strategy(strategy)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      other = tf.compat.v1.placeholder(tf.float32, [None, 3])
      w = tf.constant(np.ones((3, 2), np.float32))
      linear = tf.reduce_sum(tf.matmul(x, w), axis=1)
      h_linear = tf1hess.batch_hessians(linear, x, **kwargs)
      h_other = tf1hess.batch_hessians(tf.reduce_sum(other**2), x, **kwargs)
      self.assertIsNone(
        tf1hess.batch_hessians(
          linear, x, unconnected_gradients="none", **kwargs
        )
      )
      with tf.compat.v1.Session() as sess:
        a, b = sess.run(
          [h_linear, h_other], {x: np.ones((4, 3)), other: np.ones((4, 3))}
        )
    self.assertAllEqual(a, np.zeros((4, 3, 3)))
    self.assertAllEqual(b, np.zeros((4, 3, 3)))

  @parameterized.product(strategy=list(_STRATEGIES))
  def test_independence_check_fires(self, strategy):
    kwargs = self.strategy(strategy)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      h = tf1hess.batch_hessians(
        tf.reduce_sum(x) ** 2 + _mlp(tf.pad(x, [[0, 0], [0, 2]])),
        x,
        check_independence=True,
        **kwargs,
      )
      with tf.compat.v1.Session() as sess:
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, "are not independent"
        ):
          sess.run(h, {x: np.ones((3, 3))})

  @parameterized.parameters(1, 2, 3, 5, 100)
  def test_chunk_sizes(self, chunk_size):
    x_val = np.random.default_rng(chunk_size).normal(size=(4, 5))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 5])
      h = tf1hess.batch_hessians(_mlp(x), x, chunk_size=chunk_size)
      h_pfor = tf1hess.batch_hessians(
        _mlp(x), x, method="pfor", chunk_size=chunk_size
      )
      with tf.compat.v1.Session() as sess:
        out, out_pfor = sess.run([h, h_pfor], {x: x_val})
    expected = testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
    self.assertAllClose(out, expected)
    self.assertAllClose(out_pfor, expected)

  @parameterized.parameters(
    testing_utils.in_turn(
      strategy=["while_loop", "pfor", "auto"], training=[False, True]
    )
  )
  def test_functions_of_fused_batch_norm_gradients(
    self, strategy, training, cf
  ):
    # TensorFlow's gradient of a fused batch norm's gradient builds its ops
    # with a tape; under control flow v1, differentiated again inside the
    # rows' loop, they gave rows off by half the Hessian. The rows are
    # unrolled there.
    self.control_flow(cf)
    rng = np.random.default_rng(8)
    x_val = rng.normal(size=(5, 4)).astype(np.float32)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    scale = (rng.random(6) + 0.5).astype(np.float32)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      h = tf.matmul(x, w)
      if training:  # Keras LayerNormalization: one batch per sample.
        ones = tf.ones(tf.shape(x)[:1])
        normed, _, _ = tf.compat.v1.nn.fused_batch_norm(
          tf.reshape(h, [1, -1, 6, 1]), ones, 0.0 * ones, data_format="NCHW"
        )
        normed = tf.reshape(normed, [-1, 6]) * scale
      else:  # BatchNormalization at inference.
        normed, _, _ = tf.compat.v1.nn.fused_batch_norm(
          tf.reshape(h, [-1, 1, 1, 6]),
          scale,
          scale - 1.0,
          mean=scale * 0.3,
          variance=scale,
          is_training=False,
        )
        normed = tf.reshape(normed, [-1, 6])
      energy = tf.reduce_sum(tf.tanh(normed) ** 3, axis=1)
      (force,) = tf.gradients(energy, x)
      y = tf.reduce_sum(force**2, axis=1)
      got = tf1hess.batch_hessians(y, x, **self.strategy(strategy))
      (g,) = tf.gradients(y, x)
      unrolled = tf.stack(
        [tf.gradients(g[:, j], x)[0] for j in range(4)], axis=1
      )
      with tf.compat.v1.Session() as sess:
        out, want = sess.run([got, unrolled], {x: x_val})
        differences = testing_utils.central_difference_jacobian(
          lambda v: sess.run(g, {x: v.astype(np.float32)}), x_val, eps=1e-2
        )
    top = np.abs(differences).max()
    if not (training and strategy == "auto"):
      self.assertAllClose(out, want, atol=1e-5 * top, rtol=0)
    # In training the rows miss the curvature through the mean, which auto
    # (the engine) has: a few tenths of a percent, within the differences'.
    self.assertAllClose(out, differences, atol=0.02 * top, rtol=0)

  def test_functions_of_fused_batch_norm_gradients_need_static_features(self):
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, None])
      ones = tf.ones(tf.shape(x)[:1])
      normed, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x[None, :, :, None], ones, 0.0 * ones, data_format="NCHW"
      )
      (force,) = tf.gradients(tf.reduce_sum(tf.tanh(normed) ** 3), x)
      with self.assertRaisesRegex(ValueError, "static shape after the batch"):
        tf1hess.batch_hessians(tf.reduce_sum(force**2), x, method="while_loop")


class FunctionAndEagerStrategiesTest(
  StrategyMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_eager_scan_model_in_tf_function0",
    "test_eager_scan_model_in_tf_function2",
    "test_eager_scan_model_in_tf_function9",
  )

  @parameterized.product(strategy=list(_STRATEGIES), path=["graph", "eager"])
  def test_tf_function_with_none_batch(self, strategy, path):
    kwargs = self.strategy(strategy)

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float64)])
    def hessians(x):
      if path == "graph":
        return tf1hess.batch_hessians(_mlp(x), x, **kwargs)
      return tf1hess.eager.batch_hessians(_mlp, x, **kwargs)

    if strategy == "auto_without_pfor":
      hessians.get_concrete_function()
    else:
      with self.assertNoLogs("absl", "INFO"):  # No strategy falls back.
        hessians.get_concrete_function()
    for n in (0, 1, 7):
      x_val = np.random.default_rng(n).normal(size=(n, 5))
      self.assertAllClose(
        hessians(x_val), testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
      )

  @parameterized.product(strategy=list(_STRATEGIES), n=[0, 1, 7])
  def test_eagerly(self, strategy, n):
    kwargs = self.strategy(strategy)
    x_val = np.random.default_rng(n).normal(size=(n, 4))
    out = tf1hess.eager.batch_hessians(_quadratic, tf.constant(x_val), **kwargs)
    self.assertAllClose(out, np.broadcast_to(_A + _A.T, (n, 4, 4)))
    diagonals = tf1hess.eager.batch_hessian_diagonals(
      _mlp, tf.constant(np.pad(x_val, [[0, 0], [0, 1]])), **kwargs
    )
    expected = testing_utils.tanh_mlp_hessians(
      np.pad(x_val, [[0, 0], [0, 1]]), *_WEIGHTS
    )
    self.assertAllClose(diagonals, np.einsum("nii->ni", expected))

  @parameterized.parameters(*_STRATEGIES)
  def test_eager_scan_model_in_tf_function(self, strategy):
    kwargs = self.strategy(strategy)
    hessians = tf.function(
      lambda x: tf1hess.eager.batch_hessians(
        testing_utils.scan_model, x, **kwargs
      ),
      input_signature=[tf.TensorSpec([None, 3], tf.float64)],
    )
    x_val = np.random.default_rng(1).normal(size=(4, 3))
    with tf.Graph().as_default():
      xp = tf.compat.v1.placeholder(tf.float64, [None, 3])
      (g,) = tf.gradients(testing_utils.scan_model(xp), xp)
      with tf.compat.v1.Session() as sess:
        reference = testing_utils.central_difference_jacobian(
          lambda v: sess.run(g, {xp: v}), x_val
        )
    self.assertAllClose(hessians(x_val), reference, atol=1e-6)


class RowsOnlyMixin:
  """Keeps "auto" on the rows: these tests look at how the rows are built."""

  def setUp(self):
    super().setUp()
    patch = mock.patch.object(
      dispatch, "try_forward", return_value=(None, False)
    )
    patch.start()
    self.addCleanup(patch.stop)


class FallbackTest(RowsOnlyMixin, StrategyMixin, tf.test.TestCase):
  """Ops that `pfor` cannot vectorize, and shortcuts that cannot be built."""

  def _model(self, x):
    # The gradient of CumulativeLogsumexp uses CumulativeLogsumexp, for which
    # pfor has no converter: the second backward pass cannot be vectorized.
    return tf.reduce_sum(tf.math.cumulative_logsumexp(x, axis=1) ** 2, 1)

  def _run(self, twice=False, **kwargs):
    x_val = np.random.default_rng(0).normal(size=(3, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      y = self._model(x)
      h = tf1hess.batch_hessians(y, x, **kwargs)
      if twice:
        h = (h + tf1hess.batch_hessians(y, x, **kwargs)) / 2
      full = tf.hessians(y, x)[0]
      with tf.compat.v1.Session() as sess:
        out, full_val = sess.run([h, full], {x: x_val})
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val))

  def test_auto_falls_back_to_the_loop_when_pfor_fails(self):
    with self.assertLogs("absl", "WARNING") as logs:
      self._run(plan=tf1hess.Plan(pfor_min_rows=4))
    self.assertRegex(
      "\n".join(logs.output), "could not be built by pfor.*falling back"
    )

  def test_auto_does_not_try_pfor_on_few_rows(self):
    with self.assertNoLogs("absl", "WARNING"):
      self._run()

  def test_explicit_pfor_falls_back_too(self):
    with self.assertLogs("absl", "WARNING") as logs:
      self._run(method="pfor")
    self.assertRegex(
      "\n".join(logs.output), "could not be built by pfor.*falling back"
    )

  def test_auto_falls_back_to_the_plain_loop_when_shortcuts_fail(self):
    with mock.patch.object(
      _shortcuts, "tail_terms", side_effect=TypeError("no shortcut")
    ):
      with self.assertLogs("absl", "WARNING") as logs:
        self._run()
    self.assertRegex(
      "\n".join(logs.output),
      "linear shortcuts.*no shortcut.*falling back to while_loop\\.",
    )

  def test_the_warning_gives_the_line_that_says_what_failed(self):
    # A function's error announces a traceback ("in user code:") before
    # the line that says what failed.
    error = ValueError(
      "in user code:\n\n    File x.py, line 3\n\n"
      "    ValueError: Required handle data not set\n"
    )
    with mock.patch.object(_shortcuts, "tail_terms", side_effect=error):
      with self.assertLogs("absl", "WARNING") as logs:
        self._run()
    self.assertRegex(
      "\n".join(logs.output),
      r"\(ValueError: Required handle data not set\); falling back",
    )

  def test_an_unexpected_error_is_not_hidden_by_a_fallback(self):
    with mock.patch.object(
      _shortcuts, "tail_terms", side_effect=RuntimeError("a bug")
    ):
      with self.assertRaisesRegex(RuntimeError, "a bug"):
        self._run()

  def test_a_fallback_warns_once_per_graph(self):
    with mock.patch.object(
      _shortcuts, "tail_terms", side_effect=TypeError("no shortcut")
    ):
      with self.assertLogs("absl", "WARNING") as logs:
        self._run(twice=True)
    lines = [line for line in logs.output if "no shortcut" in line]
    self.assertNotEmpty(lines)  # The second build repeats none of them.
    self.assertCountEqual(lines, set(lines))

  def test_while_loop_method_builds_no_shortcuts(self):
    with mock.patch.object(
      _shortcuts, "tail_terms", side_effect=AssertionError("unused")
    ):
      self._run(method="while_loop")


class StrategyChoiceTest(
  RowsOnlyMixin, StrategyMixin, tf.test.TestCase, parameterized.TestCase
):
  """Each method builds the rows it names (checked on the graph's ops)."""

  def _loops(self, k, **kwargs):
    """The while loops in the graph of the Hessians of two tanh layers."""
    with tf.Graph().as_default() as graph:
      # A static batch: no tf.cond around the rows to look into.
      x = tf.compat.v1.placeholder(tf.float32, [3, k])
      w = tf.constant(np.ones((k, 3), np.float32))
      v = tf.constant(np.ones((3, 3), np.float32))
      y = tf.reduce_sum(tf.tanh(tf.matmul(tf.tanh(tf.matmul(x, w)), v)), 1)
      with self.assertNoLogs("absl", "INFO"):
        tf1hess.batch_hessians(y, x, **kwargs)
    return [
      op
      for op in graph.get_operations()
      if op.type in ("While", "StatelessWhile")
    ]

  def test_while_loop_loops(self):
    self.assertLen(self._loops(4, method="while_loop"), 1)

  def test_pfor_vectorizes(self):
    self.assertEmpty(self._loops(4, method="pfor"))

  def test_pfor_chunks_loop_over_chunks(self):
    self.assertLen(self._loops(4, method="pfor", chunk_size=2), 1)

  def test_auto_unrolls_few_rows(self):
    self.assertEmpty(self._loops(plan_lib.UNROLL_MAX_ROWS))

  def test_auto_loops_over_more_rows(self):
    self.assertLen(self._loops(plan_lib.UNROLL_MAX_ROWS + 1), 1)

  def test_auto_vectorizes_many_rows(self):
    self.assertEmpty(self._loops(tf1hess.Plan().vectorize_from(eager=False)))

  def test_auto_loops_below_many_rows(self):
    k = tf1hess.Plan().vectorize_from(eager=False) - 1
    self.assertLen(self._loops(k), 1)

  def test_a_plan_moves_the_thresholds(self):
    self.assertEmpty(self._loops(5, plan=tf1hess.Plan(pfor_min_rows=5)))
    self.assertLen(self._loops(3, plan=tf1hess.Plan(unroll_max_rows=2)), 1)

  @parameterized.named_parameters(
    ("bfc", "true", plan_lib.PFOR_MIN_ROWS),
    ("bfc_1", "1", plan_lib.PFOR_MIN_ROWS),
    ("default", "false", plan_lib.PFOR_MIN_ROWS_DEFAULT_ALLOCATOR),
    ("unset", None, plan_lib.PFOR_MIN_ROWS_DEFAULT_ALLOCATOR),
  )
  def test_vectorizing_threshold_follows_the_allocator(self, value, rows):
    env = {} if value is None else {"TF_CPU_ALLOCATOR_USE_BFC": value}
    with mock.patch.dict(os.environ, env):
      if value is None:
        os.environ.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
      plan = tf1hess.Plan()
      self.assertEqual(plan.vectorize_from(eager=False), rows)
      self.assertEqual(
        plan.vectorize_from(eager=True), plan_lib.EAGER_PFOR_MIN_ROWS
      )
      self.assertEqual(
        tf1hess.Plan(pfor_min_rows=3).vectorize_from(eager=False), 3
      )

  def test_elementwise_layer_takes_one_matmul(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 5])
      h = tf1hess.batch_hessians(_mlp(x), x)
      ops = h.graph.get_operations()
      self.assertEmpty([op for op in ops if "While" in op.type])
      self.assertEmpty([op for op in ops if op.type == "TensorListStack"])


class ArgumentErrorsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("unknown", "fast"),
    ("case", "PFOR"),
    ("not_a_string", 1),
  )
  def test_unknown_method(self, method):
    regex = (
      "`method` must be one of 'auto', 'forward', 'pfor' or 'while_loop'; saw"
    )
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      with self.assertRaisesRegex(ValueError, regex):
        tf1hess.batch_hessians(tf.reduce_sum(x**3), x, method=method)
      with self.assertRaisesRegex(ValueError, regex):
        tf1hess.batch_hessian_diagonals(tf.reduce_sum(x**3), x, method=method)
    with self.assertRaisesRegex(ValueError, regex):
      tf1hess.eager.batch_hessians(
        lambda x: tf.reduce_sum(x**3), tf.ones([1, 2]), method=method
      )

  @parameterized.named_parameters(
    ("zero", 0),
    ("negative", -3),
    ("bool", True),
    ("float", 2.0),
  )
  def test_bad_chunk_size(self, chunk_size):
    regex = "`chunk_size` must be None or a positive int; saw"
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      with self.assertRaisesRegex(ValueError, regex):
        tf1hess.batch_derivatives(
          tf.reduce_sum(x**3), x, 3, chunk_size=chunk_size
        )
    with self.assertRaisesRegex(ValueError, regex):
      tf1hess.eager.batch_hessian_diagonals(
        lambda x: tf.reduce_sum(x**3), tf.ones([1, 2]), chunk_size=chunk_size
      )


if __name__ == "__main__":
  tf.test.main()
