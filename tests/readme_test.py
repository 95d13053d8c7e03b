"""Every ```python block of README.md runs as written, in a fresh process.

A block that starts with `# needs Keras 3` is skipped where there is none
(TensorFlow <= 2.15).
"""

import os
import re
import subprocess
import sys

from absl.testing import parameterized
import tensorflow as tf

from tf1hess import _compat

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


class ReadmeTest(tf.test.TestCase, parameterized.TestCase):
  def test_readme_has_examples(self):
    self.assertGreaterEqual(len(_python_blocks()), 3)

  @parameterized.parameters(*range(len(_python_blocks())))
  def test_block_runs(self, index):
    code = _python_blocks()[index]
    if code.startswith("# needs Keras 3"):
      try:
        _compat.keras3()
      except ImportError as error:
        self.skipTest(str(error))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1")
    result = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      cwd=self.get_temp_dir(),
      env=env,
      timeout=600,
      check=False,
    )
    self.assertEqual(
      result.returncode, 0, f"README block {index}:\n{code}\n{result.stderr}"
    )


if __name__ == "__main__":
  tf.test.main()
