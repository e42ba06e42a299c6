"""Where the time of one favor_attention case goes: torch.profiler's self-CPU time per operator
and input shape, as JSON (and a short table on stderr).

    python benchmarks/gemm_profile.py --L 16384 --causal --backward --json prof.json

The JSON also splits the time into GEMMs (mm/bmm/baddbmm) and everything else, and gives each
GEMM shape's rate inside the kernel next to the rate of the same GEMM run alone on fresh
contiguous operands (median of 15) and the 2048³ matmul rate: what the GEMMs could do here, and
how much of the time is not GEMM at all.

Same shapes and threads as benchmarks/attention.py (B=1, H=8, d=Dv=64, M=256, float32, 2 threads).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import favor
from common import emit_json, favor_case, median_time


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm_", "aten::baddbmm")


def _gemm_dims(op: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(batch, m, k, n) of a GEMM event from its input shapes, or None."""
    try:
        if op == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 1, m, k, n
        if op == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return b, m, k, n
        (b, m, k), (_, _, n) = shapes[1], shapes[2]  # baddbmm(self, batch1, batch2)
        return b, m, k, n
    except (ValueError, IndexError):
        return None


def gemm_rates(events) -> list[dict]:
    """Every GEMM event group: calls, self time, GFLOP/s in the kernel and alone."""
    out = []
    for e in events:
        if e.key not in GEMM_OPS:
            continue
        dims = _gemm_dims(e.key, e.input_shapes)
        if dims is None:
            continue
        b, m, k, n = dims
        flops = 2.0 * b * m * k * n
        a, c = torch.randn(b, m, k), torch.randn(b, k, n)
        alone = median_time(lambda: torch.bmm(a, c), 15)
        self_s = e.self_cpu_time_total / 1e6
        out.append({"op": e.key, "shapes": [b, m, k, n], "calls": e.count, "self_ms": self_s * 1e3,
                    "kernel_gflops": flops * e.count / self_s / 1e9, "alone_gflops": flops / alone / 1e9})
    return sorted(out, key=lambda g: -g["self_ms"])


def matmul_rate(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, 7) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="profile forward + backward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", help="write the result here (default: print it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, q, k, v, up = favor_case(args.L)
    for t in (q, k, v):
        t.requires_grad_(args.backward)

    def run():
        if args.backward:
            favor.favor_attention(q, k, v, w, is_causal=args.causal).backward(up)
        else:
            with torch.no_grad():
                favor.favor_attention(q, k, v, w, is_causal=args.causal)

    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    gemms = gemm_rates(events)
    rows = [{"op": e.key, "shapes": str(e.input_shapes), "calls": e.count,
             "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]]
    for r in rows:
        print(f"{r['op']:<28} {r['self_ms']:9.1f} ms {100 * r['share']:5.1f}% {r['calls']:5d}  {r['shapes'][:80]}",
              file=sys.stderr)
    print(f"total self CPU {total / 1e3:.1f} ms", file=sys.stderr)
    gemm_ms = sum(g["self_ms"] for g in gemms)
    square = matmul_rate()
    print(f"GEMMs {gemm_ms:.1f} ms ({100 * gemm_ms * 1e3 / total:.0f}% of self CPU); 2048^3 matmul "
          f"{square:.0f} GFLOP/s", file=sys.stderr)
    for g in gemms:
        print(f"  {g['op']:<16} {g['calls']:4d}x {str(g['shapes'])[:60]:<60} in kernel {g['kernel_gflops']:6.1f}"
              f"  alone {g['alone_gflops']:6.1f} GFLOP/s", file=sys.stderr)
    result = {"L": args.L, "causal": args.causal, "backward": args.backward, "threads": args.threads,
              "total_self_ms": total / 1e3, "gemm_self_ms": gemm_ms, "gemm_share": gemm_ms * 1e3 / total,
              "matmul_2048_gflops": square, "gemms": gemms, "top": rows}
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
