"""Per-output and joint derivatives: graph ops and their eager twins.

References: `tf.gradients` of each output apart, the diagonal blocks of
`tf.hessians` of each output over one placeholder holding the joint input,
and the analytic derivatives of small polynomials.
"""

from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess

_RNG = np.random.default_rng(0)
_W1 = _RNG.normal(size=(4, 6))
_W2 = _RNG.normal(size=(6, 3))


def _two_layer(z):
  """A tanh network `(N, 4) -> (N, 3)`: three outputs per sample."""
  dtype = z.dtype
  return tf.matmul(tf.tanh(tf.matmul(z, tf.constant(_W1, dtype))), _W2)


def _split_model(x, t):
  """`_two_layer` on the joint input `[x (N, 3), t (N, 1)]`."""
  return _two_layer(tf.concat([x, t], axis=1))


def _joint_reference(z_val):
  """Per-output Hessians `(N, 3, 4, 4)` over one joint placeholder."""
  with tf.Graph().as_default():
    z = tf.compat.v1.placeholder(tf.float64, [None, 4])
    y = _two_layer(z)
    full = [tf.hessians(y[:, m], z)[0] for m in range(3)]
    with tf.compat.v1.Session() as sess:
      values = sess.run(full, {z: z_val})
  return np.stack([testing_utils.diagonal_blocks(v) for v in values], axis=1)


def _run(fetches, feed):
  with tf.compat.v1.Session() as sess:
    return sess.run(fetches, feed)


