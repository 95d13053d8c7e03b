"""Forward rules of convolutions and pooling over images `(N, H, W, C)`
and volumes `(N, D, H, W, C)`.

A convolution by weights and an average pool are linear in their input and
map a batch sample by sample: the Jacobian of the output is the same op
(same attrs: strides, dilations, padding) applied to the K tangents folded
into the batch axis (`jacobians.apply_per_sample`), a shared Jacobian `(K,
H, W, C)` as a batch of K images. They add no curvature.

A max pool is piecewise linear: each output entry is one input entry of its
window, and its tangent is that entry's tangent. The rule finds the entry
with `tf.nn.max_pool_with_argmax` (of volumes, which it does not take: the
first maximum among strided slices, one per offset in the window) and
gathers the tangents there: exact, and the cost of one pool of the N
inputs plus a gather. Ties (a measure-zero
set, but common after a `relu`, where they carry equal zero tangents) take
the first maximal entry of the window in row-major order, as TensorFlow's
`MaxPoolGrad` and `MaxPoolGradGrad` do on CPU: the engine and the row loop
agree there. No curvature either.

TensorFlow's gradients of pools (in models with gradients inside `ys`)
are linear in the incoming gradient: `AvgPoolGrad` is the same op on the
tangents, `MaxPoolGrad` too, its pool's input and output repeated for the
tangents of each sample (and their 3-D twins); the adjoint pass takes the
gradient of `MaxPoolGrad` from the maxima found as above, not from
TensorFlow's `MaxPoolGradGrad`, which is wrong for some pools. Its
gradients of a depthwise convolution, of batch normalization for
inference and of resizes are linear too; it has no gradient of the
resizes' (the adjoint pass has its own).

A dilated convolution that `tf.nn.convolution` (and the `dilation_rate` of
layers) builds as SpaceToBatchND, a convolution and BatchToSpaceND is
followed block and all: inside the block, row `b N + n` of the batch is
block position `b` of sample `n`, and its dense Jacobian has `B N` rows;
the rules check that only such a block's linear ops lie between the two
(otherwise SpaceToBatchND mixes samples).

A transposed convolution (`Conv2DBackpropInput`, `tf.nn.conv2d_transpose`;
`Conv3DBackpropInputV2`, `tf.nn.conv3d_transpose`) of an image by weights,
and resizes (`tf.image.resize`, Keras `UpSampling2D`), are linear too: the
same op on the tangents.

Batch normalization for inference (`FusedBatchNorm*` with `is_training`
false) scales each channel by weights: linear too, in any data format.

Data formats: `Conv2D` follows NHWC and NCHW (TensorFlow's CPU kernels run
NCHW in float32); `Conv3D`, `AvgPool3D`, `MaxPool3D`,
`DepthwiseConv2dNative`, `AvgPool` and `MaxPool` follow NHWC (NDHWC) only
(their CPU kernels refuse the other format, so the rules could not be
tested there), and `DepthwiseConv2dNative` dilations of 1 only (same
reason).
"""

import itertools
import numpy as np
import tensorflow as tf

from tf1hess import _core
from tf1hess.forward import composite
from tf1hess.forward import jacobians
from tf1hess.forward import registry


def _attrs(op, *names):
  """The attrs `names` of `op`, to build the same op on the tangents."""
  out = {}
  for name in names:
    value = op.get_attr(name)
    out[name] = value.decode() if isinstance(value, bytes) else value
  return out


def _check_format(op, attrs, formats):
  if attrs["data_format"] not in formats:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has data format {attrs['data_format']}; the "
      f"forward rule follows {' and '.join(formats)} only"
    )


def _of_weights(op, jacs):
  """Whether only the first input (the image) depends on x: then linear."""
  return all(j is None for j in jacs[1:])


def _of_filter_sizes(op, jacs):
  """A transposed convolution of the image (input 2) alone is linear."""
  return jacs[0] is None and jacs[1] is None


# The data formats each convolution's rule follows: those TensorFlow's CPU
# kernels run.
_FORMATS = {
  "Conv2D": ("NHWC", "NCHW"),
  "Conv2DBackpropInput": ("NHWC", "NCHW"),
  "DepthwiseConv2dNative": ("NHWC",),
  "DepthwiseConv2dNativeBackpropInput": ("NHWC",),
  "Conv3D": ("NDHWC",),
  "Conv3DBackpropInputV2": ("NDHWC",),
}


