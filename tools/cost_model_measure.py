r"""Measures the choice of `method="auto"` against both engines' run times.

For each model and shape (`--cost_cases`, `--cost_quantity`), builds in one
graph the engine's result (`method="forward"`), the rows `method="auto"`
builds when it does not take the engine, and `method="auto"` itself; checks
that the three agree; and times each (median of `--cost_runs` session runs
after a warm-up, the methods taking turns). Prints one row per case:
shapes, the two engines' times, their estimated times at N (those
`dispatch.choose` compares), what auto picked for N and whether that was
the faster (or within 15% of it).

The models (`MODELS`) are in no benchmark and no other test; `ALL`
validates the cost model (its last models were written after the fit and
run once to check it), `CALIBRATION` (`--calibrate`) fits its constants.
The batch axis of the input is `None`, as usual: auto builds both engines
and a `tf.cond` on N where its choice depends on N; `--static_batch` gives
it N, and it builds one.

  python tools/cost_model_measure.py --cost_cases=rbf_softplus:1024x32
  python tools/cost_model_measure.py --cost_quantity=laplacian
  python tools/cost_model_measure.py --measure_ops
  python tools/cost_model_measure.py --calibrate
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import time
from unittest import mock

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import tf1hess
from tf1hess.forward import dispatch
from tf1hess.forward import engine

_CASES = flags.DEFINE_list("cost_cases", ["all"], "model:NxK cases, or all.")
_QUANTITY = flags.DEFINE_enum(
  "cost_quantity",
  "hessian",
  ["hessian", "diagonal", "laplacian"],
  "What to time.",
)
_RUNS = flags.DEFINE_integer("cost_runs", 5, "Timed runs.", lower_bound=1)
_CALIBRATE = flags.DEFINE_bool(
  "calibrate", False, "Time CALIBRATION and fit the constants of dispatch."
)
_STATIC_BATCH = flags.DEFINE_bool(
  "static_batch", False, "Give the input a static batch size."
)
_MEASURE_OPS = flags.DEFINE_bool(
  "measure_ops", False, "Measure what an op costs (the constants of ops)."
)


def _rng(name, k):
  return np.random.default_rng([k, len(name), ord(name[0])])


def _dense(h, units, rng, name):
  """`h @ W + b` with float32 weights of scale 1/sqrt(fan-in)."""
  fan_in = h.shape[1]
  w = rng.normal(size=(fan_in, units)) / np.sqrt(fan_in)
  b = rng.normal(size=(units,)) * 0.1
  w = tf.constant(w, h.dtype, name=f"{name}_w")
  return tf.matmul(h, w) + tf.constant(b, h.dtype)


def rbf_softplus(x, rng, units=48, centers=32):
  """A Gaussian-kernel density over `centers`, plus a softplus layer."""
  k = x.shape[1]
  mu = tf.constant(rng.normal(size=(centers, k)), x.dtype)
  d2 = tf.reduce_sum(tf.square(x[:, None, :] - mu), axis=2)
  density = tf.math.log(tf.reduce_sum(tf.exp(-0.5 * d2 / k), axis=1) + 1e-3)
  hidden = tf.nn.softplus(_dense(x, units, rng, "sp"))
  return density + tf.reduce_sum(_dense(hidden, 1, rng, "out"), axis=1)


def wide_softplus(x, rng, units=512):
  """One softplus layer of `units` under a linear read-out, squared."""
  h = tf.nn.softplus(_dense(x, units, rng, "wide"))
  return tf.square(tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1))


def _mlp(x, rng, depth, units, activation):
  """`depth` layers of `units` with `activation`, linear read-out."""
  h = x
  for i in range(depth):
    h = activation(_dense(h, units, rng, f"l{i}"))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def deep_tanh(x, rng):
  """6 tanh layers of 16 units, linear read-out."""
  return _mlp(x, rng, 6, 16, tf.tanh)


def quadratic(x, rng):
  """`x^T A x`."""
  k = x.shape[1]
  a = tf.constant(rng.normal(size=(k, k)), x.dtype)
  return tf.reduce_sum(x * tf.matmul(x, a), axis=1)


def two_branches(x, rng, units=32):
  """The product of two tanh MLPs (2 x `units` each)."""
  outs = []
  for branch in "ab":
    h = tf.tanh(_dense(x, units, rng, f"{branch}1"))
    h = tf.tanh(_dense(h, units, rng, f"{branch}2"))
    outs.append(tf.reduce_sum(_dense(h, 1, rng, f"{branch}o"), axis=1))
  return outs[0] * outs[1]


def one_layer(x, rng, units=32):
  """One sigmoid layer of `units`, then a squared norm (no shortcut)."""
  h = tf.sigmoid(_dense(x, units, rng, "l"))
  return tf.reduce_sum(tf.square(h), axis=1) * tf.reduce_sum(h, axis=1)


def conv1d(x, rng, channels=8):
  """A 1-D convolution of the features seen as a signal, tanh, sum."""
  k = x.shape[1]
  kernel = tf.constant(rng.normal(size=(3, 1, channels)) / 3, x.dtype)
  h = tf.tanh(tf.nn.conv1d(tf.reshape(x, [-1, k, 1]), kernel, 1, "SAME"))
  return tf.reduce_sum(_dense(tf.reshape(h, [-1, k * channels]), 1, rng, "o"))


def tanh_mlp(x, rng):
  """DeepXDE-style FNN: 3 tanh layers of 64 units, linear read-out."""
  return _mlp(x, rng, 3, 64, tf.tanh)


def fourier(x, rng, features=64, units=48):
  """Random Fourier features, a swish and a tanh-approximate gelu layer."""
  k = x.shape[1]
  w = tf.constant(0.7 * rng.normal(size=(k, features)), x.dtype)
  z = tf.matmul(x, w)
  h = _dense(tf.concat([tf.sin(z), tf.cos(z)], axis=1), units, rng, "f1")
  h = tf.nn.gelu(_dense(h * tf.sigmoid(h), units, rng, "f2"), approximate=True)
  out = tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)
  return out + 0.1 * tf.reduce_sum(x * x, axis=1)


def siren(x, rng, depth=3, units=64):
  """Sine activations `sin(3 (h W + b))`, `depth` layers (written after)."""
  h = x
  for i in range(depth):
    h = tf.sin(3.0 * _dense(h, units, rng, f"s{i}"))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def mish(x, rng, units=80):
  """2 mish layers `z tanh(softplus(z))` (written after the fit)."""
  h = x
  for i in range(2):
    z = _dense(h, units, rng, f"m{i}")
    h = z * tf.tanh(tf.nn.softplus(z))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def power(x, rng, units=40):
  """`(|z| + 1)^1.5 - sqrt(z^2 + 1)` of a dense layer, a tanh layer."""
  z = _dense(x, units, rng, "p")
  h = tf.pow(tf.abs(z) + 1.0, 1.5) - tf.sqrt(tf.square(z) + 1.0)
  h = tf.tanh(_dense(h, units, rng, "q"))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def layer_norm_elu(x, rng, units=96):
  """A dense layer, layer normalization, elu, a softplus layer."""
  h = _dense(x, units, rng, "a")
  mean = tf.reduce_mean(h, axis=1, keepdims=True)
  var = tf.reduce_mean(tf.square(h - mean), axis=1, keepdims=True)
  h = tf.nn.elu((h - mean) * tf.math.rsqrt(var + 1e-5))
  h = tf.nn.softplus(_dense(h, units, rng, "b"))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def inverse_quadratic(x, rng, centers=64, units=32):
  """`sum_c 1 / (1 + |x - c|^2)` plus a tanh layer (written after)."""
  c = tf.constant(rng.normal(size=(centers, x.shape[1])), x.dtype)
  d2 = tf.reduce_sum(tf.square(x[:, None, :] - c), axis=2)
  kernel = tf.reduce_sum(tf.math.reciprocal(1.0 + d2), axis=1)
  return kernel + tf.reduce_sum(tf.tanh(_dense(x, units, rng, "t")), axis=1)


def image_conv(x, rng, channels=6):
  """The K features as a square image: a 3 x 3 convolution, softplus, a
  2 x 2 average pool, a linear read-out (written after the fit)."""
  side = int(round(x.shape[1] ** 0.5))
  kernel = tf.constant(rng.normal(size=(3, 3, 1, channels)) / 3, x.dtype)
  h = tf.nn.softplus(
    tf.nn.conv2d(tf.reshape(x, [-1, side, side, 1]), kernel, 1, "SAME")
  )
  h = tf.nn.avg_pool2d(h, 2, 2, "VALID")
  return tf.reduce_sum(
    _dense(tf.reshape(h, [-1, (side // 2) ** 2 * channels]), 1, rng, "o"),
    axis=1,
  )


def gated_softmax(x, rng, experts=8):
  """Softmax gates over `experts` tanh read-outs of a tanh layer (after)."""
  gate = tf.nn.softmax(_dense(x, experts, rng, "g"), axis=1)
  values = tf.tanh(_dense(tf.tanh(_dense(x, 32, rng, "h")), experts, rng, "v"))
  return tf.reduce_sum(gate * values, axis=1)


def shifted_pairs(x, rng):
  """`sum_i sin(x_i) cos(x_i+1) + log(1 + |x|^2)` (written after the fit)."""
  del rng
  return tf.reduce_sum(
    tf.sin(x[:, :-1]) * tf.cos(x[:, 1:]), axis=1
  ) + tf.math.log(1.0 + tf.reduce_sum(x * x, axis=1))


def sigmoid_mlp(x, rng):
  """2 sigmoid layers of 32 units, linear read-out (calibration)."""
  return _mlp(x, rng, 2, 32, tf.sigmoid)


def wide_sigmoid(x, rng):
  """4 sigmoid layers of 128 units (calibration)."""
  return _mlp(x, rng, 4, 128, tf.sigmoid)


def swish_mlp(x, rng):
  """3 swish layers of 64 units, linear read-out (calibration)."""
  return _mlp(x, rng, 3, 64, lambda z: z * tf.sigmoid(z))


def rms_mlp(x, rng, units=64):
  """A dense layer, RMS normalization, softplus, a tanh layer (calibration)."""
  h = _dense(x, units, rng, "l0")
  h = h * tf.math.rsqrt(tf.reduce_mean(h * h, axis=1, keepdims=True) + 1e-3)
  h = tf.tanh(_dense(tf.nn.softplus(h), units, rng, "l1"))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def glu(x, rng, units=96):
  """A gated layer `tanh(x W) sigmoid(x V)`, then an elu layer (calibration)."""
  h = tf.tanh(_dense(x, units, rng, "a")) * tf.sigmoid(
    _dense(x, units, rng, "b")
  )
  h = tf.nn.elu(_dense(h, 32, rng, "c"))
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def rbf(x, rng):
  """A Gaussian-kernel log-density over 8 centers (calibration)."""
  k = x.shape[1]
  mu = tf.constant(rng.normal(size=(8, k)), x.dtype)
  d2 = tf.reduce_sum(tf.square(x[:, None, :] - mu), axis=2)
  return tf.math.log(tf.reduce_sum(tf.exp(-0.5 * d2 / k), axis=1))


def elementwise(x, rng):
  """Elementwise functions of x only: a diagonal Hessian."""
  del rng
  return tf.reduce_sum(tf.sin(x) * tf.exp(-x * x), axis=1)


def lstm(x, rng, units=16, features=2):
  """An LSTM cell of `units` over `K / features` steps, fed as TF1 code did
  (time-major, merged to rows, split into steps), linear read-out."""
  k = x.shape[1]
  features = features if k % features == 0 else 1
  steps = tf.transpose(tf.reshape(x, [-1, k // features, features]), [1, 0, 2])
  steps = tf.split(tf.reshape(steps, [-1, features]), k // features, 0)
  h = tf.zeros_like(steps[0][:, :1]) * tf.zeros([1, units], x.dtype)
  c = h
  for t, step in enumerate(steps):
    z = _dense(tf.concat([step, h], 1), 4 * units, rng, f"cell{t}")
    i, j, f, o = tf.split(z, 4, 1)
    c = c * tf.sigmoid(f + 1.0) + tf.sigmoid(i) * tf.tanh(j)
    h = tf.tanh(c) * tf.sigmoid(o)
  return tf.reduce_sum(_dense(h, 1, rng, "out"), axis=1)


def gru(x, rng, units=16, features=2):
  """A GRU cell of `units` over `K / features` steps of a batch-major
  sequence, unrolled in Python, tanh read-out."""
  k = x.shape[1]
  features = features if k % features == 0 else 1
  seq = tf.reshape(x, [-1, k // features, features])
  h = tf.zeros_like(seq[:, 0, :1]) * tf.zeros([1, units], x.dtype)
  for t in range(k // features):
    gates = tf.sigmoid(
      _dense(tf.concat([seq[:, t], h], 1), 2 * units, rng, f"g{t}")
    )
    r, u = tf.split(gates, 2, 1)
    c = tf.tanh(_dense(tf.concat([seq[:, t], r * h], 1), units, rng, f"c{t}"))
    h = u * h + (1.0 - u) * c
  return tf.reduce_sum(tf.tanh(_dense(h, 1, rng, "out")), axis=1)


def scan_lstm(x, rng, units=16, features=2):
  """An LSTM cell of `units` over `K / features` steps in a `tf.scan` (a
  loop, as `dynamic_rnn` builds), one set of weights, linear read-out."""
  k = x.shape[1]
  features = features if k % features == 0 else 1
  seq = tf.transpose(tf.reshape(x, [-1, k // features, features]), [1, 0, 2])
  w = tf.constant(
    rng.normal(size=(features + units, 4 * units)) / np.sqrt(features + units),
    x.dtype,
  )
  h0 = tf.zeros_like(seq[0, :, :1]) * tf.zeros([1, units], x.dtype)

  def step(state, inputs):
    c, h = state
    i, j, f, o = tf.split(tf.matmul(tf.concat([inputs, h], 1), w), 4, 1)
    c = c * tf.sigmoid(f + 1.0) + tf.sigmoid(i) * tf.tanh(j)
    return c, tf.tanh(c) * tf.sigmoid(o)

  _, hs = tf.scan(step, seq, initializer=(h0, h0))
  return tf.reduce_sum(_dense(hs[-1], 1, rng, "out"), axis=1)


MODELS = {
  "rbf_softplus": rbf_softplus,
  "wide_softplus": wide_softplus,
  "deep_tanh": deep_tanh,
  "quadratic": quadratic,
  "two_branches": two_branches,
  "one_layer": one_layer,
  "conv1d": conv1d,
  "tanh_mlp": tanh_mlp,
  "elementwise": elementwise,
  "fourier": fourier,
  "siren": siren,
  "mish": mish,
  "power": power,
  "layer_norm_elu": layer_norm_elu,
  "inverse_quadratic": inverse_quadratic,
  "image_conv": image_conv,
  "gated_softmax": gated_softmax,
  "shifted_pairs": shifted_pairs,
  "sigmoid_mlp": sigmoid_mlp,
  "wide_sigmoid": wide_sigmoid,
  "rbf": rbf,
  "swish_mlp": swish_mlp,
  "rms_mlp": rms_mlp,
  "glu": glu,
  "lstm": lstm,
  "gru": gru,
  "scan_lstm": scan_lstm,
}

# The cases `--calibrate` fits the constants of `dispatch` to: models that
# are in no benchmark and not among ALL (which validates them).
CALIBRATION = [
  "sigmoid_mlp:256x8",
  "sigmoid_mlp:2048x8",
  "sigmoid_mlp:256x32",
  "sigmoid_mlp:2048x32",
  "sigmoid_mlp:256x128",
  "wide_sigmoid:256x16",
  "wide_sigmoid:1024x32",
  "rbf:256x16",
  "rbf:2048x16",
  "rbf:256x128",
  "elementwise:256x32",
  "elementwise:4096x32",
  "swish_mlp:1024x16",
  "swish_mlp:1024x48",
  "rms_mlp:1024x32",
  "rms_mlp:256x64",
  "glu:2048x16",
  "glu:512x48",
  # Few features and many samples, as in physics-informed networks.
  "swish_mlp:8192x2",
  "wide_sigmoid:4096x3",
  "rms_mlp:4096x4",
  "glu:8192x2",
]

ALL = [
  "rbf_softplus:1024x32",
  "rbf_softplus:64x32",
  "rbf_softplus:4096x32",
  "wide_softplus:1024x8",
  "deep_tanh:1024x64",
  "deep_tanh:4096x64",
  "quadratic:1024x32",
  "two_branches:1024x16",
  "two_branches:64x16",
  "one_layer:1024x256",
  "conv1d:256x32",
  "tanh_mlp:1024x64",
  "tanh_mlp:4096x16",
  "elementwise:1024x128",
  "fourier:2048x24",
  "fourier:512x24",
  # Written after the fit of CALIBRATION, and run once to check it.
  "siren:1024x16",
  "siren:2048x3",
  "mish:1024x32",
  "mish:4096x8",
  "power:1024x24",
  "layer_norm_elu:1024x32",
  "layer_norm_elu:256x64",
  "inverse_quadratic:1024x32",
  "inverse_quadratic:512x100",
  "image_conv:512x36",
  "image_conv:128x64",
  "gated_softmax:1024x32",
  "gated_softmax:2048x8",
  "shifted_pairs:1024x64",
  "shifted_pairs:4096x16",
]


def _op(quantity):
  return {
    "hessian": tf1hess.batch_hessians,
    "diagonal": tf1hess.batch_hessian_diagonals,
    "laplacian": tf1hess.batch_laplacians,
  }[quantity]


def measure(model, n, k, quantity, runs, static_batch=False):
  """Times a case; returns a dict of times (s), estimates and the choice."""
  op = _op(quantity)
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(
      tf.float32, [n if static_batch else None, k], name="x"
    )
    y = MODELS[model](x, _rng(model, k))
    choices, estimates, work = [], {}, {}
    choose = dispatch.choose

    def spy(ys, x, grad, mode, walked, plan=None):
      estimates["forward"] = dispatch.seconds(walked.work, n)
      rows = dispatch.rows_work(ys, x, grad, mode)
      if dispatch.seconds(rows, 1) is None:
        rows = dispatch._rows_work_with_static_batch(ys, x, mode, plan)  # pylint: disable=protected-access
      estimates["rows"] = dispatch.seconds(rows, n)
      work["forward"] = walked.work.at(n)
      parts = dispatch.row_parts(ys, x, grad, mode)
      if parts is None:
        # Shapes lost where N is not static: as `dispatch` does, a copy.
        graph, x_copy, ys_copy = dispatch._static_batch_copy(  # pylint: disable=protected-access
          x, ys, engine.path_ops(x, ys)
        )
        with graph.as_default():
          grad_copy = tf.gradients(ys_copy, x_copy)[0]
          parts = dispatch.row_parts(ys_copy, x_copy, grad_copy, mode)
      work["rows"] = tuple(
        n * parts[name] * (1 if name == "once" else parts["k"])
        for name in ("flops", "products", "others", "once", "again")
      ) + (parts["k"] * parts["ops"],)
      choices.append(choose(ys, x, grad, mode, walked))
      return choices[-1]

    with mock.patch.object(dispatch, "choose", side_effect=spy):
      start = time.perf_counter()
      auto = op(y, x)
      build = time.perf_counter() - start
    rows_only = dispatch.Choice(False)
    with mock.patch.object(dispatch, "choose", return_value=rows_only):
      rows = op(y, x)
    fetches = {"rows": rows, "auto": auto}
    try:
      fetches["forward"] = op(y, x, method="forward")
    except ValueError:
      pass
    batch = np.random.default_rng(n).normal(size=(n, k)).astype(np.float32)
    with tf.compat.v1.Session() as sess:
      values = sess.run(fetches, {x: batch})
      for name, value in values.items():
        np.testing.assert_allclose(
          value, values["rows"], rtol=2e-3, atol=2e-3, err_msg=name
        )
      times = {name: [] for name in fetches}
      names = list(fetches)
      for run in range(runs + 1):
        for name in names[run % len(names) :] + names[: run % len(names)]:
          start = time.perf_counter()
          sess.run(fetches[name], {x: batch})
          if run:
            times[name].append(time.perf_counter() - start)
  out = {name: float(np.median(t)) for name, t in times.items()}
  out["picked"] = "forward" if choices and choices[0].at(n) else "rows"
  out["estimates"] = estimates
  out["work"] = work
  out["build"] = build
  return out


# Where the fit of `calibrate` starts, and what it is weakly pulled to:
# seconds per flop and entry; the rows' multipliers of flops, entries of
# products and other entries.
_PRIOR = np.array([2e-11, 5e-10, 1.0, 1.0, 1.0])


def predict(features, constants):
  """The estimated times of both engines (see `fit`) with `constants`."""
  f, r = (np.array(features[e], float) for e in ("forward", "rows"))
  c = constants
  op = dispatch._SECONDS_PER_OP  # pylint: disable=protected-access
  row_op = op * dispatch._ROW_OPS  # pylint: disable=protected-access
  p_f = f @ np.array([c[0], c[1], op])
  p_r = r @ np.array(
    [c[0] * c[2], c[1] * c[3], c[1] * c[4], c[1], c[1], row_op]
  )
  return p_f, p_r


def fit(features, times):
  """The constants of `dispatch` that fit `times` best (see `calibrate`).

  Least squares of the log errors of both engines' times and (doubly
  weighted) of their ratio, with a weak pull (0.3 per e-fold) towards
  `_PRIOR`: flops and entries grow together on most models, and the pull
  keeps the split between them physical. The costs of ops are not fitted
  but measured (`measure_ops`; `dispatch._SECONDS_PER_OP` and
  `dispatch._ROW_OPS`): op counts grow with entries on most models, so a
  fit cannot tell them apart, and they decide the small models.

  Args:
    features: `{"forward": [(flops, entries, ops)], "rows": [(flops,
      entries of products, other entries, entries once, entries again,
      ops)]}` at the measured N (the rows' with multipliers 1: see
      `dispatch.row_parts`).
    times: `{"forward": [seconds], "rows": [seconds]}`.

  Returns:
    The 5 constants, in the order of `_PRIOR`.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  t_f, t_r = (np.array(times[e]) for e in ("forward", "rows"))

  def residuals(p):
    p_f, p_r = predict(features, np.exp(p))
    return np.concatenate(
      [
        np.log(p_f / t_f),
        np.log(p_r / t_r),
        2 * np.log(p_r / p_f * t_f / t_r),
        0.3 * (p - np.log(_PRIOR)),
      ]
    )

  return np.exp(optimize.least_squares(residuals, np.log(_PRIOR)).x)


