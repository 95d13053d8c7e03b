r"""Times tf1hess against TensorFlow's own per-sample Hessians and JAX.

For each function (a tanh MLP, a quadratic form, a deeper softplus network)
and shape N x K, every method computes the per-sample Hessians `(N, K, K)` of
the same function, with the same weights, at the same inputs, in one process.
Each method's output is checked against tf1hess's default before it is timed;
the time is the median of `--repeats` runs (`--fast_repeats` for methods
whose runs take under 20 ms, which vary more) after `--warmup` runs, the runs of
all methods of a case taking turns so that a busy machine slows them alike.
Peak memory is measured separately, one fresh process per method and case.
Two rows compute no Hessians: the time a TF1 session run and a jitted JAX
call take to write an output of that size, the floor of each framework.

  python scripts/benchmark.py --output_md=BENCHMARKS.md \
      --output_png=benchmarks.png --output_json=benchmarks.json

  python scripts/benchmark.py --quick  # seconds: tiny shapes, no memory
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's pooling CPU allocator; see docs/speed.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import ctypes
import json
import platform
import re
import subprocess
import sys
import time
import zlib

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from tensorflow.python.ops.parallel_for import gradients as pfor_gradients  # pylint: disable=g-direct-tensorflow-import
import tf1hess
from tf1hess import _cli
from tf1hess import plan as plan_lib
from tf1hess import _files

_DEFAULT_SHAPES = ["16384x16", "4096x64", "1024x256", "256x1024", "256x16"]
_QUICK_SHAPES = ["32x4", "8x16"]

_SHAPES = flags.DEFINE_list(
  "shapes", _DEFAULT_SHAPES, "Shapes NxK of the input batch."
)
_FUNCTIONS = flags.DEFINE_list(
  "functions",
  ["tanh_mlp", "quadratic", "softplus_net"],
  "Functions to differentiate (see FUNCTIONS).",
)
_METHODS = flags.DEFINE_list(
  "methods",
  None,
  "Methods to time (see METHODS; default: all, JAX when installed). "
  "`tf1hess_pfor_chunk<C>` vectorizes C rows at a time.",
)
_CHUNK_CASES = flags.DEFINE_list(
  "chunk_cases",
  ["softplus_net:16384x16:4/1", "tanh_mlp:256x1024:128/16"],
  "function:NxK:C1/C2/... cases that also time tf1hess_pfor_chunk<C> for "
  "each chunk size C (the memory/speed trade).",
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 5, "Timed runs per method and case.", lower_bound=1
)
_FAST_REPEATS = flags.DEFINE_integer(
  "fast_repeats",
  51,
  "Timed runs of a method whose runs take under 20 ms: short runs vary "
  "more from one to the next.",
  lower_bound=1,
)
_WARMUP = flags.DEFINE_integer(
  "warmup", 1, "Untimed runs before timing.", lower_bound=1
)
_MAX_SECONDS = flags.DEFINE_float(
  "max_seconds",
  60.0,
  "Time budget of the timed runs of one method in one case: slow methods "
  "get fewer runs (at least one).",
)
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Hidden units per layer.")
_DEPTH = flags.DEFINE_integer(
  "depth", 3, "Hidden layers of the softplus network.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs and weights.")
_MEASURE_MEMORY = flags.DEFINE_bool(
  "measure_memory", True, "Measure peak memory (one process per case)."
)
_HESSIANS_MAX_BYTES = flags.DEFINE_integer(
  "tf_hessians_max_bytes",
  1 << 30,
  "Only run tf.hessians where its (N*K)^2 output fits in this many bytes.",
)
_QUICK = flags.DEFINE_bool(
  "quick",
  False,
  "Seconds-long run: shapes 32x4 and 8x16, 2 repeats, no memory, no chunks.",
)
_OUTPUT_MD = flags.DEFINE_string("output_md", None, "Markdown report.")
_OUTPUT_PNG = flags.DEFINE_string("output_png", None, "PNG plot.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Raw results.")
_MEMORY_PROBE = flags.DEFINE_string(
  "memory_probe",
  None,
  "Internal: `function:NxK:method`; measure that case's peak memory in this "
  "process and print it.",
)

_ALL_FLAGS = (
  _SHAPES,
  _FUNCTIONS,
  _METHODS,
  _CHUNK_CASES,
  _REPEATS,
  _FAST_REPEATS,
  _WARMUP,
  _MAX_SECONDS,
  _HIDDEN,
  _DEPTH,
  _SEED,
  _MEASURE_MEMORY,
  _HESSIANS_MAX_BYTES,
  _QUICK,
  _OUTPUT_MD,
  _OUTPUT_PNG,
  _OUTPUT_JSON,
)

_PAUSE = 0.05  # Seconds between timed runs, for the previous one's threads.
_FAST_RUN = 0.02  # Seconds: methods faster than this get `fast_repeats` runs.
_RTOL = 1e-3  # Relative to the largest entry of the reference Hessians.
_PROBE_TAG = "MEMORY_PROBE "


class SkipMethod(Exception):
  """The method does not apply to this case (e.g. it cannot fit in memory)."""


# ---------------------------------------------------------------- functions


def _weights(name, k, hidden, depth, seed):
  """float32 weights of function `name` for K features."""
  rng = np.random.default_rng([seed, k, zlib.crc32(name.encode())])

  def dense(a, b):
    return (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)

  if name == "tanh_mlp":
    return {
      "w1": dense(k, hidden),
      "b1": rng.normal(size=(hidden,)).astype(np.float32) * 0.1,
      "w2": rng.normal(size=(hidden,)).astype(np.float32),
    }
  if name == "quadratic":
    return {"a": dense(k, k)}
  if name == "softplus_net":
    sizes = [k] + [hidden] * depth
    return {f"w{i}": dense(sizes[i], sizes[i + 1]) for i in range(depth)} | {
      "v": rng.normal(size=(hidden,)).astype(np.float32)
    }
  raise ValueError(f"`functions` has an unknown name {name!r}.")


def tf_model(name, w):
  """The per-sample outputs `(N,)` of function `name` as TF ops of `x`."""

  def fn(x):
    c = {key: tf.constant(value) for key, value in w.items()}
    if name == "tanh_mlp":
      return tf.reduce_sum(
        tf.tanh(tf.matmul(x, c["w1"]) + c["b1"]) * c["w2"], axis=1
      )
    if name == "quadratic":
      return tf.reduce_sum(x * tf.matmul(x, c["a"]), axis=1)
    h = x
    for i in range(len(w) - 1):
      h = tf.nn.softplus(tf.matmul(h, c[f"w{i}"]))
    return tf.reduce_sum(h * c["v"], axis=1)

  return fn


def jax_model(name, w):
  """The same function for one sample `(K,) -> ()`, in jax.numpy."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  c = {key: jnp.asarray(value) for key, value in w.items()}

  def fn(x):
    if name == "tanh_mlp":
      return jnp.sum(jnp.tanh(x @ c["w1"] + c["b1"]) * c["w2"])
    if name == "quadratic":
      return x @ c["a"] @ x
    h = x
    for i in range(len(w) - 1):
      h = jnp.logaddexp(h @ c[f"w{i}"], 0.0)
    return jnp.sum(h * c["v"])

  return fn


