"""The tunable-decoder panel (dmdiff.widgets) and the α-sweep helpers (dmdiff.evaluation.tradeoff), headless."""

import io
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import perturb_trainable  # noqa: E402
from PIL import Image

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.evaluation.tradeoff import (
    niqe_or_note,
    plot_psnr_along_alpha,
    psnr_along_alpha,
    redecode_timing,
    score_images,
)
from dmdiff.imageio import to_samples as to_uint8
from dmdiff.metrics import LPIPSMetric, lpips_status, psnr, ssim
from dmdiff.model.backbone import load_backbone
from dmdiff.model.dmdiff import ALPHA_RANGE, DMDiff, DMDiffConfig
from dmdiff.model.pipeline import DMDiffPipeline, ImageInputError
from dmdiff.perception import detail_ratio_set, niqe_set
from dmdiff.widgets import GAP_PX, build_panel

H, W = 24, 30


@pytest.fixture(scope="module")
def model():
    return perturb_trainable(DMDiff(DMDiffConfig(), load_backbone("tiny", pretrained=False)), scale=0.05)


def _photo(seed, h=H, w=W):
    # smooth random images, so the restored output differs from the capture in every region
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 6 + 2, w // 6 + 2, 3))
    rows = np.linspace(0, coarse.shape[0] - 1.001, h)
    cols = np.linspace(0, coarse.shape[1] - 1.001, w)
    return coarse[rows.astype(int)][:, cols.astype(int)].astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    maps = np.random.default_rng(5).random((7, 7, 7)).astype(np.float32)
    return _photo(1), _photo(2), maps


def _decoded(model, latents, alpha):
    return model.decode(latents, alpha)[0].permute(1, 2, 0).numpy()


@contextmanager
def counting(model):
    """Forward calls of the networks a restore runs, counted by hooks."""
    counts = dict.fromkeys(("svda", "vae encoder", "unet", "vae decoder"), 0)
    modules = {"svda": model.svda, "vae encoder": model.vae.encoder, "unet": model.unet, "vae decoder": model.vae.decoder}

    def hook(name):
        def count(*_):
            counts[name] += 1
        return count

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def test_alpha_change_runs_only_the_decoder(model, pair):
    capture, gt, maps = pair
    with counting(model) as built:
        panel = build_panel(model, capture, maps, gt, name="test scene")
    assert built["unet"] == 1 and built["vae encoder"] == 1 and built["svda"] == 1   # the one restore
    before = panel.restored.copy()
    with counting(model) as moved:
        panel.alpha.value = 0.3
    assert moved == {"svda": 0, "vae encoder": 0, "unet": 0, "vae decoder": 1}
    assert panel.restored.shape == (H, W, 3) and panel.restored.dtype == np.float32
    np.testing.assert_array_equal(panel.restored, _decoded(model, panel.latents, 0.3))
    restored_again = model.restore(torch.from_numpy(capture).permute(2, 0, 1)[None], torch.from_numpy(maps)[None],
                                   alpha=0.3)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(panel.restored, restored_again)
    assert np.abs(panel.restored - before).max() > 1e-4, "α made no difference; the model is not perturbed enough"
    # the side-by-side view holds the capture, the restored image and the GT, gaps between
    view = panel.view_array
    assert view.dtype == np.uint8 and view.shape == (H, 3 * W + 2 * GAP_PX, 3)
    np.testing.assert_array_equal(view[:, :W], to_uint8(capture))
    np.testing.assert_array_equal(view[:, W + GAP_PX:2 * W + GAP_PX], to_uint8(panel.restored))
    np.testing.assert_array_equal(view[:, 2 * (W + GAP_PX):], to_uint8(gt))
    assert (view[:, W:W + GAP_PX] == 255).all()
    shown = np.asarray(Image.open(io.BytesIO(panel.image.value)).convert("RGB"))
    np.testing.assert_array_equal(shown, view)
    assert "0.30" in panel.readout.value and "0.30" in panel.caption.value


def test_metrics_follow_alpha_against_gt(model, pair):
    capture, gt, maps = pair
    panel = build_panel(model, capture, maps, gt, alpha=0.0)
    for alpha in (0.0, 0.65, 1.2):
        panel.alpha.value = alpha
        assert panel.metrics == {"alpha": alpha, "psnr": psnr(panel.restored, gt), "ssim": ssim(panel.restored, gt)}
        assert f"{panel.metrics['psnr']:.2f} dB" in panel.readout.value
    assert panel.capture_metrics == {"psnr": psnr(capture, gt), "ssim": ssim(capture, gt)}
    assert panel.restore_s > 0 and panel.decode_s > 0


