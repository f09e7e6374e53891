"""The stages of one run, each a pure computation plus its own zarr store, with stage keys.

A run = one config file = one pattern; its stores go to ``results/<run>/`` (../shared/DESIGN.md):

==========  ==========================  ===============================================================
stage       store                       key made of
==========  ==========================  ===============================================================
load        pattern.zarr                [pattern], content digests of every file it reads
roi         roi.zarr                    [roi], [geometry], [microscope], crystal, scattering table, load
iam         structure_factors.zarr      crystal, [microscope], [simulation] physics, refined reflections
variance    variance.zarr               pattern.detector, load
coarse      coarse.zarr                 [coarse], crystal, [microscope], [simulation], [geometry], roi
                                        disks, load (only when the config has an enabled [coarse])
                                        (iam: + coarse, and run after it, when coarse.refine is set)
fine        fine.zarr (+ fine_trace)    [refine], crystal, [microscope], [simulation], load, roi,
                                        variance, coarse
report      report/                     fine, iam, coarse
==========  ==========================  ===============================================================

Keys are sha256 digests of canonical JSON of those parts plus the stage name and the package
version; upstream stores enter by their key, so keys chain like a Merkle tree and nothing computed
is re-hashed (../shared/research/stack.md §2).  Keys are computed from the config and the input
files before anything runs (:func:`make_plan`), so a stage whose store carries its key is skipped
and a changed value recomputes exactly the stages downstream of it.

Stores are written under a temporary name and renamed into place (:mod:`stages.store`), so a
killed write never leaves a store that looks complete.  The fine refinement appends one row per
outer iteration to ``fine_trace.zarr`` (:class:`TraceStore`) and resumes from its last committed
row; a store whose metadata cannot be read is moved aside (``.NAME.corrupt-*``, never deleted)
and recomputed.  :class:`RunLock` keeps a second process off a run folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__
from . import config as C
from .errors import QcbedInputError
from .interrupt import check_stop
from .store import open_store, replace_dir, write_store

STAGES = ("load", "roi", "iam", "variance", "coarse", "fine", "report")
#: the order when the coarse stage refines the voltage, cell or B: the IAM structure factors (and the report's
#: V_g and Mott-Bethe F_x, which use the crystal and the voltage of that store) are those of the refined model
STAGES_COARSE_PHYSICS = ("load", "roi", "variance", "coarse", "iam", "fine", "report")
STORES = {"load": "pattern.zarr", "roi": "roi.zarr", "iam": "structure_factors.zarr", "variance": "variance.zarr",
          "coarse": "coarse.zarr", "fine": "fine.zarr", "report": "report"}
TRACE = "fine_trace.zarr"
RUN_RECORD = "run.json"
LOCK = ".lock"
#: physics keys of [simulation] that change structure factors (not the starting thickness)
_SIM_PHYSICS = ("scattering_table", "absorption", "absorption_fraction")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ keys
def canonical(obj) -> str:
    """Canonical JSON (sorted keys, no spaces) of plain data; numpy values become Python ones."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.ndarray):
            return plain(v.tolist())
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, Path):
            return str(v)
        return v
    return json.dumps(plain(obj), sort_keys=True, separators=(",", ":"))


def stage_key(stage: str, parts: dict) -> str:
    """sha256 of the stage name, the package version and ``parts`` (config sections, input keys)."""
    return hashlib.sha256(canonical({"stage": stage, "qcbed_version": __version__, **parts}).encode()).hexdigest()


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def input_files(cfg: C.RunConfig) -> dict[str, list[Path]]:
    """Every file the run reads, by config field (relative paths resolved against the config's folder)."""
    base = cfg.base_dir

    def res(name) -> Path:
        p = Path(str(name)).expanduser()
        return p if p.is_absolute() else base / p

    out: dict[str, list[Path]] = {}
    cr = cfg.section("crystal")
    if "file" in cr:
        out["crystal.file"] = [res(cr["file"])]
    pat = cfg.section("pattern")
    if "file" in pat:
        out["pattern.file"] = [res(pat["file"])]
    if "files" in pat:
        spec = pat["files"]
        if isinstance(spec, str) and glob.has_magic(spec):
            out["pattern.files"] = [Path(m) for m in sorted(glob.glob(str(res(spec)))) if os.path.isfile(m)]
        elif isinstance(spec, str):
            out["pattern.files"] = [res(spec)]
        elif isinstance(spec, list):
            out["pattern.files"] = [res(s) for s in spec]
    for k in ("variance", "mask", "hkl_file"):
        v = pat.get(k)
        if isinstance(v, str):
            out[f"pattern.{k}"] = [res(v)]
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[f"pattern.{k}"] = [res(x) for x in v]
    dec = pat.get("deconvolution")
    if isinstance(dec, dict) and isinstance(dec.get("mtf"), str):
        out["pattern.deconvolution.mtf"] = [res(dec["mtf"])]
    gof = cfg.section("refine").get("gof")
    if isinstance(gof, str) and ":" in gof and gof.rpartition(":")[0].strip().endswith(".py"):
        out["refine.gof"] = [res(gof.rpartition(":")[0].strip())]
    return out


def digests(cfg: C.RunConfig) -> dict[str, list[list[str]]]:
    """{field: [[file name, sha256], ...]}; a missing file is an error naming its field."""
    out = {}
    for fld, paths in input_files(cfg).items():
        rows = []
        for p in paths:
            if not p.is_file():
                raise QcbedInputError(fld, f"file {p} not found", "check the path (relative to the config file's folder)")
            rows.append([p.name, file_digest(p)])
        out[fld] = rows
    return out


def coarse_enabled(cfg: C.RunConfig) -> bool:
    c = cfg.section("coarse")
    return bool(c) and bool(c.get("enabled", True))


def coarse_refines_physics(cfg: C.RunConfig) -> bool:
    """The coarse stage refines the voltage, the cell or Debye-Waller B (``coarse.refine``), which the iam and
    fine stages then use."""
    return coarse_enabled(cfg) and bool(cfg.section("coarse").get("refine"))


