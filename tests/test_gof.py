"""GOF metrics: closed-form scale/backgrounds, noise calibration, dof, user metrics."""

import numpy as np
import pytest

from stages.errors import QcbedInputError
from stages.physics.gof import (METRICS, BaseGOF, Chi2, Chi2Const, Chi2LARBED,
                                Chi2LARBEDMultiBackground, Chi2MultiBackground, XCorrelation,
                                make_gof)
from stages.physics.noise import DetectorModel

# PyExtal's YAG-CCD parameters for Si CBED (anchors.md §4)
YAG = DetectorModel(gain=2.2, mixing=0.111, A=1.2, delta=4e-5, background_variance=3.15)

CHI2_METRICS = {  # name -> (instance, per-disk background?)
    "Chi2": (Chi2(), False),
    "Chi2_const": (Chi2Const(YAG), False),
    "Chi2_multibackground": (Chi2MultiBackground(YAG), True),
    "Chi2_LARBED": (Chi2LARBED(), False),
    "Chi2_LARBED_multibackground": (Chi2LARBEDMultiBackground(), True),
}


def _sigma2(name, exp, variance):
    """The variance each metric is documented to use, written out independently."""
    if name == "Chi2":
        return np.maximum(exp, 1.0)
    if name in ("Chi2_const", "Chi2_multibackground"):
        i = np.maximum(exp, 0.0)
        return 0.111 * 2.2 * (1.2 * i + 4e-5 * i * i + 3.15)
    return variance


def _random_data(rng, n_disks=6, n_points=300):
    """Random CBED-like data with a mask, NaNs in sim/exp/variance and one fully masked disk."""
    sim = rng.uniform(0.0, 1.0, (n_disks, n_points)) ** 2 * 2000.0 + 5.0
    bg = rng.uniform(20.0, 80.0, n_disks)
    exp = 1.7 * sim + bg[:, None] + rng.normal(0.0, 30.0, sim.shape)
    exp[0, :5] = -3.0                                  # a few negative (dark-subtracted) pixels
    variance = rng.uniform(5.0, 500.0, sim.shape)
    mask = rng.random(sim.shape) < 0.8
    mask[2] = False                                    # a disk with no used point
    sim[1, 10:14] = np.nan
    exp[3, 20:25] = np.nan
    exp[4, 30] = np.inf
    variance[5, 40:43] = np.nan
    return sim, exp, variance, mask


def _lstsq(sim, exp, sigma2, used, per_disk, fit_background=True):
    """Weighted least squares with np.linalg.lstsq: columns sim and one indicator per background."""
    n_disks = sim.shape[0]
    d_idx = np.broadcast_to(np.arange(n_disks)[:, None], sim.shape)[used]
    cols = [sim[used]]
    disks = []
    if fit_background:
        if per_disk:
            disks = [d for d in range(n_disks) if np.any(d_idx == d)]
            cols += [(d_idx == d).astype(float) for d in disks]
        else:
            cols.append(np.ones(int(used.sum())))
    a = np.column_stack(cols)
    sw = 1.0 / np.sqrt(sigma2[used])
    coef, res, *_ = np.linalg.lstsq(a * sw[:, None], exp[used] * sw, rcond=None)
    chi2 = float(np.sum((a @ coef - exp[used]) ** 2 * sw ** 2))
    if not fit_background:
        b = np.zeros(n_disks)
    elif per_disk:
        b = np.full(n_disks, np.nan)
        b[disks] = coef[1:]
    else:
        b = np.full(n_disks, coef[1])
    return coef[0], b, chi2, a.shape[1]


