"""Diffraction geometry: zone axis, x-axis reflection, surface normal, incident wave vectors.

Conventions (after PyExtal/extal, ../shared/research/pyextal.md §4):

* ``zone`` [uvw] is a direct-lattice direction pointing toward the electron source: the beam
  travels along -zone.  ``normal`` [uvw] is the foil normal (default: the zone); its sign does
  not matter (the inward normal is taken so that the beam enters the crystal).
* ``x_axis`` (hkl) is a reciprocal vector perpendicular to the zone that fixes the horizontal
  direction of the pattern; y = zone x x (Cartesian unit vectors e_x, e_y, e_z = zone).
* ``kt`` is the tangential component of the incident wave vector in reciprocal-lattice units
  (hkl components, Å^-1 through the metric); kt = 0 is the exact zone axis.

The incident wave vector inside the crystal (refraction by the mean inner potential U_0) is
K = kt - sqrt(K^2 - |kt|^2) e_z with K^2 = k^2 + U_0, k = 1/λ.
Excitation error: s_g = (K^2 - |K + g|^2) / (2K) (positive inside the Ewald sphere).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import QcbedInputError
from . import constants as C
from .crystal import Crystal
from .lattice import lattice_points


def _int_triple(v, field_name: str) -> tuple[int, int, int]:
    try:
        a = np.asarray(v, dtype=float).ravel()
    except (TypeError, ValueError):
        raise QcbedInputError(field_name, f"must be three integers, got {v!r}") from None
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise QcbedInputError(field_name, f"must be three integers, got {v!r}")
    if not np.allclose(a, np.rint(a)):
        raise QcbedInputError(field_name, f"must be integer indices, got {' '.join(f'{x:g}' for x in a)}",
                              "give a lattice direction such as 1 1 0")
    t = tuple(int(x) for x in np.rint(a))
    if t == (0, 0, 0):
        raise QcbedInputError(field_name, "must not be 0 0 0")
    return t


def default_x_axis(crystal: Crystal, zone) -> tuple[int, int, int]:
    """Shortest reciprocal-lattice vector (allowed by the centring) perpendicular to the zone.

    Ties are broken by preferring positive leading indices, then index order, so the choice is
    deterministic.
    """
    z = np.asarray(zone, int)
    g_short = float(np.max(crystal.reciprocal_lengths)) * 4.0 + 1e-9
    pts = lattice_points(crystal, g_short, z)[1:]
    glen = crystal.g_length(pts)
    best = pts[np.abs(glen - glen.min()) < 1e-9]
    key = sorted(best.tolist(), key=lambda h: [-x for x in h])
    return tuple(int(x) for x in key[0])


@dataclass(frozen=True)
class Geometry:
    """Zone, x-axis, foil normal and voltage of one simulation."""

    crystal: Crystal
    hv_kV: float
    zone: tuple[int, int, int]
    x_axis: tuple[int, int, int] | None = None
    normal: tuple[float, float, float] | None = None
    u0_invA2: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "zone", _int_triple(self.zone, "zone"))
        C.gamma_factor(self.hv_kV)
        if self.x_axis is None:
            object.__setattr__(self, "x_axis", default_x_axis(self.crystal, self.zone))
        else:
            xa = _int_triple(self.x_axis, "x_axis")
            if int(np.dot(xa, self.zone)) != 0:
                raise QcbedInputError("x_axis", f"({' '.join(map(str, xa))}) is not perpendicular to the zone "
                                      f"[{' '.join(map(str, self.zone))}] (h u + k v + l w = {int(np.dot(xa, self.zone))})",
                                      "choose a reflection of the zero-order Laue zone")
            object.__setattr__(self, "x_axis", xa)
        if self.normal is None:
            object.__setattr__(self, "normal", tuple(float(x) for x in self.zone))
        else:
            n = np.asarray(self.normal, float).ravel()
            if n.shape != (3,) or not np.all(np.isfinite(n)) or not np.any(n):
                raise QcbedInputError("normal", f"must be a non-zero direction u v w, got {self.normal!r}")
            object.__setattr__(self, "normal", tuple(float(x) for x in n))
        if not np.isfinite(self.u0_invA2):
            raise QcbedInputError("u0", "mean inner potential must be finite")

    # frame --------------------------------------------------------------------------------
    @cached_property
    def e_z(self) -> np.ndarray:
        v = self.crystal.direct_to_cart(self.zone)
        return v / np.linalg.norm(v)

    @cached_property
    def e_x(self) -> np.ndarray:
        v = self.crystal.recip_to_cart(self.x_axis)
        v = v - (v @ self.e_z) * self.e_z
        return v / np.linalg.norm(v)

    @cached_property
    def e_y(self) -> np.ndarray:
        return np.cross(self.e_z, self.e_x)

    @cached_property
    def k0_invA(self) -> float:
        return float(C.k0_invA(self.hv_kV))

    @cached_property
    def K_invA(self) -> float:
        """Wave number in the crystal, K = sqrt(k^2 + U_0) [Å^-1]."""
        k2 = self.k0_invA**2 + self.u0_invA2
        if k2 <= 0:
            raise QcbedInputError("u0", "mean inner potential makes K^2 negative")
        return float(np.sqrt(k2))

    @cached_property
    def n_unit(self) -> np.ndarray:
        """Unit foil normal (Cartesian), oriented along +zone (sign fixed later per tilt)."""
        v = self.crystal.direct_to_cart(self.normal)
        v = v / np.linalg.norm(v)
        return v if v @ self.e_z >= 0 else -v

    # wave vectors -------------------------------------------------------------------------
    def kt_cart(self, kt_hkl) -> np.ndarray:
        """Tangential incident component, Cartesian [Å^-1], projected onto the zone plane."""
        kt = np.asarray(kt_hkl, float)
        if kt.shape[-1] != 3:
            raise QcbedInputError("kt", f"must be (..., 3) reciprocal-lattice components, got shape {kt.shape}")
        if not np.all(np.isfinite(kt)):
            raise QcbedInputError("kt", "must be finite")
        v = self.crystal.recip_to_cart(kt)
        return v - np.multiply.outer(v @ self.e_z, self.e_z)

    def kt_from_xy(self, x_invA, y_invA) -> np.ndarray:
        """Tangential tilts given along e_x, e_y [Å^-1] -> reciprocal-lattice components (hkl units)."""
        x = np.asarray(x_invA, float)
        y = np.asarray(y_invA, float)
        cart = np.multiply.outer(x, self.e_x) + np.multiply.outer(y, self.e_y)
        return self.crystal.cart_to_recip(cart)

    def incident(self, kt_hkl) -> np.ndarray:
        """Incident wave vectors K (..., 3) Cartesian [Å^-1] inside the crystal."""
        kt = self.kt_cart(kt_hkl)
        K = self.K_invA
        kt2 = np.einsum("...i,...i->...", kt, kt)
        if np.any(kt2 >= K * K):
            raise QcbedInputError("kt", "tangential component exceeds the wave number (tilt beyond 90 degrees)")
        kz = np.sqrt(K * K - kt2)
        return kt - np.multiply.outer(kz, self.e_z)

    def excitation_errors(self, Kvec: np.ndarray, g_cart: np.ndarray) -> np.ndarray:
        """s_g = -(2 K·g + g^2) / (2K) [Å^-1] for incident vectors (nt, 3) and beams (ng, 3)."""
        g2 = np.einsum("gi,gi->g", g_cart, g_cart)
        return -(2.0 * Kvec @ g_cart.T + g2[None, :]) / (2.0 * self.K_invA)

    def inward_normal(self, Kvec: np.ndarray) -> np.ndarray:
        """Unit normal pointing into the crystal along the beam (so K·n > 0), per tilt (nt, 3)."""
        n = -self.n_unit
        sign = np.sign(Kvec @ n)
        sign[sign == 0] = 1.0
        return sign[:, None] * n[None, :]
