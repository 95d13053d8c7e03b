"""The forward rules of convolutions, pooling, `where`, reversals, products
and elementwise functions give the numbers of the rows and of differences.

Every rule is checked alone (a small model whose curvature passes through
the op) and in small networks (`tf.compat.v1.layers` convolutions, pooling,
flatten and dense layers; a 1-D convolution net; a depthwise convolution; a
gelu MLP; a piecewise function made with `tf.where`), under control flow v1
and v2, in float64, against the plain row loop (`method="while_loop"`) built
in the same graph and against central differences of `tf.gradients`, for
the full Hessians, their diagonals and their traces. Inputs `(N, K)`
reshaped to images and inputs that are images `(N, H, W, C)` both go
through. Convolutions that TensorFlow's CPU kernels run in float32 only (the
NCHW format, dilations) are checked in float32 against the rows and against
float64 differences of an equivalent NHWC, undilated model.
"""

import functools
from unittest import mock
import zlib

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess
from tf1hess.forward import conv
from tf1hess.forward import dispatch
from tf1hess.forward import jacobians
from tf1hess.forward import registry
from tf1hess.forward import structural

_K = 12
_RNG = np.random.default_rng(7)
_W = _RNG.normal(size=(_K, _K)) / np.sqrt(_K)
_W2 = np.random.default_rng(17).normal(size=(_K, _K)) / np.sqrt(_K)
_F = _RNG.normal(size=(3, 3, 2, 3)) / 3.0  # 3x3 filters, 2 -> 3 channels.
_F1 = _RNG.normal(size=(3, 2, 3)) / 2.0  # Width 3, 2 -> 3 channels.
_FD = _RNG.normal(size=(2, 2, 2, 2)) / 2.0  # Depthwise, multiplier 2.
# Well-conditioned matrices to solve by: lower triangular 3 x 3 and K x K,
# square 3 x 3 and K x K.
_SOLVE_RNG = np.random.default_rng(23)
_TRI3, _TRI, _SQ3, _SQ = (
  np.tril(_SOLVE_RNG.normal(size=(d, d))) / d + 2.0 * np.eye(d)
  if lower
  else _SOLVE_RNG.normal(size=(d, d)) / d + 2.0 * np.eye(d)
  for d, lower in ((3, True), (_K, True), (3, False), (_K, False))
)
_F3 = _RNG.normal(size=(2, 2, 2, 1, 2)) / 2.0  # 2x2x2 filters, 1 -> 2.


def _lin(x):
  """A dense layer: every entry depends on every feature."""
  return tf.matmul(x, tf.constant(_W, x.dtype)) + 0.3


def _lin2(x):
  """Another dense layer, of other weights."""
  return tf.matmul(x, tf.constant(_W2, x.dtype)) - 0.2


def _image(t, shape=(2, 3, 2)):
  """`t` `(N, 12)` as images `(N, H, W, C)`."""
  return tf.reshape(t, [-1, *shape])


def _filter(f, like):
  return tf.constant(f, like.dtype)


def _matrices(x):
  """`(N, 3, 3)` matrices of the first 9 features of x, plus 3 I."""
  m = tf.reshape(tf.sin(x[:, :9]), [-1, 3, 3])
  return m + 3.0 * tf.eye(3, dtype=x.dtype)


def _gram(m):
  """`m m^T + I`: symmetric positive definite."""
  return tf.matmul(m, m, transpose_b=True) + tf.eye(3, dtype=m.dtype)


def _where_cond(x):
  return x[:, :1] * x[:, 1:2] > 0


def _burgers_residual(x, output=lambda xs, ts, h: tf.reduce_sum(h, 1, True)):
  """`u_t + u u_x - 0.01 u_xx` of a tanh network of `(x, t, rest)`, read
  from the columns of `x` as physics-informed code does, its dense layers
  a matmul and a `bias_add` as DeepXDE's, `u` the `output` of `(x, t, h)`,
  `h` the last layer. (Where a layer adds a scalar, TensorFlow 2.12's
  second gradient reshapes to the shape of a sum whose rank it does not
  know: the engine declines there, the rows take it.)"""
  xs, ts = x[:, 0:1], x[:, 1:2]
  h = tf.concat([xs, ts, x[:, 2:]], 1)
  for weights, bias in ((_W, 0.3), (_W2, -0.2)):
    h = tf.tanh(
      tf.nn.bias_add(
        tf.matmul(h, tf.constant(weights, x.dtype)),
        tf.fill([_K], tf.constant(bias, x.dtype)),
      )
    )
  u = output(xs, ts, h)
  u_x, u_t = tf.gradients(u, [xs, ts])
  u_xx = tf.gradients(u_x, xs)[0]
  return u_t + u * u_x - 0.01 * u_xx


def _own_indices(x, entries):
  """`(N, len(entries), 1 + depth)` indices `[n, *entry]` of each sample's
  own `entries`."""
  n = tf.shape(x)[0]
  rows = tf.tile(tf.range(n)[:, None, None], [1, len(entries), 1])
  tiled = tf.tile(tf.constant(entries)[None], tf.stack([n, 1, 1]))
  return tf.concat([rows, tiled], 2)


def _forces(pooled, x):
  """The gradient of the energy `sum(sin(pooled(h)))` of a dense layer `h`
  of x."""
  energy = tf.reduce_sum(tf.sin(pooled(_lin(x))), [1, 2, 3])
  return tf.gradients(energy, x)[0]


