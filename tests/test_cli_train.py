"""``favor train`` / ``favor generate`` end to end on tiny models: resume (exact), SIGKILL during a
save, Ctrl-C, and one-line errors for bad inputs.  Most runs are in-process (``favor.cli.main``);
only the signal tests start a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from favor.checkpoint import PAUSE_ENV, load_checkpoint
from favor.cli import main

TINY = ["--batch-size", "2", "--seq-len", "16", "--d-model", "8", "--n-heads", "2", "--n-layers", "1",
        "--mlp-ratio", "2", "--nb-features", "4", "--eval-batches", "1", "--warmup-steps", "1",
        "--threads", "1", "--no-progress"]


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


def _train(*args: str) -> int:
    return main(["train", *TINY, *map(str, args)])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).weights


def _one_line_error(capsys, rc: int, command: str, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"favor {command}: error:") and fragment in err, err


def test_train_resume_generate(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--data", corpus, "--out", run, "--steps", "3", "--eval-every", "2", "--save-every", "2") == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {run / 'step-0000003'}" in out and f"loss curve: {run / 'loss.png'}" in out
    assert "bits per byte" in out
    assert {p.name for p in run.iterdir()} >= {"LATEST", "step-0000002", "step-0000003", "metrics.jsonl",
                                                "loss.png", "summary.json"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bits" in r] == [0, 2, 3]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]

    assert main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
    assert load_checkpoint(run).step == 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5 and summary["val_bits_per_byte"] > 0
    capsys.readouterr()

    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "12",
                 "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and 4 < len(text) <= 4 + 12 + 1
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "12",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out == text  # the seed fixes the sample


def test_resume_is_bit_identical_to_a_straight_run(corpus, tmp_path, capsys):
    common = ["--data", corpus, "--steps", "6", "--dropout", "0.1", "--redraw-every", "2", "--eval-every", "3",
              "--save-every", "4"]
    assert _train(*common, "--out", tmp_path / "straight") == 0
    assert _train(*common, "--out", tmp_path / "split", "--stop-at", "3") == 0
    assert load_checkpoint(tmp_path / "split").step == 3
    assert main(["train", "--resume", str(tmp_path / "split"), "--no-progress", "--threads", "1"]) == 0
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a.step == b.step == 6
    for name, t in a.weights.items():
        assert torch.equal(t, b.weights[name]), name
    for name, t in a.optimizer_tensors.items():
        assert torch.equal(t, b.optimizer_tensors[name]), name
    losses = [[r["train_loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if "train_loss" in r] for d in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the subprocess")
        time.sleep(0.05)


def _favor(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "favor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_sigkill_during_save_keeps_the_previous_checkpoint(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--data", corpus, "--out", run, "--steps", "2", "--save-every", "2", "--eval-every", "2") == 0
    before = _weights(run)
    proc = _favor("train", "--resume", str(run), "--steps", "4", "--threads", "1", "--no-progress",
                  env={PAUSE_ENV: "120"})
    _wait_for(lambda: any(run.glob(".tmp-step-0000004-*/model.safetensors")), proc)
    proc.kill()  # SIGKILL in the middle of the save
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert (run / "LATEST").read_text().strip() == "step-0000002"
    ckpt = load_checkpoint(run)
    assert ckpt.step == 2
    for name, t in before.items():
        assert torch.equal(t, ckpt.weights[name]), name
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress", "--threads", "1"]) == 0
    assert load_checkpoint(run).step == 4
    assert not list(run.glob(".tmp-*"))  # the dead save's leftovers are gone
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == [1, 2, 3, 4]  # records of the killed run past step 2 were dropped


def test_sigint_saves_and_exits_130(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _favor("train", *TINY, "--data", str(corpus), "--out", str(run), "--steps", "100000",
                  "--save-every", "100000", "--eval-every", "100000")
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and "train_loss" in metrics.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err
    ckpt = load_checkpoint(run)
    assert f"checkpoint: {ckpt.path}" in out
    last = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train_loss" in line][-1]
    assert ckpt.step == last >= 1
    # eval-every 100000: the only validation was step 0's, and that is the step printed
    assert "bits per byte at step 0" in out
    assert json.loads((run / "summary.json").read_text())["val_step"] == 0


FASTA = "".join(f">sp|Q{i}|P{i}\n" + "MKTAYIAKQRQISFVKSHFSRQ"[i % 5:] * 3 + "\n" for i in range(40))


def test_fasta_training_reports_bits_per_token_and_generates_residues(tmp_path, capsys):
    data = tmp_path / "prot.fasta"
    data.write_text(FASTA)
    assert _train("--data", data, "--out", tmp_path / "run", "--steps", "2", "--eval-every", "2") == 0
    assert "bits per token" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run").config["tokenizer"] == "protein"
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "MK", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("MK") and set(text) <= set("ACDEFGHIKLMNPQRSTVWYXBZUO")


def test_init_from_softmax_checkpoint_into_favor(corpus, tmp_path, capsys):
    assert _train("--data", corpus, "--out", tmp_path / "soft", "--attention", "softmax", "--steps", "2") == 0
    # A vanishing learning rate: the favor model's parameters stay the softmax model's.
    assert main(["train", "--data", str(corpus), "--init-from", str(tmp_path / "soft"), "--attention", "favor",
                 "--out", str(tmp_path / "fav"), "--steps", "1", "--lr", "1e-12", "--no-progress",
                 "--threads", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]) == 0
    assert "kept this model's own" in capsys.readouterr().err
    soft, fav = load_checkpoint(tmp_path / "soft"), load_checkpoint(tmp_path / "fav")
    assert fav.config["model"]["attention"] == "favor" and fav.config["model"]["d_model"] == 8
    for name, t in soft.weights.items():
        torch.testing.assert_close(fav.weights[name], t, rtol=0, atol=1e-9)
    assert any(n.endswith("projection") for n in set(fav.weights) - set(soft.weights))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert _train("--data", corpus, "--out", run, "--steps", "1") == 0
    return run


def test_missing_checkpoint(capsys, tmp_path):
    rc = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    _one_line_error(capsys, rc, "generate", "does not exist")


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    weights = load_checkpoint(copy).path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    rc = main(["generate", "--checkpoint", str(copy), "--prompt", "x"])
    _one_line_error(capsys, rc, "generate", "is corrupt")
    rc = main(["train", "--resume", str(copy), "--no-progress"])
    _one_line_error(capsys, rc, "train", "is corrupt")


@pytest.mark.parametrize(
    "content, fragment",
    [
        pytest.param(b"", "is empty", id="empty-file"),
        pytest.param(b"\x7fELF\x02\x01\x01\x00\x00\x00", "looks binary", id="binary-file"),
        pytest.param(b">rec1\nMKT\n>rec2\nMKJLA\n", "invalid residue 'J' at position 3 of FASTA record 'rec2'",
                     id="invalid-fasta-residue"),
    ],
)
def test_bad_data(tmp_path, capsys, content, fragment):
    path = tmp_path / ("data.fa" if content.startswith(b">") else "data.bin")
    path.write_bytes(content)
    rc = _train("--data", path, "--out", tmp_path / "run", "--steps", "1")
    _one_line_error(capsys, rc, "train", fragment)
    assert not (tmp_path / "run").exists()


def test_resume_with_conflicting_option(trained, corpus, capsys):
    capsys.readouterr()
    rc = main(["train", "--resume", str(trained), "--d-model", "16"])
    _one_line_error(capsys, rc, "train", "--d-model 16 conflicts with the checkpoint's d_model=8")
    rc = main(["train", "--resume", str(trained), "--seed", "5"])
    _one_line_error(capsys, rc, "train", "--seed 5 conflicts with the checkpoint's seed=0")


def test_out_folder_with_a_run_is_not_overwritten(trained, corpus, capsys):
    capsys.readouterr()
    rc = _train("--data", corpus, "--out", trained, "--steps", "1")
    _one_line_error(capsys, rc, "train", "is not empty; pass --resume")


def test_compat_lm_runs_joins_the_curves_at_the_switch(tmp_path, capsys):
    """``favor compat --lm-runs BASE CONT``: the continuation's validation curve is shifted by the
    base run's last step, and the JSON and the plot are written."""
    for name, rows in {"base": [(0, 8.0), (10, 4.0)], "cont": [(0, 4.5), (5, 3.5)]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "val_bits": b}) + "\n" + json.dumps({"step": s + 1, "train_loss": 1.0}) + "\n"
                    for s, b in rows))
    plot = tmp_path / "plots" / "transfer.png"
    assert main(["compat", "--lm-runs", str(tmp_path / "base"), str(tmp_path / "cont"),
                 "--out", str(tmp_path / "out"), "--plot", str(plot)]) == 0
    result = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert result["switch_step"] == 10
    assert result["continuations"][0]["curve"] == [[0, 4.5], [5, 3.5]]
    assert plot.stat().st_size > 1000
    assert "cont: 4.5000 bits/byte at the switch, 3.5000 after 5 steps" in capsys.readouterr().out


