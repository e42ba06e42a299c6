"""``favor_attention``: SDPA-style entry point (validation, feature maps, dispatch to kernels).

Dimension key: B batch, H heads, Lq/Lk query/key length, D query/key head dim, Dv value dim,
m projections, M features.
"""

from __future__ import annotations

import math

import torch

from .feature_maps import (
    FEATURES,
    KERNELS,
    OPRF_FEATURES,
    check_key_estimator,
    feature_map,
    key_feature_map,
    num_features,
    oprf_parameter,
)
from .fused import FUSED_KINDS, fused_attention, make_spec
from .linear import DEFAULT_CHUNK_SIZE, FavorState, _check_state, causal_linear_attention, linear_attention

__all__ = ["BACKENDS", "favor_attention", "favor_attention_step"]

#: ``favor_attention(backend=...)``: "auto" (fused kernels where implemented) or "generic".
BACKENDS = ("auto", "generic")


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_mask(name: str, mask: object, meaning: str, dims: str, shape: tuple[int, int]) -> None:
    """None, or a bool tensor of ``shape`` (named ``dims`` in the message)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be torch.bool ({meaning}), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {dims} = {shape}, got {tuple(mask.shape)}")


def _validate(query, key, value, projection, features, kernel, is_causal, key_padding_mask,
              scale, initial_state, chunk_size, query_padding_mask=None) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    (B, H, Lq, D), (Bk, Hk, Lk, Dk), (Bv, Hv, Lv, _) = query.shape, key.shape, value.shape
    if (B, H) != (Bk, Hk) or (B, H) != (Bv, Hv):
        raise ValueError(
            "query, key and value must agree in batch and heads, got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if D != Dk:
        raise ValueError(f"query has head dim {D} but key has {Dk}")
    if D == 0:
        raise ValueError(f"head dim must be at least 1, got query {tuple(query.shape)}")
    if Lk != Lv:
        raise ValueError(f"key has length {Lk} but value has {Lv}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "softmax":
        if features not in FEATURES:
            raise ValueError(f"unknown features {features!r}; expected one of {FEATURES}")
        if projection is None:
            raise ValueError(f"features={features!r} needs a (m, {D}) projection, got None")
    elif features is not None:
        raise ValueError(f"features={features!r} applies to kernel='softmax' only, not kernel={kernel!r}")
    if projection is not None:
        if not isinstance(projection, torch.Tensor):
            raise TypeError(f"projection must be a torch.Tensor or None, got {type(projection).__name__}")
        if projection.dim() != 2 or projection.shape[1] != D or projection.shape[0] == 0:
            raise ValueError(
                f"projection must have shape (m, {D}) with m > 0 to match head dim {D}, "
                f"got {tuple(projection.shape)}"
            )
        if not projection.is_floating_point():
            raise TypeError(f"projection must be floating point, got {projection.dtype}")
    _check_mask("key_padding_mask", key_padding_mask, "True = attend", "(B, Lk)", (B, Lk))
    if query_padding_mask is not None and is_causal:
        raise ValueError("query_padding_mask is for bidirectional attention; causal attention reads "
                         "padding from key_padding_mask")
    _check_mask("query_padding_mask", query_padding_mask, "True = a real query", "(B, Lq)", (B, Lq))
    if is_causal and Lq != Lk:
        raise ValueError(f"is_causal=True needs equal query and key lengths, got Lq={Lq}, Lk={Lk}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be positive and finite, got {scale}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if initial_state is not None:
        if not is_causal:
            raise ValueError("initial_state needs is_causal=True")
        if not isinstance(initial_state, FavorState):
            raise TypeError(f"initial_state must be a FavorState, got {type(initial_state).__name__}")
        M = D if projection is None else num_features(projection.shape[0], features, kernel)
        _check_state(initial_state, B, H, M, value.shape[-1])
        a = initial_state.oprf_a
        if features in OPRF_FEATURES and a is None:
            raise ValueError(f"initial_state has no oprf_a but features={features!r}")
        if a is not None:
            if not isinstance(a, torch.Tensor) or not a.is_floating_point() or tuple(a.shape) != (B, H):
                got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"initial_state.oprf_a must be a floating (B, H) = ({B}, {H}) tensor, got {got}")
            # a data-dependent check: eager only (torch.compile cannot guard on values)
            if not torch.compiler.is_compiling() and (bool((a >= 0.25).any()) or bool(torch.isinf(a).any())):
                raise ValueError("initial_state.oprf_a must be finite and below 1/4 (FAVOR++ needs 1 - 4A > 0; "
                                 f"NaN where no token was present), got max {float(a.nan_to_num(0).max())}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Features and states are accumulated in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_oprf_parameter(
    q: torch.Tensor, k: torch.Tensor, root: float, mask: torch.Tensor | None, previous: torch.Tensor | None
) -> torch.Tensor:
    """Causal FAVOR++ parameter A (B, H): fixed by the first present token of the whole sequence
    (its scaled query root·q and key root·k), so it is constant over the sequence and no output
    depends on a later token.

    ``previous`` is the A carried in the state of the preceding pieces; NaN marks rows where no
    token was present yet (their outputs are 0 whatever A is), to be fixed by this piece.
    """
    B, H, L, d = q.shape
    present = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask
    if L == 0:
        fresh = torch.full((B, H), float("nan"), dtype=q.dtype, device=q.device)
    else:
        first = present.to(torch.int8).argmax(dim=1)  # (B,) index of the first True
        idx = first.view(-1, 1, 1, 1).expand(-1, H, 1, d)
        fresh = oprf_parameter(q.gather(2, idx) * root, k.gather(2, idx) * root)  # (B, H)
        fresh = fresh.masked_fill(~present.any(dim=1, keepdim=True), float("nan"))
    if previous is None:
        return fresh
    return torch.where(torch.isnan(previous), fresh, previous)


def _bidirectional_oprf_parameter(q: torch.Tensor, k: torch.Tensor, root: float, mask: torch.Tensor | None,
                                  query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional FAVOR++ parameter A (B, H) from all present pairs of scaled queries root·q and
    keys root·k (A is detached, so the scaled copies stay out of the autograd graph).

    The real queries are ``query_mask`` (B, Lq), or in self-attention (Lq == Lk) without one those
    the key padding mask marks, so padding content cannot move A (and with it the outputs of the
    real tokens).  Any A < 0 keeps the estimator unbiased, so this choice only affects variance.
    """
    x, y = q.detach() * root, k.detach() * root
    if query_mask is None and mask is not None and x.shape[2] == y.shape[2]:
        query_mask = mask
    if mask is None and query_mask is None:
        return oprf_parameter(x, y)
    return oprf_parameter(x, y, None if mask is None else mask.unsqueeze(1),
                          None if query_mask is None else query_mask.unsqueeze(1))