def _convolution(op, jacs, ctx, image):
  """Rule of a convolution of input `image` by a filter (input 1).

  The tangents go through the op itself (its `tf.raw_ops` twin, with its
  attrs: strides, padding, dilations, ...). A transposed convolution
  (`image` 2) has the sizes of its output as input 0: their batch is the
  tangents', K or N K.
  """
  j, jf = jacs[image], jacs[1]
  if jf is not None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has a filter that depends on x: the forward "
      "rule follows convolutions of x by weights only"
    )
  if j is None:
    return [None]
  _check_format(op, _attrs(op, "data_format"), _FORMATS[op.type])
  if not j.shared:
    ctx.dense_matmul()  # A convolution of N K images: costs as a matmul.
  names = [arg.name for arg in op.op_def.input_arg]

  def on_tangents(m):
    args = {names[1]: tf.cast(op.inputs[1], m.dtype), names[image]: m}
    if image == 2:
      args[names[0]] = _sizes_of(m, op.inputs[0])
    return registry.twin(op, **args)

  return [jacobians.apply_per_sample(j, on_tangents)]


def _sizes_of(m, sizes):
  """The sizes `sizes` of an op's output, for a batch of tangents `m`."""
  batch = tf.cast(tf.shape(m)[:1], sizes.dtype)
  return tf.concat([batch, sizes[1:]], axis=0)


@registry.register("Conv2D", "Conv3D", linear=_of_weights)
def _conv(op, jacs, ctx):
  return _convolution(op, jacs, ctx, image=0)


@registry.register("DepthwiseConv2dNative", linear=_of_weights)
def _depthwise_conv2d(op, jacs, ctx):
  if any(d != 1 for d in op.get_attr("dilations")):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has dilations {op.get_attr('dilations')}; the "
      "forward rule follows dilations of 1 only (TensorFlow's CPU kernel "
      "runs no other)"
    )
  return _convolution(op, jacs, ctx, image=0)


@registry.register(
  "Conv2DBackpropInput",
  "Conv3DBackpropInputV2",
  "DepthwiseConv2dNativeBackpropInput",
  linear=_of_filter_sizes,
)
def _conv_transpose(op, jacs, ctx):
  """`tf.nn.conv2d_transpose`, `tf.nn.conv3d_transpose`, TensorFlow's
  gradient of a depthwise convolution: linear in their image (input 2) by
  a filter."""
  return _convolution(op, jacs, ctx, image=2)


# Resizes of images (`tf.image.resize`, Keras `UpSampling2D`): linear, each
# output pixel a fixed combination of the sample's input pixels. TensorFlow
# has no second derivative of the nearest and bicubic ones, and takes the
# bilinear one's as 0 (`dispatch._INEXACT_SECOND_DERIVATIVES`).
_RESIZES = ("ResizeNearestNeighbor", "ResizeBilinear", "ResizeBicubic")
# Rearrangements of each image's pixels and channels: `tf.nn.depth_to_space`
# (sub-pixel upsampling), `tf.nn.space_to_depth`, and the patches of
# `tf.image.extract_patches`, each a fixed selection of the sample's entries.
_REARRANGEMENTS = ("DepthToSpace", "SpaceToDepth", "ExtractImagePatches")


@registry.register(*_RESIZES, *_REARRANGEMENTS, linear=True)
@registry.of_first_input
def _resize_or_rearrange(op, j, ctx):
  return [registry.on_tangents(op, j)]


# TensorFlow's gradients of resizes (of a model's gradient inside `ys`):
# linear in the incoming gradient (input 0); the original image (input 1
# of the bilinear and bicubic ones) gives only its size.
_RESIZE_GRADIENTS = tuple(f"{resize}Grad" for resize in _RESIZES)


@registry.register(*_RESIZE_GRADIENTS, linear=True)
def _resize_gradient(op, jacs, ctx):
  """The same op on the tangents (those of the original image add
  nothing)."""
  del ctx  # Unused.
  if jacs[0] is None:
    return [None]
  grads, out = op.inputs[0], op.outputs[0]
  inputs = {}
  if "original_image" in [arg.name for arg in op.op_def.input_arg]:
    # Only its height and width are read. Its batch is the samples', not
    # the tangents' rows: a static one would give the twin a wrong static
    # shape (the kernel takes the batch of `grads`).
    original = op.inputs[1]
    shape = [None, *original.shape[1:]] if original.shape.rank else None
    inputs["original_image"] = tf.compat.v1.placeholder_with_default(
      original, shape
    )

  def on_tangents(m):
    # The bilinear and bicubic ones read float32 only, and write the
    # original image's dtype.
    grads_m = tf.cast(m, grads.dtype)
    return tf.cast(registry.twin(op, grads=grads_m, **inputs), out.dtype)

  return [jacobians.apply_per_sample(jacs[0], on_tangents)]


