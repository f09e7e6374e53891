"""Forward model as a stage-level function: crystal + voltage + tilts -> beam intensities.

:func:`simulate` is what ``qcbed simulate`` runs and what later stages (ROI, synthetic data,
refinement) call.  It returns a labeled :class:`xarray.Dataset`:

* ``intensity(thickness, beam)`` for one incident direction, or ``intensity(tilt, thickness, beam)``
  for many, with coordinates ``thickness`` [Å], ``h, k, l(beam)``, ``kt_h, kt_k, kt_l(tilt)``;
* attrs: voltage, zone, x-axis, normal, scattering table, absorption model, solver, beam-selection
  thresholds, number of strong and weak beams, package version.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import __version__
from .errors import QcbedInputError
from .physics.beams import DEFAULT_SELECTION, BeamSet, Selection, select_beams
from .physics.bloch import BlochSolution, check_thickness, coupling_matrices, solve
from .physics.crystal import Crystal
from .physics.geometry import Geometry
from .physics.scattering import TABLE_REFERENCES
from .physics.structure_factors import Potential
from .physics.tilt_symmetry import map_tilts, symmetric_overrides, symmetric_values, valid_operations
from .interrupt import Interrupted, check_stop


def solver_threads() -> int:
    """Threads that solve tiles concurrently: QCBED_THREADS, else the cores this process may use (max 16).

    Each thread calls single-threaded LAPACK on its own tiles (LAPACK releases the GIL), so the
    cores are used without BLAS threading (../shared/research/stack.md); the result of a tile does
    not depend on the thread that solves it, so any thread count gives identical numbers.
    """
    v = os.environ.get("QCBED_THREADS", "").strip()
    if v:
        try:
            n = int(v)
        except ValueError:
            raise QcbedInputError("QCBED_THREADS", f"must be a whole number of threads, got {v!r}") from None
        if n < 1:
            raise QcbedInputError("QCBED_THREADS", f"must be >= 1, got {n}")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


@dataclass
class ForwardModel:
    """Crystal potential + geometry, reusable for many tilt sets and thicknesses."""

    crystal: Crystal
    hv_kV: float
    zone: tuple
    x_axis: tuple | None = None
    normal: tuple | None = None
    table: str = "peng"
    absorption: str = "none"
    absorption_fraction: float = 0.0
    uprime: dict = field(default_factory=dict)  # {(h,k,l): U'} per reflection
    u: dict = field(default_factory=dict)  # {(h,k,l): U} per reflection (refined values)
    selection: Selection = DEFAULT_SELECTION
    method: str = "general"
    include_u0: bool = True
    tile_invA: float = 0.05  # side of the tilt tiles that share one beam set [Å^-1]
    symmetry: bool = True  # solve_tiled: solve symmetry-related tilts once (stages/physics/tilt_symmetry.py)

    def __post_init__(self):
        self.potential = Potential(self.crystal, self.hv_kV, self.table, self.absorption, self.absorption_fraction)
        for h, v in self.u.items():
            self.potential.set(h, U=v)
        for h, v in self.uprime.items():
            self.potential.set(h, Uprime=v)
        u0 = self.potential.u0()[0] if self.include_u0 else 0.0
        self.geometry = Geometry(self.crystal, self.hv_kV, self.zone, self.x_axis, self.normal, u0)

    def symmetry_operations(self) -> list:
        """2-D operations of the zone-axis pattern usable for tilt mapping (identity first)."""
        hit = getattr(self, "_sym_ops", None)
        if hit is None or hit[0] is not self.geometry:
            hit = self._sym_ops = (self.geometry, valid_operations(self.geometry))
        return hit[1]

    def beams(self, kt, out_hkl=None, pool=None, radius_invA: float = 0.0) -> BeamSet:
        return select_beams(self.geometry, self.potential, kt, self.selection, required=out_hkl, pool=pool,
                            radius_invA=radius_invA)

    def solve(self, kt, out_hkl=None, beams: BeamSet | None = None) -> BlochSolution:
        kt = np.atleast_2d(np.asarray(kt, float))
        if beams is None:
            beams = self.beams(kt, out_hkl)
        return solve(self.geometry, self.potential, beams, kt, out_hkl, self.method,
                     coupling_matrices(self.potential, beams))

    def solve_tiled(self, kt, out_hkl, tile_invA: float | None = None, beam_cache: dict | None = None,
                    threads: int | None = None, symmetry: bool | None = None, dpot: list | None = None,
                    deriv_thickness_A: float | None = None) -> TiledSolution:
        """Solve many tilts in square tiles of side ``tile_invA`` [Å^-1] in the zone plane.

        Each tile has its own beam set, selected for every tilt within the circle circumscribing the
        tile (radius tile/√2 about its centre), not for the tilts that happen to fall in it: the result
        for a tilt never depends on which other tilts are solved with it, and a wide tilt range
        (LARBED) does not make every beam strong everywhere.  Tile centres lie on a grid through
        kt = 0, so an exact zone axis is a tile centre and keeps its symmetry.  ``out_hkl`` are the
        output beams of every tile.  ``beam_cache`` (a dict kept by the caller) reuses each tile's
        beam set across calls: a refinement selects beams once, at its starting structure factors,
        so its objective is smooth (the selection thresholds involve |U_g|).  ``threads``: tiles solved
        concurrently (default :func:`solver_threads`); the numbers do not depend on it.
        ``symmetry`` (default ``self.symmetry``): solve one tilt of each set related by a mirror or
        rotation about the zone that keeps the foil normal and the tile grid, and map the others
        (I_{Sg}(S kt) = I_g(kt), :mod:`stages.physics.tilt_symmetry`); a tilt is mapped only where
        the image tile's own beam set is the image of the representative's, so the numbers equal
        the full solve (to rounding, ~1e-13).  ``TiledSolution.n_solved`` counts the tilts solved.
        ``dpot``, ``deriv_thickness_A``: also the analytic derivatives dI/dp at that thickness
        (:func:`stages.physics.bloch.solve`; :meth:`TiledSolution.derivatives`).
        """
        tile = self.tile_invA if tile_invA is None else float(tile_invA)
        kt = np.atleast_2d(np.asarray(kt, float))
        out = np.atleast_2d(np.asarray(out_hkl, int))
        geo = self.geometry
        cart = geo.kt_cart(kt)
        xy = np.stack([cart @ geo.e_x, cart @ geo.e_y], 1)
        cell = np.floor(xy / tile + 0.5).astype(np.int64)
        cells, tile_id = np.unique(cell, axis=0, return_inverse=True)
        tile_id = tile_id.ravel()
        order = np.argsort(tile_id, kind="stable")
        bounds = np.searchsorted(tile_id[order], np.arange(len(cells) + 1))
        tiles = []
        for t, (cx, cy) in enumerate(cells):
            idx = order[bounds[t]:bounds[t + 1]]
            key = (int(cx), int(cy), tile, out.tobytes())
            beams = None if beam_cache is None else beam_cache.get(key)
            if beams is None:
                centre = geo.kt_from_xy(cx * tile, cy * tile)[None, :]
                beams = self.beams(centre, out, radius_invA=tile / np.sqrt(2))
                if beam_cache is not None:
                    beam_cache[key] = beams
            tiles.append(((int(cx), int(cy)), idx, beams))
        use_sym = self.symmetry if symmetry is None else bool(symmetry)
        tmap = None
        if use_sym and len(kt):
            ops = [op for op in self.symmetry_operations() if symmetric_overrides(self.potential, op)
                   and all(symmetric_values(d, op) for d in (dpot or ()))]  # dI/dp maps too when dU/dp is symmetric
            tile_beams = {c: b for c, _, b in tiles}
            tmap = map_tilts(xy, cell, ops, out, beams_of=tile_beams.get)  # also repeated tilts
        jobs = []  # (solved tilt indices, beams, output beams of the tile)
        for c, idx, beams in tiles:
            if tmap is not None:
                idx = idx[tmap.rep[idx] == idx]
                if not len(idx):
                    continue
                jobs.append((idx, beams, tmap.outputs[c]))
            else:
                jobs.append((idx, beams, out))
        self.potential.get(np.zeros((1, 3), int))  # warm the potential's tables before threads share it

        def one(job):
            check_stop()  # a stop request abandons the solve between tiles (stages.interrupt)
            idx, beams, o = job
            return idx, solve(geo, self.potential, beams, kt[idx], o, self.method, coupling_matrices(self.potential, beams),
                              dpot=dpot, deriv_thickness_A=deriv_thickness_A)

        n_threads = min(solver_threads() if threads is None else int(threads), len(jobs))
        if n_threads > 1:
            with ThreadPoolExecutor(n_threads, thread_name_prefix="qcbed-tile") as ex:
                try:
                    parts = list(ex.map(one, jobs))
                except Interrupted:
                    ex.shutdown(wait=True, cancel_futures=True)  # tiles not started are dropped
                    raise
        else:
            parts = [one(j) for j in jobs]
        if tmap is None:
            return TiledSolution(n_tilts=len(kt), out_hkl=out, parts=parts)
        return TiledSolution(n_tilts=len(kt), out_hkl=out, parts=parts, rep=tmap.rep, perm=tmap.perm)

    def attrs(self) -> dict:
        return {
            "hv_kV": float(self.hv_kV),
            "zone": list(self.geometry.zone),
            "x_axis": list(self.geometry.x_axis),
            "normal": list(self.geometry.normal),
            "scattering_table": self.table,
            "scattering_table_reference": TABLE_REFERENCES[self.table],
            "absorption": self.absorption,
            "absorption_fraction": float(self.absorption_fraction),
            "solver": self.method,
            "beam_selection": json.dumps(self.selection.as_dict()),
            "laue_zones": "holz" if self.selection.holz else "zolz",
            "mean_inner_potential_V": self.potential.mean_inner_potential_V(),
            "K_invA": self.geometry.K_invA,
            "crystal": json.dumps(self.crystal.summary()),
            "qcbed_version": __version__,
        }


@dataclass
class TiledSolution:
    """Eigen-solutions of tilt tiles; intensities for all tilts at any thickness without re-solving.

    With tilt symmetry only the representative tilts are solved: ``parts`` holds them (indices
    into the requested tilts), ``rep[i]`` is the representative of tilt i (``rep[i] == i`` when
    solved) and ``perm[i, j]`` the column of the representative's part holding output beam j of
    tilt i (a part's columns are its ``sol.out_hkl``: ``out_hkl`` first, then any image beams
    S^-1(out) that out_hkl lacks).  :meth:`expand` turns per-part arrays into per-tilt ones.
    """

    n_tilts: int
    out_hkl: np.ndarray
    parts: list  # [(solved tilt indices, BlochSolution)]
    rep: np.ndarray | None = None  # (n_tilts,) representative tilt; None: every tilt solved
    perm: np.ndarray | None = None  # (n_tilts, n_out) column in the representative's part

    def __post_init__(self):
        n_out = len(self.out_hkl)
        if self.rep is None:
            self.rep = np.arange(self.n_tilts)
        if self.perm is None:
            self.perm = np.broadcast_to(np.arange(n_out), (self.n_tilts, n_out))
        part_of = np.full(self.n_tilts, -1, np.int64)
        row_of = np.full(self.n_tilts, -1, np.int64)
        for p, (idx, _) in enumerate(self.parts):
            part_of[idx] = p
            row_of[idx] = np.arange(len(idx))
        rp = part_of[self.rep]
        if np.any(rp < 0):
            raise ValueError("a representative tilt is not among the solved tilts")
        self._members = [np.nonzero(rp == p)[0] for p in range(len(self.parts))]
        self._rows = [row_of[self.rep[m]] for m in self._members]

    @property
    def n_solved(self) -> int:
        """Tilts actually solved (n_tilts without tilt symmetry)."""
        return int(sum(len(idx) for idx, _ in self.parts))

    def expand(self, per_part, mid_shape: tuple = ()) -> np.ndarray:
        """Per-part arrays (n_part_tilts, ..., n_part_out), aligned with ``parts``, -> (n_tilts, ..., n_out).

        Tilt i takes row ``rep[i]`` of its representative's part and columns ``perm[i]`` (the last
        axis is the output beam; the middle axes, e.g. thickness or parameter, are carried along).
        ``mid_shape``: the middle axes, needed only when there are no parts.
        """
        per_part = list(per_part)
        n_out = len(self.out_hkl)
        if per_part:
            a0 = np.asarray(per_part[0])
            shape = (self.n_tilts,) + a0.shape[1:-1] + (n_out,)
            dtype = np.result_type(*per_part)
        else:
            shape, dtype = (self.n_tilts,) + tuple(mid_shape) + (n_out,), float
        out = np.empty(shape, dtype)
        for a, members, rows in zip(per_part, self._members, self._rows):
            if not len(members):
                continue
            b = np.asarray(a)[rows]
            cols = np.asarray(self.perm[members]).reshape((len(members),) + (1,) * (b.ndim - 2) + (n_out,))
            out[members] = np.take_along_axis(b, cols, axis=-1)
        return out

    def intensities(self, thickness_A) -> np.ndarray:
        t = check_thickness(thickness_A)
        return self.expand([sol.intensities(t) for _, sol in self.parts], (len(t),))

    def derivatives(self) -> tuple[np.ndarray, float]:
        """(dI (n_tilts, n_param, n_out), thickness [Å]): the analytic derivatives solved with the
        tiles (``solve_tiled(..., dpot=..., deriv_thickness_A=...)``)."""
        first = self.parts[0][1] if self.parts else None
        if first is None or first.dI is None:
            raise ValueError("this solution was solved without derivatives (give dpot and deriv_thickness_A)")
        out = self.expand([sol.dI for _, sol in self.parts])
        return out, float(first.dI_thickness_A)

    @property
    def n_beams(self) -> list[int]:
        return [sol.beams.n_strong for _, sol in self.parts]


def parse_thickness(spec) -> np.ndarray:
    """'100:2000:100' (start:stop:step, stop included), '500', '100,200,350' or a sequence -> Å array."""
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if ":" in s:
                parts = [float(x) for x in s.split(":")]
                if len(parts) != 3 or parts[2] <= 0:
                    raise ValueError
                start, stop, step = parts
                n = int(np.floor((stop - start) / step + 1e-9)) + 1
                if n < 1:
                    raise ValueError
                vals = start + step * np.arange(n)
            else:
                vals = np.array([float(x) for x in s.replace(",", " ").split()])
        except ValueError:
            raise QcbedInputError("thickness", f"cannot read {spec!r}",
                                  "use START:STOP:STEP in Å (e.g. 100:2000:100) or a list 500,1000") from None
    else:
        vals = np.asarray(spec, float)
    return check_thickness(vals)


def simulate(model: ForwardModel, thickness_A, kt=(0.0, 0.0, 0.0), out_hkl=None, pool=None) -> xr.Dataset:
    """Intensities of the output beams at every thickness, for one tilt (kt (3,)) or many (nt, 3).

    ``pool``: explicit candidate beams (e.g. a PyExtal ``hkl`` list) for the beam selection.
    """
    thickness = check_thickness(thickness_A)
    kt_arr = np.asarray(kt, float)
    single = kt_arr.ndim == 1
    kt2 = np.atleast_2d(kt_arr)
    out = None if out_hkl is None else np.atleast_2d(np.asarray(out_hkl, int))
    if out is None or pool is not None:
        # output = every strong beam (or an explicit PyExtal pool): one beam set for all tilts
        beams = model.beams(kt2, out, pool)
        sol = model.solve(kt2, out, beams)
        n_strong, n_weak = beams.n_strong, len(beams.weak)
    else:
        sol = model.solve_tiled(kt2, out)
        n_strong = max(p.beams.n_strong for _, p in sol.parts)
        n_weak = max(len(p.beams.weak) for _, p in sol.parts)
    inten = sol.intensities(thickness)  # (nt, nz, nb)
    out = sol.out_hkl
    coords = {
        "thickness": ("thickness", thickness, {"units": "Å"}),
        "h": ("beam", out[:, 0]), "k": ("beam", out[:, 1]), "l": ("beam", out[:, 2]),
        "g_invA": ("beam", model.crystal.g_length(out), {"units": "1/Å"}),
    }
    if single:
        data = {"intensity": (("thickness", "beam"), inten[0], {"units": "fraction of incident current"})}
        kt_attr = kt_arr.tolist()
    else:
        data = {"intensity": (("tilt", "thickness", "beam"), inten, {"units": "fraction of incident current"})}
        coords.update({f"kt_{c}": ("tilt", kt2[:, i]) for i, c in enumerate("hkl")})
        kt_attr = None
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(model.attrs())
    ds.attrs.update({"n_beams_matrix": int(n_strong), "n_beams_bethe": int(n_weak)})
    if kt_attr is not None:
        ds.attrs["kt"] = kt_attr
    return ds
