"""qcbed stages: one module per pipeline stage; physics kernels in :mod:`stages.physics`.

Importing qcbed limits BLAS to one thread per process (the project's rule: cores are used
through processes; two BLAS threads made batched eigen-solves up to 100x slower on shared
2-core machines, see ../shared/research/stack.md).  Set QCBED_BLAS_THREADS to override.
"""

import os as _os
import sys as _sys

__version__ = "0.6.0"

_N = _os.environ.get("QCBED_BLAS_THREADS", "1")
if "numpy" not in _sys.modules:
    for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        _os.environ.setdefault(_v, _N)
else:  # numpy already loaded (e.g. by a test runner plugin): limit its BLAS pool at run time
    from threadpoolctl import threadpool_limits as _limits

    _limits(int(_N), user_api="blas")
