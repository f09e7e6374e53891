"""Batched Bloch-wave solver.

For incident wave vector K (inside the crystal, |K|^2 = k^2 + U_0) and inward unit foil normal
n, the Bloch-wave coefficients C_g and eigenvalues γ (k = K + γ n) of the fast-electron
Schrödinger equation satisfy, to first order in γ (Spence & Zuo, *Electron Microdiffraction*
(1992) ch. 5; Zuo & Spence eq. 5.17 lineage):

    Σ_h A_gh C_h = 2 K_n γ p_g C_g,   A_gh = 2K s_g δ_gh + (U_{g-h} + i U'_{g-h}) (1 - δ_gh) + i U'_0 δ_gh,

with p_g = 1 + g_n / K_n the foil-normal factor (K_n = K·n, g_n = g·n).  Substituting
C = P^{-1/2} B gives the standard eigenproblem M B = γ B with

    M = P^{-1/2} A P^{-1/2} / (2 K_n),

Hermitian without absorption.  Boundary condition at the entrance surface: Σ_j α_j C^j = e_000,
so B α = e_000 (p_000 = 1).  At depth t the beam amplitudes are φ(t) = P^{-1/2} B diag(exp(2πi γ t)) α,
and the reported intensity is the beam current through the exit surface,

    I_g(t) = p_g |φ_g(t)|^2 = |Σ_j B_gj α_j exp(2πi γ_j t)|^2,

so that without absorption Σ_g I_g = 1 exactly (flux conservation).

Weak beams enter by Bethe's second-order perturbation (see beams.py); for a tile's beam set the sums are
expanded over the tile (:func:`bethe_expansion`), so thousands of HOLZ Bethe beams cost little per tilt.

Solvers, all batched over tilts (no Python loop over tilts; tilts are processed in chunks
only to bound memory):

* ``general``: complex non-Hermitian eigen-solution (LAPACK geev) and α from a linear solve.
* ``hermitian``: split M = H + i A with H, A Hermitian; eigen-solve H (LAPACK heevd, real syevd for a
  centrosymmetric structure), absorption by quasi-degenerate perturbation theory, exact within clusters
  of nearly degenerate Bloch states (see :func:`_eig_hermitian`).  Measured against ``general``
  (Si [110], 200 kV, default beams, proportional absorption, t = 100-2000 Å, every beam): max |dI|
  5e-6 (U'/U = 0.02), 8e-5 (0.05), 8e-5 (0.1), 8e-4 (0.2), 2e-3 (0.3) at the zone axis and 30 tilts
  within 0.025 Å^-1 (tests/test_bloch.py::test_hermitian_quasi_degenerate_accuracy); 0.4-0.5x the time of
  ``general`` for ~160 beams.  Exact without absorption.
* ``auto``: ``hermitian`` for the tilts whose error estimate is below 5e-4 (measured true error <= 1.6x
  the estimate), ``general`` for the rest (:func:`_eig_auto`); ``timing["method_used"]`` says which.

One eigen-solution serves every thickness: :meth:`BlochSolution.intensities` takes any list of
thicknesses without re-solving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..errors import QcbedInputError
from .beams import BeamSet
from .geometry import Geometry
from .structure_factors import Potential, unique_hkl

METHODS = ("general", "hermitian", "auto")

#: Elements (complex128) of the largest per-chunk intermediate (the structure-matrix stack or the
#: Bethe product, ns x max(ns, nw) per tilt): ~32 MB, small enough to stay cache- and page-friendly
#: (larger chunks measured up to 1.4x slower from page faults, bench/bloch.py).
_CHUNK_ELEMENTS = 2_000_000


@dataclass
class CouplingMatrices:
    """Tilt-independent couplings U + iU' among the selected beams [Å^-2]."""

    ss: np.ndarray  # (ns, ns), diagonal = i U'_0
    sw: np.ndarray  # (ns, nw)
    ws: np.ndarray  # (nw, ns)
    w_diag: complex  # i U'_0 on the weak-beam diagonal
    #: (ns + nw,) beam phases d_g = exp(-2πi g·c) of the origin at the inversion centre c, or None: the
    #: couplings are those of that origin, conj(d_g) U_{g-h} d_h (real for a centrosymmetric potential)
    phase: np.ndarray | None = None


