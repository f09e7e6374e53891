"""Verified stores and write faults (issue 16, items 1 and 2).

Item 1: every store (and the report folder) carries a manifest of its files written before the rename;
a store skipped as done or read by a later stage is checked against it, and a damaged one (garbled,
deleted, truncated chunk, extra file) is set aside and recomputed; a store from before manifests is
'unverified' but done.  The fine trace has a digest per committed row and resumes from the last intact
one.

Item 2: a full disk (ENOSPC), no permission (EACCES) or a read-only file system (EROFS) at any write
path gives one QcbedInputError naming the folder, marks nothing done and leaves earlier results
byte-identical.  Faults are injected at the write calls (the tests run as root, where chmod cannot make a
folder read-only); a real chmod 0o555 folder is tested where it takes effect.
"""

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from flows.cli import main
from stages import config as C
from stages import pipeline as P
from stages import store as S
from stages.errors import QcbedInputError
from stages.synthetic import write_small_larbed_run


def _quiet(msg):
    pass


def _plan(cfg_path, results):
    return P.make_plan(C.load_config(cfg_path), results)


def _snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder``: byte-identity of earlier results."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _small_store(tmp_path, name="a.zarr", values=None) -> Path:
    ds = xr.Dataset({"value": ("param", np.asarray(values if values is not None else [1.5, -2.0, 3.25]))},
                    attrs={"stage_key": "k1"})
    return S.write_store(ds, tmp_path / name)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny synthetic LARBED run with 3 outer iterations (a few seconds)."""
    d = tmp_path_factory.mktemp("small")
    return write_small_larbed_run(d, "tiny", seed=2, size=16, roi_half=4, max_iterations=3)


@pytest.fixture(scope="module")
def finished(small, tmp_path_factory):
    """A finished run of ``small`` (every stage done), copied per test by :func:`_copy_run`."""
    results = tmp_path_factory.mktemp("finished")
    plan = _plan(small, results)
    P.run_all(plan, say=_quiet)
    return plan.run_dir


def _copy_run(finished: Path, small, tmp_path):
    import shutil

    dst = tmp_path / finished.name
    shutil.copytree(finished, dst)
    return _plan(small, tmp_path)


# ============================================================================ item 1: manifests
def test_written_store_has_a_manifest_and_verifies(tmp_path):
    st = _small_store(tmp_path)
    m = json.loads((st / S.MANIFEST).read_text())
    assert "zarr.json" in m["files"] and any(f.startswith("value/c") for f in m["files"])
    assert S.verify_store(st) == "verified"
    assert not list(tmp_path.glob(".a.zarr.*"))  # nothing left under a temporary name


def _chunk(st: Path) -> Path:
    return next(p for p in (st / "value").rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("damage", ["garbled", "deleted", "truncated", "garbage_appended", "extra_file",
                                    "manifest_garbled"])
def test_damaged_store_is_corrupt_and_set_aside_on_read(tmp_path, damage):
    st = _small_store(tmp_path)
    c = _chunk(st)
    raw = c.read_bytes()
    if damage == "garbled":
        c.write_bytes(bytes(b ^ 0x5A for b in raw))  # same size, other bytes
    elif damage == "deleted":
        c.unlink()  # zarr would read the fill value
    elif damage == "truncated":
        c.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage_appended":
        c.write_bytes(raw + b"\0garbage")
    elif damage == "extra_file":
        (st / "value" / "c" / "7").write_bytes(raw)  # a chunk qcbed never wrote
    else:
        (st / S.MANIFEST).write_text("{ not json")
    with pytest.raises(S.CorruptStore) as e:
        S.verify_store(st)
    assert str(st) in str(e.value)
    with pytest.raises(S.CorruptStore) as e:
        S.open_store(st)  # a later stage never gets the values
    assert "moved to .a.zarr.corrupt-" in str(e.value) and "run qcbed run again" in str(e.value)
    assert not st.exists() and len(list(tmp_path.glob(".a.zarr.corrupt-*"))) == 1  # set aside, not deleted


def _as_before_manifests(st: Path) -> None:
    """Make ``st`` a store as written before qcbed recorded manifests: no manifest, no attribute saying
    it was written with one."""
    (st / S.MANIFEST).unlink()
    meta = st / ("zarr.json" if (st / "zarr.json").exists() else "record.json")
    d = json.loads(meta.read_text())
    d.get("attributes", d).pop(S.MANIFEST_ATTR)
    meta.write_text(json.dumps(d))


def test_store_without_manifest_is_unverified_but_readable(tmp_path):
    st = _small_store(tmp_path)
    _as_before_manifests(st)
    assert S.verify_store(st) == "unverified"
    assert S.open_store(st)["value"].values.tolist() == [1.5, -2.0, 3.25]


def test_deleted_manifest_of_a_store_written_with_one_is_corrupt(finished, small, tmp_path):
    """Found by bench/faults.py: a deleted manifest made a store read as 'unverified' (from before
    manifests) and be used as it was, whatever else was damaged; its metadata now says it had one."""
    st = _small_store(tmp_path)
    (st / S.MANIFEST).unlink()
    with pytest.raises(S.CorruptStore, match="qcbed_manifest.json is missing"):
        S.verify_store(st)
    plan = _copy_run(finished, small, tmp_path)
    for s in ("variance", "report"):
        (plan.store(s) / S.MANIFEST).unlink()
        assert P.store_check(plan, s)[0] == "corrupt"
    lines = []
    out = P.run_all(plan, say=lines.append)
    assert out["variance"] == out["report"] == "done" and out["fine"] == "skipped"
    assert sum("qcbed_manifest.json is missing" in m for m in lines) == 2
    assert P.store_check(plan, "variance") == P.store_check(plan, "report") == ("done", "verified")


def test_garbled_fine_value_is_set_aside_and_recomputed(finished, small, tmp_path):
    """The field failure: a garbled fine.zarr value chunk was printed as a converged result."""
    plan = _copy_run(finished, small, tmp_path)
    good = S.open_store(plan.store("fine"))["value"].values.copy()
    c = next(p for p in (plan.store("fine") / "value").rglob("*") if p.is_file() and p.name != "zarr.json")
    c.write_bytes(bytes(b ^ 0xFF for b in c.read_bytes()))
    assert P.store_state(plan, "fine") == "corrupt"
    lines = []
    out = P.run_all(plan, say=lines.append)
    assert out["fine"] in ("done", "resumed") and out["report"] == "skipped"
    assert out["load"] == out["roi"] == out["iam"] == out["variance"] == "skipped"
    msg = [m for m in lines if "corrupted" in m]
    assert len(msg) == 1 and "fine.zarr" in msg[0] and "value/c" in msg[0] and "recomputing" in msg[0]
    assert len(list(plan.run_dir.glob(".fine.zarr.corrupt-*"))) == 1
    assert P.store_state(plan, "fine") == "done"
    np.testing.assert_allclose(S.open_store(plan.store("fine"))["value"].values, good, rtol=1e-9)


@pytest.mark.parametrize("stage", ["roi", "report"])
def test_deleted_file_of_a_done_store_recomputes_that_stage(finished, small, tmp_path, stage):
    plan = _copy_run(finished, small, tmp_path)
    victim = (plan.store("roi") / "kt" / "c" / "0" / "0") if stage == "roi" else (plan.store("report") / "report.html")
    assert victim.is_file()
    victim.unlink()
    assert P.store_state(plan, stage) == "corrupt"
    lines = []
    assert P.run_stage(plan, stage, say=lines.append) == "done"
    assert sum("corrupted" in m and "is missing" in m for m in lines) == 1
    assert P.store_check(plan, stage) == ("done", "verified")


def test_old_stores_without_manifests_stay_done_unverified(finished, small, tmp_path):
    plan = _copy_run(finished, small, tmp_path)
    for s in plan.stages:
        _as_before_manifests(plan.store(s))
    before = _snapshot(plan.run_dir)
    lines = []
    out = P.run_all(plan, say=lines.append)
    assert set(out.values()) == {"skipped"}
    assert sum("unverified" in m for m in lines) == len(plan.stages)  # once per store
    after = _snapshot(plan.run_dir)
    assert before == after  # nothing recomputed


# ============================================================================ item 1: the fine trace
def _trace(tmp_path, n=5, chunk=2, monkeypatch=None):
    monkeypatch.setattr(P.TraceStore, "CHUNK", chunk)
    said = []
    t = P.TraceStore(tmp_path / "fine_trace.zarr", say=said.append)
    t.create("k", ["a", "b"], 3, 2, {"gof_start": 1.0})
    for i in range(n):
        t.append({"iteration": i + 1, "gof": 1.0 / (i + 1), "wall_s": 0.1 * i, "eigen_solves": i, "best": [i, -i],
                  "simplex": np.full((3, 2), i + 0.5), "fsim": np.full(3, i + 0.25)})
    return t, said


def test_trace_rows_carry_digests_and_an_intact_trace_opens_whole(tmp_path, monkeypatch):
    t, said = _trace(tmp_path, monkeypatch=monkeypatch)
    g = zarr.open_group(str(t.path), mode="r")
    assert len(g.attrs["row_digests"]) == 5
    got = t.open("k")
    assert got["iteration"].tolist() == [1, 2, 3, 4, 5] and said == []


@pytest.mark.parametrize("damage,first_bad", [("garbled", 2), ("truncated", 2), ("deleted", 4)])
def test_damaged_trace_resumes_from_its_last_intact_row(tmp_path, monkeypatch, damage, first_bad):
    t, said = _trace(tmp_path, monkeypatch=monkeypatch)  # chunks of 2 rows: rows 1-2, 3-4, 5
    if damage == "deleted":
        (t.path / "simplex" / "c" / "2" / "0" / "0").unlink()  # rows 5: reads as zeros
    else:
        c = t.path / "gof" / "c" / "1"  # rows 3-4
        raw = c.read_bytes()
        c.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else bytes(b ^ 0x33 for b in raw))
    got = t.open("k")
    assert got["iteration"].tolist() == list(range(1, first_bad + 1))
    assert got["gof"].tolist() == [1.0 / (i + 1) for i in range(first_bad)]
    assert len(said) == 1 and f"row {first_bad + 1} of 5 is damaged" in said[0] and f"(row {first_bad})" in said[0]
    # the trace now ends at the intact row and goes on from there
    t.append({"iteration": first_bad + 1, "gof": 0.01, "wall_s": 1.0, "eigen_solves": 9, "best": [7, 7],
              "simplex": np.full((3, 2), 7.0), "fsim": np.full(3, 7.0)})
    again = t.open("k")
    assert again["iteration"].tolist() == list(range(1, first_bad + 2)) and again["gof"][-1] == 0.01
    assert len(said) == 1


def test_trace_header_damaged_is_set_aside(tmp_path, monkeypatch):
    """A garbled digit of gof_start in the trace's zarr.json (the JSON still reads) was reused by the resumed
    run as the start GOF; the header now has its digest: the trace is set aside, the refinement starts over."""
    t, said = _trace(tmp_path, monkeypatch=monkeypatch)
    meta = t.path / "zarr.json"
    text = meta.read_text()
    assert '"gof_start": 1.0' in text
    meta.write_text(text.replace('"gof_start": 1.0', '"gof_start": 7.0'))
    assert t.open("k") is None
    assert len(said) == 1 and "header" in said[0] and "gof_start" in said[0] and "starting over" in said[0]
    assert not t.path.exists() and len(list(tmp_path.glob(".fine_trace.zarr.corrupt-*"))) == 1


def test_trace_without_header_digest_still_opens(tmp_path, monkeypatch):
    """A trace written before qcbed recorded the header digest opens as before."""
    t, said = _trace(tmp_path, monkeypatch=monkeypatch)
    g = zarr.open_group(str(t.path), mode="r+")
    attrs = dict(g.attrs)
    attrs.pop("header_digest")
    g.attrs.clear()
    g.attrs.update(attrs)
    assert t.open("k")["iteration"].tolist() == [1, 2, 3, 4, 5] and said == []


def test_trace_damaged_from_row_one_is_set_aside(tmp_path, monkeypatch):
    t, said = _trace(tmp_path, monkeypatch=monkeypatch)
    (t.path / "fsim" / "c" / "0" / "0").unlink()  # rows 1-2 read as zeros
    assert t.open("k") is None
    assert not t.path.exists() and len(list(tmp_path.glob(".fine_trace.zarr.corrupt-*"))) == 1
    assert "starting over" in said[0]


def test_trace_without_row_digests_still_resumes(tmp_path, monkeypatch):
    t, _ = _trace(tmp_path, monkeypatch=monkeypatch)
    g = zarr.open_group(str(t.path), mode="r+")
    del g.attrs["row_digests"]  # a trace from before row digests
    assert t.open("k")["iteration"].tolist() == [1, 2, 3, 4, 5]


# ============================================================================ item 2: write faults
def _assert_write_error(exc: QcbedInputError, folder: Path, words: str):
    s = str(exc)
    assert s.startswith(f"{folder}: cannot write: ") and words in s and "\n" not in s


def test_write_store_full_disk_leaves_the_earlier_store(tmp_path, monkeypatch):
    st = _small_store(tmp_path)
    before = _snapshot(st)
    real = xr.Dataset.to_zarr

    def half_then_full(self, store, *a, **k):  # writes part of the store, then the disk is full
        real(self, store, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", half_then_full)
    with pytest.raises(QcbedInputError) as e:
        _small_store(tmp_path, values=[9.0])
    _assert_write_error(e.value, tmp_path, "no space left")
    assert "free space" in str(e.value)
    assert _snapshot(st) == before and not list(tmp_path.glob(".a.zarr.*"))  # temporary copy removed


@pytest.mark.parametrize("code,words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_write_store_in_a_folder_that_cannot_be_written(tmp_path, monkeypatch, code, words):
    st = _small_store(tmp_path)
    before = _snapshot(st)
    monkeypatch.setattr(S, "write_manifest", lambda folder: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(QcbedInputError) as e:
        _small_store(tmp_path, values=[9.0])
    _assert_write_error(e.value, tmp_path, words)
    assert _snapshot(st) == before


def test_replace_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    st = _small_store(tmp_path)
    before = _snapshot(st)
    new = tmp_path / ".a.zarr.tmp-x"
    new.mkdir()
    (new / "zarr.json").write_text("{}")
    real = os.rename
    calls = []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(S.os, "rename", second_fails)
    with pytest.raises(QcbedInputError):
        S.replace_dir(new, st)
    assert _snapshot(st) == before and not new.exists()


def test_trace_append_on_a_full_disk_commits_nothing(tmp_path, monkeypatch):
    t, _ = _trace(tmp_path, n=3, monkeypatch=monkeypatch)
    monkeypatch.setattr(zarr.Array, "append", _no_space)
    with pytest.raises(QcbedInputError) as e:
        t.append({"iteration": 4, "gof": 0.1, "wall_s": 1.0, "eigen_solves": 4, "best": [4, 4],
                  "simplex": np.full((3, 2), 4.0), "fsim": np.full(3, 4.0)})
    _assert_write_error(e.value, t.path, "no space left")
    monkeypatch.undo()
    assert t.open("k")["iteration"].tolist() == [1, 2, 3]


def test_trace_create_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr, "open_group", _no_space)
    with pytest.raises(QcbedInputError) as e:
        P.TraceStore(tmp_path / "fine_trace.zarr").create("k", ["a"], 2, 1, {})
    _assert_write_error(e.value, tmp_path, "no space left")
    assert not list(tmp_path.iterdir())


def test_run_record_on_a_full_disk_keeps_the_old_one(small, tmp_path, monkeypatch):
    plan = _plan(small, tmp_path)
    path = P.write_run_record(plan)
    before = path.read_bytes()
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(QcbedInputError) as e:
        P.write_run_record(plan)
    _assert_write_error(e.value, plan.run_dir, "no space left")
    assert path.read_bytes() == before and [p.name for p in plan.run_dir.iterdir()] == ["run.json"]


def test_run_lock_in_a_read_only_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # a real read-only folder (not as root)
            with pytest.raises(QcbedInputError) as e:
                P.RunLock(ro / "run").__enter__()
            _assert_write_error(e.value, ro / "run", "permission denied")
    finally:
        ro.chmod(stat.S_IRWXU)
    real = os.open
    monkeypatch.setattr(P.os, "open", lambda p, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file "
                        "system")) if str(p).endswith(P.LOCK) else real(p, *a, **k))
    with pytest.raises(QcbedInputError) as e:
        P.RunLock(tmp_path / "run").__enter__()
    _assert_write_error(e.value, tmp_path / "run", "read-only")


def test_report_figure_on_a_full_disk_is_an_error_not_a_report_without_figures(finished, small, tmp_path,
                                                                                 monkeypatch):
    """The field failure: a full disk made the report stage write a report without figures and mark it done."""
    from matplotlib.figure import Figure

    plan = _copy_run(finished, small, tmp_path)
    before = _snapshot(plan.store("report"))
    monkeypatch.setattr(Figure, "savefig", _no_space)
    with pytest.raises(QcbedInputError) as e:
        P.compute_report(plan)
    _assert_write_error(e.value, plan.run_dir, "no space left")
    assert _snapshot(plan.store("report")) == before  # the earlier report untouched
    assert not list(plan.run_dir.glob(".report.tmp-*"))
    import shutil

    shutil.rmtree(plan.store("report"))
    with pytest.raises(QcbedInputError):
        P.run_stage(plan, "report", say=_quiet)
    assert P.store_state(plan, "report") == "pending"  # not marked done


def test_cli_run_full_disk_exits_2_with_one_line(finished, small, tmp_path, monkeypatch, capsys):
    """``qcbed run`` (in process, through the Prefect flow) on a disk that fills up at the report: exit 2, one
    line naming the run folder, the report not done, every earlier store byte-identical."""
    from matplotlib.figure import Figure

    plan = _copy_run(finished, small, tmp_path)
    import shutil

    shutil.rmtree(plan.store("report"))
    before = {s: _snapshot(plan.store(s)) for s in plan.stages if s != "report"}
    monkeypatch.setattr(Figure, "savefig", _no_space)
    rc = main(["run", str(small), "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"qcbed: error: {plan.run_dir}: cannot write: no space left")
    assert P.store_state(plan, "report") != "done"
    assert {s: _snapshot(plan.store(s)) for s in before} == before


def test_cli_report_on_a_garbled_fine_store_exits_2_and_sets_it_aside(finished, small, tmp_path, capsys):
    plan = _copy_run(finished, small, tmp_path)
    before = _snapshot(plan.store("report"))
    c = next(p for p in (plan.store("fine") / "value").rglob("*") if p.is_file() and p.name != "zarr.json")
    c.write_bytes(bytes(b ^ 0xFF for b in c.read_bytes()))
    assert main(["report", str(plan.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{plan.store('fine')}: damaged: value/c" in err and "moved to .fine.zarr.corrupt-" in err
    assert P.store_state(plan, "fine") == "pending" and _snapshot(plan.store("report")) == before


def _lock_without_permission(monkeypatch):
    real = os.open

    def no_permission(p, *a, **k):
        if str(p).endswith(P.LOCK):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(p, *a, **k)

    monkeypatch.setattr(P.os, "open", no_permission)


@pytest.mark.parametrize("command", ["prepare", pytest.param("run", marks=pytest.mark.slow)])  # run: Prefect, ~25 s
def test_cli_read_only_results_exits_2_with_one_line(small, tmp_path, monkeypatch, capsys, command):
    """The field failure: a read-only results folder gave a 54-line traceback (EACCES injected at the run
    lock, the first write of a run; as root, chmod cannot make the folder read-only)."""
    _lock_without_permission(monkeypatch)
    rc = main([command, str(small), "--results", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    run_dir = _plan(small, tmp_path).run_dir
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith(f"qcbed: error: {run_dir}: cannot write: permission denied") and "chmod u+w" in lines[0]
    assert [p.name for p in run_dir.iterdir()] == []  # nothing written, nothing marked done


def _rechunk_trace(path: Path, monkeypatch) -> int:
    """Rewrite a run's trace with one row per chunk (so one row can be damaged alone); its row count."""
    g = zarr.open_group(str(path), mode="r")
    attrs, rows = dict(g.attrs), {name: a[:] for name, a in g.arrays()}
    monkeypatch.setattr(P.TraceStore, "CHUNK", 1)
    t = P.TraceStore(path)
    std = ("iteration", "gof", "wall_s", "eigen_solves", "best", "simplex", "fsim")
    own = {k: v for k, v in attrs.items() if k not in ("stage_key", "names", "n_committed", "row_digests")}
    nv, npar = rows["simplex"].shape[1:]
    t.create(attrs["stage_key"], attrs["names"], nv, npar, own,
             extra={k: v.shape[1:] for k, v in rows.items() if k not in std})
    n = int(attrs["n_committed"])
    for i in range(n):
        t.append({k: v[i] for k, v in rows.items()})
    return n


def test_fine_stage_resumes_from_the_last_intact_trace_row(finished, small, tmp_path, monkeypatch):
    """A garbled trace chunk in a real run: the fine stage drops that row and the ones after it, resumes from
    the last intact checkpoint and reaches the uninterrupted run's values."""
    plan = _copy_run(finished, small, tmp_path)
    want = S.open_store(plan.store("fine"))["value"].values.copy()
    n = _rechunk_trace(plan.run_dir / P.TRACE, monkeypatch)
    assert n >= 3
    import shutil

    shutil.rmtree(plan.store("fine"))
    c = plan.run_dir / P.TRACE / "gof" / "c" / str(n - 1)  # the last row
    c.write_bytes(bytes(b ^ 0x77 for b in c.read_bytes()))
    lines = []
    assert P.run_stage(plan, "fine", say=lines.append) == "resumed"
    assert sum(f"row {n} of {n} is damaged" in m and f"(row {n - 1})" in m for m in lines) == 1
    step = int(zarr.open_group(str(plan.run_dir / P.TRACE), mode="r")["iteration"][n - 2])
    assert any("resuming after " in m and f" {step} (" in m for m in lines)
    np.testing.assert_array_equal(S.open_store(plan.store("fine"))["value"].values, want)
