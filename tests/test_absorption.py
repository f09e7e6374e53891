"""Bird & King TDS absorption (stages/physics/absorption.py, Potential absorption='bird_king')."""

import time

import numpy as np
import pytest

from stages.physics import absorption as A
from stages.physics import constants as C
from stages.physics import structure_factors as sf
from stages.physics.beams import lattice_points
from stages.physics.crystal import AtomSite, Crystal
from stages.physics.scattering import _peng, electron_scattering_factor
from stages.simulate import ForwardModel, simulate

# Fitted Bird & King table ("Thomas" parameterisation, Felix-python pylix_modules/thomas.py), prefactor
# 2h/(m0 c): Nb, B = 0.3 Å^2 at 1/d = 0, 0.2, 0.4, 0.8 Å^-1 (../shared/research/felix.md §3.4) and
# Si, B = 0.4 and 0.5 Å^2 at s = 0 and the 111, 220, 400 reflections (evaluated from that table).
Q_NB = np.array([0.0, 0.2, 0.4, 0.8])
THOMAS_NB = [0.1312, 0.1298, 0.1262, 0.1151]
NUMERIC_NB_FELIX_MD = [0.1271, 0.1258, 0.1222, 0.1110]  # felix.md's own integral (see test below)
S_SI = np.array([0.0, 0.15946, 0.2604, 0.36825])
THOMAS_SI = {0.4: [0.023565, 0.022618, 0.021386, 0.019924], 0.5: [0.026866, 0.025732, 0.02422, 0.02242]}


def _gesn():
    """Ge0.9Sn0.1, Fd-3m origin choice 1, site 8a (0,0,0) shared, B = 0.644 Å^2."""
    return Crystal("GeSn", (5.64613,) * 3 + (90.0,) * 3, "F d -3 m:1",
                   (AtomSite("Ge", "Ge", (0.0, 0.0, 0.0), 0.9, 0.644), AtomSite("Sn", "Sn", (0.0, 0.0, 0.0), 0.1, 0.644)))


def test_nb_reproduces_the_bird_king_table():
    for table, tol in (("kirkland", 0.005), ("peng", 0.01)):
        fp = A.tds_absorptive_factor("Nb", Q_NB / 2, 0.3, table)  # s = sinθ/λ = (1/d)/2
        np.testing.assert_allclose(fp, THOMAS_NB, rtol=tol, err_msg=table)


def test_nb_numbers_of_felix_md_are_the_integral_cut_at_6_per_angstrom():
    """felix.md's 0.1271 ... are 3.0-3.5 % below the table: an integral stopped at |s'| = 6 Å^-1 (the end
    of Kirkland's fit, q = 12 Å^-1) gives them to < 0.5 %; Bird & King integrate over the whole plane."""
    full = A.tds_absorptive_factor("Nb", Q_NB / 2, 0.3, "kirkland")
    assert np.all((full / NUMERIC_NB_FELIX_MD - 1) > 0.025) and np.all((full / NUMERIC_NB_FELIX_MD - 1) < 0.04)

    def cut(s):
        s = np.asarray(s, float)
        return np.where(s <= 6.0, electron_scattering_factor("Nb", s, "kirkland"), 0.0)

    fp_cut = A.BK_PREFACTOR_A * A.bird_king_integral(cut, Q_NB / 2, 0.3)
    np.testing.assert_allclose(fp_cut, NUMERIC_NB_FELIX_MD, rtol=0.005)


@pytest.mark.parametrize("B", [0.4, 0.5])
def test_si_reproduces_the_bird_king_table(B):
    np.testing.assert_allclose(A.tds_absorptive_factor("Si", S_SI, B, "kirkland"), THOMAS_SI[B], rtol=0.002)
    np.testing.assert_allclose(A.tds_absorptive_factor("Si", S_SI, B, "peng"), THOMAS_SI[B], rtol=0.01)


def _gaussian_closed_form(a, b, s, B):
    """∫ f(|s/2+t|) f(|s/2-t|) [1 - exp(-2B(t^2 - s^2/4))] d^2t for f = Σ a_i exp(-b_i s^2), exactly."""
    u2 = (np.asarray(s, float) / 2) ** 2
    out = np.zeros_like(u2)
    for ai, bi in zip(a, b):
        for aj, bj in zip(a, b):
            c0, c = bi + bj, bi + bj + 2 * B
            out += ai * aj * (np.pi / c0 * np.exp(-4 * bi * bj * u2 / c0)
                              - np.pi / c * np.exp((bi - bj) ** 2 * u2 / c - (bi + bj - 2 * B) * u2))
    return out


