"""Physical constants and relativistic electron kinematics.

The constants are CODATA 2018, written out here rather than taken from
``scipy.constants`` so that a study re-run with a later scipy (which follows later
CODATA releases) reproduces the same numbers bit for bit.

Units follow the project conventions: lengths in Å, reciprocal lengths in Å^-1 without
2π (k = 1/λ), accelerating voltages in kV, potentials in V.
"""

from __future__ import annotations

import math

import numpy as np

#: Planck constant [J s] (exact, SI 2019)
H_PLANCK = 6.62607015e-34
#: Electron rest mass [kg] (CODATA 2018)
M0_ELECTRON = 9.1093837015e-31
#: Elementary charge [C] (exact)
E_CHARGE = 1.602176634e-19
#: Speed of light [m/s] (exact)
C_LIGHT = 299792458.0
#: Vacuum permittivity [F/m] (CODATA 2018)
EPSILON0 = 8.8541878128e-12

#: h^2 / (2 pi m0 e) in V Å^2: V_g [V] = VG_PER_FE * F_e [Å] / Ω [Å^3]
VG_PER_FE = H_PLANCK**2 / (2 * math.pi * M0_ELECTRON * E_CHARGE) * 1e20
#: Mott-Bethe constant m0 e^2 / (8 pi eps0 h^2) in Å (= 1 / (8 pi^2 a0)):
#: f_e(s) = MOTT_BETHE_A * (Z - f_x(s)) / s^2 with s = sin(theta)/lambda in Å^-1.
MOTT_BETHE_A = M0_ELECTRON * E_CHARGE**2 / (8 * math.pi * EPSILON0 * H_PLANCK**2) * 1e-10


def _check_kv(hv_kV) -> np.ndarray:
    hv = np.asarray(hv_kV, dtype=float)
    if not np.all(np.isfinite(hv)) or np.any(hv <= 0):
        from ..errors import QcbedInputError

        raise QcbedInputError("hv_kV", f"accelerating voltage must be a positive number of kV, got {hv_kV!r}",
                              "typical values are 60-300")
    return hv


def gamma_factor(hv_kV):
    """Relativistic Lorentz factor γ = 1 + eE / (m0 c^2) for an accelerating voltage in kV."""
    hv = _check_kv(hv_kV)
    return 1.0 + E_CHARGE * hv * 1e3 / (M0_ELECTRON * C_LIGHT**2)


def wavelength_A(hv_kV):
    """Relativistic electron wavelength λ [Å] = h / sqrt(2 m0 e E (1 + eE / (2 m0 c^2)))."""
    hv = _check_kv(hv_kV)
    e_v = hv * 1e3
    p = np.sqrt(2 * M0_ELECTRON * E_CHARGE * e_v * (1 + E_CHARGE * e_v / (2 * M0_ELECTRON * C_LIGHT**2)))
    return H_PLANCK / p * 1e10


def k0_invA(hv_kV):
    """Vacuum wave number k = 1/λ [Å^-1] (no 2π)."""
    return 1.0 / wavelength_A(hv_kV)


def interaction_constant(hv_kV):
    """Interaction constant σ = 2π m e λ / h^2 [rad V^-1 Å^-1], m = γ m0 (relativistic)."""
    lam_m = wavelength_A(hv_kV) * 1e-10
    m = gamma_factor(hv_kV) * M0_ELECTRON
    return 2 * math.pi * m * E_CHARGE * lam_m / H_PLANCK**2 * 1e-10


def ug_per_vg(hv_kV):
    """U_g [Å^-2] per V_g [V]: U_g = 2 m e V_g / h^2 with m = γ m0."""
    return 2 * gamma_factor(hv_kV) * M0_ELECTRON * E_CHARGE / H_PLANCK**2 * 1e-20