# name -> (op type that must be in the graph, per-sample model of (N, 12)).
# Models start from x itself (a shared Jacobian reaches the op), from a
# dense layer (shared) or from tanh of it (dense), to take each path.
_RULES = {
  "Conv2D_same": (
    "Conv2D",
    lambda x: tf.tanh(tf.nn.conv2d(_image(x), _filter(_F, x), 1, "SAME")),
  ),
  "Conv2D_valid_strides": (
    "Conv2D",
    lambda x: tf.nn.softplus(
      tf.nn.conv2d(
        _image(tf.tanh(_lin(x)), (4, 3, 1)),
        _filter(_F[:, :2, :1], x),
        [1, 2, 1, 1],
        "VALID",
      )
    ),
  ),
  "Conv2D_explicit_padding": (
    "Conv2D",
    lambda x: tf.tanh(
      tf.nn.conv2d(
        tf.sin(_image(_lin(x))),
        _filter(_F, x),
        [1, 1, 2, 1],
        [[0, 0], [1, 0], [2, 1], [0, 0]],
      )
    ),
  ),
  "Conv1D": (
    "Conv2D",
    lambda x: tf.tanh(
      tf.nn.conv1d(
        tf.sin(tf.reshape(_lin(x), [-1, 6, 2])), _filter(_F1, x), 2, "SAME"
      )
    ),
  ),
  "DepthwiseConv2dNative": (
    "DepthwiseConv2dNative",
    lambda x: tf.nn.softplus(
      tf.nn.depthwise_conv2d(
        tf.tanh(_image(_lin(x))), _filter(_FD, x), [1, 1, 1, 1], "SAME"
      )
    ),
  ),
  "DepthwiseConv2dNative_strides": (
    "DepthwiseConv2dNative",
    lambda x: tf.tanh(
      tf.nn.depthwise_conv2d(
        _image(x, (3, 2, 2)), _filter(_FD, x), [1, 2, 2, 1], "VALID"
      )
    ),
  ),
  # tf.nn.convolution with dilations > 1: SpaceToBatchND, Conv2D,
  # BatchToSpaceND (SAME padding: paddings and crops on both).
  "SpaceToBatchND_BatchToSpaceND": (
    "SpaceToBatchND",
    lambda x: tf.tanh(
      tf.nn.convolution(
        tf.sin(_image(_lin(x), (3, 4, 1))),
        _filter(_F[:2, :2, :1], x),
        padding="SAME",
        dilations=2,
      )
    ),
  ),
  "SpaceToBatchND_depthwise": (
    "BatchToSpaceND",
    lambda x: tf.nn.depthwise_conv2d(
      _image(_lin(x), (2, 3, 2)),
      _filter(_FD, x),
      [1, 1, 1, 1],
      "VALID",
      dilations=[1, 2],
    ),
  ),
  # tf.nn.conv2d_transpose: 2 -> 3 channels, stride 2, the output's batch
  # read from the image's shape.
  "Conv2DBackpropInput": (
    "Conv2DBackpropInput",
    lambda x: tf.tanh(
      (
        lambda h: tf.nn.conv2d_transpose(
          h,
          _filter(np.transpose(_F, [0, 1, 3, 2]), x),
          tf.stack([tf.shape(h)[0], 4, 6, 3]),
          2,
          "SAME",
        )
      )(tf.sin(_image(_lin(x))))
    ),
  ),
  # Volumes (N, D, H, W, C): 1 -> 2 channels, then 2 -> 1 transposed.
  "Conv3D": (
    "Conv3D",
    lambda x: tf.tanh(
      tf.nn.conv3d(
        tf.sin(_image(_lin(x), (2, 3, 2, 1))),
        _filter(_F3, x),
        [1, 1, 1, 1, 1],
        "SAME",
      )
    ),
  ),
  "Conv3D_of_x_strides": (
    "Conv3D",
    lambda x: (
      tf.nn.conv3d(
        _image(x, (3, 2, 2, 1)), _filter(_F3, x), [1, 2, 1, 1, 1], "VALID"
      )
      * tf.sin(x[:, :1, None, None, None])
    ),
  ),
  "Conv3DBackpropInputV2": (
    "Conv3DBackpropInputV2",
    lambda x: tf.tanh(
      (
        lambda h: tf.nn.conv3d_transpose(
          h,
          _filter(_F3[..., :1], x),
          tf.stack([tf.shape(h)[0], 4, 6, 4, 1]),
          2,
          "SAME",
        )
      )(tf.sin(_image(_lin(x), (2, 3, 2, 1))))
    ),
  ),
  # Gathers by index tuples whose first entry is the row's own sample
  # (`tf.gather_nd(h, tf.stack([tf.range(N), labels], 1))`, batch_dims=1),
  # of dense and shared Jacobians, and of whole samples.
  "GatherNd_own_rows": (
    "GatherNd",
    lambda x: tf.gather_nd(
      tf.tanh(tf.reshape(_lin(x), [-1, 3, 4])),
      tf.stack([tf.range(tf.shape(x)[0]), tf.fill(tf.shape(x)[:1], 1)], 1),
    ),
  ),
  "GatherNd_batch_dims": (
    "GatherNd",
    lambda x: tf.gather_nd(
      tf.sin(tf.reshape(_lin(x), [-1, 3, 4])),
      tf.tile([[[2], [0]]], tf.stack([tf.shape(x)[0], 1, 1])),
      batch_dims=1,
    ),
  ),
  "GatherNd_entries_of_x": (
    "GatherNd",
    lambda x: (
      tf.tanh(
        tf.gather_nd(
          tf.reshape(x, [-1, 3, 4]),
          tf.stack(
            [
              tf.tile(tf.range(tf.shape(x)[0])[:, None], [1, 2]),
              tf.fill(tf.stack([tf.shape(x)[0], 2]), 2),
              tf.tile([[3, 1]], tf.stack([tf.shape(x)[0], 1])),
            ],
            axis=2,
          ),
        )
      )
      * tf.sin(x[:, :2])
    ),
  ),
  "GatherNd_whole_samples": (
    "GatherNd",
    lambda x: tf.tanh(
      tf.gather_nd(_lin(x), tf.range(tf.shape(x)[0])[:, None]) * x
    ),
  ),
  # tf.gather with batch_dims: each sample's own indices, of a dense
  # Jacobian and of x's shared one.
  "GatherV2_batch_dims": (
    "GatherV2",
    lambda x: tf.gather(
      tf.sin(tf.reshape(_lin(x), [-1, 3, 4])),
      tf.tile([[2, 0, 2]], tf.stack([tf.shape(x)[0], 1])),
      axis=1,
      batch_dims=1,
    ),
  ),
  "GatherV2_batch_dims_of_x": (
    "GatherV2",
    lambda x: (
      tf.tanh(
        tf.gather(
          tf.reshape(x, [-1, 3, 4]),
          tf.tile([[[1, 3], [0, 0], [2, 1]]], tf.stack([tf.shape(x)[0], 1, 1])),
          axis=2,
          batch_dims=-1,
        )
      )
      * tf.sin(x[:, :3, None])
    ),
  ),
  # Time-major (the batch axis last): index tuples and segments over the
  # other axes.
  "GatherNd_time_major": (
    "GatherNd",
    lambda x: (
      tf.transpose(
        tf.gather_nd(
          tf.transpose(tf.sin(tf.reshape(_lin(x), [-1, 3, 4])), [2, 1, 0]),
          [[0, 1], [3, 2], [1, 1]],
        )
      )
      * tf.tanh(x[:, :3])
    ),
  ),
  "SegmentSum_time_major": (
    "SegmentSum",
    lambda x: tf.square(
      tf.transpose(
        tf.math.segment_sum(
          tf.transpose(tf.tanh(_lin(x))), [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
        )
      )
    ),
  ),
  "UnsortedSegmentSum_time_major": (
    "UnsortedSegmentSum",
    lambda x: (
      tf.transpose(
        tf.math.unsorted_segment_sum(
          tf.transpose(tf.reshape(x * _lin(x), [-1, 3, 4]), [1, 2, 0]),
          [[4, 0, 1, 0], [2, 2, 4, 1], [0, 3, 3, 3]],
          5,
        )
      )
      * tf.sin(x[:, 3:8])
    ),
  ),
  # Losses and log-densities (tf.math.xlogy and kin, 0 where a is 0).
  "Xlogy": (
    "Xlogy",
    lambda x: tf.math.xlogy(_lin(x), tf.square(tf.sin(x)) + 0.5),
  ),
  "Xlogy_zeros": (
    "Xlogy",
    lambda x: tf.math.xlogy(tf.nn.relu(x), tf.square(_lin(x)) + 0.5),
  ),
  "Xlog1py": (
    "Xlog1py",
    lambda x: tf.math.xlog1py(tf.sin(x), tf.square(_lin(x))),
  ),
  "Xdivy": (
    "Xdivy",
    lambda x: tf.math.xdivy(_lin(x), tf.square(tf.sin(x)) + 0.5),
  ),
  "Atan2": ("Atan2", lambda x: tf.math.atan2(tf.sin(x), _lin(x) + 2.0)),
  # A periodic input (`%`): the rule's first derivatives, then curvature
  # from the functions around it.
  "FloorMod": ("FloorMod", lambda x: tf.tanh(x) * (tf.square(x) % 1.5)),
  "FloorMod_period": (
    "FloorMod",
    lambda x: tf.math.floormod(tf.sin(x) + 2.0, tf.exp(_lin(x)) + 0.5) * x,
  ),
  "TopKV2": (
    "TopKV2",
    lambda x: tf.math.top_k(tf.sin(tf.reshape(_lin(x), [-1, 3, 4])), 2)[0],
  ),
  "TopKV2_sort": ("TopKV2", lambda x: tf.sort(tf.tanh(_lin(x))) * x),
  # Keras UpSampling2D's default; TensorFlow has no second derivative.
  "ResizeNearestNeighbor": (
    "ResizeNearestNeighbor",
    lambda x: tf.square(
      tf.image.resize(tf.tanh(_image(_lin(x))), [3, 5], "nearest")
    ),
  ),
  "AvgPool": (
    "AvgPool",
    lambda x: tf.square(
      tf.nn.avg_pool2d(tf.tanh(_image(_lin(x))), [2, 2], [1, 2], "SAME")
    ),
  ),
  "MaxPool_same": (
    "MaxPool",
    lambda x: tf.square(
      tf.nn.max_pool2d(tf.tanh(_image(_lin(x))), 2, [1, 2], "SAME")
    ),
  ),
  "MaxPool_valid_of_x": (
    "MaxPool",
    lambda x: tf.sin(
      tf.nn.max_pool2d(_image(x, (3, 4, 1)), [2, 3], 1, "VALID")
    ),
  ),
  "MaxPool_explicit_padding": (
    "MaxPool",
    lambda x: tf.square(
      tf.nn.max_pool2d(
        tf.sin(_image(_lin(x))), 2, 2, [[0, 0], [1, 0], [0, 1], [0, 0]]
      )
    ),
  ),
  # Two functions a model, each of its own half of a dense layer.
  "Erf_Erfc": (
    "Erf",
    lambda x: tf.math.erf(_lin(x)[:, :6]) * tf.math.erfc(_lin(x)[:, 6:]),
  ),
  # Away from the poles of the gamma function, inside the domains of the
  # inverses of Gaussian integrals.
  "Lgamma_Digamma": (
    "Lgamma",
    lambda x: (
      tf.math.lgamma(0.5 + tf.nn.softplus(_lin(x)[:, :6]))
      * tf.math.digamma(1 + tf.exp(0.5 * _lin(x)[:, 6:]))
    ),
  ),
  "Erfinv_Ndtri": (
    "Erfinv",
    lambda x: (
      tf.math.erfinv(0.9 * tf.tanh(_lin(x)[:, :6]))
      + tf.math.ndtri(tf.sigmoid(_lin(x)[:, 6:]))
    ),
  ),
  "Tan": ("Tan", lambda x: tf.tan(0.4 * _lin(x))),
  "Polygamma": (
    "Polygamma",
    lambda x: tf.math.polygamma(
      tf.constant(1.0, x.dtype), 1 + tf.nn.softplus(_lin(x))
    ),
  ),
  "Igamma_Igammac": (
    "Igamma",
    lambda x: (
      tf.math.igamma(tf.constant(2.0, x.dtype), tf.nn.softplus(_lin(x)[:, :6]))
      * tf.math.igammac(
        tf.constant([[0.7]], x.dtype), 0.1 + tf.nn.softplus(_lin(x)[:, 6:])
      )
    ),
  ),
  "BesselI0e_BesselI1e": (
    "BesselI0e",
    lambda x: (
      tf.math.bessel_i0e(_lin(x)[:, :6]) * tf.math.bessel_i1e(_lin(x)[:, 6:])
    ),
  ),
  "BesselI0_BesselI1": (
    "BesselI0",
    lambda x: (
      tf.math.bessel_i0(0.5 * _lin(x)[:, :6])
      + tf.math.bessel_i1(_lin(x)[:, 6:])
    ),
  ),
  "EnsureShape": (
    "EnsureShape",
    lambda x: tf.tanh(tf.ensure_shape(tf.sin(_lin(x)), [None, _K])),
  ),
  "DepthToSpace": (
    "DepthToSpace",
    lambda x: tf.tanh(
      tf.nn.depth_to_space(_image(tf.sin(_lin(x)), (1, 3, 4)), 2)
    ),
  ),
  "SpaceToDepth": (
    "SpaceToDepth",
    lambda x: tf.tanh(tf.nn.space_to_depth(_image(x, (2, 6, 1)), 2)),
  ),
  "ExtractImagePatches": (
    "ExtractImagePatches",
    lambda x: tf.tanh(
      tf.image.extract_patches(
        _image(tf.sin(_lin(x)), (3, 4, 1)),
        [1, 2, 2, 1],
        [1, 1, 2, 1],
        [1, 1, 1, 1],
        "SAME",
      )
    ),
  ),
  # Both vectors of x, then one constant.
  "Cross": (
    "Cross",
    lambda x: (
      tf.linalg.cross(
        tf.reshape(tf.sin(_lin(x)), [-1, 4, 3]),
        tf.reshape(tf.tanh(_lin2(x)), [-1, 4, 3]),
      )
      + tf.linalg.cross(
        tf.reshape(x, [-1, 4, 3]),
        tf.zeros_like(tf.reshape(x, [-1, 4, 3]))
        + tf.constant([1.0, -2.0, 0.5], x.dtype),
      )
    ),
  ),
  # Matrices and diagonals of x; then a diagonal of x above the diagonal of
  # constant matrices; then matrices of x with constant diagonals.
  "MatrixSetDiagV3": (
    "MatrixSetDiagV3",
    lambda x: (
      tf.linalg.set_diag(
        tf.reshape(tf.sin(_lin(x))[:, :9], [-1, 3, 3]),
        tf.tanh(_lin2(x))[:, 9:],
      )
      * tf.linalg.set_diag(
        tf.zeros_like(tf.reshape(x[:, :9], [-1, 3, 3])) + 1.0,
        tf.sin(x[:, :2]),
        k=1,
      )
    ),
  ),
  "MatrixSetDiag": (
    "MatrixSetDiag",
    lambda x: tf.raw_ops.MatrixSetDiag(
      input=tf.reshape(tf.sin(_lin(x))[:, :9], [-1, 3, 3]),
      diagonal=tf.ones_like(x[:, :3]),
    ),
  ),
  # Matrices of x, well away from singular.
  "MatrixInverse": (
    "MatrixInverse",
    lambda x: (
      tf.linalg.inv(_matrices(x))
      + tf.linalg.inv(_matrices(tf.tanh(_lin2(x))), adjoint=True)
    ),
  ),
  "LogMatrixDeterminant": (
    "LogMatrixDeterminant",
    lambda x: (
      tf.linalg.slogdet(_matrices(x))[1] * tf.linalg.slogdet(_matrices(-x))[0]
    ),
  ),
  "MatrixDeterminant": (
    "MatrixDeterminant",
    lambda x: tf.linalg.det(_matrices(x)) + 0.0 * x[:, 0],
  ),
  "MatrixTriangularSolve_of_x": (
    "MatrixTriangularSolve",
    lambda x: (
      tf.linalg.triangular_solve(
        _matrices(x), tf.reshape(tf.sin(_lin2(x))[:, :6], [-1, 3, 2])
      )
      + tf.linalg.triangular_solve(
        _matrices(x),
        tf.reshape(x[:, 6:], [-1, 3, 2]),
        lower=False,
        adjoint=True,
      )
    ),
  ),
  "MatrixSolve_of_x": (
    "MatrixSolve",
    lambda x: (
      tf.linalg.solve(
        _matrices(tf.sin(_lin(x))), tf.reshape(x[:, :6], [-1, 3, 2])
      )
      + tf.linalg.solve(
        _matrices(x),
        tf.ones_like(tf.reshape(x[:, :3], [-1, 3, 1])),
        adjoint=True,
      )
    ),
  ),
  # Positive definite: A A^T + I; `tf.linalg.logdet` by its factor.
  "Cholesky": (
    "Cholesky",
    lambda x: (
      tf.linalg.cholesky(_gram(_matrices(x)))
      * tf.linalg.logdet(
        _gram(tf.reshape(tf.tanh(_lin(x))[:, :9], [-1, 3, 3]))
      )[:, None, None]
    ),
  ),
  # TensorFlow's gradient ops, both inputs of x: the incoming gradient
  # and the function's output or input.
  "TanhGrad_SigmoidGrad": (
    "TanhGrad",
    lambda x: tf.concat(
      [
        tf.raw_ops.TanhGrad(
          y=tf.tanh(_lin(x)[:, :6]), dy=tf.sin(_lin2(x)[:, :6])
        ),
        tf.raw_ops.SigmoidGrad(
          y=tf.sigmoid(_lin(x)[:, 6:]), dy=tf.cos(_lin2(x)[:, 6:])
        ),
      ],
      1,
    ),
  ),
  "RsqrtGrad_SqrtGrad": (
    "RsqrtGrad",
    lambda x: (
      tf.raw_ops.RsqrtGrad(
        y=tf.math.rsqrt(1 + _lin(x) ** 2), dy=tf.tanh(_lin2(x))
      )
      * tf.raw_ops.SqrtGrad(y=tf.sqrt(2 + tf.sin(_lin2(x))), dy=_lin(x))
    ),
  ),
  "ReciprocalGrad_InvGrad": (
    "ReciprocalGrad",
    lambda x: (
      tf.raw_ops.ReciprocalGrad(y=tf.tanh(_lin(x)), dy=tf.sin(_lin2(x)))
      + tf.raw_ops.InvGrad(y=tf.sin(_lin2(x)), dy=_lin(x) ** 2)
    ),
  ),
  "SoftplusGrad": (
    "SoftplusGrad",
    lambda x: tf.raw_ops.SoftplusGrad(
      gradients=tf.sin(_lin2(x)), features=2.0 * _lin(x)
    ),
  ),
  "ReluGrad_Relu6Grad_LeakyReluGrad": (
    "ReluGrad",
    lambda x: (
      tf.raw_ops.ReluGrad(gradients=tf.sin(_lin2(x)), features=_lin(x))
      + tf.raw_ops.Relu6Grad(gradients=_lin2(x) ** 2, features=5.0 * _lin(x))
      + tf.raw_ops.LeakyReluGrad(
        gradients=tf.tanh(_lin(x)), features=_lin2(x), alpha=0.3
      )
    ),
  ),
  "EluGrad_SeluGrad": (
    "EluGrad",
    lambda x: (
      tf.raw_ops.EluGrad(gradients=tf.sin(_lin2(x)), outputs=tf.nn.elu(_lin(x)))
      * tf.raw_ops.SeluGrad(
        gradients=tf.tanh(_lin(x)), outputs=tf.nn.selu(_lin2(x))
      )
    ),
  ),
  # Forces of an energy: a model with TensorFlow's gradient in it.
  "forces_of_an_energy": (
    "SigmoidGrad",
    lambda x: tf.gradients(
      tf.reduce_sum(tf.sigmoid(_lin2(tf.tanh(_lin(x)))), 1), x
    )[0],
  ),
  # Forces of a log-sum-exp (a mixture's log-density, an energy-based
  # model): TensorFlow's gradient of the maximum it subtracts, stopped,
  # whose shapes are made from that maximum's at run time.
  "forces_of_a_logsumexp": (
    "StopGradient",
    lambda x: tf.gradients(
      tf.reduce_logsumexp(_lin2(tf.tanh(_lin(x))), axis=1), x
    )[0],
  ),
  "score_of_a_mixture": (
    "Max",
    lambda x: tf.gradients(
      tf.reduce_logsumexp(
        -tf.reduce_sum(
          tf.square(x[:, None, :] - tf.constant(_W[:4], x.dtype)), axis=2
        ),
        axis=1,
      ),
      x,
    )[0],
  ),
  # Forces of energies of pooled images: TensorFlow's gradients of pools.
  "MaxPoolGrad": (
    "MaxPoolGrad",
    lambda x: _forces(
      lambda h: tf.nn.max_pool2d(tf.tanh(_image(h, (3, 4, 1))), 2, 2, "VALID"),
      x,
    ),
  ),
  # Forces of a depthwise convolution net: TensorFlow's gradient of it.
  "DepthwiseConv2dNativeBackpropInput": (
    "DepthwiseConv2dNativeBackpropInput",
    lambda x: _forces(
      lambda h: tf.nn.depthwise_conv2d(
        tf.tanh(_image(h)), _filter(_FD, h), [1, 1, 1, 1], "SAME"
      ),
      x,
    ),
  ),
  # TensorFlow's gradient of a transpose transposes by the inverse
  # permutation, which it computes at run time.
  "gradient_of_a_transpose": (
    "Transpose",
    lambda x: tf.gradients(
      tf.reduce_sum(
        tf.sin(tf.transpose(_image(tf.tanh(_lin(x))), [0, 2, 3, 1]))
        * x[:, :1, None, None],
        [1, 2, 3],
      ),
      x,
    )[0],
  ),
  # Each sample's updates added at its own entries (twice at one).
  "ScatterNd": (
    "ScatterNd",
    lambda x: tf.scatter_nd(
      _own_indices(x, [[2, 0], [0, 3], [2, 0]]),
      tf.reshape(tf.tanh(_lin(x))[:, :6], [-1, 3, 2]),
      tf.stack([tf.shape(x)[0], 3, 4, 2]),
    ),
  ),
  # Its gradient, TensorFlow's gradient of the gather of the entries a
  # classifier's labels name.
  "gradient_of_a_gather_nd": (
    "ScatterNd",
    lambda x: tf.gradients(
      tf.reduce_sum(
        tf.sin(
          tf.gather_nd(
            _image(tf.tanh(_lin(x)), (4, 3)), _own_indices(x, [[1], [3]])
          )
        ),
        [1, 2],
      ),
      x,
    )[0],
  ),
  # Input gradients of classifiers: TensorFlow's gradient of a
  # cross-entropy reads its backprop output, softmax minus the labels (and
  # reshapes it back to the logits' shape, whose entries the flattened
  # logits lost).
  "gradient_of_a_softmax_cross_entropy": (
    "SoftmaxCrossEntropyWithLogits",
    lambda x: tf.gradients(
      tf.nn.softmax_cross_entropy_with_logits(
        labels=tf.nn.softmax(_lin2(tf.ones_like(x))),
        logits=_lin2(tf.tanh(_lin(x))),
      ),
      x,
    )[0],
  ),
  "gradient_of_a_sparse_softmax_cross_entropy": (
    "SparseSoftmaxCrossEntropyWithLogits",
    lambda x: tf.gradients(
      tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.zeros(tf.shape(x)[:1], tf.int32) + 5,
        logits=_lin2(tf.tanh(_lin(x))),
      ),
      x,
    )[0],
  ),
  "AvgPoolGrad": (
    "AvgPoolGrad",
    lambda x: _forces(
      lambda h: tf.nn.avg_pool2d(tf.tanh(_image(h)), 2, [1, 2], "SAME"), x
    ),
  ),
  "StridedSliceGrad": (
    "StridedSliceGrad",
    lambda x: tf.raw_ops.StridedSliceGrad(
      shape=tf.shape(_lin(x)),
      begin=[0, 2],
      end=[0, 11],
      strides=[1, 3],
      dy=tf.tanh(_lin2(x))[:, 2:11:3] * _lin(x)[:, :3],
      begin_mask=1,
      end_mask=1,
    ),
  ),
  # Gradients whose sums, reshapes and slices read the shapes of the
  # model's tensors where N is not static: of products that broadcast
  # (`BroadcastGradientArgs`), of a concatenation (`ConcatOffset`), of a
  # slice.
  "gradient_of_products": (
    "Sum",
    lambda x: tf.gradients(
      tf.reduce_sum(
        tf.tanh(_lin(x)) * tf.sin(_lin2(x))
        + tf.tanh(_lin(x))[:, :1] * _lin2(x) ** 2,
        1,
      )
      + tf.reduce_sum(
        tf.reshape(tf.sigmoid(_lin(x)), [-1, 3, 4])
        * tf.reshape(_lin2(x), [-1, 3, 4])[:, :1],
        [1, 2],
      ),
      x,
    )[0],
  ),
  # A sum's gradient reshapes to its input's shape with ones at the summed
  # axes (a `DynamicStitch` of shapes); a batched matmul's sums over the
  # broadcast axes of slices of shapes.
  "gradient_of_sums": (
    "Sum",
    lambda x: tf.gradients(
      tf.reduce_sum(
        tf.sin(tf.reduce_sum(tf.tanh(_lin(x)), 1))
        + tf.reduce_mean(
          tf.reshape(tf.sigmoid(_lin2(x)), [-1, 3, 4]) ** 2, [1, 2]
        )
        ** 2
      ),
      x,
    )[0],
  ),
  "gradient_of_a_batched_matmul": (
    "BatchMatMulV2",
    lambda x: tf.gradients(
      tf.reduce_sum(
        tf.matmul(
          tf.reshape(tf.tanh(_lin(x)), [-1, 3, 4]),
          tf.reshape(_lin2(x), [-1, 4, 3]),
        )
        ** 2,
        [1, 2],
      ),
      x,
    )[0],
  ),
  "gradient_of_a_concatenation": (
    "ConcatV2",
    lambda x: tf.gradients(
      tf.reduce_sum(
        tf.tanh(_lin2(tf.concat([x[:, 0:3], tf.sin(x[:, 3:])], 1))) ** 2, 1
      ),
      x,
    )[0],
  ),
  "burgers_residual": ("TanhGrad", _burgers_residual),
  # A biharmonic operator: the engine's Laplacian (its adjoint pass made of
  # gradient ops) walked again.
  "Laplacian_of_a_Laplacian": (
    "TanhGrad",
    lambda x: tf1hess.batch_laplacians(
      tf.reduce_sum(tf.tanh(_lin2(tf.tanh(_lin(x)))), 1), x
    )[:, None],
  ),
  "CumulativeLogsumexp": (
    "CumulativeLogsumexp",
    lambda x: tf.math.cumulative_logsumexp(
      tf.reshape(3.0 * _lin(x), [-1, 3, 4]), axis=1
    ),
  ),
  "CumulativeLogsumexp_reverse": (
    "CumulativeLogsumexp",
    lambda x: tf.math.cumulative_logsumexp(
      tf.reshape(tf.sin(_lin(x)), [-1, 3, 4]), axis=-1, reverse=True
    ),
  ),
  "Sinh_Cosh": (
    "Sinh",
    lambda x: tf.sinh(_lin(x)[:, :6]) + tf.cosh(_lin(x)[:, 6:]),
  ),
  "Asin_Acos": (
    "Asin",
    lambda x: (
      tf.asin(0.9 * tf.tanh(_lin(x)[:, :6]))
      + tf.acos(0.9 * tf.tanh(_lin(x)[:, 6:]))
    ),
  ),
  "Asinh_Acosh": (
    "Asinh",
    lambda x: (
      tf.asinh(2 * _lin(x)[:, :6]) + tf.acosh(1.2 + tf.square(_lin(x)[:, 6:]))
    ),
  ),
  "Atan_Atanh": (
    "Atan",
    lambda x: (
      tf.atan(2 * _lin(x)[:, :6]) + tf.atanh(0.9 * tf.tanh(_lin(x)[:, 6:]))
    ),
  ),
  # Piecewise constant: no derivative, but the other factors curve.
  "Sign_Floor_Ceil_Round_Rint": (
    "Sign",
    lambda x: (
      (tf.sign(_lin(x)) + tf.round(x) + tf.math.rint(2 * x)) * tf.sin(x)
      + tf.floor(3 * _lin(x)) * tf.sin(x)
      + tf.math.ceil(x) * x * x
    ),
  ),
  # tf.compat.v1.where with a vector condition, and with a whole one.
  "Select": (
    "Select",
    lambda x: (
      tf.compat.v1.where(x[:, 0] > 0, tf.tanh(_lin(x)), tf.sin(x) * x[:, 1:2])
      + tf.compat.v1.where(_lin(x) > 0, tf.square(_lin(x)), tf.sin(_lin(x)))
    ),
  ),
  # A condition without the batch axis, one broadcast against the entries.
  "SelectV2_broadcast": (
    "SelectV2",
    lambda x: (
      tf.where(tf.constant(_W[0] > 0), _lin(x), tf.exp(0.5 * _lin(x)))
      + tf.reshape(
        tf.where(
          _where_cond(x)[:, None],
          tf.reshape(tf.tanh(_lin(x)), [-1, 3, 4]),
          0.5,
        ),
        [-1, _K],
      )
    ),
  ),
  # Both branches diagonal, or one: the Jacobian stays diagonal.
  "SelectV2_diagonal": (
    "SelectV2",
    lambda x: (
      tf.where(x > 0, x * x * x, tf.sin(x))
      + tf.where(x < 0.5, tf.exp(x), tf.zeros_like(x))
    ),
  ),
  "ReverseV2": (
    "ReverseV2",
    lambda x: tf.tanh(tf.reverse(_lin(x), [1])) * tf.sin(x),
  ),
  # Not over the feature axis of x: diagonal; over it: materialized.
  "ReverseV2_diagonal": (
    "ReverseV2",
    lambda x: tf.tanh(
      tf.reverse(x[:, None, :] * _W[:3], [1]) * tf.constant(_W[3:6])
      + tf.reverse(x[:, None, :] * _W[:3], [-1, 1]) * _W[4]
    ),
  ),
  # Each sample's first `lengths[n]` steps reversed, of a dense Jacobian
  # and of x's.
  "ReverseSequence": (
    "ReverseSequence",
    lambda x: (
      lambda lengths: (
        tf.tanh(
          tf.reshape(
            tf.reverse_sequence(
              tf.reshape(_lin(x), [-1, 4, 3]), lengths, seq_axis=1
            ),
            [-1, _K],
          )
        )
        * tf.sin(x)
        + tf.square(tf.reverse_sequence(x, lengths, seq_axis=1))
      )
    )(tf.range(tf.shape(x)[0]) % 4 + 1),
  ),
  # Along the features, along two inner axes at once, and backwards.
  "Roll": (
    "Roll",
    lambda x: (
      tf.tanh(tf.roll(_lin(x), 2, 1)) * tf.sin(x)
      + tf.reshape(
        tf.square(
          tf.roll(tf.reshape(tf.sin(_lin(x)), [-1, 2, 3]), [1, -1], [1, -1])
        ),
        [-1, _K],
      )
      + tf.roll(x * x, -1, -1)
    ),
  ),
  # Along the features, and exclusive and reversed along inner axes, of a
  # dense Jacobian and of x's shared one.
  "Cumprod": (
    "Cumprod",
    lambda x: (
      tf.math.cumprod(tf.sin(_lin(x)) + 0.5, axis=1)
      + tf.reshape(
        tf.math.cumprod(
          tf.reshape(x * _lin(x), [-1, 3, 4]),
          axis=1,
          exclusive=True,
          reverse=True,
        ),
        [-1, _K],
      )
    ),
  ),
  "Cumprod_of_x": (
    "Cumprod",
    lambda x: tf.reshape(
      tf.math.cumprod(tf.reshape(x, [-1, 3, 4]), axis=-1, reverse=True)
      + tf.math.cumprod(tf.reshape(x, [-1, 3, 4]), axis=2, exclusive=True),
      [-1, _K],
    ),
  ),
  # Along the features, exclusive and reversed, and along an inner axis.
  "Cumsum": (
    "Cumsum",
    lambda x: (
      tf.sin(tf.cumsum(_lin(x), axis=1))
      + tf.tanh(tf.cumsum(x * _lin(x), axis=-1, exclusive=True, reverse=True))
      + tf.reshape(
        tf.square(tf.cumsum(tf.reshape(tf.sin(_lin(x)), [-1, 3, 4]), axis=1)),
        [-1, _K],
      )
    ),
  ),
  # Over an axis other than the last: TensorFlow transposes by a
  # permutation it computes from the rank (`registry.fold`).
  "Softmax_middle_axis": (
    "Softmax",
    lambda x: (
      tf.reshape(
        tf.nn.softmax(tf.reshape(_lin(x), [-1, 3, 4]), axis=1), [-1, _K]
      )
      * x
      + tf.reshape(
        tf.nn.log_softmax(tf.reshape(x * x, [-1, 2, 3, 2]), axis=-3), [-1, _K]
      )
    ),
  ),
  # Reshapes that give each sample 4 rows of 3 (`registry.Regrouped`): a
  # tensordot (its shapes known only at run time), then functions row by
  # row and a reshape back.
  "Tensordot_rows": (
    "MatMul",
    lambda x: (
      tf.reshape(
        tf.tanh(
          tf.tensordot(
            tf.reshape(tf.sin(x), [-1, 4, 3]), tf.constant(_W[:3], x.dtype), 1
          )
        ),
        [-1, 4 * _K],
      )[:, :_K]
      * x
    ),
  ),
  # TF1 flattens: the batch size read from a shape, the entries -1.
  "Reshape_flatten_by_shape": (
    "Reshape",
    lambda x: (
      lambda h: tf.tanh(tf.reshape(h, [tf.shape(h)[0], -1]) @ _filter(_W, x))
    )(tf.sin(tf.reshape(_lin(x), [-1, 3, 4]))),
  ),
  "Reshape_flatten_by_concat": (
    "Reshape",
    lambda x: (
      lambda h: tf.tanh(
        tf.reshape(h, tf.concat([tf.shape(x)[:1], [-1]], 0)) @ _filter(_W, x)
      )
    )(tf.sin(tf.reshape(_lin(x), [-1, 2, 3, 2]))),
  ),
  # `tf.repeat`: a `Tile` by multiples it stacks from its count, then a
  # reshape to `shape(u)[1] * repeats` entries.
  "Tile_by_repeat": (
    "Tile",
    lambda x: tf.repeat(tf.tanh(_lin(x)) * x, 2, axis=1),
  ),
  "Reshape_rows_softmax": (
    "Softmax",
    lambda x: tf.reshape(
      tf.nn.softmax(tf.reshape(_lin(x), [-1, 3]))
      * tf.square(tf.reshape(x, [-1, 3]))
      + tf.reduce_logsumexp(tf.reshape(x, [-1, 3]), 1, keepdims=True),
      [-1, _K],
    ),
  ),
  # A matmul by weights of a function of a dense layer (folded into one
  # matmul of the function's derivative), with the weights transposed, and
  # of a function of x itself (a diagonal Jacobian: not folded).
  "MatMul_of_tanh_of_dense": (
    "MatMul",
    lambda x: tf.matmul(tf.tanh(_lin(x)), _filter(_W[:, :5], x)),
  ),
  "MatMul_transposed_of_sigmoid_of_dense": (
    "MatMul",
    lambda x: tf.square(
      tf.matmul(
        tf.sigmoid(_lin(x)[:, :7]), _filter(_W[:5, :7], x), transpose_b=True
      )
    ),
  ),
  "MatMul_of_tanh_of_x": (
    "MatMul",
    lambda x: tf.matmul(tf.tanh(x), _filter(_W, x)),
  ),
  "Prod": (
    "Prod",
    lambda x: tf.reduce_prod(tf.reshape(tf.tanh(_lin(x)), [-1, 3, 4]), 2),
  ),
  "Prod_keepdims_of_x": (
    "Prod",
    lambda x: tf.sin(
      tf.reduce_prod(
        tf.reshape(x + 1.0, [-1, 2, 3, 2]), axis=[1, 3], keepdims=True
      )
    ),
  ),
  # A mean of unwritten products (`Jacobian.parts`): distances to centres
  # over 7 features, so that 1 / 7 needs float64's digits.
  "Mean_of_products": (
    "Mean",
    lambda x: tf.reduce_mean(
      tf.square(tf.tanh(_lin(x))[:, None, :7] - tf.constant(_W[:3, :7]))
      / (1.0 + tf.abs(tf.constant(_W[3:6, :7]))),
      axis=-1,
    ),
  ),
  # Over the features, over two axes kept, and of a tensor of one entry.
  "EuclideanNorm": (
    "EuclideanNorm",
    lambda x: (
      tf.math.reduce_euclidean_norm(_lin(x), axis=1, keepdims=True) * x
      + tf.reshape(
        tf.math.reduce_euclidean_norm(
          tf.reshape(tf.sin(x), [-1, 2, 3, 2]), axis=[1, 3], keepdims=True
        ),
        [-1, 3],
      )[:, :1]
      + tf.math.reduce_euclidean_norm(x[:, :1] - 3.0, axis=1)[:, None]
    ),
  ),
  # Right-hand sides (N, 3, 4) by a lower and an upper (adjoint) triangle,
  # the columns of tf.transpose(x) (a Mahalanobis distance's), and vectors
  # (N, 2, 3, 1).
  "MatrixTriangularSolve": (
    "MatrixTriangularSolve",
    lambda x: tf.concat(
      [
        tf.reshape(
          tf.linalg.triangular_solve(
            _filter(_TRI3, x), tf.reshape(tf.sin(_lin(x)), [-1, 3, 4])
          ),
          [-1, _K],
        ),
        tf.reshape(
          tf.linalg.triangular_solve(
            _filter(_TRI3.T, x),
            tf.reshape(x * x, [-1, 3, 4]),
            lower=False,
            adjoint=True,
          ),
          [-1, _K],
        ),
        tf.transpose(
          tf.linalg.triangular_solve(_filter(_TRI, x), tf.transpose(x))
        ),
        tf.reshape(
          tf.linalg.triangular_solve(
            _filter(_TRI3, x), tf.reshape(tf.tanh(x[:, :6]), [-1, 2, 3, 1])
          ),
          [-1, 6],
        ),
      ],
      1,
    ),
  ),
  # A matrix per sample (constant) against a Jacobian shared by all samples
  # and a dense one, and the adjoint against columns of samples.
  "MatrixSolve": (
    "MatrixSolve",
    lambda x: (
      lambda a: tf.concat(
        [
          tf.reshape(tf.linalg.solve(a, tf.reshape(x, [-1, 3, 4])), [-1, _K]),
          tf.reshape(
            tf.linalg.solve(a, tf.reshape(tf.tanh(_lin(x)), [-1, 3, 4])),
            [-1, _K],
          ),
          tf.transpose(
            tf.linalg.solve(_filter(_SQ, x), tf.transpose(x * x), adjoint=True)
          ),
        ],
        1,
      )
    )(tf.broadcast_to(_filter(_SQ3, x), tf.stack([tf.shape(x)[0], 3, 3]))),
  ),
  # The main diagonal (a trace), and a band of two diagonals padded by 5.
  "MatrixDiagPartV3": (
    "MatrixDiagPartV3",
    lambda x: (
      lambda m: (
        tf.concat(
          [
            tf.linalg.trace(tf.matmul(m, m))[:, None],
            tf.reshape(
              tf.linalg.diag_part(tf.sin(m), k=(-1, 0), padding_value=5.0),
              [-1, 6],
            ),
            x[:, :5],
          ],
          1,
        )
        * x
      )
    )(tf.reshape(_lin(x)[:, :9], [-1, 3, 3])),
  ),
  # A diagonal matrix of each sample, and one placed off the diagonal.
  "MatrixDiagV3": (
    "MatrixDiagV3",
    lambda x: (
      tf.concat(
        [
          tf.reshape(
            tf.matmul(
              tf.linalg.diag(tf.sin(x[:, :3])),
              tf.linalg.diag(
                tf.tanh(_lin(x)[:, :2]), k=1, num_rows=3, num_cols=3
              ),
            ),
            [-1, 9],
          ),
          x[:, :3],
        ],
        1,
      )
      * x
    ),
  ),
  # The ops of older graphs (GraphDefs written before TF 2.3).
  "MatrixDiagPart_older": (
    "MatrixDiagPart",
    lambda x: (
      lambda m: (
        tf.concat(
          [
            tf.raw_ops.MatrixDiagPart(input=tf.sin(m)),
            tf.reshape(
              tf.raw_ops.MatrixDiagPartV2(
                input=m, k=[-1, 0], padding_value=tf.constant(2.0, x.dtype)
              ),
              [-1, 6],
            ),
            x[:, :3],
          ],
          1,
        )
        * x
      )
    )(tf.reshape(_lin(x)[:, :9], [-1, 3, 3])),
  ),
  "MatrixDiag_older": (
    "MatrixDiag",
    lambda x: (
      tf.reshape(
        tf.matmul(
          tf.raw_ops.MatrixDiag(diagonal=tf.sin(x[:, :4])),
          tf.raw_ops.MatrixDiagV2(
            diagonal=tf.tanh(_lin(x)[:, :3]),
            k=-1,
            num_rows=4,
            num_cols=4,
            padding_value=tf.constant(0.5, x.dtype),
          ),
        ),
        [-1, 16],
      )[:, :_K]
      * x
    ),
  ),
  # The lower triangle and a band, as a Cholesky-like parametrization does.
  "MatrixBandPart": (
    "MatrixBandPart",
    lambda x: (
      lambda m: tf.reshape(
        tf.matmul(tf.linalg.band_part(m, -1, 0), tf.linalg.band_part(m, 1, 1)),
        [-1, 16],
      )[:, :_K]
    )(tf.reshape(tf.concat([_lin(x), tf.sin(x)[:, :4]], 1), [-1, 4, 4])),
  ),
}

