"""Performer models built from one :class:`PerformerConfig`: causal LM, bidirectional encoder, classifier.

Dimension key: B batch, L tokens (in this call), P tokens already cached, E d_model, V vocab_size,
C classes.

Architecture: token embedding (+ learned positions when ``rotary=False``), ``n_layers`` pre-norm
blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))`` with a GELU MLP, a final LayerNorm; the LM head is
tied to the token embedding.  Layer i's FAVOR projection is seeded with ``derive_seed(cfg.seed, i)``;
weights are initialised from torch's global RNG (call ``torch.manual_seed`` first for
reproducible weights).  Nothing random happens in ``forward`` except dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from ..nn.favor_attention import derive_seed, redraw_projections_
from ..nn.self_attention import AttentionCache, PerformerSelfAttention
from .config import PerformerConfig

__all__ = ["PerformerBlock", "PerformerClassifier", "PerformerEncoder", "PerformerLM", "POOLINGS"]

POOLINGS = ("mean", "cls")
LayerCaches = tuple[AttentionCache, ...]


def _check_config(cfg: object) -> PerformerConfig:
    if not isinstance(cfg, PerformerConfig):
        raise TypeError(f"expected a PerformerConfig, got {type(cfg).__name__}")
    return cfg


class PerformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x)); (B, L, E) -> (B, L, E)."""

    def __init__(self, cfg: PerformerConfig, layer: int, *, is_causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = PerformerSelfAttention(
            cfg.d_model, cfg.n_heads, attention=cfg.attention, rotary=cfg.rotary, dropout=cfg.dropout,
            bias=False, is_causal=is_causal, nb_features=cfg.nb_features, features=cfg.features,
            kernel=cfg.kernel, projection=cfg.projection, scaling=cfg.scaling,
            seed=derive_seed(cfg.seed, layer), chunk_size=cfg.chunk_size, key_estimator=cfg.key_estimator,
        )
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False),
            nn.GELU(),
            nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, *, key_padding_mask=None, cache=None, return_cache=False):
        """x (B, L, E) -> (B, L, E) [, new cache]."""
        a = self.attn(self.ln1(x), key_padding_mask=key_padding_mask, cache=cache, return_cache=return_cache)
        if return_cache:
            a, cache = a
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return (x, cache) if return_cache else x


class _Backbone(nn.Module):
    """Embeddings, blocks and final norm, shared by the three models."""

    def __init__(self, cfg: PerformerConfig, *, is_causal: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = None if cfg.rotary else nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(PerformerBlock(cfg, i, is_causal=is_causal) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, zero biases, residual outputs scaled by 1/√(2·n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for w in (block.attn.out.weight, block.mlp[2].weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def check_inputs(self, idx: torch.Tensor, key_padding_mask: torch.Tensor | None, offset: int) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (B, L) tensor of token ids, got {shape}")
        if idx.dtype not in (torch.long, torch.int32):
            raise TypeError(f"idx must be an integer (torch.long) tensor, got {idx.dtype}")
        # (skipped while compiling: the check reads the data, which would break the graph)
        if idx.numel() and not torch.compiler.is_compiling() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}), got min {int(idx.min())}, "
                f"max {int(idx.max())}"
            )
        if offset + idx.shape[1] > self.cfg.max_len:
            raise ValueError(
                f"sequence of {offset + idx.shape[1]} tokens (offset {offset} + {idx.shape[1]}) exceeds "
                f"max_len={self.cfg.max_len}"
            )
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = real token)")
            if key_padding_mask.shape != idx.shape:
                raise ValueError(
                    f"key_padding_mask must have the shape of idx {tuple(idx.shape)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )

    def forward(self, idx, *, key_padding_mask=None, cache: LayerCaches | None = None, return_cache=False):
        """idx (B, L) -> hidden (B, L, E) [, per-layer caches]."""
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the model has {len(self.blocks)}")
        offset = 0 if cache is None else cache[0].offset
        self.check_inputs(idx, key_padding_mask, offset)
        x = self.tok_emb(idx)  # (B, L, E)
        if self.pos_emb is not None:
            pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)  # (L,)
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x = block(x, key_padding_mask=key_padding_mask, cache=layer_cache, return_cache=return_cache)
            if return_cache:
                x, layer_cache = x
                new_cache.append(layer_cache)
        x = self.ln_f(x)  # (B, L, E)
        return (x, tuple(new_cache)) if return_cache else x


