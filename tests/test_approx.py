"""favor.approx (the `favor approx` experiment) and its claims: Lemma 2's closed-form MSEs,
Theorem 2 (orthogonal < i.i.d. at m ≤ d), FAVOR++ < FAVOR+ on the default inputs."""

import json
import math

import pytest
import torch

import favor
from favor.approx import (
    ApproxConfig,
    draw_inputs,
    format_table,
    format_theory_table,
    measure,
    run_sweep,
    theory_kernel_mse,
)
from favor.cli import main as cli_main
from favor.feature_maps import OPRF_FEATURES, feature_map, oprf_parameter
from favor.reference import explicit_attention_matrix, softmax_attention

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _stacked(projection, m, d, draws, seed):
    """(draws·m, d): `draws` independent (m, d) projections (m ≤ d for orthogonal), drawn in one call.

    gaussian_orthogonal_matrix(draws·d, d) stacks independent Haar blocks of d rows with chi norms;
    the first m rows of each block are an (m, d) orthogonal draw."""
    g = gen(seed)
    if projection == "iid":
        return favor.gaussian_iid_matrix(draws * m, d, generator=g, dtype=F64)
    w = favor.gaussian_orthogonal_matrix(draws * d, d, generator=g, dtype=F64)
    return w.reshape(draws, d, d)[:, :m].reshape(draws * m, d)


def _many_estimates(kind, x, y, *, m, draws, projection="iid", seed=0):
    """φ(x)ᵀφ(y) for `draws` independent (m, d) projections at once: (draws,), and A (or None).

    φ of the stacked (draws·m, d) matrix has columns [part 1 of every row, part 2 of every row]
    (part 2 only for the 2m kinds) and carries 1/√(draws·m); the per-draw sums are a reshape."""
    d = x.shape[-1]
    w = _stacked(projection, m, d, draws, seed)
    a = oprf_parameter(x[None], y[None]) if kind in OPRF_FEATURES else None
    fx = feature_map(x[None], w, kind, oprf_a=a)
    fy = feature_map(y[None], w, kind, oprf_a=a)
    prod = torch.exp(fx.log_scale + fy.log_scale) * fx.psi[0] * fy.psi[0]  # (parts·draws·m,)
    parts = favor.num_features(m, kind) // m
    return draws * prod.reshape(parts, draws, m).sum((0, 2)), a


PAIRS = {  # fixed (x, y), d = 8: moderate norms so that the squared errors have a usable variance
    "near": (0.3, 0.25, 1),
    "apart": (0.3, -0.25, 2),
    "small": (0.15, 0.1, 3),
}


def _pair(name):
    std, shift, seed = PAIRS[name]
    g = gen(seed)
    x = torch.randn(8, generator=g, dtype=F64) * std
    y = x * shift / std + torch.randn(8, generator=g, dtype=F64) * std
    return x, y


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("kind", favor.FEATURES)
def test_empirical_mse_of_iid_features_matches_the_closed_form(kind, pair):
    x, y = _pair(pair)
    m, draws = 4, 20000
    est, a = _many_estimates(kind, x, y, m=m, draws=draws, seed=10)
    sq = (est - torch.exp(x @ y)) ** 2
    stderr = float(sq.std() / math.sqrt(draws))
    theory = float(theory_kernel_mse(kind, x[None], y[None], m, a)[0])
    assert abs(float(sq.mean()) - theory) < 4 * stderr, (float(sq.mean()), theory, stderr)
    assert stderr < 0.1 * theory  # the check has power: the error bar is a tenth of the value


def test_closed_forms_agree_with_the_papers_way_of_writing_them():
    x, y = _pair("near")
    x, y = x[None], y[None]
    sm = torch.exp((x * y).sum(-1))
    zz, ww = ((x + y) ** 2).sum(-1), ((x - y) ** 2).sum(-1)
    m = 7
    paper = {
        "positive": torch.exp(zz) * sm**2 * (1 - torch.exp(-zz)) / m,
        "trig": torch.exp(zz) * sm**-2 * (1 - torch.exp(-ww)) ** 2 / (2 * m),
    }
    paper["hyperbolic"] = 0.5 * (1 - torch.exp(-zz)) * paper["positive"]
    for kind, value in paper.items():
        torch.testing.assert_close(theory_kernel_mse(kind, x, y, m), value)
    # A → 0 turns FAVOR++ into FAVOR+ (and its antithetic form into hyperbolic)
    tiny = torch.tensor(-1e-12, dtype=F64)
    torch.testing.assert_close(theory_kernel_mse("oprf", x, y, m, tiny), paper["positive"])
    torch.testing.assert_close(theory_kernel_mse("hyperbolic_oprf", x, y, m, tiny), paper["hyperbolic"])


