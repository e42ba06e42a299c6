"""Random projection matrices for random-feature attention.

Every function returns a ``(m, d)`` tensor whose rows are the projection vectors ω_i ∈ R^d
and takes keyword-only ``generator``, ``device`` and ``dtype`` arguments.  All draws are made
on the generator's device in float64 (so that QR and the rotations are accurate) and cast at the
end, so the same seeded generator yields the same matrix on every machine and rank.

Row norms (``scaling``):
    ``"chi"``     each row's norm is drawn from the chi(d) distribution, so every row of an
                  ``iid`` or ``orthogonal`` (Haar) matrix is marginally N(0, I_d) and the
                  random-feature estimators are unbiased; ``hadamard`` and ``givens`` rows are
                  only approximately isotropic (see their functions);
    ``"sqrt_d"``  every row has norm √d (the deterministic "regularised" variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "PROJECTIONS",
    "SCALINGS",
    "HadamardProjection",
    "gaussian_iid_matrix",
    "gaussian_orthogonal_matrix",
    "givens_orthogonal_matrix",
    "hadamard_orthogonal_matrix",
    "hadamard_projection",
    "hadamard_transform",
    "projection_matrix",
]

Scaling = Literal["chi", "sqrt_d"]
SCALINGS = ("chi", "sqrt_d")
PROJECTIONS = ("orthogonal", "iid", "hadamard", "givens")


def _check_sizes(m: int, d: int) -> None:
    for name, value in (("m", m), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {name}={value}")


def _generator_device(generator: torch.Generator | None) -> torch.device:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device if generator is not None else torch.device("cpu")


def _row_norms(
    m: int, d: int, scaling: str, generator: torch.Generator | None
) -> torch.Tensor:
    """(m,) row norms: chi(d) draws (norms of Gaussian vectors) or the constant √d."""
    dev = _generator_device(generator)
    if scaling == "chi":
        return torch.randn(m, d, generator=generator, device=dev, dtype=torch.float64).norm(dim=1)
    if scaling == "sqrt_d":
        return torch.full((m,), math.sqrt(d), device=dev, dtype=torch.float64)
    raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")


def _finish(w: torch.Tensor, device, dtype) -> torch.Tensor:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return w.to(device=device if device is not None else w.device, dtype=dtype or torch.get_default_dtype())


def gaussian_iid_matrix(
    m: int,
    d: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(m, d) matrix of i.i.d. N(0, 1) entries."""
    _check_sizes(m, d)
    w = torch.randn(m, d, generator=generator, device=_generator_device(generator), dtype=torch.float64)
    return _finish(w, device, dtype)


