r"""Per-sample Hessians on a built-in example: the question tf1hess answers.

Builds a TF1 graph on a `(None, 3)` placeholder, asks for the per-sample
Hessians of `f(x) = sum(x * x)` (each is `2 I`) and of a small tanh network,
runs them for a random batch in a `tf.compat.v1.Session` and prints them
(or saves them with `--output`).

  python scripts/example.py --batch_size=4 --output=/tmp/hessians.npz
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's pooling CPU allocator; see docs/speed.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

import tf1hess
from tf1hess import _cli
from tf1hess import _files

_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 4, "Number of samples in the random batch.", lower_bound=0
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the batch and the weights.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "Optional .npz file for the inputs and the Hessians."
)


def build_and_run(batch_size, seed=0):
  """Builds the example graph and returns its inputs and Hessians.

  Args:
    batch_size: `int`: samples in the batch (any N works: the placeholder's
      batch dimension is `None`).
    seed: `int`: seed of the random batch and weights.

  Returns:
    A dict of numpy arrays: `x` `(N, 3)`, `square` `(N, 3, 3)` (the Hessians
    of `sum(x * x)`), `mlp` `(N, 3, 3)` (of a tanh network) and
    `mlp_reference` `(N, 3, 3)` (the same from `tf.hessians`' diagonal blocks
    for comparison).
  """
  rng = np.random.default_rng(seed)
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
    square = tf1hess.batch_hessians(tf.reduce_sum(x * x, axis=1), x)
    w1 = tf.constant(rng.normal(size=(3, 16)).astype(np.float32))
    w2 = tf.constant(rng.normal(size=(16, 1)).astype(np.float32))
    y = tf.matmul(tf.tanh(tf.matmul(x, w1)), w2)
    mlp = tf1hess.batch_hessians(y, x, check_independence=True)
    full = tf.hessians(y, x)[0]  # (N, 3, N, 3): what tf.hessians builds.
    inputs = rng.normal(size=(batch_size, 3)).astype(np.float32)
    with tf.compat.v1.Session(graph=graph) as sess:
      square_v, mlp_v = sess.run([square, mlp], {x: inputs})
      full_v = sess.run(full, {x: inputs}) if batch_size else None
  reference = (
    np.stack([full_v[i, :, i, :] for i in range(batch_size)])
    if batch_size
    else np.zeros_like(mlp_v)
  )
  return {
    "x": inputs,
    "square": square_v,
    "mlp": mlp_v,
    "mlp_reference": reference,
  }


def check_output(path):
  """Raises when `path` cannot be written: checked before any work.

  Args:
    path: `str`, the `--output` file.

  Raises:
    FileNotFoundError: when its directory does not exist.
    ValueError: when it is a directory.
  """
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"`output` must be in an existing directory; {directory!r} does not "
      "exist."
    )
  if os.path.isdir(path):
    raise ValueError(f"`output` must be a file path; {path!r} is a directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if _OUTPUT.value:
    with _cli.exit_on_error("example"):
      check_output(_OUTPUT.value)
  results = build_and_run(_BATCH_SIZE.value, _SEED.value)
  np.set_printoptions(precision=4, suppress=True)
  n = results["x"].shape[0]
  print(f"x: placeholder (None, 3), fed a batch of N = {n}")
  print("Per-sample Hessians of sum(x * x), shape", results["square"].shape)
  print(results["square"])
  print("Per-sample Hessians of a tanh network, shape", results["mlp"].shape)
  print(results["mlp"])
  err = float(
    np.max(np.abs(results["mlp"] - results["mlp_reference"]), initial=0.0)
  )
  print(
    f"max |tf1hess - diagonal blocks of tf.hessians (N, 3, N, 3)| = {err:.2e}"
  )
  if _OUTPUT.value:
    with _cli.exit_on_error("example"):
      with _files.atomic_output(_OUTPUT.value, suffix=".npz") as tmp:
        np.savez(tmp, **results)
    logging.info("Wrote %s", _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
