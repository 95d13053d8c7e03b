"""Forward rules of elementwise ops: activations and arithmetic.

An elementwise op `v = f(a, b)` has the Jacobian `f_a J_a + f_b J_b` and the
curvature `adj f_aa J_a J_a^T + adj f_bb J_b J_b^T + adj f_ab (J_a J_b^T +
J_b J_a^T)` summed over the entries; a unary op keeps only the first terms.
The derivatives are written with the op's output `v` where that is cheaper,
and follow the masks of TensorFlow's own gradients at kinks (`Relu` at 0,
`Maximum` at ties), so that the engine and the row loop agree there.
"""

import numpy as np
import tensorflow as tf

from tf1hess.forward import jacobians
from tf1hess.forward import registry

_SELU_SCALE = 1.0507009873554805
_SELU_ALPHA = 1.6732632423543772
_TWO_OVER_SQRT_PI = 1.1283791670955126
_SQRT_PI_OVER_TWO = 0.886226925452758
_SQRT_TWO_PI = 2.5066282746310002


def _unary_rule(derivatives):
  """A rule from `derivatives(u, v, op) -> (f', f'' or None)`.

  On a tensor whose batch axis a transpose moved (`registry.Moved`), the
  function of the batch-first tensor, its derivatives transposed back.
  """

  def rule(op, jacs, ctx):
    (j,) = jacs[:1]
    if j is None:
      return [None]
    perm = None
    if isinstance(j, registry.Moved):
      j, perm = j.jacobian, j.perm

    def batch_first(t):
      if perm is None or not t.shape.rank:
        return t
      return tf.transpose(t, np.argsort(perm))

    u, v = op.inputs[0], op.outputs[0]
    first, second = derivatives(u, v, op)
    if second is not None:
      ctx.curvature(
        v,
        lambda adj: [jacobians.Term(batch_first(adj * second), j)],
        elementwise=True,
      )
    out = jacobians.scale(j, batch_first(first))
    return [out if perm is None else registry.Moved(out, perm)]

  return rule


def _zeros_where(mask, value):
  return tf.where(mask, tf.zeros_like(value), value)


def _gaussian(u, sign):
  """`f'` and `f''` of `erf` (`sign` 1) or `erfc` (`sign` -1)."""
  first = sign * _TWO_OVER_SQRT_PI * tf.exp(-u * u)
  return first, -2 * u * first


def _polygammas(u, order):
  """`f'` and `f''` of the polygamma function of `order` (-1: `lgamma`)."""
  return tuple(
    tf.math.polygamma(tf.constant(order + i, u.dtype), u) for i in (1, 2)
  )


def _at_zero(u):
  """Where `u` is 0, and `u` with ones there, to divide by; TensorFlow's
  gradients of the Bessel functions take their limits at 0."""
  zero = tf.equal(u, 0)
  return zero, tf.where(zero, tf.ones_like(u), u)


def _bessel_i1e_first(u, v):
  """`f'` of `bessel_i1e` (`v`), 1/2 at 0."""
  zero, safe = _at_zero(u)
  first = tf.math.bessel_i0e(safe) - v * (tf.sign(safe) + 1 / safe)
  return tf.where(zero, 0.5 * tf.ones_like(u), first)


def _bessel_i0e(u, v):
  """`f'` and `f''` of `bessel_i0e`: `f' = i1e - sign(u) f`."""
  i1e = tf.math.bessel_i1e(u)
  first = i1e - tf.sign(u) * v
  return first, _bessel_i1e_first(u, i1e) - tf.sign(u) * first


def _bessel_i1e(u, v):
  """`f'` and `f''` of `bessel_i1e` (`f''` 0 at 0, as TensorFlow's gradient
  of its gradient, which is constant there)."""
  first = _bessel_i1e_first(u, v)
  zero, safe = _at_zero(u)
  i0e_first = v - tf.sign(u) * tf.math.bessel_i0e(u)
  second = i0e_first - first * (tf.sign(safe) + 1 / safe) + v / (safe * safe)
  return first, _zeros_where(zero, second)


