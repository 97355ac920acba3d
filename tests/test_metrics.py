"""dmdiff.metrics: agreement with scikit-image, input forms, torch PSNR, sharpness proxy, LPIPS gating."""

import math
import socket

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dmdiff import metrics
from dmdiff.errors import DmdiffError
from dmdiff.metrics import MetricInputError

WANG = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _pair(seed, shape=(40, 52, 3), noise=0.05, dtype=np.float32):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    ref = 0.5 + 0.4 * np.sin(xx[..., None] / (3.0 + np.arange(3)) + yy[..., None] / 5.0)
    ref = np.clip(ref + 0.05 * rng.standard_normal(shape), 0, 1)
    out = np.clip(ref + noise * rng.standard_normal(shape), 0, 1)
    return out.astype(dtype), ref.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_matches_skimage(seed, dtype):
    out, ref = _pair(seed, dtype=dtype)
    assert abs(metrics.psnr(out, ref) - peak_signal_noise_ratio(ref, out, data_range=1.0)) < 1e-6
    # Y: skimage's rgb2ycbcr is the same BT.601 16-235 luma (on 0-255)
    y_out = rgb2ycbcr(out.astype(np.float64))[..., 0] / 255
    y_ref = rgb2ycbcr(ref.astype(np.float64))[..., 0] / 255
    assert abs(metrics.psnr(out, ref, on="y") - peak_signal_noise_ratio(y_ref, y_out, data_range=1.0)) < 1e-6
    # another data range
    assert abs(metrics.psnr(2 * out, 2 * ref, data_range=2.0)
               - peak_signal_noise_ratio(2 * ref, 2 * out, data_range=2.0)) < 1e-6


def test_rgb_to_y_definition():
    rgb = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    y = metrics.rgb_to_y(rgb)
    np.testing.assert_allclose(y, [16 / 255, 235 / 255, (16 + 65.481) / 255], atol=1e-12)
    t = torch.tensor(rgb, dtype=torch.float64).T.reshape(1, 3, 1, 3)
    np.testing.assert_allclose(metrics.rgb_to_y(t).numpy().ravel(), y, atol=1e-12)


@pytest.mark.parametrize("gaussian", [True, False])
def test_ssim_matches_skimage(gaussian):
    out, ref = _pair(2)
    kw = dict(WANG) if gaussian else {}
    expect = structural_similarity(out.astype(np.float64), ref.astype(np.float64), data_range=1.0,
                                   channel_axis=-1, **kw)
    assert abs(metrics.ssim(out, ref, gaussian=gaussian) - expect) < 1e-6
    # float32 inputs straight into skimage agree too
    expect32 = structural_similarity(out, ref, data_range=1.0, channel_axis=-1, **kw)
    assert abs(metrics.ssim(out, ref, gaussian=gaussian) - expect32) < 1e-6
    y_out = rgb2ycbcr(out.astype(np.float64))[..., 0] / 255
    y_ref = rgb2ycbcr(ref.astype(np.float64))[..., 0] / 255
    expect_y = structural_similarity(y_out, y_ref, data_range=1.0, **kw)
    assert abs(metrics.ssim(out, ref, on="y", gaussian=gaussian) - expect_y) < 1e-6
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)


def test_crop_border():
    out, ref = _pair(3)
    c = 4
    assert metrics.psnr(out, ref, crop_border=c) == pytest.approx(
        peak_signal_noise_ratio(ref[c:-c, c:-c], out[c:-c, c:-c], data_range=1.0), abs=1e-6)
    assert metrics.ssim(out, ref, crop_border=c) == pytest.approx(
        structural_similarity(out[c:-c, c:-c].astype(np.float64), ref[c:-c, c:-c].astype(np.float64),
                              data_range=1.0, channel_axis=-1, **WANG), abs=1e-6)
    with pytest.raises(MetricInputError, match="crop_border"):
        metrics.psnr(out, ref, crop_border=20)


