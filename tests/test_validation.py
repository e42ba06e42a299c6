"""Bad input to the public library API: every case raises ValueError/TypeError (or the documented
CheckpointError / FileNotFoundError) whose one-line message names the offending value or shape,
never a raw torch/Python error from deep inside.

Cases already covered elsewhere are not repeated: favor_attention's shape/dtype/mask checks
(test_attention.py), projection sizes (test_projections.py), feature kinds (test_feature_maps.py),
PerformerConfig / FavorAttention options (test_models.py, test_nn.py), data files and checkpoints
through the CLI (test_cli_train.py).  Each case is (callable, exception type, message fragment).
"""

from __future__ import annotations


import pytest
import torch

import favor
from favor import FavorState, causal_linear_attention, linear_attention
from favor.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from favor.data import listops as lo
from favor.data.corpus import ProteinTokenizer, get_batch, load_corpus
from favor.models import PerformerClassifier, PerformerConfig, PerformerEncoder, PerformerLM
from favor.nn import (
    FavorAttention,
    MultiheadFavorAttention,
    PerformerSelfAttention,
    RotaryEmbedding,
    projection_fingerprint,
    redraw_projections_,
)
from favor.training import TrainConfig

B, H, L, D, M = 2, 3, 5, 4, 6


def _qkv(L: int = L):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))


