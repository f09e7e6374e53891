"""Zarr stage stores written atomically and verified on use.

A store is written under a temporary name in the same folder, then renamed into place, so a store
that exists under its final name is always complete; an interrupted write leaves only a hidden
``.<name>.tmp-*`` folder, removed by the next write (../shared/research/stack.md §2).

Before the rename, :func:`write_manifest` records the size and sha256 of every file of the folder
in ``<store>/qcbed_manifest.json``.  A store's metadata can be intact while its values are not (a
garbled chunk decodes to nonsense, a deleted chunk reads as the fill value), so :func:`verify_store`
compares the folder with its manifest whenever a store is skipped as done or read by a later stage;
a store without a manifest (written before qcbed recorded them) is 'unverified', still readable.

Every write turns an OSError (full disk, no permission, read-only file system) into one
:class:`~stages.errors.QcbedInputError` naming the folder and the fix (:func:`write_error`), after
removing what it had written under its temporary name: nothing is marked done and the earlier
store stays as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import xarray as xr

from .errors import QcbedInputError

MANIFEST = "qcbed_manifest.json"
MANIFEST_FORMAT = 1
#: the attribute (zarr.json; the report: record.json) saying a store was written with a manifest, so a store
#: whose manifest was deleted is damaged, not one from before manifests
MANIFEST_ATTR = "qcbed_manifest"
# zarr lists every name in a group's folder and warns about a file that is not a zarr node: the manifest
# is qcbed's own sidecar, not part of the hierarchy (this filter names that one file only)
warnings.filterwarnings("ignore", message=f"Object at {MANIFEST} is not recognized", module="zarr")


class CorruptStore(QcbedInputError):
    """A store whose metadata is unreadable or whose files differ from its manifest."""


# ------------------------------------------------------------------------------ write errors
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM)


def write_error(folder: str | Path, exc: OSError) -> QcbedInputError:
    """The one-line error for an OSError while writing under ``folder``: what happened and the fix.

    Full disk, quota, permission and read-only file system get their own fix; any other OSError is
    named by its strerror."""
    folder = str(folder)
    code = getattr(exc, "errno", None)
    what = exc.strerror or str(exc) or type(exc).__name__
    if code in _NO_SPACE:
        return QcbedInputError(folder, f"cannot write: no space left on the device ({what})",
                               "free space on that disk or give --results on another disk; nothing was marked "
                               "done and earlier results are kept")
    if code == errno.EROFS:
        return QcbedInputError(folder, f"cannot write: read-only file system ({what})",
                               "give --results on a writable disk; earlier results are kept")
    if code in _NO_PERMISSION:
        return QcbedInputError(folder, f"cannot write: permission denied ({what})",
                               f"make it writable (chmod u+w {folder}) or give another --results; earlier results "
                               "are kept")
    return QcbedInputError(folder, f"cannot write: {what}", "check the disk and the folder; earlier results are kept")


@contextlib.contextmanager
def writing(folder: str | Path, tmp: str | Path | None = None):
    """Turn an OSError inside the block into :func:`write_error` for ``folder``; remove ``tmp`` (the
    temporary copy being written) on any failure, so a full disk is not left fuller."""
    try:
        yield
    except BaseException as exc:
        if tmp is not None:
            _remove(Path(tmp))
        if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError)):
            raise write_error(folder, exc) from None
        raise


def _remove(path: Path) -> None:
    """Remove a temporary file or folder, quietly (it may not exist yet)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# ------------------------------------------------------------------------------ manifests
def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes, read in chunks: the manifests' digests and the stage keys' input files."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the manifest excluded."""
    out = []
    for root, _dirs, names in os.walk(folder):
        for n in names:
            rel = (Path(root) / n).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def manifest_of(folder: str | Path) -> dict:
    """{relative path: [size, sha256]} of every file of ``folder`` (the manifest excluded)."""
    folder = Path(folder)
    return {rel: [(folder / rel).stat().st_size, file_digest(folder / rel)] for rel in _files(folder)}


def write_manifest(folder: str | Path) -> Path:
    """Record :func:`manifest_of` in ``folder/qcbed_manifest.json``; call on the temporary folder,
    before it is renamed into place, so a folder under its final name always has one."""
    folder = Path(folder)
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": manifest_of(folder)}, indent=0) + "\n")
    return path


