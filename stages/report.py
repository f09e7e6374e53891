"""The report stage: a run's results, read from its zarr stores, in ``results/<run>/report/``.

Everything is read from the stores (``fine.zarr``, ``structure_factors.zarr``, ``coarse.zarr``,
``run.json``), never from the memory of a refinement, so ``qcbed report results/<run>`` regenerates
the whole folder in seconds without refitting.  The folder is written under a temporary name and
renamed into place; ``record.json`` carries the stage key.

Files (:func:`write_report`):

* ``report.html`` -- self-contained (images embedded as data URIs, no external resource), and the
  same content as ``report.md`` (Markdown, images beside it);
* ``results.json`` -- every number of the report, full precision (:func:`summarize`);
* ``structure_factors.csv`` -- one row per refined reflection (:data:`SF_COLUMNS`), and
  ``correlation.csv`` (the correlation matrix of all refined parameters);
* ``structure_factors.hkl`` and ``deformation.hkl`` -- X-ray structure factors for VESTA
  (:func:`vesta_hkl_text`);
* the figures of :func:`stages.plots.make_plots` (``disks*.png``, ``profiles*.png``,
  ``trace.png``, ``coarse.png``).

Derived quantities of a refined reflection (one table row per reflection; U_g refined):

* centric reflections: U is real along the allowed phase φ0 (:func:`~stages.physics.
  structure_factors.centric_phase`); the table gives the signed amplitude along φ0 (for Si in
  origin choice 2, φ0 = 0: U itself); acentric ones give |U| and the phase;
* V_g = h² U_g / (2 m e) [V] and the X-ray F_g via Mott-Bethe [electrons per cell] are linear in
  U_g at fixed hkl, so their standard errors are |dV/dU| σ_U and |dF/dU| σ_U (for acentric
  reflections the phase error enters as |dF/dU| |U| σ_φ, added in quadrature);
* U'_g: refined, else the run's absorption model as the forward model used it (proportional:
  U'_g = f U_g of the refined U_g; Bird & King: the model's value, which does not depend on U_g);
* X-ray F is reported in the crystallographic convention exp(+2πi h·x), the complex conjugate of
  this project's electron convention (:mod:`stages.physics.structure_factors`); for a
  centrosymmetric crystal with the origin at the centre the two are equal (real).

``qcbed report --compare RUN RUN ...`` (:func:`compare_runs`, :func:`write_comparison`) puts the
refined values of several runs side by side with their inverse-variance weighted mean, the scatter
and the reduced chi^2 of their consistency.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__
from .store import MANIFEST_ATTR, MANIFEST_FORMAT, open_store, replace_dir, write_error, write_manifest, writing

_LABEL = re.compile(r"^(?P<comp>[A-Za-z_]+)\((?P<h>-?\d+) (?P<k>-?\d+) (?P<l>-?\d+)\)$")
R_FACTOR_DEFINITION = ("R = Σ|I_exp − I_model| / Σ|I_exp| over the samples the figure of merit used "
                       "(per disk, and over all disks); I_model = scale × simulated + background")
CHI2_PER_POINT_DEFINITION = "Σ r² / n over the disk's used samples, r = (I_model − I_exp) / σ (the normalised residual)"
ZNCC_DEFINITION = ("ZNCC = Σ (e − ē)(s − s̄) / sqrt(Σ (e − ē)² Σ (s − s̄)²) per disk over the samples the figure of merit "
                   "used, e = experimental samples, s = simulated intensity (PSF applied); start: the start structure "
                   "factors with the geometry the inner loop finds for them; end: the optimum; mean: plain mean over "
                   "the disks")
#: how the standard errors of stores written before qcbed 0.7 were made (later stores record theirs in the
#: fine store's ``sigma_method`` attribute, :data:`stages.fine.SIGMA_METHOD`)
SIGMA_DEFINITION = ("standard errors from the Jacobian of the weighted residuals at the optimum, "
                    "cov = (JᵀJ)⁻¹ × max(1, reduced χ²); scale and backgrounds profiled")
#: |correlation| above which a pair of parameters is flagged
HIGH_CORRELATION = 0.9
#: a comparison flags a parameter whose runs disagree at this p-value of the chi^2 of consistency
DISAGREE_P = 0.01

#: columns of structure_factors.csv (one row per refined reflection), in order
SF_COLUMNS = (
    "h", "k", "l", "d_A", "g_invA", "centric", "phase0_deg",
    "U_iam", "U", "sigma_U", "U_phase_deg", "sigma_U_phase_deg", "U_change_percent", "U_source",
    "Uprime_iam", "Uprime", "sigma_Uprime", "Uprime_phase_deg", "sigma_Uprime_phase_deg", "Uprime_source",
    "V_iam", "V", "sigma_V",
    "F_x_iam_re", "F_x_iam_im", "F_x_re", "F_x_im", "F_x_abs", "sigma_F_x", "F_x_change",
)
SF_UNITS = {"d_A": "Å", "g_invA": "1/Å (no 2π)", "phase0_deg": "degree", "U_iam": "Å^-2", "U": "Å^-2",
            "sigma_U": "Å^-2", "U_phase_deg": "degree", "sigma_U_phase_deg": "degree", "U_change_percent": "%",
            "Uprime_iam": "Å^-2", "Uprime": "Å^-2", "sigma_Uprime": "Å^-2", "Uprime_phase_deg": "degree",
            "sigma_Uprime_phase_deg": "degree", "V_iam": "V", "V": "V", "sigma_V": "V",
            "F_x_iam_re": "electrons", "F_x_iam_im": "electrons", "F_x_re": "electrons", "F_x_im": "electrons",
            "F_x_abs": "electrons", "sigma_F_x": "electrons", "F_x_change": "electrons"}


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


def _hkl_text(hkl) -> str:
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


def report_key(run_dir) -> str:
    """The report stage key of a run folder, from the keys of its stores (as :func:`stages.pipeline.make_plan`)."""
    from .pipeline import report_stage_key

    st = load_stores(run_dir)
    return report_stage_key(st.fine.attrs.get("stage_key"), None if st.iam is None else st.iam.attrs.get("stage_key"),
                            None if st.coarse is None else st.coarse.attrs.get("stage_key"))


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


def structure_factor_rows(st: RunStores) -> list[dict]:
    """One dict per refined reflection (keys :data:`SF_COLUMNS`), from fine.zarr and structure_factors.zarr."""
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
        row = {
            "h": int(hkl[0]), "k": int(hkl[1]), "l": int(hkl[2]), "d_A": _num(1.0 / g if g > 0 else math.inf),
            "g_invA": _num(g), "centric": phi0 is not None,
            "phase0_deg": None if phi0 is None else math.degrees(phi0) + 0.0,
            "U_iam": 0.0 if zero else u_iam_p, "U": U["amp"],
            "sigma_U": _num(U["sigma"]), "U_phase_deg": _num(U["phase"]), "sigma_U_phase_deg": _num(U["sigma_phase"]),
            "U_change_percent": None if zero else 100.0 * (U["amp"] - u_iam_p) / abs(u_iam_p),
            "U_source": U["source"],
            "Uprime_iam": 0.0 if zero else proj(up_iam), "Uprime": _num(Up["amp"]), "sigma_Uprime": _num(Up["sigma"]),
            "Uprime_phase_deg": _num(Up["phase"]), "sigma_Uprime_phase_deg": _num(Up["sigma_phase"]),
            "Uprime_source": Up["source"],
            "V_iam": 0.0 if zero else float((kv * u_iam_p).real), "V": float((kv * U["amp"]).real),
            "sigma_V": None if sU is None else abs(kv) * sU,
            "F_x_iam_re": float(fxc_iam.real), "F_x_iam_im": float(fxc_iam.imag),
            "F_x_re": float(fxc.real), "F_x_im": float(fxc.imag), "F_x_abs": float(abs(fxc)),
            "sigma_F_x": None if s_rad is None else dfdu * s_rad,
            "F_x_change": float(abs(fxc) - abs(fxc_iam)) if phi0 is None else float(((fxc - fxc_iam) * np.conj(rot)).real),
        }
        rows.append(row)
    return rows


def fit_statistics(fine: xr.Dataset) -> dict:
    """Per disk: points used, background, R factor, chi^2 per point, ZNCC at the start and at the end;
    and the totals (the ZNCC of a fine.zarr written before it was recorded: None)."""
    disks = [(int(h), int(k), int(l)) for h, k, l in zip(fine.h.values, fine.k.values, fine.l.values)]
    out = {"r_factor_definition": R_FACTOR_DEFINITION, "chi2_per_point_definition": CHI2_PER_POINT_DEFINITION,
           "zncc_definition": ZNCC_DEFINITION, "disks": [], "r_factor": None,
           "zncc_mean_start": _num(fine.attrs.get("zncc_mean_start")), "zncc_mean": _num(fine.attrs.get("zncc_mean"))}
    bg = fine.background.values if "background" in fine else np.full(len(disks), np.nan)
    zn0 = fine.zncc_start.values if "zncc_start" in fine else np.full(len(disks), np.nan)
    zn = fine.zncc.values if "zncc" in fine else np.full(len(disks), np.nan)
    if "fit_used" not in fine:
        out["disks"] = [{"hkl": list(d), "background": _num(b), "zncc_start": _num(z0), "zncc": _num(z)}
                        for d, b, z0, z in zip(disks, bg, zn0, zn)]
        return out
    used = fine.fit_used.values.astype(bool)
    exp, model, res = fine.fit_exp.values, fine.fit_model.values, fine.fit_residual.values
    num_t = den_t = 0.0
    for i, d in enumerate(disks):
        u = used[i] & np.isfinite(exp[i]) & np.isfinite(model[i])
        num, den = float(np.abs(exp[i][u] - model[i][u]).sum()), float(np.abs(exp[i][u]).sum())
        num_t, den_t = num_t + num, den_t + den
        n = int(u.sum())
        out["disks"].append({"hkl": list(d), "n_points": n, "background": _num(bg[i]),
                             "r_factor": num / den if den > 0 else None,
                             "chi2_per_point": float((res[i][u] ** 2).sum() / n) if n else None,
                             "zncc_start": _num(zn0[i]), "zncc": _num(zn[i]),
                             "mean_counts": float(exp[i][u].mean()) if n else None})
    out["r_factor"] = num_t / den_t if den_t > 0 else None
    return out


def _geometry_table(fine: xr.Dataset) -> list[dict]:
    """Geometry parameters: value, sigma and start when refined (fixed ones: the value used)."""
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
        rows.append({"name": name, "value": float(v), "units": units.get(name, "px"), "refined": refined,
                     "sigma": None if i is None else _num(fine.sigma.values[i]),
                     "start": None if i is None else _num(fine.start.values[i])})
    return rows


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _reproducibility(st: RunStores) -> dict:
    fine, iam, rec = st.fine, st.iam, st.record
    run_dir = st.run_dir
    cfg_path = (rec or {}).get("config_path") or fine.attrs.get("config_file")
    cfg_text = (rec or {}).get("config_text")
    if cfg_text is None and cfg_path and Path(cfg_path).is_file():
        cfg_text = Path(cfg_path).read_text()
    if rec is not None and rec.get("versions"):
        versions, when = rec["versions"], "at run time (run.json)"
    else:
        from .pipeline import dependency_versions

        versions, when = dependency_versions(), "at report time (no run.json)"
    keys = {}
    for name, ds in (("iam", iam), ("coarse", st.coarse), ("fine", fine)):
        if ds is not None and ds.attrs.get("stage_key"):
            keys[name] = ds.attrs["stage_key"]
    cmd = (rec or {}).get("command")
    out = {
        "qcbed_version": fine.attrs.get("qcbed_version", __version__), "report_qcbed_version": __version__,
        "config_path": cfg_path, "config_sha256": None if cfg_text is None else _sha256_text(cfg_text),
        "stage_keys": (rec or {}).get("stage_keys") or keys,
        "input_digests": (rec or {}).get("input_digests"),
        "scattering_table": None if iam is None else iam.attrs.get("scattering_table"),
        "scattering_table_reference": None if iam is None else iam.attrs.get("scattering_table_reference"),
        "absorption_model": None if iam is None else iam.attrs.get("absorption_model"),
        "solver": None if iam is None else iam.attrs.get("solver"),
        "beam_selection": None if iam is None else json.loads(iam.attrs.get("beam_selection", "null")),
        "versions": versions, "versions_recorded": when,
        "command": " ".join(cmd) if isinstance(cmd, list) else cmd,
        "refined": fine.attrs.get("created"),
        "reproduce": f"qcbed run {cfg_path} --results {run_dir.parent}" if cfg_path else None,
        "verify": f"qcbed rerun {run_dir}", "regenerate_report": f"qcbed report {run_dir}",
    }
    return out


def summarize(run_dir) -> dict:
    """results.json: every number of the report, from the stores (full precision)."""
    st = run_dir if isinstance(run_dir, RunStores) else load_stores(run_dir)
    fine, iam, coarse = st.fine, st.iam, st.coarse
    a = fine.attrs
    params = []
    sf_rows = structure_factor_rows(st)
    by_hkl = {(r["h"], r["k"], r["l"]): r for r in sf_rows}
    for i, name in enumerate(fine.param.values.tolist()):
        row = {"name": name, "kind": str(fine.kind.values[i]), "units": str(fine.units.values[i]),
               "value": float(fine.value.values[i]), "sigma": _num(fine.sigma.values[i]),
               "start": float(fine.start.values[i])}
        if "range_lo" in fine:  # absent from fine.zarr stores written before the ranges were recorded
            row["range"] = [float(fine.range_lo.values[i]), float(fine.range_hi.values[i])]
            row["at_range_end"] = range_end(row["value"], *row["range"])
        if "gauss_newton_step" in fine:
            step = float(fine.gauss_newton_step.values[i])
            row["gauss_newton_step"] = step if math.isfinite(step) else None
        lab = parse_label(name)
        if lab is not None:
            comp, hkl = lab
            row["hkl"] = list(hkl)
            r = by_hkl.get(tuple(hkl))
            if r is not None:
                row["d_A"] = r["d_A"]
                if comp in ("U", "U_amp"):
                    row["iam"] = r["U_iam"]
                    row["change_percent"] = r["U_change_percent"]
                elif comp in ("Uprime", "Uprime_amp"):
                    row["iam"] = r["Uprime_iam"]
                    row["change_percent"] = (None if not r["Uprime_iam"] else
                                             100.0 * (row["value"] - r["Uprime_iam"]) / abs(r["Uprime_iam"]))
        params.append(row)
    pg = json.loads(a["pattern_geometry"])
    crystal = json.loads(iam.attrs["crystal"]) if iam is not None and "crystal" in iam.attrs else {}
    names = fine.param.values.tolist()
    corr = fine.correlation.values
    high = [{"a": names[i], "b": names[j], "r": float(corr[i, j])} for i in range(len(names))
            for j in range(i + 1, len(names)) if abs(corr[i, j]) > HIGH_CORRELATION]
    out = {
        "run": st.run_dir.name, "qcbed_version": __version__,
        "pattern_kind": pg.get("kind"),
        "crystal": {k: crystal.get(k) for k in ("name", "cell", "spacegroup", "volume_A3", "source")} if crystal else None,
        "microscope": None if iam is None else {"hv_kV": iam.attrs.get("hv_kV"), "zone": iam.attrs.get("zone"),
                                                 "x_axis": iam.attrs.get("x_axis")},
        "gof_name": a["gof_name"], "gof": a["gof"], "gof_start": a["gof_start"], "converged": bool(a["converged"]),
        "n_points": int(a["n_points"]), "dof": int(a["dof"]), "n_parameters": len(names),
        "scale": a["scale"], "background": fine.background.values.tolist(),
        "parameters": params,
        "structure_factors": sf_rows,
        "correlation": {"names": names, "matrix": corr.tolist(), "high": high, "threshold": HIGH_CORRELATION},
        "sigma_definition": a.get("sigma_method") or SIGMA_DEFINITION,
        "sigma_defined": bool(a.get("sigma_defined", 1)),
        "dof_effective": _num(a.get("dof_effective")),
        "chi2_effective": _num(a.get("chi2_effective")),
        "barely_determined": json.loads(a.get("barely_determined", "{}") or "{}"),
        "barely_determined_limit_px": _num(a.get("barely_determined_limit_px")),
        "fit": fit_statistics(fine),
        "geometry": json.loads(a["geometry"]), "geometry_table": _geometry_table(fine), "pattern_geometry": pg,
        "counters": json.loads(a["counters"]),
        "beams": json.loads(a.get("beams", "{}") or "{}"),
        "beam_probe": json.loads(a.get("beam_probe", "{}") or "{}"),
        "resumed_from_iteration": None if a.get("resumed_from_iteration", -1) < 0 else int(a["resumed_from_iteration"]),
        "iterations": int(fine.iteration.values[-1]) if "iteration" in fine.coords and fine.sizes.get("iteration") else 0,
        "reproducibility": _reproducibility(st),
    }
    if coarse is not None:
        cc = json.loads(coarse.attrs.get("counters", "{}"))
        out["coarse"] = {"thickness_A": coarse.attrs["thickness_A"], "ncc": coarse.attrs["ncc"],
                         # the config's thickness and the bracket searched (absent from stores written before)
                         "thickness_start_A": _num(coarse.attrs.get("thickness_start_A")),
                         "thickness_bracket_A": coarse.attrs.get("thickness_bracket_A"),
                         "ncc_per_disk": coarse.ncc_per_disk.values.tolist(),
                         "disks": [[int(h), int(k), int(l)] for h, k, l in zip(coarse.h.values, coarse.k.values, coarse.l.values)],
                         "shift_px": list(coarse.attrs["shift_px"]), "at_edge": bool(coarse.attrs.get("at_edge", 0)),
                         "at_bound": bool(coarse.attrs.get("at_bound", 0)), "wall_s": cc.get("stage_wall_s", cc.get("wall_s")),
                         "eigen_solves": cc.get("eigen_solves"), "tilts_solved": cc.get("tilts_solved"),
                         "by_step": cc.get("by_step"),
                         # coarse.refine: voltage / cell / B with standard errors, and what the iam and fine
                         # stages took from them
                         "refined": json.loads(coarse.attrs.get("physics", "[]") or "[]"),
                         "refined_model": json.loads(coarse.attrs.get("refined_model", "{}") or "{}"),
                         "sigma_definition": coarse.attrs.get("physics_sigma_definition"),
                         "holz_lines": bool(coarse.attrs.get("holz_lines", 0))}
    # kept for older readers of results.json
    out["reproduce"] = {"config": out["reproducibility"]["config_path"], "versions": out["reproducibility"]["versions"],
                        "command": out["reproducibility"]["verify"]}
    out["warnings"] = _warnings(out)
    return out


#: a Gauss-Newton step from the reported point larger than this many sigma is reported
GAUSS_NEWTON_SIGMAS = 2.0

#: a refined value closer than this fraction of its search range's width to an end is "at the end"
RANGE_END_FRACTION = 0.02


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


def _warnings(s: dict) -> list[str]:
    w = []
    pr = s.get("beam_probe") or {}
    if pr and not pr.get("met", True):
        w.append(f"The beam sets are {100 * pr['error']:.2f} % of a disk's maximum from the probe's reference, above "
                 f"the target {100 * pr['accuracy']:.2f} % (simulation.beam_accuracy): "
                 + ("raise simulation.sg_strong or remove it (the probe then sizes the beam sets)."
                    if len(pr.get("ladder", [])) == 1 else "the largest beam set tried was used; raise simulation.sg_max."))
    if not s["converged"]:
        w.append(f"The refinement did not converge within {s['iterations']} iterations: the values are the best point "
                 "so far (raise refine.max_iterations or set refine.gauss_newton_steps; the run continues from its "
                 "checkpoints).")
    if s["gof_name"].startswith("Chi2") and s["gof"] > 2.0:
        w.append(f"Reduced χ² = {s['gof']:.3g} > 2: the model does not describe the data within the noise "
                 "(standard errors are scaled up by it).")
    for h in s["correlation"]["high"]:
        w.append(f"{h['a']} and {h['b']} are strongly correlated (r = {h['r']:+.3f}): their individual errors are "
                 "not independent.")
    if not s.get("sigma_defined", True):
        w.append(f"Standard errors are undefined: {s['sigma_definition']}.")
    for p in s["parameters"] if s.get("sigma_defined", True) else ():
        if not (p["sigma"] is not None and p["sigma"] > 0):
            w.append(f"{p['name']}: no standard error (the fit does not constrain it).")
    bd = s.get("barely_determined") or {}
    if bd:
        w.append("Barely determined: " + ", ".join(f"{n} (one σ moves the samples by {d:.2g} px)" for n, d in bd.items())
                 + f". Above {fmt(s.get('barely_determined_limit_px'))} px the pixel-scale structure of the interpolated noise makes "
                   "the linearised errors of these and of the parameters correlated with them too large (bench/"
                   "coverage.py, systematic row: the shift across the row scattered by 0.45 σ); fix them, or add "
                   "disks or tilts that constrain them.")
    far = [p for p in s["parameters"] if p.get("gauss_newton_step") is not None and (p["sigma"] or 0) > 0
           and abs(p["gauss_newton_step"]) > GAUSS_NEWTON_SIGMAS * p["sigma"]]
    if far:
        worst = sorted(far, key=lambda p: -abs(p["gauss_newton_step"]) / p["sigma"])[:3]
        w.append("The optimum lies further from the reported values than their errors: the Gauss-Newton step from "
                 "the reported point predicts " + ", ".join(
                     f"{p['name']} {fmt(p['value'])} → {fmt(p['value'] + p['gauss_newton_step'])} "
                     f"({abs(p['gauss_newton_step']) / p['sigma']:.3g} σ)" for p in worst)
                 + " (raise refine.max_iterations or set refine.gauss_newton_steps; the run continues from its "
                   "checkpoints).")
    for p in s["parameters"]:
        end = p.get("at_range_end")
        if end:
            lo, hi = p["range"]
            fix = ("widen the reflection's range_percent or U_range/Uprime_range in refine.reflections"
                   if p["kind"] == "structure_factor" else "start it closer (geometry or coarse stage)")
            w.append(f"{p['name']} = {fmt(p['value'])} ended at the {end} end of its search range "
                     f"[{fmt(lo)}, {fmt(hi)}]: the optimum may lie outside it ({fix}).")
    co = s.get("coarse")
    if co and (co["at_edge"] or co["at_bound"]):
        w.append("The coarse search ended at the edge of its range (thickness bracket or orientation window): widen it.")
    for p in (co or {}).get("refined", []):
        if p.get("at_range_end"):
            lo, hi = p["range"]
            w.append(f"Coarse {p['label']} = {fmt(p['value'])} {p['units']} ended at the {p['at_range_end']} end of its "
                     f"range [{fmt(lo)}, {fmt(hi)}]: the optimum may lie outside it (widen {_COARSE_RANGE_KEY[p['quantity']]}).")
    if co and any(p["quantity"] in ("voltage", "cell") for p in co.get("refined", [])) and not co.get("holz_lines"):
        w.append("The coarse voltage / cell fit ran with simulation.holz_lines off: HOLZ beams near their Bragg condition "
                 "that couple weakly are left out of the model, and their lines with them (the cell 0.26 % off instead of "
                 "0.02 % in tests/test_coarse.py); set holz_lines = true.")
    return w


#: the config key that sets the search range of each coarse.refine quantity
_COARSE_RANGE_KEY = {"voltage": "coarse.hv_range_kV", "cell": "coarse.cell_range_percent", "B": "coarse.B_range_A2"}


# ============================================================================ number formatting
def _exp10(x: float) -> int:
    return int(math.floor(math.log10(abs(x))))


def fmt(v, sigma=None, digits: int = 6) -> str:
    """A value for reading: with sigma, rounded to sigma's 2 significant digits ('0.048833 ± 0.000032');
    without, ``digits`` significant digits."""
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


def _hkl_label(h) -> str:
    return " ".join(str(int(x)) for x in h)


# ============================================================================ tables (shared by md and html)
class Cell:
    """A table cell: display text, and for numbers the exact value (HTML data-value) and a key for tests."""

    def __init__(self, text, value=None, sigma=None, key=None, cls=None):
        self.text, self.value, self.sigma, self.key, self.cls = str(text), value, sigma, key, cls


def N(v, sigma=None, key=None, digits=6, unit="") -> Cell:
    return Cell(fmt(v, sigma, digits) + (f" {unit}" if unit and v is not None else ""), value=v, sigma=sigma, key=key,
                cls="num")


def _unit(u: str) -> str:
    return {"Å^-2": "Å⁻²", "deg": "°"}.get(u, u)


def _complex_text(re_, im_, sigma=None) -> str:
    if im_ == 0.0:
        return fmt(re_, sigma)
    return f"{fmt(re_)} {'+' if im_ >= 0 else '−'} {fmt(abs(im_))}i" + ("" if sigma is None else f" (σ|F| {fmt(sigma, digits=2)})")


def _sf_tables(s: dict) -> list[tuple[list[str], list[list[Cell]]]]:
    """Electron (U, U′, V) and X-ray (Mott-Bethe F) structure factors, one row per refined reflection."""
    head_e = ["hkl", "d (Å)", "U_g IAM (Å⁻²)", "U_g refined (Å⁻²)", "change from IAM", "U′_g (Å⁻²)", "V_g (V)"]
    head_x = ["hkl", "d (Å)", "F_x IAM (e)", "F_x refined (e)", "ΔF_x (e)"]
    rows_e, rows_x = [], []
    for r in s["structure_factors"]:
        hkl = _hkl_label((r["h"], r["k"], r["l"]))
        k = f"sf/{hkl}"
        label = Cell(hkl + ("" if r["centric"] else " (acentric)"), cls="hkl")
        phase = "" if r["centric"] else f" ∠ {fmt(r['U_phase_deg'], r['sigma_U_phase_deg'])}°"
        ch = r["U_change_percent"]
        rows_e.append([
            label, N(r["d_A"], key=f"{k}/d_A", digits=5), N(r["U_iam"], key=f"{k}/U_iam"),
            Cell(fmt(r["U"], r["sigma_U"]) + phase, value=r["U"], sigma=r["sigma_U"], key=f"{k}/U", cls="num"),
            Cell("zero in the IAM" if ch is None else f"{ch:+.3f} %", value=ch, key=f"{k}/U_change_percent", cls="num"),
            Cell(fmt(r["Uprime"], r["sigma_Uprime"]), value=r["Uprime"], sigma=r["sigma_Uprime"], key=f"{k}/Uprime",
                 cls="num"),
            N(r["V"], r["sigma_V"], key=f"{k}/V")])
        rows_x.append([
            label, N(r["d_A"], digits=5),
            Cell(_complex_text(r["F_x_iam_re"], r["F_x_iam_im"]), value=r["F_x_iam_re"], key=f"{k}/F_x_iam_re", cls="num"),
            Cell(_complex_text(r["F_x_re"], r["F_x_im"], r["sigma_F_x"]), value=r["F_x_re"], sigma=r["sigma_F_x"],
                 key=f"{k}/F_x_re", cls="num"),
            N(r["F_x_change"], r["sigma_F_x"], key=f"{k}/F_x_change")])
    return [(head_e, rows_e), (head_x, rows_x)]


def _param_table(s: dict) -> tuple[list[str], list[list[Cell]]]:
    has_range = any("range" in p for p in s["parameters"])
    has_step = any(p.get("gauss_newton_step") is not None for p in s["parameters"])
    head = (["parameter", "units", "start", "refined ± σ", "IAM", "change from IAM"] + (["search range"] if has_range else [])
            + (["Gauss-Newton step / σ"] if has_step else []))
    rows = []
    for p in s["parameters"]:
        k = f"param/{p['name']}"
        ch = p.get("change_percent")
        row = [Cell(p["name"]), Cell(_unit(p["units"])), N(p["start"], key=f"{k}/start"),
               Cell(fmt(p["value"], p["sigma"]), value=p["value"], sigma=p["sigma"], key=f"{k}/value", cls="num"),
               N(p.get("iam"), key=f"{k}/iam") if "iam" in p else Cell(""),
               Cell("" if "iam" not in p else ("zero in the IAM" if ch is None else f"{ch:+.3f} %"),
                    value=ch, key=None if ch is None else f"{k}/change_percent", cls="num")]
        if has_range:
            r = p.get("range")
            end = p.get("at_range_end")
            row.append(Cell("" if r is None else f"[{fmt(r[0])}, {fmt(r[1])}]" + (f" (at the {end} end)" if end else ""),
                            cls="num" + (" hi" if end else "")))
        if has_step:
            st, sg = p.get("gauss_newton_step"), p["sigma"]
            ratio = st / sg if st is not None and sg is not None and math.isfinite(sg) and sg > 0 else None
            row.append(Cell("—" if ratio is None else f"{ratio:+.2f}", value=ratio,
                            cls="num" + (" hi" if ratio is not None and abs(ratio) > GAUSS_NEWTON_SIGMAS else "")))
        rows.append(row)
    return head, rows


def _corr_table(s: dict) -> tuple[list[str], list[list[Cell]]]:
    names = s["correlation"]["names"]
    m = s["correlation"]["matrix"]
    head = [""] + names
    rows = []
    for i, a in enumerate(names):
        row = [Cell(a)]
        for j, b in enumerate(names):
            r = m[i][j]
            cls = "num" + (" hi" if i != j and abs(r) > HIGH_CORRELATION else "")
            row.append(Cell(f"{r:+.3f}", value=r, key=f"corr/{a}/{b}", cls=cls))
        rows.append(row)
    return head, rows


def _disk_table(s: dict) -> tuple[list[str], list[list[Cell]]]:
    head = ["disk", "points used", "background", "R", "ZNCC start", "ZNCC end", "χ² per point", "mean counts"]
    rows = []
    for d in s["fit"]["disks"]:
        k = f"disk/{_hkl_label(d['hkl'])}"
        rows.append([Cell(_hkl_label(d["hkl"])), N(d.get("n_points"), key=f"{k}/n_points"),
                     N(d.get("background"), key=f"{k}/background", digits=5),
                     N(d.get("r_factor"), key=f"{k}/r_factor", digits=4),
                     N(d.get("zncc_start"), key=f"{k}/zncc_start", digits=5),
                     N(d.get("zncc"), key=f"{k}/zncc", digits=5),
                     N(d.get("chi2_per_point"), key=f"{k}/chi2_per_point", digits=4),
                     N(d.get("mean_counts"), key=f"{k}/mean_counts", digits=5)])
    return head, rows


def _geometry_rows(s: dict) -> tuple[list[str], list[list[Cell]]]:
    head = ["parameter", "value (± σ when refined)", "start", "units", ""]
    rows = []
    for g in s["geometry_table"]:
        k = f"geometry/{g['name']}"
        rows.append([Cell(g["name"]), Cell(fmt(g["value"], g["sigma"]), value=g["value"], sigma=g["sigma"], key=k, cls="num"),
                     N(g["start"], key=None if g["start"] is None else f"{k}/start"),
                     Cell(_unit(g["units"])), Cell("refined" if g["refined"] else "fixed")])
    return head, rows


def _fit_summary_rows(s: dict) -> tuple[list[str], list[list[Cell]]]:
    c = s["counters"]
    chi = s["gof_name"].startswith("Chi2")
    rows = [
        [Cell(f"{s['gof_name']} (reduced{' χ²' if chi else ''}), start → end"),
         Cell(f"{fmt(s['gof_start'])} → {fmt(s['gof'])}", value=s["gof"], key="fit/gof", cls="num")],
        [Cell("R factor, all disks"), N(s["fit"]["r_factor"], key="fit/r_factor", digits=4)],
        [Cell("mean ZNCC over disks, start → end"),
         Cell("—" if s["fit"].get("zncc_mean") is None else
              f"{fmt(s['fit'].get('zncc_mean_start'), digits=5)} → {fmt(s['fit']['zncc_mean'], digits=5)}",
              value=s["fit"].get("zncc_mean"), key="fit/zncc_mean", cls="num")],
        [Cell("points used"), N(s["n_points"], key="fit/n_points")],
        [Cell("refined parameters (+ scale and backgrounds, profiled)"), N(s["n_parameters"], key="fit/n_parameters")],
        [Cell("degrees of freedom"), N(s["dof"], key="fit/dof")],
        [Cell("effective degrees of freedom ν_eff (samples share pixel noise)"),
         N(s.get("dof_effective"), key="fit/dof_effective", digits=5)],
        [Cell("χ²/ν_eff (σ are scaled by it where > 1)"), N(s.get("chi2_effective"), key="fit/chi2_effective", digits=4)],
        [Cell("scale (counts per unit incident intensity)"), N(s["scale"], key="fit/scale")],
        [Cell("outer iterations"), N(s["iterations"], key="fit/iterations")],
        [Cell("converged"), Cell("yes" if s["converged"] else "NO")],
        [Cell("eigen-solves"), N(c.get("eigen_solves"), key="counters/eigen_solves")],
        [Cell("inner (geometry) evaluations"), N(c.get("inner_evaluations"), key="counters/inner_evaluations")],
        [Cell("outer (structure-factor) evaluations"), N(c.get("outer_evaluations"), key="counters/outer_evaluations")],
        [Cell("time in eigen-solves"), N(c.get("solve_s"), key="counters/solve_s", digits=3, unit="s")],
        [Cell("time in geometry searches"), N(c.get("inner_s"), key="counters/inner_s", digits=3, unit="s")],
        [Cell("total refinement time"), N(c.get("total_s"), key="counters/total_s", digits=3, unit="s")],
    ]
    if c.get("lm_stop"):
        rows.append([Cell("Levenberg-Marquardt: steps (kept), stop"),
                     Cell(f"{c.get('lm_steps')} ({c.get('lm_accepted')}): {c['lm_stop']}; largest remaining step "
                          f"{fmt(c.get('lm_max_step_sigma'), digits=2)} sigma (structure factors and thickness)")])
    if c.get("tilts_solved") is not None:
        rows.append([Cell("tilts solved (all eigen-solves): hermitian / general"),
                     Cell(f"{c['tilts_solved']}: {c.get('tilts_hermitian', 0)} / {c.get('tilts_general', 0)}")])
    b, pr = s.get("beams") or {}, s.get("beam_probe") or {}
    if b:
        rows.append([Cell("beam sets (tiles), strong beams per tile, Bethe beams (max)"),
                     Cell(f"{b['tiles']}, {b['n_strong_min']}-{b['n_strong_max']} (mean {b['n_strong_mean']:.0f}), "
                          f"{b['n_bethe_max']}")])
    if pr:
        rows.append([Cell("beam probe: sg_strong, error / target (of each disk's maximum)"),
                     Cell(f"{pr['sg_strong']} 1/Å, {100 * pr['error']:.2f} % / {100 * pr['accuracy']:.2f} % "
                          f"({'met' if pr['met'] else 'NOT met'}; worst beam {_hkl_label(pr['worst_beam'])}; "
                          f"reference up to {pr['n_reference_max']} beams, {pr['n_probe_tilts']} tilts, "
                          f"{pr['wall_s']:.1f} s)", value=pr["error"], key="beam_probe/error")])
        if pr.get("laue_zones"):
            d, asked = pr.get("holz_difference"), pr.get("laue_zones_config")
            if asked == "auto" and d is not None:
                why = (f"auto: the ZOLZ and HOLZ models differ by {100 * d:.2f} % of a disk's maximum (beam "
                       f"{_hkl_label(pr.get('holz_difference_beam') or [0, 0, 0])}; target {100 * pr['accuracy']:.2f} %)")
            else:
                why = f'as configured (simulation.laue_zones = "{asked}")'
            kind = "zero-order Laue zone only (ZOLZ)" if pr["laue_zones"] == "zolz" else "every Laue zone (HOLZ)"
            rows.append([Cell("Laue zones modelled"), Cell(f"{kind}; {why}", value=d, key="beam_probe/holz_difference")])
    if s.get("resumed_from_iteration") is not None:
        rows.append([Cell("resumed after iteration"), N(s["resumed_from_iteration"])])
    if s.get("coarse") and s["coarse"].get("wall_s") is not None:
        co = s["coarse"]
        rows.append([Cell("coarse stage time"), N(co["wall_s"], key="coarse/wall_s", digits=3, unit="s")])
        if co.get("eigen_solves") is not None:
            steps = ", ".join(f"{k.replace('_', ' ')} {v['eigen_solves']} ({v['wall_s']:.1f} s)"
                              for k, v in (co.get("by_step") or {}).items())
            rows.append([Cell("coarse eigen-solves (every sub-step)" + (f": {steps}" if steps else "")),
                         N(co["eigen_solves"], key="coarse/eigen_solves")])
    return ["", ""], rows


def _coarse_rows(s: dict) -> tuple[list[str], list[list[Cell]]]:
    co = s["coarse"]
    rows = [[Cell("thickness"), N(co["thickness_A"], key="coarse/thickness_A", unit="Å")]]
    if co.get("thickness_start_A") is not None:
        br = co.get("thickness_bracket_A")
        rows.append([Cell("thickness at the start (config), bracket searched"),
                     Cell(f"{fmt(co['thickness_start_A'])} Å" + (f", [{fmt(br[0])}, {fmt(br[1])}] Å" if br else ""))])
    rows += [
            [Cell("joint NCC"), N(co["ncc"], key="coarse/ncc", digits=5)],
            [Cell("orientation shift (row, col)"), Cell(f"{fmt(co['shift_px'][0], digits=4)}, {fmt(co['shift_px'][1], digits=4)} px")]]
    for d, v in zip(co["disks"], co["ncc_per_disk"]):
        rows.append([Cell(f"NCC of disk {_hkl_label(d)}"), N(v, key=f"coarse/ncc/{_hkl_label(d)}", digits=4)])
    return ["", ""], rows


def _coarse_physics_table(s: dict) -> tuple[list[str], list[list[Cell]]]:
    """One row per quantity the coarse stage refined (coarse.refine): start, refined ± σ, search range."""
    head = ["quantity", "units", "start", "refined ± σ", "search range"]
    rows = []
    for p in s["coarse"]["refined"]:
        k = f"coarse/{p['name']}"
        lo, hi = p["range"]
        end = p.get("at_range_end")
        rows.append([Cell(p["label"]), Cell(_unit(p["units"]).replace("^2", "²")), N(p["start"], key=f"{k}/start"),
                     Cell(fmt(p["value"], p["sigma"]), value=p["value"], sigma=p["sigma"], key=f"{k}/value", cls="num"),
                     Cell(f"[{fmt(lo)}, {fmt(hi)}]" + (f" (at the {end} end)" if end else ""),
                          cls="num" + (" hi" if end else ""))])
    return head, rows


def _coarse_physics_notes(s: dict) -> list[str]:
    co = s["coarse"]
    used = co.get("refined_model") or {}
    what = [w for w, k in (("the voltage", "hv_kV"), ("the cell", "cell"), ("B", "b_iso_A2")) if k in used]
    return [f"The fine refinement and the structure-factor tables (IAM, V_g, Mott-Bethe F_x) use {' and '.join(what)} "
            "as refined here; the search ranges come from coarse.hv_range_kV, cell_range_percent and B_range_A2.",
            "σ: " + (co.get("sigma_definition") or "") + "."]


def _repro_rows(s: dict) -> tuple[list[str], list[list[Cell]]]:
    r = s["reproducibility"]
    v = r.get("versions") or {}
    rows = [[Cell("qcbed version (refinement / report)"), Cell(f"{r['qcbed_version']} / {r['report_qcbed_version']}")],
            [Cell("config"), Cell(f"{r['config_path']}")],
            [Cell("config sha256"), Cell(r["config_sha256"] or "—", cls="mono")],
            [Cell("refined"), Cell(r.get("refined") or "—")],
            [Cell("scattering table"), Cell(f"{r['scattering_table']} ({r['scattering_table_reference']})")],
            [Cell("absorption model"), Cell(r["absorption_model"] or "—")],
            [Cell("eigen-solver"), Cell(r.get("solver") or "—")],
            [Cell(f"versions ({r['versions_recorded']})"),
             Cell(", ".join(f"{k} {x}" for k, x in v.items() if k in ("python", "numpy", "scipy", "xarray", "zarr",
                                                                        "prefect", "dask", "gemmi")))],
            [Cell("command of the run"), Cell(r.get("command") or "—", cls="mono")],
            [Cell("reproduce from scratch"), Cell(r.get("reproduce") or "—", cls="mono")],
            [Cell("check the reproduction"), Cell(r["verify"], cls="mono")],
            [Cell("regenerate this report"), Cell(r["regenerate_report"], cls="mono")]]
    for k, key in (r.get("stage_keys") or {}).items():
        rows.append([Cell(f"stage key: {k}"), Cell(key, cls="mono")])
    return ["", ""], rows


# ============================================================================ documents
SF_NOTES = [
    "U_g, U′_g in Å⁻² (U = 2meV/h², γ included); V_g = h²U_g/(2m₀e) in volts; X-ray F_x in electrons per cell "
    "from U_g by Mott-Bethe (nuclear term from the IAM positions and Debye-Waller factors).",
    "Centric reflections: U_g is real along the phase allowed by symmetry (0° for a centre at the origin); the "
    "table gives its signed value. Acentric: |U_g| ∠ phase.",
    "F_x in the crystallographic convention exp(+2πi h·x) (complex conjugate of the electron convention of "
    "structure_factors.zarr). ΔF_x = F_x − F_x(IAM) (along the centric phase).",
    "σ: " + SIGMA_DEFINITION + ". V_g and F_x are linear in U_g at fixed hkl: σ propagated linearly.",
    "U′_g not refined: from the run's absorption model, as the simulation used it.",
]

_UPRIME_NOTES = {
    "proportional": "U′_g not refined: proportional absorption, U′ = f × the refined U_g (as the simulation used it).",
    "bird_king": "U′_g not refined: thermal diffuse scattering absorption (Bird & King 1990) from the IAM atoms and "
                 "their B, independent of the refined U_g (as the simulation used it).",
    "none": "U′_g = 0: the run has no absorption model.",
}


def sf_notes(absorption_model: str | None, sigma_definition: str | None = None) -> list[str]:
    """The notes under the structure-factor tables; the U′_g line names the run's absorption model
    (the ``absorption_model`` attribute of structure_factors.zarr, e.g. 'bird_king: ...'), the σ line the
    run's way of making its standard errors (or why they are undefined)."""
    kind = (absorption_model or "").split(":")[0].strip()
    notes = SF_NOTES[:-1] + [_UPRIME_NOTES.get(kind, SF_NOTES[-1])]
    if sigma_definition:
        notes[3] = "σ: " + sigma_definition + ". V_g and F_x are linear in U_g at fixed hkl: σ propagated linearly."
    return notes