def _bessel_i1_first(u, v):
  """`f'` of `bessel_i1` (`v`): `i0 - v / u`, 1/2 at 0."""
  zero, safe = _at_zero(u)
  return tf.where(
    zero, 0.5 * tf.ones_like(u), tf.math.bessel_i0(safe) - v / safe
  )


def _bessel_i0(u):
  """`f'` and `f''` of `bessel_i0`: `i1` and its derivative."""
  i1 = tf.math.bessel_i1(u)
  return i1, _bessel_i1_first(u, i1)


def _bessel_i1(u, v):
  """`f'` and `f''` of `bessel_i1` (`f''` 0 at 0, as TensorFlow's)."""
  first = _bessel_i1_first(u, v)
  zero, safe = _at_zero(u)
  second = v - first / safe + v / (safe * safe)
  return first, _zeros_where(zero, second)


def _inverse_of_gaussian(scaled_v, first):
  """`f'` and `f''` of `erfinv` or `ndtri`, the inverses of integrals of
  Gaussians: `f'' = a v f'^2`, where `scaled_v` is `a v` (`a` 2 for
  `erfinv`, 1 for `ndtri`) and `first` is `f'`."""
  return first, scaled_v * first * first


def _rsqrt_of_quadratic(u, a, b, sign):
  """`f' = sign / sqrt(q)` and `f''` for `q = a + b u^2`: `asin`, `acos`,
  `asinh`, `acosh`."""
  r = tf.math.rsqrt(a + b * u * u)
  return sign * r, -sign * b * u * r * r * r


def _reciprocal_of_quadratic(u, b):
  """`f' = 1 / q` and `f''` for `q = 1 + b u^2`: `atan`, `atanh`."""
  r = 1 / (1 + b * u * u)
  return r, -2 * b * u * r * r


_UNARY = {
  "Tanh": lambda u, v, op: (1 - v * v, -2 * v * (1 - v * v)),
  "Sigmoid": lambda u, v, op: (v * (1 - v), v * (1 - v) * (1 - 2 * v)),
  "Softplus": lambda u, v, op: (
    tf.sigmoid(u),
    tf.sigmoid(u) * (1 - tf.sigmoid(u)),
  ),
  "Exp": lambda u, v, op: (v, v),
  "Expm1": lambda u, v, op: (v + 1, v + 1),
  "Log": lambda u, v, op: (1 / u, -1 / (u * u)),
  "Log1p": lambda u, v, op: (1 / (1 + u), -1 / ((1 + u) * (1 + u))),
  "Sqrt": lambda u, v, op: (0.5 / v, -0.25 / (v * v * v)),
  "Rsqrt": lambda u, v, op: (-0.5 * v * v * v, 0.75 * v**5),
  "Reciprocal": lambda u, v, op: (-v * v, 2 * v * v * v),
  "Inv": lambda u, v, op: (-v * v, 2 * v * v * v),
  "Sin": lambda u, v, op: (tf.cos(u), -v),
  "Cos": lambda u, v, op: (-tf.sin(u), -v),
  "Square": lambda u, v, op: (2 * u, tf.constant(2, u.dtype)),
  "Tan": lambda u, v, op: (1 + v * v, 2 * v * (1 + v * v)),
  "Sinh": lambda u, v, op: (tf.cosh(u), v),
  "Cosh": lambda u, v, op: (tf.sinh(u), v),
  "Asin": lambda u, v, op: _rsqrt_of_quadratic(u, 1, -1, 1),
  "Acos": lambda u, v, op: _rsqrt_of_quadratic(u, 1, -1, -1),
  "Asinh": lambda u, v, op: _rsqrt_of_quadratic(u, 1, 1, 1),
  "Acosh": lambda u, v, op: _rsqrt_of_quadratic(u, -1, 1, 1),
  "Atan": lambda u, v, op: _reciprocal_of_quadratic(u, 1),
  "Atanh": lambda u, v, op: _reciprocal_of_quadratic(u, -1),
  "Erf": lambda u, v, op: _gaussian(u, 1),
  "Erfc": lambda u, v, op: _gaussian(u, -1),
  "Erfinv": lambda u, v, op: _inverse_of_gaussian(
    2 * v, _SQRT_PI_OVER_TWO * tf.exp(v * v)
  ),
  "Ndtri": lambda u, v, op: _inverse_of_gaussian(
    v, _SQRT_TWO_PI * tf.exp(0.5 * v * v)
  ),
  "Lgamma": lambda u, v, op: _polygammas(u, -1),
  "Digamma": lambda u, v, op: _polygammas(u, 0),
  "BesselI0e": lambda u, v, op: _bessel_i0e(u, v),
  "BesselI1e": lambda u, v, op: _bessel_i1e(u, v),
  "BesselI0": lambda u, v, op: _bessel_i0(u),
  "BesselI1": lambda u, v, op: _bessel_i1(u, v),
  "Softsign": lambda u, v, op: (
    1 / tf.square(1 + tf.abs(u)),
    -2 * tf.sign(u) / (1 + tf.abs(u)) ** 3,
  ),
  "Elu": lambda u, v, op: (
    tf.where(u > 0, tf.ones_like(v), v + 1),
    _zeros_where(u > 0, v + 1),
  ),
  "Selu": lambda u, v, op: (
    tf.where(
      u > 0, _SELU_SCALE * tf.ones_like(v), v + _SELU_SCALE * _SELU_ALPHA
    ),
    _zeros_where(u > 0, v + _SELU_SCALE * _SELU_ALPHA),
  ),
  # Piecewise linear: no curvature (as the row loop finds).
  "Relu": lambda u, v, op: (tf.cast(u > 0, u.dtype), None),
  "Relu6": lambda u, v, op: (
    tf.cast(tf.logical_and(u > 0, u < 6), u.dtype),
    None,
  ),
  "LeakyRelu": lambda u, v, op: (
    tf.where(u > 0, tf.ones_like(u), op.get_attr("alpha") * tf.ones_like(u)),
    None,
  ),
  "Abs": lambda u, v, op: (tf.sign(u), None),
}