def _proj(m: int = M, d: int = D) -> torch.Tensor:
    return favor.gaussian_orthogonal_matrix(m, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _feats(L: int = L, m: int = M) -> torch.Tensor:
    return torch.rand(B, H, L, m, dtype=torch.float64) + 0.1


def _state(kv=(B, H, M, D), k_sum=(B, H, M), log_scale=(B, H)) -> FavorState:
    return FavorState(torch.zeros(kv, dtype=torch.float64), torch.zeros(k_sum, dtype=torch.float64),
                      torch.zeros(log_scale, dtype=torch.float64))


def _tiny_cfg(**kw) -> PerformerConfig:
    return PerformerConfig(**{"vocab_size": 10, "d_model": 8, "n_heads": 2, "n_layers": 1, "nb_features": 4,
                              "max_len": 16, **kw})


q, k, v = _qkv()

FUNCTIONAL = [
    # projections
    pytest.param(lambda: favor.gaussian_orthogonal_matrix(4, 4, generator=1), TypeError,
                 "generator must be a torch.Generator", id="projection-generator-not-a-generator"),
    pytest.param(lambda: favor.projection_matrix("orthogonal", 4, 4, dtype=torch.int64), TypeError,
                 "dtype must be a floating-point", id="projection-integer-dtype"),
    pytest.param(lambda: favor.hadamard_transform([1.0, 2.0]), TypeError, "takes a tensor", id="hadamard-list"),
    pytest.param(lambda: favor.hadamard_transform(torch.tensor(1.0)), TypeError, "at least 1 dim",
                 id="hadamard-0-dim"),
    pytest.param(lambda: favor.hadamard_transform(torch.zeros(3, 0)), ValueError, "power-of-two last dimension, got 0",
                 id="hadamard-empty-last-dim"),
    # feature maps
    pytest.param(lambda: favor.num_features(0, "positive"), ValueError, "m must be a positive int, got 0",
                 id="num-features-m0"),
    pytest.param(lambda: favor.num_features(4, "bogus"), ValueError, "unknown features 'bogus'",
                 id="num-features-unknown-kind"),
    pytest.param(lambda: favor.num_features(4, None, "bogus"), ValueError, "unknown kernel 'bogus'",
                 id="num-features-unknown-kernel"),
    pytest.param(lambda: favor.feature_map(q, _proj(M, D + 1)), ValueError, f"projection must have shape (m, {D})",
                 id="feature-map-projection-wrong-d"),
    pytest.param(lambda: favor.feature_map(q, torch.randn(M)), ValueError, "got (6,)", id="feature-map-projection-1d"),
    pytest.param(lambda: favor.feature_map(q, _proj()[:0]), ValueError, "with m > 0", id="feature-map-projection-m0"),
    pytest.param(lambda: favor.feature_map(q.long(), _proj()), TypeError, "floating-point", id="feature-map-int-x"),
    pytest.param(lambda: favor.feature_map([1.0], _proj()), TypeError, "got list", id="feature-map-x-list"),
    pytest.param(lambda: favor.feature_map(q, _proj().long(), kernel="relu"), TypeError, "torch.int64",
                 id="feature-map-int-projection"),
    pytest.param(lambda: favor.random_features(q, _proj(M, 3)), ValueError, "projection must have shape",
                 id="random-features-projection-wrong-d"),
    pytest.param(lambda: favor.oprf_parameter(q, k[..., :3]), ValueError, f"x has {D} features but y has 3",
                 id="oprf-parameter-d-mismatch"),
    pytest.param(lambda: favor.oprf_parameter(q, k, torch.ones(B, 1, L + 1, dtype=torch.bool)), ValueError,
                 "y_mask must broadcast to", id="oprf-parameter-mask-shape"),
    # linear kernels on precomputed features
    pytest.param(lambda: linear_attention(_feats(), _feats().float(), v), TypeError, "must share a dtype",
                 id="linear-mixed-dtypes"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(), v.float()), TypeError, "must share a dtype",
                 id="causal-linear-mixed-dtypes"),
    pytest.param(lambda: favor.feature_map(q.float(), _proj()), TypeError,
                 "projection (torch.float64) and x (torch.float32) must share a dtype", id="feature-map-mixed-dtypes"),
    pytest.param(lambda: favor.oprf_parameter(q, k, None, torch.ones(B, 1, L + 1, dtype=torch.bool)), ValueError,
                 "x_mask must broadcast to", id="oprf-x-mask-shape"),
    pytest.param(lambda: linear_attention(_feats(), _feats(m=M + 1), v), ValueError, "must agree in B, H and M",
                 id="linear-feature-count-mismatch"),
    pytest.param(lambda: linear_attention(_feats(), _feats(), v[:, :, :-1]), ValueError, "value must have shape",
                 id="linear-value-length-mismatch"),
    pytest.param(lambda: linear_attention(_feats()[0], _feats()[0], v[0]), ValueError, "(B, H, L, ·)",
                 id="linear-3d-features"),
    pytest.param(lambda: linear_attention(_feats(), _feats(), v, torch.zeros(B, H, L + 1)), ValueError,
                 "k_log_scale must have shape", id="linear-log-scale-shape"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(), v, chunk_size=0), ValueError,
                 "chunk_size must be a positive int, got 0", id="causal-chunk-0"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(), v, chunk_size=-2), ValueError,
                 "chunk_size must be a positive int, got -2", id="causal-chunk-negative"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(), v, chunk_size=2.5), ValueError,
                 "chunk_size must be a positive int, got 2.5", id="causal-chunk-float"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(L - 1), v[:, :, :-1]), ValueError,
                 "equal query and key lengths", id="causal-length-mismatch"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(), v, initial_state=(1, 2, 3)), TypeError,
                 "initial_state must be a FavorState", id="causal-state-tuple"),
    pytest.param(lambda: causal_linear_attention(_feats(), _feats(), v, initial_state=_state(kv=(B, H, M + 1, D))),
                 ValueError, "initial_state.kv must have shape", id="causal-state-kv-shape"),
    # favor_attention / favor_attention_step: what test_attention.py does not cover
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), is_causal="yes"), TypeError,
                 "is_causal must be a bool, got 'yes'", id="attention-is-causal-str"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), is_causal=True, return_state=1), TypeError,
                 "return_state must be a bool", id="attention-return-state-int"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), is_causal=True, initial_state=_state(k_sum=(B, H, 1))),
                 ValueError, "initial_state.k_sum must have shape", id="attention-state-k-sum-shape"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), is_causal=True,
                                               initial_state=_state(kv=(B, H, M + 1, D), k_sum=(B, H, M + 1))),
                 ValueError, "initial_state.kv must have shape (2, 3, 6, 4)", id="attention-state-wrong-m"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), is_causal=True, initial_state=_state(log_scale=(B, 1))),
                 ValueError, "initial_state.log_scale", id="attention-state-log-scale-shape"),
    pytest.param(lambda: favor.favor_attention_step([1.0], k[:, :, :1], v[:, :, :1], _proj(), None), TypeError,
                 "query must be a torch.Tensor, got list", id="step-query-list"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), is_causal=True,
                                               query_padding_mask=torch.ones(B, L, dtype=torch.bool)),
                 ValueError, "query_padding_mask is for bidirectional attention", id="attention-query-mask-causal"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), query_padding_mask=torch.ones(B, L)),
                 TypeError, "query_padding_mask must be torch.bool", id="attention-query-mask-float"),
    pytest.param(lambda: favor.favor_attention(q, k, v, _proj(), query_padding_mask=torch.ones(B, L + 1, dtype=torch.bool)),
                 ValueError, "query_padding_mask must have shape (B, Lq) = (2, 5), got (2, 6)",
                 id="attention-query-mask-shape"),
]




