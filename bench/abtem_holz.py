"""HOLZ at the Si [110] zone axis: qcbed against abTEM's Bloch module (an independent code with every layer).

abTEM is installed for this benchmark only (never a runtime dependency), in its own environment with
qcbed beside it (see bench/abtem_bloch.py):

    /tmp/abvenv/bin/python bench/abtem_holz.py        (about 5 minutes on one core)

Problem: Si [110], 200 kV, no absorption, the exact zone axis, 100-1500 Å.  abTEM selects its beams by
excitation error (``sg_max``) and |g| (``g_max`` 5 1/Å) in every layer and diagonalises them all (no
perturbation); its largest set here has ~2600 beams.  Three comparisons, on the zero-layer beams 000,
1-11, 002, 2-20, 1-13 (abTEM reports amplitudes, qcbed the current through the exit surface; they are the
same for zero-layer beams):

1. the same matrix: qcbed solves abTEM's own beam set with abTEM's U_g (no Bethe beams) — the two
   formulations of the HOLZ problem (excitation errors, the foil-normal metric) agree;
2. abTEM's convergence as its beam set grows (sg_max 0.1 ... 0.8 1/Å) against qcbed's converged HOLZ
   calculation with the same U_g (bench/holz.py's top rung, Bethe beams included);
3. qcbed's affordable HOLZ set (the default with ``laue_zones = "holz"``) and its ZOLZ set against the same.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

try:
    from abtem.bloch import dynamical as abd  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit("abTEM is not installed: see this file's header (it is a benchmark-only dependency)")

from bench.abtem_bloch import HV_KV, rotation_to_z, si_atoms  # noqa: E402
from bench.holz import LADDER  # noqa: E402
from stages.physics.beams import BeamSet, Selection  # noqa: E402
from stages.physics.bloch import coupling_matrices, solve  # noqa: E402
from stages.physics.crystal_io import load_crystal  # noqa: E402
from stages.simulate import ForwardModel  # noqa: E402

G_MAX = 5.0
SG_LADDER = (0.1, 0.2, 0.3, 0.5, 0.8)
THICKNESS = np.linspace(100.0, 1500.0, 8)
OUT = [(0, 0, 0), (1, -1, 1), (0, 0, 2), (2, -2, 0), (1, -1, 3)]


def main() -> None:
    t_start = time.perf_counter()
    crystal = load_crystal(REPO / "data" / "si.toml")
    model = ForwardModel(crystal, HV_KV, (1, 1, 0), x_axis=(0, 0, 1), table="kirkland", absorption="none",
                         include_u0=False)
    geo, pot = model.geometry, model.potential
    atoms, sigma = si_atoms(float(crystal.sites[0].b_iso))
    sf = abd.StructureFactor(atoms, g_max=2 * G_MAX + 1, parametrization="kirkland", thermal_sigma=sigma)
    sfa = sf.build(lazy=False)
    R0 = rotation_to_z(-geo.e_z, geo.e_x)
    cell = np.asarray(atoms.cell) @ R0.T
    prefactor = abd.energy2sigma(HV_KV * 1e3) / (abd.kappa * abd.energy2wavelength(HV_KV * 1e3) * np.pi)
    lut = {tuple(h): i for i, h in enumerate(np.asarray(sfa.hkl, int).tolist())}
    vals = sfa.array.ravel()
    # abTEM's U_g in qcbed's potential, for every difference any beam set here needs (|g| <= 2 G_MAX + 1)
    pot._u.update({h: float(np.real(vals[i]) * prefactor) for h, i in lut.items()})
    pot._cache.clear()
    kt = np.zeros((1, 3))
    print(f"Si [110], {HV_KV:.0f} kV, no absorption, zone axis, {THICKNESS[0]:.0f}-{THICKNESS[-1]:.0f} Å, "
          f"beams {OUT}; one BLAS thread; U_g: abTEM's (Kirkland) in both codes")

    def qcbed_sel(sel):
        model.selection = sel
        b = model.beams(kt, np.array(OUT))
        s = solve(geo, pot, b, kt, np.array(OUT), "general", coupling_matrices(pot, b))
        return s.intensities(THICKNESS)[0], b.n_strong, len(b.weak)

    t0 = time.perf_counter()
    ref, ns, nw = qcbed_sel(LADDER["L4"])
    print(f"\nreference: qcbed, bench/holz.py rung L4 ({ns} strong + {nw} Bethe beams, {time.perf_counter() - t0:.0f} s)")
    scale = ref.max(axis=0)

    print(f"\n{'abTEM sg_max':>12} {'beams':>6} {'s':>6} {'abTEM vs ref':>13} {'qcbed same beams vs abTEM':>26}")
    for sg in SG_LADDER:
        t0 = time.perf_counter()
        bw = abd.BlochWaves(sfa, energy=HV_KV * 1e3, sg_max=sg, g_max=G_MAX, orientation_matrix=R0)
        hkl = np.asarray(bw.hkl, int)
        zero = int(np.flatnonzero(np.all(hkl == 0, axis=1))[0])
        hkl = np.concatenate([hkl[zero:zero + 1], np.delete(hkl, zero, axis=0)])
        A = abd.calculate_structure_matrix(sfa.array, sfa.hkl, hkl, cell, HV_KV * 1e3, sfa.gpts)
        psi = abd.calculate_dynamical_scattering(A, hkl, cell, HV_KV * 1e3, THICKNESS)
        dt = time.perf_counter() - t0
        idx = [int(np.flatnonzero(np.all(hkl == np.array(h), axis=1))[0]) for h in OUT]
        i_ab = np.abs(psi[:, idx]) ** 2
        beams = BeamSet(strong=hkl, weak=np.zeros((0, 3), int), selection=Selection(holz=True))
        s = solve(geo, pot, beams, kt, np.array(OUT), "hermitian", coupling_matrices(pot, beams))
        i_q = s.intensities(THICKNESS)[0]
        e_ref = (np.abs(i_ab - ref) / scale).max()
        e_same = (np.abs(i_q - i_ab) / scale).max()
        print(f"{sg:>12.2f} {len(hkl):>6d} {dt:>6.1f} {e_ref:>13.4f} {e_same:>26.1e}", flush=True)

    print("\nqcbed's models against the reference (fraction of each beam's maximum)")
    for label, sel in (("ZOLZ default", Selection()), ("HOLZ default (affordable)", Selection(holz=True))):
        i, ns, nw = qcbed_sel(sel)
        print(f"{label:<28} {ns:>5d} strong + {nw:>5d} Bethe: {(np.abs(i - ref) / scale).max():.4f}")
    print(f"\nTotal run time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