def verify_store(folder: str | Path) -> str:
    """'verified' (every file as recorded), 'unverified' (no manifest: written before qcbed recorded
    them); raises :class:`CorruptStore` naming the first damaged file (missing, other size, other
    digest, unexpected, or an unreadable manifest), or when the manifest is missing from a store whose
    metadata says it was written with one (:data:`MANIFEST_ATTR`)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        if _written_with_manifest(folder):
            raise CorruptStore(str(folder), f"damaged: {MANIFEST} is missing (the store was written with one)",
                               "it is moved aside and recomputed")
        return "unverified"
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise ValueError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptStore(str(folder), f"unreadable {MANIFEST} ({type(exc).__name__}: {exc})",
                           "it is moved aside and recomputed") from None
    problem = _first_difference(folder, files)
    if problem:
        raise CorruptStore(str(folder), f"damaged: {problem}", "it is moved aside and recomputed")
    return "verified"


def _written_with_manifest(folder: Path) -> bool:
    """The store's metadata (zarr.json attributes, or record.json of a folder like the report) records
    :data:`MANIFEST_ATTR`; unreadable metadata counts as not (read_key reports it)."""
    for name in ("zarr.json", "record.json"):
        try:
            d = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        attrs = d.get("attributes", d) if isinstance(d, dict) else {}
        if isinstance(attrs, dict) and MANIFEST_ATTR in attrs:
            return True
    return False


def _first_difference(folder: Path, files: dict) -> str | None:
    """The first file of ``folder`` that differs from ``files`` (its manifest), in words; None if none."""
    present = set(_files(folder))
    for rel in sorted(files):
        size, digest = files[rel]
        p = folder / rel
        if rel not in present:
            return f"{rel} is missing"
        try:
            st = p.stat().st_size
            if st != size:
                return f"{rel} has {st} bytes, {size} when written"
            if file_digest(p) != digest:
                return f"{rel} differs from its digest at write time"
        except OSError as exc:
            return f"{rel} is unreadable ({exc.strerror})"
    extra = sorted(present - set(files))
    if extra:
        return f"{extra[0]} was not written by qcbed" + (f" (and {len(extra) - 1} more files)" if len(extra) > 1 else "")
    return None


# ------------------------------------------------------------------------------ stores
def write_store(ds: xr.Dataset, store: str | Path) -> Path:
    """Write ``ds`` to ``store`` (a .zarr folder) under a temporary name, record its manifest, then
    rename into place.  An OSError (full disk, read-only folder) becomes one QcbedInputError naming
    the folder; the temporary copy is removed and the earlier store is untouched."""
    store = Path(store)
    parent = store.parent
    with writing(parent):
        parent.mkdir(parents=True, exist_ok=True)
    if store.exists() and not (store / "zarr.json").exists() and any(store.iterdir()):
        raise QcbedInputError(str(store), "exists and is not a zarr store; refusing to replace it",
                              "choose another output path")
    for junk in parent.glob(f".{store.name}.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    tmp = parent / f".{store.name}.tmp-{uuid.uuid4().hex[:8]}"
    ds = _variable_length_strings(ds)
    ds = ds.assign_attrs({MANIFEST_ATTR: MANIFEST_FORMAT})
    with writing(parent, tmp):
        ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False)
        write_manifest(tmp)
    return replace_dir(tmp, store)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Put the complete folder ``tmp`` in place of ``final`` (rename() cannot replace a non-empty
    folder: the old one is renamed aside first, then removed).  If the second rename fails, the old
    folder is put back, so ``final`` is never left missing; an OSError becomes one QcbedInputError
    naming the folder and ``tmp`` is removed."""
    tmp, final = Path(tmp), Path(final)
    with writing(final.parent, tmp):
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    return final


def _variable_length_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width numpy strings ('<U10') have no zarr v3 specification (zarr warns); variable-length
    strings (object arrays of str) do."""
    conv = {k: v.astype(object) for k, v in ds.variables.items() if v.dtype.kind == "U"}
    return ds.assign_coords({k: v for k, v in conv.items() if k in ds.coords}).assign(
        {k: v for k, v in conv.items() if k in ds.data_vars}) if conv else ds


def set_aside(store: str | Path) -> Path:
    """Move a damaged store to a hidden name beside it, ``.NAME.corrupt-<time>-<id>`` (never deleted:
    the user may inspect it)."""
    store = Path(store)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = store.with_name(f".{store.name}.corrupt-{stamp}-{uuid.uuid4().hex[:4]}")
    with writing(store.parent):
        os.rename(store, dest)
    return dest


def open_store(store: str | Path) -> xr.Dataset:
    """The store's dataset, loaded, after :func:`verify_store`: the values of a damaged store are never
    used; it is moved aside (:func:`set_aside`) and the error says to run again, which recomputes it."""
    store = Path(store)
    if not (store / "zarr.json").exists():
        raise QcbedInputError(str(store), "no zarr store here", "run the stage that writes it first")
    try:
        verify_store(store)
    except CorruptStore as exc:
        dest = set_aside(store)
        raise CorruptStore(str(store), f"{exc.problem}; moved to {dest.name}",
                           "run qcbed run again: it is recomputed") from None
    # chunks=None: plain numpy reads; with dask arrays, a dask client in the process (qcbed run with several
    # configs) would turn every read into a task queued behind the refinements on the cluster
    ds = xr.open_zarr(store, consolidated=False, chunks=None).load()
    ds.attrs.pop(MANIFEST_ATTR, None)  # the store's bookkeeping, not the dataset's: a round trip gives ds back
    return ds