def _seconds_per_op(n, loop, runs=9):
  """Seconds per tiny op `(n, 8)`: straight-line, or in a `tf.while_loop`."""
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8])

    def chain(h, length):
      for i in range(length):
        h = h * 1.0001 if i % 2 else h + 0.5
      return h

    if loop:
      rows, length = 64, 40
      out = tf.while_loop(
        lambda i, acc: i < rows,
        lambda i, acc: (i + 1, acc + chain(x, length)),
        [tf.constant(0), tf.zeros_like(x)],
      )[1]
      count = rows * (length + 1)
    else:
      count = 400
      out = chain(x, count)
    feed = {x: np.ones((n, 8), np.float32)}
    with tf.compat.v1.Session() as sess:
      sess.run(out.op, feed)
      times = []
      for _ in range(runs):
        start = time.perf_counter()
        sess.run(out.op, feed)
        times.append(time.perf_counter() - start)
  return float(np.median(times)) / count


def row_ops_per_gradient_op(model, k=16):
  """Ops of a row's backward pass per op of the gradient graph it reads."""
  from tf1hess.forward import engine  # pylint: disable=g-import-not-at-top

  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(tf.float32, [None, k])
    y = MODELS[model](x, _rng(model, k))
    (g,) = tf.gradients(y, x)
    before = len(graph.get_operations())
    tf.gradients(g * tf.ones_like(g), x)
    return (len(graph.get_operations()) - before) / len(engine.path_ops(x, [g]))