@pytest.mark.parametrize(
    "kind,m,scale,draws",
    [("positive", 5, 0.15, 20000), ("hyperbolic_oprf", 4, 0.2, 5000)],
    ids=["positive-m5", "hyperbolic_oprf-m4"],
)
def test_orthogonal_features_have_lower_mse_than_iid_when_m_le_d(kind, m, scale, draws):
    # Theorem 2 of Choromanski et al. (2021): positive features, m ≤ d (here d = 8).  Also holds
    # for the antithetic FAVOR++ kind added here.  Aligned pairs (large ‖x + y‖) gain most, but
    # the positive kind's squared error is heavy-tailed there, hence the moderate ‖x + y‖² ≈ 1.3.
    g = gen(20)
    x = torch.randn(8, generator=g, dtype=F64) * scale
    y = x + torch.randn(8, generator=g, dtype=F64) * scale / 2
    exact = torch.exp(x @ y)
    results = {}
    for proj in ("iid", "orthogonal"):
        est, _ = _many_estimates(kind, x, y, m=m, draws=draws, projection=proj, seed=21)
        sq = (est - exact) ** 2
        results[proj] = (float(sq.mean()), float(sq.std() / math.sqrt(draws)))
    (mse_iid, se_iid), (mse_ort, se_ort) = results["iid"], results["orthogonal"]
    assert mse_iid - mse_ort > 3 * math.hypot(se_iid, se_ort), results


