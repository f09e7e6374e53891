"""Structure factors of the independent-atom model (IAM), their symmetry, and the crystal potential.

Phase convention (electron-diffraction physics, Spence & Zuo, *Electron Microdiffraction*, 1992):
the potential is U(r) = Σ_g U_g exp(+2πi g·r), so

    F_e(g) = Σ_j occ_j f_e,j(s) T_j(g) exp(-2πi g·r_j)           [Å, per cell]
    V_g    = h^2 / (2π m0 e Ω) F_e = 47.87765 F_e / Ω             [V]
    U_g    = 2 m e V_g / h^2 = γ F_e / (π Ω)                       [Å^-2]
    F_x(g) = Σ_j occ_j Z_j T_j exp(-2πi g·r_j) - s^2 F_e / C_MB    [electrons] (Mott-Bethe)

with s = |g|/2, T_j = exp(-h^T β_j h), C_MB = m0 e^2/(8π ε0 h^2) = 0.0239337 Å
(../shared/research/anchors.md §3).  Absorption (Bird & King TDS model, absorption.py):
U'_g = γ F'/(πΩ), F'(g) = Σ_j occ_j f'_j(s) T_j(g) exp(-2πi g·r_j) with f' ∝ 1/v.
The crystallographic X-ray convention exp(+2πi h·x) is the complex conjugate; exports for X-ray
programs conjugate explicitly.

Symmetry, in this phase convention.  An operation x' = R x + t (fractional coordinates, R acting on
the column x) maps the atoms of the cell onto themselves, with Debye-Waller exponents β' = R β R^T, so

    F(h) = Σ_j f_j T_j(h) exp(-2πi h·(R x_j + t)) = exp(-2πi h·t) Σ_j f_j T_j(h R) exp(-2πi (h R)·x_j)
         = exp(-2πi h·t) F(h R),   i.e.   F(h R) = F(h) exp(+2πi h·t)

(h a row vector, h R the row vector times the matrix; T'(h) = exp(-h R β R^T h^T) = T(h R)).  Friedel: U_{-g}
= U_g* for a real potential (and U'_{-g} = U'_g* for the real absorptive potential), so the Friedel mate of
an equivalent takes the conjugate phase as well: U(-h R) = exp(-2πi h·t) U(h)*.  gemmi's Op.phase_shift is
-2π h·t (its X-ray convention exp(+2πi h·x)): F(h R) = F(h) exp(-i phase_shift) here.  The centring
translations are operations too, so systematic absences (h R = h with h·t not an integer) follow.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import QcbedInputError
from . import constants as K
from .absorption import b_equivalent, tds_absorptive_factor
from .crystal import Crystal
from .scattering import DEFAULT_TABLE, atomic_number, check_table, electron_scattering_factor, xray_scattering_factor

_TWO_PI_I = 2j * np.pi


def _as_hkl(hkl) -> np.ndarray:
    h = np.atleast_2d(np.asarray(hkl))
    if h.shape[-1] != 3:
        raise QcbedInputError("hkl", f"reflections must be triples h k l, got shape {h.shape}")
    hr = np.rint(h).astype(np.int64)
    if not np.allclose(h, hr):
        raise QcbedInputError("hkl", f"Miller indices must be integers, got {np.asarray(hkl).tolist()}")
    return hr


def _atom_terms(crystal: Crystal, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (reflection, atom): occ * T * exp(-2πi g·r), and the atom's element index."""
    at = crystal.atoms
    h = hkl.astype(float)
    dw = np.exp(-np.einsum("ri,aij,rj->ra", h, at["beta"], h))
    phase = np.exp(-_TWO_PI_I * (h @ at["fract"].T))
    return at["occupancy"][None, :] * dw * phase, at["element"]


def electron_structure_factor(crystal: Crystal, hkl, table: str = DEFAULT_TABLE) -> np.ndarray:
    """F_e(g) [Å per cell], complex, for reflections hkl (n, 3)."""
    table = check_table(table)
    hkl = _as_hkl(hkl)
    s = 0.5 * crystal.g_length(hkl)
    terms, elements = _atom_terms(crystal, hkl)
    out = np.zeros(len(hkl), complex)
    for el in np.unique(elements):
        sel = elements == el
        out += electron_scattering_factor(str(el), s, table) * terms[:, sel].sum(1)
    return out


