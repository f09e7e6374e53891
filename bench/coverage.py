"""Coverage of qcbed's standard errors: how often the truth lies within 1 and 2 reported sigma.

Synthetic patterns with a known truth and exactly known noise, drawn again and again:

* ``cbed``: the shipped Si 111 systematic-row CBED (data/si_cbed: 200 kV, 3000 Å, ~1e4 counts per pixel,
  per-disk backgrounds, ideal counting detector), its expected counts simulated once on the pixels its ROI
  can reach, then Poisson counts per draw;
* ``larbed``: a Si LARBED stack (5 disks of the 111 row, 32 x 32 tilts, 1 Å^-1 from the [110] zone axis so
  that both shifts are determined, 900 Å, Voigt PSF sigma 1.5 / gamma 0.1 tilt steps, background 30 counts,
  ~1e4 counts), refined with its PSF, Poisson counts per draw, the true variance map; ROI 17 x 17 with padding 8
  (the truth's kernel reaches 4 sigma + 8 gamma = 6.8 steps: with padding 6 it lay outside what the padding
  holds and the PSF widths came out 2 sigma off);
* ``larbed_row`` (not run by default): the same stack in a systematic-row orientation (4 Å^-1 from the zone
  axis, as data/si_larbed), where the shift across the row is barely determined (sigma 1.8 steps) and its
  linearised error overstates the scatter (the fit flags it: stages.fine.SAMPLING_SIGMA_LIMIT_PX).

Each draw is refined as a user would: Levenberg-Marquardt from a start away from the truth (structure factors
at the IAM, 3 % above the truth's U(1-1-1), U(2-2-2) at 0; CBED: thickness 3 % off (from 5 %, 1 draw in 50
ended in a false minimum at chi^2/nu 55), shifts 0.4 / -0.3 px,
rotation +0.15 deg, gl +0.3 %; LARBED: thickness 2 % off, shifts 0.3 / -0.2 tilt steps, PSF 1.3 / 0.07
against 1.5 / 0.1; from 5 % off, its start geometry search lands in a neighbouring minimum, shift 1.75 steps),
with the ROI built at the start geometry.  For every refined parameter z = (value - truth) / sigma;
for correct errors |z| < 1 in 68.3 % and |z| < 2 in 95.4 % of the draws.  The table gives those fractions
per case and class (structure factors, geometry), with the binomial standard error, the mean and spread of
z per parameter, and chi^2 / nu_eff; a draw whose chi^2 / nu_eff fails a 5-sigma chi^2 test ended in another
minimum (the report flags it) and is counted apart.

Run:  .venv/bin/python bench/coverage.py [--draws 50] [--case cbed larbed] [--workers 2]
(on 2 cores about 25-60 s per CBED draw, 2 minutes per LARBED draw and 15 s per larbed_row draw per worker).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

G1 = (1, -1, -1)
G2 = (2, -2, -2)


# ------------------------------------------------------------------------------------------ cases
def _cbed_case():
    """(expected counts, truth dict, build(counts) -> (problem, truth values by parameter name))."""
    from stages import config as C
    from stages.load import load_pattern
    from stages.physics.pattern_geometry import PatternGeometry
    from stages.roi import build_roi, regions_from_config
    from stages.synthetic import Effects, make_cbed

    sys.path.insert(0, str(ROOT / "data"))
    from generate_examples import TILT0_XY, truth_model  # noqa: E402

    cfg = C.load_config(ROOT / "data" / "si_cbed" / "config.toml")
    truth = json.loads((ROOT / "data" / "si_cbed" / "si_cbed_truth.json").read_text())
    m_true = truth_model(cfg_crystal(cfg))
    pg_true = PatternGeometry(m_true.geometry, "cbed", gl_px=360.0, rotation_deg=20.0, centre_px=(285.3, 377.7),
                              tilt0=tuple(m_true.geometry.kt_from_xy(*TILT0_XY)))
    pattern0 = load_pattern(cfg.section("pattern"), cfg.base_dir)
    regions, padding = regions_from_config(cfg.section("roi"))
    disks = [tuple(d) for d in truth["disks"]]
    roi_true = build_roi(pattern0, pg_true, regions, C.roi_disks(cfg, pattern0), padding)
    # the pixels any sample can reach from the start or the truth (4x4 supports, shifts < 1 px): a box of 4 px
    H, W = pattern0.intensity.shape
    mask = np.zeros((H, W), bool)
    for d in range(roi_true.sizes["disk"]):
        for r, c in zip(roi_true.row.values[d], roi_true.col.values[d]):
            mask[max(int(r) - 4, 0):int(r) + 6, max(int(c) - 4, 0):int(c) + 6] = True
    eff = Effects(scale=4.0e5, background=[400.0, 600.0, 550.0, 700.0], noise="none")
    lam, _, _, _ = make_cbed(m_true, pg_true, (H, W), disks, 3000.0, disk_radius_px=30.0, eff=eff, pixels=mask)
    truth_values = {"U(1 -1 -1)": truth["U"]["1 -1 -1"][0], "U(2 -2 -2)": truth["U"]["2 -2 -2"][0],
                    "thickness": 3000.0, "gl": 360.0, "rotation": 20.0, "shift_row": 0.0, "shift_col": 0.0}
    pg_start = pg_true.with_(gl_px=360.0 * 1.003, rotation_deg=20.15, shift_px=(0.4, -0.3))

    def build(counts):
        pattern = pattern0.copy(deep=True)
        pattern["intensity"].values[...] = counts
        model = C.forward_model(cfg)
        roi = build_roi(pattern, pg_start, regions, C.roi_disks(cfg, pattern), padding)
        prob = C.fine_problem(cfg, model, pg_start, pattern, roi)
        prob.thickness0 = 0.97 * 3000.0
        return prob

    return lam, truth_values, build


def cfg_crystal(cfg):
    from stages import config as C

    return C.forward_model(cfg).crystal


LARBED_DISKS = [(0, 0, 0), G1, (-1, 1, 1), G2, (-2, 2, 2)]


def _larbed_case():
    """5 disks of the 111 row, 1.0 Å^-1 from the [110] zone axis: both shifts determined (sigma 0.025 / 0.006 steps)."""
    return _larbed_case_at(tilt0_xy=(-0.16, 1.0), g_max=2.0, sg_max=0.3)


def _larbed_row_case():
    """The same 5 disks in a systematic-row orientation (4 Å^-1 from the zone axis, as data/si_larbed): the shift
    across the row is barely determined (sigma 1.8 steps), below the pixel-scale noise structure of the samples."""
    return _larbed_case_at(tilt0_xy=(-0.16, 4.0))


def _larbed_case_at(tilt0_xy=(-0.16, 4.0), disks=LARBED_DISKS, g_max=3.0, sg_max=0.5):
    from stages.fine import FineProblem, sf_params_from_config
    from stages.physics.beams import Selection
    from stages.physics.crystal_io import load_crystal
    from stages.physics.gof import make_gof
    from stages.physics.pattern_geometry import PatternGeometry
    from stages.roi import Region, build_roi
    from stages.simulate import ForwardModel
    from stages.synthetic import Effects, make_larbed

    si = load_crystal(ROOT / "data" / "si.cif")
    sel = Selection(g_max=g_max, sg_max=sg_max, sg_strong=0.02)

    def model(**kw):
        return ForwardModel(si, 200.0, (1, 1, 0), x_axis=G1, absorption="proportional", absorption_fraction=0.02,
                            selection=sel, tile_invA=0.5, **kw)

    m_true = model()
    u111 = 0.97 * m_true.potential.iam([G1])[0].real
    m_true.potential.set(G1, U=u111)
    m_true.potential.set(G2, U=-1.0e-3)
    pg_true = PatternGeometry(m_true.geometry, "larbed", gl_px=40.0, rotation_deg=-10.0, centre_px=(15.5, 15.5),
                              tilt0=tuple(m_true.geometry.kt_from_xy(*tilt0_xy)))
    eff = Effects(scale=1e4, background=30.0, psf_sigma_px=1.5, psf_gamma_px=0.1, noise="none")
    lam, _, _, _ = make_larbed(m_true, pg_true, (32, 32), disks, 900.0, eff)
    truth_values = {"U(1 -1 -1)": float(u111), "U(2 -2 -2)": -1.0e-3, "thickness": 900.0, "shift_row": 0.0,
                    "shift_col": 0.0, "psf_sigma": 1.5, "psf_gamma": 0.1}
    pg_start = pg_true.with_(shift_px=(0.3, -0.2))
    d = np.asarray(disks)

    def build(counts):
        pattern = xr.Dataset({"intensity": (("disk", "y", "x"), counts),
                              "valid": (("disk", "y", "x"), np.isfinite(counts)),
                              "variance": (("disk", "y", "x"), np.maximum(lam, 1.0))},
                             coords={"h": ("disk", d[:, 0]), "k": ("disk", d[:, 1]), "l": ("disk", d[:, 2])},
                             attrs={"kind": "larbed"})
        m = model()
        roi = build_roi(pattern, pg_start, [Region(((-8, -8), (8, -8), (-8, 8)), (17, 17))], disks, padding=8)
        sf = sf_params_from_config(m, [{"hkl": list(G1), "refine": ["U"], "range_percent": 5},
                                       {"hkl": list(G2), "refine": ["U"], "U_range": [-2.0e-3, 0.0]}])
        return FineProblem(model=m, pg0=pg_start, pattern=pattern, roi=roi, gof=make_gof("Chi2_LARBED"), sf=sf,
                           thickness0=0.98 * 900.0, refine_geometry=("thickness", "shift", "psf"), psf0=(1.3, 0.07))

    return lam, truth_values, build


CASES = {"cbed": _cbed_case, "larbed": _larbed_case, "larbed_row": _larbed_row_case}
_STATE: dict = {}


def _draw(args):
    """One noise draw of a case, refined: {name: (value, sigma)}, chi2/nu_eff, eigen-solves, seconds."""
    from stages.fine import levenberg_marquardt

    case, seed = args
    if case not in _STATE:
        _STATE[case] = CASES[case]()
    lam, truth, build = _STATE[case]
    counts = np.random.default_rng(1000 + seed).poisson(lam).astype(float)
    t0 = time.perf_counter()
    prob = build(counts)
    res = levenberg_marquardt(prob)
    out = {n: (float(v), float(s)) for n, v, s in zip(res.names, res.values, res.sigma)}
    return {"seed": seed, "params": out, "truth": truth, "chi2_eff": res.sigma_info.get("chi2_effective"),
            "dof_eff": res.sigma_info.get("dof_effective"),
            "converged": bool(res.converged), "solves": int(res.counters["eigen_solves"]),
            "seconds": time.perf_counter() - t0}


def run_case(case: str, draws: int, workers: int = 1, seed0: int = 0) -> list[dict]:
    jobs = [(case, seed0 + i) for i in range(draws)]
    if workers <= 1:
        return [_draw(j) for j in jobs]
    import multiprocessing as mp

    # fork: the workers inherit the loaded module (the slow test loads this file by path, not as a package)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        return list(ex.map(_draw, jobs))


def linear_response(case: str, seeds) -> dict:
    """The linearised estimator at the truth, for the noise draws ``seeds`` (the same counts as :func:`_draw`'s):
    {"names", "sigma" (the reported errors at the truth, noise-free data), "sigma_linear" (the sandwich
    A^-1 J^T R J A^-1 alone: this estimator's own predicted errors), "z" (n_seeds, n_params)}.

    Per draw, z = -(A^-1 J^T r) / sigma: r the profiled weighted residuals of that draw's counts at the true
    parameters and the true sample positions, J the Jacobian the errors are made from
    (:func:`stages.fine.error_jacobian`, at the truth), A = J^T J.  This is the estimate a refinement reaches to
    first order, without the optimiser and without moving the samples over the noise (so the sampling
    parameters' z spread comes out below 1 by their resampling term, which the reported sigma includes).  One
    eigen-solve in all, then one closed-form fit per draw: thousands of draws pin down the first-order coverage
    to a fraction of a percent, and on the refined draws' seeds it measures how far those particular noise
    realisations sit from the expected coverage (:func:`control_variate`)."""
    from stages.fine import _jacobian, _uncertainties, error_jacobian, sample_correlation_terms

    if case not in _STATE:
        _STATE[case] = CASES[case]()
    lam, truth, build = _STATE[case]
    prob = build(np.array(lam, float))
    prob.initial_geometry = prob.geometry_start()
    g = {**prob.geometry_start(), **{n: truth[n] for n in prob.geometry_names}}
    v = np.array([truth[p.label] for p in prob.sf], float)
    sol = prob.solve(v, deriv_thickness=g["thickness"])
    fit = prob.gof_at(sol, g)
    sigma = _uncertainties(prob, v, g, sol, fit)[0]
    J, names, _, _ = error_jacobian(prob, sol, g, fit, _jacobian(prob, v, g, sol, fit)[0])
    inv = np.linalg.pinv(J.T @ J)
    gain = inv @ J.T
    # the linear estimator's own standard errors: the sandwich without the resampling term and the chi^2 factor
    meat = sample_correlation_terms(prob, sol, g, fit, J)[0]
    sigma_linear = np.sqrt(np.diag(inv @ meat @ inv))
    used = np.isfinite(fit.model)
    counts_in = prob.pattern["intensity"].values  # every image of the problem is a view of this array
    z = []
    for seed in seeds:
        counts_in[...] = np.random.default_rng(1000 + seed).poisson(lam)
        f = prob.gof_at(sol, g)
        if not np.array_equal(np.isfinite(f.model), used):
            raise RuntimeError(f"draw {seed}: the used samples changed with the noise")
        z.append(-(gain @ f.residual[used]) / sigma)
    return {"names": names, "sigma": sigma.tolist(), "sigma_linear": sigma_linear.tolist(), "z": np.array(z)}


def _within(z: np.ndarray) -> tuple[float, float]:
    return float(np.mean(np.abs(z) < 1)), float(np.mean(np.abs(z) < 2))


def control_variate(table: dict, lin_seeds: dict, lin_many: dict) -> dict:
    """Coverage of the refined draws corrected with the linearised estimator as a control variate, per class:
    refined(seeds) - linear(seeds) + linear(many draws).

    The refined draws' coverage scatters by the binomial error of a few dozen correlated z's (the structure
    factors of one draw are correlated with each other), and the linear estimator follows the refined one to a
    fraction of a sigma per draw (README, Uncertainties), so it sees the same realisation noise.  Subtracting the linear estimator's coverage on the same seeds and adding its
    coverage on many draws removes that realisation noise and keeps what the refinement adds beyond first order
    (an unbiased estimate of the refined coverage: the correction has mean zero)."""
    names = lin_seeds["names"]
    out = {}
    classes = {"structure factors": [n for n in names if n.startswith("U")],
               "geometry": [n for n in names if not n.startswith("U")], "all": names}
    for cls, ns in classes.items():
        cols = [names.index(n) for n in ns]
        s1, s2 = _within(lin_seeds["z"][:, cols])
        m1, m2 = _within(lin_many["z"][:, cols])
        c = table["classes"][cls]
        out[cls] = {"linear_seeds": (s1, s2), "linear_many": (m1, m2), "n_many": int(lin_many["z"].shape[0]),
                    "corrected": (c["within1"] - s1 + m1, c["within2"] - s2 + m2)}
    return out


def false_minimum(r: dict) -> bool:
    """A draw whose chi^2/nu_eff fails a chi^2 test at 5 standard deviations (1 + 5 sqrt(2/nu)): the refinement
    ended in another minimum (the report flags these: reduced chi^2 far above 1), not a statistical scatter."""
    return not (r["chi2_eff"] is not None and r["chi2_eff"] < 1.0 + 5.0 * math.sqrt(2.0 / max(r["dof_eff"] or 1.0, 1.0)))


def coverage_table(case: str, results: list[dict]) -> dict:
    """Fractions within 1 and 2 sigma per class and per parameter, from the draws of one case that did not end in
    a false minimum (:func:`false_minimum`, counted apart)."""
    false = [r["seed"] for r in results if false_minimum(r)]
    results = [r for r in results if not false_minimum(r)]
    names = list(results[0]["params"])
    z = {n: np.array([(r["params"][n][0] - r["truth"][n]) / r["params"][n][1] for r in results]) for n in names}
    classes = {"structure factors": [n for n in names if n.startswith("U")],
               "geometry": [n for n in names if not n.startswith("U")]}
    out = {"case": case, "draws": len(results), "false_minima": false, "seeds": [r["seed"] for r in results], "classes": {}, "params": {},
           "chi2_eff": [r["chi2_eff"] for r in results], "converged": sum(r["converged"] for r in results),
           "solves": float(np.mean([r["solves"] for r in results])),
           "seconds": float(np.mean([r["seconds"] for r in results]))}
    for cls, ns in list(classes.items()) + [("all", names)]:
        zz = np.concatenate([z[n] for n in ns])
        n = len(zz)
        out["classes"][cls] = {"n": n, "within1": float(np.mean(np.abs(zz) < 1)), "within2": float(np.mean(np.abs(zz) < 2)),
                               "se1": math.sqrt(0.683 * 0.317 / n), "se2": math.sqrt(0.954 * 0.046 / n)}
    for n in names:
        out["params"][n] = {"within1": float(np.mean(np.abs(z[n]) < 1)), "within2": float(np.mean(np.abs(z[n]) < 2)),
                            "mean_z": float(z[n].mean()), "std_z": float(z[n].std(ddof=1)) if len(z[n]) > 1 else float("nan")}
    return out


def print_table(tabs: list[dict]) -> None:
    print("\n| case | class | n | within 1 sigma | within 2 sigma |")
    print("| --- | --- | ---: | ---: | ---: |")
    for t in tabs:
        for cls, c in t["classes"].items():
            print(f"| {t['case']} ({t['draws']} draws) | {cls} | {c['n']} | {100 * c['within1']:.1f} % ± {100 * c['se1']:.1f} "
                  f"| {100 * c['within2']:.1f} % ± {100 * c['se2']:.1f} |")
    print("| expected | | | 68.3 % | 95.4 % |")
    for t in tabs:
        ce = np.array([c for c in t["chi2_eff"] if c is not None], float)
        if t["false_minima"]:
            print(f"\n{t['case']}: {len(t['false_minima'])} more draw(s) ended in a false minimum (chi^2/nu_eff above "
                  f"1 + 5 sqrt(2/nu), seeds {t['false_minima']}): not in the table")
        print(f"\n{t['case']}: chi2/nu_eff {ce.mean():.3f} ± {ce.std(ddof=1) if len(ce) > 1 else float('nan'):.3f} (mean ± spread "
              f"over draws); converged {t['converged']}/{t['draws']}; {t['solves']:.1f} eigen-solves and {t['seconds']:.0f} s per draw")
        print("  parameter: within 1 / 2 sigma, mean z, std z (z = (value - truth)/sigma; ideal 68 % / 95 %, 0, 1)")
        for n, p in t["params"].items():
            print(f"  {n:14s} {100 * p['within1']:5.1f} % {100 * p['within2']:5.1f} %  {p['mean_z']:+.2f}  {p['std_z']:.2f}")


def print_linear(tab: dict, cv: dict) -> None:
    print(f"\n{tab['case']}: the linearised estimator at the truth (stages.fine.error_jacobian) and the refined coverage "
          "corrected with it (refined - linear on the same seeds + linear on many draws)")
    print("| class | linear, same seeds | linear, many draws | refined, corrected |")
    print("| --- | ---: | ---: | ---: |")
    for cls, c in cv.items():
        (a1, a2), (b1, b2), (c1, c2) = c["linear_seeds"], c["linear_many"], c["corrected"]
        print(f"| {cls} | {100 * a1:.1f} % / {100 * a2:.1f} % | {100 * b1:.1f} % / {100 * b2:.1f} % ({c['n_many']} draws) "
              f"| {100 * c1:.1f} % / {100 * c2:.1f} % |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--seed0", type=int, default=0, help="first noise seed of the refined draws (default 0)")
    ap.add_argument("--case", nargs="+", default=["cbed", "larbed"], choices=list(CASES))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--linear", type=int, default=2000,
                    help="draws of the linearised estimator for the control variate (0: none; default 2000)")
    ap.add_argument("--json", help="write the tables (and every draw) to this file")
    a = ap.parse_args(argv)
    tabs, raw, cvs = [], {}, []
    t0 = time.time()
    for case in a.case:
        res = run_case(case, a.draws, a.workers, a.seed0)
        raw[case] = res
        tabs.append(coverage_table(case, res))
        print(f"{case}: {a.draws} draws in {time.time() - t0:.0f} s", flush=True)
        if a.linear:
            lin_seeds = linear_response(case, tabs[-1]["seeds"])
            lin_many = linear_response(case, range(100_000, 100_000 + a.linear))
            cvs.append(control_variate(tabs[-1], lin_seeds, lin_many))
    print_table(tabs)
    for t, cv in zip(tabs, cvs):
        print_linear(t, cv)
    if a.json:
        Path(a.json).write_text(json.dumps({"tables": tabs, "control_variate": cvs, "draws": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
