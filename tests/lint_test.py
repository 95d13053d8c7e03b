"""The repo's one code style: `ruff check` and `ruff format --check` pass."""

import os
import subprocess
import sys
import unittest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LintTest(unittest.TestCase):
  def _ruff(self, *args):
    return subprocess.run(
      [sys.executable, "-m", "ruff", *args, _ROOT],
      capture_output=True,
      text=True,
      cwd=_ROOT,
      check=False,
    )

  def test_ruff_check(self):
    result = self._ruff("check")
    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

  def test_ruff_format(self):
    result = self._ruff("format", "--check")
    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


if __name__ == "__main__":
  unittest.main()
