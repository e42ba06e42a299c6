"""Layers: thin modules over the functional core (projection -> features -> kernel), no math of their own.

* :class:`FavorAttention`: FAVOR attention on (B, H, L, D) heads; owns the seeded projection buffer.
* :class:`PerformerSelfAttention`: multi-head self-attention (FAVOR or exact softmax), rotary,
  padding masks, incremental decoding caches (:class:`FavorCache`, :class:`KVCache`).
* :class:`MultiheadFavorAttention`: drop-in for :class:`torch.nn.MultiheadAttention`.
* Redraw helpers: :class:`ProjectionRedraw`, :func:`redraw_projections_`,
  :func:`projection_fingerprint`, :func:`derive_seed`.
"""

from .favor_attention import (
    FavorAttention,
    ProjectionRedraw,
    derive_seed,
    favor_modules,
    projection_fingerprint,
    redraw_projections_,
    validate_favor_options,
)
from .multihead import MultiheadFavorAttention
from .rotary import RotaryEmbedding, apply_rotary
from .self_attention import ATTENTIONS, AttentionCache, FavorCache, KVCache, PerformerSelfAttention

__all__ = [
    "ATTENTIONS",
    "AttentionCache",
    "FavorAttention",
    "FavorCache",
    "KVCache",
    "MultiheadFavorAttention",
    "PerformerSelfAttention",
    "ProjectionRedraw",
    "RotaryEmbedding",
    "apply_rotary",
    "derive_seed",
    "favor_modules",
    "projection_fingerprint",
    "redraw_projections_",
    "validate_favor_options",
]
