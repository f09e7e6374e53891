"""Pixel variance of recorded diffraction intensities (detector noise model).

Model of J. M. Zuo, "Electron detection characteristics of a slow-scan CCD camera, imaging
plates and film, and electron image restoration", Microsc. Res. Tech. 49 (2000) 245-268
(summarised in ../shared/research/anchors.md §4).  With I the recorded intensity in counts
above the dark level, N the number of incident electrons and g the conversion gain
(counts per electron, I = g N), the detective quantum efficiency is

    DQE(I) = 1 / (A + delta I + sigma_B^2 / I)

where A = 1 + F + 1/(m G) collects the Fano and conversion noise (about 1.1-1.2 for a YAG
scintillator CCD), delta is the fractional variance of the gain (flat-field) reference (about
4e-5) and sigma_B^2 the background (read-out + dark) term.  Because each electron's signal
spreads over several pixels, the variance of one pixel is reduced by the noise mixing factor
m = sum(PSF^2) of the unit-sum point-spread function (about 0.07-0.11 for phosphor/YAG CCDs,
0.47 for an EMPAD setting).  The variance of a pixel recording I counts is then

    sigma^2(I) = m g I / DQE(I) = m g (A I + delta I^2 + sigma_B^2)        [counts^2]

Low dose: read-out dominated (m g sigma_B^2); mid dose: Poisson-like (m g A I); high dose:
limited by the gain reference (sigma proportional to I, relative floor sqrt(m g delta)).

Why this form: PyExtal uses it in its Richardson-Lucy module, but its chi^2 metric
(``gof.Chi2_const``) uses sigma^2 = g I + m g (1/DQE - 1), which lacks the factor I on the DQE
term (so it is not sigma^2 = m g I / DQE of the paper, it reduces to about g I and ignores the
mixing factor).  qcbed uses the paper's m g I / DQE everywhere, so deconvolution and fitting
weight pixels identically.

Units: intensities in counts (ADU above dark level); ``gain`` in counts per electron; ``A``,
``delta`` and ``mixing`` dimensionless (``delta`` per count); ``background_variance`` is the
paper's sigma_B^2, in counts, so that the read-out + dark variance of a pixel is
m g sigma_B^2 counts^2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Mapping

import numpy as np

from ..errors import QcbedInputError

DETECTOR_KEYS = ("gain", "mixing", "A", "delta", "background_variance")


def _check_number(value, field: str) -> float:
    """``value`` as a finite float, else QcbedInputError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise QcbedInputError(field, f"must be a number, got {value!r}", "give a finite number")
    value = float(value)
    if not math.isfinite(value):
        raise QcbedInputError(field, f"must be finite, got {value}", "give a finite number")
    return value


def _validate(values: Mapping, p: str) -> dict:
    """Detector parameters as floats; QcbedInputError (field ``<p>.<name>``) unless allowed."""
    vals = {k: _check_number(values[k], f"{p}.{k}") for k in DETECTOR_KEYS}
    if vals["gain"] <= 0:
        raise QcbedInputError(f"{p}.gain", f"must be > 0 counts per electron, got {vals['gain']}",
                              "give the conversion gain of the camera (e.g. 2.2 for a YAG CCD)")
    if not 0 < vals["mixing"] <= 1:
        raise QcbedInputError(f"{p}.mixing", f"must be in (0, 1], got {vals['mixing']}",
                              "give m = sum of the squared unit-sum PSF (e.g. 0.111)")
    if vals["A"] < 1:
        raise QcbedInputError(f"{p}.A", f"must be >= 1, got {vals['A']}",
                              "A = 1 + F + 1/(m G) is at least 1 (about 1.1-1.2 for a CCD)")
    if vals["delta"] < 0:
        raise QcbedInputError(f"{p}.delta", f"must be >= 0, got {vals['delta']}",
                              "give the gain-reference variance (e.g. 4e-5), or 0")
    if vals["background_variance"] < 0:
        raise QcbedInputError(f"{p}.background_variance",
                              f"must be >= 0, got {vals['background_variance']}",
                              "give the background variance from dark frames, or 0")
    return vals


