"""Crystal input: CIF (gemmi), PyExtal .dat and TOML give the same crystal; metric; DW factors."""

import math
import textwrap

import numpy as np
import pytest

from stages.errors import QcbedInputError
from stages.physics import structure_factors as sf
from stages.physics.crystal import AtomSite, Crystal
from stages.physics.crystal_io import crystal_from_mapping, load_crystal, read_dat

from .conftest import DATA

HKL = np.array([[1, 1, 1], [2, 2, 0], [3, 1, 1], [4, 0, 0], [2, 2, 2], [1, -1, -1], [5, 3, 1], [3, 3, 1]])


def test_three_formats_agree_exactly():
    crystals = [load_crystal(DATA / f"si.{ext}") for ext in ("cif", "dat", "toml")]
    ref = sf.electron_structure_factor(crystals[2], HKL)
    for c in crystals:
        assert c.spacegroup == "F d -3 m:2"
        assert len(c.atoms["element"]) == 8  # 8a special position counted once
        np.testing.assert_array_equal(sf.electron_structure_factor(c, HKL), ref)
        np.testing.assert_array_equal(sf.ug_from_fe(sf.electron_structure_factor(c, HKL), c, 200.0),
                                      sf.ug_from_fe(ref, crystals[2], 200.0))


def test_dat_reader_pyextal_features(tmp_path):
    """Keywords of PyExtal files: labels with '#', occ=par, hkl list, adj with +g and -g rows."""
    p = tmp_path / "x.dat"
    p.write_text(textwrap.dedent("""\
        #Si 110 zone axis
        # comment
        crystal silicon : dw = iso occ = par
        cell 5.4307 5.4307 5.4307 90.0 90.0 90.0
        atom Si#1   0.25000  0.25000  0.25000  0.4688 1
        atom Si#2   0.0000  0.0000  0.0000  0.4688 0.5
        spg 216 1
        hv 300.85
        zone 1 1 0
        norm 1 1 0
        kt 0 0 0
        xaxis 0 0 -4
        conv 2.0
        samp 30
        hkl 3
         0   0   0
         1  -1  -1
        -1   1  -1
        sgmax 3.5
        sgmin 0.15
        omeg 10.0
        aper 1.0
        abs 0.0
        adj 1
        -1 1 1 0.471822E-01  0 0.831778E-03 180
        1 -1 -1 0.471822E-01  0 0.831778E-03 180
        """))
    c = read_dat(p)
    d = c.extra["dat"]
    assert c.spacegroup.startswith("F -4 3 m")
    assert [s.label for s in c.sites] == ["Si#1", "Si#2"] and [s.element for s in c.sites] == ["Si", "Si"]
    assert [s.occupancy for s in c.sites] == [1.0, 0.5]
    assert len(c.atoms["element"]) == 8
    assert d["hv"] == 300.85 and d["zone"] == [1, 1, 0] and d["xaxis"] == [0, 0, -4]
    assert d["beams"] == [[0, 0, 0], [1, -1, -1], [-1, 1, -1]]
    assert len(d["adj"]) == 2 and d["adj"][0]["phase_prime_deg"] == 180
    # partial occupancy scales the scattering of that site
    f_full = sf.electron_structure_factor(
        Crystal("x", c.cell, c.spacegroup, (c.sites[0], AtomSite("Si#2", "Si", (0, 0, 0), 1.0, 0.4688))), [[2, 0, 0]])
    f_half = sf.electron_structure_factor(c, [[2, 0, 0]])
    f_one = sf.electron_structure_factor(Crystal("x", c.cell, c.spacegroup, (c.sites[0],)), [[2, 0, 0]])
    np.testing.assert_allclose(f_half, 0.5 * (f_full + f_one), rtol=1e-12)


def test_origin_choice_changes_phases_not_magnitudes():
    o2 = load_crystal(DATA / "si.toml")
    o1 = crystal_from_mapping({"cell": list(o2.cell), "spacegroup": "F d -3 m:1",
                               "atoms": [{"label": "Si", "xyz": [0, 0, 0], "B": 0.4632}]})
    f1, f2 = sf.electron_structure_factor(o1, HKL), sf.electron_structure_factor(o2, HKL)
    np.testing.assert_allclose(np.abs(f1), np.abs(f2), rtol=1e-12, atol=1e-12)
    # origin 2 (centrosymmetric at the origin): real; origin 1: F(111) has phase ±45°
    assert np.max(np.abs(f2.imag)) < 1e-12
    assert abs(abs(np.angle(f1[0], deg=True)) - 45) < 1e-9