def origin_phases(potential: Potential, hkl) -> np.ndarray | None:
    """d_g = exp(-2πi g·c) (n,) for the crystal's inversion centre c (None without one).

    The couplings conj(d_g) U_{g-h} d_h = U_{g-h} exp(2πi (g-h)·c) are those of the potential with its
    origin at c, which are real when the potential is centrosymmetric (the IAM, Bird-King U', values set
    with Potential.set); the structure matrix changes by the diagonal unitary similarity D^H M D, so the
    eigenvalues and the intensities are unchanged and the amplitudes are psi_g = d_g psi'_g, while the
    ``hermitian`` solver can use real arithmetic (about 3x faster).  Origin choice 1 of Fd-3m (GeSn)
    is the case in practice.
    """
    c = potential.crystal.inversion_centre
    if c is None or not np.any(c):
        return None
    return np.exp(-2j * np.pi * (np.asarray(hkl, float) @ c))


def _couplings(potential: Potential, rows: np.ndarray, cols: np.ndarray, transpose: bool = False):
    """U_{g-h} + i U'_{g-h} (len(rows), len(cols)) [Å^-2], looked up once per distinct g - h.

    ``transpose``: also the couplings of cols to rows, U_{h-g} + i U'_{h-g} = conj(U_{g-h}) + i conj(U'_{g-h})
    (U_{-g} = U_g^*, U'_{-g} = U'_g^*: the potential and its absorptive part are real in space).
    """
    diff = (rows[:, None, :] - cols[None, :, :]).reshape(-1, 3)
    uniq, inv = unique_hkl(diff)
    u, up = potential.get(uniq)
    shape = (len(rows), len(cols))
    fwd = (u + 1j * up)[inv.ravel()].reshape(shape)
    if not transpose:
        return fwd
    return fwd, (np.conj(u) + 1j * np.conj(up))[inv.ravel()].reshape(shape).T.copy()


def coupling_matrices(potential: Potential, beams: BeamSet) -> CouplingMatrices:
    """The strong-strong, strong-weak and weak-strong couplings; the weak-weak block (never used: the
    Bethe sum runs over one weak beam at a time) is not formed, so memory is (ns + 2 nw) ns, not (ns + nw)^2
    (a HOLZ set of 200 strong and 5000 Bethe beams: 32 MB instead of 0.4 GB)."""
    s, w = beams.strong, beams.weak
    ss = _couplings(potential, s, s)
    sw, ws = _couplings(potential, s, w, transpose=True)
    phase = origin_phases(potential, np.vstack([s, w]))
    ns = len(s)
    if phase is not None:
        ps, pw = phase[:ns], phase[ns:]
        ss = np.conj(ps)[:, None] * ss * ps[None, :]
        sw = np.conj(ps)[:, None] * sw * pw[None, :]
        ws = np.conj(pw)[:, None] * ws * ps[None, :]
    _, up0 = potential.u0()
    np.fill_diagonal(ss, 1j * up0)
    return CouplingMatrices(ss=ss, sw=sw, ws=ws, w_diag=1j * up0, phase=phase)


#: Bethe sums of a tile's beam set are expanded about the incident vector of the tile's centre, beam by beam to
#: the lowest order whose remainder rho^(N+1) / (1 - rho) is below _BETHE_TOL of that beam's own term, rho the
#: bound of |a_w.f| over the tile's circle (order 0 up to rho = 1e-3, 1 up to 0.031, 2 up to 0.095); beams
#: with a larger rho (close to the Bragg condition somewhere in the tile) are summed exactly at every tilt.
_BETHE_TOL = 1e-3
_BETHE_MAX_ORDER = 2
#: (order, first term, number of terms) of the polynomial in f: 1 | f_1 f_2 f_3 | f_i f_j (i <= j)
_BETHE_TERMS = ((0, 0, 1), (1, 1, 3), (2, 4, 6))


@dataclass
class BetheExpansion:
    """Bethe sum of the smooth weak beams as a polynomial in the incident wave vector.

    The denominator of weak beam w, d_w = 2K s_w + iU'_0, is exactly linear in the Cartesian incident vector:
    2K s_w = -(2 K.g_w + g_w^2), so with f = K - K_ref, d_w = d0_w - 2 g_w.f and

        1/d_w = (1/d0_w) Σ_k (a_w.f)^k,  a_w = 2 g_w / d0_w.

    Truncated at order N_w (per beam, see _BETHE_TOL), Σ_w C_gw C_wh / d_w = Σ_m φ_m(f) P_m with at most ten
    tilt-independent matrices P_m (monomials 1, f_i, f_i f_j) formed once per call, Σ_w (terms of N_w) ns^2
    operations, so a tilt costs 10 ns^2 instead of ns^2 n_w: the (ns, nw) product per tilt is not formed.
    ``exact``: the weak beams (indices) summed per tilt.
    """

    K_ref: np.ndarray  # (3,) Cartesian [Å^-1]
    P: np.ndarray  # (n_terms, ns, ns) [Å^-2], n_terms = 1, 4 or 10
    exact: np.ndarray  # (n_exact,) int, indices into the weak beams
    n_smooth: int

    def terms(self, Kvec: np.ndarray) -> np.ndarray:
        """φ_m(f) (nt, n_terms) for incident vectors (nt, 3)."""
        f = Kvec - self.K_ref[None, :]
        f1, f2, f3 = f[:, 0], f[:, 1], f[:, 2]
        one = np.ones_like(f1)
        cols = [one, f1, f2, f3, f1 * f1, f2 * f2, f3 * f3, 2 * f1 * f2, 2 * f1 * f3, 2 * f2 * f3]
        return np.stack(cols[:len(self.P)], 1)