def test_torch_and_batched_inputs():
    pairs = [_pair(s) for s in range(3)]
    outs = np.stack([p[0] for p in pairs])
    refs = np.stack([p[1] for p in pairs])
    single = np.array([metrics.psnr(o, r) for o, r in zip(outs, refs)])
    batch_np = metrics.psnr(outs, refs)
    assert isinstance(batch_np, np.ndarray) and batch_np.shape == (3,)
    np.testing.assert_allclose(batch_np, single, atol=1e-9)
    t_out = torch.from_numpy(outs).permute(0, 3, 1, 2)
    t_ref = torch.from_numpy(refs).permute(0, 3, 1, 2)
    np.testing.assert_allclose(metrics.psnr(t_out, t_ref), single, atol=1e-9)
    assert isinstance(metrics.psnr(t_out[0], t_ref[0]), float)
    assert metrics.psnr(t_out[0], t_ref[0]) == pytest.approx(single[0], abs=1e-9)
    ssim_single = [metrics.ssim(o, r, on="y") for o, r in zip(outs, refs)]
    np.testing.assert_allclose(metrics.ssim(t_out, t_ref, on="y"), ssim_single, atol=1e-12)


def test_psnr_torch_matches_and_is_differentiable():
    out, ref = _pair(4, dtype=np.float64)
    t_out = torch.from_numpy(out).permute(2, 0, 1)[None].clone().requires_grad_(True)
    t_ref = torch.from_numpy(ref).permute(2, 0, 1)[None]
    for on in ("rgb", "y"):
        value = metrics.psnr_torch(t_out, t_ref, on=on)
        assert value.shape == (1,)
        assert value.item() == pytest.approx(metrics.psnr(out, ref, on=on), abs=1e-9)
    metrics.psnr_torch(t_out, t_ref).sum().backward()
    assert t_out.grad is not None and torch.isfinite(t_out.grad).all() and t_out.grad.abs().sum() > 0
    f32 = metrics.psnr_torch(t_out.detach().float(), t_ref.float(), crop_border=2)
    assert f32.item() == pytest.approx(metrics.psnr(out, ref, crop_border=2), abs=1e-4)
    assert metrics.psnr_torch(t_ref[0], t_ref[0]).ndim == 0


def test_identical_images_give_inf_psnr():
    _, ref = _pair(5)
    assert metrics.psnr(ref, ref) == math.inf
    assert math.isinf(metrics.psnr_torch(torch.from_numpy(ref).permute(2, 0, 1)[None],
                                         torch.from_numpy(ref).permute(2, 0, 1)[None]).item())


def test_bad_inputs_raise_clear_errors():
    out, ref = _pair(6)
    bad = out.copy()
    bad[3, 4, 1] = np.nan
    with pytest.raises(MetricInputError, match="NaN"):
        metrics.psnr(bad, ref)
    with pytest.raises(MetricInputError, match="NaN"):
        metrics.ssim(out, bad)
    with pytest.raises(DmdiffError, match="shape"):
        metrics.psnr(out, ref[:-1])
    with pytest.raises(MetricInputError, match="dtype"):
        metrics.psnr((out * 255).astype(np.uint8), (ref * 255).astype(np.uint8))
    with pytest.raises(MetricInputError, match="on must be"):
        metrics.psnr(out, ref, on="ycbcr")
    with pytest.raises(MetricInputError, match=r"\(H, W, 3\)"):
        metrics.psnr(out[..., 0], ref[..., 0])
    with pytest.raises(MetricInputError, match="at least 11"):
        metrics.ssim(out[:8, :8], ref[:8, :8])
    with pytest.raises(MetricInputError):
        metrics.psnr_torch(out, ref)


def test_gradient_sharpness():
    import scipy.ndimage

    # a horizontal ramp of slope s (in luma per pixel) has mean gradient magnitude s
    s = 0.01
    ramp = np.repeat((0.1 + s * np.arange(48))[None, :, None], 32, axis=0).repeat(3, axis=2)
    assert metrics.mean_gradient_magnitude(ramp, crop_border=1) == pytest.approx(s, rel=1e-9)
    out, ref = _pair(7, noise=0.0)
    blurred = scipy.ndimage.gaussian_filter(ref, sigma=(2, 2, 0), mode="mirror")
    assert metrics.gradient_sharpness_ratio(ref, ref) == pytest.approx(1.0)
    assert metrics.gradient_sharpness_ratio(blurred, ref) < 0.8
    noisy = np.clip(ref + 0.1 * np.random.default_rng(0).standard_normal(ref.shape), 0, 1)
    assert metrics.gradient_sharpness_ratio(noisy, ref) > 1.2  # the documented caveat: noise raises it
    batch = metrics.gradient_sharpness_ratio(np.stack([ref, blurred]), np.stack([ref, ref]))
    assert batch.shape == (2,) and batch[0] == pytest.approx(1.0)


