"""The methods the benchmark times, each with its metadata in one place.

A method builds, for a `cases.Case`, a runner that computes the case's
quantity (`hessian` `(N, K, K)`, `diagonal` `(N, K)` or `laplacian`
`(N,)`): `run()` computes it without copying it out, `value()` returns it as
numpy for the check, `warm_up_small()` runs once without allocating for the
full batch (for the memory probe), `close()` frees it.
"""

import dataclasses
import importlib.util
import os
import re
from typing import Callable

import numpy as np
import tensorflow as tf

from tensorflow.python.ops.parallel_for import gradients as pfor_gradients  # pylint: disable=g-direct-tensorflow-import
import tf1hess

ALL_QUANTITIES = frozenset(("hessian", "diagonal", "laplacian"))
# DeepXDE's tensorflow.compat.v1 backend, set before it is imported.
DDE_BACKEND = "tensorflow.compat.v1"


class SkipMethod(Exception):
  """The method does not apply to this case (e.g. it cannot fit in memory)."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A way to compute per-sample second derivatives, and what it needs.

  Attributes:
    name: the registry key (`--methods`).
    label: shown in reports; `{of}` becomes `hessian`, `diag(hessian)` or
      `trace(hessian)`, `{then}` `""`, `" + diagonal"` or `" + trace"` for
      methods that reduce a full Hessian to the quantity.
    build: `(case) -> runner`.
    quantities: the quantities it computes.
    frameworks: what it runs on: `tf1` (a graph and a session), `tf2`
      (eager execution, `tf.function`), `jax`, `deepxde`.
    requires: modules that must be importable for it to run.
    floor: not a derivative: the least time its framework takes to write
      an output of the quantity's size; never checked.
    models: the models it is timed on unless named in `--methods`
      (`None`: all).
  """

  name: str
  label: str
  build: Callable
  quantities: frozenset = ALL_QUANTITIES
  frameworks: tuple = ("tf1",)
  requires: tuple = ()
  floor: bool = False
  models: tuple = None

  @property
  def isolated(self):
    """Runs where DeepXDE's compat.v1 backend turned off TF2 behavior."""
    return "deepxde" in self.frameworks

  @property
  def eager(self):
    return "tf2" in self.frameworks

  def available(self):
    return all(importlib.util.find_spec(m) for m in self.requires)

  def label_for(self, quantity):
    of = {"hessian": "hessian", "diagonal": "diag(hessian)"}
    then = {"hessian": "", "diagonal": " + diagonal"}
    return self.label.format(
      of=of.get(quantity, "trace(hessian)"), then=then.get(quantity, " + trace")
    )


# ---------------------------------------------------------------- runners