for _op_type, _derivatives in _UNARY.items():
  registry.register(_op_type, diagonal=True)(_unary_rule(_derivatives))
registry.moves(*_UNARY)


@registry.register(
  "Identity",
  "Snapshot",
  "CheckNumerics",
  "EnsureShape",
  linear=True,
  diagonal=True,
)
def _identity(op, jacs, ctx):
  return [jacs[0]]


registry.moves("Identity", "Snapshot", "EnsureShape")


def _plain_identity_n(op, jacs):
  return not registry.exact_custom_gradient(op)


@registry.register("IdentityN", linear=_plain_identity_n, diagonal=True)
def _identity_n(op, jacs, ctx):
  if registry.exact_custom_gradient(op):
    return _silu(op, jacs, ctx)
  return list(jacs)


def _silu(op, jacs, ctx):
  """The `IdentityN` of `tf.nn.silu`'s custom gradient.

  Its inputs are `(u sigmoid(beta u), u, beta)` and its outputs the same
  values; the walk follows `u` and `beta` only (`registry.followed_inputs`),
  and the first output is differentiated here as a function of `u`, one
  elementwise function instead of the ops that compute it.
  """
  _, u, beta = op.inputs
  _, j, beta_jac = jacs
  if beta_jac is not None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) of tf.nn.silu has a beta that depends on x"
    )
  if j is None:
    return [None, None, None]
  bu = beta * u
  s = tf.sigmoid(bu)
  ds = s * (1 - s)
  first = s + bu * ds
  second = beta * ds * (2 + bu * (1 - 2 * s))
  v = op.outputs[0]
  ctx.curvature(
    v, lambda adj: [jacobians.Term(adj * second, j)], elementwise=True
  )
  return [jacobians.scale(j, first), j, None]


# Ops whose outputs are constant almost everywhere.
_PIECEWISE_CONSTANT = (
  "Sign",
  "Floor",
  "Ceil",
  "Round",
  "Rint",
  "OnesLike",
  "ZerosLike",
)


@registry.register(*_PIECEWISE_CONSTANT, linear=True, diagonal=True)
def _piecewise_constant(op, jacs, ctx):
  """A zero derivative (almost) everywhere: as for TensorFlow's gradients,
  the output does not depend on x."""
  return [None]


