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


def run_name(config_path: Path) -> str:
    """results/<run>: the config's stem, or its folder's name for a file called config.toml."""
    p = Path(config_path)
    return p.parent.resolve().name if p.stem == "config" else p.stem


def cmd_prepare(args) -> int:
    """Load the pattern and sample the ROI of a run config; write pattern.zarr and roi.zarr."""
    import numpy as np

    from stages.store import write_store

    cfg, model, pattern, pg, roi = _prepared(args.config)
    regions, padding = roi.attrs["regions"], roi.attrs["padding"]
    regions = json.loads(regions)
    out = Path(args.results) / run_name(cfg.path)
    write_store(pattern, out / "pattern.zarr")
    write_store(roi, out / "roi.zarr")
    shape = "x".join(str(n) for n in pattern.intensity.shape)
    print(f"pattern: {pattern.attrs['kind']} {shape} (source dtype {pattern.attrs.get('dtype', '?')}), "
          f"{int((~pattern.valid.values).sum())} unusable pixels")
    print(f"calibration: {pattern.attrs.get('calibration', '{}')}")
    kt = roi.kt.values
    print(f"roi: {len(regions)} region(s), {roi.sizes['point']} points ({int(roi.inner.sum())} compared, padding {padding}), "
          f"{roi.sizes['disk']} disks; {roi.attrs['n_points_valid']} valid samples, {roi.attrs['n_points_excluded']} excluded")
    print(f"tilts: kt from {np.round(kt.min(0), 4).tolist()} to {np.round(kt.max(0), 4).tolist()} (hkl units), "
          f"{pg.pixel_size_invA:.5f} 1/Å per pixel")
    print(f"wrote {out / 'pattern.zarr'} and {out / 'roi.zarr'}")
    return 0


def _prepared(config_path):
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


def cmd_refine(args) -> int:
    """Fine refinement of the structure factors and geometry of one run config."""
    import numpy as np

    from stages import config as C
    from stages.fine import refine

    cfg, model, pattern, pg, roi = _prepared(args.config)
    problem = C.fine_problem(cfg, model, pg, pattern, roi)
    if args.thickness is not None:
        problem.thickness0 = float(args.thickness)
    r = cfg.section("refine")
    start = {p.label: p.x0 for p in problem.sf}
    t0 = time.perf_counter()

    def progress(it, simplex, fsim, best):
        vals = " ".join(f"{p.label}={v:.6g}" for p, v in zip(problem.sf, best))
        print(f"  iteration {it:4d}  {problem.gof.name} {fsim[0]:.5g}  {vals}  "
              f"({problem.counters['eigen_solves']} solves, {time.perf_counter() - t0:.0f} s)", flush=True)

    res = refine(problem, max_iterations=args.max_iterations or int(r.get("max_iterations", 200)),
                 initial_step=float(r.get("initial_step", 0.1)), xatol=float(r.get("xatol", 1e-4)),
                 callback=None if args.quiet else progress)
    out = Path(args.results) / run_name(cfg.path)
    record = {
        "config": str(cfg.path), "gof_name": problem.gof.name, "gof_start": res.gof_start, "gof": res.gof,
        "converged": res.converged, "n_points": res.n_points, "dof": res.dof, "scale": res.scale,
        "background": np.asarray(res.background).tolist(),
        "parameters": [{"name": n, "value": float(v), "sigma": float(s), "start": start.get(n)}
                       for n, v, s in zip(res.names, res.values, res.sigma)],
        "correlation": np.nan_to_num(res.correlation).tolist(), "counters": res.counters,
        "trace": [{"iteration": it, "values": v, "gof": f} for it, v, f in res.trace],
    }
    _atomic_write_text(out / "fine.json", json.dumps(record, indent=1) + "\n")
    print(f"{problem.gof.name}: {res.gof_start:.4f} -> {res.gof:.4f} (reduced), {res.n_points} points, dof {res.dof}, "
          f"{'converged' if res.converged else 'not converged'} after {res.counters['outer_iterations']} iterations")
    print(f"{'parameter':<28}{'start':>14}{'refined':>14}{'sigma':>12}")
    for p in record["parameters"]:
        st = "" if p["start"] is None else f"{p['start']:.6g}"
        print(f"{p['name']:<28}{st:>14}{p['value']:>14.6g}{p['sigma']:>12.2g}")
    c = res.counters
    print(f"eigen-solves {c['eigen_solves']}, inner evaluations {c['inner_evaluations']}, "
          f"solve {c['solve_s']:.1f} s, inner {c['inner_s']:.1f} s, total {c['total_s']:.1f} s")
    print(f"wrote {out / 'fine.json'}")
    return 0


