"""Speed and memory of FAVOR+ attention against exact attention and the peers, on CPU (or CUDA).

    python benchmarks/attention.py --json out.json            # full sweep (~20 min on 2 cores)
    python benchmarks/attention.py --quick --json out.json    # smoke run (seconds)
    python benchmarks/plot.py out.json                        # figures for docs/benchmarks.md
    python benchmarks/attention.py --device cuda --dtype bfloat16 --methods favor sdpa --json gpu.json

On CUDA (``--device cuda``; untested so far: no session of this project has had a GPU yet) every
timed call ends with ``torch.cuda.synchronize()``, memory is the peak of
``torch.cuda.max_memory_allocated`` above what was allocated before the call, and the matmul
reference is an 8192³ GEMM in the same dtype.  ``--dtype bfloat16`` runs every method on bf16
inputs (favor accumulates its features and states in float32 regardless).

Cases are declarative (:func:`cases`): method × direction (bidirectional | causal) × mode
(fwd | fwd+bwd) × L.  Shapes B=1, H=8, d=Dv=64, M=256 features, float32, 2 threads.

Methods:
  favor               favor.favor_attention, positive features, m=256 orthogonal projections
  favor-generic       the unfused path favor uses for kinds without a fused kernel (and used for
                      all kinds before the fused kernels): feature_map, then
                      favor.linear.linear_attention / causal_linear_attention, autograd throughout
  favor-normalized    favor.favor_attention with key_estimator="normalized" (positive features,
  favor-calibrated    the same projections) / "calibrated": the generic path plus the per-key
                      normalisation (and tilt); not in the default run, ask with --methods
  sdpa                torch.nn.functional.scaled_dot_product_attention (exact; is_causal)
  performer-pytorch   performer_pytorch.FastAttention(nb_features=256) (causal: its CPU path)
  performer-pytorch+ft  the same, causal, with attn.causal_linear_fn set to its wrapper of
                      fast-transformers' CPU causal_product (see shared/PEERS.md)
  fast-transformers   CausalLinearAttention with its Favor feature map (n_dims=256 features)
Peers are optional extras: a method whose package is missing is reported "unavailable".

Measurements (full mode):
  time    median wall time over repeated runs (at least --min-repeats, up to 15 while they
          total under 2 s), after a warm-up run at the same size when one run is predicted
          to take under 2 s.  One process per (method, direction, mode) runs its L sweep in
          increasing order; the next L is skipped when the run time extrapolated from the last
          two sizes, times --min-repeats, would exceed --budget seconds, or would end after
          --max-minutes of the whole run.
  memory  peak extra resident memory, one fresh process per case, started with
          MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed blocks and RSS tracks live
          data: after inputs are built and a small warm-up ran, the kernel's peak-RSS counter is
          reset (``echo 5 > /proc/self/clear_refs``) and the case runs once; extra = VmHWM − VmRSS
          before the run.  Includes outputs and input gradients.
  FLOPs   nominal, counted once per algorithm: exact attention 4·L²·d per head (causal: half);
          linear attention 4·L·M·(d + Dv) per head (features of q and k, KᵀV, Q(KᵀV)); fwd+bwd
          = 3 × fwd.  GFLOP/s is compared with the fp32 matmul rate (2048³) measured in the run.
  decode  per-token time of favor.favor_attention_step with a state after `context` tokens, and
          of favor.models.PerformerLM.generate_stream (one layer) after a prompt of that length.
--quick runs favor and SDPA (and the peers that are installed) at two small sizes, all in one
process with the same peak-RSS reset (a smoke run for CI: no timing claims).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
from common import B, D, DV, H, M, emit_json
THREADS = 2
DEVICE = "cpu"
DTYPE = "float32"
DTYPES = ("float32", "bfloat16", "float16")
DIRECTIONS = ("bidirectional", "causal")
MODES = ("fwd", "fwd+bwd")
# in the order they run (the targets' methods first; the run may stop at --max-minutes)
METHODS = ("favor", "sdpa", "fast-transformers", "performer-pytorch", "performer-pytorch+ft", "favor-generic",
           "favor-normalized", "favor-calibrated")
#: what a run without --methods measures (the key-estimator variants are asked for by name)
DEFAULT_METHODS = METHODS[:6]
FULL_LENGTHS = tuple(2 ** p for p in range(9, 16))  # 512 … 32768
QUICK_LENGTHS = (64, 128)


def cases(methods, lengths):
    """All (method, direction, mode, L) to run; fast-transformers and +ft are causal only."""
    out = []
    for method in methods:
        for direction in DIRECTIONS:
            if method in ("fast-transformers", "performer-pytorch+ft") and direction != "causal":
                continue
            for mode in MODES:
                out.append({"method": method, "direction": direction, "mode": mode,
                            "lengths": list(lengths)})
    return out


# ------------------------------------------------------------------------------------------------
# methods: each builder returns fn(q, k, v) -> out on (B, H, L, d) tensors


def configure(threads: int, device: str, dtype: str) -> None:
    """Set the run's threads, device and dtype (in the main process and in every worker)."""
    global THREADS, DEVICE, DTYPE
    THREADS, DEVICE, DTYPE = threads, device, dtype
    torch.set_num_threads(threads)


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def available(method: str) -> bool:
    if DEVICE != "cpu" and method in ("fast-transformers", "performer-pytorch+ft"):
        return False  # their CUDA kernels are not part of this benchmark's set-up (shared/PEERS.md)
    try:
        if method.startswith("performer-pytorch"):
            import performer_pytorch  # noqa: F401
        if method.endswith("ft") or method == "fast-transformers":
            from fast_transformers.causal_product import causal_dot_product  # noqa: F401
    except ImportError:
        return False
    return True