def _monomial_weights(a: np.ndarray, order: int) -> np.ndarray:
    """Coefficients of the monomials of (a.f)^k, k <= order, for the beams' a (n, 3): (n_terms(order), n)."""
    rows = [np.ones(len(a), complex)]
    if order >= 1:
        rows += [a[:, 0], a[:, 1], a[:, 2]]
    if order >= 2:
        rows += [a[:, 0] ** 2, a[:, 1] ** 2, a[:, 2] ** 2, a[:, 0] * a[:, 1], a[:, 0] * a[:, 2], a[:, 1] * a[:, 2]]
    return np.stack(rows)


def bethe_expansion(geometry: Geometry, beams: BeamSet, coup: CouplingMatrices, kt_hkl,
                    tol: float = _BETHE_TOL) -> BetheExpansion | None:
    """The :class:`BetheExpansion` of a tile's weak beams, about the incident vector of the tile's centre.

    Only for a beam set selected for a tile (``beams.centre_kt``, ``beams.radius_invA``) and tilts kt (nt, 3)
    inside its circle; None otherwise (the sums are then exact per tilt).  The order of each beam is set by
    its largest |a_w.f| over the whole circle, not over the given tilts, so a tilt's intensities do not
    depend on which other tilts of the tile are solved with it.
    """
    nw = len(beams.weak)
    if nw == 0 or beams.centre_kt is None or beams.radius_invA <= 0:
        return None
    kt = np.atleast_2d(np.asarray(kt_hkl, float))
    R = float(beams.radius_invA)
    c_t = geometry.kt_cart(beams.centre_kt)
    if np.any(np.linalg.norm(geometry.kt_cart(kt) - c_t[None, :], axis=1) > R * (1 + 1e-9)):
        return None
    K = geometry.K_invA
    K_ref = geometry.incident(beams.centre_kt)
    gw = geometry.crystal.recip_to_cart(beams.weak)
    d0 = 2.0 * K * geometry.excitation_errors(K_ref[None, :], gw)[0] + coup.w_diag  # (nw,)
    a = 2.0 * gw / d0[:, None]  # (nw, 3)
    # over the circle: |f_t| <= R and |f_z| = |kz - kz_ref| <= (2 |kt_ref| R + R^2) / (2 kz_min)
    ez = geometry.e_z
    kt0 = float(np.linalg.norm(c_t))
    fz = (2 * kt0 * R + R * R) / (2 * np.sqrt(K * K - (kt0 + R) ** 2))
    a_z = a @ ez
    a_t = np.sqrt(np.maximum(np.sum(np.abs(a) ** 2, axis=1) - np.abs(a_z) ** 2, 0.0))
    rho = a_t * R + np.abs(a_z) * fz  # (nw,) bound of |a_w.f| over the circle
    order = np.full(nw, -1)
    for n in range(_BETHE_MAX_ORDER, -1, -1):
        order[(rho < 1) & (rho ** (n + 1) / np.maximum(1 - rho, 1e-300) <= tol)] = n
    if not np.any(order >= 0):
        return None
    ns = beams.n_strong
    n_terms = {0: 1, 1: 4, 2: 10}[int(order.max())]
    P = np.zeros((n_terms, ns, ns), complex)
    for n in range(int(order.max()) + 1):
        idx = np.flatnonzero(order == n)
        if not len(idx):
            continue
        W = _monomial_weights(a[idx], n) / d0[idx][None, :]
        sw, ws = coup.sw[:, idx], coup.ws[idx, :]
        for m in range(len(W)):
            P[m] += (sw * W[m][None, :]) @ ws
    return BetheExpansion(K_ref=K_ref, P=P, exact=np.flatnonzero(order < 0), n_smooth=int(np.sum(order >= 0)))


