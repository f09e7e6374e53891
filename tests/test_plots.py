"""Report figures (stages.plots): image arrays equal fine.zarr's, every PNG written and valid,
byte-identical reruns, no coarse figure without coarse.zarr, line regions (CBED-like) and many disks."""

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from stages import config as C
from stages import pipeline as P
from stages import plots
from stages.store import write_store
from stages.synthetic import write_small_larbed_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a 9 x 9 grid region plus a slanted line region (a mixed ROI), and a CBED-like ROI of two lines
_MIXED = '{corners = [[-3.0, -4.0], [3.0, 4.0], [-2.0, -4.0]], samples = [7, 1]}'
_LINES = ('regions = [{corners = [[-4.0, 0.0], [4.0, 0.0], [-4.0, 1.0]], samples = [9, 1]}, '
          '{corners = [[0.0, -4.0], [0.0, 4.0], [1.0, -4.0]], samples = [9, 1]}]\n')
_COARSE = "\n[coarse]\nthickness_bracket_A = [800.0, 1000.0]\nbox_px = 4.0\nsearch_px = 2.0\n"


def _run(cfg: Path, results: Path) -> Path:
    plan = P.make_plan(C.load_config(cfg), results)
    P.run_all(plan, say=lambda m: None, until="fine")  # the report stage (which calls make_plots) is not needed
    return plan.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny LARBED runs (3 outer iterations each, a few seconds): 'grid' = 9x9 grid + a line region,
    no coarse; 'line' = two line regions per disk (as the CBED example) with a coarse stage."""
    d = tmp_path_factory.mktemp("plots")
    grid = write_small_larbed_run(d / "data", "grid", seed=2, size=16, roi_half=4, max_iterations=3)
    text = grid.read_text()
    text, n = re.subn(r"(regions = \[.*)\]\n", lambda m: m.group(1) + ", " + _MIXED + "]\n", text)
    assert n == 1
    grid.write_text(text)
    line = write_small_larbed_run(d / "data", "line", seed=3, size=16, roi_half=4, max_iterations=3)
    text, n = re.subn(r"regions = \[.*\]\n", _LINES, line.read_text())
    assert n == 1
    line.write_text(text + _COARSE)
    return {"grid": _run(grid, d / "results"), "line": _run(line, d / "results"), "tmp": d}


def _fine(run_dir):
    return xr.open_zarr(Path(run_dir) / "fine.zarr", consolidated=False, chunks=None).load()


def _png_ok(path: Path, min_w=500, max_w=1300):
    """A valid PNG (signature, IHDR, every chunk's CRC, IEND) of a sensible size; returns (w, h)."""
    b = path.read_bytes()
    assert b[:8] == PNG_MAGIC, path
    pos, kinds = 8, []
    while pos < len(b):
        n, kind = struct.unpack(">I4s", b[pos:pos + 8])
        data, crc = b[pos + 8:pos + 8 + n], struct.unpack(">I", b[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc, (path, kind)
        kinds.append(kind)
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    w, h = struct.unpack(">II", b[16:24])
    assert min_w <= w <= max_w and 200 <= h <= 4000, (path, w, h)
    assert 10_000 < len(b) < 3_000_000, (path, len(b))
    return w, h


def test_disk_images_equal_fine_store(runs):
    fine = _fine(runs["grid"])
    items = plots.disk_images(runs["grid"])
    # one 9x9 grid region (region 0) per disk; the line region (region 1) is not an image
    assert [it["region"] for it in items] == [0] * fine.sizes["disk"]
    sel = fine.region.values == 0
    i, j = fine.i.values[sel], fine.j.values[sel]
    for it in items:
        d = it["disk"]
        assert it["hkl"] == (int(fine.h[d]), int(fine.k[d]), int(fine.l[d]))
        assert it["shape"] == (9, 9)
        used = fine.fit_used.values[d, sel]
        for key, var in (("experimental", "fit_exp"), ("model", "fit_model"), ("residual", "fit_residual")):
            a = it[key]
            assert a.shape == (9, 9)
            np.testing.assert_array_equal(a[i, j][used], fine[var].values[d, sel][used])
            assert np.all(np.isnan(a[i, j][~used]))
        np.testing.assert_array_equal(it["difference"][i, j][used],
                                      fine.fit_exp.values[d, sel][used] - fine.fit_model.values[d, sel][used])
        np.testing.assert_array_equal(it["used"][i, j], used)
        # sigma recovered from |model - exp| / |residual| agrees with the residual's definition
        ok = used & (fine.fit_residual.values[d, sel] != 0)
        np.testing.assert_allclose(it["sigma"][i, j][ok] * np.abs(it["residual"][i, j][ok]),
                                   np.abs(it["difference"][i, j][ok]), rtol=1e-12)
    assert plots.disk_images(runs["line"]) == []  # line regions only


def test_make_plots_writes_valid_pngs_and_is_deterministic(runs):
    out = runs["tmp"] / "png"
    for name in ("grid", "line"):
        a = plots.make_plots(runs[name], out / name / "a")
        b = plots.make_plots(runs[name], out / name / "b")
        expected = {"disks", "profiles", "trace"} | ({"coarse"} if name == "line" else set())
        assert set(a) == expected, a
        for key, path in a.items():
            assert path == out / name / "a" / f"{key}.png" and path.is_file()
            _png_ok(path)
            assert path.read_bytes() == b[key].read_bytes(), f"{name}/{key}.png differs between two runs"
        assert sorted(p.name for p in (out / name / "a").iterdir()) == sorted(f"{k}.png" for k in expected)


def test_no_coarse_store_gives_no_coarse_figure(runs, tmp_path):
    assert not (runs["grid"] / "coarse.zarr").exists()
    assert plots.plot_coarse(runs["grid"], tmp_path / "coarse.png") is None
    assert not (tmp_path / "coarse.png").exists()
    assert plots.plot_coarse(runs["line"], tmp_path / "coarse.png") == tmp_path / "coarse.png"


def test_run_without_fit_or_trace(tmp_path):
    """An empty folder (no fine.zarr): nothing to plot, no error."""
    assert plots.make_plots(tmp_path / "nothing", tmp_path / "out") == {}
    assert plots.disk_images(tmp_path / "nothing") == []


def test_many_disks_split_into_numbered_figures(runs, tmp_path):
    """Many disks (GeSn has 27; here 15: the line run's fit tiled) -> disks-1.png, disks-2.png (at most
    14 disks per figure), profiles-1.png, profiles-2.png (two disks of two lines per figure row)."""
    src = runs["line"]
    run = tmp_path / "many"
    run.mkdir()
    fine = _fine(src)
    n = 15
    many = fine.isel(disk=np.arange(n) % fine.sizes["disk"]).assign_coords(
        h=("disk", np.arange(n) - 7), k=("disk", np.zeros(n, int)), l=("disk", np.zeros(n, int)))
    for v in many.variables.values():
        v.encoding = {}
    write_store(many, run / "fine.zarr")  # with its manifest, as the fine stage writes it
    roi = xr.open_zarr(src / "roi.zarr", consolidated=False, chunks=None).load()
    write_store(xr.Dataset(attrs={"regions": roi.attrs["regions"]}), run / "roi.zarr")
    disks = plots.plot_disks(run, tmp_path / "png" / "disks.png")
    profiles = plots.plot_profiles(run, tmp_path / "png" / "profiles.png")
    assert [p.name for p in disks] == ["disks-1.png", "disks-2.png"]
    assert [p.name for p in profiles] == ["profiles-1.png", "profiles-2.png"]
    for p in disks + profiles:
        _png_ok(p)
