"""Feature maps φ such that φ(x)ᵀφ(y) estimates a kernel K(x, y).

Dimension key: ``...`` leading dims (usually B, H), L sequence, d head dim, m projections,
M = number of output features (m, or 2m for ``hyperbolic``/``trig``).

Softmax kernel exp(xᵀy) (``kernel="softmax"``), with ω_i the rows of the (m, d) projection:

* ``positive``  (FAVOR+)  φ(x) = exp(ω_iᵀx − ‖x‖²/2) / √m
* ``hyperbolic``          φ(x) = exp(−‖x‖²/2) / √(2m) · [exp(ω_iᵀx), exp(−ω_iᵀx)]
* ``trig``      (FAVOR)   φ(x) = exp(‖x‖²/2) / √m · [sin(ω_iᵀx), cos(ω_iᵀx)]
* ``oprf``      (FAVOR++) φ(x) = D·exp(A‖ω_i‖² + B ω_iᵀx − ‖x‖²/2) / √m,
                          B = √(1 − 4A), D = (1 − 4A)^{d/4}, A < 0 from :func:`oprf_parameter`.
* ``hyperbolic_oprf``     φ(x) = D·exp(A‖ω_i‖² − ‖x‖²/2) / √(2m) · [exp(B ω_iᵀx), exp(−B ω_iᵀx)]:
                          FAVOR++ with antithetic pairs ±ω_i (same A, B, D).  Unbiased because ω_i
                          and −ω_i have the same law, so each half is an unbiased ``oprf`` estimate.

Generalised kernels (``kernel="relu" | "elu"``): φ(x) = relu(Wx) + ε (ε = :data:`RELU_EPSILON`)
and φ(x) = elu(Wx) + 1, with W the projection or the identity when it is ``None``.

Stabilisation.  Every map is returned in factored form φ(x) = exp(h(x)) · ψ(x) where ψ is bounded
(|ψ| ≤ 1 for the exponential kinds, whose maximum entry is exactly 1) and h is a per-vector log
scale.  The attention kernels never form exp(h) on its own: keys enter through exp(h_j − c) with
a shift c shared by all keys (the running maximum of h, which looks only at past keys in causal
mode), and per-query factors cancel in the normalisation D⁻¹.  So nothing overflows, and no
per-key shift biases the estimator.  For the exponential kinds h carries no gradient (it is a pure
shift: exp(h)·exp(u − h) with the same detached h in both factors has the gradient of exp(u)); for
``trig`` h = ‖x‖²/2 − ½ log m is part of the feature and is differentiated.

Key estimators (``key_estimator``, keys only; the exponential kinds ``positive``, ``hyperbolic``,
``oprf``, ``hyperbolic_oprf``).  ``"plain"`` (default) uses φ(y) as above: E[φ(x)ᵀφ(y)] =
exp(xᵀy) exactly.  The other two treat y's M features as a self-normalised importance sample:
exp(xᵀy) = μ(y)·E_{ω~p_y}[M·φ_ω(x)] with p_y ∝ φ_ω(y)·N(ω; 0, I) = N(B·y/(1 − 2A), I/(1 − 2A))
(A = 0, B = 1 for positive/hyperbolic) and μ(y) = E_ω[φ_ω(y)] in closed form.

* ``"normalized"``  φ'(y) = φ(y)·μ(y)/mean(φ(y)): y's own random fluctuation of its total weight
  is divided out.
* ``"calibrated"``  the same, with y's normalised weights u_r = φ_r(y)/Σφ(y) tilted towards the
  exact mean of p_y: u_r ← u_r·max(0, 1 + γᵀ(ω_r − ω̄)), γ = κ·(B·y − (1 − 2A)·ω̄), ω̄ = Σ u_r ω_r,
  κ = :data:`CALIBRATION_STRENGTH`, then renormalised.  The clamp keeps every feature ≥ 0, so row
  sums stay positive.

Both are ratio estimators, so E[φ(x)ᵀφ'(y)] ≠ exp(xᵀy) exactly (the row normalisation D⁻¹ of
every FAVOR estimate is a ratio as well); the bias vanishes as M → ∞.  Measured at the issue's
setting (d = 64, σ = 0.5, hyperbolic_oprf, benchmarks/key_estimator_bias.py): for "normalized"
a mean kernel bias within 2 standard errors of 0 (≤ 0.3 % at M = 64…1024) but a per-pair bias, and
an output bias of 0.026 at M = 64 and 0.006 at M = 256 (plain's ratio bias: 0.015, 0.003);
+3.3 %, +1.6 %, +0.7 % of the kernel on average at M = 64, 256, 1024 for "calibrated".  Both are positive and per key (a key's features depend on
that key only, so causality, padding and the recurrent state work unchanged).  μ(y) and the tilt
assume Gaussian-law rows: chi-scaled iid/orthogonal (nearly so for Hadamard/Givens; with
``scaling="sqrt_d"`` μ(y) is off by a per-key factor for the FAVOR++ kinds).  A recurrent state
must be continued with the estimator that made it (the state does not record which).  At M = 256, d = 64,
L = 1024 they cut the output error of ``hyperbolic_oprf`` from 0.35 to 0.31 (normalized) and
0.19 (calibrated); on a trained model's queries and keys from 0.67 to 0.61 and 0.63
(docs/results.md).

ε for ReLU: 1e-3 keeps every row of the estimated attention matrix strictly positive (an
all-zero feature vector would give a 0/0 row) while perturbing the kernel by a relative O(ε).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "FEATURES",
    "CALIBRATION_STRENGTH",
    "KERNELS",
    "KEY_ESTIMATORS",
    "OPRF_FEATURES",
    "RELU_EPSILON",
    "Features",
    "feature_map",
    "key_feature_map",
    "num_features",
    "oprf_parameter",
    "oprf_parameter_from_rho",
    "random_features",
]

FEATURES = ("positive", "hyperbolic", "trig", "oprf", "hyperbolic_oprf")
#: kinds that take the FAVOR++ parameter A (``oprf_a``, from :func:`oprf_parameter`)
OPRF_FEATURES = ("oprf", "hyperbolic_oprf")
KERNELS = ("softmax", "relu", "elu")
#: how keys' features estimate the kernel (module docstring): "plain" is the unbiased default
KEY_ESTIMATORS = ("plain", "normalized", "calibrated")
#: kinds whose features are positive exponentials, the ones the non-plain key estimators take
NORMALIZABLE_FEATURES = ("positive", "hyperbolic", "oprf", "hyperbolic_oprf")
#: κ of the "calibrated" key estimator: the fraction of the gap to p_y's exact mean that the tilt
#: closes (0 = "normalized"; 0.25–0.5 measured best, 1 overshoots: benchmarks/variance_cuts.py)
CALIBRATION_STRENGTH = 0.25
RELU_EPSILON = 1e-3


class Features(NamedTuple):
    """φ = exp(log_scale)[..., None] · psi.

    psi: (..., L, M) bounded features; log_scale: (..., L) or ``None`` (meaning 0, for relu/elu).
    """

    psi: torch.Tensor
    log_scale: torch.Tensor | None


def num_features(m: int, features: str, kernel: str = "softmax") -> int:
    """Number M of output features for m projections."""
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"m must be a positive int, got {m!r}")
    _check_kind(features, kernel)
    if kernel == "softmax" and features in ("hyperbolic", "trig", "hyperbolic_oprf"):
        return 2 * m
    return m


def oprf_parameter_from_rho(rho: torch.Tensor) -> torch.Tensor:
    """Closed-form variance-minimising A < 0 of FAVOR++: A = (1 − 2ρ − √((2ρ+1)² + 8ρ)) / 16."""
    return (1 - 2 * rho - torch.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def _masked_moments(z: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """mean‖z‖² (...) and mean z (..., d) over the rows of z (..., L, d) where mask (..., L) holds."""
    if mask is None:
        return z.pow(2).sum(-1).mean(-1), z.mean(-2)
    w = mask.to(z.dtype)  # (..., L)
    count = w.sum(-1).clamp_min(1)
    return (z.pow(2).sum(-1) * w).sum(-1) / count, (z * w.unsqueeze(-1)).sum(-2) / count.unsqueeze(-1)


def oprf_parameter(
    x: torch.Tensor,
    y: torch.Tensor,
    y_mask: torch.Tensor | None = None,
    x_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A for FAVOR++ from ρ = mean over all pairs (i, j) of ‖x_i + y_j‖² / d.

    x: (..., Lx, d) scaled queries, y: (..., Ly, d) scaled keys; y_mask (..., Ly) and x_mask
    (..., Lx): bool (True = present) or None.  Computed in O(L d) from the means:
    mean‖x_i + y_j‖² = mean‖x‖² + mean‖y‖² + 2 x̄ᵀȳ.  Returns A with shape (...,), detached: A is a
    variance-reduction hyperparameter, the estimator is unbiased for every A < 0.
    """
    x, y = x.detach(), y.detach()
    d = x.shape[-1]
    if y.shape[-1] != d:
        raise ValueError(f"x has {d} features but y has {y.shape[-1]}")
    for name, mask, z in (("y_mask", y_mask, y), ("x_mask", x_mask, x)):
        if mask is not None and (mask.dim() > z.dim() - 1 or any(
                a not in (1, b) for a, b in zip(reversed(mask.shape), reversed(z.shape[:-1])))):
            raise ValueError(f"{name} must broadcast to {tuple(z.shape[:-1])} ({name[0]} without its last dim), "
                             f"got {tuple(mask.shape)}")
    x_sq, x_bar = _masked_moments(x, x_mask)
    y_sq, y_bar = _masked_moments(y, y_mask)
    rho = (x_sq + y_sq + 2 * (x_bar * y_bar).sum(-1)) / d
    return oprf_parameter_from_rho(rho.clamp_min(0))