def _haar_orthogonal_block(d: int, generator: torch.Generator | None) -> torch.Tensor:
    """(d, d) Haar-distributed orthogonal matrix: QR of a Gaussian matrix with the sign fix."""
    g = torch.randn(d, d, generator=generator, device=_generator_device(generator), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Without the sign correction Q is not Haar distributed (Mezzadri, 2007).
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T  # rows are orthonormal


def gaussian_orthogonal_matrix(
    m: int,
    d: int,
    *,
    scaling: Scaling = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(m, d) block-orthogonal Gaussian matrix (ORF).

    Rows are exactly orthogonal within each block of d rows; ⌈m/d⌉ independent Haar blocks are
    stacked and the last one truncated.  Row norms follow ``scaling`` (see module docstring).
    """
    _check_sizes(m, d)
    blocks = [_haar_orthogonal_block(d, generator) for _ in range(math.ceil(m / d))]
    w = torch.cat(blocks, dim=0)[:m]
    w = w * _row_norms(m, d, scaling, generator).unsqueeze(1)
    return _finish(w, device, dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh–Hadamard transform over the last dimension (a power of two).

    O(n log n) per vector; ``hadamard_transform(hadamard_transform(x)) == x``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"hadamard_transform takes a tensor with at least 1 dim, got {getattr(x, 'shape', type(x).__name__)}")
    n = x.shape[-1]
    if n == 0 or n & (n - 1) != 0:
        raise ValueError(f"hadamard_transform needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)  # (N, pairs, 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n)) / math.sqrt(n)


@dataclass(frozen=True)
class HadamardProjection:
    """Structured ORF ω = norms ⊙ rows of (H D₁ H D₂ H D₃) per block, applied in O(m log d).

    ``signs``: (blocks, 3, d_pad) random ±1 diagonals; ``norms``: (m,) factors applied to the rows
    (unit rows of the d_pad × d_pad block, restricted to the first d columns).
    """

    m: int
    d: int
    signs: torch.Tensor
    norms: torch.Tensor

    @property
    def d_pad(self) -> int:
        return self.signs.shape[-1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ without materialising W: (..., d) -> (..., m), O(m log d) per vector."""
        if x.shape[-1] != self.d:
            raise ValueError(f"input has {x.shape[-1]} features but the projection has d={self.d}")
        signs = self.signs.to(x)
        xp = torch.nn.functional.pad(x, (0, self.d_pad - self.d))  # (..., d_pad)
        xp = xp.unsqueeze(-2)  # (..., 1, d_pad), broadcast over blocks
        y = hadamard_transform(xp * signs[:, 2])
        y = hadamard_transform(y * signs[:, 1])
        y = hadamard_transform(y * signs[:, 0])  # (..., blocks, d_pad)
        y = y.reshape(*x.shape[:-1], -1)[..., : self.m]  # d_pad rows per block
        return y * self.norms.to(x)

    def to_dense(self, *, device=None, dtype=None) -> torch.Tensor:
        eye = torch.eye(self.d, dtype=torch.float64, device=self.signs.device)
        w = self.apply(eye).T  # column j of x@Wᵀ for x = e_j is W[:, j]
        return _finish(w, device, dtype)


#: sqrt_d Hadamard rows restricted to d < d_pad coordinates: a block is redrawn while one of its
#: rows keeps less than this norm (of 1), at most _MAX_REDRAWS times
_VANISHING_ROW = 1e-3
_MAX_REDRAWS = 100


def hadamard_projection(
    m: int,
    d: int,
    *,
    scaling: Scaling = "chi",
    generator: torch.Generator | None = None,
) -> HadamardProjection:
    """Draw the structured Hadamard ORF as a :class:`HadamardProjection` (fast ``apply``).

    For d a power of two each block is d orthogonal rows scaled by ``scaling``'s norms.  Otherwise
    the block is built in d_pad = 2^⌈log₂ d⌉ dimensions and its d_pad rows are restricted to the
    first d coordinates: with ``"chi"`` the full rows get chi(d_pad) norms, so that each restricted
    row is, like the full one, marginally Gaussian (a coordinate projection of N(0, I) is N(0, I));
    with ``"sqrt_d"`` each restricted row is rescaled to norm √d.  The restricted rows are only
    nearly orthogonal.
    """
    _check_sizes(m, d)
    d_pad = 1 << (d - 1).bit_length()
    blocks = math.ceil(m / d_pad)
    dev = _generator_device(generator)
    bits = torch.randint(0, 2, (blocks, 3, d_pad), generator=generator, device=dev)
    signs = bits.to(torch.float64) * 2 - 1
    if d == d_pad:
        return HadamardProjection(m, d, signs, _row_norms(m, d, scaling, generator))
    if scaling == "chi":
        return HadamardProjection(m, d, signs, _row_norms(m, d_pad, scaling, generator))
    norms = _row_norms(m, d, scaling, generator)  # sqrt_d: √d for every row
    ones = torch.ones(m, dtype=torch.float64, device=dev)
    for _ in range(_MAX_REDRAWS):
        restricted = HadamardProjection(m, d, signs, ones).to_dense(dtype=torch.float64).norm(dim=1)  # (m,)
        # blocks holding a row whose restricted direction would be rounding noise
        bad = torch.unique((restricted < _VANISHING_ROW).nonzero().flatten() // d_pad)
        if bad.numel() == 0:
            return HadamardProjection(m, d, signs, norms / restricted)
        redrawn = torch.randint(0, 2, (bad.numel(), 3, d_pad), generator=generator, device=dev)
        signs[bad] = redrawn.to(torch.float64) * 2 - 1  # redraw those blocks' signs
    raise ValueError(f"no Hadamard block for d={d} without a vanishing row in {_MAX_REDRAWS} draws; "
                     "use scaling='chi' or another projection")


def hadamard_orthogonal_matrix(
    m: int,
    d: int,
    *,
    scaling: Scaling = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(m, d) dense form of :func:`hadamard_projection` (same draws for the same generator).

    Each block holds the rows of H D₁ H D₂ H D₃ (d padded to a power of two d_pad, the first d
    columns kept; see :func:`hadamard_projection` for the norms).  Rows are exactly orthogonal
    when d is a power of two; otherwise the column restriction makes them only nearly so.
    """
    return hadamard_projection(m, d, scaling=scaling, generator=generator).to_dense(device=device, dtype=dtype)


def givens_orthogonal_matrix(
    m: int,
    d: int,
    *,
    scaling: Scaling = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(m, d) block-orthogonal matrix, each block a product of random Givens rotations.

    A block is 4⌈log₂ d⌉ layers of ⌊d/2⌋ rotations (2·d·log₂ d in all), each layer rotating the
    coordinate pairs of a random perfect matching by uniform angles, so every block is exactly
    orthogonal.  Like the Hadamard blocks, the rows are only approximately isotropic (a finite
    Givens product is not Haar distributed), so the estimators built on them carry a small bias
    for inputs aligned with the coordinate axes.  With 4⌈log₂ d⌉ layers, E[u₀⁴] of a row's unit
    direction is within ~2 % of the uniform sphere's for d = 2…64; ⌈d log₂ d⌉ rotations of random
    pairs, the previous construction, left it at 1.43× (d = 16) and 1.85× (d = 64), and the
    positive-feature estimate of exp(‖x‖²) for x = 0.75·e₀ at 1.32× and 2.7×
    (benchmarks/projection_bias.py; benchmarks/results/projection_bias*.json).
    """
    _check_sizes(m, d)
    dev = _generator_device(generator)
    layers = 4 * math.ceil(math.log2(d)) if d > 1 else 0
    pairs = d // 2
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.eye(d, dtype=torch.float64, device=dev)  # (d, d), rows = the block's directions
        for _ in range(layers):
            perm = torch.randperm(d, generator=generator, device=dev)
            i, j = perm[0 : 2 * pairs : 2], perm[1 : 2 * pairs : 2]  # (pairs,) disjoint coordinates
            angles = torch.rand(pairs, generator=generator, device=dev, dtype=torch.float64) * (2 * math.pi)
            cos, sin = torch.cos(angles), torch.sin(angles)
            gi, gj = g[:, i], g[:, j]  # (d, pairs) copies (advanced indexing)
            g[:, i] = cos * gi - sin * gj
            g[:, j] = sin * gi + cos * gj
        blocks.append(g)
    w = torch.cat(blocks, dim=0)[:m]
    w = w * _row_norms(m, d, scaling, generator).unsqueeze(1)
    return _finish(w, device, dtype)


def projection_matrix(
    kind: str,
    m: int,
    d: int,
    *,
    scaling: Scaling = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dispatch by name: ``"orthogonal" | "iid" | "hadamard" | "givens"``."""
    if kind == "iid":
        if scaling != "chi":
            raise ValueError("scaling applies to orthogonal projections only; iid rows are plain Gaussians")
        return gaussian_iid_matrix(m, d, generator=generator, device=device, dtype=dtype)
    builders = {
        "orthogonal": gaussian_orthogonal_matrix,
        "hadamard": hadamard_orthogonal_matrix,
        "givens": givens_orthogonal_matrix,
    }
    if kind not in builders:
        raise ValueError(f"unknown projection {kind!r}; expected one of {PROJECTIONS}")
    return builders[kind](m, d, scaling=scaling, generator=generator, device=device, dtype=dtype)