@pytest.mark.parametrize("features", ["positive", "trig", "oprf"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
def test_empty_sequence_gives_empty_output(features, is_causal):
    """L = 0 (with autograd on) is an empty result, not a crash in a kernel; Lk = 0 gives zeros."""
    x = torch.randn(B, H, 0, D, requires_grad=True)
    out = favor.favor_attention(x, x, x, _proj().float(), features=features, is_causal=is_causal)
    assert out.shape == (B, H, 0, D)
    if not is_causal:
        qq = torch.randn(B, H, 3, D)
        out = favor.favor_attention(qq, x, x, _proj().float(), features=features)
        assert out.shape == (B, H, 3, D) and torch.all(out == 0)


lm = PerformerLM(_tiny_cfg())
fa = FavorAttention(D, nb_features=M)

MODULES = [
    pytest.param(lambda: FavorAttention(D, seed=2**63), ValueError, "seed must be < 2**63", id="favor-seed-too-big"),
    pytest.param(lambda: FavorAttention(D, nb_features=4, dtype=torch.int64), TypeError, "floating-point torch.dtype",
                 id="favor-integer-dtype"),
    pytest.param(lambda: redraw_projections_(1, torch.Generator()), TypeError, "model must be a torch.nn.Module",
                 id="redraw-not-a-module"),
    pytest.param(lambda: projection_fingerprint("model"), TypeError, "got str", id="fingerprint-not-a-module"),
    pytest.param(lambda: RotaryEmbedding(4, base="x"), ValueError, "rotary base must be > 1", id="rotary-base-str"),
    pytest.param(lambda: RotaryEmbedding(4)(q.float(), k.float(), -1), ValueError, "offset must be a non-negative int",
                 id="rotary-offset-negative"),
    pytest.param(lambda: RotaryEmbedding(4)(q.float(), k.float(), 1.5), ValueError, "got 1.5", id="rotary-offset-float"),
    pytest.param(lambda: PerformerSelfAttention(8, 2, nb_features=4)(torch.ones(1, 3, 8, dtype=torch.long)),
                 TypeError, "x must be a floating-point tensor", id="self-attention-int-input"),
    pytest.param(lambda: MultiheadFavorAttention(8, 2, kdim=0), ValueError, "kdim must be None or a positive int, got 0",
                 id="multihead-kdim-0"),
    pytest.param(lambda: MultiheadFavorAttention(8, 2, vdim=2.5), ValueError, "vdim", id="multihead-vdim-float"),
    pytest.param(lambda: lm(torch.tensor([[1, 2, 10]])), ValueError, "token ids must lie in [0, vocab_size=10), got min 1, max 10",
                 id="lm-token-id-too-large"),
    pytest.param(lambda: lm(torch.tensor([[1, -2, 3]])), ValueError, "got min -2", id="lm-negative-token-id"),
    pytest.param(lambda: PerformerEncoder(_tiny_cfg())(torch.tensor([[11]])), ValueError, "token ids must lie",
                 id="encoder-token-id-too-large"),
    pytest.param(lambda: PerformerClassifier(_tiny_cfg(), 2)(torch.tensor([[3, 99]])), ValueError, "max 99",
                 id="classifier-token-id-too-large"),
    pytest.param(lambda: lm.generate(torch.tensor([[1]]), 2, temperature=-0.5), ValueError,
                 "temperature must be finite and >= 0", id="generate-negative-temperature"),
    pytest.param(lambda: lm.generate(torch.tensor([[1]]), 2, top_k=0), ValueError, "top_k must be None or an int",
                 id="generate-top-k-0"),
    pytest.param(lambda: lm.generate(torch.tensor([[1]]), -1), ValueError, "max_new_tokens must be a non-negative int",
                 id="generate-negative-steps"),
]


@pytest.mark.parametrize("call, exc, fragment", MODULES)
def test_module_bad_input(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


def test_model_accepts_an_empty_sequence():
    logits = lm(torch.zeros(2, 0, dtype=torch.long))
    assert logits.shape == (2, 0, 10)


TRAIN_CONFIG = [
    pytest.param({"weight_decay": float("nan")}, "weight_decay and grad_clip must be finite", id="weight-decay-nan"),
    pytest.param({"grad_clip": float("nan")}, "got 0.1, nan", id="grad-clip-nan"),
    pytest.param({"grad_clip": -1.0}, "got 0.1, -1.0", id="grad-clip-negative"),
    pytest.param({"seed": -1}, "seed must be an int in [0, 2**63), got -1", id="seed-negative"),
    pytest.param({"seed": 2**64}, "seed must be an int in [0, 2**63)", id="seed-too-big"),
    pytest.param({"seed": 1.5}, "got 1.5", id="seed-float"),
    pytest.param({"steps": 0}, "steps must be a positive integer, got 0", id="steps-0"),
    pytest.param({"batch_size": -4}, "batch_size must be a positive integer, got -4", id="batch-size-negative"),
]


@pytest.mark.parametrize("changes, fragment", TRAIN_CONFIG)
def test_train_config(changes, fragment):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)
    assert fragment in str(info.value)


TOKENS = torch.arange(100, dtype=torch.uint8)

DATA = [
    pytest.param(lambda: load_corpus(None, val_percent="5"), ValueError, "val_percent must be a number in (0, 100), got '5'",
                 id="corpus-val-percent-str"),
    pytest.param(lambda: get_batch(TOKENS.view(10, 10), 0, seed=0, batch_size=2, seq_len=4), ValueError,
                 "must be a 1-D tensor (a token stream), got (10, 10)", id="batch-2d-tokens"),
    pytest.param(lambda: get_batch(list(range(100)), 0, seed=0, batch_size=2, seq_len=4), ValueError, "got list",
                 id="batch-list-tokens"),
    pytest.param(lambda: get_batch(TOKENS, 0, seed=0, batch_size=2, seq_len=4.5), ValueError,
                 "seq_len must be an int >= 1, got 4.5", id="batch-float-seq-len"),
    pytest.param(lambda: get_batch(TOKENS, 0, seed=0, batch_size=2.0, seq_len=4), ValueError, "batch_size=2.0",
                 id="batch-float-batch-size"),
    pytest.param(lambda: ProteinTokenizer().decode([3, 300]), ValueError, "token id 300 is outside the protein vocabulary",
                 id="protein-decode-out-of-range"),
    pytest.param(lambda: lo.ListOpsSplit.from_expressions([["[MAX", "1", "2", "]"]]).batch([3], cls=False), ValueError,
                 "example indices must lie in [0, 1)", id="listops-batch-index-out-of-range"),
    pytest.param(lambda: lo.ListOpsSplit.from_expressions([["[MAX", "1", "2", "]"]]).batch([], cls=True), ValueError,
                 "non-empty", id="listops-batch-empty"),
]


@pytest.mark.parametrize("call, exc, fragment", FUNCTIONAL + DATA)
def test_bad_input_raises_a_one_line_error_naming_it(call, exc, fragment):
    """The functional core and the data helpers reject bad input with the right exception type and a
    one-line message that names the offending value or shape."""
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"junk", b"PK\x03\x04 truncated zip", b"\x93NUMPY not an npz"],
                         ids=["junk", "truncated-zip", "npy-header"])
