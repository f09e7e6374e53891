"""Crystal input, three ways: CIF (through gemmi), PyExtal ``.dat`` files, and TOML / mappings.

All three produce the same :class:`Crystal`; the ``.dat`` reader also returns the diffraction
settings of the file (hv, zone, norm, kt, xaxis, beam list, thresholds, ``abs``, ``adj``) in
``crystal.extra['dat']`` so a PyExtal user's file runs as it is.

PyExtal ``.dat`` keywords (PyExtal documentation, configuration page): the first line is a
title; a line starting with ``#`` is a comment (``#`` inside a line is kept: labels such as
``Si#1`` occur); ``crystal NAME : dw=iso|bij|uij occ=1|par``; ``cell a b c alpha beta gamma``;
``atom LABEL x y z B [occ]`` or, for ``dw=bij``/``dw=uij``, six values in the order
11 22 33 12 13 23; ``spg NUMBER SETTING`` (SETTING selects origin choice 1/2, or for
rhombohedral groups 1 = hexagonal axes, 2 = rhombohedral axes); ``hv`` kV; ``zone``; ``norm``;
``kt``; ``xaxis``; ``conv``; ``samp``; ``sele sgmax gmax bmin kflag``; ``hkl N`` + N lines;
``sgmax``; ``sgmin``; ``omeg``; ``aper``; ``out N`` + N lines; ``abs`` (V); ``v0``;
``adj N`` + lines ``h k l |U| phi |U'| phi'``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import gemmi
import numpy as np

from ..errors import QcbedInputError
from .crystal import AtomSite, Crystal, normalise_element

_RHOMBO = {146, 148, 155, 160, 161, 166, 167}


def _beta_from_u(u6, crystal_cell) -> tuple:
    """CIF-order U (U11 U22 U33 U12 U13 U23) [Å^2] -> β exponent (3x3)."""
    from .crystal import cell_metric

    rl = np.sqrt(np.diag(np.linalg.inv(cell_metric(crystal_cell))))
    u11, u22, u33, u12, u13, u23 = (float(x) for x in u6)
    U = np.array([[u11, u12, u13], [u12, u22, u23], [u13, u23, u33]])
    beta = 2 * math.pi**2 * np.outer(rl, rl) * U
    return tuple(map(tuple, beta))


def _beta_from_b6(b6) -> tuple:
    b11, b22, b33, b12, b13, b23 = (float(x) for x in b6)
    return ((b11, b12, b13), (b12, b22, b23), (b13, b23, b33))


# ----------------------------------------------------------------------------------- CIF
def _op_key(op: gemmi.Op) -> tuple:
    """An operation as (rotation, translation modulo one cell) in gemmi's integer units."""
    return tuple(map(tuple, op.rot)), tuple(int(t) % gemmi.Op.DEN for t in op.tran)


def _cif_value(path: Path, block_name: str, tag: str) -> str | None:
    try:
        doc = gemmi.cif.read(str(path))
        block = doc.find_block(block_name) or doc[0]
        v = block.find_value(tag)
    except (RuntimeError, ValueError, IndexError):
        return None
    if v is None:
        return None
    v = gemmi.cif.as_string(v).strip()
    return None if v in ("", "?", ".") else v


