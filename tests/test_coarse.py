"""Coarse refinement by correlation (stages/coarse.py), on synthetic patterns with a known truth.

Acceptance: from a start 10 % off in thickness and a few pixels off in orientation, thickness within
2 % and orientation within 1 pixel (a small LARBED case and the shipped CBED example); the
orientation fit is idempotent (a repeat from its result finds ~0 shift: PyExtal double-counts);
results are deterministic; gl changed by 3 % is recovered; the physics that re-solves (voltage,
Debye-Waller B, cell; slow) comes back from 1 kV, 20 % and 0.3 % off.
"""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from stages import coarse as CO
from stages import config as C
from stages.coarse import (coarse_cell, coarse_debye_waller, coarse_disk_shifts, coarse_gl,
                           coarse_orientation_thickness, coarse_voltage, crystal_system)
from stages.errors import QcbedInputError
from stages.load import load_pattern
from stages.physics.beams import Selection
from stages.physics.crystal import AtomSite, Crystal
from stages.physics.pattern_geometry import PatternGeometry
from stages.simulate import ForwardModel
from stages.synthetic import Effects, make_larbed

from .conftest import DATA, truth_geometry

G = (1, -1, -1)
DISKS = [(0, 0, 0), G, (-1, 1, 1), (2, -2, -2), (-2, 2, 2)]
OFFSET = (3.4, -2.6)  # display px: the orientation error of every start


def _larbed_ds(counts, disks) -> xr.Dataset:
    d = np.asarray(disks)
    return xr.Dataset({"intensity": (("disk", "y", "x"), counts), "valid": (("disk", "y", "x"), np.isfinite(counts))},
                      coords={"h": ("disk", d[:, 0]), "k": ("disk", d[:, 1]), "l": ("disk", d[:, 2])},
                      attrs={"kind": "larbed"})


def _moved(pg: PatternGeometry, xy) -> PatternGeometry:
    """pg with tilt0 set to the (true) tilt of display point xy: an orientation error of xy px."""
    return pg.with_(tilt0=tuple(pg.display_to_tilt(np.array([xy], float))[0]))


def _orientation_error_px(truth: PatternGeometry, pg: PatternGeometry) -> float:
    return float(np.hypot(*truth.tilt_to_display(np.asarray(pg.tilt0, float))))


def _small_model(si, **kw) -> ForwardModel:
    return ForwardModel(si, kw.pop("hv_kV", 200.0), (1, 1, 0), x_axis=G, absorption="proportional",
                        absorption_fraction=0.02, tile_invA=0.2,
                        selection=kw.pop("selection", Selection(g_max=3.0, sg_max=0.5, sg_strong=0.02)), **kw)


# --------------------------------------------------------------------------------------- fixtures
LARBED_T = 800.0
LARBED_ARGS = dict(box_px=12, search_px=6, thickness_bracket_A=(0.85 * 880.0, 1.15 * 880.0), step_px=1.0)


@pytest.fixture(scope="module")
def larbed(si):
    """Si LARBED 40 x 40 tilts, 1.7° off [110] near the 111 row (60 beams), 800 Å, Poisson noise;
    fitted from 880 Å and an orientation 4.3 px off."""
    m = _small_model(si)
    pg = PatternGeometry(m.geometry, "larbed", gl_px=40.0, rotation_deg=-35.0, centre_px=(19.6, 19.3),
                         tilt0=tuple(m.geometry.kt_from_xy(-0.16, 2.5)))
    counts, _, _, _ = make_larbed(m, pg, (40, 40), DISKS, LARBED_T,
                                  Effects(scale=2e4, background=20.0, noise="poisson", seed=3))
    ds = _larbed_ds(counts, DISKS)
    start = _moved(pg, OFFSET)
    fit = coarse_orientation_thickness(m, start, ds, DISKS, **LARBED_ARGS)
    return SimpleNamespace(model=m, pg=pg, pattern=ds, start=start, fit=fit)


