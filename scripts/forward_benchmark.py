r"""Times the forward engine against the rows, TensorFlow's tapes and JAX.

For each model (a DeepXDE-style tanh MLP 3 x 64, a residual MLP with layer
normalization, a Gaussian-mixture log-density) and shape N x K, every method
computes the same per-sample quantity (full Hessians `(N, K, K)` or
Laplacians `(N,)`) of the same function, with the same float32 weights, at
the same inputs, in one process. Each output is checked against the rows of
tf1hess (`method="while_loop"`) before timing; the time is the median of
`--runs` runs after one warm-up run, the methods of a case taking turns
(in an order that turns from run to run).

  python scripts/forward_benchmark.py --table_md=/tmp/forward.md
  python scripts/forward_benchmark.py --tiny  # seconds: tiny shapes
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

import tf1hess

_CASES = flags.DEFINE_list(
  "cases",
  [
    "fnn_3x64:4096x10",
    "fnn_3x64:1024x64",
    "residual_ln:1024x16",
    "residual_ln:256x64",
    "mixture:256x16",
    "mixture:256x64",
  ],
  "model:NxK cases (models: see MODELS).",
)
_QUANTITIES = flags.DEFINE_list(
  "quantities", ["hessian", "laplacian"], "hessian and/or laplacian."
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs.", lower_bound=1)
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes, 2 runs.")
_TABLE_MD = flags.DEFINE_string("table_md", None, "Markdown table path.")

MODELS = {
  "fnn_3x64": "DeepXDE FNN: 3 tanh layers of 64 units, linear read-out",
  "residual_ln": "residual MLP: 2 blocks h + W softplus(layernorm(h)), 32 "
  "units, tanh read-out",
  "mixture": "log-density of a 10-component Gaussian mixture",
}


def weights(model, k, seed=0):
  """float32 weights of `model` for K features."""
  rng = np.random.default_rng([seed, k, len(model)])

  def dense(a, b):
    return (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)

  def bias(b):
    return (0.1 * rng.normal(size=(b,))).astype(np.float32)

  if model == "fnn_3x64":
    sizes = [k, 64, 64, 64, 1]
    return {f"w{i}": dense(sizes[i], sizes[i + 1]) for i in range(4)} | {
      f"b{i}": bias(sizes[i + 1]) for i in range(4)
    }
  if model == "residual_ln":
    return {
      "w_in": dense(k, 32),
      "w0": dense(32, 32),
      "w1": dense(32, 32),
      "v": rng.normal(size=(32,)).astype(np.float32),
    }
  if model == "mixture":
    return {
      "mu": rng.normal(size=(10, k)).astype(np.float32),
      "log_s": (0.2 * rng.normal(size=(10,))).astype(np.float32),
      "log_w": np.log(rng.dirichlet(np.ones(10))).astype(np.float32),
    }
  raise ValueError(f"`cases` names an unknown model {model!r}.")


def model_fn(model, w, np_like):
  """The per-sample outputs of `model`, written once for TF and for JAX.

  Args:
    model: a key of `MODELS`.
    w: its weights.
    np_like: `"tf"` (batch `(N, K)` -> `(N,)`) or `"jax"` (one sample `(K,)`
      -> `()`, to be vmapped).
  """
  if np_like == "tf":
    m = {
      "tanh": tf.tanh,
      "softplus": tf.nn.softplus,
      "mean": lambda a: tf.reduce_mean(a, -1, keepdims=True),
      "rsqrt": tf.math.rsqrt,
      "lse": lambda a: tf.reduce_logsumexp(a, -1),
      "sum": lambda a: tf.reduce_sum(a, -1),
      "c": tf.constant,
      "exp": tf.exp,
    }
  else:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    m = {
      "tanh": jnp.tanh,
      "softplus": jax.nn.softplus,
      "mean": lambda a: jnp.mean(a, -1, keepdims=True),
      "rsqrt": jax.lax.rsqrt,
      "lse": lambda a: jax.nn.logsumexp(a, -1),
      "sum": lambda a: jnp.sum(a, -1),
      "c": jnp.asarray,
      "exp": jnp.exp,
    }

  def consts():
    # Built at each call: TF constants belong to the graph being built.
    return {key: m["c"](value) for key, value in w.items()}

  def fnn(x):
    c = consts()
    h = x
    for i in range(3):
      h = m["tanh"](h @ c[f"w{i}"] + c[f"b{i}"])
    return m["sum"](h @ c["w3"] + c["b3"])

  def residual(x):
    c = consts()
    h = x @ c["w_in"]
    for i in range(2):
      centered = h - m["mean"](h)
      normed = centered * m["rsqrt"](m["mean"](centered * centered) + 1e-3)
      h = h + m["softplus"](normed) @ c[f"w{i}"]
    return m["sum"](m["tanh"](h) * c["v"])

  def mixture(x):
    c = consts()
    k = x.shape[-1]
    d = (x[..., None, :] - c["mu"]) * m["exp"](-c["log_s"])[:, None]
    quad = m["sum"](d * d)
    return m["lse"](c["log_w"] - 0.5 * quad - k * c["log_s"])

  return {"fnn_3x64": fnn, "residual_ln": residual, "mixture": mixture}[model]


def _graph_runner(build, fn, x_val):
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, x_val.shape[1]])
    out = build(fn(x), x)
  sess = tf.compat.v1.Session(graph=graph)
  return (
    lambda: sess.run(out.op, {x: x_val}),
    lambda: sess.run(out, {x: x_val}),
  )


def _tape_runner(quantity, fn, x_val):
  def hessians(x):
    with tf.GradientTape() as outer:
      outer.watch(x)
      with tf.GradientTape() as inner:
        inner.watch(x)
        y = fn(x)
      g = inner.gradient(y, x)
    return outer.batch_jacobian(g, x)

  def compute(x):
    h = hessians(x)
    return tf.linalg.trace(h) if quantity == "laplacian" else h

  f = tf.function(compute, autograph=False)
  x = tf.constant(x_val)
  return lambda: f(x), lambda: f(x).numpy()


def _jax_runner(quantity, fn, x_val, use_folx=False):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  if use_folx:
    import folx  # pylint: disable=import-outside-toplevel

    one = lambda v: folx.forward_laplacian(fn)(v).laplacian  # noqa: E731
  elif quantity == "laplacian":
    one = lambda v: jnp.trace(jax.hessian(fn)(v))  # noqa: E731
  else:
    one = jax.hessian(fn)
  f = jax.jit(jax.vmap(one))
  x = jnp.asarray(x_val)
  return lambda: f(x).block_until_ready(), lambda: np.asarray(f(x))


def methods(quantity):
  """name -> `(fn, x_val) -> (run, value)` for `quantity`."""
  op = (
    tf1hess.batch_laplacians
    if quantity == "laplacian"
    else tf1hess.batch_hessians
  )

  def tf1hess_method(**kwargs):
    return lambda fn, x_val: _graph_runner(
      lambda y, x: op(y, x, **kwargs), fn, x_val
    )

  out = {
    "tf1hess default": tf1hess_method(),
    "tf1hess method='forward'": tf1hess_method(method="forward"),
    "tf1hess method='while_loop'": tf1hess_method(method="while_loop"),
    "tape.batch_jacobian (tf.function)": lambda fn, x_val: _tape_runner(
      quantity, fn, x_val
    ),
  }
  return out


def jax_methods(quantity):
  """JAX peers: `jit(vmap(hessian))`, its trace, and folx's Laplacian."""
  try:
    import jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return {}
  label = (
    "JAX jit(vmap(trace(hessian)))"
    if quantity == "laplacian"
    else ("JAX jit(vmap(hessian))")
  )
  out = {label: lambda fn, x_val: _jax_runner(quantity, fn, x_val)}
  if quantity == "laplacian":
    try:
      import folx  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      return out
    out["folx forward_laplacian (jit, vmap)"] = lambda fn, x_val: _jax_runner(
      quantity, fn, x_val, use_folx=True
    )
  return out


