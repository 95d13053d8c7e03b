"""Forward rules of convolutions and pooling over images `(N, H, W, C)`.

A convolution by weights and an average pool are linear in their input and
map a batch sample by sample: the Jacobian of the output is the same op
(same attrs: strides, dilations, padding) applied to the K tangents folded
into the batch axis (`jacobians.apply_per_sample`), a shared Jacobian `(K,
H, W, C)` as a batch of K images. They add no curvature.

A max pool is piecewise linear: each output entry is one input entry of its
window, and its tangent is that entry's tangent. The rule finds the entry
with `tf.nn.max_pool_with_argmax` and gathers the tangents there: exact, and
the cost of one pool of the N inputs plus a gather. Ties (a measure-zero
set, but common after a `relu`, where they carry equal zero tangents) take
the first maximal entry of the window in row-major order, as TensorFlow's
`MaxPoolGrad` and `MaxPoolGradGrad` do on CPU: the engine and the row loop
agree there. No curvature either.

Data formats: `Conv2D` follows NHWC and NCHW (TensorFlow's CPU kernels run
NCHW in float32); `DepthwiseConv2dNative`, `AvgPool` and `MaxPool` follow
NHWC only (their CPU kernels refuse NCHW, so the rules could not be tested
there), and `DepthwiseConv2dNative` dilations of 1 only (same reason).
"""

import numpy as np
import tensorflow as tf

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


def _convolution(op, jacs, ctx, build, names, formats):
  """Rule of a convolution of the image (input 0) by a filter (input 1)."""
  j, jf = jacs
  if jf is not None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has a filter that depends on x: the forward "
      "rule follows convolutions of x by weights only"
    )
  if j is None:
    return [None]
  attrs = _attrs(op, *names)
  _check_format(op, attrs, formats)
  if not j.shared:
    ctx.dense_matmul()  # A convolution of N K images: costs as a matmul.
  f = op.inputs[1]
  return [
    jacobians.apply_per_sample(
      j, lambda m: build(input=m, filter=tf.cast(f, m.dtype), **attrs)
    )
  ]


_CONV_ATTRS = (
  "strides",
  "padding",
  "explicit_paddings",
  "data_format",
  "dilations",
)


@registry.register("Conv2D", linear=_of_weights)
def _conv2d(op, jacs, ctx):
  return _convolution(
    op,
    jacs,
    ctx,
    tf.raw_ops.Conv2D,
    _CONV_ATTRS + ("use_cudnn_on_gpu",),
    ("NHWC", "NCHW"),
  )


@registry.register("DepthwiseConv2dNative", linear=_of_weights)
def _depthwise_conv2d(op, jacs, ctx):
  if any(d != 1 for d in op.get_attr("dilations")):
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has dilations {op.get_attr('dilations')}; the "
      "forward rule follows dilations of 1 only (TensorFlow's CPU kernel "
      "runs no other)"
    )
  return _convolution(
    op, jacs, ctx, tf.raw_ops.DepthwiseConv2dNative, _CONV_ATTRS, ("NHWC",)
  )


_POOL_ATTRS = ("ksize", "strides", "padding", "data_format")


@registry.register("AvgPool", linear=True)
def _avg_pool(op, jacs, ctx):
  j = jacs[0]
  if j is None:
    return [None]
  attrs = _attrs(op, *_POOL_ATTRS)
  _check_format(op, attrs, ("NHWC",))
  pool = tf.raw_ops.AvgPool
  return [jacobians.apply_per_sample(j, lambda m: pool(value=m, **attrs))]


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


@registry.register("MaxPool")
def _max_pool(op, jacs, ctx):
  j = jacs[0]
  if j is None:
    return [None]
  attrs = _attrs(op, *_POOL_ATTRS)
  _check_format(op, attrs, ("NHWC",))
  u = op.inputs[0]
  padding = attrs["padding"]
  if padding == "EXPLICIT":
    # Pad with -inf (never picked over an entry) and pool without padding;
    # the tangents of the padding are zeros.
    pads = np.reshape(op.get_attr("explicit_paddings"), [-1, 2])
    u = tf.pad(u, pads, constant_values=-np.inf)
    j = jacobians.apply_per_sample(j, lambda m: tf.pad(m, pads))
    padding = "VALID"
  _, index = tf.raw_ops.MaxPoolWithArgmax(
    input=u,
    ksize=attrs["ksize"],
    strides=attrs["strides"],
    padding=padding,
    include_batch_in_index=False,
  )
  return [_gather_entries(j, index)]
