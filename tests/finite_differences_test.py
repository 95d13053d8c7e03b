"""Finite differences against analytic derivatives; the Hessian checker.

The finite differences are compared with closed forms; the checker is run on
correct and on deliberately wrong Hessians, on models built the way TF1 code
builds them, and at the known second-derivative traps.
"""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess.finite_differences import check_hessians
from tf1hess.finite_differences import finite_difference_gradients
from tf1hess.finite_differences import finite_difference_hessians

_A = np.random.default_rng(0).normal(size=(4, 4))


def _sin_form(b):
  """`sin(x)^T A sin(x)` per sample, numpy, in `b`'s dtype."""
  s = np.sin(b)
  return np.einsum("ni,ij,nj->n", s, _A.astype(b.dtype), s)


def _sin_form_hessians(x):
  x = np.asarray(x, np.float64)
  s, c = np.sin(x), np.cos(x)
  sym = _A + _A.T
  h = np.einsum("ni,ij,nj->nij", c, sym, c)
  k = x.shape[1]
  h[:, np.arange(k), np.arange(k)] -= s * np.einsum("ij,nj->ni", sym, s)
  return h


def _sin_form_gradients(x):
  x = np.asarray(x, np.float64)
  return np.cos(x) * np.einsum("ij,nj->ni", _A + _A.T, np.sin(x))


class _Recorder:
  """Wraps `fn` and keeps the batches it was called with."""

  def __init__(self, fn):
    self.fn = fn
    self.batches = []

  def __call__(self, b):
    self.batches.append(np.array(b))
    return self.fn(b)


class FiniteDifferenceHessiansTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    # (x dtype, fn dtype, relative error bound): about sqrt(eps) of the
    # coarser precision, times the size of f and its 4th derivatives.
    ("float64", np.float64, np.float64, 1e-7),
    ("float32_input", np.float32, np.float64, 1e-7),
    ("float32", np.float32, np.float32, 3e-3),
  )
  def test_matches_analytic(self, x_dtype, fn_dtype, rtol):
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(x_dtype)
    h = finite_difference_hessians(lambda b: _sin_form(b.astype(fn_dtype)), x)
    self.assertEqual(h.dtype, np.float64)
    self.assertEqual(h.shape, (5, 4, 4))
    expected = _sin_form_hessians(x)
    self.assertAllClose(h, expected, atol=rtol * np.abs(expected).max())

  def test_quadratic_form_is_exact_up_to_rounding(self):
    # Only rounding is left: about eps * |f| / h^2 per entry.
    x = np.random.default_rng(2).normal(size=(3, 4)) * 10.0
    fn = lambda b: np.einsum("ni,ij,nj->n", b, _A, b)  # noqa: E731
    h = finite_difference_hessians(fn, x)
    eps = np.finfo(np.float64).eps
    steps = 2.0 ** np.round(np.log2(eps**0.25 * np.maximum(np.abs(x), 1)))
    bound = 10 * eps * np.abs(fn(x)) / steps.min(axis=1) ** 2  # (N,)
    error = np.abs(h - (_A + _A.T)).max(axis=(1, 2))
    self.assertTrue(np.all(error <= bound), (error, bound))

  def test_cubic_is_exact_up_to_rounding(self):
    # Central differences are exact for cubics: f = sum x_a^2 x_b c_ab.
    c = np.random.default_rng(3).normal(size=(3, 3))
    x = np.random.default_rng(4).normal(size=(4, 3))
    fn = lambda b: np.einsum("na,nb,ab->n", b**2, b, c)  # noqa: E731
    expected = np.zeros((4, 3, 3))
    for a in range(3):
      for b in range(3):
        # d/dx_a d/dx_b of sum_pq x_p^2 x_q c_pq.
        expected[:, a, b] += 2 * x[:, b] * c[b, a] + 2 * x[:, a] * c[a, b]
        if a == b:
          expected[:, a, a] += 2 * (x @ c[a])
    h = finite_difference_hessians(fn, x)
    self.assertAllClose(h, expected, atol=1e-7)

  def test_rank3_input_and_array_outputs(self):
    # fn returns (rows, 2): summed per sample, like tf1hess.batch_hessians.
    x = np.random.default_rng(5).normal(size=(3, 2, 2))
    fn = lambda b: np.stack(  # noqa: E731
      [_sin_form(b.reshape(-1, 4)), np.zeros(len(b))], axis=1
    )
    h = finite_difference_hessians(fn, x)
    self.assertEqual(h.shape, (3, 2, 2, 2, 2))
    self.assertAllClose(
      h.reshape(3, 4, 4), _sin_form_hessians(x.reshape(3, 4)), atol=1e-6
    )

  def test_eager_tensors_and_keras_models(self):
    tf_keras = tf1hess.keras.legacy_keras()
    model = tf_keras.Sequential(
      [
        tf_keras.Input((3,), dtype="float64"),
        tf_keras.layers.Dense(8, activation="tanh", dtype="float64"),
        tf_keras.layers.Dense(1, use_bias=False, dtype="float64"),
      ]
    )
    w1, b1 = model.layers[0].get_weights()
    w2 = model.layers[1].get_weights()[0][:, 0]
    x = tf.constant(np.random.default_rng(6).normal(size=(4, 3)))
    h = finite_difference_hessians(model, x)
    expected = testing_utils.tanh_mlp_hessians(x.numpy(), w1, b1, w2)
    self.assertAllClose(h, expected, atol=1e-6)

  def test_samples_are_independent(self):
    x = np.random.default_rng(7).normal(size=(6, 4))
    whole = finite_difference_hessians(_sin_form, x)
    one = finite_difference_hessians(_sin_form, x[3:4])
    self.assertAllClose(whole[3:4], one, rtol=0, atol=0)

  def test_batch_size_bounds_the_calls(self):
    x = np.random.default_rng(8).normal(size=(5, 4))
    k = 4
    everything = _Recorder(_sin_form)
    finite_difference_hessians(everything, x)
    # f(x), then the 2K single moves, then the 4 K (K-1) / 2 pair moves.
    self.assertEqual(
      [len(b) for b in everything.batches], [5, 2 * k * 5, 2 * k * (k - 1) * 5]
    )
    small = _Recorder(_sin_form)
    h = finite_difference_hessians(small, x, batch_size=12)
    self.assertLessEqual(max(len(b) for b in small.batches), 12)
    self.assertAllClose(h, _sin_form_hessians(x), atol=1e-6)

  @parameterized.named_parameters(
    # The documented rule, 2^round(log2(max(eps_m^(1/4), 8 eps_x)
    # * max(|x|, 1))), for (x dtype, fn dtype, x, eps): the expected step.
    ("float64_unit", np.float64, np.float64, 0.3, None, 2.0**-13),
    ("float64_large", np.float64, np.float64, 1000.0, None, 2.0**-3),
    ("float32", np.float32, np.float32, 0.3, None, 2.0**-6),
    ("float32_model", np.float64, np.float32, 0.3, None, 2.0**-6),
    ("float32_input", np.float32, np.float64, 0.3, None, 2.0**-13),
    ("float16_input", np.float16, np.float64, 0.3, None, 2.0**-7),
    ("explicit_eps", np.float64, np.float64, -3.0, 1e-3, 2.0**-8),
    ("precision", np.float64, np.float64, 0.3, None, 2.0**-6, tf.float32),
  )
  def test_step_rule(self, x_dtype, fn_dtype, value, eps, step, precision=None):
    recorder = _Recorder(lambda b: np.sum(b.astype(fn_dtype) ** 2, axis=1))
    x = np.full((1, 2), value, x_dtype)
    finite_difference_hessians(recorder, x, eps=eps, precision=precision)
    moves = np.abs(np.concatenate(recorder.batches[1:]).astype(np.float64) - x)
    self.assertAllClose(np.unique(moves), [0.0, step], rtol=1e-6)

  def test_empty_batch(self):
    h = finite_difference_hessians(_sin_form, np.zeros((0, 4)))
    self.assertEqual(h.shape, (0, 4, 4))


class FiniteDifferenceGradientsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("float64", np.float64, 1e-9), ("float32", np.float32, 3e-4)
  )
  def test_matches_analytic(self, dtype, rtol):
    x = np.random.default_rng(9).normal(size=(5, 4)).astype(dtype)
    g = finite_difference_gradients(_sin_form, x)
    self.assertEqual(g.dtype, np.float64)
    expected = _sin_form_gradients(x)
    self.assertAllClose(g, expected, atol=rtol * np.abs(expected).max())

  def test_step_rule(self):
    recorder = _Recorder(lambda b: np.sum(b**2, axis=1))
    x = np.array([[0.5, 100.0]])
    finite_difference_gradients(recorder, x)
    moves = np.abs(recorder.batches[1] - x).max(axis=1)
    # 2^round(log2(eps_m^(1/3) * max(|x|, 1))), eps_m^(1/3) = 6.1e-6.
    self.assertAllClose(moves, [2.0**-17] * 2 + [2.0**-11] * 2)


class ArgumentErrorsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("hessians", finite_difference_hessians),
    ("gradients", finite_difference_gradients),
    (
      "check",
      lambda fn, x, **kw: check_hessians(
        fn, x, hessians=np.zeros((2, 3, 3)), **kw
      ),
    ),
  )
  def test_errors(self, function):
    x = np.ones((2, 3))
    ok = lambda b: np.sum(b, axis=1)  # noqa: E731
    with self.assertRaisesRegex(TypeError, r"`fn` must be a callable .*; saw"):
      function(3, x)
    with self.assertRaisesRegex(
      TypeError, r"`x` must be a floating array .*; saw dtype int64\."
    ):
      function(ok, np.ones((2, 3), np.int64))
    with self.assertRaisesRegex(
      ValueError, r"`x` must have rank >= 2 .*; saw rank 1 with shape \(3,\)"
    ):
      function(ok, np.ones(3))
    with tf.Graph().as_default():
      with self.assertRaisesRegex(
        TypeError, r"`x` must be a numpy array or an eager tensor; saw a sym"
      ):
        function(ok, tf.compat.v1.placeholder(tf.float64, [None, 3]))
    with self.assertRaisesRegex(
      ValueError,
      r"`fn\(x\)` must hold one value .* leading dimension 2 .*"
      r"saw shape \(\)\.",
    ):
      function(lambda b: np.sum(b), x)
    with self.assertRaisesRegex(
      ValueError, r"leading dimension 2 for a batch of 2; saw shape \(3,\)\."
    ):
      function(lambda b: np.ones(3), x)
    with self.assertRaisesRegex(
      TypeError, r"`fn\(x\)` must be floating; saw dtype int64\."
    ):
      function(lambda b: np.ones(len(b), np.int64), x)
    for eps in (0, 1.5, -1e-3, True, "1e-3"):
      with self.assertRaisesRegex(
        ValueError, r"`eps` must be None or a relative step in \(0, 1\); saw"
      ):
        function(ok, x, eps=eps)
    with self.assertRaisesRegex(
      ValueError, r"`eps` must give steps that float16 can resolve at `x`"
    ):
      function(ok, np.ones((2, 3), np.float16), eps=1e-9)
    for precision in ("int32", tf.int32, "complex64", object):
      with self.assertRaisesRegex(
        TypeError,
        r"`precision` must be None or a floating dtype \(float16, bfloat16, "
        r"float32 or float64\); saw",
      ):
        function(ok, x, precision=precision)
    for batch_size in (0, 2.0):
      with self.assertRaisesRegex(
        ValueError, r"`batch_size` must be a positive int; saw"
      ):
        function(ok, x, batch_size=batch_size)

  def test_fn_returning_symbolic_tensors(self):
    def fn(b):
      with tf.Graph().as_default():
        return tf.constant(b)

    with self.assertRaisesRegex(
      TypeError,
      r"`fn\(x\)` must be a numpy array or an eager tensor; saw a symbolic",
    ):
      finite_difference_hessians(fn, np.ones((2, 3)))

  def test_check_specific_errors(self):
    x = np.ones((2, 3))
    fn = lambda b: np.sum(b * b, axis=1)  # noqa: E731
    with self.assertRaisesRegex(
      ValueError,
      r"`hessians` must have shape \(N, d\.\.\., d\.\.\.\) = \(2, 3, 3\) for "
      r"`x` of shape \(2, 3\); saw \(2, 3\)\.",
    ):
      check_hessians(fn, x, hessians=np.zeros((2, 3)))
    with self.assertRaisesRegex(
      TypeError, r"`hessians` must be floating; saw dtype int64\."
    ):
      check_hessians(fn, x, hessians=np.zeros((2, 3, 3), np.int64))
    for arg in ("rtol", "atol"):
      for value in (-1.0, True, "0.1"):
        with self.assertRaisesRegex(
          ValueError, rf"`{arg}` must be None or a number >= 0; saw"
        ):
          check_hessians(fn, x, **{arg: value})
    with tf.Graph().as_default():  # A session's function: no eager path.
      with self.assertRaisesRegex(
        ValueError, r"`hessians` must be given where eager execution is off"
      ):
        check_hessians(fn, x)