@registry.adjoint(*_RESIZE_GRADIENTS)
def _resize_gradient_adjoint(op, path):
  """The adjoint of the incoming gradient of a resize's gradient: the
  resize itself, to the incoming gradient's size, of its output's adjoint.
  TensorFlow has no gradient of these ops (and declares the bilinear one's
  not differentiable)."""
  del path  # Unused.
  resize = getattr(tf.raw_ops, op.type[: -len("Grad")])

  def vjp(adj):
    grads = op.inputs[0]
    resized = resize(
      images=adj,
      size=tf.shape(grads)[1:3],
      align_corners=op.get_attr("align_corners"),
      half_pixel_centers=op.get_attr("half_pixel_centers"),
    )
    return [(grads, tf.cast(resized, grads.dtype))]

  return vjp


def _normalizes_per_sample(op, jacs):
  """Batch normalization for inference is linear in its input."""
  return _of_weights(op, jacs) and not op.get_attr("is_training")


_FUSED_BATCH_NORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


@registry.register(*_FUSED_BATCH_NORMS, linear=_normalizes_per_sample)
def _fused_batch_norm(op, jacs, ctx):
  """`(v - mean) scale / sqrt(variance + epsilon) + offset` per channel.

  With `is_training=False` (inference: Keras `BatchNormalization` and
  `tf.compat.v1.layers.batch_normalization` outside training) the
  statistics are inputs, and the output is `v` scaled per channel; in
  training they are the batch's, and samples mix.
  """
  if any(j is not None for j in jacs[1:]):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has a scale, offset, mean or variance that "
      "depends on x"
    )
  if op.get_attr("is_training"):
    if ctx.lead_one and op.get_attr("data_format").decode() == "NCHW":
      return _normalize_rows(op, jacs[0], ctx)
    raise registry.Unsupported(
      f"{op.type} ({op.name}) normalizes with the statistics of the batch "
      "(is_training): samples mix"
    )
  outs = [None] * len(op.outputs)
  if jacs[0] is None:
    return outs
  scale, _, _, variance = op.inputs[1:5]
  factor = scale * tf.math.rsqrt(variance + op.get_attr("epsilon"))
  if op.get_attr("data_format").decode().startswith("NC"):
    rank = registry.static_rank(op.inputs[0], op)
    factor = tf.reshape(factor, [-1] + [1] * (rank - 2))
  outs[0] = jacobians.scale(jacs[0], factor)
  return outs


def _backprop_per_sample(op, jacs):
  """TensorFlow's gradient of batch normalization for inference is linear
  in the incoming gradient."""
  return all(j is None for j in jacs[2:]) and not op.get_attr("is_training")


@registry.register(*_core.TAPED_GRADIENTS, linear=_backprop_per_sample)
def _fused_batch_norm_grad(op, jacs, ctx):
  """TensorFlow's gradient of `_fused_batch_norm` (of a model's gradient
  inside `ys`): for inference, the incoming gradient (input 0) scaled per
  channel by `scale / sqrt(variance + epsilon)` (the variance, input 4,
  being the one the normalization read), whatever its input (input 1).
  In training, that of a layer normalization's rows (`_normalize_rows`):
  `_normalize_rows_grad`. The gradients of the scale and offset are sums
  over the batch."""
  if op.get_attr("is_training") and ctx.lead_one:
    return _normalize_rows_grad(op, jacs, ctx)
  if op.get_attr("is_training") or any(j is not None for j in jacs[2:]):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) is the gradient of a batch normalization in "
      "training, or of one whose scale or statistics depend on x: samples "
      "mix"
    )
  outs = [None] * len(op.outputs)
  if jacs[0] is None and jacs[1] is None:
    return outs
  sums = registry.Unfollowed(
    f"the gradients of the scale and offset of {op.name}, sums over the batch"
  )
  outs[1:3] = [sums, sums]
  if jacs[0] is not None:
    # TensorFlow's gradient transposes NCHW to NHWC for inference.
    _check_format(op, _attrs(op, "data_format"), ("NHWC", "NDHWC"))
    scale, variance = op.inputs[2], op.inputs[4]
    factor = scale * tf.math.rsqrt(variance + op.get_attr("epsilon"))
    outs[0] = jacobians.scale(jacs[0], factor)
  return outs