def test_diverging_run_is_a_one_line_error(corpus, tmp_path, capsys):
    rc = _train("--data", corpus, "--out", tmp_path / "run", "--steps", "6", "--lr", "1e30", "--grad-clip", "0")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("favor train: error: training loss became"), err


def test_resume_refuses_another_runs_folder_and_a_target_already_reached(trained, corpus, tmp_path, capsys):
    other = tmp_path / "other"
    assert _train("--data", corpus, "--out", other, "--steps", "1", "--seed", "5") == 0
    before = (other / "metrics.jsonl").read_text()
    capsys.readouterr()
    rc = main(["train", "--resume", str(trained), "--out", str(other), "--steps", "3", "--no-progress"])
    _one_line_error(capsys, rc, "train", "is not the run of checkpoint")
    assert (other / "metrics.jsonl").read_text() == before
    summary = (trained / "summary.json").read_text()
    rc = main(["train", "--resume", str(trained), "--steps", "1", "--no-progress"])  # trained is at step 1
    _one_line_error(capsys, rc, "train", "training to step 1 has nothing to do")
    assert (trained / "summary.json").read_text() == summary
    # --stop-at beyond --steps (1): the trainer would stop at 1 and rewrite summary.json with nothing
    rc = main(["train", "--resume", str(trained), "--stop-at", "10", "--no-progress"])
    _one_line_error(capsys, rc, "train", "training to step 1 has nothing to do")
    assert (trained / "summary.json").read_text() == summary