def cmd_demo(args) -> int:
    """Run the shipped examples: Si [110] thickness series (results/demo/), and the synthetic Si CBED
    pattern loaded, sampled through its ROI and refined (results/si_cbed/)."""
    out = Path(args.results) / "demo"
    argv = ["simulate", str(REPO_DATA / "si.cif"), "--hv", "200", "--zone", "1", "1", "0",
            "--thickness", "200:3000:200", "--absorption", "0.05",
            "--json", str(out / "simulate.json"), "--zarr", str(out / "simulate.zarr")]
    print("qcbed " + " ".join(argv))
    rc = main(argv)
    if rc:
        return rc
    argv = ["prepare", str(REPO_DATA / "si_cbed" / "config.toml"), "--results", str(args.results)]
    print("\nqcbed " + " ".join(argv))
    rc = main(argv)
    if rc or args.no_refine:
        return rc
    argv = ["refine", str(REPO_DATA / "si_cbed" / "config.toml"), "--results", str(args.results)]
    print("\nqcbed " + " ".join(argv) + "   (about 3 minutes; truth in data/si_cbed/si_cbed_truth.json)")
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
    s.add_argument("--solver", default="general", choices=["general", "hermitian"],
                   help="general: complex eigen-solution (default); hermitian: faster, absorption by perturbation")
    s.add_argument("--gmax", type=float, metavar="INV_A", help="largest |g| of the beam pool, 1/Å (default 5.0)")
    s.add_argument("--sg-strong", type=float, metavar="INV_A", help="excitation error (1/Å) below which beams are diagonalised exactly (default 0.06)")
    s.add_argument("--sg-max", type=float, metavar="INV_A", help="excitation error (1/Å) beyond which beams are dropped (default 1.5)")
    s.add_argument("--no-bethe", action="store_true", help="no Bethe perturbation of weak beams")
    s.add_argument("--holz", action="store_true", help="include higher-order Laue zone beams")
    s.add_argument("--json", metavar="FILE", help="write the result as JSON")
    s.add_argument("--zarr", metavar="DIR", help="write the result as an xarray Dataset in a zarr store")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    s.set_defaults(func=cmd_simulate)

    pr = sub.add_parser("prepare", help="load a pattern and sample its regions of interest (run config)",
                        description="Validate a run config, load its pattern and sample the ROI at the configured "
                                    "geometry; write RESULTS/<run>/pattern.zarr and roi.zarr and print a summary.")
    pr.add_argument("config", help="run config (.toml), e.g. data/si_cbed/config.toml")
    pr.add_argument("--results", default="results", help="results folder (default: results)")
    pr.set_defaults(func=cmd_prepare)

    rf = sub.add_parser("refine", help="refine structure factors and geometry of a run config",
                        description="Load the pattern, sample the ROI and run the nested fine refinement "
                                    "(Nelder-Mead over structure factors, Powell over geometry); write RESULTS/<run>/fine.json.")
    rf.add_argument("config", help="run config (.toml) with a [refine] section")
    rf.add_argument("--results", default="results", help="results folder (default: results)")
    rf.add_argument("--max-iterations", type=int, help="outer iterations (default: refine.max_iterations or 200)")
    rf.add_argument("--thickness", type=float, metavar="A", help="starting thickness in Å (default: simulation.thickness_A)")
    rf.add_argument("-q", "--quiet", action="store_true", help="no per-iteration progress")
    rf.set_defaults(func=cmd_refine)

    d = sub.add_parser("demo", help="run the shipped example end to end into results/",
                       description="Simulate the shipped silicon example (data/si.cif) into RESULTS/demo/, then load the "
                                   "synthetic Si CBED example, sample its ROI and refine U_111, U_222 and the geometry "
                                   "into RESULTS/si_cbed/.")
    d.add_argument("--results", default="results", help="results folder (default: results)")
    d.add_argument("--no-refine", action="store_true", help="stop after loading and sampling the CBED example")
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
    from stages.errors import QcbedInputError

    try:
        return args.func(args)
    except QcbedInputError as exc:
        print(f"qcbed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
