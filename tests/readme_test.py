"""Every ```python block of README.md and docs/*.md runs as written, and
docs/forward.md lists the op types that have a forward rule.

Each block runs in a fresh process, in a temporary folder (```py blocks are
fragments, such as signatures, and are not run). A block that
starts with `# needs Keras 3` is skipped where there is none (TensorFlow <=
2.15).
"""

import glob
import os
import re
import subprocess
import sys

from absl.testing import parameterized
import tensorflow as tf

from tf1hess import _compat
from tf1hess.forward import registry

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCUMENTS = ["README.md"] + sorted(
  os.path.relpath(path, _ROOT)
  for path in glob.glob(os.path.join(_ROOT, "docs", "*.md"))
)


def _python_blocks(document):
  with open(os.path.join(_ROOT, document), encoding="utf-8") as f:
    text = f.read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _cases():
  for document in _DOCUMENTS:
    name = re.sub(r"\W", "_", document[: -len(".md")])
    for index in range(len(_python_blocks(document))):
      yield (f"{name}_{index}", document, index)


class ReadmeTest(tf.test.TestCase, parameterized.TestCase):
  def test_documents_have_examples(self):
    self.assertNotEmpty(_python_blocks("README.md"))
    self.assertGreaterEqual(len(list(_cases())), 10)

  def test_readme_links_every_document(self):
    with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
      readme = f.read()
    for document in _DOCUMENTS[1:]:
      self.assertIn(f"]({document})", readme)

  def test_forward_doc_lists_every_rule(self):
    with open(os.path.join(_ROOT, "docs", "forward.md"), encoding="utf-8") as f:
      listed = re.search(r"Op types with a rule: `([^`]*)`", f.read())
    self.assertEqual(sorted(listed.group(1).split()), sorted(registry.RULES))

  @parameterized.named_parameters(*_cases())
  def test_block_runs(self, document, index):
    code = _python_blocks(document)[index]
    if code.startswith("# needs Keras 3"):
      try:
        _compat.keras3()
      except ImportError as error:
        self.skipTest(str(error))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")  # as conftest.py set
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
      result.returncode,
      0,
      f"{document} block {index}:\n{code}\n{result.stderr}",
    )


if __name__ == "__main__":
  tf.test.main()
