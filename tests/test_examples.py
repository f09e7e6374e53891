"""The shipped synthetic examples: configs load, ROIs sample them, and they agree with their truth."""

import json
import re

import numpy as np
import pytest
import xarray as xr

from flows.cli import main
from stages import config as C
from stages.errors import QcbedInputError
from stages.load import load_pattern
from stages.roi import build_roi, regions_from_config
from stages.simulate import simulate

from .conftest import DATA, truth_geometry


def _truth_model(cfg):
    truth = json.loads(next(cfg.base_dir.glob("*_truth.json")).read_text())
    model = C.forward_model(cfg)
    for key, (re, im) in truth["U"].items():
        model.potential.set(tuple(int(x) for x in key.split()), U=complex(re, im))
    return model, truth


def _prepare(name):
    """Config, model with the true U, truth, pattern, and the ROI sampled at the true geometry (the config
    starts elsewhere)."""
    cfg = C.load_config(DATA / name / "config.toml")
    model, truth = _truth_model(cfg)
    pattern = load_pattern(cfg.section("pattern"), cfg.base_dir)
    pg = truth_geometry(model, truth)
    regions, padding = regions_from_config(cfg.section("roi"))
    roi = build_roi(pattern, pg, regions, C.roi_disks(cfg, pattern), padding)
    return cfg, model, truth, pattern, roi


def test_cbed_example_agrees_with_truth():
    cfg, model, truth, pattern, roi = _prepare("si_cbed")
    assert pattern.intensity.shape == (440, 1130) and pattern.attrs["kind"] == "cbed"
    assert roi.attrs["n_points_valid"] == 4 * 190
    t = truth["thickness_A"]
    assert t == 3000.0 and C.thickness_of(cfg) != t
    sim = simulate(model, [t], kt=roi.kt.values, out_hkl=np.stack([roi.h, roi.k, roi.l], 1)).intensity.values[:, 0, :].T
    eff = truth["effects"]
    model_counts = eff["scale"] * sim + np.array(eff["background"])[:, None]
    resid = (roi.intensity.values - model_counts) / np.sqrt(model_counts)
    # Poisson noise only; interpolating between pixels averages noise (Keys weights: sum w^2 in [0.6, 1]),
    # so the normalised residuals have mean ~0 and rms between ~0.7 and 1
    assert abs(resid.mean()) < 0.1
    assert 0.6 < resid.std() < 1.1
    assert np.median(roi.intensity.values) > 5e3  # ~1e4 counts per pixel


def test_larbed_example_agrees_with_truth():
    from stages.physics.sampling import convolve_valid, voigt_kernel

    cfg, model, truth, pattern, roi = _prepare("si_larbed")
    assert pattern.intensity.shape == (5, 64, 64) and "variance" in pattern
    n = 21 + 2 * 9
    kt = roi.kt.values
    sim = simulate(model, [truth["thickness_A"]], kt=kt, out_hkl=np.stack([roi.h, roi.k, roi.l], 1)).intensity.values[:, 0, :].T
    eff = truth["effects"]
    kernel = voigt_kernel(eff["psf_sigma_px"], eff["psf_gamma_px"])  # display px = tilt steps = ROI steps here
    c = 9 - kernel.shape[0] // 2  # the padding beyond the kernel's reach
    blurred = convolve_valid(sim.reshape(5, n, n)[:, c:n - c, c:n - c], kernel)
    inner = roi.inner.values
    model_counts = eff["scale"] * blurred.reshape(5, -1) + eff["background"]
    resid = (roi.intensity.values[:, inner] - model_counts) / np.sqrt(roi.variance.values[:, inner])
    assert abs(resid.mean()) < 0.2 and resid.std() < 1.5


