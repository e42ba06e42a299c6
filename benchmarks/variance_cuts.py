"""Variance cuts for the softmax kernel beyond FAVOR++, measured on the issue's setting: the relative
error of the attention output at an equal budget of output features (default M = 256, d = 64,
L = 1024, q, k, v ~ N(0, 0.5²), bidirectional), mean ± std over seeds, as JSON.

    python benchmarks/variance_cuts.py --seeds 15 --json benchmarks/results/variance_cuts.json

Every estimator is written out here as explicit features φ(x), φ(y) with an L×L kernel matrix (a
slow, obviously-correct form: these are experiments, not kernels), in float64.  Each row says
whether E[φ(x)ᵀφ(y)] = exp(xᵀy) (``unbiased``: true, false, or "nearly" for the structured
Hadamard projections, whose rows are only approximately isotropic) and how many output features
it uses.

Estimators (x = q/d^¼, y = k/d^¼; "orthogonal" = Haar blocks of d rows with chi row norms):

* ``positive``, ``oprf``, ``hyperbolic_oprf``: favor's feature maps on orthogonal projections;
  ``hyperbolic_oprf*κ`` uses κ times FAVOR++'s closed-form A (unbiased for every A < 0): is the
  closed form, which minimises the kernel's variance, also best for the output error?
* ``hyperbolic_oprf`` on better-balanced projections, each row exactly Gaussian in law except
  ``hadamard``'s (favor's structured ORF, nearly so), ``mub`` (pairs of mutually unbiased bases R and HR/√d,
  H the Sylvester Hadamard matrix, R Haar), ``simplex`` (d unit vectors of a regular simplex,
  rotated by a Haar R), ``stratified`` (orthogonal, row norms from stratified chi quantiles:
  a random permutation of (i + U_i)/m), and ``sqrt_d`` (orthogonal with all norms √d: biased, a
  bound on what norm balancing can give).
* ``hyperbolic_sderf``: FAVOR#'s symmetric dense parameter: A per eigendirection of the pair
  second moment S = E[(x + y)(x + y)ᵀ] (from this draw's q and k), with A from FAVOR++'s closed
  form for that direction's spread, antithetic pairs.
* ``complex_gerf``: Chefs' Random Tables' generalised exponential features with complex parameters
  (the family holding both trig and FAVOR++): f₁(ω, x) = exp(A‖ω‖² + b₁ωᵀx − b₁²‖x‖²/(2(1 − 4A)))
  and f₂ the same with b₂ = (1 − 4A)/b₁, times (1 − 4A)^{d/4} each, so E[f₁f₂] = exp(xᵀy) for every
  complex A (Re A < 1/8) and b₁; the estimate is Re(f₁f₂), i.e. two real features (real and
  imaginary parts) per ω, on M/2 orthogonal ω.  (A, b₁) minimise the mean relative second moment
  (closed form) over 256 (x, y) pairs of this draw, from FAVOR++'s real and trig's imaginary start.
* ``hyperbolic_oprf_keycv`` (also ``/hadamard``): hyperbolic_oprf with a
  key-side control variate: φ(x)ᵀφ(y) − (F̄(y) − E F̄(y)), F̄(y) the mean of y's features and
  E F̄(y) its closed form (1 − 4A)^{d/4}(1 − 2A)^{−d/2}·exp((B²/(2(1 − 2A)) − ½)‖y‖²), on M/2 − 1
  projection pairs: one more
  feature (1 for queries, −(F̄(y) − E F̄(y)) for keys), unbiased.  ``hyperbolic_oprf_qkcv`` subtracts
  the query-side twin as well (one more feature): it only adds a constant to each row, which the
  normalisation does not cancel.
* ``hyperbolic_oprf_split*α`` (also ``/hadamard``): exp(xᵀy) = exp((αx)ᵀ(y/α)) for every α, so
  the features of αx and y/α (A from them) are unbiased too; α > 1 moves variance to the query
  side, whose row-wide part the normalisation cancels.
* ``hyperbolic_oprf_keynorm`` (also ``/hadamard``, ``*κ`` scales A), biased (a ratio): favor's
  ``key_estimator="normalized"``: each key's features times E F̄(y)/F̄(y), a self-normalised
  importance sample of exp(xᵀy) = E F̄(y)·E_{ω~p_y}[f(ω, x)], p_y ∝ f(ω, y)·N(ω; 0, I).
* ``hyperbolic_oprf_calibrated*κ`` (κ default 0.5), biased: the same, with each key's
  normalised weights u_r tilted towards the exact mean B·y/(1 − 2A) of p_y:
  u_r ← u_r(1 + γᵀ(ω_r − ω̄)), γ = κ(B·y − (1 − 2A)ω̄), clamped at 0 and renormalised; favor's
  ``key_estimator="calibrated"`` is κ = 0.25.  ``hyperbolic_oprf_calibrated_unclamped`` skips the
  clamp (weights may be negative).
* ``oprf_control``: FAVOR++ with a linear control variate: φ_r(x) − β(1 + ω_rᵀx) on both sides plus
  the exact corrections β(E φ(x) + E φ(y))(1 + c·xᵀy) − β²(1 + xᵀy), β = 0.8 (unbiased for every β).
  Each coefficient is a query term plus a key term, so the corrections cost 2(d + 1) exact
  features: M − 2(d + 1) random ones.
* ``maclaurin``: exp(t) = 1 + t + t²/2 + (t³/6)·E_{s~Beta(1,3)}[exp(s t)]: the first two terms
  exact (d + 1 features), t² from squared orthogonal projections with its exact correction
  (1 feature), the remainder from products of three Gaussian projections and positive features of
  √s·x (60 features): unbiased.
* ``taylor2`` (biased): the same without the remainder, i.e. an unbiased estimate of the
  second-order Taylor kernel 1 + t + t²/2, whose bias against exp(t) is Σ_{n≥3} tⁿ/n!.
* ``taylor1_exact`` (biased, deterministic): 1 + xᵀy with d + 1 exact features.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from common import emit_json

from favor.approx import _generator, draw_inputs
from favor.feature_maps import oprf_parameter, oprf_parameter_from_rho
from favor.projections import _haar_orthogonal_block, gaussian_orthogonal_matrix, hadamard_orthogonal_matrix

DEFAULT_ESTIMATORS = ("positive", "oprf", "hyperbolic_oprf", "hyperbolic_oprf*0.5", "hyperbolic_oprf*1.5",
                      "hyperbolic_oprf/hadamard", "hyperbolic_oprf/mub",
                      "hyperbolic_oprf/simplex", "hyperbolic_oprf/stratified", "hyperbolic_oprf/sqrt_d",
                      "hyperbolic_sderf", "complex_gerf", "hyperbolic_oprf_keycv",
                      "hyperbolic_oprf_keycv/hadamard", "hyperbolic_oprf_qkcv", "hyperbolic_oprf_split*1.3",
                      "hyperbolic_oprf_split*1.3/hadamard", "hyperbolic_oprf_keynorm", "hyperbolic_oprf_keynorm/hadamard",
                      "hyperbolic_oprf_calibrated*0.25", "hyperbolic_oprf_calibrated*0.5", "hyperbolic_oprf_calibrated*1",
                      "hyperbolic_oprf_calibrated_unclamped*1", "oprf_control", "maclaurin", "taylor2", "taylor1_exact")
BIASED = {"hyperbolic_oprf/sqrt_d", "taylor2", "taylor1_exact", "hyperbolic_oprf_keynorm",
          "hyperbolic_oprf_keynorm/hadamard", "hyperbolic_oprf_calibrated",
          "hyperbolic_oprf_calibrated_unclamped"}


def unbiasedness(name: str) -> bool | str:
    """True, False, or "nearly" (Hadamard rows are only approximately isotropic)."""
    if name in BIASED or name.partition("/")[0].partition("*")[0] in BIASED:
        return False
    return "nearly" if name.endswith("/hadamard") else True


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _stratified_chi_norms(m: int, d: int, g: torch.Generator) -> torch.Tensor:
    from scipy.stats import chi  # only this estimator needs scipy (chi quantiles)

    u = (torch.randperm(m, generator=g).double() + torch.rand(m, generator=g, dtype=torch.float64)) / m
    return torch.from_numpy(chi.ppf(u.numpy(), d))


def directions(kind: str, m: int, d: int, g: torch.Generator) -> torch.Tensor:
    """(m, d) unit rows, each uniform on the sphere in law: ``mub`` or ``simplex`` blocks (plain
    orthogonal directions are favor's ``gaussian_orthogonal_matrix(scaling="sqrt_d")`` / √d)."""
    blocks = []
    if kind == "mub":
        if d & (d - 1):
            raise ValueError(f"mub needs a power-of-two d, got {d}")
        h = _sylvester(d) / math.sqrt(d)
        while sum(b.shape[0] for b in blocks) < m:
            r = _haar_orthogonal_block(d, g)
            blocks += [r, h @ r]
    elif kind == "simplex":
        e = torch.eye(d, dtype=torch.float64)
        s = e - e.mean(0, keepdim=True)
        s = s / s.norm(dim=1, keepdim=True)  # d vertices, pairwise cosine −1/(d−1)
        while sum(b.shape[0] for b in blocks) < m:
            blocks.append(s @ _haar_orthogonal_block(d, g))
    else:
        raise ValueError(f"unknown directions {kind!r}; expected 'mub' or 'simplex'")
    return torch.cat(blocks)[:m]


def projection(kind: str, m: int, d: int, g: torch.Generator) -> torch.Tensor:
    """(m, d) float64 projection of kind orthogonal (chi norms), hadamard, sqrt_d, stratified,
    mub or simplex."""
    if kind == "orthogonal":
        return gaussian_orthogonal_matrix(m, d, generator=g, dtype=torch.float64)
    if kind == "hadamard":
        return hadamard_orthogonal_matrix(m, d, generator=g, dtype=torch.float64)
    if kind == "sqrt_d":
        return gaussian_orthogonal_matrix(m, d, scaling="sqrt_d", generator=g, dtype=torch.float64)
    if kind == "stratified":
        unit = gaussian_orthogonal_matrix(m, d, scaling="sqrt_d", generator=g, dtype=torch.float64) / math.sqrt(d)
        return unit * _stratified_chi_norms(m, d, g).unsqueeze(1)
    # chi norms drawn as favor draws them: norms of Gaussian rows
    return directions(kind, m, d, g) * torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1).unsqueeze(1)


