"""Data-parallel training on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

``favor train`` is the same program on one process and on many::

    favor train --nproc 2 ...                                   # launches torchrun for you
    torchrun --nproc-per-node 2 -m favor train ...              # the same, by hand
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint host0:29500 --rdzv-id run1 -m favor train ...   # several machines

How a run is split (the trainer, :func:`favor.training.train`, has the hooks; this module fills them):

* :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: backend ``nccl`` with device
  ``cuda:LOCAL_RANK`` when CUDA is available, else ``gloo`` on the CPU.  Outside torchrun it
  returns a single-process context and starts nothing.
* Data: the batch of step s is a function of (seed, s) only (:func:`favor.data.corpus.get_batch`);
  rank r takes rows [r·b, (r+1)·b) of it, b = batch_size / world_size.  Ranks see disjoint
  slices and their union is the batch a single process would see, so without dropout a run's
  result does not depend on the number of processes (up to the order of floating-point sums).
  Dropout masks are drawn per rank from (seed, step, rank) (independent across ranks, exact on
  resume), so with dropout > 0 an N-process run matches a 1-process run in distribution only.
* Gradients: :func:`wrap_ddp` (``DistributedDataParallel``) averages them over ranks during
  ``backward``; every rank then clips and steps identically, so parameters stay equal.
* FAVOR projections are buffers.  They are drawn from (seed, layer) at construction and from
  (seed, step) at every redraw (:class:`favor.nn.ProjectionRedraw`), never from a rank's RNG, so
  ranks agree without communicating.  :func:`check_projections_agree` proves it at start-up
  (an ``all_gather`` of :func:`favor.nn.projection_fingerprint`), *before* DDP's initial broadcast
  would paper over a difference, and raises :class:`RankMismatchError` naming the ranks.
  DDP's per-forward buffer broadcast is switched off (``forward_sync_buffers=False``): it would
  cost a collective per step for tensors that are already equal, and would silently hide a rank
  that draws differently (e.g. another torch build on another machine).
* Only rank 0 writes checkpoints, metrics, plots and the progress bar; every rank reads the same
  checkpoint on ``--resume`` (multi-machine runs need the run folder on a shared file system).
  Checkpoints do not depend on the number of processes: one written by 2 processes resumes in 1,
  and vice versa.

FSDP is not offered: see the README section "Distributed training" for why.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .nn import projection_fingerprint

__all__ = [
    "BACKENDS",
    "DistContext",
    "RankMismatchError",
    "add_distributed_options",
    "check_projections_agree",
    "check_same_across_ranks",
    "choose_backend",
    "command_line",
    "data_parallel",
    "init_distributed",
    "launch",
    "parameter_fingerprint",
    "shutdown",
    "tensors_fingerprint",
    "torchrun_env",
    "wrap_ddp",
]

#: ``--backend`` choices; "auto": nccl when CUDA is available, else gloo.
BACKENDS = ("auto", "gloo", "nccl")
#: How long a collective may wait for the other ranks before the run fails (seconds).
DEFAULT_TIMEOUT_S = 600


class RankMismatchError(ValueError):
    """Ranks hold what must be identical on all of them (FAVOR projections, parameters, data).
    A ValueError, so that ``favor train`` reports it as one line on each rank and exits with 2."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes (1 outside torchrun).
        local_rank: rank on this machine (selects the CUDA device).
        backend: "gloo" or "nccl"; None when no process group was started (single process).
        device: where the model and the collectives' tensors live.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, plots and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group was started."""
        return self.backend is not None


def torchrun_env(environ: dict[str, str] | None = None) -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun's environment variables, or None
    when they are absent (not launched by torchrun).  ValueError on inconsistent values."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        out = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
               "local_rank": int(env.get("LOCAL_RANK", env["RANK"]))}
    except ValueError as exc:
        raise ValueError(f"torchrun environment RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r} is not integer") from exc
    if out["world_size"] < 1 or not 0 <= out["rank"] < out["world_size"] or out["local_rank"] < 0:
        raise ValueError(f"torchrun environment RANK={out['rank']} WORLD_SIZE={out['world_size']} "
                         f"LOCAL_RANK={out['local_rank']} is inconsistent")
    return out


