"""The stages of one run, each a pure computation plus its own zarr store, with stage keys.

A run = one config file = one pattern; its stores go to ``results/<run>/`` (../shared/DESIGN.md):

==========  ==========================  ===============================================================
stage       store                       reads (its key: the config fields of :data:`READS`, their files'
                                        digests, the keys of the stores it reads)
==========  ==========================  ===============================================================
load        pattern.zarr                [pattern] and its files
roi         roi.zarr                    [roi], [geometry], [microscope], crystal, pattern.kind; load
iam         structure_factors.zarr      crystal, hv_kV, scattering table, absorption, the h k l of
                                        roi.disks and refine.reflections (+ coarse with coarse.refine)
variance    variance.zarr               pattern.detector; load
coarse      coarse.zarr                 [coarse], crystal, [microscope], [simulation], [geometry],
                                        roi.disks, refine.psf_*; load, roi (the beam probe's tilts)
fine        fine.zarr (+ fine_trace)    [refine], crystal, [microscope], [simulation], [geometry];
                                        load, roi, variance, coarse
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
row.  Every store (and the report folder) carries a manifest of its files' sizes and digests, written
before the rename; a store skipped as done or read by a later stage is checked against it
(:func:`store_check`), and one whose metadata cannot be read or whose files differ is moved aside
(``.NAME.corrupt-*``, never deleted) and recomputed; a store from before manifests is 'unverified' and
still done.  The trace carries a digest per committed row and resumes from its last intact one.  A write
that fails (full disk, no permission, read-only) is one QcbedInputError naming the folder; nothing is
marked done.  :class:`RunLock` keeps a second process off a run folder.
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
from .keys import canonical, dependency_versions, report_stage_key, stage_key
from .store import CorruptStore, file_digest, open_store, replace_dir, set_aside, verify_store, write_store, writing

STAGES = ("load", "roi", "iam", "variance", "coarse", "fine", "report")
#: the order when the coarse stage refines the voltage, cell or B: the IAM structure factors (and the report's
#: V_g and Mott-Bethe F_x, which use the crystal and the voltage of that store) are those of the refined model
STAGES_COARSE_PHYSICS = ("load", "roi", "variance", "coarse", "iam", "fine", "report")
STORES = {"load": "pattern.zarr", "roi": "roi.zarr", "iam": "structure_factors.zarr", "variance": "variance.zarr",
          "coarse": "coarse.zarr", "fine": "fine.zarr", "report": "report"}
TRACE = "fine_trace.zarr"
RUN_RECORD = "run.json"
LOCK = ".lock"


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ keys
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


#: Which stages read each config field, stated once: every stage key is made of exactly the fields listed
#: for it (:func:`stage_config`), the digests of the files those fields name, and its upstream stores' keys
#: (:func:`upstream`), so an edit re-keys the stages that read the field and everything downstream of them,
#: and nothing else.  A ``section`` entry covers the section's keys without an entry of their own; an entry
#: ``section.key.sub`` names stages that read only that part of each table of a list (e.g. the h k l of
#: ``refine.reflections``, which the IAM table lists).  Fields no stage reads (``run.name`` names the
#: results folder; ``pattern.data_source`` says where to fetch missing data) enter no key, so editing them
#: recomputes nothing.  ``coarse`` and the PSF start: the coarse stage matches LARBED disks with the PSF.
READS: dict[str, tuple[str, ...]] = {
    "crystal": ("roi", "iam", "coarse", "fine"),          # the cell (roi: tilt scale) and the structure
    "microscope": ("roi", "coarse", "fine"),              # zone, axes: the pattern geometry
    "microscope.hv_kV": ("roi", "iam", "coarse", "fine"),  # the wavelength; the IAM's relativistic factor
    "simulation": ("coarse", "fine"),                     # thickness, beam selection, solver, beam probe
    "simulation.scattering_table": ("iam", "coarse", "fine"),
    "simulation.absorption": ("iam", "coarse", "fine"),
    "simulation.absorption_fraction": ("iam", "coarse", "fine"),
    "pattern": ("load",),
    "pattern.kind": ("load", "roi", "coarse", "fine"),    # the pattern geometry's kind
    "pattern.detector": ("load", "variance", "fine"),     # deconvolution noise, variance map, metric
    "pattern.data_source": (),
    "geometry": ("roi", "coarse", "fine"),
    "roi": ("roi",),
    "roi.disks": ("roi", "iam", "coarse"),                # the IAM lists them; coarse's default disks
    "refine": ("fine",),
    "refine.reflections.hkl": ("iam",),
    "refine.psf_sigma": ("coarse", "fine"),
    "refine.psf_gamma": ("coarse", "fine"),
    "coarse": ("coarse",),
    "run": (),
}
#: file fields whose value is only a path: they enter a key through their content digest (:func:`digests`),
#: so a data folder moved or a file renamed with the same bytes recomputes nothing
_PATH_FIELDS = ("crystal.file", "pattern.file", "pattern.files", "pattern.variance", "pattern.mask",
                "pattern.hkl_file")
#: fine-stage fields the checkpoints do not depend on (each outer iteration is the same step whatever the
#: limit, and the Gauss-Newton polish follows them): a run given more iterations continues from them
_BUDGET_FIELDS = ("refine.max_iterations", "refine.gauss_newton_steps")


def readers(field_path: str) -> tuple[str, ...]:
    """The stages that read a config field (``section.key``, or a file field of :func:`input_files`), from
    :data:`READS`: its own entry, else its section's.  KeyError for a section the table does not know."""
    if field_path in READS:
        return READS[field_path]
    parts = field_path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in READS:
            return READS[head]
    raise KeyError(field_path)


