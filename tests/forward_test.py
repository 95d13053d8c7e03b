"""The forward engine gives the numbers of the row loop and of differences.

Every rule is checked alone (a small model whose curvature passes through the
op) and in compositions (dense stacks, a residual MLP with layer
normalization, a Gaussian mixture), in float64 with a dynamic batch, against
the plain row loop (`method="while_loop"`) built in the same graph and
against central differences of `tf.gradients`, for the full Hessians, their
diagonals and their traces. Models the engine cannot follow fall back to the
rows with a warning, or raise with `method="forward"`.
"""

import contextlib
import shutil
import tempfile
from unittest import mock
import zlib

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import forward_rules_test
import testing_utils
import tf1hess
from tf1hess import _core
from tf1hess import forward
from tf1hess.forward import dispatch
from tf1hess.forward import engine
from tf1hess.forward import jacobians
from tf1hess.forward import registry

_K = 6
_RNG = np.random.default_rng(3)
_W = _RNG.normal(size=(_K, _K)) / np.sqrt(_K)
_W2 = _RNG.normal(size=(2, 3, 3)) / 2.0


def _lin(x):
  """A dense layer: every entry depends on every feature."""
  return tf.matmul(x, tf.constant(_W, x.dtype)) + 0.3


def _cross_entropy_of_steps(logits):
  """Softmax cross-entropy of each step of `logits` `(N, 2, 3)`, `(N, 2)`."""
  labels = tf.constant([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], logits.dtype)
  return tf.nn.softmax_cross_entropy_with_logits(
    labels=tf.broadcast_to(labels, tf.shape(logits)), logits=logits
  )


def _c(value, like):
  return tf.constant(value, like.dtype)


# name -> (op type that must be in the graph, per-sample model of (N, 6)).
_RULES = {
  "Tanh": ("Tanh", lambda x: tf.tanh(_lin(x))),
  "Sigmoid": ("Sigmoid", lambda x: tf.sigmoid(_lin(x))),
  "Softplus": ("Softplus", lambda x: tf.nn.softplus(_lin(x))),
  "Exp": ("Exp", lambda x: tf.exp(0.5 * _lin(x))),
  "Expm1": ("Expm1", lambda x: tf.math.expm1(0.5 * _lin(x))),
  "Log": ("Log", lambda x: tf.math.log(_lin(x) ** 2 + 1.0)),
  "Log1p": ("Log1p", lambda x: tf.math.log1p(tf.square(_lin(x)))),
  "Sqrt": ("Sqrt", lambda x: tf.sqrt(tf.square(_lin(x)) + 1.0)),
  "Rsqrt": ("Rsqrt", lambda x: tf.math.rsqrt(tf.square(_lin(x)) + 1.0)),
  "Reciprocal": (
    "Reciprocal",
    lambda x: tf.math.reciprocal(tf.square(_lin(x)) + 1.0),
  ),
  "Sin": ("Sin", lambda x: tf.sin(_lin(x))),
  "Cos": ("Cos", lambda x: tf.cos(_lin(x))),
  "Square": ("Square", lambda x: tf.square(_lin(x))),
  "Softsign": ("Softsign", lambda x: tf.nn.softsign(_lin(x))),
  "Elu": ("Elu", lambda x: tf.nn.elu(_lin(x))),
  "Selu": ("Selu", lambda x: tf.nn.selu(_lin(x))),
  # Piecewise linear ops: their Jacobian matters through a later curvature.
  "Relu": ("Relu", lambda x: tf.square(tf.nn.relu(_lin(x)))),
  "Relu6": ("Relu6", lambda x: tf.square(tf.nn.relu6(3 * _lin(x)))),
  "LeakyRelu": (
    "LeakyRelu",
    lambda x: tf.square(tf.nn.leaky_relu(_lin(x), alpha=0.2)),
  ),
  "Abs": ("Abs", lambda x: tf.square(tf.abs(_lin(x)))),
  "Maximum": ("Maximum", lambda x: tf.square(tf.maximum(_lin(x), x))),
  "Minimum": ("Minimum", lambda x: tf.square(tf.minimum(_lin(x), 0.1))),
  "Mul": ("Mul", lambda x: _lin(x) * tf.sin(x)),
  # One tensor times itself: the cross terms of both operands count twice.
  "Mul_same_tensor": ("Mul", lambda x: (lambda t: t * t)(tf.tanh(_lin(x)))),
  "Mul_input_by_itself": ("Mul", lambda x: tf.reduce_sum(x * x * _lin(x), 1)),
  # tf.nn.silu: a custom gradient (IdentityN) that is its exact gradient.
  "IdentityN_silu": ("IdentityN", lambda x: tf.nn.silu(_lin(x))),
  "IdentityN": (
    "IdentityN",
    lambda x: tf.tanh(tf.identity_n([_lin(x), x])[0] * x),
  ),
  # Two dense layers of x: cross terms of two different shared Jacobians.
  "Mul_two_layers": ("Mul", lambda x: _lin(x) * tf.matmul(x, _c(_W.T, x))),
  "RealDiv": ("RealDiv", lambda x: tf.sin(x) / (tf.square(_lin(x)) + 1.0)),
  # A zero in the denominator: that entry is 0.
  "DivNoNan": (
    "DivNoNan",
    lambda x: tf.tanh(
      tf.math.divide_no_nan(_lin(x), _c([2.0, 0.0, -1.0, 3.0, 0.5, 1.0], x))
    ),
  ),
  # A denominator that depends on x and is 0 in two entries: 0 there too.
  "DivNoNan_denominator": (
    "DivNoNan",
    lambda x: tf.tanh(
      tf.math.divide_no_nan(
        tf.sin(x), _lin(x) * _c([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], x)
      )
    ),
  ),
  "OnesLike_ZerosLike": (
    "OnesLike",
    # tf.ones_like builds Fill before TensorFlow 2.13: the op itself.
    lambda x: (
      tf.tanh(_lin(x))
      * (tf.raw_ops.OnesLike(x=_lin(x)) + tf.raw_ops.ZerosLike(x=x))
    ),
  ),
  "SquaredDifference": (
    "SquaredDifference",
    lambda x: tf.math.squared_difference(_lin(x), tf.sin(x)),
  ),
  "Pow_constant": ("Pow", lambda x: tf.pow(tf.square(_lin(x)) + 1.0, 1.5)),
  # Whole and negative constant exponents, taken as numbers: by products,
  # and by a `Pow` of a constant; the adjoint through the tanh and sine.
  "Pow_whole": (
    "Pow",
    lambda x: tf.tanh(tf.pow(_lin(x), 3.0)) + tf.pow(tf.sin(x), 2.0),
  ),
  "Pow_negative": (
    "Pow",
    lambda x: tf.sin(2.0 * tf.pow(tf.square(_lin(x)) + 1.0, -1.5)),
  ),
  "Pow_both": ("Pow", lambda x: tf.pow(tf.square(x) + 1.0, tf.tanh(_lin(x)))),
  "Sub_Neg": ("Neg", lambda x: tf.tanh(-_lin(x) - tf.sin(x))),
  "AddN": ("AddN", lambda x: tf.tanh(tf.add_n([_lin(x), x, tf.sin(x)]))),
  "BiasAdd": (
    "BiasAdd",
    lambda x: tf.tanh(tf.nn.bias_add(_lin(x), tf.constant(np.arange(6.0)))),
  ),
  "Cast": (
    "Cast",
    lambda x: tf.tanh(tf.cast(tf.cast(_lin(x), tf.float32), tf.float64)),
  ),
  "Reshape": ("Reshape", lambda x: tf.tanh(tf.reshape(_lin(x), [-1, 2, 3]))),
  "Transpose": (
    "Transpose",
    lambda x: tf.tanh(
      tf.matmul(tf.transpose(tf.reshape(x, [-1, 2, 3]), [0, 2, 1]), _W2[0, :2])
    ),
  ),
  "ExpandDims_Squeeze": (
    "Squeeze",
    lambda x: tf.squeeze(tf.tanh(tf.expand_dims(_lin(x), 1)), axis=1),
  ),
  "ConcatV2": (
    "ConcatV2",
    lambda x: tf.tanh(_lin(tf.concat([x[:, :3], tf.ones_like(x[:, 3:])], 1))),
  ),
  "Pack_Unpack": (
    "Unpack",
    lambda x: tf.tanh(tf.stack(tf.unstack(_lin(x), axis=1)[::-1], axis=1)),
  ),
  "Slice": ("Slice", lambda x: tf.tanh(tf.slice(_lin(x), [0, 1], [-1, 3]))),
  "StridedSlice": (
    "StridedSlice",
    lambda x: tf.tanh(_lin(x)[:, ::2] * _lin(x)[..., 1:2]),
  ),
  "Tile": ("Tile", lambda x: tf.tanh(tf.tile(_lin(x)[:, :2], [1, 3]) * x)),
  "BroadcastTo": (
    "BroadcastTo",
    lambda x: tf.tanh(
      tf.broadcast_to(tf.reshape(_lin(x), [4, 1, 6]), [4, 2, 6]) * _W2[0, 0, 0]
    ),
  ),
  # The batch size known at run time only.
  "BroadcastTo_dynamic_batch": (
    "BroadcastTo",
    lambda x: tf.tanh(
      tf.broadcast_to(
        tf.expand_dims(_lin(x), 1), tf.stack([tf.shape(x)[0], 2, _K])
      )
      * _c([[1.0], [-0.5]], x)
    ),
  ),
  "Pad": ("Pad", lambda x: tf.tanh(tf.pad(_lin(x), [[0, 0], [1, 2]]) + 0.2)),
  "PadV2": (
    "PadV2",
    lambda x: tf.tanh(tf.pad(_lin(x), [[0, 0], [1, 0]], constant_values=2.0)),
  ),
  "MirrorPad": (
    "MirrorPad",
    lambda x: tf.tanh(tf.pad(_lin(x), [[0, 0], [2, 1]], mode="REFLECT")),
  ),
  "GatherV2": (
    "GatherV2",
    lambda x: tf.tanh(tf.gather(_lin(x), [3, 0, 3, 5], axis=1)),
  ),
  "Split": ("Split", lambda x: tf.math.multiply(*tf.split(_lin(x), 2, 1))),
  "SplitV": (
    "SplitV",
    lambda x: tf.tanh(tf.split(_lin(x), [2, 4], axis=1)[1]),
  ),
  "Sum_Mean": (
    "Mean",
    lambda x: tf.tanh(
      tf.reduce_sum(tf.reshape(_lin(x), [-1, 2, 3]), axis=2)
      * tf.reduce_mean(tf.sin(x), axis=1, keepdims=True)
    ),
  ),
  "Max_Min": (
    "Max",
    lambda x: tf.square(
      tf.reduce_max(_lin(x), axis=1) - tf.reduce_min(tf.sin(x), axis=1)
    ),
  ),
  "MatMul_transpose_b": (
    "MatMul",
    lambda x: tf.tanh(
      tf.matmul(x, tf.constant(_W.T, x.dtype), transpose_b=True)
    ),
  ),
  "Einsum": (
    "Einsum",
    lambda x: tf.tanh(tf.einsum("nd,de->ne", x, tf.constant(_W, x.dtype))),
  ),
  # Two operands of x: a product of matrices, and attention's scores as
  # Keras' MultiHeadAttention writes them (`key . query` per head, with
  # the batch axis first), here of one tensor and itself.
  "Einsum_two_of_x": (
    "Einsum",
    lambda x: tf.tanh(
      tf.einsum(
        "nij,nkj->nik",
        tf.reshape(_lin(x), [-1, 2, 3]),
        tf.sin(tf.reshape(x, [-1, 2, 3])),
      )
    ),
  ),
  "Einsum_attention_scores": (
    "Einsum",
    lambda x: (
      lambda q: tf.nn.softmax(tf.einsum("aecd,abcd->acbe", q, q + 0.5 * q * q))
    )(tf.reshape(_lin(x), [-1, 3, 1, 2])),
  ),
  "BatchMatMulV2_both": (
    "BatchMatMulV2",
    lambda x: tf.tanh(
      tf.matmul(tf.reshape(x, [-1, 2, 3]), tf.sin(tf.reshape(x, [-1, 3, 2])))
    ),
  ),
  # Output matrices of 12 x 12: N K small matmuls (see structural.py).
  "BatchMatMulV2_large": (
    "BatchMatMulV2",
    lambda x: tf.tanh(
      tf.matmul(
        tf.reshape(tf.tile(_lin(x), [1, 2]), [-1, 12, 1]),
        tf.sin(tf.reshape(tf.tile(x, [1, 2]), [-1, 1, 12])),
      )
    ),
  ),
  "BatchMatMulV2_adjoint": (
    "BatchMatMulV2",
    lambda x: tf.tanh(
      tf.matmul(
        tf.reshape(x, [-1, 3, 2]),
        tf.reshape(_lin(x), [-1, 2, 3]),
        adjoint_a=True,
        adjoint_b=True,
      )
    ),
  ),
  "BatchMatMulV2_weights": (
    "BatchMatMulV2",
    lambda x: tf.tanh(
      tf.matmul(tf.constant(_W2), tf.reshape(x, [-1, 1, 3, 2]))
    ),
  ),
  "Softmax": (
    "Softmax",
    lambda x: tf.nn.softmax(tf.reshape(_lin(x), [-1, 2, 3])) * _W2[0, :2],
  ),
  "LogSoftmax": (
    "LogSoftmax",
    lambda x: tf.nn.log_softmax(_lin(x)) * tf.constant(np.arange(6.0)),
  ),
  "SoftmaxCrossEntropyWithLogits": (
    "SoftmaxCrossEntropyWithLogits",
    lambda x: tf.nn.softmax_cross_entropy_with_logits(
      # Rows of probabilities: TensorFlow's gradient of this op assumes
      # them (its kernel returns softmax - labels).
      labels=tf.constant(np.abs(_W[:4]) / np.abs(_W[:4]).sum(1, keepdims=True)),
      logits=_lin(x),
    ),
  ),
  "SparseSoftmaxCrossEntropyWithLogits": (
    "SparseSoftmaxCrossEntropyWithLogits",
    lambda x: tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.constant([1, 0, 5, 2]), logits=tf.sin(_lin(x))
    ),
  ),
  # Per step of a sequence: TensorFlow flattens logits `(N, T, C)` to rows
  # `(N T, C)` of the last entry of their shape (`tf.slice`).
  "SoftmaxCrossEntropyWithLogits_of_steps": (
    "SoftmaxCrossEntropyWithLogits",
    lambda x: _cross_entropy_of_steps(tf.reshape(_lin(x), [-1, 2, 3])),
  ),
  # Diagonal Jacobians: x broadcast against weights, kept K times smaller.
  "Diagonal_ExpandDims_Mean": (
    "ExpandDims",
    lambda x: tf.exp(
      -tf.reduce_mean(
        tf.square(tf.expand_dims(x, 1) - _W[:3]), axis=[1, 2], keepdims=True
      )
    ),
  ),
  "Diagonal_Sum_not_over_features": (
    "Sum",
    lambda x: tf.tanh(tf.reduce_sum(tf.sin(x[:, None, :] * _W[:2]), axis=1)),
  ),
  "Diagonal_Sum_over_features": (
    "Sum",
    lambda x: tf.tanh(tf.reduce_sum(tf.sin(x[:, None, :] * _W[:2]), axis=2)),
  ),
  "Diagonal_ellipsis_new_axis": (
    "StridedSlice",
    lambda x: tf.exp(-tf.reduce_sum(tf.square(x[..., None, :] - _W[:3]), 2)),
  ),
  "Diagonal_ellipsis_new_last_axis": (
    "StridedSlice",
    lambda x: tf.tanh(x[..., None] * _W[:1, :3]),
  ),
  "Diagonal_new_last_axis": (
    "StridedSlice",
    lambda x: tf.tanh(x[:, :, None] * _W[:1, :3]),
  ),
  "LogSumExp": (
    "Exp",
    lambda x: tf.reduce_logsumexp(tf.reshape(_lin(x), [-1, 3, 2]), axis=1),
  ),
}


