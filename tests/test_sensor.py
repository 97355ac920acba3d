"""Sensor model: sRGB curve, Brooks et al. noise levels and variance, quantisation, ISP, pseudo noise."""

import math

import numpy as np
import pytest
import torch

from dmdiff.optics.sensor import (
    add_sensor_noise,
    isp,
    linear_to_srgb,
    noise_std,
    pseudo_noise_augment,
    quantize,
    sample_noise_levels,
    smooth_noise_field,
    srgb_to_linear,
    white_balance,
)


def test_srgb_curve_known_values_and_round_trip():
    x = np.linspace(0, 1, 10001, dtype=np.float64)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-12)
    np.testing.assert_allclose(srgb_to_linear(linear_to_srgb(x)), x, atol=1e-12)
    assert srgb_to_linear(np.array(0.5)) == pytest.approx(0.214041, abs=1e-6)
    assert linear_to_srgb(np.array(0.18)) == pytest.approx(0.461356, abs=1e-6)
    assert srgb_to_linear(np.array(0.04045)) == pytest.approx(0.04045 / 12.92)
    # continuous at the knee, monotone, float32 kept
    assert np.all(np.diff(srgb_to_linear(x)) >= 0)
    assert srgb_to_linear(x.astype(np.float32)).dtype == np.float32
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    np.testing.assert_allclose(srgb_to_linear(t).numpy(), srgb_to_linear(t.numpy()), atol=1e-12)
    np.testing.assert_allclose(linear_to_srgb(t).numpy(), linear_to_srgb(t.numpy()), atol=1e-12)


@pytest.mark.parametrize("signal", [0.02, 0.25, 0.8])
@pytest.mark.parametrize("shot, read", [(1e-2, 1e-4), (1e-3, 2e-6)])
def test_noise_variance_matches_model(signal, shot, read):
    rng = np.random.default_rng(7)
    x = np.full(1_000_000, signal, dtype=np.float64)
    y = add_sensor_noise(x, shot, read, rng)
    expected = shot * signal + read
    assert np.var(y) == pytest.approx(expected, rel=0.05)
    assert abs(np.mean(y) - signal) < 5 * math.sqrt(expected / x.size)  # unbiased
    assert noise_std(signal, shot, read) == pytest.approx(math.sqrt(expected))


def test_noise_depends_on_signal_and_is_reproducible():
    x = np.concatenate([np.full(200_000, 0.05), np.full(200_000, 0.9)]).astype(np.float32)
    y = add_sensor_noise(x, 1e-2, 1e-5, np.random.default_rng(0))
    assert y.dtype == np.float32
    assert np.std(y[200_000:]) > 3 * np.std(y[:200_000])  # shot noise grows with the signal
    np.testing.assert_array_equal(y, add_sensor_noise(x, 1e-2, 1e-5, np.random.default_rng(0)))
    with pytest.raises(ValueError):
        add_sensor_noise(x, -1.0, 0.0, np.random.default_rng(0))


def test_noise_levels_follow_brooks():
    rng = np.random.default_rng(0)
    levels = np.array([sample_noise_levels(rng) for _ in range(4000)])
    log_shot, log_read = np.log(levels[:, 0]), np.log(levels[:, 1])
    assert log_shot.min() >= math.log(1e-4) and log_shot.max() <= math.log(1.2e-2)
    # uniform in log: the mean is the midpoint
    assert log_shot.mean() == pytest.approx((math.log(1e-4) + math.log(1.2e-2)) / 2, abs=0.06)
    slope, intercept = np.polyfit(log_shot, log_read, 1)
    assert slope == pytest.approx(2.18, abs=0.03)
    assert intercept == pytest.approx(1.20, abs=0.2)
    residual = log_read - (2.18 * log_shot + 1.20)
    assert residual.std() == pytest.approx(0.26, rel=0.06)
    a, b = sample_noise_levels(np.random.default_rng(5)), sample_noise_levels(np.random.default_rng(5))
    assert a == b


