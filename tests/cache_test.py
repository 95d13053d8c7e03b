"""`tf1hess.Derivatives`: values against `tf.gradients`, built once each.

References: nested `tf.gradients` of each output, entry by entry, in the
same graph; the analytic derivatives of a polynomial.
"""

from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess import _core
from tf1hess import finite_differences
from tf1hess import per_output
from tf1hess.forward import dispatch

_RNG = np.random.default_rng(0)
_W1 = _RNG.normal(size=(3, 5))
_W2 = _RNG.normal(size=(5, 2))


def _model(x, t):
  """A tanh network of `[x (N, 2), t (N, 1)]` with two outputs `(N, 2)`."""
  h = tf.tanh(tf.matmul(tf.concat([x, t], axis=1), tf.constant(_W1, x.dtype)))
  return tf.matmul(h, tf.constant(_W2, x.dtype))


def _references(y, xs):
  """`tf.gradients` per output and feature: gradients and Hessians.

  Returns:
    `(grads, hessians)`: `grads[c]` `(N, K)` and `hessians[c]` `(N, K, K)`
    over the concatenated features of `xs` (each `(N, 1)` or `(N, k)`).
  """
  grads, hessians = [], []
  for c in range(y.shape[1]):
    g = tf.concat(tf.gradients(y[:, c], xs), axis=1)
    rows = [tf.concat(tf.gradients(g[:, i], xs), 1) for i in range(g.shape[1])]
    grads.append(g)
    hessians.append(tf.stack(rows, axis=1))
  return grads, hessians


def _num_ops():
  return len(tf.compat.v1.get_default_graph().get_operations())


def _graph():
  """`x (N, 2)`, `t (N, 1)`, `_model` of them and a feed of 5 samples."""
  x = tf.compat.v1.placeholder(tf.float64, [None, 2])
  t = tf.compat.v1.placeholder(tf.float64, [None, 1])
  feed = {x: _RNG.normal(size=(5, 2)), t: _RNG.normal(size=(5, 1))}
  return x, t, _model(x, t), feed


