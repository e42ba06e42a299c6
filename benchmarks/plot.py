"""Plot a benchmarks/attention.py JSON: time and peak extra memory against L (log–log), and a
markdown table of the results.

    python benchmarks/plot.py out.json --out docs/figures --table
writes docs/figures/benchmark_time.png and docs/figures/benchmark_memory.png, and prints the
markdown tables (time and memory per method × L, ratios at L=16384) to stdout with --table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"favor": ("C0", "o"), "favor-generic": ("C7", "x"), "sdpa": ("C3", "s"), "performer-pytorch": ("C1", "^"),
         "performer-pytorch+ft": ("C4", "v"), "fast-transformers": ("C2", "D"),
         "favor-normalized": ("C8", "P"), "favor-calibrated": ("C9", "*")}
PANELS = [(d, m) for d in ("bidirectional", "causal") for m in ("fwd", "fwd+bwd")]


def series(cases, method, direction, mode, key):
    rows = sorted((c for c in cases if c["method"] == method and c["direction"] == direction
                   and c["mode"] == mode and c["status"] == "ok"), key=lambda c: c["L"])
    return [c["L"] for c in rows], [c[key] for c in rows]


def plot(result: dict, key: str, ylabel: str, path: str) -> None:
    cases = result["cases"]
    methods = sorted({c["method"] for c in cases}, key=list(STYLE).index)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), sharey=True)
    for ax, (direction, mode) in zip(axes, PANELS):
        for method in methods:
            xs, ys = series(cases, method, direction, mode, key)
            if xs:
                color, marker = STYLE[method]
                ax.loglog(xs, ys, marker=marker, color=color, label=method)
        ax.set_title(f"{direction}, {mode}")
        ax.set_xlabel("sequence length L")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    # one legend for the figure: a method may be absent from some panels (fast-transformers is
    # causal only), so no single panel's legend lists them all
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = [mth for mth in methods if mth in handles]
    fig.legend([handles[mth] for mth in order], order, loc="lower center", ncol=len(order), fontsize=8,
               frameon=False)
    m = result["machine"]
    where = (f"{m['gpu_name']}" if m.get("device", "cpu") != "cpu" else f"{m['threads']} threads on {m['cpu']}")
    fig.suptitle(f"B=1, H=8, d=64, M=256, {result['shape']['dtype']}, {where} "
                 f"(matmul {result['matmul_gflops']:.0f} GFLOP/s); {result['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    cases = result["cases"]
    lengths = sorted({c["L"] for c in cases})
    methods = sorted({c["method"] for c in cases}, key=list(STYLE).index)
    lines = []
    for direction, mode in PANELS:
        lines.append(f"\n**{direction}, {mode}** — median time / peak extra MiB / % of matmul rate\n")
        lines.append("| method | " + " | ".join(str(L) for L in lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        for method in methods:
            cells = []
            for L in lengths:
                c = next((c for c in cases if c["method"] == method and c["direction"] == direction
                          and c["mode"] == mode and c["L"] == L), None)
                if c is None:
                    cells.append("")
                elif c["status"] != "ok":
                    cells.append("skip")
                else:
                    t = c["median_s"]
                    ts = f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s"
                    cells.append(f"{ts} / {c['peak_extra_mib']:.0f} / {100 * c['fraction_of_matmul']:.0f}%")
            if any(cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--out", default="docs/figures", help="folder for the PNGs")
    p.add_argument("--table", action="store_true", help="print markdown tables")
    args = p.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    plot(result, "median_s", "median wall time (s)", os.path.join(args.out, "benchmark_time.png"))
    plot(result, "peak_extra_mib", "peak extra memory (MiB)", os.path.join(args.out, "benchmark_memory.png"))
    if args.table:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