def _gerf_mean(z: torch.Tensor, a: float) -> torch.Tensor:
    """(L,) closed-form E_ω[f(ω, z)] of one ``_gerf`` feature with scalar a, ω ~ N(0, I)."""
    d = z.shape[-1]
    b2 = 1 - 4 * a
    return math.exp(d / 4 * math.log(b2)) * (1 - 2 * a) ** (-d / 2) * torch.exp(
        (b2 / (2 * (1 - 2 * a)) - 0.5) * z.pow(2).sum(-1))


def _gerf(z: torch.Tensor, w: torch.Tensor, a: torch.Tensor | float, basis: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR++-type features exp(Σ_l a_l ω_l² + Σ_l √(1 − 4a_l) ω_l (Uᵀz)_l − ‖z‖²/2 + ¼Σ_l log(1 − 4a_l)),
    unnormalised (the caller divides the kernel by the number of rows).  a: scalar or (d,)."""
    d = z.shape[-1]
    a = torch.as_tensor(a, dtype=z.dtype).expand(d)
    zr = z if basis is None else z @ basis
    log_d = 0.25 * torch.log(1 - 4 * a).sum()
    return torch.exp((w * w * a).sum(-1) + (zr * torch.sqrt(1 - 4 * a)) @ w.T - 0.5 * z.pow(2).sum(-1, keepdim=True) + log_d)


def _complex_gerf_moment(a: torch.Tensor, b1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor, t: torch.Tensor,
                         d: int) -> torch.Tensor:
    """Mean over pairs of E[Re(f₁f₂)²]/exp(2t) for one ω ~ N(0, I) (finite for Re A < 1/8);
    x2, y2, t: squared norms and inner products of the pairs."""
    q = 1 - 4 * a
    b2 = q / b1
    c1, c2 = -b1 * b1 / (2 * q), -b2 * b2 / (2 * q)
    r1, r2, ar = b1.real, b2.real, a.real
    # E|f₁f₂|²: Gaussian integral of exp(4 Re A‖ω‖² + 2 Re(u)ᵀω), u = b₁x + b₂y
    log_abs = d * torch.log(q.abs()) - (d / 2) * torch.log(1 - 8 * ar) + 2 * (
        r1 * r1 * x2 + r2 * r2 * y2 + 2 * r1 * r2 * t) / (1 - 8 * ar) + 2 * c1.real * x2 + 2 * c2.real * y2
    # E[(f₁f₂)²]: the same with the complex square uᵀu
    log_sq = d * torch.log(q) - (d / 2) * torch.log(1 - 8 * a) + 2 * (
        b1 * b1 * x2 + b2 * b2 * y2 + 2 * b1 * b2 * t) / (1 - 8 * a) + 2 * c1 * x2 + 2 * c2 * y2
    return (0.5 * (torch.exp(log_abs - 2 * t) + torch.exp(log_sq - 2 * t).real)).mean()


def _complex_gerf_unpack(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = (log(1/8 − Re A), Im A, Re b₁, Im b₁) -> (A, b₁): every p has Re A < 1/8."""
    return torch.complex(0.125 - torch.exp(p[0]), p[1]), torch.complex(p[2], p[3])


def complex_gerf_parameters(x: torch.Tensor, y: torch.Tensor, pairs: int = 256) -> tuple[complex, complex]:
    """(A, b₁) of ``complex_gerf`` minimising the mean relative second moment over ``pairs`` (x_i, y_i)."""
    n = min(pairs, x.shape[0], y.shape[0])
    xs, ys = x[:n].double(), y[:n].double()
    x2, y2, t = xs.pow(2).sum(-1), ys.pow(2).sum(-1), (xs * ys).sum(-1)
    d = x.shape[-1]
    a0 = float(oprf_parameter(x, y))
    best = None
    for a_start, b_start in ((a0, complex(math.sqrt(1 - 4 * a0))), (0.0, 1j), (a0, complex(-0.7, 0.7))):
        p = torch.tensor([math.log(0.125 - a_start), 0.0, b_start.real, b_start.imag], dtype=torch.float64,
                         requires_grad=True)
        opt = torch.optim.LBFGS([p], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = _complex_gerf_moment(*_complex_gerf_unpack(p), x2, y2, t, d)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            a, b1 = _complex_gerf_unpack(p)
            value = float(_complex_gerf_moment(a, b1, x2, y2, t, d))
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, complex(a), complex(b1))
    if best is None:
        raise RuntimeError("complex_gerf: no finite second moment from any start")
    return best[1], best[2]


def _complex_gerf(z: torch.Tensor, w: torch.Tensor, a: complex, b: complex) -> torch.Tensor:
    """(L, m) complex features (1 − 4A)^{d/4}·exp(A‖ω‖² + bωᵀz − b²‖z‖²/(2(1 − 4A)))."""
    d = z.shape[-1]
    q = 1 - 4 * a
    zc, wc = z.to(torch.complex128), w.to(torch.complex128)
    return torch.exp(a * (wc * wc).sum(-1) + b * (zc @ wc.T) - b * b / (2 * q) * zc.pow(2).sum(-1, keepdim=True)
                     + (d / 4) * torch.log(torch.tensor(q, dtype=torch.complex128)))


def complex_gerf_kernel(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, a: complex, b1: complex) -> torch.Tensor:
    """(L, L) estimate Re(f₁(x)ᵀf₂(y))/m of exp(xᵀy) with m = w.shape[0] complex features a side."""
    return (_complex_gerf(x, w, a, b1) @ _complex_gerf(y, w, a, (1 - 4 * a) / b1).T).real / w.shape[0]


def kernel_matrix(name: str, x: torch.Tensor, y: torch.Tensor, budget: int, g: torch.Generator) -> torch.Tensor:
    """(L, L) estimate of exp(x_i·y_j) by estimator ``name`` with ``budget`` output features."""
    d = x.shape[-1]
    kind, _, proj_kind = name.partition("/")
    kind, _, a_scale_text = kind.partition("*")
    a_scale = float(a_scale_text) if a_scale_text else 1.0
    t = x @ y.T
    if kind in ("positive", "oprf"):
        w = projection("orthogonal", budget, d, g)
        a = 0.0 if kind == "positive" else float(oprf_parameter(x, y))
        return _gerf(x, w, a) @ _gerf(y, w, a).T / budget
    if kind == "hyperbolic_oprf":
        w = projection(proj_kind or "orthogonal", budget // 2, d, g)
        w = torch.cat((w, -w))
        a = a_scale * float(oprf_parameter(x, y))
        return _gerf(x, w, a) @ _gerf(y, w, a).T / w.shape[0]
    if kind in ("hyperbolic_oprf_keycv", "hyperbolic_oprf_qkcv"):
        w = projection(proj_kind or "orthogonal", (budget - 2) // 2, d, g)
        w = torch.cat((w, -w))
        a = float(oprf_parameter(x, y))
        fx, fy = _gerf(x, w, a), _gerf(y, w, a)  # (L, m)
        k = fx @ fy.T / w.shape[0] - (fy.mean(-1) - _gerf_mean(y, a))  # key control: zero-mean, exactly
        if kind == "hyperbolic_oprf_qkcv":
            k = k - (fx.mean(-1) - _gerf_mean(x, a))[:, None]
        return k
    if kind == "hyperbolic_oprf_split":
        # exp(xᵀy) = exp((αx)ᵀ(y/α)): exact for every α; α > 1 moves variance to the query side,
        # whose row-wide part the normalisation cancels.  A from the split inputs.
        w = projection(proj_kind or "orthogonal", budget // 2, d, g)
        w = torch.cat((w, -w))
        xs, ys = a_scale * x, y / a_scale
        a = float(oprf_parameter(xs, ys))
        return _gerf(xs, w, a) @ _gerf(ys, w, a).T / w.shape[0]
    if kind == "hyperbolic_oprf_keynorm":
        # self-normalised per key: y's features times E F̄(y)/F̄(y) (a ratio: biased, consistent)
        w = projection(proj_kind or "orthogonal", budget // 2, d, g)
        w = torch.cat((w, -w))
        a = a_scale * float(oprf_parameter(x, y))
        fy = _gerf(y, w, a)
        fy = fy * (_gerf_mean(y, a) / fy.mean(-1)).unsqueeze(-1)
        return _gerf(x, w, a) @ fy.T / w.shape[0]
    if kind in ("hyperbolic_oprf_calibrated", "hyperbolic_oprf_calibrated_unclamped"):
        # key-normalised weights u_r = f(ω_r, y)/Σ f, then tilted linearly towards the exact mean of
        # ω under p_y ∝ f(ω, y)·N(ω; 0, I) = N(B·y/(1 − 2A), I/(1 − 2A)):
        # u_r ← u_r(1 + γᵀ(ω_r − ω̄)), γ = κ(1 − 2A)(B·y/(1 − 2A) − ω̄), ω̄ = Σ u_r ω_r;
        # clamped at 0 and renormalised (positive), except in the _unclamped variant.  κ = "*κ", 0.5.
        kappa = float(a_scale_text) if a_scale_text else 0.5
        w = projection(proj_kind or "orthogonal", budget // 2, d, g)
        w = torch.cat((w, -w))
        a = float(oprf_parameter(x, y))
        fy = _gerf(y, w, a)
        u = fy / fy.sum(-1, keepdim=True)  # (L, M)
        mean = u @ w  # (L, d)
        gam = kappa * (math.sqrt(1 - 4 * a) * y - (1 - 2 * a) * mean)
        u = u * (1 + gam @ w.T - (mean * gam).sum(-1, keepdim=True))
        if kind == "hyperbolic_oprf_calibrated":
            u = u.clamp_min(0)
            u = u / u.sum(-1, keepdim=True)
        return _gerf(x, w, a) @ (u * _gerf_mean(y, a).unsqueeze(-1)).T
    if kind == "hyperbolic_sderf":
        n = x.shape[0]
        xb, yb = x.mean(0), y.mean(0)
        second = x.T @ x / n + y.T @ y / n + torch.outer(xb, yb) + torch.outer(yb, xb)
        spread, basis = torch.linalg.eigh(second)
        a = oprf_parameter_from_rho(spread.clamp_min(0))
        w = projection("orthogonal", budget // 2, d, g)
        w = torch.cat((w, -w))
        return _gerf(x, w, a, basis) @ _gerf(y, w, a, basis).T / w.shape[0]
    if kind == "complex_gerf":
        a, b1 = complex_gerf_parameters(x, y)
        return complex_gerf_kernel(x, y, projection(proj_kind or "orthogonal", budget // 2, d, g), a, b1)
    if kind == "oprf_control":
        beta = 0.8
        m = budget - 2 * (d + 1)  # the exact corrections: (d + 1) query-side and (d + 1) key-side features
        if m <= 0:
            raise ValueError(f"{name} needs a budget above {2 * (d + 1)} features, got {budget}")
        w = projection("orthogonal", m, d, g)
        a = float(oprf_parameter(x, y))
        b = math.sqrt(1 - 4 * a)
        fx, fy = _gerf(x, w, a), _gerf(y, w, a)
        lx, ly = 1 + x @ w.T, 1 + y @ w.T
        # E[φ_w(z) ω] = e_z·c·z and E[φ_w(z)] = e_z, with c = B/(1 − 2A)
        c = b / (1 - 2 * a)
        k = (fx - beta * lx) @ (fy - beta * ly).T / m
        return k + beta * (_gerf_mean(x, a)[:, None] + _gerf_mean(y, a)[None, :]) * (1 + c * t) - beta ** 2 * (1 + t)
    if kind in ("maclaurin", "taylor2"):
        m3 = 60 if kind == "maclaurin" else 0
        m2 = budget - (d + 1) - 1 - m3
        if m2 <= 0:
            raise ValueError(f"{name} needs a budget above {d + 2 + m3} features, got {budget}")
        w2 = projection("orthogonal", m2, d, g)
        # E[(ωᵀx)²(ωᵀy)²] = ‖x‖²‖y‖² + 2t² for Gaussian ω
        quad = ((x @ w2.T) ** 2) @ ((y @ w2.T) ** 2).T / m2
        k = 1 + t + 0.25 * (quad - x.pow(2).sum(-1, keepdim=True) * y.pow(2).sum(-1))
        if m3:
            ws = [torch.randn(m3, d, generator=g, dtype=torch.float64) for _ in range(4)]
            s = 1 - (1 - torch.rand(m3, generator=g, dtype=torch.float64)) ** (1 / 3)  # Beta(1, 3)

            def remainder_features(z):
                z3 = (z @ ws[0].T) * (z @ ws[1].T) * (z @ ws[2].T)
                return z3 * torch.exp(torch.sqrt(s) * (z @ ws[3].T) - s * z.pow(2).sum(-1, keepdim=True) / 2)

            k = k + remainder_features(x) @ remainder_features(y).T / (6 * m3)
        return k
    if kind == "taylor1_exact":
        return 1 + t
    raise ValueError(f"unknown estimator {name!r}; expected one of {DEFAULT_ESTIMATORS}")


def output_rel_error(k: torch.Tensor, exact_rows: torch.Tensor, v: torch.Tensor, causal: bool = False) -> float:
    if causal:
        k = k.tril()
    est = k / k.sum(-1, keepdim=True)
    exact_out = exact_rows @ v
    return float((est @ v - exact_out).norm() / exact_out.norm())


def run(estimators, *, seeds: int, length: int, dim: int, sigma: float, budget: int, model: str | None = None) -> dict:
    """Errors of every estimator; with ``model`` (a ``favor train`` checkpoint) on the real queries,
    keys and values of its layers (seed s: layer/head s mod layers·heads, as ``favor approx
    --model``) instead of random ones."""
    causal, about = False, f"q, k, v ~ N(0, {sigma}^2), L={length}, d={dim}"
    if model is not None:
        from favor.approx import ApproxConfig, model_inputs

        config, real_inputs, about = model_inputs(model, ApproxConfig(length=length))
        length, dim, causal = config.length, config.dim, config.causal
    rows = []
    for name in estimators:
        errors = []
        t0 = time.perf_counter()
        for s in range(seeds):
            if model is None:
                q, k, v = draw_inputs(length, dim, sigma=sigma, generator=_generator(1, s))
            else:
                q, k, v = (t.to(torch.float64) for t in real_inputs(s))
            x, y = q * dim ** -0.25, k * dim ** -0.25
            scores = x @ y.T
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            exact_rows = torch.softmax(scores, dim=-1)
            errors.append(output_rel_error(kernel_matrix(name, x, y, budget, _generator(2, s)), exact_rows, v, causal))
        e = torch.tensor(errors, dtype=torch.float64)
        rows.append({"estimator": name, "unbiased": unbiasedness(name), "mean": float(e.mean()),
                     "std": float(e.std()) if seeds > 1 else 0.0, "seeds": seeds,
                     "seconds": time.perf_counter() - t0})
        print(f"{name:28s} {'' if unbiasedness(name) is not False else '(biased) ':9s}{rows[-1]['mean']:.4f} ± {rows[-1]['std']:.4f}",
              file=sys.stderr, flush=True)
    return {"command": "python " + " ".join(sys.argv), "setting": {"length": length, "dim": dim, "sigma": sigma,
            "budget": budget, "inputs": about, "direction": "causal" if causal else "bidirectional",
            "quantity": "relative error of the attention output"},
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=15)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS))
    p.add_argument("--model", help="a `favor train` checkpoint: use its layers' real q, k, v (L <= --length)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.estimators.split(","), seeds=args.seeds, length=args.length, dim=args.dim,
                 sigma=args.sigma, budget=args.budget, model=args.model)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
