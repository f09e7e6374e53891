"""The pipeline: stage keys and skipping, downstream-only recomputation, checkpoints and resume after
kill -9, the run lock, corrupted stores, bad configs, the scheduled folder flow, status and rerun."""

import json
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

from flows.cli import main
from stages import config as C
from stages import pipeline as P
from stages.errors import QcbedInputError
from stages.physics.gof import make_gof
from stages.synthetic import write_small_larbed_run

from .conftest import ROOT


def _plan(cfg_path, results):
    return P.make_plan(C.load_config(cfg_path), results)


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny synthetic LARBED run with 3 outer iterations (a few seconds)."""
    d = tmp_path_factory.mktemp("small")
    return write_small_larbed_run(d, "tiny", seed=2, size=16, roi_half=4, max_iterations=3)


def _copy_run_config(src: Path, dst_dir: Path, name: str, replace=None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.glob(f"{src.stem}*.npy"):
        shutil.copy(f, dst_dir / f.name)
    text = src.read_text()
    for a, b in (replace or {}).items():
        assert a in text
        text = text.replace(a, b)
    out = dst_dir / f"{name}.toml"
    out.write_text(text.replace(f'file = "{src.stem}.npy"', f'file = "{src.stem}.npy"'))
    return out


def _mtimes(run_dir: Path) -> dict:
    return {s: (run_dir / P.STORES[s] / ("zarr.json" if s != "report" else "record.json")).stat().st_mtime_ns
            for s in P.STAGES if (run_dir / P.STORES[s]).exists()}


def test_keys_skip_and_downstream_only(small, tmp_path):
    plan = _plan(small, tmp_path)
    assert plan.stages == ["load", "roi", "iam", "variance", "fine", "report"]
    first = P.run_all(plan, say=_quiet)
    assert set(first.values()) == {"done"}
    for s in plan.stages:
        assert P.read_key(plan.store(s)) == plan.keys[s]
    again = P.run_all(_plan(small, tmp_path), say=_quiet)
    assert set(again.values()) == {"skipped"}

    # the same config with a different ROI: only roi and what depends on it (fine, report) recompute
    moved = _copy_run_config(small, tmp_path / "cfg", small.stem, {"[-4.0, -4.0], [4.0, -4.0], [-4.0, 4.0]], samples = [9, 9]":
                                                                   "[-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0]], samples = [7, 7]"})
    plan2 = _plan(moved, tmp_path)
    assert plan2.run_dir == plan.run_dir
    changed = {s for s in plan.stages if plan.keys[s] != plan2.keys[s]}
    assert changed == {"roi", "fine", "report"}
    before = _mtimes(plan.run_dir)
    out = P.run_all(plan2, say=_quiet)
    assert out == {"load": "skipped", "roi": "done", "iam": "skipped", "variance": "skipped", "fine": "done",
                   "report": "done"}
    after = _mtimes(plan.run_dir)
    assert {s for s in before if before[s] != after[s]} == {"roi", "fine", "report"}

    # a changed data file changes the load key and everything downstream of the pattern, not the IAM
    arr = np.load(moved.parent / "tiny.npy")
    arr[0, 0, 0] += 1.0
    np.save(moved.parent / "tiny.npy", arr)
    plan3 = _plan(moved, tmp_path)
    assert {s for s in plan.stages if plan3.keys[s] != plan2.keys[s]} == {"load", "roi", "variance", "fine", "report"}


def test_checkpoint_resume_is_exact(small, tmp_path):
    """A run stopped after its 2nd iteration continues from the trace to the same final bits."""
    full = P.make_plan(C.load_config(small), tmp_path / "full")
    P.run_all(full, say=_quiet)
    part = P.make_plan(C.load_config(small), tmp_path / "part")
    P.run_all(part, say=_quiet, until="variance")

    class Stop(Exception):
        pass

    lines = []

    def say(msg):
        lines.append(msg)
        if "iteration    2" in msg:
            raise Stop

    with pytest.raises(Stop):
        P.run_stage(part, "fine", say=say)
    assert not part.store("fine").exists()
    tr = P.TraceStore(part.run_dir / P.TRACE).open(part.trace_key)
    assert tr["iteration"].tolist() == [1, 2]
    first_session = {"eigen_solves": int(tr["eigen_solves"][-1]), "wall_s": float(tr["wall_s"][-1])}
    lines.clear()
    assert P.run_stage(part, "fine", say=lines.append) == "resumed"
    # the counters add up across the two sessions: the trace is cumulative, fine.zarr sums them
    tr = P.TraceStore(part.run_dir / P.TRACE).open(part.trace_key)
    assert np.all(np.diff(tr["eigen_solves"]) >= 0) and np.all(np.diff(tr["wall_s"]) > 0)
    cb = json.loads(xr.open_zarr(part.store("fine"), consolidated=False).attrs["counters"])
    ca = json.loads(xr.open_zarr(full.store("fine"), consolidated=False).attrs["counters"])
    assert cb["earlier_sessions"] == first_session and first_session["eigen_solves"] > 0
    assert cb["eigen_solves"] == first_session["eigen_solves"] + cb["eigen_solves_this_session"] >= ca["eigen_solves"]
    assert cb["total_s"] == pytest.approx(first_session["wall_s"] + cb["total_s_this_session"])
    assert ca["earlier_sessions"] == {"eigen_solves": 0, "wall_s": 0.0} and ca["eigen_solves"] == ca["eigen_solves_this_session"]
    assert any("resuming after iteration 2" in m for m in lines)
    assert any("iteration    3" in m for m in lines)
    a = xr.open_zarr(full.store("fine"), consolidated=False)
    b = xr.open_zarr(part.store("fine"), consolidated=False)
    np.testing.assert_array_equal(a.value.values, b.value.values)
    np.testing.assert_array_equal(a.trace_gof.values, b.trace_gof.values)
    # the ZNCC at the start: from the first evaluation, or (resumed) from one evaluation of the start
    np.testing.assert_array_equal(a.zncc_start.values, b.zncc_start.values)
    np.testing.assert_array_equal(a.zncc.values, b.zncc.values)
    assert b.attrs["resumed_from_iteration"] == 2


def test_more_iterations_continue_from_the_checkpoints(small, tmp_path):
    """A finished run given a larger refine.max_iterations recomputes the fine stage from its last
    checkpoint (the trace key leaves the budget out) and reaches what a run with that budget from the
    start reaches."""
    text = small.read_text()
    assert "max_iterations = 3" in text
    one = tmp_path / "one.toml"
    one.write_text(text.replace("max_iterations = 3", "max_iterations = 2"))
    for f in small.parent.iterdir():
        if f.name != small.name and f.is_file() and not (tmp_path / f.name).exists():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    run = tmp_path / "res" / "run"
    short = P.make_plan(C.load_config(one), tmp_path / "res", run_dir=run)
    P.run_all(short, say=_quiet)
    longer_cfg = tmp_path / "two.toml"
    longer_cfg.write_text(text)
    longer = P.make_plan(C.load_config(longer_cfg), tmp_path / "res", run_dir=run)
    assert longer.trace_key == short.trace_key and longer.keys["fine"] != short.keys["fine"]
    lines = []
    P.run_all(longer, say=lines.append)
    assert any("resuming after iteration 2" in m for m in lines)
    full = P.make_plan(C.load_config(small), tmp_path / "full")
    P.run_all(full, say=_quiet)
    a = xr.open_zarr(full.store("fine"), consolidated=False)
    b = xr.open_zarr(longer.store("fine"), consolidated=False)
    np.testing.assert_array_equal(a.value.values, b.value.values)
    np.testing.assert_array_equal(a.trace_gof.values, b.trace_gof.values)

    # a Gauss-Newton polish added afterwards also continues from the checkpoints (same trace key), and
    # its steps only lower the figure of merit
    gn_cfg = tmp_path / "gn.toml"
    gn_cfg.write_text(text.replace("max_iterations = 3", "max_iterations = 3\ngauss_newton_steps = 3"))
    gn = P.make_plan(C.load_config(gn_cfg), tmp_path / "res", run_dir=run)
    assert gn.trace_key == short.trace_key and gn.keys["fine"] != longer.keys["fine"]
    lines = []
    P.run_all(gn, say=lines.append)
    assert any("resuming after iteration 3" in m for m in lines)
    assert any("Gauss-Newton step 1" in m for m in lines), lines
    c = xr.open_zarr(gn.store("fine"), consolidated=False)
    counters = json.loads(c.attrs["counters"])
    assert counters["gauss_newton_steps"] >= 1 and c.attrs["gof"] <= b.attrs["gof"]
    assert counters["gof_before_gauss_newton"] == pytest.approx(b.attrs["gof"], rel=1e-12)


def test_torn_trace_rows_are_dropped(tmp_path):
    t = P.TraceStore(tmp_path / "fine_trace.zarr")
    t.create("k", ["a", "b"], 3, 2, {"gof_start": 1.0})
    for i in range(3):
        t.append({"iteration": i + 1, "gof": 1.0 / (i + 1), "wall_s": 0.1, "eigen_solves": i, "best": [i, i],
                  "simplex": np.full((3, 2), i), "fsim": np.full(3, i)})
    g = zarr.open_group(str(tmp_path / "fine_trace.zarr"), mode="r+")
    g["gof"].append(np.array([9.0]))  # a kill between two arrays of the 4th row
    g["iteration"].append(np.array([4]))
    got = t.open("k")
    assert got["iteration"].tolist() == [1, 2, 3] and got["gof"].shape == (3,) and got["simplex"].shape == (3, 3, 2)
    t.append({"iteration": 4, "gof": 0.2, "wall_s": 0.1, "eigen_solves": 4, "best": [4, 4],
              "simplex": np.full((3, 2), 4), "fsim": np.full(3, 4)})
    assert t.open("k")["gof"].tolist() == [1.0, 0.5, 1.0 / 3, 0.2]
    assert t.open("other key") is None and not (tmp_path / "fine_trace.zarr").exists()


def test_corrupted_store_is_set_aside_and_recomputed(small, tmp_path):
    plan = _plan(small, tmp_path)
    P.run_all(plan, say=_quiet, until="variance")
    (plan.store("roi") / "zarr.json").write_text("{ not json")
    lines = []
    out = P.run_all(_plan(small, tmp_path), say=lines.append, until="variance")
    assert out == {"load": "skipped", "roi": "done", "iam": "skipped", "variance": "skipped"}
    msg = [m for m in lines if "was unreadable" in m]
    assert len(msg) == 1 and "roi.zarr" in msg[0]
    kept = list(plan.run_dir.glob(".roi.zarr.corrupt-*"))
    assert len(kept) == 1  # set aside, never deleted
    assert P.read_key(plan.store("roi")) == plan.keys["roi"]


def test_lock_refuses_a_second_run(small, tmp_path, capsys):
    plan = _plan(small, tmp_path)
    P.run_all(plan, say=_quiet, until="load")
    before = _mtimes(plan.run_dir)
    with P.RunLock(plan.run_dir):
        assert P.is_locked(plan.run_dir)
        rc = main(["prepare", str(small), "--results", str(tmp_path)])
        err = capsys.readouterr().err
    assert rc == 2
    assert "is in use by a running qcbed" in err and str(os.getpid()) in err and err.count("\n") == 1
    assert _mtimes(plan.run_dir) == before
    assert P.is_locked(plan.run_dir) is None


def test_bad_config_and_missing_file_leave_results_alone(small, tmp_path, capsys):
    plan = _plan(small, tmp_path)
    P.run_all(plan, say=_quiet, until="roi")
    before = _mtimes(plan.run_dir)
    bad = _copy_run_config(small, tmp_path / "bad", small.stem, {"gl_px = 40.0": "gl_px = -40.0"})
    assert main(["run", str(bad), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "geometry.gl_px" in err
    missing = _copy_run_config(small, tmp_path / "missing", small.stem, {'file = "tiny.npy"': 'file = "nope.npy"'})
    assert main(["run", str(missing), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pattern.file" in err and "nope.npy" in err
    assert _mtimes(plan.run_dir) == before


def test_status_lists_stages_and_checkpoint(small, tmp_path, capsys):
    plan = _plan(small, tmp_path)
    P.run_all(plan, say=_quiet)
    P.write_run_record(plan)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{plan.run_dir.name}: finished" in out
    assert "fine done" in out and "last checkpoint: iteration 3" in out and "Chi2_LARBED" in out


def test_deployment_schedule():
    from flows.pipeline import facility_batch

    dep = facility_batch.to_deployment(name="facility", cron="0 2 * * *", parameters={"config_dir": "x"})
    assert dep.schedules[0].schedule.cron == "0 2 * * *"
    assert dep.parameters["config_dir"] == "x"


def test_run_status_rerun_through_prefect(small, tmp_path, capsys):
    """`qcbed run` (Prefect, one pattern in this process), then `qcbed rerun` reproduces it bit for bit."""
    assert main(["run", str(small), "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / small.stem
    for s in ("pattern.zarr", "roi.zarr", "structure_factors.zarr", "variance.zarr", "fine.zarr", "report/report.md",
              "run.json"):
        assert (run / s).exists(), s
    rec = json.loads((run / "run.json").read_text())
    assert rec["versions"]["prefect"].startswith("3.8") and rec["config_text"] == small.read_text()
    assert "U(1 -1 -1)" in out
    assert main(["run", str(small), "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 6
    assert main(["rerun", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reproduced bit for bit" in out
    assert not list(tmp_path.glob(".rerun-*"))
    assert len(list(run.glob("rerun-*.json"))) == 1


@pytest.mark.slow
def test_facility_batch_refines_new_and_skips_finished(small, tmp_path):
    """The scheduled flow's work, called once over a folder: one config finished before, one new."""
    from flows.pipeline import facility_batch

    folder = tmp_path / "configs"
    done = _copy_run_config(small, folder, "done")
    new = _copy_run_config(small, folder, "new", {"seed 2": "seed 2 (copy)"})
    P.run_all(_plan(done, tmp_path / "results"), say=_quiet)
    out = facility_batch(str(folder), str(tmp_path / "results"), n_workers=2)
    assert out["skipped"] == [str(done)] and out["refined"] == [str(new)]
    assert set(out["results"][str(new)].values()) == {"done"}
    assert P.read_key(tmp_path / "results" / "new" / "fine.zarr") is not None
    out = facility_batch(str(folder), str(tmp_path / "results"), n_workers=2)
    assert out["refined"] == [] and sorted(out["skipped"]) == sorted([str(done), str(new)])