def _cif_spacegroup(st: gemmi.SmallStructure, path: Path) -> gemmi.SpaceGroup:
    """The space group of a CIF, with the operations the coordinates were given in.

    * A listed ``_space_group_symop_operation_xyz`` (or ``_symmetry_equiv_pos_as_xyz``) loop decides: it must
      be a tabulated setting (gemmi.find_spacegroup_by_ops), and its operations (centring included) must be
      the group's, else an error names the loop.
    * Otherwise the Hall symbol, or the H-M symbol with its origin choice.  gemmi's small-structure reader
      takes origin choice 2 for a bare H-M symbol and ignores ``_space_group_IT_coordinate_system_code``,
      so a CIF of Si in origin choice 1 (Si at 0 0 0) would be read with the origin-2 operations (16 atoms
      in the cell, not 8): the code is honoured here, and a group with two origin choices and neither a
      code, a qualified symbol (``F d -3 m:1``), a Hall symbol nor an operation loop is an error.
    """
    where = f"{path}: _space_group"
    if st.symops:
        tag = f"{path}: _space_group_symop_operation_xyz"
        try:
            listed = [gemmi.Op(t) for t in st.symops]
        except (RuntimeError, ValueError) as exc:
            raise QcbedInputError(tag, f"cannot read the symmetry operations: {exc}") from None
        ops = gemmi.GroupOps(listed)
        sg = gemmi.find_spacegroup_by_ops(ops)
        if sg is None:
            raise QcbedInputError(tag, "the listed operations are not a tabulated space-group setting",
                                  "give the operations of a standard setting, or the H-M symbol with its origin choice")
        if {_op_key(o) for o in listed} - {_op_key(o) for o in sg.operations()}:
            raise QcbedInputError(tag, f"the listed operations are not all operations of {sg.xhm()}",
                                  "check the operation loop against the space-group symbol")
        return sg
    sg = st.spacegroup
    if sg is None:
        raise QcbedInputError(where, "space group not found or not recognised",
                              "add _space_group_name_H-M_alt or _space_group_symop_operation_xyz")
    if st.spacegroup_hall.strip() or ":" in st.spacegroup_hm or sg.ext not in ("1", "2"):
        return sg
    code = _cif_value(path, st.name, "_space_group_IT_coordinate_system_code")
    if code is None:
        raise QcbedInputError(where, f"{sg.hm} has two origin choices and the CIF does not say which",
                              "add _space_group_IT_coordinate_system_code 1 or 2, or the operation loop "
                              "_space_group_symop_operation_xyz")
    chosen = gemmi.find_spacegroup_by_name(f"{sg.hm}:{code}") if code in ("1", "2") else None
    if chosen is None:
        raise QcbedInputError(f"{path}: _space_group_IT_coordinate_system_code",
                              f"{code!r} is not an origin choice of {sg.hm}", "give 1 or 2")
    return chosen


def _first_tag(path: Path, block: str, tags: tuple) -> str:
    """The tag of ``tags`` the CIF uses (the first, when it uses none): for messages."""
    return next((t for t in tags if _cif_value(path, block, t) is not None), tags[0])


def _check_symbols_agree(st: gemmi.SmallStructure, path: Path, sg: gemmi.SpaceGroup) -> None:
    """The space-group number, the Hermann-Mauguin symbol and the Hall symbol a CIF gives must name the group
    it is read in (:func:`_cif_spacegroup`: the operation loop, else the symbols).  gemmi takes one of them and
    ignores the rest, so ``_space_group_IT_number 227`` with H-M ``'P 1'`` ran as P 1 with one atom in the cell
    instead of 8: a contradiction is refused, naming the item that disagrees."""
    decided = ("the listed operations" if st.symops else "the Hall symbol" if st.spacegroup_hall.strip()
               else "the Hermann-Mauguin symbol")
    said = []
    if st.spacegroup_number:
        tag = _first_tag(path, st.name, ("_space_group_IT_number", "_symmetry_Int_Tables_number"))
        said.append((tag, str(st.spacegroup_number), st.spacegroup_number))
    if st.spacegroup_hm.strip() and (st.symops or st.spacegroup_hall.strip()):
        named = gemmi.find_spacegroup_by_name(st.spacegroup_hm)
        tag = _first_tag(path, st.name, ("_space_group_name_H-M_alt", "_symmetry_space_group_name_H-M"))
        said.append((tag, repr(st.spacegroup_hm), None if named is None else named.number))
    if st.spacegroup_hall.strip() and st.symops:
        try:
            by_hall = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(st.spacegroup_hall))
        except (RuntimeError, ValueError):
            by_hall = None
        tag = _first_tag(path, st.name, ("_space_group_name_Hall", "_symmetry_space_group_name_Hall"))
        said.append((tag, repr(st.spacegroup_hall), None if by_hall is None else by_hall.number))
    for tag, text, number in said:
        if number is not None and number != sg.number:
            raise QcbedInputError(f"{path}: {tag}", f"{text} is space group No. {number}, but {decided} name "
                                  f"{sg.xhm()} (No. {sg.number})",
                                  "make the number, the symbol and the operation loop name one group (correct the "
                                  "wrong one: the atoms are expanded by its operations)")