# ----------------------------------------------------------------------------- 1. closed form = lstsq
# Both the closed form (centred normal equations) and lstsq (SVD) are backward stable and the
# weighted design matrix has condition number ~1e2-1e3 here, so they agree to ~1e-13; 1e-8 is
# a safe margin that still catches any wrong formula (those differ at the 1e-2 level).
@pytest.mark.parametrize("name", list(CHI2_METRICS))
@pytest.mark.parametrize("fit_background", [True, False])
def test_closed_form_equals_lstsq(name, fit_background):
    rng = np.random.default_rng(11)
    sim, exp, variance, mask = _random_data(rng)
    metric, per_disk = CHI2_METRICS[name]
    metric = type(metric)(*([YAG] if isinstance(metric, Chi2Const) else []), fit_background=fit_background)
    # the Poisson and detector metrics use a given variance as it is (see test_given_variance_is_used), so they
    # are checked here on their own formula, without one
    fit = metric.fit(sim, exp, variance=variance if name.startswith("Chi2_LARBED") else None, mask=mask)

    used = mask & np.isfinite(sim) & np.isfinite(exp)
    if name.startswith("Chi2_LARBED"):
        used &= np.isfinite(variance)
    s2 = _sigma2(name, exp, variance)
    c, b, chi2, n_lin = _lstsq(sim, exp, s2, used, per_disk, fit_background)

    assert fit.scale == pytest.approx(c, rel=1e-8)
    np.testing.assert_allclose(fit.background, b, rtol=1e-8, atol=1e-8 * abs(np.nanmean(b)))
    assert fit.value == pytest.approx(chi2, rel=1e-8)
    assert fit.n_points == int(used.sum()) and fit.n_linear == n_lin
    if per_disk and fit_background:
        assert np.isnan(fit.background[2])                       # disk 2 is fully masked
    # model / residual conventions
    assert np.all(np.isnan(fit.model[~used])) and np.all(fit.residual[~used] == 0)
    bb = np.nan_to_num(fit.background)[:, None]
    np.testing.assert_allclose(fit.model[used], (fit.scale * sim + bb)[used], rtol=1e-14)
    np.testing.assert_allclose(fit.residual[used],
                               (fit.scale * sim + bb - exp)[used] / np.sqrt(s2[used]), rtol=1e-10, atol=1e-12)
    assert np.sum(fit.residual ** 2) == pytest.approx(fit.value, rel=1e-12)


def test_xcorrelation_scale_is_unweighted_lstsq():
    rng = np.random.default_rng(12)
    sim, exp, _, mask = _random_data(rng)
    fit = XCorrelation().fit(sim, exp, mask=mask)
    used = mask & np.isfinite(sim) & np.isfinite(exp)
    c, b, _, _ = _lstsq(sim, exp, np.ones(sim.shape), used, per_disk=False)
    assert fit.scale == pytest.approx(c, rel=1e-8)
    np.testing.assert_allclose(fit.background, b, rtol=1e-8)
    r = np.corrcoef(sim[used], exp[used])[0, 1]
    assert fit.value == pytest.approx(1.0 - r, rel=1e-10)
    assert np.sum(fit.residual ** 2) == pytest.approx(fit.value, rel=1e-10)
    assert fit.n_points == int(used.sum()) and fit.n_linear == 2


# ----------------------------------------------------------------------------- 2. reduced chi^2 ~ 1
# n = 1e5 points: the reduced chi^2 of correctly weighted data scatters by sqrt(2/dof) = 0.45%, so
# the 5% band is > 10 standard deviations; the seed is fixed, the test is deterministic.
N_DISKS, N_PTS = 10, 10_000


def _truth(rng, per_disk):
    sim = rng.uniform(0.2, 1.0, (N_DISKS, N_PTS)) * 1000.0
    c = 3.3
    b = rng.uniform(50.0, 300.0, N_DISKS) if per_disk else np.full(N_DISKS, 120.0)
    return sim, c * sim + b[:, None]


