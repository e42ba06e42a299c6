"""Approximation experiments: how closely each feature kind × projection estimates softmax attention.

The library behind ``favor approx``.  Pure functions that return plain dicts (JSON-ready), plus
:func:`plot_sweep` for the figures.

Dimension key: L sequence length, d head dim, Dv value dim, m projections (rows of W), M output
features (m, or 2m for the kinds in :data:`TWO_FEATURES_PER_PROJECTION`), R sampled query rows,
P sampled (query, key) pairs, S seeds.

Budgets are counted in OUTPUT features M (the width of φ, which sets the cost of the linear
kernels), so ``hyperbolic``, ``trig`` and ``hyperbolic_oprf`` at budget M use m = M/2 projections.

Quantities, per (feature kind, projection, budget) and per seed, then mean ± std over seeds:

* ``attention_mse``: mean over R sampled query rows and all L keys of (Â_ij − A_ij)², with Â the
  row-normalised estimated attention matrix and A = softmax(QKᵀ/√d) (causal: both lower-triangular).
* ``output_rel_error``: ‖Ŷ − Y‖_F / ‖Y‖_F over the same R sampled query rows (all L when R ≥ L), Ŷ from favor's linear-time kernels
  (:mod:`favor.linear`, the generic path of :func:`favor.favor_attention`) and Y exact softmax
  attention.
* ``kernel_mse``: mean over P sampled pairs (x_i, y_j) of (φ(x_i)ᵀφ(y_j) − exp(x_iᵀy_j))², with
  x = q/d^{1/4}, y = k/d^{1/4}: the per-entry MSE of the unnormalised kernel estimate that
  Lemma 2 of Choromanski et al. (2021) describes.  ``theory_kernel_mse`` is the mean over the same
  pairs of the closed form (:func:`theory_kernel_mse`) for i.i.d. projections.

With ``iid`` and ``orthogonal`` projections every row is marginally N(0, I_d) (``scaling="chi"``),
so every estimator here is unbiased for the kernel; ``hadamard`` and ``givens`` rows are only
approximately isotropic (see :mod:`favor.projections`), which leaves a small bias for inputs
aligned with the coordinate axes (none on average over the isotropic default inputs).  ``sqrt_d``
rows are not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .feature_maps import FEATURES, OPRF_FEATURES, check_key_estimator, feature_map, key_feature_map, oprf_parameter
from .linear import causal_linear_attention, linear_attention
from .projections import PROJECTIONS, projection_matrix

if TYPE_CHECKING:
    from .data.corpus import Tokenizer

__all__ = [
    "DISTRIBUTIONS",
    "TWO_FEATURES_PER_PROJECTION",
    "ApproxConfig",
    "attention_statistics",
    "draw_inputs",
    "format_table",
    "format_theory_table",
    "kernel_estimates",
    "measure",
    "model_inputs",
    "plot_sweep",
    "projections_for",
    "run_sweep",
    "theory_kernel_mse",
]

#: input distributions, each with mean 0 and per-coordinate standard deviation σ
DISTRIBUTIONS = ("normal", "uniform", "laplace")
#: kinds whose φ has 2m entries for m projections
TWO_FEATURES_PER_PROJECTION = ("hyperbolic", "trig", "hyperbolic_oprf")


@dataclass(frozen=True)
class ApproxConfig:
    """One sweep.  Defaults: the Performer paper's setting (L=4096, d=16, 15 seeds).

    σ sets the logits qᵀk/√d, whose standard deviation is σ² whatever d is.  The default σ = 0.5
    (logit std 0.25) puts a row's largest weight at ~2.4× the uniform 1/L, with exp(entropy)
    ≈ 0.97·L (``attention_statistics``): neither uniform nor one-hot, and still a regime where the
    exponential estimators' MSE can be measured.  Their squared errors have a fourth moment that
    grows like exp(6‖x+y‖²), so at larger σ (d=16) a mean over 15 seeds misses the rare draws that
    dominate the MSE: at σ=0.75 (largest weight ~7× uniform) the positive kind's measured per-entry
    MSE at M=256 came out two orders of magnitude below its closed-form mean.
    """

    length: int = 4096  # L, query and key length
    dim: int = 16  # d, head dim of q and k (also of v)
    budgets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)  # output features M to sweep
    features: tuple[str, ...] = FEATURES  # feature kinds (see favor.feature_maps)
    projections: tuple[str, ...] = PROJECTIONS  # projection kinds (see favor.projections)
    seeds: int = 15  # independent draws of inputs and projections
    distribution: str = "normal"  # entries of q, k, v: one of DISTRIBUTIONS
    sigma: float = 0.5  # per-coordinate standard deviation of q, k, v
    causal: bool = False  # causal attention (query t sees keys 0..t)
    rows: int = 256  # R, query rows sampled for attention_mse and output_rel_error (all rows if ≥ L)
    pairs: int = 1024  # P, (query, key) pairs sampled for kernel_mse
    base_seed: int = 0  # salt: seed s uses torch generators seeded from (base_seed, s)
    precision: str = "float32"  # dtype of features and estimates (exact references: float64)
    key_estimator: str = "plain"  # keys' estimator, one of favor.KEY_ESTIMATORS (non-plain: no trig)

    def __post_init__(self) -> None:
        for name in ("length", "dim", "seeds", "rows", "pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.base_seed, bool) or not isinstance(self.base_seed, int) or self.base_seed < 0:
            raise ValueError(f"base_seed must be a non-negative int, got {self.base_seed!r}")
        if not self.features:
            raise ValueError("features must not be empty")
        if not self.projections:
            raise ValueError("projections must not be empty")
        if not self.budgets:
            raise ValueError("budgets must not be empty")
        for name in ("budgets", "features", "projections"):
            values = tuple(getattr(self, name))
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ValueError(f"{name} lists {', '.join(map(str, repeated))} more than once; each cell is measured once")
        for kind in self.features:
            if kind not in FEATURES:
                raise ValueError(f"unknown feature kind {kind!r}; expected some of {FEATURES}")
            check_key_estimator(self.key_estimator, kind, "softmax")
        for budget in self.budgets:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
                raise ValueError(f"budgets must be positive ints, got {budget!r}")
            if budget % 2 and any(f in TWO_FEATURES_PER_PROJECTION for f in self.features):
                raise ValueError(
                    f"budget M={budget} is odd but {TWO_FEATURES_PER_PROJECTION} need an even M (m = M/2)"
                )
        for kind in self.projections:
            if kind not in PROJECTIONS:
                raise ValueError(f"unknown projection {kind!r}; expected some of {PROJECTIONS}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; expected one of {DISTRIBUTIONS}")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {self.sigma!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def projections_for(features: str, budget: int) -> int:
    """Number m of projections that give ``budget`` output features for this kind."""
    return budget // 2 if features in TWO_FEATURES_PER_PROJECTION else budget


def _generator(*seeds: int) -> torch.Generator:
    # one integer from the tuple; distinct tuples give distinct streams for the sizes used here
    value = 0
    for s in seeds:
        value = value * 1_000_003 + int(s)
    return torch.Generator().manual_seed(value % (2**63))


def draw_inputs(
    length: int,
    dim: int,
    *,
    distribution: str = "normal",
    sigma: float = 1.0,
    value_dim: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k: (L, d) and v: (L, Dv) with i.i.d. entries of mean 0 and standard deviation σ.

    ``normal``: N(0, σ²); ``uniform``: U(−√3σ, √3σ); ``laplace``: Laplace(0, σ/√2).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    shapes = ((length, dim), (length, dim), (length, value_dim or dim))
    out = []
    for shape in shapes:
        if distribution == "normal":
            t = torch.randn(shape, generator=generator, dtype=torch.float64)
        elif distribution == "uniform":
            t = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * math.sqrt(3)
        else:  # laplace: inverse CDF of a centred uniform, unit variance
            u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
            t = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
        out.append((t * sigma).to(dtype))
    return out[0], out[1], out[2]


def attention_statistics(attention_rows: torch.Tensor, rows: torch.Tensor, *, causal: bool = False) -> dict:
    """How peaked exact attention is, from R of its rows: attention_rows (R, L), rows (R,) their
    query indices -> dict with ``max_weight_times_keys`` (mean over rows of n·max_j A_ij, n the
    number of keys the row sees: 1 = uniform, n = one-hot) and ``effective_keys_fraction`` (mean
    over rows of exp(entropy)/n)."""
    L = attention_rows.shape[-1]
    p = attention_rows
    visible = (rows + 1).to(p.dtype) if causal else torch.full(rows.shape, float(L), dtype=p.dtype)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # (R,)
    return {
        "max_weight_times_keys": float((p.amax(-1) * visible).mean()),
        "effective_keys_fraction": float((entropy.exp() / visible).mean()),
    }


def _parameter(features: str, x: torch.Tensor, y: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """FAVOR++ A exactly as :func:`favor.favor_attention` takes it: from all pairs, or (causal)
    from the first token's query and key.  x, y: (L, d) -> () or None."""
    if features not in OPRF_FEATURES:
        return None
    if causal:
        return oprf_parameter(x[:1], y[:1])
    return oprf_parameter(x, y)


