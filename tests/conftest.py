import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests are single-process; keep intra-op threads fixed so results are reproducible.
    torch.set_num_threads(2)
    yield


def make_qkv(B, H, Lq, Lk, D, Dv, *, seed=0, std=0.5, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype) * std
    k = torch.randn(B, H, Lk, D, generator=g, dtype=dtype) * std
    v = torch.randn(B, H, Lk, Dv, generator=g, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v
