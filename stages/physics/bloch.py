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

Weak beams enter by Bethe's second-order perturbation (see beams.py).

Two solvers, both batched over tilts (no Python loop over tilts; tilts are processed in chunks
only to bound memory):

* ``general``: complex non-Hermitian eigen-solution (LAPACK geev) and α from a linear solve.
* ``hermitian``: split M = H + i A with H, A Hermitian; eigen-solve H (LAPACK heevd),
  absorption to first order in perturbation, in the eigenvalues (γ_j = γ_j^0 + i (B^H A B)_jj)
  and in the eigenvectors (see :func:`_eig_hermitian`).
  Valid while absorption is weak: measured against ``general`` for Si [110] at 200 kV,
  t <= 2000 Å, beams with I > 1%: relative error <= 0.05% for U'/U = 0.005, <= 0.3% for 0.01,
  ~1% for 0.02 (tests/test_bloch.py::test_hermitian_path_accuracy).

One eigen-solution serves every thickness: :meth:`BlochSolution.intensities` takes any list of
thicknesses without re-solving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import QcbedInputError
from .beams import BeamSet
from .geometry import Geometry
from .structure_factors import Potential, unique_hkl

METHODS = ("general", "hermitian")

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


def coupling_matrices(potential: Potential, beams: BeamSet) -> CouplingMatrices:
    s, w = beams.strong, beams.weak
    allb = np.vstack([s, w])
    diff = (allb[:, None, :] - allb[None, :, :]).reshape(-1, 3)
    uniq, inv = unique_hkl(diff)
    u, up = potential.get(uniq)
    full = (u + 1j * up)[inv.ravel()].reshape(len(allb), len(allb))
    _, up0 = potential.u0()
    ns = len(s)
    ss = full[:ns, :ns].copy()
    np.fill_diagonal(ss, 1j * up0)
    return CouplingMatrices(ss=ss, sw=full[:ns, ns:].copy(), ws=full[ns:, :ns].copy(), w_diag=1j * up0)


def structure_matrices(geometry: Geometry, beams: BeamSet, coup: CouplingMatrices, kt_hkl) -> tuple[np.ndarray, np.ndarray]:
    """Scaled structure matrices M (nt, ns, ns) [Å^-1] and foil-normal factors p (nt, ns)."""
    cr = geometry.crystal
    Kvec = geometry.incident(kt_hkl)
    K = geometry.K_invA
    gs = cr.recip_to_cart(beams.strong)
    sg = geometry.excitation_errors(Kvec, gs)  # (nt, ns)
    nt, ns = sg.shape
    A = np.broadcast_to(coup.ss, (nt, ns, ns)).copy()
    idx = np.arange(ns)
    A[:, idx, idx] += 2.0 * K * sg
    if len(beams.weak):
        gw = cr.recip_to_cart(beams.weak)
        sw = geometry.excitation_errors(Kvec, gw)  # (nt, nw)
        denom = 1.0 / (2.0 * K * sw + coup.w_diag)
        A -= (coup.sw[None, :, :] * denom[:, None, :]) @ coup.ws
    n_in = geometry.inward_normal(Kvec)
    Kn = np.einsum("ti,ti->t", Kvec, n_in)
    gn = gs @ n_in.T  # (ns, nt)
    p = 1.0 + gn.T / Kn[:, None]
    if np.any(p <= 0):
        raise QcbedInputError("normal", "a beam travels parallel to the foil surface (1 + g.n/K.n <= 0)",
                              "check the foil normal or reduce g_max")
    q = 1.0 / np.sqrt(p)
    A *= (q[:, :, None] * q[:, None, :]) / (2.0 * Kn)[:, None, None]
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


def _eig_general(M: np.ndarray, out_idx: np.ndarray):
    w, V = np.linalg.eig(M)
    e0 = np.zeros(M.shape[:-1], complex)
    e0[:, 0] = 1.0
    alpha = np.linalg.solve(V, e0[..., None])[..., 0]
    return w, V[:, out_idx, :], alpha


def _eig_hermitian(M: np.ndarray, out_idx: np.ndarray):
    """Hermitian eigen-solution with absorption to first order (eigenvalues and eigenvectors).

    M = H + iA.  With H B0 = B0 diag(γ0) and Q = B0^H A B0:
    γ = γ0 + i diag(Q) - Σ_k Q_jk Q~_kj (second order); B = B0 (I + i Q~), Q~_kj = Q_kj / (γ0_j - γ0_k) (k != j), and
    B^-1 = (I - i Q~) B0^H to the same order.  Pairs closer than 20 |Q_kj| (near-degenerate,
    where the expansion fails) are left uncorrected.
    """
    MH = np.conj(np.swapaxes(M, 1, 2))
    H = 0.5 * (M + MH)
    Aabs = -0.5j * (M - MH)
    w, V = np.linalg.eigh(H)
    Q = np.conj(np.swapaxes(V, 1, 2)) @ (Aabs @ V)
    dgam = np.einsum("tjj->tj", Q).real
    gap = w[:, None, :] - w[:, :, None]  # [k, j] = γ_j - γ_k
    ok = np.abs(gap) > 20.0 * np.abs(Q)
    Qt = np.where(ok, Q / np.where(ok, gap, 1.0), 0.0)
    dgam2 = -np.einsum("tjk,tkj->tj", Q, Qt).real  # second-order eigenvalue shift (real)
    a0 = np.conj(V[:, 0, :])
    alpha = a0 - 1j * np.einsum("tjk,tk->tj", Qt, a0)
    Vout = V[:, out_idx, :]
    Vout = Vout + 1j * (Vout @ Qt)
    return w + dgam2 + 1j * dgam, Vout, alpha


def solve(geometry: Geometry, potential: Potential, beams: BeamSet, kt_hkl, out_hkl=None,
          method: str = "general", coup: CouplingMatrices | None = None) -> BlochSolution:
    """Solve the Bloch-wave eigenproblem for every tilt kt (nt, 3) in batches.

    ``out_hkl``: beams whose intensities are wanted (default: all strong beams).
    ``coup``: precomputed coupling matrices (reuse when only tilts change).
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
    chunk = max(1, min(nt, _CHUNK_ELEMENTS // max(ns * max(ns, len(beams.weak)), 1)))
    gamma = np.empty((nt, ns), complex)
    vec = np.empty((nt, len(out_idx), ns), complex)
    alpha = np.empty((nt, ns), complex)
    t_build = t_eig = 0.0
    for a in range(0, nt, chunk):
        b = min(nt, a + chunk)
        tb = time.perf_counter()
        M, _ = structure_matrices(geometry, beams, coup, kt[a:b])
        te = time.perf_counter()
        w, Vo, al = (_eig_general if method == "general" else _eig_hermitian)(M, out_idx)
        t_build += te - tb
        t_eig += time.perf_counter() - te
        gamma[a:b], vec[a:b], alpha[a:b] = w, Vo, al
    timing = {"total_s": time.perf_counter() - t0, "build_s": t_build, "eig_s": t_eig, "n_tilts": nt, "n_beams": ns,
              "n_weak": len(beams.weak)}
    return BlochSolution(beams=beams, kt=kt, gamma=gamma, vectors_out=vec, alpha=alpha,
                         out_hkl=np.asarray(out_hkl, int), method=method, timing=timing)