FUNCTIONS = {
  "tanh_mlp": "tanh MLP: w2 . tanh(x W1 + b1), H hidden units",
  "quadratic": "quadratic form: x . (x A)",
  "softplus_net": "softplus network: `depth` layers of H units",
}


class Case:
  """One function at one shape: weights, inputs and the TF/JAX functions."""

  def __init__(self, function, shape, hidden=64, depth=3, seed=0):
    self.function = function
    self.n, self.k = parse_shape(shape)
    self.shape = shape
    self.weights = _weights(function, self.k, hidden, depth, seed)
    rng = np.random.default_rng([seed, self.n, self.k])
    self.x = rng.normal(size=(self.n, self.k)).astype(np.float32)
    self.tf_fn = tf_model(function, self.weights)

  def jax_fn(self):
    return jax_model(self.function, self.weights)


def parse_chunk_cases(specs):
  """`["f:NxK:C1/C2"]` -> `{(f, "NxK"): [C1, C2]}`."""
  out = {}
  for spec in specs:
    match = re.fullmatch(r"(\w+):(\d+x\d+):(\d+(?:/\d+)*)", spec.strip())
    if not match or match.group(1) not in FUNCTIONS:
      raise ValueError(
        "`chunk_cases` entries must be like tanh_mlp:256x1024:128/16 (a "
        f"function, a shape, chunk sizes); saw {spec!r}."
      )
    sizes = [int(c) for c in match.group(3).split("/")]
    out[(match.group(1), match.group(2))] = sizes
  return out


def parse_shape(shape):
  match = re.fullmatch(r"(\d+)x(\d+)", shape.strip())
  if not match:
    raise ValueError(f"`shapes` must be like 256x16 (N x K); saw {shape!r}.")
  return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------ methods


class GraphRunner:
  """A TF1 graph with a `(None, K)` placeholder, run in its own session.

  `run()` executes the op that produces the Hessians without fetching them
  (no copy to numpy); `value()` fetches them for the check.
  """

  def __init__(self, graph, x, out, x_val):
    self._sess = tf.compat.v1.Session(graph=graph)
    self._out = out
    self._feed = {x: x_val}

  def run(self):
    self._sess.run(self._out.op, self._feed)

  def warm_up_small(self):
    """One run on the first sample: builds the executor, allocates little."""
    ((x, x_val),) = self._feed.items()
    self._sess.run(self._out.op, {x: x_val[:1]})

  def value(self):
    return self._sess.run(self._out, self._feed)

  def close(self):
    self._sess.close()


def _identity(value):
  return value


class FunctionRunner:
  """A `tf.function` (or a jitted JAX function) called on the inputs."""

  def __init__(self, fn, x_val, block=None):
    self._fn = fn
    self._x = x_val
    self._block = block or _identity

  def run(self):
    self._block(self._fn(self._x))

  def warm_up_small(self):
    """On the first sample; JAX, which compiles per shape, compiles ahead."""
    if self._block is _identity:
      self._fn(self._x[:1])
    else:
      self._fn = self._fn.lower(self._x).compile()

  def value(self):
    return np.asarray(self._fn(self._x))

  def close(self):
    pass


