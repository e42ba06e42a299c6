"""``MultiheadFavorAttention``: a drop-in for :class:`torch.nn.MultiheadAttention` computing FAVOR attention.

Dimension key: B batch, L target (query) length, S source (key/value) length, E embed_dim,
H heads, Dh = E / H.

Same constructor, same parameter names (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``bias_k``/``bias_v``, ``out_proj``) and initialisation as torch's module, and the
same ``forward`` signature and masks conventions: **``key_padding_mask`` True = IGNORE that key**
(torch's convention, the opposite of :func:`favor.favor_attention`'s True = attend), also given as
a float mask of 0 / −inf.  What FAVOR cannot do raises instead of being ignored: ``need_weights=True``
(no attention matrix is ever formed), additive float masks, and arbitrary ``attn_mask`` patterns
(only the causal one is accepted, as ``is_causal``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..linear import DEFAULT_CHUNK_SIZE
from .favor_attention import FavorAttention

__all__ = ["MultiheadFavorAttention"]


def _disable_encoder_fast_path(module: nn.Module, args: tuple) -> None:
    """No-op forward pre-hook.  Its presence stops :class:`torch.nn.TransformerEncoderLayer`'s fused
    inference fast path (which reads ``in_proj_weight`` and computes *exact* softmax attention,
    bypassing this module) from being taken."""
    return None


def _as_ignore_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """torch-style mask (bool: True = ignore; float: 0 = keep, −inf = ignore) -> bool, True = ignore."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        ninf = torch.isneginf(mask)
        if not torch.all(ninf | (mask == 0)):
            raise ValueError(
                f"{name}: additive float masks are not supported by FAVOR (it forms no score matrix); "
                "only 0 (keep) and -inf (ignore) entries, or a bool mask, are accepted"
            )
        return ninf
    raise TypeError(f"{name} must be a bool or float tensor, got {mask.dtype}")


