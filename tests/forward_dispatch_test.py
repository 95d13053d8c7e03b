"""The cost model of `method="auto"`: its decisions, and that they are free.

Decisions are checked on models whose estimated costs differ several times
over in each direction (the estimates, not timings: timings are printed by
tools/cost_model_measure.py); the numbers are checked not to depend on the
decision (auto, the row loop and the engine agree on the models of that
tool, which are in no benchmark); and under "auto" the engine's ops are
added to the graph only when the engine is taken.
"""

import contextlib
import os
import sys
from unittest import mock

from absl import flags
from absl import logging
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import testing_utils

import tf1hess
from tf1hess import _core
from tf1hess import finite_differences
from tf1hess import forward
from tf1hess.forward import chunks as forward_chunks
from tf1hess.forward import dispatch
from tf1hess.forward import engine
from tf1hess.forward import registry
from tf1hess.forward import structural

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools")
)
import cost_model_measure  # noqa: E402  pylint: disable=wrong-import-position

flags.FLAGS.mark_as_parsed()

_RNG = np.random.default_rng(5)


def _mlp(x, depth, units):
  h = x
  for _ in range(depth):
    w = _RNG.normal(size=(h.shape[1], units)) / np.sqrt(h.shape[1])
    h = tf.tanh(tf.matmul(h, tf.constant(w, x.dtype)))
  return tf.reduce_sum(h, axis=1)


# The features of a model whose choice depends on N (see `ByBatchSizeTest`).
_SWITCH_K = 128


def _switching_weights():
  """Weights of three tanh layers of 32 on `_SWITCH_K` features."""
  sizes = [_SWITCH_K, 32, 32, 32]
  return [
    _RNG.normal(size=(m, n)) / np.sqrt(m) for m, n in zip(sizes, sizes[1:])
  ]


def _switching_mlp(weights):
  """The model of `weights` as a function of `x`."""

  def fn(x):
    h = x
    for w in weights:
      h = tf.tanh(tf.matmul(h, w))
    return tf.reduce_sum(h, axis=1)

  return fn


def _mixture(x, centers=4):
  mu = tf.constant(_RNG.normal(size=(centers, x.shape[1])), x.dtype)
  d2 = tf.reduce_sum(tf.square(x[:, None, :] - mu), axis=2)
  return tf.reduce_logsumexp(-d2, axis=1)


def _quadratic(x):
  a = tf.constant(_RNG.normal(size=(x.shape[1], x.shape[1])), x.dtype)
  return tf.reduce_sum(x * tf.matmul(x, a), axis=1)


def _estimates(model, k, mode, n=None):
  """`(rows seconds, engine seconds, prefers_forward)` of `model`."""
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float64, [n, k])
    y = model(x)
    (g,) = tf.gradients(y, x)
    walked = dispatch.dry_run([y], x, mode)
    batch = n or dispatch.ASSUMED_BATCH
    rows = dispatch.seconds(dispatch.rows_work([y], x, g, mode), batch)
    return (
      rows,
      dispatch.seconds(walked.work, batch),
      dispatch.prefers_forward([y], x, g, mode, walked),
    )


def _engine_ops(graph):
  return [op for op in graph.get_operations() if "/forward/" in op.name]


class DecisionTest(parameterized.TestCase, tf.test.TestCase):
  @parameterized.named_parameters(
    # Terms 4 wide, diagonal Jacobians until the sum over features: the
    # engine's terms cost N K^2 4, the rows K passes over (N, 4, K).
    ("mixture_k128", _mixture, 128, forward.HESSIAN),
    # The diagonal: `N K M` per term, against the same K passes.
    ("mixture_k64_diagonal", _mixture, 64, forward.DIAGONAL),
  )
  def test_engine_when_much_cheaper(self, model, k, mode):
    rows, walk, chosen = _estimates(model, k, mode)
    self.assertGreater(rows, 2 * walk)
    self.assertTrue(chosen)

  @parameterized.named_parameters(
    # K much larger than the widths: every layer's term costs N K^2 4 in
    # the engine, while a row passes through layers of 4 units.
    ("deep_narrow", lambda x: _mlp(x, 6, 4), 128, forward.HESSIAN),
    # The rows need no backward pass: one Hessian for every sample.
    ("quadratic", _quadratic, 16, forward.HESSIAN),
    # One dense layer, then elementwise: all rows from one matmul.
    ("one_layer_diagonal", lambda x: _mlp(x, 1, 16), 8, forward.DIAGONAL),
  )
  def test_rows_when_much_cheaper(self, model, k, mode):
    rows, walk, chosen = _estimates(model, k, mode)
    self.assertGreater(walk, 1.5 * rows)
    self.assertFalse(chosen)

  def test_a_static_batch_is_used(self):
    # Shared Jacobians cost no N: at a tiny static batch the engine's fixed
    # work is larger against the rows' than at ASSUMED_BATCH.
    model = lambda x: _mlp(x, 3, 16)  # noqa: E731
    small = _estimates(model, 32, forward.HESSIAN, n=2)
    large = _estimates(model, 32, forward.HESSIAN)
    self.assertNotAlmostEqual(small[0] / small[1], large[0] / large[1])

  def test_unknown_features_keep_the_old_rule(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, None])
      y = tf.reduce_sum(tf.sin(x) * x, axis=1)
      (g,) = tf.gradients(y, x)
      for mode, engine_taken in (
        (forward.HESSIAN, False),
        (forward.DIAGONAL, True),
        (forward.LAPLACIAN, True),
      ):
        walked = dispatch.dry_run([y], x, mode)
        self.assertIsNone(walked.work.at(1))
        self.assertEqual(
          dispatch.prefers_forward([y], x, g, mode, walked), engine_taken
        )


