"""Test settings shared by every test file: set before TensorFlow loads."""

import importlib.util
import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One thread in each of TensorFlow's pools: the README's `pytest -n 2` runs
# two workers on two cores, and pools of a thread per core in each worker
# spun against the other's (12% of the time of forward_test and
# forward_chunks_test). The tests' subprocesses inherit it.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
# Legacy graph-mode Keras (tf_keras) behind tf.compat.v1.layers and
# tf.compat.v1.nn.rnn_cell, as in the code bases tf1hess serves.
# Only where tf-keras is installed: TensorFlow 2.15 with the variable set and
# no tf-keras cannot import Keras at all; <= 2.15 has Keras 2 as tf.keras.
if importlib.util.find_spec("tf_keras"):
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


@pytest.fixture(autouse=True)
def _inputs_of_each_tests_own(request):
  """Reseeds a test module's `_RNG` from the test's name.

  pytest-xdist hands the tests to its workers in no fixed order: a shared
  generator would give a test other inputs from one run to the next (and
  finite differences of a max pool or a ReLU can straddle a kink on some).
  """
  rng = getattr(request.module, "_RNG", None)
  if isinstance(rng, np.random.Generator):
    seed = zlib.crc32(request.node.nodeid.encode())
    rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state


def pytest_addoption(parser):
  parser.addoption(
    "--slow",
    action="store_true",
    help="also run the slow tests (a minute or more each on 2 cores); nox "
    "runs them on every TensorFlow version",
  )


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "slow: skipped unless pytest runs with --slow (nox does)"
  )


def pytest_collection_modifyitems(config, items):
  """Skips the slow tests unless --slow.

  A test is slow when marked `@pytest.mark.slow` (under the
  `parameterized` decorators, so that each case carries the mark), or when
  its name is in its class's `slow_cases` (one case of a parameterized
  test).
  """
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --slow (nox does)")
  for item in items:
    cases = getattr(item.cls, "slow_cases", ())
    if "slow" in item.keywords or item.name in cases:
      item.add_marker(skip)
