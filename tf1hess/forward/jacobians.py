"""Per-sample Jacobians with structure, and the curvature terms built on them.

A tensor `v` of shape `(N, *e)` that depends on the input `x` `(N, K)` has
the per-sample Jacobian `J_v[n, k, *e] = d v[n, *e] / d x[n, k]`: the K
tangents are one extra axis, right after the batch axis, so that a matmul by
weights is one matmul of `(N * K, units)`. Two structures are kept:

- shared: the Jacobian is the same in every sample and is stored once as
  `(K, *e)` (`x` itself is the identity; a matmul of a shared Jacobian by
  weights is the weight matrix);
- dense: `(N, K, *e)`;
- diagonal: the last axis of `e` is the feature axis of `x` itself (`x`,
  `x[:, None, :] - mu`, elementwise functions of those), and
  `J_v[n, k, ..., j] = d[n, ..., j] if k == j else 0`: stored as `d`
  `(N or 1, *e)`, K times smaller than dense. Rules that do not keep it
  receive it materialized (`materialize`).

A shared Jacobian is a dense one with a batch of 1: TensorFlow's
broadcasting combines the two without copies. A tensor that does not depend
on `x` has no Jacobian (`None`).

A curvature term `sum_e c[n, e] J_a[n, :, e] J_b[n, :, e]^T` (plus its
transpose when symmetric) is contracted into the full per-sample Hessian
`(N, K, K)`, its diagonal `(N, K)` or its trace `(N,)`; shared Jacobians make
each contraction one matmul with the weights instead of a batched one.
"""

import collections
import contextlib
import functools

import numpy as np
import tensorflow as tf

HESSIAN = "hessian"
DIAGONAL = "diagonal"
LAPLACIAN = "laplacian"
MODES = (HESSIAN, DIAGONAL, LAPLACIAN)


class Hoisting:
  """Builds what does not depend on the samples outside a loop over chunks.

  Made where the loop is built (the graph and control flow context of its
  enclosing code); within `with hoisting:`, `invariant` builds a value of
  tensors from outside the loop (the model's weights) outside it as well:
  a shared Jacobian and the products of weights made from it (a matmul of
  x by weights, `_folded_matmul`'s and `contract`'s products of factors)
  are then computed once per run, not once per chunk.
  """

  _active = []

  def __init__(self):
    self._graph = tf.compat.v1.get_default_graph()
    # pylint: disable=protected-access
    self._context = self._graph._get_control_flow_context()
    self._outside = set(self._graph.get_operations())

  def __enter__(self):
    Hoisting._active.append(self)
    return self

  def __exit__(self, *unused_exc):
    Hoisting._active.pop()

  def outside(self, t):
    """`t` as a tensor from outside the loop, or `None` where it is not one.

    A tensor that a loop body captured is the one it captured: under
    control flow v2 (a function), a placeholder of the body's graph; under
    v1, the loop's `Enter` of a constant.
    """
    if not isinstance(t, tf.Tensor):
      return t  # A Python number.
    if not hasattr(t, "op"):
      return None
    if t.graph is self._graph:
      if t.op in self._outside:
        return t
      if t.op.type in ("Enter", "RefEnter") and t.op.get_attr("is_constant"):
        return self.outside(t.op.inputs[0])
      return None
    for external, internal in getattr(t.graph, "captures", ()):
      if internal is t:
        return self.outside(external)
    return None

  @contextlib.contextmanager
  def building(self):
    """Ops built within are outside the loop."""
    graph = self._graph
    # pylint: disable=protected-access
    context = graph._get_control_flow_context()
    with graph.as_default(), graph.control_dependencies(None):
      graph._set_control_flow_context(self._context)
      try:
        yield
      finally:
        graph._set_control_flow_context(context)

  def built(self, value):
    """Marks the tensors of `value` as outside the loop."""
    for t in tf.nest.flatten(value):
      self._outside.add(t.op)
    return value


def invariant(fn, *tensors):
  """`fn(*tensors)`, built outside the loop over chunks (`Hoisting`) where
  there is one and `tensors`, all that `fn` reads, are from outside it."""
  hoisting = Hoisting._active[-1] if Hoisting._active else None  # pylint: disable=protected-access
  if hoisting is None:
    return fn(*tensors)
  outside = [hoisting.outside(t) for t in tensors]
  if any(t is None for t in outside):
    return fn(*tensors)
  with hoisting.building():
    return hoisting.built(fn(*outside))


def in_dtype(value, dtype):
  """`value` (a tensor, or a Python or numpy number) in `dtype`.

  `tf.cast` of a Python float makes a float32 constant first: `1 / 3`
  would lose its digits beyond float32's in a float64 model.
  """
  return tf.cast(tf.convert_to_tensor(value, dtype_hint=dtype), dtype)


class Jacobian:
  """`value` `(K, *e)` when `shared`, `(N or 1, *e)` when `diagonal`, else
  `(N, K, *e)`.

  `source`: where `fit` broadcast a Jacobian over entry axes to make this
  one, that Jacobian (for `summed_over_broadcasts`), else `None`.

  `parts`: `None`, or the same value as a sum of products that have not been
  written: a list of `(base, factor)`, `base` a Jacobian (not diagonal)
  whose entry axes are of size 1 where it broadcasts, `factor` a tensor
  independent of `x` that broadcasts against the entries `(N, *e)`, or
  `None` for 1. `value` is `sum base.value * factor` (the factor given a
  tangent axis). A sum over entry axes reads them (`summed_parts`): the
  square of a tensor broadcast against weights, scaled, then summed (a
  distance to centres) is then one batched matmul, not a `(N, K, *e)`
  product written and read back. A rule that reads `value` gets the
  product; where nothing reads it, TensorFlow does not run it.

  `scaled`: where `scale` made this Jacobian, `(jac, s)`: it is `jac`'s
  times `s` entry by entry (for `pulled_back` and `scale_chain`); where
  `add` summed two scales of one Jacobian, that one and the sum of their
  factors; else `None`. `summands`: where `add` summed scales of
  different Jacobians, the list of `(root, s)` it is the sum of, `s` `None`
  for 1 (`linear_terms`); else `None`. `viewed`:
  where a reshape made it, the Jacobian reshaped (the same entries in the
  same order), else `None`. `gram`: where `summed_parts` made this dense
  Jacobian from parts of shared bases, a `Gram` that gives it as
  `sum_r B[k, e, r] F[n, e, r]` with R small beside K (for the squared
  norms of a Laplacian), else `None`.
  """

  __slots__ = (
    "value",
    "shared",
    "diagonal",
    "source",
    "parts",
    "scaled",
    "summands",
    "viewed",
    "gram",
  )

  def __init__(self, value, shared, diagonal=False):
    self.value = value
    self.shared = shared
    self.diagonal = diagonal
    self.source = None
    self.parts = None
    self.scaled = None
    self.summands = None
    self.viewed = None
    self.gram = None

  @property
  def lead(self):
    """The number of axes before the entries."""
    return 1 if self.shared or self.diagonal else 2

  @property
  def entry_rank(self):
    return self.value.shape.rank - self.lead

  def entry_shape(self):
    """The shape `*e` of the entries (see `dims`)."""
    return dims(self.value, self.lead)

  def with_value(self, value):
    """A Jacobian of the same structure holding `value`."""
    return Jacobian(value, self.shared, self.diagonal)


