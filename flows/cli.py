"""The ``qcbed`` command line."""

from __future__ import annotations

import os

# One BLAS thread per process, set before numpy loads: cores are used through processes
# (two BLAS threads made batched eig up to 100x slower on the project's machines).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def _hkl_list(tokens: list[str]) -> list[tuple[int, int, int]]:
    from stages.errors import QcbedInputError

    out = []
    for t in tokens:
        parts = t.replace(",", " ").split()
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 3 or any(v != int(v) for v in vals):
            raise QcbedInputError("--beams", f"{t!r} is not an integer reflection h,k,l", "write e.g. --beams 0,0,0 1,-1,1")
        out.append(tuple(int(v) for v in vals))
    return out


def _absorption(spec: str | None):
    """'none' | fraction F (U'_g = F U_g) | a TOML file of per-reflection U'_g.

    Returns (model, fraction, {hkl: U'}).  The TOML file holds an optional ``fraction`` (for every
    reflection not listed) and ``[[reflection]]`` tables with ``hkl = [h, k, l]`` and
    ``Uprime`` [Å^-2] (a number, or [re, im] for a complex value); each listed value is applied to all
    symmetry equivalents.
    """
    import tomllib

    from stages.errors import QcbedInputError

    if spec is None or spec.lower() == "none":
        return "none", 0.0, {}
    if spec.lower().endswith(".toml"):
        path = Path(spec)
        if not path.exists():
            raise QcbedInputError("--absorption", f"file {spec} not found", "give an existing .toml file or a fraction")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise QcbedInputError(str(path), f"malformed TOML: {exc}") from None
        unknown = set(d) - {"fraction", "reflection"}
        if unknown:
            raise QcbedInputError(f"{path.name}: {sorted(unknown)[0]}", "unknown key", "allowed: fraction, reflection")
        model, frac, _ = _absorption(str(d.get("fraction", 0.0)))
        ups = {}
        for i, r in enumerate(d.get("reflection", [])):
            f = f"{path.name}: reflection[{i}]"
            if not isinstance(r, dict) or "hkl" not in r or "Uprime" not in r:
                raise QcbedInputError(f, "needs hkl = [h, k, l] and Uprime = value in 1/Å^2")
            h = _hkl_list([",".join(str(x) for x in r["hkl"])])[0] if isinstance(r["hkl"], list) else None
            if h is None:
                raise QcbedInputError(f + ".hkl", "must be a list of three integers")
            v = r["Uprime"]
            try:
                ups[h] = complex(v[0], v[1]) if isinstance(v, list) else float(v)
            except (TypeError, ValueError, IndexError):
                raise QcbedInputError(f + ".Uprime", f"must be a number or [re, im], got {v!r}") from None
        return model, frac, ups
    s = spec.lower().removeprefix("proportional:").removeprefix("proportional=")
    try:
        f = float(s)
    except ValueError:
        raise QcbedInputError("--absorption", f"cannot read {spec!r}",
                              "use 'none', a fraction such as 0.05 (U'_g = 0.05 U_g), or a .toml file of U'_g") from None
    if not (0 <= f < 1):
        raise QcbedInputError("--absorption", f"fraction must lie in [0, 1), got {f}", "typical values 0.02-0.1")
    return ("proportional" if f > 0 else "none"), f, {}


def build_model(args):
    """ForwardModel from the simulate arguments (a .dat file supplies defaults)."""
    import numpy as np

    from stages.errors import QcbedInputError
    from stages.physics.beams import DEFAULT_SELECTION, Selection
    from stages.physics.constants import ug_per_vg
    from stages.physics.crystal_io import load_crystal
    from stages.simulate import ForwardModel

    crystal = load_crystal(args.crystal)
    dat = crystal.extra.get("dat", {})
    hv = args.hv if args.hv is not None else dat.get("hv")
    if hv is None:
        raise QcbedInputError("--hv", "accelerating voltage missing", "give --hv KV, e.g. --hv 200")
    zone = args.zone if args.zone is not None else dat.get("zone")
    if zone is None:
        raise QcbedInputError("--zone", "zone axis missing", "give --zone U V W, e.g. --zone 1 1 0")
    normal = args.normal if args.normal is not None else dat.get("norm")
    x_axis = args.x_axis if args.x_axis is not None else dat.get("xaxis")
    kt = args.kt if args.kt is not None else dat.get("kt", [0.0, 0.0, 0.0])
    absorption, frac, up_given = _absorption(args.absorption)
    sel = DEFAULT_SELECTION
    changes = {k: v for k, v in (("g_max", args.gmax), ("sg_strong", args.sg_strong), ("sg_max", args.sg_max)) if v is not None}
    if args.no_bethe:
        changes["bethe"] = False
    if args.holz:
        changes["holz"] = True
    if changes:
        sel = Selection(**{**DEFAULT_SELECTION.as_dict(), **changes})
    u, up = {}, {}
    for row in dat.get("adj", []):
        h = tuple(row["hkl"])
        u[h] = row["U"] * np.exp(1j * np.radians(row["phase_deg"]))
        up[h] = row["Uprime"] * np.exp(1j * np.radians(row["phase_prime_deg"]))
    if dat.get("abs"):
        up[(0, 0, 0)] = float(dat["abs"]) * float(ug_per_vg(hv))
    up.update(up_given)
    model = ForwardModel(crystal, float(hv), tuple(zone), x_axis=None if x_axis is None else tuple(x_axis),
                         normal=None if normal is None else tuple(normal), table=args.table,
                         absorption=absorption, absorption_fraction=frac, u=u, uprime=up,
                         selection=sel, method=args.solver)
    return model, np.asarray(kt, float), dat.get("beams")


