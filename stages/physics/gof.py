"""Goodness-of-fit (GOF) metrics between simulated and experimental intensities.

Every metric compares a simulation ``sim`` (I_t) with an experiment ``exp`` (I_x), both arrays of
shape (n_disks, n_points) sampled at the same points, and solves the scale c and the
background(s) b in closed form.  Only "used" points enter: ``mask`` True (default: all), and
``sim``, ``exp`` (and, for the metrics that use it, ``variance``) finite there.

chi^2 metrics (all intensities in counts, sigma^2 in counts^2):

    chi^2 = sum_used (c I_t + b_(d) - I_x)^2 / sigma^2

========================================  ==============================  =====================
metric (name in METRICS)                  sigma^2                         background
========================================  ==============================  =====================
Chi2 ("Chi2")                             max(I_x, 1) (Poisson)           one b
Chi2Const ("Chi2_const")                  detector model at I_x           one b
Chi2MultiBackground                       detector model at I_x           b_d per disk
("Chi2_multibackground")
Chi2LARBED ("Chi2_LARBED")                the given ``variance``          one b
Chi2LARBEDMultiBackground                 the given ``variance``          b_d per disk
("Chi2_LARBED_multibackground")
Chi2LARBEDPerDisk                         the given ``variance``          c_d, b_d per disk
("Chi2_LARBED_perdisk")
========================================  ==============================  =====================

* Poisson: the variance of a count equals its mean; it is estimated from the data, floored at
  one count so that empty or negative (dark-subtracted) pixels keep a finite weight
  (:func:`stages.physics.noise.poisson_variance`).  PyExtal uses |I_x| with no floor.
* Detector model: sigma^2 = m g (A I + delta I^2 + sigma_B^2) of Zuo, Microsc. Res. Tech. 49
  (2000) 245, evaluated at the experimental intensity (:class:`stages.physics.noise.DetectorModel`;
  PyExtal's ``Chi2_const`` uses a different form, see that module).  With sigma_B^2 = 0 a pixel
  with I_x <= 0 would have zero variance (infinite weight): that is refused with an error
  naming ``pattern.detector`` rather than silently dropped.
* Given variance (LARBED): a precomputed variance per point (e.g. propagated through the
  virtual-aperture integration and background subtraction); it must be > 0 wherever used;
  points where it is NaN/inf are not used.

Closed-form scale and backgrounds.  With weights w = 1/sigma^2 the normal equations
d chi^2/dc = 0, d chi^2/db_d = 0 give, for per-disk backgrounds (S_d = sum_i w,
A_d = sum_i w I_x, B_d = sum_i w I_t over disk d's used points)

    c   = (sum w I_t I_x - sum_d A_d B_d / S_d) / (sum w I_t^2 - sum_d B_d^2 / S_d)
    b_d = (A_d - c B_d) / S_d

and for one background the same with a single "disk" holding all used points (then
c = (gamma delta - beta eps)/(alpha delta - beta^2) of PyExtal's notation).  The code evaluates
the algebraically identical centred form c = sum w (I_t - t_d)(I_x - x_d) / sum w (I_t - t_d)^2,
b_d = x_d - c t_d with the weighted disk means t_d = B_d/S_d, x_d = A_d/S_d, which avoids the
cancellation of the difference of large sums.  A disk with no used point gets b_d = NaN and
is not counted in ``n_linear``.  With ``fit_background=False`` b = 0 and c = sum w I_t I_x /
sum w I_t^2.  If the simulation is constant over the used points (constant within every disk
for per-disk backgrounds; all zero without background) the scale is not determined and
:class:`~stages.errors.QcbedInputError` naming ``sim`` is raised.

Degrees of freedom (``BaseGOF.reduced``): dof = n_points - n_linear - n_free, with n_points
the used (disk, point) samples (masked and non-finite points are not counted), n_linear the
closed-form parameters (1 scale + the backgrounds actually solved) and n_free the parameters
of the outer refinement.  PyExtal's docs divide by n - p - 1 and count neither the masked
points nor the per-disk backgrounds.

XCorrelation: value = 1 - r, r the (unweighted) Pearson correlation of I_t and I_x over the
used points (it honours the mask, unlike PyExtal's, which calls
``scipy.spatial.distance.correlation`` on the whole arrays).  Its scale and background are the
unweighted least-squares c, b, for reporting only.  Its residual is the standardised difference
(z_t - z_x)/sqrt(2 n), z = (v - mean)/std (population std) over used points, scaled so that
sum residual^2 = 1 - r = value exactly.  ``reduced`` returns the value itself.

User metrics: :func:`make_gof` loads "module.path:ClassName" or "path/to/file.py:ClassName",
a subclass of :class:`BaseGOF` built with no arguments.  The simplest way to write one is to
subclass :class:`Chi2` and override :meth:`Chi2.sigma2`, or to subclass :class:`BaseGOF` and
return :func:`weighted_fit` from ``fit``.

The seed's form (value-only metrics): a subclass of :class:`BaseGOF` that implements only
``__call__(sim, exp)`` returning the figure of merit (lower is better).  ``BaseGOF.fit`` calls it on
the used points (1-D arrays ``sim[used]``, ``exp[used]``: mask and non-finite points honoured;
``variance`` is not passed) and returns its value.  The seed hands such a metric the raw simulated
and experimental intensities and asks only for the value, so the metric handles its own
normalisation: qcbed solves nothing that enters the value (``n_linear`` 0); ``Fit.scale`` and
``Fit.background`` are the unweighted least-squares c, b over the used points, for the report's model
curves only.  There are no residuals (``Fit.residual`` 0, ``residuals_defined`` False: the
refinement uses Nelder-Mead, whose objective is the value alone, and refuses Levenberg-Marquardt and
Gauss-Newton steps), ``reduced`` returns the value unchanged (it is not a chi^2, as for
XCorrelation), and the metric's ``sigma_defined`` is False with the reason in
``sigma_undefined_reason``: standard errors are undefined for it.  A subclass with neither ``fit``
nor ``__call__`` is refused by :func:`make_gof` with an error naming ``refine.gof``.
"""