def _graph_method(build, static_batch=False):
  """A method built in a graph from `build(y, x, case) -> (N, K, K)`."""

  def make(case):
    graph = tf.Graph()
    with graph.as_default():
      batch = case.n if static_batch else None
      x = tf.compat.v1.placeholder(tf.float32, [batch, case.k])
      out = build(case.tf_fn(x), x, case)
    return GraphRunner(graph, x, out, case.x)

  return make


def _tf1hess(**kwargs):
  return _graph_method(
    lambda y, x, case: tf1hess.batch_hessians(y, x, **kwargs)
  )


def _tf1hess_eager_function(case):
  fn = tf.function(
    lambda x: tf1hess.eager.batch_hessians(case.tf_fn, x),
    input_signature=[tf.TensorSpec([None, case.k], tf.float32)],
  )
  return FunctionRunner(fn, tf.constant(case.x))


def _tape_batch_jacobian(use_pfor):
  def build(y, x, case):
    del y  # The tapes record their own forward pass.
    with tf.GradientTape() as outer:
      outer.watch(x)
      with tf.GradientTape() as inner:
        inner.watch(x)
        y = case.tf_fn(x)
      g = inner.gradient(y, x)
    return outer.batch_jacobian(g, x, experimental_use_pfor=use_pfor)

  return _graph_method(build)


def _parallel_for_batch_jacobian(case):
  """`parallel_for.gradients.batch_jacobian` of the gradient, in a graph.

  It fails on a `None` batch with TF2's TensorShape (TensorFlow issue
  45539); it is then built the way users get it to work, with TF1's
  TensorShape (as after `tf.compat.v1.disable_v2_behavior()`).
  """

  def build(y, x, case):
    (g,) = tf.gradients(y, x)
    return pfor_gradients.batch_jacobian(g, x)

  try:
    return _graph_method(build)(case)
  except Exception as error:  # pylint: disable=broad-except
    failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
  v2_shapes = isinstance(tf.TensorShape([1])[0], int)
  tf.compat.v1.disable_v2_tensorshape()
  try:
    runner = _graph_method(build)(case)
  finally:
    if v2_shapes:
      tf.compat.v1.enable_v2_tensorshape()
  runner.note = (
    f"fails on a None batch with TF2 shapes ({failure}); timed when built "
    "with TF1 shapes (tf.compat.v1.disable_v2_tensorshape())"
  )
  return runner


def _tf_hessians_diagonal(case):
  nbytes = (case.n * case.k) ** 2 * 4
  if nbytes > _HESSIANS_MAX_BYTES.value:
    raise SkipMethod(
      f"its (N*K)^2 output needs {nbytes / 2**30:.0f} GiB "
      f"> --tf_hessians_max_bytes"
    )

  def build(y, x, case):
    full = tf.hessians(y, x)[0]  # (N, K, N, K)
    i = tf.range(tf.shape(x)[0])
    return tf.gather_nd(
      tf.transpose(full, [0, 2, 1, 3]), tf.stack([i, i], axis=1)
    )

  return _graph_method(build)(case)


def _forward_accumulator_vmap(case):
  @tf.function(input_signature=[tf.TensorSpec([None, case.k], tf.float32)])
  def fn(x):
    def hvp_row(e):
      tangent = tf.broadcast_to(e, tf.shape(x))
      with tf.autodiff.ForwardAccumulator(x, tangent) as acc:
        with tf.GradientTape() as tape:
          tape.watch(x)
          y = case.tf_fn(x)
        g = tape.gradient(y, x)
      return acc.jvp(g)

    rows = tf.vectorized_map(hvp_row, tf.eye(case.k, dtype=x.dtype))
    return tf.transpose(rows, [1, 0, 2])

  return FunctionRunner(fn, tf.constant(case.x))


def _jax_method(make):
  """A method that calls `jax.jit(make(jax, case))` on the inputs."""

  def build(case):
    try:
      import jax  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise SkipMethod("jax is not installed") from error
    return FunctionRunner(
      jax.jit(make(jax, case)),
      jax.numpy.asarray(case.x),
      block=lambda out: out.block_until_ready(),
    )

  return build


def _jax_vmap_hessian(jax, case):
  return jax.vmap(jax.hessian(case.jax_fn()))


def _tf1_output_floor(case):
  """Not a Hessian: a TF1 graph that only writes an `(N, K, K)` output."""
  fill = np.ones((case.k, case.k), np.float32)
  return _graph_method(
    lambda y, x, case: tf.broadcast_to(
      fill, tf.concat([tf.shape(x), [case.k]], axis=0)
    )
  )(case)


def _jax_output_floor(jax, case):
  """Not a Hessian: a JAX function that only writes an `(N, K, K)` output."""
  fill = jax.numpy.ones((case.k, case.k), jax.numpy.float32)
  return lambda x: jax.numpy.broadcast_to(fill, (x.shape[0],) + fill.shape)


