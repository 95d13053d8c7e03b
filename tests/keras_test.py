"""Keras models: graph-mode Keras 2, eager models of both generations, and
the BatchDerivatives layers.

Keras 2 is `tf.keras` on TensorFlow <= 2.15 and `tf_keras` on >= 2.16;
Keras 3 exists from TensorFlow 2.16 on: its cases are skipped before.

References: the closed-form derivatives of a tanh network computed from the
model's own weights (testing_utils), zeros for linear models, and central
finite differences (tf1hess.finite_differences, which only evaluates).
"""

import os
import subprocess
import sys
import textwrap
import warnings

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess import keras as tfh_keras
from tf1hess.finite_differences import check_hessians

tf_keras = tfh_keras.legacy_keras()  # Keras 2: tf.keras or tf_keras.
try:
  keras = tfh_keras.keras3()
except ImportError:
  keras = None  # TensorFlow <= 2.15.

_GENERATIONS = (("tf_keras", tf_keras), ("keras3", keras))


def _layer_class(k):
  return (
    tfh_keras.BatchDerivatives
    if k is tf_keras
    else tfh_keras.Keras3BatchDerivatives
  )


def _require(test, k):
  """Skips `test` where the Keras generation `k` is not installed (None)."""
  if k is None:
    test.skipTest("needs Keras 3 (TensorFlow >= 2.16)")


def _tanh_mlp(k, features, hidden=6, dtype="float32", seed=0):
  """`Sequential([Input, Dense(hidden, tanh), Dense(1)])`, seeded weights."""
  model = k.Sequential(
    [
      k.Input((features,), dtype=dtype),
      k.layers.Dense(hidden, activation="tanh", dtype=dtype),
      k.layers.Dense(1, dtype=dtype),
    ]
  )
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
  return model


def _weights(model, sess=None):
  """`(w1, b1, w2)` of `_tanh_mlp` for the testing_utils references.

  In graph mode, call it inside the model's graph; `sess` reads the values
  of another session than Keras' own.
  """
  values = sess.run(model.weights) if sess else model.get_weights()
  w1, b1, w2, _ = [np.asarray(w, np.float64) for w in values]
  return w1, b1, w2[:, 0]


def _values(x, w1, b1, w2, b2=0.0):
  return np.tanh(np.asarray(x, np.float64) @ w1 + b1) @ w2 + b2


def _third_derivatives(x, w1, b1, w2):
  """`sum_h w2_h tanh'''(a_h) w1[a,h] w1[b,h] w1[c,h]`, `(N, K, K, K)`."""
  t = np.tanh(np.asarray(x, np.float64) @ w1 + b1)
  third = (1.0 - t**2) * (6.0 * t**2 - 2.0) * w2
  return np.einsum("nh,ah,bh,ch->nabc", third, w1, w1, w1)


def _run_script(test, script, env):
  """Runs the Python `script` in a process of its own with `env` (TensorFlow
  quiet); asserts that it succeeds and returns what it printed."""
  result = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"),
    timeout=300,
    check=False,
  )
  test.assertEqual(result.returncode, 0, result.stderr[-3000:])
  return result.stdout


def _linear(k):
  """The classic trap: a linear model, whose Hessian is zeros."""
  return k.Sequential([k.Input((24,)), k.layers.Dense(10), k.layers.Dense(1)])