def read_cif(path: str | Path) -> Crystal:
    path = Path(path)
    try:
        st = gemmi.read_small_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise QcbedInputError(str(path), f"cannot read CIF: {exc}", "check the file is a valid small-molecule CIF") from None
    cell = (st.cell.a, st.cell.b, st.cell.c, st.cell.alpha, st.cell.beta, st.cell.gamma)
    if st.cell.a <= 1e-6:
        raise QcbedInputError(f"{path}: _cell_length_a", "the CIF has no unit cell", "add the _cell_* items")
    sg = _cif_spacegroup(st, path)
    _check_symbols_agree(st, path, sg)
    sites = []
    for i, s in enumerate(st.sites):
        el = s.element.name if s.element.atomic_number > 0 else normalise_element(
            s.type_symbol or s.label, f"{path}: atom {s.label}")
        if s.element.atomic_number == 0:
            el = normalise_element(s.type_symbol or s.label, f"{path}: atom {s.label}")
        occ = float(s.occ) if s.occ == s.occ else 1.0
        if s.aniso.nonzero():
            a = s.aniso
            beta = _beta_from_u((a.u11, a.u22, a.u33, a.u12, a.u13, a.u23), cell)
            sites.append(AtomSite(s.label, el, tuple(s.fract.tolist()), occ, None, beta))
        else:
            sites.append(AtomSite(s.label, el, tuple(s.fract.tolist()), occ, 8 * math.pi**2 * float(s.u_iso)))
    return Crystal(name=st.name or path.stem, cell=cell, spacegroup=sg.xhm(), sites=tuple(sites),
                   source=f"cif:{path.name}")


# ----------------------------------------------------------------------------------- .dat
def _dat_spacegroup(number: int, setting: int | None, where: str) -> str:
    try:
        sg = gemmi.find_spacegroup_by_number(number)
    except (ValueError, RuntimeError):
        sg = None
    if sg is None or not (1 <= number <= 230):
        raise QcbedInputError(where, f"unknown space-group number {number}", "use 1-230")
    hm = sg.hm
    if number in _RHOMBO:
        return f"{hm}:{'R' if setting == 2 else 'H'}"
    if setting in (1, 2):
        cand = gemmi.find_spacegroup_by_name(f"{hm}:{setting}")
        if cand is not None and cand.number == number:
            return cand.xhm()
    return sg.xhm()


def _floats(tokens, n, where, what):
    if len(tokens) < n:
        raise QcbedInputError(where, f"expected {n} numbers for {what}, got {len(tokens)}")
    try:
        return [float(t) for t in tokens[:n]]
    except ValueError:
        raise QcbedInputError(where, f"{what} must be numbers, got {' '.join(tokens[:n])!r}") from None


def _ints(tokens, n, where, what):
    vals = _floats(tokens, n, where, what)
    if any(v != round(v) for v in vals):
        raise QcbedInputError(where, f"{what} must be integers, got {tokens[:n]}")
    return [int(round(v)) for v in vals]


