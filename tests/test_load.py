"""Load stage: image formats, file-name indexing, [pattern] tables, the real GeSn LACBED set."""

import json

import numpy as np
import pytest
import tifffile

from stages.errors import QcbedInputError
from stages.load import hkl_from_filename, load_pattern, read_image
from stages.physics.deconvolution import make_blur, prepare_kernel
from stages.store import open_store, write_store
from .conftest import SHARED

GESN = SHARED / "data" / "gesn-lacbed"
needs_gesn = pytest.mark.skipif(not (GESN / "GeSn_+0+0+0.dm3").is_file(),
                                reason="../shared/data/gesn-lacbed not present")
YAG = dict(gain=2.2, mixing=0.111, A=1.2, delta=4e-5, background_variance=3.15)


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg and "Error" not in msg
    return msg


def _img(shape=(12, 15), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000 + 1).astype(dtype)


# ----------------------------------------------------------------------------- file names
@pytest.mark.parametrize("name, hkl", [
    ("GeSn_+1+1-3.dm3", (1, 1, -3)),
    ("LiNbO3_+0+0-12.dm3", (0, 0, -12)),
    ("GeSn_+0+0+0.dm3", (0, 0, 0)),
    ("GeSn_-2-2+0.dm3", (-2, -2, 0)),
    ("X_+1+1+12.npy", (1, 1, 12)),        # Felix's substring match took this for +1+1+1
    ("X_+1+1+1.npy", (1, 1, 1)),
    ("dir+1+1/img_+3-1+0.tif", (3, -1, 0)),
    ("Si2_+1+1+1", (1, 1, 1)),
    ("pattern.dm3", None),
    ("X_+1+1.dm3", None),
    ("X_+1+1+1+1.dm3", None),             # four signed integers: ambiguous
    ("X_+1+1+1_b.dm3", None),             # not at the end of the stem
    ("X_1+1+1.dm3", None),                # h unsigned
])
def test_hkl_from_filename(name, hkl):
    assert hkl_from_filename(name) == hkl


# ----------------------------------------------------------------------------- formats
def test_npy_round_trip(tmp_path):
    a = _img()
    np.save(tmp_path / "a.npy", a)
    data, cal = read_image(tmp_path / "a.npy")
    assert data.dtype == np.float64 and cal["dtype"] == "float32" and cal["format"] == "npy"
    np.testing.assert_array_equal(data, a)
    assert cal["calibrated"] is False and [x["name"] for x in cal["axes"]] == ["y", "x"]
    np.save(tmp_path / "s.npy", _img((1, 1, 4, 5)))               # leading singletons are dropped
    assert read_image(tmp_path / "s.npy")[0].shape == (4, 5)


def test_tiff_round_trip(tmp_path):
    a = _img(dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a)
    data, cal = read_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(data, a)
    assert cal["dtype"] == "uint16"
    stack = _img((3, 8, 9), dtype=np.float32)
    tifffile.imwrite(tmp_path / "s.tiff", stack, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "s.tiff")[0], stack)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(QcbedInputError, match=r"rgb\.tif: is a colour image"):
        read_image(tmp_path / "rgb.tif")


@pytest.mark.parametrize("dtype, order, offset, shape", [
    ("float32", "big", 0, [12, 15]),      # PyExtal's si04.img layout (big-endian float32)
    ("uint16", "little", 128, [12, 15]),
    ("float64", "little", 7, [3, 12, 15]),
    ("int32", "big", 0, [12, 15]),
])
def test_raw_round_trip(tmp_path, dtype, order, offset, shape):
    a = _img(tuple(shape), dtype=np.dtype(dtype))
    path = tmp_path / "p.img"
    path.write_bytes(b"\x01" * offset + a.astype(np.dtype(dtype).newbyteorder("<" if order == "little" else ">"))
                     .tobytes())
    raw = {"offset": offset, "dtype": dtype, "byte_order": order, "shape": shape}
    data, cal = read_image(path, raw)
    np.testing.assert_array_equal(data, a)
    assert cal["format"] == "raw" and cal["dtype"] == dtype
    # any extension is raw when a layout is given
    (tmp_path / "p.dat").write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_image(tmp_path / "p.dat", raw)[0], a)