@registry.register("Neg", linear=True, diagonal=True)
def _neg(op, jacs, ctx):
  j = jacs[0]
  return [None if j is None else jacobians.negate(j)]


@registry.register("Cast", linear=True, diagonal=True)
def _cast(op, jacs, ctx):
  j, out = jacs[0], op.outputs[0]
  if j is None or not out.dtype.is_floating:
    return [None]
  return [jacobians.cast(j, out.dtype)]


def _check_aligned(op, jacs):
  """Raises `Unsupported` when a dependent input lacks the output's rank.

  An input of lower rank is broadcast from its first axis on: its batch axis
  would meet another axis of the output.
  """
  out_rank = registry.static_rank(op.outputs[0], op)
  for t, j in zip(op.inputs, jacs):
    if j is not None and registry.static_rank(t, op) != out_rank:
      raise registry.Unsupported(
        f"{op.type} ({op.name}) broadcasts an input of rank {t.shape.rank} "
        f"that depends on x against rank {out_rank}: samples would mix"
      )


def _linear_sum(op, jacs, signs):
  """The Jacobian of `sum_i signs[i] * inputs[i]` (broadcast)."""
  _check_aligned(op, jacs)
  out = op.outputs[0]
  total = None
  for j, sign in zip(jacs, signs):
    if j is not None:
      j = jacobians.fit(j, out)
      term = j if sign > 0 else jacobians.negate(j)
      total = jacobians.add(total, term)
  return [jacobians.fit(total, out)]


@registry.register("Add", "AddV2", "AddN", linear=True, diagonal=True)
def _add(op, jacs, ctx):
  return _linear_sum(op, jacs, [1] * len(jacs))


@registry.register("Sub", linear=True, diagonal=True)
def _sub(op, jacs, ctx):
  return _linear_sum(op, jacs, [1, -1])


@registry.register("BiasAdd", "BiasAddV1", linear=True, diagonal=True)
def _bias_add(op, jacs, ctx):
  if jacs[1] is not None:
    raise registry.Unsupported(
      f"BiasAdd ({op.name}) has a bias that depends on x"
    )
  return [jacs[0]]


def _binary(op, jacs, ctx, first, second):
  """Rule of `v = f(a, b)` from `first() -> (f_a, f_b)` and `second() ->
  (f_aa, f_ab, f_bb)` (`second` is `None` for a piecewise linear `f`)."""
  _check_aligned(op, jacs)
  out = op.outputs[0]
  ja, jb = (jacobians.fit(j, out) for j in jacs)
  fa, fb = first()
  result = jacobians.add(
    None if ja is None else jacobians.scale(ja, fa),
    None if jb is None else jacobians.scale(jb, fb),
  )
  if second is not None:
    faa, fab, fbb = second()

    def build(adj):
      terms = []
      if ja is not None and faa is not None:
        terms.append(jacobians.Term(adj * faa, ja))
      if jb is not None and fbb is not None:
        terms.append(jacobians.Term(adj * fbb, jb))
      if ja is not None and jb is not None and fab is not None:
        terms.append(jacobians.Term(adj * fab, ja, jb, symmetric=True))
      return terms

    ctx.curvature(out, build, elementwise=True)
  return [jacobians.fit(result, out)]


def _one_dependent(op, jacs):
  return sum(j is not None for j in jacs) == 1


def _numerator_only(op, jacs):
  return jacs[1] is None


@registry.register("Mul", linear=_one_dependent, diagonal=True)
def _mul(op, jacs, ctx):
  a, b = op.inputs
  if jacs[0] is None or jacs[1] is None:
    # Linear in the one input that depends on x.
    return _binary(op, jacs, ctx, lambda: (b, a), None)
  if a is b:
    # `a * a`: a square, one Jacobian and one term instead of two.
    two = tf.constant(2, a.dtype)
    return _binary(
      op,
      [jacs[0], None],
      ctx,
      lambda: (two * a, None),
      lambda: (two, None, None),
    )
  return _binary(
    op, jacs, ctx, lambda: (b, a), lambda: (None, tf.constant(1, a.dtype), None)
  )


