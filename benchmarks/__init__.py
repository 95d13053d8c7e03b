"""tf1hess's benchmark: models, methods, timing, goals and the report.

Not installed with tf1hess; imported from the repository's root (the
scripts put it on `sys.path`). `scripts/benchmark.py` is the program.
"""
