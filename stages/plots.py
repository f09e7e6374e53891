"""Figures of a run, read from its zarr stores (``results/<run>/``), for the report.

Everything here is headless and stateless: each figure is a :class:`matplotlib.figure.Figure`
drawn on the Agg canvas (never ``pyplot``), saved as PNG without a ``Software`` tag, so the same
stores give byte-identical files.

* :func:`disk_images` -- per disk and per 2-D region: experimental, model, difference and
  normalised residual on the region grid (i, j), NaN where a sample is not used.
* :func:`plot_disks` -- one row per disk: experimental and model images on one shared colour scale
  (2-D regions) and the normalised residual on a symmetric scale; for line regions the
  experimental points and the model along the line, with the residual below.
* :func:`plot_profiles` -- central row and column of every 2-D region (and every line region):
  experimental points with error bars, model as a line.
* :func:`plot_trace` -- GOF and each refined structure factor against the outer iteration.
* :func:`plot_coarse` -- the coarse thickness scan and the per-disk NCC.
* :func:`make_plots` -- all of them into one folder: ``disks.png`` (``disks-1.png``, ... when
  there are many disks), ``profiles.png`` (likewise), ``trace.png``, ``coarse.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

DPI = 100
WIDTH_IN = 10.0  # ~1000 px: the report's width
#: disk rows per column of a figure, and columns of disk rows per figure
ROWS_PER_COLUMN = 7
MAX_COLUMNS = 2
_SAVE = {"dpi": DPI, "format": "png", "metadata": {"Software": None}}
_EXP = dict(fmt="o", ms=2.5, color="0.15", ecolor="0.55", elinewidth=0.7, capsize=0, zorder=2)
_MODEL = dict(color="tab:red", lw=1.3, zorder=3)


# ------------------------------------------------------------------------------ reading
def _open(path: Path) -> xr.Dataset | None:
    from .store import open_store

    path = Path(path)
    if not path.exists():
        return None
    return open_store(path)  # verified against its manifest


def _hkl(ds: xr.Dataset, d: int) -> tuple[int, int, int]:
    return int(ds.h.values[d]), int(ds.k.values[d]), int(ds.l.values[d])


def _hkl_text(hkl) -> str:
    return " ".join(str(int(v)) for v in hkl)


def _regions(run_dir: Path, fine: xr.Dataset) -> list[dict]:
    """Regions of roi.zarr (corners, samples), with their grid steps; from fine's i/j if roi is gone."""
    roi = _open(Path(run_dir) / "roi.zarr")
    if roi is not None and "regions" in roi.attrs:
        regs = json.loads(roi.attrs["regions"])
    else:  # fall back to the extent of the indices (corners unknown)
        regs = []
        for r in range(int(fine.region.values.max()) + 1):
            m = fine.region.values == r
            regs.append({"corners": None, "samples": [int(fine.j.values[m].max()) + 1, int(fine.i.values[m].max()) + 1]})
    out = []
    for r in regs:
        n12, n13 = (int(v) for v in r["samples"])
        s12 = s13 = None
        if r.get("corners") is not None:
            p1, p2, p3 = (np.asarray(c, float) for c in r["corners"])
            s12 = (p2 - p1) / (n12 - 1) if n12 > 1 else np.array([1.0, 0.0])
            s13 = (p3 - p1) / (n13 - 1) if n13 > 1 else np.array([-s12[1], s12[0]])
        out.append({"samples": (n12, n13), "s12": s12, "s13": s13, "corners": r.get("corners"),
                    "line": (n12 == 1) != (n13 == 1), "grid": n12 > 1 and n13 > 1})
    return out


def _has_fit(fine: xr.Dataset | None) -> bool:
    return fine is not None and all(v in fine for v in ("fit_exp", "fit_model", "fit_residual", "fit_used"))