class GraphModeTest(tf.test.TestCase, parameterized.TestCase):
  """Legacy tf_keras models built in a TF1 graph and run in a session."""

  def test_linear_sequential_gives_zeros(self):
    with tf.Graph().as_default():
      model = _linear(tf_keras)
      h = tfh_keras.model_hessians(model)
      direct = tf1hess.batch_hessians(model.output, model.input)
      self.assertEqual(h.shape.as_list(), [None, 24, 24])
      sess = tf.compat.v1.keras.backend.get_session()
      x_val = np.random.default_rng(0).normal(size=(100, 24))
      out, out_direct = sess.run([h, direct], {model.input: x_val})
    self.assertAllEqual(out, np.zeros((100, 24, 24)))
    self.assertAllEqual(out_direct, np.zeros((100, 24, 24)))

  @parameterized.named_parameters(
    ("keras_session", True), ("own_session", False)
  )
  def test_tanh_mlp_matches_analytic(self, keras_session):
    x_val = np.random.default_rng(1).normal(size=(7, 4))
    with tf.Graph().as_default():
      model = _tanh_mlp(tf_keras, 4)
      h = tfh_keras.model_hessians(model)
      if keras_session:
        sess = tf.compat.v1.keras.backend.get_session()
        weights = _weights(model)
      else:
        sess = tf.compat.v1.Session()
        sess.run(tf.compat.v1.global_variables_initializer())
        weights = _weights(model, sess)
      out = sess.run(h, {model.input: x_val})
      if not keras_session:
        sess.close()
    self.assertAllClose(
      out, testing_utils.tanh_mlp_hessians(x_val, *weights), atol=1e-5
    )

  @parameterized.named_parameters(
    ("while_loop", "while_loop", None),
    ("pfor_chunks", "pfor", 2),
    ("forward", "forward", None),
  )
  def test_method_and_chunk_size_reach_the_rows(self, method, chunk_size):
    x_val = np.random.default_rng(16).normal(size=(6, 3))
    with tf.Graph().as_default():
      model = _tanh_mlp(tf_keras, 3, seed=5)
      h = tfh_keras.model_hessians(model, method=method, chunk_size=chunk_size)
      d2 = tfh_keras.model_derivatives(
        model, 2, method=method, chunk_size=chunk_size
      )
      sess = tf.compat.v1.keras.backend.get_session()
      out, out2 = sess.run([h, d2], {model.input: x_val})
      expected = testing_utils.tanh_mlp_hessians(x_val, *_weights(model))
    self.assertAllClose(out, expected, atol=1e-5)
    self.assertAllClose(out2, expected, atol=1e-5)
    with tf.Graph().as_default():
      with self.assertRaisesRegex(ValueError, r"`method` must be one of"):
        tfh_keras.model_hessians(_tanh_mlp(tf_keras, 3), method="rows")

  def test_restored_weights(self):
    path = os.path.join(self.get_temp_dir(), "model.ckpt")
    x_val = np.random.default_rng(2).normal(size=(5, 3))
    with tf.Graph().as_default():
      model = _tanh_mlp(tf_keras, 3, seed=3)
      weights = _weights(model)
      sess = tf.compat.v1.keras.backend.get_session()
      tf.compat.v1.train.Saver().save(sess, path)
    with tf.Graph().as_default():
      model = _tanh_mlp(tf_keras, 3, seed=4)  # other weights until restored
      h = tfh_keras.model_hessians(model, check_independence=True)
      with tf.compat.v1.Session() as sess:
        tf.compat.v1.train.Saver().restore(sess, path)
        out = sess.run(h, {model.input: x_val})
    self.assertAllClose(
      out, testing_utils.tanh_mlp_hessians(x_val, *weights), atol=1e-5
    )

  def test_model_derivatives_of_order_three(self):
    x_val = np.random.default_rng(5).normal(size=(4, 3))
    with tf.Graph().as_default():
      model = _tanh_mlp(tf_keras, 3, dtype="float64")
      d1 = tfh_keras.model_derivatives(model, order=1)
      d3 = tfh_keras.model_derivatives(model, order=3)
      self.assertEqual(d3.shape.as_list(), [None, 3, 3, 3])
      sess = tf.compat.v1.keras.backend.get_session()
      g, t = sess.run([d1, d3], {model.input: x_val})
      weights = _weights(model)
    self.assertAllClose(g, testing_utils.tanh_mlp_gradients(x_val, *weights))
    self.assertAllClose(t, _third_derivatives(x_val, *weights))

  def test_multiple_inputs_give_a_list(self):
    with tf.Graph().as_default():
      a, b = tf_keras.Input((2,)), tf_keras.Input((3,))
      inner = _tanh_mlp(tf_keras, 5)
      model = tf_keras.Model([a, b], inner(tf_keras.layers.concatenate([a, b])))
      h = tfh_keras.model_hessians(model)
      self.assertIsInstance(h, list)
      sess = tf.compat.v1.keras.backend.get_session()
      x_val = np.random.default_rng(6).normal(size=(3, 5))
      ha, hb = sess.run(h, {a: x_val[:, :2], b: x_val[:, 2:]})
      full = testing_utils.tanh_mlp_hessians(x_val, *_weights(inner))
    self.assertAllClose(ha, full[:, :2, :2], atol=1e-5)
    self.assertAllClose(hb, full[:, 2:, 2:], atol=1e-5)

  def test_built_outside_the_current_graph(self):
    graph = tf.Graph()
    with graph.as_default():
      model = _tanh_mlp(tf_keras, 2)
    h = tfh_keras.model_hessians(model)  # built in the model's graph
    self.assertIs(h.graph, graph)

  def test_layer_in_a_session(self):
    x_val = np.random.default_rng(7).normal(size=(6, 3))
    with tf.Graph().as_default():
      inner = _tanh_mlp(tf_keras, 3)
      x = tf_keras.Input((3,))
      outputs = tfh_keras.BatchDerivatives(inner, order=2)(x)
      model = tf_keras.Model(x, outputs)
      sess = tf.compat.v1.keras.backend.get_session()
      y, g, h = sess.run(model.outputs, {x: x_val})
      weights = _weights(inner)
      b2 = inner.get_weights()[3]
    self.assertAllClose(y[:, 0], _values(x_val, *weights, b2))
    self.assertAllClose(g, testing_utils.tanh_mlp_gradients(x_val, *weights))
    self.assertAllClose(
      h, testing_utils.tanh_mlp_hessians(x_val, *weights), atol=1e-5
    )

  def test_legacy_session_without_the_legacy_keras_variable(self):
    # From TensorFlow 2.16 on without TF_USE_LEGACY_KERAS, tf.compat.v1.keras
    # is Keras 3 (no get_session): legacy_session() is tf_keras' own, which
    # holds the model's variables.
    script = textwrap.dedent(
      """
      import numpy as np, tensorflow as tf
      import tf1hess.keras
      k = tf1hess.keras.legacy_keras()
      with tf.Graph().as_default():
        model = k.Sequential([k.Input((3,)), k.layers.Dense(4, "tanh"),
                              k.layers.Dense(1)])
        h = tf1hess.keras.model_hessians(model)
        sess = tf1hess.keras.legacy_session()
        x = np.ones((2, 3), np.float32)
        print(np.abs(sess.run(h, {model.input: x})).max() > 0,
              np.allclose(sess.run(model.output, {model.input: x}),
                          model.predict(x, verbose=0)),
              tf1hess.keras.legacy_session(model) is sess)
      """
    )
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    stdout = _run_script(self, script, env)
    self.assertEqual(stdout.split()[-3:], ["True", "True", "True"])
    with self.assertRaisesRegex(TypeError, "`model` must be a Keras 2 model"):
      tf1hess.keras.legacy_session(model=object())

  def test_script_after_disable_v2_behavior(self):
    # A TF1 script: global graph mode and control flow v1, in its own
    # process (the mode is global).
    out = os.path.join(self.get_temp_dir(), "out.npz")
    script = textwrap.dedent(
      f"""
      import numpy as np, tensorflow as tf
      tf.compat.v1.disable_v2_behavior()
      from tf1hess import keras as tfh_keras
      tf_keras = tfh_keras.legacy_keras()
      model = tf_keras.Sequential([
          tf_keras.Input((3,)),
          tf_keras.layers.Dense(6, activation="tanh"),
          tf_keras.layers.Dense(1)])
      h = tfh_keras.model_hessians(model)
      x = tf_keras.Input((3,))
      outer = tf_keras.Model(x, tfh_keras.BatchDerivatives(model, order=3)(x))
      path = {os.path.join(self.get_temp_dir(), "outer.h5")!r}
      outer.save(path)
      loaded = tf_keras.models.load_model(path)
      sess = tf.compat.v1.keras.backend.get_session()
      x_val = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
      np.savez({out!r}, x=x_val, h=sess.run(h, {{model.input: x_val}}),
               *model.get_weights(), *loaded.predict(x_val))
      """
    )
    _run_script(self, script, dict(os.environ))
    data = np.load(out)
    x_val = data["x"]
    w1, b1, w2, b2 = [data[f"arr_{i}"].astype(np.float64) for i in range(4)]
    weights = (w1, b1, w2[:, 0])
    hessians = testing_utils.tanh_mlp_hessians(x_val, *weights)
    self.assertAllClose(data["h"], hessians, atol=1e-5)
    y, g, h, t = [data[f"arr_{i}"] for i in range(4, 8)]
    self.assertAllClose(y[:, 0], _values(x_val, *weights, b2[0]), atol=1e-5)
    self.assertAllClose(g, testing_utils.tanh_mlp_gradients(x_val, *weights))
    self.assertAllClose(h, hessians, atol=1e-5)
    self.assertAllClose(t, _third_derivatives(x_val, *weights), atol=1e-4)

  def test_errors(self):
    with self.assertRaisesRegex(
      TypeError, r"`model` must be a Keras 2 .* Model .*; saw int\."
    ):
      tfh_keras.model_hessians(3)
    if keras is not None:
      with self.assertRaisesRegex(
        ValueError,
        r"`model` is a Keras 3 model, which has no graph mode; use "
        r"tf1hess.eager.batch_hessians\(model, x\)",
      ):
        tfh_keras.model_hessians(_tanh_mlp(keras, 2))
    with self.assertRaisesRegex(
      ValueError,
      r"`model` was built eagerly \(its outputs are KerasTensor, not graph "
      r"tensors\)",
    ):
      tfh_keras.model_hessians(_tanh_mlp(tf_keras, 2))
    with tf.Graph().as_default():
      deferred = tf_keras.Sequential([tf_keras.layers.Dense(1)])
      with self.assertRaisesRegex(
        ValueError, r"`model` has no symbolic inputs and outputs yet"
      ):
        tfh_keras.model_hessians(deferred)
      model = _tanh_mlp(tf_keras, 2)
      with self.assertRaisesRegex(
        ValueError, r"`order` must be a positive int; saw 0\."
      ):
        tfh_keras.model_derivatives(model, order=0)

  def test_integer_input_names_it_and_the_floating_ones(self):
    # Token ids beside features: the message names the ids and says how to
    # take the Hessians of the features, and that way matches nested
    # tf.gradients.
    layers = tf_keras.layers
    x_val = np.random.default_rng(2).normal(size=(4, 2))
    ids_val = np.array([[0, 3, 6], [1, 1, 2], [5, 4, 0], [2, 6, 3]])
    with tf.Graph().as_default():
      ids = tf_keras.Input((3,), dtype="int32", name="ids")
      feats = tf_keras.Input((2,), name="feats")
      embedded = layers.Flatten()(layers.Embedding(7, 2)(ids))
      hidden = layers.Dense(8, activation="tanh")(
        layers.Concatenate()([embedded, feats])
      )
      model = tf_keras.Model([ids, feats], layers.Dense(1)(hidden))
      for build in (tfh_keras.model_hessians, tfh_keras.model_derivatives):
        with self.assertRaisesRegex(
          ValueError,
          r"Every input of `model` must be floating.*; saw ids:0 \(int32\)\."
          r".*tf1hess.batch_hessians\(model.outputs, \[model.inputs\[i\] "
          r"for i in \[1\]\]\)",
        ):
          build(
            model, **({} if build is tfh_keras.model_hessians else {"order": 2})
          )
      h = tf1hess.batch_hessians(model.outputs, [model.inputs[1]])[0]
      (g,) = tf.gradients(tf.reduce_sum(model.output), feats)
      rows = [tf.gradients(g[:, j], feats)[0] for j in range(2)]
      sess = tf.compat.v1.keras.backend.get_session()
      feed = {ids: ids_val, feats: x_val}
      got, want = sess.run([h, tf.stack(rows, axis=1)], feed)
    self.assertAllClose(got, want, atol=1e-6)


