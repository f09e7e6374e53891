"""Fine refinement: structure factors by Nelder-Mead, geometry by Powell at each cached eigen-solution.

The nested loop of the seed specification (../shared/seed/), with the anchor's weak points fixed
(../shared/research/pyextal.md §2, §7):

* Outer: Nelder-Mead over the refined structure-factor components, each normalised to its range
  [lo, hi] (x~ = (x - lo)/(hi - lo)); the ranges are also honoured as bounds.  A zero-width IAM
  range (a reflection forbidden in the IAM, such as Si 222) gets a default absolute range.
* Each outer evaluation sets the values (with all symmetry equivalents and correct phases), solves
  the eigenproblem once for all ROI tilts (tiles), then optimises the geometry in an inner loop at
  that cached solution: thickness, gl, rotation, global shift, optionally per-disk shifts (CBED) and
  the Voigt PSF sigma/gamma (LARBED, convolved on the padded grid).  Geometry changes move only
  the experimental sampling points; the simulation tilts stay fixed.
* The PSF kernel (:func:`stages.physics.sampling.voigt_kernel`) weights each offset of a region's
  grid by the profile at its display-space length (skewed and rectangular grids included) and is cut
  at R = 4 sigma + 8 gamma, never at the padding: a fitted sigma/gamma means the same at any padding
  that holds the kernel.  ``roi.padding`` must hold the start PSF (else an error naming it with the
  padding needed), and the search of sigma and gamma is kept within what it holds.
* The objective does not depend on history: every inner search starts from the same recorded
  geometry (after a cheap thickness scan from the cached solution), so equal structure factors
  always give equal figures of merit, and the reported geometry is the inner optimum of the best
  point, re-evaluated at the end.
* Optional polish (``gauss_newton_steps``, :func:`gauss_newton_polish`): Levenberg-Marquardt steps on
  the structure factors and the geometry jointly from the Nelder-Mead result, with the Jacobian below;
  structure factors stay in their ranges.
* Uncertainties: the Jacobian of the weighted residuals (scale and backgrounds re-solved in closed
  form, i.e. profiled) with respect to every refined parameter at the optimum gives
  cov = (J^T J)^-1 * max(1, reduced chi^2); standard errors and the correlation matrix are reported.
* Agreement per disk: the zero-mean normalised cross-correlation (:func:`zncc_per_disk`) of the
  experimental samples and the simulated intensity over the samples the metric used, at the start
  (the start structure factors with the inner geometry optimum found for them: the objective's own
  evaluation of the start) and at the optimum.
* Counters: eigen-solves, inner evaluations and wall time of each phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from .errors import QcbedInputError
from .interrupt import check_stop
from .physics.gof import BaseGOF
from .physics.pattern_geometry import PatternGeometry
from .physics.sampling import (PSF_RADIUS_GAMMA, PSF_RADIUS_SIGMA, convolve_valid, cubic_support,
                               cubic_support_gradient, resampling_covariance, sample_covariance_product, sampled_variance, voigt_kernel, voigt_max_radius,
                               voigt_radius)
from .physics.structure_factors import centric_phase, related_reflections
from .simulate import ForwardModel

GEOMETRY_PARAMS = ("thickness", "gl", "rotation", "shift", "disk_shifts", "psf")
#: Inner-loop step scales (one Powell unit): thickness Å, gl px, rotation deg, shifts px, PSF px.
_STEP = {"thickness": 10.0, "gl": 0.2, "rotation": 0.1, "shift": 0.3, "disk_shift": 0.3, "sigma": 0.2, "gamma": 0.05}
#: Default absolute half-range [Å^-2] for a reflection whose IAM value is zero.
ZERO_IAM_HALF_RANGE = 2.0e-3
ZNCC_DEFINITION = ("ZNCC_d = Σ (e − ē)(s − s̄) / sqrt(Σ (e − ē)² Σ (s − s̄)²) over the samples of disk d used by the "
                   "figure of merit (fit_used), e = experimental samples, s = simulated intensity (PSF applied), means "
                   "over those samples; NaN for a disk with fewer than 2 used samples or no variation. Mean ZNCC: plain "
                   "(unweighted) mean over the disks with a ZNCC")


def zncc_per_disk(exp, sim, used) -> np.ndarray:
    """Zero-mean normalised cross-correlation of ``exp`` and ``sim`` (disk, point) per disk, over ``used``
    (see :data:`ZNCC_DEFINITION`)."""
    exp, sim = np.asarray(exp, float), np.asarray(sim, float)
    used = np.asarray(used, bool) & np.isfinite(exp) & np.isfinite(sim)
    out = np.full(exp.shape[0], np.nan)
    for d in range(exp.shape[0]):
        u = used[d]
        if u.sum() < 2:
            continue
        e = exp[d][u] - exp[d][u].mean()
        s = sim[d][u] - sim[d][u].mean()
        den = np.sqrt((e * e).sum() * (s * s).sum())
        if den > 0:
            out[d] = float((e * s).sum() / den)
    return out


def zncc_mean(zncc) -> float:
    """Plain mean of the per-disk ZNCC over the disks that have one (NaN when none has)."""
    z = np.asarray(zncc, float)
    z = z[np.isfinite(z)]
    return float(z.mean()) if z.size else float("nan")


@dataclass
class SFParam:
    """One refined structure-factor component.

    ``component``: 'U' or 'Uprime' (real amplitude along the centric phase for centrosymmetric
    reflections, signed), or 'U_amp', 'U_phase', 'Uprime_amp', 'Uprime_phase' for acentric ones
    (phase in degrees).  ``lo``/``hi``: range (normalisation and bounds), ``x0``: start.
    """

    hkl: tuple[int, int, int]
    component: str
    lo: float
    hi: float
    x0: float

    @property
    def label(self) -> str:
        return f"{self.component}({' '.join(map(str, self.hkl))})"


#: The refined structure-factor components a reflection may name in ``refine``: a centric reflection (U fixed by
#: the space group up to sign along its phase line exp(i phi0)) has one real number each for U and U'; an
#: acentric one has an amplitude and a phase [degrees] each, named explicitly.
CENTRIC_COMPONENTS = ("U", "Uprime")
ACENTRIC_COMPONENTS = ("U_amp", "U_phase", "Uprime_amp", "Uprime_phase")
SF_COMPONENTS = CENTRIC_COMPONENTS + ACENTRIC_COMPONENTS
#: Keys of one entry of refine.reflections.
REFLECTION_KEYS = ("hkl", "refine", "range_percent", "U_range", "Uprime_range", "U_phase_range", "Uprime_phase_range",
                   "U", "Uprime")
#: Default half-range [degrees] of a refined phase.
PHASE_HALF_RANGE_DEG = 30.0


#: a start |U| at or below this [Å^-2] is zero: a range in percent of it is empty
ZERO_IAM_LIMIT = 1e-9


def _zero_percent_range(f: str, name: str, base: str, crystal) -> QcbedInputError:
    """``range_percent`` of a component whose start is zero (e.g. U(2 2 2) of Si, zero in the IAM: only
    bonding makes it nonzero) is a range of width zero; rather than a silent default it is refused, naming the
    absolute range to give instead."""
    return QcbedInputError(f"{f}.range_percent", f"{base} of {name} starts at 0 ({crystal.name}: zero in the "
                           f"independent-atom model), so a range of ± a percentage of it is empty",
                           f"give {base}_range = [low, high] in 1/Å^2 (e.g. [-0.002, 0.002]) instead of range_percent")


def sf_params_from_config(model: ForwardModel, reflections: list, field_prefix: str = "refine.reflections") -> list[SFParam]:
    """Refined components from the config: [{hkl, refine, range_percent, U_range, Uprime_range, U_phase_range,
    Uprime_phase_range, U, Uprime}].

    ``refine`` (default ["U"]): for a centric reflection 'U' and/or 'Uprime', each one signed real number
    along the reflection's phase line; for an acentric reflection (no space-group operation maps h to -h, so
    its phase is free) 'U_amp', 'U_phase', 'Uprime_amp', 'Uprime_phase', in any combination: amplitude only,
    phase only, or both.  A plain 'U' on an acentric reflection is refused rather than silently turned into two
    parameters (it changes the number of parameters, their covariance and the phase range), and 'U_amp' or
    'U_phase' on a centric one is refused (its phase is fixed).  Ranges: ``U_range`` / ``Uprime_range`` [Å^-2]
    bound the signed value (centric) or the amplitude (acentric, >= 0); ``U_phase_range`` /
    ``Uprime_phase_range`` [degrees] the phase (default the start ± 30); ``range_percent`` (default 5) the
    value or amplitude when no range is given.  ``U`` / ``Uprime``: the start, a signed value along the phase
    line (centric) or the amplitude at the current phase (acentric).
    """
    if not isinstance(reflections, list) or not reflections:
        raise QcbedInputError(field_prefix, "list the reflections to refine, e.g. [{hkl = [1, -1, -1], refine = ['U']}]")
    out = []
    for i, r in enumerate(reflections):
        f = f"{field_prefix}[{i}]"
        if not isinstance(r, dict) or "hkl" not in r:
            raise QcbedInputError(f, "needs hkl = [h, k, l]")
        bad = set(r) - set(REFLECTION_KEYS)
        if bad:
            raise QcbedInputError(f"{f}.{sorted(bad)[0]}", "unknown key", f"allowed: {', '.join(sorted(REFLECTION_KEYS))}")
        hkl = tuple(int(x) for x in r["hkl"])
        name = " ".join(map(str, hkl))
        comps = r.get("refine", ["U"])
        if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
            raise QcbedInputError(f"{f}.refine", f"must be a list of component names, got {comps!r}",
                                  f"choose from {', '.join(SF_COMPONENTS)}")
        for comp in comps:
            if comp not in SF_COMPONENTS:
                raise QcbedInputError(f"{f}.refine", f"unknown component {comp!r}", f"choose from {', '.join(SF_COMPONENTS)}")
        if len(set(comps)) != len(comps):
            raise QcbedInputError(f"{f}.refine", f"a component is listed twice in {comps!r}", "list each once")
        pot = model.potential
        phi0 = centric_phase(model.crystal, hkl)
        if phi0 is None and set(comps) & set(CENTRIC_COMPONENTS):
            c = next(x for x in comps if x in CENTRIC_COMPONENTS)
            raise QcbedInputError(
                f"{f}.refine", f"reflection {name} is acentric (no operation of {model.crystal.spacegroup} maps it to its "
                f"Friedel mate, so its phase is free): {c!r} would refine two parameters, amplitude and phase"
                + (" (refine defaults to ['U'])" if "refine" not in r else ""),
                f"give refine = ['{c}_amp', '{c}_phase'], or only one of them to keep the other fixed")
        if phi0 is not None and set(comps) & set(ACENTRIC_COMPONENTS):
            c = next(x for x in comps if x in ACENTRIC_COMPONENTS)
            base = c.split("_")[0]
            raise QcbedInputError(
                f"{f}.refine", f"reflection {name} is centric: its phase is fixed by the space group at "
                f"{np.degrees(phi0):.1f} or {np.degrees(phi0) + 180:.1f} degrees, so {base} is one signed real "
                f"number, and {c!r} does not apply", f"use refine = ['{base}']")
        for key in ("U_phase_range", "Uprime_phase_range"):
            if key in r and key.replace("_range", "") not in comps:
                raise QcbedInputError(f"{f}.{key}", f"is given but {key.replace('_range', '')!r} is not refined",
                                      f"add {key.replace('_range', '')!r} to refine, or remove {key}")
        u_now, up_now = (complex(v[0]) for v in pot.get([hkl]))
        pct = float(r.get("range_percent", 5.0)) / 100.0
        for comp in comps:
            base = comp.split("_")[0]
            now = u_now if base == "U" else up_now
            rng = r.get(f"{base}_range")
            if rng is None and "range_percent" in r and abs(complex(r[base]) if base in r else now) <= ZERO_IAM_LIMIT:
                raise _zero_percent_range(f, name, base, model.crystal)
            if phi0 is not None:
                if base in r:
                    now = complex(r[base]) * np.exp(1j * phi0)
                val = float((now * np.exp(-1j * phi0)).real)
                if rng is not None:
                    lo, hi = sorted(float(x) for x in rng)
                elif abs(val) > ZERO_IAM_LIMIT:
                    lo, hi = sorted((val * (1 - pct), val * (1 + pct)))
                else:
                    lo, hi = -ZERO_IAM_HALF_RANGE, ZERO_IAM_HALF_RANGE
                if not lo < hi:
                    raise QcbedInputError(f"{f}.{base}_range", f"empty range [{lo}, {hi}]", "give lo < hi in 1/Å^2")
                out.append(SFParam(hkl, comp, lo, hi, min(max(val, lo), hi)))
                continue
            if base in r and f"{base}_amp" not in comps:
                raise QcbedInputError(f"{f}.{base}", f"is the start amplitude of the acentric {name}, but "
                                      f"{base + '_amp'!r} is not refined", f"add {base + '_amp'!r} to refine, or remove {base}")
            if base in r:  # the start amplitude, at the current phase
                amp0 = float(r[base])
                if amp0 < 0:
                    raise QcbedInputError(f"{f}.{base}", f"is the start amplitude of the acentric {name}: must be >= 0, "
                                          f"got {amp0}", "give |U| in 1/Å^2 (the phase is U_phase)")
                now = amp0 * np.exp(1j * np.angle(now))
            amp, ph = abs(now), float(np.degrees(np.angle(now)))
            if comp.endswith("_amp"):
                if rng is not None:
                    lo, hi = sorted(float(x) for x in rng)
                    if lo < 0:
                        raise QcbedInputError(f"{f}.{base}_range", f"bounds the amplitude of the acentric {name}: "
                                              f"must be >= 0, got [{lo}, {hi}]", "give 0 <= lo < hi in 1/Å^2")
                else:
                    lo, hi = (amp * (1 - pct), amp * (1 + pct)) if amp > ZERO_IAM_LIMIT else (0.0, ZERO_IAM_HALF_RANGE)
                out.append(SFParam(hkl, comp, lo, hi, min(max(amp, lo), hi)))
            else:
                prng = r.get(f"{base}_phase_range")
                if prng is not None:
                    lo, hi = sorted(float(x) for x in prng)
                    if not lo < hi:
                        raise QcbedInputError(f"{f}.{base}_phase_range", f"empty range [{lo}, {hi}]", "give lo < hi in degrees")
                    ph = ph + 360.0 * np.round(((lo + hi) / 2 - ph) / 360.0)  # the start's turn nearest the range
                else:
                    lo, hi = ph - PHASE_HALF_RANGE_DEG, ph + PHASE_HALF_RANGE_DEG
                out.append(SFParam(hkl, comp, lo, hi, min(max(ph, lo), hi)))
    return out


def apply_sf(model: ForwardModel, params: list[SFParam], values) -> None:
    """Write refined values into the model's potential (all symmetry equivalents)."""
    groups: dict = {}
    for p, v in zip(params, values):
        base = p.component.split("_")[0]
        groups.setdefault((p.hkl, base), {})[p.component] = float(v)
    for (hkl, base), comps in groups.items():
        if base in comps:  # centric: signed amplitude along phi0
            phi0 = centric_phase(model.crystal, hkl) or 0.0
            val = comps[base] * np.exp(1j * phi0)
        else:
            cur = complex((model.potential.get([hkl])[0] if base == "U" else model.potential.get([hkl])[1])[0])
            amp = comps.get(base + "_amp", abs(cur))
            ph = np.radians(comps.get(base + "_phase", np.degrees(np.angle(cur))))
            val = amp * np.exp(1j * ph)
        model.potential.set(hkl, **({"U": val} if base == "U" else {"Uprime": val}))


