"""The report stage: a run's results, read from its zarr stores, in ``results/<run>/report/``.

Everything is read from the stores (``fine.zarr``, ``structure_factors.zarr``, ``coarse.zarr``,
``run.json``), never from the memory of a refinement, so ``qcbed report results/<run>`` regenerates
the whole folder in seconds without refitting.  The folder is written under a temporary name and
renamed into place; ``record.json`` carries the stage key.

Files (:func:`write_report`):

* ``report.html`` -- self-contained (images embedded as data URIs, no external resource), and the
  same content as ``report.md`` (Markdown, images beside it) (:mod:`stages.render`);
* ``results.json`` -- every number of the report, full precision: the typed run summary
  (:class:`stages.summary.RunSummary`, :func:`summarize`);
* ``structure_factors.csv`` -- one row per refined reflection (:data:`SF_COLUMNS`), and
  ``correlation.csv`` (the correlation matrix of all refined parameters);
* ``structure_factors.hkl`` and ``deformation.hkl`` -- X-ray structure factors for VESTA
  (:mod:`stages.vesta`);
* the figures of :func:`stages.plots.make_plots` (``disks*.png``, ``profiles*.png``,
  ``trace.png``, ``coarse.png``).

``qcbed report --compare RUN RUN ...`` is :mod:`stages.compare`.  This module re-exports the public
names of those modules, so ``from stages import report; report.X`` reaches each of them.
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from . import __version__
from . import summary as _summary
from .compare import (DISAGREE_P, compare_csv, compare_runs, compare_text, consistency, default_compare_dir,
                      render_compare_html, render_compare_markdown, write_comparison)
from .keys import dependency_versions, report_stage_key
from .render import (REPORT_FILES, SF_NOTES, Cell, artifact_table, correlation_csv, render_html,
                     render_markdown, sections, sf_notes, structure_factors_csv)
from .store import MANIFEST_ATTR, MANIFEST_FORMAT, replace_dir, write_error, write_manifest, writing
from .summary import (GAUSS_NEWTON_SIGMAS, HIGH_CORRELATION, RANGE_END_FRACTION, SF_COLUMNS, SF_UNITS,
                      SIGMA_DEFINITION, Parameter, RunStores, RunSummary, StructureFactorRow, check_list,
                      crystal_from_store, fit_statistics, fmt, geometry_table, hkl_text, load_stores, parse_label,
                      range_end, read_summary, sha256_text, structure_factor_rows)
from .vesta import HKL_HEADER, read_vesta_hkl, vesta_hkl_text

#: the stage's own names and those it re-exports from stages.summary, render, vesta and compare
__all__ = [
    "write_report", "report_key", "summarize",
    "GAUSS_NEWTON_SIGMAS", "HIGH_CORRELATION", "RANGE_END_FRACTION", "SF_COLUMNS", "SF_UNITS", "SIGMA_DEFINITION",
    "Parameter", "RunStores", "RunSummary", "StructureFactorRow", "check_list", "crystal_from_store",
    "fit_statistics", "fmt", "geometry_table", "hkl_text", "load_stores", "parse_label", "range_end", "read_summary",
    "sha256_text", "structure_factor_rows",
    "REPORT_FILES", "SF_NOTES", "Cell", "artifact_table", "correlation_csv", "render_html", "render_markdown",
    "sections", "sf_notes", "structure_factors_csv",
    "HKL_HEADER", "read_vesta_hkl", "vesta_hkl_text",
    "DISAGREE_P", "compare_csv", "compare_runs", "compare_text", "consistency", "default_compare_dir",
    "render_compare_html", "render_compare_markdown", "write_comparison",
]


def _versions_now() -> dict:
    """The dependency versions of this process (for a run folder without run.json)."""
    return dependency_versions()


def summarize(run_dir) -> RunSummary:
    """The run summary of ``run_dir`` (:func:`stages.summary.summarize`); a run without run.json records the
    dependency versions of this process ('at report time')."""
    return _summary.summarize(run_dir, versions_now=_versions_now)


def report_key(run_dir) -> str:
    """The report stage key of a run folder, from the keys of its stores (as :func:`stages.pipeline.make_plan`; :func:`stages.keys.report_stage_key`)."""
    st = load_stores(run_dir)
    return report_stage_key(st.fine.attrs.get("stage_key"), None if st.iam is None else st.iam.attrs.get("stage_key"),
                            None if st.coarse is None else st.coarse.attrs.get("stage_key"))


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
        s = replace(s, warnings=s.warnings + ((f"Figures missing: {problem}.",) if problem else ()),
                    figures=tuple(sorted(pngs)))
        (tmp / "results.json").write_text(s.to_json())
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
