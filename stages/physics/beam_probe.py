"""Beam sets sized by a stated intensity accuracy, checked per run by a cheap convergence probe.

The thresholds of :data:`stages.physics.beams.DEFAULT_SELECTION` were measured for Si; a larger cell
has many more reciprocal-lattice points within the same excitation error and gets far more beams
than its intensities need.  Instead, :func:`probe_selection` chooses, per run, the smallest
strong-beam threshold ``sg_strong`` of a ladder (:data:`SG_LADDER`) whose intensities agree with a
reference selection to ``accuracy`` of each output beam's maximum, and records what it measured.

The probe (no I/O, deterministic):

* probe tiles: of the run's tilt tiles (side ``tile_invA``, as ``ForwardModel.solve_tiled`` makes
  them), the one nearest the centre of the field and the farthest out along the diagonals (``n_tiles``,
  default 3: the centre and two opposite corners of the field); in each, the centre and the four corners of the tile (the corners are the
  tilts farthest from where its beam set was centred: the worst case of the tile);
* a candidate selection is solved exactly as the run solves it: the tile's beam set (selected for
  the circle circumscribing the tile), at the probe tilts;
* reference: each probe tilt with its own beam set of :func:`reference_selection` (twice the largest
  ladder threshold, a 4x lower promotion threshold and 10x more Bethe beams), solved with
  ``general`` (exact); the candidates with the run's solver, so its error is part of the measured one;
* error of a candidate: max over output beams d of max over probe tilts and thicknesses of
  |I_d - I_d,ref| / max(I_d,max, floor), with I_d,max the beam's maximum over the field (the
  reference probe tilts and ``n_sample`` of the run's tilts solved with a small beam set) and
  ``floor`` (:data:`INTENSITY_FLOOR`) keeping a beam that is dark everywhere from demanding an
  unlimited matrix.

The chosen selection keeps every other threshold of ``base``.  Cost: the reference solves (one tilt
each) and the candidates up to the chosen one, a few seconds for ~200-beam problems.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from ..errors import QcbedInputError
from .beams import Selection, select_beams
from .bloch import coupling_matrices, solve

#: strong-beam thresholds tried, smallest first [Å^-1] (searched by bisection: the error falls with sg_strong)
SG_LADDER = (0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.055, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12)
#: simulation.laue_zones: the probe decides ("auto"), the zero-order Laue zone only, or every layer
LAUE_ZONES = ("auto", "zolz", "holz")
#: default target: |dI| <= 0.5 % of each output beam's maximum
DEFAULT_ACCURACY = 0.005
#: intensities below this fraction of the incident current do not set a beam's scale
INTENSITY_FLOOR = 1e-4


def reference_selection(base: Selection) -> Selection:
    """The probe's reference: a much larger beam set than any candidate.  With HOLZ, also three times more
    HOLZ Bethe beams and a larger pool (sg_max 2.5 1/Å); the HOLZ strong-beam rule is the candidates' (measured
    within 0.07 % of a reference with every HOLZ beam within 0.08 1/Å of the Bragg condition strong, bench/holz.py)."""
    ref = replace(base, sg_strong=min(2 * SG_LADDER[-1], base.sg_max), w_strong=base.w_strong / 4,
                  w_weak=base.w_weak / 10, bethe=True)
    if base.holz:
        ref = replace(ref, holz_w_weak=base.holz_w_weak / 3, sg_max=max(base.sg_max, 2.5))
    return ref


@dataclass
class ProbeResult:
    """What the probe measured (all plain numbers: goes into the stores' attrs as JSON)."""

    selection: Selection
    accuracy: float  # the target (fraction of each beam's maximum)
    error: float  # the chosen selection's measured error
    met: bool  # error <= accuracy
    ladder: list = field(default_factory=list)  # [{"sg_strong", "error", "n_strong_max", "n_bethe_max"}]
    worst_beam: list = field(default_factory=list)  # hkl of the output beam with the chosen error
    n_reference_max: int = 0
    n_probe_tilts: int = 0
    thickness_A: list = field(default_factory=list)
    wall_s: float = 0.0
    laue_zones: str = "zolz"  # what the run uses: "zolz" or "holz"
    laue_zones_config: str = "zolz"  # what was asked: "zolz", "holz" or "auto"
    #: the ZOLZ model against the HOLZ model at the probe tilts (fraction of each beam's maximum; None: not measured)
    holz_difference: float | None = None
    holz_difference_beam: list = field(default_factory=list)
    ladder_zolz: list = field(default_factory=list)  # the ZOLZ ladder, when "auto" went on to HOLZ
    #: the probe's own cost: solve calls (each a batch of tilts) and tilts solved, for the stage's counters
    eigen_solves: int = 0
    tilts_solved: int = 0

    def as_dict(self) -> dict:
        return {"sg_strong": self.selection.sg_strong, "accuracy": self.accuracy, "error": self.error,
                "met": self.met, "ladder": self.ladder, "worst_beam": self.worst_beam,
                "n_reference_max": self.n_reference_max,
                "n_probe_tilts": self.n_probe_tilts, "thickness_A": self.thickness_A, "wall_s": self.wall_s,
                "laue_zones": self.laue_zones, "laue_zones_config": self.laue_zones_config,
                "holz_difference": self.holz_difference, "holz_difference_beam": self.holz_difference_beam,
                "ladder_zolz": self.ladder_zolz, "eigen_solves": self.eigen_solves, "tilts_solved": self.tilts_solved}


def probe_tiles(model, kt, tile_invA: float, n_tiles: int = 5) -> list[tuple[int, int]]:
    """Tile cells (cx, cy) to probe: the one nearest the field's centre and the farthest out along
    the four diagonals (distinct, at most n_tiles)."""
    geo = model.geometry
    cart = geo.kt_cart(np.atleast_2d(np.asarray(kt, float)))
    xy = np.stack([cart @ geo.e_x, cart @ geo.e_y], 1)
    cells = np.unique(np.floor(xy / tile_invA + 0.5).astype(np.int64), axis=0)
    c = cells.astype(float) - cells.mean(axis=0)
    picks = [int(np.argmin(np.hypot(c[:, 0], c[:, 1])))]
    for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        picks.append(int(np.argmax(sx * c[:, 0] + sy * c[:, 1])))
    out = list(dict.fromkeys(picks))[:n_tiles]
    return [tuple(int(v) for v in cells[i]) for i in out]


def _tile_tilts(model, cell, tile_invA: float) -> np.ndarray:
    """Centre and four corners of a tile (hkl units) (5, 3)."""
    cx, cy = cell
    h = 0.5 * tile_invA
    x = cx * tile_invA + np.array([0.0, -h, h, -h, h])
    y = cy * tile_invA + np.array([0.0, -h, -h, h, h])
    return model.geometry.kt_from_xy(x, y)


def _solve_tile(model, selection: Selection, cell, tilts, out, tile_invA: float, method: str,
                tally: dict | None = None) -> tuple:
    """(solution, strong beams, Bethe beams) of the probe tilts of one tile with its run-time beam set."""
    geo = model.geometry
    centre = geo.kt_from_xy(cell[0] * tile_invA, cell[1] * tile_invA)[None, :]
    saved = model.selection
    try:
        model.selection = selection
        beams = model.beams(centre, out, radius_invA=tile_invA / np.sqrt(2))
    finally:
        model.selection = saved
    sol = solve(geo, model.potential, beams, tilts, out, method, coupling_matrices(model.potential, beams))
    if tally is not None:
        _count(tally, len(tilts))
    return sol, beams.n_strong, len(beams.weak)


def _count(tally: dict, n_tilts: int, n_solves: int = 1) -> None:
    """Add ``n_solves`` eigen-solves (one solve call: a batch of tilts) of ``n_tilts`` tilts to ``tally``."""
    tally["eigen_solves"] = tally.get("eigen_solves", 0) + n_solves
    tally["tilts_solved"] = tally.get("tilts_solved", 0) + n_tilts


def probe_selection(model, kt, out_hkl, thickness_A, accuracy: float = DEFAULT_ACCURACY,
                    tile_invA: float | None = None, base: Selection | None = None, n_tiles: int = 3, n_sample: int = 32,
                    ladder=SG_LADDER, fixed: bool = False, laue_zones: str | None = None) -> ProbeResult:
    """The smallest ``sg_strong`` of ``ladder`` whose intensities (at ``thickness_A`` [Å], for the
    output beams ``out_hkl``) agree with the reference to ``accuracy`` of each beam's maximum.

    ``kt``: the run's tilts (hkl units), ``tile_invA`` its tile side (default the model's), ``base``
    the selection whose other thresholds are kept (default the model's).  ``fixed``: measure only
    ``base`` (a configured ``sg_strong``), choose nothing.  If no rung meets the target, the largest
    is returned with ``met = False`` (the caller warns).  The model is not changed.

    ``laue_zones`` (default: "holz" if ``base.holz`` else "zolz"): "zolz" or "holz" size that model; "auto"
    sizes the ZOLZ model, then solves the probe tilts with the HOLZ model at the chosen ``sg_strong`` and
    takes HOLZ when the two differ by more than ``accuracy`` of a beam's maximum (``holz_difference``), in
    which case the ladder is run again for the HOLZ model against a HOLZ reference.
    """
    if not (np.isfinite(accuracy) and 0 < accuracy < 1):
        raise QcbedInputError("simulation.beam_accuracy", f"must be a fraction in (0, 1), got {accuracy}",
                              "e.g. 0.005 (0.5 % of each disk's maximum)")
    t0 = time.perf_counter()
    base = model.selection if base is None else base
    zones = laue_zones or ("holz" if base.holz else "zolz")
    if zones not in LAUE_ZONES:
        raise QcbedInputError("simulation.laue_zones", f"must be one of {', '.join(map(repr, LAUE_ZONES))}, got {zones!r}")
    tile = float(model.tile_invA if tile_invA is None else tile_invA)
    out = np.atleast_2d(np.asarray(out_hkl, int))
    t = np.atleast_1d(np.asarray(thickness_A, float))
    cells = probe_tiles(model, kt, tile, n_tiles)
    tilts = {c: _tile_tilts(model, c, tile) for c in cells}
    # each output beam's maximum over the field: a sample of the run's tilts (solved with a small beam set:
    # the scale needs ~10 % accuracy, not 0.5 %), and the reference probe tilts (in _ladder)
    kt_all = np.atleast_2d(np.asarray(kt, float))
    sample = kt_all[np.unique(np.linspace(0, len(kt_all) - 1, min(n_sample, len(kt_all))).astype(int))]
    saved = model.selection
    try:
        model.selection = replace(base, sg_strong=float(min(SG_LADDER[2], base.sg_max)), holz=False)
        field_max = model.solve_tiled(sample, out, tile_invA=tile, threads=1).intensities(t).max(axis=(0, 1))
    finally:
        model.selection = saved
    tally: dict = {}
    _count(tally, len(sample))
    rungs = [base.sg_strong] if fixed else [x for x in ladder if x <= base.sg_max] or [base.sg_max]
    run = partial(_ladder, model, cells, tilts, out, t, tile, field_max, rungs, accuracy, tally=tally)
    holz_diff, holz_beam, ladder_zolz = None, [], []
    if zones == "holz":
        best, results, n_ref, scale = run(replace(base, holz=True))
    else:
        best, results, n_ref, scale = run(replace(base, holz=False))
        if zones == "auto":
            chosen = replace(base, holz=False, sg_strong=best["sg_strong"])
            per_beam = np.zeros(len(out))
            for c in cells:
                zs, _, _ = _solve_tile(model, chosen, c, tilts[c], out, tile, model.method, tally)
                hs, _, _ = _solve_tile(model, replace(chosen, holz=True), c, tilts[c], out, tile, model.method, tally)
                per_beam = np.maximum(per_beam, (np.abs(zs.intensities(t) - hs.intensities(t)) / scale).max(axis=(0, 1)))
            holz_diff, holz_beam = float(per_beam.max()), out[int(np.argmax(per_beam))].tolist()
            if holz_diff > accuracy:
                zones, ladder_zolz = "holz", results
                best, results, n_ref, scale = run(replace(base, holz=True))
            else:
                zones = "zolz"
    chosen = replace(base, sg_strong=best["sg_strong"], holz=zones == "holz")
    err = best["error"]
    return ProbeResult(selection=chosen, accuracy=float(accuracy), error=float(err), met=bool(err <= accuracy),
                       ladder=results, worst_beam=best["worst_beam"], n_reference_max=int(n_ref),
                       n_probe_tilts=5 * len(cells), thickness_A=[float(x) for x in t], wall_s=time.perf_counter() - t0,
                       laue_zones=zones, laue_zones_config=laue_zones or zones, holz_difference=holz_diff,
                       holz_difference_beam=holz_beam, ladder_zolz=ladder_zolz,
                       eigen_solves=int(tally.get("eigen_solves", 0)), tilts_solved=int(tally.get("tilts_solved", 0)))


def _ladder(model, cells, tilts, out, t, tile, field_max, rungs, accuracy, base: Selection, tally: dict | None = None):
    """Bisection over ``rungs`` of sg_strong for ``base`` against its reference: (best rung record, all
    records in rung order, largest reference beam count, per-beam scale)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..simulate import solver_threads

    ref_sel = reference_selection(base)

    def one(k):
        # one reference beam set per probe tilt (its own, not the tile's), solved exactly ('general')
        beams = select_beams(model.geometry, model.potential, k[None, :], ref_sel, required=out)
        s = solve(model.geometry, model.potential, beams, k[None, :], out, "general",
                  coupling_matrices(model.potential, beams))
        return s.intensities(t)[0], beams.n_strong

    jobs = [k for c in cells for k in tilts[c]]
    model.potential.get(np.zeros((1, 3), int))  # as solve_tiled: the potential's tables before threads share it
    n_threads = min(solver_threads(), len(jobs))
    if n_threads > 1:  # the reference solves are independent: on the run's threads (the numbers do not change)
        with ThreadPoolExecutor(n_threads, thread_name_prefix="qcbed-probe") as ex:
            done = list(ex.map(one, jobs))
    else:
        done = [one(k) for k in jobs]
    if tally is not None:  # one exact solve per reference tilt (counted here: the threads share no counter)
        _count(tally, len(jobs), len(jobs))
    n_ref = max(n for _, n in done)
    ref, i = {}, 0
    for c in cells:
        ref[c] = np.stack([d for d, _ in done[i:i + len(tilts[c])]])  # (5, nt, n_out)
        i += len(tilts[c])
    allref = np.concatenate([ref[c] for c in cells])
    scale = np.maximum(np.maximum(allref.max(axis=(0, 1)), field_max), INTENSITY_FLOOR)  # (n_out,)
    evaluated: dict = {}

    def measure(i: int) -> dict:
        if i not in evaluated:
            sel = replace(base, sg_strong=float(rungs[i]))
            per_beam, ns_max, nw_max = np.zeros(len(out)), 0, 0
            for c in cells:
                sol, ns, nw = _solve_tile(model, sel, c, tilts[c], out, tile, model.method, tally)
                per_beam = np.maximum(per_beam, (np.abs(sol.intensities(t) - ref[c]) / scale).max(axis=(0, 1)))
                ns_max, nw_max = max(ns_max, ns), max(nw_max, nw)
            evaluated[i] = {"sg_strong": float(rungs[i]), "error": float(per_beam.max()), "n_strong_max": ns_max,
                            "n_bethe_max": nw_max, "error_per_beam": [float(x) for x in per_beam],
                            "worst_beam": out[int(np.argmax(per_beam))].tolist()}
        return evaluated[i]

    # bisection for the smallest rung that meets the target (the largest if none does)
    lo, hi = 0, len(rungs) - 1
    if measure(hi)["error"] <= accuracy:
        while lo < hi:
            mid = (lo + hi) // 2
            if measure(mid)["error"] <= accuracy:
                hi = mid
            else:
                lo = mid + 1
    return measure(hi), [evaluated[i] for i in sorted(evaluated)], n_ref, scale