class _PerformerBase(nn.Module):
    def redraw_projections_(self, generator: torch.Generator) -> int:
        """Redraw every FAVOR projection from ``generator`` (layer order); returns how many."""
        return redraw_projections_(self, generator)

    def num_parameters(self) -> int:
        """Number of trainable parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())


class PerformerLM(_PerformerBase):
    """Causal (decoder-only) Performer language model with a tied LM head."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.cfg = _check_config(cfg)
        self.backbone = _Backbone(cfg, is_causal=True)

    def forward(
        self, idx: torch.Tensor, *, cache: LayerCaches | None = None, return_cache: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, LayerCaches]:
        """idx (B, L) token ids -> logits (B, L, V) [, per-layer caches for incremental decoding].

        ``cache``: as returned by an earlier call with ``return_cache=True`` on the preceding tokens
        (one :class:`favor.nn.FavorCache` or :class:`favor.nn.KVCache` per layer).
        """
        h = self.backbone(idx, cache=cache, return_cache=return_cache)
        if return_cache:
            h, cache = h
        logits = h @ self.backbone.tok_emb.weight.T  # (B, L, V)
        return (logits, cache) if return_cache else logits

    def generate_stream(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield ``max_new_tokens`` sampled tokens, each a (B,) LongTensor, one per step.

        The prompt (B, L0), L0 ≥ 1, is processed in one causal call that returns each layer's
        cache; every new token is then one step through the caches.  With ``attention="favor"``
        the cache is the recurrent :class:`favor.FavorState`, so the cost per new token does not
        depend on the context length; with ``attention="softmax"`` it is a KV cache (cost grows
        with the context).  ``temperature=0`` is greedy (argmax); otherwise tokens are sampled from
        softmax(logits / temperature), restricted to the ``top_k`` most likely when given, using
        ``generator`` (on the model's device).  Runs under ``torch.no_grad``; dropout follows the
        module's mode, so call ``model.eval()`` first.  Arguments are validated when called, before
        the first token.
        """
        self._check_generate_args(prompt, max_new_tokens, temperature, top_k, generator)
        return self._stream(prompt, max_new_tokens, float(temperature), top_k, generator)

    @torch.no_grad()
    def _stream(self, prompt, max_new_tokens, temperature, top_k, generator) -> Iterator[torch.Tensor]:
        if max_new_tokens == 0:
            return
        logits, cache = self(prompt, return_cache=True)  # (B, L0, V)
        for step in range(max_new_tokens):
            if step > 0:
                logits, cache = self(token.unsqueeze(1), cache=cache, return_cache=True)  # (B, 1, V)
            token = _sample(logits[:, -1], temperature, top_k, generator)  # (B,)
            yield token

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """prompt (B, L0) -> (B, L0 + max_new_tokens): the prompt followed by the sampled tokens.

        See :meth:`generate_stream` (same arguments, same tokens for the same generator state).
        """
        tokens = list(self.generate_stream(
            prompt, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator
        ))
        if not tokens:
            return prompt.clone()
        return torch.cat((prompt, torch.stack(tokens, dim=1).to(prompt.dtype)), dim=1)

    def _check_generate_args(self, prompt, max_new_tokens, temperature, top_k, generator) -> None:
        cfg = self.cfg
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1:
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"prompt must be a (B, L0) tensor of token ids with L0 >= 1, got {shape}")
        if prompt.dtype not in (torch.long, torch.int32):
            raise TypeError(f"prompt must be an integer (torch.long) tensor, got {prompt.dtype}")
        if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= cfg.vocab_size):
            raise ValueError(
                f"prompt token ids must lie in [0, {cfg.vocab_size}), got min {int(prompt.min())}, "
                f"max {int(prompt.max())}"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if prompt.shape[1] + max_new_tokens > cfg.max_len:
            raise ValueError(
                f"prompt of {prompt.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds "
                f"max_len={cfg.max_len}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {temperature!r}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= cfg.vocab_size):
            raise ValueError(f"top_k must be None or an int in [1, {cfg.vocab_size}], got {top_k!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids: argmax if temperature == 0, else a (top-k) softmax sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # (B, V), ≤ 0: no inf − inf for tiny T
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


class PerformerEncoder(_PerformerBase):
    """Bidirectional Performer encoder with a tied masked-LM head."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.cfg = _check_config(cfg)
        self.backbone = _Backbone(cfg, is_causal=False)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, idx: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L), key_padding_mask bool (B, L) True = real token -> hidden (B, L, E).

        Padded positions are excluded as keys, so they do not change the hidden states of the
        real tokens; their own hidden states are computed but meaningless.
        """
        return self.backbone(idx, key_padding_mask=key_padding_mask)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, E) -> masked-LM logits (B, L, V) (tied to the token embedding, plus a bias)."""
        if not isinstance(hidden, torch.Tensor) or hidden.shape[-1] != self.cfg.d_model:
            raise ValueError(f"hidden must end in d_model={self.cfg.d_model}, got {getattr(hidden, 'shape', hidden)}")
        return hidden @ self.backbone.tok_emb.weight.T + self.mlm_bias  # (B, L, V)


class PerformerClassifier(_PerformerBase):
    """:class:`PerformerEncoder` + pooling + linear head: idx (B, L) -> logits (B, C).

    ``pooling="mean"`` averages the hidden states of the real tokens (honouring
    ``key_padding_mask``); ``"cls"`` takes position 0 (put a classification token there).
    """

    def __init__(self, cfg: PerformerConfig, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.cfg = _check_config(cfg)
        self.num_classes = num_classes
        self.pooling = pooling
        self.encoder = PerformerEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L), key_padding_mask bool (B, L) True = real token -> logits (B, C)."""
        h = self.encoder(idx, key_padding_mask)  # (B, L, E)
        if self.pooling == "cls":
            pooled = h[:, 0]  # (B, E)
        elif key_padding_mask is None:
            pooled = h.mean(dim=1)  # (B, E)
        else:
            w = key_padding_mask.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, E); all-padding rows -> 0
        return self.head(pooled)  # (B, C)
