r"""Times `tf1hess.Derivatives` and `tf1hess.dde` against DeepXDE's `dde.grad`.

On DeepXDE's own `FNN([d] + [64] * 3 + [1], "tanh")` (backend
`tensorflow.compat.v1`), the full Hessian and the Laplacian by each of them,
in one session, checked against `dde.grad` and timed in turns; the work is
`benchmarks/pinn.py`. Then, on a hand-written network of `x` `(N, d)` and
`t` `(N, 1)` placeholders, the joint Hessian over `[x, t]` (cross entries
`u_xt` included) by `tf.gradients`, `tf1hess.Derivatives` and JAX
(`--space_time_dims`; empty to skip). Last, the tensors of derivatives of
orders 3 and 4 (`u_xxx`, `u_xxyy` are entries) of such a network of `x`
alone by nested `tf.gradients`, `tf1hess.batch_derivatives` and JAX
(`--orders` at each of `--order_dims`; empty to skip).

  python scripts/pinn_benchmark.py --dims=2,5,10,20 --batch_size=4096
"""

import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DDE_BACKEND", "tensorflow.compat.v1")
if importlib.util.find_spec("tf_keras"):  # Keras 2 for TF >= 2.16's v1 layers
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's pooling CPU allocator; see docs/speed.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# benchmarks/ is not installed: it is imported from the repository's root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from absl import logging

from benchmarks import pinn
from benchmarks.pinn import compare  # noqa: F401  (tests/deepxde_checks.py)
from benchmarks.pinn import compare_space_time  # noqa: F401
from benchmarks.pinn import format_table  # noqa: F401

_DIMS = flags.DEFINE_list("dims", ["2", "5", "10", "20"], "Input dimensions.")
_SPACE_TIME_DIMS = flags.DEFINE_list(
  "space_time_dims", ["1", "2", "3"], "Features of `x` beside `t`."
)
_ORDERS = flags.DEFINE_list("orders", ["3", "4"], "Orders >= 3 to time.")
_ORDER_DIMS = flags.DEFINE_list(
  "order_dims", ["2"], "Input dimensions of the orders >= 3."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 4096, "Points per run.", lower_bound=1
)
_RUNS = flags.DEFINE_integer(
  "runs", 21, "Timed runs per method and case.", lower_bound=1
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  rows = []
  for d in (int(v) for v in _DIMS.value):
    logging.info("d = %d", d)
    rows.extend(compare(d, _BATCH_SIZE.value, _RUNS.value))
  if rows:
    print(format_table(rows))
  rows = []
  for d in (int(v) for v in _SPACE_TIME_DIMS.value):
    logging.info("[x (N, %d), t]", d)
    rows.extend(compare_space_time(d, _BATCH_SIZE.value, _RUNS.value))
  if rows:
    methods = (*pinn.SPACE_TIME_METHODS, pinn.JAX)
    print()
    print(format_table(rows, methods, pinn.SPACE_TIME_PEERS))
  rows = []
  for d in (int(v) for v in _ORDER_DIMS.value):
    for order in (int(v) for v in _ORDERS.value):
      if order < 3:
        raise app.UsageError(f"--orders must be >= 3; saw {order}.")
      logging.info("d = %d, order %d", d, order)
      rows.extend(pinn.compare_orders(d, order, _BATCH_SIZE.value, _RUNS.value))
  if rows:
    methods = (*pinn.ORDERS_METHODS, pinn.JAX)
    print()
    print(
      format_table(
        rows, methods, ("tf.gradients", pinn.JAX), ours=pinn.ORDERS_OURS
      )
    )


if __name__ == "__main__":
  app.run(main)