@dataclass
class Plan:
    """What one run will compute: its config, folder, and the key of every enabled stage."""

    cfg: C.RunConfig
    run_dir: Path
    keys: dict
    digests: dict
    trace_key: str | None = None  # key of fine_trace.zarr: the fine key without refine.max_iterations
    order: tuple = STAGES  # STAGES_COARSE_PHYSICS when coarse.refine is set

    @property
    def stages(self) -> list[str]:
        return [s for s in self.order if s in self.keys]

    def after(self, stage: str, until: str | None) -> bool:
        """``stage`` comes after ``until`` in this run's order (``until`` None: never)."""
        return until is not None and self.order.index(stage) > self.order.index(until)

    def store(self, stage: str) -> Path:
        return self.run_dir / STORES[stage]


def run_name(cfg: C.RunConfig) -> str:
    """results/<run>: [run] name, else the config's stem (its folder's name for a file called config.toml)."""
    name = cfg.section("run").get("name")
    if name:
        return str(name)
    p = cfg.path
    return p.parent.name if p.stem == "config" else p.stem


def make_plan(cfg: C.RunConfig, results_dir, run_dir=None) -> Plan:
    d = digests(cfg)
    sec = cfg.section
    crystal = {"crystal": sec("crystal"), "crystal_files": d.get("crystal.file")}
    physics = {**crystal, "microscope": sec("microscope"),
               "simulation": {k: v for k, v in sec("simulation").items() if k in _SIM_PHYSICS}}
    full_physics = {**crystal, "microscope": sec("microscope"), "simulation": sec("simulation")}
    load_files = {k: v for k, v in d.items() if k.startswith("pattern.")}
    keys = {}
    # data_source only says where to get the files: not part of what is computed
    pattern = {k: v for k, v in sec("pattern").items() if k != "data_source"}
    keys["load"] = stage_key("load", {"pattern": pattern, "files": load_files})
    keys["roi"] = stage_key("roi", {**crystal, "microscope": sec("microscope"), "geometry": sec("geometry"),
                                    "roi": sec("roi"),
                                    "table": sec("simulation").get("scattering_table", "peng"), "load": keys["load"]})
    keys["variance"] = stage_key("variance", {"detector": sec("pattern").get("detector"), "load": keys["load"]})
    if coarse_enabled(cfg):
        keys["coarse"] = stage_key("coarse", {**full_physics, "coarse": sec("coarse"), "geometry": sec("geometry"),
                                              "disks": sec("roi").get("disks"), "load": keys["load"]})
    iam_parts = {**physics, "reflections": sec("refine").get("reflections"), "disks": sec("roi").get("disks")}
    if coarse_refines_physics(cfg):  # the IAM of the refined voltage, cell and B
        iam_parts["coarse"] = keys["coarse"]
    keys["iam"] = stage_key("iam", iam_parts)
    fine_parts = {**full_physics, "refine": sec("refine"), "refine_files": d.get("refine.gof"),
                  "load": keys["load"], "roi": keys["roi"], "variance": keys["variance"]}
    if "coarse" in keys:
        fine_parts["coarse"] = keys["coarse"]
    trace_key = None
    if sec("refine"):
        keys["fine"] = stage_key("fine", fine_parts)
        # the checkpoints do not depend on the iteration budget (each outer iteration is the same step
        # whatever the limit) nor on the Gauss-Newton polish that follows them: a run given more (or
        # fewer) iterations, or polish steps, continues from them
        budgetless = {**fine_parts, "refine": {k: v for k, v in sec("refine").items()
                                               if k not in ("max_iterations", "gauss_newton_steps")}}
        trace_key = stage_key("fine-trace", budgetless)
        keys["report"] = stage_key("report", {"fine": keys["fine"], "iam": keys["iam"], "coarse": keys.get("coarse")})
    run_dir = Path(results_dir) / run_name(cfg) if run_dir is None else Path(run_dir)
    return Plan(cfg=cfg, run_dir=run_dir, keys=keys, digests=d, trace_key=trace_key,
                order=STAGES_COARSE_PHYSICS if coarse_refines_physics(cfg) else STAGES)


# ------------------------------------------------------------------------------ store keys
class CorruptStore(QcbedInputError):
    pass


def read_key(store: Path) -> str | None:
    """The ``stage_key`` recorded in a store's metadata (None when there is no store).

    Reads only ``zarr.json`` (or ``report/record.json``).  Unreadable metadata raises CorruptStore."""
    store = Path(store)
    meta = store / ("record.json" if store.suffix != ".zarr" else "zarr.json")
    if not store.exists():
        return None
    try:
        d = json.loads(meta.read_text())
        attrs = d.get("attributes", d)
        k = attrs.get("stage_key")
        if not isinstance(k, str):
            raise ValueError("no stage_key")
        return k
    except (OSError, ValueError, AttributeError) as exc:
        raise CorruptStore(str(store), f"unreadable store ({type(exc).__name__}: {exc})",
                           "it is moved aside and recomputed") from None