# Rules whose model loses precision on the way (a float32 cast).
_TOLERANCE = {"Cast": 1e-6}
_FD_TOLERANCE = {"Cast": 1e-2}
# TensorFlow has no second-order gradient of these ops (no gradient of
# SoftsignGrad): the rows fail, the engine is checked against differences.
_NO_ROWS = {"Softsign"}


def _second_derivatives(y, x, method):
  """The Hessians, their diagonals and their traces of `y` by `method`."""
  return [
    op(y, x, method=method)
    for op in (
      tf1hess.batch_hessians,
      tf1hess.batch_hessian_diagonals,
      tf1hess.batch_laplacians,
    )
  ]


def _batch_reference(sess, x, y, x_val):
  """Central differences of `tf.gradients(y, x)`, `(N, K, K)` in float64."""
  (g,) = tf.gradients(y, x)
  return testing_utils.central_difference_jacobian(
    lambda v: sess.run(g, {x: v}), x_val
  )


class ForwardRulesTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_rule_AddN",
    "test_rule_BatchMatMulV2_adjoint",
    "test_rule_BatchMatMulV2_both",
    "test_rule_BatchMatMulV2_large",
    "test_rule_BroadcastTo_dynamic_batch",
    "test_rule_Diagonal_ExpandDims_Mean",
    "test_rule_Diagonal_Sum_not_over_features",
    "test_rule_Diagonal_Sum_over_features",
    "test_rule_Diagonal_ellipsis_new_axis",
    "test_rule_DivNoNan_denominator",
    "test_rule_Einsum_attention_scores",
    "test_rule_Max_Min",
    "test_rule_Maximum",
    "test_rule_Mul_input_by_itself",
    "test_rule_Pow_both",
    "test_rule_RealDiv",
    "test_rule_SoftmaxCrossEntropyWithLogits_of_steps",
    "test_rule_Sum_Mean",
  )

  @parameterized.named_parameters(*[(name, name) for name in _RULES])
  def test_rule(self, name):
    op_type, model = _RULES[name]
    self.assertIn(op_type, registry.RULES)
    # Inputs of the test's own, whatever ran before it (the second
    # derivatives of softsign and abs jump at 0: differences must not
    # straddle that).
    x_val = np.random.default_rng(zlib.crc32(name.encode())).normal(
      size=(4, _K)
    )
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = model(x)
      self.assertIn(op_type, {op.type for op in graph.get_operations()})
      outs = _second_derivatives(y, x, "forward")
      with tf.compat.v1.Session() as sess:
        h, d, lap = sess.run(outs, {x: x_val})
        reference = _batch_reference(sess, x, y, x_val)
        if name not in _NO_ROWS:
          rows = tf1hess.batch_hessians(y, x, method="while_loop")
          tol = _TOLERANCE.get(name, 1e-10)
          self.assertAllClose(h, sess.run(rows, {x: x_val}), atol=tol, rtol=tol)
    fd_tol = _FD_TOLERANCE.get(name, 1e-6)
    self.assertAllClose(h, reference, atol=fd_tol, rtol=fd_tol)
    self.assertAllClose(d, np.einsum("nii->ni", h), atol=1e-12)
    self.assertAllClose(lap, np.einsum("nii->n", h), atol=1e-12)

  def test_broadcast_of_one_sample_to_a_batch_raises(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      other = tf.compat.v1.placeholder(tf.float64, [None])
      copies = tf.broadcast_to(_lin(x), tf.stack([tf.shape(other)[0], _K]))
      h = tf1hess.batch_hessians(tf.tanh(copies), x, method="forward")
      with tf.compat.v1.Session() as sess:
        feed = {x: _RNG.normal(size=(1, _K)), other: np.zeros(3)}
        # The check of the rule, or an op that the mismatch stops first.
        with self.assertRaises(tf.errors.InvalidArgumentError):
          sess.run(h, feed)
        # Where the batch is kept, the same graph runs.
        feed = {x: _RNG.normal(size=(3, _K)), other: np.zeros(3)}
        self.assertEqual(sess.run(h, feed).shape, (3, _K, _K))

  @parameterized.named_parameters(
    ("repeated_index", "nii,nij->nj"),
    ("index_of_one_operand_only", "nij,njk->nk"),
  )
  def test_einsum_of_two_tensors_it_cannot_follow_raises(self, equation):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 9])
      u = tf.reshape(x, [-1, 3, 3])
      y = tf.reduce_sum(tf.tanh(tf.einsum(equation, u, tf.sin(u))), axis=1)
      with self.assertRaisesRegex(ValueError, "Einsum .* two tensors of x"):
        tf1hess.batch_hessians(y, x, method="forward")

  def test_every_rule_has_a_test(self):
    tested = {op_type for op_type, _ in _RULES.values()}
    tested |= forward_rules_test.NEW_OP_TYPES  # Tested there.
    tested |= forward_rules_test.FLOAT32_OP_TYPES
    models = " ".join(_RULES)
    for op_type in registry.RULES:
      if op_type in tested or op_type in models:
        continue
      with self.subTest(op_type):
        # Aliases and ops that the models above build implicitly.
        self.assertIn(
          op_type,
          {
            "Identity",
            "Snapshot",
            "CheckNumerics",
            "Add",
            "AddV2",
            "Sub",
            "Div",
            "Inv",
            "BiasAddV1",
            "Min",
            "ExpandDims",
            "Pack",
            "Sum",
            "BatchMatMul",
            "BatchMatMulV3",
            # tf.nn.moments' stop: forward_dispatch_test (RowsInexactTest),
            # against differences (the rows are off there).
            "StopGradient",
            # Of a user's v1 cond around the call: forward_conds_test
            # (CallsInAUsersCondTest).
            "Switch",
            "RefSwitch",
          },
        )


