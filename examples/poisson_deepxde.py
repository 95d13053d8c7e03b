r"""2-D Poisson problem with DeepXDE, its derivatives taken by `tf1hess.dde`.

  -(u_xx + u_yy) = 2 pi^2 sin(pi x) sin(pi y)  on [0, 1]^2,  u = 0 on the
  boundary; the solution is u = sin(pi x) sin(pi y).

The PDE residual is DeepXDE code with one import changed: `tf1hess.dde`
takes the arguments of `dde.grad` (`hessian(y, x, i=0, j=0)`, ...) and adds
`laplacian(y, x)`, the whole trace at once, `(N, 1)` like DeepXDE's entries.

  DDE_BACKEND=tensorflow.compat.v1 python examples/poisson_deepxde.py \
      --iterations=2000
"""

import importlib.util
import os

os.environ.setdefault("DDE_BACKEND", "tensorflow.compat.v1")
if importlib.util.find_spec("tf_keras"):  # Keras 2 for TF >= 2.16's v1 layers
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import deepxde as dde
import numpy as np
import tensorflow as tf

import tf1hess.dde as grad


def source(x):
  """`f(x, y) = 2 pi^2 sin(pi x) sin(pi y)`, `(N, 1)`."""
  return 2 * np.pi**2 * tf.sin(np.pi * x[:, 0:1]) * tf.sin(np.pi * x[:, 1:2])


def pde(x, y):
  """The residual `-(u_xx + u_yy) - f`, `(N, 1)`: `y` is `(N, 1)`."""
  return -grad.laplacian(y, x) - source(x)


def pde_by_entries(x, y):
  """The same residual from entries, exactly as DeepXDE code writes it."""
  u_xx = grad.hessian(y, x, i=0, j=0)
  u_yy = grad.hessian(y, x, i=1, j=1)
  return -u_xx - u_yy - source(x)


def solution(x):
  return np.sin(np.pi * x[:, 0:1]) * np.sin(np.pi * x[:, 1:2])


def build_model(residual=pde, seed=0, num_domain=256, num_boundary=64):
  """A compiled `dde.Model` of the problem, in the current default graph.

  Args:
    residual: `(x, y) -> (N, 1)`, the PDE residual.
    seed: `int`, seed of the weights (the points are a uniform grid).
    num_domain: `int`, points inside the square.
    num_boundary: `int`, points on its boundary.

  Returns:
    The compiled `dde.Model` (Adam, learning rate 1e-3).
  """
  dde.config.set_random_seed(seed)
  geometry = dde.geometry.Rectangle([0, 0], [1, 1])
  boundary = dde.icbc.DirichletBC(
    geometry, lambda x: 0, lambda _, on_boundary: on_boundary
  )
  data = dde.data.PDE(
    geometry,
    residual,
    boundary,
    num_domain=num_domain,
    num_boundary=num_boundary,
    solution=solution,
    num_test=256,
    train_distribution="uniform",
  )
  net = dde.nn.FNN([2] + [32] * 3 + [1], "tanh", "Glorot uniform")
  model = dde.Model(data, net)
  model.compile("adam", lr=1e-3, metrics=["l2 relative error"])
  return model


def train(iterations, residual=pde, seed=0):
  """Trains a fresh model in its own graph.

  Args:
    iterations: `int`, Adam steps.
    residual: the PDE residual (default `pde`).
    seed: `int`, seed of the weights.

  Returns:
    `(loss_history, l2_error)`: the training losses `(steps, 2)` (PDE and
    boundary) logged every 10 steps, and the final relative L2 error.
  """
  with tf.Graph().as_default():
    grad.clear()
    model = build_model(residual, seed)
    history, state = model.train(
      iterations=iterations, display_every=10, disregard_previous_best=True
    )
    x_test = state.X_test
    error = dde.metrics.l2_relative_error(
      solution(x_test), model.predict(x_test)
    )
    return np.asarray(history.loss_train), error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  losses, error = train(flags.FLAGS.iterations, seed=flags.FLAGS.seed)
  print(f"final losses {losses[-1]}, relative L2 error {error:.3e}")


if __name__ == "__main__":
  # Defined here, not on import: tests import this module beside others.
  flags.DEFINE_integer("iterations", 2000, "Adam steps.", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "Seed of the weights.")
  app.run(main)
