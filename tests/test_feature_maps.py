import math

import pytest
import torch

import favor
from favor.feature_maps import feature_map, oprf_parameter, oprf_parameter_from_rho, random_features

EXP_KINDS = [f for f in favor.FEATURES]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pair(d=8, seed=0, std=0.4):
    g = gen(seed)
    return torch.randn(d, generator=g, dtype=torch.float64) * std, torch.randn(d, generator=g, dtype=torch.float64) * std


def _kernel_estimates(kind, x, y, *, m, draws, projection="iid", seed=0):
    """φ(x)ᵀφ(y) for `draws` independent projections: (draws,) tensor."""
    d = x.shape[-1]
    g = gen(seed)
    ws = torch.stack([favor.projection_matrix(projection, m, d, generator=g, dtype=torch.float64)
                      for _ in range(draws)])  # (draws, m, d)
    xs = x.expand(draws, 1, d)  # (draws, 1, d)
    ys = y.expand(draws, 1, d)
    a = oprf_parameter(xs, ys) if kind in favor.feature_maps.OPRF_FEATURES else None  # (draws,)
    est = []
    for i in range(draws):
        ai = None if a is None else a[i]
        fx = random_features(xs[i], ws[i], kind, oprf_a=ai)  # (1, M)
        fy = random_features(ys[i], ws[i], kind, oprf_a=ai)
        est.append((fx @ fy.T).squeeze())
    return torch.stack(est)


@pytest.mark.parametrize("kind", EXP_KINDS)
@pytest.mark.parametrize("projection", ["iid", "orthogonal"])
def test_softmax_kernel_estimate_is_unbiased(kind, projection):
    x, y = _pair(d=8, seed=1)
    exact = torch.exp(x @ y)
    est = _kernel_estimates(kind, x, y, m=4, draws=2000, projection=projection, seed=2)
    stderr = est.std() / math.sqrt(est.numel())
    assert abs(float(est.mean() - exact)) < 4 * float(stderr), (float(est.mean()), float(exact), float(stderr))


def test_relu_and_elu_features_are_deterministic_kernels():
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=gen(3))
    relu = random_features(x, None, kernel="relu")
    torch.testing.assert_close(relu, (torch.relu(x) + favor.feature_maps.RELU_EPSILON) / math.sqrt(6))
    elu = random_features(x, None, kernel="elu")
    torch.testing.assert_close(elu, torch.nn.functional.elu(x) + 1)
    w = favor.gaussian_iid_matrix(10, 6, generator=gen(4), dtype=torch.float64)
    torch.testing.assert_close(random_features(x, w, kernel="elu"), torch.nn.functional.elu(x @ w.T) + 1)


@pytest.mark.parametrize("kind", EXP_KINDS)
def test_factored_form_is_bounded_and_exact(kind):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen(5)) * 3  # large norms
    w = favor.gaussian_orthogonal_matrix(12, 8, generator=gen(6), dtype=torch.float64)
    a = oprf_parameter(x, x) if kind in favor.feature_maps.OPRF_FEATURES else None
    f = feature_map(x, w, kind, oprf_a=a)
    assert f.psi.shape == (2, 3, 7, favor.num_features(12, kind))
    assert f.log_scale.shape == (2, 3, 7)
    assert float(f.psi.abs().max()) <= 1.0 + 1e-12
    direct = torch.exp(f.log_scale).unsqueeze(-1) * f.psi
    torch.testing.assert_close(direct, random_features(x, w, kind, oprf_a=a))


def test_oprf_parameter_matches_pairwise_definition():
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen(7))
    y = torch.randn(2, 6, 4, dtype=torch.float64, generator=gen(8))
    mask = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    x_mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])
    a = oprf_parameter(x, y, mask, x_mask)
    for b in range(2):
        ys, xs = y[b][mask[b]], x[b][x_mask[b]]
        rho = ((xs[:, None, :] + ys[None, :, :]) ** 2).sum(-1).mean() / 4
        expected = (1 - 2 * rho - torch.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16
        torch.testing.assert_close(a[b], expected)
    assert bool((a < 0).all())


def test_oprf_parameter_is_variance_minimising_on_a_grid():
    # For ρ fixed, the closed-form A minimises the (log) second moment of the OPRF estimator:
    # log E[φ(x)φ(y)]² ∝ d·log((1-4A)²/(1-8A)) / 2 + 2(1-4A)ρd/(1-8A) (Likhosherstov et al. 2022).
    d, rho = 16, torch.tensor(0.7, dtype=torch.float64)
    a_star = oprf_parameter_from_rho(rho)

    def log_second_moment(a):
        return d / 2 * torch.log((1 - 4 * a) ** 2 / (1 - 8 * a)) + 2 * (1 - 4 * a) * rho * d / (1 - 8 * a)

    grid = torch.linspace(-2.0, -1e-4, 4001, dtype=torch.float64)
    best = grid[torch.argmin(log_second_moment(grid))]
    assert abs(float(best - a_star)) < 1e-3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features="softplus"), "unknown features 'softplus'"),
        (dict(kernel="gelu"), "unknown kernel 'gelu'"),
        (dict(features="oprf"), "needs oprf_a"),
    ],
    ids=["bad-features", "bad-kernel", "oprf-no-a"],
)
def test_bad_feature_arguments(kwargs, match):
    x = torch.randn(3, 4)
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match=match):
        feature_map(x, w, **kwargs)