def run_case(model, n, k, quantity, repeats):
  """Times every method on one case; returns `{method: seconds}`."""
  w = weights(model, k)
  x_val = np.random.default_rng([n, k]).normal(size=(n, k)).astype(np.float32)
  runners = {}
  for name, make in methods(quantity).items():
    runners[name] = make(model_fn(model, w, "tf"), x_val)
  for name, make in jax_methods(quantity).items():
    runners[name] = make(model_fn(model, w, "jax"), x_val)
  reference = runners["tf1hess method='while_loop'"][1]()
  scale = np.abs(reference).max() + 1e-30
  for name, (_, value) in runners.items():
    err = np.abs(np.asarray(value()) - reference).max() / scale
    if err > 1e-3:
      raise AssertionError(f"{name} differs from the rows by {err:.2e}.")
  for run, _ in runners.values():
    run()  # Warm-up: a session builds an executor per fetch.
  times = {name: [] for name in runners}
  names = list(runners)
  for i in range(repeats):
    # The order turns each run: no method always follows JAX's threads.
    for name in names[i % len(names) :] + names[: i % len(names)]:
      run = runners[name][0]
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def markdown(results):
  """A table per quantity: seconds and the ratio to each method."""
  lines = []
  for quantity in sorted({q for _, _, q in results}):
    lines += [f"### {quantity}", ""]
    cases = [(c, s) for (c, s, q) in results if q == quantity]
    names = list(results[cases[0] + (quantity,)])
    lines.append("| case | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for case, shape in cases:
      row = results[(case, shape, quantity)]
      default = row["tf1hess default"]
      cells = [
        f"{row[m] * 1e3:.3g} ms ({row[m] / default:.2f}x)" for m in names
      ]
      lines.append(f"| {case} {shape} | " + " | ".join(cells) + " |")
    lines.append("")
  lines.append(
    "Each cell: median time, and in parentheses that time divided by the "
    "default's (above 1: slower than tf1hess's default)."
  )
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  cases = ["fnn_3x64:16x3", "mixture:8x4"] if _TINY.value else _CASES.value
  repeats = 2 if _TINY.value else _RUNS.value
  results = {}
  for spec in cases:
    model, shape = spec.split(":")
    n, k = (int(v) for v in shape.split("x"))
    for quantity in _QUANTITIES.value:
      logging.info("%s %s %s", model, shape, quantity)
      results[(model, shape, quantity)] = run_case(
        model, n, k, quantity, repeats
      )
  table = markdown(results)
  print(table)
  if _TABLE_MD.value:
    tmp = _TABLE_MD.value + ".tmp"
    with open(tmp, "w") as f:
      f.write(table)
    os.replace(tmp, _TABLE_MD.value)


if __name__ == "__main__":
  app.run(main)