def sf_potential_derivatives(model: ForwardModel, params: list[SFParam], values) -> list[dict]:
    """Per refined component, d(U_h + i U'_h)/dp [Å^-2 per unit of p] over every reflection h it
    changes (symmetry equivalents and Friedel mates with their phases; U' too where it follows U).

    Taken through :func:`apply_sf` and the potential, so whatever a component sets is differentiated:
    central differences of 1e-6 of the range, exact for the components that are linear in p (U, U',
    amplitudes: to rounding) and to ~1e-12 relative for phases.  No eigen-solve.  The potential is
    left at ``values``."""
    base = np.asarray(values, float)
    out = []
    for i, p in enumerate(params):
        rel = [h for h, _, _ in related_reflections(model.crystal, p.hkl)]
        step = 1e-6 * (p.hi - p.lo)
        pair = []
        for x in (base[i] + step, base[i] - step):
            v = base.copy()
            v[i] = x
            apply_sf(model, params, v)
            u, up = model.potential.get(rel)
            pair.append(u + 1j * up)
        d = (pair[0] - pair[1]) / (2 * step)
        out.append({tuple(int(c) for c in h): complex(x) for h, x in zip(rel, d) if x != 0})
    apply_sf(model, params, base)
    return out


#: Central-difference step of the PSF widths in the Jacobian [tilt steps] (:func:`geometry_fd_step`).
PSF_FD_STEP = 0.02


def region_grid_steps(region) -> np.ndarray:
    """The two step vectors [a, b] (display px) of a :class:`stages.roi.Region`'s grid: a along its rows
    (p1 -> p3), b along its columns (p1 -> p2), as the ROI stage lays the points out."""
    xy = region.grid(1)[0].reshape(region.samples[1] + 2, region.samples[0] + 2, 2)
    return np.array([xy[1, 0] - xy[0, 0], xy[0, 1] - xy[0, 0]], float)


def psf_padding_limits(grid_steps, padding: int, psf0, refined: bool) -> tuple[float, float]:
    """(R_max, R_search) [tilt steps]: the largest PSF truncation radius R = 4 sigma + 8 gamma
    (:func:`voigt_radius`) that ``padding`` grid steps hold on every grid of ``grid_steps`` (each [a, b],
    display px; :func:`voigt_max_radius`), and the radius the inner search of psf_sigma/psf_gamma keeps
    to: R_max less the Jacobian's difference steps (4 + 8) x :data:`PSF_FD_STEP` when the PSF is
    ``refined``, so that they stay held too.  The start ``psf0`` = (sigma, gamma) must fit: otherwise
    QcbedInputError naming roi.padding with the padding it needs."""
    steps = [np.asarray(a, float) for a in grid_steps]

    def held(pad: int) -> float:
        return min(voigt_max_radius(a, pad) for a in steps)

    P = int(padding)
    rmax = held(P)
    margin = (PSF_RADIUS_SIGMA + PSF_RADIUS_GAMMA) * PSF_FD_STEP if refined else 0.0
    s0, g0 = max(float(psf0[0]), 1e-3), max(float(psf0[1]), 0.0)
    need = voigt_radius(s0, g0) + margin
    if need > rmax:
        pad = P + 1
        while held(pad) < need:
            pad += 1
        room = f" (+{margin:.2g} for the difference steps of its refinement)" if margin else ""
        raise QcbedInputError(
            "roi.padding", f"the start PSF (psf_sigma {s0:.4g}, psf_gamma {g0:.4g} tilt steps) reaches "
            f"4 sigma + 8 gamma = {voigt_radius(s0, g0):.3g} tilt steps{room}, beyond the {rmax:.3g} that "
            f"roi.padding = {P} supports",
            f"set roi.padding to at least {pad}, or start from a narrower PSF; the search of psf_sigma and "
            f"psf_gamma is kept within what roi.padding supports")
    return rmax, rmax - margin