def test_compute_metrics_and_summarize():
    rows = []
    for seed in range(3):
        out, ref = _pair(seed)
        row = metrics.compute_metrics(out, ref, crop_border=2)
        assert set(row) == {"psnr", "psnr_y", "ssim", "ssim_y", "grad_ratio"}
        assert row["psnr"] == pytest.approx(metrics.psnr(out, ref, crop_border=2))
        rows.append({"name": f"img{seed}", **row})
    table = metrics.summarize(rows)
    assert "name" not in table
    values = [r["psnr"] for r in rows]
    assert table["psnr"] == {"mean": pytest.approx(np.mean(values)), "std": pytest.approx(np.std(values)), "n": 3}
    partial = metrics.summarize([{"a": 1.0, "flag": True}, {"a": 3.0, "b": 2}])
    assert partial == {"a": {"mean": 2.0, "std": 1.0, "n": 2}, "b": {"mean": 2.0, "std": 0.0, "n": 1}}


# ---- LPIPS ---------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly on any socket connection or torch-hub download."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network access was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir().startswith(str(tmp_path)), "torch.hub.set_dir() overrides $TORCH_HOME here"
    return tmp_path


@pytest.mark.parametrize("net, filename", [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_lpips_unavailable_without_backbone_weights(net, filename, empty_torch_home, no_network):
    available, reason = metrics.lpips_status(net)
    assert not available
    assert filename in reason and "https://download.pytorch.org/models/" in reason
    assert str(empty_torch_home / "hub" / "checkpoints") in reason
    with pytest.raises(DmdiffError, match="LPIPS is unavailable") as info:
        metrics.LPIPSMetric(net=net)
    assert filename in str(info.value)
    assert list(empty_torch_home.rglob("*")) == []  # nothing was downloaded or created
    with pytest.raises(MetricInputError):
        metrics.lpips_status("squeezenet")


def test_lpips_loading_wiring_with_a_fake_checkpoint(empty_torch_home, no_network):
    """The loading code path, with a *random* AlexNet trunk saved under the real file name.

    This checks only the wiring (file lookup, key mapping, weights_only loading, hash check); the
    distances it computes are not LPIPS and are not reported anywhere.
    """
    import torchvision

    folder = empty_torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    fake = {f"features.{k}": v for k, v in features.items()}
    torch.save(fake, folder / "alexnet-owt-7be5be79.pth")
    assert metrics.lpips_status("alex")[0]
    with pytest.raises(DmdiffError, match="SHA-256"):
        metrics.LPIPSMetric("alex")
    metric = metrics.LPIPSMetric("alex", check_hash=False)
    params = dict(metric.model.named_parameters())
    assert torch.equal(params["net.slice1.0.weight"], fake["features.0.weight"])
    assert torch.equal(params["net.slice5.10.bias"], fake["features.10.bias"])
    out, ref = _pair(8)
    assert metric(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert metric(np.stack([out, ref]), np.stack([ref, ref])).shape == (2,)
    assert set(metrics.compute_metrics(out, ref, lpips=metric)) >= {"lpips_alex"}
    # a checkpoint without the trunk's tensors is refused
    torch.save({"features.0.weight": fake["features.0.weight"]}, folder / "alexnet-owt-7be5be79.pth")
    with pytest.raises(DmdiffError, match="features.0.bias"):
        metrics.LPIPSMetric("alex", check_hash=False)


@pytest.mark.skipif(not metrics.lpips_status("alex")[0],
                    reason="LPIPS AlexNet trunk weights are not in torch's hub cache (no download here): "
                           + metrics.lpips_status("alex")[1])
def test_lpips_with_real_weights_matches_the_lpips_package(no_network):
    import lpips

    out, ref = _pair(9, shape=(64, 64, 3))
    metric = metrics.LPIPSMetric("alex")
    reference_model = lpips.LPIPS(net="alex", verbose=False)  # loads the same cached files
    t_out = torch.from_numpy(out).permute(2, 0, 1)[None]
    t_ref = torch.from_numpy(ref).permute(2, 0, 1)[None]
    with torch.no_grad():
        expect = reference_model(t_out, t_ref, normalize=True).item()
    assert metric(out, ref) == pytest.approx(expect, abs=1e-6)
    assert metric(ref, ref) == pytest.approx(0.0, abs=1e-7)