class CheckHessiansTest(tf.test.TestCase, parameterized.TestCase):
  def test_correct_hessians_pass(self):
    x = np.random.default_rng(10).normal(size=(6, 4))
    check = check_hessians(
      _sin_form, x, hessians=_sin_form_hessians(x), raise_on_failure=True
    )
    self.assertTrue(check.ok)
    self.assertTrue(check)
    self.assertEqual(check.abs_error.shape, (6,))
    self.assertEqual(check.rel_error.shape, (6,))
    self.assertAllLess(check.rel_error, 1e-7)
    self.assertRegex(check.summary(), r"agree .* in all 6 samples")

  @parameterized.named_parameters(
    ("float64", np.float64, 1e-4), ("float32", np.float32, 0.1)
  )
  def test_perturbed_hessian_is_caught(self, dtype, size):
    x = np.random.default_rng(11).normal(size=(5, 4)).astype(dtype)

    def fn(b):
      return tf.reduce_sum(tf.sin(b) ** 3, axis=1)

    good = tf1hess.eager.batch_hessians(fn, x).numpy()
    self.assertTrue(check_hessians(fn, x, hessians=good).ok)
    wrong = good.astype(np.float64).copy()
    scale = np.abs(wrong[3]).max()
    wrong[3, 1, 2] += size * scale
    check = check_hessians(fn, x, hessians=wrong)
    self.assertFalse(check.ok)
    self.assertAllEqual(check.passed, [True, True, True, False, True])
    self.assertAllClose(check.abs_error[3], size * scale, rtol=0.2)
    self.assertAllClose(check.rel_error[3], size, rtol=0.2)
    with self.assertRaisesRegex(
      AssertionError,
      r"differ from central finite differences in 1 of 5 samples .*\n"
      r"  sample 3: max abs error .* > tolerance .* at \[1, 2\]: autodiff",
    ):
      check_hessians(fn, x, hessians=wrong, raise_on_failure=True)
    # A float32 `fn` may compute in float16 inside: the report says so.
    hint = "computes in float16 or bfloat16 and returns float32"
    self.assertEqual(hint in check.summary(), dtype == np.float32)

  def test_nan_fails(self):
    x = np.random.default_rng(12).normal(size=(2, 4))
    h = _sin_form_hessians(x)
    h[0, 0, 0] = np.nan
    self.assertAllEqual(
      check_hessians(_sin_form, x, hessians=h).passed, [False, True]
    )

  def test_nan_of_fn_at_a_step_is_reported(self):
    # log(x) at 1e-9: the step of x crosses 0, where log is NaN.
    def fn(x):
      return np.log(x[:, 0]) + x[:, 1] ** 3

    x = np.array([[0.5, 1.0], [1e-9, 1.0]])
    exact = np.zeros((2, 2, 2))
    exact[:, 0, 0] = -1.0 / x[:, 0] ** 2
    exact[:, 1, 1] = 6.0 * x[:, 1]
    check = tf1hess.check_hessians(fn, x, exact)
    self.assertAllEqual(check.passed, [True, False])
    self.assertTrue(np.isnan(check.rel_error[1]))
    self.assertTrue(np.isfinite(check.tolerance).all())
    summary = check.summary()
    self.assertIn("at [0, 0]: autodiff -1e+18, finite differences nan", summary)
    self.assertIn("(3 entries are NaN)", summary)
    self.assertIn("`fn` is NaN at a point the steps reach", summary)

  def test_computes_the_autodiff_hessians_itself(self):
    x = np.random.default_rng(13).normal(size=(3, 4))
    w = tf.constant(_A)
    check = check_hessians(
      lambda b: tf.einsum("ni,ij,nj->n", tf.sin(b), w, tf.sin(b)), x
    )
    self.assertTrue(check.ok)
    self.assertAllClose(check.hessians, _sin_form_hessians(x))

  def test_failure_report_lists_worst_first(self):
    x = np.random.default_rng(14).normal(size=(8, 4))
    wrong = _sin_form_hessians(x)
    wrong[2] += 0.5
    wrong[6] += 5.0
    wrong[7] -= 1.0
    report = check_hessians(_sin_form, x, hessians=wrong).summary(max_samples=2)
    self.assertRegex(
      report, r"in 3 of 8 samples[^\n]*\n  sample 6:.*\n  sample 7:.*\n.*1 more"
    )

  def test_tolerances_can_be_set(self):
    x = np.random.default_rng(15).normal(size=(3, 4))
    wrong = _sin_form_hessians(x) + 1e-3
    self.assertFalse(check_hessians(_sin_form, x, hessians=wrong).ok)
    loose = check_hessians(_sin_form, x, hessians=wrong, atol=2e-3)
    self.assertTrue(loose.ok)
    self.assertAllClose(loose.tolerance, np.full(3, 2e-3), rtol=0.01)

  @parameterized.named_parameters(
    ("float16", tf.float16, None, "float16"),
    ("bfloat16", tf.bfloat16, None, "bfloat16"),
    ("float32_as_float16", tf.float32, np.float16, "float16"),
  )
  def test_half_precision_cannot_be_checked(self, dtype, precision, name):
    # There the default rtol is 3.1 (float16) or 8.8 (bfloat16): Hessians
    # negated, zeros or doubled passed.
    x = tf.constant(np.random.default_rng(16).normal(size=(4, 3)), dtype)

    def fn(b):
      return tf.reduce_sum(tf.sin(b) ** 3, axis=1)

    wrong = -np.ones((4, 3, 3))
    with self.assertRaisesRegex(
      ValueError, rf"`fn` computes in {name} .*a Hessian off by its own size"
    ):
      check_hessians(fn, x, hessians=wrong, precision=precision)
    # Tolerances given: the caller's choice.
    check = check_hessians(
      fn, x, hessians=wrong, rtol=0.2, atol=0.0, precision=precision
    )
    self.assertFalse(check.ok)

  @parameterized.named_parameters(
    ("float16", tf.float16, 0.1), ("bf16", tf.bfloat16, 1.0)
  )
  def test_half_precision_x_of_a_float64_fn(self, dtype, size):
    # The step is 8 eps of x, far above float64's eps^(1/4): the tolerance
    # counts its truncation error (rtol 6e-3 and 0.39), where exact
    # Hessians failed.
    x = tf.constant(np.random.default_rng(17).normal(size=(5, 4)), dtype)
    x = x.numpy()

    def fn(b):
      return _sin_form(np.asarray(b, np.float64))

    exact = _sin_form_hessians(x)
    check = check_hessians(fn, x, hessians=exact)
    self.assertTrue(check.ok, check.summary())
    wrong = exact.copy()
    wrong[2, 1, 3] += size * np.abs(exact[2]).max()
    self.assertAllEqual(
      check_hessians(fn, x, hessians=wrong).passed, [1, 1, 0, 1, 1]
    )

  def test_numpy_bfloat16_batch(self):
    # numpy does not count bfloat16 (of ml_dtypes) as floating.
    x = tf.constant(np.random.default_rng(18).normal(size=(3, 2)), tf.bfloat16)

    def fn(b):
      return tf.reduce_sum(b**3, axis=1)

    h = tf1hess.eager.batch_hessians(fn, x.numpy())
    self.assertEqual(h.dtype, tf.bfloat16)
    exact = np.einsum("ni,ij->nij", 6 * x.numpy().astype(float), np.eye(2))
    self.assertAllClose(tf.cast(h, tf.float64), exact, rtol=1e-2, atol=0)
    g = tf1hess.eager.batch_gradients(fn, x.numpy())
    exact = 3 * x.numpy().astype(float) ** 2
    self.assertAllClose(tf.cast(g, tf.float64), exact, rtol=1e-2, atol=0)
    check = check_hessians(fn, x.numpy(), rtol=0.1, atol=0.0)
    self.assertTrue(check.ok, check.summary())