def _fit_arrays(fine: xr.Dataset) -> dict[str, np.ndarray]:
    used = fine.fit_used.values.astype(bool)
    exp = np.where(used, fine.fit_exp.values, np.nan)
    model = np.where(used, fine.fit_model.values, np.nan)
    res = np.where(used, fine.fit_residual.values, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(used & (res != 0), np.abs(model - exp) / np.abs(res), np.nan)
    return {"used": used, "exp": exp, "model": model, "difference": exp - model, "residual": res, "sigma": sigma}


def disk_images(run_dir) -> list[dict]:
    """Per disk and per 2-D region (both sample counts > 1) of a finished run: a dict with ``disk``
    (index), ``hkl``, ``region`` (index), ``shape`` (n13, n12) and arrays of that shape indexed [i, j]:
    ``experimental`` (counts), ``model`` (scale * sim + background), ``difference`` (exp - model),
    ``residual`` ((model - exp) / sigma, as fine.zarr), ``sigma`` (|model - exp| / |residual|), and
    ``used``; the arrays are NaN where a sample is not used (or not an inner ROI point).
    Empty when fine.zarr has no fit arrays."""
    run_dir = Path(run_dir)
    fine = _open(run_dir / "fine.zarr")
    if not _has_fit(fine):
        return []
    return _images(fine, _regions(run_dir, fine))


def _images(fine: xr.Dataset, regions: list[dict]) -> list[dict]:
    fa = _fit_arrays(fine)
    I, J, R = fine.i.values, fine.j.values, fine.region.values
    out = []
    for d in range(fine.sizes["disk"]):
        for r, reg in enumerate(regions):
            if not reg["grid"]:
                continue
            n12, n13 = reg["samples"]
            m = R == r
            item = {"disk": d, "hkl": _hkl(fine, d), "region": r, "shape": (n13, n12)}
            for key, src in (("experimental", "exp"), ("model", "model"), ("difference", "difference"),
                             ("residual", "residual"), ("sigma", "sigma")):
                a = np.full((n13, n12), np.nan)
                a[I[m], J[m]] = fa[src][d, m]
                item[key] = a
            u = np.zeros((n13, n12), bool)
            u[I[m], J[m]] = fa["used"][d, m]
            item["used"] = u
            out.append(item)
    return out


def _lines(fine: xr.Dataset, regions: list[dict]) -> list[dict]:
    """Per disk and line region: position along the line, exp, model, sigma, residual (sorted by position)."""
    fa = _fit_arrays(fine)
    x, y, R = fine.x.values, fine.y.values, fine.region.values
    out = []
    for d in range(fine.sizes["disk"]):
        for r, reg in enumerate(regions):
            if not reg["line"]:
                continue
            m = np.nonzero(R == r)[0]
            step = reg["s12"] if reg["samples"][0] > 1 else reg["s13"]
            t = _along(x[m], y[m], step, fine.i.values[m] if reg["samples"][0] == 1 else fine.j.values[m])
            o = np.argsort(t, kind="stable")
            m, t = m[o], t[o]
            out.append({"disk": d, "hkl": _hkl(fine, d), "region": r, "t": t, "exp": fa["exp"][d, m],
                        "model": fa["model"][d, m], "sigma": fa["sigma"][d, m], "residual": fa["residual"][d, m]})
    return out


def _along(x, y, step, index) -> np.ndarray:
    """Coordinate along a grid direction [display px]: projection of (x, y) on its unit vector."""
    if step is None or not np.any(step):
        return np.asarray(index, float)
    u = np.asarray(step, float) / np.hypot(*step)
    return x * u[0] + y * u[1]


# ------------------------------------------------------------------------------ figures
def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, **_SAVE)
    return path


def _split(n: int, per_fig: int) -> list[range]:
    """Split n items into the fewest figures of at most per_fig items each, evenly."""
    if n == 0:
        return []
    nfig = math.ceil(n / per_fig)
    size = math.ceil(n / nfig)
    return [range(k, min(n, k + size)) for k in range(0, n, size)]


