"""``FavorAttention``: a module that owns a random projection and calls :func:`favor.favor_attention`.

Dimension key: B batch, H heads, L sequence, D head dim, Dv value dim, m projections (rows of the
projection matrix).

The projection is a persistent buffer (saved in ``state_dict`` and restored exactly), drawn once at
construction from a ``torch.Generator`` seeded with ``seed``.  Nothing random happens in
``forward``: the projection changes only when :meth:`FavorAttention.redraw_` is called, directly or
through :func:`redraw_projections_` / :class:`ProjectionRedraw`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from ..attention import favor_attention
from ..feature_maps import FEATURES, KERNELS, check_key_estimator
from ..linear import DEFAULT_CHUNK_SIZE, FavorState
from ..projections import PROJECTIONS, SCALINGS, projection_matrix

__all__ = [
    "FavorAttention",
    "ProjectionRedraw",
    "derive_seed",
    "favor_modules",
    "projection_fingerprint",
    "redraw_projections_",
    "validate_favor_options",
]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process and on every machine.

    SHA-256 of the decimal parts (Python's ``hash`` is salted per process, so it is not used).
    ``derive_seed(seed, layer)`` seeds layer projections; ``derive_seed(seed, step)`` seeds redraws.
    """
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"derive_seed takes ints, got {p!r} ({type(p).__name__})")
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def validate_favor_options(
    head_dim: int,
    *,
    nb_features: int | None,
    features: str | None,
    kernel: str,
    projection: str | None,
    scaling: str,
    seed: int,
    chunk_size: int,
    key_estimator: str = "plain",
) -> None:
    """Check one set of FAVOR options; ValueError/TypeError naming the offending option and value.

    Rules: ``kernel`` in :data:`favor.KERNELS`; ``features`` in :data:`favor.FEATURES` or ``None``
    for ``kernel="softmax"`` and ``None`` for ``"relu"``/``"elu"``; ``projection`` in
    :data:`favor.PROJECTIONS`, or ``None`` (the identity, no random matrix) for ``"relu"``/``"elu"``
    only, in which case ``nb_features`` must be ``None`` or ``head_dim``; ``scaling`` in
    :data:`favor.SCALINGS` and ``"chi"`` for ``projection="iid"``; ``key_estimator`` in
    :data:`favor.KEY_ESTIMATORS`, non-"plain" ones with positive exponential softmax features only.
    """
    _check_int("head_dim", head_dim, minimum=1)
    _check_int("seed", seed, minimum=0)
    if seed >= 1 << 63:
        raise ValueError(f"seed must be < 2**63 (a torch.Generator seed), got seed={seed}")
    _check_int("chunk_size", chunk_size, minimum=1)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "softmax":
        if features is not None and features not in FEATURES:
            raise ValueError(f"unknown features {features!r}; expected one of {FEATURES} (or None = 'positive')")
    elif features is not None:
        raise ValueError(
            f"features={features!r} applies to kernel='softmax' only; use features=None with kernel={kernel!r}"
        )
    if projection is None:
        if kernel == "softmax":
            raise ValueError(
                "projection=None (identity) is only for kernel='relu' or 'elu'; the softmax kernel needs "
                f"a random projection, one of {PROJECTIONS}"
            )
        if nb_features is not None and nb_features != head_dim:
            raise ValueError(
                f"projection=None uses the identity, which has head_dim={head_dim} rows, but nb_features="
                f"{nb_features}; pass nb_features=None or {head_dim}, or choose a projection"
            )
    else:
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS} or None")
        if nb_features is None:
            raise ValueError(f"projection={projection!r} needs nb_features (a positive int), got None")
        _check_int("nb_features", nb_features, minimum=1)
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")
    if projection == "iid" and scaling != "chi":
        raise ValueError(f"scaling={scaling!r} applies to orthogonal projections only; projection='iid' needs 'chi'")
    check_key_estimator(key_estimator, features, kernel)


