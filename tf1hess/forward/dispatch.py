"""Where the public ops choose between the forward engine and the row loop.

`method="forward"` always takes the engine and raises when it cannot follow
the model; `method="auto"` takes it when `prefers_forward` says so and falls
back to the row loop, with one warning that names the op, when the engine
cannot follow the model.
"""

from absl import logging
import tensorflow as tf

from tf1hess import _core
from tf1hess.forward import engine
from tf1hess.forward import jacobians


def prefers_forward(x, grad, mode):
  """The cost model of `method="auto"`: whether to try the forward engine.

  Measured side by side (docs/forward.md, tanh MLPs of 1 and 3 layers of 64
  units and a 10-component Gaussian mixture, K = 4 to 256):

  - full Hessians: the engine contracts `J^T diag(c) J` per nonlinear layer,
    `N K^2 W` per layer of width W, about what the rows' `K` backward passes
    cost; it was not faster than the rows (0.7x to 1.1x), so the rows keep
    full Hessians;
  - diagonals and Laplacians: the engine needs `N K W` per layer for them and
    was 1.5x to 5x faster than the rows, except on one dense layer followed
    by elementwise ops, where the rows' shortcut (one matmul) is faster: the
    rows keep that model.

  Args:
    x: the input `Tensor` `(N, d...)`.
    grad: `d sum(ys) / dx`.
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.

  Returns:
    `bool`.
  """
  if mode == jacobians.HESSIAN:
    return False
  return not _rows_take_one_matmul(x, grad)


def _rows_take_one_matmul(x, grad):
  """Whether the rows' shortcut for one dense layer then elementwise ops
  applies (`_core._elementwise_rows`): all rows from one matmul."""
  # pylint: disable=protected-access
  k = tf.compat.dimension_value(x.shape[1]) if x.shape.rank == 2 else None
  if k is None or grad.shape.rank != 2:
    return False
  graph = _core._Graph(x)
  terms = _core._tail_terms(grad, graph)
  head = _core._head(x, [t for t, _ in terms], graph)
  return head is not None and _core._elementwise_rows_fit(
    head, terms, k, k, grad.dtype
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


def try_forward(ys, x, grad, mode, method, unconnected):
  """`(result, True)` from the engine for `x`, or `(None, False)` for rows.

  Args:
    ys: the list of outputs.
    x: the input `Tensor` `(N, d...)`.
    grad: `d sum(ys) / dx` (not `None`).
    mode: `jacobians.HESSIAN`, `DIAGONAL` or `LAPLACIAN`.
    method: the caller's `method` (`"forward"`, or another to try the engine
      only when `prefers_forward`).
    unconnected: a `tf.UnconnectedGradients`.

  Returns:
    `(result, True)` with `result` shaped like the row loop's (`None` when
    the second derivative is unconnected and `unconnected` is NONE), or
    `(None, False)` when the row loop is to build it.

  Raises:
    ValueError: with `method="forward"`, when the engine cannot follow an op.
  """
  if method != "forward" and (
    method != "auto" or not prefers_forward(x, grad, mode)
  ):
    return None, False
  try:
    result, connected = engine.second_derivatives(ys, x, mode)
  except engine.Unsupported as e:
    if method == "forward":
      raise ValueError(
        f"`method`='forward' cannot differentiate `ys` with respect to "
        f"{x.name}: {e}. Use method='auto' to fall back to the row loop."
      ) from None
    logging.warning(
      "tf1hess: the forward engine falls back to the row loop for %s: %s.",
      x.name,
      e,
    )
    return None, False
  if (
    not connected
    and unconnected == tf.UnconnectedGradients.NONE
    and not _core._Graph(x).depends(grad)  # pylint: disable=protected-access
  ):
    return None, True
  return shaped(result, x, mode), True
