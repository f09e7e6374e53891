"""Run configuration: one TOML file per pattern, validated before anything runs.

Sections (relative paths resolve against the config file's folder)::

    [crystal]      file = "si.cif"  (or inline: name, cell, spacegroup, [[crystal.atoms]])
    [microscope]   hv_kV, zone = [u, v, w], x_axis = [h, k, l], normal = [u, v, w] (optional)
    [simulation]   thickness_A, scattering_table, absorption, absorption_fraction, solver,
                   g_max, sg_max, sg_strong, bethe, tile_invA, beam_accuracy, laue_zones =
                   "auto" | "zolz" | "holz", holz_lines (all optional but thickness_A; beam_accuracy
                   and laue_zones: stages/physics/beam_probe.py; holz_lines: stages/physics/beams.py)
    [pattern]      see stages/load.py
    [geometry]     gl_px, rotation_deg, centre_px = [row, col], tilt0 = [h, k, l] or
                   tilt0_xy_invA = [x, y] (tilt of the display origin along e_x, e_y),
                   shift_px, disk_shift_px = {"2 -2 -2" = [drow, dcol]}, scale_y, flip
    [roi]          disks = [[h, k, l], ...] (LARBED default: every image), regions, padding, disk_mask
    [refine]       gof, reflections, geometry, psf_sigma, psf_gamma, max_iterations, thickness_scan,
                   initial_step, xatol, gauss_newton_steps, optimizer (see stages/fine.py)
    [coarse]       enabled, thickness_bracket_A = [lo, hi], box_px, search_px, step_px, radius_px,
                   background = "per_disk" | "joint", disks = [[h, k, l], ...], fit_gl, gl_bracket_px,
                   align_disks (LARBED), max_disk_shift_px, refine = ["voltage" | "cell", "B"],
                   hv_range_kV, B_sites, B_range_A2, cell_range_percent (see stages/coarse.py and
                   :func:`coarse_physics`)
    [run]          name (letters, digits, - _ .: names the results folder)

Every problem is reported as a QcbedInputError naming the field path (e.g. ``geometry.gl_px``).
:func:`load_config` reads a file and checks its section and key names; :func:`validate_config`
checks everything that can be checked before any image is read (types, ranges, required keys,
files, and the builders below) and raises one :class:`~stages.errors.QcbedInputErrors` listing
every problem.
"""

from __future__ import annotations

import glob
import math
import os
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QcbedInputError, QcbedInputErrors
from .physics.beam_probe import LAUE_ZONES
from .physics.beams import DEFAULT_SELECTION, Selection
from .physics.crystal_io import crystal_from_mapping, load_crystal
from .physics.gof import make_gof
from .physics.pattern_geometry import PatternGeometry
from .roi import regions_from_config
from .simulate import ForwardModel

SECTIONS = {"crystal", "microscope", "simulation", "pattern", "geometry", "roi", "refine", "coarse", "run"}
MICROSCOPE_KEYS = {"hv_kV", "zone", "x_axis", "normal"}
SIMULATION_KEYS = {"thickness_A", "scattering_table", "absorption", "absorption_fraction", "solver",
                   "g_max", "sg_max", "sg_strong", "bethe", "tile_invA", "beam_accuracy", "laue_zones",
                   "holz_lines"}
GEOMETRY_KEYS = {"gl_px", "rotation_deg", "centre_px", "tilt0", "tilt0_xy_invA", "shift_px", "disk_shift_px",
                 "scale_y", "flip"}
ROI_KEYS = {"disks", "regions", "padding", "disk_mask"}
REFINE_KEYS = {"gof", "reflections", "geometry", "psf_sigma", "psf_gamma", "max_iterations", "gauss_newton_steps",
               "thickness_scan", "optimizer",
               "initial_step", "xatol"}
COARSE_KEYS = {"enabled", "thickness_bracket_A", "box_px", "search_px", "step_px", "radius_px", "background", "disks",
               "fit_gl", "gl_bracket_px", "align_disks", "max_disk_shift_px",
               "refine", "hv_range_kV", "B_sites", "B_range_A2", "cell_range_percent"}
RUN_KEYS = {"name"}


