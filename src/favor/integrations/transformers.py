"""FAVOR+ inside Hugging Face ``transformers`` models (``transformers`` >= 5.0, optional extra).

Importing this module registers the name ``"favor"`` with ``transformers``' attention interfaces
(``AttentionInterface`` for the attention itself, ``AttentionMaskInterface`` for the masks the
models build), so that every model written against those interfaces (BERT, GPT-2, Llama, ...) can
run its attention layers through :func:`favor.favor_attention`::

    import favor.integrations.transformers  # registers "favor"
    model = AutoModel.from_pretrained(path, attn_implementation="favor")
    # or, on a loaded model, with chosen settings:
    favor.performerize(model, nb_features=256, features="positive", seed=0)
    favor.unperformerize(model)  # back to "sdpa"

Dimension key: B batch, H query heads, Hkv key/value heads, Lq/Lk query/key length, D head dim,
Dv value head dim, m projections.

Settings and state.  The FAVOR+ settings (:class:`FavorSettings`) are stored as a plain dict in
``config.favor`` (so ``save_pretrained`` writes them into ``config.json``), and every attention
module gets a persistent buffer ``favor_projection`` (m, D) (so its state dict and checkpoint hold
it).  A projection is a pure function of the settings, the head dim and the module's identity
(class name and ``layer_idx``): it is drawn from ``seed`` mixed with that identity on a CPU
generator in float64.  :func:`performerize` draws them eagerly; a model switched to ``"favor"``
through ``from_pretrained(attn_implementation="favor")`` or ``set_attn_implementation("favor")``
draws each one at its first call, from ``config.favor`` (defaults if absent, written back into the
config with a warning).  ``from_pretrained`` does not know the ``favor_projection`` buffers (its load
report lists them as UNEXPECTED and drops them); the reloaded layers redraw the same matrices from
``config.favor`` (with the same favor code: a change to how a projection kind is drawn, as for
``givens`` on 2026-11-29, changes the redraw), and :func:`load_projections` copies the stored ones
byte for byte.  A cast of the
model (``.half()``, ``.to(torch.bfloat16)``) rounds the buffers; at its next call each layer puts
back the float32 draw they were rounded from, so a cast model and its reload compute the same.
:func:`redraw_projections` draws new ones from a new seed, when the caller asks.

What FAVOR+ honours: the ``scaling`` the model passes, ``is_causal`` (from the call or the module),
padding masks (2D from the model's mask creation, or 4D boolean/additive masks that are padding,
optionally combined with causality), grouped-query attention (key/value heads repeated as in
``repeat_kv``), and decoding with a key/value cache (queries are the last Lq positions).  What it
cannot honour raises ``ValueError``: other mask patterns (sliding windows, chunked or packed
sequences, additive biases), ``softcap``, attention sinks, position biases and requests for the
attention weights (``output_attentions``).  Attention-probability dropout (passed by models in
training mode) has no FAVOR+ counterpart: it is not applied, with a warning given once.

Decoding note: each step recomputes attention over the cached keys (O(Lk·m) per token) rather
than carrying FAVOR+'s O(m·Dv) recurrent state, because ``transformers`` caches keys and values.
With ``positive``/``hyperbolic`` features the outputs equal a full causal forward (a query's
output depends only on its own and earlier keys); ``oprf`` picks its parameter from the tokens in
the call, so cached decoding can differ from a full forward within the estimator's variance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)

from ..attention import favor_attention
from ..feature_maps import FEATURES, KERNELS, check_key_estimator
from ..linear import DEFAULT_CHUNK_SIZE
from ..projections import PROJECTIONS, SCALINGS, projection_matrix

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DEFAULT_NB_FEATURES",
    "FavorSettings",
    "favor_attention_forward",
    "favor_mask",
    "favor_settings",
    "load_projections",
    "performerize",
    "redraw_projections",
    "register",
    "unperformerize",
]

ATTN_IMPLEMENTATION = "favor"
DEFAULT_NB_FEATURES = 256
BUFFER_NAME = "favor_projection"
_MAJOR = int(transformers.__version__.split(".")[0])
if _MAJOR < 5:
    raise ImportError(
        f"favor.integrations.transformers needs transformers >= 5.0, found {transformers.__version__}"
    )


@dataclasses.dataclass(frozen=True)
class FavorSettings:
    """How every attention layer of a model is approximated; stored as ``config.favor``."""

    nb_features: int = DEFAULT_NB_FEATURES  # m: random projections per layer (rows of the (m, D) matrix)
    features: str | None = "positive"  # softmax feature map (favor.FEATURES); None for relu/elu
    kernel: str = "softmax"  # "softmax" (estimated) | "relu" | "elu" (generalised attention)
    projection: str = "orthogonal"  # favor.PROJECTIONS: how the (m, D) matrices are drawn
    scaling: str = "chi"  # favor.SCALINGS: row norms of the orthogonal kinds
    seed: int = 0  # base seed; each layer mixes in its identity (class name, layer_idx)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # causal chunk length (speed only)
    key_estimator: str = "plain"  # favor.KEY_ESTIMATORS: "plain" (unbiased), "normalized", "calibrated"

    def __post_init__(self) -> None:
        m = self.nb_features
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"nb_features must be a positive int, got {m!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; expected one of {KERNELS}")
        if self.kernel == "softmax" and self.features not in FEATURES:
            raise ValueError(f"unknown features {self.features!r}; expected one of {FEATURES}")
        if self.kernel != "softmax" and self.features is not None:
            raise ValueError(f"features={self.features!r} applies to kernel='softmax' only, not {self.kernel!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; expected one of {PROJECTIONS}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; expected one of {SCALINGS}")
        if self.projection == "iid" and self.scaling != "chi":
            raise ValueError("scaling applies to orthogonal projections only; use scaling='chi' with 'iid'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        c = self.chunk_size
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {c!r}")
        check_key_estimator(self.key_estimator, self.features, self.kernel)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FavorSettings":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config.favor has unknown keys {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# warnings given once per process


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# settings and projections


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct config object held by the model's modules (sub-models may have their own)."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, transformers.PretrainedConfig):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def favor_settings(module_or_config: Any) -> FavorSettings | None:
    """The :class:`FavorSettings` stored in a model's, module's or config's ``favor`` entry, or None."""
    cfg = module_or_config
    if isinstance(cfg, torch.nn.Module):
        cfg = getattr(cfg, "config", None)
    stored = getattr(cfg, "favor", None) if cfg is not None else None
    if stored is None:
        return None
    if isinstance(stored, FavorSettings):
        return stored
    if not isinstance(stored, dict):
        raise TypeError(f"config.favor must be a dict, got {type(stored).__name__}")
    return FavorSettings.from_dict(stored)


