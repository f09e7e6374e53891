"""Nelder-Mead against Levenberg-Marquardt on the shipped synthetic examples, measured in one run.

Run:  python bench/optimizers.py            (about 10 minutes on 2 shared cores)
      python bench/optimizers.py --only cbed

For data/si_cbed and data/si_larbed (known truth, Poisson noise), each refinement starts from the
IAM structure factors, a thickness 5 % below the truth and the true geometry (read from the truth file:
the shipped configs start farther off, which the CBED fine stage reaches only after the coarse stage),
with the example's own settings otherwise, once with
``refine.optimizer = "nelder-mead"`` (the seed's method, ``max_iterations`` 200) and once with
``"levenberg-marquardt"``.  Printed per example and optimiser: eigen-solves, wall time, whether it
converged, reduced chi^2, and for every parameter with a known truth the error in units of the
reported sigma; then the ratios NM / LM of eigen-solves and time.  This is the evidence for the
default optimiser (README "Refinement").
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import config as C  # noqa: E402
from stages.fine import levenberg_marquardt, refine  # noqa: E402
from stages.load import load_pattern  # noqa: E402
from stages.physics.pattern_geometry import PatternGeometry  # noqa: E402
from stages.roi import build_roi, regions_from_config  # noqa: E402

EXAMPLES = {"cbed": ("si_cbed", "si_cbed_truth.json"), "larbed": ("si_larbed", "si_larbed_truth.json")}


def problem(name: str):
    folder, truth_file = EXAMPLES[name]
    cfg = C.load_config(REPO / "data" / folder / "config.toml")
    model = C.forward_model(cfg)
    pattern = load_pattern(cfg.section("pattern"), cfg.base_dir)
    truth = json.loads((cfg.base_dir / truth_file).read_text())
    g = dict(truth["geometry"])
    g.pop("disk_shift_px", None)
    pg = PatternGeometry(model.geometry, g.pop("kind"), **{k: (tuple(v) if isinstance(v, list) else v) for k, v in g.items()})
    regions, padding = regions_from_config(cfg.section("roi"))
    roi = build_roi(pattern, pg, regions, C.roi_disks(cfg, pattern), padding)
    prob = C.fine_problem(cfg, model, pg, pattern, roi)
    prob.thickness0 = 0.95 * truth["thickness_A"]
    return cfg, prob, truth


def truth_of(name: str, truth: dict):
    if name.startswith("U("):
        return truth["U"].get(name[2:-1], [None])[0]
    if name == "thickness":
        return truth["thickness_A"]
    return None


def run(name: str, optimizer: str) -> dict:
    cfg, prob, truth = problem(name)
    r = cfg.section("refine")
    t0 = time.perf_counter()
    if optimizer == "nelder-mead":
        res = refine(prob, max_iterations=200, xatol=float(r.get("xatol", 1e-4)))
    else:
        res = levenberg_marquardt(prob, max_steps=200)
    wall = time.perf_counter() - t0
    errs = {}
    for p in res.names:
        tv = truth_of(p, truth)
        if tv is not None:
            errs[p] = ((res.value(p) - tv) / res.error(p), (res.value(p) / tv - 1) * 100)
    return {"wall": wall, "solves": res.counters["eigen_solves"], "converged": res.converged, "gof": res.gof,
            "errs": errs}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(EXAMPLES), help="one example")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    names = [args.only] if args.only else list(EXAMPLES)
    print("From the IAM and a thickness 5 % off; one BLAS thread per process")
    for name in names:
        out = {opt: run(name, opt) for opt in ("nelder-mead", "levenberg-marquardt")}
        print(f"\n{EXAMPLES[name][0]}")
        for opt, o in out.items():
            errs = ", ".join(f"{p} {e:+.2f} sigma ({pc:+.3f} %)" for p, (e, pc) in o["errs"].items())
            print(f"  {opt:<20} {o['solves']:>4} eigen-solves {o['wall']:>7.1f} s  "
                  f"{'converged' if o['converged'] else 'NOT converged'}  reduced chi^2 {o['gof']:.4f}  | {errs}")
        nm, lm = out["nelder-mead"], out["levenberg-marquardt"]
        print(f"  ratio NM / LM: eigen-solves {nm['solves'] / lm['solves']:.1f}x, time {nm['wall'] / lm['wall']:.1f}x")
    print(f"\nTotal run time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