# TensorFlow has no second-order gradient of these (no MaxPoolGradGrad with
# explicit padding; the gradient of a segment sum's gradient is IndexedSlices,
# which TanhGrad's gradient cannot multiply): the rows fail, the engine is
# checked against differences. Nor a second derivative of EuclideanNorm where
# its adjoint is 0 (NaN).
_NO_ROWS = {
  "SegmentSum_time_major",
  "UnsortedSegmentSum_time_major",
  "MaxPool_explicit_padding",
  "ResizeNearestNeighbor",
  "EuclideanNorm",
}

# Losses that `tf.nn.l2_loss` sums over the batch (not per sample).
_L2_LOSSES = {
  "dense": lambda x: tf.nn.l2_loss(tf.tanh(_lin(x)) - 0.5),
  "of_x_plus": lambda x: 2 * tf.nn.l2_loss(x) + tf.reduce_sum(tf.sin(x)),
  # Axes in another order: every entry is summed all the same.
  "transposed": lambda x: tf.nn.l2_loss(tf.transpose(tf.sin(_lin(x)))),
  # Rows that are parts of samples.
  "tensordot": lambda x: tf.nn.l2_loss(
    tf.tanh(tf.tensordot(_image(x, (4, 3)), tf.constant(_W[:3], x.dtype), 1))
  ),
}

# Op types tested in float32 here (their CPU kernels have no float64).
FLOAT32_OP_TYPES = {
  "LRN",
  "SoftsignGrad",
  "ResizeNearestNeighborGrad",
  "ResizeBilinearGrad",
  "ResizeBicubicGrad",
  "FusedBatchNormGrad",
  "FusedBatchNormGradV2",
  "FusedBatchNormGradV3",
  "MaxPool3D",
  "MaxPool3DGrad",
  "AvgPool3D",
  "AvgPool3DGrad",
  "FusedBatchNorm",
  "FusedBatchNormV2",
  "FusedBatchNormV3",
  "ResizeBilinear",
  "ResizeBicubic",
}

# The op types whose rules this file tests (tests/forward_test.py the rest).
NEW_OP_TYPES = {
  "DepthwiseConv2dNativeBackpropInput",
  "ScatterNd",
  "MaxPoolGrad",
  "AvgPoolGrad",
  "StridedSliceGrad",
  "TanhGrad",
  "SigmoidGrad",
  "RsqrtGrad",
  "SqrtGrad",
  "ReciprocalGrad",
  "InvGrad",
  "SoftplusGrad",
  "ReluGrad",
  "Relu6Grad",
  "LeakyReluGrad",
  "EluGrad",
  "SeluGrad",
  "Polygamma",
  "Igamma",
  "Igammac",
  "BesselI0e",
  "BesselI1e",
  "BesselI0",
  "BesselI1",
  "EnsureShape",
  "DepthToSpace",
  "SpaceToDepth",
  "ExtractImagePatches",
  "Cross",
  "MatrixSetDiagV3",
  "MatrixSetDiag",
  "CumulativeLogsumexp",
  "MatrixInverse",
  "LogMatrixDeterminant",
  "MatrixDeterminant",
  "Cholesky",
  "MatrixTriangularSolve",
  "MatrixSolve",
  "TopKV2",
  "Xlogy",
  "Xlog1py",
  "Xdivy",
  "Atan2",
  "FloorMod",
  "Conv2D",
  "Conv2DBackpropInput",
  "Conv3D",
  "Conv3DBackpropInputV2",
  "GatherNd",
  "SegmentSum",
  "UnsortedSegmentSum",
  "ResizeNearestNeighbor",
  "DepthwiseConv2dNative",
  "AvgPool",
  "MaxPool",
  "Erf",
  "Erfc",
  "Lgamma",
  "Digamma",
  "Erfinv",
  "Ndtri",
  "L2Loss",
  "Tan",
  "Sinh",
  "Cosh",
  "Asin",
  "Acos",
  "Asinh",
  "Acosh",
  "Atan",
  "Atanh",
  "Sign",
  "Floor",
  "Ceil",
  "Round",
  "Rint",
  "Select",
  "SelectV2",
  "ReverseV2",
  "ReverseSequence",
  "Roll",
  "Cumsum",
  "Cumprod",
  "Prod",
  "SpaceToBatchND",
  "BatchToSpaceND",
  "EuclideanNorm",
  "MatrixDiagPartV3",
  "MatrixDiagV3",
  "MatrixBandPart",
  "MatrixDiagPart",
  "MatrixDiagPartV2",
  "MatrixDiag",
  "MatrixDiagV2",
}


def _differences(sess, x, y, x_val):
  """Central differences of `tf.gradients(y, x)`, `(N, K, K)`, float64.

  `x` may be images: the differences are taken over the flat features.
  """
  (g,) = tf.gradients(y, x)
  n = x_val.shape[0]
  return testing_utils.central_difference_jacobian(
    lambda v: sess.run(g, {x: v.reshape(x_val.shape)}).reshape(n, -1),
    x_val.reshape(n, -1),
  )


def _assert_declined(test, x, y, message):
  """`method="forward"` raises `message` for `y` (in the default graph), and
  auto gives the rows' Hessians."""
  with test.assertRaisesRegex(ValueError, message):
    tf1hess.batch_hessians(y, x, method="forward")
  auto = tf1hess.batch_hessians(y, x)
  rows = tf1hess.batch_hessians(y, x, method="while_loop")
  with tf.compat.v1.Session() as sess:
    feed = {x: _RNG.normal(size=(3, _K))}
    auto_val, rows_val = sess.run([auto, rows], feed)
  test.assertAllClose(auto_val, rows_val, atol=1e-12)


def _check(test, x, y, x_val, rows=True, variables=False):
  """Checks the engine's Hessians, diagonals and Laplacians of `y`.

  Against the rows built in the same graph (unless `rows` is False) and
  float64 central differences of the gradient.
  """
  outs = [
    op(y, x, method="forward")
    for op in (
      tf1hess.batch_hessians,
      tf1hess.batch_hessian_diagonals,
      tf1hess.batch_laplacians,
    )
  ]
  if rows:
    outs.append(tf1hess.batch_hessians(y, x, method="while_loop"))
  with tf.compat.v1.Session() as sess:
    if variables:
      sess.run(tf.compat.v1.global_variables_initializer())
    values = sess.run(outs, {x: x_val})
    reference = _differences(sess, x, y, x_val)
  n = x_val.shape[0]
  h = values[0].reshape(n, -1, reference.shape[-1])
  d = values[1].reshape(n, -1)
  test.assertEqual(values[0].shape, (n,) + x_val.shape[1:] * 2)
  if rows:
    test.assertAllClose(values[0], values[3], atol=1e-10, rtol=1e-10)
  test.assertAllClose(h, reference, atol=1e-6, rtol=1e-6)
  test.assertAllClose(d, np.einsum("nii->ni", h), atol=1e-12)
  test.assertAllClose(values[2], np.einsum("nii->n", h), atol=1e-12)
  return h


class ForwardRulesTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_cross_entropy_of_labels_of_x0",
    "test_cross_entropy_of_labels_of_x1",
    "test_cumprod_of_zeros0",
    "test_cumprod_of_zeros2",
    "test_cumprod_of_zeros3",
    "test_dilated_convolution_by_auto0",
    "test_dilated_convolution_by_auto1",
    "test_einsum_of_two_tensors_of_x_summed_over_the_batch_dot",
    "test_einsum_of_two_tensors_of_x_summed_over_the_batch_dot_per_feature",
    "test_einsum_of_two_tensors_of_x_summed_over_the_batch_features_first",
    "test_einsum_pairing_samples_with_others_falls_back",
    "test_every_new_rule_has_a_test",
    "test_gather_of_samples",
    "test_reshape_of_two_samples_into_one_row_falls_back",
    "test_residual_of_a_hard_constrained_network",
    "test_rows_of_other_samples_gather_nd",
    "test_rows_of_other_samples_scatter_nd",
    "test_rule_Asin_Acos",
    "test_rule_Asinh_Acosh",
    "test_rule_Atan2",
    "test_rule_Atan_Atanh",
    "test_rule_AvgPool",
    "test_rule_AvgPoolGrad",
    "test_rule_BesselI0_BesselI1",
    "test_rule_BesselI0e_BesselI1e",
    "test_rule_Cholesky",
    "test_rule_Conv1D",
    "test_rule_Conv2DBackpropInput",
    "test_rule_Conv2D_same",
    "test_rule_Conv3D",
    "test_rule_Conv3DBackpropInputV2",
    "test_rule_Conv3D_of_x_strides",
    "test_rule_Cross",
    "test_rule_Cumprod",
    "test_rule_Cumprod_of_x",
    "test_rule_Cumsum",
    "test_rule_CumulativeLogsumexp",
    "test_rule_CumulativeLogsumexp_reverse",
    "test_rule_DepthToSpace",
    "test_rule_DepthwiseConv2dNative",
    "test_rule_DepthwiseConv2dNativeBackpropInput",
    "test_rule_EluGrad_SeluGrad",
    "test_rule_Erf_Erfc",
    "test_rule_Erfinv_Ndtri",
    "test_rule_EuclideanNorm",
    "test_rule_ExtractImagePatches",
    "test_rule_FloorMod",
    "test_rule_FloorMod_period",
    "test_rule_GatherNd_batch_dims",
    "test_rule_GatherNd_entries_of_x",
    "test_rule_GatherNd_own_rows",
    "test_rule_GatherNd_time_major",
    "test_rule_GatherV2_batch_dims",
    "test_rule_GatherV2_batch_dims_of_x",
    "test_rule_Igamma_Igammac",
    "test_rule_Laplacian_of_a_Laplacian",
    "test_rule_Lgamma_Digamma",
    "test_rule_LogMatrixDeterminant",
    "test_rule_MatMul_transposed_of_sigmoid_of_dense",
    "test_rule_MatrixBandPart",
    "test_rule_MatrixDeterminant",
    "test_rule_MatrixDiagPartV3",
    "test_rule_MatrixDiagPart_older",
    "test_rule_MatrixDiag_older",
    "test_rule_MatrixInverse",
    "test_rule_MatrixSetDiag",
    "test_rule_MatrixSetDiagV3",
    "test_rule_MatrixSolve_of_x",
    "test_rule_MatrixTriangularSolve",
    "test_rule_MatrixTriangularSolve_of_x",
    "test_rule_MaxPoolGrad",
    "test_rule_Mean_of_products",
    "test_rule_Polygamma",
    "test_rule_Prod",
    "test_rule_Prod_keepdims_of_x",
    "test_rule_ReciprocalGrad_InvGrad",
    "test_rule_ReluGrad_Relu6Grad_LeakyReluGrad",
    "test_rule_Reshape_flatten_by_concat",
    "test_rule_Reshape_rows_softmax",
    "test_rule_ReverseSequence",
    "test_rule_ReverseV2_diagonal",
    "test_rule_Roll",
    "test_rule_RsqrtGrad_SqrtGrad",
    "test_rule_ScatterNd",
    "test_rule_Select",
    "test_rule_SelectV2_broadcast",
    "test_rule_SelectV2_diagonal",
    "test_rule_Sign_Floor_Ceil_Round_Rint",
    "test_rule_Sinh_Cosh",
    "test_rule_Softmax_middle_axis",
    "test_rule_SpaceToBatchND_BatchToSpaceND",
    "test_rule_StridedSliceGrad",
    "test_rule_TanhGrad_SigmoidGrad",
    "test_rule_Tensordot_rows",
    "test_rule_Tile_by_repeat",
    "test_rule_TopKV2",
    "test_rule_TopKV2_sort",
    "test_rule_Xdivy",
    "test_rule_Xlog1py",
    "test_rule_Xlogy",
    "test_rule_Xlogy_zeros",
    "test_rule_burgers_residual",
    "test_rule_forces_of_a_logsumexp",
    "test_rule_forces_of_an_energy",
    "test_rule_gradient_of_a_batched_matmul",
    "test_rule_gradient_of_a_concatenation",
    "test_rule_gradient_of_a_gather_nd",
    "test_rule_gradient_of_a_softmax_cross_entropy",
    "test_rule_gradient_of_a_sparse_softmax_cross_entropy",
    "test_rule_gradient_of_a_transpose",
    "test_rule_gradient_of_products",
    "test_rule_gradient_of_sums",
    "test_rule_score_of_a_mixture",
  )

  @parameterized.named_parameters(*[(name, name) for name in _RULES])
  def test_rule(self, name):
    op_type, model = _RULES[name]
    self.assertIn(op_type, registry.RULES)
    # Inputs of the test's own, whatever ran before it (piecewise constant
    # ops have steps that finite differences must not straddle).
    x_val = np.random.default_rng(zlib.crc32(name.encode())).normal(
      size=(3, _K)
    )
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      # A sine on top: the op's Jacobian counts as well as its curvature.
      y = tf.sin(model(x))
      self.assertIn(op_type, {op.type for op in graph.get_operations()})
      _check(self, x, y, x_val, rows=name not in _NO_ROWS)

  def test_every_new_rule_has_a_test(self):
    models = set()
    for model in [m for _, m in _RULES.values()] + list(_L2_LOSSES.values()):
      with tf.Graph().as_default() as graph:
        model(tf.compat.v1.placeholder(tf.float64, [None, _K]))
        models |= {op.type for op in graph.get_operations()}
    self.assertEmpty(NEW_OP_TYPES - models)
    self.assertEmpty(NEW_OP_TYPES - set(registry.RULES))

  @parameterized.named_parameters(*_L2_LOSSES.items())
  def test_l2_loss_sums_over_the_batch(self, model):
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = model(x)
      self.assertIn("L2Loss", {op.type for op in graph.get_operations()})
      self.assertEqual(y.shape.rank, 0)
      _check(self, x, y, x_val)

  def test_a_function_of_an_l2_loss_falls_back(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.sqrt(tf.nn.l2_loss(tf.sin(x)))
      with self.assertRaisesRegex(ValueError, "Sqrt .* mixes samples"):
        tf1hess.batch_hessians(y, x, method="forward")

  def test_roll_over_the_batch_mixes_samples(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      rolled = tf.roll(tf.sin(x), 1, 0)
      linear = tf.reduce_sum(rolled, 1)  # Linear after the roll: followed.
      h = tf1hess.batch_hessians(linear, x, method="forward")
      rows = tf1hess.batch_hessians(linear, x, method="while_loop")
      with self.assertRaisesRegex(ValueError, "mixes samples"):
        tf1hess.batch_hessians(tf.tanh(rolled), x, method="forward")
      with tf.compat.v1.Session() as sess:
        got, want = sess.run([h, rows], {x: _RNG.normal(size=(3, _K))})
    self.assertAllClose(got, want, atol=1e-12)

  def test_reverse_sequence_of_a_time_major_tensor_falls_back(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.transpose(tf.reshape(tf.sin(x), [-1, 4, 3]), [1, 0, 2])
      lengths = tf.range(tf.shape(x)[0]) % 4 + 1
      y = tf.reduce_sum(
        tf.tanh(tf.reverse_sequence(steps, lengths, 0, batch_axis=1)), [0, 2]
      )
      with self.assertRaisesRegex(ValueError, "mixes samples"):
        tf1hess.batch_hessians(y, x, method="forward")
      # Batch first, along another axis than the batch's: declined.
      y = tf.reduce_sum(
        tf.reverse_sequence(
          tf.reshape(tf.sin(x), [-1, 4, 3]), [3, 2, 1], 1, batch_axis=2
        )
        ** 2,
        [1, 2],
      )
      with self.assertRaisesRegex(ValueError, "not the batch axis"):
        tf1hess.batch_hessians(y, x, method="forward")

  @parameterized.product(exclusive=[False, True], reverse=[False, True])
  def test_cumprod_of_zeros(self, exclusive, reverse):
    # Entries that are 0: the rule multiplies and never divides. Reference:
    # the same products as reduce_prod of slices, whose TensorFlow
    # gradient is exact at zeros.
    def prefixes(u):
      out = []
      for i in range(4):
        if reverse:
          lo, hi = i + 1 if exclusive else i, 4
        else:
          lo, hi = 0, i if exclusive else i + 1
        out.append(tf.reduce_prod(u[:, :, lo:hi], axis=2))
      return tf.stack(out, axis=2)

    def model(x, cumprod):
      mask = tf.constant([1.0, 0.0, 1.0, 1.0] * 3, x.dtype)
      u = tf.reshape(tf.sin(_lin(x)) * mask, [-1, 3, 4])
      return tf.reduce_sum(
        tf.tanh(tf.reshape(cumprod(u), [-1, _K])) * tf.cos(x), axis=1
      )

    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      cumprod = model(
        x,
        lambda u: tf.math.cumprod(
          u, axis=2, exclusive=exclusive, reverse=reverse
        ),
      )
      by_slices = model(x, prefixes)
      got = tf1hess.batch_hessians(cumprod, x, method="forward")
      want = tf1hess.batch_hessians(by_slices, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        got, want = sess.run([got, want], {x: x_val})
        hessians = _differences(sess, x, by_slices, x_val)
    self.assertAllClose(want, hessians, atol=1e-6)
    self.assertAllClose(got, want, atol=1e-12)

  @parameterized.named_parameters(
    ("dot", lambda x, u: tf.einsum("nk,nk->", x, u)),
    ("dot_per_feature", lambda x, u: tf.einsum("nk,nk->k", x, u)),
    ("outer", lambda x, u: tf.einsum("ni,nj->ij", x, u) * _W),
    ("quadratic_form", lambda x, u: tf.einsum("ni,ij,nj->", x, _W, u)),
    (
      "features_first",
      lambda x, u: tf.einsum("kn,kn->k", tf.transpose(x), tf.transpose(u)),
    ),
  )
  def test_einsum_of_two_tensors_of_x_summed_over_the_batch(self, product):
    # Each sample's products summed over the batch: every sample has the
    # cross terms of its own; the sum is read by linear ops only.
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.reduce_sum(product(tf.sin(_lin(x)), tf.tanh(_lin2(x))))
      _check(self, x, y, x_val)

  def test_einsum_pairing_samples_with_others_falls_back(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.einsum("nk,mk->", tf.sin(x), tf.tanh(x))
      _assert_declined(self, x, y, "samples paired with other samples")

  def test_reshape_of_two_samples_into_one_row_falls_back(self):
    # Per sample, but a row of the reshape holds two samples.
    x_val = _RNG.normal(size=(4, _K))
    expected = np.stack([np.diag(-np.sin(row)) for row in x_val])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      for y in (
        tf.reduce_sum(tf.sin(tf.reshape(x, [-1, 2 * _K]))),
        tf.reduce_sum(tf.reshape(tf.sin(x), [-1, 2 * _K]) ** 1),
      ):
        with self.assertRaisesRegex(ValueError, "mixes samples"):
          tf1hess.batch_hessians(y, x, method="forward")
        outs = [
          tf1hess.batch_hessians(y, x),
          tf1hess.batch_hessian_diagonals(y, x),
        ]
        with tf.compat.v1.Session() as sess:
          h, d = sess.run(outs, {x: x_val})
        self.assertAllClose(h, expected, atol=1e-12)
        self.assertAllClose(d, np.einsum("nii->ni", expected), atol=1e-12)

  @parameterized.parameters(1, 2)
  def test_cross_entropy_of_labels_of_x(self, cf):
    """Labels that depend on x (soft targets of the model itself): the
    rows miss the curvature through them, and auto takes the engine."""
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))

    def loss(x, by_hand):
      logits = tf.tanh(_lin(x))
      labels = tf.nn.softmax(0.5 * _lin2(x))
      if by_hand:
        return -tf.reduce_sum(labels * tf.nn.log_softmax(logits), 1)
      return tf.nn.softmax_cross_entropy_with_logits(
        labels=labels, logits=logits
      )

    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = loss(x, by_hand=False)
      h = _check(self, x, y, x_val, rows=False)
      with self.assertLogs(level="WARNING") as logs:
        auto = tf1hess.batch_hessians(y, x)
        rows = tf1hess.batch_hessians(y, x, method="while_loop")
      self.assertIn("miss the curvature through the labels", logs.output[0])
      reference = tf1hess.batch_hessians(loss(x, by_hand=True), x)
      with tf.compat.v1.Session() as sess:
        auto, rows, reference = sess.run([auto, rows, reference], {x: x_val})
    self.assertAllClose(auto, h, atol=1e-12)
    self.assertAllClose(reference, h, atol=1e-12)
    self.assertGreater(np.abs(rows - h).max(), 1e-3)  # TensorFlow's.

  @parameterized.named_parameters(
    ("prod", lambda x: tf.reduce_prod(x, 1)),
    ("cumprod", lambda x: tf.reduce_sum(tf.math.cumprod(x, axis=1), 1)),
  )
  def test_products_with_zeros_by_auto(self, model):
    """TensorFlow's second derivatives of products are wrong at zeros:
    auto takes the engine."""
    x_val = np.array([[0.0, 2.0, 3.0, 5.0], [1.5, 0.0, -2.0, 0.0]])
    cumulative = "cumprod" in self.id()
    expected = np.zeros((2, 4, 4))
    for n, row in enumerate(x_val):
      for i in range(4):
        for j in range(4):
          if i != j:
            ends = range(max(i, j), 4) if cumulative else [3]
            expected[n, i, j] = sum(
              np.prod(np.delete(row[: e + 1], [i, j])) for e in ends
            )
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      with self.assertNoLogs(level="WARNING"):
        auto = tf1hess.batch_hessians(model(x), x)
      with self.assertLogs(level="WARNING") as logs:
        rows = tf1hess.batch_hessians(model(x), x, method="while_loop")
      self.assertIn("wrong (or NaN) wherever an entry", logs.output[0])
      with tf.compat.v1.Session() as sess:
        auto, rows = sess.run([auto, rows], {x: x_val})
    self.assertAllClose(auto, expected, atol=1e-12)
    self.assertGreater(np.abs(rows - expected).max(), 1.0)  # TensorFlow's.

  def test_gather_of_samples(self):
    # The gradient of x gathered along its batch axis is IndexedSlices.
    x_val = _RNG.normal(size=(4, _K))
    expected = np.stack([np.diag(-np.sin(row)) for row in x_val])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      order = tf.range(tf.shape(x)[0])[::-1]
      y = tf.reduce_sum(tf.sin(tf.gather(x, order)), 1)
      outs = [
        tf1hess.batch_hessians(y, x, method=method)
        for method in ("auto", "while_loop", "pfor")
      ] + [tf1hess.batch_gradients(y, x)]
      with tf.compat.v1.Session() as sess:
        *hessians, g = sess.run(outs, {x: x_val})
    for h in hessians:
      self.assertAllClose(h, expected, atol=1e-12)
    self.assertAllClose(g, np.cos(x_val), atol=1e-12)

  def test_falling_back_on_samples_that_mix_says_what_the_rows_give(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.reduce_sum(tf.tanh(x - tf.reduce_mean(x, 0)) ** 2, 1)
      with self.assertLogs(level="WARNING") as logs:
        tf1hess.batch_hessians(y, x)
    (message,) = logs.output
    self.assertIn("mixes samples", message)
    self.assertIn("not its own block", message)
    self.assertIn("check_independence=True makes that an error", message)

  @parameterized.named_parameters(
    (
      "gather_nd",
      lambda h, rows, n: tf.gather_nd(h, rows),
      lambda h: tf.gather_nd(h, [[1, 0], [0, 2], [2, 5]]),
    ),
    (
      "scatter_nd",
      lambda h, rows, n: tf.scatter_nd(rows, h[:, 0], tf.stack([n, 3])),
      lambda h: tf.scatter_nd([[1, 0], [0, 2], [2, 1]], h[:, 0], [3, 3]),
    ),
  )
  def test_rows_of_other_samples(self, own, other):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = tf.tanh(_lin(x))
      n = tf.shape(x)[0]
      # Indices known at run time only: a check stops a gather that reads
      # (a scatter that writes to) other samples.
      rows = tf.stack([tf.range(n)[::-1], tf.fill([n], 1)], 1)
      y = tf.sin(own(h, rows, n))
      hessians = tf1hess.batch_hessians(y, x, method="forward")
      # Constant indices of other samples mix them.
      mixed = other(h)
      with self.assertRaisesRegex(ValueError, "mixes samples"):
        tf1hess.batch_hessians(tf.sin(mixed), x, method="forward")
      auto = tf1hess.batch_hessians(tf.sin(mixed), x)
      reference = tf1hess.batch_hessians(tf.sin(mixed), x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        x_val = _RNG.normal(size=(3, _K))
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, r"indices\[n, \.\.\., 0\] are not n"
        ):
          sess.run(hessians, {x: x_val})
        self.assertEqual(sess.run(hessians, {x: x_val[:1]}).shape, (1, _K, _K))
        got, want = sess.run([auto, reference], {x: x_val})
    self.assertAllClose(got, want, atol=1e-12)

  def test_residual_of_a_hard_constrained_network(self):
    # `u = x (1 - x) net(x, t)`, as physics-informed code makes boundary
    # conditions hold: the second gradient reads the shapes of tensors that
    # the first made to the shapes of the model's (`reshape(sum(ones),
    # shape(u))`).
    def output(xs, ts, h):
      del ts  # Unused.
      return xs * (1 - xs) * tf.reduce_sum(h, 1, keepdims=True)

    x_val = np.random.default_rng(31).uniform(size=(3, _K))
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.sin(_burgers_residual(x, output))
      auto = tf1hess.batch_hessians(y, x)
      sums = [
        op.outputs[0]
        for op in graph.get_operations()
        if op.type == "Sum" and op.name.startswith("gradients/")
      ]
      # TensorFlow 2.12 knows no rank of the sums of its gradients of
      # products: there the engine declines, and auto takes the rows.
      if all(t.shape.rank is not None for t in sums):
        h = _check(self, x, y, x_val)
      else:
        with self.assertRaisesRegex(ValueError, "mixes samples"):
          tf1hess.batch_hessians(y, x, method="forward")
        with tf.compat.v1.Session() as sess:
          h = _differences(sess, x, y, x_val)
      with tf.compat.v1.Session() as sess:
        self.assertAllClose(sess.run(auto, {x: x_val}), h, atol=1e-6)

  def test_gradient_of_a_concatenation_of_inputs(self):
    # `psi(tf.concat([x, t], 1))` and its velocity `u = d psi / d t`, as in
    # the Navier-Stokes residual: the gradient of the concatenation slices
    # at an offset and to a shape read from `t` and `x`, each of which does
    # not depend on the other but has its N rows.
    rng = np.random.default_rng(32)
    feed_vals = [rng.normal(size=(4, 2)), rng.normal(size=(4, 1))]
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 2])
      t = tf.compat.v1.placeholder(tf.float64, [None, 1])
      w1 = tf.constant(rng.normal(size=(3, 8)))
      w2 = tf.constant(rng.normal(size=(8, 1)))
      psi = tf.matmul(tf.tanh(tf.matmul(tf.concat([x, t], 1), w1)), w2)
      (u,) = tf.gradients(psi, t)
      got = tf1hess.batch_hessians(u, [x, t], method="forward")
      want = []
      for v in (x, t):
        (g,) = tf.gradients(u, v)
        rows = [tf.gradients(g[:, j], v)[0] for j in range(v.shape[1])]
        want.append(tf.stack(rows, axis=1))
      with tf.compat.v1.Session() as sess:
        got, want = sess.run([got, want], dict(zip((x, t), feed_vals)))
    for g, w in zip(got, want):
      self.assertAllClose(g, w, atol=1e-12)

  def test_matrices_across_the_batch_are_declined(self):
    # A rank-2 input: the batch axis is an axis of the matrices.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      h = tf.tanh(x @ tf.constant(_W[:4, :4]))
      for y in (
        tf.linalg.diag_part(h),
        tf.linalg.band_part(h, 0, 1)[:, 0],
        tf.reduce_sum(tf.linalg.diag(h[:, 0]), 1),
      ):
        with self.assertRaisesRegex(ValueError, "as an axis of its matrices"):
          tf1hess.batch_hessians(tf.sin(y), x, method="forward")

  def test_flatten_by_another_batch_size_raises(self):
    # A first axis read from another tensor's shape, which differs at run
    # time: the reshape mixes samples, and the engine's check stops it.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      other = tf.compat.v1.placeholder(tf.float64, [None])
      images = tf.sin(tf.reshape(x, [-1, 3, 4]))
      h = tf.reshape(images, [tf.shape(other)[0], -1])
      y = tf.reduce_sum(tf.tanh(h), axis=1)
      hessians = tf1hess.batch_hessians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, "changes the batch size"
        ):
          sess.run(hessians, {x: _RNG.normal(size=(2, _K)), other: [0] * 4})
        feed = {x: _RNG.normal(size=(2, _K)), other: [0] * 2}
        self.assertEqual(sess.run(hessians, feed).shape, (2, _K, _K))

  def test_reshape_of_entries_static_shapes_lost(self):
    # Reshapes to `[-1, C]` of a tensor whose entries static shapes do not
    # know: followed per sample, checked at run time.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      width = tf.compat.v1.placeholder(tf.int32, [])
      h = tf.reshape(tf.sin(_lin(x)), tf.stack([-1, width]))
      self.assertEqual(h.shape.as_list(), [None, None])
      ys = [tf.reduce_sum(tf.tanh(tf.reshape(h, [-1, c])), 1) for c in (12, 6)]
      same, halves = [
        tf1hess.batch_hessians(y, x, method="forward") for y in ys
      ]
      rows = tf1hess.batch_hessians(ys[0], x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        feed = {x: _RNG.normal(size=(2, _K)), width: _K}
        got, expected = sess.run([same, rows], feed)
        self.assertAllClose(got, expected, atol=1e-12)
        # Two rows a sample: the check (or a product of the tangents of N
        # samples with 2 N rows, run before it) raises.
        with self.assertRaises(tf.errors.InvalidArgumentError):
          sess.run(halves, feed)

  @parameterized.parameters(3, None)
  def test_dilated_convolution_by_auto(self, batch):
    # A static batch: the block's rows are B N, not x's N. A batch known at
    # run time only: auto estimates on a copy with a static batch.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [batch, 2, 3, 2])
      y = tf.reduce_sum(
        tf.sin(
          tf.nn.convolution(x, _filter(_F, x), padding="SAME", dilations=2)
        ),
        axis=[1, 2, 3],
      )
      self.assertIn(
        "SpaceToBatchND", {op.type for op in x.graph.get_operations()}
      )
      with mock.patch.object(
        dispatch, "choose", wraps=dispatch.choose
      ) as choose:
        x_val = np.random.default_rng(2).normal(size=(3, 2, 3, 2))
        _check(self, x, y, x_val)
        tf1hess.batch_laplacians(y, x)
      choose.assert_called_once()  # Auto's cost model, not a fallback.

  def test_max_pool_ties_take_the_first_entry_as_the_rows(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      # Windows of 2 entries: (x0, x1) and (x2, x0 + x1).
      u = tf.stack([x[:, 0], x[:, 1], x[:, 2], x[:, 0] + x[:, 1]], axis=1)
      pooled = tf.nn.max_pool2d(
        tf.reshape(u, [-1, 2, 2, 1]), [1, 2], 1, "VALID"
      )
      weights = tf.constant([[[[1.0]], [[3.0]]]], tf.float64)
      y = tf.reduce_sum(tf.square(pooled) * weights, axis=[1, 2, 3])
      h = tf1hess.batch_hessians(y, x, method="forward")
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        # Ties in both windows: x0 == x1, x2 == x0 + x1.
        feed = {x: np.array([[0.5, 0.5, 1.0, 7.0]])}
        h_val, rows_val = sess.run([h, rows], feed)
    expected = np.zeros((1, 4, 4))
    expected[0, 0, 0] = 2.0  # First window: x0.
    expected[0, 2, 2] = 6.0  # Second window: x2.
    self.assertAllClose(h_val, expected, atol=1e-12)
    self.assertAllClose(rows_val, expected, atol=1e-12)

  @parameterized.named_parameters(
    ("no_zero", [0.5, -2.0, 1.5, 3.0]),
    ("one_zero", [0.5, 0.0, 1.5, 3.0]),
    ("two_zeros", [0.0, -2.0, 0.0, 3.0]),
    ("three_zeros", [0.0, 0.0, 1.5, 0.0]),
    ("tiny", [1e-200, -2.0, 1e-150, 3.0]),
  )
  def test_prod_with_zeros_is_exact(self, values):
    """`d2 prod / dx_i dx_j = prod_{l != i, j} x_l`, zeros or not."""
    values = np.array([values])
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4])
      y = tf.reduce_prod(x, axis=1)
      outs = [
        tf1hess.batch_hessians(y, x, method="forward"),
        tf1hess.batch_laplacians(y, x, method="forward"),
      ]
      with tf.compat.v1.Session() as sess:
        h, lap = sess.run(outs, {x: values})
    expected = np.zeros((1, 4, 4))
    for i in range(4):
      for j in range(4):
        if i != j:
          expected[0, i, j] = np.prod(np.delete(values[0], [i, j]))
    # Zeros exactly where they are, the rest to the last bits.
    self.assertAllClose(h, expected, atol=0, rtol=1e-15)
    self.assertAllEqual(lap, [0.0])


def _conv_net(images):
  """conv2d -> tanh -> max pool -> flatten -> dense -> softplus -> sum."""
  init = tf.compat.v1.glorot_normal_initializer
  h = tf.compat.v1.layers.conv2d(
    images,
    3,
    3,
    padding="same",
    activation=tf.tanh,
    kernel_initializer=init(seed=1),
    bias_initializer=tf.compat.v1.random_normal_initializer(seed=2),
  )
  h = tf.compat.v1.layers.max_pooling2d(h, 2, 2)
  h = tf.compat.v1.layers.flatten(h)
  h = tf.compat.v1.layers.dense(
    h, 4, activation=tf.nn.softplus, kernel_initializer=init(seed=3)
  )
  return tf.reduce_sum(h, axis=1)


def _conv1d_net(x):
  """conv1d layers with gelu, an average pool, a dense read-out."""
  init = tf.compat.v1.glorot_normal_initializer
  h = tf.reshape(x, [-1, 6, 2])
  h = tf.compat.v1.layers.conv1d(
    h, 3, 3, padding="same", kernel_initializer=init(seed=4)
  )
  h = tf.nn.gelu(h)
  h = tf.nn.conv1d(h, _filter(_F1.transpose(0, 2, 1), h), 1, "VALID")
  h = tf.compat.v1.layers.average_pooling1d(tf.nn.leaky_relu(h, 0.1), 2, 2)
  h = tf.compat.v1.layers.flatten(h)
  return tf.compat.v1.layers.dense(h, 1, kernel_initializer=init(seed=5))


def _dilated_conv1d_net(x):
  """Dilated conv1d layers (SpaceToBatchND blocks), dense read-out."""
  init = tf.compat.v1.glorot_normal_initializer
  h = tf.reshape(x, [-1, 6, 2])
  for i, padding in enumerate(["same", "valid"]):
    h = tf.compat.v1.layers.conv1d(
      h,
      3,
      2,
      padding=padding,
      dilation_rate=2,
      activation=tf.nn.softplus,
      kernel_initializer=init(seed=20 + i),
    )
  h = tf.compat.v1.layers.flatten(h)
  return tf.compat.v1.layers.dense(h, 1, kernel_initializer=init(seed=22))


def _depthwise_net(x):
  h = tf.nn.depthwise_conv2d(
    tf.sin(_image(x)), _filter(_FD, x), [1, 1, 1, 1], "SAME"
  )
  h = tf.nn.avg_pool2d(tf.nn.elu(h), 2, 1, "VALID")
  return tf.reduce_sum(tf.square(h), axis=[1, 2, 3])


def _gelu_mlp(x):
  init = tf.compat.v1.glorot_normal_initializer
  h = tf.compat.v1.layers.dense(
    x, 8, activation=tf.nn.gelu, kernel_initializer=init(seed=6)
  )
  h = tf.compat.v1.layers.dense(h, 8, kernel_initializer=init(seed=7))
  h = tf.nn.leaky_relu(tf.nn.gelu(h, approximate=True), 0.2)
  return tf.compat.v1.layers.dense(h, 1, kernel_initializer=init(seed=8))


def _rank3_dense(x):
  """Dense layers on `(N, 4, 3)`: `tf.tensordot` of each layer's kernel."""
  init = tf.compat.v1.glorot_normal_initializer
  h = tf.reshape(x, [-1, 4, 3])
  h = tf.compat.v1.layers.dense(
    h, 6, activation=tf.nn.elu, kernel_initializer=init(seed=9)
  )
  h = tf.compat.v1.layers.dense(
    h, 2, activation=tf.tanh, kernel_initializer=init(seed=10)
  )
  return tf.reshape(h, [-1, 8]) + tf.reduce_sum(tf.square(x), 1, keepdims=True)


def _where_reverse_prod(x):
  """A Huber loss of a dense layer, a piecewise function of x, a product."""
  r = _lin(x)
  huber = tf.where(tf.abs(r) < 0.7, 0.5 * r * r, 0.7 * tf.abs(r) - 0.245)
  piece = tf.where(x > 0, tf.math.log1p(x * x), tf.math.erf(x))
  h = tf.reverse(tf.tanh(_lin(x)), [1])
  prod = tf.reduce_prod(tf.reshape(h, [-1, 4, 3]) + 1.0, axis=[2])
  return tf.reduce_sum(huber, 1) + tf.reduce_sum(piece, 1) + prod[:, 1]


def _chained_activations(x):
  """Chains and sums of elementwise functions of one dense layer: one
  scale of its Jacobian, folded into the next matmul."""
  z = _lin(x)
  h = 0.5 * tf.sin(tf.tanh(z)) - z * tf.sigmoid(z) + z
  return tf.reduce_sum(tf.tanh(tf.matmul(h, _filter(_W[:, :4], x))), 1)


def _gated_units(x):
  """A SwiGLU unit and a GLU unit beside a dense layer, summed: scales of
  three different weight matrices, folded into the next matmul."""
  a, b = _lin(x), _lin2(x)
  h = tf.nn.silu(a) * b + a * tf.sigmoid(b) + tf.matmul(x, _filter(_W.T, x))
  return tf.reduce_sum(tf.tanh(tf.matmul(h, _filter(_W[:, :4], x))), 1)


def _modified_mlp_layer(x):
  """A layer of the modified MLP of physics-informed networks: `z` of a
  hidden layer gates two encoders of x, `u` and `v`."""
  u, v = tf.tanh(_lin(x)), tf.sin(_lin2(x))
  z = tf.tanh(_lin(tf.tanh(_lin(x))))
  return (1.0 - z) * u + z * v


def _fourier_features(x):
  """`[sin(z), cos(z), x^2]` of a dense layer z, a tanh layer on them."""
  z = _lin(x)
  h = tf.concat([tf.sin(z), tf.cos(z), tf.square(x)], 1)
  w = np.random.default_rng(13).normal(size=(3 * _K, 4)) / 6.0
  return tf.reduce_sum(tf.tanh(tf.matmul(h, _filter(w, x))), 1)


_MODELS = {
  "chained_activations": _chained_activations,
  "fourier_features": _fourier_features,
  "gated_units": _gated_units,
  "modified_mlp": lambda x: tf.reduce_sum(
    tf.tanh(tf.matmul(_modified_mlp_layer(x), _filter(_W[:, :4], x))), 1
  ),
  "conv_tanh_maxpool_dense": lambda x: _conv_net(_image(x, (4, 3, 1))),
  "conv1d_gelu_avgpool": _conv1d_net,
  "depthwise_elu_avgpool": _depthwise_net,
  "dilated_conv1d": _dilated_conv1d_net,
  "gelu_leaky_relu_mlp": _gelu_mlp,
  "where_reverse_prod": _where_reverse_prod,
  "rank3_dense": _rank3_dense,
}


class FoldTest(tf.test.TestCase):
  """`registry.fold`: the integer arithmetic of static shapes."""

  def test_folds_arithmetic_on_static_ranks(self):
    with tf.Graph().as_default():
      u = tf.compat.v1.placeholder(tf.float64, [None, 3, 4])
      last = tf.rank(u) - 1
      perm = tf.concat([tf.range(0, last - 1), [last, last - 1]], 0)
      self.assertIsNone(tf.get_static_value(perm))
      self.assertAllEqual(registry.fold(perm), [0, 2, 1])
      self.assertEqual(registry.fold(tf.math.floormod(-1, tf.rank(u))), 2)
      self.assertAllEqual(registry.fold(tf.stack([last, 2 * last])), [2, 4])

  def test_leaves_what_is_known_only_at_run_time(self):
    with tf.Graph().as_default():
      u = tf.compat.v1.placeholder(tf.float64, [None, 3])
      self.assertIsNone(registry.fold(tf.shape(u)[0] - 1))
      self.assertIsNone(registry.fold(tf.reduce_sum(u)))
      with self.assertRaisesRegex(registry.Unsupported, "known only at run"):
        registry.static_value(tf.shape(u)[0] + 1, "size", u.op)


class FoldedMatMulTest(tf.test.TestCase, parameterized.TestCase):
  """A matmul by weights of a function of a dense layer, as one matmul."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_a_sum_of_layers_is_not_written_gate_logsumexp",
    "test_a_sum_of_layers_is_not_written_gate_norm",
    "test_a_sum_of_layers_is_not_written_gated_tanh",
    "test_a_sum_of_layers_is_not_written_log_mean_skip",
    "test_a_sum_of_layers_is_not_written_skip_softplus",
    "test_concatenations_that_do_not_fold_constant",
    "test_concatenations_that_do_not_fold_dense",
    "test_folds_chains_and_sums_of_functions_difference",
    "test_folds_chains_and_sums_of_functions_function_of_a_function",
    "test_folds_chains_and_sums_of_functions_gelu",
    "test_folds_chains_and_sums_of_functions_mish",
    "test_folds_chains_and_sums_of_functions_product_rule",
    "test_folds_chains_and_sums_of_functions_scaled_and_shifted",
    "test_folds_concatenated_scales_feature_map_of_x",
    "test_folds_concatenated_scales_fourier_features",
    "test_folds_concatenated_scales_layer_and_x",
    "test_folds_sums_of_scales_of_several_layers_dense_and_shared",
    "test_folds_sums_of_scales_of_several_layers_gated_tanh",
    "test_folds_sums_of_scales_of_several_layers_glu",
    "test_folds_sums_of_scales_of_several_layers_modified_mlp",
    "test_folds_sums_of_scales_of_several_layers_residual",
    "test_folds_sums_of_scales_of_several_layers_swiglu",
    "test_folds_sums_of_scales_of_several_layers_with_itself",
    "test_layers_that_read_x_contract_as_one_matmul0",
    "test_layers_that_read_x_contract_as_one_matmul1",
    "test_sums_of_more_scales_than_kept",
    "test_sums_read_elsewhere_do_not_fold",
    "test_terms_of_one_layer_contract_once_gelu_tanh",
  )

  def _hessians(self, dtype, folds, activation=tf.tanh, layer=None, also=None):
    """`layer(x)` (else `activation` of a dense layer) by weights, tanh;
    plus `also` of the layer, when given."""
    x_val = np.random.default_rng(3).normal(size=(5, _K))
    results = []

    def fold(*args):
      results.append(original(*args))
      return results[-1]

    original = structural._folded_matmul
    folded = mock.patch.object(structural, "_folded_matmul", fold)
    with tf.Graph().as_default(), folded:
      x = tf.compat.v1.placeholder(dtype, [None, _K])
      h = activation(_lin(x)) if layer is None else layer(x)
      m = h.shape[1]
      w = np.random.default_rng(11).normal(size=(m, 4)) / np.sqrt(m)
      y = tf.reduce_sum(tf.tanh(tf.matmul(h, _filter(w, x))), 1)
      if also is not None:
        y += tf.reduce_sum(also(h), 1)
      outs = [
        tf1hess.batch_hessians(y, x, method="forward"),
        tf1hess.batch_laplacians(y, x, method="forward"),
        tf1hess.batch_hessians(y, x, method="while_loop"),
      ]
      self.assertEqual(any(r is not None for r in results), folds)
      with tf.compat.v1.Session() as sess:
        return sess.run(outs, {x: x_val.astype(dtype.as_numpy_dtype)})

  def assertFoldsAndAgrees(self, dtypes=(tf.float32, tf.float64), **model):  # pylint: disable=invalid-name
    """The fold is taken, and agrees with the rows (Laplacians too)."""
    for dtype in dtypes:
      h, lap, rows = self._hessians(dtype, folds=True, **model)
      tol = 1e-5 if dtype == tf.float32 else 1e-12
      self.assertAllClose(h, rows, atol=tol, rtol=tol)
      self.assertAllClose(lap, np.einsum("nii->n", rows), atol=tol, rtol=tol)

  @parameterized.parameters(tf.float32, tf.float64)
  def test_folds_and_agrees_with_the_rows(self, dtype):
    self.assertFoldsAndAgrees([dtype])

  @parameterized.named_parameters(
    ("function_of_a_function", lambda z: tf.sin(tf.tanh(z))),
    ("scaled_and_shifted", lambda z: 0.5 * tf.tanh(z) + 1.0),
    ("negated", lambda z: -tf.nn.softplus(z)),
    ("product_rule", lambda z: z * tf.sigmoid(z)),
    ("mish", lambda z: z * tf.tanh(tf.nn.softplus(z))),
    ("gelu", tf.nn.gelu),
    ("difference", lambda z: tf.tanh(z) - z),
  )
  def test_folds_chains_and_sums_of_functions(self, activation):
    self.assertFoldsAndAgrees(activation=activation)

  @parameterized.named_parameters(
    ("swish", lambda z: z * tf.sigmoid(z)),
    ("mish", lambda z: z * tf.tanh(tf.nn.softplus(z))),
    ("gelu", tf.nn.gelu),
    ("gelu_tanh", lambda z: tf.nn.gelu(z, approximate=True)),
  )
  def test_terms_of_one_layer_contract_once(self, activation):
    """The cross term of `u * f(u)` is a term on the Jacobian of `u`
    twice: summed with `f''`'s, one contraction for the layer."""
    x_val = np.random.default_rng(5).normal(size=(4, _K))
    contracted = []

    def contract(term, *args, **kwargs):
      contracted.append(term)
      return original(term, *args, **kwargs)

    original = jacobians.contract
    counted = mock.patch.object(jacobians, "contract", contract)
    with tf.Graph().as_default(), counted:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.reduce_sum(activation(_lin(x)), 1)
      h = tf1hess.batch_hessians(y, x, method="forward")
      self.assertLen(contracted, 1)
      self.assertFalse(contracted[0].symmetric)
      contracted.clear()
      lap = tf1hess.batch_laplacians(y, x, method="forward")
      self.assertLen(contracted, 1)
      with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
          inner.watch(x)
          y_tape = tf.reduce_sum(activation(_lin(x)), 1)
        g = inner.gradient(y_tape, x)
      want = outer.batch_jacobian(g, x)
      with tf.compat.v1.Session() as sess:
        h, lap, want = sess.run([h, lap, want], {x: x_val})
    self.assertAllClose(h, want, atol=1e-12, rtol=1e-12)
    self.assertAllClose(lap, np.einsum("nii->n", want), atol=1e-12)

  @parameterized.parameters(tf.float32, tf.float64)
  def test_layers_that_read_x_contract_as_one_matmul(self, dtype):
    """The terms of two layers of `x` and of their product (gate and
    value), each of two factors shared by all samples: one matmul."""
    x_val = np.random.default_rng(6).normal(size=(5, _K))
    sizes = []

    def together(terms, *args):
      sizes.append(len(terms))
      return original(terms, *args)

    original = jacobians.contract_outer_of_shared
    counted = mock.patch.object(jacobians, "contract_outer_of_shared", together)

    def model(x):
      v = _lin2(x)
      return tf.reduce_sum(
        tf.nn.gelu(_lin(x)) * tf.nn.softplus(v) + tf.tanh(v), 1
      )

    with tf.Graph().as_default(), counted:
      x = tf.compat.v1.placeholder(dtype, [None, _K])
      h = tf1hess.batch_hessians(model(x), x, method="forward")
      # gelu'' on _lin, softplus'' and tanh'' on _lin2, the cross term.
      self.assertEqual(sizes, [3])
      want = tf1hess.batch_hessians(model(x), x, method="while_loop")
      with tf.compat.v1.Session() as sess:
        h, want = sess.run([h, want], {x: x_val.astype(dtype.as_numpy_dtype)})
    tol = 1e-5 if dtype == tf.float32 else 1e-12
    self.assertAllClose(h, want, atol=tol, rtol=tol)

  @parameterized.named_parameters(
    ("gate_logsumexp", lambda a, b: tf.reduce_logsumexp(a * tf.sigmoid(b), 1)),
    (
      "skip_softplus",
      lambda a, b: tf.reduce_sum(tf.nn.softplus(a + tf.tanh(b)), 1),
    ),
    (
      "gated_tanh",
      lambda a, b: tf.reduce_sum(tf.tanh(tf.tanh(a) * tf.sin(b)), 1),
    ),
    ("gate_norm", lambda a, b: tf.norm(a * tf.nn.softplus(b), axis=1)),
    (
      "log_mean_skip",
      lambda a, b: tf.math.log1p(
        tf.square(tf.reduce_mean(a + tf.sin(b), 1, keepdims=True))
      ),
    ),
  )
  def test_a_sum_of_layers_is_not_written(self, model):
    """The Jacobian `sum_i A_i s_i` of a sum of scales of dense layers `a`,
    `b` of `x` is neither written for its terms (`jacobians.by_summands`)
    nor for its sum over the units (`jacobians.summed_by_roots`): no op
    that runs makes a `(N, K, M)` tensor."""
    rng = np.random.default_rng(8)
    # A static N of at least K (`jacobians.outer_of_shared`).
    x_val = rng.normal(size=(16, _K))
    units = 20  # Not K: the Hessians are (N, K, K).
    w1, w2 = rng.normal(size=(2, _K, units)) / np.sqrt(_K)
    for batch in (None, 16):
      with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float64, [batch, _K])
        a = tf.matmul(x, _filter(w1, x)) + 0.3
        y = model(a, tf.matmul(x, _filter(w2, x)) - 0.2)
        outs = [
          tf1hess.batch_hessians(y, x, method="forward"),
          tf1hess.batch_hessian_diagonals(y, x, method="forward"),
          tf1hess.batch_laplacians(y, x, method="forward"),
        ]
        want = tf1hess.batch_hessians(y, x, method="while_loop")
        with tf.compat.v1.Session() as sess:
          meta = tf.compat.v1.RunMetadata()
          got = sess.run(
            outs[0],
            {x: x_val},
            options=tf.compat.v1.RunOptions(trace_level=3),
            run_metadata=meta,
          )
          diagonals, laplacians, want = sess.run(outs[1:] + [want], {x: x_val})
      ran = {
        s.node_name.split(":")[0]
        for d in meta.step_stats.dev_stats
        for s in d.node_stats
      }
      written = [
        op.name
        for op in graph.get_operations()
        if op.name in ran
        and any(
          t.shape.rank == 3 and t.shape[1:].as_list() == [_K, units]
          for t in op.outputs
        )
      ]
      self.assertEqual(written, [])
      self.assertAllClose(got, want, atol=1e-12, rtol=1e-12)
      self.assertAllClose(diagonals, np.einsum("nii->ni", want), atol=1e-12)
      self.assertAllClose(laplacians, np.einsum("nii->n", want), atol=1e-12)

  @parameterized.named_parameters(
    (
      "fourier_features",
      lambda x: tf.concat([tf.sin(_lin(x)), tf.cos(_lin(x))], 1),
    ),
    (
      "feature_map_of_x",
      lambda x: tf.concat([x, tf.sin(x), tf.cos(2.0 * x)], -1),
    ),
    ("layer_and_x", lambda x: tf.concat([tf.tanh(_lin(x)), x], 1)),
  )
  def test_folds_concatenated_scales(self, layer):
    self.assertFoldsAndAgrees(layer=layer)

  @parameterized.named_parameters(
    ("glu", lambda x: _lin(x) * tf.sigmoid(_lin2(x))),
    ("swiglu", lambda x: tf.nn.silu(_lin(x)) * _lin2(x)),
    ("gated_tanh", lambda x: tf.tanh(tf.tanh(_lin(x)) * tf.sin(_lin2(x)))),
    ("residual", lambda x: _lin2(x) + tf.tanh(_lin(x))),
    ("with_itself", lambda x: _lin(x) * tf.sigmoid(_lin2(x)) + _lin(x)),
    ("modified_mlp", _modified_mlp_layer),
    ("dense_and_shared", lambda x: tf.tanh(_lin(tf.tanh(_lin(x)))) * _lin2(x)),
  )
  def test_folds_sums_of_scales_of_several_layers(self, layer):
    self.assertFoldsAndAgrees(layer=layer)

  def test_sums_of_more_scales_than_kept(self):
    def layer(x):  # Scales of six layers' weights, summed in turn.
      gates = [tf.sin(_lin(x) * (i + 1.0)) * _lin2(x) for i in range(2)]
      dense = [tf.tanh(tf.matmul(x, _filter(_W * i, x))) for i in (2.0, 3.0)]
      return tf.add_n(gates + dense)

    with mock.patch.object(jacobians, "_MAX_SUMMANDS", 4):
      # The first five sum to a dense Jacobian: the last one, a single
      # shared term beside it, is not folded (`_folded_matmul`).
      h, _, rows = self._hessians(tf.float64, folds=False, layer=layer)
    self.assertAllClose(h, rows, atol=1e-12, rtol=1e-12)

  def test_sums_read_elsewhere_do_not_fold(self):
    # A residual layer: the sum's Jacobian is written for its square.
    h, _, rows = self._hessians(
      tf.float64,
      folds=False,
      layer=lambda x: _lin2(x) + tf.tanh(_lin(x)),
      also=tf.square,
    )
    self.assertAllClose(h, rows, atol=1e-12, rtol=1e-12)

  def test_sums_through_too_many_units_do_not_fold(self):
    # The next matmul has 4 units.
    with mock.patch.object(structural, "_FOLD_UNITS", 3):
      h, _, rows = self._hessians(
        tf.float64, folds=False, layer=lambda x: _lin(x) * tf.sigmoid(_lin2(x))
      )
    self.assertAllClose(h, rows, atol=1e-12, rtol=1e-12)

  @parameterized.named_parameters(
    # A feature that does not depend on x, and one of a dense Jacobian.
    ("constant", lambda x: tf.concat([tf.sin(x), tf.ones_like(x)], 1)),
    (
      "dense",
      lambda x: tf.concat([tf.sin(x), tf.sin(x) * tf.tanh(_lin(x))], 1),
    ),
  )
  def test_concatenations_that_do_not_fold(self, layer):
    h, _, rows = self._hessians(tf.float64, folds=False, layer=layer)
    self.assertAllClose(h, rows, atol=1e-12, rtol=1e-12)

  def test_weights_too_large_to_fold(self):
    with mock.patch.object(structural, "_MAX_FOLDED_ENTRIES", _K * _K * 4 - 1):
      h, _, rows = self._hessians(tf.float64, folds=False)
    self.assertAllClose(h, rows, atol=1e-12, rtol=1e-12)


class ForwardRuleModelsTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_image_input0",
    "test_image_input1",
    "test_keras_decoder0",
    "test_keras_decoder1",
    "test_keras_multi_head_attention0",
    "test_keras_multi_head_attention1",
    "test_model0",
    "test_model1",
    "test_model10",
    "test_model2",
    "test_model3",
    "test_model4",
    "test_model5",
    "test_model6",
    "test_model7",
    "test_model8",
    "test_model9",
    "test_rows_of_parts_with_a_static_batch0",
    "test_rows_of_parts_with_a_static_batch1",
  )

  @parameterized.parameters(testing_utils.in_turn(model=list(_MODELS)))
  def test_model(self, model, cf):
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = _MODELS[model](x)
      _check(self, x, y, x_val, variables=True)

  @parameterized.parameters(1, 2)
  def test_rows_of_parts_with_a_static_batch(self, cf):
    # Static shapes: tensordot reshapes by constants, (3, 4, 3) to (12, 3).
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [3, _K])
      y = _rank3_dense(x)
      _check(self, x, y, x_val, variables=True)

  @parameterized.parameters(1, 2)
  def test_keras_multi_head_attention(self, cf):
    """Self-attention over 4 tokens of 3 features: einsums of two of x."""
    keras = testing_utils.legacy_keras(self)
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      tokens = tf.reshape(x, [-1, 4, 3])
      # Its inner layers take Keras' float type (float32 in TensorFlow
      # 2.12's Keras, whatever `dtype` says).
      floatx = keras.backend.floatx()
      keras.backend.set_floatx("float64")
      self.addCleanup(keras.backend.set_floatx, floatx)
      attention = keras.layers.MultiHeadAttention(2, 3, dtype="float64")
      y = tf.reduce_sum(tf.tanh(attention(tokens, tokens)), axis=[1, 2])
      self.assertEmpty(
        [
          op.name
          for op in graph.get_operations()
          if any(t.dtype == tf.float32 for t in op.outputs)
        ]
      )
      products = [
        op
        for op in graph.get_operations()
        if op.type == "Einsum" and len(op.inputs) == 2
      ]
      self.assertNotEmpty(products)
      _check(self, x, y, x_val, variables=True)

  @parameterized.parameters(1, 2)
  def test_keras_decoder(self, cf):
    """Conv2DTranspose and UpSampling2D (nearest: TensorFlow has no second
    derivative of it, so the rows cannot be built and auto takes the
    engine)."""
    keras = testing_utils.legacy_keras(self)
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      tf.compat.v1.set_random_seed(7)  # The same weights in each session.
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      image = tf.reshape(tf.tanh(_lin(x)), [-1, 2, 3, 2])
      h = keras.layers.Conv2DTranspose(
        3, 3, strides=2, padding="same", activation="tanh", dtype="float64"
      )(image)
      h = keras.layers.UpSampling2D(dtype="float64")(h)
      h = keras.layers.Conv2D(2, 3, activation="softplus", dtype="float64")(h)
      y = tf.reduce_sum(tf.sin(h), axis=[1, 2, 3])
      types = {op.type for op in x.graph.get_operations()}
      self.assertContainsSubset(
        ["Conv2DBackpropInput", "ResizeNearestNeighbor"], types
      )
      auto = tf1hess.batch_hessians(y, x)
      h_val = _check(self, x, y, x_val, rows=False, variables=True)
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        self.assertAllClose(sess.run(auto, {x: x_val}), h_val, atol=1e-12)

  @parameterized.parameters(1, 2)
  def test_image_input(self, cf):
    """x `(N, H, W, C)`: K = H W C, Hessians `(N, H, W, C, H, W, C)`."""
    self.control_flow(cf)
    x_val = _RNG.normal(size=(2, 4, 3, 1))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, 4, 3, 1])
      _check(self, x, _conv_net(x), x_val, variables=True)