def structure_matrices(geometry: Geometry, beams: BeamSet, coup: CouplingMatrices, kt_hkl, parts: bool = False,
                       bethe: BetheExpansion | None = None):
    """Scaled structure matrices M (nt, ns, ns) [Å^-1] and foil-normal factors p (nt, ns).

    With ``parts``, also a dict of the factors the analytic derivatives need (derivatives.py):
    ``q`` = p^-1/2 (nt, ns), ``two_Kn`` = 2 K_n (nt,) [Å^-1] and ``bethe_denom`` (nt, nw) [Å^2].
    ``bethe``: the expansion of the smooth weak beams' Bethe sum for these tilts (:func:`bethe_expansion`);
    the other weak beams are summed exactly per tilt (all of them without it).
    """
    cr = geometry.crystal
    Kvec = geometry.incident(kt_hkl)
    K = geometry.K_invA
    gs = cr.recip_to_cart(beams.strong)
    sg = geometry.excitation_errors(Kvec, gs)  # (nt, ns)
    nt, ns = sg.shape
    A = np.broadcast_to(coup.ss, (nt, ns, ns)).copy()
    idx = np.arange(ns)
    A[:, idx, idx] += 2.0 * K * sg
    denom = np.zeros((nt, 0), complex)
    if len(beams.weak):
        gw = cr.recip_to_cart(beams.weak)
        sw = geometry.excitation_errors(Kvec, gw)  # (nt, nw)
        denom = 1.0 / (2.0 * K * sw + coup.w_diag)
        if bethe is None:
            A -= (coup.sw[None, :, :] * denom[:, None, :]) @ coup.ws
        else:
            A -= np.tensordot(bethe.terms(Kvec), bethe.P, axes=(1, 0))
            e = bethe.exact
            if len(e):
                A -= (coup.sw[None, :, e] * denom[:, None, e]) @ coup.ws[e]
    n_in = geometry.inward_normal(Kvec)
    Kn = np.einsum("ti,ti->t", Kvec, n_in)
    gn = gs @ n_in.T  # (ns, nt)
    p = 1.0 + gn.T / Kn[:, None]
    if np.any(p <= 0):
        raise QcbedInputError("normal", "a beam travels parallel to the foil surface (1 + g.n/K.n <= 0)",
                              "check the foil normal or reduce g_max")
    q = 1.0 / np.sqrt(p)
    A *= (q[:, :, None] * q[:, None, :]) / (2.0 * Kn)[:, None, None]
    if parts:
        return A, p, {"q": q, "two_Kn": 2.0 * Kn, "bethe_denom": denom}
    return A, p


@dataclass
class BlochSolution:
    """Eigen-solution for nt tilts; intensities at any thickness without re-solving."""

    beams: BeamSet
    kt: np.ndarray  # (nt, 3) hkl units
    gamma: np.ndarray  # (nt, ns) complex [Å^-1]
    vectors_out: np.ndarray  # (nt, n_out, ns) rows of B for the output beams
    alpha: np.ndarray  # (nt, ns) excitation amplitudes
    out_hkl: np.ndarray  # (n_out, 3)
    method: str
    timing: dict = field(default_factory=dict)
    dI: np.ndarray | None = None  # (nt, n_param, n_out) dI_g/dp at dI_thickness_A, when asked for
    dI_thickness_A: float | None = None

    def amplitudes(self, thickness_A) -> np.ndarray:
        """Flux-normalised amplitudes (nt, n_thickness, n_out) at thicknesses [Å]."""
        t = check_thickness(thickness_A)
        ph = np.exp(2j * np.pi * self.gamma[:, None, :] * t[None, :, None]) * self.alpha[:, None, :]
        return ph @ np.swapaxes(self.vectors_out, 1, 2)

    def intensities(self, thickness_A) -> np.ndarray:
        """I_g(t) (nt, n_thickness, n_out): fraction of the incident current in each output beam."""
        a = self.amplitudes(thickness_A)
        return a.real**2 + a.imag**2


def check_thickness(thickness_A) -> np.ndarray:
    t = np.atleast_1d(np.asarray(thickness_A, float))
    if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(t < 0):
        bad = t[~(np.isfinite(t) & (t >= 0))] if t.ndim == 1 else t
        raise QcbedInputError("thickness", f"thicknesses must be finite and >= 0 Å, got {bad.ravel()[:3].tolist()}",
                              "give e.g. 100:2000:100 (start:stop:step in Å)")
    return t


