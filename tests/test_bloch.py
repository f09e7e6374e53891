"""Bloch solver against analytic limits, conservation laws and symmetry."""

import numpy as np
import pytest

from stages.physics.beams import BeamSet, Selection
from stages.physics.bloch import coupling_matrices, solve
from stages.errors import QcbedInputError
from stages.simulate import ForwardModel, simulate

THICK = np.array([0.0, 50, 120, 333, 800, 1500, 2600, 4000])


def _two_beam(si, g=(1, 1, 1), absorption=0.0):
    m = ForwardModel(si, 200.0, (1, -1, 0), x_axis=g, absorption="proportional" if absorption else "none",
                     absorption_fraction=absorption)
    beams = BeamSet(strong=np.array([[0, 0, 0], list(g)]), weak=np.zeros((0, 3), int), selection=Selection(bethe=False))
    return m, beams


def test_two_beam_pendellosung(si):
    """000 + g only: I_g = 4|u|²/(d²+4|u|²) sin²(π t sqrt(d²+4|u|²)), d = K s_g/K_n, u = U_g/(2K_n)."""
    m, beams = _two_beam(si)
    g = np.array([1, 1, 1])
    geo = m.geometry
    # tilts along g through the Bragg condition (kt = -g/2 is exact Bragg) and far from it
    frac = np.linspace(-2.5, 1.5, 41)
    kt = np.outer(frac, g)
    sol = solve(geo, m.potential, beams, kt, method="general")
    inten = sol.intensities(THICK)
    K = geo.K_invA
    Kvec = geo.incident(kt)
    gc = si.recip_to_cart(g)
    s_g = (K**2 - np.sum((Kvec + gc) ** 2, axis=1)) / (2 * K)  # independent of the solver's helper
    n_in = geo.inward_normal(Kvec)
    Kn = np.sum(Kvec * n_in, axis=1)
    assert np.allclose(n_in @ gc, 0)  # g lies in the foil plane: p_g = 1
    U = m.potential.get([g])[0][0]
    d = K * s_g / Kn
    u = abs(U) / (2 * Kn)
    w = np.sqrt(d**2 + 4 * u**2)
    Ig = (4 * u**2 / w**2)[:, None] * np.sin(np.pi * np.outer(w, THICK)) ** 2
    # 1e-8 relative to the Pendellösung amplitude 4|u|²/w² of each tilt (near the zeros of sin² a
    # pointwise relative error is meaningless: double-precision round-off of the phase dominates)
    amp = (4 * u**2 / w**2)[:, None]
    assert np.all(np.abs(inten[:, :, 1] - Ig) <= 1e-8 * amp)
    assert np.all(np.abs(inten[:, :, 0] - (1 - Ig)) <= 1e-8 * amp)
    assert abs(s_g[np.argmin(abs(frac + 0.5))]) < 1e-12  # kt = -g/2 is the Bragg condition
    # the extinction distance at the Bragg condition: ξ_g = K_n/|U_g| (first zero of I_0 at t = ξ_g/2)
    i_b = np.argmin(abs(frac + 0.5))
    xi = Kn[i_b] / abs(U)
    t0 = xi / 2
    assert sol.intensities([t0])[i_b, 0, 0] == pytest.approx(0.0, abs=1e-20)


def test_conservation_without_absorption(si):
    m = ForwardModel(si, 200.0, (1, 1, 0))
    rng = np.random.default_rng(0)
    kt = m.geometry.kt_from_xy(rng.uniform(-0.04, 0.04, 40), rng.uniform(-0.04, 0.04, 40))
    for method in ("general", "hermitian"):
        m.method = method
        ds = simulate(m, np.linspace(0, 5000, 26), kt=kt)
        total = ds.intensity.sum("beam").values
        assert np.max(np.abs(total - 1)) < 1e-10, method


