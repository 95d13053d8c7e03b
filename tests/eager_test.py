"""The eager (GradientTape) path gives the numbers of the graph path."""

import subprocess
import sys
import textwrap
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess

_WEIGHTS = testing_utils.mlp_weights(4)
_A = np.random.default_rng(5).normal(size=(4, 4))


def _mlp(x):
  return testing_utils.tanh_mlp(x, *_WEIGHTS)


def _quadratic(x):
  return tf.einsum("ni,ij,nj->n", x, tf.constant(_A, x.dtype), x)


_FUNCTIONS = {
  "mlp": _mlp,
  "quadratic": _quadratic,
  "scan": testing_utils.scan_model,
}


def _graph_path(fn, x_val, order=2):
  """Reference: the graph op on the same function, in its own session."""
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float64, [None, x_val.shape[1]])
    d = tf1hess.batch_derivatives(fn(x), x, order)
    with tf.compat.v1.Session() as sess:
      return sess.run(d, {x: x_val})


class EagerMatchesGraphTest(tf.test.TestCase, parameterized.TestCase):
  slow_cases = (
    "test_in_tf_function_with_none_batch2",
    "test_while_building_a_graph4",
  )

  @parameterized.product(name=list(_FUNCTIONS), n=[0, 1, 7])
  def test_eagerly(self, name, n):
    x_val = np.random.default_rng(n).normal(size=(n, 4))
    fn = _FUNCTIONS[name]
    out = tf1hess.eager.batch_hessians(fn, tf.constant(x_val))
    self.assertAllClose(out, _graph_path(fn, x_val))
    if name == "mlp":
      self.assertAllClose(
        out, testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
      )

  @parameterized.product(name=list(_FUNCTIONS))
  def test_in_tf_function_with_none_batch(self, name):
    fn = _FUNCTIONS[name]
    hessians = tf.function(
      lambda x: tf1hess.eager.batch_hessians(fn, x),
      input_signature=[tf.TensorSpec([None, 4], tf.float64)],
    )
    for n in (0, 1, 7):
      x_val = np.random.default_rng(n).normal(size=(n, 4))
      self.assertAllClose(hessians(x_val), _graph_path(fn, x_val))

  @parameterized.product(name=list(_FUNCTIONS), cf=[1, 2])
  def test_while_building_a_graph(self, name, cf):
    if cf == 1:
      tf.compat.v1.disable_control_flow_v2()
      self.addCleanup(tf.compat.v1.enable_control_flow_v2)
    fn = _FUNCTIONS[name]
    x_val = np.random.default_rng(0).normal(size=(5, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      h = tf1hess.eager.batch_hessians(fn, x)
      self.assertEqual(h.shape.as_list(), [None, 4, 4])
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {x: x_val})
    self.assertAllClose(out, _graph_path(fn, x_val))

  def test_numpy_input_and_per_sample_or_summed_outputs(self):
    x_val = np.random.default_rng(0).normal(size=(3, 4))
    per_sample = tf1hess.eager.batch_hessians(_mlp, x_val)
    summed = tf1hess.eager.batch_hessians(
      lambda x: tf.reduce_sum(_mlp(x)), x_val
    )
    column = tf1hess.eager.batch_hessians(lambda x: _mlp(x)[:, None], x_val)
    expected = testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
    for out in (per_sample, summed, column):
      self.assertAllClose(out, expected)

  def test_rank3_input(self):
    x_val = np.random.default_rng(0).normal(size=(3, 2, 2))

    def fn(x):
      return tf.reduce_sum(
        tf.sin(x) * tf.reduce_sum(x, 2, keepdims=True), [1, 2]
      )

    out = tf1hess.eager.batch_hessians(fn, x_val)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2, 2])
      full = tf.hessians(fn(x), x)[0]
      with tf.compat.v1.Session() as sess:
        full_val = sess.run(full, {x: x_val})
    self.assertEqual(out.shape, (3, 2, 2, 2, 2))
    self.assertAllClose(out, testing_utils.diagonal_blocks(full_val))

  @parameterized.parameters(1, 3)
  def test_derivatives_of_other_orders(self, order):
    x_val = np.random.default_rng(0).normal(size=(3, 4))
    out = tf1hess.eager.batch_derivatives(_mlp, x_val, order)
    self.assertEqual(out.shape, (3,) + (4,) * order)
    self.assertAllClose(out, _graph_path(_mlp, x_val, order))

  @parameterized.product(
    method=["auto", "pfor", "while_loop"], static_batch=[False, True]
  )
  def test_third_order_while_building_a_control_flow_v1_graph(
    self, method, static_batch
  ):
    # A tape cannot differentiate the v1 row loop (or the tf.cond around an
    # empty batch) of the Hessian level; the third order must still come out.
    tf.compat.v1.disable_control_flow_v2()
    self.addCleanup(tf.compat.v1.enable_control_flow_v2)
    x_val = np.random.default_rng(2).normal(size=(3, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [3 if static_batch else None, 4])
      d3 = tf1hess.eager.batch_derivatives(_mlp, x, 3, method=method)
      with tf.compat.v1.Session() as sess:
        out = sess.run(d3, {x: x_val})
    tf.compat.v1.enable_control_flow_v2()
    self.assertAllClose(out, _graph_path(_mlp, x_val, 3))

  def test_companions(self):
    rng = np.random.default_rng(0)
    x_val, v_val = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    hessians = testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
    self.assertAllClose(
      tf1hess.eager.batch_gradients(_mlp, x_val),
      testing_utils.tanh_mlp_gradients(x_val, *_WEIGHTS),
    )
    self.assertAllClose(
      tf1hess.eager.batch_hessian_diagonals(_mlp, x_val),
      np.einsum("nii->ni", hessians),
    )
    self.assertAllClose(
      tf1hess.eager.batch_hessian_vector_products(_mlp, x_val, v_val),
      np.einsum("nij,nj->ni", hessians, v_val),
    )

  def test_laplacians_executing_eagerly_keep_the_tapes(self):
    # No function traced per call: the sum of the tapes' diagonal, for a
    # rank-3 input too; inside a tf.function, the graph op's.
    rng = np.random.default_rng(1)
    x_val = rng.normal(size=(5, 4))
    hessians = testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
    cube = lambda x: tf.reduce_sum(x**3, [1, 2])  # noqa: E731
    cube_val = rng.normal(size=(3, 2, 2))
    with mock.patch.object(tf1hess.eager, "_graph_walk") as walk:
      laplacians = tf1hess.eager.batch_laplacians(_mlp, x_val)
      cube_laplacians = tf1hess.eager.batch_laplacians(cube, cube_val)
    walk.assert_not_called()
    self.assertAllClose(laplacians, np.einsum("nii->n", hessians))
    self.assertAllClose(cube_laplacians, 6 * cube_val.sum((1, 2)))
    traced = tf.function(lambda x: tf1hess.eager.batch_laplacians(_mlp, x))
    self.assertAllClose(traced(tf.constant(x_val)), laplacians)
    self.assertIsNone(
      tf1hess.eager.batch_laplacians(
        lambda x: tf.reduce_sum(x, 1), x_val, unconnected_gradients="none"
      )
    )

  def test_linear_gives_zeros_or_none(self):
    x_val = np.ones((3, 2), np.float32)

    def linear(x):
      return tf.reduce_sum(2.0 * x, 1)

    self.assertAllEqual(
      tf1hess.eager.batch_hessians(linear, x_val), np.zeros((3, 2, 2))
    )
    self.assertIsNone(
      tf1hess.eager.batch_hessians(linear, x_val, unconnected_gradients="none")
    )
    self.assertIsNone(
      tf1hess.eager.batch_hessians(
        lambda x: tf.constant(1.0), x_val, unconnected_gradients="none"
      )
    )
    self.assertAllEqual(
      tf1hess.eager.batch_hessian_vector_products(linear, x_val, x_val),
      np.zeros((3, 2)),
    )

  def test_samples_gathered_along_the_batch_axis(self):
    # The tapes' gradient of a gather of x is IndexedSlices.
    x_val = np.random.default_rng(3).normal(size=(4, 3))

    def reversed_samples(x):
      return tf.reduce_sum(tf.sin(tf.gather(x, tf.range(4)[::-1])), 1)

    expected = np.stack([np.diag(-np.sin(row)) for row in x_val])
    for method in ("auto", "while_loop"):
      self.assertAllClose(
        tf1hess.eager.batch_hessians(reversed_samples, x_val, method=method),
        expected,
        atol=1e-12,
      )
    self.assertAllClose(
      tf1hess.eager.batch_hessian_vector_products(
        reversed_samples, x_val, np.ones_like(x_val)
      ),
      -np.sin(x_val),
      atol=1e-12,
    )


class EagerIndependenceCheckTest(tf.test.TestCase):
  def test_fires_on_coupled_samples(self):
    x_val = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError, "are not independent"
    ):
      tf1hess.eager.batch_hessians(
        lambda x: tf.reduce_sum(x) ** 2, x_val, check_independence=True
      )

  def test_says_so_first_where_the_graph_walk_runs(self):
    # Batch statistics (tf.nn.moments): executing eagerly, auto takes the
    # graph walk in a tf.function, whose error TensorFlow starts with the
    # assert's traceback.
    def batch_normalized(x):
      mean, variance = tf.nn.moments(x, [0], keepdims=True)
      return tf.reduce_sum(tf.tanh((x - mean) * tf.math.rsqrt(variance)), 1)

    x_val = np.random.default_rng(1).normal(size=(8, 3))
    with self.assertLogs(level="WARNING"):
      with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError,
        r"^The samples of `x:0` are not independent: .* compute the full "
        r"Hessian\. Condition x <= y did not hold",
      ):
        tf1hess.eager.batch_hessians(
          batch_normalized, x_val, check_independence=True
        )

  def test_silent_on_independent_samples(self):
    x_val = np.random.default_rng(0).normal(size=(8, 4))
    out = tf1hess.eager.batch_hessians(_mlp, x_val, check_independence=True)
    self.assertAllClose(out, testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS))