def dims(t, start=0, stop=None):
  """`t`'s shape from axis `start` to `stop`, as a list: Python ints where
  they are static (no shape ops to build and run), scalar tensors of one
  `tf.shape(t)` elsewhere; a 1-D tensor when the rank is not static."""
  if t.shape.rank is None:
    return tf.shape(t)[start:stop]
  static = t.shape.as_list()
  axes = range(len(static))[start:stop]
  if all(static[i] is not None for i in axes):
    return [static[i] for i in axes]
  dynamic = tf.unstack(tf.shape(t), num=len(static))
  return [dynamic[i] if static[i] is None else static[i] for i in axes]


def static_size(shape):
  """The number of entries of a static `TensorShape`, else `None`."""
  if shape.rank is None or not shape.is_fully_defined():
    return None
  return shape.num_elements()


def concat(*parts):
  """The shape made of `parts` (lists, as `dims` gives, or 1-D tensors): a
  list when they all are, else one tensor."""
  if all(isinstance(p, list) for p in parts):
    return [d for p in parts for d in p]
  return tf.concat([tf.convert_to_tensor(p, tf.int32) for p in parts], 0)


def dense(value):
  return Jacobian(value, False)


def shared(value):
  return Jacobian(value, True)


def diagonal(d):
  return Jacobian(d, False, True)


def materialize(jac):
  """A diagonal `jac` as a shared (a batch of 1) or dense Jacobian."""
  if not jac.diagonal:
    return jac

  def build(d):
    k = dims(d, -1)[0]
    ones = [1] * (d.shape.rank - 2)
    eye = tf.reshape(tf.eye(k, dtype=d.dtype), [k, *ones, k])
    return tf.expand_dims(d, 1) * eye  # (B, K, *e)

  if tf.compat.dimension_value(jac.value.shape[0]) == 1:
    out = shared(invariant(lambda d: build(d)[0], jac.value))
  else:
    out = dense(build(jac.value))
  out.scaled = jac.scaled  # The same entries.
  return out


def apply_per_sample(jac, fn):
  """Applies the per-sample linear map `fn` to every tangent of `jac`.

  `fn` maps a batch `(B, *e)` to `(B, *e')` sample by sample (a reshape of
  the entries, a transpose that keeps the batch axis, a slice, a sum over
  entry axes, ...). A shared Jacobian is such a batch with `B = K`; a dense
  one is reshaped to `B = N * K` and back; a diagonal one is materialized
  first.
  """
  jac = materialize(jac)
  if jac.shared:
    return shared(fn(jac.value))
  shape = dims(jac.value)
  merged = tf.reshape(jac.value, concat([shape[0] * shape[1]], shape[2:]))
  out = fn(merged)
  return dense(tf.reshape(out, concat(shape[:2], dims(out, 1))))


def group(jac, rows, n, entry_shape):
  """`jac` of `(N, *e)` for its reshape to `(N G, *e')`, G = `rows`.

  Row `n G + g` of the output is part `g` of sample `n` (the entries of
  `e` in order, `prod(e')` at a time); its Jacobian is dense, `(N G, K,
  *e')`, whatever the structure of `jac`.
  """
  jac = materialize(jac)
  part = tf.reduce_prod(entry_shape)
  if jac.shared:
    k = dims(jac.value, 0, 1)[0]
    value = tf.transpose(
      tf.reshape(jac.value, tf.stack([k, rows, part])), [1, 0, 2]
    )
    value = tf.broadcast_to(value, tf.stack([n, rows, k, part]))
  else:
    k = dims(jac.value, 1, 2)[0]
    value = tf.transpose(
      tf.reshape(jac.value, tf.stack([n, k, rows, part])), [0, 2, 1, 3]
    )
  shape = tf.concat([tf.stack([n * rows, k]), entry_shape], axis=0)
  return dense(tf.reshape(value, shape))


def ungroup(jac, rows, n, time_major=False):
  """The Jacobian `(N, K, G M)` of a tensor of G rows per sample.

  The inverse of `group`: `jac` is `(N G, K, *e)` (or shared), the entries
  of each sample's G rows are flattened in order. With `time_major`, row
  `g N + n` is part `g` of sample `n` (see `registry.Regrouped`).
  """
  jac = materialize(jac)
  part = _size(jac)
  if jac.shared:
    k = dims(jac.value, 0, 1)[0]
    value = tf.broadcast_to(
      tf.reshape(jac.value, tf.stack([k, 1, part])), tf.stack([k, rows, part])
    )
    return shared(tf.reshape(value, tf.stack([k, rows * part])))
  k = dims(jac.value, 1, 2)[0]
  lead, perm = (
    ([rows, n], [1, 2, 0, 3]) if time_major else ([n, rows], [0, 2, 1, 3])
  )
  value = tf.transpose(tf.reshape(jac.value, tf.stack([*lead, k, part])), perm)
  return dense(tf.reshape(value, tf.stack([n, k, rows * part])))


def scale(jac, s):
  """`J` of `s * v` for a `v` of Jacobian `jac` and `s` independent of `x`.

  `s` broadcasts against `v` `(N, *e)`: when it has no batch axis (fewer
  dimensions than `v`, or a static batch of 1), a shared `jac` stays shared.
  """
  s = in_dtype(s, jac.value.dtype)
  out = _scaled(*_from_root(jac, s))
  if jac.parts is not None and not out.diagonal:
    out.parts = [(b, s if f is None else f * s) for b, f in jac.parts]
  out.scaled = (jac, s)
  return out


def _from_root(jac, s):
  """`(root, t)` with `scale(jac, s)` the same entries as `t * root`: where
  `jac` is a dense chain of scales (`scale_chain`), its root (neither
  diagonal nor with `parts`) and the product of the chain's factors with
  `s` (`(N, *e)` at most, where the chain's Jacobians are K times larger):
  one pass over the tangents for the chain's last link instead of one per
  link, e.g. `-J_z` not written before `u * (1 - z)` scales it. Else
  `(jac, s)`."""
  if jac.shared or jac.diagonal or jac.parts is not None or not jac.scaled:
    return jac, s
  root, factors = _chain(jac)
  if root.diagonal or root.parts is not None:
    return jac, s
  return root, _product([*factors, s])