@pytest.mark.parametrize("name", ["si_cbed", "si_larbed"])
def test_example_config_starts_off_the_truth(name):
    """The shipped configs start where a user would before refinement (data/generate_examples.py): thickness
    5-10 % off, centre (= orientation) 0.3-1 px off, CBED gl 0.2-1 % and rotation 0.2-0.5 degrees off (LARBED:
    gl and rotation are the scan's calibration, not refined), structure factors from the IAM; the truth strictly
    inside every structure-factor range and on no coordinate of Nelder-Mead's initial simplex (u0 and u0 +-
    initial_step per axis, unit coordinates of the ranges), so neither optimiser starts on it."""
    from stages.fine import sf_params_from_config

    cfg = C.load_config(DATA / name / "config.toml")
    truth = json.loads(next(cfg.base_dir.glob("*_truth.json")).read_text())
    model = C.forward_model(cfg)
    pg, tg = C.pattern_geometry(cfg, model), truth["geometry"]
    assert 0.05 <= abs(C.thickness_of(cfg) / truth["thickness_A"] - 1) <= 0.10
    assert 0.3 <= np.hypot(*(np.array(pg.centre_px) - tg["centre_px"])) <= 1.0
    refined = cfg.section("refine")["geometry"]
    if pg.kind == "cbed":
        assert {"gl", "rotation", "shift"} <= set(refined)
        assert 0.002 <= abs(pg.gl_px / tg["gl_px"] - 1) <= 0.01
        assert 0.2 <= abs(pg.rotation_deg - tg["rotation_deg"]) <= 0.5
    else:
        assert "gl" not in refined and "rotation" not in refined
        assert (pg.gl_px, pg.rotation_deg) == (tg["gl_px"], tg["rotation_deg"])
        assert "psf" in refined and cfg.section("refine")["psf_sigma"] != truth["effects"]["psf_sigma_px"]
    sf = sf_params_from_config(model, cfg.section("refine")["reflections"])
    step = float(cfg.section("refine").get("initial_step", 0.1))
    iam = model.potential.iam([p.hkl for p in sf]).real
    for p, u_iam in zip(sf, iam):
        true = truth["U"][" ".join(map(str, p.hkl))][0]
        assert p.x0 == pytest.approx(max(min(u_iam, p.hi), p.lo), abs=1e-12)  # the start: the IAM
        u_true, u0 = (true - p.lo) / (p.hi - p.lo), (p.x0 - p.lo) / (p.hi - p.lo)
        assert 0.1 < u_true < 0.9, (p.label, u_true)
        vertex = u0 + step if u0 + step <= 1 else u0 - step
        assert min(abs(u_true - u0), abs(u_true - vertex)) > 0.05, (p.label, u_true, u0, vertex)


def test_prepare_command(tmp_path, capsys):
    assert main(["prepare", str(DATA / "si_larbed" / "config.toml"), "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "larbed 5x64x64" in out and "41x41" not in out
    roi = xr.open_zarr(tmp_path / "si_larbed" / "roi.zarr", consolidated=False)
    assert roi.sizes["point"] == 39 * 39 and int(roi.inner.sum()) == 21 * 21
    pat = xr.open_zarr(tmp_path / "si_larbed" / "pattern.zarr", consolidated=False)
    assert list(pat.h.values) == [0, 1, -1, 2, -2]


def test_bad_config(tmp_path):
    bad = tmp_path / "c.toml"
    text = (DATA / "si_cbed" / "config.toml").read_text().replace('file = "../si.cif"', f'file = "{DATA / "si.cif"}"')
    assert re.search(r"(?m)^gl_px = ", text)
    bad.write_text(re.sub(r"(?m)^gl_px = .*$", "gl_px = -360.0", text))
    cfg = C.load_config(bad)
    with pytest.raises(QcbedInputError, match="geometry.gl_px"):
        C.pattern_geometry(cfg, C.forward_model(cfg))
    bad.write_text(text.replace("[roi]", "[roi]\ncolour = 1"))
    with pytest.raises(QcbedInputError, match="roi.colour: unknown key"):
        C.load_config(bad)
    bad.write_text(text.replace('file = "si_cbed.npy"', 'file = "missing.npy"'))
    assert main(["prepare", str(bad), "--results", str(tmp_path)]) == 2