METHODS = {
  "tf1hess_auto": _tf1hess(),
  "tf1hess_pfor": _tf1hess(method="pfor"),
  "tf1hess_while_loop": _tf1hess(method="while_loop"),
  "tf1hess_eager_function": _tf1hess_eager_function,
  "batch_jacobian_pfor": _tape_batch_jacobian(True),
  "batch_jacobian_while": _tape_batch_jacobian(False),
  "parallel_for_batch_jacobian": _parallel_for_batch_jacobian,
  "tf_hessians_diagonal": _tf_hessians_diagonal,
  "forward_accumulator_vmap": _forward_accumulator_vmap,
  "jax_jit_vmap_hessian": _jax_method(_jax_vmap_hessian),
  "tf1_output_floor": _tf1_output_floor,
  "jax_output_floor": _jax_method(_jax_output_floor),
}

# Not Hessian methods, and not checked: the least a TF1 session run (fed the
# batch like every graph method) and a jitted JAX call take to produce the
# `(N, K, K)` float32 output, a constant broadcast over the batch.
OUTPUT_FLOORS = ("tf1_output_floor", "jax_output_floor")

LABELS = {
  "tf1hess_auto": "tf1hess (default)",
  "tf1hess_pfor": "tf1hess method='pfor'",
  "tf1hess_while_loop": "tf1hess method='while_loop'",
  "tf1hess_eager_function": "tf1hess.eager in tf.function",
  "batch_jacobian_pfor": "tape.batch_jacobian (pfor)",
  "batch_jacobian_while": "tape.batch_jacobian (use_pfor=False)",
  "parallel_for_batch_jacobian": "parallel_for batch_jacobian",
  "tf_hessians_diagonal": "tf.hessians + diagonal blocks",
  "forward_accumulator_vmap": "ForwardAccumulator + vectorized_map",
  "jax_jit_vmap_hessian": "JAX jit(vmap(hessian))",
  "tf1_output_floor": "floor: TF1 session writing the output only",
  "jax_output_floor": "floor: JAX jit writing the output only",
}

REFERENCE = "tf1hess_auto"


def method_builder(name):
  """The builder of method `name`, `tf1hess_pfor_chunk<C>` included."""
  if name in METHODS:
    return METHODS[name]
  match = re.fullmatch(r"tf1hess_pfor_chunk(\d+)", name)
  if match and int(match.group(1)) > 0:
    return _tf1hess(method="pfor", chunk_size=int(match.group(1)))
  raise ValueError(
    f"`methods` must name entries of {sorted(METHODS)} or "
    f"tf1hess_pfor_chunk<C>; saw {name!r}."
  )


def label(name):
  match = re.fullmatch(r"tf1hess_pfor_chunk(\d+)", name)
  if match:
    return f"tf1hess method='pfor', chunk_size={match.group(1)}"
  return LABELS.get(name, name)


# ------------------------------------------------------------------ running


def check(value, reference):
  """`None` if `value` matches `reference`, else what is wrong."""
  value = np.asarray(value)
  if value.shape != reference.shape:
    return f"shape {value.shape}, expected {reference.shape}"
  scale = float(np.max(np.abs(reference), initial=0.0)) or 1.0
  err = float(np.max(np.abs(value - reference), initial=0.0))
  if not np.isfinite(err) or err > _RTOL * scale:
    return (
      f"max |difference| {err:.3g} > {_RTOL:g} x max |reference| {scale:.3g}"
    )
  return None


def run_case(
  case, methods, repeats, warmup, max_seconds=float("inf"), fast_repeats=None
):
  """Checks and times `methods` on `case`; returns one record per method.

  Every method's output is compared with tf1hess's default (built first if
  not among `methods`). The methods that pass are timed in turns: `warmup`
  runs each, then rounds of one run per method, each round starting with
  the next method, until each method has had `repeats` runs
  (`fast_repeats`, if given and more, for a method whose first timed run
  took under `_FAST_RUN` seconds); a method whose runs would exceed
  `max_seconds` gets fewer than `repeats` (at least one).

  Returns:
    A list of dicts: `method`, `status` ('ok', 'wrong', 'failed' or
    'skipped'), `error`, `note`, `seconds` (median), `times`, `ratio` (to
    tf1hess's default).
  """
  records, runners = [], {}
  reference = None
  order = [REFERENCE] + [m for m in methods if m != REFERENCE]
  for name in order:
    record = {"method": name, "status": "ok", "error": None, "note": None}
    runner = None
    try:
      runner = method_builder(name)(case)
      value = runner.value()
    except SkipMethod as error:
      record.update(status="skipped", error=str(error))
    except Exception as error:  # pylint: disable=broad-except
      record.update(
        status="failed",
        error=f"{type(error).__name__}: {str(error).splitlines()[0]}",
      )
      if runner is not None:
        runner.close()
    else:
      record["note"] = getattr(runner, "note", None)
      if name == REFERENCE:
        reference = np.asarray(value)
        problem = None
      elif name in OUTPUT_FLOORS:
        problem = None
      else:
        problem = check(value, reference)
      del value
      if problem:
        record.update(status="wrong", error=problem)
        runner.close()
      else:
        runners[name] = runner
    if name == REFERENCE and reference is None:
      raise RuntimeError(
        f"tf1hess's default failed on {case.function} {case.shape}: "
        f"{record['error']}"
      )
    if name in methods:
      records.append(record)
    logging.info(
      "%s %s %s: %s %s",
      case.function,
      case.shape,
      name,
      record["status"],
      record["error"] or "",
    )
  times = {name: [] for name in runners}
  budget = {}
  for name, runner in runners.items():
    start = time.perf_counter()
    for _ in range(warmup):
      runner.run()
    per_run = (time.perf_counter() - start) / warmup
    budget[name] = max(1, int(min(repeats, max_seconds / max(per_run, 1e-9))))
  names = list(runners)
  round_ = 0
  while any(round_ < b for b in budget.values()):
    # Each round starts with another method: whichever runs right after
    # another (JAX's and TensorFlow's thread pools spin for a while after a
    # call) is slowed, and no method should always be the one.
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      if round_ < budget[name]:
        time.sleep(_PAUSE)
        start = time.perf_counter()
        runners[name].run()
        times[name].append(time.perf_counter() - start)
    if round_ == 0 and fast_repeats is not None:
      # Decided on a timed run: the warm-up's first run may still allocate.
      for name, t in times.items():
        if t and t[0] < _FAST_RUN:
          budget[name] = max(budget[name], fast_repeats)
    round_ += 1
  for runner in runners.values():
    runner.close()
  base = np.median(times[REFERENCE]) if REFERENCE in times else None
  for record in records:
    t = times.get(record["method"])
    if t:
      record["times"] = t
      record["seconds"] = float(np.median(t))
      record["ratio"] = float(record["seconds"] / base) if base else None
      logging.info(
        "%s %s %s: %.4f s (%d runs)",
        case.function,
        case.shape,
        record["method"],
        record["seconds"],
        len(t),
      )
  return records


