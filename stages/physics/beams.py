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
from .structure_factors import Potential, unique_hkl


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

    def __post_init__(self):
        for name in ("g_max", "sg_max", "sg_strong"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise QcbedInputError(f"beam_selection.{name}", f"must be a positive number of 1/Å, got {v}")
        for name in ("w_strong", "w_weak"):
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


def centring_vectors(crystal: Crystal) -> np.ndarray:
    rot, tra = crystal.symops
    ident = np.all(np.abs(rot - np.eye(3)) < 1e-9, axis=(1, 2))
    return tra[ident]


def lattice_points(crystal: Crystal, g_max: float, zone=None) -> np.ndarray:
    """Reciprocal-lattice points (hkl, int) with 0 < |g| <= g_max allowed by the lattice centring.

    With ``zone`` given, only the zero-order Laue zone (h u + k v + l w = 0).  000 comes first.
    """
    a_len = np.sqrt(np.diag(crystal.G))
    hmax = np.ceil(g_max * a_len).astype(int)
    ranges = [np.arange(-m, m + 1) for m in hmax]
    hkl = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    if zone is not None:
        hkl = hkl[hkl @ np.asarray(zone) == 0]
    glen = crystal.g_length(hkl)
    keep = glen <= g_max * (1 + 1e-12)
    cv = centring_vectors(crystal)
    if len(cv):
        ph = hkl @ cv.T
        keep &= np.all(np.abs(ph - np.rint(ph)) < 1e-9, axis=1)
    hkl, glen = hkl[keep], glen[keep]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], np.round(glen, 9)))
    return hkl[order]


@dataclass
class BeamSet:
    """Selected beams: ``strong`` (ns, 3) first row 000, ``weak`` (nw, 3), and the selection used."""

    strong: np.ndarray
    weak: np.ndarray
    selection: Selection

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
    have = {tuple(h) for h in cand.tolist()}
    extra = [h for h in req if h not in have]
    if extra:
        cand = np.vstack([np.array(extra, int).reshape(-1, 3), cand])
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
    is_req = np.array([tuple(h) in set(req) for h in cand.tolist()])
    in_pool = (s_min <= selection.sg_max) | is_req
    cand, s_min, is_req = cand[in_pool], s_min[in_pool], is_req[in_pool]

    strong = is_req | (s_min <= selection.sg_strong)
    if not selection.bethe:
        return _finish(cand, strong, np.zeros_like(strong), s_min, selection, req)

    # Perturbation strength relative to the current strong set; promote until stable.
    weak = np.zeros_like(strong)
    for _ in range(6):
        w = _coupling_strength(potential, cand, strong, s_min, K)
        promote = (~strong) & (w >= selection.w_strong)
        if not promote.any():
            break
        strong |= promote
    w = _coupling_strength(potential, cand, strong, s_min, K)
    weak = (~strong) & (w >= selection.w_weak)
    return _finish(cand, strong, weak, s_min, selection, req)


def _coupling_strength(potential: Potential, cand, strong, s_min, K):
    """w_g = max over strong h of |U_{g-h} + iU'_{g-h}| / (2K min|s_g|) for every candidate g."""
    sh = cand[strong]
    diff = cand[:, None, :] - sh[None, :, :]
    flat = diff.reshape(-1, 3)
    uniq, inv = unique_hkl(flat)
    u, up = potential.get(uniq)
    mag = np.abs(u + 1j * up)[inv.ravel()].reshape(len(cand), len(sh))
    with np.errstate(divide="ignore"):
        return mag.max(axis=1) / (2 * K * np.maximum(s_min, 1e-12))


def _finish(cand, strong, weak, s_min, selection, req):
    def order(mask):
        idx = np.nonzero(mask)[0]
        return idx[np.lexsort((cand[idx, 2], cand[idx, 1], cand[idx, 0], np.round(s_min[idx], 12)))]

    si = order(strong)
    # 000 first, then the required beams, then the rest by excitation error
    req_idx = []
    lut = {tuple(h): i for i, h in enumerate(cand.tolist())}
    for h in req:
        req_idx.append(lut[h])
    rest = [i for i in si if i not in set(req_idx)]
    strong_hkl = cand[np.array(req_idx + rest, int)]
    weak_hkl = cand[order(weak)] if weak.any() else np.zeros((0, 3), int)
    return BeamSet(strong=strong_hkl.astype(int), weak=weak_hkl.astype(int), selection=selection)
