"""Where the public ops choose between the forward engine and the row loop.

`method="forward"` always takes the engine and raises when it cannot follow
the model; `method="auto"` builds it, falls back to the row loop with one
warning that names the op when the engine cannot follow the model, and keeps
its result when `prefers_forward` says so (the engine's unused ops are never
run).
"""

import weakref

from absl import logging
import tensorflow as tf

from tf1hess import _shortcuts
from tf1hess import plan as plan_lib
from tf1hess.forward import engine
from tf1hess.forward import jacobians


def prefers_forward(x, grad, mode, walked):
  """The cost model of `method="auto"`: whether to keep the engine's result.

  Measured side by side in one process (docs/forward.md: a DeepXDE-style
  tanh MLP 3 x 64, a residual MLP with layer normalization, a Gaussian
  mixture; K = 10 to 256):

  - diagonals and Laplacians: the engine contracts its terms in `N K M`
    (M entries per sample of a term) and was 1.4x to 95x faster than the
    rows, except on one dense layer followed by elementwise ops, where the
    rows' shortcut (one matmul for all rows) is faster: the rows keep that
    model;
  - full Hessians: a term costs `N K^2 M` unless both its Jacobians are
    diagonal, and a matmul of a dense Jacobian `(N K, W)` costs about what
    a row costs in that layer. Where no dense Jacobian goes through a
    matmul and every term is narrower than K (a mixture: M = the 10
    components) the engine was 2.5x to 12x faster than the rows; on the
    MLPs (dense Jacobians through layers of 32 or 64 units) 0.85x to 1.7x
    the rows' time: the rows keep those. (Terms narrower than K alone do
    not suffice: with K much larger than the widths, `N K^2 M` per layer
    exceeds the rows' K passes through the first layer.)

  Args:
    x: the input `Tensor` `(N, d...)`.
    grad: `d sum(ys) / dx`.
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.
    walked: the `engine.Result` of the walk.

  Returns:
    `bool`.
  """
  if _rows_take_one_matmul(x, grad):
    return False
  if mode != jacobians.HESSIAN:
    return True
  k = x.shape[1:].num_elements() if x.shape[1:].is_fully_defined() else None
  return (
    k is not None
    and walked.widest is not None
    and walked.widest < k
    and not walked.dense_matmuls
  )


def _rows_take_one_matmul(x, grad):
  """Whether the rows' shortcut for one dense layer then elementwise ops
  applies (`_shortcuts._elementwise_rows`): all rows from one matmul."""
  k = tf.compat.dimension_value(x.shape[1]) if x.shape.rank == 2 else None
  if k is None or grad.shape.rank != 2:
    return False
  plan = plan_lib.Plan()
  graph = _shortcuts.Graph(x)
  terms = _shortcuts.tail_terms(grad, graph, plan.max_terms)
  layer = _shortcuts.head(x, [t for t, _ in terms], graph)
  return layer is not None and _shortcuts.elementwise_rows_fit(
    layer, terms, k, k, grad.dtype, plan.max_factor_bytes
  )


def shaped(result, x, mode):
  """`result` `(N, K, K)`, `(N, K)` or `(N,)` in the shape of `x`'s dims."""
  dims = x.shape[1:]
  copies = {jacobians.HESSIAN: 2, jacobians.DIAGONAL: 1, jacobians.LAPLACIAN: 0}
  count = copies[mode]
  if count == 0:
    result.set_shape(x.shape[:1])
    return result
  tail = tf.shape(x)[1:]
  shape = tf.concat([tf.shape(x)[:1]] + [tail] * count, axis=0)
  result = tf.reshape(result, shape)
  result.set_shape(x.shape[:1].concatenate(dims.as_list() * count))
  return result


# Messages already logged, per graph: one warning per graph and reason, not
# one per op built on the same model.
_WARNED = weakref.WeakKeyDictionary()


def _warn_once(graph, message):
  seen = _WARNED.setdefault(graph, set())
  if message not in seen:
    seen.add(message)
    logging.warning("%s", message)


def try_forward(ys, x, grad, mode, method, unconnected):
  """`(result, True)` from the engine for `x`, or `(None, False)` for rows.

  Args:
    ys: the list of outputs.
    x: the input `Tensor` `(N, d...)`.
    grad: `d sum(ys) / dx` (not `None`).
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.
    method: the caller's `method`: `"forward"`, `"auto"` (the engine when it
      can follow the model and `prefers_forward`), or another (the rows).
    unconnected: a `tf.UnconnectedGradients`.

  Returns:
    `(result, True)` with `result` shaped like the row loop's (`None` when
    the second derivative is unconnected and `unconnected` is NONE), or
    `(None, False)` when the row loop is to build it.

  Raises:
    ValueError: with `method="forward"`, when the engine cannot follow an op.
  """
  if method not in ("forward", "auto"):
    return None, False
  try:
    walked = engine.second_derivatives(ys, x, mode)
  except engine.Unsupported as e:
    if method == "forward":
      raise ValueError(
        f"`method`='forward' cannot differentiate `ys` with respect to "
        f"{x.name}: {e}. Use method='auto' to fall back to the row loop."
      ) from None
    _warn_once(
      x.graph,
      f"tf1hess: the forward engine falls back to the row loop for {x.name}:"
      f" {e}.",
    )
    return None, False
  if method == "auto" and not prefers_forward(x, grad, mode, walked):
    return None, False
  if (
    not walked.connected
    and unconnected == tf.UnconnectedGradients.NONE
    and not _shortcuts.Graph(x).depends(grad)
  ):
    return None, True
  return shaped(walked.value, x, mode), True
