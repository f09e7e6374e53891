"""Fault injection (issue 16 item 7): kill -9 at random moments, damaged stores, a full disk, a read-only
results folder, Ctrl-C during fine, a crashing plugin in a batch; one table of figures from one run.

Run:  .venv/bin/python bench/faults.py                       (20 kills, 20 damages, every fault; ~25 min on 2 cores)
      .venv/bin/python bench/faults.py --kills 4 --damages 8 --only kills
      .venv/bin/python bench/faults.py --json faults.json   (the figures and every trial as JSON)

Every fault is done to real ``qcbed run`` processes (``python -m flows.cli run``, Prefect, a new session
each so that ``os.killpg`` reaches Prefect's temporary server too) of one tiny synthetic LARBED refinement
(:func:`stages.synthetic.write_small_larbed_run`, 16 x 16 tilts, a 9 x 9 ROI, 4 Nelder-Mead iterations,
each checkpointed in fine_trace.zarr).  "Identical" means: every data variable of fine.zarr but the
wall times (value and sigma among them) and every number of report/results.json but the counters and
times equal, bit for bit, those of one uninterrupted ``qcbed run`` of the same config (the reference).

* kills: N runs from an empty results folder, each killed (SIGKILL to its process group) at a moment
  drawn uniformly over the reference's wall time, so kills land in start-up, every stage and the store
  writes; then the same command again to completion.  The stage a kill hit is read from the run's
  output (the last stage finished) and run.json; "in a store write" when a ``.NAME.tmp-*`` folder was
  left behind.
* damages: M copies of the finished reference run, each with one file of one store (every store, the
  report folder and fine_trace.zarr) garbled (bytes XORed in place, same size), truncated, deleted or
  grown by garbage; then ``qcbed run`` again.  Detected: the run said the store was damaged and set it
  aside (the stage recomputed it) or cut the trace back; used: not detected, the damaged bytes read.
  The trace is read only while fine.zarr is missing (a run killed in fine), so a trace damage also
  removes fine.zarr and the report: the rerun must resume from the trace's last intact row.
* enospc: ``qcbed run`` into a tmpfs too small for the run (sizes from 10 % to 90 % of the run's
  bytes, so the full disk comes at different writes); exit 2, one line naming the folder, every store
  that reads as done verifies and opens; then the tmpfs is grown and the same command finishes to the
  identical result.  Without permission to mount, the OSError is injected at the store writes.
* readonly: the finished reference run on a tmpfs remounted read-only, the config edited so that fine
  and report must be recomputed: exit 2, one line naming the folder, the earlier results byte-identical.
* sigint: SIGINT to the process group (Ctrl-C) after 2 fine checkpoints: exit 130, the line saying how
  to continue, the same command resumes to the identical result.
* plugin: ``qcbed run bad.toml a.toml b.toml --workers 2`` with bad's GOF plugin raising: a and b
  finished, bad failed alone, exit 1, the summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from stages import config as C  # noqa: E402
from stages import pipeline as P  # noqa: E402
from stages import store as S  # noqa: E402

NAME = "tiny"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
STAGE_ORDER = ("load", "roi", "iam", "variance", "fine", "report")
FAULTS = ("kills", "damages", "enospc", "readonly", "sigint", "plugin")
DAMAGES = ("garble", "truncate", "delete", "append")
CRASHING_METRIC = '''
from stages.physics.gof import BaseGOF


class Crash(BaseGOF):
    """A user metric with a bug: every evaluation raises an ordinary exception."""

    def __call__(self, sim, exp):
        raise RuntimeError("bug in the user's metric")
'''


# ------------------------------------------------------------------------------ the run
def make_config(folder: Path, max_iterations: int = 4) -> Path:
    from stages.synthetic import write_small_larbed_run

    return write_small_larbed_run(Path(folder), NAME, seed=2, size=16, roi_half=4, max_iterations=max_iterations)


def cmd(cfg: Path, results: Path, *more) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", *[str(c) for c in ([cfg] if isinstance(cfg, Path) else cfg)],
            "--results", str(results), *more]


def start(args: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    p._log = fh  # closed by finish()
    return p


def finish(p: subprocess.Popen, timeout: float = 600) -> int:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
    p._log.close()
    return rc


def run_cli(args: list[str], log: Path, timeout: float = 600) -> tuple[int, str]:
    rc = finish(start(args, log), timeout)
    return rc, log.read_text()


def group_gone(pgid: int, wait_s: float = 10.0) -> bool:
    """No live process left in the group (zombies do not count: the container's pid 1 may not reap them)."""
    t0 = time.time()
    while time.time() - t0 < wait_s:
        alive = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            f = text[text.rindex(")") + 2:].split()
            if int(f[2]) == pgid and f[0] != "Z":
                alive = True
                break
        if not alive:
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------ comparing results
# counters, times and the session record (resumed_from_iteration: where a resumed run continued) differ
# between an interrupted and an uninterrupted run; the results do not
_UNTIMED = re.compile(r"(^|/)(counters|earlier_sessions)(/|$)|_s$|wall|(^|/)created$|resumed_from")


def result_numbers(run_dir: Path) -> dict:
    """{path: number} of report/results.json, counters, times and resumed_from_iteration left out (they
    differ between sessions)."""
    d = json.loads((Path(run_dir) / "report" / "results.json").read_text())
    out = {}

    def walk(o, p):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{p}/{k}")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, f"{p}[{i}]")
        elif isinstance(o, (int, float)) and not isinstance(o, bool) and not _UNTIMED.search(p):
            out[p] = o

    walk(d, "")
    return out


def fine_arrays(run_dir: Path) -> dict:
    import xarray as xr

    ds = xr.open_zarr(Path(run_dir) / "fine.zarr", consolidated=False, chunks=None)
    return {k: np.asarray(v.values) for k, v in ds.variables.items() if "wall" not in k}


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":  # bit for bit, NaN included
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))


