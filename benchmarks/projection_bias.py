"""How isotropic each structured projection is, and what that does to the kernel estimate of the
worst-case input: JSON with, per projection kind and head dim d,

* ``axis_ratio``: E[φ(x)ᵀφ(x)] / exp(‖x‖²) for x = 0.75·e₀ (positive features, m = d, one block),
  mean ± standard error over ``--draws`` independent draws (1 for an unbiased estimator);
* ``fourth_moment_ratio``: E[u₀⁴]·d(d + 2)/3 for the unit direction u of a row (1 on the uniform
  sphere; larger means rows lean towards the coordinate axes), over the same draws.

    python benchmarks/projection_bias.py --json benchmarks/results/projection_bias.json

iid and orthogonal (Haar) rows are exactly Gaussian in law, so their ratios differ from 1 by
sampling error only; hadamard and givens rows are only approximately isotropic.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from common import emit_json

from favor.projections import projection_matrix


def measure(kind: str, d: int, draws: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(d, dtype=torch.float64)
    x[0] = 0.75
    est, u0 = [], []
    for _ in range(draws):
        w = projection_matrix(kind, d, d, generator=g, dtype=torch.float64)  # (d, d): one block
        est.append(torch.exp(w @ x - x @ x / 2).pow(2).mean())
        u0.append(w[:, 0] / w.norm(dim=1))
    ratio = torch.stack(est) / math.exp(float(x @ x))
    # per draw: the d rows of one block are dependent (column 0 of an orthogonal block is a unit
    # vector), so the draws, not the rows, are the independent units of the standard error
    u4 = torch.stack(u0).pow(4).mean(1) * d * (d + 2) / 3  # (draws,)
    return {"projection": kind, "d": d, "draws": draws,
            "axis_ratio": float(ratio.mean()), "axis_ratio_se": float(ratio.std()) / math.sqrt(draws),
            "fourth_moment_ratio": float(u4.mean()), "fourth_moment_ratio_se": float(u4.std()) / math.sqrt(draws)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=["orthogonal", "hadamard", "givens"])
    p.add_argument("--dims", nargs="+", type=int, default=[2, 4, 8, 16, 64])
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    rows = []
    for d in args.dims:
        for kind in args.kinds:
            rows.append(measure(kind, d, args.draws))
            r = rows[-1]
            print(f"d={d:3d} {kind:10s} axis {r['axis_ratio']:.4f} ± {r['axis_ratio_se']:.4f}   "
                  f"E[u0^4] {r['fourth_moment_ratio']:.3f} ± {r['fourth_moment_ratio_se']:.3f}", file=sys.stderr)
    emit_json({"command": "python " + " ".join(sys.argv), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
