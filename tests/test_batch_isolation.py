"""Isolation in a batch: one pattern's failure (here a user GOF plugin raising an ordinary exception)
fails that run alone, with one console line and its traceback in results/<run>/error.log; the others
finish; a summary table ends the output; exit 1.  A dask worker that dies during a fine stage costs
only the work since the last checkpoint: the stage continues on another worker.  Both against real
`dask scheduler` / `dask worker` processes on localhost, not only a LocalCluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import pytest
import zarr

from flows.pipeline import failure_line, submit_stage
from stages import pipeline as P
from stages.synthetic import write_small_larbed_run

from .conftest import ROOT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

CRASHING_METRIC = '''
from stages.physics.gof import BaseGOF


class Crash(BaseGOF):
    """A user metric with a bug: every evaluation raises an ordinary exception."""

    def __call__(self, sim, exp):
        raise RuntimeError("bug in the user's metric")
'''


def test_failure_line_is_one_line_naming_the_log(tmp_path):
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError as exc:
        line = failure_line("bad", exc, tmp_path / "error.log")
    assert line == f"[bad] failed: RuntimeError: first line (traceback in {tmp_path / 'error.log'})"


def test_summary_table_rows():
    from flows.cli import summary_table

    t = summary_table([("a", "finished", "Chi2_LARBED 1.1"), ("bad-run", "failed", "RuntimeError: x")]).splitlines()
    assert t[0].split() == ["run", "status", "GOF", "/", "error"]
    assert t[2].startswith("bad-run  failed  ")
    assert len({x.find(s) for x, s in zip(t, ["status", "finished", "failed"])}) == 1  # aligned columns


def _dask_cluster(tmp_path, n_workers=2):
    """A scheduler and ``n_workers`` single-threaded worker processes without nannies (a killed worker
    stays dead), as `dask scheduler` / `dask worker` would be started on a facility's machines."""
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(sched_file)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    t0 = time.time()
    while not sched_file.exists() and time.time() - t0 < 60:
        time.sleep(0.2)
    for _ in range(n_workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                       str(sched_file), "--nthreads", "1", "--no-nanny", "--dashboard-address", ":0"],
                                      cwd=ROOT, env={**ENV, "QCBED_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    address = json.loads(sched_file.read_text())["address"]
    from distributed import Client

    client = Client(address, timeout="30s", set_as_default=False)
    client.wait_for_workers(n_workers, timeout=60)
    return address, client, procs


def _shutdown(client, procs):
    client.close()
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _copies(src_cfg: Path, folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for f in src_cfg.parent.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    out = []
    for n in names:
        shutil.copy(src_cfg, folder / f"{n}.toml")
        out.append(folder / f"{n}.toml")
    return out


@pytest.mark.slow
def test_crashing_plugin_fails_its_run_alone(tmp_path):
    """`qcbed run bad.toml a.toml b.toml --dask-address ...` with bad's metric raising RuntimeError: a
    and b finish, bad fails with one console line and its traceback in results/bad/error.log, a
    summary table, exit 1."""
    cfg = write_small_larbed_run(tmp_path / "data", "tiny", seed=2, size=16, roi_half=4, max_iterations=3)
    bad, a, b = _copies(cfg, tmp_path / "cfg", ["bad", "a", "b"])
    (bad.parent / "crash.py").write_text(CRASHING_METRIC)
    text = bad.read_text()
    assert 'gof = "Chi2_LARBED"' in text
    bad.write_text(text.replace('gof = "Chi2_LARBED"', 'gof = "crash.py:Crash"').replace('optimizer = "nelder-mead"\n', ""))
    results = tmp_path / "results"
    address, client, procs = _dask_cluster(tmp_path)
    try:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(bad), str(a), str(b), "--results",
                            str(results), "--dask-address", address], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300, start_new_session=True)
        print(f"batch of 3 with a crashing plugin: exit {r.returncode} in {time.perf_counter() - t0:.1f} s, "
              f"{len((r.stdout + r.stderr).splitlines())} output lines")
    finally:
        _shutdown(client, procs)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out, out
    failed = [m for m in out.splitlines() if m.startswith("[bad] failed:")]
    assert len(failed) == 1 and "RuntimeError: bug in the user's metric" in failed[0], out
    log = results / "bad" / "error.log"
    assert str(log) in failed[0] and "Traceback" in log.read_text() and "crash.py" in log.read_text()
    for name in ("a", "b"):
        assert P.read_key(results / name / "fine.zarr") is not None
        assert (results / name / "report" / "report.md").exists()
        assert not (results / name / "error.log").exists()
    assert not (results / "bad" / "fine.zarr").exists()
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[-6:] if line.split()[:1] in (["a"], ["b"], ["bad"])}
    assert rows == {"bad": "failed", "a": "finished", "b": "finished"}, out
    assert any(line.startswith("a ") and "Chi2_LARBED" in line for line in out.splitlines()[-6:]), out