@dataclass
class FineProblem:
    """Everything the objective needs, fixed for the whole refinement."""

    model: ForwardModel
    pg0: PatternGeometry
    pattern: object  # xarray Dataset (stages.load)
    roi: object  # xarray Dataset (stages.roi)
    gof: BaseGOF
    sf: list[SFParam]
    thickness0: float
    refine_geometry: tuple = ("thickness", "gl", "rotation", "shift")
    psf0: tuple[float, float] = (0.0, 0.0)  # Voigt sigma, gamma [tilt steps] (LARBED)
    thickness_scan: float = 0.05  # relative half-width of the thickness scan before each inner search
    inner_maxiter: int = 4000
    naive: bool = False  # benchmark only: re-solve the eigenproblem at every geometry step (as without caching)
    counters: dict = field(default_factory=lambda: {"eigen_solves": 0, "inner_evaluations": 0, "solve_s": 0.0, "inner_s": 0.0})

    def __post_init__(self):
        bad = set(self.refine_geometry) - set(GEOMETRY_PARAMS)
        if bad:
            raise QcbedInputError("refine.geometry", f"unknown parameter {sorted(bad)[0]!r}", f"choose from {', '.join(GEOMETRY_PARAMS)}")
        kind = self.pg0.kind
        if "disk_shifts" in self.refine_geometry and kind != "cbed":
            raise QcbedInputError("refine.geometry", "disk_shifts are refined for CBED only")
        if "psf" in self.refine_geometry and kind != "larbed":
            raise QcbedInputError("refine.geometry", "the Voigt PSF is refined for LARBED only")
        roi = self.roi
        self.disks = np.stack([roi.h.values, roi.k.values, roi.l.values], 1).astype(int)
        self.kt = roi.kt.values
        self.inner_mask = roi.inner.values
        self.kt_inner = self.kt[self.inner_mask]
        self.included = roi.included.values[:, self.inner_mask]
        self.padding = int(roi.attrs.get("padding", 0))
        self.use_psf = kind == "larbed" and ("psf" in self.refine_geometry or self.psf0[0] > 0 or self.psf0[1] > 0)
        regions = roi.region.values
        self.grids = []
        for r in np.unique(regions):
            sel = np.nonzero(regions == r)[0]
            ni = roi.i.values[sel].max() - roi.i.values[sel].min() + 1
            nj = roi.j.values[sel].max() - roi.j.values[sel].min() + 1
            # the grid's two edge step vectors in display px (= tilt steps for LARBED): the PSF kernel
            # weights each grid offset i a + j b by the profile at its true length |i a + j b|
            xy = np.stack([roi.x.values[sel], roi.y.values[sel]], 1).reshape(int(ni), int(nj), 2)
            steps = np.array([xy[1, 0] - xy[0, 0] if ni > 1 else [0.0, 1.0],
                              xy[0, 1] - xy[0, 0] if nj > 1 else [1.0, 0.0]], float)
            if self.use_psf and abs(np.linalg.det(steps)) <= 1e-9 * float(np.sum(steps * steps)):
                raise QcbedInputError(f"roi.regions[{int(r)}]", "a PSF needs a region with area: its edges p1->p2 and "
                                      "p1->p3 are parallel", "give three corners that are not on one line")
            self.grids.append((sel, int(ni), int(nj), steps))
        # the PSF's truncation radius that the padding supports, and the inner search's limit [tilt steps]
        self.psf_radius_max = self.psf_search_radius = np.inf
        if self.use_psf:
            self.psf_radius_max = self._psf_setup()
        pat = self.pattern
        lut = None
        if kind == "larbed":
            lut = {tuple(h): i for i, h in enumerate(zip(pat.h.values.tolist(), pat.k.values.tolist(), pat.l.values.tolist()))}
        self.images, self.valids, self.variances = [], [], []
        for h in self.disks:
            if kind == "larbed":
                i = lut[tuple(h)]
                img, val = pat.intensity.values[i], pat.valid.values[i]
                var = pat.variance.values[i] if "variance" in pat else None
            else:
                img, val = pat.intensity.values, pat.valid.values
                var = pat.variance.values if "variance" in pat else None
            self.images.append(img)
            self.valids.append(val)
            self.variances.append(var)
        # the metric's variance of every recorded pixel (None: it uses none), propagated to each sample as
        # sum w^2 sigma^2 (:meth:`experimental`); one map per image (CBED: the disks share one)
        self.pixel_variances, self._good = [], []
        pv_of: dict = {}
        for img, val, var in zip(self.images, self.valids, self.variances):
            k = id(img)
            if k not in pv_of:
                # a metric that needs the pattern's variance map and has none: no pixel variance here (its fit
                # names the missing variance; the pipeline builds the problem again with the variance store)
                pv = None if (getattr(self.gof, "uses_variance", False) and var is None) else self.gof.pixel_variance(img, var)
                pv_of[k] = (None if pv is None else np.asarray(pv, float), np.asarray(val, bool) & np.isfinite(img))
            self.pixel_variances.append(pv_of[k][0])
            self._good.append(pv_of[k][1])
        self._names = self._geometry_names()
        self._var_floor: dict = {}
        self._kappa = None
        self.variance_factor  # fixed now, at the initial geometry (later starts move pg0)
        self.beam_cache: dict = {}
        self._sim_memo: tuple = (None, {})  # (solution, {(thickness, psf sigma, gamma): simulated})

    # ---------------------------------------------------------------- geometry vector
    def _geometry_names(self) -> list[str]:
        names = []
        rg = self.refine_geometry
        if "thickness" in rg:
            names.append("thickness")
        if "gl" in rg:
            names.append("gl")
        if "rotation" in rg:
            names.append("rotation")
        if "shift" in rg:
            names += ["shift_row", "shift_col"]
        if "disk_shifts" in rg:
            for h in self.disks[1:]:
                key = " ".join(map(str, h))
                names += [f"disk_shift_row[{key}]", f"disk_shift_col[{key}]"]
        if "psf" in rg:
            names += ["psf_sigma", "psf_gamma"]
        return names

    @property
    def geometry_names(self) -> list[str]:
        return list(self._names)

    def geometry_start(self, thickness: float | None = None) -> dict:
        pg = self.pg0
        g = {"thickness": self.thickness0 if thickness is None else thickness, "gl": pg.gl_px, "rotation": pg.rotation_deg,
             "shift_row": pg.shift_px[0], "shift_col": pg.shift_px[1], "psf_sigma": self.psf0[0], "psf_gamma": self.psf0[1]}
        for h in self.disks[1:]:
            key = " ".join(map(str, h))
            dr, dc = pg.disk_shift_px.get(tuple(int(x) for x in h), (0.0, 0.0))
            g[f"disk_shift_row[{key}]"] = dr
            g[f"disk_shift_col[{key}]"] = dc
        return g

    def set_start(self, g: dict) -> None:
        """Start every later inner search from geometry ``g`` (thickness, gl, rotation, shift, PSF; the
        thickness scan and the search box move with it)."""
        self.pg0 = self._pg(g)
        self.thickness0 = float(g["thickness"])
        self.psf0 = (float(g["psf_sigma"]), float(g["psf_gamma"]))

    def _step(self, name: str) -> float:
        if name.startswith("disk_shift"):
            return _STEP["disk_shift"]
        if name.startswith("shift"):
            return _STEP["shift"]
        if name.startswith("psf_"):
            return _STEP[name[4:]]
        return _STEP[name]

    def _pg(self, g: dict) -> PatternGeometry:
        ds = dict(self.pg0.disk_shift_px)
        for h in self.disks[1:]:
            key = " ".join(map(str, h))
            if f"disk_shift_row[{key}]" in g:
                ds[tuple(int(x) for x in h)] = (g[f"disk_shift_row[{key}]"], g[f"disk_shift_col[{key}]"])
        return self.pg0.with_(gl_px=g["gl"], rotation_deg=g["rotation"], shift_px=(g["shift_row"], g["shift_col"]),
                              disk_shift_px=ds)

    # ---------------------------------------------------------------- evaluation
    def solve(self, values, deriv_thickness: float | None = None):
        """One eigen-solution of every ROI tilt at structure factors ``values``; with ``deriv_thickness``
        [Å] also the analytic derivatives of the intensities with respect to every refined structure
        factor at that thickness (:func:`stages.physics.bloch.solve`), from the same eigen-solution."""
        t0 = time.perf_counter()
        kw = {}
        if deriv_thickness is not None and self.sf:
            kw = {"dpot": sf_potential_derivatives(self.model, self.sf, values), "deriv_thickness_A": float(deriv_thickness)}
        apply_sf(self.model, self.sf, values)
        sol = self.model.solve_tiled(self.kt, self.disks, beam_cache=self.beam_cache, **kw)
        self.counters["eigen_solves"] += 1
        self.counters["solve_s"] += time.perf_counter() - t0
        # which solver the tilts got ('auto' records it per tilt) and how many were solved (tilt symmetry)
        c = self.counters
        for _, part in sol.parts:
            c["tilts_solved"] = c.get("tilts_solved", 0) + int(part.timing.get("n_tilts", len(part.kt)))
            c["tilts_hermitian"] = c.get("tilts_hermitian", 0) + int(part.timing.get("n_tilts_hermitian", 0))
            c["tilts_general"] = c.get("tilts_general", 0) + int(part.timing.get("n_tilts_general", 0))
        return sol

    def beam_summary(self) -> dict:
        """The beam sets the refinement used (one per tile, selected once): counts of strong (matrix) and
        Bethe beams, and the selection thresholds."""
        sets = list(self.beam_cache.values())
        if not sets:
            return {}
        ns = [b.n_strong for b in sets]
        nw = [len(b.weak) for b in sets]
        return {"tiles": len(sets), "n_strong_min": int(min(ns)), "n_strong_max": int(max(ns)),
                "n_strong_mean": float(np.mean(ns)), "n_bethe_max": int(max(nw)),
                "selection": sets[0].selection.as_dict()}

    def sim_transform(self, inten: np.ndarray, g: dict) -> np.ndarray:
        """Per-tilt intensities (or their derivatives) (nd, n_roi) -> simulated samples (nd, n_inner):
        the PSF (a linear map) where one is used, else the inner points."""
        return inten[:, self.inner_mask] if not self.use_psf else self._psf(inten, g)

    def simulated(self, sol, g: dict) -> np.ndarray:
        """Simulated intensities (nd, n_inner) at thickness g, with the PSF if any.

        Memoised per solution on (thickness, PSF): the inner search moves one parameter at a time and
        most of its steps change only the experimental sampling (gl, rotation, shifts)."""
        key = (float(g["thickness"]), float(g.get("psf_sigma", 0.0)), float(g.get("psf_gamma", 0.0)))
        owner, memo = self._sim_memo
        if owner is not sol:
            memo = {}
            self._sim_memo = (sol, memo)
        hit = memo.get(key)
        if hit is not None:
            return hit
        inten = sol.intensities([g["thickness"]])[:, 0, :].T  # (nd, npt)
        out = self.sim_transform(inten, g)
        if len(memo) >= 32:
            memo.pop(next(iter(memo)))
        memo[key] = out
        return out

    def experimental(self, g: dict):
        """Experimental intensity, variance and usability (nd, n_inner) at geometry g.

        Samples are cubic convolutions of the pixels (:func:`~stages.physics.sampling.cubic_support`).  The
        variance given to the metric (its weights) is the interpolated pixel-variance map times the run's
        fixed factor :attr:`variance_factor` (see :meth:`_sampled`); None when the metric uses no variance."""
        exp, var, ok, _, _ = self.experimental_support(g)
        return exp, var, ok

    def experimental_support(self, g: dict):
        """:meth:`experimental` with the samples' supports and exact variances: (exp, var, ok, (idx, weights),
        var_exact); idx (nd, n_inner, 16) indexes the concatenation of :meth:`pixel_variance_flat`, weights
        (nd, n_inner, 16) the interpolation weights, var_exact = sum w^2 sigma^2 (None without a variance)."""
        pg = self._pg(g)
        xy = pg.tilt_to_display(self.kt_inner)
        nd, n = len(self.disks), len(self.kt_inner)
        has_var = self.pixel_variances[0] is not None
        if pg.kind == "cbed":  # one image: sample every disk in one call
            rc = pg.display_to_pixel(np.tile(xy, (nd, 1)), np.repeat(self.disks, n, axis=0))
            exp, var, vex, ok, sup = self._sampled(0, rc)
            idx, w = sup.idx.reshape(nd, n, 16), sup.weights.reshape(nd, n, 16)
            exp, ok = exp.reshape(nd, n), ok.reshape(nd, n)
            var = var.reshape(nd, n) if has_var else None
            vex = vex.reshape(nd, n) if has_var else None
            return exp, var, ok & self.included, (idx, w), vex
        exp = np.full((nd, n), np.nan)
        var = np.full((nd, n), np.nan) if has_var else None
        vex = np.full((nd, n), np.nan) if has_var else None
        ok = np.zeros((nd, n), bool)
        idx = np.zeros((nd, n, 16), np.int64)
        w = np.zeros((nd, n, 16))
        for d, h in enumerate(self.disks):
            rc = pg.display_to_pixel(xy, h)
            exp[d], v, ve, ok[d], sup = self._sampled(d, rc)
            if has_var:
                var[d], vex[d] = v, ve
            idx[d] = sup.idx + d * self.images[d].size
            w[d] = sup.weights
        return exp, var, ok & self.included, (idx, w), vex

    def pixel_variance_flat(self) -> np.ndarray | None:
        """The pixel variances of the images the samples index (:meth:`experimental_support`), flat: one image
        for CBED, the disks' images in ROI order for LARBED."""
        if self.pixel_variances[0] is None:
            return None
        if self.pg0.kind == "cbed":
            return self.pixel_variances[0].ravel()
        return np.concatenate([v.ravel() for v in self.pixel_variances])

    @property
    def variance_factor(self) -> float | None:
        """kappa: the mean of sum w^2 sigma^2 / (interpolated variance) over the ROI's usable samples at the
        problem's initial geometry, fixed for the run (None without a variance).

        Why the metric's weights are kappa x the interpolated variance map sum w sigma^2 and not the exact
        variance of each sample sum w^2 sigma^2 (:func:`~stages.physics.sampling.sampled_variance`): the exact
        one swings by 2.4x within every pixel (sum w^2 = 1 on a pixel, 0.41 half-way in both directions), so
        weights from it would give the figure of merit a pixel-scale ripple in every sampling-geometry
        parameter and, wherever the model misfits, pull the geometry towards samples on pixel centres (their
        larger variance hides the misfit: with a chi^2 of 170, as on the GeSn data, that pull is 170x the noise's).
        The price: the expected noise part of chi^2, sum of exact / weight variance, still varies with the
        samples' phases within the pixels, so a sampling parameter gets a small bias, reported as
        ``resampling_bias`` (:func:`resampling_terms`; below 0.1 sigma on the near-zone-axis LARBED case of
        bench/coverage.py), and where a
        sampling parameter is barely determined this pixel-scale structure dominates its error
        (:data:`SAMPLING_SIGMA_LIMIT_PX`).  kappa makes the weights the right size on average (chi^2 / nu_eff
        = 1 for exact noise), and the uncertainties and nu_eff use the exact variances and covariances of the
        samples (:func:`sample_correlation_terms`), so the errors are right for these weights."""
        if self.pixel_variances[0] is None:
            return None
        if self._kappa is None:
            self._kappa = 1.0
            _, var, ok, _, vex = self.experimental_support(self.geometry_start())
            good = ok & np.isfinite(var) & np.isfinite(vex) & (var > 0)
            self._kappa = float(vex[good].sum() / var[good].sum()) if good.any() else 1.0
        return self._kappa

    def _sampled(self, d: int, rc):
        """(values, weight variance, exact variance, ok, support) of disk d's image at pixels rc (n, 2); the
        variances are None without a pixel variance.  Weight variance: kappa (:attr:`variance_factor`) x the
        interpolated variance map, floored at the map's smallest valid value (the kernel's negative lobes
        undershoot beside a sharp peak, a Poisson sigma^2 = I of a bright line)."""
        img = self.images[d]
        sup = cubic_support(img.shape, rc[:, 0], rc[:, 1])
        ok = sup.inside & self._good[d].ravel()[sup.idx].all(axis=1)
        patch = img.ravel()[sup.idx]
        vals = np.where(ok, np.einsum("nk,nk->n", sup.weights, np.where(np.isfinite(patch), patch, 0.0)), np.nan)
        pv = self.pixel_variances[d]
        if pv is None:
            return vals, None, None, ok, sup
        vp = pv.ravel()[sup.idx]
        smooth = np.where(ok, np.maximum(np.einsum("nk,nk->n", sup.weights, vp), self._floor(d)), np.nan)
        exact = np.where(ok, sampled_variance(pv, sup), np.nan)
        kappa = self._kappa if self._kappa is not None else self.variance_factor
        return vals, kappa * smooth, exact, ok, sup

    def _floor(self, d: int) -> float:
        if d not in self._var_floor:
            v, ok = self.pixel_variances[d], self._good[d]
            good = ok & np.isfinite(v) & (v > 0)
            self._var_floor[d] = float(v[good].min()) if good.any() else np.nan
        return self._var_floor[d]

    def gof_at(self, sol, g: dict):
        self.counters["inner_evaluations"] += 1
        if self.naive:
            t0 = time.perf_counter()
            sol = self.model.solve_tiled(self.kt, self.disks, beam_cache=self.beam_cache)
            self.counters["eigen_solves"] += 1
            self.counters["solve_s"] += time.perf_counter() - t0
        sim = self.simulated(sol, g)
        exp, var, ok = self.experimental(g)
        fit = self.gof.fit(sim, exp, var, ok)
        return fit

    def n_free(self) -> int:
        return len(self.sf) + len(self._names)

    def inner(self, sol) -> tuple[float, dict, object]:
        """Geometry optimum at a cached solution, from the recorded start: (reduced GOF, geometry, fit)."""
        t0 = time.perf_counter()
        g0 = self.geometry_start()
        nf = self.n_free()
        if "thickness" in self._names and self.thickness_scan > 0:
            g0 = {**g0, "thickness": self._scan_thickness(sol, g0, nf)}
        self.counters["inner_s"] += time.perf_counter() - t0
        return self.inner_from(sol, g0, self._names)

    def inner_from(self, sol, g: dict, names=None) -> tuple[float, dict, object]:
        """Powell over the geometry parameters ``names`` (default: all but the thickness) at a cached
        solution, from g and inside the inner search box: (reduced GOF, geometry, fit).  The thickness
        stays: the solution's analytic derivatives, taken at it, stay exact."""
        nf = self.n_free()
        names = [n for n in self._names if n != "thickness"] if names is None else list(names)
        if not names:
            fit = self.gof_at(sol, g)
            return self.gof.reduced(fit, nf), dict(g), fit
        t0 = time.perf_counter()
        steps = np.array([self._step(n) for n in names])
        lower, upper = self._bounds(self.geometry_start(), names, steps)
        x0 = np.clip(np.array([self.clip_psf(g)[n] for n in names]) / steps, lower, upper)

        def f(x):
            # the box is enforced by a penalty, not by Powell's bounds: with bounds, scipy searches each
            # line over the whole box (bounded golden section) and jumps between distant local minima;
            # without, the line search brackets from the current point (a local search)
            out = np.maximum(lower - x, 0) + np.maximum(x - upper, 0)
            if np.any(out > 0):
                return 1e30 * (1 + float(out.sum()))
            gx = {**g, **dict(zip(names, x * steps))}
            over = self.psf_excess(gx)  # the PSF widths jointly within what the padding supports
            if over > 0:
                return 1e30 * (1 + over)
            return self._safe_reduced(sol, gx, nf)

        res = minimize(f, x0, method="Powell", options={"xtol": 1e-3, "ftol": 1e-9, "maxfev": self.inner_maxiter})
        g2 = {**g, **dict(zip(names, res.x * steps))}
        fit = self.gof_at(sol, g2)
        self.counters["inner_s"] += time.perf_counter() - t0
        return self.gof.reduced(fit, nf), g2, fit

    def _scan_thickness(self, sol, g0: dict, nf: int, n: int = 41) -> float:
        """Best of n thicknesses within ±thickness_scan of the start, all from one intensity call
        (the experimental sampling does not change with thickness)."""
        ts = self.thickness0 * (1 + np.linspace(-self.thickness_scan, self.thickness_scan, n))
        exp, var, ok = self.experimental(g0)
        inten = sol.intensities(ts)  # (npt, n, nd)
        best, best_t = np.inf, float(g0["thickness"])
        for k, t in enumerate(ts):
            sim = inten[:, k, :].T
            if self.use_psf:
                sim = self._psf(sim, g0)
            else:
                sim = sim[:, self.inner_mask]
            self.counters["inner_evaluations"] += 1
            try:
                v = float(self.gof.reduced(self.gof.fit(sim, exp, var, ok), nf))
            except QcbedInputError:
                continue
            if v < best:
                best, best_t = v, float(t)
        return best_t

    def _psf_setup(self) -> float:
        """:func:`psf_padding_limits` on this ROI's grids: sets ``psf_search_radius`` and returns the
        largest truncation radius the padding supports."""
        rmax, self.psf_search_radius = psf_padding_limits([steps for *_, steps in self.grids], self.padding,
                                                          self.psf0, "psf" in self.refine_geometry)
        return rmax

    def psf_excess(self, g: dict) -> float:
        """How far the PSF of geometry g reaches beyond the inner search's limit ``psf_search_radius``
        [tilt steps] (0 inside, and when the PSF is not refined)."""
        if "psf" not in self.refine_geometry:
            return 0.0
        r = voigt_radius(max(g["psf_sigma"], 1e-3), max(g["psf_gamma"], 0.0))
        return max(0.0, r - self.psf_search_radius)

    def clip_psf(self, g: dict) -> dict:
        """g with its PSF widths scaled down together, where needed, to the inner search's limit
        4 sigma + 8 gamma <= ``psf_search_radius`` (the padding's support)."""
        if self.psf_excess(g) <= 0:
            return g
        s, gm = max(g["psf_sigma"], 1e-3), max(g["psf_gamma"], 0.0)
        t = self.psf_search_radius / voigt_radius(s, gm)
        return {**g, "psf_sigma": s * t, "psf_gamma": gm * t}

    def _psf(self, inten: np.ndarray, g: dict) -> np.ndarray:
        """The Voigt PSF (:func:`voigt_kernel`, on each region's own grid steps) applied to intensities
        (nd, n_roi) on the padded grid: (nd, n_inner).  The kernel depends on sigma and gamma only; the
        padding must hold it (QcbedInputError naming roi.padding otherwise)."""
        P = self.padding
        s, gm = max(g["psf_sigma"], 1e-3), max(g["psf_gamma"], 0.0)
        nd = len(self.disks)
        parts = []
        for sel, ni, nj, steps in self.grids:
            k = voigt_kernel(s, gm, steps)
            kp, kq = k.shape[0] // 2, k.shape[1] // 2
            if max(kp, kq) > P:
                raise QcbedInputError("roi.padding", f"the PSF (psf_sigma {s:.4g}, psf_gamma {gm:.4g} tilt steps) "
                                      f"needs {max(kp, kq)} grid steps of padding, roi.padding is {P}",
                                      f"set roi.padding to at least {max(kp, kq)}")
            grid = inten[:, sel].reshape(nd, ni, nj)[:, P - kp:ni - (P - kp), P - kq:nj - (P - kq)]
            parts.append(convolve_valid(grid, k).reshape(nd, -1))
        return np.concatenate(parts, axis=1)

    #: Inner search box around the recorded start: thickness ±30%, gl ±10%, rotation ±5°, shifts
    #: ±15 px, PSF sigma in [0.05, 8], gamma in [0, 3] tilt steps, each cut to what roi.padding supports
    #: (4 sigma + 8 gamma <= ``psf_search_radius``: sigma <= R/4, gamma <= (R - 0.2)/8; the inner search
    #: also keeps the two jointly inside, :meth:`psf_excess`).
    def _bounds(self, g0: dict, names, steps):
        lo, hi = [], []
        for n in names:
            v = g0[n]
            if n == "thickness":
                a, b = 0.7 * self.thickness0, 1.3 * self.thickness0
            elif n == "gl":
                a, b = 0.9 * self.pg0.gl_px, 1.1 * self.pg0.gl_px
            elif n == "rotation":
                a, b = self.pg0.rotation_deg - 5.0, self.pg0.rotation_deg + 5.0
            elif n == "psf_sigma":
                a, b = 0.05, min(8.0, self.psf_search_radius / PSF_RADIUS_SIGMA)
            elif n == "psf_gamma":
                a, b = 0.0, min(3.0, (self.psf_search_radius - PSF_RADIUS_SIGMA * 0.05) / PSF_RADIUS_GAMMA)
            else:
                a, b = v - 15.0, v + 15.0
            lo.append(min(a, v))
            hi.append(max(b, v))
        steps = np.asarray(steps)
        return np.array(lo) / steps, np.array(hi) / steps

    def search_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper ends of every refined parameter's search range, in physical units and in the
        order ``[p.label for p in sf] + geometry_names``: the structure factors' [lo, hi] (the outer
        search's bounds) and the inner search box around the current start geometry (:meth:`_bounds`).
        A value at an end means that the optimum may lie outside the range."""
        g0 = self.geometry_start()
        glo, ghi = self._bounds(g0, self._names, np.ones(len(self._names)))
        lo = np.concatenate([[p.lo for p in self.sf], glo]).astype(float)
        hi = np.concatenate([[p.hi for p in self.sf], ghi]).astype(float)
        return lo, hi

    def _safe_reduced(self, sol, g, nf) -> float:
        """Reduced GOF; a geometry that leaves no usable point gets a large finite penalty (Powell's
        line searches cannot handle inf)."""
        try:
            v = float(self.gof.reduced(self.gof_at(sol, g), nf))
        except QcbedInputError:
            return 1e30
        return v if np.isfinite(v) else 1e30

    # ---------------------------------------------------------------- normalisation
    def to_unit(self, values) -> np.ndarray:
        lo = np.array([p.lo for p in self.sf])
        hi = np.array([p.hi for p in self.sf])
        return (np.asarray(values, float) - lo) / (hi - lo)

    def from_unit(self, u) -> np.ndarray:
        lo = np.array([p.lo for p in self.sf])
        hi = np.array([p.hi for p in self.sf])
        return lo + np.asarray(u, float) * (hi - lo)


@dataclass
class FineResult:
    names: list[str]  # structure-factor components then geometry parameters
    values: np.ndarray
    sigma: np.ndarray
    correlation: np.ndarray
    gof: float  # reduced GOF at the optimum
    gof_start: float
    scale: float
    background: np.ndarray
    geometry: dict
    trace: list  # per outer iteration: (iteration, best values, gof)
    counters: dict
    n_points: int
    dof: int
    converged: bool
    #: the fit at the optimum, (disk, inner ROI point): experimental samples at the refined geometry,
    #: simulated intensity (fraction of the incident beam, PSF applied), model c sim + b (NaN where not
    #: used), normalised residual (0 where not used), and the used mask
    fit: dict = field(default_factory=dict)
    #: per disk: ZNCC of experiment and simulation at the optimum, and at the start (the start structure
    #: factors with their inner geometry optimum); :data:`ZNCC_DEFINITION`
    zncc: np.ndarray = field(default_factory=lambda: np.zeros(0))
    zncc_start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: per parameter: the Gauss-Newton step -(J^T J)^-1 J^T r from the reported point (the linearised
    #: distance to the least-squares optimum); small against sigma when the search has converged
    gauss_newton_step: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: how ``sigma`` was made (:func:`_uncertainties`): method (or why undefined), defined, dof_effective,
    #: chi2_effective
    sigma_info: dict = field(default_factory=dict)

    @property
    def zncc_mean(self) -> float:
        return zncc_mean(self.zncc)

    @property
    def zncc_mean_start(self) -> float:
        return zncc_mean(self.zncc_start)

    def value(self, name: str) -> float:
        return float(self.values[self.names.index(name)])

    def error(self, name: str) -> float:
        return float(self.sigma[self.names.index(name)])


def refine(problem: FineProblem, max_iterations: int = 200, xatol: float = 1e-4, fatol: float = 1e-7,
           initial_step: float = 0.1, callback=None, start_simplex=None, start_iteration: int = 0,
           start_fsim=None, gof_start: float | None = None, on_start=None, gauss_newton_steps: int = 0,
           on_gauss_newton=None) -> FineResult:
    """Run the nested refinement; returns values, uncertainties, geometry, trace and counters.

    Nelder-Mead runs in chunks of one iteration so that ``callback(iteration, simplex, fsimplex, best)``
    can checkpoint (simplex in unit coordinates).  A checkpoint continues an interrupted run exactly:
    ``start_simplex`` and its values ``start_fsim`` (seeded into the memo, so the vertices are not
    re-solved), ``start_iteration``, and the recorded ``gof_start``.  Nelder-Mead's whole state is
    the ordered simplex and its values, and the objective does not depend on history, so the resumed
    run takes the same steps as an uninterrupted one (tested bit-identical).  ``on_start(gof_start)``
    is called once the starting point is evaluated (before the first iteration).

    The per-disk ZNCC at the start comes from the objective's evaluation of the start point (the
    first outer evaluation); a resumed run, which does not re-evaluate it, evaluates the start once
    more before continuing (one eigen-solve; the objective does not depend on history, so the
    numbers equal an uninterrupted run's).
    """
    t_start = time.perf_counter()
    memo: dict = {}
    sf = problem.sf
    n = len(sf)
    u0 = problem.to_unit([p.x0 for p in sf])
    key0 = np.asarray(u0, float).tobytes()
    start: dict = {}  # ZNCC per disk at the start point, from its evaluation

    def evaluate(u):
        sol = problem.solve(problem.from_unit(u))
        val, g, fit = problem.inner(sol)
        if not start and np.asarray(u, float).tobytes() == key0:
            exp, sim, used = _fit_arrays(problem, sol, g, fit)
            start["zncc"] = zncc_per_disk(exp, sim, used)
            start["g"] = dict(g)
        return val, g, fit

    def objective(u):
        key = np.asarray(u, float).tobytes()
        if key not in memo:
            memo[key] = evaluate(u)
        return memo[key][0]

    if start_simplex is not None and start_fsim is not None:
        for u, f in zip(np.asarray(start_simplex, float), np.asarray(start_fsim, float)):
            memo[np.asarray(u, float).tobytes()] = (float(f), None, None)
    problem.initial_geometry = problem.geometry_start()
    if gof_start is None:
        gof_start = objective(u0)
    if not start:  # resumed (the start is not re-evaluated by the objective): its evaluation, once
        evaluate(u0)
    # every later inner search starts from the geometry found at the start point (a fixed, deterministic
    # start: the objective stays independent of history, and the searches start near their optimum)
    problem.set_start(start["g"])
    if on_start is not None:
        on_start(float(gof_start))
    if start_simplex is not None:
        sim = np.asarray(start_simplex, float)
    else:
        sim = np.vstack([u0] + [u0 + initial_step * np.eye(n)[i] * (1 if u0[i] + initial_step <= 1 else -1) for i in range(n)])
    trace = []
    it = start_iteration
    converged = False
    bounds = [(0.0, 1.0)] * n
    while it < max_iterations:
        check_stop()  # SIGINT/SIGTERM: stop after the last checkpointed iteration (stages.interrupt)
        res = minimize(objective, sim[0], method="Nelder-Mead", bounds=bounds,
                       options={"initial_simplex": sim, "maxiter": 2, "xatol": xatol, "fatol": fatol, "adaptive": n > 2})
        sim, fsim = res.final_simplex
        if res.nit > 1 or res.status == 0:
            it += max(res.nit - 1, 0)
            best = problem.from_unit(sim[0])
            trace.append((it, best.tolist(), float(fsim[0])))
            if callback is not None:
                callback(it, sim, fsim, best)
        if res.status == 0 or (res.nit <= 1 and res.status != 2):
            converged = res.status == 0
            break
        if np.max(np.abs(sim[1:] - sim[0])) <= xatol and np.max(np.abs(fsim[1:] - fsim[0])) <= fatol:
            converged = True
            break
    t_outer = time.perf_counter() - t_start
    # re-evaluate the best point: its own inner optimum is the reported geometry; then one solve with the
    # analytic derivatives at that thickness gives the Jacobian (uncertainties, polish) without a solve
    # per structure factor
    u_best = sim[0]
    sol = problem.solve(problem.from_unit(u_best))
    gof_best, g_best, fit = problem.inner(sol)
    values_sf = problem.from_unit(u_best)
    if problem.sf:
        sol = problem.solve(values_sf, deriv_thickness=g_best["thickness"])
        fit = problem.gof_at(sol, g_best)
    gn_info = {"steps": 0, "accepted": 0, "converged": False, "gof_before": float(gof_best), "jac": None}
    if gauss_newton_steps > 0:
        values_sf, g_best, sol, fit, gn_info = gauss_newton_polish(problem, values_sf, g_best, sol, fit,
                                                                   gauss_newton_steps, on_step=on_gauss_newton)
        gof_best = problem.gof.reduced(fit, problem.n_free())
        converged = converged or gn_info["converged"]
    names = [p.label for p in sf] + problem.geometry_names
    values = np.concatenate([values_sf, [g_best[k] for k in problem.geometry_names]])
    exp_best, sim_best, used_best = _fit_arrays(problem, sol, g_best, fit)
    fit_arrays = {"exp": exp_best, "sim": sim_best, "model": np.asarray(fit.model, float),
                  "residual": np.asarray(fit.residual, float), "used": used_best}
    sigma, corr, step, sig_info = _uncertainties(problem, values_sf, g_best, sol, fit, jac=gn_info.get("jac"))
    counters = dict(problem.counters)
    counters.update({"outer_evaluations": len(memo), "outer_iterations": it, "outer_s": t_outer,
                     "gauss_newton_steps": gn_info["steps"], "gauss_newton_accepted": gn_info["accepted"],
                     "gauss_newton_converged": bool(gn_info["converged"]),
                     "gof_before_gauss_newton": gn_info["gof_before"], "total_s": time.perf_counter() - t_start})
    dof = int(fit.n_points - fit.n_linear - problem.n_free())
    return FineResult(names=names, values=values, sigma=sigma, correlation=corr, gof=float(gof_best),
                      gof_start=float(gof_start), scale=float(fit.scale), background=np.asarray(fit.background),
                      geometry=g_best, trace=trace, counters=counters, n_points=int(fit.n_points), dof=dof,
                      converged=converged, fit=fit_arrays, zncc=zncc_per_disk(exp_best, sim_best, used_best),
                      zncc_start=np.asarray(start["zncc"], float), gauss_newton_step=step,
                      sigma_info=sig_info)


def _fit_arrays(problem: FineProblem, sol, g: dict, fit):
    """(experimental samples, simulated intensity with the PSF, used mask), each (disk, inner point), at
    the cached solution ``sol`` and geometry ``g`` whose figure-of-merit fit is ``fit``."""
    sim = problem.simulated(sol, g)
    exp, _, used = problem.experimental(g)
    used = used & np.isfinite(fit.model) if fit.model is not None else used
    return np.asarray(exp, float), np.asarray(sim, float), np.asarray(used, bool)


#: RMS displacement [px] of the experimental sampling points by the difference step of a sampling-geometry
#: parameter (gl, rotation, shifts): half a pixel, so that the central difference averages over the
#: interpolated pixel grid (on a ROI sampled at whole-pixel steps, cubic convolution of noisy pixels
#: gives the figure of merit a ripple of period one pixel in every shift: a difference of +-0.5 px
#: cancels it, where a small step follows its slope and makes Gauss-Newton steps crawl)
SAMPLING_FD_PX = 0.5


def geometry_fd_step(problem: FineProblem, g: dict, name: str) -> float:
    """Central-difference step of geometry parameter ``name`` for the Jacobian: thickness 0.5 Å, PSF
    widths 0.02 tilt steps (the simulation side: smooth), and for the sampling geometry the step that
    moves the experimental sampling points by :data:`SAMPLING_FD_PX` RMS (measured at g)."""
    if name == "thickness":
        return 0.5
    if name.startswith("psf"):
        return PSF_FD_STEP
    h = problem._step(name)  # trial step; the displacement is linear in it to first order
    pg_a, pg_b = problem._pg(g), problem._pg({**g, name: g[name] + h})
    xy_a, xy_b = pg_a.tilt_to_display(problem.kt_inner), pg_b.tilt_to_display(problem.kt_inner)
    disk = problem.disks[0]
    if name.startswith("disk_shift"):
        key = name[name.index("[") + 1:-1]
        disk = np.array([int(c) for c in key.split()])
    rc_a, rc_b = pg_a.display_to_pixel(xy_a, disk), pg_b.display_to_pixel(xy_b, disk)
    rms = float(np.sqrt(np.mean(np.sum((rc_b - rc_a) ** 2, axis=1))))
    return h * SAMPLING_FD_PX / rms if rms > 0 else h


def has_derivatives_at(sol, g: dict) -> bool:
    """True when ``sol`` carries analytic structure-factor derivatives at geometry g's thickness."""
    try:
        _, t = sol.derivatives()
    except (ValueError, AttributeError):
        return False
    return abs(t - float(g["thickness"])) <= 1e-9 * max(1.0, abs(t))


def _sf_columns_analytic(problem: FineProblem, sol, g: dict, used, r0) -> list[np.ndarray]:
    """Jacobian columns of the profiled residuals for the structure factors, from the analytic dI/dp
    carried by ``sol`` (one eigen-solution, no re-solve): dsim/dp is dI/dp through the PSF (linear),
    and the residuals' dependence on the simulation (closed-form scale and backgrounds, any metric) by
    central differences along dsim/dp, of 1e-4 of each range (the residuals are smooth rational
    functions of the simulation: the error is ~(1e-5)^2 relative)."""
    dI, _ = sol.derivatives()
    sim0 = problem.simulated(sol, g)
    exp, var, ok = problem.experimental(g)
    cols = []
    for i, p in enumerate(problem.sf):
        ds = problem.sim_transform(dI[:, i, :].T, g)
        h = 1e-4 * (p.hi - p.lo)
        fp = problem.gof.fit(sim0 + h * ds, exp, var, ok)
        fm = problem.gof.fit(sim0 - h * ds, exp, var, ok)
        cols.append((_resid(fp, used, r0) - _resid(fm, used, r0)) / (2 * h))
    return cols


def _jacobian(problem: FineProblem, values_sf, g, sol, fit):
    """(J, r): the Jacobian of the profiled weighted residuals with respect to every refined parameter
    and the residuals r at the point, both on the point's used samples.  Structure factors: analytic,
    when ``sol`` carries derivatives at g's thickness (:meth:`FineProblem.solve` with
    ``deriv_thickness``; :func:`_sf_columns_analytic`), else by one solve each (forward differences of
    1e-3 of their range); geometry: at the cached solution."""
    names_g = problem.geometry_names
    used = np.isfinite(fit.model) if fit.model is not None else None
    r0 = fit.residual[used] if used is not None else fit.residual.ravel()
    if problem.sf and has_derivatives_at(sol, g):
        cols = _sf_columns_analytic(problem, sol, g, used, r0)
    else:
        cols = []
        for i, p in enumerate(problem.sf):
            h = 1e-3 * (p.hi - p.lo)
            v = np.array(values_sf, float)
            v[i] += h
            s = problem.solve(v)
            f2 = problem.gof_at(s, g)
            cols.append(_resid(f2, used, r0) / h)
        apply_sf(problem.model, problem.sf, values_sf)  # restore the potential at the optimum (no solve needed)
    for name in names_g:
        h = geometry_fd_step(problem, g, name)
        fp = problem.gof_at(sol, {**g, name: g[name] + h})
        fm = problem.gof_at(sol, {**g, name: g[name] - h})
        cols.append((_resid(fp, used, r0) - _resid(fm, used, r0)) / (2 * h))
    J = np.stack(cols, axis=1) if cols else np.zeros((len(r0), 0))
    return J, np.where(np.isfinite(r0), r0, 0.0)


#: how the standard errors are computed (the report and results.json state it)
SIGMA_METHOD = ("sandwich covariance of the linearised least-squares estimate: cov = A⁻¹ (Jᵀ R J + C_Q) A⁻¹ × "
                "max(1, χ²/ν_eff), A = JᵀJ, J the Jacobian of the weighted residuals (scale and backgrounds "
                "profiled; sampling geometry from the fitted model's gradient), R the covariance of the normalised "
                "samples from the pixel noise they share (cubic convolution of independent pixels), C_Q the "
                "covariance of the gradient term from moving the samples over that noise (sampling geometry), "
                "ν_eff = tr(R) − tr(H R) the effective degrees of freedom")


def _linear_columns(problem: FineProblem, sim, used, sigma) -> np.ndarray:
    """Columns d r / d(scale, backgrounds) of the normalised residuals (n_used, n_linear) of the Chi2 metrics'
    closed-form linear model (none for other metrics)."""
    from .physics.gof import Chi2

    gof = problem.gof
    if not isinstance(gof, Chi2):
        return np.zeros((int(used.sum()), 0))
    nd = sim.shape[0]
    disk = np.broadcast_to(np.arange(nd)[:, None], sim.shape)[used]
    t = sim[used] / sigma
    one = 1.0 / sigma
    cols = []
    if gof.per_disk_scale:
        cols += [np.where(disk == d, t, 0.0) for d in np.unique(disk)]
    else:
        cols.append(t)
    if gof.fit_background:
        if gof.per_disk or gof.per_disk_scale:
            cols += [np.where(disk == d, one, 0.0) for d in np.unique(disk)]
        else:
            cols.append(one)
    return np.stack(cols, axis=1)


def _weight_variance(problem: FineProblem, sol, g: dict, exp=None, var=None) -> np.ndarray:
    """The variance the metric weights each (disk, inner point) sample with at geometry g: its ``sigma2`` for the
    chi^2 metrics, else the variance the fine stage passes it."""
    from .physics.gof import Chi2

    if exp is None:
        exp, var, _ = problem.experimental(g)
    if isinstance(problem.gof, Chi2):
        return np.asarray(problem.gof.sigma2(problem.simulated(sol, g), exp, var), float)
    return np.asarray(var, float)


def sample_correlation_terms(problem: FineProblem, sol, g: dict, fit, J: np.ndarray):
    """(J^T R J, nu_eff = tr(R) - tr(H R), n_used) at geometry g for the Jacobian J of the normalised residuals on the used
    samples of ``fit``, or None when the metric has no pixel variance.

    R = D⁻¹ W Σ Wᵀ D⁻¹ is the covariance matrix of the normalised samples: x = W p, p the independent pixels
    with variances Σ (the metric's :meth:`~stages.physics.gof.BaseGOF.pixel_variance`), D the samples'
    sigmas.  Its products come from the sparse supports (:func:`~stages.physics.sampling.sample_covariance_product`)
    without forming R.  tr(H R), H the hat matrix of [J, linear columns], is the expected drop of χ² below n
    by the fit: E[χ²] = tr(R) − tr(H R) for correlated samples (= n − p for independent ones with exact
    weights); tr(R) = Σ exact variance / weight variance (:attr:`FineProblem.variance_factor`)."""
    pv = problem.pixel_variance_flat()
    if pv is None:
        return None
    exp, var, ok, (idx, w), vex = problem.experimental_support(g)
    used = np.isfinite(fit.model) if fit.model is not None else ok
    sim = problem.simulated(sol, g)
    s2 = _weight_variance(problem, sol, g, exp, var)
    sig = np.sqrt(s2[used])
    L = _linear_columns(problem, sim, used, sig)
    X = np.hstack([J, L])
    M = sample_covariance_product(X / sig[:, None], idx[used], w[used], pv)
    XtX = X.T @ X
    tr_hr = float(np.trace(np.linalg.pinv(XtX) @ M))
    tr_r = float(np.sum(vex[used] / s2[used]))  # E[r_i^2] = exact variance / weight variance
    nj = J.shape[1]
    return M[:nj, :nj], tr_r - tr_hr, int(used.sum())


#: display-space step [px] of the model gradient behind the sampling-geometry columns of the uncertainties
MODEL_GRADIENT_PX = 0.25


def _is_sampling(name: str) -> bool:
    """Geometry parameters that move the experimental sampling points (not the simulation)."""
    return name != "thickness" and not name.startswith("psf")


def model_geometry_columns(problem: FineProblem, sol, g: dict, fit, sigma) -> dict:
    """Jacobian columns of the normalised residuals for the sampling-geometry parameters, from the expected
    data (the fitted model) instead of the recorded pixels: {name: column on the used samples}.

    A sampling-geometry parameter moves the points where the pattern is sampled, so its data-side column
    (:func:`_jacobian`) is the gradient of the interpolated noisy pixels: the noise's own gradient adds
    information that is not there (on the shipped CBED example it made the shift errors 1.5x too small, and
    decorrelated them from gl and rotation).  Here d x_i/d theta = grad m(xy_i) . d xy_i/d theta, with m the
    model c I + b as a function of display position (central differences of +-:data:`MODEL_GRADIENT_PX` px
    in x and y: four more tile solves, without derivatives, at the same beam sets) and d xy_i/d theta the
    motion of sample i's pixel seen in the current geometry (central differences of
    :func:`geometry_fd_step`).  Profiled like the others: the scale and background columns are projected out."""
    names = [n for n in problem.geometry_names if _is_sampling(n)]
    if not names:
        return {}
    used = np.isfinite(fit.model)
    pg = problem._pg(g)
    xy_all = pg.tilt_to_display(problem.kt)
    grads = []
    for axis in (0, 1):
        pair = []
        for sgn in (1.0, -1.0):
            xy2 = xy_all.copy()
            xy2[:, axis] += sgn * MODEL_GRADIENT_PX
            t0 = time.perf_counter()
            s2 = problem.model.solve_tiled(pg.display_to_tilt(xy2), problem.disks, beam_cache=problem.beam_cache)
            problem.counters["eigen_solves"] += 1
            problem.counters["eigen_solves_sigma"] = problem.counters.get("eigen_solves_sigma", 0) + 1
            problem.counters["solve_s"] += time.perf_counter() - t0
            pair.append(problem.sim_transform(s2.intensities([g["thickness"]])[:, 0, :].T, g))
        grads.append((pair[0] - pair[1]) / (2 * MODEL_GRADIENT_PX))
    scale = np.asarray(fit.scales if fit.scales is not None else np.full(len(problem.disks), fit.scale), float)
    dm = scale[:, None, None] * np.stack(grads, axis=-1)  # (nd, n_inner, 2) counts per display px
    xy = pg.tilt_to_display(problem.kt_inner)
    sim = problem.simulated(sol, g)
    L = _linear_columns(problem, sim, used, sigma)
    proj = (lambda c: c - L @ np.linalg.lstsq(L, c, rcond=None)[0]) if L.shape[1] else (lambda c: c)
    out = {}
    for name in names:
        h = geometry_fd_step(problem, g, name)
        moved = []
        for sgn in (1.0, -1.0):
            pgh = problem._pg({**g, name: g[name] + sgn * h})
            xyh = pgh.tilt_to_display(problem.kt_inner)
            moved.append(np.stack([pg.pixel_to_display(pgh.display_to_pixel(xyh, d), d) for d in problem.disks]))
        dxy = (moved[0] - moved[1]) / (2 * h)  # (nd, n_inner, 2) display px per unit of the parameter
        dx = np.sum(dm * dxy, axis=-1)  # d(expected sample)/d theta
        out[name] = proj(-dx[used] / sigma)
    return out


#: a sampling-geometry parameter whose standard error moves the samples by more than this [detector px, RMS over
#: the used samples] is flagged as barely determined (``sigma_info["barely_determined"]``, the report's warnings).
#: The interpolated noise has structure on the pixel scale (on the systematic-row LARBED of bench/coverage.py the
#: expected chi^2 ripples by +-6 with a period of one pixel along the weak shift), so the linearised error holds
#: while a parameter's error moves the samples by a small fraction of a pixel.  Measured (bench/coverage.py):
#: shifts with sigma 0.006-0.025 px are covered as the normal law says; the shift across a systematic row with
#: sigma 1.8 px scattered by 0.45 sigma, and the errors correlated with it were overstated too.
SAMPLING_SIGMA_LIMIT_PX = 0.2


def sample_motion_rates(problem: FineProblem, g: dict, used, names) -> dict:
    """{name: d(row, col)/d theta of the used samples (n_used, 2) [detector px per unit]} for the sampling-geometry
    parameters ``names`` at geometry g (central differences of :func:`geometry_fd_step`)."""
    out = {}
    for name in names:
        h = geometry_fd_step(problem, g, name)
        v = (_sample_pixels(problem, {**g, name: g[name] + h}) - _sample_pixels(problem, {**g, name: g[name] - h})) / (2 * h)
        out[name] = v[used]
    return out


def barely_determined(sigma: dict, rates: dict, limit_px: float = SAMPLING_SIGMA_LIMIT_PX) -> dict:
    """{name: RMS sample displacement [px] of one standard error} for the sampling parameters whose standard
    error ``sigma[name]`` moves the samples (``rates``, :func:`sample_motion_rates`) by more than ``limit_px``
    (:data:`SAMPLING_SIGMA_LIMIT_PX`)."""
    out = {}
    for name, v in rates.items():
        s = sigma.get(name)
        if s is None or not np.isfinite(s) or not len(v):
            continue
        d = float(s * np.sqrt(np.mean(np.sum(np.asarray(v) ** 2, axis=-1))))
        if d > limit_px:
            out[name] = d
    return out


def _sample_pixels(problem: FineProblem, g: dict) -> np.ndarray:
    """Pixel positions (row, col) of every (disk, inner point) sample at geometry g: (nd, n_inner, 2)."""
    pg = problem._pg(g)
    xy = pg.tilt_to_display(problem.kt_inner)
    return np.stack([pg.display_to_pixel(xy, d) for d in problem.disks])


def resampling_terms(problem: FineProblem, g: dict, fit, sample_variance_used, names, rates=None) -> tuple[np.ndarray, np.ndarray]:
    """(E[Q], Cov(Q)) of the sampling-geometry parameters ``names``: the part of the chi^2 gradient that
    comes from moving the samples over the pixel noise (:func:`~stages.physics.sampling.resampling_covariance`).

    A sampling parameter moves the points where the noisy pixels are interpolated, so the noise each sample
    sees changes with it: the half-gradient of chi^2 is J^T r + Q, Q_a = sum_i e_i (de_i/da) / s_i^2, and Q
    is a second, independent source of scatter of the estimate (uncorrelated with J^T r for symmetric noise).
    On the shipped CBED geometry it doubled the scatter of the rotation and the shifts over what J^T R J
    gives.  E[Q] (nonzero where the samples' phases within the pixels change with a) is a bias: -A^-1 E[Q]."""
    if not names:
        return np.zeros(0), np.zeros((0, 0))
    _, _, _, (idx, w), _ = problem.experimental_support(g)
    used = np.isfinite(fit.model)
    rc = _sample_pixels(problem, g)
    dwr, dwc = cubic_support_gradient(rc[..., 0][used], rc[..., 1][used])
    motion = sample_motion_rates(problem, g, used, names) if rates is None else rates
    wrates = [dwr * motion[n][:, :1] + dwc * motion[n][:, 1:2] for n in names]
    return resampling_covariance(w[used], wrates, idx[used], sample_variance_used, problem.pixel_variance_flat())


#: the fitted PSF "sits on" the padding's limit when its radius 4 sigma + 8 gamma is within this many of its own
#: standard errors of the limit (or within 1 % of it): the truth may lie beyond what the padding lets the search try
PSF_LIMIT_SIGMAS = 2.0


def psf_limit(problem: FineProblem, g: dict, sigma: dict, corr: dict) -> dict | None:
    """Where the refined PSF lies against the padding's limit (None when the PSF is not refined).

    Returns {"radius": R = 4 sigma + 8 gamma of the fit, "limit": the inner search's largest R
    (:func:`psf_padding_limits`), "sigma_radius": R's standard error (from psf_sigma's and psf_gamma's errors and
    their correlation ``corr``; NaN when undefined), "at_limit": R within :data:`PSF_LIMIT_SIGMAS` of its errors
    (or 1 %) of the limit, "padding": roi.padding, "padding_needed": the padding that holds R + 3 of its errors
    (at least one tilt step more) with the difference steps' margin}, all in tilt steps."""
    if "psf" not in problem.refine_geometry:
        return None
    r = voigt_radius(max(g["psf_sigma"], 1e-3), max(g["psf_gamma"], 0.0))
    ss, sg = float(sigma.get("psf_sigma", np.nan)), float(sigma.get("psf_gamma", np.nan))
    rho = float(corr.get(("psf_sigma", "psf_gamma"), 0.0))
    var = (PSF_RADIUS_SIGMA * ss) ** 2 + (PSF_RADIUS_GAMMA * sg) ** 2 + 2 * PSF_RADIUS_SIGMA * PSF_RADIUS_GAMMA * rho * ss * sg
    sr = float(np.sqrt(var)) if np.isfinite(var) and var >= 0 else float("nan")
    limit = float(problem.psf_search_radius)
    room = max(PSF_LIMIT_SIGMAS * sr, 0.01 * limit) if np.isfinite(sr) else 0.01 * limit
    fd_margin = problem.psf_radius_max - limit  # what the Jacobian's difference steps keep free
    need = r + max(3.0 * sr if np.isfinite(sr) else 0.0, 1.0) + fd_margin
    pad = problem.padding
    steps = [st for *_, st in problem.grids]
    while min(voigt_max_radius(a, pad) for a in steps) < need and pad < problem.padding + 64:
        pad += 1
    return {"radius": float(r), "limit": limit, "sigma_radius": sr if np.isfinite(sr) else None, "at_limit": bool(r >= limit - room),
            "padding": int(problem.padding), "padding_needed": int(pad)}


def error_jacobian(problem: FineProblem, sol, g: dict, fit, J: np.ndarray):
    """The Jacobian the standard errors are made from: (J_err, names, sampling, s2_used).

    ``J`` is the Jacobian of the profiled weighted residuals (:func:`_jacobian`); J_err is ``J`` with the
    sampling-geometry columns taken from the fitted model's gradient (:func:`model_geometry_columns`,
    not the noisy pixels'), ``names`` the parameters in column order, ``sampling`` the indices of those
    columns, ``s2_used`` the metric's variance of the used samples (None without sampling parameters).
    A^-1 J_err^T r (A = J_err^T J_err) is the linearised estimate's error for residuals r."""
    J = np.array(J, float)
    names = [p.label for p in problem.sf] + problem.geometry_names
    model_cols, s2_used = {}, None
    if any(_is_sampling(nm) for nm in problem.geometry_names):
        s2_used = _weight_variance(problem, sol, g)[np.isfinite(fit.model)]
        model_cols = model_geometry_columns(problem, sol, g, fit, np.sqrt(s2_used))
    for j, nm in enumerate(names):
        if nm in model_cols:
            J[:, j] = model_cols[nm]
    return J, names, [j for j, nm in enumerate(names) if nm in model_cols], s2_used


def _uncertainties(problem: FineProblem, values_sf, g, sol, fit, jac=None, profiled=None):
    """Standard errors, correlations, the Gauss-Newton step and how the errors were made, from the Jacobian
    J of the profiled weighted residuals r at the reported point (:func:`_jacobian`, or ``jac`` when
    already computed there).

    Covariance (:data:`SIGMA_METHOD`): the samples are cubic convolutions of independent pixels, so
    neighbouring samples share noise (a ROI sampled at half-pixel steps has each pixel in ~4 samples per
    line); the weighted least-squares estimate is still unbiased, but its covariance is the sandwich
    A⁻¹ (Jᵀ R J) A⁻¹ (A = JᵀJ), not A⁻¹, which would be too small by about the oversampling.
    The sampling-geometry columns are taken from the expected data (:func:`model_geometry_columns`), not from
    the gradient of the noisy pixels, and the meat gains C_Q, the covariance of the gradient term that moving
    the samples over the pixel noise adds (:func:`resampling_terms`); its mean gives ``resampling_bias``
    (-A⁻¹ E[Q], per parameter, in its units: the pull of the samples' phases within the pixels).  The
    covariance is scaled by max(1, χ²/ν_eff) with ν_eff = tr(R) − tr(H R) (exact noise: χ²/ν_eff = 1 on
    average; above 1 the
    model or the noise is underestimated and the errors grow with it).  A sampling parameter whose error moves
    the samples by more than :data:`SAMPLING_SIGMA_LIMIT_PX` is listed in ``barely_determined`` (the
    linearisation over the pixel-scale noise structure overstates its error).  step = -A⁻¹ Jᵀ r (all parameters
    jointly, linearised: where the least-squares optimum lies from here; a step of several sigma means the
    search stopped short of it).  ``profiled``: parameters at their optimum by a direct search at this
    point, whose gradient is taken as 0 (:func:`_lm_proposal`).

    A metric with ``uncertainty_undefined`` (not a chi^2: XCorrelation, a seed-style metric) gets NaN
    errors and correlations with that reason, and so does a metric without a pixel variance (no noise
    model to scale them).  Returns (sigma, correlation, step, info); info:
    method (or the reason the errors are undefined), dof_effective, chi2_effective (χ²/ν_eff), resampling_bias,
    barely_determined ({name: sample displacement of one sigma, px}), psf_limit (:func:`psf_limit`).
    """
    J, r = _jacobian(problem, values_sf, g, sol, fit) if jac is None else jac
    n = J.shape[1]
    nf = problem.n_free()
    info = {"method": SIGMA_METHOD, "defined": True, "dof_effective": None, "chi2_effective": None}
    if n == 0:
        return np.zeros(0), np.zeros((0, 0)), np.zeros(0), info
    try:
        inv = np.linalg.pinv(J.T @ J)
    except np.linalg.LinAlgError:
        return np.full(n, np.nan), np.full((n, n), np.nan), np.full(n, np.nan), {**info, "defined": False,
                                                                                 "method": "singular Jacobian"}
    b = J.T @ r
    if profiled is not None:
        b = np.where(np.asarray(profiled, bool), 0.0, b)
    step = -inv @ b
    reason = getattr(problem.gof, "uncertainty_undefined", None)
    if reason is None and problem.pixel_variance_flat() is None:
        reason = f"the metric {problem.gof.name} has no noise model (no pixel variance)"
    if reason:
        return np.full(n, np.nan), np.full((n, n), np.nan), step, {**info, "defined": False, "method": reason,
                                                                   "psf_limit": psf_limit(problem, g, {}, {})}
    J, names, samp, s2_used = error_jacobian(problem, sol, g, fit, J)
    if samp:
        inv = np.linalg.pinv(J.T @ J)
    M, dof_eff, n_used = sample_correlation_terms(problem, sol, g, fit, J)
    bias = np.zeros(len(names))
    motion = {}
    if samp:
        motion = sample_motion_rates(problem, g, np.isfinite(fit.model), [names[j] for j in samp])
        mean_q, cov_q = resampling_terms(problem, g, fit, s2_used, [names[j] for j in samp], rates=motion)
        M = np.array(M, float)
        M[np.ix_(samp, samp)] += cov_q
        eq = np.zeros(len(names))
        eq[samp] = mean_q
        bias = -inv @ eq
    chi2_eff = float(fit.value) / dof_eff if dof_eff > 0 else float("nan")
    cov = inv @ M @ inv * max(1.0, chi2_eff if np.isfinite(chi2_eff) else 1.0)
    sig = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sig, sig)
    sig_of = dict(zip(names, sig))
    corr_of = {(a, b): float(corr[i, j]) for i, a in enumerate(names) for j, b in enumerate(names)}
    info.update(dof_effective=float(dof_eff), chi2_effective=chi2_eff, resampling_bias=bias.tolist(),
                barely_determined=barely_determined(sig_of, motion), psf_limit=psf_limit(problem, g, sig_of, corr_of))
    return sig, corr, step, info


