"""The forward engine on models with loops (`forward/loops.py`).

Loops of a length known when the graph is built (`dynamic_rnn` over a
sequence of static length, `tf.scan`, `tf.map_fn`, `tf.while_loop` with a
constant bound) are walked unrolled, under control flow v2 (`While` ops)
and v1 (`Enter`/`Exit` frames). Under v2 every result is compared with the
row loop (`method="while_loop"`) on the same graph, which differentiates
the model's own loops; under v1, where TensorFlow takes no second
derivatives through loops, with float64 central differences of the
model's `tf.gradients`. That the engine's result is computed without any
loop is checked too.
"""

import shutil
import tempfile
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import testing_utils

import tf1hess
from tf1hess.forward import dispatch
from tf1hess.forward import loops

_T, _D = 4, 3  # Time steps and features of each step: K = 12.
_K = _T * _D
_RNG = np.random.default_rng(17)
_OPS = {
  "hessian": tf1hess.batch_hessians,
  "diagonal": tf1hess.batch_hessian_diagonals,
  "laplacian": tf1hess.batch_laplacians,
}


def _weights(m, n, scale=1.0):
  return tf.constant(scale * _RNG.normal(size=(m, n)) / np.sqrt(m))


def _sequence(x):
  """`x` `(N, T D)` as a batch-major sequence `(N, T, D)`."""
  return tf.reshape(x, [-1, _T, _D])


def _time_major(x):
  return tf.transpose(_sequence(x), [1, 0, 2])


def _lstm(x):
  """`dynamic_rnn` of an LSTM cell: the last output and the cell state."""
  cell = tf.compat.v1.nn.rnn_cell.LSTMCell(5, dtype=tf.float64)
  outputs, state = tf.compat.v1.nn.dynamic_rnn(
    cell, _sequence(x), dtype=tf.float64
  )
  head = tf.compat.v1.layers.dense(outputs[:, -1], 1, tf.nn.softplus)
  return head[:, 0] + tf.reduce_sum(tf.square(state.c), axis=1)


def _gru_time_major_from_a_state(x):
  """A time-major `dynamic_rnn` of a GRU cell from a state of `x`."""
  cell = tf.compat.v1.nn.rnn_cell.GRUCell(4, dtype=tf.float64)
  start = tf.tanh(tf.matmul(x, _weights(_K, 4)))
  outputs, _ = tf.compat.v1.nn.dynamic_rnn(
    cell, _time_major(x), initial_state=start, time_major=True
  )
  return tf.reduce_sum(tf.sin(tf.transpose(outputs, [1, 0, 2])), [1, 2])


def _projected_time_major(x):
  """A dense layer over the rows `(T N, D)` of the time-major steps,
  reshaped back to `(T, N, H)` for a time-major `dynamic_rnn` of an LSTM."""
  rows = tf.reshape(_time_major(x), [-1, _D])
  projected = tf.compat.v1.layers.dense(rows, 5, tf.nn.elu)
  cell = tf.compat.v1.nn.rnn_cell.LSTMCell(3, dtype=tf.float64)
  outputs, _ = tf.compat.v1.nn.dynamic_rnn(
    cell, tf.reshape(projected, [_T, -1, 5]), dtype=tf.float64, time_major=True
  )
  return tf.reduce_sum(tf.sin(outputs[-1]), axis=1)


def _stacked_cells(x):
  """Two layers of `BasicRNNCell`s (a state of nested tuples)."""
  cell = tf.compat.v1.nn.rnn_cell.MultiRNNCell(
    [tf.compat.v1.nn.rnn_cell.BasicRNNCell(4, dtype=tf.float64) for _ in "ab"]
  )
  outputs, _ = tf.compat.v1.nn.dynamic_rnn(cell, _sequence(x), dtype=tf.float64)
  return tf.reduce_sum(outputs * outputs, [1, 2])


def _scan_of_two_states(x):
  """`tf.scan` with a pair of states, one a product of the other."""
  w = _weights(_D, _D)

  def step(carry, u):
    h, c = carry
    h = tf.tanh(tf.matmul(h, w) + u)
    return h, c * tf.sigmoid(h) + u

  start = tf.zeros_like(_time_major(x)[0])
  hs, cs = tf.scan(step, _time_major(x), initializer=(start, start))
  return tf.reduce_sum(tf.exp(-(hs[-1] ** 2)) + cs[-1] * hs[-2], axis=1)


