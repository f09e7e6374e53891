"""Physics kernels: crystal, scattering factors, structure factors, beam selection, Bloch solver.

Pure computation: no file output, no Prefect.  Units: Å, Å^-1 (no 2π), kV, V.
"""
