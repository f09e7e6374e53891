"""ROI stage: regions of interest in display space, their simulation tilts and experimental samples.

A region is a parallelogram given by three display corners p1, p2, p3 [px] and sample counts
(n12, n13): points p1 + a (p2 - p1) + b (p3 - p1) on an n13 x n12 grid (rows along p1->p3, columns
along p1->p2); n13 = 1 makes a line p1 -> p2.  ``padding`` adds that many grid steps on every side:
padded points are simulated (for PSF convolution) but never compared with the data.

For CBED, display coordinates are relative to each disk's centre, so one set of tilts serves every
disk; for LARBED they are coordinates of the common tilt image.  Each included (disk, point) is
sampled from the experimental image (and variance) by cubic convolution at its pixel; points whose
4x4 support touches a masked, unrecorded or non-finite pixel are excluded and counted.

The stage output (``roi.zarr``) is an xarray Dataset with dims (disk, point):
``x, y(point)`` display px, ``region, i, j, inner(point)``, ``kt(point, hkl)``, ``row, col(disk, point)``,
``intensity, variance, valid(disk, point)`` and disk coordinates h, k, l.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .errors import QcbedInputError
from .physics.pattern_geometry import PatternGeometry
from .physics.sampling import cubic_sample, cubic_support, sampled_variance


@dataclass(frozen=True)
class Region:
    corners: tuple  # ((x1, y1), (x2, y2), (x3, y3)) display px
    samples: tuple[int, int]  # (n12, n13)

    def __post_init__(self):
        c = np.asarray(self.corners, float)
        if c.shape != (3, 2) or not np.all(np.isfinite(c)):
            raise QcbedInputError("roi.regions.corners", "need three display points [[x1, y1], [x2, y2], [x3, y3]]")
        n = tuple(int(v) for v in self.samples)
        if len(n) != 2 or n[0] < 1 or n[1] < 1:
            raise QcbedInputError("roi.regions.samples", f"need two positive counts [n12, n13], got {self.samples!r}")
        if n[0] > 1 and np.allclose(c[1], c[0]):
            raise QcbedInputError("roi.regions.corners", "p2 equals p1: the region has no extent")
        object.__setattr__(self, "corners", tuple(map(tuple, c.tolist())))
        object.__setattr__(self, "samples", n)

    def grid(self, padding: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Display points (m, 2) and their grid indices i (along p1->p3), j (along p1->p2), inner flag."""
        p1, p2, p3 = (np.asarray(x, float) for x in self.corners)
        n12, n13 = self.samples
        s12 = (p2 - p1) / (n12 - 1) if n12 > 1 else np.array([1.0, 0.0])
        if n13 > 1:
            s13 = (p3 - p1) / (n13 - 1)
        else:  # a line: pad perpendicular to it with the same step length
            s13 = np.array([-s12[1], s12[0]])
        ii = np.arange(-padding, n13 + padding)
        jj = np.arange(-padding, n12 + padding)
        I, J = np.meshgrid(ii, jj, indexing="ij")
        xy = p1 + I[..., None] * s13 + J[..., None] * s12
        inner = (I >= 0) & (I < n13) & (J >= 0) & (J < n12)
        return xy.reshape(-1, 2), I.ravel(), J.ravel(), inner.ravel()


def regions_from_config(section: dict) -> tuple[list[Region], int]:
    regs = section.get("regions")
    if not isinstance(regs, list) or not regs:
        raise QcbedInputError("roi.regions", "need at least one region {corners = [[x1,y1],[x2,y2],[x3,y3]], samples = [n12, n13]}")
    out = []
    for i, r in enumerate(regs):
        if not isinstance(r, dict) or "corners" not in r or "samples" not in r:
            raise QcbedInputError(f"roi.regions[{i}]", "needs corners = [[x1,y1],[x2,y2],[x3,y3]] and samples = [n12, n13]")
        try:
            out.append(Region(r["corners"], r["samples"]))
        except QcbedInputError as exc:
            raise QcbedInputError(f"roi.regions[{i}].{exc.field.split('.')[-1]}", exc.problem, exc.fix) from None
    padding = section.get("padding", 0)
    if not isinstance(padding, int) or padding < 0:
        raise QcbedInputError("roi.padding", f"must be a non-negative integer (grid steps), got {padding!r}")
    return out, padding


