"""Benchmark of the fine refinement on the shipped Si CBED example (data/si_cbed/config.toml).

Run:  python bench/refine.py            (full refinement from the IAM and a thickness 5% off: ~10 min)
      python bench/refine.py --quick    (10 outer iterations)

Prints the wall time of the refinement, its eigen-solve and inner-evaluation counts, and the
ratio of time per outer evaluation against a naive variant that re-solves the eigenproblem at
every geometry step of the inner loop (what a refinement without the cached eigen-solution would
do), measured in the same run (the naive cost from timed naive steps times the step count).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.fine import refine  # noqa: E402


def problem(naive: bool = False):
    from optimizers import problem as example_problem  # bench/ is on sys.path when run as a script

    _, prob, truth = example_problem("cbed")
    prob.naive = naive
    return prob, truth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    iters = 10 if args.quick else 150

    prob, truth = problem()
    t0 = time.perf_counter()
    res = refine(prob, max_iterations=iters)
    wall = time.perf_counter() - t0
    c = res.counters
    print(f"Si CBED fine refinement ({len(prob.sf)} structure factors + {len(prob.geometry_names)} geometry parameters, "
          f"{res.n_points} points): {wall:.1f} s, {c['outer_iterations']} iterations, {c['outer_evaluations']} outer evaluations")
    print(f"  eigen-solves {c['eigen_solves']} ({c['solve_s']:.1f} s), inner evaluations {c['inner_evaluations']} "
          f"({c['inner_s']:.1f} s), reduced chi^2 {res.gof_start:.3f} -> {res.gof:.3f}")
    for name in res.names:
        tv = None
        if name.startswith("U("):
            key = name[2:-1]
            tv = truth["U"].get(key, [None])[0]
        elif name == "thickness":
            tv = truth["thickness_A"]
        extra = f"  truth {tv:.6g} ({(res.value(name) / tv - 1) * 100:+.3f}%)" if tv else ""
        print(f"  {name:<14} {res.value(name):.6g} ± {res.error(name):.2g}{extra}")

    # time per outer evaluation, cached vs naive: the cached one is measured whole; a naive inner step
    # (one eigen-solve + one evaluation) is measured 3 times and multiplied by the number of inner
    # steps the cached evaluation needed (running the naive loop whole would take ~1 h per evaluation)
    p, _ = problem()
    t0 = time.perf_counter()
    sol = p.solve([q.x0 for q in p.sf])
    _, g, _ = p.inner(sol)
    cached = time.perf_counter() - t0
    n_inner = p.counters["inner_evaluations"]
    pn, _ = problem(naive=True)
    t0 = time.perf_counter()
    for _ in range(3):
        pn.gof_at(None, g)
    step = (time.perf_counter() - t0) / 3
    naive = step * n_inner
    print(f"time per outer evaluation: cached {cached:.1f} s (1 eigen-solve, {n_inner} inner steps); "
          f"naive {naive:.0f} s ({n_inner} eigen-solves at {step:.2f} s per step)")
    print(f"ratio naive / cached: {naive / cached:.0f}x")


if __name__ == "__main__":
    main()
