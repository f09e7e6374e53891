"""The report stage: a run's results from its zarr stores, in ``results/<run>/report/``.

Everything is read from the stores (never from memory of a refinement), so a report can be
regenerated without refitting.  The folder is written under a temporary name and renamed into
place; ``record.json`` carries the stage key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__

_LABEL = re.compile(r"^(?P<comp>[A-Za-z_]+)\((?P<h>-?\d+) (?P<k>-?\d+) (?P<l>-?\d+)\)$")


def _open(path: Path) -> xr.Dataset | None:
    if not (path / "zarr.json").exists():
        return None
    return xr.open_zarr(path, consolidated=False, chunks=None).load()


def parse_label(label: str):
    """'U(1 -1 -1)' -> ('U', (1, -1, -1)); None for a geometry parameter."""
    m = _LABEL.match(label)
    if not m:
        return None
    return m["comp"], (int(m["h"]), int(m["k"]), int(m["l"]))


def _iam_lookup(iam: xr.Dataset | None, hkl) -> dict | None:
    """IAM row of hkl (or of a symmetry equivalent with the same |g| and |U|) in structure_factors.zarr."""
    if iam is None:
        return None
    h = np.stack([iam.h.values, iam.k.values, iam.l.values], 1)
    hit = np.nonzero((h == np.asarray(hkl)).all(1))[0]
    if not len(hit):
        return None
    i = int(hit[0])
    row = {v: float(iam[v].values[i]) for v in iam.data_vars if iam[v].dims == ("reflection",)}
    row.update({c: float(iam[c].values[i]) for c in ("g_invA", "d_A") if c in iam.coords})
    return row


def summarize(run_dir: Path) -> dict:
    """results.json content: refined parameters (with IAM values for structure factors), fit, geometry."""
    run_dir = Path(run_dir)
    fine = _open(run_dir / "fine.zarr")
    iam = _open(run_dir / "structure_factors.zarr")
    coarse = _open(run_dir / "coarse.zarr")
    if fine is None:
        raise FileNotFoundError(f"{run_dir / 'fine.zarr'}: no fine refinement to report")
    a = fine.attrs
    params = []
    for i, name in enumerate(fine.param.values.tolist()):
        row = {"name": name, "kind": str(fine.kind.values[i]), "units": str(fine.units.values[i]),
               "value": float(fine.value.values[i]), "sigma": float(fine.sigma.values[i]),
               "start": float(fine.start.values[i])}
        lab = parse_label(name)
        if lab is not None:
            comp, hkl = lab
            row["hkl"] = list(hkl)
            ref = _iam_lookup(iam, hkl)
            if ref is not None:
                key = {"U": "U_re", "Uprime": "Uprime_re", "U_amp": "U_abs"}.get(comp)
                if key in ref:
                    iam_v = ref[key]
                    # a reflection forbidden in the IAM (e.g. Si 222) has |U| at rounding level: 0, no percent
                    zero = abs(iam_v) < 1e-12
                    row["iam"] = 0.0 if zero else iam_v
                    row["change_percent"] = None if zero else 100.0 * (row["value"] - iam_v) / abs(iam_v)
                row["d_A"] = ref.get("d_A")
        params.append(row)
    out = {
        "run": run_dir.name, "qcbed_version": __version__,
        "gof_name": a["gof_name"], "gof": a["gof"], "gof_start": a["gof_start"], "converged": bool(a["converged"]),
        "n_points": a["n_points"], "dof": a["dof"], "scale": a["scale"], "background": fine.background.values.tolist(),
        "parameters": params, "geometry": json.loads(a["geometry"]),
        "pattern_geometry": json.loads(a["pattern_geometry"]), "counters": json.loads(a["counters"]),
        "resumed_from_iteration": None if a.get("resumed_from_iteration", -1) < 0 else a["resumed_from_iteration"],
        "iterations": int(fine.iteration.values[-1]) if "iteration" in fine.coords and fine.sizes.get("iteration") else 0,
        "correlation": {"names": fine.param.values.tolist(), "matrix": fine.correlation.values.tolist()},
    }
    if coarse is not None:
        out["coarse"] = {"thickness_A": coarse.attrs["thickness_A"], "ncc": coarse.attrs["ncc"],
                         "ncc_per_disk": coarse.ncc_per_disk.values.tolist(), "shift_px": coarse.attrs["shift_px"]}
    rec = run_dir / "run.json"
    if rec.exists():
        r = json.loads(rec.read_text())
        out["reproduce"] = {"config": r.get("config_path"), "versions": r.get("versions"),
                            "command": f"qcbed rerun {run_dir}"}
    return out


def render_markdown(s: dict) -> str:
    lines = [f"# qcbed run `{s['run']}`", ""]
    lines += [f"{s['gof_name']}: {s['gof_start']:.6g} -> **{s['gof']:.6g}** (reduced), {s['n_points']} points, "
              f"{s['dof']} degrees of freedom, {'converged' if s['converged'] else '**not converged**'} after "
              f"{s['iterations']} iterations" + (f" (resumed after iteration {s['resumed_from_iteration']})"
                                                 if s.get("resumed_from_iteration") is not None else ""), ""]
    lines += ["| parameter | start | refined | sigma | IAM | change from IAM |", "|---|---|---|---|---|---|"]
    for p in s["parameters"]:
        iam = f"{p['iam']:.6g}" if p.get("iam") is not None else ""
        ch = f"{p['change_percent']:+.3f} %" if p.get("change_percent") is not None else ""
        lines.append(f"| {p['name']} [{p['units']}] | {p['start']:.6g} | {p['value']:.6g} | {p['sigma']:.2g} | {iam} | {ch} |")
    c = s["counters"]
    lines += ["", f"Scale {s['scale']:.6g}; background(s) {', '.join(f'{b:.4g}' for b in s['background'])}.", "",
              f"Eigen-solves {c.get('eigen_solves')}, inner evaluations {c.get('inner_evaluations')}, "
              f"total {c.get('total_s', 0):.1f} s.", ""]
    if "coarse" in s:
        co = s["coarse"]
        lines += [f"Coarse: thickness {co['thickness_A']:.1f} Å, joint NCC {co['ncc']:.4f}, per disk "
                  f"{', '.join(f'{x:.3f}' for x in co['ncc_per_disk'])}.", ""]
    if "reproduce" in s:
        r = s["reproduce"]
        v = ", ".join(f"{k} {x}" for k, x in (r.get("versions") or {}).items())
        lines += ["## Reproduce", "", f"`{r['command']}` (config `{r['config']}`; qcbed {s['qcbed_version']}; {v})", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, key: str | None = None) -> Path:
    """Write ``report/`` (results.json, report.md, record.json) atomically; returns its path."""
    run_dir = Path(run_dir)
    s = summarize(run_dir)
    final = run_dir / "report"
    for junk in run_dir.glob(".report.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    tmp = run_dir / f".report.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / "results.json").write_text(json.dumps(s, indent=1) + "\n")
    (tmp / "report.md").write_text(render_markdown(s) + "\n")
    (tmp / "record.json").write_text(json.dumps({"stage_key": key, "qcbed_version": __version__}) + "\n")
    if final.exists():
        old = run_dir / f".report.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final
