"""The report (stages.report, `qcbed report`): every number in results.json, structure_factors.csv and
report.html equals the value in (or computed from) the zarr stores; the VESTA .hkl files; regeneration
without refitting; comparison of two runs; the headless-browser rendering; Prefect artifacts."""

import csv
import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from flows.cli import main
from stages import config as C
from stages import pipeline as P
from stages import report as R
from stages.physics import constants as K
from stages.physics import structure_factors as sf
from stages.physics.crystal_io import load_crystal
from stages.synthetic import write_small_larbed_run

from .conftest import DATA


def _open(path):
    return xr.open_zarr(path, consolidated=False, chunks=None).load()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny synthetic LARBED runs of the same crystal through the whole pipeline (report stage included),
    one outer iteration each: seed 2 refines U(1-1-1) and U(2-2-2) (zero in the IAM), seed 3 U(1-1-1)."""
    d = tmp_path_factory.mktemp("report")
    out = []
    for name, seed in (("seed2", 2), ("seed3", 3)):
        cfg = write_small_larbed_run(d / "data", name, seed=seed, size=16, roi_half=4, max_iterations=1,
                                     refine_u222=seed == 2)
        plan = P.make_plan(C.load_config(cfg), d / "results")
        P.write_run_record(plan, command=["qcbed", "run", str(cfg)])
        assert P.run_all(plan, say=lambda m: None)["report"] == "done"
        out.append(plan)
    return out


class _Cells(HTMLParser):
    """data-key -> (data-value, data-sigma, text) of report.html's table cells; <img> count."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self._cur = {}, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-key" in a:
            self._cur = (a["data-key"], a.get("data-value"), a.get("data-sigma"), [])
        if tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[3].append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cur is not None:
            k, v, s, text = self._cur
            self.cells[k] = (None if v is None else float(v), None if s is None else float(s), "".join(text))
            self._cur = None


def _displayed(text: str):
    """(value, half of the last displayed digit) of a number as the report prints it: '0.048833 ± 0.000032',
    '(-0.76 ± 3.6)e-5', '900.30', '-3.006 %', '12.3 s'."""
    t = text.replace("−", "-").strip()
    m = re.match(r"^\((-?[\d.]+) ± ([\d.]+)\)e(-?\d+)", t)
    if m:
        dec = len(m[1].split(".")[1]) if "." in m[1] else 0
        return float(m[1]) * 10 ** int(m[3]), 0.5 * 10 ** (int(m[3]) - dec)
    m = re.match(r"^([+-]?[\d.]+(?:e[+-]?\d+)?)", t)
    assert m, text
    num = m[1]
    if "e" in num:
        mant, ex = num.split("e")
        dec = len(mant.split(".")[1]) if "." in mant else 0
        return float(num), 0.5 * 10 ** (int(ex) - dec)
    dec = len(num.split(".")[1]) if "." in num else 0
    return float(num), 0.5 * 10 ** -dec


def _close_shown(text: str, exact: float, rel=1e-12):
    shown, half = _displayed(text)
    assert abs(shown - exact) <= half * (1 + 1e-9) + rel * abs(exact), (text, exact)


