"""torch.compile(fullgraph=True) traces favor_attention's fused kernels, forward and backward
(custom autograd Functions included) without graph breaks, and matches eager."""

import pytest
import torch

import favor


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fullgraph_compile_matches_eager_with_gradients(causal):
    g = torch.Generator().manual_seed(0)
    w = favor.gaussian_orthogonal_matrix(24, 8, generator=g)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=g) for _ in range(3))
    up = torch.randn(1, 2, 37, 8, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(up)
        return out.detach(), [t.grad for t in leaves]

    def attend(q, k, v):
        return favor.favor_attention(q, k, v, w, is_causal=causal)

    torch._dynamo.reset()
    out_c, grads_c = run(torch.compile(attend, fullgraph=True))
    out_e, grads_e = run(attend)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fullgraph_compile_of_a_favor_plus_plus_decoding_step():
    """A step from a FavorState with FAVOR++'s A: the state's value checks stay out of the trace."""
    g = torch.Generator().manual_seed(0)
    w = favor.gaussian_orthogonal_matrix(16, 8, generator=g)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    _, state = favor.favor_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], w, is_causal=True, features="oprf",
                                     return_state=True)

    def step(q, k, v, state):
        return favor.favor_attention_step(q, k, v, w, state, features="oprf")

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], state)
    expected = step(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], state)
    for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
