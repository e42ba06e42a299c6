"""Fused FAVOR kernels: feature map + linear attention in one pass, with recomputation in backward.

Dimension key: G = B·H flattened batch, Lq/Lk/L sequence, d head dim, M features, Dv value dim,
V1 = Dv + 1 (values with a column of ones appended, so that one matmul gives numerator and
denominator), C chunk size, nc chunks in a block, n rows in a block.

Why a separate kernel.  :func:`favor.linear.linear_attention` and
:func:`favor.linear.causal_linear_attention` take precomputed (L, M) features, and autograd then
keeps every (L, M) intermediate for backward: ψ_q, ψ_k, their products with the key weights, the
logits.  Here the features are computed block by block (n rows at a time) and never stored: the
:class:`torch.autograd.Function` s below save only the inputs, the output, the denominators,
per-row log scales and O(M·Dv) states, and recompute the features of each block in backward.
This bounds the extra memory by O(L·(d + Dv) + n·M) and keeps each elementwise pass over a block
inside the cache.  Every block's temporaries live in :class:`_Scratch` buffers (on CPU, kept
between calls in a bounded per-thread workspace, :data:`WORKSPACE_BYTES`), and the queries and
keys arrive unscaled: each block is multiplied by root = √scale while
it is copied into its buffer (input gradients use root·W), so no scaled copy of q or k exists.
The maths is the same as :mod:`favor.linear` (same stabilisers, same
:class:`favor.linear.FavorState` convention); ``tests/test_autograd.py`` checks outputs and all
gradients against :mod:`favor.reference` in float64 and runs ``gradcheck``.

Feature kinds handled here (everything else goes through the generic path in
:func:`favor.attention.favor_attention`):

* exponential (``positive``, ``hyperbolic``, ``oprf``, ``hyperbolic_oprf``): logits u = x·Wᵀ + b − ‖x‖²/2 + const with
  W (M, d) shared or (G, M, d) per head, b (G, M) or None, const (G,) a per-head constant.
  ψ = exp(u − rowmax u); the per-row terms ‖x‖²/2 and const only matter for keys (for queries any
  per-row factor cancels in the normalisation, so they are never computed there).
* ``relu``: ψ = (relu(x·Wᵀ) + ε)/√m;  ``elu``: ψ = elu(x·Wᵀ) + 1 (W = identity when None).

Stabilisers (as in :mod:`favor.linear`).  Bidirectional: keys enter as exp(u_j − c), c the max
over present keys, kept online over key blocks.  Causal: key j has log scale h_j = rowmax u_j;
query t uses the running max R_t = max_{j ≤ t} h_j (no look-ahead, so perturbing a future token
leaves past outputs bit-for-bit unchanged); inside a chunk the C×C weights exp(h_j − R_t) are
explicit, between chunks the running state is rescaled by exp(r_old − r_new) ≤ 1.  For relu/elu,
h_j = 0 (−inf for masked keys).  Masked keys get h_j = −inf: weight exactly 0.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .feature_maps import RELU_EPSILON
from .linear import _finite_or_zero, safe_denominator, vanishing_denominator

__all__ = ["FUSED_KINDS", "WORKSPACE_BYTES", "FeatureSpec", "fused_attention", "make_spec", "release_workspace"]

#: (features, kernel) pairs with a fused kernel.
FUSED_KINDS = (("positive", "softmax"), ("hyperbolic", "softmax"), ("oprf", "softmax"),
               ("hyperbolic_oprf", "softmax"), (None, "relu"), (None, "elu"))

#: rows per block and head (a block holds G·BLOCK_ROWS rows of every (·, M) temporary);
#: chosen by measurement, see docs/benchmarks.md
BLOCK_ROWS = 512

#: bytes of CPU scratch buffers each thread keeps between calls (per dtype); 0 disables keeping.
#: Freed multi-MB blocks go back to the OS, and faulting them in again on every call cost 20–30 %
#: of a causal call at L ≤ 2048 (docs/benchmarks.md, "Workspace").  CUDA's caching allocator
#: already keeps memory, so other devices allocate per call.
WORKSPACE_BYTES = 64 * 2**20


class FeatureSpec(NamedTuple):
    """How to compute ψ from x (see the module docstring).

    kind:   "exp" | "relu" | "elu"
    weight: (M, d) shared, (G, M, d) per head, or None (identity, relu/elu only)
    bias:   (G, M) or None
    const:  (G,) tensor or None (exp only: added to the key log scales, matters for states only)
    m:      number of projections (for relu's 1/√m)
    """

    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    const: torch.Tensor | None
    m: int


def make_spec(
    projection: torch.Tensor | None, features: str | None, kernel: str, oprf_a: torch.Tensor | None,
    groups: int, dim: int,
) -> FeatureSpec:
    """FeatureSpec for one of :data:`FUSED_KINDS`; projection (m, d) already in the compute dtype,
    oprf_a (B, H) for ``oprf``.  Autograd flows from the spec's tensors back to ``projection``."""
    if kernel != "softmax":
        m = dim if projection is None else projection.shape[0]
        return FeatureSpec(kernel, projection, None, None, m)
    m = projection.shape[0]
    dtype, device = projection.dtype, projection.device
    if features == "positive":
        const = torch.full((groups,), -0.5 * math.log(m), dtype=dtype, device=device)
        return FeatureSpec("exp", projection, None, const, m)
    if features == "hyperbolic":
        const = torch.full((groups,), -0.5 * math.log(2 * m), dtype=dtype, device=device)
        return FeatureSpec("exp", torch.cat((projection, -projection), 0), None, const, m)
    if features in ("oprf", "hyperbolic_oprf"):
        a = oprf_a.to(dtype).reshape(groups)  # (G,)
        one_minus_4a = 1 - 4 * a
        w, sq = projection, projection.pow(2).sum(-1)  # (m, d), (m,)
        if features == "hyperbolic_oprf":  # antithetic pairs ±ω_i
            w, sq = torch.cat((w, -w), 0), sq.repeat(2)
        weight = torch.sqrt(one_minus_4a)[:, None, None] * w  # (G, M, d)
        bias = a[:, None] * sq  # (G, M)
        const = (dim / 4) * torch.log(one_minus_4a) - 0.5 * math.log(w.shape[0])
        return FeatureSpec("exp", weight, bias, const, m)
    raise ValueError(f"no fused kernel for features={features!r}, kernel={kernel!r}")


# ----------------------------------------------------------------------------------------------
# feature helpers (all run without autograd, inside the Functions)


_WORKSPACE = threading.local()  # .buffers: {(device, dtype): {name: flat tensor}}; .busy: bool


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def release_workspace() -> None:
    """Free the scratch buffers that the fused kernels keep between calls in this thread."""
    _WORKSPACE.__dict__.pop("buffers", None)


class _Scratch:
    """Flat scratch tensors reused by every block of one call, each viewed to the block's shape.

    Allocating the multi-MB (G, n, M) temporaries afresh for every block costs page faults and
    cache misses (glibc serves large blocks from fresh mmaps); with one buffer per name the GEMM
    that computes the logits runs at its standalone rate instead of about half of it
    (docs/benchmarks.md, "Scratch buffers").  A view is only valid until the next request of the
    same name: results that outlive a block are never scratch.  With ``keep`` the buffers come
    from (and stay in) this thread's workspace while its total stays within
    :data:`WORKSPACE_BYTES`; larger ones are allocated for this call only.
    """

    def __init__(self, like: torch.Tensor, keep: dict[str, torch.Tensor] | None = None):
        self.like = like
        self.keep = keep
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._allocate(name, numel)
            self.store[name] = buf
        return buf[:numel].view(shape)

    def _allocate(self, name: str, numel: int) -> torch.Tensor:
        keep = self.keep
        if keep is None:
            return self.like.new_empty(numel)
        buf = keep.get(name)
        if buf is not None and buf.numel() >= numel:
            return buf
        if _nbytes(b for n, b in keep.items() if n != name) + numel * self.like.element_size() > WORKSPACE_BYTES:
            return self.like.new_empty(numel)
        with torch.inference_mode(False):  # a normal tensor, writable inside and outside inference mode
            buf = torch.empty(numel, dtype=self.like.dtype, device=self.like.device)
        keep[name] = buf
        return buf


@contextlib.contextmanager
def _scratch(like: torch.Tensor) -> Iterator[_Scratch]:
    """A :class:`_Scratch` for one call: on CPU it borrows this thread's workspace unless a call in
    this thread already holds it, torch.compile is tracing or a dispatch mode (fake tensors, FLOP
    counters) is active, or the input is a tensor subclass: traced and fake tensors must never be
    kept.  A workspace above a lowered :data:`WORKSPACE_BYTES` is dropped first."""
    if (like.device.type != "cpu" or type(like) is not torch.Tensor or getattr(_WORKSPACE, "busy", False)
            or torch.compiler.is_compiling() or is_in_torch_dispatch_mode()):
        yield _Scratch(like)
        return
    kept = _WORKSPACE.__dict__.setdefault("buffers", {}).setdefault((like.device, like.dtype), {})
    if _nbytes(kept.values()) > max(WORKSPACE_BYTES, 0):
        kept.clear()
    if WORKSPACE_BYTES <= 0:
        yield _Scratch(like)
        return
    _WORKSPACE.busy = True
    try:
        yield _Scratch(like, kept)
    finally:
        _WORKSPACE.busy = False


def _rows_of(t: torch.Tensor, s: int, e: int, scratch: _Scratch, name: str, factor: float = 1.0) -> torch.Tensor:
    """factor·t[:, s:e] (G, n, k) in a contiguous scratch tensor (the scaling rides on the copy)."""
    buf = scratch(name, t.shape[0], e - s, t.shape[-1])
    return buf.copy_(t[:, s:e]) if factor == 1.0 else torch.mul(t[:, s:e], factor, out=buf)


def _values_with_ones(v: torch.Tensor, s: int, e: int, scratch: _Scratch) -> torch.Tensor:
    """v[:, s:e] (G, n, Dv) -> scratch (G, n, Dv + 1) with a last column of ones."""
    G, _, Dv = v.shape
    v1 = scratch("v1", G, e - s, Dv + 1)
    v1[..., :Dv].copy_(v[:, s:e])
    v1[..., Dv].fill_(1.0)
    return v1


def _logits(x: torch.Tensor, spec: FeatureSpec, out: torch.Tensor) -> torch.Tensor:
    """x (G, n, d) -> x·Wᵀ + b (G, n, M), written to ``out`` (a contiguous scratch tensor, which
    callers then modify in place)."""
    w = spec.weight
    if w is None:
        u = out.copy_(x)
    elif w.dim() == 2:  # one (G·n, d) @ (d, M) GEMM, not a batched one with an expanded W
        G, n, d = x.shape
        u = torch.mm(x.reshape(G * n, d), w.T, out=out.view(G * n, w.shape[0])).view(G, n, w.shape[0])
    else:
        u = torch.bmm(x, w.transpose(1, 2), out=out)
    if spec.bias is not None:
        u += spec.bias.unsqueeze(1)
    return u


def _activate(u: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """relu/elu features from pre-activations (G, n, M) (in place where possible)."""
    if spec.kind == "relu":
        return torch.relu_(u).add_(RELU_EPSILON).mul_(1.0 / math.sqrt(spec.m))
    return torch.nn.functional.elu_(u).add_(1.0)


def _activation_grad(g: torch.Tensor, u: torch.Tensor, psi: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """∂L/∂u from ∂L/∂ψ (in place on g).  exp: ψ; relu: [u > 0]/√m; elu: min(ψ, 1)."""
    if spec.kind == "exp":
        return g.mul_(psi)
    if spec.kind == "relu":
        return g.mul_((u > 0).to(g.dtype)).mul_(1.0 / math.sqrt(spec.m))
    return g.mul_(psi.clamp(max=1.0))


def _query_features(x: torch.Tensor, spec: FeatureSpec, shift: torch.Tensor | None, out: torch.Tensor):
    """ψ_q (G, n, M) in ``out`` and, for exp, the row max used as shift (G, n) (or the given
    shift).  Returns (psi, pre-activation or None, shift)."""
    u = _logits(x, spec, out)
    if spec.kind != "exp":
        pre = u.clone() if spec.kind == "relu" else None  # relu's derivative needs the sign of u
        return _activate(u, spec), pre, None
    if shift is None:
        shift = u.amax(-1)  # (G, n)
    return u.sub_(shift.unsqueeze(-1)).exp_(), None, shift


def _key_log_scales(u_rowmax: torch.Tensor, y: torch.Tensor, spec: FeatureSpec,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """h_j = rowmax u_j − ‖y_j‖²/2 + const (exp) or 0 (relu/elu); −inf for masked keys. (G, n)"""
    if spec.kind == "exp":
        h = u_rowmax - 0.5 * y.pow(2).sum(-1) + spec.const.unsqueeze(-1)
    else:
        h = torch.zeros(y.shape[:2], dtype=y.dtype, device=y.device)
    if mask is not None:
        h = h.masked_fill(~mask, float("-inf"))
    return h




def _upstream(gout: torch.Tensor, out: torch.Tensor, den: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient wrt the unnormalised [numerator, denominator] (G, n, V1) from ∂L/∂out (G, n, Dv),
    written to ``g``."""
    Dv = gout.shape[-1]
    g[..., :Dv].copy_(gout)
    g[..., Dv] = -(gout * out).sum(-1)
    g.div_(safe_denominator(den).unsqueeze(-1))
    return g.masked_fill_(vanishing_denominator(den).unsqueeze(-1), 0.0)


def _weight_grads(spec: FeatureSpec, needs_w: bool, needs_b: bool, gu: torch.Tensor, x: torch.Tensor,
                  gw: torch.Tensor | None, gb: torch.Tensor | None):
    """Accumulate ∂L/∂W and ∂L/∂b from ∂L/∂u (G, n, M) of rows x (G, n, d)."""
    if needs_w:
        if spec.weight.dim() == 2:
            part = gu.reshape(-1, gu.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (M, d)
        else:
            part = torch.bmm(gu.transpose(1, 2), x)  # (G, M, d)
        gw = part if gw is None else gw.add_(part)
    if needs_b:
        part = gu.sum(1)  # (G, M)
        gb = part if gb is None else gb.add_(part)
    return gw, gb


def _input_grad(gu: torch.Tensor, w_in: torch.Tensor | None, root: float, scratch: _Scratch) -> torch.Tensor:
    """∂L/∂q (G, n, d) from ∂L/∂u (G, n, M) through u = (root·q)·Wᵀ, with w_in = root·W (None:
    identity); a scratch tensor."""
    G, n, M = gu.shape
    if w_in is None:
        return torch.mul(gu, root, out=scratch("gx", G, n, M))
    out = scratch("gx", G, n, w_in.shape[-1])
    if w_in.dim() == 2:
        return torch.mm(gu.reshape(G * n, M), w_in, out=out.view(G * n, -1)).view(G, n, -1)
    return torch.bmm(gu, w_in, out=out)


def _key_grad(gu: torch.Tensor, y: torch.Tensor, spec: FeatureSpec, w_in: torch.Tensor | None,
              w_ones: torch.Tensor | None, root: float, scratch: _Scratch) -> torch.Tensor:
    """∂L/∂k from ∂L/∂u (G, n, M) for keys y = root·k, whose exp features also carry −‖y‖²/2:
    root·(gu·W − y·Σ_i gu_i).  w_ones = [root·W, 1]: the row sums come out of the same GEMM."""
    if spec.kind != "exp":
        return _input_grad(gu, w_in, root, scratch)
    G, n, M = gu.shape
    d1 = w_ones.shape[-1]
    out = scratch("gx", G, n, d1)
    if w_ones.dim() == 2:
        g = torch.mm(gu.reshape(G * n, M), w_ones, out=out.view(G * n, d1)).view(G, n, d1)
    else:
        g = torch.bmm(gu, w_ones, out=out)  # (G, n, d + 1)
    return g[..., :-1].addcmul_(y, g[..., -1:], value=-root)


def _input_weights(weight: torch.Tensor | None, root: float):
    """(root·W, [root·W, 1]) for the input gradients (None, None without a weight)."""
    if weight is None:
        return None, None
    w_in = weight * root
    return w_in, torch.nn.functional.pad(w_in, (0, 1), value=1.0)


def _no_double_backward() -> None:
    """The backward passes below are not themselves differentiable: with create_graph=True (grad
    mode on inside backward) fail loudly instead of returning gradients that silently lack their
    own graph (zero Hessians)."""
    if torch.is_grad_enabled():
        raise RuntimeError("favor's fused kernels have no double backward (create_graph=True); pass "
                           "backend='generic' to favor_attention for gradients of gradients")


def _blocks(length: int, rows: int):
    for start in range(0, length, rows):
        yield start, min(start + rows, length)


# ----------------------------------------------------------------------------------------------
# bidirectional


def _bidir_keys(y, v, spec, mask, rows, root, scratch):
    """Σ_j φ_j v1_jᵀ (G, M, V1) relative to the key shift c (G,) (exp; 0 for relu/elu), features
    of root·y."""
    G, Lk, d = y.shape
    M = _num_features(spec, d)
    kv = y.new_zeros(G, M, v.shape[-1] + 1)
    c = torch.full((G,), float("-inf"), dtype=y.dtype, device=y.device)
    for s, e in _blocks(Lk, rows):
        yb = _rows_of(y, s, e, scratch, "x", root)
        vb = _values_with_ones(v, s, e, scratch)
        mb = None if mask is None else mask[:, s:e]
        u = _logits(yb, spec, scratch("u", G, e - s, M))  # (G, n, M)
        if spec.kind == "exp":
            sq = 0.5 * yb.pow(2).sum(-1)  # (G, n)
            h = u.amax(-1) - sq
            if mb is not None:
                h = h.masked_fill(~mb, float("-inf"))
            c_new = torch.maximum(c, h.amax(-1))
            ref = _finite_or_zero(c_new)
            shift = (sq + ref.unsqueeze(-1))
            if mb is not None:
                shift = shift.masked_fill(~mb, float("inf"))
            phi = u.sub_(shift.unsqueeze(-1)).exp_()  # (G, n, M), ≤ 1
            kv.mul_(torch.exp(c - ref)[:, None, None])  # c = −inf: kv is 0 anyway
            c = c_new
        else:
            phi = _activate(u, spec)
            if mb is not None:
                vb.mul_(mb.unsqueeze(-1).to(vb.dtype))
        kv.baddbmm_(phi.transpose(1, 2), vb)  # += (G, M, V1)
    return kv, c


def _bidir_forward(x, y, v, spec, mask, rows, root):
    """Features of root·x and root·y (queries and keys as given, scaled block by block)."""
    G, Lq, d = x.shape
    Dv = v.shape[-1]
    with _scratch(x) as scratch:
        kv, c = _bidir_keys(y, v, spec, mask, rows, root, scratch)
        M = kv.shape[1]
        out = torch.empty(G, Lq, Dv, dtype=x.dtype, device=x.device)
        den = torch.empty(G, Lq, dtype=x.dtype, device=x.device)
        hq = torch.empty(G, Lq, dtype=x.dtype, device=x.device) if spec.kind == "exp" else None
        for s, e in _blocks(Lq, rows):
            xb = _rows_of(x, s, e, scratch, "x", root)
            psi, _, shift = _query_features(xb, spec, None, scratch("u", G, e - s, M))
            o = torch.bmm(psi, kv, out=scratch("o", G, e - s, Dv + 1))  # (G, n, V1)
            den[:, s:e] = o[..., -1]
            out[:, s:e] = o[..., :Dv] / safe_denominator(o[..., -1]).unsqueeze(-1)
            out[:, s:e].masked_fill_(vanishing_denominator(o[..., -1]).unsqueeze(-1), 0.0)
            if hq is not None:
                hq[:, s:e] = shift
        return out, den, hq, kv, c


class _BidirectionalFavor(torch.autograd.Function):
    """out = D⁻¹ ψ_q (Σ_j φ_j v_jᵀ) with features of root·x, root·y (x, y (G, L, d)); saves no
    (L, M) tensor."""

    @staticmethod
    def forward(ctx, x, y, v, weight, bias, const, mask, kind, m, rows, root):
        spec = FeatureSpec(kind, weight, bias, const, m)
        out, den, hq, kv, c = _bidir_forward(x, y, v, spec, mask, rows, root)
        ctx.save_for_backward(x, y, v, weight, bias, const, mask, out, den, hq, kv, c)
        ctx.kind, ctx.m, ctx.rows, ctx.root = kind, m, rows, root
        return out

    @staticmethod
    def backward(ctx, gout):
        _no_double_backward()
        x, y, v, weight, bias, const, mask, out, den, hq, kv, c = ctx.saved_tensors
        spec = FeatureSpec(ctx.kind, weight, bias, const, ctx.m)
        rows, root = ctx.rows, ctx.root
        w_in, w_ones = _input_weights(weight, root)
        needs_x, needs_y, needs_v, needs_w, needs_b = ctx.needs_input_grad[:5]
        G, _, d = x.shape
        Dv = v.shape[-1]
        M = kv.shape[1]
        with _scratch(x) as scratch:
            gw = gb = None
            gx = torch.empty_like(x) if needs_x else None
            gkv = torch.zeros_like(kv)  # (G, M, V1)
            for s, e in _blocks(x.shape[1], rows):
                n = e - s
                xb = _rows_of(x, s, e, scratch, "x", root)
                gb1 = _upstream(gout[:, s:e], out[:, s:e], den[:, s:e], scratch("g1", G, n, Dv + 1))  # (G, n, V1)
                psi, pre, _ = _query_features(xb, spec, None if hq is None else hq[:, s:e], scratch("u", G, n, M))
                gkv.baddbmm_(psi.transpose(1, 2), gb1)
                if needs_x or needs_w or needs_b:
                    gu = torch.bmm(gb1, kv.transpose(1, 2), out=scratch("gu", G, n, M))
                    gu = _activation_grad(gu, pre, psi, spec)  # (G, n, M)
                    if needs_x:
                        gx[:, s:e] = _input_grad(gu, w_in, root, scratch)
                    gw, gb = _weight_grads(spec, needs_w, needs_b, gu, xb, gw, gb)
            gy = torch.empty_like(y) if needs_y else None
            gv = torch.empty_like(v) if needs_v else None
            ref = _finite_or_zero(c)
            for s, e in _blocks(y.shape[1], rows):
                n = e - s
                yb = _rows_of(y, s, e, scratch, "x", root)
                vb = _values_with_ones(v, s, e, scratch)
                mb = None if mask is None else mask[:, s:e]
                u = _logits(yb, spec, scratch("u", G, n, M))
                pre = None
                if spec.kind == "exp":
                    shift = 0.5 * yb.pow(2).sum(-1) + ref.unsqueeze(-1)
                    if mb is not None:
                        shift = shift.masked_fill(~mb, float("inf"))
                    phi = u.sub_(shift.unsqueeze(-1)).exp_()
                else:
                    pre = u.clone() if spec.kind == "relu" else None
                    phi = _activate(u, spec)
                    if mb is not None:
                        vb.mul_(mb.unsqueeze(-1).to(vb.dtype))
                if needs_v:
                    gvb = torch.bmm(phi, gkv[..., :Dv], out=scratch("o", G, n, Dv))  # (G, n, Dv)
                    if mb is not None and spec.kind != "exp":
                        gvb.mul_(mb.unsqueeze(-1).to(gvb.dtype))
                    gv[:, s:e] = gvb
                if needs_y or needs_w or needs_b:
                    gu = torch.bmm(vb, gkv.transpose(1, 2), out=scratch("gu", G, n, M))
                    gu = _activation_grad(gu, pre, phi, spec)
                    if needs_y:
                        gy[:, s:e] = _key_grad(gu, yb, spec, w_in, w_ones, root, scratch)
                    gw, gb = _weight_grads(spec, needs_w, needs_b, gu, yb, gw, gb)
            return gx, gy, gv, gw, gb, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# causal


class _CausalBlock(NamedTuple):
    """Recomputable intermediates of one causal block of nc chunks of C rows (n = nc·C)."""

    psi_q: torch.Tensor  # (G, nc, C, M)
    psi_k: torch.Tensor  # (G, nc, C, M)
    pre_q: torch.Tensor | None  # relu/elu pre-activations (G, n, M)
    pre_k: torch.Tensor | None
    E: torch.Tensor | None  # (G, nc, C, C)  exp(h_j − R_t), 0 for j > t
    w: torch.Tensor  # (G, nc, C)     exp(h_j − r_end[chunk])
    carry: torch.Tensor  # (G, nc, C)  exp(r_before[chunk] − R_t)
    decay: torch.Tensor  # (G, nc)  exp(r_before[n] − r_end[n]) ≤ 1 (0 while no key was present)
    r_last: torch.Tensor  # (G,) running max after the block


def _causal_block(xb, yb, spec, mb, C, r_prev, scratch, with_intra=True) -> _CausalBlock:
    """Features (in scratch tensors) and stabilisers of one block; E is None without
    ``with_intra`` (backward reuses the forward's)."""
    G, n, d = xb.shape
    nc = n // C
    device = xb.device
    M = _num_features(spec, d)
    psi_q, pre_q, _ = _query_features(xb, spec, None, scratch("uq", G, n, M))
    uk = _logits(yb, spec, scratch("uk", G, n, M))
    if spec.kind == "exp":
        mk = uk.amax(-1)  # (G, n)
        psi_k, pre_k = uk.sub_(mk.unsqueeze(-1)).exp_(), None
    else:
        mk = None
        pre_k = uk.clone() if spec.kind == "relu" else None
        psi_k = _activate(uk, spec)
    h = _key_log_scales(mk, yb, spec, mb)  # (G, n)
    run = torch.maximum(torch.cummax(h, dim=-1).values, r_prev.unsqueeze(-1))  # (G, n) R_t
    ref = _finite_or_zero(run)
    h4 = h.view(G, nc, 1, C)
    ref4 = ref.view(G, nc, C, 1)
    E = None
    if with_intra:
        future = torch.ones(C, C, dtype=torch.bool, device=device).triu_(1)
        E = (h4 - ref4).masked_fill_(future, float("-inf")).exp_()  # (G, nc, C, C)
    r_end = run.view(G, nc, C)[..., -1]  # (G, nc)
    ref_end = _finite_or_zero(r_end)
    w = torch.exp(h.view(G, nc, C) - ref_end.unsqueeze(-1))  # (G, nc, C)
    r_before = torch.cat((r_prev.unsqueeze(-1), r_end), -1)  # (G, nc + 1)
    carry = torch.exp(r_before[:, :nc].unsqueeze(-1) - ref.view(G, nc, C))  # (G, nc, C)
    # state relative to finite(r_before[n]) -> relative to finite(r_end[n]); r_before = −inf: the
    # state is 0 and the factor is 0 too (no inf·0)
    decay = torch.exp(r_before[:, :nc] - ref_end)  # (G, nc), ≤ 1
    M = psi_q.shape[-1]
    return _CausalBlock(psi_q.view(G, nc, C, M), psi_k.view(G, nc, C, M), pre_q, pre_k,
                        E, w, carry, decay, run[:, -1])


def _block_plan(L: int, C: int, rows: int):
    """(start, stop, chunk) triples covering 0..L: blocks of whole chunks, then the remainder."""
    C = min(C, L) if L > 0 else C
    per = max(1, rows // C) * C
    full = (L // C) * C
    plan = [(s, min(s + per, full), C) for s in range(0, full, per)]
    if full < L:
        plan.append((full, L, L - full))
    return plan


def _causal_forward(x, y, v, spec, mask, C, rows, kv0, r0, root, keep=False):
    """Returns out (G, L, Dv), den (G, L), states before each block (list of (kv1, r)), the final
    state, and with ``keep`` the masked intra-chunk weights of every block (list of (A, E), each
    (G, nc, C, C): L·C values per head, which backward would otherwise recompute)."""
    G, L, _ = x.shape
    Dv = v.shape[-1]
    M = kv0.shape[1]
    with _scratch(x) as scratch:
        out = torch.empty(G, L, Dv, dtype=x.dtype, device=x.device)
        den = torch.empty(G, L, dtype=x.dtype, device=x.device)
        S, r = kv0, r0  # (G, M, V1) relative to finite(r); (G,)
        saved, intra = [], []
        for s, e, c in _block_plan(L, C, rows):
            saved.append((S, r))
            mb = None if mask is None else mask[:, s:e]
            xb, yb = _rows_of(x, s, e, scratch, "x", root), _rows_of(y, s, e, scratch, "y", root)
            blk = _causal_block(xb, yb, spec, mb, c, r, scratch)
            nc = (e - s) // c
            v4 = _values_with_ones(v, s, e, scratch).view(G, nc, c, Dv + 1)
            A = _bmm4(blk.psi_q, blk.psi_k.transpose(-1, -2),
                      None if keep else scratch("A", G, nc, c, c)).mul_(blk.E)  # (G, nc, C, C)
            if keep:
                intra.append((A, blk.E))
            o = _bmm4(A, v4, scratch("o", G, nc, c, Dv + 1))  # (G, nc, C, V1)
            wv = torch.mul(v4, blk.w.unsqueeze(-1), out=scratch("wv", G, nc, c, Dv + 1))
            kvc = _bmm4(blk.psi_k.transpose(-1, -2), wv, scratch("kvc", G, nc, M, Dv + 1))  # (G, nc, M, V1)
            # (G, nc, M, V1), (G, M, V1)
            S_before, S = _prefix_states(S, kvc, blk.decay, scratch("S", G, nc, M, Dv + 1))
            o.addcmul_(blk.carry.unsqueeze(-1), _bmm4(blk.psi_q, S_before, scratch("oS", G, nc, c, Dv + 1)))
            o = o.view(G, e - s, Dv + 1)
            den[:, s:e] = o[..., -1]
            out[:, s:e] = o[..., :Dv] / safe_denominator(o[..., -1]).unsqueeze(-1)
            out[:, s:e].masked_fill_(vanishing_denominator(o[..., -1]).unsqueeze(-1), 0.0)
            r = blk.r_last
        return out, den, saved, (S, r), intra


def _bmm4(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(G, nc, p, q) @ (G, nc, q, r) as one bmm over G·nc (transposed views are passed to BLAS
    as such, not copied), into ``out`` (contiguous (G, nc, p, r)) when given."""
    G, nc, p, q = a.shape
    r = b.shape[-1]
    res = torch.bmm(a.reshape(G * nc, p, q), b.reshape(G * nc, q, r),
                    out=None if out is None else out.view(G * nc, p, r))
    return res.view(G, nc, p, r)


def _prefix_states(S0: torch.Tensor, kvc: torch.Tensor, decay: torch.Tensor, S_before: torch.Tensor):
    """States before each chunk, and after the last: S_0 = S0, S_{n+1} = decay_n·S_n + kvc_n.

    S0 (G, M, V1), kvc (G, nc, M, V1) chunk sums relative to finite(r_end[n]), decay (G, nc)
    -> S_before (G, nc, M, V1), filled in, with S_n relative to finite(r_before[n]), and S_nc
    (G, M, V1)."""
    G, nc = decay.shape
    S_before[:, 0] = S0
    for n in range(nc - 1):  # (no out= into the strided slice: torch.compile cannot trace that)
        S_before[:, n + 1] = torch.addcmul(kvc[:, n], S_before[:, n], decay[:, n, None, None])
    return S_before, torch.addcmul(kvc[:, nc - 1], S_before[:, nc - 1], decay[:, nc - 1, None, None])


def _suffix_states(P: torch.Tensor, after: torch.Tensor, decay: torch.Tensor, Gst: torch.Tensor):
    """Reverse scan of the backward pass.

    P (G, nc, M, V1): Σ over the queries t of chunk n of carry_t·ψ_q[t]·g_tᵀ (relative to
    finite(r_before[n])); after (G, M, V1): the same sum over all later blocks, relative to
    finite(r_end[nc − 1]); decay (G, nc) as in the forward scan.  Fills and returns Gst
    (G, nc, M, V1), the sum over all queries after chunk n relative to finite(r_end[n]), and the
    sum over all queries of this block and later ones relative to finite(r_before[0]) (the
    previous block's ``after``).
    """
    G, nc = decay.shape
    Gst[:, nc - 1] = after  # rel. to r_end[nc - 1]
    for n in range(nc - 1, 0, -1):  # rel. to r_before[n] = r_end[n - 1]
        Gst[:, n - 1] = torch.addcmul(P[:, n], Gst[:, n], decay[:, n, None, None])
    return Gst, torch.addcmul(P[:, 0], Gst[:, 0], decay[:, 0, None, None])


class _CausalFavor(torch.autograd.Function):
    """Causal fused FAVOR from an empty state; saves states at block starts, not features."""

    @staticmethod
    def forward(ctx, x, y, v, weight, bias, const, mask, kind, m, chunk, rows, root):
        spec = FeatureSpec(kind, weight, bias, const, m)
        G, M = x.shape[0], _num_features(spec, x.shape[-1])
        kv0 = x.new_zeros(G, M, v.shape[-1] + 1)
        r0 = torch.full((G,), float("-inf") if kind == "exp" else 0.0, dtype=x.dtype, device=x.device)
        out, den, saved, _, intra = _causal_forward(x, y, v, spec, mask, chunk, rows, kv0, r0, root, keep=True)
        states = torch.stack([s for s, _ in saved]) if saved else kv0[:0]  # (nblocks, G, M, V1)
        logs = torch.stack([r for _, r in saved]) if saved else r0[:0]  # (nblocks, G)
        ctx.save_for_backward(x, y, v, weight, bias, const, mask, out, den, states, logs)
        ctx.intra = intra  # internal intermediates, never exposed (no in-place check needed)
        ctx.kind, ctx.m, ctx.chunk, ctx.rows, ctx.root = kind, m, chunk, rows, root
        return out

    @staticmethod
    def backward(ctx, gout):
        _no_double_backward()
        x, y, v, weight, bias, const, mask, out, den, states, logs = ctx.saved_tensors
        spec = FeatureSpec(ctx.kind, weight, bias, const, ctx.m)
        needs_x, needs_y, needs_v, needs_w, needs_b = ctx.needs_input_grad[:5]
        G, L, d = x.shape
        Dv = v.shape[-1]
        M = _num_features(spec, d)
        with _scratch(x) as scratch:
            root = ctx.root
            w_in, w_ones = _input_weights(weight, root)
            gx, gy, gv = torch.empty_like(x), torch.empty_like(y), torch.empty_like(v)
            gw = gb = None
            grev = x.new_zeros(G, _num_features(spec, x.shape[-1]), Dv + 1)  # Σ over later queries, rel. to block end
            plan = _block_plan(L, ctx.chunk, ctx.rows)
            for i in range(len(plan) - 1, -1, -1):
                s, e, c = plan[i]
                S, r = states[i], logs[i]
                mb = None if mask is None else mask[:, s:e]
                n = e - s
                xb, yb = _rows_of(x, s, e, scratch, "x", root), _rows_of(y, s, e, scratch, "y", root)
                blk = _causal_block(xb, yb, spec, mb, c, r, scratch, with_intra=False)
                A, E = ctx.intra[i]
                nc = n // c
                V1 = Dv + 1
                v4 = _values_with_ones(v, s, e, scratch).view(G, nc, c, V1)
                g4 = _upstream(gout[:, s:e], out[:, s:e], den[:, s:e], scratch("g1", G, n, V1)).view(G, nc, c, V1)
                # forward states before each chunk, recomputed
                wv = torch.mul(v4, blk.w.unsqueeze(-1), out=scratch("wv", G, nc, c, V1))  # (G, nc, C, V1)
                kvc = _bmm4(blk.psi_k.transpose(-1, -2), wv, scratch("kvc", G, nc, M, V1))
                S_before, _ = _prefix_states(S, kvc, blk.decay, scratch("S", G, nc, M, V1))
                # reverse states: P_n from this block's queries, plus grev from later blocks
                gc = torch.mul(g4, blk.carry.unsqueeze(-1), out=scratch("gc", G, nc, c, V1))  # (G, nc, C, V1)
                P = _bmm4(blk.psi_q.transpose(-1, -2), gc, scratch("kvc", G, nc, M, V1))  # (G, nc, M, V1)
                Gst, grev = _suffix_states(P, grev, blk.decay, scratch("Gst", G, nc, M, V1))
                Gs = _bmm4(g4, v4.transpose(-1, -2), scratch("Gs", G, nc, c, c)).mul_(E)  # (G, nc, C, C)
                # ∂/∂ψ_q, ∂/∂ψ_k, ∂/∂v1
                gpq = _bmm4(Gs, blk.psi_k, scratch("gpq", G, nc, c, M))
                gpq += _bmm4(gc, S_before.transpose(-1, -2), scratch("gp", G, nc, c, M))
                gpk = _bmm4(Gs.transpose(-1, -2), blk.psi_q, scratch("gpk", G, nc, c, M))
                gpk += _bmm4(wv, Gst.transpose(-1, -2), scratch("gp", G, nc, c, M))
                gv1 = _bmm4(A.transpose(-1, -2), g4, scratch("o", G, nc, c, V1))
                gv1.addcmul_(blk.w.unsqueeze(-1), _bmm4(blk.psi_k, Gst, scratch("oS", G, nc, c, V1)))
                gv[:, s:e] = gv1.view(G, n, V1)[..., :Dv]
                guq = _activation_grad(gpq.view(G, n, M), blk.pre_q, blk.psi_q.view(G, n, M), spec)
                guk = _activation_grad(gpk.view(G, n, M), blk.pre_k, blk.psi_k.view(G, n, M), spec)
                gx[:, s:e] = _input_grad(guq, w_in, root, scratch)
                gy[:, s:e] = _key_grad(guk, yb, spec, w_in, w_ones, root, scratch)
                gw, gb = _weight_grads(spec, needs_w, needs_b, guq, xb, gw, gb)
                gw, gb = _weight_grads(spec, needs_w, needs_b, guk, yb, gw, gb)
            return (gx if needs_x else None, gy if needs_y else None, gv if needs_v else None,
                    gw, gb, None, None, None, None, None, None, None)


def _num_features(spec: FeatureSpec, dim: int) -> int:
    if spec.weight is None:
        return dim
    return spec.weight.shape[-2]


# ----------------------------------------------------------------------------------------------
# entry point


def fused_attention(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, spec: FeatureSpec, *,
    is_causal: bool, key_padding_mask: torch.Tensor | None, chunk_size: int,
    initial_state=None, return_state: bool = False, rows: int | None = None, root: float = 1.0,
):
    """Fused FAVOR with features of root·x and root·y (root = √scale; the scaling is applied
    block by block, so no scaled copy of the inputs is made).

    x (B, H, Lq, d), y (B, H, Lk, d), v (B, H, Lk, Dv) in the compute dtype; spec from
    :func:`make_spec`; key_padding_mask (B, Lk) bool or None; initial_state a
    :class:`favor.linear.FavorState` (causal only).  Returns (out (B, H, Lq, Dv), state or None)
    with state = (kv (B, H, M, Dv), k_sum (B, H, M), log_scale (B, H)).

    With autograd (any input requiring grad) only the stateless calls are supported here
    (initial_state None, return_state False); :func:`favor.attention.favor_attention` routes the
    others to the generic path.
    """
    rows = BLOCK_ROWS if rows is None else rows
    B, H, Lq, d = x.shape
    G = B * H
    xg = x.reshape(G, Lq, d)
    yg = y.reshape(G, y.shape[2], d)
    vg = v.reshape(G, v.shape[2], v.shape[3])
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.unsqueeze(1).expand(B, H, -1).reshape(G, key_padding_mask.shape[-1])
    rows_g = rows
    tensors = (x, y, v, spec.weight, spec.bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if grad and (initial_state is not None or return_state):
        raise ValueError("fused_attention with autograd supports no initial_state/return_state")
    Dv = v.shape[-1]
    if not is_causal:
        if grad:
            out = _BidirectionalFavor.apply(xg, yg, vg, spec.weight, spec.bias, spec.const, mask,
                                            spec.kind, spec.m, rows_g, root)
        else:
            with torch.no_grad():
                out = _bidir_forward(xg, yg, vg, spec, mask, rows_g, root)[0]
        return out.view(B, H, Lq, Dv), None
    if grad:
        out = _CausalFavor.apply(xg, yg, vg, spec.weight, spec.bias, spec.const, mask,
                                 spec.kind, spec.m, chunk_size, rows_g, root)
        return out.view(B, H, Lq, Dv), None
    M = _num_features(spec, d)
    with torch.no_grad():
        if initial_state is None:
            kv0 = x.new_zeros(G, M, Dv + 1)
            r0 = torch.full((G,), float("-inf"), dtype=x.dtype, device=x.device)
            log0 = r0
        else:
            kv0 = torch.cat((initial_state.kv, initial_state.k_sum.unsqueeze(-1)), -1).reshape(G, M, Dv + 1)
            log0 = initial_state.log_scale.reshape(G)
            r0 = log0
        if spec.kind != "exp":
            r0 = torch.zeros_like(log0)  # relu/elu states are absolute; log_scale is carried as is
        out, _, _, (S, r), _ = _causal_forward(xg, yg, vg, spec, mask, chunk_size, rows_g, kv0, r0, root)
        if spec.kind != "exp":
            r = log0
    state = None
    if return_state:
        S = S.reshape(B, H, M, Dv + 1)
        state = (S[..., :Dv], S[..., Dv], r.reshape(B, H))
    return out.view(B, H, Lq, Dv), state
