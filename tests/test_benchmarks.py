"""benchmarks/attention.py --quick runs as a subprocess and writes the expected cases with finite
numbers (a smoke run: no timing assertions); benchmarks/plot.py turns that JSON into figures."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _variance_cuts():
    """benchmarks/variance_cuts.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import variance_cuts
    finally:
        sys.path.pop(0)
    return variance_cuts


def _assert_averages_to(draws, exact, label) -> None:
    """The mean of ``draws`` (n, ·) is within 4 standard errors (+1e-3) of ``exact``, relatively."""
    rel = ((draws.mean(0) - exact) / exact).abs().max()
    spread = (draws.std(0) / exact).max()
    assert rel < 4 * spread / draws.shape[0] ** 0.5 + 1e-3, (label, float(rel), float(spread))


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--quick",
                    "--methods", "favor", "sdpa", "--json", str(out)], check=True, timeout=300)
    return json.loads(out.read_text()), out


def test_quick_run_has_every_case_with_finite_numbers(quick_result):
    result, _ = quick_result
    got = {(c["method"], c["direction"], c["mode"], c["L"]) for c in result["cases"]}
    want = {(m, d, mode, L) for m in ("favor", "sdpa") for d in ("bidirectional", "causal")
            for mode in ("fwd", "fwd+bwd") for L in (64, 128)}
    assert got == want
    for c in result["cases"]:
        assert c["status"] == "ok"
        for key in ("median_s", "gflops", "fraction_of_matmul", "peak_extra_mib"):
            assert math.isfinite(c[key]), (c, key)
        assert c["median_s"] > 0 and c["peak_extra_mib"] >= 0
    assert math.isfinite(result["matmul_gflops"]) and result["matmul_gflops"] > 0
    assert result["machine"]["threads"] == 2
    methods = {row["method"] for row in result["decoding"]}
    assert "favor_attention_step" in methods
    assert all(math.isfinite(row["per_token_s"]) and row["per_token_s"] > 0 for row in result["decoding"])


def test_plot_writes_both_figures_and_a_table(quick_result, tmp_path):
    _, path = quick_result
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(path), "--out",
                          str(tmp_path), "--table"], check=True, capture_output=True, text=True, timeout=120)
    for name in ("benchmark_time.png", "benchmark_memory.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "| favor |" in res.stdout and "| sdpa |" in res.stdout


def test_targets_table_reads_the_json(quick_result):
    _, path = quick_result
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "targets.py"), str(path)], check=True,
                         capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "| target | measured | met |"
    # the quick sizes cannot decide the L=16384 targets: they say so instead of guessing
    assert any("not measured" in line and line.endswith("| n/a |") for line in lines)
    assert any("favor_attention_step" in line for line in lines)


def test_variance_cuts_smoke_run_every_estimator(tmp_path):
    """benchmarks/variance_cuts.py on a tiny setting: every estimator gives a finite error, and the
    biased ones are labelled as such."""
    variance_cuts = _variance_cuts()
    result = variance_cuts.run(variance_cuts.DEFAULT_ESTIMATORS, seeds=2, length=64, dim=16, sigma=0.5, budget=128)
    assert [r["estimator"] for r in result["rows"]] == list(variance_cuts.DEFAULT_ESTIMATORS)
    for r in result["rows"]:
        assert math.isfinite(r["mean"]) and r["mean"] > 0, r
        kind = r["estimator"].partition("/")[0].partition("*")[0]
        expected = r["estimator"] != "hyperbolic_oprf/sqrt_d" and kind not in {
            "taylor2", "taylor1_exact", "hyperbolic_oprf_keynorm", "hyperbolic_oprf_calibrated",
            "hyperbolic_oprf_calibrated_unclamped"}
        assert r["unbiased"] == ("nearly" if expected and r["estimator"].endswith("/hadamard") else expected)


def test_variance_cuts_unbiased_estimators_average_to_the_kernel():
    """Averaged over many draws, each unbiased experimental estimator's kernel matrix approaches
    exp(xᵀy) on a few fixed pairs (relative error of the mean well under its per-draw spread)."""
    import torch

    variance_cuts = _variance_cuts()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3
    y = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3
    exact = torch.exp(x @ y.T)
    for name in ("oprf_control", "maclaurin", "hyperbolic_oprf/mub", "hyperbolic_sderf", "hyperbolic_oprf/simplex",
                 "hyperbolic_oprf_keycv", "hyperbolic_oprf_qkcv", "hyperbolic_oprf_split*1.3"):
        draws = torch.stack([variance_cuts.kernel_matrix(name, x, y, 128, torch.Generator().manual_seed(s))
                             for s in range(400)])
        _assert_averages_to(draws, exact, name)


