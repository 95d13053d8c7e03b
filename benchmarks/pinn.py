"""`tf1hess.Derivatives` and `tf1hess.dde` against DeepXDE's `dde.grad`.

For one input dimension d, one graph holds DeepXDE's
`FNN([d] + [64] * 3 + [1], "tanh", "Glorot normal")` (backend
`tensorflow.compat.v1`, which the caller has selected before importing
TensorFlow: see `scripts/pinn_benchmark.py`) and, built on its output, the
per-sample full Hessian `(N, d, d)` and Laplacian `(N, 1)` of every method:

* `dde.grad`: `dde.grad.hessian(y, x, i=i, j=j)` for every entry needed (one
  gradient, then one backward pass per row, as DeepXDE builds them);
* `tf1hess.dde`: the same calls on the drop-in (entries, row by row);
* `tf1hess.Derivatives`: `hessian()` and `laplacian()` of the cache, by
  default (its own rows, up to `ROWS_MAX_FEATURES` features);
* `Derivatives(method="auto")`: the same through `tf1hess.batch_hessians`
  and `tf1hess.batch_hessian_diagonals` (the package's row machinery, and
  whatever engine those ops use);
* JAX, where `jax` and `folx` are installed (the `bench` extra): the same
  network with the same weights, `jit(vmap(hessian))` and folx's
  `forward_laplacian`.

A third quantity, `training`, is what a physics-informed network trains by:
the gradient, with respect to the network's weights, of the Poisson residual
loss `mean((Δu + f)^2)` (`f = sum_i sin(π x_i)`), built on each method's
Laplacian (JAX: `jit(grad)` of the loss on folx's).

Every method's result is checked against DeepXDE's before timing. The time
is the median of `runs` session runs after one warm-up run, the methods of a
case taking turns run by run (interleaved), in one process and one session
on the same weights and inputs, so that a busy machine slows them alike.
The real DeepXDE network (variables, its `training` placeholder) is what
this comparison is about; `scripts/benchmark.py --suite=forward` times
`dde.grad.hessian` on the benchmark's own `fnn_3x64` beside the other peers.
"""

import importlib.util
import time

import numpy as np
import tensorflow as tf

import tf1hess
import tf1hess.dde

QUANTITIES = ("hessian", "laplacian", "training")
JAX = "JAX"
# The methods built in the TensorFlow graph, and all of them.
TENSORFLOW_METHODS = (
  "dde.grad",
  "tf1hess.dde",
  "tf1hess.Derivatives",
  'Derivatives(method="auto")',
)
METHODS = (*TENSORFLOW_METHODS, JAX)
# The methods of `compare_space_time` but JAX.
SPACE_TIME_METHODS = (
  "tf.gradients",
  "tf1hess.Derivatives",
  "Derivatives after an entry",
)
SPACE_TIME_PEERS = ("tf.gradients", "Derivatives after an entry", JAX)
# The methods of `compare_orders` but JAX, and the one the peers are to.
ORDERS_OURS = "tf1hess.batch_derivatives"
ORDERS_METHODS = ("tf.gradients", ORDERS_OURS)


def _source(x, d, sin):
  """The right-hand side `f` of the residual loss, `(N, 1)`, by `sin`
  (`tf.sin` or `jnp.sin`) of the points `x` `(N, d)`."""
  return sum(sin(np.pi * x[:, i : i + 1]) for i in range(d))


def _entries(hessian, y, x, d, quantity):
  """The full Hessian `(N, d, d)` or Laplacian `(N, 1)` from entries."""
  if quantity == "laplacian":
    return sum(hessian(y, x, i=k, j=k) for k in range(d))
  rows = [
    tf.concat([hessian(y, x, i=i, j=j) for j in range(d)], 1) for i in range(d)
  ]
  return tf.stack(rows, 1)


def _weight_gradient(laplacian, x, d, weights):
  """The gradient of the residual loss with respect to `weights`, flat."""
  loss = tf.reduce_mean(tf.square(laplacian + _source(x, d, tf.sin)))
  grads = tf.gradients(loss, weights, unconnected_gradients="zero")
  return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)


