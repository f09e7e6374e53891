"""Detector noise model (Zuo 2000) and Richardson-Lucy deconvolution with it."""

import numpy as np
import pytest
from scipy import ndimage

from stages.errors import QcbedInputError
from stages.physics.deconvolution import make_blur, prepare_kernel, psf_from_mtf, richardson_lucy
from stages.physics.noise import DetectorModel, poisson_variance

# PyExtal's YAG-CCD parameters for Si CBED (anchors.md §4): sigma_B^2, delta, A, g, m
YAG = dict(gain=2.2, mixing=0.111, A=1.2, delta=4e-5, background_variance=3.15)


# ----------------------------------------------------------------------------- noise model
def test_variance_formula_by_hand():
    m = DetectorModel(**YAG)
    # m g (A I + delta I^2 + sigma_B^2) at I = 1000 counts, written out
    assert m.variance(1000.0) == pytest.approx(0.111 * 2.2 * (1.2 * 1000 + 4e-5 * 1e6 + 3.15), rel=1e-14)
    # negative intensities are clipped at 0: read-out variance m g sigma_B^2 only
    np.testing.assert_allclose(m.variance([-50.0, 0.0]), 0.111 * 2.2 * 3.15, rtol=1e-14)
    # sigma^2 = m g I / DQE wherever I > 0
    i = np.array([1.0, 30.0, 3e4, 1e6])
    np.testing.assert_allclose(m.variance(i), m.mixing * m.gain * i / m.dqe(i), rtol=1e-13)


def test_dqe_limits():
    m = DetectorModel(**YAG)
    assert m.dqe(0.0) == 0.0                                   # read-out dominated
    # the DQE peaks at I = sqrt(sigma_B^2 / delta) with 1/(A + 2 sqrt(delta sigma_B^2))
    i_peak = np.sqrt(3.15 / 4e-5)
    assert m.dqe(i_peak) == pytest.approx(1 / (1.2 + 2 * np.sqrt(4e-5 * 3.15)), rel=1e-12)
    grid = np.linspace(0.5 * i_peak, 1.5 * i_peak, 1001)
    assert m.dqe(grid).max() <= m.dqe(i_peak) * (1 + 1e-12)
    ideal = DetectorModel(gain=1, mixing=1, A=1, delta=0, background_variance=0)
    np.testing.assert_array_equal(ideal.dqe([0.0, 7.0]), [1.0, 1.0])   # 1/A, also at I = 0
    np.testing.assert_array_equal(ideal.variance([0.0, 7.0]), [0.0, 7.0])


def test_poisson_variance_floor():
    np.testing.assert_array_equal(poisson_variance([-3.0, 0.0, 0.5, 1.0, 250.0]), [1, 1, 1, 1, 250])


@pytest.mark.parametrize("key, value, match", [
    ("gain", 0.0, r"det\.gain: must be > 0"),
    ("mixing", 1.5, r"det\.mixing: must be in \(0, 1\]"),
    ("mixing", 0.0, r"det\.mixing"),
    ("A", 0.9, r"det\.A: must be >= 1"),
    ("delta", -1e-5, r"det\.delta"),
    ("background_variance", -1.0, r"det\.background_variance"),
    ("gain", float("nan"), r"det\.gain: must be finite"),
    ("gain", "2.2", r"det\.gain: must be a number"),
    ("mixing", True, r"det\.mixing: must be a number"),
])
def test_detector_bad_values(key, value, match):
    d = dict(YAG, **{key: value})
    with pytest.raises(QcbedInputError, match=match):
        DetectorModel.from_mapping(d, "det")


def test_detector_mapping_keys():
    m = DetectorModel.from_mapping(YAG, "pattern.detector")
    assert m == DetectorModel(**YAG) and m.to_mapping() == YAG
    with pytest.raises(QcbedInputError, match=r"pattern\.detector\.gian: unknown key \(allowed keys: gain, "):
        DetectorModel.from_mapping(dict(YAG, gian=1), "pattern.detector")
    with pytest.raises(QcbedInputError, match=r"pattern\.detector\.delta: missing"):
        DetectorModel.from_mapping({k: v for k, v in YAG.items() if k != "delta"}, "pattern.detector")
    with pytest.raises(QcbedInputError, match=r"^detector\.gain"):
        DetectorModel(**dict(YAG, gain=-1))


