"""Tilt-field symmetry: symmetry-related tilts solved once and mapped equal the full solve."""

import numpy as np
import pytest

from stages.physics.beams import Selection, lattice_points
from stages.physics.tilt_symmetry import map_tilts, valid_operations
from stages.simulate import ForwardModel

SMALL = Selection(g_max=2.5, sg_strong=0.03)  # ~40-90 strong beams: seconds per solve
THICK = [300.0, 1200.0, 2500.0]


def _model(si, zone, x_axis=None, normal=None, **kw):
    return ForwardModel(si, 200.0, zone, x_axis=x_axis, normal=normal, absorption="bird_king", selection=SMALL,
                        tile_invA=0.05, **kw)


def _grid(model, n=5, step=0.02):
    ax = step * np.arange(-n, n + 1)  # symmetric about the zone axis
    X, Y = np.meshgrid(ax, ax)
    return model.geometry.kt_from_xy(X.ravel(), Y.ravel())


def _compare(model, kt, out):
    full = model.solve_tiled(kt, out, symmetry=False, threads=1)
    sym = model.solve_tiled(kt, out, threads=1)
    assert full.n_solved == len(kt)
    np.testing.assert_allclose(sym.intensities(THICK), full.intensities(THICK), rtol=0, atol=1e-10)
    return full, sym


def test_si_110_mirrors(si):
    """[110] with x along 001: 2mm (mirrors along x and y, and the 2-fold); 11 x 11 grid -> 6 x 6 solved."""
    m = _model(si, (1, 1, 0), x_axis=(0, 0, 1))
    ops = valid_operations(m.geometry)
    assert len(ops) == 4
    assert sorted(np.diag(op.Q_int).tolist() for op in ops) == [[-1, -1], [-1, 1], [1, -1], [1, 1]]
    kt = _grid(m)
    _, sym = _compare(m, kt, lattice_points(si, 0.8, (1, 1, 0)))
    assert sym.n_solved == 36


def test_si_110_outputs_not_closed(si):
    """GeSn-style output list (00 2 but not 00 -2): the representative tiles solve the image beams too."""
    m = _model(si, (-1, 1, 0), x_axis=(0, 0, -1), normal=(-1, 1, 0))
    out = [[0, 0, 0], [0, 0, 2], [1, 1, 1], [1, 1, 3], [2, 2, 0], [0, 0, -4]]
    _, sym = _compare(m, _grid(m), out)
    assert sym.n_solved == 36
    assert max(len(sol.out_hkl) for _, sol in sym.parts) > len(out)


def test_si_001_4mm(si):
    """[001]: 4mm (8 operations); 11 x 11 grid -> 21 orbits (0 <= y <= x <= 5)."""
    m = _model(si, (0, 0, 1))
    assert len(valid_operations(m.geometry)) == 8
    kt = _grid(m)
    _, sym = _compare(m, kt, lattice_points(si, 0.8, (0, 0, 1)))
    assert sym.n_solved == 21
    assert sym.n_solved <= np.ceil(len(kt) / 8) + 2 * 6  # ~ nt/|G| (+ the points on mirrors)


def test_default_x_axis_110_only_twofold(si):
    """[110] with x along 1-11: the mirrors do not map the square tile grid onto itself; only the 2-fold is used."""
    m = _model(si, (1, 1, 0))
    ops = valid_operations(m.geometry)
    assert len(ops) == 2 and np.array_equal(ops[1].Q_int, -np.eye(2, dtype=int))
    _, sym = _compare(m, _grid(m, n=3), lattice_points(si, 0.8, (1, 1, 0)))
    assert sym.n_solved == (49 + 1) // 2


def test_tilted_normal_no_symmetry(si):
    """A foil normal off every mirror and off the zone: no operation, everything solved."""
    m = _model(si, (1, 1, 0), x_axis=(0, 0, 1), normal=(1.2, 1.0, 0.3))
    assert len(valid_operations(m.geometry)) == 1
    sym = m.solve_tiled(_grid(m, n=2), lattice_points(si, 0.8, (1, 1, 0)), threads=1)
    assert sym.n_solved == 25


def test_tilts_without_partners(si):
    """A random tilt set has no mirrored partners: all solved, identical numbers."""
    m = _model(si, (0, 0, 1))
    xy = np.random.default_rng(3).uniform(-0.08, 0.08, size=(12, 2))
    kt = m.geometry.kt_from_xy(xy[:, 0], xy[:, 1])
    full, sym = _compare(m, kt, lattice_points(si, 0.8, (0, 0, 1)))
    assert sym.n_solved == 12