@pytest.mark.slow
def test_kill_during_fine_then_resume(tmp_path):
    """kill -9 of `qcbed run` during the fine refinement: the rerun skips the finished stages, the fine
    stage continues from its last checkpoint (iteration numbers continue), and the result equals an
    uninterrupted run's."""
    cfg = write_small_larbed_run(tmp_path / "data", "killme", seed=5, max_iterations=60)
    results = tmp_path / "results"
    run = results / "killme"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg), "--results", str(results)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    trace = run / P.TRACE
    t0 = time.time()
    n = 0
    while time.time() - t0 < 300:
        if trace.exists():
            try:
                n = int(zarr.open_group(str(trace), mode="r").attrs.get("n_committed", 0))
            except Exception:  # noqa: BLE001  (being written)
                n = 0
            if n >= 3:
                break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: Prefect's temporary server too
    proc.wait()
    first = proc.stdout.read()
    assert "fine: iteration" in first and not (run / "fine.zarr").exists()
    killed_at = int(zarr.open_group(str(trace), mode="r").attrs["n_committed"])
    last_it = int(zarr.open_group(str(trace), mode="r")["iteration"][killed_at - 1])

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout
    for s in ("load", "roi", "iam", "variance"):
        assert f"[killme] {s}: up to date, skipped" in out
    assert f"resuming after iteration {last_it}" in out
    its = [int(line.split("iteration")[1].split()[0]) for line in out.splitlines() if "fine: iteration" in line]
    assert its and its[0] == last_it + 1

    ref = P.make_plan(C.load_config(cfg), tmp_path / "uninterrupted")
    P.run_all(ref, say=_quiet)
    a = xr.open_zarr(ref.store("fine"), consolidated=False)
    b = xr.open_zarr(run / "fine.zarr", consolidated=False)
    np.testing.assert_array_equal(a.value.values, b.value.values)
    np.testing.assert_array_equal(a.iteration.values, b.iteration.values)