def test_numbers_match_the_stores(runs):
    plan = runs[0]
    run = plan.run_dir
    fine, iam = _open(run / "fine.zarr"), _open(run / "structure_factors.zarr")
    rep = run / "report"
    s = json.loads((rep / "results.json").read_text())
    names = fine.param.values.tolist()

    # results.json: the refined parameters, fit statistics and correlations, exactly
    assert [p["name"] for p in s["parameters"]] == names
    for i, p in enumerate(s["parameters"]):
        assert p["value"] == float(fine.value[i]) and p["sigma"] == float(fine.sigma[i]) and p["start"] == float(fine.start[i])
        assert p["range"] == [float(fine.range_lo[i]), float(fine.range_hi[i])]
        assert p["gauss_newton_step"] == float(fine.gauss_newton_step[i])
    # the search ranges: U(1-1-1) the configured IAM +-5 %, U(2-2-2) its U_range, the thickness the inner box
    # (+-30 % of the start geometry's), the shift +-15 px around it
    rng = {p["name"]: p["range"] for p in s["parameters"]}
    u0 = float(fine.start.sel(param="U(1 -1 -1)"))
    assert rng["U(1 -1 -1)"] == pytest.approx([u0 - 0.05 * abs(u0), u0 + 0.05 * abs(u0)], rel=1e-12)
    assert rng["U(2 -2 -2)"] == pytest.approx([-2.0e-3, 0.0], abs=1e-15)
    assert rng["thickness"][0] < float(fine.value.sel(param="thickness")) < rng["thickness"][1]
    assert rng["shift_row"][1] - rng["shift_row"][0] == pytest.approx(30.0)
    assert s["correlation"]["matrix"] == fine.correlation.values.tolist()
    for k in ("gof", "gof_start", "scale", "n_points", "dof"):
        assert s[k] == fine.attrs[k], k
    assert s["background"] == fine.background.values.tolist()
    assert s["counters"] == json.loads(fine.attrs["counters"])
    assert s["geometry"] == json.loads(fine.attrs["geometry"])

    # R factor per disk, from the fit arrays
    used = fine.fit_used.values.astype(bool)
    for i, d in enumerate(s["fit"]["disks"]):
        e, m = fine.fit_exp.values[i][used[i]], fine.fit_model.values[i][used[i]]
        assert d["r_factor"] == pytest.approx(np.abs(e - m).sum() / np.abs(e).sum(), rel=1e-13)
        assert d["n_points"] == int(used[i].sum())

    # structure factors: refined U from fine.zarr, IAM from structure_factors.zarr, V and Mott-Bethe F_x
    # recomputed here from an independently loaded crystal
    si = load_crystal(DATA / "si.cif")
    hv = float(iam.attrs["hv_kV"])
    rows = {(r["h"], r["k"], r["l"]): r for r in s["structure_factors"]}
    assert set(rows) == {(1, -1, -1), (2, -2, -2)}
    for hkl, r in rows.items():
        lab = f"U({' '.join(map(str, hkl))})"
        i = names.index(lab)
        assert r["U"] == float(fine.value[i]) and r["sigma_U"] == float(fine.sigma[i])
        j = int(np.nonzero((iam.h.values == hkl[0]) & (iam.k.values == hkl[1]) & (iam.l.values == hkl[2]))[0][0])
        u_iam = float(iam.U_re[j])
        assert r["U_iam"] == (0.0 if abs(u_iam) < 1e-12 else u_iam)
        assert r["d_A"] == float(iam.d_A[j])
        v = sf.vg_from_fe(sf.fe_from_ug(r["U"], si, hv), si)
        assert r["V"] == pytest.approx(v, rel=1e-12)
        fx = np.conj(sf.xray_from_ug(np.array([r["U"]]), si, [hkl], hv)[0])
        assert r["F_x_re"] == pytest.approx(fx.real, rel=1e-12) and abs(r["F_x_im"]) < 1e-9
        # the IAM F_x equals the store's (conjugated), and dF/dU = s^2 pi Omega / (gamma C_MB) analytically
        assert r["F_x_iam_re"] == pytest.approx(float(iam.F_x_re[j]), abs=1e-9)
        s2 = (0.5 * float(iam.g_invA[j])) ** 2
        dfdu = s2 * np.pi * si.volume_A3 / K.gamma_factor(hv) / K.MOTT_BETHE_A
        assert r["sigma_F_x"] == pytest.approx(dfdu * r["sigma_U"], rel=1e-10)
        assert r["sigma_V"] == pytest.approx(K.VG_PER_FE * np.pi / K.gamma_factor(hv) * r["sigma_U"], rel=1e-10)
        if r["U_iam"]:
            assert r["U_change_percent"] == pytest.approx(100 * (r["U"] - u_iam) / abs(u_iam), rel=1e-12)
        else:
            assert r["U_change_percent"] is None
        # proportional absorption of the refined U, as the forward model used it
        assert r["Uprime"] == pytest.approx(0.02 * r["U"], rel=1e-12) and r["Uprime_source"].startswith("proportional")
    # the note under the tables names the run's model
    assert "proportional absorption, U′ = f × the refined U_g" in (rep / "report.md").read_text()

    # structure_factors.csv: the same numbers, full precision
    with open(rep / "structure_factors.csv") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == R.SF_COLUMNS and len(table) == 2
    for t in table:
        r = rows[(int(t["h"]), int(t["k"]), int(t["l"]))]
        for c in R.SF_COLUMNS:
            if isinstance(r[c], float):
                assert float(t[c]) == r[c], c
            elif r[c] is None:
                assert t[c] == "", c
    with open(rep / "correlation.csv") as fh:
        corr = list(csv.reader(fh))
    assert corr[0][1:] == names
    assert np.array_equal(np.array([[float(x) for x in row[1:]] for row in corr[1:]]), fine.correlation.values)

    # report.html: exact values in data-value, and the displayed text is that value rounded
    cells = _Cells()
    cells.feed((rep / "report.html").read_text())
    for i, name in enumerate(names):
        v, sig, text = cells.cells[f"param/{name}/value"]
        assert v == float(fine.value[i]) and sig == float(fine.sigma[i])
        _close_shown(text, v)
        assert "±" in text
        _close_shown(text.split("±")[1] if "e" not in text else text, v if "e" in text else sig)
        assert cells.cells[f"param/{name}/start"][0] == float(fine.start[i])
        for b_i, b in enumerate(names):
            assert cells.cells[f"corr/{name}/{b}"][0] == float(fine.correlation[i, b_i])
    for hkl, r in rows.items():
        k = f"sf/{' '.join(map(str, hkl))}"
        for f in ("U", "U_iam", "V", "d_A", "F_x_re", "F_x_iam_re", "F_x_change", "Uprime"):
            v, _, text = cells.cells[f"{k}/{f}"]
            assert v == r[f], f
            _close_shown(text, v)
    for d in s["fit"]["disks"]:
        v, _, text = cells.cells[f"disk/{' '.join(map(str, d['hkl']))}/r_factor"]
        assert v == d["r_factor"]
        _close_shown(text, v)
    v, _, text = cells.cells["fit/gof"]
    assert v == fine.attrs["gof"]
    assert cells.cells["fit/dof"][0] == fine.attrs["dof"] and cells.cells["fit/n_points"][0] == fine.attrs["n_points"]
    assert cells.cells["counters/eigen_solves"][0] == json.loads(fine.attrs["counters"])["eigen_solves"]
    # self-contained: every image embedded, no external reference
    assert cells.images and all(src.startswith("data:image/png;base64,") for src in cells.images)
    html_text = (rep / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html_text)
    # report.md carries the same displayed values, and links the figures beside it
    md = (rep / "report.md").read_text()
    for name in names:
        assert cells.cells[f"param/{name}/value"][2] in md
    for png in s["figures"]:
        assert f"]({png})" in md and (rep / png).exists()
    # reproducibility block
    rp = s["reproducibility"]
    assert rp["config_sha256"] == R.sha256_text(plan.cfg.path.read_text())
    assert rp["scattering_table"] == iam.attrs["scattering_table"] and rp["absorption_model"] == iam.attrs["absorption_model"]
    assert {"numpy", "scipy", "xarray", "zarr", "prefect"} <= set(rp["versions"])
    assert rp["reproduce"] == f"qcbed run {plan.cfg.path} --results {run.parent}"
    assert json.loads((rep / "record.json").read_text())["stage_key"] == plan.keys["report"]
    assert R.report_key(run) == plan.keys["report"]