def _scaled(jac, s):
  """The value of `scale(jac, s)`, `s` cast to the dtype of `jac`."""
  rank = jac.entry_rank
  if jac.diagonal:
    # `d` has the batch axis of `v`: `s` broadcasts against it as against v,
    # unless it would broadcast the feature axis.
    last = tf.compat.dimension_value(s.shape[-1]) if s.shape.rank else 1
    if (
      s.shape.rank is None
      or s.shape.rank > rank + 1
      or last not in (1, tf.compat.dimension_value(jac.value.shape[-1]))
    ):
      return _scaled(materialize(jac), s)
    return jac.with_value(jac.value * s)
  if s.shape.rank is not None and s.shape.rank <= rank:
    return jac.with_value(jac.value * s)
  if s.shape.rank == rank + 1 and tf.compat.dimension_value(s.shape[0]) == 1:
    return jac.with_value(jac.value * s[0])
  return dense(tf.expand_dims(s, 1) * _unbroadcast(jac, s))


def _unbroadcast(jac, s):
  """The value of `jac`, or of the Jacobian that `fit` broadcast to make
  it when `s` `(N, *e)` has every entry: the product with `s` broadcasts
  it the same, without writing the broadcast first."""
  src, entries = jac.source, jac.value.shape[jac.lead :]
  if (
    src is None
    or src.diagonal
    or not entries.is_fully_defined()
    or s.shape[1:] != entries
  ):
    return jac.value
  return src.value


def negate(jac):
  out = jac.with_value(-jac.value)
  if jac.parts is not None:
    out.parts = [(b, -1.0 if f is None else -f) for b, f in jac.parts]
  out.scaled = (jac, tf.constant(-1, jac.value.dtype))
  return out


# The most parts (`Jacobian.parts`) a sum of Jacobians keeps.
_MAX_PARTS = 8


def add(a, b):
  """The sum of two Jacobians (or `None`s) of tensors of the same entries."""
  if a is None:
    return b
  if b is None:
    return a
  scaled = _summed_scales(a, b)
  if scaled is not None and a.parts is None and b.parts is None:
    # One product of the common Jacobian, not two and their sum.
    out = _scaled(*scaled)
    out.scaled = scaled
    return out
  summands = None
  if a.diagonal and b.diagonal:
    out = diagonal(a.value + b.value)
  else:
    a, b = materialize(a), materialize(b)
    value = a.value + b.value
    if scaled is None and not (a.shared and b.shared):
      summands, merged = _summands(a, b)
      if merged:
        # A Jacobian in both (`J_z` of `(1 - z) * u + z * v`): one
        # product of it by the sum of its factors.
        rebuilt = summed_terms(summands)
        if rebuilt.shape.rank == value.shape.rank:
          value = rebuilt
    out = Jacobian(value, a.shared and b.shared)
    if a.parts is not None or b.parts is not None:
      parts = (a.parts or [(a, None)]) + (b.parts or [(b, None)])
      out.parts = parts if len(parts) <= _MAX_PARTS else None
  out.scaled = scaled
  out.summands = summands
  return out


# The most Jacobians a sum keeps as `summands`.
_MAX_SUMMANDS = 4


def linear_terms(jac):
  """`[(root, s), ...]`: `jac` is the sum of `s * root` over the list, each
  `root` a Jacobian that no `scale` or sum made (dense, or shared by all
  samples; not diagonal, without `parts`), each `s` a factor that
  broadcasts against the entries or `None` for 1; or `None` where `jac` is
  not such a sum.

  A gated unit `(x A) * sigmoid(x B)` (GLU, SwiGLU) is `sigmoid(x B) A^T +
  (x A) sigmoid'(x B) B^T`: two scaled weight matrices, which the next
  layer's matmul folds (`structural._folded_matmul`) without writing the
  `(N, K, H)` Jacobian of the unit; in a layer of the modified MLP of
  physics-informed networks, `(1 - z) * u + z * v`, a dense `J_z` beside
  them.
  """
  if jac.summands is not None:
    return jac.summands
  if jac.diagonal or jac.parts is not None:
    return None
  if jac.shared:
    return [(jac, None)]
  root, factors = _chain(jac)
  if root.diagonal or root.parts is not None:
    return None
  s = _product(factors) if factors else None
  if root.summands is None:
    return [(root, s)]
  if s is None:
    return root.summands
  return [(u, s if f is None else f * s) for u, f in root.summands]


def _summands(a, b):
  """`(summands, merged)`: `Jacobian.summands` of `a + b` (or `None`), and
  whether a root is in both."""
  terms = {}  # By the root's identity: `(root, s)`.
  merged = False
  for jac in (a, b):
    lin = linear_terms(jac)
    if lin is None:
      return None, False
    for u, s in lin:
      if id(u) in terms:
        merged = True
        s = _summed_factors(terms[id(u)][1], s, u.value.dtype)
      terms[id(u)] = (u, s)
  if len(terms) > _MAX_SUMMANDS:
    return None, False
  return list(terms.values()), merged


def summed_terms(terms):
  """The value of the sum of `s * root` over `terms` (`linear_terms`);
  shared ones broadcast against the dense ones."""
  values = [
    root.value if s is None else _scaled(root, s).value for root, s in terms
  ]
  return functools.reduce(lambda a, b: a + b, values)


def scale_chain(jac):
  """`(root, s)`: `jac` is `root` times `s` entry by entry, `root` the
  Jacobian that the `scale`s (and sums of them) which made `jac` started
  from, or `None` where no `scale` made `jac`.

  A function of a function of a dense layer (`sin(tanh(x W))`, `0.5 *
  tanh(x W)`) is then the layer's weights, shared by all samples, times one
  `(N, H)` factor: `s` is the product of the chain's factors (ops that
  nothing runs unless a rule reads `s`).
  """
  root, factors = _chain(jac)
  if not factors:
    return None
  return root, _product(factors)


def _chain(jac):
  """`jac`'s root (see `scale_chain`) and the factors of its scales."""
  factors = []
  while jac.scaled is not None:
    jac, s = jac.scaled
    factors.append(s)
  return jac, factors


def _product(factors):
  return functools.reduce(lambda s, t: s * t, factors)