def cmd_simulate(args) -> int:
    import numpy as np

    from stages.simulate import parse_thickness, simulate
    from stages.store import write_store

    thickness = parse_thickness(args.thickness)
    model, kt, pool = build_model(args)
    out = _hkl_list(args.beams) if args.beams else None
    ds = simulate(model, thickness, kt=kt, out_hkl=out, pool=pool)
    record = {
        "hv_kV": ds.attrs["hv_kV"],
        "zone": ds.attrs["zone"],
        "x_axis": ds.attrs["x_axis"],
        "normal": ds.attrs["normal"],
        "kt": [float(x) for x in kt],
        "beams": np.stack([ds.h.values, ds.k.values, ds.l.values], 1).tolist(),
        "thickness_A": ds.thickness.values.tolist(),
        "intensity": ds.intensity.values.tolist(),
        "scattering_table": ds.attrs["scattering_table"],
        "absorption": ds.attrs["absorption"],
        "absorption_fraction": ds.attrs["absorption_fraction"],
        "solver": ds.attrs["solver"],
        "n_beams_matrix": ds.attrs["n_beams_matrix"],
        "n_beams_bethe": ds.attrs["n_beams_bethe"],
        "qcbed_version": ds.attrs["qcbed_version"],
    }
    if args.json:
        _atomic_write_text(Path(args.json), "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")
    if args.zarr:
        write_store(ds, args.zarr)
    if not args.quiet:
        _print_table(ds)
        if args.json:
            print(f"wrote {args.json}")
        if args.zarr:
            print(f"wrote {args.zarr}")
    return 0


def _atomic_write_text(path: Path, text: str) -> None:
    from stages.errors import QcbedInputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise QcbedInputError(str(path), f"cannot write: {exc.strerror}") from None


def _print_table(ds) -> None:
    import numpy as np

    t = ds.thickness.values
    cols = np.unique(np.linspace(0, len(t) - 1, min(len(t), 8)).round().astype(int))
    inten = ds.intensity.values
    total = inten.sum(-1)
    print(f"# {ds.attrs['hv_kV']:g} kV, zone {ds.attrs['zone']}, x-axis {ds.attrs['x_axis']}, "
          f"{ds.attrs['n_beams_matrix']} beams (+{ds.attrs['n_beams_bethe']} Bethe), "
          f"Laue zones {ds.attrs.get('laue_zones', 'zolz').upper()}, "
          f"table {ds.attrs['scattering_table']}, absorption {ds.attrs['absorption']}, solver {ds.attrs['solver']}")
    head = "   h   k   l |" + "".join(f"{t[c]:>10.0f}" for c in cols) + "   (thickness Å)"
    print(head)
    order = np.argsort(-inten[cols[-1]])
    shown = order[: min(len(order), 15)]
    for b in sorted(shown, key=lambda i: (ds.g_invA.values[i], tuple(-x for x in (ds.h.values[i], ds.k.values[i], ds.l.values[i])))):
        print(f"{ds.h.values[b]:4d}{ds.k.values[b]:4d}{ds.l.values[b]:4d} |" + "".join(f"{inten[c, b]:10.5f}" for c in cols))
    if len(order) > len(shown):
        print(f"   ... {len(order) - len(shown)} weaker beams not shown (use --json for all)")
    print("  sum        |" + "".join(f"{total[c]:10.5f}" for c in cols))


def _prepared(config_path):
    """(cfg, model, pattern, pattern geometry, roi) of a run config, in memory (for scripts and tests)."""
    from stages import config as C
    from stages.errors import QcbedInputError
    from stages.load import load_pattern
    from stages.roi import build_roi, regions_from_config

    cfg = C.load_config(config_path)
    model = C.forward_model(cfg)
    if "pattern" not in cfg.data:
        raise QcbedInputError(f"{cfg.path.name}: [pattern]", "missing section", "see data/si_cbed/config.toml")
    pattern = load_pattern(cfg.section("pattern"), cfg.base_dir)
    pg = C.pattern_geometry(cfg, model)
    regions, padding = regions_from_config(cfg.section("roi"))
    roi = build_roi(pattern, pg, regions, C.roi_disks(cfg, pattern), padding, cfg.section("roi").get("disk_mask"))
    return cfg, model, pattern, pg, roi