from __future__ import annotations

import abc

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QcbedInputError
from .noise import DetectorModel, poisson_variance

DEGENERATE_RTOL = 1e-12
"""The scale is undetermined when sum w (I_t - t_d)^2 <= DEGENERATE_RTOL * sum w I_t^2."""


@dataclass
class Fit:
    """Result of :meth:`BaseGOF.fit`.

    value: the metric: chi^2 summed over used points, or 1 - r for XCorrelation.
    scale: c.
    background: b per disk, shape (n_disks,) (one value repeated for single-background
        metrics; NaN for a disk without used points under per-disk backgrounds).
    model: c sim + b, shape (n_disks, n_points), NaN where not used.
    residual: (c sim + b - exp)/sigma on used points, 0 elsewhere (for XCorrelation the
        standardised difference, see the module docstring); sum(residual**2) == value (0 for a
        value-only metric: ``BaseGOF.residuals_defined`` False).
    n_points: number of used (disk, point) samples.
    n_linear: number of closed-form parameters solved (scale + backgrounds).
    """

    value: float
    scale: float
    background: np.ndarray
    model: np.ndarray
    residual: np.ndarray
    n_points: int
    n_linear: int
    scales: np.ndarray | None = None  # c_d per disk (metrics with a scale per disk); scale = c of disk 0