def build(method: str, causal: bool):
    g = torch.Generator().manual_seed(0)
    if method == "favor":
        import favor

        w = favor.gaussian_orthogonal_matrix(M, D, generator=g).to(DEVICE)
        return lambda q, k, v: favor.favor_attention(q, k, v, w, is_causal=causal)
    if method in ("favor-normalized", "favor-calibrated"):  # positive features, self-normalised keys
        import favor

        w = favor.gaussian_orthogonal_matrix(M, D, generator=g).to(DEVICE)
        estimator = method.removeprefix("favor-")
        return lambda q, k, v: favor.favor_attention(q, k, v, w, is_causal=causal, key_estimator=estimator)
    if method == "favor-generic":
        import favor

        w = favor.gaussian_orthogonal_matrix(M, D, generator=g).to(DEVICE)
        root = D ** -0.25

        def generic(q, k, v):
            fq = favor.feature_map(q * root, w)
            fk = favor.feature_map(k * root, w)
            if causal:
                return favor.causal_linear_attention(fq.psi, fk.psi, v, fk.log_scale)[0]
            return favor.linear_attention(fq.psi, fk.psi, v, fk.log_scale)

        return generic
    if method == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method.startswith("performer-pytorch"):
        import performer_pytorch

        torch.manual_seed(0)
        attn = performer_pytorch.FastAttention(dim_heads=D, nb_features=M, causal=causal)
        if method.endswith("+ft"):
            attn.causal_linear_fn = performer_pytorch.performer_pytorch.causal_linear_attention
        return attn.to(DEVICE)
    if method == "fast-transformers":
        from fast_transformers.attention import CausalLinearAttention
        from fast_transformers.feature_maps import Favor
        from fast_transformers.masking import LengthMask, TriangularCausalMask

        torch.manual_seed(0)
        attn = CausalLinearAttention(D, feature_map=Favor.factory(n_dims=M))

        def run(q, k, v):
            L = q.shape[2]
            # its layout is (N, L, H, E)
            out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), TriangularCausalMask(L),
                       LengthMask(torch.full((B,), L, dtype=torch.long), max_len=L),
                       LengthMask(torch.full((B,), L, dtype=torch.long), max_len=L))
            return out.transpose(1, 2)

        return run
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def make_inputs(L: int, grad: bool, seed: int = 0):
    """q, k, v (B, H, L, d) and an upstream gradient, drawn on the CPU, on the run's device/dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, DTYPE)
    q, k, v, up = (torch.randn(B, H, L, n, generator=g).to(DEVICE, dtype) for n in (D, D, DV, DV))
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, up


def runner(fn, mode, q, k, v, up):
    """One measured call: forward (no grad) or forward + backward."""
    if mode == "fwd":
        def go():
            with torch.no_grad():
                fn(q, k, v)
            _sync()
    else:
        def go():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(up)
            _sync()
    return go


def flops(method: str, causal: bool, mode: str, L: int) -> float:
    """Nominal FLOPs (see the module docstring)."""
    if method == "sdpa":
        f = 4 * L * L * D * (0.5 if causal else 1.0)
    else:
        f = 4 * L * M * (D + DV)
    f *= B * H
    return 3 * f if mode == "fwd+bwd" else f


# ------------------------------------------------------------------------------------------------
# memory


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(method, direction, mode, L) -> float:
    """Peak extra MiB of one call (in this process: see the module docstring)."""
    causal = direction == "causal"
    fn = build(method, causal)
    runner(fn, mode, *make_inputs(64, mode == "fwd+bwd"))()  # load code paths
    q, k, v, up = make_inputs(L, mode == "fwd+bwd")
    go = runner(fn, mode, q, k, v, up)
    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        go()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    before = _status()["VmRSS"]
    reset_peak()
    go()
    return (_status()["VmHWM"] - before) / 1024


def memory_worker(spec: str) -> None:
    c = json.loads(spec)
    configure(c["threads"], c["device"], c["dtype"])
    print(json.dumps({"peak_extra_mib": measure_memory(c["method"], c["direction"], c["mode"], c["L"])}))


def memory_in_fresh_process(method, direction, mode, L) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    spec = json.dumps({"method": method, "direction": direction, "mode": mode, "L": L, "threads": THREADS,
                       "device": DEVICE, "dtype": DTYPE})
    res = subprocess.run([sys.executable, __file__, "--memory-worker", spec], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]


# ------------------------------------------------------------------------------------------------
# timing


def time_case(go, min_repeats: int, warm: bool, fill: float = 2.0) -> list[float]:
    """Run times of ``go``: one warm-up when ``warm``, then at least ``min_repeats`` runs and more
    (up to 15) while their total stays under ``fill`` seconds."""
    if warm:
        go()
    times: list[float] = []
    while len(times) < min_repeats or (sum(times) < fill and len(times) < 15):
        t0 = time.perf_counter()
        go()
        times.append(time.perf_counter() - t0)
    return times


def sweep_worker(spec: str) -> None:
    """Time one (method, direction, mode) over increasing L; prints a JSON list."""
    c = json.loads(spec)
    configure(c["threads"], c["device"], c["dtype"])
    causal = c["direction"] == "causal"
    fn = build(c["method"], causal)
    results, prev = [], []
    for L in c["lengths"]:
        row = {"method": c["method"], "direction": c["direction"], "mode": c["mode"], "L": L}
        if len(prev) >= 2 and prev[-2] > 0:
            predicted = prev[-1] * max(2.0, prev[-1] / prev[-2])
        elif prev:
            predicted = prev[-1] * 4.0
        else:
            predicted = 0.0
        if predicted * c["min_repeats"] > c["budget"]:
            row["status"] = f"skipped: predicted {predicted:.1f} s per run exceeds the budget"
        elif time.time() + predicted * c["min_repeats"] > c["deadline"]:
            row["status"] = "skipped: the run's --max-minutes was reached"
        if "status" in row:
            results.append(row)
            prev.append(predicted)
            continue
        go = runner(fn, c["mode"], *make_inputs(L, c["mode"] == "fwd+bwd"))
        # warm up at this size unless a run is long (then first-call costs are negligible)
        times = time_case(go, c["min_repeats"], warm=predicted < 2.0)
        med = statistics.median(times)
        prev.append(med)
        f = flops(c["method"], causal, c["mode"], L)
        row.update(status="ok", median_s=med, times_s=times, gflop=f / 1e9, gflops=f / med / 1e9)
        results.append(row)
        print(f"# {c['method']:>20} {c['direction']:>13} {c['mode']:>7} L={L:6d} {med * 1e3:9.1f} ms",
              file=sys.stderr, flush=True)
    print(json.dumps(results))


def matmul_rate(n: int = 2048, repeats: int = 7) -> float:
    """GFLOP/s of an n³ GEMM on the run's device and dtype (median of ``repeats``)."""
    a, b = (torch.randn(n, n).to(DEVICE, getattr(torch, DTYPE)) for _ in range(2))

    def go():
        a @ b
        _sync()

    # at least one timed run, more (up to ``repeats``) while they total under 5 s: a bf16 GEMM on
    # a CPU without bf16 units is slow
    times = time_case(go, 1, warm=True, fill=5.0)[:repeats]
    return 2 * n ** 3 / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------------
