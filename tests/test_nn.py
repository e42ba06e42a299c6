"""favor.nn: FavorAttention, rotary, PerformerSelfAttention, MultiheadFavorAttention, redraw helpers."""

import pytest
import torch

import favor
from favor.nn import (
    FavorAttention,
    FavorCache,
    KVCache,
    MultiheadFavorAttention,
    PerformerSelfAttention,
    ProjectionRedraw,
    RotaryEmbedding,
    derive_seed,
    projection_fingerprint,
    redraw_projections_,
)
from favor.reference import explicit_favor_attention, softmax_attention

from conftest import make_qkv

F64 = torch.float64


def randn(*shape, seed=0, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * std


# ----------------------------------------------------------------------------- FavorAttention

# (kwargs, id)
FAVOR_KINDS = [
    ({}, "positive"),
    ({"features": "hyperbolic", "projection": "hadamard"}, "hyperbolic-hadamard"),
    ({"features": "oprf", "projection": "givens", "scaling": "sqrt_d"}, "oprf-givens-sqrt_d"),
    ({"features": "trig", "projection": "iid"}, "trig-iid"),
    ({"kernel": "relu"}, "relu-orthogonal"),
    ({"kernel": "elu", "projection": None, "nb_features": None}, "elu-identity"),
]


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kwargs", [k for k, _ in FAVOR_KINDS], ids=[i for _, i in FAVOR_KINDS])
def test_favor_attention_matches_explicit_reference(kwargs, is_causal):
    B, H, L, D, m = 2, 3, 37, 12, 20
    kwargs = dict(kwargs)
    mod = FavorAttention(D, nb_features=kwargs.pop("nb_features", m), is_causal=is_causal, seed=5,
                         chunk_size=16, **kwargs).double()
    q, k, v = make_qkv(B, H, L, L, D, 7, seed=1)
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[:, 0] = True
    out = mod(q, k, v, key_padding_mask=mask)  # (B, H, L, 7)
    ref = explicit_favor_attention(q, k, v, mod.projection, features=mod.features, kernel=mod.kernel,
                                   is_causal=is_causal, key_padding_mask=mask)
    assert out.shape == (B, H, L, 7)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_projection_is_the_seeded_draw_and_forward_never_changes_it():
    mod = FavorAttention(10, nb_features=23, seed=7)
    expected = favor.projection_matrix("orthogonal", 23, 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mod.projection, expected.to(torch.get_default_dtype()))
    before = mod.projection.clone()
    q, k, v = make_qkv(1, 2, 9, 9, 10, 10, dtype=torch.float32)
    mod.train()
    for _ in range(3):
        mod(q, k, v)
    assert torch.equal(mod.projection, before)
    assert not torch.equal(FavorAttention(10, nb_features=23, seed=8).projection, before)


def test_state_dict_round_trip_restores_outputs_exactly():
    src = FavorAttention(8, nb_features=16, seed=0, features="oprf")
    src.redraw_()  # state now differs from any fresh module's
    dst = FavorAttention(8, nb_features=16, seed=1, features="oprf")
    assert set(src.state_dict()) == {"projection", "draw_state"}
    dst.load_state_dict(src.state_dict())
    q, k, v = make_qkv(2, 2, 11, 11, 8, 8, dtype=torch.float32)
    assert torch.equal(dst(q, k, v), src(q, k, v))
    # the next argument-less redraw is reproducible after the round trip too
    src.redraw_()
    dst.redraw_()
    assert torch.equal(dst.projection, src.projection)


def test_redraw_only_when_asked_and_reproducibly():
    a, b = FavorAttention(6, nb_features=9, seed=3), FavorAttention(6, nb_features=9, seed=3)
    first = a.projection.clone()
    a.redraw_()
    b.redraw_()
    assert not torch.equal(a.projection, first)
    assert torch.equal(a.projection, b.projection)
    assert a.draw_state.tolist() == [3, 1]
    a.redraw_(torch.Generator().manual_seed(11))
    b.redraw_(torch.Generator().manual_seed(11))
    assert torch.equal(a.projection, b.projection)
    assert a.draw_state.tolist() == [3, 1]  # an explicit generator does not advance the counter
    with pytest.raises(TypeError, match="generator"):
        a.redraw_(11)


def test_identity_projection_has_no_buffer_and_redraw_is_a_no_op():
    mod = FavorAttention(8, kernel="relu", projection=None, nb_features=None)
    assert mod.projection is None and "projection" not in mod.state_dict()
    assert mod.nb_features == 8
    mod.redraw_()
    q, k, v = make_qkv(1, 1, 5, 5, 8, 8)
    ref = explicit_favor_attention(q, k, v, None, kernel="relu")
    torch.testing.assert_close(mod(q, k, v), ref, rtol=1e-10, atol=1e-12)


def test_double_casts_the_projection():
    mod = FavorAttention(8, nb_features=5).double()
    assert mod.projection.dtype == F64


BAD_FAVOR_OPTIONS = [
    ({"features": "cosine"}, ValueError, "cosine"),
    ({"nb_features": 0}, ValueError, "nb_features"),
    ({"nb_features": 2.5}, TypeError, "nb_features"),
    ({"kernel": "relu", "features": "positive"}, ValueError, "features='positive'"),
    ({"kernel": "gauss"}, ValueError, "gauss"),
    ({"projection": None}, ValueError, "projection=None"),
    ({"projection": "sparse"}, ValueError, "sparse"),
    ({"scaling": "unit"}, ValueError, "unit"),
    ({"projection": "iid", "scaling": "sqrt_d"}, ValueError, "iid"),
    ({"kernel": "elu", "projection": None, "nb_features": 5}, ValueError, "nb_features=5"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"seed": -1}, ValueError, "seed"),
    ({"is_causal": 1}, TypeError, "is_causal"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_FAVOR_OPTIONS, ids=[m for _, _, m in BAD_FAVOR_OPTIONS])
def test_favor_attention_rejects_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FavorAttention(8, **kwargs)


# ----------------------------------------------------------------------------- redraw helpers

def _stack(seed):
    return torch.nn.ModuleList(
        [FavorAttention(8, nb_features=12, seed=seed), torch.nn.Linear(2, 2), FavorAttention(8, nb_features=5, seed=seed + 1)]
    )


def test_projection_redraw_is_identical_across_separately_built_models():
    a, b = _stack(0), _stack(100)  # different initial projections, as on ranks seeded differently
    assert projection_fingerprint(a) != projection_fingerprint(b)
    ra, rb = ProjectionRedraw(a, every=5, seed=42), ProjectionRedraw(b, every=5, seed=42)
    before = projection_fingerprint(a)
    assert ra.maybe_redraw(7) is False and projection_fingerprint(a) == before
    assert ra.maybe_redraw(10) and rb.maybe_redraw(10)
    assert projection_fingerprint(a) == projection_fingerprint(b) != before
    at_10 = projection_fingerprint(a)
    ra.maybe_redraw(15)
    assert projection_fingerprint(a) != at_10
    with pytest.raises(ValueError, match="every"):
        ProjectionRedraw(a, every=0, seed=0)


def test_redraw_projections_counts_and_uses_the_generator():
    a, b = _stack(0), _stack(0)
    assert redraw_projections_(a, torch.Generator().manual_seed(1)) == 2
    redraw_projections_(b, torch.Generator().manual_seed(1))
    assert projection_fingerprint(a) == projection_fingerprint(b)
    redraw_projections_(b, torch.Generator().manual_seed(2))
    assert projection_fingerprint(a) != projection_fingerprint(b)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, i) for i in range(100)} | {derive_seed(1, 0)}) == 101
    assert 0 <= derive_seed(2**70, 3) < 2**63
    with pytest.raises(TypeError, match="derive_seed"):
        derive_seed(0.5)


