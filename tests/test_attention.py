"""favor_attention against the explicit O(L²) references (float64), causality, padding, state."""

import math

import pytest
import torch

import favor
from favor.reference import explicit_favor_attention, softmax_attention

from conftest import make_qkv

# (features, kernel, needs projection)
KINDS = [(f, "softmax") for f in favor.FEATURES] + [(None, "relu"), (None, "elu")]
KIND_IDS = [f if k == "softmax" else k for f, k in KINDS]

# B, H, Lq, Lk, D, Dv, m
SHAPES = [
    (2, 3, 63, 63, 16, 16, 40),  # m not a multiple of d, L not a multiple of the chunk
    (1, 2, 1, 1, 8, 8, 8),  # a single token
    (1, 1, 257, 257, 12, 5, 20),  # d not a power of two, Dv != D
]
SHAPE_IDS = [f"B{b}-H{h}-L{lq}-d{d}-dv{dv}-m{m}" for b, h, lq, _, d, dv, m in SHAPES]


def projection_for(kernel, m, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if kernel == "elu":
        return None  # identity: the deterministic elu(x) + 1 baseline
    return favor.gaussian_orthogonal_matrix(m, d, generator=g, dtype=dtype)


def random_mask(B, L, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) > p
    mask[:, 0] = True
    return mask


def rel_err(a, b):
    """‖a − b‖ / ‖b‖, with ‖b‖ floored at 1e-3 so that exact zeros compare by absolute error."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-3))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_matches_explicit_reference_forward_and_gradients(features, kernel, shape, is_causal, masked):
    B, H, Lq, Lk, D, Dv, m = shape
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, seed=1, requires_grad=True)
    w = projection_for(kernel, m, D)
    mask = random_mask(B, Lk, seed=2) if masked else None
    kw = dict(features=features, kernel=kernel, is_causal=is_causal, key_padding_mask=mask)
    out = favor.favor_attention(q, k, v, w, chunk_size=16, **kw)
    ref = explicit_favor_attention(q, k, v, w, **kw)
    assert out.shape == (B, H, Lq, Dv) and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-10
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-9, name


@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_cross_attention_with_different_lengths(features, kernel):
    q, k, v = make_qkv(2, 2, 17, 40, 8, 6, seed=3)
    w = projection_for(kernel, 24, 8)
    mask = random_mask(2, 40, seed=4)
    out = favor.favor_attention(q, k, v, w, features=features, kernel=kernel, key_padding_mask=mask)
    ref = explicit_favor_attention(q, k, v, w, features=features, kernel=kernel, key_padding_mask=mask)
    assert out.shape == (2, 2, 17, 6)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("t", [0, 20, 31, 32, 50], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_causal_outputs_do_not_see_the_future_bit_for_bit(features, kernel, t):
    L = 63
    q, k, v = make_qkv(2, 2, L, L, 8, 8, seed=5, dtype=torch.float32)
    w = projection_for(kernel, 20, 8, dtype=torch.float32)
    kw = dict(features=features, kernel=kernel, is_causal=True, chunk_size=32)
    out = favor.favor_attention(q, k, v, w, **kw)
    g = torch.Generator().manual_seed(6)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):  # very different futures, large keys included
        x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=g) * 20
    out2 = favor.favor_attention(q2, k2, v2, w, **kw)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
    if t + 1 < L:
        assert not torch.equal(out[:, :, t + 1 :], out2[:, :, t + 1 :])


@pytest.mark.parametrize("split", [1, 16, 40], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_split_and_resume_equals_one_call(features, kernel, split):
    q, k, v = make_qkv(2, 3, 63, 63, 8, 5, seed=7)
    w = projection_for(kernel, 12, 8)
    mask = random_mask(2, 63, seed=8)
    kw = dict(features=features, kernel=kernel, is_causal=True, chunk_size=16)
    whole, final = favor.favor_attention(q, k, v, w, key_padding_mask=mask, return_state=True, **kw)
    a, state = favor.favor_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], w,
                                     key_padding_mask=mask[:, :split], return_state=True, **kw)
    b, state = favor.favor_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], w,
                                     key_padding_mask=mask[:, split:], initial_state=state,
                                     return_state=True, **kw)
    torch.testing.assert_close(torch.cat((a, b), dim=2), whole, rtol=1e-12, atol=1e-12)
    for s, f in zip(state, final):
        if s is not None:
            torch.testing.assert_close(s, f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_step_by_step_decoding_equals_full_causal_call(features, kernel):
    L = 21
    q, k, v = make_qkv(1, 2, L, L, 8, 4, seed=9)
    w = projection_for(kernel, 16, 8)
    full = favor.favor_attention(q, k, v, w, features=features, kernel=kernel, is_causal=True)
    state, steps = None, []
    for t in range(L):
        o, state = favor.favor_attention_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                                              w, state, features=features, kernel=kernel)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_output_does_not_depend_on_chunk_size(features, kernel, chunk_size):
    q, k, v = make_qkv(1, 2, 100, 100, 8, 8, seed=10)
    w = projection_for(kernel, 16, 8)
    kw = dict(features=features, kernel=kernel, is_causal=True)
    torch.testing.assert_close(favor.favor_attention(q, k, v, w, chunk_size=chunk_size, **kw),
                               favor.favor_attention(q, k, v, w, chunk_size=16, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_padding_equals_removal(features, kernel, is_causal):
    L = 45
    q, k, v = make_qkv(2, 2, L, L, 8, 6, seed=11)
    w = projection_for(kernel, 16, 8)
    mask = random_mask(2, L, seed=12, p=0.4)
    mask[1, :3] = False  # left padding in one row
    kw = dict(features=features, kernel=kernel, is_causal=is_causal, chunk_size=8)
    out = favor.favor_attention(q, k, v, w, key_padding_mask=mask, **kw)
    for b in range(2):
        keep = mask[b]
        # self-attention: remove the padded positions entirely (as keys and as queries)
        sub = favor.favor_attention(q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep], w, **kw)
        torch.testing.assert_close(out[b : b + 1, :, keep], sub, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_cross_attention_padding_equals_key_removal(features, kernel):
    q, k, v = make_qkv(2, 2, 17, 30, 8, 6, seed=31)
    w = projection_for(kernel, 16, 8)
    mask = random_mask(2, 30, seed=32, p=0.4)
    out = favor.favor_attention(q, k, v, w, features=features, kernel=kernel, key_padding_mask=mask)
    for b in range(2):
        keep = mask[b]  # every query stays; the padded keys go
        sub = favor.favor_attention(q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep], w,
                                    features=features, kernel=kernel)
        torch.testing.assert_close(out[b : b + 1], sub, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("features", ["oprf", "hyperbolic_oprf"])
def test_query_padding_mask_equals_query_removal(features):
    """Cross-attention (Lq ≠ Lk) with padded queries: with query_padding_mask the real queries'
    outputs equal a call without the padded queries (FAVOR++'s A ignores them); in self-attention
    the default (the key mask) is the same as passing it."""
    q, k, v = make_qkv(2, 2, 17, 30, 8, 6, seed=41)
    w = projection_for("softmax", 16, 8)
    qmask = random_mask(2, 17, seed=42, p=0.4)
    q_pad = q.masked_fill(~qmask[:, None, :, None], 1e3)  # padding content that would move A a lot
    out = favor.favor_attention(q_pad, k, v, w, features=features, query_padding_mask=qmask)
    for b in range(2):
        keep = qmask[b]
        sub = favor.favor_attention(q[b : b + 1, :, keep], k[b : b + 1], v[b : b + 1], w, features=features)
        torch.testing.assert_close(out[b : b + 1, :, keep], sub, rtol=1e-12, atol=1e-12)
    q, k, v = make_qkv(2, 2, 30, 30, 8, 6, seed=43)
    kmask = random_mask(2, 30, seed=44, p=0.4)
    assert torch.equal(favor.favor_attention(q, k, v, w, features=features, key_padding_mask=kmask),
                       favor.favor_attention(q, k, v, w, features=features, key_padding_mask=kmask,
                                             query_padding_mask=kmask))


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_masked_keys_reach_neither_numerator_nor_denominator(features, kernel, is_causal):
    # Huge values and keys at masked positions must not change anything.
    q, k, v = make_qkv(1, 2, 30, 30, 8, 4, seed=13)
    w = projection_for(kernel, 16, 8)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 10:15] = False
    kw = dict(features=features, kernel=kernel, is_causal=is_causal, key_padding_mask=mask)
    out = favor.favor_attention(q, k, v, w, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:15] = 50.0
    v2[:, :, 10:15] = 1e30
    out2 = favor.favor_attention(q, k2, v2, w, **kw)
    keep = mask[0]
    torch.testing.assert_close(out[:, :, keep], out2[:, :, keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_nothing_to_attend_gives_zeros(features, kernel, is_causal):
    q, k, v = make_qkv(2, 2, 10, 10, 8, 4, seed=14)
    w = projection_for(kernel, 16, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0] = False  # batch 0: no key at all
    mask[1, :4] = False  # batch 1: causal queries 0..3 see nothing
    out = favor.favor_attention(q, k, v, w, features=features, kernel=kernel, is_causal=is_causal,
                                key_padding_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    if is_causal:
        assert torch.equal(out[1, :, :4], torch.zeros_like(out[1, :, :4]))
    assert torch.isfinite(out).all()


def _mean_attention_error(m, projection, seeds=6, features="positive"):
    q, k, v = make_qkv(1, 4, 128, 128, 16, 16, seed=20, std=0.6)
    exact = softmax_attention(q, k, v)
    errs = []
    for s in range(seeds):
        w = favor.projection_matrix(projection, m, 16, generator=torch.Generator().manual_seed(100 + s),
                                    dtype=torch.float64)
        errs.append(rel_err(favor.favor_attention(q, k, v, w, features=features), exact))
    return sum(errs) / len(errs)


@pytest.mark.parametrize("features", ["positive", "hyperbolic", "oprf"])
def test_attention_error_falls_as_m_grows(features):
    errors = [_mean_attention_error(m, "orthogonal", seeds=10, features=features) for m in (16, 64, 256, 1024)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    # Monte Carlo rate 1/√m: 64× the features should cut the error about 8×; ask for at least 3×
    assert errors[3] < errors[0] / 3


@pytest.mark.parametrize("features", ["positive", "hyperbolic"])
@pytest.mark.parametrize("m", [8, 16], ids=lambda m: f"m{m}")
def test_orthogonal_features_beat_iid_on_average(features, m):
    # Theorem 2 of the paper: for m ≤ d (here d = 16) orthogonal rows lower the MSE of the kernel
    # estimate φ(x)ᵀφ(y) of exp(xᵀy); averaged over 64×64 pairs and 100 independent draws.
    d = 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, d, dtype=torch.float64, generator=g) * 0.35
    y = torch.randn(64, d, dtype=torch.float64, generator=g) * 0.35
    exact = torch.exp(x @ y.T)
    mse = {}
    for projection in ("iid", "orthogonal"):
        gen = torch.Generator().manual_seed(1)
        total = 0.0
        for _ in range(100):
            w = favor.projection_matrix(projection, m, d, generator=gen, dtype=torch.float64)
            est = favor.random_features(x, w, features) @ favor.random_features(y, w, features).T
            total += float(((est - exact) ** 2).mean())
        mse[projection] = total / 100
    assert mse["orthogonal"] < 0.9 * mse["iid"], mse


def test_positive_features_approximate_softmax_closely_with_many_features():
    q, k, v = make_qkv(1, 2, 64, 64, 8, 8, seed=21, std=0.5)
    w = favor.gaussian_orthogonal_matrix(8192, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for is_causal in (False, True):
        out = favor.favor_attention(q, k, v, w, is_causal=is_causal)
        assert rel_err(out, softmax_attention(q, k, v, is_causal=is_causal)) < 0.03


def test_scale_is_honoured():
    q, k, v = make_qkv(1, 1, 16, 16, 8, 8, seed=22)
    w = favor.gaussian_orthogonal_matrix(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = favor.favor_attention(q, k, v, w, scale=0.5)
    b = favor.favor_attention(q * math.sqrt(2), k * math.sqrt(2), v, w, scale=0.25)  # same x = √s·q, y = √s·k
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ref = explicit_favor_attention(q, k, v, w, scale=0.5)
    assert rel_err(a, ref) < 1e-10


# ---------------------------------------------------------------- bad input

def _good():
    q, k, v = make_qkv(2, 3, 5, 5, 8, 8, dtype=torch.float32)
    return q, k, v, torch.randn(16, 8)


BAD_CASES = [
    ("rank", lambda q, k, v, w: favor.favor_attention(q[0], k, v, w), ValueError, r"query must have shape \(B, H, L, D\), got \(3, 5, 8\)"),
    ("batch", lambda q, k, v, w: favor.favor_attention(q, k[:1], v, w), ValueError, "agree in batch and heads"),
    ("heads", lambda q, k, v, w: favor.favor_attention(q, k, v[:, :2], w), ValueError, "agree in batch and heads"),
    ("head-dim", lambda q, k, v, w: favor.favor_attention(q, k[..., :4], v, w), ValueError, "query has head dim 8 but key has 4"),
    ("value-len", lambda q, k, v, w: favor.favor_attention(q, k, v[:, :, :3], w), ValueError, "key has length 5 but value has 3"),
    ("proj-width", lambda q, k, v, w: favor.favor_attention(q, k, v, w[:, :6]), ValueError, r"projection must have shape \(m, 8\).*got \(16, 6\)"),
    ("proj-none", lambda q, k, v, w: favor.favor_attention(q, k, v, None), ValueError, "needs a"),
    ("features", lambda q, k, v, w: favor.favor_attention(q, k, v, w, features="cosine"), ValueError, "unknown features 'cosine'"),
    ("kernel", lambda q, k, v, w: favor.favor_attention(q, k, v, w, kernel="tanh"), ValueError, "unknown kernel 'tanh'"),
    ("features-with-relu", lambda q, k, v, w: favor.favor_attention(q, k, v, w, kernel="relu", features="trig"), ValueError, "applies to kernel='softmax' only"),
    ("mask-shape", lambda q, k, v, w: favor.favor_attention(q, k, v, w, key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, Lk\) = \(2, 5\), got \(2, 4\)"),
    ("mask-dtype", lambda q, k, v, w: favor.favor_attention(q, k, v, w, key_padding_mask=torch.ones(2, 5)), TypeError, "must be torch.bool"),
    ("causal-lengths", lambda q, k, v, w: favor.favor_attention(q[:, :, :3], k, v, w, is_causal=True), ValueError, "Lq=3, Lk=5"),
    ("dtype-mix", lambda q, k, v, w: favor.favor_attention(q.double(), k, v, w), TypeError, "share a dtype"),
    ("int-tensor", lambda q, k, v, w: favor.favor_attention(q.long(), k, v, w), TypeError, "floating-point"),
    ("not-tensor", lambda q, k, v, w: favor.favor_attention(q.tolist(), k, v, w), TypeError, "query must be a torch.Tensor, got list"),
    ("scale", lambda q, k, v, w: favor.favor_attention(q, k, v, w, scale=-1.0), ValueError, "scale must be positive"),
    ("chunk", lambda q, k, v, w: favor.favor_attention(q, k, v, w, is_causal=True, chunk_size=0), ValueError, "chunk_size must be a positive int, got 0"),
    ("state-bidir", lambda q, k, v, w: favor.favor_attention(q, k, v, w, return_state=True), ValueError, "return_state needs is_causal=True"),
    ("step-length", lambda q, k, v, w: favor.favor_attention_step(q, k, v, w, None), ValueError, "one token"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_clear_error(call, exc, match):
    q, k, v, w = _good()
    with pytest.raises(exc, match=match):
        call(q, k, v, w)


def test_state_of_wrong_shape_is_rejected():
    q, k, v, w = _good()
    _, state = favor.favor_attention(q, k, v, w, is_causal=True, return_state=True)
    with pytest.raises(ValueError, match=r"initial_state.kv must have shape \(1, "):
        favor.favor_attention(q[:1], k[:1], v[:1], w, is_causal=True, initial_state=state)


def test_state_fields_are_validated():
    """A missing kv, an oprf_a of the wrong shape, and an oprf_a with 1 - 4A <= 0 (NaN features)
    are named errors, not torch broadcast errors or NaN outputs."""
    q, k, v, w = _good()
    B, H = q.shape[:2]
    _, state = favor.favor_attention(q, k, v, w, is_causal=True, features="oprf", return_state=True)
    call = lambda st: favor.favor_attention(q, k, v, w, is_causal=True, features="oprf", initial_state=st)  # noqa: E731
    with pytest.raises(ValueError, match="initial_state.kv must have shape"):
        call(state._replace(kv=None))
    with pytest.raises(ValueError, match=rf"oprf_a must be a floating \(B, H\) = \({B}, {H}\) tensor"):
        call(state._replace(oprf_a=state.oprf_a[:, 0]))
    with pytest.raises(ValueError, match="oprf_a must be finite and below 1/4"):
        call(state._replace(oprf_a=torch.ones_like(state.oprf_a)))
    assert torch.isfinite(call(state._replace(oprf_a=torch.zeros_like(state.oprf_a)))).all()  # A = 0 is FAVOR+


def test_empty_batch_with_mask_and_zero_head_dim():
    q = torch.randn(0, 2, 5, 4)
    w = torch.randn(8, 4)
    for causal in (False, True):
        out = favor.favor_attention(q, q, q, w, is_causal=causal, key_padding_mask=torch.ones(0, 5, dtype=torch.bool))
        assert out.shape == (0, 2, 5, 4)
    with pytest.raises(ValueError, match="head dim must be at least 1"):
        favor.favor_attention(*(torch.randn(1, 1, 3, 0),) * 3, None, kernel="relu")


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
def test_higher_order_gradients_need_the_generic_backend(is_causal):
    """The fused backward is not differentiable: create_graph=True is a clear error there (not a
    silently zero Hessian), and backend='generic' gives the reference's Hessian."""
    from favor.reference import explicit_favor_attention

    q, k, v = make_qkv(1, 2, 6, 6, 4, 3, seed=3)
    w = favor.gaussian_orthogonal_matrix(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(fn, **kw):
        return lambda x: fn(x, k, v, w, is_causal=is_causal, **kw).pow(2).sum()

    with pytest.raises(RuntimeError, match="no double backward.*backend='generic'"):
        torch.autograd.functional.hessian(loss(favor.favor_attention), q)
    hessian = torch.autograd.functional.hessian(loss(favor.favor_attention, backend="generic"), q)
    expected = torch.autograd.functional.hessian(loss(explicit_favor_attention), q)
    torch.testing.assert_close(hessian, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        favor.favor_attention(q, k, v, w, backend="cuda")


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("features,kernel", KINDS, ids=KIND_IDS)
def test_padded_positions_do_not_leak_into_real_tokens(features, kernel, is_causal):
    # Self-attention as a model runs it: padded positions are queries too, and their content
    # (queries included, which FAVOR++'s parameter A is computed from) must not move real outputs.
    q, k, v = make_qkv(2, 2, 24, 24, 8, 4, seed=30)
    w = projection_for(kernel, 16, 8)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 18:] = False  # right padding
    mask[1, :5] = False  # left padding
    kw = dict(features=features, kernel=kernel, is_causal=is_causal, key_padding_mask=mask)
    out = favor.favor_attention(q, k, v, w, **kw)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    pad = ~mask
    for t in (q2, k2, v2):
        t.transpose(1, 2)[pad] = 7.0  # (B, L, H, D) view: overwrite padded positions
    out2 = favor.favor_attention(q2, k2, v2, w, **kw)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], out2[real], rtol=1e-12, atol=1e-12)
