"""Property-based tests (hypothesis): random shapes, masks, feature kinds and chunk sizes."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import favor
from favor.reference import explicit_favor_attention

KINDS = [(f, "softmax") for f in favor.FEATURES] + [(None, "relu"), (None, "elu")]

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    L = draw(st.integers(1, 40))
    D = draw(st.integers(1, 9))
    Dv = draw(st.integers(1, 6))
    m = draw(st.integers(1, 24))
    features, kernel = draw(st.sampled_from(KINDS))
    chunk = draw(st.integers(1, 50))
    seed = draw(st.integers(0, 2**16))
    std = draw(st.sampled_from([0.1, 0.5, 1.0]))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * std
    k = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * std
    v = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7]))
    w = None if kernel == "elu" else favor.gaussian_orthogonal_matrix(m, D, generator=g, dtype=torch.float64)
    return dict(q=q, k=k, v=v, w=w, mask=mask, features=features, kernel=kernel, chunk=chunk)


def _call(p, *, is_causal, q=None, k=None, v=None, mask="same", **extra):
    return favor.favor_attention(
        p["q"] if q is None else q, p["k"] if k is None else k, p["v"] if v is None else v, p["w"],
        features=p["features"], kernel=p["kernel"], is_causal=is_causal,
        key_padding_mask=p["mask"] if mask == "same" else mask, chunk_size=p["chunk"], **extra)


def _close(a, b):
    scale = max(float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= 1e-9 * scale


@SETTINGS
@given(problems(), st.booleans())
def test_linear_time_equals_reference_and_is_finite(p, is_causal):
    out = _call(p, is_causal=is_causal)
    ref = explicit_favor_attention(p["q"], p["k"], p["v"], p["w"], features=p["features"], kernel=p["kernel"],
                                   is_causal=is_causal, key_padding_mask=p["mask"])
    assert torch.isfinite(out).all()
    if p["features"] != "trig":  # trig denominators can cancel to ~0: compare the well-conditioned kinds
        assert _close(out, ref)


@SETTINGS
@given(problems(), st.data())
def test_causality(p, data):
    L = p["q"].shape[2]
    t = data.draw(st.integers(0, L - 1))
    out = _call(p, is_causal=True)
    q, k, v = (x.clone() for x in (p["q"], p["k"], p["v"]))
    for x in (q, k, v):
        x[:, :, t + 1 :] += 3.0
    out2 = _call(p, is_causal=True, q=q, k=k, v=v)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])


@SETTINGS
@given(problems(), st.data())
def test_split_equals_whole(p, data):
    L = p["q"].shape[2]
    s = data.draw(st.integers(0, L))
    whole = _call(p, is_causal=True)
    sl = lambda x, a, b: x[:, :, a:b]  # noqa: E731
    first, state = _call(p, is_causal=True, q=sl(p["q"], 0, s), k=sl(p["k"], 0, s), v=sl(p["v"], 0, s),
                         mask=p["mask"][:, :s], return_state=True)
    second = _call(p, is_causal=True, q=sl(p["q"], s, L), k=sl(p["k"], s, L), v=sl(p["v"], s, L),
                   mask=p["mask"][:, s:], initial_state=state)
    assert _close(torch.cat((first, second), dim=2), whole)


@SETTINGS
@given(problems())
def test_padding_equals_removal_bidirectional(p):
    out = _call(p, is_causal=False)
    for b in range(p["q"].shape[0]):
        keep = p["mask"][b]
        # self-attention: the padded positions go as keys and as queries
        sub = _call(p, is_causal=False, q=p["q"][b : b + 1, :, keep], k=p["k"][b : b + 1, :, keep],
                    v=p["v"][b : b + 1, :, keep], mask=None)
        if keep.any():
            assert _close(out[b : b + 1, :, keep], sub)
        else:
            assert not out[b].any()
