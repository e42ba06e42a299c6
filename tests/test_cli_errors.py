"""Bad command lines: every `favor` command exits non-zero with a one-line error on stderr that
names the problem, and no traceback.  Runs in-process through ``favor.cli.main`` (fast).

Our own errors exit 2 with exactly one line ``favor <command>: error: ...``.  argparse's errors
(unknown option, a value of the wrong type, an invalid choice) exit 2 with its usage and one
``error:`` line.  Cases already in test_cli_train.py (missing/corrupt checkpoint, empty/binary
data, invalid FASTA residue, option conflicting with the checkpoint, --out with a run) are not
repeated.  No case trains a model or runs a sweep: each fails before any real work starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from favor.checkpoint import save_checkpoint
from favor.cli import main
from favor.models import PerformerConfig, PerformerLM

TINY = ["--batch-size", "2", "--seq-len", "16", "--d-model", "8", "--n-heads", "2", "--n-layers", "1",
        "--mlp-ratio", "2", "--nb-features", "4", "--eval-batches", "1", "--warmup-steps", "1",
        "--threads", "1", "--no-progress"]
TINY_MODEL = {"vocab_size": 256, "d_model": 8, "n_heads": 2, "n_layers": 1, "mlp_ratio": 2.0, "nb_features": 4,
              "max_len": 64}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A scratch folder: a text corpus, odd files, and checkpoints made with save_checkpoint (no training)."""
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"f{i}.txt").write_text(f"line {i} of some text to model\n" * 40)
    (root / "short.txt").write_text("tiny")
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait " * 20)
    (root / "headless.fa").write_text("MKTAYIAK\n>rec\nMKT\n")
    (root / "empty-dir").mkdir()
    (root / "bad-latest").mkdir()
    (root / "bad-latest" / "LATEST").write_bytes(b"\xff\xfe\x00")
    (root / "bad-metrics").mkdir()
    (root / "bad-metrics" / "metrics.json").write_text("{not json")
    (root / "wrong-metrics").mkdir()
    (root / "wrong-metrics" / "metrics.json").write_text('{"x": 1}')
    for name in ("compat", "transfer"):  # results of finished favor compat runs
        (root / f"{name}-done").mkdir()
        (root / f"{name}-done" / f"{name}.json").write_text("{}")

    torch.manual_seed(0)
    cfg = PerformerConfig(**TINY_MODEL)
    model = PerformerLM(cfg)

    def ckpt(name: str, **config) -> None:
        save_checkpoint(root / name, step=1, model=model, optimizer=None,
                        config={"model": cfg.to_dict(), "tokenizer": "bytes", **config})

    ckpt("lm")  # loadable by favor generate; no training description, no ListOps configuration
    ckpt("protein-lm", tokenizer="protein")
    ckpt("bad-tokenizer", tokenizer="bpe")
    ckpt("bad-model", model={**cfg.to_dict(), "d_model": 7})
    ckpt("unknown-key", model={**cfg.to_dict(), "colour": "blue"})
    return root


