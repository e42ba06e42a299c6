"""Linear-attention kernels on precomputed features (no nn.Module, no feature maps).

Dimension key: B batch, H heads, L (Lq, Lk) sequence, M features, Dv value dim, C chunk size.

Both kernels take features in the factored form φ(k_j) = exp(h_j)·ψ_k[j] (see
:mod:`favor.feature_maps`); query features ψ_q may carry any positive per-query factor, which
cancels in the normalisation.  Keys enter as exp(h_j − c)·ψ_k[j] with a shift c shared by all keys:

* bidirectional: c = max_j h_j over the present keys;
* causal: c_t = max_{j ≤ t} h_j, the running maximum, so no output looks at a future key.  The
  state is kept relative to the running maximum of the keys consumed so far and rescaled by
  exp(c_old − c_new) ≤ 1 when it grows.

Masked keys have h_j = −inf (weight exactly 0), so they reach neither the numerator nor the
denominator.  A row with nothing to attend to (denominator exactly 0) gets output 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FavorState",
    "causal_linear_attention",
    "linear_attention",
]

DEFAULT_CHUNK_SIZE = 64


class FavorState(NamedTuple):
    """Recurrent state of causal FAVOR attention after a prefix of keys.

    kv:        (B, H, M, Dv)  Σ_j exp(h_j − log_scale) ψ_k[j] v_jᵀ
    k_sum:     (B, H, M)      Σ_j exp(h_j − log_scale) ψ_k[j]
    log_scale: (B, H)         running max of h over the keys seen (−inf before any key)
    oprf_a:    (B, H) or None FAVOR++ parameter fixed for the whole sequence
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    log_scale: torch.Tensor
    oprf_a: torch.Tensor | None = None


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def vanishing_denominator(den: torch.Tensor) -> torch.Tensor:
    """Bool mask of denominators treated as "nothing to attend to": |den| < √tiny of the dtype
    (about 1e-19 in float32, 1e-154 in float64).

    Features are normalised so that the best query feature and the heaviest key weigh 1; a
    denominator this small means every query–key feature product underflowed (norms far outside
    where the estimator means anything) or no key is present.  Such rows get output 0 and zero
    gradient, which keeps 1/den and 1/den² finite in the backward pass.
    """
    return den.abs() < math.sqrt(torch.finfo(den.dtype).tiny)


def safe_denominator(den: torch.Tensor) -> torch.Tensor:
    """den with vanishing entries replaced by 1 (their rows are zeroed separately)."""
    return torch.where(vanishing_denominator(den), torch.ones((), dtype=den.dtype, device=den.device), den)


