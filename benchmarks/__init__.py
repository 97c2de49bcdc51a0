"""Speed and memory benchmarks, each printing ratios measured side by side in one run (results: RESULTS.md).

A package, so benchmarks import the library and each other as modules: run each from the repository
root as ``python -m benchmarks.NAME`` (``--help`` lists its options).
"""