def set_aside(store: Path) -> Path:
    """Move a corrupted store to a hidden name beside it (never deleted: the user may inspect it)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = store.with_name(f".{store.name}.corrupt-{stamp}-{uuid.uuid4().hex[:4]}")
    os.rename(store, dest)
    return dest


def store_state(plan: Plan, stage: str) -> str:
    """'done' (store with this key), 'stale' (store of other inputs), 'corrupt', or 'pending'."""
    try:
        k = read_key(plan.store(stage))
    except CorruptStore:
        return "corrupt"
    if k is None:
        return "pending"
    return "done" if k == plan.keys[stage] else "stale"


def _with_key(ds: xr.Dataset, plan: Plan, stage: str, section=None) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs.update({"stage": stage, "stage_key": plan.keys[stage], "qcbed_version": __version__,
                     "config_file": str(plan.cfg.path), "created": _now()})
    if section is not None:
        ds.attrs["config_section"] = canonical(section)
    return ds


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ lock
class RunLock:
    """An exclusive lock on a run folder (``flock`` on ``<run>/.lock``: released by the kernel when
    the holder dies, so a killed run never leaves a stale lock)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd = None

    def __enter__(self):
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QcbedInputError(str(self.run_dir), f"cannot create the results folder: {exc.strerror}") from None
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise QcbedInputError(str(self.run_dir), f"is in use by a running qcbed ({holder})",
                                  "wait for it to finish (qcbed status shows its progress) or give another --results") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {_now()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False


def is_locked(run_dir: Path) -> str | None:
    """The holder's description when a live process holds the run's lock, else None."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "running"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ run record
def dependency_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "scipy", "xarray", "zarr", "dask", "distributed", "prefect", "gemmi"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_run_record(plan: Plan, command: list[str] | None = None, extra: dict | None = None) -> Path:
    """``<run>/run.json``: the config (text, path, parsed), input digests, stage keys, versions, command."""
    cfg = plan.cfg
    text = getattr(cfg, "text", None)  # a config rebuilt from a run record carries its stored text
    if text is None:
        try:
            text = cfg.path.read_text()
        except OSError:
            text = None
    rec = {
        "qcbed_version": __version__, "config_path": str(cfg.path), "config_text": text,
        "config": json.loads(canonical(cfg.data)), "input_digests": plan.digests, "stage_keys": plan.keys,
        "versions": dependency_versions(), "command": command or sys.argv, "cwd": os.getcwd(), "written": _now(),
    }
    if extra:
        rec.update(extra)
    path = plan.run_dir / RUN_RECORD
    atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the stages
def _model(cfg):
    return C.forward_model(cfg)


def compute_load(plan: Plan) -> xr.Dataset:
    from .load import load_pattern

    return load_pattern(plan.cfg.section("pattern"), plan.cfg.base_dir)


def compute_roi(plan: Plan) -> xr.Dataset:
    from .roi import build_roi, regions_from_config

    cfg = plan.cfg
    pattern = open_store(plan.store("load"))
    model = _model(cfg)
    pg = C.pattern_geometry(cfg, model)
    regions, padding = regions_from_config(cfg.section("roi"))
    return build_roi(pattern, pg, regions, C.roi_disks(cfg, pattern), padding, cfg.section("roi").get("disk_mask"))


def compute_iam(plan: Plan) -> xr.Dataset:
    from .coarse import with_refined_physics
    from .iam import iam_dataset

    cfg = plan.cfg
    extra = [r["hkl"] for r in cfg.section("refine").get("reflections", []) if isinstance(r, dict) and "hkl" in r]
    extra += list(cfg.section("roi").get("disks", []))
    extra = [h for h in extra if any(int(x) for x in h)]
    return iam_dataset(with_refined_physics(_model(cfg), refined_physics(plan)), extra_hkl=extra or None)


def refined_physics(plan: Plan) -> dict:
    """What the run's coarse stage refined and the later stages use (``refined_model`` of coarse.zarr: any of
    ``hv_kV``, ``cell``, ``b_iso_A2``); {} without coarse.refine."""
    if not coarse_refines_physics(plan.cfg) or "coarse" not in plan.keys:
        return {}
    return json.loads(open_store(plan.store("coarse")).attrs.get("refined_model", "{}") or "{}")


def compute_variance(plan: Plan) -> xr.Dataset:
    from .physics.noise import DetectorModel
    from .variance import variance_dataset

    pat = plan.cfg.section("pattern")
    det = DetectorModel.from_mapping(pat["detector"], "pattern.detector") if "detector" in pat else None
    return variance_dataset(open_store(plan.store("load")), det)


def compute_coarse(plan: Plan) -> xr.Dataset:
    """Thickness and orientation; then (``fit_gl``, ``align_disks``) gl and per-disk alignment on the same field;
    then (``refine``) the fits that re-solve, voltage or cell, then B, each from the last result, with gl
    again after them; last, thickness and orientation on the final field.  The store records every step,
    the refined quantities (``physics``: value, standard error, start, range) and the model the later
    stages use (``refined_model``)."""
    from .coarse import SIGMA_UNDEFINED, coarse_disk_shifts, coarse_gl, coarse_orientation_thickness

    cfg = plan.cfg
    c = cfg.section("coarse")
    pattern = open_store(plan.store("load"))
    model, probe = sized_model(plan, "coarse")
    phys = C.coarse_physics(cfg, model.crystal)
    if phys.needs_holz and probe.get("laue_zones") != "holz":
        raise QcbedInputError("coarse.refine", f"{' and '.join(x for x in phys.refine if x != 'B')} is measured by the "
                              "HOLZ lines, and the beam probe chose the zero-order Laue zone only (simulation.laue_zones "
                              f"= \"auto\": the HOLZ model differs by {100 * (probe.get('holz_difference') or 0):.2f} % "
                              "of a disk's maximum, below beam_accuracy)", C._HOLZ_FIX)
    pg = C.pattern_geometry(cfg, model)
    t0 = C.thickness_of(cfg)
    disks = np.array(c["disks"], int) if "disks" in c else C.roi_disks(cfg, pattern)
    bracket = c.get("thickness_bracket_A", [0.8 * t0, 1.2 * t0])
    box = float(c.get("box_px", 10.0))
    psf = None
    r = cfg.section("refine")
    if pg.kind == "larbed" and (r.get("psf_sigma") or r.get("psf_gamma")):
        psf = (float(r.get("psf_sigma", 0.0)), float(r.get("psf_gamma", 0.0)))
    search, step, radius = float(c.get("search_px", 5.0)), float(c.get("step_px", 1.0)), c.get("radius_px")
    background = str(c.get("background", "per_disk"))
    kw = dict(radius_px=radius, background=background, psf_px=psf)
    res = coarse_orientation_thickness(model, pg, pattern, disks, box, search, bracket, step, **kw)
    steps = {"orientation_thickness": _coarse_summary(res)}
    fit_gl, align = bool(c.get("fit_gl", False)), bool(c.get("align_disks", False))

    def gl_round(res, name):
        res = coarse_gl(res.model, res.geometry, pattern, disks, box, search, res.thickness_A, c.get("gl_bracket_px"),
                        step, field=res.field, **kw)
        steps[name] = _coarse_summary(res)
        return res

    if fit_gl or align:
        # two rounds of gl, then per-disk alignment, at the current thickness (all on the one solved field:
        # nothing re-solves)
        for rnd in (1, 2):
            if fit_gl:
                res = gl_round(res, f"gl_{rnd}")
            if align:
                res = coarse_disk_shifts(res, pattern, max_shift_px=float(c.get("max_disk_shift_px", 3.0)),
                                         radius_px=radius, psf_px=psf)
                steps[f"disk_alignment_{rnd}"] = _coarse_summary(res)
    rows, refined = [], {}
    if phys.refine:
        res, rows, refined = _coarse_physics_fits(res, pattern, disks, box, search, step, phys, steps, kw)
        if fit_gl:  # the tilt per pixel follows the voltage and the cell
            res = gl_round(res, "gl_after_physics")
    if fit_gl or align or phys.refine:
        res = coarse_orientation_thickness(res.model, res.geometry, pattern, disks, box, search, bracket, step,
                                           field=res.field, **kw)
        steps["orientation_thickness_final"] = _coarse_summary(res)
    d = res.as_dict()
    scan = d["scan"]
    attrs = {"thickness_A": float(res.thickness_A), "thickness_start_A": float(t0),
             "thickness_bracket_A": [float(x) for x in bracket], "ncc": float(res.ncc), "shift_px": list(res.shift_px),
             "geometry": json.dumps(res.geometry.as_dict()), "at_edge": int(res.at_edge),
             "at_bound": int(res.at_bound), "counters": json.dumps(_coarse_counters(steps, res)),
             "steps": json.dumps(steps), "beam_probe": json.dumps(probe),
             "physics": json.dumps(rows), "refined_model": json.dumps(refined)}
    if rows:
        attrs["physics_sigma_definition"] = SIGMA_UNDEFINED
        attrs["holz_lines"] = int(bool(cfg.section("simulation").get("holz_lines", False)))
    ds = xr.Dataset(
        {"ncc_per_disk": (("disk",), np.asarray(res.ncc_per_disk, float), {"long_name": "zero-mean NCC per disk"}),
         "scan_ncc": (("scan",), np.asarray(scan.get("ncc", []), float), {"long_name": "joint NCC of the thickness scan"})},
        coords={"h": ("disk", res.disks[:, 0]), "k": ("disk", res.disks[:, 1]), "l": ("disk", res.disks[:, 2]),
                "scan_thickness_A": ("scan", np.asarray(scan.get("thickness_A", []), float), {"units": "Å"})},
        attrs=attrs)
    return ds


def _coarse_counters(steps: dict, res) -> dict:
    """The last step's counters, with ``eigen_solves`` and ``wall_s`` summed over every step of the stage."""
    out = dict(res.counters)
    out["eigen_solves"] = int(sum(st.get("eigen_solves", 0) for st in steps.values()))
    out["wall_s"] = float(sum(st.get("wall_s", 0.0) for st in steps.values()))
    return out


