"""`tf1hess.dde`, the drop-in for DeepXDE's `dde.grad`.

The signature tests compare with nested `tf.gradients` and need no DeepXDE.
The DeepXDE tests (a real `dde.Model` trained with `dde.grad` and with the
drop-in, and the Poisson example) run `deepxde_checks.py` in a separate
process: importing DeepXDE with the `tensorflow.compat.v1` backend disables
TF2 behavior for the whole process.
"""

import gc
import importlib.util
import json
import os
import subprocess
import sys
import weakref

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf1hess
import tf1hess.dde as grad

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_RNG = np.random.default_rng(0)
_W1 = _RNG.normal(size=(3, 6))
_W2 = _RNG.normal(size=(6, 2))


def _net(x):
  w1, w2 = tf.constant(_W1, x.dtype), tf.constant(_W2, x.dtype)
  return tf.matmul(tf.tanh(tf.matmul(x, w1)), w2)


class SignatureTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    grad.clear()
    self.addCleanup(grad.clear)

  def _run(self, fetches, x, x_val):
    with tf.compat.v1.Session() as sess:
      return sess.run(fetches, {x: x_val})

  def test_entries_rows_and_columns_match_tf_gradients(self):
    x_val = _RNG.normal(size=(5, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = _net(x)
      ours = {
        "jac": [
          [grad.jacobian(y, x, i=i, j=j) for j in range(3)] for i in (0, 1)
        ],
        "rows": [grad.jacobian(y, x, i=i) for i in (0, 1)],
        "columns": [grad.jacobian(y, x, j=j) for j in range(3)],
        "hess": [
          [[grad.hessian(y, x, component=c, i=i, j=j) for j in range(3)]
           for i in range(3)]
          for c in (0, 1)
        ],
        "default": grad.hessian(y, x),
        "full": grad.hessian(y, x, component=1, i=None, j=None),
        "lap": [grad.laplacian(y, x, component=c) for c in (0, 1)],
      }  # fmt: skip
      grads = [tf.gradients(y[:, c], x)[0] for c in (0, 1)]
      hessians = [
        tf.stack([tf.gradients(g[:, i], x)[0] for i in range(3)], axis=1)
        for g in grads
      ]
      ours, grads, hessians = self._run([ours, grads, hessians], x, x_val)
    for c in (0, 1):
      self.assertAllClose(ours["rows"][c], grads[c])
      for i in range(3):
        self.assertAllClose(ours["jac"][c][i], grads[c][:, i : i + 1])
        self.assertAllClose(ours["columns"][i][:, c], grads[c][:, i])
        for j in range(3):
          self.assertEqual(ours["hess"][c][i][j].shape, (5, 1))
          self.assertAllClose(
            ours["hess"][c][i][j], hessians[c][:, i, j : j + 1]
          )
      self.assertAllClose(
        ours["lap"][c], np.trace(hessians[c], axis1=1, axis2=2)[:, None]
      )
    self.assertAllClose(ours["default"], hessians[0][:, 0, 0:1])
    self.assertAllClose(ours["full"], hessians[1])

  def test_one_feature_returns_the_row_for_any_j(self):
    # As DeepXDE: with dim_x = 1 the row is returned, (N, 1).
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 1])
      y = tf.concat([x**2, x**3], axis=1)
      self.assertIs(grad.jacobian(y, x, i=1, j=0), grad.jacobian(y, x, i=1))
      out = self._run(grad.jacobian(y, x, i=1, j=0), x, [[2.0]])
      single = grad.jacobian(x**2, x)  # one element: i = j = None is fine
      self.assertAllClose(out, [[12.0]])
      self.assertAllClose(self._run(single, x, [[3.0]]), [[6.0]])

  def test_cached_until_clear(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2])
      y = tf.reduce_sum(x**3, axis=1, keepdims=True)
      first = grad.hessian(y, x, i=0, j=1)
      self.assertIs(grad.hessian(y, x, i=0, j=1), first)
      self.assertIs(
        grad.jacobian(y, x, i=0, j=1), grad.jacobian(y, x, i=0, j=1)
      )
      grad.clear()
      self.assertIsNot(grad.hessian(y, x, i=0, j=1), first)

  def test_the_cache_goes_with_its_graph(self):
    # A sweep that builds one graph per model keeps none of them alive.
    graphs = []
    for _ in range(3):
      graph = tf.Graph()
      with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2])
        grad.laplacian(tf.reduce_sum(tf.sin(x), axis=1, keepdims=True), x)
      graphs.append(weakref.ref(graph))
      del graph, x
    gc.collect()
    self.assertEqual([g() for g in graphs], [None] * 3)

  def test_is_a_public_module(self):
    self.assertIs(tf1hess.dde, grad)

  @parameterized.named_parameters(
    ("component", dict(component=2), ValueError, r"`component` must be in"),
    ("component_type", dict(component=0.0), TypeError, "`component` must be"),
    ("i", dict(i=3), ValueError, r"`i` must be in \[0, 3\)"),
    ("j", dict(j=-1), ValueError, r"`j` must be in \[0, 3\)"),
  )
  def test_hessian_errors(self, kwargs, error, regex):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(error, regex):
        grad.hessian(_net(x), x, **kwargs)

  @parameterized.named_parameters(
    ("i", dict(i=2, j=0), r"`i` must be in \[0, 2\)"),
    ("j", dict(i=0, j=3), r"`j` must be in \[0, 3\)"),
    ("none", dict(), "`i` and `j` cannot both be None"),
  )
  def test_jacobian_errors(self, kwargs, regex):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(ValueError, regex):
        grad.jacobian(_net(x), x, **kwargs)

  def test_rank_one_ys(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      with self.assertRaisesRegex(ValueError, r"`ys` must have shape \(batch"):
        grad.hessian(tf.reduce_sum(x, 1), x)

  def test_ys_that_does_not_depend_on_xs(self):
    # A slice of the input is a new tensor that the network does not read:
    # dde.grad's derivatives are None there, and zeros would train a model
    # on a wrong residual.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = _net(x)
      for call in (
        lambda: grad.jacobian(y, x[:, 1:2], i=0),
        lambda: grad.hessian(y, x[:, 1:2]),
        lambda: grad.laplacian(tf.ones_like(x[:, :1]) * 2.0, x),
      ):
        with self.assertRaisesRegex(ValueError, r"`ys` \(.*\) does not depend"):
          call()
      # A linear network depends on `xs`: its second derivatives are zeros.
      linear = tf.matmul(x, tf.constant(_W1, tf.float64))
      self.assertAllEqual(
        self._run(grad.hessian(linear, x, i=0, j=1), x, np.ones((2, 3))),
        np.zeros((2, 1)),
      )
      self.assertAllEqual(
        self._run(grad.jacobian(x, x, i=1, j=1), x, np.ones((2, 3))),
        np.ones((2, 1)),
      )

  def test_not_a_tensor(self):
    with self.assertRaisesRegex(TypeError, "`xs` must be a tf.Tensor"):
      grad.hessian(tf.ones([2, 1]), np.ones((2, 1)))


class WithDeepXDETest(tf.test.TestCase):
  """A real `dde.Model` with `dde.grad` and with the drop-in: same losses."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = None
    if importlib.util.find_spec("deepxde") is None:
      return
    env = dict(
      os.environ,
      DDE_BACKEND="tensorflow.compat.v1",
      TF_CPP_MIN_LOG_LEVEL="2",
      PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
      [sys.executable, os.path.join(_HERE, "deepxde_checks.py")],
      capture_output=True,
      text=True,
      env=env,
      cwd=_ROOT,
      timeout=600,
      check=False,
    )
    cls.returncode, cls.stderr = result.returncode, result.stderr
    if result.returncode == 0:
      cls.results = json.loads(result.stdout.strip().splitlines()[-1])

  def setUp(self):
    super().setUp()
    if importlib.util.find_spec("deepxde") is None:
      self.skipTest("deepxde is not installed (pip install deepxde)")
    self.assertEqual(self.returncode, 0, self.stderr[-3000:])
    if "unavailable" in self.results:
      self.skipTest(
        f"deepxde cannot be imported: {self.results['unavailable']}"
      )

  def test_poisson_model_trains_alike(self):
    runs = self.results["poisson"]
    reference = np.asarray(runs["dde.grad"]["losses"])
    self.assertEqual(reference.shape, (4, 2))
    self.assertGreater(reference[0, 0], reference[-1, 0])  # it trains
    for name in ("tf.gradients", "tf1hess.dde entries"):
      self.assertAllClose(runs[name]["losses"], reference, rtol=1e-5)
    # The trace in another order of summation: the same up to rounding.
    self.assertAllClose(
      runs["tf1hess.dde laplacian"]["losses"], reference, rtol=1e-3
    )

  def test_two_output_system_trains_alike(self):
    runs = self.results["two_outputs"]
    reference = np.asarray(runs["dde.grad"])
    self.assertEqual(reference.shape, (4, 4))  # 2 residuals + 2 boundaries
    self.assertAllClose(runs["tf1hess.dde"], reference, rtol=1e-5)

  def test_two_output_entries_match(self):
    runs = self.results["two_outputs"]
    for theirs, ours in runs["shapes"]:
      self.assertEqual(theirs, ours)
    self.assertLess(runs["max_abs_diff"], 1e-5)

  def test_benchmark_checks_and_times_every_method(self):
    rows = self.results["benchmark"]["rows"]
    tensorflow_methods = {
      "dde.grad",
      "tf1hess.dde",
      "tf1hess.Derivatives",
      'Derivatives(method="auto")',
    }
    # JAX where the `bench` extra is installed.
    methods = tensorflow_methods | {"JAX"} & {row["method"] for row in rows}
    self.assertCountEqual(
      [(row["quantity"], row["method"]) for row in rows],
      [
        (quantity, method)
        for quantity in ("hessian", "laplacian", "training")
        for method in methods
      ],
    )
    for row in rows:
      self.assertEqual(row["d"], 3)
      self.assertLess(row["max_abs_diff"], 1e-4, row)
      self.assertGreater(row["ms"], 0.0)
      self.assertLessEqual(row["min_ms"], row["ms"])
    table = self.results["benchmark"]["table"].splitlines()
    self.assertLen(table, 5)  # header, rule, hessian, laplacian, training
    self.assertIn("| 3 | training |", table[-1])
    self.assertEqual(table[-1].count("n/a"), 0 if "JAX" in methods else 2)

  def test_same_exceptions_as_deepxde(self):
    for name, (theirs, ours) in self.results["errors"].items():
      self.assertEqual(theirs, ours, name)
      self.assertEqual(ours, "ValueError", name)


if __name__ == "__main__":
  tf.test.main()