def test_variance_cuts_gerf_mean_is_the_closed_form_mean_feature():
    """The key-side control variate is unbiased only if ``_gerf_mean`` is E_ω[f(ω, z)] exactly:
    200,000 Gaussian ω pin the mean down to ~0.3 %, so a 2 % slip fails."""
    import torch

    variance_cuts = _variance_cuts()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.4
    w = torch.randn(200_000, 8, generator=g, dtype=torch.float64)
    for a in (0.0, -0.1):
        f = variance_cuts._gerf(z, w, a)  # (3, n)
        err = (f.mean(1) - variance_cuts._gerf_mean(z, a)).abs()
        assert (err < 4 * f.std(1) / w.shape[0] ** 0.5).all(), (a, err)
        assert (err / variance_cuts._gerf_mean(z, a) < 0.01).all(), (a, err)


def test_variance_cuts_complex_gerf_is_unbiased_and_fits_finite_parameters():
    """The complex generalised exponential features average to exp(xᵀy) for fixed complex (A, b₁)
    (i.i.d. ω, 400 draws), and the fitted parameters have a finite second moment (Re A < 1/8)."""
    import torch

    variance_cuts = _variance_cuts()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3
    y = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3
    exact = torch.exp(x @ y.T)
    a, b1 = variance_cuts.complex_gerf_parameters(x, y)
    assert a.real < 0.125 and b1.imag != 0  # the fit leaves the real (FAVOR++) line
    for a, b1 in ((a, b1), (-0.05 + 0.02j, 0.6 + 0.9j)):
        draws = torch.stack([variance_cuts.complex_gerf_kernel(
            x, y, torch.randn(128, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64), a, b1)
            for s in range(400)])
        _assert_averages_to(draws, exact, (a, b1))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_profile_smoke_run_splits_gemm_time(tmp_path, causal):
    """benchmarks/gemm_profile.py on a tiny case: JSON with the GEMM share and per-shape GEMM rates."""
    out = tmp_path / "prof.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gemm_profile.py"), "--L", "128", "--backward", "--json", str(out)]
    subprocess.run(cmd + (["--causal"] if causal else []), check=True, timeout=300, capture_output=True)
    prof = json.loads(out.read_text())
    assert 0 < prof["gemm_share"] < 1 and prof["gemm_self_ms"] > 0
    assert prof["gemms"] and all(g["kernel_gflops"] > 0 and g["alone_gflops"] > 0 for g in prof["gemms"])
    assert prof["top"] and prof["matmul_2048_gflops"] > 0


def test_quick_run_in_bfloat16_records_the_dtype(tmp_path):
    """--dtype bfloat16 (meant for GPUs; runs on CPU too): every case finite, the dtype recorded."""
    out = tmp_path / "bf16.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--quick", "--methods", "favor",
                    "sdpa", "--dtype", "bfloat16", "--json", str(out)], check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    assert result["shape"]["dtype"] == "bfloat16" and result["machine"]["device"] == "cpu"
    assert result["cases"] and all(c["status"] == "ok" and math.isfinite(c["median_s"]) for c in result["cases"])


def test_compare_reports_median_speedups(tmp_path):
    """benchmarks/compare.py: per case, the median over runs of each set and their ratio."""
    def run(name, ms):
        case = {"method": "favor", "status": "ok", "direction": "causal", "mode": "fwd", "L": 512, "median_s": ms / 1e3}
        (tmp_path / name).write_text(json.dumps({"cases": [case, dict(case, method="sdpa")]}))
        return str(tmp_path / name)

    before = [run(f"b{i}.json", ms) for i, ms in enumerate((20.0, 30.0, 22.0))]
    after = [run(f"a{i}.json", ms) for i, ms in enumerate((10.0, 11.0, 40.0))]
    out = tmp_path / "summary.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--before", *before, "--after", *after,
                    "--json", str(out)], check=True, timeout=60, capture_output=True)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["before_median_ms"], row["after_median_ms"]) == pytest.approx((22.0, 11.0))
    assert row["speedup"] == pytest.approx(2.0)


def test_projection_bias_script_writes_its_json(tmp_path):
    """benchmarks/projection_bias.py on a tiny setting: one row per kind and d, finite ratios."""
    out = tmp_path / "bias.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "projection_bias.py"), "--dims", "4", "--draws", "20",
                    "--json", str(out)], check=True, timeout=120, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["projection"], r["d"]) for r in rows] == [("orthogonal", 4), ("hadamard", 4), ("givens", 4)]
    assert all(0 < r["axis_ratio"] < 10 and 0 < r["fourth_moment_ratio"] < 10 for r in rows)