class QcbedInputWarning(UserWarning):
    """A config that runs but may not be what was meant (e.g. a disk at a glide/screw absence)."""


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


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise QcbedInputError(str(path), "config file not found", "give the path of a run .toml file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise QcbedInputError(str(path), f"malformed TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QcbedInputError(str(path), f"cannot read: {exc}", "give a UTF-8 text .toml file") from None


def load_config(path: str | Path) -> RunConfig:
    """Read a run config, checking its section and key names (the first problem raises).

    :func:`validate_config` checks much more and reports every problem together."""
    path = Path(path)
    data = _read_toml(path)
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
    _unknown(cfg.section("coarse"), COARSE_KEYS, "coarse")
    _unknown(cfg.section("run"), RUN_KEYS, "run")
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
    # "auto" starts from the zero-order Laue zone; the beam probe turns HOLZ on where it matters (pipeline.sized_model)
    sel["holz"] = laue_zones_of(cfg) == "holz"
    if "holz_lines" in s:
        if not isinstance(s["holz_lines"], bool):
            raise QcbedInputError("simulation.holz_lines", "must be true or false")
        if s["holz_lines"]:
            # every HOLZ beam near its Bragg condition exact: the HOLZ lines of weakly coupled beams too
            sel["holz_u_strong"] = 0.0
    kw = {}
    if "tile_invA" in s:
        kw["tile_invA"] = _number(s["tile_invA"], "simulation.tile_invA", positive=True)
    frac = _number(s.get("absorption_fraction", 0.0), "simulation.absorption_fraction", minimum=0.0)
    return ForwardModel(crystal if crystal is not None else crystal_of(cfg), hv, zone, x_axis=x_axis, normal=normal,
                        table=str(s.get("scattering_table", "peng")), absorption=str(s.get("absorption", "none")),
                        absorption_fraction=frac, selection=Selection(**sel), method=str(s.get("solver", "general")), **kw)


def laue_zones_of(cfg: RunConfig) -> str:
    """``simulation.laue_zones``: "zolz" (zero-order Laue zone only), "holz" (every layer, the affordable HOLZ
    beam set of stages/physics/beams.py) or "auto" (the default: the beam probe measures the ZOLZ model
    against the HOLZ model at the run's tilts and thicknesses and takes HOLZ where they differ by more than
    simulation.beam_accuracy)."""
    v = cfg.section("simulation").get("laue_zones", "auto")
    if v not in LAUE_ZONES:
        raise QcbedInputError("simulation.laue_zones", f"must be one of {', '.join(map(repr, LAUE_ZONES))}, got {v!r}",
                              'write laue_zones = "auto" (the probe decides), "zolz" or "holz"')
    return v


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


# ------------------------------------------------------------------------------- [coarse] physics fits
#: ``coarse.refine``: the coarse fits that re-solve the eigenproblem at every trial (stages/coarse.py), in the
#: order the coarse stage runs them (after thickness, orientation, gl and disk alignment)
COARSE_REFINE = ("voltage", "cell", "B")
#: ``coarse.hv_range_kV`` default: microscope.hv_kV ± this [kV]
HV_HALF_RANGE_KV = 2.0
#: ``coarse.cell_range_percent`` default: each free lattice length within ± this [%]
CELL_RANGE_PERCENT = 1.0
_HOLZ_FIX = 'set simulation.laue_zones = "holz" and holz_lines = true'


@dataclass(frozen=True)
class CoarsePhysics:
    """What ``[coarse] refine`` asks of the fits that re-solve, every default applied (:func:`coarse_physics`).

    ``refine``: the entries of :data:`COARSE_REFINE` asked for, in run order.  ``hv_range_kV``: the
    voltage search range.  ``sites`` / ``site_labels``: the asymmetric-unit sites (indices into the
    crystal's sites, 0-based in the order of the crystal file, and their labels) whose isotropic B is
    refined, ``b_ranges_A2`` one (low, high) per site.  ``crystal_system``, ``cell_free`` (the lengths
    refined: "a"; "a", "c"; "a", "b", "c"; the angles are fixed by symmetry), ``cell_rel`` (± fraction)."""

    refine: tuple = ()
    hv_range_kV: tuple | None = None
    sites: tuple = ()
    site_labels: tuple = ()
    b_ranges_A2: tuple = ()
    crystal_system: str | None = None
    cell_free: tuple = ()
    cell_rel: float = CELL_RANGE_PERCENT / 100.0

    @property
    def needs_holz(self) -> bool:
        """The voltage and the cell are measured by the positions of the HOLZ lines."""
        return "voltage" in self.refine or "cell" in self.refine


def _coarse_refine(cfg: RunConfig) -> tuple[str, ...]:
    """``coarse.refine`` checked against the rest of the config, in run order."""
    v = cfg.section("coarse").get("refine", [])
    _strings_from(COARSE_REFINE)(v, "coarse.refine", None)
    if len(set(v)) != len(v):
        raise QcbedInputError("coarse.refine", f"lists an entry twice: {v!r}", "give each of voltage, cell, B once")
    if "voltage" in v and "cell" in v:
        raise QcbedInputError("coarse.refine", "voltage and cell cannot be refined together: the HOLZ line positions "
                              "fix only the product of the electron wave number and the lattice parameter",
                              'keep "voltage" (the cell as given) or "cell" (a calibrated microscope.hv_kV)')
    refine = tuple(x for x in COARSE_REFINE if x in v)
    if ("voltage" in refine or "cell" in refine) and laue_zones_of(cfg) == "zolz":
        raise QcbedInputError("coarse.refine", f"{' and '.join(x for x in refine if x != 'B')} is measured by the "
                              'HOLZ lines, which simulation.laue_zones = "zolz" leaves out of the model', _HOLZ_FIX)
    return refine


def _coarse_hv_range(cfg: RunConfig) -> tuple[float, float]:
    hv = _number(cfg.section("microscope").get("hv_kV"), "microscope.hv_kV", positive=True)
    c = cfg.section("coarse")
    if "hv_range_kV" not in c:
        return hv - HV_HALF_RANGE_KV, hv + HV_HALF_RANGE_KV
    _chk_interval(positive=True, fix="give [low, high] in kV")(c["hv_range_kV"], "coarse.hv_range_kV", None)
    lo, hi = (float(x) for x in c["hv_range_kV"])
    if not lo <= hv <= hi:
        raise QcbedInputError("coarse.hv_range_kV", f"[{lo:g}, {hi:g}] kV does not contain the start, microscope.hv_kV "
                              f"= {hv:g}", f"give a range about it, e.g. [{hv - HV_HALF_RANGE_KV:g}, "
                              f"{hv + HV_HALF_RANGE_KV:g}], or correct microscope.hv_kV")
    return lo, hi


def _coarse_b_sites(cfg: RunConfig, crystal) -> tuple[tuple[int, ...], tuple[tuple[float, float], ...]]:
    """(site indices, one B range per site) of ``coarse.B_sites`` / ``coarse.B_range_A2``."""
    c = cfg.section("coarse")
    labels = [s.label for s in crystal.sites]
    listing = ", ".join(f"{lab} ({i})" for i, lab in enumerate(labels))
    iso = [i for i, s in enumerate(crystal.sites) if s.beta is None]
    if "B_sites" not in c:
        if not iso:
            raise QcbedInputError("coarse.refine", '"B": every site of the crystal has an anisotropic displacement '
                                  "tensor (the coarse fit refines isotropic B)", 'remove "B"')
        idx = iso
    else:
        _b_sites_list(c["B_sites"], "coarse.B_sites", None)
        idx = []
        for s in c["B_sites"]:
            if isinstance(s, str):
                hits = [i for i, lab in enumerate(labels) if lab == s]
                if not hits:
                    raise QcbedInputError("coarse.B_sites", f"no atom site {s!r} in the crystal",
                                          f"give labels or 0-based indices of its sites: {listing}")
                if len(hits) > 1:
                    raise QcbedInputError("coarse.B_sites", f"the label {s!r} names sites {hits}",
                                          "give the site by its 0-based index")
                i = hits[0]
            else:
                i = int(s)
                if i >= len(labels):
                    raise QcbedInputError("coarse.B_sites", f"site index {i} out of range: the crystal has "
                                          f"{len(labels)} site(s), 0-{len(labels) - 1}", f"sites: {listing}")
            if i not in iso:
                raise QcbedInputError("coarse.B_sites", f"site {labels[i]} ({i}) has an anisotropic displacement "
                                      "tensor (the coarse fit refines isotropic B)", "remove it from B_sites")
            if i in idx:
                raise QcbedInputError("coarse.B_sites", f"site {labels[i]} ({i}) is listed twice", "give each site once")
            idx.append(i)
    rng = c.get("B_range_A2")
    if rng is not None:
        _b_range(rng, "coarse.B_range_A2", None)
        if isinstance(rng, dict):
            chosen = {labels[i] for i in idx}
            for key in rng:
                if key not in chosen:
                    raise QcbedInputError(f"coarse.B_range_A2.{key}", f"{key!r} is not a refined site "
                                          f"(B_sites: {', '.join(labels[i] for i in idx)})",
                                          "key each range by the label of a refined site")
    ranges = []
    for i in idx:
        b = float(crystal.sites[i].b_iso)
        given = rng if isinstance(rng, list) else (rng or {}).get(labels[i])
        # default: ± 50 % of the given B (0-1 Å^2 for B = 0)
        ranges.append((float(given[0]), float(given[1])) if given is not None else
                      ((0.5 * b, 1.5 * b) if b > 0 else (0.0, 1.0)))
    return tuple(idx), tuple(ranges)


def _coarse_cell(cfg: RunConfig, crystal) -> tuple[str, tuple[str, ...], float]:
    """(crystal system, free lengths, ± fraction) of the cell fit."""
    from .coarse import CELL_SYSTEMS, crystal_system, free_cell_lengths

    system = crystal_system(crystal)
    if system not in CELL_SYSTEMS:
        fix = ('describe the crystal in hexagonal axes (e.g. spacegroup "R -3 m:H"): a and c free, angles fixed'
               if system == "rhombohedral" else 'its cell angles are free and the fit holds them: remove "cell"')
        systems = ", ".join(CELL_SYSTEMS)
        raise QcbedInputError("coarse.refine", f'"cell" is refined for {systems} crystals (angles fixed by symmetry); '
                              f"{crystal.name} ({crystal.spacegroup}) is {system}", fix)
    pct = cfg.section("coarse").get("cell_range_percent", CELL_RANGE_PERCENT)
    _chk_number(gt=0.0, le=20.0, fix="± percent of each free lattice length, e.g. 1.0")(pct, "coarse.cell_range_percent",
                                                                                         None)
    return system, free_cell_lengths(system), float(pct) / 100.0


def coarse_physics(cfg: RunConfig, crystal) -> CoarsePhysics:
    """The ``[coarse]`` fits that re-solve (``refine`` = any of "voltage" or "cell", and "B"), defaults applied:

    * ``hv_range_kV`` = [low, high]: voltage search range, must contain microscope.hv_kV (default ± 2 kV);
    * ``B_sites`` = labels or 0-based indices of the crystal's sites (default: every site with an isotropic B);
      ``B_range_A2`` = [low, high] for every site, or {label = [low, high]} per site (0 <= low < high; default
      0.5-1.5 x the crystal's B, 0-1 Å^2 where it is 0);
    * ``cell_range_percent``: ± range of each free lattice length (default 1 %); the free lengths follow the
      crystal system (cubic a; tetragonal, hexagonal, trigonal in hexagonal axes a, c; orthorhombic a, b, c;
      angles fixed; monoclinic, triclinic and rhombohedral axes are refused).

    Voltage and cell are measured by the HOLZ line positions, which fix only their product (k a): not both
    together, and not with simulation.laue_zones = "zolz".  Each problem raises a QcbedInputError naming
    its field."""
    refine = _coarse_refine(cfg)
    out = {"refine": refine}
    if "voltage" in refine:
        out["hv_range_kV"] = _coarse_hv_range(cfg)
    if "B" in refine:
        idx, ranges = _coarse_b_sites(cfg, crystal)
        out.update(sites=idx, site_labels=tuple(crystal.sites[i].label for i in idx), b_ranges_A2=ranges)
    if "cell" in refine:
        system, free, rel = _coarse_cell(cfg, crystal)
        out.update(crystal_system=system, cell_free=free, cell_rel=rel)
    return CoarsePhysics(**out)


def check_disk_reflections(cfg: RunConfig, crystal) -> list[str]:
    """The reflections the config names as disks or images (roi.disks, coarse.disks, a LARBED pattern.hkl),
    checked by :func:`check_reflections`; returns the warnings, raises a QcbedInputError for a refusal.
    (LARBED h k l from hkl_file or the file names are checked when the pattern is loaded, stage roi.)"""
    pat = cfg.section("pattern")
    named = [(f"roi.disks[{i}]", h, False) for i, h in enumerate(cfg.section("roi").get("disks", []))]
    named += [(f"coarse.disks[{i}]", h, False) for i, h in enumerate(cfg.section("coarse").get("disks", []))]
    if pat.get("kind") == "larbed":
        named += [(f"pattern.hkl[{i}]", h, True) for i, h in enumerate(pat.get("hkl", []))]
    return check_reflections(crystal, cfg.section("microscope").get("zone", (0, 0, 0)), named)


def check_reflections(crystal, zone, named) -> list[str]:
    """``named``: (field, h k l, is a LARBED image).  Returns the warnings; raises for the first refusal.

    * Absent by the lattice centring (e.g. (0 0 1) of Si, F-centred): refused.  No beam travels there, in any
      model, so a disk or an image labelled so is a mislabelled one (a sign, an index, or another crystal).
    * Absent by a glide or screw (e.g. (0 0 2) of Si): a warning only.  Its kinematic amplitude is zero but it
      is excited dynamically (double diffraction), and its disk is a legitimate, sensitive measurement.
    * A LARBED image of a reflection outside the zero-order Laue zone (g . zone != 0): refused.  The images of a
      zone-axis LARBED scan are ZOLZ reflections; the pattern geometry places disks in the zone plane."""
    from .physics.structure_factors import absence_kind

    zone = np.array(zone, int)
    warnings = []
    for f, h, image in named:
        hkl = tuple(int(x) for x in h)
        if not any(hkl):
            continue
        name = " ".join(map(str, hkl))
        if image and zone.any() and int(np.dot(hkl, zone)) != 0:
            raise QcbedInputError(f, f"image {name} is outside the zone [{' '.join(map(str, zone))}] (g . zone = "
                                  f"{int(np.dot(hkl, zone))}): a zone-axis LARBED image is a zero-order Laue zone "
                                  "reflection", "check the image's h k l (signs, order) against microscope.zone")
        kind = absence_kind(crystal, hkl)
        if kind == "centring":
            raise QcbedInputError(f, f"reflection {name} is absent by the lattice centring of {crystal.spacegroup}: no "
                                  "beam exists there, so no disk or image can be of it",
                                  "check the h k l (a mislabelled disk or image, or another crystal)")
        if kind == "glide/screw":
            warnings.append(f"{f}: {name} is kinematically absent in {crystal.spacegroup} (glide or screw); its "
                            "intensity comes from double diffraction only")
    return warnings


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


# =============================================================================== validation
# A small declarative schema: section -> key -> checker.  A checker ``check(value, field, ctx)``
# raises QcbedInputError for its one problem; table and list checkers add the problems of their
# entries to ``ctx`` themselves, so nothing stops at the first problem.

HV_RANGE_KV = (10.0, 3000.0)
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
REQUIRED_SECTIONS = ("crystal", "microscope", "simulation", "pattern", "geometry", "roi")
PATH_FIX = "relative paths resolve against the config file's folder"


class _Ctx:
    """The problems found so far and what the checkers need."""

    def __init__(self, base_dir: Path, data_source: str | None = None):
        self.base_dir = base_dir
        self.data_source = data_source  # [pattern] data_source: where to get the data when they are absent
        self.errors: list[QcbedInputError] = []

    @property
    def path_fix(self) -> str:
        if self.data_source:
            return f"the data are not where the config says; {self.data_source}"
        return PATH_FIX

    def add(self, err: QcbedInputError, related: bool = False) -> None:
        """Record ``err`` unless its field already has a problem (``related``: or a field
        inside or around it, e.g. ``roi.regions`` and ``roi.regions[0].samples``)."""
        if not self.has(err.field, related):
            self.errors.append(err)

    def has(self, field_: str, related: bool = True) -> bool:
        return any(_related(field_, e.field) if related else field_ == e.field for e in self.errors)


def _related(a: str, b: str) -> bool:
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return long.startswith(short) and long[len(short)] in ".["


Check = Callable[[object, str, _Ctx], None]


def _run(check: Check, v, f: str, ctx: _Ctx) -> bool:
    """Run one checker, recording its problem; True when it found none."""
    n = len(ctx.errors)
    try:
        check(v, f, ctx)
    except QcbedInputError as e:
        ctx.add(e)
    return len(ctx.errors) == n


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _interval_text(gt, ge, lt, le) -> str:
    lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
    if lo is not None and hi is not None:
        return f"in {'(' if gt is not None else '['}{lo:g}, {hi:g}{')' if lt is not None else ']'}"
    if lo is not None:
        return f"{'>' if gt is not None else '>='} {lo:g}"
    return f"{'<' if lt is not None else '<='} {hi:g}"


def _chk_number(*, gt=None, ge=None, lt=None, le=None, integer: bool = False, fix: str | None = None) -> Check:
    """A finite number (``integer``: a whole number written without a decimal point) in range."""
    def check(v, f, ctx):
        if integer and not _is_int(v):
            raise QcbedInputError(f, f"must be an integer, got {v!r}", fix or "write a whole number without quotes")
        if not _is_num(v):
            raise QcbedInputError(f, f"must be a number, got {v!r}", fix or "write a finite number without quotes")
        if not ((gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) and (le is None or v <= le)):
            raise QcbedInputError(f, f"must be {_interval_text(gt, ge, lt, le)}, got {v!r}", fix)
    return check


def _boolean(v, f, ctx):
    if not isinstance(v, bool):
        raise QcbedInputError(f, f"must be true or false, got {v!r}", "write true or false (no quotes)")


def _anything(v, f, ctx):
    pass


def _chk_string(choices=None, pattern: re.Pattern | None = None, fix: str | None = None) -> Check:
    def check(v, f, ctx):
        if choices is not None and v not in choices:
            raise QcbedInputError(f, f"must be one of {', '.join(map(repr, choices))}, got {v!r}",
                                  fix or f"write {f.rsplit('.', 1)[-1]} = {choices[0]!r}".replace("'", '"'))
        if not isinstance(v, str) or not v.strip():
            raise QcbedInputError(f, f"must be a non-empty string, got {v!r}", fix or "write it in quotes")
        if pattern is not None and not pattern.fullmatch(v):
            raise QcbedInputError(f, f"{v!r} is not allowed", fix)
    return check


def _chk_vector(n: int, integer: bool = False, nonzero: bool = False, fix: str | None = None) -> Check:
    """A list of ``n`` numbers (``integer``: whole numbers, e.g. Miller indices)."""
    what = "integers" if integer else "numbers"

    def check(v, f, ctx):
        if not isinstance(v, list) or len(v) != n or not all(_is_num(x) for x in v):
            raise QcbedInputError(f, f"must be a list of {n} {what}, got {v!r}", fix)
        if integer and any(float(x) != int(x) for x in v):
            raise QcbedInputError(f, f"must be {what}, got {v!r}", fix)
        if nonzero and not any(v):
            raise QcbedInputError(f, "must not be all zero", fix)
    return check


def _chk_interval(positive: bool = False, fix: str | None = None) -> Check:
    """[lo, hi] with lo < hi (``positive``: 0 < lo)."""
    def check(v, f, ctx):
        _chk_vector(2, fix=fix)(v, f, ctx)
        lo, hi = v
        if not lo < hi or (positive and lo <= 0):
            raise QcbedInputError(f, f"must be [low, high] with {'0 < ' if positive else ''}low < high, got {v!r}", fix)
    return check


def _triples(v, f, ctx):
    """A non-empty list of reflections [h, k, l] (integers)."""
    fix = "give a list such as [[0, 0, 0], [1, -1, -1]]"
    if not isinstance(v, list) or not v:
        raise QcbedInputError(f, f"must be a non-empty list of reflections [h, k, l], got {v!r}", fix)
    for i, x in enumerate(v):
        _run(_chk_vector(3, integer=True, fix=fix), x, f"{f}[{i}]", ctx)


def _strings_from(choices) -> Check:
    def check(v, f, ctx):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise QcbedInputError(f, f"must be a list of strings, got {v!r}", f"choose from {', '.join(choices)}")
        bad = [x for x in v if x not in choices]
        if bad:
            raise QcbedInputError(f, f"unknown entry {bad[0]!r}", f"choose from {', '.join(choices)}")
    return check


def _resolve(ctx: _Ctx, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else ctx.base_dir / p


def _file(suffixes: tuple | None = None) -> Check:
    """The name of an existing file (relative to the config's folder)."""
    def check(v, f, ctx):
        if not isinstance(v, str) or not v:
            raise QcbedInputError(f, f"must be a file name (a string), got {v!r}", "give the file name in quotes")
        p = _resolve(ctx, v)
        if not p.is_file():
            raise QcbedInputError(f, f"file not found: {os.path.normpath(p)}", ctx.path_fix)
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise QcbedInputError(f, f"{v}: unknown file type {p.suffix!r}", f"use {', '.join(suffixes)}")
    return check


def _files(v, f, ctx):
    """A file name, a non-empty list of names, or a glob that matches at least one file."""
    for name, path in _file_list(v, f, ctx):
        if not path.is_file():
            raise QcbedInputError(f, f"file not found: {os.path.normpath(path)}", ctx.path_fix)


def _file_list(v, f, ctx) -> list[tuple[str, Path]]:
    """[(name as given, path)] of a file-name / list / glob entry (raises when malformed)."""
    if isinstance(v, str) and v:
        if not glob.has_magic(v):
            return [(v, _resolve(ctx, v))]
        matches = sorted(m for m in glob.glob(str(_resolve(ctx, v))) if os.path.isfile(m))
        if not matches:
            raise QcbedInputError(f, f"{v!r} matches no file in {ctx.base_dir}", ctx.path_fix)
        rel = not Path(v).expanduser().is_absolute()
        return [(os.path.relpath(m, ctx.base_dir) if rel else m, Path(m)) for m in matches]
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return [(x, _resolve(ctx, x)) for x in v]
    raise QcbedInputError(f, f"must be a file name, a glob pattern or a list of file names, got {v!r}",
                          'give e.g. "pattern.npy", "NAME_*.dm3" or ["a.dm3", "b.dm3"]')


@dataclass
class _Table:
    """A TOML table: its keys' checkers, the required keys and rules over several keys."""

    keys: dict
    required: tuple = ()
    rules: tuple = ()
    fix: dict = field(default_factory=dict)  # fix text for a missing required key

    def __call__(self, v, f, ctx):
        if not isinstance(v, dict):
            raise QcbedInputError(f, f"must be a table, got {v!r}", f"write [{f}] or {f.rsplit('.', 1)[-1]} = {{...}}")
        for k, val in v.items():
            if k not in self.keys:
                ctx.add(QcbedInputError(f"{f}.{k}", "unknown key", f"allowed: {', '.join(sorted(self.keys))}"))
            else:
                _run(self.keys[k], val, f"{f}.{k}", ctx)
        for k in self.required:
            if k not in v:
                ctx.add(QcbedInputError(f"{f}.{k}", "missing", self.fix.get(k)))
        for rule in self.rules:
            _run(rule, v, f, ctx)


def _tables(table: _Table, fix: str) -> Check:
    """A non-empty list of tables."""
    def check(v, f, ctx):
        if not isinstance(v, list) or not v:
            raise QcbedInputError(f, f"must be a non-empty list of tables, got {v!r}", fix)
        for i, x in enumerate(v):
            _run(table, x, f"{f}[{i}]", ctx)
    return check


# ------------------------------------------------------------------------------- section rules
def _crystal_rule(t, f, ctx):
    if "file" in t and set(t) - {"file"}:
        ctx.add(QcbedInputError("crystal", "give either file = ... or an inline crystal, not both",
                                "remove the file or the inline keys"))
    if not t:
        ctx.add(QcbedInputError("crystal.file", "missing", 'give file = "si.cif" or an inline crystal '
                                "(cell, spacegroup, atoms)"))


def _geometry_rule(t, f, ctx):
    if "tilt0" in t and "tilt0_xy_invA" in t:
        ctx.add(QcbedInputError("geometry.tilt0_xy_invA", "give tilt0 or tilt0_xy_invA, not both", "remove one"))


def _disk_shifts(v, f, ctx):
    if not isinstance(v, dict):
        raise QcbedInputError(f, f"must be a table, got {v!r}", 'write disk_shift_px = {"2 -2 -2" = [drow, dcol]}')
    for key, val in v.items():
        parts = str(key).replace(",", " ").split()
        if len(parts) != 3 or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
            ctx.add(QcbedInputError(f"{f}.{key}", 'keys must be reflections written "h k l"', 'e.g. "2 -2 -2"'))
        else:
            _run(_chk_vector(2, fix="give [drow, dcol] in pixels"), val, f"{f}.{key}", ctx)


def _raw_dtype(v, f, ctx):
    _chk_string()(v, f, ctx)
    if v[0] in "<>=|!":
        raise QcbedInputError(f, f"{v!r} carries a byte order", 'give the plain name (e.g. "float32") and byte_order')
    try:
        ok = np.dtype(v).kind in "biuf"
    except TypeError:
        ok = False
    if not ok:
        raise QcbedInputError(f, f"{v!r} is not a real numeric dtype", 'use e.g. "uint16", "int32", "float32", "float64"')


def _raw_shape(v, f, ctx):
    if not isinstance(v, list) or len(v) not in (2, 3) or not all(_is_int(s) and s > 0 for s in v):
        raise QcbedInputError(f, f"must be [rows, cols] or [n, rows, cols] of positive integers, got {v!r}",
                              "give the image size, e.g. shape = [1024, 1024]")


def _aux(v, f, ctx):
    """variance / mask: a file, or (LARBED) a list of files, one per image."""
    if not (isinstance(v, str) and v) and not (isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)):
        raise QcbedInputError(f, f"must be a file name or a list of file names, got {v!r}", f'give "{f.rsplit(".", 1)[-1]}.npy"')
    for name in [v] if isinstance(v, str) else v:
        p = _resolve(ctx, name)
        if not p.is_file():
            raise QcbedInputError(f, f"file not found: {os.path.normpath(p)}", ctx.path_fix)


def _hkl_rows(v, f, ctx):
    fix = "give hkl = [[h, k, l], ...], one row per image"
    if not isinstance(v, list) or not v:
        raise QcbedInputError(f, f"must be a non-empty list of [h, k, l] rows, got {v!r}", fix)
    for i, x in enumerate(v):
        if not isinstance(x, list) or len(x) != 3 or not all(_is_int(y) for y in x):
            raise QcbedInputError(f, f"row {i} must be three integers [h, k, l], got {x!r}", fix)
    rows = [tuple(x) for x in v]
    dup = next((r for i, r in enumerate(rows) if r in rows[:i]), None)
    if dup is not None:
        raise QcbedInputError(f, f"h k l {dup} appears twice", "give each reflection once")


def _pattern_rule(t, f, ctx):
    from .load import FORMATS, hkl_from_filename, parse_raw_layout

    kind = t.get("kind")
    if kind not in ("cbed", "larbed"):
        return
    has_file, has_files = "file" in t, "files" in t
    if has_file and has_files:
        ctx.add(QcbedInputError(f"{f}.files", "give exactly one of file and files", "remove one"))
    elif not has_file and not has_files:
        ctx.add(QcbedInputError(f"{f}.file", "missing", 'give file = "pattern.npy"' if kind == "cbed" else
                                'give files = "NAME_*.dm3" (one image per reflection) or file = "stack.npy"'))
    if kind == "cbed":
        if has_files and not has_file:
            ctx.add(QcbedInputError(f"{f}.files", "a CBED pattern is one image", 'give file = "pattern.npy"'))
        for k in ("hkl", "hkl_file", "hkl_from_names"):
            if k in t:
                ctx.add(QcbedInputError(f"{f}.{k}", 'applies to kind = "larbed" only',
                                        "remove it: CBED disks are indexed in the ROI stage"))
        for k in ("variance", "mask"):
            if isinstance(t.get(k), list):
                ctx.add(QcbedInputError(f"{f}.{k}", "a CBED pattern takes one file", f'give {k} = "{k}.npy"'))
    elif "deconvolution" in t:
        ctx.add(QcbedInputError(f"{f}.deconvolution", 'applies to kind = "cbed" only',
                                "deconvolve LARBED images before loading, or remove it"))
    # the intensity files: readable formats, raw sizes
    key = "file" if has_file else "files"
    if key not in t or ctx.has(f"{f}.{key}") or (has_file and has_files):
        return
    try:
        files = _file_list(t[key], f"{f}.{key}", ctx)
    except QcbedInputError:
        return
    layout = None
    if "raw" in t and not ctx.has(f"{f}.raw"):
        try:
            layout = parse_raw_layout(t["raw"], f"{f}.raw")
        except QcbedInputError as e:
            ctx.add(e)
    for name, path in files:
        fmt = FORMATS.get(path.suffix.lower())
        if "raw" not in t and fmt is None:
            ctx.add(QcbedInputError(f"{f}.{key}", f"{name}: unknown image format {path.suffix!r}",
                                    f"use one of {', '.join(FORMATS)}, or give raw = {{...}} for raw binary"))
            break
        if "raw" not in t and fmt == "raw":
            ctx.add(QcbedInputError(f"{f}.raw", f"{name} is raw binary and needs its layout",
                                    'give raw = {dtype = "float32", byte_order = "little", shape = [rows, cols]}'))
            break
        if layout is not None and path.stat().st_size != layout.nbytes:
            ctx.add(QcbedInputError(f"{f}.raw", f"{name} has {path.stat().st_size} bytes, the layout {layout.nbytes}",
                                    "check raw.shape, raw.dtype and raw.offset"))
            break
    if kind != "larbed":
        return
    # LARBED: one source of h k l, consistent with the images
    from_names = t.get("hkl_from_names")
    given = [k for k in ("hkl", "hkl_file") if k in t] + (["hkl_from_names"] if from_names is True else [])
    if len(given) > 1:
        ctx.add(QcbedInputError(f"{f}.{given[1]}", f"give one source of h k l, not {' and '.join(given)}",
                                "keep one of hkl, hkl_file, hkl_from_names"))
        return
    if not given:
        if key == "files" and from_names is None:
            given = ["hkl_from_names"]
        else:
            ctx.add(QcbedInputError(f"{f}.hkl", "missing: no reflection indices for the LARBED images",
                                    'give hkl = [[h, k, l], ...] or hkl_file = "g.npy"'))
            return
    if given[0] == "hkl_from_names":
        if key != "files":
            ctx.add(QcbedInputError(f"{f}.hkl_from_names", "needs one file per image", "give files = [...], or hkl"))
            return
        bad = [n for n, _ in files if hkl_from_filename(n) is None]
        if bad:
            ctx.add(QcbedInputError(f"{f}.files", f"cannot read h k l from the name {bad[0]!r}",
                                    "name the file like GeSn_+1+1-3.dm3, or give hkl = [[h, k, l], ...]"))
    elif given[0] == "hkl" and key == "files" and not ctx.has(f"{f}.hkl") and len(t["hkl"]) != len(files):
        ctx.add(QcbedInputError(f"{f}.hkl", f"{len(t['hkl'])} h k l rows for {len(files)} images",
                                "give one [h, k, l] per image, in the order of the images"))
    for k in ("variance", "mask"):
        if isinstance(t.get(k), list) and key == "files" and len(t[k]) != len(files) and not ctx.has(f"{f}.{k}"):
            ctx.add(QcbedInputError(f"{f}.{k}", f"{len(t[k])} files for {len(files)} images", "give one file per image"))


def _coarse_rule(t, f, ctx):
    box, step = t.get("box_px"), t.get("step_px", 1.0)
    if _is_num(box) and _is_num(step) and box > 0 and step > 0 and round(box / step) < 1 \
            and not ctx.has(f"{f}.box_px") and not ctx.has(f"{f}.step_px"):
        ctx.add(QcbedInputError(f"{f}.box_px", f"{box} px is less than one grid step ({step} px)",
                                "use a larger box or a smaller step"))


def _b_sites_list(v, f, ctx):
    """coarse.B_sites: a non-empty list of site labels (strings) or 0-based site indices."""
    fix = 'give site labels of the crystal file or 0-based indices, e.g. ["Ge1", "Sn1"] or [0, 1]'
    if not isinstance(v, list) or not v or not all((isinstance(x, str) and x) or (_is_int(x) and x >= 0) for x in v):
        raise QcbedInputError(f, f"must be a non-empty list of site labels or indices >= 0, got {v!r}", fix)


def _b_range(v, f, ctx):
    """coarse.B_range_A2: [low, high] with 0 <= low < high (Å^2), or a table of them by site label."""
    fix = "give [low, high] in Å^2 with 0 <= low < high (B = 8 pi^2 <u^2> is never negative)"

    def one(r, where):
        if not (isinstance(r, list) and len(r) == 2 and all(_is_num(x) for x in r)):
            raise QcbedInputError(where, f"must be [low, high] in Å^2, got {r!r}", fix)
        if not 0 <= r[0] < r[1]:
            raise QcbedInputError(where, f"must be [low, high] with 0 <= low < high, got {r!r}", fix)

    if not isinstance(v, dict):
        one(v, f)
        return
    if not v:
        raise QcbedInputError(f, "is an empty table", 'give B_range_A2 = [low, high] or {Si = [0.3, 0.6]}')
    for k, r in v.items():
        if ctx is None:
            one(r, f"{f}.{k}")
        else:  # every site's problem recorded
            _run(lambda x, ff, _c: one(x, ff), r, f"{f}.{k}", ctx)


def _coarse_refine_list(v, f, ctx):
    _strings_from(COARSE_REFINE)(v, f, ctx)
    if len(set(v)) != len(v):
        raise QcbedInputError(f, f"lists an entry twice: {v!r}", "give each of voltage, cell, B once")


def _run_name(v, f, ctx):
    _chk_string(pattern=RUN_NAME, fix="use letters, digits, '-', '_' and '.' only (it names the results folder)")(v, f, ctx)
    if v in (".", ".."):
        raise QcbedInputError(f, f"{v!r} is not allowed", "give a name such as si_cbed")


def _gof(v, f, ctx):
    _chk_string(fix="give a metric name such as \"Chi2\", or \"my_metric.py:MyGOF\"")(v, f, ctx)


def _refine_geometry(v, f, ctx):
    from .fine import GEOMETRY_PARAMS

    _strings_from(GEOMETRY_PARAMS)(v, f, ctx)


_ZERO_OK = _chk_number(ge=0.0)
_POSITIVE = _chk_number(gt=0.0)
_INT_TRIPLE = _chk_vector(3, integer=True, nonzero=True, fix="give three integers such as [1, 1, 0]")

RAW_SCHEMA = _Table({"offset": _chk_number(ge=0, integer=True, fix="give the header length in bytes, or 0"),
                     "dtype": _raw_dtype, "byte_order": _chk_string(("little", "big")), "shape": _raw_shape},
                    required=("dtype", "byte_order", "shape"),
                    fix={k: "a raw binary file needs dtype, byte_order and shape" for k in ("dtype", "byte_order", "shape")})
DETECTOR_SCHEMA = _Table({"gain": _chk_number(gt=0.0, fix="the conversion gain of the camera [counts per electron]"),
                          "mixing": _chk_number(gt=0.0, le=1.0, fix="m = sum of the squared unit-sum PSF (e.g. 0.111)"),
                          "A": _chk_number(ge=1.0, fix="A = 1 + F + 1/(m G) is at least 1"),
                          "delta": _ZERO_OK, "background_variance": _ZERO_OK},
                         required=("gain", "mixing", "A", "delta", "background_variance"),
                         fix={k: "give all of gain, mixing, A, delta, background_variance"
                              for k in ("gain", "mixing", "A", "delta", "background_variance")})
DECONVOLUTION_SCHEMA = _Table({"mtf": _file((".npy", ".tif", ".tiff", ".dm3", ".dm4")),
                               "iterations": _chk_number(ge=0, integer=True), "background": _ZERO_OK,
                               "psf": _boolean, "pad": _chk_number(ge=0, integer=True)},
                              required=("mtf",), fix={"mtf": 'give mtf = "mtf.npy" (FFT layout) or a PSF with psf = true'})
REGION_SCHEMA = _Table({"corners": _anything, "samples": _anything}, required=("corners", "samples"),
                       fix={"corners": "three display points [[x1, y1], [x2, y2], [x3, y3]]",
                            "samples": "two positive counts [n12, n13]"})
def _sf_components(v, f, ctx):
    from .fine import SF_COMPONENTS  # centric 'U', 'Uprime'; acentric 'U_amp', 'U_phase', 'Uprime_amp', 'Uprime_phase'

    _strings_from(SF_COMPONENTS)(v, f, ctx)


REFLECTION_SCHEMA = _Table({"hkl": _INT_TRIPLE, "refine": _sf_components,
                            "range_percent": _chk_number(gt=0.0, le=100.0), "U_range": _chk_interval(),
                            "Uprime_range": _chk_interval(), "U_phase_range": _chk_interval(),
                            "Uprime_phase_range": _chk_interval(), "U": _chk_number(), "Uprime": _chk_number()},
                           required=("hkl",), fix={"hkl": "give hkl = [h, k, l]"})


def _regions_entry(v, f, ctx):
    REGION_SCHEMA(v, f, ctx)
    if isinstance(v, dict):
        if "corners" in v:
            c = v["corners"]
            if not isinstance(c, list) or len(c) != 3 or not all(isinstance(p, list) and len(p) == 2 and all(_is_num(x) for x in p) for p in c):
                ctx.add(QcbedInputError(f"{f}.corners", f"must be three display points [[x1, y1], [x2, y2], [x3, y3]], got {c!r}"))
        if "samples" in v:
            _run(_chk_vector(2, integer=True, fix="give two positive counts [n12, n13]"), v["samples"], f"{f}.samples", ctx)
            if not ctx.has(f"{f}.samples") and min(v["samples"]) < 1:
                ctx.add(QcbedInputError(f"{f}.samples", f"must be two positive counts [n12, n13], got {v['samples']!r}"))


def _regions_list(v, f, ctx):
    if not isinstance(v, list) or not v:
        raise QcbedInputError(f, "need at least one region",
                              "give regions = [{corners = [[x1,y1],[x2,y2],[x3,y3]], samples = [n12, n13]}]")
    for i, x in enumerate(v):
        _run(_regions_entry, x, f"{f}[{i}]", ctx)


def _disk_mask(v, f, ctx):
    if not isinstance(v, list) or not v or not all(isinstance(r, list) and r and all(isinstance(x, (bool, int)) for x in r) for r in v) \
            or len({len(r) for r in v}) != 1:
        raise QcbedInputError(f, "must be a (regions x disks) list of lists of true/false", "e.g. [[true, false], [true, true]]")


SCHEMA: dict[str, _Table] = {
    "crystal": _Table({"file": _file((".cif", ".dat", ".toml")), "name": _anything, "cell": _anything,
                       "spacegroup": _anything, "atoms": _anything}, rules=(_crystal_rule,)),
    "microscope": _Table({"hv_kV": _chk_number(ge=HV_RANGE_KV[0], le=HV_RANGE_KV[1], fix="the accelerating voltage in kV, e.g. 200.0"),
                          "zone": _INT_TRIPLE, "x_axis": _INT_TRIPLE,
                          "normal": _chk_vector(3, nonzero=True, fix="give a direction [u, v, w]")},
                         required=("hv_kV", "zone"), fix={"hv_kV": "e.g. hv_kV = 200.0", "zone": "e.g. zone = [1, 1, 0]"}),
    "simulation": _Table({"thickness_A": _chk_number(gt=0.0, fix="the (starting) thickness in Å"),
                          "scattering_table": _chk_string(("peng", "kirkland")),
                          "absorption": _chk_string(("none", "proportional", "bird_king")),
                          "absorption_fraction": _chk_number(ge=0.0, lt=1.0, fix="typical values are 0.02-0.1"),
                          "solver": _chk_string(("general", "hermitian", "auto")),
                          "g_max": _POSITIVE, "sg_max": _POSITIVE, "sg_strong": _POSITIVE, "bethe": _boolean,
                          "tile_invA": _POSITIVE, "laue_zones": _chk_string(LAUE_ZONES), "holz_lines": _boolean,
                          "beam_accuracy": _chk_number(gt=0.0, lt=1.0, fix="a fraction of each disk's maximum, e.g. 0.005")},
                         required=("thickness_A",), fix={"thickness_A": "give the (starting) thickness in Å"}),
    "pattern": _Table({"kind": _chk_string(("cbed", "larbed"), fix='write kind = "cbed" (one image) or "larbed" (one image per reflection)'),
                       "file": _file(), "files": _files, "hkl": _hkl_rows, "hkl_file": _file((".npy",)),
                       "hkl_from_names": _boolean, "variance": _aux, "mask": _aux, "raw": RAW_SCHEMA,
                       "zero_is_unrecorded": _boolean, "detector": DETECTOR_SCHEMA, "deconvolution": DECONVOLUTION_SCHEMA,
                       "data_source": _chk_string()},
                      required=("kind",), rules=(_pattern_rule,),
                      fix={"kind": 'write kind = "cbed" (one image) or kind = "larbed" (one image per reflection)'}),
    "geometry": _Table({"gl_px": _chk_number(gt=0.0, fix="length of the x-axis reflection in pixels (CBED) or tilt steps (LARBED)"),
                        "rotation_deg": _chk_number(), "centre_px": _chk_vector(2, fix="give [row, col]"),
                        "tilt0": _chk_vector(3, fix="give [h, k, l] (reciprocal-lattice units)"),
                        "tilt0_xy_invA": _chk_vector(2, fix="give [x, y] in 1/Å"),
                        "shift_px": _chk_vector(2, fix="give [row, col]"), "disk_shift_px": _disk_shifts,
                        "scale_y": _POSITIVE, "flip": _boolean},
                       required=("gl_px",), rules=(_geometry_rule,),
                       fix={"gl_px": "length of the x-axis reflection in pixels (CBED) or tilt steps (LARBED)"}),
    "roi": _Table({"disks": _triples, "regions": _regions_list, "padding": _chk_number(ge=0, integer=True, fix="grid steps, e.g. 0"), "disk_mask": _disk_mask},
                  required=("regions",),
                  fix={"regions": "give regions = [{corners = [[x1,y1],[x2,y2],[x3,y3]], samples = [n12, n13]}]"}),
    "refine": _Table({"gof": _gof, "reflections": _tables(REFLECTION_SCHEMA, "e.g. [{hkl = [1, -1, -1], refine = [\"U\"]}]"),
                      "geometry": _refine_geometry, "psf_sigma": _ZERO_OK, "psf_gamma": _ZERO_OK,
                      "max_iterations": _chk_number(ge=1, integer=True), "thickness_scan": _chk_number(ge=0.0, lt=1.0),
                      "initial_step": _chk_number(gt=0.0, le=1.0), "xatol": _POSITIVE,
                      "gauss_newton_steps": _chk_number(ge=0, integer=True, fix="0 (off) or a few, e.g. 4"),
                      "optimizer": _chk_string(("nelder-mead", "levenberg-marquardt"))},
                     required=("reflections",),
                     fix={"reflections": "list the reflections to refine, e.g. [{hkl = [1, -1, -1], refine = [\"U\"]}]"}),
    "coarse": _Table({"enabled": _boolean, "thickness_bracket_A": _chk_interval(positive=True, fix="give [low, high] in Å"),
                      "box_px": _POSITIVE, "search_px": _ZERO_OK, "step_px": _POSITIVE, "radius_px": _POSITIVE,
                      "background": _chk_string(("per_disk", "joint")), "disks": _triples,
                      "fit_gl": _boolean, "gl_bracket_px": _chk_interval(positive=True, fix="give [low, high] in px"),
                      "align_disks": _boolean, "max_disk_shift_px": _POSITIVE,
                      "refine": _coarse_refine_list, "hv_range_kV": _chk_interval(positive=True, fix="give [low, high] in kV"),
                      "B_sites": _b_sites_list, "B_range_A2": _b_range,
                      "cell_range_percent": _chk_number(gt=0.0, le=20.0, fix="± percent of each free lattice length, e.g. 1.0")},
                     rules=(_coarse_rule,)),
    "run": _Table({"name": _run_name}),
}


def _cross_checks(data: dict, ctx: _Ctx) -> None:
    """Rules that span sections (each only when the keys it reads are themselves fine)."""
    pat, roi, ref = (data.get(s) if isinstance(data.get(s), dict) else {} for s in ("pattern", "roi", "refine"))
    kind = pat.get("kind") if pat.get("kind") in ("cbed", "larbed") else None
    if kind == "cbed" and "roi" in data and isinstance(data["roi"], dict) and "disks" not in roi:
        ctx.add(QcbedInputError("roi.disks", "missing", "list the CBED disks to compare, e.g. [[0, 0, 0], [1, -1, -1]]"))
    if kind == "larbed" and "disks" in roi and "hkl" in pat and not ctx.has("roi.disks") and not ctx.has("pattern.hkl"):
        have = {tuple(h) for h in pat["hkl"]}
        missing = [h for h in roi["disks"] if tuple(int(x) for x in h) not in have]
        if missing:
            ctx.add(QcbedInputError("roi.disks", f"reflection {' '.join(str(int(x)) for x in missing[0])} has no image "
                                    "in the pattern", "use reflections listed in pattern.hkl"))
    if "disk_mask" in roi and not ctx.has("roi.disk_mask") and not ctx.has("roi.regions"):
        n_disks = len(roi["disks"]) if "disks" in roi and not ctx.has("roi.disks") else \
            len(pat["hkl"]) if kind == "larbed" and "hkl" in pat and not ctx.has("pattern.hkl") else None
        shape = (len(roi["disk_mask"]), len(roi["disk_mask"][0]))
        if n_disks is not None and shape != (len(roi["regions"]), n_disks):
            ctx.add(QcbedInputError("roi.disk_mask", f"must have shape (regions, disks) = ({len(roi['regions'])}, "
                                    f"{n_disks}), got {shape}", "one row per region, one column per disk"))
    geo = ref.get("geometry")
    if kind is not None and isinstance(geo, list) and not ctx.has("refine.geometry"):
        for name, needs in (("disk_shifts", "cbed"), ("psf", "larbed")):
            if name in geo and kind != needs:
                ctx.add(QcbedInputError("refine.geometry", f"{name!r} applies to kind = \"{needs}\" only", f"remove {name!r}"))
    _check_psf_padding(kind, roi, ref, ctx)
    coarse = data.get("coarse") if isinstance(data.get("coarse"), dict) else {}
    if kind == "cbed" and coarse.get("align_disks") is True and not ctx.has("coarse.align_disks"):
        ctx.add(QcbedInputError("coarse.align_disks", "per-disk alignment applies to kind = \"larbed\" only (CBED disks "
                                "share one image)", "remove align_disks; the orientation fit moves every disk"))


def _check_psf_padding(kind, roi: dict, ref: dict, ctx: _Ctx) -> None:
    """A LARBED PSF start (refine.psf_sigma/psf_gamma) must fit roi.padding on every region's grid
    (stages.fine.psf_padding_limits), found here before any stage runs."""
    from .fine import psf_padding_limits, region_grid_steps
    from .roi import Region

    if kind != "larbed" or not isinstance(roi.get("regions"), list) or not roi["regions"]:
        return
    if any(ctx.has(f) for f in ("roi.regions", "roi.padding", "refine.geometry", "refine.psf_sigma", "refine.psf_gamma")):
        return
    geo = ref.get("geometry")
    refined = isinstance(geo, list) and "psf" in geo
    psf0 = (ref.get("psf_sigma", 0.0), ref.get("psf_gamma", 0.0))
    if not (refined or psf0[0] > 0 or psf0[1] > 0):
        return
    try:
        steps = [region_grid_steps(Region(r["corners"], r["samples"])) for r in roi["regions"]]
        psf_padding_limits(steps, roi.get("padding", 0), psf0, refined)
    except QcbedInputError as e:
        ctx.add(e)
    except (TypeError, KeyError, ValueError):  # a malformed region: reported by its own check
        return


# builder error fields that do not name the config section
_FIELD_ALIASES = {"zone": "microscope.zone", "x_axis": "microscope.x_axis", "normal": "microscope.normal",
                  "hv_kV": "microscope.hv_kV", "u0": "microscope.hv_kV", "absorption": "simulation.absorption",
                  "absorption_fraction": "simulation.absorption_fraction", "scattering_table": "simulation.scattering_table",
                  "method": "simulation.solver", "thickness": "simulation.thickness_A", "geometry.gl": "geometry.gl_px",
                  "geometry.centre": "geometry.centre_px", "geometry.shift": "geometry.shift_px", "atoms": "crystal.atoms"}


def _in_config(err: QcbedInputError, default: str) -> QcbedInputError:
    """``err`` with its field as a config path (a builder's own field names become ``default``)."""
    f = err.field
    if f in _FIELD_ALIASES:
        return QcbedInputError(_FIELD_ALIASES[f], err.problem, err.fix)
    if f.startswith("beam_selection."):
        return QcbedInputError("simulation." + f.removeprefix("beam_selection."), err.problem, err.fix)
    if re.split(r"[.\[]", f, maxsplit=1)[0] in SECTIONS:
        return err
    return QcbedInputError(default, f"{f}: {err.problem}", err.fix)


def _build(ctx: _Ctx, default: str, fn):
    """``fn()``, or None with its problem recorded once (under ``default`` when it names no field)."""
    try:
        return fn()
    except QcbedInputError as e:
        ctx.add(_in_config(e, default), related=True)
    except Exception as e:  # noqa: BLE001 -- bad input reaching a builder: report it, once per section
        if not ctx.has(default.split(".")[0]):
            ctx.add(QcbedInputError(default, f"cannot be used: {type(e).__name__}: {e}", "check this section"))
    return None


def _renamed(fn, old: str, new: str):
    """``fn()`` with the prefix ``old`` of a QcbedInputError's field replaced by ``new``."""
    try:
        return fn()
    except QcbedInputError as e:
        if _related(old, e.field) and e.field.startswith(old):
            raise QcbedInputError(new + e.field[len(old):], e.problem, e.fix) from None
        raise


def _without_problems(data: dict, ctx: _Ctx) -> dict:
    """``data`` less the keys that have a problem, so that builders report only new ones."""
    out = {}
    for s, t in data.items():
        if isinstance(t, dict) and s in SCHEMA:
            out[s] = {k: v for k, v in t.items() if not ctx.has(f"{s}.{k}")}
    return out


def validate_config(path: str | Path, require: tuple[str, ...] = ()) -> RunConfig:
    """Check a run config file before anything runs; return it (as :func:`load_config`) or raise
    :class:`~stages.errors.QcbedInputErrors` listing every problem with its field path and a fix.

    Checked: unknown sections and keys; types; ranges; required sections (``crystal``,
    ``microscope``, ``simulation``, ``pattern``, ``geometry``, ``roi`` and those in ``require``,
    e.g. ``("refine",)``) and keys; that data files exist (crystal.file, pattern.file / files (a
    glob must match a file), variance, mask, hkl_file, deconvolution.mtf; relative paths resolve
    against the config file's folder); rules across keys and sections; then the builders that
    need no image data (crystal, forward model, pattern geometry, ROI regions, refined structure
    factors, GOF metric), each problem reported once.  A missing file or malformed TOML raises
    the single QcbedInputError.
    """
    path = Path(path)
    return validate_run_config(RunConfig(path.resolve(), _read_toml(path)), require, shown_as=path)


def validate_run_config(cfg: RunConfig, require: tuple[str, ...] = (), shown_as: str | Path | None = None) -> RunConfig:
    """:func:`validate_config` of a config already read (e.g. from a run record): ``cfg.data``
    checked with paths relative to ``cfg.base_dir``; returns ``cfg``.  ``shown_as``: the name of
    the config in the first line of a several-problem message (default ``cfg.path``)."""
    from .fine import sf_params_from_config

    data = cfg.data
    base_dir = cfg.base_dir
    pat = data.get("pattern") if isinstance(data.get("pattern"), dict) else {}
    source = pat.get("data_source") if isinstance(pat.get("data_source"), str) else None
    ctx = _Ctx(base_dir, source)
    for s, t in data.items():
        if s not in SECTIONS:
            ctx.add(QcbedInputError(s, "unknown section", f"allowed: {', '.join(sorted(SECTIONS))}"))
        else:
            _run(SCHEMA[s], t, s, ctx)
    for s in dict.fromkeys(REQUIRED_SECTIONS + tuple(require)):
        if s not in data:
            ctx.add(QcbedInputError(s, "missing section", f"add [{s}] (see data/si_cbed/config.toml)"))
    _cross_checks(data, ctx)

    clean = RunConfig(cfg.path, _without_problems(data, ctx))  # builders see only new problems
    crystal = model = None
    if "crystal" in data and not ctx.has("crystal"):
        crystal = _build(ctx, "crystal.file" if "file" in clean.section("crystal") else "crystal", lambda: crystal_of(clean))
    if crystal is not None and "microscope" in data:
        model = _build(ctx, "microscope", lambda: forward_model(clean, crystal))
    if crystal is not None:
        for w in _build(ctx, "roi.disks", lambda: check_disk_reflections(clean, crystal)) or []:
            warnings.warn(w, QcbedInputWarning, stacklevel=2)
    if model is not None and "geometry" in data:
        _build(ctx, "geometry", lambda: pattern_geometry(clean, model))
    if "roi" in data:
        _build(ctx, "roi.regions", lambda: regions_from_config(clean.section("roi")))
    co = clean.section("coarse")
    if isinstance(data.get("coarse"), dict) and "refine" in co and "microscope" in data:
        # each of the [coarse] physics fits on its own, so that every problem is named
        if _build(ctx, "coarse.refine", lambda: _coarse_refine(clean)) is not None:
            refine = co["refine"]
            if "voltage" in refine:
                _build(ctx, "coarse.hv_range_kV", lambda: _coarse_hv_range(clean))
            if crystal is not None and "B" in refine:
                _build(ctx, "coarse.B_sites", lambda: _coarse_b_sites(clean, crystal))
            if crystal is not None and "cell" in refine:
                _build(ctx, "coarse.refine", lambda: _coarse_cell(clean, crystal))
    if "refine" in data:
        r, pat = clean.section("refine"), clean.section("pattern")
        if model is not None and not isinstance(r.get("reflections"), list):
            _build(ctx, "refine.reflections", lambda: sf_params_from_config(model, r.get("reflections")))
        elif model is not None:  # one at a time, so that each problem names its reflection
            for i, refl in enumerate(r["reflections"]):
                f = f"refine.reflections[{i}]"
                _build(ctx, f"{f}.hkl", lambda: _renamed(lambda: sf_params_from_config(model, [refl], "refine.reflections"),
                                                         "refine.reflections[0]", f))
        default = "Chi2_LARBED" if pat.get("kind") == "larbed" and "variance" in pat else "Chi2"
        _build(ctx, "refine.gof", lambda: make_gof(r.get("gof", default), detector=pat.get("detector"), base_dir=base_dir))
    if ctx.errors:
        raise QcbedInputErrors(ctx.errors, shown_as if shown_as is not None else cfg.path)
    return cfg
