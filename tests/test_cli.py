"""The ``qcbed`` command line: simulate outputs (JSON, zarr) and one-line errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from flows.cli import main

from .conftest import DATA


def test_simulate_json_and_zarr(tmp_path, capsys):
    js, zs = tmp_path / "out.json", tmp_path / "out.zarr"
    rc = main(["simulate", str(DATA / "si.cif"), "--hv", "200", "--zone", "1", "1", "0", "--thickness", "100:2000:100",
               "--beams", "0,0,0", "1,-1,1", "-1,1,-1", "0,0,2", "--absorption", "0.05", "--json", str(js), "--zarr", str(zs)])
    assert rc == 0
    rec = json.loads(js.read_text())
    for key in ("hv_kV", "zone", "beams", "thickness_A", "intensity", "scattering_table", "n_beams_matrix"):
        assert key in rec
    assert rec["hv_kV"] == 200 and rec["zone"] == [1, 1, 0] and rec["scattering_table"] == "peng"
    assert rec["beams"] == [[0, 0, 0], [1, -1, 1], [-1, 1, -1], [0, 0, 2]]
    assert rec["thickness_A"] == list(np.arange(100.0, 2001.0, 100.0))
    inten = np.array(rec["intensity"])
    assert inten.shape == (20, 4)
    assert inten[:, 1] == pytest.approx(inten[:, 2], abs=1e-10)  # mirror-related at the zone axis
    ds = xr.open_zarr(zs, consolidated=False)
    assert ds.intensity.dims == ("thickness", "beam")
    assert list(ds.h.values) == [0, 1, -1, 0] and ds.attrs["scattering_table"] == "peng"
    np.testing.assert_array_equal(ds.intensity.values, inten)
    assert "1 -1 1" not in capsys.readouterr().err


def test_dat_file_supplies_defaults(tmp_path):
    js = tmp_path / "o.json"
    assert main(["simulate", str(DATA / "si.dat"), "--thickness", "500", "-q", "--json", str(js)]) == 0
    rec = json.loads(js.read_text())
    assert rec["hv_kV"] == 200 and rec["zone"] == [1, 1, 0] and rec["x_axis"] == [1, -1, 1]
    assert abs(sum(rec["intensity"][0]) - 1) < 1e-10  # 'abs 0.0': no absorption


def test_kirkland_table_is_recorded(tmp_path):
    js = tmp_path / "o.json"
    main(["simulate", str(DATA / "si.toml"), "--hv", "300", "--zone", "0", "0", "1", "--thickness", "800",
          "--table", "kirkland", "--solver", "hermitian", "--kt", "0.1", "0.2", "0", "-q", "--json", str(js)])
    rec = json.loads(js.read_text())
    assert rec["scattering_table"] == "kirkland" and rec["solver"] == "hermitian" and rec["kt"] == [0.1, 0.2, 0.0]


@pytest.mark.parametrize("args, field", [
    (["--hv", "200", "--zone", "1", "1", "0.5", "--thickness", "100"], "zone"),
    (["--hv", "200", "--zone", "1", "1", "0", "--thickness", "-5:100:10"], "thickness"),
    (["--hv", "200", "--zone", "1", "1", "0", "--thickness", "abc"], "thickness"),
    (["--hv", "200", "--zone", "1", "1", "0", "--x-axis", "1", "1", "1", "--thickness", "100"], "x_axis"),
    (["--hv", "-200", "--zone", "1", "1", "0", "--thickness", "100"], "hv"),
    (["--zone", "1", "1", "0", "--thickness", "100"], "--hv"),
    (["--hv", "200", "--zone", "1", "1", "0", "--thickness", "100", "--beams", "1,0,0"], "beams"),
    (["--hv", "200", "--zone", "1", "1", "0", "--thickness", "100", "--beams", "1,0"], "--beams"),
    (["--hv", "200", "--zone", "1", "1", "0", "--thickness", "100", "--absorption", "lots"], "--absorption"),
])
def test_bad_arguments_one_line(args, field, capsys):
    assert main(["simulate", str(DATA / "si.toml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcbed: error: ") and field in err and "\n" not in err


def test_bad_crystal_files_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('cell = [5.43, 5.43, 5.43, 90, 90, 90]\nspacegroup = 227\n[[atoms]]\nlabel = "Qx"\nxyz = [0, 0, 0]\n')
    malformed = tmp_path / "cell.toml"
    malformed.write_text('cell = [5.43, 5.43, 90, 90, 90]\nspacegroup = 227\n[[atoms]]\nlabel = "Si"\nxyz = [0, 0, 0]\n')
    for path, field in ((bad, "element"), (malformed, "cell"), (tmp_path / "none.cif", "file not found")):
        r = subprocess.run([sys.executable, "-m", "flows.cli", "simulate", str(path), "--hv", "200", "--zone", "1", "1", "0",
                            "--thickness", "100"], capture_output=True, text=True)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and field in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_demo_writes_results(tmp_path):
    assert main(["demo", "--results", str(tmp_path), "--no-refine"]) == 0
    rec = json.loads((tmp_path / "demo" / "simulate.json").read_text())
    assert rec["absorption"] == "proportional" and len(rec["thickness_A"]) == 15
    assert (tmp_path / "demo" / "simulate.zarr" / "zarr.json").exists()


def test_absorption_per_reflection_file(tmp_path):
    ab = tmp_path / "abs.toml"
    ab.write_text("fraction = 0.02\n[[reflection]]\nhkl = [1, 1, 1]\nUprime = -8.0e-4\n")
    js = tmp_path / "o.json"
    assert main(["simulate", str(DATA / "si.toml"), "--hv", "200", "--zone", "1", "1", "0", "--thickness", "0:3000:1000",
                 "--absorption", str(ab), "-q", "--json", str(js)]) == 0
    total = np.array(json.loads(js.read_text())["intensity"]).sum(1)
    assert total[0] == pytest.approx(1.0) and np.all(np.diff(total) < 0)
    from flows.cli import _absorption

    model, frac, ups = _absorption(str(ab))
    assert model == "proportional" and frac == 0.02 and ups == {(1, 1, 1): -8.0e-4}
    bad = tmp_path / "bad.toml"
    bad.write_text("[[reflection]]\nhkl = [1, 1, 1]\n")
    assert main(["simulate", str(DATA / "si.toml"), "--hv", "200", "--zone", "1", "1", "0", "--thickness", "100",
                 "--absorption", str(bad)]) == 2


def test_warnings_of_a_command_are_shown_after_it_and_it_returns(monkeypatch, capsys):
    """A command that warns returns (the warnings recorded during it were re-emitted inside the recording
    context, so the list grew while it was read and `qcbed run` never exited after "finished"); a config
    warning is printed as one line, once; other warnings as Python shows them."""
    import warnings

    from flows import cli
    from stages.config import QcbedInputWarning

    def fake_status(args):
        warnings.warn("roi.disks[1]: 0 0 2 is kinematically absent", QcbedInputWarning)
        warnings.warn("roi.disks[1]: 0 0 2 is kinematically absent", QcbedInputWarning)
        warnings.warn("a library's own warning", RuntimeWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_status", fake_status)
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        assert cli.main(["status", "nowhere"]) == 0
    err = capsys.readouterr().err
    assert err.count("qcbed: warning: roi.disks[1]: 0 0 2 is kinematically absent") == 1
    assert [str(w.message) for w in outer] == ["a library's own warning"]