def _coarse_physics_fits(res, pattern, disks, box, search, step, phys, steps, kw):
    """The fits of ``coarse.refine`` in order (C.COARSE_REFINE), each from the previous result, with standard
    errors.  Returns (last result, rows for the store and the report, the refined model for later stages)."""
    from .coarse import coarse_cell, coarse_debye_waller, coarse_voltage

    rows, refined = [], {}

    def row(name, quantity, label, units, value, sigma, start, rng, **extra):
        lo, hi = (float(x) for x in rng)
        end = None
        if value - lo <= 0.01 * (hi - lo):
            end = "lower"
        elif hi - value <= 0.01 * (hi - lo):
            end = "upper"
        rows.append({"name": name, "quantity": quantity, "label": label, "units": units, "value": float(value),
                     "sigma": None if sigma is None or not np.isfinite(sigma) else float(sigma),
                     "start": float(start), "range": [lo, hi], "at_range_end": end, **extra})

    for q in phys.refine:
        model = res.model
        if q == "voltage":
            res = coarse_voltage(model, res.geometry, pattern, disks, box, search, res.thickness_A, phys.hv_range_kV,
                                 step, uncertainty=True, **kw)
            row("hv_kV", "voltage", "accelerating voltage", "kV", res.params["hv_kV"], res.params["sigma"]["hv_kV"],
                model.hv_kV, phys.hv_range_kV)
            refined["hv_kV"] = float(res.model.hv_kV)
        elif q == "cell":
            res = coarse_cell(model, res.geometry, pattern, disks, box, search, res.thickness_A, phys.cell_rel, step,
                              uncertainty=True, **kw)
            for n in phys.cell_free:
                v0 = model.crystal.cell["abc".index(n)]
                row(f"{n}_A", "cell", f"lattice parameter {n} ({phys.crystal_system})", "Å", res.params[f"{n}_A"],
                    res.params["sigma"][f"{n}_A"], v0, (v0 * (1 - phys.cell_rel), v0 * (1 + phys.cell_rel)))
            refined["cell"] = [float(x) for x in res.model.crystal.cell]
        elif q == "B":
            res = coarse_debye_waller(model, res.geometry, pattern, disks, box, search, res.thickness_A,
                                      list(phys.sites), [list(b) for b in phys.b_ranges_A2], step, uncertainty=True, **kw)
            refined["b_iso_A2"] = []
            for i, lab, rng in zip(phys.sites, phys.site_labels, phys.b_ranges_A2):
                b = float(res.model.crystal.sites[i].b_iso)
                row(f"B_{lab}", "B", f"Debye-Waller B of site {lab} ({i})", "Å^2", b, res.params["sigma"][f"B_{lab}"],
                    model.crystal.sites[i].b_iso, rng, site=lab, site_index=int(i))
                refined["b_iso_A2"].append({"site_index": int(i), "label": lab, "b_iso_A2": b})
        steps[q] = _coarse_summary(res)  # its params hold the standard errors and their details
    return res, rows, refined


def _coarse_summary(res) -> dict:
    """One coarse step's outcome for the store's ``steps`` attribute (JSON)."""
    return {"thickness_A": float(res.thickness_A), "ncc": float(res.ncc), "gl_px": float(res.geometry.gl_px),
            "ncc_per_disk": [float(x) for x in res.ncc_per_disk], "params": res.as_dict()["params"],
            "eigen_solves": int(res.counters.get("eigen_solves", 0)), "wall_s": float(res.counters.get("wall_s", 0.0))}


def _geometry_from_json(model, text: str):
    from .physics.pattern_geometry import PatternGeometry

    g = json.loads(text)
    ds = {tuple(int(x) for x in k.split()): tuple(v) for k, v in g.pop("disk_shift_px", {}).items()}
    return PatternGeometry(model.geometry, g.pop("kind"), disk_shift_px=ds, **{k: (tuple(v) if isinstance(v, list) else v)
                                                                               for k, v in g.items()})


def probe_thicknesses_A(cfg: C.RunConfig) -> np.ndarray:
    """Thicknesses [Å] at which the beam probe checks its accuracy: the coarse thickness bracket when
    there is a coarse stage, else the start thickness ± 10 %."""
    t0 = C.thickness_of(cfg)
    lo, hi = 0.9 * t0, 1.1 * t0
    if coarse_enabled(cfg):
        lo, hi = (float(x) for x in cfg.section("coarse").get("thickness_bracket_A", [0.8 * t0, 1.2 * t0]))
    return np.linspace(lo, hi, 5)