def test_dropout_masks_are_drawn_per_step_and_rank(monkeypatch, tmp_path):
    """The trainer reseeds the global RNG from (seed, step, rank) before each forward: dropout is
    independent across ranks (not rank 0's masks on every slice) and exact after a resume."""
    from favor.data.corpus import load_corpus, step_seed
    from favor.models import PerformerConfig, PerformerLM
    from favor.training import TrainConfig, describe_run, make_optimizer, train

    corpus = load_corpus(None)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=8, eval_every=100, save_every=100, eval_batches=1, seed=4)
    seen = []
    real_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (seen.append(s), real_seed(s))[1])
    for rank in (0, 1):
        model_cfg = PerformerConfig(vocab_size=256, d_model=8, n_heads=2, n_layers=1, nb_features=4, max_len=16,
                                    dropout=0.5)
        model = PerformerLM(model_cfg)
        train(model, make_optimizer(model, cfg), corpus, cfg, out_dir=tmp_path / f"r{rank}",
              checkpoint_config=describe_run(model_cfg.to_dict(), cfg, corpus), rank=rank, world_size=2,
              progress=False)
    expected = [step_seed(4, step, f"dropout:{rank}") for rank in (0, 1) for step in (0, 1)]
    assert [s for s in seen if s in expected] == expected
    assert len(set(expected)) == 4


def test_nproc_batch_split_is_checked_before_torchrun_starts(corpus, tmp_path, capsys):
    rc = _train("--data", corpus, "--out", tmp_path / "run", "--batch-size", "3", "--nproc", "2")
    _one_line_error(capsys, rc, "train", "--batch-size 3 must be divisible by --nproc 2")
    assert not (tmp_path / "run").exists()


def test_generate_checks_the_length_before_printing_the_prompt(trained, capsys):
    rc = main(["generate", "--checkpoint", str(trained), "--prompt", "ab", "--max-new-tokens", "100000"])
    assert capsys.readouterr().out == ""
    assert rc == 2


def test_train_with_calibrated_keys_records_the_option(corpus, tmp_path):
    run = tmp_path / "calibrated"
    assert _train("--data", corpus, "--out", run, "--steps", "3", "--eval-every", "3",
                  "--key-estimator", "calibrated") == 0
    ckpt = load_checkpoint(run)
    assert ckpt.config["model"]["key_estimator"] == "calibrated"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_step"] == 3 and 0 < summary["val_loss"] < 10, summary


def test_resume_refuses_an_option_added_after_the_checkpoint_unless_it_keeps_the_default(corpus, tmp_path, capsys):
    """A checkpoint written before key_estimator existed ran with the default ("plain"): resuming it
    with --key-estimator calibrated must be refused, not silently continue with plain keys."""
    import hashlib

    run = tmp_path / "old"
    assert _train("--data", corpus, "--out", run, "--steps", "2", "--eval-every", "2") == 0
    step = run / "step-0000002"
    config = json.loads((step / "config.json").read_text())
    del config["model"]["key_estimator"]  # as written before the option existed
    (step / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    manifest = json.loads((step / "MANIFEST.json").read_text())
    data = (step / "config.json").read_bytes()
    manifest["files"]["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "3", "--key-estimator", "calibrated",
                 "--no-progress", "--threads", "1"]) == 2
    assert "key_estimator='plain'" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--steps", "3", "--key-estimator", "plain",
                 "--no-progress", "--threads", "1"]) == 0
