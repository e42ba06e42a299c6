"""Rotary position embedding (RoPE, Su et al. 2021), "rotate-half" layout.

Dimension key: B batch, H heads, L sequence, D head dim (even).

Channel i < D/2 is paired with channel i + D/2 and the pair is rotated by the angle
pos · base^(−2i/D).  The rotation preserves norms, and qᵀk after rotation depends on the positions
only through their difference, so it applies unchanged before FAVOR's feature maps.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) rotated with cos/sin (L, D/2) -> (B, H, L, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, L, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates (B, H, L, D) queries/keys at positions ``offset .. offset + L − 1``.

    No parameters and no buffers.  Angles are formed in float64 (from nothing that ``.to(dtype)``
    could round) and cos/sin cast to the input dtype, so an offset call equals the matching
    slice of a full call exactly.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"rotary embedding needs a positive even head_dim, got {head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"rotary base must be > 1, got {base}")
        self.head_dim = head_dim
        self.base = float(base)

    def cos_sin(self, length: int, offset: int, *, dtype: torch.dtype, device: torch.device):
        """cos, sin of shape (L, D/2) for positions offset .. offset + L − 1."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        inv_freq = self.base ** -exponents  # (D/2,)
        pos = torch.arange(offset, offset + length, device=device, dtype=torch.float64)  # (L,)
        angles = pos.unsqueeze(-1) * inv_freq  # (L, D/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, L, D) -> rotated q, k (same shapes); position of token t is offset + t."""
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"rotary embedding has head_dim={self.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int (the position of the first token), got {offset!r}")
        cos, sin = self.cos_sin(q.shape[-2], offset, dtype=q.dtype, device=q.device)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
