import numpy as np
import pytest

from stages.physics.sampling import convolve_valid, cubic_sample, voigt_kernel


def test_cubic_sample_exact_on_grid_and_for_quadratics():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 30))
    r, c = np.meshgrid(np.arange(1, 18), np.arange(1, 28), indexing="ij")
    v, ok = cubic_sample(img, r, c)
    assert ok.all() and np.allclose(v, img[1:18, 1:28], atol=1e-14)
    # Keys cubic convolution reproduces polynomials up to second order exactly
    R, C = np.meshgrid(np.arange(20.0), np.arange(30.0), indexing="ij")
    quad = 0.3 * R**2 - 0.1 * R * C + 0.05 * C**2 + 2 * R - C + 4
    pr, pc = rng.uniform(1, 17, 100), rng.uniform(1, 26, 100)
    v, ok = cubic_sample(quad, pr, pc)
    assert ok.all()
    np.testing.assert_allclose(v, 0.3 * pr**2 - 0.1 * pr * pc + 0.05 * pc**2 + 2 * pr - pc + 4, rtol=1e-12)


def test_cubic_sample_invalid_support():
    img = np.ones((10, 10))
    img[5, 5] = np.nan
    valid = np.ones((10, 10), bool)
    valid[2, 2] = False
    v, ok = cubic_sample(img, [5.5, 2.5, 7.5, 0.5, 8.7], [5.5, 2.5, 2.5, 5.0, 5.0], valid)
    assert list(ok) == [False, False, True, False, False]
    assert v[2] == pytest.approx(1.0) and np.isnan(v[0])


def test_voigt_kernel_limits():
    k = voigt_kernel(2.0, 0.0)
    ax = np.arange(-k.shape[0] // 2 + 1, k.shape[0] // 2 + 1)
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 4.0))
    np.testing.assert_allclose(k, g / g.sum(), rtol=1e-6, atol=1e-12)
    assert voigt_kernel(1.0, 0.5).sum() == pytest.approx(1.0)


def test_convolve_valid_shape_and_flux():
    img = np.zeros((41, 41))
    img[20, 20] = 1.0
    k = voigt_kernel(1.5, 0.2, radius_px=6)
    out = convolve_valid(img[None], k)
    assert out.shape == (1, 29, 29)
    assert out.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(out[0, 14 - 6:14 + 7, 14 - 6:14 + 7], k[::-1, ::-1], atol=1e-14)