def _tanh_network(params, h, tanh):
  """The tanh network of `params` (kernels and biases in turn) on `h`, by
  `tanh` (`tf.tanh` on a batch, `jnp.tanh` on one point)."""
  for layer in range(0, len(params), 2):
    h = h @ params[layer] + params[layer + 1]
    if layer + 2 < len(params):
      h = tanh(h)
  return h


def _jax_ready():
  return all(importlib.util.find_spec(m) for m in ("jax", "folx"))


def _jax_functions(weights, d):
  """The quantities of JAX on the network of `weights` (the values of the
  kernels and biases in order), or `None` without `jax` and `folx`."""
  if not _jax_ready():
    return None
  # pylint: disable=g-import-not-at-top
  import folx
  import jax
  import jax.numpy as jnp

  params = [jnp.asarray(w) for w in weights]

  def net(params, point):
    return _tanh_network(params, point, jnp.tanh)[0]

  def laplacians(params, points):
    def one(point):
      return folx.forward_laplacian(lambda p: net(params, p))(point).laplacian

    return jax.vmap(one)(points)[:, None]

  def loss(params, points):
    source = _source(points, d, jnp.sin)
    return jnp.mean(jnp.square(laplacians(params, points) + source))

  def flat_gradient(points):
    grads = jax.grad(loss)(params, points)
    return jnp.concatenate([jnp.ravel(g) for g in grads])

  return {
    "hessian": jax.jit(jax.vmap(jax.hessian(lambda p: net(params, p)))),
    "laplacian": jax.jit(lambda points: laplacians(params, points)),
    "training": jax.jit(flat_gradient),
  }


def compare(d, batch_size, runs, seed=0):
  """Times every method on one input dimension `d`.

  Args:
    d: `int`, the input dimension of the network.
    batch_size: `int`, points per run.
    runs: `int`, timed runs per method and quantity.
    seed: `int`, seed of the weights and points.

  Returns:
    A list of dicts `{"d", "quantity", "method", "ms", "min_ms",
    "max_abs_diff"}`, one per quantity and method: the median and the
    fastest run time.
  """
  # DeepXDE's tensorflow.compat.v1 backend disables TF2 behavior when
  # imported: only here, not when this module is imported.
  import deepxde as dde  # pylint: disable=g-import-not-at-top

  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.set_random_seed(seed)
    net = dde.nn.FNN([d] + [64] * 3 + [1], "tanh", "Glorot normal")
    net.build()
    x, y = net.inputs, net.outputs
    weights = tf.compat.v1.trainable_variables()
    fetches = {}
    for quantity in QUANTITIES:
      dde.grad.clear()
      tf1hess.dde.clear()
      entry = "laplacian" if quantity == "training" else quantity
      fetches[quantity, "dde.grad"] = _entries(dde.grad.hessian, y, x, d, entry)
      fetches[quantity, "tf1hess.dde"] = _entries(
        tf1hess.dde.hessian, y, x, d, entry
      )
      for method, cache in (
        ("tf1hess.Derivatives", tf1hess.Derivatives(y, x)),
        ('Derivatives(method="auto")', tf1hess.Derivatives(y, x, "auto")),
      ):
        fetches[quantity, method] = (
          cache.hessian() if quantity == "hessian" else cache.laplacian()
        )
      if quantity == "training":
        for method in TENSORFLOW_METHODS:
          fetches[quantity, method] = _weight_gradient(
            fetches[quantity, method], x, d, weights
          )
    init = tf.compat.v1.global_variables_initializer()
  points = np.random.default_rng(seed).uniform(-1, 1, (batch_size, d))
  points = points.astype(np.float32)
  feed = {x: points, net.training: False}
  rows = []
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(init)
    jax_functions = _jax_functions(sess.run(weights), d)
    methods = METHODS if jax_functions else TENSORFLOW_METHODS

    def run(quantity, method):
      if method == JAX:
        return np.asarray(jax_functions[quantity](points).block_until_ready())
      return sess.run(fetches[quantity, method], feed)

    for quantity in QUANTITIES:
      rows += _timed(
        d, quantity, lambda m, q=quantity: run(q, m), methods, runs
      )
  return rows


