"""Run configuration: one TOML file per pattern, validated before anything runs.

Sections (relative paths resolve against the config file's folder)::

    [crystal]      file = "si.cif"  (or inline: name, cell, spacegroup, [[crystal.atoms]])
    [microscope]   hv_kV, zone = [u, v, w], x_axis = [h, k, l], normal = [u, v, w] (optional)
    [simulation]   thickness_A, scattering_table, absorption, absorption_fraction, solver,
                   g_max, sg_max, sg_strong, bethe, tile_invA (all optional but thickness_A)
    [pattern]      see stages/load.py
    [geometry]     gl_px, rotation_deg, centre_px = [row, col], tilt0 = [h, k, l] or
                   tilt0_xy_invA = [x, y] (tilt of the display origin along e_x, e_y),
                   shift_px, disk_shift_px = {"2 -2 -2" = [drow, dcol]}, scale_y, flip
    [roi]          disks = [[h, k, l], ...] (LARBED default: every image), regions, padding, disk_mask

Every problem is reported as a QcbedInputError naming the field path (e.g. ``geometry.gl_px``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QcbedInputError
from .physics.beams import DEFAULT_SELECTION, Selection
from .physics.crystal_io import crystal_from_mapping, load_crystal
from .physics.pattern_geometry import PatternGeometry
from .simulate import ForwardModel

SECTIONS = {"crystal", "microscope", "simulation", "pattern", "geometry", "roi", "refine"}
MICROSCOPE_KEYS = {"hv_kV", "zone", "x_axis", "normal"}
SIMULATION_KEYS = {"thickness_A", "scattering_table", "absorption", "absorption_fraction", "solver",
                   "g_max", "sg_max", "sg_strong", "bethe", "tile_invA"}
GEOMETRY_KEYS = {"gl_px", "rotation_deg", "centre_px", "tilt0", "tilt0_xy_invA", "shift_px", "disk_shift_px",
                 "scale_y", "flip"}
ROI_KEYS = {"disks", "regions", "padding", "disk_mask"}
REFINE_KEYS = {"gof", "reflections", "geometry", "psf_sigma", "psf_gamma", "max_iterations", "thickness_scan",
               "initial_step", "xatol"}


@dataclass
class RunConfig:
    path: Path
    data: dict

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def section(self, name: str) -> dict:
        return self.data.get(name, {})


def _unknown(table: dict, allowed: set, prefix: str) -> None:
    bad = sorted(set(table) - allowed)
    if bad:
        raise QcbedInputError(f"{prefix}.{bad[0]}", "unknown key", f"allowed: {', '.join(sorted(allowed))}")


def _number(v, field: str, positive: bool = False, minimum: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise QcbedInputError(field, f"must be a number, got {v!r}")
    if positive and v <= 0:
        raise QcbedInputError(field, f"must be positive, got {v}")
    if minimum is not None and v < minimum:
        raise QcbedInputError(field, f"must be >= {minimum}, got {v}")
    return float(v)


def _vector(v, n: int, field: str, integer: bool = False) -> tuple:
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise QcbedInputError(field, f"must be a list of {n} {'integers' if integer else 'numbers'}, got {v!r}")
    if integer and any(float(x) != int(x) for x in v):
        raise QcbedInputError(field, f"must be integers, got {v!r}")
    return tuple(int(x) for x in v) if integer else tuple(float(x) for x in v)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise QcbedInputError(str(path), "config file not found", "give the path of a run .toml file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise QcbedInputError(str(path), f"malformed TOML: {exc}") from None
    _unknown(data, SECTIONS, path.name)
    for name in ("crystal", "microscope", "simulation"):
        if name not in data:
            raise QcbedInputError(f"{path.name}: [{name}]", "missing section", "see data/si_cbed/config.toml")
    cfg = RunConfig(path.resolve(), data)
    _unknown(cfg.section("microscope"), MICROSCOPE_KEYS, "microscope")
    _unknown(cfg.section("simulation"), SIMULATION_KEYS, "simulation")
    _unknown(cfg.section("geometry"), GEOMETRY_KEYS, "geometry")
    _unknown(cfg.section("roi"), ROI_KEYS, "roi")
    _unknown(cfg.section("refine"), REFINE_KEYS, "refine")
    return cfg


def crystal_of(cfg: RunConfig):
    c = cfg.section("crystal")
    if "file" in c:
        if set(c) - {"file"}:
            raise QcbedInputError("crystal", "give either file = ... or an inline crystal, not both")
        return load_crystal(cfg.base_dir / c["file"])
    return crystal_from_mapping(c, source=f"inline:{cfg.path.name}")


def forward_model(cfg: RunConfig, crystal=None) -> ForwardModel:
    m = cfg.section("microscope")
    s = cfg.section("simulation")
    for k in ("hv_kV", "zone"):
        if k not in m:
            raise QcbedInputError(f"microscope.{k}", "missing", "e.g. hv_kV = 200.0, zone = [1, 1, 0]")
    hv = _number(m["hv_kV"], "microscope.hv_kV", positive=True)
    zone = _vector(m["zone"], 3, "microscope.zone", integer=True)
    x_axis = _vector(m["x_axis"], 3, "microscope.x_axis", integer=True) if "x_axis" in m else None
    normal = _vector(m["normal"], 3, "microscope.normal") if "normal" in m else None
    sel = DEFAULT_SELECTION.as_dict()
    for k in ("g_max", "sg_max", "sg_strong"):
        if k in s:
            sel[k] = _number(s[k], f"simulation.{k}", positive=True)
    if "bethe" in s:
        if not isinstance(s["bethe"], bool):
            raise QcbedInputError("simulation.bethe", "must be true or false")
        sel["bethe"] = s["bethe"]
    kw = {}
    if "tile_invA" in s:
        kw["tile_invA"] = _number(s["tile_invA"], "simulation.tile_invA", positive=True)
    frac = _number(s.get("absorption_fraction", 0.0), "simulation.absorption_fraction", minimum=0.0)
    return ForwardModel(crystal if crystal is not None else crystal_of(cfg), hv, zone, x_axis=x_axis, normal=normal,
                        table=str(s.get("scattering_table", "peng")), absorption=str(s.get("absorption", "none")),
                        absorption_fraction=frac, selection=Selection(**sel), method=str(s.get("solver", "general")), **kw)


def thickness_of(cfg: RunConfig) -> float:
    s = cfg.section("simulation")
    if "thickness_A" not in s:
        raise QcbedInputError("simulation.thickness_A", "missing", "give the (starting) thickness in Å")
    return _number(s["thickness_A"], "simulation.thickness_A", positive=True)


def pattern_geometry(cfg: RunConfig, model: ForwardModel) -> PatternGeometry:
    g = cfg.section("geometry")
    kind = cfg.section("pattern").get("kind")
    if "gl_px" not in g:
        raise QcbedInputError("geometry.gl_px", "missing", "length of the x-axis reflection in pixels (CBED) or tilt steps (LARBED)")
    if "tilt0" in g and "tilt0_xy_invA" in g:
        raise QcbedInputError("geometry", "give tilt0 or tilt0_xy_invA, not both")
    if "tilt0_xy_invA" in g:
        x, y = _vector(g["tilt0_xy_invA"], 2, "geometry.tilt0_xy_invA")
        tilt0 = tuple(model.geometry.kt_from_xy(x, y).tolist())
    else:
        tilt0 = _vector(g.get("tilt0", [0, 0, 0]), 3, "geometry.tilt0")
    ds = {}
    for key, v in dict(g.get("disk_shift_px", {})).items():
        try:
            h = tuple(int(x) for x in str(key).replace(",", " ").split())
            assert len(h) == 3
        except (ValueError, AssertionError):
            raise QcbedInputError(f"geometry.disk_shift_px.{key}", "keys must be reflections written \"h k l\"") from None
        ds[h] = _vector(v, 2, f"geometry.disk_shift_px.{key}")
    flip = g.get("flip", False)
    if not isinstance(flip, bool):
        raise QcbedInputError("geometry.flip", "must be true or false")
    return PatternGeometry(
        model.geometry, str(kind), _number(g["gl_px"], "geometry.gl_px", positive=True),
        rotation_deg=_number(g.get("rotation_deg", 0.0), "geometry.rotation_deg"),
        centre_px=_vector(g.get("centre_px", [0.0, 0.0]), 2, "geometry.centre_px"), tilt0=tilt0,
        shift_px=_vector(g.get("shift_px", [0.0, 0.0]), 2, "geometry.shift_px"), disk_shift_px=ds,
        scale_y=_number(g.get("scale_y", 1.0), "geometry.scale_y", positive=True), flip=flip)


def roi_disks(cfg: RunConfig, pattern) -> np.ndarray:
    r = cfg.section("roi")
    if "disks" in r:
        d = r["disks"]
        if not isinstance(d, list) or not d:
            raise QcbedInputError("roi.disks", "must be a non-empty list of reflections [h, k, l]")
        return np.array([_vector(x, 3, f"roi.disks[{i}]", integer=True) for i, x in enumerate(d)], int)
    if pattern.attrs.get("kind") == "larbed":
        return np.stack([pattern.h.values, pattern.k.values, pattern.l.values], 1).astype(int)
    raise QcbedInputError("roi.disks", "missing", "list the CBED disks to compare, e.g. [[0, 0, 0], [1, -1, -1]]")


def fine_problem(cfg: RunConfig, model, pg, pattern, roi):
    """FineProblem from the [refine] section (stages.fine)."""
    from .fine import FineProblem, sf_params_from_config
    from .physics.gof import make_gof
    from .physics.noise import DetectorModel

    r = cfg.section("refine")
    det = None
    pat = cfg.section("pattern")
    if "detector" in pat:
        det = DetectorModel.from_mapping(pat["detector"], "pattern.detector")
    default = "Chi2_LARBED" if pattern.attrs.get("kind") == "larbed" and "variance" in pattern else "Chi2"
    gof = make_gof(str(r.get("gof", default)), detector=det, base_dir=cfg.base_dir)
    sf = sf_params_from_config(model, r.get("reflections"))
    geo = r.get("geometry", ["thickness", "gl", "rotation", "shift"])
    if not isinstance(geo, list):
        raise QcbedInputError("refine.geometry", "must be a list such as [\"thickness\", \"gl\", \"rotation\", \"shift\"]")
    psf = (_number(r.get("psf_sigma", 0.0), "refine.psf_sigma", minimum=0.0), _number(r.get("psf_gamma", 0.0), "refine.psf_gamma", minimum=0.0))
    return FineProblem(model=model, pg0=pg, pattern=pattern, roi=roi, gof=gof, sf=sf, thickness0=thickness_of(cfg),
                       refine_geometry=tuple(geo), psf0=psf,
                       thickness_scan=_number(r.get("thickness_scan", 0.05), "refine.thickness_scan", minimum=0.0))
