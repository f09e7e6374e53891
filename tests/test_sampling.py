import numpy as np
import pytest

from stages.physics.sampling import (convolve_valid, cubic_sample, voigt_kernel, voigt_max_radius, voigt_profile,
                                    voigt_radius, voigt_support)


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


def _direct_kernel(sigma, gamma, steps, half=12):
    """The documented kernel written out: every offset p a + q b of a generous box closer than
    R = 4 sigma + 8 gamma weighted by V(r) T(r), r = |p a + q b|, T = 1 to 0.9 R then a half cosine to
    0 at R, normalised to unit sum; {(p, q): weight}."""
    a, b = np.asarray(steps, float)
    R = 4 * sigma + 8 * gamma
    out = {}
    for p in range(-half, half + 1):
        for q in range(-half, half + 1):
            d = float(np.linalg.norm(p * a + q * b))
            if d < R:
                taper = 1.0 if d <= 0.9 * R else 0.5 * (1 + np.cos(np.pi * (d - 0.9 * R) / (0.1 * R)))
                out[(p, q)] = float(voigt_profile(d, sigma, gamma)) * taper
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def _as_dict(k):
    P, Q = k.shape[0] // 2, k.shape[1] // 2
    return {(p - P, q - Q): k[p, q] for p in range(k.shape[0]) for q in range(k.shape[1]) if k[p, q] != 0}


def test_voigt_kernel_limits():
    k = voigt_kernel(2.0, 0.0)
    assert k.shape == (15, 15)  # offsets closer than R = 8 px
    ax = np.arange(-7, 8)
    r2 = ax[:, None] ** 2 + ax[None, :] ** 2
    r = np.sqrt(r2)
    g = np.exp(-r2 / 8.0) * np.where(r <= 7.2, 1.0, 0.5 * (1 + np.cos(np.pi * np.clip((r - 7.2) / 0.8, 0, 1))))
    np.testing.assert_allclose(k, g / g.sum(), rtol=1e-9, atol=1e-15)
    # the untruncated, normalised Gaussian to 0.1 % of the peak (measured 0.04 %)
    assert np.max(np.abs(k - np.exp(-r2 / 8.0) / np.exp(-r2 / 8.0).sum())) < 1e-3 * k.max()
    assert voigt_kernel(1.0, 0.5).sum() == pytest.approx(1.0)
    assert voigt_kernel(0.05, 0.0).shape == (1, 1)  # narrower than the grid: the identity


def test_voigt_kernel_weights_true_distances_on_a_skewed_grid():
    """A 60-degree grid: offsets a + b (1.73 steps) and a - b (1.00 step) get the profile at their own
    lengths, as a direct evaluation of the definition does; a square grid would give both the weight
    of sqrt(2)."""
    steps = [[1.0, 0.0], [0.5, np.sqrt(3) / 2]]
    k = voigt_kernel(1.0, 0.2, steps)
    P, Q = k.shape[0] // 2, k.shape[1] // 2
    got, want = _as_dict(k), _direct_kernel(1.0, 0.2, steps)
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key] == pytest.approx(w, rel=1e-12, abs=1e-15), key
    assert k[P + 1, Q - 1] == pytest.approx(k[P + 1, Q], rel=1e-12)  # |a - b| = |a| = 1
    assert k[P + 1, Q + 1] < 0.5 * k[P + 1, Q - 1]  # |a + b| = sqrt(3)
    # a rectangular grid (steps 1 and 1.5) likewise
    rect = [[1.5, 0.0], [0.0, 1.0]]
    got, want = _as_dict(voigt_kernel(1.2, 0.1, rect)), _direct_kernel(1.2, 0.1, rect)
    assert set(got) == set(want) and all(got[key] == pytest.approx(w, rel=1e-12, abs=1e-15) for key, w in want.items())


def test_voigt_kernel_scales_and_is_continuous():
    # the kernel of (k sigma, k gamma) on a grid of step k is that of (sigma, gamma) on the unit grid
    np.testing.assert_allclose(voigt_kernel(3.0, 0.6, 2 * np.eye(2)), voigt_kernel(1.5, 0.3), rtol=1e-12, atol=1e-16)
    # R = 4 sigma crossing the distance 3 of offset (3, 0): the weights change continuously
    lo, hi = voigt_kernel(0.75 - 1e-7, 0.0), voigt_kernel(0.75 + 1e-7, 0.0)
    assert hi.shape == (7, 7) and lo.shape == (5, 5)
    np.testing.assert_allclose(np.pad(lo, 1), hi, atol=1e-6)


def test_voigt_support_and_max_radius_agree():
    rng = np.random.default_rng(5)
    for steps in (np.eye(2), [[1.0, 0.0], [0.5, np.sqrt(3) / 2]], [[2.0, 0.0], [0.3, 1.0]]):
        for pad in (1, 3, 6):
            rmax = voigt_max_radius(steps, pad)
            for _ in range(20):
                s, g = rng.uniform(0.05, 2.0), rng.uniform(0.0, 0.5)
                fits = max(voigt_support(s, g, steps)) <= pad
                assert fits == (voigt_radius(s, g) <= rmax), (steps, pad, s, g)
                k = voigt_kernel(s, g, steps)
                assert (k.shape[0] // 2, k.shape[1] // 2) == voigt_support(s, g, steps)
    assert voigt_max_radius(np.eye(2), 9) == 10.0
    assert voigt_max_radius([[1.0, 0.0], [0.5, np.sqrt(3) / 2]], 3) == pytest.approx(np.sqrt(12))  # offset (4, -2)


def test_convolve_valid_shape_and_flux():
    img = np.zeros((41, 41))
    img[20, 20] = 1.0
    k = voigt_kernel(1.5, 0.2)
    R = k.shape[0] // 2
    assert R == 7  # offsets closer than 4 sigma + 8 gamma = 7.6 px
    out = convolve_valid(img[None], k)
    assert out.shape == (1, 41 - 2 * R, 41 - 2 * R)
    assert out.sum() == pytest.approx(1.0, rel=1e-12)
    c = 20 - R
    np.testing.assert_allclose(out[0, c - R:c + R + 1, c - R:c + R + 1], k[::-1, ::-1], atol=1e-14)
