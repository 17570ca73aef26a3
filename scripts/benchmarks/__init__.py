"""Benchmarks and fault injection against the suite's real components: ``scripts/bench``
(``python -m scripts.benchmarks``) and ``scripts/chaos`` (``python -m scripts.benchmarks.chaos``),
run from the repository's root. Each measurement is a module of its own; what they share is in
:mod:`.shared`, and they use the tests' harness (``tests/harness.py``) to start the components."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[2] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)  # the tests' harness, which starts the real components
