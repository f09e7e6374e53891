"""SIGINT / SIGTERM: `qcbed run` stops within seconds (also inside an eigen-solve), keeps the fine
checkpoints, marks nothing half-done as done, exits 130 with one line on how to continue, leaves no
Prefect server or dask worker behind; the same command then resumes to an uninterrupted run's numbers."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from stages import config as C
from stages import interrupt
from stages import pipeline as P
from stages.synthetic import write_small_larbed_run

from .conftest import ROOT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def _no_stop_left():
    interrupt.reset()
    yield
    interrupt.reset()


def test_stop_abandons_an_eigen_solve_between_tiles(si):
    """A stop request makes the tile loop raise Interrupted before the next tile (threads or not)."""
    from stages.simulate import ForwardModel

    model = ForwardModel(si, 200.0, (1, 1, 0), tile_invA=0.05)
    kt = np.stack(np.meshgrid(np.linspace(-0.3, 0.3, 6), np.linspace(-0.3, 0.3, 6)), -1).reshape(-1, 2)
    kt = np.column_stack([kt, np.zeros(len(kt))])
    out = [(0, 0, 0), (1, -1, 1)]
    interrupt.request_stop("test")
    for threads in (1, 2):
        with pytest.raises(interrupt.Interrupted, match="stopped by test"):
            model.solve_tiled(kt, out, threads=threads)
    interrupt.reset()
    assert model.solve_tiled(kt, out, threads=2).n_tilts == len(kt)


@pytest.mark.slow
def test_interrupted_fine_stage_keeps_checkpoints_and_resumes_exactly(tmp_path):
    """A stop after the 2nd checkpoint: Interrupted, fine not 'done' (no fine.zarr), the trace kept; the
    next run resumes after iteration 2 and ends with the uninterrupted run's bits."""
    cfg = write_small_larbed_run(tmp_path / "data", "tiny", seed=2, size=16, roi_half=4, max_iterations=3)
    full = P.make_plan(C.load_config(cfg), tmp_path / "full")
    P.run_all(full, say=lambda m: None)
    part = P.make_plan(C.load_config(cfg), tmp_path / "part")
    P.run_all(part, say=lambda m: None, until="variance")

    def say(msg):
        if "iteration    2" in msg:
            interrupt.request_stop("SIGINT")

    with pytest.raises(interrupt.Interrupted):
        P.run_stage(part, "fine", say=say)
    assert P.store_state(part, "fine") == "pending" and not part.store("fine").exists()
    assert P.TraceStore(part.run_dir / P.TRACE).open(part.trace_key)["iteration"].tolist() == [1, 2]
    with pytest.raises(interrupt.Interrupted):  # every later stage refuses to start while stopping
        P.run_stage(part, "report", say=say)
    interrupt.reset()
    lines = []
    assert P.run_stage(part, "fine", say=lines.append) == "resumed"
    assert any("resuming after iteration 2" in m for m in lines)
    a = xr.open_zarr(full.store("fine"), consolidated=False)
    b = xr.open_zarr(part.store("fine"), consolidated=False)
    np.testing.assert_array_equal(a.value.values, b.value.values)


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_checkpoints(proc, traces, n=2, limit=240):
    """Until every trace store has ``n`` committed rows (the fine stages are under way)."""
    t0 = time.time()
    while time.time() - t0 < limit:
        got = []
        for tr in traces:
            try:
                got.append(int(zarr.open_group(str(tr), mode="r").attrs.get("n_committed", 0)))
            except Exception:  # noqa: BLE001  (absent or being written)
                got.append(0)
        if min(got) >= n or proc.poll() is not None:
            return got
        time.sleep(0.2)
    return got


def _group_alive(pgid) -> list[str]:
    """The live processes of a process group (zombies left out: a container's pid 1 may never reap an
    orphan that has already exited)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{stat.parent.name} {text[text.index('(') + 1:text.rindex(')')]}")
    return alive


def _stop(proc, sig, group):
    t = time.perf_counter()
    (os.killpg(proc.pid, sig) if group else proc.send_signal(sig))
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"no exit 30 s after {sig!r}:\n{out}")
    return proc.returncode, time.perf_counter() - t, out


@pytest.fixture(scope="module")
def killme(tmp_path_factory):
    """The kill -9 test's run (13 Nelder-Mead iterations, ~1.5 s each) and its uninterrupted fine store."""
    d = tmp_path_factory.mktemp("killme")
    cfg = write_small_larbed_run(d / "data", "killme", seed=5, max_iterations=60)
    ref = P.make_plan(C.load_config(cfg), d / "uninterrupted")
    P.run_all(ref, say=lambda m: None, until="fine")
    return cfg, ref.store("fine")


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["SIGINT-ctrl-c", "SIGTERM"])
def test_signal_stops_run_then_same_command_resumes(killme, tmp_path, sig, group):
    """SIGINT to the whole process group (what Ctrl-C in a terminal does) or SIGTERM to the process:
    exit 130 within 15 s, one line naming the checkpoint and the command, fine not done, nothing of the
    group left (Prefect's temporary server stopped); the same command resumes to the same numbers."""
    cfg, ref_store = killme
    results = tmp_path / "results"
    run = results / "killme"
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg), "--results", str(results)]
    proc = _start(cmd)
    got = _wait_checkpoints(proc, [run / P.TRACE], n=2)
    assert proc.poll() is None, (got, proc.communicate()[0])
    rc, dt, out = _stop(proc, sig, group)
    print(f"{sig.name}: exit {rc} {dt:.1f} s after the signal")
    assert rc == 130 and dt < 15, (rc, dt, out)
    line = [m for m in out.splitlines() if m.startswith("qcbed: stopped by")]
    assert len(line) == 1 and sig.name in line[0] and "fine checkpoint at iteration" in line[0], out
    assert f"qcbed run {cfg} --results {results}" in line[0]
    assert "Traceback" not in out and "Interrupted" not in out, out
    time.sleep(0.5)
    assert not _group_alive(proc.pid), _group_alive(proc.pid)
    plan = P.make_plan(C.load_config(cfg), results)
    assert P.store_state(plan, "fine") != "done" and not (run / "fine.zarr").exists()
    tr = zarr.open_group(str(run / P.TRACE), mode="r")
    n = int(tr.attrs["n_committed"])
    last = int(tr["iteration"][n - 1])
    assert n >= 2

    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming after iteration {last}" in again.stdout
    a = xr.open_zarr(ref_store, consolidated=False)
    b = xr.open_zarr(run / "fine.zarr", consolidated=False)
    np.testing.assert_array_equal(a.value.values, b.value.values)
    np.testing.assert_array_equal(a.iteration.values, b.iteration.values)


