"""Stage keys cover every input: each config field of the shipped examples is changed in turn to another
valid value, and exactly the stages that read it (and those downstream of them) get a new key.

The expectation per field is stated here from what each stage's code reads (stages/pipeline.py compute_*,
sized_model, fine_problem), independently of the product's table (pipeline.READS)."""

import copy
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from stages import config as C
from stages import pipeline as P

from .conftest import ROOT

LOADED = {"load", "roi", "variance", "coarse", "fine", "report"}  # everything downstream of pattern.zarr
GEOMETRY = {"roi", "coarse", "fine", "report"}  # the pattern geometry: roi, and coarse through roi
SOLVE = {"coarse", "fine", "report"}  # the Bloch-wave solves only
IAM = {"iam", "coarse", "fine", "report"}  # the structure factors and the solves
FINE = {"fine", "report"}
#: field (list indices dropped; the longest prefix applies) -> the stages whose key must change
EXPECTED = {
    "crystal": {"roi", "iam", "coarse", "fine", "report"},
    "microscope": GEOMETRY,
    "microscope.hv_kV": {"roi", "iam", "coarse", "fine", "report"},
    "simulation": SOLVE,
    "simulation.scattering_table": IAM, "simulation.absorption": IAM, "simulation.absorption_fraction": IAM,
    "pattern": LOADED,
    "pattern.data_source": set(),
    "geometry": GEOMETRY,
    "roi": GEOMETRY,
    "roi.disks": {"roi", "iam", "coarse", "fine", "report"},
    "refine": FINE,
    "refine.reflections.hkl": {"iam", "fine", "report"},
    "refine.psf_sigma": SOLVE, "refine.psf_gamma": SOLVE,
    "coarse": SOLVE,
    "run": set(),
}
#: fields with no other valid value in these configs (a CBED pattern is not a LARBED one)
UNPERTURBABLE = {"pattern.kind"}
CHOICES = {"simulation.scattering_table": ["kirkland", "peng"], "simulation.absorption": ["bird_king", "none", "proportional"],
           "simulation.solver": ["hermitian", "auto", "general"], "simulation.laue_zones": ["auto", "holz", "zolz"],
           "pattern.kind": ["larbed", "cbed"], "refine.gof": ["Chi2", "Chi2_multibackground", "Chi2_LARBED"],
           "refine.optimizer": ["nelder-mead", "levenberg-marquardt"], "run.name": ["other_name", "si"],
           "pattern.data_source": ["ask the beamline", "see README"],
           "coarse.background": ["joint", "per_disk"]}
LISTS = {"refine.geometry": [["thickness", "shift"], ["thickness", "gl", "shift"]],
         "refine.reflections.refine": [["U", "Uprime"], ["Uprime"]]}
MILLER = re.compile(r"^(microscope\.(zone|x_axis)|roi\.disks\[\d+\]|pattern\.hkl\[\d+\]|refine\.reflections\[\d+\]\.hkl|"
                    r"coarse\.disks\[\d+\])$")
FILES = {"crystal.file", "pattern.file", "pattern.variance"}
EXTRAS = {"run": {"name": "si"}, "refine": {"max_iterations": 50, "gauss_newton_steps": 2},
          "simulation": {"beam_accuracy": 0.005}, "pattern": {"data_source": "see README"}}
COARSE_LARBED = {"enabled": True, "thickness_bracket_A": [700.0, 1000.0], "box_px": 4.0, "search_px": 2.0}


def _expected(path: str, cfg_data: dict) -> set:
    bare = re.sub(r"\[\d+\]", "", path)
    while bare not in EXPECTED:
        bare = bare.rpartition(".")[0]
    out = set(EXPECTED[bare])
    if not cfg_data.get("coarse"):
        out.discard("coarse")
    return out


