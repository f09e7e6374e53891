"""qcbed flows and the ``qcbed`` command line."""