def _timed(d, quantity, run, methods, runs):
  """The rows of `compare`: each of `methods` run (`run(method)` returns
  its value) once to warm up and be checked against the first's, then
  `runs` times in turns."""
  reference = run(methods[0])
  times = {}
  diffs = {}
  for method in methods:
    out = run(method)  # warm-up (JAX: compiles)
    diffs[method] = float(np.max(np.abs(out - reference)))
    times[method] = []
  for _ in range(runs):
    for method in methods:
      start = time.perf_counter()
      run(method)
      times[method].append(time.perf_counter() - start)
  return [
    {
      "d": d,
      "quantity": quantity,
      "method": method,
      "ms": 1e3 * float(np.median(times[method])),
      "min_ms": 1e3 * float(np.min(times[method])),
      "max_abs_diff": diffs[method],
    }
    for method in methods
  ]


def _glorot_weights(sizes, rng):
  """Kernels (Glorot normal) and zero biases, in turn, of a network of
  layers of `sizes`, float32."""
  weights = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    scale = np.sqrt(2.0 / (fan_in + fan_out))
    weights += [
      (scale * rng.normal(size=(fan_in, fan_out))).astype(np.float32),
      np.zeros(fan_out, np.float32),
    ]
  return weights


def compare_space_time(d, batch_size, runs, seed=0):
  """Times the joint Hessian of a network of space and time placeholders.

  The hand-written physics-informed network of TF1 code: `x` `(N, d)` and
  `t` `(N, 1)` placeholders, `u` a tanh network `[d + 1] + [64] * 3 + [1]`
  (Glorot-normal weights of `seed`, in variables) of their concatenation,
  and its per-sample Hessian over `[x, t]`, `(N, d + 1, d + 1)` with the
  cross entries `u_xt`, by:

  * `tf.gradients`: the textbook code, one backward pass per row of the
    gradient over `[x, t]` (as `dde.grad.hessian` builds them);
  * `tf1hess.Derivatives`: `Derivatives(u, [x, t]).hessian()` asked first
    (the forward engine over a copy of the network that reads `[x, t]` as
    one tensor, where it applies);
  * `Derivatives after an entry`: the same asked after an entry (`u_xt`),
    which stacks the cache's own rows;
  * JAX, where installed: `jit(vmap(hessian))` of the same network on the
    concatenated points.

  Args:
    d: `int`, the features of `x`.
    batch_size, runs, seed: as in `compare`.

  Returns:
    The rows of `compare`, of quantity "joint hessian".
  """
  rng = np.random.default_rng(seed)
  weights = _glorot_weights([d + 1] + [64] * 3 + [1], rng)
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, d], name="x")
    t = tf.compat.v1.placeholder(tf.float32, [None, 1], name="t")
    params = [tf.compat.v1.Variable(w) for w in weights]
    u = _tanh_network(params, tf.concat([x, t], 1), tf.tanh)
    gradient = tf.concat(tf.gradients(u, [x, t]), 1)
    rows = [
      tf.concat(tf.gradients(gradient[:, i], [x, t]), 1) for i in range(d + 1)
    ]
    entry_first = tf1hess.Derivatives(u, [x, t])
    entry_first.hessian(0, d)
    fetches = {
      "tf.gradients": tf.stack(rows, 1),
      "tf1hess.Derivatives": tf1hess.Derivatives(u, [x, t]).hessian(),
      "Derivatives after an entry": entry_first.hessian(),
    }
    init = tf.compat.v1.global_variables_initializer()
  points = rng.uniform(-1, 1, (batch_size, d + 1)).astype(np.float32)
  feed = {x: points[:, :d], t: points[:, d:]}
  methods = SPACE_TIME_METHODS
  if _jax_ready():
    # pylint: disable=g-import-not-at-top
    import jax

    jax_hessian = jax.jit(jax.vmap(jax.hessian(_jax_network(weights))))
    methods += (JAX,)
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(init)

    def run(method):
      if method == JAX:
        return np.asarray(jax_hessian(points).block_until_ready())
      return sess.run(fetches[method], feed)

    return _timed(d, "joint hessian", run, methods, runs)


