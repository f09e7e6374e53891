"""Synthetic patterns sampled through the ROI at the true geometry reproduce the forward model."""

import numpy as np
import pytest
import xarray as xr

from stages.errors import QcbedInputError
from stages.physics.beams import Selection
from stages.physics.pattern_geometry import PatternGeometry
from stages.roi import Region, build_roi
from stages.simulate import ForwardModel, simulate
from stages.synthetic import Effects, make_cbed, make_larbed

G = (1, -1, -1)
DISKS = [(0, 0, 0), (1, -1, -1), (-1, 1, 1), (2, -2, -2)]


def _model(si, tile=0.2):
    # A small beam set keeps the tests fast; synthesis and comparison use the same model.  The
    # patterns lie inside one tile of the tilt plane, so the comparison measures interpolation only
    # (adjacent tiles have their own beam sets: with this small selection their seams are ~0.1%).
    return ForwardModel(si, 200.0, (1, 1, 0), x_axis=G, absorption="proportional", absorption_fraction=0.03,
                        selection=Selection(g_max=3.0, sg_max=0.5, sg_strong=0.02), tile_invA=tile)


def _pattern_ds(counts, kind, disks=None):
    if kind == "cbed":
        return xr.Dataset({"intensity": (("y", "x"), counts), "valid": (("y", "x"), np.isfinite(counts))},
                          attrs={"kind": "cbed"})
    d = np.asarray(disks)
    return xr.Dataset({"intensity": (("disk", "y", "x"), counts), "valid": (("disk", "y", "x"), np.isfinite(counts))},
                      coords={"h": ("disk", d[:, 0]), "k": ("disk", d[:, 1]), "l": ("disk", d[:, 2])},
                      attrs={"kind": "larbed"})


def _compare(model, roi, thickness, scale):
    sim = simulate(model, [thickness], kt=roi.kt.values, out_hkl=np.stack([roi.h, roi.k, roi.l], 1))
    s = sim.intensity.values[:, 0, :].T  # (disk, point)
    e = roi.intensity.values / scale
    ok = roi.valid.values
    assert ok.sum() > 0.9 * roi.included.values.sum()
    return np.max(np.abs(e - s)[ok] / np.repeat(s.max(axis=1, keepdims=True), s.shape[1], 1)[ok])


def test_cbed_noise_free_matches_simulation_at_roi(si):
    m = _model(si, tile=0.05)
    geo = m.geometry
    tilt0 = geo.kt_from_xy(-0.16, 1.2)  # 111 row near the Bragg condition (|g|/2 = 0.159), 1.7° off the zone
    pg = PatternGeometry(geo, "cbed", gl_px=300.0, rotation_deg=2.0, centre_px=(40.3, 330.6), tilt0=tuple(tilt0),
                         disk_shift_px={(2, -2, -2): (0.35, -0.6)})
    counts, ideal, _, truth = make_cbed(m, pg, (80, 960), DISKS, 1500.0, disk_radius_px=11.0, eff=Effects(scale=1e4))
    assert counts.shape == (80, 960) and truth["thickness_A"] == 1500.0
    roi = build_roi(_pattern_ds(counts, "cbed"), pg, [Region(((-7, -2), (7, -2), (-7, 3)), (29, 6))], DISKS)
    err = _compare(m, roi, 1500.0, 1e4)
    assert err < 1e-3, err


def test_larbed_noise_free_matches_simulation_at_roi(si):
    m = _model(si)
    geo = m.geometry
    tilt0 = geo.kt_from_xy(-0.2, 1.0)
    # 80 tilt steps per |g_111|: 0.004 1/Å per pixel (at 40 steps the interpolation error is 0.4%)
    pg = PatternGeometry(geo, "larbed", gl_px=80.0, rotation_deg=-7.0, centre_px=(15.5, 16.0), tilt0=tuple(tilt0))
    counts, ideal, _, truth = make_larbed(m, pg, (32, 32), DISKS, 800.0, eff=Effects(scale=5e3))
    roi = build_roi(_pattern_ds(counts, "larbed", DISKS), pg, [Region(((-11, -9), (11, -9), (-11, 9)), (23, 19))], DISKS)
    err = _compare(m, roi, 800.0, 5e3)
    assert err < 1e-3, err


