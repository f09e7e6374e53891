"""qcbed stages: one module per pipeline stage; physics kernels in :mod:`stages.physics`."""

__version__ = "0.1.0"