def _status_kb(field):
  with open("/proc/self/status", encoding="ascii") as status:
    return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def memory_probe(function, shape, method, hidden, depth, seed):
  """Peak memory (MiB) of one run of `method`, after a warm-up run.

  Linux keeps the peak resident set of a process (VmHWM); writing 5 to
  /proc/self/clear_refs resets it to the current one. The probe builds the
  method and warms it up without allocating for the full batch (allocators
  keep freed memory for reuse, which would hide a second run's needs):
  TensorFlow runs once on the first sample only; JAX, which compiles per
  shape, compiles ahead of time. Freed memory goes back to the system
  (`malloc_trim`, and `measure_memory` starts the probe with a fixed mmap
  threshold so that large freed buffers are unmapped). Then the peak is
  reset, the method runs on the full batch, and the probe reports the peak
  minus the resident set before that run: the memory the computation itself
  takes, its output included.
  """
  case = Case(function, shape, hidden, depth, seed)
  runner = method_builder(method)(case)
  runner.warm_up_small()
  ctypes.CDLL(None).malloc_trim(0)
  with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
    refs.write("5")
  before = _status_kb("VmRSS")
  runner.run()
  peak = _status_kb("VmHWM")
  return (peak - before) / 1024.0


def measure_memory(case, record, hidden, depth, seed):
  """Runs `memory_probe` in a fresh process; returns MiB or `None`."""
  command = [
    sys.executable,
    os.path.abspath(__file__),
    f"--memory_probe={case.function}:{case.shape}:{record['method']}",
    f"--hidden={hidden}",
    f"--depth={depth}",
    f"--seed={seed}",
    f"--tf_hessians_max_bytes={_HESSIANS_MAX_BYTES.value}",
  ]
  # A fixed threshold turns off glibc's adaptive one, which would keep large
  # freed buffers resident and hide them from the next run's peak.
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
  result = subprocess.run(
    command, capture_output=True, text=True, check=False, timeout=3600, env=env
  )
  for line in result.stdout.splitlines():
    if line.startswith(_PROBE_TAG):
      return json.loads(line[len(_PROBE_TAG) :])["peak_mib"]
  logging.warning(
    "Memory probe of %s %s %s failed: %s",
    case.function,
    case.shape,
    record["method"],
    result.stderr.strip().splitlines()[-1:] or result.returncode,
  )
  return None


def run_all(
  functions,
  shapes,
  methods,
  repeats,
  warmup,
  max_seconds,
  fast_repeats=None,
  chunk_cases=None,
  measure=False,
  hidden=64,
  depth=3,
  seed=0,
):
  """`run_case` over functions x shapes.

  `chunk_cases` maps `(function, shape)` to chunk sizes to time as well.
  """
  chunk_cases = chunk_cases or {}
  results = []
  total = len(functions) * len(shapes)
  for index, (function, shape) in enumerate(
    (f, s) for f in functions for s in shapes
  ):
    logging.info("Case %d/%d: %s %s", index + 1, total, function, shape)
    case = Case(function, shape, hidden, depth, seed)
    names = list(methods) + [
      f"tf1hess_pfor_chunk{c}"
      for c in chunk_cases.get((function, shape), ())
      if f"tf1hess_pfor_chunk{c}" not in methods
    ]
    records = run_case(case, names, repeats, warmup, max_seconds, fast_repeats)
    for record in records:
      record.update(function=function, shape=shape, n=case.n, k=case.k)
      if measure and record["status"] == "ok":
        record["peak_mib"] = measure_memory(case, record, hidden, depth, seed)
    results.extend(records)
  return results


