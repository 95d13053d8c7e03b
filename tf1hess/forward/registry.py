"""The registry of forward rules, keyed by op type.

A rule is a small function `rule(op, jacs, ctx) -> [Jacobian or None]`, one
per output of `op`, in the spirit of `@ops.RegisterGradient`: `jacs` holds
the Jacobian of each input (`None` when it does not depend on the input of
the walk), and the rule adds the op's curvature with `ctx.curvature(out,
build)`, where `build(adj)` returns `jacobians.Term`s once the adjoint `adj`
of `out` is known. A rule returns `MIXED` for an output that no longer keeps
samples apart, and raises `Unsupported` when it cannot follow the op.
"""

import collections

import tensorflow as tf


class Unsupported(ValueError):
  """The forward engine cannot follow an op; the message says why."""


class _Mixed:
  """The Jacobian marker of a tensor that mixes samples (a batch sum)."""

  def __repr__(self):
    return "MIXED"


MIXED = _Mixed()


class Unfollowed:
  """The Jacobian marker of an output a rule does not follow.

  The walk raises `Unsupported` (with `reason`) only if an op on the way
  to `ys` reads it.
  """

  def __init__(self, reason):
    self.reason = reason


Rule = collections.namedtuple("Rule", ["fn", "linear", "diagonal"])

RULES = {}


def register(*op_types, linear=False, diagonal=False):
  """Registers the decorated rule for `op_types`.

  Args:
    *op_types: `str` op types (`"Tanh"`, ...).
    linear: `bool`, or a callable `(op, jacs) -> bool`: the op is linear
      in its inputs that depend on `x`, with coefficients that do not, so
      that it may follow a tensor that mixes samples (its outputs then mix
      them too).
    diagonal: `bool`: the rule keeps diagonal Jacobians (see `jacobians`);
      other rules receive them materialized.

  Returns:
    The decorator.
  """

  def decorate(fn):
    for op_type in op_types:
      if op_type in RULES:
        raise ValueError(f"A forward rule for {op_type} exists already.")
      RULES[op_type] = Rule(fn, linear, diagonal)
    return fn

  return decorate


def of_first_input(rule):
  """A rule `rule(op, j, ctx)` of ops whose first input alone may depend on x.

  `j` is that input's Jacobian; an op whose first input does not depend on
  x has no Jacobian.
  """

  def wrapped(op, jacs, ctx):
    if any(j is not None for j in jacs[1:]):
      raise Unsupported(
        f"{op.type} ({op.name}) has an input other than the first that "
        "depends on x"
      )
    if jacs[0] is None:
      return [None] * len(op.outputs)
    return rule(op, jacs[0], ctx)

  return wrapped


def static_value(t, what, op):
  """The constant value of `t`, or raises `Unsupported` naming `what`."""
  value = tf.get_static_value(t)
  if value is None:
    raise Unsupported(
      f"{op.type} ({op.name}) has a {what} known only at run time"
    )
  return value


def static_rank(t, op):
  rank = t.shape.rank
  if rank is None:
    raise Unsupported(f"{op.type} ({op.name}) has an input of unknown rank")
  return rank
