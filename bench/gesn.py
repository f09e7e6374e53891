"""Benchmark on the real GeSn digital-LACBED data set (data/gesn_lacbed/config.toml).

Run:  python bench/gesn.py                 (full-resolution simulation + thread ratio: ~10 min on 2 cores)
      python bench/gesn.py --threads-only  (the thread ratio alone: ~1 min)

What is measured:

1. One full simulation of all 27 disks at full resolution: every one of the 150 x 150 tilts of
   the recorded images (the display grid, 1 tilt step apart, about the zone axis), IAM + Bird &
   King absorption, general (non-Hermitian) solver, the config's beam selection and tiles, with
   the solver threads of this machine (QCBED_THREADS, default: every core).  Printed: tilts,
   tiles, strong beams per tile, wall time, and the time per tilt and core.
2. Tiles on threads: the same 625 tilts (a 25 x 25 patch, 2-step grid) solved with 1 thread and
   with N threads, back to back, best of 2; the ratio N-thread / 1-thread wall time (ideal 1/N)
   and whether the intensities are identical (they must be: each tile is solved alone).

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads-only", action="store_true", help="only the thread ratio")
    a = ap.parse_args(argv)
    model, pg, disks = _setup()
    thread_ratio(model, pg, disks)
    if not a.threads_only:
        full_resolution(model, pg, disks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
