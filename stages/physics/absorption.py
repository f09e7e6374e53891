"""Absorptive (thermal-diffuse-scattering) atomic form factors f' after Bird & King (1990).

Formula (Bird & King, Acta Cryst. A46 (1990) 202-208, after Hall & Hirsch, Proc. R. Soc. Lond. A
(1965): Einstein model, isotropic Debye-Waller factor B, TDS absorption only).  The paper itself
was not available here; the expression is the one in Felix's Fortran ``BirdKing`` routine, has the
form of Weickenmeier & Kohl's TDS integral, and reproduces the fitted Bird & King ("Thomas") table
shipped with Felix-python to 0.1-0.3 % (Si, Nb; tests/test_absorption.py)::

    f'(s) = (2h / (m0 v)) ∫ f_e(|s'|) f_e(|s - s'|) [1 - exp(-2B (s'^2 - s·s'))] d^2 s'      [Å]

s = sin(θ)/λ = |g|/2 [Å^-1] with g in 1/d units (no 2π) and s' a 2-D vector in the same units (the
Ewald sphere taken as a plane, the integral over the whole plane); f_e the non-relativistic elastic
factors [Å]; v the electron velocity.  The atom's absorptive structure-factor term is
f'(s) exp(-B s^2) (the Debye-Waller factor outside the integral: in the Einstein model the TDS term
is f f [exp(-B s^2) - exp(-B s'^2 - B |s - s'|^2)], and exp(-B s^2) factors out; De Graef,
*Introduction to Conventional TEM* (2003) eq. 6.47 after Weickenmeier & Kohl, Acta Cryst. A47 (1991)
590), and

    U'_g = γ / (π Ω) Σ_j occ_j f'_j(s) T_j(g) exp(-2πi g·r_j)                                  [Å^-2]

with the same γ/(πΩ) as U_g (structure_factors.py).  Open implementation read for the conventions
(not copied): Felix (WarwickMicroscopy, Fortran ``ug_matrix_mod``: ``BirdKing``/``IntegrateBK``
integrand, prefactor 2h/(m0 v), f' multiplied by exp(-B s^2) and by γ/(πΩ)).  Check of the prefactor
from the TDS cross-section: at g = 0, μ = 2π U'_0/k must equal n σ_TDS with σ_TDS = 4 γ^2 λ^2 ∫ f_e^2
(1 - exp(-2B s^2)) d^2 s (dΩ = λ^2 d^2 q, q = 2s; relativistic amplitude γ f_e), which gives
f'(0) = 2 γ λ ∫ ... = (2h/(m0 v)) ∫ ... .

Voltage: f' ∝ h/(m0 v) = γλ, so f' = (c/v) f'_c where f'_c is the value with prefactor 2h/(m0 c)
(the voltage-independent number tabulated by Bird & King and by the fitted "Thomas" table in
Felix-python), c/v = 1/β: 1.8241 at 100 kV, 1.4382 at 200 kV, 1.2879 at 300 kV.  Hence U'_g ∝ γ/β while
U_g ∝ γ: U'_g/U_g falls as 1/β with voltage.

Numerics: the integral is evaluated on a fixed product Gauss-Legendre grid (32 × 64 nodes per part;
error ~1e-8 relative against scipy dblquad and the closed form for Gaussian f_e, see the tests) after
folding the plane by its two mirror symmetries onto a quadrant about one peak of f_e f_e (polar
coordinates, radius mapped to [0, ∞) by ρ = C x/(1 - x)) plus a half-strip (Cartesian), see
:func:`bird_king_integral`.  f'_c(s) is tabulated once per (element, B, table) on s = 0 … 6 Å^-1
(step 0.05; further if asked) and interpolated with a cubic spline (error < 2e-5 of f'_c(0)); one
tabulation takes ~0.07 s.  The integral is over the whole plane: cutting it at |s'| = 6 Å^-1
(the end of Kirkland's fit) lowers f' by ~3 %.

Tables: ``kirkland`` is used as it is (3 Lorentzians give the 1/s^2 Coulomb tail, fitted to
q = 12 Å^-1).  ``peng`` (ITC 4.3.2.2) is a Gaussian fit for s <= 2 Å^-1 only: it is already 1.5-4 %
below the Hartree-Fock values at 2 Å^-1 and falls far below beyond (Nb: 0.054 vs 0.099 Å at
s = 3), while s' > 2 Å^-1 carries 15-25 % of the integral (Si-Nb).  So for s' > PENG_S_MAX = 1.5 Å^-1
(where Peng and Kirkland still agree to ~1 %) the Peng curve is continued with the Kirkland shape
scaled to match Peng there.  Peng-based f' then lies within 1 % of Kirkland-based f'; with the
Gaussian tail as it is, f'(Nb, B = 0.3) would be 14 % low.

Sign: f' (and f' exp(-B s^2)) turns negative at large s (Si, B = 0.46 Å^2: beyond s ≈ 2.2 Å^-1);
it is not clipped (Felix-python clips at 0).

Anisotropic atoms: the integral uses the isotropic equivalent B_eq = (8π^2/3) tr(U_cart)
= (4/3) tr(β G) (:func:`b_equivalent`), the outer factor T_j(g) the atom's full tensor.
Substitutional disorder: each species contributes occ_j f'_j (its own TDS); Laue diffuse scattering
from the disorder itself is not included.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.interpolate import CubicSpline

from ..errors import QcbedInputError
from . import constants as K
from .scattering import DEFAULT_TABLE, check_table, electron_scattering_factor

#: 2h/(m0 c) [Å] (= 2 Compton wavelengths): the Bird & King prefactor at v = c
BK_PREFACTOR_A = 2.0 * K.H_PLANCK / (K.M0_ELECTRON * K.C_LIGHT) * 1e10
#: s' [Å^-1] beyond which the Peng (ITC 4.3.2.2) fit is continued with the Kirkland shape
PENG_S_MAX = 1.5
#: tabulation of f'_c(s): step and default upper end [Å^-1]
S_STEP = 0.05
S_TABLE_MAX = 6.0

_N_PSI = 32  # Gauss-Legendre nodes in ψ ∈ [0, π/2] (quadrant) and in X (strip)
_N_X = 64  # Gauss-Legendre nodes in the mapped radius x (quadrant) and in y (strip), ∈ [0, 1)
_C_MAP = 0.3  # ρ = C x/(1 - x) [Å^-1]: half the nodes within ρ < 0.3 Å^-1, where f_e f_e peaks


def velocity_factor(hv_kV) -> float:
    """c/v = 1/β of the electron at the accelerating voltage hv_kV."""
    g = K.gamma_factor(hv_kV)
    return 1.0 / np.sqrt(1.0 - 1.0 / (g * g))


def b_equivalent(beta: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Isotropic-equivalent B_eq [Å^2] = (4/3) tr(β G) of DW exponents β (..., 3, 3), metric G [Å^2].

    (β = (B/4) G* for an isotropic atom gives B back; in general B_eq = 8π^2 tr(U_cart)/3.)
    """
    return (4.0 / 3.0) * np.einsum("...ij,ji->...", np.asarray(beta, float), G)


