"""IAM stage: the table of structure factors of the forward model, one row per reflection family.

:func:`iam_dataset` is the pure computation behind ``structure_factors.zarr`` (no file I/O).  It
lists every reflection family with 0 < |g| <= ``g_max_invA`` that is not systematically absent,
one row per family, plus any reflections asked for explicitly (``extra_hkl``: the refined
reflections, the disks of the pattern), and gives for each

* ``F_e`` [Å]: the IAM electron structure factor (scattering table of the model, Debye-Waller
  factors included), always the IAM, whatever the model's overrides;
* ``U``, ``Uprime`` [Å^-2]: the potential and absorptive potential *of the model*
  (``model.potential.get``: IAM + the model's absorption model + any refined overrides), with
  the amplitude ``U_abs`` = |U_g| and phase ``U_phase_deg`` of U;
* ``V`` [V] = h^2 U_g / (2 m e) (relativistic m = γ m0), i.e. V_g = 47.87765 F / Ω with
  F = π Ω U_g / γ, from the model's U;
* ``F_x`` [electrons]: the X-ray structure factor from the model's U through Mott-Bethe
  (:func:`stages.physics.structure_factors.xray_from_ug`), and ``F_x_iam`` from the IT92 X-ray
  table (:func:`~stages.physics.structure_factors.xray_structure_factor_iam`) for comparison.
  The two differ by the difference of the electron and X-ray scattering-factor parametrisations
  (about 1e-4 relative for Si 111), not by physics.

Complex values are split into ``_re`` / ``_im`` (zarr v3 stores no complex dtype).  Phases follow
the physics convention of :mod:`stages.physics.structure_factors`: U(r) = Σ U_g exp(+2πi g·r),
F_e = Σ f_e T exp(-2πi g·r_j); the crystallographic (X-ray program) phase is the negative.

Representative of a family (symmetry equivalents by the space group ∪ their Friedel mates): the
lexicographically largest (h, k, l) of the family.  The family is closed under inversion, so the
first non-zero index of the representative is positive (Si: 1 1 1, 2 2 0, 3 1 1, 4 0 0).
Rows from ``extra_hkl`` are kept exactly as given (also when absent, equivalent to another row or
at g = 0); coordinates ``family_h/k/l`` give every row's representative, ``representative``
marks the family rows and ``requested`` the rows of ``extra_hkl``.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from .errors import QcbedInputError
from .physics import constants as K
from .physics import structure_factors as sf
from .simulate import ForwardModel

PHASE_CONVENTION = (
    "physics (Spence & Zuo 1992): U(r) = sum_g U_g exp(+2 pi i g.r), F_e = sum_j occ_j f_e,j T_j "
    "exp(-2 pi i g.r_j); the crystallographic X-ray convention exp(+2 pi i h.x) is the complex "
    "conjugate (phase -> -phase). Friedel: U(-g) = conj(U(g)), U'(-g) = conj(U'(g))."
)
REPRESENTATIVE_RULE = (
    "one row per family = space-group equivalents and their Friedel mates; representative = the "
    "lexicographically largest (h, k, l) of the family (its first non-zero index is positive); rows "
    "from extra_hkl are kept as given (requested = true), family_h/k/l give their representative"
)
_G_TOL = 1e-9  # relative tolerance on |g| for the g_max cut and for sorting ties


def _json_safe(v):
    """Attr value as plain JSON types (numpy scalars/arrays -> Python); anything else -> str."""
    return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _orbit(rot: np.ndarray, h: np.ndarray) -> tuple[set, bool]:
    """Space-group orbit of h (rows h R) ∪ Friedel mates, and whether -h is a space-group equivalent."""
    hp = np.rint(np.einsum("i,nij->nj", h.astype(float), rot)).astype(np.int64)
    eq = set(map(tuple, hp.tolist()))
    minus = tuple(int(-x) for x in h)
    centric = minus in eq
    return eq | {tuple(-x for x in t) for t in eq}, centric


def _enumerate(crystal, g_max: float) -> np.ndarray:
    """All hkl with 0 < |g| <= g_max (|h_i| = |g . a_i| <= g_max |a_i| bounds the box)."""
    nmax = np.floor(g_max * np.sqrt(np.diag(crystal.G)) + 1e-9).astype(int)
    axes = [np.arange(-n, n + 1) for n in nmax]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    g = crystal.g_length(hkl)
    return hkl[(g > 0) & (g <= g_max * (1 + _G_TOL))]


def _check_extra(extra_hkl) -> np.ndarray:
    if extra_hkl is None:
        return np.zeros((0, 3), np.int64)
    arr = np.asarray(extra_hkl, dtype=object)
    if arr.size == 0:
        return np.zeros((0, 3), np.int64)
    try:
        arr = np.asarray(extra_hkl, float)
    except (TypeError, ValueError):
        raise QcbedInputError("extra_hkl", f"cannot read {extra_hkl!r} as reflections",
                              "give a list of integer triples [h, k, l]") from None
    return sf._as_hkl(arr)


def iam_dataset(model: ForwardModel, g_max_invA: float = 1.5, extra_hkl=None) -> xr.Dataset:
    """Structure-factor table of ``model`` (see the module docstring), dim ``reflection``.

    ``g_max_invA`` [Å^-1, no 2π]: families with 0 < |g| <= g_max (not systematically absent).
    ``extra_hkl``: (n, 3) reflections added as given (deduplicated; may be absent, equivalent to a
    family row, or 0 0 0).  Rows are sorted by |g|, then by (h, k, l) ascending.
    """
    try:
        g_max = float(g_max_invA)
    except (TypeError, ValueError):
        raise QcbedInputError("g_max_invA", f"must be a number, got {g_max_invA!r}") from None
    if not np.isfinite(g_max) or g_max <= 0:
        raise QcbedInputError("g_max_invA", f"must be > 0 Å^-1, got {g_max_invA!r}",
                              "e.g. 1.5 (sin θ/λ = 0.75 Å^-1)")
    crystal = model.crystal
    rot, _ = crystal.symops
    extra = _check_extra(extra_hkl)

    # family rows: walk the sphere in a fixed order, one orbit at a time
    rows: dict[tuple, dict] = {}
    done: set = set()
    for h in _enumerate(crystal, g_max):
        t = tuple(int(x) for x in h)
        if t in done:
            continue
        orbit, centric = _orbit(rot, h)
        done |= orbit
        if sf.is_systematically_absent(crystal, t):
            continue
        rep = max(orbit)
        rows[rep] = {"representative": True, "requested": False, "family": rep,
                     "multiplicity": len(orbit), "centric": centric, "absent": False}
    for h in extra:
        t = tuple(int(x) for x in h)
        if t in rows:
            rows[t]["requested"] = True
            continue
        orbit, centric = _orbit(rot, h)
        rows[t] = {"representative": False, "requested": True, "family": max(orbit),
                   "multiplicity": len(orbit), "centric": centric,
                   "absent": sf.is_systematically_absent(crystal, t)}
        rows[t]["representative"] = rows[t]["family"] == t and not rows[t]["absent"] and t != (0, 0, 0)

    hkl = np.array(list(rows), np.int64).reshape(-1, 3)
    g = crystal.g_length(hkl) if len(hkl) else np.zeros(0)
    if len(hkl):
        g_key = np.round(g / (g_max * _G_TOL))  # equal |g| up to rounding sort as ties
        order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], g_key))
        hkl, g = hkl[order], g[order]
    info = [rows[tuple(int(x) for x in h)] for h in hkl]

    # values
    hv = model.hv_kV
    pot = model.potential
    if len(hkl):
        u, up = pot.get(hkl)
        u, up = np.array(u, complex), np.array(up, complex)
        fe = sf.electron_structure_factor(crystal, hkl, model.table)
        fx = sf.xray_from_ug(u, crystal, hkl, hv)
        fx_iam = sf.xray_structure_factor_iam(crystal, hkl)
    else:
        u = up = fe = fx = fx_iam = np.zeros(0, complex)
    v = sf.vg_from_fe(sf.fe_from_ug(u, crystal, hv), crystal)
    u_abs = np.abs(u)
    # the phase of a value that is zero to rounding (e.g. Si 2 2 2 in the IAM) is noise: report 0
    u0 = abs(pot.u0()[0]) or 1.0
    phase = np.where(u_abs > 1e-12 * u0, np.degrees(np.angle(u)), 0.0)
    phase = np.where(phase <= -180.0 + 1e-9, phase + 360.0, phase)  # (-180, 180]: a negative real U is 180
    d = np.full(len(g), np.inf)
    np.divide(1.0, g, out=d, where=g > 0)

    dim = "reflection"
    fam = np.array([r["family"] for r in info], np.int64).reshape(-1, 3)
    coords = {
        "h": (dim, hkl[:, 0], {"long_name": "Miller index h"}),
        "k": (dim, hkl[:, 1], {"long_name": "Miller index k"}),
        "l": (dim, hkl[:, 2], {"long_name": "Miller index l"}),
        "g_invA": (dim, g, {"units": "1/Å", "long_name": "|g| (no 2π)"}),
        "d_A": (dim, d, {"units": "Å", "long_name": "d-spacing 1/|g| (inf at g = 0)"}),
        "s_invA": (dim, 0.5 * g, {"units": "1/Å", "long_name": "s = sin(θ)/λ = |g|/2"}),
        "multiplicity": (dim, np.array([r["multiplicity"] for r in info], np.int64),
                         {"units": "1", "long_name": "number of symmetry equivalents incl. Friedel mates"}),
        "centric": (dim, np.array([r["centric"] for r in info], bool),
                    {"long_name": "-h is a space-group equivalent of h"}),
        "absent": (dim, np.array([r["absent"] for r in info], bool),
                   {"long_name": "systematically absent (space group)"}),
        "representative": (dim, np.array([r["representative"] for r in info], bool),
                           {"long_name": "row is its family's representative"}),
        "requested": (dim, np.array([r["requested"] for r in info], bool),
                      {"long_name": "row was asked for in extra_hkl"}),
        "family_h": (dim, fam[:, 0], {"long_name": "h of the family representative"}),
        "family_k": (dim, fam[:, 1], {"long_name": "k of the family representative"}),
        "family_l": (dim, fam[:, 2], {"long_name": "l of the family representative"}),
    }

    def pair(name, z, units, what):
        return {f"{name}_re": (dim, np.real(z).astype(float), {"units": units, "long_name": f"Re {what}"}),
                f"{name}_im": (dim, np.imag(z).astype(float), {"units": units, "long_name": f"Im {what}"})}

    data = {}
    data.update(pair("F_e", fe, "Å", "IAM electron structure factor per cell (Debye-Waller included)"))
    data.update(pair("U", u, "Å^-2", "U_g of the model (IAM + overrides)"))
    data.update(pair("Uprime", up, "Å^-2", "absorptive U'_g of the model (absorption model + overrides)"))
    data["U_abs"] = (dim, u_abs, {"units": "Å^-2", "long_name": "amplitude |U_g| (absorption is Uprime)"})
    data["U_phase_deg"] = (dim, phase, {"units": "degree", "long_name": "phase of U_g in (-180, 180] "
                                        "(physics convention; 0 where |U_g| is 0 to rounding)"})
    data.update(pair("V", v, "V", "V_g = 47.87765 F / Ω from the model's U_g"))
    data.update(pair("F_x", fx, "electrons", "X-ray F per cell from the model's U_g via Mott-Bethe"))
    data.update(pair("F_x_iam", fx_iam, "electrons", "IAM X-ray F per cell (IT92 X-ray table)"))

    attrs = _json_safe(model.attrs())
    n_u, n_up = len(pot.overrides["U"]), len(pot.overrides["Uprime"])
    if model.absorption == "proportional":
        absorption = f"proportional: U'_g = {model.absorption_fraction:g} U_g"
    elif model.absorption == "bird_king":
        absorption = ("bird_king: thermal diffuse scattering absorption (Bird & King, Acta Cryst. A46 (1990) 202) "
                      f"from the {model.table} f_e table and each atom's B")
    else:
        absorption = "none: U'_g = 0"
    if n_up:
        absorption += f"; U'_g given for {n_up} reflection(s)"
    ovr = {kind: {" ".join(map(str, h)): [float(np.real(z)), float(np.imag(z))] for h, z in d_.items()}
           for kind, d_ in pot.overrides.items()}
    attrs.update({
        "stage": "iam",
        "g_max_invA": g_max,
        "gamma": float(K.gamma_factor(hv)),
        "volume_A3": float(crystal.volume_A3),
        "absorption_model": absorption,
        "n_overrides_U": n_u,
        "n_overrides_Uprime": n_up,
        "overrides": json.dumps(ovr),
        "phase_convention": PHASE_CONVENTION,
        "representative_rule": REPRESENTATIVE_RULE,
        "n_families": int(sum(r["representative"] for r in info)),
        "n_requested": int(len({tuple(int(x) for x in h) for h in extra})),
        "formulas": ("U_g = gamma F_e / (pi Omega) [Å^-2]; V_g = 47.87765 F_e / Omega [V]; "
                     "F_x = sum_j occ_j Z_j T_j exp(-2 pi i g.r_j) - s^2 F_e / 0.0239337 Å (Mott-Bethe), "
                     "s = |g|/2; V and F_x use F_e = pi Omega U_g / gamma of the model's U_g"),
    })
    return xr.Dataset(data, coords=coords, attrs=attrs)