def _summed_scales(a, b):
  """`Jacobian.scaled` of `a + b` where both are scales of one Jacobian
  (`scale_chain`; a Jacobian itself is its own scale by 1): the product
  rule's two terms of `z * sigmoid(z)` (`(sigmoid(z) + z sigmoid'(z)) J_z`)
  are then one scale of `J_z`. Else `None`."""
  (root, of_a), (other, of_b) = _chain(a), _chain(b)
  if root is not other:
    return None
  s_a, s_b = (_product(f) if f else None for f in (of_a, of_b))
  return root, _summed_factors(s_a, s_b, a.value.dtype)


def _summed_factors(s, t, dtype):
  """`s + t` for factors that may be `None` (1)."""
  one = tf.constant(1, dtype)
  return (one if s is None else s) + (one if t is None else t)


def fit(jac, out):
  """Broadcasts `jac` to the entries of `out` `(N, *e)` when they differ."""
  if jac is None:
    return None
  lead = jac.lead
  have = jac.value.shape[lead:]
  want = out.shape[1:]
  if have.is_fully_defined() and want.is_fully_defined() and have == want:
    return jac
  if jac.diagonal and not (
    have.rank
    and want.rank
    and tf.compat.dimension_value(have[-1]) is not None
    and have[-1] == want[-1]
  ):
    # Broadcasting the feature axis itself would break the structure.
    return fit(materialize(jac), out)
  shape = concat(dims(jac.value, 0, lead), dims(out, 1))
  fitted = jac.with_value(tf.broadcast_to(jac.value, shape))
  fitted.source = jac
  if not jac.diagonal and have.rank == want.rank:
    fitted.parts = jac.parts or [(jac, None)]
  return fitted


def summed_by_roots(jac, axes, keepdims, n):
  """`J` of `reduce_sum(v, axes, keepdims)` over every entry axis of `v`,
  from `linear_terms(jac)` when each root is shared by all samples and of
  the entries of `v`: `sum_e A_i[:, e] s_i[n, e]` is one matmul `(N, M) x
  (M, K)` per root (`sum(tanh(x A))`, the gated units of `summands`), where
  the sum of the dense `J` writes and reads `(N, K, M)`. `None` otherwise.
  """
  entries = jac.value.shape[jac.lead :]
  if (
    jac.shared
    or jac.diagonal
    or jac.parts is not None
    or not entries.is_fully_defined()
    or list(axes) != list(range(1, entries.rank + 1))
  ):
    return None
  terms = linear_terms(jac)
  if not terms or not all(
    u.shared and u.value.shape[1:] == entries for u, _ in terms
  ):
    return None
  m = entries.num_elements()
  total = None
  for u, s in terms:
    flat = tf.reshape(u.value, concat(dims(u.value, 0, 1), [m]))  # (K, M)
    if s is None:
      part = tf.reduce_sum(flat, 1)  # The same in every sample.
    else:
      s = tf.broadcast_to(in_dtype(s, flat.dtype), concat([n], entries))
      part = tf.matmul(tf.reshape(s, [n, m]), flat, transpose_b=True)
    total = part if total is None else total + part
  if total.shape.rank == 1:
    return None  # No factor: `jac` is shared, summed elsewhere.
  if keepdims:
    total = tf.reshape(total, concat([n], dims(total, 1, 2), [1] * len(axes)))
  return dense(total)


def summed_parts(jac, axes, keepdims, n, k):
  """`J` of `reduce_sum(v, axes, keepdims)` from the parts of `jac`, the
  dense Jacobian of `v` `(N, *e)`, without writing their products: a base
  that broadcasts along every summed axis multiplies its factor summed
  alone; a base whose own axes (those it does not broadcast along) are all
  summed, or a shared one, is one batched matmul by its factor
  (`tf.einsum`); a base alone is summed alone. Only a dense base that sums
  some of its own axes and keeps others writes its product. `None` where
  `jac` has no parts, is not dense, or an entry shape is not static.

  `axes`: the summed entry axes of `v` (from 1), sorted; `n`, `k`: the
  batch size and K (not read from `jac.value`: then TensorFlow would run
  the product to read its shape).
  """
  entries = jac.value.shape[jac.lead :]
  if (
    jac.parts is None
    or jac.shared
    or jac.diagonal
    or not entries.is_fully_defined()
    or entries.rank > len(_LETTERS)
  ):
    return None
  full = entries.as_list()
  summed = [a - 1 for a in axes]
  kept = [i for i in range(len(full)) if i not in summed]
  big = [i for i in range(len(full)) if full[i] != 1]

  def subscripts(axes):
    return "".join(_LETTERS[i] for i in axes)

  total = None
  pieces = []  # Of `Gram`, while every part is of a shared base.
  for base, factor in jac.parts:
    have = base.value.shape[base.lead :]
    if have.rank != len(full) or not have.is_fully_defined():
      return None
    # The base's axes of more than one entry; it broadcasts along the others.
    own = [i for i, h in enumerate(have.as_list()) if h != 1]
    if any(have[i] != full[i] for i in own):
      return None
    lead = "k" if base.shared else "nk"
    value = tf.reshape(
      base.value, concat(dims(base.value, 0, base.lead), [full[i] for i in own])
    )
    if factor is None and all(i in own for i in summed if i in big):
      # A sum of the base alone (an einsum of one operand is slower).
      pieces = None
      out = [i for i in kept if i in own]
      part = tf.reduce_sum(
        value, [len(lead) + own.index(i) for i in summed if i in own]
      )
    else:
      out = [i for i in kept if i in big]
      factor = in_dtype(1 if factor is None else factor, value.dtype)
      factor = tf.broadcast_to(factor, concat([n], full))
      if not any(i in own for i in summed):
        # The base broadcasts along every summed axis: the factor alone is
        # summed, then multiplies the base (3-5 times faster than the
        # product written and summed, 2-3 times than an einsum, measured).
        # Both keep the summed axes, of 1: the reshape below drops them.
        factor = tf.reduce_sum(factor, [1 + i for i in summed], keepdims=True)
        part = base.value * tf.expand_dims(factor, 1)
        sizes = [1 if i in summed else f for i, f in enumerate(full)]
      elif base.shared or all(i in summed for i in own):
        # A batched matmul `(N, K, own) x (N, own, rest)`; of a shared
        # base, `(K, own) x (own, N rest)`, batched over the own axes it
        # keeps (a pairwise difference's `(K, 1, P, 3)` summed over its 3
        # coordinates; 1.5 to 6 times, mostly 3 times, faster than the
        # product written and summed, measured).
        sizes = full
        equation = f"{lead}{subscripts(own)},n{subscripts(big)}"
        part = tf.einsum(
          f"{equation}->nk{subscripts(out)}",
          value,
          tf.reshape(factor, concat([n], [full[i] for i in big])),
        )
      else:
        # A dense base keeps axes of its own, which an einsum would make
        # batch axes beside the samples' and the tangents' (3-4 times
        # slower, measured): the product, written, then summed.
        part = tf.reduce_sum(
          base.value * tf.expand_dims(factor, 1), [2 + i for i in summed]
        )
      if pieces is not None and base.shared:
        pieces.append((base.value, factor, sizes))
      else:
        pieces = None
      lead = "nk"
    # The kept axes, of 1 where this part broadcasts along them.
    part = tf.reshape(
      part,
      concat(
        dims(part, 0, len(lead)), [full[i] if i in out else 1 for i in kept]
      ),
    )
    total = part if total is None else total + part
  total = tf.broadcast_to(total, concat([n, k], [full[i] for i in kept]))
  if keepdims:
    total = tf.reshape(
      total,
      concat([n, k], [1 if i in summed else full[i] for i in range(len(full))]),
    )
  out = dense(total)
  if pieces:
    out.gram = Gram.of(pieces, kept, summed, k)
  return out