# decoding


def decoding(contexts, steps: int) -> list[dict]:
    """Per-token decoding time after each context length, median over ``steps`` tokens.

    The contexts are measured round-robin (one step of each in turn), so that a slow phase of a
    shared machine hits every context alike instead of biasing one of them."""
    import favor

    rows = []
    g = torch.Generator().manual_seed(0)
    w = favor.gaussian_orthogonal_matrix(M, D, generator=g).to(DEVICE)
    states = {}
    with torch.no_grad():
        for ctx in contexts:
            q, k, v, _ = make_inputs(ctx, False)
            _, states[ctx] = favor.favor_attention(q, k, v, w, is_causal=True, return_state=True)
        toks = [make_inputs(1, False, seed=1000 + i)[:3] for i in range(steps + 1)]
        times = {ctx: [] for ctx in contexts}
        for qt, kt, vt in toks:
            for ctx in contexts:
                t0 = time.perf_counter()
                _, states[ctx] = favor.favor_attention_step(qt, kt, vt, w, states[ctx])
                _sync()
                times[ctx].append(time.perf_counter() - t0)
    for ctx in contexts:
        rows.append({"method": "favor_attention_step", "context": ctx, "per_token_s": statistics.median(times[ctx][1:])})
    try:
        from favor.models import PerformerConfig, PerformerLM
    except ImportError:
        return rows
    streams, times, last = {}, {ctx: [] for ctx in contexts}, {}
    for ctx in contexts:
        cfg = PerformerConfig(vocab_size=256, d_model=H * D, n_heads=H, n_layers=1, max_len=ctx + steps + 2,
                              nb_features=M, chunk_size=64)
        torch.manual_seed(0)
        model = PerformerLM(cfg).to(DEVICE).eval()
        prompt = torch.randint(0, 256, (B, ctx), generator=g).to(DEVICE)
        streams[ctx] = model.generate_stream(prompt, steps + 1, temperature=0.0)
        next(streams[ctx])  # the prompt pass and the first token
    for _ in range(steps):
        for ctx in contexts:
            t0 = time.perf_counter()
            next(streams[ctx])
            _sync()
            times[ctx].append(time.perf_counter() - t0)
    for ctx in contexts:
        rows.append({"method": "PerformerLM.generate_stream (1 layer, d_model=512)", "context": ctx,
                     "per_token_s": statistics.median(times[ctx])})
    return rows


