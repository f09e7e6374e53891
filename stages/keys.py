"""Stage keys: what identifies a stage's result, computed from plain data only.

A stage's key is the sha256 of its name, the package version and its parts (the config fields it reads,
the digests of its input files, its upstream stages' keys), as canonical JSON.  :mod:`stages.pipeline`
makes the parts (its ``READS`` table says which fields each stage reads); the report finds its own key
again from a run folder's stores (:func:`report_stage_key`).  No other project module is imported here,
so every module can read keys without an import circle.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from . import __version__


def canonical(obj) -> str:
    """Canonical JSON (sorted keys, no spaces) of plain data; numpy values become Python ones."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.ndarray):
            return plain(v.tolist())
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, Path):
            return str(v)
        return v
    return json.dumps(plain(obj), sort_keys=True, separators=(",", ":"))


def stage_key(stage: str, parts: dict) -> str:
    """sha256 of the stage name, the package version and ``parts`` (config sections, input keys)."""
    return hashlib.sha256(canonical({"stage": stage, "qcbed_version": __version__, **parts}).encode()).hexdigest()


def report_stage_key(fine: str, iam: str | None, coarse: str | None = None) -> str:
    """The report's key: of the stores it reads only (it reads no config field), so that
    :func:`stages.report.report_key` finds it again from a run folder's stores alone."""
    return stage_key("report", {"config": {}, "files": {},
                                "upstream": {"fine": fine, "iam": iam, **({"coarse": coarse} if coarse else {})}})


def dependency_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "scipy", "xarray", "zarr", "dask", "distributed", "prefect", "gemmi"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
