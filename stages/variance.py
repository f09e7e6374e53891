"""Variance stage: the per-pixel variance sigma^2 [counts^2] that the chi^2 metrics use.

:func:`variance_dataset` is the pure computation behind ``variance.zarr`` (no file I/O).  The
source, in this order unless ``source`` forces one:

1. ``"given"``: the pattern's ``variance`` variable (``[pattern] variance = ...``), as recorded;
2. ``"detector"``: the detector noise model (the ``detector`` argument, else the JSON in
   ``pattern.attrs["detector"]``), sigma^2 = m g (A I + delta I^2 + sigma_B^2) with I clipped at
   0 (:meth:`stages.physics.noise.DetectorModel.variance`, the sigma^2 of ``Chi2_const`` /
   ``Chi2_multibackground``);
3. ``"poisson"``: sigma^2 = max(I, 1) (:func:`stages.physics.noise.poisson_variance`, the
   sigma^2 of the ``Chi2`` metric).

The output has the dims and coordinates of ``pattern.intensity`` (CBED ``(y, x)``; LARBED
``(disk, y, x)`` with ``h, k, l(disk)``) and is NaN wherever ``pattern.valid`` is False.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import xarray as xr

from .errors import QcbedInputError
from .physics.noise import DetectorModel, poisson_variance

SOURCES = ("given", "detector", "poisson")
FORMULAS = {
    "given": "sigma^2 = the pattern's variance variable, as given",
    "detector": ("sigma^2 = m g (A I + delta I^2 + sigma_B^2) with I = max(intensity, 0) "
                 "(Zuo, Microsc. Res. Tech. 49 (2000) 245; m = mixing, g = gain, "
                 "sigma_B^2 = background_variance)"),
    "poisson": "sigma^2 = max(I, 1) (Poisson, floored at one count)",
}


def _detector(detector, pattern: xr.Dataset) -> DetectorModel | None:
    """The detector model from the argument (model, mapping or JSON text), else the pattern's attrs."""
    field = "detector"
    if detector is None:
        detector = pattern.attrs.get("detector")
        field = "pattern.detector"
        if detector is None:
            return None
    if isinstance(detector, DetectorModel):
        return detector
    if isinstance(detector, str):
        try:
            detector = json.loads(detector)
        except json.JSONDecodeError as exc:
            raise QcbedInputError(field, f"is not valid JSON ({exc.msg})",
                                  "give gain, mixing, A, delta, background_variance") from None
    if isinstance(detector, Mapping):
        return DetectorModel.from_mapping(detector, field)
    raise QcbedInputError(field, f"must be a detector model, got {type(detector).__name__}",
                          "give a DetectorModel or a mapping of gain, mixing, A, delta, background_variance")


def variance_dataset(pattern: xr.Dataset, detector=None, *, source: str | None = None) -> xr.Dataset:
    """Per-pixel variance [counts^2] of ``pattern`` (a load-stage Dataset), NaN at invalid pixels.

    ``detector``: a :class:`~stages.physics.noise.DetectorModel` (or its mapping / JSON); default
    the pattern's ``attrs["detector"]``.  ``source``: force ``"given"``, ``"detector"`` or
    ``"poisson"``; default the first available in that order.
    """
    if "intensity" not in pattern:
        raise QcbedInputError("pattern", "has no intensity variable", "give the Dataset of the load stage")
    inten = pattern["intensity"]
    if "valid" in pattern:
        valid = np.asarray(pattern["valid"].values, bool)
        if valid.shape != inten.shape:
            raise QcbedInputError("pattern.valid", f"shape {valid.shape} differs from the intensity's {inten.shape}")
    else:
        valid = np.isfinite(inten.values)
    i = np.asarray(inten.values, np.float64)
    nonfinite = valid & ~np.isfinite(i)
    if nonfinite.any():
        raise QcbedInputError("pattern.valid", f"{int(nonfinite.sum())} pixel(s) marked usable have a non-finite "
                              "intensity", "mark them invalid (load_pattern does)")
    model = _detector(detector, pattern)

    if source is None:
        source = "given" if "variance" in pattern else ("detector" if model is not None else "poisson")
    elif source not in SOURCES:
        raise QcbedInputError("variance.source", f"unknown source {source!r}", f"choose one of {', '.join(SOURCES)}")

    n_floored = 0
    attrs = {}
    if source == "given":
        if "variance" not in pattern:
            raise QcbedInputError("pattern.variance", "no variance is given with the pattern",
                                  "add variance = \"file\" to [pattern], or use the detector or Poisson variance")
        var = np.asarray(pattern["variance"].values, np.float64)
        if var.shape != i.shape:
            raise QcbedInputError("pattern.variance", f"shape {var.shape} differs from the intensity's {i.shape}")
        with np.errstate(invalid="ignore"):
            bad = valid & ~(np.isfinite(var) & (var >= 0))
        if bad.any():
            raise QcbedInputError("pattern.variance", f"{int(bad.sum())} usable pixel(s) have a non-finite or "
                                  "negative variance", "fix the variance file, or mask those pixels")
        sigma2 = var.copy()
    elif source == "detector":
        if model is None:
            raise QcbedInputError("pattern.detector", "no detector model is given",
                                  "give [pattern.detector] gain, mixing, A, delta, background_variance, "
                                  "or use the Poisson variance")
        with np.errstate(invalid="ignore"):
            sigma2 = model.variance(i)
            n_floored = int(np.count_nonzero(valid & (i < 0)))
        attrs["detector"] = json.dumps(model.to_mapping())
    else:
        with np.errstate(invalid="ignore"):
            sigma2 = poisson_variance(i)
            n_floored = int(np.count_nonzero(valid & (i < 1)))
    sigma2 = np.where(valid, sigma2, np.nan)

    with np.errstate(invalid="ignore"):
        n_nonpositive = int(np.count_nonzero(valid & (i <= 0)))
        n_zero = int(np.count_nonzero(valid & (sigma2 == 0)))
    coords = {name: c.variable.copy() for name, c in inten.coords.items()}
    attrs.update({
        "stage": "variance",
        "source": source,
        "units": "counts^2",
        "formula": FORMULAS[source],
        "kind": str(pattern.attrs.get("kind", "")),
        "n_valid": int(np.count_nonzero(valid)),
        "n_invalid": int(valid.size - np.count_nonzero(valid)),
        "n_nonpositive": n_nonpositive,
        "n_floored": n_floored,
        "n_zero_variance": n_zero,
    })
    da_attrs = {"units": "counts^2", "long_name": f"variance of the intensity ({source}); NaN = unusable pixel"}
    return xr.Dataset({"variance": (inten.dims, sigma2, da_attrs)}, coords=coords, attrs=attrs)
