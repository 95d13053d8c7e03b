"""The examples under examples/ against plain `tf.gradients`.

The Burgers PINN runs here; the DeepXDE Poisson example runs in
`dde_test.py`, in a process of its own (importing DeepXDE changes
TensorFlow's global state).
"""

import numpy as np
import tensorflow as tf

import testing_utils


class BurgersTest(tf.test.TestCase):
  def test_derivatives_and_residual_match_tf_gradients(self):
    burgers = testing_utils.load_example("burgers_tf1")
    with tf.Graph().as_default():
      model = burgers.build(seed=3)
      x, t, u = model["x"], model["t"], model["u"]
      (u_x,) = tf.gradients(u, x)
      (u_t,) = tf.gradients(u, t)
      plain = {
        "u_x": u_x,
        "u_t": u_t,
        "u_xx": tf.gradients(u_x, x)[0],
        "u_xt": tf.gradients(u_x, t)[0],
        "u_tt": tf.gradients(u_t, t)[0],
      }
      plain["residual"] = u_t + u * u_x - burgers.NU * plain["u_xx"]
      ours = {name: model[name] for name in plain}
      for name, tensor in ours.items():
        self.assertEqual(tensor.shape.as_list(), [None, 1], name)
      points = burgers.training_points(num_collocation=64, seed=5)
      feed = {model[k]: v for k, v in points.items()}
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        ours, plain = sess.run([ours, plain], feed)
    for name in plain:
      self.assertAllClose(ours[name], plain[name], rtol=1e-5, atol=1e-6)
    self.assertGreater(np.abs(plain["u_xt"]).max(), 1e-3)

  def test_training_lowers_the_loss(self):
    losses = testing_utils.load_example("burgers_tf1").train(steps=20, seed=0)
    self.assertEqual(losses.shape, (20,))
    self.assertLess(losses[-1], losses[0])


if __name__ == "__main__":
  tf.test.main()