def test_oprf_has_lower_mse_than_positive_on_the_default_inputs():
    default = ApproxConfig()
    config = ApproxConfig(length=1024, budgets=(64,), features=("positive", "oprf"),
                          projections=("iid", "orthogonal"), seeds=6, rows=128, pairs=2048)
    assert (config.sigma, config.dim, config.distribution) == (default.sigma, default.dim, default.distribution)
    result = run_sweep(config, progress=False)
    cells = {(r["features"], r["projection"]): r for r in result["results"]}
    for proj in ("iid", "orthogonal"):
        for quantity in ("attention_mse", "kernel_mse"):
            assert cells["oprf", proj][quantity]["mean"] < cells["positive", proj][quantity]["mean"], (proj, quantity)
    # and in closed form, averaged over the same kind of pairs
    assert cells["oprf", "iid"]["theory_kernel_mse"]["mean"] < cells["positive", "iid"]["theory_kernel_mse"]["mean"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", favor.FEATURES)
def test_measure_uses_the_same_estimate_as_favor_attention(kind, causal):
    q, k, v = draw_inputs(37, 6, sigma=0.8, value_dim=5, generator=gen(30))
    w = favor.gaussian_orthogonal_matrix(10, 6, generator=gen(31), dtype=F64)
    r = measure(q, k, v, w, kind, causal=causal)
    out = favor.favor_attention(q[None, None], k[None, None], v[None, None], w, features=kind, is_causal=causal)[0, 0]
    exact = softmax_attention(q[None, None], k[None, None], v[None, None], is_causal=causal)[0, 0]
    assert r["output_rel_error"] == pytest.approx(float((out - exact).norm() / exact.norm()), rel=1e-9)
    a = explicit_attention_matrix(q[None, None], k[None, None], w, features=kind, is_causal=causal)
    p = torch.softmax(q @ k.T / math.sqrt(6) + (torch.ones(37, 37).triu(1) * -1e30 if causal else 0), -1)
    assert r["attention_mse"] == pytest.approx(float(((a[0, 0] - p) ** 2).mean()), rel=1e-9)


@pytest.mark.parametrize("key_estimator", ["normalized", "calibrated"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", ["positive", "hyperbolic_oprf"])
def test_measure_with_a_key_estimator_uses_favor_attentions_estimate(kind, causal, key_estimator):
    q, k, v = draw_inputs(37, 6, sigma=0.8, value_dim=5, generator=gen(32))
    w = favor.gaussian_orthogonal_matrix(10, 6, generator=gen(33), dtype=F64)
    r = measure(q, k, v, w, kind, causal=causal, key_estimator=key_estimator)
    out = favor.favor_attention(q[None, None], k[None, None], v[None, None], w, features=kind, is_causal=causal,
                                key_estimator=key_estimator)[0, 0]
    exact = softmax_attention(q[None, None], k[None, None], v[None, None], is_causal=causal)[0, 0]
    assert r["output_rel_error"] == pytest.approx(float((out - exact).norm() / exact.norm()), rel=1e-9)
    plain = measure(q, k, v, w, kind, causal=causal)
    assert r["output_rel_error"] != plain["output_rel_error"]
    with pytest.raises(ValueError, match="plain key features"):
        measure(q, k, v, w, kind, causal=causal, key_estimator=key_estimator, theory=True)


def test_sweep_with_calibrated_keys_records_it_and_skips_the_closed_form():
    config = ApproxConfig(length=48, dim=4, budgets=(8,), seeds=2, rows=16, pairs=32, key_estimator="calibrated",
                          features=("positive", "hyperbolic_oprf"), projections=("iid", "orthogonal"))
    result = run_sweep(config, progress=False)
    assert result["config"]["key_estimator"] == "calibrated"
    assert all("theory_kernel_mse" not in r for r in result["results"])
    assert "(calibrated keys)" in format_table(result)
    with pytest.raises(ValueError, match="plain key features"):
        format_theory_table(result)


@pytest.mark.parametrize("dist", ["normal", "uniform", "laplace"])
def test_inputs_have_the_requested_spread(dist):
    q, k, v = draw_inputs(4000, 8, distribution=dist, sigma=0.7, value_dim=3, generator=gen(40))
    assert v.shape == (4000, 3)
    for t in (q, k, v):
        assert abs(float(t.std()) - 0.7) < 0.02 and abs(float(t.mean())) < 0.02


def test_sweep_structure_and_table():
    config = ApproxConfig(length=48, dim=4, budgets=(4, 8), seeds=2, rows=16, pairs=32, causal=True)
    result = run_sweep(config, progress=False)
    n = len(favor.FEATURES) * len(favor.PROJECTIONS) * 2
    assert len(result["results"]) == n
    for r in result["results"]:
        assert r["m"] == (r["budget"] // 2 if r["features"] in ("hyperbolic", "trig", "hyperbolic_oprf") else r["budget"])
        assert r["output_rel_error"]["mean"] > 0 and r["output_rel_error"]["std"] >= 0
        assert ("theory_kernel_mse" in r) == (r["projection"] == "iid")
    assert 1 <= result["input_statistics"]["max_weight_times_keys"]["mean"] <= 48
    table = format_table(result)
    assert "hyperbolic_oprf" in table and "M=8" in table
    assert "closed form" in format_theory_table(result)
    json.dumps(result)  # JSON-ready


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budgets=(3,)), "odd"),
        (dict(features=("softplus",)), "unknown feature kind"),
        (dict(projections=("sobol",)), "unknown projection"),
        (dict(distribution="cauchy"), "unknown distribution"),
        (dict(sigma=-1.0), "sigma"),
        (dict(seeds=0), "seeds"),
        (dict(budgets=(16, 64, 16)), "budgets lists 16 more than once"),
        (dict(projections=("iid", "iid")), "projections lists iid more than once"),
        (dict(features=("oprf", "trig", "oprf")), "features lists oprf more than once"),
        (dict(key_estimator="normalized"), "features='trig'"),
        (dict(key_estimator="exact", features=("positive",)), "unknown key_estimator 'exact'"),
    ],
    ids=["odd-budget", "bad-features", "bad-projection", "bad-dist", "bad-sigma", "no-seeds",
         "repeated-budget", "repeated-projection", "repeated-feature", "key-estimator-with-trig",
         "unknown-key-estimator"],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApproxConfig(**kwargs)


def test_cli_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli_main(["approx", "--quick", "--length", "64", "--budgets", "8,16", "--seeds", "2",
                     "--projections", "iid,orthogonal", "--against", "theory", "--json", str(out),
                     "--plot-dir", str(tmp_path / "fig"), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "output_rel_error" in text and "closed form" in text
    result = json.loads(out.read_text())
    assert result["config"]["length"] == 64 and result["config"]["seeds"] == 2
    for name in ("approx_iid.png", "approx_orthogonal.png", "approx_theory.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 1000


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--against", "theory", "--projections", "orthogonal", "--plot-dir", "x"], "iid"),
        (["--against", "theory"], "--plot-dir"),
        (["--features", "softplus"], "unknown feature kind"),
        (["--text", "x.txt"], "--text needs --model"),
        (["--against", "theory", "--plot-dir", "x", "--key-estimator", "calibrated"], "plain key features"),
        (["--key-estimator", "calibrated"], "features='trig'"),
    ],
    ids=["theory-no-iid", "theory-no-plot-dir", "bad-kind", "text-without-model", "theory-with-key-estimator",
         "key-estimator-with-trig"],
)
def test_cli_user_errors_exit_2(argv, match, capsys):
    assert cli_main(["approx", "--quick", *argv]) == 2
    assert match in capsys.readouterr().err
