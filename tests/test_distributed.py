"""Data-parallel training (favor.distributed): 2 CPU processes with gloo on loopback.

* ``two_ranks``: tests/ddp_worker.py started twice with torchrun's environment variables (one
  launch shared by four tests): float64 gradients of one DDP step == one process on the global
  batch; parameters and projections identical on both ranks after 5 trainer steps with redraws;
  a rank that draws other projections is caught on every rank.
* ``favor train`` under real torchrun (:func:`favor.distributed.launch`): a 1-process checkpoint
  resumes in 2 processes, and a 2-process checkpoint resumes in 1; both end where a single
  process ends.
Every subprocess has a timeout and every collective a 60 s limit, so a broken run ends by itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from favor.checkpoint import load_checkpoint
from favor.cli import build_parser, main
from favor.data.corpus import get_batch, load_corpus
from favor.distributed import (
    DistContext,
    choose_backend,
    command_line,
    data_parallel,
    init_distributed,
    launch,
    torchrun_env,
    wrap_ddp,
)
from favor.models import PerformerConfig, PerformerLM
from favor.nn import ProjectionRedraw, projection_fingerprint

_spec = importlib.util.spec_from_file_location("ddp_worker", Path(__file__).with_name("ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT_S = 150  # per launch; a healthy one takes a few seconds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text folder: 30 files of pseudo-Python."""
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "value", "for", "in", "range", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(30):
        idx = torch.randint(0, len(words), (300,), generator=g).tolist()
        (root / f"m{i:02d}.py").write_text(" ".join(words[j] for j in idx) + "\n")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run tests/ddp_worker.py as ranks 0 and 1; returns its output folder and the two reports."""
    out = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if sys.platform == "linux":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(subprocess.Popen([sys.executable, str(Path(worker.__file__)), str(corpus), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# ----------------------------------------------------------------------------- 2 ranks, gloo

def test_gradients_of_one_step_equal_one_process_on_the_global_batch(two_ranks, corpus):
    out, reports = two_ranks
    assert [r["backend"] for r in reports] == ["gloo", "gloo"] and reports[1]["world_size"] == 2
    ddp_grads = load_file(str(out / "grads.safetensors"))
    model = worker.grad_model()
    g = worker.GRAD_BATCH
    x, y = get_batch(load_corpus(corpus).train, g["step"], seed=g["seed"], batch_size=g["batch_size"],
                     seq_len=g["seq_len"])  # the whole batch, one process
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(ddp_grads) == sorted(names)
    for name, p in model.named_parameters():
        assert ddp_grads[name].dtype == torch.float64
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)


def test_parameters_stay_identical_across_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["step"] == r1["step"] == worker.TRAIN["steps"]
    assert r0["parameters"] == r1["parameters"]
    assert r0["checkpoint"] is not None and r1["checkpoint"] is None  # rank 0 alone saves


def test_projections_agree_after_redraw_and_equal_a_single_process_redraw(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["initial_projections"] == r1["initial_projections"]
    assert r0["projections"] == r1["projections"] != r0["initial_projections"]
    # The last redraw of the 5-step run was at step 4, from (seed, 4): one process draws the same.
    seed = worker.TRAIN["seed"]
    model = PerformerLM(PerformerConfig(**worker.MODEL, seed=seed))
    assert ProjectionRedraw(model, worker.TRAIN["redraw_every"], seed).maybe_redraw(4)
    assert projection_fingerprint(model) == r0["projections"]


def test_a_rank_with_other_projections_fails_loudly_on_every_rank(two_ranks):
    _, reports = two_ranks
    for r in reports:
        assert r["mismatch_error"] is not None and "FAVOR projections differ across ranks" in r["mismatch_error"]
        assert "ranks [1]" in r["mismatch_error"]


# ----------------------------------------------------------------------------- favor train + torchrun

TINY = ["--batch-size", "4", "--seq-len", "16", "--d-model", "8", "--n-heads", "2", "--n-layers", "1",
        "--mlp-ratio", "2", "--nb-features", "4", "--eval-batches", "2", "--warmup-steps", "1",
        "--redraw-every", "3", "--no-progress"]


def _close(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a).weights, load_checkpoint(b).weights
    assert sorted(wa) == sorted(wb)
    for name in wa:  # equal up to the order of the gradient sums (AdamW, float32, a few steps)
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoints_resume_across_process_counts(corpus, tmp_path, capsys):
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    common = ["--data", str(corpus), "--threads", "1", *TINY]
    assert main(["train", *common, "--out", str(one), "--steps", "6", "--save-every", "2"]) == 0
    assert main(["train", *common, "--out", str(mixed), "--steps", "6", "--save-every", "2", "--stop-at", "2"]) == 0
    # 1 process wrote step 2; 2 processes resume it and write steps 4 and 6.
    rc = launch(["train", "--resume", str(mixed), "--steps", "6", "--threads", "1", "--no-progress"], 2,
                timeout_s=TIMEOUT_S)
    assert rc == 0
    assert (mixed / "step-0000004").is_dir() and load_checkpoint(mixed).step == 6
    _close(one / "step-0000006", mixed / "step-0000006")
    # 2 processes wrote step 4; 1 process resumes it.
    again = tmp_path / "again"
    assert main(["train", "--resume", str(mixed / "step-0000004"), "--out", str(again), "--steps", "6",
                 "--threads", "1", "--no-progress"]) == 0
    _close(one / "step-0000006", again / "step-0000006")
    records = [json.loads(line) for line in (mixed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # rank 0 alone logs


# ----------------------------------------------------------------------------- single process

def test_outside_torchrun_nothing_is_started():
    assert torchrun_env({}) is None
    ctx = init_distributed(environ={})
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed
    assert data_parallel(torch.nn.Linear(2, 2), ctx, batch_size=3) == {}
    with pytest.raises(ValueError, match="needs a process group"):
        wrap_ddp(torch.nn.Linear(2, 2), ctx)
    with pytest.raises(ValueError, match="--backend gloo applies to processes started by torchrun"):
        init_distributed("gloo", environ={})


def test_torchrun_environment_is_validated():
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == \
        {"rank": 1, "world_size": 2, "local_rank": 1}
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not integer"):
        torchrun_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_choice():
    assert choose_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert choose_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="'mpi'"):
        choose_backend("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            choose_backend("nccl")


def test_global_batch_must_divide_among_ranks():
    ctx = DistContext(rank=0, world_size=2, backend="gloo")
    with pytest.raises(ValueError, match="--batch-size 5 .* 2 processes"):
        data_parallel(torch.nn.Linear(2, 2), ctx, batch_size=5)


def _train_parser() -> argparse.ArgumentParser:
    return build_parser().parse_args(["train"])._parser


@pytest.mark.parametrize("argv", [
    [],
    ["--data", "x y", "--out", "r", "--steps", "7", "--lr", "0.001", "--no-rotary", "--progress", "--features", "none"],
    ["--resume", "--out", "r", "--nproc", "2", "--backend", "gloo", "--threads", "1"],
], ids=["defaults", "values-bools-none", "resume-without-path"])
def test_nproc_relaunches_the_same_command(argv):
    args = build_parser().parse_args(["train", *argv])
    again = build_parser().parse_args(["train", *command_line(_train_parser(), args, drop=("nproc",))])
    def options(ns: argparse.Namespace) -> dict:
        return {k: v for k, v in vars(ns).items() if k != "nproc" and not k.startswith("_")}

    assert options(again) == options(args) and len(options(args)) >= len(argv) // 2
    assert again.nproc == 1


def test_bad_nproc_is_a_one_line_error(capsys, monkeypatch):
    assert main(["train", "--nproc", "0"]) == 2
    assert "--nproc must be a positive integer, got 0" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2"]) == 2
    assert "under torchrun, leave it out" in capsys.readouterr().err