class EagerModelsTest(tf.test.TestCase, parameterized.TestCase):
  """Models called eagerly, of both generations, as `fn` of tf1hess.eager."""

  @parameterized.named_parameters(*_GENERATIONS)
  def test_linear_sequential_gives_zeros(self, k):
    _require(self, k)
    model = _linear(k)
    x_val = np.random.default_rng(8).normal(size=(100, 24)).astype(np.float32)
    h = tf1hess.eager.batch_hessians(model, x_val)
    self.assertIsNotNone(h)
    self.assertAllEqual(h, np.zeros((100, 24, 24)))

  @parameterized.named_parameters(*_GENERATIONS)
  def test_tanh_mlp_matches_analytic(self, k):
    _require(self, k)
    model = _tanh_mlp(k, 4)
    x_val = np.random.default_rng(9).normal(size=(5, 4)).astype(np.float32)
    expected = testing_utils.tanh_mlp_hessians(x_val, *_weights(model))
    h = tf1hess.eager.batch_hessians(model, x_val)
    self.assertAllClose(h, expected, atol=1e-5)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def hessians(x):
      return tf1hess.eager.batch_hessians(model, x)

    self.assertAllClose(hessians(x_val), expected, atol=1e-5)
    self.assertAllClose(
      hessians(x_val[:2]), expected[:2], atol=1e-5
    )  # a new N, the same trace

  @parameterized.named_parameters(*_GENERATIONS)
  def test_conv_model_against_finite_differences(self, k):
    _require(self, k)
    model = k.Sequential(
      [
        k.Input((5, 2), dtype="float64"),
        k.layers.Conv1D(3, 3, activation="softplus", dtype="float64"),
        k.layers.Flatten(dtype="float64"),
        k.layers.Dense(4, activation="tanh", dtype="float64"),
        k.layers.Dense(1, dtype="float64"),
      ]
    )
    x_val = np.random.default_rng(10).normal(size=(3, 5, 2))
    h = tf1hess.eager.batch_hessians(model, x_val)
    self.assertEqual(h.shape, (3, 5, 2, 5, 2))
    check = check_hessians(model, x_val, hessians=h)
    self.assertTrue(check.ok, check.summary())