@pytest.fixture(scope="module")
def cbed():
    """The shipped CBED example (data/si_cbed), model from its config, true U applied, the true geometry
    (the config starts elsewhere)."""
    cfg = C.load_config(DATA / "si_cbed" / "config.toml")
    truth = json.loads((DATA / "si_cbed" / "si_cbed_truth.json").read_text())
    model = C.forward_model(cfg)
    for key, (re, im) in truth["U"].items():
        model.potential.set(tuple(int(x) for x in key.split()), U=complex(re, im))
    pattern = load_pattern(cfg.section("pattern"), cfg.base_dir)
    pg = truth_geometry(model, truth)
    return SimpleNamespace(model=model, pg=pg, pattern=pattern, disks=C.roi_disks(cfg, pattern), truth=truth)


# --------------------------------------------------------------------------------------- correlation
def test_fft_correlation_matches_direct_and_respects_masks():
    rng = np.random.default_rng(1)
    nd, N, n, ns = 3, 25, 15, 5
    from scipy.ndimage import gaussian_filter

    S = np.stack([gaussian_filter(rng.random((N, N)), 1.5) for _ in range(nd)])
    S *= np.array([1.0, 3.0, 0.5])[:, None, None]
    mx, my = 2, -3
    T = 7.0 * S[:, ns + my: ns + my + n, ns + mx: ns + mx + n] + np.array([10.0, 50.0, 3.0])[:, None, None]
    mask = np.ones(T.shape, bool)
    mask[1, 4:7, 2:9] = False
    T_bad = np.where(mask, T, 1e6)  # masked samples must not matter
    for background in CO.BACKGROUNDS:
        mt = CO._Matcher(T_bad, mask, N, background)
        c = mt.maps(S[None])[0]
        assert c.shape == (2 * ns + 1, 2 * ns + 1)
        for i in range(0, 2 * ns + 1, 3):
            for j in range(0, 2 * ns + 1, 2):
                win = S[:, i:i + n, j:j + n].reshape(nd, -1)
                direct, _ = CO._ncc_direct(T.reshape(nd, -1), mask.reshape(nd, -1), win, background)
                assert c[i, j] == pytest.approx(direct, abs=1e-10)
        pk = CO._peak(c, ns)
        if background == "per_disk":  # one scale, one background per disk: the template is an exact match
            assert c.max() == pytest.approx(1.0, abs=1e-12) and c[my + ns, mx + ns] == c.max()
            assert pk.shift == pytest.approx((mx, my), abs=0.05) and not pk.at_edge
    # sub-step parabolic refinement of a quadratic peak
    ii, jj = np.mgrid[0:7, 0:7]
    q = 1.0 - 0.01 * ((jj - 3.3) ** 2 + 2 * (ii - 2.6) ** 2)
    pk = CO._peak(q, 3)
    assert pk.shift == pytest.approx((0.3, -0.4), abs=1e-12) and pk.value == pytest.approx(1.0, abs=1e-12)


def test_grid_and_continuous_correlation_agree(larbed):
    """The FFT map (grid shifts) and the spline-interpolated correlation of the polish use one convention."""
    fit = larbed.fit
    cnt = CO.Counters()
    prob = CO._Problem(fit.field, larbed.start, CO._images(larbed.pattern, larbed.start, fit.disks), None,
                       "per_disk", cnt)
    fields = CO._FieldCache(fit.field, cnt)
    c = prob.matcher.maps(fields.many([LARBED_T]))[0]
    ns = fit.field.n_search
    for m in [(0, 0), (-3, 3), (2, -5), (-6, 6)]:
        assert prob.ncc(fields(LARBED_T), m)[0] == pytest.approx(c[m[1] + ns, m[0] + ns], abs=1e-9)