@pytest.mark.parametrize("name", list(CHI2_METRICS))
def test_reduced_chi2_is_one_for_the_assumed_noise(name):
    rng = np.random.default_rng(21)
    metric, per_disk = CHI2_METRICS[name]
    sim, mu = _truth(rng, per_disk)
    variance = None
    if name == "Chi2":
        exp = rng.poisson(mu).astype(float)            # counts 600-3600: sigma^2 = I is the model
    elif name in ("Chi2_const", "Chi2_multibackground"):
        exp = mu + rng.normal(size=mu.shape) * np.sqrt(YAG.variance(mu))
    else:
        variance = rng.uniform(10.0, 5000.0, mu.shape)
        exp = mu + rng.normal(size=mu.shape) * np.sqrt(variance)
    mask = rng.random(mu.shape) < 0.9
    fit = metric.fit(sim, exp, variance=variance, mask=mask)
    red = metric.reduced(fit, n_free=5)
    assert red == pytest.approx(1.0, abs=0.05)
    # a wrong (4x too large) variance is detected: reduced chi^2 ~ 0.25
    if variance is not None:
        assert metric.reduced(metric.fit(sim, exp, variance=4 * variance, mask=mask), 5) \
            == pytest.approx(0.25, abs=0.0125)


@pytest.mark.parametrize("name", ["Chi2", "Chi2_const", "Chi2_multibackground"])
def test_given_variance_is_used(name):
    """A variance given to the Poisson or detector metric (the fine stage passes each sample's variance
    propagated from the pixels, sum w^2 sigma^2) replaces the formula at the sample: the fit equals
    weighted least squares with it; the pixel formula is what pixel_variance gives."""
    rng = np.random.default_rng(5)
    sim, exp, variance, mask = _random_data(rng)
    metric, per_disk = CHI2_METRICS[name]
    fit = metric.fit(sim, exp, variance=variance, mask=mask)
    used = mask & np.isfinite(sim) & np.isfinite(exp) & np.isfinite(variance)
    c, b, chi2, _ = _lstsq(sim, exp, variance, used, per_disk)
    assert fit.scale == pytest.approx(c, rel=1e-8) and fit.value == pytest.approx(chi2, rel=1e-8)
    np.testing.assert_allclose(metric.pixel_variance(exp), _sigma2(name, exp, None), rtol=1e-12)


# ----------------------------------------------------------------------------- 3. dof
def test_dof_counts():
    rng = np.random.default_rng(31)
    n_disks, n_pts = 4, 50
    sim = rng.uniform(10.0, 100.0, (n_disks, n_pts))
    exp = 2.0 * sim + 5.0 + rng.normal(0, 3, sim.shape)
    var = np.full(sim.shape, 9.0)
    mask = np.ones(sim.shape, bool)
    mask[0, :10] = False                     # 10 masked
    exp[1, 0] = np.nan                       # 1 non-finite
    var[2, 0] = np.nan                       # 1 non-finite variance (LARBED metrics only)
    mask[3] = False                          # a whole disk masked: no background for it
    n_common = n_disks * n_pts - 10 - 1 - n_pts

    expected = {  # name -> (n_points, n_linear)
        "Chi2": (n_common, 2),
        "Chi2_const": (n_common, 2),
        "Chi2_multibackground": (n_common, 1 + 3),
        "Chi2_LARBED": (n_common - 1, 2),
        "Chi2_LARBED_multibackground": (n_common - 1, 1 + 3),
    }
    for name, (n_points, n_linear) in expected.items():
        metric = CHI2_METRICS[name][0]
        fit = metric.fit(sim, exp, variance=var if name.startswith("Chi2_LARBED") else None, mask=mask)
        assert (fit.n_points, fit.n_linear) == (n_points, n_linear), name
        assert metric.reduced(fit, 7) == fit.value / (n_points - n_linear - 7)
    # all disks used: n_linear = 1 + n_disks
    fit = Chi2MultiBackground(YAG).fit(sim, np.nan_to_num(exp, nan=50.0))
    assert (fit.n_points, fit.n_linear) == (n_disks * n_pts, 1 + n_disks)
    # scale only
    fit = Chi2(fit_background=False).fit(sim, exp, mask=mask)
    assert fit.n_linear == 1 and np.all(fit.background == 0)
    # dof <= 0 is refused
    with pytest.raises(QcbedInputError, match="degrees of freedom"):
        Chi2().reduced(fit, n_free=fit.n_points - 1)
    assert Chi2().reduced(fit, n_free=fit.n_points - 2) == fit.value
    # XCorrelation: reduced is the value itself
    xf = XCorrelation().fit(sim, exp, mask=mask)
    assert XCorrelation().reduced(xf, 3) == xf.value and xf.n_points == n_common