def test_hexagonal_metric_and_monoclinic_volume():
    gan = crystal_from_mapping({"cell": [3.19, 3.19, 5.189, 90, 90, 120], "spacegroup": "P 63 m c",
                                "atoms": [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "B": 0.35},
                                          {"label": "N", "xyz": [1 / 3, 2 / 3, 0.377], "B": 0.82}]})
    a, c = 3.19, 5.189
    for h, k, l in [(1, 0, 0), (1, 1, 0), (1, 0, 1), (2, -1, 3), (0, 0, 2)]:
        inv_d2 = 4 / 3 * (h * h + h * k + k * k) / a**2 + l * l / c**2
        assert gan.g_length([h, k, l]) == pytest.approx(math.sqrt(inv_d2), rel=1e-13)
    assert gan.volume_A3 == pytest.approx(math.sqrt(3) / 2 * a * a * c, rel=1e-13)
    assert len(gan.atoms["element"]) == 4
    mono = crystal_from_mapping({"cell": [5.0, 6.0, 7.0, 90, 100, 90], "spacegroup": "P 1 21/c 1",
                                 "atoms": [{"label": "O", "xyz": [0.1, 0.2, 0.3], "B": 1.0}]})
    assert mono.volume_A3 == pytest.approx(5 * 6 * 7 * math.sin(math.radians(100)), rel=1e-13)
    # reciprocal basis: a_i . b*_j = δ_ij in the Cartesian frame
    np.testing.assert_allclose(mono.A.T @ mono.B, np.eye(3), atol=1e-14)
    assert mono.g_length([0, 0, 1]) == pytest.approx(1 / (7 * math.sin(math.radians(100))), rel=1e-13)