class BatchDerivativesLayerTest(tf.test.TestCase, parameterized.TestCase):
  slow_cases = ("test_outputs_match_analytic_keras3_order3",)

  def _functional(self, k, inner, order, features):
    x = k.Input((features,))
    return k.Model(x, _layer_class(k)(inner, order=order)(x))

  def _assert_matches_analytic(self, outputs, inner, x_val, order):
    weights = _weights(inner)
    self.assertLen(outputs, order + 1)
    y = np.asarray(outputs[0])
    self.assertEqual(y.shape, (len(x_val), 1))
    b2 = np.asarray(inner.get_weights()[3])
    self.assertAllClose(y[:, 0], _values(x_val, *weights, b2), atol=1e-5)
    references = [
      testing_utils.tanh_mlp_gradients,
      testing_utils.tanh_mlp_hessians,
      _third_derivatives,
    ]
    for got, reference in zip(outputs[1:], references):
      self.assertAllClose(got, reference(x_val, *weights), atol=1e-4)

  @parameterized.named_parameters(
    (f"{name}_order{order}", k, order)
    for name, k in _GENERATIONS
    for order in (1, 2, 3)
  )
  def test_outputs_match_analytic(self, k, order):
    _require(self, k)
    inner = _tanh_mlp(k, 3)
    model = self._functional(k, inner, order, 3)
    for n in (1, 6):  # the batch dimension is None
      x_val = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
      self._assert_matches_analytic(
        model.predict(x_val, verbose=0), inner, x_val, order
      )
    self._assert_matches_analytic(model(x_val), inner, x_val, order)

  @parameterized.named_parameters(*_GENERATIONS)
  def test_wraps_an_unbuilt_linear_layer(self, k):
    _require(self, k)
    dense = k.layers.Dense(1)
    model = self._functional(k, dense, 2, 4)
    x_val = np.random.default_rng(11).normal(size=(5, 4)).astype(np.float32)
    y, g, h = model.predict(x_val, verbose=0)
    kernel = np.asarray(dense.get_weights()[0])[:, 0]
    self.assertAllClose(g, np.broadcast_to(kernel, (5, 4)))
    self.assertAllEqual(h, np.zeros((5, 4, 4)))

  @parameterized.named_parameters(
    ("tf_keras_h5", tf_keras, "model.h5"),
    ("tf_keras_keras", tf_keras, "model.keras"),
    ("tf_keras_saved_model", tf_keras, "saved_model"),
    ("keras3_keras", keras, "model.keras"),
  )
  def test_saves_and_loads_with_the_model(self, k, filename):
    _require(self, k)
    inner = _tanh_mlp(k, 3, seed=12)
    model = self._functional(k, inner, 2, 3)
    x_val = np.random.default_rng(13).normal(size=(4, 3)).astype(np.float32)
    before = model.predict(x_val, verbose=0)
    path = os.path.join(self.get_temp_dir(), filename)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # .h5 is "legacy"
      model.save(path)
    # The class is found through its registration, not custom_objects.
    loaded = k.models.load_model(path, compile=False)
    layers = [la for la in loaded.layers if isinstance(la, _layer_class(k))]
    self.assertLen(layers, 1)
    self.assertEqual(layers[0].order, 2)
    after = loaded.predict(x_val, verbose=0)
    for a, b in zip(before, after):
      self.assertAllClose(a, b, rtol=0, atol=0)
    self._assert_matches_analytic(after, inner, x_val, 2)

  @parameterized.named_parameters(*_GENERATIONS)
  def test_config_round_trip(self, k):
    _require(self, k)
    plan = tf1hess.Plan(method="while_loop", unroll_max_rows=2)
    layer = _layer_class(k)(_tanh_mlp(k, 3), order=3, name="derivs", plan=plan)
    config = layer.get_config()
    self.assertEqual(config["order"], 3)
    self.assertEqual(config["name"], "derivs")
    clone = _layer_class(k).from_config(config)
    self.assertEqual(clone.order, 3)
    self.assertEqual(clone.plan, plan)
    self.assertEqual(clone.name, "derivs")
    self.assertEqual(
      [la.get_config()["units"] for la in clone.layer.layers], [6, 1]
    )
    self.assertIsNot(clone.layer, layer.layer)

  @parameterized.named_parameters(*_GENERATIONS)
  def test_weights_are_tracked_and_trainable(self, k):
    _require(self, k)
    inner = _tanh_mlp(k, 3)
    model = self._functional(k, inner, 2, 3)
    self.assertLen(model.trainable_weights, 4)
    x_val = tf.constant(
      np.random.default_rng(14).normal(size=(4, 3)), tf.float32
    )
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(model(x_val)[2]))
    grads = tape.gradient(loss, model.trainable_weights)
    # The Hessian depends on w1, b1 and w2, not on the output bias b2.
    self.assertTrue(all(g is not None for g in grads[:3]))
    self.assertGreater(float(tf.reduce_max(tf.abs(grads[0]))), 0.0)

  @parameterized.named_parameters(*_GENERATIONS)
  def test_fit_on_a_loss_of_the_laplacian(self, k):
    _require(self, k)
    # A physics-informed loss: the Laplacian of u, trained with fit.
    inner = _tanh_mlp(k, 2)
    x = k.Input((2,))
    _, _, h = _layer_class(k)(inner, order=2)(x)
    laplacian = k.layers.Lambda(lambda h: h[:, 0, 0] + h[:, 1, 1])(h)
    model = k.Model(x, laplacian)
    model.compile(optimizer=k.optimizers.SGD(0.01), loss="mse")
    x_val = np.random.default_rng(15).normal(size=(32, 2)).astype(np.float32)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # b2 gets no gradient
      history = model.fit(
        x_val, np.ones(32, np.float32), epochs=3, batch_size=32, verbose=0
      )
    losses = history.history["loss"]
    self.assertLess(losses[-1], losses[0])

  @parameterized.named_parameters(*_GENERATIONS)
  def test_errors(self, k):
    _require(self, k)
    cls = _layer_class(k)
    other = tf_keras if k is keras else keras
    other_name = "Keras 2" if k is keras else "Keras 3"
    with self.assertRaisesRegex(
      TypeError, r"`layer` must be a .* layer or model of .*; saw function of"
    ):
      cls(lambda x: x)
    if other is not None:
      with self.assertRaisesRegex(
        TypeError,
        rf"`layer` must be a .* for {cls.__name__}; saw a {other_name} "
        r"Dense: use tf1hess.keras.",
      ):
        cls(other.layers.Dense(1))
    for order in (0, 1.0, "2"):
      with self.assertRaisesRegex(
        ValueError, r"`order` must be a positive int; saw"
      ):
        cls(k.layers.Dense(1), order=order)
    with self.assertRaisesRegex(
      ValueError,
      r"`layer` \(.*\) must output one value per sample, shape \(N,\) or "
      r"\(N, 1\), for .*; saw shape \(None, 3\)\.",
    ):
      cls(k.layers.Dense(3))(k.Input((2,)))
    with self.assertRaisesRegex(
      ValueError, r"`inputs` of .* must be one tensor .*; saw 2 tensors\."
    ):
      cls(k.layers.Dense(1))([k.Input((2,)), k.Input((2,))])
    with self.assertRaisesRegex(
      ValueError, r"`order` = 5 asks for K\^5 = 1000\^5 elements per sample"
    ):
      cls(k.layers.Dense(1), order=5)(k.Input((1000,)))


if __name__ == "__main__":
  tf.test.main()