def _time_major(x):
  """`(N, 3, 4)` unstacked time-major, a step each, stacked back."""
  steps = tf.unstack(tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2]))
  h = tf.zeros_like(steps[0][:, :2])
  outputs = []
  for step in steps:
    h = tf.tanh(tf.matmul(step, _filter(_W[:4, :2], x)) + h * h)
    outputs.append(h)
  return tf.transpose(tf.stack(outputs), [1, 0, 2])  # (N, 3, 2)


def _reversed_time_major(x):
  """A reverse along time of the time-major tensor, then batch first."""
  moved = tf.transpose(tf.sin(tf.reshape(x, [-1, 3, 4])), [2, 0, 1])
  return tf.tanh(tf.transpose(tf.reverse(moved, [0, 2]), [1, 0, 2]))


def _unstacked_to_moved(x):
  """Steps of an unstack that keep the batch axis last, then transposed."""
  moved = tf.transpose(tf.tanh(tf.reshape(x, [-1, 3, 4])), [1, 2, 0])
  return tf.stack([tf.sin(tf.transpose(s)) for s in tf.unstack(moved)], 1)


def _functions_of_time_major(x):
  """Elementwise functions of time-major tensors, then batch first."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])
  h = tf.square(tf.tanh(moved))  # (3, N, 4)
  return tf.transpose(tf.exp(tf.sin(tf.reverse(h, [0]))), [1, 2, 0])


def _products_of_time_major(x):
  """Functions of two time-major tensors (and of constants that broadcast
  against them), then batch first."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])  # (3, N, 4)
  scale = tf.constant(_RNG.normal(size=4), x.dtype)
  h = tf.tanh(moved) * moved * scale + 0.5
  h = tf.math.squared_difference(h, tf.reverse(moved, [0])) / (1.0 + h * h)
  h = tf.maximum(h, moved) - tf.pow(tf.sigmoid(moved), h)
  return tf.transpose(tf.where(moved > 0.0, h, tf.sin(h)), [1, 2, 0])


def _indexed_time_major(x):
  """Steps read as `x_tm[t]` of the time-major tensor, a slice of it kept
  time-major and transposed back."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])
  h = tf.zeros_like(moved[0, :, :2])
  for t in range(3):
    h = tf.tanh(tf.matmul(moved[t], _filter(_W[:4, :2], x)) + h * h)
  late = tf.transpose(tf.sin(moved[1:, :, ::2]), [1, 0, 2])  # (N, 2, 2)
  return h[:, None, :] * late


def _sliced_batch_last(x):
  """Slices of a tensor whose batch axis a transpose put last."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [2, 1, 0])  # (4, 3, N)
  first = tf.transpose(tf.tanh(moved[1]))  # (N, 3)
  rest = tf.transpose(moved[2:, -2:], [2, 0, 1])  # (N, 2, 2)
  return tf.sin(rest) * first[:, :2, None]


def _gathered_time_major(x):
  """Steps of the time-major tensor picked by `tf.gather`."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 2, 0])  # (3, 4, N)
  step = tf.transpose(tf.gather(moved, 1))  # (N, 4)
  steps = tf.gather(tf.sin(moved), [2, 0], axis=0)  # (2, 4, N)
  pairs = tf.gather(moved, [[3, 1], [0, 0]], axis=1)  # (3, 2, 2, N)
  late = tf.transpose(steps, [2, 0, 1]) * step[:, None, :]  # (N, 2, 4)
  return tf.tanh(late[:, :, :2]) + tf.transpose(pairs[1], [2, 0, 1])


def _batch_first_against_time_major(x):
  """Time-major and batch-last tensors with batch-first ones that
  broadcast against them: `h` `(N, 4)`, `h[None]` and `tf.expand_dims(h,
  0)` against `(3, N, 4)`, and `(N,)` against `(4, 3, N)`."""
  seq = tf.reshape(x, [-1, 3, 4])
  moved = tf.transpose(seq, [1, 0, 2])  # (3, N, 4)
  h = tf.tanh(x[:, 2:6])  # (N, 4)
  s = tf.sin(moved) * h + tf.math.squared_difference(moved, h[None])
  s = s / (1.0 + tf.expand_dims(h * h, 0)) - tf.pow(tf.sigmoid(h), moved)
  last = tf.transpose(seq, [2, 1, 0]) * tf.sin(x[:, 0])  # (4, 3, N)
  return tf.transpose(s, [1, 0, 2]) + tf.transpose(tf.tanh(last), [2, 1, 0])


def _reduced_time_major(x):
  """Reductions and squeezes of time-major tensors over axes other than
  the batch's: batch first again where time is reduced away, still moved
  where it is kept."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])  # (3, N, 4)
  h = tf.tanh(moved)
  pooled = tf.reduce_mean(h * moved, 0) + tf.reduce_sum(tf.sin(moved), 0)
  pooled += tf.math.reduce_euclidean_norm(moved, 0)  # (N, 4)
  peak = tf.squeeze(tf.reduce_max(h, 0, keepdims=True), 0)
  peak -= tf.reduce_min(tf.square(moved), -3)  # (N, 4)
  per_step = tf.reduce_prod(tf.sin(moved), 2) + tf.norm(moved, axis=2)
  per_step = tf.transpose(per_step)  # (N, 3)
  pooled = pooled[:, :3] + pooled[:, 3:]  # Every norm read: no NaN rows.
  return tf.stack([pooled * per_step, peak[:, 1:]], 2)  # (N, 3, 2)


def _attention_over_time_major(x):
  """Time-major states by weights (`states_tm @ W`), scored against a
  batch-first query with a softmax over time, sliced with an ellipsis and
  new axes, and pooled."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])  # (3, N, 4)
  states = tf.tanh(moved @ _filter(_W[:4, :3], x))  # (3, N, 3)
  query = tf.sin(x[:, 1:4])  # (N, 3)
  score = tf.nn.softmax(tf.reduce_sum(states * query, -1), axis=0)  # (3, N)
  gate = tf.sigmoid(states[..., :1]) * score[..., None]  # (3, N, 1)
  pooled = tf.reduce_sum(states * gate, 0)  # (N, 3)
  return (
    tf.transpose(tf.square(states[None, 1:, :, ::2]), [2, 1, 0, 3])[:, :, 0]
    * pooled[:, None, :2]
  )


def _split_time_major_rows(x):
  """TF1 recurrent code's input: time-major, merged to rows `(T N, F)`,
  split into steps `(N, F)` (`tf.split(..., T, 0)`), a cell run over them."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])  # (3, N, 4)
  steps = tf.split(tf.reshape(moved, [-1, 4]), 3, 0)
  h = tf.zeros_like(steps[0][:, :2])
  outputs = []
  for step in steps:
    h = tf.tanh(tf.matmul(step, _filter(_W[:4, :2], x)) + h * h)
    outputs.append(h)
  return tf.stack(outputs, 1)  # (N, 3, 2)


def _dense_over_time_major_rows(x):
  """A layer over the rows `(T N, F)` of a time-major tensor, reshaped back
  to `(T, N, H)`, against the time-major tensor, then batch first."""
  moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])  # (3, N, 4)
  rows = tf.reshape(tf.sin(moved), [-1, 4])  # (3 N, 4)
  h = tf.tanh(tf.matmul(rows, _filter(_W[:4, :2], x)) + 0.1)
  h = tf.reshape(h * tf.reduce_sum(rows, 1, keepdims=True), [3, -1, 2])
  return tf.transpose(h * moved[:, :, 1:3], [1, 0, 2])  # (N, 3, 2)


def _halves_of_time_major_rows(x):
  """Rows `(T N, F)` split into halves of T / 2 steps each, a layer over
  each, reshaped back and concatenated along time."""
  moved = tf.transpose(tf.reshape(x, [-1, 4, 3]), [1, 0, 2])  # (4, N, 3)
  halves = tf.split(tf.reshape(moved, [-1, 3]), 2, 0)  # (2 N, 3) each
  parts = [
    tf.reshape(tf.sigmoid(h @ _filter(_W[:3, :2], x)) * h[:, :2], [2, -1, 2])
    for h in halves
  ]
  start = tf.ones(tf.stack([1, tf.shape(x)[0], 2]), x.dtype)
  return tf.transpose(tf.concat([start, *parts], 0), [1, 0, 2])  # (N, 5, 2)


def _time_major_rows_of_other_axes(x):
  """A batch axis second after a transpose of other axes, and entries of
  rank 2 merged into rows of rank 1."""
  moved = tf.transpose(tf.reshape(x, [-1, 4, 3]), [2, 0, 1])  # (3, N, 4)
  rows = tf.reshape(tf.tanh(moved), [-1, 4])
  moved4 = tf.transpose(tf.reshape(x, [-1, 3, 2, 2]), [1, 0, 2, 3])
  rows4 = tf.reshape(moved4, [-1, 4])  # (3 N, 4)
  h = tf.reshape(tf.exp(0.3 * rows) * tf.cos(rows4), [3, -1, 4])
  return tf.transpose(h, [1, 2, 0])  # (N, 4, 3)


class MovedBatchAxisTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  """Transposes that move the batch axis, and back (`registry.Moved`)."""

  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = (
    "test_einsum_three_way",
    "test_forces_of_static_rnn0",
    "test_forces_of_static_rnn1",
    "test_keras_recurrent_layer_unrolled1",
    "test_keras_recurrent_layer_unrolled2",
    "test_keras_recurrent_layer_unrolled5",
    "test_keras_recurrent_layer_unrolled6",
    "test_keras_recurrent_layer_unrolled7",
    "test_model10",
    "test_model4",
    "test_model8",
    "test_model9",
    "test_static_rnn_over_split_time_major_rows1",
  )

  @parameterized.parameters(
    testing_utils.in_turn(
      model=[
        _time_major,
        _reversed_time_major,
        _unstacked_to_moved,
        _functions_of_time_major,
        _products_of_time_major,
        _indexed_time_major,
        _sliced_batch_last,
        _gathered_time_major,
        _batch_first_against_time_major,
        _reduced_time_major,
        _attention_over_time_major,
        _split_time_major_rows,
        _dense_over_time_major_rows,
        _halves_of_time_major_rows,
        _time_major_rows_of_other_axes,
      ]
    )
  )
  def test_model(self, model, cf):
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      out = model(x)
      y = tf.reduce_sum(tf.sin(out) * tf.cos(out), axis=[1, 2])
      _check(self, x, y, x_val)

  @parameterized.parameters(
    testing_utils.in_turn(
      forces=[False, True], layer=["SimpleRNN", "GRU", "LSTM", "Bidirectional"]
    )
  )
  def test_keras_recurrent_layer_unrolled(self, forces, layer, cf):
    # unroll=True: Keras goes time-major and unstacks the steps. Against
    # finite differences only: the rows through these graphs take long.
    # With `forces`, a function of the gradient of the layer's output: its
    # steps start from zero states whose shapes the second gradient reads.
    keras = testing_utils.legacy_keras(self)
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      floatx = keras.backend.floatx()
      keras.backend.set_floatx("float64")
      self.addCleanup(keras.backend.set_floatx, floatx)
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      if layer == "Bidirectional":
        # Its backward layer reverses the time-major steps.
        rnn = keras.layers.Bidirectional(
          keras.layers.SimpleRNN(3, unroll=True, return_sequences=True)
        )
      else:
        rnn = getattr(keras.layers, layer)(
          3, unroll=True, return_sequences=True
        )
      out = rnn(tf.reshape(x, [-1, 3, 4]))
      y = tf.reduce_sum(tf.sin(out), axis=[1, 2])
      if forces:
        y = tf.reduce_sum(tf.sin(tf.gradients(y, x)[0]), 1)
      _check(self, x, y, x_val, rows=False, variables=True)

  @parameterized.parameters(
    testing_utils.in_turn(cell=["BasicLSTMCell", "GRUCell"])
  )
  def test_static_rnn_over_split_time_major_rows(self, cell, cf):
    # The input of TF1 recurrent networks as tutorials wrote it: steps
    # transposed time-major, merged to rows and split (`tf.split(..., T, 0)`).
    testing_utils.legacy_keras(self)
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])
      steps = tf.split(tf.reshape(steps, [-1, 4]), 3, 0)
      rnn_cell = getattr(tf.compat.v1.nn.rnn_cell, cell)(3, dtype=tf.float64)
      outputs, _ = tf.compat.v1.nn.static_rnn(rnn_cell, steps, dtype=tf.float64)
      y = tf.compat.v1.layers.dense(outputs[-1], 1, tf.nn.softplus)[:, 0]
      _check(self, x, y, x_val, variables=True)

  @parameterized.parameters(
    testing_utils.in_turn(cell=["LSTMCell", "GRUCell", "BasicRNNCell"])
  )
  def test_forces_of_static_rnn(self, cell, cf):
    # A function of the gradient of a TF1 recurrent network: its steps
    # start from a `zero_state` whose shape, made of the batch size, the
    # second gradient reads. (Over steps unstacked batch first: gradients
    # through time-major rows are not followed.)
    testing_utils.legacy_keras(self)
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.unstack(tf.reshape(x, [-1, 3, 4]), axis=1)
      rnn_cell = getattr(tf.compat.v1.nn.rnn_cell, cell)(3, dtype=tf.float64)
      outputs, _ = tf.compat.v1.nn.static_rnn(rnn_cell, steps, dtype=tf.float64)
      energy = tf.compat.v1.layers.dense(outputs[-1], 1, tf.nn.softplus)
      y = tf.reduce_sum(tf.sin(tf.gradients(energy, x)[0]), 1)
      _check(self, x, y, x_val, rows=False, variables=True)

  @parameterized.named_parameters(
    ("to_samples", lambda rows: tf.reshape(rows, [-1, 12])),
    ("to_steps_of_other_entries", lambda rows: tf.reshape(rows, [3, -1, 2])),
  )
  def test_time_major_rows_reshaped_otherwise_raise(self, reshape):
    # Rows `t N + n` reshaped to other than `(T, N, ...)`: rows of several
    # samples, not followed.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      steps = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])
      y = tf.reduce_sum(tf.sin(reshape(tf.reshape(steps, [-1, 4]))), -1)
      with self.assertRaisesRegex(
        ValueError, "the rows of a time-major tensor to other than"
      ):
        tf1hess.batch_hessians(y, x, method="forward")

  @parameterized.named_parameters(
    # tf.einsum of three operands contracts the weights with one first,
    # "ij,ni->jn": its batch index is second.
    (
      "bilinear_form",
      lambda x, w, v: tf.einsum("ni,ij,nj->n", tf.sin(x), w, tf.tanh(x)),
    ),
    ("quadratic_form", lambda x, w, v: tf.einsum("ni,ij,nj->n", x, w, x)),
    (
      "three_way",
      lambda x, w, v: tf.reduce_sum(
        tf.sin(tf.einsum("ni,ijk,nk->nj", x, v, tf.sin(x[:, :2]))), axis=1
      ),
    ),
    (
      "moved_operand",
      lambda x, w, v: tf.einsum("in,ni->n", tf.transpose(tf.sin(x)), x * x),
    ),
  )
  def test_einsum(self, model):
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      w = _filter(_W, x)
      v = _filter(_RNG.normal(size=(_K, 3, 2)), x)
      _check(self, x, model(x, w, v), x_val)

  def test_the_op_that_mixed_the_samples_is_named(self):
    # Not the nonlinear op alone: the one it reads the mixing from, through
    # the linear ops between.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      centered = 2.0 * (x - tf.reduce_mean(x, 0, name="batch_mean"))
      y = tf.reduce_sum(tf.tanh(centered, name="squash"), axis=1)
      with self.assertRaisesRegex(
        ValueError,
        r"Tanh \(squash\) is nonlinear in a tensor that mixes samples "
        r"\(Mean \(batch_mean\) sums, reshapes or slices over the batch "
        r"axis\)",
      ):
        tf1hess.batch_hessians(y, x, method="forward")
      # Time-major sequences reversed per sample: the walk follows the
      # transpose, not the reverse along the moved batch axis.
      lengths = tf.fill([tf.shape(x)[0]], 3)
      steps = tf.transpose(tf.reshape(x[:, :4], [-1, 4, 1]), [1, 0, 2])
      reversed_steps = tf.reverse_sequence(
        steps, lengths, seq_axis=0, batch_axis=1, name="backward"
      )
      y = tf.reduce_sum(tf.sin(reversed_steps), axis=[0, 2])
      with self.assertRaisesRegex(
        ValueError,
        r"mixes samples \(ReverseSequence \(backward\) reads a tensor "
        r"whose batch axis a transpose moved, and cannot follow it there\)",
      ):
        tf1hess.batch_hessians(y, x, method="forward")

  def test_nonlinear_op_on_a_moved_tensor_raises(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      moved = tf.transpose(x[:, :4])  # (4, N)
      # Times a batch-first (N, 4): each batch axis meets the other's
      # entries (it runs for N = 4, mixing samples).
      y = tf.reduce_sum(tf.transpose(moved * x[:, :4]), axis=1)
      with self.assertRaisesRegex(
        ValueError,
        r"Mul \(mul\) is nonlinear in a tensor that mixes samples \(Mul "
        r"\(mul\) reads a tensor whose batch axis a transpose moved",
      ):
        tf1hess.batch_hessians(y, x, method="forward")

  @parameterized.named_parameters(
    ("one_sample", lambda moved: moved[:, 0]),
    ("samples_reversed", lambda moved: moved[:, ::-1]),
    ("new_axis", lambda moved: moved[None, :, 1:]),
    ("gathered_samples", lambda moved: tf.gather(moved, [1, 0], axis=1)),
    # (3, N 4): not rows `t N + n`, each row mixes samples.
    ("reshaped_across_samples", lambda moved: tf.reshape(moved, [3, -1])),
  )
  def test_slice_along_a_moved_batch_axis_mixes_samples(self, sliced):
    # A slice that takes part of the batch axis, or new axes: not followed,
    # and auto takes the rows.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      moved = tf.transpose(tf.reshape(x, [-1, 3, 4]), [1, 0, 2])
      h = tf.reshape(tf.tanh(sliced(moved)), [-1])
      y = x[:, 0] * tf.reduce_sum(tf.sin(h))
      _assert_declined(self, x, y, "nonlinear in a tensor")


class DilatedBlockTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  @parameterized.parameters(1, 2)
  def test_rows_built_first(self, cf):
    """The row loop's ops read the block's tensors: built after it, they do
    not count as readers that would mix samples."""
    self.control_flow(cf)
    x_val = _RNG.normal(size=(3, _K))
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.reduce_sum(_dilated_conv1d_net(x), axis=1)
      rows = tf1hess.batch_hessians(y, x, method="while_loop")
      h = tf1hess.batch_hessians(y, x, method="forward")
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        h_val, rows_val = sess.run([h, rows], {x: x_val})
    self.assertAllClose(h_val, rows_val, atol=1e-10, rtol=1e-10)


def _dilate(f, rate):
  """The filter of an undilated convolution equal to one of rate `rate`."""
  h, w = f.shape[:2]
  out = np.zeros(((h - 1) * rate + 1, (w - 1) * rate + 1) + f.shape[2:])
  out[::rate, ::rate] = f
  return out


@functools.cache
def _differentiates_dilated_conv2d(data_format):
  """Whether plain `tf.gradients` runs through a dilated `tf.nn.conv2d`.

  Without oneDNN (CPUs without AVX-512, or TF_ENABLE_ONEDNN_OPTS=0) the CPU
  kernel of its input gradient refuses dilations larger than 1.
  """
  with tf.Graph().as_default():
    h = tf.ones([1, 3, 4, 2] if data_format == "NHWC" else [1, 2, 3, 4])
    f = tf.ones([2, 2, 2, 1])
    y = tf.nn.conv2d(h, f, 1, "SAME", data_format=data_format, dilations=2)
    with tf.compat.v1.Session() as sess:
      try:
        sess.run([y, tf.gradients(y, h)])
      except tf.errors.InvalidArgumentError:
        return False
  return True


def _check_float32(test, model, equivalent, rows=True):
  """Checks the engine on the float32 `model` of `(N, K)` inputs.

  Against the rows built in the same graph (unless `rows` is False: then
  against auto's choice) and float64 central differences of `equivalent`,
  the same function made of ops that run in float64.
  """
  x_val = _RNG.normal(size=(3, _K))
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, _K])
    y = model(x)
    outs = [
      tf1hess.batch_hessians(y, x, method="forward"),
      tf1hess.batch_laplacians(y, x, method="forward"),
      tf1hess.batch_hessians(y, x, method="while_loop" if rows else "auto"),
    ]
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      h_val, lap_val, rows_val = sess.run(outs, {x: x_val})
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float64, [None, _K])
    y = equivalent(x)
    with tf.compat.v1.Session() as sess:
      reference = _differences(sess, x, y, x_val)
  test.assertAllClose(h_val, rows_val, atol=1e-5, rtol=1e-4)
  test.assertAllClose(h_val, reference, atol=1e-5, rtol=1e-4)
  test.assertAllClose(
    lap_val, np.einsum("nii->n", reference), atol=1e-5, rtol=1e-4
  )


def _check_gradients(test, model, equivalent):
  """Checks `batch_gradients` of the float32 `model` against
  `tf.gradients` of its float64 `equivalent`; returns `model`'s graph."""
  x_val = _RNG.normal(size=(3, _K))
  gradients = []
  for dtype, fn, gradient in (
    (tf.float32, model, tf1hess.batch_gradients),
    (tf.float64, equivalent, tf.gradients),
  ):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(dtype, [None, _K])
      (g,) = gradient(fn(x), [x])
      with tf.compat.v1.Session() as sess:
        gradients.append(sess.run(g, {x: x_val}))
    if dtype == tf.float32:
      model_graph = graph
  test.assertAllClose(*gradients, atol=1e-5, rtol=1e-4)
  return model_graph


def _lrn_by_windows(u, radius, bias, alpha, beta):
  """TensorFlow's `LRN` of `u` `(N, H, W, C)`, a window at a time."""
  channels = u.shape[-1]
  sums = [
    tf.reduce_sum(tf.square(u[..., max(0, c - radius) : c + radius + 1]), -1)
    for c in range(channels)
  ]
  return u / tf.pow(bias + alpha * tf.stack(sums, -1), beta)


def _forces_of(model):
  """`sum(sin(grad E))` of the energy `E = sum(model(x))`."""

  def forces(x):
    out = model(x)
    energy = tf.reduce_sum(out, list(range(1, out.shape.rank)))
    return tf.reduce_sum(tf.sin(tf.gradients(energy, x)[0]), 1)

  return forces


class Float32SoftsignGradTest(tf.test.TestCase):
  """TensorFlow has no gradient of `SoftsignGrad`: the engine's adjoint
  pass takes its own, as does the first gradient (`batch_gradients`)."""

  def test_forces_of_softsign(self):
    def model(x, softsign):
      return softsign(_lin2(tf.tanh(_lin(x))))

    forces = _forces_of(lambda x: model(x, tf.nn.softsign))
    equivalent = _forces_of(lambda x: model(x, lambda u: u / (1 + tf.abs(u))))
    _check_float32(self, forces, equivalent, rows=False)
    graph = _check_gradients(self, forces, equivalent)
    self.assertIn("SoftsignGrad", {op.type for op in graph.get_operations()})
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, _K])
      with self.assertRaisesRegex(LookupError, "SoftsignGrad"):
        tf1hess.batch_hessians(forces(x), x, method="while_loop")


class Float32LocalResponseNormalizationTest(
  tf.test.TestCase, parameterized.TestCase
):
  """`tf.nn.local_response_normalization` runs in float32 only, and
  TensorFlow has no gradient of its gradient: no rows."""

  @parameterized.parameters((2, 1.0, 0.3, 0.75), (1, 2.0, 1e-1, 0.5))
  def test_lrn(self, radius, bias, alpha, beta):
    def model(x, lrn):
      images = tf.reshape(tf.sin(_lin(x)), [-1, 1, 2, 6])
      out = lrn(images * 2.0, radius, bias, alpha, beta)
      return tf.reduce_sum(
        tf.tanh(out) * tf.reshape(x, [-1, 1, 2, 6]), [1, 2, 3]
      )

    _check_float32(
      self,
      lambda x: model(x, tf.nn.local_response_normalization),
      lambda x: model(x, _lrn_by_windows),
      rows=False,
    )

  def test_auto_takes_the_engine_where_the_rows_cannot(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, _K])
      y = tf.reduce_sum(
        tf.nn.local_response_normalization(tf.reshape(x, [-1, 2, 1, 6])) ** 2,
        [1, 2, 3],
      )
      with self.assertRaisesRegex(LookupError, "no gradient of LRNGrad"):
        tf1hess.batch_hessians(y, x, method="while_loop")
      self.assertEqual(tf1hess.batch_laplacians(y, x).shape.as_list(), [None])


class Float32ConvolutionTest(tf.test.TestCase, parameterized.TestCase):
  """NCHW and dilations: TensorFlow's CPU kernels run them in float32."""

  @parameterized.named_parameters(
    ("dilations", "NHWC", 2),
    ("nchw_dilations", "NCHW", 2),
  )
  def test_convolution(self, data_format, rate):
    if not _differentiates_dilated_conv2d(data_format):
      self.skipTest(
        "TensorFlow's CPU kernels here (oneDNN off) have no gradient of a "
        f"{data_format} conv2d with dilations, not even the first."
      )

    def model(x, conv):
      h = tf.tanh(_image(_lin(x), (3, 4, 1)))
      h = tf.concat([h, tf.sin(h)], axis=3)  # (N, 3, 4, 2)
      return tf.nn.softplus(conv(h))

    def conv_under_test(h):
      f = _filter(_F, h)
      if data_format == "NHWC":
        return tf.nn.conv2d(h, f, 1, "SAME", dilations=rate)
      out = tf.nn.conv2d(
        tf.transpose(h, [0, 3, 1, 2]),
        f,
        1,
        "SAME",
        data_format="NCHW",
        dilations=rate,
      )
      return tf.transpose(out, [0, 2, 3, 1])

    def equivalent(h):
      return tf.nn.conv2d(h, _filter(_dilate(_F, rate), h), 1, "SAME")

    _check_float32(
      self, lambda x: model(x, conv_under_test), lambda x: model(x, equivalent)
    )


class Float32PoolTest(tf.test.TestCase):
  """AvgPool3D: TensorFlow's CPU kernel runs it in float32 only."""

  def test_avg_pool3d(self):
    def model(x, pool):
      h = tf.tanh(_image(_lin(x), (2, 3, 2, 1)))
      return tf.reduce_sum(tf.square(pool(h)) * h[:, :1, :1, :1], [1, 2, 3, 4])

    def by_convolution(h):
      ones = tf.ones([1, 2, 2, 1, 1], h.dtype) / 4.0
      return tf.nn.conv3d(h, ones, [1, 1, 1, 1, 1], "VALID")

    _check_float32(
      self,
      lambda x: model(x, lambda h: tf.nn.avg_pool3d(h, [1, 2, 2], 1, "VALID")),
      lambda x: model(x, by_convolution),
    )

  def test_gradient_of_avg_pool3d(self):
    # Forces of an energy of pooled volumes: AvgPool3DGrad.
    def model(x, pool):
      volumes = _image(_lin(x), (2, 3, 2, 1))
      energy = tf.reduce_sum(tf.sin(pool(tf.tanh(volumes))), [1, 2, 3, 4])
      return tf.gradients(energy, x)[0]

    def by_convolution(h):
      ones = tf.ones([1, 2, 2, 1, 1], h.dtype) / 4.0
      return tf.nn.conv3d(h, ones, [1, 1, 1, 1, 1], "VALID")

    def pool(h):
      return tf.nn.avg_pool3d(h, [1, 2, 2], 1, "VALID")

    with tf.Graph().as_default() as graph:
      model(tf.compat.v1.placeholder(tf.float32, [None, _K]), pool)
      self.assertIn("AvgPool3DGrad", {op.type for op in graph.get_operations()})
    _check_float32(
      self, lambda x: model(x, pool), lambda x: model(x, by_convolution)
    )


class EmptyBatchMaxPoolTest(tf.test.TestCase, parameterized.TestCase):
  """The maxima a max pool's rule reads at N = 0, where TensorFlow's
  MaxPoolWithArgmax refuses an empty batch. (The rows and the engine's
  adjoint, TensorFlow's MaxPoolGrad, run there only without oneDNN, whose
  kernel aborts the process on an empty batch.)"""

  @parameterized.parameters(
    ("VALID",), ("SAME",), ([[0, 0], [1, 0], [0, 1], [0, 0]],)
  )
  def test_window_maxima_of_an_empty_batch(self, padding):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 4, 5, 2])
      pooled = tf.nn.max_pool2d(x, 2, [2, 1], padding)
      _, index = conv._window_maxima(pooled.op)  # pylint: disable=protected-access
      with tf.compat.v1.Session() as sess:
        for n in (0, 3):
          x_val = _RNG.normal(size=(n, 4, 5, 2)).astype(np.float32)
          got, maxima = sess.run([index, pooled], {x: x_val})
          self.assertEqual(got.shape, maxima.shape)
          if n and isinstance(padding, str):
            # The index of each window's maximum, per sample (explicit
            # paddings count in the padded input).
            flat = x_val.reshape(n, -1)
            picked = np.take_along_axis(flat, got.reshape(n, -1), 1)
            self.assertAllEqual(picked, maxima.reshape(n, -1))


