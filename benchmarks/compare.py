"""Compare two sets of ``benchmarks/attention.py`` runs of one method (e.g. the code before and
after a change, run alternately so that machine noise hits both): per case, the median over runs of
each set's median time, and their ratio, as JSON (and a table on stderr).

    python benchmarks/compare.py --method favor \\
        --before benchmarks/results/workspace_ab/before_*.json \\
        --after benchmarks/results/workspace_ab/after_*.json \\
        --json benchmarks/results/workspace_ab/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from common import emit_json


def _times(paths: list[str], method: str) -> dict[tuple[str, str, int], list[float]]:
    """(direction, mode, L) -> median seconds of ``method`` in each run."""
    times: dict[tuple[str, str, int], list[float]] = {}
    for path in paths:
        with open(path) as f:
            cases = json.load(f)["cases"]
        for c in cases:
            if c["method"] == method and c.get("status") == "ok":
                times.setdefault((c["direction"], c["mode"], c["L"]), []).append(c["median_s"])
    return times


def compare(before: list[str], after: list[str], method: str) -> list[dict]:
    b, a = _times(before, method), _times(after, method)
    rows = []
    for key in sorted(set(b) & set(a)):
        mb, ma = statistics.median(b[key]), statistics.median(a[key])
        rows.append({"direction": key[0], "mode": key[1], "L": key[2], "before_ms": [1e3 * t for t in b[key]],
                     "after_ms": [1e3 * t for t in a[key]], "before_median_ms": 1e3 * mb,
                     "after_median_ms": 1e3 * ma, "speedup": mb / ma})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", nargs="+", required=True, help="attention.py JSON files of the old code")
    p.add_argument("--after", nargs="+", required=True, help="attention.py JSON files of the new code")
    p.add_argument("--method", default="favor")
    p.add_argument("--json", help="write the result here (default: print it)")
    args = p.parse_args(argv)
    rows = compare(args.before, args.after, args.method)
    if not rows:
        raise SystemExit(f"no case of method {args.method!r} is in both sets")
    for r in rows:
        print(f"{r['direction']:13s} {r['mode']:7s} L={r['L']:6d}  before {r['before_median_ms']:8.1f} ms"
              f"  after {r['after_median_ms']:8.1f} ms  speedup {r['speedup']:.2f}x", file=sys.stderr)
    emit_json({"command": "python " + " ".join(sys.argv), "method": args.method, "before": args.before,
               "after": args.after, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
