"""Checks that need DeepXDE, run in their own process by `dde_test.py`.

Importing DeepXDE with the `tensorflow.compat.v1` backend calls
`tf.compat.v1.disable_v2_behavior()`, which would change TensorFlow's state
for every other test of a shared process. `dde_test.py` runs this file with
`sys.executable` and reads the JSON it prints on its last line.
"""

import json
import importlib.util
import os
import sys

os.environ.setdefault("DDE_BACKEND", "tensorflow.compat.v1")
if importlib.util.find_spec("tf_keras"):  # Keras 2 for TF >= 2.16's v1 layers
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
  import deepxde as dde
except Exception as error:  # pylint: disable=broad-except
  # E.g. a DeepXDE whose backend needs a package this environment lacks.
  print(json.dumps({"unavailable": f"{type(error).__name__}: {error}"}))
  sys.exit(0)
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess.dde

_STEPS = 30


def _plain_poisson(poisson):
  """The Poisson residual of the example with plain `tf.gradients`."""

  def pde(x, y):
    (u_x,) = tf.gradients(y, x)
    u_xx = tf.gradients(u_x[:, 0], x)[0][:, 0:1]
    u_yy = tf.gradients(u_x[:, 1], x)[0][:, 1:2]
    return -u_xx - u_yy - poisson.source(x)

  return pde


def _dde_poisson(poisson):
  """The Poisson residual written with `dde.grad`."""

  def pde(x, y):
    u_xx = dde.grad.hessian(y, x, i=0, j=0)
    u_yy = dde.grad.hessian(y, x, i=1, j=1)
    return -u_xx - u_yy - poisson.source(x)

  return pde


def poisson():
  """Loss histories of the Poisson example with each way to differentiate."""
  module = testing_utils.load_example("poisson_deepxde")
  residuals = {
    "dde.grad": _dde_poisson(module),
    "tf.gradients": _plain_poisson(module),
    "tf1hess.dde entries": module.pde_by_entries,
    "tf1hess.dde laplacian": module.pde,
  }
  out = {}
  for name, residual in residuals.items():
    dde.grad.clear()
    losses, error = module.train(_STEPS, residual=residual, seed=1)
    out[name] = {"losses": losses.tolist(), "error": float(error)}
  return out


def _system(grad):
  """A two-output system `y = (u, v)` on the unit square.

  -(u_xx + u_yy) = v,  -(v_xx + v_yy) + u_x v_y = f, with the Hessian of
  each component, a mixed entry and Jacobian entries of both outputs.
  """

  def pde(x, y):
    lap_u = grad.hessian(y, x, component=0, i=0, j=0) + grad.hessian(
      y, x, component=0, i=1, j=1
    )
    lap_v = grad.hessian(y, x, component=1, i=0, j=0) + grad.hessian(
      y, x, component=1, i=1, j=1
    )
    u_x = grad.jacobian(y, x, i=0, j=0)
    v_y = grad.jacobian(y, x, i=1, j=1)
    v_xy = grad.hessian(y, x, component=1, i=0, j=1)
    f = tf.sin(np.pi * x[:, 0:1])
    return [-lap_u - y[:, 1:2], -lap_v + u_x * v_y + 0.1 * v_xy - f]

  return pde


def _train_system(grad, seed=2):
  with tf.Graph().as_default():
    dde.grad.clear()
    tf1hess.dde.clear()
    dde.config.set_random_seed(seed)
    geometry = dde.geometry.Rectangle([0, 0], [1, 1])
    boundary = [
      dde.icbc.DirichletBC(
        geometry, lambda x: 0, lambda _, on_b: on_b, component=c
      )
      for c in (0, 1)
    ]
    data = dde.data.PDE(
      geometry,
      _system(grad),
      boundary,
      num_domain=128,
      num_boundary=32,
      train_distribution="uniform",
    )
    net = dde.nn.FNN([2] + [24] * 2 + [2], "tanh", "Glorot uniform")
    model = dde.Model(data, net)
    model.compile("adam", lr=1e-3)
    history, _ = model.train(iterations=_STEPS, display_every=10)
    return np.asarray(history.loss_train).tolist()


def _entries(grad, y, x):
  """Every first and second derivative of a two-output `y`, `(N, 1)` each."""
  out = []
  for i in range(2):
    out.append(grad.jacobian(y, x, i=i))
    for j in range(3):
      out.append(grad.jacobian(y, x, i=i, j=j))
  for c in range(2):
    for i in range(3):
      for j in range(3):
        out.append(grad.hessian(y, x, component=c, i=i, j=j))
  return out


def two_outputs():
  """A two-output system: trained losses, and all entries on one graph."""
  out = {
    "dde.grad": _train_system(dde.grad),
    "tf1hess.dde": _train_system(tf1hess.dde),
  }
  with tf.Graph().as_default():
    tf.compat.v1.set_random_seed(3)
    net = dde.nn.FNN([3] + [16] * 2 + [2], "tanh", "Glorot uniform")
    net.build()
    x, y = net.inputs, net.outputs
    theirs = _entries(dde.grad, y, x)
    ours = _entries(tf1hess.dde, y, x)
    feed = {x: np.random.default_rng(4).normal(size=(7, 3)).astype(np.float32)}
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      theirs, ours = sess.run([theirs, ours], feed)
  out["shapes"] = [[list(a.shape), list(b.shape)] for a, b in zip(theirs, ours)]
  out["max_abs_diff"] = max(
    float(np.max(np.abs(a - b))) for a, b in zip(theirs, ours)
  )
  return out


def errors():
  """The messages of DeepXDE and of the drop-in for the same bad calls."""
  calls = {
    "component": lambda g, y, x: g.hessian(y, x, component=2),
    "i": lambda g, y, x: g.hessian(y, x, component=0, i=3),
    "jacobian_i": lambda g, y, x: g.jacobian(y, x, i=2, j=0),
  }
  out = {}
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 3])
    y = tf.concat([tf.reduce_sum(x**2, 1, keepdims=True)] * 2, 1)
    for name, call in calls.items():
      out[name] = []
      for grad in (dde.grad, tf1hess.dde):
        try:
          call(grad, y, x)
          out[name].append(None)
        except Exception as error:  # pylint: disable=broad-except
          out[name].append(type(error).__name__)
  return out


def benchmark():
  """`scripts/pinn_benchmark.py` on a tiny case: its rows and its table."""
  sys.path.insert(0, os.path.join(testing_utils.ROOT, "scripts"))
  import pinn_benchmark  # pylint: disable=g-import-not-at-top

  rows = pinn_benchmark.compare(d=3, batch_size=16, runs=2)
  return {"rows": rows, "table": pinn_benchmark.format_table(rows)}


CHECKS = {
  "poisson": poisson,
  "two_outputs": two_outputs,
  "errors": errors,
  "benchmark": benchmark,
}

if __name__ == "__main__":
  names = sys.argv[1:] or list(CHECKS)
  results = {name: CHECKS[name]() for name in names}
  print(json.dumps(results))
