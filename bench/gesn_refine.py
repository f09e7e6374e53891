"""The shipped GeSn refinement (data/gesn_lacbed/config.toml), old optimiser against new, in one run.

Run:  python bench/gesn_refine.py                 (about 20 minutes on 2 cores)
      python bench/gesn_refine.py --nm-iterations 0   (the Levenberg-Marquardt run alone: ~9 minutes)

1. The whole pipeline on the shipped config, as ``qcbed run`` runs it (load ... coarse with the beam
   probe, the Levenberg-Marquardt fine stage, report) into a temporary results folder: wall time per
   stage and in all, eigen-solves, steps, the stop reason, the largest remaining step in sigma, reduced
   chi^2 and mean ZNCC.
2. The old optimiser on the same stores (load ... coarse copied, so only the fine stage runs):
   ``refine.optimizer = "nelder-mead"`` for ``--nm-iterations`` iterations (default 8): its eigen-solves,
   time, chi^2, and the Gauss-Newton step from its end point in sigma (how far from the optimum it still
   is).  Printed last: the ratios.

Needs ../shared/data/gesn-lacbed (see the config's pattern.data_source).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from stages import config as C  # noqa: E402
from stages import pipeline as P  # noqa: E402
from stages.store import open_store  # noqa: E402

CONFIG = ROOT / "data" / "gesn_lacbed" / "config.toml"


def _summary(plan) -> dict:
    f = open_store(plan.store("fine"))
    c = json.loads(f.attrs["counters"])
    sig = f.sigma.values
    step = f.gauss_newton_step.values
    names = [str(x) for x in f.param.values]
    tested = [i for i, n in enumerate(names) if n.startswith("U") or n == "thickness"]
    ratio = float(np.nanmax(np.abs(step[tested]) / sig[tested])) if tested else float("nan")
    return {"solves": c["eigen_solves"], "fine_s": c["total_s"], "gof": float(f.attrs["gof"]),
            "zncc": float(f.attrs["zncc_mean"]), "converged": bool(f.attrs["converged"]),
            "stop": c.get("lm_stop", "iteration budget"), "step_sigma": ratio,
            "tilts": (c.get("tilts_solved"), c.get("tilts_hermitian"), c.get("tilts_general"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nm-iterations", type=int, default=8, help="Nelder-Mead iterations (0: skip)")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="qcbed-gesn-"))
    try:
        times = {}

        def say(msg):
            print(msg, flush=True)
            if ": done in " in msg:
                stage = msg.split("] ", 1)[1].split(":", 1)[0]
                times[stage] = float(msg.split("done in ", 1)[1].split(" s", 1)[0])

        plan = P.make_plan(C.validate_config(CONFIG), tmp / "results")
        t0 = time.perf_counter()
        P.run_all(plan, say=say)
        wall = time.perf_counter() - t0
        lm = _summary(plan)
        out = [f"Levenberg-Marquardt (shipped config): whole run {wall:.0f} s ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"); {lm['solves']} eigen-solves; "
               f"{'converged' if lm['converged'] else 'NOT converged'} ({lm['stop']}, largest remaining step "
               f"{lm['step_sigma']:.2f} sigma); reduced chi^2 {lm['gof']:.3f}, mean ZNCC {lm['zncc']:.4f}; "
               f"tilts solved / hermitian / general {lm['tilts']}"]
        if a.nm_iterations > 0:
            # the same config in memory, another optimiser and run name (the earlier stages' keys are equal)
            cfg_nm = C.validate_config(CONFIG)
            cfg_nm = C.RunConfig(path=cfg_nm.path, data=copy.deepcopy(cfg_nm.data))
            cfg_nm.data["refine"].update({"optimizer": "nelder-mead", "max_iterations": a.nm_iterations})
            cfg_nm.data["run"] = {"name": "gesn_nm"}
            plan_nm = P.make_plan(cfg_nm, tmp / "results")
            plan_nm.run_dir.mkdir(parents=True, exist_ok=True)
            for st in ("load", "roi", "iam", "variance", "coarse"):  # the same inputs: these stages are skipped
                shutil.copytree(plan.store(st), plan_nm.store(st))
            P.run_all(plan_nm, say=print, until="fine")
            nm = _summary(plan_nm)
            out.append(f"Nelder-Mead, {a.nm_iterations} iterations: fine stage {nm['fine_s']:.0f} s, {nm['solves']} "
                       f"eigen-solves; reduced chi^2 {nm['gof']:.3f}, mean ZNCC {nm['zncc']:.4f}; Gauss-Newton step "
                       f"from its end {nm['step_sigma']:.1f} sigma ({'converged' if nm['converged'] else 'not converged'})")
            out.append(f"ratio Nelder-Mead / Levenberg-Marquardt: eigen-solves {nm['solves'] / lm['solves']:.1f}x, "
                       f"fine-stage time {nm['fine_s'] / lm['fine_s']:.1f}x; reduced chi^2 {lm['gof']:.3f} (LM) vs "
                       f"{nm['gof']:.3f} (NM)")
        print("\n" + "\n".join(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