class GraphRunner:
  """A TF1 graph with a `(None, K)` placeholder, run in its own session.

  `run()` executes the op that produces the output without fetching it (no
  copy to numpy); `value()` fetches it for the check.
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


# ------------------------------------------------------------ TensorFlow


def reduce_tf(hessians, quantity):
  """`(N, K, K)` -> the quantity, in the graph."""
  if quantity == "hessian":
    return hessians
  if quantity == "diagonal":
    return tf.linalg.diag_part(hessians)
  return tf.linalg.trace(hessians)


def _graph_method(build, reduce=False):
  """A method built in a graph from `build(y, x, case)`.

  `build` returns the case's quantity, or with `reduce` a full Hessian that
  `reduce_tf` turns into it.
  """

  def make(case):
    graph = tf.Graph()
    with graph.as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, case.k])
      out = build(case.tf_fn(x), x, case)
      if reduce:
        out = reduce_tf(out, case.quantity)
    return GraphRunner(graph, x, out, case.x)

  return make


_TF1HESS_OPS = {
  "hessian": tf1hess.batch_hessians,
  "diagonal": tf1hess.batch_hessian_diagonals,
  "laplacian": tf1hess.batch_laplacians,
}


def tf1hess_method(**kwargs):
  """tf1hess's op for the case's quantity, with `kwargs` (`method=`...)."""
  return _graph_method(
    lambda y, x, case: _TF1HESS_OPS[case.quantity](y, x, **kwargs)
  )


_EAGER_OPS = {
  "hessian": tf1hess.eager.batch_hessians,
  "diagonal": tf1hess.eager.batch_hessian_diagonals,
  "laplacian": tf1hess.eager.batch_laplacians,
}


def _tf1hess_eager_function(case):
  op = _EAGER_OPS[case.quantity]
  fn = tf.function(
    lambda x: op(case.tf_fn, x),
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

  return _graph_method(build, reduce=True)


def _parallel_for_batch_jacobian(case):
  """`parallel_for.gradients.batch_jacobian` of the gradient, in a graph.

  It fails on a `None` batch with TF2's TensorShape (TensorFlow issue
  45539); it is then built the way users get it to work, with TF1's
  TensorShape (as after `tf.compat.v1.disable_v2_behavior()`).
  """

  def build(y, x, case):
    (g,) = tf.gradients(y, x)
    return pfor_gradients.batch_jacobian(g, x)

  make = _graph_method(build, reduce=True)
  try:
    return make(case)
  except Exception as error:  # pylint: disable=broad-except
    failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
  v2_shapes = isinstance(tf.TensorShape([1])[0], int)
  tf.compat.v1.disable_v2_tensorshape()
  try:
    runner = make(case)
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
  if nbytes > case.settings.tf_hessians_max_bytes:
    raise SkipMethod(
      f"its (N*K)^2 output needs {nbytes / 2**30:.2g} GiB "
      f"> --tf_hessians_max_bytes"
    )

  def build(y, x, case):
    full = tf.hessians(y, x)[0]  # (N, K, N, K)
    i = tf.range(tf.shape(x)[0])
    return tf.gather_nd(
      tf.transpose(full, [0, 2, 1, 3]), tf.stack([i, i], axis=1)
    )

  return _graph_method(build, reduce=True)(case)


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
    return reduce_tf(tf.transpose(rows, [1, 0, 2]), case.quantity)

  return FunctionRunner(fn, tf.constant(case.x))


def _dde_grad_hessian(case):
  """`dde.grad.hessian(y, x, i=i, j=j)` for every entry the quantity needs.

  One gradient, then one backward pass per Hessian row (cached per row), as
  DeepXDE builds its PDE residuals; each entry is `(N, 1)`.
  """
  if os.environ.get("DDE_BACKEND") != DDE_BACKEND:
    raise RuntimeError(
      f"dde.grad.hessian needs DeepXDE's {DDE_BACKEND} backend, in a process "
      "of its own (benchmarks.child)"
    )
  import deepxde as dde  # pylint: disable=import-outside-toplevel

  def build(y, x, case):
    dde.grad.clear()
    y = y[:, None]
    k = case.k
    if case.quantity == "laplacian":
      return tf.add_n([dde.grad.hessian(y, x, i=j, j=j) for j in range(k)])[
        :, 0
      ]
    if case.quantity == "diagonal":
      return tf.concat([dde.grad.hessian(y, x, i=j, j=j) for j in range(k)], 1)
    rows = [
      tf.concat([dde.grad.hessian(y, x, i=i, j=j) for j in range(k)], 1)
      for i in range(k)
    ]
    return tf.stack(rows, 1)

  return _graph_method(build)(case)


def _output_shape(case):
  return {"hessian": [case.k, case.k], "diagonal": [case.k]}.get(
    case.quantity, []
  )


def _tf1_output_floor(case):
  """Not a derivative: a TF1 graph that only writes an output of its size."""
  fill = np.ones(_output_shape(case), np.float32)
  return _graph_method(
    lambda y, x, case: tf.broadcast_to(
      fill, tf.concat([tf.shape(x)[:1], fill.shape], axis=0)
    )
  )(case)


# -------------------------------------------------------------------- JAX


def _jax_method(make):
  """A method that calls `jax.jit(make(jax, case))` on the inputs."""

  def build(case):
    import jax  # pylint: disable=import-outside-toplevel

    return FunctionRunner(
      jax.jit(make(jax, case)),
      jax.numpy.asarray(case.x),
      block=lambda out: out.block_until_ready(),
    )

  return build


def _jax_vmap_hessian(jax, case):
  reduce = {
    "hessian": lambda h: h,
    "diagonal": jax.numpy.diagonal,
    "laplacian": jax.numpy.trace,
  }[case.quantity]
  hessian = jax.hessian(case.jax_fn())
  return jax.vmap(lambda x: reduce(hessian(x)))


def _folx_forward_laplacian(jax, case):
  import folx  # pylint: disable=import-outside-toplevel

  laplacian = folx.forward_laplacian(case.jax_fn())
  return jax.vmap(lambda x: laplacian(x).laplacian)


def _jax_output_floor(jax, case):
  """Not a derivative: a JAX function that only writes its output."""
  fill = jax.numpy.ones(_output_shape(case), jax.numpy.float32)
  return lambda x: jax.numpy.broadcast_to(fill, (x.shape[0],) + fill.shape)


# ---------------------------------------------------------------- registry

_METHODS = (
  Method("tf1hess_auto", "tf1hess (default)", tf1hess_method()),
  Method(
    "tf1hess_pfor", "tf1hess method='pfor'", tf1hess_method(method="pfor")
  ),
  Method(
    "tf1hess_while_loop",
    "tf1hess method='while_loop'",
    tf1hess_method(method="while_loop"),
  ),
  Method(
    "tf1hess_forward",
    "tf1hess method='forward'",
    tf1hess_method(method="forward"),
  ),
  Method(
    "tf1hess_eager_function",
    "tf1hess.eager in tf.function",
    _tf1hess_eager_function,
    frameworks=("tf2",),
  ),
  Method(
    "batch_jacobian_pfor",
    "tape.batch_jacobian (pfor){then}",
    _tape_batch_jacobian(True),
  ),
  Method(
    "batch_jacobian_while",
    "tape.batch_jacobian (use_pfor=False){then}",
    _tape_batch_jacobian(False),
  ),
  Method(
    "parallel_for_batch_jacobian",
    "parallel_for batch_jacobian{then}",
    _parallel_for_batch_jacobian,
  ),
  Method(
    "tf_hessians_diagonal",
    "tf.hessians + diagonal blocks{then}",
    _tf_hessians_diagonal,
  ),
  Method(
    "forward_accumulator_vmap",
    "ForwardAccumulator + vectorized_map{then}",
    _forward_accumulator_vmap,
    frameworks=("tf2",),
  ),
  Method(
    "jax_jit_vmap_hessian",
    "JAX jit(vmap({of}))",
    _jax_method(_jax_vmap_hessian),
    frameworks=("jax",),
    requires=("jax",),
  ),
  Method(
    "folx_forward_laplacian",
    "folx forward_laplacian (jit, vmap)",
    _jax_method(_folx_forward_laplacian),
    quantities=frozenset(("laplacian",)),
    frameworks=("jax",),
    requires=("jax", "folx"),
  ),
  Method(
    "dde_grad_hessian",
    "DeepXDE dde.grad.hessian entries",
    _dde_grad_hessian,
    frameworks=("tf1", "deepxde"),
    requires=("deepxde",),
    models=("deepxde_fnn",),
  ),
  Method(
    "tf1_output_floor",
    "floor: TF1 session writing the output only",
    _tf1_output_floor,
    floor=True,
  ),
  Method(
    "jax_output_floor",
    "floor: JAX jit writing the output only",
    _jax_method(_jax_output_floor),
    frameworks=("jax",),
    requires=("jax",),
    floor=True,
  ),
)
METHODS = {m.name: m for m in _METHODS}

# Every other method's output is checked against this one's (itself checked
# against the model's analytic Hessian where there is one); ratios are to it.
REFERENCE = "tf1hess_auto"

_CHUNKED = re.compile(r"tf1hess_pfor_chunk(\d+)")


def get(name):
  """The method `name`, `tf1hess_pfor_chunk<C>` included; else ValueError."""
  if name in METHODS:
    return METHODS[name]
  match = _CHUNKED.fullmatch(name)
  if match and int(match.group(1)) > 0:
    chunk = int(match.group(1))
    return Method(
      name,
      f"tf1hess method='pfor', chunk_size={chunk}",
      tf1hess_method(method="pfor", chunk_size=chunk),
    )
  raise ValueError(
    f"`methods` must name entries of {sorted(METHODS)} or "
    f"tf1hess_pfor_chunk<C>; saw {name!r}."
  )


def default_methods(model, quantity, among=None):
  """The available methods timed on `model` and `quantity` by default.

  `among`: only these names (all registered methods if `None`).
  """
  return [
    m.name
    for m in _METHODS
    if (among is None or m.name in among)
    and quantity in m.quantities
    and m.available()
    and (m.models is None or model in m.models)
  ]
