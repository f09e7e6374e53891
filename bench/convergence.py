"""Beam-selection convergence: how far the default (and other) thresholds are from a converged answer.

Run:  python bench/convergence.py      (about 1 minute)

For Si at 200 kV, [110] zone, three orientations (zone axis, an off-axis tilt, a 111 systematic
row), the intensities of every beam with I > 1% are compared with a full-matrix calculation of
~1200 beams (|g| <= 6 1/Å, no Bethe potentials).  Printed: matrix size, Bethe beams, and the
largest relative error at each thickness, for several strong-beam thresholds with and without
Bethe potentials.  These numbers are quoted in the docstring of stages.physics.beams.DEFAULT_SELECTION.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from stages.physics.beams import DEFAULT_SELECTION, Selection  # noqa: E402
from stages.physics.crystal_io import load_crystal  # noqa: E402
from stages.simulate import ForwardModel, simulate  # noqa: E402

T = [250.0, 500.0, 1000.0, 2000.0, 3000.0]
ORIENTATIONS = {"zone axis": (0.0, 0.0, 0.0), "off axis": (0.25, -0.25, 0.6), "111 row": (-0.5, 0.5, 5.5)}
REFERENCE = Selection(g_max=6.0, sg_max=1.5, sg_strong=1.0, bethe=False)


def main() -> None:
    si = load_crystal(Path(__file__).resolve().parents[1] / "data" / "si.toml")
    print("Si 200 kV [110]; largest relative error on beams with I > 1% vs a full ~1200-beam matrix")
    print(f"{'orientation':<10} {'sg_strong':>9} {'bethe':>5} {'ns':>4} {'nw':>4} " + " ".join(f"{t:>7.0f}Å" for t in T))
    for name, kt in ORIENTATIONS.items():
        ref = simulate(ForwardModel(si, 200.0, (1, 1, 0), selection=REFERENCE), T, kt=kt)
        lut = {h: i for i, h in enumerate(zip(ref.h.values.tolist(), ref.k.values.tolist(), ref.l.values.tolist()))}
        for sgs in (0.03, 0.045, 0.06, 0.08):
            for bethe in (True, False):
                sel = Selection(**{**DEFAULT_SELECTION.as_dict(), "sg_strong": sgs, "bethe": bethe})
                t0 = time.perf_counter()
                ds = simulate(ForwardModel(si, 200.0, (1, 1, 0), selection=sel), T, kt=kt)
                idx = [lut[h] for h in zip(ds.h.values.tolist(), ds.k.values.tolist(), ds.l.values.tolist())]
                r = ref.intensity.values[:, idx]
                err = np.where(r > 0.01, np.abs(ds.intensity.values - r) / np.where(r > 0.01, r, 1), 0.0).max(1)
                mark = " <- default" if sel == DEFAULT_SELECTION else ""
                print(f"{name:<10} {sgs:>9.3f} {str(bethe):>5} {ds.attrs['n_beams_matrix']:>4} {ds.attrs['n_beams_bethe']:>4} "
                      + " ".join(f"{100 * e:>7.3f}%" for e in err) + mark)


if __name__ == "__main__":
    main()