def measure_ops():
  """Prints the costs of ops that `dispatch` takes as measured, not fitted.

  `_SECONDS_PER_OP`: a tiny op in a straight-line graph. `_ROW_OPS`: the
  ops of a row per op of the gradient graph (the median over `MODELS`),
  each at the cost of a tiny op in a `tf.while_loop` (whose iterations
  overlap), in units of `_SECONDS_PER_OP`.
  """
  straight = np.median([_seconds_per_op(n, False) for n in (1, 256)])
  looped = np.median([_seconds_per_op(n, True) for n in (1, 256)])
  ratios = {model: row_ops_per_gradient_op(model) for model in MODELS}
  ratio = float(np.median(list(ratios.values())))
  print(
    "row ops per op of the gradient graph:",
    {m: round(v, 2) for m, v in ratios.items()},
  )
  print(f"seconds per op: straight-line {straight:.3g}, in a loop {looped:.3g}")
  print(f"_SECONDS_PER_OP = {straight:.2g}")
  print(f"_ROW_OPS = {ratio * looped / straight:.2g}")


def calibrate(quantity, runs):
  """Times CALIBRATION and prints the constants `fit` finds."""
  features = {"forward": [], "rows": []}
  times = {"forward": [], "rows": []}
  for case in CALIBRATION:
    model, shape = case.split(":")
    n, k = (int(v) for v in shape.split("x"))
    r = measure(model, n, k, quantity, runs)
    print(case, {e: (r[e], r["work"][e]) for e in features}, flush=True)
    for method in features:
      features[method].append(r["work"][method])
      times[method].append(r[method])
  constants = fit(features, times)
  print("seconds per flop, entry:", constants[:2])
  print(
    "rows' multipliers of flops, entries of products, other entries:",
    constants[2:],
  )
  # pylint: disable=protected-access
  current = np.array(
    [
      dispatch._SECONDS_PER_FLOP,
      dispatch._SECONDS_PER_ENTRY,
      dispatch._ROW_FLOPS,
      dispatch._ROW_ENTRIES,
      dispatch._ROW_OTHER_ENTRIES,
    ]
  )
  # pylint: enable=protected-access
  for name, c in (("fitted", constants), ("in dispatch", current)):
    p_f, p_r = predict(features, c)
    ratios = (p_r / p_f) / (np.array(times["rows"]) / times["forward"])
    print(
      f"estimated / measured ratio rows / forward, {name} constants:"
      f" {ratios.min():.2f}x ({CALIBRATION[ratios.argmin()]}) to"
      f" {ratios.max():.2f}x ({CALIBRATION[ratios.argmax()]})"
    )
  return constants