def compare(run_dir: Path, ref: dict) -> str:
    """'' when the run's fine.zarr and results.json equal the reference's bit for bit, else what differs."""
    try:
        fa, rn = fine_arrays(run_dir), result_numbers(run_dir)
    except Exception as exc:  # noqa: BLE001
        return f"unreadable result ({type(exc).__name__}: {exc})"
    for k in sorted(set(fa) | set(ref["fine"])):
        if k not in fa or k not in ref["fine"] or not _same(fa[k], ref["fine"][k]):
            return f"fine.zarr {k} differs"
    for k in sorted(set(rn) | set(ref["results"])):
        a, b = rn.get(k), ref["results"].get(k)
        if a is None or b is None or not (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))):
            return f"results.json {k}: {a!r} != {b!r}"
    return ""


def nothing_false_done(cfg: Path, results: Path) -> str:
    """'' when every store that reads as done verifies and opens (the report: its results.json parses),
    else the first that does not; the checks do not move anything aside."""
    plan = P.make_plan(C.load_config(cfg), results)
    for s in plan.stages:
        state, _ = P.store_check(plan, s)
        if state != "done":
            continue
        st = plan.store(s)
        try:
            S.verify_store(st)
            if s == "report":
                json.loads((st / "results.json").read_text())
            else:
                import xarray as xr

                xr.open_zarr(st, consolidated=False, chunks=None).load()
        except Exception as exc:  # noqa: BLE001
            return f"{s} reads as done but {type(exc).__name__}: {exc}"
    return ""


def done_stages(cfg: Path, results: Path) -> list[str]:
    plan = P.make_plan(C.load_config(cfg), results)
    return [s for s in plan.stages if P.store_state(plan, s) == "done"]