class WorkTest(tf.test.TestCase):
  def test_matmul_of_a_dense_jacobian(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      w = tf.constant(np.ones((5, 7)), tf.float64)
      h = tf.tanh(tf.matmul(x, tf.constant(np.ones((3, 5)), tf.float64)))
      u = tf.matmul(h, w)
      self.assertEqual(engine.op_flops(u.op), 2 * 5 * 7)
      walked = engine.second_derivatives([tf.sin(u)], x, forward.LAPLACIAN)
      plain = engine.second_derivatives([h], x, forward.LAPLACIAN)
      # The second matmul: a dense (N, 3, 5) Jacobian by (5, 7) (whose
      # product the sine's term reads).
      extra = np.subtract(walked.work.flops, plain.work.flops)
      self.assertGreaterEqual(extra[1], 2 * 3 * 5 * 7)
      self.assertEqual(extra[0], 0)

  def test_views_cost_nothing(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      h = tf.tanh(tf.matmul(x, tf.constant(np.ones((6, 4)), tf.float64)))
      viewed = tf.reshape(tf.expand_dims(h, 2), [-1, 2, 2])
      self.assertEqual(engine.op_flops(viewed.op), 0)
      self.assertEqual(engine.pass_work([viewed.op]).entries, [0, 0])
      plain = engine.second_derivatives([h], x, forward.HESSIAN).work
      walked = engine.second_derivatives([viewed], x, forward.HESSIAN).work
      self.assertEqual(walked.entries, plain.entries)
      self.assertEqual(walked.flops, plain.flops)

  def test_convolution_and_its_gradient_cost_alike(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3])
      w = tf.constant(_RNG.normal(size=(3, 3, 3, 5)), tf.float32)
      y = tf.nn.conv2d(x, w, 1, "SAME")
      (g,) = tf.gradients(y, x)
      self.assertEqual(g.op.type, "Conv2DBackpropInput")
      # 8 x 8 x 5 outputs, each a sum of 3 x 3 x 3 products; 8 x 8 x 3
      # input gradients, each a sum of 3 x 3 x 5.
      expected = 2 * 8 * 8 * 5 * 27 * engine._CONV_FLOP_WEIGHT
      self.assertEqual(engine.op_flops(y.op), expected)
      self.assertEqual(engine.op_flops(g.op), expected)

  def test_the_rows_are_counted_on_the_gradient_graph(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      h = tf.matmul(x, tf.constant(_RNG.normal(size=(4, 6))))
      y = tf.reduce_sum(h * tf.sigmoid(h), axis=1)
      (g,) = tf.gradients(y, x)
      backward = engine.path_ops(x, [g])
      self.assertTrue(engine.pass_work(backward, guess=True).known)
      parts = dispatch.row_parts([y], x, g, forward.HESSIAN)
      self.assertEqual(parts["ops"], len(backward))
      self.assertGreater(parts["ops"], len(engine.path_ops(x, [y])))

  def test_time_major_tensors_count_their_entries_per_sample(self):
    # (T, N, F) holds T F entries of each sample, at any static N; where
    # the batch is not given (a weight matrix), the entries after the first
    # axis.
    self.assertEqual(engine.sample_size(tf.TensorShape([3, 8, 4]), 8), 12)
    self.assertEqual(engine.sample_size(tf.TensorShape([3, 8, 4]), None), 32)
    self.assertEqual(engine.sample_size(tf.TensorShape([8, 4]), 8), 4)
    parts = []
    for n in (8, 16):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, [n, 12])
        steps = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])
        h = tf.tanh(steps) * tf.matmul(
          steps, tf.constant(_RNG.normal(size=(4, 4)))
        )
        y = tf.reduce_sum(tf.sin(tf.transpose(h, [1, 0, 2])), [1, 2])
        (g,) = tf.gradients(y, x)
        parts.append(dispatch.row_parts([y], x, g, forward.HESSIAN))
    self.assertEqual(parts[0], parts[1])

  def test_unknown_sizes_are_guessed(self):
    # As TensorFlow's gradients of broadcasts (in some versions) sum over
    # axes known only at run time.
    with tf.Graph().as_default():
      t = tf.compat.v1.placeholder(tf.float64, [None, 6])
      axes = tf.compat.v1.placeholder(tf.int32, [None])
      total = tf.reduce_sum(t, axes, keepdims=True)
      self.assertEqual(total.shape.as_list(), [None, None])
      self.assertFalse(engine.pass_work([total.op]).known)
      guessed = engine.pass_work([total.op], guess=True)
      self.assertEqual(guessed.entries, [0, 12])

  def test_shared_jacobians_cost_no_batch(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = tf.matmul(x, tf.constant(np.ones((3, 5)), tf.float64))
      walked = engine.second_derivatives([y], x, forward.HESSIAN)
      self.assertFalse(walked.connected)
      # A shared (3, 5) Jacobian, each entry a sum of 3 products.
      self.assertEqual(walked.work.flops, [2 * 3 * 3 * 5, 0])

  def test_inputs_of_unknown_size_count_as_the_output(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      u = tf.compat.v1.placeholder(tf.float64, [None, None])
      v = tf.reshape(u, tf.shape(x))
      v.set_shape([None, None])
      y = tf.math.squared_difference(tf.sin(x), v)
      y.set_shape([None, 3])
      self.assertEqual(y.op.type, "SquaredDifference")
      work = engine.pass_work([y.op])
      self.assertTrue(work.known)
      # Both inputs and the output, 3 entries each.
      self.assertEqual(work.entries, [0, 9])

  def test_products_not_written_are_not_counted(self):
    # Squared distances of features to 16 centres: the (N, 4, 16, 8)
    # Jacobians of the broadcast difference and of its square stay
    # unwritten products (`Jacobian.parts`) that the sum reads; a matmul
    # of the differences reads the first one whole.
    k, centres, m = 4, 16, 8
    whole = k * centres * m

    def entries(inner_fn, drop):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, [None, k])
        h = tf.tanh(tf.matmul(x, tf.constant(_RNG.normal(size=(k, m)))))
        d = h[:, None, :] - tf.constant(_RNG.normal(size=(centres, m)))
        y = tf.reduce_sum(tf.exp(-tf.reduce_sum(inner_fn(d), -1)), -1)
        with mock.patch.object(
          engine.Work, "drop_unrun", drop or (lambda work, ran, new_ops: None)
        ):
          return engine.second_derivatives([y], x, forward.HESSIAN).work

    def square(d):
      return tf.square(d)

    def matmul(d):
      return tf.square(tf.matmul(d, tf.constant(_RNG.normal(size=(m, 2)))))

    drop = engine.Work.drop_unrun

    def without_parts(work, ran, new_ops):
      work.maybe_unrun = []
      drop(work, ran, new_ops)

    counted = entries(square, drop)
    self.assertEqual(counted.maybe_unrun, [])
    # Each value written once and read once; the parts read instead.
    everything = entries(square, without_parts).entries[1]
    self.assertLessEqual(counted.entries[1], everything - 3 * whole)
    read = entries(matmul, drop)
    self.assertEqual(read.entries, entries(matmul, without_parts).entries)

  def test_scales_not_written_are_not_counted(self):
    # `sin(tanh(x W))` by weights: the matmul reads the scales of the
    # (N, 4, 6) Jacobians of tanh and sine (`jacobians.scale_chain`), which
    # are then never written.
    k, h = 4, 6

    def work(drop, fold=True):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, [None, k])
        z = tf.matmul(x, tf.constant(_RNG.normal(size=(k, h))))
        u = tf.matmul(tf.sin(tf.tanh(z)), tf.constant(_RNG.normal(size=(h, 2))))
        y = tf.reduce_sum(tf.tanh(u), 1)
        with (
          mock.patch.object(
            engine.Work, "drop_unrun", drop or (lambda work, ran, new_ops: None)
          ),
          mock.patch.object(
            structural, "_MAX_FOLDED_ENTRIES", 1 << 22 if fold else 0
          ),
        ):
          return engine.second_derivatives([y], x, forward.HESSIAN).work

    drop = engine.Work.drop_unrun
    counted, unfolded = work(drop), work(drop, fold=False)
    self.assertEqual(counted.pushes, [])
    # Not folded, the matmul reads the sine's Jacobian, written once from
    # that of z (`jacobians.scale` of a chain: the tanh's is not written):
    # written and read once.
    self.assertEqual(counted.entries[1], unfolded.entries[1] - 2 * k * h)
    self.assertEqual(counted.flops[1], unfolded.flops[1] - k * h)
    # Counted where nothing is dropped (as are the Jacobians of tanh(u) and
    # y, which no term reads either).
    everything = work(None)
    self.assertGreaterEqual(
      everything.entries[1] - counted.entries[1], 3 * k * h
    )

  def test_unknown_entries(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      u = tf.compat.v1.placeholder(tf.float64, [None, None])
      y = tf.reduce_sum(tf.sin(x), 1, keepdims=True) * u
      walked = engine.second_derivatives([y], x, forward.HESSIAN)
      self.assertIsNone(walked.work.at(4))


def _classifier(x, bias=None):
  """Softmax cross-entropy of a 32-64-10 classifier: TensorFlow reshapes
  the logits `(None, 10)` to `(None, None)` when N is not static."""
  w1 = tf.constant(_RNG.normal(size=(x.shape[1], 64)) / 6.0, x.dtype)
  w2 = tf.constant(_RNG.normal(size=(64, 10)) / 8.0, x.dtype)
  h = tf.nn.elu(tf.matmul(x if bias is None else x + bias, w1))
  labels = tf.one_hot(tf.zeros(tf.shape(x)[:1], tf.int32) + 3, 10)
  return tf.nn.softmax_cross_entropy_with_logits(
    labels=tf.cast(labels, x.dtype), logits=tf.matmul(h, w2)
  )


class StaticBatchCopyTest(tf.test.TestCase):
  """Estimates from a copy with a static N where shapes are lost without."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = ("test_copy_keeps_the_zero_states_whose_shapes_are_read",)

  def test_softmax_cross_entropy_is_estimated_and_takes_the_engine(self):
    x_val = _RNG.normal(size=(6, 32))
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 32])
      y = _classifier(x)
      (g,) = tf.gradients(y, x)
      mode = forward.HESSIAN
      self.assertFalse(dispatch.rows_work([y], x, g, mode).known)
      rows = dispatch._rows_work_with_static_batch([y], x, mode, None)
      walked = dispatch.dry_run([y], x, mode)
      self.assertTrue(rows.known)
      self.assertTrue(walked.work.known)
      self.assertTrue(dispatch.choose([y], x, g, mode, walked).at(256))
      h = tf1hess.batch_hessians(y, x)
      self.assertNotEmpty(_engine_ops(graph))
      reference = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        h_val, reference_val = sess.run([h, reference], {x: x_val})
    self.assertAllClose(h_val, reference_val, atol=1e-10)

  def test_copy_keeps_the_zero_states_whose_shapes_are_read(self):
    # A function of the gradient of an unrolled recurrent layer: the second
    # gradient reads the shapes of steps computed from the zero initial
    # state, which the copy the estimates walk must keep (not make them
    # placeholders of unknown batch size, where the walk would decline).
    keras = testing_utils.legacy_keras(self)
    x_val = _RNG.normal(size=(3, 12))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      rnn = keras.layers.GRU(3, unroll=True, dtype="float64")
      energy = tf.reduce_sum(rnn(tf.reshape(x, [-1, 3, 4])), 1)
      y = tf.reduce_sum(tf.sin(tf.gradients(energy, x)[0]), 1)
      walked = dispatch.dry_run([y], x, forward.HESSIAN)
      self.assertTrue(walked.work.known)
      (g,) = tf.gradients(y, x)
      self.assertTrue(dispatch.choose([y], x, g, forward.HESSIAN, walked).at(3))
      outs = [
        tf1hess.batch_hessians(y, x, method=method)
        for method in ("auto", "while_loop")
      ]
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        auto, rows_val = sess.run(outs, {x: x_val})
    self.assertAllClose(auto, rows_val, atol=1e-10)

  def test_a_dynamic_batch_is_walked_once(self):
    # A time-major tensor `(T, None, F)` (`tf.scan` over steps) has no size
    # per sample where N is not static: the walk of a plain copy would
    # leave the estimates unknown. The dry run walks the copy with a static
    # N alone, or, where there is none (features not static), the plain
    # copy alone.
    def scan(x):
      steps = tf.transpose(tf.reshape(x, [-1, 4, 3]), [1, 0, 2])
      w = tf.constant(_RNG.normal(size=(3, 3)) / 2.0, x.dtype)
      states = tf.scan(
        lambda h, s: tf.tanh(tf.matmul(h + s, w)), steps, steps[0] * 0.0
      )
      return tf.reduce_sum(tf.sin(states), [0, 2])

    def elementwise(x):
      return tf.reduce_sum(tf.sin(x) * x, 1)

    for model, shape in ((scan, [None, 12]), (elementwise, [None, None])):
      with self.subTest(model.__name__), tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, shape)
        (y,) = dispatch.without_loops([model(x)], x, tf1hess.Plan())
        path_types = {op.type for op in engine.path_ops(x, [y])}
        self.assertNoCommonElements(path_types, {"While", "StatelessWhile"})
        with mock.patch.object(
          engine, "second_derivatives", wraps=engine.second_derivatives
        ) as walk:
          walked = dispatch.dry_run([y], x, forward.HESSIAN)
        self.assertEqual(walk.call_count, 1)
        x_walked = walk.call_args.args[1]
        self.assertIsNot(x_walked.graph, x.graph)
        static = shape[1] is not None
        self.assertEqual(
          x_walked.shape.as_list(),
          [dispatch.ASSUMED_BATCH, 12] if static else [None, None],
        )
        if static:
          self.assertTrue(walked.work.known)

  def test_a_walk_failing_with_a_static_batch_takes_the_plain_copy(self):
    real = engine.second_derivatives

    def walk(ys, x, mode):
      if tf.compat.dimension_value(x.shape[0]) is not None:
        raise ValueError("a rule's static shapes")
      return real(ys, x, mode)

    # Flags parsed by a test before this one set absl's logger to WARNING.
    self.addCleanup(logging.set_verbosity, logging.get_verbosity())
    logging.set_verbosity(logging.INFO)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = tf.reduce_sum(tf.sin(x) * x, 1)
      with (
        mock.patch.object(engine, "second_derivatives", side_effect=walk),
        self.assertLogs(level="INFO") as logs,
      ):
        walked = dispatch.dry_run([y], x, forward.HESSIAN)
      self.assertIsNotNone(walked)
      self.assertRegex("\n".join(logs.output), "no walk with a static batch")

  def test_another_static_batch_gives_no_copy(self):
    # A constant of 6 rows against x: no copy with N = ASSUMED_BATCH (the
    # shapes are static without: N is 6 from the constant on).
    x_val = _RNG.normal(size=(6, 32))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 32])
      y = _classifier(x, bias=tf.constant(x_val * 0.1))
      (g,) = tf.gradients(y, x)
      path = engine.path_ops(x, [y])
      self.assertIsNone(dispatch._static_batch_copy(x, [y], path))
      walked = dispatch.dry_run([y], x, forward.HESSIAN)
      self.assertTrue(walked.work.known)
      self.assertTrue(dispatch.rows_work([y], x, g, forward.HESSIAN).known)
      outs = [
        tf1hess.batch_hessians(y, x, method=m)
        for m in ("auto", "forward", "while_loop")
      ]
      with tf.compat.v1.Session() as sess:
        auto, engine_val, rows_val = sess.run(outs, {x: x_val})
    self.assertAllClose(auto, rows_val, atol=1e-10)
    self.assertAllClose(engine_val, rows_val, atol=1e-10)


# A constructor for every function of `engine._TRANSCENDENTAL` that the rows
# can differentiate twice (Softsign has no second derivative in TF).
_FUNCTIONS = {
  "Asinh": tf.asinh,
  "Atan": tf.atan,
  "Cos": tf.cos,
  "Cosh": tf.cosh,
  "Elu": tf.nn.elu,
  "Erf": tf.math.erf,
  "Erfc": tf.math.erfc,
  "Exp": tf.exp,
  "Expm1": tf.math.expm1,
  "Log": tf.math.log,
  "Log1p": tf.math.log1p,
  "Pow": lambda x: tf.pow(x, 1.5),
  "Rsqrt": tf.math.rsqrt,
  "Selu": tf.nn.selu,
  "Sigmoid": tf.sigmoid,
  "Sin": tf.sin,
  "Sinh": tf.sinh,
  "Softplus": tf.nn.softplus,
  "Sqrt": tf.sqrt,
  "Tan": tf.tan,
  "Tanh": tf.tanh,
}


class RowEvaluatesTest(parameterized.TestCase, tf.test.TestCase):
  """`dispatch.ROW_EVALUATES` against TensorFlow's gradient graphs."""

  @parameterized.named_parameters((name, name) for name in _FUNCTIONS)
  def test_functions_a_row_evaluates(self, op_type):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = _FUNCTIONS[op_type](x)
      self.assertEqual(y.op.type, op_type)
      (g,) = tf.gradients(tf.reduce_sum(y), x)
      before = set(graph.get_operations())
      tf.gradients(g * tf.ones_like(g), x)
      evaluated = sorted(
        op.type
        for op in graph.get_operations()
        if op not in before and op.type in engine._TRANSCENDENTAL
      )
    self.assertEqual(evaluated, sorted(dispatch.ROW_EVALUATES.get(op_type, ())))

  def test_functions_are_known(self):
    self.assertLessEqual(set(_FUNCTIONS), engine._TRANSCENDENTAL)
    for functions in dispatch.ROW_EVALUATES.values():
      self.assertLessEqual(set(functions), engine._TRANSCENDENTAL)

  def test_the_rows_count_them_once_per_row(self):
    units = 7
    again = {}
    for name, fn in (("tanh", tf.tanh), ("sin", tf.sin), ("pow", tf.sqrt)):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, [None, 4])
        h = tf.matmul(x, tf.constant(_RNG.normal(size=(4, units))))
        if name == "pow":
          h = tf.pow(tf.square(h) + 1.0, 1.5)
        y = tf.reduce_sum(fn(h), axis=1)
        (g,) = tf.gradients(y, x)
        again[name] = dispatch.row_parts([y], x, g, forward.HESSIAN)["again"]
    self.assertEqual(again["tanh"], 0)
    # The sine's own entries and its extra cost, once per row.
    self.assertEqual(again["sin"], units * (1 + engine.extra_entries("Sin")))
    self.assertEqual(
      again["pow"],
      units * (2 + engine.extra_entries("Pow") + engine.extra_entries("Log")),
    )

  def test_a_function_of_unknown_rank(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      shape = tf.compat.v1.placeholder_with_default([-1, 2, 2], [None])
      h = tf.sin(tf.reshape(x, shape))
      self.assertIsNone(h.shape.rank)
      y = tf.reduce_sum(tf.reshape(h, [-1, 4]), axis=1)
      (g,) = tf.gradients(y, x)
      parts = dispatch.row_parts([y], x, g, forward.HESSIAN)
      self.assertEqual(parts["again"], 0)


class RowsCannotDifferentiateTest(parameterized.TestCase, tf.test.TestCase):
  """TensorFlow has no gradient of `SoftsignGrad`: only the engine works."""

  @parameterized.named_parameters(
    ("hessian", tf1hess.batch_hessians, 4),
    ("hessian_wide", tf1hess.batch_hessians, 40),
    ("diagonal", tf1hess.batch_hessian_diagonals, 4),
    ("laplacian", tf1hess.batch_laplacians, 4),
  )
  def test_auto_takes_the_engine(self, op, k):
    x_val = _RNG.normal(size=(3, k))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, k])
      h = x
      for units in (16, 8):
        w = _RNG.normal(size=(h.shape[1], units)) / np.sqrt(h.shape[1])
        h = tf.nn.softsign(tf.matmul(h, tf.constant(w)))
      y = tf.reduce_sum(h, axis=1)
      (g,) = tf.gradients(y, x)
      self.assertFalse(dispatch.rows_can_differentiate(x, g))
      auto = op(y, x)
      with self.assertRaises(LookupError):
        op(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        value = sess.run(auto, {x: x_val})
        hessians = finite_differences.finite_difference_hessians(
          lambda batch: sess.run(y, {x: batch}), x_val
        )
    expected = {
      tf1hess.batch_hessians: hessians,
      tf1hess.batch_hessian_diagonals: np.diagonal(hessians, axis1=1, axis2=2),
      tf1hess.batch_laplacians: np.trace(hessians, axis1=1, axis2=2),
    }[op]
    self.assertAllClose(value, expected, atol=1e-7)


class NeitherTest(tf.test.TestCase):
  """Neither the rows nor the engine can build the second derivatives."""

  def test_dilation_raises_naming_the_op(self):
    # TensorFlow has no gradient of Dilation2DBackpropInput; the engine no
    # rule for Dilation2D (a morphological dilation).
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 12])
      images = tf.reshape(tf.tanh(x), [-1, 2, 3, 2])
      dilated = tf.nn.dilation2d(
        images, tf.ones([2, 2, 2]), [1, 1, 1, 1], "SAME", "NHWC", [1, 1, 1, 1]
      )
      y = tf.reduce_sum(tf.sin(dilated), axis=[1, 2, 3])
      with self.assertLogs(level="WARNING"):
        with self.assertRaisesRegex(
          LookupError,
          r"no gradient of Dilation2DBackpropInput \(.*\), which the row "
          "loop differentiates, and the forward engine cannot follow",
        ):
          tf1hess.batch_hessians(y, x)
      with self.assertRaisesRegex(LookupError, "method='auto' takes"):
        tf1hess.batch_laplacians(y, x, method="while_loop")