def _project(value, sub: str):
    """The part ``sub`` of each table of a list (``refine.reflections`` -> their ``hkl``)."""
    if isinstance(value, list):
        return [x.get(sub) if isinstance(x, dict) else None for x in value]
    return value.get(sub) if isinstance(value, dict) else None


def stage_config(data: dict, stage: str) -> dict:
    """{field: value} of every config field ``stage`` reads (:data:`READS`), path-only file fields left to
    their digests."""
    out = {}
    for s, table in data.items():
        if not isinstance(table, dict):
            continue
        for k, v in table.items():
            f = f"{s}.{k}"
            if f in _PATH_FIELDS:
                continue
            if stage in readers(f):
                out[f] = v
                continue
            for sub, stages in READS.items():
                if sub.startswith(f + ".") and stage in stages:
                    out[sub] = _project(v, sub[len(f) + 1:])
    return out


def upstream(cfg: C.RunConfig, stage: str) -> tuple[str, ...]:
    """The stores ``stage`` reads: their keys enter its key (Merkle chain).  coarse reads roi (the beam probe
    runs at the ROI's tilts); iam reads coarse when coarse.refine refines the voltage, cell or B."""
    co = ("coarse",) if coarse_enabled(cfg) else ()
    return {"load": (), "roi": ("load",), "variance": ("load",), "coarse": ("load", "roi"),
            "iam": co if coarse_refines_physics(cfg) else (),
            "fine": ("load", "roi", "variance") + co, "report": ("fine", "iam") + co}[stage]


def _key_parts(cfg: C.RunConfig, d: dict, stage: str, keys: dict) -> dict:
    # a file enters by its bytes; by its name too only in pattern.files, whose names may carry the h k l
    files = {f: (rows if f == "pattern.files" else [sha for _, sha in rows])
             for f, rows in sorted(d.items()) if stage in readers(f)}
    return {"config": stage_config(cfg.data, stage), "files": files, "upstream": {u: keys[u] for u in upstream(cfg, stage)}}