def _module_seed(settings: FavorSettings, module: torch.nn.Module) -> int:
    """Seed of one layer's projection: the base seed mixed with the module's class and layer_idx."""
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        _warn_once(
            f"no-layer-idx:{type(module).__name__}",
            f"{type(module).__name__} has no layer_idx: all its instances share one FAVOR+ projection",
        )
    key = f"{settings.seed}:{type(module).__name__}:{layer}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _draw_projection(settings: FavorSettings, module: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """(m, D) float32 projection of one layer (CPU generator, float64 draw, deterministic)."""
    gen = torch.Generator(device="cpu").manual_seed(_module_seed(settings, module))
    return projection_matrix(
        settings.projection, settings.nb_features, head_dim,
        scaling=settings.scaling, generator=gen, dtype=torch.float32,
    )


def _head_dim(module: torch.nn.Module) -> int | None:
    for name in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, head dim) of the modules that look like ``transformers`` attention layers:
    they hold a config, an ``is_causal`` flag and a head dim.  Layers this misses still get their
    projection at their first call."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) or not hasattr(module, "is_causal"):
            continue
        if getattr(module, "config", None) is None:
            continue
        d = _head_dim(module)
        if d is not None:
            found.append((name, module, d))
    return found


def _set_projection(module: torch.nn.Module, projection: torch.Tensor) -> None:
    """Store ``projection`` as the module's buffer, on the module's device.  Never an inference
    tensor (a draw made under ``torch.inference_mode()`` is copied out), so training can follow."""
    old = module._buffers.get(BUFFER_NAME)
    device = old.device if old is not None else _module_device(module)
    with torch.inference_mode(False):
        projection = projection.to(device)
        if projection.is_inference():
            projection = projection.clone()
    module.register_buffer(BUFFER_NAME, projection, persistent=True)


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def performerize(
    model: PreTrainedModel,
    nb_features: int = DEFAULT_NB_FEATURES,
    features: str | None = "positive",
    *,
    kernel: str = "softmax",
    projection: str = "orthogonal",
    scaling: str = "chi",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_estimator: str = "plain",
) -> PreTrainedModel:
    """Switch a loaded ``transformers`` model to FAVOR+ attention, in place.

    Stores the settings in ``config.favor`` (every config of the model), draws one (m, D)
    projection per attention layer into a persistent buffer ``favor_projection`` and calls
    ``model.set_attn_implementation("favor")``.  Calling it again replaces settings and
    projections.  Undo with :func:`unperformerize`.

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention goes through ``AttentionInterface``.
        nb_features: m, the number of random projections per layer.
        features: softmax feature map, one of ``favor.FEATURES``; ``None`` with ``kernel="relu"|"elu"``.
        kernel: ``"softmax"`` (FAVOR+ estimate), or ``"relu"``/``"elu"`` (generalised attention).
        projection: how the matrices are drawn, one of ``favor.PROJECTIONS``.
        scaling: row norms, one of ``favor.SCALINGS``.
        seed: base seed; layer i's projection is drawn from it mixed with the layer's identity.
        chunk_size: causal chunk length.
        key_estimator: how keys' features estimate the kernel, one of ``favor.KEY_ESTIMATORS``:
            ``"plain"`` (unbiased) or the self-normalised ``"normalized"``/``"calibrated"``
            (lower error, a small bias that vanishes as M grows; see :func:`favor.favor_attention`).

    Returns:
        the same model.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    if kernel != "softmax" and features == "positive":
        features = None  # the default names the softmax map; relu/elu have none
    settings = FavorSettings(
        nb_features=nb_features, features=features, kernel=kernel, projection=projection,
        scaling=scaling, seed=seed, chunk_size=chunk_size, key_estimator=key_estimator,
    )
    register()
    for cfg in _configs(model):
        cfg.favor = settings.to_dict()
    for module in model.modules():  # layers _attention_modules misses redraw at their next call
        module._buffers.pop(BUFFER_NAME, None)
    for _, module, d in _attention_modules(model):
        _set_projection(module, _draw_projection(settings, module, d))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"{type(model).__name__} does not support setting its attention implementation "
            f"(it stays {model.config._attn_implementation!r}); FAVOR+ needs models built on AttentionInterface"
        )
    return model