def _run(argv: list[str], files: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(files)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err.strip()


def _assert_one_line(rc: int, err: str, command: str, fragment: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    assert err.startswith(f"favor {command}: error: "), err
    assert fragment in err, err


OWN_ERRORS = [
    # favor train: trainer options
    pytest.param(["train", *TINY, "--data", "corpus", "--weight-decay", "nan"], "train", "weight_decay and grad_clip must be finite",
                 id="train-weight-decay-nan"),
    pytest.param(["train", *TINY, "--data", "corpus", "--grad-clip", "nan"], "train", "got 0.1, nan", id="train-grad-clip-nan"),
    pytest.param(["train", *TINY, "--data", ""], "train", "data path is empty", id="train-data-empty"),
    pytest.param(["train", *TINY, "--data", "corpus", "--steps", "0"], "train", "steps must be a positive integer, got 0", id="train-steps-0"),
    pytest.param(["train", *TINY, "--data", "corpus", "--batch-size", "-2"], "train", "batch_size must be a positive integer, got -2",
                 id="train-batch-size-negative"),
    pytest.param(["train", *TINY, "--data", "corpus", "--seed", str(2**64)], "train", "seed must be < 2**63", id="train-seed-too-big"),
    pytest.param(["train", *TINY, "--data", "corpus", "--seed", "-1"], "train", "seed must be >= 0, got seed=-1", id="train-seed-negative"),
    pytest.param(["train", *TINY, "--data", "corpus", "--threads", "0"], "train", "--threads must be >= 1, got 0", id="train-threads-0"),
    pytest.param(["train", *TINY, "--data", "corpus", "--nproc", "0"], "train", "--nproc must be a positive integer, got 0",
                 id="train-nproc-0"),
    # favor train: model options
    pytest.param(["train", *TINY, "--data", "corpus", "--chunk-size", "0"], "train", "chunk_size must be >= 1, got chunk_size=0",
                 id="train-chunk-size-0"),
    pytest.param(["train", *TINY, "--data", "corpus", "--nb-features", "0"], "train", "nb_features must be >= 1, got nb_features=0",
                 id="train-m-0"),
    pytest.param(["train", *TINY, "--data", "corpus", "--nb-features", "-4"], "train", "nb_features=-4", id="train-m-negative"),
    pytest.param(["train", *TINY, "--data", "corpus", "--n-heads", "3"], "train", "d_model=8 is not divisible by n_heads=3",
                 id="train-heads-do-not-divide"),
    pytest.param(["train", *TINY, "--data", "corpus", "--kernel", "relu", "--features", "positive"], "train",
                 "features='positive' applies to kernel='softmax' only", id="train-features-with-relu"),
    pytest.param(["train", *TINY, "--data", "corpus", "--seq-len", "32", "--max-len", "16"], "train", "--seq-len 32 exceeds the model's max_len 16",
                 id="train-seq-len-over-max-len"),
    # favor train: data and paths (each fails before a model is built or anything is printed)
    pytest.param(["train", *TINY, "--data", "short.txt", "--out", "run-a"], "train",
                 "has 3 tokens, fewer than --seq-len + 1 = 17", id="train-data-shorter-than-seq-len"),
    pytest.param(["train", *TINY, "--data", "nope.txt"], "train", "data path 'nope.txt' does not exist",
                 id="train-data-missing"),
    pytest.param(["train", *TINY, "--data", "empty-dir"], "train", "contains no files", id="train-data-empty-folder"),
    pytest.param(["train", *TINY, "--data", "latin1.txt"], "train", "is not UTF-8 text", id="train-data-not-utf8"),
    pytest.param(["train", *TINY, "--data", "headless.fa"], "train", "has residues before the first '>' header",
                 id="train-fasta-without-header"),
    pytest.param(["train", *TINY, "--data", "corpus", "--out", "short.txt"], "train",
                 "--out: cannot create folder short.txt: a file of that name exists",
                 id="train-out-is-a-file"),
    pytest.param(["train", "--resume", "lm", "--init-from", "lm"], "train", "--resume and --init-from exclude each other",
                 id="train-resume-and-init-from"),
    pytest.param(["train", "--resume"], "train", "--resume without a PATH needs --out", id="train-resume-without-path"),
    pytest.param(["train", "--resume", "short.txt"], "train", "is a file; expected a checkpoint or run folder",
                 id="train-resume-a-file"),
    pytest.param(["train", "--resume", "empty-dir"], "train", "is not a checkpoint", id="train-resume-empty-folder"),
    pytest.param(["train", "--resume", "lm", "--no-progress"], "train", "has no training description",
                 id="train-resume-checkpoint-without-training-state"),
    pytest.param(["train", *TINY, "--data", "corpus", "--init-from", "bad-latest"], "train",
                 "cannot read 'bad-latest/LATEST'", id="train-init-from-unreadable-latest"),
    # favor generate
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--seed", "-1"], "generate",
                 "--seed must be in [0, 2**63), got -1", id="generate-seed-negative"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--seed", str(2**64)], "generate",
                 "--seed must be in [0, 2**63)", id="generate-seed-too-big"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--max-new-tokens", "0"], "generate",
                 "--max-new-tokens must be >= 1, got 0", id="generate-zero-tokens"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--max-new-tokens", "100"], "generate",
                 "prompt of 1 tokens + max_new_tokens=100 exceeds max_len=64", id="generate-past-max-len"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--temperature", "-1"], "generate",
                 "--temperature must be >= 0", id="generate-temperature-negative"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--temperature", "nan"], "generate",
                 "got nan", id="generate-temperature-nan"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--temperature", "inf",
                  "--max-new-tokens", "2"], "generate",
                 "temperature must be finite", id="generate-temperature-inf"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--top-k", "0"], "generate",
                 "--top-k must be >= 1, got 0", id="generate-top-k-0"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--top-k", "1000"], "generate",
                 "--top-k 1000 exceeds the vocabulary size 256", id="generate-top-k-over-vocab"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", ""], "generate", "--prompt is empty",
                 id="generate-empty-prompt"),
    pytest.param(["generate", "--checkpoint", "lm", "--prompt", "x", "--threads", "0"], "generate",
                 "--threads must be >= 1", id="generate-threads-0"),
    pytest.param(["generate", "--checkpoint", "short.txt"], "generate", "is a file", id="generate-checkpoint-a-file"),
    pytest.param(["generate", "--checkpoint", "empty-dir"], "generate", "is not a checkpoint",
                 id="generate-checkpoint-empty-folder"),
    pytest.param(["generate", "--checkpoint", "bad-latest"], "generate",
                 "cannot read 'bad-latest/LATEST' (expected a checkpoint folder name)", id="generate-unreadable-latest"),
    pytest.param(["generate", "--checkpoint", "bad-tokenizer", "--prompt", "x"], "generate",
                 "unknown tokenizer 'bpe'", id="generate-unknown-tokenizer"),
    pytest.param(["generate", "--checkpoint", "bad-model", "--prompt", "x"], "generate",
                 "d_model=7 is not divisible by n_heads=2", id="generate-invalid-model-config"),
    pytest.param(["generate", "--checkpoint", "unknown-key", "--prompt", "x"], "generate",
                 "unknown PerformerConfig keys: ['colour']", id="generate-unknown-model-key"),
    # favor lra
    pytest.param(["lra", "listops", "--out", "lra-a", "--batch-size", "0"], "lra", "batch_size must be >= 1",
                 id="lra-batch-size-0"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--steps", "-1"], "lra", "steps must be >= 1, got steps=-1",
                 id="lra-steps-negative"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--chunk-size", "0"], "lra", "chunk_size must be >= 1",
                 id="lra-chunk-size-0"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--nb-features", "0"], "lra", "nb_features must be >= 1",
                 id="lra-m-0"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--lr", "0"], "lra", "lr must be > 0", id="lra-lr-0"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--grad-clip", "-1"], "lra", "grad_clip must be None or > 0",
                 id="lra-grad-clip-negative"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--min-length", "100", "--max-length", "50"], "lra",
                 "max_length must be >= 102", id="lra-max-length-below-min"),
    pytest.param(["lra", "listops", "--out", "lra-a", "--threads", "0"], "lra", "--threads must be >= 1",
                 id="lra-threads-0"),
    pytest.param(["lra", "listops", "--out", "empty-dir", "--resume"], "lra", "holds no checkpoint",
                 id="lra-resume-without-checkpoint"),
    pytest.param(["lra", "listops", "--out", "lm", "--resume"], "lra", "has no ListOps configuration",
                 id="lra-resume-foreign-checkpoint"),
    pytest.param(["lra", "listops", "--out", "lm"], "lra", "already holds a checkpoint", id="lra-out-holds-a-run"),
    pytest.param(["lra", "listops", "--out", "bad-latest", "--resume"], "lra", "cannot read 'bad-latest/LATEST'",
                 id="lra-resume-unreadable-latest"),
    pytest.param(["lra", "listops", "--out", "short.txt", "--data-cache", "none"], "lra",
                 "cannot create folder short.txt: a file of that name exists",
                 id="lra-out-is-a-file"),
    pytest.param(["lra", "plot", "nope", "--out", "p.png"], "lra", "nope/metrics.json does not exist",
                 id="lra-plot-missing-run"),
    pytest.param(["lra", "plot", "bad-metrics", "--out", "p.png"], "lra",
                 "bad-metrics/metrics.json is not a ListOps metrics.json", id="lra-plot-corrupt-metrics"),
    pytest.param(["lra", "plot", "wrong-metrics", "--out", "p.png"], "lra", "is not a ListOps metrics.json",
                 id="lra-plot-foreign-metrics"),
    pytest.param(["lra", "plot", "bad-metrics", "--out", "p.png", "--labels", "a", "b"], "lra",
                 "got 2 labels for 1 runs", id="lra-plot-label-count"),
    # favor approx (options checked before the sweep starts)
    pytest.param(["approx", "--quick", "--prefix", "x"], "approx", "--prefix names the plots: give --plot-dir",
                 id="approx-prefix-without-plot-dir"),
    pytest.param(["approx", "--quick", "--prefix", "", "--plot-dir", "plots"], "approx", "--prefix must not be empty",
                 id="approx-empty-prefix"),
    pytest.param(["approx", "--quick", "--budgets", "16,16"], "approx", "budgets lists 16 more than once",
                 id="approx-repeated-budget"),
    pytest.param(["approx", "--quick", "--seeds", "0"], "approx", "seeds must be a positive int, got 0",
                 id="approx-seeds-0"),
    pytest.param(["approx", "--quick", "--length", "0"], "approx", "length must be a positive int, got 0",
                 id="approx-length-0"),
    pytest.param(["approx", "--quick", "--budgets", "0"], "approx", "budgets must be positive ints, got 0",
                 id="approx-m-0"),
    pytest.param(["approx", "--quick", "--features", "bogus"], "approx", "unknown feature kind 'bogus'",
                 id="approx-unknown-feature"),
    pytest.param(["approx", "--quick", "--projections", "bogus"], "approx", "unknown projection 'bogus'",
                 id="approx-unknown-projection"),
    pytest.param(["approx", "--quick", "--sigma", "nan"], "approx", "sigma must be a positive finite number",
                 id="approx-sigma-nan"),
    pytest.param(["approx", "--quick", "--text", "short.txt"], "approx", "--text needs --model",
                 id="approx-text-without-model"),
    pytest.param(["approx", "--quick", "--model", "nope"], "approx", "checkpoint path 'nope' does not exist",
                 id="approx-model-missing"),
    pytest.param(["approx", "--quick", "--base-seed", "-1"], "approx", "base_seed must be a non-negative int, got -1",
                 id="approx-base-seed-negative"),
    pytest.param(["approx", "--quick", "--features", ","], "approx", "features must not be empty",
                 id="approx-features-empty"),
    pytest.param(["approx", "--quick", "--json", "empty-dir"], "approx", "--json empty-dir is a folder",
                 id="approx-json-is-a-folder"),
    pytest.param(["approx", "--quick", "--plot-dir", "short.txt"], "approx", "--plot-dir short.txt is a file",
                 id="approx-plot-dir-is-a-file"),
    pytest.param(["approx", "--quick", "--model", "lm", "--dim", "8"], "approx",
                 "with --model the model sets the head dim and causality; drop --dim", id="approx-model-and-dim"),
    pytest.param(["approx", "--quick", "--model", "lm", "--causal"], "approx", "drop --causal",
                 id="approx-model-and-causal"),
    pytest.param(["approx", "--quick", "--model", "lm", "--sigma", "1"], "approx", "do not apply with --model",
                 id="approx-model-and-sigma"),
    pytest.param(["approx", "--quick", "--model", "protein-lm"], "approx",
                 "a protein model needs a FASTA file to read (--text FILE)", id="approx-protein-model-without-text"),
    pytest.param(["approx", "--quick", "--model", "protein-lm", "--text", "short.txt"], "approx",
                 "'short.txt' is not FASTA, but the model was trained on proteins", id="approx-protein-model-text-file"),
    # favor compat (checked before transformers is imported)
    pytest.param(["compat", "--max-length", "0"], "compat", "--max-length must be in [1, 512]",
                 id="compat-max-length-0"),
    pytest.param(["compat", "--seed", "-1"], "compat", "--seed must be >= 0, got -1", id="compat-seed-negative"),
    pytest.param(["compat", "--kinds", "positive", "--plot", "fig.xyz"], "compat",
                 "--plot: cannot write a figure to 'fig.xyz': unsupported suffix '.xyz'", id="compat-plot-bad-suffix"),
    pytest.param(["compat", "--key-estimator", "normalized"], "compat",
                 "--key-estimator normalized with kind 'relu'", id="compat-key-estimator-with-relu"),
    pytest.param(["compat", "--kinds", "positive,trig", "--key-estimator", "calibrated"], "compat",
                 "--key-estimator calibrated with kind 'trig'", id="compat-key-estimator-with-trig"),
    pytest.param(["compat", "--lm-runs", "lm"], "compat", "--lm-runs needs a base run and at least one continuation",
                 id="compat-lm-runs-one"),
    pytest.param(["compat", "--lm-runs", "a", "b", "--ms", "16"], "compat",
                 "--lm-runs only draws a plot; --ms does not apply", id="compat-lm-runs-with-sweep-option"),
    pytest.param(["compat", "--replot", "--finetune", "--seed", "3"], "compat",
                 "--replot only draws a plot; --seed, --finetune do not apply", id="compat-replot-with-sweep-options"),
    pytest.param(["compat", "--replot", "--lm-runs", "a", "b"], "compat", "--lm-runs and --replot exclude each other",
                 id="compat-replot-and-lm-runs"),
    pytest.param(["compat", "--out", "compat-done"], "compat",
                 "compat-done/compat.json already exists; choose another --out", id="compat-result-exists"),
    pytest.param(["compat", "--lm-runs", "nope", "nope", "--out", "transfer-done"], "compat",
                 "transfer-done/transfer.json already exists; choose another --out", id="compat-transfer-exists"),
    pytest.param(["compat", "--steps", "5"], "compat", "distillation options need --finetune (got --steps)",
                 id="compat-steps-without-finetune"),
    pytest.param(["compat", "--finetune-kind", "oprf", "--finetune-ms", "16", "--batch-size", "2", "--lr", "1e-3"],
                 "compat", "(got --finetune-kind, --finetune-ms, --batch-size, --lr)",
                 id="compat-distillation-options-without-finetune"),
]