# ----------------------------------------------------------------------------- test image
NY, NX = 96, 112
SIGMA_PSF = 2.0  # pixels


def _gaussian_psf(radius=12, sigma=SIGMA_PSF):
    r = np.arange(-radius, radius + 1)
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


@pytest.fixture(scope="module")
def truth():
    """Smooth positive pattern: four Gaussian disks (sigma 2-4 px) on a 10-count pedestal,
    faded to exactly 0 within 24 px of the edges (farther than the PSF radius, so no flux
    leaves the image and sum(H truth) = sum(truth))."""
    yy, xx = np.mgrid[:NY, :NX]

    def blob(y0, x0, s, a):
        return a * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * s * s))

    edge = np.minimum.reduce([yy, NY - 1 - yy, xx, NX - 1 - xx])
    t = np.clip((edge - 24) / 8, 0, 1)
    window = t * t * (3 - 2 * t)
    return (10 + blob(40, 40, 2.5, 1000) + blob(45, 55, 3, 600) + blob(55, 70, 2, 1500)
            + blob(60, 45, 4, 800)) * window


def _rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------- convolution
def test_blur_is_linear_convolution_without_wraparound():
    rng = np.random.default_rng(3)
    img = rng.random((40, 50))
    psf = _gaussian_psf(radius=6, sigma=1.5)
    blur = make_blur(prepare_kernel(psf, img.shape, psf=True), img.shape)
    ref = ndimage.convolve(img, psf, mode="constant", cval=0.0)   # zero outside, no wrap-around
    np.testing.assert_allclose(blur.apply(img), ref, atol=1e-13)
    # the adjoint is the transpose: <H x, y> = <x, H^T y>
    y = rng.random(img.shape)
    assert np.sum(blur.apply(img) * y) == pytest.approx(np.sum(img * blur.adjoint(y)), rel=1e-13)
    # a point at the left edge never reaches the right edge
    point = np.zeros(img.shape)
    point[20, 0] = 1.0
    assert np.abs(blur.apply(point)[:, -10:]).max() < 1e-15


def test_mtf_and_psf_inputs_agree(truth):
    psf = _gaussian_psf()
    full = np.zeros(truth.shape)
    cy, cx = NY // 2, NX // 2
    full[cy - 12:cy + 13, cx - 12:cx + 13] = psf
    mtf = np.fft.fft2(np.fft.ifftshift(full))          # FFT layout, zero frequency at [0, 0]
    np.testing.assert_allclose(psf_from_mtf(mtf), full, atol=1e-15)
    a = prepare_kernel(mtf, truth.shape)
    b = prepare_kernel(psf, truth.shape, psf=True)
    # support: exp(-r^2 / 8) > 1e-6 for r < sqrt(8 ln 1e6) = 10.5 px, so 21 x 21 of the 25 x 25 given
    assert a.shape == b.shape == (21, 21)
    np.testing.assert_allclose(a, b, atol=1e-15)
    with pytest.raises(QcbedInputError, match=r"deconvolution\.mtf: MTF shape \(25, 25\) differs"):
        prepare_kernel(psf, truth.shape)
    assert prepare_kernel(psf, truth.shape, psf=True, pad=4).shape == (9, 9)


