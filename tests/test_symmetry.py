"""Symmetry-equivalent reflections and their phases; setting one U_g sets all its equivalents."""

import numpy as np
import pytest

from stages.errors import QcbedInputError
from stages.physics import structure_factors as sf
from stages.physics.crystal_io import crystal_from_mapping


def _general_crystal(spacegroup, cell, atoms):
    return crystal_from_mapping({"cell": cell, "spacegroup": spacegroup, "atoms": atoms})


CRYSTALS = {
    # Fd-3m origin 2: the case the anchor gets wrong (pyextal.md §7)
    "Fd-3m:2 general": _general_crystal("F d -3 m:2", [5.43] * 3 + [90] * 3,
                                        [{"label": "Si", "xyz": [0.125, 0.125, 0.125], "B": 0.46},
                                         {"label": "O", "xyz": [0.31, 0.07, 0.19], "B": 0.9, "occupancy": 0.3}]),
    "F-43m GaAs": _general_crystal("F -4 3 m", [5.65] * 3 + [90] * 3,
                                   [{"label": "Ga", "xyz": [0, 0, 0], "B": 0.62},
                                    {"label": "As", "xyz": [0.25, 0.25, 0.25], "B": 0.48}]),
    # hexagonal, non-centrosymmetric, with an anisotropic atom on a general position
    "P63mc aniso": _general_crystal("P 63 m c", [3.19, 3.19, 5.189, 90, 90, 120],
                                    [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "B": 0.35},
                                     {"label": "N", "xyz": [0.21, 0.57, 0.377], "U": [0.011, 0.013, 0.02, 0.004, 0.001, -0.002]}]),
    "P21/c monoclinic aniso": _general_crystal("P 1 21/c 1", [5.1, 6.3, 7.2, 90, 103.5, 90],
                                               [{"label": "Fe", "xyz": [0.11, 0.23, 0.37], "U": [0.01, 0.014, 0.009, 0.002, 0.003, -0.001]},
                                                {"label": "O", "xyz": [0.4, 0.05, 0.21], "B": 0.8}]),
}


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_equivalent_phases_match_atom_sums(name):
    """U(h') = p U(h) for every listed equivalent, checked against the full atom sums (aniso DW included)."""
    cr = CRYSTALS[name]
    rng = np.random.default_rng(1)
    for hkl in rng.integers(-4, 5, size=(25, 3)):
        if not hkl.any() or sf.is_systematically_absent(cr, hkl):
            continue
        f0 = sf.electron_structure_factor(cr, [hkl])[0]
        for h2, p, conj in sf.related_reflections(cr, hkl):
            f2 = sf.electron_structure_factor(cr, [h2])[0]
            expect = p * np.conj(f0) if conj else p * f0  # U(-h') = conj(p_h') conj(U(h)), listed as p
            assert abs(f2 - expect) < 1e-10 * max(1.0, abs(f0)), (name, hkl, h2)


def test_systematic_absences_have_zero_structure_factor():
    for name, cr in CRYSTALS.items():
        for hkl in np.random.default_rng(2).integers(-6, 7, size=(80, 3)):
            if hkl.any() and sf.is_systematically_absent(cr, hkl):
                assert abs(sf.electron_structure_factor(cr, [hkl])[0]) < 1e-10, (name, hkl)


def test_fd3m_origin2_signs():
    """In Fd-3m origin 2, F ∝ cos(π(h+k+l)/4): (111) and (1,-1,-1) have opposite signs (pyextal.md §7)."""
    cr = CRYSTALS["Fd-3m:2 general"]
    eq = dict(sf.symmetry_equivalents(cr, [1, 1, 1]))
    assert len(eq) == 8
    assert eq[(1, 1, 1)] == pytest.approx(1)
    assert eq[(1, -1, -1)].real == pytest.approx(-1)
    assert eq[(-1, -1, -1)].real == pytest.approx(1)


def test_setting_one_reflection_sets_all_equivalents():
    cr = CRYSTALS["Fd-3m:2 general"]
    pot = sf.Potential(cr, 200.0)
    iam = pot.iam([[-1, 1, 1]])[0]
    new = 0.97 * iam
    changed = pot.set([-1, 1, 1], U=new, Uprime=0.02 * new)
    assert len(changed) == 8
    hkl = np.array(changed)
    u, up = pot.get(hkl)
    # every equivalent is scaled by the same factor as the one set, with its own correct sign
    np.testing.assert_allclose(u, 0.97 * pot.iam(hkl), rtol=1e-12)
    np.testing.assert_allclose(up, 0.02 * 0.97 * pot.iam(hkl), rtol=1e-12)
    # 222: zero in the IAM of Si (8a site) but allowed by the space group; the crystal here also has a
    # general-position O atom, whose atom sums give the true relative phases of the {222} equivalents
    f222 = sf.electron_structure_factor(cr, [[2, 2, 2]])[0]
    changed = pot.set([2, 2, 2], U=1e-3 * f222 / abs(f222))
    hkl = np.array(changed)
    np.testing.assert_allclose(pot.get(hkl)[0], 1e-3 * sf.electron_structure_factor(cr, hkl) / abs(f222), rtol=1e-10)
    with pytest.raises(QcbedInputError, match="systematic absence"):
        pot.set([0, 0, 2], U=1e-3)


def test_noncentrosymmetric_friedel_mates_are_conjugate():
    cr = CRYSTALS["F-43m GaAs"]
    pot = sf.Potential(cr, 200.0)
    # 111 of GaAs is acentric: any phase is allowed; -1-1-1 is its Friedel mate (conjugate)
    val = 0.02 * np.exp(0.3j)
    changed = pot.set([1, 1, 1], U=val)
    assert (-1, -1, -1) in changed and len(changed) == 8
    u, _ = pot.get([[1, 1, 1], [-1, -1, -1]])
    assert u[0] == pytest.approx(val) and u[1] == pytest.approx(np.conj(val))
    # every related value follows the atom sums: U(h') = F(h') c, or F(h') c* for Friedel mates,
    # with c = U(111)/F(111)
    rel = sf.related_reflections(cr, [1, 1, 1])
    hkl = np.array([h for h, _, _ in rel])
    f = sf.electron_structure_factor(cr, hkl)
    c = val / sf.electron_structure_factor(cr, [[1, 1, 1]])[0]
    expect = np.array([fh * (np.conj(c) if conj else c) for fh, (_, _, conj) in zip(f, rel)])
    np.testing.assert_allclose(pot.get(hkl)[0], expect, rtol=1e-12)
    # 200 of F-43m is centric (-200 is equivalent by the 2-fold axis): its phase is 0 or 180 degrees
    assert sf.centric_phase(cr, [2, 0, 0]) is not None
    with pytest.raises(QcbedInputError, match="centric"):
        pot.set([2, 0, 0], U=0.02 * np.exp(0.3j))
    pot.set([2, 0, 0], U=-0.02)
    assert pot.get([[0, -2, 0]])[0][0] == pytest.approx(-0.02)
