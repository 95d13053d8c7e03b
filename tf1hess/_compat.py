"""The TensorFlow and Keras versions tf1hess runs on, checked where needed.

TensorFlow is not a hard requirement of the package (users pick their own
build: `tensorflow`, `tensorflow-cpu`, `tensorflow[and-cuda]`, or a vendor's),
as in TensorFlow Probability and Sonnet: `import tf1hess` checks it instead,
and raises one clear error naming the supported range. Keras is optional and
only `tf1hess.keras` looks for it, through `legacy_keras()` and `keras3()`.
"""

import importlib
import os
import sys
import warnings

# The range `noxfile.py` tests (COMPATIBILITY.md); keep setup.py's extras and
# the README's "Installing into an existing environment" in agreement.
MIN_TENSORFLOW = (2, 12)
MAX_TENSORFLOW = (2, 21)

_RANGE = "TensorFlow 2.12 to 2.21"
_INSTALL = (
  "install one build of it, e.g. `pip install 'tf1hess[cpu]'` "
  "(tensorflow-cpu), `pip install 'tf1hess[tensorflow]'` or "
  "`pip install 'tf1hess[and-cuda]'` (GPU), or your own "
  "`pip install 'tensorflow>=2.12,<2.22'`"
)


def parse_version(version):
  """`(major, minor)` of a version string such as "2.15.1" or "2.16.0rc0"."""
  parts = []
  for part in version.split(".")[:2]:
    digits = ""
    for char in part:
      if not char.isdigit():
        break
      digits += char
    parts.append(int(digits or 0))
  return tuple(parts + [0] * (2 - len(parts)))


def check_tensorflow(version):
  """Raises for a TensorFlow older than the range; warns for a newer one.

  Args:
    version: `str`, `tf.__version__`.

  Raises:
    ImportError: when `version` is older than 2.12.
  """
  found = parse_version(version)
  if found < MIN_TENSORFLOW:
    raise ImportError(
      f"tf1hess needs {_RANGE}; saw TensorFlow {version}. Upgrade it, or "
      f"{_INSTALL}. (TensorFlow 1.15 itself needs Python <= 3.7, which "
      "tf1hess does not support.)"
    )
  if found > MAX_TENSORFLOW:
    warnings.warn(
      f"tf1hess is tested on {_RANGE}; saw TensorFlow {version}. It may "
      "work; COMPATIBILITY.md lists what was tested.",
      stacklevel=3,
    )


def import_tensorflow():
  """Imports TensorFlow, or raises one `ImportError` saying what to install."""
  try:
    tf = importlib.import_module("tensorflow")
  except ImportError as error:
    raise ImportError(
      f"tf1hess needs {_RANGE}, which is not installed ({error}); {_INSTALL}."
    ) from error
  check_tensorflow(tf.__version__)
  return tf


def _module_version(cls):
  """The `__version__` of the top-level package that defines `cls`."""
  package = sys.modules[cls.__module__.split(".")[0]]
  return getattr(package, "__version__", "0")


def _wants_legacy_keras():
  """Whether TF_USE_LEGACY_KERAS asks TensorFlow (>= 2.15) for tf-keras."""
  return os.environ.get("TF_USE_LEGACY_KERAS", "") in ("1", "true", "True")


def legacy_keras():
  """The Keras 2 module that TF1-style code builds its models with.

  `tf.keras` where it is Keras 2 (TensorFlow <= 2.15, or
  `TF_USE_LEGACY_KERAS=1` with tf-keras installed on >= 2.16), otherwise the
  `tf_keras` package.

  Returns:
    The module (`tf.keras` or `tf_keras`).

  Raises:
    ImportError: when no Keras 2 is installed, or TF_USE_LEGACY_KERAS asks
      for tf-keras where it is not installed, saying what to install.
  """
  tf = import_tensorflow()
  major, minor = parse_version(tf.__version__)
  if (major, minor) >= (2, 15) and _wants_legacy_keras():
    try:
      return importlib.import_module("tf_keras")
    except ImportError as error:
      # TensorFlow itself then fails to import any Keras (2.15: a
      # RecursionError), and tf.compat.v1.layers with it.
      raise ImportError(
        "TF_USE_LEGACY_KERAS is set, which makes TensorFlow "
        f"{tf.__version__} load Keras from tf-keras, but tf-keras is not "
        f"installed: `pip install 'tf-keras~={major}.{minor}.0'` (beside "
        "tensorflow-cpu add `--no-deps`), or unset TF_USE_LEGACY_KERAS."
      ) from error
  try:
    keras = tf.keras
    if parse_version(_module_version(keras.Model)) < (3, 0):
      return keras
  except ImportError:
    pass
  try:
    return importlib.import_module("tf_keras")
  except ImportError as error:
    raise ImportError(
      "Graph-mode Keras models need Keras 2, which TensorFlow "
      f"{tf.__version__} does not include: `pip install "
      f"'tf-keras~={major}.{minor}.0'` (tf-keras depends on the `tensorflow` "
      "distribution; beside tensorflow-cpu, add `--no-deps`), and set "
      "TF_USE_LEGACY_KERAS=1 before importing TensorFlow to build "
      "tf.compat.v1.layers models with it."
    ) from error


def legacy_keras_models():
  """The `Model` classes of every Keras 2 installed (`tf.keras`, tf_keras)."""
  classes = [legacy_keras().Model]
  try:
    classes.append(importlib.import_module("tf_keras").Model)
  except ImportError:
    pass
  return tuple(dict.fromkeys(classes))


def keras3():
  """The Keras 3 module (`import keras`, version >= 3).

  Raises:
    ImportError: when Keras 3 is not installed (TensorFlow <= 2.15 ships
      Keras 2 as `keras`), saying what to install.
  """
  tf = import_tensorflow()
  try:
    keras = importlib.import_module("keras")
  except ImportError as error:
    raise ImportError(
      "Keras 3 is not installed: `pip install 'keras>=3'` (it needs "
      "TensorFlow >= 2.16)."
    ) from error
  version = getattr(keras, "__version__", "0")
  if parse_version(version) < (3, 0):
    raise ImportError(
      f"Keras 3 is needed here; saw keras {version} (TensorFlow "
      f"{tf.__version__} ships Keras 2). Use the Keras 2 API of "
      "tf1hess.keras (BatchDerivatives, model_hessians), or upgrade to "
      "TensorFlow >= 2.16 with `pip install 'keras>=3'`."
    )
  return keras
