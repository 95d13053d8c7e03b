"""Independent references for the tests: analytic Hessians and friends.

Nothing here computes with tf1hess: these are the values tf1hess is compared
with (`tf1hess._compat` only finds the Keras 2 that tests build models with).
"""

import importlib.util
import itertools
import os
import re
import shutil
import socket
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from tf1hess import _compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diagonal_blocks(full):
  """Per-sample blocks of a `tf.hessians` result `(N, d..., N, d...)`."""
  full = np.asarray(full)
  n = full.shape[0]
  rank = full.ndim // 2
  blocks = [full[(i,) + (slice(None),) * (rank - 1) + (i,)] for i in range(n)]
  shape = full.shape[1:rank] + full.shape[rank + 1 :]
  return np.stack(blocks) if blocks else np.zeros((0,) + shape, full.dtype)


def mlp_weights(k, hidden=8, seed=0, dtype=np.float64):
  """Weights `(w1 (K, H), b1 (H,), w2 (H,))` of `y = w2 . tanh(x w1 + b1)`."""
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(k, hidden)).astype(dtype),
    rng.normal(size=(hidden,)).astype(dtype),
    rng.normal(size=(hidden,)).astype(dtype),
  )


def tanh_mlp(x, w1, b1, w2):
  """TF ops of `y = w2 . tanh(x w1 + b1)`, per sample `(N,)`."""
  dtype = x.dtype
  a = tf.matmul(x, tf.constant(w1, dtype)) + tf.constant(b1, dtype)
  return tf.reduce_sum(tf.tanh(a) * tf.constant(w2, dtype), axis=1)


# The error of `checking_mlp_graph_def` on a NaN in sample 9 (row 9 of
# `x.npy`), batches of 4.
NAN_IN_BATCH_2 = (
  r"^bad input : Tensor had NaN values \(batch 2: samples 8 to 11 of "
  r".*x\.npy\)\n"
)


def checking_mlp_graph_def(weights):
  """The `GraphDef` of `tanh_mlp` ("x:0" -> "y:0") of float32 inputs that
  `tf.debugging.check_numerics` checks first ("bad input")."""
  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(tf.float32, [None, len(weights[0])], name="x")
    checked = tf.debugging.check_numerics(x, "bad input")
    tf.identity(tanh_mlp(checked, *weights), name="y")
  return graph.as_graph_def()


def tanh_mlp_hessians(x, w1, b1, w2):
  """Analytic per-sample Hessians of `tanh_mlp`, float64 `(N, K, K)`.

  `d^2 y / dx dx^T = sum_h w2_h tanh''(a_h) w1[:, h] w1[:, h]^T` with
  `tanh'' = -2 t (1 - t^2)`.
  """
  x = np.asarray(x, np.float64)
  t = np.tanh(x @ w1 + b1)
  second = -2.0 * t * (1.0 - t**2) * w2  # (N, H)
  return np.einsum("nh,kh,lh->nkl", second, w1, w1)


def tanh_mlp_gradients(x, w1, b1, w2):
  """Analytic per-sample gradients of `tanh_mlp`, float64 `(N, K)`."""
  t = np.tanh(np.asarray(x, np.float64) @ w1 + b1)
  return ((1.0 - t**2) * w2) @ w1.T


def tape_hessians(fn, x):
  """Per-sample Hessians of `fn` at the eager `x` by nested tapes."""
  with tf.GradientTape() as outer:
    outer.watch(x)
    with tf.GradientTape() as inner:
      inner.watch(x)
      y = fn(x)
    g = inner.gradient(y, x)
  return outer.batch_jacobian(g, x)


def central_difference_jacobian(fn, x, eps=1e-5):
  """Per-sample Jacobian of `fn: (N, K) -> (N, M)` by float64 differences.

  Returns `(N, M, K)`; `fn` must treat samples independently.
  """
  x = np.asarray(x, np.float64)
  n, k = x.shape
  columns = []
  for j in range(k):
    step = np.zeros_like(x)
    step[:, j] = eps
    columns.append((fn(x + step) - fn(x - step)) / (2 * eps))
  return np.stack(columns, axis=-1).reshape(n, -1, k)


def scan_model(x):
  """A model with a loop: `tf.scan` of a tanh recurrence over the features."""
  states = tf.scan(
    lambda c, xt: tf.tanh(0.7 * c + xt),
    tf.transpose(x),
    initializer=tf.zeros_like(x[:, 0]),
  )
  return states[-1] ** 2


class ControlFlowMixin:
  """Runs a test body under control flow v1 or v2 (restored afterwards)."""

  def control_flow(self, version):
    if version == 1:
      tf.compat.v1.disable_control_flow_v2()
      self.addCleanup(tf.compat.v1.enable_control_flow_v2)
    else:
      tf.compat.v1.enable_control_flow_v2()