# The least ratio of the products of a dense Jacobian's squared norms,
# `N K E (R + 1)`, to those of its Gram, `N E R^2`, for which `Gram` is
# taken: its `(R, R)` matmuls per entry run far slower per product. On the
# squared distances of particles, side by side: 0.88x at a ratio of 2.3 (4
# in 3-D), 1.14x to 1.58x at 4.7 to 9.3, 2.1x to 2.3x at 20 (32 in the
# plane).
_GRAM_GAIN = 4


class Gram:
  """A dense Jacobian `J[n, k, e] = sum_r B[k, e, r] F[n, e, r]`, `B`
  `(K, E, R)` shared by all samples, `F` `(N, E, R)`: the squared norm of
  its tangents, `sum_k J[n, k, e]^2`, is then `F^T G F` with `G = B^T B`
  `(E, R, R)`, shared: `N E R^2` products instead of `N K E R` to write
  `J` and `N K E` to square it (taken from `_GRAM_GAIN` times fewer).

  A squared distance `sum_c d[c]^2` of pairwise differences `d`
  (`jacobians.summed_parts`) is such a Jacobian: R = 6 (the 3 coordinates
  of the two parts of `d`), where K is 3 per particle.
  """

  def __init__(self, size, build):
    self.size = size  # R
    self._build = build

  @classmethod
  def of(cls, pieces, kept, summed, k):
    """The `Gram` of the parts `(base, factor, sizes)` of `summed_parts`
    (`base` `(K, *e)` and `factor` `(N, *e)` broadcast to `sizes`, summed
    over `summed`, kept along `kept`), or `None` where it would not save
    `_GRAM_GAIN` times the products."""
    order = kept + summed
    e = int(np.prod([pieces[0][2][i] for i in kept], dtype=np.int64))
    sizes = [
      int(np.prod([p[2][i] for i in summed], dtype=np.int64)) for p in pieces
    ]
    r = sum(sizes)
    if not isinstance(k, int) or k * (r + 1) < _GRAM_GAIN * r * r:
      return None

    def build():
      bs, fs = [], []
      perm = [0] + [1 + i for i in order]
      for (base, factor, shape), width in zip(pieces, sizes):
        b = tf.broadcast_to(base, [k] + shape)
        bs.append(tf.reshape(tf.transpose(b, perm), [k, e, width]))
        f = tf.broadcast_to(factor, concat(dims(factor, 0, 1), shape))
        fs.append(
          tf.reshape(tf.transpose(f, perm), concat(dims(f, 0, 1), [e, width]))
        )
      return tf.concat(bs, 2), tf.concat(fs, 2)

    return cls(r, build)

  def squared_norms(self):
    """`sum_k J[n, k, e]^2`, `(N, E)`."""
    b, f = self._build()
    g = invariant(lambda b: tf.einsum("ker,kes->ers", b, b), b)
    return tf.reduce_sum(tf.einsum("ner,ers->nes", f, g) * f, 2)


# Subscripts of entry axes in `summed_parts` (`n` and `k` are the batch's
# and the tangent's).
_LETTERS = "abcdefghijlmopqrstuvwxyz"


def cast(jac, dtype):
  if jac.value.dtype == dtype:
    return jac
  return jac.with_value(tf.cast(jac.value, dtype))


def to_dense(jac, n):
  """`jac` as a dense `(N, K, *e)` value."""
  jac = materialize(jac)
  if not jac.shared:
    return jac.value
  shape = concat([n], dims(jac.value))
  return tf.broadcast_to(jac.value, shape)


def zeros_like_entries(t, k, dtype):
  """A shared zero Jacobian for a tensor `t` independent of `x`."""
  return shared(tf.zeros(concat([k], dims(t, 1)), dtype))


class Term:
  """`sum_e c[n, e] J_a[n, :, e] J_b[n, :, e]^T` (+ transpose if symmetric).

  `c` broadcasts against the entries `(N, *e)` of `a` and `b` (which have
  the same entries).
  """

  __slots__ = ("c", "a", "b", "symmetric")

  def __init__(self, c, a, b=None, symmetric=False):
    self.c = c
    self.a = a
    self.b = a if b is None else b
    self.symmetric = symmetric


def pulled_back(term, n):
  """`term` on the Jacobians that its factors were made from, entry by
  entry: by `scale`, by `fit` broadcasting, by a reshape.

  With `J_a = J_u s` and `J_b = J_w t` entry by entry, `sum_e c J_a J_b^T
  = sum_e (c s t) J_u J_w^T`; a square of a broadcast factor sums `c` over
  the broadcast axes; a reshape of both factors (or of the one) reshapes
  `c`. The term of a function of a function (`log1p(square(u))`) is then
  on the same factors as the inner one's, and both contract as one; a
  factor shared by all samples before an elementwise scale contracts as a
  matmul by weights. The factors are never larger for it.

  A symmetric term whose two factors are then one Jacobian `J` (the cross
  term of `u * f(u)`: GELU, swish, mish) is `X + X^T = 2 X`, with `X = sum_e
  c J J^T` symmetric: it comes back as the term `2 c` on `J`, not
  symmetric, so that it is summed with the other terms on `J` (`f''`'s)
  and contracted once with them.

  Args:
    term: a `Term`.
    n: the batch size.

  Returns:
    The `Term`, or `term` itself when its factors were made otherwise.
  """
  c, a, b = term.c, term.a, term.b
  while True:
    step = _pulled_back_once(c, a, b, n)
    if step is None:
      break
    c, a, b = step
  if term.symmetric and a is b:
    return Term(2 * c, a)
  if a is term.a and b is term.b:
    return term
  return Term(c, a, b, term.symmetric)