def cmd_prepare(args) -> int:
    """The load and roi stages of a run config (plain Python, no Prefect): pattern.zarr and roi.zarr."""
    import numpy as np

    from stages import pipeline as P
    from stages.store import open_store

    cfg = _validated(args.config)
    plan = P.make_plan(cfg, args.results)
    with P.RunLock(plan.run_dir):
        P.write_run_record(plan)
        for s in ("load", "roi"):
            P.run_stage(plan, s)
    pattern, roi = open_store(plan.store("load")), open_store(plan.store("roi"))
    regions = json.loads(roi.attrs["regions"])
    shape = "x".join(str(n) for n in pattern.intensity.shape)
    print(f"pattern: {pattern.attrs['kind']} {shape} (source dtype {pattern.attrs.get('dtype', '?')}), "
          f"{int((~pattern.valid.values.astype(bool)).sum())} unusable pixels")
    print(f"calibration: {pattern.attrs.get('calibration', '{}')}")
    kt = roi.kt.values
    print(f"roi: {len(regions)} region(s), {roi.sizes['point']} points ({int(roi.inner.sum())} compared, padding "
          f"{roi.attrs['padding']}), {roi.sizes['disk']} disks; {roi.attrs['n_points_valid']} valid samples, "
          f"{roi.attrs['n_points_excluded']} excluded")
    print(f"tilts: kt from {np.round(kt.min(0), 4).tolist()} to {np.round(kt.max(0), 4).tolist()} (hkl units)")
    print(f"wrote {plan.store('load')} and {plan.store('roi')}")
    return 0


def _validated(source):
    from flows.pipeline import load_run_config  # noqa: F401  (configures Prefect's environment first)

    return load_run_config(source)


def _validate_all(sources) -> list:
    """Validate every config before anything runs; the problems of all configs are reported together."""
    from stages.errors import QcbedInputError, QcbedInputErrors

    cfgs, problems = [], []
    for s in sources:
        try:
            cfgs.append(_validated(s))
        except QcbedInputError as exc:
            problems.append((s, exc))
    if not problems:
        return cfgs
    if len(sources) == 1:
        raise problems[0][1]
    lines = [f"{len(problems)} of {len(sources)} configs invalid; nothing was run"]
    for src, exc in problems:
        if isinstance(exc, QcbedInputErrors) and len(exc.errors) > 1:
            lines += ["  " + x for x in str(exc).splitlines()]
        else:
            lines.append(f"  {src}: {exc}")
    err = QcbedInputError("CONFIG", "invalid")
    err.args = ("\n".join(lines),)
    raise err


def _print_results(plan) -> None:
    """The refined values of a run, only when its fine and report stores are those of the config just run
    (``run --until variance`` after an edit leaves an older refinement there: it is named stale, not shown)."""
    from stages import pipeline as P
    from stages.report import summarize

    run_dir = plan.run_dir
    if not P.result_is_current(plan):
        states = {s: P.store_state(plan, s) for s in ("fine", "report") if s in plan.keys}
        old = [s for s, v in states.items() if v == "stale"]
        if old:
            print(f"[{run_dir.name}] no current refinement: {' and '.join(old)} in {run_dir} are of an earlier config "
                  "or inputs (stale); run without --until to refresh them")
        return
    try:
        s = summarize(run_dir)
    except FileNotFoundError:
        return
    print(f"[{run_dir.name}] {s.gof_name} {s.gof_start:.5g} -> {s.gof:.5g} (reduced), "
          f"{'converged' if s.converged else 'NOT converged'}; report: {run_dir / 'report' / 'report.html'}")
    for p in s.parameters:
        iam = ""
        if p.iam is not None:
            ch = f" ({p.change_percent:+.2f} %)" if p.change_percent is not None else " (zero in the IAM)"
            iam = f"   IAM {p.iam:.6g}{ch}"
        print(f"    {p.name:<26}{p.value:>14.7g} ± {p.sigma:.2g} {p.units}{iam}")


def continue_command(argv: list[str] | None) -> str:
    """The command line that continues a stopped run: the same one (stages skip, fine resumes)."""
    import shlex

    return "qcbed " + " ".join(shlex.quote(a.strip()) for a in (argv or ["run", "CONFIG"]))