def in_turn(first=1, **axes):
  """The cases of `parameterized.product(**axes)`, each with a `cf` in turn.

  Control flow v1 and v2 alternate like the squares of a checkerboard whose
  rows are the values of the last axis: every case runs once, and each value
  of every axis runs under both versions where it has two or more cases.
  Tests whose subject does not depend on the version (models without
  control flow, the rows aside) run each case once instead of twice.

  Args:
    first: the version of the first case, 1 or 2.
    **axes: name -> list of values, as for `parameterized.product`.

  Returns:
    A list of keyword dicts for `parameterized.parameters`.
  """
  names, columns = list(axes), list(axes.values())
  width = len(columns[-1])
  cases = []
  for i, values in enumerate(itertools.product(*columns)):
    case = dict(zip(names, values))
    case["cf"] = 1 + (first - 1 + i % width + i // width) % 2
    cases.append(case)
  return cases


def check_list_of_xs(test, model, hessians_fn):
  """Checks `hessians_fn(y, [x1, x2])` against `tf.hessians` blocks.

  Args:
    test: the `tf.test.TestCase`.
    model: `(x1, x2) -> y`, per-sample outputs of a `(N, 2)` and a `(N, 3)`
      float64 input.
    hessians_fn: `(y, xs) -> list of Hessians`, the op under test.
  """
  with tf.Graph().as_default():
    x1 = tf.compat.v1.placeholder(tf.float64, [None, 2])
    x2 = tf.compat.v1.placeholder(tf.float64, [None, 3])
    y = model(x1, x2)
    hs = hessians_fn(y, [x1, x2])
    test.assertIsInstance(hs, list)
    refs = tf.hessians(y, [x1, x2])
    feed = {
      x1: np.random.default_rng(0).normal(size=(3, 2)),
      x2: np.random.default_rng(1).normal(size=(3, 3)),
    }
    with tf.compat.v1.Session() as sess:
      outs, ref_vals = sess.run([hs, refs], feed)
  for out, ref in zip(outs, ref_vals):
    test.assertAllClose(out, diagonal_blocks(ref))


def check_scan_model_hessians(test, hessians_fn):
  """Checks `hessians_fn(y, x)` of `scan_model` against differences.

  The reference is the float64 central-difference Jacobian of the
  `tf.gradients` of the model, in the same graph.
  """
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float64, [None, 3])
    y = scan_model(x)
    h = hessians_fn(y, x)
    (g,) = tf.gradients(y, x)
    x_val = np.random.default_rng(0).normal(size=(5, 3))
    with tf.compat.v1.Session() as sess:
      out = sess.run(h, {x: x_val})
      reference = central_difference_jacobian(
        lambda v: sess.run(g, {x: v}), x_val
      )
  test.assertAllClose(out, reference, atol=1e-6)


def load_example(name):
  """Imports `examples/<name>.py` (not a package) as a module."""
  path = os.path.join(ROOT, "examples", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# TensorFlow's C++ log lines: absl's format ("E0000 00:00:...", TF >= 2.17)
# and the older one ("2026-11-30 19:58:17.430792: E external/...", TF 2.12 to
# 2.16, printed at start-up whatever TF_CPP_MIN_LOG_LEVEL says).
_TF_LOG_LINE = re.compile(
  r"^([IWEF]\d{4} |WARNING: All|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] )"
)


def clean_stderr(text):
  """The lines of a program's stderr, without TensorFlow's C++ log lines."""
  return [
    line
    for line in text.splitlines()
    if line.strip() and not _TF_LOG_LINE.match(line)
  ]


def free_port():
  """A TCP port of 127.0.0.1 that nothing listens on (at the time)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TempDirTestCase(tf.test.TestCase):
  """A fresh temporary directory per test (`self.dir`), and its files."""

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def path(self, name):
    return os.path.join(self.dir, name)

  def files(self):
    return sorted(os.listdir(self.dir))


def interrupt_after(engine_class, calls):
  """Patches `engine_class.run` to raise KeyboardInterrupt on run `calls + 1`.

  As Ctrl-C would in the middle of a streaming run; pass
  `tf1hess.streaming.engine.Engine`.
  """
  original = engine_class.run
  count = [0]

  def run(engine, replica, batch):
    if count[0] == calls:
      raise KeyboardInterrupt
    count[0] += 1
    return original(engine, replica, batch)

  return mock.patch.object(engine_class, "run", run)


def legacy_keras(test):
  """Keras 2 (`tf.keras` or `tf_keras`, as `tf1hess` finds it), or skips
  `test` saying what is missing."""
  try:
    return _compat.legacy_keras()
  except ImportError as error:
    test.skipTest(str(error))


def unwritable_directory():
  """A directory no one, root included, can create a file in, or `None`.

  Permission bits do not stop root (these tests may run as root); /sys and
  /proc take no new files from anyone.
  """
  for directory in ("/sys", "/proc"):
    try:
      fd, probe = tempfile.mkstemp(dir=directory)
    except OSError:
      return directory
    os.close(fd)
    os.remove(probe)
  return None