def _leaves(d, prefix=""):
    """(path, value) of every leaf: scalars and lists of scalars (a vector is one value)."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(d, list) and d and isinstance(d[0], (dict, list)):
        for i, v in enumerate(d):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, d


def _set(d, path, value):
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    for p in parts[:-1]:
        d = d[int(p[1:-1])] if p.startswith("[") else d[p]
    last = parts[-1]
    if last.startswith("["):
        d[int(last[1:-1])] = value
    else:
        d[last] = value


def _candidates(path, v):
    return [c for c in _alternatives(path, v) if c != v]


def _alternatives(path, v):
    if re.sub(r"\[\d+\]", "", path) in LISTS:
        return LISTS[re.sub(r"\[\d+\]", "", path)]
    if path in CHOICES:
        return [c for c in CHOICES[path] if c != v]
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1]
    if isinstance(v, float):
        return [v * 1.05, v * 0.95] if v else [0.5, 1.0]
    if MILLER.match(path):
        return [[-x for x in v], [2 * x for x in v], [3, -3, -3], [2, -2, 0]]
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        if all(isinstance(x, int) for x in v):
            return [[v[0] + 1, *v[1:]], [v[0] - 1, *v[1:]]]
        return [[x * 1.05 for x in v], [x * 0.95 for x in v], [x + 0.5 for x in v]]
    return []


def _valid(path: Path, data: dict) -> bool:
    try:
        C.validate_run_config(C.RunConfig(path, data), require=("refine",))
        return True
    except C.QcbedInputError:
        return False


def _changed(a: P.Plan, b: P.Plan) -> set:
    return {s for s in set(a.keys) | set(b.keys) if a.keys.get(s) != b.keys.get(s)}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Copies of the shipped examples (their files may be rewritten here): si_cbed with the optional fields
    no example sets, si_larbed as shipped, and si_larbed with a coarse stage (which reads the PSF start)."""
    root = tmp_path_factory.mktemp("ex")
    shutil.copy(ROOT / "data" / "si.cif", root / "si.cif")
    out = []
    for name, extra in (("si_cbed", EXTRAS), ("si_larbed", {}), ("si_larbed", {"coarse": COARSE_LARBED})):
        d = root / f"{name}{len(out)}"
        shutil.copytree(ROOT / "data" / name, d)
        data = tomllib.loads((d / "config.toml").read_text())
        for s, t in extra.items():
            data.setdefault(s, {}).update(copy.deepcopy(t))
        path = (d / "config.toml").resolve()
        assert _valid(path, data), name
        out.append((path, data))
    return out


def _rewrite(path: Path) -> None:
    """Another valid content for a data file."""
    if path.suffix == ".npy":
        np.save(path, np.load(path) * 1.01)
    else:
        path.write_text(path.read_text() + "# edited\n")


def test_every_field_rekeys_exactly_its_readers(examples):
    walked = set()
    for path, data in examples:
        base = P.make_plan(C.RunConfig(path, data), path.parent / "results")
        for leaf, v in _leaves(data):
            want = _expected(leaf, data)
            if leaf in FILES:  # the key follows the bytes of the file, not its name
                f = path.parent / v
                keep = f.read_bytes()
                _rewrite(f)
                try:
                    got = _changed(base, P.make_plan(C.RunConfig(path, data), path.parent / "results"))
                finally:
                    f.write_bytes(keep)
                assert got == want, f"{path.parent.name}: {leaf} (content): {sorted(got)} != {sorted(want)}"
                twin = f.with_name("renamed_" + f.name)
                shutil.copy(f, twin)
                moved = copy.deepcopy(data)
                _set(moved, leaf, str(Path(v).parent / twin.name))
                same = _changed(base, P.make_plan(C.RunConfig(path, moved), path.parent / "results"))
                twin.unlink()
                assert same == set(), f"{leaf}: the same bytes under another name re-keyed {sorted(same)}"
                walked.add(leaf)
                continue
            for new in _candidates(leaf, v):
                edited = copy.deepcopy(data)
                _set(edited, leaf, new)
                if _valid(path, edited):
                    break
            else:
                assert leaf in UNPERTURBABLE, f"{path.parent.name}: no valid other value for {leaf} = {v!r}"
                continue
            plan = P.make_plan(C.RunConfig(path, edited), path.parent / "results")
            got = _changed(base, plan)
            assert got == want, f"{path.parent.name}: {leaf} = {v!r} -> {new!r}: {sorted(got)} != {sorted(want)}"
            budget = leaf in ("refine.max_iterations", "refine.gauss_newton_steps")
            assert (plan.trace_key != base.trace_key) == ("fine" in want and not budget), leaf
            walked.add(re.sub(r"\[\d+\]", "", leaf))
    # the walk reached the fields this test is about
    for f in ("refine.psf_sigma", "coarse.thickness_bracket_A", "run.name", "pattern.data_source", "crystal.file",
              "refine.reflections.hkl", "refine.reflections.U_range", "refine.max_iterations", "roi.padding"):
        assert f in walked, f


