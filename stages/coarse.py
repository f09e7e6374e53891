"""Coarse refinement by correlation: thickness, orientation, gl, voltage, Debye-Waller B, cell.

The step before the fine structure-factor refinement (../shared/research/pyextal.md §1-2,
PyExtal's ``CoarseOptimize``, redesigned).  Pure functions of in-memory objects: a
:class:`~stages.simulate.ForwardModel`, a :class:`~stages.physics.pattern_geometry.PatternGeometry`
and the pattern Dataset of :mod:`stages.load`; the pipeline wraps them in a stage.

**Simulated field.**  One square grid of incident tilts in the display frame of a geometry, step
``step_px`` display pixels, half-size ``box_px + search_px``, solved once
(:func:`simulate_field`: one ``solve_tiled`` over every grid tilt, output beams = the disks).
Its central ``(2 box + 1)^2`` window is the *template*: the tilts at which the experiment is
compared.  Every thickness trial recomputes intensities from the cached eigen-solution.  An
optional point spread (``psf_px`` = Voigt sigma, gamma in display px; LARBED) blurs the field.

**Template.**  For a geometry ``pg`` the experimental value of disk g at template tilt K is the
pattern sampled (cubic convolution, :func:`~stages.physics.sampling.cubic_sample`) at the pixel
that ``pg`` assigns to K: ``pg.display_to_pixel(pg.tilt_to_display(K), g)`` (with the field built
from ``pg``: the display grid points).  Samples whose 4x4 support touches an invalid pixel, or
farther than ``radius_px`` from the display origin (CBED: keep the template inside the disk), are
excluded.  A gl trial resamples the experiment (the CBED disk centres move with gl); the
simulation stays fixed in tilt (DESIGN.md: geometry never re-solves).

**Correlation.**  For a shift m (field grid steps) the joint zero-mean normalised
cross-correlation of the stacked disks

    NCC(m) = Σ_d Σ_u w_d(u) (T_d(u) - <T_d>) (S_d(u+m) - <S_d>_m)
             / sqrt(Σ_d Σ_u w_d (T_d - <T_d>)^2 · Σ_d Σ_u w_d (S_d(u+m) - <S_d>_m)^2)

with w_d the template mask; means per disk (``background="per_disk"``, default: the Pearson
correlation of a model c·S + b_d with one scale and one background per disk, as
Chi2_multibackground) or over the whole stack (``"joint"``, PyExtal's 3-D ``match_template``: one
scale, one background).  Every grid shift at once by FFT (the masked correlation of Padfield,
IEEE TIP 21 (2012) 2706, simplified because the simulated field has no invalid pixels); the peak
is refined by a parabola through its neighbours on each axis, and 1 - (that value) is the
objective of the scan + bounded Brent (scipy ``minimize_scalar``) over thickness or gl.

**Polish.**  The grid places the shift only to a step, and a correlation peak narrow across and
long along a ridge (a pattern of nearly parallel lines, e.g. a systematic row) is misplaced from
grid values by up to several steps.  The fit therefore ends with a continuous maximisation
(Nelder-Mead, restarted, from the best few grid maxima) over thickness (or gl) and shift, with the
experimental samples fixed and the noise-free field interpolated by cubic splines.  (Moving the
noisy samples instead changes how much noise their interpolation averages, and cubic convolution
of the field low-passes sharp fringes by an amount that depends on the fraction: both bias the
correlation toward half-step shifts.)

**Orientation.**  A shift m means that the experimental sample ``pg`` places at tilt K truly
belongs to K + p step (m_x e_x - m_y e_y) (p: tilt per field pixel).  The result's geometry has
tilt0 moved by that amount; the experimental sampling, which does not depend on tilt0, is
unchanged, so a repeated fit from the result finds m ≈ 0 (PyExtal moves tilt0 but not its tilt
net, and a repeat double-counts the shift).

**Physics that re-solves** (:func:`coarse_voltage`, :func:`coarse_debye_waller`,
:func:`coarse_cell`): each trial rebuilds the ForwardModel, solves one field, and maximises the
NCC over shift and (cheaply, from that solution) thickness in a narrow bracket.  Refined U_g /
U'_g overrides of the model are carried over (scaled by γ'/γ for a new voltage, since
U = γ F/(πΩ)); PyExtal's ``resetugh`` silently dropped them.  With ``uncertainty=True`` each also gives
standard errors from the curvature of a χ²-like profile of the NCC (:data:`SIGMA_DEFINITION`, a few more
solves); :func:`with_refined_physics` puts a fit's voltage, cell or B into the model of later stages.

Counters in every result: ``eigen_solves`` (fields solved), ``tilts_solved``,
``intensity_evaluations`` (thicknesses evaluated from cached solutions), ``ncc_maps`` (FFT
correlation maps), ``template_samplings`` (experimental templates sampled), ``wall_s``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi
from scipy.optimize import minimize, minimize_scalar

from .errors import QcbedInputError
from .physics import constants as K
from .physics.pattern_geometry import PatternGeometry
from .physics.sampling import convolve_valid, cubic_sample, voigt_kernel
from .simulate import ForwardModel, TiledSolution

BACKGROUNDS = ("per_disk", "joint")
_SCAN_MIN, _SCAN_MAX = 15, 121  # automatic thickness scan: number of thicknesses
_BATCH = 8  # thicknesses per intensity / FFT batch


# ------------------------------------------------------------------------------ bookkeeping
@dataclass
class Counters:
    eigen_solves: int = 0
    tilts_solved: int = 0
    intensity_evaluations: int = 0
    ncc_maps: int = 0
    template_samplings: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("eigen_solves", "tilts_solved", "intensity_evaluations", "ncc_maps",
                                              "template_samplings", "wall_s")}


@dataclass
class SimField:
    """Eigen-solution on a square tilt grid (see the module docstring); re-usable across calls."""

    model: ForwardModel
    geometry: PatternGeometry  # its display grid (tilt0 at the centre, its gl) defines the tilts
    disks: np.ndarray  # (nd, 3)
    step_px: float
    n_box: int  # template half-size [grid steps]
    n_search: int  # search half-range [grid steps]
    solution: TiledSolution
    solve_s: float

    @property
    def n_side(self) -> int:
        return 2 * (self.n_box + self.n_search) + 1

    @property
    def n_template(self) -> int:
        return 2 * self.n_box + 1

    @property
    def tilt_per_px_invA(self) -> float:
        """Tilt per field pixel p [Å^-1] (the grid step is ``step_px`` of these)."""
        return self.geometry.pixel_size_invA

    def template_xy(self) -> np.ndarray:
        """Display points (n*n, 2) of the template in the field's own geometry, rows = y."""
        ax = self.step_px * np.arange(-self.n_box, self.n_box + 1)
        X, Y = np.meshgrid(ax, ax)
        return np.stack([X.ravel(), Y.ravel()], 1)

    def template_tilts(self) -> np.ndarray:
        return self.geometry.display_to_tilt(self.template_xy())

    def intensities(self, thickness_A) -> np.ndarray:
        """Simulated field (n_thickness, nd, n_side, n_side) at the given thicknesses."""
        t = np.atleast_1d(np.asarray(thickness_A, float))
        inten = self.solution.intensities(t)  # (ntilt, nt, nd)
        n = self.n_side
        return np.ascontiguousarray(np.transpose(inten, (1, 2, 0))).reshape(len(t), len(self.disks), n, n)