# ----------------------------------------------------------------------------- rotary

def test_rotary_offset_equals_slice_and_scores_are_relative():
    rope = RotaryEmbedding(10)
    q, k = randn(2, 3, 20, 10, seed=1), randn(2, 3, 20, 10, seed=2)
    fq, fk = rope(q, k)
    oq, ok = rope(q[:, :, 13:], k[:, :, 13:], offset=13)
    assert torch.equal(oq, fq[:, :, 13:]) and torch.equal(ok, fk[:, :, 13:])
    torch.testing.assert_close(fq.norm(dim=-1), q.norm(dim=-1))  # rotations keep norms
    # the same vectors at positions (i, j) and (i + 5, j + 5) give the same score
    x, y = randn(1, 1, 1, 10, seed=3), randn(1, 1, 1, 10, seed=4)
    rx3, _ = rope(x, x, offset=3)
    ry1, _ = rope(y, y, offset=1)
    rx8, _ = rope(x, x, offset=8)
    ry6, _ = rope(y, y, offset=6)
    torch.testing.assert_close((rx3 * ry1).sum(), (rx8 * ry6).sum(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


# ----------------------------------------------------------------------------- PerformerSelfAttention

def _self_attention(attention="favor", rotary=True, is_causal=True, **kw):
    torch.manual_seed(0)
    return PerformerSelfAttention(24, 3, attention=attention, rotary=rotary, is_causal=is_causal,
                                  nb_features=kw.pop("nb_features", 16), chunk_size=8, **kw).double()


def test_self_attention_matches_explicit_glue():
    """Projections, heads, rotary, explicit FAVOR reference, output projection: computed by hand."""
    mod = _self_attention(is_causal=True, features="hyperbolic")
    x = randn(2, 19, 24)
    B, L = 2, 19
    q, k, v = (mod.qkv(x).view(B, L, 3, 3, 8).permute(2, 0, 3, 1, 4))  # each (B, H, L, Dh)
    cos, sin = mod.rotary.cos_sin(L, 0, dtype=F64, device=x.device)
    q, k = favor.nn.apply_rotary(q, cos, sin), favor.nn.apply_rotary(k, cos, sin)
    y = explicit_favor_attention(q, k, v, mod.favor.projection, features="hyperbolic", is_causal=True)
    ref = mod.out(y.transpose(1, 2).reshape(B, L, 24))
    torch.testing.assert_close(mod(x), ref, rtol=1e-9, atol=1e-11)


def test_softmax_self_attention_matches_reference():
    mod = _self_attention(attention="softmax", rotary=False, is_causal=False)
    assert mod.favor is None and "favor.projection" not in mod.state_dict()
    x = randn(2, 9, 24)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    q, k, v = mod.qkv(x).view(2, 9, 3, 3, 8).permute(2, 0, 3, 1, 4)
    y = softmax_attention(q, k, v, key_padding_mask=mask)
    ref = mod.out(y.transpose(1, 2).reshape(2, 9, 24))
    torch.testing.assert_close(mod(x, key_padding_mask=mask), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "no-rotary"])
@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_incremental_decoding_equals_full_forward(attention, rotary):
    mod = _self_attention(attention, rotary, features="oprf" if attention == "favor" else None)
    x = randn(2, 30, 24)
    full = mod(x)
    out, cache = mod(x[:, :11], return_cache=True)  # prompt: one chunked call
    outs = [out]
    for t in range(11, 20):  # one token per step
        out, cache = mod(x[:, t:t + 1], cache=cache, return_cache=True)
        outs.append(out)
    out, cache = mod(x[:, 20:], cache=cache, return_cache=True)  # then several at once
    outs.append(out)
    assert cache.offset == 30
    assert isinstance(cache, FavorCache if attention == "favor" else KVCache)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-12)