class JacobiansTest(
  tf.test.TestCase, parameterized.TestCase, testing_utils.ControlFlowMixin
):
  @parameterized.parameters((1, 5), (2, 0), (2, 1), (2, 5))
  def test_matches_gradients_of_each_output(self, cf, n):
    self.control_flow(cf)
    with tf.Graph().as_default():
      z = tf.compat.v1.placeholder(tf.float64, [None, 4])
      y = _two_layer(z)
      j = tf1hess.batch_jacobians(y, z)
      self.assertEqual(j.shape.as_list(), [None, 3, 4])
      refs = tf.stack([tf.gradients(y[:, m], z)[0] for m in range(3)], 1)
      out, ref = _run([j, refs], {z: _RNG.normal(size=(n, 4))})
    self.assertEqual(out.shape, (n, 3, 4))
    self.assertAllClose(out, ref)

  @parameterized.parameters("auto", "pfor", "while_loop")
  def test_list_of_inputs_and_output_dims(self, method):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      y = tf.reshape(_split_model(x, t), [-1, 3, 1])  # output dims (3, 1)
      jx, jt = tf1hess.batch_jacobians(y, [x, t], method=method)
      self.assertEqual(jx.shape.as_list(), [None, 3, 1, 3])
      self.assertEqual(jt.shape.as_list(), [None, 3, 1, 1])
      refs = [
        tf.stack([tf.gradients(y[:, m, 0], v)[0] for m in range(3)], 1)
        for v in (x, t)
      ]
      feed = {x: _RNG.normal(size=(4, 3)), t: _RNG.normal(size=(4, 1))}
      (out_x, out_t), (ref_x, ref_t) = _run([[jx, jt], refs], feed)
    self.assertAllClose(out_x[:, :, 0], ref_x)
    self.assertAllClose(out_t[:, :, 0], ref_t)

  @parameterized.product(
    method=["auto", "forward", "pfor", "while_loop"], cf=[1, 2], n=[0, 1, 5]
  )
  def test_float32_outputs_of_a_float64_input(self, method, cf, n):
    """`tf.compat.v1.losses` cast a float64 model's outputs to float32: the
    rows are derivatives with respect to the float64 input."""
    self.control_flow(cf)
    with tf.Graph().as_default():
      z = tf.compat.v1.placeholder(tf.float64, [None, 4])
      y64 = _two_layer(z)
      y = tf.cast(y64, tf.float32)
      j = tf1hess.batch_jacobians(y, z, method=method)
      self.assertEqual(j.dtype, tf.float64)
      refs = tf.stack([tf.gradients(y64[:, m], z)[0] for m in range(3)], 1)
      out, ref = _run([j, refs], {z: _RNG.normal(size=(n, 4))})
    self.assertEqual(out.shape, (n, 3, 4))
    self.assertAllClose(out, ref, rtol=1e-6, atol=1e-6)

  def test_one_dimensional_output_is_the_gradient(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      j = tf1hess.batch_jacobians(tf.reduce_sum(x**3, axis=1), x)
      self.assertEqual(j.shape.as_list(), [None, 2])
      out = _run(j, {x: [[1.0, 2.0]]})
    self.assertAllClose(out, [[3.0, 12.0]])


class OutputHessiansTest(
  tf.test.TestCase, parameterized.TestCase, testing_utils.ControlFlowMixin
):
  @parameterized.parameters(
    (1, "auto"), (2, "auto"), (2, "pfor"), (2, "while_loop")
  )
  def test_one_input_matches_tf_hessians_per_output(self, cf, method):
    self.control_flow(cf)
    z_val = _RNG.normal(size=(5, 4))
    with tf.Graph().as_default():
      z = tf.compat.v1.placeholder(tf.float64, [None, 4])
      h = tf1hess.batch_output_hessians(_two_layer(z), z, method=method)
      self.assertEqual(h.shape.as_list(), [None, 3, 4, 4])
      out = _run(h, {z: z_val})
    self.assertAllClose(out, _joint_reference(z_val))

  @parameterized.parameters(1, 2)
  def test_cross_blocks_of_separate_inputs(self, cf):
    self.control_flow(cf)
    x_val, t_val = _RNG.normal(size=(5, 3)), _RNG.normal(size=(5, 1))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      blocks = tf1hess.batch_output_hessians(_split_model(x, t), [x, t])
      self.assertEqual(blocks[0][1].shape.as_list(), [None, 3, 3, 1])
      self.assertEqual(blocks[1][0].shape.as_list(), [None, 3, 1, 3])
      out = _run(blocks, {x: x_val, t: t_val})
    ref = _joint_reference(np.concatenate([x_val, t_val], axis=1))
    self.assertAllClose(out[0][0], ref[:, :, :3, :3])
    self.assertAllClose(out[0][1], ref[:, :, :3, 3:])
    self.assertAllClose(out[1][0], ref[:, :, 3:, :3])
    self.assertAllClose(out[1][1], ref[:, :, 3:, 3:])

  def test_list_of_one_input_gives_nested_blocks(self):
    z_val = _RNG.normal(size=(2, 4))
    with tf.Graph().as_default():
      z = tf.compat.v1.placeholder(tf.float64, [None, 4])
      blocks = tf1hess.batch_output_hessians(_two_layer(z), [z])
      self.assertLen(blocks, 1)
      self.assertLen(blocks[0], 1)
      out = _run(blocks[0][0], {z: z_val})
    self.assertAllClose(out, _joint_reference(z_val))

  def test_mixed_derivative_of_a_polynomial(self):
    # u = x^2 t^3: u_xt = 6 x t^2; a second output x t gives u_xt = 1.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 1])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      u = tf.concat([x**2 * t**3, x * t], axis=1)
      blocks = tf1hess.batch_output_hessians(u, [x, t])
      out = _run(blocks[0][1], {x: [[2.0], [1.0]], t: [[3.0], [-1.0]]})
    self.assertAllClose(out.reshape(2, 2), [[108.0, 1.0], [6.0, 1.0]])

  def test_single_output_matches_batch_hessians(self):
    w = testing_utils.mlp_weights(3)
    x_val = _RNG.normal(size=(4, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = testing_utils.tanh_mlp(x, *w)[:, None]  # (N, 1)
      h = tf1hess.batch_output_hessians(y, x)
      self.assertEqual(h.shape.as_list(), [None, 1, 3, 3])
      out = _run(h, {x: x_val})
    self.assertAllClose(out[:, 0], testing_utils.tanh_mlp_hessians(x_val, *w))


class DiagonalsAndLaplaciansTest(
  tf.test.TestCase, parameterized.TestCase, testing_utils.ControlFlowMixin
):
  slow_cases = ("test_match_the_joint_reference1",)

  @parameterized.parameters(1, 2)
  def test_match_the_joint_reference(self, cf):
    self.control_flow(cf)
    x_val, t_val = _RNG.normal(size=(6, 3)), _RNG.normal(size=(6, 1))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      y = _split_model(x, t)
      diagonals = tf1hess.batch_output_hessian_diagonals(y, [x, t])
      laplacians = tf1hess.batch_output_laplacians(y, [x, t])
      space = tf1hess.batch_output_laplacians(y, x)
      self.assertEqual(laplacians.shape.as_list(), [None, 3])
      out = _run([diagonals, laplacians, space], {x: x_val, t: t_val})
    ref = _joint_reference(np.concatenate([x_val, t_val], axis=1))
    ref_diag = np.diagonal(ref, axis1=2, axis2=3)  # (N, 3, 4)
    self.assertAllClose(out[0][0], ref_diag[:, :, :3])
    self.assertAllClose(out[0][1], ref_diag[:, :, 3:])
    self.assertAllClose(out[1], ref_diag.sum(axis=2))
    self.assertAllClose(out[2], ref_diag[:, :, :3].sum(axis=2))

  def test_laplacian_keeps_the_output_shape(self):
    # u = sum(x^3): Laplacian 6 * sum(x); shape (N, 1) like u.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      u = tf.reduce_sum(x**3, axis=1, keepdims=True)
      lap = tf1hess.batch_output_laplacians(u, x)
      self.assertEqual(lap.shape.as_list(), [None, 1])
      out = _run(lap - tf.ones_like(u), {x: [[1.0, 2.0, 3.0]]})
    self.assertAllClose(out, [[35.0]])


class ErrorsTest(tf.test.TestCase, parameterized.TestCase):
  _OPS = (
    ("jacobians", tf1hess.batch_jacobians),
    ("hessians", tf1hess.batch_output_hessians),
    ("diagonals", tf1hess.batch_output_hessian_diagonals),
    ("laplacians", tf1hess.batch_output_laplacians),
  )

  @parameterized.named_parameters(*_OPS)
  def test_list_of_ys(self, op):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      with self.assertRaisesRegex(ValueError, "`ys` must be one tensor"):
        op([x, x], x)

  @parameterized.named_parameters(*_OPS)
  def test_dynamic_output_dims(self, op):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      y = tf.compat.v1.placeholder_with_default(x, [None, None])
      with self.assertRaisesRegex(ValueError, "`ys` must have .* static"):
        op(y, x)

  @parameterized.named_parameters(*_OPS)
  def test_inputs_of_two_dtypes(self, op):
    # The ops that join the inputs' features refuse them; the diagonals
    # are per input.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
      t = tf.compat.v1.placeholder(tf.float64, [None, 1], name="t")
      u = tf.cast(tf.sin(x), tf.float64) * t**2
      if op is tf1hess.batch_output_hessian_diagonals:
        diagonals = op(u, [x, t])
        with tf.compat.v1.Session() as sess:
          out = sess.run(diagonals, {x: [[0.5]], t: [[2.0]]})
        self.assertAllClose(
          out, [[[[-4 * np.sin(0.5)]]], [[[2 * np.sin(0.5)]]]]
        )
        return
      with self.assertRaisesRegex(
        TypeError, r"`xs` must have one dtype .*x:0: float32, t:0: float64"
      ):
        op(u, [x, t])
      with self.assertRaisesRegex(TypeError, "`xs` must have one dtype"):
        tf1hess.Derivatives(u, [x, t])

  @parameterized.named_parameters(*_OPS)
  def test_dynamic_feature_dims(self, op):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, None])
      with self.assertRaisesRegex(ValueError, "`xs` must have static"):
        op(tf.reduce_sum(x, 1), x)

  @parameterized.named_parameters(*_OPS)
  def test_integer_ys(self, op):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      with self.assertRaisesRegex(TypeError, "`ys` must be a floating"):
        op(tf.cast(x, tf.int32), x)

  @parameterized.named_parameters(*_OPS)
  def test_bad_method(self, op):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      with self.assertRaisesRegex(ValueError, "`method` must be one of"):
        op(x, x, method="fast")

  @parameterized.named_parameters(*_OPS)
  def test_eager_tensors(self, op):
    x = tf.ones([2, 2])
    with self.assertRaisesRegex(RuntimeError, "needs graph mode"):
      op(x, x)


def _fn(x):
  return tf.stack([tf.reduce_sum(x**3, 1), x[:, 0] * x[:, 1]], axis=1)


class EagerTest(tf.test.TestCase, parameterized.TestCase):
  slow_cases = (
    "test_eagerly_with_rank_three_inputs_and_outputs10",
    "test_eagerly_with_rank_three_inputs_and_outputs11",
    "test_eagerly_with_rank_three_inputs_and_outputs3",
    "test_eagerly_with_rank_three_inputs_and_outputs4",
    "test_eagerly_with_rank_three_inputs_and_outputs5",
    "test_eagerly_with_rank_three_inputs_and_outputs6",
    "test_eagerly_with_rank_three_inputs_and_outputs7",
    "test_eagerly_with_rank_three_inputs_and_outputs8",
    "test_eagerly_with_rank_three_inputs_and_outputs9",
  )

  _PAIRS = (
    ("jacobians", "batch_jacobians"),
    ("hessians", "batch_output_hessians"),
    ("diagonals", "batch_output_hessian_diagonals"),
    ("laplacians", "batch_output_laplacians"),
  )

  def _graph(self, name, x_val):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      return _run(getattr(tf1hess, name)(_fn(x), x), {x: x_val})

  @parameterized.named_parameters(*_PAIRS)
  def test_eagerly_matches_graph(self, name):
    x_val = _RNG.normal(size=(3, 2))
    out = getattr(tf1hess.eager, name)(_fn, tf.constant(x_val))
    self.assertAllClose(out, self._graph(name, x_val))

  @parameterized.named_parameters(*_PAIRS)
  def test_in_tf_function_with_none_batch(self, name):
    op = getattr(tf1hess.eager, name)
    fn = tf.function(
      lambda x: op(_fn, x),
      input_signature=[tf.TensorSpec([None, 2], tf.float64)],
    )
    for n in (1, 4):
      x_val = _RNG.normal(size=(n, 2))
      self.assertAllClose(fn(x_val), self._graph(name, x_val))

  @parameterized.product(
    name=[name for _, name in _PAIRS], method=["auto", "while_loop", "forward"]
  )
  def test_eagerly_with_rank_three_inputs_and_outputs(self, name, method):
    # Outputs (N, 2, 2) of inputs (N, 2, 3), a layer normalization among
    # them: TensorFlow's second derivatives through tf.nn.moments are wrong,
    # and the tapes give way to the graph op there, but for a method that
    # asks for them (while_loop: as the graph op, with a warning).
    w = _RNG.normal(size=(3, 2))

    def fn(x):
      h = tf.tanh(tf.einsum("nij,jk->nik", x, tf.constant(w, x.dtype)))
      mean, variance = tf.nn.moments(x, [2], keepdims=True)
      return h * h + (x[:, :, :2] - mean) * tf.math.rsqrt(variance + 1.0)

    x_val = _RNG.normal(size=(3, 2, 3))
    out = getattr(tf1hess.eager, name)(fn, tf.constant(x_val), method=method)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2, 3])
      op = getattr(tf1hess, name)
      want = _run(op(fn(x), x, method=method), {x: x_val})
    self.assertAllClose(out, want)

  def test_eagerly_the_second_call_traces_nothing(self):
    # The tapes run the ops eagerly: no tf.function traced at every call
    # (the first call traces fn once to see whether the tapes are exact).
    x_val = tf.constant(_RNG.normal(size=(3, 2)))
    for _, name in self._PAIRS:
      op = getattr(tf1hess.eager, name)
      want = op(_fn, x_val)
      with mock.patch.object(tf, "function", side_effect=AssertionError):
        self.assertAllClose(op(_fn, x_val), want)

  def test_analytic_hessians(self):
    x_val = np.array([[1.0, 2.0]])
    out = tf1hess.eager.batch_output_hessians(_fn, x_val)
    self.assertAllClose(out[0, 0], [[6.0, 0.0], [0.0, 12.0]])
    self.assertAllClose(out[0, 1], [[0.0, 1.0], [1.0, 0.0]])

  def test_not_callable(self):
    with self.assertRaisesRegex(TypeError, "`fn` must be a callable"):
      tf1hess.eager.batch_jacobians(1.0, tf.ones([1, 2]))


if __name__ == "__main__":
  tf.test.main()
