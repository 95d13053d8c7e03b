"""`tf1hess.Plan`: checked once, and taken by every entry point."""

import dataclasses

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess import _rows
from tf1hess import plan as plan_lib

_WEIGHTS = testing_utils.mlp_weights(4, hidden=3)
_X = np.random.default_rng(3).normal(size=(5, 4))
_EXPECTED = testing_utils.tanh_mlp_hessians(_X, *_WEIGHTS)

# Plans that each build the rows another way: the numbers must not change.
_PLANS = {
  "while_loop": tf1hess.Plan(method="while_loop", parallel_iterations=2),
  "pfor_chunks": tf1hess.Plan(method="pfor", chunk_size=3),
  "auto_vectorized": tf1hess.Plan(pfor_min_rows=1, eager_pfor_min_rows=1),
  "auto_looped": tf1hess.Plan(unroll_max_rows=1, max_reads=1),
  "auto_no_shortcut_matmul": tf1hess.Plan(max_factor_bytes=1),
  "forward": tf1hess.Plan(method="forward"),
}


def _mlp(x):
  return testing_utils.tanh_mlp(x, *_WEIGHTS)


class PlanTest(tf.test.TestCase, parameterized.TestCase):
  def test_defaults_are_the_documented_thresholds(self):
    plan = tf1hess.Plan()
    self.assertEqual(plan.method, "auto")
    self.assertIsNone(plan.chunk_size)
    self.assertEqual(plan.unroll_max_rows, plan_lib.UNROLL_MAX_ROWS)
    self.assertEqual(plan.max_factor_bytes, 1 << 28)
    self.assertEqual(plan.max_unrolled_ops, 1000)

  def test_only_auto_and_forward_may_take_the_engine(self):
    taken = {
      m: tf1hess.Plan(method=m).may_take_engine for m in plan_lib.METHODS
    }
    self.assertEqual(
      taken,
      {"auto": True, "forward": True, "pfor": False, "while_loop": False},
    )

  def test_is_frozen(self):
    with self.assertRaises(dataclasses.FrozenInstanceError):
      tf1hess.Plan().method = "pfor"

  def test_numpy_integers_are_ints(self):
    plan = tf1hess.Plan(chunk_size=np.int64(4), unroll_max_rows=np.int32(0))
    self.assertEqual(plan.record()["chunk_size"], 4)
    self.assertIs(type(plan.chunk_size), int)
    self.assertIs(type(plan.unroll_max_rows), int)
    with self.assertRaisesRegex(
      ValueError, r"`chunk_size` must be.*saw (np\.True_|True)\."
    ):
      tf1hess.Plan(chunk_size=np.True_)

  def test_replace_checks_again(self):
    self.assertEqual(tf1hess.Plan().replace(chunk_size=4).chunk_size, 4)
    with self.assertRaisesRegex(ValueError, "`chunk_size` must be"):
      tf1hess.Plan().replace(chunk_size=0)

  @parameterized.named_parameters(
    ("method", {"method": "fast"}, "`method` must be one of"),
    ("chunk", {"chunk_size": -1}, "`chunk_size` must be None or a positive"),
    (
      "parallel",
      {"parallel_iterations": 0},
      "`parallel_iterations` must be None or a positive int; saw 0",
    ),
    (
      "pfor_min_rows",
      {"pfor_min_rows": 2.5},
      "`pfor_min_rows` must be None or a positive int; saw 2.5",
    ),
    (
      "unroll",
      {"unroll_max_rows": None},
      "`unroll_max_rows` must be a non-negative int; saw None",
    ),
    (
      "unroll_negative",
      {"unroll_max_rows": -1},
      "`unroll_max_rows` must be a non-negative int; saw -1",
    ),
    ("reads", {"max_reads": True}, "`max_reads` must be a positive int"),
    (
      "unrolled_ops",
      {"max_unrolled_ops": 0},
      "`max_unrolled_ops` must be a positive int; saw 0",
    ),
  )
  def test_bad_field(self, kwargs, regex):
    with self.assertRaisesRegex(ValueError, regex):
      tf1hess.Plan(**kwargs)

  def test_make_from_arguments(self):
    plan = plan_lib.make(None, "pfor", 2, 3)
    self.assertEqual(plan, tf1hess.Plan("pfor", 2, 3))

  def test_make_keeps_a_plan(self):
    plan = tf1hess.Plan(method="while_loop")
    self.assertIs(plan_lib.make(plan), plan)

  @parameterized.named_parameters(
    ("method", {"method": "pfor"}, "`method`"),
    ("chunk", {"chunk_size": 2}, "`chunk_size`"),
    ("parallel", {"parallel_iterations": 2}, "`parallel_iterations`"),
  )
  def test_plan_and_an_argument_are_refused(self, kwargs, name):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      with self.assertRaisesRegex(
        ValueError, f"Pass either `plan` or {name}, not both"
      ):
        tf1hess.batch_hessians(_mlp(x), x, plan=tf1hess.Plan(), **kwargs)

  def test_plan_of_another_type_is_refused(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      with self.assertRaisesRegex(
        TypeError, "`plan` must be a tf1hess.Plan or None; saw dict"
      ):
        tf1hess.batch_hessians(_mlp(x), x, plan={"method": "pfor"})


class EntryPointsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """Each entry point takes `plan=`, and its numbers stay the analytic ones."""

  def _session_run(self, build, cf=2):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      out = build(x)
      with tf.compat.v1.Session() as sess:
        return sess.run(out, {x: _X})

  @parameterized.product(plan=list(_PLANS), cf=[1, 2])
  def test_graph_ops(self, plan, cf):
    p = _PLANS[plan]
    h, d, lap = self._session_run(
      lambda x: [
        tf1hess.batch_hessians(_mlp(x), x, plan=p),
        tf1hess.batch_hessian_diagonals(_mlp(x), x, plan=p),
        tf1hess.batch_laplacians(_mlp(x), x, plan=p),
      ],
      cf,
    )
    diagonals = np.diagonal(_EXPECTED, axis1=1, axis2=2)
    self.assertAllClose(h, _EXPECTED)
    self.assertAllClose(d, diagonals)
    self.assertAllClose(lap, diagonals.sum(1))

  @parameterized.named_parameters(*[(name, name) for name in _PLANS])
  def test_eager(self, plan):
    p = _PLANS[plan]
    x = tf.constant(_X)
    h = tf1hess.eager.batch_hessians(_mlp, x, plan=p)
    self.assertAllClose(h, _EXPECTED)
    out = tf1hess.eager.batch_output_hessians(_mlp, x, plan=p)
    self.assertAllClose(np.reshape(out, _EXPECTED.shape), _EXPECTED)

  @parameterized.named_parameters(
    ("while_loop", "while_loop"), ("pfor_chunks", "pfor_chunks")
  )
  def test_third_order_follows_the_plan(self, plan):
    d3, reference = self._session_run(
      lambda x: [
        tf1hess.batch_derivatives(tf.sin(x), x, 3, plan=_PLANS[plan]),
        tf1hess.batch_derivatives(tf.sin(x), x, 3, method="while_loop"),
      ]
    )
    expected = np.zeros((5, 4, 4, 4))
    for i in range(4):
      expected[:, i, i, i] = -np.cos(_X[:, i])
    self.assertAllClose(d3, expected)
    self.assertAllClose(d3, reference)

  def test_per_output_and_cache(self):
    p = _PLANS["pfor_chunks"]

    def build(x):
      two = tf.stack([_mlp(x), 2.0 * _mlp(x)], axis=1)
      cache = tf1hess.Derivatives(two, x, plan=p)
      return [
        tf1hess.batch_output_hessians(two, x, plan=p),
        tf1hess.batch_output_laplacians(two, x, plan=p),
        cache.hessian(component=1),
      ]

    h, lap, cached = self._session_run(build)
    self.assertAllClose(h[:, 0], _EXPECTED)
    self.assertAllClose(h[:, 1], 2 * _EXPECTED)
    self.assertAllClose(lap[:, 1], 2 * np.trace(_EXPECTED, axis1=1, axis2=2))
    self.assertAllClose(cached, 2 * _EXPECTED)

  def test_legacy_graph(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 4], name="x")
      tf.identity(_mlp(x), name="y")
    out = tf1hess.legacy.add_hessian_ops(
      graph, "x:0", "y:0", plan=_PLANS["while_loop"]
    )
    loops = [op for op in graph.get_operations() if "While" in op.type]
    self.assertNotEmpty(loops)
    with tf.compat.v1.Session(graph=graph) as sess:
      h = sess.run(out["hessians"], {x: _X})
    self.assertAllClose(h, _EXPECTED)


class ReferenceLoopTest(tf.test.TestCase):
  """`_rows.reference` alone: one backward pass per row, no graph read."""

  def test_reference_rows(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      (g,) = tf.gradients(_mlp(x), x)

      def vjp(targets, cotangents, source):
        self.assertIsNone(source)  # The reference never skips a layer.
        return tf.gradients(targets, x, grad_ys=cotangents)[0]

      plan = tf1hess.Plan()
      h = _rows.reference(vjp, g, 4, 4, plan)
      d = _rows.reference(vjp, g, 4, 4, plan, select_column=True)
      with tf.compat.v1.Session() as sess:
        h_val, d_val = sess.run([h, d], {x: _X})
    self.assertAllClose(h_val, _EXPECTED)
    self.assertAllClose(d_val, np.diagonal(_EXPECTED, axis1=1, axis2=2))


if __name__ == "__main__":
  tf.test.main()
