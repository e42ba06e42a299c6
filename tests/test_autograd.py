"""The custom autograd Functions of favor.fused: gradcheck in float64, and outputs and ALL gradients
(query, key, value, projection) against favor.reference with random upstream gradients."""

import math

import pytest
import torch

import favor
from favor import fused
from favor.reference import explicit_favor_attention

# (features, kernel)
KINDS = [("positive", "softmax"), ("hyperbolic", "softmax"), ("oprf", "softmax"),
         ("hyperbolic_oprf", "softmax"), (None, "relu"), (None, "elu")]
KIND_IDS = [f if k == "softmax" else k for f, k in KINDS]


def test_every_fused_kind_is_covered_here():
    assert set(KINDS) == set(fused.FUSED_KINDS)


def _inputs(B, H, L, d, dv, seed, std=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d, generator=g, dtype=torch.float64) * std
    k = torch.randn(B, H, L, d, generator=g, dtype=torch.float64) * std
    v = torch.randn(B, H, L, dv, generator=g, dtype=torch.float64)
    return q, k, v


def _spec_inputs(features, kernel, B, H, L, d, dv, m, seed, masked):
    """Arguments of the Functions: x, y, v (G, L, ·), weight, bias, const, mask."""
    q, k, v = _inputs(B, H, L, d, dv, seed)
    g = torch.Generator().manual_seed(seed + 1)
    proj = None if kernel == "elu" else favor.gaussian_orthogonal_matrix(m, d, generator=g, dtype=torch.float64)
    a = None
    if features in ("oprf", "hyperbolic_oprf"):
        a = favor.oprf_parameter(q * d ** -0.25, k * d ** -0.25)
    spec = fused.make_spec(proj, features, kernel, a, B * H, d)
    mask = None
    if masked:
        mask = torch.rand(B * H, L, generator=g) > 0.3
        mask[:, 0] = True
    G = B * H
    return (q.reshape(G, L, d), k.reshape(G, L, d), v.reshape(G, L, dv)), spec, mask


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_gradcheck_float64(features, kernel, causal, masked):
    # L=11 with chunk 4 and 8-row blocks: two blocks, a partial chunk; all inputs incl. W and b;
    # root = 0.7: the kernels scale queries and keys block by block.
    (x, y, v), spec, mask = _spec_inputs(features, kernel, 1, 2, 11, 5, 3, 6, seed=3, masked=masked)
    weight = None if spec.weight is None else spec.weight.detach().clone().requires_grad_(True)
    bias = None if spec.bias is None else spec.bias.detach().clone().requires_grad_(True)
    x, y, v = (t.clone().requires_grad_(True) for t in (x, y, v))
    if causal:
        def f(x, y, v, weight, bias):
            return fused._CausalFavor.apply(x, y, v, weight, bias, spec.const, mask, spec.kind, spec.m, 4, 8, 0.7)
    else:
        def f(x, y, v, weight, bias):
            return fused._BidirectionalFavor.apply(x, y, v, weight, bias, spec.const, mask, spec.kind, spec.m, 4, 0.7)
    assert torch.autograd.gradcheck(f, (x, y, v, weight, bias), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# B, H, L, d, dv, m
SHAPES = [(2, 3, 63, 16, 7, 40), (1, 1, 1, 8, 8, 8), (1, 2, 130, 12, 12, 20)]
SHAPE_IDS = [f"B{b}-H{h}-L{l}-d{d}-dv{dv}-m{m}" for b, h, l, d, dv, m in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_all_gradients_match_reference_with_random_upstream(features, kernel, causal, shape):
    B, H, L, d, dv, m = shape
    q, k, v = _inputs(B, H, L, d, dv, seed=5)
    g = torch.Generator().manual_seed(6)
    w = None if kernel == "elu" else favor.gaussian_orthogonal_matrix(m, d, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v) + (() if w is None else (w,))]
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[:, 0] = True
    kw = dict(features=features, kernel=kernel, is_causal=causal, key_padding_mask=mask)
    up = torch.randn(B, H, L, dv, generator=g, dtype=torch.float64)
    out = favor.favor_attention(q, k, v, w, chunk_size=16, **kw)
    grads = torch.autograd.grad(out, leaves, up)
    ref = explicit_favor_attention(q, k, v, w, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, up)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip("qkvw", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda s, n=name: f"grad {n}: {s}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_large_log_scale_jumps_stay_exact(causal):
    # keys whose norms jump by orders of magnitude inside a chunk: the stabilisers must keep
    # float32 finite and agree with the float64 reference.
    q, k, v = _inputs(1, 2, 40, 8, 4, seed=7, std=0.3)
    k = k.clone()
    k[..., 13, :] *= 12.0
    k[..., 29, :] *= 20.0
    w = favor.gaussian_orthogonal_matrix(16, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = favor.favor_attention(q.float(), k.float(), v.float(), w.float(), is_causal=causal, chunk_size=8)
    ref = explicit_favor_attention(q, k, v, w, is_causal=causal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-5)


def test_fused_and_generic_paths_agree_on_state_and_gradient_of_resumed_call():
    # the generic path (initial_state with autograd) and the fused one (no grad) share one
    # FavorState convention: resuming from either gives the same outputs.
    q, k, v = _inputs(1, 2, 50, 8, 4, seed=9)
    w = favor.gaussian_orthogonal_matrix(16, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with torch.no_grad():
        _, state = favor.favor_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], w, is_causal=True,
                                         return_state=True)
    qq = q[:, :, 20:].clone().requires_grad_(True)
    out_generic = favor.favor_attention(qq, k[:, :, 20:], v[:, :, 20:], w, is_causal=True, initial_state=state)
    with torch.no_grad():
        out_fused = favor.favor_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], w, is_causal=True,
                                          initial_state=state)
    full = explicit_favor_attention(q, k, v, w, is_causal=True)[:, :, 20:]
    torch.testing.assert_close(out_generic.detach(), full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_fused, full, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(torch.autograd.grad(out_generic.sum(), qq)[0].norm()))
