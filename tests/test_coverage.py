"""Coverage of the standard errors on synthetic data with a known truth (bench/coverage.py, fewer draws)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "coverage.py"


def _bench():
    import sys

    if "qcbed_bench_coverage" in sys.modules:
        return sys.modules["qcbed_bench_coverage"]
    spec = importlib.util.spec_from_file_location("qcbed_bench_coverage", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qcbed_bench_coverage"] = mod  # the worker processes find the draws' function by this name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sigma_covers_the_truth_cbed():
    """6 noise draws of the shipped CBED (7 refined parameters each: 42 z = (value - truth) / sigma), refined by
    Levenberg-Marquardt from a start away from the truth.  For correct errors 68.3 % of |z| < 1 and 95.4 % < 2;
    with 42 values the binomial standard errors are 7.2 % and 3.2 % (fewer independent ones: parameters of one
    draw are correlated), so the bounds are [45, 90] % within 1 sigma and >= 83 % within 2 (3 and 4 standard
    errors): errors 2x too small, as the rotation's and the shifts' were before the model-side Jacobian and the
    resampling term, give 38 % and 68 %.  50 draws (bench/coverage.py): 70.0 % and 97.1 %.  chi^2/nu_eff
    averages to 1 within 0.1 (spread per draw 0.08, over 6 draws 0.033: 3 standard errors)."""
    cv = _bench()
    res = cv.run_case("cbed", 6, workers=2, seed0=5)
    assert all(r["converged"] for r in res)
    t = cv.coverage_table("cbed", res)
    # a draw that ends in another minimum (chi^2/nu_eff far above 1: seed 4 of 50) is counted apart: none of seeds 5-10
    assert not t["false_minima"], t
    c = t["classes"]["all"]
    assert 0.45 <= c["within1"] <= 0.90 and c["within2"] >= 0.83, t
    assert abs(np.mean(t["chi2_eff"]) - 1.0) < 0.1, t["chi2_eff"]


@pytest.mark.slow
def test_sigma_covers_the_truth_larbed():
    """6 noise draws of the LARBED case near the zone axis (5 disks, PSF refined: 7 parameters, 42 z), the same
    bounds as CBED: [45, 90] % within 1 sigma and >= 83 % within 2.  50 draws (bench/coverage.py): 70.0 % and
    93.7 % (structure factors 61.0 / 89.0, from noise realisations that the linearised estimator covers 60 / 89 %
    where 2000 others give 68 / 96 %: see the README); seeds 5-10: 62 % and 98 %.  The structure factors alone (12 z, binomial standard errors 13 % and 6 %): >= 40 % within 1 sigma
    and >= 75 % within 2 (2 and 3 standard errors below 68 % and 95 %; seeds 5-10: 58 % and 92 %).  chi^2/nu_eff
    averages to 1 within 0.1 (spread per draw 0.031)."""
    cv = _bench()
    res = cv.run_case("larbed", 6, workers=2, seed0=5)
    assert all(r["converged"] for r in res)
    t = cv.coverage_table("larbed", res)
    assert not t["false_minima"], t
    c = t["classes"]["all"]
    assert 0.45 <= c["within1"] <= 0.90 and c["within2"] >= 0.83, t
    sf = t["classes"]["structure factors"]
    assert sf["within1"] >= 0.40 and sf["within2"] >= 0.75, t
    assert abs(np.mean(t["chi2_eff"]) - 1.0) < 0.1, t["chi2_eff"]


@pytest.mark.slow
def test_first_order_spread_is_the_sandwich_larbed():
    """The linearised estimator at the truth (bench/coverage.py linear_response: 300 Poisson draws of the LARBED
    case, one eigen-solve) scatters as the sandwich A^-1 J^T R J A^-1 predicts, in every parameter: the Jacobian
    and the samples' noise correlations R are right.  300 draws give the spread to 1/sqrt(2 x 300) = 4.1 %; the
    bound 0.88-1.12 is 3 of those.  (Measured, 2000 draws: 0.94-1.03.)  The reported sigma adds the resampling
    term of the sampling parameters on top: against it the shifts' z spread less (0.86 for shift_row)."""
    cv = _bench()
    lin = cv.linear_response("larbed", range(200_000, 200_300))
    ratio = lin["z"].std(axis=0, ddof=1) * np.array(lin["sigma"]) / np.array(lin["sigma_linear"])
    assert np.all((ratio > 0.88) & (ratio < 1.12)), dict(zip(lin["names"], ratio.round(3)))
    # structure factors and thickness unbiased to first order (2000 draws: |mean z| <= 0.05); the PSF widths are
    # not, by +0.33 / -0.25 sigma: the data's cubic interpolation at off-pixel samples acts as a slight blur of its own
    sf_t = [lin["names"].index(n) for n in ("U(1 -1 -1)", "U(2 -2 -2)", "thickness")]
    assert np.all(np.abs(lin["z"][:, sf_t].mean(axis=0)) < 3.5 / np.sqrt(300)), lin["z"].mean(axis=0)