class ValuesTest(
  tf.test.TestCase, parameterized.TestCase, testing_utils.ControlFlowMixin
):
  slow_cases = (
    "test_every_quantity_matches_tf_gradients0",
    "test_every_quantity_matches_tf_gradients1",
    "test_every_quantity_matches_tf_gradients2",
  )

  @parameterized.parameters(
    (1, False, None),
    (1, True, "auto"),
    (2, False, None),
    (2, True, None),
    (2, False, "auto"),
    (2, True, "auto"),
  )
  def test_every_quantity_matches_tf_gradients(self, cf, full_first, method):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x, t, y, feed = _graph()
      d = tf1hess.Derivatives(y, [x, t], method=method)
      self.assertEqual((d.num_outputs, d.num_features), (2, 3))
      if full_first:
        full = [d.hessian(component=c) for c in range(2)]
      out = {
        "entries": [
          [[d.hessian(i, j, c) for j in range(3)] for i in range(3)]
          for c in range(2)
        ],
        "rows": [[d.hessian(i, None, c) for i in range(3)] for c in range(2)],
        "full": [d.hessian(component=c) for c in range(2)],
        "diagonal": [d.diagonal(c) for c in range(2)],
        "laplacian": [d.laplacian(c) for c in range(2)],
        "flat": [d.laplacian(c, keepdims=False) for c in range(2)],
        "gradient": [d.gradient(c) for c in range(2)],
        "jacobian": d.jacobian(),
        "column": d.jacobian(None, 2),
        "entry": d.jacobian(1, 0),
      }
      if full_first:
        self.assertIs(out["full"][1], full[1])
      self.assertEqual(out["laplacian"][0].shape.as_list(), [None, 1])
      self.assertEqual(out["flat"][0].shape.as_list(), [None])
      self.assertEqual(out["entries"][0][0][0].shape.as_list(), [None, 1])
      self.assertEqual(out["full"][0].shape.as_list(), [None, 3, 3])
      grads, hessians = _references(y, [x, t])
      with tf.compat.v1.Session() as sess:
        out, grads, hessians = sess.run([out, grads, hessians], feed)
    for c in range(2):
      h = hessians[c]
      for i in range(3):
        self.assertAllClose(out["rows"][c][i], h[:, i])
        for j in range(3):
          self.assertAllClose(out["entries"][c][i][j], h[:, i, j : j + 1])
      self.assertAllClose(out["full"][c], h)
      self.assertAllClose(out["diagonal"][c], np.diagonal(h, axis1=1, axis2=2))
      trace = np.trace(h, axis1=1, axis2=2)
      self.assertAllClose(out["laplacian"][c], trace[:, None])
      self.assertAllClose(out["flat"][c], trace)
      self.assertAllClose(out["gradient"][c], grads[c])
    self.assertAllClose(out["jacobian"], np.stack(grads, axis=1))
    self.assertAllClose(out["column"], np.stack(grads, axis=1)[:, :, 2])
    self.assertAllClose(out["entry"], grads[1][:, 0:1])

  def test_polynomial_with_one_output(self):
    # u = x^2 t^3 over xs = [x, t]: u_xt = 6 x t^2, u_tt = 6 x^2 t.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 1])
      t = tf.compat.v1.placeholder(tf.float32, [None, 1])
      d = tf1hess.Derivatives(x**2 * t**3, [x, t])
      fetches = [d.hessian(0, 1), d.hessian(1, 1), d.laplacian()]
      with tf.compat.v1.Session() as sess:
        u_xt, u_tt, lap = sess.run(fetches, {x: [[2.0]], t: [[3.0]]})
    self.assertAllClose(u_xt, [[108.0]])
    self.assertAllClose(u_tt, [[72.0]])
    self.assertAllClose(lap, [[2 * 27.0 + 72.0]])

  @parameterized.parameters(None, "auto", "pfor", "while_loop")
  def test_one_dimensional_ys(self, method):
    w = testing_utils.mlp_weights(3)
    x_val = _RNG.normal(size=(4, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      d = tf1hess.Derivatives(testing_utils.tanh_mlp(x, *w), x, method=method)
      with tf.compat.v1.Session() as sess:
        h, g = sess.run([d.hessian(), d.gradient()], {x: x_val})
    self.assertAllClose(h, testing_utils.tanh_mlp_hessians(x_val, *w))
    self.assertAllClose(g, testing_utils.tanh_mlp_gradients(x_val, *w))


class BuiltOnceTest(tf.test.TestCase):
  def test_second_calls_add_no_ops(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      t = tf.compat.v1.placeholder(tf.float32, [None, 1])
      d = tf1hess.Derivatives(_model(x, t), [x, t])

      def requests():
        return [
          d.gradient(1),
          d.hessian(0, 2, component=1),
          d.hessian(component=0),
          d.diagonal(1),
          d.laplacian(0),
          d.jacobian(),
        ]

      first = requests()
      before = _num_ops()
      second = requests()
      self.assertEqual(_num_ops(), before)
    for a, b in zip(first, second):
      self.assertIs(a, b)

  def test_full_hessian_serves_entries_without_backward_passes(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      d = tf1hess.Derivatives(tf.reduce_sum(tf.sin(x), 1, keepdims=True), x)
      d.hessian()
      before = tf.compat.v1.get_default_graph().get_operations()
      d.hessian(1, 2)
      d.diagonal()
      d.laplacian()
      new = tf.compat.v1.get_default_graph().get_operations()[len(before) :]
    self.assertNotEmpty(new)
    self.assertFalse(any("gradients" in op.name for op in new), new)

  def test_laplacian_reuses_the_rows_of_entries(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      d = tf1hess.Derivatives(tf.reduce_sum(tf.sin(x) * x, 1), x)
      d.hessian(0, 0)
      d.hessian(1, 1)
      before = tf.compat.v1.get_default_graph().get_operations()
      d.laplacian()
      d.hessian()
      new = tf.compat.v1.get_default_graph().get_operations()[len(before) :]
    self.assertNotEmpty(new)
    self.assertFalse(any("gradients" in op.name for op in new), new)

  def test_full_hessian_of_one_input_asked_first_uses_the_op(self):
    # Before any entry: `tf1hess.batch_hessians` (the forward engine where
    # the cost model takes it), not K rows of the cache.
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      w = tf.constant(_RNG.normal(size=(3, 4)))
      y = tf.reduce_sum(tf.tanh(tf.matmul(x, w)) ** 2, 1, keepdims=True)
      d = tf1hess.Derivatives(y, x)
      h = d.hessian()
      self.assertTrue(
        any("batch_hessians" in op.name for op in graph.get_operations())
      )
      reference = tf.hessians(tf.reduce_sum(y), x)[0]
      x_val = _RNG.normal(size=(4, 3))
      with tf.compat.v1.Session() as sess:
        h_val, reference_val = sess.run([h, reference], {x: x_val})
    for n in range(4):
      self.assertAllClose(h_val[n], reference_val[n, :, n, :])

  def test_wide_inputs_use_the_ops(self):
    k = tf1hess.cache.ROWS_MAX_FEATURES + 1
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, k])
      d = tf1hess.Derivatives(tf.reduce_sum(x**3, 1), x)
      lap = d.laplacian()
      h = d.hessian()
      with tf.compat.v1.Session() as sess:
        x_val = _RNG.normal(size=(2, k)).astype(np.float32)
        lap_val, h_val = sess.run([lap, h], {x: x_val})
      ops = tf.compat.v1.get_default_graph().get_operations()
    self.assertTrue(any("batch_hessians" in op.name for op in ops))
    self.assertAllClose(lap_val[:, 0], 6 * x_val.sum(1), rtol=1e-5)
    self.assertAllClose(h_val, np.stack([np.diag(6 * v) for v in x_val]))

  def test_diagonal_serves_diagonal_entries(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      d = tf1hess.Derivatives(tf.reduce_sum(tf.sin(x), 1, keepdims=True), x)
      d.diagonal()
      before = _num_ops()
      d.hessian(2, 2)
      self.assertLessEqual(_num_ops() - before, 5)

  def test_ops_live_under_the_name_scope(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      d = tf1hess.Derivatives(tf.reduce_sum(x**3, 1), x, name="pde")
      self.assertTrue(d.laplacian().name.startswith("pde/"))
      self.assertTrue(d.gradient().name.startswith("pde/"))


class ErrorsTest(tf.test.TestCase, parameterized.TestCase):
  def _derivatives(self, outputs=2):
    x = tf.compat.v1.placeholder(tf.float32, [None, 3])
    y = tf.concat([tf.reduce_sum(x, 1, keepdims=True)] * outputs, 1)
    return tf1hess.Derivatives(y, x)

  def test_component_needed_with_several_outputs(self):
    with tf.Graph().as_default():
      d = self._derivatives()
      with self.assertRaisesRegex(ValueError, "`component` must be given"):
        d.laplacian()

  @parameterized.parameters(2, -1)
  def test_component_out_of_range(self, component):
    with tf.Graph().as_default():
      d = self._derivatives()
      with self.assertRaisesRegex(ValueError, r"`component` must be in \[0, 2"):
        d.hessian(0, 0, component=component)

  @parameterized.parameters(("i", 3), ("j", -1))
  def test_feature_out_of_range(self, arg, value):
    with tf.Graph().as_default():
      d = self._derivatives(outputs=1)
      with self.assertRaisesRegex(ValueError, f"`{arg}` must be in \\[0, 3\\)"):
        d.hessian(**{"i": 0, "j": 0, arg: value})

  def test_numpy_integer_indices(self):
    # As `dde.grad.hessian` takes them (a loop over np.arange(d)): the same
    # tensors as Python ints.
    with tf.Graph().as_default():
      d = self._derivatives(outputs=2)
      i, j, c = np.arange(3)[[2, 1, 1]]
      self.assertIs(d.hessian(i, j, component=c), d.hessian(2, 1, 1))
      self.assertIs(d.jacobian(c, j), d.jacobian(1, 1))

  @parameterized.parameters(True, np.bool_(True), 1.0, "0")
  def test_index_not_an_int(self, value):
    with tf.Graph().as_default():
      d = self._derivatives(outputs=1)
      with self.assertRaisesRegex(TypeError, "`i` must be an int"):
        d.hessian(value, 0)

  def test_jacobian_output_out_of_range(self):
    with tf.Graph().as_default():
      d = self._derivatives()
      with self.assertRaisesRegex(ValueError, r"`i` must be in \[0, 2\)"):
        d.jacobian(2, 0)

  def test_eager(self):
    with self.assertRaisesRegex(RuntimeError, "needs graph mode"):
      tf1hess.Derivatives(tf.ones([2, 1]), tf.ones([2, 2]))

  def test_list_of_ys(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      with self.assertRaisesRegex(ValueError, "`ys` must be one tensor"):
        tf1hess.Derivatives([x, x], x)


class SeveralInputsTest(
  tf.test.TestCase, parameterized.TestCase, testing_utils.ControlFlowMixin
):
  """The Hessian over several inputs, cross blocks included."""

  slow_cases = ("test_a_cond_in_the_model_and_the_callers_own_gradients1",)

  @parameterized.parameters(1, 2)
  def test_full_hessian_of_several_inputs_takes_one_walk(self, cf):
    # `[x, t]` read as one tensor by a copy of the model: the engine's walk
    # gives the cross blocks, with no rows over the inputs.
    self.control_flow(cf)
    with tf.Graph().as_default():
      x, t, y, feed = _graph()
      d = tf1hess.Derivatives(y, [x, t], method="forward")
      with (
        mock.patch.object(
          per_output, "joint_hessian_rows", side_effect=AssertionError
        ),
        mock.patch.object(_core, "stack_rows", side_effect=AssertionError),
      ):
        full = [d.hessian(component=c) for c in range(2)]
        entry = d.hessian(2, 0, component=1)
        joint = tf1hess.batch_output_hessians(y, [x, t], method="forward")
      _, hessians = _references(y, [x, t])
      with tf.compat.v1.Session() as sess:
        full, entry, joint, hessians = sess.run(
          [full, entry, joint, hessians], feed
        )
    for c in range(2):
      self.assertAllClose(full[c], hessians[c])
      blocks = [[joint[a][b][:, c] for b in range(2)] for a in range(2)]
      self.assertAllClose(np.block(blocks), hessians[c])
    self.assertAllClose(entry, hessians[1][:, 2, 0:1])

  def test_inputs_of_different_batch_sizes(self):
    with tf.Graph().as_default():
      x, t, y, _ = _graph()
      h = tf1hess.Derivatives(y, [x, t]).hessian(component=0)
      with tf.compat.v1.Session() as sess:
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, "`xs` must have one batch size N"
        ):
          sess.run(h, {x: np.ones((4, 2)), t: np.ones((2, 1))})

  def test_several_inputs_through_a_loop_take_one_walk(self):
    # A control flow v1 `dynamic_rnn` over `[x, t]`: TensorFlow has no
    # second derivatives of the loop, the walk of the unrolled copy does.
    # Reference: central differences over the joint input.
    self.control_flow(1)
    x_val = _RNG.normal(size=(3, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      t = tf.compat.v1.placeholder(tf.float64, [None, 2])
      seq = tf.reshape(tf.concat([x, t], 1), [-1, 3, 2])
      cell = tf.compat.v1.nn.rnn_cell.GRUCell(
        4, kernel_initializer=tf.compat.v1.initializers.glorot_uniform(seed=1)
      )
      out, _ = tf.compat.v1.nn.dynamic_rnn(cell, seq, dtype=tf.float64)
      y = tf.reduce_sum(out[:, -1] ** 2, 1, keepdims=True)
      h = tf1hess.Derivatives(y, [x, t]).hessian()
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())

        def values(batch):
          return sess.run(y, {x: batch[:, :4], t: batch[:, 4:]})

        batch = np.concatenate([x_val, _RNG.normal(size=(3, 2))], 1)
        h_val = sess.run(h, {x: batch[:, :4], t: batch[:, 4:]})
        reference = finite_differences.finite_difference_hessians(values, batch)
    self.assertAllClose(h_val, reference, atol=1e-6, rtol=1e-6)

  def test_inputs_the_copy_cannot_stand_for_take_the_rows(self):
    # An input computed from another (the copy would hold it fixed), an op
    # whose gradient is overridden (a copy's gradient would read the
    # model), a random op (a copy would draw again): the rows over the
    # inputs, as `tf.gradients` takes them.
    @tf.custom_gradient
    def cube(v):
      return v**3, lambda dy: dy * 3 * v**2

    models = {
      "dependent": lambda x, t: (x, tf.sin(x[:, :1]) + t),
      "custom": lambda x, t: (cube(x), t),
      "random": lambda x, t: (tf.nn.dropout(x, rate=0.5, seed=1), t),
    }
    plan = tf1hess.Plan(method="auto")
    for name, model in models.items():
      with self.subTest(name), tf.Graph().as_default():
        x, t, _, feed = _graph()
        inputs = [x, t]
        a, b = model(x, t)
        if name == "dependent":
          inputs = [x, b]
        y = _model(a, b)
        self.assertIsNone(dispatch.joint_input([y], inputs, plan))
        if name == "random":
          continue
        h = tf1hess.Derivatives(y, inputs).hessian(component=0)
        _, hessians = _references(y, inputs)
        with tf.compat.v1.Session() as sess:
          h, reference = sess.run([h, hessians[0]], feed)
        self.assertAllClose(h, reference)

  def test_a_gradient_tape_sees_the_copy(self):
    # A loss of the joint Hessian (a residual of physics-informed training),
    # differentiated with respect to the weights by a GradientTape, as by
    # tf.gradients: the ops of the copy are recorded on the tape. (Tapes
    # cannot differentiate control flow v1.)
    with tf.Graph().as_default():
      x, t, _, feed = _graph()
      w1 = tf.Variable(_W1)
      b1 = tf.Variable(_RNG.normal(size=5))
      with tf.GradientTape() as tape:
        h = tf.tanh(tf.matmul(tf.concat([x, t], 1), w1) + b1)
        y = tf.matmul(h, tf.constant(_W2[:, :1]))
        d = tf1hess.Derivatives(y, [x, t], method="forward")
        loss = tf.reduce_sum(d.hessian() ** 2)
      self.assertIsNotNone(dispatch.joint_input([y], [x, t], tf1hess.Plan()))
      taped = tape.gradient(loss, [w1, b1])
      reference = tf.gradients(loss, [w1, b1])
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        taped, reference = sess.run([taped, reference], feed)
    for a, b in zip(taped, reference):
      self.assertAllClose(a, b)

  @parameterized.parameters(1, 2)
  def test_a_cond_in_the_model_and_the_callers_own_gradients(self, cf):
    # The copy of a control flow v2 cond has branch functions of its own:
    # the caller's later second derivatives of the model, which rewrite the
    # model's branches, failed on a duplicate function name.
    self.control_flow(cf)
    with tf.Graph().as_default():
      x, t, _, feed = _graph()
      tanh = tf.compat.v1.placeholder_with_default(True, [])
      y = tf.compat.v1.cond(
        tanh, lambda: _model(x, t)[:, :1], lambda: _model(tf.sin(x), t)[:, 1:]
      )
      h = tf1hess.Derivatives(y, [x, t]).hessian()
      (g,) = tf.gradients(y, x)  # Built after the copy.
      (g_xt,) = tf.gradients(g[:, 0], t)
      _, (hessians,) = _references(y, [x, t])
      with tf.compat.v1.Session() as sess:
        for value in (True, False):
          h_val, g_xt_val, reference = sess.run(
            [h, g_xt, hessians], {**feed, tanh: value}
          )
          self.assertAllClose(h_val, reference)
          self.assertAllClose(g_xt_val, reference[:, 0, 2:])


if __name__ == "__main__":
  tf.test.main()