# --------------------------------------------------------------------------------------- thickness + orientation
def test_larbed_thickness_and_orientation(larbed):
    fit = larbed.fit
    assert abs(fit.thickness_A / LARBED_T - 1) < 0.02  # measured 0.01 %
    assert _orientation_error_px(larbed.pg, fit.geometry) < 1.0  # measured 0.05 px
    # the correction is the start's error, reversed
    assert np.hypot(fit.shift_px[0] + OFFSET[0], fit.shift_px[1] + OFFSET[1]) < 1.0
    assert fit.geometry.gl_px == larbed.start.gl_px and fit.geometry.rotation_deg == larbed.start.rotation_deg
    assert not fit.at_edge and not fit.at_bound
    assert fit.ncc > 0.98 and fit.ncc_per_disk.shape == (5,) and np.all(fit.ncc_per_disk > 0.9)
    # one eigen-solution over the (2 (12 + 6) + 1)^2 field; every thickness from it
    n = fit.counters
    assert n["eigen_solves"] == 1 and n["tilts_solved"] == 37 * 37
    assert n["intensity_evaluations"] >= 15 and n["ncc_maps"] >= 15 and n["template_samplings"] == 1
    assert len(fit.scan["thickness_A"]) == len(fit.scan["ncc"]) >= 15
    assert fit.params["thickness_A"] == fit.thickness_A
    d = json.loads(fit.to_json())
    assert d["thickness_A"] == fit.thickness_A and d["geometry"]["tilt0"] == list(fit.geometry.tilt0)
    assert d["counters"]["eigen_solves"] == 1 and len(d["ncc_per_disk"]) == 5


def test_orientation_fit_is_idempotent(larbed):
    fit = larbed.fit
    again = coarse_orientation_thickness(larbed.model, fit.geometry, larbed.pattern, DISKS, 12, 6,
                                         (0.9 * fit.thickness_A, 1.1 * fit.thickness_A))
    assert np.hypot(*again.shift_px) < 0.25  # measured 0.004 px (PyExtal would move by the shift again)
    assert abs(again.thickness_A / fit.thickness_A - 1) < 0.005
    assert _orientation_error_px(larbed.pg, again.geometry) < 1.0
    # re-using the cached field: nothing is solved, and still no second move
    reuse = coarse_orientation_thickness(larbed.model, fit.geometry, larbed.pattern, DISKS, **LARBED_ARGS,
                                         field=fit.field)
    assert reuse.counters["eigen_solves"] == 0
    assert np.hypot(*reuse.shift_px) < 0.25


def test_deterministic(larbed):
    a = larbed.fit
    b = coarse_orientation_thickness(larbed.model, larbed.start, larbed.pattern, DISKS, **LARBED_ARGS)
    assert b.thickness_A == a.thickness_A and b.shift_px == a.shift_px and b.ncc == a.ncc
    assert b.geometry == a.geometry and np.array_equal(b.ncc_per_disk, a.ncc_per_disk)
    assert np.array_equal(b.scan["ncc"], a.scan["ncc"])


def test_cbed_example_thickness_orientation_gl(cbed):
    """Shipped CBED (3000 Å, Poisson): start 3300 Å and 4.3 px off; then gl 3 % off, on the same field."""
    T = cbed.truth["thickness_A"]
    start = _moved(cbed.pg, OFFSET)
    fit = coarse_orientation_thickness(cbed.model, start, cbed.pattern, cbed.disks, 20, 6,
                                       (0.85 * 1.1 * T, 1.15 * 1.1 * T), 2.0, radius_px=26)
    assert abs(fit.thickness_A / T - 1) < 0.02  # measured 0.00 %
    assert _orientation_error_px(cbed.pg, fit.geometry) < 1.0  # measured 0.02 px (true U; 3.4 px with IAM U)
    assert fit.counters["eigen_solves"] == 1 and not fit.at_edge and fit.ncc > 0.99
    for f in (1.03, 0.97):
        g = coarse_gl(cbed.model, fit.geometry.with_(gl_px=cbed.pg.gl_px * f), cbed.pattern, cbed.disks, 20, 6,
                      fit.thickness_A, step_px=2.0, radius_px=26, field=fit.field)
        assert g.counters["eigen_solves"] == 0
        assert abs(g.geometry.gl_px - cbed.pg.gl_px) < 0.5  # of 360 px; measured 0.003
        assert _orientation_error_px(cbed.pg, g.geometry) < 1.0
        assert g.params["gl_px"] == g.geometry.gl_px and len(g.scan["gl_px"]) == 21