def test_coarse_stage_feeds_fine(small, tmp_path):
    """With a [coarse] section, coarse.zarr (thickness by correlation) is the fine stage's start; its key
    enters the fine key, and a coarse-only change does not touch load, roi, iam or variance."""
    cfg = _copy_run_config(small, tmp_path / "cfg", "co")
    cfg.write_text(cfg.read_text() + "\n[coarse]\nthickness_bracket_A = [700.0, 1100.0]\nbox_px = 3.0\nsearch_px = 1.0\n")
    plan = _plan(cfg, tmp_path)
    assert "coarse" in plan.stages
    P.run_all(plan, say=_quiet)
    co = xr.open_zarr(plan.store("coarse"), consolidated=False)
    t = co.attrs["thickness_A"]
    assert abs(t / 900.0 - 1) < 0.02 and co.attrs["ncc"] > 0.9  # truth 900 Å; config starts at 918 Å
    assert co.attrs["thickness_start_A"] == C.thickness_of(plan.cfg) and co.attrs["thickness_bracket_A"] == [700.0, 1100.0]
    # the counters are the whole stage's: every sub-step's solves and time, the beam probe's included
    cc, steps = json.loads(co.attrs["counters"]), json.loads(co.attrs["steps"])
    probe = json.loads(co.attrs["beam_probe"])
    assert list(cc["by_step"]) == list(steps) == ["beam_probe", "orientation_thickness"]
    assert cc["by_step"]["beam_probe"]["eigen_solves"] == probe["eigen_solves"] > 0
    assert cc["eigen_solves"] == sum(v["eigen_solves"] for v in cc["by_step"].values()) == probe["eigen_solves"] + 1
    assert cc["tilts_solved"] == probe["tilts_solved"] + steps["orientation_thickness"]["counters"]["tilts_solved"]
    assert cc["wall_s"] == pytest.approx(sum(v["wall_s"] for v in cc["by_step"].values()))
    assert cc["stage_wall_s"] >= cc["wall_s"] >= probe["wall_s"] > 0
    res = json.loads((plan.run_dir / "report" / "results.json").read_text())
    assert res["coarse"]["eigen_solves"] == cc["eigen_solves"] and res["coarse"]["wall_s"] == cc["stage_wall_s"]
    fine = xr.open_zarr(plan.store("fine"), consolidated=False)
    g0 = float(fine.start.sel(param="thickness"))
    assert g0 == pytest.approx(t)
    # the report says where the fine stage's start came from: config thickness -> coarse
    md = (plan.run_dir / "report" / "report.md").read_text()
    assert "thickness at the start (config), bracket searched" in md and "from the coarse stage (thickness" in md
    assert "coarse eigen-solves (every sub-step): beam probe" in md
    cfg.write_text(cfg.read_text().replace("search_px = 1.0", "search_px = 2.0"))
    plan2 = _plan(cfg, tmp_path)
    assert {s for s in plan.stages if plan.keys[s] != plan2.keys[s]} == {"coarse", "fine", "report"}