def kernel_estimates(
    features: str,
    x: torch.Tensor,
    y: torch.Tensor,
    projection: torch.Tensor,
    oprf_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """φ(x_p)ᵀφ(y_p) for P pairs: x, y (P, d) scaled inputs, projection (m, d) -> (P,).

    Computed from the factored form exp(h)·ψ (:func:`favor.feature_map`), so large norms do not
    overflow before the product.
    """
    fx = feature_map(x, projection, features, oprf_a=oprf_a)
    fy = feature_map(y, projection, features, oprf_a=oprf_a)
    return torch.exp(fx.log_scale + fy.log_scale) * (fx.psi * fy.psi).sum(-1)


def theory_kernel_mse(
    features: str, x: torch.Tensor, y: torch.Tensor, m: int, oprf_a: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form MSE of φ(x)ᵀφ(y) as an estimate of SM = exp(xᵀy) with m i.i.d. N(0, I_d)
    projections: x, y (P, d) -> (P,).

    With z = x + y, w = x − y (Choromanski et al. 2021, Lemma 2; derivations re-done here):

    * positive:   (1/m) SM² (exp(‖z‖²) − 1)   [= (1/m) exp(‖z‖²) SM² (1 − exp(−‖z‖²))]
    * trig:       (1/2m) exp(‖x‖² + ‖y‖²) (1 − exp(−‖w‖²))²
                  [= (1/2m) exp(‖z‖²) SM⁻² (1 − exp(−‖w‖²))², the paper's form: the same]
    * hyperbolic: (1/2m) exp(−‖x‖² − ‖y‖²) (exp(‖z‖²) − 1)²   [= ½(1 − exp(−‖z‖²))·positive]
    * oprf:       (1/m) (D⁴ (1−8A)^{−d/2} exp(2B²‖z‖²/(1−8A) − ‖x‖² − ‖y‖²) − SM²)
                  with B² = 1−4A, D⁴ = (1−4A)^d (Likhosherstov et al. 2022)
    * hyperbolic_oprf: (1/m) (½ D⁴ (1−8A)^{−d/2} e^{−‖x‖²−‖y‖²} (exp(2B²‖z‖²/(1−8A)) + 1) − SM²)

    Derivation of trig: one projection gives exp((‖x‖²+‖y‖²)/2)·cos(ωᵀw); E cos(ωᵀw) = e^{−‖w‖²/2}
    and E cos² = (1 + e^{−2‖w‖²})/2, so the variance is e^{‖x‖²+‖y‖²}(1 − e^{−‖w‖²})²/2.
    hyperbolic_oprf: cosh(Bωᵀz) replaces exp(Bωᵀz), and E cosh²(u) = (1 + E cosh 2u)/2.
    """
    if features not in FEATURES:
        raise ValueError(f"no closed form for features={features!r}; expected one of {FEATURES}")
    if features in OPRF_FEATURES and oprf_a is None:
        raise ValueError(f"features={features!r} needs oprf_a")
    xx, yy = x.pow(2).sum(-1), y.pow(2).sum(-1)
    zz, ww = (x + y).pow(2).sum(-1), (x - y).pow(2).sum(-1)
    sm2 = torch.exp(2 * (x * y).sum(-1))
    if features == "positive":
        return sm2 * torch.expm1(zz) / m
    if features == "trig":
        return torch.exp(xx + yy) * (-torch.expm1(-ww)) ** 2 / (2 * m)
    if features == "hyperbolic":
        return torch.exp(-xx - yy) * torch.expm1(zz) ** 2 / (2 * m)
    d = x.shape[-1]
    a = torch.as_tensor(oprf_a, dtype=x.dtype)
    log_d4_term = d * torch.log(1 - 4 * a) - (d / 2) * torch.log(1 - 8 * a)
    t = 2 * (1 - 4 * a) * zz / (1 - 8 * a)
    if features == "oprf":
        second = torch.exp(log_d4_term + t - xx - yy)
    else:
        second = 0.5 * torch.exp(log_d4_term - xx - yy) * (torch.exp(t) + 1)
    return (second - sm2) / m


def measure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    features: str,
    *,
    causal: bool = False,
    rows: torch.Tensor | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact_rows: torch.Tensor | None = None,
    theory: bool = False,
    key_estimator: str = "plain",
) -> dict:
    """Errors of one draw.  q, k: (L, d), v: (L, Dv), projection (m, d), all of one float dtype
    in which the features are computed (the exact references are computed in float64).

    The estimate is the row-normalised Â ∝ ψ(x)·(exp(h_k − c)·ψ(y))ᵀ from :func:`favor.feature_map`
    (FAVOR++'s A taken as :func:`favor.favor_attention` takes it) on the query rows ``rows``, and
    Ŷ = Â V there: the numbers favor's linear-time kernels give for those rows (the core tests check
    the kernels against this explicit form), computed without an L×L matrix.

    rows: (R,) query indices (default: all L); pairs: ((P,), (P,)) query and key indices for the
    kernel errors (default: i = j); exact_rows: (R, L) float64 exact attention rows, to reuse
    across calls.  ``theory`` adds ``theory_kernel_mse`` (the closed form for i.i.d. projections
    and plain keys).  ``key_estimator``: the keys' features (:func:`favor.key_feature_map`).
    Returns a dict of floats.
    """
    if q.dim() != 2 or k.shape != q.shape or v.dim() != 2 or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"expected q, k (L, d) and v (L, Dv), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    L, d = q.shape
    if projection.dim() != 2 or projection.shape[1] != d:
        raise ValueError(f"projection must have shape (m, {d}), got {tuple(projection.shape)}")
    rows = torch.arange(L) if rows is None else rows
    qi, kj = (torch.arange(L), torch.arange(L)) if pairs is None else pairs
    R = rows.shape[0]
    root = d ** -0.25  # x = √scale·q with scale = 1/√d
    x, y = q * root, k * root
    a = _parameter(features, x, y, causal)
    fq = feature_map(torch.cat((x[rows], x[qi])), projection, features, oprf_a=a)  # psi (R + P, M)
    fk = key_feature_map(y, projection, features, oprf_a=a, key_estimator=key_estimator)  # psi (L, M), log_scale (L,)

    if exact_rows is None:
        exact_rows = _exact_rows(q, k, rows, causal)
    k_psi = fk.psi * torch.exp(fk.log_scale - fk.log_scale.max()).unsqueeze(-1)  # (L, M)
    est = (fq.psi[:R] @ k_psi.T).to(torch.float64)  # (R, L), up to a positive factor per row
    if causal:
        est = est.masked_fill(torch.arange(L).unsqueeze(0) > rows.unsqueeze(1), 0.0)
    est = est / est.sum(-1, keepdim=True)
    v64 = v.to(torch.float64)
    exact_out = exact_rows @ v64  # (R, Dv)

    kern = torch.exp(fq.log_scale[R:] + fk.log_scale[kj]) * (fq.psi[R:] * fk.psi[kj]).sum(-1)  # (P,)
    kern = kern.to(torch.float64)
    xp, yp = x[qi].to(torch.float64), y[kj].to(torch.float64)
    exact_kernel = torch.exp((xp * yp).sum(-1))
    result = {
        "attention_mse": float((est - exact_rows).pow(2).mean()),
        "output_rel_error": float((est @ v64 - exact_out).norm() / exact_out.norm()),
        "kernel_mse": float((kern - exact_kernel).pow(2).mean()),
        "kernel_rel_mse": float(((kern - exact_kernel) / exact_kernel).pow(2).mean()),
    }
    if theory:
        if key_estimator != "plain":
            raise ValueError(f"the closed-form MSE is for plain key features, not key_estimator={key_estimator!r}")
        a64 = None if a is None else a.to(torch.float64)
        closed = theory_kernel_mse(features, xp, yp, projection.shape[0], a64)  # (P,)
        result["theory_kernel_mse"] = float(closed.mean())
        # per-pair (squared error / closed form): expectation exactly 1 for every pair
        result["kernel_mse_ratio"] = float(((kern - exact_kernel).pow(2) / closed).mean())
    return result


def _exact_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool) -> torch.Tensor:
    """(R, L) rows of exact softmax(qkᵀ/√d) in float64 (causal: zero above the diagonal)."""
    q, k = q.to(torch.float64), k.to(torch.float64)
    L, d = q.shape
    scores = (q[rows] @ k.T) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(torch.arange(L).unsqueeze(0) > rows.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1)


def _mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if t.numel() > 1 else 0.0
    return {"mean": float(t.mean()), "std": std}


def run_sweep(
    config: ApproxConfig,
    *,
    inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    progress: bool | None = None,
) -> dict:
    """Run the sweep of ``config``: every feature kind × projection × budget × seed.

    ``inputs``: optional callable ``seed -> (q, k, v)`` with q, k (L, d) and v (L, Dv) that replaces
    the random inputs (used for real queries and keys of a model); ``config.length`` and
    ``config.dim`` must match.  Projections are drawn per (seed, projection kind) at the largest m
    and sliced: the first m rows of a block-structured draw are a draw of the same kind with m rows.
    ``progress``: tqdm bar (None: only on a terminal).

    Returns ``{"config", "input_statistics", "results": [{"features", "projection", "budget", "m",
    "attention_mse": {"mean", "std"}, "output_rel_error": {...}, "kernel_mse": {...},
    "kernel_rel_mse": {...}, ["theory_kernel_mse": {...}]}, ...]}`` (mean and std over seeds).
    """
    from tqdm.auto import tqdm

    c = config
    dtype = getattr(torch, c.precision)
    m_max = max(projections_for(f, b) for f in c.features for b in c.budgets)
    per_cell: dict[tuple[str, str, int], list[dict]] = {}
    stats = []
    total = c.seeds * len(c.projections) * len(c.features) * len(c.budgets)
    bar = tqdm(total=total, desc="favor approx", unit="case",
               disable=None if progress is None else not progress)
    for s in range(c.seeds):
        gen = _generator(c.base_seed, s, 0)
        if inputs is None:
            q, k, v = draw_inputs(c.length, c.dim, distribution=c.distribution, sigma=c.sigma, generator=gen)
        else:
            q, k, v = (t.detach().to(torch.float64) for t in inputs(s))
            if q.shape != (c.length, c.dim) or k.shape != q.shape or v.shape[0] != c.length:
                raise ValueError(f"inputs({s}) gave q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                                 f"expected q and k ({c.length}, {c.dim})")
        L = c.length
        rows = torch.arange(L) if c.rows >= L else torch.randperm(L, generator=gen)[: c.rows].sort().values
        qi = torch.randint(0, L, (c.pairs,), generator=gen)
        if c.causal:  # pairs with j ≤ i: the entries causal attention uses
            kj = (torch.rand(c.pairs, generator=gen, dtype=torch.float64) * (qi + 1)).long()
        else:
            kj = torch.randint(0, L, (c.pairs,), generator=gen)
        exact_rows = _exact_rows(q, k, rows, c.causal)
        stats.append(attention_statistics(exact_rows, rows, causal=c.causal))
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        for p_index, proj in enumerate(c.projections):
            w_full = projection_matrix(proj, m_max, c.dim, generator=_generator(c.base_seed, s, 1 + p_index),
                                       dtype=dtype)
            for kind in c.features:
                for budget in c.budgets:
                    m = projections_for(kind, budget)
                    r = measure(qc, kc, vc, w_full[:m], kind, causal=c.causal, rows=rows, pairs=(qi, kj),
                                exact_rows=exact_rows, theory=proj == "iid" and c.key_estimator == "plain",
                                key_estimator=c.key_estimator)
                    per_cell.setdefault((kind, proj, budget), []).append(r)
                    bar.update(1)
    bar.close()
    results = []
    for (kind, proj, budget), runs in per_cell.items():
        entry = {"features": kind, "projection": proj, "budget": budget, "m": projections_for(kind, budget)}
        for key in runs[0]:
            entry[key] = _mean_std([r[key] for r in runs])
        results.append(entry)
    input_stats = {key: _mean_std([st[key] for st in stats]) for key in stats[0]}
    return {"config": c.to_dict(), "input_statistics": input_stats, "results": results}


def _lookup(result: dict, features: str, projection: str, budget: int) -> dict | None:
    for r in result["results"]:
        if (r["features"], r["projection"], r["budget"]) == (features, projection, budget):
            return r
    return None


def format_table(result: dict, *, quantity: str = "output_rel_error", budgets: tuple[int, ...] | None = None) -> str:
    """Compact text table: one row per (features, projection), one column per budget, "mean±std"."""
    cfg = result["config"]
    budgets = tuple(cfg["budgets"]) if budgets is None else budgets
    scientific = quantity.endswith("mse")
    fmt = (lambda r: f"{r['mean']:.2e}") if scientific else (lambda r: f"{r['mean']:.3f}±{r['std']:.3f}")
    header = ["features", "projection"] + [f"M={b}" for b in budgets]
    lines = [header]
    for kind in cfg["features"]:
        for proj in cfg["projections"]:
            cells = [kind, proj]
            for b in budgets:
                r = _lookup(result, kind, proj, b)
                cells.append("-" if r is None else fmt(r[quantity]))
            lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [quantity if cfg.get("key_estimator", "plain") == "plain" else f"{quantity} ({cfg['key_estimator']} keys)"]
    for row in lines:
        text.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(text)


def format_theory_table(result: dict) -> str:
    """i.i.d. projections: measured per-entry kernel MSE vs the closed form, per kind and budget,
    and the mean over pairs of (squared error / closed form), which should be 1 ± its std/√S."""
    cfg = result["config"]
    if cfg.get("key_estimator", "plain") != "plain":
        raise ValueError(f"the closed forms are for plain key features; this sweep used "
                         f"key_estimator={cfg['key_estimator']!r}")
    seeds = cfg["seeds"]
    lines = [["features", "M", "measured MSE", "closed form", "measured/closed (per pair)"]]
    for kind in cfg["features"]:
        for b in cfg["budgets"]:
            r = _lookup(result, kind, "iid", b)
            if r is None or "theory_kernel_mse" not in r:
                continue
            ratio = r["kernel_mse_ratio"]
            lines.append([kind, str(b), f"{r['kernel_mse']['mean']:.3e}", f"{r['theory_kernel_mse']['mean']:.3e}",
                          f"{ratio['mean']:.3f} ± {ratio['std'] / math.sqrt(seeds):.3f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join(["i.i.d. features vs the closed-form MSE"] +
                     ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines])


_PANELS = (
    ("attention_mse", "MSE of the attention matrix"),
    ("output_rel_error", "relative error of the attention output"),
    ("kernel_mse", "per-entry MSE of φ(x)ᵀφ(y)"),
)


def setting_label(result: dict) -> str:
    """The sweep's setting in one line (figure titles): sizes, inputs, seeds, direction."""
    cfg = result["config"]
    mode = "causal" if cfg["causal"] else "bidirectional"
    if result.get("model") is not None:  # `favor approx --model`: a checkpoint's q, k, v
        inputs = f"q, k, v of {Path(result['model']['checkpoint']).name}"
    else:
        inputs = f"{cfg['distribution']} σ={cfg['sigma']}"
    keys = cfg.get("key_estimator", "plain")
    return f"L={cfg['length']}, d={cfg['dim']}, {inputs}, {cfg['seeds']} seeds, {mode}" + (
        "" if keys == "plain" else f", {keys} keys")


def plot_sweep(result: dict, out_dir: str | Path, *, prefix: str = "approx", against_theory: bool = False) -> list[Path]:
    """Write PNGs (log-scale error vs M with ±1 std error bars over seeds).

    One figure per projection kind, ``{prefix}_{projection}.png``, one panel per quantity and one
    line per feature kind; with ``against_theory`` also ``{prefix}_theory.png``: empirical per-entry
    kernel MSE of i.i.d. features (points, ±1 standard error of the mean over seeds) against
    Lemma 2's closed form (lines).  Returns the paths written.
    """
    from .plotting import pyplot, save_figure

    plt = pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    budgets = list(cfg["budgets"])
    setting = setting_label(result)
    written = []
    for proj in cfg["projections"]:
        fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 4))
        for ax, (key, title) in zip(axes, _PANELS):
            for kind in cfg["features"]:
                pts = [(b, _lookup(result, kind, proj, b)) for b in budgets]
                pts = [(b, r[key]) for b, r in pts if r is not None]
                xs = [b for b, _ in pts]
                means = [v["mean"] for _, v in pts]
                lows = [min(v["std"], v["mean"] * 0.999) for _, v in pts]  # keep the bar above 0 on a log axis
                ax.errorbar(xs, means, yerr=[lows, [v["std"] for _, v in pts]], marker="o", ms=3,
                            capsize=2, label=kind)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("output features M")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{proj} projections — {setting}", fontsize=10)
        written.append(save_figure(fig, out_dir / f"{prefix}_{proj}.png", dpi=110))
    if against_theory:
        if "iid" not in cfg["projections"]:
            raise ValueError("against_theory needs the 'iid' projection in the sweep")
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        seeds = cfg["seeds"]
        for i, kind in enumerate(cfg["features"]):
            color = f"C{i}"
            pts = [(b, _lookup(result, kind, "iid", b)) for b in budgets]
            pts = [(b, r) for b, r in pts if r is not None]
            xs = [b for b, _ in pts]
            emp = [r["kernel_mse"]["mean"] for _, r in pts]
            sem = [r["kernel_mse"]["std"] / math.sqrt(seeds) for _, r in pts]
            ax.errorbar(xs, emp, yerr=[[min(s, e * 0.999) for s, e in zip(sem, emp)], sem], fmt="o", ms=4,
                        capsize=2, color=color, label=f"{kind} measured")
            ax.plot(xs, [r["theory_kernel_mse"]["mean"] for _, r in pts], "-", color=color,
                    label=f"{kind} closed form")
            ratio = [r["kernel_mse_ratio"]["mean"] for _, r in pts]
            ratio_sem = [r["kernel_mse_ratio"]["std"] / math.sqrt(seeds) for _, r in pts]
            shift = 2 ** (0.04 * (i - len(cfg["features"]) / 2))  # spread the markers a little
            ax2.errorbar([x * shift for x in xs], ratio, yerr=ratio_sem, fmt="o-", ms=4, capsize=2,
                         color=color, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("output features M")
        ax.set_ylabel("per-entry MSE of φ(x)ᵀφ(y)")
        ax.set_title("mean over pairs: measured (±1 s.e.) vs closed form", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        ax2.axhline(1.0, color="k", lw=1)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("output features M")
        ax2.set_ylabel("mean over pairs of squared error / closed form")
        ax2.set_title("per-pair ratio (expected value 1), ±1 s.e. over seeds", fontsize=9)
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
        fig.suptitle(f"i.i.d. features vs Lemma 2 — {setting}", fontsize=10)
        written.append(save_figure(fig, out_dir / f"{prefix}_theory.png", dpi=110))
    return written


def _text_ids(tokenizer: Tokenizer, text_path: str | Path | None) -> list[int]:
    """The tokens fed to a model by :func:`model_inputs`.  A byte model reads ``text_path``
    (default: this module's source) as text; a protein model reads it as training reads FASTA
    (:func:`favor.data.corpus.load_corpus`: each record ``<bos> residues <eos>``, the training
    records, then the validation ones), and has no default."""
    from .data.corpus import load_corpus

    if tokenizer.name != "protein":
        return tokenizer.encode(Path(__file__ if text_path is None else text_path).read_text())
    if text_path is None:
        raise ValueError("a protein model needs a FASTA file to read (--text FILE)")
    corpus = load_corpus(text_path)
    if corpus.tokenizer.name != "protein":
        raise ValueError(f"{str(text_path)!r} is not FASTA, but the model was trained on proteins")
    return torch.cat((corpus.train, corpus.val)).tolist()


def model_inputs(
    checkpoint: str | Path, config: ApproxConfig, *, text_path: str | Path | None = None
) -> tuple[ApproxConfig, Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], str]:
    """Real queries, keys and values of a trained model, for :func:`run_sweep`.

    Loads a ``favor train`` checkpoint (:func:`favor.checkpoint.load_checkpoint`), feeds it the
    first ``min(config.length, max_len)`` tokens of ``text_path`` (default: this module's own
    source; a FASTA file, required, for a protein model: see :func:`_text_ids`), and records
    the (rotated) q, k, v that reach each FAVOR layer.  Seed s of the sweep uses layer/head number
    s mod (layers·heads) with fresh projections, so the spread over seeds mixes heads and
    projection draws.  Returns (config with length, dim and causal set to the
    model's, ``seed -> (q (L, Dh), k (L, Dh), v (L, Dh))``, a one-line description).
    """
    from dataclasses import replace

    from .checkpoint import load_checkpoint, load_weights
    from .data.corpus import tokenizer_from_name
    from .models import PerformerConfig, PerformerLM
    from .nn.favor_attention import favor_modules

    ckpt = load_checkpoint(checkpoint, optimizer=False)
    model_config = PerformerConfig.from_dict(ckpt.config["model"])
    if model_config.kernel != "softmax":
        raise ValueError(f"checkpoint {str(checkpoint)!r} uses the {model_config.kernel!r} kernel, not a softmax "
                         "estimate: there is no exact softmax attention to compare it with")
    model = PerformerLM(model_config)
    load_weights(model, ckpt, strict_buffers=True)
    model.eval()
    modules = list(favor_modules(model))
    if not modules:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no FAVOR attention layers (softmax model?)")
    tokenizer = tokenizer_from_name(ckpt.config["tokenizer"])
    ids = _text_ids(tokenizer, text_path)[: min(config.length, model_config.max_len)]
    if len(ids) < 2:
        raise ValueError(f"the text gives {len(ids)} tokens; need at least 2")
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []

    def hook(module, args, kwargs):
        q, k, v = args[:3]  # (1, H, L, Dh) each
        causal = kwargs.get("is_causal")
        captured.append((q[0].detach(), k[0].detach(), v[0].detach(),
                         module.is_causal if causal is None else bool(causal)))

    handles = [mod.register_forward_pre_hook(hook, with_kwargs=True) for _, mod in modules]
    try:
        with torch.no_grad():
            model(torch.tensor([ids], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    heads = [(layer, h) for layer in range(len(captured)) for h in range(captured[layer][0].shape[0])]
    L, dh = captured[0][0].shape[1:]

    def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer, h = heads[seed % len(heads)]
        q, k, v, _ = captured[layer]
        return q[h], k[h], v[h]

    causal = captured[0][3]
    new_config = replace(config, length=L, dim=dh, causal=causal)
    about = (f"model {str(ckpt.path)!r} (step {ckpt.step}): {len(captured)} FAVOR layers x "
             f"{captured[0][0].shape[0]} heads, L={L} tokens, head dim {dh}, "
             f"{'causal' if causal else 'bidirectional'}; seed s uses layer/head s mod {len(heads)}")
    return new_config, inputs, about
