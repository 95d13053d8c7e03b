r"""Checks the forward engine against the row loop on random small models.

Each seed builds a random composition of 3-7 ops on `x`, a `(None, K)`
float64 placeholder, in a fresh graph: dense layers, elementwise functions,
binary ops of the model's tensors and of constants that broadcast, distances
to centres `x[:, None, :] - C`, matmuls written as broadcasts, pairwise
products, reductions, softmax, reshapes, transposes, concats, slices,
gathers (also by each sample's own indices, `batch_dims=1` and
`tf.gather_nd`), tiles, cumulative sums and products, layer
normalization, and diagonals, traces and bands of matrices. It then compares
`batch_hessians`, `batch_hessian_diagonals` and `batch_laplacians` with
`method="forward"` against the diagonals and traces of
`batch_hessians(..., method="while_loop")`, to `atol = 1e-8 * max(1, max|H|)`.

A `ValueError` of the forward engine that names an op it cannot follow
counts as "declined"; any other error (a `ValueError` of TensorFlow's too)
or a mismatch is a FAILURE, printed with its seed, mode, error, a command
that repeats it and the model's ops (`C` constants, `P` positive ones, `W`
weights). Prints "agree A, declined D, failed F" (per seed and mode) at the
end, and exits with 1 when anything failed.

  TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python tools/forward_fuzz.py --seeds=0:50
  ... --control_flow=1   # control flow v1
  ... --lists            # ys: [output, an intermediate tensor]
  ... --chunks           # 600 rows, walked by the engine in chunks of 8
  ... --switch           # auto's tf.cond on N: engine (even seeds) or rows
  ... --loops            # loops too (the reference: the rows under v2)
  ... --rows=pfor,vectorized  # the rows' other builds instead of the engine

`--rows` checks the row builds other than the reference loop against it
instead of the engine: `pfor` (`method="pfor"`), `pfor_chunks` (in chunks
of 2 rows), and `method="auto"` made to take the rows: `unrolled` (K <= 16
rows in the graph), `loop` (a loop with the linear shortcuts) and
`vectorized` (vectorized rows with the shortcuts).
"""

import contextlib
import sys
import traceback
from unittest import mock

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import tf1hess
from tf1hess.forward import chunks as forward_chunks
from tf1hess.forward import dispatch