def test_beam_probe_sizes_the_run_and_is_recorded(small, tmp_path):
    """Without simulation.sg_strong the coarse stage's probe chooses it; the fine stage uses the same
    selection (from coarse.zarr), both stores and the report record it, and the target is met.  With
    laue_zones = "auto" the probe measures the ZOLZ model against the HOLZ model and records its choice."""
    cfg = _copy_run_config(small, tmp_path / "cfg", "probe", {"sg_strong = 0.02\n": "beam_accuracy = 0.01\n",
                                                               'laue_zones = "zolz"': 'laue_zones = "auto"'})
    cfg.write_text(cfg.read_text() + "\n[coarse]\nthickness_bracket_A = [700.0, 1100.0]\nbox_px = 3.0\nsearch_px = 1.0\n")
    plan = _plan(cfg, tmp_path)
    P.run_all(plan, say=_quiet)
    co = json.loads(xr.open_zarr(plan.store("coarse"), consolidated=False).attrs["beam_probe"])
    fine = xr.open_zarr(plan.store("fine"), consolidated=False)
    fp, beams = json.loads(fine.attrs["beam_probe"]), json.loads(fine.attrs["beams"])
    assert co == fp and fp["met"] and fp["error"] <= 0.01 and fp["accuracy"] == 0.01
    assert beams["selection"]["sg_strong"] == fp["sg_strong"] and beams["n_strong_max"] >= beams["n_strong_min"] > 1
    assert fp["laue_zones_config"] == "auto" and fp["laue_zones"] in ("zolz", "holz")
    assert (fp["holz_difference"] > fp["accuracy"]) == (fp["laue_zones"] == "holz")
    assert beams["selection"]["holz"] == (fp["laue_zones"] == "holz")
    assert "Laue zones modelled" in (plan.run_dir / "report" / "report.html").read_text()
    res = json.loads((plan.run_dir / "report" / "results.json").read_text())
    assert res["beam_probe"]["sg_strong"] == fp["sg_strong"] and res["beams"]["tiles"] == beams["tiles"]
    c = json.loads(fine.attrs["counters"])
    assert c["tilts_solved"] == c["tilts_hermitian"] + c["tilts_general"] > 0


