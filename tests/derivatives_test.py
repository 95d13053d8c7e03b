"""Higher-order per-sample derivatives: graph op and eager twin.

References: the closed-form derivatives of `log(x + 2)`, of a cubic form and
of `exp(w . x)`, and the other path (graph against eager).
"""

import itertools
import math

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf1hess


def _log_derivative(x, order):
  """`d^n log(x + 2) / dx^n = (-1)^(n+1) (n-1)! / (x + 2)^n`."""
  return (-1.0) ** (order + 1) * math.factorial(order - 1) / (x + 2.0) ** order


def _symmetrised(t):
  """`sum over the 6 permutations of T[a, b, c]`: the 3rd derivative of the
  cubic form `sum T[a, b, c] x_a x_b x_c`."""
  return sum(np.transpose(t, p) for p in itertools.permutations(range(3)))


def _cubic_form(x, t):
  flat = tf.reshape(x, [tf.shape(x)[0], -1])
  return tf.einsum("abc,na,nb,nc->n", tf.constant(t, x.dtype), flat, flat, flat)


def _exp_ridge(x, w):
  """Per-sample `exp(w . x)`; its n-th derivative is `exp(w . x) w^(x n)`."""
  return tf.exp(tf.linalg.matvec(x, tf.constant(w, x.dtype)))


def _exp_ridge_derivative(x, w, order):
  out = np.exp(x @ w)
  for _ in range(order):
    out = out[..., None] * w
  return out


def _graph(fn, x_val, order, dtype=tf.float64, static_batch=False):
  """`batch_derivatives` on a placeholder with a `None` batch, in a session."""
  x_val = np.asarray(x_val)
  with tf.Graph().as_default():
    batch = x_val.shape[0] if static_batch else None
    x = tf.compat.v1.placeholder(dtype, (batch,) + x_val.shape[1:])
    d = tf1hess.batch_derivatives(fn(x), x, order)
    expected_static = [batch] + list(x_val.shape[1:]) * order
    assert d.shape.as_list() == expected_static, (d.shape, expected_static)
    with tf.compat.v1.Session() as sess:
      return sess.run(d, {x: x_val})


def _eager(fn, x_val, order, dtype=tf.float64):
  return tf1hess.eager.batch_derivatives(
    fn, tf.constant(x_val, dtype), order
  ).numpy()


def _in_function(fn, x_val, order, dtype=tf.float64):
  """The eager path traced once with a `None` batch, then called."""
  x_val = np.asarray(x_val)
  spec = tf.TensorSpec((None,) + x_val.shape[1:], dtype)

  @tf.function(input_signature=[spec])
  def derivatives(x):
    return tf1hess.eager.batch_derivatives(fn, x, order)

  return derivatives(tf.constant(x_val, dtype)).numpy()


_PATHS = (("graph", _graph), ("eager", _eager), ("function", _in_function))


class LogOrdersTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    (f"{name}_order{order}", path, order)
    for (name, path), order in itertools.product(_PATHS, (1, 2, 3, 4))
  )
  def test_log_at_one(self, path, order):
    # d^n log(x + 2) / dx^n at x = 1: 1/3, -1/9, 2/27, -6/81.
    expected = {1: 1 / 3, 2: -1 / 9, 3: 2 / 27, 4: -6 / 81}[order]
    for n in (1, 5):  # the same graph or function for two batch sizes
      out = path(lambda x: tf.math.log(x + 2.0), np.ones((n, 1)), order)
      self.assertEqual(out.shape, (n,) + (1,) * order)
      self.assertAllClose(out.ravel(), np.full(n, expected), rtol=1e-12)

  @parameterized.named_parameters(
    (f"{name}_order{order}", path, order)
    for (name, path), order in itertools.product(_PATHS, (1, 2, 3, 4))
  )
  def test_log_per_sample(self, path, order):
    x_val = np.random.default_rng(0).uniform(-1.5, 3.0, size=(6, 1))
    out = path(lambda x: tf.math.log(x + 2.0), x_val, order)
    self.assertAllClose(
      out.reshape(6), _log_derivative(x_val[:, 0], order), rtol=1e-10
    )

  def test_dynamic_batch_in_one_graph(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 1])
      d4 = tf1hess.batch_derivatives(tf.math.log(x + 2.0), x, order=4)
      with tf.compat.v1.Session() as sess:
        for n in (0, 1, 3, 17):
          x_val = np.linspace(0.0, 1.0, n).reshape(n, 1)
          out = sess.run(d4, {x: x_val})
          self.assertEqual(out.shape, (n, 1, 1, 1, 1))
          self.assertAllClose(
            out.reshape(n), _log_derivative(x_val[:, 0], 4), rtol=1e-10
          )