def test_favor_cache_size_does_not_grow_with_context():
    mod = _self_attention()
    _, short = mod(randn(1, 3, 24), return_cache=True)
    _, long = mod(randn(1, 100, 24), return_cache=True)
    assert [t.shape for t in short.state if t is not None] == [t.shape for t in long.state if t is not None]


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_padded_keys_do_not_change_real_outputs(attention):
    mod = _self_attention(attention, is_causal=False)
    x = randn(2, 13, 24)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, 4:7] = False
    noisy = torch.where(mask.unsqueeze(-1), x, randn(2, 13, 24, seed=9, std=3.0))
    a, b = mod(x, key_padding_mask=mask), mod(noisy, key_padding_mask=mask)
    torch.testing.assert_close(a[mask], b[mask], rtol=1e-11, atol=1e-12)
    assert not torch.allclose(a, mod(noisy))  # without the mask the noise does matter


def test_softmax_query_with_nothing_to_attend_gets_zero_like_favor():
    outs = []
    for attention in ("softmax", "favor"):
        mod = _self_attention(attention, is_causal=True, bias=False)
        mask = torch.tensor([[False, False, True, True, True]])  # left padding
        out = mod(randn(1, 5, 24), key_padding_mask=mask)
        assert torch.isfinite(out).all()
        outs.append(out)
        assert torch.equal(out[0, :2], torch.zeros(2, 24, dtype=F64))  # no bias: exactly 0