@pytest.mark.slow
def test_second_signal_exits_at_once(killme, tmp_path):
    """A second Ctrl-C exits at once (130), still taking Prefect's temporary server with it."""
    cfg, _ = killme
    results = tmp_path / "results"
    proc = _start([sys.executable, "-m", "flows.cli", "run", str(cfg), "--results", str(results)])
    _wait_checkpoints(proc, [results / "killme" / P.TRACE], n=1)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)  # two signals in a row would be merged into one by the kernel
    rc, dt, out = _stop(proc, signal.SIGINT, True)
    assert rc == 130 and dt < 5, (rc, dt, out)
    assert "second SIGINT, exiting now" in out
    time.sleep(0.5)
    assert not _group_alive(proc.pid)
    assert P.store_state(P.make_plan(C.load_config(cfg), results), "fine") != "done"


@pytest.mark.slow
def test_ctrl_c_stops_a_batch_and_its_dask_cluster(killme, tmp_path):
    """`qcbed run a.toml b.toml --workers 2` and Ctrl-C while both fine stages run on the local dask
    cluster: exit 130 within 15 s, the cluster closed (nothing of the group left), neither fine done,
    their checkpoints kept."""
    cfg, _ = killme
    folder = tmp_path / "cfg"
    folder.mkdir()
    for f in cfg.parent.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    a = folder / "killme.toml"
    b = folder / "other.toml"
    shutil.copy(a, b)
    results = tmp_path / "results"
    proc = _start([sys.executable, "-m", "flows.cli", "run", str(a), str(b), "--results", str(results),
                   "--workers", "2"])
    got = _wait_checkpoints(proc, [results / "killme" / P.TRACE, results / "other" / P.TRACE], n=1)
    assert proc.poll() is None, (got, proc.communicate()[0])
    rc, dt, out = _stop(proc, signal.SIGINT, True)
    print(f"batch SIGINT: exit {rc} {dt:.1f} s after the signal")
    assert rc == 130 and dt < 15, (rc, dt, out)
    assert "qcbed: stopped by SIGINT" in out and "Traceback" not in out, out
    time.sleep(1.0)
    assert not _group_alive(proc.pid), _group_alive(proc.pid)
    for name, c in (("killme", a), ("other", b)):
        assert P.store_state(P.make_plan(C.load_config(c), results), "fine") != "done"
        assert int(zarr.open_group(str(results / name / P.TRACE), mode="r").attrs["n_committed"]) >= 1


@pytest.mark.slow
def test_sigterm_stops_serve_once_batch(killme, tmp_path):
    """`qcbed serve --once` over a folder of two configs (a facility batch on the local dask cluster), SIGTERM to
    the process alone (what a scheduler or systemd sends): exit 130 within 15 s with the line saying how to
    continue, nothing of the group left, neither fine done, their checkpoints kept."""
    cfg, _ = killme
    folder = tmp_path / "watch"
    folder.mkdir()
    for f in cfg.parent.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    shutil.copy(folder / "killme.toml", folder / "other.toml")
    results = tmp_path / "results"
    proc = _start([sys.executable, "-m", "flows.cli", "serve", "--watch", str(folder), "--once",
                   "--results", str(results), "--workers", "2"])
    got = _wait_checkpoints(proc, [results / "killme" / P.TRACE, results / "other" / P.TRACE], n=1)
    assert proc.poll() is None, (got, proc.communicate()[0])
    rc, dt, out = _stop(proc, signal.SIGTERM, False)
    print(f"serve --once SIGTERM: exit {rc} {dt:.1f} s after the signal")
    assert rc == 130 and dt < 15, (rc, dt, out)
    line = [m for m in out.splitlines() if m.startswith("qcbed: stopped by SIGTERM")]
    assert len(line) == 1 and "killme: fine not finished" in line[0] and "serve --watch" in line[0], out
    assert "Traceback" not in out, out
    time.sleep(1.0)
    assert not _group_alive(proc.pid), _group_alive(proc.pid)
    for name in ("killme", "other"):
        assert P.store_state(P.make_plan(C.load_config(folder / f"{name}.toml"), results), "fine") != "done"
        assert int(zarr.open_group(str(results / name / P.TRACE), mode="r").attrs["n_committed"]) >= 1
