"""The forward engine walked on chunks of the batch (`forward/chunks.py`).

Chunks are forced small here (a few samples) so that batches of a dozen
samples make several chunks and a last, shorter one. Every result is
compared with the row loop (`method="while_loop"`) on the same graph, and
the models where a chunk cannot be walked alone are checked to walk the
whole batch (and to agree with the rows all the same).
"""

from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import testing_utils

import tf1hess
from tf1hess.forward import chunks
from tf1hess.forward import dispatch
from tf1hess.forward import engine
from tf1hess.forward import jacobians
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

_K = 4
_RNG = np.random.default_rng(11)


def _weights(m, n):
  return tf.constant(_RNG.normal(size=(m, n)) / np.sqrt(m))


def _mlp(x, activation=tf.tanh):
  h = x
  for m, n in [(_K, 6), (6, 6)]:
    h = activation(tf.matmul(h, _weights(m, n)) + 0.1)
  return tf.matmul(h, _weights(6, 1))


def _dense_layers(x):
  h = x
  for i in range(2):
    h = tf.compat.v1.layers.dense(
      h,
      5,
      activation=tf.nn.softplus,
      name=f"chunked_dense{i}",
      kernel_initializer=tf.compat.v1.glorot_normal_initializer(seed=i),
    )
  return tf.compat.v1.layers.dense(h, 1, name="chunked_out")


def _reshaped(x):
  # Reshapes by the run-time batch size, as `tf.shape(h)[0]`.
  h = tf.tanh(tf.matmul(x, _weights(_K, 6)))
  h = tf.reshape(h, tf.stack([tf.shape(h)[0], 2, 3]))
  return tf.reduce_sum(tf.nn.softmax(h, axis=1) ** 2, axis=[1, 2])


def _masked(x):
  # A comparison of the input's values, a mask made like the input, and
  # labels made from the batch size.
  h = tf.matmul(x, _weights(_K, 3))
  h = tf.where(h > 0.0, h, 0.1 * h**3)
  ce = tf.nn.sigmoid_cross_entropy_with_logits(
    labels=0.3 * tf.ones_like(h), logits=h
  )
  labels = tf.zeros(tf.shape(x)[:1], tf.int32)
  sparse = tf.nn.sparse_softmax_cross_entropy_with_logits(
    labels=labels, logits=tf.sin(h)
  )
  held = tf.reduce_sum(tf.stop_gradient(h) * h**2, axis=1)
  return tf.reduce_sum(ce, axis=1) + sparse + held


def _added_to_itself(x):
  squares = tf.reduce_sum(x * x, axis=1, keepdims=True)
  h = tf.matmul(squares, _weights(1, 3)) + tf.constant([0.1, 0.2, 0.3], x.dtype)
  return tf.reduce_sum(tf.tanh(h + h), axis=1)


_CHUNKED = {
  "tanh_mlp": _mlp,
  "silu_mlp": lambda x: _mlp(x, tf.nn.silu),
  "layers_dense": _dense_layers,
  "reshaped": _reshaped,
  "masked": _masked,
  # `tf.tensordot` sets static shapes that its ops do not infer.
  "tensordot": lambda x: tf.reduce_sum(
    tf.reshape(
      tf.tanh(
        tf.tensordot(tf.reshape(tf.sin(x), [-1, 2, 2]), _weights(2, 3), 1)
      ),
      [-1, 6],
    )[:, :_K]
    * x,
    axis=1,
  ),
  "rank3": lambda x: tf.reduce_sum(
    tf.sin(tf.reshape(x, [-1, 2, 2])) ** 3, axis=[1, 2]
  ),
  "added_to_itself": _added_to_itself,
  # Powers by constant exponents, which the chunks copy: a cube, squares.
  "approximate_gelu": lambda x: _mlp(
    x, lambda u: tf.nn.gelu(u, approximate=True)
  ),
  "squares": lambda x: (
    tf.reduce_sum(_mlp(x, lambda u: tf.tanh(u) + 0.1 * u**2), 1)
    + tf.reduce_sum(tf.exp(-((x[:, None, :] - _weights(3, _K)) ** 2)), [1, 2])
  ),
  # Each sample's entry of class 1, by indices made from the batch size:
  # a chunk's copy gathers its own rows.
  "picked_class": lambda x: (
    -tf.gather_nd(
      tf.nn.log_softmax(tf.tanh(tf.matmul(x, _weights(_K, 4)))),
      tf.stack([tf.range(tf.shape(x)[0]), tf.fill(tf.shape(x)[:1], 1)], 1),
    )
  ),
}


