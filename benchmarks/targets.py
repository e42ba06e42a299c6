"""Check a benchmarks/attention.py JSON against the speed and memory targets of the issue and
print a markdown table (target, measured figure, met or missed).

    python benchmarks/targets.py out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

DIRS = ("bidirectional", "causal")
MODES = ("fwd", "fwd+bwd")


def get(cases, method, direction, mode, L, key="median_s"):
    for c in cases:
        if (c["method"], c["direction"], c["mode"], c["L"]) == (method, direction, mode, L) and c["status"] == "ok":
            value = c.get(key)
            return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, spec=".1f", suffix=""):
    return "not measured" if x is None else f"{x:{spec}}{suffix}"


def rows(result: dict) -> list[tuple[str, str, bool | None]]:
    cases = result["cases"]
    out: list[tuple[str, str, bool | None]] = []

    def speedup(direction, peer, need, L=16384):
        r = ratio(get(cases, peer, direction, "fwd+bwd", L), get(cases, "favor", direction, "fwd+bwd", L))
        out.append((f"{direction} fwd+bwd, L={L}: ≥ {need}× faster than {peer}", fmt(r, ".1f", "×"),
                    None if r is None else r >= need))

    speedup("bidirectional", "sdpa", 30)
    speedup("bidirectional", "performer-pytorch", 4)
    speedup("causal", "sdpa", 12)
    speedup("causal", "fast-transformers", 5)

    for direction in DIRS:
        for mode in MODES:
            Ls = sorted({c["L"] for c in cases if c["L"] >= 1024})
            pairs = [(L, get(cases, "sdpa", direction, mode, L), get(cases, "favor", direction, mode, L)) for L in Ls]
            pairs = [(L, s, f) for L, s, f in pairs if s is not None and f is not None]
            slower = [L for L, s, f in pairs if f >= s]
            text = ("no common L" if not pairs else
                    ", ".join(f"{L}: {s / f:.1f}×" for L, s, f in pairs))
            out.append((f"faster than SDPA from L=1024 up, {direction} {mode}", text,
                        None if not pairs else not slower))

    for direction in DIRS:
        for mode in MODES:
            r = ratio(get(cases, "favor", direction, mode, 16384), get(cases, "favor", direction, mode, 4096))
            out.append((f"linear time, {direction} {mode}: t(16384)/t(4096) ≤ 4.4", fmt(r, ".2f"),
                        None if r is None else r <= 4.4))
        r = ratio(get(cases, "favor", direction, "fwd+bwd", 16384, "peak_extra_mib"),
                  get(cases, "favor", direction, "fwd+bwd", 4096, "peak_extra_mib"))
        out.append((f"linear memory, {direction} fwd+bwd: mem(16384)/mem(4096) ≤ 4.4", fmt(r, ".2f"),
                    None if r is None else r <= 4.4))

    for direction in DIRS:
        f = get(cases, "favor", direction, "fwd+bwd", 16384, "peak_extra_mib")
        s = get(cases, "sdpa", direction, "fwd+bwd", 16384, "peak_extra_mib")
        r = ratio(f, s)
        out.append((f"{direction} fwd+bwd L=16384: peak extra memory ≤ 2× SDPA's",
                    "not measured" if r is None else f"{f:.0f} MiB vs {s:.0f} MiB ({r:.2f}×)",
                    None if r is None else r <= 2))

    for direction in DIRS:
        for mode in MODES:
            fr = [(c["L"], c["fraction_of_matmul"]) for c in cases if c["method"] == "favor"
                  and c["direction"] == direction and c["mode"] == mode and c["status"] == "ok" and c["L"] >= 8192]
            text = ", ".join(f"{L}: {100 * x:.0f}%" for L, x in sorted(fr)) or "not measured"
            out.append((f"≥ 50% of the fp32 matmul rate at L ≥ 8192, {direction} {mode}", text,
                        None if not fr else all(x >= 0.5 for _, x in fr)))

    by = {}
    for row in result.get("decoding", []):
        by.setdefault(row["method"], {})[row["context"]] = row["per_token_s"]
    for method, d in by.items():
        r = ratio(d.get(16384), d.get(1024))
        text = "not measured" if r is None else f"{1e3 * d[1024]:.2f} ms → {1e3 * d[16384]:.2f} ms ({r:.2f}×)"
        out.append((f"decoding per token, context 16384 vs 1024 ≤ 1.2×: {method}", text,
                    None if r is None else r <= 1.2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    args = p.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    print("| target | measured | met |")
    print("|---|---|---|")
    for target, measured, ok in rows(result):
        print(f"| {target} | {measured} | {'n/a' if ok is None else ('yes' if ok else '**no**')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
