"""The run summary: every number of a run's report, read from its zarr stores, as typed records.

:func:`summarize` reads ``fine.zarr``, ``structure_factors.zarr``, ``coarse.zarr`` and ``run.json``
(never the memory of a refinement) and returns a :class:`RunSummary`.  ``RunSummary.to_json()`` is
``report/results.json``; :meth:`RunSummary.from_dict` reads one back.  The renderers
(:mod:`stages.render`, :mod:`stages.vesta`) and the run comparison (:mod:`stages.compare`) read the
records' attributes.

Derived quantities of a refined reflection (one :class:`StructureFactorRow` per reflection; U_g refined):

* centric reflections: U is real along the allowed phase φ0 (:func:`~stages.physics.
  structure_factors.centric_phase`); the row gives the signed amplitude along φ0 (for Si in
  origin choice 2, φ0 = 0: U itself); acentric ones give |U| and the phase;
* V_g = h² U_g / (2 m e) [V] and the X-ray F_g via Mott-Bethe [electrons per cell] are linear in
  U_g at fixed hkl, so their standard errors are |dV/dU| σ_U and |dF/dU| σ_U (for acentric
  reflections the phase error enters as |dF/dU| |U| σ_φ, added in quadrature);
* U'_g: refined, else the run's absorption model as the forward model used it (proportional:
  U'_g = f U_g of the refined U_g; Bird & King: the model's value, which does not depend on U_g);
* X-ray F is reported in the crystallographic convention exp(+2πi h·x), the complex conjugate of
  this project's electron convention (:mod:`stages.physics.structure_factors`); for a
  centrosymmetric crystal with the origin at the centre the two are equal (real).

Records that other stages write as JSON attributes and the report passes through unchanged (the
fine stage's ``counters``, the beam selection's ``beams`` and ``beam_probe``, the pattern geometry,
the dependency versions) stay mappings here: their keys are defined where they are written.

Serialisation: a record's fields, in order, are the keys of its JSON object; a field whose metadata
names a ``with`` field is left out when that field is None (stores written before it was recorded).
The records are frozen; their mapping fields are the parsed JSON of the stores and must not be
changed in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .fine import ZNCC_DEFINITION
from .store import open_store

_LABEL = re.compile(r"^(?P<comp>[A-Za-z_]+)\((?P<h>-?\d+) (?P<k>-?\d+) (?P<l>-?\d+)\)$")
R_FACTOR_DEFINITION = ("R = Σ|I_exp − I_model| / Σ|I_exp| over the samples the figure of merit used "
                       "(per disk, and over all disks); I_model = scale × simulated + background")
CHI2_PER_POINT_DEFINITION = "Σ r² / n over the disk's used samples, r = (I_model − I_exp) / σ (the normalised residual)"
#: how the standard errors of stores written before qcbed 0.7 were made (later stores record theirs in the
#: fine store's ``sigma_method`` attribute, :data:`stages.fine.SIGMA_METHOD`)
SIGMA_DEFINITION = ("standard errors from the Jacobian of the weighted residuals at the optimum, "
                    "cov = (JᵀJ)⁻¹ × max(1, reduced χ²); scale and backgrounds profiled")
#: |correlation| above which a pair of parameters is flagged
HIGH_CORRELATION = 0.9
#: a Gauss-Newton step from the reported point larger than this many sigma is reported
GAUSS_NEWTON_SIGMAS = 2.0
#: a refined value closer than this fraction of its search range's width to an end is "at the end"
RANGE_END_FRACTION = 0.02
#: the config key that sets the search range of each coarse.refine quantity
_COARSE_RANGE_KEY = {"voltage": "coarse.hv_range_kV", "cell": "coarse.cell_range_percent", "B": "coarse.B_range_A2"}


# ============================================================================ records and their JSON
def _units(units: str) -> Any:
    """A field whose unit is ``units`` (:data:`SF_UNITS` reads it back)."""
    return field(metadata={"units": units})


def _with(name: str, units: str | None = None) -> Any:
    """An optional field (default None), left out of the JSON when field ``name`` is None."""
    return field(default=None, metadata={"with": name, **({"units": units} if units else {})})


def _plain(v):
    """A field's value as JSON data: records as objects, tuples as lists (mappings are JSON already)."""
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _fits(hint, v) -> bool:
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, Record):
        return isinstance(v, Mapping)
    if origin is tuple:
        return isinstance(v, (list, tuple))
    return True


def _typed(hint, v):
    """JSON data ``v`` as the field type ``hint``: objects as records, lists as tuples where the type says so."""
    if v is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arm = next((a for a in typing.get_args(hint) if a is not type(None) and _fits(a, v)), None)
        return v if arm is None else _typed(arm, v)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(v)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], x) for x in v)
        return tuple(_typed(a, x) for a, x in zip(args, v))
    return v