def absorptive_structure_factor(crystal: Crystal, hkl, table: str = DEFAULT_TABLE, hv_kV: float | None = None) -> np.ndarray:
    """Bird & King TDS absorptive F'(g) [Å per cell], complex, for reflections hkl (n, 3).

    F' = Σ_j occ_j f'_j(s; B_eq,j) T_j(g) exp(-2πi g·r_j): the same occupancies, Debye-Waller factors
    and phases as :func:`electron_structure_factor`, f' from :mod:`.absorption` (isotropic-equivalent
    B_eq inside the integral for anisotropic atoms).  ``hv_kV``: f' at that voltage (∝ c/v);
    None gives the voltage-independent f' with prefactor 2h/(m0 c).  U'_g = γ F'/(πΩ).
    """
    table = check_table(table)
    hkl = _as_hkl(hkl)
    s = 0.5 * crystal.g_length(hkl)
    terms, elements = _atom_terms(crystal, hkl)
    b_eq = np.round(b_equivalent(crystal.atoms["beta"], crystal.G), 9)
    out = np.zeros(len(hkl), complex)
    for el, b in dict.fromkeys(zip(map(str, elements), b_eq.tolist())):
        sel = (elements == el) & (b_eq == b)
        out += tds_absorptive_factor(el, s, b, table, hv_kV) * terms[:, sel].sum(1)
    return out


def xray_structure_factor_iam(crystal: Crystal, hkl) -> np.ndarray:
    """IAM X-ray F [electrons per cell] from the IT92 X-ray table (physics phase convention)."""
    hkl = _as_hkl(hkl)
    s = 0.5 * crystal.g_length(hkl)
    terms, elements = _atom_terms(crystal, hkl)
    out = np.zeros(len(hkl), complex)
    for el in np.unique(elements):
        sel = elements == el
        out += xray_scattering_factor(str(el), s) * terms[:, sel].sum(1)
    return out


def ug_from_fe(fe, crystal: Crystal, hv_kV: float):
    """U_g [Å^-2] = γ F_e / (π Ω)."""
    return K.gamma_factor(hv_kV) * np.asarray(fe) / (np.pi * crystal.volume_A3)


def fe_from_ug(ug, crystal: Crystal, hv_kV: float):
    return np.asarray(ug) * np.pi * crystal.volume_A3 / K.gamma_factor(hv_kV)


def vg_from_fe(fe, crystal: Crystal):
    """V_g [V] = h^2/(2π m0 e Ω) F_e."""
    return K.VG_PER_FE * np.asarray(fe) / crystal.volume_A3


def xray_from_ug(ug, crystal: Crystal, hkl, hv_kV: float) -> np.ndarray:
    """X-ray F [electrons per cell] from electron U_g through Mott-Bethe (physics phase convention).

    F_x = Σ_j occ_j Z_j T_j exp(-2πi g·r_j) - s^2 F_e / C_MB.  The nuclear term uses the IAM
    positions and Debye-Waller factors; at g = 0 F_x = Σ occ Z (electrons per cell).
    """
    hkl = _as_hkl(hkl)
    s2 = (0.5 * crystal.g_length(hkl)) ** 2
    terms, elements = _atom_terms(crystal, hkl)
    z = np.array([atomic_number(str(e)) for e in elements], float)
    nuclear = terms @ z
    fe = fe_from_ug(ug, crystal, hv_kV)
    return nuclear - s2 * fe / K.MOTT_BETHE_A