class WrongSecondDerivativesWarnTest(tf.test.TestCase):
  def test_once_per_model(self):
    # The rows asked for take TensorFlow's second derivatives through
    # tf.nn.moments, which are wrong: each model says so once, not only the
    # first of the process, and the steps of a training loop do not repeat
    # it (a lambda made again at each step included).
    def normalized(x):
      mean, variance = tf.nn.moments(x, [1], keepdims=True)
      return (x - mean) * tf.math.rsqrt(variance + 1e-3)

    def first(x):
      return tf.reduce_sum(tf.sin(normalized(x)), 1)

    def second(x):
      return tf.reduce_sum(tf.cos(2.0 * normalized(x)), 1)

    x_val = np.random.default_rng(3).normal(size=(4, 3))
    for fn in (first, second):
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.eager.batch_hessians(fn, x_val, method="while_loop")
      self.assertIn("tf.nn.moments", "".join(logs.output))
    with mock.patch.object(tf1hess._core.logging, "warning") as warning:
      for _ in range(3):
        tf1hess.eager.batch_hessians(first, x_val, method="while_loop")
        tf1hess.eager.batch_hessians(
          lambda z: second(z), x_val, method="while_loop"
        )
    self.assertLen(warning.call_args_list, 1)
    self.assertIn("tf.nn.moments", warning.call_args.args[1])