def _ms(seconds):
  return "—" if seconds is None else f"{1e3 * seconds:.3g}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  tf.compat.v1.disable_eager_execution()
  if _MEASURE_OPS.value:
    measure_ops()
    return
  if _CALIBRATE.value:
    calibrate(_QUANTITY.value, _RUNS.value)
    return
  cases = ALL if _CASES.value == ["all"] else _CASES.value
  print(
    "| model | N x K | rows ms | forward ms | estimated rows / forward ms |"
    " auto picks | auto ms | faster or within 15% |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for case in cases:
    model, shape = case.split(":")
    n, k = (int(v) for v in shape.split("x"))
    r = measure(model, n, k, _QUANTITY.value, _RUNS.value, _STATIC_BATCH.value)
    best = min(r["rows"], r.get("forward", np.inf))
    picked = r.get(r["picked"], r["rows"])
    est = r["estimates"]
    print(
      f"| {model} | {n}x{k} | {_ms(r['rows'])} | {_ms(r.get('forward'))} |"
      f" {_ms(est.get('rows'))} / {_ms(est.get('forward'))} |"
      f" {r['picked']} | {_ms(r['auto'])} |"
      f" {'yes' if picked <= 1.15 * best else 'NO'}"
      f" ({picked / best:.2f}x) |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
