"""Where the time of one favor_attention case goes: torch.profiler's self-CPU time per operator
and input shape, as JSON (and a short table on stderr).

    python benchmarks/profile.py --L 16384 --causal --backward --json prof.json

Same shapes and threads as benchmarks/attention.py (B=1, H=8, d=Dv=64, M=256, float32, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import favor

B, H, D, DV, M = 1, 8, 64, 64, 256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="profile forward + backward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = favor.gaussian_orthogonal_matrix(M, D, generator=g)
    q, k, v, up = (torch.randn(B, H, args.L, D, generator=g) for _ in range(4))
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
    rows = [{"op": e.key, "shapes": str(e.input_shapes), "calls": e.count,
             "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]]
    for r in rows:
        print(f"{r['op']:<28} {r['self_ms']:9.1f} ms {100 * r['share']:5.1f}% {r['calls']:5d}  {r['shapes'][:80]}",
              file=sys.stderr)
    print(f"total self CPU {total / 1e3:.1f} ms", file=sys.stderr)
    result = {"L": args.L, "causal": args.causal, "backward": args.backward, "threads": args.threads,
              "total_self_ms": total / 1e3, "top": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
