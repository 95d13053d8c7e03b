r"""Times tf1hess against TensorFlow's own per-sample Hessians, JAX and folx.

For each model and shape N x K (and quantity: full Hessians, diagonals or
Laplacians), every method computes the same per-sample quantity of the same
function, with the same weights, at the same inputs, in one process; each
output is checked before it is timed, the methods of a case taking turns.
The models, methods, timing, goals and report live in `benchmarks/`.

  python scripts/benchmark.py --output_md=BENCHMARKS.md \
      --output_png=benchmarks.png --output_json=benchmarks.json
  python scripts/benchmark.py --suite=forward \
      --output_md=BENCHMARKS_forward.md   # the forward engine's models
  python scripts/benchmark.py --quick  # seconds: tiny shapes, no memory
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's pooling CPU allocator; see docs/speed.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# benchmarks/ is not installed: it is imported from the repository's root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import re

from absl import app
from absl import flags
from absl import logging

from benchmarks import cases as cases_lib
from benchmarks import goals
from benchmarks import harness
from benchmarks import methods
from benchmarks import models
from benchmarks import report
from benchmarks import suites
from tf1hess import _cli
from tf1hess import plan as plan_lib

_SUITE = flags.DEFINE_enum(
  "suite",
  "original",
  list(suites.SUITES),
  "Default cases, quantities and methods (benchmarks/suites.py).",
)
_CASES = flags.DEFINE_list(
  "cases", None, "model:NxK cases (default: --functions x --shapes)."
)
_SHAPES = flags.DEFINE_list(
  "shapes", None, "Shapes NxK of the input batch (default: the suite's)."
)
_FUNCTIONS = flags.DEFINE_list(
  "functions",
  None,
  "Models to differentiate (benchmarks/models.py; default: the suite's).",
)
flags.DEFINE_alias("models", "functions")
_QUANTITIES = flags.DEFINE_list(
  "quantities",
  None,
  "hessian, diagonal and/or laplacian (default: the suite's).",
)
_METHODS = flags.DEFINE_list(
  "methods",
  None,
  "Methods to time (benchmarks/methods.py; default: the suite's, where "
  "they apply and are installed). `tf1hess_pfor_chunk<C>` vectorizes C rows "
  "at a time.",
)
_CHUNK_CASES = flags.DEFINE_list(
  "chunk_cases",
  ["softplus_net:16384x16:4/1", "tanh_mlp:256x1024:128/16"],
  "model:NxK:C1/C2/... cases that also time tf1hess_pfor_chunk<C> for "
  "each chunk size C (the memory/speed trade).",
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 5, "Timed runs per method and case.", lower_bound=1
)
_FAST_REPEATS = flags.DEFINE_integer(
  "fast_repeats",
  51,
  "Timed runs of a method whose runs take under 20 ms: short runs vary "
  "more from one to the next.",
  lower_bound=1,
)
_WARMUP = flags.DEFINE_integer(
  "warmup", 1, "Untimed runs before timing.", lower_bound=1
)
_MAX_SECONDS = flags.DEFINE_float(
  "max_seconds",
  60.0,
  "Time budget of the timed runs of one method in one case: slow methods "
  "get fewer runs (at least one).",
)
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Hidden units per layer.")
_DEPTH = flags.DEFINE_integer(
  "depth", 3, "Hidden layers of the softplus network.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs and weights.")
_MEASURE_MEMORY = flags.DEFINE_bool(
  "measure_memory",
  True,
  "Measure peak memory (one process per case; default: the suite's).",
)
_HESSIANS_MAX_BYTES = flags.DEFINE_integer(
  "tf_hessians_max_bytes",
  1 << 30,
  "Only run tf.hessians where its (N*K)^2 output fits in this many bytes.",
)
_QUICK = flags.DEFINE_bool(
  "quick",
  False,
  "Seconds-long run: shapes 32x4 and 8x16, 2 repeats, no memory, no chunks.",
)
_OUTPUT_MD = flags.DEFINE_string("output_md", None, "Markdown report.")
_OUTPUT_PNG = flags.DEFINE_string("output_png", None, "PNG plot.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Raw results.")
_REPORT_FROM = flags.DEFINE_string(
  "report_from",
  None,
  "Time nothing: write --output_md and --output_png from the raw results "
  "of an earlier run (its --output_json).",
)

_ALL_FLAGS = (
  _SUITE,
  _CASES,
  _SHAPES,
  _FUNCTIONS,
  _QUANTITIES,
  _METHODS,
  _CHUNK_CASES,
  _REPEATS,
  _FAST_REPEATS,
  _WARMUP,
  _MAX_SECONDS,
  _HIDDEN,
  _DEPTH,
  _SEED,
  _MEASURE_MEMORY,
  _HESSIANS_MAX_BYTES,
  _QUICK,
  _OUTPUT_MD,
  _OUTPUT_PNG,
  _OUTPUT_JSON,
  _REPORT_FROM,
)


def parse_chunk_cases(specs):
  """`["f:NxK:C1/C2"]` -> `{(f, "NxK"): [C1, C2]}`."""
  out = {}
  for spec in specs:
    match = re.fullmatch(r"(\w+):(\d+x\d+):(\d+(?:/\d+)*)", spec.strip())
    if not match or match.group(1) not in models.MODELS:
      raise ValueError(
        "`chunk_cases` entries must be like tanh_mlp:256x1024:128/16 (a "
        f"model, a shape, chunk sizes); saw {spec!r}."
      )
    sizes = [int(c) for c in match.group(3).split("/")]
    out[(match.group(1), match.group(2))] = sizes
  return out


def selected_cases(suite):
  """The `(model, shape)` pairs of this run, from the flags and the suite."""
  if _CASES.value:
    return [suites.parse_case(spec) for spec in _CASES.value]
  names = _FUNCTIONS.value or suite.models
  for name in names:
    models.get(name)
  shapes = suites.QUICK_SHAPES if _QUICK.value else _SHAPES.value
  shapes = shapes or suite.shapes
  if shapes is None:
    return [
      case for case in map(suites.parse_case, suite.cases) if case[0] in names
    ]
  for shape in shapes:
    cases_lib.parse_shape(shape)
  return [(name, shape) for name in names for shape in shapes]


def command_line():
  """This run's command: the script and the flags not at their defaults.

  Prefixed with `TF_CPU_ALLOCATOR_USE_BFC=...` when the allocator is not the
  BFC one this script turns on.
  """
  parts = ["python scripts/benchmark.py"]
  bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "")
  if not plan_lib.bfc_allocator(bfc):
    parts.insert(0, f"TF_CPU_ALLOCATOR_USE_BFC={bfc or 'false'}")
  for holder in _ALL_FLAGS:
    flag = flags.FLAGS[holder.name]
    if flag.value != flag.default:
      value = flag.value
      if isinstance(value, list):
        value = ",".join(value)
      if isinstance(value, bool):
        parts.append(f"--{holder.name}" if value else f"--no{holder.name}")
      else:
        parts.append(f"--{holder.name}={value}")
  return " ".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  with _cli.exit_on_error("benchmark.py"):
    if _REPORT_FROM.value:
      with open(_REPORT_FROM.value, encoding="utf-8") as f:
        data = json.load(f)
      report.write_outputs(
        data["results"],
        data["machine"],
        data["command"],
        _OUTPUT_MD.value,
        _OUTPUT_PNG.value,
      )
      return
    suite = suites.get(_SUITE.value)
    quick = _QUICK.value
    settings = cases_lib.Settings(
      _HIDDEN.value, _DEPTH.value, _SEED.value, _HESSIANS_MAX_BYTES.value
    )
    quantities = _QUANTITIES.value or suite.quantities
    cases = [
      cases_lib.Case(name, shape, quantity, settings)
      for name, shape in selected_cases(suite)
      for quantity in quantities
    ]
    names = _METHODS.value or suite.methods
    for name in names or ():
      methods.get(name)
    chunk_cases = parse_chunk_cases(_CHUNK_CASES.value)
    if _OUTPUT_PNG.value:
      try:
        import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      except ImportError:
        raise ValueError(
          "`output_png` needs matplotlib, which is not installed: "
          'pip install -e ".[bench]".'
        ) from None
    measure = suite.measure_memory
    if flags.FLAGS["measure_memory"].present:
      measure = _MEASURE_MEMORY.value
    notes = report.machine_notes()
    results = harness.run_all(
      cases,
      names,
      harness.Timing(
        repeats=2 if quick else _REPEATS.value,
        warmup=_WARMUP.value,
        max_seconds=_MAX_SECONDS.value,
        fast_repeats=2 if quick else _FAST_REPEATS.value,
      ),
      measure=measure and not quick,
      chunk_cases={} if quick else chunk_cases,
      where_they_apply=not _METHODS.value,
    )
    notes["load_end"] = os.getloadavg()
    report.write_outputs(
      results,
      notes,
      command_line(),
      _OUTPUT_MD.value,
      _OUTPUT_PNG.value,
      _OUTPUT_JSON.value,
    )
    groups = {name: models.get(name).group for name in models.MODELS}
    for g in goals.evaluate(results, groups, methods.REFERENCE):
      logging.info(
        "%s, %s: speed-up %s (target %s): %s",
        g["goal"],
        g["case"],
        "n/a" if g["speedup"] is None else f"{g['speedup']:.2f}",
        g["target"],
        {True: "met", False: "NOT met", None: "n/a"}[g["met"]],
      )


if __name__ == "__main__":
  app.run(main)