def test_vesta_hkl_files(runs):
    run = runs[0].run_dir
    iam = _open(run / "structure_factors.zarr")
    s = json.loads((run / "report" / "results.json").read_text())
    text = (run / "report" / "structure_factors.hkl").read_text().splitlines()
    assert text[2].split() == list(R.HKL_HEADER)
    rows = R.read_vesta_hkl(run / "report" / "structure_factors.hkl")
    got = {r["hkl"]: r for r in rows}
    refined = {(r["h"], r["k"], r["l"]): r for r in s["structure_factors"]}
    for hkl, r in refined.items():
        assert got[hkl]["F"] == pytest.approx(complex(r["F_x_re"], r["F_x_im"]), abs=1e-6)
        assert got[hkl]["sigma"] == pytest.approx(r["sigma_F_x"], abs=1e-6)
        assert got[hkl]["Fo"] == pytest.approx(abs(got[hkl]["F"]), abs=2e-6)
    # every other family: its IAM X-ray F (Mott-Bethe), conjugated into the crystallographic convention
    fam = {(int(a), int(b), int(c)) for a, b, c, rep in zip(iam.family_h.values, iam.family_k.values, iam.family_l.values,
                                                            iam.representative.values) if rep}
    n_other = 0
    for j in np.nonzero(iam.representative.values & ~iam.absent.values)[0]:
        hkl = (int(iam.h[j]), int(iam.k[j]), int(iam.l[j]))
        if hkl in ((1, 1, 1), (2, 2, 2)):  # families of the refined reflections: written as refined
            assert hkl not in got
            continue
        n_other += 1
        assert got[hkl]["F"] == pytest.approx(complex(float(iam.F_x_re[j]), -float(iam.F_x_im[j])), abs=1e-6)
        assert got[hkl]["sigma"] == 0.0
    assert len(rows) == n_other + len(refined) and len(fam) >= n_other
    d = {r["hkl"]: r for r in R.read_vesta_hkl(run / "report" / "deformation.hkl")}
    assert set(d) == set(refined)
    for hkl, r in refined.items():
        assert d[hkl]["F"].real == pytest.approx(r["F_x_re"] - r["F_x_iam_re"], abs=1e-6)