def _rows_backprop(dy, u, scale, epsilon):
  """TensorFlow's gradient of a batch normalization in training, of rows
  `u` `(rows, H, W)` each normalized over its entries, for the incoming
  gradient `dy`: `scale s (dy - mean(dy) - c s^2 mean(dy c))`, `c = u -
  mean(u)`, `s = (mean(c^2) + epsilon)^(-1/2)`."""
  axes = [1, 2]
  c = u - tf.reduce_mean(u, axes, keepdims=True)
  s = tf.math.rsqrt(tf.reduce_mean(tf.square(c), axes, keepdims=True) + epsilon)
  projected = tf.reduce_mean(dy * c, axes, keepdims=True)
  centered = dy - tf.reduce_mean(dy, axes, keepdims=True)
  return (
    tf.reshape(scale, [-1, 1, 1]) * s * (centered - c * (s * s) * projected)
  )


def _normalize_rows_grad(op, jacs, ctx):
  """TensorFlow's gradient of `_normalize_rows` (of a layer normalization
  inside `ys`): `_rows_backprop` of the incoming gradient (input 0) and
  the normalized tensor (input 1), walked as a composition of their rows
  (G per sample). The batch statistics it reads (inputs 3 on) are those
  of its input, recomputed."""
  u = op.inputs[1]
  statistics = [t.op for t in op.inputs[3:5]]
  if (
    op.get_attr("data_format").decode() != "NCHW"
    or jacs[2] is not None
    or any(s.type not in _FUSED_BATCH_NORMS for s in statistics)
    or any(s.inputs[0].ref() != u.ref() for s in statistics)
  ):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) is the gradient of a batch normalization in "
      "training other than that of a layer normalization: samples mix"
    )
  sums = registry.Unfollowed(
    f"the gradients of the scale and offset of {op.name}, sums over the batch"
  )
  outs = [None, sums, sums] + [None] * (len(op.outputs) - 3)
  if jacs[0] is None and jacs[1] is None:
    return outs
  rows = [tf.squeeze(t, [0]) for t in op.inputs[:2]]
  (j,) = composite.walk(
    op,
    jacs[:2],
    ctx,
    lambda dy, v: _rows_backprop(dy, v, op.inputs[2], op.get_attr("epsilon")),
    inputs=rows,
  )
  if j is not None:
    outs[0] = registry.Regrouped(
      jacobians.dense(jacobians.to_dense(j, ctx.n)), ctx.group, lead_one=True
    )
  return outs


def _normalize_rows(op, j, ctx):
  """Layer normalization: each channel of `(1, rows, H, W)` over its entries.

  Keras `LayerNormalization` in float32 reshapes the samples' rows to the
  channels of a batch of one and normalizes them in training mode (see
  `structural._for_layer_norm`): `y = scale (u - mean) s + offset` per row,
  `s = (v + epsilon)^(-1/2)`, `v` the mean of `(u - mean)^2` over the
  row's M entries. Its curvature is that of the product `c s`, of `s(v)`
  and of `v(c)`, `c = u - mean` being linear in `u`.
  """
  u, y = op.inputs[0][0], op.outputs[0]  # u: (rows, H, W)
  gamma = tf.reshape(tf.cast(op.inputs[1], u.dtype), [-1, 1, 1])
  epsilon = op.get_attr("epsilon")
  axes = [1, 2]
  size = tf.cast(tf.reduce_prod(tf.shape(u)[1:]), u.dtype)
  c = u - tf.reduce_mean(u, axes, keepdims=True)
  v = tf.reduce_mean(tf.square(c), axes, keepdims=True)
  s = tf.math.rsqrt(v + epsilon)
  ds = -0.5 * s * s * s  # s'(v)
  d2s = 0.75 * tf.pow(s, 5)  # s''(v)
  value = j.value  # (rows, K, H, W)
  jc = value - tf.reduce_mean(value, [2, 3], keepdims=True)
  jv = 2.0 * tf.reduce_mean(tf.expand_dims(c, 1) * jc, [2, 3], keepdims=True)
  js = tf.expand_dims(ds, 1) * jv  # (rows, K, 1, 1)
  jy = tf.expand_dims(gamma, 1) * (
    tf.expand_dims(s, 1) * jc + tf.expand_dims(c, 1) * js
  )
  jc, jv = jacobians.dense(jc), jacobians.dense(jv)
  js_wide = jacobians.dense(tf.broadcast_to(js, tf.shape(jc.value)))

  def terms(adj):
    a = adj[0] * gamma  # The adjoint of (u - mean) s.
    adj_s = tf.reduce_sum(a * c, axes, keepdims=True)
    return [
      jacobians.Term(a, jc, js_wide, symmetric=True),
      jacobians.Term(adj_s * d2s, jv),
      jacobians.Term(adj_s * ds * 2.0 / size, jc),
    ]

  ctx.curvature(y, terms)
  # TensorFlow's gradient reads them; its rule recomputes them from `u`.
  statistics = registry.Unfollowed(
    f"the batch statistics of {op.name}", readers=_core.TAPED_GRADIENTS
  )
  return [jacobians.dense(jy)] + [statistics] * (len(op.outputs) - 1)