_SEEDS = flags.DEFINE_string("seeds", "0:50", "Range of seeds, lo:hi.")
_MODES = flags.DEFINE_list("modes", "hessian,diagonal,laplacian", "To check.")
_CONTROL_FLOW = flags.DEFINE_integer(
  "control_flow", 2, "1: control flow v1; 2: v2.", lower_bound=1, upper_bound=2
)
_K = flags.DEFINE_integer("k", 6, "Input features.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 5, "Rows of the batch.", lower_bound=1)
_CHUNKS = flags.DEFINE_bool("chunks", False, "600 rows, in chunks of 8.")
_LISTS = flags.DEFINE_bool("lists", False, "ys: [y, an intermediate tensor].")
_SWITCH = flags.DEFINE_bool(
  "switch",
  False,
  "method='auto' with its choice forced to a tf.cond on N between the"
  " engine and the rows, the engine taken on even seeds, the rows on odd.",
)
_ROWS = flags.DEFINE_list(
  "rows",
  [],
  "Row builds to check against the loop instead of the engine: pfor,"
  " pfor_chunks, unrolled, loop, vectorized.",
)
_LOOPS = flags.DEFINE_bool(
  "loops", False, "Draw loops too: scan, foldl, map_fn, while_loop."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print every model.")

_MAX_ENTRIES = 96  # Entries per sample of a model's tensor.
_MAX_RANK = 3  # Axes per sample.
_MAX_VALUE = 1e3  # Largest magnitude of a model's tensor on the batch.
_CHUNK_ROWS = 600
# How the `ValueError`s of the engine's declines begin (`dispatch`).
_DECLINED = "`method`='forward' cannot differentiate"

# Templates of the descriptions: the ops.
_UNARY = {
  "tanh({})": tf.tanh,
  "sigmoid({})": tf.sigmoid,
  "softplus({})": tf.nn.softplus,
  "sin({})": tf.sin,
  "cos({})": tf.cos,
  "exp(0.3 * {})": lambda t: tf.exp(0.3 * t),
  "log1p({0} * {0})": lambda t: tf.math.log1p(t * t),
  "sqrt({0} * {0} + 1)": lambda t: tf.sqrt(t * t + 1.0),
  "rsqrt({0} * {0} + 1)": lambda t: tf.math.rsqrt(t * t + 1.0),
  "square({})": tf.square,
  "{0} * {0}": lambda t: t * t,
  "swish({})": lambda t: t * tf.sigmoid(t),
  "elu({})": tf.nn.elu,
  "relu({})": tf.nn.relu,
  "abs({})": tf.abs,
  "pow({}, 3)": lambda t: tf.pow(t, 3.0),
}
_BINARY = {
  "{} + {}": lambda a, b: a + b,
  "{} - {}": lambda a, b: a - b,
  "{} * {}": lambda a, b: a * b,
  "{0} / ({1} * {1} + 1)": lambda a, b: a / (b * b + 1.0),
  "maximum({}, {})": tf.maximum,
  "squared_difference({}, {})": tf.math.squared_difference,
}
_WITH_CONST = {
  "{} + {}": lambda t, c: t + c,
  "{} - {}": lambda t, c: t - c,
  "{1} - {0}": lambda t, c: c - t,
  "{} * {}": lambda t, c: t * c,
  "{0} / (|{1}| + 0.5)": lambda t, c: t / (tf.abs(c) + 0.5),
  "{1} / ({0} * {0} + 1)": lambda t, c: c / (t * t + 1.0),
}
_REDUCE = ["reduce_sum", "reduce_mean", "reduce_max", "reduce_logsumexp"]
# The ops of `_Model` and how often `build` draws them.
_WEIGHTS = """dense 3 unary 5 binary 2 with_const 2 centres 3 broadcast_matmul 1
  pairwise 2 outer_const 1 reduce 2 softmax 1 reshape 1 transpose 1 concat 1
  expand_or_squeeze 1 slice 1 gather 1 tile 1 layer_norm 1 matrix 1
  cumulative 1""".split()
_LOOP_WEIGHTS = ["recurrent", "12"]  # With `--loops`.


def _entry(t):
  """The static shape of one sample of `t`, a tuple of ints."""
  return tuple(t.shape.as_list()[1:])


def _sum_entries(t):
  """`(N,)`: the sum of each sample of `t`."""
  return tf.reduce_sum(t, axis=list(range(1, t.shape.rank))) if _entry(t) else t


def _broadcastable(e, f):
  return len(e) == len(f) and all(p == q or 1 in (p, q) for p, q in zip(e, f))


class _Model:
  """Grows a pool of tensors of `x` by random ops (`build`)."""

  def __init__(self, rng, x, sess, feed):
    self.rng = rng
    self.pool = [("x", x)]
    self.lines = []
    self.used = set()  # The pool's tensors that an op reads.
    self._sess, self._feed = sess, feed

  def _const(self, shape, scale=1.0, positive=False):
    value = self.rng.normal(size=shape)
    value = np.abs(value) + 0.5 if positive else value * scale
    return tf.constant(np.asarray(value, np.float64), dtype=tf.float64)

  def _int(self, lo, hi):
    """A random int in [lo, hi]."""
    return int(self.rng.integers(lo, hi + 1))

  def _pick(self, fits=lambda e: True):
    """`(name, tensor)` from the pool whose sample shape `fits` (the newest
    that fits 60% of the time); raises `LookupError` when none does."""
    found = [i for i, (_, t) in enumerate(self.pool) if fits(_entry(t))]
    if not found:
      raise LookupError()
    i = found[-1] if self.rng.random() < 0.6 else int(self.rng.choice(found))
    self.used.add(i)
    return self.pool[i]

  def _flat(self):
    """A pool tensor as `(N, M)`, and its name."""
    name, t = self._pick()
    if len(_entry(t)) == 1:
      return name, t
    return f"flat({name})", tf.reshape(t, [-1, int(np.prod(_entry(t)))])

  def dense(self):
    name, t = self._flat()
    m, w = t.shape[1], self._int(3, 8)
    weights = self._const([m, w], 1 / np.sqrt(m))
    return tf.matmul(t, weights) + self._const([w], 0.1), f"dense({name}, {w})"

  def unary(self):
    name, t = self._pick()
    fn = str(self.rng.choice(sorted(_UNARY)))
    return _UNARY[fn](t), fn.format(name)

  def binary(self):
    name, a = self._pick()
    other, b = self._pick(lambda e: _broadcastable(e, _entry(a)))
    fn = str(self.rng.choice(sorted(_BINARY)))
    return _BINARY[fn](a, b), fn.format(name, other)

  def with_const(self):
    name, t = self._pick()
    e, kind = _entry(t), self._int(0, 2)
    shape = [d if self.rng.random() < 0.6 else 1 for d in e]
    if kind == 1:  # With the batch axis.
      shape = [1] + shape
    elif kind == 2:
      shape = [1] * self._int(0, len(e) + 1)
    fn = str(self.rng.choice(sorted(_WITH_CONST)))
    out = _WITH_CONST[fn](t, self._const(shape, 0.5))
    return out, fn.format(name, f"C{tuple(shape)}")

  def centres(self):
    """Distances to centres: `t[:, None, :] - C`, squared, scaled, summed."""
    name, t = self._flat()
    m, c = t.shape[1], self._int(2, 5)
    centres = self._const([c, m])
    if self.rng.random() < 0.5:
      d, text = t[:, None, :] - centres, f"{name}[:, None, :] - C{(c, m)}"
    else:
      d, text = centres - t[:, None, :], f"C{(c, m)} - {name}[:, None, :]"
    how = self._int(0, 2)
    if how < 2:
      d = tf.square(d) if how == 0 else d * d
      text = f"square({text})" if how == 0 else f"({text})**2"
    if self.rng.random() < 0.5:
      d, text = d / self._const([c, m], positive=True), f"({text}) / P{(c, m)}"
    how = self._int(0, 4)
    if how == 4:
      return d, text
    keep = bool(self.rng.integers(2))
    fn = tf.reduce_sum if how % 2 == 0 else tf.reduce_mean
    axis = -1 if how < 2 else [1, 2]
    return fn(d, axis=axis, keepdims=keep), (
      f"{fn.__name__}({text}, axis={axis}, keepdims={keep})"
    )

  def broadcast_matmul(self):
    name, t = self._flat()
    m, p = t.shape[1], self._int(3, 8)
    weights = self._const([m, p], 1 / np.sqrt(m))
    out = tf.reduce_sum(t[:, :, None] * weights, axis=1)
    return out, f"reduce_sum({name}[:, :, None] * W{(m, p)}, axis=1)"

  def pairwise(self):
    """`q[:, :, None, :] * r[:, None, :, :]` summed over the last axis."""
    qname, q = self._pick()
    rname, r = self._pick()
    mq, mr = int(np.prod(_entry(q))), int(np.prod(_entry(r)))
    common = [b for b in range(1, min(mq, mr) + 1) if mq % b + mr % b == 0]
    b = int(self.rng.choice(common))
    a, c = mq // b, mr // b
    if a * c > _MAX_ENTRIES or a * b * c > 4 * _MAX_ENTRIES:
      return None
    q3, r3 = tf.reshape(q, [-1, a, b]), tf.reshape(r, [-1, c, b])
    out = tf.reduce_sum(q3[:, :, None, :] * r3[:, None, :, :], axis=-1)
    return out, (
      f"reduce_sum({qname}{(a, b)}[:, :, None, :] *"
      f" {rname}{(c, b)}[:, None, :, :], axis=-1)"
    )

  def outer_const(self):
    name, t = self._flat()
    c, m = self._int(2, 5), t.shape[1]
    out = tf.expand_dims(t, 1) * self._const([c, m])
    return out, f"expand_dims({name}, 1) * C{(c, m)}"

  def reduce(self):
    name, t = self._pick(lambda e: len(e) >= 1)
    rank = len(_entry(t))
    axis = self._int(1, rank)
    if self.rng.random() < 0.3:
      axis -= rank + 1
    fn, keep = str(self.rng.choice(_REDUCE)), bool(self.rng.integers(2))
    out = getattr(tf, fn)(t, axis=axis, keepdims=keep)
    return out, f"{fn}({name}, axis={axis}, keepdims={keep})"

  def cumulative(self):
    """A cumulative sum or product along an entry axis, maybe exclusive or
    reversed."""
    name, t = self._pick(lambda e: len(e) >= 1)
    axis = self._int(1, len(_entry(t)))
    fn = str(self.rng.choice(["cumsum", "cumprod"]))
    exclusive, reverse = (bool(b) for b in self.rng.integers(2, size=2))
    out = getattr(tf.math, fn)(t, axis, exclusive=exclusive, reverse=reverse)
    return (
      out,
      f"{fn}({name}, {axis}, exclusive={exclusive}, reverse={reverse})",
    )

  def softmax(self):
    name, t = self._pick(lambda e: len(e) >= 1 and e[-1] >= 2)
    if self.rng.random() < 0.5:
      return tf.nn.softmax(t, axis=-1), f"softmax({name})"
    return tf.nn.log_softmax(t, axis=-1), f"log_softmax({name})"

  def reshape(self):
    name, t = self._pick()
    m, p = int(np.prod(_entry(t))), 2
    shape = [1] * self._int(1, _MAX_RANK)
    while m > 1:  # Each prime factor of `m` to a random axis.
      if m % p:
        p += 1
        continue
      shape[self._int(0, len(shape) - 1)] *= p
      m //= p
    return tf.reshape(t, [-1] + shape), f"reshape({name}, {tuple(shape)})"

  def transpose(self):
    name, t = self._pick(lambda e: len(e) >= 2)
    perm = [0] + [int(i) + 1 for i in self.rng.permutation(len(_entry(t)))]
    return tf.transpose(t, perm), f"transpose({name}, {perm})"

  def concat(self):
    name, a = self._pick(lambda e: len(e) >= 1)
    other, b = self._pick(lambda e: e[:-1] == _entry(a)[:-1] and len(e) >= 1)
    axis = -1 if self.rng.random() < 0.5 else len(_entry(a))
    return tf.concat([a, b], axis), f"concat([{name}, {other}], {axis})"

  def expand_or_squeeze(self):
    name, t = self._pick()
    e = _entry(t)
    ones = [i + 1 for i, d in enumerate(e) if d == 1]
    if ones and self.rng.random() < 0.7:
      axis = int(self.rng.choice(ones))
      return tf.squeeze(t, axis=[axis]), f"squeeze({name}, [{axis}])"
    axis = self._int(1, len(e) + 1)
    return tf.expand_dims(t, axis), f"expand_dims({name}, {axis})"

  def slice(self):
    name, t = self._pick(lambda e: len(e) >= 1 and max(e) >= 2)
    e = _entry(t)
    if e[0] >= 2 and self.rng.random() < 0.5:
      return t[:, 1:], f"{name}[:, 1:]"
    if e[-1] < 2:
      return None
    return t[..., :-1], f"{name}[..., :-1]"

  def gather(self):
    """A gather of constant indices along the last axis, of each sample's
    own indices (`batch_dims=1`), or of index tuples of each sample's own
    entries (`tf.gather_nd` with `indices[n, ..., 0] = n`)."""
    name, t = self._pick(lambda e: len(e) >= 1)
    e = _entry(t)
    n = tf.shape(t)[0]
    how = self._int(0, 2)
    if how == 1:
      idx = self.rng.integers(0, e[0], size=self._int(1, e[0] + 2))
      per_sample = tf.tile(tf.constant(idx[None], tf.int32), tf.stack([n, 1]))
      out = tf.gather(t, per_sample, axis=1, batch_dims=1)
      return out, f"gather({name}, {idx.tolist()} per sample, batch_dims=1)"
    if how == 2:
      depth, m = self._int(0, len(e)), self._int(1, 3)
      tuples = np.stack(
        [self.rng.integers(0, e[a], size=m) for a in range(depth)]
        + [np.zeros(m, np.int64)],
        axis=1,
      )[:, :depth]
      own = tf.tile(tf.range(n)[:, None, None], [1, m, 1])
      rest = tf.tile(tf.constant(tuples[None], tf.int32), tf.stack([n, 1, 1]))
      out = tf.gather_nd(t, tf.concat([own, rest], axis=2))
      return out, f"gather_nd({name}, own rows, {tuples.tolist()})"
    idx = self.rng.integers(0, e[-1], size=self._int(1, e[-1] + 2))
    out = tf.gather(t, idx, axis=len(e))
    return out, f"gather({name}, {idx.tolist()}, axis={len(e)})"

  def tile(self):
    name, t = self._pick(lambda e: len(e) >= 1)
    multiples = [1] * (len(_entry(t)) + 1)
    multiples[self._int(1, len(multiples) - 1)] = self._int(2, 3)
    return tf.tile(t, multiples), f"tile({name}, {multiples})"

  def matrix(self):
    """A diagonal, trace or band of each sample's matrices, or a diagonal
    matrix of a vector."""
    name, t = self._pick(lambda e: len(e) >= 1)
    e = _entry(t)
    if len(e) >= 2 and e[-1] == e[-2]:
      m, text = t, name
    else:
      size = int(np.prod(e))
      a = int(round(np.sqrt(size)))
      if a * a != size or a < 2:
        if len(e) == 1 and e[0] <= 9:
          return tf.linalg.diag(t), f"diag({name})"
        return None
      m, text = tf.reshape(t, [-1, a, a]), f"{name}{(a, a)}"
    how = self._int(0, 2)
    if how == 0:
      return tf.linalg.diag_part(m), f"diag_part({text})"
    if how == 1:
      return tf.linalg.trace(m)[..., None], f"trace({text})[..., None]"
    lower, upper = self._int(-1, 1), self._int(-1, 1)  # -1: all of them.
    return tf.linalg.band_part(m, lower, upper), (
      f"band_part({text}, {lower}, {upper})"
    )

  def recurrent(self):
    """A loop over a time axis of a pool tensor, time-major `(T, N, F)`:
    `tf.scan`, `tf.foldl`, `tf.map_fn` or a `tf.while_loop` (reading by
    `tf.gather` or from a `TensorArray`, writing to one or carrying the
    state), of a cell `act(h W + x_t U + b)` or `h * sigmoid(x_t U) + x_t U`;
    the final state, or every step's stacked back to batch-first."""
    name, t = self._flat()
    m = t.shape[1]
    steps = [s for s in (2, 3, 4) if m % s == 0 and m // s >= 1]
    if not steps:
      return None
    big = int(self.rng.choice(steps))
    f, d = m // big, self._int(2, 5)
    seq = tf.transpose(tf.reshape(t, [-1, big, f]), [1, 0, 2])
    w = self._const([d, d], 0.5 / np.sqrt(d))
    u = self._const([f, d], 1 / np.sqrt(f))
    b = self._const([d], 0.1)
    act_name = str(self.rng.choice(["tanh", "sigmoid", "softplus", "sin"]))
    act = getattr(tf.nn, act_name, None) or getattr(tf, act_name)
    gated = self.rng.random() < 0.3

    def cell(h, x_t):
      if gated:
        xu = tf.matmul(x_t, u)
        return h * tf.sigmoid(xu) + xu
      return act(tf.matmul(h, w) + tf.matmul(x_t, u) + b)

    cell_text = (
      "h * sigmoid(x_t U) + x_t U"
      if gated
      else (f"{act_name}(h W + x_t U + b)")
    )
    h0 = tf.zeros(tf.stack([tf.shape(t)[0], d]), tf.float64)
    how = str(self.rng.choice(["scan", "foldl", "map_fn", "while", "array"]))
    stacked = None
    if how == "scan":
      stacked = tf.scan(cell, seq, initializer=h0)
    elif how == "foldl":
      final = tf.foldl(cell, seq, initializer=h0)
    elif how == "map_fn":  # Each step alone: the cell of a zero state.
      stacked = tf.map_fn(lambda x_t: cell(0.5 * tf.matmul(x_t, u), x_t), seq)
      cell_text = f"map_fn({cell_text}, h = 0.5 x_t U)"
    elif how == "while":  # Reads each step by `tf.gather` of the counter.
      _, final = tf.while_loop(
        lambda i, h: i < big,
        lambda i, h: (i + 1, cell(h, tf.gather(seq, i))),
        [tf.constant(0), h0],
      )
    else:  # Reads and writes `TensorArray`s.
      inputs = tf.TensorArray(tf.float64, size=big).unstack(seq)
      outputs = tf.TensorArray(tf.float64, size=big)

      def body(i, h, out):
        h = cell(h, inputs.read(i))
        return i + 1, h, out.write(i, h)

      _, final, out = tf.while_loop(
        lambda i, h, out: i < big, body, [tf.constant(0), h0, outputs]
      )
      if self.rng.random() < 0.5:
        stacked = out.stack()
    text = f"{how}({cell_text}, {name}{(big, f)} over {big} steps)"
    if stacked is None or self.rng.random() < 0.3:
      return (final if stacked is None else stacked[-1]), f"final {text}"
    return tf.transpose(stacked, [1, 0, 2]), f"stacked {text}"

  def layer_norm(self):
    name, t = self._pick(lambda e: len(e) == 1 and e[0] >= 2)
    mean = tf.reduce_mean(t, axis=1, keepdims=True)
    var = tf.reduce_mean(tf.square(t - mean), axis=1, keepdims=True)
    return (t - mean) * tf.math.rsqrt(var + 1e-3), f"layer_norm({name})"

  def _fits(self, out, text):
    """Whether `out` is small enough and its values finite and moderate."""
    e = _entry(out)
    if None in e:
      raise AssertionError(f"{text}: sample shape {e} is not static")
    if len(e) > _MAX_RANK or int(np.prod(e)) > _MAX_ENTRIES:
      return False
    value = self._sess.run(out, self._feed)
    return np.all(np.isfinite(value)) and np.max(np.abs(value)) <= _MAX_VALUE

  def build(self, steps, lists, loops=False):
    """Adds `steps` ops to the pool (loops too with `loops`); returns `ys`."""
    table = _WEIGHTS + _LOOP_WEIGHTS * loops
    ops, weights = table[::2], np.array(table[1::2], np.float64)
    for _ in range(50 * steps):
      if len(self.pool) > steps:
        break
      op = getattr(
        self, ops[self.rng.choice(len(ops), p=weights / sum(weights))]
      )
      used = set(self.used)
      try:
        made = op()
      except LookupError:  # Nothing in the pool fits the op.
        continue
      if made is None or not self._fits(*made):
        self.used = used
        continue
      out, text = made
      e = _entry(out)
      name = f"t{len(self.pool)}"
      self.pool.append((name, out))
      self.lines.append(f"{name} = {text}  # {e}")
    else:
      raise AssertionError(f"no model of {steps} ops in {50 * steps} tries")
    name, last = self.pool[-1]
    y, text = _sum_entries(last), f"y = sum({name})"
    unused = set(range(1, len(self.pool) - 1)) - self.used
    if unused and self.rng.random() < 0.5:
      other, t = self.pool[int(self.rng.choice(sorted(unused)))]
      y, text = y + 0.5 * _sum_entries(t), f"{text} + 0.5 * sum({other})"
    self.lines.append(text)
    if not lists:
      return y
    name, t = self.pool[self._int(1, len(self.pool) - 1)]
    self.lines.append(f"ys = [y, {name}]")
    return [y, t]


_MODES_CHECKED = {  # The forward op, and its einsum of the rows' Hessians.
  "hessian": (tf1hess.batch_hessians, "nij->nij"),
  "diagonal": (tf1hess.batch_hessian_diagonals, "nii->ni"),
  "laplacian": (tf1hess.batch_laplacians, "nii->n"),
}


def _error(e):
  """`e` in one line, with the innermost line of tf1hess that it came from."""
  frames = traceback.extract_tb(e.__traceback__)
  ours = [f for f in frames if "/tf1hess/" in f.filename] or frames[-1:]
  where = f" (at {ours[-1].filename}:{ours[-1].lineno})" if ours else ""
  return (
    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"
  )


# The row builds of `--rows`: a `Plan`, and the choice `method="auto"` is
# made to take (`None`: the plan's method decides).
_ROW_BUILDS = {
  "pfor": (tf1hess.Plan(method="pfor"), None),
  "pfor_chunks": (tf1hess.Plan(method="pfor", chunk_size=2), None),
  "unrolled": (tf1hess.Plan(), dispatch.Choice(False)),
  "loop": (
    tf1hess.Plan(unroll_max_rows=1, pfor_min_rows=2**20),
    dispatch.Choice(False),
  ),
  "vectorized": (
    tf1hess.Plan(unroll_max_rows=1, pfor_min_rows=1),
    dispatch.Choice(False),
  ),
}


def _build(fn, ys, x, plan, choice):
  """`fn(ys, x, plan=plan)`, with `method="auto"` made to take `choice`."""
  if choice is None:
    return fn(ys, x, plan=plan)
  with mock.patch.object(dispatch, "choose", return_value=choice):
    return fn(ys, x, plan=plan)


def _check(sess, feed, ys, x, mode, h, plan, choice=None):
  """`(status, detail, chunked)` of `mode` built with `plan` (and `auto`
  made to take `choice`, when not `None`) against the loop's `h`."""
  graph, (fn, from_rows) = x.graph, _MODES_CHECKED[mode]
  before = len(graph.get_operations())
  try:
    forward = _build(fn, ys, x, plan, choice)
  except ValueError as e:
    if str(e).startswith(_DECLINED):
      return "declined", str(e).splitlines()[0], False
    return "failed", _error(e), False  # TensorFlow's, from the engine's ops.
  except Exception as e:  # pylint: disable=broad-except
    return "failed", _error(e), False
  chunked = any("/chunks" in op.name for op in graph.get_operations()[before:])
  try:
    got = sess.run(forward, feed)
  except Exception as e:  # pylint: disable=broad-except
    return "failed", "at run time: " + _error(e), chunked
  want = np.einsum(from_rows, h)
  if got.shape != want.shape:
    return "failed", f"shape {got.shape}, the rows' {want.shape}", chunked
  error = float(np.max(np.abs(got - want), initial=0.0))
  atol = 1e-8 * max(1.0, float(np.max(np.abs(h), initial=0.0)))
  if not error <= atol:  # (NaN too.)
    return "failed", f"max abs error {error:.3g} (atol {atol:.3g})", chunked
  return "agree", "", chunked


def _reference(seed, k, batch, lists, loops):
  """The row loop's Hessians of the model of `seed`, built in a graph of its
  own under control flow v2 (under v1, TensorFlow has no second derivative
  of a loop) and run by a session of their own (one that ran a v2 loop, as
  growing the model does, cannot run a gradient through it built later).
  Raises what the rows raise."""
  v1 = not tf.compat.v1.control_flow_v2_enabled()
  tf.compat.v1.enable_control_flow_v2()
  try:
    with tf.Graph().as_default() as graph:
      with tf.compat.v1.Session(graph=graph) as sess:
        model, ys, x, feed = _grow(seed, k, batch, lists, loops, sess)
      h = tf1hess.batch_hessians(ys, x, method="while_loop")
      with tf.compat.v1.Session(graph=graph) as sess:
        return model.lines, sess.run(h, feed)
  finally:
    if v1:
      tf.compat.v1.disable_control_flow_v2()


def _grow(seed, k, batch, lists, loops, sess):
  """`(model, ys, x, feed)`: the model of `seed` in `sess`'s graph."""
  # Two streams of one seed (`Generator.spawn` needs numpy 1.25).
  x_rng, model_rng = (np.random.default_rng([seed, i]) for i in range(2))
  x = tf.compat.v1.placeholder(tf.float64, [None, k], name="x")
  feed = {x: x_rng.normal(size=[batch, k])}
  model = _Model(model_rng, x, sess, feed)
  ys = model.build(int(model_rng.integers(3, 8)), lists, loops)
  return model, ys, x, feed


def check_seed(
  seed, modes, k, batch, lists, switch=False, rows=(), loops=False
):
  """Checks the model of `seed`: its description, `[(mode, status, detail)]`
  (status "agree", "declined" or "failed") and the count of forward walks
  in chunks. With `switch`, `method="auto"` made to build a `tf.cond` on N
  that runs the engine on even seeds and the rows on odd ones. With `rows`
  (names of `_ROW_BUILDS`), those builds instead of the engine, each mode
  named `mode/build`. With `loops`, the model draws loops too, and the
  reference is the rows' of a copy built under v2 (`_reference`)."""
  if rows:
    builds = {f"/{name}": _ROW_BUILDS[name] for name in rows}
  elif switch:  # The engine from N = `batch` on (even seeds), or under it.
    builds = {"": (tf1hess.Plan(), dispatch.Choice(seed % 2 == 1, batch))}
  else:
    builds = {"": (tf1hess.Plan(method="forward"), None)}
  with tf.Graph().as_default() as graph:
    with tf.compat.v1.Session(graph=graph) as sess:
      model, ys, x, feed = _grow(seed, k, batch, lists, loops, sess)
      with_loops = any(
        op.type in ("Exit", "While", "StatelessWhile")
        for op in graph.get_operations()
      )
      try:
        if with_loops:
          lines, h = _reference(seed, k, batch, lists, loops)
          assert lines == model.lines, "the v2 reference grew another model"
        else:
          h = tf1hess.batch_hessians(ys, x, method="while_loop")
          h = sess.run(h, feed)
      except Exception as e:  # pylint: disable=broad-except
        detail = "the rows' reference: " + _error(e)
        return model.lines, [(m, "failed", detail) for m in modes], 0
      results, chunked = [], 0
      for mode in modes:
        for name, (plan, choice) in builds.items():
          # A build that differentiates the model's own v2 loops (pfor) in
          # a session that ran them cannot run there, nor can any later
          # build: with loops, each runs in a session of its own.
          with (
            tf.compat.v1.Session(graph=graph)
            if with_loops
            else contextlib.nullcontext(sess)
          ) as run:
            status, detail, walked = _check(
              run, feed, ys, x, mode, h, plan, choice
            )
          results.append((mode + name, status, detail))
          chunked += walked
  return model.lines, results, chunked


def _command(seed):
  """The command line that checks `seed` alone."""
  args = [f"--seeds={seed}:{seed + 1}", f"--control_flow={_CONTROL_FLOW.value}"]
  args += [f"--k={_K.value}", f"--batch={_BATCH.value}"]
  args += ["--chunks"] * _CHUNKS.value + ["--lists"] * _LISTS.value
  args += ["--switch"] * _SWITCH.value + ["--loops"] * _LOOPS.value
  args += [f"--rows={','.join(_ROWS.value)}"] * bool(_ROWS.value)
  return "tools/forward_fuzz.py " + " ".join(args)


def main(argv):
  del argv
  if _CONTROL_FLOW.value == 1:
    tf.compat.v1.disable_control_flow_v2()
  tf.compat.v1.disable_eager_execution()
  lo, hi = (int(s) for s in _SEEDS.value.split(":"))
  modes = _MODES.value
  if set(modes) - set(_MODES_CHECKED):
    raise app.UsageError(f"--modes: not in {sorted(_MODES_CHECKED)}")
  if set(_ROWS.value) - set(_ROW_BUILDS):
    raise app.UsageError(f"--rows: not in {sorted(_ROW_BUILDS)}")
  batch = _BATCH.value
  if _CHUNKS.value:  # Chunks of 8 samples (`chunks._chunk_size`).
    batch = _CHUNK_ROWS
    forward_chunks.MIN_CHUNK = 8
    forward_chunks.CHUNK_BYTES = 2**10
  counts = {"agree": 0, "declined": 0, "failed": 0}
  chunked = 0
  for seed in range(lo, hi):
    lines, results, walks = check_seed(
      seed,
      modes,
      _K.value,
      batch,
      _LISTS.value,
      _SWITCH.value,
      _ROWS.value,
      _LOOPS.value,
    )
    chunked += walks
    model = "\n".join("    " + line for line in lines)
    if _VERBOSE.value:
      print(f"seed {seed}:\n{model}")
    for mode, status, detail in results:
      counts[status] += 1
      if status == "declined":
        print(f"seed {seed} {mode}: declined: {detail}")
      elif status == "failed":
        print(f"FAILURE seed {seed} {mode}: {detail}")
    if any(status == "failed" for _, status, _ in results):
      print(f"  command: {_command(seed)}\n  model:\n{model}")
    sys.stdout.flush()
  if _CHUNKS.value:
    print(f"forward walks in chunks: {chunked}")
  print(", ".join(f"{key} {value}" for key, value in counts.items()))
  return 1 if counts["failed"] else 0


if __name__ == "__main__":
  app.run(main)