class ThirdOrderTest(tf.test.TestCase, parameterized.TestCase):
  slow_cases = (
    "test_exp_ridge_varies_per_sample_function_order4",
    "test_exp_ridge_varies_per_sample_graph_order4",
  )

  @parameterized.named_parameters(*_PATHS)
  def test_cubic_form_matches_symmetrised_coefficients(self, path):
    k = 3
    t = np.random.default_rng(1).normal(size=(k, k, k))
    x_val = np.random.default_rng(2).normal(size=(4, k))
    out = path(lambda x: _cubic_form(x, t), x_val, 3)
    self.assertEqual(out.shape, (4, k, k, k))
    self.assertAllClose(out, np.broadcast_to(_symmetrised(t), out.shape))

  @parameterized.named_parameters(*_PATHS)
  def test_rank3_input_keeps_feature_shape(self, path):
    t = np.random.default_rng(3).normal(size=(4, 4, 4))
    x_val = np.random.default_rng(4).normal(size=(2, 2, 2))
    out = path(lambda x: _cubic_form(x, t), x_val, 3)
    self.assertEqual(out.shape, (2,) + (2, 2) * 3)
    expected = np.broadcast_to(_symmetrised(t), (2, 4, 4, 4))
    self.assertAllClose(out.reshape(2, 4, 4, 4), expected)

  @parameterized.named_parameters(
    (f"{name}_order{order}", path, order)
    for (name, path), order in itertools.product(_PATHS, (2, 3, 4))
  )
  def test_exp_ridge_varies_per_sample(self, path, order):
    w = np.array([0.5, -0.3, 0.8])
    x_val = np.random.default_rng(5).normal(size=(5, 3))
    out = path(lambda x: _exp_ridge(x, w), x_val, order)
    self.assertAllClose(out, _exp_ridge_derivative(x_val, w, order))

  def test_static_batch_is_kept(self):
    t = np.random.default_rng(6).normal(size=(2, 2, 2))
    x_val = np.random.default_rng(7).normal(size=(3, 2))
    out = _graph(lambda x: _cubic_form(x, t), x_val, 3, static_batch=True)
    self.assertAllClose(out, np.broadcast_to(_symmetrised(t), out.shape))

  @parameterized.named_parameters(("float32", tf.float32), ("float64", None))
  def test_graph_and_eager_paths_agree(self, dtype):
    dtype = dtype or tf.float64
    rng = np.random.default_rng(8)
    w1, w2 = rng.normal(size=(3, 6)), rng.normal(size=(6,))

    def fn(x):
      h = tf.tanh(tf.matmul(x, tf.constant(w1, x.dtype)))
      return tf.linalg.matvec(h, tf.constant(w2, x.dtype))

    x_val = rng.normal(size=(4, 3)).astype(dtype.as_numpy_dtype)
    graph = _graph(fn, x_val, 3, dtype=dtype)
    eager = _eager(fn, x_val, 3, dtype=dtype)
    self.assertAllClose(
      graph, eager, rtol=1e-5 if dtype == tf.float32 else 1e-12
    )

  @parameterized.named_parameters(*_PATHS)
  def test_quadratic_gives_zeros_beyond_order_two(self, path):
    # The trap of linear models one level up: the Hessian is constant, so
    # its derivative is unconnected; the third derivative is zeros, not None.
    x_val = np.random.default_rng(9).normal(size=(3, 2))
    out = path(lambda x: tf.reduce_sum(x * x, axis=1), x_val, 3)
    self.assertAllEqual(out, np.zeros((3, 2, 2, 2)))

  def test_unconnected_none_gives_none(self):
    # Eagerly (and in graphs with control flow v1) the derivative of the
    # constant Hessian of `x * x` is unconnected: `None` on request. (A v2
    # `while_loop` in a graph keeps `x` connected and gives zeros.)
    eager = tf1hess.eager.batch_derivatives(
      lambda x: tf.reduce_sum(x * x, axis=1),
      tf.ones([2, 2], tf.float64),
      3,
      unconnected_gradients="none",
    )
    self.assertIsNone(eager)
    tf.compat.v1.disable_control_flow_v2()
    self.addCleanup(tf.compat.v1.enable_control_flow_v2)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      y = tf.reduce_sum(x * x, axis=1)
      d3 = tf1hess.batch_derivatives(y, x, 3, unconnected_gradients="none")
    self.assertIsNone(d3)


def _layer_norm_model(x, moments):
  """A normalized sine of `x` times `x`, `(N,)`: with `tf.nn.moments`,
  whose mean TensorFlow stops in the variance's gradient, or with the same
  mean and variance written out."""
  if moments:
    mean, variance = tf.nn.moments(x, [1], keepdims=True)
  else:
    mean = tf.reduce_mean(x, 1, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), 1, keepdims=True)
  z = (x - mean) * tf.math.rsqrt(variance + 0.5)
  return tf.reduce_sum(tf.sin(z) * x, axis=1)


