r"""Adds per-sample Hessians to a saved TF1 model and exports the result.

Loads a TF1 SavedModel, a frozen GraphDef or a MetaGraph with its
checkpoint, adds the per-sample Hessians `(N, K, K)` and gradients `(N, K)`
of `--ys` with respect to `--xs`, and writes a graph that plain TensorFlow
runs (tf1hess not needed) for any batch size:

- `--export_dir`: a SavedModel (tag "serve") with the signature "hessians":
  input "x", outputs "hessians", "gradients" and the model's `--ys`;
- `--output_graph`: a frozen GraphDef with "hessians:0" and "gradients:0";
- `--logdir`: a TensorBoard log of that graph.

With several inputs (`--xs=x:0,t:0`), each has its Hessians and gradients:
"hessians_0", "gradients_0", "hessians_1", ... in the order of `--xs`, and
the signature's inputs are keyed by their names ("x", "t").

  python scripts/export_hessian_graph.py --saved_model=/tmp/model \
    --xs=x:0 --ys=y:0 --export_dir=/tmp/model_hessians \
    --output_graph=/tmp/hessians.pb
"""

import os
import signal
import sys

if __name__ == "__main__":
  # Ctrl-C while TensorFlow loads ends the program quietly (nothing is
  # written yet); `main` turns it back into KeyboardInterrupt.
  signal.signal(signal.SIGINT, signal.SIG_DFL)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging

from tf1hess import _checks
from tf1hess import _cli
from tf1hess import export
from tf1hess import legacy

_MODEL = _cli.define_model_flags()
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir",
  None,
  "SavedModel directory to write (must not exist, or be empty, unless "
  "--overwrite).",
)
_OUTPUT_GRAPH = flags.DEFINE_string(
  "output_graph",
  None,
  "Frozen GraphDef file to write (.pb, or .pbtxt); must not exist unless "
  "--overwrite.",
)
_OVERWRITE = _cli.define_overwrite_flag()
_PLAN = _cli.define_plan_flags()
_LOGDIR = flags.DEFINE_string(
  "logdir", None, "Optional TensorBoard log directory for the graph."
)


def export_model(
  xs,
  ys,
  saved_model=None,
  graph=None,
  meta_graph=None,
  checkpoint=None,
  tag="serve",
  export_dir=None,
  output_graph=None,
  logdir=None,
  check_independence=False,
  overwrite=False,
  plan=None,
):
  """Loads a model, adds its Hessian ops and writes the exports.

  Args:
    xs: `str`, the input tensor's name, or a list of names.
    ys: `str` or list of `str`, the output tensors' names.
    saved_model: as in `tf1hess.legacy.load_graph_def`.
    graph: as in `tf1hess.legacy.load_graph_def`.
    meta_graph: as in `tf1hess.legacy.load_graph_def`.
    checkpoint: as in `tf1hess.legacy.load_graph_def`.
    tag: as in `tf1hess.legacy.load_graph_def`.
    export_dir: as in `tf1hess.export.export_hessian_graph`.
    output_graph: as in `tf1hess.export.export_hessian_graph`.
    logdir: as in `tf1hess.export.export_hessian_graph`.
    check_independence: `bool`, as in `tf1hess.batch_hessians`.
    overwrite: as in `tf1hess.export.export_hessian_graph`.
    plan: a `tf1hess.Plan` or `None`: how the exported Hessian op builds
      its rows, as in `tf1hess.batch_hessians`.

  Returns:
    The `tf1hess.legacy.HessianModel` that was exported.

  Raises:
    As `tf1hess.legacy.load` and `tf1hess.export.export_hessian_graph`.
  """
  if not (export_dir or output_graph or logdir):
    raise ValueError(
      "Give at least one output: `export_dir`, `output_graph` or `logdir`."
    )
  export.check_output_paths(export_dir, output_graph, logdir, overwrite)
  model = legacy.load(
    xs,
    ys,
    saved_model=saved_model,
    graph=graph,
    meta_graph=meta_graph,
    checkpoint=checkpoint,
    tag=tag,
    check_independence=check_independence,
    plan=plan,
  )
  for x, hessians, gradients in zip(
    *(
      _checks.as_list(v)[0] for v in (model.xs, model.hessians, model.gradients)
    )
  ):
    logging.info(
      "Hessians %s and gradients %s of %s with respect to %s %s",
      hessians.shape,
      gradients.shape,
      ys,
      x.name,
      x.shape,
    )
  export.export_hessian_graph(
    model,
    export_dir=export_dir,
    output_graph=output_graph,
    logdir=logdir,
    tag=tag,
    overwrite=overwrite,
  )
  for path in (export_dir, output_graph, logdir):
    if path:
      logging.info("Wrote %s", path)
  return model


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with _cli.exit_on_error("export_hessian_graph"):
      export_model(
        _MODEL.xs_value(),
        _MODEL.ys_value(),
        **_MODEL.model_kwargs(),
        export_dir=_EXPORT_DIR.value,
        output_graph=_OUTPUT_GRAPH.value,
        logdir=_LOGDIR.value,
        check_independence=_MODEL.check_independence.value,
        overwrite=_OVERWRITE.value,
        plan=_PLAN.plan(),
      )
  except KeyboardInterrupt:
    print(
      "export_hessian_graph: interrupted; --export_dir and --output_graph "
      "were not written.",
      file=sys.stderr,
    )
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