def sized_model(plan: Plan, stage: str):
    """(model, probe record): the run's forward model with the beam selection of the convergence probe
    (stages/physics/beam_probe.py) for the ROI's tilts and disks, at ``simulation.beam_accuracy``; a
    configured ``simulation.sg_strong`` is kept and only measured.  The fine stage takes the coarse
    stage's probe from coarse.zarr (the same inputs give the same selection; its key includes
    coarse's)."""
    from dataclasses import replace

    from .physics.beam_probe import DEFAULT_ACCURACY, probe_selection

    cfg = plan.cfg
    model = _model(cfg)
    if stage == "fine" and "coarse" in plan.keys:
        rec = open_store(plan.store("coarse")).attrs.get("beam_probe")
        if rec:
            probe = json.loads(rec)
            model.selection = replace(model.selection, sg_strong=float(probe["sg_strong"]),
                                      holz=probe.get("laue_zones", "zolz") == "holz")
            return model, probe
    roi = open_store(plan.store("roi"))
    disks = np.stack([roi.h.values, roi.k.values, roi.l.values], 1).astype(int)
    s = cfg.section("simulation")
    res = probe_selection(model, roi.kt.values, disks, probe_thicknesses_A(cfg),
                          float(s.get("beam_accuracy", DEFAULT_ACCURACY)), fixed="sg_strong" in s,
                          laue_zones=C.laue_zones_of(cfg))
    model.selection = res.selection
    probe = res.as_dict()
    if not res.met:
        which = (f"the configured simulation.sg_strong = {res.selection.sg_strong}" if "sg_strong" in s else
                 f"the largest beam set tried (sg_strong {res.selection.sg_strong})")
        _say(f"[{plan.run_dir.name}] {stage}: beam probe: {which} is {100 * res.error:.2f} % of a disk's maximum from "
             f"the reference, above the target {100 * res.accuracy:.2f} % (simulation.beam_accuracy); the run goes on "
             f"with it")
    return model, probe


def fine_problem(plan: Plan):
    """The FineProblem of a run, built from its stores (pattern, roi, variance, coarse): the forward model
    with the coarse stage's voltage, cell and B when it refined them (coarse.zarr ``refined_model``)."""
    from .coarse import with_refined_physics

    cfg = plan.cfg
    pattern = open_store(plan.store("load"))
    roi = open_store(plan.store("roi"))
    model, probe = sized_model(plan, "fine")
    model = with_refined_physics(model, refined_physics(plan))  # the coarse stage's voltage, cell, B
    pg = C.pattern_geometry(cfg, model)
    coarse = None
    if "coarse" in plan.keys:
        coarse = open_store(plan.store("coarse"))
        pg = _geometry_from_json(model, coarse.attrs["geometry"])
    problem = C.fine_problem(cfg, model, pg, pattern, roi)
    if coarse is not None:
        problem.thickness0 = float(coarse.attrs["thickness_A"])
    if getattr(problem.gof, "uses_variance", False):
        var = open_store(plan.store("variance")).variance
        pattern = pattern.assign(variance=(var.dims, var.values, var.attrs))
        problem = C.fine_problem(cfg, model, pg, pattern, roi)
        if coarse is not None:
            problem.thickness0 = float(coarse.attrs["thickness_A"])
    problem.beam_probe = probe
    return problem


class TraceStore:
    """``fine_trace.zarr``: one row per outer iteration, appended; a commit counter in the root attrs
    is written after every row, and rows past it (torn by a kill mid-append) are dropped on open
    (../shared/research/stack.md §3)."""

    CHUNK = 64

    def __init__(self, path: Path):
        self.path = Path(path)

    def open(self, key: str):
        """The committed rows as a dict, or None (absent, other key: then removed)."""
        import zarr

        if not self.path.exists():
            return None
        try:
            g = zarr.open_group(str(self.path), mode="r+")
            if g.attrs.get("stage_key") != key:
                raise KeyError("other key")
            n = int(g.attrs.get("n_committed", 0))
            out = {"attrs": dict(g.attrs)}
            for name, a in g.arrays():
                if a.shape[0] != n:
                    a.resize((n,) + a.shape[1:])
                out[name] = a[:]
        except Exception:  # noqa: BLE001  -- unreadable or of other inputs: start over
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        return out if n > 0 else None

    def create(self, key: str, names: list[str], n_vertices: int, n_params: int, attrs: dict,
               extra: dict | None = None) -> None:
        """``extra``: more per-row arrays, {name: trailing shape} (float64), e.g. the Levenberg-Marquardt
        geometry and damping."""
        import zarr

        parent = self.path.parent
        for junk in parent.glob(f".{self.path.name}.tmp-*"):
            shutil.rmtree(junk, ignore_errors=True)
        tmp = parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        g = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        c = self.CHUNK
        for name, shape, dt in (("iteration", (0,), "i8"), ("gof", (0,), "f8"), ("wall_s", (0,), "f8"),
                                ("eigen_solves", (0,), "i8"), ("best", (0, n_params), "f8"),
                                ("simplex", (0, n_vertices, n_params), "f8"), ("fsim", (0, n_vertices), "f8")):
            g.create_array(name, shape=shape, chunks=(c,) + shape[1:], dtype=dt)
        for name, tail in (extra or {}).items():
            shape = (0,) + tuple(tail)
            g.create_array(name, shape=shape, chunks=(c,) + shape[1:], dtype="f8")
        g.attrs.update({"stage_key": key, "names": names, "n_committed": 0, **attrs})
        replace_dir(tmp, self.path)

    def append(self, row: dict) -> None:
        import zarr

        g = zarr.open_group(str(self.path), mode="r+")
        n = int(g.attrs["n_committed"])
        for name, v in row.items():
            a = g[name]
            v = np.asarray(v)[None]
            if a.shape[0] != n:  # torn row of an earlier kill
                a.resize((n,) + a.shape[1:])
            a.append(v)
        g.attrs["n_committed"] = n + 1