def test_listops_corrupt_cache_file(tmp_path, content):
    path = tmp_path / "splits.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a ListOps splits file written by save_splits"):
        lo.load_splits(path)


def test_listops_splits_round_trip_still_loads(tmp_path):
    splits = {"test": lo.ListOpsSplit.from_expressions([["[MAX", "1", "2", "]"], ["7"]])}
    lo.save_splits(splits, tmp_path / "s.npz")
    back = lo.load_splits(tmp_path / "s.npz")
    assert torch.equal(back["test"].tokens, splits["test"].tokens) and back["test"].labels.tolist() == [2, 7]


def test_checkpoint_latest_not_text(tmp_path):
    (tmp_path / "LATEST").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match=r"cannot read '.*LATEST' \(expected a checkpoint folder name\)"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="LATEST"):
        load_checkpoint(tmp_path)


def test_lra_stored_config_of_a_foreign_checkpoint(tmp_path):
    """A run folder of `favor train` (no ListOps config) is refused by name, not with a KeyError."""
    from favor import lra
    from favor.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, step=1, model=torch.nn.Linear(2, 2), optimizer=None,
                    config={"model": {}, "tokenizer": "bytes"})
    with pytest.raises(ValueError, match="has no ListOps configuration"):
        lra.stored_config(tmp_path)


@pytest.mark.parametrize("content", ["{bad json", '{"x": 1}', "[1, 2]"], ids=["not-json", "no-result", "a-list"])
def test_lra_plot_bad_metrics(tmp_path, content):
    from favor import lra

    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(ValueError, match="is not a ListOps metrics.json"):
        lra.plot_listops([tmp_path], tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def test_lra_resume_with_another_config_names_the_fields():
    from favor import lra

    a = lra.listops_config("cpu")
    b = a.replace(batch_size=4, steps=7, **{"model.chunk_size": 8})
    diff = lra._config_diff(a.to_dict(), b.to_dict())
    assert diff == f"model.chunk_size: {a.model.chunk_size} -> 8, batch_size: {a.batch_size} -> 4"
