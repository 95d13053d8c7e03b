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


def _zero(m):
  return tf.zeros([], m.dtype)


@registry.register(
  "MatrixDiagPart", "MatrixDiagPartV2", "MatrixDiagPartV3", linear=True
)
@registry.of_first_input
def _diag_part(op, j, ctx):
  _check_batched(op, op.inputs[0], 2)
  if op.type == "MatrixDiagPart":
    return [
      jacobians.apply_per_sample(
        j, lambda m: tf.raw_ops.MatrixDiagPart(input=m)
      )
    ]
  k = op.inputs[1]
  if op.type == "MatrixDiagPartV2":
    return [
      jacobians.apply_per_sample(
        j,
        lambda m: tf.raw_ops.MatrixDiagPartV2(
          input=m, k=k, padding_value=_zero(m)
        ),
      )
    ]
  align = op.get_attr("align")
  return [
    jacobians.apply_per_sample(
      j,
      lambda m: tf.raw_ops.MatrixDiagPartV3(
        input=m, k=k, padding_value=_zero(m), align=align
      ),
    )
  ]


@registry.register("MatrixDiag", "MatrixDiagV2", "MatrixDiagV3", linear=True)
@registry.of_first_input
def _diag(op, j, ctx):
  _check_batched(op, op.inputs[0], _diagonals(op))
  if op.type == "MatrixDiag":
    return [
      jacobians.apply_per_sample(j, lambda m: tf.raw_ops.MatrixDiag(diagonal=m))
    ]
  _, k, rows, cols, _ = op.inputs
  attrs = {"align": op.get_attr("align")} if op.type == "MatrixDiagV3" else {}
  fn = getattr(tf.raw_ops, op.type)
  return [
    jacobians.apply_per_sample(
      j,
      lambda m: fn(
        diagonal=m,
        k=k,
        num_rows=rows,
        num_cols=cols,
        padding_value=_zero(m),
        **attrs,
      ),
    )
  ]


@registry.register("MatrixBandPart", linear=True)
@registry.of_first_input
def _band_part(op, j, ctx):
  _check_batched(op, op.inputs[0], 2)
  _, lower, upper = op.inputs
  return [
    jacobians.apply_per_sample(
      j, lambda m: tf.linalg.band_part(m, lower, upper)
    )
  ]


registry.rowwise(
  "MatrixDiagPart",
  "MatrixDiagPartV2",
  "MatrixDiagPartV3",
  "MatrixDiag",
  "MatrixDiagV2",
  "MatrixDiagV3",
  "MatrixBandPart",
)