class InexactSecondDerivativesTest(tf.test.TestCase, parameterized.TestCase):
  """Orders >= 3 differentiate TensorFlow's second derivatives again."""

  def test_moments_are_exact_by_default(self):
    # Built alone in its graph, the order-3 derivatives missed the
    # curvature through the stopped mean (15% of the largest entry).
    x_val = np.random.default_rng(20).normal(size=(4, 3))
    out = _graph(lambda x: _layer_norm_model(x, True), x_val, 3)
    written_out = _graph(lambda x: _layer_norm_model(x, False), x_val, 3)
    self.assertAllClose(out, written_out, rtol=1e-9, atol=1e-9)

  def test_while_loop_through_moments_warns(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = _layer_norm_model(x, True)
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.batch_derivatives(y, x, 3, method="while_loop")
    self.assertRegex(
      "\n".join(logs.output),
      r"derivatives of order 3 for .* miss the curvature through the mean;"
      r" method='auto' is exact at any order through tf.nn.moments",
    )

  def test_product_at_zero_warns(self):
    # TensorFlow's gradient of the gradient of a product is wrong where an
    # entry is 0: order 2 is the engine's, exact; order 3 says so.
    x_val = np.array([[0.0, 2.0, 3.0]])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = tf.reduce_prod(x, axis=1)
      with self.assertNoLogs(level="WARNING"):
        h = tf1hess.batch_hessians(y, x)
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.batch_derivatives(y, x, 3)
      with tf.compat.v1.Session() as sess:
        h = sess.run(h, {x: x_val})
    self.assertAllClose(h[0], [[0, 3, 2], [3, 0, 0], [2, 0, 0]])
    self.assertRegex(
      "\n".join(logs.output),
      r"derivatives of order 3 for .* a product's gradient .* the forward"
      r" engine, exact there, computes order 2 only",
    )


class MemoryRefusalTest(tf.test.TestCase, parameterized.TestCase):
  # 1000^5 float32 numbers per sample are 4 PB: no machine holds them.

  def test_graph_refuses_before_building(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 1000])
      y = tf.reduce_sum(tf.sin(x), axis=1)
      ops_before = len(graph.get_operations())
      with self.assertRaisesRegex(
        ValueError,
        r"`order` = 5 asks for K\^5 = 1000\^5 elements per sample: .* GiB "
        r"for a single sample, more than this machine's .* GiB of memory",
      ):
        tf1hess.batch_derivatives(y, x, order=5)
      self.assertLen(graph.get_operations(), ops_before)

  def test_graph_counts_a_static_batch(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [8, 100000])
      with self.assertRaisesRegex(ValueError, r"GiB for N = 8, more than"):
        tf1hess.batch_derivatives(tf.sin(x), x, order=3)

  def test_eager_refuses_before_calling_fn(self):
    calls = []

    def fn(x):
      calls.append(x)
      return tf.reduce_sum(tf.sin(x), axis=1)

    with self.assertRaisesRegex(
      ValueError, r"`order` = 5 asks for K\^5 = 1000\^5 elements per sample"
    ):
      tf1hess.eager.batch_derivatives(fn, tf.zeros([2, 1000]), order=5)
    self.assertEmpty(calls)

  def test_an_order_that_fits_is_built(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 1000])
      d = tf1hess.batch_derivatives(tf.sin(x), x, order=2)
    self.assertEqual(d.shape.as_list(), [None, 1000, 1000])


class OrderValidationTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("zero", 0, r"saw 0\."),
    ("negative", -2, r"saw -2\."),
    ("float", 2.0, r"saw 2\.0\."),
    ("bool", True, r"saw True\."),
    ("string", "2", r"saw '2'\."),
    ("none", None, r"saw None\."),
  )
  def test_graph_rejects(self, order, seen):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      y = tf.reduce_sum(x * x, axis=1)
      ops_before = len(graph.get_operations())
      with self.assertRaisesRegex(
        ValueError, r"^`order` must be a positive int; " + seen
      ):
        tf1hess.batch_derivatives(y, x, order)
      self.assertLen(graph.get_operations(), ops_before)

  def test_numpy_integers_are_orders(self):
    x_val = np.array([[0.3, -0.7]])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      y = tf.reduce_sum(tf.sin(x), axis=1)
      third = tf1hess.batch_derivatives(y, x, np.int64(3))
      with tf.compat.v1.Session() as sess:
        got = sess.run(third, {x: x_val})
    expected = np.zeros((1, 2, 2, 2))
    expected[0, [0, 1], [0, 1], [0, 1]] = -np.cos(x_val[0])
    self.assertAllClose(got, expected, atol=1e-12)
    eager = tf1hess.eager.batch_derivatives(
      lambda t: tf.reduce_sum(tf.sin(t), axis=1), x_val, np.int32(3)
    )
    self.assertAllClose(eager, expected, atol=1e-12)
    # numpy 2 writes np.False_, numpy 1 (TensorFlow 2.12) False.
    with self.assertRaisesRegex(ValueError, r"saw (np\.False_|False)\."):
      tf1hess.eager.batch_derivatives(tf.sin, x_val, np.False_)

  @parameterized.named_parameters(
    ("zero", 0, r"saw 0\."),
    ("float", 1.5, r"saw 1\.5\."),
    ("bool", False, r"saw False\."),
  )
  def test_eager_rejects(self, order, seen):
    with self.assertRaisesRegex(
      ValueError, r"^`order` must be a positive int; " + seen
    ):
      tf1hess.eager.batch_derivatives(
        lambda x: tf.reduce_sum(x * x, axis=1), tf.ones([2, 2]), order
      )


if __name__ == "__main__":
  tf.test.main()