class Record:
    """Base of the summary's frozen dataclasses: ``to_dict`` (JSON data, keys in field order) and
    ``from_dict`` (tolerant: unknown keys are ignored, a missing key takes the field's default, else None)."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            anchor = f.metadata.get("with")
            if anchor is not None and getattr(self, anchor) is None:
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: Mapping):
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in fields(cls):
            if f.name in d:
                kw[f.name] = _typed(hints[f.name], d[f.name])
            elif f.default is not MISSING:
                kw[f.name] = f.default
            elif f.default_factory is not MISSING:
                kw[f.name] = f.default_factory()
            else:
                kw[f.name] = None
        return cls(**kw)


@dataclass(frozen=True)
class Parameter(Record):
    """One refined parameter of fine.zarr.

    ``value``, ``sigma`` (standard error, None: undefined), ``start`` and ``range`` are in ``units``
    (structure factors Å^-2 or deg for a phase, thickness Å, rotation deg, shifts px).  ``range``: the
    search range [lo, hi] (None: a store written before ranges were recorded; ``at_range_end`` with
    it); ``at_range_end``: 'lower', 'upper' or None (:func:`range_end`); ``gauss_newton_step``: the
    linearised step to the optimum from the reported value, in ``units`` (None: none).  Structure
    factors only: ``hkl``, ``d_A`` (Å), ``iam`` (the IAM value in ``units``) and ``change_percent``
    (% from the IAM; None where the IAM value is zero)."""

    name: str
    kind: str
    units: str
    value: float
    sigma: float | None
    start: float
    range: tuple[float, float] | None = _with("range")
    at_range_end: str | None = _with("range")
    gauss_newton_step: float | None = None
    hkl: tuple[int, int, int] | None = _with("hkl")
    d_A: float | None = _with("d_A", units="Å")
    iam: float | None = _with("iam")
    change_percent: float | None = _with("iam", units="%")


@dataclass(frozen=True)
class StructureFactorRow(Record):
    """One refined reflection: a row of structure_factors.csv (the fields are its columns, in order;
    units in each field's metadata, :data:`SF_UNITS`).  ``*_iam``: the independent-atom model;
    ``U``/``Uprime``: the signed amplitude along the centric phase ``phase0_deg``, or |U| with its phase
    (acentric); ``*_source``: 'refined', 'IAM' or how U′ was derived; ``F_x_*``: X-ray structure factor
    by Mott-Bethe, crystallographic convention; ``F_x_change``: F_x − F_x(IAM) along the centric phase
    (acentric: the change of |F_x|)."""

    h: int
    k: int
    l: int  # noqa: E741  -- Miller index, the column's name
    d_A: float | None = _units("Å")
    g_invA: float | None = _units("1/Å (no 2π)")
    centric: bool
    phase0_deg: float | None = _units("degree")
    U_iam: float = _units("Å^-2")
    U: float = _units("Å^-2")
    sigma_U: float | None = _units("Å^-2")
    U_phase_deg: float | None = _units("degree")
    sigma_U_phase_deg: float | None = _units("degree")
    U_change_percent: float | None = _units("%")
    U_source: str
    Uprime_iam: float = _units("Å^-2")
    Uprime: float | None = _units("Å^-2")
    sigma_Uprime: float | None = _units("Å^-2")
    Uprime_phase_deg: float | None = _units("degree")
    sigma_Uprime_phase_deg: float | None = _units("degree")
    Uprime_source: str
    V_iam: float = _units("V")
    V: float = _units("V")
    sigma_V: float | None = _units("V")
    F_x_iam_re: float = _units("electrons")
    F_x_iam_im: float = _units("electrons")
    F_x_re: float = _units("electrons")
    F_x_im: float = _units("electrons")
    F_x_abs: float = _units("electrons")
    sigma_F_x: float | None = _units("electrons")
    F_x_change: float = _units("electrons")


#: columns of structure_factors.csv (one row per refined reflection), in order
SF_COLUMNS = tuple(f.name for f in fields(StructureFactorRow))
#: the unit of each column of structure_factors.csv that has one
SF_UNITS = {f.name: f.metadata["units"] for f in fields(StructureFactorRow) if "units" in f.metadata}


@dataclass(frozen=True)
class DiskFit(Record):
    """The fit of one disk.  ``background`` in counts; ``zncc_start``/``zncc``: the ZNCC
    (:data:`stages.fine.ZNCC_DEFINITION`) at the start and at the optimum (None: not recorded).  From
    the fit arrays (absent from stores without them, with ``n_points``): ``n_points`` samples used,
    ``r_factor`` (:data:`R_FACTOR_DEFINITION`), ``chi2_per_point`` (:data:`CHI2_PER_POINT_DEFINITION`)
    and ``mean_counts`` (mean experimental counts over the used samples)."""

    hkl: tuple[int, int, int]
    n_points: int | None = _with("n_points")
    background: float | None = None
    r_factor: float | None = _with("n_points")
    chi2_per_point: float | None = _with("n_points")
    zncc_start: float | None = None
    zncc: float | None = None
    mean_counts: float | None = _with("n_points", units="counts")


@dataclass(frozen=True)
class FitStatistics(Record):
    """Per disk and over all disks: the R factor and the mean ZNCC (plain mean over the disks, None: not
    recorded), with the definitions they follow."""

    r_factor_definition: str
    chi2_per_point_definition: str
    zncc_definition: str
    disks: tuple[DiskFit, ...]
    r_factor: float | None
    zncc_mean_start: float | None
    zncc_mean: float | None


@dataclass(frozen=True)
class CorrelationPair(Record):
    """Two parameters whose correlation coefficient ``r`` exceeds :data:`HIGH_CORRELATION` in magnitude."""

    a: str
    b: str
    r: float


@dataclass(frozen=True)
class Correlation(Record):
    """The correlation matrix of the refined parameters (``names`` in the order of rows and columns)."""

    names: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]
    high: tuple[CorrelationPair, ...]
    threshold: float


@dataclass(frozen=True)
class GeometryRow(Record):
    """A geometry parameter of the fine stage: ``value`` (and ``sigma``, ``start`` when refined) in
    ``units`` (Å, px, tilt steps or deg)."""

    name: str
    value: float
    units: str
    refined: bool
    sigma: float | None
    start: float | None


@dataclass(frozen=True)
class CrystalSummary(Record):
    """The crystal recorded in structure_factors.zarr: ``cell`` (a, b, c in Å; α, β, γ in degrees),
    ``volume_A3`` (Å³), ``source`` (where it was read from)."""

    name: str | None
    cell: tuple[float, ...] | None
    spacegroup: str | None
    volume_A3: float | None
    source: str | None


@dataclass(frozen=True)
class Microscope(Record):
    """``hv_kV``: accelerating voltage (kV); ``zone`` and ``x_axis``: zone axis and the pattern's x axis
    (direct-lattice indices)."""

    hv_kV: float | None
    zone: tuple[float, ...] | None
    x_axis: tuple[float, ...] | None


@dataclass(frozen=True)
class CoarseQuantity(Record):
    """A quantity the coarse stage refined (coarse.refine: voltage, cell, B), as coarse.zarr records it:
    ``value``, ``sigma``, ``start`` and ``range`` in ``units`` (kV, Å, Å^2); ``site``/``site_index``:
    the atom site of a Debye-Waller B."""

    name: str
    quantity: str
    label: str
    units: str
    value: float
    sigma: float | None
    start: float
    range: tuple[float, float]
    at_range_end: str | None
    site: str | None = _with("site")
    site_index: int | None = _with("site_index")


@dataclass(frozen=True)
class CoarseSummary(Record):
    """The coarse stage: ``thickness_A`` (Å) and orientation ``shift_px`` (row, col; px) by correlation
    (joint ``ncc``, ``ncc_per_disk`` for ``disks``); the config's thickness and the bracket searched
    (Å; None in stores written before); whether the search ended at the edge of its range or at a
    bound; ``wall_s`` (s), eigen-solves and tilts solved, per sub-step in ``by_step``; the refined
    physics (``refined``), what the later stages took from it (``refined_model``) and how its σ were
    made."""

    thickness_A: float
    ncc: float
    thickness_start_A: float | None
    thickness_bracket_A: tuple[float, float] | None
    ncc_per_disk: tuple[float, ...]
    disks: tuple[tuple[int, int, int], ...]
    shift_px: tuple[float, float]
    at_edge: bool
    at_bound: bool
    wall_s: float | None
    eigen_solves: int | None
    tilts_solved: int | None
    by_step: Mapping[str, Any] | None
    refined: tuple[CoarseQuantity, ...]
    refined_model: Mapping[str, Any]
    sigma_definition: str | None
    holz_lines: bool


@dataclass(frozen=True)
class Reproducibility(Record):
    """How the run was made and how to make it again: qcbed versions of the refinement and of the report,
    the config (path and sha256 of its text), stage keys, input digests, the physics choices of the iam
    stage, dependency ``versions`` (and when they were recorded), the command of the run, the fine
    stage's time stamp ``refined`` (ISO 8601), and the commands that reproduce, verify and regenerate."""

    qcbed_version: str
    report_qcbed_version: str
    config_path: str | None
    config_sha256: str | None
    stage_keys: Mapping[str, str]
    input_digests: Mapping[str, Any] | None
    scattering_table: str | None
    scattering_table_reference: str | None
    absorption_model: str | None
    solver: str | None
    beam_selection: Mapping[str, Any] | None
    versions: Mapping[str, str | None]
    versions_recorded: str
    command: str | None
    refined: str | None
    reproduce: str | None
    verify: str
    regenerate_report: str


@dataclass(frozen=True)
class RunSummary(Record):
    """Every number of a run's report (``report/results.json``).

    Fit: ``gof_name`` and the reduced figure of merit at the start and the end; ``n_points`` samples,
    ``dof`` degrees of freedom (``dof_effective``: ν_eff, ``chi2_effective``: χ²/ν_eff); ``scale``
    (counts per unit incident intensity); ``background`` per disk (counts); ``iterations`` outer
    iterations (``resumed_from_iteration``: where a resumed run continued).  ``sigma_definition``: how
    the standard errors were made (``sigma_defined`` False: why they are undefined);
    ``barely_determined``: {parameter: samples moved by one σ (px)} above
    ``barely_determined_limit_px``; ``psf_limit``: the refined PSF's radius against what roi.padding lets the
    search try (:func:`stages.fine.psf_limit`; None: PSF not refined).  Passed through from the stores:
    ``geometry`` {name: value},
    ``pattern_geometry`` (:meth:`stages.physics.pattern_geometry.PatternGeometry.to_mapping`),
    ``counters`` (the fine stage's counts and times in s), ``beams`` and ``beam_probe`` (the beam
    selection).  ``warnings``: the check list (:func:`check_list`); ``figures``: the report's PNG files.
    """

    run: str
    qcbed_version: str
    pattern_kind: str | None
    crystal: CrystalSummary | None
    microscope: Microscope | None
    gof_name: str
    gof: float
    gof_start: float
    converged: bool
    n_points: int
    dof: int
    n_parameters: int
    scale: float
    background: tuple[float, ...]
    parameters: tuple[Parameter, ...]
    structure_factors: tuple[StructureFactorRow, ...]
    correlation: Correlation
    sigma_definition: str
    sigma_defined: bool
    dof_effective: float | None
    chi2_effective: float | None
    barely_determined: Mapping[str, float]
    barely_determined_limit_px: float | None
    psf_limit: Mapping[str, Any] | None
    fit: FitStatistics
    geometry: Mapping[str, float]
    geometry_table: tuple[GeometryRow, ...]
    pattern_geometry: Mapping[str, Any]
    counters: Mapping[str, Any]
    beams: Mapping[str, Any]
    beam_probe: Mapping[str, Any]
    resumed_from_iteration: int | None
    iterations: int
    reproducibility: Reproducibility
    coarse: CoarseSummary | None = _with("coarse")
    warnings: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """results.json's data; ``reproduce`` (config, versions, verify command) is kept for older readers."""
        out = super().to_dict()
        tail = {k: out.pop(k) for k in ("warnings", "figures")}
        r = self.reproducibility
        out["reproduce"] = {"config": r.config_path, "versions": _plain(r.versions), "command": r.verify}
        return {**out, **tail}

    def to_json(self) -> str:
        """The text of results.json."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"


def read_summary(path) -> RunSummary:
    """A results.json (or the run folder holding ``report/results.json``) as a :class:`RunSummary`."""
    path = Path(path)
    if path.is_dir():
        path = path / "report" / "results.json"
    return RunSummary.from_dict(json.loads(path.read_text()))


# ============================================================================ reading the stores
def _open(path: Path) -> xr.Dataset | None:
    """The store, verified against its manifest (:func:`stages.store.open_store`), or None if absent."""
    if not (path / "zarr.json").exists():
        return None
    return open_store(path)


def parse_label(label: str):
    """'U(1 -1 -1)' -> ('U', (1, -1, -1)); None for a geometry parameter."""
    m = _LABEL.match(label)
    if not m:
        return None
    return m["comp"], (int(m["h"]), int(m["k"]), int(m["l"]))


def hkl_text(hkl) -> str:
    """(1, -1, -1) -> '1 -1 -1'."""
    return " ".join(str(int(x)) for x in hkl)


@dataclass
class RunStores:
    """The stores of one run folder (``coarse`` only when the run used a coarse stage)."""

    run_dir: Path
    fine: xr.Dataset
    iam: xr.Dataset | None
    coarse: xr.Dataset | None
    record: dict | None  # run.json


def load_stores(run_dir) -> RunStores:
    """The stores of ``run_dir``, each verified; FileNotFoundError without fine.zarr."""
    run_dir = Path(run_dir)
    fine = _open(run_dir / "fine.zarr")
    if fine is None:
        raise FileNotFoundError(f"{run_dir / 'fine.zarr'}: no fine refinement to report")
    rec = None
    if (run_dir / "run.json").exists():
        try:
            rec = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            rec = None
    coarse = _open(run_dir / "coarse.zarr")
    # a coarse store left from an earlier config is not part of this run
    if coarse is not None and rec is not None and "coarse" not in rec.get("stage_keys", {"coarse": 1}):
        coarse = None
    return RunStores(run_dir, fine, _open(run_dir / "structure_factors.zarr"), coarse, rec)


def crystal_from_store(iam: xr.Dataset):
    """The Crystal recorded in structure_factors.zarr (its ``crystal`` attribute): no input file needed."""
    from .physics.crystal import AtomSite, Crystal

    c = json.loads(iam.attrs["crystal"])
    sites = tuple(AtomSite(s["label"], s["element"], tuple(float(x) for x in s["fract"]), float(s["occupancy"]),
                           s.get("b_iso"), None if s.get("beta") is None else tuple(tuple(r) for r in s["beta"]))
                  for s in c["sites"])
    return Crystal(c["name"], tuple(c["cell"]), c["spacegroup"], sites, source=c.get("source", ""))


def _iam_row(iam: xr.Dataset | None, hkl) -> dict | None:
    """The row of exactly hkl in structure_factors.zarr (the refined reflections are always requested rows)."""
    if iam is None:
        return None
    h = np.stack([iam.h.values, iam.k.values, iam.l.values], 1)
    hit = np.nonzero((h == np.asarray(hkl)).all(1))[0]
    if not len(hit):
        return None
    i = int(hit[0])
    row = {v: float(iam[v].values[i]) for v in iam.data_vars if iam[v].dims == ("reflection",)}
    for c in ("g_invA", "d_A", "centric", "absent", "multiplicity"):
        if c in iam.coords:
            row[c] = iam[c].values[i].item()
    return row


def _attr_json(attrs: Mapping, name: str, empty: str = "{}"):
    """A JSON attribute of a store, parsed (``empty`` where absent or blank)."""
    return json.loads(attrs.get(name, empty) or empty)


# ============================================================================ derived numbers
def _num(x):
    """Plain JSON number (None for NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(z: complex, tiny: float = 1e-9) -> complex:
    """Parts below ``tiny`` (rounding noise of a sum of atomic terms, e.g. the IAM F of Si 2 2 2) -> 0."""
    re_, im_ = z.real, z.imag
    return complex(0.0 if abs(re_) < tiny else re_, 0.0 if abs(im_) < tiny else im_)


def structure_factor_rows(st: RunStores) -> list[StructureFactorRow]:
    """One row per refined reflection, from fine.zarr and structure_factors.zarr (module docstring)."""
    from .physics import structure_factors as sf

    fine, iam = st.fine, st.iam
    groups: dict = {}
    for i, name in enumerate(fine.param.values.tolist()):
        lab = parse_label(name)
        if lab is not None:
            groups.setdefault(lab[1], {})[lab[0]] = (float(fine.value.values[i]), float(fine.sigma.values[i]))
    if not groups or iam is None:
        return []
    crystal = crystal_from_store(iam)
    hv = float(iam.attrs["hv_kV"])
    absorption = str(iam.attrs.get("absorption", "none"))
    frac = float(iam.attrs.get("absorption_fraction", 0.0))
    rows = []
    for hkl, comps in groups.items():
        ref = _iam_row(iam, hkl)
        if ref is not None:
            u_iam, up_iam = complex(ref["U_re"], ref["U_im"]), complex(ref["Uprime_re"], ref["Uprime_im"])
            g = ref["g_invA"]
        else:  # an older store without the requested row: the IAM from the recorded crystal
            u_iam = complex(sf.ug_from_fe(sf.electron_structure_factor(crystal, [hkl], iam.attrs["scattering_table"]),
                                          crystal, hv)[0])
            up_iam = frac * u_iam
            g = float(crystal.g_length(np.array([hkl]))[0])
        phi0 = sf.centric_phase(crystal, hkl)
        rot = 1.0 if phi0 is None else np.exp(-1j * phi0)

        def proj(z):  # the tabulated real number: signed amplitude along phi0, or |z| (acentric)
            return float((z * rot).real) if phi0 is not None else float(abs(z))

        def refined(base, model):
            if base in comps:
                v, s = comps[base]
                return {"z": v * np.exp(1j * (phi0 or 0.0)), "amp": v, "sigma": s, "phase": math.degrees(phi0 or 0.0),
                        "sigma_phase": None, "source": "refined"}
            if base + "_amp" in comps or base + "_phase" in comps:
                a, sa = comps.get(base + "_amp", (abs(model), None))
                p, sp = comps.get(base + "_phase", (math.degrees(np.angle(model)), None))
                return {"z": a * np.exp(1j * math.radians(p)), "amp": a, "sigma": sa, "phase": p, "sigma_phase": sp,
                        "source": "refined"}
            return None

        U = refined("U", u_iam) or {"z": u_iam, "amp": proj(u_iam), "sigma": None,
                                    "phase": math.degrees(phi0) if phi0 is not None else math.degrees(np.angle(u_iam)),
                                    "sigma_phase": None, "source": "IAM"}
        Up = refined("Uprime", up_iam)
        if Up is None:
            if absorption == "proportional" and U["source"] == "refined":
                Up = {"z": frac * U["z"], "amp": frac * U["amp"], "sigma": None if U["sigma"] is None else frac * U["sigma"],
                      "phase": U["phase"], "sigma_phase": U["sigma_phase"], "source": f"proportional: {frac:g} U_g"}
            else:
                Up = {"z": up_iam, "amp": proj(up_iam), "sigma": None, "phase": U["phase"], "sigma_phase": None,
                      "source": "absorption model" if absorption != "none" else "none"}
        # linear maps at fixed hkl: V = kV U, F_x = N - c U (Mott-Bethe)
        kv = complex(sf.vg_from_fe(sf.fe_from_ug(1.0, crystal, hv), crystal))
        fx = complex(sf.xray_from_ug(np.array([U["z"]]), crystal, [hkl], hv)[0])
        fx_iam = complex(sf.xray_from_ug(np.array([u_iam]), crystal, [hkl], hv)[0])
        dfdu = abs(complex(sf.xray_from_ug(np.array([1.0]), crystal, [hkl], hv)[0]
                           - sf.xray_from_ug(np.array([0.0]), crystal, [hkl], hv)[0]))
        sU = U["sigma"]
        s_rad = None if sU is None else sU
        if s_rad is not None and U["sigma_phase"] is not None:
            s_rad = math.hypot(s_rad, abs(U["amp"]) * math.radians(U["sigma_phase"]))
        # crystallographic convention: complex conjugate; rounding noise (|F| < 1e-9 e) written as 0
        fxc, fxc_iam = _clean(np.conj(fx)), _clean(np.conj(fx_iam))
        u_iam_p = proj(u_iam)
        zero = abs(u_iam) < 1e-12  # forbidden in the IAM (e.g. Si 2 2 2): zero to rounding, no percent
        rows.append(StructureFactorRow(
            h=int(hkl[0]), k=int(hkl[1]), l=int(hkl[2]), d_A=_num(1.0 / g if g > 0 else math.inf),
            g_invA=_num(g), centric=phi0 is not None,
            phase0_deg=None if phi0 is None else math.degrees(phi0) + 0.0,
            U_iam=0.0 if zero else u_iam_p, U=U["amp"],
            sigma_U=_num(U["sigma"]), U_phase_deg=_num(U["phase"]), sigma_U_phase_deg=_num(U["sigma_phase"]),
            U_change_percent=None if zero else 100.0 * (U["amp"] - u_iam_p) / abs(u_iam_p),
            U_source=U["source"],
            Uprime_iam=0.0 if zero else proj(up_iam), Uprime=_num(Up["amp"]), sigma_Uprime=_num(Up["sigma"]),
            Uprime_phase_deg=_num(Up["phase"]), sigma_Uprime_phase_deg=_num(Up["sigma_phase"]),
            Uprime_source=Up["source"],
            V_iam=0.0 if zero else float((kv * u_iam_p).real), V=float((kv * U["amp"]).real),
            sigma_V=None if sU is None else abs(kv) * sU,
            F_x_iam_re=float(fxc_iam.real), F_x_iam_im=float(fxc_iam.imag),
            F_x_re=float(fxc.real), F_x_im=float(fxc.imag), F_x_abs=float(abs(fxc)),
            sigma_F_x=None if s_rad is None else dfdu * s_rad,
            F_x_change=float(abs(fxc) - abs(fxc_iam)) if phi0 is None else float(((fxc - fxc_iam) * np.conj(rot)).real),
        ))
    return rows


def fit_statistics(fine: xr.Dataset) -> FitStatistics:
    """Per disk: points used, background, R factor, chi^2 per point, ZNCC at the start and at the end;
    and the totals (the ZNCC of a fine.zarr written before it was recorded: None)."""
    disks = [(int(h), int(k), int(l)) for h, k, l in zip(fine.h.values, fine.k.values, fine.l.values)]
    nan = np.full(len(disks), np.nan)
    bg = fine.background.values if "background" in fine else nan
    zn0 = fine.zncc_start.values if "zncc_start" in fine else nan
    zn = fine.zncc.values if "zncc" in fine else nan
    r_total = None
    if "fit_used" not in fine:
        rows = [DiskFit(hkl=d, background=_num(b), zncc_start=_num(z0), zncc=_num(z))
                for d, b, z0, z in zip(disks, bg, zn0, zn)]
    else:
        used = fine.fit_used.values.astype(bool)
        exp, model, res = fine.fit_exp.values, fine.fit_model.values, fine.fit_residual.values
        num_t = den_t = 0.0
        rows = []
        for i, d in enumerate(disks):
            u = used[i] & np.isfinite(exp[i]) & np.isfinite(model[i])
            num, den = float(np.abs(exp[i][u] - model[i][u]).sum()), float(np.abs(exp[i][u]).sum())
            num_t, den_t = num_t + num, den_t + den
            n = int(u.sum())
            rows.append(DiskFit(hkl=d, n_points=n, background=_num(bg[i]), r_factor=num / den if den > 0 else None,
                                chi2_per_point=float((res[i][u] ** 2).sum() / n) if n else None,
                                zncc_start=_num(zn0[i]), zncc=_num(zn[i]),
                                mean_counts=float(exp[i][u].mean()) if n else None))
        r_total = num_t / den_t if den_t > 0 else None
    return FitStatistics(r_factor_definition=R_FACTOR_DEFINITION, chi2_per_point_definition=CHI2_PER_POINT_DEFINITION,
                         zncc_definition=ZNCC_DEFINITION, disks=tuple(rows), r_factor=r_total,
                         zncc_mean_start=_num(fine.attrs.get("zncc_mean_start")), zncc_mean=_num(fine.attrs.get("zncc_mean")))


def geometry_table(fine: xr.Dataset) -> list[GeometryRow]:
    """Geometry parameters: value, sigma and start when refined (fixed ones: the value used; zero disk
    shifts and the PSF of a CBED pattern or an unused one left out)."""
    geo = json.loads(fine.attrs["geometry"])
    kind = json.loads(fine.attrs["pattern_geometry"]).get("kind")
    names = fine.param.values.tolist()
    units = {"thickness": "Å", "gl": "px" if kind == "cbed" else "tilt steps", "rotation": "deg",
             "psf_sigma": "tilt steps", "psf_gamma": "tilt steps"}
    rows = []
    for name, v in geo.items():
        refined = name in names
        if not refined:
            if name.startswith("disk_shift") and v == 0.0:
                continue
            if name.startswith("psf") and (kind != "larbed" or v == 0.0):
                continue
        i = names.index(name) if refined else None
        rows.append(GeometryRow(name=name, value=float(v), units=units.get(name, "px"), refined=refined,
                                sigma=None if i is None else _num(fine.sigma.values[i]),
                                start=None if i is None else _num(fine.start.values[i])))
    return rows


def sha256_text(text: str) -> str:
    """The sha256 (hex) of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


def reproducibility(st: RunStores, versions_now: Callable[[], dict] | None = None) -> Reproducibility:
    """The reproducibility record of a run.  Dependency versions: run.json's; without them those of
    ``versions_now()`` ('at report time'), or none ('not recorded') without it."""
    fine, iam, rec = st.fine, st.iam, st.record
    run_dir = st.run_dir
    cfg_path = (rec or {}).get("config_path") or fine.attrs.get("config_file")
    cfg_text = (rec or {}).get("config_text")
    if cfg_text is None and cfg_path and Path(cfg_path).is_file():
        cfg_text = Path(cfg_path).read_text()
    if rec is not None and rec.get("versions"):
        versions, when = rec["versions"], "at run time (run.json)"
    elif versions_now is not None:
        versions, when = versions_now(), "at report time (no run.json)"
    else:
        versions, when = {}, "not recorded (no run.json)"
    keys = {}
    for name, ds in (("iam", iam), ("coarse", st.coarse), ("fine", fine)):
        if ds is not None and ds.attrs.get("stage_key"):
            keys[name] = ds.attrs["stage_key"]
    cmd = (rec or {}).get("command")
    ia = {} if iam is None else iam.attrs
    return Reproducibility(
        qcbed_version=fine.attrs.get("qcbed_version", __version__), report_qcbed_version=__version__,
        config_path=cfg_path, config_sha256=None if cfg_text is None else sha256_text(cfg_text),
        stage_keys=(rec or {}).get("stage_keys") or keys,
        input_digests=(rec or {}).get("input_digests"),
        scattering_table=ia.get("scattering_table"), scattering_table_reference=ia.get("scattering_table_reference"),
        absorption_model=ia.get("absorption_model"), solver=ia.get("solver"),
        beam_selection=None if iam is None else _attr_json(ia, "beam_selection", "null"),
        versions=versions, versions_recorded=when,
        command=" ".join(cmd) if isinstance(cmd, list) else cmd,
        refined=fine.attrs.get("created"),
        reproduce=f"qcbed run {cfg_path} --results {run_dir.parent}" if cfg_path else None,
        verify=f"qcbed rerun {run_dir}", regenerate_report=f"qcbed report {run_dir}",
    )


def _parameters(fine: xr.Dataset, sf_rows: Sequence[StructureFactorRow]) -> list[Parameter]:
    """fine.zarr's refined parameters; structure factors with their IAM value and change from it."""
    by_hkl = {(r.h, r.k, r.l): r for r in sf_rows}
    out = []
    for i, name in enumerate(fine.param.values.tolist()):
        value = float(fine.value.values[i])
        kw: dict = {}
        if "range_lo" in fine:  # absent from fine.zarr stores written before the ranges were recorded
            rng = (float(fine.range_lo.values[i]), float(fine.range_hi.values[i]))
            kw.update(range=rng, at_range_end=range_end(value, *rng))
        if "gauss_newton_step" in fine:
            kw["gauss_newton_step"] = _num(fine.gauss_newton_step.values[i])
        lab = parse_label(name)
        if lab is not None:
            comp, hkl = lab
            kw["hkl"] = hkl
            r = by_hkl.get(hkl)
            if r is not None:
                kw["d_A"] = r.d_A
                if comp in ("U", "U_amp"):
                    kw.update(iam=r.U_iam, change_percent=r.U_change_percent)
                elif comp in ("Uprime", "Uprime_amp"):
                    kw.update(iam=r.Uprime_iam, change_percent=(None if not r.Uprime_iam else
                                                                100.0 * (value - r.Uprime_iam) / abs(r.Uprime_iam)))
        out.append(Parameter(name=name, kind=str(fine.kind.values[i]), units=str(fine.units.values[i]), value=value,
                             sigma=_num(fine.sigma.values[i]), start=float(fine.start.values[i]), **kw))
    return out


def _coarse_summary(coarse: xr.Dataset) -> CoarseSummary:
    a = coarse.attrs
    cc = json.loads(a.get("counters", "{}"))
    return CoarseSummary(
        thickness_A=a["thickness_A"], ncc=a["ncc"],
        # the config's thickness and the bracket searched (absent from stores written before)
        thickness_start_A=_num(a.get("thickness_start_A")), thickness_bracket_A=_typed(
            tuple[float, float] | None, a.get("thickness_bracket_A")),
        ncc_per_disk=tuple(coarse.ncc_per_disk.values.tolist()),
        disks=tuple((int(h), int(k), int(l)) for h, k, l in zip(coarse.h.values, coarse.k.values, coarse.l.values)),
        shift_px=tuple(a["shift_px"]), at_edge=bool(a.get("at_edge", 0)), at_bound=bool(a.get("at_bound", 0)),
        wall_s=cc.get("stage_wall_s", cc.get("wall_s")), eigen_solves=cc.get("eigen_solves"),
        tilts_solved=cc.get("tilts_solved"), by_step=cc.get("by_step"),
        # coarse.refine: voltage / cell / B with standard errors, and what the iam and fine stages took from them
        refined=tuple(CoarseQuantity.from_dict(p) for p in _attr_json(a, "physics", "[]")),
        refined_model=_attr_json(a, "refined_model"), sigma_definition=a.get("physics_sigma_definition"),
        holz_lines=bool(a.get("holz_lines", 0)))


def summarize(run_dir, versions_now: Callable[[], dict] | None = None) -> RunSummary:
    """Every number of the report, from the stores of ``run_dir`` (a folder or its :class:`RunStores`),
    full precision; ``versions_now``: see :func:`reproducibility`."""
    st = run_dir if isinstance(run_dir, RunStores) else load_stores(run_dir)
    fine, iam, coarse = st.fine, st.iam, st.coarse
    a = fine.attrs
    sf_rows = structure_factor_rows(st)
    params = _parameters(fine, sf_rows)
    pg = json.loads(a["pattern_geometry"])
    crystal = json.loads(iam.attrs["crystal"]) if iam is not None and "crystal" in iam.attrs else {}
    names = fine.param.values.tolist()
    corr = fine.correlation.values
    high = tuple(CorrelationPair(names[i], names[j], float(corr[i, j])) for i in range(len(names))
                 for j in range(i + 1, len(names)) if abs(corr[i, j]) > HIGH_CORRELATION)
    s = RunSummary(
        run=st.run_dir.name, qcbed_version=__version__, pattern_kind=pg.get("kind"),
        crystal=CrystalSummary.from_dict(crystal) if crystal else None,
        microscope=None if iam is None else Microscope.from_dict(iam.attrs),
        gof_name=a["gof_name"], gof=a["gof"], gof_start=a["gof_start"], converged=bool(a["converged"]),
        n_points=int(a["n_points"]), dof=int(a["dof"]), n_parameters=len(names),
        scale=a["scale"], background=tuple(fine.background.values.tolist()),
        parameters=tuple(params), structure_factors=tuple(sf_rows),
        correlation=Correlation(tuple(names), _typed(tuple[tuple[float, ...], ...], corr.tolist()), high,
                                HIGH_CORRELATION),
        sigma_definition=a.get("sigma_method") or SIGMA_DEFINITION,
        sigma_defined=bool(a.get("sigma_defined", 1)),
        dof_effective=_num(a.get("dof_effective")), chi2_effective=_num(a.get("chi2_effective")),
        barely_determined=_attr_json(a, "barely_determined"),
        barely_determined_limit_px=_num(a.get("barely_determined_limit_px")),
        psf_limit=_attr_json(a, "psf_limit", "null"),
        fit=fit_statistics(fine),
        geometry=json.loads(a["geometry"]), geometry_table=tuple(geometry_table(fine)), pattern_geometry=pg,
        counters=json.loads(a["counters"]), beams=_attr_json(a, "beams"), beam_probe=_attr_json(a, "beam_probe"),
        resumed_from_iteration=None if a.get("resumed_from_iteration", -1) < 0 else int(a["resumed_from_iteration"]),
        iterations=int(fine.iteration.values[-1]) if "iteration" in fine.coords and fine.sizes.get("iteration") else 0,
        reproducibility=reproducibility(st, versions_now),
        coarse=None if coarse is None else _coarse_summary(coarse))
    return replace(s, warnings=tuple(check_list(
        s.parameters, converged=s.converged, iterations=s.iterations, gof_name=s.gof_name, gof=s.gof,
        high_correlations=s.correlation.high, sigma_defined=s.sigma_defined, sigma_definition=s.sigma_definition,
        barely_determined=s.barely_determined, barely_determined_limit_px=s.barely_determined_limit_px,
        psf_limit=s.psf_limit, beam_probe=s.beam_probe, coarse=s.coarse)))


# ============================================================================ the check list
def range_end(value: float, lo: float, hi: float, fraction: float = RANGE_END_FRACTION) -> str | None:
    """'lower' or 'upper' when ``value`` lies within ``fraction`` of the width of [lo, hi] from that end
    (the optimum may then lie outside the searched range), else None."""
    w = hi - lo
    if not (math.isfinite(value) and math.isfinite(w) and w > 0):
        return None
    if value - lo <= fraction * w:
        return "lower"
    if hi - value <= fraction * w:
        return "upper"
    return None


def check_list(parameters: Sequence[Parameter], *, converged: bool, iterations: int, gof_name: str, gof: float,
               high_correlations: Sequence[CorrelationPair] = (), sigma_defined: bool = True,
               sigma_definition: str | None = None, barely_determined: Mapping[str, float] | None = None,
               barely_determined_limit_px: float | None = None, psf_limit: Mapping[str, Any] | None = None,
               beam_probe: Mapping[str, Any] | None = None,
               coarse: CoarseSummary | None = None) -> list[str]:
    """The report's "Check" list: one sentence per thing a reader must know before trusting the numbers
    (beam sets short of their accuracy, no convergence, a poor fit, strong correlations, missing or
    undefined errors, barely determined sampling parameters, a PSF at the padding's limit, an optimum beyond the errors or at the end
    of a search range, a coarse search at its edge), each with what to do."""
    w = []
    pr = beam_probe or {}
    if pr and not pr.get("met", True):
        w.append(f"The beam sets are {100 * pr['error']:.2f} % of a disk's maximum from the probe's reference, above "
                 f"the target {100 * pr['accuracy']:.2f} % (simulation.beam_accuracy): "
                 + ("raise simulation.sg_strong or remove it (the probe then sizes the beam sets)."
                    if len(pr.get("ladder", [])) == 1 else "the largest beam set tried was used; raise simulation.sg_max."))
    if not converged:
        w.append(f"The refinement did not converge within {iterations} iterations: the values are the best point "
                 "so far (raise refine.max_iterations or set refine.gauss_newton_steps; the run continues from its "
                 "checkpoints).")
    if gof_name.startswith("Chi2") and gof > 2.0:
        w.append(f"Reduced χ² = {gof:.3g} > 2: the model does not describe the data within the noise "
                 "(standard errors are scaled up by it).")
    for h in high_correlations:
        w.append(f"{h.a} and {h.b} are strongly correlated (r = {h.r:+.3f}): their individual errors are "
                 "not independent.")
    if not sigma_defined:
        w.append(f"Standard errors are undefined: {sigma_definition}.")
    for p in parameters if sigma_defined else ():
        if not (p.sigma is not None and p.sigma > 0):
            w.append(f"{p.name}: no standard error (the fit does not constrain it).")
    if barely_determined:
        w.append("Barely determined: " + ", ".join(f"{n} (one σ moves the samples by {d:.2g} px)"
                                                  for n, d in barely_determined.items())
                 + f". Above {fmt(barely_determined_limit_px)} px the pixel-scale structure of the interpolated noise makes "
                   "the linearised errors of these and of the parameters correlated with them too large (bench/"
                   "coverage.py, systematic row: the shift across the row scattered by 0.45 σ); fix them, or add "
                   "disks or tilts that constrain them.")
    if psf_limit and psf_limit.get("at_limit"):
        w.append(f"The PSF sits on the limit roi.padding sets: its radius 4σ + 8γ = {psf_limit['radius']:.3g} tilt "
                 f"steps, the most that roi.padding = {psf_limit['padding']} lets the search try is "
                 f"{psf_limit['limit']:.3g}; the true PSF may be wider, and the PSF widths, the thickness and the "
                 f"structure factors correlated with them biased: set roi.padding to {psf_limit['padding_needed']} "
                 "and run again.")
    far = [p for p in parameters if p.gauss_newton_step is not None and (p.sigma or 0) > 0
           and abs(p.gauss_newton_step) > GAUSS_NEWTON_SIGMAS * p.sigma]
    if far:
        worst = sorted(far, key=lambda p: -abs(p.gauss_newton_step) / p.sigma)[:3]
        w.append("The optimum lies further from the reported values than their errors: the Gauss-Newton step from "
                 "the reported point predicts " + ", ".join(
                     f"{p.name} {fmt(p.value)} → {fmt(p.value + p.gauss_newton_step)} "
                     f"({abs(p.gauss_newton_step) / p.sigma:.3g} σ)" for p in worst)
                 + " (raise refine.max_iterations or set refine.gauss_newton_steps; the run continues from its "
                   "checkpoints).")
    for p in parameters:
        if p.at_range_end:
            lo, hi = p.range
            fix = ("widen the reflection's range_percent or U_range/Uprime_range in refine.reflections"
                   if p.kind == "structure_factor" else "start it closer (geometry or coarse stage)")
            w.append(f"{p.name} = {fmt(p.value)} ended at the {p.at_range_end} end of its search range "
                     f"[{fmt(lo)}, {fmt(hi)}]: the optimum may lie outside it ({fix}).")
    if coarse is None:
        return w
    if coarse.at_edge or coarse.at_bound:
        w.append("The coarse search ended at the edge of its range (thickness bracket or orientation window): widen it.")
    for q in coarse.refined:
        if q.at_range_end:
            lo, hi = q.range
            w.append(f"Coarse {q.label} = {fmt(q.value)} {q.units} ended at the {q.at_range_end} end of its "
                     f"range [{fmt(lo)}, {fmt(hi)}]: the optimum may lie outside it (widen {_COARSE_RANGE_KEY[q.quantity]}).")
    if any(q.quantity in ("voltage", "cell") for q in coarse.refined) and not coarse.holz_lines:
        w.append("The coarse voltage / cell fit ran with simulation.holz_lines off: HOLZ beams near their Bragg condition "
                 "that couple weakly are left out of the model, and their lines with them (the cell 0.26 % off instead of "
                 "0.02 % in tests/test_coarse.py); set holz_lines = true.")
    return w


# ============================================================================ numbers for reading
def _exp10(x: float) -> int:
    return int(math.floor(math.log10(abs(x))))


def fmt(v, sigma=None, digits: int = 6) -> str:
    """A value for reading (the check list and every rendered table): with sigma, rounded to sigma's 2
    significant digits ('0.048833 ± 0.000032'); without, ``digits`` significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if sigma is not None and math.isfinite(sigma) and sigma > 0:
        e = _exp10(sigma)
        dec = 1 - e
        if dec > 8 or max(abs(v), sigma) >= 1e7:  # tiny or huge: a common power of ten
            p = _exp10(max(abs(v), sigma))
            d2 = max(0, p - e + 1)
            return f"({v / 10 ** p:.{d2}f} ± {sigma / 10 ** p:.{d2}f})e{p}"
        dec = max(dec, 0)
        return f"{v:.{dec}f} ± {sigma:.{dec}f}"
    if abs(v) < 1e-12:  # rounding noise (no quantity of this report is that small)
        return "0"
    if 1e-4 <= abs(v) < 1e7:
        dec = max(0, digits - 1 - _exp10(v))
        text = f"{v:.{dec}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{v:.{digits - 1}e}"