@registry.register("RealDiv", "Div", linear=_numerator_only, diagonal=True)
def _div(op, jacs, ctx):
  a, b = op.inputs
  v = op.outputs[0]
  if not v.dtype.is_floating:
    raise registry.Unsupported(f"{op.type} ({op.name}) is an integer division")
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (1 / b, -v / b),
    lambda: (None, -1 / (b * b), 2 * v / (b * b)),
  )


@registry.register("DivNoNan", linear=_numerator_only, diagonal=True)
def _div_no_nan(op, jacs, ctx):
  """`a / b`, 0 where `b` is 0 (the mean of `tf.compat.v1.losses`).

  The derivatives of `a / b`, and 0 where `b` is 0, as TensorFlow's
  gradient of the op has them.
  """
  b, v = op.inputs[1], op.outputs[0]
  inverse = tf.math.divide_no_nan(tf.ones_like(b), b)
  if jacs[1] is None:
    return _binary(op, jacs, ctx, lambda: (inverse, None), None)
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (inverse, -v * inverse),
    lambda: (None, -inverse * inverse, 2 * v * inverse * inverse),
  )


def _nonzero(a):
  """1 where `a` is not 0, else 0 (TensorFlow's gradients of `xlogy` and
  its kin treat `a == 0` as a constant 0 output)."""
  return tf.cast(tf.not_equal(a, 0), a.dtype)


def _x_times_log(op, jacs, ctx, log, shift):
  """`a log(b + shift)` by `log(a, b)`, 0 where `a` is 0, with TensorFlow's
  gradients there."""
  a, b = op.inputs
  nonzero, c = _nonzero(a), b + shift
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (log(nonzero, b), tf.math.xdivy(a, c)),
    lambda: (None, tf.math.xdivy(nonzero, c), -tf.math.xdivy(a, c * c)),
  )


@registry.register("Xlogy", linear=_numerator_only, diagonal=True)
def _xlogy(op, jacs, ctx):
  """`a log(b)`."""
  return _x_times_log(op, jacs, ctx, tf.math.xlogy, 0)


@registry.register("Xlog1py", linear=_numerator_only, diagonal=True)
def _xlog1py(op, jacs, ctx):
  """`a log(1 + b)`."""
  return _x_times_log(op, jacs, ctx, tf.math.xlog1py, 1)


@registry.register("Xdivy", linear=_numerator_only, diagonal=True)
def _xdivy(op, jacs, ctx):
  """`a / b`, 0 where `a` is 0."""
  a, b = op.inputs
  nonzero = _nonzero(a)
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (tf.math.xdivy(nonzero, b), -tf.math.xdivy(a, b * b)),
    lambda: (
      None,
      -tf.math.xdivy(nonzero, b * b),
      2 * tf.math.xdivy(a, b * b * b),
    ),
  )


def _of_second_input(op, jacs):
  """Raises `Unsupported` when the first input (an order) depends on x."""
  if jacs[0] is not None:
    raise registry.Unsupported(
      f"{op.type} ({op.name}) has a first input (its order) that depends on x"
    )


@registry.register("Polygamma", diagonal=True)
def _polygamma(op, jacs, ctx):
  """`polygamma(a, b)`, differentiated in `b` only (as TensorFlow)."""
  _of_second_input(op, jacs)
  a, b = op.inputs
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (None, tf.math.polygamma(a + 1, b)),
    lambda: (None, None, tf.math.polygamma(a + 2, b)),
  )


@registry.register("Igamma", "Igammac", diagonal=True)
def _igamma(op, jacs, ctx):
  """The regularized incomplete gamma functions `P(a, b)` and `Q(a, b) = 1 -
  P(a, b)` in `b`: `P' = exp(-b) b^(a - 1) / Gamma(a)`, `P'' = P' ((a - 1)
  / b - 1)`; the order `a` must not depend on x."""
  _of_second_input(op, jacs)
  a, b = op.inputs
  sign = 1.0 if op.type == "Igamma" else -1.0
  first = sign * tf.exp(-b + (a - 1) * tf.math.log(b) - tf.math.lgamma(a))
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (None, first),
    lambda: (None, None, first * ((a - 1) / b - 1)),
  )