def test_raw_errors(tmp_path):
    path = tmp_path / "p.img"
    path.write_bytes(np.zeros(100, np.float32).tobytes())
    good = {"dtype": "float32", "byte_order": "little", "shape": [10, 10]}
    assert read_image(path, good)[0].shape == (10, 10)
    with pytest.raises(QcbedInputError, match=r"p\.img: has 400 bytes, but offset 16 \+ 10 x 10 values x 4 bytes "
                                              r"\(float32\) = 416 bytes \(check raw\.shape"):
        read_image(path, dict(good, offset=16))
    with pytest.raises(QcbedInputError, match=r"p\.img: raw binary needs its layout"):
        read_image(path)
    cases = [({"byte_order": "little", "shape": [10, 10]}, r"raw\.dtype: missing"),
             (dict(good, dtype="<f4"), r"raw\.dtype: '<f4' carries a byte order"),
             (dict(good, dtype="complex64"), r"raw\.dtype: 'complex64' is not a real numeric dtype"),
             (dict(good, dtype="floaty"), r"raw\.dtype: 'floaty' is not a real numeric dtype"),
             (dict(good, byte_order="native"), r"raw\.byte_order: must be"),
             (dict(good, shape=[10]), r"raw\.shape: must be \[rows, cols\]"),
             (dict(good, shape=[10, 0]), r"raw\.shape"),
             (dict(good, offset=-1), r"raw\.offset: must be an integer >= 0"),
             (dict(good, header=1), r"raw\.header: unknown key \(allowed keys: offset, dtype, byte_order, shape\)")]
    for raw, match in cases:
        with pytest.raises(QcbedInputError, match=match) as e:
            read_image(path, raw)
        _one_line(e)


