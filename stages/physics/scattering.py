"""Independent-atom electron scattering factors f_e(s) [Å] and X-ray f_x(s) [electrons].

s = sin(θ)/λ = |g|/2 [Å^-1], g without 2π.  Tables:

* ``peng`` (default): Peng, Ren, Dudarev & Whelan, Acta Cryst. A52 (1996) 257, the 0-2 Å^-1
  fit tabulated as International Tables for Crystallography Vol. C, Table 4.3.2.2:
  f_e(s) = Σ_{i=1..5} a_i exp(-b_i s^2).  Coefficients as distributed with gemmi
  (``Element.c4322``), evaluated here in float64.
* ``kirkland``: Kirkland, Advanced Computing in Electron Microscopy, 2nd ed. (2010), App. C:
  f_e(q) = Σ_{i=1..3} a_i/(q^2 + b_i) + Σ_{i=1..3} c_i exp(-d_i q^2), q = 2s = 1/d.
  Coefficients in ``tables/kirkland2010.csv`` (source cited in its header).

X-ray f_x for IAM X-ray structure factors: International Tables Vol. C Table 6.1.1.4
(IT92, 4 Gaussians + c) as distributed with gemmi (``Element.it92``).

f_e are the non-relativistic (rest-mass) values; U_g carries the factor γ (see
structure_factors.py).  The table used must be recorded with every result.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import gemmi
import numpy as np

from ..errors import QcbedInputError

TABLES = ("peng", "kirkland")
DEFAULT_TABLE = "peng"
TABLE_REFERENCES = {
    "peng": "Peng et al., Acta Cryst. A52 (1996) 257; ITC Vol. C Table 4.3.2.2 (0-2 1/A fit)",
    "kirkland": "Kirkland, Advanced Computing in Electron Microscopy, 2nd ed. (2010), Appendix C",
}
_TABLE_DIR = Path(__file__).with_name("tables")


def check_table(table: str) -> str:
    t = str(table).lower()
    if t not in TABLES:
        raise QcbedInputError("scattering_table", f"unknown table {table!r}", f"choose one of {', '.join(TABLES)}")
    return t


@lru_cache(maxsize=None)
def _kirkland() -> dict[str, np.ndarray]:
    out = {}
    with open(_TABLE_DIR / "kirkland2010.csv") as fh:
        rows = csv.reader(ln for ln in fh if not ln.startswith("#"))
        header = next(rows)
        assert header[:2] == ["Z", "symbol"], header
        for r in rows:
            out[r[1]] = np.array([float(x) for x in r[2:14]])
    return out


@lru_cache(maxsize=None)
def _peng(element: str) -> tuple[np.ndarray, np.ndarray]:
    c = gemmi.Element(element).c4322
    a = np.array(c.a, float)
    b = np.array(c.b, float)
    if not np.any(a):
        raise QcbedInputError("element", f"no Peng (ITC 4.3.2.2) coefficients for {element}",
                              "use scattering_table = 'kirkland'")
    return a, b


def electron_scattering_factor(element: str, s, table: str = DEFAULT_TABLE) -> np.ndarray:
    """f_e(s) [Å] for one element at s = |g|/2 [Å^-1] (array)."""
    table = check_table(table)
    s = np.asarray(s, float)
    s2 = s * s
    if table == "peng":
        a, b = _peng(element)
        return np.exp(-np.multiply.outer(s2, b)) @ a
    k = _kirkland().get(element)
    if k is None:
        raise QcbedInputError("element", f"no Kirkland coefficients for {element}", "use scattering_table = 'peng'")
    q2 = 4.0 * s2
    a, b, c, d = k[0:6:2], k[1:6:2], k[6:12:2], k[7:12:2]
    return (a / (np.add.outer(q2, b))).sum(-1) + np.exp(-np.multiply.outer(q2, d)) @ c


@lru_cache(maxsize=None)
def _it92(element: str):
    c = gemmi.Element(element).it92
    return np.array(c.a, float), np.array(c.b, float), float(c.c)


def xray_scattering_factor(element: str, s) -> np.ndarray:
    """IT92 X-ray f_x(s) [electrons], s [Å^-1]."""
    a, b, c = _it92(element)
    s2 = np.asarray(s, float) ** 2
    return np.exp(-np.multiply.outer(s2, b)) @ a + c


def atomic_number(element: str) -> int:
    return int(gemmi.Element(element).atomic_number)