def run_fine(plan: Plan, say=_say) -> dict:
    """Fine refinement with a checkpoint per outer iteration; resumes from ``fine_trace.zarr``."""
    from .fine import refine

    cfg = plan.cfg
    key = plan.trace_key or plan.keys["fine"]
    problem = fine_problem(plan)
    r = cfg.section("refine")
    if fine_optimizer(r, problem.gof) == "levenberg-marquardt":
        return _run_fine_lm(plan, problem, key, say)
    trace = TraceStore(plan.run_dir / TRACE)
    names = [p.label for p in problem.sf]
    nv = len(names) + 1
    prev = trace.open(key)
    prefix = f"[{plan.run_dir.name}] fine"
    kw = {}
    t_wall = time.perf_counter()
    if prev is not None:
        kw = {"start_simplex": prev["simplex"][-1], "start_fsim": prev["fsim"][-1],
              "start_iteration": int(prev["iteration"][-1]), "gof_start": float(prev["attrs"]["gof_start"])}
        say(f"{prefix}: resuming after iteration {kw['start_iteration']} ({problem.gof.name} {prev['gof'][-1]:.6g})")
    else:
        say(f"{prefix}: {len(problem.sf)} structure factors, geometry {', '.join(problem.geometry_names)}; "
            f"{problem.gof.name}")

    state = {"created": prev is not None}

    def started(gof0):
        if not state["created"]:
            trace.create(key, names, nv, len(names), {"gof_start": gof0, "gof_name": problem.gof.name})
            state["created"] = True
            say(f"{prefix}: start {problem.gof.name} {gof0:.6g} (thickness {problem.thickness0:.1f} Å)")

    def checkpoint(it, simplex, fsim, best):
        trace.append({"iteration": it, "gof": float(fsim[0]), "wall_s": time.perf_counter() - t_wall,
                      "eigen_solves": problem.counters["eigen_solves"], "best": np.asarray(best, float),
                      "simplex": np.asarray(simplex, float), "fsim": np.asarray(fsim, float)})
        vals = " ".join(f"{n}={v:.6g}" for n, v in zip(names, best))
        say(f"{prefix}: iteration {it:4d}  {problem.gof.name} {fsim[0]:.6g}  {vals}")

    def polished(k, gof, kept, ratio, values, g):
        vals = " ".join(f"{n}={v:.6g}" for n, v in zip(names, values))
        say(f"{prefix}: Gauss-Newton step {k}: {problem.gof.name} {gof:.6g}"
            f"{'' if kept else ' (not lowered: stop)'}, undamped step {ratio:.3g} sigma  {vals}")

    res = refine(problem, max_iterations=int(r.get("max_iterations", 200)), xatol=float(r.get("xatol", 1e-4)),
                 initial_step=float(r.get("initial_step", 0.1)), callback=checkpoint, on_start=started,
                 gauss_newton_steps=int(r.get("gauss_newton_steps", 0)), on_gauss_newton=polished, **kw)
    full = trace.open(key)
    ds = fine_dataset(problem, res, full, resumed_from=kw.get("start_iteration"))
    write_store(_with_key(ds, plan, "fine", r), plan.store("fine"))
    say(f"{prefix}: {problem.gof.name} {res.gof_start:.6g} -> {res.gof:.6g}, "
        f"mean ZNCC {res.zncc_mean_start:.5f} -> {res.zncc_mean:.5f}, "
        f"{'converged' if res.converged else 'not converged'} after {res.counters['outer_iterations']} iterations"
        + (f" and {res.counters['gauss_newton_steps']} Gauss-Newton steps" if res.counters.get("gauss_newton_steps") else ""))
    return {"resumed_from": kw.get("start_iteration")}


#: refine.optimizer when the config does not name one (README: the evidence for the choice)
DEFAULT_OPTIMIZER = "levenberg-marquardt"


def fine_optimizer(r: dict, gof) -> str:
    """The fine stage's optimizer: refine.optimizer, default :data:`DEFAULT_OPTIMIZER`; Nelder-Mead for a
    metric without residuals (a value-only metric in the seed's ``__call__(sim, exp)`` form,
    ``residuals_defined`` False), where Levenberg-Marquardt and Gauss-Newton steps have nothing to fit:
    naming them is an error rather than a run that never moves."""
    opt = r.get("optimizer")
    if getattr(gof, "residuals_defined", True):
        return opt or DEFAULT_OPTIMIZER
    what = f"the metric {type(gof).__name__} gives only a value (the seed's __call__(sim, exp) form), no residuals"
    if opt == "levenberg-marquardt":
        raise QcbedInputError("refine.optimizer", f"Levenberg-Marquardt needs residuals; {what}",
                              'use optimizer = "nelder-mead" (the default for such a metric), or give the metric a fit() '
                              "that returns residuals (stages.physics.gof.weighted_fit)")
    if int(r.get("gauss_newton_steps", 0) or 0) > 0:
        raise QcbedInputError("refine.gauss_newton_steps", f"Gauss-Newton steps need residuals; {what}",
                              "set gauss_newton_steps = 0")
    return "nelder-mead"