class CapturedInputTest(tf.test.TestCase, parameterized.TestCase):
  """`x` a tensor of the eager context or a variable, inside a
  `tf.function`: the derivatives are built on its value there."""

  slow_cases = ("test_in_tf_function0",)

  @parameterized.product(
    kind=["captured", "variable"],
    method=["auto", "forward", "while_loop"],
  )
  def test_in_tf_function(self, kind, method):
    x_val = np.random.default_rng(3).normal(size=(5, 4))
    x = tf.constant(x_val) if kind == "captured" else tf.Variable(x_val)
    v_val = np.random.default_rng(4).normal(size=(5, 4))
    want = testing_utils.tanh_mlp_hessians(x_val, *_WEIGHTS)
    eager = tf1hess.eager

    @tf.function
    def derivatives():
      return (
        eager.batch_hessians(_mlp, x, method=method),
        eager.batch_laplacians(_mlp, x, method=method),
        eager.batch_output_hessians(_mlp, x, method=method),
        eager.batch_hessian_vector_products(_mlp, x, tf.constant(v_val)),
      )

    hessians, laplacians, per_output, products = derivatives()
    self.assertAllClose(hessians, want)
    self.assertAllClose(laplacians, np.einsum("nii->n", want))
    self.assertAllClose(per_output, want)
    self.assertAllClose(products, np.einsum("nij,nj->ni", want, v_val))