class RealModelsTest(tf.test.TestCase, parameterized.TestCase):
  """`check_hessians` on models built the way TF1 code builds them."""

  def _check_graph_model(
    self,
    build,
    x_shape,
    n=3,
    seed=0,
    dtype=tf.float64,
    labels=None,
    precision=None,
  ):
    """Builds `y = build(x[, labels])` on placeholders; checks batch_hessians.

    `labels` (N, ...) are fed to a placeholder, tiled to the rows of each
    call, as per-sample side inputs are in training code.
    """
    with tf.Graph().as_default():
      tf.compat.v1.set_random_seed(seed)
      x = tf.compat.v1.placeholder(dtype, [None] + x_shape)
      if labels is None:
        y, feed = build(x), {}
      else:
        ph = tf.compat.v1.placeholder(labels.dtype, (None,) + labels.shape[1:])
        y, feed = build(x, ph), {ph: labels}
      h = tf1hess.batch_hessians(y, x)
      x_val = np.random.default_rng(seed).normal(size=[n] + x_shape)
      x_val = x_val.astype(dtype.as_numpy_dtype)

      def fn(b):
        copies = len(b) // n
        tiled = {
          k: np.tile(v, (copies,) + (1,) * (v.ndim - 1))
          for k, v in feed.items()
        }
        return sess.run(y, {x: b, **tiled})

      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        h_val = sess.run(h, {x: x_val, **feed})
        return check_hessians(fn, x_val, hessians=h_val, precision=precision)

  @parameterized.named_parameters(
    ("tanh", tf.tanh), ("softplus", tf.nn.softplus), ("elu", tf.nn.elu)
  )
  def test_dense_stack(self, activation):
    def build(x):
      h = tf.compat.v1.layers.dense(x, 16, activation=activation)
      h = tf.compat.v1.layers.dense(h, 8, activation=tf.tanh)
      return tf.compat.v1.layers.dense(h, 1)

    check = self._check_graph_model(build, [5])
    self.assertTrue(check.ok, check.summary())
    self.assertGreater(np.abs(check.hessians).max(), 1e-3)

  def test_dense_stack_float32(self):
    def build(x):
      h = tf.compat.v1.layers.dense(x, 16, activation=tf.tanh)
      return tf.compat.v1.layers.dense(h, 1)

    check = self._check_graph_model(build, [4], dtype=tf.float32)
    self.assertTrue(check.ok, check.summary())

  def test_conv_net(self):
    def build(x):
      h = tf.compat.v1.layers.conv2d(
        x, 4, 3, padding="same", activation=tf.tanh
      )
      h = tf.compat.v1.layers.max_pooling2d(h, 2, 2)
      h = tf.compat.v1.layers.dense(tf.compat.v1.layers.flatten(h), 8, tf.tanh)
      return tf.compat.v1.layers.dense(h, 1)

    check = self._check_graph_model(build, [4, 4, 1], n=2)
    self.assertEqual(check.hessians.shape, (2, 4, 4, 1, 4, 4, 1))
    self.assertTrue(check.ok, check.summary())

  def test_lstm_static_rnn(self):
    def build(x):
      cell = tf.compat.v1.nn.rnn_cell.LSTMCell(6)
      inputs = tf.unstack(x, axis=1)
      outputs, _ = tf.compat.v1.nn.static_rnn(cell, inputs, dtype=tf.float64)
      return tf.compat.v1.layers.dense(outputs[-1], 1)

    check = self._check_graph_model(build, [3, 2])
    self.assertTrue(check.ok, check.summary())

  def test_lstm_dynamic_rnn_under_control_flow_v2(self):
    tf.compat.v1.enable_control_flow_v2()

    def build(x):
      cell = tf.compat.v1.nn.rnn_cell.LSTMCell(5)
      outputs, _ = tf.compat.v1.nn.dynamic_rnn(cell, x, dtype=tf.float64)
      return tf.compat.v1.layers.dense(outputs[:, -1], 1)

    check = self._check_graph_model(build, [3, 2])
    self.assertTrue(check.ok, check.summary())

  @parameterized.named_parameters(
    ("softmax", "softmax"),
    ("sparse_softmax", "sparse_softmax"),
    ("sigmoid", "sigmoid"),
    ("mean_squared", "mean_squared"),
    ("huber", "huber"),
    ("nn_softmax", "nn_softmax"),
  )
  def test_losses_of_a_network(self, kind):
    # tf.compat.v1.losses compute in float32 whatever the model's dtype:
    # softmax, sparse and sigmoid cast the float32 loss back to float64,
    # mean_squared and huber return float32.
    labels = np.eye(3)[[0, 2, 1]]
    none = tf.compat.v1.losses.Reduction.NONE

    def build(x, labels):
      h = tf.compat.v1.layers.dense(x, 8, activation=tf.tanh)
      out = tf.compat.v1.layers.dense(h, 3)
      if kind == "nn_softmax":
        return tf.nn.softmax_cross_entropy_with_logits(labels, out)
      if kind == "softmax":
        return tf.compat.v1.losses.softmax_cross_entropy(
          labels, out, reduction=none
        )
      if kind == "sparse_softmax":
        return tf.compat.v1.losses.sparse_softmax_cross_entropy(
          tf.argmax(labels, 1), out, reduction=none
        )
      if kind == "sigmoid":
        return tf.compat.v1.losses.sigmoid_cross_entropy(
          labels, out, reduction=none
        )
      if kind == "mean_squared":
        return tf.compat.v1.losses.mean_squared_error(
          labels, out, reduction=none
        )
      return tf.compat.v1.losses.huber_loss(
        labels, out, delta=10.0, reduction=none
      )

    precision = None if kind == "nn_softmax" else np.float32
    check = self._check_graph_model(
      build, [4], labels=labels, precision=precision
    )
    self.assertTrue(check.ok, check.summary())

  def test_hidden_float32_is_pointed_out(self):
    labels = np.eye(3)[[0, 2, 1]]

    def build(x, labels):
      out = tf.compat.v1.layers.dense(x, 3, activation=tf.tanh)
      return tf.compat.v1.losses.softmax_cross_entropy(
        labels, out, reduction=tf.compat.v1.losses.Reduction.NONE
      )

    check = self._check_graph_model(build, [4], labels=labels)
    self.assertFalse(check.ok)
    self.assertRegex(
      check.summary(), r"all float32 numbers.*pass precision=np.float32"
    )