def _elastic(element: str, table: str):
    """f_e(s) [Å] used inside the integral (with the Peng tail continued, see the module doc)."""
    if table == "kirkland":
        return lambda s: electron_scattering_factor(element, s, "kirkland")
    scale = float(electron_scattering_factor(element, PENG_S_MAX, "peng")
                  / electron_scattering_factor(element, PENG_S_MAX, "kirkland"))

    def fe(s):
        s = np.asarray(s, float)
        out = electron_scattering_factor(element, np.minimum(s, PENG_S_MAX), "peng")
        far = s > PENG_S_MAX
        if np.any(far):
            out[far] = scale * electron_scattering_factor(element, s[far], "kirkland")
        return out

    return fe


@lru_cache(maxsize=None)
def _nodes():
    x, w = np.polynomial.legendre.leggauss(_N_PSI)
    psi = (x + 1) * np.pi / 4
    wpsi = w * np.pi / 4
    y, wy = np.polynomial.legendre.leggauss(_N_X)
    return psi, wpsi, (y + 1) / 2, wy / 2


def bird_king_integral(fe, s, B_A2: float) -> np.ndarray:
    """∫ f_e(|s'|) f_e(|s - s'|) [1 - exp(-2B(s'^2 - s·s'))] d^2 s' (dimensionless) for s (n,) [Å^-1].

    ``fe`` is a vectorised f_e(s) [Å]; s along x.  With s' = s/2 + t the integrand is symmetric under
    t → -t (the two f_e swap; the bracket depends on t^2 - s^2/4 only) and t_y → -t_y, so the integral
    is 4× that over t_x > 0, t_y > 0.  In coordinates (X, Y) = t - s/2 centred on the peak where
    |s - s'| = 0, that region is the quadrant X > 0, Y > 0 (polar coordinates ρ, ψ ∈ [0, π/2],
    ρ = C x/(1 - x)) plus the half-strip -s/2 < X < 0, Y > 0 (Cartesian, Y = C y/(1 - y)); there
    |s - s'| = ρ = |(X, Y)|, |s'| = |(s + X, Y)| and s'^2 - s·s' = ρ^2 + s X.
    """
    s = np.atleast_1d(np.asarray(s, float))
    B = float(B_A2)
    if B == 0.0:
        return np.zeros_like(s)
    psi, wpsi, y, wy = _nodes()
    r1 = _C_MAP * y / (1 - y)  # mapped radius (quadrant) and Y (strip) [Å^-1]
    w1 = wy * _C_MAP / (1 - y) ** 2  # Gauss-Legendre weight × dr/dy
    sc = s[:, None, None]
    # quadrant X > 0, Y > 0: polar (ρ, ψ), the same nodes for every s
    rho = r1[None, None, :]
    cos = np.cos(psi)[None, :, None]
    a = np.sqrt(sc * sc + 2 * sc * rho * cos + rho * rho)
    f = fe(r1)[None, None, :] * fe(a.ravel()).reshape(a.shape)
    quad = np.einsum("npx,p,x->n", f * -np.expm1(-2 * B * rho * (rho + sc * cos)), wpsi, w1 * r1)
    # half-strip -s/2 < X < 0, Y > 0: Cartesian, X = -(s/2) ξ, ξ ∈ [0, 1] on the ψ rule rescaled
    X = -0.5 * sc * (psi / (np.pi / 2))[None, :, None]
    r2 = X * X + rho * rho
    f = (fe(np.sqrt(r2).ravel()) * fe(np.sqrt((sc + X) ** 2 + rho * rho).ravel())).reshape(r2.shape)
    strip = 0.5 * s * np.einsum("npx,p,x->n", f * -np.expm1(-2 * B * (r2 + sc * X)), wpsi / (np.pi / 2), w1)
    return 4.0 * (quad + strip)