#: geometry kept physical by the Gauss-Newton polish: PSF widths >= these (tilt steps), thickness >= 1 Å
_GN_FLOOR = {"psf_sigma": 0.05, "psf_gamma": 0.0, "thickness": 1.0}


def _stepped(problem: FineProblem, values_sf, g: dict, d: np.ndarray):
    """values_sf and geometry g moved by the step d (structure factors first), structure factors
    clipped to their ranges, the geometry to :data:`_GN_FLOOR` and the PSF to what the padding supports
    (:meth:`FineProblem.clip_psf`)."""
    n = len(problem.sf)
    lo = np.array([p.lo for p in problem.sf], float)
    hi = np.array([p.hi for p in problem.sf], float)
    v = np.clip(np.asarray(values_sf, float) + d[:n], lo, hi)
    g2 = dict(g)
    for j, name in enumerate(problem.geometry_names):
        g2[name] = max(g[name] + float(d[n + j]), _GN_FLOOR.get(name, -np.inf))
    return v, problem.clip_psf(g2)


def _free_of_bounds(problem: FineProblem, values_sf, step: np.ndarray) -> np.ndarray:
    """Mask of the parameters a step may move: a structure factor at an end of its range whose
    Gauss-Newton step points out of the range is held there (active set), so that the others are
    solved for without it instead of a clipped step that need not descend."""
    n = len(problem.sf)
    free = np.ones(len(step), bool)
    for i, p in enumerate(problem.sf):
        tol = 1e-9 * (p.hi - p.lo)
        if (values_sf[i] <= p.lo + tol and step[i] < 0) or (values_sf[i] >= p.hi - tol and step[i] > 0):
            free[i] = False
    return free


