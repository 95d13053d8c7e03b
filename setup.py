"""Installs tf1hess: per-sample Hessians for TensorFlow 1 graph code."""

import setuptools

setuptools.setup(
  name="tf1hess",
  version="0.1.0",
  description=(
    "Per-sample Hessians for TensorFlow 1 graph code "
    "(tf.compat.v1): placeholders, sessions, frozen graphs."
  ),
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=["tf1hess"],
  python_requires=">=3.11",
  install_requires=[
    "tensorflow-cpu==2.21.0",
    "tf-keras==2.21.0",
    "keras>=3.10,<4",
    "numpy>=2.0,<3",
    "absl-py>=2.1,<3",
  ],
  extras_require={
    "test": [
      "pytest>=8,<10",
      "pytest-xdist>=3.5,<4",
      "ruff==0.17.6",
    ],
    "bench": [
      "jax==0.10.2",
      "matplotlib>=3.8,<4",
    ],
  },
  classifiers=[
    "Programming Language :: Python :: 3.11",
    "Topic :: Scientific/Engineering :: Mathematics",
  ],
)