# ----------------------------------------------------------------------------- helpers
def _as_2d(a, field: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise QcbedInputError(field, f"must be a 2-D array (n_disks, n_points), got shape {arr.shape}",
                              "sample every disk at the same number of points")
    return arr


def _prepare(sim, exp, mask, variance=None, use_variance=False):
    """(sim, exp, variance or None, used) with shapes checked; ``used`` = mask & finite."""
    sim = _as_2d(sim, "sim")
    exp = _as_2d(exp, "exp")
    if sim.shape != exp.shape:
        raise QcbedInputError("exp", f"shape {exp.shape} differs from the simulation's {sim.shape}",
                              "sample simulation and experiment at the same points")
    used = np.isfinite(sim) & np.isfinite(exp)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != sim.shape:
            raise QcbedInputError("mask", f"shape {m.shape} differs from the data's {sim.shape}",
                                  "give one boolean per (disk, point)")
        used &= m.astype(bool)
    var = None
    if use_variance:
        if variance is None:
            raise QcbedInputError("variance", "this metric needs a variance per point, none given",
                                  "give the variance map of the pattern, or use a detector-model metric")
        var = _as_2d(variance, "variance")
        if var.shape != sim.shape:
            raise QcbedInputError("variance", f"shape {var.shape} differs from the data's {sim.shape}",
                                  "give one variance per (disk, point)")
        used &= np.isfinite(var)
        bad = used & ~(var > 0)
        if bad.any():
            raise QcbedInputError("variance", f"must be > 0 where used; {int(bad.sum())} used point(s) "
                                  f"have variance <= 0 (min {float(var[bad].min())})",
                                  "fix the variance map or mask those points")
    if not used.any():
        raise QcbedInputError("mask", "no usable point: every point is masked or non-finite",
                              "check the ROI mask and that the data are finite")
    return sim, exp, var, used


def weighted_fit(sim, exp, sigma2, used, per_disk: bool = False, fit_background: bool = True,
                 per_disk_scale: bool = False) -> Fit:
    """chi^2 fit with closed-form scale and background(s) (see the module docstring).

    sim, exp, sigma2: arrays (n_disks, n_points) [counts, counts, counts^2]; used: boolean
    array of the points to use (sigma2 must be finite and > 0 there, sim/exp finite).
    per_disk: one background per disk (else one for all); fit_background=False fixes b = 0.
    per_disk_scale: a scale and a background per disk (each disk its own linear fit, for images
    scaled independently); ``Fit.scales`` holds them, ``Fit.scale`` is the first disk's.
    """
    sim = np.asarray(sim, dtype=np.float64)
    exp = np.asarray(exp, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    used = np.asarray(used, dtype=bool)
    if not used.any():
        raise QcbedInputError("mask", "no usable point: every point is masked or non-finite",
                              "check the ROI mask and that the data are finite")
    s2 = np.where(used, sigma2, 1.0)
    if not np.all(np.isfinite(s2) & (s2 > 0)):
        raise QcbedInputError("variance", "must be finite and > 0 at every used point",
                              "fix the variance or mask those points")
    w = np.where(used, 1.0 / s2, 0.0)
    t = np.where(used, sim, 0.0)
    x = np.where(used, exp, 0.0)
    n_disks = sim.shape[0]

    if per_disk_scale:
        return _per_disk_fit(sim, x, t, w, used, fit_background)
    if not fit_background:
        den = float(np.sum(w * t * t))
        if not den > 0:
            raise QcbedInputError("sim", "the simulation is zero at every used point, so the scale is "
                                  "undetermined", "check the simulation and the ROI")
        c = float(np.sum(w * t * x)) / den
        b = np.zeros(n_disks)
        n_linear = 1
    else:
        if per_disk:
            s_d = w.sum(axis=1)
            has = s_d > 0
            safe = np.where(has, s_d, 1.0)
            t_mean = (w * t).sum(axis=1) / safe          # weighted disk means, per disk
            x_mean = (w * x).sum(axis=1) / safe
            t_ref, x_ref = t_mean[:, None], x_mean[:, None]
            n_linear = 1 + int(has.sum())
        else:
            s = w.sum()
            t_ref = float((w * t).sum() / s)
            x_ref = float((w * x).sum() / s)
            n_linear = 2
        dt = np.where(used, t - t_ref, 0.0)
        dx = np.where(used, x - x_ref, 0.0)
        den = float(np.sum(w * dt * dt))
        if not den > DEGENERATE_RTOL * float(np.sum(w * t * t)):
            where = "within every disk" if per_disk else "over the used points"
            raise QcbedInputError("sim", f"the simulation is constant {where}, so scale and "
                                  "background cannot be separated",
                                  "check the simulation and the ROI, or use fit_background=False")
        c = float(np.sum(w * dt * dx)) / den
        if per_disk:
            b = np.where(has, x_mean - c * t_mean, np.nan)
        else:
            b = np.full(n_disks, x_ref - c * t_ref)

    bcol = np.where(np.isfinite(b), b, 0.0)[:, None]
    model = np.where(used, c * sim + bcol, np.nan)
    residual = np.where(used, (np.where(used, model, 0.0) - x) * np.sqrt(w), 0.0)
    return Fit(value=float(np.sum(residual * residual)), scale=c, background=b, model=model,
               residual=residual, n_points=int(used.sum()), n_linear=n_linear)


def _per_disk_fit(sim, x, t, w, used, fit_background: bool) -> Fit:
    """c_d sim + b_d per disk (the centred closed form of :func:`weighted_fit`, disk by disk)."""
    s_d = w.sum(axis=1)
    has = s_d > 0
    safe = np.where(has, s_d, 1.0)
    if fit_background:
        t_ref = ((w * t).sum(axis=1) / safe)[:, None]
        x_ref = ((w * x).sum(axis=1) / safe)[:, None]
    else:
        t_ref = x_ref = np.zeros((len(t), 1))
    dt = np.where(used, t - t_ref, 0.0)
    dx = np.where(used, x - x_ref, 0.0)
    den = np.sum(w * dt * dt, axis=1)
    flat = has & ~(den > DEGENERATE_RTOL * np.sum(w * t * t, axis=1))
    if flat.any():
        raise QcbedInputError("sim", f"the simulation is constant over the used points of disk(s) "
                              f"{np.nonzero(flat)[0].tolist()}, so its scale is undetermined",
                              "check the simulation and the ROI, or leave those disks out")
    c = np.where(has, np.sum(w * dt * dx, axis=1) / np.where(has, den, 1.0), np.nan)
    b = np.where(has, x_ref[:, 0] - c * t_ref[:, 0], np.nan) if fit_background else np.zeros(len(t))
    model = np.where(used, np.nan_to_num(c)[:, None] * sim + np.nan_to_num(b)[:, None], np.nan)
    residual = np.where(used, (np.where(used, model, 0.0) - x) * np.sqrt(w), 0.0)
    n_linear = int(has.sum()) * (2 if fit_background else 1)
    return Fit(value=float(np.sum(residual * residual)), scale=float(c[0]), background=b, model=model,
               residual=residual, n_points=int(used.sum()), n_linear=n_linear, scales=c)


# ----------------------------------------------------------------------------- metrics
class BaseGOF(abc.ABC):
    """A goodness-of-fit metric, in one of two forms.

    * ``fit(sim, exp, variance=None, mask=None) -> Fit`` (the built-ins, and user metrics built on
      :func:`weighted_fit`): solves scale/background and returns the residuals.
    * The seed's form, a subclass that implements only ``__call__(sim, exp) -> float``
      (``value_only``): :meth:`fit` then calls it on the used points (see the module docstring).

    A subclass with neither fails with QcbedInputError naming ``refine.gof`` when loaded by
    :func:`make_gof` (and when its ``fit`` is called).
    """

    name: str = "BaseGOF"
    #: Why a value-only metric has no standard errors (:attr:`sigma_undefined_reason`).
    VALUE_ONLY_NO_SIGMA = ("the metric gives only a value (the seed's __call__(sim, exp) interface): no residuals, "
                           "so no Jacobian or curvature for standard errors")

    @property
    def value_only(self) -> bool:
        """True for a metric in the seed's form: ``__call__(sim, exp)`` and no ``fit`` of its own."""
        return _value_only(type(self))

    @property
    def residuals_defined(self) -> bool:
        """Whether ``Fit.residual`` is a residual vector with sum(residual**2) == value, as
        Levenberg-Marquardt and the Jacobian need (False for a value-only metric: its residual is 0)."""
        return not self.value_only

    @property
    def uncertainty_undefined(self) -> str | None:
        """None when the metric is a chi^2 whose curvature gives standard errors; else why it gives none (the
        fine stage then reports every uncertainty as undefined, with this reason).  A value-only metric has
        none; XCorrelation states its own reason."""
        return self.VALUE_ONLY_NO_SIGMA if self.value_only else None

    @property
    def sigma_defined(self) -> bool:
        """Whether standard errors of the refined parameters can be derived from this metric
        (:attr:`uncertainty_undefined` is None)."""
        return self.uncertainty_undefined is None

    @property
    def sigma_undefined_reason(self) -> str:
        """Why :attr:`sigma_defined` is False ("" when it is True)."""
        return self.uncertainty_undefined or ""

    def fit(self, sim, exp, variance=None, mask=None) -> Fit:
        """Fit c sim + b to exp over the used points; arrays (n_disks, n_points), mask True = use.

        This base implementation serves the seed's form: the value is ``self(sim[used], exp[used])``
        (1-D arrays of the used points; ``variance`` is not passed); scale and background are the
        unweighted least-squares c, b, for reporting only; residual 0; n_linear 0."""
        if not self.value_only:
            raise QcbedInputError("refine.gof", f"{type(self).__name__} implements neither fit(sim, exp, variance, mask) "
                                  "nor __call__(sim, exp)", _IMPLEMENT_FIX)
        sim, exp, _, used = _prepare(sim, exp, mask)
        ts, xs = sim[used], exp[used]
        value = self(ts.copy(), xs.copy())
        try:
            value = float(np.asarray(value, dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            raise QcbedInputError("refine.gof", f"{type(self).__name__}.__call__ must return one number, got "
                                  f"{type(value).__name__} {value!r:.80}", "return the figure of merit as a float") from None
        if not np.isfinite(value):
            raise QcbedInputError("refine.gof", f"{type(self).__name__}.__call__ returned {value} on {ts.size} points",
                                  "return a finite figure of merit (or raise QcbedInputError where it is undefined)")
        dt = ts - ts.mean()
        den = float(np.sum(dt * dt))
        c = float(np.sum(dt * (xs - xs.mean())) / den) if den > 0 else 0.0  # unweighted least squares, reporting only
        b = float(xs.mean() - c * ts.mean())
        return Fit(value=value, scale=c, background=np.full(sim.shape[0], b), model=np.where(used, c * sim + b, np.nan),
                   residual=np.zeros(sim.shape), n_points=int(used.sum()), n_linear=0)

    def pixel_variance(self, image, variance=None):
        """Variance [counts^2] of each recorded pixel of ``image`` (H, W) for this metric, or None if it uses
        none.  The fine stage propagates it through the interpolation to each sample (sum_k w_k^2 sigma_k^2,
        :func:`stages.physics.sampling.sampled_variance`) and passes that to :meth:`fit` as ``variance``;
        ``variance`` here is the variance map of the pattern (variance stage), when there is one."""
        return None

    def reduced(self, fit: Fit, n_free: int) -> float:
        """value / dof with dof = n_points - n_linear - n_free (QcbedInputError if dof <= 0); the value
        unchanged for a value-only metric (not a chi^2, as XCorrelation)."""
        if self.value_only:
            return float(fit.value)
        if isinstance(n_free, bool) or not isinstance(n_free, (int, np.integer)) or n_free < 0:
            raise QcbedInputError("n_free", f"must be an integer >= 0, got {n_free!r}",
                                  "give the number of refined parameters")
        dof = int(fit.n_points) - int(fit.n_linear) - int(n_free)
        if dof <= 0:
            raise QcbedInputError(
                "refine", f"no degrees of freedom: {fit.n_points} used points - {fit.n_linear} "
                f"scale/background - {n_free} refined parameters = {dof}",
                "use more points (larger ROI, fewer masked pixels) or refine fewer parameters")
        return float(fit.value) / dof

    def __repr__(self):
        return f"{type(self).__name__}()"


_IMPLEMENT_FIX = ("implement fit(sim, exp, variance=None, mask=None) returning a Fit (e.g. weighted_fit(...)), "
                  "or the seed's __call__(sim, exp) returning the figure of merit")


def _value_only(cls) -> bool:
    """A BaseGOF subclass in the seed's form: ``__call__`` defined and ``fit`` not overridden."""
    return cls.fit is BaseGOF.fit and any("__call__" in vars(k) for k in cls.__mro__ if k is not object)


class XCorrelation(BaseGOF):
    """1 - Pearson r over used points; ``variance`` is ignored (see the module docstring)."""

    name = "XCorrelation"
    uncertainty_undefined = ("1 - r is not a chi^2: its curvature carries no noise scale, so it gives no standard "
                             "errors (use a chi^2 metric for uncertainties)")

    def fit(self, sim, exp, variance=None, mask=None) -> Fit:
        sim, exp, _, used = _prepare(sim, exp, mask)
        n = int(used.sum())
        ts, xs = sim[used], exp[used]
        dt, dx = ts - ts.mean(), xs - xs.mean()
        st, sx = float(np.sqrt(np.mean(dt * dt))), float(np.sqrt(np.mean(dx * dx)))
        scale_t = float(np.max(np.abs(ts))) or 1.0
        scale_x = float(np.max(np.abs(xs))) or 1.0
        if n < 2 or not st > DEGENERATE_RTOL * scale_t:
            raise QcbedInputError("sim", "the simulation is constant over the used points, so the "
                                  "correlation is undefined", "check the simulation and the ROI")
        if not sx > DEGENERATE_RTOL * scale_x:
            raise QcbedInputError("exp", "the experiment is constant over the used points, so the "
                                  "correlation is undefined", "check the data and the mask")
        zt, zx = dt / st, dx / sx
        r = float(np.clip(np.mean(zt * zx), -1.0, 1.0))
        c = float(np.sum(dt * dx) / np.sum(dt * dt))       # unweighted least squares, reporting only
        b = float(xs.mean() - c * ts.mean())
        residual = np.zeros(sim.shape)
        residual[used] = (zt - zx) / np.sqrt(2.0 * n)
        model = np.where(used, c * sim + b, np.nan)
        return Fit(value=1.0 - r, scale=c, background=np.full(sim.shape[0], b), model=model,
                   residual=residual, n_points=n, n_linear=2)

    def reduced(self, fit: Fit, n_free: int) -> float:
        """1 - r is not a chi^2: returned unchanged."""
        return float(fit.value)


class Chi2(BaseGOF):
    """chi^2 with Poisson variance sigma^2 = max(I_x, 1) counts^2 and one background.

    Subclasses change the variance by overriding :meth:`sigma2` and the background model by
    ``per_disk`` (class attribute); ``fit_background=False`` fixes b = 0 (scale only).
    """

    name = "Chi2"
    per_disk = False
    per_disk_scale = False     # True: a scale (and background) per disk
    uses_variance = False      # True: sigma^2 is the ``variance`` argument (required)

    def __init__(self, fit_background: bool = True):
        self.fit_background = bool(fit_background)

    def sigma2(self, sim, exp, variance):
        """Variance [counts^2] of each point (evaluated everywhere; only used points matter): ``variance``
        when given (the fine stage passes each sample's variance propagated from :meth:`pixel_variance`),
        else the Poisson variance of ``exp`` taken as recorded pixels."""
        return poisson_variance(exp) if variance is None else variance

    def pixel_variance(self, image, variance=None):
        """Poisson sigma^2 = max(I, 1) of each recorded pixel."""
        return poisson_variance(image)

    def _variance_error(self, n_bad: int):
        raise QcbedInputError("variance", f"sigma^2 from {type(self).__name__}.sigma2 is not finite "
                              f"and > 0 at {n_bad} used point(s)", "fix sigma2() or mask those points")

    def fit(self, sim, exp, variance=None, mask=None) -> Fit:
        sim, exp, var, used = _prepare(sim, exp, mask, variance, use_variance=self.uses_variance or variance is not None)
        s2 = np.asarray(self.sigma2(sim, exp, var), dtype=np.float64)
        bad = used & ~(np.isfinite(s2) & (s2 > 0))
        if bad.any():
            self._variance_error(int(bad.sum()))
        return weighted_fit(sim, exp, s2, used, per_disk=self.per_disk,
                            fit_background=self.fit_background, per_disk_scale=self.per_disk_scale)

    def __repr__(self):
        return f"{type(self).__name__}(fit_background={self.fit_background})"


def _detector(detector) -> DetectorModel:
    if isinstance(detector, DetectorModel):
        return detector
    if detector is None:
        raise QcbedInputError("pattern.detector", "this GOF metric needs the detector noise model, "
                              "none given", "give [pattern.detector] gain, mixing, A, delta, "
                              "background_variance, or use the Chi2 (Poisson) metric")
    if isinstance(detector, Mapping):
        return DetectorModel.from_mapping(detector, "pattern.detector")
    raise QcbedInputError("pattern.detector", f"must be a detector model, got {type(detector).__name__}",
                          "give gain, mixing, A, delta, background_variance")


class Chi2Const(Chi2):
    """chi^2 with the detector variance m g (A I_x + delta I_x^2 + sigma_B^2), one background."""

    name = "Chi2_const"

    def __init__(self, detector: DetectorModel, fit_background: bool = True):
        super().__init__(fit_background)
        self.detector = _detector(detector)

    def sigma2(self, sim, exp, variance):
        return self.detector.variance(exp) if variance is None else variance

    def pixel_variance(self, image, variance=None):
        """The detector model's sigma^2 of each recorded pixel."""
        return self.detector.variance(image)

    def _variance_error(self, n_bad: int):
        raise QcbedInputError("pattern.detector", f"the detector variance is 0 at {n_bad} used "
                              "pixel(s) with intensity <= 0 (background_variance = 0)",
                              "give background_variance > 0 (from dark frames) or mask those pixels")

    def __repr__(self):
        return f"{type(self).__name__}({self.detector!r}, fit_background={self.fit_background})"


class Chi2MultiBackground(Chi2Const):
    """chi^2 with the detector variance and one background per disk."""

    name = "Chi2_multibackground"
    per_disk = True


class Chi2LARBED(Chi2):
    """chi^2 with the given ``variance`` array (required, > 0 where used), one background."""

    name = "Chi2_LARBED"
    uses_variance = True

    def sigma2(self, sim, exp, variance):
        return variance

    def pixel_variance(self, image, variance=None):
        """The pattern's variance map (required)."""
        if variance is None:
            raise QcbedInputError("variance", "this metric needs a variance per pixel, none given",
                                  "give the variance map of the pattern, or use a detector-model metric")
        return np.asarray(variance, float)


class Chi2LARBEDMultiBackground(Chi2LARBED):
    """chi^2 with the given ``variance`` array and one background per disk."""

    name = "Chi2_LARBED_multibackground"
    per_disk = True


class Chi2LARBEDPerDisk(Chi2LARBED):
    """chi^2 with the given ``variance``, a scale and a background per disk.

    For LARBED images that were scaled independently (e.g. each stretched to the full 16-bit
    range when exported), where the intensity ratios between disks are not data."""

    name = "Chi2_LARBED_perdisk"
    per_disk = True
    per_disk_scale = True


METRICS: dict[str, type[BaseGOF]] = {
    "XCorrelation": XCorrelation,
    "Chi2": Chi2,
    "Chi2_const": Chi2Const,
    "Chi2_multibackground": Chi2MultiBackground,
    "Chi2_LARBED": Chi2LARBED,
    "Chi2_LARBED_multibackground": Chi2LARBEDMultiBackground,
    "Chi2_LARBED_perdisk": Chi2LARBEDPerDisk,
}
"""Built-in metrics by their PyExtal names."""

_NEEDS_DETECTOR = (Chi2Const,)
_SPEC_FIX = ("give a built-in name (" + ", ".join(METRICS) + "), 'package.module:ClassName' or "
             "'path/to/file.py:ClassName' naming a subclass of stages.physics.gof.BaseGOF")


def _load_user_class(spec: str, base_dir):
    target, _, cls_name = spec.rpartition(":")
    target, cls_name = target.strip(), cls_name.strip()
    if not target or not cls_name.isidentifier():
        raise QcbedInputError("refine.gof", f"cannot read metric {spec!r}", _SPEC_FIX)
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else ".") / path
        path = path.resolve()
        if not path.is_file():
            raise QcbedInputError("refine.gof", f"metric file {str(path)!r} not found",
                                  "give the path of the .py file relative to the config file")
        mod_name = "qcbed_user_gof_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        try:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module          # dataclasses etc. look their module up here
            mspec.loader.exec_module(module)
        except Exception as e:                       # noqa: BLE001 - any failure is the user file's
            sys.modules.pop(mod_name, None)
            raise QcbedInputError("refine.gof", f"cannot import {str(path)!r}: "
                                  f"{type(e).__name__}: {e}", "fix the metric file") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:                       # noqa: BLE001
            raise QcbedInputError("refine.gof", f"cannot import module {target!r}: "
                                  f"{type(e).__name__}: {e}", _SPEC_FIX) from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise QcbedInputError("refine.gof", f"{target!r} has no {cls_name!r}", _SPEC_FIX)
    if not (inspect.isclass(cls) and issubclass(cls, BaseGOF)):
        raise QcbedInputError("refine.gof", f"{spec!r} is not a subclass of BaseGOF",
                              "subclass stages.physics.gof.BaseGOF (or Chi2) and " + _IMPLEMENT_FIX)
    if cls.fit is BaseGOF.fit and not _value_only(cls):
        raise QcbedInputError("refine.gof", f"{spec!r} implements neither fit(sim, exp, variance, mask) nor "
                              "__call__(sim, exp)", _IMPLEMENT_FIX)
    return cls


def make_gof(name_or_spec: str, detector=None, base_dir=None) -> BaseGOF:
    """The metric named ``name_or_spec``.

    A built-in name of :data:`METRICS` (matched case-insensitively), built with ``detector``
    (a DetectorModel or a mapping of its parameters) where it needs one; or a user metric
    "package.module:ClassName" / "path/to/file.py:ClassName" (a relative file path is taken
    relative to ``base_dir``, default the working directory), which must be a subclass of
    :class:`BaseGOF` constructible without arguments.  Errors name ``refine.gof``, or
    ``pattern.detector`` for a detector metric without a detector.
    """
    if not isinstance(name_or_spec, str) or not name_or_spec.strip():
        raise QcbedInputError("refine.gof", f"must be a metric name, got {name_or_spec!r}", _SPEC_FIX)
    key = name_or_spec.strip()
    builtin = {k.lower(): v for k, v in METRICS.items()}.get(key.lower())
    if builtin is not None:
        if issubclass(builtin, _NEEDS_DETECTOR):
            return builtin(_detector(detector))
        return builtin()
    if ":" not in key:
        raise QcbedInputError("refine.gof", f"unknown metric {key!r}", _SPEC_FIX)
    cls = _load_user_class(key, base_dir)
    try:
        return cls()
    except Exception as e:                           # noqa: BLE001
        raise QcbedInputError("refine.gof", f"cannot construct {key!r} without arguments: "
                              f"{type(e).__name__}: {e}",
                              "give the metric class defaults for all constructor arguments") from e