def test_isotropic_u_and_beta_forms_agree():
    """B, U_iso, and the equivalent anisotropic β and U_ij give identical Debye-Waller factors."""
    cell = [3.19, 3.19, 5.189, 90, 90, 120]
    base = {"cell": cell, "spacegroup": "P 63 m c"}
    B = 0.6
    iso = crystal_from_mapping({**base, "atoms": [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "B": B}]})
    uiso = crystal_from_mapping({**base, "atoms": [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "U_iso": B / (8 * math.pi**2)}]})
    gs = iso.G_star
    beta6 = [B / 4 * gs[0, 0], B / 4 * gs[1, 1], B / 4 * gs[2, 2], B / 4 * gs[0, 1], B / 4 * gs[0, 2], B / 4 * gs[1, 2]]
    bet = crystal_from_mapping({**base, "atoms": [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "beta": beta6}]})
    rl = iso.reciprocal_lengths
    u6 = [beta6[0] / (2 * math.pi**2 * rl[0] ** 2), beta6[1] / (2 * math.pi**2 * rl[1] ** 2),
          beta6[2] / (2 * math.pi**2 * rl[2] ** 2), beta6[3] / (2 * math.pi**2 * rl[0] * rl[1]),
          beta6[4] / (2 * math.pi**2 * rl[0] * rl[2]), beta6[5] / (2 * math.pi**2 * rl[1] * rl[2])]
    uij = crystal_from_mapping({**base, "atoms": [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "U": u6}]})
    hkl = [[1, 0, 0], [1, 1, 0], [2, -1, 3], [0, 0, 4], [3, 0, 1]]
    ref = sf.electron_structure_factor(iso, hkl)
    for c in (uiso, bet, uij):
        np.testing.assert_allclose(sf.electron_structure_factor(c, hkl), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mapping, field", [
    ({"cell": [5.43, 5.43, 5.43, 90, 90, 90], "spacegroup": 227, "atoms": [{"label": "Qq", "xyz": [0, 0, 0]}]}, "element"),
    ({"cell": [5.43, 5.43, -5.43, 90, 90, 90], "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0, 0]}]}, "cell"),
    ({"cell": [5.43, 5.43, 90, 90, 90], "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0, 0]}]}, "cell"),
    ({"cell": [5, 5, 5, 90, 90, 200], "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0, 0]}]}, "cell"),
    ({"cell": [5, 5, 5, 120, 120, 120], "spacegroup": 1, "atoms": [{"label": "Si", "xyz": [0, 0, 0]}]}, "cell"),
    ({"cell": [5.43] * 3 + [90] * 3, "spacegroup": "X y z", "atoms": [{"label": "Si", "xyz": [0, 0, 0]}]}, "spacegroup"),
    ({"cell": [5.43] * 3 + [90] * 3, "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0, 0], "B": -1}]}, ".B"),
    ({"cell": [5.43] * 3 + [90] * 3, "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0, 0], "occupancy": 1.5}]}, "occupancy"),
    ({"cell": [5.43] * 3 + [90] * 3, "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0]}]}, "xyz"),
    ({"cell": [5.43] * 3 + [90] * 3, "spacegroup": 227, "atoms": [{"label": "Si", "xyz": [0, 0, 0], "Biso": 1}]}, "Biso"),
])
def test_bad_crystal_input_names_the_field(mapping, field):
    with pytest.raises(QcbedInputError) as exc:
        crystal_from_mapping(mapping)
    assert field in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(QcbedInputError, match="file not found"):
        load_crystal(tmp_path / "missing.cif")
    bad = tmp_path / "bad.dat"
    bad.write_text("#t\ncell 5 5 5 90 90\natom Si 0 0 0 0.5\nspg 227 1\n")
    with pytest.raises(QcbedInputError, match="bad.dat line 2"):
        load_crystal(bad)
    bad.write_text("#t\ncell 5 5 5 90 90 90\natom Xx 0 0 0 0.5\nspg 227 1\n")
    with pytest.raises(QcbedInputError, match="unknown element"):
        load_crystal(bad)
    t = tmp_path / "bad.toml"
    t.write_text("cell = [5, 5, 5, 90, 90, 90\n")
    with pytest.raises(QcbedInputError, match="malformed TOML"):
        load_crystal(t)
    t.write_text("name='x'\n")
    with pytest.raises(QcbedInputError, match="crystal.cell: missing"):
        load_crystal(t)


SI_CIF = (DATA / "si.cif").read_text()


@pytest.mark.parametrize("edit, tag", [
    # the number says Fd-3m, the H-M symbol P 1: gemmi took P 1 and Si had 1 atom in the cell, not 8
    ({"_symmetry_space_group_name_H-M 'F d -3 m'": "_symmetry_space_group_name_H-M 'P 1'"}, "_space_group_IT_number"),
    ({"_space_group_IT_number 227": "_space_group_IT_number 225"}, "_space_group_IT_number"),
    # an operation loop of P 1 under the symbol and number of Fd-3m
    ({"loop_\n_atom_site_label": "loop_\n_space_group_symop_operation_xyz\n'x, y, z'\nloop_\n_atom_site_label"},
     "_space_group_IT_number"),
])
def test_cif_space_group_contradictions_are_refused(tmp_path, edit, tag):
    text = SI_CIF
    for a, b in edit.items():
        assert a in text
        text = text.replace(a, b)
    p = tmp_path / "si.cif"
    p.write_text(text)
    with pytest.raises(QcbedInputError) as info:
        load_crystal(p)
    assert info.value.field == f"{p}: {tag}" and "No. " in str(info.value) and "name one group" in str(info.value)


def test_cif_operation_loop_agreeing_with_the_symbols_reads(tmp_path):
    """The loop of Fd-3m's 192 operations (origin 2) with its number and symbol: read, 8 atoms in the cell."""
    import gemmi

    ops = "\n".join(f"'{op.triplet()}'" for op in gemmi.find_spacegroup_by_name("F d -3 m:2").operations())
    p = tmp_path / "si.cif"
    p.write_text(SI_CIF.replace("loop_\n_atom_site_label",
                                f"loop_\n_space_group_symop_operation_xyz\n{ops}\nloop_\n_atom_site_label"))
    c = load_crystal(p)
    assert c.spacegroup == load_crystal(DATA / "si.cif").spacegroup


def test_absence_kinds_of_silicon():
    """(0 0 1), (1 0 0): absent by the F centring (no beam); (2 0 0), (0 0 2): by the d glide (dynamically
    excited); (2 2 2): allowed by the space group (zero only for the atoms' special positions)."""
    si = load_crystal(DATA / "si.cif")
    assert [sf.absence_kind(si, h) for h in ((0, 0, 1), (1, 0, 0), (2, 0, 0), (0, 0, 2), (2, 2, 2), (1, -1, -1))] == \
        ["centring", "centring", "glide/screw", "glide/screw", None, None]
