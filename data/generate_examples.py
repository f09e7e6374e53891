"""Generate the shipped synthetic examples (Si CBED and Si LARBED) with their truth and configs.

Run:  .venv/bin/python data/generate_examples.py      (about 2 minutes; deterministic, seeded)

Both are Si at 200 kV near [110], on the 111 systematic row about 5.7° off the zone
(tilt0 = 4.0 1/Å along e_y), with true structure factors U(1,-1,-1) = 0.97 x IAM and
U(2,-2,-2) = -1.0e-3 Å^-2 (|U_222| = 1e-3; set with all symmetry equivalents), proportional
absorption U' = 0.02 U, Peng table.  The beam selection of the configs (sg_strong = 0.03 1/Å:
~73 strong + ~470 Bethe beams) is the one used to generate them.

* ``si_cbed/``: 440 x 1130 CBED image, disks -111, 000, 1-1-1, 2-2-2 of radius 30 px, gl = 360 px
  (0.00089 1/Å per pixel: sharp lines at 3000 Å need it; at gl = 120 cubic interpolation of the
  pixels is off by 1-2%, more than the Poisson noise, and at gl = 240 it still biased U_222 by 2%), rotation 20°, thickness 3000 Å, ~1e4 counts
  per pixel, per-disk backgrounds, Poisson noise.
* ``si_larbed/``: 5 rocking images (000, ±1-1-1, ±2-2-2) of 64 x 64 tilts, gl = 40 tilt steps per
  |g_111| (0.008 1/Å per step), rotation -35°, thickness 800 Å, Voigt PSF sigma 2.0 / gamma 0.1
  steps, background 20 counts, Poisson noise, with the true variance map.

The configs start where a user would before refinement, not at the truth: the IAM structure factors
(U(1,-1,-1) 3 % above the truth, U(2,-2,-2) zero), a thickness 6-8 % off, the centre 0.57 px off and,
for CBED, gl 0.5 % and the rotation 0.4 degrees off (LARBED: gl and rotation are the scan's
calibration, not refined).  The truth lies strictly inside every search range and on no initial
vertex of Nelder-Mead's simplex (START and the *_config functions below; tests/test_examples.py).

    .venv/bin/python data/generate_examples.py --configs-only   # rewrite the two config.toml only
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from stages.physics.beams import Selection  # noqa: E402
from stages.physics.crystal_io import load_crystal  # noqa: E402
from stages.physics.pattern_geometry import PatternGeometry  # noqa: E402
from stages.simulate import ForwardModel  # noqa: E402
from stages.synthetic import Effects, make_cbed, make_larbed, write_example  # noqa: E402

G1 = (1, -1, -1)
G2 = (2, -2, -2)
TILT0_XY = (-0.16, 4.0)
SELECTION = dict(sg_strong=0.03)


def truth_model(si) -> ForwardModel:
    base = ForwardModel(si, 200.0, (1, 1, 0), x_axis=G1)
    u111 = 0.97 * complex(base.potential.iam([G1])[0])
    return ForwardModel(si, 200.0, (1, 1, 0), x_axis=G1, absorption="proportional", absorption_fraction=0.02,
                        u={G1: u111.real, G2: -1.0e-3}, selection=Selection(**SELECTION))


COMMON = """\
[crystal]
file = "../si.cif"

[microscope]
hv_kV = 200.0
zone = [1, 1, 0]
x_axis = [1, -1, -1]