def test_without_ground_truth(model, pair):
    capture, _, maps = pair
    panel = build_panel(model, capture, maps)
    panel.alpha.value = 0.5
    assert panel.metrics == {"alpha": 0.5}
    assert "no ground truth" in panel.readout.value and panel.capture_metrics == {}
    assert panel.view_array.shape == (H, 2 * W + GAP_PX, 3)
    assert set(panel.previews) == {"capture", "neutral (α = 0)", "positive (α = 1)"}


def test_split_view_puts_the_capture_left_of_the_split(model, pair):
    capture, gt, maps = pair
    panel = build_panel(model, capture, maps, gt, alpha=0.8)
    with counting(model) as calls:
        panel.view.value = "split"
        panel.split.value = 0.25
    assert calls["vae decoder"] == 0, "changing the view must not decode"
    assert not panel.split.disabled
    column = round(0.25 * W)
    view, cap, out = panel.view_array, to_uint8(capture), to_uint8(panel.restored)
    assert view.shape == (H, W, 3)
    np.testing.assert_array_equal(view[:, :column], cap[:, :column])
    np.testing.assert_array_equal(view[:, column:], out[:, column:])
    assert (cap[:, column:] != out[:, column:]).any() and (cap[:, :column] != out[:, :column]).any()
    panel.split.value = 1.0
    np.testing.assert_array_equal(panel.view_array, cap)
    panel.view.value = "side by side"
    assert panel.split.disabled and panel.view_array.shape[1] == 3 * W + 2 * GAP_PX


def test_bad_alpha_is_refused(model, pair):
    capture, gt, maps = pair
    panel = build_panel(model, capture, maps, gt, alpha=0.4)
    assert (panel.alpha.min, panel.alpha.max) == ALPHA_RANGE and panel.alpha.step == 0.05
    panel.alpha.value = 5.0                      # the slider clamps to its bounds
    assert panel.alpha.value == ALPHA_RANGE[1] and panel.metrics["alpha"] == ALPHA_RANGE[1]
    np.testing.assert_array_equal(panel.restored, _decoded(model, panel.latents, ALPHA_RANGE[1]))
    with pytest.raises(ConfigError, match="alpha"):
        panel.set_alpha(1.5)
    with pytest.raises(ConfigError, match="alpha"):
        panel.alpha.value = math.nan
    assert panel.alpha.value == ALPHA_RANGE[1] and panel.metrics["alpha"] == ALPHA_RANGE[1]
    panel.set_alpha(0.1)
    assert panel.metrics["alpha"] == 0.1
    with pytest.raises(ConfigError, match="alpha"):
        build_panel(model, capture, maps, alpha=-0.1)


def test_path_previews_are_the_decodes_at_0_and_1(model, pair):
    capture, gt, maps = pair
    panel = build_panel(model, capture, maps, gt, alpha=0.5)
    np.testing.assert_array_equal(panel.neutral, _decoded(model, panel.latents, 0.0))
    np.testing.assert_array_equal(panel.positive, _decoded(model, panel.latents, 1.0))
    assert np.abs(panel.neutral - panel.positive).max() > 1e-4
    for label, image in (("capture", capture), ("neutral (α = 0)", panel.neutral),
                         ("positive (α = 1)", panel.positive), ("ground truth", gt)):
        shown = np.asarray(Image.open(io.BytesIO(panel.previews[label].value)).convert("RGB"))
        np.testing.assert_array_equal(shown, to_uint8(image))


def test_inputs_in_other_forms(model, pair):
    capture, gt, maps = pair
    u8 = to_uint8(capture)
    reference = build_panel(model, u8.astype(np.float32) / 255, maps, gt, alpha=0.7)
    pipeline = DMDiffPipeline.from_model(model)
    for form in (u8, torch.from_numpy(u8).permute(2, 0, 1)):
        panel = build_panel(pipeline, form, torch.from_numpy(maps), torch.from_numpy(gt).permute(2, 0, 1), alpha=0.7)
        np.testing.assert_array_equal(panel.restored, reference.restored)
        assert panel.metrics == reference.metrics
    with pytest.raises(DmdiffError, match="px"):
        build_panel(model, capture, maps, gt[:-2])
    with pytest.raises(ImageInputError):
        build_panel(model, capture[..., :2])
    with pytest.raises(DmdiffError, match="DMDiff"):
        build_panel(object(), capture)


