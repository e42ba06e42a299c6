"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder
is on sys.path)."""

from __future__ import annotations

import json
import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of fn, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def emit_json(result: dict, path: str | None) -> None:
    """Write ``result`` as indented JSON to ``path``, or print it when path is None."""
    text = json.dumps(result, indent=1)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
