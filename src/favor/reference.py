"""Slow, obviously-correct O(L²) references for tests and documentation.

* :func:`softmax_attention`: exact softmax(scale·QKᵀ)V with explicit scores.
* :func:`explicit_favor_attention`: the random-feature estimate written as the explicit
  normalised L×L matrix Â = φ(Q)φ(K)ᵀ, Â / rowsum(Â) · V, from unstabilised features.

Shapes as in :func:`favor.favor_attention`: (B, H, L, D) in, (B, H, Lq, Dv) out.
"""

from __future__ import annotations

import math

import torch

from .feature_maps import OPRF_FEATURES, oprf_parameter, random_features

__all__ = ["explicit_attention_matrix", "explicit_favor_attention", "softmax_attention"]


def _allowed(Lq: int, Lk: int, is_causal: bool, key_padding_mask, device) -> torch.Tensor:
    """Bool (B or 1, 1, Lq, Lk): True where query i may attend key j."""
    allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention; rows with nothing to attend to give 0."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = scale * query @ key.transpose(-1, -2)  # (B, H, Lq, Lk)
    allowed = _allowed(query.shape[-2], key.shape[-2], is_causal, key_padding_mask, query.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> 0
    return weights @ value


def explicit_attention_matrix(
    query: torch.Tensor,
    key: torch.Tensor,
    projection: torch.Tensor | None,
    *,
    features: str | None = None,
    kernel: str = "softmax",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    key_estimator: str = "plain",
) -> torch.Tensor:
    """The row-normalised estimated attention matrix (B, H, Lq, Lk) (rows with no key: 0)."""
    if kernel == "softmax" and features is None:
        features = "positive"
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    x, y = query * math.sqrt(scale), key * math.sqrt(scale)
    oprf_a = None
    if features in OPRF_FEATURES:
        if is_causal:  # the first present token's query and key, as favor_attention does
            first = 0 if key_padding_mask is None else key_padding_mask.to(torch.int8).argmax(1)
            first = torch.as_tensor(first, device=x.device).expand(x.shape[0])
            rows = torch.arange(x.shape[0], device=x.device)
            oprf_a = oprf_parameter(x[rows, :, first].unsqueeze(2), y[rows, :, first].unsqueeze(2))
        else:
            mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(1)
            x_mask = mask if mask is not None and x.shape[2] == y.shape[2] else None
            oprf_a = oprf_parameter(x, y, mask, x_mask)
    phi_q = random_features(x, projection, features, kernel=kernel, oprf_a=oprf_a)  # (B, H, Lq, M)
    phi_k = random_features(y, projection, features, kernel=kernel, oprf_a=oprf_a,
                            key_estimator=key_estimator)  # (B, H, Lk, M)
    a = phi_q @ phi_k.transpose(-1, -2)  # (B, H, Lq, Lk)
    allowed = _allowed(query.shape[-2], key.shape[-2], is_causal, key_padding_mask, query.device)
    a = a.masked_fill(~allowed, 0.0)
    rowsum = a.sum(-1, keepdim=True)
    return a / torch.where(rowsum == 0, torch.ones_like(rowsum), rowsum)


def explicit_favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor:
    """Â V with Â from :func:`explicit_attention_matrix` (same keyword arguments)."""
    return explicit_attention_matrix(query, key, projection, **kwargs) @ value