def profiled_mask(problem: FineProblem) -> np.ndarray:
    """Mask over [structure factors, geometry] of the parameters held at their optimum by the inner
    search at every point (:meth:`FineProblem.inner_from`: the sampling geometry, not the thickness)."""
    return np.array([False] * len(problem.sf) + [n != "thickness" for n in problem.geometry_names], bool)


def _lm_proposal(problem: FineProblem, J: np.ndarray, r: np.ndarray, values_sf, f0: float, profiled=None):
    """(ratio, damped, step_sigma): the largest |undamped Gauss-Newton step| / sigma over the free
    parameters that are not profiled, a function lam -> the damped step (A + lam diag A) d = b,
    A = J^T J, b = -J^T r, with the structure factors held at an end of their range by a step pointing
    out of it (:func:`_free_of_bounds`) left at 0, and the undamped step / sigma of every parameter.

    ``profiled`` (mask, :func:`profiled_mask`): parameters at their optimum at this point by a direct
    search of the objective.  Their gradient is zero there (envelope theorem), so their part of b is
    set to 0: the step of the others is then the Gauss-Newton step of the profiled objective, -S^-1 b_s
    with S the Schur complement (the same marginal sigmas), and the profiled ones move only by their
    coupling to it.  Without this, the gradient the linear model sees in a profiled parameter (central
    differences over +-0.5 px of interpolated data, whose ripple the direct search steps over) pulls
    every step and never falls below tolerance.  The convergence ratio is taken over the others."""
    A = J.T @ J
    b = -(J.T @ r)
    prof = np.zeros(len(b), bool) if profiled is None else np.asarray(profiled, bool)
    b = np.where(prof, 0.0, b)
    inv = np.linalg.pinv(A)
    sig = np.sqrt(np.clip(np.diag(inv), 0, None) * max(1.0, f0))
    free = _free_of_bounds(problem, values_sf, inv @ b)
    gn = np.zeros(len(b))  # the undamped step of the free parameters (those at a range end held)
    gn[free] = np.linalg.pinv(A[np.ix_(free, free)]) @ b[free]
    with np.errstate(invalid="ignore", divide="ignore"):
        step_sigma = np.where(sig > 0, gn / sig, 0.0)
    tested = np.abs(step_sigma)[~prof]
    ratio = float(np.nanmax(tested)) if tested.size else 0.0
    Af = A[np.ix_(free, free)]

    def damped(lam: float) -> np.ndarray:
        d = np.zeros(len(b))
        d[free] = np.linalg.lstsq(Af + lam * np.diag(np.diag(Af)), b[free], rcond=None)[0]
        return d

    return ratio, damped, step_sigma