@registry.register("Atan2", diagonal=True)
def _atan2(op, jacs, ctx):
  """`atan2(a, b)`, the angle of `(b, a)`."""
  a, b = op.inputs
  r = a * a + b * b
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (b / r, -a / r),
    lambda: (
      -2 * a * b / (r * r),
      (a * a - b * b) / (r * r),
      2 * a * b / (r * r),
    ),
  )


@registry.register("SquaredDifference", diagonal=True)
def _squared_difference(op, jacs, ctx):
  a, b = op.inputs
  two = tf.constant(2, a.dtype)
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (two * (a - b), -two * (a - b)),
    lambda: (two, -two, two),
  )


# The largest whole exponent taken by products (`_power`).
_MAX_WHOLE_EXPONENT = 8


def _power(a, e):
  """`a ** e` for a Python number `e`: by products and squares for a whole
  `e` from 0 to `_MAX_WHOLE_EXPONENT`, else by `Pow` of a constant."""
  if not (float(e).is_integer() and 0 <= e <= _MAX_WHOLE_EXPONENT):
    return tf.pow(a, tf.constant(e, a.dtype))
  n = int(e)
  if n == 0:
    return tf.ones_like(a)
  result, square = None, a
  while True:
    if n & 1:
      result = square if result is None else result * square
    n >>= 1
    if not n:
      return result
    square = square * square


def _pow_first(a, e):
  """The derivative `e a^(e - 1)` of `a ** e`, for a Python number `e`."""
  if e == 0:
    return tf.zeros_like(a)
  return tf.constant(e, a.dtype) * _power(a, e - 1)


def constant_exponent(b):
  """The exponent `b` of a `Pow` as a Python float where it is a scalar
  constant (`u ** 3`, `tf.pow(u, 0.5)`), else `None`.

  The walk takes the derivatives `e u^(e - 1)` and `e (e - 1) u^(e - 2)`
  of such a power, and its adjoint, by products and squares for a whole
  exponent up to `_MAX_WHOLE_EXPONENT` and by a `Pow` of a constant
  otherwise. With `b` as a tensor they were `Pow` kernels at tens of
  products per entry, where TensorFlow's graph optimizers did not fold
  `b - 1` or `b - 2` (inside a loop, and outside one beside a broadcast:
  the squared distances of an RBF layer, `(x - mu) ** 2`, at 4096 x 3
  spent 2.2 of 9.4 ms in them). As for JAX's `u ** 3`, the results are
  constant in the exponent: TensorFlow's gradients of them with respect to
  the constant `b` itself (not a variable or a placeholder) are not taken.
  """
  if not b.dtype.is_floating or b.shape.rank != 0:
    return None
  value = tf.get_static_value(b)
  return None if value is None else float(value)


@registry.adjoint("Pow", first_order=False)
def _pow_adjoint(op, path):
  """The adjoint of a `Pow` by a constant exponent (`constant_exponent`),
  with the exponent as a number; TensorFlow's gradient otherwise."""
  del path  # Unused.
  e = constant_exponent(op.inputs[1])
  if e is None:
    return None
  a = op.inputs[0]
  return lambda adj: [(a, adj * _pow_first(a, e))]


@registry.register("Pow", diagonal=True)
def _pow(op, jacs, ctx):
  a, b = op.inputs
  v = op.outputs[0]
  e = constant_exponent(b)
  if e is not None:
    return _binary(
      op,
      jacs,
      ctx,
      lambda: (_pow_first(a, e), None),
      lambda: (
        None
        if e in (0, 1)
        else tf.constant(e * (e - 1), a.dtype) * _power(a, e - 2),
        None,
        None,
      ),
    )
  # As TensorFlow's gradient: log(a) taken as 0 where a <= 0.
  log_a = tf.where(
    a > 0, tf.math.log(tf.where(a > 0, a, tf.ones_like(a))), 0 * a
  )
  a_pow = b * tf.math.pow(a, b - 1)
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (a_pow, v * log_a),
    lambda: (
      b * (b - 1) * tf.math.pow(a, b - 2),
      tf.math.pow(a, b - 1) * (1 + b * log_a),
      v * log_a * log_a,
    ),
  )