def _run_fine_lm(plan: Plan, problem, key: str, say=_say) -> dict:
    """Levenberg-Marquardt fine refinement (stages.fine.levenberg_marquardt): a checkpoint row per step
    (values, geometry, damping), resumed exactly from the last committed row."""
    from .fine import levenberg_marquardt

    r = plan.cfg.section("refine")
    trace = TraceStore(plan.run_dir / TRACE)
    names = [p.label for p in problem.sf]
    gnames = problem.geometry_names
    prev = trace.open(key)
    prefix = f"[{plan.run_dir.name}] fine"
    t_wall = time.perf_counter()
    state, gof_start = None, None
    if prev is not None:
        state = {"step": int(prev["iteration"][-1]), "values": prev["best"][-1], "lam": float(prev["lam"][-1]),
                 "geometry": dict(zip(gnames, prev["geometry"][-1].tolist())), "accepted": int(prev["accepted"][-1])}
        # the fine stage's own counters (eigen-solves, steps) restart in this process
        gof_start = float(prev["attrs"]["gof_start"])
        say(f"{prefix}: resuming after Levenberg-Marquardt step {state['step']} ({problem.gof.name} {prev['gof'][-1]:.6g})")
    else:
        say(f"{prefix}: {len(problem.sf)} structure factors, geometry {', '.join(gnames)}; {problem.gof.name}; "
            f"Levenberg-Marquardt")
    created = {"done": prev is not None}

    def started(gof0):
        if not created["done"]:
            trace.create(key, names, 1, len(names), {"gof_start": gof0, "gof_name": problem.gof.name,
                                                      "optimizer": "levenberg-marquardt", "geometry_names": gnames},
                         extra={"geometry": (max(len(gnames), 1),), "lam": (), "accepted": ()})
            created["done"] = True
            say(f"{prefix}: start {problem.gof.name} {gof0:.6g} (thickness {problem.thickness0:.1f} Å)")

    def checkpoint(k, v, g, lam, f, n_acc):
        trace.append({"iteration": k, "gof": f, "wall_s": time.perf_counter() - t_wall,
                      "eigen_solves": problem.counters["eigen_solves"], "best": np.asarray(v, float),
                      "simplex": np.asarray(v, float)[None], "fsim": np.array([f]),
                      "geometry": np.array([g[n] for n in gnames] or [0.0], float), "lam": lam, "accepted": n_acc})
        vals = " ".join(f"{n}={x:.6g}" for n, x in zip(names, v))
        say(f"{prefix}: step {k:3d}  {problem.gof.name} {f:.6g}  lambda {lam:.1e}  {vals}")

    all_names = names + list(gnames)

    def proposal(k, step_sigma):
        ratios = " ".join(f"{n}={x:+.2g}" for n, x in zip(all_names, step_sigma))
        say(f"{prefix}: Gauss-Newton step / sigma before step {k + 1}: {ratios}")

    res = levenberg_marquardt(problem, max_steps=int(r.get("max_iterations", 200)), callback=checkpoint,
                              on_start=started, state=state, gof_start=gof_start, on_proposal=proposal)
    full = trace.open(key)
    resumed = None if state is None else state["step"]
    ds = fine_dataset(problem, res, full, resumed_from=resumed)
    write_store(_with_key(ds, plan, "fine", r), plan.store("fine"))
    c = res.counters
    say(f"{prefix}: {problem.gof.name} {res.gof_start:.6g} -> {res.gof:.6g}, mean ZNCC {res.zncc_mean_start:.5f} -> "
        f"{res.zncc_mean:.5f}, {'converged' if res.converged else 'not converged'} after {c['lm_steps']} "
        f"Levenberg-Marquardt steps ({c['lm_accepted']} kept), {c['eigen_solves']} eigen-solves")
    return {"resumed_from": resumed}


def _float_or_nan(v) -> float:
    return float("nan") if v is None else float(v)


def fine_dataset(problem, res, trace: dict | None, resumed_from=None) -> xr.Dataset:
    """fine.zarr: refined values ± sigma, correlations, fit statistics, geometry, trace, counters, and the
    ZNCC per disk at the start and at the optimum (``zncc_start``, ``zncc``; their means in the attrs)."""
    from .fine import SAMPLING_SIGMA_LIMIT_PX, ZNCC_DEFINITION, zncc_mean

    names = list(res.names)
    start_sf = [p.x0 for p in problem.sf]
    g0 = getattr(problem, "initial_geometry", None) or problem.geometry_start()
    start = np.array(start_sf + [g0[n] for n in problem.geometry_names], float)
    kind = ["structure_factor"] * len(problem.sf) + ["geometry"] * len(problem.geometry_names)
    range_lo, range_hi = problem.search_ranges()
    gn_step = np.asarray(getattr(res, "gauss_newton_step", ()), float)
    if gn_step.shape != (len(names),):
        gn_step = np.full(len(names), np.nan)
    units = ["Å^-2" if not p.component.endswith("phase") else "deg" for p in problem.sf]
    units += ["Å" if n == "thickness" else "deg" if n == "rotation" else "px" for n in problem.geometry_names]
    data = {
        "value": (("param",), np.asarray(res.values, float)),
        "sigma": (("param",), np.asarray(res.sigma, float), {"long_name": "standard error (NaN: undefined, see the "
                                                                          "sigma_method attribute)"}),
        "start": (("param",), start),
        "range_lo": (("param",), range_lo, {"long_name": "lower end of the search range (structure factors: the "
                                                         "configured range; geometry: the inner search box)"}),
        "range_hi": (("param",), range_hi, {"long_name": "upper end of the search range"}),
        "gauss_newton_step": (("param",), gn_step, {"long_name": "Gauss-Newton step -(J^T J)^-1 J^T r from the "
                                                             "refined point (linearised distance to the optimum)"}),
        "correlation": (("param", "param2"), np.nan_to_num(np.asarray(res.correlation, float), nan=0.0)),
        "background": (("disk",), np.broadcast_to(np.asarray(res.background, float), (len(problem.disks),)).copy(),
                       {"long_name": "fitted background per disk (one value repeated for single-background metrics)",
                        "units": "counts"}),
    }
    d = problem.disks
    inner = np.nonzero(problem.inner_mask)[0]
    roi = problem.roi
    coords = {"param": names, "param2": names, "kind": ("param", kind), "units": ("param", units),
              "h": ("disk", d[:, 0]), "k": ("disk", d[:, 1]), "l": ("disk", d[:, 2]),
              "point": inner, "x": ("point", roi.x.values[inner], {"units": "display px"}),
              "y": ("point", roi.y.values[inner], {"units": "display px"}),
              "i": ("point", roi.i.values[inner]), "j": ("point", roi.j.values[inner]),
              "region": ("point", roi.region.values[inner])}
    fa = res.fit
    if fa:
        data["fit_exp"] = (("disk", "point"), fa["exp"], {"long_name": "experimental samples at the refined geometry",
                                                          "units": "counts"})
        data["fit_sim"] = (("disk", "point"), fa["sim"], {"long_name": "simulated intensity (fraction of the incident "
                                                          "beam, PSF applied)"})
        data["fit_model"] = (("disk", "point"), fa["model"], {"long_name": "scale * simulated + background, NaN where "
                                                              "not used", "units": "counts"})
        data["fit_residual"] = (("disk", "point"), fa["residual"], {"long_name": "normalised residual (model - exp) / "
                                                                    "sigma, 0 where not used"})
        data["fit_used"] = (("disk", "point"), fa["used"], {"long_name": "sample used by the metric"})
    zn, zn0 = np.asarray(getattr(res, "zncc", ()), float), np.asarray(getattr(res, "zncc_start", ()), float)
    has_zncc = zn.shape == zn0.shape == (len(d),)
    if has_zncc:
        data["zncc_start"] = (("disk",), zn0, {"long_name": "zero-mean normalised cross-correlation of experiment and "
                                                            "simulation at the start (start structure factors, their "
                                                            "inner geometry optimum)", "definition": ZNCC_DEFINITION})
        data["zncc"] = (("disk",), zn, {"long_name": "zero-mean normalised cross-correlation of experiment and "
                                                     "simulation at the optimum (the fit_* arrays)",
                                        "definition": ZNCC_DEFINITION})
    if trace is not None:
        data["trace_gof"] = (("iteration",), np.asarray(trace["gof"], float))
        data["trace_values"] = (("iteration", "sf_param"), np.asarray(trace["best"], float))
        data["trace_wall_s"] = (("iteration",), np.asarray(trace["wall_s"], float))
        coords["iteration"] = np.asarray(trace["iteration"], int)
        coords["sf_param"] = [p.label for p in problem.sf]
    ds = xr.Dataset(data, coords=coords)
    geo = {k: (float(v) if np.isscalar(v) else v) for k, v in res.geometry.items()}
    ds.attrs.update({
        "gof_name": problem.gof.name, "gof": float(res.gof), "gof_start": float(res.gof_start), "scale": float(res.scale),
        "n_points": int(res.n_points), "dof": int(res.dof), "converged": int(res.converged),
        "sigma_method": str(res.sigma_info.get("method", "")), "sigma_defined": int(bool(res.sigma_info.get("defined"))),
        "dof_effective": _float_or_nan(res.sigma_info.get("dof_effective")),
        "chi2_effective": _float_or_nan(res.sigma_info.get("chi2_effective")),
        "barely_determined": json.dumps(res.sigma_info.get("barely_determined") or {}),
        "barely_determined_limit_px": float(SAMPLING_SIGMA_LIMIT_PX),
        "geometry": json.dumps(geo), "pattern_geometry": json.dumps(problem._pg(res.geometry).as_dict()),
        "counters": json.dumps(res.counters), "resumed_from_iteration": -1 if resumed_from is None else int(resumed_from),
        "disks": json.dumps(problem.disks.tolist()),
        "beams": json.dumps(problem.beam_summary()),
        "beam_probe": json.dumps(getattr(problem, "beam_probe", None) or {}),
        # the forward model's voltage and crystal (with a coarse.refine, the coarse stage's values)
        "hv_kV": float(problem.model.hv_kV), "crystal": json.dumps(problem.model.crystal.summary()),
    })
    if has_zncc:
        ds.attrs.update({"zncc_mean_start": zncc_mean(zn0), "zncc_mean": zncc_mean(zn)})
    return ds