def make_plan(cfg: C.RunConfig, results_dir, run_dir=None) -> Plan:
    """Every enabled stage's key, from the fields it reads (:data:`READS`), the digests of its files and
    its upstream keys; computed before anything runs."""
    d = digests(cfg)
    enabled = [s for s in STAGES_COARSE_PHYSICS if (s != "coarse" or coarse_enabled(cfg))
               and (s not in ("fine", "report") or cfg.section("refine"))]
    keys, trace_key = {}, None
    for s in enabled:  # STAGES_COARSE_PHYSICS: every stage after the stores it reads
        if s == "report":
            keys[s] = report_stage_key(keys["fine"], keys["iam"], keys.get("coarse"))
            continue
        parts = _key_parts(cfg, d, s, keys)
        keys[s] = stage_key(s, parts)
        if s == "fine":
            parts["config"] = {f: v for f, v in parts["config"].items() if f not in _BUDGET_FIELDS}
            trace_key = stage_key("fine-trace", parts)
    run_dir = Path(results_dir) / run_name(cfg) if run_dir is None else Path(run_dir)
    return Plan(cfg=cfg, run_dir=run_dir, keys=keys, digests=d, trace_key=trace_key,
                order=STAGES_COARSE_PHYSICS if coarse_refines_physics(cfg) else STAGES)


# ------------------------------------------------------------------------------ store keys
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


def store_check(plan: Plan, stage: str) -> tuple[str, str]:
    """(state, detail) of a stage's store: ('done', 'verified' | 'unverified'), ('stale', ''),
    ('pending', ''), or ('corrupt', what is damaged).

    A store with this key is checked against its manifest (:func:`stages.store.verify_store`): its
    metadata can be intact while a chunk is garbled, truncated or missing.  'unverified': written
    before qcbed recorded manifests; counted as done (old results are not recomputed)."""
    store = plan.store(stage)
    try:
        k = read_key(store)
    except CorruptStore as exc:
        return "corrupt", exc.problem
    if k is None:
        return "pending", ""
    if k != plan.keys[stage]:
        return "stale", ""
    try:
        return "done", verify_store(store)
    except CorruptStore as exc:
        return "corrupt", exc.problem