def _jax_network(weights):
  """The tanh network of `weights` on one point, a JAX function (needs
  `jax`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  params = [jnp.asarray(w) for w in weights]
  return lambda point: _tanh_network(params, point, jnp.tanh)[0]


def compare_orders(d, order, batch_size, runs, seed=0):
  """Times the per-sample derivatives of `order` >= 3 of a tanh network.

  `u` a tanh network `[d] + [64] * 3 + [1]` (Glorot-normal weights of
  `seed`, in variables) of `x` `(N, d)`, and its tensor of derivatives
  `(N,) + (d,) * order` (KdV's `u_xxx`, a biharmonic's `u_xxyy` are entries
  of it), by:

  * `tf.gradients`: the textbook code, one backward pass per entry of the
    level below, level by level (`1 + d + ... + d^(order - 1)` passes);
  * `tf1hess.batch_derivatives` (the default method);
  * JAX, where installed: `jit(vmap(...))` of `jacfwd` nested `order - 2`
    times around `hessian`.

  Args:
    d: `int`, the features of `x`.
    order: `int` >= 3.
    batch_size, runs, seed: as in `compare`.

  Returns:
    The rows of `compare`, of quantity "order `order`".
  """
  rng = np.random.default_rng(seed)
  weights = _glorot_weights([d] + [64] * 3 + [1], rng)
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, d], name="x")
    params = [tf.compat.v1.Variable(w) for w in weights]
    u = _tanh_network(params, x, tf.tanh)
    level = tf.gradients(u, x)[0]  # (N, d ** (l - 1)), l = 1
    for _ in range(order - 1):
      rows = [tf.gradients(level[:, i], x)[0] for i in range(level.shape[1])]
      level = tf.reshape(tf.stack(rows, 1), [-1, len(rows) * d])
    fetches = {
      "tf.gradients": tf.reshape(level, [-1] + [d] * order),
      ORDERS_OURS: tf1hess.batch_derivatives(u, x, order),
    }
    init = tf.compat.v1.global_variables_initializer()
  points = rng.uniform(-1, 1, (batch_size, d)).astype(np.float32)
  methods = ORDERS_METHODS
  if _jax_ready():
    # pylint: disable=g-import-not-at-top
    import jax

    derivatives = jax.hessian(_jax_network(weights))
    for _ in range(order - 2):
      derivatives = jax.jacfwd(derivatives)
    jax_derivatives = jax.jit(jax.vmap(derivatives))
    methods += (JAX,)
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(init)

    def run(method):
      if method == JAX:
        return np.asarray(jax_derivatives(points).block_until_ready())
      return sess.run(fetches[method], {x: points})

    return _timed(d, f"order {order}", run, methods, runs)


def format_table(
  rows, methods=METHODS, peers=("dde.grad", JAX), ours="tf1hess.Derivatives"
):
  """A Markdown table: one line per (d, quantity), ratios to `peers`.

  Times of `methods` are "median (fastest)" in ms ("n/a": JAX not
  installed); the ratios are each peer's time over `ours`' for the medians
  and (in parentheses) the fastest runs, which a busy machine disturbs
  less. `compare_space_time`'s rows take `SPACE_TIME_METHODS + (JAX,)` and
  `SPACE_TIME_PEERS`; `compare_orders`' take `ORDERS_METHODS + (JAX,)`,
  peers `("tf.gradients", JAX)` and `ours=ORDERS_OURS`.
  """
  short = ours.split(".")[-1]
  ratios = " | ".join(f"{peer} / {short}" for peer in peers)
  lines = [
    "| d | quantity | " + " | ".join(f"{m} (ms)" for m in methods) + " | "
    f"{ratios} |",
    "|---" * (len(methods) + len(peers) + 2) + "|",
  ]
  cases = {}
  for row in rows:
    case = cases.setdefault((row["d"], row["quantity"]), {})
    case[row["method"]] = (row["ms"], row["min_ms"])
  for (d, quantity), ms in cases.items():
    mine = ms[ours]

    def ratio(method, ms=ms, mine=mine):
      if method not in ms:
        return "n/a"
      theirs = ms[method]
      return f"{theirs[0] / mine[0]:.2f}x ({theirs[1] / mine[1]:.2f}x)"

    times = " | ".join(
      f"{ms[m][0]:.1f} ({ms[m][1]:.1f})" if m in ms else "n/a" for m in methods
    )
    ratios = " | ".join(ratio(peer) for peer in peers)
    lines.append(f"| {d} | {quantity} | {times} | {ratios} |")
  return "\n".join(lines)