# ------------------------------------------------------------------ reports


def machine_notes():
  """What the numbers were measured on."""
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
      match = re.search(r"model name\s*:\s*(.*)", info.read())
    cpu = match.group(1).strip() if match else cpu
  except OSError:
    pass
  versions = f"TensorFlow {tf.__version__}, numpy {np.__version__}"
  try:
    import jax  # pylint: disable=import-outside-toplevel

    versions += f", JAX {jax.__version__}"
  except ImportError:
    versions += ", JAX not installed"
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "memory_gib": round(
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
    ),
    "python": platform.python_version(),
    "versions": versions,
    "load_average": os.getloadavg(),
    "bfc_allocator": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", ""),
  }


def goals(results):
  """The speed goals, each with the numbers that decide it.

  Returns:
    A list of dicts: `goal`, `case`, `tf1hess` (s), `other` (s), `speedup`
    (other / tf1hess), `target`, `met` (`None` when a time is missing),
    `floor` (s: the TF1 output floor of the case, `None` if not timed).
  """
  by_key = {(r["function"], r["shape"], r["method"]): r for r in results}
  out = []

  def add(goal, function, shape, other, target, at_least=True):
    mine = by_key.get((function, shape, REFERENCE), {}).get("seconds")
    theirs = by_key.get((function, shape, other), {}).get("seconds")
    floor = by_key.get((function, shape, "tf1_output_floor"), {})
    if mine is None and theirs is None:
      return
    speedup = theirs / mine if mine and theirs else None
    out.append(
      {
        "goal": goal,
        "case": f"{function} {shape}",
        "tf1hess": mine,
        "other": theirs,
        "speedup": speedup,
        "target": target,
        "met": None if speedup is None else speedup >= target,
        "floor": floor.get("seconds"),
      }
    )

  shapes = sorted({r["shape"] for r in results}, key=parse_shape)
  functions = sorted({r["function"] for r in results})
  for function in functions:
    mlp = function == "tanh_mlp"
    for shape in shapes:
      if shape == "256x16":  # Here only for tf.hessians.
        continue
      add(
        "vs tape.batch_jacobian" + (" >= 1.5x" if mlp else " not slower"),
        function,
        shape,
        "batch_jacobian_pfor",
        1.5 if mlp else 1.0,
      )
      add(
        "vs JAX jit(vmap(hessian))" + (" >= 1.2x" if mlp else " not slower"),
        function,
        shape,
        "jax_jit_vmap_hessian",
        1.2 if mlp else 1.0,
      )
  for function in functions:
    add(
      "vs tf.hessians + diagonal >= 100x",
      function,
      "256x16",
      "tf_hessians_diagonal",
      100.0,
    )
  return out


def _cell(record):
  if record is None:
    return ""
  if record["status"] != "ok":
    return record["status"]
  text = f"{record['seconds']:.3g} s"
  if record.get("ratio") is not None:
    text += f" ({record['ratio']:.2f}x)"
  if record.get("peak_mib") is not None:
    text += f", {record['peak_mib']:.0f} MiB"
  return text