def test_absorption_total_decreases_monotonically(si):
    m = ForwardModel(si, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=0.05)
    kt = m.geometry.kt_from_xy(np.linspace(-0.04, 0.04, 9), np.linspace(0.02, -0.02, 9))
    total = simulate(m, np.linspace(0, 5000, 101), kt=kt).intensity.sum("beam").values
    assert np.all(np.diff(total, axis=1) < 0)
    assert np.all(total[:, 0] == pytest.approx(1.0, abs=1e-12))


def _zone_preserving_ops(cr, zone):
    rot, tra = cr.symops
    keep = [R for R in rot if np.allclose(R @ np.asarray(zone, float), zone)]
    uniq = {tuple(np.rint(R).astype(int).ravel()) for R in keep}
    return [np.array(u).reshape(3, 3) for u in uniq]


@pytest.mark.parametrize("zone", [(0, 0, 1), (1, 1, 0), (1, 1, 1)])
def test_zone_axis_symmetry(si, zone):
    """At an exact zone axis, beams related by a symmetry operation that keeps the zone are equally intense."""
    m = ForwardModel(si, 200.0, zone, absorption="proportional", absorption_fraction=0.03)
    ds = simulate(m, [300.0, 1200.0, 2500.0], kt=(0, 0, 0))
    hkl = np.stack([ds.h.values, ds.k.values, ds.l.values], 1)
    lut = {tuple(h): i for i, h in enumerate(hkl.tolist())}
    inten = ds.intensity.values
    ops = _zone_preserving_ops(si, zone)
    assert len(ops) >= 4
    pairs = 0
    for i, h in enumerate(hkl):
        for R in ops:
            j = lut.get(tuple((h @ R).tolist()))
            if j is not None and j != i:
                pairs += 1
                np.testing.assert_allclose(inten[:, j], inten[:, i], atol=1e-10)
    assert pairs > 50


def test_kinematic_limit(si):
    """Thin crystal at the Bragg condition of g: I_g = (π t |U_g| / K)² within 1% where I_g < 1e-3.

    Many-beam calculation without Bethe potentials (the Bethe reduction is a thick-crystal,
    stationary-phase approximation and does not hold as t -> 0); multiple scattering adds a
    relative correction growing like t, so thicknesses stay at a few Å.
    """
    m = ForwardModel(si, 200.0, (1, -1, 0), selection=Selection(bethe=False))
    K = m.geometry.K_invA
    checked = 0
    for g in ([1, 1, 1], [2, 2, 0], [0, 0, 4], [1, 1, 3]):
        kt = -0.5 * np.array(g, float)
        ds = simulate(m, [0.5, 1.0, 2.0, 3.0], kt=kt, out_hkl=[g])
        Ig = ds.intensity.sel(beam=0).values
        Ug = abs(m.potential.get([g])[0][0])
        kin = (np.pi * ds.thickness.values * Ug / K) ** 2
        sel = Ig < 1e-3
        assert sel.any()
        np.testing.assert_allclose(Ig[sel], kin[sel], rtol=0.01)
        checked += sel.sum()
    assert checked >= 8


def test_thickness_series_from_one_solution(si):
    """Intensities at a list of thicknesses equal separate evaluations (one eigen-solution serves all)."""
    m = ForwardModel(si, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=0.04)
    kt = m.geometry.kt_from_xy(np.linspace(-0.05, 0.05, 5), np.zeros(5))
    beams = m.beams(kt)
    sol = m.solve(kt, beams=beams)
    series = sol.intensities(THICK)
    for i, t in enumerate(THICK):
        np.testing.assert_allclose(sol.intensities([t])[:, 0, :], series[:, i, :], rtol=1e-12, atol=1e-15)
    # and a batch of tilts equals tilt-by-tilt solutions
    for i in range(len(kt)):
        one = m.solve(kt[i:i + 1], beams=beams).intensities(THICK)
        np.testing.assert_allclose(one[0], series[i], rtol=1e-9, atol=1e-13)