def test_variance_cuts_estimators_stay_within_their_feature_budget():
    """Every estimator's L×L kernel matrix has rank ≤ the budget of output features, so the table
    compares them at an equal budget (oprf_control once counted its exact corrections as d + 1
    features where they take 2(d + 1))."""
    import torch

    variance_cuts = _variance_cuts()
    g = torch.Generator().manual_seed(3)
    x, y = (0.5 * torch.randn(192, 8, generator=g, dtype=torch.float64) / 8 ** 0.25 for _ in range(2))
    for name in variance_cuts.DEFAULT_ESTIMATORS:
        k = variance_cuts.kernel_matrix(name, x, y, 128, torch.Generator().manual_seed(0))
        assert int(torch.linalg.matrix_rank(k)) <= 128, name


def test_key_estimator_bias_script_writes_its_json(tmp_path):
    """benchmarks/key_estimator_bias.py on a tiny setting: one row per key estimator and budget,
    finite numbers, and the plain estimator's kernel bias within a few standard errors of 0."""
    out = tmp_path / "bias.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "key_estimator_bias.py"), "--draws", "40", "--budgets", "16",
                    "--length", "64", "--dim", "8", "--pairs", "256", "--rows", "32", "--json", str(out)],
                   check=True, timeout=120, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["key_estimator"] for r in rows] == ["plain", "normalized", "calibrated"]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert 0 <= r["output_bias"] <= r["output_rel_error"] * 1.5, r
        assert r["output_bias_net"] ** 2 == pytest.approx(max(r["output_bias"] ** 2 - r["output_bias_noise"] ** 2, 0))
    plain = rows[0]
    assert abs(plain["kernel_bias"]) < 4 * plain["kernel_bias_se"] + 1e-12, plain


def test_plot_key_estimators_draws_one_line_per_estimator(tmp_path):
    """benchmarks/plot_key_estimators.py turns favor approx JSON for each key estimator into a PNG,
    and refuses files that differ in more than the estimator."""
    from favor.approx import ApproxConfig, run_sweep

    paths = []
    for estimator in ("plain", "calibrated"):
        config = ApproxConfig(length=32, dim=4, budgets=(4, 8), seeds=2, rows=8, pairs=16, key_estimator=estimator,
                              features=("positive",), projections=("orthogonal",))
        paths.append(tmp_path / f"{estimator}.json")
        paths[-1].write_text(json.dumps(run_sweep(config, progress=False)))
    script = str(ROOT / "benchmarks" / "plot_key_estimators.py")
    subprocess.run([sys.executable, script, *map(str, paths), "--out", str(tmp_path / "k.png")],
                   check=True, timeout=120, capture_output=True)
    assert (tmp_path / "k.png").stat().st_size > 1000
    other = ApproxConfig(length=32, dim=4, budgets=(4, 8), seeds=3, rows=8, pairs=16, key_estimator="normalized",
                         features=("positive",), projections=("orthogonal",))
    (tmp_path / "other.json").write_text(json.dumps(run_sweep(other, progress=False)))
    bad = subprocess.run([sys.executable, script, str(paths[0]), str(tmp_path / "other.json"), "--out",
                          str(tmp_path / "bad.png")], timeout=120, capture_output=True, text=True)
    assert bad.returncode != 0 and "differ in more than" in bad.stderr
    missing = subprocess.run([sys.executable, script, *map(str, paths), "--projection", "iid", "--out",
                              str(tmp_path / "bad.png")], timeout=120, capture_output=True, text=True)
    assert missing.returncode != 0 and "--projection iid is not in" in missing.stderr


def test_approx_per_head_keeps_every_heads_value(tmp_path):
    """benchmarks/approx_per_head.py on a one-step checkpoint: 16 per-head values per cell and
    estimator, and the heads worse than plain listed for the non-plain ones."""
    from favor.cli import main

    run = tmp_path / "lm"
    assert main(["train", "--batch-size", "2", "--seq-len", "16", "--d-model", "8", "--n-heads", "2",
                 "--n-layers", "1", "--mlp-ratio", "2", "--nb-features", "4", "--eval-batches", "1",
                 "--warmup-steps", "1", "--threads", "1", "--no-progress", "--steps", "1", "--out", str(run)]) == 0
    out = tmp_path / "heads.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "approx_per_head.py"), "--model", str(run),
                    "--length", "16", "--seeds", "4", "--json", str(out)], check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 * 3  # features x budgets x estimators
    for r in rows:
        assert len(r["output_rel_error"]) == 4 and all(math.isfinite(v) for v in r["output_rel_error"])
        assert r["mean"] == pytest.approx(sum(r["output_rel_error"]) / 4)
        if r["key_estimator"] == "plain":
            assert r["seeds_worse_than_plain"] == []
