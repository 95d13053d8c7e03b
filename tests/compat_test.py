"""Installing into an existing environment and the version checks.

The installation test asks pip what installing tf1hess would change in the
environment the suite runs in: noxfile.py runs the suite on every supported
TensorFlow, with the `tensorflow-cpu` build (2.12 to 2.15) and the
`tensorflow` build (2.16 on), so every version and both builds are checked.
"""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

from absl.testing import parameterized
import tensorflow as tf

from tf1hess import _compat

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a user's environment is built on: installing tf1hess leaves it alone.
_PROTECTED = {
  "tensorflow",
  "tensorflow-cpu",
  "tensorflow-intel",
  "tf-keras",
  "keras",
  "numpy",
  "protobuf",
}


def _normalized(name):
  return name.lower().replace("_", "-")


class InstallTest(tf.test.TestCase):
  def test_install_changes_no_tensorflow_keras_or_numpy(self):
    report = os.path.join(self.get_temp_dir(), "report.json")
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--no-build-isolation",  # the environment's own setuptools
        "--report",
        report,
        _ROOT,
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(report, encoding="utf-8") as f:
      installs = json.load(f)["install"]
    names = {_normalized(item["metadata"]["name"]) for item in installs}
    self.assertIn("tf1hess", names)  # the report is about the right thing
    self.assertEmpty(names & _PROTECTED, f"pip would install {sorted(names)}")

  def test_import_imports_no_keras(self):
    # In a process of its own: the suite's other modules import Keras.
    script = textwrap.dedent(
      """
      import sys
      import tensorflow
      def keras_modules():
        return {m for m in sys.modules if m.split(".")[0] in
                ("keras", "tf_keras")}
      before = keras_modules()
      import tf1hess
      print(sorted(keras_modules() - before))
      """
    )
    result = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=_ROOT),
      timeout=300,
      check=False,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertEqual(result.stdout.strip().splitlines()[-1], "[]")


class VersionTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("release", "2.15.1", (2, 15)),
    ("candidate", "2.16.0rc0", (2, 16)),
    ("nightly", "2.22.0-dev20260101", (2, 22)),
    ("short", "3", (3, 0)),
  )
  def test_parse_version(self, version, expected):
    self.assertEqual(_compat.parse_version(version), expected)

  def test_running_tensorflow_is_in_range(self):
    found = _compat.parse_version(tf.__version__)
    self.assertBetween(found, _compat.MIN_TENSORFLOW, _compat.MAX_TENSORFLOW)

  def test_too_old_tensorflow_is_refused(self):
    with self.assertRaisesRegex(
      ImportError,
      r"tf1hess needs TensorFlow 2\.12 to 2\.21; saw TensorFlow 2\.11\.0\. "
      r"Upgrade it, or install one build of it, e\.g\. `pip install "
      r"'tf1hess\[cpu\]'`",
    ):
      _compat.check_tensorflow("2.11.0")
    with self.assertRaisesRegex(ImportError, r"saw TensorFlow 1\.15\.5"):
      _compat.check_tensorflow("1.15.5")

  def test_newer_tensorflow_warns(self):
    with self.assertWarnsRegex(
      UserWarning,
      r"tf1hess is tested on TensorFlow 2\.12 to 2\.21; saw TensorFlow "
      r"2\.22\.0\. It may work",
    ):
      _compat.check_tensorflow("2.22.0")

  def test_legacy_keras_variable_without_tf_keras(self):
    # sys.modules[name] = None makes `import name` fail, as if not installed.
    with (
      mock.patch.dict(sys.modules, {"tf_keras": None}),
      mock.patch.dict(os.environ, {"TF_USE_LEGACY_KERAS": "1"}),
    ):
      if _compat.parse_version(tf.__version__) < (2, 15):
        # TensorFlow <= 2.14 ignores the variable: Keras 2 is tf.keras.
        self.assertIs(_compat.legacy_keras(), tf.keras)
      else:
        with self.assertRaisesRegex(
          ImportError,
          r"TF_USE_LEGACY_KERAS is set, .* but tf-keras is not installed: "
          r"`pip install 'tf-keras~=2\.\d+\.0'`",
        ):
          _compat.legacy_keras()

  def test_keras_generations(self):
    legacy = _compat.legacy_keras()
    self.assertLess(
      _compat.parse_version(_compat._module_version(legacy.Model)), (3, 0)
    )
    self.assertIn(legacy.Model, _compat.legacy_keras_models())
    if _compat.parse_version(tf.__version__) < (2, 16):
      with self.assertRaisesRegex(
        ImportError, r"Keras 3 is needed here; saw keras 2\."
      ):
        _compat.keras3()
    else:
      self.assertGreaterEqual(
        _compat.parse_version(_compat.keras3().__version__), (3, 0)
      )


if __name__ == "__main__":
  tf.test.main()
