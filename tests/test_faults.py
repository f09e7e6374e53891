"""The fault-injection suite (bench/faults.py, issue 16 item 7) with small counts: every kill -9 resumes to
the uninterrupted result bit for bit, every damaged store is detected (its bytes never used), a full disk,
a read-only results folder and Ctrl-C leave nothing marked done that is not complete, a crashing plugin
fails its pattern alone.  Real `qcbed run` processes of one tiny refinement (about 25 s uninterrupted
on 2 cores); the full-size figures: `python bench/faults.py` (README, Reliability)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "faults.py"


def _bench():
    if "qcbed_bench_faults" in sys.modules:
        return sys.modules["qcbed_bench_faults"]
    spec = importlib.util.spec_from_file_location("qcbed_bench_faults", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qcbed_bench_faults"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted `qcbed run` of the bench's tiny refinement: its wall time and numbers."""
    return _bench().reference(tmp_path_factory.mktemp("faults"))


@pytest.mark.slow
def test_kills_resume_to_the_identical_result(ref, tmp_path):
    fb = _bench()
    trials = fb.kills(ref, tmp_path, 4, random.Random(3), say=print)
    assert any(t["killed"] for t in trials), trials
    for t in trials:
        assert not t["false_done"], t
        assert t["resumed"] and t["identical"], t


@pytest.mark.slow
def test_damages_are_detected_and_never_used(ref, tmp_path):
    fb = _bench()
    trials = fb.damages(ref, tmp_path, 8, random.Random(11), say=print)
    for t in trials:
        assert t["detected"], t
        assert t["rerun_rc"] == 0 and t["identical"], t


@pytest.mark.slow
def test_full_disk_marks_nothing_done_that_is_incomplete(ref, tmp_path):
    fb = _bench()
    trials = fb.enospc(ref, tmp_path, random.Random(0), fractions=(0.1, 0.5, 0.8), say=print)
    for t in trials:
        assert t["rc"] == 2 and t["n_lines"] == 1 and not t["traceback"], t
        assert not t["false_done"], t
        assert t["after_space_freed_rc"] == 0 and t["identical_after"], t


@pytest.mark.slow
def test_read_only_results_and_ctrl_c(ref, tmp_path):
    fb = _bench()
    r = fb.readonly(ref, tmp_path / "ro", say=print)
    assert r["rc"] == 2 and r["n_lines"] == 1 and r["unchanged"] and not r["false_done"] and not r["traceback"], r
    s = fb.sigint(ref, tmp_path / "int", say=print)
    assert s["signal_sent"] and s["rc"] == 130 and s["n_lines"] == 1 and s["says_command"], s
    assert not s["false_done"] and "fine" not in s["done"] and not s["traceback"], s
    assert s["rerun_rc"] == 0 and s["identical"], s


@pytest.mark.slow
def test_crashing_plugin_in_a_batch_fails_alone(ref, tmp_path):
    p = _bench().plugin(ref, tmp_path, say=print)
    assert p["rc"] == 1 and sorted(p["good_finished"]) == ["a", "b"], p
    assert p["summary"] == {"bad": "failed", "a": "finished", "b": "finished"} and p["error_log"], p
    assert p["n_failed_lines"] == 1 and not p["bad_fine_done"] and not p["traceback_on_console"], p