def _sections(s: dict) -> list[tuple[str, str, object]]:
    """The report as (kind, title, content) blocks, rendered by :func:`render_markdown` / :func:`render_html`."""
    cr = s.get("crystal") or {}
    mic = s.get("microscope") or {}
    blocks = []
    lead = (f"{(s['pattern_kind'] or '').upper()} pattern of {cr.get('name', '?')} ({cr.get('spacegroup', '?')}), "
            f"{fmt(mic.get('hv_kV'))} kV, zone [{' '.join(str(x) for x in mic.get('zone') or [])}]. "
            f"{s['gof_name']}: {fmt(s['gof_start'])} → {fmt(s['gof'])} (reduced), {s['n_points']} points, "
            f"{s['dof']} degrees of freedom, R = {fmt(s['fit']['r_factor'], digits=4)}; "
            f"{'converged' if s['converged'] else 'NOT converged'} after {s['iterations']} iterations"
            + (f" and {s['counters']['gauss_newton_steps']} Gauss-Newton steps ({s['gof_name']} "
               f"{fmt(s['counters']['gof_before_gauss_newton'])} before them)"
               if (s.get("counters") or {}).get("gauss_newton_steps") else "")
            + (f" (resumed after iteration {s['resumed_from_iteration']})" if s.get("resumed_from_iteration") is not None
               else "") + ".")
    blocks.append(("p", "", lead))
    if s["warnings"]:
        blocks.append(("warn", "Check", s["warnings"]))
    blocks.append(("h2", "Refined parameters", None))
    blocks.append(("table", "", _param_table(s)))
    co = s.get("coarse")
    if co:
        t0 = co.get("thickness_start_A")
        blocks.append(("notes", "", [
            "start: where the fine stage started: the thickness and orientation from the coarse stage"
            + (f" (thickness {fmt(t0)} Å in the config → {fmt(co['thickness_A'])} Å)" if t0 is not None else "")
            + ", the rest from the config; shifts from the config's centre, at the coarse stage's orientation."]))
    blocks.append(("h2", "Structure factors", None))
    if s["structure_factors"]:
        (he, re_), (hx, rx) = _sf_tables(s)
        blocks.append(("h3", "Electron structure factors", None))
        blocks.append(("table", "", (he, re_)))
        blocks.append(("h3", "X-ray structure factors (Mott-Bethe)", None))
        blocks.append(("table", "", (hx, rx)))
    else:
        blocks.append(("p", "", "No structure factor was refined (or structure_factors.zarr is missing)."))
    blocks.append(("notes", "", sf_notes(s["reproducibility"].get("absorption_model"), s.get("sigma_definition"))))
    blocks.append(("h3", "Correlation matrix", None))
    blocks.append(("table", "corr", _corr_table(s)))
    blocks.append(("h2", "Fit", None))
    blocks.append(("table", "", _fit_summary_rows(s)))
    blocks.append(("table", "", _disk_table(s)))
    blocks.append(("notes", "", [s["fit"]["r_factor_definition"] + ".", "χ² per point: " +
                                 s["fit"]["chi2_per_point_definition"] + ".", ZNCC_DEFINITION + "."]))
    blocks.append(("images", "disks", "Experimental, simulated and difference per disk (shared colour scale)"))
    blocks.append(("images", "profiles", "Line profiles through the regions of interest"))
    blocks.append(("h2", "Refinement trace", None))
    blocks.append(("images", "trace", "Figure of merit and refined structure factors against iteration"))
    blocks.append(("h2", "Geometry", None))
    blocks.append(("table", "", _geometry_rows(s)))
    pg = s["pattern_geometry"]
    blocks.append(("p", "", f"Pattern geometry: centre {pg.get('centre_px')} px, tilt0 "
                            f"{[round(x, 4) for x in pg.get('tilt0', [])]} (hkl units), scale_y {pg.get('scale_y')}, "
                            f"flip {pg.get('flip')}."))
    if s.get("coarse"):
        refined = s["coarse"].get("refined") or []
        extra = "".join(f", {q}" for q in dict.fromkeys(
            {"voltage": "voltage", "cell": "cell", "B": "Debye-Waller B"}[p["quantity"]] for p in refined))
        title = f"thickness, orientation{extra}" if refined else "thickness and orientation"
        blocks.append(("h2", f"Coarse stage ({title} by correlation)", None))
        if refined:
            blocks.append(("table", "", _coarse_physics_table(s)))
            blocks.append(("notes", "", _coarse_physics_notes(s)))
        blocks.append(("table", "", _coarse_rows(s)))
        blocks.append(("images", "coarse", "Thickness scan and correlation per disk"))
    blocks.append(("h2", "Files", None))
    blocks.append(("files", "", None))
    blocks.append(("h2", "Reproducibility", None))
    blocks.append(("table", "repro", _repro_rows(s)))
    return blocks


