"""The speed goals, in one table, and their evaluation on results.

A goal compares tf1hess's default with another method on the cases it
selects (by model group or model, shape and quantity): speed-up = the other
method's time / the default's, met when >= `target`, on each case or for
the geometric mean over the selected cases. The original functions keep the
goals they had (a regression shows as a goal missed); the forward models
carry those of issue 14.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Goal:
  """One goal.

  Attributes:
    text: what the report says.
    other: the method compared with tf1hess's default.
    target: the least speed-up that meets it.
    quantity: the quantity compared.
    group: models of this group only (`None`: any).
    models: these models only (`None`: any).
    shapes: these shapes only (`None`: any).
    skip_shapes: not these shapes.
    geomean: one row for the geometric mean over the cases, instead of one
      row per case.
  """

  text: str
  other: str
  target: float
  quantity: str = "hessian"
  group: str = None
  models: tuple = None
  shapes: tuple = None
  skip_shapes: tuple = ()
  geomean: bool = False

  def selects(self, model, group, shape, quantity):
    return (
      quantity == self.quantity
      and self.group in (None, group)
      and (self.models is None or model in self.models)
      and (self.shapes is None or shape in self.shapes)
      and shape not in self.skip_shapes
    )


_TAPE = "batch_jacobian_pfor"
_JAX = "jax_jit_vmap_hessian"
_DDE = "dde_grad_hessian"
_DDE_SHAPES = ("4096x10", "4096x20")
# 256x16 is in the original shapes for tf.hessians only.
_ONLY_TF_HESSIANS = ("256x16",)

GOALS = (
  # The original functions (scripts/benchmark.py's first goals).
  Goal(
    "vs tape.batch_jacobian >= 1.5x",
    _TAPE,
    1.5,
    models=("tanh_mlp",),
    skip_shapes=_ONLY_TF_HESSIANS,
  ),
  Goal(
    "vs tape.batch_jacobian not slower",
    _TAPE,
    1.0,
    models=("quadratic", "softplus_net"),
    skip_shapes=_ONLY_TF_HESSIANS,
  ),
  Goal(
    "vs JAX jit(vmap(hessian)) >= 1.2x",
    _JAX,
    1.2,
    models=("tanh_mlp",),
    skip_shapes=_ONLY_TF_HESSIANS,
  ),
  Goal(
    "vs JAX jit(vmap(hessian)) not slower",
    _JAX,
    1.0,
    models=("quadratic", "softplus_net"),
    skip_shapes=_ONLY_TF_HESSIANS,
  ),
  Goal(
    "vs tf.hessians + diagonal >= 100x",
    "tf_hessians_diagonal",
    100.0,
    group="original",
    shapes=_ONLY_TF_HESSIANS,
  ),
  # The forward engine's models (issue 14).
  Goal(
    "vs tape.batch_jacobian, geometric mean >= 2x",
    _TAPE,
    2.0,
    group="forward",
    geomean=True,
  ),
  Goal("vs tape.batch_jacobian >= 1.3x", _TAPE, 1.3, group="forward"),
  Goal("vs JAX jit(vmap(hessian)) not slower", _JAX, 1.0, group="forward"),
  Goal(
    "Laplacian vs folx forward_laplacian not slower",
    "folx_forward_laplacian",
    1.0,
    quantity="laplacian",
  ),
  Goal(
    "DeepXDE FNN: Hessian vs dde.grad.hessian >= 2x",
    _DDE,
    2.0,
    models=("deepxde_fnn",),
    shapes=_DDE_SHAPES,
  ),
  Goal(
    "DeepXDE FNN: Laplacian vs dde.grad.hessian >= 1.5x",
    _DDE,
    1.5,
    quantity="laplacian",
    models=("deepxde_fnn",),
    shapes=_DDE_SHAPES,
  ),
)


def _seconds(by_key, key, method):
  record = by_key.get(key + (method,))
  return None if record is None else record.get("seconds")


def evaluate(results, groups, reference="tf1hess_auto", goals=GOALS):
  """Each goal on `results`, with the numbers that decide it.

  Args:
    results: records with `model`, `shape`, `quantity`, `method` and, when
      timed, `seconds`.
    groups: `{model: group}`.
    reference: the method the goals are about (tf1hess's default).
    goals: the table.

  Returns:
    A list of dicts: `goal` (its text), `case` (`"model NxK quantity"`, or
    `"geometric mean of n cases"`), `tf1hess` and `other` (s; `None` for a
    mean or when not timed), `speedup`, `target`, `met` (`None` when a time
    is missing), `floor` (s: the TF1 output floor of the case, if timed).
  """
  by_key = {
    (r["model"], r["shape"], r["quantity"], r["method"]): r for r in results
  }
  cases = list(dict.fromkeys(key[:3] for key in by_key))
  rows = []
  for goal in goals:
    speedups = []
    for model, shape, quantity in cases:
      if not goal.selects(model, groups[model], shape, quantity):
        continue
      key = (model, shape, quantity)
      mine = _seconds(by_key, key, reference)
      theirs = _seconds(by_key, key, goal.other)
      if mine is None and theirs is None:
        continue
      speedup = theirs / mine if mine and theirs else None
      if speedup is not None:
        speedups.append(speedup)
      if not goal.geomean:
        rows.append(
          {
            "goal": goal.text,
            "case": f"{model} {shape} {quantity}",
            "tf1hess": mine,
            "other": theirs,
            "speedup": speedup,
            "target": goal.target,
            "met": None if speedup is None else speedup >= goal.target,
            "floor": _seconds(by_key, key, "tf1_output_floor"),
          }
        )
    if goal.geomean and speedups:
      mean = math.exp(sum(map(math.log, speedups)) / len(speedups))
      rows.append(
        {
          "goal": goal.text,
          "case": f"geometric mean of {len(speedups)} cases",
          "tf1hess": None,
          "other": None,
          "speedup": mean,
          "target": goal.target,
          "met": mean >= goal.target,
          "floor": None,
        }
      )
  return rows