def test_favor_self_attention_approaches_softmax_with_many_features():
    """Same weights, attention='favor' with large m vs attention='softmax' (statistical, fixed seed)."""
    exact = _self_attention("softmax", is_causal=True)
    x = randn(2, 16, 24, std=0.5)
    ref = exact(x)
    errs = {}
    for m in (16, 4096):
        approx = _self_attention("favor", is_causal=True, nb_features=m, seed=3, projection="iid")
        approx.load_state_dict(exact.state_dict(), strict=False)
        errs[m] = ((approx(x) - ref).norm() / ref.norm()).item()
    assert errs[4096] < 0.02, errs
    assert errs[4096] < errs[16] / 4, errs


def test_self_attention_errors():
    mod = _self_attention(is_causal=False)
    with pytest.raises(ValueError, match="causal"):
        mod(randn(1, 3, 24), return_cache=True)
    causal = _self_attention()
    _, cache = causal(randn(1, 3, 24), return_cache=True)
    with pytest.raises(TypeError, match="KVCache"):
        _self_attention("softmax")(randn(1, 1, 24), cache=cache)
    with pytest.raises(ValueError, match="d_model=24"):
        causal(randn(1, 3, 16))
    with pytest.raises(TypeError, match="bool"):
        causal(randn(1, 3, 24), key_padding_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="divisible"):
        PerformerSelfAttention(10, 3)
    with pytest.raises(ValueError, match="linear"):
        PerformerSelfAttention(12, 3, attention="linear")
    with pytest.raises(ValueError, match="even"):
        PerformerSelfAttention(9, 3, rotary=True)
    with pytest.raises(ValueError, match="cosine"):  # FAVOR options are validated for softmax too
        PerformerSelfAttention(12, 3, attention="softmax", features="cosine")


# ----------------------------------------------------------------------------- MultiheadFavorAttention

def _mha_pair(batch_first=True, nb_features=8192, **kw):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(24, 3, batch_first=batch_first, **kw).double()
    # iid rows: one draw, fast for large m (the orthogonal blocks are drawn one by one)
    return mha, MultiheadFavorAttention.from_torch(mha, nb_features=nb_features, projection="iid", seed=1)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kdim", [None, 10], ids=["same-dim", "kdim10-vdim7"])
def test_multihead_matches_explicit_reference(batch_first, kdim):
    torch.manual_seed(0)
    vdim = None if kdim is None else 7
    mod = MultiheadFavorAttention(24, 4, kdim=kdim, vdim=vdim, batch_first=batch_first, nb_features=10,
                                  features="positive").double()
    B, L, S = 2, 9, 13
    q_in, k_in, v_in = randn(B, L, 24, seed=1), randn(B, S, kdim or 24, seed=2), randn(B, S, vdim or 24, seed=3)
    ignore = torch.zeros(B, S, dtype=torch.bool)
    ignore[1, 10:] = True  # torch convention: True = ignore
    args = (q_in, k_in, v_in) if batch_first else tuple(t.transpose(0, 1) for t in (q_in, k_in, v_in))
    out, weights = mod(*args, key_padding_mask=ignore)
    assert weights is None
    if not batch_first:
        out = out.transpose(0, 1)
    q, k, v = mod._project(q_in, k_in, v_in)
    q, k, v = (t.view(B, -1, 4, 6).transpose(1, 2) for t in (q, k, v))  # (B, H, ., Dh)
    y = explicit_favor_attention(q, k, v, mod.favor.projection, key_padding_mask=~ignore)
    ref = mod.out_proj(y.transpose(1, 2).reshape(B, L, 24))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


# (forward kwargs builder, add_bias_kv, add_zero_attn, id)
MHA_CASES = [
    ("plain", {}),
    ("padding", {"pad": True}),
    ("causal", {"causal": True}),
    ("bias_kv-zero_attn-padding", {"pad": True, "add_bias_kv": True, "add_zero_attn": True}),
]


@pytest.mark.parametrize("case", [c for _, c in MHA_CASES], ids=[i for i, _ in MHA_CASES])
def test_multihead_approaches_torch_with_many_features(case):
    """Same weights, m = 8192 random features: FAVOR ≈ exact torch attention (fixed seeds)."""
    case = dict(case)
    pad, causal = case.pop("pad", False), case.pop("causal", False)
    mha, fav = _mha_pair(**case)
    mha.eval()
    x = randn(2, 12, 24, seed=4, std=0.5)
    ignore = None
    if pad:
        ignore = torch.zeros(2, 12, dtype=torch.bool)
        ignore[0, 8:] = True
    mask = torch.nn.Transformer.generate_square_subsequent_mask(12, dtype=F64) if causal else None
    ref, _ = mha(x, x, x, key_padding_mask=ignore, attn_mask=mask, need_weights=False, is_causal=causal)
    out, _ = fav(x, x, x, key_padding_mask=ignore, is_causal=causal)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel


def test_multihead_mask_forms_are_equivalent():
    _, fav = _mha_pair(nb_features=16)
    x = randn(2, 6, 24)
    causal = fav(x, x, x, is_causal=True)[0]
    bool_mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    float_mask = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    assert torch.equal(fav(x, x, x, attn_mask=bool_mask)[0], causal)
    assert torch.equal(fav(x, x, x, attn_mask=float_mask, is_causal=True)[0], causal)
    ignore = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    as_float = torch.zeros(2, 6, dtype=F64).masked_fill(ignore, float("-inf"))
    assert torch.equal(fav(x, x, x, key_padding_mask=ignore)[0], fav(x, x, x, key_padding_mask=as_float)[0])
    # unbatched input = batch of one
    assert torch.equal(fav(x[1], x[1], x[1], key_padding_mask=ignore[1])[0], fav(x[1:], x[1:], x[1:], key_padding_mask=ignore[1:])[0][0])


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}, {}],
                         ids=["bias_kv", "zero_attn", "plain"])
def test_multihead_oprf_padding_content_never_reaches_real_tokens(extra):
    """Self-attention with FAVOR++ features: the padded tokens' content must not move A (the extra
    bias/zero key makes Lk = S + 1, so the query padding is passed explicitly)."""
    torch.manual_seed(0)
    m = MultiheadFavorAttention(32, 4, batch_first=True, nb_features=16, features="oprf", **extra).double()
    x = randn(2, 7, 32)
    ignore = torch.zeros(2, 7, dtype=torch.bool)
    ignore[:, 4:] = True
    x2 = x.clone()
    x2[:, 4:] += 10 * randn(2, 3, 32, seed=1)
    assert torch.equal(m(x, x, x, key_padding_mask=ignore)[0][:, :4], m(x2, x2, x2, key_padding_mask=ignore)[0][:, :4])


def test_multihead_empty_batch_gives_an_empty_output():
    fav = MultiheadFavorAttention(32, 4, batch_first=True, nb_features=8)
    out, weights = fav(*(torch.randn(0, 5, 32),) * 3)
    assert out.shape == (0, 5, 32) and weights is None


def test_multihead_rejects_what_favor_cannot_do():
    _, fav = _mha_pair(nb_features=8)
    x = randn(2, 5, 24)
    with pytest.raises(ValueError, match="need_weights"):
        fav(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="additive"):
        fav(x, x, x, attn_mask=randn(5, 5))
    with pytest.raises(ValueError, match="not the causal"):
        fav(x, x, x, attn_mask=torch.eye(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="additive"):
        fav(x, x, x, key_padding_mask=torch.full((2, 5), 0.5, dtype=F64))
    _, with_bias = _mha_pair(nb_features=8, add_bias_kv=True)
    with pytest.raises(ValueError, match="causal"):
        with_bias(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="causal"):
        fav(x, x[:, :4], x[:, :4], is_causal=True)


def test_multihead_in_transformer_encoder_layer_is_never_bypassed():
    """nn.TransformerEncoderLayer's fused inference path would compute exact attention from
    in_proj_weight; the module's pre-hook disables it, so eval/no_grad gives the FAVOR output."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(24, 4, dim_feedforward=32, dropout=0.0, batch_first=True).double()
    layer.eval()
    x = randn(2, 7, 24)
    with torch.no_grad():
        exact = layer(x)
    layer.self_attn = MultiheadFavorAttention.from_torch(layer.self_attn, nb_features=8)
    with torch.no_grad():
        fast = layer(x)  # conditions of the fused path hold here
    slow = layer(x)  # grad enabled: the ordinary path
    assert torch.equal(fast, slow)
    assert not torch.allclose(fast, exact, atol=1e-3)


def test_multihead_state_dict_names_match_torch():
    mha, fav = _mha_pair(nb_features=8, add_bias_kv=True)
    assert set(mha.state_dict()) <= set(fav.state_dict())
    assert set(fav.state_dict()) - set(mha.state_dict()) == {"favor.projection", "favor.draw_state"}
    for name, tensor in mha.state_dict().items():
        assert torch.equal(fav.state_dict()[name], tensor)