def choose_backend(backend: str = "auto") -> str:
    """``"auto"`` -> ``"nccl"`` if CUDA is available, else ``"gloo"``; ``"nccl"`` needs CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, and torch.cuda.is_available() is False; use gloo")
    return backend


def init_distributed(backend: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     environ: dict[str, str] | None = None) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Without them (a plain ``favor train``) nothing is started and the context is single-process
    on the CPU (``backend`` must then be "auto").  With them: ``init_process_group(backend, init_method="env://")``; with nccl the
    device is ``cuda:LOCAL_RANK`` (made current), with gloo the CPU.  A collective that waits more
    than ``timeout_s`` for another rank fails instead of hanging.
    """
    where = torchrun_env(environ)
    if where is None:
        if backend != "auto":
            raise ValueError(f"--backend {backend} applies to processes started by torchrun (or --nproc N), "
                             "and this one was not")
        return DistContext()
    name = choose_backend(backend)
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this process")
    if name == "nccl":
        if where["local_rank"] >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={where['local_rank']} but this machine has "
                             f"{torch.cuda.device_count()} CUDA devices (nccl: one per process); start fewer "
                             "processes, or use --backend gloo")
        device = torch.device("cuda", where["local_rank"])
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(name, init_method="env://", rank=where["rank"], world_size=where["world_size"],
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(where["rank"], where["world_size"], where["local_rank"], name, device)


def shutdown(ctx: DistContext, *, synchronize: bool = False) -> None:
    """Leave the process group, if ``ctx`` started one.

    ``synchronize=True`` (for a rank that finished its work) first waits at a barrier, so that no
    rank tears its connections down while another is still in a collective or in its own
    teardown (gloo could then abort the slower rank: "terminate called without an active
    exception").  A rank that failed calls it without: it must be able to exit on its own
    (torchrun then stops the others)."""
    if ctx.distributed and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------- checks across ranks

def parameter_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) over the names and exact bytes of every parameter of ``model``."""
    return tensors_fingerprint(model.named_parameters())


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) over the names, shapes, dtypes and exact bytes of ``(name, tensor)`` pairs."""
    h = hashlib.sha256()
    for name, t in named:
        w = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype};".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def check_same_across_ranks(fingerprint: str, ctx: DistContext, *, what: str) -> None:
    """Raise :class:`RankMismatchError` on every rank unless all ranks passed the same
    ``fingerprint`` (a SHA-256 hex digest).  A collective: every rank must call it."""
    if not ctx.distributed:
        return
    digest = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8, device=ctx.device)  # (32,)
    gathered = [torch.empty_like(digest) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, digest)
    prints = [bytes(g.cpu().tolist()).hex() for g in gathered]
    differ = [r for r, p in enumerate(prints) if p != prints[0]]
    if differ:
        raise RankMismatchError(
            f"{what} differ across ranks: rank 0 has {prints[0][:16]}…, ranks {differ} have "
            f"{sorted({prints[r][:16] + '…' for r in differ})}; every rank must run the same command on the same "
            "data with the same favor and torch builds, and resume from the same checkpoint"
        )


def check_projections_agree(model: torch.nn.Module, ctx: DistContext) -> str:
    """Check that every FAVOR projection of ``model`` is bit-identical on all ranks; returns the
    fingerprint.  Call it before :func:`wrap_ddp` (DDP's initial broadcast would hide a
    difference) and whenever in doubt; a collective."""
    fp = projection_fingerprint(model)
    check_same_across_ranks(fp, ctx, what="FAVOR projections")
    return fp


# ------------------------------------------------------------------------- hooks for the trainer