@registry.register("Maximum", "Minimum", diagonal=True)
def _maximum(op, jacs, ctx):
  a, b = op.inputs
  mask = a >= b if op.type == "Maximum" else a <= b
  ones = tf.ones_like(op.outputs[0])
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (tf.where(mask, ones, 0 * ones), tf.where(mask, 0 * ones, ones)),
    None,
  )


@registry.register("FloorMod", diagonal=True)
def _floor_mod(op, jacs, ctx):
  """`a mod b` (`a % b`, periodic inputs): `a - floor(a / b) b`, linear
  between its jumps, with TensorFlow's gradients there."""
  a, b = op.inputs
  return _binary(
    op,
    jacs,
    ctx,
    lambda: (tf.ones_like(op.outputs[0]), -tf.math.floordiv(a, b)),
    None,
  )


def _step(mask, u):
  """1 where `mask`, else 0, in the dtype of `u`."""
  return tf.cast(mask, u.dtype)


def _softplus_gradient(u, op):
  del op
  s = tf.sigmoid(u)
  first = s * tf.sigmoid(-u)
  return s, first, first * tf.tanh(-u / 2)


def _softsign_gradient(u, op):
  del op
  a = 1 + tf.abs(u)
  s = 1 / (a * a)
  return s, -2 * tf.sign(u) * s / a, 6 * s * s


def _reciprocal_gradient(y, op):
  del op
  return -y * y, -2 * y, -2.0


def _leaky_relu_gradient(u, op):
  alpha = op.get_attr("alpha")
  return alpha + (1 - alpha) * _step(u > 0, u), None, None


def _elu_gradient(u, op):
  """`g` where the output `u >= 0`, `g (u + 1)` below."""
  del op
  below = _step(u < 0, u)
  return 1 + below * u, below, None


def _selu_gradient(u, op):
  """`g scale` where the output `u >= 0`, `g (u + scale alpha)` below."""
  del op
  below = _step(u < 0, u)
  return (
    _SELU_SCALE + below * (u + _SELU_SCALE * (_SELU_ALPHA - 1)),
    below,
    None,
  )


# TensorFlow's gradient ops of elementwise functions, `g * s(u)`: `g` the
# incoming gradient, `u` the function's output (`TanhGrad(y, dy)`, ...) or
# input (`SoftplusGrad(gradients, features)`, ...). Per op type: the index
# of `g` among the op's inputs, and `(u, op) -> (s, s', s'')` (`s'` `None`
# where `s` is piecewise constant, `s''` where it is piecewise linear).
# Models that contain gradients (forces of an energy, a Laplacian of a
# Laplacian) are made of them.
_GRADIENT_OF_FUNCTION = {
  "TanhGrad": (1, lambda y, op: (1 - y * y, -2 * y, -2.0)),
  "SigmoidGrad": (1, lambda y, op: (y * (1 - y), 1 - 2 * y, -2.0)),
  "RsqrtGrad": (1, lambda y, op: (-0.5 * y**3, -1.5 * y * y, -3 * y)),
  "SqrtGrad": (1, lambda y, op: (0.5 / y, -0.5 / (y * y), 1 / y**3)),
  "ReciprocalGrad": (1, _reciprocal_gradient),
  "InvGrad": (1, _reciprocal_gradient),
  "SoftplusGrad": (0, _softplus_gradient),
  "SoftsignGrad": (0, _softsign_gradient),
  "ReluGrad": (0, lambda u, op: (_step(u > 0, u), None, None)),
  "Relu6Grad": (0, lambda u, op: (_step((u > 0) & (u < 6), u), None, None)),
  "LeakyReluGrad": (0, _leaky_relu_gradient),
  "EluGrad": (0, _elu_gradient),
  "SeluGrad": (0, _selu_gradient),
}


