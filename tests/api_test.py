"""The public API: every name in `__all__` imports; versions agree."""

import ast
import doctest
import importlib
import importlib.util
import os
import pkgutil
import re

from absl.testing import parameterized
import tensorflow as tf

import tf1hess
from tf1hess import _compat

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
  return sorted(
    name for _, name, _ in pkgutil.iter_modules(tf1hess.__path__, "tf1hess.")
  )


class ApiTest(tf.test.TestCase, parameterized.TestCase):
  def test_every_public_name_imports(self):
    self.assertNotEmpty(tf1hess.__all__)
    self.assertLen(set(tf1hess.__all__), len(tf1hess.__all__))
    for name in tf1hess.__all__:
      self.assertTrue(hasattr(tf1hess, name), name)
      exec(f"from tf1hess import {name}", {})  # pylint: disable=exec-used

  def test_import_names_no_keras_until_used(self):
    # `keras` is a lazily loaded attribute; it is the submodule itself.
    self.assertIs(tf1hess.keras, importlib.import_module("tf1hess.keras"))
    with self.assertRaisesRegex(AttributeError, r"no attribute 'nothing'"):
      getattr(tf1hess, "nothing")  # noqa: B009

  @parameterized.named_parameters((name, name) for name in _modules())
  def test_library_never_imports_the_cli_module(self, module_name):
    # `_cli` defines absl flags and exits the process: scripts only.
    if module_name == "tf1hess._cli":
      self.skipTest("the module itself")
    path = importlib.util.find_spec(module_name).origin
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        imported.update(f"{node.module}.{a.name}" for a in node.names)
      elif isinstance(node, ast.Import):
        imported.update(a.name for a in node.names)
    self.assertNotIn("tf1hess._cli", imported)

  def test_version_matches_setup(self):
    with open(os.path.join(_ROOT, "setup.py"), encoding="utf-8") as f:
      setup_version = re.search(r'version="([^"]+)"', f.read()).group(1)
    self.assertEqual(tf1hess.__version__, setup_version)

  @parameterized.named_parameters((name, name) for name in _modules())
  def test_docstring_examples_run(self, module_name):
    if module_name == "tf1hess._keras3_layer":
      try:
        _compat.keras3()
      except ImportError:
        self.skipTest("needs Keras 3 (TensorFlow >= 2.16)")
    module = importlib.import_module(module_name)
    result = doctest.testmod(
      module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    )
    self.assertEqual(result.failed, 0, f"{module_name}: {result}")


if __name__ == "__main__":
  tf.test.main()
