"""Per-sample gradients and Hessians by central finite differences.

A reference that shares nothing with automatic differentiation: `fn` is only
evaluated, on copies of the batch with one or two coordinates of every
sample moved by a small step, all copies stacked into as few calls of `fn`
as `batch_size` allows. `check_hessians` compares an autodiff Hessian with
it, for use in tests.

Step rule. With `eps_m` the machine epsilon of the precision `fn` computes
in (the dtype it returns: 2.2e-16 for float64, 1.2e-7 for float32, 9.8e-4
for float16) and `eps_x` that of `x`'s dtype, coordinate `a` of sample `i`
moves by `h = max(eps_m^(1/4), 8 eps_x) * max(|x[i, a]|, 1)` for Hessians and
`max(eps_m^(1/3), 8 eps_x) * max(|x[i, a]|, 1)` for gradients, rounded to a
power of two. `eps_m^(1/4)` and `eps_m^(1/3)` balance truncation against
rounding error; `8 eps_x` keeps `x +- h` distinct from `x` in its dtype.
`eps=` replaces the factor. The perturbed batch keeps `x`'s dtype, and the
differences divide by the steps actually taken, so rounding `x +- h` to that
dtype does not bias them. Give a float64 `x` when `fn` computes in float64.
When `fn` computes in a coarser precision than the dtype it returns, say so
with `precision=` (`tf.compat.v1.losses` compute in float32 and cast the
loss back to float64).

Expected accuracy, relative to the size of `fn` and of its derivatives
(after scaling each coordinate by `max(|x|, 1)`): about `sqrt(eps_m)` for
Hessians (1e-8 in float64, 3e-4 in float32) and `eps_m^(2/3)` for gradients
(4e-11 in float64, 2e-5 in float32). Where `fn` is not smooth within a step
of `x` (a ReLU kink, `abs` at 0) the differences measure the jump, not a
derivative; see `check_hessians` for the usual traps.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tf1hess import _checks
from tf1hess import eager

_DEFAULT_BATCH_SIZE = 65536


def _machine_eps(dtype):
  dtype = np.dtype(dtype)
  if dtype.name == "bfloat16":
    return 2.0**-7
  return float(np.finfo(dtype).eps)


def _precision_dtype(precision):
  """Returns the numpy dtype named by `precision` (or `None`) or raises."""
  if precision is None:
    return None
  try:
    dtype = tf.as_dtype(precision)
  except TypeError:
    dtype = None
  if dtype is None or not dtype.is_floating:
    raise TypeError(
      "`precision` must be None or a floating dtype (float16, bfloat16, "
      f"float32 or float64); saw {precision!r}."
    )
  return np.dtype(dtype.as_numpy_dtype)


def _concrete(value, arg):
  """Returns the numpy value of an eager tensor; raises for a symbolic one."""
  if isinstance(value, (tf.Tensor, tf.Variable)):
    try:
      return value.numpy()
    except (AttributeError, NotImplementedError, ValueError):
      raise TypeError(
        f"`{arg}` must be a numpy array or an eager tensor; saw a symbolic "
        f"{type(value).__name__}: evaluate it in its session first (for "
        "graph code, `fn = lambda b: sess.run(y, {x_ph: b})`)."
      ) from None
  return value


def _as_batch(x):
  """Converts `x` to a floating numpy array of rank >= 2 or raises."""
  x = _concrete(x, "x")
  x = np.asarray(x)
  if not _checks.is_floating_array(x.dtype):
    raise TypeError(
      "`x` must be a floating array (float16, bfloat16, float32 or "
      f"float64); saw dtype {x.dtype}."
    )
  if x.ndim < 2:
    raise ValueError(
      f"`x` must have rank >= 2 (batch, features...); saw rank {x.ndim} "
      f"with shape {x.shape}."
    )
  return x


def _check_fn(fn):
  if not callable(fn):
    raise TypeError(
      "`fn` must be a callable mapping a batch to per-sample values; saw "
      f"{type(fn).__name__}."
    )


def _check_eps(eps):
  if eps is None:
    return
  if (
    isinstance(eps, bool)
    or not isinstance(eps, (int, float, np.floating))
    or not 0 < eps < 1
  ):
    raise ValueError(
      f"`eps` must be None or a relative step in (0, 1); saw {eps!r}."
    )


def _evaluate(fn, batch):
  """Calls `fn` on `batch`; returns `(per-sample float64 values, dtype)`."""
  out = np.asarray(_concrete(fn(batch), "fn(x)"))
  if not _checks.is_floating_array(out.dtype):
    raise TypeError(f"`fn(x)` must be floating; saw dtype {out.dtype}.")
  rows = batch.shape[0]
  if out.ndim < 1 or out.shape[0] != rows:
    raise ValueError(
      "`fn(x)` must hold one value (or one array, summed) per sample, with "
      f"leading dimension {rows} for a batch of {rows}; saw shape "
      f"{out.shape}."
    )
  values = out.astype(np.float64).reshape(rows, -1).sum(axis=1)
  return values, out.dtype


class _Stepper:
  """The perturbed copies of a flattened batch, and `fn` on them.

  Attributes:
    x: the batch as a numpy array, `x`'s dtype, shape `(N, d...)`.
    n, k: `N` and the features per sample `K = prod(d...)`.
    f0: float64 `(N,)`: `fn` at `x`, summed per sample.
    f_max: float64 `(N,)`: the largest `|fn|` of each sample so far (NaN
      values aside).
    precision: the numpy dtype `fn` computes in: the coarser of
      `precision` and the dtype it returns.
    eps_m: its machine epsilon.
    factor: the relative step, before rounding to a power of two.
    float32_valued: whether every value of a float64 `fn` so far is a
      float32 number with a fraction (a hint of hidden float32 arithmetic).
    plus, minus: `(N, K)` in `x`'s dtype: each coordinate moved up or down.
    h_plus, h_minus: float64 `(N, K)`: the steps actually taken (> 0).
  """

  def __init__(self, fn, x, eps, power, batch_size, precision=None):
    _check_fn(fn)
    _check_eps(eps)
    batch_size = _checks.check_count(batch_size, "batch_size")
    precision = _precision_dtype(precision)
    self.fn = fn
    self.x = _as_batch(x)
    self.shape = self.x.shape
    self.n = self.shape[0]
    self.k = int(np.prod(self.shape[1:]))
    self.flat = self.x.reshape(self.n, self.k)
    self.batch_size = batch_size
    if self.n:
      self.f0, out_dtype = _evaluate(fn, self.x)
    else:
      self.f0, out_dtype = np.zeros(0), self.x.dtype
    self.f_max = np.abs(self.f0)
    self.precision = np.dtype(out_dtype)
    if precision is not None and _machine_eps(precision) > _machine_eps(
      out_dtype
    ):
      self.precision = precision
    self.eps_m = _machine_eps(self.precision)
    self.float32_valued = self.eps_m < _machine_eps(np.float32)
    self._has_fraction = False
    self._watch(self.f0)
    factor = eps
    if factor is None:
      factor = max(self.eps_m ** (1.0 / power), 8 * _machine_eps(self.x.dtype))
    self.factor = factor
    wide = self.flat.astype(np.float64)
    target = factor * np.maximum(np.abs(wide), 1.0)
    h = 2.0 ** np.round(np.log2(target))
    # The coordinates as `fn` sees them, and the steps actually taken.
    self.plus = (wide + h).astype(self.x.dtype)
    self.minus = (wide - h).astype(self.x.dtype)
    self.h_plus = self.plus.astype(np.float64) - wide
    self.h_minus = wide - self.minus.astype(np.float64)
    if np.any(self.h_plus <= 0) or np.any(self.h_minus <= 0):
      raise ValueError(
        f"`eps` must give steps that {self.x.dtype} can resolve at `x`; "
        f"saw eps={eps!r}, too small."
      )

  def values(self, a, sign_a, b=None, sign_b=None):
    """`fn` per sample at the points given by coordinates and signs.

    Args:
      a: `int` array `(P,)`: the first coordinate moved at each point.
      sign_a: `bool` array `(P,)`: `True` moves it up, `False` down.
      b: optional `int` array `(P,)`: a second coordinate, moved by `sign_b`.
      sign_b: optional `bool` array `(P,)`.

    Returns:
      A float64 array `(P, N)`.
    """
    points = len(a)
    out = np.empty((points, self.n), np.float64)
    if not self.n:
      return out
    per_call = max(1, self.batch_size // self.n)
    samples = np.arange(self.n)[None, :]
    for start in range(0, points, per_call):
      sl = slice(start, min(points, start + per_call))
      rows = np.arange(sl.stop - sl.start)[:, None]
      chunk = np.repeat(self.flat[None], sl.stop - sl.start, axis=0)
      for idx, sign in ((a, sign_a), (b, sign_b)):
        if idx is None:
          continue
        i, up = idx[sl], sign[sl][:, None]
        chunk[rows, samples, i[:, None]] = np.where(
          up, self.plus[:, i].T, self.minus[:, i].T
        )
      batch = chunk.reshape((-1,) + self.shape[1:])
      out[sl] = _evaluate(self.fn, batch)[0].reshape(-1, self.n)
    self.f_max = np.fmax(self.f_max, np.nanmax(np.abs(out), axis=0, initial=0))
    self._watch(out)
    return out

  def _watch(self, values):
    if self.float32_valued:
      self.float32_valued = bool(
        np.all(values.astype(np.float32).astype(np.float64) == values)
      )
      self._has_fraction |= bool(np.any(values != np.round(values)))

  @property
  def hidden_float32(self):
    """Whether a float64 `fn` looks like float32 arithmetic cast to float64."""
    return self.float32_valued and self._has_fraction

  def hessians(self):
    """The central-difference Hessians, float64 `(N, d..., d...)`."""
    k, hp, hm = self.k, self.h_plus, self.h_minus  # steps (N, K)
    hess = np.empty((self.n, k, k), np.float64)
    # Diagonal: three points with possibly unequal realised steps.
    f = self.values(np.repeat(np.arange(k), 2), np.tile([True, False], k))
    f_plus, f_minus = f[0::2].T, f[1::2].T  # (N, K)
    f0 = self.f0[:, None]
    diag = hm * f_plus - (hp + hm) * f0 + hp * f_minus
    hess[:, np.arange(k), np.arange(k)] = 2.0 * diag / (hp * hm * (hp + hm))
    # Off-diagonal: four points per pair a < b.
    ia, ib = np.triu_indices(k, 1)
    if ia.size:
      signs = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], bool)
      f = self.values(
        np.repeat(ia, 4),
        np.tile(signs[:, 0], ia.size),
        np.repeat(ib, 4),
        np.tile(signs[:, 1], ia.size),
      ).reshape(ia.size, 4, self.n)
      mixed = (f[:, 0] - f[:, 1] - f[:, 2] + f[:, 3]).T  # (N, pairs)
      off = mixed / ((hp + hm)[:, ia] * (hp + hm)[:, ib])
      hess[:, ia, ib] = off
      hess[:, ib, ia] = off
    return hess.reshape(self.shape + self.shape[1:])


def finite_difference_gradients(
  fn, x, eps=None, batch_size=_DEFAULT_BATCH_SIZE, precision=None
):
  """Per-sample gradients of `fn` at `x` by central differences, in float64.

  `g[i, a] = (f_i(x_i + h e_a) - f_i(x_i - h e_a)) / (2 h)`, with `f_i` the
  sum of `fn`'s outputs for sample `i`. The step rule and the accuracy to
  expect are in the module docstring (`h` about `eps_m^(1/3) * max(|x|, 1)`,
  error about `eps_m^(2/3)`). Takes `2 K + 1` evaluations of each sample.

  Args:
    fn: callable mapping a numpy batch `(rows, d...)` of `x`'s dtype to
      per-sample values `(rows,)`, `(rows, 1)` or `(rows, ...)` (summed per
      sample); it may return an eager tensor. A Keras model, a
      `tf.function`, or `lambda b: sess.run(y, {x_ph: b})` for graph code.
      Each call gets whole copies of the batch: row `r` is (a perturbed
      copy of) sample `r % N`, so per-sample side inputs such as labels
      match with `np.tile(labels, (len(b) // N, 1))`.
    x: a floating numpy array or eager tensor `(N, d1, ..., dm)`.
    eps: `float` in (0, 1) or `None` (default): the relative step that
      replaces `max(eps_m^(1/3), 8 eps_x)`.
    batch_size: `int`, default 65536: the most rows given to `fn` in one
      call (but at least one copy of the batch); the `2 K` perturbed copies
      are stacked up to it.
    precision: `None` (default) or a floating dtype: the precision `fn`
      really computes in when it is coarser than the dtype `fn` returns
      (`tf.compat.v1.losses` compute in float32 and cast back to float64).

  Returns:
    A float64 numpy array of the shape of `x`.

  Raises:
    TypeError: when `fn` is not callable, `x` or `fn`'s output is not
      floating, either is symbolic, or `precision` is not a floating dtype.
    ValueError: when `x` has rank < 2, `fn` does not return one value per
      sample, `eps` is not in (0, 1) or too small for `x`'s dtype, or
      `batch_size` is not a positive int.

  Example:
    >>> import numpy as np, tf1hess
    >>> g = tf1hess.finite_difference_gradients(
    ...     lambda b: np.sum(b ** 3, axis=1), np.array([[1., 2.]]))
    >>> np.round(g, 6)
    array([[ 3., 12.]])
  """
  s = _Stepper(fn, x, eps, 3, batch_size, precision)
  f = s.values(np.repeat(np.arange(s.k), 2), np.tile([True, False], s.k))
  f_plus, f_minus = f[0::2].T, f[1::2].T  # (N, K)
  return ((f_plus - f_minus) / (s.h_plus + s.h_minus)).reshape(s.shape)


def finite_difference_hessians(
  fn, x, eps=None, batch_size=_DEFAULT_BATCH_SIZE, precision=None
):
  """Per-sample Hessians of `fn` at `x` by central differences, in float64.

  With `f_i` the sum of `fn`'s outputs for sample `i` and steps `h_a`:
  `H[i, a, a] = (f_i(x + h_a e_a) - 2 f_i(x) + f_i(x - h_a e_a)) / h_a^2`
  and, for `a != b`, `H[i, a, b] = (f_i(x + h_a e_a + h_b e_b)
  - f_i(x + h_a e_a - h_b e_b) - f_i(x - h_a e_a + h_b e_b)
  + f_i(x - h_a e_a - h_b e_b)) / (4 h_a h_b)`: symmetric by construction,
  `2 K^2 + 1` evaluations of each sample, stacked into calls of up to
  `batch_size` rows. The step rule (`h` about `eps_m^(1/4) * max(|x|, 1)`)
  and the accuracy to expect (about `sqrt(eps_m)`: 1e-8 when `fn` computes
  in float64, 3e-4 in float32) are in the module docstring. Polynomials of
  degree <= 3 are differentiated exactly up to rounding.

  Args:
    fn: callable mapping a numpy batch `(rows, d...)` of `x`'s dtype to
      per-sample values `(rows,)`, `(rows, 1)` or `(rows, ...)` (summed per
      sample); it may return an eager tensor. A Keras model, a
      `tf.function`, or `lambda b: sess.run(y, {x_ph: b})` for graph code.
      Each call gets whole copies of the batch: row `r` is (a perturbed
      copy of) sample `r % N`, so per-sample side inputs such as labels
      match with `np.tile(labels, (len(b) // N, 1))`.
    x: a floating numpy array or eager tensor `(N, d1, ..., dm)`. Pass
      float64 when `fn` computes in float64, for the best accuracy.
    eps: `float` in (0, 1) or `None` (default): the relative step that
      replaces `max(eps_m^(1/4), 8 eps_x)`.
    batch_size: `int`, default 65536: the most rows given to `fn` in one
      call (but at least one copy of the batch).
    precision: `None` (default) or a floating dtype: the precision `fn`
      really computes in when it is coarser than the dtype `fn` returns
      (`tf.compat.v1.losses` compute in float32 and cast back to float64).

  Returns:
    A float64 numpy array `(N, d..., d...)`: `(N, K, K)` for `x` `(N, K)`.

  Raises:
    TypeError: when `fn` is not callable, `x` or `fn`'s output is not
      floating, either is symbolic, or `precision` is not a floating dtype.
    ValueError: when `x` has rank < 2, `fn` does not return one value per
      sample, `eps` is not in (0, 1) or too small for `x`'s dtype, or
      `batch_size` is not a positive int.

  Example:
    >>> import numpy as np, tf1hess
    >>> h = tf1hess.finite_difference_hessians(
    ...     lambda b: np.sum(b ** 3, axis=1), np.array([[1., 2.]]))
    >>> np.round(h, 6)
    array([[[ 6.,  0.],
            [ 0., 12.]]])
  """
  return _Stepper(fn, x, eps, 4, batch_size, precision).hessians()


@dataclasses.dataclass(frozen=True)
class HessianCheck:
  """What `check_hessians` found, per sample.

  Attributes:
    hessians: float64 `(N, d..., d...)`: the Hessians checked.
    fd_hessians: float64 `(N, d..., d...)`: central finite differences.
    abs_error: float64 `(N,)`: the largest `|hessians - fd_hessians|` of
      each sample.
    rel_error: float64 `(N,)`: `abs_error` over the sample's scale (the
      largest finite `|entry|` of either Hessian); 0 when both are zero,
      NaN where either has a NaN entry.
    tolerance: float64 `(N,)`: `atol + rtol * scale` for each sample.
    passed: bool `(N,)`: `abs_error <= tolerance` (NaN fails).
    rtol: `float`: the relative tolerance used.
    note: `str`: a hint on the finite differences themselves, or "".
  """

  hessians: np.ndarray
  fd_hessians: np.ndarray
  abs_error: np.ndarray
  rel_error: np.ndarray
  tolerance: np.ndarray
  passed: np.ndarray
  rtol: float
  note: str = ""

  @property
  def ok(self):
    """`True` when every sample passed."""
    return bool(np.all(self.passed))

  def __bool__(self):
    return self.ok

  def summary(self, max_samples=5):
    """A readable report: the failing samples, worst first.

    Args:
      max_samples: `int`, default 5: how many failing samples to list.

    Returns:
      A `str`.
    """
    n = self.passed.shape[0]
    failed = np.flatnonzero(~self.passed)
    if not failed.size:
      worst = float(np.max(self.rel_error)) if n else 0.0
      return (
        f"Hessians agree with finite differences in all {n} samples "
        f"(largest relative error {worst:.3g})."
      )
    excess = self.abs_error[failed] / np.maximum(self.tolerance[failed], 1e-300)
    order = failed[np.argsort(-np.nan_to_num(excess, nan=np.inf))]
    lines = [
      f"Hessians differ from central finite differences in {failed.size} of "
      f"{n} samples (tolerance atol + rtol * scale, rtol={self.rtol:.3g}):"
    ]
    d = self.hessians.reshape(n, -1) - self.fd_hessians.reshape(n, -1)
    tail = self.hessians.shape[1:]
    fd_nan = np.isnan(self.fd_hessians.reshape(n, -1))
    for i in order[:max_samples]:
      nans = np.flatnonzero(np.isnan(d[i]))
      j = int(nans[0]) if nans.size else int(np.argmax(np.abs(d[i])))
      entry = np.unravel_index(j, tail)
      line = (
        f"  sample {i}: max abs error {self.abs_error[i]:.3g} > tolerance "
        f"{self.tolerance[i]:.3g} (rel error {self.rel_error[i]:.3g}) at "
        f"{list(map(int, entry))}: autodiff "
        f"{self.hessians.reshape(n, -1)[i, j]:.6g}, finite differences "
        f"{self.fd_hessians.reshape(n, -1)[i, j]:.6g}"
      )
      if nans.size:
        line += f" ({nans.size} entries are NaN)"
      lines.append(line)
    if failed.size > max_samples:
      lines.append(f"  ... and {failed.size - max_samples} more samples")
    if fd_nan[failed[:max_samples]].any():
      lines.append(
        "Finite differences are NaN where `fn` is NaN at a point the steps "
        "reach (a step across the edge of its domain, as log(x) near 0): "
        "pass a smaller `eps`, or check points farther from the edge."
      )
    if self.note:
      lines.append(self.note)
    return "\n".join(lines)

  def __str__(self):
    return self.summary()


def _check_tol(value, arg):
  if value is None:
    return
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float, np.floating))
    or not value >= 0
  ):
    raise ValueError(f"`{arg}` must be None or a number >= 0; saw {value!r}.")


def _note(stepper, passed):
  """A hint on the precision of the differences for the report, or ""."""
  if stepper.hidden_float32:
    return (
      "Note: `fn` returns float64 values that are all float32 numbers, as "
      "if it computed in float32 (tf.compat.v1.losses do); pass "
      "precision=np.float32 for steps and tolerances of that precision."
    )
  if stepper.precision == np.float32 and not np.all(passed):
    return (
      "Note: where `fn` computes in float16 or bfloat16 and returns float32 "
      "(a Keras mixed precision policy), its differences have that "
      "precision, too coarse to check Hessians: check the model built in "
      "float32."
    )
  return ""


def check_hessians(
  fn,
  x,
  hessians=None,
  eps=None,
  rtol=None,
  atol=None,
  raise_on_failure=False,
  batch_size=_DEFAULT_BATCH_SIZE,
  precision=None,
):
  """Compares per-sample Hessians with central finite differences.

  Sample `i` passes when `max |H_i - FD_i| <= atol + rtol * scale_i`, with
  `scale_i` the largest `|entry|` of `H_i` or `FD_i`. The defaults follow
  the precision `eps_m` that `fn` works in (see `finite_difference_hessians`):
  `rtol = 100 * max(sqrt(eps_m), r^2)` with `r` the relative step (1.5e-6
  for float64, 3.5e-2 for float32; `r^2`, the truncation error, counts
  where the step is larger than `eps_m^(1/4)`: a half-precision `x`, or
  `eps`), and `atol = 10 * eps_m * max|f_i| / h_i^2`, the rounding error the
  differences can have for sample `i` (`max|f_i|`: its largest value of
  `fn`, `h_i`: its smallest step). In float16 and bfloat16 that `rtol` is
  3.1 and 8.8: a Hessian off by its own size would pass, so the check
  raises there unless both `rtol` and `atol` are given.

  What autodiff and finite differences give at the known traps (TensorFlow
  2.21):

  * Softmax cross-entropy (`tf.nn.softmax_cross_entropy_with_logits`, its
    sparse and `tf.compat.v1.losses` variants): autodiff gives the right
    Hessian `diag(p) - p p^T` of the logits, and finite differences agree.
    Older TensorFlow releases had no second derivative of the fused op
    (tensorflow issues 7403, 14641). The `tf.compat.v1.losses` functions
    compute in float32 and cast the loss back to the logits' dtype: a
    float64 model through them has float32 precision, so check it with
    `precision=np.float32` (the report suggests it).
  * `tf.reduce_prod` where an input is exactly 0: the autodiff Hessian is
    wrong (tensorflow issue 21130): for `prod(x)` at `x = (0, 2, 3)` it
    gives rows `[0, 3, 2], [0, 0, 0], [0, 0, 0]` (not even symmetric) where
    the Hessian is `[[0, 3, 2], [3, 0, 0], [2, 0, 0]]`; with two zeros it
    gives all zeros. Finite differences are exact there (the product is
    linear in each coordinate), so the check fails: it is catching a real
    error. Away from zeros both agree.
  * `tf.nn.relu` (and `abs`, max-pooling, ...) at a kink: autodiff gives a
    second derivative of 0 everywhere (and a gradient of 0 at exactly 0);
    finite differences give about `1 / h` (huge) on the diagonal of a
    coordinate whose pre-activation is within a step of the kink, since
    they see the jump of the first derivative. Neither is a Hessian, which
    does not exist there; away from kinks a ReLU network is piecewise linear
    and both give 0. Check such models at points away from kinks, or use
    smooth activations in the check.

  Args:
    fn: callable mapping a batch to per-sample values, as in
      `finite_difference_hessians`. When `hessians` is `None` it must also
      accept a `tf.Tensor`, for `tf1hess.eager.batch_hessians(fn, x)`.
    x: a floating numpy array or eager tensor `(N, d...)`.
    hessians: `(N, d..., d...)` array or eager tensor to check (e.g. the
      result of `sess.run(tf1hess.batch_hessians(y, x_ph), ...)`), or `None`
      (default) to compute `tf1hess.eager.batch_hessians(fn, x)`.
    eps: as in `finite_difference_hessians`.
    rtol: `float` >= 0 or `None` (default): see above.
    atol: `float` >= 0 or `None` (default): see above.
    raise_on_failure: `bool`, default `False`: raise `AssertionError` with
      the report when a sample fails, for use in tests.
    batch_size: as in `finite_difference_hessians`.
    precision: as in `finite_difference_hessians`; when `fn` returns
      float64 values that are all float32 numbers, a failing report
      suggests `precision=np.float32`.

  Returns:
    A `HessianCheck`: per-sample errors and tolerances, `.ok`, and
    `.summary()`; it is truthy when every sample passed.

  Raises:
    AssertionError: when `raise_on_failure` is set and a sample fails.
    ValueError: when `hessians` does not have shape `(N, d..., d...)`, or
      is `None` where eager execution is off; when `rtol` or `atol` is
      negative; when `fn` computes in float16 or bfloat16 and `rtol` or
      `atol` is not given; and as `finite_difference_hessians`.
    TypeError: as `finite_difference_hessians`, and when `hessians` is not
      floating.

  Example:
    >>> import numpy as np, tensorflow as tf, tf1hess
    >>> fn = lambda b: tf.reduce_sum(tf.sin(b), axis=1)
    >>> x = np.random.default_rng(0).normal(size=(4, 3))
    >>> check = tf1hess.check_hessians(fn, x)
    >>> check.ok, check.abs_error.shape
    (True, (4,))
    >>> wrong = check.hessians + 0.1
    >>> tf1hess.check_hessians(fn, x, hessians=wrong).ok
    False
  """
  _check_fn(fn)
  _check_tol(rtol, "rtol")
  _check_tol(atol, "atol")
  x = _as_batch(x)
  want = x.shape + x.shape[1:]
  s = _Stepper(fn, x, eps, 4, batch_size, precision)
  default_rtol = 100.0 * max(np.sqrt(s.eps_m), s.factor**2)
  if default_rtol >= 1 and (rtol is None or atol is None):
    raise ValueError(
      f"`fn` computes in {s.precision.name} (machine epsilon "
      f"{s.eps_m:.2g}), where finite differences cannot check Hessians: "
      f"the default tolerance would be rtol={default_rtol:.2g}, and a "
      "Hessian off by its own size would pass. Check the model in float32 "
      "or float64 (a Keras model under a mixed precision policy: build it "
      "again under the policy 'float32' and copy the weights), or pass "
      "both `rtol` and `atol`."
    )
  if hessians is None:
    if not tf.executing_eagerly():
      raise ValueError(
        "`hessians` must be given where eager execution is off (after "
        "tf.compat.v1.disable_eager_execution(), or in a graph): without "
        "it, check_hessians computes tf1hess.eager.batch_hessians(fn, x) "
        "and needs eager tensors. Pass the values to check, e.g. "
        "hessians=sess.run(tf1hess.batch_hessians(y, x_ph), {x_ph: x})."
      )
    hessians = eager.batch_hessians(fn, tf.convert_to_tensor(x))
  if isinstance(hessians, (tf.Tensor, tf.Variable)):
    hessians = hessians.numpy()
  hessians = np.asarray(hessians)
  if not _checks.is_floating_array(hessians.dtype):
    raise TypeError(f"`hessians` must be floating; saw dtype {hessians.dtype}.")
  if hessians.shape != want:
    raise ValueError(
      f"`hessians` must have shape (N, d..., d...) = {want} for `x` of "
      f"shape {x.shape}; saw {hessians.shape}."
    )
  hessians = hessians.astype(np.float64)
  fd = s.hessians()
  n = x.shape[0]
  diff = np.abs(hessians - fd).reshape(n, -1)
  abs_error = np.max(diff, axis=1, initial=0.0)
  abs_error = np.where(np.any(np.isnan(diff), axis=1), np.nan, abs_error)
  scale = np.maximum(
    np.max(np.nan_to_num(np.abs(fd)).reshape(n, -1), axis=1, initial=0.0),
    np.max(np.nan_to_num(np.abs(hessians)).reshape(n, -1), axis=1, initial=0.0),
  )
  with np.errstate(divide="ignore", invalid="ignore"):
    rel_error = np.where(
      scale > 0, abs_error / scale, np.where(abs_error != 0, np.inf, 0.0)
    )
  if rtol is None:
    rtol = default_rtol
  if atol is None:
    h_min = np.min(np.minimum(s.h_plus, s.h_minus), axis=1, initial=np.inf)
    atol = 10.0 * s.eps_m * s.f_max / h_min**2
  tolerance = atol + rtol * scale
  passed = abs_error <= tolerance
  check = HessianCheck(
    hessians=hessians,
    fd_hessians=fd,
    abs_error=abs_error,
    rel_error=rel_error,
    tolerance=np.broadcast_to(tolerance, (n,)).astype(np.float64),
    passed=passed,
    rtol=float(rtol),
    note=_note(s, passed),
  )
  if raise_on_failure and not check.ok:
    raise AssertionError(check.summary())
  return check