def _layer_norm(h, axes, keepdims=True):
  """`(h - mean) / sqrt(variance + 1e-3)` of `tf.nn.moments` over `axes`."""
  mean, variance = tf.nn.moments(h, axes, keepdims=keepdims)
  if not keepdims:
    mean, variance = mean[:, None], variance[:, None]
  return (h - mean) * tf.math.rsqrt(variance + 1e-3)


# Models that normalize with `tf.nn.moments`: `(None, 12)` -> `(None,)`.
_MOMENTS = {
  "layer_norm": lambda x: tf.reduce_sum(
    tf.sin(_layer_norm(tf.tanh(x), [1])), 1
  ),
  "not_kept_dims": lambda x: tf.reduce_sum(
    tf.cos(_layer_norm(x * x, [1], keepdims=False)), 1
  ),
  # Instance normalization of an image, over its two spatial axes.
  "instance_norm": lambda x: tf.reduce_sum(
    tf.tanh(_layer_norm(tf.reshape(tf.sin(x), [-1, 2, 3, 2]), [1, 2])),
    [1, 2, 3],
  ),
  # The variance alone, as a feature.
  "variance": lambda x: tf.sqrt(tf.nn.moments(tf.sin(x), [1])[1] + 0.1),
}


# Builders of the methods `_hessians_of` runs: auto with the rows' margin
# patched would take the rows on cost alone.
def _auto_over_rows(y, x):
  with mock.patch.object(dispatch, "_ROWS_MARGIN", 1e9):
    return tf1hess.batch_hessians(y, x)


_METHODS = {
  "forward": lambda y, x: tf1hess.batch_hessians(y, x, method="forward"),
  "auto": _auto_over_rows,
  "rows": lambda y, x: tf1hess.batch_hessians(y, x, method="while_loop"),
  "laplacian": tf1hess.batch_laplacians,
}


def _hessians_of(model, x_val, methods):
  """Runs `methods` (names of `_METHODS`, built in that order) on the
  float64 `model` of `x_val`; returns their values and float64 second
  differences of `model`'s values."""
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float64, [None, x_val.shape[1]])
    y = model(x)
    outs = {name: _METHODS[name](y, x) for name in methods}
    with tf.compat.v1.Session() as sess:
      got = sess.run(outs, {x: x_val})
      hessians = finite_differences.finite_difference_hessians(
        lambda batch: sess.run(y, {x: batch}), x_val
      )
  return got, hessians


# Layers `(N, 16) -> (N, ...)` where TensorFlow's second derivatives are
# wrong (max pools that keep their shape, bilinear resizes, a Euclidean norm
# with an unused entry: NaN) or cannot be built (SoftsignGrad has no
# gradient), with the differences' step and the tolerance where another.
_TENSORFLOW_FAILS = (
  (
    "max_pool",
    lambda h: tf.nn.max_pool2d(tf.reshape(h, [-1, 4, 4, 1]), 3, 1, "SAME"),
  ),
  # A bilinear resize computes in float32: larger steps and tolerance.
  (
    "resize",
    lambda h: tf.image.resize(tf.reshape(h, [-1, 4, 4, 1]), [5, 3]),
    1e-3,
    2e-3,
  ),
  (
    "unused_norm",
    lambda h: tf.math.reduce_euclidean_norm(tf.reshape(h, [-1, 2, 8]), 2)[
      :, :1
    ],
  ),
  ("softsign", tf.nn.softsign),
)
_FAILING_WEIGHTS = np.random.default_rng(6).normal(size=(6, 16)) / 2


def _failing_model(layer):
  """A float64 function `(N, 6) -> (N,)` of `x` through `layer`."""

  def model(x):
    h = tf.tanh(tf.matmul(x, tf.constant(_FAILING_WEIGHTS)))
    out = tf.cast(layer(h), tf.float64)
    return tf.reduce_sum(tf.sin(tf.reshape(out, [tf.shape(x)[0], -1])), 1)

  return model


def _differences(gradient, x_val, v_val, eps):
  """Central differences of `gradient` (numpy to numpy) along `v_val`."""
  return (gradient(x_val + eps * v_val) - gradient(x_val - eps * v_val)) / (
    2 * eps
  )


@contextlib.contextmanager
def _walks(test):
  """Asserts that `tf1hess.eager` takes the graph walk in the block."""
  walk = tf1hess.eager._graph_walk  # pylint: disable=protected-access
  with mock.patch.object(tf1hess.eager, "_graph_walk", wraps=walk) as walked:
    yield
  test.assertTrue(walked.called)


