"""Richardson-Lucy deconvolution of a recorded pattern with the detector's measured MTF.

The detector spreads each electron's signal over neighbouring pixels; the recorded image is
D = H I + b + noise, with H the convolution by the point-spread function (PSF, the inverse
Fourier transform of the modulation transfer function, MTF), I the pattern before the detector
and b a constant background [counts].  Richardson-Lucy (W. H. Richardson, J. Opt. Soc. Am. 62
(1972) 55; L. B. Lucy, Astron. J. 79 (1974) 745) is the expectation-maximisation solution for
Poisson data (Shepp & Vardi, IEEE Trans. Med. Imaging 1 (1982) 113):

    I_{k+1} = I_k * H^T[ w D / (H I_k + b) ] / H^T[w]

with w the usable-pixel mask.  Where the whole PSF lies inside the image and every pixel is
usable, H^T[w] = 1 and this is the textbook I_k * H^T[D / (H I_k + b)]; dividing by H^T[w]
keeps the true image a fixed point at the image edges and next to masked pixels.  With b = 0
the update conserves flux exactly: sum(H^T[w] * I_{k+1}) = sum(w D) at every iteration, which
is sum(I_{k+1}) = sum(D) for an image whose signal lies further than the PSF radius from the
edges.  Negative data (dark subtraction) are clipped at 0 in the update (RL needs D >= 0), not
in chi^2.

Stopping rule (the discrepancy principle): iterate until the reduced

    chi^2 = mean_w[ (H I_k + b - D)^2 / sigma^2(H I_k + b) ]

falls to <= 1 (the data are then fitted to within their noise; iterating further fits noise),
or after ``max_iterations``.  sigma^2 is the detector model of :mod:`stages.physics.noise`
(Zuo, Microsc. Res. Tech. 49 (2000) 245), or max(I, 1) counts^2 for a counting detector.
PyExtal's LucyRichardson module computes the same chi^2 but runs a fixed iteration count.

The convolution is done by FFT on arrays zero-padded by the PSF radius, so it is a linear (not
circular) convolution: nothing wraps around from one edge to the other, and pixels outside the
image count as zero.  Units: image, data and background in counts; kernels dimensionless
(normalised to unit sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.fft as sfft

from ..errors import QcbedInputError
from .noise import DetectorModel, poisson_variance

SUPPORT_THRESHOLD = 1e-6
"""Kernel values below this fraction of the kernel's maximum are outside its support."""


class Deconvolved(NamedTuple):
    """Result of :func:`richardson_lucy`.

    image: the restored image [counts], shape of the data.
    chi2_history: reduced chi^2 of the initial guess and of each iterate (len = iterations + 1);
        the last entry belongs to ``image``.
    """

    image: np.ndarray
    chi2_history: np.ndarray


def psf_from_mtf(mtf: np.ndarray) -> np.ndarray:
    """Centred real-space PSF from an MTF (or complex OTF) in FFT layout (zero frequency at [0, 0]).

    The PSF is Re(IFFT2(MTF)) shifted so that its centre is at index (ny // 2, nx // 2).
    """
    return np.fft.fftshift(np.real(np.fft.ifft2(np.asarray(mtf))))


def kernel_half_widths(psf: np.ndarray, threshold: float = SUPPORT_THRESHOLD) -> tuple[int, int]:
    """Half-widths (rows, cols) [pixels] about the centre (n // 2) of the region where psf > threshold * max."""
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    rows, cols = np.nonzero(psf > threshold * psf.max())
    return int(np.abs(rows - cy).max()), int(np.abs(cols - cx).max())


