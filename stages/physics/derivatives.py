"""Analytic derivatives of Bloch-wave intensities with respect to structure factors, from one eigen-solution.

The flux amplitudes of the strong beams at depth t are (bloch.py)

    a(t) = exp(2πi t M) e_000 = V diag(exp(2πi γ t)) W e_000 = V E α,

with M = V diag(γ) W the scaled structure matrix (W = V^-1) and α = W e_000.  A change dM of the
structure matrix changes the exponential by the Daleckii-Krein formula (R. Bhatia, *Matrix Analysis*
(1997) Thm. V.3.3; for exp: R. M. Wilcox, J. Math. Phys. 8, 962 (1967)):

    d exp(2πi t M) = V [G ∘ (W dM V)] W,   G_jk = (e_j − e_k) / (γ_j − γ_k),  e_j = exp(2πi γ_j t),

with the limit G_jj = 2πi t e_j for equal eigenvalues.  G is evaluated as
G_jk = 2πi t e_k φ1(2πi t (γ_j − γ_k)), φ1(z) = (e^z − 1)/z, which is exact and stable for degenerate
and near-degenerate pairs (the zone axis) alike.  For an output beam g,

    da_g = Σ_ab dM_ab Σ_j V_gj W_ja Z_jb,   Z_jb = Σ_k G_jk α_k V_bk,

so the work that depends on the parameter is a sparse sum over the matrix elements the parameter
touches (those whose g − h is a symmetry relative of the refined reflection), ns x nnz per tilt; the
parameter-independent part (W, Z, and the Bethe products below) is O(ns^3) once per tilt, about one
matrix product each, and no eigen-solve is repeated.

The structure matrix (bloch.structure_matrices) is M = Q A Q / (2 K_n), Q = diag(p^-1/2), with the
Bethe-corrected couplings A_ss = C_ss − C_sw D C_ws, D_c = 1/(2K s_c + i U'_0) for weak beam c; so

    dA_ab = dC_ab − Σ_c (dC_ac D_c C_cb + C_ac D_c dC_cb),

and every term is folded into the sparse sums with the products W̃ C_sw and Z̃ C_ws^T.

Intensities: I_g = |a_g|^2, dI_g = 2 Re(conj(a_g) da_g).  Units: dI/dp per unit of p (p in Å^-2 for
U and U'; for a phase parameter per degree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .beams import BeamSet
from .structure_factors import hkl_key

@dataclass
class CouplingDerivative:
    """d(U + iU')/dp of the couplings among a beam set, as sparse matrices [Å^-2 per unit of p].

    ``ss`` (ns, ns), ``sw`` (ns, nw), ``ws`` (nw, ns): scipy CSR matrices.  The weak-beam diagonal
    (i U'_0) does not depend on a refined reflection.
    """

    ss: sp.csr_matrix
    sw: sp.csr_matrix
    ws: sp.csr_matrix


def coupling_derivatives(beams: BeamSet, dpot: list[dict], phase=None) -> list[CouplingDerivative]:
    """Sparse coupling derivatives for each parameter.

    ``dpot``: one dict per parameter, {(h, k, l): d(U_h + i U'_h)/dp} over the reflections the
    parameter changes (all symmetry equivalents and Friedel mates, with their phases).  A coupling
    between beams g and h is U_{g-h}, so the derivative has an entry wherever g - h is a key.
    ``phase``: the beam phases of the couplings' origin (``CouplingMatrices.phase``), applied alike.
    """
    s, w = beams.strong.astype(np.int64), beams.weak.astype(np.int64)
    ns, nw = len(s), len(w)
    ph = np.ones(ns + nw, complex) if phase is None else np.asarray(phase, complex)
    blocks = {"ss": (s, s, ph[:ns], ph[:ns]), "sw": (s, w, ph[:ns], ph[ns:]), "ws": (w, s, ph[ns:], ph[:ns])}
    # the keys of g - h of each block once (the weak-weak block is never needed)
    keys = {name: hkl_key(r[:, None, :] - c[None, :, :]).ravel() for name, (r, c, _, _) in blocks.items()}
    out = []
    for d in dpot:
        mats = {}
        hk = np.array(list(d.keys()), np.int64).reshape(-1, 3)
        vals = np.array(list(d.values()), complex)
        kk = hkl_key(hk)
        order = np.argsort(kk)
        kk, vals = kk[order], vals[order]
        for name, (r, c, pr, pc) in blocks.items():
            shape = (len(r), len(c))
            if not len(kk) or not keys[name].size:
                mats[name] = sp.csr_matrix(shape, dtype=complex)
                continue
            pos = np.clip(np.searchsorted(kk, keys[name]), 0, len(kk) - 1)
            idx = np.flatnonzero(kk[pos] == keys[name])
            i, j = np.divmod(idx, len(c))
            v = vals[pos[idx]] * np.conj(pr[i]) * pc[j]
            mats[name] = sp.csr_matrix((v, (i, j)), shape=shape)
        out.append(CouplingDerivative(mats["ss"], mats["sw"], mats["ws"]))
    return out


def _phi1(z: np.ndarray) -> np.ndarray:
    """(e^z - 1)/z, with its Taylor series where |z| is small (exact limit 1 at z = 0)."""
    small = np.abs(z) < 1e-4
    zs = np.where(small, 1.0, z)
    return np.where(small, 1.0 + z / 2 + z * z / 6, np.expm1(zs) / zs)


def intensity_derivatives(gamma, V, W, alpha, out_idx, thickness_A: float, q, two_Kn, bethe_denom,
                          c_sw, c_ws, dcoup: list[CouplingDerivative]) -> tuple[np.ndarray, np.ndarray]:
    """dI_g(t)/dp for the output beams, for a chunk of tilts.

    Parameters
    ----------
    gamma : (nt, ns) complex
        Eigenvalues of M [Å^-1].
    V, W : (nt, ns, ns) complex
        Right eigenvectors (columns) and their inverse (rows: left eigenvectors), M = V diag(γ) W.
    alpha : (nt, ns) complex
        Excitation amplitudes, W[:, :, 0].
    out_idx : (n_out,) int
        Rows of the output beams among the strong beams.
    thickness_A : float
        Crystal thickness t [Å].
    q : (nt, ns) float
        p^-1/2, the foil-normal factors' inverse square roots.
    two_Kn : (nt,) float
        2 K_n [Å^-1].
    bethe_denom : (nt, nw) complex
        D_c = 1/(2K s_c + i U'_0) of the weak beams [Å^2].
    c_sw, c_ws : (ns, nw), (nw, ns) complex
        Strong-weak couplings [Å^-2].
    dcoup : list of CouplingDerivative
        Per parameter.

    Returns
    -------
    intensity : (nt, n_out) float
        I_g(t) (for checks: equals BlochSolution.intensities at t).
    dI : (nt, n_param, n_out) float
        dI_g(t)/dp per unit of each parameter.
    """
    nt, ns = gamma.shape
    t = float(thickness_A)
    tw = 2j * np.pi * t
    e = np.exp(tw * gamma)  # (nt, ns)
    # G_jk = 2πi t e_k φ1(2πi t (γ_j - γ_k))
    G = tw * e[:, None, :] * _phi1(tw * (gamma[:, :, None] - gamma[:, None, :]))
    Z = (G * alpha[:, None, :]) @ np.swapaxes(V, 1, 2)  # Z_jb = Σ_k G_jk α_k V_bk
    Wt = W * (q[:, None, :] / two_Kn[:, None, None])  # W~_ja = W_ja q_a / 2K_n
    Zt = Z * q[:, None, :]  # Z~_jb = Z_jb q_b
    Vout = V[:, out_idx, :]
    a = np.einsum("toj,tj->to", Vout, e * alpha)
    # only the weak beams c that some parameter couples (dC_ac or dC_cb non-zero) enter: a HOLZ set has
    # thousands of Bethe beams, most of them coupled to the strong beams through other reflections only
    used = np.unique(np.concatenate([np.zeros(0, np.int64)] + [dc.sw.indices for dc in dcoup]
                                    + [np.flatnonzero(np.diff(dc.ws.indptr)) for dc in dcoup])) if c_sw.shape[1] else []
    nw = len(used)
    if nw:
        dsw = [dc.sw[:, used] for dc in dcoup]
        dws = [dc.ws[used, :] for dc in dcoup]
        WSD = (Wt @ c_sw[:, used]) * bethe_denom[:, None, used]  # (nt, ns, nw): Σ_a W~_ja C_ac D_c
        ZWD = (Zt @ c_ws[used].T) * bethe_denom[:, None, used]  # Σ_b Z~_jb C_cb D_c
    Zt2 = Zt.reshape(nt * ns, ns).T  # (ns[b], nt*ns)
    dI = np.empty((nt, len(dcoup), len(out_idx)))
    for p, dc in enumerate(dcoup):
        # y_j = Σ_ab W~_ja dA_ab Z~_jb
        R = (dc.ss @ Zt2).T.reshape(nt, ns, ns)  # [t, j, a] = Σ_b dC_ab Z~_jb
        y = np.einsum("tja,tja->tj", Wt, R)
        if nw and dc.sw.nnz:
            R2 = (dsw[p] @ ZWD.reshape(nt * ns, nw).T).T.reshape(nt, ns, ns)  # Σ_c dC_ac D_c (C_ws Z~)_cj
            y -= np.einsum("tja,tja->tj", Wt, R2)
        if nw and dc.ws.nnz:
            R3 = (dws[p] @ Zt2).T.reshape(nt, ns, nw)  # [t, j, c] = Σ_b dC_cb Z~_jb
            y -= np.einsum("tjc,tjc->tj", WSD, R3)
        da = np.einsum("toj,tj->to", Vout, y)
        dI[:, p, :] = 2.0 * (a.real * da.real + a.imag * da.imag)
    return a.real**2 + a.imag**2, dI