def test_coarse_refine_rekeys_iam_and_comments_rekey_nothing(examples):
    path, data = examples[2]
    text = (path.parent / "config.toml").read_text()
    commented = tomllib.loads(text.replace("[roi]", "# a note\n[roi]  # more"))
    a = P.make_plan(C.RunConfig(path, tomllib.loads(text)), path.parent)
    assert a.keys == P.make_plan(C.RunConfig(path, commented), path.parent).keys
    # with coarse.refine the IAM is that of the refined model: a coarse field re-keys it too
    ref = copy.deepcopy(data)
    ref["coarse"]["refine"] = ["B"]
    before = P.make_plan(C.RunConfig(path, ref), path.parent)
    ref["coarse"]["search_px"] = 3.0
    assert _changed(before, P.make_plan(C.RunConfig(path, ref), path.parent)) == {"coarse", "iam", "fine", "report"}


def test_the_table_and_the_expectations_cover_every_schema_field():
    for s, table in C.SCHEMA.items():
        for k in table.keys:
            P.readers(f"{s}.{k}")  # KeyError: a field no entry of pipeline.READS covers
            assert _expected(f"{s}.{k}", {"coarse": {"enabled": True}}) is not None


@pytest.mark.slow
def test_status_and_summary_judge_by_the_config_as_it_is_now(tmp_path, capsys):
    """After a config edit, ``qcbed status`` names the stale stages and the changed config (not "finished"
    from run.json), and ``run --until variance`` does not print the earlier refinement as its summary."""
    from flows.cli import main
    from stages.synthetic import write_small_larbed_run

    cfg = write_small_larbed_run(tmp_path / "cfg", "tiny", seed=2, size=16, roi_half=4, max_iterations=3)
    results = tmp_path / "results"
    plan = P.make_plan(C.load_config(cfg), results)
    P.run_all(plan, say=lambda m: None)
    P.write_run_record(plan)
    assert main(["status", str(results)]) == 0
    assert "tiny: finished" in capsys.readouterr().out

    text = cfg.read_text()
    assert "max_iterations = 3" in text
    cfg.write_text(text.replace("max_iterations = 3", "max_iterations = 4"))
    assert main(["status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "finished" not in out and "fine stale" in out and "report stale" in out and "variance done" in out
    assert "stale (fine, report: the config changed since the run" in out and "changed since the run" in out
    assert "last checkpoint: iteration 3" in out  # the checkpoints do not depend on the iteration budget

    assert main(["run", str(cfg), "--results", str(results), "--until", "variance"]) == 0
    out = capsys.readouterr().out
    assert "no current refinement: fine and report" in out and "±" not in out
    # run.json now records the edited config; the stale stages are still named (from an earlier config)
    assert main(["status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "stale (fine, report: computed from an earlier config or inputs" in out and "finished" not in out