def test_levenberg_marquardt_run_resumes_exactly(small, tmp_path):
    """refine.optimizer = "levenberg-marquardt" through the pipeline: a checkpoint row per step; a run
    stopped after its first step continues to the same bits as an uninterrupted one, and the counters
    show one eigen-solve per step after the two of the start."""
    text = Path(small).read_text()
    assert "max_iterations = 3" in text
    cfg_lm = tmp_path / "lm" / Path(small).name
    cfg_lm.parent.mkdir()
    for f in Path(small).parent.iterdir():
        if f.is_file() and f.name != Path(small).name:
            shutil.copy(f, cfg_lm.parent / f.name)
    cfg_lm.write_text(text.replace("max_iterations = 3", "max_iterations = 20").replace('optimizer = "nelder-mead"', 'optimizer = "levenberg-marquardt"'))
    full = P.make_plan(C.load_config(cfg_lm), tmp_path / "full")
    P.run_all(full, say=_quiet)
    part = P.make_plan(C.load_config(cfg_lm), tmp_path / "part")
    P.run_all(part, say=_quiet, until="variance")

    class Stop(Exception):
        pass

    def say(msg):
        if "step   1" in msg:
            raise Stop

    with pytest.raises(Stop):
        P.run_stage(part, "fine", say=say)
    tr = P.TraceStore(part.run_dir / P.TRACE).open(part.trace_key)
    assert tr["iteration"].tolist() == [1] and tr["attrs"]["optimizer"] == "levenberg-marquardt"
    lines = []
    assert P.run_stage(part, "fine", say=lines.append) == "resumed"
    assert any("resuming after Levenberg-Marquardt step 1" in m for m in lines)
    a = xr.open_zarr(full.store("fine"), consolidated=False)
    b = xr.open_zarr(part.store("fine"), consolidated=False)
    np.testing.assert_array_equal(a.value.values, b.value.values)
    np.testing.assert_array_equal(a.sigma.values, b.sigma.values)
    c = json.loads(a.attrs["counters"])
    assert c["optimizer"] == "levenberg-marquardt"
    # + 4 tile solves of the model gradient for the sampling-geometry errors (fine.model_geometry_columns)
    assert c["eigen_solves"] - c.get("eigen_solves_sigma", 0) == c["eigen_solves_start"] + c["lm_steps"] == 2 + c["lm_steps"]
    assert c.get("eigen_solves_sigma", 0) in (0, 4)
    # resumed: the first session's solves (to its step-1 checkpoint) are carried and summed
    cb = json.loads(b.attrs["counters"])
    assert cb["earlier_sessions"]["eigen_solves"] == int(tr["eigen_solves"][-1]) >= 3
    assert cb["eigen_solves"] == cb["earlier_sessions"]["eigen_solves"] + cb["eigen_solves_this_session"] >= c["eigen_solves"]