def read_dat(path: str | Path) -> Crystal:
    """Read a PyExtal/extal ``.dat`` file (see module docstring for the keywords)."""
    path = Path(path)
    try:
        raw = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise QcbedInputError(str(path), f"cannot read: {exc.strerror}") from None
    lines = [(n + 1, ln.strip()) for n, ln in enumerate(raw)]
    title = lines[0][1].lstrip("#").strip() if lines else ""
    body = [(n, ln) for n, ln in lines[1:] if ln and not ln.startswith("#")]
    name, dw, occ_mode = path.stem, "iso", "1"
    cell = None
    spg = None
    atoms_raw = []
    settings: dict = {"title": title}
    i = 0
    while i < len(body):
        n, ln = body[i]
        where = f"{path.name} line {n}"
        tok = ln.split()
        key = tok[0].lower()
        args = tok[1:]
        i += 1
        if key == "crystal":
            rest = ln[len(tok[0]):]
            head, _, opts = rest.partition(":")
            name = head.strip() or name
            opts = opts.replace(" = ", "=").replace("= ", "=").replace(" =", "=")
            for kv in opts.split():
                k, _, v = kv.partition("=")
                if k.lower() == "dw":
                    dw = v.lower()
                elif k.lower() == "occ":
                    occ_mode = v.lower()
            if dw not in ("iso", "bij", "uij"):
                raise QcbedInputError(where, f"dw={dw!r} is not one of iso, bij, uij")
        elif key == "cell":
            cell = _floats(args, 6, where, "cell a b c alpha beta gamma")
        elif key == "atom":
            atoms_raw.append((where, args))
        elif key == "spg":
            num = _ints(args, 1, where, "space-group number")[0]
            setting = _ints(args[1:], 1, where, "setting")[0] if len(args) > 1 else None
            spg = (num, setting, where)
        elif key in ("hv", "conv", "sgmax", "sgmin", "omeg", "aper", "abs", "v0", "pix"):
            settings[key] = _floats(args, 1, where, key)[0]
        elif key == "samp":
            settings[key] = _ints(args, 1, where, key)[0]
        elif key in ("zone", "norm", "xaxis"):
            settings[key] = _floats(args, 3, where, key)
        elif key == "kt":
            settings[key] = _floats(args, 3, where, key)
        elif key == "sele":
            settings["sele"] = _floats(args, min(len(args), 4), where, "sele sgmax gmax bmin kflag")
        elif key in ("hkl", "out"):
            cnt = _ints(args, 1, where, f"{key} count")[0]
            rows = []
            for _ in range(cnt):
                if i >= len(body):
                    raise QcbedInputError(where, f"'{key} {cnt}' announces {cnt} lines but the file ends after {len(rows)}")
                n2, l2 = body[i]
                rows.append(_ints(l2.split(), 3, f"{path.name} line {n2}", "h k l"))
                i += 1
            settings["beams" if key == "hkl" else "out"] = rows
        elif key == "adj":
            cnt = _ints(args, 1, where, "adj count")[0]
            rows = []
            # PyExtal files sometimes list both +g and -g after 'adj N': read every following adj row
            while i < len(body):
                n2, l2 = body[i]
                t2 = l2.split()
                if len(t2) < 7 or not all(_isnum(x) for x in t2[:7]):
                    break
                h = _ints(t2, 3, f"{path.name} line {n2}", "h k l")
                u, phi, up, phip = _floats(t2[3:], 4, f"{path.name} line {n2}", "|U| phi |U'| phi'")
                rows.append({"hkl": h, "U": u, "phase_deg": phi, "Uprime": up, "phase_prime_deg": phip})
                i += 1
            if len(rows) < cnt:
                raise QcbedInputError(where, f"'adj {cnt}' announces {cnt} rows, found {len(rows)}")
            settings["adj"] = rows
        else:
            settings.setdefault("ignored_keywords", []).append(key)
    if cell is None:
        raise QcbedInputError(f"{path.name}: cell", "no 'cell a b c alpha beta gamma' line")
    if spg is None:
        raise QcbedInputError(f"{path.name}: spg", "no 'spg NUMBER SETTING' line")
    if not atoms_raw:
        raise QcbedInputError(f"{path.name}: atom", "no 'atom' lines")
    sgname = _dat_spacegroup(*spg)
    sites = []
    for where, args in atoms_raw:
        if not args:
            raise QcbedInputError(where, "atom line needs: label x y z B [occ]")
        label = args[0]
        el = normalise_element(label, where)
        xyz = _floats(args[1:], 3, where, "x y z")
        if dw == "iso":
            b = _floats(args[4:], 1, where, "isotropic B")[0]
            rest = args[5:]
            site_kw = dict(b_iso=b, beta=None)
        else:
            six = _floats(args[4:], 6, where, f"six {'beta' if dw == 'bij' else 'U'} values 11 22 33 12 13 23")
            beta = _beta_from_b6(six) if dw == "bij" else _beta_from_u(six, cell)
            rest = args[10:]
            site_kw = dict(b_iso=None, beta=beta)
        occ = 1.0
        if occ_mode == "par" or rest:
            if rest:
                occ = _floats(rest, 1, where, "occupancy")[0]
            elif occ_mode == "par":
                raise QcbedInputError(where, "occ=par needs an occupancy after the thermal parameters")
        sites.append(AtomSite(label, el, tuple(xyz), occ, **site_kw))
    return Crystal(name=name, cell=tuple(cell), spacegroup=sgname, sites=tuple(sites),
                   source=f"dat:{path.name}", extra={"dat": settings})


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------- TOML
_SITE_KEYS = {"label", "element", "xyz", "B", "U_iso", "beta", "U", "occupancy"}
_CRYSTAL_KEYS = {"name", "cell", "spacegroup", "atoms"}


