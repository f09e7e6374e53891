"""Load stage: read recorded CBED / LARBED patterns into labelled xarray Datasets.

Formats (by extension): NumPy ``.npy``; TIFF ``.tif``/``.tiff`` (tifffile); Gatan
DigitalMicrograph ``.dm3``/``.dm4`` (rosettasciio); raw binary ``.img``/``.raw``/``.bin`` (or any
file when a ``raw`` layout is given: offset in bytes, dtype, byte order, shape), as written by
older acquisition software (PyExtal's Si CBED example is a big-endian float32 1024 x 1024 ``.img``).

``load_pattern`` reads the ``[pattern]`` table of a run's TOML config:

* CBED: one image with many disks -> ``intensity(y, x)``.
* LARBED / digital LACBED: one rocking image per reflection -> ``intensity(disk, y, x)`` with
  integer coordinates ``h, k, l (disk)``; the reflection of each image comes from ``hkl``, an
  ``hkl_file`` or the file names (``..._+h+k+l.ext``, see :func:`hkl_from_filename`).

Every output has a boolean ``valid`` of the same dims (finite, not masked, not unrecorded, finite
variance) and, when given, ``variance``.  Intensities are kept in the recorded units ("counts":
ADU above the dark level as stored; no gain is applied) as float64, with the source dtype in
``attrs['dtype']``.  ``y`` and ``x`` are integer pixel indices (row, column).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import QcbedInputError
from .physics.deconvolution import richardson_lucy
from .physics.noise import DetectorModel

FORMATS = {".npy": "npy", ".tif": "tiff", ".tiff": "tiff", ".dm3": "dm", ".dm4": "dm",
           ".img": "raw", ".raw": "raw", ".bin": "raw"}
RAW_KEYS = ("offset", "dtype", "byte_order", "shape")
PATTERN_KEYS = ("kind", "file", "files", "hkl", "hkl_file", "hkl_from_names", "variance", "mask",
                "raw", "zero_is_unrecorded", "detector", "deconvolution", "data_source")
DECONVOLUTION_KEYS = ("mtf", "iterations", "background", "psf", "pad")
DEFAULT_RL_ITERATIONS = 50
_HKL_TAIL = re.compile(r"(?:[+-]\d+)+$")
_SIGNED = re.compile(r"[+-]\d+")


# ------------------------------------------------------------------------------- small checks
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_bool(v, field: str) -> bool:
    if not isinstance(v, bool):
        raise QcbedInputError(field, f"must be true or false, got {v!r}", "write true or false")
    return v


def _check_str(v, field: str, what: str = "a file name") -> str:
    if not isinstance(v, str) or not v:
        raise QcbedInputError(field, f"must be {what} (a string), got {v!r}", f"give {what} in quotes")
    return v


def _check_unknown(table: dict, allowed: tuple, field: str) -> None:
    for key in table:
        if key not in allowed:
            raise QcbedInputError(f"{field}.{key}", "unknown key", f"allowed keys: {', '.join(allowed)}")


# ------------------------------------------------------------------------------- raw binary
@dataclass(frozen=True)
class RawLayout:
    """Layout of a headerless binary image: ``offset`` bytes of header, then C-order ``shape``
    (rows, cols) or (n, rows, cols) values of ``dtype`` (with its byte order)."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Expected file size [bytes] = offset + prod(shape) * itemsize."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def parse_raw_layout(raw, field: str = "raw") -> RawLayout:
    """Validate a ``raw = {offset, dtype, byte_order, shape}`` table (offset defaults to 0)."""
    if not isinstance(raw, dict):
        raise QcbedInputError(field, f"must be a table, got {raw!r}",
                              'give raw = {dtype = "float32", byte_order = "little", shape = [rows, cols]}')
    _check_unknown(raw, RAW_KEYS, field)
    for key in ("dtype", "byte_order", "shape"):
        if key not in raw:
            raise QcbedInputError(f"{field}.{key}", "missing", "a raw binary file needs dtype, byte_order and shape")
    offset = raw.get("offset", 0)
    if not _is_int(offset) or offset < 0:
        raise QcbedInputError(f"{field}.offset", f"must be an integer >= 0 (bytes), got {offset!r}",
                              "give the header length in bytes, or 0")
    name = _check_str(raw["dtype"], f"{field}.dtype", 'a dtype name such as "float32"')
    if name[0] in "<>=|!":
        raise QcbedInputError(f"{field}.dtype", f"{name!r} carries a byte order",
                              'give the plain name (e.g. "float32") and byte_order = "little" or "big"')
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise QcbedInputError(f"{field}.dtype", f"{name!r} is not a real numeric dtype",
                              'use e.g. "uint16", "int32", "float32", "float64"')
    order = raw["byte_order"]
    if order not in ("little", "big"):
        raise QcbedInputError(f"{field}.byte_order", f"must be \"little\" or \"big\", got {order!r}",
                              'write byte_order = "little" (Intel, most files) or "big"')
    shape = raw["shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3) \
            or not all(_is_int(s) and s > 0 for s in shape):
        raise QcbedInputError(f"{field}.shape", f"must be [rows, cols] or [n, rows, cols] of positive integers, "
                              f"got {shape!r}", "give the image size, e.g. shape = [1024, 1024]")
    dtype = dtype.newbyteorder("<" if order == "little" else ">")
    return RawLayout(int(offset), dtype, tuple(int(s) for s in shape))


def read_raw(path: Path, layout: RawLayout) -> np.ndarray:
    """Values of a raw binary file; its size must be exactly ``layout.nbytes``."""
    size = path.stat().st_size
    if size != layout.nbytes:
        dims = " x ".join(str(s) for s in layout.shape)
        raise QcbedInputError(str(path), f"has {size} bytes, but offset {layout.offset} + {dims} values x "
                              f"{layout.dtype.itemsize} bytes ({layout.dtype.name}) = {layout.nbytes} bytes",
                              "check raw.shape, raw.dtype and raw.offset")
    return np.fromfile(path, dtype=layout.dtype, count=math.prod(layout.shape),
                       offset=layout.offset).reshape(layout.shape)


# ------------------------------------------------------------------------------- formats
def _axes(names, scales=None, offsets=None, units=None) -> list[dict]:
    n = len(names)
    scales = scales or [1.0] * n
    offsets = offsets or [0.0] * n
    units = units or [""] * n
    return [{"name": str(a), "scale": float(s), "offset": float(o) + 0.0, "units": str(u)}
            for a, s, o, u in zip(names, scales, offsets, units)]


def _default_axis_names(ndim: int) -> list[str]:
    return ["image", "y", "x"][-ndim:] if ndim <= 3 else [f"axis{i}" for i in range(ndim)]


def _read_npy(path: Path):
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ValueError("no NumPy header")
    return np.load(path, allow_pickle=False), None


def _read_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if "S" in series.axes:
            raise QcbedInputError(str(path), f"is a colour image (TIFF axes {series.axes})",
                                  "save the pattern as a single-channel (grey) image")
        return series.asarray(), None


def _read_dm(path: Path):
    from rsciio.digitalmicrograph import file_reader

    signals = file_reader(str(path))
    if len(signals) != 1:
        raise QcbedInputError(str(path), f"holds {len(signals)} images",
                              "save one image (or one stack) per file")
    sig = signals[0]
    axes = sorted(sig.get("axes", []), key=lambda a: a.get("index_in_array", 0))
    cal = _axes([a.get("name", "") for a in axes], [a.get("scale", 1.0) for a in axes],
                [a.get("offset", 0.0) for a in axes], [a.get("units", "") or "" for a in axes])
    return np.asarray(sig["data"]), cal


_READERS = {"npy": _read_npy, "tiff": _read_tiff, "dm": _read_dm}
_FORMAT_NAMES = {"npy": "a NumPy .npy file", "tiff": "a TIFF file", "dm": "a DigitalMicrograph file",
                 "raw": "raw binary"}


def read_image(path, raw=None, *, raw_field: str = "raw", allow_complex: bool = False):
    """Read one image or image stack -> (float64 array, calibration dict).

    The format follows the extension (.npy, .tif/.tiff, .dm3/.dm4, .img/.raw/.bin) unless ``raw``
    (a ``{offset, dtype, byte_order, shape}`` table, see :func:`parse_raw_layout`) is given, which
    reads any file as raw binary.  Leading singleton dimensions are dropped; the result is 2-D
    (rows, cols) or 3-D (n, rows, cols).  Values are converted to float64 (complex128 when
    ``allow_complex`` and the file is complex, e.g. an OTF).

    Calibration: ``{"format", "dtype" (the stored dtype), "axes": [{name, scale, offset, units}]
    per remaining dimension, "calibrated": whether any axis has units or a scale/offset other
    than 1/0}``; only DigitalMicrograph files carry axis calibrations.
    """
    path = Path(path)
    if not path.exists():
        raise QcbedInputError(str(path), "file not found",
                              "check the name (relative paths resolve against the config file's folder)")
    if not path.is_file():
        raise QcbedInputError(str(path), "is not a file", "give an image file")
    if raw is not None:
        fmt = "raw"
    else:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise QcbedInputError(str(path), f"unknown image format {path.suffix!r}",
                                  f"use one of {', '.join(FORMATS)}, or give raw = {{...}} for raw binary")
        if fmt == "raw":
            raise QcbedInputError(str(path), "raw binary needs its layout",
                                  'give raw = {dtype = "float32", byte_order = "little", shape = [rows, cols]}')
    try:
        if fmt == "raw":
            data, axes = read_raw(path, parse_raw_layout(raw, raw_field)), None
        else:
            data, axes = _READERS[fmt](path)
    except QcbedInputError:
        raise
    except Exception as exc:  # noqa: BLE001 -- third-party readers raise many types; report one line
        raise QcbedInputError(str(path), f"cannot read as {_FORMAT_NAMES[fmt]}: {_first_line(exc)}",
                              "check the file is complete and of the format its extension says") from None
    data = np.asarray(data)
    kinds = "biufc" if allow_complex else "biuf"
    if data.dtype.kind not in kinds or data.dtype.fields is not None:
        raise QcbedInputError(str(path), f"holds {data.dtype} values, not real numbers",
                              "save the intensities as integers or floats")
    source_dtype = data.dtype.name
    axes = axes if axes is not None and len(axes) == data.ndim else _axes(_default_axis_names(data.ndim))
    while data.ndim > 2 and data.shape[0] == 1:
        data, axes = data[0], axes[1:]
    if data.ndim not in (2, 3) or 0 in data.shape:
        raise QcbedInputError(str(path), f"has shape {data.shape}",
                              "give an image (rows, cols) or a stack of images (n, rows, cols)")
    data = data.astype(np.complex128 if data.dtype.kind == "c" else np.float64)
    calibrated = any(a["units"] or a["scale"] != 1.0 or a["offset"] != 0.0 for a in axes)
    return data, {"format": path.suffix.lower().lstrip(".") if fmt != "raw" else "raw",
                  "dtype": source_dtype, "axes": axes, "calibrated": calibrated}


# ------------------------------------------------------------------------------- hkl
def hkl_from_filename(name) -> tuple[int, int, int] | None:
    """(h, k, l) from three signed integers that end the file's stem, else None.

    ``GeSn_+1+1-3.dm3`` -> (1, 1, -3); ``LiNbO3_+0+0-12.dm3`` -> (0, 0, -12).  The stem must end
    in exactly three signed integers: ``x_+1+1+12`` is (1, 1, 12), never (1, 1, 1), and a run of
    four (``x+1+1+1+1``) is ambiguous and gives None.
    """
    stem = Path(str(name)).name
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    tail = _HKL_TAIL.search(stem)
    if tail is None:
        return None
    parts = _SIGNED.findall(tail.group(0))
    if len(parts) != 3:
        return None
    h, k, l = (int(p) for p in parts)
    return h, k, l


def _hkl_rows(rows, field: str) -> np.ndarray:
    arr = np.asarray(rows, dtype=object) if not isinstance(rows, np.ndarray) else rows
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise QcbedInputError(field, f"must be a list of [h, k, l] rows, got shape {np.shape(arr)}",
                              "give hkl = [[h, k, l], ...], one row per image")
    if arr.dtype == object:
        if not all(_is_int(v) for v in arr.ravel()):
            raise QcbedInputError(field, "indices must be integers", "give hkl = [[h, k, l], ...] of integers")
        return arr.astype(np.int64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise QcbedInputError(field, f"indices must be integers, got {arr.dtype}", "store h, k, l as integers")


# ------------------------------------------------------------------------------- pattern section
def _resolve(base_dir: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else base_dir / p


def _image_sources(section: dict, kind: str, base_dir: Path, p: str) -> tuple[list[Path], list[str], bool]:
    """(paths, names as given, one-file-per-image) of the intensity files."""
    has_file, has_files = "file" in section, "files" in section
    if has_file == has_files:
        fix = 'give file = "pattern.npy"' if kind == "cbed" else \
            'give files = "NAME_*.dm3" (one image per reflection) or file = "stack.npy" (disk, y, x)'
        raise QcbedInputError(f"{p}.file", "give exactly one of file and files" if has_file
                              else "no pattern file given", fix)
    if has_file:
        name = _check_str(section["file"], f"{p}.file")
        return [_resolve(base_dir, name)], [name], False
    if kind == "cbed":
        raise QcbedInputError(f"{p}.files", "a CBED pattern is one image", 'give file = "pattern.npy"')
    spec = section["files"]
    if isinstance(spec, str) and spec:
        if not glob.has_magic(spec):
            return [_resolve(base_dir, spec)], [spec], True
        pattern = str(_resolve(base_dir, spec))
        matches = sorted(m for m in glob.glob(pattern) if os.path.isfile(m))
        if not matches:
            raise QcbedInputError(f"{p}.files", f"{spec!r} matches no file in {base_dir}",
                                  "check the pattern (relative to the config file's folder)")
        names = matches if Path(spec).expanduser().is_absolute() else \
            [os.path.relpath(m, base_dir) for m in matches]
        return [Path(m) for m in matches], names, True
    if isinstance(spec, list) and spec:
        names = [_check_str(v, f"{p}.files[{i}]") for i, v in enumerate(spec)]
        return [_resolve(base_dir, n) for n in names], names, True
    raise QcbedInputError(f"{p}.files", f"must be a glob pattern or a list of file names, got {spec!r}",
                          'give files = "NAME_*.dm3" or files = ["a.dm3", "b.dm3"]')


def _read_intensity(paths, names, per_image: bool, kind: str, raw, p: str):
    """Stack the images -> (array (y, x) or (disk, y, x), calibration list, dtype list)."""
    images, cals = [], []
    for path, name in zip(paths, names):
        img, cal = read_image(path, raw, raw_field=f"{p}.raw")
        if (kind == "cbed" or per_image) and img.ndim != 2:
            raise QcbedInputError(f"{p}.file" if kind == "cbed" else f"{p}.files",
                                  f"{name} is a stack of shape {img.shape}, expected one image (rows, cols)",
                                  'give a single image, or for LARBED a stack as file = "stack.npy"')
        if images and img.shape != images[0].shape:
            raise QcbedInputError(f"{p}.files", f"{names[0]} has shape {images[0].shape} but {name} has "
                                  f"shape {img.shape}", "give images of one size")
        images.append(img)
        cals.append(cal)
    if kind == "cbed":
        data = images[0]
    elif per_image:
        data = np.stack(images)
    else:
        data = images[0] if images[0].ndim == 3 else images[0][None]
    return data, cals


def _hkl_for(section: dict, names: list[str], per_image: bool, n_images: int, base_dir: Path, p: str):
    given = [k for k in ("hkl", "hkl_file") if k in section]
    from_names = section.get("hkl_from_names")
    if from_names is not None:
        _check_bool(from_names, f"{p}.hkl_from_names")
    if from_names:
        given.append("hkl_from_names")
    if len(given) > 1:
        raise QcbedInputError(f"{p}.{given[1]}", f"give one source of h k l, not {' and '.join(given)}",
                              "keep one of hkl, hkl_file, hkl_from_names")
    if not given:
        if per_image and from_names is None:
            given = ["hkl_from_names"]
        else:
            raise QcbedInputError(f"{p}.hkl", "no reflection indices for the LARBED images",
                                  "give hkl = [[h, k, l], ...] or hkl_file = \"g.npy\"")
    source = given[0]
    if source == "hkl_from_names":
        if not per_image:
            raise QcbedInputError(f"{p}.hkl_from_names", "needs one file per image",
                                  "give files = [...], or hkl for the stack")
        rows = []
        for name in names:
            hkl = hkl_from_filename(name)
            if hkl is None:
                raise QcbedInputError(f"{p}.files", f"cannot read h k l from the name {name!r}",
                                      "name the file like GeSn_+1+1-3.dm3, or give hkl = [[h, k, l], ...]")
            rows.append(hkl)
        hkl, label = np.array(rows, dtype=np.int64), names
    elif source == "hkl":
        hkl = _hkl_rows(section["hkl"], f"{p}.hkl")
        label = [f"row {i}" for i in range(len(hkl))]
    else:
        name = _check_str(section["hkl_file"], f"{p}.hkl_file")
        path = _resolve(base_dir, name)
        if not path.is_file():
            raise QcbedInputError(f"{p}.hkl_file", f"{name}: file not found", "give an (n, 3) integer .npy file")
        try:
            rows = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise QcbedInputError(f"{p}.hkl_file", f"{name}: cannot read as .npy: {_first_line(exc)}",
                                  "give an (n, 3) integer .npy file") from None
        hkl = _hkl_rows(rows, f"{p}.hkl_file")
        label = [f"row {i}" for i in range(len(hkl))]
    if len(hkl) != n_images:
        raise QcbedInputError(f"{p}.{source}", f"{len(hkl)} h k l rows for {n_images} images",
                              "give one [h, k, l] per image, in the order of the images")
    _, first, counts = np.unique(hkl, axis=0, return_index=True, return_counts=True)
    if np.any(counts > 1):
        i = int(first[np.argmax(counts > 1)])
        j = next(j for j in range(len(hkl)) if j != i and np.array_equal(hkl[j], hkl[i]))
        raise QcbedInputError(f"{p}.{source}", f"h k l {tuple(int(v) for v in hkl[i])} appears twice "
                              f"({label[i]} and {label[j]})", "give each reflection once")
    return hkl


def _read_aux(section: dict, key: str, shape: tuple, kind: str, base_dir: Path, raw, p: str):
    """A variance or mask of the intensity's shape -> (array, names)."""
    spec = section[key]
    field = f"{p}.{key}"
    if isinstance(spec, str) and spec:
        names = [spec]
    elif isinstance(spec, list) and spec and kind == "larbed":
        names = [_check_str(v, f"{field}[{i}]") for i, v in enumerate(spec)]
        if len(names) != shape[0]:
            raise QcbedInputError(field, f"{len(names)} files for {shape[0]} images", "give one file per image")
    else:
        raise QcbedInputError(field, f"must be a file name, got {spec!r}",
                              f'give {key} = "{key}.npy" (a list of files, one per image, for LARBED)')
    arrays = []
    for name in names:
        path = _resolve(base_dir, name)
        use_raw = raw if FORMATS.get(path.suffix.lower(), "raw") == "raw" else None
        arr, _ = read_image(path, use_raw, raw_field=f"{p}.raw")
        arrays.append(arr)
    arr = arrays[0] if len(arrays) == 1 else np.stack(arrays) if all(a.ndim == 2 for a in arrays) else None
    if arr is not None and kind == "larbed" and arr.ndim == 2 and shape[0] == 1:
        arr = arr[None]
    if arr is None or arr.shape != shape:
        got = arr.shape if arr is not None else [a.shape for a in arrays]
        raise QcbedInputError(field, f"{', '.join(names)} has shape {got}, the intensity {shape}",
                              f"give a {key} of the intensity's shape")
    return arr, names


def _deconvolve(section: dict, intensity: np.ndarray, valid: np.ndarray, detector, base_dir: Path, p: str):
    """Richardson-Lucy with the table's MTF; returns (image, attrs dict)."""
    field = f"{p}.deconvolution"
    table = section["deconvolution"]
    if not isinstance(table, dict):
        raise QcbedInputError(field, f"must be a table, got {table!r}", 'give deconvolution = {mtf = "mtf.npy"}')
    _check_unknown(table, DECONVOLUTION_KEYS, field)
    if "mtf" not in table:
        raise QcbedInputError(f"{field}.mtf", "missing", 'give mtf = "mtf.npy" (FFT layout) or a PSF with psf = true')
    name = _check_str(table["mtf"], f"{field}.mtf")
    psf = _check_bool(table.get("psf", False), f"{field}.psf")
    iterations = table.get("iterations", DEFAULT_RL_ITERATIONS)
    background = table.get("background", 0.0)
    pad = table.get("pad")
    kernel, _ = read_image(_resolve(base_dir, name), allow_complex=True)
    if kernel.ndim != 2:
        raise QcbedInputError(f"{field}.mtf", f"{name} has shape {kernel.shape}", "give a 2-D MTF or PSF")
    res = richardson_lucy(intensity, kernel, psf=psf, noise=detector, background=background,
                          max_iterations=iterations, valid=valid, pad=pad, field=field)
    info = {"mtf": name, "psf": psf, "background": float(background), "max_iterations": int(iterations),
            "iterations": len(res.chi2_history) - 1, "chi2": [float(c) for c in res.chi2_history],
            "converged": bool(res.chi2_history[-1] <= 1.0)}
    return np.where(valid, res.image, intensity), info


def load_pattern(section: dict, base_dir, field_prefix: str = "pattern") -> xr.Dataset:
    """Read the ``[pattern]`` table of a config into a Dataset (see the module docstring).

    Keys: kind ("cbed" | "larbed"); file (one image, or a LARBED stack (disk, y, x)) or files
    (LARBED: a glob, sorted, or a list, one image per reflection); hkl / hkl_file / hkl_from_names
    (LARBED, exactly one; default hkl_from_names = true with ``files``); variance, mask (files of
    the intensity's shape, or for LARBED a list, one per image; mask nonzero = usable); raw
    (binary layout, applied to the intensity files, and to variance/mask files that are not
    .npy/.tif/.dm*); zero_is_unrecorded (pixels exactly 0 are unusable); detector (noise model,
    stored in attrs); deconvolution (CBED: {mtf, iterations, background, psf, pad}, applied to
    the usable pixels); data_source (text: where to get the files; shown when they are missing,
    not used here).  Relative paths resolve against ``base_dir``.
    """
    p = field_prefix
    base_dir = Path(base_dir)
    if not isinstance(section, dict):
        raise QcbedInputError(p, f"must be a table, got {type(section).__name__}", f"add a [{p}] table")
    _check_unknown(section, PATTERN_KEYS, p)
    kind = section.get("kind")
    if kind not in ("cbed", "larbed"):
        problem = "missing" if kind is None else f"must be \"cbed\" or \"larbed\", got {kind!r}"
        raise QcbedInputError(f"{p}.kind", problem,
                              'write kind = "cbed" (one image) or kind = "larbed" (one image per reflection)')
    if kind == "cbed":
        for key in ("hkl", "hkl_file", "hkl_from_names"):
            if key in section:
                raise QcbedInputError(f"{p}.{key}", 'applies to kind = "larbed" only',
                                      "remove it: CBED disks are indexed in the ROI stage")
    elif "deconvolution" in section:
        raise QcbedInputError(f"{p}.deconvolution", 'applies to kind = "cbed" only',
                              "deconvolve LARBED images before loading, or remove it")
    raw = section.get("raw")
    if raw is not None:
        parse_raw_layout(raw, f"{p}.raw")
    zero_unrecorded = _check_bool(section.get("zero_is_unrecorded", False), f"{p}.zero_is_unrecorded")
    detector = DetectorModel.from_mapping(section["detector"], f"{p}.detector") if "detector" in section else None

    paths, names, per_image = _image_sources(section, kind, base_dir, p)
    intensity, cals = _read_intensity(paths, names, per_image, kind, raw, p)
    hkl = _hkl_for(section, names, per_image, intensity.shape[0], base_dir, p) if kind == "larbed" else None

    valid = np.isfinite(intensity)
    if zero_unrecorded:
        valid &= intensity != 0
    variance = None
    if "variance" in section:
        variance, vnames = _read_aux(section, "variance", intensity.shape, kind, base_dir, raw, p)
        negative = np.sum(variance < 0)
        if negative:
            raise QcbedInputError(f"{p}.variance", f"{', '.join(vnames)} has {negative} negative values "
                                  f"(min {np.nanmin(variance):g})", "variances are >= 0: check the file")
        valid &= np.isfinite(variance)
    if "mask" in section:
        mask, _ = _read_aux(section, "mask", intensity.shape, kind, base_dir, raw, p)
        valid &= np.isfinite(mask) & (mask != 0)
    _check_some_valid(valid, kind, names, per_image, hkl, p)

    attrs_extra = {}
    if kind == "cbed" and "deconvolution" in section:
        intensity, info = _deconvolve(section, intensity, valid, detector, base_dir, p)
        attrs_extra["deconvolution"] = json.dumps(info)
    return _dataset(kind, intensity, variance, valid, hkl, names, cals, detector, zero_unrecorded, attrs_extra)


def _check_some_valid(valid, kind, names, per_image, hkl, p):
    if kind == "cbed":
        if not valid.any():
            raise QcbedInputError(f"{p}.file", f"{names[0]} has no usable pixel (all masked, zero or not finite)",
                                  "check the image, its mask and zero_is_unrecorded")
        return
    empty = np.flatnonzero(~valid.any(axis=(1, 2)))
    if empty.size:
        i = int(empty[0])
        what = names[i] if per_image else f"{names[0]} image {i}"
        raise QcbedInputError(f"{p}.files" if per_image else f"{p}.file",
                              f"{what} (h k l {tuple(int(v) for v in hkl[i])}) has no usable pixel "
                              "(all masked, zero or not finite)", "check the image, its mask and zero_is_unrecorded")


def _calibration_attr(cals: list[dict], names: list[str]) -> str:
    """JSON of the first file's calibration; files whose axes differ are listed."""
    first = dict(cals[0])
    first["files_differing"] = [n for n, c in zip(names, cals) if c["axes"][-2:] != first["axes"][-2:]]
    return json.dumps(first)


def _dataset(kind, intensity, variance, valid, hkl, names, cals, detector, zero_unrecorded, extra) -> xr.Dataset:
    dims = ("y", "x") if kind == "cbed" else ("disk", "y", "x")
    ny, nx = intensity.shape[-2:]
    coords = {"y": ("y", np.arange(ny, dtype=np.int64), {"units": "pixel", "long_name": "row"}),
              "x": ("x", np.arange(nx, dtype=np.int64), {"units": "pixel", "long_name": "column"})}
    if kind == "larbed":
        for i, c in enumerate("hkl"):
            coords[c] = ("disk", hkl[:, i].copy(), {"long_name": f"Miller index {c} of the reflection"})
    data_vars = {
        "intensity": (dims, intensity, {"units": "counts", "long_name": "recorded intensity"}),
        "valid": (dims, valid, {"units": "1", "long_name": "usable pixel (finite, not masked, not unrecorded)"}),
    }
    if variance is not None:
        data_vars["variance"] = (dims, variance, {"units": "counts^2", "long_name": "variance of the intensity"})
    dtypes = sorted({c["dtype"] for c in cals})
    attrs = {"kind": kind, "files": list(names), "calibration": _calibration_attr(cals, names),
             "dtype": ",".join(dtypes), "shape": [int(s) for s in intensity.shape],
             "n_invalid": int(valid.size - np.count_nonzero(valid)),
             "zero_is_unrecorded": bool(zero_unrecorded)}
    if detector is not None:
        attrs["detector"] = json.dumps(detector.to_mapping())
    attrs.update(extra)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