def _normalise(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den[..., None], with 0 where the denominator vanishes (nothing to attend to)."""
    den = den.unsqueeze(-1)
    out = num / safe_denominator(den)
    return out.masked_fill(vanishing_denominator(den), 0.0)


def _key_weights(k_log_scale: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor | None:
    """exp(h_j − shift) with −inf − finite → 0; shift (B, H) broadcast over L."""
    if k_log_scale is None:
        return None
    return torch.exp(k_log_scale - shift.unsqueeze(-1))


def _check_inputs(q_feat, k_feat, value, k_log_scale) -> None:
    """Shapes as documented on the kernels: (B, H, Lq, M), (B, H, Lk, M), (B, H, Lk, Dv), (B, H, Lk)."""
    for name, t in (("q_feat", q_feat), ("k_feat", k_feat), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, H, L, ·) tensor, got {shape}")
    B, H, Lk, M = k_feat.shape
    if q_feat.shape[:2] != (B, H) or q_feat.shape[-1] != M:
        raise ValueError(f"q_feat {tuple(q_feat.shape)} and k_feat {tuple(k_feat.shape)} must agree in B, H and M")
    if value.shape[:3] != (B, H, Lk):
        raise ValueError(f"value must have shape ({B}, {H}, {Lk}, Dv) to match k_feat, got {tuple(value.shape)}")
    if k_log_scale is not None and tuple(k_log_scale.shape) != (B, H, Lk):
        raise ValueError(f"k_log_scale must have shape ({B}, {H}, {Lk}), got {tuple(k_log_scale.shape)}")
    tensors = (("q_feat", q_feat), ("k_feat", k_feat), ("value", value), ("k_log_scale", k_log_scale))
    dtypes = {name: t.dtype for name, t in tensors if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q_feat, k_feat, value and k_log_scale must share a dtype, got {dtypes}")


def linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    value: torch.Tensor,
    k_log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional D⁻¹ Q′(K′ᵀV) in O(L·M·Dv) time and O(M·Dv) extra memory.

    q_feat (B, H, Lq, M), k_feat (B, H, Lk, M), value (B, H, Lk, Dv),
    k_log_scale (B, H, Lk) or None  ->  (B, H, Lq, Dv).
    """
    _check_inputs(q_feat, k_feat, value, k_log_scale)
    if k_log_scale is not None and k_log_scale.shape[-1] > 0:  # no keys: nothing to weigh
        shift = _finite_or_zero(k_log_scale.detach().amax(-1))  # (B, H)
        w = _key_weights(k_log_scale, shift)  # (B, H, Lk)
        k_feat = k_feat * w.unsqueeze(-1)
    kv = k_feat.transpose(-1, -2) @ value  # (B, H, M, Dv)
    k_sum = k_feat.sum(-2)  # (B, H, M)
    num = q_feat @ kv  # (B, H, Lq, Dv)
    den = (q_feat @ k_sum.unsqueeze(-1)).squeeze(-1)  # (B, H, Lq)
    return _normalise(num, den)


def empty_state(
    batch: int, heads: int, m: int, dv: int, *, dtype: torch.dtype, device: torch.device,
    oprf_a: torch.Tensor | None = None,
) -> FavorState:
    """The state before any key."""
    return FavorState(
        torch.zeros(batch, heads, m, dv, dtype=dtype, device=device),
        torch.zeros(batch, heads, m, dtype=dtype, device=device),
        torch.full((batch, heads), float("-inf"), dtype=dtype, device=device),
        oprf_a,
    )


def _check_state(state: FavorState, B: int, H: int, M: int, Dv: int) -> None:
    """ValueError unless state.kv is (B, H, M, Dv), k_sum (B, H, M) and log_scale (B, H)."""
    expected = {"kv": (B, H, M, Dv), "k_sum": (B, H, M), "log_scale": (B, H)}
    for name, shape in expected.items():
        t = getattr(state, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"initial_state.{name} must have shape {shape} (B, H, M, Dv = {B}, {H}, {M}, {Dv}), "
                             f"got {got}")


def causal_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    value: torch.Tensor,
    k_log_scale: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: FavorState | None = None,
) -> tuple[torch.Tensor, FavorState]:
    """Causal linear attention, chunk-wise: out_t = Σ_{j≤t} φ_tᵀφ_j v_j / Σ_{j≤t} φ_tᵀφ_j.

    q_feat, k_feat (B, H, L, M), value (B, H, L, Dv), k_log_scale (B, H, L) or None.
    Inside a chunk the masked C×C score matrix is used (matmuls); between chunks a running
    state (:class:`FavorState`) carries Σ φ(k)vᵀ and Σ φ(k).  Memory is O(L·(M + Dv) + C² + M·Dv);
    no L×M×Dv tensor is formed.  Returns (out (B, H, L, Dv), final state).
    """
    _check_inputs(q_feat, k_feat, value, k_log_scale)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, H, L, M = q_feat.shape
    Dv = value.shape[-1]
    if q_feat.shape[2] != k_feat.shape[2]:
        raise ValueError(f"causal attention needs equal query and key lengths, got {L} and {k_feat.shape[2]}")
    if initial_state is not None:
        if not isinstance(initial_state, FavorState):
            raise TypeError(f"initial_state must be a FavorState or None, got {type(initial_state).__name__}")
        _check_state(initial_state, B, H, M, Dv)
    state = initial_state or empty_state(B, H, M, Dv, dtype=q_feat.dtype, device=q_feat.device)
    kv, k_sum, log_scale = state.kv, state.k_sum, state.log_scale
    outs = []
    # torch.split, not slicing in the loop: the backward of L/C slices would write each chunk's
    # gradient into its own zero-filled (B, H, L, ·) tensor, O(L²/C) work; split's is one concat
    # (an empty L still splits into one empty piece: no chunks then)
    pieces = [torch.split(t, chunk_size, dim=2) if L else () for t in (q_feat, k_feat, value)]
    h_pieces = None if k_log_scale is None else torch.split(k_log_scale, chunk_size, dim=2)
    for index, (qc, kc, vc) in enumerate(zip(*pieces)):  # (B, H, C, M), (B, H, C, M), (B, H, C, Dv)
        C = qc.shape[2]
        future = torch.ones(C, C, dtype=torch.bool, device=q_feat.device).triu_(1)  # j > t
        scores = qc @ kc.transpose(-1, -2)  # (B, H, C, C)
        if k_log_scale is None:
            scores = scores.masked_fill(future, 0.0)
            num = qc @ kv + scores @ vc
            den = (qc @ k_sum.unsqueeze(-1)).squeeze(-1) + scores.sum(-1)
            kv = kv + kc.transpose(-1, -2) @ vc
            k_sum = k_sum + kc.sum(-2)
        else:
            hc = h_pieces[index]  # (B, H, C)
            # running max of h up to and including t: shift for query t (detached: a pure shift)
            run = torch.maximum(log_scale.unsqueeze(-1), torch.cummax(hc.detach(), dim=-1).values)
            ref = _finite_or_zero(run)  # (B, H, C)
            diff = (hc.unsqueeze(-2) - ref.unsqueeze(-1)).masked_fill(future, float("-inf"))
            scores = scores * torch.exp(diff)  # (B, H, C, C): weight exp(h_j − c_t) ≤ 1
            carry = torch.exp(log_scale.unsqueeze(-1) - ref)  # (B, H, C), ≤ 1, 0 before any key
            num = carry.unsqueeze(-1) * (qc @ kv) + scores @ vc
            den = carry * (qc @ k_sum.unsqueeze(-1)).squeeze(-1) + scores.sum(-1)
            new_log_scale = run[:, :, -1]
            new_ref = _finite_or_zero(new_log_scale)  # (B, H)
            decay = torch.exp(log_scale - new_ref)  # (B, H)
            kw = kc * torch.exp(hc - new_ref.unsqueeze(-1)).unsqueeze(-1)  # (B, H, C, M)
            kv = decay[..., None, None] * kv + kw.transpose(-1, -2) @ vc
            k_sum = decay.unsqueeze(-1) * k_sum + kw.sum(-2)
            log_scale = new_log_scale
        outs.append(_normalise(num, den))
    out = torch.cat(outs, dim=2) if outs else value.new_zeros(B, H, 0, Dv)
    return out, FavorState(kv, k_sum, log_scale, state.oprf_a)