def test_read_errors(tmp_path):
    with pytest.raises(QcbedInputError, match=r"nope\.npy: file not found") as e:
        read_image(tmp_path / "nope.npy")
    _one_line(e)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(QcbedInputError, match=r"a\.png: unknown image format '\.png' \(use one of \.npy, \.tif"):
        read_image(tmp_path / "a.png")
    for name in ("bad.npy", "bad.tif", "bad.dm3"):
        (tmp_path / name).write_bytes(b"this is not an image" * 10)
        with pytest.raises(QcbedInputError, match=rf"bad\.{name[4:]}: cannot read as ") as e:
            read_image(tmp_path / name)
        _one_line(e)
    with pytest.raises(QcbedInputError, match=r"bad\.npy: cannot read as a NumPy \.npy file: no NumPy header"):
        read_image(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(QcbedInputError, match=r"obj\.npy: cannot read as a NumPy \.npy file"):
        read_image(tmp_path / "obj.npy")
    np.save(tmp_path / "c.npy", np.ones((4, 4), np.complex64))
    with pytest.raises(QcbedInputError, match=r"c\.npy: holds complex64 values, not real numbers"):
        read_image(tmp_path / "c.npy")
    np.save(tmp_path / "v.npy", np.ones(5))
    with pytest.raises(QcbedInputError, match=r"v\.npy: has shape \(5,\)"):
        read_image(tmp_path / "v.npy")


# ----------------------------------------------------------------------------- real .dm3
@needs_gesn
def test_dm3_reads_real_gesn_file():
    path = GESN / "GeSn_+0+0+0.dm3"
    data, cal = read_image(path)
    assert data.shape == (150, 150) and cal["dtype"] == "uint16" and cal["format"] == "dm3"
    # independent of rosettasciio's decoding: the DM3 tags put the 150 x 150 little-endian uint16
    # block at byte 71173 of this file
    direct = np.fromfile(path, "<u2", count=150 * 150, offset=71173).reshape(150, 150)
    np.testing.assert_array_equal(data, direct)
    assert int((data == 0).sum()) == 450 and data.max() == 65473
    # no calibration is stored (data/README.md): scale 1, offset 0, no units
    assert cal["calibrated"] is False
    assert [(a["name"], a["scale"], a["offset"], a["units"]) for a in cal["axes"]] == \
        [("y", 1.0, 0.0, ""), ("x", 1.0, 0.0, "")]


@needs_gesn
def test_gesn_stack_loads():
    ds = load_pattern({"kind": "larbed", "files": "GeSn_*.dm3", "zero_is_unrecorded": True}, GESN)
    assert ds.intensity.dims == ("disk", "y", "x") and ds.intensity.shape == (27, 150, 150)
    assert ds.attrs["dtype"] == "uint16" and ds.attrs["shape"] == [27, 150, 150]
    assert ds.attrs["files"][0] == "GeSn_+0+0+0.dm3" and len(ds.attrs["files"]) == 27
    hkl = {tuple(int(v) for v in r) for r in np.stack([ds.h.values, ds.k.values, ds.l.values], 1)}
    assert len(hkl) == 27 and {(1, 1, -3), (0, 0, 0), (-2, -2, 0), (0, 0, 6), (3, 3, -5)} <= hkl
    assert ds.h.dtype == np.int64
    # zeros = unrecorded tilts: 62762 of 607500 pixels (10.33%), from 0 (0 0 -6) to 7469 (1 1 +-5)
    assert ds.attrs["n_invalid"] == 62762
    assert int((~ds.valid).sum()) == 62762 and 0.10 < 62762 / ds.valid.size < 0.11
    per_disk = (~ds.valid).sum(("y", "x")).values
    by_hkl = dict(zip(zip(ds.h.values.tolist(), ds.k.values.tolist(), ds.l.values.tolist()), per_disk.tolist()))
    assert by_hkl[(0, 0, -6)] == 0 and by_hkl[(1, 1, 5)] == 7469 and by_hkl[(0, 0, 0)] == 450
    # data/README.md: 0 0 -2 is the up-down flip of 0 0 2 (checks the hkl <-> file <-> row mapping)
    i2, im2 = (int(np.flatnonzero((ds.h.values == 0) & (ds.k.values == 0) & (ds.l.values == s))[0]) for s in (2, -2))
    np.testing.assert_array_equal(ds.intensity.values[im2], ds.intensity.values[i2][::-1])
    cal = json.loads(ds.attrs["calibration"])
    assert cal["calibrated"] is False and cal["files_differing"] == []
    assert ds.intensity.attrs["units"] == "counts"
    plain = load_pattern({"kind": "larbed", "files": "GeSn_*.dm3"}, GESN)
    assert plain.attrs["n_invalid"] == 0


# ----------------------------------------------------------------------------- CBED tables
def test_cbed_with_variance_mask_and_detector(tmp_path):
    a = _img((20, 30), dtype=np.uint16).astype(np.uint16)
    a[0, :5] = 0
    var = a.astype(np.float64) * 2.0
    mask = np.ones(a.shape, np.uint8)
    mask[10:12, 10:13] = 0
    var[5, 5] = np.nan
    np.save(tmp_path / "cbed.npy", a)
    np.save(tmp_path / "var.npy", var)
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    ds = load_pattern({"kind": "cbed", "file": "cbed.npy", "variance": "var.npy", "mask": "mask.tif",
                       "zero_is_unrecorded": True, "detector": YAG}, tmp_path)
    assert ds.intensity.dims == ("y", "x") and ds.variance.dims == ("y", "x")
    np.testing.assert_array_equal(ds.intensity.values, a)
    np.testing.assert_array_equal(ds.variance.values, var)
    assert ds.attrs["n_invalid"] == 5 + 6 + 1        # zeros + masked block + NaN variance
    assert not ds.valid.values[0, :5].any() and not ds.valid.values[10:12, 10:13].any() and not ds.valid.values[5, 5]
    assert ds.y.values.tolist() == list(range(20)) and ds.x.dtype == np.int64
    assert ds.intensity.attrs["units"] == "counts" and ds.variance.attrs["units"] == "counts^2"
    assert json.loads(ds.attrs["detector"]) == YAG and ds.attrs["dtype"] == "uint16"
    assert ds.attrs["kind"] == "cbed" and ds.attrs["files"] == ["cbed.npy"]
    back = open_store(write_store(ds, tmp_path / "out" / "pattern.zarr"))
    np.testing.assert_array_equal(back.intensity.values, a)
    np.testing.assert_array_equal(back.valid.values, ds.valid.values)
    assert back.attrs["files"] == ["cbed.npy"] and back.attrs["n_invalid"] == 12
    assert "detector" not in load_pattern({"kind": "cbed", "file": "cbed.npy"}, tmp_path).attrs


def test_cbed_raw_file(tmp_path):
    a = _img((16, 16), dtype=np.float32)
    (tmp_path / "si.img").write_bytes(a.astype(">f4").tobytes())
    np.save(tmp_path / "var.npy", np.ones(a.shape))     # a .npy variance is not read as raw
    ds = load_pattern({"kind": "cbed", "file": "si.img", "variance": "var.npy",
                       "raw": {"dtype": "float32", "byte_order": "big", "shape": [16, 16]}}, tmp_path)
    np.testing.assert_array_equal(ds.intensity.values, a)
    assert ds.attrs["dtype"] == "float32" and json.loads(ds.attrs["calibration"])["format"] == "raw"


def test_cbed_deconvolution(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    truth = 1e5 * np.exp(-((yy - 32) ** 2 + (xx - 30) ** 2) / (2 * 2.0**2))
    r = np.arange(-8, 9)
    psf = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    psf /= psf.sum()
    blurred = make_blur(prepare_kernel(psf, truth.shape, psf=True), truth.shape).apply(truth)
    np.save(tmp_path / "cbed.npy", blurred)
    np.save(tmp_path / "psf.npy", psf)
    section = {"kind": "cbed", "file": "cbed.npy", "detector": YAG,
               "deconvolution": {"mtf": "psf.npy", "psf": True, "iterations": 30}}
    ds = load_pattern(section, tmp_path)
    info = json.loads(ds.attrs["deconvolution"])
    # the YAG noise model stops it early: measured 5 iterations, chi^2 114 -> 0.38
    assert info["iterations"] == len(info["chi2"]) - 1 <= 30 and info["mtf"] == "psf.npy"
    assert info["converged"] and info["chi2"][0] > 1 >= info["chi2"][-1]
    # measured: the peak error falls from 3.6e4 to 2.4e3 counts (a 2 px disk under a 1.5 px PSF)
    err_before = np.abs(blurred - truth).max()
    err_after = np.abs(ds.intensity.values - truth).max()
    assert err_after < 0.2 * err_before
    assert ds.intensity.values.sum() == pytest.approx(blurred.sum(), rel=1e-6)
    with pytest.raises(QcbedInputError, match=r"pattern\.deconvolution\.iterations: must be an integer"):
        load_pattern(dict(section, deconvolution={"mtf": "psf.npy", "psf": True, "iterations": "many"}), tmp_path)
    with pytest.raises(QcbedInputError, match=r"pattern\.deconvolution\.mtf: MTF shape \(17, 17\) differs"):
        load_pattern(dict(section, deconvolution={"mtf": "psf.npy"}), tmp_path)
    with pytest.raises(QcbedInputError, match=r"pattern\.deconvolution\.order: unknown key"):
        load_pattern(dict(section, deconvolution={"mtf": "psf.npy", "order": 1}), tmp_path)


# ----------------------------------------------------------------------------- LARBED tables
def _write_set(tmp_path, names, shape=(10, 11)):
    arrays = []
    for i, name in enumerate(names):
        a = _img(shape, seed=i)
        np.save(tmp_path / name, a)
        arrays.append(a)
    return arrays


def test_larbed_files_list_glob_and_hkl_sources(tmp_path):
    names = ["X_+1+1+12.npy", "X_+1+1+1.npy", "X_+0+0+0.npy"]
    arrays = _write_set(tmp_path, names)
    ds = load_pattern({"kind": "larbed", "files": "X_*.npy"}, tmp_path)       # sorted glob, hkl from names
    assert ds.attrs["files"] == ["X_+0+0+0.npy", "X_+1+1+1.npy", "X_+1+1+12.npy"]
    assert ds.l.values.tolist() == [0, 1, 12] and ds.h.values.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(ds.intensity.values[2], arrays[0])            # +1+1+12 not confused
    ds = load_pattern({"kind": "larbed", "files": names}, tmp_path)           # a list keeps its order
    assert ds.l.values.tolist() == [12, 1, 0]
    ds = load_pattern({"kind": "larbed", "files": names, "hkl": [[2, 0, 0], [0, 2, 0], [0, 0, 2]]}, tmp_path)
    assert ds.h.values.tolist() == [2, 0, 0] and ds.k.values.tolist() == [0, 2, 0]
    np.save(tmp_path / "g.npy", np.array([[1, -1, 0], [2, -2, 0], [0, 0, 4]]))
    ds = load_pattern({"kind": "larbed", "files": names, "hkl_file": "g.npy"}, tmp_path)
    assert ds.k.values.tolist() == [-1, -2, 0]
    # a 3-D stack file with explicit hkl, a per-disk variance list
    np.save(tmp_path / "stack.npy", np.stack(arrays))
    for i, name in enumerate(names):
        np.save(tmp_path / f"var{i}.npy", arrays[i] + 1.0)
    ds = load_pattern({"kind": "larbed", "file": "stack.npy", "hkl": [[1, 1, 12], [1, 1, 1], [0, 0, 0]],
                       "variance": [f"var{i}.npy" for i in range(3)]}, tmp_path)
    np.testing.assert_array_equal(ds.intensity.values, np.stack(arrays))
    np.testing.assert_array_equal(ds.variance.values, np.stack(arrays) + 1.0)
    assert ds.variance.dims == ("disk", "y", "x")


def _raises(section, base, match):
    with pytest.raises(QcbedInputError, match=match) as e:
        load_pattern(section, base)
    return _one_line(e)


def test_larbed_errors(tmp_path):
    names = ["A_+1+1+1.npy", "A_+0+0+0.npy"]
    arrays = _write_set(tmp_path, names)
    np.save(tmp_path / "noname.npy", arrays[0])
    np.save(tmp_path / "B_+1+1+1.npy", arrays[0])
    np.save(tmp_path / "A_+2+0+0.npy", _img((10, 12)))
    L = {"kind": "larbed"}
    _raises(dict(L, files=names + ["noname.npy"]), tmp_path,
            r"pattern\.files: cannot read h k l from the name 'noname\.npy' \(name the file like GeSn_\+1\+1-3\.dm3")
    _raises(dict(L, files=names + ["B_+1+1+1.npy"]), tmp_path,
            r"pattern\.hkl_from_names: h k l \(1, 1, 1\) appears twice \(A_\+1\+1\+1\.npy and B_\+1\+1\+1\.npy\)")
    _raises(dict(L, files=names, hkl=[[1, 0, 0], [1, 0, 0]]), tmp_path,
            r"pattern\.hkl: h k l \(1, 0, 0\) appears twice \(row 0 and row 1\)")
    _raises(dict(L, files=names + ["A_+2+0+0.npy"]), tmp_path,
            r"pattern\.files: A_\+1\+1\+1\.npy has shape \(10, 11\) but A_\+2\+0\+0\.npy has shape \(10, 12\)")
    _raises(dict(L, files=names, hkl=[[1, 0, 0]]), tmp_path, r"pattern\.hkl: 1 h k l rows for 2 images")
    np.save(tmp_path / "g.npy", np.zeros((3, 3), int))
    _raises(dict(L, files=names, hkl_file="g.npy"), tmp_path, r"pattern\.hkl_file: 3 h k l rows for 2 images")
    _raises(dict(L, files=names, hkl=[[1, 0]]), tmp_path, r"pattern\.hkl: must be a list of \[h, k, l\] rows")
    _raises(dict(L, files=names, hkl=[[1, 0, 0.5], [0, 0, 0]]), tmp_path, r"pattern\.hkl: indices must be integers")
    _raises(dict(L, files=names, hkl=[[1, 0, 0], [0, 0, 0]], hkl_from_names=True), tmp_path,
            r"pattern\.hkl_from_names: give one source of h k l, not hkl and hkl_from_names")
    _raises(dict(L, files="Z_*.npy"), tmp_path, r"pattern\.files: 'Z_\*\.npy' matches no file in ")
    _raises(dict(L, files=["A_+1+1+1.npy", "missing_+1+0+0.npy"]), tmp_path,
            r"missing_\+1\+0\+0\.npy: file not found")
    np.save(tmp_path / "stack.npy", np.stack(arrays))
    _raises(dict(L, file="stack.npy"), tmp_path, r"pattern\.hkl: no reflection indices for the LARBED images")
    _raises(dict(L, file="stack.npy", hkl_from_names=True), tmp_path, r"pattern\.hkl_from_names: needs one file")
    _raises(dict(L, files=["stack.npy"]), tmp_path, r"pattern\.files: stack\.npy is a stack of shape \(2, 10, 11\)")
    _raises(dict(L, files=names, hkl_from_names=False), tmp_path, r"pattern\.hkl: no reflection indices")
    # variance / mask
    np.save(tmp_path / "v_bad.npy", np.ones((2, 10, 10)))
    _raises(dict(L, files=names, variance="v_bad.npy"), tmp_path,
            r"pattern\.variance: v_bad\.npy has shape \(2, 10, 10\), the intensity \(2, 10, 11\)")
    _raises(dict(L, files=names, mask="v_bad.npy"), tmp_path, r"pattern\.mask: v_bad\.npy has shape")
    neg = -np.ones((2, 10, 11))
    np.save(tmp_path / "v_neg.npy", neg)
    _raises(dict(L, files=names, variance="v_neg.npy"), tmp_path,
            r"pattern\.variance: v_neg\.npy has 220 negative values \(min -1\)")
    # an image with no usable pixel names its file
    np.save(tmp_path / "C_+0+0+0.npy", np.zeros((10, 11)))
    np.save(tmp_path / "C_+1+1+1.npy", arrays[0])
    _raises(dict(L, files="C_*.npy", zero_is_unrecorded=True), tmp_path,
            r"pattern\.files: C_\+0\+0\+0\.npy \(h k l \(0, 0, 0\)\) has no usable pixel")
    np.save(tmp_path / "m.npy", np.stack([np.ones((10, 11)), np.zeros((10, 11))]))
    _raises(dict(L, files=names, mask="m.npy"), tmp_path,
            r"pattern\.files: A_\+0\+0\+0\.npy \(h k l \(0, 0, 0\)\) has no usable pixel")


def test_section_errors(tmp_path):
    np.save(tmp_path / "c.npy", _img())
    np.save(tmp_path / "z.npy", np.zeros((4, 4)))
    C = {"kind": "cbed", "file": "c.npy"}
    msg = _raises(dict(C, flie="c.npy"), tmp_path, r"pattern\.flie: unknown key \(allowed keys: kind, file, files")
    assert "deconvolution" in msg
    _raises({"file": "c.npy"}, tmp_path, r"pattern\.kind: missing")
    _raises(dict(C, kind="lacbed"), tmp_path, r"pattern\.kind: must be \"cbed\" or \"larbed\", got 'lacbed'")
    _raises({"kind": "cbed"}, tmp_path, r"pattern\.file: no pattern file given")
    _raises(dict(C, files=["c.npy"]), tmp_path, r"pattern\.file: give exactly one of file and files")
    _raises(dict(C, hkl=[[0, 0, 0]]), tmp_path, r"pattern\.hkl: applies to kind = \"larbed\" only")
    _raises(dict(C, file=3), tmp_path, r"pattern\.file: must be a file name \(a string\), got 3")
    _raises(dict(C, zero_is_unrecorded="yes"), tmp_path, r"pattern\.zero_is_unrecorded: must be true or false")
    _raises(dict(C, detector=dict(YAG, gain=-2)), tmp_path, r"pattern\.detector\.gain: must be > 0")
    _raises(dict(C, raw={"dtype": "float32"}), tmp_path, r"pattern\.raw\.byte_order: missing")
    _raises({"kind": "larbed", "file": "c.npy", "hkl": [[0, 0, 0]], "deconvolution": {"mtf": "c.npy"}}, tmp_path,
            r"pattern\.deconvolution: applies to kind = \"cbed\" only")
    _raises({"kind": "cbed", "file": "z.npy", "zero_is_unrecorded": True}, tmp_path,
            r"pattern\.file: z\.npy has no usable pixel")
    _raises("kind = 'cbed'", tmp_path, r"^pattern: must be a table")
    _raises(dict(C, file="nothere.tif"), tmp_path, r"nothere\.tif: file not found \(check the name")
    _raises(dict(C, variance=["a.npy"]), tmp_path, r"pattern\.variance: must be a file name")
    # errors name the field with the caller's prefix
    _raises(dict(C, kind=None), tmp_path, r"pattern\.kind")
    with pytest.raises(QcbedInputError, match=r"^patterns\[2\]\.flie: unknown key"):
        load_pattern(dict(C, flie=1), tmp_path, field_prefix="patterns[2]")
