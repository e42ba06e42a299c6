"""Per-head output errors of `favor approx --model` for each key estimator: the sweep reports the
mean ± std over its seeds (seed s = layer/head s of the checkpoint, with fresh projections); this
keeps every seed's value, so plain and the self-normalised keys can be compared head by head on the
same draws.  JSON: per (features, budget, key estimator) the 16 values, and per non-plain
estimator the heads where it is worse than plain.

    python benchmarks/approx_per_head.py --model runs/lm-favor --json benchmarks/results/approx_model_per_head.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from unittest import mock

import torch
from common import emit_json

import favor.approx as approx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = approx.ApproxConfig(length=args.length, budgets=(64, 256), seeds=args.seeds, projections=("orthogonal",),
                               features=("positive", "oprf", "hyperbolic_oprf"))
    config, inputs, about = approx.model_inputs(args.model, base)
    keep = approx._mean_std
    values = {}
    with mock.patch.object(approx, "_mean_std", lambda vals: {**keep(vals), "values": [float(v) for v in vals]}):
        for estimator in ("plain", "normalized", "calibrated"):
            result = approx.run_sweep(replace(config, key_estimator=estimator), inputs=inputs, progress=False)
            for e in result["results"]:
                values[(e["features"], e["budget"], estimator)] = e["output_rel_error"]["values"]
    rows = []
    for (features, budget, estimator), vals in values.items():
        plain = values[(features, budget, "plain")]
        worse = [s for s in range(len(vals)) if vals[s] > plain[s]]
        rows.append({"features": features, "budget": budget, "key_estimator": estimator,
                     "output_rel_error": vals, "mean": sum(vals) / len(vals),
                     "seeds_worse_than_plain": [] if estimator == "plain" else worse})
        if estimator != "plain":
            print(f"{features:16s} M={budget:4d} {estimator:10s} mean {rows[-1]['mean']:.3f} "
                  f"(plain {sum(plain) / len(plain):.3f}), worse than plain on {len(worse)} of {len(vals)} heads",
                  file=sys.stderr)
    emit_json({"command": "python " + " ".join(sys.argv), "inputs": about, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