_POOL_ATTRS = ("ksize", "strides", "padding", "data_format")


@registry.register("AvgPool", "AvgPool3D", linear=True)
def _avg_pool(op, jacs, ctx):
  j = jacs[0]
  if j is None:
    return [None]
  _check_format(op, _attrs(op, "data_format"), ("NHWC", "NDHWC"))
  return [registry.on_tangents(op, j)]


@registry.register("AvgPoolGrad", "AvgPool3DGrad", linear=True)
def _avg_pool_grad(op, jacs, ctx):
  """The gradient of an average pool (of a model's gradient inside `ys`):
  linear in the incoming gradient (input 1); the same op on the tangents."""
  del ctx  # Unused.
  j = jacs[1]
  if j is None:
    return [None]
  _check_format(op, _attrs(op, "data_format"), ("NHWC", "NDHWC"))

  def on_tangents(m):
    return registry.twin(
      op, orig_input_shape=_sizes_of(m, op.inputs[0]), grad=m
    )

  return [jacobians.apply_per_sample(j, on_tangents)]


@registry.register("MaxPoolGrad", "MaxPool3DGrad")
def _max_pool_grad(op, jacs, ctx):
  """The gradient of a max pool (of a model's gradient inside `ys`): each
  entry of the incoming gradient (input 2) goes to the maximal entry of
  its window of the pool's input (input 0). Linear in the incoming
  gradient, by a choice of entries that is constant where the maxima are
  distinct: no curvature, and the tangents of the pool's input and output
  add nothing. The same op on the tangents, each sample's input and
  output repeated for its K tangents, so that ties go where the op sends
  them.
  """
  j = jacs[2]
  if j is None:
    return [None]
  _check_format(op, _attrs(op, "data_format"), ("NHWC", "NDHWC"))
  u, pooled = op.inputs[:2]

  def on_tangents(m):
    out = registry.twin(
      op,
      orig_input=tf.repeat(u, ctx.k, axis=0),
      orig_output=tf.repeat(pooled, ctx.k, axis=0),
      grad=tf.cast(m, u.dtype),
    )
    return tf.cast(out, m.dtype)

  dense = jacobians.dense(jacobians.to_dense(j, ctx.n))
  return [jacobians.apply_per_sample(dense, on_tangents)]


def _gather_entries(jac, index):
  """`J[n, k, index[n, p]]` over the flat entries: a dense Jacobian.

  Args:
    jac: a shared or dense `Jacobian` of a tensor `(N, *e)`.
    index: `(N, *e')` int64 flat indices into the entries `*e` of each
      sample.

  Returns:
    The dense `Jacobian` `(N, K, *e')` of `v[n, *e'] = u[n, index[n, *e']]`.
  """
  n = tf.shape(index)[0]
  picked = tf.shape(index)[1:]
  index = tf.reshape(index, tf.stack([n, tf.reduce_prod(picked)]))
  lead = tf.shape(jac.value)[: 1 if jac.shared else 2]
  flat = tf.reshape(
    jac.value,
    tf.concat([lead, [tf.reduce_prod(jac.entry_shape())]], axis=0),
  )
  if jac.shared:
    value = tf.transpose(tf.gather(flat, index, axis=1), [1, 0, 2])
  else:
    value = tf.gather(flat, index, axis=2, batch_dims=1)
  k = tf.shape(jac.value)[0 if jac.shared else 1]
  return jacobians.dense(tf.reshape(value, tf.concat([[n, k], picked], axis=0)))