@dataclass
class CoarseResult:
    """Outcome of one coarse fit.

    ``geometry``: the input geometry with the orientation correction applied (tilt0 moved by the
    shift found) and, for :func:`coarse_gl`, the fitted gl; ``shift_px``: that correction, display
    pixels (x, y) of the *input* geometry; ``ncc``: joint NCC at the optimum; ``ncc_per_disk``:
    each disk's own zero-mean NCC at the same shift; ``params``: the fitted physical parameters;
    ``scan``: the coarse scan before Brent ({parameter: values, "ncc": values}); ``at_edge``: the
    correlation peak lies on the border of the search range (widen ``search_px``); ``at_bound``:
    the optimum lies at a bound of the bracket (widen it).
    """

    thickness_A: float
    geometry: PatternGeometry
    model: ForwardModel
    shift_px: tuple[float, float]
    ncc: float
    ncc_per_disk: np.ndarray
    disks: np.ndarray
    params: dict
    counters: dict
    scan: dict = field(default_factory=dict)
    at_edge: bool = False
    at_bound: bool = False
    field: SimField | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """JSON-serialisable summary (for the stage store's attrs and reports)."""
        def plain(v):
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, np.generic):
                return v.item()
            return v
        return {
            "thickness_A": float(self.thickness_A), "thickness_nm": float(self.thickness_A) / 10.0,
            "geometry": self.geometry.as_dict(), "hv_kV": float(self.model.hv_kV),
            "shift_px": [float(x) for x in self.shift_px], "ncc": float(self.ncc),
            "ncc_per_disk": [float(x) for x in self.ncc_per_disk], "disks": np.asarray(self.disks).tolist(),
            "params": plain(self.params), "counters": dict(self.counters), "scan": plain(self.scan),
            "at_edge": bool(self.at_edge), "at_bound": bool(self.at_bound),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


# ------------------------------------------------------------------------------ field
def _grid_counts(box_px, search_px, step_px) -> tuple[int, int, float]:
    for name, v, pos in (("box_px", box_px, True), ("search_px", search_px, False), ("step_px", step_px, True)):
        if v is None or not np.isfinite(v) or v < 0 or (pos and v <= 0):
            raise QcbedInputError(f"coarse.{name}", f"must be a {'positive' if pos else 'non-negative'} number of "
                                  f"display pixels, got {v!r}")
    step = float(step_px)
    nb = int(round(box_px / step))
    ns = int(np.ceil(search_px / step - 1e-9))
    if nb < 1:
        raise QcbedInputError("coarse.box_px", f"{box_px} px is less than one grid step ({step} px)",
                              "use a larger box or a smaller step")
    return nb, ns, step


def simulate_field(model: ForwardModel, pg: PatternGeometry, disks, box_px: float, search_px: float,
                   step_px: float = 1.0, counters: Counters | None = None) -> SimField:
    """Solve the eigenproblem once on the square tilt grid of ``pg`` (half-size box + search)."""
    nb, ns, step = _grid_counts(box_px, search_px, step_px)
    disks = np.atleast_2d(np.asarray(disks, int))
    n = nb + ns
    ax = step * np.arange(-n, n + 1)
    X, Y = np.meshgrid(ax, ax)
    kt = pg.display_to_tilt(np.stack([X.ravel(), Y.ravel()], 1))
    t0 = time.perf_counter()
    sol = model.solve_tiled(kt, disks)
    dt = time.perf_counter() - t0
    if counters is not None:
        counters.eigen_solves += 1
        counters.tilts_solved += len(kt)
    return SimField(model=model, geometry=pg, disks=disks, step_px=step, n_box=nb, n_search=ns, solution=sol,
                    solve_s=dt)


def _check_field(fld: SimField, model, disks, box_px, search_px, step_px) -> None:
    nb, ns, step = _grid_counts(box_px, search_px, step_px)
    if fld.model is not model:
        raise QcbedInputError("coarse.field", "was simulated with another forward model", "pass field=None to re-solve")
    if not np.array_equal(fld.disks, np.atleast_2d(np.asarray(disks, int))):
        raise QcbedInputError("coarse.field", "was simulated for another list of disks", "pass field=None to re-solve")
    if (nb, ns) != (fld.n_box, fld.n_search) or not np.isclose(step, fld.step_px):
        have = f"{fld.n_box * fld.step_px}/{fld.n_search * fld.step_px}/{fld.step_px}"
        raise QcbedInputError("coarse.field", f"has box/search/step {have} px, not {box_px}/{search_px}/{step_px}",
                              "use the field's values")


# ------------------------------------------------------------------------------ template
def _images(pattern, pg: PatternGeometry, disks: np.ndarray):
    kind = pattern.attrs.get("kind", pg.kind)
    if kind != pg.kind:
        raise QcbedInputError("pattern.kind", f"pattern is {kind!r} but the geometry is {pg.kind!r}")
    inten = np.asarray(pattern.intensity.values, float)
    valid = np.asarray(pattern.valid.values, bool) if "valid" in pattern else np.isfinite(inten)
    if kind == "cbed":
        return [(inten, valid)] * len(disks)
    lut = {tuple(int(v) for v in h): i for i, h in
           enumerate(zip(pattern.h.values.tolist(), pattern.k.values.tolist(), pattern.l.values.tolist()))}
    out = []
    for h in disks.tolist():
        if tuple(h) not in lut:
            raise QcbedInputError("coarse.disks", f"reflection {' '.join(map(str, h))} has no image in the pattern",
                                  "use reflections listed in the pattern's hkl")
        out.append((inten[lut[tuple(h)]], valid[lut[tuple(h)]]))
    return out


def _ncc_direct(T: np.ndarray, mask: np.ndarray, S: np.ndarray, background: str) -> tuple[float, np.ndarray]:
    """Joint NCC (per-disk or joint means) and each disk's own NCC of T against S, both (nd, n), over mask."""
    m = mask
    nd_ = m.sum(axis=1).astype(float)
    if np.any(nd_ < 2):
        return -1.0, np.zeros(len(m))
    Tm = np.where(m, T, 0.0)
    Sm = np.where(m, S, 0.0)
    Tz_d = (Tm - (Tm.sum(axis=1) / nd_)[:, None]) * m
    Sz_d = (Sm - (Sm.sum(axis=1) / nd_)[:, None]) * m
    num_d = (Tz_d * Sz_d).sum(axis=1)
    t2_d, s2_d = (Tz_d**2).sum(axis=1), (Sz_d**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(t2_d * s2_d > 0, num_d / np.sqrt(t2_d * s2_d), 0.0)
        if background == "per_disk":
            joint = num_d.sum() / np.sqrt(t2_d.sum() * s2_d.sum())
        else:
            Tz = (Tm - Tm.sum() / nd_.sum()) * m
            Sz = (Sm - Sm.sum() / nd_.sum()) * m
            joint = (Tz * Sz).sum() / np.sqrt((Tz**2).sum() * (Sz**2).sum())
    return (float(joint) if np.isfinite(joint) else -1.0), per


class _Matcher:
    """Masked zero-mean NCC of a disk-stacked template against every window of a field (FFT)."""

    def __init__(self, values: np.ndarray, mask: np.ndarray, n_side: int, background: str = "per_disk"):
        m = mask.astype(float)
        v = np.where(mask, values, 0.0)
        nd, n, _ = m.shape
        self.background, self.n_side, self.n_tpl, self.nd = background, n_side, n, nd
        self.n_d = m.sum(axis=(1, 2))
        if background == "per_disk":
            tz = (v - (v.sum(axis=(1, 2)) / self.n_d)[:, None, None]) * m
        else:
            tz = (v - v.sum() / self.n_d.sum()) * m
        self.t2 = float((tz**2).sum())
        shape = (n_side, n_side)
        self.FT = np.conj(sfft.rfft2(tz, s=shape))
        self.FM = np.conj(sfft.rfft2(m, s=shape))
        self.na = n_side - n + 1  # shifts per axis

    def _corr(self, F) -> np.ndarray:
        return sfft.irfft2(F, s=(self.n_side, self.n_side))[..., : self.na, : self.na]

    def maps(self, S: np.ndarray) -> np.ndarray:
        """Joint NCC maps (B, na, na) for fields S (B, nd, N, N); map index (i, j) = shift (j, i) - n_search steps."""
        FS = sfft.rfft2(S)
        num = self._corr((self.FT[None] * FS).sum(axis=1))
        s1 = self._corr(self.FM[None] * FS)  # (B, nd, na, na)
        s2 = self._corr(self.FM[None] * sfft.rfft2(S * S))
        if self.background == "per_disk":
            var = (s2 - s1**2 / self.n_d[None, :, None, None]).sum(axis=1)
        else:
            var = s2.sum(axis=1) - s1.sum(axis=1) ** 2 / self.n_d.sum()
        scale = np.abs(s2.sum(axis=1)) + 1e-300
        var = np.where(var > 1e-12 * scale, var, np.nan)
        ncc = num / np.sqrt(self.t2 * var)
        return np.where(np.isfinite(ncc), ncc, -1.0)


def _parabola(ym, y0, yp) -> tuple[float, float]:
    """Vertex offset (clipped to ±0.5) and the value there of the parabola through (-1, ym), (0, y0), (1, yp)."""
    a = 0.5 * (yp + ym) - y0
    b = 0.5 * (yp - ym)
    if a >= 0:  # not a maximum: keep the grid point
        return 0.0, float(y0)
    x = float(np.clip(-b / (2 * a), -0.5, 0.5))
    return x, float(a * x * x + b * x + y0)


@dataclass(frozen=True)
class _Peak:
    shift: tuple[float, float]  # (mx, my) field grid steps, parabolic sub-step
    value: float
    at_edge: bool
    starts: tuple = ()  # the best local maxima of the map (shifts), starting points of the polish


_N_STARTS = 3


def _peak(c: np.ndarray, n_search: int) -> _Peak:
    na = c.shape[0]
    i, j = np.unravel_index(int(np.argmax(c)), c.shape)
    v0 = float(c[i, j])
    di = dj = gi = gj = 0.0
    if 0 < i < na - 1:
        di, vi = _parabola(c[i - 1, j], v0, c[i + 1, j])
        gi = vi - v0
    if 0 < j < na - 1:
        dj, vj = _parabola(c[i, j - 1], v0, c[i, j + 1])
        gj = vj - v0
    edge = na > 1 and (i in (0, na - 1) or j in (0, na - 1))
    best = (float(j + dj - n_search), float(i + di - n_search))
    # other local maxima (8-neighbourhood): a ridge of nearly parallel lines has several along it
    pad = np.pad(c, 1, constant_values=-np.inf)
    nb = np.max([pad[1 + a:1 + a + na, 1 + b:1 + b + na] for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b], axis=0)
    ii, jj = np.nonzero(c >= nb)
    order = np.argsort(-c[ii, jj], kind="stable")
    starts = [best] + [(float(jj[k] - n_search), float(ii[k] - n_search)) for k in order
                       if (ii[k], jj[k]) != (i, j)][: _N_STARTS - 1]
    return _Peak(best, v0 + gi + gj, bool(edge), tuple(starts))


class _Problem:
    """One field and the experimental template, sampled once at the geometry ``pg``.

    The value of disk d at template point u is the pixel P_d(u) that ``pg`` assigns to the
    template tilt K(u) (a tilt of the field's grid).  A shift m [field grid steps] says that P_d(u)
    truly belongs to K(u + m): it is compared with the field at u + m, on the grid for the FFT
    search and interpolated (cubic splines of the noise-free simulation) in between.  The
    experimental samples never move with m: resampling noisy data at moving sub-pixel positions
    changes how much noise the interpolation averages and biases a correlation toward half-pixel
    positions.  (Interpolating the simulation by cubic convolution instead of splines has the
    same defect when fringes are sharp at the grid step: its low-pass varies with the fraction.)
    """

    def __init__(self, fld: SimField, pg: PatternGeometry, images, radius_px, background: str, counters: Counters):
        if background not in BACKGROUNDS:
            raise QcbedInputError("coarse.background", f"unknown mode {background!r}",
                                  f"use {' or '.join(BACKGROUNDS)}")
        self.fld, self.pg, self.background, self.counters = fld, pg, background, counters
        disks = fld.disks
        n = fld.n_template
        xy = pg.tilt_to_display(fld.template_tilts())
        vals = np.full((len(disks), n * n), np.nan)
        mask = np.zeros((len(disks), n * n), bool)
        inside = np.ones(len(xy), bool) if radius_px is None else np.hypot(xy[:, 0], xy[:, 1]) <= float(radius_px)
        for d, h in enumerate(disks):
            img, ok_pix = images[d]
            rc = pg.display_to_pixel(xy, h)
            v, ok = cubic_sample(img, rc[:, 0], rc[:, 1], ok_pix)
            ok &= inside
            vals[d, ok] = v[ok]
            mask[d] = ok
            if ok.sum() < 3:
                raise QcbedInputError("coarse", f"disk {' '.join(map(str, h))}: fewer than 3 template samples are on "
                                      "valid pixels (masked, unrecorded, or outside the pattern)",
                                      "move or shrink the template (box_px, radius_px) or check the geometry")
        counters.template_samplings += 1
        self.values, self.mask = vals, mask  # (nd, n*n)
        self._matcher = None
        g = np.arange(n, dtype=float) + fld.n_search
        self._rows, self._cols = (a.ravel() for a in np.meshgrid(g, g, indexing="ij"))

    @property
    def matcher(self) -> _Matcher:
        if self._matcher is None:
            n = self.fld.n_template
            self._matcher = _Matcher(self.values.reshape(-1, n, n), self.mask.reshape(-1, n, n), self.fld.n_side,
                                     self.background)
        return self._matcher

    def peaks(self, S: np.ndarray) -> list[_Peak]:
        """Correlation peak over the shift grid for each field of S (B, nd, N, N)."""
        maps = self.matcher.maps(S)
        self.counters.ncc_maps += len(maps)
        return [_peak(c, self.fld.n_search) for c in maps]

    def ncc(self, coeffs: np.ndarray, m) -> tuple[float, np.ndarray]:
        """NCC (joint, per disk) at a continuous shift m [steps]; ``coeffs``: spline coefficients of one field."""
        r, c = self._rows + float(m[1]), self._cols + float(m[0])
        sim = np.stack([ndi.map_coordinates(cd, [r, c], order=3, prefilter=False, mode="mirror") for cd in coeffs])
        return _ncc_direct(self.values, self.mask, sim, self.background)

    def correction(self, pg_trial: PatternGeometry, m) -> tuple[PatternGeometry, tuple[float, float]]:
        """``pg_trial`` (the template's geometry) with tilt0 moved by the shift m [steps]: by p_field step
        (mx e_x - my e_y); and that move in its display px (x, y)."""
        geo = pg_trial.geometry
        p = self.fld.tilt_per_px_invA * self.fld.step_px
        delta = geo.crystal.cart_to_recip(p * (float(m[0]) * geo.e_x - float(m[1]) * geo.e_y))
        tilt0 = np.asarray(pg_trial.tilt0, float) + delta
        d = pg_trial.tilt_to_display(tilt0)
        return pg_trial.with_(tilt0=tuple(float(x) for x in tilt0)), (float(d[0]), float(d[1]))


# ------------------------------------------------------------------------------ optimisation helpers
def _psf_kernel(psf_px, step_px: float):
    """Voigt kernel (sigma, gamma in display px) sampled at the field step, or None."""
    if psf_px is None:
        return None
    try:
        sigma, gamma = (float(v) for v in psf_px)
    except (TypeError, ValueError):
        raise QcbedInputError("coarse.psf_px", f"must be (sigma, gamma) in display px, got {psf_px!r}") from None
    if not (np.isfinite(sigma) and np.isfinite(gamma)) or sigma < 0 or gamma < 0:
        raise QcbedInputError("coarse.psf_px", f"sigma and gamma must be >= 0, got {psf_px!r}")
    if sigma == 0 and gamma == 0:
        return None
    return voigt_kernel(sigma / step_px, gamma / step_px)


class _FieldCache:
    """Simulated field intensities at thicknesses, blurred by the point spread (if any); single
    thicknesses memoised; every thickness evaluated is counted."""

    def __init__(self, fld: SimField, counters: Counters, kernel=None, size: int = 64):
        self.fld, self.counters, self.kernel, self.size = fld, counters, kernel, size
        self.memo: dict[float, np.ndarray] = {}

    def many(self, ts) -> np.ndarray:
        """(len(ts), nd, N, N)."""
        S = self.fld.intensities(ts)
        self.counters.intensity_evaluations += len(S)
        if self.kernel is not None:
            # edge-replicating padding: the template window and moderate shifts are exact when the
            # kernel radius does not exceed the search margin
            R = self.kernel.shape[0] // 2
            S = convolve_valid(np.pad(S, ((0, 0), (0, 0), (R, R), (R, R)), mode="edge"), self.kernel)
        return S

    def __call__(self, t: float) -> np.ndarray:
        """Cubic-spline coefficients (nd, N, N) of the field at thickness t (for :meth:`_Problem.ncc`)."""
        t = float(t)
        if t not in self.memo:
            S = self.many([t])[0]
            c = ndi.spline_filter1d(S, order=3, axis=-1, mode="mirror")
            self.memo[t] = ndi.spline_filter1d(c, order=3, axis=-2, mode="mirror")
            if len(self.memo) > self.size:
                self.memo.pop(next(iter(self.memo)))
        return self.memo[t]


class _ThicknessObjective:
    """Peak NCC on the shift grid as a function of thickness (memoised)."""

    def __init__(self, prob: _Problem, fields: _FieldCache):
        self.prob, self.fields = prob, fields
        self.memo: dict[float, _Peak] = {}

    def many(self, ts) -> list[_Peak]:
        ts = [float(t) for t in ts]
        todo = [t for t in dict.fromkeys(ts) if t not in self.memo]
        for a in range(0, len(todo), _BATCH):
            chunk = todo[a:a + _BATCH]
            for t, pk in zip(chunk, self.prob.peaks(self.fields.many(chunk))):
                self.memo[t] = pk
        return [self.memo[t] for t in ts]

    def __call__(self, t: float) -> float:
        return 1.0 - self.many([t])[0].value


def _auto_scan(fld: SimField, lo: float, hi: float) -> int:
    """Thicknesses for the scan: spacing 1/(4 max|s_g|) over the template tilts and the disks (a
    thickness error δt moves the fringes of a beam with excitation error s by s δt of a period);
    15-121."""
    geo = fld.model.geometry
    h = fld.disks[np.any(fld.disks != 0, axis=1)]
    if len(h) == 0:
        return 25
    s = geo.excitation_errors(geo.incident(fld.template_tilts()), geo.crystal.recip_to_cart(h))
    smax = float(np.max(np.abs(s)))
    if not np.isfinite(smax) or smax <= 0:
        return 25
    return int(np.clip(int(np.ceil((hi - lo) * 4.0 * smax)) + 1, _SCAN_MIN, _SCAN_MAX))


def _scan_brent(f_peak, lo: float, hi: float, n_scan: int, xatol: float):
    """Scan ``n_scan`` points of [lo, hi] (f_peak: list of x -> list of _Peak), then bounded Brent between the
    neighbours of the best.  Returns (x, peak, scan dict, at_bound, spacing)."""
    xs = np.linspace(lo, hi, max(int(n_scan), 3))
    vals = np.array([p.value for p in f_peak(xs)])
    k = int(np.argmax(vals))
    a, b = xs[max(k - 1, 0)], xs[min(k + 1, len(xs) - 1)]
    res = minimize_scalar(lambda x: 1.0 - f_peak([x])[0].value, bounds=(a, b), method="bounded",
                          options={"xatol": xatol})
    x = float(res.x) if 1.0 - float(res.fun) >= vals[k] else float(xs[k])
    spacing = float(xs[1] - xs[0])
    at_bound = (k == 0 or k == len(xs) - 1) and min(x - lo, hi - x) < 0.5 * spacing
    return x, f_peak([x])[0], {"x": xs, "ncc": vals}, bool(at_bound), spacing


def _polish(ncc_at, n_search: int, t0: float, m0, *, t_scale=None, t_bounds=None, gl0=None, gl_scale=None,
            gl_bounds=None, maxiter: int = 400):
    """Continuous maximisation of the NCC over (thickness), (gl) and the shift m [steps] by Nelder-Mead.

    ``ncc_at(t, gl, m)`` -> (joint, per disk).  The FFT search places the shift on the field grid,
    and a correlation peak narrow across and long along a ridge (nearly parallel lines) is poorly
    placed from grid values; here the shift is continuous.  Nelder-Mead collapses in long flat
    valleys (thickness and shift trade off): it is restarted from its best point with a fresh
    simplex until a restart gains less than 1e-9 (at most 6 runs).

    Returns (t, gl, m, ncc, per-disk ncc)."""
    lim = float(n_search)  # the field covers shifts up to the search range
    names, x0, scale, bounds = [], [], [], []
    if t_scale is not None:
        names.append("t")
        x0.append(t0)
        scale.append(t_scale)
        bounds.append(t_bounds)
    if gl_scale is not None:
        names.append("gl")
        x0.append(gl0)
        scale.append(gl_scale)
        bounds.append(gl_bounds)
    if lim > 0:
        names += ["mx", "my"]
        x0 += [float(np.clip(m0[0], -lim, lim)), float(np.clip(m0[1], -lim, lim))]
        scale += [1.0, 1.0]
        bounds += [(-lim, lim), (-lim, lim)]
    x0, scale = np.array(x0, float), np.array(scale, float)
    nb = [((b[0] - c) / s, (b[1] - c) / s) for b, c, s in zip(bounds, x0, scale)]

    def unpack(u):
        v = dict(zip(names, x0 + scale * np.asarray(u)))
        return float(v.get("t", t0)), (None if v.get("gl", gl0) is None else float(v.get("gl", gl0))), \
            (float(v.get("mx", 0.0)), float(v.get("my", 0.0)))

    def f(u):
        return 1.0 - ncc_at(*unpack(u))[0]

    k = len(names)
    u, fu = np.zeros(k), f(np.zeros(k))
    size = 0.5
    for _ in range(6 if k else 0):
        res = minimize(f, u, method="Nelder-Mead", bounds=nb,
                       options={"initial_simplex": np.vstack([u, u + size * np.eye(k)]), "xatol": 1e-3,
                                "fatol": 1e-10, "maxiter": maxiter})
        gain = fu - float(res.fun)
        if gain > 0:
            u, fu = np.asarray(res.x, float), float(res.fun)
        if gain < 1e-9:
            break
        size = max(0.5 * size, 0.1)
    t, gl, m = unpack(u)
    joint, per = ncc_at(t, gl, m)
    return t, gl, m, joint, per


def _polish_multi(ncc_at, n_search: int, t0: float, peak: _Peak, **kw):
    """:func:`_polish` from each of the peak's starting shifts; the best result."""
    best = None
    for m0 in peak.starts or (peak.shift,):
        r = _polish(ncc_at, n_search, t0, m0, **kw)
        if best is None or r[3] > best[3]:
            best = r
    return best


def _check_bracket(bracket, name: str, positive: bool = True) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in bracket)
    except (TypeError, ValueError):
        raise QcbedInputError(f"coarse.{name}", f"must be two numbers (low, high), got {bracket!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or not lo < hi or (positive and lo <= 0):
        what = " of positive values" if positive else ""
        raise QcbedInputError(f"coarse.{name}", f"must be an interval low < high{what}, got {bracket!r}")
    return lo, hi


def _result(prob: _Problem, model, pg_trial, t, m, ncc, per, peak, counters, t_start, params, scan,
            at_bound) -> CoarseResult:
    geom, shift_px = prob.correction(pg_trial, m)
    ns = prob.fld.n_search
    at_edge = peak.at_edge or (ns > 0 and max(abs(m[0]), abs(m[1])) > ns - 1e-3)
    counters.wall_s = time.perf_counter() - t_start
    return CoarseResult(thickness_A=float(t), geometry=geom, model=model, shift_px=shift_px, ncc=float(ncc),
                        ncc_per_disk=np.asarray(per, float), disks=prob.fld.disks.copy(), params=params,
                        counters=counters.as_dict(), scan=scan, at_edge=bool(at_edge), at_bound=bool(at_bound),
                        field=prob.fld)


def _field_for(model, pg, disks, box_px, search_px, step_px, field, counters) -> SimField:
    if field is None:
        return simulate_field(model, pg, disks, box_px, search_px, step_px, counters)
    _check_field(field, model, disks, box_px, search_px, step_px)
    return field


# ------------------------------------------------------------------------------ 1. thickness + orientation
def coarse_orientation_thickness(model: ForwardModel, pg: PatternGeometry, pattern, disks, box_px: float,
                                 search_px: float, thickness_bracket_A, step_px: float = 1.0, *,
                                 n_scan: int | None = None, radius_px: float | None = None,
                                 background: str = "per_disk", psf_px=None, xatol_A: float = 0.05,
                                 polish: bool = True, field: SimField | None = None) -> CoarseResult:
    """Thickness and orientation (tilt0) by template matching over one simulated tilt field.

    ``disks`` (nd, 3) compared together; ``box_px``: half-size of the template (display px about
    the display origin: the centre of every CBED disk, the tilt0 pixel for LARBED);
    ``search_px``: largest orientation error searched; ``thickness_bracket_A`` (low, high);
    ``step_px``: grid step (display px).  ``n_scan``: thicknesses of the coarse scan (default:
    automatic, 15-121, from the excitation errors); ``radius_px``: also exclude template points
    farther than this from the origin (CBED: keep inside the disk); ``polish``: finish with a
    continuous maximisation over thickness and shift; ``field``: a cached field of this model,
    disks and grid (e.g. ``result.field``) to re-use instead of solving.

    One eigen-solution; each thickness only recomputes intensities.  For every thickness the
    shift is the peak of the FFT correlation map (parabolic sub-pixel); scan, then bounded Brent
    around the best scan point minimising 1 - max NCC; then the polish.
    """
    t_start = time.perf_counter()
    counters = Counters()
    lo, hi = _check_bracket(thickness_bracket_A, "thickness_bracket_A")
    disks = np.atleast_2d(np.asarray(disks, int))
    fld = _field_for(model, pg, disks, box_px, search_px, step_px, field, counters)
    prob = _Problem(fld, pg, _images(pattern, pg, disks), radius_px, background, counters)
    fields = _FieldCache(fld, counters, _psf_kernel(psf_px, fld.step_px))
    obj = _ThicknessObjective(prob, fields)
    n = _auto_scan(fld, lo, hi) if n_scan is None else int(n_scan)
    t, peak, scan, at_bound, spacing = _scan_brent(obj.many, lo, hi, n, xatol_A)
    scan = {"thickness_A": scan["x"], "ncc": scan["ncc"]}
    m = peak.shift
    if polish:
        t, _, m, ncc, per = _polish_multi(lambda t_, gl_, m_: prob.ncc(fields(t_), m_), fld.n_search, t, peak,
                                          t_scale=0.25 * spacing, t_bounds=(lo, hi))
    else:
        ncc, per = prob.ncc(fields(t), m)
    return _result(prob, model, pg, t, m, ncc, per, peak, counters, t_start, {"thickness_A": t}, scan, at_bound)


# ------------------------------------------------------------------------------ 2. gl
def coarse_gl(model: ForwardModel, pg: PatternGeometry, pattern, disks, box_px: float, search_px: float,
              thickness_A: float, gl_bracket_px=None, step_px: float = 1.0, *, n_scan: int = 21,
              radius_px: float | None = None, background: str = "per_disk", psf_px=None,
              xatol_px: float | None = None, polish: bool = True, field: SimField | None = None) -> CoarseResult:
    """gl (camera length / tilt steps per |g_x|) at fixed thickness, maximising the same NCC.

    One field (or none with ``field``), fixed in tilt; each gl trial resamples the experiment at
    the pixels the trial geometry assigns to the template tilts (the template follows the CBED
    disks, whose centres move with gl) and re-optimises the shift.  ``gl_bracket_px`` defaults to
    gl ± 5 %.  Scan (``n_scan``), bounded Brent (``xatol_px``, default 1e-5 gl), then (``polish``)
    a continuous maximisation over gl and shift.  The result's geometry has the fitted gl and the
    orientation correction at it.  With ``field`` (e.g. the ``field`` of an orientation result, and
    its geometry with another gl) nothing is solved.
    """
    t_start = time.perf_counter()
    counters = Counters()
    gl0 = pg.gl_px
    lo, hi = _check_bracket(gl_bracket_px if gl_bracket_px is not None else (0.95 * gl0, 1.05 * gl0), "gl_bracket_px")
    t = float(thickness_A)
    if not np.isfinite(t) or t < 0:
        raise QcbedInputError("coarse.thickness_A", f"must be a thickness >= 0 Å, got {thickness_A!r}")
    disks = np.atleast_2d(np.asarray(disks, int))
    fld = _field_for(model, pg, disks, box_px, search_px, step_px, field, counters)
    images = _images(pattern, pg, disks)
    fields = _FieldCache(fld, counters, _psf_kernel(psf_px, fld.step_px))
    S = fields.many([t])
    probs: dict[float, _Problem] = {}

    def prob_at(g: float) -> _Problem:
        g = float(g)
        if g not in probs:
            probs[g] = _Problem(fld, pg.with_(gl_px=g), images, radius_px, background, counters)
            if len(probs) > 256:
                probs.pop(next(iter(probs)))
        return probs[g]

    memo: dict[float, _Peak] = {}

    def peaks(gls):
        for g in gls:
            if float(g) not in memo:
                memo[float(g)] = prob_at(g).peaks(S)[0]
        return [memo[float(g)] for g in gls]

    xatol = 1e-5 * gl0 if xatol_px is None else float(xatol_px)
    gl, peak, scan, at_bound, spacing = _scan_brent(peaks, lo, hi, n_scan, xatol)
    scan = {"gl_px": scan["x"], "ncc": scan["ncc"]}
    m = peak.shift
    if polish:
        def ncc_at(t_, g_, m_):
            return prob_at(g_).ncc(fields(t), m_)

        _, gl, m, ncc, per = _polish_multi(ncc_at, fld.n_search, t, peak, gl0=gl, gl_scale=0.25 * spacing,
                                           gl_bounds=(lo, hi))
    else:
        ncc, per = prob_at(gl).ncc(fields(t), m)
    prob = prob_at(gl)
    return _result(prob, model, prob.pg, t, m, ncc, per, peak, counters, t_start,
                   {"gl_px": gl, "thickness_A": t}, scan, at_bound)


# ------------------------------------------------------------------------------ 3. physics that re-solves
def _rebuilt(model: ForwardModel, *, hv_kV: float | None = None, crystal=None) -> ForwardModel:
    """The model at another voltage and/or crystal, with its refined U / U' overrides carried over."""
    ov = model.potential.overrides
    hv = model.hv_kV if hv_kV is None else float(hv_kV)
    scale = float(K.gamma_factor(hv) / K.gamma_factor(model.hv_kV))
    return replace(model, hv_kV=hv, crystal=model.crystal if crystal is None else crystal,
                   u={h: v * scale for h, v in ov["U"].items()}, uprime={h: v * scale for h, v in ov["Uprime"].items()})


def with_refined_physics(model: ForwardModel, refined: dict) -> ForwardModel:
    """``model`` with what a coarse stage refined (its store's ``refined_model``): ``hv_kV``, ``cell`` (six
    numbers) and ``b_iso_A2`` ([{"site_index", "b_iso_A2"}]); refined U / U' overrides carried over as in
    :func:`_rebuilt`.  An empty ``refined`` returns ``model`` itself."""
    if not refined:
        return model
    cr = model.crystal
    if "cell" in refined:
        cr = replace(cr, cell=tuple(float(x) for x in refined["cell"]))
    if refined.get("b_iso_A2"):
        sites = list(cr.sites)
        for r in refined["b_iso_A2"]:
            i = int(r["site_index"])
            sites[i] = replace(sites[i], b_iso=float(r["b_iso_A2"]), beta=None)
        cr = replace(cr, sites=tuple(sites))
    return _rebuilt(model, hv_kV=refined.get("hv_kV"), crystal=cr)


class _PhysicsObjective:
    """1 - NCC maximised over shift and (in a narrow bracket) thickness, for a model built per trial.

    Per trial: one field solve; thickness scan + Brent on the shift grid; then the continuous
    polish over thickness and shift, whose NCC is the objective (smooth in the parameter)."""

    def __init__(self, build, pg, pattern, disks, box_px, search_px, step_px, thickness_A, thickness_rel,
                 n_thickness, radius_px, background, psf_px, counters):
        self.build, self.pg, self.psf = build, pg, psf_px
        _psf_kernel(psf_px, 1.0)
        self.disks = np.atleast_2d(np.asarray(disks, int))
        self.box, self.search, self.step = box_px, search_px, step_px
        _grid_counts(box_px, search_px, step_px)
        self.t0 = float(thickness_A)
        if not np.isfinite(self.t0) or self.t0 <= 0:
            raise QcbedInputError("coarse.thickness_A", f"must be a positive thickness in Å, got {thickness_A!r}")
        self.rel = float(thickness_rel)
        if not np.isfinite(self.rel) or not 0 <= self.rel < 1:
            raise QcbedInputError("coarse.thickness_rel", f"must lie in [0, 1), got {thickness_rel!r}")
        self.n_t = int(n_thickness)
        self.radius, self.background, self.counters = radius_px, background, counters
        self.images = _images(pattern, pg, self.disks)
        self.memo: dict[tuple, tuple] = {}
        self.trace: list[tuple] = []

    def evaluate(self, x):
        key = tuple(float(v) for v in np.atleast_1d(x))
        if key in self.memo:
            return self.memo[key]
        model, pg = self.build(*key)
        fld = simulate_field(model, pg, self.disks, self.box, self.search, self.step, self.counters)
        prob = _Problem(fld, pg, self.images, self.radius, self.background, self.counters)
        fields = _FieldCache(fld, self.counters, _psf_kernel(self.psf, fld.step_px))
        if self.rel > 0:
            lo, hi = self.t0 * (1 - self.rel), self.t0 * (1 + self.rel)
            t, peak, _, _, spacing = _scan_brent(_ThicknessObjective(prob, fields).many, lo, hi, self.n_t,
                                                 1e-4 * self.t0)
            t, _, m, ncc, per = _polish_multi(lambda t_, gl_, m_: prob.ncc(fields(t_), m_), fld.n_search, t,
                                              peak, t_scale=0.25 * spacing, t_bounds=(lo, hi))
        else:
            t = self.t0
            peak = prob.peaks(fields.many([t]))[0]
            t, _, m, ncc, per = _polish_multi(lambda t_, gl_, m_: prob.ncc(fields(t_), m_), fld.n_search, t, peak)
        out = (model, pg, prob, t, m, ncc, per, peak)
        self.memo[key] = out
        self.trace.append((*key, t, ncc))
        return out

    def __call__(self, x) -> float:
        return 1.0 - self.evaluate(x)[5]


#: what the ``sigma`` of a physics fit means (stores and reports quote it)
SIGMA_DEFINITION = (
    "approximate standard error from the curvature of the profile chi^2 = (N - k) (1 - NCC^2) / (1 - NCC*^2) "
    "(N template samples, k fitted numbers: one scale, a background per disk, thickness, shift and the "
    "parameters; NCC* the optimum; thickness and orientation re-fitted at every point), sigma^2 = diagonal of "
    "2 H^-1 with H its Hessian by finite differences; assumes independent samples of equal variance and a "
    "correct model (statistical only: the parameters held fixed, e.g. the cell for a voltage fit, are not in it)")


def _profile_sigma(obj: _PhysicsObjective, x_best, steps, lower=None) -> dict:
    """Standard errors of the parameters of a physics fit at its optimum ``x_best`` (see :data:`SIGMA_DEFINITION`).

    The profile objective D(x) = (N - k) (1 - r(x)^2) / (1 - r*^2) is chi^2-like: for a model c S + b_d
    fitted by least squares the residual sum is (1 - r^2) times the centred sum of squares, and the
    noise variance is estimated from the optimum (reduced chi^2 = 1).  Its Hessian H from central
    differences on the diagonal (step ``steps[i]``, adapted once so that D rises by about 6 there: well
    above the numerical noise of the polish, still near the quadratic region) and one extra point per
    pair; covariance 2 H^-1.  ``lower``: the smallest physical value per parameter (B >= 0).  Costs
    2-4 field solves per parameter plus one per pair.  Checked on 5 Poisson realisations of the HOLZ case of
    tests/test_coarse.py (voltage from 201 kV, truth 200): errors 1.0-1.7 sigma, rms 1.4 sigma (sigma 0.031-0.034
    kV); B (from +20 %, geometry on the pixel grid): rms 1.5 sigma (sigma 0.006 Å^2).  A lower bound, then."""
    x = np.atleast_1d(np.asarray(x_best, float))
    n = len(x)
    model, pg, prob, t, m, r0, per, peak = obj.evaluate(x)
    n_samples = int(prob.mask.sum())
    k = (len(prob.mask) if prob.background == "per_disk" else 1) + 1 + 3 + n
    dof = n_samples - k
    denom = 1.0 - r0 * r0
    out = {"n_samples": n_samples, "dof": dof, "ncc": float(r0), "steps": [], "rise": []}
    if dof < 1 or not denom > 0:
        return {**out, "sigma": [float("nan")] * n, "covariance": None, "note": "no residual degrees of freedom"}

    def rise(v) -> float:
        r = obj.evaluate(v)[5]
        return dof * (r0 * r0 - r * r) / denom

    lo = np.full(n, -np.inf) if lower is None else np.asarray(lower, float)
    h = np.asarray(steps, float).copy()
    H = np.zeros((n, n))
    plus = np.zeros(n)
    for i in range(n):
        for attempt in range(2):
            h[i] = min(h[i], 0.9 * (x[i] - lo[i])) if np.isfinite(lo[i]) else h[i]
            if not h[i] > 0:
                return {**out, "sigma": [float("nan")] * n, "covariance": None,
                        "note": "at the physical limit of a parameter: no two-sided difference"}
            e = np.zeros(n)
            e[i] = h[i]
            dp, dm = rise(x + e), rise(x - e)
            H[i, i] = (dp + dm) / h[i] ** 2
            plus[i] = dp
            mean = 0.5 * (dp + dm)
            if attempt == 0 and H[i, i] > 0 and not 1.0 <= mean <= 30.0:
                h[i] = 2.5 * np.sqrt(2.0 / H[i, i])  # D then rises by ~6
                continue
            break
    for i in range(n):
        for j in range(i + 1, n):
            e = np.zeros(n)
            e[i], e[j] = h[i], h[j]
            H[i, j] = H[j, i] = (rise(x + e) - plus[i] - plus[j]) / (h[i] * h[j])
    out["steps"], out["rise"] = h.tolist(), plus.tolist()
    try:
        ok = bool(np.all(np.linalg.eigvalsh(H) > 0))
    except np.linalg.LinAlgError:
        ok = False
    if not ok:
        return {**out, "sigma": [float("nan")] * n, "covariance": None,
                "note": "the correlation is not at a maximum in every direction (flat or noisy): no standard error"}
    cov = 2.0 * np.linalg.inv(H)
    return {**out, "sigma": np.sqrt(np.diag(cov)).tolist(), "covariance": cov.tolist(), "note": ""}


def _physics_result(obj: _PhysicsObjective, x_best, params, t_start, at_bound) -> CoarseResult:
    model, pg, prob, t, m, ncc, per, peak = obj.evaluate(x_best)
    tr = np.array(obj.trace, float)
    names = list(params)
    scan = {"trace_" + n: tr[:, i] for i, n in enumerate(names[: tr.shape[1] - 2])}
    scan.update({"trace_thickness_A": tr[:, -2], "ncc": tr[:, -1]})
    params = dict(params)
    params["thickness_A"] = t
    return _result(prob, model, pg, t, m, ncc, per, peak, obj.counters, t_start, params, scan, at_bound)


#: what a physics fit reports as its standard error: none (the curvature is not calibrated)
SIGMA_UNDEFINED = (
    "undefined: the curvature of the correlation profile (sigma_curvature in coarse.zarr's steps) assumes "
    "independent samples of equal variance, but the samples share pixels and the NCC is not a likelihood; on 5 "
    "noise draws the scatter of the voltage and of B was 1.4-1.5x that curvature estimate, so it is kept only as a "
    "lower bound")


def _with_sigma(result: CoarseResult, names, unc: dict | None) -> CoarseResult:
    """``result`` with ``params["sigma"]`` {name: NaN: undefined, :data:`SIGMA_UNDEFINED`},
    ``params["sigma_curvature"]`` {name: the curvature estimate, a lower bound} and ``params["uncertainty"]``
    (the details: covariance in the order of ``names``, samples, steps) when ``unc`` (:func:`_profile_sigma`)
    is given."""
    if unc is not None:
        result.params["sigma"] = {nm: float("nan") for nm in names}
        result.params["sigma_curvature"] = {nm: float(s) for nm, s in zip(names, unc["sigma"])}
        result.params["uncertainty"] = {**unc, "names": list(names), "definition": SIGMA_DEFINITION,
                                        "reported": SIGMA_UNDEFINED}
    return result


def coarse_voltage(model: ForwardModel, pg: PatternGeometry, pattern, disks, box_px: float, search_px: float,
                   thickness_A: float, hv_bracket_kV=None, step_px: float = 1.0, *, thickness_rel: float = 0.03,
                   n_thickness: int = 7, xatol_kV: float = 0.01, radius_px: float | None = None,
                   background: str = "per_disk", psf_px=None, uncertainty: bool = False) -> CoarseResult:
    """Accelerating voltage by bounded Brent over hv_kV (default bracket hv ± 2 kV).

    Each trial rebuilds the ForwardModel at that voltage (overrides scaled by γ'/γ) and solves one
    field; thickness is re-fitted from that solution within ± ``thickness_rel`` (voltage and
    thickness are nearly degenerate for zero-layer reflections: s_g and U_g/K both scale as 1/K,
    so HOLZ lines carry most of the information), the orientation at every trial.  The geometry
    (gl) is held: with LARBED tilt steps in angle, refit gl afterwards (:func:`coarse_gl`).
    ``uncertainty``: also the standard error (``params["sigma"]``, :data:`SIGMA_DEFINITION`; 2-4 more solves).
    """
    t_start = time.perf_counter()
    counters = Counters()
    hv0 = float(model.hv_kV)
    lo, hi = _check_bracket(hv_bracket_kV if hv_bracket_kV is not None else (hv0 - 2.0, hv0 + 2.0), "hv_bracket_kV")

    def build(hv):
        m = _rebuilt(model, hv_kV=hv)
        return m, pg.with_(geometry=m.geometry)

    obj = _PhysicsObjective(build, pg, pattern, disks, box_px, search_px, step_px, thickness_A, thickness_rel,
                            n_thickness, radius_px, background, psf_px, counters)
    res = minimize_scalar(lambda v: obj(v), bounds=(lo, hi), method="bounded", options={"xatol": xatol_kV})
    hv = float(res.x)
    at_bound = min(hv - lo, hi - hv) < 2 * xatol_kV
    unc = _profile_sigma(obj, [hv], [0.02 * (hi - lo)]) if uncertainty else None
    return _with_sigma(_physics_result(obj, hv, {"hv_kV": hv}, t_start, at_bound), ["hv_kV"], unc)


def _site_indices(crystal, sites) -> list[int]:
    labels = [s.label for s in crystal.sites]
    if sites is None:
        idx = list(range(len(labels)))
    else:
        idx = []
        for s in sites:
            if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                if not 0 <= int(s) < len(labels):
                    raise QcbedInputError("coarse.sites", f"site index {s} out of range (0-{len(labels) - 1})")
                idx.append(int(s))
            elif s in labels:
                idx.append(labels.index(s))
            else:
                raise QcbedInputError("coarse.sites", f"no atom site {s!r}", f"sites are {', '.join(labels)}")
    for i in idx:
        if crystal.sites[i].beta is not None:
            raise QcbedInputError("coarse.sites", f"site {labels[i]} has an anisotropic displacement tensor",
                                  "refine isotropic B only for sites given with B / U_iso")
    return list(dict.fromkeys(idx))


def coarse_debye_waller(model: ForwardModel, pg: PatternGeometry, pattern, disks, box_px: float, search_px: float,
                        thickness_A: float, sites=None, b_bounds_A2=None, step_px: float = 1.0, *,
                        thickness_rel: float = 0.03, n_thickness: int = 7, xatol_A2: float = 0.005,
                        radius_px: float | None = None, background: str = "per_disk",
                        psf_px=None, uncertainty: bool = False) -> CoarseResult:
    """Isotropic Debye-Waller B [Å^2] of each distinct atom site (asymmetric unit), bounded.

    ``sites``: labels or indices (default all; sites with anisotropic tensors are refused);
    ``b_bounds_A2``: (low, high) for every site, or one pair per site (default 0.5-1.5 x B, or 0-1
    for B = 0).  One site: bounded Brent; several: Powell with bounds.  Each trial rebuilds the
    crystal and the model (refined U_g overrides are kept, and the DW factor no longer acts on them)
    and solves one field; thickness and orientation re-fitted as in :func:`coarse_voltage`.
    ``uncertainty``: also standard errors and covariance (``params["sigma"]``, keyed "B_<label>").
    """
    t_start = time.perf_counter()
    counters = Counters()
    cr = model.crystal
    idx = _site_indices(cr, sites)
    b0 = [float(cr.sites[i].b_iso) for i in idx]
    if b_bounds_A2 is None:
        bounds = [(0.5 * b, 1.5 * b) if b > 0 else (0.0, 1.0) for b in b0]
    else:
        arr = np.asarray(b_bounds_A2, float)
        bounds = [tuple(arr)] * len(idx) if arr.shape == (2,) else [tuple(r) for r in arr]
        if len(bounds) != len(idx):
            raise QcbedInputError("coarse.b_bounds_A2", f"need one (low, high) or one per site ({len(idx)})")
        bounds = [_check_bracket(b, "b_bounds_A2", positive=False) for b in bounds]
        if any(b[0] < 0 for b in bounds):
            raise QcbedInputError("coarse.b_bounds_A2", "B is never negative", "use a lower bound >= 0")

    def build(*bs):
        new_sites = list(cr.sites)
        for i, b in zip(idx, bs):
            new_sites[i] = replace(new_sites[i], b_iso=float(b), beta=None)
        m = _rebuilt(model, crystal=replace(cr, sites=tuple(new_sites)))
        return m, pg.with_(geometry=m.geometry)

    obj = _PhysicsObjective(build, pg, pattern, disks, box_px, search_px, step_px, thickness_A, thickness_rel,
                            n_thickness, radius_px, background, psf_px, counters)
    if len(idx) == 1:
        res = minimize_scalar(lambda b: obj([b]), bounds=bounds[0], method="bounded", options={"xatol": xatol_A2})
        x = np.atleast_1d(res.x)
    else:
        x0 = np.clip(b0, [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(obj, x0, method="Powell", bounds=bounds, options={"xtol": xatol_A2, "ftol": 1e-6})
        x = np.atleast_1d(res.x)
    at_bound = any(min(v - b[0], b[1] - v) < 2 * xatol_A2 for v, b in zip(x, bounds))
    params = {"b_iso_A2": {cr.sites[i].label: float(v) for i, v in zip(idx, x)}, "site_index": list(idx)}
    names = [f"B_{cr.sites[i].label}" for i in idx]
    unc = _profile_sigma(obj, x, [0.05 * (b[1] - b[0]) for b in bounds], lower=[0.0] * len(idx)) if uncertainty else None
    # keep the trace names generic: one column per site
    result = _physics_result(obj, x, {nm: float(v) for nm, v in zip(names, x)}, t_start, at_bound)
    result.params.update(params)
    return _with_sigma(result, names, unc)


def crystal_system(crystal) -> str:
    """Crystal system from the space-group number (trigonal groups in rhombohedral axes: 'rhombohedral')."""
    n = crystal.sg.number
    if n <= 2:
        return "triclinic"
    if n <= 15:
        return "monoclinic"
    if n <= 74:
        return "orthorhombic"
    if n <= 142:
        return "tetragonal"
    if n <= 167:
        return "rhombohedral" if crystal.spacegroup.rstrip().endswith(":R") else "trigonal"
    if n <= 194:
        return "hexagonal"
    return "cubic"


#: Free cell lengths per crystal system and how the three lengths follow from them (angles fixed).
_CELL_FREE = {
    "cubic": (("a",), lambda p: (p[0], p[0], p[0])),
    "rhombohedral": (("a",), lambda p: (p[0], p[0], p[0])),
    "tetragonal": (("a", "c"), lambda p: (p[0], p[0], p[1])),
    "trigonal": (("a", "c"), lambda p: (p[0], p[0], p[1])),
    "hexagonal": (("a", "c"), lambda p: (p[0], p[0], p[1])),
    "orthorhombic": (("a", "b", "c"), lambda p: (p[0], p[1], p[2])),
    "monoclinic": (("a", "b", "c"), lambda p: (p[0], p[1], p[2])),
    "triclinic": (("a", "b", "c"), lambda p: (p[0], p[1], p[2])),
}


#: crystal systems whose cell angles symmetry fixes: the cell fit (lengths only, angles held) is complete for
#: these; monoclinic and triclinic cells (free angles) and rhombohedral axes (free alpha) are not
CELL_SYSTEMS = ("cubic", "tetragonal", "trigonal", "hexagonal", "orthorhombic")


def free_cell_lengths(system: str) -> tuple[str, ...]:
    """The lattice lengths the cell fit refines for a crystal system ("a"; "a", "c"; or "a", "b", "c")."""
    return _CELL_FREE[system][0]


def coarse_cell(model: ForwardModel, pg: PatternGeometry, pattern, disks, box_px: float, search_px: float,
                thickness_A: float, rel_bound: float = 0.01, step_px: float = 1.0, *, thickness_rel: float = 0.03,
                n_thickness: int = 7, xatol_rel: float = 1e-5, radius_px: float | None = None,
                background: str = "per_disk", psf_px=None, uncertainty: bool = False) -> CoarseResult:
    """Lattice parameters constrained by the crystal system, angles fixed, each within ± ``rel_bound``.

    Free lengths: cubic (and rhombohedral axes) a; tetragonal, trigonal, hexagonal a, c;
    orthorhombic, monoclinic, triclinic a, b, c.  One free length: bounded Brent; more: Powell with
    bounds.  tilt0 stays fixed in reciprocal-lattice units and gl in pixels, so the tilt per pixel
    |g_x|/gl follows the cell.  Each trial rebuilds crystal, model and geometry and solves one field;
    thickness and orientation re-fitted as in :func:`coarse_voltage`.  ``uncertainty``: also standard
    errors and covariance (``params["sigma"]``, keyed "a_A", "c_A", ...).
    """
    t_start = time.perf_counter()
    counters = Counters()
    cr = model.crystal
    if not np.isfinite(rel_bound) or not 0 < rel_bound < 0.5:
        raise QcbedInputError("coarse.rel_bound", f"must lie in (0, 0.5), got {rel_bound!r}")
    system = crystal_system(cr)
    names, lengths = _CELL_FREE[system]
    idx = {"a": 0, "b": 1, "c": 2}
    p0 = np.array([cr.cell[idx[n]] for n in names])
    bounds = [(v * (1 - rel_bound), v * (1 + rel_bound)) for v in p0]

    def build(*p):
        cell = tuple(float(v) for v in lengths(p)) + tuple(cr.cell[3:])
        m = _rebuilt(model, crystal=replace(cr, cell=cell))
        return m, pg.with_(geometry=m.geometry)

    obj = _PhysicsObjective(build, pg, pattern, disks, box_px, search_px, step_px, thickness_A, thickness_rel,
                            n_thickness, radius_px, background, psf_px, counters)
    if len(names) == 1:
        res = minimize_scalar(lambda v: obj([v]), bounds=bounds[0], method="bounded",
                              options={"xatol": xatol_rel * p0[0]})
        x = np.atleast_1d(res.x)
    else:
        res = minimize(obj, p0, method="Powell", bounds=bounds,
                       options={"xtol": xatol_rel * float(p0.min()), "ftol": 1e-7})
        x = np.atleast_1d(res.x)
    at_bound = any(min(v - b[0], b[1] - v) < 2 * xatol_rel * v for v, b in zip(x, bounds))
    unc = _profile_sigma(obj, x, [0.1 * rel_bound * v for v in x], lower=[0.0] * len(x)) if uncertainty else None
    keys = [f"{n}_A" for n in names]
    result = _physics_result(obj, x, {k: float(v) for k, v in zip(keys, x)}, t_start, at_bound)
    result.params["cell"] = list(result.model.crystal.cell)
    result.params["crystal_system"] = system
    return _with_sigma(result, keys, unc)


# ------------------------------------------------------------------------------ 4. per-disk alignment (LARBED)
def _display_jacobian(pg: PatternGeometry, h) -> np.ndarray:
    """d(pixel row, col) / d(display x, y) of disk h (2x2; the LARBED mapping is affine)."""
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rc = pg.display_to_pixel(xy, np.repeat(np.atleast_2d(np.asarray(h, int)), 3, axis=0))
    return np.stack([rc[1] - rc[0], rc[2] - rc[0]], 1)


def coarse_disk_shifts(result: CoarseResult, pattern, *, max_shift_px: float = 3.0, radius_px: float | None = None,
                       psf_px=None) -> CoarseResult:
    """Per-disk alignment of a LARBED pattern at a coarse result's thickness and geometry.

    Each disk of a digital LACBED data set is its own image, recorded and cut out separately, so
    each may sit a fraction of a pixel (or a few pixels) away from where the common geometry puts
    it.  For every disk the shift of the *simulation* (cubic splines of the noise-free field, as
    in :meth:`_Problem.ncc`; the experimental samples stay fixed) that maximises that disk's own
    zero-mean NCC is found: a grid search over ±``max_shift_px`` display px in field steps, then
    Nelder-Mead from the best grid point.  The first disk (the reference, normally 0 0 0) moves
    tilt0 (the orientation); every other disk's shift relative to it becomes a pixel offset in
    ``geometry.disk_shift_px`` (added to any offset it had).  Nothing is solved: the result's field
    is re-used; its ``ncc_per_disk`` are the disks' own NCCs after alignment and ``params`` holds
    the offsets.
    """
    t_start = time.perf_counter()
    fld = result.field
    if fld is None:
        raise QcbedInputError("coarse", "disk alignment needs the simulated field of a coarse result")
    pg = result.geometry
    if pg.kind != "larbed":
        raise QcbedInputError("coarse.align_disks", "per-disk alignment applies to LARBED patterns (one image per disk)",
                              "remove align_disks for CBED (its disks share one image: use the global shift)")
    if not np.isfinite(max_shift_px) or max_shift_px <= 0:
        raise QcbedInputError("coarse.max_disk_shift_px", f"must be a positive number of display px, got {max_shift_px!r}")
    counters = Counters()
    disks = fld.disks
    prob = _Problem(fld, pg, _images(pattern, pg, disks), radius_px, "per_disk", counters)
    coeffs = _FieldCache(fld, counters, _psf_kernel(psf_px, fld.step_px))(result.thickness_A)
    lim = min(float(max_shift_px) / fld.step_px, float(fld.n_search))

    def ncc_d(d, m):
        sim = ndi.map_coordinates(coeffs[d], [prob._rows + m[1], prob._cols + m[0]], order=3, prefilter=False,
                                  mode="mirror")
        return float(_ncc_direct(prob.values[d:d + 1], prob.mask[d:d + 1], sim[None], "per_disk")[1][0])

    grid = np.arange(-np.floor(lim), np.floor(lim) + 1)
    shifts, per = np.zeros((len(disks), 2)), np.zeros(len(disks))
    for d in range(len(disks)):
        cands = [(ncc_d(d, (gx, gy)), gx, gy) for gy in grid for gx in grid]
        _, gx, gy = max(cands)
        bnds = [(-lim, lim), (-lim, lim)]
        res = minimize(lambda u: 1.0 - ncc_d(d, u), np.array([gx, gy]), method="Nelder-Mead", bounds=bnds,
                       options={"initial_simplex": np.array([[gx, gy], [gx + 0.5, gy], [gx, gy + 0.5]]),
                                "xatol": 1e-3, "fatol": 1e-10, "maxiter": 400})
        shifts[d], per[d] = res.x, 1.0 - float(res.fun)
    # reference disk -> orientation (tilt0); the others -> pixel offsets relative to it
    geom, move = prob.correction(pg, tuple(shifts[0]))
    offsets = dict(pg.disk_shift_px)
    added = {}
    for d, h in enumerate(disks[1:], start=1):
        J = _display_jacobian(pg, h)
        delta = -J @ ((shifts[d] - shifts[0]) * fld.step_px)  # pixel (row, col) of the disk's samples
        key = tuple(int(v) for v in h)
        old = offsets.get(key, (0.0, 0.0))
        offsets[key] = (float(old[0] + delta[0]), float(old[1] + delta[1]))
        added[" ".join(map(str, key))] = [float(delta[0]), float(delta[1])]
    geom = geom.with_(disk_shift_px=offsets)
    # check: the aligned geometry, sampled afresh, at zero shift
    check = _Problem(fld, geom, _images(pattern, geom, disks), radius_px, "per_disk", counters)
    joint, per_after = check.ncc(coeffs, (0.0, 0.0))
    counters.wall_s = time.perf_counter() - t_start
    params = {"disk_shift_px": {" ".join(map(str, map(int, h))): list(offsets.get(tuple(int(v) for v in h), (0.0, 0.0)))
                                for h in disks[1:]},
              "added_px": added, "reference_move_px": list(move), "ncc_per_disk_at_optimum": per.tolist()}
    return CoarseResult(thickness_A=result.thickness_A, geometry=geom, model=result.model, shift_px=move,
                        ncc=float(joint), ncc_per_disk=np.asarray(per_after, float), disks=disks.copy(), params=params,
                        counters=counters.as_dict(), scan={}, at_edge=bool(np.any(np.abs(shifts) > lim - 1e-3)),
                        at_bound=False, field=fld)
