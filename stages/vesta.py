"""X-ray structure factors as VESTA ``.hkl`` files (``structure_factors.hkl``, ``deformation.hkl``), and
their reader.

Layout: two title lines, the column header ``h k l |Fo| |Fc| Fc(real) Fc(imag) sigma(F)``, then one
whitespace-separated row per reflection -- the layout PyExtal writes for VESTA
(``pyextal.dinfo.BaseDiffractionInfo.save_hkl``, github.com/swampni/PyExtal; VESTA: K. Momma &
F. Izumi, J. Appl. Cryst. 44 (2011) 1272, manual chapter "Fourier synthesis").  One row per
reflection family (VESTA expands a family by the space group of the loaded structure, as PyExtal
assumes), F in electrons per cell, crystallographic phase convention exp(+2πi h·x) (the complex
conjugate of this project's electron convention).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__
from .summary import RunSummary

HKL_HEADER = ("h", "k", "l", "|Fo|", "|Fc|", "Fc(real)", "Fc(imag)", "sigma(F)")


def _iam_rows(iam: xr.Dataset, refined) -> list[tuple[tuple[int, int, int], complex, float]]:
    """Every family of structure_factors.zarr (0 < |g| <= g_max) but those of the refined reflections, with its
    IAM X-ray F conjugated into the crystallographic convention and sigma 0."""
    fam = np.stack([iam.family_h.values, iam.family_k.values, iam.family_l.values], 1)
    hk = np.stack([iam.h.values, iam.k.values, iam.l.values], 1)
    fam_of_refined = set()
    for hkl in refined:
        hit = np.nonzero((hk == np.asarray(hkl)).all(1))[0]
        if len(hit):
            fam_of_refined.add(tuple(int(x) for x in fam[hit[0]]))
    rows = []
    rep = iam.representative.values.astype(bool) & ~iam.absent.values.astype(bool)
    for i in np.nonzero(rep)[0]:
        t = tuple(int(x) for x in hk[i])
        if t in fam_of_refined or t in refined or t == (0, 0, 0):
            continue
        rows.append((t, complex(float(iam.F_x_re.values[i]), -float(iam.F_x_im.values[i])), 0.0))
    return rows


def vesta_hkl_text(s: RunSummary, iam: xr.Dataset | None, deformation: bool = False) -> str:
    """X-ray structure factors as a text file for VESTA's Fourier synthesis (Utilities > Fourier Synthesis),
    in the layout of the module docstring.

    * ``deformation=False`` (``structure_factors.hkl``): every family of structure_factors.zarr
      (0 < |g| <= g_max) with its IAM X-ray F (Mott-Bethe from the IAM U_g), the refined reflections
      replaced by their refined F (written with their own hkl): ``Fo = Fc = F``, sigma(F) the
      standard error (0 where not refined).  An Fo or Fc synthesis is the refined density.
    * ``deformation=True`` (``deformation.hkl``): the refined reflections only, with
      F = F_refined − F_IAM (complex, so the phase is exact also where the IAM value is zero, e.g.
      Si 2 2 2): a synthesis is the deformation density Δρ = ρ(refined) − ρ(IAM).
    """
    refined = {(r.h, r.k, r.l): r for r in s.structure_factors}
    title = (f"qcbed {__version__} run {s.run}: X-ray structure factors (electrons per cell) from refined U_g "
             "via Mott-Bethe, crystallographic convention exp(+2 pi i h.x)")
    what = ("F(refined) - F(IAM) of the refined reflections: Fourier synthesis = deformation density"
            if deformation else "refined reflections refined, all other families IAM; sigma(F) = 0 where not refined")
    lines = [title, what, " ".join(f"{h:<12}" if i > 2 else f"{h:<5}" for i, h in enumerate(HKL_HEADER)).rstrip()]
    if deformation:
        rows = [(hkl, complex(r.F_x_re - r.F_x_iam_re, r.F_x_im - r.F_x_iam_im), r.sigma_F_x)
                for hkl, r in refined.items()]
    else:
        rows = _iam_rows(iam, refined) if iam is not None else []
        rows += [(hkl, complex(r.F_x_re, r.F_x_im), r.sigma_F_x) for hkl, r in refined.items()]
        if iam is not None:  # in order of |g|, as the store
            g = {tuple(int(x) for x in h): float(gg) for h, gg in zip(np.stack([iam.h.values, iam.k.values, iam.l.values], 1),
                                                                     iam.g_invA.values)}
            rows.sort(key=lambda t: (g.get(t[0], math.inf), t[0]))
    for hkl, f, sig in rows:
        a = abs(f)
        lines.append(f"{hkl[0]:<5} {hkl[1]:<5} {hkl[2]:<5} {a:<12.6f} {a:<12.6f} {f.real:<12.6f} {f.imag:<12.6f} "
                     f"{(sig or 0.0):<12.6f}".rstrip())
    return "\n".join(lines) + "\n"


def read_vesta_hkl(path) -> list[dict]:
    """Rows of a .hkl file written by :func:`vesta_hkl_text` (for tests and for reading results back):
    {'hkl', 'Fo', 'Fc', 'F' (complex), 'sigma'}, F in electrons per cell."""
    out = []
    for line in Path(path).read_text().splitlines()[3:]:
        t = line.split()
        if len(t) == 8:
            out.append({"hkl": (int(t[0]), int(t[1]), int(t[2])), "Fo": float(t[3]), "Fc": float(t[4]),
                        "F": complex(float(t[5]), float(t[6])), "sigma": float(t[7])})
    return out