def test_gl_larbed(larbed):
    fit = larbed.fit
    for f in (1.03, 0.97):
        g = coarse_gl(larbed.model, fit.geometry.with_(gl_px=40.0 * f), larbed.pattern, DISKS, 12, 6, fit.thickness_A,
                      field=fit.field)
        assert g.counters["eigen_solves"] == 0 and g.counters["intensity_evaluations"] <= 2
        assert abs(g.geometry.gl_px / 40.0 - 1) < 0.005  # measured 0.09 %


def test_larbed_disk_alignment(larbed):
    """Images recorded with their own sub-pixel offsets (relative to 0 0 0): coarse_disk_shifts finds
    each offset from the cached field (nothing re-solved), moves the reference disk's offset into tilt0,
    and raises every disk's NCC."""
    truth = {G: (0.7, -1.2), (2, -2, -2): (-1.5, 0.4), (-1, 1, 1): (0.3, 0.9)}
    pg = larbed.pg.with_(disk_shift_px=truth)
    counts, _, _, _ = make_larbed(larbed.model, pg, (40, 40), DISKS, LARBED_T,
                                  Effects(scale=2e4, background=20.0, noise="poisson", seed=5))
    ds = _larbed_ds(counts, DISKS)
    fit = coarse_orientation_thickness(larbed.model, larbed.pg, ds, DISKS, **LARBED_ARGS, field=larbed.fit.field)
    al = coarse_disk_shifts(fit, ds, max_shift_px=3.0)
    assert al.counters["eigen_solves"] == 0
    found = {h: np.asarray(al.geometry.disk_shift_px[h]) for h in DISKS[1:]}
    want = {h: np.asarray(truth.get(h, (0.0, 0.0))) for h in DISKS[1:]}
    # 40 x 40 noisy images near a systematic row (fringes nearly parallel: a shift along them is
    # poorly determined): offsets between images measured <= 0.33 px, each relative to the reference
    # (0 0 0, broad fringes) <= 0.5 px, for true offsets up to 1.6 px
    for a in DISKS[1:]:
        assert np.hypot(*(found[a] - want[a])) < 0.7
        for b in DISKS[1:]:
            assert np.hypot(*((found[a] - found[b]) - (want[a] - want[b]))) < 0.4, (a, b)
    assert np.all(al.ncc_per_disk >= fit.ncc_per_disk - 1e-9) and al.ncc > fit.ncc
    assert set(al.params["disk_shift_px"]) == {" ".join(map(str, h)) for h in DISKS[1:]}
    with pytest.raises(QcbedInputError, match="max_disk_shift_px"):
        coarse_disk_shifts(fit, ds, max_shift_px=0.0)


# --------------------------------------------------------------------------------------- bad input
def test_bad_input(larbed):
    m, ds, pg = larbed.model, larbed.pattern, larbed.start
    fld = larbed.fit.field
    with pytest.raises(QcbedInputError, match="thickness_bracket_A"):
        coarse_orientation_thickness(m, pg, ds, DISKS, 12, 6, (900, 800), field=fld)
    with pytest.raises(QcbedInputError, match="box_px"):
        coarse_orientation_thickness(m, pg, ds, DISKS, 0.2, 6, (700, 900))
    with pytest.raises(QcbedInputError, match="background"):
        coarse_orientation_thickness(m, pg, ds, DISKS, 12, 6, (700, 900), field=fld, background="median")
    with pytest.raises(QcbedInputError, match="psf_px"):
        coarse_orientation_thickness(m, pg, ds, DISKS, 12, 6, (700, 900), field=fld, psf_px=(-1, 0))
    with pytest.raises(QcbedInputError, match="box/search/step"):
        coarse_orientation_thickness(m, pg, ds, DISKS, 10, 6, (700, 900), field=fld)
    with pytest.raises(QcbedInputError, match="another list of disks"):
        coarse_orientation_thickness(m, pg, ds, DISKS[:2], 12, 6, (700, 900), field=fld)
    with pytest.raises(QcbedInputError, match="no image"):
        CO._images(ds, pg, np.array([(3, -3, -3)]))
    part = ds.copy(deep=True)
    part["valid"][1] = False
    with pytest.raises(QcbedInputError, match="disk 1 -1 -1"):
        coarse_orientation_thickness(m, pg, part, DISKS, 12, 6, (700, 900), field=fld)
    with pytest.raises(QcbedInputError, match="gl_bracket_px"):
        coarse_gl(m, pg, ds, DISKS, 12, 6, 800.0, (41.0, 39.0), field=fld)
    with pytest.raises(QcbedInputError, match="pattern.kind"):
        coarse_orientation_thickness(m, pg.with_(kind="cbed"), ds, DISKS, 12, 6, (700, 900), field=fld)