def by_summands(term, mode, batch=None):
  """`term` on a sum of scales of Jacobians shared by all samples, as terms
  on them: `[term]` itself otherwise.

  The Jacobian `J = sum_i A_i s_i` of a sum of dense layers of `x` (a gate
  and its value `(x A) * sigmoid(x B)`, a skip `x A + tanh(x B)`) is
  written `(N, K, M)` to contract `sum_e c J J^T` per sample; as the terms
  `c s_i s_j` on `A_i, A_j`, each a full Hessian of two shared factors
  (`outer_of_shared`), it is one matmul with the others
  (`contract_outer_of_shared`), and nothing writes `J` unless another rule
  reads it. Only a sum of two: its three terms are faster than the one
  contraction of `J` (1.2x to 1.8x, measured), the ten terms of a sum of
  four slower (1.4x).

  Args:
    term: a `Term`, as `pulled_back` leaves it.
    mode: `HESSIAN`, `DIAGONAL` or `LAPLACIAN`; only full Hessians are
      split.
    batch: the static N, or `None`.

  Returns:
    A list of `Term`s.
  """
  summands = term.a.summands
  if (
    mode != HESSIAN
    or term.a is not term.b
    or term.symmetric
    or not summands
    or len(summands) > 2
    or not all(
      u.shared and outer_of_shared(Term(1, u), mode, batch) for u, _ in summands
    )
  ):
    return [term]
  c = term.c

  def times(*factors):
    out = c
    for f in factors:
      if f is not None:
        out = in_dtype(out, f.dtype) * f
    return out

  terms = []
  for i, (u, s) in enumerate(summands):
    terms.append(Term(times(s, s), u))
    for w, t in summands[i + 1 :]:
      terms.append(Term(times(s, t), u, w, symmetric=True))
  return terms


def _pulled_back_once(c, a, b, n):
  """`(c, a, b)` one step back (see `pulled_back`), or `None`."""

  def times(s):
    return in_dtype(c, s.dtype) * s

  if a is b and a.scaled is not None:
    u, s = a.scaled
    return times(s * s), u, u
  if a is not b and a.scaled is not None:
    u, s = a.scaled
    return times(s), u, b
  if a is not b and b.scaled is not None:
    w, s = b.scaled
    return times(s), a, w
  axes = _broadcast_axes(a)
  if axes is not None and (a is b or _broadcast_axes(b) == axes):
    # Both factors are the same along the broadcast axes.
    summed = tf.reduce_sum(
      _full_c(c, a, n), axis=[1 + i for i in axes], keepdims=True
    )
    return summed, a.source, b.source
  if a is b and a.viewed is not None:
    return _viewed_c(c, a, n), a.viewed, a.viewed
  u, w = a.viewed, b.viewed
  if u is None or w is None:
    return None
  have, other = u.value.shape[u.lead :], w.value.shape[w.lead :]
  if not (have.is_fully_defined() and have == other):
    return None
  return _viewed_c(c, a, n), u, w


def _viewed_c(c, jac, n):
  """`c` of a term on `jac`, for the Jacobian `jac.viewed` it reshapes."""
  if not isinstance(c, tf.Tensor) or c.shape.rank == 0:
    return c
  return tf.reshape(_full_c(c, jac, n), concat([n], jac.viewed.entry_shape()))


def ungroup_term(term, rows, n, ungrouped, time_major=False):
  """`term` of tensors of `rows` rows per sample, as a term per sample.

  `ungrouped` caches the Jacobians `ungroup` made, by identity, so that
  terms on the same Jacobian still share it. `time_major`: see `ungroup`.
  """

  def convert(jac):
    if id(jac) not in ungrouped:
      ungrouped[id(jac)] = (jac, ungroup(jac, rows, n, time_major))
    return ungrouped[id(jac)][1]

  a = materialize(term.a)
  size = _size(a)
  c = _full_c(term.c, a, n * rows)
  if time_major:
    c = tf.transpose(tf.reshape(c, tf.stack([rows, n, size])), [1, 0, 2])
  c = tf.reshape(c, tf.stack([n, rows * size]))
  return Term(c, convert(term.a), convert(term.b), term.symmetric)


def _broadcast_axes(jac):
  """The entry axes along which `fit` broadcast `jac.source` to make `jac`
  (static sizes 1 there), or `None`."""
  src = jac.source
  if src is None or jac.diagonal or src.diagonal:
    return None
  have, want = src.value.shape[src.lead :], jac.value.shape[jac.lead :]
  if have.rank != want.rank or not (
    have.is_fully_defined() and want.is_fully_defined()
  ):
    return None
  axes = []
  for i, (h, w) in enumerate(zip(have.as_list(), want.as_list())):
    if h != w:
      if h != 1:
        return None
      axes.append(i)
  return axes or None


def summed_over_broadcasts(term, n):
  """`term` with a factor that `fit` broadcast over entry axes replaced by
  the Jacobian it broadcast.

  A tensor of one entry per sample (a norm, a mean, a sum of exponentials)
  times a tensor of M: the cross term `sum_e c[e] J_a[:, e] J_b[:, e]^T`
  with `J_b` the same along `e` is `(sum_e c[e] J_a[:, e]) J_b^T`, an outer
  product, where the contraction would be K times the work. `c` times the
  other factor is summed over the broadcast axes first. (A square of the
  broadcast factor, or two factors broadcast along the same axes, are
  `pulled_back` first: `c` alone is summed.)

  Args:
    term: a `Term`, as `pulled_back` leaves it.
    n: the batch size.

  Returns:
    The `Term`, or `term` itself where neither factor is such a broadcast.
  """
  a, b = term.a, term.b
  for broad, other in ((b, a), (a, b)):
    axes = _broadcast_axes(broad)
    if axes is None:
      continue
    weighted = _weighted_sum(term.c, other, axes, n)
    one = tf.constant(1, other.value.dtype)
    if broad is b:
      return Term(one, dense(weighted), b.source, term.symmetric)
    return Term(one, a.source, dense(weighted), term.symmetric)
  return term