@pytest.mark.parametrize("element, B", [("Si", 0.4632), ("Sn", 0.644), ("Au", 2.0)])
def test_quadrature_against_closed_form_for_gaussian_factors(element, B):
    a, b = _peng(element)
    s = np.array([0.0, 0.1, 0.37, 0.8, 1.5, 2.5])
    fe = lambda x: np.exp(-np.multiply.outer(np.asarray(x) ** 2, b)) @ a  # noqa: E731 (pure Gaussians)
    num = A.bird_king_integral(fe, s, B)
    ref = _gaussian_closed_form(a, b, s, B)
    np.testing.assert_allclose(num, ref, rtol=1e-6, atol=1e-9 * abs(ref[0]))


def test_spline_matches_direct_quadrature_between_nodes():
    s = np.arange(0.013, 4.0, 0.071)
    for el, B, table in (("Si", 0.4632, "peng"), ("Sn", 0.644, "kirkland"), ("Ge", 1.7, "peng")):
        direct = A.BK_PREFACTOR_A * A.bird_king_integral(A._elastic(el, table), s, B)
        np.testing.assert_allclose(A.tds_absorptive_factor(el, s, B, table), direct, rtol=1e-4, atol=1e-6 * direct[0])
        # the atom's absorptive amplitude f' exp(-B s^2), which is what enters U'_g
        np.testing.assert_allclose(A.tds_absorptive_factor(el, s, B, table, debye_waller=True),
                                   direct * np.exp(-B * s * s), rtol=0, atol=2e-5 * direct[0])


@pytest.mark.parametrize("element, B", [("Si", 0.4632), ("Ge", 0.644), ("Sn", 0.644), ("Nb", 0.3), ("Au", 1.0)])
def test_positive_and_decreasing(element, B):
    s = np.linspace(0.0, 1.2, 49)
    for table in ("peng", "kirkland"):
        fp = A.tds_absorptive_factor(element, s, B, table, hv_kV=200.0)
        assert np.all(fp > 0) and np.all(np.diff(fp) < 0), (element, table)
        full = A.tds_absorptive_factor(element, s, B, table, hv_kV=200.0, debye_waller=True)
        np.testing.assert_allclose(full, fp * np.exp(-B * s * s), rtol=1e-14)


def test_vanishes_with_B_and_scales_with_inverse_velocity():
    s = np.array([0.0, 0.2, 0.5])
    assert np.all(A.tds_absorptive_factor("Si", s, 0.0) == 0)
    small = [A.tds_absorptive_factor("Si", s, B) for B in (1e-2, 1e-3, 1e-4)]
    assert np.all(small[0] > small[1]) and np.all(small[1] > small[2]) and np.all(small[2] > 0)
    assert np.all(small[2] < 0.03 * small[0])  # -> 0 as B -> 0, like B log(1/B) (Coulomb tail of f_e)
    per_b = (small[2] / 1e-4) / (small[1] / 1e-3)
    assert np.all(per_b > 1.0) and np.all(per_b < 1.5)
    c = A.tds_absorptive_factor("Si", s, 0.4632)
    for kv in (100.0, 200.0, 300.0):
        beta = np.sqrt(1 - 1 / C.gamma_factor(kv) ** 2)
        np.testing.assert_allclose(A.tds_absorptive_factor("Si", s, 0.4632, hv_kV=kv), c / beta, rtol=1e-14)
    assert A.velocity_factor(200.0) == pytest.approx(1.43820, abs=1e-5)
    with pytest.raises(ValueError):
        A.tds_absorptive_factor("Si", s, -0.1)


def test_si_200kV_ratios(si):
    """U'_g/U_g for Si at 200 kV; TDS only, so below refined CBED values that include electronic absorption."""
    pot = sf.Potential(si, 200.0, "peng", "bird_king")
    hkl = [[0, 0, 0], [1, 1, 1], [2, 2, 0], [4, 0, 0]]
    u, up = pot.get(hkl)
    ratio = (up / u).real
    print("\nSi 200 kV Bird & King U'_g/U_g:", {" ".join(map(str, h)): round(float(r), 5) for h, r in zip(hkl, ratio)},
          "U'_0 =", f"{up[0].real:.4e} Å^-2")
    np.testing.assert_allclose((up / u).imag, 0, atol=1e-12)  # same phase as U_g (one element)
    np.testing.assert_allclose(ratio, [0.006363, 0.01090, 0.01796, 0.02718], rtol=2e-3)
    assert np.all(np.diff(ratio) > 0)  # f' falls more slowly than f_e
    assert pot.u0()[1] == pytest.approx(up[0].real) and pot.u0()[1] > 0
    # PyExtal's Si [110] CBED example (196.75 kV, a = 5.4307, B = 0.4668, anchors.md §1.1) refined
    # U'_111 = 7.94e-4 Å^-2; the TDS part alone is about two thirds of it
    si2 = Crystal("Si", (5.4307,) * 3 + (90.0,) * 3, "F d -3 m:2", (AtomSite("Si", "Si", (0.125,) * 3, 1.0, 0.4668),))
    up111 = abs(sf.Potential(si2, 196.75, "peng", "bird_king").get([[1, 1, 1]])[1][0])
    assert 0.5 < up111 / 7.94e-4 < 1.0