def store_state(plan: Plan, stage: str) -> str:
    """'done' (store with this key, intact or unverified), 'stale' (store of other inputs), 'corrupt', or
    'pending'."""
    return store_check(plan, stage)[0]


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
        with writing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        with writing(self.run_dir):
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
        try:
            with writing(self.run_dir):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {_now()}".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
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
    """Write ``text`` to a temporary file beside ``path``, then replace ``path``: a full disk or a
    read-only folder raises one QcbedInputError naming the folder and leaves ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with writing(path.parent, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
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
    pat = cfg.section("pattern")
    if pattern.attrs.get("kind") == "larbed" and "hkl" not in pat:  # h k l read from hkl_file or the file names
        where = "pattern.hkl_file" if "hkl_file" in pat else "pattern.files"
        named = [(f"{where} (image {i}: {n})", h, True) for i, (n, h) in enumerate(zip(
            _image_names(pattern), np.stack([pattern.h.values, pattern.k.values, pattern.l.values], 1).tolist()))]
        for w in C.check_reflections(model.crystal, model.zone, named):
            _say(f"[{plan.run_dir.name}] roi: warning: {w}")
    pg = C.pattern_geometry(cfg, model)
    regions, padding = regions_from_config(cfg.section("roi"))
    return build_roi(pattern, pg, regions, C.roi_disks(cfg, pattern), padding, cfg.section("roi").get("disk_mask"))


def _image_names(pattern: xr.Dataset) -> list[str]:
    """The source file of each LARBED image (pattern.zarr ``files``: one per image), else its index."""
    files, n = list(pattern.attrs.get("files", [])), int(pattern.sizes["disk"])
    return [str(f) for f in files] if len(files) == n else [str(i) for i in range(n)]


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

    t_stage = time.perf_counter()
    cfg = plan.cfg
    c = cfg.section("coarse")
    pattern = open_store(plan.store("load"))
    model, probe = sized_model(plan, "coarse")
    # the beam probe is the stage's first sub-step: its solves and time are the stage's too
    probe_step = {"eigen_solves": int(probe.get("eigen_solves", 0)), "wall_s": float(probe.get("wall_s", 0.0)),
                  "counters": {"eigen_solves": int(probe.get("eigen_solves", 0)),
                               "tilts_solved": int(probe.get("tilts_solved", 0)), "wall_s": float(probe.get("wall_s", 0.0))}}
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
    steps = {"beam_probe": probe_step, "orientation_thickness": _coarse_summary(res)}
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
             "at_bound": int(res.at_bound),
             "counters": json.dumps(_coarse_counters(steps, time.perf_counter() - t_stage)),
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


def _coarse_counters(steps: dict, stage_wall_s: float) -> dict:
    """The stage's counters: every counter summed over every sub-step (beam probe, thickness and orientation,
    gl, disk alignment, the physics fits, the final thickness and orientation), ``wall_s`` the sum of the
    sub-steps' times and ``stage_wall_s`` the whole stage's (with reading the stores); ``by_step`` the
    eigen-solves and time of each.  (A sub-step's own counters start at zero: a sum never counts twice.)"""
    out: dict = {}
    for st in steps.values():
        for k, v in (st.get("counters") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    out["eigen_solves"] = int(sum(st.get("eigen_solves", 0) for st in steps.values()))
    out["wall_s"] = float(sum(st.get("wall_s", 0.0) for st in steps.values()))
    out["stage_wall_s"] = float(stage_wall_s)
    out["by_step"] = {name: {"eigen_solves": int(st.get("eigen_solves", 0)), "wall_s": float(st.get("wall_s", 0.0))}
                      for name, st in steps.items()}
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
            "eigen_solves": int(res.counters.get("eigen_solves", 0)), "wall_s": float(res.counters.get("wall_s", 0.0)),
            "counters": dict(res.counters)}


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
    """``fine_trace.zarr``: one row per outer iteration, appended; a commit counter and a digest of every
    committed row (``n_committed``, ``row_digests``) in the root attrs are written after each row.

    On open, rows past the counter (torn by a kill mid-append) are dropped, and so are the rows from the
    first one that no longer matches its digest or cannot be read (a garbled, truncated or deleted
    chunk): the refinement resumes from the last intact checkpoint (../shared/research/stack.md §3).
    A trace whose metadata is unreadable is moved aside (never deleted) and the refinement starts
    over.  ``say`` gets one line for either."""

    CHUNK = 64

    def __init__(self, path: Path, say=None):
        self.path = Path(path)
        self.say = say or (lambda msg: None)

    def open(self, key: str):
        """The intact committed rows as a dict, or None (absent, other key: then removed; damaged from
        its first row: moved aside)."""
        import zarr

        if not self.path.exists():
            return None
        try:
            g = zarr.open_group(str(self.path), mode="r+")
            attrs = dict(g.attrs)
            arrays = dict(g.arrays())
            n = int(attrs.get("n_committed", 0))
        except Exception as exc:  # noqa: BLE001  -- unreadable metadata: start over, keep it for inspection
            dest = set_aside(self.path)
            self.say(f"{self.path} was unreadable ({type(exc).__name__}: {exc}); moved to {dest.name}, starting over")
            return None
        if attrs.get("stage_key") != key:  # of other inputs: start over
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        head = attrs.get("header_digest")  # None: a trace written before qcbed recorded it
        if isinstance(head, str) and head != _header_digest(attrs):
            dest = set_aside(self.path)
            self.say(f"{self.path}: its header (the start of the refinement: {', '.join(sorted(_header(attrs)))}) "
                     f"differs from its digest at creation; moved to {dest.name}, starting over")
            return None
        digests = attrs.get("row_digests")  # None: a trace written before qcbed recorded them
        rows, good, why = _intact_rows(arrays, n, digests if isinstance(digests, list) else None)
        if good < n:
            if good == 0:
                dest = set_aside(self.path)
                self.say(f"{self.path}: row 1 of {n} is damaged ({why}); moved to {dest.name}, starting over")
                return None
            self.say(f"{self.path}: row {good + 1} of {n} is damaged ({why}); dropping rows {good + 1}-{n}, "
                     f"resuming from the last intact checkpoint (row {good})")
        with writing(self.path):
            for name, a in arrays.items():
                if a.shape[0] != good:
                    a.resize((good,) + a.shape[1:])
            if good < n:
                upd = {"n_committed": good}
                if isinstance(digests, list):
                    upd["row_digests"] = digests[:good]
                g.attrs.update(upd)
        out = {"attrs": {**attrs, "n_committed": good}, **rows}
        return out if good > 0 else None

    def create(self, key: str, names: list[str], n_vertices: int, n_params: int, attrs: dict,
               extra: dict | None = None) -> None:
        """``extra``: more per-row arrays, {name: trailing shape} (float64), e.g. the Levenberg-Marquardt
        geometry and damping."""
        import zarr

        parent = self.path.parent
        for junk in parent.glob(f".{self.path.name}.tmp-*"):
            shutil.rmtree(junk, ignore_errors=True)
        tmp = parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        with writing(parent, tmp):
            g = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
            c = self.CHUNK
            for name, shape, dt in (("iteration", (0,), "i8"), ("gof", (0,), "f8"), ("wall_s", (0,), "f8"),
                                    ("eigen_solves", (0,), "i8"), ("best", (0, n_params), "f8"),
                                    ("simplex", (0, n_vertices, n_params), "f8"), ("fsim", (0, n_vertices), "f8")):
                g.create_array(name, shape=shape, chunks=(c,) + shape[1:], dtype=dt)
            for name, tail in (extra or {}).items():
                shape = (0,) + tuple(tail)
                g.create_array(name, shape=shape, chunks=(c,) + shape[1:], dtype="f8")
            head = {"stage_key": key, "names": names, **_header(attrs)}
            g.attrs.update({**head, "n_committed": 0, "row_digests": [], "header_digest": _header_digest(head)})
        replace_dir(tmp, self.path)

    def append(self, row: dict) -> None:
        """Append one row (every array of the trace), then commit it: the counter and the row's digest.
        A full disk raises one QcbedInputError; the uncommitted row is dropped on the next open."""
        import zarr

        with writing(self.path):
            g = zarr.open_group(str(self.path), mode="r+")
            n = int(g.attrs["n_committed"])
            digests = g.attrs.get("row_digests")
            stored = {}
            for name, v in row.items():
                a = g[name]
                v = np.asarray(v, dtype=a.dtype).reshape(a.shape[1:])
                stored[name] = v
                if a.shape[0] != n:  # torn row of an earlier kill
                    a.resize((n,) + a.shape[1:])
                a.append(v[None])
            upd = {"n_committed": n + 1}
            if isinstance(digests, list) and len(digests) == n:  # a trace from before row digests keeps none
                upd["row_digests"] = digests + [_row_digest(stored)]
            g.attrs.update(upd)


#: root attributes of a trace that change after its creation (every commit); the others are its header
_TRACE_COUNTERS = ("n_committed", "row_digests", "header_digest")


def _header(attrs: dict) -> dict:
    """The attributes a trace was created with (key, parameter names, the start GOF a resume reports...)."""
    return {k: v for k, v in attrs.items() if k not in _TRACE_COUNTERS}


def _header_digest(attrs: dict) -> str:
    """Digest of a trace's header: the row digests cover the rows, this the start values a resume reuses
    (``gof_start``), which a garbled digit in zarr.json would change while the JSON still reads."""
    return hashlib.sha256(canonical(_header(attrs)).encode()).hexdigest()[:16]


def _row_digest(row: dict) -> str:
    """Digest of one trace row: every array's values as stored (its dtype), by array name."""
    h = hashlib.sha256()
    for name in sorted(row):
        v = np.ascontiguousarray(row[name])
        h.update(f"{name}:{v.dtype.str}:{v.shape};".encode())
        h.update(v.tobytes())
    return h.hexdigest()[:16]


def _intact_rows(arrays: dict, n: int, digests: list | None) -> tuple[dict, int, str]:
    """(rows, count, why) of a trace's first ``count`` intact committed rows.

    Each array is read a chunk at a time: a chunk that cannot be decoded (truncated, garbled) ends the
    intact rows at its first row; then each row is compared with its digest (a deleted chunk reads as
    the fill value and fails here).  ``digests`` None (an older trace): only readability is checked."""
    good, why = n, ""
    data = {}
    for name, a in arrays.items():
        if a.shape[0] < good:
            good, why = a.shape[0], f"{name} has {a.shape[0]} rows"
        parts = []
        for lo in range(0, good, TraceStore.CHUNK):
            hi = min(good, lo + TraceStore.CHUNK)
            try:
                parts.append(np.asarray(a[lo:hi]))
            except Exception as exc:  # noqa: BLE001  -- an undecodable chunk
                good, why = lo, f"{name} rows {lo + 1}-{hi} unreadable ({type(exc).__name__})"
                break
        data[name] = np.concatenate(parts) if parts else np.zeros((0,) + a.shape[1:], a.dtype)
    if digests is not None:
        if len(digests) < good:
            good, why = len(digests), "no digest recorded"
        for i in range(good):
            if _row_digest({name: d[i] for name, d in data.items()}) != digests[i]:
                good, why = i, "values differ from their digest at commit"
                break
    return {name: d[:good] for name, d in data.items()}, good, why


def carried_counters(prev: dict | None) -> dict:
    """The eigen-solves and wall time of the earlier sessions of a resumed fine stage.  The trace's
    ``eigen_solves`` and ``wall_s`` columns are cumulative over sessions (each session adds these to its own),
    so its last committed row holds them; what a killed session did after that row is redone by the
    resumed one and counted there."""
    if prev is None:
        return {"eigen_solves": 0, "wall_s": 0.0}
    return {"eigen_solves": int(prev["eigen_solves"][-1]), "wall_s": float(prev["wall_s"][-1])}


def with_carried(counters: dict, carried: dict) -> dict:
    """The fine counters of every session: this session's ``eigen_solves`` and ``total_s`` plus the earlier
    sessions' (``carried``), which are kept apart too (``earlier_sessions``, ``*_this_session``)."""
    out = dict(counters)
    out["eigen_solves_this_session"] = int(counters.get("eigen_solves", 0))
    out["total_s_this_session"] = float(counters.get("total_s", 0.0))
    out["eigen_solves"] = int(carried["eigen_solves"]) + out["eigen_solves_this_session"]
    out["total_s"] = float(carried["wall_s"]) + out["total_s_this_session"]
    out["earlier_sessions"] = dict(carried)
    return out


def run_fine(plan: Plan, say=_say) -> dict:
    """Fine refinement with a checkpoint per outer iteration; resumes from ``fine_trace.zarr``."""
    from .fine import refine

    cfg = plan.cfg
    key = plan.trace_key or plan.keys["fine"]
    problem = fine_problem(plan)
    r = cfg.section("refine")
    if fine_optimizer(r, problem.gof) == "levenberg-marquardt":
        return _run_fine_lm(plan, problem, key, say)
    prefix = f"[{plan.run_dir.name}] fine"
    trace = TraceStore(plan.run_dir / TRACE, say=lambda m: say(f"{prefix}: {m}"))
    names = [p.label for p in problem.sf]
    nv = len(names) + 1
    prev = trace.open(key)
    kw = {}
    carried = carried_counters(prev)
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
        trace.append({"iteration": it, "gof": float(fsim[0]), "wall_s": carried["wall_s"] + time.perf_counter() - t_wall,
                      "eigen_solves": carried["eigen_solves"] + problem.counters["eigen_solves"],
                      "best": np.asarray(best, float),
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
    res.counters = with_carried(res.counters, carried)
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
    prefix = f"[{plan.run_dir.name}] fine"
    trace = TraceStore(plan.run_dir / TRACE, say=lambda m: say(f"{prefix}: {m}"))
    names = [p.label for p in problem.sf]
    gnames = problem.geometry_names
    prev = trace.open(key)
    carried = carried_counters(prev)
    t_wall = time.perf_counter()
    state, gof_start = None, None
    if prev is not None:
        state = {"step": int(prev["iteration"][-1]), "values": prev["best"][-1], "lam": float(prev["lam"][-1]),
                 "geometry": dict(zip(gnames, prev["geometry"][-1].tolist())), "accepted": int(prev["accepted"][-1])}
        # this process counts from zero; the earlier sessions' eigen-solves and time are carried (carried_counters)
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
        trace.append({"iteration": k, "gof": f, "wall_s": carried["wall_s"] + time.perf_counter() - t_wall,
                      "eigen_solves": carried["eigen_solves"] + problem.counters["eigen_solves"],
                      "best": np.asarray(v, float),
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
    res.counters = with_carried(res.counters, carried)
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
        "psf_limit": json.dumps(res.sigma_info.get("psf_limit")),
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
    state, detail = store_check(plan, stage)
    if state == "done":
        if detail == "unverified":
            say(f"{tag}: up to date, skipped (unverified: written before qcbed recorded digests of its files)")
        else:
            say(f"{tag}: up to date, skipped")
        return "skipped"
    if state == "corrupt":
        dest = set_aside(plan.store(stage))
        say(f"{tag}: {plan.store(stage)} was unreadable (corrupted: {detail}); moved to {dest.name}, recomputing")
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
    config_changed: bool = False  # the config file differs from the text recorded in run.json


def current_config(rec: dict) -> tuple[C.RunConfig, str]:
    """The config a run folder is judged by now: its file (``config_path`` of run.json) re-read, else the text
    recorded in run.json.  Returns (config, note): the note says when the file changed since the run, or
    why the recorded text is used ("" when the file is as recorded)."""
    path = Path(rec["config_path"])
    recorded = C.RunConfig(path, tomllib_loads(rec["config_text"]))
    try:
        text = path.read_text()
    except OSError:
        return recorded, f"config {path} is gone; compared with the config recorded in {RUN_RECORD}"
    if text == rec["config_text"]:
        return recorded, ""
    try:
        now = C.RunConfig(path, tomllib_loads(text))
    except ValueError as exc:
        return recorded, f"config {path} changed since the run and cannot be read ({exc}); compared with the recorded one"
    return now, f"config {path} changed since the run; stages compared with it as it is now"


def run_status(run_dir: Path) -> RunStatus:
    """Stages done/stale/pending of a run folder, judged by its config file as it is now (:func:`current_config`):
    a store whose key the current config and input files no longer give is "stale", whatever run.json says.
    The last checkpoint is shown only when it belongs to the current fine stage."""
    import zarr

    run_dir = Path(run_dir)
    st = RunStatus(run_dir, running=is_locked(run_dir))
    rec_path = run_dir / RUN_RECORD
    plan = None
    notes = []
    if rec_path.exists():
        try:
            rec = json.loads(rec_path.read_text())
            cfg, note = current_config(rec)
            if note:
                notes.append(note)
                st.config_changed = "changed" in note
            try:
                plan = make_plan(cfg, run_dir.parent, run_dir=run_dir)
            except QcbedInputError as exc:
                notes.append(f"inputs changed or missing ({exc}); showing the stored keys")
                plan = Plan(cfg, run_dir, rec.get("stage_keys", {}), {})
        except (OSError, ValueError, KeyError) as exc:
            notes.append(f"unreadable {RUN_RECORD}: {exc}")
    st.note = "; ".join(notes)
    for s in STAGES:
        if plan is not None and s in plan.keys:
            st.stages[s] = store_state(plan, s)
        elif (run_dir / STORES[s]).exists():
            st.stages[s] = "present"
    tr = run_dir / TRACE
    if tr.exists() and plan is not None and plan.trace_key is not None:
        try:
            g = zarr.open_group(str(tr), mode="r")
            n = int(g.attrs.get("n_committed", 0))
            if n and g.attrs.get("stage_key") == plan.trace_key:
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


def result_is_current(plan: Plan) -> bool:
    """The run's refinement and report are those of this plan's config and files (their stores carry its keys),
    so a summary may present them."""
    return all(s in plan.keys and store_state(plan, s) == "done" for s in ("fine", "report"))


def tomllib_loads(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)