def test_quantize_levels_and_clipping():
    x = np.linspace(-0.2, 1.2, 5001)
    q = quantize(x, 3)
    assert q.dtype == np.float32
    levels = np.unique(q)
    np.testing.assert_allclose(levels, np.arange(8) / 7, atol=1e-7)
    assert q.min() == 0 and q.max() == 1
    np.testing.assert_allclose(quantize(x, 10)[(x >= 0) & (x <= 1)], x[(x >= 0) & (x <= 1)], atol=0.5 / 1023 + 1e-7)
    assert len(np.unique(quantize(np.linspace(0, 1, 100_000), 8))) == 256
    with pytest.raises(ValueError):
        quantize(x, 0)


def test_white_balance_and_isp():
    raw = np.full((4, 4, 3), 0.4, np.float32)
    wb = white_balance(raw, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(wb[0, 0], [0.4, 0.8, 1.0])  # clipped at 1
    out = isp(raw, (1.0, 1.0, 1.0), bits=8)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx(round(float(linear_to_srgb(np.array(0.4))) * 255) / 255, abs=1e-6)
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)


def _radial_power(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Power spectrum of a 2-D field and each frequency's radius in cycles per pixel."""
    power = np.abs(np.fft.fft2(field - field.mean())) ** 2
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.fftfreq(field.shape[1])[None, :]
    return power, np.hypot(fy, fx)


def test_smooth_noise_field_is_low_frequency():
    f = smooth_noise_field((256, 256), 16.0, np.random.default_rng(0), channels=2)
    assert f.shape == (256, 256, 2)
    assert f[..., 0].std() == pytest.approx(1.0, abs=1e-4)
    power, radius = _radial_power(f[..., 0].astype(np.float64))
    # almost all power below 1/scale cycles per pixel; white noise would put < 1 % there
    assert power[radius < 1 / 16].sum() / power.sum() > 0.9
    assert np.abs(f[..., 0] - f[..., 1]).mean() > 0.5  # channels independent


def test_pseudo_noise_stronger_in_dark_and_low_frequency():
    rng = np.random.default_rng(0)
    img = np.concatenate([np.full((128, 256, 3), 0.12, np.float32), np.full((128, 256, 3), 0.88, np.float32)])
    out = pseudo_noise_augment(img, rng, strength=1.0, quantize_bits=None)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    resid = out - img
    dark, bright = resid[8:120].std(), resid[136:248].std()
    assert dark > 1.5 * bright
    no_shot = pseudo_noise_augment(img, np.random.default_rng(0), shot_range=(1e-9, 1e-9), quantize_bits=None) - img
    assert no_shot[8:120].std() > 5 * no_shot[136:248].std()  # the blotches live in the shadows
    # the blotchy part: with (almost) no shot noise, what remains is smooth
    flat = np.full((256, 256, 3), 0.2, np.float32)
    blotch = pseudo_noise_augment(flat, np.random.default_rng(1), shot_range=(1e-9, 1e-9),
                                  quantize_bits=None) - flat
    power, radius = _radial_power(blotch[..., 1].astype(np.float64))
    assert power[radius < 1 / 8].sum() / power.sum() > 0.9
    assert blotch.std() > 0.005
    # with shot noise on, the spectrum still leans strongly to low frequencies (per frequency bin)
    full = pseudo_noise_augment(flat, np.random.default_rng(2), quantize_bits=None) - flat
    power, radius = _radial_power(full[..., 1].astype(np.float64))
    assert power[(radius > 0) & (radius < 1 / 16)].mean() > 5 * power[radius > 1 / 4].mean()


def test_pseudo_noise_strength_and_determinism():
    img = np.random.default_rng(3).random((64, 64, 3)).astype(np.float32)
    a = pseudo_noise_augment(img, np.random.default_rng(9))
    np.testing.assert_array_equal(a, pseudo_noise_augment(img, np.random.default_rng(9)))
    np.testing.assert_allclose(pseudo_noise_augment(img, np.random.default_rng(9), strength=0), quantize(img, 8))
    weak = np.abs(pseudo_noise_augment(img, np.random.default_rng(9), strength=0.3, quantize_bits=None) - img).mean()
    strong = np.abs(pseudo_noise_augment(img, np.random.default_rng(9), strength=2.0, quantize_bits=None) - img).mean()
    assert strong > 3 * weak
    with pytest.raises(ValueError):
        pseudo_noise_augment(img[..., 0], np.random.default_rng(0))