def test_coarse_voltage_is_refined_recorded_and_used(tmp_path):
    """coarse.refine = ["voltage"] on a small LARBED run whose HOLZ lines carry the voltage (truth 200 kV, config
    201 kV): recovered within its standard error (measured 199.952 ± 0.034 kV), recorded in coarse.zarr, taken
    by the iam and fine stages (iam runs after coarse), in results.json and the report; a changed search range
    recomputes coarse, iam, fine and report only."""
    from stages.report import fmt
    from stages.synthetic import write_small_holz_run

    cfg = write_small_holz_run(tmp_path / "cfg", "holz", coarse_extra="hv_range_kV = [198.5, 202.5]")
    plan = _plan(cfg, tmp_path)
    assert plan.stages == ["load", "roi", "variance", "coarse", "iam", "fine", "report"]
    P.run_all(plan, say=_quiet)
    co = xr.open_zarr(plan.store("coarse"), consolidated=False)
    (row,) = json.loads(co.attrs["physics"])
    hv, sigma = row["value"], row["sigma"]
    assert row["name"] == "hv_kV" and row["start"] == 201.0 and row["range"] == [198.5, 202.5]
    # the curvature of the correlation is not a calibrated error: reported undefined, kept as a lower bound
    s_curv = json.loads(co.attrs["steps"])["voltage"]["params"]["sigma_curvature"]["hv_kV"]
    assert sigma is None and "undefined" in co.attrs["physics_sigma_definition"]
    assert 0.005 < s_curv < 0.1 and abs(hv - 200.0) < max(3 * s_curv, 0.1) and not row["at_range_end"]
    assert json.loads(co.attrs["refined_model"]) == {"hv_kV": hv}
    assert abs(co.attrs["thickness_A"] / 800.0 - 1) < 0.01  # config starts at 820 Å
    steps = json.loads(co.attrs["steps"])
    assert np.isnan(steps["voltage"]["params"]["sigma"]["hv_kV"]) and "orientation_thickness_final" in steps
    assert json.loads(co.attrs["counters"])["eigen_solves"] == sum(s["eigen_solves"] for s in steps.values()) >= 6
    for stage in ("iam", "fine"):  # both use the refined voltage
        assert xr.open_zarr(plan.store(stage), consolidated=False).attrs["hv_kV"] == hv
    res = json.loads((plan.run_dir / "report" / "results.json").read_text())
    assert res["coarse"]["refined"] == [row] and res["coarse"]["refined_model"] == {"hv_kV": hv}
    assert res["microscope"]["hv_kV"] == hv
    assert not [w for w in res["warnings"] if "Coarse" in w or "beam sets" in w]
    md = (plan.run_dir / "report" / "report.md").read_text()
    assert f"| accelerating voltage | kV | 201 | {fmt(hv, sigma)} | [198.5, 202.5] |" in md
    assert "voltage by correlation" in md and "use the voltage as refined here" in md
    cfg.write_text(cfg.read_text().replace("hv_range_kV = [198.5, 202.5]", "hv_range_kV = [198.0, 202.5]"))
    plan2 = _plan(cfg, tmp_path)
    assert {s for s in plan.stages if plan.keys[s] != plan2.keys[s]} == {"coarse", "iam", "fine", "report"}