class RowsInexactTest(
  testing_utils.ControlFlowMixin, parameterized.TestCase, tf.test.TestCase
):
  """TensorFlow's second derivative of some max pools (and of resizes and
  norms) is wrong."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_eager_derivatives_of_moments_in_functions_of_a_batch0",
    "test_eager_derivatives_of_moments_in_functions_of_a_batch1",
    "test_eager_derivatives_of_moments_in_functions_of_a_batch2",
    "test_eager_derivatives_of_moments_instance_norm",
    "test_eager_derivatives_of_moments_not_kept_dims",
    "test_eager_derivatives_of_moments_run_the_function_once0",
    "test_eager_derivatives_of_moments_run_the_function_once1",
    "test_eager_derivatives_of_moments_run_the_function_once2",
    "test_eager_derivatives_of_moments_variance",
    "test_eager_derivatives_where_tensorflow_fails_max_pool",
    "test_eager_rows_warn_where_tensorflow_fails",
    "test_forces_of_deep_moments_take_one_backward_pass",
    "test_functions_of_gradients_of_moments_instance_norm",
    "test_functions_of_gradients_of_moments_layer_norm",
    "test_functions_of_gradients_of_moments_not_kept_dims",
    "test_functions_of_gradients_of_moments_variance",
    "test_gradients_of_max_pools_same_stride_1",
    "test_gradients_of_max_pools_valid_stride_2",
    "test_hessian_vector_products_of_moments_instance_norm",
    "test_hessian_vector_products_of_moments_layer_norm",
    "test_hessian_vector_products_of_moments_not_kept_dims",
    "test_independence_checked_where_tensorflow_fails_unused_norm",
    "test_independence_of_coupled_samples_through_a_max_pool",
    "test_keras_layer_normalization_in_float64",
    "test_moments_take_the_engine_layer_norm",
    "test_moments_take_the_engine_not_kept_dims",
    "test_moments_take_the_engine_variance",
    "test_per_output_ops_and_derivatives_of_moments",
    "test_rows_say_whether_the_engine_follows_the_moments",
    "test_rows_take_the_curvature_of_moments_the_engine_cannot_follow",
    "test_weight_gradients_of_moments0",
    "test_weight_gradients_of_moments2",
    "test_weight_gradients_of_moments3",
    "test_weight_gradients_of_moments4",
    "test_weight_gradients_of_moments5",
    "test_weight_gradients_of_moments6",
    "test_weight_gradients_of_moments7",
  )

  @parameterized.named_parameters(
    ("same_stride_1", 2, 1, "SAME"),
    ("one_by_one", 1, 1, "VALID"),
  )
  def test_auto_takes_the_engine(self, size, stride, padding):
    def model(x):
      h = tf.sin(1.3 * tf.reshape(x, [-1, 3, 4, 1]))
      pooled = tf.nn.max_pool2d(h, size, stride, padding)
      y = tf.reduce_sum(tf.square(pooled) * tf.cos(pooled), axis=[1, 2, 3])
      (g,) = tf.gradients(y, x)
      self.assertFalse(dispatch.rows_are_exact([y], x, g))
      return y

    # Inputs of the test's own, whatever ran before it: finite differences
    # must not straddle a tie of two maxima of a pool.
    x_val = np.random.default_rng(11).normal(size=(3, 12))
    got, hessians = _hessians_of(model, x_val, ["auto"])
    self.assertAllClose(got["auto"], hessians, atol=1e-6)

  @parameterized.named_parameters(
    ("same_stride_1", 2, 1, "SAME"),
    ("one_by_one", 1, 1, "VALID"),
    ("valid_stride_2", 2, 2, "VALID"),
  )
  def test_gradients_of_max_pools(self, size, stride, padding):
    # A max pool's gradient inside `ys`: TensorFlow's gradient of it
    # (MaxPoolGradGrad) is wrong for some pools, in the rows and in the
    # finite differences of `tf.gradients`; the engine's adjoint pass takes
    # its own (`conv._max_pool_grad_adjoint`).
    def model(x):
      h = tf.sin(1.3 * tf.reshape(x, [-1, 3, 4, 1]))
      pooled = tf.nn.max_pool2d(h, size, stride, padding)
      energy = tf.reduce_sum(tf.square(pooled) * tf.cos(pooled), [1, 2, 3])
      (forces,) = tf.gradients(energy, x)
      y = tf.reduce_sum(tf.sin(forces), 1)
      self.assertIn("MaxPoolGrad", {op.type for op in y.graph.get_operations()})
      return y

    x_val = np.random.default_rng(12).normal(size=(3, 12))
    got, hessians = _hessians_of(model, x_val, ["forward", "auto", "rows"])
    self.assertAllClose(got["forward"], hessians, atol=1e-6)
    self.assertAllClose(got["auto"], hessians, atol=1e-6)
    error = np.abs(got["rows"] - hessians).max() / np.abs(hessians).max()
    if stride == 1:
      self.assertGreater(error, 0.1)

  @parameterized.parameters(
    (2, 1, "SAME", False),
    (1, 1, "VALID", False),
    ([1, 2], 1, "SAME", False),
    (2, 2, "VALID", True),
    (2, 2, "SAME", True),
    (3, 1, "VALID", True),
    (3, [1, 2], "SAME", True),
    (1, 2, "VALID", True),
  )
  def test_which_max_pools_the_rows_take_exactly(
    self, size, stride, padding, exact
  ):
    # TensorFlow's MaxPoolGradGrad is wrong where the pool's output has
    # the shape of its input, right elsewhere: its Hessian-vector products
    # against the engine's Hessians (themselves checked against finite
    # differences by test_auto_takes_the_engine).
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 16])
      v = tf.constant(np.random.default_rng(3).normal(size=(3, 16)))
      h = tf.sin(1.3 * tf.reshape(x, [-1, 4, 4, 1]))
      y = tf.reduce_sum(
        tf.square(tf.nn.max_pool2d(h, size, stride, padding)), [1, 2, 3]
      )
      (g,) = tf.gradients(y, x)
      self.assertEqual(dispatch.rows_are_exact([y], x, g), exact)
      (tensorflow,) = tf.gradients(g, x, grad_ys=v)
      engine_products = tf.einsum(
        "nab,nb->na", tf1hess.batch_hessians(y, x, method="forward"), v
      )
      with tf.compat.v1.Session() as sess:
        x_val = np.random.default_rng(4).normal(size=(3, 16))
        tensorflow, engine_products = sess.run(
          [tensorflow, engine_products], {x: x_val}
        )
    error = np.abs(tensorflow - engine_products).max()
    if exact:
      self.assertLess(error, 1e-9)
    else:
      self.assertGreater(error, 0.1 * np.abs(engine_products).max())

  @parameterized.named_parameters(*_TENSORFLOW_FAILS)
  def test_hessian_vector_products_where_tensorflow_fails(
    self, layer, eps=1e-6, tolerance=1e-6
  ):
    # TensorFlow's backward pass through the gradient is wrong or cannot be
    # built: the products are the engine's Hessians times `v`. Reference:
    # central differences of TensorFlow's gradients (right to first order)
    # along `v`.
    x_val, v_val = _RNG.normal(size=(3, 6)), _RNG.normal(size=(3, 6))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      v = tf.compat.v1.placeholder(tf.float64, [None, 6])
      y = _failing_model(layer)(x)
      products = tf1hess.batch_hessian_vector_products(y, x, v)
      (g,) = tf.gradients(y, x)
      with tf.compat.v1.Session() as sess:
        got = sess.run(products, {x: x_val, v: v_val})
        differences = _differences(
          lambda b: sess.run(g, {x: b}), x_val, v_val, eps
        )
    self.assertAllClose(got, differences, atol=tolerance, rtol=tolerance)

  @parameterized.named_parameters(*_TENSORFLOW_FAILS)
  def test_independence_checked_where_tensorflow_fails(self, layer, *_):
    # TensorFlow's full product, which the run-time check compares with, is
    # wrong or missing there: the engine's walk checks the samples instead,
    # without a false alarm.
    x_val = _RNG.normal(size=(3, 6))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      y = _failing_model(layer)(x)
      checked = tf1hess.batch_hessians(y, x, check_independence=True)
      forward = tf1hess.batch_hessians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        checked, forward = sess.run([checked, forward], {x: x_val})
    self.assertAllClose(checked, forward)

  def test_independence_of_coupled_samples_through_a_max_pool(self):
    # Centered over the batch before a max pool that keeps its shape: the
    # walk declines, and the rows' check (TensorFlow's products on both
    # sides) catches the coupling.
    layer = _TENSORFLOW_FAILS[0][1]
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      centered = x - tf.reduce_mean(x, 0, keepdims=True)
      coupled = tf1hess.batch_hessians(
        _failing_model(layer)(centered), x, check_independence=True
      )
      with tf.compat.v1.Session() as sess:
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, "not independent"
        ):
          sess.run(coupled, {x: _RNG.normal(size=(3, 6))})

  def test_eager_rows_warn_where_tensorflow_fails(self):
    # The tapes of another method take TensorFlow's wrong second
    # derivatives, executing eagerly and inside a tf.function: with a
    # warning.
    fn = _failing_model(_TENSORFLOW_FAILS[1][1])  # A bilinear resize.
    x = tf.constant(_RNG.normal(size=(3, 6)))
    traced = tf.function(
      lambda v: tf1hess.eager.batch_hessians(fn, v, method="pfor")
    )
    for build in (
      lambda: tf1hess.eager.batch_hessians(fn, x, method="while_loop"),
      lambda: traced(x),
    ):
      with mock.patch.object(tf1hess._core, "_WARNED_EAGERLY", set()):  # pylint: disable=protected-access
        with self.assertLogs(level="WARNING") as logs:
          build()
      self.assertIn(
        "second derivatives of the function are wrong", "\n".join(logs.output)
      )

  @parameterized.named_parameters(*_TENSORFLOW_FAILS)
  def test_eager_derivatives_where_tensorflow_fails(
    self, layer, eps=1e-6, tolerance=1e-6
  ):
    # Executing eagerly, auto's Hessians and the products are the engine's
    # where the tapes' are wrong or cannot be built (`eager._tapes_fail`).
    # Reference: central differences of a tape's gradients.
    fn = _failing_model(layer)

    def gradient(batch):
      batch = tf.constant(batch)
      with tf.GradientTape() as tape:
        tape.watch(batch)
        y = fn(batch)
      return tape.gradient(y, batch).numpy()

    x_val, v_val = _RNG.normal(size=(3, 6)), _RNG.normal(size=(3, 6))
    x = tf.constant(x_val)
    hessians = tf1hess.eager.batch_hessians(fn, x).numpy()
    products = tf1hess.eager.batch_hessian_vector_products(fn, x, v_val)
    columns = [
      _differences(gradient, x_val, np.eye(6)[[j] * 3], eps) for j in range(6)
    ]
    tol = dict(atol=tolerance, rtol=tolerance)
    self.assertAllClose(hessians, np.stack(columns, 2), **tol)
    products_wanted = _differences(gradient, x_val, v_val, eps)
    self.assertAllClose(products.numpy(), products_wanted, **tol)

  @parameterized.named_parameters(
    ("max_pool", tf.float64, [-1, 3, 4, 1], tf.nn.max_pool2d),
    # TensorFlow's MaxPool3D has no float64 kernel.
    ("max_pool3d", tf.float32, [-1, 3, 2, 2, 1], tf.nn.max_pool3d),
  )
  def test_rows_warn(self, dtype, shape, pool):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(dtype, [None, 12])
      pooled = pool(tf.reshape(x, shape), 1, 1, "VALID")
      y = tf.reduce_sum(tf.sin(pooled), axis=list(range(1, len(shape))))
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.batch_hessians(y, x, method="while_loop")
    self.assertIn(
      "(MaxPoolGradGrad, MaxPool3DGradGrad), which is wrong",
      "".join(logs.output),
    )

  def test_rows_warn_of_a_bilinear_resize(self):
    # Newer TensorFlow (2.21) declares ResizeBilinearGrad not
    # differentiable: the rows miss the curvature through the resize
    # (tests/forward_rules_test.py checks the engine there). Older
    # TensorFlow has no gradient of it at all: the rows cannot build.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 12])
      h = tf.tanh(tf.reshape(x, [-1, 2, 3, 2]))
      y = tf.reduce_sum(tf.sin(tf.image.resize(h, [3, 5])), axis=[1, 2, 3])
      (g,) = tf.gradients(y, x)
      self.assertFalse(dispatch.rows_are_exact([y], x, g))
      if dispatch.rows_can_differentiate(x, g):
        with self.assertLogs(level="WARNING") as logs:
          tf1hess.batch_hessians(y, x, method="while_loop")
        self.assertIn(
          "bilinear resize's gradient, which TensorFlow declares not",
          "".join(logs.output),
        )
      else:
        with self.assertRaisesRegex(
          LookupError, "gradient of ResizeBilinearGrad"
        ):
          tf1hess.batch_hessians(y, x, method="while_loop")

  def test_a_norm_with_a_zero_adjoint(self):
    # TensorFlow's gradient of EuclideanNorm divides by the adjoint: where
    # a ReLU after the norm is off, the rows' second derivative is NaN.
    x_val = np.random.default_rng(12).normal(size=(4, 6))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      norms = tf.math.reduce_euclidean_norm(
        tf.reshape(tf.sin(x), [-1, 2, 3]), axis=2
      )
      y = tf.reduce_sum(tf.nn.relu(norms - 0.7 * x[:, :2] - 0.2), axis=1)
      (g,) = tf.gradients(y, x)
      self.assertFalse(dispatch.rows_are_exact([y], x, g))
      with mock.patch.object(dispatch, "_ROWS_MARGIN", 1e9):
        auto = tf1hess.batch_hessians(y, x)
      with self.assertLogs(level="WARNING") as logs:
        rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        got, from_rows = sess.run([auto, rows], {x: x_val})
        hessians = finite_differences.finite_difference_hessians(
          lambda batch: sess.run(y, {x: batch}), x_val
        )
    self.assertIn("Euclidean norm's gradient", "".join(logs.output))
    self.assertTrue(np.isnan(from_rows).any())  # The inputs turn a ReLU off.
    self.assertAllClose(got, hessians, atol=1e-6)

  @parameterized.named_parameters(*_MOMENTS.items())
  def test_moments_take_the_engine(self, model):
    # tf.nn.moments stops the gradient of the mean in the variance: exact
    # to first order, but TensorFlow's second derivatives miss the
    # curvature through the mean.
    def checked(x):
      y = model(x)
      (g,) = tf.gradients(y, x)
      self.assertFalse(dispatch.rows_are_exact([y], x, g))
      return y

    x_val = np.random.default_rng(13).normal(size=(3, 12))
    # The rows first: their gradients and loop read the variance too.
    with self.assertLogs(level="WARNING") as logs:
      got, hessians = _hessians_of(
        checked, x_val, ["rows", "auto", "forward", "laplacian"]
      )
    self.assertIn("tf.nn.moments", "".join(logs.output))
    tol = dict(atol=1e-5, rtol=1e-5)  # Differences of differences.
    self.assertAllClose(got["auto"], hessians, **tol)
    self.assertAllClose(got["forward"], hessians, **tol)
    self.assertAllClose(got["laplacian"], np.einsum("nii->n", hessians), **tol)
    # What TensorFlow's second derivatives miss is not small.
    self.assertGreater(np.abs(got["rows"] - hessians).max(), 1e-2)

  def test_forces_of_deep_moments_take_one_backward_pass(self):
    # Four layer normalizations, and the squared forces: the walk follows
    # each stopped mean into TensorFlow's gradient of its variance, and
    # the adjoint of each stop reaches it through those after it. The
    # walk's adjoints are one backward pass, about the ops of TensorFlow's
    # gradient, not one pass per stop.
    rng = np.random.default_rng(14)
    weights = [rng.normal(size=(5, 5)) / 2 for _ in range(4)]

    def forces_squared(x):
      h = x
      for w in weights:
        h = _layer_norm(tf.tanh(h @ w), [1])
      (g,) = tf.gradients(tf.reduce_sum(tf.sin(h), 1), x)
      return tf.reduce_sum(g * g, 1)

    x_val = rng.normal(size=(2, 5))
    with self.assertLogs(level="WARNING"):
      got, hessians = _hessians_of(forces_squared, x_val, ["rows", "auto"])
    scale = np.abs(hessians).max()  # About 1e3: differences of differences.
    self.assertAllClose(got["auto"], hessians, atol=1e-5 * scale)
    self.assertGreater(np.abs(got["rows"] - hessians).max(), 1e-2 * scale)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 5])
      y = forces_squared(x)
      path = engine.path_ops(x, [y])
      stops = [op for op in path if op.type == "StopGradient"]
      self.assertLen(
        [op for op in stops if registry.ADJOINTS[op.type](op, path)], 4
      )
      before = len(graph.get_operations())
      tf.gradients(y, x)
      gradient_ops = len(graph.get_operations()) - before
      before = len(graph.get_operations())
      engine.gradient([y], x)
      adjoint_ops = len(graph.get_operations()) - before
    self.assertLess(adjoint_ops, 1.5 * gradient_ops)

  def test_rows_say_whether_the_engine_follows_the_moments(self):
    # Layer normalization with tf.nn.moments, then an op the engine has no
    # rule for.
    def forces_squared(x):
      energy = tf.reduce_sum(
        tf.math.special.bessel_j0(_layer_norm(tf.sin(x), [1])), 1
      )
      (g,) = tf.gradients(energy, x)
      return tf.reduce_sum(g * g, 1)

    for method, says in [
      ("auto", "the forward engine, exact there, cannot follow the model"),
      ("while_loop", "method='forward' is exact there, where it can follow"),
    ]:
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, [None, 12])
        with self.assertLogs(level="WARNING") as logs:
          tf1hess.batch_hessians(forces_squared(x), x, method=method)
      self.assertIn("tf.nn.moments", "".join(logs.output))
      self.assertIn(says, "".join(logs.output))

  @parameterized.named_parameters(*_MOMENTS.items())
  def test_functions_of_gradients_of_moments(self, model):
    # TensorFlow's gradient of the variance reads the stopped mean too:
    # its values are the exact first derivative, and the engine follows
    # the stop there as well (forces, residuals of normalized models).
    def forces_squared(x):
      (g,) = tf.gradients(model(x), x)
      return tf.reduce_sum(g * g, 1)

    x_val = np.random.default_rng(15).normal(size=(3, 12))
    # The rows first: after a walk TensorFlow's gradients of the stops are
    # the identity (`test_weight_gradients_of_moments`).
    got, hessians = _hessians_of(
      forces_squared, x_val, ["rows", "forward", "auto", "laplacian"]
    )
    tol = dict(atol=1e-5, rtol=1e-5)  # Differences of differences.
    self.assertAllClose(got["forward"], hessians, **tol)
    self.assertAllClose(got["auto"], hessians, **tol)
    self.assertAllClose(got["laplacian"], np.einsum("nii->n", hessians), **tol)
    # TensorFlow's second derivatives of the gradient miss a few percent.
    error = np.abs(got["rows"] - hessians).max() / np.abs(hessians).max()
    self.assertGreater(error, 0.03)

  @parameterized.parameters(
    testing_utils.in_turn(model=list(_MOMENTS), op=["hessians", "laplacians"])
  )
  def test_weight_gradients_of_moments(self, model, op, cf):
    # A loss of the Hessians, trained on: its gradient with respect to the
    # weights reads the stopped mean through the engine's result, which
    # TensorFlow's stop would hold back (off by 0.15% to 6.5% of the
    # largest entry on these models).
    self.control_flow(cf)
    rng = np.random.default_rng(18)
    x_val = rng.normal(size=(3, 12))
    w_val = rng.normal(size=(12, 12)) / 3
    ops = {
      "hessians": tf1hess.batch_hessians,
      "laplacians": tf1hess.batch_laplacians,
    }
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      w = tf.compat.v1.placeholder(tf.float64, [12, 12])
      y = _MOMENTS[model](tf.matmul(x, w))
      (model_grad,) = tf.gradients(y, w)
      loss = tf.reduce_sum(tf.square(ops[op](y, x)))
      (got,) = tf.gradients(loss, w)
      (model_grad_after,) = tf.gradients(y, w)
      with tf.compat.v1.Session() as sess:
        feed = {x: x_val, w: w_val}
        got, before, after = sess.run([got, model_grad, model_grad_after], feed)
        want = finite_differences.finite_difference_gradients(
          lambda ws: np.array(
            [sess.run(loss, {x: x_val, w: v.reshape(12, 12)}) for v in ws]
          ),
          w_val.reshape(1, -1),
        ).reshape(12, 12)
    self.assertAllClose(got, want, atol=1e-6 * np.abs(want).max(), rtol=1e-5)
    # The model's own gradient is the same.
    self.assertAllClose(after, before, atol=1e-12, rtol=1e-12)

  @parameterized.named_parameters(*_MOMENTS.items())
  def test_hessian_vector_products_of_moments(self, model):
    # TensorFlow's backward pass through the gradient would miss the
    # curvature through the mean: the products come from the engine's
    # Hessians there.
    rng = np.random.default_rng(14)
    x_val, v_val = rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      v = tf.compat.v1.placeholder(tf.float64, [None, 12])
      y = model(x)
      hv = tf1hess.batch_hessian_vector_products(y, x, v)
      with tf.compat.v1.Session() as sess:
        got = sess.run(hv, {x: x_val, v: v_val})
        hessians = finite_differences.finite_difference_hessians(
          lambda batch: sess.run(y, {x: batch}), x_val
        )
    want = np.einsum("nij,nj->ni", hessians, v_val)
    self.assertAllClose(got, want, atol=1e-5, rtol=1e-5)
    # The same in a tf.function; executing eagerly, the tapes' products.
    products = tf.function(
      lambda x, v: tf1hess.eager.batch_hessian_vector_products(model, x, v)
    )
    self.assertAllClose(products(x_val, v_val), want, atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(*_MOMENTS.items())
  def test_eager_derivatives_of_moments(self, model):
    # Executing eagerly: the tapes would miss the curvature through the
    # mean too; a trace of the function finds the moments.
    rng = np.random.default_rng(17)
    x_val, v_val = rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    x = tf.constant(x_val)
    got = {
      "hessians": tf1hess.eager.batch_hessians(model, x),
      "diagonals": tf1hess.eager.batch_hessian_diagonals(model, x),
      "products": tf1hess.eager.batch_hessian_vector_products(
        model, x, tf.constant(v_val)
      ),
    }
    hessians = finite_differences.finite_difference_hessians(
      lambda batch: model(tf.constant(batch)).numpy(), x_val
    )
    tol = dict(atol=1e-5, rtol=1e-5)
    self.assertAllClose(got["hessians"], hessians, **tol)
    self.assertAllClose(
      got["diagonals"], np.diagonal(hessians, axis1=1, axis2=2), **tol
    )
    want = np.einsum("nij,nj->ni", hessians, v_val)
    self.assertAllClose(got["products"], want, **tol)

  @parameterized.parameters("static_batch", "fixed_signature", "function")
  def test_eager_derivatives_of_moments_in_functions_of_a_batch(self, wrap):
    # A function that reads the static batch size, or is a tf.function of
    # a fixed signature, cannot be traced with a batch of None: it is
    # traced at the shape of x. A tf.function's moments are in the function
    # it calls.
    layer_norm = _MOMENTS["layer_norm"]
    x_val = np.random.default_rng(23).normal(size=(3, 12))
    if wrap == "static_batch":
      model = lambda x: tf.reshape(layer_norm(x), [x.shape[0]])  # noqa: E731
    else:
      shape = [3 if wrap == "fixed_signature" else None, 12]
      model = tf.function(
        layer_norm, input_signature=[tf.TensorSpec(shape, tf.float64)]
      )
    x = tf.constant(x_val)
    hessians = finite_differences.finite_difference_hessians(
      lambda batch: layer_norm(tf.constant(batch)).numpy(), x_val
    )
    tol = dict(atol=1e-5, rtol=1e-5)
    self.assertAllClose(tf1hess.eager.batch_hessians(model, x), hessians, **tol)
    self.assertAllClose(
      tf1hess.eager.batch_laplacians(model, x),
      np.trace(hessians, axis1=1, axis2=2),
      **tol,
    )

  @parameterized.parameters("hessians", "laplacians", "products")
  def test_eager_derivatives_of_moments_run_the_function_once(self, op):
    # Where the tapes would miss the curvature through the mean, the
    # function is not also run under them: its side effects (a batch
    # normalization's moving statistics) happen once a call.
    calls = tf.Variable(0)

    def model(x):
      calls.assign_add(1)
      return _MOMENTS["layer_norm"](x)

    x = tf.constant(np.random.default_rng(29).normal(size=(3, 12)))
    for n in (1, 2):
      if op == "products":
        tf1hess.eager.batch_hessian_vector_products(model, x, x)
      else:
        getattr(tf1hess.eager, f"batch_{op}")(model, x)
      self.assertEqual(calls.numpy(), n)

  def test_eager_functions_without_moments_keep_the_tapes(self):
    fn = lambda x: tf.reduce_sum(tf.sin(x) * x, 1)  # noqa: E731
    x = tf.constant(np.ones((2, 3)))
    with mock.patch.object(tf1hess.eager, "_graph_walk") as walk:
      tf1hess.eager.batch_hessians(fn, x)
    walk.assert_not_called()
    self.assertFalse(tf1hess.eager._tapes_fail(fn, x, True))  # pylint: disable=protected-access

  def test_hessian_vector_products_of_moments_the_engine_cannot_follow(self):
    # tf.math.special.dawsn has no forward rule: TensorFlow's products,
    # with the curvature through the mean (the stops' gradient made the
    # identity).
    rng = np.random.default_rng(19)
    x_val, v_val = rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      h = _layer_norm(tf.tanh(x), [1])
      y = tf.reduce_sum(tf.math.special.dawsn(h * h), 1)
      with mock.patch.object(_core, "warn_once") as warn:
        hv = tf1hess.batch_hessian_vector_products(y, x, tf.constant(v_val))
      warn.assert_not_called()
      with tf.compat.v1.Session() as sess:
        got = sess.run(hv, {x: x_val})
        hessians = finite_differences.finite_difference_hessians(
          lambda batch: sess.run(y, {x: batch}), x_val
        )
    want = np.einsum("nij,nj->ni", hessians, v_val)
    self.assertAllClose(got, want, atol=1e-5, rtol=1e-5)

  def test_rows_take_the_curvature_of_moments_the_engine_cannot_follow(self):
    # Auto falls back to the rows (dawsn has no forward rule); with the
    # stops' gradient made the identity they are exact, as the engine
    # would be. The rows asked for keep TensorFlow's, with a warning.
    x_val = np.random.default_rng(20).normal(size=(3, 12))

    def model(x):
      return tf.reduce_sum(
        tf.math.special.dawsn(_layer_norm(tf.tanh(x), [1])), 1
      )

    with self.assertLogs(level="WARNING") as logs:
      got, hessians = _hessians_of(model, x_val, ["rows"])
    self.assertIn("tf.nn.moments", "".join(logs.output))
    self.assertGreater(np.abs(got["rows"] - hessians).max(), 1e-2)
    with mock.patch.object(_core, "warn_once", wraps=_core.warn_once) as warn:
      got, _ = _hessians_of(model, x_val, ["auto", "laplacian"])
    for call in warn.call_args_list:
      self.assertNotIn("tf.nn.moments", call.args[1])
    tol = dict(atol=1e-5, rtol=1e-5)
    self.assertAllClose(got["auto"], hessians, **tol)
    self.assertAllClose(got["laplacian"], np.einsum("nii->n", hessians), **tol)

  @parameterized.parameters("while_loop", "pfor")
  def test_rows_of_batch_moments_warn_that_samples_mix(self, method):
    # A batch normalization in training: no method has per-sample
    # Hessians of it, the engine neither.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      h = tf.matmul(x, _RNG.normal(size=(2, 8)))
      mean, variance = tf.nn.moments(h, [0])
      y = tf.reduce_sum(tf.tanh((h - mean) / tf.sqrt(variance + 1e-3)), 1)
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.batch_hessians(y, x, method=method)
    logged = "".join(logs.output)
    self.assertIn("over the batch axis", logged)
    self.assertIn("check_independence=True", logged)
    self.assertNotIn("method='forward' is exact", logged)

  def test_keras_layer_normalization_in_float64(self):
    # Keras 2 normalizes with tf.nn.moments outside float32 (no fused
    # kernel): the engine's Hessians are those of the function.
    keras = testing_utils.legacy_keras(self)
    x_val = np.random.default_rng(15).normal(size=(2, 12))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      norm = keras.layers.LayerNormalization(dtype="float64")
      h = norm(tf.reshape(tf.tanh(x), [-1, 3, 4]))
      y = tf.reduce_sum(tf.sin(h), [1, 2])
      types = {op.type for op in y.graph.get_operations()}
      self.assertIn("StopGradient", types)
      auto = tf1hess.batch_hessians(y, x)
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        got = sess.run(auto, {x: x_val})
        hessians = finite_differences.finite_difference_hessians(
          lambda batch: sess.run(y, {x: batch}), x_val
        )
    self.assertAllClose(got, hessians, atol=1e-5, rtol=1e-5)

  def test_per_output_ops_and_derivatives_of_moments(self):
    # Two outputs of a layer normalization: the per-output ops and the
    # cache of PINN code, against differences of each output; over two
    # inputs the engine takes a copy of the model that reads them as one
    # (exact), and the rows of `method="while_loop"` are TensorFlow's, and
    # say so.
    x_val = np.random.default_rng(16).normal(size=(2, 12))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      h = _layer_norm(tf.tanh(x), [1])
      y = tf.stack([tf.reduce_sum(tf.sin(h), 1), h[:, 0] * h[:, 1]], 1)
      d = tf1hess.Derivatives(y, x)
      outs = {
        "hessians": tf1hess.batch_output_hessians(y, x),
        "laplacians": tf1hess.batch_output_laplacians(y, x),
        "entry": d.hessian(3, 5, component=1),
        "full": d.hessian(component=0),
        "laplacian": d.laplacian(1),
      }
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      scaled = tf.reduce_sum(_layer_norm(x * t, [1])[:, :2] ** 2, 1)
      # The rows first: auto gives TensorFlow's gradients of the stops the
      # identity.
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.batch_output_hessians(scaled, [x, t], method="while_loop")
      self.assertIn("the rows over several inputs", "".join(logs.output))
      joint = tf1hess.Derivatives(scaled, [x, t]).hessian()
      with tf.compat.v1.Session() as sess:
        got = sess.run(outs, {x: x_val})
        xt_val = np.concatenate([x_val, [[0.7], [-1.3]]], 1)
        got["joint"] = sess.run(joint, {x: xt_val[:, :12], t: xt_val[:, 12:]})
        joint_hessians = finite_differences.finite_difference_hessians(
          lambda b: sess.run(scaled, {x: b[:, :12], t: b[:, 12:]}), xt_val
        )
        hessians = np.stack(
          [
            finite_differences.finite_difference_hessians(
              lambda batch, c=c: sess.run(y[:, c], {x: batch}), x_val
            )
            for c in range(2)
          ],
          1,
        )
    tol = dict(atol=1e-5, rtol=1e-5)
    self.assertAllClose(got["hessians"], hessians, **tol)
    self.assertAllClose(
      got["laplacians"], np.einsum("ncii->nc", hessians), **tol
    )
    self.assertAllClose(got["entry"][:, 0], hessians[:, 1, 3, 5], **tol)
    self.assertAllClose(got["full"], hessians[:, 0], **tol)
    self.assertAllClose(
      got["laplacian"][:, 0], np.einsum("nii->n", hessians[:, 1]), **tol
    )
    self.assertAllClose(got["joint"], joint_hessians, **tol)

  def test_a_stop_gradient_read_otherwise_stays_a_stop(self):
    # The same variance, with the stopped mean also read as a constant:
    # the walk does not follow the stop, and agrees with the rows.
    x_val = np.random.default_rng(14).normal(size=(3, 12))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 12])
      h = tf.sin(x)
      stopped = tf.stop_gradient(tf.reduce_mean(h, 1, keepdims=True))
      variance = tf.reduce_mean(tf.math.squared_difference(h, stopped), 1)
      y = variance + tf.reduce_sum(tf.square(h * stopped), 1)
      (g,) = tf.gradients(y, x)
      self.assertTrue(dispatch.rows_are_exact([y], x, g))
      forward = tf1hess.batch_hessians(y, x, method="forward")
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        got, want = sess.run([forward, rows], {x: x_val})
    self.assertAllClose(got, want, atol=1e-10)

  def test_segment_sums_take_the_engine(self):
    # TensorFlow's second derivatives through a segment sum raise TypeError
    # (the gradient of its gradient is IndexedSlices): auto takes the engine
    # for segments of the features, time-major, whatever the costs.
    x_val = np.random.default_rng(13).normal(size=(3, 8))

    def model(x):
      summed = tf.math.unsorted_segment_sum(
        tf.transpose(x), [0, 0, 1, 1, 2, 2, 3, 3], 4
      )
      return tf.reduce_sum(tf.tanh(summed), axis=0)

    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 8])
      y = model(x)
      (g,) = tf.gradients(y, x)
      self.assertFalse(dispatch.rows_can_differentiate(x, g))
      with mock.patch.object(dispatch, "_ROWS_MARGIN", 1e9):
        auto = tf1hess.batch_hessians(y, x)
      with self.assertRaisesRegex(TypeError, "segment sum"):
        tf1hess.batch_hessians(y, x, method="while_loop")
      # Over the batch axis, samples mix: neither can build it.
      mixed = tf.tanh(tf.math.unsorted_segment_sum(x, [0, 0, 1], 2))
      with self.assertRaisesRegex(TypeError, "IndexedSlices"):
        tf1hess.batch_hessians(mixed, x)
      with tf.compat.v1.Session() as sess:
        got = sess.run(auto, {x: x_val})
        hessians = finite_differences.finite_difference_hessians(
          lambda batch: sess.run(y, {x: batch}), x_val
        )
    self.assertAllClose(got, hessians, atol=1e-6)
    with _walks(self):
      eager = tf1hess.eager.batch_hessians(model, tf.constant(x_val))
    self.assertAllClose(eager, hessians, atol=1e-6)


class EagerInFunctionTest(tf.test.TestCase):
  """Inside a `tf.function`, `tf1hess.eager` takes the graph ops' choice."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = ("test_the_engine_where_it_pays",)

  def test_softsign_takes_the_engine(self):
    w = _RNG.normal(size=(4, 8)) / 2

    def fn(x):
      return tf.reduce_sum(tf.nn.softsign(tf.matmul(x, w)), axis=1)

    x_val = _RNG.normal(size=(3, 4))
    spec = [tf.TensorSpec([None, 4], tf.float64)]
    hessians = tf.function(
      lambda x: tf1hess.eager.batch_hessians(fn, x), input_signature=spec
    )
    value = hessians(tf.constant(x_val)).numpy()
    # Analytic: softsign'' (z) = -2 sign(z) / (1 + |z|)^3.
    z = x_val @ w
    curvature = -2 * np.sign(z) / (1 + np.abs(z)) ** 3
    expected = np.einsum("nu,au,bu->nab", curvature, w, w)
    self.assertAllClose(value, expected, atol=1e-10)

  def test_softsign_executing_eagerly_takes_the_engine(self):
    # The tapes would raise TensorFlow's LookupError (a trace of the
    # function finds it first); auto takes the engine.
    w = _RNG.normal(size=(4, 8)) / 2

    def fn(x):
      return tf.reduce_sum(tf.nn.softsign(tf.matmul(x, w)), axis=1)

    x_val = _RNG.normal(size=(3, 4))
    with self.assertRaises(LookupError):
      tf1hess.eager.batch_hessians(fn, tf.constant(x_val), method="while_loop")
    with _walks(self):
      value = tf1hess.eager.batch_hessians(fn, tf.constant(x_val)).numpy()
    z = x_val @ w
    curvature = -2 * np.sign(z) / (1 + np.abs(z)) ** 3
    expected = np.einsum("nu,au,bu->nab", curvature, w, w)
    self.assertAllClose(value, expected, atol=1e-10)

  def test_the_engine_where_it_pays(self):
    spec = [tf.TensorSpec([None, 128], tf.float64)]
    graph = (
      tf.function(
        lambda x: tf1hess.eager.batch_hessians(_mixture, x),
        input_signature=spec,
      )
      .get_concrete_function()
      .graph
    )
    self.assertNotEqual(_engine_ops(graph), [])


