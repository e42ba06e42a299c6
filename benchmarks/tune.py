"""Choose the fused kernels' block size (favor.fused.BLOCK_ROWS) and the causal chunk size by
measurement: median wall time of favor_attention, fwd and fwd+bwd, for each setting; JSON out.

    python benchmarks/tune.py --L 4096 --json tune.json

Same shapes and threads as benchmarks/attention.py (B=1, H=8, d=Dv=64, M=256, float32, 2 threads).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import favor
from common import emit_json, favor_case, median_time
from favor import fused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the result here (default: print it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, q, k, v, up = favor_case(args.L)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    rows = []
    default_rows = fused.BLOCK_ROWS
    try:
        for causal in (False, True):
            for block, chunk in itertools.product(args.rows, args.chunks if causal else [args.chunks[0]]):
                fused.BLOCK_ROWS = block

                def fwd():
                    with torch.no_grad():
                        favor.favor_attention(q, k, v, w, is_causal=causal, chunk_size=chunk)

                def fwd_bwd():
                    favor.favor_attention(qg, kg, vg, w, is_causal=causal, chunk_size=chunk).backward(up)

                row = {"causal": causal, "rows": block, "chunk": chunk if causal else None,
                       "fwd_s": median_time(fwd, args.repeats), "fwd_bwd_s": median_time(fwd_bwd, args.repeats)}
                rows.append(row)
                print(f"causal={causal!s:5} rows={block:5d} chunk={chunk if causal else '-':>4} "
                      f"fwd {1e3 * row['fwd_s']:7.1f} ms  fwd+bwd {1e3 * row['fwd_bwd_s']:7.1f} ms",
                      file=sys.stderr, flush=True)
    finally:
        fused.BLOCK_ROWS = default_rows
    result = {"L": args.L, "threads": args.threads, "rows": rows}
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