def _b_key(B_A2) -> float:
    B = float(B_A2)
    if not np.isfinite(B) or B < 0:
        raise QcbedInputError("B", f"Debye-Waller B must be a finite number >= 0 Å^2, got {B_A2!r}")
    return round(B, 9)


@lru_cache(maxsize=512)
def _tabulated(element: str, B: float, table: str, s_max: float) -> CubicSpline:
    """Cubic spline of f'_c(s) [Å] (prefactor 2h/(m0 c)) on s = 0 … s_max, step S_STEP."""
    n = int(round(s_max / S_STEP)) + 1
    s = np.linspace(0.0, s_max, n)
    fp = BK_PREFACTOR_A * bird_king_integral(_elastic(element, table), s, B)
    return CubicSpline(s, fp, bc_type=((1, 0.0), "not-a-knot"))  # f' is even in s


def tds_absorptive_factor(element: str, s_invA, B_A2: float, table: str = DEFAULT_TABLE, hv_kV=None,
                          debye_waller: bool = False) -> np.ndarray:
    """Bird & King absorptive form factor f' [Å] of one element at s = |g|/2 [Å^-1] (array).

    ``hv_kV=None``: the voltage-independent f'_c with prefactor 2h/(m0 c) (as tabulated by Bird &
    King); otherwise f' = (c/v) f'_c at that voltage.  ``debye_waller=True`` multiplies by
    exp(-B s^2), giving the atom's full absorptive scattering amplitude.  Cached per (element, B,
    table): the first call for a new B costs ~0.07 s, later ones microseconds.
    """
    table = check_table(table)
    B = _b_key(B_A2)
    s = np.abs(np.asarray(s_invA, float))
    if B == 0.0:
        return np.zeros_like(s)
    smax = float(np.max(s)) if s.size else 0.0
    s_tab = S_TABLE_MAX if smax <= S_TABLE_MAX else float(np.ceil(smax / 2.0) * 2.0)
    fp = _tabulated(element, B, table, s_tab)(s)
    if hv_kV is not None:
        fp = fp * velocity_factor(hv_kV)
    if debye_waller:
        fp = fp * np.exp(-B * s * s)
    return fp