class AutoGraphTest(tf.test.TestCase):
  def test_python_if_on_a_tensor_in_fn(self):
    # In a `tf.function`, AutoGraph makes the `if` a `tf.cond` where `fn`
    # is called directly; so in the ops, whose own code it does not convert.
    def model(x, flag):
      if flag > 0:
        return tf.reduce_sum(tf.sin(x) ** 2, 1)
      return tf.reduce_sum(tf.cos(x) ** 2, 1)

    def wave(x, flag):
      return model(x, flag)[:, None] * tf.constant([[1.0, 2.0]], x.dtype)

    @tf.function
    def derivatives(x, flag):
      def fn(v):
        return model(v, flag)

      return (
        tf1hess.eager.batch_hessians(fn, x),
        tf1hess.eager.batch_hessians(fn, x, method="while_loop"),
        tf1hess.eager.batch_laplacians(fn, x),
        tf1hess.eager.batch_gradients(fn, x),
        tf1hess.eager.batch_output_hessians(lambda v: wave(v, flag), x),
      )

    x = np.random.default_rng(4).normal(size=(4, 3))
    for flag, sign in ((1, 1.0), (0, -1.0)):
      diagonal = 2 * sign * np.cos(2 * x)  # sin^2'' and cos^2''.
      gradients = sign * np.sin(2 * x)
      hessians = [np.diag(d) for d in diagonal]
      h, rows, laplacians, g, outputs = derivatives(
        tf.constant(x), tf.constant(flag)
      )
      self.assertAllClose(h, hessians)
      self.assertAllClose(rows, hessians)
      self.assertAllClose(laplacians, diagonal.sum(1))
      self.assertAllClose(g, gradients)
      self.assertAllClose(
        outputs, np.stack([hessians, 2 * np.asarray(hessians)], 1)
      )


class EmptyBatchTest(tf.test.TestCase):
  def test_engine_of_an_empty_float32_batch(self):
    # At a static batch of 0, TensorFlow's graph optimizers divided by zero
    # in the engine's ops: the process died (SIGFPE). In a child process.
    code = textwrap.dedent(
      """
      import os
      os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
      import tensorflow as tf
      import tf1hess

      def fn(x):
        mean, variance = tf.nn.moments(x, [1], keepdims=True)
        z = (x - mean) * tf.math.rsqrt(variance + 1.0)
        return tf.stack([tf.reduce_sum(z ** 2, 1) * x[:, 0], x[:, 1]], 1)

      x = tf.zeros((0, 3), tf.float32)
      for method in ("auto", "forward"):
        print(tf1hess.eager.batch_output_hessians(fn, x, method=method).shape)
        print(tf1hess.eager.batch_hessians(fn, x, method=method).shape)
      """
    )
    result = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertEqual(
      result.stdout.split("\n")[:4],
      ["(0, 2, 3, 3)", "(0, 3, 3)", "(0, 2, 3, 3)", "(0, 3, 3)"],
    )