REPORT_FILES = [
    ("report.html", "this report, self-contained"), ("report.md", "the same in Markdown"),
    ("results.json", "every number, full precision"),
    ("structure_factors.csv", "refined structure factors, one row per reflection"),
    ("correlation.csv", "correlation matrix of the refined parameters"),
    ("structure_factors.hkl", "X-ray F for VESTA (refined; IAM where not refined): Fourier synthesis = refined density"),
    ("deformation.hkl", "F(refined) − F(IAM) for VESTA: Fourier synthesis = deformation density"),
]


def _image_groups(images: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """{'disks': [(file name, path or data URI)], ...} by file-name prefix."""
    out: dict = {}
    for name in sorted(images):
        stem = Path(name).stem
        group = stem.split("-")[0]
        out.setdefault(group, []).append((name, images[name]))
    return out


def _md_cell(c: Cell) -> str:
    return c.text.replace("|", "\\|")


def render_markdown(s: dict, images: dict[str, str] | None = None) -> str:
    """report.md; ``images``: {file name: relative path} (None: no figures, e.g. a Prefect artifact)."""
    groups = _image_groups(images or {})
    lines = [f"# qcbed run `{s['run']}`", ""]
    for kind, title, content in _sections(s):
        if kind == "p":
            lines += [content, ""]
        elif kind == "warn":
            lines += ["**Check:**", ""] + [f"- {w}" for w in content] + [""]
        elif kind in ("h2", "h3"):
            lines += [("## " if kind == "h2" else "### ") + title, ""]
        elif kind == "table":
            head, rows = content
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" for _ in head) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif kind == "notes":
            lines += [f"- {n}" for n in content] + [""]
        elif kind == "images":
            for name, path in groups.get(title, []):
                lines += [f"![{content}]({path})", ""]
        elif kind == "files":
            lines += [f"- [`{f}`]({f}): {what}" for f, what in REPORT_FILES] + [""]
    return "\n".join(lines)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;max-width:1180px;margin:2em auto;padding:0 1.2em}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