@pytest.mark.slow
def test_dead_worker_fine_stage_continues_on_another_from_its_checkpoint(tmp_path):
    """SIGKILL of the dask worker running a fine stage after its 2nd checkpoint: the stage reruns on the
    other worker, resumes from fine_trace.zarr (resumed_from_iteration >= 2), and the run finishes."""
    cfg = write_small_larbed_run(tmp_path / "data", "killw", seed=5, max_iterations=60)
    results = tmp_path / "results"
    address, client, procs = _dask_cluster(tmp_path)
    try:
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg), "--results", str(results),
                                "--dask-address", address], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        trace = results / "killw" / P.TRACE
        t0 = time.time()
        n = 0
        while time.time() - t0 < 180 and run.poll() is None:
            try:
                n = int(zarr.open_group(str(trace), mode="r").attrs.get("n_committed", 0))
            except Exception:  # noqa: BLE001  (absent or being written)
                n = 0
            if n >= 2:
                break
            time.sleep(0.2)
        assert run.poll() is None and n >= 2, run.communicate()[0]
        busy = [w for w, keys in client.processing().items() if any("_remote_stage" in str(k) for k in keys)]
        assert len(busy) == 1
        pids = client.run(os.getpid, workers=busy)
        victim = next(p for p in procs[1:] if p.pid == pids[busy[0]])
        os.killpg(victim.pid, signal.SIGKILL)
        killed_after = int(zarr.open_group(str(trace), mode="r").attrs["n_committed"])
        out, _ = run.communicate(timeout=240)
    finally:
        _shutdown(client, procs)
    assert run.returncode == 0, out
    fine = zarr.open_group(str(results / "killw" / "fine.zarr"), mode="r")
    print(f"worker killed after {killed_after} checkpoints; fine resumed from iteration "
          f"{fine.attrs['resumed_from_iteration']} on the other worker")
    assert int(fine.attrs["resumed_from_iteration"]) >= min(killed_after, 2), dict(fine.attrs)
    assert "finished" in out.splitlines()[-2] or "killw  finished" in out, out


def test_submit_stage_resubmits_after_killed_worker(tmp_path):
    """A KilledWorker (the stage's workers died too often) is followed by a new submission."""
    from distributed import Client, KilledWorker, LocalCluster

    calls = tmp_path / "calls"  # the function travels pickled: count its calls in a file

    def flaky(*args):
        with open(calls, "a") as fh:
            fh.write("x")
        if calls.read_text() == "x":
            raise KilledWorker("stage", SimpleNamespace(address="tcp://gone"), 3)
        return "resumed"

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        import flows.pipeline as FP

        orig = FP._remote_stage
        FP._remote_stage = flaky
        try:
            said = []
            assert submit_stage(client, "cfg", str(tmp_path / "run"), "fine", None, say=lambda m, **k: said.append(m)) == "resumed"
        finally:
            FP._remote_stage = orig
    assert calls.read_text() == "xx" and "submitted again (1 of 2)" in said[0]
