"""Numerics under stress: half precision / autocast, huge norms, long sequences, degenerate inputs."""

import pytest
import torch

import favor
from favor.reference import softmax_attention

from conftest import make_qkv

KINDS = [(f, "softmax") for f in favor.FEATURES] + [(None, "relu"), (None, "elu")]
KIND_IDS = [f if k == "softmax" else k for f, k in KINDS]


def _proj(kernel, m=32, d=16, dtype=torch.float32):
    if kernel == "elu":
        return None
    return favor.gaussian_orthogonal_matrix(m, d, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("L", [1, 257], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_bf16_autocast_with_huge_norms_is_finite(features, kernel, is_causal, L):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, L, 16, generator=g) * 10).bfloat16(), (torch.randn(2, 2, L, 16, generator=g) * 10).bfloat16()
    v = torch.randn(2, 2, L, 16, generator=g).bfloat16()
    for t in (q, k, v):
        t.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = favor.favor_attention(q, k, v, _proj(kernel), features=features, kernel=kernel, is_causal=is_causal)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    for name, t in zip("qkv", (q, k, v)):
        assert t.grad.dtype == torch.bfloat16
        assert torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_float32_inputs_under_autocast_keep_float32_and_state_is_float32(features, kernel, is_causal):
    q, k, v = make_qkv(1, 2, 40, 40, 16, 8, dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = favor.favor_attention(q, k, v, _proj(kernel), features=features, kernel=kernel, is_causal=is_causal)
    exact = favor.favor_attention(q, k, v, _proj(kernel), features=features, kernel=kernel, is_causal=is_causal)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, exact)  # autocast does not lower the kernel's precision
    if is_causal:
        _, state = favor.favor_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), _proj(kernel), features=features,
                                         kernel=kernel, is_causal=True, return_state=True)
        assert state.kv.dtype == state.k_sum.dtype == torch.float32


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_sixty_five_thousand_tokens_in_bf16(features, kernel, is_causal):
    L = 65536
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, L, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    out = favor.favor_attention(q, k, v, _proj(kernel, m=16), features=features, kernel=kernel,
                                is_causal=is_causal, chunk_size=256)
    assert out.shape == (1, 1, L, 16) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_all_keys_masked_gives_zeros_and_zero_gradients(features, kernel, is_causal):
    q, k, v = make_qkv(2, 2, 12, 12, 16, 8, dtype=torch.float32, seed=4, requires_grad=True)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    out = favor.favor_attention(q, k, v, _proj(kernel), features=features, kernel=kernel, is_causal=is_causal,
                                key_padding_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and not t.grad.any()


@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_a_single_key_returns_its_value(features, kernel):
    q, k, v = make_qkv(2, 2, 5, 1, 16, 8, seed=5)
    out = favor.favor_attention(q, k, v, _proj(kernel, dtype=torch.float64), features=features, kernel=kernel)
    torch.testing.assert_close(out, v.expand_as(out), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_zero_queries_and_keys_give_uniform_attention(features, kernel, is_causal):
    _, _, v = make_qkv(1, 2, 9, 9, 16, 4, seed=6)
    zeros = torch.zeros(1, 2, 9, 16, dtype=torch.float64)
    out = favor.favor_attention(zeros, zeros, v, _proj(kernel, dtype=torch.float64), features=features, kernel=kernel,
                                is_causal=is_causal)
    torch.testing.assert_close(out, softmax_attention(zeros, zeros, v, is_causal=is_causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_non_contiguous_and_expanded_inputs(features, kernel, is_causal):
    q, k, v = make_qkv(1, 3, 20, 20, 16, 8, seed=7)
    w = _proj(kernel, dtype=torch.float64)
    kw = dict(features=features, kernel=kernel, is_causal=is_causal)
    ref = favor.favor_attention(q.expand(4, -1, -1, -1).contiguous(), k.expand(4, -1, -1, -1).contiguous(),
                                v.expand(4, -1, -1, -1).contiguous(), w, **kw)
    expanded = favor.favor_attention(q.expand(4, -1, -1, -1), k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1), w, **kw)
    torch.testing.assert_close(expanded, ref, rtol=1e-12, atol=1e-12)
    # (B, L, H, D) memory viewed as (B, H, L, D), as produced by a fused qkv projection
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(favor.favor_attention(qt, kt, vt, w, **kw), ref[:1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_on", ["q", "k", "v", "qk", "none"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
def test_requires_grad_on_some_inputs_only(grad_on, is_causal):
    q, k, v = make_qkv(1, 2, 30, 30, 16, 8, seed=8)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    w = _proj("softmax", dtype=torch.float64)
    out = favor.favor_attention(*full, w, is_causal=is_causal)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    part = [t.clone().requires_grad_(name in grad_on) for name, t in zip("qkv", (q, k, v))]
    out2 = favor.favor_attention(*part, w, is_causal=is_causal)
    torch.testing.assert_close(out2.detach(), out.detach(), rtol=1e-12, atol=1e-12)
    if grad_on == "none":
        assert not out2.requires_grad
        return
    out2.backward(upstream)
    for name, a, b in zip("qkv", part, full):
        if name in grad_on:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        else:
            assert a.grad is None


@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_float16_inputs_keep_float16(features, kernel):
    q, k, v = make_qkv(1, 2, 33, 33, 16, 8, seed=9, dtype=torch.float16)
    out = favor.favor_attention(q, k, v, _proj(kernel), features=features, kernel=kernel, is_causal=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = favor.favor_attention(q.float(), k.float(), v.float(), _proj(kernel), features=features, kernel=kernel,
                                is_causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3)