def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` without per-forward buffer broadcasts (see the module
    docstring); ``model`` must already be on ``ctx.device``."""
    if not ctx.distributed:
        raise ValueError("wrap_ddp needs a process group; call init_distributed under torchrun first")
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def _reduce_mean(ctx: DistContext) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().to(ctx.device, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return (buf / ctx.world_size).to(t.device)

    return reduce_mean


def _sync_stop(ctx: DistContext) -> Callable[[bool], bool]:
    def sync_stop(requested: bool) -> bool:
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32, device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank asked to stop -> all stop
        return bool(flag.item())

    return sync_stop


def data_parallel(model: torch.nn.Module, ctx: DistContext, *, batch_size: int,
                  data_fingerprint: str | None = None) -> dict[str, Any]:
    """Prepare ``model`` for data-parallel training and return the keyword arguments of
    :func:`favor.training.train` (``forward``, ``rank``, ``world_size``, ``reduce_mean``,
    ``sync_stop``); ``{}`` for a single process.

    Checks that ``batch_size`` (global) divides among the ranks, that every rank loaded the same
    data (``data_fingerprint``, e.g. :meth:`favor.data.corpus.Corpus.fingerprint`, when given) and
    that the FAVOR projections agree: collectives, so no rank starts writing before all have
    started.  Then wraps ``model`` (already on ``ctx.device``) in DDP.
    """
    if not ctx.distributed:
        return {}
    if batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {batch_size} (global) must be a multiple of the {ctx.world_size} processes")
    if data_fingerprint is not None:
        check_same_across_ranks(data_fingerprint, ctx, what="training data (corpus fingerprints)")
    check_projections_agree(model, ctx)
    return {"forward": wrap_ddp(model, ctx), "rank": ctx.rank, "world_size": ctx.world_size,
            "reduce_mean": _reduce_mean(ctx), "sync_stop": _sync_stop(ctx)}


# ------------------------------------------------------------------------- the CLI side

def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--backend`` in their own group of ``parser`` (``favor train``)."""
    g = parser.add_argument_group("distributed (favor.distributed; or run under torchrun)")
    g.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine: launches torchrun --standalone "
                        "--nproc-per-node N with the same options (default: 1, no torchrun)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="process-group backend under torchrun: auto = nccl (one GPU per process) when CUDA "
                        "is available, else gloo on the CPU (default: auto)")
    parser.set_defaults(_parser=parser)


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, *, drop: tuple[str, ...] = ()) -> list[str]:
    """The options of ``parser`` that ``args`` holds with a non-default value, as a command line
    that parses back to the same namespace (dests in ``drop`` left out)."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in drop or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if action.default is not argparse.SUPPRESS and value == action.default:
            continue
        opt = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(opt if value else "--no-" + opt[2:])
        elif action.nargs == "?" and value == action.const:
            argv.append(opt)
        elif value is None:
            argv += [opt, "none"]
        else:
            argv += [opt, str(value)]
    return argv


def launch(command: list[str], nproc: int, *, torchrun_args: tuple[str, ...] = (),
           timeout_s: float | None = None) -> int:
    """Run ``python -m favor <command>`` under ``torchrun --standalone --nproc-per-node nproc`` and
    return its exit status.

    Ctrl-C is passed on to torchrun once; torchrun passes it to each worker, which saves a
    checkpoint at the end of its step and stops (status 130).  A second Ctrl-C, or ``timeout_s``
    running out (then TimeoutError), stops torchrun with SIGTERM, which it passes on to the workers.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if torchrun_env() is not None:
        raise ValueError("--nproc launches torchrun itself; under torchrun, leave it out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *torchrun_args, "-m", "favor", *command]
    # Own session, so that a terminal's Ctrl-C reaches this process only and torchrun gets it
    # exactly once, from here (torchrun starts each worker in a session of its own, too).
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interrupted = False
    while True:
        try:
            rc = proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            break
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise TimeoutError(f"torchrun ({' '.join(cmd)}) ran past {timeout_s} s; stopped it and its workers")
        except KeyboardInterrupt:
            if interrupted:
                _stop(proc)
                raise
            interrupted = True
            proc.send_signal(signal.SIGINT)
    return 130 if interrupted else rc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # torchrun sends SIGTERM to its workers and waits for them
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