def _max_pool3d_by_slices(h, size, stride, padding):
  """`tf.nn.max_pool3d` of the volumes `h` `(N, 2, 3, 2, 1)` in any dtype:
  the maximum over one strided slice per offset in the window, SAME
  padding as `-inf`."""
  if padding == "SAME":
    totals = [
      max((-(-n // s) - 1) * s + k - n, 0)
      for n, k, s in zip((2, 3, 2), size, stride)
    ]
    pads = [[0, 0]] + [[t // 2, t - t // 2] for t in totals] + [[0, 0]]
    h = tf.pad(h, pads, constant_values=-np.inf)
  n = h.shape[1:4]
  ends = [(n[a] - size[a]) // stride[a] * stride[a] + 1 for a in range(3)]
  slices = [
    h[
      :,
      d : d + ends[0] : stride[0],
      r : r + ends[1] : stride[1],
      c : c + ends[2] : stride[2],
    ]
    for d in range(size[0])
    for r in range(size[1])
    for c in range(size[2])
  ]
  return tf.reduce_max(tf.stack(slices), 0)


class Float32MaxPool3DTest(tf.test.TestCase, parameterized.TestCase):
  """MaxPool3D and its gradient: TensorFlow's CPU kernels run them in
  float32 only, and its gradient of the gradient (MaxPool3DGradGrad) is
  wrong for 1 x 1 x 1 pools and pools of stride 1 with SAME padding."""

  _POOLS = (
    ("same_stride_1", (2, 2, 2), (1, 1, 1), "SAME"),
    ("one_by_one", (1, 1, 1), (1, 1, 1), "VALID"),
    ("valid_strides", (1, 2, 2), (1, 2, 1), "VALID"),
    ("same_strides", (2, 3, 2), (1, 2, 2), "SAME"),
  )

  def _check(self, model, size, stride, padding):
    """`_check_float32` of `model(x, pool)`, TensorFlow's pool against the
    pool by slices in float64, and auto's choice for the rows."""
    _check_float32(
      self,
      lambda x: model(x, lambda h: tf.nn.max_pool3d(h, size, stride, padding)),
      lambda x: model(
        x, lambda h: _max_pool3d_by_slices(h, size, stride, padding)
      ),
      rows=False,
    )

  @parameterized.named_parameters(*_POOLS)
  def test_max_pool3d(self, size, stride, padding):
    def model(x, pool):
      h = tf.tanh(_image(_lin(x), (2, 3, 2, 1)))
      return tf.reduce_sum(tf.square(pool(h)) * h[:, :1, :1, :1], [1, 2, 3, 4])

    self._check(model, size, stride, padding)

  @parameterized.named_parameters(*_POOLS)
  def test_gradient_of_max_pool3d(self, size, stride, padding):
    # Forces of an energy of pooled volumes: MaxPool3DGrad.
    def model(x, pool):
      volumes = _image(_lin(x), (2, 3, 2, 1))
      energy = tf.reduce_sum(tf.sin(pool(tf.tanh(volumes))), [1, 2, 3, 4])
      return tf.reduce_sum(tf.sin(tf.gradients(energy, x)[0]), 1)

    with tf.Graph().as_default() as graph:
      model(
        tf.compat.v1.placeholder(tf.float32, [None, _K]),
        lambda h: tf.nn.max_pool3d(h, size, stride, padding),
      )
      self.assertIn("MaxPool3DGrad", {op.type for op in graph.get_operations()})
    self._check(model, size, stride, padding)


class Float32ResizeTest(tf.test.TestCase, parameterized.TestCase):
  """Resizes whose CPU kernels return float32 whatever their input."""

  # TensorFlow has no second derivative of ResizeBicubic, and takes
  # ResizeBilinear's as 0: the rows are not a reference, auto takes the
  # engine.
  @parameterized.parameters(
    ("bilinear", "ResizeBilinear"),
    ("bicubic", "ResizeBicubic"),
  )
  def test_resize(self, method, op_type):
    size = [3, 5]
    # The resize as a matrix (output pixels, input pixels), from the op
    # itself on the images of single pixels: a float64 equivalent.
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      pixels = np.eye(6, dtype=np.float32).reshape(6, 2, 3, 1)
      resized = tf.image.resize(pixels, size, method)
      self.assertIn(op_type, {op.type for op in resized.graph.get_operations()})
      matrix = sess.run(resized).reshape(6, -1).T

    def model(x, resize):
      h = tf.tanh(_image(_lin(x)))  # (N, 2, 3, 2)
      return tf.reduce_sum(
        tf.sin(tf.cast(resize(h), h.dtype)) * tf.cast(h[:, :1, :1], h.dtype),
        axis=[1, 2, 3],
      )

    def by_matrix(h):
      flat = tf.reshape(tf.transpose(h, [0, 3, 1, 2]), [-1, 2, 6])
      out = tf.einsum("nci,oi->nco", flat, tf.constant(matrix, h.dtype))
      return tf.transpose(tf.reshape(out, [-1, 2, *size]), [0, 2, 3, 1])

    _check_float32(
      self,
      lambda x: model(x, lambda h: tf.image.resize(h, size, method)),
      lambda x: model(x, by_matrix),
      rows=False,
    )

  # TensorFlow has no gradient of the resizes' gradients (and declares
  # the bilinear one's not differentiable): the engine's adjoint pass takes
  # its own, and so does the first gradient of a model with them
  # (`batch_gradients`).
  @parameterized.parameters(
    ("bilinear", "ResizeBilinearGrad"),
    ("bicubic", "ResizeBicubicGrad"),
    ("nearest", "ResizeNearestNeighborGrad"),
  )
  def test_gradient_of_resize(self, method, op_type):
    size = [3, 5]
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      pixels = np.eye(6, dtype=np.float32).reshape(6, 2, 3, 1)
      matrix = sess.run(tf.image.resize(pixels, size, method))
      matrix = matrix.reshape(6, -1).T

    def model(x, resize):
      h = tf.tanh(_image(_lin(x)))  # (N, 2, 3, 2)
      energy = tf.reduce_sum(tf.sin(tf.cast(resize(h), h.dtype)), [1, 2, 3])
      return tf.reduce_sum(tf.sin(tf.gradients(energy, x)[0]), 1)

    def by_matrix(h):
      flat = tf.reshape(tf.transpose(h, [0, 3, 1, 2]), [-1, 2, 6])
      out = tf.einsum("nci,oi->nco", flat, tf.constant(matrix, h.dtype))
      return tf.transpose(tf.reshape(out, [-1, 2, *size]), [0, 2, 3, 1])

    def resized(x):
      return model(x, lambda h: tf.image.resize(h, size, method))

    _check_float32(self, resized, lambda x: model(x, by_matrix), rows=False)
    graph = _check_gradients(self, resized, lambda x: model(x, by_matrix))
    self.assertIn(op_type, {op.type for op in graph.get_operations()})
    # With a static batch, the original image's static batch (N) is not
    # that of the tangents (N K): the same numbers as without.
    x_val = _RNG.normal(size=(3, _K))
    values = []
    for batch in (None, 3):
      with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [batch, _K])
        h = tf1hess.batch_hessians(resized(x), x, method="forward")
        with tf.compat.v1.Session() as sess:
          values.append(sess.run(h, {x: x_val}))
    self.assertAllClose(values[1], values[0])


class Float32BatchNormTest(tf.test.TestCase, parameterized.TestCase):
  """FusedBatchNorm: TensorFlow's CPU kernels run it in float32."""

  slow_cases = (
    "test_inference0",
    "test_inference1",
    "test_inference2",
  )

  @parameterized.parameters(
    ("NHWC", "FusedBatchNormV3"),
    ("NCHW", "FusedBatchNormV3"),
    ("NHWC", "FusedBatchNormV2"),
    ("NHWC", "FusedBatchNorm"),
  )
  def test_inference(self, data_format, op_type):
    scale, offset = _RNG.normal(size=(2, 2)) + 1.0
    mean, variance = _RNG.normal(size=2), _RNG.uniform(0.5, 2.0, size=2)

    def model(x, norm):
      h = tf.tanh(_image(_lin(x), (3, 4, 1)))
      h = tf.concat([h, tf.sin(h)], axis=3)  # (N, 3, 4, 2)
      return tf.nn.softplus(tf.nn.conv2d(norm(h), _filter(_F, h), 1, "SAME"))

    def under_test(h):
      def c(v):
        return tf.constant(v, tf.float32)

      if data_format == "NCHW":
        h = tf.transpose(h, [0, 3, 1, 2])
      out = getattr(tf.raw_ops, op_type)(
        x=h,
        scale=c(scale),
        offset=c(offset),
        mean=c(mean),
        variance=c(variance),
        epsilon=1e-3,
        data_format=data_format,
        is_training=False,
      )[0]
      return out if data_format == "NHWC" else tf.transpose(out, [0, 2, 3, 1])

    def equivalent(h):
      return (h - mean) * scale / np.sqrt(variance + 1e-3) + offset

    _check_float32(
      self, lambda x: model(x, under_test), lambda x: model(x, equivalent)
    )
    # Forces of an energy of the normalized model: TensorFlow's gradient of
    # the normalization for inference.
    with tf.Graph().as_default() as graph:
      forces = _forces_of(lambda x: model(x, under_test))
      forces(tf.compat.v1.placeholder(tf.float32, [None, _K]))
      types = {op.type for op in graph.get_operations()}
    self.assertIn(op_type.replace("Norm", "NormGrad"), types)
    _check_float32(self, forces, _forces_of(lambda x: model(x, equivalent)))

  def test_training_declines(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, _K])
      ones = tf.ones([1])
      out, _, _ = tf.compat.v1.nn.fused_batch_norm(
        _image(x, (3, 4, 1)), ones, ones * 0.0, is_training=True
      )
      with self.assertRaisesRegex(
        ValueError, "FusedBatchNorm.* statistics of the batch"
      ):
        tf1hess.batch_hessians(tf.sin(out), x, method="forward")


class Float32LayerNormTest(tf.test.TestCase, parameterized.TestCase):
  """Layer normalization as Keras 2 runs it in float32.

  A fused batch normalization in training mode of the features reshaped to
  `(1, rows, M, 1)`, the rows as channels (no float64 CPU kernel).
  """

  _GAMMA = _RNG.normal(size=(3, 4)) + 1.0
  _BETA = _RNG.normal(size=(3, 4))

  def _model(self, normalize):
    def model(x):
      h = tf.reshape(tf.tanh(_lin(x)) + x, [-1, 3, 4])
      h = normalize(h)
      return tf.reshape(tf.nn.softplus(h) * tf.sin(h), [-1, _K])

    return model

  def _by_hand(self, axes, gamma, beta):
    def normalize(h):
      c = h - tf.reduce_mean(h, axes, keepdims=True)
      v = tf.reduce_mean(tf.square(c), axes, keepdims=True)
      return c * tf.math.rsqrt(v + 0.01) * gamma + beta

    return normalize

  def _fused(self, axes, gamma, beta):
    def fused(h):
      # tf_keras/src/layers/normalization/layer_normalization.py, fused.
      shape = tf.shape(h)
      pre = tf.reduce_prod(shape[: axes[0]])
      inner = tf.reduce_prod(shape[axes[0] :])
      squeezed = tf.reshape(h, tf.stack([1, pre, inner, 1]))
      out, _, _ = tf.compat.v1.nn.fused_batch_norm(
        squeezed,
        tf.ones(tf.reshape(pre, [1])),
        tf.zeros(tf.reshape(pre, [1])),
        epsilon=0.01,
        data_format="NCHW",
      )
      return tf.reshape(out, shape) * gamma.astype(np.float32) + beta.astype(
        np.float32
      )

    return fused

  def _parameters(self, axes):
    return [v[0] if axes == [2] else v for v in (self._GAMMA, self._BETA)]

  @parameterized.named_parameters(("last_axis", [2]), ("two_axes", [1, 2]))
  def test_fused_as_keras_builds_it(self, axes):
    gamma, beta = self._parameters(axes)
    _check_float32(
      self,
      self._model(self._fused(axes, gamma, beta)),
      self._model(self._by_hand(axes, gamma, beta)),
    )

  @parameterized.named_parameters(("last_axis", [2]), ("two_axes", [1, 2]))
  def test_forces(self, axes):
    # TensorFlow's gradient of the normalization (FusedBatchNormGradV3 in
    # training) inside `ys`: over the last axis, 3 rows per sample. Its
    # own gradient of it stops the mean: the rows miss curvature, and auto
    # takes the engine.
    gamma, beta = self._parameters(axes)
    _check_float32(
      self,
      _forces_of(self._model(self._fused(axes, gamma, beta))),
      _forces_of(self._model(self._by_hand(axes, gamma, beta))),
      rows=False,
    )

  def test_keras_layer(self):
    keras = testing_utils.legacy_keras(self)
    gamma, beta = self._GAMMA[0], self._BETA[0]
    constant = keras.initializers.Constant

    def layer(h):
      norm = keras.layers.LayerNormalization(
        epsilon=0.01,
        gamma_initializer=constant(gamma),
        beta_initializer=constant(beta),
      )
      out = norm(h)
      self.assertIn(
        "FusedBatchNormV3", {op.type for op in h.graph.get_operations()}
      )
      return out

    _check_float32(
      self, self._model(layer), self._model(self._by_hand([2], gamma, beta))
    )

  def test_forces_of_the_keras_layer(self):
    keras = testing_utils.legacy_keras(self)
    gamma = self._GAMMA.reshape(-1)
    constant = keras.initializers.Constant

    def model(x, normalize):
      h = normalize(tf.tanh(_lin(x)) + x)
      return tf.nn.softplus(h) * tf.sin(h)

    def layer(h):
      return keras.layers.LayerNormalization(
        epsilon=0.01, gamma_initializer=constant(gamma)
      )(h)

    _check_float32(
      self,
      _forces_of(lambda x: model(x, layer)),
      _forces_of(lambda x: model(x, self._by_hand([1], gamma, 0.0))),
      rows=False,
    )

  def test_batch_statistics_are_not_followed(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, _K])
      ones = tf.ones(tf.shape(x)[:1])
      _, mean, _ = tf.compat.v1.nn.fused_batch_norm(
        tf.reshape(x, [1, -1, _K, 1]), ones, ones * 0.0, data_format="NCHW"
      )
      with self.assertRaisesRegex(ValueError, "reads the batch statistics"):
        tf1hess.batch_hessians(tf.sin(mean), x, method="forward")


class DeclineTest(tf.test.TestCase, parameterized.TestCase):
  """What the rules do not follow: `method="forward"` says why."""

  def test_eigenvalues_of_x(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.reduce_sum(tf.linalg.eigvalsh(_gram(_matrices(x))) ** 2, 1)
      _assert_declined(
        self, x, y, "no forward rule for op type SelfAdjointEigV2"
      )

  def test_gradient_of_a_product_by_a_tensor_not_of_x(self):
    # The shape of `z`, N unknown, may broadcast against x's samples.
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      z = tf.compat.v1.placeholder_with_default(
        tf.ones([3, _K], tf.float64), [None, _K]
      )
      energy = tf.reduce_sum(tf.sin(tf.tanh(_lin(x)) * z), 1)
      y = tf.reduce_sum(tf.gradients(energy, x)[0] ** 2, 1)
      _assert_declined(self, x, y, "Sum .* has an axis known only at run time")

  def test_filter_of_x(self):
    with tf.Graph().as_default():
      # A batch of 3 static: the filter (3, 3, 2, 2) is a reshape of x.
      x = tf.compat.v1.placeholder(tf.float64, [3, _K])
      y = tf.sin(
        tf.nn.conv2d(_image(x), tf.reshape(x, [3, 3, 2, 2]), 1, "SAME")
      )
      with self.assertRaisesRegex(
        ValueError, "Conv2D .* has a filter that depends on x"
      ):
        tf1hess.batch_hessians(y, x, method="forward")
      mixed = tf.reshape(tf.tile(x[:1], [1, 3]), [3, 3, 2, 2])
      y = tf.sin(tf.nn.conv2d(_image(x), mixed, 1, "SAME"))
      with self.assertRaisesRegex(
        ValueError, "Conv2D .* nonlinear in a tensor that mixes samples"
      ):
        tf1hess.batch_hessians(y, x, method="forward")

  @parameterized.named_parameters(
    (
      "depthwise_nchw",
      lambda x: tf.nn.depthwise_conv2d(
        _image(x), _filter(_FD, x), [1, 1, 1, 1], "SAME", data_format="NCHW"
      ),
      "DepthwiseConv2dNative .* data format NCHW; the forward rule follows "
      "NHWC only",
    ),
    (
      "depthwise_dilations",
      lambda x: tf.raw_ops.DepthwiseConv2dNative(
        input=_image(x),
        filter=_filter(_FD, x),
        strides=[1, 1, 1, 1],
        padding="SAME",
        dilations=[1, 2, 2, 1],
      ),
      "has dilations .* dilations of 1 only",
    ),
    (
      "max_pool_nchw",
      lambda x: tf.nn.max_pool2d(_image(x), 2, 1, "SAME", data_format="NCHW"),
      "MaxPool .* data format NCHW",
    ),
    (
      "space_to_batch_without_its_batch_to_space",
      lambda x: tf.tanh(
        tf.space_to_batch_nd(_image(x), [2, 1], [[0, 0], [0, 1]])
      ),
      "Tanh .* nonlinear in a tensor that mixes samples",
    ),
    (
      "cumulative_logsumexp_exclusive",
      lambda x: tf.math.cumulative_logsumexp(x, axis=1, exclusive=True),
      "CumulativeLogsumexp .* is exclusive",
    ),
    (
      "cumulative_logsumexp_over_the_batch",
      lambda x: tf.math.cumulative_logsumexp(x, axis=0),
      "CumulativeLogsumexp .* runs along the batch axis",
    ),
    (
      "polygamma_of_an_order_of_x",
      lambda x: tf.math.polygamma(tf.round(x) * 0 + x, x),
      "Polygamma .* has a first input \\(its order\\) that depends on x",
    ),
    (
      "prod_over_the_batch",
      lambda x: tf.reduce_prod(x, axis=0),
      "Prod .* multiplies entries over the batch axis",
    ),
    (
      "rows_of_parts_into_a_convolution",
      lambda x: tf.nn.conv2d(
        tf.reshape(tf.tanh(x), [-1, 2, 3, 1]),
        _filter(_F[..., :1, :], x),
        1,
        "SAME",
      ),
      "Conv2D .* rows are parts of samples .* only ops that work row by row",
    ),
    (
      "rows_of_parts_with_samples",
      # Shapes that TensorFlow checks only at run time: 2 N rows and N.
      lambda x: tf.reshape(tf.reshape(tf.sin(x), [-1, 6]) * x[:, :1], [-1, _K]),
      "combines tensors whose rows are samples with tensors whose rows are "
      "parts of samples",
    ),
  )
  def test_declines(self, model, message):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = tf.sin(model(x))
      with self.assertRaisesRegex(ValueError, message):
        tf1hess.batch_hessians(y, x, method="forward")


if __name__ == "__main__":
  tf.test.main()