SEED_METRIC = '''
import numpy as np
from stages.physics.gof import BaseGOF


class OneMinusR(BaseGOF):
    """The seed's custom-metric interface: __call__(sim, exp) -> value."""

    def __call__(self, sim, exp):
        return 1.0 - np.corrcoef(sim, exp)[0, 1]
'''


def test_seed_style_user_metric_refines(tmp_path):
    """refine.gof naming a BaseGOF subclass with only __call__ runs the whole pipeline: Nelder-Mead
    (chosen for a value-only metric; Levenberg-Marquardt, named explicitly, is refused) lowers its value."""
    cfg = write_small_larbed_run(tmp_path / "data", "seedgof", seed=4, size=16, roi_half=4, max_iterations=3)
    (cfg.parent / "seed_metric.py").write_text(SEED_METRIC)
    text = cfg.read_text().replace('gof = "Chi2_LARBED"', 'gof = "seed_metric.py:OneMinusR"')
    cfg.write_text(text.replace('optimizer = "nelder-mead"\n', ""))
    plan = _plan(cfg, tmp_path / "results")
    assert set(P.run_all(plan, say=_quiet).values()) == {"done"}
    fine = xr.open_zarr(plan.store("fine"), consolidated=False)
    assert json.loads(fine.attrs["counters"]).get("optimizer", "nelder-mead") == "nelder-mead"
    assert fine.attrs["gof"] <= fine.attrs["gof_start"] and 0 < fine.attrs["gof"] < 1
    metric = make_gof("seed_metric.py:OneMinusR", base_dir=cfg.parent)
    with pytest.raises(QcbedInputError, match="Levenberg-Marquardt needs residuals") as e:
        P.fine_optimizer({"optimizer": "levenberg-marquardt"}, metric)
    assert e.value.field == "refine.optimizer"
    with pytest.raises(QcbedInputError, match="refine.gauss_newton_steps"):
        P.fine_optimizer({"gauss_newton_steps": 2}, metric)
    assert P.fine_optimizer({}, make_gof("Chi2_LARBED")) == P.DEFAULT_OPTIMIZER