def _mean_over_batch(x):
  return tf.reduce_mean(tf.tanh(_mlp(x)))


def _count_divided(x):
  h = tf.tanh(_mlp(x))
  return h / tf.cast(tf.shape(x)[0], x.dtype)


_WHOLE = {
  # A sum over the batch axis: its mean's divisor counts the samples.
  "mean_over_batch": _mean_over_batch,
  # The batch size as a number.
  "count_divided": _count_divided,
  # Ops of the input's values that are not walked (after `stop_gradient`)
  # and not elementwise.
  "held_slice": lambda x: tf.stop_gradient(x)[:, 0] * tf.sin(x[:, 1]) ** 2,
  # Random numbers: a chunk would draw others.
  "dropout": lambda x: tf.compat.v1.nn.dropout(tf.tanh(_mlp(x)), rate=0.5),
}


def _chunked(graph):
  return any("/chunks" in op.name for op in graph.get_operations())


class ChunksTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_chunks_agree_with_the_rows16",
    "test_derivatives_with_respect_to_weights0",
  )

  def setUp(self):
    super().setUp()
    patches = [
      mock.patch.object(chunks, "CHUNK_BYTES", 1),
      mock.patch.object(chunks, "MIN_CHUNK", 4),
    ]
    for patch in patches:
      patch.start()
      self.addCleanup(patch.stop)

  def _run(self, model, cf, method, batch=None, ns=(11, 4, 0)):
    """The engine's and the rows' Hessians, diagonals and Laplacians."""
    self.control_flow(cf)
    shape = [_K] if model != "rank3" else [2, 2]
    fn = {**_CHUNKED, **_WHOLE}[model]
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [batch] + shape)
      y = fn(x)
      ops = [
        tf1hess.batch_hessians(y, x, method=method),
        tf1hess.batch_hessian_diagonals(y, x, method=method),
        tf1hess.batch_laplacians(y, x, method=method),
        tf1hess.batch_hessians(y, x, method="while_loop"),
      ]
      results = []
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        for n in ns if batch is None else [batch]:
          feed = {x: _RNG.normal(size=[n] + shape)}
          results.append(sess.run(ops, feed))
    for h, d, lap, rows in results:
      k = int(np.prod(shape))
      rows = rows.reshape(-1, k, k)
      self.assertAllClose(h.reshape(-1, k, k), rows, atol=1e-10)
      self.assertAllClose(d.reshape(-1, k), np.einsum("nii->ni", rows))
      self.assertAllClose(lap, np.einsum("nii->n", rows), atol=1e-10)
    return graph

  @parameterized.parameters(
    testing_utils.in_turn(model=list(_CHUNKED), method=["forward", "auto"])
  )
  def test_chunks_agree_with_the_rows(self, model, cf, method):
    graph = self._run(model, cf, method)
    if method == "forward":
      self.assertTrue(_chunked(graph))

  @parameterized.product(model=["tanh_mlp", "layers_dense"], cf=[1, 2])
  def test_products_of_weights_are_built_outside_the_loop(self, model, cf):
    # x's Jacobian, the first layer's weights, their products for the
    # second layer (`_folded_matmul`) and for the first layer's curvature:
    # computed once per run, before the chunks' loop.
    hoisted = []
    built = jacobians.Hoisting.built

    def record(hoisting, value):
      hoisted.append(value)
      return built(hoisting, value)

    with mock.patch.object(jacobians.Hoisting, "built", record):
      graph = self._run(model, cf, "forward")
    self.assertTrue(_chunked(graph))
    self.assertGreaterEqual(len(hoisted), 4)
    for t in hoisted:
      self.assertIs(t.graph, graph)
      self.assertFalse(control_flow_util.IsInWhileLoop(t.op), t.name)

  @parameterized.product(
    model=["approximate_gelu", "squares"], cf=[1, 2], batch=[None, 7]
  )
  def test_no_pow_kernel_for_a_constant_exponent(self, model, cf, batch):
    # The walk's derivatives and adjoint of `u ** 3` take the exponent as a
    # number, in chunks (`batch` None) and in a walk of the whole batch
    # (7 samples, under two chunks): the `Pow` kernel costs tens of
    # products per entry. The chunks also copy the exponent into their
    # loop, where TensorFlow's graph optimizers then take the model's own
    # `u ** 3` by products, as they do outside the loop.
    self.control_flow(cf)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [batch, _K])
      y = _CHUNKED[model](x)
      lap = tf1hess.batch_laplacians(y, x, method="forward")
      metadata = tf.compat.v1.RunMetadata()
      with tf.compat.v1.Session() as sess:
        sess.run(
          lap,
          {x: _RNG.normal(size=(batch or 11, _K))},
          options=tf.compat.v1.RunOptions(trace_level=3),
          run_metadata=metadata,
        )
    self.assertEqual(_chunked(graph), batch is None)
    labels = [
      node.timeline_label
      for device in metadata.step_stats.dev_stats
      for node in device.node_stats
    ]
    self.assertEqual(any("chunks" in label for label in labels), batch is None)
    self.assertEmpty([label for label in labels if "= Pow(" in label])

  @parameterized.parameters(1, 2)
  def test_derivatives_with_respect_to_weights(self, cf):
    # A loss on the Hessians and Laplacians, differentiated for training:
    # through the chunks' loop and the products of weights outside it as
    # through the rows.
    self.control_flow(cf)
    with tf.Graph().as_default() as graph:
      weights = [_weights(_K, 6), _weights(6, 5), _weights(5, 1)]
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = x
      for w in weights[:2]:
        h = tf.tanh(tf.matmul(h, w) + 0.1)
      y = tf.matmul(h, weights[2])
      y += 0.1 * y**3  # A constant exponent: its own derivatives and adjoint.
      losses = []
      for method in ("forward", "while_loop"):
        hess = tf1hess.batch_hessians(y, x, method=method)
        lap = tf1hess.batch_laplacians(y, x, method=method)
        if method == "while_loop":
          lap = tf.linalg.trace(hess)
        losses.append(
          tf.reduce_sum(tf.square(hess)) + tf.reduce_sum(tf.sin(lap))
        )
      grads = [tf.gradients(loss, weights) for loss in losses]
      self.assertTrue(_chunked(graph))
      with tf.compat.v1.Session() as sess:
        for n in (11, 4):
          got, want = sess.run(grads, {x: _RNG.normal(size=(n, _K))})
          for g, w in zip(got, want):
            self.assertAllClose(g, w, atol=1e-10)

  @parameterized.parameters(1, 2)
  def test_a_tensor_added_to_itself(self, cf):
    # `h + h` after a layer of one feature: under control flow v2,
    # TensorFlow 2.21 lost the chunks' loop ("Retval[0] does not have
    # value") where the copy kept the sum.
    self.assertTrue(_chunked(self._run("added_to_itself", cf, "forward")))

  @parameterized.product(model=list(_WHOLE), cf=[1, 2])
  def test_samples_that_a_chunk_would_change_walk_whole(self, model, cf):
    graph = self._run(model, cf, "forward")
    self.assertFalse(_chunked(graph))

  def test_static_batch(self):
    self.assertTrue(_chunked(self._run("tanh_mlp", 2, "forward", batch=9)))
    # Fewer than two chunks: one walk.
    self.assertFalse(_chunked(self._run("tanh_mlp", 2, "forward", batch=7)))

  @parameterized.parameters(1, 2)
  def test_no_cond_for_rows_of_small_batches_only(self, cf):
    # Rows under 8 samples and the engine in chunks above: the engine for
    # every N, with no cond (chunks ran slower inside one). The engine
    # under 8 and the rows above: the cond stays.
    for engine_first, cond in [(False, False), (True, True)]:
      choice = dispatch.Choice(engine_first, 8)
      with mock.patch.object(dispatch, "choose", return_value=choice):
        graph = self._run("tanh_mlp", cf, "auto")
      ops = graph.get_operations()
      self.assertEqual(any("by_batch_size" in op.name for op in ops), cond)
      if not cond:  # (Under v2, a cond's ops are in its branch functions.)
        self.assertTrue(_chunked(graph))

  def test_tf1_shapes(self):
    # `disable_v2_behavior` makes dimensions `Dimension` objects.
    tf.compat.v1.disable_v2_tensorshape()
    self.addCleanup(tf.compat.v1.enable_v2_tensorshape)
    self.assertTrue(_chunked(self._run("tanh_mlp", 1, "forward")))

  def test_another_input_with_the_batch_axis_walks_whole(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      y = _mlp(x * tf.exp(t))
      h = tf1hess.batch_hessians(y, x, method="forward")
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        feed = {x: _RNG.normal(size=(9, _K)), t: _RNG.normal(size=(9, 1))}
        self.assertAllClose(*sess.run([h, rows], feed))
    self.assertFalse(_chunked(graph))

  def test_no_chunks_where_a_gpu_is_visible(self):
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    with mock.patch.object(
      tf.config, "list_physical_devices", return_value=[gpu]
    ):
      graph = self._run("tanh_mlp", 2, "forward")
    self.assertFalse(_chunked(graph))

  def test_float32_mlp_against_the_analytic_hessian(self):
    weights = testing_utils.mlp_weights(_K, hidden=7)
    x_val = _RNG.normal(size=(10, _K)).astype(np.float32)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K])
      y = testing_utils.tanh_mlp(x, *weights)
      h = tf1hess.batch_hessians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        out = sess.run(h, {x: x_val})
    self.assertTrue(_chunked(graph))
    expected = testing_utils.tanh_mlp_hessians(x_val, *weights)
    self.assertAllClose(out, expected, atol=1e-5, rtol=1e-4)

  def test_eager_forward_in_chunks(self):
    x = tf.constant(_RNG.normal(size=(10, _K)))
    w1, w2 = _RNG.normal(size=(_K, 6)), _RNG.normal(size=(6, 1))

    def fn(v):
      return tf.reduce_sum(tf.tanh(tf.matmul(tf.tanh(v @ w1), w2)), axis=1)

    planned = []

    def plan(*args):
      planned.append(chunks_plan(*args))
      return planned[-1]

    chunks_plan = chunks.plan
    with mock.patch.object(chunks, "plan", plan):
      h = tf1hess.eager.batch_hessians(fn, x, method="forward")
    self.assertIsNotNone(planned[-1])
    self.assertAllClose(h, testing_utils.tape_hessians(fn, x), atol=1e-10)

  def test_small_jacobians_walk_whole(self):
    # At the default sizes: 16 features through 64 units make 4 KiB per
    # sample (chunks of 512); 2 through 8, 64 bytes (a chunk would be more
    # than MAX_CHUNK samples). Where no chunk can be made, no walk of a copy
    # plans them (`dispatch.dry_run`).
    with mock.patch.object(chunks, "CHUNK_BYTES", 2**21):
      with mock.patch.object(chunks, "MIN_CHUNK", 128):
        for k, units, made in [(16, 64, True), (2, 8, False)]:
          with tf.Graph().as_default() as graph:
            x = tf.compat.v1.placeholder(tf.float32, [None, k])
            w = tf.constant(_RNG.normal(size=(k, units)), tf.float32)
            y = tf.reduce_sum(tf.tanh(tf.matmul(x, w)), axis=1)
            with mock.patch.object(
              dispatch, "dry_run", wraps=dispatch.dry_run
            ) as dry_run:
              tf1hess.batch_hessians(y, x, method="forward")
          self.assertEqual(_chunked(graph), made)
          self.assertEqual(dry_run.call_count, int(made))

  def test_chunk_size(self):
    with mock.patch.object(chunks, "CHUNK_BYTES", 2**16):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8])
        y = tf.tanh(tf.matmul(x, tf.ones([8, 32])))
        path = engine.path_ops(x, [y])
        size = chunks._chunk_size(x, path)  # pylint: disable=protected-access
    # The largest Jacobian, (size, 8, 32) floats, near CHUNK_BYTES.
    self.assertBetween(
      size * 8 * 32 * 4, 2**16 / np.sqrt(2), 2**16 * np.sqrt(2)
    )

  def test_chunks_are_sized_by_the_jacobians_written(self):
    # Distances of 32 features to 8 centres: the (N, 8, 8, 32) Jacobians of
    # the differences stay unwritten products; the largest written one is
    # the features' (N, 8, 32), which sets the size.
    k, centres, m = 8, 8, 32
    with mock.patch.object(chunks, "CHUNK_BYTES", 2**20):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, k])
        h = tf.tanh(tf.matmul(x, tf.ones([k, m])))
        d = h[:, None, :] - tf.ones([centres, m])
        y = tf.reduce_sum(tf.exp(-tf.reduce_sum(tf.square(d), -1)), -1)
        walked = dispatch.dry_run([y], x, jacobians.HESSIAN)
        self.assertEqual(walked.work.largest, k * m)
        planned = chunks.plan(x, [y], walked)
        path = engine.path_ops(x, [y])
        static = chunks._chunk_size(x, path)  # pylint: disable=protected-access
    self.assertEqual(planned.size, 2**20 // (k * m * 4))
    self.assertEqual(static, 2**20 // (k * centres * m * 4))


if __name__ == "__main__":
  tf.test.main()
