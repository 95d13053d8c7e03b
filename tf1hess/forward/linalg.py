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
solved alike, as more columns of it. By matrices of x, the tangents of
`Y = A^-1 B` are `A^-1 (T_B - T_A Y)`, solved alike.

`tf.linalg.inv`, `tf.linalg.slogdet` and `tf.linalg.det` of matrices of x
take their derivatives from the inverse `V`: `dV = -V T V`, `d log |det| =
tr(V T)`; `tf.linalg.cholesky` from its factor `L`: `dL = L Phi(L^-1 T
L^-T)`.
"""

import numpy as np
import tensorflow as tf

from tf1hess.forward import jacobians
from tf1hess.forward import registry


def _check_batched(op, t, matrix_axes):
  """Raises `Unsupported` unless `t` has an axis before its `matrix_axes`
  (its last ones), the batch axis."""
  if registry.static_rank(t, op) <= matrix_axes:
    raise registry.MixesSamples(
      f"{op.type} ({op.name}) reads the batch axis as an axis of its matrices"
    )


def _diagonals(op):
  """Axes of the diagonals of a `MatrixDiag*` op's first input: one more
  when `k` is a range of diagonals."""
  if op.type == "MatrixDiag":
    return 1
  k = registry.static_value(op.inputs[1], "k", op)
  return 1 if k.size == 1 or k[0] == k[-1] else 2


@registry.register(
  "MatrixDiagPart", "MatrixDiagPartV2", "MatrixDiagPartV3", linear=True
)
@registry.of_first_input
def _diag_part(op, j, ctx):
  _check_batched(op, op.inputs[0], 2)
  return [registry.on_tangents(op, j)]


@registry.register("MatrixDiag", "MatrixDiagV2", "MatrixDiagV3", linear=True)
@registry.of_first_input
def _diag(op, j, ctx):
  _check_batched(op, op.inputs[0], _diagonals(op))
  return [registry.on_tangents(op, j)]


@registry.register("MatrixBandPart", linear=True)
@registry.of_first_input
def _band_part(op, j, ctx):
  _check_batched(op, op.inputs[0], 2)
  return [registry.on_tangents(op, j)]


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


def _tangents_of_matrices(op, j, ctx):
  """The dense tangents `(N, K, *b, M, M)` of the op's matrices, those of
  their adjoints where the op reads them so (`adjoint`)."""
  _check_batched(op, op.inputs[0], 2)
  t = jacobians.to_dense(j, ctx.n)
  if "adjoint" in op.node_def.attr and op.get_attr("adjoint"):
    t = tf.linalg.matrix_transpose(t)
  return t


def _sandwiched(v, t):
  """`V T_k V` for every tangent `T_k` `(N, K, *b, M, M)` of a matrix whose
  inverse is `V` `(N, *b, M, M)`: `-dV`, and the transpose of what pairs
  with `T_l` in `tr(V T_k V T_l)`, the curvature of `log |det|`."""
  v = tf.expand_dims(v, 1)
  return tf.matmul(tf.matmul(v, t), v)


def _traces_by(v, t):
  """`tr(V T_k)` `(N, K, *b)`, the first derivatives of `log |det|`."""
  v = tf.expand_dims(tf.linalg.matrix_transpose(v), 1)
  return tf.reduce_sum(v * t, [-2, -1])


@registry.register("MatrixInverse")
@registry.of_first_input
def _matrix_inverse(op, j, ctx):
  """`V = A^-1` of matrices of x: `dV = -V T V`; the curvature `<adj, V T_k V
  T_l V>` and its transpose, `<T_k, W T_l^T V^T>` for `W = V^T adj V^T`."""
  t = _tangents_of_matrices(op, j, ctx)
  v = op.outputs[0]
  ve = tf.expand_dims(v, 1)

  def terms(adj):
    w = tf.matmul(tf.matmul(v, adj, transpose_a=True), v, transpose_b=True)
    paired = tf.matmul(
      tf.matmul(tf.expand_dims(w, 1), t, transpose_b=True),
      ve,
      transpose_b=True,
    )
    one = tf.ones([], t.dtype)
    return [
      jacobians.Term(
        one, jacobians.dense(t), jacobians.dense(paired), symmetric=True
      )
    ]

  ctx.curvature(v, terms)
  return [jacobians.dense(-_sandwiched(v, t))]


@registry.register("LogMatrixDeterminant", "MatrixDeterminant")
@registry.of_first_input
def _determinant(op, j, ctx):
  """`log |det A|` (`tf.linalg.slogdet`; `tf.linalg.logdet` is built on
  `Cholesky`) and `det A` of matrices of x: `d log |det| = tr(V T)` for `V =
  A^-1`, `d2 = -tr(V T_k V T_l)`; `det` is `exp` of it, times its sign."""
  t = _tangents_of_matrices(op, j, ctx)
  v = tf.linalg.inv(op.inputs[0])
  g = _traces_by(v, t)  # (N, K, *b)
  paired = jacobians.dense(tf.linalg.matrix_transpose(_sandwiched(v, t)))
  out = op.outputs[-1]  # log |det|, or det.
  scale = out if op.type == "MatrixDeterminant" else None

  def terms(adj):
    c = adj if scale is None else adj * scale
    inner = [jacobians.Term(-c[..., None, None], jacobians.dense(t), paired)]
    if scale is not None:
      inner.append(jacobians.Term(c, jacobians.dense(g)))
    return inner

  ctx.curvature(out, terms)
  first = g if scale is None else tf.expand_dims(scale, 1) * g
  outs = [jacobians.dense(first)]
  if op.type == "LogMatrixDeterminant":
    outs = [None] + outs  # The sign is piecewise constant.
  return outs


def _halved_lower(m):
  """`Phi(m)`: the lower triangle of `m`, its diagonal halved."""
  return tf.linalg.band_part(m, -1, 0) - 0.5 * tf.linalg.diag(
    tf.linalg.diag_part(m)
  )


@registry.register("Cholesky")
@registry.of_first_input
def _cholesky(op, j, ctx):
  """`L = cholesky(A)` of matrices of x, `A` read as symmetric (as by
  TensorFlow's gradient): tangents `T` of `(A + A^T) / 2` give `dL = L
  Phi(L^-1 T L^-T)`. From `L L^T = A`, the curvature `<adj, d2L>` is
  `-<dL_k, (R + R^T) dL_l>`, `R = L^-T Phi(L^T adj) L^-1`."""
  t = _tangents_of_matrices(op, j, ctx)
  t = 0.5 * (t + tf.linalg.matrix_transpose(t))
  lower = op.outputs[0]
  le = tf.expand_dims(lower, 1)

  def solve(m):  # L^-1 m, for every tangent.
    return tf.linalg.triangular_solve(le, m)

  inner = solve(tf.linalg.matrix_transpose(solve(t)))  # L^-1 T L^-T
  dl = jacobians.dense(tf.matmul(le, _halved_lower(inner)))

  def terms(adj):
    p = _halved_lower(tf.matmul(lower, adj, transpose_a=True))
    r = tf.linalg.triangular_solve(
      lower,
      tf.linalg.matrix_transpose(
        tf.linalg.triangular_solve(lower, p, adjoint=True)
      ),
      adjoint=True,
    )  # L^-T P^T L^-1, the transpose of R.
    both = tf.expand_dims(r + tf.linalg.matrix_transpose(r), 1)
    minus_one = -tf.ones([], t.dtype)
    return [jacobians.Term(minus_one, dl, jacobians.dense(both @ dl.value))]

  ctx.curvature(lower, terms)
  return [dl]


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
  as against `B` (a matrix per sample too). By matrices of x, see
  `_solve_by_matrices_of_x`.
  """
  if jacs[0] is not None:
    return _solve_by_matrices_of_x(op, jacs, ctx)
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
  return [j.with_value(_solved_as_columns(op, j.value, 0 if j.shared else 1))]


def _solved_as_columns(op, value, tangents):
  """The op's solve of tangents `value` (their axis `tangents`) of its
  right-hand side `(..., M, P)`, as `P K` columns of it."""
  rank = value.shape.rank
  perm = [a for a in range(rank) if a != tangents] + [tangents]
  moved = tf.transpose(value, perm)  # (..., M, P, K)
  shape = jacobians.dims(moved)
  columns = tf.reshape(
    moved, jacobians.concat(shape[:-2], [shape[-2] * shape[-1]])
  )
  solved = tf.reshape(_solved(op, columns), jacobians.concat(shape))
  return tf.transpose(solved, [int(p) for p in np.argsort(perm)])


def _solve_by_matrices_of_x(op, jacs, ctx):
  """`Y = A^-1 B` by matrices `A` of x (`(N, *b, M, M)`, those the op reads:
  its triangle, its adjoint). The tangents `T_Y = A^-1 (T_B - T_A Y)` are
  solved as columns; the curvature `<adj, -A^-1 (T_A,k T_Y,l + T_A,l
  T_Y,k)>` is `-<T_A,k, G T_Y,l^T>` and its transpose, `G = A^-T adj`."""
  ja, jb = jacs
  a, y = op.inputs[0], op.outputs[0]
  if isinstance(jb, registry.Moved) or a.shape.rank != y.shape.rank:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) solves by matrices of x a right-hand side "
      "whose batch axis is elsewhere"
    )
  ta = _tangents_of_matrices(op, ja, ctx)  # (N, K, *b, M, M)
  adjoint = op.get_attr("adjoint")
  if op.type == "MatrixTriangularSolve":
    # The triangle the op reads, transposed if it reads the adjoint.
    lower = op.get_attr("lower") != adjoint
    ta = tf.linalg.band_part(ta, -1 if lower else 0, 0 if lower else -1)
  ye = tf.expand_dims(y, 1)
  rhs = -tf.matmul(ta, ye)  # T_B - T_A Y: (N, K, *b, M, P)
  if jb is not None:
    rhs += jacobians.to_dense(jb, ctx.n)
  ty = _solved_as_columns(op, rhs, 1)

  def terms(adj):
    attrs = {"lower": op.get_attr("lower")} if op.type != "MatrixSolve" else {}
    g = getattr(tf.raw_ops, op.type)(
      matrix=a, rhs=adj, adjoint=not adjoint, **attrs
    )
    paired = tf.matmul(tf.expand_dims(g, 1), ty, transpose_b=True)
    minus_one = -tf.ones([], ta.dtype)
    return [
      jacobians.Term(
        minus_one,
        jacobians.dense(ta),
        jacobians.dense(paired),
        symmetric=True,
      )
    ]

  ctx.curvature(y, terms)
  return [jacobians.dense(ty)]


registry.moves("MatrixTriangularSolve", "MatrixSolve")


registry.rowwise(
  "MatrixDiagPart",
  "MatrixDiagPartV2",
  "MatrixDiagPartV3",
  "MatrixDiag",
  "MatrixDiagV2",
  "MatrixDiagV3",
  "MatrixBandPart",
)
