"""The fused kernels' CPU workspace (scratch buffers kept between calls in each thread): results
are bit-for-bit those of per-call buffers, whatever the interleaving of calls; it stays within
``fused.WORKSPACE_BYTES``; it can be released; and it never leaks into outputs."""

from __future__ import annotations

import threading

import pytest
import torch

import favor
from favor import fused


def _case(L: int, seed: int, H: int = 2, d: int = 8, m: int = 12):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, L, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = favor.gaussian_orthogonal_matrix(m, d, generator=g, dtype=torch.float64)
    up = torch.randn(1, H, L, d, generator=g, dtype=torch.float64)
    return q, k, v, w, up


def _interleaved(causal: bool, features: str):
    """Forward A, forward B (another length), backward B, backward A: outputs and gradients."""
    a, b = _case(200, 0), _case(63, 1)  # B fits in the buffers A used
    out_a = favor.favor_attention(*a[:4], is_causal=causal, features=features, chunk_size=16)
    out_b = favor.favor_attention(*b[:4], is_causal=causal, features=features, chunk_size=16)
    snapshot = out_a.detach().clone()
    out_b.backward(b[4])
    out_a.backward(a[4])
    assert torch.equal(out_a.detach(), snapshot)  # later calls never write into an earlier output
    return [out_a.detach(), out_b.detach()] + [t.grad for t in a[:3] + b[:3]]


@pytest.mark.parametrize("features", ["positive", "hyperbolic_oprf"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_workspace_gives_the_same_bits_as_per_call_buffers(monkeypatch, causal, features):
    fused.release_workspace()
    kept = _interleaved(causal, features)
    monkeypatch.setattr(fused, "WORKSPACE_BYTES", 0)
    fresh = _interleaved(causal, features)
    for x, y in zip(kept, fresh):
        assert torch.equal(x, y)


def test_workspace_stays_within_its_budget_and_can_be_released(monkeypatch):
    monkeypatch.setattr(fused, "WORKSPACE_BYTES", 2**20)
    fused.release_workspace()
    q, k, v, w, up = _case(512, 0, H=8, d=16, m=64)  # float64 (8, 512, 64) logits: 2 MiB alone
    favor.favor_attention(q, k, v, w, is_causal=True).backward(up)
    kept = fused._WORKSPACE.buffers[(torch.device("cpu"), torch.float64)]
    assert kept and sum(b.numel() * b.element_size() for b in kept.values()) <= 2**20
    fused.release_workspace()
    assert not hasattr(fused._WORKSPACE, "buffers")


def test_workspace_filled_under_inference_mode_serves_training_calls():
    fused.release_workspace()
    q, k, v, w, up = _case(40, 0)
    with torch.inference_mode():
        favor.favor_attention(q.detach(), k.detach(), v.detach(), w, is_causal=True)
    out = favor.favor_attention(q, k, v, w, is_causal=True)
    out.backward(up)
    assert torch.isfinite(q.grad).all()


def test_nested_scratch_does_not_share_the_workspace():
    like = torch.zeros(1)
    with fused._scratch(like) as outer, fused._scratch(like) as inner:
        assert outer.keep is not None and inner.keep is None
    with fused._scratch(like) as again:  # released after the outer call
        assert again.keep is outer.keep


def test_threads_have_their_own_workspaces():
    """Two threads running the kernels at once give the same results as one thread alone."""
    cases = [_case(150, s) for s in range(2)]
    expected = [favor.favor_attention(*c[:4], is_causal=True).detach() for c in cases]
    got: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        got[i] = [favor.favor_attention(*cases[i][:4], is_causal=True).detach() for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(o, expected[i]) for o in got[i])


def test_fake_tensor_tracing_leaves_the_workspace_alone():
    """Shapes traced under FakeTensorMode (FLOP counters, memory estimators) must not be kept:
    later eager calls would compute into fake storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fused.release_workspace()
    q, k, v, w, _ = _case(40, 0)
    q, k, v = (t.detach() for t in (q, k, v))
    expected = favor.favor_attention(q, k, v, w, is_causal=True)
    fused.release_workspace()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        favor.favor_attention(*(mode.from_tensor(t) for t in (q, k, v)), mode.from_tensor(w), is_causal=True)
    assert not getattr(fused._WORKSPACE, "buffers", {}).get((torch.device("cpu"), torch.float64))
    assert torch.equal(favor.favor_attention(q, k, v, w, is_causal=True), expected)


def test_lowering_the_budget_drops_what_the_workspace_holds(monkeypatch):
    fused.release_workspace()
    q, k, v, w, _ = _case(300, 0)
    favor.favor_attention(q.detach(), k.detach(), v.detach(), w, is_causal=True)
    kept = fused._WORKSPACE.buffers[(torch.device("cpu"), torch.float64)]
    assert kept
    monkeypatch.setattr(fused, "WORKSPACE_BYTES", 0)
    favor.favor_attention(q.detach(), k.detach(), v.detach(), w, is_causal=True)
    assert not kept