def _use_fused(features, kernel, tensors, initial_state, return_state, key_estimator="plain") -> bool:
    """The fused kernels (:mod:`favor.fused`) serve every call of a kind they implement with plain
    key features, except those that need gradients through a :class:`FavorState`
    (initial_state/return_state with autograd): those take the generic path (feature maps +
    :mod:`favor.linear`)."""
    if (features, kernel) not in FUSED_KINDS or key_estimator != "plain":
        return False
    if initial_state is None and not return_state:
        return True
    flat = [t for t in tensors if isinstance(t, torch.Tensor)]
    if initial_state is not None:
        flat += [t for t in initial_state if t is not None]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in flat))


def favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor | None,
    *,
    features: str | None = None,
    kernel: str = "softmax",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: FavorState | None = None,
    return_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    key_estimator: str = "plain",
) -> torch.Tensor | tuple[torch.Tensor, FavorState]:
    """Random-feature estimate of softmax(scale·QKᵀ)V in linear time and memory.

    Args:
        query: (B, H, Lq, D); key: (B, H, Lk, D); value: (B, H, Lk, Dv).
        projection: (m, D) random matrix (rows ω_i), e.g. from
            :func:`favor.gaussian_orthogonal_matrix`; ``None`` for the deterministic kernels.
        features: for ``kernel="softmax"``: ``"positive"`` (default), ``"hyperbolic"``,
            ``"trig"``, ``"oprf"`` or ``"hyperbolic_oprf"``.  Must stay ``None`` for the other kernels.
        kernel: ``"softmax"`` | ``"relu"`` | ``"elu"``.
        is_causal: query t attends to keys 0..t only (needs Lq == Lk).
        key_padding_mask: bool (B, Lk), True = attend.  Masked keys reach neither the numerator
            nor the denominator; a query with nothing to attend to gets 0.
        scale: s in exp(s·qᵀk); default 1/√D.  Features see x = √s·q and y = √s·k.
        initial_state: causal only: the :class:`FavorState` returned by an earlier call on the
            preceding tokens (split/resume, recurrent decoding).
        return_state: causal only: also return the state after the last token.
        chunk_size: causal chunk length C (outputs do not depend on it beyond rounding).
        query_padding_mask: bidirectional only: bool (B, Lq), True = a real query.  Only the
            FAVOR++ parameter A of ``"oprf"``/``"hyperbolic_oprf"`` reads it (padding queries
            must not move A); every query still gets its output.  Default: ``key_padding_mask``
            when Lq == Lk (self-attention), else all queries.
        backend: ``"auto"``: the fused kernels (:mod:`favor.fused`, features recomputed in
            backward, no double backward) for the kinds they implement, else the generic path;
            ``"generic"``: always feature map + :mod:`favor.linear` under autograd (stores the
            (L, M) features; differentiable to any order, e.g. for Hessians).
        key_estimator: how the keys' features estimate the kernel (:mod:`favor.feature_maps`):
            ``"plain"`` (default, unbiased), ``"normalized"`` or ``"calibrated"`` (self-normalised
            per key: lower error, a small bias that vanishes as M grows; positive exponential
            kinds only; they take the generic path).

    Returns:
        (B, H, Lq, Dv) in the input dtype, and the :class:`FavorState` if ``return_state``.

    Features and states are computed in float32 (float64 for float64 inputs), also under
    autocast.  For ``"oprf"`` and ``"hyperbolic_oprf"`` the FAVOR++ parameter A is taken per
    (batch, head) from all present query/key pairs when bidirectional (with Lq == Lk the key
    padding mask also marks padded queries); when causal, from the first present
    token (its query and key), so that no output depends on a later token, and it is carried in
    the state.
    """
    if kernel == "softmax" and features is None:
        features = "positive"
    for name, flag in (("is_causal", is_causal), ("return_state", return_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if return_state and not is_causal:
        raise ValueError("return_state needs is_causal=True")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _validate(query, key, value, projection, features, kernel, is_causal, key_padding_mask,
              scale, initial_state, chunk_size, query_padding_mask)
    check_key_estimator(key_estimator, features, kernel)
    out_dtype = query.dtype
    cdtype = _compute_dtype(out_dtype)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    with torch.autocast(device_type=query.device.type, enabled=False):
        root = math.sqrt(scale)
        q, k = query.to(cdtype), key.to(cdtype)  # (B, H, L, D), features see x = root·q, y = root·k
        v = value.to(cdtype)
        proj = None if projection is None else projection.to(device=query.device, dtype=cdtype)
        fused = backend == "auto" and _use_fused(features, kernel, (query, key, value, projection, initial_state),
                                                 initial_state, return_state, key_estimator)

        oprf_a = feature_a = None  # A as carried in the state / as used by the features
        if features in OPRF_FEATURES and kernel == "softmax":
            if is_causal:
                previous = None if initial_state is None else initial_state.oprf_a.to(cdtype)
                oprf_a = _causal_oprf_parameter(q, k, root, key_padding_mask, previous)
            else:
                oprf_a = _bidirectional_oprf_parameter(q, k, root, key_padding_mask, query_padding_mask)  # (B, H)
            # NaN only where no key is present (every output there is 0): any finite A will do
            feature_a = torch.nan_to_num(oprf_a, nan=0.0)
        if initial_state is not None:
            initial_state = FavorState(*(None if t is None else t.to(cdtype) for t in initial_state))
        if fused:
            spec = make_spec(proj, features, kernel, feature_a, q.shape[0] * q.shape[1], q.shape[-1])
            out, st = fused_attention(q, k, v, spec, is_causal=is_causal, key_padding_mask=key_padding_mask,
                                      chunk_size=chunk_size, initial_state=initial_state,
                                      return_state=return_state, root=root)
            state = None if st is None else FavorState(*st, oprf_a)
            out = out.to(out_dtype)
            return (out, state) if return_state else out
        # the fused kernels scale block by block; the generic path takes scaled copies
        x, y = q * root, k * root  # (B, H, L, D)
        fq = feature_map(x, proj, features, kernel=kernel, oprf_a=feature_a)
        fk = key_feature_map(y, proj, features, kernel=kernel, oprf_a=feature_a, key_estimator=key_estimator)
        k_psi, k_log = fk.psi, fk.log_scale
        if key_padding_mask is not None:
            keep = key_padding_mask.unsqueeze(1)  # (B, 1, Lk)
            if k_log is None:
                k_psi = k_psi * keep.unsqueeze(-1).to(cdtype)
            else:
                k_log = k_log.masked_fill(~keep, float("-inf"))
        if is_causal:
            out, state = causal_linear_attention(
                fq.psi, k_psi, v, k_log, chunk_size=chunk_size, initial_state=initial_state
            )
            state = state._replace(oprf_a=oprf_a)
        else:
            out = linear_attention(fq.psi, k_psi, v, k_log)
            state = None
    out = out.to(out_dtype)
    return (out, state) if return_state else out


def favor_attention_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor | None,
    state: FavorState | None,
    *,
    features: str | None = None,
    kernel: str = "softmax",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_estimator: str = "plain",
) -> tuple[torch.Tensor, FavorState]:
    """One recurrent decoding step: (B, H, 1, D) query/key, (B, H, 1, Dv) value, previous state
    (``None`` at the first token) -> ((B, H, 1, Dv) output, new state).  O(M·Dv) per token,
    independent of how many tokens came before.  ``key_estimator`` as in :func:`favor_attention`
    (it must match the call that made ``state``)."""
    if isinstance(query, torch.Tensor) and query.dim() == 4 and query.shape[2] != 1:
        raise ValueError(f"favor_attention_step takes one token (L=1), got query {tuple(query.shape)}")
    return favor_attention(
        query, key, value, projection, features=features, kernel=kernel, is_causal=True,
        key_padding_mask=key_padding_mask, scale=scale, initial_state=state, return_state=True,
        key_estimator=key_estimator,
    )