# ------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, "torch": torch.__version__,
            "python": platform.python_version(), "gpu": torch.cuda.is_available(), "gpu_name": gpu,
            "device": DEVICE}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=False, help="write results here (else stdout)")
    p.add_argument("--quick", action="store_true", help="small smoke sweep in one process")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    p.add_argument("--lengths", nargs="+", type=int, help="override the L sweep")
    p.add_argument("--budget", type=float, default=45.0,
                   help="full mode: skip a case whose min-repeats runs would take longer (seconds)")
    p.add_argument("--max-minutes", type=float, default=22.0,
                   help="full mode: skip what would end after this many minutes (whole run)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of q, k, v for every method")
    p.add_argument("--decode-steps", type=int, default=64, help="decoding steps per context (0: skip decoding)")
    p.add_argument("--decoding-into", metavar="FILE",
                   help="measure decoding only and replace the decoding rows of the result JSON FILE")
    p.add_argument("--sweep-worker", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sweep_worker:
        sweep_worker(args.sweep_worker)
        return 0
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.decode_steps < 0 or (args.decode_steps == 0 and args.decoding_into):
        raise SystemExit(f"--decode-steps must be >= 0 (>= 1 with --decoding-into), got {args.decode_steps}")
    configure(args.threads, args.device, args.dtype)
    if args.decoding_into:
        with open(args.decoding_into) as f:
            result = json.load(f)
        result["decoding"] = decoding((1024, 4096, 16384), args.decode_steps)
        result["decoding_command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
        result["decoding_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(args.decoding_into, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        return 0
    methods = [m for m in args.methods if available(m)]
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "shape": {"B": B, "H": H, "d": D, "Dv": DV, "M": M, "dtype": DTYPE},
        "quick": args.quick,
        "unavailable": [m for m in args.methods if m not in methods],
        # the reference GEMM: 8192³ on a GPU, 2048³ on a CPU (1024³ for bf16/fp16, which CPUs without
        # bf16 units run at ~1 GFLOP/s)
        "matmul_gflops": matmul_rate(1024 if args.quick or (DEVICE == "cpu" and DTYPE != "float32") else
                                     8192 if DEVICE != "cpu" else 2048, 3 if args.quick else 7),
        "memory_method": ("torch.cuda.max_memory_allocated above the allocation before the call"
                          + ("" if args.quick else ", fresh process per case") if DEVICE != "cpu" else
                          "in-process, VmHWM reset via /proc/self/clear_refs" if args.quick else
                          "fresh process per case, MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset"),
        "cases": [],
    }
    deadline = time.time() + 60 * args.max_minutes  # the sweeps' clock starts after the reference GEMM
    for c in cases(methods, lengths):
        if args.quick:
            fn = build(c["method"], c["direction"] == "causal")
            for L in lengths:
                go = runner(fn, c["mode"], *make_inputs(L, c["mode"] == "fwd+bwd"))
                times = time_case(go, 2, warm=True, fill=0.0)
                med = statistics.median(times)
                f = flops(c["method"], c["direction"] == "causal", c["mode"], L)
                mem = measure_memory(c["method"], c["direction"], c["mode"], L)
                result["cases"].append({"method": c["method"], "direction": c["direction"], "mode": c["mode"],
                                        "L": L, "status": "ok", "median_s": med, "times_s": times,
                                        "gflop": f / 1e9, "gflops": f / med / 1e9, "peak_extra_mib": mem})
            continue
        spec = json.dumps(dict(c, budget=args.budget, min_repeats=args.min_repeats, deadline=deadline,
                               threads=THREADS, device=DEVICE, dtype=DTYPE))
        res = subprocess.run([sys.executable, __file__, "--sweep-worker", spec], capture_output=True,
                             text=True)
        sys.stderr.write(res.stderr)
        res.check_returncode()
        for row in json.loads(res.stdout.strip().splitlines()[-1]):
            if row["status"] == "ok" and time.time() + 2 * row["median_s"] + 5 > deadline:
                row["peak_extra_mib"] = float("nan")
                row["memory_status"] = "skipped: the run's --max-minutes was reached"
            elif row["status"] == "ok":
                row["peak_extra_mib"] = memory_in_fresh_process(row["method"], row["direction"],
                                                                row["mode"], row["L"])
            result["cases"].append(row)
    for row in result["cases"]:
        if row["status"] == "ok":
            row["fraction_of_matmul"] = row["gflops"] / result["matmul_gflops"]
    contexts = (16, 32) if args.quick else (1024, 4096, 16384)
    steps = 5 if args.quick else args.decode_steps
    result["decoding"] = decoding(contexts, steps) if steps else []
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