def markdown(results, notes, command, shared_note):
  """The BENCHMARKS.md report."""
  lines = [
    "# Benchmarks",
    "",
    "Per-sample Hessians `(N, K, K)` of three functions, float32, on CPU, "
    "by tf1hess and by the other ways to get them in TensorFlow and JAX. "
    "Produced by:",
    "",
    "```sh",
    command,
    "```",
    "",
    "## Machine",
    "",
    f"- CPU: {notes['cpu']}, {notes['cores']} cores visible, "
    f"{notes['memory_gib']} GiB memory; Python {notes['python']}; "
    f"{notes['versions']}.",
    "- Load average (1, 5, 15 min) at the start: "
    + ", ".join(f"{v:.1f}" for v in notes["load_average"])
    + (
      f"; at the end: {', '.join(f'{v:.1f}' for v in notes['load_end'])}."
      if "load_end" in notes
      else "."
    ),
    "- TensorFlow's CPU allocator: "
    + (
      "BFC (`TF_CPU_ALLOCATOR_USE_BFC=true`, which this script sets unless "
      "told otherwise), which keeps freed memory for the next run"
      if plan_lib.bfc_allocator(notes.get("bfc_allocator", ""))
      else "the default (`TF_CPU_ALLOCATOR_USE_BFC` unset or false), which "
      "returns large buffers to the system: every run pays the page faults "
      "of fresh memory"
    )
    + "; see docs/speed.md.",
  ]
  if shared_note:
    lines.append(f"- {shared_note}")
  lines += [
    "",
    "## How it is measured",
    "",
    "- One process; every method gets the same weights and the same inputs "
    "(numpy arrays fixed by `--seed`).",
    "- Before timing, each method's output is compared with tf1hess's "
    f"default: max |difference| <= {_RTOL:g} x max |entry|. A method that "
    "fails the check is reported as `wrong` and not timed.",
    "- Time: median of the timed runs (`--repeats`; `--fast_repeats` for a "
    f"method whose runs take under {_FAST_RUN * 1000:g} ms, which vary "
    "more) after a warm-up run, the methods of a case taking turns (each "
    "round starting with the next method, after a "
    f"{_PAUSE:g} s pause before each run). TF1 graphs run the op that "
    "produces the Hessians in a `tf.compat.v1.Session` without fetching "
    "them (no copy to numpy); "
    "`tf.function`s are called on a tensor and return it; JAX calls end "
    "with `block_until_ready()`. Parenthesized: time / tf1hess default.",
    "- Peak memory (MiB): in a fresh process per method and case, after a "
    "warm-up on one sample (TensorFlow) or an ahead-of-time compilation "
    "(JAX), the peak resident set (VmHWM, reset through "
    "/proc/self/clear_refs) during one run minus the resident set before "
    "it: what the computation itself takes, its output included (a float32 "
    "output is N*K*K*4 bytes). tracemalloc would not see TensorFlow's "
    "allocations; this counts everything the process touches.",
    "- `tf.hessians` builds the full `(N, K, N, K)` tensor with N*K backward "
    "passes; it only runs where that fits in `--tf_hessians_max_bytes`.",
    "- The two `floor:` rows compute no Hessians and are not checked: a TF1 "
    "graph run like the others (the batch fed, one op broadcasting a "
    "constant `(K, K)` matrix over it) and a jitted JAX call that only "
    "write an `(N, K, K)` float32 output. No method of that framework can "
    "take less; where tf1hess's default is near its floor, what is left is "
    "the cost of a session run and of writing the output.",
    "",
  ]
  goal_rows = goals(results)
  if goal_rows:
    lines += [
      "## Goals",
      "",
      "Speed-up = other method's time / tf1hess default's time. TF1 floor: "
      "the time a TF1 session takes to write the output and nothing else "
      "(see above).",
      "",
      "| goal | case | tf1hess (s) | other (s) | speed-up | met "
      "| TF1 floor (s) |",
      "|---|---|---|---|---|---|---|",
    ]
    for g in goal_rows:

      def fmt(v, spec=".3g"):
        return "n/a" if v is None else format(v, spec)

      met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
      lines.append(
        f"| {g['goal']} | {g['case']} | {fmt(g['tf1hess'])} | "
        f"{fmt(g['other'])} | {fmt(g['speedup'], '.2f')} | {met} | "
        f"{fmt(g['floor'])} |"
      )
    lines.append("")
  shapes = sorted({r["shape"] for r in results}, key=parse_shape)
  for function in dict.fromkeys(r["function"] for r in results):
    rows = [r for r in results if r["function"] == function]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines += [
      f"## {function}: {FUNCTIONS[function]}",
      "",
      "| method | " + " | ".join(s.replace("x", " x ") for s in shapes) + " |",
      "|---" * (len(shapes) + 1) + "|",
    ]
    for method in methods:
      cells = []
      for shape in shapes:
        match = [
          r for r in rows if r["method"] == method and r["shape"] == shape
        ]
        cells.append(_cell(match[0] if match else None))
      lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    lines.append("")
  chunked = sorted(
    {
      (r["function"], r["shape"])
      for r in results
      if r["method"].startswith("tf1hess_pfor_chunk")
    }
  )
  if chunked:
    lines += [
      "## Memory and speed by chunk size",
      "",
      "`chunk_size=C` vectorizes C rows per backward pass in a loop over "
      "chunks: the intermediate activations of only C rows are alive at a "
      "time, at some cost in speed. Output size: N*K*K*4 bytes.",
      "",
      "| case | output (MiB) | method | time (s) | peak memory (MiB) |",
      "|---|---|---|---|---|",
    ]
    for function, shape in chunked:
      n, k = parse_shape(shape)
      rows = [
        r
        for r in results
        if r["function"] == function
        and r["shape"] == shape
        and r["status"] == "ok"
        and (
          r["method"].startswith("tf1hess")
          or r["method"] in ("batch_jacobian_pfor", "jax_jit_vmap_hessian")
        )
      ]
      for r in rows:
        peak = r.get("peak_mib")
        lines.append(
          f"| {function} {shape} | {n * k * k * 4 / 2**20:.0f} | "
          f"{label(r['method'])} | {r['seconds']:.3g} | "
          f"{'n/a' if peak is None else f'{peak:.0f}'} |"
        )
    lines.append("")
  problems = {}
  for r in results:
    if r["status"] != "ok" or r.get("note"):
      text = r["error"] if r["status"] != "ok" else r["note"]
      key = (label(r["method"]), r["status"], text)
      problems.setdefault(key, []).append(f"{r['function']} {r['shape']}")
  if problems:
    lines += ["## Failures, skips and notes", ""]
    for (method, status, text), cases in problems.items():
      status = "" if status == "ok" else f"{status}: "
      lines.append(f"- {method}: {status}{text}. Cases: {', '.join(cases)}.")
    lines.append("")
  return "\n".join(lines)