# ----------------------------------------------------------------------------- 4. make_gof / user metrics
USER_METRIC = '''
import numpy as np
from stages.physics.gof import BaseGOF, weighted_fit


class MyMetric(BaseGOF):
    """Unweighted chi^2 (sigma = 1), one background."""
    name = "my_metric"

    def fit(self, sim, exp, variance=None, mask=None):
        sim, exp = np.asarray(sim, float), np.asarray(exp, float)
        used = np.isfinite(sim) & np.isfinite(exp)
        if mask is not None:
            used &= mask
        return weighted_fit(sim, exp, np.ones(sim.shape), used)


class NotAMetric:
    pass
'''


def test_user_metric_from_file(tmp_path):
    (tmp_path / "mymetric.py").write_text(USER_METRIC)
    metric = make_gof("mymetric.py:MyMetric", base_dir=tmp_path)
    assert isinstance(metric, BaseGOF) and metric.name == "my_metric"
    rng = np.random.default_rng(41)
    sim = rng.uniform(1.0, 10.0, (3, 40))
    exp = 4.0 * sim - 2.0 + rng.normal(0, 0.1, sim.shape)
    fit = metric.fit(sim, exp)
    c, b, chi2, _ = _lstsq(sim, exp, np.ones(sim.shape), np.ones(sim.shape, bool), False)
    assert fit.scale == pytest.approx(c, rel=1e-8) and fit.value == pytest.approx(chi2, rel=1e-8)
    assert metric.reduced(fit, 2) == pytest.approx(chi2 / (120 - 2 - 2), rel=1e-8)
    # absolute path and a module path work too
    assert type(make_gof(f"{tmp_path / 'mymetric.py'}:MyMetric")).__name__ == "MyMetric"
    assert type(make_gof("stages.physics.gof:Chi2LARBED")) is Chi2LARBED

    for spec, text in [("mymetric.py:NotAMetric", "not a subclass of BaseGOF"),
                       ("mymetric.py:Missing", "has no 'Missing'"),
                       ("nope.py:MyMetric", "not found"),
                       ("no_such_module_qcbed:MyMetric", "cannot import module"),
                       ("NoSuchMetric", "unknown metric"),
                       ("stages.physics.gof:Chi2Const", "without arguments")]:
        with pytest.raises(QcbedInputError, match=text) as e:
            make_gof(spec, base_dir=tmp_path)
        assert e.value.field == "refine.gof" and e.value.fix


SEED_METRIC = '''
import numpy as np
from stages.physics.gof import BaseGOF


class OneMinusR(BaseGOF):
    """A custom metric as the seed specifies it: __call__ takes the simulated and the experimental
    intensities and returns the GOF value (1 - Pearson r: its own normalisation)."""
    name = "one_minus_r"

    def __call__(self, sim, exp):
        return 1.0 - np.corrcoef(sim, exp)[0, 1]


class Neither(BaseGOF):
    pass


class NotANumber(BaseGOF):
    def __call__(self, sim, exp):
        return "small"
'''


