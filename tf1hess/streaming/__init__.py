"""Per-sample Hessians of a frozen graph over inputs larger than memory.

`compute_hessians` reads the samples of a file batch by batch, runs the
per-sample Hessians (`tf1hess.batch_hessians`, and optionally the gradients)
of a frozen `GraphDef` on each batch through one session, and writes each
batch into a `.npy` file at its place. Memory is bounded by the batch size,
whatever the number of samples:

- inputs are never loaded whole: a `.npy` (and an uncompressed `.npz`
  member) is read one batch at a time; a compressed `.npz` member is
  decompressed as a stream, batch after batch (zip members cannot be read
  at an offset); `.csv` and TFRecord files are read through `tf.data`;
- the `(N, K, K)` output is a `.npy` file created at its full size and
  filled batch by batch with ordinary file writes (not a memory map, whose
  failure on a full disk is a SIGBUS); when it would exceed
  `max_file_bytes`, it is split into shards `NAME-00000-of-00004.npy`, ...
  of whole batches.

Inputs are checked before any file is written (an `.npy` against the size
its header promises, an `.npz` member against its CRC-32), and so is the
free space the output needs.

Runs are resumable. Until a run is complete its data lives in
`OUTPUT.partial` beside a progress file `OUTPUT.progress.json` that records
a fingerprint of the run's settings and the completed batches, and
`OUTPUT.checksums`, the CRC-32 of every completed batch; after each batch
its data is flushed, its checksum appended and the progress file replaced
atomically. A run that is interrupted (Ctrl-C, killed, a lost worker, a
full disk) and started again with the same settings checks the batches
recorded as done against their checksums and computes only the missing
(or damaged) ones; the partial files are renamed to their final names only
when every batch is done, so a file under the final name is always
complete, and it is byte for byte the file an uninterrupted run writes
with the same strategy (`method`, `chunk_size`, `parallel_iterations`: a
run may be resumed with another, whose batches agree to float rounding).
The lock `OUTPUT.lock`, taken before any other file is touched, keeps a
second run off the output. See docs/guarantees.md.

With `worker_hosts`, the batches are spread over the workers of a TensorFlow
cluster (see `tf1hess.cluster`): one copy of the model per worker under
`tf.device("/job:worker/task:i")` in one graph, one session on the first
worker, one batch in flight per worker, each in a thread of its own while
the client watches the workers (a lost or silent worker, the first one
included, ends the run in a bounded time). The results go into the same
file, equal to the single-machine result.
"""

from tf1hess.streaming.readers import InputReader
from tf1hess.streaming.readers import open_input
from tf1hess.streaming.run import DEFAULT_MAX_FILE_BYTES
from tf1hess.streaming.run import OUTPUT_DTYPES
from tf1hess.streaming.run import RunSummary
from tf1hess.streaming.run import compute_hessians
from tf1hess.streaming.writer import output_files

__all__ = [
  "DEFAULT_MAX_FILE_BYTES",
  "InputReader",
  "OUTPUT_DTYPES",
  "RunSummary",
  "compute_hessians",
  "open_input",
  "output_files",
]