# --------------------------------------------------------------------------------------- models that re-solve
def test_rebuilt_model_carries_refined_potential(si):
    m = _small_model(si, u={G: 0.05})
    m.potential.set((2, -2, -2), U=-1e-3)
    hv = CO._rebuilt(m, hv_kV=201.0)
    ratio = float(CO.K.gamma_factor(201.0) / CO.K.gamma_factor(200.0))
    for h, v in [(G, 0.05), ((-1, 1, 1), 0.05), ((2, -2, -2), -1e-3), ((-2, 2, 2), -1e-3)]:
        assert complex(hv.potential.get([h])[0][0]) == pytest.approx(v * ratio, rel=1e-12)
    assert hv.hv_kV == 201.0 and hv.geometry.hv_kV == 201.0 and m.hv_kV == 200.0
    b = CO._rebuilt(m, crystal=replace(si, sites=(replace(si.sites[0], b_iso=0.6),)))
    assert complex(b.potential.get([G])[0][0]) == pytest.approx(0.05, rel=1e-12)  # refined U is kept
    assert b.potential.iam([(4, -4, -4)])[0] != m.potential.iam([(4, -4, -4)])[0]


class _QuadraticNCC:
    """A stand-in for the physics objective: NCC(x)^2 = r*^2 - (1 - r*^2) q(x) / dof, q = (x - x0)^T H (x - x0) / 2,
    so that the chi^2-like profile rises by exactly q (its Hessian is H)."""

    def __init__(self, x0, H, n_par):
        self.x0, self.H = np.asarray(x0, float), np.asarray(H, float)
        self.prob = SimpleNamespace(mask=np.ones((2, 500), bool), background="per_disk")
        self.dof = 1000 - (2 + 1 + 3 + n_par)
        self.calls = 0

    def evaluate(self, x):
        self.calls += 1
        d = np.atleast_1d(np.asarray(x, float)) - self.x0
        r2 = 0.96 - 0.04 * 0.5 * d @ self.H @ d / self.dof
        return None, None, self.prob, None, None, float(np.sqrt(r2)), None, None


def test_profile_sigma_recovers_a_known_curvature():
    """Standard errors from 2 H^-1 of the chi^2-like profile: exact for a quadratic profile, with the step
    adapted from a far too large first guess, correlations included; no error at a physical limit."""
    obj = _QuadraticNCC([200.0], [[2.0 / 0.05**2]], 1)
    u = CO._profile_sigma(obj, [200.0], [0.5])  # 10 sigma: adapted to 2.5 sigma
    assert u["sigma"][0] == pytest.approx(0.05, rel=1e-6) and u["steps"][0] == pytest.approx(0.125, rel=1e-6)
    assert 5.0 < u["rise"][0] < 7.0 and u["dof"] == 993 and obj.calls == 5
    s1, s2, rho = 0.02, 0.3, 0.6
    cov = np.array([[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]])
    obj = _QuadraticNCC([5.4, 0.5], 2.0 * np.linalg.inv(cov), 2)
    u = CO._profile_sigma(obj, [5.4, 0.5], [0.01, 0.2], lower=[0.0, 0.0])
    assert u["sigma"] == pytest.approx([s1, s2], rel=1e-6) and np.allclose(u["covariance"], cov, rtol=1e-6)
    u = CO._profile_sigma(_QuadraticNCC([0.0], [[100.0]], 1), [0.0], [0.1], lower=[0.0])
    assert np.isnan(u["sigma"][0]) and "physical limit" in u["note"]
    u = CO._profile_sigma(_QuadraticNCC([1.0], [[-100.0]], 1), [1.0], [0.1])  # a minimum of the NCC
    assert np.isnan(u["sigma"][0]) and "not at a maximum" in u["note"]