def _weighted_sum(c, jac, axes, n):
  """`sum_e c[n, e] J[n, :, e]` over the entry axes `axes`, kept as 1:
  `(N, K, *e')`, dense whatever `jac` is.

  Summed over every entry, a shared `jac` `(K, M)` takes one matmul
  `(N, M) x (M, K)`, and a diagonal one (`J[k, ..., j] = d[..., j]` where
  `j = k`) the sum of `c d` over the entries before the last: neither
  writes the `(N, K, *e)` products.
  """
  every = len(axes) == jac.entry_rank
  ones = [1] * jac.entry_rank
  if every and jac.shared:
    summed = tf.matmul(_flat_c(c, jac, n), _flat(jac), transpose_b=True)
  elif every and jac.diagonal:
    summed = _tangent_sums(c, jac.value, n, jac.entry_shape())
  else:
    jac = materialize(jac)
    return tf.reduce_sum(
      tf.expand_dims(_full_c(c, jac, n), 1) * jac.value,
      axis=[2 + i for i in axes],
      keepdims=True,
    )
  return tf.reshape(summed, concat([n], dims(summed, 1, 2), ones))


def _merge_factors(term):
  """The dense factors of `term` by which `merged_by_factor` may merge it."""
  a, b = term.a, term.b
  if (
    a.shared
    or a.diagonal
    or b.shared
    or b.diagonal
    or (a is not b and not term.symmetric)
    or not a.value.shape[2:].is_fully_defined()
    or a.value.shape[2:] != b.value.shape[2:]
  ):
    return []
  return [a] if a is b else [a, b]


def merged_by_factor(terms, n):
  """Full-Hessian terms of dense factors that share one, `F`, as one term.

  A symmetric term `(c O)^T F + F^T (c O)` and a term `F^T c F` (that is,
  `(c/2 F)^T F` plus its transpose) of the same `F` add up to `S^T F + F^T
  S` with `S` the sum of the `c O` (and `c/2 F`): one batched matmul
  `(K, M) x (M, K)` per sample for them all instead of one each (the two
  branches of a gate `a * swish(b)`; `u * u` beside `u * v`). The factor
  shared by the most terms goes first.

  Args:
    terms: a list of `Term`s.
    n: the batch size.

  Returns:
    The list of `Term`s: those not merged, then one per merged group.
  """
  merged, rest = [], list(terms)
  while True:
    counts = collections.Counter(id(f) for t in rest for f in _merge_factors(t))
    if not counts or max(counts.values()) < 2:
      return rest + merged
    top = max(counts, key=counts.get)
    group = [t for t in rest if top in map(id, _merge_factors(t))]
    rest = [t for t in rest if all(t is not g for g in group)]
    f = next(j for j in _merge_factors(group[0]) if id(j) == top)
    total = None
    for t in group:
      other = t.b if t.a is f else t.a
      c = _full_c(t.c, f, n)
      if not t.symmetric:
        c = c / 2
      part = tf.expand_dims(c, 1) * other.value
      total = part if total is None else total + part
    one = tf.constant(1, f.value.dtype)
    merged.append(Term(one, f, dense(total), symmetric=True))


def _size(jac):
  """The number of entries `M = prod(*e)` (no `-1` in reshapes: N may be 0)."""
  entries = jac.entry_shape()
  if isinstance(entries, list) and not any(
    isinstance(d, tf.Tensor) for d in entries
  ):
    return int(np.prod(entries, dtype=np.int64))
  return tf.reduce_prod(entries)


def _flat(jac):
  """`(K, M)` or `(N, K, M)`."""
  lead = dims(jac.value, 0, 1 if jac.shared else 2)
  return tf.reshape(jac.value, concat(lead, [_size(jac)]))


def _full_c(c, jac, n):
  """`c` in the dtype of `jac`, broadcast to its entries: `(N, *e)`."""
  c = in_dtype(c, jac.value.dtype)
  return tf.broadcast_to(c, concat([n], jac.entry_shape()))


def _flat_c(c, jac, n):
  """`c` broadcast to the entries of `jac` and flattened to `(N, M)`."""
  return tf.reshape(_full_c(c, jac, n), [n, _size(jac)])


def _contract_diagonals(term, mode, n):
  """`contract` of two diagonal Jacobians: a diagonal Hessian."""
  a, b = term.a, term.b
  # The factors first: where they are shared by all samples, `(1, *e)`.
  v = _tangent_sums(term.c, a.value * b.value, n, a.entry_shape())
  if term.symmetric:
    v = 2.0 * v
  if mode == HESSIAN:
    return _diagonal_matrices(v)
  return v if mode == DIAGONAL else tf.reduce_sum(v, axis=1)


def plus_diagonal(h, d):
  """`h` `(B, K, K)` plus the diagonal matrices of `d` `(B, K)`, either
  `None`: the diagonal of `h` rewritten (`tf.linalg.set_diag`), `B K`
  entries, where the diagonal matrices written and added are `2 B K K`."""
  if d is None:
    return h
  if h is None:
    return _diagonal_matrices(d)
  return tf.linalg.set_diag(h, tf.linalg.diag_part(h) + d)


def _diagonal_matrices(v):
  """`tf.linalg.diag(v)` of `v` `(B, K)`: a select against the identity,
  faster than TensorFlow's `MatrixDiagV3` on CPU (a session run of either
  alone: 1.3x at 1024 x 8, 2.2x at 1024 x 32, 2.7x at 256 x 64), with the
  same zeros off the diagonal (a product by the identity would make them
  NaN beside an infinite entry)."""
  k = dims(v, -1)[0]
  eye = tf.eye(k, dtype=tf.bool)
  return tf.where(eye, tf.expand_dims(v, -1), tf.zeros([], v.dtype))


def _tangent_sums(c, d, n, entries):
  """`sum_e c[n, e, k] d[n, e, k]` over the entries `*e` before the last,
  the tangent's: `(N, K)`, from `d` `(N or 1, *entries)` (diagonal values)
  and `c` broadcasting against it."""
  c = in_dtype(c, d.dtype)
  v = _summed_by_matmul(c, d, n)
  if v is None:
    prod = tf.broadcast_to(c * d, concat([n], entries))
    axes = list(range(1, prod.shape.rank - 1))
    v = tf.reduce_sum(prod, axis=axes) if axes else prod
  return v


def _summed_by_matmul(c, ab, n):
  """`sum_e c[n, e, 0] ab[0, e, k]`, `(N, K)`, as one matmul `(N, E) x
  (E, K)`, where `ab` `(1, *e, K)` is shared by all samples and `c`
  `(N or 1, *e, 1)` the same for every k (the adjoint of a sum over the
  feature axis: a distance, a quadratic form); else `None`."""
  rank = ab.shape.rank
  if (
    rank is None
    or rank < 3
    or c.shape.rank != rank
    or tf.compat.dimension_value(ab.shape[0]) != 1
    or tf.compat.dimension_value(c.shape[-1]) != 1
    or not ab.shape[1:].is_fully_defined()
  ):
    return None
  inner = ab.shape[1:-1].as_list()
  if any(
    tf.compat.dimension_value(d) not in (1, i)
    for d, i in zip(c.shape[1:], inner)
  ):
    return None
  size = int(np.prod(inner, dtype=np.int64))
  c = tf.reshape(tf.broadcast_to(c[..., 0], concat([n], inner)), [n, size])
  return tf.matmul(c, tf.reshape(ab, [size, ab.shape[-1]]))