def build_roi(pattern: xr.Dataset, pg: PatternGeometry, regions: list[Region], disks, padding: int = 0,
              disk_mask=None) -> xr.Dataset:
    """Sample the pattern at the ROI points of every included disk (see module docstring).

    ``disks``: (nd, 3) reflections compared; ``disk_mask``: (n_regions, nd) bool, which disks each
    region includes (default all).
    """
    disks = np.atleast_2d(np.asarray(disks, int))
    kind = pattern.attrs.get("kind", pg.kind)
    if kind != pg.kind:
        raise QcbedInputError("pattern.kind", f"pattern is {kind!r} but the geometry is {pg.kind!r}")
    pts, reg, ii, jj, inner = [], [], [], [], []
    for r, region in enumerate(regions):
        xy, i, j, inn = region.grid(padding)
        pts.append(xy)
        reg.append(np.full(len(xy), r))
        ii.append(i)
        jj.append(j)
        inner.append(inn)
    xy = np.concatenate(pts)
    reg = np.concatenate(reg)
    ii, jj, inner = np.concatenate(ii), np.concatenate(jj), np.concatenate(inner)
    nd, npt = len(disks), len(xy)
    if disk_mask is None:
        dm = np.ones((len(regions), nd), bool)
    else:
        dm = np.asarray(disk_mask, bool)
        if dm.shape != (len(regions), nd):
            raise QcbedInputError("roi.disk_mask", f"must have shape (regions, disks) = ({len(regions)}, {nd}), got {dm.shape}")
    include = dm[reg].T & inner[None, :]  # (nd, npt)

    if kind == "larbed":
        lut = {tuple(h): i for i, h in enumerate(zip(pattern.h.values.tolist(), pattern.k.values.tolist(), pattern.l.values.tolist()))}
        missing = [h for h in disks.tolist() if tuple(h) not in lut]
        if missing:
            raise QcbedInputError("roi.disks", f"reflection {' '.join(map(str, missing[0]))} has no image in the pattern",
                                  "use reflections listed in the pattern's hkl")
        images = [lut[tuple(h)] for h in disks.tolist()]
    kt = pg.display_to_tilt(xy)
    rows = np.empty((nd, npt))
    cols = np.empty((nd, npt))
    inten = np.full((nd, npt), np.nan)
    var = np.full((nd, npt), np.nan)
    valid = np.zeros((nd, npt), bool)
    H, W = pattern.intensity.shape[-2:]
    has_var = "variance" in pattern
    for d, h in enumerate(disks):
        rc = pg.display_to_pixel(xy, h)
        rows[d], cols[d] = rc[:, 0], rc[:, 1]
        if kind == "larbed":
            img = pattern.intensity.values[images[d]]
            ok_pix = pattern.valid.values[images[d]] if "valid" in pattern else np.isfinite(img)
            vimg = pattern.variance.values[images[d]] if has_var else None
        else:
            img = pattern.intensity.values
            ok_pix = pattern.valid.values if "valid" in pattern else np.isfinite(img)
            vimg = pattern.variance.values if has_var else None
        sel = include[d]
        if not sel.any():
            continue
        r, c = rc[sel, 0], rc[sel, 1]
        out = (r < 1) | (r > H - 3) | (c < 1) | (c > W - 3)
        if out.any():
            k = int(np.nonzero(sel)[0][np.argmax(out)])
            raise QcbedInputError(
                f"roi.regions[{int(reg[k])}]",
                f"point ({xy[k, 0]:.1f}, {xy[k, 1]:.1f}) of disk {' '.join(map(str, h))} falls at pixel "
                f"({rc[k, 0]:.1f}, {rc[k, 1]:.1f}), outside the {H}x{W} pattern",
                "move the region inside the pattern or check the geometry (centre, gl, rotation)")
        v, ok = cubic_sample(img, r, c, ok_pix)
        inten[d, sel] = v
        valid[d, sel] = ok
        if vimg is not None:  # the variance of the interpolated sample, sum w^2 sigma^2 (independent pixels)
            var[d, sel] = np.where(ok, sampled_variance(vimg, cubic_support(img.shape, r, c)), np.nan)
    n_included = int(include.sum())
    if valid.sum() == 0:
        raise QcbedInputError("roi", f"none of the {n_included} ROI points has valid data (all masked, unrecorded or NaN)",
                              "move the regions onto recorded pixels or check the mask")
    for d, h in enumerate(disks):
        if include[d].any() and not valid[d].any():
            raise QcbedInputError("roi", f"disk {' '.join(map(str, h))}: every ROI point is masked, unrecorded or NaN",
                                  "exclude this disk or move the regions")
    ds = xr.Dataset(
        {
            "x": ("point", xy[:, 0], {"units": "px (display)"}),
            "y": ("point", xy[:, 1], {"units": "px (display)"}),
            "kt": (("point", "hkl"), kt, {"units": "reciprocal-lattice units (h, k, l components)"}),
            "row": (("disk", "point"), rows, {"units": "px"}),
            "col": (("disk", "point"), cols, {"units": "px"}),
            "intensity": (("disk", "point"), inten, {"units": "counts"}),
            "variance": (("disk", "point"), var, {"units": "counts^2"}),
            "valid": (("disk", "point"), valid),
            "included": (("disk", "point"), include),
        },
        coords={"region": ("point", reg), "i": ("point", ii), "j": ("point", jj), "inner": ("point", inner),
                "h": ("disk", disks[:, 0]), "k": ("disk", disks[:, 1]), "l": ("disk", disks[:, 2])},
        attrs={
            "kind": kind, "geometry": json.dumps(pg.as_dict()), "padding": padding,
            "regions": json.dumps([{"corners": r.corners, "samples": r.samples} for r in regions]),
            "n_points_included": n_included, "n_points_valid": int(valid.sum()),
            "n_points_excluded": n_included - int(valid.sum()), "has_variance": bool(has_var),
        },
    )
    return ds