def unique_hkl(hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(hkl, axis=0, return_inverse=True) for integer triples, through 1-D integer keys (~10x faster),
    by a dense table of the index box when it is not much larger than the list (no sort)."""
    h = np.asarray(hkl, np.int64).reshape(-1, 3)
    if len(h) == 0:
        return h, np.zeros(0, np.int64)
    lo = h.min(axis=0)
    span = h.max(axis=0) - lo + 1
    key = ((h[:, 0] - lo[0]) * span[1] + (h[:, 1] - lo[1])) * span[2] + (h[:, 2] - lo[2])
    n_box = int(np.prod(span))
    if n_box <= 4 * len(key) + (1 << 20):
        # a dense table over the index box: O(n), no sort (the differences of a beam set fill their box)
        present = np.zeros(n_box, bool)
        present[key] = True
        ukey = np.flatnonzero(present)
        rank = np.cumsum(present) - 1
        inv = rank[key]
    else:
        ukey, inv = np.unique(key, return_inverse=True)
    c = ukey % span[2]
    b = (ukey // span[2]) % span[1]
    a = ukey // (span[1] * span[2])
    return np.stack([a + lo[0], b + lo[1], c + lo[2]], axis=1), inv.ravel()


# ------------------------------------------------------------------------------- symmetry
def symmetry_equivalents(crystal: Crystal, hkl) -> list[tuple[tuple[int, int, int], complex]]:
    """Reflections equivalent to hkl by the space group, with phase factors.

    Returns [(h', p)] such that U(h') = p U(hkl) for every potential with the crystal's symmetry
    (p = exp(2πi h·t) for h' = h R).  Friedel mates that are not space-group equivalents are not
    listed (they relate by complex conjugation, see :func:`related_reflections`).  Raises if the
    reflection is systematically absent (two operations map it to itself with different phases).
    """
    h0 = _as_hkl(hkl)[0]
    rot, tra = crystal.symops
    hp = np.rint(np.einsum("i,nij->nj", h0.astype(float), rot)).astype(int)
    ph = np.exp(_TWO_PI_I * (tra @ h0))
    seen: dict[tuple, complex] = {}
    for hh, p in zip(map(tuple, hp), ph):
        if hh in seen:
            if abs(seen[hh] - p) > 1e-9:
                raise SystematicAbsence(tuple(int(x) for x in h0))
        else:
            seen[hh] = complex(p)
    return [(tuple(int(x) for x in k), v) for k, v in seen.items()]


class SystematicAbsence(QcbedInputError):
    def __init__(self, hkl):
        self.hkl = hkl
        super().__init__(f"reflection {hkl[0]} {hkl[1]} {hkl[2]}",
                         "is forbidden by the space group (systematic absence): its U_g is zero by symmetry",
                         "remove it from the refined reflections")


def is_systematically_absent(crystal: Crystal, hkl) -> bool:
    try:
        symmetry_equivalents(crystal, hkl)
        return False
    except SystematicAbsence:
        return True


def absence_kind(crystal: Crystal, hkl) -> str | None:
    """Why a reflection is systematically absent: None (it is not), "centring" or "glide/screw".

    "centring": a pure lattice translation of the space group (R = 1, t a centring vector, e.g. F: h k l
    of mixed parity, (1 0 0) of Si) gives U(h) = exp(2 pi i h.t) U(h) with a phase other than 1: h is not a
    point of the centred reciprocal lattice, so no beam ever travels there, kinematically or dynamically.
    "glide/screw": absent only through an operation with a rotation (e.g. (2 0 0) of Si, by the d glide):
    the kinematic amplitude is zero but the beam exists and is excited by double diffraction."""
    if not is_systematically_absent(crystal, hkl):
        return None
    h0 = _as_hkl(hkl)[0].astype(float)
    rot, tra = crystal.symops
    pure = [t for r, t in zip(rot, tra) if np.allclose(r, np.eye(3))]
    if any(abs(np.exp(_TWO_PI_I * (t @ h0)) - 1) > 1e-9 for t in pure):
        return "centring"
    return "glide/screw"


def centric_phase(crystal: Crystal, hkl) -> float | None:
    """Allowed phase φ0 [rad] of a centric reflection (U = ±|U| e^{iφ0}), or None if acentric.

    A reflection is centric when -h is a space-group equivalent of h, U(-h) = p U(h); with
    Friedel's U(-h) = U(h)* this fixes U(h) up to sign: U(h)* = p U(h), e^{-2iφ} = p, φ0 = -arg(p)/2
    (mod π).  For a screw or glide operation h·t need not be an integer: e.g. P3_2 21, (0 k l) is centric
    through x-y, -y, -z+1/3 with p = exp(2πi l/3), φ0 = -π l/3.
    """
    h0 = tuple(int(x) for x in _as_hkl(hkl)[0])
    for h, p in symmetry_equivalents(crystal, h0):
        if h == (-h0[0], -h0[1], -h0[2]):
            return float(-np.angle(p) / 2)
    return None


def related_reflections(crystal: Crystal, hkl) -> list[tuple[tuple[int, int, int], complex, bool]]:
    """All reflections whose U follows from U(hkl): [(h', q, conj)] with U(h') = q·U (conj False) or
    U(h') = q·conj(U) (conj True); use :func:`propagate` rather than writing the rule out again.

    Space-group equivalents h' = h R (conj False, q = p = exp(2πi h·t)) plus their Friedel mates -h'
    (conj True, U(-h') = conj(p U(h)) = conj(p) conj(U(h)): listed with q = conj(p)) when those are not
    already space-group equivalents.
    """
    eq = symmetry_equivalents(crystal, hkl)
    out = [(h, p, False) for h, p in eq]
    have = {h for h, _ in eq}
    for h, p in eq:
        m = (-h[0], -h[1], -h[2])
        if m not in have:
            out.append((m, complex(np.conj(p)), True))
            have.add(m)
    return out


def propagate(crystal: Crystal, hkl, value) -> dict[tuple[int, int, int], complex]:
    """{h': U(h')} for every reflection related to hkl by the space group and Friedel's law, given
    U(hkl) = ``value`` (complex): U(h') = q·value, or q·conj(value) for the Friedel mates
    (:func:`related_reflections`).  The result is Hermitian (U(-h') = conj U(h')) whenever ``value``
    is allowed (any value for an acentric reflection, ±|U| e^{iφ0} for a centric one)."""
    val = complex(value)
    return {h: complex(q * (np.conj(val) if conj else val)) for h, q, conj in related_reflections(crystal, hkl)}


class SymmetryConsistencyError(RuntimeError):
    """Internal error: overrides that break Friedel's law or the space-group symmetry (a bug, never bad input)."""


#: relative tolerance of the Hermiticity check of :meth:`Potential.set`
HERMITIAN_RTOL = 1e-10


def check_hermitian(values: dict, what: str = "U") -> float:
    """Largest |U(-h) - conj U(h)| / max|U| over the reflections of ``values`` ({h: U}) whose mate -h is
    listed too; raises :class:`SymmetryConsistencyError` above :data:`HERMITIAN_RTOL`."""
    if not values:
        return 0.0
    scale = max(abs(v) for v in values.values())
    worst, where = 0.0, None
    for h, v in values.items():
        m = values.get((-h[0], -h[1], -h[2]))
        if m is None:
            continue
        r = abs(m - np.conj(v)) / scale if scale > 0 else 0.0
        if r > worst:
            worst, where = r, h
    if worst > HERMITIAN_RTOL:
        raise SymmetryConsistencyError(
            f"internal error: the {what} overrides are not Hermitian: {what}({' '.join(map(str, where))}) and its "
            f"Friedel mate differ from complex conjugates by {worst:.3g} of the largest value (tolerance "
            f"{HERMITIAN_RTOL:g}); the potential would not be real. Please report this with the crystal and reflection.")
    return worst


# ------------------------------------------------------------------------------- potential
ABSORPTION_MODELS = ("none", "proportional", "bird_king")


#: entries of the IAM box table (16 bytes U, 16 U', 1 flag each): 8e6 is ~270 MB; larger boxes are computed
#: directly per call
_IAM_TABLE_MAX = 8_000_000


def _box_keys(h: np.ndarray, box: dict) -> np.ndarray:
    s = box["span"]
    g = h + box["half"][None, :]
    return (g[:, 0] * s[1] + g[:, 1]) * s[2] + g[:, 2]


def _unbox(keys: np.ndarray, box: dict) -> np.ndarray:
    s = box["span"]
    c = keys % s[2]
    r = keys // s[2]
    return np.stack([r // s[1], r % s[1], c], 1) - box["half"][None, :]


def hkl_key(hkl) -> np.ndarray:
    """One int64 per reflection for hkl (..., 3) (|h|, |k|, |l| < 2^20): sortable, searchable keys."""
    h = np.asarray(hkl, np.int64) + (1 << 20)
    return (h[..., 0] << 42) | (h[..., 1] << 21) | h[..., 2]


def _lookup(keys: np.ndarray, store: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mask of keys present in the override dict ``store``, their values)."""
    if not store:
        return np.zeros(len(keys), bool), np.zeros(0, complex)
    sk = hkl_key(np.array(list(store.keys()), np.int64).reshape(-1, 3))
    sv = np.array(list(store.values()), complex)
    o = np.argsort(sk)
    sk, sv = sk[o], sv[o]
    pos = np.clip(np.searchsorted(sk, keys), 0, len(sk) - 1)
    hit = sk[pos] == keys
    return hit, sv[pos[hit]]


@dataclass
class Potential:
    """The crystal potential U_g + i U'_g [Å^-2] at one voltage, with refined overrides.

    IAM values come from ``table``; absorption is ``absorption`` = 'none', 'proportional'
    (U'_g = absorption_fraction * U_g, phases included) or 'bird_king' (thermal diffuse scattering
    after Bird & King 1990 from the same f_e table and each atom's B, U'_g = γ F'/(πΩ) with F' from
    :func:`absorptive_structure_factor`; ``absorption_fraction`` is then unused), and per-reflection
    U'_g given with :meth:`set`.  :meth:`set` on one reflection sets all its symmetry equivalents
    and Friedel mates with the correct phases, so the potential keeps the crystal's symmetry.  A
    refined U_g override carries U'_g along only for 'proportional'.
    """

    crystal: Crystal
    hv_kV: float
    table: str = DEFAULT_TABLE
    absorption: str = "none"
    absorption_fraction: float = 0.0
    _u: dict = field(default_factory=dict, repr=False)
    _up: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    #: IAM U, U' (no overrides: they never change) on a dense box of indices, filled as reflections are asked
    #: for: a run asks for the same differences tile after tile and step after step
    _iam_box: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.table = check_table(self.table)
        K.gamma_factor(self.hv_kV)  # validates
        if self.absorption not in ABSORPTION_MODELS:
            raise QcbedInputError("absorption", f"unknown model {self.absorption!r}",
                                  f"choose one of {', '.join(ABSORPTION_MODELS)}, or give U' per reflection")
        if not np.isfinite(self.absorption_fraction) or self.absorption_fraction < 0:
            raise QcbedInputError("absorption_fraction", f"must be >= 0, got {self.absorption_fraction}",
                                  "typical values are 0.02-0.1")
        if self.absorption in ("none", "bird_king"):
            self.absorption_fraction = 0.0

    @property
    def overrides(self) -> dict:
        return {"U": dict(self._u), "Uprime": dict(self._up)}

    def iam(self, hkl) -> np.ndarray:
        """IAM U_g [Å^-2] (complex) for hkl (n, 3)."""
        hkl = _as_hkl(hkl)
        return ug_from_fe(electron_structure_factor(self.crystal, hkl, self.table), self.crystal, self.hv_kV)

    def iam_prime(self, hkl) -> np.ndarray:
        """Model U'_g [Å^-2] (complex) for hkl (n, 3), without overrides."""
        hkl = _as_hkl(hkl)
        if self.absorption == "bird_king":
            fp = absorptive_structure_factor(self.crystal, hkl, self.table, self.hv_kV)
            return ug_from_fe(fp, self.crystal, self.hv_kV)
        return self.absorption_fraction * self.iam(hkl)

    def set(self, hkl, U=None, Uprime=None) -> list[tuple[int, int, int]]:
        """Set U and/or U' of reflection hkl (complex or real) and of all reflections related by symmetry.

        U(h') follows from the value by :func:`propagate`: q·U for the space-group equivalents h' = h R
        (q = exp(2πi h·t)), conj(q)·conj(U) for their Friedel mates.  A centric value is projected onto its
        allowed phase line (after the check that it lies on it to 1e-9), so the overrides are exactly
        Hermitian; they are checked to be (:func:`check_hermitian`, an internal error if not).
        Returns the list of reflections set.
        """
        rel = related_reflections(self.crystal, hkl)
        phi0 = centric_phase(self.crystal, hkl)
        h0 = " ".join(str(int(x)) for x in _as_hkl(hkl)[0])
        for val, store, name in ((U, self._u, "U"), (Uprime, self._up, "U'")):
            if val is None:
                continue
            val = complex(val)
            if not np.isfinite(val):
                raise QcbedInputError(f"{name} of {h0}", f"must be finite, got {val}")
            if phi0 is not None and abs((val * np.exp(-1j * phi0)).imag) > 1e-9 * max(abs(val), 1e-300):
                raise QcbedInputError(f"{name} of {h0}", f"the reflection is centric: its phase must be "
                                      f"{np.degrees(phi0):.1f} or {np.degrees(phi0) + 180:.1f} degrees, got "
                                      f"{np.degrees(np.angle(val)):.2f}", "give a real value times that phase")
            if phi0 is not None:  # exactly on the allowed line: the conjugate of -h is then exactly p U(h)
                val = complex((val * np.exp(-1j * phi0)).real * np.exp(1j * phi0))
            new = {h: complex(q * (np.conj(val) if conj else val)) for h, q, conj in rel}
            check_hermitian(new, name)
            store.update(new)
        self._cache.clear()
        return [h for h, _, _ in rel]

    def __getstate__(self):  # the table and its lock stay with the process (a lock does not pickle)
        state = dict(self.__dict__)
        state.update(_cache={}, _iam_box={}, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _iam_direct(self, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = self.iam(hkl)
        up = self.iam_prime(hkl) if self.absorption == "bird_king" else self.absorption_fraction * u
        return u, up

    def _iam_pair(self, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IAM (U, U') for hkl (n, 3) without overrides, through the box table (computed once per reflection)."""
        h = np.asarray(hkl, np.int64)
        if len(h) < 64:
            return self._iam_direct(hkl)
        need = np.abs(h).max(axis=0)
        with self._lock:
            box = self._iam_box
            if not box or np.any(need > box["half"]):
                half = np.maximum(need + 4, box["half"] if box else 0)
                span = 2 * half + 1
                if int(np.prod(span)) > _IAM_TABLE_MAX:
                    return self._iam_direct(hkl)
                new = {"half": half, "span": span, "have": np.zeros(int(np.prod(span)), bool),
                       "u": np.zeros(int(np.prod(span)), complex), "up": np.zeros(int(np.prod(span)), complex)}
                if box:  # carry the computed entries over
                    old = np.flatnonzero(box["have"])
                    oh = _unbox(old, box)
                    nk = _box_keys(oh, new)
                    new["have"][nk] = True
                    new["u"][nk], new["up"][nk] = box["u"][old], box["up"][old]
                self._iam_box = box = new
            keys = _box_keys(h, box)
            miss = ~box["have"][keys]
            if miss.any():
                mk = np.unique(keys[miss])
                um, upm = self._iam_direct(_unbox(mk, box))
                box["u"][mk], box["up"][mk] = um, upm
                box["have"][mk] = True
            return box["u"][keys], box["up"][keys]

    def get(self, hkl) -> tuple[np.ndarray, np.ndarray]:
        """U_g and U'_g [Å^-2] (complex arrays) for hkl (n, 3), overrides applied."""
        hkl = _as_hkl(hkl)
        key = hkl.tobytes()
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        u, up = self._iam_pair(hkl)
        if self._u or self._up:
            k = hkl_key(hkl)
            hu, iu = _lookup(k, self._u)
            hp, ip = _lookup(k, self._up)
            if hu.any():
                u[hu] = iu
                if self.absorption == "proportional":
                    own = hu & ~hp
                    up[own] = self.absorption_fraction * u[own]
            if hp.any():
                up[hp] = ip
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = (u, up)
        return u, up

    def mean_inner_potential_V(self) -> float:
        fe0 = electron_structure_factor(self.crystal, [[0, 0, 0]], self.table)[0].real
        return float(vg_from_fe(fe0, self.crystal))

    def u0(self) -> tuple[float, float]:
        """U_0 and U'_0 [Å^-2] (mean potential and mean absorption)."""
        u, up = self.get([[0, 0, 0]])
        return float(u[0].real), float(up[0].real)