# The most entries `K * K * M` of the products of two shared Jacobians that
# `contract` writes to multiply them by `c` at once (1 MiB in float32).
_MAX_OUTER_ENTRIES = 1 << 18


def outer_of_shared(term, mode, batch=None):
  """Whether `contract` multiplies `c` by the products of shared factors.

  The Hessian of a term of two shared Jacobians `(K, M)` (a matmul of `x`
  by weights) is `c @ P` with `P[m, k, l] = J_a[k, m] J_b[l, m]`: one matmul
  `(N, M) x (M, K K)`, instead of writing `c J_a` `(N, K, M)` and reading it
  back. Taken when `K K M` is at most `_MAX_OUTER_ENTRIES` and the static
  batch `batch` (if known) is at least K, so that `P` is the smaller.
  """
  if mode != HESSIAN or not (term.a.shared and term.b.shared):
    return False
  shape = term.a.value.shape
  k = tf.compat.dimension_value(shape[0])
  m = shape[1:].num_elements()
  if k is None or m is None:
    return False
  return k * k * m <= _MAX_OUTER_ENTRIES and (batch is None or k <= batch)


def symmetric_outer(term, mode, batch=None):
  """Whether `contract` gives a symmetric term's whole Hessian `X + X^T`
  as one matmul (even when asked for half of it): its factors are shared
  by all samples and `outer_of_shared`, so the products of the factors are
  summed with their transposes once, outside the samples."""
  return term.a.shared and term.b.shared and outer_of_shared(term, mode, batch)


def contract_outer_of_shared(terms, n, k):
  """The sum of the Hessians `(N, K, K)` of `terms`, each of two shared
  factors (`outer_of_shared`), as one matmul `(N, M_1 + M_2 + ...) x (M_1 +
  M_2 + ..., K K)` by the products of their factors (those of a symmetric
  term summed with their transposes): the terms of the layers that read
  `x` (a gate and its value, two towers) in one op, not one each and
  their sum."""
  cs, products = [], []
  for term in terms:
    m = _size(term.a)
    cs.append(_flat_c(term.c, term.a, n))
    products.append(
      invariant(
        functools.partial(_outer_products, symmetric=term.symmetric),
        term.a.value,
        term.b.value,
        k,
        m,
      )
    )
  if len(terms) > 1:
    cs = [tf.concat(cs, 1)]
    products = [invariant(lambda *p: tf.concat(p, 1), *products)]
  out = tf.matmul(cs[0], products[0], transpose_b=True)
  return tf.reshape(out, tf.stack([n, k, k]))


def _outer_products(ua, ub, k, m, symmetric):
  """`P[k l, m] = ua[k, m] ub[l, m]` `(K K, M)`, plus `P[l k, m]` when
  `symmetric`."""
  ua = tf.reshape(ua, tf.stack([k, 1, m]))
  ub = tf.reshape(ub, tf.stack([1, k, m]))
  prods = ua * ub
  if symmetric:
    prods += tf.transpose(prods, [1, 0, 2])
  return tf.reshape(prods, tf.stack([k * k, m]))


def _is_one(c):
  """Whether `c` is the scalar 1, known when the graph is built."""
  value = tf.get_static_value(c) if isinstance(c, tf.Tensor) else c
  return value is not None and np.ndim(value) == 0 and value == 1


def laplacian_gram(term, mode):
  """The `Gram` that `contract` takes `term`'s trace from, or `None`."""
  if mode == LAPLACIAN and term.a is term.b:
    return term.a.gram
  return None


def contract(term, mode, n, k, half=False, batch=None):
  """The term's Hessian `(N, K, K)`, diagonal `(N, K)` or trace `(N,)`.

  With `half`, a symmetric term's full Hessian is one of its two halves,
  `X` or `X^T` (the term is `X + X^T`): the caller adds the transpose once
  for the sum of such halves. `batch` is the static N, or `None`.
  """
  if term.a.diagonal and term.b.diagonal:
    return _contract_diagonals(term, mode, n)
  gram = laplacian_gram(term, mode)
  if gram is not None:
    c = _flat_c(term.c, term.a, n)
    out = tf.reduce_sum(c * gram.squared_norms(), 1)
    return 2.0 * out if term.symmetric else out
  a, b = materialize(term.a), materialize(term.b)
  c = _flat_c(term.c, a, n)  # (N, M)
  fa, fb = _flat(a), _flat(b)
  m = _size(a)

  def times_c(f):
    # `c` of a merged or summed term is 1: no product to write.
    if _is_one(term.c):
      return f
    return tf.expand_dims(c, 1) * f

  if mode == HESSIAN:
    if outer_of_shared(Term(c, a, b), mode, batch):
      # The products of a symmetric term hold their transposes
      # (`symmetric_outer`): its whole Hessian.
      both = term.symmetric and symmetric_outer(term, mode, batch)
      out = contract_outer_of_shared([Term(term.c, a, b, both)], n, k)
      if both:
        return out
    elif b.shared:
      # (N K, M) @ (M, K): one matmul by the shared factor.
      left = tf.reshape(times_c(fa), tf.stack([n * k, m]))
      out = tf.reshape(
        tf.matmul(left, fb, transpose_b=True), tf.stack([n, k, k])
      )
    elif a.shared:
      left = tf.reshape(times_c(fb), tf.stack([n * k, m]))
      out = tf.reshape(
        tf.matmul(left, fa, transpose_b=True), tf.stack([n, k, k])
      )
      if half and term.symmetric:
        return out
      out = tf.transpose(out, [0, 2, 1])
    else:
      out = tf.matmul(times_c(fa), fb, transpose_b=True)
    if half or not term.symmetric:
      return out
    return out + tf.transpose(out, [0, 2, 1])
  if a.shared and b.shared:
    prod = fa * fb  # (K, M)
    if mode == DIAGONAL:
      out = tf.matmul(c, prod, transpose_b=True)
    else:
      out = tf.linalg.matvec(c, tf.reduce_sum(prod, axis=0))
  else:
    prod = fa * fb  # (N, K, M), broadcast
    if mode == DIAGONAL:
      out = tf.reduce_sum(tf.expand_dims(c, 1) * prod, axis=2)
    else:
      out = tf.reduce_sum(c * tf.reduce_sum(prod, axis=1), axis=1)
  return 2.0 * out if term.symmetric else out