[simulation]
thickness_A = {thickness}
scattering_table = "peng"
absorption = "proportional"
absorption_fraction = 0.02
solver = "general"
sg_strong = 0.03
# the example data were simulated with the zero-order Laue zone only (data/generate_examples.py), so the
# refinement uses the same model; for measured data leave laue_zones at its default, "auto"
laue_zones = "zolz"
"""


#: The true geometry and thickness of the examples (also in their *_truth.json).
TRUTH = {"cbed": dict(thickness_A=3000.0, gl_px=360.0, rotation_deg=20.0, centre_px=(285.3, 377.7)),
         "larbed": dict(thickness_A=800.0, gl_px=40.0, rotation_deg=-35.0, centre_px=(31.7, 32.2),
                        psf=(2.0, 0.1))}
#: Where the configs start (see the module docstring).  LARBED's gl and rotation are its calibration.
START = {"cbed": dict(thickness_A=2800.0, gl_px=358.2, rotation_deg=19.6, centre_px=(284.9, 378.1)),
         "larbed": dict(thickness_A=860.0, gl_px=40.0, rotation_deg=-35.0, centre_px=(32.1, 31.8),
                        psf=(1.5, 0.05))}
#: Search ranges [Å^-2] of the refined structure factors; the start is the IAM (U_222: zero)
U111_RANGE = (0.046, 0.054)
U222_RANGE = (-2.0e-3, 1.0e-3)

REFLECTIONS = f"""\
# start: the IAM (U_111 = 0.050359 Å^-2, 3.1 % above the truth; U_222 = 0, the truth is -1.0e-3)
reflections = [
  {{hkl = [1, -1, -1], refine = ["U"], U_range = [{U111_RANGE[0]}, {U111_RANGE[1]}]}},
  {{hkl = [2, -2, -2], refine = ["U"], U_range = [{U222_RANGE[0]}, {U222_RANGE[1]}]}},
]"""


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f} %"


def _off(name: str) -> str:
    """The comment lines that say where the truth is and how far the start is from it."""
    t, s = TRUTH[name], START[name]
    dr, dc = (s["centre_px"][i] - t["centre_px"][i] for i in range(2))
    unit = "px" if name == "cbed" else "tilt steps"
    lines = [f"# This config starts where a user would before refinement, NOT at the truth (si_{name}_truth.json):",
             f"#   thickness {s['thickness_A']:g} Å (truth {t['thickness_A']:g} Å: {_pct(s['thickness_A'], t['thickness_A'])})",
             f"#   centre [{s['centre_px'][0]:g}, {s['centre_px'][1]:g}] (truth [{t['centre_px'][0]:g}, {t['centre_px'][1]:g}]: "
             f"{dr:+.1f}, {dc:+.1f} {unit}, {float(np.hypot(dr, dc)):.2f} {unit} off; tilt0 is the truth's, so this is",
             f"#   an orientation error of that size)"]
    if name == "cbed":
        lines.append(f"#   gl {s['gl_px']:g} px (truth {t['gl_px']:g}: {_pct(s['gl_px'], t['gl_px'])}), rotation "
                     f"{s['rotation_deg']:g} deg (truth {t['rotation_deg']:g}: {s['rotation_deg'] - t['rotation_deg']:+.1f} deg)")
    else:
        lines.append("#   gl and rotation: the scan's calibration (the true values here; not refined)")
        lines.append(f"#   PSF sigma, gamma {s['psf'][0]:g}, {s['psf'][1]:g} (truth {t['psf'][0]:g}, {t['psf'][1]:g} tilt steps)")
    lines.append("#   structure factors: the IAM ([refine])")
    return "\n".join(lines) + "\n"


def cbed_config(files: dict) -> str:
    s = START["cbed"]
    return ("# Synthetic Si 111 systematic-row CBED (data/generate_examples.py); truth in si_cbed_truth.json.\n"
            + _off("cbed") + COMMON.format(thickness=s["thickness_A"]) + f"""
[pattern]
kind = "cbed"
file = "{files['pattern']}"
# an ideal counting detector (Poisson) with 1 count^2 of read-out variance: sigma^2 = I + 1
detector = {{gain = 1.0, mixing = 1.0, A = 1.0, delta = 0.0, background_variance = 1.0}}

[geometry]
gl_px = {s['gl_px']}
rotation_deg = {s['rotation_deg']}
centre_px = [{s['centre_px'][0]}, {s['centre_px'][1]}]
tilt0_xy_invA = [{TILT0_XY[0]}, {TILT0_XY[1]}]

[roi]
disks = [[-1, 1, 1], [0, 0, 0], [1, -1, -1], [2, -2, -2]]
# two lines across each disk along the systematic row (display px from the disk centre)
regions = [
  {{corners = [[-25.0, 0.0], [25.0, 0.0], [-25.0, 1.0]], samples = [101, 1]}},
  {{corners = [[-22.0, 12.0], [22.0, 12.0], [-22.0, 13.0]], samples = [89, 1]}},
]

[coarse]
# the thickness by correlation with the IAM simulation, before the fine stage, which starts from it (its
# thickness scan covers ±5 % of its start: from the config's {START['cbed']['thickness_A']:g} Å without this stage it ends in a false
# minimum, 2821 Å at a reduced chi^2 of 1491)
thickness_bracket_A = [2400.0, 3400.0]
box_px = 20.0
step_px = 2.0
radius_px = 26.0
# no orientation search: across a systematic row the correlation does not fix the orientation (with the
# IAM structure factors it runs to the edge of any window, 6 or 12 px); the fine stage's shift refines it
search_px = 0.0

[refine]
gof = "Chi2_multibackground"
{REFLECTIONS}
geometry = ["thickness", "gl", "rotation", "shift"]
""")


def larbed_config(files: dict) -> str:
    s = START["larbed"]
    return ("# Synthetic Si LARBED stack (data/generate_examples.py); truth in si_larbed_truth.json.\n"
            + _off("larbed") + COMMON.format(thickness=s["thickness_A"]) + f"""