def test_seed_style_metric_with_only_call(tmp_path):
    """A BaseGOF subclass with only __call__(sim, exp), named in the config, works: its fit value is the
    metric on the used points (mask and non-finite points honoured), scale/background the unweighted
    least squares (report only), no residuals, reduced = value, and its uncertainties marked undefined."""
    (tmp_path / "seed_metric.py").write_text(SEED_METRIC)
    metric = make_gof("seed_metric.py:OneMinusR", base_dir=tmp_path)
    assert isinstance(metric, BaseGOF) and metric.value_only
    assert metric.sigma_defined is False and "__call__" in metric.sigma_undefined_reason
    assert metric.residuals_defined is False
    sim, exp, _, mask = _random_data(np.random.default_rng(71))
    used = mask & np.isfinite(sim) & np.isfinite(exp)
    fit = metric.fit(sim, exp, mask=mask)
    assert fit.value == pytest.approx(1.0 - np.corrcoef(sim[used], exp[used])[0, 1], rel=1e-12)
    assert fit.n_points == int(used.sum()) and fit.n_linear == 0
    xc = XCorrelation().fit(sim, exp, mask=mask)  # the same 1 - r, and its unweighted least-squares c, b
    assert fit.value == pytest.approx(xc.value, rel=1e-9)
    assert fit.scale == pytest.approx(xc.scale, rel=1e-12) and fit.background == pytest.approx(xc.background, rel=1e-12)
    np.testing.assert_array_equal(np.isfinite(fit.model), used)
    assert not fit.residual.any()
    assert metric.reduced(fit, 3) == fit.value
    # the mask is honoured: garbage at masked points changes nothing
    bad = exp.copy()
    bad[~mask] = 1e9
    assert metric.fit(sim, bad, mask=mask).value == fit.value
    assert metric.fit(sim, bad).value != fit.value
    # built-in metrics keep their residuals, the chi^2 ones their standard errors (XCorrelation: 1 - r has no noise
    # scale, its errors are undefined too)
    for name in METRICS:
        m = make_gof(name, detector=YAG)
        assert m.residuals_defined and not m.value_only
        if name == "XCorrelation":
            assert not m.sigma_defined and "not a chi^2" in m.sigma_undefined_reason
        else:
            assert m.sigma_defined and m.sigma_undefined_reason == ""

    with pytest.raises(QcbedInputError, match="implements neither fit") as e:
        make_gof("seed_metric.py:Neither", base_dir=tmp_path)
    assert e.value.field == "refine.gof" and "__call__(sim, exp)" in e.value.fix
    with pytest.raises(QcbedInputError, match="must return one number") as e:
        make_gof("seed_metric.py:NotANumber", base_dir=tmp_path).fit(sim, exp)
    assert e.value.field == "refine.gof"


def test_builtin_names_and_detector():
    assert set(METRICS) == {"XCorrelation", "Chi2", "Chi2_const", "Chi2_multibackground",
                            "Chi2_LARBED", "Chi2_LARBED_multibackground", "Chi2_LARBED_perdisk"}
    for name, cls in METRICS.items():
        m = make_gof(name, detector=YAG)
        assert type(m) is cls and m.name == name
    assert make_gof("chi2_const", detector=YAG.to_mapping()).detector == YAG
    for name in ("Chi2_const", "Chi2_multibackground"):
        with pytest.raises(QcbedInputError) as e:
            make_gof(name)
        assert e.value.field == "pattern.detector"


# ----------------------------------------------------------------------------- 5. XCorrelation
def test_xcorrelation_linear_relation_and_mask():
    rng = np.random.default_rng(51)
    sim = rng.uniform(0.0, 100.0, (5, 200))
    exp = 3.0 * sim + 7.0
    mask = rng.random(sim.shape) < 0.7
    exp_bad = exp.copy()
    exp_bad[~mask] = rng.uniform(-1e6, 1e6, int((~mask).sum()))   # garbage where masked
    exp_bad.flat[np.flatnonzero(~mask)[::3]] = np.nan
    for e in (exp, exp_bad):
        fit = XCorrelation().fit(sim, e, mask=mask)
        assert abs(fit.value) < 1e-12
        assert fit.scale == pytest.approx(3.0, rel=1e-12)
        np.testing.assert_allclose(fit.background, 7.0, rtol=1e-11)
        assert fit.n_points == int(mask.sum())
    assert np.isnan(exp_bad).sum() > 50
    # without the mask the garbage counts (NaNs are still skipped)
    assert XCorrelation().fit(sim, exp_bad).value > 0.5


