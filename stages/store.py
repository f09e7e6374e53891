"""Zarr stage stores written atomically: a temporary name in the same folder, then a rename.

A store that exists under its final name is therefore always complete; an interrupted write
leaves only a hidden ``.<name>.tmp-*`` folder, removed by the next write
(../shared/research/stack.md §2).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import xarray as xr

from .errors import QcbedInputError


def write_store(ds: xr.Dataset, store: str | Path) -> Path:
    """Write ``ds`` to ``store`` (a .zarr folder) under a temporary name, then rename into place."""
    store = Path(store)
    parent = store.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QcbedInputError(str(parent), f"cannot create output folder: {exc.strerror}") from None
    if store.exists() and not (store / "zarr.json").exists() and any(store.iterdir()):
        raise QcbedInputError(str(store), "exists and is not a zarr store; refusing to replace it",
                              "choose another output path")
    for junk in parent.glob(f".{store.name}.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    tmp = parent / f".{store.name}.tmp-{uuid.uuid4().hex[:8]}"
    ds = _variable_length_strings(ds)
    ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False)
    return replace_dir(tmp, store)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Put the complete folder ``tmp`` in place of ``final`` (rename() cannot replace a non-empty
    folder: the old one is renamed aside first, then removed)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
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


def open_store(store: str | Path) -> xr.Dataset:
    store = Path(store)
    if not (store / "zarr.json").exists():
        raise QcbedInputError(str(store), "no zarr store here", "run the stage that writes it first")
    # chunks=None: plain numpy reads; with dask arrays, a dask client in the process (qcbed run with several
    # configs) would turn every read into a task queued behind the refinements on the cluster
    return xr.open_zarr(store, consolidated=False, chunks=None).load()