def _trial(problem: FineProblem, v2, g2: dict):
    """One eigen-solve at structure factors v2, with the analytic derivatives at g2's thickness (the
    Jacobian there if the point is kept): (solution, fit, reduced GOF; inf when no point is usable)."""
    try:
        s2 = problem.solve(v2, deriv_thickness=g2["thickness"])
        fit2 = problem.gof_at(s2, g2)
        return s2, fit2, float(problem.gof.reduced(fit2, problem.n_free()))
    except QcbedInputError:
        return None, None, np.inf


def gauss_newton_polish(problem: FineProblem, values_sf, g: dict, sol, fit, steps: int, on_step=None,
                        tol_sigma: float = 0.1, lam0: float = 1e-3):
    """Levenberg-Marquardt steps on all refined parameters jointly (structure factors and geometry),
    from the point the outer search reports, on the same profiled weighted residuals as the
    uncertainties.

    Nelder-Mead over the structure factors with a geometry optimum inside each evaluation moves
    slowly once it is close (many outer iterations of one eigen-solve each, along a curved valley
    through thickness); a Gauss-Newton step uses the Jacobian (one solve per structure factor, the
    geometry at the cached solution) and lands near the least-squares optimum when the model is
    close to linear over the step.  Each step: J and r at the point; the damped normal equations
    (A + lam diag A) d = -J^T r with A = J^T J, without the structure factors held at an end of their
    range by a step pointing out of it (:func:`_free_of_bounds`); structure factors clipped to their
    ranges; the
    candidate is solved once and kept when its reduced GOF is lower (lam / 10), else lam x 10 and
    again (at most 4 tries).  Stops as converged when the undamped step is below ``tol_sigma``
    standard errors in every free parameter (an optimum on the range's end for the held ones: the
    report flags them); stops when no try lowers the GOF (converged if that step was below 1 sigma);
    else after ``steps`` steps.  Deterministic: a resumed run repeats it.

    Returns (values_sf, g, sol, fit, info); info: steps, accepted, converged, gof_before, gof_after,
    max_step_sigma (of the last Jacobian), jac ((J, r) at the returned point when computed there,
    else None).  The model's potential is left at the returned values.
    """
    nf = problem.n_free()
    v, sol_v, fit_v = np.asarray(values_sf, float), sol, fit
    f0 = float(problem.gof.reduced(fit, nf))
    info = {"steps": 0, "accepted": 0, "converged": False, "gof_before": f0, "gof_after": f0,
            "max_step_sigma": None, "jac": None}
    lam = lam0
    for k in range(steps):
        J, r = _jacobian(problem, v, g, sol_v, fit_v)
        info["jac"] = (J, r)
        ratio, damped, _ = _lm_proposal(problem, J, r, v, f0)
        info["max_step_sigma"] = ratio
        if ratio < tol_sigma:
            info["converged"] = True
            break
        kept = False
        for _ in range(4):
            v2, g2 = _stepped(problem, v, g, damped(lam))
            s2, fit2, f2 = _trial(problem, v2, g2)
            if np.isfinite(f2) and f2 < f0:
                v, g, sol_v, fit_v, f0 = v2, g2, s2, fit2, f2
                lam = max(lam / 10.0, 1e-9)
                kept = True
                break
            lam *= 10.0
        info["steps"] += 1
        if on_step is not None:
            on_step(k + 1, f0, kept, ratio, v, g)
        if not kept:
            info["converged"] = ratio < 1.0
            break
        info["accepted"] += 1
        info["jac"] = None  # the point moved
    apply_sf(problem.model, problem.sf, v)  # the potential at the returned point (its solution is sol_v)
    info["gof_after"] = f0
    return v, g, sol_v, fit_v, info