def test_report_regenerates_without_refit(runs, capsys):
    run = runs[0].run_dir
    before = json.loads((run / "report" / "results.json").read_text())
    fine_mtime = (run / "fine.zarr" / "zarr.json").stat().st_mtime_ns
    shutil.rmtree(run / "report")
    t0 = time.perf_counter()
    assert main(["report", str(run)]) == 0
    dt = time.perf_counter() - t0
    print(f"\nqcbed report regenerated {run.name} in {dt:.2f} s", file=__import__("sys").stderr)
    out = capsys.readouterr().out
    assert "report.html" in out
    assert dt < 30
    assert json.loads((run / "report" / "results.json").read_text()) == before
    assert (run / "fine.zarr" / "zarr.json").stat().st_mtime_ns == fine_mtime
    assert P.store_state(runs[0], "report") == "done"  # `qcbed run` still sees it up to date
    assert main(["report", str(run.parent / "nope")]) == 2


def test_consistency_statistics():
    c = R.consistency([1.0, 2.0], [1.0, 1.0])
    assert c["mean"] == 1.5 and c["sigma_mean"] == pytest.approx(1 / math.sqrt(2))
    assert c["chi2_red"] == pytest.approx(0.5) and c["scatter"] == pytest.approx(math.sqrt(0.5)) and c["consistent"]
    c = R.consistency([1.0, 2.0, 30.0], [0.1, 0.1, 0.1])
    assert c["consistent"] is False and c["birge"] > 10 and c["sigma_mean_external"] > c["sigma_mean"]
    c = R.consistency([1.0, 3.0], [float("nan"), 1.0])
    assert c["mean"] == 2.0 and not c["weighted"] and c["chi2_red"] is None


def test_compare_two_runs(runs, tmp_path, capsys):
    a, b = (p.run_dir for p in runs)
    out = tmp_path / "cmp"
    assert main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    term = capsys.readouterr().out
    c = json.loads((out / "compare.json").read_text())
    fa, fb = _open(a / "fine.zarr"), _open(b / "fine.zarr")
    p = next(x for x in c["parameters"] if x["name"] == "U(1 -1 -1)")
    va, vb = float(fa.value.sel(param="U(1 -1 -1)")), float(fb.value.sel(param="U(1 -1 -1)"))
    sa, sb = float(fa.sigma.sel(param="U(1 -1 -1)")), float(fb.sigma.sel(param="U(1 -1 -1)"))
    assert [x["value"] for x in p["values"]] == [va, vb] and [x["sigma"] for x in p["values"]] == [sa, sb]
    w = np.array([sa, sb]) ** -2.0
    assert p["mean"] == pytest.approx((w * [va, vb]).sum() / w.sum(), rel=1e-14)
    assert p["sigma_mean"] == pytest.approx(w.sum() ** -0.5, rel=1e-14)
    assert p["scatter"] == pytest.approx(np.std([va, vb], ddof=1), rel=1e-14)
    assert p["chi2_red"] == pytest.approx((w * (np.array([va, vb]) - p["mean"]) ** 2).sum(), rel=1e-12)
    # the same crystal: U(1-1-1) of both seeds agrees
    assert p["consistent"] is True
    assert any(x["name"] == "F_x(1 -1 -1)" for x in c["parameters"])
    # html: both values, mean and scatter
    cells = _Cells()
    cells.feed((out / "compare.html").read_text())
    k = "cmp/U(1 -1 -1)"
    assert cells.cells[f"{k}/seed2"][0] == va and cells.cells[f"{k}/seed3"][0] == vb
    assert cells.cells[f"{k}/mean"][0] == p["mean"] and cells.cells[f"{k}/scatter"][0] == p["scatter"]
    _close_shown(cells.cells[f"{k}/mean"][2], p["mean"])
    # terminal table: one line per parameter with both runs
    line = next(x for x in term.splitlines() if x.startswith("U(1 -1 -1)"))
    assert cells.cells[f"{k}/seed2"][2] in line and cells.cells[f"{k}/seed3"][2] in line
    assert "seed2" in term and "seed3" in term and "compare.html" in term
    with open(out / "compare.csv") as fh:
        rows = {r["parameter"]: r for r in csv.DictReader(fh)}
    assert float(rows["U(1 -1 -1)"]["seed2"]) == va and float(rows["U(1 -1 -1)"]["mean"]) == p["mean"]
    assert R.default_compare_dir([a, b]) == a.parent / "compare-seed2-seed3"


