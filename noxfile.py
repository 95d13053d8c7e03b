"""The compatibility matrix: the test suite on every supported TensorFlow.

    pip install nox && nox

runs `tests` once per TensorFlow version (each in its own virtualenv under
.nox/, reused by later runs), then `compatibility`, which writes
COMPATIBILITY.md from the JUnit reports and the versions each session
recorded. `nox -s "tests(tensorflow='2.12')"` runs one version; arguments
after `--` go to pytest in place of `--slow tests` (`nox -s tests --
tests/ops_test.py`), so the slow tests, skipped by a plain `pytest`, run
only where `--slow` is among them.

TensorFlow 2.12 to 2.15 are tested with the `tensorflow-cpu` build, which
includes Keras 2 as `tf.keras`; 2.16 and later with the `tensorflow` build
(the one that also runs on GPUs) plus `tf-keras`, which depends on it, and
Keras 3. The oldest version also runs with the lowest numpy and absl-py that
setup.py admits, so its floors are tested too.
"""

import os

import nox

# Keep in agreement with tf1hess/_compat.py and setup.py.
TENSORFLOW = [f"2.{minor}" for minor in range(12, 22)]
OLDEST, NEWEST = TENSORFLOW[0], TENSORFLOW[-1]
# The floors of setup.py's install_requires, tested with the oldest version.
FLOORS = ["numpy==1.23.5", "absl-py==1.4.0"]
REPORTS = os.path.join(".nox", "reports")

nox.options.sessions = ["tests", "compatibility"]
nox.options.reuse_existing_virtualenvs = True


def requirements(tensorflow):
  """The TensorFlow build, Keras 2 and pins a session installs first."""
  minor = int(tensorflow.split(".")[1])
  if minor <= 15:
    found = [f"tensorflow-cpu=={tensorflow}.*"]
  else:
    found = [f"tensorflow=={tensorflow}.*", f"tf-keras=={tensorflow}.*"]
  if tensorflow == OLDEST:
    found += FLOORS
  return found


_VERSIONS = """
import importlib.metadata as m, json, sys
def version(name):
  try:
    return m.version(name)
  except m.PackageNotFoundError:
    return None
names = ["tensorflow", "tensorflow-cpu", "tf-keras", "keras", "numpy",
         "absl-py", "protobuf"]
found = {n: version(n) for n in names}
found["commit"] = sys.argv[2]
json.dump(found, open(sys.argv[1], "w"), indent=1)
"""


def _commit(session):
  """The commit the session tests, with "+" when the tree has changes."""
  head = session.run(
    "git", "rev-parse", "--short", "HEAD", silent=True, external=True
  ).strip()
  changed = session.run(
    "git",
    "status",
    "--porcelain",
    "--untracked-files=no",
    silent=True,
    external=True,
  ).strip()
  return head + ("+" if changed else "")


@nox.session(python="3.11")
@nox.parametrize("tensorflow", TENSORFLOW)
def tests(session, tensorflow):
  """The test suite on one TensorFlow version."""
  os.makedirs(REPORTS, exist_ok=True)
  report = os.path.join(REPORTS, f"tf{tensorflow}")
  for stale in (f"{report}.xml", f"{report}.json"):
    if os.path.exists(stale):
      os.remove(stale)
  # TensorFlow (and its pins) first: installing tf1hess must not change them.
  session.install(*requirements(tensorflow))
  session.install("-e", ".[test]", *requirements(tensorflow))
  session.run("python", "-c", _VERSIONS, f"{report}.json", _commit(session))
  session.run(
    "python",
    "-m",
    "pytest",
    "-n",
    "2",
    "-q",
    "-p",
    "no:cacheprovider",
    f"--junitxml={report}.xml",
    *(session.posargs or ["--slow", "tests"]),
    env={"TF_CPP_MIN_LOG_LEVEL": "2"},
  )


@nox.session(python=False)
def compatibility(session):
  """Writes COMPATIBILITY.md from the reports of the `tests` sessions."""
  session.run("python", os.path.join("tools", "compatibility_report.py"))