def compute_report(plan: Plan) -> Path:
    from .report import write_report

    return write_report(plan.run_dir, key=plan.keys["report"])


# ------------------------------------------------------------------------------ driver
COMPUTE = {"load": compute_load, "roi": compute_roi, "iam": compute_iam, "variance": compute_variance,
           "coarse": compute_coarse}
SECTION = {"load": "pattern", "roi": "roi", "iam": "simulation", "variance": "pattern", "coarse": "coarse"}


def run_stage(plan: Plan, stage: str, say=_say) -> str:
    """Run one stage unless its store is up to date; returns 'skipped', 'done' or 'resumed'.

    Raises :class:`stages.interrupt.Interrupted` (store not written) when a stop was requested."""
    tag = f"[{plan.run_dir.name}] {stage}"
    check_stop()
    state = store_state(plan, stage)
    if state == "done":
        say(f"{tag}: up to date, skipped")
        return "skipped"
    if state == "corrupt":
        dest = set_aside(plan.store(stage))
        say(f"{tag}: {plan.store(stage)} was unreadable (corrupted); moved to {dest.name}, recomputing")
    t0 = time.perf_counter()
    if stage == "fine":
        info = run_fine(plan, say)
        status = "resumed" if info["resumed_from"] is not None else "done"
    elif stage == "report":
        compute_report(plan)
        status = "done"
    else:
        ds = COMPUTE[stage](plan)
        write_store(_with_key(ds, plan, stage, plan.cfg.section(SECTION[stage])), plan.store(stage))
        status = "done"
    say(f"{tag}: {status} in {time.perf_counter() - t0:.1f} s -> {plan.store(stage)}")
    return status


def run_all(plan: Plan, say=_say, until: str | None = None) -> dict:
    """Every enabled stage in order (plain Python, no Prefect): {stage: status}."""
    out = {}
    for s in plan.stages:
        if plan.after(s, until):
            break
        out[s] = run_stage(plan, s, say)
    return out


@contextlib.contextmanager
def locked(plan: Plan):
    with RunLock(plan.run_dir) as lock:
        yield lock


# ------------------------------------------------------------------------------ status
@dataclass
class RunStatus:
    run_dir: Path
    stages: dict = field(default_factory=dict)
    running: str | None = None
    last_iteration: int | None = None
    gof: float | None = None
    gof_name: str | None = None
    note: str = ""


def run_status(run_dir: Path) -> RunStatus:
    """Stages done/stale/pending of a run folder (keys recomputed from its config when it still exists)."""
    import zarr

    run_dir = Path(run_dir)
    st = RunStatus(run_dir, running=is_locked(run_dir))
    rec_path = run_dir / RUN_RECORD
    plan = None
    if rec_path.exists():
        try:
            rec = json.loads(rec_path.read_text())
            cfg = C.RunConfig(Path(rec["config_path"]), tomllib_loads(rec["config_text"]))
            try:
                plan = make_plan(cfg, run_dir.parent, run_dir=run_dir)
            except QcbedInputError as exc:
                st.note = f"inputs changed or missing ({exc}); showing the stored keys"
                plan = Plan(cfg, run_dir, rec.get("stage_keys", {}), {})
        except (OSError, ValueError, KeyError) as exc:
            st.note = f"unreadable {RUN_RECORD}: {exc}"
    for s in STAGES:
        if plan is not None and s in plan.keys:
            st.stages[s] = store_state(plan, s)
        elif (run_dir / STORES[s]).exists():
            st.stages[s] = "present"
    tr = run_dir / TRACE
    if tr.exists():
        try:
            g = zarr.open_group(str(tr), mode="r")
            n = int(g.attrs.get("n_committed", 0))
            if n:
                st.last_iteration = int(g["iteration"][n - 1])
                st.gof = float(g["gof"][n - 1])
                st.gof_name = g.attrs.get("gof_name")
        except Exception:  # noqa: BLE001
            pass
    fine = run_dir / STORES["fine"]
    if st.stages.get("fine") == "done":
        try:
            a = json.loads((fine / "zarr.json").read_text())["attributes"]
            st.gof, st.gof_name = float(a["gof"]), a["gof_name"]
        except (OSError, ValueError, KeyError):
            pass
    return st


def tomllib_loads(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)