def _centred_crop(psf: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """The (2 ry + 1, 2 rx + 1) window of ``psf`` centred on (ny // 2, nx // 2), zero outside ``psf``."""
    ny, nx = psf.shape
    cy, cx = ny // 2, nx // 2
    out = np.zeros((2 * ry + 1, 2 * rx + 1))
    y0, y1 = max(cy - ry, 0), min(cy + ry + 1, ny)
    x0, x1 = max(cx - rx, 0), min(cx + rx + 1, nx)
    out[y0 - (cy - ry):y1 - (cy - ry), x0 - (cx - rx):x1 - (cx - rx)] = psf[y0:y1, x0:x1]
    return out


def prepare_kernel(kernel, image_shape: tuple[int, int], *, psf: bool = False, pad: int | None = None,
                   field: str = "deconvolution.mtf") -> np.ndarray:
    """Odd-sized, non-negative, unit-sum PSF centred in its array, ready for :func:`make_blur`.

    kernel: an MTF in FFT layout of the image's shape (``psf=False``), or a real-space PSF of
        any shape centred at index (n // 2) (``psf=True``).
    pad: if given, the largest PSF radius [pixels] kept (and so the zero-padding); by default
        the radius of the region above SUPPORT_THRESHOLD of the maximum.  A radius never exceeds
        the image size - 1 (farther values cannot link two pixels of the image).
    Negative values (ringing or noise of a measured MTF) are set to 0, since RL needs a
    non-negative kernel, and the kernel is then renormalised to unit sum so that H conserves
    flux.
    """
    k = np.asarray(kernel)
    if k.ndim != 2 or k.size == 0:
        raise QcbedInputError(field, f"must be a 2-D array, got shape {k.shape}", "give a 2-D MTF or PSF")
    if not np.all(np.isfinite(k)):
        raise QcbedInputError(field, "contains NaN or infinite values", "give a finite MTF or PSF")
    if np.iscomplexobj(k) and psf:
        raise QcbedInputError(field, "a real-space PSF must be real", "give the PSF, or psf = false for an MTF")
    if not psf:
        if k.shape != tuple(image_shape):
            raise QcbedInputError(field, f"MTF shape {k.shape} differs from the image shape {tuple(image_shape)}",
                                  "give the MTF in FFT layout on the image's grid, or a centred PSF with psf = true")
        k = psf_from_mtf(k)
    k = np.maximum(np.asarray(k, dtype=np.float64), 0.0)
    if not k.sum() > 0:
        raise QcbedInputError(field, "the PSF has no positive values", "check the MTF/PSF file")
    ry, rx = kernel_half_widths(k)
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
            pad_field = field.rpartition(".")[0] + ".pad" if "." in field else "pad"
            raise QcbedInputError(pad_field, f"must be an integer >= 0, got {pad!r}",
                                  "give the padding in pixels")
        ry, rx = min(ry, int(pad)), min(rx, int(pad))
    ry, rx = min(ry, image_shape[0] - 1), min(rx, image_shape[1] - 1)
    out = _centred_crop(k, ry, rx)
    total = out.sum()
    if not total > 0:
        raise QcbedInputError(field, "the PSF centre is zero", "centre the PSF at index (n // 2)")
    return out / total


@dataclass(frozen=True)
class LinearBlur:
    """Convolution H by a centred kernel, as a linear map on images of ``image_shape``.

    Both images are zero-padded to ``padded_shape`` (>= image + kernel radius), so the FFT
    product is a linear convolution; ``apply`` is H, ``adjoint`` its transpose (correlation).
    """

    kernel_fft: np.ndarray
    image_shape: tuple[int, int]
    padded_shape: tuple[int, int]

    def apply(self, image: np.ndarray) -> np.ndarray:
        f = sfft.rfft2(image, s=self.padded_shape)
        return sfft.irfft2(f * self.kernel_fft, s=self.padded_shape)[: self.image_shape[0], : self.image_shape[1]]

    def adjoint(self, image: np.ndarray) -> np.ndarray:
        f = sfft.rfft2(image, s=self.padded_shape)
        return sfft.irfft2(f * np.conj(self.kernel_fft), s=self.padded_shape)[
            : self.image_shape[0], : self.image_shape[1]]


def make_blur(kernel: np.ndarray, image_shape: tuple[int, int]) -> LinearBlur:
    """H for an odd-sized centred ``kernel`` (from :func:`prepare_kernel`) on images of ``image_shape``.

    H I (y) = sum_d kernel[r + d] I(y - d), d in [-r, r], pixels outside the image being zero;
    the same as ``scipy.ndimage.convolve(I, kernel, mode="constant")``.
    """
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    ny, nx = image_shape
    padded = (sfft.next_fast_len(ny + ry, real=True), sfft.next_fast_len(nx + rx, real=True))
    k = np.zeros(padded)
    k[: kernel.shape[0], : kernel.shape[1]] = kernel
    k = np.roll(k, (-ry, -rx), axis=(0, 1))  # kernel centre at [0, 0]
    return LinearBlur(sfft.rfft2(k), (ny, nx), padded)


def _variance_function(noise: DetectorModel | None):
    """sigma^2(I) [counts^2] of the model; floored at sigma^2(1 count) where sigma^2(0) = 0."""
    if noise is None:
        return poisson_variance
    floor = float(noise.variance(0.0))
    if floor <= 0:
        floor = float(noise.variance(1.0))
    return lambda i: np.maximum(noise.variance(i), floor)


def reduced_chi2(model: np.ndarray, data: np.ndarray, valid: np.ndarray, variance) -> float:
    """mean over valid pixels of (model - data)^2 / variance(model)."""
    m, d = model[valid], data[valid]
    return float(np.mean((m - d) ** 2 / variance(m)))


def richardson_lucy(data, kernel, *, psf: bool = False, noise: DetectorModel | None = None,
                    background: float = 0.0, max_iterations: int = 50, valid=None,
                    pad: int | None = None, target_chi2: float = 1.0,
                    field: str = "deconvolution") -> Deconvolved:
    """Richardson-Lucy deconvolution of ``data`` [counts] stopped by the detector noise model.

    kernel: MTF in FFT layout of the data's shape, or (``psf=True``) a centred real-space PSF.
    noise: detector model giving sigma^2 for chi^2 (None: counting statistics, max(I, 1)).
    background: constant b >= 0 [counts] in the model H I + b.
    valid: boolean mask of usable pixels (default: the finite ones); others are left out of the
        update and of chi^2, and keep their starting value where no usable pixel constrains them.
    pad: largest PSF radius / zero-padding [pixels] (default: the PSF support).
    Starts from I_0 = max(D - b, 1e-3 mean(D - b)) on usable pixels (the mean elsewhere: RL's
    multiplicative update cannot leave 0) and stops at the first iterate with chi^2 <= target_chi2
    (1 by default) or after ``max_iterations`` updates.  See the module docstring.
    """
    d = np.asarray(data, dtype=np.float64)
    if d.ndim != 2:
        raise QcbedInputError(f"{field}.data", f"must be a 2-D image, got shape {d.shape}", "deconvolve one image")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)) or max_iterations < 0:
        raise QcbedInputError(f"{field}.iterations", f"must be an integer >= 0, got {max_iterations!r}",
                              "give the largest number of iterations, e.g. 50")
    if isinstance(background, bool) or not isinstance(background, (int, float, np.integer, np.floating)) \
            or not math.isfinite(background) or background < 0:
        raise QcbedInputError(f"{field}.background", f"must be a finite number >= 0, got {background!r}",
                              "give the constant background in counts, or 0")
    b = float(background)
    ok = np.isfinite(d)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != d.shape:
            raise QcbedInputError(f"{field}.valid", f"mask shape {valid.shape} differs from the image shape "
                                  f"{d.shape}", "give a mask of the image's shape")
        ok &= valid
    if not ok.any():
        raise QcbedInputError(f"{field}.data", "has no usable pixel", "check the image and its mask")
    k = prepare_kernel(kernel, d.shape, psf=psf, pad=pad, field=f"{field}.mtf")
    blur = make_blur(k, d.shape)
    variance = _variance_function(noise)

    w = ok.astype(np.float64)
    dpos = np.where(ok, np.maximum(d, 0.0), 0.0)
    norm = blur.adjoint(w)
    update = norm > 1e-12 * norm.max()
    signal_mean = float(np.mean(dpos[ok]) - b)
    if not signal_mean > 0:
        raise QcbedInputError(f"{field}.background", f"{b} counts is not below the mean of the data",
                              "give a background below the signal")
    start = np.maximum(dpos - b, 1e-3 * signal_mean)
    image = np.where(ok, start, signal_mean)

    history = []
    for iteration in range(max_iterations + 1):
        model = blur.apply(image) + b
        history.append(reduced_chi2(model, d, ok, variance))
        if history[-1] <= target_chi2 or iteration == max_iterations:
            break
        ratio = np.divide(dpos, model, out=np.zeros_like(model), where=ok & (model > 0))
        step = np.maximum(blur.adjoint(ratio), 0.0)  # >= 0 up to FFT round-off
        image = np.where(update, image * step / np.where(update, norm, 1.0), image)
    return Deconvolved(image, np.asarray(history))
