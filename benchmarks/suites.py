"""Named sets of cases: what `scripts/benchmark.py --suite=...` runs.

`original`: the three original functions at the shapes of BENCHMARKS.md
(`--functions` x `--shapes`), full Hessians, every available method.
`forward`: the forward engine's models (issue 14) at moderate shapes, full
Hessians and Laplacians, against the rows, the tapes, JAX, folx and, on
DeepXDE's FNN at N = 4096, d = 10 and 20 (in DeepXDE's TF1 setting),
`dde.grad.hessian`.
"""

import dataclasses

from benchmarks import cases
from benchmarks import models


@dataclasses.dataclass(frozen=True)
class Suite:
  """Attributes:

  models: the models (`--functions`' default).
  shapes: shapes of every model (`--shapes`' default), or `None` when
    `cases` lists the shapes per model.
  cases: `model:NxK` (`--cases`' default), or `None` for models x shapes.
  quantities: `--quantities`' default.
  methods: the methods timed where they apply (`None`: all available).
  measure_memory: `--measure_memory`'s default.
  """

  models: tuple
  shapes: tuple = None
  cases: tuple = None
  quantities: tuple = ("hessian",)
  methods: tuple = None
  measure_memory: bool = True


QUICK_SHAPES = ("32x4", "8x16")
_FORWARD_SHAPES = ("1024x16", "256x64")

SUITES = {
  "original": Suite(
    models=tuple(models.names("original")),
    shapes=("16384x16", "4096x64", "1024x256", "256x1024", "256x16"),
  ),
  "forward": Suite(
    models=tuple(models.names("forward") + models.names("deepxde")),
    cases=("deepxde_fnn:4096x10", "deepxde_fnn:4096x20")
    + tuple(
      f"{m}:{s}" for m in models.names("forward") for s in _FORWARD_SHAPES
    ),
    quantities=("hessian", "laplacian"),
    methods=(
      "tf1hess_auto",
      "tf1hess_forward",
      "tf1hess_while_loop",
      "batch_jacobian_pfor",
      "jax_jit_vmap_hessian",
      "folx_forward_laplacian",
      "dde_grad_hessian",
      "tf1_output_floor",
    ),
    measure_memory=False,
  ),
}


def get(name):
  if name not in SUITES:
    raise ValueError(
      f"`suite` must name entries of {sorted(SUITES)}; saw {name!r}."
    )
  return SUITES[name]


def parse_case(spec):
  """`"model:NxK"` -> `(model, "NxK")`, both checked."""
  model, sep, shape = spec.strip().partition(":")
  if not sep:
    raise ValueError(
      f"`cases` entries must be like mixture:256x16; saw {spec!r}."
    )
  models.get(model)
  cases.parse_shape(shape)
  return model, shape