def interrupted_line(signame: str, runs: list[Path], argv: list[str] | None) -> str:
    """One line after a stop by a signal: where each unfinished run stands and how to continue."""
    from stages import pipeline as P

    parts = []
    for r in runs:
        st = P.run_status(r)
        left = [s for s, v in st.stages.items() if v != "done"]
        if not left:
            continue
        where = f"{r.name}: {left[0]} not finished"
        if st.last_iteration is not None and "fine" in left:
            where += f", fine checkpoint at iteration {st.last_iteration} kept in {r / P.TRACE}"
        parts.append(where)
    state = "; ".join(parts) if parts else "every run had finished"
    return f"qcbed: stopped by {signame} ({state}); to continue, run the same command: {continue_command(argv)}"


def run_outcome(run_dir: Path, result: dict | None) -> tuple[str, str]:
    """(status, GOF or error) of one run of a batch, for the summary table."""
    from stages import pipeline as P

    if result and "error" in result:
        log = result.get("error_log")
        return "failed", result["error"].splitlines()[0] + (f" (traceback: {log})" if log else "")
    if result and "interrupted" in result:
        return "interrupted", f"stopped by {result['interrupted']}"
    st = P.run_status(run_dir)
    if result is not None:  # {stage: status} of every stage asked for (--until may stop early)
        return "finished", f"{st.gof_name} {st.gof:.6g}" if st.gof is not None and st.stages.get("fine") == "done" else ""
    left = [s for s, v in st.stages.items() if v != "done"]
    return "incomplete", f"{', '.join(left)} not done" if left else ""


