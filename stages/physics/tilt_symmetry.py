"""Symmetry of the tilt field: solve symmetry-related incident directions once.

Physics (pure functions, no I/O).  Let R be the rotation part of a space-group operation
{R|t} (x' = R x + t, acting on reciprocal vectors as h' = h R, see :class:`~.crystal.Crystal`),
S its Cartesian action on reciprocal space (g' = S g, S = B R^T B^-1, orthogonal) and suppose S
leaves the beam direction e_z (the zone) and the foil normal n invariant: S is then a mirror
or a rotation about the zone: one of the 2-D point-group operations of the zone-axis pattern
(diffraction-group symmetry: Buxton, Eades, Steeds & Rackham, Phil. Trans. R. Soc. Lond. A 281
(1976) 171).  Operations that reverse the beam, and reciprocity, are not used here.  Then

* U(hR) = exp(2πi h·t) U(h), also for U' (absorption has the crystal's symmetry), so the
  structure matrix for the image beams {gR} is D A D^* with the diagonal unitary
  D = diag(exp(2πi g·t)) (D_000 = 1);
* the excitation errors satisfy s_{Sg}(S K) = s_g(K) and the foil-normal factors 1 + g·n/K·n are
  unchanged because S n = n;

so, for the incident direction S kt and the image beam set S(B), the Bloch-wave amplitudes are
φ_{Sg}(S kt) = exp(2πi g·t) φ_g(kt) and the intensities

    I_{Sg}(S kt) = I_g(kt)                       (exactly, any thickness and absorption).

The result is reused only when it equals the direct solve: the tilt tiles of
``ForwardModel.solve_tiled`` (squares of side ``tile_invA`` on a grid through kt = 0 along e_x,
e_y) must map onto tiles (S acts on (x, y) as a signed permutation: mirrors along x, y or the
diagonals, 2- and 4-fold rotations), the tile of S kt must be the image cell of the tile of kt,
and the beam set selected for the image tile (strong and Bethe beams) must be S applied to the
beam set of the tile of kt — it is when the selection thresholds are not hit by rounding, and
the check makes it exact.  Refined U / U' overrides must themselves be symmetric (they are when
set through :meth:`~.structure_factors.Potential.set`); an operation that they break is dropped.

Output beams: a mapped tilt needs the representative's intensities of S^-1(out); when out_hkl is
not closed under S the representative tile's outputs are extended by those beams (they are strong
beams of its set because the image tile requires out and its set is S of this one).

Units: kt in reciprocal-lattice (hkl) components; (x, y) Cartesian along e_x, e_y [Å^-1]; the
matching tolerance is Cartesian [Å^-1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Geometry

#: Tilts whose Cartesian tangential components agree within this [Å^-1] are the same tilt.
TILT_TOL_INVA = 1e-9


@dataclass(frozen=True)
class TiltOp:
    """A 2-D operation of the zone-axis pattern.

    R: (3, 3) integer rotation on hkl (h' = h R); t: (3,) translation (fractional) of one
    space-group operation with this R; Q: (2, 2) its action on (x, y) [Å^-1] (float);
    Q_int: Q rounded (the action on tile cells).
    """

    R: np.ndarray
    t: np.ndarray
    Q: np.ndarray
    Q_int: np.ndarray

    @property
    def R_inv(self) -> np.ndarray:
        return np.rint(np.linalg.inv(self.R)).astype(int)

    def apply_hkl(self, hkl) -> np.ndarray:
        """h R for hkl (..., 3)."""
        return np.asarray(hkl, int) @ self.R

    def inverse_hkl(self, hkl) -> np.ndarray:
        return np.asarray(hkl, int) @ self.R_inv


def valid_operations(geometry: Geometry, tol: float = 1e-9) -> list[TiltOp]:
    """The crystal's operations that keep the zone and the foil normal and map the tile grid to itself.

    Identity first.  Each distinct rotation part is listed once (centring translations and
    screw/glide parts only change phases).  Rotations that reverse the beam are excluded.
    """
    cr = geometry.crystal
    rot, tra = cr.symops
    zone = np.asarray(geometry.zone, float)
    normal = np.asarray(geometry.normal, float)
    ncart = cr.direct_to_cart(normal)
    B = cr.B
    Binv = np.linalg.inv(B)
    ex, ey, ez = geometry.e_x, geometry.e_y, geometry.e_z
    ops: list[TiltOp] = []
    seen = set()
    order = sorted(range(len(rot)), key=lambda i: (not np.allclose(rot[i], np.eye(3)), i))
    for i in order:
        R = np.rint(rot[i]).astype(int)
        key = R.tobytes()
        if key in seen:
            continue
        seen.add(key)
        if not np.array_equal(R @ np.rint(zone).astype(int), np.rint(zone).astype(int)):
            continue  # beam direction changed (reversed or tilted)
        S = B @ R.T.astype(float) @ Binv  # Cartesian action on reciprocal vectors
        if np.max(np.abs(S.T @ S - np.eye(3))) > tol:
            continue  # not an isometry of this cell (cell does not conform to the space group)
        if np.linalg.norm(S @ ez - ez) > tol:
            continue
        # the normal is a direct-space direction: W = A R A^-1 = S^-1 on Cartesian vectors
        if np.linalg.norm(np.linalg.solve(S, ncart) - ncart) > tol * np.linalg.norm(ncart):
            continue
        Q = np.array([[ex @ S @ ex, ex @ S @ ey], [ey @ S @ ex, ey @ S @ ey]])
        Qi = np.rint(Q)
        if np.max(np.abs(Q - Qi)) > tol:
            continue  # does not map the square tile grid onto itself (e.g. 3-, 6-fold)
        ops.append(TiltOp(R=R, t=np.asarray(tra[i], float), Q=Q, Q_int=Qi.astype(np.int64)))
    return ops


def symmetric_values(values: dict, op: TiltOp, tol: float = 1e-9, missing_is_zero: bool = True) -> bool:
    """Whether {(h, k, l): complex} obeys v(hR) = exp(2πi h·t) v(h) to ``tol`` of its largest |v|.

    For derivative perturbations d(U + iU')/dp a missing entry is 0 (``missing_is_zero``); for
    refined overrides a missing image keeps its IAM value, so it counts as asymmetric.
    """
    if not values:
        return True
    scale = max(float(np.max(np.abs(np.asarray(v)))) for v in values.values())
    for h, v in values.items():
        hp = tuple(int(x) for x in np.asarray(h, int) @ op.R)
        if not missing_is_zero and hp not in values:
            return False
        want = np.exp(2j * np.pi * float(np.dot(op.t, h))) * np.asarray(v)
        if np.max(np.abs(np.asarray(values.get(hp, 0.0)) - want)) > tol * max(scale, 1e-300):
            return False
    return True


def symmetric_overrides(potential, op: TiltOp, tol: float = 1e-9) -> bool:
    """Whether the refined U / U' overrides of ``potential`` obey U(hR) = exp(2πi h·t) U(h).

    IAM and model absorption values have the crystal's symmetry by construction; overrides have it
    when they were set with :meth:`Potential.set`.
    """
    return (symmetric_values(potential._u, op, tol, missing_is_zero=False)
            and symmetric_values(potential._up, op, tol, missing_is_zero=False))


def _beam_key(hkl) -> frozenset:
    return frozenset(map(tuple, np.asarray(hkl, int).reshape(-1, 3).tolist()))


@dataclass
class TiltMap:
    """For every requested tilt: its representative and the column of each output beam there.

    rep (nt,): index of the representative tilt (rep[rep[i]] == rep[i]; solved tilts are those with
    rep[i] == i); op (nt,): index into ``ops`` of S with kt_i = S kt_rep; perm (nt, n_out): column,
    among the outputs of the representative's tile (``outputs[cell]``), holding I_{out_j}(kt_i);
    outputs: {cell: (n_ext, 3)} output beams to solve per tile (first n_out rows = out_hkl).
    """

    rep: np.ndarray
    op: np.ndarray
    perm: np.ndarray
    outputs: dict
    ops: list

    @property
    def solved(self) -> np.ndarray:
        return self.rep == np.arange(len(self.rep))

    @property
    def n_solved(self) -> int:
        return int(np.count_nonzero(self.solved))


def map_tilts(xy, cells, ops: list[TiltOp], out_hkl, beams_of=None, tol: float = TILT_TOL_INVA) -> TiltMap:
    """Representatives of the tilts (x, y) [Å^-1] (nt, 2) in tile ``cells`` (nt, 2) under ``ops``.

    ``beams_of(cell) -> BeamSet`` gives each tile's selected beams; a tilt is mapped with S only if
    the image tile's beam set (strong and weak) is S of the representative tile's (so the result
    equals the direct solve).  ``None``: beam sets taken as symmetric (tests only).
    Greedy and deterministic: tilts in input order; an unassigned tilt becomes a representative and
    claims the unassigned tilts of its orbit.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, float).reshape(-1, 2)
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    out = np.atleast_2d(np.asarray(out_hkl, int))
    nt, n_out = len(xy), len(out)
    rep = np.arange(nt)
    opi = np.zeros(nt, int)
    if nt >= 2:
        tree = cKDTree(xy)
        # repeated tilts (within tol, same tile) take the first one's solution (identity)
        canon = np.arange(nt)
        for i, j in sorted(tree.query_pairs(tol, output_type="ndarray").tolist()):
            if np.array_equal(cells[i], cells[j]) and canon[j] == j and canon[i] != j:
                canon[j] = canon[i]
        rep = canon.copy()
        # image of every tilt under every op -> matching tilt (or -1)
        match = np.full((len(ops), nt), -1, np.int64)
        for k, op in enumerate(ops[1:], start=1):
            d, j = tree.query(xy @ op.Q.T, k=1, distance_upper_bound=tol)
            ok = np.isfinite(d)
            match[k, ok] = canon[j[ok]]
        ok_tile: dict = {}

        def tile_ok(cell, k):
            key = (cell, k)
            hit = ok_tile.get(key)
            if hit is None:
                if beams_of is None:
                    hit = True
                else:
                    op = ops[k]
                    img = tuple(int(v) for v in np.asarray(cell) @ op.Q_int.T)
                    a, b = beams_of(cell), beams_of(img)
                    hit = (b is not None and _beam_key(op.apply_hkl(a.strong)) == _beam_key(b.strong)
                           and _beam_key(op.apply_hkl(a.weak)) == _beam_key(b.weak))
                ok_tile[key] = hit
            return hit

        assigned = canon != np.arange(nt)
        for i in range(nt):
            if assigned[i]:
                continue
            assigned[i] = True
            ci = tuple(int(v) for v in cells[i])
            for k in range(1, len(ops)):
                j = match[k, i]
                if j < 0 or assigned[j]:
                    continue
                if not np.array_equal(cells[j], cells[i] @ ops[k].Q_int.T):
                    continue  # on a tile boundary: the image is not in the image tile
                if not tile_ok(ci, k):
                    continue
                rep[j], opi[j] = i, k
                assigned[j] = True
        # repeated tilts follow their first occurrence
        dup = canon != np.arange(nt)
        rep[dup], opi[dup] = rep[canon[dup]], opi[canon[dup]]
    # outputs per representative tile and the columns of every tilt
    need: dict = {}
    solved = rep == np.arange(nt)
    out_key = {tuple(h): n for n, h in enumerate(out.tolist())}
    for i in np.nonzero(~solved)[0]:
        c = tuple(int(v) for v in cells[rep[i]])
        need.setdefault(c, set()).update(map(tuple, ops[opi[i]].inverse_hkl(out).tolist()))
    outputs = {}
    for c in {tuple(int(v) for v in cells[i]) for i in np.nonzero(solved)[0]}:
        extra = sorted(h for h in need.get(c, ()) if h not in out_key)
        outputs[c] = np.vstack([out, np.array(extra, int).reshape(-1, 3)]) if extra else out
    perm = np.tile(np.arange(n_out), (nt, 1))
    col_of = {c: {tuple(h): n for n, h in enumerate(o.tolist())} for c, o in outputs.items()}
    for i in np.nonzero(~solved)[0]:
        lut = col_of[tuple(int(v) for v in cells[rep[i]])]
        perm[i] = [lut[tuple(h)] for h in ops[opi[i]].inverse_hkl(out).tolist()]
    return TiltMap(rep=rep, op=opi, perm=perm, outputs=outputs, ops=list(ops))
