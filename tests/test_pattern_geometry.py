"""Pixel <-> display <-> Kt mapping: round trips, metric correctness, tilt0 from a known pixel."""

import numpy as np
import pytest

from stages.errors import QcbedInputError
from stages.physics.crystal_io import crystal_from_mapping
from stages.physics.geometry import Geometry
from stages.physics.pattern_geometry import PatternGeometry

GAN = crystal_from_mapping({"cell": [3.19, 3.19, 5.189, 90, 90, 120], "spacegroup": "P 63 m c",
                            "atoms": [{"label": "Ga", "xyz": [1 / 3, 2 / 3, 0], "B": 0.35},
                                      {"label": "N", "xyz": [1 / 3, 2 / 3, 0.377], "B": 0.82}]})


def _geometries(si):
    return {
        "cubic": (Geometry(si, 200.0, (1, 1, 0), (1, -1, 1)), [(0, 0, 0), (1, -1, 1), (-1, 1, -1), (2, -2, 2), (0, 0, 2)]),
        "hexagonal": (Geometry(GAN, 200.0, (1, 2, 0), (0, 0, 2)), [(0, 0, 0), (0, 0, 2), (2, -1, 0), (2, -1, 2), (-2, 1, -1)]),
    }


@pytest.mark.parametrize("which", ["cubic", "hexagonal"])
@pytest.mark.parametrize("kind", ["cbed", "larbed"])
def test_round_trip_pixel_display_tilt(si, which, kind):
    geo, disks = _geometries(si)[which]
    pg = PatternGeometry(geo, kind, gl_px=87.3, rotation_deg=-33.7, centre_px=(251.2, 240.9), tilt0=(0.13, -0.13, 0.4),
                         shift_px=(1.7, -2.2), disk_shift_px={disks[1]: (0.4, -0.3), disks[3]: (-1.1, 0.25)}, scale_y=1.011)
    rng = np.random.default_rng(3)
    for h in disks:
        rc = rng.uniform(0, 500, size=(200, 2))
        kt = pg.pixel_to_tilt(rc, h)
        back = pg.tilt_to_pixel(kt, h)
        assert np.max(np.abs(back - rc)) < 1e-6
        # the tilt lies in the zone plane (tangential)
        assert np.allclose(geo.kt_cart(kt) @ geo.e_z, 0, atol=1e-12)
    # the flipped (mirror) detector too
    pf = pg.with_(flip=True)
    rc = rng.uniform(0, 500, size=(50, 2))
    assert np.max(np.abs(pf.tilt_to_pixel(pf.pixel_to_tilt(rc, disks[2]), disks[2]) - rc)) < 1e-6


def test_disk_positions_use_the_metric(si):
    """CBED disk g sits at gl·|g|/|g_x| pixels from 000, at the angle between g and g_x (metric, not hkl dot products)."""
    geo = Geometry(GAN, 200.0, (1, 2, 0), (0, 0, 2))
    pg = PatternGeometry(geo, "cbed", gl_px=100.0, rotation_deg=0.0, centre_px=(0, 0))
    for h in [(2, -1, 0), (2, -1, 2), (-2, 1, 1)]:
        off = pg.disk_offset(h)[0]
        glen = GAN.g_length(h)
        gx = GAN.g_length((0, 0, 2))
        assert np.hypot(*off) == pytest.approx(100 * glen / gx, rel=1e-12)
        cosang = np.asarray(h, float) @ GAN.G_star @ np.array([0, 0, 2.0]) / (glen * gx)
        assert off[0] / np.hypot(*off) == pytest.approx(cosang, abs=1e-12)
    # g_x itself lies on +x at gl pixels; a 90-degree rotation puts it straight up the screen (-row)
    assert np.allclose(pg.disk_offset((0, 0, 2))[0], [100, 0])
    up = pg.with_(rotation_deg=90.0).display_to_pixel([[0, 0]], (0, 0, 2))[0]
    assert np.allclose(up, [-100, 0], atol=1e-12)


def test_tilt_scale_and_direction(si):
    geo = Geometry(si, 200.0, (1, 1, 0), (1, -1, 1))
    pg = PatternGeometry(geo, "cbed", gl_px=50.0)
    # moving gl pixels along display x changes the tilt by exactly g_x
    kt = pg.display_to_tilt([[50.0, 0.0]])[0]
    assert np.allclose(kt, [1, -1, 1], atol=1e-12)
    # screen-down (+y) is -e_y = -(zone x g_x)
    kt = pg.display_to_tilt([[0.0, -10.0]])[0]
    assert geo.kt_cart(kt) @ geo.e_y == pytest.approx(10 * pg.pixel_size_invA, rel=1e-12)


def test_tilt0_from_known_pixel(si):
    geo = Geometry(si, 200.0, (1, 1, 0), (1, -1, 1))
    pg = PatternGeometry(geo, "larbed", gl_px=40.0, rotation_deg=12.0, centre_px=(75, 75))
    known = np.array([0.21, -0.21, 0.37])
    pg2 = pg.with_tilt0_from_pixel((60.5, 90.25), known)
    assert np.allclose(pg2.pixel_to_tilt([(60.5, 90.25)])[0], known, atol=1e-12)


def test_bad_geometry_values(si):
    geo = Geometry(si, 200.0, (1, 1, 0))
    with pytest.raises(QcbedInputError, match="geometry.gl"):
        PatternGeometry(geo, "cbed", gl_px=-3)
    with pytest.raises(QcbedInputError, match="pattern.kind"):
        PatternGeometry(geo, "stem", gl_px=3)
    with pytest.raises(QcbedInputError, match="geometry.centre"):
        PatternGeometry(geo, "cbed", gl_px=3, centre_px=(1, np.nan))
