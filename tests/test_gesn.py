"""The real GeSn digital-LACBED data set (../shared/data/gesn-lacbed) through the whole pipeline.

The shipped config (data/gesn_lacbed/config.toml) compares the 17 independent images on every
2nd tilt step over +-56 steps; this test runs the same config on a smaller field (+-40 steps, the
same 2-step grid and PSF) with a short refinement (at most 4 Levenberg-Marquardt steps), about 20 minutes on 2
cores, and checks what the full run showed (numbers in the README and the issue note): the coarse
stage finds the thickness in 130-140 nm and aligns every image; IAM + Bird & King absorption + a
1.5-step Gaussian blur correlate at a mean ZNCC well above 0.9 on this smaller field; the
refinement does not lower it; the refined U_g stay within a few percent of the IAM, with
uncertainties; the beam probe takes the higher-order Laue zones (laue_zones = "auto"); the report shows
experimental and simulated disks.
"""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import xarray as xr

from stages import config as C
from stages import pipeline as P

from .conftest import DATA, SHARED

pytestmark = pytest.mark.slow

GESN = SHARED / "data" / "gesn-lacbed"


def _quiet(msg: str) -> None:
    print(msg, flush=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not GESN.is_dir():
        pytest.skip(f"{GESN} is not here (see data/gesn_lacbed/config.toml, pattern.data_source)")
    tmp = tmp_path_factory.mktemp("gesn")
    text = (DATA / "gesn_lacbed" / "config.toml").read_text()
    cfg = tomllib.loads(text)
    # the smaller field: +-40 tilt steps on the same 2-step grid
    text = text.replace("corners = [[-56.0, -56.0], [56.0, -56.0], [-56.0, 56.0]], samples = [57, 57]",
                        "corners = [[-40.0, -40.0], [40.0, -40.0], [-40.0, 40.0]], samples = [41, 41]")
    text = text.replace("box_px = 56.0", "box_px = 40.0").replace("max_iterations = 30", "max_iterations = 4")
    text = text.replace('file = "gesn.toml"', f'file = "{DATA / "gesn_lacbed" / "gesn.toml"}"')
    text = text.replace(f'files = "{cfg["pattern"]["files"]}"', f'files = "{GESN}/GeSn_*.dm3"')
    assert "samples = [41, 41]" in text and "max_iterations = 4" in text and str(GESN) in text
    path = tmp / "config.toml"
    path.write_text(text)
    plan = P.make_plan(C.validate_config(path), tmp / "results")
    status = P.run_all(plan, say=_quiet)
    return plan, status


def test_pipeline_runs_unattended(run):
    plan, status = run
    assert set(status) == {"load", "roi", "iam", "variance", "coarse", "fine", "report"}
    assert all(s == "done" for s in status.values())


def test_coarse_thickness_and_alignment(run):
    plan, _ = run
    co = xr.open_zarr(plan.store("coarse"), consolidated=False)
    t = float(co.attrs["thickness_A"])
    assert 1250.0 <= t <= 1400.0, t  # the start of the fine stage (measured 1283 Å on this field)
    geo = json.loads(co.attrs["geometry"])
    assert len(geo["disk_shift_px"]) == 16  # every image but the reference 0 0 0 aligned
    assert max(abs(v) for s in geo["disk_shift_px"].values() for v in s) < 4.0  # measured 3.5 px
    assert abs(geo["gl_px"] / 19.738 - 1) < 0.04  # the scan's nominal calibration, to its accuracy


def test_fit_quality_and_refined_values(run):
    plan, _ = run
    fi = xr.open_zarr(plan.store("fine"), consolidated=False)
    z0, z1 = float(fi.attrs["zncc_mean_start"]), float(fi.attrs["zncc_mean"])
    assert z0 > 0.9 and z1 >= z0 - 1e-3, (z0, z1)  # measured 0.913 -> 0.928 on this field
    assert np.all(fi.zncc.values > 0.6)  # measured >= 0.66 (the weakest disk on this smaller field)
    t = float(fi.value.sel(param="thickness"))
    assert 1300.0 <= t <= 1400.0, t  # the authors searched 130-140 nm; measured 1343 Å
    for name in ("U(1 1 1)", "U(2 2 0)", "U(0 0 4)", "U(1 1 3)"):
        v, s, x0 = (float(fi[k].sel(param=name)) for k in ("value", "sigma", "start"))
        lim = 0.10 if name == "U(1 1 1)" else 0.05  # the configured ranges (IAM +-10 %, +-5 %)
        assert abs(v / x0 - 1) < lim, (name, v, x0)
        assert 0 < s < 0.05 * abs(x0), (name, s)


def test_higher_order_laue_zones_chosen_and_recorded(run):
    """laue_zones = "auto": the beam probe measures the ZOLZ model against the HOLZ model on these zone-axis
    tilts (measured 5.8 % of a disk's maximum on the full field, 2 2 6), takes HOLZ, and the stores and the
    report say so; the refined U(111) stays inside its range (with ZOLZ it ran to the end of +-5 %)."""
    plan, _ = run
    fi = xr.open_zarr(plan.store("fine"), consolidated=False)
    pr, beams = json.loads(fi.attrs["beam_probe"]), json.loads(fi.attrs["beams"])
    assert pr["laue_zones_config"] == "auto" and pr["laue_zones"] == "holz"
    assert pr["holz_difference"] > 2 * pr["accuracy"] and pr["met"]
    assert beams["selection"]["holz"] is True and beams["n_bethe_max"] > 2000
    v, x0 = (float(fi[k].sel(param="U(1 1 1)")) for k in ("value", "start"))
    assert abs(v / x0 - 1) < 0.095, v / x0 - 1  # not at the +-10 % bound
    assert "every Laue zone (HOLZ)" in (plan.run_dir / "report" / "report.html").read_text()


def test_report_shows_the_disks(run):
    plan, _ = run
    rep = plan.run_dir / "report"
    res = json.loads((rep / "results.json").read_text())
    assert res["fit"]["zncc_mean"] is not None
    assert (rep / "report.html").stat().st_size > 10_000
    assert sorted(p.name for p in rep.glob("disks*.png"))