def _while_of_constant_length(x):
  """`tf.while_loop` of 3 steps of a map that reads `x` in its body."""
  w = _weights(_K, _K, 0.5)

  def body(i, h):
    return i + 1, tf.tanh(tf.matmul(h, w)) * x + 0.1 * h

  _, h = tf.while_loop(lambda i, h: i < 3, body, [tf.constant(0), x])
  return tf.reduce_sum(h * h, axis=1)


def _map_over_time(x):
  """`tf.map_fn` over the time steps, then batch-major again."""
  w = _weights(_D, 2)
  steps = tf.map_fn(
    lambda u: tf.nn.softplus(tf.matmul(u, w)) * u[:, :1], _time_major(x)
  )
  return tf.reduce_sum(tf.cos(tf.transpose(steps, [1, 0, 2])), [1, 2])


def _loss_over_time(x):
  """A loss of a `tf.scan`'s time-major states against the inputs."""
  states = tf.scan(
    lambda h, u: tf.sin(h) + tf.tanh(u) * h,
    _time_major(x),
    initializer=tf.ones_like(x[:, :_D]),
  )  # (T, N, D)
  errors = tf.math.squared_difference(states, _time_major(x))
  return tf.reduce_sum(errors * tf.nn.softplus(states), axis=[0, 2])


def _loop_in_a_loop(x):
  """A `tf.scan` whose step runs a `tf.while_loop` of 2 steps."""

  def step(h, u):
    _, out = tf.while_loop(
      lambda i, v: i < 2, lambda i, v: (i + 1, tf.sin(v) * u + v), [0, h]
    )
    return out

  hs = tf.scan(step, _time_major(x), initializer=tf.ones_like(x[:, :_D]))
  return tf.reduce_sum(tf.tanh(hs[-1]), axis=1)


def _bidirectional(x):
  """`bidirectional_dynamic_rnn` over sequences of run-time lengths (1 to
  T): each direction's loop unrolled to T, the backward one reading its
  inputs reversed by `tf.reverse_sequence`."""
  lengths = tf.range(tf.shape(x)[0]) % _T + 1
  (forward, backward), (_, last) = tf.compat.v1.nn.bidirectional_dynamic_rnn(
    tf.compat.v1.nn.rnn_cell.LSTMCell(3, dtype=tf.float64),
    tf.compat.v1.nn.rnn_cell.GRUCell(2, dtype=tf.float64),
    _sequence(x),
    sequence_length=lengths,
    dtype=tf.float64,
  )
  return tf.reduce_sum(tf.tanh(forward), [1, 2]) + tf.reduce_sum(
    backward[:, 0] * last, axis=1
  )


def _folds_in_turn(x):
  """A `tf.foldl` over the features of another's final state: under v1,
  the `TensorArray` of its elements, of a static size, is made from no
  copy, and copies are written to it."""
  first = tf.foldl(
    lambda h, u: tf.tanh(h + u),
    _time_major(x),
    initializer=tf.zeros_like(x[:, :_D]),
  )
  features = tf.transpose(first[:, :, None], [1, 0, 2])  # (D, N, 1)
  second = tf.foldl(
    lambda h, u: h * tf.sigmoid(u) + u,
    features,
    initializer=tf.ones_like(x[:, :1]),
  )
  return tf.reduce_sum(tf.sin(second), axis=1)


_MODELS = {
  "lstm": _lstm,
  "gru_time_major_from_a_state": _gru_time_major_from_a_state,
  "projected_time_major": _projected_time_major,
  "stacked_cells": _stacked_cells,
  "scan_of_two_states": _scan_of_two_states,
  "while_of_constant_length": _while_of_constant_length,
  "map_over_time": _map_over_time,
  "loss_over_time": _loss_over_time,
  "loop_in_a_loop": _loop_in_a_loop,
  "folds_in_turn": _folds_in_turn,
  "bidirectional": _bidirectional,
}
# The models of `tf.compat.v1.nn.rnn_cell` (Keras 2 on TensorFlow >= 2.16).
_CELLS = frozenset(
  [
    "lstm",
    "gru_time_major_from_a_state",
    "projected_time_major",
    "stacked_cells",
    "bidirectional",
  ]
)


