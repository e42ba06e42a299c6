"""``PerformerSelfAttention``: multi-head self-attention with FAVOR or exact softmax attention.

Dimension key: B batch, L new tokens, P tokens already in the cache, E = d_model, H heads,
Dh = E / H head dim, m projections.

The same module is its own Transformer baseline: ``attention="softmax"`` computes exact attention
with :func:`torch.nn.functional.scaled_dot_product_attention`, everything else unchanged.

Incremental decoding (causal modules): call with ``return_cache=True`` on the prompt, then feed
one (or more) new tokens with ``cache=`` the returned cache.  For FAVOR the cache is a
:class:`FavorCache` holding the recurrent :class:`favor.FavorState`, O(H·M·Dh) whatever the
context length, so each new token costs O(1) in the context length; for softmax it is a
:class:`KVCache` of all past keys and values (O(P) per token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..linear import DEFAULT_CHUNK_SIZE, FavorState
from .favor_attention import FavorAttention, validate_favor_options
from .rotary import RotaryEmbedding

__all__ = ["ATTENTIONS", "AttentionCache", "FavorCache", "KVCache", "PerformerSelfAttention"]

ATTENTIONS = ("favor", "softmax")


class FavorCache(NamedTuple):
    """Decoding cache of a FAVOR layer: the recurrent state after ``offset`` tokens."""

    state: FavorState
    offset: int


class KVCache(NamedTuple):
    """Decoding cache of a softmax layer: rotated keys and values of all ``offset`` past tokens.

    key, value: (B, H, P, Dh); mask: (B, P) bool (True = attend) or None (all present).
    """

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None

    @property
    def offset(self) -> int:
        return self.key.shape[2]


AttentionCache = FavorCache | KVCache


def _softmax_mask(
    lq: int, lk: int, offset: int, is_causal: bool, key_padding_mask: torch.Tensor | None, device
) -> torch.Tensor | None:
    """Bool (B or 1, 1, Lq, Lk), True = attend; query i sits at position offset + i."""
    allowed = None
    if is_causal:
        qpos = torch.arange(offset, offset + lq, device=device).unsqueeze(-1)  # (Lq, 1)
        kpos = torch.arange(lk, device=device).unsqueeze(0)  # (1, Lk)
        allowed = (kpos <= qpos)[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        allowed = pad if allowed is None else allowed & pad
    return allowed


class PerformerSelfAttention(nn.Module):
    """Multi-head self-attention: fused q/k/v projection, optional rotary embedding, FAVOR or softmax.

    Args:
        d_model: E, model width; n_heads: H (E % H == 0; Dh = E / H, even when ``rotary``).
        attention: ``"favor"`` (linear) or ``"softmax"`` (exact, via SDPA).
        rotary: rotate q and k by their positions (RoPE) before attention / feature maps.
        dropout: dropout probability on the output (after the output projection), the same for
            both attention kinds (FAVOR has no attention matrix to drop entries from).
        bias: biases in the q/k/v and output projections.
        is_causal: token t attends to tokens 0..t only.
        nb_features, features, kernel, projection, scaling, seed, chunk_size, key_estimator: the options of
            :class:`FavorAttention` (used by ``attention="favor"`` only, validated always).
        rotary_base: RoPE frequency base.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        attention: str = "favor",
        rotary: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
        is_causal: bool = False,
        nb_features: int | None = 256,
        features: str | None = None,
        kernel: str = "softmax",
        projection: str | None = "orthogonal",
        scaling: str = "chi",
        seed: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        key_estimator: str = "plain",
        rotary_base: float = 10000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        for name, value in (("rotary", rotary), ("bias", bias), ("is_causal", is_causal)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.attention = attention
        self.is_causal = is_causal
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.out = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_base) if rotary else None
        favor_options = dict(nb_features=nb_features, features=features, kernel=kernel, projection=projection,
                             scaling=scaling, seed=seed, chunk_size=chunk_size, key_estimator=key_estimator)
        if attention == "favor":
            self.favor = FavorAttention(self.head_dim, is_causal=is_causal, **favor_options, **factory)
        else:  # validated all the same, so that a config is valid for both kinds or neither
            validate_favor_options(self.head_dim, **favor_options)
            self.favor = None

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        return_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, AttentionCache]:
        """x (B, L, E) -> (B, L, E), and the new cache if ``return_cache``.

        ``key_padding_mask``: bool (B, L) for the new tokens, True = attend.
        ``cache``: from an earlier call of this (causal) module on the preceding tokens; the new
        tokens sit at positions ``cache.offset ..``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, L, d_model={self.d_model}), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        B, L, _ = x.shape
        if (cache is not None or return_cache) and not self.is_causal:
            raise ValueError("cache/return_cache (incremental decoding) need a causal module (is_causal=True)")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = attend)")
            if tuple(key_padding_mask.shape) != (B, L):
                raise ValueError(
                    f"key_padding_mask must have shape (B, L) = ({B}, {L}), got {tuple(key_padding_mask.shape)}"
                )
        expected = FavorCache if self.attention == "favor" else KVCache
        if cache is not None and not isinstance(cache, expected):
            raise TypeError(f"attention={self.attention!r} takes a {expected.__name__}, got {type(cache).__name__}")
        offset = 0 if cache is None else cache.offset

        qkv = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset)

        if self.attention == "favor":
            if cache is not None or return_cache:
                y, state = self.favor(
                    q, k, v, key_padding_mask=key_padding_mask,
                    initial_state=None if cache is None else cache.state, return_state=True,
                )  # (B, H, L, Dh)
                new_cache: AttentionCache = FavorCache(state, offset + L)
            else:
                y = self.favor(q, k, v, key_padding_mask=key_padding_mask)  # (B, H, L, Dh)
        else:
            mask = key_padding_mask
            if cache is not None:
                k = torch.cat((cache.key, k), dim=2)  # (B, H, P + L, Dh)
                v = torch.cat((cache.value, v), dim=2)
                if cache.mask is not None or mask is not None:
                    old = cache.mask if cache.mask is not None else x.new_ones(B, offset, dtype=torch.bool)
                    new = mask if mask is not None else x.new_ones(B, L, dtype=torch.bool)
                    mask = torch.cat((old, new), dim=1)  # (B, P + L)
            if return_cache:
                new_cache = KVCache(k, v, mask)
            y = self._softmax(q, k, v, offset, mask)  # (B, H, L, Dh)

        y = y.transpose(1, 2).reshape(B, L, self.d_model)  # (B, L, E)
        y = self.dropout(self.out(y))
        return (y, new_cache) if return_cache else y

    def _softmax(self, q, k, v, offset: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Exact attention; a query with no key to attend to gets 0 (as in FAVOR)."""
        F = torch.nn.functional
        lq, lk = q.shape[2], k.shape[2]
        if mask is None:
            # Without padding every query sees at least itself; plain causal needs no explicit mask
            # when the queries are the whole sequence, nor when a single query sees every key.
            if not self.is_causal or lq == 1:
                return F.scaled_dot_product_attention(q, k, v)
            if offset == 0:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        allowed = _softmax_mask(lq, lk, offset, self.is_causal, mask, q.device)  # (B|1, 1, Lq, Lk)
        empty = ~allowed.any(-1, keepdim=True)  # (B|1, 1, Lq, 1): rows with nothing to attend to
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty)
        return out.masked_fill(empty, 0.0)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, attention={self.attention!r}, "
            f"is_causal={self.is_causal}"
        )
