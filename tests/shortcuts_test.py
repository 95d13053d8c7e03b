"""The linear shortcuts (`tf1hess._shortcuts`) find what they skip.

Their numbers are checked with every strategy in `strategies_test.py`; this
file checks what they match in TensorFlow's gradient graphs.
"""

import numpy as np
import tensorflow as tf

import testing_utils
from tf1hess import _shortcuts
from tf1hess import plan as plan_lib

_WEIGHTS = testing_utils.mlp_weights(5, hidden=3)
_A = np.random.default_rng(7).normal(size=(4, 4)).round(1)


def _quadratic(x):
  """Per-sample `x^T A x`; `x` is used twice."""
  return tf.reduce_sum(x * tf.matmul(x, tf.constant(_A, x.dtype)), axis=1)


def _mlp(x):
  return testing_utils.tanh_mlp(x, *_WEIGHTS)


class ShortcutsTest(tf.test.TestCase):
  """The linear shortcuts find the layers they are meant to skip."""

  def test_dense_layers_at_both_ends(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 5])
      (g,) = tf.gradients(_mlp(x), x)
      graph = _shortcuts.Graph(x)
      terms = _shortcuts.tail_terms(g, graph, plan_lib.MAX_TERMS)
      self.assertEqual([t.op.type for t, _ in terms], ["TanhGrad"])
      pre, w, transpose_b = _shortcuts.head(x, [t for t, _ in terms], graph)
      self.assertEqual(pre.op.type, "MatMul")
      self.assertEqual(w.shape.as_list(), [5, 3])
      self.assertFalse(transpose_b)

  def test_input_used_twice_has_no_head(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      (g,) = tf.gradients(_quadratic(x), x)
      graph = _shortcuts.Graph(x)
      terms = _shortcuts.tail_terms(g, graph, plan_lib.MAX_TERMS)
      self.assertLen(terms, 2)  # The two uses of x in x * (x A).
      self.assertIsNone(_shortcuts.head(x, [t for t, _ in terms], graph))

  def test_fill_values(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      n = tf.shape(x)[0]
      filled = {
        "fill": (tf.fill(tf.stack([n, 3]), 2.5), 2.5),
        "ones_like": (tf.ones_like(x), 1.0),
        "broadcast_reshape": (
          tf.broadcast_to(tf.reshape(tf.ones([n]), [-1, 1]), tf.shape(x)),
          1.0,
        ),
        "tiled_and_scaled": (
          tf.tile(tf.fill([1, 3], 3.0), tf.stack([n, 1])) / 4.0 * 2.0,
          1.5,
        ),
      }
      values = {k: _shortcuts.fill_value(t) for k, (t, _) in filled.items()}
      self.assertIsNone(_shortcuts.fill_value(x))
      self.assertIsNone(_shortcuts.fill_value(tf.random.normal([2, 3])))
      self.assertIsNone(_shortcuts.fill_value(tf.ones([2, 3]) * x))
      with tf.compat.v1.Session() as sess:
        got = sess.run(values, {x: np.zeros((2, 3))})
    for key, (_, expected) in filled.items():
      self.assertAllClose(got[key], expected, msg=key)

  def test_constant_hessian_ends_every_term_at_the_input(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      (g,) = tf.gradients(tf.reduce_mean(_quadratic(x)), x)
      terms = _shortcuts.tail_terms(g, _shortcuts.Graph(x), plan_lib.MAX_TERMS)
      self.assertLen(terms, 2)
      for t, _ in terms:
        self.assertIs(t, x)

  def test_elementwise_layers(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      pre = tf.matmul(x, tf.ones([4, 3]))
      act = tf.nn.softplus(pre) * tf.sigmoid(pre) + tf.tanh(pre) ** 2
      mixed = tf.tanh(pre) * tf.reduce_sum(pre, axis=1, keepdims=True)
      deeper = tf.tanh(tf.matmul(tf.tanh(pre), tf.ones([3, 3])))
      self.assertTrue(_shortcuts.elementwise(pre, [act]))
      self.assertTrue(_shortcuts.elementwise(pre, [tf.gradients(act, pre)[0]]))
      self.assertFalse(_shortcuts.elementwise(pre, [mixed]))
      self.assertFalse(_shortcuts.elementwise(pre, [deeper]))
      self.assertFalse(_shortcuts.elementwise(pre, [act[:, :2]]))

  def test_sum_over_a_broadcast_axis_is_not_skipped(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      y = tf.reduce_sum(x * x[:, :1], axis=1)
      (g,) = tf.gradients(y, x)
      terms = _shortcuts.tail_terms(g, _shortcuts.Graph(x), plan_lib.MAX_TERMS)
      # The gradient of x[:, :1] sums x over its 4 columns: not the input.
      self.assertNotEqual([t for t, _ in terms if t is not x], [])

  def test_weights_that_depend_on_the_input_are_not_skipped(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      y = tf.matmul(x, tf.transpose(x))  # (N, N): couples samples.
      graph = _shortcuts.Graph(x)
      self.assertIsNone(_shortcuts.head(x, [y], graph))
      terms = _shortcuts.tail_terms(y, graph, plan_lib.MAX_TERMS)
      self.assertEqual(terms, [(y, ())])


if __name__ == "__main__":
  tf.test.main()