def test_symmetry_phases_and_friedel(si):
    gesn = _gesn()
    for cr in (si, gesn):
        pot = sf.Potential(cr, 200.0, "kirkland", "bird_king")
        for h in ([1, 1, 1], [3, 1, 1], [4, 2, 2], [5, 3, 1]):
            hh = [tuple(x) for x, _ in sf.symmetry_equivalents(cr, h)]
            _, up = pot.get([h] + hh + [[-x for x in h]])
            for (h2, p), v in zip(sf.symmetry_equivalents(cr, h), up[1:-1]):
                assert v == pytest.approx(p * up[0], abs=1e-15)
            assert up[-1] == pytest.approx(np.conj(up[0]), abs=1e-15)


def test_gesn_mixed_occupancy_and_speed():
    cr = _gesn()
    hkl = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 0], [3, 1, 1], [4, 0, 0], [3, 3, 1]])
    kv = 200.0
    pot = sf.Potential(cr, kv, "peng", "bird_king")
    _, up = pot.get(hkl)
    s = 0.5 * cr.g_length(hkl)
    fp = 0.9 * A.tds_absorptive_factor("Ge", s, 0.644, "peng", kv) + 0.1 * A.tds_absorptive_factor("Sn", s, 0.644, "peng", kv)
    pos = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.25, .25, .25], [.25, .75, .75], [.75, .25, .75],
                    [.75, .75, .25]])
    geom = np.exp(-2j * np.pi * hkl @ pos.T).sum(1)
    ref = C.gamma_factor(kv) / (np.pi * cr.volume_A3) * fp * np.exp(-0.644 * s**2) * geom
    np.testing.assert_allclose(up, ref, rtol=1e-12, atol=1e-16)
    assert pot.u0()[1] == pytest.approx(ref[0].real)
    # hundreds of reflections (every g <= 3 Å^-1, with 000) in well under a second once f' is tabulated
    many = np.vstack([[0, 0, 0], lattice_points(cr, 3.0)])
    assert len(many) > 500
    t0 = time.perf_counter()
    sf.Potential(cr, kv, "peng", "bird_king").get(many)
    assert time.perf_counter() - t0 < 1.0


def test_anisotropic_atoms_use_b_equivalent(si):
    beta = tuple(map(tuple, 0.25 * 0.4632 * si.G_star))  # the isotropic B written as a tensor
    aniso = Crystal("Si", si.cell, si.spacegroup, (AtomSite("Si", "Si", si.sites[0].fract, 1.0, None, beta),))
    np.testing.assert_allclose(A.b_equivalent(aniso.atoms["beta"], aniso.G), 0.4632, rtol=1e-12)
    hkl = [[0, 0, 0], [1, 1, 1], [4, 2, 2]]
    np.testing.assert_allclose(sf.Potential(aniso, 200.0, absorption="bird_king").get(hkl)[1],
                               sf.Potential(si, 200.0, absorption="bird_king").get(hkl)[1], rtol=1e-9, atol=1e-18)


def test_forward_model_absorbs_and_keeps_zone_axis_symmetry():
    cr = _gesn()
    zone = (1, 1, 0)
    m = ForwardModel(cr, 200.0, zone, absorption="bird_king")
    assert m.potential.absorption == "bird_king" and m.attrs()["absorption"] == "bird_king"
    ds = simulate(m, [0.0, 300.0, 800.0, 1500.0, 2500.0], kt=(0, 0, 0))
    total = ds.intensity.sum("beam").values
    assert total[0] == pytest.approx(1.0, abs=1e-10) and np.all(np.diff(total) < 0)
    hkl = np.stack([ds.h.values, ds.k.values, ds.l.values], 1)
    lut = {tuple(h): i for i, h in enumerate(hkl.tolist())}
    rot, _ = cr.symops
    ops = {tuple(np.rint(R).astype(int).ravel()) for R in rot if np.allclose(R @ np.asarray(zone, float), zone)}
    pairs = 0
    for i, h in enumerate(hkl):
        for R in ops:
            j = lut.get(tuple((h @ np.array(R).reshape(3, 3)).tolist()))
            if j is not None and j != i:
                pairs += 1
                np.testing.assert_allclose(ds.intensity.values[:, j], ds.intensity.values[:, i], atol=1e-10)
    assert pairs > 20


def test_config_accepts_bird_king(tmp_path):
    from stages.config import forward_model, validate_config

    from .conftest import DATA
    from .test_config_validation import CBED

    text = CBED.replace('absorption = "proportional"\nabsorption_fraction = 0.02', 'absorption = "bird_king"')
    assert 'absorption = "bird_king"' in text
    (tmp_path / "si.cif").write_bytes((DATA / "si.cif").read_bytes())
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "si_cbed.npy", np.ones((8, 8)))
    (run / "config.toml").write_text(text)
    model = forward_model(validate_config(run / "config.toml"))
    assert model.potential.absorption == "bird_king" and model.potential.u0()[1] > 0
