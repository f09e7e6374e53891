"""Synthetic CBED and LARBED patterns with a known truth, from the forward model.

Every refinement acceptance test needs data whose answer is known.  :func:`make_cbed` and
:func:`make_larbed` compute, for every pixel, its incident tilt through the detector geometry
(pattern_geometry.py) and the Bloch-wave intensity of its reflection at the true thickness
(tiles of tilts with their own beam sets), then apply, in this order:

1. the point spread: LARBED, the fit's 2-D Voigt kernel (:func:`~stages.physics.sampling.voigt_kernel`:
   sigma, gamma in display px = tilt steps, cut at 4 sigma + 8 gamma, on the pixel grid's steps in
   display space), convolved over a grid padded by the kernel's reach (exact at the edges, never
   wrapped); CBED, a Gaussian detector PSF (whose Fourier transform is the MTF) applied to the
   whole image with zero padding;
2. scale (counts per unit intensity) and background (one value, or one per disk);
3. noise: none, Poisson, or the detector model (Gaussian with σ² = m g (A I + δ I² + σ_B²));
4. saturation (clipping).

The truth (structure factors, thickness, geometry, PSF, background, noise, seed) is returned as a
JSON-serialisable dict and written beside the pattern by :func:`write_example`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QcbedInputError
from .physics.pattern_geometry import PatternGeometry
from .physics.sampling import convolve_valid, voigt_kernel
from .simulate import ForwardModel


@dataclass
class Effects:
    """What happens between the ideal intensities and the recorded counts."""

    scale: float = 1.0e4  # counts per unit of intensity (fraction of the incident current)
    background: float | list[float] = 0.0  # counts; one value or one per disk
    psf_sigma_px: float = 0.0  # Gaussian (CBED detector PSF, px) or Voigt sigma (LARBED, display px = tilt steps)
    psf_gamma_px: float = 0.0  # Voigt gamma (LARBED, display px = tilt steps)
    noise: str = "none"  # none | poisson | detector
    detector: dict | None = None  # gain, mixing, A, delta, background_variance (noise = detector)
    saturation: float | None = None
    seed: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "background", "psf_sigma_px", "psf_gamma_px", "noise",
                                              "detector", "saturation", "seed")}


def _background_per_disk(bg, nd):
    b = np.atleast_1d(np.asarray(bg, float))
    if b.size == 1:
        return np.full(nd, float(b[0]))
    if b.size != nd:
        raise QcbedInputError("effects.background", f"needs one value or one per disk ({nd}), got {b.size}")
    return b


def _apply_noise(counts: np.ndarray, eff: Effects, rng) -> tuple[np.ndarray, np.ndarray]:
    """Noisy counts and their true variance."""
    if eff.noise == "none":
        return counts, np.zeros_like(counts)
    if eff.noise == "poisson":
        lam = np.clip(counts, 0, None)
        return rng.poisson(lam).astype(float), lam
    if eff.noise == "detector":
        from .physics.noise import DetectorModel

        det = DetectorModel(**(eff.detector or {}))
        var = det.variance(counts)
        return counts + rng.normal(size=counts.shape) * np.sqrt(var), var
    raise QcbedInputError("effects.noise", f"unknown noise model {eff.noise!r}", "use none, poisson or detector")


def _truth(model: ForwardModel, pg: PatternGeometry, thickness_A, disks, eff: Effects) -> dict:
    u = {" ".join(map(str, h)): [complex(v).real, complex(v).imag] for h, v in model.u.items()}
    up = {" ".join(map(str, h)): [complex(v).real, complex(v).imag] for h, v in model.uprime.items()}
    return {
        "thickness_A": float(thickness_A), "disks": np.asarray(disks, int).tolist(),
        "U": u, "Uprime": up, "absorption": model.absorption, "absorption_fraction": model.absorption_fraction,
        "scattering_table": model.table, "hv_kV": model.hv_kV, "zone": list(model.geometry.zone),
        "x_axis": list(model.geometry.x_axis), "normal": list(model.geometry.normal),
        "geometry": pg.as_dict(), "effects": eff.as_dict(),
    }


def make_larbed(model: ForwardModel, pg: PatternGeometry, shape, disks, thickness_A: float, eff: Effects = Effects(),
                tile_invA: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """LARBED stack (nd, H, W): returns (counts, ideal intensity, true variance, truth)."""
    disks = np.atleast_2d(np.asarray(disks, int))
    H, W = (int(x) for x in shape)
    R = Q = 0
    kernel = None
    if eff.psf_sigma_px > 0 or eff.psf_gamma_px > 0:
        # the fit's PSF (stages.fine.FineProblem._psf): the kernel in display px (= tilt steps), on the
        # pixel grid's own steps in display space (a row step and a column step; orthonormal unless the
        # detector's pixels are not square, scale_y != 1)
        o = pg.pixel_to_display([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        kernel = voigt_kernel(eff.psf_sigma_px, eff.psf_gamma_px, steps=o[1:] - o[0])
        R, Q = kernel.shape[0] // 2, kernel.shape[1] // 2
    r, c = np.meshgrid(np.arange(-R, H + R), np.arange(-Q, W + Q), indexing="ij")
    rc = np.stack([r.ravel(), c.ravel()], 1).astype(float)
    same_tilts = not pg.disk_shift_px
    if same_tilts:
        kt = pg.pixel_to_tilt(rc)
        sol = model.solve_tiled(kt, disks, tile_invA)
        full = sol.intensities([thickness_A])[:, 0, :].T  # (nd, npix)
    else:
        full = np.empty((len(disks), len(rc)))
        for d, h in enumerate(disks):
            kt = pg.pixel_to_tilt(rc, h)
            full[d] = model.solve_tiled(kt, [h], tile_invA).intensities([thickness_A])[:, 0, 0]
    full = full.reshape(len(disks), H + 2 * R, W + 2 * Q)
    ideal = full[:, R:R + H, Q:Q + W].copy()
    blurred = convolve_valid(full, kernel) if kernel is not None else ideal
    bg = _background_per_disk(eff.background, len(disks))
    counts = eff.scale * blurred + bg[:, None, None]
    rng = np.random.default_rng(eff.seed)
    noisy, var = _apply_noise(counts, eff, rng)
    if eff.saturation is not None:
        noisy = np.minimum(noisy, eff.saturation)
    return noisy, ideal, var, _truth(model, pg, thickness_A, disks, eff)


def make_cbed(model: ForwardModel, pg: PatternGeometry, shape, disks, thickness_A: float, disk_radius_px: float,
              eff: Effects = Effects(), tile_invA: float | None = None,
              pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """CBED image (H, W) with the given disks of radius ``disk_radius_px`` (display px): returns
    (counts, ideal intensity, true variance, truth).  Pixels outside every disk have zero intensity.
    ``pixels`` (H, W) bool: simulate only these pixels (the others get zero intensity, as outside the
    disks; e.g. the supports of a ROI, for repeated noise draws)."""
    disks = np.atleast_2d(np.asarray(disks, int))
    H, W = (int(x) for x in shape)
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    rc = np.stack([r.ravel(), c.ravel()], 1).astype(float)
    ideal = np.zeros(H * W)
    owner = np.full(H * W, -1)
    kts, pix, which = [], [], []
    for d, h in enumerate(disks):
        xy = pg.pixel_to_display(rc, h)
        inside = np.hypot(xy[:, 0], xy[:, 1]) <= disk_radius_px
        if np.any(owner[inside] >= 0):
            raise QcbedInputError("disk_radius_px", f"disks overlap (radius {disk_radius_px} px at gl {pg.gl_px} px)",
                                  "use a smaller disk radius")
        owner[inside] = d
        if pixels is not None:
            inside = inside & np.asarray(pixels, bool).ravel()
        kts.append(pg.display_to_tilt(xy[inside]))
        pix.append(np.nonzero(inside)[0])
        which.append(np.full(inside.sum(), d))
    kt = np.concatenate(kts)
    pix = np.concatenate(pix)
    which = np.concatenate(which)
    if len(kt):
        inten = model.solve_tiled(kt, disks, tile_invA).intensities([thickness_A])[:, 0, :]
        ideal[pix] = inten[np.arange(len(kt)), which]
    ideal = ideal.reshape(H, W)
    blurred = ideal
    if eff.psf_sigma_px > 0:
        from scipy.signal import fftconvolve

        R = int(np.ceil(5 * eff.psf_sigma_px))
        ax = np.arange(-R, R + 1)
        g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * eff.psf_sigma_px**2))
        blurred = fftconvolve(ideal, g / g.sum(), mode="same")
    bg = _background_per_disk(eff.background, len(disks))
    owner = owner.reshape(H, W)
    bgmap = np.where(owner >= 0, bg[np.clip(owner, 0, None)], float(bg.mean()))
    counts = eff.scale * blurred + bgmap
    rng = np.random.default_rng(eff.seed)
    noisy, var = _apply_noise(counts, eff, rng)
    if eff.saturation is not None:
        noisy = np.minimum(noisy, eff.saturation)
    truth = _truth(model, pg, thickness_A, disks, eff)
    truth["disk_radius_px"] = float(disk_radius_px)
    return noisy, ideal, var, truth


def write_example(folder: str | Path, name: str, counts: np.ndarray, truth: dict, variance: np.ndarray | None = None,
                  dtype: str = "float32") -> dict:
    """Write ``<name>.npy`` (and ``<name>_variance.npy``) and ``<name>_truth.json`` into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"pattern": f"{name}.npy", "truth": f"{name}_truth.json"}
    np.save(folder / files["pattern"], counts.astype(dtype))
    if variance is not None:
        files["variance"] = f"{name}_variance.npy"
        np.save(folder / files["variance"], variance.astype(dtype))
    (folder / files["truth"]).write_text(json.dumps(truth, indent=1) + "\n")
    return files