def unperformerize(model: PreTrainedModel, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Undo :func:`performerize`: remove the projections and ``config.favor`` and switch the model to
    ``attn_implementation`` (default ``"sdpa"``).  Returns the same model."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    if attn_implementation == ATTN_IMPLEMENTATION:
        raise ValueError("unperformerize switches away from 'favor'; give another attn_implementation")
    for module in model.modules():
        module._buffers.pop(BUFFER_NAME, None)
    for cfg in _configs(model):
        if hasattr(cfg, "favor"):
            delattr(cfg, "favor")
    model.set_attn_implementation(attn_implementation)
    return model


def redraw_projections(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Draw new projections for every layer that has one, from ``seed`` (stored in ``config.favor``)."""
    settings = favor_settings(model)
    if settings is None:
        raise ValueError("model has no config.favor; call favor.performerize(model, ...) first")
    settings = dataclasses.replace(settings, seed=seed)
    for cfg in _configs(model):
        cfg.favor = settings.to_dict()
    for module in model.modules():
        old = module._buffers.get(BUFFER_NAME)
        if old is not None:
            _set_projection(module, _draw_projection(settings, module, old.shape[1]))
    return model


def load_projections(model: PreTrainedModel, checkpoint_dir: str | os.PathLike) -> int:
    """Copy the ``favor_projection`` buffers saved by ``save_pretrained`` in ``checkpoint_dir``
    (``model.safetensors``, or the shards its index lists) into ``model``.  Returns how many were
    loaded; raises if the checkpoint holds none or one names no module of ``model``."""
    from safetensors import safe_open

    folder = Path(checkpoint_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    suffix = "." + BUFFER_NAME
    loaded = 0
    for file in files:
        with safe_open(str(folder / file), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(suffix):
                    continue
                name = key[: -len(suffix)]
                candidates = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
                target = next((modules[c] for c in candidates if c in modules), None)
                if target is None:
                    raise ValueError(f"checkpoint key {key!r} names no module of {type(model).__name__}")
                _set_projection(target, f.get_tensor(key))
                loaded += 1
    if loaded == 0:
        raise ValueError(f"checkpoint {folder} holds no {BUFFER_NAME} buffers")
    return loaded


def _projection_for(module: torch.nn.Module, settings: FavorSettings, head_dim: int) -> torch.Tensor:
    """The layer's (m, D) projection, drawn from ``settings`` at its first call.  A buffer that a
    cast of the model (``.half()``, ``.to(torch.bfloat16)``) rounded goes back to float32, once:
    to the draw it was rounded from when it is one (so a cast model computes what its reload,
    which redraws, computes), else to its own values."""
    proj = module._buffers.get(BUFFER_NAME)
    shape = (settings.nb_features, head_dim)
    if proj is None or (proj.dtype in (torch.float16, torch.bfloat16) and tuple(proj.shape) == shape):
        drawn = _draw_projection(settings, module, head_dim)
        if proj is None or torch.equal(drawn.to(proj.dtype), proj.cpu()):
            _set_projection(module, drawn)
        else:  # rounded from other values (e.g. restored by load_projections): keep them
            _set_projection(module, proj.float())
        proj = module._buffers[BUFFER_NAME]
    if tuple(proj.shape) != shape:
        raise ValueError(
            f"{type(module).__name__}.{BUFFER_NAME} has shape {tuple(proj.shape)} but the settings and "
            f"head dim need {shape}; call favor.performerize again"
        )
    return proj


def _settings_of(module: torch.nn.Module) -> FavorSettings:
    cfg = getattr(module, "config", None)
    settings = favor_settings(module)
    if settings is None:
        settings = FavorSettings()
        _warn_once(
            "default-settings",
            f"attn_implementation='favor' without config.favor: using the defaults {settings}; "
            "call favor.performerize(model, ...) to choose them",
        )
        if cfg is not None:
            cfg.favor = settings.to_dict()
    return settings


# ---------------------------------------------------------------------------------------------
# masks


def _check_pattern(mask_function: Any) -> None:
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(
            "FAVOR+ applies padding masks with plain causal or bidirectional attention only; this model "
            f"asked for the mask pattern {name} (sliding window, chunked, packed or overlaid masks are "
            "not expressible with linear attention)"
        )


def favor_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """``AttentionMaskInterface`` entry: the (B, Lk) bool key padding mask (True = attend), or None
    when nothing is padded.  Causality is not in the mask: the attention layer's ``is_causal`` says it."""
    _check_pattern(mask_function)
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        raise ValueError(f"FAVOR+ needs the whole key sequence in the cache (kv_offset=0), got kv_offset={kv_offset}")
    if mask_function is causal_mask_function and (isinstance(q_offset, torch.Tensor) or kv_length != q_offset + q_length):
        raise ValueError(
            f"FAVOR+ needs the cache to hold exactly the keys seen so far ({q_offset} + {q_length}), "
            f"but attention sees {kv_length} (static caches are not supported by FAVOR+)"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2D (B, Lk) padding mask, got shape {tuple(attention_mask.shape)}")
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] != kv_length:
        raise ValueError(
            f"padding mask covers {attention_mask.shape[1]} keys but attention sees {kv_length} "
            "(static caches are not supported by FAVOR+)"
        )
    if bool(attention_mask.all()):
        return None
    return attention_mask


def _pattern(Lq: int, Lk: int, causal: bool, device: torch.device) -> torch.Tensor:
    """(Lq, Lk) bool: query i (position Lk − Lq + i) may see key j."""
    if not causal:
        return torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    q_pos = torch.arange(Lk - Lq, Lk, device=device)
    return torch.arange(Lk, device=device)[None, :] <= q_pos[:, None]


def _reduce_4d_mask(mask: torch.Tensor, B: int, Lq: int, Lk: int, is_causal: bool) -> tuple[torch.Tensor | None, bool]:
    """A 4D (B|1, H|1, Lq, Lk) bool or additive mask -> ((B, Lk) key padding mask or None, causal).

    Accepted only when it is a padding mask, alone or with a causal pattern; rows with nothing
    allowed (queries on padding, whose outputs models discard) are accepted whatever they hold:
    bidirectional, they attend to the unpadded keys like any other query; causal with left
    padding, they see no key and get 0."""
    if mask.shape[-2:] != (Lq, Lk) or mask.shape[0] not in (1, B):
        raise ValueError(f"4D attention mask has shape {tuple(mask.shape)}, expected (B|1, H|1, {Lq}, {Lk})")
    if mask.dtype == torch.bool:
        allowed = mask
    elif not mask.dtype.is_floating_point:
        raise TypeError(
            f"4D attention mask must be bool (True = attend) or additive float, got {mask.dtype}"
        )
    else:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if bool((mask[~blocked] != 0).any()):
            raise ValueError(
                "FAVOR+ cannot add an arbitrary bias to attention scores; the additive attention mask "
                "holds values other than 0 and -inf"
            )
        allowed = ~blocked
    allowed = allowed.expand(B, -1, -1, -1)
    if not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("FAVOR+ cannot apply a per-head attention mask")
    allowed = allowed[:, 0]  # (B, Lq, Lk)
    keys = allowed.any(dim=1)  # (B, Lk) keys some query may see
    live = allowed.any(dim=2)  # (B, Lq) queries that see something
    for causal in ((True, False) if is_causal else (False, True)):
        expected = keys[:, None, :] & _pattern(Lq, Lk, causal, mask.device)[None]
        if bool(((expected == allowed) | ~live[:, :, None]).all()):
            return (None if bool(keys.all()) else keys), causal
    raise ValueError(
        "FAVOR+ applies padding masks (optionally with causality) only; this attention mask is "
        "another pattern"
    )


# ---------------------------------------------------------------------------------------------
# attention


_UNSUPPORTED = {
    "softcap": "logit soft-capping",
    "sliding_window": "sliding-window attention",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "additive position biases",
}


def favor_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: query (B, H, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv)
    -> ((B, Lq, H, Dv) output, None).  See the module docstring for what is honoured."""
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"FAVOR+ cannot apply {what} ({name}={kwargs[name]!r} was passed)")
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        raise ValueError(
            "FAVOR+ never forms the attention matrix, so it cannot return attention weights "
            "(output_attentions=True); use attn_implementation='eager' for that"
        )
    if dropout:
        _warn_once(
            "dropout",
            f"FAVOR+ has no attention-probability dropout: dropout={dropout} is not applied "
            "(set the model's attention dropout to 0, or call model.eval(), to silence this)",
        )
    settings = _settings_of(module)
    if len({query.dtype, key.dtype, value.dtype}) > 1:
        # e.g. rotary embeddings give float32 q, k next to a bf16 v under autocast, which SDPA accepts
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            common = torch.get_autocast_dtype(device_type)
        else:
            common = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        query, key, value = (t.to(common) for t in (query, key, value))
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"query has {H} heads, not a multiple of the {Hkv} key/value heads")
    if Hkv != H:  # grouped-query attention: head h reads key/value head h // (H / Hkv)
        key = key.repeat_interleave(H // Hkv, dim=1)
        value = value.repeat_interleave(H // Hkv, dim=1)
    causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))

    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape != (B, Lk):
                raise ValueError(f"padding mask has shape {tuple(attention_mask.shape)}, expected ({B}, {Lk})")
            key_padding_mask = attention_mask.to(torch.bool)
        elif attention_mask.dim() == 4:
            key_padding_mask, causal = _reduce_4d_mask(attention_mask, B, Lq, Lk, causal)
        else:
            raise ValueError(f"attention mask must be 2D or 4D, got shape {tuple(attention_mask.shape)}")

    proj = _projection_for(module, settings, D)  # (m, D)
    opts = dict(
        features=settings.features, kernel=settings.kernel, key_padding_mask=key_padding_mask,
        scale=None if scaling is None else float(scaling), chunk_size=settings.chunk_size,
        key_estimator=settings.key_estimator,
    )
    if causal and Lq > Lk:
        raise ValueError(f"causal attention with more queries ({Lq}) than keys ({Lk})")
    if causal and Lq == 1:  # one new token sees every cached key
        out = favor_attention(query, key, value, proj, is_causal=False, **opts)
    elif causal and Lq < Lk:  # the queries are the last Lq positions: pad the front and run causally
        pad = query.new_zeros(B, H, Lk - Lq, D)
        out = favor_attention(torch.cat([pad, query], dim=2), key, value, proj, is_causal=True, **opts)
        out = out[:, :, Lk - Lq:]
    else:
        out = favor_attention(query, key, value, proj, is_causal=causal, **opts)  # (B, H, Lq, Dv)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"favor"`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent;
    done when this module is imported)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, favor_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, favor_mask)


register()