[pattern]
kind = "larbed"
file = "{files['pattern']}"
hkl = [[0, 0, 0], [1, -1, -1], [-1, 1, 1], [2, -2, -2], [-2, 2, 2]]
variance = "{files['variance']}"

[geometry]
gl_px = {s['gl_px']}
rotation_deg = {s['rotation_deg']}
centre_px = [{s['centre_px'][0]}, {s['centre_px'][1]}]
tilt0_xy_invA = [{TILT0_XY[0]}, {TILT0_XY[1]}]

[roi]
# the central 21 x 21 tilts, one sample per tilt step (the PSF convolution needs the data's own
# step: sampled every 2 steps it biased U_111 by 1%); padding 9 steps: it holds PSF kernels that
# reach 4 sigma + 8 gamma < 10 steps (the truth's reaches 8.8), and the fit's search stays inside
regions = [{{corners = [[-10.0, -10.0], [10.0, -10.0], [-10.0, 10.0]], samples = [21, 21]}}]
padding = 9

[refine]
gof = "Chi2_LARBED"
{REFLECTIONS}
# gl and rotation of a LARBED scan come from its calibration; refine the rest
geometry = ["thickness", "shift", "psf"]
psf_sigma = {s['psf'][0]}
psf_gamma = {s['psf'][1]}
# normalised simplex tolerance (Nelder-Mead): 1e-3 of the ranges (8e-6 on U_111, 3e-6 on U_222)
xatol = 1e-3
""")


def cbed(si) -> None:
    m = truth_model(si)
    t = TRUTH["cbed"]
    pg = PatternGeometry(m.geometry, "cbed", gl_px=t["gl_px"], rotation_deg=t["rotation_deg"], centre_px=t["centre_px"],
                         tilt0=tuple(m.geometry.kt_from_xy(*TILT0_XY)))
    disks = [(-1, 1, 1), (0, 0, 0), G1, G2]
    eff = Effects(scale=4.0e5, background=[400.0, 600.0, 550.0, 700.0], noise="poisson", seed=11)
    t0 = time.time()
    counts, ideal, var, truth = make_cbed(m, pg, (440, 1130), disks, t["thickness_A"], disk_radius_px=30.0, eff=eff)
    print(f"CBED: {time.time() - t0:.0f} s, counts {counts.min():.0f}..{counts.max():.0f}, "
          f"median in disks {np.median(counts[ideal > 0]):.0f}")
    folder = HERE / "si_cbed"
    files = write_example(folder, "si_cbed", counts, truth)
    (folder / "config.toml").write_text(cbed_config(files))


def larbed(si) -> None:
    m = truth_model(si)
    t = TRUTH["larbed"]
    pg = PatternGeometry(m.geometry, "larbed", gl_px=t["gl_px"], rotation_deg=t["rotation_deg"], centre_px=t["centre_px"],
                         tilt0=tuple(m.geometry.kt_from_xy(*TILT0_XY)))
    disks = [(0, 0, 0), G1, (-1, 1, 1), G2, (-2, 2, 2)]
    eff = Effects(scale=2.0e4, background=20.0, psf_sigma_px=t["psf"][0], psf_gamma_px=t["psf"][1], noise="poisson",
                  seed=12)
    t0 = time.time()
    counts, ideal, var, truth = make_larbed(m, pg, (64, 64), disks, t["thickness_A"], eff=eff)
    print(f"LARBED: {time.time() - t0:.0f} s, counts {counts.min():.0f}..{counts.max():.0f}")
    folder = HERE / "si_larbed"
    files = write_example(folder, "si_larbed", counts, truth, variance=np.maximum(var, 1.0))
    (folder / "config.toml").write_text(larbed_config(files))


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--configs-only" in args:  # the configs' text only; the data files stay as they are
        which = [a for a in args if a != "--configs-only"] or ["cbed", "larbed"]
        if "cbed" in which:
            (HERE / "si_cbed" / "config.toml").write_text(cbed_config({"pattern": "si_cbed.npy"}))
        if "larbed" in which:
            (HERE / "si_larbed" / "config.toml").write_text(
                larbed_config({"pattern": "si_larbed.npy", "variance": "si_larbed_variance.npy"}))
        sys.exit(0)
    si = load_crystal(HERE / "si.cif")
    which = args or ["cbed", "larbed"]
    if "cbed" in which:
        cbed(si)
    if "larbed" in which:
        larbed(si)