def _volume_maxima(u, ksize, strides, padding):
  """The flat index, among each sample's entries, of the maximal entry of
  every window of the 3-D max pool of `u` `(N, D, H, W, C)` (TensorFlow
  has no `MaxPoolWithArgmax` of volumes): the windows' entries and their
  indices gathered by strided slices, one per offset in the window, SAME
  padding as entries of `-inf` and index -1; the first maximum in
  row-major order at ties. (Not `tf.extract_volume_patches`: TensorFlow's
  graph optimizer slices the shape of its output wrongly.)"""
  sizes = tf.shape(u, out_type=tf.int64)
  ids = tf.reshape(tf.range(tf.reduce_prod(sizes[1:])), sizes[1:])[None]
  window, stride = np.array(ksize[1:4]), np.array(strides[1:4])
  spatial = sizes[1:4]
  if padding == "SAME":
    total = tf.maximum(
      (spatial + stride - 1) // stride * stride - stride + window - spatial, 0
    )
    zero = tf.zeros([1, 2], tf.int64)
    pads = tf.concat(
      [zero, tf.stack([total // 2, total - total // 2], 1), zero], 0
    )
    u = tf.pad(u, pads, constant_values=-np.inf)
    ids = tf.pad(ids, pads, constant_values=-1)
    spatial += total
  span = (spatial - window) // stride * stride + 1
  # Axes 0 and 4 (the batch, the channels) whole.
  whole = dict(begin_mask=0b10001, end_mask=0b10001)

  def windows(t):
    parts = []
    for offset in itertools.product(*map(range, window)):
      begin = np.array([0, *offset, 0], np.int64)
      end = tf.pad(begin[1:4] + span, [[1, 1]])
      parts.append(tf.strided_slice(t, begin, end, [1, *stride, 1], **whole))
    return tf.stack(parts, 4)  # (N, D', H', W', window, C)

  first = tf.one_hot(
    tf.argmax(windows(u), axis=4),
    int(np.prod(window)),
    1,
    0,
    4,
    tf.int64,
  )
  return tf.reduce_sum(first * windows(ids), 4)


def _window_maxima(op):
  """`(pads, index)` for the max pool `op` reads (its input 0, its attrs):
  `index` the flat index, among each sample's entries, of the maximal
  entry of every window (the first in row-major order at ties); `pads`
  `None`, or the explicit paddings of the entries `index` counts in."""
  u = op.inputs[0]
  padding = op.get_attr("padding").decode()
  if u.shape.rank == 5:
    return None, _volume_maxima(
      u, op.get_attr("ksize"), op.get_attr("strides"), padding
    )
  pads = None
  if padding == "EXPLICIT":
    # Pad with -inf (never picked over an entry) and pool without padding.
    pads = np.reshape(op.get_attr("explicit_paddings"), [-1, 2])
    u = tf.pad(u, pads, constant_values=-np.inf)
    padding = "VALID"

  def index():
    return tf.raw_ops.MaxPoolWithArgmax(
      input=u,
      ksize=op.get_attr("ksize"),
      strides=op.get_attr("strides"),
      padding=padding,
      include_batch_in_index=False,
    ).argmax

  # MaxPoolWithArgmax refuses an empty batch ("tensor_in must not be
  # empty"), which the model's max pool takes.
  return pads, tf.cond(
    tf.shape(u)[0] > 0,
    index,
    lambda: tf.zeros_like(op.outputs[0], dtype=tf.int64),
  )


@registry.register("MaxPool", "MaxPool3D")
def _max_pool(op, jacs, ctx):
  j = jacs[0]
  if j is None:
    return [None]
  _check_format(op, _attrs(op, "data_format"), ("NHWC", "NDHWC"))
  pads, index = _window_maxima(op)
  if pads is not None:
    # The tangents of the padding are zeros.
    j = jacobians.apply_per_sample(j, lambda m: tf.pad(m, pads))
  return [_gather_entries(j, index)]


# TensorFlow's first derivative of a max pool's gradient is right.
@registry.adjoint("MaxPoolGrad", "MaxPool3DGrad", first_order=False)
def _max_pool_grad_adjoint(op, path):
  """The adjoint of the incoming gradient of a max pool's gradient: that of
  its output at the maximal entry of each window. TensorFlow's own
  (`MaxPoolGradGrad`) is wrong for some pools (see
  `dispatch._INEXACT_SECOND_DERIVATIVES`)."""
  del path  # Unused.

  def vjp(adj):
    pads, index = _window_maxima(op)
    if pads is not None:
      adj = tf.pad(adj, pads)
    n = tf.shape(adj)[0]
    picked = tf.gather(
      tf.reshape(adj, tf.stack([n, -1])),
      tf.reshape(index, tf.stack([n, -1])),
      batch_dims=1,
    )
    grad = op.inputs[2]
    return [(grad, tf.reshape(picked, tf.shape(grad)))]

  return vjp


# What a dilated convolution (`tf.nn.convolution` with dilations > 1, the
# `dilation_rate` of layers) holds between its SpaceToBatchND and its
# BatchToSpaceND: ops linear row by row, the image as first input.
_IN_BLOCK = frozenset(
  [
    "Conv2D",
    "Conv3D",
    "DepthwiseConv2dNative",
    "ExpandDims",
    "Squeeze",
    "Identity",
  ]
)


def _block_shape(op):
  value = tf.get_static_value(op.inputs[1])
  return None if value is None else tuple(np.reshape(value, [-1]).tolist())


def _block_end(op):
  """The BatchToSpaceND that closes the block a SpaceToBatchND `op` opens.

  The block is what `tf.nn.convolution` builds: a chain of `_IN_BLOCK` ops,
  each the one reader of the image before it, from `op` to a
  BatchToSpaceND of the same block shape. Ops built after that
  BatchToSpaceND (gradients, row loops) may read the chain's tensors too:
  they are not on the way from `x` to the model's outputs.

  Returns:
    The BatchToSpaceND `Operation`, or `None` when `op` opens no such
    block.
  """
  block = _block_shape(op)
  chain, t = [], op.outputs[0]
  while block is not None:
    chain.append(t)
    steps = [
      c
      for c in t.consumers()
      if c.inputs[0] is t
      and (c.type in _IN_BLOCK or c.type == "BatchToSpaceND")
    ]
    if len(steps) != 1:
      return None
    step = steps[0]
    if step.type != "BatchToSpaceND":
      t = step.outputs[0]
      continue
    if _block_shape(step) != block:
      return None
    inside = {u.op for u in chain[1:]} | {step}
    for u in chain:
      for c in u.consumers():
        # pylint: disable-next=protected-access
        if (
          c not in inside
          and c.type not in registry.SHAPE_READS
          and c._id < step._id
        ):
          return None
    return step
  return None


def _regroup(op, j, fn):
  """The Jacobian of the output of `op`, `fn` of the tangents of `j`.

  The tangents are folded into the batch as rows `r K + k` (row `r` of
  tangent `k`), an order that SpaceToBatchND and BatchToSpaceND keep (their
  batch is `b R + r` for block position `b`); the result has a row per row
  of the output.
  """
  value = j.value
  shape = tf.shape(value)
  merged = tf.reshape(value, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))
  out = fn(merged)
  rows = tf.shape(op.outputs[0])[0]
  return [
    jacobians.dense(
      tf.reshape(out, tf.concat([[rows, shape[1]], tf.shape(out)[1:]], 0))
    )
  ]


@registry.register("SpaceToBatchND", linear=True)
@registry.of_first_input
def _space_to_batch(op, j, ctx):
  """The rows of the output are the samples' blocks, row `b N + n` of
  sample `n`: a dense Jacobian with `B N` rows, followed (checked) only
  by linear ops up to a BatchToSpaceND that makes samples of them again."""
  if _block_end(op) is None:
    return [registry.MIXED]
  _, block, paddings = op.inputs
  return _regroup(
    op,
    jacobians.dense(jacobians.to_dense(j, ctx.n)),
    lambda m: tf.space_to_batch_nd(m, block, paddings),
  )


@registry.register("BatchToSpaceND", linear=True)
@registry.of_first_input
def _batch_to_space(op, j, ctx):
  t = op.inputs[0]
  while t.op.type in _IN_BLOCK:
    t = t.op.inputs[0]
  if t.op.type != "SpaceToBatchND" or _block_end(t.op) is not op:
    return [registry.MIXED]
  _, block, crops = op.inputs
  return _regroup(op, j, lambda m: tf.batch_to_space(m, block, crops))