def _resid(fit2, used, r0):
    """Derivative numerator: residuals at the displaced point minus the optimum's, on the optimum's points."""
    r = fit2.residual[used] if used is not None else fit2.residual.ravel()
    out = r - r0
    out[~np.isfinite(out)] = 0.0
    return out


OPTIMIZERS = ("nelder-mead", "levenberg-marquardt")


def levenberg_marquardt(problem: FineProblem, max_steps: int = 200, tol_sigma: float = 0.1, lam0: float = 1e-3,
                        callback=None, on_start=None, state: dict | None = None,
                        gof_start: float | None = None, on_proposal=None) -> FineResult:
    """Levenberg-Marquardt on the structure factors and the geometry jointly, with the analytic Jacobian.

    Start: one eigen-solve at the start structure factors and the inner geometry optimum there (cached
    solution, as the Nelder-Mead objective's first evaluation: the start figure of merit and ZNCC, and
    the geometry the steps start from); then one solve with the analytic derivatives at that geometry's
    thickness.  Each step: the damped normal equations (A + lam diag A) d = -J^T r on the profiled
    weighted residuals (:func:`_lm_proposal`; structure factors held at a range end when the step points
    out, clipped to their ranges, geometry to :data:`_GN_FLOOR`), then exactly one eigen-solve at the
    candidate with the derivatives at its thickness (:func:`_trial`): kept when the reduced GOF is lower
    (lam / 10; its Jacobian comes from that solve), and the sampling geometry (all but the thickness)
    re-optimised there by the inner search, else lam x 10.  The sampling geometry is thus profiled: the
    step of the others is the Gauss-Newton step of the profiled objective (:func:`_lm_proposal`).
    Candidate and current point are compared on the profiled figure of merit (the inner search runs at
    the candidate's solution before the comparison).  Converged when that undamped step is below
    ``tol_sigma`` standard errors in every free structure factor and the thickness (no solve), or when a
    step whose every component is below 1 sigma is rejected (the optimum is located to better than one
    standard error and the figure of merit does not resolve it further: its pixel-scale ripple);
    stopped when lam exceeds 1e8 (converged if that step was below 1 sigma) or after ``max_steps``
    steps.  ``counters["lm_stop"]`` says which.
    ``on_proposal(step, step_sigma)``: the undamped step / sigma of every parameter before each step.

    ``callback(step, values_sf, geometry, lam, gof, accepted)`` after every step (a checkpoint);
    ``state`` (the last checkpoint: step, values, geometry, lam, gof, accepted) continues an
    interrupted run: the start is evaluated again (the same beam sets and start geometry), the
    checkpoint's point solved once, and every later step is the uninterrupted run's (deterministic).
    """
    t_start = time.perf_counter()
    sf = problem.sf
    nf = problem.n_free()
    names_g = problem.geometry_names
    v0 = np.array([p.x0 for p in sf], float)
    problem.initial_geometry = problem.geometry_start()
    sol = problem.solve(v0)
    f_start, g, fit = problem.inner(sol)
    exp0, sim0, used0 = _fit_arrays(problem, sol, g, fit)
    zncc_start = zncc_per_disk(exp0, sim0, used0)
    problem.set_start(g)
    gof_start = float(f_start) if gof_start is None else float(gof_start)
    if on_start is not None:
        on_start(gof_start)
    if state is not None:
        v = np.asarray(state["values"], float)
        g = {**problem.geometry_start(), **{k: float(x) for k, x in state["geometry"].items()}}
        lam, k, n_acc = float(state["lam"]), int(state["step"]), int(state["accepted"])
    else:
        v, lam, k, n_acc = v0, float(lam0), 0, 0
    start_solves = problem.counters["eigen_solves"] + 1
    sol, fit, f = _trial(problem, v, g)
    if sol is None:
        raise QcbedInputError("refine", "no usable sample at the start geometry", "check the ROI and the geometry")
    J, r = _jacobian(problem, v, g, sol, fit)
    trace, converged, ratio, stop = [], False, np.inf, "max_steps"
    prof = profiled_mask(problem)
    while k < max_steps:
        check_stop()  # SIGINT/SIGTERM: stop after the last checkpointed step (stages.interrupt)
        ratio, damped, step_sigma = _lm_proposal(problem, J, r, v, f, profiled=prof)
        if on_proposal is not None:
            on_proposal(k, step_sigma)
        if ratio < tol_sigma:
            converged, stop = True, f"step below {tol_sigma:g} sigma"
            break
        if lam > 1e8:
            converged, stop = ratio < 1.0, "lambda above 1e8"
            break
        v2, g2 = _stepped(problem, v, g, damped(lam))
        s2, fit2, f2 = _trial(problem, v2, g2)
        k += 1
        if np.isfinite(f2):
            # the profiled figure of merit at the candidate: the sampling geometry (not the thickness) to
            # its optimum at this solution, cheaply (cached solution; Powell's line searches step over the
            # pixel-scale ripple of interpolated data that Gauss-Newton steps can only crawl along), so
            # that the candidate and the current point are compared on the same objective
            fp, gp, fitp = problem.inner_from(s2, g2)
            if float(fp) <= f2:  # never worse than the step's own point
                f2, g2, fit2 = float(fp), gp, fitp
        accepted = bool(np.isfinite(f2) and f2 < f)
        if accepted:
            v, sol, f, g, fit = v2, s2, f2, g2, fit2
            lam = max(lam / 10.0, 1e-9)
            n_acc += 1
            J, r = _jacobian(problem, v, g, sol, fit)
        else:
            lam *= 10.0
        trace.append((k, v.tolist(), float(f)))
        if callback is not None:
            callback(k, v, {n: float(g[n]) for n in names_g}, lam, float(f), n_acc)
        if not accepted and ratio < 1.0:
            # the whole remaining step is inside one standard error and the profiled figure of merit does
            # not go down along it: the optimum is located to better than the data resolve it
            converged, stop = True, "rejected step below 1 sigma"
            break
    apply_sf(problem.model, sf, v)
    names = [p.label for p in sf] + names_g
    values = np.concatenate([v, [g[n] for n in names_g]])
    exp_b, sim_b, used_b = _fit_arrays(problem, sol, g, fit)
    fit_arrays = {"exp": exp_b, "sim": sim_b, "model": np.asarray(fit.model, float),
                  "residual": np.asarray(fit.residual, float), "used": used_b}
    sigma, corr, step, sig_info = _uncertainties(problem, v, g, sol, fit, jac=(J, r), profiled=prof)
    counters = dict(problem.counters)
    counters.update({"optimizer": "levenberg-marquardt", "outer_evaluations": k, "outer_iterations": k,
                     "lm_steps": k, "lm_accepted": n_acc, "lm_rejected": k - n_acc,
                     "lm_lambda": lam, "lm_max_step_sigma": float(ratio), "lm_stop": stop,
                     "eigen_solves_start": start_solves,
                     "resumed_from_step": int(state["step"]) if state else -1,
                     "outer_s": time.perf_counter() - t_start, "total_s": time.perf_counter() - t_start})
    dof = int(fit.n_points - fit.n_linear - nf)
    return FineResult(names=names, values=values, sigma=sigma, correlation=corr, gof=float(f), gof_start=gof_start,
                      scale=float(fit.scale), background=np.asarray(fit.background), geometry=dict(g), trace=trace,
                      counters=counters, n_points=int(fit.n_points), dof=dof, converged=converged, fit=fit_arrays,
                      zncc=zncc_per_disk(exp_b, sim_b, used_b), zncc_start=np.asarray(zncc_start, float),
                      gauss_newton_step=step, sigma_info=sig_info)
