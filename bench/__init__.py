"""Side-by-side benchmarks of dualmem: every figure is a ratio to a baseline run beside it.

``python -m bench`` (or ``dualmem bench``) runs the suites and writes ``bench/results/``.
"""

__all__: list[str] = []