class FavorAttention(nn.Module):
    """FAVOR attention on (B, H, L, D) heads with an owned, seeded random projection.

    Args:
        head_dim: D, the query/key head dimension.
        nb_features: m, rows of the projection (random features: m, or 2m for
            ``hyperbolic``/``trig``).  ``None`` only with ``projection=None``.
        features: ``"positive"`` (FAVOR+), ``"hyperbolic"``, ``"trig"``, ``"oprf"``, or ``None``
            (meaning ``"positive"`` for the softmax kernel; required for ``relu``/``elu``).
        kernel: ``"softmax"`` | ``"relu"`` | ``"elu"``.
        projection: ``"orthogonal"`` | ``"iid"`` | ``"hadamard"`` | ``"givens"``, or ``None``
            (relu/elu only): no random matrix, the features see the identity projection, there is
            no buffer and :meth:`redraw_` does nothing.
        scaling: row norms of orthogonal projections, ``"chi"`` or ``"sqrt_d"``.
        is_causal: query t attends to keys 0..t only.
        seed: seeds the ``torch.Generator`` of the first draw.
        chunk_size: chunk length of the causal kernel.
        key_estimator: ``"plain"`` (unbiased), ``"normalized"`` or ``"calibrated"`` (lower error,
            a small bias that vanishes as M grows): see :func:`favor.favor_attention`.

    Buffers:
        ``projection`` (m, D), persistent, in the default dtype (drawn in float64 then cast);
        absent when ``projection=None``.  It follows ``.to(dtype)`` like any buffer, so
        ``model.to(torch.bfloat16)`` rounds it to bf16 (prefer autocast, under which the features
        are computed in float32 from a float32 projection).
        ``draw_state`` (2,) int64, persistent: (seed, number of argument-less :meth:`redraw_`
        calls), so that the next argument-less redraw is reproducible after a checkpoint
        round-trip into a module built with any seed.
    """

    projection: torch.Tensor | None
    draw_state: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        *,
        nb_features: int | None = 256,
        features: str | None = None,
        kernel: str = "softmax",
        projection: str | None = "orthogonal",
        scaling: str = "chi",
        is_causal: bool = False,
        seed: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        key_estimator: str = "plain",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        validate_favor_options(
            head_dim, nb_features=nb_features, features=features, kernel=kernel, projection=projection,
            scaling=scaling, seed=seed, chunk_size=chunk_size, key_estimator=key_estimator,
        )
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
        self.head_dim = head_dim
        self.features = features
        self.kernel = kernel
        self.projection_kind = projection
        self.scaling = scaling
        self.is_causal = is_causal
        self.seed = seed
        self.chunk_size = chunk_size
        self.key_estimator = key_estimator
        self.nb_features = head_dim if projection is None else nb_features
        self.register_buffer("draw_state", torch.tensor([seed, 0], dtype=torch.long, device=device), persistent=True)
        if projection is None:
            self.projection = None
        else:
            g = torch.Generator().manual_seed(seed)
            w = self._draw(g, device=device, dtype=dtype or torch.get_default_dtype())
            self.register_buffer("projection", w, persistent=True)

    def _draw(self, generator: torch.Generator, *, device, dtype) -> torch.Tensor:
        return projection_matrix(
            self.projection_kind, self.nb_features, self.head_dim, scaling=self.scaling,
            generator=generator, device=device, dtype=dtype,
        )  # (m, D)

    @torch.no_grad()
    def redraw_(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection in place (same shape, device and dtype).

        With ``generator``: the draw comes from it (advancing it).  Without: the k-th such call
        draws from a generator seeded with ``derive_seed(seed, k)`` (``draw_state`` counts k and is
        saved in the ``state_dict``), so it gives the same matrix in every process and after a
        checkpoint round-trip.  No-op for ``projection=None``.
        """
        if self.projection is None:
            return
        if generator is None:
            self.draw_state[1] += 1
            seed, count = (int(t) for t in self.draw_state)
            generator = torch.Generator().manual_seed(derive_seed(seed, count))
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.projection.copy_(self._draw(generator, device=self.projection.device, dtype=self.projection.dtype))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        initial_state: FavorState | None = None,
        return_state: bool = False,
        is_causal: bool | None = None,
        query_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, FavorState]:
        """query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv) -> (B, H, Lq, Dv).

        ``key_padding_mask``: bool (B, Lk), True = attend.  ``initial_state``/``return_state``
        (causal only) carry the :class:`favor.FavorState` across calls.  ``is_causal`` overrides
        the module's setting for this call (``None``: use the module's).  ``query_padding_mask``:
        bool (B, Lq), True = a real query (bidirectional; see :func:`favor.favor_attention`).
        """
        return favor_attention(
            query, key, value, self.projection, features=self.features, kernel=self.kernel,
            is_causal=self.is_causal if is_causal is None else is_causal,
            key_padding_mask=key_padding_mask, initial_state=initial_state,
            return_state=return_state, chunk_size=self.chunk_size, query_padding_mask=query_padding_mask,
            key_estimator=self.key_estimator,
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, nb_features={self.nb_features}, features={self.features!r}, "
            f"kernel={self.kernel!r}, projection={self.projection_kind!r}, scaling={self.scaling!r}, "
            f"is_causal={self.is_causal}, seed={self.seed}, chunk_size={self.chunk_size}, "
            f"key_estimator={self.key_estimator!r}"
        )


def favor_modules(model: nn.Module) -> Iterator[tuple[str, FavorAttention]]:
    """(name, module) for every :class:`FavorAttention` in ``model``, in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, FavorAttention):
            yield name, module


def redraw_projections_(model: nn.Module, generator: torch.Generator) -> int:
    """Redraw every FAVOR projection in ``model`` from ``generator``, in ``named_modules`` order.

    Returns the number of projections redrawn.  Two models of the same architecture given
    generators in the same state draw identical matrices.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    count = 0
    for _, module in favor_modules(model):
        if module.projection is not None:
            module.redraw_(generator)
            count += 1
    return count


def projection_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over the names and exact bytes of every FAVOR projection in ``model``.

    Equal fingerprints mean bit-identical projections (e.g. across distributed ranks).
    """
    h = hashlib.sha256()
    for name, module in favor_modules(model):
        if module.projection is None:
            continue
        w = module.projection.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype};".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


class ProjectionRedraw:
    """Explicit, reproducible redraw schedule for a training loop.

    ``maybe_redraw(step)`` redraws every FAVOR projection of ``model`` when ``step % every == 0``
    from a generator seeded with ``derive_seed(seed, step)``; so all distributed ranks (and a
    resumed run) draw identical matrices at the same step without communicating.  Call it
    yourself, e.g. after ``optimizer.step()``; ``forward`` never redraws.
    """

    def __init__(self, model: nn.Module, every: int, seed: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_int("every", every, minimum=1)
        _check_int("seed", seed, minimum=0)
        self.model = model
        self.every = every
        self.seed = seed

    def generator(self, step: int) -> torch.Generator:
        """The generator used at ``step``."""
        _check_int("step", step, minimum=0)
        return torch.Generator().manual_seed(derive_seed(self.seed, step))

    def maybe_redraw(self, step: int) -> bool:
        """Redraw if ``step % every == 0``; returns whether it did."""
        _check_int("step", step, minimum=0)
        if step % self.every != 0:
            return False
        redraw_projections_(self.model, self.generator(step))
        return True
