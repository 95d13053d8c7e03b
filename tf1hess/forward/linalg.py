"""Forward rules of the linear matrix ops on the last two axes.

`tf.linalg.diag_part` (and `tf.linalg.trace`, built on it), `tf.linalg.diag`
and `tf.linalg.band_part` take entries of each matrix, or place them, and
write constants elsewhere: they are linear, and the Jacobian's tangents go
through the op with the same diagonals and bands, the constant
(`padding_value`) made 0. The matrices must be entries of one sample: an
input of rank 2 would make the batch axis an axis of the matrices, which
mixes samples.

`tf.linalg.set_diag` is linear in the matrices and in the diagonals.

`tf.linalg.triangular_solve` and `tf.linalg.solve` by a matrix that does
not depend on x are linear in their right-hand side: its tangents are
solved alike, as more columns of it.
"""

import numpy as np
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


@registry.register("MatrixSetDiag", "MatrixSetDiagV3", linear=True)
def _set_diag(op, jacs, ctx):
  """`tf.linalg.set_diag`: the matrices with their diagonals replaced,
  linear in both; the tangents of each go where its entries go, zeros
  where the other's do."""
  ji, jd = jacs[:2]
  if ji is None and jd is None:
    return [None]
  _check_batched(op, op.inputs[0], 2)
  matrices, diagonals = op.inputs[:2]

  def zeros(like, m):
    shape = jacobians.concat(jacobians.dims(m)[:1], jacobians.dims(like, 1))
    return tf.zeros(shape, m.dtype)

  def of_matrices(m):
    return registry.twin(op, input=m, diagonal=zeros(diagonals, m))

  def of_diagonals(d):
    return registry.twin(op, input=zeros(matrices, d), diagonal=d)

  if jd is None:
    return [jacobians.apply_per_sample(ji, of_matrices)]
  if ji is None:
    return [jacobians.apply_per_sample(jd, of_diagonals)]
  value = registry.twin(
    op,
    input=jacobians.to_dense(ji, ctx.n),
    diagonal=jacobians.to_dense(jd, ctx.n),
  )
  return [jacobians.dense(value)]


def _solved(op, m):
  """The op's solve of `m` as its right-hand side, by its own matrix (in
  the dtype of `m`)."""
  return registry.twin(op, matrix=tf.cast(op.inputs[0], m.dtype), rhs=m)


def _inverse(op, dtype):
  """The op's solve of the identity, `A^-1` (of the triangle, or of the
  adjoint: what the op multiplies its right-hand side by), built once
  outside the chunks; `None` unless `A` is one static square matrix."""
  a = op.inputs[0]
  if a.shape.rank != 2 or not a.shape.is_fully_defined():
    return None
  size = tf.compat.dimension_value(a.shape[0])
  return jacobians.invariant(
    lambda a: _solved(op, tf.eye(size, dtype=dtype)), a
  )


def _solves_by_a_constant(op, jacs):
  return jacs[0] is None


@registry.register(
  "MatrixTriangularSolve", "MatrixSolve", linear=_solves_by_a_constant
)
def _solve(op, jacs, ctx):
  """`A^-1 B` (of a triangular `A`, or of its adjoint) for `A` that does
  not depend on x is linear in `B`.

  Where `A` is one matrix `(M, M)`, the tangents are multiplied by `A^-1`
  (`_inverse`), one matmul by it: a right-hand side whose batch axis is its
  columns, `tf.transpose(x)` `(M, N)` (a Mahalanobis distance by a
  Cholesky factor; `registry.Moved`), has each sample's tangents `(K, M)`
  times `A^-T`, and one of vectors `(N, *b, M, 1)` its tangents `(N K *b,
  M)` times `A^-T` too. Else the tangents of `B` `(N, *b, M, P)` are solved
  as more columns, `(N, *b, M, P K)`, so that `A` broadcasts against them
  as against `B` (a matrix per sample too).
  """
  if jacs[0] is not None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) solves by a matrix that depends on x"
    )
  j = jacs[1]
  if j is None:
    return [None]
  rhs = op.inputs[1]
  if isinstance(j, registry.Moved):
    inverse = _inverse(op, j.jacobian.value.dtype)
    if j.perm != [1, 0] or inverse is None:
      return [registry.MIXED]
    return [
      registry.Moved(
        jacobians.apply_per_sample(
          j.jacobian, lambda m: tf.matmul(m, inverse, transpose_b=True)
        ),
        j.perm,
      )
    ]
  _check_batched(op, rhs, 2)
  inverse = _inverse(op, j.value.dtype)
  if inverse is not None and tf.compat.dimension_value(rhs.shape[-1]) == 1:
    # Vectors: `(..., M, 1)` holds the entries of `(..., M)`.
    def times_inverse(m):
      shape = jacobians.dims(m)
      rows = tf.reshape(m, [-1, shape[-2]])
      return tf.reshape(
        tf.matmul(rows, inverse, transpose_b=True), jacobians.concat(shape)
      )

    return [jacobians.apply_per_sample(j, times_inverse)]
  per_sample = registry.static_rank(op.inputs[0], op) == rhs.shape.rank
  if per_sample:
    j = jacobians.dense(jacobians.to_dense(j, ctx.n))
  value = j.value
  tangents = 0 if j.shared else 1
  rank = value.shape.rank
  perm = [a for a in range(rank) if a != tangents] + [tangents]
  moved = tf.transpose(value, perm)  # (..., M, P, K)
  shape = jacobians.dims(moved)
  columns = tf.reshape(
    moved, jacobians.concat(shape[:-2], [shape[-2] * shape[-1]])
  )
  solved = tf.reshape(_solved(op, columns), jacobians.concat(shape))
  value = tf.transpose(solved, [int(p) for p in np.argsort(perm)])
  return [j.with_value(value)]


registry.moves("MatrixTriangularSolve", "MatrixSolve")


registry.rowwise(
  "MatrixDiagPart",
  "MatrixDiagPartV2",
  "MatrixDiagPartV3",
  "MatrixDiag",
  "MatrixDiagV2",
  "MatrixDiagV3",
  "MatrixBandPart",
  "MatrixSetDiag",
  "MatrixSetDiagV3",
)