def test_larbed_psf_and_noise(si):
    """The Voigt PSF conserves counts away from the edges; Poisson noise has the variance of the counts."""
    m = _model(si)
    pg = PatternGeometry(m.geometry, "larbed", gl_px=60.0, centre_px=(11.5, 11.5), tilt0=tuple(m.geometry.kt_from_xy(-0.2, 1.0)))
    sharp, ideal, _, _ = make_larbed(m, pg, (24, 24), DISKS[:2], 700.0, Effects(scale=1e3))
    blur, _, _, _ = make_larbed(m, pg, (24, 24), DISKS[:2], 700.0, Effects(scale=1e3, psf_sigma_px=2.0, psf_gamma_px=0.1))
    assert np.allclose(sharp, 1e3 * ideal)
    assert blur.sum() == pytest.approx(sharp.sum(), rel=0.05)  # flux moves across the edges only
    assert np.abs(np.diff(blur, axis=-1)).mean() < np.abs(np.diff(sharp, axis=-1)).mean()
    noisy, _, var, _ = make_larbed(m, pg, (24, 24), DISKS[:1], 700.0, Effects(scale=1e4, background=50.0, noise="poisson", seed=5))
    resid = (noisy - var) / np.sqrt(var)
    assert abs(resid.mean()) < 0.1 and resid.std() == pytest.approx(1.0, abs=0.1)


def test_roi_errors(si):
    m = _model(si)
    pg = PatternGeometry(m.geometry, "larbed", gl_px=30.0, centre_px=(15.5, 15.5))
    stack = np.ones((2, 32, 32))
    ds = _pattern_ds(stack, "larbed", DISKS[:2])
    with pytest.raises(QcbedInputError, match="outside the 32x32 pattern"):
        build_roi(ds, pg, [Region(((-10, 0), (30, 0), (-10, 5)), (5, 2))], DISKS[:2])
    with pytest.raises(QcbedInputError, match="no image"):
        build_roi(ds, pg, [Region(((-5, 0), (5, 0), (-5, 5)), (5, 2))], [(0, 0, 0), (2, -2, -2)])
    nan = ds.copy(deep=True)
    nan["intensity"][:] = np.nan
    nan["valid"][:] = False
    with pytest.raises(QcbedInputError, match="none of the"):
        build_roi(nan, pg, [Region(((-5, 0), (5, 0), (-5, 5)), (5, 2))], DISKS[:2])
    part = ds.copy(deep=True)
    part["valid"][1] = False
    with pytest.raises(QcbedInputError, match="disk 1 -1 -1"):
        build_roi(part, pg, [Region(((-5, 0), (5, 0), (-5, 5)), (5, 2))], DISKS[:2])


def test_roi_masks_and_padding(si):
    m = _model(si)
    pg = PatternGeometry(m.geometry, "larbed", gl_px=30.0, centre_px=(15.5, 15.5))
    stack = np.ones((2, 32, 32))
    stack[0, 15, 15] = np.nan
    roi = build_roi(_pattern_ds(stack, "larbed", DISKS[:2]), pg,
                    [Region(((-4, -4), (4, -4), (-4, 4)), (9, 9)), Region(((-2, 6), (2, 6), (0, 0)), (5, 1))],
                    DISKS[:2], padding=2, disk_mask=[[True, True], [False, True]])
    assert roi.sizes["point"] == 13 * 13 + 9 * 5
    assert int(roi.inner.sum()) == 81 + 5
    # the NaN pixel removes the 4x4 block of samples whose support touches it, only in disk 0
    assert int((roi.included & ~roi.valid).sum()) == 16
    assert not roi.included.values[0, roi.region.values == 1].any()
    assert roi.attrs["n_points_excluded"] == 16