def test_asymmetric_override_drops_operation(si):
    """A refined U that breaks a symmetry (set without its equivalents) disables that operation."""
    m = _model(si, (0, 0, 1))
    m.potential._u[(2, 2, 0)] = complex(m.potential.get([[2, 2, 0]])[0][0]) * 1.1  # not through Potential.set
    m.potential._cache.clear()
    kt = _grid(m, n=2)
    full, sym = _compare(m, kt, lattice_points(si, 0.8, (0, 0, 1)))
    assert sym.n_solved >= 15  # at most one mirror (the diagonal through 220) survives


def test_expand_generic_axes():
    """expand() maps any (n_part_tilts, ..., n_part_out) array by the representative and the permutation."""
    from stages.simulate import TiledSolution

    class _Sol:
        pass

    # 4 tilts: 0 and 2 solved (parts 0 and 1), 1 = image of 0 with outputs swapped, 3 = image of 2 via column 2
    parts = [(np.array([0]), _Sol()), (np.array([2]), _Sol())]
    rep = np.array([0, 0, 2, 2])
    perm = np.array([[0, 1], [1, 0], [0, 1], [2, 0]])
    ts = TiledSolution(n_tilts=4, out_hkl=np.zeros((2, 3), int), parts=parts, rep=rep, perm=perm)
    a0 = np.arange(6.0).reshape(1, 3, 2)  # (1 tilt, 3 params, 2 outputs)
    a1 = 100 + np.arange(9.0).reshape(1, 3, 3)  # (1 tilt, 3 params, 3 outputs: one extra image beam)
    e = ts.expand([a0, a1])
    assert e.shape == (4, 3, 2)
    np.testing.assert_array_equal(e[0], a0[0])
    np.testing.assert_array_equal(e[1], a0[0][:, ::-1])
    np.testing.assert_array_equal(e[2], a1[0][:, :2])
    np.testing.assert_array_equal(e[3], a1[0][:, [2, 0]])
    assert ts.n_solved == 2


def test_map_tilts_boundary_and_duplicates():
    """Tilts on a tile boundary whose mirror images land in a non-image tile are not mapped; duplicates map."""
    from stages.physics.tilt_symmetry import TiltOp

    ident = TiltOp(R=np.eye(3, dtype=int), t=np.zeros(3), Q=np.eye(2), Q_int=np.eye(2, dtype=int))
    mx = TiltOp(R=np.diag([-1, 1, 1]), t=np.zeros(3), Q=np.diag([-1.0, 1.0]), Q_int=np.diag([-1, 1]))
    tile = 0.1
    xy = np.array([[0.05, 0.0], [-0.05, 0.0], [0.03, 0.01], [-0.03, 0.01], [0.03, 0.01]])
    cells = np.floor(xy / tile + 0.5).astype(int)
    tm = map_tilts(xy, cells, [ident, mx], [[0, 0, 0], [1, 0, 0]])
    assert tm.rep.tolist() == [0, 1, 2, 2, 2]
    assert tm.perm[3].tolist() == [0, 2] and tm.outputs[(0, 0)].tolist() == [[0, 0, 0], [1, 0, 0], [-1, 0, 0]]
    assert tm.perm[4].tolist() == [0, 1]


@pytest.mark.parametrize("zone", [(1, 1, 0), (0, 0, 1)])
def test_default_on(si, zone):
    m = _model(si, zone, x_axis=(0, 0, 1) if zone == (1, 1, 0) else None)
    assert m.symmetry
    sol = m.solve_tiled(_grid(m, n=2), [[0, 0, 0]], threads=1)
    assert sol.n_solved < 25


def test_derivatives_map_like_intensities(si):
    """dI/dp (n_tilts, n_param, n_out) of a symmetric perturbation expands like the intensities."""
    from stages.physics.structure_factors import propagate
    from stages.simulate import TiledSolution

    if not hasattr(TiledSolution, "derivatives"):
        pytest.skip("no analytic derivatives in this tree")
    m = _model(si, (1, 1, 0), x_axis=(0, 0, 1))
    dpot = []
    for h0 in ((1, 1, 1), (2, 2, 0)):
        v = complex(m.potential.get([h0])[0][0])  # p = scale of U(h0): dU(h')/dp = phase * U(h0)
        dpot.append(propagate(si, h0, v))
    kt = _grid(m, n=3)
    out = lattice_points(si, 0.8, (1, 1, 0))
    full = m.solve_tiled(kt, out, symmetry=False, threads=1, dpot=dpot, deriv_thickness_A=1000.0)
    sym = m.solve_tiled(kt, out, threads=1, dpot=dpot, deriv_thickness_A=1000.0)
    assert sym.n_solved == 16
    da, db = full.derivatives()[0], sym.derivatives()[0]
    np.testing.assert_allclose(db, da, rtol=0, atol=1e-9 * np.abs(da).max())