def _eig_general(M: np.ndarray, out_idx: np.ndarray, full: bool = False):
    """Complex eigen-solution; with ``full`` also V (nt, ns, ns) and W = V^-1 (rows: left eigenvectors)."""
    w, V = np.linalg.eig(M)
    if full:
        W = np.linalg.inv(V)
        return w, V[:, out_idx, :], W[:, :, 0].copy(), V, W
    e0 = np.zeros(M.shape[:-1], complex)
    e0[:, 0] = 1.0
    alpha = np.linalg.solve(V, e0[..., None])[..., 0]
    return w, V[:, out_idx, :], alpha


#: Cluster criterion of the ``hermitian`` solver: Bloch states j, k of H are treated together (exactly)
#: when |γ0_j - γ0_k| < _CLUSTER_C |Q_jk|; every coupling left to perturbation has |Q/gap| < 1/_CLUSTER_C.
_CLUSTER_C = 10.0
#: ``auto``: a tilt is solved by ``hermitian`` when its error estimate is below this (in I, units of the
#: incident current) and its clusters cost less than _AUTO_MAX_CLUSTER_COST of a full eigen-solution.
_AUTO_TOL = 5e-4
_AUTO_MAX_CLUSTER_COST = 0.15


def _clusters(close: np.ndarray):
    """Contiguous clusters of sorted eigenvalues from a pair criterion ``close`` (nt, n, n).

    Indices b and b+1 are in one cluster when some pair j <= b < k is close.  Returns labels (nt, n) and
    [(tilts (m,), indices (m, s))] for the clusters of size s >= 2, grouped by size.
    """
    nt, n, _ = close.shape
    F = np.triu(close, 1).astype(np.int32)
    C = np.cumsum(np.cumsum(F, axis=1)[:, :, ::-1], axis=2)[:, :, ::-1]  # C[b, k] = Σ_{j<=b, k'>=k} F
    b = np.arange(n - 1)
    start = np.ones((nt, n), bool)
    start[:, 1:] = C[:, b, b + 1] == 0
    lab = np.cumsum(start, axis=1) - 1
    tt, j0 = np.nonzero(start)
    nxt = np.r_[j0[1:], n]
    size = np.where(np.r_[tt[1:] == tt[:-1], False], nxt, n) - j0
    groups = []
    for s in np.unique(size[size > 1]):
        sel = size == s
        groups.append((tt[sel], j0[sel][:, None] + np.arange(s)[None, :]))
    return lab, groups


def _blk(X, tt, rr, cc):
    """Index tuple of the blocks X[t, rows, cols] (rows/cols an index array (m, s) or a range (k,))."""
    r = rr[:, :, None] if rr.ndim == 2 else rr[None, :, None]
    c = cc[:, None, :] if cc.ndim == 2 else cc[None, None, :]
    return tt[:, None, None], r, c