def write_small_larbed_run(folder: str | Path, name: str = "small", *, seed: int = 0, thickness_A: float = 900.0,
                           u_factor: float = 0.97, size: int = 20, roi_half: int = 6, max_iterations: int = 60,
                           refine_u222: bool = False, optimizer: str = "nelder-mead") -> Path:
    """A small synthetic Si LARBED run (pattern, variance, truth and config.toml) for pipeline tests and
    benchmarks: 4 disks (000, ±1-1-1, 2-2-2) of size x size tilts, 200 kV, true U(1-1-1) = u_factor x IAM,
    Poisson noise at 1e4 counts; the config refines U(1-1-1) (and U(2-2-2)) with thickness and shift from
    the IAM and thickness + 2%.  A reduced beam selection keeps one outer evaluation well under a second.
    Returns the config path."""
    from .physics.beams import Selection
    from .physics.crystal_io import load_crystal

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cif = Path(__file__).resolve().parent.parent / "data" / "si.cif"
    si = load_crystal(cif)
    g1 = (1, -1, -1)
    disks = [(0, 0, 0), g1, (-1, 1, 1), (2, -2, -2)]
    sel = Selection(g_max=3.0, sg_max=0.5, sg_strong=0.02)
    truth = ForwardModel(si, 200.0, (1, 1, 0), x_axis=g1, absorption="proportional", absorption_fraction=0.02,
                         selection=sel, tile_invA=0.5)
    u_true = u_factor * truth.potential.iam([g1])[0].real
    truth.potential.set(g1, U=u_true)
    c = (size - 1) / 2
    pg = PatternGeometry(truth.geometry, "larbed", gl_px=40.0, rotation_deg=-10.0, centre_px=(c, c),
                         tilt0=tuple(truth.geometry.kt_from_xy(-0.16, 4.0)))
    counts, _, var, info = make_larbed(truth, pg, (size, size), disks, thickness_A,
                                       Effects(scale=1e4, background=30.0, noise="poisson", seed=seed))
    info = {**info, "U(1 -1 -1)": float(u_true)}
    write_example(folder, name, counts, info, variance=np.maximum(var, 1.0), dtype="float64")
    refl = f'  {{hkl = [1, -1, -1], refine = ["U"], range_percent = 5}},\n'
    if refine_u222:
        refl += '  {hkl = [2, -2, -2], refine = ["U"], U_range = [-2.0e-3, 0.0]},\n'
    text = f"""# Small synthetic Si LARBED run (stages.synthetic.write_small_larbed_run, seed {seed}).
[crystal]
file = "{cif}"

[microscope]
hv_kV = 200.0
zone = [1, 1, 0]
x_axis = [1, -1, -1]

[simulation]
thickness_A = {thickness_A * 1.02}
absorption = "proportional"
absorption_fraction = 0.02
g_max = 3.0
sg_max = 0.5
sg_strong = 0.02
tile_invA = 0.5
laue_zones = "zolz"  # the data were simulated without HOLZ

[pattern]
kind = "larbed"
file = "{name}.npy"
hkl = [[0, 0, 0], [1, -1, -1], [-1, 1, 1], [2, -2, -2]]
variance = "{name}_variance.npy"

[geometry]
gl_px = 40.0
rotation_deg = -10.0
centre_px = [{c}, {c}]
tilt0_xy_invA = [-0.16, 4.0]

[roi]
regions = [{{corners = [[-{roi_half}.0, -{roi_half}.0], [{roi_half}.0, -{roi_half}.0], [-{roi_half}.0, {roi_half}.0]], samples = [{2 * roi_half + 1}, {2 * roi_half + 1}]}}]

[refine]
gof = "Chi2_LARBED"
reflections = [
{refl}]
geometry = ["thickness", "shift"]
max_iterations = {max_iterations}
optimizer = "{optimizer}"
"""
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def write_small_holz_run(folder: str | Path, name: str = "holz", *, seed: int = 3, hv_kV: float = 200.0,
                         hv_kV_config: float = 201.0, cell_factor: float = 1.0, b_factor: float = 1.0,
                         coarse_refine=("voltage",), coarse_extra: str = "", max_iterations: int = 2) -> Path:
    """A small synthetic Si LARBED run whose HOLZ lines carry the voltage and the cell, for the coarse
    physics fits through the pipeline: 3 disks (000, ±1-1-1) of 32 x 32 tilts 5.7° off [110] on the 111 row,
    800 Å, true voltage ``hv_kV``, Poisson noise at 2e4 counts, simulated with HOLZ and every near-Bragg HOLZ
    beam exact (``simulation.holz_lines = true``).  The config (inline crystal) starts from
    ``hv_kV_config``, the cell x ``cell_factor`` and B x ``b_factor``, and refines ``coarse_refine`` in the
    coarse stage (``coarse_extra``: more [coarse] lines), then U(1-1-1) and the thickness (Levenberg-Marquardt,
    ``max_iterations`` steps) on a 7 x 7 ROI.  Returns the config path."""
    from dataclasses import replace

    from .physics.beams import Selection
    from .physics.crystal_io import load_crystal

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    si = load_crystal(Path(__file__).resolve().parent.parent / "data" / "si.toml")
    g1 = (1, -1, -1)
    disks = [(0, 0, 0), g1, (-1, 1, 1)]
    sel = Selection(g_max=3.0, sg_max=0.3, sg_strong=0.02, holz=True, holz_u_strong=0.0)
    truth = ForwardModel(si, hv_kV, (1, 1, 0), x_axis=g1, absorption="proportional", absorption_fraction=0.02,
                         selection=sel, tile_invA=0.2)
    pg = PatternGeometry(truth.geometry, "larbed", gl_px=40.0, rotation_deg=-35.0, centre_px=(15.6, 15.3),
                         tilt0=tuple(truth.geometry.kt_from_xy(-0.16, 4.0)))
    counts, _, var, info = make_larbed(truth, pg, (32, 32), disks, 800.0,
                                       Effects(scale=2e4, background=20.0, noise="poisson", seed=seed))
    info = {**info, "cell": list(si.cell), "b_iso_A2": {s.label: s.b_iso for s in si.sites}}
    write_example(folder, name, counts, info, variance=np.maximum(var, 1.0), dtype="float64")
    start = replace(si, cell=tuple(cell_factor * x for x in si.cell[:3]) + tuple(si.cell[3:]))
    atoms = ", ".join(f'{{label = "{s.label}", element = "{s.element}", xyz = {list(s.fract)}, B = {b_factor * s.b_iso!r}}}'
                      for s in start.sites)
    refine = ", ".join(f'"{q}"' for q in coarse_refine)
    text = f"""# Small synthetic Si LARBED run with HOLZ lines (stages.synthetic.write_small_holz_run, seed {seed};
# true voltage {hv_kV} kV, cell and B of data/si.toml).
[crystal]
name = "Si"
cell = {[float(x) for x in start.cell]}
spacegroup = "{start.spacegroup}"
atoms = [{atoms}]

[microscope]
hv_kV = {hv_kV_config!r}
zone = [1, 1, 0]
x_axis = [1, -1, -1]

[simulation]
thickness_A = 820.0
absorption = "proportional"
absorption_fraction = 0.02
g_max = 3.0
sg_max = 0.3
sg_strong = 0.02
tile_invA = 0.2
laue_zones = "holz"
holz_lines = true
beam_accuracy = 0.02  # the data were simulated with this beam set (1 % from the probe's reference)

[pattern]
kind = "larbed"
file = "{name}.npy"
hkl = [[0, 0, 0], [1, -1, -1], [-1, 1, 1]]
variance = "{name}_variance.npy"

[geometry]
gl_px = 40.0
rotation_deg = -35.0
centre_px = [15.6, 15.3]
tilt0_xy_invA = [-0.16, 4.0]

[roi]
regions = [{{corners = [[-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0]], samples = [7, 7]}}]

[coarse]
thickness_bracket_A = [700.0, 950.0]
box_px = 10.0
search_px = 3.0
refine = [{refine}]
{coarse_extra}

[refine]
gof = "Chi2_LARBED"
reflections = [{{hkl = [1, -1, -1], refine = ["U"], range_percent = 5}}]
geometry = ["thickness", "shift"]
max_iterations = {max_iterations}
"""
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path
