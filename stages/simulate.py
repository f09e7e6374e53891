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

    def __post_init__(self):
        self.potential = Potential(self.crystal, self.hv_kV, self.table, self.absorption, self.absorption_fraction)
        for h, v in self.u.items():
            self.potential.set(h, U=v)
        for h, v in self.uprime.items():
            self.potential.set(h, Uprime=v)
        u0 = self.potential.u0()[0] if self.include_u0 else 0.0
        self.geometry = Geometry(self.crystal, self.hv_kV, self.zone, self.x_axis, self.normal, u0)

    def beams(self, kt, out_hkl=None, pool=None) -> BeamSet:
        return select_beams(self.geometry, self.potential, kt, self.selection, required=out_hkl, pool=pool)

    def solve(self, kt, out_hkl=None, beams: BeamSet | None = None) -> BlochSolution:
        kt = np.atleast_2d(np.asarray(kt, float))
        if beams is None:
            beams = self.beams(kt, out_hkl)
        return solve(self.geometry, self.potential, beams, kt, out_hkl, self.method,
                     coupling_matrices(self.potential, beams))

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
            "mean_inner_potential_V": self.potential.mean_inner_potential_V(),
            "K_invA": self.geometry.K_invA,
            "crystal": json.dumps(self.crystal.summary()),
            "qcbed_version": __version__,
        }


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
    beams = model.beams(kt2, out_hkl, pool)
    sol = model.solve(kt2, out_hkl, beams)
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
    ds.attrs.update({"n_beams_matrix": int(beams.n_strong), "n_beams_bethe": int(len(beams.weak)),
                     "timing_s": float(sol.timing["total_s"])})
    if kt_attr is not None:
        ds.attrs["kt"] = kt_attr
    return ds