# ------------------------------------------------------------------------------ reference
def reference(work: Path) -> dict:
    """The config, one uninterrupted `qcbed run` of it (wall time, run folder), and its numbers; ``bytes``:
    what its files take on a tmpfs (whole 4 KiB pages)."""
    cfg = make_config(work / "data")
    results = work / "reference"
    t0 = time.perf_counter()
    rc, out = run_cli(cmd(cfg, results), work / "reference.log")
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}):\n{out}")
    run = results / NAME
    return {"cfg": cfg, "run": run, "wall_s": wall, "fine": fine_arrays(run), "results": result_numbers(run),
            "bytes": sum(-(-p.stat().st_size // 4096) * 4096 for p in run.rglob("*") if p.is_file())}


# ------------------------------------------------------------------------------ kills
def _hit_stage(out: str, run: Path) -> str:
    """The stage a kill hit: the one after the last stage the output says finished; 'start-up' before
    run.json is written, 'exit' after the report."""
    finished = [m.group(1) for m in re.finditer(rf"^\[{NAME}\] (\w+): (?:done|resumed) in", out, re.M)]
    if not finished:
        return "load" if (run / P.RUN_RECORD).exists() else "start-up"
    last = finished[-1]
    i = STAGE_ORDER.index(last)
    return "exit" if i + 1 >= len(STAGE_ORDER) else STAGE_ORDER[i + 1]


def kill_trial(ref: dict, work: Path, rng: random.Random, i: int) -> dict:
    results = work / f"kill{i:02d}"
    args = cmd(ref["cfg"], results)
    at = rng.uniform(0.0, ref["wall_s"])
    p = start(args, work / f"kill{i:02d}-a.log")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < at and p.poll() is None:
        time.sleep(0.01)
    killed = p.poll() is None
    if killed:
        os.killpg(p.pid, signal.SIGKILL)
    finish(p)
    group_gone(p.pid)
    run = results / NAME
    first = (work / f"kill{i:02d}-a.log").read_text()
    stage = _hit_stage(first, run) if killed else "after exit"
    in_write = bool(run.exists() and list(run.glob(".*.tmp-*")))
    trace_rows = None
    with contextlib.suppress(Exception):
        import zarr

        trace_rows = int(zarr.open_group(str(run / P.TRACE), mode="r").attrs["n_committed"])
    false_done = nothing_false_done(ref["cfg"], results) if run.exists() else ""
    rc, out = run_cli(args, work / f"kill{i:02d}-b.log")
    diff = compare(run, ref) if rc == 0 else f"rerun exit {rc}"
    resumed = re.search(r"resuming after iteration (\d+)", out)
    return {"trial": i, "at_s": round(at, 3), "killed": killed, "stage": stage, "in_store_write": in_write,
            "trace_rows": trace_rows, "false_done": false_done, "rerun_rc": rc, "resumed": rc == 0,
            "resumed_after_iteration": int(resumed.group(1)) if resumed else None,
            "identical": rc == 0 and not diff, "difference": diff}


def kills(ref: dict, work: Path, n: int, rng: random.Random, say=print) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        t = kill_trial(ref, work, rng, i)
        say(f"  kill {i + 1}/{n} at {t['at_s']:.1f} s: {t['stage'] if t['killed'] else 'not killed (had finished)'}"
            f"{' (in a store write)' if t['in_store_write'] else ''}; rerun exit {t['rerun_rc']}"
            f"{'' if t['identical'] else ', DIFFERS: ' + t['difference']}")
        out.append(t)
        shutil.rmtree(work / f"kill{i:02d}", ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ damages
DAMAGED_STORES = tuple(P.STORES[s] for s in STAGE_ORDER) + (P.TRACE,)


def damage_file(path: Path, kind: str, rng: random.Random) -> str:
    raw = path.read_bytes()
    if kind == "garble":
        if not raw:
            raise ValueError("empty")
        lo = rng.randrange(len(raw))
        hi = min(len(raw), lo + rng.randint(1, 16))
        b = bytearray(raw)
        for j in range(lo, hi):
            b[j] ^= rng.randint(1, 255)
        path.write_bytes(bytes(b))
        return f"bytes {lo}-{hi - 1} of {len(raw)} XORed"
    if kind == "truncate":
        if not raw:
            raise ValueError("empty")
        n = rng.randrange(len(raw))
        path.write_bytes(raw[:n])
        return f"cut to {n} of {len(raw)} bytes"
    if kind == "delete":
        path.unlink()
        return "deleted"
    extra = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 64)))
    path.write_bytes(raw + extra)
    return f"{len(extra)} bytes appended"


def damage_trial(ref: dict, work: Path, rng: random.Random, i: int) -> dict:
    results = work / f"damage{i:02d}"
    run = results / NAME
    shutil.copytree(ref["run"], run)
    store = rng.choice(DAMAGED_STORES)
    files = sorted(p for p in (run / store).rglob("*") if p.is_file())
    while True:
        f, kind = rng.choice(files), rng.choice(DAMAGES)
        try:
            what = damage_file(f, kind, rng)
            break
        except ValueError:  # an empty file cannot be garbled or truncated
            continue
    rel = f.relative_to(run).as_posix()
    if store == P.TRACE:  # the trace is read only while fine.zarr is missing (a run killed in fine)
        shutil.rmtree(run / "fine.zarr")
        shutil.rmtree(run / "report")
    rc, out = run_cli(cmd(ref["cfg"], results), work / f"damage{i:02d}.log")
    stage = next((s for s, name in P.STORES.items() if name == store), "fine")
    if store == P.TRACE:
        detected = bool(re.search(rf"{re.escape(P.TRACE)}(: row \d+ of \d+ is damaged| was unreadable)", out))
        how = "trace cut back" if "is damaged" in out else "trace set aside" if detected else ""
        if detected and "starting over" in out:
            how += ", fine started over"
    else:
        set_aside = bool(list(run.glob(f".{store}.corrupt-*")))
        said = f"{run / store} was unreadable (corrupted" in out
        # the fine stage recomputes from its trace: "resumed in"
        recomputed = bool(re.search(rf"^\[{NAME}\] {stage}: (?:done|resumed) in", out, re.M))
        detected = set_aside and said and recomputed
        how = "set aside and recomputed" if detected else ""
    diff = compare(run, ref) if rc == 0 else f"rerun exit {rc}"
    t = {"trial": i, "store": store, "file": rel, "kind": kind, "what": what, "rerun_rc": rc, "detected": detected,
         "how": how, "identical": rc == 0 and not diff, "difference": diff}
    if not detected:
        t["undetected_why"] = undetected_why(store, rel, kind, out)
    return t


def undetected_why(store: str, rel: str, kind: str, out: str) -> str:
    if rel.endswith(S.MANIFEST) and kind == "delete":
        return "the manifest itself deleted: the store reads as 'unverified' (from before manifests) and is used"
    return "not detected"


def damages(ref: dict, work: Path, m: int, rng: random.Random, say=print) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(m):
        t = damage_trial(ref, work, rng, i)
        say(f"  damage {i + 1}/{m}: {t['kind']} {t['file']} ({t['what']}): "
            f"{t['how'] or 'NOT DETECTED (' + t.get('undetected_why', '') + ')'}; rerun exit {t['rerun_rc']}"
            f"{'' if t['identical'] else ', DIFFERS: ' + t['difference']}")
        out.append(t)
        shutil.rmtree(work / f"damage{i:02d}", ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ tmpfs
def can_mount(work: Path) -> bool:
    d = work / "mount-probe"
    d.mkdir(exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    subprocess.run(["umount", str(d)], capture_output=True)
    return True


@contextlib.contextmanager
def tmpfs(folder: Path, size_bytes: int):
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(size_bytes, 4096)}", "tmpfs", str(folder)], check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)


def remount(folder: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(folder)], check=True, capture_output=True)


def _error_lines(out: str, folder: Path, words: str) -> list[str]:
    return [m for m in out.splitlines() if words in m and str(folder) in m]


def enospc(ref: dict, work: Path, rng: random.Random, fractions=(0.1, 0.25, 0.4, 0.5, 0.55, 0.6, 0.65, 0.8), say=print) -> list[dict]:
    """A run into a tmpfs of ``fraction`` x the reference run's bytes each; then the tmpfs grown and the
    same command again."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    mounted = can_mount(work)
    for i, frac in enumerate(fractions):
        results = work / f"enospc{i}"
        if mounted:
            size = int(frac * ref["bytes"])
            with tmpfs(results, size):
                t = _enospc_trial(ref, work, results, i)
                t["tmpfs_bytes"] = size
                remount(results, "size=64m")
                rc, _ = run_cli(cmd(ref["cfg"], results), work / f"enospc{i}-b.log")
                t["after_space_freed_rc"] = rc
                t["difference_after"] = compare(results / NAME, ref) if rc == 0 else f"exit {rc}"
                t["identical_after"] = rc == 0 and not t["difference_after"]
        else:
            t = _enospc_injected(ref, work, results, i, frac)
        t["fraction"] = frac
        t["mode"] = "tmpfs" if mounted else "injected"
        say(f"  enospc {i + 1}/{len(fractions)} ({t['mode']}, {100 * frac:.0f} % of the run's bytes): exit {t['rc']}, "
            f"failed in {t['failed_in']}, {t['n_lines']} line(s) naming the folder, done {t['done']}"
            f"{', FALSE DONE: ' + t['false_done'] if t['false_done'] else ''}; after more space: exit "
            f"{t.get('after_space_freed_rc')}, identical {t.get('identical_after')} {t.get('difference_after') or ''}")
        out.append(t)
    return out


def _enospc_trial(ref, work, results, i):
    rc, out = run_cli(cmd(ref["cfg"], results), work / f"enospc{i}-a.log")
    lines = _error_lines(out, results, "no space left")
    return {"rc": rc, "n_lines": len(lines), "line": lines[0] if lines else "", "failed_in": _hit_stage(out, results / NAME),
            "done": done_stages(ref["cfg"], results), "false_done": nothing_false_done(ref["cfg"], results),
            "traceback": "Traceback" in out}


def _enospc_injected(ref, work, results, i, frac):
    """No mount: the run in-process, the n-th store write raising ENOSPC (n from ``frac``)."""
    from flows.cli import main

    calls = {"n": 0}
    limit = max(1, int(frac * 8))
    real = S.write_store

    def full(ds, store):
        calls["n"] += 1
        if calls["n"] >= limit:
            raise S.write_error(Path(store).parent, OSError(errno.ENOSPC, "No space left on device"))
        return real(ds, store)

    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        P.write_store, old = full, P.write_store
        try:
            rc = main(["run", str(ref["cfg"]), "--results", str(results)])
        finally:
            P.write_store = old
    out = buf.getvalue()
    lines = _error_lines(out, results, "no space left")
    t = {"rc": rc, "n_lines": len(lines), "line": lines[0] if lines else "", "failed_in": _hit_stage(out, results / NAME),
         "done": done_stages(ref["cfg"], results), "false_done": nothing_false_done(ref["cfg"], results),
         "traceback": "Traceback" in out}
    rc2, _ = run_cli(cmd(ref["cfg"], results), work / f"enospc{i}-b.log")
    t["after_space_freed_rc"] = rc2
    t["difference_after"] = compare(results / NAME, ref) if rc2 == 0 else f"exit {rc2}"
    t["identical_after"] = rc2 == 0 and not t["difference_after"]
    return t


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def readonly(ref: dict, work: Path, say=print) -> dict:
    """The finished reference run on a read-only tmpfs; the config edited (more iterations: fine and report
    recompute); ``qcbed run``."""
    work.mkdir(parents=True, exist_ok=True)
    data2 = work / "readonly-data"
    shutil.copytree(ref["cfg"].parent, data2, dirs_exist_ok=True)
    cfg2 = data2 / ref["cfg"].name
    text = cfg2.read_text()
    cfg2.write_text(re.sub(r"max_iterations = \d+", "max_iterations = 5", text))
    results = work / "readonly"
    if can_mount(work):
        with tmpfs(results, 64 << 20):
            shutil.copytree(ref["run"], results / NAME)
            remount(results, "ro")
            t = _readonly_trial(ref, cfg2, results, work)
            t["mode"] = "tmpfs remounted ro"
    else:
        shutil.copytree(ref["run"], results / NAME)
        t = _readonly_injected(ref, cfg2, results, work)
    say(f"  readonly ({t['mode']}): exit {t['rc']}, {t['n_lines']} line(s) naming the folder, earlier results "
        f"{'byte-identical' if t['unchanged'] else 'CHANGED'}, done {t['done']}"
        f"{', FALSE DONE: ' + t['false_done'] if t['false_done'] else ''}")
    return t


def _readonly_trial(ref, cfg2, results, work):
    before = _snapshot(results)
    rc, out = run_cli(cmd(cfg2, results), work / "readonly.log")
    lines = _error_lines(out, results, "read-only file system")
    return {"rc": rc, "n_lines": len(lines), "line": lines[0] if lines else "", "unchanged": _snapshot(results) == before,
            "done": done_stages(cfg2, results), "false_done": nothing_false_done(cfg2, results),
            "stale_after": [s for s in ("fine", "report") if s not in done_stages(cfg2, results)],
            "traceback": "Traceback" in out}


def _readonly_injected(ref, cfg2, results, work):
    """No mount: every write of the run (os.open for writing, mkdir, rename) raises EROFS, in-process."""
    import builtins
    import io

    from flows.cli import main

    before = _snapshot(results)
    real_open, real_osopen, real_mkdir, real_rename = builtins.open, os.open, os.mkdir, os.rename
    inside = str(results)

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def osopen(path, flags, *a, **k):
        if str(path).startswith(inside) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            ro()
        return real_osopen(path, flags, *a, **k)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        os.open = osopen
        try:
            rc = main(["run", str(cfg2), "--results", str(results)])
        finally:
            os.open = real_osopen
    out = buf.getvalue()
    lines = _error_lines(out, results, "read-only file system")
    return {"rc": rc, "n_lines": len(lines), "line": lines[0] if lines else "", "unchanged": _snapshot(results) == before,
            "done": done_stages(cfg2, results), "false_done": nothing_false_done(cfg2, results),
            "traceback": "Traceback" in out, "mode": "injected (os.open for writing raises EROFS)"}


# ------------------------------------------------------------------------------ sigint
def sigint(ref: dict, work: Path, say=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    import zarr

    results = work / "sigint"
    run = results / NAME
    args = cmd(ref["cfg"], results)
    p = start(args, work / "sigint-a.log")
    n, t0 = 0, time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        with contextlib.suppress(Exception):
            n = int(zarr.open_group(str(run / P.TRACE), mode="r").attrs.get("n_committed", 0))
        if n >= 2:
            break
        time.sleep(0.05)
    sent = p.poll() is None
    t1 = time.perf_counter()
    if sent:
        os.killpg(p.pid, signal.SIGINT)
    rc = finish(p, timeout=60)
    dt = time.perf_counter() - t1
    out = (work / "sigint-a.log").read_text()
    line = [m for m in out.splitlines() if m.startswith("qcbed: stopped by")]
    gone = group_gone(p.pid)
    t = {"sent_after_rows": n, "signal_sent": sent, "rc": rc, "exit_s": round(dt, 2), "line": line[0] if line else "",
         "n_lines": len(line), "says_command": bool(line) and f"qcbed run {ref['cfg']} --results {results}" in line[0],
         "group_gone": gone, "done": done_stages(ref["cfg"], results), "false_done": nothing_false_done(ref["cfg"], results),
         "traceback": "Traceback" in out}
    rc2, out2 = run_cli(args, work / "sigint-b.log")
    m = re.search(r"resuming after iteration (\d+)", out2)
    t.update({"rerun_rc": rc2, "resumed_after_iteration": int(m.group(1)) if m else None,
              "identical": rc2 == 0 and not compare(run, ref), "difference": compare(run, ref) if rc2 == 0 else ""})
    say(f"  sigint after {n} checkpoints: exit {rc} in {dt:.1f} s, line: {t['line'][:100]!r}; rerun exit {rc2}, resumed "
        f"after iteration {t['resumed_after_iteration']}, identical {t['identical']}")
    return t


# ------------------------------------------------------------------------------ plugin
def plugin(ref: dict, work: Path, say=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "plugin-cfg"
    folder.mkdir(parents=True, exist_ok=True)
    for f in ref["cfg"].parent.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    names = ["bad", "a", "b"]
    paths = []
    for n in names:
        shutil.copy(ref["cfg"], folder / f"{n}.toml")
        paths.append(folder / f"{n}.toml")
    (folder / "crash.py").write_text(CRASHING_METRIC)
    text = paths[0].read_text()
    paths[0].write_text(text.replace('gof = "Chi2_LARBED"', 'gof = "crash.py:Crash"').replace('optimizer = "nelder-mead"\n', ""))
    results = work / "plugin"
    t0 = time.perf_counter()
    rc, out = run_cli(cmd(paths, results, "--workers", "2"), work / "plugin.log")
    wall = time.perf_counter() - t0
    tail = out.splitlines()[-8:]
    rows = {ln.split()[0]: ln.split()[1] for ln in tail if ln.split()[:1] in (["a"], ["b"], ["bad"])}
    finished = [n for n in ("a", "b") if {"fine", "report"} <= set(done_stages(paths[names.index(n)], results))]
    failed_lines = [m for m in out.splitlines() if m.startswith("[bad] failed:")]
    t = {"rc": rc, "wall_s": round(wall, 1), "good_finished": finished, "summary": rows,
         "bad_failed_line": failed_lines[0] if failed_lines else "", "n_failed_lines": len(failed_lines),
         "error_log": (results / "bad" / "error.log").exists(), "bad_fine_done": (results / "bad" / "fine.zarr").exists(),
         "traceback_on_console": "Traceback" in out}
    say(f"  plugin: exit {rc} in {wall:.0f} s, good finished {finished}, summary {rows}")
    return t


# ------------------------------------------------------------------------------ the table
def _counts(items) -> str:
    from collections import Counter

    c = Counter(items)
    return ", ".join(f"{k} {v}" for k, v in c.items())


def figures(res: dict) -> list[str]:
    lines = []
    if "kills" in res:
        k = res["kills"]
        killed = [t for t in k if t["killed"]]
        order = ["start-up"] + list(STAGE_ORDER) + ["exit"]
        from collections import Counter

        c = Counter(t["stage"] for t in killed)
        where = ", ".join(f"{s} {c[s]}" for s in order if c[s])
        writes = sum(t["in_store_write"] for t in killed)
        lines.append(f"kills: {len(killed)} of {len(k)} runs killed at random moments ({where}; {writes} in a store "
                     f"write), {sum(t['resumed'] for t in k)} resumed, {sum(t['identical'] for t in k)} identical to the "
                     f"uninterrupted result, {sum(bool(t['false_done']) for t in k)} with a store marked done that is not "
                     f"complete")
    if "damages" in res:
        d = res["damages"]
        det = [t for t in d if t["detected"]]
        und = [t for t in d if not t["detected"]]
        used = [t for t in und if not t["identical"]]
        line = (f"damages: {len(d)} ({_counts(t['kind'] for t in d)}) over {len({t['store'] for t in d})} stores, "
                f"{len(det)} detected, {len(used)} used, {sum(t['identical'] for t in d)} identical final results")
        if und:
            line += f"; {len(und)} undetected: " + "; ".join(sorted({f"{t['file']} {t['kind']}: {t['undetected_why']}"
                                                                     for t in und}))
        lines.append(line)
    if "enospc" in res:
        e = res["enospc"]
        lines.append(f"enospc ({e[0]['mode']}): {len(e)} runs, {sum(t['rc'] == 2 for t in e)} exit 2, "
                     f"{sum(t['n_lines'] == 1 for t in e)} with one line naming the folder, failing in "
                     f"{_counts(t['failed_in'] for t in e)}; {sum(not t['false_done'] for t in e)} with nothing marked "
                     f"done that is not complete; {sum(bool(t.get('identical_after')) for t in e)} finished identical "
                     f"once there was space")
    if "readonly" in res:
        r = res["readonly"]
        lines.append(f"readonly ({r['mode']}): exit {r['rc']}, {r['n_lines']} line naming the folder, earlier results "
                     f"{'byte-identical' if r['unchanged'] else 'CHANGED'}, "
                     f"{'nothing' if not r['false_done'] else r['false_done']} marked done that is not complete "
                     f"(fine, report stale: {r['stale_after'] if 'stale_after' in r else '?'})")
    if "sigint" in res:
        s = res["sigint"]
        lines.append(f"sigint: exit {s['rc']} {s['exit_s']} s after the signal, {s['n_lines']} line "
                     f"({'with' if s['says_command'] else 'WITHOUT'} the command), "
                     f"{'nothing' if not s['false_done'] else s['false_done']} marked done that is not complete, "
                     f"rerun exit {s['rerun_rc']} resumed after iteration {s['resumed_after_iteration']}, "
                     f"{'identical' if s['identical'] else 'DIFFERENT'}")
    if "plugin" in res:
        p = res["plugin"]
        lines.append(f"plugin: batch of 3 with --workers 2: exit {p['rc']}, good patterns finished "
                     f"{len(p['good_finished'])} of 2, bad failed with {p['n_failed_lines']} line and error.log "
                     f"{'written' if p['error_log'] else 'MISSING'}, summary {p['summary']}")
    return lines


def run(kills_n=20, damages_m=20, seed=0, only=None, work=None, say=print) -> dict:
    rng = random.Random(seed)
    tmp = None
    if work is None:
        tmp = work = Path(tempfile.mkdtemp(prefix="qcbed-faults-"))
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    which = [only] if isinstance(only, str) else list(only or FAULTS)
    t0 = time.perf_counter()
    ref = reference(work)
    say(f"reference: one uninterrupted qcbed run in {ref['wall_s']:.1f} s, {ref['bytes']} bytes of results")
    res = {"reference_wall_s": round(ref["wall_s"], 2), "reference_bytes": ref["bytes"], "seed": seed}
    steps = {"readonly": lambda: readonly(ref, work, say), "sigint": lambda: sigint(ref, work, say),
             "plugin": lambda: plugin(ref, work, say), "enospc": lambda: enospc(ref, work, rng, say=say),
             "kills": lambda: kills(ref, work, kills_n, rng, say), "damages": lambda: damages(ref, work, damages_m, rng, say)}
    try:
        for name in steps:  # the short ones first
            if name in which:
                try:
                    res[name] = steps[name]()
                except Exception as exc:  # noqa: BLE001  -- one fault's bench failure is reported, the others run
                    import traceback

                    res.setdefault("bench_errors", {})[name] = traceback.format_exc()
                    say(f"  {name}: the bench failed: {type(exc).__name__}: {exc}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["figures"] = figures(res) + [f"bench error in {k}: {v.splitlines()[-1]}" for k, v in res.get("bench_errors", {}).items()]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--damages", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=FAULTS)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    a = ap.parse_args(argv)
    res = run(a.kills, a.damages, a.seed, a.only, a.keep)
    load = os.getloadavg()
    print(f"\nfault injection: {os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"seed {a.seed}, reference run {res['reference_wall_s']:.1f} s, all in {res['wall_s']:.0f} s")
    for line in res["figures"]:
        print(line)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