def test_with_refined_physics(si):
    """The coarse stage's refined voltage, cell and B put into another model (the fine stage's), with its
    refined U carried over (scaled by gamma'/gamma for the voltage)."""
    m = _small_model(si, u={G: 0.05})
    assert CO.with_refined_physics(m, {}) is m
    two = replace(si, sites=si.sites + (replace(si.sites[0], label="Si2", fract=(0.3, 0.3, 0.3)),))
    m2 = _small_model(two)
    r = CO.with_refined_physics(m2, {"hv_kV": 199.5, "cell": [5.44, 5.44, 5.44, 90.0, 90.0, 90.0],
                                     "b_iso_A2": [{"site_index": 1, "label": "Si2", "b_iso_A2": 0.61}]})
    assert r.hv_kV == 199.5 and r.geometry.hv_kV == 199.5 and r.crystal.cell[:3] == (5.44,) * 3
    assert r.crystal.sites[1].b_iso == 0.61 and r.crystal.sites[0].b_iso == si.sites[0].b_iso
    assert r.selection == m2.selection and m2.hv_kV == 200.0
    v = CO.with_refined_physics(m, {"hv_kV": 201.0})
    ratio = float(CO.K.gamma_factor(201.0) / CO.K.gamma_factor(200.0))
    assert complex(v.potential.get([G])[0][0]) == pytest.approx(0.05 * ratio, rel=1e-12)


def test_crystal_system(si):
    site = (AtomSite("A", "Mg", (1 / 3, 2 / 3, 0.25)),)
    assert crystal_system(si) == "cubic"
    assert crystal_system(Crystal("h", (3.2, 3.2, 5.2, 90, 90, 120), "P 63/m m c", site)) == "hexagonal"
    assert crystal_system(Crystal("t", (4, 4, 6, 90, 90, 90), "P 4/m m m", site)) == "tetragonal"
    assert crystal_system(Crystal("o", (4, 5, 6, 90, 90, 90), "P m m m", site)) == "orthorhombic"
    assert crystal_system(Crystal("r", (5, 5, 5, 70, 70, 70), "R -3 m:R", site)) == "rhombohedral"
    assert crystal_system(Crystal("rh", (5, 5, 12, 90, 90, 120), "R -3 m:H", site)) == "trigonal"
    assert CO._CELL_FREE["tetragonal"][1]((4.0, 6.0)) == (4.0, 4.0, 6.0)


@pytest.fixture(scope="module")
def holz(si):
    """LARBED 32 x 32 with HOLZ reflections (zero-layer reflections alone cannot tell voltage from
    thickness), 5.7° off [110] on the 111 row, 800 Å, 200 kV, Poisson noise.  The cell and the voltage are
    in the HOLZ lines, so every HOLZ beam near its Bragg condition is a strong beam (holz_u_strong = 0, what
    simulation.holz_lines = true sets; the default leaves the weakly coupled ones out: cell 0.26 % instead
    of 0.02 %)."""
    sel = Selection(g_max=3.0, sg_max=0.3, sg_strong=0.02, holz=True, holz_u_strong=0.0)
    m = _small_model(si, selection=sel)
    pg = PatternGeometry(m.geometry, "larbed", gl_px=40.0, rotation_deg=-35.0, centre_px=(15.6, 15.3),
                         tilt0=tuple(m.geometry.kt_from_xy(-0.16, 4.0)))
    disks = DISKS[:3]
    counts, _, _, _ = make_larbed(m, pg, (32, 32), disks, 800.0, Effects(scale=2e4, background=20.0, noise="poisson",
                                                                          seed=3))
    return SimpleNamespace(model=m, pg=pg, pattern=_larbed_ds(counts, disks), disks=disks, sel=sel)