class TrapsTest(tf.test.TestCase, parameterized.TestCase):
  """What autodiff and finite differences give at the documented traps."""

  @parameterized.named_parameters(
    ("v2", tf.nn.softmax_cross_entropy_with_logits),
    (
      "sparse",
      lambda labels, logits: tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.argmax(labels, 1), logits
      ),
    ),
  )
  def test_softmax_cross_entropy_is_right(self, loss):
    labels = tf.constant(np.eye(3)[[1, 0, 2, 2]])
    logits = np.random.default_rng(16).normal(size=(4, 3)) * 2.0

    def fn(z):
      # Finite differences call fn on whole copies of the batch.
      return loss(tf.tile(labels, [z.shape[0] // 4, 1]), z)

    check = check_hessians(fn, logits)
    self.assertTrue(check.ok, check.summary())
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    self.assertAllClose(check.hessians, expected)

  def test_reduce_prod_at_zero_is_caught(self):
    # TensorFlow 2.21's second derivative of reduce_prod is wrong where an
    # input is 0 (tensorflow issue 21130), that of the rows too; finite
    # differences are exact, and so is auto (the forward engine).
    x = np.array([[0.0, 2.0, 3.0], [0.5, 2.0, 3.0], [0.0, 0.0, 3.0]])

    def prod(b):
      return tf.reduce_prod(b, axis=1)

    rows = tf1hess.eager.batch_hessians(prod, x, method="while_loop")
    check = check_hessians(prod, x, rows.numpy())
    self.assertAllEqual(check.passed, [False, True, False])
    auto = check_hessians(prod, x)
    self.assertTrue(auto.ok, auto.summary())
    self.assertAllClose(auto.hessians, auto.fd_hessians, atol=1e-8)
    expected = np.array(
      [
        [[0, 3, 2], [3, 0, 0], [2, 0, 0]],
        [[0, 3, 2], [3, 0, 0.5], [2, 0.5, 0]],
        [[0, 3, 0], [3, 0, 0], [0, 0, 0]],
      ]
    )
    self.assertAllClose(check.fd_hessians, expected, atol=1e-8)
    self.assertAllClose(check.hessians[1], expected[1])

  def test_relu_kink(self):
    # Autodiff: 0 everywhere. Finite differences: 1 / h at a kink (the jump
    # of the first derivative over a step h), 0 away from kinks.
    x = np.array([[0.0, 2.0, -3.0], [1.0, 2.0, -3.0]])
    check = check_hessians(lambda b: tf.reduce_sum(tf.nn.relu(b), axis=1), x)
    self.assertAllEqual(check.hessians, np.zeros((2, 3, 3)))
    self.assertAllEqual(check.passed, [False, True])
    h = 2.0**-13  # the float64 step at |x| <= 1
    self.assertAllClose(check.fd_hessians[0, 0, 0], 1.0 / h)
    self.assertAllClose(check.fd_hessians[1], np.zeros((3, 3)))

  def test_relu_network_away_from_kinks(self):
    rng = np.random.default_rng(17)
    w1, w2 = rng.normal(size=(3, 8)), rng.normal(size=(8, 1))
    x = rng.normal(size=(4, 3))
    pre = x @ w1
    self.assertGreater(np.abs(pre).min(), 1e-2)  # no kink within a step

    def fn(b):
      return tf.matmul(tf.nn.relu(tf.matmul(b, w1)), w2)

    check = check_hessians(fn, x, raise_on_failure=True)
    self.assertAllEqual(check.hessians, np.zeros((4, 3, 3)))


if __name__ == "__main__":
  tf.test.main()