def test_uprime_note_follows_the_absorption_model():
    """The U′_g note under the structure-factor tables names the model the simulation used: Bird & King's
    U′_g does not follow the refined U_g (unlike proportional absorption)."""
    bk = R.sf_notes("bird_king: thermal diffuse scattering absorption (Bird & King, Acta Cryst. A46 (1990) 202)")
    assert bk[:-1] == R.SF_NOTES[:-1] and "Bird & King" in bk[-1] and "independent of the refined U_g" in bk[-1]
    assert "U′ = f × the refined U_g" in R.sf_notes("proportional: U'_g = 0.02 U_g")[-1]
    assert R.sf_notes("none: U'_g = 0")[-1].startswith("U′_g = 0")
    assert R.sf_notes(None) == R.SF_NOTES  # an older store without the attribute: the general note


def test_range_end_warning():
    """A refined value within 2 % of its search range's width from an end is flagged, and the report's
    check list names the parameter, the end, the range and the fix."""
    assert R.range_end(0.0645, 0.0644, 0.0712) == "lower" and R.range_end(0.0711, 0.0644, 0.0712) == "upper"
    assert R.range_end(0.0650, 0.0644, 0.0712) is None  # 9 % of the width from the lower end
    assert R.range_end(1.0, 1.0, 1.0) is None and R.range_end(float("nan"), 0.0, 1.0) is None
    fit = {"converged": True, "gof_name": "Chi2_LARBED", "gof": 1.0, "iterations": 3}
    params = [R.Parameter(name="U(1 1 1)", kind="structure_factor", units="Å^-2", value=0.0645, sigma=1e-5, start=0.068,
                          range=(0.0644, 0.0712), at_range_end="lower"),
              R.Parameter(name="thickness", kind="geometry", units="Å", value=1300.0, sigma=0.2, start=1300.0,
                          range=(900.0, 1700.0), at_range_end=None),
              R.Parameter(name="gl", kind="geometry", units="px", value=20.0, sigma=0.001, start=20.0)]  # older: no range
    w = R.check_list(params, **fit)
    assert len(w) == 1 and w[0].startswith("U(1 1 1) = 0.0645 ended at the lower end of its search range")
    assert "range_percent" in w[0]
    # a Gauss-Newton step of 3 sigma from the reported point: the optimum is further than the errors say
    params[1] = replace(params[1], gauss_newton_step=0.6)
    params[0] = replace(params[0], gauss_newton_step=1e-5)  # 1 sigma: not listed
    w = R.check_list(params, **fit)
    assert len(w) == 2 and "thickness 1300 → 1300.6 (3 σ)" in w[0] and "U(1 1 1)" not in w[0], w
    # a sampling parameter whose sigma moves the samples by more than the limit: named, with what to do
    w = R.check_list(params, **fit, barely_determined={"shift_row": 1.83}, barely_determined_limit_px=0.2)
    assert len(w) == 3 and w[0].startswith("Barely determined: shift_row (one σ moves the samples by 1.8 px)"), w
    assert "Above 0.2 px" in w[0] and "fix them" in w[0]