class NoDeadOpsTest(tf.test.TestCase):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_a_model_not_copied_is_walked_in_its_graph",
    "test_the_copy_keeps_shapes_axes_and_variables",
  )

  def test_rows_leave_no_engine_ops(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 16])
      y = _quadratic(x)
      before = len(graph.get_operations())
      auto = tf1hess.batch_hessians(y, x)
      added = len(graph.get_operations()) - before
      self.assertEqual(_engine_ops(graph), [])
      # The rows alone add as many ops: nothing else was left behind.
      before = len(graph.get_operations())
      with mock.patch.object(
        dispatch, "try_forward", return_value=(None, False)
      ):
        tf1hess.batch_hessians(y, x)
      self.assertEqual(len(graph.get_operations()) - before, added)
      with tf.compat.v1.Session() as sess:
        value = sess.run(auto, {x: np.ones((2, 16))})
      self.assertEqual(value.shape, (2, 16, 16))

  def test_engine_ops_when_taken(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 128])
      tf1hess.batch_hessians(_mixture(x), x)
      self.assertNotEqual(_engine_ops(graph), [])

  def test_unsupported_ops_leave_no_engine_ops(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      y = tf.reduce_sum(tf.math.special.dawsn(tf.sin(x) * x + 3.0), axis=1)
      self.assertNotIn("Dawsn", registry.RULES)
      tf1hess.batch_hessians(y, x)
      self.assertEqual(_engine_ops(graph), [])

  def test_a_model_not_copied_is_walked_in_its_graph(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 128])
      y = _mixture(x)
      failing = mock.patch.object(
        dispatch, "_copy", side_effect=ValueError("no copy")
      )
      with failing:
        h = tf1hess.batch_hessians(y, x)
      self.assertNotEqual(_engine_ops(graph), [])
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        h_val, rows_val = sess.run(
          [h, rows], {x: _RNG.normal(size=(2, 128)) * 0.1}
        )
      self.assertAllClose(h_val, rows_val, atol=1e-9)

  def test_the_copy_keeps_shapes_axes_and_variables(self):
    """A reshape by a computed shape, a slice, a variable, a fed weight."""
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      scale = tf.compat.v1.placeholder_with_default(
        tf.constant(0.5, tf.float64), []
      )
      v = tf.compat.v1.get_variable(
        "v", initializer=tf.constant(_RNG.normal(size=(3, 2)), tf.float64)
      )
      h = tf.reshape(tf.sin(x), [-1, tf.shape(x)[1] // 2, 2])
      h = tf.reduce_sum(tf.tanh(h[:, :, ::-1] * scale) * v, axis=[1, 2])
      x_val = _RNG.normal(size=(3, 6))
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        values = {}
        for method in ("auto", "while_loop", "forward"):
          for mode, op in (
            ("h", tf1hess.batch_hessians),
            ("d", tf1hess.batch_hessian_diagonals),
          ):
            values[method, mode] = sess.run(op(h, x, method=method), {x: x_val})
      del graph
      for (_, mode), value in values.items():
        self.assertAllClose(value, values["while_loop", mode], atol=1e-10)


class ByBatchSizeTest(
  parameterized.TestCase, tf.test.TestCase, testing_utils.ControlFlowMixin
):
  """Where the choice depends on N, a `tf.cond` on N makes it at run time."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_auto_builds_both_and_agrees_with_the_rows",
    "test_compositions_in_a_cond0",
    "test_compositions_in_a_cond1",
    "test_compositions_in_a_cond2",
    "test_compositions_in_a_cond4",
    "test_compositions_in_a_cond5",
    "test_derivatives_with_respect_to_weights1",
    "test_fused_batch_norm_rows_stay_out_of_a_v1_cond0",
    "test_fused_batch_norm_rows_stay_out_of_a_v1_cond1",
    "test_graph_ops_inside_an_autograph_tf_function",
    "test_inside_a_tf_function",
    "test_the_engine_runs_below_the_switch0",
    "test_the_engine_runs_below_the_switch1",
    "test_the_engine_runs_none_of_the_rows_passes0",
    "test_the_engine_runs_none_of_the_rows_passes1",
    "test_the_engine_runs_none_of_the_rows_passes2",
    "test_the_engine_runs_none_of_the_rows_passes3",
    "test_xla_takes_the_engine_for_every_batch_size",
  )

  def _choice(self, n):
    # Three tanh layers of 32 on 128 features: the rows' K passes cost a
    # fixed time the engine does not, the engine more per sample (its
    # Jacobians (N, K, 32)).
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [n, _SWITCH_K])
      y = _mlp(x, 3, 32)
      (g,) = tf.gradients(y, x)
      walked = dispatch.dry_run([y], x, forward.HESSIAN)
      return dispatch.choose([y], x, g, forward.HESSIAN, walked)

  def test_the_switch_is_where_the_static_choice_changes(self):
    choice = self._choice(None)
    low, high = dispatch.SWITCH_RANGE
    self.assertBetween(choice.switch, low + 1, high)
    self.assertTrue(choice.engine)
    # The static estimates differ by a few ops (shapes that fold).
    self.assertEqual(self._choice(choice.switch // 2), dispatch.Choice(True))
    self.assertEqual(self._choice(choice.switch * 2), dispatch.Choice(False))
    self.assertTrue(choice.at(choice.switch - 1))
    self.assertFalse(choice.at(choice.switch))

  def test_no_switch_where_one_side_wins_throughout(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 128])
      y = _mixture(x)
      (g,) = tf.gradients(y, x)
      walked = dispatch.dry_run([y], x, forward.HESSIAN)
      choice = dispatch.choose([y], x, g, forward.HESSIAN, walked)
    self.assertEqual(choice, dispatch.Choice(True))

  def test_auto_builds_both_and_agrees_with_the_rows(self):
    self.assertIsNotNone(self._choice(None).switch)
    x_val = _RNG.normal(size=(3, _SWITCH_K))
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _SWITCH_K])
      y = _mlp(x, 3, 32)
      auto = tf1hess.batch_hessians(y, x)
      names = [op.name for op in graph.get_operations()]
      self.assertTrue(any("/by_batch_size" in name for name in names))
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        auto_val, rows_val = sess.run([auto, rows], {x: x_val})
    self.assertAllClose(auto_val, rows_val, atol=1e-10)

  def test_inside_a_tf_function(self):
    fn = _switching_mlp(_switching_weights())
    spec = [tf.TensorSpec([None, _SWITCH_K], tf.float64)]
    auto, rows = (
      tf.function(
        lambda x, method=method: tf1hess.eager.batch_hessians(
          fn, x, method=method
        ),
        input_signature=spec,
      )
      for method in ("auto", "while_loop")
    )
    graph = auto.get_concrete_function().graph
    names = [op.name for op in graph.get_operations()]
    self.assertTrue(any("/by_batch_size" in name for name in names))
    x_val = tf.constant(_RNG.normal(size=(3, _SWITCH_K)))
    self.assertAllClose(auto(x_val), rows(x_val), atol=1e-10)

  def test_graph_ops_inside_an_autograph_tf_function(self):
    # Weights captured from eager execution, AutoGraph on (the default).
    fn = _switching_mlp([tf.constant(w) for w in _switching_weights()])
    spec = [tf.TensorSpec([None, _SWITCH_K], tf.float64)]

    @tf.function(input_signature=spec)
    def hessians(x):
      return tf1hess.batch_hessians(fn(x), x)

    graph = hessians.get_concrete_function().graph
    names = [op.name for op in graph.get_operations()]
    self.assertTrue(any("/by_batch_size" in name for name in names))
    x_val = tf.constant(_RNG.normal(size=(3, _SWITCH_K)))
    expected = testing_utils.tape_hessians(fn, x_val)
    self.assertAllClose(hessians(x_val), expected, atol=1e-10)

  def test_xla_takes_the_engine_for_every_batch_size(self):
    # XLA compiles both branches of a switch, and failed on the weight
    # gradients of the one a run does not take: no switch there.
    weights = [tf.Variable(w) for w in _switching_weights()]
    fn = _switching_mlp(weights)
    spec = [tf.TensorSpec([None, _SWITCH_K], tf.float64)]

    def loss(x):
      with tf.GradientTape() as tape:
        value = tf.reduce_sum(tf1hess.batch_hessians(fn(x), x) ** 2)
      return value, tape.gradient(value, weights)

    compiled = tf.function(loss, input_signature=spec, jit_compile=True)
    graph = compiled.get_concrete_function().graph
    names = [op.name for op in graph.get_operations()]
    self.assertFalse(any("by_batch_size" in name for name in names))
    x_val = _RNG.normal(size=(3, _SWITCH_K))
    self.assertAllClose(
      compiled(x_val), tf.function(loss, input_signature=spec)(x_val)
    )

  def _switched(self, y, x, engine_below, fn=tf1hess.batch_hessians):
    choice = dispatch.Choice(engine_below, 4)
    with mock.patch.object(dispatch, "choose", return_value=choice):
      return fn(y, x)

  @parameterized.parameters(1, 2)
  def test_the_engine_runs_below_the_switch(self, version):
    self.control_flow(version)
    weights = testing_utils.mlp_weights(3, 6, seed=2)
    x_val = _RNG.normal(size=(6, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = testing_utils.tanh_mlp(x, *weights)
      # The engine's result doubled, to see which side ran.
      with mock.patch.object(
        dispatch, "shaped", side_effect=lambda r, x, m: 2 * r
      ):
        below = self._switched(y, x, True)
        above = self._switched(y, x, False)
      with tf.compat.v1.Session() as sess:
        for n, factor in ((3, 1), (4, 2)):
          want = testing_utils.tanh_mlp_hessians(x_val[:n], *weights)
          below_val, above_val = sess.run([below, above], {x: x_val[:n]})
          self.assertAllClose(below_val, (3 - factor) * want, atol=1e-10)
          self.assertAllClose(above_val, factor * want, atol=1e-10)

  @parameterized.product(
    version=[1, 2],
    model=["cross", "cumulative_logsumexp", "cross_entropy"],
  )
  def test_compositions_in_a_cond(self, version, model):
    # The rules that walk a composition of ops with rules (`composite`)
    # build it in a cond's branch: in the switch's, a function graph under
    # control flow v2, and, under v1, in a user's cond too, whose ops read
    # the model's tensors through a `Switch`. They gave zeros or no terms.
    self.control_flow(version)
    w = _RNG.normal(size=(6, 12)) / 3.0
    x_val = _RNG.normal(size=(3, 6))

    def y_of(x):
      h = tf.tanh(tf.matmul(x, w))
      if model == "cross":
        h = tf.linalg.cross(
          tf.reshape(h[:, :6], [-1, 2, 3]), tf.reshape(x, [-1, 2, 3])
        )
      elif model == "cumulative_logsumexp":
        h = tf.math.cumulative_logsumexp(h, axis=1)
      else:
        h = tf.nn.softmax_cross_entropy_with_logits(
          labels=tf.nn.softmax(h[:, :6] + x), logits=h[:, 6:]
        )
      return tf.reduce_sum(tf.reshape(h, [tf.shape(x)[0], -1]) ** 2, axis=1)

    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      y = y_of(x)
      (g,) = tf.gradients(y, x)
      got = [self._switched(y, x, True)]  # The engine for 3 samples.
      if version == 1:  # Under v2, a branch's ops are of another graph.
        got.append(
          tf.cond(
            tf.shape(x)[0] < 4,
            lambda: tf1hess.batch_laplacians(y, x, method="forward"),
            lambda: tf.zeros(tf.shape(x)[:1], x.dtype),
          )
        )
      with tf.compat.v1.Session() as sess:
        out = sess.run(got, {x: x_val})
        want = testing_utils.central_difference_jacobian(
          lambda v: sess.run(g, {x: v}), x_val
        )
    self.assertAllClose(out[0], want, atol=1e-6)
    if version == 1:
      self.assertAllClose(out[1], np.trace(want, axis1=1, axis2=2), atol=1e-6)

  @parameterized.product(version=[1, 2], engine_below=[True, False])
  def test_rows_past_the_switch_are_a_loop(self, version, engine_below):
    # Rows that run only from the switch on are built as a loop over rows
    # (one backward pass to build), not unrolled (one pass a row); rows
    # that run below it are unrolled, as without a switch.
    self.control_flow(version)
    weights = testing_utils.mlp_weights(3, 6, seed=3)
    x_val = _RNG.normal(size=(6, 3))
    loops = []

    def attempts(*args, **kwargs):
      found = original(*args, **kwargs)
      loops.append(found[0].loop)
      return found

    original = _core._attempts  # pylint: disable=protected-access
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = testing_utils.tanh_mlp(x, *weights)
      with mock.patch.object(_core, "_attempts", side_effect=attempts):
        hessians = self._switched(y, x, engine_below)
      with tf.compat.v1.Session() as sess:
        for n in (3, 6):
          self.assertAllClose(
            sess.run(hessians, {x: x_val[:n]}),
            testing_utils.tanh_mlp_hessians(x_val[:n], *weights),
            atol=1e-10,
          )
    self.assertEqual(loops, ["while_loop" if engine_below else "unrolled"])

  @parameterized.product(version=[1, 2], chunked=[True, False])
  def test_the_engine_runs_none_of_the_rows_passes(self, version, chunked):
    # What a branch reads from outside the cond runs whichever branch is
    # taken: the rows differentiate a copy of the model made in their
    # branch, so that either branch runs no backward pass of the model
    # over the whole batch outside, and where the engine walks chunks (each
    # on a copy of the model), no forward pass either.
    self.control_flow(version)
    x_val = _RNG.normal(size=(40, 3))
    with (
      tf.Graph().as_default(),
      mock.patch.object(forward_chunks, "MIN_CHUNK", 8),
      mock.patch.object(
        forward_chunks, "CHUNK_BYTES", 2**9 if chunked else 2**30
      ),
    ):
      w1, b1, w2 = (tf.constant(w) for w in testing_utils.mlp_weights(3, 6))
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      with tf.name_scope("model"):
        y = tf.reduce_sum(tf.tanh(tf.matmul(x, w1) + b1) * w2, axis=1)
      with mock.patch.object(
        dispatch, "choose", return_value=dispatch.Choice(True, 30)
      ):
        switched = tf1hess.batch_hessians(y, x)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      # A loss on the Hessians, differentiated for training, through the
      # cond and through the rows alone.
      grads = [
        tf.gradients(tf.reduce_sum(tf.square(h)), [w1, b1, w2])
        for h in (switched, rows)
      ]
      options = tf.compat.v1.RunOptions(
        trace_level=tf.compat.v1.RunOptions.FULL_TRACE
      )
      with tf.compat.v1.Session() as sess:
        for n in (10, 40):  # The engine, then the rows.
          metadata = tf.compat.v1.RunMetadata()
          got, want = sess.run(
            [switched, rows],
            {x: x_val[:n]},
            options=options,
            run_metadata=metadata,
          )
          self.assertAllClose(got, want, atol=1e-10)
          got, want = sess.run(grads, {x: x_val[:n]})
          for g, w in zip(got, want):
            self.assertAllClose(g, w, atol=1e-10)
          metadata_switched = tf.compat.v1.RunMetadata()
          sess.run(
            switched,
            {x: x_val[:n]},
            options=options,
            run_metadata=metadata_switched,
          )
          ran = {
            node.node_name
            for device in metadata_switched.step_stats.dev_stats
            for node in device.node_stats
          }
          # The engine's branch reads the model's tensors when whole.
          self.assertEqual("model/Tanh" in ran, not chunked)
          outside = [
            name
            for name in ran
            if "/gradients/" in name and "/by_batch_size/" not in name
          ]
          self.assertEmpty(outside)

  @parameterized.parameters(1, 2)
  def test_derivatives_with_respect_to_weights(self, version):
    # A loss on the Hessians, differentiated for training: through the
    # cond as through either engine alone.
    self.control_flow(version)
    x_val = _RNG.normal(size=(6, 3))
    with tf.Graph().as_default():
      w1, b1, w2 = (tf.constant(w) for w in testing_utils.mlp_weights(3, 6))
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = tf.reduce_sum(tf.tanh(tf.matmul(x, w1) + b1) * w2, axis=1)
      switched = self._switched(y, x, True)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      grads = [
        tf.gradients(tf.reduce_sum(tf.square(h)), [w1, b1, w2])
        for h in (switched, rows)
      ]
      with tf.compat.v1.Session() as sess:
        for n in (3, 6):
          got, want = sess.run(grads, {x: x_val[:n]})
          for g, w in zip(got, want):
            self.assertAllClose(g, w, atol=1e-10)

  @parameterized.parameters(1, 2)
  def test_fused_batch_norm_rows_stay_out_of_a_v1_cond(self, version):
    # TensorFlow's second derivative of FusedBatchNorm differentiates with
    # a tape: built in a v1 cond branch on gradients from outside it, the
    # rows came out wrong. Under v1 auto takes the engine for every N.
    self.control_flow(version)
    x_val = _RNG.normal(size=(6, 4)).astype(np.float32)
    w = _RNG.normal(size=(4, 5)).astype(np.float32)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 4])
      h = tf.tanh(tf.matmul(x, w))
      ones = tf.ones(tf.shape(x)[:1])
      out, _, _ = tf.compat.v1.nn.fused_batch_norm(
        tf.reshape(h, [1, -1, 5, 1]),
        ones,
        ones * 0.0,
        epsilon=0.01,
        data_format="NCHW",
      )
      y = tf.reduce_sum(tf.sin(tf.reshape(out, [-1, 5])), axis=1)
      switched = self._switched(y, x, False)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      names = [op.name for op in graph.get_operations()]
      self.assertEqual(
        any("/by_batch_size" in name for name in names), version == 2
      )
      with tf.compat.v1.Session() as sess:
        for n in (3, 6):
          got, want = sess.run([switched, rows], {x: x_val[:n]})
          self.assertAllClose(got, want, atol=1e-5, rtol=1e-4)

  @parameterized.named_parameters(
    ("diagonal", tf1hess.batch_hessian_diagonals, 1),
    ("laplacian", tf1hess.batch_laplacians, 0),
  )
  def test_diagonals_and_laplacians(self, op, axes):
    weights = testing_utils.mlp_weights(3, 6, seed=4)
    x_val = _RNG.normal(size=(6, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 3])
      y = testing_utils.tanh_mlp(x, *weights)
      switched = self._switched(y, x, True, op)
      with tf.compat.v1.Session() as sess:
        for n in (3, 6):
          h = testing_utils.tanh_mlp_hessians(x_val[:n], *weights)
          want = np.diagonal(h, axis1=1, axis2=2)
          if not axes:
            want = want.sum(axis=1)
          got = sess.run(switched, {x: x_val[:n]})
          self.assertAllClose(got, want, atol=1e-10)


class SameNumbersTest(parameterized.TestCase, tf.test.TestCase):
  """auto, the rows and the engine agree, whichever auto takes."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_measure_reports_both_engines",
    "test_validation_models_deep_tanh_diagonal",
    "test_validation_models_deep_tanh_hessian",
    "test_validation_models_deep_tanh_laplacian",
    "test_validation_models_elementwise_laplacian",
    "test_validation_models_fourier_diagonal",
    "test_validation_models_fourier_hessian",
    "test_validation_models_fourier_laplacian",
    "test_validation_models_gated_softmax_diagonal",
    "test_validation_models_gated_softmax_hessian",
    "test_validation_models_gated_softmax_laplacian",
    "test_validation_models_glu_diagonal",
    "test_validation_models_glu_hessian",
    "test_validation_models_glu_laplacian",
    "test_validation_models_gru_diagonal",
    "test_validation_models_gru_hessian",
    "test_validation_models_gru_laplacian",
    "test_validation_models_image_conv_hessian",
    "test_validation_models_inverse_quadratic_diagonal",
    "test_validation_models_inverse_quadratic_hessian",
    "test_validation_models_inverse_quadratic_laplacian",
    "test_validation_models_layer_norm_elu_diagonal",
    "test_validation_models_layer_norm_elu_hessian",
    "test_validation_models_layer_norm_elu_laplacian",
    "test_validation_models_lstm_diagonal",
  )

  @parameterized.named_parameters(
    (f"{model}_{quantity}", model, quantity)
    for model in cost_model_measure.MODELS
    if model != "conv1d"
    for quantity in ("hessian", "diagonal", "laplacian")
  )
  def test_validation_models(self, model, quantity):
    op = {
      "hessian": tf1hess.batch_hessians,
      "diagonal": tf1hess.batch_hessian_diagonals,
      "laplacian": tf1hess.batch_laplacians,
    }[quantity]
    k = 4 if model == "image_conv" else 5  # A square image.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, k])
      y = cost_model_measure.MODELS[model](x, np.random.default_rng(k))
      fetches = {m: op(y, x, method=m) for m in ("auto", "while_loop")}
      fetches["forward"] = op(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        values = sess.run(fetches, {x: _RNG.normal(size=(4, k)) * 0.5})
    for name, value in values.items():
      self.assertAllClose(value, values["while_loop"], atol=1e-9, msg=name)

  def test_measure_reports_both_engines(self):
    out = cost_model_measure.measure("rbf_softplus", 3, 4, "laplacian", 1)
    self.assertIn(out["picked"], ("forward", "rows"))
    self.assertGreater(out["rows"], 0)
    self.assertGreater(out["forward"], 0)
    self.assertGreater(out["estimates"]["rows"], 0)


if __name__ == "__main__":
  tf.test.main()
