"""The process runs BLAS with one thread (the project rule; see stages/__init__.py)."""


def test_blas_single_thread():
    from threadpoolctl import threadpool_info

    import stages  # noqa: F401  (importing qcbed applies the limit)

    assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas"), threadpool_info()