class EagerErrorsTest(tf.test.TestCase):
  def test_x_none(self):
    with self.assertRaisesRegex(
      TypeError, r"^`x` must be a floating tensor `\(N, d...\)`; saw None\.$"
    ):
      tf1hess.eager.batch_hessians(tf.reduce_sum, None)

  def test_fn_not_callable(self):
    with self.assertRaisesRegex(TypeError, "`fn` must be a callable"):
      tf1hess.eager.batch_hessians(tf.ones([2, 2]), tf.ones([2, 2]))
    with self.assertRaisesRegex(TypeError, "`fn` must be a callable"):
      tf1hess.eager.batch_hessian_vector_products(
        None, tf.ones([2, 2]), tf.ones([2, 2])
      )

  def test_integer_x(self):
    with self.assertRaisesRegex(TypeError, "`x` must be a floating tensor"):
      tf1hess.eager.batch_hessians(tf.reduce_sum, np.ones((2, 2), np.int32))
    with self.assertRaisesRegex(TypeError, "`x` must be a floating tensor"):
      tf1hess.eager.batch_hessians(tf.reduce_sum, tf.ones([2, 2], tf.int32))

  def test_ragged_and_sparse_x(self):
    for x in (
      tf.ragged.constant([[1.0, 2.0], [3.0]]),
      tf.sparse.from_dense(tf.constant([[1.0, 0.0]])),
    ):
      with self.assertRaisesRegex(
        TypeError, f"must be a dense floating tensor .*saw a {type(x).__name__}"
      ):
        tf1hess.eager.batch_hessians(tf.reduce_sum, x)

  def test_list_of_inputs(self):
    # Stacked, they would be a batch of 2 (the inputs).
    x, t = tf.ones([2, 1]), np.ones((2, 1), np.float32)
    for op in (tf1hess.eager.batch_hessians, tf1hess.eager.batch_jacobians):
      with self.assertRaisesRegex(TypeError, "saw a list of 2 tensors"):
        op(lambda xt: tf.reduce_sum(xt**3, [1, 2]), [x, t])
    # A batch written as nested lists of numbers is one tensor.
    h = tf1hess.eager.batch_hessians(
      lambda x: tf.reduce_sum(x**3, 1), [[1.0, 2.0]]
    )
    self.assertAllClose(h, [[[6.0, 0.0], [0.0, 12.0]]])

  def test_integer_output(self):
    with self.assertRaisesRegex(TypeError, r"`fn\(x\)` must be a floating"):
      tf1hess.eager.batch_hessians(
        lambda x: tf.cast(x, tf.int32), tf.ones([2, 2])
      )

  def test_numpy_output(self):
    for op in (
      tf1hess.eager.batch_hessians,
      lambda fn, x: tf1hess.eager.batch_hessian_vector_products(fn, x, x),
    ):
      with self.assertRaisesRegex(
        TypeError, "`fn` must return tf.Tensors .* saw ndarray"
      ):
        op(lambda x: np.sum(np.sin(x), axis=1), np.ones((2, 2)))

  def test_rank_below_two(self):
    with self.assertRaisesRegex(ValueError, "`x` must have rank >= 2"):
      tf1hess.eager.batch_hessians(tf.reduce_sum, tf.ones([3]))

  def test_vector_of_wrong_shape(self):
    with self.assertRaisesRegex(ValueError, "`v` must have the shape of `x`"):
      tf1hess.eager.batch_hessian_vector_products(
        tf.reduce_sum, tf.ones([3, 2]), tf.ones([3, 3])
      )

  def test_bad_order(self):
    with self.assertRaisesRegex(ValueError, "`order` must be a positive int"):
      tf1hess.eager.batch_derivatives(tf.reduce_sum, tf.ones([3, 2]), 0)


if __name__ == "__main__":
  tf.test.main()
