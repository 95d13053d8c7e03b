"""What the benchmark runs in a process of its own.

  python -m benchmarks.child case '<json>'    # a case that times dde.grad
  python -m benchmarks.child memory '<json>'  # one method's peak memory

`case` imports DeepXDE with its `tensorflow.compat.v1` backend first, which
calls `tf.compat.v1.disable_v2_behavior()` for the whole process: every
method of the case then runs under the same TensorFlow state. The result is
printed as one tagged JSON line (`harness.print_child_result`).
"""

import importlib.util
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _case(spec):
  os.environ["DDE_BACKEND"] = "tensorflow.compat.v1"
  if importlib.util.find_spec("tf_keras"):  # Keras 2 for TF >= 2.16
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  import deepxde  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  from benchmarks import harness  # pylint: disable=import-outside-toplevel

  case = harness.case_from_spec(spec)
  timing = harness.Timing(**spec["timing"])
  return harness.run_case_here(case, spec["names"], timing, isolated=True)


def _memory(spec):
  from benchmarks import harness  # pylint: disable=import-outside-toplevel

  case = harness.case_from_spec(spec)
  return {"peak_mib": harness.memory_probe(case, spec["name"])}


def main(argv):
  if len(argv) != 3 or argv[1] not in ("case", "memory"):
    sys.exit("usage: python -m benchmarks.child case|memory '<json>'")
  spec = json.loads(argv[2])
  result = (_case if argv[1] == "case" else _memory)(spec)
  from benchmarks import harness  # pylint: disable=import-outside-toplevel

  harness.print_child_result(result)


if __name__ == "__main__":
  main(sys.argv)
