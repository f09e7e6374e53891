"""Stopping a run cleanly on SIGINT / SIGTERM.

A signal only sets a process-wide flag (:data:`STOP`); the long loops (the tile loop of every
eigen-solve, the Nelder-Mead iterations, the Levenberg-Marquardt steps, the stage driver) call
:func:`check_stop` between units of work and raise :class:`Interrupted`.  Nothing is raised at an
arbitrary point, so a store is never half-written (stores are renamed into place, the fine trace
commits whole rows) and the stage whose work was abandoned never writes its store: its state stays
'pending' and the same ``qcbed run`` resumes from the last fine checkpoint.

A second signal while stopping exits at once (status 130) after running the registered
:func:`on_force_exit` hooks (e.g. stopping Prefect's temporary server, which would otherwise be
orphaned).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

#: set by a SIGINT / SIGTERM (or by :func:`request_stop`); checked by the loops
STOP = threading.Event()
EXIT_CODE = 130  # the shell's status of a process stopped by Ctrl-C
_state: dict = {"signal": None}
_force_exit_hooks: list = []


class Interrupted(Exception):
    """The run was stopped by a signal; the stage in progress was abandoned (its store not written).

    Not a QcbedInputError (nothing is wrong with the input) and never retried: the command line
    exits with status 130 and says how to continue."""

    def __init__(self, signame: str | None = None):
        self.signame = signame or _state["signal"] or "stop request"
        super().__init__(f"stopped by {self.signame}")

    def __reduce__(self):  # crosses process boundaries (a stage on a dask worker)
        return (Interrupted, (self.signame,))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def request_stop(signame: str = "stop request") -> None:
    """Ask every loop of this process to stop at its next check (what a signal does)."""
    if _state["signal"] is None:
        _state["signal"] = signame
    STOP.set()


def reset() -> None:
    """Forget an earlier stop request (a new task on a long-lived dask worker process)."""
    _state["signal"] = None
    STOP.clear()


def stop_requested() -> bool:
    return STOP.is_set()


def stop_signal() -> str:
    """What asked for the stop (e.g. 'SIGINT'), for the message."""
    return _state["signal"] or "a stop request"


def check_stop() -> None:
    """Raise :class:`Interrupted` when a stop was requested; called between units of work."""
    if STOP.is_set():
        raise Interrupted()


def on_force_exit(fn) -> None:
    """Run ``fn()`` before an immediate exit on a second signal (cleanup that must not be skipped)."""
    if fn not in _force_exit_hooks:
        _force_exit_hooks.append(fn)


def _write(msg: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print to the same stream
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())


def _handler(signum, frame) -> None:  # noqa: ARG001
    name = signal_name(signum)
    if not STOP.is_set():
        request_stop(name)
        _write(f"\nqcbed: {name} received, stopping after the current step (again to exit at once)\n")
        return
    _write(f"\nqcbed: second {name}, exiting now\n")
    for fn in list(_force_exit_hooks):
        with contextlib.suppress(Exception):
            fn()
    os._exit(EXIT_CODE)


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM set :data:`STOP` instead of killing the process, for the duration.

    Only the main thread can install handlers; elsewhere this does nothing (the main thread's handlers
    serve the whole process).  Prefect's flow engine installs its own SIGTERM handler (raising
    TerminationSignal at an arbitrary point), so this is entered inside the flow body; the previous
    handlers come back on exit, unless a stop was requested."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        # after a stop the process is on its way out (Prefect's server and the dask cluster are shut down
        # after this block): keep the handler, so that a second signal then still exits at once with its
        # line, not with a KeyboardInterrupt traceback from inside that shutdown
        if not STOP.is_set():
            for s, h in old.items():
                signal.signal(s, h)