@pytest.mark.slow
def test_voltage_recovered(holz, si):
    m = _small_model(si, hv_kV=201.0, selection=holz.sel)
    pg = holz.pg.with_(geometry=m.geometry)
    r = coarse_voltage(m, pg, holz.pattern, holz.disks, 10, 3, 805.0, (198.5, 202.5))
    assert abs(r.params["hv_kV"] - 200.0) < 0.3  # measured 0.08 kV
    assert r.model.hv_kV == r.params["hv_kV"] and abs(r.thickness_A / 800.0 - 1) < 0.01
    assert r.counters["eigen_solves"] == len(r.scan["trace_hv_kV"]) >= 5
    assert _orientation_error_px(holz.pg, r.geometry) < 1.0


@pytest.mark.slow
def test_debye_waller_recovered(holz, si):
    b0 = si.sites[0].b_iso
    m = replace(holz.model, crystal=replace(si, sites=(replace(si.sites[0], b_iso=1.2 * b0),)))
    r = coarse_debye_waller(m, holz.pg.with_(geometry=m.geometry), holz.pattern, holz.disks, 10, 3, 800.0)
    assert abs(r.params["b_iso_A2"]["Si"] / b0 - 1) < 0.1  # 20 % off at the start; measured 5.3 %
    assert r.model.crystal.sites[0].b_iso == r.params["b_iso_A2"]["Si"]


@pytest.mark.slow
def test_cell_recovered(holz, si):
    a0 = si.cell[0]
    m = replace(holz.model, crystal=replace(si, cell=(1.003 * a0,) * 3 + si.cell[3:]))
    r = coarse_cell(m, holz.pg.with_(geometry=m.geometry), holz.pattern, holz.disks, 10, 3, 800.0, rel_bound=0.006)
    assert r.params["crystal_system"] == "cubic"
    assert abs(r.params["a_A"] / a0 - 1) < 1e-3  # 0.3 % off at the start; measured 0.024 %
    assert r.model.crystal.cell[:3] == (r.params["a_A"],) * 3


@pytest.mark.slow
def test_shipped_larbed_example():
    """data/si_larbed (a systematic row: orientation across the row is weakly determined), with its
    Voigt PSF given to the coarse fit."""
    cfg = C.load_config(DATA / "si_larbed" / "config.toml")
    truth = json.loads((DATA / "si_larbed" / "si_larbed_truth.json").read_text())
    model = C.forward_model(cfg)
    for key, (re, im) in truth["U"].items():
        model.potential.set(tuple(int(x) for x in key.split()), U=complex(re, im))
    pattern = load_pattern(cfg.section("pattern"), cfg.base_dir)
    pg = truth_geometry(model, truth)  # the config starts elsewhere
    disks = C.roi_disks(cfg, pattern)
    T = truth["thickness_A"]
    psf = (truth["effects"]["psf_sigma_px"], truth["effects"]["psf_gamma_px"])
    fit = coarse_orientation_thickness(model, _moved(pg, OFFSET), pattern, disks, 20, 6,
                                       (0.85 * 1.1 * T, 1.15 * 1.1 * T), psf_px=psf)
    assert abs(fit.thickness_A / T - 1) < 0.02  # measured 0.1 %
    assert _orientation_error_px(pg, fit.geometry) < 1.0  # measured 0.34 px (2.1 px without the PSF)
    g = coarse_gl(model, fit.geometry.with_(gl_px=1.03 * pg.gl_px), pattern, disks, 20, 6, fit.thickness_A, psf_px=psf,
                  field=fit.field)
    assert abs(g.geometry.gl_px / pg.gl_px - 1) < 0.005  # measured 0.03 % (2.2 % without the PSF)