def _hermitian_parts(M: np.ndarray, out_idx: np.ndarray, full: bool = False):
    """The ``hermitian`` solution plus per-tilt diagnostics (error estimate, cluster cost); see _eig_hermitian."""
    nt, n, _ = M.shape
    ii = np.arange(n)
    MH = np.conj(np.swapaxes(M, 1, 2))
    H, A = 0.5 * (M + MH), -0.5j * (M - MH)
    del MH
    real = np.abs(H.imag).max() <= 1e-13 * np.abs(H.real).max()
    if np.abs(A).max() <= 1e-15 * np.abs(H).max():
        # no absorption (M Hermitian to rounding): H's eigen-solution is the exact one, in any basis of a
        # degenerate space; B0 unitary, so alpha = B0^H e_000 and the vectors' inverse is B0^H
        w, B0 = np.linalg.eigh(H.real if real else H)
        B0 = B0.astype(complex, copy=False)
        zero = np.zeros(nt)
        if full:
            W = np.conj(np.swapaxes(B0, 1, 2))
            return (w.astype(complex), B0[:, out_idx, :], W[:, :, 0].copy(), B0, W), zero, zero
        return (w.astype(complex), B0[:, out_idx, :], np.conj(B0[:, 0, :])), zero, zero
    if real and np.abs(A.imag).max() <= 1e-13 * np.abs(A.real).max():
        # centrosymmetric structure, origin at the inversion centre (U, U' real): real symmetric H and A,
        # real eigh and real products (about 3x faster); the dropped imaginary parts are round-off
        w, B0 = np.linalg.eigh(H.real)
        T = 1j * (np.swapaxes(B0, 1, 2) @ (A.real @ B0))
        B0 = B0.astype(complex)
    else:
        w, B0 = np.linalg.eigh(H)
        T = np.conj(np.swapaxes(B0, 1, 2)) @ (A @ B0)  # Q = B0^H A B0
        T *= 1j
    del H, A
    T[:, ii, ii] += w  # T = B0^H M B0 = diag(γ0) + iQ, an exact similarity of M
    aT = np.abs(T)
    aT[:, ii, ii] = 0.0
    lab, groups = _clusters(np.abs(w[:, None, :] - w[:, :, None]) < _CLUSTER_C * aT)
    del aT
    cost = np.zeros(nt)
    for tt, rr in groups:
        np.add.at(cost, tt, (rr.shape[1] / n) ** 3)
    Vo = B0[:, out_idx, :]
    oi = np.arange(len(out_idx))
    b = np.conj(B0[:, 0, :])  # B0^H e_000
    Y1 = []
    # 1. exact eigen-solution of each cluster block: T <- Y1^-1 T Y1 (block-diagonal Y1)
    for tt, rr in groups:
        lam, U = np.linalg.eig(T[_blk(T, tt, rr, rr)])
        Ui = np.linalg.inv(U)
        T[_blk(T, tt, rr, ii)] = Ui @ T[_blk(T, tt, rr, ii)]
        T[_blk(T, tt, ii, rr)] = T[_blk(T, tt, ii, rr)] @ U
        T[_blk(T, tt, rr, rr)] = lam[:, :, None] * np.eye(rr.shape[1])
        Vo[_blk(Vo, tt, oi, rr)] = Vo[_blk(Vo, tt, oi, rr)] @ U
        b[tt[:, None], rr] = (Ui @ b[tt[:, None], rr][..., None])[..., 0]
        Y1.append(U)
    d = T[:, ii, ii].copy()
    same = lab[:, :, None] == lab[:, None, :]
    T[same] = 0.0  # E: the couplings between clusters
    gap = d[:, None, :] - d[:, :, None]  # [k, j] = d_j - d_k
    gap[same] = 1.0
    Z = T / gap  # first-order vectors, zero within clusters
    S = T @ Z  # second-order effective coupling E Z
    del T
    g3 = np.einsum("tjk,tkj->tj", Z, S)
    gam = d + np.einsum("tjj->tj", S) - g3  # RS 2nd + 3rd order
    # 2. clusters again, with their second- and third-order effective blocks diag(d) + (EZ - ZEZ)_cc
    Y2 = []
    for tt, rr in groups:
        blk = S[_blk(S, tt, rr, rr)] - Z[_blk(Z, tt, rr, ii)] @ S[_blk(S, tt, ii, rr)]
        blk[:, np.arange(rr.shape[1]), np.arange(rr.shape[1])] += d[tt[:, None], rr]
        lam, U = np.linalg.eig(blk)
        Ui = np.linalg.inv(U)
        gam[tt[:, None], rr] = lam
        Y2.append((U, Ui))
    S[same] = 0.0  # second-order couplings between clusters, in the basis of step 2
    for (tt, rr), (U, Ui) in zip(groups, Y2):
        S[_blk(S, tt, rr, ii)] = Ui @ S[_blk(S, tt, rr, ii)]
        S[_blk(S, tt, ii, rr)] = S[_blk(S, tt, ii, rr)] @ U
    gap = gam[:, None, :] - gam[:, :, None]
    gap[same] = 1.0
    Z2 = S / gap
    # error estimate (for ``auto``), on the most excited Bloch states J: the neglected third-order vector
    # terms (-ZEZ)_kj/(γ_j - γ_k) and a fourth-order eigenvalue error ~ |γ3_j| max|Z|, as a phase error
    # at its worst thickness (|δγ| 2πt exp(-2π Im γ t) <= |δγ|/(e Im γ)); both weighted by |b_j| ~ |α_j|
    J = np.argsort(-np.abs(b), axis=1)[:, :min(n, 16)]
    bJ = np.abs(np.take_along_axis(b, J, 1))
    Z3 = (Z @ np.take_along_axis(S, J[:, None, :], 2)) / np.take_along_axis(gap, J[:, None, :], 2)
    Z3[np.take_along_axis(same, J[:, None, :], 2)] = 0.0
    zmax = np.abs(Z).max(axis=(1, 2))
    dg = np.abs(np.take_along_axis(g3, J, 1)) * zmax[:, None] / (np.e * np.maximum(np.take_along_axis(gam.imag, J, 1), 1e-300))
    est = np.max(bJ * (np.abs(Z3).max(axis=1) + dg), axis=1)
    del S, gap, Z3
    # vectors B = B0 Y1 X with X = (I + Z) Y2 (I + Z2); alpha = X^-1 (B0 Y1)^-1 e_000 (exact inverse of X)
    Vo = Vo + Vo @ Z
    Z[:, ii, ii] += 1.0
    u = np.linalg.solve(Z, b[..., None])[..., 0]
    for (tt, rr), (U, Ui) in zip(groups, Y2):
        Vo[_blk(Vo, tt, oi, rr)] = Vo[_blk(Vo, tt, oi, rr)] @ U
        u[tt[:, None], rr] = (Ui @ u[tt[:, None], rr][..., None])[..., 0]
    Vo = Vo + Vo @ Z2
    if full:
        for (tt, rr), (U, Ui) in zip(groups, Y2):
            Z[_blk(Z, tt, ii, rr)] = Z[_blk(Z, tt, ii, rr)] @ U
        X = Z + Z @ Z2
        for (tt, rr), U in zip(groups, Y1):
            B0[_blk(B0, tt, ii, rr)] = B0[_blk(B0, tt, ii, rr)] @ U
        V = B0 @ X
        W = np.linalg.inv(V)
        return (gam, V[:, out_idx, :], W[:, :, 0].copy(), V, W), est, cost
    Z2[:, ii, ii] += 1.0
    alpha = np.linalg.solve(Z2, u[..., None])[..., 0]
    return (gam, Vo, alpha), est, cost