def test_fmt():
    assert R.fmt(0.0488452035, 5.8e-6) == "0.0488452 ± 0.0000058"
    assert R.fmt(2999.9395, 0.1477) == "2999.94 ± 0.15"
    assert R.fmt(1234.5, 36.0) == "1234 ± 36"  # round half to even of the formatter
    assert R.fmt(-7.6e-6, 3.6e-9) == "(-7.6000 ± 0.0036)e-6"
    assert R.fmt(-1.8e-18) == "0" and R.fmt(None) == "—" and R.fmt(3) == "3"
    assert R.fmt(0.050359) == "0.050359" and R.fmt(5.28026e-5) == "5.28026e-05"


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(b)), None)


def test_report_renders_in_a_headless_browser(runs, tmp_path):
    """report.html in a real headless browser: no script error, every embedded image decoded."""
    exe = _browser()
    if exe is None:
        pytest.skip("no chromium/chrome installed (CI installs Debian's chromium)")
    page = runs[0].run_dir / "report" / "report.html"
    n_img = len(json.loads((page.parent / "results.json").read_text())["figures"])
    assert n_img >= 3
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", res.stdout)
    assert body, res.stdout[:500]
    attrs = body.group(1)
    assert 'data-images-ok="true"' in attrs, attrs
    assert f'data-images="{n_img}/{n_img}"' in attrs, attrs
    assert 'data-errors="0"' in attrs, attrs
    shot = tmp_path / "page.png"
    res = subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                          f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", "--window-size=1200,3000",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.stat().st_size > 10000


def test_artifact_errors_do_not_fail_the_run(runs, monkeypatch):
    import logging

    import prefect.artifacts

    from flows.pipeline import artifact_key, publish_report_artifacts

    assert artifact_key("Si_CBED.2 run", "report") == "si-cbed-2-run-report"

    def boom(**kw):
        raise RuntimeError("no API")

    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", boom)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep(level=logging.WARNING)
    logging.getLogger("qcbed").addHandler(h)
    try:
        assert publish_report_artifacts(runs[0].run_dir) == []
    finally:
        logging.getLogger("qcbed").removeHandler(h)
    assert any("artifacts not published" in m and "no API" in m for m in seen)


