"""Forward rules of the linear matrix ops on the last two axes.

`tf.linalg.diag_part` (and `tf.linalg.trace`, built on it), `tf.linalg.diag`
and `tf.linalg.band_part` take entries of each matrix, or place them, and
write constants elsewhere: they are linear, and the Jacobian's tangents go
through the op with the same diagonals and bands, the constant
(`padding_value`) made 0. The matrices must be entries of one sample: an
input of rank 2 would make the batch axis an axis of the matrices, which
mixes samples.
"""

import tensorflow as tf

from tf1hess.forward import jacobians
from tf1hess.forward import registry


def _check_batched(op, t, matrix_axes):
  """Raises `Unsupported` unless `t` has an axis before its `matrix_axes`
  (its last ones), the batch axis."""
  if registry.static_rank(t, op) <= matrix_axes:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) reads the batch axis as an axis of its matrices"
    )


def _diagonals(op):
  """Axes of the diagonals of a `MatrixDiag*` op's first input: one more
  when `k` is a range of diagonals."""
  if op.type == "MatrixDiag":
    return 1
  k = registry.static_value(op.inputs[1], "k", op)
  return 1 if k.size == 1 or k[0] == k[-1] else 2


def _on_tangents(op, j):
  """`j` through the op itself (`registry.twin`), its first input the
  tangents, a padding value 0."""
  first = op.op_def.input_arg[0].name
  padding = "padding_value" in [arg.name for arg in op.op_def.input_arg]

  def apply(m):
    zeros = {"padding_value": tf.zeros([], m.dtype)} if padding else {}
    return registry.twin(op, **{first: m}, **zeros)

  return [jacobians.apply_per_sample(j, apply)]


@registry.register(
  "MatrixDiagPart", "MatrixDiagPartV2", "MatrixDiagPartV3", linear=True
)
@registry.of_first_input
def _diag_part(op, j, ctx):
  _check_batched(op, op.inputs[0], 2)
  return _on_tangents(op, j)


@registry.register("MatrixDiag", "MatrixDiagV2", "MatrixDiagV3", linear=True)
@registry.of_first_input
def _diag(op, j, ctx):
  _check_batched(op, op.inputs[0], _diagonals(op))
  return _on_tangents(op, j)


@registry.register("MatrixBandPart", linear=True)
@registry.of_first_input
def _band_part(op, j, ctx):
  _check_batched(op, op.inputs[0], 2)
  return _on_tangents(op, j)


registry.rowwise(
  "MatrixDiagPart",
  "MatrixDiagPartV2",
  "MatrixDiagPartV3",
  "MatrixDiag",
  "MatrixDiagV2",
  "MatrixDiagV3",
  "MatrixBandPart",
)