def _eig_hermitian(M: np.ndarray, out_idx: np.ndarray, full: bool = False):
    """Eigen-solution of M = H + iA from the Hermitian eigen-solution of H, absorption by quasi-degenerate
    perturbation theory, exact within clusters of nearly degenerate Bloch states.

    H, A Hermitian (M - M^H = 2iA).  With H B0 = B0 diag(γ0), T = B0^H M B0 = diag(γ0) + iQ (Q = B0^H A B0)
    is an exact similarity of M.  Clusters: contiguous runs of the sorted γ0 linked by pairs with
    |γ0_j - γ0_k| < c |Q_jk| (c = _CLUSTER_C = 10; exact and accidental degeneracies at a zone axis, where
    H's eigenvectors are an arbitrary basis of the degenerate space).  Then

    1. each cluster block of T is diagonalised exactly (small complex eig, batched over tilts by cluster
       size): T <- Y1^-1 T Y1 = D + E, D diagonal, E the couplings between clusters (|E/gap| < 1/c);
    2. with Z = E/(d_j - d_k) (first order, I + Z a Löwdin/Schrieffer-Wolff-type transformation)
       X^-1 T X = D + EZ - ZEZ + O(E^4/gap^3); the eigenvalues are D + diag(EZ - ZEZ) (Rayleigh-Schrödinger
       to third order) and, within each cluster, the exact eigenvalues of the effective block
       (D + EZ - ZEZ)_cc (second diagonalisation Y2);
    3. the second-order couplings between clusters, Z2 = (Y2^-1 (EZ) Y2)/(γ_j - γ_k), correct the vectors:
       B = B0 Y1 (I + Z) Y2 (I + Z2), and α = B^-1 e_000 exactly (two LU solves), so I(0) = e_000.

    Neglected: eigenvalues at fourth order, vectors at third order (|Z|·|Z2|, the -ZEZ couplings between
    clusters).  Cost: one Hermitian eig (heevd), five matrix products (Q, EZ, two vector updates) and two
    one-right-hand-side solves per tilt, about 0.4x the cost of ``general`` (100-200 beams).  Measured
    against ``general`` (Si [110], 200 kV, default beams, zone axis and tilts, t = 100-2000 Å): see the
    module docstring.  ``full``: also V (nt, ns, ns) and W = V^-1, alpha = W[:, :, 0].
    """
    return _hermitian_parts(M, out_idx, full)[0]


def _eig_auto(M: np.ndarray, out_idx: np.ndarray, full: bool = False, stats: dict | None = None):
    """``hermitian`` where its error estimate says it is valid, ``general`` for the other tilts.

    Per tilt, est = max|Z| · max_kj |Z2_kj b_j| (the size of the neglected third-order vector terms,
    weighted by the excitation of the Bloch state) must be below _AUTO_TOL, and the clusters (exactly
    diagonalised) must cost less than _AUTO_MAX_CLUSTER_COST of a full eig; otherwise the tilt is re-solved
    with ``general``.  ``stats`` (a dict) accumulates counts "hermitian" and "general" of tilts.
    """
    res, est, cost = _hermitian_parts(M, out_idx, full)
    bad = ~((est < _AUTO_TOL) & (cost < _AUTO_MAX_CLUSTER_COST) & np.all(np.isfinite(res[0]), axis=1))
    if bad.any():
        res = [np.array(r) for r in res]
        for r, g in zip(res, _eig_general(M[bad], out_idx, full)):
            r[bad] = g
        res = tuple(res)
    if stats is not None:
        stats["general"] = stats.get("general", 0) + int(bad.sum())
        stats["hermitian"] = stats.get("hermitian", 0) + int((~bad).sum())
    return res

