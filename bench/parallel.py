"""Many patterns refine in parallel through dask: wall time of a batch, serial against 2 dask workers.

Run:  .venv/bin/python bench/parallel.py                 (2 and 4 patterns: about 9 minutes on 2 cores)
      .venv/bin/python bench/parallel.py --patterns 2    (2 patterns only)
      .venv/bin/python bench/parallel.py --quick         (tiny patterns, a smoke run of about 1 minute)
      .venv/bin/python bench/parallel.py --keep DIR      (keep configs, results and stage logs in DIR)

Case: N small synthetic Si LARBED runs (stages.synthetic.write_small_larbed_run, seeds 1..N, 24 x 24
tilts, a 17 x 17 ROI, U(1-1-1), U(2-2-2), thickness and shift refined), whose fine refinement takes ~60 s on one
core, so the refinement dominates the fixed costs.  Everything is measured in this one process:

1. Prefect's temporary server is started first by an empty flow (its start-up is printed on its
   own, and neither the serial nor the parallel timings below pay it).
2. Serial: each pattern through ``flows.pipeline.refine_pattern`` one after another, each into a
   fresh results folder, in this process.  The serial time of the first 2 patterns is the elapsed
   time after the 2nd pattern of this same sequence.
3. The start + close of a local dask cluster of 2 single-threaded worker processes, on its own.
4. Parallel: ``refine_many(configs, results, n_workers=2)`` for the first 2 and for all 4 patterns,
   fresh results folders every time; it starts and closes its own cluster, and its time includes
   that.

Printed: wall times, the ratio parallel / serial (goal <= 0.6 for 2 patterns; 0.5 is the 2-core
ideal), and per pattern the fine stage's own time (``total_s`` of the ``counters`` attr of
fine.zarr), so the reader can tell the work from the overhead (Prefect flow runs, the stages before
fine, cluster start).  The refined values (fine.zarr ``value``) of every parallel run are compared
with the serial ones: the work is deterministic, so they must be identical.

The stages' progress lines (from this process and from the dask workers) go to log files in the
work folder, not to the terminal; warnings (stderr) stay on the terminal.  The machine has 2 cores
that other jobs may share: the load average is printed before and after each measurement.  One
BLAS thread everywhere.
"""

from __future__ import annotations

import os

# One BLAS thread per process (project rule); must be set before numpy is imported.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.pipeline import refine_many, refine_pattern  # noqa: E402  (first: it configures Prefect's environment)

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from prefect import flow  # noqa: E402

from stages.synthetic import write_small_larbed_run  # noqa: E402

FULL = {"size": 24, "roi_half": 8, "refine_u222": True}  # ~60-90 s fine refinement on one idle core
QUICK = {"size": 12, "roi_half": 3, "refine_u222": False, "max_iterations": 6}
GOAL_2 = 0.6


@flow(name="bench-warmup", persist_result=False)
def _warmup() -> int:
    return 1


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


