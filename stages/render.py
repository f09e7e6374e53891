"""The report's documents, from a :class:`~stages.summary.RunSummary`: ``report.md``, ``report.html``
(self-contained: images as data URIs, no external resource), ``structure_factors.csv``,
``correlation.csv`` and the Prefect table artifact.

Markdown and HTML are two renderings of one list of blocks (:func:`sections`); their tables are
lists of :class:`Cell` (display text, and for numbers the exact value and a key that report.html
carries as ``data-value``/``data-key`` for tests and scripts).  The table and page helpers are shared
with the run comparison (:mod:`stages.compare`).
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

from . import __version__
from .summary import GAUSS_NEWTON_SIGMAS, HIGH_CORRELATION, SF_COLUMNS, SIGMA_DEFINITION, RunSummary, fmt, hkl_text


# ============================================================================ tables (shared by md and html)
class Cell:
    """A table cell: display text, and for numbers the exact value (HTML data-value) and a key for tests."""

    def __init__(self, text, value=None, sigma=None, key=None, cls=None):
        self.text, self.value, self.sigma, self.key, self.cls = str(text), value, sigma, key, cls


def num_cell(v, sigma=None, key=None, digits=6, unit="") -> Cell:
    """A number (± sigma) rounded for reading (:func:`~stages.summary.fmt`), right-aligned, with its exact value."""
    return Cell(fmt(v, sigma, digits) + (f" {unit}" if unit and v is not None else ""), value=v, sigma=sigma, key=key,
                cls="num")


def value_cell(v, sigma, key) -> Cell:
    """A value ± sigma (the sigma also in data-sigma)."""
    return Cell(fmt(v, sigma), value=v, sigma=sigma, key=key, cls="num")


def unit_text(u: str) -> str:
    """A unit as the tables print it ('Å^-2' -> 'Å⁻²', 'deg' -> '°')."""
    return {"Å^-2": "Å⁻²", "deg": "°"}.get(u, u)


def range_cell(lo, hi, end: str | None) -> Cell:
    """A search range, marked when the value ended at one of its ends."""
    return Cell(f"[{fmt(lo)}, {fmt(hi)}]" + (f" (at the {end} end)" if end else ""), cls="num" + (" hi" if end else ""))


def markdown_table(head, rows) -> list[str]:
    """A Markdown table (and the blank line after it)."""
    return (["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            + ["| " + " | ".join(c.text.replace("|", "\\|") for c in r) + " |" for r in rows] + [""])


def _complex_text(re_, im_, sigma=None) -> str:
    if im_ == 0.0:
        return fmt(re_, sigma)
    return f"{fmt(re_)} {'+' if im_ >= 0 else '−'} {fmt(abs(im_))}i" + ("" if sigma is None else f" (σ|F| {fmt(sigma, digits=2)})")


def _change_text(ch) -> str:
    return "zero in the IAM" if ch is None else f"{ch:+.3f} %"


def _sf_tables(s: RunSummary) -> list[tuple[list[str], list[list[Cell]]]]:
    """Electron (U, U′, V) and X-ray (Mott-Bethe F) structure factors, one row per refined reflection."""
    head_e = ["hkl", "d (Å)", "U_g IAM (Å⁻²)", "U_g refined (Å⁻²)", "change from IAM", "U′_g (Å⁻²)", "V_g (V)"]
    head_x = ["hkl", "d (Å)", "F_x IAM (e)", "F_x refined (e)", "ΔF_x (e)"]
    rows_e, rows_x = [], []
    for r in s.structure_factors:
        hkl = hkl_text((r.h, r.k, r.l))
        k = f"sf/{hkl}"
        label = Cell(hkl + ("" if r.centric else " (acentric)"), cls="hkl")
        phase = "" if r.centric else f" ∠ {fmt(r.U_phase_deg, r.sigma_U_phase_deg)}°"
        rows_e.append([
            label, num_cell(r.d_A, key=f"{k}/d_A", digits=5), num_cell(r.U_iam, key=f"{k}/U_iam"),
            Cell(fmt(r.U, r.sigma_U) + phase, value=r.U, sigma=r.sigma_U, key=f"{k}/U", cls="num"),
            Cell(_change_text(r.U_change_percent), value=r.U_change_percent, key=f"{k}/U_change_percent", cls="num"),
            value_cell(r.Uprime, r.sigma_Uprime, f"{k}/Uprime"),
            num_cell(r.V, r.sigma_V, key=f"{k}/V")])
        rows_x.append([
            label, num_cell(r.d_A, digits=5),
            Cell(_complex_text(r.F_x_iam_re, r.F_x_iam_im), value=r.F_x_iam_re, key=f"{k}/F_x_iam_re", cls="num"),
            Cell(_complex_text(r.F_x_re, r.F_x_im, r.sigma_F_x), value=r.F_x_re, sigma=r.sigma_F_x,
                 key=f"{k}/F_x_re", cls="num"),
            num_cell(r.F_x_change, r.sigma_F_x, key=f"{k}/F_x_change")])
    return [(head_e, rows_e), (head_x, rows_x)]


def _param_table(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    has_range = any(p.range is not None for p in s.parameters)
    has_step = any(p.gauss_newton_step is not None for p in s.parameters)
    head = (["parameter", "units", "start", "refined ± σ", "IAM", "change from IAM"] + (["search range"] if has_range else [])
            + (["Gauss-Newton step / σ"] if has_step else []))
    rows = []
    for p in s.parameters:
        k = f"param/{p.name}"
        ch = p.change_percent
        row = [Cell(p.name), Cell(unit_text(p.units)), num_cell(p.start, key=f"{k}/start"),
               value_cell(p.value, p.sigma, f"{k}/value"),
               num_cell(p.iam, key=f"{k}/iam") if p.iam is not None else Cell(""),
               Cell("" if p.iam is None else _change_text(ch), value=ch, key=None if ch is None else f"{k}/change_percent",
                    cls="num")]
        if has_range:
            row.append(Cell("", cls="num") if p.range is None else range_cell(*p.range, p.at_range_end))
        if has_step:
            st, sg = p.gauss_newton_step, p.sigma
            ratio = st / sg if st is not None and sg is not None and math.isfinite(sg) and sg > 0 else None
            row.append(Cell("—" if ratio is None else f"{ratio:+.2f}", value=ratio,
                            cls="num" + (" hi" if ratio is not None and abs(ratio) > GAUSS_NEWTON_SIGMAS else "")))
        rows.append(row)
    return head, rows


def _corr_table(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    names = s.correlation.names
    head = [""] + list(names)
    rows = []
    for i, a in enumerate(names):
        row = [Cell(a)]
        for j, b in enumerate(names):
            r = s.correlation.matrix[i][j]
            cls = "num" + (" hi" if i != j and abs(r) > HIGH_CORRELATION else "")
            row.append(Cell(f"{r:+.3f}", value=r, key=f"corr/{a}/{b}", cls=cls))
        rows.append(row)
    return head, rows


def _disk_table(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    head = ["disk", "points used", "background", "R", "ZNCC start", "ZNCC end", "χ² per point", "mean counts"]
    rows = []
    for d in s.fit.disks:
        k = f"disk/{hkl_text(d.hkl)}"
        rows.append([Cell(hkl_text(d.hkl)), num_cell(d.n_points, key=f"{k}/n_points"),
                     num_cell(d.background, key=f"{k}/background", digits=5),
                     num_cell(d.r_factor, key=f"{k}/r_factor", digits=4),
                     num_cell(d.zncc_start, key=f"{k}/zncc_start", digits=5),
                     num_cell(d.zncc, key=f"{k}/zncc", digits=5),
                     num_cell(d.chi2_per_point, key=f"{k}/chi2_per_point", digits=4),
                     num_cell(d.mean_counts, key=f"{k}/mean_counts", digits=5)])
    return head, rows


def _geometry_rows(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    head = ["parameter", "value (± σ when refined)", "start", "units", ""]
    rows = []
    for g in s.geometry_table:
        k = f"geometry/{g.name}"
        rows.append([Cell(g.name), value_cell(g.value, g.sigma, k),
                     num_cell(g.start, key=None if g.start is None else f"{k}/start"),
                     Cell(unit_text(g.units)), Cell("refined" if g.refined else "fixed")])
    return head, rows


def _beam_rows(s: RunSummary) -> list[list[Cell]]:
    """The beam sets and the probe that sized them (the beam selection's records, as the fine stage stored them)."""
    rows = []
    b, pr = s.beams, s.beam_probe
    if b:
        rows.append([Cell("beam sets (tiles), strong beams per tile, Bethe beams (max)"),
                     Cell(f"{b['tiles']}, {b['n_strong_min']}-{b['n_strong_max']} (mean {b['n_strong_mean']:.0f}), "
                          f"{b['n_bethe_max']}")])
    if pr:
        rows.append([Cell("beam probe: sg_strong, error / target (of each disk's maximum)"),
                     Cell(f"{pr['sg_strong']} 1/Å, {100 * pr['error']:.2f} % / {100 * pr['accuracy']:.2f} % "
                          f"({'met' if pr['met'] else 'NOT met'}; worst beam {hkl_text(pr['worst_beam'])}; "
                          f"reference up to {pr['n_reference_max']} beams, {pr['n_probe_tilts']} tilts, "
                          f"{pr['wall_s']:.1f} s)", value=pr["error"], key="beam_probe/error")])
        if pr.get("laue_zones"):
            d, asked = pr.get("holz_difference"), pr.get("laue_zones_config")
            if asked == "auto" and d is not None:
                why = (f"auto: the ZOLZ and HOLZ models differ by {100 * d:.2f} % of a disk's maximum (beam "
                       f"{hkl_text(pr.get('holz_difference_beam') or [0, 0, 0])}; target {100 * pr['accuracy']:.2f} %)")
            else:
                why = f'as configured (simulation.laue_zones = "{asked}")'
            kind = "zero-order Laue zone only (ZOLZ)" if pr["laue_zones"] == "zolz" else "every Laue zone (HOLZ)"
            rows.append([Cell("Laue zones modelled"), Cell(f"{kind}; {why}", value=d, key="beam_probe/holz_difference")])
    return rows


def _fit_summary_rows(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    c = s.counters
    chi = s.gof_name.startswith("Chi2")
    rows = [
        [Cell(f"{s.gof_name} (reduced{' χ²' if chi else ''}), start → end"),
         Cell(f"{fmt(s.gof_start)} → {fmt(s.gof)}", value=s.gof, key="fit/gof", cls="num")],
        [Cell("R factor, all disks"), num_cell(s.fit.r_factor, key="fit/r_factor", digits=4)],
        [Cell("mean ZNCC over disks, start → end"),
         Cell("—" if s.fit.zncc_mean is None else
              f"{fmt(s.fit.zncc_mean_start, digits=5)} → {fmt(s.fit.zncc_mean, digits=5)}",
              value=s.fit.zncc_mean, key="fit/zncc_mean", cls="num")],
        [Cell("points used"), num_cell(s.n_points, key="fit/n_points")],
        [Cell("refined parameters (+ scale and backgrounds, profiled)"), num_cell(s.n_parameters, key="fit/n_parameters")],
        [Cell("degrees of freedom"), num_cell(s.dof, key="fit/dof")],
        [Cell("effective degrees of freedom ν_eff (samples share pixel noise)"),
         num_cell(s.dof_effective, key="fit/dof_effective", digits=5)],
        [Cell("χ²/ν_eff (σ are scaled by it where > 1)"), num_cell(s.chi2_effective, key="fit/chi2_effective", digits=4)],
        [Cell("scale (counts per unit incident intensity)"), num_cell(s.scale, key="fit/scale")],
        [Cell("outer iterations"), num_cell(s.iterations, key="fit/iterations")],
        [Cell("converged"), Cell("yes" if s.converged else "NO")],
        [Cell("eigen-solves"), num_cell(c.get("eigen_solves"), key="counters/eigen_solves")],
        [Cell("inner (geometry) evaluations"), num_cell(c.get("inner_evaluations"), key="counters/inner_evaluations")],
        [Cell("outer (structure-factor) evaluations"), num_cell(c.get("outer_evaluations"), key="counters/outer_evaluations")],
        [Cell("time in eigen-solves"), num_cell(c.get("solve_s"), key="counters/solve_s", digits=3, unit="s")],
        [Cell("time in geometry searches"), num_cell(c.get("inner_s"), key="counters/inner_s", digits=3, unit="s")],
        [Cell("total refinement time"), num_cell(c.get("total_s"), key="counters/total_s", digits=3, unit="s")],
    ]
    if c.get("lm_stop"):
        rows.append([Cell("Levenberg-Marquardt: steps (kept), stop"),
                     Cell(f"{c.get('lm_steps')} ({c.get('lm_accepted')}): {c['lm_stop']}; largest remaining step "
                          f"{fmt(c.get('lm_max_step_sigma'), digits=2)} sigma (structure factors and thickness)")])
    if c.get("tilts_solved") is not None:
        rows.append([Cell("tilts solved (all eigen-solves): hermitian / general"),
                     Cell(f"{c['tilts_solved']}: {c.get('tilts_hermitian', 0)} / {c.get('tilts_general', 0)}")])
    rows += _beam_rows(s)
    if s.resumed_from_iteration is not None:
        rows.append([Cell("resumed after iteration"), num_cell(s.resumed_from_iteration)])
    co = s.coarse
    if co is not None and co.wall_s is not None:
        rows.append([Cell("coarse stage time"), num_cell(co.wall_s, key="coarse/wall_s", digits=3, unit="s")])
        if co.eigen_solves is not None:
            steps = ", ".join(f"{k.replace('_', ' ')} {v['eigen_solves']} ({v['wall_s']:.1f} s)"
                              for k, v in (co.by_step or {}).items())
            rows.append([Cell("coarse eigen-solves (every sub-step)" + (f": {steps}" if steps else "")),
                         num_cell(co.eigen_solves, key="coarse/eigen_solves")])
    return ["", ""], rows


def _coarse_rows(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    co = s.coarse
    rows = [[Cell("thickness"), num_cell(co.thickness_A, key="coarse/thickness_A", unit="Å")]]
    if co.thickness_start_A is not None:
        br = co.thickness_bracket_A
        rows.append([Cell("thickness at the start (config), bracket searched"),
                     Cell(f"{fmt(co.thickness_start_A)} Å" + (f", [{fmt(br[0])}, {fmt(br[1])}] Å" if br else ""))])
    rows += [
            [Cell("joint NCC"), num_cell(co.ncc, key="coarse/ncc", digits=5)],
            [Cell("orientation shift (row, col)"), Cell(f"{fmt(co.shift_px[0], digits=4)}, {fmt(co.shift_px[1], digits=4)} px")]]
    for d, v in zip(co.disks, co.ncc_per_disk):
        rows.append([Cell(f"NCC of disk {hkl_text(d)}"), num_cell(v, key=f"coarse/ncc/{hkl_text(d)}", digits=4)])
    return ["", ""], rows


def _coarse_physics_table(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    """One row per quantity the coarse stage refined (coarse.refine): start, refined ± σ, search range."""
    head = ["quantity", "units", "start", "refined ± σ", "search range"]
    rows = []
    for q in s.coarse.refined:
        k = f"coarse/{q.name}"
        rows.append([Cell(q.label), Cell(unit_text(q.units).replace("^2", "²")), num_cell(q.start, key=f"{k}/start"),
                     value_cell(q.value, q.sigma, f"{k}/value"), range_cell(*q.range, q.at_range_end)])
    return head, rows


def _coarse_physics_notes(s: RunSummary) -> list[str]:
    co = s.coarse
    used = co.refined_model or {}
    what = [w for w, k in (("the voltage", "hv_kV"), ("the cell", "cell"), ("B", "b_iso_A2")) if k in used]
    return [f"The fine refinement and the structure-factor tables (IAM, V_g, Mott-Bethe F_x) use {' and '.join(what)} "
            "as refined here; the search ranges come from coarse.hv_range_kV, cell_range_percent and B_range_A2.",
            "σ: " + (co.sigma_definition or "") + "."]


def _repro_rows(s: RunSummary) -> tuple[list[str], list[list[Cell]]]:
    r = s.reproducibility
    v = r.versions or {}
    rows = [[Cell("qcbed version (refinement / report)"), Cell(f"{r.qcbed_version} / {r.report_qcbed_version}")],
            [Cell("config"), Cell(f"{r.config_path}")],
            [Cell("config sha256"), Cell(r.config_sha256 or "—", cls="mono")],
            [Cell("refined"), Cell(r.refined or "—")],
            [Cell("scattering table"), Cell(f"{r.scattering_table} ({r.scattering_table_reference})")],
            [Cell("absorption model"), Cell(r.absorption_model or "—")],
            [Cell("eigen-solver"), Cell(r.solver or "—")],
            [Cell(f"versions ({r.versions_recorded})"),
             Cell(", ".join(f"{k} {x}" for k, x in v.items() if k in ("python", "numpy", "scipy", "xarray", "zarr",
                                                                        "prefect", "dask", "gemmi")))],
            [Cell("command of the run"), Cell(r.command or "—", cls="mono")],
            [Cell("reproduce from scratch"), Cell(r.reproduce or "—", cls="mono")],
            [Cell("check the reproduction"), Cell(r.verify, cls="mono")],
            [Cell("regenerate this report"), Cell(r.regenerate_report, cls="mono")]]
    for k, key in (r.stage_keys or {}).items():
        rows.append([Cell(f"stage key: {k}"), Cell(key, cls="mono")])
    return ["", ""], rows


# ============================================================================ documents
_SIGMA_NOTE = "σ: {}. V_g and F_x are linear in U_g at fixed hkl: σ propagated linearly."
SF_NOTES = [
    "U_g, U′_g in Å⁻² (U = 2meV/h², γ included); V_g = h²U_g/(2m₀e) in volts; X-ray F_x in electrons per cell "
    "from U_g by Mott-Bethe (nuclear term from the IAM positions and Debye-Waller factors).",
    "Centric reflections: U_g is real along the phase allowed by symmetry (0° for a centre at the origin); the "
    "table gives its signed value. Acentric: |U_g| ∠ phase.",
    "F_x in the crystallographic convention exp(+2πi h·x) (complex conjugate of the electron convention of "
    "structure_factors.zarr). ΔF_x = F_x − F_x(IAM) (along the centric phase).",
    _SIGMA_NOTE.format(SIGMA_DEFINITION),
    "U′_g not refined: from the run's absorption model, as the simulation used it.",
]

_UPRIME_NOTES = {
    "proportional": "U′_g not refined: proportional absorption, U′ = f × the refined U_g (as the simulation used it).",
    "bird_king": "U′_g not refined: thermal diffuse scattering absorption (Bird & King 1990) from the IAM atoms and "
                 "their B, independent of the refined U_g (as the simulation used it).",
    "none": "U′_g = 0: the run has no absorption model.",
}

#: what the two ZNCC columns of the disk table are (the ZNCC itself: the summary's ``fit.zncc_definition``)
_ZNCC_COLUMNS = ("ZNCC start: the start structure factors with the geometry the inner loop finds for them; "
                 "ZNCC end: the optimum.")


def sf_notes(absorption_model: str | None, sigma_definition: str | None = None) -> list[str]:
    """The notes under the structure-factor tables; the U′_g line names the run's absorption model
    (the ``absorption_model`` attribute of structure_factors.zarr, e.g. 'bird_king: ...'), the σ line the
    run's way of making its standard errors (or why they are undefined)."""
    kind = (absorption_model or "").split(":")[0].strip()
    notes = SF_NOTES[:-1] + [_UPRIME_NOTES.get(kind, SF_NOTES[-1])]
    if sigma_definition:
        notes[3] = _SIGMA_NOTE.format(sigma_definition)
    return notes


def _lead(s: RunSummary) -> str:
    cr, mic = s.crystal, s.microscope
    gn = s.counters.get("gauss_newton_steps")
    return (f"{(s.pattern_kind or '').upper()} pattern of {'?' if cr is None else cr.name} "
            f"({'?' if cr is None else cr.spacegroup}), {fmt(None if mic is None else mic.hv_kV)} kV, "
            f"zone [{' '.join(str(x) for x in (mic.zone if mic is not None else None) or [])}]. "
            f"{s.gof_name}: {fmt(s.gof_start)} → {fmt(s.gof)} (reduced), {s.n_points} points, "
            f"{s.dof} degrees of freedom, R = {fmt(s.fit.r_factor, digits=4)}; "
            f"{'converged' if s.converged else 'NOT converged'} after {s.iterations} iterations"
            + (f" and {gn} Gauss-Newton steps ({s.gof_name} {fmt(s.counters['gof_before_gauss_newton'])} before them)"
               if gn else "")
            + (f" (resumed after iteration {s.resumed_from_iteration})" if s.resumed_from_iteration is not None
               else "") + ".")


def sections(s: RunSummary) -> list[tuple[str, str, object]]:
    """The report as (kind, title, content) blocks, rendered by :func:`render_markdown` / :func:`render_html`."""
    blocks = [("p", "", _lead(s))]
    if s.warnings:
        blocks.append(("warn", "Check", list(s.warnings)))
    blocks.append(("h2", "Refined parameters", None))
    blocks.append(("table", "", _param_table(s)))
    co = s.coarse
    if co is not None:
        t0 = co.thickness_start_A
        blocks.append(("notes", "", [
            "start: where the fine stage started: the thickness and orientation from the coarse stage"
            + (f" (thickness {fmt(t0)} Å in the config → {fmt(co.thickness_A)} Å)" if t0 is not None else "")
            + ", the rest from the config; shifts from the config's centre, at the coarse stage's orientation."]))
    blocks.append(("h2", "Structure factors", None))
    if s.structure_factors:
        (he, re_), (hx, rx) = _sf_tables(s)
        blocks.append(("h3", "Electron structure factors", None))
        blocks.append(("table", "", (he, re_)))
        blocks.append(("h3", "X-ray structure factors (Mott-Bethe)", None))
        blocks.append(("table", "", (hx, rx)))
    else:
        blocks.append(("p", "", "No structure factor was refined (or structure_factors.zarr is missing)."))
    blocks.append(("notes", "", sf_notes(s.reproducibility.absorption_model, s.sigma_definition)))
    blocks.append(("h3", "Correlation matrix", None))
    blocks.append(("table", "corr", _corr_table(s)))
    blocks.append(("h2", "Fit", None))
    blocks.append(("table", "", _fit_summary_rows(s)))
    blocks.append(("table", "", _disk_table(s)))
    blocks.append(("notes", "", [s.fit.r_factor_definition + ".", "χ² per point: " + s.fit.chi2_per_point_definition + ".",
                                 s.fit.zncc_definition + ". " + _ZNCC_COLUMNS]))
    blocks.append(("images", "disks", "Experimental, simulated and difference per disk (shared colour scale)"))
    blocks.append(("images", "profiles", "Line profiles through the regions of interest"))
    blocks.append(("h2", "Refinement trace", None))
    blocks.append(("images", "trace", "Figure of merit and refined structure factors against iteration"))
    blocks.append(("h2", "Geometry", None))
    blocks.append(("table", "", _geometry_rows(s)))
    pg = s.pattern_geometry
    blocks.append(("p", "", f"Pattern geometry: centre {pg.get('centre_px')} px, tilt0 "
                            f"{[round(x, 4) for x in pg.get('tilt0', [])]} (hkl units), scale_y {pg.get('scale_y')}, "
                            f"flip {pg.get('flip')}."))
    if co is not None:
        extra = "".join(f", {q}" for q in dict.fromkeys(
            {"voltage": "voltage", "cell": "cell", "B": "Debye-Waller B"}[q.quantity] for q in co.refined))
        title = f"thickness, orientation{extra}" if co.refined else "thickness and orientation"
        blocks.append(("h2", f"Coarse stage ({title} by correlation)", None))
        if co.refined:
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


def render_markdown(s: RunSummary, images: dict[str, str] | None = None) -> str:
    """report.md; ``images``: {file name: relative path} (None: no figures, e.g. a Prefect artifact)."""
    groups = _image_groups(images or {})
    lines = [f"# qcbed run `{s.run}`", ""]
    for kind, title, content in sections(s):
        if kind == "p":
            lines += [content, ""]
        elif kind == "warn":
            lines += ["**Check:**", ""] + [f"- {w}" for w in content] + [""]
        elif kind in ("h2", "h3"):
            lines += [("## " if kind == "h2" else "### ") + title, ""]
        elif kind == "table":
            lines += markdown_table(*content)
        elif kind == "notes":
            lines += [f"- {n}" for n in content] + [""]
        elif kind == "images":
            for name, path in groups.get(title, []):
                lines += [f"![{content}]({path})", ""]
        elif kind == "files":
            lines += [f"- [`{f}`]({f}): {what}" for f, what in REPORT_FILES] + [""]
    return "\n".join(lines)


CSS = """
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
JS = """
(function(){var errs=[];window.addEventListener('error',function(e){errs.push(String(e.message||e));
document.body.setAttribute('data-errors',String(errs.length));});
window.addEventListener('load',function(){var im=document.images,ok=0;for(var i=0;i<im.length;i++){
if(im[i].complete&&im[i].naturalWidth>0)ok++;}document.body.setAttribute('data-images',ok+'/'+im.length);
document.body.setAttribute('data-images-ok',String(ok===im.length));
document.body.setAttribute('data-errors',String(errs.length));});})();
"""


def html_head(title: str, heading: str) -> list[str]:
    """The start of a self-contained page (styles and script inline) up to its ``<h1>`` (``heading``: HTML)."""
    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", f"<script>{JS}</script>",
            "</head><body>", f"<h1>{heading}</h1>"]


def html_table(head, rows, cls="") -> str:
    """An HTML table of :class:`Cell` rows (exact values in data-value/data-sigma, keys in data-key)."""
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


def html_notes(notes) -> str:
    """Notes under a table, as a list."""
    return '<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


def render_html(s: RunSummary, images: dict[str, str] | None = None) -> str:
    """report.html: ``images`` {file name: data URI}, embedded; no external resource."""
    e = html.escape
    groups = _image_groups(images or {})
    parts = html_head(f"qcbed report: {s.run}", f"qcbed run <code>{e(s.run)}</code>")
    for kind, title, content in sections(s):
        if kind == "p":
            parts.append(f"<p>{e(content)}</p>")
        elif kind == "warn":
            parts.append('<div class="warn"><strong>Check</strong><ul>' + "".join(f"<li>{e(w)}</li>" for w in content)
                         + "</ul></div>")
        elif kind in ("h2", "h3"):
            parts.append(f"<{kind}>{e(title)}</{kind}>")
        elif kind == "table":
            head, rows = content
            parts.append(html_table(head, rows, cls=title))
        elif kind == "notes":
            parts.append(html_notes(content))
        elif kind == "images":
            for name, uri in groups.get(title, []):
                parts.append(f'<figure><img src="{uri}" alt="{e(content)} ({e(name)})">'
                             f"<figcaption>{e(content)} ({e(name)})</figcaption></figure>")
        elif kind == "files":
            parts.append("<ul>" + "".join(f'<li><a href="{e(f)}"><code>{e(f)}</code></a>: {e(w)}</li>'
                                          for f, w in REPORT_FILES) + "</ul>")
    parts.append(f"<footer>qcbed {e(__version__)}; written from the run's zarr stores "
                 f"(regenerate: <code>{e(s.reproducibility.regenerate_report)}</code>).</footer>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ============================================================================ machine-readable files
def csv_value(v) -> str:
    """A CSV field: '' for None, 'true'/'false', floats at full precision (repr)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def csv_text(rows) -> str:
    """Rows (lists of fields) as CSV text, one line each."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def structure_factors_csv(s: RunSummary) -> str:
    """structure_factors.csv: one row per refined reflection, columns :data:`~stages.summary.SF_COLUMNS`."""
    return csv_text([SF_COLUMNS] + [[csv_value(getattr(r, c)) for c in SF_COLUMNS] for r in s.structure_factors])


def correlation_csv(s: RunSummary) -> str:
    """correlation.csv: the correlation matrix with the parameter names as first row and column."""
    names = list(s.correlation.names)
    return csv_text([["parameter"] + names]
                    + [[n] + [repr(float(x)) for x in row] for n, row in zip(names, s.correlation.matrix)])


def artifact_table(s: RunSummary) -> list[dict]:
    """The structure-factor table for a Prefect table artifact (plain values, rounded for reading)."""
    out = []
    for r in s.structure_factors:
        out.append({"hkl": hkl_text((r.h, r.k, r.l)), "d_A": round(r.d_A, 5),
                    "U_iam": r.U_iam, "U": r.U, "sigma_U": r.sigma_U, "change_percent": r.U_change_percent,
                    "Uprime": r.Uprime, "V": r.V, "sigma_V": r.sigma_V,
                    "F_x": r.F_x_re if abs(r.F_x_im) < 1e-9 else f"{r.F_x_re:.6g}{r.F_x_im:+.6g}i",
                    "sigma_F_x": r.sigma_F_x, "F_x_iam": r.F_x_iam_re})
    if not out:  # no structure factor: the parameters
        out = [{"parameter": p.name, "value": p.value, "sigma": p.sigma, "units": p.units} for p in s.parameters]
    return out