def _check_kind(features: str, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "softmax" and features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; expected one of {FEATURES}")


def check_key_estimator(key_estimator: object, features: str | None, kernel: str) -> None:
    """A ``ValueError`` unless ``key_estimator`` is one of :data:`KEY_ESTIMATORS` and, when not
    "plain", the features are one of :data:`NORMALIZABLE_FEATURES` of the softmax kernel
    (``features=None`` with the softmax kernel means "positive", as everywhere in favor)."""
    if kernel == "softmax" and features is None:
        features = "positive"
    if not isinstance(key_estimator, str) or key_estimator not in KEY_ESTIMATORS:
        raise ValueError(f"unknown key_estimator {key_estimator!r}; expected one of {KEY_ESTIMATORS}")
    if key_estimator != "plain" and (kernel != "softmax" or features not in NORMALIZABLE_FEATURES):
        raise ValueError(
            f"key_estimator={key_estimator!r} needs positive exponential softmax features "
            f"{NORMALIZABLE_FEATURES}, got features={features!r}, kernel={kernel!r}"
        )


def _check_inputs(x: object, projection: object) -> None:
    """x: floating (..., d) tensor; projection: None or a floating (m, d) tensor with m > 0."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.is_floating_point():
        what = f"dtype {x.dtype}, shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point (..., L, d) tensor, got {what}")
    if projection is None:
        return
    if not isinstance(projection, torch.Tensor) or not projection.is_floating_point():
        what = projection.dtype if isinstance(projection, torch.Tensor) else type(projection).__name__
        raise TypeError(f"projection must be a floating-point tensor or None, got {what}")
    if projection.dim() != 2 or projection.shape[0] == 0 or projection.shape[1] != x.shape[-1]:
        raise ValueError(
            f"projection must have shape (m, {x.shape[-1]}) with m > 0 to match x's last dim, "
            f"got {tuple(projection.shape)}"
        )
    if projection.dtype != x.dtype:
        raise TypeError(f"projection ({projection.dtype}) and x ({x.dtype}) must share a dtype")


def _oprf_logits(
    x: torch.Tensor, proj: torch.Tensor, oprf_a: torch.Tensor | None, features: str = "oprf"
) -> torch.Tensor:
    """(..., L, m) FAVOR++ logits A‖ω_i‖² + B ω_iᵀx + log D, or (..., L, 2m) with ±ω_i for
    ``hyperbolic_oprf``."""
    if oprf_a is None:
        raise ValueError(f"features={features!r} needs oprf_a (see oprf_parameter)")
    d = x.shape[-1]
    a = oprf_a.to(x.dtype)[..., None, None]  # (..., 1, 1)
    one_minus_4a = 1 - 4 * a
    log_d = (d / 4) * torch.log(one_minus_4a)
    bwx = torch.sqrt(one_minus_4a) * (x @ proj.T)  # (..., L, m)
    if features == "hyperbolic_oprf":
        bwx = torch.cat((bwx, -bwx), dim=-1)  # (..., L, 2m)
        return a * proj.pow(2).sum(-1).repeat(2) + bwx + log_d
    return a * proj.pow(2).sum(-1) + bwx + log_d


def feature_map(
    x: torch.Tensor,
    projection: torch.Tensor | None,
    features: str = "positive",
    *,
    kernel: str = "softmax",
    oprf_a: torch.Tensor | None = None,
) -> Features:
    """Stabilised features of x: (..., L, d) -> :class:`Features` with psi (..., L, M).

    ``x`` is already scaled (x = √scale · q).  ``oprf_a`` (shape (...,)) is needed for the
    :data:`OPRF_FEATURES` kinds.
    Computation happens in ``x``'s dtype; callers pass float32 or float64.
    """
    _check_kind(features, kernel)
    _check_inputs(x, projection)
    if kernel != "softmax":
        wx = x if projection is None else x @ projection.T  # (..., L, m)
        m = wx.shape[-1]
        if kernel == "relu":
            psi = (torch.relu(wx) + RELU_EPSILON) / math.sqrt(m)
        else:
            psi = torch.nn.functional.elu(wx) + 1
        return Features(psi, None)

    if projection is None:
        raise ValueError(f"features={features!r} needs a (m, d) projection, got None")
    m = projection.shape[0]
    half_sq_norm = 0.5 * x.pow(2).sum(-1, keepdim=True)  # (..., L, 1)
    if features == "trig":
        wx = x @ projection.T  # (..., L, m)
        psi = torch.cat((torch.sin(wx), torch.cos(wx)), dim=-1)  # (..., L, 2m)
        return Features(psi, half_sq_norm.squeeze(-1) - 0.5 * math.log(m))

    if features == "positive":
        logits = x @ projection.T - half_sq_norm - 0.5 * math.log(m)
    elif features == "hyperbolic":
        wx = x @ projection.T
        logits = torch.cat((wx, -wx), dim=-1) - half_sq_norm - 0.5 * math.log(2 * m)
    elif features == "oprf":
        logits = _oprf_logits(x, projection, oprf_a) - half_sq_norm - 0.5 * math.log(m)
    else:  # hyperbolic_oprf
        logits = _oprf_logits(x, projection, oprf_a, features) - half_sq_norm - 0.5 * math.log(2 * m)
    log_scale = logits.detach().amax(-1)  # (..., L)
    return Features(torch.exp(logits - log_scale.unsqueeze(-1)), log_scale)


def _log_mean_feature(y: torch.Tensor, num_out: int, features: str, oprf_a: torch.Tensor | None) -> torch.Tensor:
    """(..., L) log μ(y) = log E_ω[φ_ω(y)] of one of ``num_out`` output features, in closed form:
    −½ log M for positive/hyperbolic; for the FAVOR++ kinds
    (d/4)·log(1 − 4A) − (d/2)·log(1 − 2A) − A‖y‖²/(1 − 2A) − ½ log M."""
    base = -0.5 * math.log(num_out)
    if features not in OPRF_FEATURES:
        return torch.full(y.shape[:-1], base, dtype=y.dtype, device=y.device)
    d = y.shape[-1]
    a = oprf_a.to(y.dtype).unsqueeze(-1)  # (..., 1)
    return (d / 4) * torch.log(1 - 4 * a) - (d / 2) * torch.log(1 - 2 * a) - a * y.pow(2).sum(-1) / (1 - 2 * a) + base


def key_feature_map(
    y: torch.Tensor,
    projection: torch.Tensor | None,
    features: str = "positive",
    *,
    kernel: str = "softmax",
    oprf_a: torch.Tensor | None = None,
    key_estimator: str = "plain",
) -> Features:
    """Stabilised features of keys y: (..., L, d) -> :class:`Features` (psi (..., L, M)), by
    ``key_estimator`` (module docstring); "plain" is :func:`feature_map`.

    For "normalized"/"calibrated" the log scale is log μ(y) + log M − log Σ_r psi_r and carries a
    gradient (it is part of the estimator, not a shift); psi stays bounded (≤ 1, or ≤ 1 + |tilt|).
    """
    check_key_estimator(key_estimator, features, kernel)
    f = feature_map(y, projection, features, kernel=kernel, oprf_a=oprf_a)
    if key_estimator == "plain":
        return f
    psi = f.psi  # (..., L, M), largest entry 1: the per-key shift cancels in the normalisation
    num_out = psi.shape[-1]
    if key_estimator == "calibrated":
        omega = projection if features in ("positive", "oprf") else torch.cat((projection, -projection))  # (M, d)
        u = psi / psi.sum(-1, keepdim=True)  # (..., L, M) normalised weights
        omega_bar = u @ omega  # (..., L, d)
        if features in OPRF_FEATURES:
            a = oprf_a.to(y.dtype)[..., None, None]  # (..., 1, 1)
            gap = torch.sqrt(1 - 4 * a) * y - (1 - 2 * a) * omega_bar  # (1 − 2A)·(mean of p_y − ω̄)
        else:
            gap = y - omega_bar
        gamma = CALIBRATION_STRENGTH * gap  # (..., L, d)
        tilt = 1 + gamma @ omega.T - (gamma * omega_bar).sum(-1, keepdim=True)  # (..., L, M)
        tilted = psi * tilt.clamp_min(0)  # Σ u·tilt = 1 before the clamp, so the sum is ≥ 1 ...
        # ... in exact arithmetic; at extreme norms (|γ| ~ 1e5) the two terms of the tilt cancel
        # in float32 and every tilt of a key can round to ≤ 0: such a key keeps its normalised,
        # untilted features instead of a 0/0
        total = tilted.sum(-1, keepdim=True)
        psi = torch.where((total > 0) & torch.isfinite(total), tilted, psi)
    log_scale = _log_mean_feature(y, num_out, features, oprf_a) + math.log(num_out) - torch.log(psi.sum(-1))
    return Features(psi, log_scale)


def random_features(
    x: torch.Tensor,
    projection: torch.Tensor | None,
    features: str = "positive",
    *,
    kernel: str = "softmax",
    oprf_a: torch.Tensor | None = None,
    key_estimator: str | None = None,
) -> torch.Tensor:
    """Unstabilised φ(x): (..., L, d) -> (..., L, M), with φ(x)ᵀφ(y) ≈ K(x, y).

    ``key_estimator`` (keys only): the key features of :func:`key_feature_map`; ``None`` for
    queries.  For tests, references and analysis; attention uses the stabilised maps.
    """
    if key_estimator is None:
        f = feature_map(x, projection, features, kernel=kernel, oprf_a=oprf_a)
    else:
        f = key_feature_map(x, projection, features, kernel=kernel, oprf_a=oprf_a, key_estimator=key_estimator)
    if f.log_scale is None:
        return f.psi
    return torch.exp(f.log_scale).unsqueeze(-1) * f.psi
