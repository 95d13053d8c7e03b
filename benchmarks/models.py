"""The benchmark's models, each written once for TensorFlow and for JAX.

A model is a function of one sample `(K,) -> ()`. Its entry holds, side by
side, the float32 weights (numpy, fed to both frameworks), the TF1 graph
builder (a batch `(N, K)` -> `(N,)`, tf ops only), the JAX function of one
sample (`jax.vmap` makes the batch) and, where one exists, the analytic
per-sample Hessian in float64, against which tf1hess's output is checked
before anything is timed.

`original` models are the three functions of the first benchmark (their
meaning, weights and inputs are unchanged, so results stay comparable);
`forward` models are those of the forward engine's benchmark (issue 14);
`deepxde` ones run where DeepXDE's users run them, in a process whose
TensorFlow 2 behavior DeepXDE's `tensorflow.compat.v1` backend turned off.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np

GROUPS = ("original", "forward", "deepxde")


@dataclasses.dataclass(frozen=True)
class Model:
  """One model: weights, TF builder, JAX function, reference.

  Attributes:
    name: the registry key.
    description: one line for the report.
    group: one of `GROUPS`.
    weights: `(rng, k, settings) -> {name: float32 array}` (`settings`: a
      `cases.Settings`).
    tf_fn: `(weights) -> (x (N, K) tensor -> (N,) tensor)`, tf ops.
    jax_fn: `(weights) -> (x (K,) array -> () array)`, jax.numpy.
    hessian: `(weights, x (N, K) float64) -> (N, K, K)`, analytic, or
      `None` where there is no closed form.
    k_multiple: K must be a multiple of this.
    deepxde: every method of its cases runs in a process where DeepXDE's
      `tensorflow.compat.v1` backend is imported (TF2 behavior off).
  """

  name: str
  description: str
  group: str
  weights: Callable
  tf_fn: Callable
  jax_fn: Callable
  hessian: Optional[Callable] = None
  k_multiple: int = 1
  deepxde: bool = False


MODELS = {}


def register(model):
  if model.name in MODELS or model.group not in GROUPS:
    raise ValueError(f"Cannot register model {model.name!r}.")
  MODELS[model.name] = model
  return model


def get(name):
  """The model registered as `name`; `ValueError` naming the known ones."""
  if name not in MODELS:
    raise ValueError(
      f"`functions` must name entries of {sorted(MODELS)}; saw {name!r}."
    )
  return MODELS[name]


def names(group=None):
  return [m.name for m in MODELS.values() if group in (None, m.group)]


def _tf():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf


def _jax():
  import jax  # pylint: disable=import-outside-toplevel

  return jax, jax.numpy


def _dense(rng, a, b):
  return (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)


def _normal(rng, *shape, scale=1.0):
  return (scale * rng.normal(size=shape)).astype(np.float32)


def _consts(w):
  """TF constants, made in the graph being built."""
  tf = _tf()
  return {key: tf.constant(value) for key, value in w.items()}


def _jnp_consts(w):
  _, jnp = _jax()
  return {key: jnp.asarray(value) for key, value in w.items()}


# ---- tanh_mlp: w2 . tanh(x W1 + b1) ----------------------------------------


def _tanh_mlp_weights(rng, k, settings):
  return {
    "w1": _dense(rng, k, settings.hidden),
    "b1": rng.normal(size=(settings.hidden,)).astype(np.float32) * 0.1,
    "w2": rng.normal(size=(settings.hidden,)).astype(np.float32),
  }


def _tanh_mlp_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    return tf.reduce_sum(tf.tanh(tf.matmul(x, c["w1"]) + c["b1"]) * c["w2"], 1)

  return fn


def _tanh_mlp_jax(w):
  def fn(x):
    _, jnp = _jax()
    c = _jnp_consts(w)
    return jnp.sum(jnp.tanh(x @ c["w1"] + c["b1"]) * c["w2"])

  return fn


def _tanh_mlp_hessian(w, x):
  """`W1 diag(w2 tanh''(z)) W1^T`, `tanh'' = -2 tanh (1 - tanh^2)`."""
  w1 = w["w1"].astype(np.float64)
  t = np.tanh(x @ w1 + w["b1"])
  scale = w["w2"] * (-2.0 * t * (1.0 - t * t))
  return np.einsum("ah,nh,bh->nab", w1, scale, w1)


register(
  Model(
    "tanh_mlp",
    "tanh MLP: w2 . tanh(x W1 + b1), `--hidden` units",
    "original",
    _tanh_mlp_weights,
    _tanh_mlp_tf,
    _tanh_mlp_jax,
    _tanh_mlp_hessian,
  )
)

# ---- quadratic: x . (x A) ----------------------------------------------------


def _quadratic_weights(rng, k, settings):
  del settings
  return {"a": _dense(rng, k, k)}


def _quadratic_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    return tf.reduce_sum(x * tf.matmul(x, c["a"]), axis=1)

  return fn


def _quadratic_jax(w):
  def fn(x):
    c = _jnp_consts(w)
    return x @ c["a"] @ x

  return fn


def _quadratic_hessian(w, x):
  a = w["a"].astype(np.float64)
  return np.broadcast_to(a + a.T, (len(x),) + a.shape)


register(
  Model(
    "quadratic",
    "quadratic form: x . (x A)",
    "original",
    _quadratic_weights,
    _quadratic_tf,
    _quadratic_jax,
    _quadratic_hessian,
  )
)

# ---- softplus_net: v . softplus(... softplus(x W0) ... W_{depth-1}) ---------


def _softplus_net_weights(rng, k, settings):
  sizes = [k] + [settings.hidden] * settings.depth
  layers = {
    f"w{i}": _dense(rng, sizes[i], sizes[i + 1]) for i in range(settings.depth)
  }
  return layers | {"v": rng.normal(size=(settings.hidden,)).astype(np.float32)}


def _softplus_net_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    h = x
    for i in range(len(w) - 1):
      h = tf.nn.softplus(tf.matmul(h, c[f"w{i}"]))
    return tf.reduce_sum(h * c["v"], axis=1)

  return fn


def _softplus_net_jax(w):
  def fn(x):
    _, jnp = _jax()
    c = _jnp_consts(w)
    h = x
    for i in range(len(w) - 1):
      h = jnp.logaddexp(h @ c[f"w{i}"], 0.0)
    return jnp.sum(h * c["v"])

  return fn


register(
  Model(
    "softplus_net",
    "softplus network: `--depth` layers of `--hidden` units",
    "original",
    _softplus_net_weights,
    _softplus_net_tf,
    _softplus_net_jax,
  )
)

# ---- fnn_3x64: DeepXDE's FNN([K] + [64] * 3 + [1], "tanh") ----------------


def _fnn_weights(rng, k, settings):
  del settings
  sizes = [k, 64, 64, 64, 1]
  return {f"w{i}": _dense(rng, sizes[i], sizes[i + 1]) for i in range(4)} | {
    f"b{i}": _normal(rng, sizes[i + 1], scale=0.1) for i in range(4)
  }


def _fnn_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    h = x
    for i in range(3):  # tf.compat.v1.layers.dense: MatMul, BiasAdd.
      h = tf.tanh(tf.nn.bias_add(tf.matmul(h, c[f"w{i}"]), c[f"b{i}"]))
    return tf.reduce_sum(tf.nn.bias_add(tf.matmul(h, c["w3"]), c["b3"]), 1)

  return fn


def _fnn_jax(w):
  def fn(x):
    _, jnp = _jax()
    c = _jnp_consts(w)
    h = x
    for i in range(3):
      h = jnp.tanh(h @ c[f"w{i}"] + c[f"b{i}"])
    return jnp.sum(h @ c["w3"] + c["b3"])

  return fn


register(
  Model(
    "fnn_3x64",
    'DeepXDE\'s FNN([K] + [64] * 3 + [1], "tanh"): 3 tanh layers of 64 '
    "units, linear read-out",
    "forward",
    _fnn_weights,
    _fnn_tf,
    _fnn_jax,
  )
)

# The same network as DeepXDE's users run it: TF1 behavior (control flow v1,
# TF1 shapes) in every method of its cases, beside dde.grad.hessian.
register(
  dataclasses.replace(
    MODELS["fnn_3x64"],
    name="deepxde_fnn",
    description="fnn_3x64 in a process with DeepXDE's tensorflow.compat.v1 "
    "backend (TF2 behavior off), as DeepXDE's users run it",
    group="deepxde",
    deepxde=True,
  )
)

# ---- residual_ln: 2 blocks h + softplus(layernorm(h)) W, 32 units -----------


def _residual_weights(rng, k, settings):
  del settings
  return {
    "w_in": _dense(rng, k, 32),
    "w0": _dense(rng, 32, 32),
    "w1": _dense(rng, 32, 32),
    "v": _normal(rng, 32),
  }


def _residual_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    h = tf.matmul(x, c["w_in"])
    for i in range(2):
      centered = h - tf.reduce_mean(h, -1, keepdims=True)
      var = tf.reduce_mean(centered * centered, -1, keepdims=True)
      normed = centered * tf.math.rsqrt(var + 1e-3)
      h = h + tf.matmul(tf.nn.softplus(normed), c[f"w{i}"])
    return tf.reduce_sum(tf.tanh(h) * c["v"], -1)

  return fn


def _residual_jax(w):
  def fn(x):
    jax, jnp = _jax()
    c = _jnp_consts(w)
    h = x @ c["w_in"]
    for i in range(2):
      centered = h - jnp.mean(h, -1, keepdims=True)
      var = jnp.mean(centered * centered, -1, keepdims=True)
      normed = centered * jax.lax.rsqrt(var + 1e-3)
      h = h + jax.nn.softplus(normed) @ c[f"w{i}"]
    return jnp.sum(jnp.tanh(h) * c["v"])

  return fn


register(
  Model(
    "residual_ln",
    "residual MLP: 2 blocks h + softplus(layernorm(h)) W of 32 units, tanh "
    "read-out",
    "forward",
    _residual_weights,
    _residual_tf,
    _residual_jax,
  )
)

# ---- conv1d: 2 tanh convolutions (width 3, 8 channels), dense read-out ------


def _conv_weights(rng, k, settings):
  del settings
  return {
    "k0": _normal(rng, 3, 1, 8, scale=1 / np.sqrt(3)),
    "b0": _normal(rng, 8, scale=0.1),
    "k1": _normal(rng, 3, 8, 8, scale=1 / np.sqrt(24)),
    "b1": _normal(rng, 8, scale=0.1),
    "v": _normal(rng, 8 * k, scale=1 / np.sqrt(8 * k)),
  }


def _conv_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    h = x[:, :, None]  # (N, K, 1): K positions, 1 channel.
    for i in range(2):
      h = tf.nn.conv1d(h, c[f"k{i}"], stride=1, padding="SAME")
      h = tf.tanh(h + c[f"b{i}"])
    return tf.reduce_sum(tf.reshape(h, [-1, c["v"].shape[0]]) * c["v"], 1)

  return fn


def _conv_jax(w):
  def fn(x):
    jax, jnp = _jax()
    c = _jnp_consts(w)
    h = x[None, :, None]
    for i in range(2):
      h = jax.lax.conv_general_dilated(
        h, c[f"k{i}"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
      )
      h = jnp.tanh(h + c[f"b{i}"])
    return jnp.sum(h.reshape(-1) * c["v"])

  return fn


register(
  Model(
    "conv1d",
    "1-D conv net: 2 tanh convolutions (tf.nn.conv1d, width 3, 8 channels) "
    "over the K features, dense read-out",
    "forward",
    _conv_weights,
    _conv_tf,
    _conv_jax,
  )
)

# ---- attention: single head over K/4 tokens of 4 features --------------------

_TOKEN = 4  # Features per token.
_HEAD = 8  # Width of the query, key and value.


def _attention_weights(rng, k, settings):
  del k, settings
  return {
    "wq": _dense(rng, _TOKEN, _HEAD),
    "wk": _dense(rng, _TOKEN, _HEAD),
    "wv": _dense(rng, _TOKEN, _HEAD),
    "u": _normal(rng, _HEAD),
  }


def _attention_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    h = tf.reshape(x, [-1, x.shape[1] // _TOKEN, _TOKEN])  # (N, T, 4)
    q, k, v = (tf.einsum("ntd,de->nte", h, c[n]) for n in ("wq", "wk", "wv"))
    # Products of two tensors of x: BatchMatMul, as attention layers build.
    scores = tf.matmul(q, k, transpose_b=True) * np.float32(_HEAD**-0.5)
    out = tf.matmul(tf.nn.softmax(scores, -1), v)
    return tf.reduce_sum(tf.tanh(out) * c["u"], [1, 2])

  return fn


def _attention_jax(w):
  def fn(x):
    jax, jnp = _jax()
    c = _jnp_consts(w)
    h = x.reshape(-1, _TOKEN)
    q, k, v = (h @ c[n] for n in ("wq", "wk", "wv"))
    scores = (q @ k.T) * np.float32(_HEAD**-0.5)
    out = jax.nn.softmax(scores, -1) @ v
    return jnp.sum(jnp.tanh(out) * c["u"])

  return fn


register(
  Model(
    "attention",
    f"single-head attention over K/{_TOKEN} tokens of {_TOKEN} features "
    f"(einsum projections, batched matmuls, softmax; width {_HEAD}), tanh "
    "read-out",
    "forward",
    _attention_weights,
    _attention_tf,
    _attention_jax,
    k_multiple=_TOKEN,
  )
)

# ---- mixture: log-density of a 10-component Gaussian mixture -----------------


def _mixture_weights(rng, k, settings):
  del settings
  return {
    "mu": _normal(rng, 10, k),
    "log_s": _normal(rng, 10, scale=0.2),
    "log_w": np.log(rng.dirichlet(np.ones(10))).astype(np.float32),
  }


def _mixture_tf(w):
  def fn(x):
    tf, c = _tf(), _consts(w)
    d = (x[:, None, :] - c["mu"]) * tf.exp(-c["log_s"])[:, None]
    quad = tf.reduce_sum(d * d, -1)
    k = np.float32(x.shape[-1])
    return tf.reduce_logsumexp(c["log_w"] - 0.5 * quad - k * c["log_s"], -1)

  return fn


def _mixture_jax(w):
  def fn(x):
    jax, jnp = _jax()
    c = _jnp_consts(w)
    d = (x - c["mu"]) * jnp.exp(-c["log_s"])[:, None]
    quad = jnp.sum(d * d, -1)
    k = np.float32(x.shape[-1])
    return jax.nn.logsumexp(c["log_w"] - 0.5 * quad - k * c["log_s"])

  return fn


def _mixture_hessian(w, x):
  """`sum_c p_c (g_c g_c^T - I / s_c^2) - gbar gbar^T`."""
  inv_var = np.exp(-2.0 * w["log_s"].astype(np.float64))  # (C,)
  diff = x[:, None, :] - w["mu"]  # (N, C, K)
  terms = (
    w["log_w"]
    - 0.5 * np.sum(diff * diff, -1) * inv_var
    - x.shape[1] * w["log_s"]
  )
  p = np.exp(terms - terms.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)  # (N, C)
  g = -diff * inv_var[:, None]  # (N, C, K)
  mean = np.einsum("nc,nck->nk", p, g)
  second = np.einsum("nc,nca,ncb->nab", p, g, g)
  curvature = np.einsum("nc,c->n", p, inv_var)[:, None, None]
  eye = np.eye(x.shape[1])
  return second - curvature * eye - mean[:, :, None] * mean[:, None, :]


register(
  Model(
    "mixture",
    "log-density of a 10-component Gaussian mixture (tf.reduce_logsumexp)",
    "forward",
    _mixture_weights,
    _mixture_tf,
    _mixture_jax,
    _mixture_hessian,
  )
)