class MultiheadFavorAttention(nn.Module):
    """FAVOR multi-head attention with the interface of :class:`torch.nn.MultiheadAttention`.

    Args (as torch's): embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
    vdim, batch_first, device, dtype.  Differences:

    * ``dropout`` is applied to the attention output (per head, before ``out_proj``), since FAVOR
      has no attention weights to drop.
    * ``add_bias_kv`` / ``add_zero_attn`` append the learned / zero key-value token as torch does;
      bidirectional only (a causal call with them raises).
    * Keyword-only FAVOR options: ``nb_features``, ``features``, ``kernel``, ``key_estimator``, ``projection``,
      ``scaling``, ``seed``, ``chunk_size`` (see :class:`FavorAttention`; the projection lives in
      ``self.favor``).

    Use :meth:`from_torch` to copy the weights of an existing :class:`torch.nn.MultiheadAttention`.
    Inside :class:`torch.nn.TransformerEncoder`, pass ``enable_nested_tensor=False`` (nested
    tensors are rejected).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        nb_features: int | None = 256,
        features: str | None = None,
        kernel: str = "softmax",
        projection: str | None = "orthogonal",
        scaling: str = "chi",
        seed: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        key_estimator: str = "plain",
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.favor = FavorAttention(
            self.head_dim, nb_features=nb_features, features=features, kernel=kernel, projection=projection,
            scaling=scaling, is_causal=False, seed=seed, chunk_size=chunk_size, key_estimator=key_estimator,
            **factory,
        )
        self._reset_parameters()
        self.register_forward_pre_hook(_disable_encoder_fast_path)

    def _reset_parameters(self) -> None:
        """torch.nn.MultiheadAttention's initialisation."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, **favor_options) -> MultiheadFavorAttention:
        """A FAVOR module with the configuration and a copy of the weights of ``mha``."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch takes a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        p = next(mha.parameters())
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device=p.device, dtype=p.dtype, **favor_options,
        )
        missing, unexpected = new.load_state_dict(mha.state_dict(), strict=False)
        leftover = [k for k in missing if not k.startswith("favor.")]
        if leftover or unexpected:
            raise ValueError(f"weights do not match: missing {leftover}, unexpected {list(unexpected)}")
        return new

    def _project(self, query, key, value):
        """Input projections: (B, L, E), (B, S, kdim), (B, S, vdim) -> (B, L, E), (B, S, E), (B, S, E)."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        F = torch.nn.functional
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _causal_from_mask(self, attn_mask: torch.Tensor, L: int, S: int) -> None:
        """Accept only a causal (L, L) mask (bool True = ignore, or float −inf above the diagonal)."""
        ignore = _as_ignore_mask(attn_mask, "attn_mask")
        causal = torch.ones(L, S, dtype=torch.bool, device=ignore.device).triu_(1)
        if ignore.dim() != 2 or tuple(ignore.shape) != (L, S) or L != S or not torch.equal(ignore, causal):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} is not the causal (L, L) mask; FAVOR supports "
                "only key_padding_mask and causal masking (pass is_causal=True or the causal attn_mask)"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """query (L, B, E) [(B, L, E) if batch_first; (L, E) unbatched], key (S, B, kdim),
        value (S, B, vdim) -> (output like query, None).

        key_padding_mask: (B, S) [(S,) unbatched], bool True = IGNORE (torch's convention) or float
        0 / −inf.  attn_mask: None or the causal (L, L) mask (bool triu(1) or float −inf above the
        diagonal, e.g. ``nn.Transformer.generate_square_subsequent_mask``).  is_causal: causal
        attention (with or without the matching ``attn_mask``).  ``need_weights=True`` raises;
        ``average_attn_weights`` only matters with it.
        """
        if need_weights:
            raise ValueError("need_weights=True is not supported: FAVOR never forms the attention matrix")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise TypeError(
                    f"{name} is a NestedTensor, which is not supported; build nn.TransformerEncoder with "
                    "enable_nested_tensor=False"
                )
        batched = query.dim() == 3
        if not batched:
            if query.dim() != 2 or key.dim() != 2 or value.dim() != 2:
                raise ValueError(
                    f"expected 3-D (batched) or 2-D (unbatched) inputs, got query {tuple(query.shape)}, "
                    f"key {tuple(key.shape)}, value {tuple(value.shape)}"
                )
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"query is batched but key {tuple(key.shape)} / value {tuple(value.shape)} are not")
        if not batched or not self.batch_first:
            # unbatched inputs became (L, 1, .) above: the same layout as batch-second inputs
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (B, L|S, .)
        B, L, Eq = query.shape
        _, S, Ek = key.shape
        if Eq != self.embed_dim or Ek != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"expected feature sizes (embed_dim, kdim, vdim) = ({self.embed_dim}, {self.kdim}, {self.vdim}), "
                f"got query {Eq}, key {Ek}, value {value.shape[-1]}"
            )
        if value.shape[:2] != key.shape[:2] or key.shape[0] != B:
            raise ValueError(
                f"key and value must agree in batch and length with query's batch {B}: "
                f"key {tuple(key.shape)}, value {tuple(value.shape)} (batch-first view)"
            )

        causal = bool(is_causal)
        if attn_mask is not None:
            self._causal_from_mask(attn_mask, L, S)
            causal = True
        if causal and L != S:
            raise ValueError(f"causal attention needs equal query and key lengths, got L={L}, S={S}")
        attend = None  # bool (B, S'), True = attend (favor's convention)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(f"key_padding_mask must have shape (B, S) = ({B}, {S}), got {tuple(key_padding_mask.shape)}")
            attend = ~_as_ignore_mask(key_padding_mask, "key_padding_mask")

        q, k, v = self._project(query, key, value)  # (B, L, E), (B, S, E), (B, S, E)
        extra = 0
        if self.bias_k is not None:
            k = torch.cat((k, self.bias_k.expand(B, 1, -1)), dim=1)  # (B, S + 1, E)
            v = torch.cat((v, self.bias_v.expand(B, 1, -1)), dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat((k, k.new_zeros(B, 1, self.embed_dim)), dim=1)  # (B, S', E)
            v = torch.cat((v, v.new_zeros(B, 1, self.embed_dim)), dim=1)
            extra += 1
        if extra and causal:
            raise ValueError("add_bias_kv / add_zero_attn are not supported with causal attention")
        # self-attention: the padded keys are also the padded queries, which must not move FAVOR++'s A
        query_attend = attend if (extra and attend is not None and L == S) else None
        if extra and attend is not None:
            attend = torch.cat((attend, attend.new_ones(B, extra)), dim=1)  # (B, S')
        H, Dh = self.num_heads, self.head_dim
        q = q.view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
        k = k.view(B, S + extra, H, Dh).transpose(1, 2)  # (B, H, S', Dh)
        v = v.view(B, S + extra, H, Dh).transpose(1, 2)  # (B, H, S', Dh)
        y = self.favor(q, k, v, key_padding_mask=attend, is_causal=causal,
                       query_padding_mask=query_attend)  # (B, H, L, Dh)
        y = torch.nn.functional.dropout(y, self.dropout, self.training)
        y = y.transpose(1, 2).reshape(B, L, self.embed_dim)  # (B, L, E)
        y = self.out_proj(y)
        if not batched:
            return y.squeeze(0), None  # (L, E)
        if not self.batch_first:
            y = y.transpose(0, 1)  # (L, B, E)
        return y, None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