def plot(results, path):
  """One panel per function: seconds per shape, one line per method."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  functions = list(dict.fromkeys(r["function"] for r in results))
  shapes = sorted({r["shape"] for r in results}, key=parse_shape)
  fig, axes = plt.subplots(
    1, len(functions), figsize=(6 * len(functions), 5), squeeze=False
  )
  for ax, function in zip(axes[0], functions):
    rows = [r for r in results if r["function"] == function]
    for method in dict.fromkeys(r["method"] for r in rows):
      points = [
        (shapes.index(r["shape"]), r["seconds"])
        for r in rows
        if r["method"] == method and r.get("seconds")
      ]
      if points:
        xs, ys = zip(*sorted(points))
        if method in OUTPUT_FLOORS:
          style = ":"
        else:
          style = "-o" if method.startswith("tf1hess") else "--x"
        width = 2.5 if method == REFERENCE else 1.2
        ax.plot(xs, ys, style, label=label(method), linewidth=width)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([s.replace("x", "\u00d7") for s in shapes])
    ax.set_yscale("log")
    ax.set_xlabel("N \u00d7 K")
    ax.set_ylabel("seconds (median)")
    ax.set_title(FUNCTIONS[function])
    ax.grid(True, which="both", alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)


def write_outputs(results, notes, command, md=None, png=None, js=None):
  """Writes the report, the plot and the raw results (each optional)."""
  shared = None
  if notes["load_average"][0] >= 0.5:
    shared = (
      "The machine was shared with other jobs while this ran (see the "
      "load average), so times are noisy; methods took turns in each case "
      "so that the load slowed them alike, and the ratios are the more "
      "stable numbers."
    )
  if md:
    with _files.atomic_output(md) as tmp:
      with open(tmp, "w", encoding="utf-8") as out:
        out.write(markdown(results, notes, command, shared))
    logging.info("Wrote %s", md)
  if png:
    with _files.atomic_output(png, suffix=".png") as tmp:
      plot(results, tmp)
    logging.info("Wrote %s", png)
  if js:
    with _files.atomic_output(js) as tmp:
      with open(tmp, "w", encoding="utf-8") as out:
        json.dump({"machine": notes, "results": results}, out, indent=1)
    logging.info("Wrote %s", js)


def command_line():
  """This run's command: the script and the flags not at their defaults.

  Prefixed with `TF_CPU_ALLOCATOR_USE_BFC=...` when the allocator is not the
  BFC one this script turns on.
  """
  parts = ["python scripts/benchmark.py"]
  bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "")
  if not plan_lib.bfc_allocator(bfc):
    parts.insert(0, f"TF_CPU_ALLOCATOR_USE_BFC={bfc or 'false'}")
  for holder in _ALL_FLAGS:
    flag = flags.FLAGS[holder.name]
    if flag.value != flag.default:
      value = flag.value
      if isinstance(value, list):
        value = ",".join(value)
      if isinstance(value, bool):
        parts.append(f"--{holder.name}" if value else f"--no{holder.name}")
      else:
        parts.append(f"--{holder.name}={value}")
  return " ".join(parts)


def default_methods():
  names = list(METHODS)
  try:
    import jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    names.remove("jax_jit_vmap_hessian")
    names.remove("jax_output_floor")
  return names


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  with _cli.exit_on_error("benchmark.py"):
    if _MEMORY_PROBE.value:
      function, shape, method = _MEMORY_PROBE.value.split(":")
      peak = memory_probe(
        function, shape, method, _HIDDEN.value, _DEPTH.value, _SEED.value
      )
      print(_PROBE_TAG + json.dumps({"peak_mib": peak}), flush=True)
      return
    quick = _QUICK.value
    functions = _FUNCTIONS.value
    for function in functions:
      if function not in FUNCTIONS:
        raise ValueError(
          f"`functions` must name entries of {sorted(FUNCTIONS)}; saw "
          f"{function!r}."
        )
    shapes = _QUICK_SHAPES if quick else _SHAPES.value
    for shape in shapes:
      parse_shape(shape)
    methods = _METHODS.value or default_methods()
    for method in methods:
      method_builder(method)
    if _OUTPUT_PNG.value:
      try:
        import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      except ImportError:
        raise ValueError(
          "`output_png` needs matplotlib, which is not installed: "
          'pip install -e ".[bench]".'
        ) from None
    notes = machine_notes()
    results = run_all(
      functions,
      shapes,
      methods,
      repeats=2 if quick else _REPEATS.value,
      fast_repeats=2 if quick else _FAST_REPEATS.value,
      warmup=_WARMUP.value,
      max_seconds=_MAX_SECONDS.value,
      chunk_cases={} if quick else parse_chunk_cases(_CHUNK_CASES.value),
      measure=_MEASURE_MEMORY.value and not quick,
      hidden=_HIDDEN.value,
      depth=_DEPTH.value,
      seed=_SEED.value,
    )
    notes["load_end"] = os.getloadavg()
    write_outputs(
      results,
      notes,
      command_line(),
      _OUTPUT_MD.value,
      _OUTPUT_PNG.value,
      _OUTPUT_JSON.value,
    )
    for g in goals(results):
      logging.info(
        "%s, %s: speed-up %s (target %s): %s",
        g["goal"],
        g["case"],
        "n/a" if g["speedup"] is None else f"{g['speedup']:.2f}",
        g["target"],
        {True: "met", False: "NOT met", None: "n/a"}[g["met"]],
      )


if __name__ == "__main__":
  app.run(main)