@registry.register(*_GRADIENT_OF_FUNCTION, diagonal=True)
def _gradient_of_function(op, jacs, ctx):
  """`g * s(u)`, see `_GRADIENT_OF_FUNCTION`: linear in `g`, with the
  derivatives of `s` in `u`."""
  g_index, derivatives = _GRADIENT_OF_FUNCTION[op.type]
  g, u = op.inputs[g_index], op.inputs[1 - g_index]
  s, first, second = derivatives(u, op)
  if first is None:
    # Piecewise constant in `u`: `u` adds nothing.
    jacs = list(jacs)
    jacs[1 - g_index] = None

  def in_order(of_g, of_u):
    return (of_g, of_u) if g_index == 0 else (of_u, of_g)

  def second_derivatives():
    of_u = None if second is None else g * second
    f_aa, f_bb = in_order(None, of_u)
    return f_aa, first, f_bb

  return _binary(
    op,
    jacs,
    ctx,
    lambda: in_order(s, None if first is None else g * first),
    None if first is None else second_derivatives,
  )


@registry.adjoint("SoftsignGrad")
def _gradient_of_function_adjoint(op, path):
  """The adjoints of `g` and `u` in `g * s(u)` (`_GRADIENT_OF_FUNCTION`),
  for the gradient ops TensorFlow has no gradient of."""
  del path  # Unused.
  g_index, derivatives = _GRADIENT_OF_FUNCTION[op.type]
  g, u = op.inputs[g_index], op.inputs[1 - g_index]

  def vjp(adj):
    s, first, _ = derivatives(u, op)
    out = [(g, adj * s)]
    if first is not None:
      out.append((u, adj * g * first))
    return out

  return vjp


def _condition(op):
  """The condition of a `Select`/`SelectV2`, broadcasting against the
  output as the op broadcasts it (a vector condition of `Select`, which
  picks whole samples, reshaped to `(N, 1, ..., 1)`)."""
  cond = op.inputs[0]
  rank = registry.static_rank(op.outputs[0], op)
  if op.type == "Select" and registry.static_rank(cond, op) == 1 < rank:
    cond = tf.reshape(cond, tf.concat([tf.shape(cond), [1] * (rank - 1)], 0))
  return cond


def _zero_filled(a, b):
  """The values of two Jacobians, zeros in place of a `None`."""
  va, vb = (None if j is None else j.value for j in (a, b))
  return (
    tf.zeros_like(vb) if va is None else va,
    tf.zeros_like(va) if vb is None else vb,
  )


@registry.register("Select", "SelectV2", linear=True, diagonal=True)
def _select(op, jacs, ctx):
  """`where(cond, a, b)`, the condition independent of x (it is bool):
  linear in `a` and `b`, entry by entry."""
  _check_aligned(op, jacs)
  out = op.outputs[0]
  ja, jb = (jacobians.fit(j, out) for j in jacs[1:])
  if ja is None and jb is None:
    return [None]
  cond = _condition(op)
  if all(j is None or j.diagonal for j in (ja, jb)):
    # `d` has the axes of `out`: the condition broadcasts against it.
    return [jacobians.diagonal(tf.where(cond, *_zero_filled(ja, jb)))]
  ja, jb = (None if j is None else jacobians.materialize(j) for j in (ja, jb))
  batched = cond.shape.rank == out.shape.rank
  if batched and tf.compat.dimension_value(cond.shape[0]) == 1:
    cond, batched = cond[0], False
  if batched:
    cond = tf.expand_dims(cond, 1)  # Over the tangents.
  shared = not batched and all(j is None or j.shared for j in (ja, jb))
  return [jacobians.Jacobian(tf.where(cond, *_zero_filled(ja, jb)), shared)]


registry.rowwise(
  *_UNARY,
  *_PIECEWISE_CONSTANT,
  "Identity",
  "Snapshot",
  "CheckNumerics",
  "IdentityN",
  "Neg",
  "Cast",
  "Add",
  "AddV2",
  "AddN",
  "Sub",
  "BiasAdd",
  "BiasAddV1",
  "Mul",
  "RealDiv",
  "Div",
  "DivNoNan",
  "SquaredDifference",
  "Pow",
  "Maximum",
  "Minimum",
  "FloorMod",
  "Select",
  "SelectV2",
  *_GRADIENT_OF_FUNCTION,
)