def test_hermitian_path_exact_without_absorption(si):
    res = []
    for method in ("general", "hermitian"):
        m = ForwardModel(si, 200.0, (1, 1, 0), method=method)
        kt = m.geometry.kt_from_xy(np.array([0.0, 0.04, -0.03]), np.array([0.0, 0.02, 0.05]))
        res.append(simulate(m, [500.0, 1000.0, 2000.0], kt=kt).intensity.values)
    assert np.abs(res[1] - res[0]).max() < 1e-10


@pytest.mark.parametrize("frac", [0.05, 0.1])
def test_hermitian_quasi_degenerate_accuracy(si, frac):
    """``hermitian`` (clusters exact, couplings by 3rd-order quasi-degenerate perturbation) vs ``general``.

    Si [110], 200 kV, default beams, exact zone axis (degenerate Bloch states) and a small tilt, every
    beam, t = 100-2000 Å.  Measured max |dI|: 6.4e-5 / 6.5e-5 (U'/U = 0.05), 4.8e-5 / 4.7e-5 (0.1), and
    <= 8.2e-5 over 30 tilts within 0.025 Å^-1; the acceptance 1e-3 leaves a 12x margin.
    """
    res = {}
    for method in ("general", "hermitian"):
        m = ForwardModel(si, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=frac, method=method)
        kt = np.vstack([np.zeros(3), m.geometry.kt_from_xy(0.01, 0.004)])
        res[method] = simulate(m, np.arange(100.0, 2001.0, 50.0), kt=kt).intensity.values
    err = np.abs(res["hermitian"] - res["general"]).max(axis=(1, 2))
    assert err.max() <= 1e-3, err
    assert err.max() <= 2e-4, err  # regression guard on the measured ~7e-5


def test_auto_uses_hermitian_where_valid_and_falls_back(si):
    m = ForwardModel(si, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=0.02)
    kt = np.vstack([np.zeros(3), m.geometry.kt_from_xy(0.01, 0.004)])
    beams = m.beams(kt)
    m.method = "auto"
    sol = m.solve(kt, beams=beams)
    assert sol.timing["method_used"] == "hermitian" and sol.timing["n_tilts_hermitian"] == 2
    m.method = "general"
    gen = m.solve(kt, beams=beams).intensities([500.0, 2000.0])
    assert np.abs(sol.intensities([500.0, 2000.0]) - gen).max() < 1e-3
    # strong absorption: the estimate exceeds the tolerance, those tilts are re-solved with general
    m = ForwardModel(si, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=1.0)
    kt = m.geometry.kt_from_xy(np.array([0.0, 0.01, -0.02]), np.array([0.0, 0.004, 0.013]))
    beams = m.beams(kt)
    m.method = "auto"
    sol = m.solve(kt, beams=beams)
    assert sol.timing["n_tilts_general"] >= 1 and sol.timing["method_used"] in ("general", "mixed")
    m.method = "general"
    gen = m.solve(kt, beams=beams).intensities([500.0, 2000.0])
    assert np.abs(sol.intensities([500.0, 2000.0]) - gen).max() < 1e-3


def test_hermitian_full_mode_is_consistent(si):
    """full=True: V diag(γ) W reconstructs M, W = V^-1 and alpha = W[:, :, 0] (B alpha = e_000)."""
    from stages.physics.bloch import _eig_auto, _eig_hermitian, structure_matrices
    m = ForwardModel(si, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=0.1)
    kt = np.vstack([np.zeros(3), m.geometry.kt_from_xy(0.01, 0.004)])
    beams = m.beams(kt)
    M, _ = structure_matrices(m.geometry, beams, coupling_matrices(m.potential, beams), kt)
    out = np.array([0, 3, 5])
    for f in (_eig_hermitian, _eig_auto):
        g, Vo, al, V, W = f(M, out, full=True)
        np.testing.assert_allclose(V @ W, np.broadcast_to(np.eye(M.shape[1]), M.shape), atol=1e-10)
        assert np.abs(V @ (g[..., None] * W) - M).max() < 1e-4 * np.abs(M).max()
        np.testing.assert_allclose(al, W[:, :, 0])
        np.testing.assert_allclose(Vo, V[:, out, :])
        g2, Vo2, al2 = f(M, out)
        np.testing.assert_allclose(g2, g, rtol=1e-12)
        np.testing.assert_allclose(Vo2, Vo, atol=1e-12)
        np.testing.assert_allclose(al2, al, atol=1e-10)


