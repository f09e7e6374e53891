"""Benchmark on the real GeSn digital-LACBED data set (data/gesn_lacbed/config.toml).

Run:  python bench/gesn.py                 (full-resolution simulation + thread ratio: ~10 min on 2 cores)
      python bench/gesn.py --threads-only  (the thread ratio alone: ~1 min)
      python bench/gesn.py --solvers       (3. alone: ~10 min on 2 cores)

What is measured:

1. One full simulation of all 27 disks at full resolution: every one of the 150 x 150 tilts of
   the recorded images (the display grid, 1 tilt step apart, about the zone axis), IAM + Bird &
   King absorption, general (non-Hermitian) solver, the config's beam selection and tiles, with
   the solver threads of this machine (QCBED_THREADS, default: every core).  Printed: tilts,
   tiles, strong beams per tile, wall time, and the time per tilt and core.
2. Tiles on threads: the same 625 tilts (a 25 x 25 patch, 2-step grid) solved with 1 thread and
   with N threads, back to back, best of 2; the ratio N-thread / 1-thread wall time (ideal 1/N)
   and whether the intensities are identical (they must be: each tile is solved alone).

3. ``auto`` against ``general`` on the full field at equal accuracy (--solvers): the same 22500 tilts,
   27 disks, tiles and beam sets (the run's probe-sized selection, ``simulation.beam_accuracy``), the
   thickness 1370 Å; "general" as before this work (every tilt solved, complex arithmetic: the
   couplings in the crystal's own origin 1), "auto" as a run now solves (tilt symmetry: the mirror
   lines of the [1-10] pattern, couplings about the inversion centre: real arithmetic).  Printed: wall
   times, the ratio, tilts solved and which solver 'auto' used, and max |I_auto - I_general| over every
   tilt and disk (absolute, and relative to each disk's maximum).

Needs ../shared/data/gesn-lacbed (see the config's pattern.data_source).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import config as C  # noqa: E402
from stages.simulate import solver_threads  # noqa: E402

CONFIG = ROOT / "data" / "gesn_lacbed" / "config.toml"


def _setup():
    cfg = C.validate_config(CONFIG)
    model = C.forward_model(cfg)
    pg = C.pattern_geometry(cfg, model)
    from stages.load import load_pattern

    pat = load_pattern(cfg.section("pattern"), cfg.base_dir)
    disks = np.stack([pat.h.values, pat.k.values, pat.l.values], 1).astype(int)
    return model, pg, disks


def _grid(half: float, step: float) -> np.ndarray:
    v = np.arange(-half, half + 1e-9, step)
    X, Y = np.meshgrid(v, v)
    return np.stack([X.ravel(), Y.ravel()], 1)


def full_resolution(model, pg, disks) -> None:
    xy = _grid(74.5, 1.0)  # 150 x 150 tilts, centred like the images (half-pixel offsets)
    kt = pg.display_to_tilt(xy)
    n = solver_threads()
    t0 = time.perf_counter()
    sol = model.solve_tiled(kt, disks)
    dt = time.perf_counter() - t0
    inten = sol.intensities([1330.0])
    nb = sol.n_beams
    print(f"full resolution: {len(kt)} tilts x {len(disks)} disks, {len(sol.parts)} tiles, {min(nb)}-{max(nb)} "
          f"strong beams (mean {np.mean(nb):.0f}), {n} thread(s): {dt:.1f} s "
          f"({1e3 * dt * n / len(kt):.1f} ms per tilt and core); intensities finite: {bool(np.isfinite(inten).all())}")


def thread_ratio(model, pg, disks) -> None:
    kt = pg.display_to_tilt(_grid(24.0, 2.0))
    n = max(2, solver_threads())
    cache: dict = {}
    model.solve_tiled(kt, disks, beam_cache=cache, threads=1)  # beam sets chosen once (as in a refinement)
    best = {1: np.inf, n: np.inf}
    out = {}
    for _ in range(2):
        for k in (1, n):
            t0 = time.perf_counter()
            sol = model.solve_tiled(kt, disks, beam_cache=cache, threads=k)
            best[k] = min(best[k], time.perf_counter() - t0)
            out[k] = sol.intensities([1330.0])
    same = np.array_equal(out[1], out[n])
    print(f"tiles on threads ({len(kt)} tilts): 1 thread {best[1]:.1f} s, {n} threads {best[n]:.1f} s: "
          f"ratio {best[n] / best[1]:.2f} (ideal {1 / n:.2f}); identical intensities: {same}")


def solvers(model, pg, disks) -> None:
    from unittest import mock

    from stages.physics import bloch
    from stages.physics.beam_probe import probe_selection

    xy = _grid(74.5, 1.0)
    kt = pg.display_to_tilt(xy)
    t = [1370.0]
    probe = probe_selection(model, pg.display_to_tilt(_grid(56.0, 2.0)), disks, np.linspace(1200.0, 1500.0, 5))
    model.selection = probe.selection
    print(f"beam probe: sg_strong {probe.selection.sg_strong} (error {100 * probe.error:.2f} % of a disk's maximum, "
          f"target {100 * probe.accuracy:.1f} %), {probe.wall_s:.0f} s")
    cache: dict = {}
    model.solve_tiled(kt[:1], disks, beam_cache=cache)  # warm-up
    res = {}
    for name in ("general", "auto"):
        model.method = name
        t0 = time.perf_counter()
        if name == "general":  # as before this work: no tilt symmetry, the crystal's own origin
            with mock.patch.object(bloch, "origin_phases", lambda pot, hkl: None):
                sol = model.solve_tiled(kt, disks, beam_cache=cache, symmetry=False)
        else:
            sol = model.solve_tiled(kt, disks, beam_cache=cache, symmetry=True)
        dt = time.perf_counter() - t0
        herm = sum(p.timing.get("n_tilts_hermitian", 0) for _, p in sol.parts)
        res[name] = (dt, sol.intensities(t)[:, 0, :], sol.n_solved, herm)
        nb = sol.n_beams
        print(f"{name:>8}: {dt:7.1f} s, {sol.n_solved} of {len(kt)} tilts solved ({herm} by hermitian), "
              f"{len(sol.parts)} tile solves, {min(nb)}-{max(nb)} strong beams", flush=True)
    (tg, ig, _, _), (ta, ia, _, _) = res["general"], res["auto"]
    scale = np.maximum(ig.max(axis=0), 1e-4)
    print(f"ratio general / auto: {tg / ta:.1f}x; max |I_auto - I_general| {np.abs(ia - ig).max():.1e} "
          f"(relative to each disk's maximum: {(np.abs(ia - ig) / scale).max():.1e})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads-only", action="store_true", help="only the thread ratio")
    ap.add_argument("--solvers", action="store_true", help="only auto vs general on the full field")
    a = ap.parse_args(argv)
    model, pg, disks = _setup()
    if a.solvers:
        solvers(model, pg, disks)
        return 0
    thread_ratio(model, pg, disks)
    if not a.threads_only:
        full_resolution(model, pg, disks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
