"""One figure for the key estimators: relative output error against the budget M, one panel per
feature kind, one line per key estimator (plain / normalized / calibrated), from ``favor approx``
JSON files that differ only in ``--key-estimator``; error bars are ±1 standard error over seeds.

    python benchmarks/plot_key_estimators.py docs/figures/approx_L1024_d64_budgets_{plain,normalized,calibrated}.json \
        --out docs/figures/approx_key_estimators.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from favor.approx import setting_label
from favor.plotting import pyplot, save_figure

STYLE = {"plain": ("C0", "o"), "normalized": ("C2", "s"), "calibrated": ("C3", "^")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="favor approx JSON files, one per key estimator")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--projection", default="orthogonal")
    args = p.parse_args(argv)
    runs = [json.load(open(path)) for path in args.results]
    estimators = [r["config"].get("key_estimator", "plain") for r in runs]
    if len(set(estimators)) != len(estimators):
        raise SystemExit(f"expected one file per key estimator, got {estimators}")
    kinds = runs[0]["config"]["features"]
    for r in runs[1:]:
        same = {k: v for k, v in r["config"].items() if k != "key_estimator"}
        first = {k: v for k, v in runs[0]["config"].items() if k != "key_estimator"}
        if same != first or r.get("model") != runs[0].get("model"):  # model: `favor approx --model` inputs
            raise SystemExit("the files differ in more than --key-estimator")
    if args.projection not in runs[0]["config"]["projections"]:
        raise SystemExit(f"--projection {args.projection} is not in the files' projections "
                         f"{runs[0]['config']['projections']}")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), sharey=True)
    axes = [axes] if len(kinds) == 1 else axes
    for ax, kind in zip(axes, kinds):
        for run, estimator in zip(runs, estimators):
            cells = sorted((e for e in run["results"] if e["features"] == kind and e["projection"] == args.projection),
                           key=lambda e: e["budget"])
            seeds = run["config"]["seeds"]
            color, marker = STYLE.get(estimator, ("C7", "x"))
            ax.errorbar([e["budget"] for e in cells], [e["output_rel_error"]["mean"] for e in cells],
                        yerr=[e["output_rel_error"]["std"] / math.sqrt(seeds) for e in cells],
                        color=color, marker=marker, capsize=2, label=f"{estimator} keys")
        ax.axhline(0.30, color="0.6", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kind}, {args.projection}", fontsize=10)
        ax.set_xlabel("output features M")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative output error")
    axes[0].legend(fontsize=8)
    fig.suptitle(setting_label({**runs[0], "config": {**runs[0]["config"], "key_estimator": "plain"}}), fontsize=9)
    print(save_figure(fig, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
