"""How the rows of per-sample derivatives are built: one frozen `Plan` a call.

Every entry point (the graph ops, `tf1hess.eager`, `tf1hess.keras`,
`tf1hess.legacy`, `tf1hess.export`, `compute_hessians` and the scripts)
takes `method`, `chunk_size` and `parallel_iterations`, or a whole `plan=`.
The plan is made once per call, checked there, and passed down unchanged to
the row loop (`_core.stack_rows`) and to the choice of the forward engine.
The tuning thresholds live here and nowhere else; a test (or a user with
other hardware) passes a `Plan` with other thresholds instead of patching
module globals.
"""

import dataclasses
import os
from typing import Optional

from tf1hess import _checks

METHODS = ("auto", "forward", "pfor", "while_loop")

# "auto" vectorizes the rows from this many rows (a static count) on, and
# below it loops over rows with the linear shortcuts. In graphs (and
# `tf.function`s) on 2 CPU cores with TensorFlow's BFC CPU allocator
# (`TF_CPU_ALLOCATOR_USE_BFC=true`), `pfor` was 10 to 25% faster than the
# loop at 256 rows (batches of 256 to 2048; even at 4096), and the loop,
# `parallel_iterations` rows at a time, up to 15% faster at 64 rows and at
# 128 rows from batches of 4096 on (the softplus net of BENCHMARKS.md). The
# default allocator page-faults on `pfor`'s large (K, N, ...) intermediates
# at every run: there the loop was faster up to K = 256 (twice as fast at
# 1024 x 256). Executing eagerly, `pfor` traces a function on every call,
# which costs more than a Python loop over a few rows.
PFOR_MIN_ROWS = 256
PFOR_MIN_ROWS_DEFAULT_ALLOCATOR = 512
EAGER_PFOR_MIN_ROWS = 64

# Up to this many rows (a static count), "auto" builds one backward pass per
# row in the graph instead of a loop: no loop overhead, and the rows run in
# parallel (5 to 25% faster on the softplus net of BENCHMARKS.md).
UNROLL_MAX_ROWS = 16

# At most this many tensors to differentiate per row after the linear
# shortcuts; a longer sum is left whole.
MAX_TERMS = 16

# The most ops a model's loops may copy when "auto" and "forward" unroll
# them (`tf1hess.forward.loops`): the graph grows by the body's ops for each
# iteration, and the engine's walk builds ops for each of them. `dynamic_rnn`
# of an LSTM cell copies about 42 ops a step (16 units: over 12 steps the
# engine's Hessians took 3.9 s to build against 0.5 s for the rows, each run
# then 7 times faster; over 50 steps 14 s against 0.4 s, 4.8 times faster;
# 32 units over 40 steps, unrolled with a larger limit: 23 s against 1.1 s,
# runs 6.8, 3.2 and 2.1 times faster at batches of 64, 512 and 2048).
# Longer loops take the rows.
MAX_UNROLLED_OPS = 1000

# The largest factor `P` (H x M x K entries) of the one-matmul shortcut for
# a dense layer followed by elementwise ops (256 MiB).
MAX_FACTOR_BYTES = 1 << 28

# Up to this many rows, the shortcuts that build all rows at once from an
# identity matrix `(M, M)` apply (a Hessian shared by all samples, one
# matmul for a dense layer followed by elementwise ops).
SHORTCUT_MAX_ROWS = 1024

# Up to this many rows, the rows of a loop are read one by one into place;
# beyond it, stacked and transposed (fewer ops in the graph).
MAX_READS = 1024


def bfc_allocator(value):
  """Whether `value` of `TF_CPU_ALLOCATOR_USE_BFC` turns the BFC one on."""
  return value.strip().lower() in ("1", "true")


