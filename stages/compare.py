"""Run comparison (``qcbed report --compare RUN RUN ...``): the refined values of several runs side by
side with their inverse-variance weighted mean, the scatter and the reduced chi^2 of their consistency.

Each run is read as a :class:`~stages.summary.RunSummary` from its stores (:func:`stages.summary.summarize`,
so a run whose report is older than its refinement compares as refined).  The comparison is one JSON
object (``compare.json``, :func:`compare_runs`), rendered as ``compare.md``, ``compare.html``,
``compare.csv`` and a terminal table with the table helpers of :mod:`stages.render`.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from pathlib import Path

import numpy as np

from . import __version__
from .render import Cell, csv_text, csv_value, html_head, html_notes, html_table, markdown_table, num_cell, unit_text
from .summary import RunSummary, fmt, hkl_text, summarize

#: a comparison flags a parameter whose runs disagree at this p-value of the chi^2 of consistency
DISAGREE_P = 0.01


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


def _xray_name(r) -> str:
    return f"F_x({hkl_text((r.h, r.k, r.l))})"


def _value_of(s: RunSummary, name: str) -> dict | None:
    """{'value', 'sigma'} of parameter ``name`` in one run (an X-ray F_x(hkl): its refined F_x), or None."""
    p = next((p for p in s.parameters if p.name == name), None)
    if p is not None:
        return {"value": p.value, "sigma": p.sigma}
    r = next((r for r in s.structure_factors if _xray_name(r) == name), None) if name.startswith("F_x(") else None
    return None if r is None else {"value": r.F_x_re, "sigma": r.sigma_F_x}


def compare_runs(run_dirs) -> dict:
    """The refined values of several runs side by side, with their consistency (:func:`consistency`)."""
    run_dirs = [Path(d) for d in run_dirs]
    sums = [summarize(d) for d in run_dirs]
    labels = _run_labels(run_dirs)
    order, info = [], {}
    for s in sums:
        for p in s.parameters:
            if p.name not in info:
                order.append(p.name)
                info[p.name] = {"units": p.units, "kind": p.kind}
        for r in s.structure_factors:
            name = _xray_name(r)
            if r.sigma_F_x is not None and name not in info:
                order.append(name)
                info[name] = {"units": "electrons", "kind": "xray_structure_factor"}
    rank = {"structure_factor": 0, "xray_structure_factor": 1}
    order.sort(key=lambda n: rank.get(info[n]["kind"], 2))  # stable: structure factors, X-ray F, geometry
    params = []
    for name in order:
        vals = []
        for lab, s in zip(labels, sums):
            hit = _value_of(s, name)
            vals.append(None if hit is None else {"run": lab, **hit})
        have = [x for x in vals if x is not None]
        stats = consistency([x["value"] for x in have], [x["sigma"] if x["sigma"] is not None else np.nan for x in have])
        params.append({"name": name, **info[name], "values": vals, **stats})
    runs = [{"run": lab, "path": str(d), "gof_name": s.gof_name, "gof": s.gof, "r_factor": s.fit.r_factor,
             "n_points": s.n_points, "converged": s.converged,
             "thickness_A": s.geometry.get("thickness")} for lab, d, s in zip(labels, run_dirs, sums)]
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
        row = [Cell(p["name"]), Cell(unit_text(p["units"]))]
        for lab, v in zip(labels, p["values"]):
            row.append(Cell("—") if v is None else Cell(fmt(v["value"], v["sigma"]), value=v["value"], sigma=v["sigma"],
                                                         key=f"{k}/{lab}", cls="num"))
        row.append(Cell(fmt(p["mean"], p["sigma_mean"]), value=p["mean"], sigma=p["sigma_mean"], key=f"{k}/mean", cls="num"))
        row.append(num_cell(p["scatter"], key=f"{k}/scatter", digits=3))
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
             num_cell(r["r_factor"], digits=4), num_cell(r["n_points"]), Cell("yes" if r["converged"] else "NO")]
            for r in c["runs"]]
    return head, rows


def _tables(c: dict):
    return (("Runs", _compare_runs_table(c)), ("Refined values", _compare_table(c)))


def render_compare_markdown(c: dict) -> str:
    """compare.md."""
    lines = [f"# qcbed comparison of {len(c['runs'])} runs", ""]
    for title, (head, rows) in _tables(c):
        lines += [f"## {title}", ""] + markdown_table(head, rows)
    lines += [f"- {k}: {v}" for k, v in c["definitions"].items()] + [""]
    return "\n".join(lines)


def render_compare_html(c: dict) -> str:
    """compare.html (self-contained), with the parameters whose runs disagree named at the top."""
    e = html.escape
    title = f"qcbed comparison of {len(c['runs'])} runs"
    parts = html_head(title, e(title))
    sfs = [p["name"] for p in c["parameters"] if p["consistent"] is False and p["kind"] != "geometry"]
    geo = [p["name"] for p in c["parameters"] if p["consistent"] is False and p["kind"] == "geometry"]
    if sfs or geo:
        parts.append('<div class="warn"><ul>'
                     + (f"<li><strong>Structure factors disagree</strong> (p &lt; {c['disagree_p']}): "
                        f"{e(', '.join(sfs))}.</li>" if sfs else "")
                     + (f"<li>Geometry differs (p &lt; {c['disagree_p']}; expected between patterns): "
                        f"{e(', '.join(geo))}.</li>" if geo else "") + "</ul></div>")
    for name, (head, rows) in _tables(c):
        parts += [f"<h2>{e(name)}</h2>", html_table(head, rows)]
    parts.append(html_notes(f"{k}: {v}" for k, v in c["definitions"].items()))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def compare_csv(c: dict) -> str:
    """compare.csv: per parameter each run's value and sigma, then the consistency statistics."""
    labels = [r["run"] for r in c["runs"]]
    stats = ("mean", "sigma_mean", "scatter", "chi2_red", "birge", "p_value", "consistent")
    rows = [["parameter", "units"] + [x for lab in labels for x in (lab, f"sigma_{lab}")] + list(stats)]
    for p in c["parameters"]:
        vals = []
        for v in p["values"]:
            vals += ["", ""] if v is None else [csv_value(v["value"]), csv_value(v["sigma"])]
        rows.append([p["name"], p["units"]] + vals + [csv_value(p[k]) for k in stats])
    return csv_text(rows)


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
    """``<parent of the first run>/compare-<names>`` (names hashed when longer than 80 characters)."""
    run_dirs = [Path(d) for d in run_dirs]
    names = "-".join(d.name for d in run_dirs)
    if len(names) > 80:
        names = f"{len(run_dirs)}runs-" + hashlib.sha256("\n".join(str(d.resolve()) for d in run_dirs).encode()).hexdigest()[:8]
    return run_dirs[0].parent / f"compare-{names}"


def write_comparison(run_dirs, out_dir=None) -> tuple[Path, dict]:
    """compare.html, compare.md, compare.json and compare.csv in ``out_dir`` (default
    :func:`default_compare_dir`); returns (folder, comparison)."""
    c = compare_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else default_compare_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(c, indent=1, ensure_ascii=False) + "\n")
    (out / "compare.csv").write_text(compare_csv(c))
    (out / "compare.md").write_text(render_compare_markdown(c))
    (out / "compare.html").write_text(render_compare_html(c))
    return out, c
