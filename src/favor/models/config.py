"""``PerformerConfig``: the one description of a Performer model (the CLI builds it, never re-declares it).

Every field carries ``metadata={"help": ...}`` (and ``"choices"`` where the values are a closed set)
so that command-line options can be generated from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..feature_maps import FEATURES, KERNELS, KEY_ESTIMATORS
from ..nn.favor_attention import validate_favor_options
from ..nn.self_attention import ATTENTIONS
from ..projections import PROJECTIONS, SCALINGS

__all__ = ["PerformerConfig"]


def _help(text: str, choices: tuple | None = None) -> dict[str, Any]:
    return {"help": text} if choices is None else {"help": text, "choices": choices}


@dataclass(frozen=True)
class PerformerConfig:
    """Hyperparameters of :class:`PerformerLM`, :class:`PerformerEncoder` and :class:`PerformerClassifier`.

    The defaults make a ~0.8 M-parameter byte-level model that trains visibly on 2 CPU cores in
    a few minutes.  ``__post_init__`` validates every field (ValueError/TypeError naming the field
    and value).  Frozen: use :meth:`replace` for a modified copy.
    """

    # Token vocabulary size (256 = bytes).
    vocab_size: int = field(default=256, metadata=_help("vocabulary size (256 for bytes)"))
    # Model width E.
    d_model: int = field(default=128, metadata=_help("model width (d_model, divisible by n_heads)"))
    # Attention heads H; head dim Dh = d_model / n_heads (even when rotary).
    n_heads: int = field(default=4, metadata=_help("attention heads"))
    # Transformer blocks.
    n_layers: int = field(default=4, metadata=_help("transformer blocks"))
    # MLP hidden width = round(mlp_ratio * d_model).
    mlp_ratio: float = field(default=4.0, metadata=_help("MLP hidden width as a multiple of d_model"))
    # Dropout probability (embeddings, attention output, MLP output).
    dropout: float = field(default=0.0, metadata=_help("dropout probability in [0, 1)"))
    # Longest sequence the model accepts (for generation: prompt + new tokens); sizes the learned
    # position table when rotary=False.  Enforced in both cases, with ValueError.
    max_len: int = field(default=1024, metadata=_help("longest sequence accepted (prompt + generated tokens)"))
    # "favor" (linear-time random-feature attention) or "softmax" (exact, the Transformer baseline).
    attention: str = field(default="favor", metadata=_help("attention kind", ATTENTIONS))
    # FAVOR options below apply to attention="favor" only (they are validated in both cases).
    # m, rows of each layer's random projection (None only with projection=None).
    nb_features: int | None = field(default=64, metadata=_help("random projections m per head (FAVOR)"))
    # Feature map of the softmax kernel; None means "positive"; must be None for relu/elu.
    features: str | None = field(
        default=None, metadata=_help("softmax-kernel feature map (None = positive; None for relu/elu)", FEATURES)
    )
    # How keys' features estimate the kernel: "plain" (unbiased) or the self-normalised
    # "normalized"/"calibrated" (lower error, a small bias that vanishes as M grows; positive exponential features only).
    key_estimator: str = field(
        default="plain", metadata=_help("key feature estimator (FAVOR; see favor.feature_maps)", KEY_ESTIMATORS)
    )
    # Kernel estimated by the features.
    kernel: str = field(default="softmax", metadata=_help("attention kernel (FAVOR)", KERNELS))
    # Random projection kind; None = identity (relu/elu only, then nb_features None or head dim).
    projection: str | None = field(
        default="orthogonal", metadata=_help("random projection (None = identity, relu/elu only)", PROJECTIONS)
    )
    # Row norms of orthogonal projections.
    scaling: str = field(default="chi", metadata=_help("row norms of orthogonal projections", SCALINGS))
    # Rotary position embedding; False = learned absolute position table of max_len rows.
    rotary: bool = field(default=True, metadata=_help("rotary position embedding (else learned positions)"))
    # Seeds the projections: layer i uses derive_seed(seed, i).  Weight init uses torch's global RNG.
    seed: int = field(default=0, metadata=_help("seed of the FAVOR projections (layer i: derive_seed(seed, i))"))
    # Chunk length of the causal FAVOR kernel (speed/memory trade-off; results equal to rounding).
    chunk_size: int = field(default=64, metadata=_help("chunk length of the causal FAVOR kernel"))

    def __post_init__(self) -> None:
        def check_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PerformerConfig.{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"PerformerConfig.{name} must be >= {minimum}, got {name}={value}")

        for name, minimum in (("vocab_size", 1), ("d_model", 1), ("n_heads", 1), ("n_layers", 1),
                              ("max_len", 1), ("seed", 0), ("chunk_size", 1)):
            check_int(name, minimum)
        for name in ("mlp_ratio", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"PerformerConfig.{name} must be a float, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"PerformerConfig.{name} must be finite, got {name}={value}")
        if self.mlp_ratio <= 0 or round(self.mlp_ratio * self.d_model) < 1:
            raise ValueError(f"PerformerConfig.mlp_ratio must give a positive MLP width, got mlp_ratio={self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PerformerConfig.dropout must be in [0, 1), got dropout={self.dropout}")
        if not isinstance(self.rotary, bool):
            raise TypeError(f"PerformerConfig.rotary must be a bool, got {self.rotary!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"PerformerConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.rotary and self.head_dim % 2:
            raise ValueError(
                f"rotary=True needs an even head dim, got d_model/n_heads = {self.d_model}/{self.n_heads} "
                f"= {self.head_dim}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"PerformerConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.nb_features is not None:
            check_int("nb_features", 1)
        try:
            validate_favor_options(
                self.head_dim, nb_features=self.nb_features, features=self.features, kernel=self.kernel,
                projection=self.projection, scaling=self.scaling, seed=self.seed, chunk_size=self.chunk_size,
                key_estimator=self.key_estimator,
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"PerformerConfig: {exc}") from None

    @property
    def head_dim(self) -> int:
        """Dh = d_model // n_heads."""
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP."""
        return round(self.mlp_ratio * self.d_model)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerformerConfig:
        """Build from a dict; unknown keys raise ValueError naming them; missing keys take defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"PerformerConfig.from_dict takes a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PerformerConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> PerformerConfig:
        """A new, validated config with ``changes`` applied (unknown names raise ValueError)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown PerformerConfig keys: {unknown}; known keys: {sorted(known)}")
        return dataclasses.replace(self, **changes)
