"""One rank of the 2-process checks in tests/test_distributed.py (not a test module itself).

Started twice by the test with torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT); gloo on loopback.  Usage: ``ddp_worker.py CORPUS OUT``.
Writes ``OUT/rank<r>.json`` and, on rank 0, ``OUT/grads.safetensors`` (the float64 gradients of
one DDP step).  Every collective times out after 60 s, so a broken run ends by itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from favor.data.corpus import get_batch, load_corpus
from favor.distributed import (
    RankMismatchError,
    check_projections_agree,
    check_same_across_ranks,
    data_parallel,
    init_distributed,
    parameter_fingerprint,
    shutdown,
    tensors_fingerprint,
    wrap_ddp,
)
from favor.models import PerformerConfig, PerformerLM
from favor.nn import projection_fingerprint
from favor.training import TrainConfig, describe_run, make_optimizer, train

# Shared with the test (which imports this module): the model, the gradient batch, the trainer run.
MODEL = dict(vocab_size=256, d_model=12, n_heads=2, n_layers=2, mlp_ratio=2.0, nb_features=5, max_len=64)
GRAD_BATCH = dict(step=3, seed=7, batch_size=6, seq_len=13)
TRAIN = dict(steps=5, batch_size=4, seq_len=16, warmup_steps=1, eval_every=5, eval_batches=2, save_every=5,
             redraw_every=2, seed=3)


def grad_model() -> PerformerLM:
    torch.manual_seed(0)
    return PerformerLM(PerformerConfig(**MODEL)).double()


def main(corpus_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    ctx = init_distributed("gloo", timeout_s=60)
    try:
        corpus = load_corpus(corpus_dir)
        report: dict = {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend}

        # 1. One DDP step in float64 on this rank's slice of the global batch.
        model = grad_model()
        ddp = wrap_ddp(model, ctx)
        g = GRAD_BATCH
        x, y = get_batch(corpus.train, g["step"], seed=g["seed"], batch_size=g["batch_size"], seq_len=g["seq_len"],
                         rank=ctx.rank, world_size=ctx.world_size)
        F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        check_same_across_ranks(tensors_fingerprint(grads.items()), ctx, what="gradients after all-reduce")
        if ctx.is_main:
            save_file(grads, str(out / "grads.safetensors"))

        # 2. The trainer, several steps with projection redraws, through data_parallel's hooks.
        tcfg = TrainConfig(**TRAIN)
        torch.manual_seed(tcfg.seed)
        model = PerformerLM(PerformerConfig(**MODEL, seed=tcfg.seed))
        report["initial_projections"] = projection_fingerprint(model)
        optimizer = make_optimizer(model, tcfg)
        result = train(model, optimizer, corpus, tcfg, out_dir=out / "run", progress=False,
                       checkpoint_config=describe_run(PerformerConfig(**MODEL, seed=tcfg.seed).to_dict(), tcfg, corpus),
                       **data_parallel(model, ctx, batch_size=tcfg.batch_size))
        report["step"] = result.step
        report["parameters"] = parameter_fingerprint(model)
        report["projections"] = check_projections_agree(model, ctx)
        report["checkpoint"] = None if result.checkpoint is None else str(result.checkpoint)

        # 3. A rank that draws differently is caught, on every rank.
        if ctx.rank == 1:
            model.redraw_projections_(torch.Generator().manual_seed(12345))
        try:
            check_projections_agree(model, ctx)
            report["mismatch_error"] = None
        except RankMismatchError as exc:
            report["mismatch_error"] = str(exc)
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    except BaseException:
        shutdown(ctx)
        raise
    shutdown(ctx, synchronize=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