def check_method(method, chunk_size):
  """Raises `ValueError` unless `method` and `chunk_size` are valid.

  Args:
    method: one of `METHODS`.
    chunk_size: `None` or a positive `int`.

  Returns:
    `chunk_size`, an `int` (or `None`).
  """
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(
      "`method` must be one of 'auto', 'forward', 'pfor' or 'while_loop'; "
      f"saw {method!r}."
    )
  return _checks.check_count(chunk_size, "chunk_size", allow_none=True)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the rows of per-sample derivatives are built.

  Attributes:
    method: `str`, one of `"auto"` (default), `"forward"`, `"pfor"`,
      `"while_loop"`: see `tf1hess.batch_hessians`.
    chunk_size: `int` or `None` (default: all rows at once): rows per
      vectorized backward pass.
    parallel_iterations: `int` or `None`: iterations of a row loop that may
      run in parallel (`tf.while_loop`'s argument; default 10).
    pfor_min_rows: `int` or `None`: in graphs, `"auto"` vectorizes from
      this many rows on. `None` (default) takes `PFOR_MIN_ROWS` (256) with
      TensorFlow's BFC CPU allocator (`TF_CPU_ALLOCATOR_USE_BFC=true`, read
      when the plan is used) and `PFOR_MIN_ROWS_DEFAULT_ALLOCATOR` (512)
      without it.
    eager_pfor_min_rows: `int`: the same, executing eagerly (default 64).
    unroll_max_rows: `int`: up to this many rows, `"auto"` unrolls the rows
      into the graph (default 16; 0: never).
    max_terms: `int`: the most tensors a row is split into by the linear
      shortcuts (default 16).
    max_factor_bytes: `int`: the largest factor of the one-matmul shortcut
      (default 256 MiB).
    shortcut_max_rows: `int`: the most rows for the shortcuts that build
      all rows at once (default 1024).
    max_reads: `int`: up to this many rows, a loop's rows are read one by
      one into place (default 1024).
    max_unrolled_ops: `int`: the most ops that `"auto"` and `"forward"`
      copy to unroll the model's loops of static length (`dynamic_rnn`,
      `tf.scan`, `tf.while_loop`) and inline its function calls (a
      `tf.function` called in the graph) for the forward engine (default
      1000, about 24 steps of an LSTM cell). A longer loop takes the rows
      under `"auto"`, and makes `"forward"` raise. Raise it for longer
      sequences: the graph takes longer to build (a 40-step LSTM: 12 s
      instead of 1 s) and then runs faster (2 to 7 times there).

  Raises:
    ValueError: when a field is out of range (checked on construction).

  Example:
    >>> import tf1hess
    >>> plan = tf1hess.Plan(method="pfor", chunk_size=8)
    >>> plan.chunk_size
    8
  """

  method: str = "auto"
  chunk_size: Optional[int] = None
  parallel_iterations: Optional[int] = None
  pfor_min_rows: Optional[int] = None
  eager_pfor_min_rows: int = EAGER_PFOR_MIN_ROWS
  unroll_max_rows: int = UNROLL_MAX_ROWS
  max_terms: int = MAX_TERMS
  max_factor_bytes: int = MAX_FACTOR_BYTES
  shortcut_max_rows: int = SHORTCUT_MAX_ROWS
  max_reads: int = MAX_READS
  max_unrolled_ops: int = MAX_UNROLLED_OPS

  def __post_init__(self):
    chunk_size = check_method(self.method, self.chunk_size)
    object.__setattr__(self, "chunk_size", chunk_size)
    counts = {
      "parallel_iterations": (True, False),
      "pfor_min_rows": (True, False),
      "unroll_max_rows": (False, True),
      "eager_pfor_min_rows": (False, False),
      "max_terms": (False, False),
      "max_factor_bytes": (False, False),
      "shortcut_max_rows": (False, False),
      "max_reads": (False, False),
      "max_unrolled_ops": (False, False),
    }
    for name, (allow_none, allow_zero) in counts.items():
      value = _checks.check_count(
        getattr(self, name), name, allow_none, allow_zero
      )
      object.__setattr__(self, name, value)

  @property
  def may_take_engine(self):
    """Whether this plan's `method` lets the forward engine build the
    second derivatives: `"auto"` (where it can follow the model and the
    cost model takes it) and `"forward"`."""
    return self.method in ("auto", "forward")

  def vectorize_from(self, eager):
    """The number of rows from which `"auto"` vectorizes."""
    if eager:
      return self.eager_pfor_min_rows
    if self.pfor_min_rows is not None:
      return self.pfor_min_rows
    # The variable TensorFlow reads when it makes its CPU allocator.
    if bfc_allocator(os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "")):
      return PFOR_MIN_ROWS
    return PFOR_MIN_ROWS_DEFAULT_ALLOCATOR

  def record(self):
    """What this plan says, as a `dict` for logs and progress files.

    `method`, `chunk_size` and `parallel_iterations`, and every threshold
    that differs from its default.
    """
    default = Plan()
    return {
      field.name: getattr(self, field.name)
      for field in dataclasses.fields(self)
      if field.name in ("method", "chunk_size", "parallel_iterations")
      or getattr(self, field.name) != getattr(default, field.name)
    }

  def replace(self, **changes):
    """A copy of this plan with `changes`."""
    return dataclasses.replace(self, **changes)


def make(plan=None, method="auto", chunk_size=None, parallel_iterations=None):
  """The `Plan` of one call, from `plan=` or from the separate arguments.

  Args:
    plan: a `Plan` or `None`.
    method, chunk_size, parallel_iterations: the call's own arguments; with
      `plan` given they must keep their defaults.

  Returns:
    A `Plan`.

  Raises:
    TypeError: when `plan` is not a `Plan`.
    ValueError: when an argument is out of range, or `plan` and another of
      the arguments are both given.
  """
  if plan is None:
    return Plan(
      method=method,
      chunk_size=chunk_size,
      parallel_iterations=parallel_iterations,
    )
  if not isinstance(plan, Plan):
    raise TypeError(
      f"`plan` must be a tf1hess.Plan or None; saw {type(plan).__name__}."
    )
  given = [
    name
    for name, value, default in (
      ("method", method, "auto"),
      ("chunk_size", chunk_size, None),
      ("parallel_iterations", parallel_iterations, None),
    )
    if value != default
  ]
  if given:
    raise ValueError(
      f"Pass either `plan` or `{given[0]}`, not both: `plan` already says "
      f"{given[0]}={getattr(plan, given[0])!r}."
    )
  return plan
