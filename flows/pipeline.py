"""Prefect flows: one pattern's stage chain, many patterns in parallel through dask, scheduled folders.

* :func:`refine_pattern` (flow ``qcbed-pattern``): validates the config, locks ``results/<run>``,
  writes ``run.json`` and runs each stage of :mod:`stages.pipeline` as a Prefect task.  Tasks pass
  paths and keys only (never arrays); each stage skips itself when its store carries its key.
* :func:`refine_many` (flow ``qcbed-batch``): patterns run concurrently on a thread pool in this
  process; the heavy stages (coarse, fine) of each are handed to a dask cluster as plain functions
  (``client.submit``), so dask workers never need Prefect or its API.  A local cluster of
  ``n_workers`` single-threaded processes by default, or an existing scheduler (``dask_address``).
  (prefect-dask's DaskTaskRunner was measured to start one temporary Prefect server per worker
  without a Prefect server, 14.4 s against 4.05 s for four 2 s tasks: ../shared/research/stack.md §4.)
* :func:`facility_batch` (flow ``qcbed-facility``): every config of a folder that is not finished,
  refined through :func:`refine_many`; served on a cron schedule by ``qcbed serve``.

Prefect runs without a server (a temporary local one per process) and quietly: telemetry off, a
project ``PREFECT_HOME``; with ``PREFECT_API_URL`` set, runs appear in that server's UI.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # dask's scheduler/nanny/worker INFO lines (workers inherit the environment)
    "DASK_LOGGING__DISTRIBUTED": "warning",
}


def configure_environment(prefect_home: str | Path | None = None) -> None:
    """Offline-safe, quiet Prefect settings (user's own settings win); call before importing prefect."""
    for k, v in QUIET_PREFECT.items():
        os.environ.setdefault(k, v)
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        home = Path(prefect_home) if prefect_home else Path.home() / ".cache" / "qcbed" / "prefect"
        os.environ["PREFECT_HOME"] = str(home)
    if "PREFECT_HOME" in os.environ:
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(v, "1")


configure_environment()

import contextlib  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from stages import pipeline as P  # noqa: E402
from stages.errors import QcbedInputError  # noqa: E402
from stages.interrupt import Interrupted, on_force_exit, stop_on_signals  # noqa: E402

class _InputErrorFilter(logging.Filter):
    """Keep failures qcbed reports itself off the terminal: bad input (QcbedInputError, one line naming
    the field and the fix), a stop by a signal (Interrupted, one line saying how to continue), and the
    failure of a task or flow run (one line per run; its traceback goes to ``results/<run>/error.log``).
    Only console handlers get this filter; the Prefect API (UI) still receives the full record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (QcbedInputError, Interrupted)):
            return False
        if record.name.startswith(("prefect.task_runs", "prefect.flow_runs")) and record.levelno >= logging.ERROR:
            return False
        msg = record.getMessage()
        return "QcbedInputError" not in msg and "Interrupted" not in msg


def _filter_console_logs() -> None:
    for name in ("", "prefect"):
        for h in logging.getLogger(name).handlers:
            if "Console" in type(h).__name__ and not any(isinstance(f, _InputErrorFilter) for f in h.filters):
                h.addFilter(_InputErrorFilter())


_filter_console_logs()

@contextlib.contextmanager
def signals_blocked(signals=(signal.SIGINT,), ignore: bool = False):
    """Child processes started inside do not get the terminal's Ctrl-C: the terminal sends it to the
    whole process group, and Prefect's temporary server or a local dask worker killed by it leaves this
    process retrying the dead server for minutes or losing its workers mid-stage.  This process handles
    the signal itself and shuts its children down.

    The signal is blocked (POSIX signal masks survive fork and exec: enough for subprocess.Popen, e.g.
    Prefect's server); ``ignore`` also sets it to SIG_IGN for the duration, which multiprocessing's
    spawned children (dask's worker processes, which do not inherit the mask) keep, since Python
    installs no SIGINT handler over an ignored one.  A Ctrl-C meanwhile is then lost, so ``ignore``
    only around a short start-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in signals} if ignore else {}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_temporary_server() -> None:
    """Start Prefect's temporary server now, shielded from the terminal's Ctrl-C (:func:`signals_blocked`);
    it is stopped when this process exits (Prefect's atexit hook) or, on a second Ctrl-C, at once.
    Nothing to do with PREFECT_API_URL set (a real server) or the temporary server disabled."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    with signals_blocked():
        server.start()
    on_force_exit(_kill_temporary_server)


def _kill_temporary_server() -> None:
    from prefect.server.api.server import SubprocessASGIServer

    proc = SubprocessASGIServer().server_process
    if proc is not None and proc.poll() is None:
        proc.kill()


HEAVY = ("coarse", "fine")
_CLIENT: dict = {}  # the dask client of this process (set by refine_many)
_LOCK = threading.Lock()


def load_run_config(source: str | Path):
    """A RunConfig from a TOML file, or from a run record (``results/<run>/run.json``) for reruns.

    Validated before anything runs: every problem is reported together with its field path."""
    from stages import config as C

    source = Path(source)
    if source.name == P.RUN_RECORD or source.is_dir():
        import json

        rec_path = source / P.RUN_RECORD if source.is_dir() else source
        if not rec_path.exists():
            raise QcbedInputError(str(source), f"no {P.RUN_RECORD} here (not a qcbed run folder)",
                                  "give a folder results/<run> written by qcbed run")
        try:
            rec = json.loads(rec_path.read_text())
            cfg = C.RunConfig(Path(rec["config_path"]), P.tomllib_loads(rec["config_text"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QcbedInputError(str(rec_path), f"unreadable run record ({type(exc).__name__}: {exc})") from None
        cfg = C.validate_run_config(cfg)
        cfg.text = rec["config_text"]
        return cfg
    return C.validate_config(source)


ERROR_LOG = "error.log"
#: how often a resubmission follows a dask KilledWorker (the scheduler already reruns a stage whose
#: worker died; KilledWorker means it died ``distributed.scheduler.allowed-failures`` times)
RESUBMITS = 2


def _watch_remote_stop(event, finished: threading.Event) -> None:
    """On a dask worker: turn the batch's stop event (set by the main process on SIGINT/SIGTERM) into
    this process's stop flag, so the stage stops at its next check as it would in the main process."""
    from stages import interrupt

    while not finished.is_set():
        try:
            if event.wait(timeout=0.5):
                interrupt.request_stop("a stop of the batch")
                return
        except Exception:  # noqa: BLE001  -- scheduler gone: the worker is being shut down anyway
            return


def _remote_stage(config_source: str, run_dir: str, stage: str, stop_name: str | None = None) -> str:
    """A stage on a dask worker: one BLAS thread, paths in, status out; stops when the batch is stopped."""
    from threadpoolctl import threadpool_limits

    from stages import interrupt

    interrupt.reset()  # a long-lived worker process: an earlier batch's stop is not this one's
    finished = threading.Event()
    if stop_name:
        from distributed import Event, get_client

        threading.Thread(target=_watch_remote_stop, args=(Event(stop_name, client=get_client()), finished),
                         daemon=True, name="qcbed-stop-watch").start()
    try:
        with threadpool_limits(1, user_api="blas"):
            plan = P.make_plan(load_run_config(config_source), Path(run_dir).parent, run_dir=run_dir)
            return P.run_stage(plan, stage)
    except Exception as exc:  # noqa: BLE001  -- returned, not raised: see RemoteFailure
        return RemoteFailure(exc, traceback.format_exc())
    finally:
        finished.set()


class RemoteFailure:
    """A stage's exception on a dask worker, returned as its result: a raised one makes every worker
    log "Compute Failed" with its traceback on the batch's console; this way the main process raises it
    (with the worker's traceback for the run's error.log) and the console gets the run's one line."""

    def __init__(self, exc: BaseException, traceback_text: str):
        self.exc, self.traceback_text = exc, traceback_text

    def reraise(self):
        try:
            self.exc.remote_traceback = self.traceback_text
        except AttributeError:
            pass
        raise self.exc


def _await_remote(client, fut, stop_name: str | None, grace_s: float = 5.0):
    """The result of a stage's dask future, watching this process's stop flag meanwhile.

    On a stop: sets the batch's stop event (the stage stops at its next check, after its last
    checkpoint), waits up to ``grace_s`` for it, then cancels the future; raises Interrupted."""
    from distributed import Event
    from stages import interrupt

    while True:
        try:
            res = fut.result(timeout=0.5)
        except TimeoutError:
            res = None
        else:
            if isinstance(res, RemoteFailure):
                res.reraise()
            return res
        if interrupt.stop_requested():
            if stop_name:
                Event(stop_name, client=client).set()
            try:
                fut.result(timeout=grace_s)
            except Exception:  # noqa: BLE001  -- timed out, or cancelled: the cluster is closed next
                pass
            fut.cancel()
            raise Interrupted()


def submit_stage(client, config_source: str, run_dir: str, stage: str, stop_name: str | None = None,
                 resubmits: int = RESUBMITS, say=print) -> str:
    """A heavy stage on the dask cluster.  A worker that dies mid-stage costs its work since the last
    checkpoint only: dask reruns the stage on another worker, which resumes from the run's stores; after
    a KilledWorker (the stage's workers died too often) it is submitted again ``resubmits`` times."""
    from distributed import KilledWorker

    for attempt in range(resubmits + 1):
        fut = client.submit(_remote_stage, config_source, run_dir, stage, stop_name, pure=False)
        try:
            return _await_remote(client, fut, stop_name)
        except KilledWorker as exc:
            if attempt == resubmits:
                raise
            say(f"[{Path(run_dir).name}] {stage}: its dask workers died ({exc}); submitted again "
                f"({attempt + 1} of {resubmits}), resuming from the last checkpoint", flush=True)
    raise AssertionError("unreachable")


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(config_source: str, run_dir: str, stage: str, remote: bool = False) -> str:
    client = _CLIENT.get("client")
    if remote and client is not None and stage in HEAVY:
        return submit_stage(client, config_source, run_dir, stage, _CLIENT.get("stop_name"))
    plan = P.make_plan(load_run_config(config_source), Path(run_dir).parent, run_dir=run_dir)
    return P.run_stage(plan, stage)


def write_error_log(run_dir: Path, exc: BaseException) -> Path | None:
    """``results/<run>/error.log``: the traceback of the run's failure (the console gets one line)."""
    import datetime as dt

    path = Path(run_dir) / ERROR_LOG
    try:
        text = "".join(traceback.format_exception(exc))
        remote = getattr(exc, "remote_traceback", None)
        frames = [x.strip() for x in (remote or "").splitlines() if x.strip().startswith("File ")]
        if frames and frames[-1] not in text:  # dask may have carried the worker's frames already
            text += f"\nOn the dask worker:\n{remote}"
        P.atomic_write_text(path, f"{dt.datetime.now().isoformat(timespec='seconds')} {type(exc).__name__}: {exc}\n\n{text}")
    except OSError:
        return None
    return path


def failure_line(name: str, exc: BaseException, log: Path | None) -> str:
    """One console line for a failed run: the error, and where its traceback is."""
    if isinstance(exc, QcbedInputError):
        return f"[{name}] error: {exc}"
    first = (str(exc).strip().splitlines() or [""])[0]
    where = f" (traceback in {log})" if log is not None else ""
    return f"[{name}] failed: {type(exc).__name__}: {first}{where}"


@flow(name="qcbed-pattern", persist_result=False)
def refine_pattern(config_source: str, results_dir: str = "results", run_dir: str | None = None,
                   until: str | None = None, remote: bool = False) -> dict:
    """Every stage of one run, in order; returns {stage: 'skipped' | 'done' | 'resumed'}.

    SIGINT/SIGTERM stop it between steps (Interrupted, the stage in progress not written).  Any other
    failure leaves its traceback in ``<run>/error.log`` (removed when the run next succeeds)."""
    cfg = load_run_config(config_source)
    plan = P.make_plan(cfg, results_dir, run_dir=run_dir)
    out = {}
    with stop_on_signals(), P.RunLock(plan.run_dir):
        try:
            P.write_run_record(plan)
            for s in plan.stages:
                if plan.after(s, until):
                    break
                out[s] = stage_task.with_options(name=f"{s}")(str(config_source), str(plan.run_dir), s, remote)
        except Interrupted:
            raise
        except Exception as exc:
            exc.qcbed_error_log = write_error_log(plan.run_dir, exc)
            raise
        (plan.run_dir / ERROR_LOG).unlink(missing_ok=True)
    if "report" in out:
        publish_report_artifacts(plan.run_dir)
    return out


def artifact_key(run_name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) for a run."""
    import re

    base = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    return f"{base}-{suffix}"


def publish_report_artifacts(run_dir) -> list[str]:
    """The run's summary as Prefect artifacts (markdown ``<run>-report``, table ``<run>-structure-factors``),
    from ``report/results.json``; visible in the Prefect UI with the flow run.  Failures are logged as a
    warning, never raised: the report files are the record, artifacts a convenience copy."""
    run_dir = Path(run_dir)
    keys = []
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from stages.render import artifact_table, render_markdown
        from stages.summary import read_summary

        s = read_summary(run_dir)
        md = render_markdown(s) + f"\n\nFull report with figures: `{run_dir / 'report' / 'report.html'}`\n"
        k = artifact_key(run_dir.name, "report")
        create_markdown_artifact(key=k, markdown=md, description=f"qcbed report of {run_dir.name}")
        keys.append(k)
        k = artifact_key(run_dir.name, "structure-factors")
        create_table_artifact(key=k, table=artifact_table(s), description=f"refined structure factors of {run_dir.name}")
        keys.append(k)
    except Exception as exc:  # noqa: BLE001  -- never fail a finished run for its artifacts
        logging.getLogger("qcbed").warning("[%s] Prefect artifacts not published: %s: %s", run_dir.name,
                                           type(exc).__name__, exc)
    return keys


@task(cache_policy=NO_CACHE, persist_result=False)
def pattern_task(config_source: str, results_dir: str, until: str | None) -> dict:
    """One pattern of a batch; its failure, whatever it is, is its own: {'error': message} (one line in
    the console, the traceback in its error.log), and the other patterns go on.  A stop of the batch
    returns {'interrupted': signal}."""
    try:
        return refine_pattern(config_source, results_dir, until=until, remote=True)
    except Interrupted as exc:
        return {"interrupted": exc.signame}
    except Exception as exc:  # noqa: BLE001  -- isolation: one pattern's failure never stops the batch
        print(failure_line(Path(config_source).stem, exc, getattr(exc, "qcbed_error_log", None)), flush=True)
        return {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, QcbedInputError) else str(exc),
                "error_log": str(getattr(exc, "qcbed_error_log", None) or "")}


def dask_client(dask_address: str | None = None, n_workers: int = 2):
    """A dask Client: to an existing scheduler, or a local cluster of single-threaded worker processes."""
    from dask.distributed import Client, LocalCluster

    if dask_address:
        try:
            return Client(dask_address, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise QcbedInputError("--dask-address", f"cannot reach the dask scheduler {dask_address}: {exc}",
                                  "start it with `dask scheduler` and `dask worker ADDRESS`, or leave the option out") from None
    import dask

    # Worker processes: one BLAS thread each, the cores split among them for tile threads; no MALLOC_TRIM_THRESHOLD_ (dask's default of 64 kB
    # makes glibc return memory at once, so every large numpy temporary is a fresh mmap: the fine
    # refinement ran 13-17% slower on a worker than in a plain process); no statistical profiler
    # (it samples the worker's stack every 10 ms).
    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    env.update({"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1})
    # tile threads per worker (stages.simulate.solver_threads): the cores shared among the workers
    from stages.simulate import solver_threads

    env.setdefault("QCBED_THREADS", max(1, solver_threads() // max(1, int(n_workers))))
    dask.config.set({"distributed.nanny.pre-spawn-environ": env, "distributed.worker.profile.enabled": False})
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.WARNING)
    # not the default scheduler of this process: reads of stores in the main process stay local
    return Client(cluster, set_as_default=False)


@flow(name="qcbed-batch", persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=16))
def refine_many(config_sources: list[str], results_dir: str = "results", dask_address: str | None = None,
                n_workers: int = 2, until: str | None = None) -> dict:
    """Many patterns at once: {config: {stage: status} or {'error': message}}."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    import uuid

    with stop_on_signals():
        with _LOCK, signals_blocked(ignore=True):  # worker processes: the terminal's Ctrl-C is for this process
            client = dask_client(dask_address, n_workers)
            _CLIENT["client"] = client
            _CLIENT["stop_name"] = f"qcbed-stop-{uuid.uuid4().hex}"
        try:
            futures = {c: pattern_task.submit(str(c), results_dir, until) for c in config_sources}
            return {c: f.result() for c, f in futures.items()}
        finally:
            _close_client(client, dask_address)


def _close_client(client, dask_address) -> None:
    """Close the batch's client, and its local cluster (an external scheduler is left running)."""
    _CLIENT.pop("client", None)
    _CLIENT.pop("stop_name", None)
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None and not dask_address:
        cluster.close()


def pending_configs(config_dir: str | Path, results_dir: str | Path) -> tuple[list[str], list[str], dict]:
    """(configs with work left, configs finished, {config: error}) of a folder of *.toml files."""
    todo, done, bad = [], [], {}
    for path in sorted(Path(config_dir).glob("*.toml")):
        try:
            plan = P.make_plan(load_run_config(path), results_dir)
        except QcbedInputError as exc:
            bad[str(path)] = str(exc)
            continue
        states = [P.store_state(plan, s) for s in plan.stages]
        (done if all(s == "done" for s in states) else todo).append(str(path))
    return todo, done, bad


@flow(name="qcbed-facility", persist_result=False)
def facility_batch(config_dir: str, results_dir: str = "results", dask_address: str | None = None,
                   n_workers: int = 2) -> dict:
    """Refine every config in ``config_dir`` that is not finished; skip the finished ones."""
    todo, done, bad = pending_configs(config_dir, results_dir)
    print(f"[facility] {config_dir}: {len(todo)} to refine, {len(done)} finished, {len(bad)} invalid", flush=True)
    for c, e in bad.items():
        print(f"[facility] skipping invalid config {c}: {e}", flush=True)
    results = refine_many(todo, results_dir, dask_address, n_workers) if todo else {}
    return {"refined": todo, "skipped": done, "invalid": bad, "results": results}