# ----------------------------------------------------------------------------- Richardson-Lucy
def test_rl_noise_free_sharpens_and_conserves_flux(truth):
    psf = _gaussian_psf()
    data = make_blur(prepare_kernel(psf, truth.shape, psf=True), truth.shape).apply(truth)
    # a detector far quieter than the blur residuals: chi^2 never reaches 1, all 50 iterations run
    quiet = DetectorModel(gain=1e-9, mixing=1, A=1, delta=0, background_variance=0)
    image, chi2 = richardson_lucy(data, psf, psf=True, noise=quiet, max_iterations=50)
    assert len(chi2) == 51 and np.all(np.diff(chi2) < 0)
    # measured: RMS error 27.0 counts blurred -> 1.02 after 50 iterations (factor 26.6)
    assert _rms(data, truth) / _rms(image, truth) > 20
    # flux: exactly conserved by the update (b = 0); data sum = truth sum since no flux leaves
    assert image.sum() == pytest.approx(data.sum(), rel=1e-6)
    assert data.sum() == pytest.approx(truth.sum(), rel=1e-12)


def test_rl_poisson_noise_stops_at_chi2_one(truth):
    psf = _gaussian_psf()
    h = make_blur(prepare_kernel(psf, truth.shape, psf=True), truth.shape)
    expected = np.maximum(h.apply(truth * 1000), 0.0)   # peak ~ 1e6 counts
    counting = DetectorModel(gain=1, mixing=1, A=1, delta=0, background_variance=0)  # variance = I
    data = np.random.default_rng(0).poisson(expected).astype(float)
    image, chi2 = richardson_lucy(data, psf, psf=True, noise=counting, max_iterations=200)
    n_iter = len(chi2) - 1
    # measured over seeds 0-9: 16 iterations, final chi^2 0.935-0.956, starting chi^2 >> 1
    assert chi2[0] > 10 and 5 <= n_iter <= 40
    assert 0.8 < chi2[-1] <= 1.0 and chi2[-2] > 1.0
    # measured: RMS error 24.8x smaller than the data's
    assert _rms(data, truth * 1000) / _rms(image, truth * 1000) > 15


def test_rl_masked_pixels_do_not_leak(truth):
    psf = _gaussian_psf()
    blur = make_blur(prepare_kernel(psf, truth.shape, psf=True), truth.shape)
    data = blur.apply(truth)
    data[50:56, 60:66] = 1e6                             # a corrupt block, masked
    valid = np.ones(data.shape, bool)
    valid[50:56, 60:66] = False
    quiet = DetectorModel(gain=1e-9, mixing=1, A=1, delta=0, background_variance=0)
    image, _ = richardson_lucy(data, psf, psf=True, noise=quiet, max_iterations=50, valid=valid)
    # measured: RMS error over the usable pixels 1.45 counts (27.2 for the blurred data)
    assert _rms(image[valid], truth[valid]) < 3.0
    # the conservation law of the masked update: sum(H^T[w] I) = sum(w D), to round-off
    weighted = np.sum(blur.adjoint(valid.astype(float)) * image)
    assert weighted == pytest.approx(data[valid].sum(), rel=1e-10)


def test_rl_background_and_bad_input(truth):
    psf = _gaussian_psf()
    data = make_blur(prepare_kernel(psf, truth.shape, psf=True), truth.shape).apply(truth) + 50.0
    quiet = DetectorModel(gain=1e-9, mixing=1, A=1, delta=0, background_variance=0)
    with_b, _ = richardson_lucy(data, psf, psf=True, noise=quiet, background=50.0, max_iterations=50)
    assert _rms(with_b, truth) < 2.0                     # measured 1.0: the constant is not deconvolved
    with pytest.raises(QcbedInputError, match=r"deconvolution\.iterations: must be an integer >= 0"):
        richardson_lucy(data, psf, psf=True, max_iterations=2.5)
    with pytest.raises(QcbedInputError, match=r"deconvolution\.background"):
        richardson_lucy(data, psf, psf=True, background=-1.0)
    with pytest.raises(QcbedInputError, match=r"deconvolution\.background: .* not below the mean"):
        richardson_lucy(data, psf, psf=True, background=1e9)
    with pytest.raises(QcbedInputError, match=r"deconvolution\.mtf: the PSF has no positive values"):
        richardson_lucy(data, -psf, psf=True)
    with pytest.raises(QcbedInputError, match=r"deconvolution\.valid: mask shape"):
        richardson_lucy(data, psf, psf=True, valid=np.ones((3, 3), bool))
