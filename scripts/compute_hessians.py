r"""Per-sample Hessians of a saved TF1 model over a file of samples.

Loads a TF1 SavedModel, a frozen GraphDef or a MetaGraph with its
checkpoint, and writes the per-sample Hessians `(N, K, K)` of `--ys` with
respect to `--xs` for every sample of `--input` to the `.npy` file
`--output`, `--batch_size` samples at a time through one session: inputs
larger than memory are streamed (`.npy` memory-mapped, `.npz`, `.csv` and
TFRecord read batch by batch) and the output is filled batch by batch.

An interrupted run (Ctrl-C, killed, a lost worker) keeps what it finished in
`OUTPUT.partial` and `OUTPUT.progress.json`; the same command resumes it.
With `--worker_hosts` the batches run on a TensorFlow cluster of
`scripts/worker.py` servers.

`--method` (with `--chunk_size`, `--parallel_iterations`) chooses how the
rows of each Hessian are built, not what they are: a run may be resumed with
another method, and its batches already done are kept; the methods agree to
float rounding, not bit for bit (docs/streaming.md).

  python scripts/compute_hessians.py --saved_model=/tmp/model \
    --xs=x:0 --ys=y:0 --input=/tmp/x.npy --output=/tmp/hessians.npy \
    --batch_size=1024
"""

import os
import signal

if __name__ == "__main__":
  # Ctrl-C while TensorFlow loads ends the program quietly (nothing is
  # written yet); `main` turns it back into KeyboardInterrupt.
  signal.signal(signal.SIGINT, signal.SIG_DFL)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's pooling CPU allocator; see docs/speed.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import sys

from absl import app
from absl import flags
from absl import logging

from tf1hess import _cli
from tf1hess import cluster
from tf1hess import legacy
from tf1hess import streaming
from tf1hess.streaming import writer

_MODEL = _cli.define_model_flags()
_PLAN = _cli.define_plan_flags()
_INPUT = flags.DEFINE_string(
  "input",
  None,
  "The samples (N, K) or (N, d...): .npy, .npz (with --input_key), .csv "
  "(numeric rows, optional header) or .tfrecord (tf.train.Example with a "
  "float_list feature).",
  required=True,
)
_INPUT_KEY = flags.DEFINE_string(
  "input_key",
  None,
  "The array of an .npz or the feature of TFRecord records; default: the "
  "only one.",
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "The .npy file of the Hessians (N, K, K); sharded into "
  "NAME-00000-of-0000S.npy files above --max_file_bytes.",
  required=True,
)
_GRADIENTS_OUTPUT = flags.DEFINE_string(
  "gradients_output", None, "Optional .npy file of the gradients (N, K)."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size",
  256,
  "Samples per session run; memory is bounded by it.",
  lower_bound=1,
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  None,
  list(streaming.OUTPUT_DTYPES),
  "The dtype written; default: the dtype of --xs.",
)
_RESUME = flags.DEFINE_bool(
  "resume",
  True,
  "Continue an unfinished run of the same flags on --output (--method, "
  "--chunk_size and --parallel_iterations may differ); --noresume discards "
  "it and starts over.",
)
_WORKER_HOSTS = flags.DEFINE_list(
  "worker_hosts",
  None,
  "HOST:PORT of the TensorFlow workers (scripts/worker.py) to spread the "
  "batches over, in task order; default: this machine.",
)
_OVERWRITE = _cli.define_overwrite_flag()
_WORKER_TIMEOUT = flags.DEFINE_float(
  "worker_timeout",
  cluster.DEFAULT_WORKER_TIMEOUT,
  "With --worker_hosts: seconds a batch may take before the run fails "
  "naming its worker (0: no limit).",
  lower_bound=0.0,
)
_CONNECT_TIMEOUT = flags.DEFINE_float(
  "connect_timeout",
  60.0,
  "With --worker_hosts: seconds to wait at the start for every worker to "
  "accept connections.",
  lower_bound=0.0,
)
_MAX_FILE_BYTES = flags.DEFINE_integer(
  "max_file_bytes",
  streaming.DEFAULT_MAX_FILE_BYTES,
  "Largest output file; larger outputs are split into shards.",
  lower_bound=1,
)
_PROGRESS_SECS = flags.DEFINE_float(
  "progress_secs", 10.0, "Seconds between progress lines.", lower_bound=0.0
)

PROG = "compute_hessians"


def compute(
  xs,
  ys,
  input,  # pylint: disable=redefined-builtin
  output,
  saved_model=None,
  graph=None,
  meta_graph=None,
  checkpoint=None,
  tag="serve",
  **kwargs,
):
  """Loads a legacy model and writes its per-sample Hessians over `input`.

  Args:
    xs: `str`, the input tensor's name, e.g. "x:0".
    ys: `str` or list of `str`, the output tensors' names.
    input: `str`, the samples (see `tf1hess.streaming.open_input`).
    output: `str`, the `.npy` file of the Hessians.
    saved_model: as in `tf1hess.legacy.load_graph_def`.
    graph: as in `tf1hess.legacy.load_graph_def`.
    meta_graph: as in `tf1hess.legacy.load_graph_def`.
    checkpoint: as in `tf1hess.legacy.load_graph_def`.
    tag: as in `tf1hess.legacy.load_graph_def`.
    **kwargs: the other arguments of `tf1hess.streaming.compute_hessians`
      (`batch_size`, `dtype`, `resume`, `worker_hosts`, `method`, ...).

  Returns:
    The `tf1hess.streaming.RunSummary`.

  Raises:
    As `tf1hess.legacy.load_graph_def` and
    `tf1hess.streaming.compute_hessians`.
  """
  # Before the model, which may take minutes to load and freeze.
  writer.check_output_path(output, "output")
  if kwargs.get("gradients_output") is not None:
    writer.check_output_path(kwargs["gradients_output"], "gradients_output")
  graph_def = legacy.load_graph_def(
    saved_model=saved_model,
    graph=graph,
    meta_graph=meta_graph,
    checkpoint=checkpoint,
    tag=tag,
  )
  return streaming.compute_hessians(graph_def, xs, ys, input, output, **kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  _cli.interrupt_with_keyboard_interrupt()
  try:
    with _cli.exit_on_error(PROG):
      summary = compute(
        _MODEL.xs.value,
        _MODEL.ys_value(),
        _INPUT.value,
        _OUTPUT.value,
        **_MODEL.model_kwargs(),
        input_key=_INPUT_KEY.value,
        batch_size=_BATCH_SIZE.value,
        dtype=_DTYPE.value,
        gradients_output=_GRADIENTS_OUTPUT.value,
        resume=_RESUME.value,
        overwrite=_OVERWRITE.value,
        worker_hosts=_WORKER_HOSTS.value or None,
        timeout=_WORKER_TIMEOUT.value or None,
        connect_timeout=_CONNECT_TIMEOUT.value,
        max_file_bytes=_MAX_FILE_BYTES.value,
        check_independence=_MODEL.check_independence.value,
        plan=_PLAN.plan(),
        progress_interval=_PROGRESS_SECS.value,
      )
  except KeyboardInterrupt:
    print(
      f"{PROG}: interrupted; finished batches are kept, run the same "
      "command again to resume.",
      file=sys.stderr,
    )
    _cli.exit_with(130)
  logging.info(
    "%d Hessians (%d x %d) in %s (%d batches computed, %d resumed).",
    summary.num_samples,
    summary.num_features,
    summary.num_features,
    ", ".join(summary.output_files),
    summary.computed_batches,
    summary.resumed_batches,
  )


if __name__ == "__main__":
  app.run(main)