def _loops_before(t, types=loops.WHILE | loops.EXIT):
  """The loops (v2 `While`s, v1 `Exit`s), or other ops of `types`, that `t`
  is computed from."""
  ops, seen, stack = [], set(), [t.op]
  while stack:
    op = stack.pop()
    if op in seen:
      continue
    seen.add(op)
    if op.type in types:
      ops.append(op)
    stack.extend(s.op for s in op.inputs)
  return ops


class LoopsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_auto_where_the_engine_is_chosen0",
    "test_keras_recurrent_layer1",
    "test_keras_recurrent_layer2",
    "test_model1",
    "test_model15",
    "test_model2",
    "test_model20",
    "test_model21",
    "test_model3",
    "test_model4",
    "test_model5",
    "test_model6",
    "test_model7",
    "test_model8",
    "test_model9",
    "test_ops_built_after_a_session_ran_the_loop0",
    "test_per_output_ops_built_after_a_session_ran_the_loop0",
    "test_sequence_lengths_known_at_run_time1",
  )

  def setUp(self):
    super().setUp()
    self.control_flow(2)

  def _expected(self, x, y):
    """`(sess, feed) ->` the Hessians of `y`: the rows' under control flow
    v2, differences of the gradient under v1. Built before a session runs
    the loop: TensorFlow's gradient of a v2 loop adds outputs to its op,
    which a session that has run it does not see."""
    if tf.compat.v1.control_flow_v2_enabled():
      h = tf1hess.batch_hessians(y, x, method="while_loop")
      return lambda sess, feed: sess.run(h, feed)
    (grad,) = tf.gradients(y, x)
    return lambda sess, feed: testing_utils.central_difference_jacobian(
      lambda v: sess.run(grad, {**feed, x: v}), feed[x]
    )

  def _model(self, name):
    if name in _CELLS:
      testing_utils.legacy_keras(self)
    x = tf.compat.v1.placeholder(tf.float64, [None, _K])
    return x, _MODELS[name](x)

  def _check(self, x, y, method="forward"):
    """The ops of `method` against `_expected`, on two batch sizes."""
    outs = {name: op(y, x, method=method) for name, op in _OPS.items()}
    expected = self._expected(x, y)
    tol = 1e-10 if tf.compat.v1.control_flow_v2_enabled() else 1e-6
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for n in (5, 1):
        feed = {x: _RNG.normal(size=(n, _K))}
        values, h = sess.run(outs, feed), expected(sess, feed)
        self.assertAllClose(values["hessian"], h, atol=tol, rtol=tol)
        self.assertAllClose(
          values["diagonal"], np.einsum("nii->ni", h), atol=tol
        )
        self.assertAllClose(
          values["laplacian"], np.einsum("nii->n", h), atol=tol
        )
    return outs

  @parameterized.product(model=list(_MODELS), cf=[1, 2])
  def test_model(self, model, cf):
    if cf == 1 and model == "loop_in_a_loop":
      self.skipTest("test_loop_in_a_v1_loop_raises")
    self.control_flow(cf)
    with tf.Graph().as_default():
      x, y = self._model(model)
      self.assertNotEmpty(_loops_before(y))
      outs = self._check(x, y)
      for out in outs.values():
        self.assertEmpty(_loops_before(out))

  # (Under `disable_control_flow_v2()` alone, Keras' own recurrent loop
  # fails to run: "Could not write to TensorArray index 0 because it has
  # already been written to".)
  @parameterized.parameters("SimpleRNN", "GRU", "LSTM")
  def test_keras_recurrent_layer(self, layer):
    keras = testing_utils.legacy_keras(self)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = getattr(keras.layers, layer)(5, dtype="float64")(_sequence(x))
      y = keras.layers.Dense(1, "softplus", dtype="float64")(h)
      self.assertNotEmpty(_loops_before(y))
      outs = self._check(x, y)
      self.assertEmpty(_loops_before(outs["hessian"]))

  @parameterized.parameters("lstm", "scan_of_two_states")
  def test_auto_where_the_engine_is_chosen(self, model):
    with tf.Graph().as_default():
      x, y = self._model(model)
      choice = dispatch.Choice(True)
      with (
        self.assertNoLogs(level="WARNING"),
        mock.patch.object(dispatch, "choose", return_value=choice),
      ):
        outs = self._check(x, y, method="auto")
      self.assertEmpty(_loops_before(outs["hessian"]))

  def _check_falls_back(self, x, y, reason, feed):
    with self.assertRaisesRegex(ValueError, reason):
      tf1hess.batch_hessians(y, x, method="forward")
    choice = dispatch.Choice(True)
    with (
      self.assertLogs(level="WARNING") as logs,
      mock.patch.object(dispatch, "choose", return_value=choice),
    ):
      auto = tf1hess.batch_hessians(y, x)
    self.assertRegex("\n".join(logs.output), "falls back to the row loop")
    rows = tf1hess.batch_hessians(y, x, method="while_loop")
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      self.assertAllClose(*sess.run([auto, rows], feed))

  @parameterized.parameters(1, 2)
  def test_function_calls_are_inlined(self, cf):
    # `tf.function`s called while the graph is built: a call in a call, a
    # captured resource variable, a constant argument.
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      v = tf.compat.v1.get_variable(
        "v", initializer=_RNG.normal(size=(_K, 5)) / 4, use_resource=True
      )

      @tf.function
      def block(h, w):
        return tf.tanh(tf.matmul(h, w)) * tf.sin(h[:, :1])

      @tf.function
      def outer(h):
        return tf.reduce_sum(block(h, v) ** 2, 1) + tf.reduce_sum(
          tf.exp(h / 4), 1
        )

      y = outer(x) + tf.reduce_sum(block(x, _weights(_K, 3)), 1)
      self.assertNotEmpty(_loops_before(y, loops.CALLS))
      outs = self._check(x, y)
      for out in outs.values():
        self.assertEmpty(_loops_before(out, loops.CALLS))

  def test_saved_model_called_in_the_graph(self):
    # A TF2 SavedModel loaded into a graph: a `StatefulPartitionedCall`
    # reading the model's variables, inlined.
    class Model(tf.Module):
      def __init__(self):
        super().__init__()
        self.w = tf.Variable(_RNG.normal(size=(_K, 6)) / 4)
        self.v = tf.Variable(_RNG.normal(size=(6, 1)) / 2)

      @tf.function(input_signature=[tf.TensorSpec([None, _K], tf.float64)])
      def __call__(self, x):
        h = tf.nn.softplus(tf.matmul(tf.tanh(tf.matmul(x, self.w)), self.v))
        return h[:, 0] + tf.reduce_sum(tf.sin(x), 1)

    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    tf.saved_model.save(Model(), path)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.saved_model.load(path)(x)
      self.assertNotEmpty(_loops_before(y, loops.CALLS))
      outs = self._check(x, y)
      self.assertEmpty(_loops_before(outs["hessian"], loops.CALLS))

  def test_loop_recorded_by_a_tape(self):
    # A tape that records the gradient of a loop makes TensorFlow wrap the
    # loop's `While` in a `PartitionedCall` (the nested tapes of
    # `tape.batch_jacobian` Hessians, in the same graph).
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
          inner.watch(x)
          y = _MODELS["lstm"](x)
        inner.gradient(y, x)
      self.assertNotEmpty(_loops_before(y, loops.CALLS))
      outs = self._check(x, y)
      self.assertEmpty(_loops_before(outs["hessian"]))

  def test_weight_gradients_by_a_tape_through_the_unrolled_copy(self):
    # A loss of the Hessians of a recurrent layer (the walk's unrolled copy
    # of its loop): a tape's gradients with respect to the weights are
    # tf.gradients' (they were None: the copy's ops were not recorded).
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      w = tf.Variable(_RNG.normal(size=(_D, 4)) / 2.0)
      u = tf.Variable(_RNG.normal(size=(4, 4)) / 2.0)

      def step(i, h):
        return i + 1, tf.tanh(tf.matmul(_sequence(x)[:, i], w) + h @ u)

      with tf.GradientTape() as tape:
        _, h = tf.while_loop(
          lambda i, h: i < _T, step, [0, tf.zeros_like(x[:, :4])]
        )
        y = tf.reduce_sum(tf.square(h), axis=1)
        loss = tf.reduce_sum(tf1hess.batch_hessians(y, x) ** 2)
      taped = tape.gradient(loss, [w, u])
      reference = tf.gradients(loss, [w, u])
      self.assertNotIn(None, taped)
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        taped, reference = sess.run(
          [taped, reference], {x: _RNG.normal(size=(3, _K))}
        )
    for a, b in zip(taped, reference):
      self.assertAllClose(a, b)

  def test_random_op_in_a_function_falls_back(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])

      @tf.function
      def noisy(h):
        return tf.tanh(tf.nn.dropout(h, rate=0.5, seed=1))

      y = tf.reduce_sum(tf.square(noisy(x)), axis=1)
      with self.assertRaisesRegex(ValueError, "random or stateful"):
        tf1hess.batch_hessians(y, x, method="forward")

  def test_loop_of_a_length_known_at_run_time_falls_back(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.compat.v1.placeholder_with_default(3, [])
      _, h = tf.while_loop(
        lambda i, h: i < steps, lambda i, h: (i + 1, tf.sin(h) * x), [0, x]
      )
      y = tf.reduce_sum(h, axis=1)
      self._check_falls_back(
        x,
        y,
        "the condition of .* is not known when the graph is built",
        {x: _RNG.normal(size=(3, _K)), steps: 2},
      )

  def _check_feeds(self, x, y, feeds):
    """`batch_hessians` of `method="forward"` against `_expected`."""
    h = tf1hess.batch_hessians(y, x, method="forward")
    self.assertEmpty(_loops_before(h))
    expected = self._expected(x, y)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for feed in feeds:
        self.assertAllClose(sess.run(h, feed), expected(sess, feed), atol=1e-6)

  @parameterized.parameters(1, 2)
  def test_sequence_lengths_known_at_run_time(self, cf):
    # The loop makes at most T iterations, each of which keeps the state
    # where the run-time condition (t < max(lengths)) has been false.
    testing_utils.legacy_keras(self)
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      lengths = tf.compat.v1.placeholder(tf.int32, [None])
      cell = tf.compat.v1.nn.rnn_cell.GRUCell(3, dtype=tf.float64)
      outputs, state = tf.compat.v1.nn.dynamic_rnn(
        cell, _sequence(x), sequence_length=lengths, dtype=tf.float64
      )
      y = tf.reduce_sum(tf.tanh(state) * state, axis=1)
      feeds = [
        {x: _RNG.normal(size=(3, _K)), lengths: v}
        for v in ([4, 2, 3], [1, 2, 2], [4, 4, 4])
      ]
      self._check_feeds(x, y, feeds)
      # The outputs: written by the iterations that run, zeros after them
      # (a TensorArray's items that no iteration wrote).
      weights = tf.range(1.0, 5.0, dtype=tf.float64)[:, None]
      y = tf.reduce_sum(tf.square(outputs) * weights, axis=[1, 2])
      self._check_feeds(x, y, feeds)

  @parameterized.parameters(1, 2)
  def test_loop_of_a_length_known_at_run_time_up_to_a_bound(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.compat.v1.placeholder(tf.int32, [])
      _, h = tf.while_loop(
        lambda i, h: i < steps,
        lambda i, h: (i + 1, tf.sin(h) * x),
        (0, x),
        maximum_iterations=3,
      )
      y = tf.reduce_sum(h * h, axis=1)
      x_val = _RNG.normal(size=(2, _K))
      self._check_feeds(x, y, [{x: x_val, steps: s} for s in (0, 2, 3, 5)])

  def test_list_growing_in_a_loop_of_a_run_time_length_falls_back(self):
    # Its length is known only at run time.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.compat.v1.placeholder(tf.int32, [])
      _, _, grown = tf.while_loop(
        lambda i, h, ta: i < steps,
        lambda i, h, ta: (i + 1, tf.sin(h) * x, ta.write(i, h)),
        (0, x, tf.TensorArray(tf.float64, size=0, dynamic_size=True)),
        maximum_iterations=3,
      )
      y = tf.reduce_sum(grown.stack() ** 2, axis=[0, 2])
      self._check_falls_back(
        x,
        y,
        # (TensorFlow 2.12 resizes the list in a cond.)
        "sets item 0 of a TensorList of 0|StatelessIf .* reads a TensorList",
        {x: _RNG.normal(size=(3, _K)), steps: 2},
      )

  def test_random_op_in_a_loop_falls_back(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      hs = tf.scan(
        lambda h, u: tf.tanh(h + tf.nn.dropout(u, rate=0.5, seed=1)),
        _time_major(x),
        initializer=tf.zeros_like(x[:, :_D]),
      )
      y = tf.reduce_sum(tf.square(hs[-1]), axis=1)
      with self.assertRaisesRegex(ValueError, "random or stateful"):
        tf1hess.batch_hessians(y, x, method="forward")

  def test_loop_in_a_v1_loop_raises(self):
    self.control_flow(1)
    with tf.Graph().as_default():
      x, y = self._model("loop_in_a_loop")
      for method in ("auto", "forward"):
        with self.assertRaisesRegex(
          ValueError,
          "control-flow-v1 tf.while_loop .* cannot follow it: .* is in a loop"
          " in a control flow v1 loop.*enable_control_flow_v2",
        ):
          tf1hess.batch_hessians(y, x, method=method)

  def test_row_loop_of_an_earlier_op_under_v1_raises(self):
    # A Laplacian of a Laplacian whose inner rows are a v1 loop: the error
    # says whose loop it is, and what to build instead.
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      u = tf.reduce_sum(tf.tanh(tf.matmul(x, _weights(2, 4))), 1)
      inner = tf1hess.batch_laplacians(u, x, method="while_loop")
      with self.assertRaisesRegex(
        ValueError,
        r"row loop of an earlier tf1hess op \(batch_laplacians/tf1hess_rows/"
        r".*method='auto', 'forward' or 'pfor'",
      ):
        tf1hess.batch_laplacians(inner, x, method="while_loop")

  def test_x_the_final_state_of_a_v1_loop(self):
    # No loop between x and ys; TensorFlow's gradients with respect to an
    # output of a v1 loop cannot be built in the rows' v1 loop.
    self.control_flow(1)
    with tf.Graph().as_default():
      p = tf.compat.v1.placeholder(tf.float64, [None, 3])
      _, x = tf.while_loop(
        lambda i, z: i < 3, lambda i, z: (i + 1, tf.tanh(z) + 0.1), [0, p]
      )
      y = tf.reduce_sum(tf.sin(x) ** 3, 1)
      (g,) = tf.gradients(y, x)
      nested = tf.stack([tf.gradients(g[:, j], x)[0] for j in range(3)], 1)
      third = tf.stack(
        [
          tf.stack([tf.gradients(nested[:, j, k], x)[0] for k in range(3)], 1)
          for j in range(3)
        ],
        1,
      )
      outs = [
        tf1hess.batch_hessians(y, x, method="while_loop"),
        tf1hess.batch_hessians(y, x),
        tf1hess.batch_derivatives(y, x, order=3),
      ]
      with tf.compat.v1.Session() as sess:
        feed = {p: _RNG.normal(size=(4, 3))}
        rows, auto, d3, want, want3 = sess.run(outs + [nested, third], feed)
    self.assertAllClose(rows, want)
    self.assertAllClose(auto, want)
    self.assertAllClose(d3, want3)

  def test_v1_loop_of_a_length_known_at_run_time_raises(self):
    self.control_flow(1)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.compat.v1.placeholder_with_default(3, [])
      _, h = tf.while_loop(
        lambda i, h: i < steps, lambda i, h: (i + 1, tf.sin(h) * x), [0, x]
      )
      with self.assertRaisesRegex(
        tf1hess.ForwardUnsupportedError,
        "cannot follow it: the condition of .* is not known",
      ):
        tf1hess.batch_hessian_diagonals(tf.reduce_sum(h, axis=1), x)

  def test_a_long_loop_is_not_unrolled(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      _, h = tf.while_loop(
        lambda i, h: i < 100, lambda i, h: (i + 1, tf.sin(h) + x), [0, x]
      )
      y = tf.reduce_sum(h * h, axis=1)
      with self.assertRaisesRegex(
        ValueError, r"more than 50 ops \(raise `tf1hess.Plan\(max_unrolled_ops"
      ):
        tf1hess.batch_hessians(
          y, x, plan=tf1hess.Plan(method="forward", max_unrolled_ops=50)
        )

  def test_the_plan_bounds_the_unrolled_copy(self):
    # 30 steps of `sin(h) + x`: under a bound of 50 ops auto takes the rows
    # through the loop, saying which bound; under the default the engine
    # follows the loop unrolled. Against the rows of the loop itself.
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      _, h = tf.while_loop(
        lambda i, h: i < 30, lambda i, h: (i + 1, tf.sin(h) + x), [0, x]
      )
      y = tf.reduce_sum(h * h, axis=1)
      want = tf1hess.batch_hessians(y, x, method="while_loop")
      with self.assertLogs(level="WARNING") as logs:
        rows = tf1hess.batch_hessians(
          y, x, plan=tf1hess.Plan(max_unrolled_ops=50)
        )
      self.assertIn("max_unrolled_ops", "".join(logs.output))
      self.assertNotEmpty(_loops_before(rows))
      walked = tf1hess.batch_hessians(y, x, method="forward")
      self.assertEmpty(_loops_before(walked))
      with tf.compat.v1.Session() as sess:
        want, rows, walked = sess.run([want, rows, walked], {x: x_val})
    self.assertAllClose(rows, want, atol=1e-12)
    self.assertAllClose(walked, want, atol=1e-10)

  @parameterized.parameters(1, 2)
  def test_ops_built_after_a_session_ran_the_loop(self, cf):
    # TensorFlow's gradient of a v2 loop adds outputs to the loop's op,
    # which a session that has run it does not see ("Connecting to invalid
    # output"); under v1 it has no second derivative of a loop. The ops
    # differentiate the model with its loops unrolled: the rows too.
    # The reference: the rows of the same model in a graph of its own.
    x_val, v_val = (_RNG.normal(size=(3, _K)) for _ in "xv")
    with tf.Graph().as_default():
      x, y = _model_of_seed(3)
      ops = (
        tf1hess.batch_hessians(y, x, method="while_loop"),
        tf1hess.batch_gradients(y, x),
      )
      with tf.compat.v1.Session() as sess:
        h, g = sess.run(ops, {x: x_val})
    self.control_flow(cf)
    with tf.Graph().as_default():
      x, y = _model_of_seed(3)
      with tf.compat.v1.Session() as sess:
        sess.run(y, {x: x_val})
        rows = dispatch.Choice(False)
        with mock.patch.object(dispatch, "choose", return_value=rows):
          outs = {name: op(y, x) for name, op in _OPS.items()}
        outs["forward"] = tf1hess.batch_hessians(y, x, method="forward")
        outs["gradient"] = tf1hess.batch_gradients(y, x)
        outs["hv"] = tf1hess.batch_hessian_vector_products(y, x, v_val)
        got = sess.run(outs, {x: x_val})
    tol = 1e-10
    self.assertAllClose(got["hessian"], h, atol=tol, rtol=tol)
    self.assertAllClose(got["forward"], h, atol=tol, rtol=tol)
    self.assertAllClose(got["diagonal"], np.einsum("nii->ni", h), atol=tol)
    self.assertAllClose(got["laplacian"], np.einsum("nii->n", h), atol=tol)
    self.assertAllClose(got["gradient"], g, atol=tol)
    self.assertAllClose(got["hv"], np.einsum("nij,nj->ni", h, v_val), atol=tol)
    # The method that differentiates the model's own loops still does.
    with tf.Graph().as_default():
      x, y = _model_of_seed(3)
      if cf == 1:
        with self.assertRaisesRegex(ValueError, "control-flow-v1"):
          tf1hess.batch_hessians(y, x, method="while_loop")
      else:
        h = tf1hess.batch_hessians(y, x, method="while_loop")
        self.assertNotEmpty(_loops_before(h))

  @parameterized.parameters(1, 2)
  def test_per_output_ops_built_after_a_session_ran_the_loop(self, cf):
    # As above, for the ops that keep outputs apart, over two inputs (the
    # joint rows); the reference: the rows of the model's own loops in a
    # graph of their own.
    feed_val = [_RNG.normal(size=(3, n)) for n in (3, 1)]

    def ops(y, xs, **method):
      d = tf1hess.Derivatives(y, xs, **method)
      return {
        "jacobian": tf1hess.batch_jacobians(y, xs, **method),
        "hessian": tf1hess.batch_output_hessians(y, xs, **method),
        "cached": d.hessian(component=1),
        "entry": d.hessian(3, 2, component=0),
      }

    with tf.Graph().as_default():
      x, t, y = _two_inputs_of_seed(5)
      want = ops(y, [x, t], method="while_loop")
      with tf.compat.v1.Session() as sess:
        want = sess.run(want, dict(zip([x, t], feed_val)))
    self.control_flow(cf)
    with tf.Graph().as_default():
      x, t, y = _two_inputs_of_seed(5)
      feed = dict(zip([x, t], feed_val))
      with tf.compat.v1.Session() as sess:
        sess.run(y, feed)
        got = sess.run(ops(y, [x, t]), feed)
    tf.nest.map_structure(
      lambda a, b: self.assertAllClose(a, b, atol=1e-10, rtol=1e-10),
      got,
      want,
    )
    with tf.Graph().as_default():
      x, t, y = _two_inputs_of_seed(5)
      if cf == 1:
        with self.assertRaisesRegex(ValueError, "control-flow-v1"):
          tf1hess.batch_output_hessians(y, [x, t], method="while_loop")

  @parameterized.parameters(
    tf1hess.Plan(unroll_max_rows=1),  # Auto would take the rows' loop.
    tf1hess.Plan(method="while_loop"),
    tf1hess.Plan(method="pfor"),
  )
  def test_jacobians_through_a_v1_loop_left_in_the_model(self, rows):
    # A loop too long to unroll stays: TensorFlow builds no gradient of a
    # v1 loop in the rows' loop, and pfor's fails when run, so the rows
    # are unrolled in Python. Against tf.gradients of each output.
    self.control_flow(1)
    with tf.Graph().as_default():
      x, t, y = _two_inputs_of_seed(6)
      want = [
        tf.stack([tf.gradients(y[:, i], v)[0] for i in range(2)], 1)
        for v in (x, t)
      ]
      got = tf1hess.batch_jacobians(
        y, [x, t], plan=rows.replace(max_unrolled_ops=10)
      )
      self.assertNotEmpty(_loops_before(got[0]))
      feed = {x: _RNG.normal(size=(3, 3)), t: _RNG.normal(size=(3, 1))}
      with tf.compat.v1.Session() as sess:
        got, want = sess.run([got, want], feed)
    self.assertAllClose(got, want, atol=1e-12)

  def test_third_derivatives_through_a_v1_loop(self):
    # Of the model unrolled; against the rows of the model's own loops
    # under control flow v2, in a graph of their own.
    x_val = _RNG.normal(size=(2, 6))
    with tf.Graph().as_default():
      x, y = _model_of_seed(4, steps=3, features=2)
      d3 = tf1hess.batch_derivatives(y, x, 3, method="while_loop")
      with tf.compat.v1.Session() as sess:
        want = sess.run(d3, {x: x_val})
    self.control_flow(1)
    with tf.Graph().as_default():
      x, y = _model_of_seed(4, steps=3, features=2)
      d3 = tf1hess.batch_derivatives(y, x, 3)
      with tf.compat.v1.Session() as sess:
        self.assertAllClose(sess.run(d3, {x: x_val}), want, atol=1e-10)


def _model_of_seed(seed, steps=_T, features=_D):
  """`(x, y)`: a `tf.scan` and a `tf.while_loop` of weights drawn from
  `seed` (the same model in every graph), `x` `steps` steps of
  `features` each."""
  x = tf.compat.v1.placeholder(tf.float64, [None, steps * features])
  return x, _loops_of_seed(seed, x, steps, features)


def _loops_of_seed(seed, x, steps, features, shift=0.0):
  """The model of `_model_of_seed` on `x`, each step shifted by `shift`."""
  rng = np.random.default_rng(seed)
  w, u = (tf.constant(rng.normal(size=(features,) * 2) / 2) for _ in "wu")
  sequence = tf.transpose(tf.reshape(x, [-1, steps, features]), [1, 0, 2])
  hs = tf.scan(
    lambda h, v: tf.tanh(tf.matmul(h, w) + v + shift),
    sequence,
    initializer=tf.zeros_like(x[:, :features]),
  )
  _, c = tf.while_loop(
    lambda i, c: i < 2,
    lambda i, c: (i + 1, tf.sin(tf.matmul(c, u)) * hs[-1]),
    [0, hs[-2]],
  )
  return tf.reduce_sum(tf.nn.softplus(c) + hs[-1] * hs[-3], axis=1)


def _two_inputs_of_seed(seed):
  """`(x, t, y)`: the model of `_model_of_seed` (3 steps of 1) with each
  step shifted by `t` `(N, 1)`, two outputs `y` `(N, 2)`."""
  x = tf.compat.v1.placeholder(tf.float64, [None, 3])
  t = tf.compat.v1.placeholder(tf.float64, [None, 1])
  y = _loops_of_seed(seed, x, 3, 1, shift=t)
  return x, t, tf.stack([y, y * tf.squeeze(tf.sin(t), 1)], axis=1)


if __name__ == "__main__":
  tf.compat.v1.disable_eager_execution()
  tf.test.main()
