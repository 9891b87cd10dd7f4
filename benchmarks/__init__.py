"""rasd benchmark scripts. Run them as modules from the repository root, e.g.
``python -m benchmarks.bench_verify``. They share :mod:`benchmarks.harness`."""
