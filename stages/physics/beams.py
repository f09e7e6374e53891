"""Beam selection: which reflections enter the Bloch-wave structure matrix.

Strategy (after Zuo & Weickenmeier, Ultramicroscopy 57 (1995) 375, who select strong beams by
excitation error and treat the next ones by Bethe perturbation):

1. Pool: reciprocal-lattice points allowed by the lattice centring with |g| <= ``g_max``,
   in the zero-order Laue zone unless ``holz`` is set (then any layer), and with
   min over the tilts of |s_g| <= ``sg_max``.
2. Strong beams (diagonalised exactly): min |s_g| <= ``sg_strong``; or a perturbation strength
   w_g = max_h |U_{g-h}| / (2K min|s_g|) >= ``w_strong`` with respect to the strong beams found so
   far (a beam far from the Ewald sphere but strongly coupled); plus 000 and every requested
   output beam.
3. Weak beams: the rest of the pool with w_g >= ``w_weak``, added to the strong-beam matrix by
   second-order (Bethe) perturbation, U^eff_gh = U_gh - Σ_w U_gw U_wh / (2K s_w) (Bethe 1928).
   Beams below ``w_weak`` are dropped.

Higher-order Laue zones (``holz``; Zuo & Weickenmeier's strong/weak split applied per layer).  At a zone
axis the first-order layer lies H ~ 0.25 1/Å above the Ewald sphere near the centre and cuts it on a ring
of radius sqrt(2 K H) ~ 4.5 1/Å (Si, GeSn [110], 200 kV).  Treating every layer like the zero layer (every
beam with |s_g| <= sg_strong strong) makes the whole ring strong: ~300 more strong beams and ~6000 Bethe
beams, 15-30x the time of the ZOLZ set.  But (bench/holz.py) what changes the zone-axis intensities by
2-8 % of a disk's maximum is the layers' many weak couplings far from the Bragg condition, which Bethe
perturbation handles well, while a ring beam couples to the strong beams through high-order U_{g-h}
(|U| ~ 1e-4-1e-3 Å^-2) and matters only right at its Bragg condition.  So for a HOLZ beam:

4. strong only when it is required, or when perturbation fails for it somewhere in the tile (w_g >= w_strong)
   *and* it is strongly coupled (u_g = max_h |U_{g-h} + iU'_{g-h}| >= ``holz_u_strong``); a HOLZ beam for
   which perturbation fails but that is weakly coupled is left out (its HOLZ line is too faint to matter);
5. a Bethe beam when ``holz_w_weak`` <= w_g < w_strong (a higher threshold than the zero layer's, since
   the layers hold ~10x more beams; ``holz_sg_strong`` > 0 also makes every HOLZ beam within that
   excitation error strong, for reference calculations).

Measured (bench/holz.py, tiles as a run uses them, each disk's maximum over the field): against a converged
HOLZ calculation, Si [110] (100-2000 Å) 0.03-0.11 % (ZOLZ 1.2-1.4 %) with 109-186 strong and 1900-2400
Bethe beams (ZOLZ: ~480); GeSn [1-10] (500-1500 Å) 0.16 % at sg_strong 0.06 (186 + 3947; ZOLZ 4.3 %).
Leaving out the weakly coupled near-Bragg HOLZ beams (u_g < 5e-3 Å^-2) costs <= 0.09 % (Si) and <= 0.46 %
(GeSn) along 81-tilt scans against keeping them exact, which would cost GeSn 3.7x the eigen-solves.  The
Bethe sum over thousands of beams is cheap per tilt because it is expanded over each tile
(bloch.bethe_expansion).

The selection is made once for a whole set of tilts (a CBED disk or a LARBED tilt grid), so all
tilts share one matrix size and are solved as one batch.

Default thresholds and their measured error: see :data:`DEFAULT_SELECTION` and
tests/test_beams.py::test_default_thresholds_error (printed by ``bench/convergence.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import QcbedInputError
from .crystal import Crystal
from .geometry import Geometry
from .lattice import centring_vectors, lattice_points
from .structure_factors import Potential, hkl_key


@dataclass(frozen=True)
class Selection:
    """Beam-selection thresholds (Å^-1 for g and s, dimensionless w)."""

    g_max: float = 5.0
    sg_max: float = 1.5
    sg_strong: float = 0.06
    w_strong: float = 0.08
    w_weak: float = 1e-4
    holz: bool = False
    bethe: bool = True
    #: HOLZ beams (layer != 0, only with ``holz``): Bethe beams down to this perturbation strength
    holz_w_weak: float = 3e-4
    #: a HOLZ beam too close to the Bragg condition for perturbation (w >= w_strong somewhere in the tile) is a
    #: strong beam when its largest coupling to the strong beams max_h |U_{g-h} + iU'_{g-h}| reaches this [Å^-2],
    #: and is left out otherwise (its HOLZ line is too faint to matter; see select_beams).  0 keeps every such
    #: beam (simulation.holz_lines = true): where the information is in the HOLZ line positions (voltage, cell)
    holz_u_strong: float = 5e-3
    #: HOLZ beams with min |s_g| <= this are strong whatever their coupling [Å^-1] (0: by coupling only; the
    #: reference selections of the convergence study set it to sg_strong)
    holz_sg_strong: float = 0.0

    def __post_init__(self):
        for name in ("g_max", "sg_max", "sg_strong"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise QcbedInputError(f"beam_selection.{name}", f"must be a positive number of 1/Å, got {v}")
        for name in ("w_strong", "w_weak", "holz_w_weak", "holz_u_strong", "holz_sg_strong"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise QcbedInputError(f"beam_selection.{name}", f"must be >= 0, got {v}")
        if self.sg_strong > self.sg_max:
            raise QcbedInputError("beam_selection.sg_strong", f"({self.sg_strong}) exceeds sg_max ({self.sg_max})")

    def as_dict(self) -> dict:
        return asdict(self)


#: Defaults, measured against a converged full-matrix calculation (1175 beams, |g| <= 6 1/Å, no
#: Bethe) for Si at 200 kV, [110] zone axis, an off-axis tilt and a 111 systematic row, on every
#: beam with I > 1% (tests/test_beams.py, ``bench/convergence.py``): about 160-190 strong beams
#: plus ~480 Bethe beams; largest relative error 0.25% for thickness <= 1000 Å, 1.0% at 2000 Å,
#: 1.3% at 3000 Å.  For thick zone-axis work use sg_strong = 0.08 (~210 beams: 0.2% at 1000 Å,
#: 0.4% at 3000 Å).
DEFAULT_SELECTION = Selection()


@dataclass
class BeamSet:
    """Selected beams: ``strong`` (ns, 3) first row 000, ``weak`` (nw, 3), and the selection used."""

    strong: np.ndarray
    weak: np.ndarray
    selection: Selection
    #: the tile the set was selected for: its centre kt (3,) [hkl units] and radius [Å^-1] (None, 0 for a set
    #: selected for given tilts); solve expands the Bethe sums over this circle (bloch.bethe_expansion)
    centre_kt: np.ndarray | None = None
    radius_invA: float = 0.0

    @property
    def n_strong(self) -> int:
        return len(self.strong)

    def index_of(self, hkl) -> np.ndarray:
        """Index of each hkl in ``strong`` (raises QcbedInputError if absent)."""
        lut = {tuple(h): i for i, h in enumerate(self.strong.tolist())}
        out = []
        for h in np.atleast_2d(np.asarray(hkl, int)).tolist():
            if tuple(h) not in lut:
                raise QcbedInputError("beams", f"reflection {h[0]} {h[1]} {h[2]} is not among the simulated beams",
                                      "add it to the output beams or raise g_max / sg_strong")
            out.append(lut[tuple(h)])
        return np.array(out, int)


def select_beams(geometry: Geometry, potential: Potential, kt_hkl, selection: Selection = DEFAULT_SELECTION,
                 required=None, pool=None, radius_invA: float = 0.0) -> BeamSet:
    """Choose strong and weak (Bethe) beams for a set of incident tilts kt (nt, 3).

    ``radius_invA``: select for every tilt within this distance of the given tilts (a tile of the
    tilt plane): min |s_g| over the disk is |s_g(kt)| - |∇s_g| R (s_g is linear in the tangential
    tilt for zero-layer beams), so the beam set does not depend on which tilts are in the tile and
    is as symmetric as the disk.

    ``required``: reflections always kept as strong beams (000 is always first).
    ``pool``: an explicit candidate list (e.g. a PyExtal ``hkl`` list) instead of the lattice search.
    """
    cr = geometry.crystal
    kt = np.atleast_2d(np.asarray(kt_hkl, float))
    Kvec = geometry.incident(kt)
    K = geometry.K_invA
    if pool is None:
        cand = lattice_points(cr, selection.g_max, None if selection.holz else geometry.zone)
    else:
        cand = np.atleast_2d(np.asarray(pool, int))
    req = [(0, 0, 0)] + [tuple(int(x) for x in h) for h in (np.atleast_2d(required) if required is not None and len(required) else [])]
    req = list(dict.fromkeys(req))
    cv = centring_vectors(cr)
    for h in req:
        ph = np.asarray(h) @ cv.T if len(cv) else np.zeros(0)
        if np.any(np.abs(ph - np.rint(ph)) > 1e-9):
            raise QcbedInputError("beams", f"{h[0]} {h[1]} {h[2]} is not a reciprocal-lattice point of this "
                                  f"{cr.spacegroup[0]}-centred lattice (its structure factor is zero by centring)",
                                  "check the indices and the cell setting")
    req_arr = np.array(req, np.int64).reshape(-1, 3)
    extra = req_arr[~np.isin(hkl_key(req_arr), hkl_key(cand))]
    if len(extra):
        cand = np.vstack([extra, cand])
    cand = np.unique(cand, axis=0)
    g_cart = cr.recip_to_cart(cand)
    s_abs = np.abs(geometry.excitation_errors(Kvec, g_cart))
    if radius_invA > 0:
        # |grad_kt s_g| = |g_t - (g.e_z) kt/k_z| / K  (tangential tilt derivative)
        kz = -(Kvec @ geometry.e_z)
        gz = g_cart @ geometry.e_z
        g_t = g_cart - np.multiply.outer(gz, geometry.e_z)
        kt_c = Kvec + np.multiply.outer(kz, geometry.e_z)
        grad = g_t[None, :, :] - (gz[None, :, None] * kt_c[:, None, :]) / kz[:, None, None]
        s_abs = np.maximum(s_abs - np.linalg.norm(grad, axis=2) * radius_invA / K, 0.0)
    s_min = s_abs.min(axis=0)
    tile = (kt[0].copy(), radius_invA) if radius_invA > 0 and len(kt) == 1 else (None, 0.0)
    is_req = np.isin(hkl_key(cand), hkl_key(req_arr))
    in_pool = (s_min <= selection.sg_max) | is_req
    cand, s_min, is_req = cand[in_pool], s_min[in_pool], is_req[in_pool]
    hz = (cand @ np.asarray(geometry.zone)) != 0  # higher-order Laue zones

    strong = is_req | ((s_min <= selection.sg_strong) & ~hz) | ((s_min <= selection.holz_sg_strong) & hz & (selection.holz_sg_strong > 0))
    if not selection.bethe:
        return _finish(cand, strong, np.zeros_like(strong), s_min, selection, req, tile)

    # Perturbation strength relative to the current strong set; promote until stable.  A HOLZ beam is promoted
    # only when it is also strongly coupled (u_g >= holz_u_strong); otherwise, if perturbation fails for it, it is
    # left out (a zone-axis HOLZ ring holds hundreds of such beams, each with a line too faint to matter).
    u = _max_coupling(potential, cand, cand[strong])
    for _ in range(6):
        w = u / (2 * K * np.maximum(s_min, 1e-12))
        promote = (~strong) & (w >= selection.w_strong) & (~hz | (u >= selection.holz_u_strong))
        if not promote.any():
            break
        strong |= promote
        u = np.maximum(u, _max_coupling(potential, cand, cand[promote]))  # only the new strong beams
    w = u / (2 * K * np.maximum(s_min, 1e-12))
    weak = (~strong) & (w >= np.where(hz, selection.holz_w_weak, selection.w_weak)) & (~hz | (w < selection.w_strong))
    return _finish(cand, strong, weak, s_min, selection, req, tile)


def _max_coupling(potential: Potential, cand: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """u_g = max over h in ``strong`` of |U_{g-h} + iU'_{g-h}| [Å^-2] for every g in ``cand`` (len(cand),).

    The perturbation strength of g is w_g = u_g / (2K min|s_g|).  Differences are keyed linearly over their
    index box (key(g - h) = key(g) - key(h)), so the (n_cand, n_strong) table of keys is one subtraction and
    the potential is evaluated once per distinct difference.
    """
    if not len(strong) or not len(cand):
        return np.zeros(len(cand))
    cand, strong = np.asarray(cand, np.int64), np.asarray(strong, np.int64)
    lo = cand.min(axis=0) - strong.max(axis=0)
    span = cand.max(axis=0) - strong.min(axis=0) - lo + 1

    def lin(h):
        return (h[:, 0] * span[1] + h[:, 1]) * span[2] + h[:, 2]

    off = int(lin(lo[None, :])[0])
    keys = (lin(cand) - off)[:, None] - lin(strong)[None, :]  # key of g - h within the box
    n_box = int(np.prod(span))
    if n_box <= 8 * keys.size + (1 << 22):
        present = np.zeros(n_box, bool)
        present[keys.ravel()] = True
        uk = np.flatnonzero(present)
        table = np.zeros(n_box)
        pos = None
    else:  # a sparse box: sort instead of a table
        uk, pos = np.unique(keys.ravel(), return_inverse=True)
    h2 = uk % span[2]
    rest = uk // span[2]
    hkl = np.stack([rest // span[1], rest % span[1], h2], 1) + lo[None, :]
    u, up = potential.get(hkl)
    mag = np.abs(u + 1j * up)
    if pos is None:
        table[uk] = mag
        return table[keys].max(axis=1)
    return mag[pos.reshape(keys.shape)].max(axis=1)


def _finish(cand, strong, weak, s_min, selection, req, tile=(None, 0.0)):
    def order(mask):
        idx = np.nonzero(mask)[0]
        return idx[np.lexsort((cand[idx, 2], cand[idx, 1], cand[idx, 0], np.round(s_min[idx], 12)))]

    si = order(strong)
    # 000 first, then the required beams, then the rest by excitation error
    ck = hkl_key(cand)
    sort = np.argsort(ck)
    req_idx = sort[np.searchsorted(ck[sort], hkl_key(np.array(req, np.int64).reshape(-1, 3)))]
    rest = si[~np.isin(si, req_idx)]
    strong_hkl = cand[np.concatenate([req_idx, rest]).astype(int)]
    weak_hkl = cand[order(weak)] if weak.any() else np.zeros((0, 3), int)
    return BeamSet(strong=strong_hkl.astype(int), weak=weak_hkl.astype(int), selection=selection,
                   centre_kt=tile[0], radius_invA=float(tile[1]))
