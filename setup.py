"""Installs tf1hess: per-sample Hessians for TensorFlow 1 graph code.

TensorFlow is not a requirement, as in TensorFlow Probability and Sonnet: a
user's environment already has the build it needs (`tensorflow`,
`tensorflow-cpu`, `tensorflow[and-cuda]`, a vendor's), and installing tf1hess
must leave it as it is. `import tf1hess` checks the version instead
(tf1hess/_compat.py). The extras install one build into a new environment.
The ranges are the ones COMPATIBILITY.md shows tested (noxfile.py).
"""

import setuptools

_TENSORFLOW = ">=2.12,<2.22"

setuptools.setup(
  name="tf1hess",
  version="0.1.0",
  description=(
    "Per-sample Hessians for TensorFlow 1 graph code "
    "(tf.compat.v1): placeholders, sessions, frozen graphs."
  ),
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["tf1hess", "tf1hess.*"]),
  # The syntax floor is checked by ruff's target-version (ruff.toml); TF 2.12
  # to 2.15 run on 3.9 to 3.11. Tested on 3.11.
  python_requires=">=3.9",
  install_requires=[
    "numpy>=1.23.5,<3",
    "absl-py>=1.4,<3",
  ],
  extras_require={
    # One TensorFlow build each; pick the one your environment lacks.
    "cpu": [f"tensorflow-cpu{_TENSORFLOW}"],
    "tensorflow": [f"tensorflow{_TENSORFLOW}"],
    "and-cuda": ["tensorflow[and-cuda]>=2.14,<2.22"],
    # Keras 2 for TensorFlow >= 2.16 (tf.compat.v1.layers, rnn_cell, tf1hess
    # .keras on graph-mode models), for a new environment with `tensorflow`.
    # tf-keras depends on the `tensorflow` distribution of its own version:
    # pip would upgrade an existing TensorFlow to the newest (or put a second
    # one beside tensorflow-cpu). In an existing environment install
    # `tf-keras~=2.X.0` matching your TensorFlow instead (README).
    "keras2": ["tf-keras>=2.16,<2.22"],
    "test": [
      "pytest>=8,<10",
      "pytest-xdist>=3.5,<4",
      "ruff==0.17.6",
      "nox>=2024.3",
      "deepxde>=1.15,<2",
    ],
    "bench": [
      "jax>=0.4.30",
      "folx>=0.2.30",
      "matplotlib>=3.8,<4",
    ],
  },
  classifiers=[
    "Programming Language :: Python :: 3",
    "Programming Language :: Python :: 3.11",
    "Topic :: Scientific/Engineering :: Mathematics",
  ],
)