@contextlib.contextmanager
def stdout_to(path: Path):
    """Send file descriptor 1 (this process and every process started meanwhile) to ``path``."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def fine_of(run_dir: Path) -> tuple[float, np.ndarray]:
    """(fine stage seconds from the counters attr, refined values) of one run folder."""
    ds = xr.open_zarr(run_dir / "fine.zarr", consolidated=False, chunks=None)  # no dask: numpy arrays
    return float(json.loads(ds.attrs["counters"])["total_s"]), ds["value"].values.copy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patterns", type=int, nargs="+", default=[2, 4], help="batch sizes to measure (default 2 4)")
    ap.add_argument("--quick", action="store_true", help="tiny patterns and few iterations (smoke run)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (new or empty) and keep it")
    args = ap.parse_args(argv)
    sizes = sorted(set(args.patterns))
    if sizes[0] < 1:
        ap.error("--patterns must be positive")
    n_max = sizes[-1]
    spec = QUICK if args.quick else FULL

    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            ap.error(f"--keep {args.keep}: not empty (results there would be skipped, not recomputed)")
        args.keep.mkdir(parents=True, exist_ok=True)
        work, tmp = args.keep.resolve(), None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qcbed-bench-parallel-")
        work = Path(tmp.name)
    logs = work / "logs"
    logs.mkdir()
    t_start = time.perf_counter()
    print(f"Parallel refinement benchmark: {os.cpu_count()} cores, {load()}, work folder {work}", flush=True)

    configs = [str(write_small_larbed_run(work / "configs", f"pattern{i}", seed=i, **spec)) for i in range(1, n_max + 1)]
    print(f"{n_max} synthetic LARBED runs ({spec}) in {time.perf_counter() - t_start:.1f} s", flush=True)

    # 1. Prefect's temporary server
    t0 = time.perf_counter()
    with stdout_to(logs / "warmup.log"):
        _warmup()
    print(f"Prefect temporary server start + first flow: {time.perf_counter() - t0:.1f} s", flush=True)

    # 2. serial
    print(f"\nserial, {n_max} patterns ({load()}) ...", flush=True)
    serial_elapsed, serial_fine, serial_values = [], [], []
    t0 = time.perf_counter()
    with stdout_to(logs / "serial.log"):
        for i, c in enumerate(configs):
            status = refine_pattern(c, str(work / f"serial-{i + 1}"))
            serial_elapsed.append(time.perf_counter() - t0)
            if any(v != "done" for v in status.values()):
                raise SystemExit(f"serial {c}: a stage was not computed afresh: {status}")
    for i in range(n_max):
        s, v = fine_of(work / f"serial-{i + 1}" / f"pattern{i + 1}")
        serial_fine.append(s)
        serial_values.append(v)
    print(f"  done ({load()}): {serial_elapsed[-1]:.1f} s", flush=True)

    # 3. dask cluster start/close on its own
    from flows.pipeline import dask_client

    t0 = time.perf_counter()
    with stdout_to(logs / "cluster.log"):
        client = dask_client(None, 2)
        t_up = time.perf_counter() - t0
        cluster = client.cluster
        client.close()
        cluster.close()
    t_cluster = time.perf_counter() - t0
    print(f"dask LocalCluster (2 workers x 1 thread): start {t_up:.1f} s, start + close {t_cluster:.1f} s", flush=True)

    # 4. parallel
    par = {}
    for n in sizes:
        print(f"\nparallel, {n} patterns on 2 dask workers ({load()}) ...", flush=True)
        res = work / f"parallel-{n}"
        t0 = time.perf_counter()
        with stdout_to(logs / f"parallel-{n}.log"):
            out = refine_many(configs[:n], str(res), n_workers=2)
        wall = time.perf_counter() - t0
        bad = {c: s for c, s in out.items() if "error" in s or any(v != "done" for v in s.values())}
        if bad:
            raise SystemExit(f"parallel {n}: failed or skipped stages: {bad}")
        fines, same = [], []
        for i in range(n):
            s, v = fine_of(res / f"pattern{i + 1}")
            fines.append(s)
            same.append(bool(np.array_equal(v, serial_values[i])))
        par[n] = (wall, fines, same)
        print(f"  done ({load()}): {wall:.1f} s", flush=True)

    # report
    print("\nPer pattern: fine stage time (fine.zarr counters total_s) in s")
    head = f"{'pattern':<10} {'serial':>7}" + "".join(f" {f'par-{n}':>7}" for n in sizes)
    print(head)
    for i in range(n_max):
        row = f"pattern{i + 1:<3} {serial_fine[i]:>7.1f}"
        for n in sizes:
            row += f" {par[n][1][i]:>7.1f}" if i < n else f" {'':>7}"
        print(row)

    print("\nBatch wall times (s); fixed costs = wall - fine work (serial: sum; parallel: ideal sum / 2)")
    print(f"{'patterns':>8} {'serial':>8} {'fine sum':>8} {'parallel':>8} {'fine sum':>8} {'overhead':>8} "
          f"{'par/ser':>8}  identical values")
    for n in sizes:
        wall, fines, same = par[n]
        ser = serial_elapsed[n - 1]
        ratio = wall / ser
        goal = f"  (goal <= {GOAL_2})" if n == 2 else "  (ideal 0.5)"
        print(f"{n:>8} {ser:>8.1f} {sum(serial_fine[:n]):>8.1f} {wall:>8.1f} {sum(fines):>8.1f} "
              f"{wall - sum(fines) / 2:>8.1f} {ratio:>8.2f}  {'yes' if all(same) else 'NO ' + str(same)}{goal}")
    print(f"serial fixed cost per pattern (flow run + stages before fine): "
          f"{(serial_elapsed[-1] - sum(serial_fine)) / n_max:.1f} s")
    print(f"\n{load()}; total run time {time.perf_counter() - t_start:.0f} s; stage logs in {logs}"
          + ("" if tmp is None else " (removed)"))
    if tmp is not None:
        tmp.cleanup()
    if not all(all(p[2]) for p in par.values()):
        raise SystemExit("parallel and serial refined values differ")


if __name__ == "__main__":
    main()