def crystal_from_mapping(d: dict, source: str = "inline", field_prefix: str = "crystal") -> Crystal:
    """Build a Crystal from a mapping (inline TOML).

    Keys: name, cell = [a, b, c, alpha, beta, gamma], spacegroup = "F d -3 m:2" or a number,
    atoms = list of {label, element (default: from label), xyz, B | U_iso | beta (6) | U (6),
    occupancy (default 1)}.  Six-component tensors are in the order 11 22 33 12 13 23.
    """
    if not isinstance(d, dict):
        raise QcbedInputError(field_prefix, "must be a table")
    unknown = set(d) - _CRYSTAL_KEYS
    if unknown:
        raise QcbedInputError(f"{field_prefix}.{sorted(unknown)[0]}", "unknown key",
                              f"allowed keys: {', '.join(sorted(_CRYSTAL_KEYS))}")
    for k in ("cell", "spacegroup", "atoms"):
        if k not in d:
            raise QcbedInputError(f"{field_prefix}.{k}", "missing", "see data/si.toml for an example")
    cell = d["cell"]
    if not isinstance(cell, (list, tuple)):
        raise QcbedInputError(f"{field_prefix}.cell", "must be a list of six numbers a b c alpha beta gamma")
    atoms = d["atoms"]
    if not isinstance(atoms, list) or not atoms:
        raise QcbedInputError(f"{field_prefix}.atoms", "must be a non-empty list of atom tables")
    sites = []
    for i, a in enumerate(atoms):
        f = f"{field_prefix}.atoms[{i}]"
        if not isinstance(a, dict):
            raise QcbedInputError(f, "must be a table with label, xyz and B")
        bad = set(a) - _SITE_KEYS
        if bad:
            raise QcbedInputError(f"{f}.{sorted(bad)[0]}", "unknown key", f"allowed: {', '.join(sorted(_SITE_KEYS))}")
        label = str(a.get("label", a.get("element", "")))
        el = normalise_element(a.get("element", label), f"{f}.element")
        xyz = a.get("xyz")
        if not isinstance(xyz, (list, tuple)) or len(xyz) != 3:
            raise QcbedInputError(f"{f}.xyz", "must be three fractional coordinates")
        try:
            xyz = tuple(float(x) for x in xyz)
            occ = float(a.get("occupancy", 1.0))
        except (TypeError, ValueError):
            raise QcbedInputError(f, "xyz and occupancy must be numbers") from None
        therm = [k for k in ("B", "U_iso", "beta", "U") if k in a]
        if len(therm) > 1:
            raise QcbedInputError(f, f"give one of B, U_iso, beta, U (got {', '.join(therm)})")
        kind = therm[0] if therm else "B"
        val = a.get(kind, 0.0)
        try:
            if kind == "B":
                kw = dict(b_iso=float(val), beta=None)
            elif kind == "U_iso":
                kw = dict(b_iso=8 * math.pi**2 * float(val), beta=None)
            else:
                if not isinstance(val, (list, tuple)) or len(val) != 6:
                    raise QcbedInputError(f"{f}.{kind}", "must be six numbers in the order 11 22 33 12 13 23")
                kw = dict(b_iso=None, beta=_beta_from_b6(val) if kind == "beta" else _beta_from_u(val, cell))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, QcbedInputError):
                raise
            raise QcbedInputError(f"{f}.{kind}", f"must be a number or list of numbers, got {val!r}") from None
        sites.append(AtomSite(label or el, el, xyz, occ, **kw))
    from .crystal import validate_cell

    validate_cell(cell, f"{field_prefix}.cell")
    return Crystal(name=str(d.get("name", "crystal")), cell=tuple(cell), spacegroup=d["spacegroup"],
                   sites=tuple(sites), source=source)


def read_toml(path: str | Path) -> Crystal:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise QcbedInputError(str(path), f"malformed TOML: {exc}") from None
    if "crystal" in data:
        data = data["crystal"]
    return crystal_from_mapping(data, source=f"toml:{path.name}")


def load_crystal(path: str | Path) -> Crystal:
    """Read a crystal from a .cif, PyExtal .dat or .toml file, chosen by extension."""
    path = Path(path)
    if not path.exists():
        raise QcbedInputError(str(path), "file not found", "give the path of a .cif, .dat or .toml crystal file")
    ext = path.suffix.lower()
    if ext == ".cif":
        return read_cif(path)
    if ext == ".dat":
        return read_dat(path)
    if ext == ".toml":
        return read_toml(path)
    raise QcbedInputError(str(path), f"unknown crystal file type {ext!r}", "use .cif, .dat (PyExtal) or .toml")