def test_coupling_matrices_hermitian_without_absorption(si):
    m = ForwardModel(si, 200.0, (1, 1, 0))
    beams = m.beams(np.zeros((1, 3)))
    c = coupling_matrices(m.potential, beams)
    np.testing.assert_allclose(c.ss, c.ss.conj().T, atol=1e-15)
    np.testing.assert_allclose(c.sw, c.ws.conj().T, atol=1e-15)


def test_tiled_solution_is_independent_of_the_batch(si):
    """A tilt's intensities do not depend on which other tilts are solved with it (tile beam sets are
    chosen for the tile, not for its members), and tiles assemble correctly."""
    m = ForwardModel(si, 200.0, (1, 1, 0))
    x, y = np.meshgrid(np.linspace(-0.09, 0.09, 5), np.linspace(-0.06, 0.06, 4))
    kt = m.geometry.kt_from_xy(x.ravel(), y.ravel())
    out = [[0, 0, 0], [1, -1, 1], [-1, 1, -1], [0, 0, 2]]
    tiled = m.solve_tiled(kt, out)
    assert len(tiled.parts) > 1
    inten = tiled.intensities([400.0, 1600.0])
    for i in (0, 7, 13, 19):
        one = m.solve_tiled(kt[i:i + 1], out).intensities([400.0, 1600.0])[0]
        np.testing.assert_allclose(inten[i], one, rtol=1e-10, atol=1e-13)
    for idx, part in tiled.parts:  # a part's columns: the output beams first, then image beams (tilt symmetry)
        np.testing.assert_allclose(inten[idx], part.intensities([400.0, 1600.0])[..., :len(out)], rtol=1e-12)


def test_tiled_zone_axis_keeps_symmetry(si):
    """kt = 0 is a tile centre and the tile's beam set is chosen over a disk: mirror-related beams stay equal."""
    m = ForwardModel(si, 200.0, (1, 1, 0))
    ds = simulate(m, [700.0, 2100.0], kt=(0, 0, 0), out_hkl=[[1, -1, 1], [-1, 1, 1], [1, -1, -1], [0, 0, 2], [0, 0, -2]])
    I = ds.intensity.values
    np.testing.assert_allclose(I[:, 0], I[:, 1], atol=1e-10)
    np.testing.assert_allclose(I[:, 0], I[:, 2], atol=1e-10)
    np.testing.assert_allclose(I[:, 3], I[:, 4], atol=1e-10)


def test_tiles_solved_on_threads_give_identical_numbers(si, monkeypatch):
    """Tiles solved concurrently (threads calling single-threaded LAPACK) give bit-identical intensities,
    in the same tile order, whatever the thread count (QCBED_THREADS or the argument)."""
    m = ForwardModel(si, 200.0, (1, 1, 0))
    x, y = np.meshgrid(np.linspace(-0.12, 0.12, 7), np.linspace(-0.08, 0.08, 5))
    kt = m.geometry.kt_from_xy(x.ravel(), y.ravel())
    out = [[0, 0, 0], [1, -1, 1], [0, 0, 2]]
    one = m.solve_tiled(kt, out, threads=1)
    assert len(one.parts) > 3
    monkeypatch.setenv("QCBED_THREADS", "3")
    three = m.solve_tiled(kt, out)
    assert [p[0].tolist() for p in one.parts] == [p[0].tolist() for p in three.parts]
    np.testing.assert_array_equal(one.intensities([500.0, 1500.0]), three.intensities([500.0, 1500.0]))
    monkeypatch.setenv("QCBED_THREADS", "zero")
    with pytest.raises(QcbedInputError, match="QCBED_THREADS"):
        m.solve_tiled(kt, out)