def test_score_images_matches_the_direct_metrics():
    gts = [_photo(1, 96, 120), _photo(2, 100, 96)]
    images = [np.clip(g + np.random.default_rng(k).normal(0, 0.05, g.shape), 0, 1).astype(np.float32)
              for k, g in enumerate(gts)]
    row = score_images(images, gts)
    assert list(row) == ["psnr", "ssim", "niqe_set", "detail_ratio"]
    assert row["psnr"] == pytest.approx(np.mean([psnr(x, g) for x, g in zip(images, gts)]), rel=1e-12)
    assert row["ssim"] == pytest.approx(np.mean([ssim(x, g) for x, g in zip(images, gts)]), rel=1e-12)
    assert row["detail_ratio"] == detail_ratio_set(images, gts)
    assert row["niqe_set"] == niqe_set(images) and niqe_or_note(images) == (row["niqe_set"], None)

    class FakeLPIPS:            # LPIPSMetric's interface, for the mean and the key
        name = "lpips_alex"

        def __call__(self, output, reference):
            return float(np.abs(output - reference).mean())

    scored = score_images(images, gts, FakeLPIPS())
    assert scored["lpips_alex"] == pytest.approx(np.mean([np.abs(x - g).mean() for x, g in zip(images, gts)]))
    with pytest.raises(DmdiffError, match="2 images and 1 scenes"):
        score_images(images, gts[:1])
    with pytest.raises(DmdiffError, match="at least one"):
        score_images([], [])


def test_score_images_leaves_out_what_it_cannot_compute(pair):
    capture, gt, _ = pair                     # H × W = 24 × 30 px: under one 96-px NIQE patch
    row = score_images([capture], [gt])
    assert row["niqe_set"] is None and "lpips_alex" not in row
    value, note = niqe_or_note([capture])
    assert value is None and note.startswith("set-level NIQE not computed") and "96" in note
    if not lpips_status("alex")[0]:           # no real weights here: no metric to pass, so no LPIPS key
        with pytest.raises(DmdiffError, match="LPIPS is unavailable"):
            LPIPSMetric("alex")


def test_redecode_is_cheaper_than_a_restore(model, pair):
    capture, _, maps = pair
    timing = redecode_timing(model, capture, maps, repeats=3)
    assert timing["size"] == [H, W] and timing["repeats"] == 3
    assert 0 < timing["decode_s"] < timing["restore_s"]
    assert timing["ratio"] == pytest.approx(timing["decode_s"] / timing["restore_s"])
    with pytest.raises(ConfigError, match="repeats"):
        redecode_timing(model, capture, repeats=0)


def test_psnr_along_alpha_scores_each_re_decode(model, pair):
    capture, gt, _ = pair
    lr = torch.from_numpy(np.stack([capture, _photo(3)])).permute(0, 3, 1, 2)
    refs = {"gt": torch.from_numpy(np.stack([gt, _photo(4)])).permute(0, 3, 1, 2), "gt_blur": lr}
    _, latents = model.restore(lr, None, alpha=1.0, return_latents=True)
    alphas = np.array([0.0, 0.6, 1.2])
    with counting(model) as calls:
        sweep = psnr_along_alpha(model, latents, refs, alphas)
    assert calls["vae decoder"] == len(alphas) and calls["unet"] == calls["vae encoder"] == 0
    assert list(sweep) == [0.0, 0.6, 1.2] and all(type(a) is float for a in sweep)
    for alpha, scores in sweep.items():
        y = model.decode(latents, alpha)
        assert scores == {"gt": float(psnr(y, refs["gt"]).mean()), "gt_blur": float(psnr(y, lr).mean())}
    assert sweep[0.0] != sweep[1.2]
    assert psnr_along_alpha(DMDiffPipeline.from_model(model), latents, refs, [0.6]) == {0.6: sweep[0.6]}
    with pytest.raises(ConfigError, match="alpha"):
        psnr_along_alpha(model, latents, refs, [1.3])

    fig = plot_psnr_along_alpha(sweep, {"gt": 20.0, "gt_blur": 25.0}, title="t")
    ax = fig.axes[0]
    curve_gt, capture_gt, curve_blur, capture_blur = ax.get_lines()
    assert list(curve_gt.get_ydata()) == [s["gt"] for s in sweep.values()]
    assert list(curve_blur.get_ydata()) == [s["gt_blur"] for s in sweep.values()]
    assert list(capture_gt.get_ydata()) == [20.0, 20.0] and list(capture_blur.get_ydata()) == [25.0, 25.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["against gt", "against gt_blur"]
    with pytest.raises(ConfigError, match="references"):
        plot_psnr_along_alpha({}, {})
    with pytest.raises(ConfigError, match="references"):
        plot_psnr_along_alpha({0.0: {"a": 1.0, "b": 2.0, "c": 3.0}}, {"a": 0, "b": 0, "c": 0})
