"""Where the self-normalised key estimators are biased, and by how much: JSON with, per key
estimator (``plain``, ``normalized``, ``calibrated``) and budget M, on fixed inputs (the issue's
setting: L = 1024, d = 64, q, k, v ~ N(0, 0.5²), bidirectional, ``hyperbolic_oprf`` on orthogonal
projections by default), over ``--draws`` independent projections:

* ``kernel_bias``: mean over P (query, key) pairs of E[K̂]/exp(xᵀy) − 1 (signed), with its standard
  error over draws (of each draw's mean over the pairs: the pairs of one draw are correlated); ``kernel_abs_bias``: the mean of |E[K̂]/exp(xᵀy) − 1| over the pairs, with the
  same quantity for a zero-bias estimator of equal spread (``kernel_abs_bias_noise``: what sampling
  error alone gives with this many draws), so a real bias shows as the excess over it;
* ``output_bias``: ‖E[Ô] − O‖/‖O‖ over R query rows (the estimate averaged over draws, against the
  exact softmax output O), and ``output_bias_noise``, the part of it that the finite number of
  draws alone gives (√(E‖Ô − E Ô‖²/draws)/‖O‖); ``output_rel_error``: the mean over draws of
  ‖Ô − O‖/‖O‖ (bias and variance together); ``output_bias_net``: √(output_bias² −
  output_bias_noise²), the bias with the draws' own noise taken out (E‖ō − O‖² = ‖bias‖² + noise²).

``plain`` is unbiased for the kernel; every estimator's *output* has the ratio bias of the row
normalisation D⁻¹.  Everything is float64 and explicit (``favor.random_features``).

    python benchmarks/key_estimator_bias.py --draws 400 --json benchmarks/results/key_estimator_bias.json
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from common import emit_json

from favor.approx import _generator, draw_inputs
from favor.feature_maps import KEY_ESTIMATORS, num_features, oprf_parameter, random_features
from favor.projections import projection_matrix


def measure(features: str, projection: str, budgets: list[int], draws: int, *, length: int, dim: int,
            sigma: float, pairs: int, rows: int) -> list[dict]:
    q, k, v = draw_inputs(length, dim, sigma=sigma, generator=_generator(7, 0))  # float64 (L, d)
    x, y = q * dim ** -0.25, k * dim ** -0.25
    g = _generator(7, 1)
    qi, kj = torch.randint(0, length, (pairs,), generator=g), torch.randint(0, length, (pairs,), generator=g)
    ri = torch.randperm(length, generator=g)[:rows]
    exact_kernel = torch.exp((x[qi] * y[kj]).sum(-1))  # (P,)
    exact_out = torch.softmax(x[ri] @ y.T, -1) @ v  # (R, Dv)
    a = oprf_parameter(x, y) if features in ("oprf", "hyperbolic_oprf") else None
    out = []
    for budget in budgets:
        m = budget // (num_features(1, features))  # projections giving M output features
        sums = {e: [torch.zeros(pairs, dtype=torch.float64), torch.zeros(pairs, dtype=torch.float64),
                    torch.zeros_like(exact_out), 0.0, [], 0.0] for e in KEY_ESTIMATORS}
        for s in range(draws):
            w = projection_matrix(projection, m, dim, generator=_generator(8, budget, s), dtype=torch.float64)
            fx = random_features(x, w, features, oprf_a=a)  # (L, M)
            for e in KEY_ESTIMATORS:
                fy = random_features(y, w, features, oprf_a=a, key_estimator=e)  # (L, M)
                ratio = (fx[qi] * fy[kj]).sum(-1) / exact_kernel  # (P,)
                est = fx[ri] @ fy.T  # (R, L)
                o = (est / est.sum(-1, keepdim=True)) @ v
                acc = sums[e]
                acc[0] += ratio
                acc[1] += ratio * ratio
                acc[2] += o
                acc[3] += float((o - exact_out).norm() / exact_out.norm())
                acc[4].append(float(ratio.mean()) - 1)  # this draw's mean over the pairs
                acc[5] += float((o - exact_out).pow(2).sum())
        for e in KEY_ESTIMATORS:
            s1, s2, so, err, draw_means, sq = sums[e]
            mean = s1 / draws  # (P,) E[K̂]/K per pair
            var = (s2 / draws - mean * mean).clamp_min(0) * draws / (draws - 1)
            se = (var / draws).sqrt()  # (P,) standard error of each pair's mean
            pair_bias = mean - 1
            out.append({
                "key_estimator": e, "features": features, "projection": projection, "budget": budget,
                "draws": draws,
                "kernel_bias": float(pair_bias.mean()),
                "kernel_bias_se": float(torch.tensor(draw_means).std() / math.sqrt(draws)),
                "kernel_abs_bias": float(pair_bias.abs().mean()),
                "kernel_abs_bias_noise": float((se * math.sqrt(2 / math.pi)).mean()),
                "output_bias": float((so / draws - exact_out).norm() / exact_out.norm()),
                "output_bias_noise": math.sqrt(max(sq / draws - float((so / draws - exact_out).pow(2).sum()), 0.0)
                                               / draws) / float(exact_out.norm()),
                "output_rel_error": err / draws,
            })
            out[-1]["output_bias_net"] = math.sqrt(max(out[-1]["output_bias"] ** 2 - out[-1]["output_bias_noise"] ** 2, 0.0))
            r = out[-1]
            print(f"{e:11s} M={budget:5d}  kernel bias {r['kernel_bias']:+.4f} ± {r['kernel_bias_se']:.4f}  "
                  f"|bias| {r['kernel_abs_bias']:.4f} (noise {r['kernel_abs_bias_noise']:.4f})  "
                  f"output bias {r['output_bias']:.4f} (noise {r['output_bias_noise']:.4f}) "
                  f"of error {r['output_rel_error']:.4f}",
                  file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default="hyperbolic_oprf")
    p.add_argument("--projection", default="orthogonal")
    p.add_argument("--budgets", default="64,256,1024")
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.features, args.projection, [int(b) for b in args.budgets.split(",")], args.draws,
                   length=args.length, dim=args.dim, sigma=args.sigma, pairs=args.pairs, rows=args.rows)
    emit_json({"command": "python " + " ".join(sys.argv), "setting": {
        "length": args.length, "dim": args.dim, "sigma": args.sigma, "pairs": args.pairs, "rows": args.rows,
        "inputs": f"q, k, v ~ N(0, {args.sigma}^2), bidirectional"}, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
