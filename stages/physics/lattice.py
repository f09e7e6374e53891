"""Reciprocal-lattice points of a crystal: the hkl a zone or a sphere holds, allowed by the lattice centring.

Kept apart from beam selection (:mod:`stages.physics.beams`) so that the geometry (default x-axis) and
the beam selection both read them without importing each other.
"""

from __future__ import annotations

import numpy as np

from .crystal import Crystal


#: lattice_points results by (cell, space group, g_max, zone): a run selects beams for hundreds of tiles
_POINTS: dict = {}


def centring_vectors(crystal: Crystal) -> np.ndarray:
    """The pure translations among the space group's operations (n, 3) [fractions of the cell]: the centring."""
    rot, tra = crystal.symops
    ident = np.all(np.abs(rot - np.eye(3)) < 1e-9, axis=(1, 2))
    return tra[ident]


def lattice_points(crystal: Crystal, g_max: float, zone=None) -> np.ndarray:
    """Reciprocal-lattice points (hkl, int) with 0 < |g| <= g_max allowed by the lattice centring.

    With ``zone`` given, only the zero-order Laue zone (h u + k v + l w = 0).  000 comes first.
    """
    key = (tuple(crystal.cell), crystal.spacegroup, float(g_max), None if zone is None else tuple(int(x) for x in zone))
    hit = _POINTS.get(key)
    if hit is None:
        if len(_POINTS) > 16:
            _POINTS.clear()
        hit = _POINTS[key] = _lattice_points(crystal, g_max, zone)
        hit.setflags(write=False)
    return hit


def _lattice_points(crystal: Crystal, g_max: float, zone=None) -> np.ndarray:
    a_len = np.sqrt(np.diag(crystal.G))
    hmax = np.ceil(g_max * a_len).astype(int)
    ranges = [np.arange(-m, m + 1) for m in hmax]
    hkl = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    if zone is not None:
        hkl = hkl[hkl @ np.asarray(zone) == 0]
    glen = crystal.g_length(hkl)
    keep = glen <= g_max * (1 + 1e-12)
    cv = centring_vectors(crystal)
    if len(cv):
        ph = hkl @ cv.T
        keep &= np.all(np.abs(ph - np.rint(ph)) < 1e-9, axis=1)
    hkl, glen = hkl[keep], glen[keep]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], np.round(glen, 9)))
    return hkl[order]
