import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def si():
    from stages.physics.crystal_io import load_crystal

    return load_crystal(DATA / "si.toml")



def truth_geometry(model, truth: dict):
    """The PatternGeometry an example was simulated with (its *_truth.json "geometry"): the shipped
    configs start elsewhere (data/generate_examples.py), so tests that need the truth build it from here."""
    from stages.physics.pattern_geometry import PatternGeometry

    g = dict(truth["geometry"])
    ds = {tuple(int(x) for x in k.split()): tuple(v) for k, v in g.pop("disk_shift_px", {}).items()}
    return PatternGeometry(model.geometry, g.pop("kind"), disk_shift_px=ds,
                           **{k: (tuple(v) if isinstance(v, list) else v) for k, v in g.items()})