def solve(geometry: Geometry, potential: Potential, beams: BeamSet, kt_hkl, out_hkl=None,
          method: str = "general", coup: CouplingMatrices | None = None, dpot: list | None = None,
          deriv_thickness_A: float | None = None) -> BlochSolution:
    """Solve the Bloch-wave eigenproblem for every tilt kt (nt, 3) in batches.

    ``out_hkl``: beams whose intensities are wanted (default: all strong beams).
    ``coup``: precomputed coupling matrices (reuse when only tilts change).
    ``dpot`` and ``deriv_thickness_A``: also the analytic derivatives dI_g(t)/dp of the output beams
    at that thickness [Å] for each parameter p, given as {(h, k, l): d(U + iU')/dp} over the
    reflections it changes (derivatives.py), from the same eigen-solution; stored as
    ``BlochSolution.dI`` (nt, n_param, n_out).
    """
    if method not in METHODS:
        raise QcbedInputError("method", f"unknown solver {method!r}", f"choose {' or '.join(METHODS)}")
    kt = np.atleast_2d(np.asarray(kt_hkl, float))
    t0 = time.perf_counter()
    if coup is None:
        coup = coupling_matrices(potential, beams)
    out_hkl = beams.strong if out_hkl is None else np.atleast_2d(np.asarray(out_hkl, int))
    out_idx = beams.index_of(out_hkl)
    ns = beams.n_strong
    nt = len(kt)
    bethe = bethe_expansion(geometry, beams, coup, kt)
    n_exact = len(beams.weak) if bethe is None else len(bethe.exact)
    chunk = max(1, min(nt, _CHUNK_ELEMENTS // max(ns * max(ns, n_exact), 1)))
    gamma = np.empty((nt, ns), complex)
    vec = np.empty((nt, len(out_idx), ns), complex)
    alpha = np.empty((nt, ns), complex)
    want_d = dpot is not None
    if want_d:
        from .derivatives import coupling_derivatives, intensity_derivatives
        if deriv_thickness_A is None:
            raise QcbedInputError("deriv_thickness_A", "derivatives need the thickness they are taken at")
        dcoup = coupling_derivatives(beams, dpot, coup.phase)
        dI = np.empty((nt, len(dpot), len(out_idx)))
        chunk = max(1, chunk // 2)  # the derivative intermediates: a few (ns, ns) stacks more
    t_build = t_eig = t_der = 0.0
    used: dict = {}
    eig = {"general": _eig_general, "hermitian": _eig_hermitian}.get(method) or partial(_eig_auto, stats=used)
    for a in range(0, nt, chunk):
        b = min(nt, a + chunk)
        tb = time.perf_counter()
        if want_d:
            M, _, parts = structure_matrices(geometry, beams, coup, kt[a:b], parts=True, bethe=bethe)
        else:
            M, _ = structure_matrices(geometry, beams, coup, kt[a:b], bethe=bethe)
        te = time.perf_counter()
        if want_d:
            w, Vo, al, V, W = eig(M, out_idx, full=True)
            td = time.perf_counter()
            _, dI[a:b] = intensity_derivatives(w, V, W, al, out_idx, deriv_thickness_A, parts["q"], parts["two_Kn"],
                                               parts["bethe_denom"], coup.sw, coup.ws, dcoup)
            t_der += time.perf_counter() - td
            t_eig += td - te
        else:
            w, Vo, al = eig(M, out_idx)
            t_eig += time.perf_counter() - te
        t_build += te - tb
        gamma[a:b], vec[a:b], alpha[a:b] = w, Vo, al
    if coup.phase is not None:
        vec *= coup.phase[out_idx][None, :, None]  # amplitudes of the crystal's own origin
    timing = {"total_s": time.perf_counter() - t0, "build_s": t_build, "eig_s": t_eig, "n_tilts": nt, "n_beams": ns,
              "n_weak": len(beams.weak), "n_weak_exact": n_exact, "derivative_s": t_der}
    used = used or {method: nt}
    timing.update(method_used="mixed" if len(used) > 1 and min(used.values()) else max(used, key=used.get),
                  n_tilts_hermitian=used.get("hermitian", 0), n_tilts_general=used.get("general", 0))
    sol = BlochSolution(beams=beams, kt=kt, gamma=gamma, vectors_out=vec, alpha=alpha,
                        out_hkl=np.asarray(out_hkl, int), method=method, timing=timing)
    if want_d:
        sol.dI, sol.dI_thickness_A = dI, float(deriv_thickness_A)
    return sol