# ----------------------------------------------------------------------------- errors
def test_errors():
    rng = np.random.default_rng(61)
    sim = rng.uniform(1.0, 10.0, (2, 30))
    exp = 2.0 * sim
    for m in (Chi2LARBED(), Chi2LARBEDMultiBackground()):
        with pytest.raises(QcbedInputError) as e:
            m.fit(sim, exp)
        assert e.value.field == "variance"
        bad = np.ones(sim.shape)
        bad[1, 3] = 0.0
        with pytest.raises(QcbedInputError) as e:
            m.fit(sim, exp, variance=bad)
        assert e.value.field == "variance"
        mask = np.ones(sim.shape, bool)
        mask[1, 3] = False                           # non-positive variance only where masked: fine
        assert m.fit(sim, exp, variance=bad, mask=mask).value == pytest.approx(0.0, abs=1e-18)
    # constant simulation: scale undetermined
    for m in (Chi2(), XCorrelation(), Chi2LARBEDMultiBackground()):
        with pytest.raises(QcbedInputError) as e:
            m.fit(np.full(sim.shape, 5.0), exp, variance=np.ones(sim.shape))
        assert e.value.field == "sim"
    # per-disk: constant within each disk (but different between disks) is degenerate too
    step = np.repeat([[1.0], [2.0]], 30, axis=1)
    assert Chi2().fit(step, exp).n_linear == 2
    with pytest.raises(QcbedInputError, match="within every disk"):
        Chi2MultiBackground(YAG).fit(step, exp)
    with pytest.raises(QcbedInputError) as e:
        Chi2().fit(sim, exp, mask=np.zeros(sim.shape, bool))
    assert e.value.field == "mask"
    with pytest.raises(QcbedInputError) as e:
        Chi2().fit(sim, exp[:, :10])
    assert e.value.field == "exp"
    # zero detector variance at a used pixel with I <= 0
    no_bg = DetectorModel(gain=1.0, mixing=1.0, A=1.0, delta=0.0, background_variance=0.0)
    e2 = exp.copy()
    e2[0, 0] = 0.0
    with pytest.raises(QcbedInputError) as e:
        Chi2Const(no_bg).fit(sim, e2)
    assert e.value.field == "pattern.detector"
    with pytest.raises(QcbedInputError, match="n_free"):
        Chi2().reduced(Chi2().fit(sim, exp), -1)


def test_per_disk_scale_metric_recovers_each_disks_scale_and_background():
    """Chi2_LARBED_perdisk: independently scaled images c_d I + b_d are fitted exactly (chi^2 = 0), each
    disk's c_d and b_d recovered; with noise it equals the sum of separate one-disk fits."""
    from stages.physics.gof import METRICS, weighted_fit

    rng = np.random.default_rng(4)
    sim = rng.uniform(0.01, 0.2, (3, 50))
    c = np.array([2.0e5, 7.5e4, 3.1e5])
    b = np.array([120.0, -40.0, 900.0])
    exp = c[:, None] * sim + b[:, None]
    var = np.maximum(exp, 1.0)
    fit = METRICS["Chi2_LARBED_perdisk"]().fit(sim, exp, var)
    np.testing.assert_allclose(fit.scales, c, rtol=1e-10)
    np.testing.assert_allclose(fit.background, b, rtol=1e-8, atol=1e-6)
    assert fit.value < 1e-12 * exp.size and fit.n_linear == 6 and fit.scale == fit.scales[0]
    noisy = exp + rng.normal(0, np.sqrt(var))
    fit = METRICS["Chi2_LARBED_perdisk"]().fit(sim, noisy, var)
    one = [weighted_fit(sim[d:d + 1], noisy[d:d + 1], var[d:d + 1], np.ones((1, 50), bool)) for d in range(3)]
    np.testing.assert_allclose(fit.value, sum(f.value for f in one), rtol=1e-12)
    np.testing.assert_allclose(fit.scales, [f.scale for f in one], rtol=1e-12)
