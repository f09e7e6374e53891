"""Mapping between experimental pixels, display space and simulation tilts.

Three frames (after PyExtal's ROI design, ../shared/research/pyextal.md §2, but through the metric
tensor so that any cell is right):

1. **Experimental**: pixel (row, col) of the recorded image, origin top-left, rows down.
2. **Display**: (x, y) in pixels, the pattern rotated so that the x-axis reflection g_x points
   along +x; y points down the screen.  The origin is the centre of the 000 disk (CBED) or the
   pixel of tilt ``tilt0`` (LARBED).  Regions of interest are defined here.
3. **Simulation**: the tangential incident wave vector Kt (reciprocal-lattice units, hkl).

    Kt(x, y) = tilt0 + p (x e_x - y e_y),       p = |g_x| / gl   [Å^-1 per pixel]

with e_x, e_y the unit vectors of the diffraction frame (geometry.py; y = zone × x, so screen-down
is -e_y).  ``gl`` is the length of g_x in pixels: the camera length for CBED, the number of
beam-tilt steps per |g_x| for LARBED.

Display -> experimental pixel, for disk g (CBED: disk g is centred at display o_g = gl (g·e_x,
-g·e_y) / |g_x|, Cartesian dot products; LARBED: each reflection has its own image and o_g = 0):

    (x', y')   = (x, y) + o_g,   y' -> -y' if ``flip``
    col        = centre_col + shift_col + dshift_col(g) + cos θ x' + sin θ y'
    row        = centre_row + shift_row + dshift_row(g) + scale_y (-sin θ x' + cos θ y')

θ = ``rotation_deg`` is the direction of g_x in the experimental image, counter-clockwise on the
screen from +col; ``scale_y`` is the y/x pixel-scale ratio of the detector (1 = square pixels);
``flip`` mirrors the display for a detector of opposite handedness.

The simulation tilt grid is fixed in Kt; a change of rotation, gl, centre or shifts moves the
experimental sampling points only, so geometry refinement never re-solves the eigenproblem.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import QcbedInputError
from .geometry import Geometry

KINDS = ("cbed", "larbed")


def _hkl_key(h) -> tuple[int, int, int]:
    return tuple(int(x) for x in h)


@dataclass(frozen=True)
class PatternGeometry:
    """Detector geometry of one pattern (see the module docstring for the equations)."""

    geometry: Geometry
    kind: str
    gl_px: float
    rotation_deg: float = 0.0
    centre_px: tuple[float, float] = (0.0, 0.0)  # (row, col)
    tilt0: tuple[float, float, float] = (0.0, 0.0, 0.0)  # hkl units
    shift_px: tuple[float, float] = (0.0, 0.0)  # (row, col)
    disk_shift_px: dict = field(default_factory=dict)  # {(h,k,l): (drow, dcol)}
    scale_y: float = 1.0
    flip: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise QcbedInputError("pattern.kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("gl_px", "scale_y"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise QcbedInputError(f"geometry.{name.removesuffix('_px')}", f"must be a positive number, got {v}")
        for name in ("rotation_deg",):
            if not np.isfinite(getattr(self, name)):
                raise QcbedInputError(f"geometry.{name}", "must be finite")
        for name, n in (("centre_px", 2), ("tilt0", 3), ("shift_px", 2)):
            v = np.asarray(getattr(self, name), float)
            if v.shape != (n,) or not np.all(np.isfinite(v)):
                raise QcbedInputError(f"geometry.{name.removesuffix('_px')}", f"must be {n} finite numbers, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(float(x) for x in v))
        ds = {}
        for h, v in dict(self.disk_shift_px).items():
            v = np.asarray(v, float)
            if v.shape != (2,) or not np.all(np.isfinite(v)):
                raise QcbedInputError(f"geometry.disk_shift[{h}]", "must be two finite numbers (row, col)")
            ds[_hkl_key(h)] = (float(v[0]), float(v[1]))
        object.__setattr__(self, "disk_shift_px", ds)

    # ------------------------------------------------------------------ basic quantities
    @property
    def gx_length_invA(self) -> float:
        return float(self.geometry.crystal.g_length(self.geometry.x_axis))

    @property
    def pixel_size_invA(self) -> float:
        """Tilt per display pixel p = |g_x| / gl [Å^-1]."""
        return self.gx_length_invA / self.gl_px

    def with_(self, **changes) -> PatternGeometry:
        return replace(self, **changes)

    def disk_offset(self, hkl) -> np.ndarray:
        """Display position (x, y) of the centre of disk g relative to 000 [px] (zero for LARBED)."""
        h = np.atleast_2d(np.asarray(hkl, float))
        if self.kind == "larbed":
            return np.zeros((len(h), 2))
        g = self.geometry.crystal.recip_to_cart(h)
        scale = self.gl_px / self.gx_length_invA
        return np.stack([g @ self.geometry.e_x, -(g @ self.geometry.e_y)], axis=1) * scale

    def _disk_shift(self, hkl) -> np.ndarray:
        h = np.atleast_2d(np.asarray(hkl, int))
        if not self.disk_shift_px:
            return np.zeros((len(h), 2))
        uniq, inv = np.unique(h, axis=0, return_inverse=True)
        vals = np.array([self.disk_shift_px.get(_hkl_key(x), (0.0, 0.0)) for x in uniq], float)
        return vals[inv.ravel()]

    # ------------------------------------------------------------------ display <-> tilt
    def display_to_tilt(self, xy) -> np.ndarray:
        """Display points (..., 2) [px] -> Kt (..., 3) in reciprocal-lattice units."""
        xy = np.asarray(xy, float)
        geo = self.geometry
        p = self.pixel_size_invA
        cart = geo.kt_cart(self.tilt0) + p * (np.multiply.outer(xy[..., 0], geo.e_x) - np.multiply.outer(xy[..., 1], geo.e_y))
        return geo.crystal.cart_to_recip(cart)

    def tilt_to_display(self, kt) -> np.ndarray:
        """Kt (..., 3) hkl units -> display (x, y) [px] (the component along the zone is ignored)."""
        geo = self.geometry
        d = geo.kt_cart(kt) - geo.kt_cart(self.tilt0)
        p = self.pixel_size_invA
        return np.stack([d @ geo.e_x / p, -(d @ geo.e_y) / p], axis=-1)

    # ------------------------------------------------------------------ display <-> pixel
    def display_to_pixel(self, xy, hkl=(0, 0, 0)) -> np.ndarray:
        """Display points (n, 2) of disk hkl (one (3,) or one per point (n, 3)) -> pixel (n, 2) as (row, col)."""
        xy = np.atleast_2d(np.asarray(xy, float))
        h = np.asarray(hkl, int)
        hh = h[None, :] if h.ndim == 1 else h  # one disk: offsets broadcast over the points
        q = xy + self.disk_offset(hh)
        if self.flip:
            q = q * np.array([1.0, -1.0])
        th = np.radians(self.rotation_deg)
        c, s = np.cos(th), np.sin(th)
        col = c * q[:, 0] + s * q[:, 1]
        row = self.scale_y * (-s * q[:, 0] + c * q[:, 1])
        off = np.array(self.centre_px) + np.array(self.shift_px) + self._disk_shift(hh)
        return np.stack([row, col], axis=1) + off

    def pixel_to_display(self, rc, hkl=(0, 0, 0)) -> np.ndarray:
        """Inverse of :meth:`display_to_pixel`."""
        rc = np.atleast_2d(np.asarray(rc, float))
        h = np.asarray(hkl, int)
        hh = h[None, :] if h.ndim == 1 else h
        off = np.array(self.centre_px) + np.array(self.shift_px) + self._disk_shift(hh)
        d = rc - off
        row, col = d[:, 0] / self.scale_y, d[:, 1]
        th = np.radians(self.rotation_deg)
        c, s = np.cos(th), np.sin(th)
        x = c * col - s * row
        y = s * col + c * row
        q = np.stack([x, y], axis=1)
        if self.flip:
            q = q * np.array([1.0, -1.0])
        return q - self.disk_offset(hh)

    # ------------------------------------------------------------------ composite
    def pixel_to_tilt(self, rc, hkl=(0, 0, 0)) -> np.ndarray:
        return self.display_to_tilt(self.pixel_to_display(rc, hkl))

    def tilt_to_pixel(self, kt, hkl=(0, 0, 0)) -> np.ndarray:
        return self.display_to_pixel(self.tilt_to_display(kt), hkl)

    def with_tilt0_from_pixel(self, rc, known_kt, hkl=(0, 0, 0)) -> PatternGeometry:
        """Geometry whose tilt0 makes pixel ``rc`` (of disk hkl) have the known tilt (e.g. a HOLZ-line crossing)."""
        xy = self.pixel_to_display(rc, hkl)[0]
        geo = self.geometry
        p = self.pixel_size_invA
        cart = geo.kt_cart(known_kt) - p * (xy[0] * geo.e_x - xy[1] * geo.e_y)
        return self.with_(tilt0=tuple(geo.crystal.cart_to_recip(cart).tolist()))

    def as_dict(self) -> dict:
        return {
            "kind": self.kind, "gl_px": self.gl_px, "rotation_deg": self.rotation_deg,
            "centre_px": list(self.centre_px), "tilt0": list(self.tilt0), "shift_px": list(self.shift_px),
            "disk_shift_px": {" ".join(map(str, k)): list(v) for k, v in self.disk_shift_px.items()},
            "scale_y": self.scale_y, "flip": self.flip,
        }
