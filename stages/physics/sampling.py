"""Sampling images at arbitrary points, and point-spread functions.

Cubic convolution (Keys, IEEE Trans. ASSP 29 (1981) 1153, a = -1/2, "Catmull-Rom"): interpolating,
third-order accurate, and with a 4x4 support, so a sample is valid exactly when its 16 neighbour
pixels are valid (measured, finite, not masked).  A spline interpolation would spread one bad pixel
over the whole image through its prefilter.
"""

from __future__ import annotations

import numpy as np
from scipy.special import wofz


def _keys_weights(t: np.ndarray) -> np.ndarray:
    """Weights (n, 4) of the neighbours at offsets -1, 0, 1, 2 for fractional positions t in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return np.stack([
        -0.5 * t3 + t2 - 0.5 * t,
        1.5 * t3 - 2.5 * t2 + 1.0,
        -1.5 * t3 + 2.0 * t2 + 0.5 * t,
        0.5 * t3 - 0.5 * t2,
    ], axis=-1)


def cubic_sample(image: np.ndarray, rows, cols, valid: np.ndarray | None = None):
    """Sample a 2-D image at (rows, cols) by cubic convolution.

    Returns (values, ok): ``ok`` is False where the 4x4 support leaves the image or touches a pixel
    that is not valid (``valid`` False or non-finite); there ``values`` is NaN.
    """
    vals, ok = cubic_sample_stack(np.asarray(image, float)[None], rows, cols, valid)
    return vals[0], ok


def cubic_sample_stack(images: np.ndarray, rows, cols, valid: np.ndarray | None = None):
    """:func:`cubic_sample` of k images of one shape (k, H, W) at the same points, sharing the weights.

    Returns (values (k, *shape), ok (*shape)): ``ok`` needs the 4x4 support valid (``valid`` True)
    and finite in the first image; the other images' values are NaN where ``ok`` is False and
    non-finite where their own support is.
    """
    stack = np.asarray(images, float)
    img = stack[0]
    r = np.asarray(rows, float)
    c = np.asarray(cols, float)
    shape = r.shape
    r, c = r.ravel(), c.ravel()
    good = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    H, W = img.shape
    r0 = np.floor(r).astype(np.int64)
    c0 = np.floor(c).astype(np.int64)
    inside = (r0 >= 1) & (r0 + 2 <= H - 1) & (c0 >= 1) & (c0 + 2 <= W - 1) & np.isfinite(r) & np.isfinite(c)
    r0c = np.clip(r0, 1, H - 3)
    c0c = np.clip(c0, 1, W - 3)
    wr = _keys_weights(np.where(inside, r - r0, 0.0))
    wc = _keys_weights(np.where(inside, c - c0, 0.0))
    off = np.arange(-1, 3)
    # flat indices of the 4x4 supports (n, 16): one gather per image
    idx = ((r0c[:, None] + off)[:, :, None] * W + (c0c[:, None] + off)[:, None, :]).reshape(len(r), 16)
    ok = inside & good.ravel()[idx].all(axis=1)
    w16 = (wr[:, :, None] * wc[:, None, :]).reshape(len(r), 16)
    out = np.empty((len(stack), len(r)))
    for k, im in enumerate(stack):
        patch = im.ravel()[idx]  # (n, 16)
        if k == 0:
            patch = np.where(np.isfinite(patch), patch, 0.0)
        out[k] = np.where(ok, np.einsum("nk,nk->n", w16, patch), np.nan)
    return out.reshape((len(stack),) + shape), ok.reshape(shape)


def voigt_kernel(sigma_px: float, gamma_px: float, radius_px: int | None = None) -> np.ndarray:
    """2-D radial Voigt point-spread kernel on a pixel grid, normalised to unit sum.

    V(r) = Re w((r + iγ)/(σ√2)) / (σ√(2π)) evaluated at the radial distance r [px] (as PyExtal's
    LARBED probe model, but normalised); σ -> 0 gives a Lorentzian, γ -> 0 a Gaussian.
    ``radius_px`` defaults to ceil(4σ + 8γ), at least 1.
    """
    s = max(float(sigma_px), 1e-6)
    g = max(float(gamma_px), 0.0)
    if radius_px is None:
        radius_px = int(np.ceil(4 * s + 8 * g))
    radius_px = max(1, int(radius_px))
    ax = np.arange(-radius_px, radius_px + 1, dtype=float)
    rr = np.hypot(ax[:, None], ax[None, :])
    k = wofz((rr + 1j * g) / (s * np.sqrt(2))).real / (s * np.sqrt(2 * np.pi))
    return k / k.sum()


def convolve_valid(stack: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each image of (..., H, W) with ``kernel`` (2R+1, 2R+1), keeping only the fully
    supported interior (H-2R, W-2R): the caller pads its grid by R (never wraps around)."""
    from scipy.signal import fftconvolve

    k = np.asarray(kernel, float)
    kk = k.reshape((1,) * (stack.ndim - 2) + k.shape)
    return fftconvolve(stack, kk, mode="valid", axes=(-2, -1))