def summary_table(rows: list[tuple[str, str, str]]) -> str:
    """The batch summary: run, status, GOF (finished) or error (failed), one row per run."""
    head = ("run", "status", "GOF / error")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows))
    w1 = max(len(head[1]), *(len(r[1]) for r in rows))
    lines = [f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def cmd_run(args) -> int:
    """Run configs through the Prefect pipeline: one in this process, several in parallel on dask.

    Exit 0 when every run finished, 1 when one failed (the others still run; a summary table at the
    end), 130 when stopped by SIGINT/SIGTERM (the stage in progress not written; the fine checkpoints
    kept, so the same command continues)."""
    from stages import pipeline as P
    from stages.errors import QcbedInputError
    from stages.interrupt import EXIT_CODE, Interrupted, stop_on_signals, stop_requested, stop_signal

    cfgs = _validate_all(args.config)
    from flows.pipeline import failure_line, refine_many, refine_pattern, start_temporary_server

    plans = [P.make_plan(c, args.results) for c in cfgs]
    runs = [p.run_dir for p in plans]
    if len(set(runs)) != len(runs):
        raise QcbedInputError("CONFIG", "two configs write the same results folder",
                              "give each a distinct file name or [run] name")
    argv = getattr(args, "argv", None)
    t0 = time.perf_counter()
    with stop_on_signals():
        try:
            start_temporary_server()
            if len(args.config) == 1 and not args.dask_address:
                try:
                    refine_pattern(str(args.config[0]), str(args.results), until=args.until)
                except (QcbedInputError, Interrupted):
                    raise
                except Exception as exc:  # noqa: BLE001  -- one line; the traceback is in the run's error.log
                    print(failure_line(runs[0].name, exc, getattr(exc, "qcbed_error_log", None)), file=sys.stderr)
                    return 1
                out = None
            else:
                out = refine_many([str(c) for c in args.config], str(args.results), args.dask_address,
                                  min(args.workers, len(args.config)) if not args.dask_address else args.workers,
                                  args.until)
        except Interrupted as exc:
            print(interrupted_line(exc.signame, runs, argv), file=sys.stderr, flush=True)
            return EXIT_CODE
        if stop_requested():
            print(interrupted_line(stop_signal(), runs, argv), file=sys.stderr, flush=True)
            return EXIT_CODE
    for p in plans:
        _print_results(p)
    failed = False
    if out is not None:
        rows = [(r.name, *run_outcome(r, out.get(str(c)))) for r, c in zip(runs, args.config)]
        failed = any(st != "finished" for _, st, _ in rows)
        print(summary_table(rows))
    print(f"finished in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def cmd_status(args) -> int:
    from stages import pipeline as P

    root = Path(args.results)
    if not root.exists():
        from stages.errors import QcbedInputError

        raise QcbedInputError(str(root), "no such results folder", "give the folder given to qcbed run --results")
    runs = [root] if (root / P.RUN_RECORD).exists() else sorted(d for d in root.iterdir() if (d / P.RUN_RECORD).exists())
    if not runs:
        print(f"no runs in {root}")
        return 0
    for d in runs:
        st = P.run_status(d)
        stale = [s for s, v in st.stages.items() if v == "stale"]
        if st.running:
            state = f"RUNNING ({st.running})"
        elif st.stages and all(v == "done" for v in st.stages.values()):
            state = "finished"
        elif stale:
            state = (f"stale ({', '.join(stale)}: " + ("the config changed since the run" if st.config_changed else
                                                      "computed from an earlier config or inputs") + "; qcbed run recomputes them)")
        else:
            state = "incomplete"
        print(f"{d.name}: {state}")
        print("    " + "  ".join(f"{s} {v}" for s, v in st.stages.items()))
        if st.last_iteration is not None or st.gof is not None:
            it = f"last checkpoint: iteration {st.last_iteration}; " if st.last_iteration is not None else ""
            print(f"    {it}{st.gof_name or 'GOF'} {st.gof:.6g}" if st.gof is not None else f"    {it}")
        if st.note:
            print(f"    note: {st.note}")
    return 0


def cmd_rerun(args) -> int:
    """Re-execute a finished run from its stored config, from scratch, and compare its numbers."""
    import datetime as dt
    import shutil

    import numpy as np

    from stages import pipeline as P
    from stages.errors import QcbedInputError
    from stages.store import open_store

    run = Path(args.run)
    if not (run / "fine.zarr" / "zarr.json").exists():
        raise QcbedInputError(str(run), "not a finished run (no fine.zarr)", "give results/<run> of a finished qcbed run")
    cfg = _validated(run)
    from flows.pipeline import refine_pattern

    rec = json.loads((run / P.RUN_RECORD).read_text())
    plan = P.make_plan(cfg, run.parent, run_dir=run)
    changed = [f for f, v in plan.digests.items() if rec.get("input_digests", {}).get(f) != v]
    if changed:
        print(f"note: input files changed since the run: {', '.join(changed)}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    new = run.parent / f".rerun-{run.name}-{stamp}"
    print(f"re-running {run.name} from its stored config into {new} (from scratch)")
    t0 = time.perf_counter()
    refine_pattern(str(run), str(run.parent), run_dir=str(new))
    a, b = open_store(run / "fine.zarr"), open_store(new / "fine.zarr")
    rows, worst = [], 0.0
    for i, name in enumerate(a.param.values.tolist()):
        va, vb, sa = float(a.value[i]), float(b.value[i]), float(a.sigma[i])
        dev = abs(vb - va) / sa if sa > 0 else (0.0 if va == vb else np.inf)
        worst = max(worst, dev)
        rows.append({"name": name, "stored": va, "rerun": vb, "sigma": sa, "difference_in_sigma": dev})
    same = worst <= args.tolerance_sigma
    identical = all(r["stored"] == r["rerun"] for r in rows)
    verdict = "reproduced bit for bit" if identical else (
        f"reproduced within {args.tolerance_sigma} sigma (largest difference {worst:.2g} sigma)" if same else
        f"NOT reproduced: largest difference {worst:.3g} sigma")
    for r in rows:
        print(f"    {r['name']:<26}{r['stored']:>16.9g}{r['rerun']:>16.9g}   {r['difference_in_sigma']:.2g} sigma")
    print(f"{run.name}: {verdict} ({time.perf_counter() - t0:.0f} s)")
    P.atomic_write_text(run / f"rerun-{stamp}.json", json.dumps(
        {"verdict": verdict, "reproduced": bool(same), "identical": identical, "tolerance_sigma": args.tolerance_sigma,
         "parameters": rows, "changed_inputs": changed, "versions": P.dependency_versions()}, indent=1) + "\n")
    if args.keep:
        print(f"kept the rerun in {new}")
    else:
        shutil.rmtree(new, ignore_errors=True)
    return 0 if same else 1


def _check_fine_store(run: Path) -> None:
    """A fine.zarr the report can read: written by this qcbed version's fine stage, and readable."""
    from stages import __version__
    from stages.errors import QcbedInputError
    from stages.store import open_store

    try:
        ds = open_store(run / "fine.zarr")
    except QcbedInputError:  # no store, or damaged (moved aside): its own one-line message
        raise
    except Exception as exc:  # noqa: BLE001  (unreadable store: any reader error)
        raise QcbedInputError(str(run / "fine.zarr"), f"unreadable ({type(exc).__name__}: {exc})",
                              "run `qcbed run CONFIG` again: the fine stage is recomputed") from None
    missing = [v for v in ("value", "sigma", "fit_exp", "fit_model", "h") if v not in ds.variables]
    if missing or ds.attrs.get("qcbed_version") != __version__:
        why = f"lacks {', '.join(missing)}" if missing else f"was written by qcbed {ds.attrs.get('qcbed_version')}"
        raise QcbedInputError(str(run / "fine.zarr"), f"{why}; this is qcbed {__version__}",
                              "run `qcbed run CONFIG` again (its stage keys include the version, so the stages recompute)")


def cmd_report(args) -> int:
    """Regenerate results/<run>/report/ from the stores (no refit), or compare several runs."""
    from stages.errors import QcbedInputError
    from stages.compare import compare_text, write_comparison
    from stages.report import write_report

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "fine.zarr" / "zarr.json").exists():
            raise QcbedInputError(str(r), "not a finished run (no fine.zarr)", "give results/<run> of a finished qcbed run")
        _check_fine_store(r)
    if args.compare:
        if len(runs) < 2:
            raise QcbedInputError("--compare", "needs at least two run folders", "qcbed report --compare results/a results/b")
        t0 = time.perf_counter()
        out, c = write_comparison(runs, args.out)
        print(compare_text(c))
        for what, geo in (("structure factors disagree", False), ("geometry differs (expected between patterns)", True)):
            bad = [p["name"] for p in c["parameters"] if p["consistent"] is False and (p["kind"] == "geometry") == geo]
            if bad:
                print(f"{what} (p < {c['disagree_p']}): {', '.join(bad)}")
        print(f"wrote {out / 'compare.html'} (and compare.md, .json, .csv) in {time.perf_counter() - t0:.1f} s")
        return 0
    if args.out is not None:
        raise QcbedInputError("--out", "is for --compare only", "a run's report is always written to <run>/report/")
    for r in runs:
        t0 = time.perf_counter()
        path = write_report(r, plots=not args.no_plots)
        print(f"[{r.name}] report: {path / 'report.html'} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _watched_runs(watch: Path, results) -> list[Path]:
    """The run folders of the valid configs in a watched folder (for the line after a stop)."""
    from stages import pipeline as P
    from stages.config import load_config
    from stages.errors import QcbedInputError, QcbedInputErrors

    runs = []
    for f in sorted(watch.glob("*.toml")):
        try:
            runs.append(P.make_plan(load_config(f), results).run_dir)
        except (QcbedInputError, QcbedInputErrors, OSError):
            continue
    return runs


def cmd_serve(args) -> int:
    from stages.errors import QcbedInputError

    watch = Path(args.watch)
    if not watch.is_dir():
        raise QcbedInputError("--watch", f"{watch} is not a folder", "give the folder of run configs (*.toml)")
    from flows.pipeline import facility_batch

    params = {"config_dir": str(watch.resolve()), "results_dir": str(Path(args.results).resolve()),
              "dask_address": args.dask_address, "n_workers": args.workers}
    if args.once:
        from stages.interrupt import EXIT_CODE, Interrupted, stop_on_signals, stop_requested, stop_signal

        with stop_on_signals():
            try:
                out = facility_batch(**params)
            except Interrupted as exc:
                print(interrupted_line(exc.signame, _watched_runs(watch, args.results), getattr(args, "argv", None)),
                      file=sys.stderr, flush=True)
                return EXIT_CODE
            if stop_requested():
                print(interrupted_line(stop_signal(), _watched_runs(watch, args.results), getattr(args, "argv", None)),
                      file=sys.stderr, flush=True)
                return EXIT_CODE
        return 1 if out["invalid"] or any("error" in v for v in out["results"].values()) else 0
    if not os.environ.get("PREFECT_API_URL"):
        raise QcbedInputError("PREFECT_API_URL", "not set: schedules need a Prefect server (a temporary one cannot schedule)",
                              "start `prefect server start` in another shell and export "
                              "PREFECT_API_URL=http://127.0.0.1:4200/api; or call `qcbed serve --once` (or qcbed run) from cron")
    print(f"serving deployment qcbed-facility/{args.name} on cron {args.cron!r} over {watch} (Ctrl-C to stop)")
    facility_batch.serve(name=args.name, cron=args.cron, parameters=params, limit=1)
    return 0


def cmd_demo(args) -> int:
    """Run the shipped examples: Si [110] thickness series (results/demo/), and the synthetic Si CBED
    pattern through the whole pipeline (results/si_cbed/)."""
    out = Path(args.results) / "demo"
    argv = ["simulate", str(REPO_DATA / "si.cif"), "--hv", "200", "--zone", "1", "1", "0",
            "--thickness", "200:3000:200", "--absorption", "0.05",
            "--json", str(out / "simulate.json"), "--zarr", str(out / "simulate.zarr")]
    print("qcbed " + " ".join(argv))
    rc = main(argv)
    if rc:
        return rc
    argv = ["run", str(REPO_DATA / "si_cbed" / "config.toml"), "--results", str(args.results)]
    if args.no_refine:
        argv += ["--until", "variance"]
    print("\nqcbed " + " ".join(argv) + ("" if args.no_refine else
          "   (about a minute; it starts off the truth, which is in data/si_cbed/si_cbed_truth.json)"))
    return main(argv)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcbed", description=(
        "Quantitative CBED / LARBED: dynamical Bloch-wave simulation and structure-factor refinement. "
        "Units: Å, 1/Å (no 2π), kV."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("simulate", help="beam intensities versus thickness for one incident direction",
                       description="Bloch-wave intensities of the diffracted beams for one incident direction, "
                                   "at every requested thickness, from one eigen-solution.")
    s.add_argument("crystal", help="crystal file: .cif, PyExtal .dat (its hv/zone/norm/kt/xaxis/hkl/adj are used "
                                   "as defaults) or .toml")
    s.add_argument("--hv", type=float, metavar="KV", help="accelerating voltage in kV")
    s.add_argument("--zone", nargs=3, type=float, metavar=("U", "V", "W"),
                   help="zone axis [uvw], direct lattice, pointing toward the source")
    s.add_argument("--normal", nargs=3, type=float, metavar=("U", "V", "W"), help="foil normal [uvw] (default: the zone)")
    s.add_argument("--x-axis", nargs=3, type=float, metavar=("H", "K", "L"),
                   help="horizontal reflection (hkl), perpendicular to the zone (default: the shortest)")
    s.add_argument("--kt", nargs=3, type=float, metavar=("KX", "KY", "KZ"),
                   help="tangential component of the incident wave vector in reciprocal-lattice units "
                        "(as PyExtal's kt); default 0 0 0 = exact zone axis")
    s.add_argument("--thickness", required=True, metavar="SPEC",
                   help="thicknesses in Å: START:STOP:STEP (stop included), or a list 500,1000")
    s.add_argument("--beams", nargs="+", metavar="H,K,L", help="output reflections (default: every strong beam)")
    s.add_argument("--absorption", metavar="MODEL",
                   help="'none' (default); a fraction F for proportional absorption U'_g = F U_g; or a .toml "
                        "file giving U'_g per reflection ([[reflection]] hkl = [1,1,1], Uprime = 8e-4; "
                        "optional fraction = F for the others)")
    s.add_argument("--table", default="peng", choices=["peng", "kirkland"],
                   help="electron scattering factors: peng (ITC 4.3.2.2, default) or kirkland (2010)")
    s.add_argument("--solver", default="general", choices=["general", "hermitian", "auto"],
                   help="general: complex eigen-solution (default); hermitian: ~2-3x faster, absorption by "
                        "quasi-degenerate perturbation (|dI| < 1e-4 for U'/U <= 0.1); auto: hermitian where its "
                        "error estimate allows, general elsewhere")
    s.add_argument("--gmax", type=float, metavar="INV_A", help="largest |g| of the beam pool, 1/Å (default 5.0)")
    s.add_argument("--sg-strong", type=float, metavar="INV_A", help="excitation error (1/Å) below which beams are diagonalised exactly (default 0.06)")
    s.add_argument("--sg-max", type=float, metavar="INV_A", help="excitation error (1/Å) beyond which beams are dropped (default 1.5)")
    s.add_argument("--no-bethe", action="store_true", help="no Bethe perturbation of weak beams")
    s.add_argument("--holz", action="store_true", help="include the higher-order Laue zones (the affordable HOLZ beam set: strongly coupled HOLZ beams "
                        "near the Bragg condition exact, the layers by Bethe perturbation; stages/physics/beams.py)")
    s.add_argument("--json", metavar="FILE", help="write the result as JSON")
    s.add_argument("--zarr", metavar="DIR", help="write the result as an xarray Dataset in a zarr store")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    s.set_defaults(func=cmd_simulate)

    pr = sub.add_parser("prepare", help="load a pattern and sample its regions of interest (quick check of a config)",
                        description="Validate a run config, run its load and roi stages (no Prefect) and print a summary; "
                                    "writes RESULTS/<run>/pattern.zarr and roi.zarr (reused by qcbed run).")
    pr.add_argument("config", help="run config (.toml), e.g. data/si_cbed/config.toml")
    pr.add_argument("--results", default="results", help="results folder (default: results)")
    pr.set_defaults(func=cmd_prepare)

    from stages.pipeline import STAGES

    r = sub.add_parser("run", help="run configs through the pipeline (Prefect; several in parallel on dask)",
                       description="Validate every config (all problems reported together), then run the stages "
                                   f"{', '.join(STAGES)} of each into RESULTS/<run>/ (one zarr store per stage). A stage "
                                   "whose store was made from the same inputs is skipped; an interrupted fine "
                                   "refinement resumes from its last iteration. One config runs in this process; "
                                   "several run in parallel on a local dask cluster (or --dask-address).")
    r.add_argument("config", nargs="+", help="run configs (.toml)")
    r.add_argument("--results", default="results", help="results folder (default: results)")
    r.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="an existing dask scheduler (default: a local cluster)")
    r.add_argument("--workers", type=int, default=2, help="local dask worker processes, one BLAS thread each (default 2)")
    r.add_argument("--until", choices=STAGES, help="stop after this stage")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="stages done or pending, last checkpoint and GOF of each run",
                        description="For each run under RESULTS (or one run folder): each stage done, stale (its "
                                    "inputs changed), pending or corrupt; whether it is running; the last fine "
                                    "checkpoint and its GOF.")
    st.add_argument("results", nargs="?", default="results", help="results folder or one run folder (default: results)")
    st.set_defaults(func=cmd_status)

    rr = sub.add_parser("rerun", help="re-execute a finished run from its stored config and compare the numbers",
                        description="Re-runs results/<run> from scratch from the config stored in its run.json (input "
                                    "files are checked against their recorded digests) into a temporary folder, and "
                                    "reports whether the refined values reproduce the stored ones (exit 0) or not (1).")
    rr.add_argument("run", help="a finished run folder, e.g. results/si_cbed")
    rr.add_argument("--tolerance-sigma", type=float, default=0.01,
                    help="largest accepted difference, in standard errors of the stored values (default 0.01)")
    rr.add_argument("--keep", action="store_true", help="keep the rerun's folder (default: removed after comparing)")
    rr.set_defaults(func=cmd_rerun)

    rp = sub.add_parser("report", help="regenerate a run's report from its stores, or compare runs",
                        description="Writes RUN/report/ (report.html, report.md, results.json, structure_factors.csv, "
                                    "correlation.csv, VESTA .hkl files, figures) from the run's zarr stores, without "
                                    "refitting. With --compare: the refined values of several runs side by side, with "
                                    "their weighted mean, scatter and chi^2 of consistency (compare.html/.md/.json/.csv "
                                    "in --out, default <parent of the first run>/compare-<names>/).")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folders, e.g. results/si_cbed")
    rp.add_argument("--compare", action="store_true", help="compare the runs instead of writing their reports")
    rp.add_argument("--out", metavar="DIR", help="folder of the comparison (with --compare)")
    rp.add_argument("--no-plots", action="store_true", help="skip the figures (faster)")
    rp.set_defaults(func=cmd_report)

    sv = sub.add_parser("serve", help="serve a Prefect deployment that refines a folder of configs on a schedule",
                        description="Every CRON tick, refine each config (*.toml) in the watched folder that is not "
                                    "finished (finished ones are skipped). Needs a Prefect server: `prefect server "
                                    "start` and PREFECT_API_URL; --once runs the same work once, now, without one.")
    sv.add_argument("--watch", required=True, metavar="DIR", help="folder of run configs")
    sv.add_argument("--cron", default="0 2 * * *", help='schedule (default "0 2 * * *": every night at 02:00)')
    sv.add_argument("--results", default="results", help="results folder (default: results)")
    sv.add_argument("--name", default="facility", help="deployment name (default: facility)")
    sv.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="an existing dask scheduler")
    sv.add_argument("--workers", type=int, default=2, help="local dask worker processes (default 2)")
    sv.add_argument("--once", action="store_true", help="process the folder once now and exit")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="run the shipped example end to end into results/",
                       description="Simulate the shipped silicon example (data/si.cif) into RESULTS/demo/, then run the "
                                   "synthetic Si CBED example (data/si_cbed) through the whole pipeline into "
                                   "RESULTS/si_cbed/: load, roi, iam, variance, coarse (thickness), fine refinement of U_111, "
                                   "U_222 and the geometry, report; from a start off the truth, as a user's would be.")
    d.add_argument("--results", default="results", help="results folder (default: results)")
    d.add_argument("--no-refine", action="store_true", help="stop before the refinement")
    d.set_defaults(func=cmd_demo)
    return p