def _si_origin1(tmp_path):
    """Si in Fd-3m origin choice 1 (atom at 0 0 0; inversion centre at 1/8 1/8 1/8: complex U_g)."""
    from stages.physics.crystal_io import load_crystal
    p = tmp_path / "si1.toml"
    p.write_text('name = "Si1"\ncell = [5.43102, 5.43102, 5.43102, 90.0, 90.0, 90.0]\nspacegroup = "F d -3 m:1"\n'
                 '[[atoms]]\nlabel = "Si"\nxyz = [0.0, 0.0, 0.0]\nB = 0.4632\n')
    return load_crystal(p)


@pytest.mark.parametrize("method", ["general", "hermitian", "auto"])
def test_origin_at_the_inversion_centre_changes_nothing_but_speed(si, tmp_path, monkeypatch, method):
    """Origin choice 1 of Fd-3m: the couplings are taken about the inversion centre (real, so the
    hermitian solver runs in real arithmetic); intensities, amplitudes and analytic derivatives equal
    the crystal's own origin (the couplings' phases switched off) and the origin-2 crystal to rounding."""
    from stages.physics import bloch
    from stages.fine import apply_sf, sf_params_from_config, sf_potential_derivatives
    cr1 = _si_origin1(tmp_path)
    assert np.allclose(cr1.inversion_centre, 0.125) and si.inversion_centre is not None and not np.any(si.inversion_centre)
    kt_xy = [(0.0, 0.0), (0.011, -0.004), (0.03, 0.02)]
    res = {}
    for label, cr, shift in (("o1", cr1, True), ("o1 raw", cr1, False), ("o2", si, True)):
        if not shift:
            monkeypatch.setattr(bloch, "origin_phases", lambda pot, hkl: None)
        m = ForwardModel(cr, 200.0, (1, 1, 0), absorption="proportional", absorption_fraction=0.05, method=method)
        kt = np.stack([m.geometry.kt_from_xy(x, y) for x, y in kt_xy])
        beams = m.beams(kt)
        coup = bloch.coupling_matrices(m.potential, beams)
        if label == "o1":
            H, A = 0.5 * (coup.ss + coup.ss.conj().T), -0.5j * (coup.ss - coup.ss.conj().T)  # U and U' parts
            assert coup.phase is not None and max(np.abs(H.imag).max(), np.abs(A.imag).max()) < 1e-15 * np.abs(H).max()
        params = sf_params_from_config(m, [{"hkl": [1, 1, 1], "refine": ["U"]}])
        dpot = sf_potential_derivatives(m, params, [p.x0 for p in params])
        sol = solve(m.geometry, m.potential, beams, kt, None, method, coup, dpot=dpot, deriv_thickness_A=700.0)
        lut = {tuple(h): i for i, h in enumerate(beams.strong.tolist())}
        res[label] = (lut, sol.intensities([300.0, 700.0, 2000.0]), sol.amplitudes([700.0]), sol.dI)
        monkeypatch.undo()
    lut, i1, a1, d1 = res["o1"]
    lut_r, ir, ar, dr = res["o1 raw"]
    assert lut == lut_r
    np.testing.assert_allclose(i1, ir, atol=1e-12)
    np.testing.assert_allclose(a1, ar, atol=1e-11)
    np.testing.assert_allclose(d1, dr, atol=1e-9 * np.abs(dr).max())
    lut2, i2, _, d2 = res["o2"]
    common = [h for h in lut if h in lut2]
    assert len(common) == len(lut)  # the same beams (the selection sees |U_g| only)
    idx1, idx2 = [lut[h] for h in common], [lut2[h] for h in common]
    np.testing.assert_allclose(i1[..., idx1], i2[..., idx2], atol=1e-10)
