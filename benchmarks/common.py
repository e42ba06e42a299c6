"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder
is on sys.path)."""

from __future__ import annotations

import json
import statistics
import time

import torch

#: the benchmark shape of issue #4: batch, heads, head dim, value dim, random features
B, H, D, DV, M = 1, 8, 64, 64, 256


def favor_case(L: int):
    """The projection (M, D) and q, k, v, an upstream gradient (B, H, L, ·) that gemm_profile.py and
    tune.py time favor_attention on, all drawn from one generator seeded 0."""
    import favor

    g = torch.Generator().manual_seed(0)
    w = favor.gaussian_orthogonal_matrix(M, D, generator=g)
    q, k, v, up = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    return w, q, k, v, up


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