@dataclass(frozen=True)
class DetectorModel:
    """Detector parameters of Zuo (2000); see the module docstring for the model and units.

    gain: g, counts per incident electron (> 0).
    mixing: m = sum(PSF^2), noise mixing factor (0 < m <= 1).
    A: 1 + F + 1/(m G), Fano + conversion noise (>= 1).
    delta: fractional variance of the gain reference, per count (>= 0).
    background_variance: sigma_B^2, background term in counts (>= 0).
    """

    gain: float
    mixing: float
    A: float
    delta: float
    background_variance: float

    def __post_init__(self):
        vals = _validate({k: getattr(self, k) for k in DETECTOR_KEYS}, "detector")
        for k, v in vals.items():  # store plain floats (an int or numpy scalar may be given)
            object.__setattr__(self, k, v)

    @classmethod
    def from_mapping(cls, d: Mapping, field_prefix: str = "detector") -> "DetectorModel":
        """Build from a mapping with exactly the keys gain, mixing, A, delta, background_variance.

        Errors name the field as ``<field_prefix>.<key>``.
        """
        if not isinstance(d, Mapping):
            raise QcbedInputError(field_prefix, f"must be a table, got {type(d).__name__}",
                                  f"give {{{', '.join(f'{k} = ...' for k in DETECTOR_KEYS)}}}")
        unknown = [k for k in d if k not in DETECTOR_KEYS]
        if unknown:
            raise QcbedInputError(f"{field_prefix}.{unknown[0]}", "unknown key",
                                  f"allowed keys: {', '.join(DETECTOR_KEYS)}")
        missing = [k for k in DETECTOR_KEYS if k not in d]
        if missing:
            raise QcbedInputError(f"{field_prefix}.{missing[0]}", "missing",
                                  f"give all of {', '.join(DETECTOR_KEYS)}")
        return cls(**_validate({k: d[k] for k in DETECTOR_KEYS}, field_prefix))

    def to_mapping(self) -> dict:
        """Parameters as a plain dict (the inverse of :meth:`from_mapping`)."""
        return asdict(self)

    def variance(self, intensity_counts) -> np.ndarray:
        """Pixel variance [counts^2] m g (A I + delta I^2 + sigma_B^2) of intensity I [counts].

        I is clipped at 0 first: a negative recorded value (dark subtraction of a noisy
        background) carries the read-out variance m g sigma_B^2, not a negative Poisson term.
        """
        i = np.maximum(np.asarray(intensity_counts, dtype=np.float64), 0.0)
        return self.mixing * self.gain * (self.A * i + self.delta * i * i + self.background_variance)

    def dqe(self, intensity_counts) -> np.ndarray:
        """DQE(I) = 1 / (A + delta I + sigma_B^2 / I) = I / (A I + delta I^2 + sigma_B^2).

        I [counts] is clipped at 0; at I = 0 the DQE is 0 when sigma_B^2 > 0 and its limit 1/A
        when there is no background term.
        """
        i = np.maximum(np.asarray(intensity_counts, dtype=np.float64), 0.0)
        denom = self.A * i + self.delta * i * i + self.background_variance
        safe = np.where(denom > 0, denom, 1.0)
        return np.where(denom > 0, i / safe, 1.0 / self.A)


def poisson_variance(intensity_counts) -> np.ndarray:
    """Shot-noise variance [counts^2] of a pixel that counts single events: max(I, 1).

    For Poisson counts the variance equals the mean; the floor of one count keeps empty or
    negative pixels at a finite weight (a zero variance would give them infinite weight in
    chi^2), and equals the variance of the smallest non-zero count.
    """
    return np.maximum(np.asarray(intensity_counts, dtype=np.float64), 1.0)
