"""The cost of verifying stores (issue 16 item 1): manifest check against opening and computing, one run.

Run:  .venv/bin/python bench/store_check.py                (the shipped example, about 1 minute on 2 cores)
      .venv/bin/python bench/store_check.py --repeat 50    (more repeats of the check and the open)
      .venv/bin/python bench/store_check.py --keep DIR     (keep the run folder in DIR)

Everything is measured in this one process:

1. The shipped example (data/si_cbed/config.toml) runs stage by stage in plain Python
   (``stages.pipeline.run_stage``, no Prefect) into a fresh folder; each stage's wall time (compute and
   write) is its ``stage`` time.
2. For every store: ``verify`` = :func:`stages.store.verify_store` (size and sha256 of every file
   against ``qcbed_manifest.json``), ``check`` = :func:`stages.pipeline.store_check` (what a rerun pays
   to skip the stage: the key and the manifest), ``open`` = xarray open + load without the check (the
   report: reading its results.json); medians of ``--repeat`` calls, files in the page cache (a
   rerun reads what the run just wrote; a cold cache costs the same disk read for verify and open).
3. The fine trace: :meth:`stages.pipeline.TraceStore.open` with its row digests against the same trace
   with the digests removed (the check is the difference).

Printed: one row per store with the times in ms and the ratios verify / open and verify / stage (the
goal: verify < 2 % of its stage), and the total check a fully skipped rerun pays.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import xarray as xr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import config as C  # noqa: E402
from stages import pipeline as P  # noqa: E402
from stages import store as S  # noqa: E402


def median_s(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` [s] (one warm-up call first)."""
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run_example(config: Path, results: Path) -> tuple[P.Plan, dict]:
    """The example stage by stage; {stage: wall time [s]}."""
    plan = P.make_plan(C.validate_config(config), results)
    P.write_run_record(plan)
    times = {}
    for s in plan.stages:
        t0 = time.perf_counter()
        P.run_stage(plan, s, say=lambda m: None)
        times[s] = time.perf_counter() - t0
    return plan, times


def open_plain(store: Path):
    """Opening a store as a later stage does, without the check."""
    if store.suffix != ".zarr":
        return json.loads((store / "results.json").read_text())
    return xr.open_zarr(store, consolidated=False, chunks=None).load()


def store_rows(plan: P.Plan, times: dict, repeat: int) -> list[dict]:
    rows = []
    for s in plan.stages:
        st = plan.store(s)
        assert S.verify_store(st) == "verified", st
        files = S.manifest_of(st)
        rows.append({"stage": s, "store": st.name, "files": len(files), "bytes": sum(v[0] for v in files.values()),
                     "verify": median_s(lambda: S.verify_store(st), repeat),
                     "check": median_s(lambda: P.store_check(plan, s), repeat),
                     "open": median_s(lambda: open_plain(st), repeat), "stage_s": times[s]})
    return rows


def trace_row(plan: P.Plan, work: Path, repeat: int) -> dict:
    """TraceStore.open with and without its row digests (copies, so the run's trace is left as written)."""
    import zarr

    with_d, without_d = work / "with" / P.TRACE, work / "without" / P.TRACE
    for d in (with_d, without_d):
        shutil.copytree(plan.run_dir / P.TRACE, d)
    del zarr.open_group(str(without_d), mode="r+").attrs["row_digests"]
    key = plan.trace_key or plan.keys["fine"]
    n = int(zarr.open_group(str(with_d), mode="r").attrs["n_committed"])
    t_with = median_s(lambda: P.TraceStore(with_d).open(key), repeat)
    t_without = median_s(lambda: P.TraceStore(without_d).open(key), repeat)
    return {"rows": n, "with": t_with, "without": t_without}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "data" / "si_cbed" / "config.toml")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--keep", type=Path, help="write the run into this folder and keep it")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qcbed-store-check-"))
    results = a.keep if a.keep else work / "results"
    try:
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        t0 = time.perf_counter()
        plan, times = run_example(a.config, results)
        print(f"example run {a.config.relative_to(ROOT) if a.config.is_relative_to(ROOT) else a.config}: "
              f"{time.perf_counter() - t0:.1f} s -> {plan.run_dir}")
        rows = store_rows(plan, times, a.repeat)
        tr = trace_row(plan, work, a.repeat)
        print(f"medians of {a.repeat} calls, files in the page cache; ms = milliseconds\n")
        head = (f"{'stage':<9}{'store':<24}{'files':>6}{'kB':>8}{'verify ms':>11}{'check ms':>10}{'open ms':>9}"
                f"{'stage s':>9}{'verify/open':>13}{'verify/stage':>14}")
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['stage']:<9}{r['store']:<24}{r['files']:>6}{r['bytes'] / 1e3:>8.0f}{1e3 * r['verify']:>11.2f}"
                  f"{1e3 * r['check']:>10.2f}{1e3 * r['open']:>9.2f}{r['stage_s']:>9.2f}"
                  f"{100 * r['verify'] / r['open']:>12.0f}%{100 * r['verify'] / r['stage_s']:>13.2f}%")
        worst = max(rows, key=lambda r: r["verify"] / r["stage_s"])
        total_check = sum(r["check"] for r in rows)
        total_stage = sum(r["stage_s"] for r in rows)
        print(f"\nworst verify/stage: {worst['stage']} {100 * worst['verify'] / worst['stage_s']:.2f} % (goal < 2 %)")
        print(f"a fully skipped rerun: {1e3 * total_check:.1f} ms of checks for {len(rows)} stores "
              f"({100 * total_check / total_stage:.3f} % of the {total_stage:.1f} s the stages took)")
        dt = tr["with"] - tr["without"]
        print(f"fine trace ({tr['rows']} rows): open {1e3 * tr['with']:.2f} ms with row digests, "
              f"{1e3 * tr['without']:.2f} ms without: the check costs {1e3 * dt:.2f} ms "
              f"({100 * dt / times['fine']:.3f} % of the fine stage's {times['fine']:.1f} s)")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