@pytest.mark.slow
def test_prefect_artifacts(runs):
    """Under Prefect the run publishes its summary as a markdown and a table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import refine_pattern

    plan = runs[1]
    with prefect_test_harness(server_startup_timeout=120):
        out = refine_pattern(str(plan.cfg.path), str(plan.run_dir.parent))  # stores exist: every stage skipped
        assert out["report"] == "skipped"
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["seed3-report", "seed3-structure-factors"])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"seed3-report", "seed3-structure-factors"}
    assert by_key["seed3-report"].type == "markdown" and "U(1 -1 -1)" in by_key["seed3-report"].data
    table = by_key["seed3-structure-factors"].data
    table = json.loads(table) if isinstance(table, str) else table
    s = json.loads((plan.run_dir / "report" / "results.json").read_text())
    assert [r["U"] for r in table] == [r["U"] for r in s["structure_factors"]]


def test_acentric_and_centric_rows(tmp_path):
    """GaAs (F-43m): an acentric reflection refined as amplitude and phase, a centric one as a signed value;
    V and the Mott-Bethe F_x follow the refined complex U, σ(F_x) includes the phase error."""
    from stages.iam import iam_dataset
    from stages.physics.crystal_io import crystal_from_mapping
    from stages.simulate import ForwardModel

    gaas = crystal_from_mapping({"cell": [5.65] * 3 + [90] * 3, "spacegroup": "F -4 3 m",
                                 "atoms": [{"label": "Ga", "xyz": [0, 0, 0], "B": 0.62},
                                           {"label": "As", "xyz": [0.25, 0.25, 0.25], "B": 0.48}]})
    m = ForwardModel(gaas, 200.0, (1, -1, 0))
    iam = iam_dataset(m, extra_hkl=[[1, 1, 1], [2, 0, 0]])
    names = ["U_amp(1 1 1)", "U_phase(1 1 1)", "U(2 0 0)", "thickness"]
    vals, sig = np.array([0.03, 40.0, -0.02, 1000.0]), np.array([1e-4, 0.5, 2e-4, 3.0])
    fine = xr.Dataset({"value": ("param", vals), "sigma": ("param", sig), "start": ("param", vals),
                       "correlation": (("param", "param2"), np.eye(4)), "background": ("disk", np.zeros(1))},
                      coords={"param": names, "param2": names, "kind": ("param", ["structure_factor"] * 3 + ["geometry"]),
                              "units": ("param", ["Å^-2", "deg", "Å^-2", "Å"]), "h": ("disk", [0]), "k": ("disk", [0]),
                              "l": ("disk", [0])})
    rows = {(r.h, r.k, r.l): r for r in R.structure_factor_rows(R.RunStores(tmp_path, fine, iam, None, None))}
    r = rows[(1, 1, 1)]
    assert not r.centric and r.U == 0.03 and r.U_phase_deg == 40.0 and r.sigma_U_phase_deg == 0.5
    u = 0.03 * np.exp(1j * np.radians(40.0))
    fx = np.conj(sf.xray_from_ug(np.array([u]), gaas, [[1, 1, 1]], 200.0)[0])
    assert complex(r.F_x_re, r.F_x_im) == pytest.approx(fx, rel=1e-12)
    dfdu = abs(sf.xray_from_ug(np.array([1.0]), gaas, [[1, 1, 1]], 200.0)[0]
               - sf.xray_from_ug(np.array([0.0]), gaas, [[1, 1, 1]], 200.0)[0])
    assert r.sigma_F_x == pytest.approx(dfdu * math.hypot(1e-4, 0.03 * math.radians(0.5)), rel=1e-12)
    assert r.U_iam == pytest.approx(abs(m.potential.iam([[1, 1, 1]])[0]), rel=1e-12)
    c = rows[(2, 0, 0)]
    assert c.centric and c.U == -0.02 and c.F_x_im == 0.0
    assert c.Uprime_source == "none" and c.Uprime == 0.0


def test_old_or_damaged_fine_store_gives_one_message(runs, tmp_path, capsys):
    import shutil

    import zarr

    from flows.cli import main

    run = tmp_path / "old"
    shutil.copytree(runs[0].run_dir, run)
    g = zarr.open_group(str(run / "fine.zarr"), mode="r+")
    g.attrs["qcbed_version"] = "0.0.1"
    del g.attrs["qcbed_manifest"]  # stores of qcbed 0.0.1 had no manifest, nor the attribute saying so
    (run / "fine.zarr" / "qcbed_manifest.json").unlink()
    before = (run / "report" / "report.html").read_bytes()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "fine.zarr: was written by qcbed 0.0.1" in err and "qcbed run CONFIG" in err and err.count("\n") == 1
    (run / "fine.zarr" / "zarr.json").write_text("{ damaged")
    assert main(["report", str(run)]) == 2
    assert "fine.zarr" in capsys.readouterr().err
    assert (run / "report" / "report.html").read_bytes() == before  # the earlier report is untouched


def _zncc(e, s, u):
    out = []
    for ei, si, ui in zip(e, s, u):
        a, b = ei[ui] - ei[ui].mean(), si[ui] - si[ui].mean()
        out.append(float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())))
    return np.array(out)


def test_zncc_start_and_end(runs):
    """fine.zarr's ZNCC per disk: at the end, recomputed from its fit arrays; at the start, recomputed from
    an evaluation of the start structure factors (IAM) with the inner geometry the objective finds for
    them; both in results.json and report.html.  The start (U(1-1-1) = IAM, truth 0.97 IAM) correlates
    worse than the optimum."""
    from stages.fine import _fit_arrays

    plan = runs[1]
    run = plan.run_dir
    fine = _open(run / "fine.zarr")
    used = fine.fit_used.values.astype(bool)
    zn = _zncc(fine.fit_exp.values, fine.fit_sim.values, used)
    np.testing.assert_allclose(fine.zncc.values, zn, rtol=0, atol=1e-12)
    assert fine.zncc.dims == ("disk",) and "definition" in fine.zncc.attrs and fine.zncc.attrs["long_name"]
    assert fine.attrs["zncc_mean"] == pytest.approx(zn.mean(), abs=1e-12)

    prob = P.fine_problem(plan)
    x0 = prob.from_unit(prob.to_unit([p.x0 for p in prob.sf]))
    assert [p.x0 for p in prob.sf] == pytest.approx(list(fine.start.values[:len(prob.sf)]), rel=1e-15)
    sol = prob.solve(x0)
    _, g, fit = prob.inner(sol)
    e0, s0, u0 = _fit_arrays(prob, sol, g, fit)
    z0 = _zncc(e0, s0, u0)
    np.testing.assert_allclose(fine.zncc_start.values, z0, rtol=0, atol=1e-12)
    assert fine.attrs["zncc_mean_start"] == pytest.approx(z0.mean(), abs=1e-12)
    assert fine.attrs["zncc_mean_start"] < fine.attrs["zncc_mean"]

    s = json.loads((run / "report" / "results.json").read_text())
    assert s["fit"]["zncc_mean"] == fine.attrs["zncc_mean"] and s["fit"]["zncc_mean_start"] == fine.attrs["zncc_mean_start"]
    cells = _Cells()
    cells.feed((run / "report" / "report.html").read_text())
    md = (run / "report" / "report.md").read_text()
    assert "| ZNCC start | ZNCC end |" in md
    for i, d in enumerate(s["fit"]["disks"]):
        assert d["zncc"] == float(fine.zncc[i]) and d["zncc_start"] == float(fine.zncc_start[i])
        for f in ("zncc", "zncc_start"):
            v, _, text = cells.cells[f"disk/{' '.join(map(str, d['hkl']))}/{f}"]
            assert v == d[f]
            _close_shown(text, v)
    v, _, text = cells.cells["fit/zncc_mean"]
    assert v == fine.attrs["zncc_mean"] and text == (f"{R.fmt(fine.attrs['zncc_mean_start'], digits=5)} → "
                                                     f"{R.fmt(fine.attrs['zncc_mean'], digits=5)}")

    # a fine.zarr written before the ZNCC was recorded still reports: "—"
    st = R.load_stores(run)
    st.fine = st.fine.drop_vars(["zncc", "zncc_start"])
    for k in ("zncc_mean", "zncc_mean_start"):
        del st.fine.attrs[k]
    old = R.summarize(st)
    assert old.fit.zncc_mean is None and all(d.zncc is None for d in old.fit.disks)
    page = R.render_html(old, {})
    cells = _Cells()
    cells.feed(page)
    assert cells.cells["fit/zncc_mean"][2] == "—" and cells.cells["disk/0 0 0/zncc_start"][2] == "—"
    assert "| ZNCC start | ZNCC end |" in R.render_markdown(old)


def test_undefined_sigma_is_one_warning_with_the_reason():
    """A metric without a noise scale (XCorrelation): one check-list line with the reason, not one per parameter,
    and no Gauss-Newton comparison against a missing sigma."""
    reason = "1 - r is not a chi^2: its curvature carries no noise scale"
    params = [R.Parameter(name="U(1 1 1)", kind="structure_factor", units="Å^-2", value=0.0645, sigma=None,
                          start=0.068, gauss_newton_step=1e-4),
              R.Parameter(name="thickness", kind="geometry", units="Å", value=1300.0, sigma=None, start=1300.0)]
    w = R.check_list(params, converged=True, gof_name="XCorrelation", gof=0.01, iterations=3, sigma_defined=False,
                     sigma_definition=reason)
    assert w == [f"Standard errors are undefined: {reason}."], w


def test_results_json_is_the_typed_summary(runs):
    """results.json is RunSummary.to_json() of the run's stores: read back (RunSummary.from_dict) it gives the
    same records and the same text byte for byte; the records' field order is the files' column order."""
    run = runs[0].run_dir
    text = (run / "report" / "results.json").read_text()
    back = R.read_summary(run)
    assert back.to_json() == text
    assert isinstance(back.parameters[0], R.Parameter) and isinstance(back.structure_factors[0], R.StructureFactorRow)
    assert back.figures and replace(R.summarize(run), figures=back.figures) == back
    assert tuple(json.loads(text)["structure_factors"][0]) == R.SF_COLUMNS
    assert back.structure_factors[0].U == json.loads(text)["structure_factors"][0]["U"]