h3{margin-top:1.3em}table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.28em .6em;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.hi{background:#ffe7c2;font-weight:600}tr:nth-child(even) td{background:#fafbfc}tr:nth-child(even) td.hi{background:#ffe7c2}
.mono,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}
.warn{background:#fff8e1;border-left:4px solid #e0a800;padding:.5em 1em;margin:1em 0}.warn ul{margin:.3em 0}
.notes{color:#57606a;font-size:.9em}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.9em}td.hkl{white-space:nowrap}.scroll{overflow-x:auto}.corr td{min-width:4.2em}footer{margin-top:3em;color:#57606a;font-size:.85em}
"""
# sets body data attributes once every image has decoded (naturalWidth > 0) and records script errors:
# read back by the headless-browser test
_JS = """
(function(){var errs=[];window.addEventListener('error',function(e){errs.push(String(e.message||e));
document.body.setAttribute('data-errors',String(errs.length));});
window.addEventListener('load',function(){var im=document.images,ok=0;for(var i=0;i<im.length;i++){
if(im[i].complete&&im[i].naturalWidth>0)ok++;}document.body.setAttribute('data-images',ok+'/'+im.length);
document.body.setAttribute('data-images-ok',String(ok===im.length));
document.body.setAttribute('data-errors',String(errs.length));});})();
"""


def _html_table(head, rows, cls="") -> str:
    e = html.escape
    out = ['<div class="scroll">' + (f'<table class="{cls}">' if cls else "<table>")]
    if any(head):
        out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>")
    out.append("<tbody>")
    for r in rows:
        tds = []
        for c in r:
            attrs = ""
            if c.cls:
                attrs += f' class="{c.cls}"'
            if c.key is not None:
                attrs += f' data-key="{e(c.key)}"'
            if c.value is not None and not isinstance(c.value, bool):
                attrs += f' data-value="{e(repr(c.value))}"'
            if c.sigma is not None:
                attrs += f' data-sigma="{e(repr(c.sigma))}"'
            tds.append(f"<td{attrs}>{e(c.text)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def render_html(s: dict, images: dict[str, str] | None = None) -> str:
    """report.html: ``images`` {file name: data URI}, embedded; no external resource."""
    e = html.escape
    groups = _image_groups(images or {})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>qcbed report: {e(s['run'])}</title>", f"<style>{_CSS}</style>", f"<script>{_JS}</script>",
             "</head><body>", f"<h1>qcbed run <code>{e(s['run'])}</code></h1>"]
    for kind, title, content in _sections(s):
        if kind == "p":
            parts.append(f"<p>{e(content)}</p>")
        elif kind == "warn":
            parts.append('<div class="warn"><strong>Check</strong><ul>' + "".join(f"<li>{e(w)}</li>" for w in content)
                         + "</ul></div>")
        elif kind in ("h2", "h3"):
            parts.append(f"<{kind}>{e(title)}</{kind}>")
        elif kind == "table":
            head, rows = content
            parts.append(_html_table(head, rows, cls=title))
        elif kind == "notes":
            parts.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in content) + "</ul>")
        elif kind == "images":
            for name, uri in groups.get(title, []):
                parts.append(f'<figure><img src="{uri}" alt="{e(content)} ({e(name)})">'
                             f"<figcaption>{e(content)} ({e(name)})</figcaption></figure>")
        elif kind == "files":
            parts.append("<ul>" + "".join(f'<li><a href="{e(f)}"><code>{e(f)}</code></a>: {e(w)}</li>'
                                          for f, w in REPORT_FILES) + "</ul>")
    parts.append(f"<footer>qcbed {e(__version__)}; written from the run's zarr stores "
                 f"(regenerate: <code>{e(s['reproducibility']['regenerate_report'])}</code>).</footer>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ============================================================================ machine-readable files
def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def structure_factors_csv(s: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SF_COLUMNS)
    for r in s["structure_factors"]:
        w.writerow([_csv_value(r[c]) for c in SF_COLUMNS])
    return buf.getvalue()


def correlation_csv(s: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = s["correlation"]["names"]
    w.writerow(["parameter"] + names)
    for n, row in zip(names, s["correlation"]["matrix"]):
        w.writerow([n] + [repr(float(x)) for x in row])
    return buf.getvalue()


HKL_HEADER = ("h", "k", "l", "|Fo|", "|Fc|", "Fc(real)", "Fc(imag)", "sigma(F)")


def vesta_hkl_text(s: dict, iam: xr.Dataset | None, deformation: bool = False) -> str:
    """X-ray structure factors as a text file for VESTA's Fourier synthesis (Utilities > Fourier Synthesis).

    Layout: two title lines, the column header ``h k l |Fo| |Fc| Fc(real) Fc(imag) sigma(F)``, then one
    whitespace-separated row per reflection -- the layout PyExtal writes for VESTA
    (``pyextal.dinfo.BaseDiffractionInfo.save_hkl``, github.com/swampni/PyExtal; VESTA: K. Momma &
    F. Izumi, J. Appl. Cryst. 44 (2011) 1272, manual chapter "Fourier synthesis").  One row per
    reflection family (VESTA expands a family by the space group of the loaded structure, as PyExtal
    assumes), F in electrons per cell, crystallographic phase convention exp(+2πi h·x) (the complex
    conjugate of this project's electron convention).

    * ``deformation=False`` (``structure_factors.hkl``): every family of structure_factors.zarr
      (0 < |g| <= g_max) with its IAM X-ray F (Mott-Bethe from the IAM U_g), the refined reflections
      replaced by their refined F (written with their own hkl): ``Fo = Fc = F``, sigma(F) the
      standard error (0 where not refined).  An Fo or Fc synthesis is the refined density.
    * ``deformation=True`` (``deformation.hkl``): the refined reflections only, with
      F = F_refined − F_IAM (complex, so the phase is exact also where the IAM value is zero, e.g.
      Si 2 2 2): a synthesis is the deformation density Δρ = ρ(refined) − ρ(IAM).
    """
    refined = {(r["h"], r["k"], r["l"]): r for r in s["structure_factors"]}
    title = (f"qcbed {__version__} run {s['run']}: X-ray structure factors (electrons per cell) from refined U_g "
             "via Mott-Bethe, crystallographic convention exp(+2 pi i h.x)")
    what = ("F(refined) - F(IAM) of the refined reflections: Fourier synthesis = deformation density"
            if deformation else "refined reflections refined, all other families IAM; sigma(F) = 0 where not refined")
    lines = [title, what, " ".join(f"{h:<12}" if i > 2 else f"{h:<5}" for i, h in enumerate(HKL_HEADER)).rstrip()]
    rows = []
    if deformation:
        for hkl, r in refined.items():
            rows.append((hkl, complex(r["F_x_re"] - r["F_x_iam_re"], r["F_x_im"] - r["F_x_iam_im"]), r["sigma_F_x"]))
    else:
        fam_of_refined = set()
        if iam is not None:
            fam = np.stack([iam.family_h.values, iam.family_k.values, iam.family_l.values], 1)
            hk = np.stack([iam.h.values, iam.k.values, iam.l.values], 1)
            for hkl in refined:
                hit = np.nonzero((hk == np.asarray(hkl)).all(1))[0]
                if len(hit):
                    fam_of_refined.add(tuple(int(x) for x in fam[hit[0]]))
            rep = iam.representative.values.astype(bool) & ~iam.absent.values.astype(bool)
            for i in np.nonzero(rep)[0]:
                t = tuple(int(x) for x in hk[i])
                if t in fam_of_refined or t in refined or t == (0, 0, 0):
                    continue
                rows.append((t, complex(float(iam.F_x_re.values[i]), -float(iam.F_x_im.values[i])), 0.0))
        for hkl, r in refined.items():
            rows.append((hkl, complex(r["F_x_re"], r["F_x_im"]), r["sigma_F_x"]))
        if iam is not None:  # in order of |g|, as the store
            g = {tuple(int(x) for x in h): float(gg) for h, gg in zip(np.stack([iam.h.values, iam.k.values, iam.l.values], 1),
                                                                     iam.g_invA.values)}
            rows.sort(key=lambda t: (g.get(t[0], math.inf), t[0]))
    for hkl, f, sig in rows:
        a = abs(f)
        lines.append(f"{hkl[0]:<5} {hkl[1]:<5} {hkl[2]:<5} {a:<12.6f} {a:<12.6f} {f.real:<12.6f} {f.imag:<12.6f} "
                     f"{(sig or 0.0):<12.6f}".rstrip())
    return "\n".join(lines) + "\n"


def read_vesta_hkl(path) -> list[dict]:
    """Rows of a .hkl file written by :func:`vesta_hkl_text` (for tests and for reading results back)."""
    out = []
    for line in Path(path).read_text().splitlines()[3:]:
        t = line.split()
        if len(t) == 8:
            out.append({"hkl": (int(t[0]), int(t[1]), int(t[2])), "Fo": float(t[3]), "Fc": float(t[4]),
                        "F": complex(float(t[5]), float(t[6])), "sigma": float(t[7])})
    return out


def artifact_table(s: dict) -> list[dict]:
    """The structure-factor table for a Prefect table artifact (plain values, rounded for reading)."""
    out = []
    for r in s["structure_factors"]:
        out.append({"hkl": _hkl_label((r["h"], r["k"], r["l"])), "d_A": round(r["d_A"], 5),
                    "U_iam": r["U_iam"], "U": r["U"], "sigma_U": r["sigma_U"], "change_percent": r["U_change_percent"],
                    "Uprime": r["Uprime"], "V": r["V"], "sigma_V": r["sigma_V"],
                    "F_x": r["F_x_re"] if abs(r["F_x_im"]) < 1e-9 else f"{r['F_x_re']:.6g}{r['F_x_im']:+.6g}i",
                    "sigma_F_x": r["sigma_F_x"], "F_x_iam": r["F_x_iam_re"]})
    if not out:  # no structure factor: the parameters
        out = [{"parameter": p["name"], "value": p["value"], "sigma": p["sigma"], "units": p["units"]}
               for p in s["parameters"]]
    return out


# ============================================================================ writing the folder
def _draw_plots(run_dir: Path, out_dir: Path, say) -> tuple[dict[str, Path], str | None]:
    try:
        from .plots import make_plots
    except ImportError as exc:  # pragma: no cover - plots are part of the package
        return {}, f"plots unavailable ({exc})"
    try:
        made = make_plots(run_dir, out_dir)
    except OSError as exc:  # a full disk or a read-only folder: an error, never a report missing its figures
        if isinstance(exc, FileNotFoundError):
            raise
        raise write_error(out_dir.parent, exc) from None
    except Exception as exc:  # noqa: BLE001  -- a figure the plotting code cannot draw must not cost the numbers
        say(f"[{run_dir.name}] report: plots failed ({type(exc).__name__}: {exc}); writing the report without them")
        return {}, f"plots failed: {type(exc).__name__}: {exc}"
    files = {}
    for p in (made or {}).values():
        p = Path(p)
        if p.suffix.lower() == ".png" and p.exists():
            if p.parent.resolve() != out_dir.resolve():
                shutil.copy(p, out_dir / p.name)
            files[p.name] = out_dir / p.name
    return files, None


def _say(msg: str) -> None:
    print(msg, flush=True)


def write_report(run_dir, key: str | None = None, plots: bool = True, say=_say) -> Path:
    """Write ``report/`` (see the module docstring) atomically; returns its path.

    ``key``: the report stage key for record.json (default: computed from the stores' keys)."""
    run_dir = Path(run_dir)
    st = load_stores(run_dir)
    s = summarize(st)
    if key is None:
        key = report_key(run_dir)
    final = run_dir / "report"
    for junk in run_dir.glob(".report.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    tmp = run_dir / f".report.tmp-{uuid.uuid4().hex[:8]}"
    # every file, figures included, is written before record.json and the manifest, and the folder is
    # renamed into place only then: a full disk or a read-only folder raises one QcbedInputError naming
    # the run folder, removes the partial copy and leaves the earlier report as it was
    with writing(run_dir, tmp):
        tmp.mkdir()
        pngs, problem = _draw_plots(run_dir, tmp, say) if plots else ({}, None)
        if problem:
            s["warnings"].append(f"Figures missing: {problem}.")
        s["figures"] = sorted(pngs)
        (tmp / "results.json").write_text(json.dumps(s, indent=1, ensure_ascii=False) + "\n")
        (tmp / "report.md").write_text(render_markdown(s, {n: n for n in pngs}) + "\n")
        uris = {n: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for n, p in pngs.items()}
        (tmp / "report.html").write_text(render_html(s, uris))
        (tmp / "structure_factors.csv").write_text(structure_factors_csv(s))
        (tmp / "correlation.csv").write_text(correlation_csv(s))
        (tmp / "structure_factors.hkl").write_text(vesta_hkl_text(s, st.iam))
        (tmp / "deformation.hkl").write_text(vesta_hkl_text(s, st.iam, deformation=True))
        (tmp / "record.json").write_text(json.dumps({"stage_key": key, "qcbed_version": __version__,
                                                     MANIFEST_ATTR: MANIFEST_FORMAT}) + "\n")
        write_manifest(tmp)
    return replace_dir(tmp, final)


# ============================================================================ comparison of runs
def consistency(values, sigmas) -> dict:
    """Inverse-variance weighted mean ± its standard error, the scatter (sample standard deviation of
    the values), the reduced chi^2 of their consistency with one value, the Birge ratio sqrt(chi2_nu)
    and its p-value.  Without usable sigmas: the plain mean, sigma = scatter / sqrt(n)."""
    from scipy.stats import chi2 as chi2_dist

    v = np.asarray(values, float)
    s = np.asarray(sigmas, float)
    n = len(v)
    out = {"n": n, "mean": None, "sigma_mean": None, "sigma_mean_external": None, "scatter": None, "chi2_red": None,
           "birge": None,
           "p_value": None, "consistent": None, "weighted": False}
    if n == 0:
        return out
    out["scatter"] = float(np.std(v, ddof=1)) if n > 1 else None
    if np.all(np.isfinite(s)) and np.all(s > 0):
        w = 1.0 / s ** 2
        m = float((w * v).sum() / w.sum())
        out.update(mean=m, sigma_mean=float(1.0 / math.sqrt(w.sum())), weighted=True)
        if n > 1:
            c = float((w * (v - m) ** 2).sum() / (n - 1))
            p = float(chi2_dist.sf(c * (n - 1), n - 1))
            out.update(chi2_red=c, birge=math.sqrt(c), p_value=p, consistent=bool(p >= DISAGREE_P),
                       sigma_mean_external=out["sigma_mean"] * max(1.0, math.sqrt(c)))
    else:
        out["mean"] = float(v.mean())
        out["sigma_mean"] = None if n < 2 else float(np.std(v, ddof=1) / math.sqrt(n))
    return out


def _run_labels(run_dirs) -> list[str]:
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(d).parent.name}/{Path(d).name}" for d in run_dirs]


def compare_runs(run_dirs) -> dict:
    """The refined values of several runs side by side, with their consistency (:func:`consistency`)."""
    run_dirs = [Path(d) for d in run_dirs]
    sums = [summarize(d) for d in run_dirs]
    labels = _run_labels(run_dirs)
    order, info = [], {}
    for s in sums:
        for p in s["parameters"]:
            if p["name"] not in info:
                order.append(p["name"])
                info[p["name"]] = {"units": p["units"], "kind": p["kind"]}
        for r in s["structure_factors"]:
            name = f"F_x({_hkl_label((r['h'], r['k'], r['l']))})"
            if r["sigma_F_x"] is not None and name not in info:
                order.append(name)
                info[name] = {"units": "electrons", "kind": "xray_structure_factor"}
    rank = {"structure_factor": 0, "xray_structure_factor": 1}
    order.sort(key=lambda n: rank.get(info[n]["kind"], 2))  # stable: structure factors, X-ray F, geometry
    params = []
    for name in order:
        vals = []
        for lab, s in zip(labels, sums):
            hit = next((p for p in s["parameters"] if p["name"] == name), None)
            if hit is None and name.startswith("F_x("):
                r = next((r for r in s["structure_factors"]
                          if f"F_x({_hkl_label((r['h'], r['k'], r['l']))})" == name), None)
                if r is not None:
                    hit = {"value": r["F_x_re"], "sigma": r["sigma_F_x"]}
            vals.append(None if hit is None else {"run": lab, "value": hit["value"], "sigma": hit["sigma"]})
        have = [x for x in vals if x is not None]
        stats = consistency([x["value"] for x in have], [x["sigma"] if x["sigma"] is not None else np.nan for x in have])
        params.append({"name": name, **info[name], "values": vals, **stats})
    runs = [{"run": lab, "path": str(d), "gof_name": s["gof_name"], "gof": s["gof"], "r_factor": s["fit"]["r_factor"],
             "n_points": s["n_points"], "converged": s["converged"],
             "thickness_A": s["geometry"].get("thickness")} for lab, d, s in zip(labels, run_dirs, sums)]
    return {"runs": runs, "parameters": params, "disagree_p": DISAGREE_P, "qcbed_version": __version__,
            "definitions": {
                "mean": "inverse-variance weighted mean Σ(v/σ²)/Σ(1/σ²), σ_mean = (Σ 1/σ²)^-1/2 (internal; "
                        "sigma_mean_external = σ_mean × max(1, Birge ratio) in compare.json)",
                "scatter": "sample standard deviation of the values (n - 1)",
                "chi2_red": "Σ (v - mean)²/σ² / (n - 1); Birge ratio = sqrt(chi2_red); p from the chi² distribution",
                "flag": f"runs disagree when p < {DISAGREE_P} (geometry such as thickness differs between "
                        "patterns by design; structure factors of one crystal should agree)"}}


def _compare_table(c: dict) -> tuple[list[str], list[list[Cell]]]:
    labels = [r["run"] for r in c["runs"]]
    head = ["parameter", "units"] + labels + ["weighted mean", "scatter", "χ²_ν (Birge)", "runs agree"]
    rows = []
    for p in c["parameters"]:
        k = f"cmp/{p['name']}"
        row = [Cell(p["name"]), Cell(_unit(p["units"]))]
        for lab, v in zip(labels, p["values"]):
            row.append(Cell("—") if v is None else Cell(fmt(v["value"], v["sigma"]), value=v["value"], sigma=v["sigma"],
                                                         key=f"{k}/{lab}", cls="num"))
        row.append(Cell(fmt(p["mean"], p["sigma_mean"]), value=p["mean"], sigma=p["sigma_mean"], key=f"{k}/mean", cls="num"))
        row.append(N(p["scatter"], key=f"{k}/scatter", digits=3))
        row.append(Cell("—" if p["chi2_red"] is None else f"{fmt(p['chi2_red'], digits=3)} ({fmt(p['birge'], digits=3)})",
                        value=p["chi2_red"], key=f"{k}/chi2_red", cls="num"))
        agree = p["consistent"]
        row.append(Cell("—" if agree is None else ("yes" if agree else f"NO (p = {p['p_value']:.2g})"),
                        cls=None if agree is not False else "hi"))
        rows.append(row)
    return head, rows


def _compare_runs_table(c: dict) -> tuple[list[str], list[list[Cell]]]:
    head = ["run", "folder", "figure of merit (reduced)", "R", "points", "converged"]
    rows = [[Cell(r["run"]), Cell(r["path"], cls="mono"), Cell(f"{r['gof_name']} {fmt(r['gof'])}", value=r["gof"], cls="num"),
             N(r["r_factor"], digits=4), N(r["n_points"]), Cell("yes" if r["converged"] else "NO")] for r in c["runs"]]
    return head, rows


def render_compare_markdown(c: dict) -> str:
    lines = [f"# qcbed comparison of {len(c['runs'])} runs", ""]
    for title, (head, rows) in (("Runs", _compare_runs_table(c)), ("Refined values", _compare_table(c))):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(_md_cell(x) for x in r) + " |" for r in rows] + [""]
    lines += [f"- {k}: {v}" for k, v in c["definitions"].items()] + [""]
    return "\n".join(lines)


def render_compare_html(c: dict) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>qcbed comparison of {len(c['runs'])} runs</title>", f"<style>{_CSS}</style>",
             f"<script>{_JS}</script>", "</head><body>", f"<h1>qcbed comparison of {len(c['runs'])} runs</h1>"]
    sfs = [p["name"] for p in c["parameters"] if p["consistent"] is False and p["kind"] != "geometry"]
    geo = [p["name"] for p in c["parameters"] if p["consistent"] is False and p["kind"] == "geometry"]
    if sfs or geo:
        parts.append('<div class="warn"><ul>'
                     + (f"<li><strong>Structure factors disagree</strong> (p &lt; {c['disagree_p']}): "
                        f"{e(', '.join(sfs))}.</li>" if sfs else "")
                     + (f"<li>Geometry differs (p &lt; {c['disagree_p']}; expected between patterns): "
                        f"{e(', '.join(geo))}.</li>" if geo else "") + "</ul></div>")
    for title, (head, rows) in (("Runs", _compare_runs_table(c)), ("Refined values", _compare_table(c))):
        parts += [f"<h2>{e(title)}</h2>", _html_table(head, rows)]
    parts.append('<ul class="notes">' + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in c["definitions"].items()) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def compare_csv(c: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    labels = [r["run"] for r in c["runs"]]
    w.writerow(["parameter", "units"] + [x for lab in labels for x in (lab, f"sigma_{lab}")]
               + ["mean", "sigma_mean", "scatter", "chi2_red", "birge", "p_value", "consistent"])
    for p in c["parameters"]:
        vals = []
        for v in p["values"]:
            vals += ["", ""] if v is None else [_csv_value(v["value"]), _csv_value(v["sigma"])]
        w.writerow([p["name"], p["units"]] + vals + [_csv_value(p[k]) for k in
                                                     ("mean", "sigma_mean", "scatter", "chi2_red", "birge", "p_value",
                                                      "consistent")])
    return buf.getvalue()


def compare_text(c: dict) -> str:
    """The comparison as a plain-text table for the terminal."""
    labels = [r["run"] for r in c["runs"]]
    head = ["parameter"] + labels + ["weighted mean", "scatter", "chi2_nu", "agree"]
    rows = []
    for p in c["parameters"]:
        row = [p["name"]]
        row += ["—" if v is None else fmt(v["value"], v["sigma"]) for v in p["values"]]
        row += [fmt(p["mean"], p["sigma_mean"]), fmt(p["scatter"], digits=3),
                "—" if p["chi2_red"] is None else fmt(p["chi2_red"], digits=3),
                "—" if p["consistent"] is None else ("yes" if p["consistent"] else "NO")]
        rows.append(row)
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt_row = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, width)))  # noqa: E731
    return "\n".join([fmt_row(head), "  ".join("-" * w for w in width)] + [fmt_row(r) for r in rows])


def default_compare_dir(run_dirs) -> Path:
    run_dirs = [Path(d) for d in run_dirs]
    names = "-".join(d.name for d in run_dirs)
    if len(names) > 80:
        names = f"{len(run_dirs)}runs-" + hashlib.sha256("\n".join(str(d.resolve()) for d in run_dirs).encode()).hexdigest()[:8]
    return run_dirs[0].parent / f"compare-{names}"


def write_comparison(run_dirs, out_dir=None) -> tuple[Path, dict]:
    """compare.html, compare.md, compare.json and compare.csv in ``out_dir`` (default
    ``<parent of the first run>/compare-<names>``); returns (folder, comparison)."""
    c = compare_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else default_compare_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(c, indent=1, ensure_ascii=False) + "\n")
    (out / "compare.csv").write_text(compare_csv(c))
    (out / "compare.md").write_text(render_compare_markdown(c))
    (out / "compare.html").write_text(render_compare_html(c))
    return out, c
