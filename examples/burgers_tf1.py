r"""Burgers' equation PINN in plain TF1 style: `x` and `t` placeholders.

  u_t + u u_x - nu u_xx = 0,  x in [-1, 1], t in [0, 1],
  u(0, x) = -sin(pi x),  u(t, -1) = u(t, 1) = 0,  nu = 0.01 / pi.

Space and time are separate `(None, 1)` placeholders, as in the classic TF1
PINN code. One `tf1hess.Derivatives(u, [x, t])` serves every derivative of
the residual over the joint input `(x, t)`: feature 0 is `x`, feature 1 is
`t`. Each entry is built when first asked for, from one row of the joint
Hessian (a backward pass through the gradient): the loss needs `u_xx`
only, the row of `x`, and a training step runs that row alone. `u_xt` (a
cross entry of the joint Hessian) and `u_tt`, fetched to be looked at,
share the row of `t`. A full `d.hessian()` asked first would serve them
all as slices, at the cost of the whole Hessian in every step (1.4x the
step time of this network at N = 4096, side by side in one process).

  python examples/burgers_tf1.py --steps=2000
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import tf1hess

NU = 0.01 / np.pi


def make_network(layers=(20, 20, 20), seed=0):
  """A tanh MLP `u(x, t)`: its variables, and a function applying it.

  Args:
    layers: widths of the hidden layers.
    seed: `int`, seed of the Glorot-normal weights.

  Returns:
    A callable `(x, t) -> u`, `(N, 1)` inputs to `(N, 1)`, that reuses the
    same variables at every call.
  """
  rng = np.random.default_rng(seed)
  sizes = [2, *layers, 1]
  weights = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    scale = np.sqrt(2.0 / (fan_in + fan_out))
    w = rng.normal(0, scale, (fan_in, fan_out)).astype(np.float32)
    weights.append(
      (tf.Variable(w, name="w"), tf.Variable(np.zeros(fan_out, np.float32)))
    )

  def apply(x, t):
    h = tf.concat([x, t], axis=1)
    for depth, (w, b) in enumerate(weights):
      h = tf.matmul(h, w) + b
      if depth < len(weights) - 1:
        h = tf.tanh(h)
    return h

  return apply


def build(seed=0, learning_rate=1e-3):
  """Builds the PINN in the current default graph.

  Args:
    seed: `int`, seed of the weights.
    learning_rate: `float`, Adam's.

  Returns:
    A dict of tensors: the placeholders `x`, `t` (collocation points), `x0`,
    `t0`, `u0` (initial and boundary data); `u`, `u_x`, `u_t`, `u_xx`,
    `u_xt`, `u_tt` and `residual` at the collocation points, all `(N, 1)`;
    `loss` and the `train_op`.
  """
  x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
  t = tf.compat.v1.placeholder(tf.float32, [None, 1], name="t")
  x0 = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x0")
  t0 = tf.compat.v1.placeholder(tf.float32, [None, 1], name="t0")
  u0 = tf.compat.v1.placeholder(tf.float32, [None, 1], name="u0")
  net = make_network(seed=seed)
  u = net(x, t)
  d = tf1hess.Derivatives(u, [x, t])  # joint features: 0 is x, 1 is t
  out = {
    "x": x,
    "t": t,
    "x0": x0,
    "t0": t0,
    "u0": u0,
    "u": u,
    "u_x": d.jacobian(0, 0),
    "u_t": d.jacobian(0, 1),
    "u_xx": d.hessian(0, 0),
    "u_xt": d.hessian(0, 1),
    "u_tt": d.hessian(1, 1),
  }
  out["residual"] = out["u_t"] + u * out["u_x"] - NU * out["u_xx"]
  out["loss"] = tf.reduce_mean(out["residual"] ** 2) + tf.reduce_mean(
    (net(x0, t0) - u0) ** 2
  )
  out["train_op"] = tf.compat.v1.train.AdamOptimizer(learning_rate).minimize(
    out["loss"]
  )
  return out


def training_points(num_collocation=2000, num_data=200, seed=0):
  """Random collocation points and initial/boundary data, `(n, 1)` each."""
  rng = np.random.default_rng(seed)
  col = {
    "x": rng.uniform(-1, 1, (num_collocation, 1)),
    "t": rng.uniform(0, 1, (num_collocation, 1)),
  }
  half = num_data // 2
  x_init = rng.uniform(-1, 1, (half, 1))
  t_bound = rng.uniform(0, 1, (num_data - half, 1))
  x_bound = rng.choice([-1.0, 1.0], (num_data - half, 1))
  data = {
    "x0": np.concatenate([x_init, x_bound]),
    "t0": np.concatenate([np.zeros_like(x_init), t_bound]),
    "u0": np.concatenate([-np.sin(np.pi * x_init), np.zeros_like(x_bound)]),
  }
  return {k: v.astype(np.float32) for k, v in {**col, **data}.items()}


def train(steps, seed=0):
  """Trains the PINN in its own graph; returns the losses, one per step."""
  with tf.Graph().as_default():
    model = build(seed)
    points = training_points(seed=seed)
    feed = {model[k]: v for k, v in points.items()}
    losses = []
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for _ in range(steps):
        loss, _ = sess.run([model["loss"], model["train_op"]], feed)
        losses.append(loss)
    return np.asarray(losses)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  tf.compat.v1.disable_eager_execution()
  losses = train(flags.FLAGS.steps, seed=flags.FLAGS.seed)
  for step in range(0, len(losses), max(1, len(losses) // 10)):
    print(f"step {step:5d}  loss {losses[step]:.4e}")
  if len(losses):
    print(f"final loss {losses[-1]:.4e}")


if __name__ == "__main__":
  # Defined here, not on import: tests import this module beside others.
  flags.DEFINE_integer("steps", 2000, "Adam steps.", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "Seed of the weights and points.")
  app.run(main)