def _numbered(path: Path, k: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{k + 1}{path.suffix}")


def _layout(n: int) -> tuple[int, int]:
    """(rows, columns) of n disk blocks in one figure."""
    cols = 1 if n <= ROWS_PER_COLUMN // 2 + 2 else min(MAX_COLUMNS, math.ceil(n / ROWS_PER_COLUMN))
    return math.ceil(n / cols), cols


def _robust_sym(values: np.ndarray, floor: float = 3.0) -> float:
    v = np.abs(values[np.isfinite(values)])
    if v.size == 0:
        return floor
    return float(max(floor, np.ceil(np.percentile(v, 99.5))))


def _title(fine: xr.Dataset, run_dir: Path) -> str:
    a = fine.attrs
    t = f"{Path(run_dir).name}: {a.get('gof_name', 'GOF')} = {a.get('gof', float('nan')):.4g}"
    if "gof_start" in a:
        t += f" (start {a['gof_start']:.4g})"
    return t


def _image_kw(reg: dict) -> tuple[dict, str, str]:
    """imshow keywords and (x, y) axis labels: display-px extent when the region is axis-aligned,
    grid indices j (p1->p2), i (p1->p3) otherwise."""
    n12, n13 = reg["samples"]
    s12, s13 = reg["s12"], reg["s13"]
    kw = {"interpolation": "nearest", "origin": "upper"}
    if reg["corners"] is not None and abs(s12[1]) < 1e-9 and abs(s13[0]) < 1e-9:
        x1, y1 = reg["corners"][0]
        x2, y3 = x1 + (n12 - 1) * s12[0], y1 + (n13 - 1) * s13[1]
        hx, hy = s12[0] / 2, s13[1] / 2
        kw["extent"] = (x1 - hx, x2 + hx, y3 + hy, y1 - hy)  # row i = 0 (y1) on top
        kw["aspect"] = "equal"
        return kw, "x [px]", "y [px]"
    if s12 is not None:
        kw["aspect"] = float(np.hypot(*s13) / np.hypot(*s12))
    return kw, "j (p1→p2)", "i (p1→p3)"


def plot_disks(run_dir, path, *, max_disks: int = ROWS_PER_COLUMN * MAX_COLUMNS) -> list[Path]:
    """Experimental vs model, one row per disk, at most ``max_disks`` disks per PNG: ``path``, or
    ``<stem>-1.png``, ``<stem>-2.png`` ... next to it when more are needed.  2-D regions: experimental
    and model images on one colour scale per disk (colourbar in counts) and the normalised residual
    (model - exp)/sigma on a symmetric diverging scale common to the figure; line regions: experimental
    points (± sigma) and the model along the line, the residual below.  Returns the paths ([] without
    a fit)."""
    run_dir, path = Path(run_dir), Path(path)
    fine = _open(run_dir / "fine.zarr")
    if not _has_fit(fine):
        return []
    regions = _regions(run_dir, fine)
    items = _images(fine, regions) + _lines(fine, regions)
    rlim = _robust_sym(np.concatenate([np.ravel(it["residual"]) for it in items] + [np.zeros(1)]))
    by: dict[int, list] = {}
    for it in items:
        by.setdefault(it["disk"], []).append(it)
    nd = fine.sizes["disk"]
    groups = _split(nd, max_disks)
    out = []
    for k, disks in enumerate(groups):
        title = _title(fine, run_dir)
        if len(groups) > 1:
            title += f"   (disks {disks.start + 1}-{disks.stop} of {nd})"
        fig = _disks_figure(fine, regions, by, list(disks), rlim, title)
        out.append(_save(fig, _numbered(path, k, len(groups))))
    return out


def _disks_figure(fine, regions, by, disks, rlim, title) -> Figure:
    n_grid = sum(r["grid"] for r in regions)
    rows, cols = _layout(len(disks))
    block_h = (2.9 if cols == 1 else 1.9) if n_grid else (2.4 if cols == 1 else 2.1)
    fig = Figure(figsize=(WIDTH_IN, 0.75 + rows * block_h), dpi=DPI, layout="constrained")
    subs = fig.subfigures(rows, cols, squeeze=False, hspace=0.0, wspace=0.02)
    for n, d in enumerate(disks):
        _disk_block(subs[n % rows, n // rows], fine, regions, by.get(d, []), d, rlim)
    for n in range(len(disks), rows * cols):
        subs[n % rows, n // rows].set_visible(False)
    if n_grid:
        note = ("experimental and model share one colour scale per disk [counts]; "
                "residual (model − exp)/σ on a common symmetric scale")
        if any(r["line"] for r in regions):
            note += "; lines: points = experimental ± σ, curve = model"
    else:
        note = "points: experimental ± σ;  red line: model (scale·sim + background);  lower panels: (model − exp)/σ"
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(note, fontsize=8, color="0.3")
    return fig


def _disk_block(sf, fine, regions, items, d, rlim) -> None:
    grid_items = [it for it in items if "experimental" in it]
    line_items = [it for it in items if "t" in it]
    widths = [1.0] * (3 * len(grid_items)) + [2.0 if grid_items else 1.0] * len(line_items)
    if not widths:
        return
    gs = sf.add_gridspec(2, len(widths), width_ratios=widths, height_ratios=[3, 1] if line_items else [1, 1])
    sf.suptitle(_hkl_text(_hkl(fine, d)), fontsize=10, fontweight="bold")
    c = 0
    many = len(grid_items) > 1
    for it in grid_items:
        kw, xl, yl = _image_kw(regions[it["region"]])
        exp, mod = it["experimental"], it["model"]
        both = np.concatenate([exp[np.isfinite(exp)], mod[np.isfinite(mod)]])
        vmin, vmax = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        if vmax <= vmin:
            vmax = vmin + 1.0
        tag = f" (region {it['region']})" if many else ""
        ax_e = sf.add_subplot(gs[:, c])
        ax_m = sf.add_subplot(gs[:, c + 1])
        ax_r = sf.add_subplot(gs[:, c + 2])
        ax_e.imshow(exp, cmap="viridis", vmin=vmin, vmax=vmax, **kw)
        im = ax_m.imshow(mod, cmap="viridis", vmin=vmin, vmax=vmax, **kw)
        ir = ax_r.imshow(it["residual"], cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -rlim, rlim), **kw)
        ax_e.set_title("experimental" + tag, fontsize=8)
        ax_m.set_title("model" + tag, fontsize=8)
        ax_r.set_title("(model − exp)/σ" + tag, fontsize=8)
        cb = sf.colorbar(im, ax=[ax_e, ax_m], shrink=0.85, pad=0.01, aspect=15)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("counts", fontsize=7, labelpad=1)
        cr = sf.colorbar(ir, ax=ax_r, shrink=0.85, pad=0.01, aspect=15)
        cr.ax.tick_params(labelsize=7)
        cr.set_label("σ", fontsize=7, labelpad=1)
        ax_e.tick_params(labelsize=6, length=2, pad=1)
        ax_e.xaxis.set_major_locator(MaxNLocator(4))
        ax_e.yaxis.set_major_locator(MaxNLocator(4))
        for ax in (ax_m, ax_r):  # same extent as the experimental image: no ticks (and faster layout)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_e.set_xlabel(xl, fontsize=7, labelpad=0)
        ax_e.set_ylabel(yl, fontsize=7, labelpad=0)
        c += 3
    for n, it in enumerate(line_items):
        top = sf.add_subplot(gs[0, c])
        bot = sf.add_subplot(gs[1, c], sharex=top)
        _line_panel(top, bot, it, rlim, ylabels=(n == 0))
        if len(line_items) > 1 or grid_items:
            top.set_title(f"line region {it['region']}", fontsize=8)
        c += 1


def _line_panel(top, bot, it, rlim, ylabels=True) -> None:
    t, exp, mod, sig, res = it["t"], it["exp"], it["model"], it["sigma"], it["residual"]
    ok = np.isfinite(exp)
    top.errorbar(t[ok], exp[ok], yerr=np.nan_to_num(sig[ok]), **_EXP)
    top.plot(t, mod, **_MODEL)
    top.tick_params(labelsize=7, labelbottom=False, length=2, pad=1)
    top.margins(x=0.01)
    bot.axhline(0.0, color="0.5", lw=0.6)
    bot.plot(t[ok], res[ok], ".", ms=2.5, color="tab:blue")
    bot.set_ylim(-rlim, rlim)
    bot.tick_params(labelsize=7, length=2, pad=1)
    bot.set_xlabel("along the line [px]", fontsize=7, labelpad=1)
    if ylabels:
        top.set_ylabel("counts", fontsize=7, labelpad=1)
        bot.set_ylabel("(m − e)/σ", fontsize=7, labelpad=1)


def _grid_figure(rows: int, cols: int, row_h: float, top: float = 0.5, bottom: float = 0.65, left: float = 0.6,
                 right: float = 0.12, gap_h: float = 0.62, gap_w: float = 0.62):
    """A figure of rows x cols axes with fixed margins in inches (no layout engine: fast, and the
    same for any number of rows)."""
    h = top + bottom + rows * row_h - gap_h
    fig = Figure(figsize=(WIDTH_IN, h), dpi=DPI)
    ax_h = row_h - gap_h
    ax_w = (WIDTH_IN - left - right - (cols - 1) * gap_w) / cols
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=left / WIDTH_IN, right=1 - right / WIDTH_IN, bottom=bottom / h, top=1 - top / h,
                        hspace=gap_h / ax_h, wspace=gap_w / ax_w)
    return fig, axes


# ------------------------------------------------------------------------------ profiles
def _profiles(fine: xr.Dataset, regions: list[dict]) -> dict[int, list[dict]]:
    """Per disk: central row and column of each 2-D region, the whole of each line region."""
    out: dict[int, list[dict]] = {}
    for it in _images(fine, regions):
        reg = regions[it["region"]]
        n12, n13 = reg["samples"]
        i0, j0 = n13 // 2, n12 // 2
        aligned = reg["corners"] is not None and abs(reg["s12"][1]) < 1e-9 and abs(reg["s13"][0]) < 1e-9
        x1, y1 = reg["corners"][0] if reg["corners"] is not None else (0.0, 0.0)
        tag = f" r{it['region']}" if sum(r["grid"] for r in regions) > 1 else ""
        for name, sl, step, base, n, lab in (
                (f"row i={i0}{tag}", np.s_[i0, :], reg["s12"], x1, n12, "x [px]" if aligned else "along p1→p2 [px]"),
                (f"column j={j0}{tag}", np.s_[:, j0], reg["s13"], y1, n13, "y [px]" if aligned else "along p1→p3 [px]")):
            if step is None:
                t, lab = np.arange(n, dtype=float), "index"
            elif aligned:
                t = base + np.arange(n) * (step[0] if name.startswith("row") else step[1])
            else:
                t = np.arange(n) * float(np.hypot(*step))
            out.setdefault(it["disk"], []).append(
                {"name": name, "t": t, "xlabel": lab, "exp": it["experimental"][sl], "model": it["model"][sl],
                 "sigma": it["sigma"][sl]})
    for it in _lines(fine, regions):
        out.setdefault(it["disk"], []).append(
            {"name": f"line region {it['region']}", "t": it["t"], "xlabel": "along the line [px]",
             "exp": it["exp"], "model": it["model"], "sigma": it["sigma"]})
    return out


def plot_profiles(run_dir, path, *, max_rows: int = ROWS_PER_COLUMN) -> list[Path]:
    """Line profiles: per disk the central row and column of every 2-D region and every line region;
    experimental points with error bars (sigma = |model - exp| / |residual|), model as a line.
    Several disks per figure row; more than ``max_rows`` rows go to ``<stem>-1.png``, ``<stem>-2.png`` ...
    Returns the paths ([] without a fit)."""
    run_dir, path = Path(run_dir), Path(path)
    fine = _open(run_dir / "fine.zarr")
    if not _has_fit(fine):
        return []
    prof = _profiles(fine, _regions(run_dir, fine))
    nd = fine.sizes["disk"]
    per = max(len(v) for v in prof.values()) if prof else 1
    per_row = max(1, 4 // per)  # disks side by side: at most 4 panels across
    groups = _split(nd, per_row * max_rows)
    out = []
    for k, disks in enumerate(groups):
        disks = list(disks)
        rows = math.ceil(len(disks) / per_row)
        ncol = per_row * per
        fig, axes = _grid_figure(rows, ncol, row_h=2.1)
        for ax in axes.flat:
            ax.set_visible(False)
        for n, d in enumerate(disks):
            for m, p in enumerate(prof.get(d, [])):
                ax = axes[n // per_row, (n % per_row) * per + m]
                ax.set_visible(True)
                ok = np.isfinite(p["exp"])
                ax.errorbar(p["t"][ok], p["exp"][ok], yerr=np.nan_to_num(p["sigma"][ok]), **_EXP)
                ax.plot(p["t"], p["model"], **_MODEL)
                ax.set_title(f"{_hkl_text(_hkl(fine, d))}:  {p['name']}", fontsize=8)
                ax.tick_params(labelsize=7, length=2, pad=1)
                ax.set_xlabel(p["xlabel"], fontsize=7, labelpad=1)
                if m == 0:
                    ax.set_ylabel("counts", fontsize=7, labelpad=1)
                ax.margins(x=0.02)
        title = _title(fine, run_dir)
        if len(groups) > 1:
            title += f"   (disks {disks[0] + 1}-{disks[-1] + 1} of {nd})"
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / fig.get_figheight(), va="top")
        fig.text(0.5, 0.08 / fig.get_figheight(), "points: experimental ± σ;  red line: model (scale·sim + background)",
                 fontsize=8, color="0.3", ha="center", va="bottom")
        out.append(_save(fig, _numbered(path, k, len(groups))))
    return out


# ------------------------------------------------------------------------------ trace
def plot_trace(run_dir, path) -> Path | None:
    """GOF (log scale) against outer iteration, and each refined structure factor against iteration
    (one panel each, title with its name and units), with the start as iteration 0 and the final
    value ± sigma as a band.  None without a trace in fine.zarr."""
    run_dir = Path(run_dir)
    fine = _open(run_dir / "fine.zarr")
    if fine is None or "trace_gof" not in fine or fine.sizes.get("iteration", 0) == 0:
        return None
    it = fine.iteration.values
    names = [str(s) for s in fine.sf_param.values] if "sf_param" in fine.dims else []
    ncol = min(3, max(1, len(names)))
    nrow = math.ceil(len(names) / ncol)
    fig = Figure(figsize=(WIDTH_IN, 2.8 + 2.3 * nrow), dpi=DPI, layout="constrained")
    gs = fig.add_gridspec(1 + nrow, ncol, height_ratios=[1.2] + [1] * nrow)
    ax = fig.add_subplot(gs[0, :])
    gof = fine.trace_gof.values
    mk = "o" if len(it) <= 40 else None
    g0 = float(fine.attrs.get("gof_start", np.nan))
    if np.isfinite(g0):  # the start as iteration 0
        ax.plot([0, it[0]], [g0, gof[0]], color="tab:blue", lw=1.2, ls=":")
        ax.plot([0], [g0], "o", ms=4, mfc="white", color="tab:blue", label=f"start {g0:.4g}")
    ax.plot(it, gof, marker=mk, ms=3, color="tab:blue", lw=1.2, label=f"best after each iteration (final {gof[-1]:.4g})")
    ax.legend(fontsize=8, frameon=False)
    if np.all(gof > 0) and (not np.isfinite(g0) or g0 > 0):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_tick))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_tick(ax)))
    ax.set_xlabel("outer iteration", fontsize=8)
    ax.set_ylabel(fine.attrs.get("gof_name", "GOF"), fontsize=8)
    ax.tick_params(labelsize=7, which="both")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"goodness of fit: {fine.attrs.get('gof', gof[-1]):.5g} after {len(it)} iterations"
                 + ("" if not fine.attrs.get("converged", 0) else " (converged)"), fontsize=9)
    params = [str(p) for p in fine.param.values] if "param" in fine.dims else []
    for n, name in enumerate(names):
        a = fig.add_subplot(gs[1 + n // ncol, n % ncol])
        v = fine.trace_values.values[:, n]
        a.plot(it, v, marker=mk, ms=3, color="tab:green", lw=1.2, label="best after each iteration")
        units = "Å⁻²"
        if name in params:
            p = params.index(name)
            units = str(fine.units.values[p]).replace("Å^-2", "Å⁻²") if "units" in fine.coords else units
            val, sig, start = (float(fine[k].values[p]) for k in ("value", "sigma", "start"))
            a.axhline(val, color="tab:green", lw=0.8, alpha=0.8)
            if np.isfinite(sig) and sig > 0:
                a.axhspan(val - sig, val + sig, color="tab:green", alpha=0.25, lw=0)
            a.plot([], [], color="tab:green", lw=4, alpha=0.4, label=f"final {_pm(val, sig)}")
            a.plot([0, it[0]], [start, v[0]], color="tab:green", lw=1.2, ls=":")
            a.plot([0], [start], "o", ms=4, mfc="white", color="tab:green", label=f"start {_pm(start, sig, False)}")
        a.legend(fontsize=7, frameon=False)
        a.set_title(f"{name}  [{units}]", fontsize=9)
        a.set_ylabel(units, fontsize=8)
        a.set_xlabel("outer iteration", fontsize=8)
        a.tick_params(labelsize=7)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
        a.yaxis.get_offset_text().set_fontsize(7)
    fig.suptitle(f"{run_dir.name}: refinement trace", fontsize=11)
    return _save(fig, path)


def _tick(v, _pos=None) -> str:
    return f"{v:g}"


def _minor_tick(ax):
    """Label minor log ticks only when the axis spans less than a decade (else no label)."""
    def f(v, _pos=None):
        lo, hi = ax.get_ylim()
        return f"{v:g}" if hi / max(lo, 1e-300) < 10 else ""
    return f


def _pm(v: float, sig: float, with_sigma: bool = True) -> str:
    """v (± sig) rounded to two significant digits of sig; plain %.6g without a usable sigma."""
    if not (np.isfinite(sig) and sig > 0 and np.isfinite(v)):
        return f"{v:.6g}"
    d = max(0, 1 - int(math.floor(math.log10(sig))))  # decimals for 2 significant digits of sig
    v = round(v, d) + 0.0  # + 0.0: no "-0"
    if d <= 7:
        return f"{v:.{d}f}" + (f" ± {sig:.{d}f}" if with_sigma else "")
    return f"{v:.2e}" + (f" ± {sig:.1e}" if with_sigma else "")


# ------------------------------------------------------------------------------ coarse
def plot_coarse(run_dir, path) -> Path | None:
    """Coarse stage: joint NCC against thickness [nm] with the chosen thickness marked (and the fine
    thickness when refined), and a bar of the NCC per disk.  None without coarse.zarr."""
    run_dir = Path(run_dir)
    co = _open(run_dir / "coarse.zarr")
    if co is None:
        return None
    nd = co.sizes.get("disk", 0)
    fig = Figure(figsize=(WIDTH_IN, 3.6), dpi=DPI, layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[1.4, max(0.8, min(2.0, 0.12 * nd + 0.4))])
    a = fig.add_subplot(gs[0, 0])
    if "scan_ncc" in co:
        t = co.scan_thickness_A.values / 10.0
        a.plot(t, co.scan_ncc.values, "o-", ms=3, lw=1.2, color="tab:blue")
    th = co.attrs.get("thickness_A")
    if th is not None:
        a.axvline(th / 10.0, color="tab:red", lw=1.2, label=f"coarse {th / 10:.1f} nm (NCC {co.attrs.get('ncc', float('nan')):.4f})")
    fine = _open(run_dir / "fine.zarr")
    if fine is not None and "param" in fine.dims and "thickness" in [str(p) for p in fine.param.values]:
        tf = float(fine.value.sel(param="thickness").values) / 10.0
        a.axvline(tf, color="tab:green", ls="--", lw=1.0, label=f"fine {tf:.1f} nm")
    a.legend(fontsize=8, loc="best", framealpha=0.9)
    a.set_xlabel("thickness [nm]", fontsize=8)
    a.set_ylabel("joint NCC", fontsize=8)
    a.set_title("thickness scan", fontsize=9)
    a.tick_params(labelsize=7)
    b = fig.add_subplot(gs[0, 1])
    if "ncc_per_disk" in co:
        v = co.ncc_per_disk.values
        labels = [_hkl_text(_hkl(co, d)) for d in range(nd)]
        bars = b.bar(np.arange(nd), v, color="tab:blue", width=0.7)
        if nd <= 10:
            b.bar_label(bars, fmt="%.4f", fontsize=7, padding=1)
        b.set_xticks(np.arange(nd), labels, rotation=90 if nd > 6 else 0, fontsize=7)
        lo = float(np.nanmin(v)) if nd else 0.0
        bottom = min(0.0, lo) if lo < 0.5 else max(0.0, lo - 0.5 * (1 - lo) - 0.01)
        b.set_ylim(bottom, 1.0 + 0.04 * (1.0 - bottom))
    b.set_ylabel("NCC", fontsize=8)
    b.set_title("NCC per disk at the chosen thickness", fontsize=9)
    b.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{run_dir.name}: coarse thickness and position search", fontsize=11)
    return _save(fig, path)


# ------------------------------------------------------------------------------ all
def make_plots(run_dir, out_dir) -> dict[str, Path]:
    """Every applicable PNG of a run into ``out_dir``: ``disks.png`` (or ``disks-1.png``, ``disks-2.png``
    ...), ``profiles.png`` (likewise), ``trace.png``, ``coarse.png`` (only with coarse.zarr).
    Returns {file stem: path}."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out: dict[str, Path] = {}
    for p in plot_disks(run_dir, out_dir / "disks.png") + plot_profiles(run_dir, out_dir / "profiles.png"):
        out[p.stem] = p
    for name, fn in (("trace", plot_trace), ("coarse", plot_coarse)):
        p = fn(run_dir, out_dir / f"{name}.png")
        if p is not None:
            out[name] = p
    return out