def _protect_negative_values(argv: list[str]) -> list[str]:
    """Let values such as '-1,1,-1' (a reflection) or '-5:100:10' reach our own validation.

    argparse takes any token starting with '-' that is not a plain number for an option; a
    leading space keeps such value tokens as values (they are stripped when parsed).
    """
    import re

    pat = re.compile(r"^-[0-9.]+[,:;]")
    return [" " + a if pat.match(a) else a for a in argv]


def main(argv=None) -> int:
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_protect_negative_values(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from stages.config import QcbedInputWarning
    from stages.errors import QcbedInputError

    args.argv = argv
    seen: list = []
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", QcbedInputWarning)
            return args.func(args)
    except QcbedInputError as exc:
        print(f"qcbed: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _emit_warnings(seen)


def _emit_warnings(seen: list) -> None:
    """The warnings recorded during a command, after it: a config warning as one line, once (the config is
    validated more than once), the others as Python shows them.  Called outside the recording context: a
    warning re-emitted inside it would be recorded again (the list then grows while it is read: the command
    never returned)."""
    from stages.config import QcbedInputWarning

    for text in dict.fromkeys(str(w.message) for w in seen if issubclass(w.category, QcbedInputWarning)):
        print(f"qcbed: warning: {text}", file=sys.stderr)
    for w in seen:
        if not issubclass(w.category, QcbedInputWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