@pytest.mark.parametrize("argv, command, fragment", OWN_ERRORS)
def test_one_line_error(argv, command, fragment, files, monkeypatch, capsys):
    rc, err = _run(argv, files, monkeypatch, capsys)
    _assert_one_line(rc, err, command, fragment)


def test_failed_train_creates_no_run_folder(files, monkeypatch, capsys):
    rc, err = _run(["train", *TINY, "--data", "short.txt", "--out", "run-b"], files, monkeypatch, capsys)
    assert rc == 2 and not (files / "run-b").exists(), err


ARGPARSE_ERRORS = [
    pytest.param(["train", "--bogus", "1"], "favor: error: unrecognized arguments: --bogus 1", id="train-unknown-option"),
    pytest.param(["train", "--steps", "x"], "argument --steps: invalid int value: 'x'", id="train-steps-not-int"),
    pytest.param(["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'", id="train-lr-not-float"),
    pytest.param(["train", "--features", "bogus"], "argument --features: invalid choice: 'bogus'",
                 id="train-unknown-features"),
    pytest.param(["train", "--attention", "linear"], "argument --attention: invalid choice: 'linear'",
                 id="train-unknown-attention"),
    pytest.param(["generate"], "the following arguments are required: --checkpoint", id="generate-no-checkpoint"),
    pytest.param(["generate", "--checkpoint", "lm", "--top-k", "many"], "argument --top-k: invalid int value",
                 id="generate-top-k-not-int"),
    pytest.param(["lra", "listops", "--pooling", "max", "--out", "x"], "argument --pooling: invalid choice: 'max'",
                 id="lra-unknown-pooling"),
    pytest.param(["lra"], "the following arguments are required: TASK", id="lra-no-task"),
    pytest.param(["approx", "--budgets", "16,x"], "expected comma-separated integers, got '16,x'",
                 id="approx-budgets-not-ints"),
    pytest.param(["compat", "--ms", "0"], "argument --ms: expected positive integers", id="compat-m-0"),
    pytest.param(["compat", "--kinds", "bogus"], "unknown kinds ['bogus']", id="compat-unknown-kind"),
    pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
    pytest.param(["bogus"], "argument COMMAND: invalid choice: 'bogus'", id="unknown-command"),
]


@pytest.mark.parametrize("argv, fragment", ARGPARSE_ERRORS)
def test_argparse_error(argv, fragment, files, monkeypatch, capsys):
    rc, err = _run(argv, files, monkeypatch, capsys)
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and fragment in errors[0], err
    assert err.splitlines()[0].startswith("usage: favor"), err