def _dense_stack(x, depth=3, width=16, activation=tf.tanh):
  h = x
  for i in range(depth):
    h = tf.compat.v1.layers.dense(
      h,
      width,
      activation=activation,
      name=f"dense{i}",
      kernel_initializer=tf.compat.v1.glorot_normal_initializer(seed=i),
      bias_initializer=tf.compat.v1.random_normal_initializer(seed=10 + i),
    )
  return tf.compat.v1.layers.dense(h, 1, name="out")


def _layer_norm(h):
  """Layer normalization written out (no stop_gradient, unlike moments)."""
  mean = tf.reduce_mean(h, axis=-1, keepdims=True)
  var = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
  return (h - mean) * tf.math.rsqrt(var + 1e-3)


def _residual(x):
  h = tf.compat.v1.layers.dense(x, 8, name="in")
  for i in range(2):
    h = h + tf.compat.v1.layers.dense(
      tf.nn.softplus(_layer_norm(h)), 8, name=f"res{i}"
    )
  return tf.reduce_sum(tf.tanh(h), axis=1)


def _mixture(x):
  rng = np.random.default_rng(5)
  k = x.shape[1]
  mu = tf.constant(rng.normal(size=(4, k)), x.dtype)
  scale = tf.constant(np.exp(0.2 * rng.normal(size=(4, 1))), x.dtype)
  d = tf.reduce_sum(tf.square((x[:, None, :] - mu) / scale), axis=2)
  log_w = tf.constant(np.log([0.1, 0.2, 0.3, 0.4]), x.dtype)
  return tf.reduce_logsumexp(log_w - 0.5 * d - k * tf.math.log(scale[:, 0]), 1)


_MODELS = {
  "tanh_dense_3x16": _dense_stack,
  "elu_dense_2x8": lambda x: _dense_stack(x, 2, 8, tf.nn.elu),
  "residual_layer_norm": _residual,
  "mixture": _mixture,
  "sum_over_batch": lambda x: 0.5 * tf.reduce_sum(tf.sin(x) * _lin(x)),
}


class ForwardModelsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_attention",
    "test_dynamic_features",
    "test_linear_models_with_divisions_are_zeros1",
    "test_model0",
    "test_model2",
    "test_model3",
  )

  @parameterized.parameters(testing_utils.in_turn(model=list(_MODELS)))
  def test_model(self, model, cf):
    self.control_flow(cf)
    x_val = _RNG.normal(size=(5, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = _MODELS[model](x)
      h = tf1hess.batch_hessians(y, x, method="forward")
      d = tf1hess.batch_hessian_diagonals(y, x, method="forward")
      lap = tf1hess.batch_laplacians(y, x)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      self.assertEqual(h.shape.as_list(), [None, _K, _K])
      self.assertEqual(lap.shape.as_list(), [None])
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        out = sess.run([h, d, lap, rows], {x: x_val})
        reference = _batch_reference(sess, x, y, x_val)
        empty = sess.run([h, lap], {x: np.zeros((0, _K))})
    h_val, d_val, lap_val, rows_val = out
    self.assertAllClose(h_val, rows_val, atol=1e-9, rtol=1e-9)
    self.assertAllClose(h_val, reference, atol=1e-6, rtol=1e-6)
    self.assertAllClose(d_val, np.einsum("nii->ni", reference), atol=1e-6)
    self.assertAllClose(lap_val, np.einsum("nii->n", reference), atol=1e-6)
    self.assertEqual(empty[0].shape, (0, _K, _K))
    self.assertEqual(empty[1].shape, (0,))

  @parameterized.parameters(
    testing_utils.in_turn(model=["halved", "scaled_distances"])
  )
  def test_linear_models_with_divisions_are_zeros(self, model, cf):
    # A division may curve, but not by a constant: no term at all.
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      if model == "halved":
        y = tf.reduce_sum(x / 2.0, 1)
      else:
        centres = tf.constant(_RNG.normal(size=(3, _K)))
        y = (
          tf.reduce_sum((x[:, None, :] - centres) / 1.5, [1, 2]) + _lin(x)[:, 0]
        )
      outs = [
        *_second_derivatives(y, x, "forward"),
        *_second_derivatives(y, x, "auto"),
      ]
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        got = sess.run(outs + [rows], {x: x_val_of(3)})
    for value, shape in zip(
      got, [(3, _K, _K), (3, _K), (3,)] * 2 + [(3, _K, _K)]
    ):
      self.assertAllEqual(value, np.zeros(shape))

  def test_float32_tanh_mlp_against_the_analytic_hessian(self):
    weights = testing_utils.mlp_weights(5, hidden=7)
    x_val = _RNG.normal(size=(9, 5))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 5])
      y = testing_utils.tanh_mlp(x, *weights)
      outs = [
        tf1hess.batch_hessians(y, x, method="forward"),
        tf1hess.batch_laplacians(y, x, method="forward"),
      ]
      with tf.compat.v1.Session() as sess:
        h, lap = sess.run(outs, {x: x_val})
    expected = testing_utils.tanh_mlp_hessians(x_val, *weights)
    self.assertEqual(h.dtype, np.float32)
    self.assertAllClose(h, expected, atol=2e-4, rtol=1e-4)
    self.assertAllClose(lap, np.einsum("nii->n", expected), atol=2e-4)

  @parameterized.parameters(None, 9, 3)
  def test_dense_layer_against_the_analytic_hessian(self, batch):
    """`c @ P` for the products `P` of two shared factors, when N >= K."""
    w = _RNG.normal(size=(_K, 5))
    x_val = _RNG.normal(size=(batch or 7, _K))
    taken, choose = [], jacobians.outer_of_shared

    def spy(*args):
      taken.append(choose(*args))
      return taken[-1]

    with mock.patch.object(jacobians, "outer_of_shared", spy):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float64, [batch, _K])
        y = tf.tanh(tf.matmul(x, w) + 0.2)
        outs = [
          tf1hess.batch_hessians(y, x, method="forward"),
          tf1hess.batch_hessian_diagonals(y, x, method="forward"),
        ]
        with tf.compat.v1.Session() as sess:
          h, d = sess.run(outs, {x: x_val})
    t = np.tanh(x_val @ w + 0.2)
    expected = np.einsum("km,nm,lm->nkl", w, -2 * t * (1 - t * t), w)
    self.assertAllClose(h, expected, atol=1e-10)
    self.assertAllClose(d, np.einsum("nkk->nk", expected), atol=1e-10)
    self.assertEqual(any(taken), batch != 3)

  def test_rank3_input_and_dynamic_features(self):
    x_val = _RNG.normal(size=(3, 2, 3))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2, 3])
      flat = tf.reshape(x, [-1, 6])
      y = tf.reduce_sum(tf.tanh(_lin(tf.sin(flat))), axis=1) * 1.0
      y = y + tf.reduce_sum(tf.exp(0.3 * x), axis=[1, 2])
      outs = [
        tf1hess.batch_hessians(y, x, method=m)
        for m in ("forward", "while_loop")
      ]
      lap = tf1hess.batch_laplacians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        h, rows = sess.run(outs, {x: x_val})
        lap_val = sess.run(lap, {x: x_val})
    self.assertEqual(h.shape, (3, 2, 3, 2, 3))
    self.assertAllClose(h, rows, atol=1e-10)
    self.assertAllClose(
      lap_val, np.einsum("nii->n", rows.reshape(3, 6, 6)), atol=1e-10
    )

  def test_dynamic_features(self):
    x_val = _RNG.normal(size=(3, 4))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, None])
      y = tf.reduce_sum(tf.tanh(tf.sin(x) * x[:, :1]) ** 2, axis=1)
      outs = [
        tf1hess.batch_hessians(y, x, method=m)
        for m in ("forward", "while_loop")
      ]
      self.assertEqual(outs[0].shape.as_list(), [None, None, None])
      with tf.compat.v1.Session() as sess:
        h, rows = sess.run(outs, {x: x_val})
    self.assertAllClose(h, rows, atol=1e-10)

  def test_attention(self):
    """Single-head self-attention: matmuls of two tensors of x, softmax."""
    rng = np.random.default_rng(11)
    wq, wk, wv = (rng.normal(size=(3, 3)) / 2 for _ in range(3))
    x_val = _RNG.normal(size=(4, 6))

    def model(x):
      seq = tf.reshape(x, [-1, 2, 3])
      q, k, v = (tf.einsum("nsd,de->nse", seq, w) for w in (wq, wk, wv))
      scores = tf.matmul(q, k, transpose_b=True)
      weights = tf.exp(scores - tf.reduce_logsumexp(scores, -1, keepdims=True))
      return tf.reduce_sum(tf.tanh(tf.matmul(weights, v)), axis=[1, 2])

    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 6])
      y = model(x)
      h = tf1hess.batch_hessians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        reference = _batch_reference(sess, x, y, x_val)
        h_val = sess.run(h, {x: x_val})
    self.assertAllClose(h_val, reference, atol=1e-6, rtol=1e-6)

  def test_list_of_xs(self):
    def model(x1, x2):
      return tf.reduce_sum(tf.tanh(x1), 1) * tf.reduce_sum(x2**3, 1)

    testing_utils.check_list_of_xs(
      self,
      model,
      lambda y, xs: tf1hess.batch_hessians(y, xs, method="forward"),
    )

  @parameterized.parameters(1, 2)
  def test_one_feature_of_x_and_t(self, cf):
    # A PINN's `u_xx` and `u_tt` of placeholders `x` and `t` of one
    # feature each: the Hessian `(N, 1, 1)` is its diagonal, walked without
    # batched matmuls of `(1, M)` by `(M, 1)`; against TensorFlow's
    # gradients taken twice (exact here: one feature per sample).
    self.control_flow(cf)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, 1])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      h = tf.concat([x, t], 1)
      for rows in (2, 8):
        w = _RNG.normal(size=(rows, 8)) / np.sqrt(rows)
        h = tf.tanh(tf.matmul(h, tf.constant(w)) + 0.1)
      u = tf.matmul(h, tf.constant(_RNG.normal(size=(8, 1)))) + tf.sin(x) * t**2
      with tf.name_scope("engine"):
        hessians = tf1hess.batch_hessians(u, [x, t], method="forward")
      engine_ops = [
        op.type for op in graph.get_operations() if "engine/" in op.name
      ]
      self.assertNotIn("BatchMatMulV2", engine_ops)
      # Auto chooses as for diagonals: the engine.
      choices, choose = [], dispatch.choose

      def spy(*args):
        choices.append(choose(*args))
        return choices[-1]

      with mock.patch.object(dispatch, "choose", side_effect=spy):
        auto = tf1hess.batch_hessians(u, [x, t])
      self.assertEqual(choices, [dispatch.Choice(True)] * 2)
      want = [tf.gradients(tf.gradients(u, v)[0], v)[0] for v in (x, t)]
      feed = {x: _RNG.normal(size=(6, 1)), t: _RNG.normal(size=(6, 1))}
      with tf.compat.v1.Session() as sess:
        got, auto, want = sess.run([hessians, auto, want], feed)
    for g, a, w in zip(got, auto, want):
      self.assertEqual(g.shape, (6, 1, 1))
      self.assertAllClose(g[:, :, 0], w, atol=1e-12)
      self.assertAllClose(a[:, :, 0], w, atol=1e-12)

  def test_independence_check_passes(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = tf1hess.batch_hessians(
        tf.tanh(_lin(x)), x, method="forward", check_independence=True
      )
      with tf.compat.v1.Session() as sess:
        self.assertEqual(sess.run(h, {x: x_val_of(4)}).shape, (4, _K, _K))

  def test_linear_and_unconnected(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      z = tf.compat.v1.placeholder(tf.float64, [None, _K])
      linear = _lin(x)
      self.assertIsNone(
        tf1hess.batch_hessians(linear, x, unconnected_gradients="none")
      )
      self.assertIsNone(
        tf1hess.batch_laplacians(tf.sin(z), x, unconnected_gradients="none")
      )
      zeros = tf1hess.batch_laplacians(linear, x, method="forward")
      itself = tf1hess.batch_hessians([x, tf.sin(x)], x, method="forward")
      relu = tf1hess.batch_hessians(
        tf.nn.relu(_lin(x)), x, method="forward", unconnected_gradients="none"
      )
      with tf.compat.v1.Session() as sess:
        feed = {x: x_val_of(3)}
        self.assertAllEqual(sess.run(zeros, feed), np.zeros(3))
        self.assertAllClose(
          sess.run(itself, feed),
          np.stack([np.diag(v) for v in -np.sin(feed[x])]),
        )
        self.assertAllEqual(sess.run(relu, feed), np.zeros((3, _K, _K)))

  def test_a_second_build_walks_only_the_model(self):
    # Earlier Hessians read `x` too: the walk from `x` must not visit them
    # (under control flow v1 every later build of a recurrent model took
    # longer than the one before), and the numbers stay the same.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.tanh(_lin(x))
      with tf.name_scope("first"):
        first = tf1hess.batch_hessians(y, x, method="forward")
      path, dependent = engine._path(x, [y])
      model = {op.name for op in _core.ancestor_ops([y])}
      self.assertTrue(path)
      self.assertEqual({name for name, _ in dependent} - model, set())
      self.assertEqual(tf1hess.ops.ops_between([y], [x]), set(path))
      second = tf1hess.batch_hessians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        a, b = sess.run([first, second], {x: x_val_of(3)})
      self.assertAllEqual(a, b)


def x_val_of(n):
  return np.random.default_rng(n).normal(size=(n, _K))


class FallbackTest(testing_utils.ControlFlowMixin, tf.test.TestCase):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_loops_are_unrolled",
    "test_unsupported_op_falls_back_and_says_so",
  )

  def test_unsupported_op_falls_back_and_says_so(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.math.special.dawsn(tf.square(_lin(x)) + 1.0) * tf.sin(x)
      with self.assertLogs(level="WARNING") as logs:
        lap = tf1hess.batch_laplacians(y, x)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        lap_val, rows_val = sess.run([lap, rows], {x: x_val_of(4)})
    self.assertRegex(
      "\n".join(logs.output), "falls back to the row loop.*op type Dawsn"
    )
    self.assertAllClose(lap_val, np.einsum("nii->n", rows_val), atol=1e-10)

  def test_forward_raises_on_an_unsupported_op(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      with self.assertRaisesRegex(
        tf1hess.ForwardUnsupportedError,
        "`method`='forward' cannot .* no forward rule for op type Dawsn",
      ) as raised:
        tf1hess.batch_hessians(tf.math.special.dawsn(x), x, method="forward")
      self.assertIsInstance(raised.exception, ValueError)
      self.assertIn("op type Dawsn", str(raised.exception.reason))

  def test_samples_mixed_before_a_nonlinear_op(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.square(tf.reduce_sum(x)) + tf.reduce_sum(x * tf.reduce_mean(x, 0))
      with self.assertRaisesRegex(ValueError, "mixes samples"):
        tf1hess.batch_hessians(y, x, method="forward")

  def test_loops_are_unrolled(self):
    """A `tf.scan` hands its values to the loop in a variant tensor list;
    the walk follows the loop unrolled (`forward_loops_test`)."""
    self.control_flow(2)
    testing_utils.check_scan_model_hessians(
      self, lambda y, x: tf1hess.batch_hessians(y, x, method="forward")
    )
    # "auto", sent to the engine, too.
    engine = dispatch.Choice(True)
    with mock.patch.object(dispatch, "choose", return_value=engine):
      testing_utils.check_scan_model_hessians(self, tf1hess.batch_hessians)

  def test_overridden_gradients_are_not_followed(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      with graph.gradient_override_map({"Tanh": "Sigmoid"}):
        y = tf.tanh(x)
      with self.assertRaisesRegex(ValueError, "gradient overridden"):
        tf1hess.batch_laplacians(y, x, method="forward")

  def test_forward_refuses_higher_orders(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      with self.assertRaisesRegex(ValueError, "order <= 2; saw order 3"):
        tf1hess.batch_derivatives(tf.sin(x), x, 3, method="forward")

  def test_custom_gradients_are_not_followed(self):
    @tf.custom_gradient
    def doubled_gradient(v):
      return tf.sin(v), lambda dy: 2 * dy * tf.cos(v)

    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      with self.assertRaisesRegex(ValueError, "IdentityN"):
        tf1hess.batch_hessians(doubled_gradient(x), x, method="forward")


class AutoTest(tf.test.TestCase):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_auto_follows_silu_without_a_warning",
    "test_auto_hessians_of_a_mixture_take_the_engine",
    "test_saved_model_of_silu_hessians",
  )

  def test_auto_hessians_of_a_mixture_take_the_engine(self):
    # 64 features: terms 4 wide against 64 row passes over (N, 4, 64).
    k = 64
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, k])
      y = _mixture(x)
      choices, choose = [], dispatch.choose

      def spy(*args):
        choices.append(choose(*args))
        return choices[-1]

      with mock.patch.object(dispatch, "choose", side_effect=spy):
        h = tf1hess.batch_hessians(y, x)
      self.assertEqual(choices, [dispatch.Choice(True)])
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      x_val = np.random.default_rng(0).normal(size=(5, k)) * 0.2
      with tf.compat.v1.Session() as sess:
        h_val, rows_val = sess.run([h, rows], {x: x_val})
    self.assertAllClose(h_val, rows_val, atol=1e-10)

  def test_auto_follows_silu_without_a_warning(self):
    """tf.nn.silu's custom gradient: the walk differentiates it as one
    function, on the model and on its copy for the cost model."""
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.nn.silu(_lin(tf.nn.silu(_lin(x), beta=0.7)))
      with mock.patch.object(
        dispatch, "choose", return_value=dispatch.Choice(True)
      ):
        with mock.patch.object(dispatch._core, "warn_once") as warn:
          outs = [
            op(y, x)
            for op in (tf1hess.batch_hessians, tf1hess.batch_laplacians)
          ]
      warn.assert_not_called()
      # One elementwise function: the ops computing it are not walked.
      walked = {op.type for op in engine.path_ops(x, [y])}
      self.assertNotIn("Sigmoid", walked)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        h, lap, rows_val = sess.run(outs + [rows], {x: x_val_of(5)})
        reference = _batch_reference(sess, x, y, x_val_of(5))
    self.assertAllClose(h, rows_val, atol=1e-10)
    self.assertAllClose(h, reference, atol=1e-6)
    self.assertAllClose(lap, np.einsum("nii->n", rows_val), atol=1e-10)

  def test_the_copies_gradient_of_silu_is_tensorflows(self):
    u_val = _RNG.normal(size=(4, 3))
    with tf.Graph().as_default() as graph:
      u = tf.compat.v1.placeholder(tf.float64, [None, 3])
      beta = tf.compat.v1.placeholder(tf.float64, [])
      weights = tf.constant(_W[:3, :3])
      v = tf.nn.silu(u, beta=beta)
      with graph.gradient_override_map({"IdentityN": registry.COPY_GRADIENT}):
        w = tf.identity_n([u * tf.sigmoid(beta * u), u, beta])[0]
      grads = [
        tf.gradients(tf.reduce_sum(tf.matmul(t, weights)), [u, beta])
        for t in (v, w)
      ]
      with tf.compat.v1.Session() as sess:
        (gu, gb), (cu, cb) = sess.run(grads, {u: u_val, beta: 0.7})
    self.assertAllClose(cu, gu, atol=1e-12)
    self.assertAllClose(cb, gb, atol=1e-12)

  def test_saved_model_of_silu_hessians(self):
    # Auto's rows of a copy of the model in the switch on N: the copy's
    # silu has TensorFlow's gradients of its ops, not a registered
    # gradient function, which a SavedModel traces without an op (it
    # failed to save).
    class Model(tf.Module):
      def __init__(self):
        super().__init__()
        self.w = tf.Variable(_W[:, :4] / 2)

      def net(self, x):
        return tf.reduce_sum(tf.nn.silu(tf.matmul(x, self.w)), 1)

      @tf.function(input_signature=[tf.TensorSpec([None, _K], tf.float64)])
      def hessians(self, x):
        return tf1hess.eager.batch_hessians(self.net, x)

    model = Model()
    names = [
      op.name
      for op in model.hessians.get_concrete_function().graph.get_operations()
    ]
    self.assertTrue(any("by_batch_size" in name for name in names))
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    tf.saved_model.save(model, path)
    x = tf.constant(x_val_of(5))
    want = testing_utils.tape_hessians(model.net, x)
    loaded = tf.saved_model.load(path)
    self.assertAllClose(loaded.hessians(x), want)

  def test_auto_diagonals_agree_with_the_rows(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = _dense_stack(x)
      with mock.patch.object(
        forward.engine, "second_derivatives", wraps=forward.second_derivatives
      ) as walk:
        d = tf1hess.batch_hessian_diagonals(y, x)
      # At least on a copy of the model, which the cost model reads.
      self.assertGreaterEqual(walk.call_count, 1)
      rows = tf1hess.batch_hessian_diagonals(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        d_val, rows_val = sess.run([d, rows], {x: x_val_of(5)})
    self.assertAllClose(d_val, rows_val, atol=1e-10)


class ShapesTest(tf.test.TestCase):
  """`jacobians.dims` and `concat`: static sizes as Python ints, the others
  read at run time."""

  def test_static_and_dynamic_sizes(self):
    with tf.Graph().as_default():
      t = tf.compat.v1.placeholder(tf.float32, [None, 3, 4])
      unknown = tf.compat.v1.placeholder(tf.float32, None)
      self.assertEqual(jacobians.dims(t, 1), [3, 4])
      self.assertEqual(jacobians.concat([2], jacobians.dims(t, -1)), [2, 4])
      lead = jacobians.dims(t, 0, 2)
      self.assertIsInstance(lead[0], tf.Tensor)
      self.assertEqual(lead[1], 3)
      mixed = tf.reshape(t, jacobians.concat([lead[0] * 3], [4]))
      shapes = [
        jacobians.concat([2], jacobians.dims(unknown, 1)),
        jacobians.concat([], jacobians.dims(unknown, -1)),
        tf.shape(mixed),
      ]
      with tf.compat.v1.Session() as sess:
        feed = {t: np.zeros([0, 3, 4]), unknown: np.zeros([5, 6, 7])}
        self.assertEqual(
          [list(v) for v in sess.run(shapes, feed)],
          [
            [2, 6, 7],
            [7],
            [0, 4],
          ],
        )


class DiagonalHessianTest(tf.test.TestCase):
  """A diagonal Hessian, made into matrices by the engine, keeps exact
  zeros off its diagonal beside infinite entries (`exp` overflowing)."""

  def test_off_diagonal_zeros_beside_infinities(self):
    x_val = np.array([[100.0, 0.0, 1.0], [0.5, -1.0, 2.0]], np.float32)
    expected = np.zeros((2, 3, 3), np.float32)
    for i in range(2):
      np.fill_diagonal(expected[i], np.exp(x_val[i]))  # exp(100) is inf.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      h = tf1hess.batch_hessians(
        tf.reduce_sum(tf.exp(x), 1), x, method="forward"
      )
      with self.session() as sess:
        got = sess.run(h, {x: x_val})
    self.assertTrue(np.isinf(got[0, 0, 0]))
    np.testing.assert_array_equal(np.isnan(got), False)
    self.assertAllClose(got, expected, rtol=1e-6)

  def test_diagonal_terms_are_added_to_the_diagonal_of_the_others(self):
    """`sum(x^3) + sum(exp(x))` beside a tanh layer: the two diagonal terms
    are added to the diagonal of the layer's Hessian, not made into
    matrices; an infinite entry stays on the diagonal."""
    x_val = np.array([[100.0, 0.0, 1.0], [0.5, -1.0, 2.0]], np.float32)
    w = np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      layer = tf.reduce_sum(tf.tanh(tf.matmul(x, w)), 1)
      y = layer + tf.reduce_sum(x**3 + tf.exp(x), 1)
      h = tf1hess.batch_hessians(y, x, method="forward")
      rows = tf1hess.batch_hessians(layer, x, method="while_loop")
      with self.session() as sess:
        meta = tf.compat.v1.RunMetadata()
        got = sess.run(
          h,
          {x: x_val},
          options=tf.compat.v1.RunOptions(trace_level=3),
          run_metadata=meta,
        )
        want = sess.run(rows, {x: x_val})
    ran = {
      s.node_name.split(":")[0]
      for d in meta.step_stats.dev_stats
      for s in d.node_stats
    }
    types = {op.type for op in graph.get_operations() if op.name in ran}
    # No select against the identity (`jacobians._diagonal_matrices`).
    self.assertNotIn("SelectV2", types)
    self.assertIn("MatrixSetDiagV3", types)
    for i in range(2):
      want[i] += np.diag(6 * x_val[i] + np.exp(x_val[i]))
    self.assertTrue(np.isinf(got[0, 0, 0]))
    np.testing.assert_array_equal(np.isnan(got), False)
    self.assertAllClose(got, want, rtol=1e-5, atol=1e-5)


def _every_tensor(unused_t):
  return True


class ShapeEntriesTest(tf.test.TestCase):
  """`registry.sample_shape` and `partial_shape` against the shape vectors
  they read, run."""

  def test_entries_agree_with_the_run_values(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3, 4])
      other = tf.compat.v1.placeholder(tf.float32, [None, 5])
      shape = tf.shape(x)
      vectors = [
        shape,
        shape[1:],
        shape[:-1],
        tf.stack([shape[0], -1]),
        tf.stack([tf.shape(x)[0], tf.reduce_prod(shape[1:])]),
        tf.concat([shape[:1], [-1]], 0),
        tf.concat([tf.shape_n([x, other])[1][::-1], shape[2:]], 0),
        tf.gather(shape, [2, 0]),
        tf.dynamic_stitch([[0, 2], 1], [shape[1:], shape[0]]),
      ]
      entries = [registry.sample_shape(v, lambda u: u is x) for v in vectors]
      partial = [registry.partial_shape(v) for v in vectors]
      with tf.compat.v1.Session() as sess:
        feed = {x: np.zeros([7, 3, 4]), other: np.zeros([7, 5])}
        values = sess.run(vectors, feed)
      for vector, got, loose, value in zip(vectors, entries, partial, values):
        with self.subTest(vector=vector.name):
          # N is the only entry static shapes do not know.
          self.assertEqual(loose, [None if v == 7 else v for v in value])
          if "ShapeN" in vector.name or "concat_1" in vector.name:
            # `other`'s batch axis is not one of x's: not read as N.
            self.assertIsNone(got)
          else:
            self.assertEqual(got, loose)

  def test_entries_not_read_from_shapes_are_unknown(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3, None])
      n = tf.compat.v1.placeholder(tf.int32, [])
      batch_first = _every_tensor
      self.assertIsNone(registry.sample_shape(tf.shape(x), batch_first))
      self.assertEqual(
        registry.sample_shape(tf.shape(x)[:2], batch_first), [None, 3]
      )
      self.assertIsNone(registry.sample_shape(tf.stack([n, 3]), batch_first))
      self.assertEqual(registry.partial_shape(tf.stack([n, 3])), [None, 3])
      self.assertEqual(registry.partial_shape(tf.shape(x)), [None, 3, None])


class BroadcastTermsTest(tf.test.TestCase, parameterized.TestCase):
  """`jacobians.summed_over_broadcasts` after `pulled_back`, as the engine
  calls them, against the terms' definition, `sum_e c[n, e] J_a[n, :, e]
  J_b[n, :, e]^T` (+ its transpose), in numpy."""

  @parameterized.product(
    layout=["b_broadcast", "a_broadcast", "same"],
    other=["dense", "shared", "diagonal", "diagonal_shared"],
    broadcast_shared=[False, True],
    every_entry=[False, True],
    symmetric=[False, True],
  )
  def test_contractions_agree_with_the_definition(
    self, layout, other, broadcast_shared, every_entry, symmetric
  ):
    # Entries (2, K): a diagonal factor's last entry axis is the tangent's.
    n, k = 3, 4
    shape, small = [2, k], [1, 1] if every_entry else [2, 1]
    c_val = _RNG.normal(size=[n] + shape)
    small_val = _RNG.normal(size=([k] if broadcast_shared else [n, k]) + small)
    lead = {"dense": [n, k], "shared": [k], "diagonal": [n]}
    other_val = _RNG.normal(size=lead.get(other, [1]) + shape)
    with tf.Graph().as_default():
      out = tf.zeros([n] + shape, tf.float64)
      small_jac = jacobians.Jacobian(tf.constant(small_val), broadcast_shared)
      broad = jacobians.fit(small_jac, out)
      other_jac = jacobians.Jacobian(
        tf.constant(other_val), other == "shared", other.startswith("diag")
      )
      a, b = {
        "b_broadcast": (other_jac, broad),
        "a_broadcast": (broad, other_jac),
        "same": (broad, broad),
      }[layout]
      term = jacobians.Term(tf.constant(c_val), a, b, symmetric)
      pulled = jacobians.pulled_back(term, n)
      summed = jacobians.summed_over_broadcasts(pulled, n)
      self.assertIsNot(summed, term)
      # A square of the broadcast factor is pulled back, the others not.
      self.assertEqual(pulled is term, layout != "same")
      self.assertEqual(summed.a.value.shape[-2:], small)
      self.assertEqual(summed.b.value.shape[-2:], small)
      modes = jacobians.MODES
      values = [jacobians.contract(summed, mode, n, k) for mode in modes]
      with tf.compat.v1.Session() as sess:
        got = dict(zip(modes, sess.run(values)))
    full = np.broadcast_to(small_val, [n, k] + shape)  # (K, ...) too
    if other == "shared":
      other_val = np.broadcast_to(other_val, [n, k] + shape)
    elif other.startswith("diag"):  # J[n, k, i, j] = d[n, i, j] if j == k.
      other_val = np.einsum(
        "nij,kj->nkij", np.broadcast_to(other_val, [n] + shape), np.eye(k)
      )
    a_val, b_val = {
      "b_broadcast": (other_val, full),
      "a_broadcast": (full, other_val),
      "same": (full, full),
    }[layout]
    want = np.einsum("nxy,nkxy,nlxy->nkl", c_val, a_val, b_val)
    if symmetric:
      want = want + np.transpose(want, [0, 2, 1])
    self.assertAllClose(got[jacobians.HESSIAN], want, atol=1e-12)
    diagonal = np.einsum("nkk->nk", want)
    self.assertAllClose(got[jacobians.DIAGONAL], diagonal, atol=1e-12)
    self.assertAllClose(got[jacobians.LAPLACIAN], diagonal.sum(1), atol=1e-12)

  @parameterized.parameters(False, True)
  def test_scaling_a_broadcast_factor_writes_no_broadcast(self, shared):
    n, k = 3, 4
    small_val = _RNG.normal(size=([k] if shared else [n, k]) + [2, 1])
    s_val = _RNG.normal(size=(n, 2, 5))
    with tf.Graph().as_default():
      broad = jacobians.fit(
        jacobians.Jacobian(tf.constant(small_val), shared),
        tf.zeros([n, 2, 5], tf.float64),
      )
      scaled = jacobians.scale(broad, tf.constant(s_val))
      self.assertNotIn(
        "BroadcastTo", [t.op.type for t in scaled.value.op.inputs]
      )
      self.assertFalse(scaled.shared)
      with tf.compat.v1.Session() as sess:
        got = sess.run(scaled.value)
    full = np.broadcast_to(small_val, [n, k, 2, 5])
    self.assertAllClose(got, s_val[:, None] * full, atol=1e-12)

  def test_other_terms_stay(self):
    with tf.Graph().as_default():
      a = jacobians.dense(tf.ones([3, 4, 2]))
      out = tf.zeros([3, 2])
      same_shape = jacobians.fit(jacobians.dense(tf.ones([3, 4, 2])), out)
      for b in (a, same_shape, jacobians.dense(tf.ones([3, 4, 2]))):
        term = jacobians.Term(tf.ones([3, 2]), a, b)
        self.assertIs(jacobians.summed_over_broadcasts(term, 3), term)


@contextlib.contextmanager
def _summed_parts_calls():
  """A list of what `jacobians.summed_parts` returns while it is open."""
  calls, real = [], jacobians.summed_parts

  def summed_parts(*args):
    calls.append(real(*args))
    return calls[-1]

  with mock.patch.object(jacobians, "summed_parts", summed_parts):
    yield calls


class SummedPartsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """`jacobians.summed_parts` against the sum of the Jacobian written whole
  by numpy, and models whose Jacobians it sums against the rows."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_models_against_the_rows0",
    "test_models_against_the_rows1",
    "test_models_against_the_rows2",
    "test_models_against_the_rows3",
    "test_pairwise_potential_against_its_analytic_hessian1",
    "test_pairwise_potential_against_its_analytic_hessian2",
    "test_pairwise_potential_against_its_analytic_hessian3",
  )

  @parameterized.product(
    base=["dense", "shared"],
    ones=[(0,), (1,), (2,), (0, 2)],
    factor=["batch", "no_batch", "none"],
    then=["scale", "negate", "add_dense", "add_parts"],
  )
  def test_sums_agree_with_the_written_jacobian(self, base, ones, factor, then):
    n, k, e = 2, 3, [3, 4, 5]
    small = [1 if i in ones else d for i, d in enumerate(e)]
    lead = [k] if base == "shared" else [n, k]
    base_val = _RNG.normal(size=lead + small)
    s_val = _RNG.normal(size={"batch": [n] + e, "no_batch": e[1:]}.get(factor))
    other_val = _RNG.normal(size=[n, k] + e)
    more_val = _RNG.normal(size=[n, k, 1, 4, 1])
    t_val = _RNG.normal(size=[n] + e)
    with tf.Graph().as_default():
      out = tf.zeros([n] + e, tf.float64)
      jac = jacobians.fit(
        jacobians.Jacobian(tf.constant(base_val), base == "shared"), out
      )
      if factor != "none":
        jac = jacobians.scale(jac, tf.constant(s_val))
      if then == "negate":
        jac = jacobians.negate(jac)
      elif then == "add_dense":
        jac = jacobians.add(jac, jacobians.dense(tf.constant(other_val)))
      elif then == "add_parts":
        more = jacobians.fit(jacobians.dense(tf.constant(more_val)), out)
        more = jacobians.scale(more, tf.constant(t_val))
        jac = jacobians.add(jacobians.negate(more), jac)
      self.assertIsNotNone(jac.parts)
      if jac.shared:  # Summed without N already: left to the Sum rule.
        self.assertIsNone(jacobians.summed_parts(jac, [1], False, n, k))
        return
      sums = {}
      for axes in ([1], [2], [3], [1, 3], [1, 2, 3]):
        for keepdims in (False, True):
          summed = jacobians.summed_parts(jac, axes, keepdims, n, k)
          self.assertFalse(summed.shared or summed.diagonal)
          sums[tuple(axes), keepdims] = summed.value
          # Where a part's own axes are all summed, or none of them, or
          # its base is shared, no product (N, K, *e) is written: a
          # matmul, a sum of the factor alone, an einsum. (The part of
          # "add_parts" has one own axis: all or none.)
          own = {i + 1 for i in range(3) if i not in ones}
          unwritten = (
            base == "shared" or own <= set(axes) or not own & set(axes)
          )
          if then != "add_dense" and unwritten:
            self.assertNoProductWritten(summed.value, n * k * np.prod(e))
      with tf.compat.v1.Session() as sess:
        got = sess.run(sums)
    want = np.broadcast_to(base_val, [n, k] + e)
    if factor != "none":
      want = want * np.broadcast_to(s_val, [n] + e)[:, None]
    if then == "negate":
      want = -want
    elif then == "add_dense":
      want = want + other_val
    elif then == "add_parts":
      want = want - more_val * t_val[:, None]
    for (axes, keepdims), value in got.items():
      expected = np.sum(
        want, axis=tuple(a + 1 for a in axes), keepdims=keepdims
      )
      self.assertAllClose(value, expected, atol=1e-12, msg=f"{axes}")

  def assertNoProductWritten(self, t, size):  # pylint: disable=invalid-name
    seen, stack = set(), [t.op]
    while stack:
      op = stack.pop()
      if op in seen:
        continue
      seen.add(op)
      for o in op.outputs:
        self.assertLess(o.shape.num_elements() or 0, size, msg=op.name)
      stack.extend(i.op for i in op.inputs)

  @parameterized.parameters(
    dict(k=24, keepdims=False, ones=False),
    dict(k=24, keepdims=True, ones=False),
    dict(k=24, keepdims=False, ones=True),
    dict(k=24, keepdims=True, ones=True, unit=True),
    dict(k=24, keepdims=False, ones=False, unit=True),
    dict(k=12, keepdims=False, ones=False),
  )
  def test_gram_of_shared_bases_gives_squared_norms(
    self, k, keepdims, ones, unit=False
  ):
    # A squared distance of pairwise differences: parts of two shared bases
    # `(K, 1, P, 3)` and `(K, P, 1, 3)`, summed over the 3 coordinates: R =
    # 6, and a Gram where K (R + 1) is 4 R^2 or more (K = 24, not 12).
    # With `ones`, the second base broadcasts along the summed axis: its
    # factor is summed first, R = 4. With `unit`, every shape has an axis
    # of 1 more (entries `(P, 1, P, 3)`).
    def shape(lead, *entries):
      entries = list(entries)
      return lead + (entries[:1] + [1] + entries[1:] if unit else entries)

    n = 3
    e = shape([], 4, 4, 3)
    second = shape([k], 4, 1, 1 if ones else 3)
    bases = [_RNG.normal(size=shape([k], 1, 4, 3)), _RNG.normal(size=second)]
    factors = [_RNG.normal(size=[n] + e), _RNG.normal(size=shape([n], 1, 4, 3))]
    with tf.Graph().as_default():
      out = tf.zeros([n] + e, tf.float64)
      jac = None
      for base, factor in zip(bases, factors):
        part = jacobians.scale(
          jacobians.fit(jacobians.shared(tf.constant(base)), out),
          tf.constant(factor),
        )
        jac = part if jac is None else jacobians.add(jac, part)
      summed = jacobians.summed_parts(jac, [len(e)], keepdims, n, k)
      if k < 24:
        self.assertIsNone(summed.gram)
        return
      self.assertEqual(summed.gram.size, 4 if ones else 6)
      with tf.compat.v1.Session() as sess:
        norms, value = sess.run([summed.gram.squared_norms(), summed.value])
    want = sum(
      np.broadcast_to(b, [k] + e)[None] * np.broadcast_to(f, [n] + e)[:, None]
      for b, f in zip(bases, factors)
    ).sum(-1)
    self.assertAllClose(value.reshape(want.shape), want, atol=1e-12)
    self.assertAllClose(
      norms, np.sum(want * want, 1).reshape(n, -1), atol=1e-12
    )

  def test_jacobians_without_parts_are_not_summed(self):
    with tf.Graph().as_default():
      dense = jacobians.dense(tf.ones([2, 3, 4]))
      self.assertIsNone(jacobians.summed_parts(dense, [1], False, 2, 3))
      shared = jacobians.fit(
        jacobians.shared(tf.ones([3, 1])), tf.zeros([2, 4])
      )
      self.assertIsNone(jacobians.summed_parts(shared, [1], False, 2, 3))
      scaled = jacobians.scale(
        jacobians.fit(jacobians.dense(tf.ones([2, 3, 1])), tf.zeros([2, 4])),
        tf.ones([2, 4]),
      )
      self.assertIsNone(jacobians.cast(scaled, tf.float64).parts)

  @parameterized.parameters(
    testing_utils.in_turn(
      model=["distances", "centres_minus", "broadcast_matmul", "pairwise"]
    )
  )
  def test_models_against_the_rows(self, model, cf):
    self.control_flow(cf)
    rng = np.random.default_rng(7)
    x_val = rng.normal(size=(4, _K))
    with tf.Graph().as_default(), _summed_parts_calls() as calls:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = tf.nn.softplus(_lin(x))
      cen = tf.constant(rng.normal(size=(3, _K)))
      width = tf.constant(0.5 + rng.random(size=(3, _K)))
      if model == "distances":
        d = tf.reduce_sum(tf.square(h[:, None, :] - cen) / width, -1)
        y = tf.reduce_sum(
          tf.exp(-d) * tf.constant([0.5, -1.0, 2.0], x.dtype), 1
        )
      elif model == "centres_minus":
        d = tf.reduce_mean((cen - h[:, None, :]) ** 2, [1, 2], keepdims=True)
        y = tf.sin(d)
      elif model == "broadcast_matmul":
        w = tf.constant(rng.normal(size=(_K, 4)))
        y = tf.tanh(tf.reduce_sum(h[:, :, None] * w, 1))
      else:
        q = tf.reshape(_lin(x), [-1, 2, 3])
        kk = tf.reshape(tf.tanh(_lin(tf.sin(x))), [-1, 2, 3])
        y = tf.tanh(tf.reduce_sum(q[:, :, None, :] * kk[:, None, :, :], -1))
      h, d, lap = _second_derivatives(y, x, "forward")
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        h_val, d_val, lap_val, want = sess.run([h, d, lap, rows], {x: x_val})
        reference = _batch_reference(sess, x, y, x_val)
    self.assertTrue(any(c is not None for c in calls))
    self.assertAllClose(h_val, want, atol=1e-10)
    self.assertAllClose(h_val, reference, atol=1e-6)
    self.assertAllClose(d_val, np.einsum("nii->ni", want), atol=1e-10)
    self.assertAllClose(lap_val, np.einsum("nii->n", want), atol=1e-10)

  @parameterized.parameters(
    testing_utils.in_turn(dim=[2, 3], method=["auto", "forward"])
  )
  def test_pairwise_potential_against_its_analytic_hessian(
    self, dim, method, cf
  ):
    # The energy of 8 particles, sum over i < j of phi(|r_i - r_j|^2): the
    # squared distance sums the products of a pairwise difference, whose
    # Jacobian is shared, over the coordinates it keeps apart per pair.
    self.control_flow(cf)
    p = 8
    x_val = 2.0 * _RNG.normal(size=(5, p * dim))
    upper = np.triu(np.ones((p, p)), 1)
    with tf.Graph().as_default(), _summed_parts_calls() as calls:
      x = tf.compat.v1.placeholder(tf.float64, [None, p * dim])
      r = tf.reshape(x, [-1, p, dim])
      diff = r[:, :, None, :] - r[:, None, :, :]
      u = tf.reduce_sum(diff * diff, -1) + 1.0
      phi = 4.0 * (tf.pow(u, -6.0) - tf.pow(u, -3.0))
      y = tf.reduce_sum(phi * upper, [1, 2])
      out = _second_derivatives(y, x, method)
      with tf.compat.v1.Session() as sess:
        h_val, d_val, lap_val = sess.run(out, {x: x_val})
    # The squared distances' Laplacian terms take their Gram.
    self.assertTrue(any(c is not None and c.gram is not None for c in calls))
    # d phi(|d|^2) / dd dd = 2 phi' I + 4 phi'' d d^T, with u = |d|^2 + 1:
    # phi' = 4 (-6 u^-7 + 3 u^-4), phi'' = 4 (42 u^-8 - 12 u^-5).
    want = np.zeros((len(x_val), p, dim, p, dim))
    r_val = x_val.reshape(-1, p, dim)
    for i in range(p):
      for j in range(i + 1, p):
        d = r_val[:, i] - r_val[:, j]
        u_val = np.sum(d * d, -1) + 1.0
        d1 = 4.0 * (-6.0 * u_val**-7 + 3.0 * u_val**-4)
        d2 = 4.0 * (42.0 * u_val**-8 - 12.0 * u_val**-5)
        block = 2.0 * d1[:, None, None] * np.eye(dim) + 4.0 * d2[
          :, None, None
        ] * (d[:, :, None] * d[:, None, :])
        want[:, i, :, i] += block
        want[:, j, :, j] += block
        want[:, i, :, j] -= block
        want[:, j, :, i] -= block
    want = want.reshape(len(x_val), p * dim, p * dim)
    self.assertAllClose(h_val, want, atol=1e-10)
    self.assertAllClose(d_val, np.einsum("nii->ni", want), atol=1e-10)
    self.assertAllClose(lap_val, np.einsum("nii->n", want), atol=1e-10)


class PulledBackTest(tf.test.TestCase, parameterized.TestCase):
  """`jacobians.pulled_back` against the contraction of the term it
  replaces, for scaled, negated and twice scaled factors."""

  @parameterized.product(
    base=["dense", "shared", "diagonal"],
    layout=["same", "pair", "one_scaled", "summed"],
    symmetric=[False, True],
  )
  def test_terms_keep_their_contractions(self, base, layout, symmetric):
    n, k, e = 3, 4, [2, 4]
    lead = {"dense": [n, k], "shared": [k], "diagonal": [n]}[base]

    def factor():
      return jacobians.Jacobian(
        tf.constant(_RNG.normal(size=lead + e)),
        base == "shared",
        base == "diagonal",
      )

    def s():
      return tf.constant(_RNG.normal(size=[n] + e))

    with tf.Graph().as_default():
      u, w = factor(), factor()
      a = jacobians.negate(jacobians.scale(jacobians.scale(u, s()), s()))
      b = {
        "same": a,
        "pair": jacobians.scale(w, s()),
        "one_scaled": w,
        # The product rule's two terms of `w * f(w)`, and `w` itself.
        "summed": jacobians.add(
          jacobians.add(jacobians.scale(w, s()), w),
          jacobians.negate(jacobians.scale(jacobians.scale(w, s()), s())),
        ),
      }[layout]
      term = jacobians.Term(
        tf.constant(_RNG.normal(size=[n] + e)), a, b, symmetric
      )
      pulled = jacobians.pulled_back(term, n)
      self.assertIs(pulled.a, u)
      self.assertIs(pulled.b, u if layout == "same" else w)
      self.assertSameContractions(pulled, term, n, k)

  @parameterized.product(
    base=["dense", "shared"], layout=["same", "pair"], symmetric=[False, True]
  )
  def test_views_and_broadcasts(self, base, layout, symmetric):
    # `sin(reshape(u)[:, None] - mu)`: the terms of views of a broadcast.
    n, k = 3, 4
    lead = [k] if base == "shared" else [n, k]
    with tf.Graph().as_default():
      u = tf.zeros([n, 6], tf.float64)
      v = tf.reshape(u, [-1, 2, 3])[:, None] - tf.constant(
        _RNG.normal(size=(5, 2, 3))
      )
      ctx = engine._Context(n, k, tf.float64)
      ju = jacobians.Jacobian(
        tf.constant(_RNG.normal(size=lead + [6])), base == "shared"
      )
      jw = jacobians.dense(tf.constant(_RNG.normal(size=[n, k, 6])))
      reshape, expand = v.op.inputs[0].op.inputs[0].op, v.op.inputs[0].op
      views = []
      for j in (ju, jw):
        (r,) = registry.RULES["Reshape"].fn(reshape, [j, None], ctx)
        (e,) = registry.RULES["StridedSlice"].fn(expand, [r] + [None] * 3, ctx)
        views.append(jacobians.fit(e, v))
      a, b = views if layout == "pair" else views[:1] * 2
      term = jacobians.Term(
        tf.constant(_RNG.normal(size=(n, 5, 2, 3))), a, b, symmetric
      )
      pulled = jacobians.pulled_back(term, n)
      self.assertIs(pulled.a, ju)
      self.assertIs(pulled.b, jw if layout == "pair" else ju)
      self.assertSameContractions(pulled, term, n, k)

  def assertSameContractions(self, pulled, term, n, k):  # pylint: disable=invalid-name
    modes = jacobians.MODES
    got = [jacobians.contract(pulled, m, n, k) for m in modes]
    want = [jacobians.contract(term, m, n, k) for m in modes]
    got, want = self.evaluate([got, want])
    for g, w in zip(got, want):
      self.assertAllClose(g, w, atol=1e-12)

  def test_unscaled_terms_stay(self):
    with tf.Graph().as_default():
      a = jacobians.dense(tf.ones([2, 3, 4]))
      term = jacobians.Term(
        tf.ones([2, 4]), a, jacobians.shared(tf.ones([3, 4]))
      )
      self.assertIs(jacobians.pulled_back(term, 2), term)


class ScaleChainTest(tf.test.TestCase, parameterized.TestCase):
  """`jacobians.scale_chain`: a Jacobian as its root times one factor."""

  def _root_and_factors(self, base):
    n, k, h = 3, 4, 5
    lead = {"dense": [n, k], "shared": [k]}[base]
    root = jacobians.Jacobian(
      tf.constant(_RNG.normal(size=lead + [h])), base == "shared"
    )
    factors = [tf.constant(_RNG.normal(size=(n, h))) for _ in range(3)]
    return root, factors

  def assertIsScaleOf(self, jac, root):  # pylint: disable=invalid-name
    """`jac`'s value is `root`'s times the factor of its chain."""
    chain_root, factor = jacobians.scale_chain(jac)
    self.assertIs(chain_root, root)
    value = jacobians.to_dense(jac, 3)
    factor = tf.broadcast_to(factor, [3, 5])  # A number for `z + z`.
    scaled = jacobians.to_dense(root, 3) * tf.expand_dims(factor, 1)
    value, scaled = self.evaluate([value, scaled])
    self.assertAllClose(value, scaled, atol=1e-12)

  @parameterized.parameters("dense", "shared")
  def test_chains_of_scales(self, base):
    # `-c * sin(tanh(z))`: three scales and a negation of `J_z`.
    with tf.Graph().as_default():
      root, (s, t, u) = self._root_and_factors(base)
      jac = jacobians.scale(jacobians.scale(root, s), t)
      jac = jacobians.negate(jacobians.scale(jac, u))
      self.assertIsScaleOf(jac, root)
      self.assertIsNone(jacobians.scale_chain(root))

  @parameterized.parameters("dense", "shared")
  def test_sums_of_scales_of_one_jacobian(self, base):
    # `z * sigmoid(z) + z`: `(sigmoid + z sigmoid') J_z + J_z`.
    with tf.Graph().as_default():
      root, (s, t, u) = self._root_and_factors(base)
      product = jacobians.add(
        jacobians.scale(root, s),
        jacobians.scale(jacobians.scale(root, t), u),
      )
      self.assertIsScaleOf(product, root)
      self.assertIsScaleOf(jacobians.add(product, root), root)
      self.assertIsScaleOf(jacobians.add(root, root), root)

  def test_sums_of_scales_of_two_jacobians_are_not_scales(self):
    with tf.Graph().as_default():
      root, (s, t, _) = self._root_and_factors("dense")
      other = jacobians.dense(root.value + 1.0)
      total = jacobians.add(jacobians.scale(root, s), jacobians.scale(other, t))
      self.assertIsNone(jacobians.scale_chain(total))
      self.assertIsNone(jacobians.scale_chain(jacobians.add(root, other)))


class MergedTermsTest(tf.test.TestCase):
  """`jacobians.merged_by_factor` against the terms it replaces."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = ("test_gated_model_against_the_rows",)

  def _hessian(self, terms, n, k):
    return tf.add_n(
      [jacobians.contract(t, jacobians.HESSIAN, n, k) for t in terms]
    )

  def test_terms_sharing_a_factor_become_one(self):
    n, k, e = 3, 4, [2, 5]

    def dense():
      return jacobians.dense(tf.constant(_RNG.normal(size=[n, k] + e)))

    def c():
      return tf.constant(_RNG.normal(size=[n] + e))

    f, g, o1, o2, o3 = (dense() for _ in range(5))
    shared = jacobians.shared(tf.constant(_RNG.normal(size=[k] + e)))
    terms = [
      jacobians.Term(c(), f, o1, symmetric=True),
      jacobians.Term(c(), o2, f, symmetric=True),
      jacobians.Term(c(), f),  # F^T c F
      jacobians.Term(c(), f, f, symmetric=True),
      jacobians.Term(c(), g, o3, symmetric=True),  # Shares nothing.
      jacobians.Term(c(), g, shared, symmetric=True),  # A shared factor.
      jacobians.Term(c(), o3, o1),  # Not symmetric: stays.
    ]
    merged = jacobians.merged_by_factor(terms, n)
    self.assertLen(merged, 4)
    for t in terms[4:]:
      self.assertTrue(any(t is u for u in merged))
    self.assertIs(merged[-1].a, f)
    got, want = self.evaluate(
      [self._hessian(merged, n, k), self._hessian(terms, n, k)]
    )
    self.assertAllClose(got, want, atol=1e-12)

  def test_gated_model_against_the_rows(self):
    # `a * swish(b)`: the terms of `b`, `b * sigmoid(b)` and `a * swish`
    # share factors; K = 9 is above `engine._MERGE_MIN_K`.
    k = 9
    w_h = _RNG.normal(size=(k, 7)) / 3
    w_a, w_b = (_RNG.normal(size=(7, 6)) / 3 for _ in range(2))
    x_val = _RNG.normal(size=(5, k))
    calls = []
    real = jacobians.merged_by_factor

    def merged_by_factor(terms, n):
      merged = real(terms, n)
      calls.append(len(terms) - len(merged))
      return merged

    with (
      tf.Graph().as_default(),
      mock.patch.object(jacobians, "merged_by_factor", merged_by_factor),
    ):
      x = tf.compat.v1.placeholder(tf.float64, [None, k])
      hidden = tf.tanh(tf.matmul(x, w_h))
      a, b = tf.matmul(hidden, w_a), tf.matmul(hidden, w_b)
      y = tf.reduce_sum(tf.tanh(a * (b * tf.sigmoid(b))), 1)
      h = tf1hess.batch_hessians(y, x, method="forward")
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        got, want = sess.run([h, rows], {x: x_val})
    self.assertGreater(max(calls), 0)
    self.assertAllClose(got, want, atol=1e-10)

  def test_terms_sharing_nothing_stay(self):
    n, k = 2, 3
    a, b, d = (
      jacobians.dense(tf.constant(_RNG.normal(size=[n, k, 4])))
      for _ in range(3)
    )
    terms = [
      jacobians.Term(tf.ones([n, 4], tf.float64), a, b, symmetric=True),
      jacobians.Term(tf.ones([n, 4], tf.float64), d),
    ]
    merged = jacobians.merged_by_factor(terms, n)
    self.assertLen(merged, 2)
    self.assertTrue(all(t is u for t, u in zip(terms, merged)))


class SummedAdjointsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """The adjoint of a sum taken before its broadcast, and the contraction of
  diagonal factors by such a `c` as a matmul, against numpy."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = ("test_a_summed_tensor_that_is_also_an_output0",)

  @parameterized.parameters("Sum", "Mean")
  def test_adjoint_before_a_sum(self, reduction):
    v_val = _RNG.normal(size=(3, 2, 4, 5))
    reduce = {"Sum": tf.reduce_sum, "Mean": tf.reduce_mean}[reduction]
    with tf.Graph().as_default():
      v = tf.compat.v1.placeholder(tf.float64, [None, 2, 4, 5])
      square = v * v
      w = tf.constant(_RNG.normal(size=(2,)))
      y = tf.reduce_sum(reduce(square, [-1, 2]) * w)
      path = engine.path_ops(v, [y])
      summed = engine._summed_by(square, path, [y])
      self.assertEqual(summed[0].type, reduction)
      self.assertEqual(summed[1], [2, 3])
      adj = engine._adjoint_before(
        summed, square, tf.gradients(y, summed[0].outputs[0])[0]
      )
      self.assertEqual(adj.shape.as_list(), [None, 2, 1, 1])
      want = tf.gradients(y, square)[0]
      tf.shape(square)  # A use off the path to y.
      self.assertEqual(engine._summed_by(square, path, [y]), summed)
      self.assertIsNone(engine._summed_by(square, [], [y]))
      self.assertIsNone(engine._summed_by(v, path, [y]))  # Used by a product.
      over_batch = tf.reduce_sum(tf.sin(v), 0)
      self.assertIsNone(
        engine._summed_by(
          over_batch.op.inputs[0], engine.path_ops(v, [over_batch]), [y]
        )
      )
      # A tensor that is one of `ys` has an adjoint of its own.
      self.assertIsNone(
        engine._summed_by(square, engine.path_ops(v, [y, square]), [y, square])
      )
      with tf.compat.v1.Session() as sess:
        adj_val, want_val = sess.run([adj, want], {v: v_val})
    self.assertAllClose(np.broadcast_to(adj_val, want_val.shape), want_val)

  @parameterized.parameters(
    testing_utils.in_turn(order=["sum_first", "sum_last"])
  )
  def test_a_summed_tensor_that_is_also_an_output(self, order, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      u = tf.sin(x) * tf.sin(x)
      s = tf.reduce_mean(u, -1)
      ys = [s, u] if order == "sum_first" else [u, s]
      got = [
        f(ys, x, method="forward")
        for f in (tf1hess.batch_hessians, tf1hess.batch_laplacians)
      ]
      rows = tf1hess.batch_hessians(ys, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        h, lap, want = sess.run(got + [rows], {x: x_val_of(4)})
    self.assertAllClose(h, want, atol=1e-10)
    self.assertAllClose(lap, np.einsum("nii->n", want), atol=1e-10)

  @parameterized.product(
    c_shape=["n_e_1", "1_e_1", "n_1_1", "n_e_k"], symmetric=[False, True]
  )
  def test_diagonal_terms_by_a_summed_adjoint(self, c_shape, symmetric):
    n, k, e = 3, 4, 2
    shape = {
      "n_e_1": [n, e, 1],
      "1_e_1": [1, e, 1],
      "n_1_1": [n, 1, 1],
      "n_e_k": [n, e, k],
    }[c_shape]
    c_val = _RNG.normal(size=shape)
    a_val, b_val = _RNG.normal(size=(2, 1, e, k))
    with tf.Graph().as_default() as graph:
      a = jacobians.diagonal(tf.constant(a_val))
      b = jacobians.diagonal(tf.constant(b_val))
      term = jacobians.Term(tf.constant(c_val), a, b, symmetric)
      modes = jacobians.MODES
      values = [jacobians.contract(term, mode, n, k) for mode in modes]
      matmuls = [op for op in graph.get_operations() if op.type == "MatMul"]
      with tf.compat.v1.Session() as sess:
        got = dict(zip(modes, sess.run(values)))
    self.assertEqual(bool(matmuls), c_shape != "n_e_k")
    # J_a[n, k, i, j] = a[i, j] if j == k.
    c_full = np.broadcast_to(c_val, [n, e, k])
    diagonal = np.einsum("nij,ij->nj", c_full, a_val[0] * b_val[0])
    if symmetric:
      diagonal = 2 * diagonal
    want = np.einsum("nk,kl->nkl", diagonal, np.eye(k))
    self.assertAllClose(got[jacobians.HESSIAN], want, atol=1e-12)
    self.assertAllClose(got[jacobians.DIAGONAL], diagonal, atol=1e-12)
    self.assertAllClose(got[jacobians.LAPLACIAN], diagonal.sum(1), atol=1e-12)


class EagerTest(tf.test.TestCase):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = ("test_eager_laplacians_and_forward_hessians",)

  def test_eager_laplacians_and_forward_hessians(self):
    x = tf.constant(x_val_of(4))

    def fn(v):
      return tf.reduce_sum(tf.tanh(_lin(tf.sin(v))), axis=1)

    lap = tf1hess.eager.batch_laplacians(fn, x)
    h = tf1hess.eager.batch_hessians(fn, x, method="forward")
    rows = tf1hess.eager.batch_hessians(fn, x, method="while_loop")
    self.assertAllClose(h, rows, atol=1e-10)
    self.assertAllClose(lap, np.einsum("nii->n", rows.numpy()), atol=1e-10)

    @tf.function(input_signature=[tf.TensorSpec([None, _K], tf.float64)])
    def traced(v):
      return tf1hess.eager.batch_laplacians(fn, v, method="forward")

    self.assertAllClose(traced(x), lap, atol=1e-10)


if __name__ == "__main__":
  tf.test.main()
