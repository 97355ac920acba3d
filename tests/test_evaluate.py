"""`dmdiff evaluate`: the held-out report end to end on a smoke dataset and a tiny untrained model."""

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

sys.path.insert(0, str(Path(__file__).parent))
from conftest import perturb_trainable  # noqa: E402

from dmdiff.cli import main as cli_main  # noqa: E402
from dmdiff.data.dataset import PairedFolderDataset, read_lens  # noqa: E402
from dmdiff.data.simulate import simulate_dataset  # noqa: E402
from dmdiff.errors import DmdiffError  # noqa: E402
from dmdiff.evaluation.baselines import (  # noqa: E402
    richardson_lucy,
    richardson_lucy_sv,
    varying_blur,
    wiener_deconvolve,
)
from dmdiff.evaluation.field import GAIN_FILE, field_angle_map, zone_gains, zone_masks  # noqa: E402
from dmdiff.evaluation.job import evaluate  # noqa: E402
from dmdiff.evaluation.map_response import CAPTURE, WITH_MAPS, field_scores  # noqa: E402
from dmdiff.evaluation.methods import DEGRADE, METHODS, Context, Sample, methods_for  # noqa: E402
from dmdiff.evaluation.trivial import untrained_pipeline  # noqa: E402
from dmdiff.evaluation.report import (  # noqa: E402
    NIQE_COLUMN,
    OFF_GAIN_AXIS,
    TABLE_FILE,
    SetPerception,
    detail_column,
    format_table,
    plot_spread,
    quality_bar,
    quality_bar_lines,
)
from dmdiff.imageio import read_image  # noqa: E402
from dmdiff.metrics import compute_metrics, lpips_status, psnr  # noqa: E402
from dmdiff.model.backbone import Backbone, load_backbone  # noqa: E402
from dmdiff.model.color import (  # noqa: E402
    DEFAULT_COLOR_CORRECTION,
    color_correct,
    resolve_color_correction,
)
from dmdiff.model.dmdiff import DECODED_PATHS, DMDiff, DMDiffConfig  # noqa: E402
from dmdiff.model.ensemble import orient, self_ensemble  # noqa: E402
from dmdiff.model.pipeline import DMDiffPipeline  # noqa: E402
from dmdiff.optics.deconvolution import central_psf  # noqa: E402
from dmdiff.perception import DETAIL_BAND, detail_ratio_set, niqe_set  # noqa: E402
from dmdiff.optics.grid import psf_grid  # noqa: E402
from dmdiff.optics.sensor import quantize  # noqa: E402
from dmdiff.optics.spec import MetalensSpec  # noqa: E402
from dmdiff.outputs import MANIFEST  # noqa: E402
from dmdiff.runs import resolve_model  # noqa: E402
from dmdiff.study import held_out_pairs, model_or_fresh  # noqa: E402


def quantize8(image):
    """8-bit levels, as evaluate stores and measures outputs."""
    return quantize(image, 8)


GRIDS = {"wiener": [0.01, 0.1, 1.0], "richardson_lucy": [1, 2]}   # RL's best at the top edge: widened
RECOMMENDED_ALPHA = 0.6                                              # the test model's recommended α


@pytest.fixture(scope="module")
def dataset(psf_cache, tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("eval") / "data", smoke=True, cache_dir=psf_cache, progress=False)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny untrained model with perturbed adapters (so LoRA, the paths and M = 0 all matter)."""
    model = perturb_trainable(DMDiff(DMDiffConfig(svda_dim=32, recommended_alpha=RECOMMENDED_ALPHA)), seed=5)
    return DMDiffPipeline.from_model(model).save_pretrained(tmp_path_factory.mktemp("model") / "pipe")


@pytest.fixture(scope="module")
def report(dataset, pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "eval"
    metrics = evaluate(pipeline_dir, dataset, out, stage1=pipeline_dir, limit=2, tune_pairs=3, grids=GRIDS,
                       device="cpu", progress=False)
    return out, metrics


def _png(path: Path) -> np.ndarray:
    """An 8-bit PNG read directly with PIL, as float64 in [0, 1]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def test_files_and_layout(report, dataset):
    out, metrics = report
    assert {p.name for p in out.iterdir()} == {"metrics.json", "metrics.csv", "table.md", "grid.png", "gain_map.png",
                                               "images", MANIFEST}
    names = sorted(p.stem for p in (dataset / "gt_test").iterdir())[:2]
    assert metrics["names"] == names and metrics["count"] == 2 and metrics["split"] == "test"
    assert metrics["methods"] == [*(m for m in METHODS if m != "color_anchor"), DEGRADE]   # no anchor: no anchor row
    for method in metrics["methods"][1:]:
        assert sorted(p.stem for p in (out / "images" / method).iterdir()) == names
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["means"] == metrics["means"] and saved["quality_bar"] == metrics["quality_bar"]
    assert saved["provenance"]["versions"]["torch"] and saved["settings"]["full_frames"] is True
    assert all(r["maps"] for r in saved["per_image"])          # the smoke dataset has maps
    with Image.open(out / "grid.png") as im:
        assert im.width > 6 * 100 and im.height > 2 * 100


def test_input_psnr_recomputed_from_the_pngs(report, dataset):
    """Straight from the 8-bit files in float64 (the report reads float32 k/255: ~1e-7 dB apart)."""
    _, metrics = report
    for record in metrics["per_image"]:
        gt = _png(dataset / "gt_test" / f"{record['name']}.png")
        lr = _png(dataset / "lr_test" / f"{record['name']}.png")
        assert record["methods"]["input"]["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, lr, data_range=1),
                                                                   abs=1e-5)
        assert record["methods"]["input"]["psnr_y"] == pytest.approx(psnr(lr, gt, on="y"), abs=1e-5)


def test_every_number_recomputes_from_the_saved_images(report, dataset):
    out, metrics = report
    for record in metrics["per_image"]:
        name = record["name"]
        gt, lr = (read_image(dataset / f"{k}_test" / f"{name}.png") for k in ("gt", "lr"))
        for method, values in record["methods"].items():
            image = lr if method == "input" else read_image(out / "images" / method / f"{name}.png")
            reference = lr if method == DEGRADE else gt
            again = compute_metrics(image, reference)
            for key, value in again.items():
                assert values[key] == pytest.approx(value, abs=1e-9), (name, method, key)
            if method != "input":
                assert values["runtime_s"] > 0
        assert record["methods"]["dmdiff_a0"]["redecode_s"] > 0
        assert record["methods"]["dmdiff_arec"]["redecode_s"] > 0


def test_means_csv_and_table_agree(report):
    out, metrics = report
    for method in metrics["methods"]:
        for key in ("psnr", "psnr_y", "ssim", "ssim_y"):
            per_image = [r["methods"][method][key] for r in metrics["per_image"]]
            assert metrics["means"][method][key] == pytest.approx(np.mean(per_image), abs=1e-12)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 * len(metrics["methods"])
    for row in rows:
        record = next(r for r in metrics["per_image"] if r["name"] == row["name"])
        assert float(row["psnr"]) == record["methods"][row["method"]]["psnr"]
        assert row["reference"] == ("lr" if row["method"] == DEGRADE else "gt")
    table = (out / "table.md").read_text()
    assert table.startswith(format_table(metrics))   # then the per-zone and paired-difference sections
    assert "| method | vs | PSNR (dB) | PSNR-Y (dB) | SSIM | SSIM-Y | LPIPS | runtime (s/img) |" in table
    line = next(x for x in table.splitlines() if x.startswith("| DMDiff α=1"))
    assert f"| {metrics['means']['dmdiff_a1']['psnr']:.2f} |" in line
    assert "Quality bar" in table and "stage-1 degrade(GT)" in table
    if not lpips_status("alex")[0]:
        assert "unavailable" in table and lpips_status("alex")[1] in table
        assert metrics["lpips"] == {"available": False, "reason": lpips_status("alex")[1], "net": None}


def test_dmdiff_outputs_are_the_models(report, dataset, pipeline_dir):
    out, metrics = report
    model = DMDiffPipeline.from_pretrained(pipeline_dir).model
    test = PairedFolderDataset(dataset, "test")
    item = test[0]
    lr, maps = item["lr"][None], item["maps"][None]
    for alpha, method in ((1.0, "dmdiff_a1"), (0.0, "dmdiff_a0"), (RECOMMENDED_ALPHA, "dmdiff_arec")):
        expected = quantize8(model.restore(lr, maps, alpha=alpha)[0].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(read_image(out / "images" / method / f"{item['name']}.png"), expected)
    fake = quantize8(model.degrade(item["gt"][None], maps)[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(read_image(out / "images" / DEGRADE / f"{item['name']}.png"), fake)
    a0, a1 = (metrics["means"][m]["psnr"] for m in ("dmdiff_a0", "dmdiff_a1"))
    assert a0 != a1                                   # the two paths really differ


def test_color_corrected_row_is_restores_default(report, dataset, pipeline_dir):
    """dmdiff_a1_cc = dmdiff restore's default colour correction of the positive path."""
    out, metrics = report
    model = DMDiffPipeline.from_pretrained(pipeline_dir).model
    item = PairedFolderDataset(dataset, "test")[0]
    name = item["name"]
    restored = model.restore(item["lr"][None], item["maps"][None], alpha=1.0)[0].permute(1, 2, 0).numpy()
    capture = item["lr"].permute(1, 2, 0).numpy()
    correction = resolve_color_correction(DEFAULT_COLOR_CORRECTION, model)
    assert correction == "lowpass"                              # the test model has no colour anchor
    expected = quantize8(color_correct(restored, capture, correction))
    saved = read_image(out / "images" / "dmdiff_a1_cc" / f"{name}.png")
    positive = read_image(out / "images" / "dmdiff_a1" / f"{name}.png")
    np.testing.assert_array_equal(saved, expected)
    assert np.abs(saved - positive).max() > 1 / 255             # the correction changed something
    assert metrics["settings"]["color_correction"]["dmdiff_a1_cc"]["method"] == correction
    bar = metrics["quality_bar_color_corrected"]
    assert bar["positive_psnr"] == metrics["means"]["dmdiff_a1_cc"]["psnr"] != metrics["quality_bar"]["positive_psnr"]
    table = (out / "table.md").read_text()
    assert f"With dmdiff restore's colour correction (not the bar's figure): {bar['positive_psnr']:.2f} dB" in table


def test_self_ensemble_row_averages_the_eight_orientations(report, dataset, pipeline_dir):
    out, metrics = report
    model = DMDiffPipeline.from_pretrained(pipeline_dir).model
    item = PairedFolderDataset(dataset, "test")[0]
    expected = self_ensemble(lambda x, m: model.restore(x, m, alpha=1.0), item["lr"][None], item["maps"][None])
    saved = read_image(out / "images" / "dmdiff_a1_x8" / f"{item['name']}.png")
    np.testing.assert_array_equal(saved, quantize8(expected[0].permute(1, 2, 0).numpy()))
    assert np.abs(saved - read_image(out / "images" / "dmdiff_a1" / f"{item['name']}.png")).max() > 1 / 255
    bar = metrics["quality_bar_self_ensemble"]
    assert bar["positive_psnr"] == metrics["means"]["dmdiff_a1_x8"]["psnr"]
    table = (out / "table.md").read_text()
    assert f"With the ×8 self-ensemble (`dmdiff restore --self-ensemble`) (not the bar's figure): " \
           f"{bar['positive_psnr']:.2f} dB" in table


def test_ceiling_is_the_frozen_base_vae(dataset, pipeline_dir):
    model = DMDiffPipeline.from_pretrained(pipeline_dir).model
    gt = PairedFolderDataset(dataset, "test")[0]["gt"][None, :, 3:, 5:]      # 61 × 59: padding is used
    ours = model.reconstruct(gt)
    assert ours.shape == gt.shape
    base = load_backbone("tiny", path=pipeline_dir / "backbone")
    m = model.backbone.latent_multiple
    with torch.no_grad():
        ph, pw = -gt.shape[-2] % m, -gt.shape[-1] % m
        padded = torch.nn.functional.pad(gt, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
        z = base.vae.encode(padded * 2 - 1).latent_dist.mode()
        y = ((base.vae.decode(z).sample + 1) / 2)[..., ph // 2:ph // 2 + gt.shape[-2], pw // 2:pw // 2 + gt.shape[-1]]
    torch.testing.assert_close(ours, y.clamp(0, 1), atol=2e-5, rtol=0)
    with torch.no_grad():   # the adapted encoder (plain LoRA, M = I) gives something else
        lora_z = model.vae.encode(padded * 2 - 1).latent_dist.mode()
    assert (lora_z - z).abs().max() > 1e-3


def test_baselines_use_the_true_psf_and_train_tuning(report, dataset):
    out, metrics = report
    base = metrics["baselines"]
    train_names = set(PairedFolderDataset(dataset, "train").names)
    assert len(base["train_names"]) == 3 and set(base["train_names"]) <= train_names
    assert not set(base["train_names"]) & set(metrics["names"])
    assert base["spec"] == read_lens(dataset)["spec"]
    assert base["params"] == {"wiener": base["wiener"]["nsr"], "richardson_lucy": base["richardson_lucy"]["iterations"],
                              "richardson_lucy_sv": base["richardson_lucy_sv"]["iterations"]}
    rl = base["richardson_lucy"]
    assert rl["widened_with"] == [4] and rl["grid"] == [1, 2, 4]
    assert rl["at_grid_edge"] == (rl["iterations"] in (1, 4))
    assert [row["iterations"] for row in rl["table"]] == [1, 2, 4]
    assert rl["iterations"] == max(rl["table"], key=lambda row: row["psnr"])["iterations"]
    assert base["wiener"]["grid"][:3] == GRIDS["wiener"] or base["wiener"]["widened_with"]
    psf = central_psf(psf_grid(MetalensSpec.from_dict(base["spec"]), progress=False))
    name = metrics["names"][0]
    lr = read_image(dataset / "lr_test" / f"{name}.png")
    np.testing.assert_array_equal(read_image(out / "images" / "wiener" / f"{name}.png"),
                                  quantize8(wiener_deconvolve(lr, psf, base["wiener"]["nsr"])))
    np.testing.assert_array_equal(read_image(out / "images" / "richardson_lucy" / f"{name}.png"),
                                  quantize8(richardson_lucy(lr, psf, rl["iterations"])))


def test_varying_rl_uses_the_psf_grid_tuned_on_val(report, dataset):
    """The spatially varying RL row: tuned on the val split only, its PNGs recomputed exactly."""
    out, metrics = report
    sv = metrics["baselines"]["richardson_lucy_sv"]
    assert sv["split"] == "val" and set(sv["names"]) <= set(PairedFolderDataset(dataset, "val").names)
    assert sv["iterations"] == max(sv["table"], key=lambda row: row["psnr"])["iterations"]
    blur = varying_blur(psf_grid(MetalensSpec.from_dict(read_lens(dataset)["spec"]), progress=False).psfs)
    name = metrics["names"][0]
    lr = read_image(dataset / "lr_test" / f"{name}.png")
    np.testing.assert_array_equal(read_image(out / "images" / "richardson_lucy_sv" / f"{name}.png"),
                                  quantize8(richardson_lucy_sv(lr, blur, sv["iterations"])))


def test_zone_scores_recompute_from_the_pngs_and_differences_are_paired(report, dataset):
    """Zone PSNR = PSNR of the zone's pixels of the saved PNG; the edge zone is the outer field; the
    paired-difference table of metrics.json matches the per-image numbers."""
    out, metrics = report
    field = metrics["field"]
    assert field["zones_by"] == "field angle" and sum(field["pixel_fractions"].values()) == pytest.approx(1)
    spec = MetalensSpec.from_dict(read_lens(dataset)["spec"])
    name = metrics["names"][0]
    gt = read_image(dataset / "gt_test" / f"{name}.png")
    image = read_image(out / "images" / "richardson_lucy_sv" / f"{name}.png")
    masks = zone_masks(field_angle_map(*gt.shape[:2], spec))
    assert masks["centre"][gt.shape[0] // 2, gt.shape[1] // 2] and masks["edge"][0, 0]
    for zone, mask in masks.items():
        mse = np.mean((image[mask].astype(np.float64) - gt[mask]) ** 2)
        assert field["per_image"][name]["richardson_lucy_sv"][zone]["psnr"] == pytest.approx(-10 * np.log10(mse))
    row = next(r for r in metrics["differences"] if r["method"] == "input" and r["zone"] is None)
    diffs = {r["name"]: r["methods"]["input"]["psnr"] - r["methods"]["dmdiff_a1"]["psnr"] for r in metrics["per_image"]}
    assert row["mean"] == pytest.approx(np.mean(list(diffs.values())))   # one frame per photo here
    assert set(row["per_group"]) == {metrics["sources"][n] for n in metrics["names"]}
    table = (out / TABLE_FILE).read_text()
    assert "## PSNR / SSIM per field zone" in table and "95 % CI (photos)" in table
    assert metrics["quality_bar"]["best_baseline"] in ("wiener", "richardson_lucy")   # the bar keeps its baselines


def test_trivial_rows_anchor_alone_and_untrained_adapters(dataset, pipeline_dir):
    """The colour anchor row is the model's own G_σ(RL_n(x)); the untrained row is the same config
    with fresh adapters: the backbone's one step, not the trained model's output."""
    psf = central_psf(psf_grid(MetalensSpec.from_dict(read_lens(dataset)["spec"]), progress=False))
    model = perturb_trainable(DMDiff(DMDiffConfig(svda_dim=32, anchor_sigma_px=4.0, anchor_rl_iterations=3)), seed=2)
    model.set_anchor_psf(psf)
    pipeline = DMDiffPipeline.from_model(model)
    context = Context(pipeline, untrained=untrained_pipeline(model))
    rows = {m.name: m for m in methods_for(context)}
    sample = Sample.of(PairedFolderDataset(dataset, "test")[0])
    anchor, _, _ = rows["color_anchor"].run(context, sample)
    with torch.no_grad():
        np.testing.assert_allclose(anchor, model.input_anchor(sample.lr)[0].permute(1, 2, 0).numpy(), atol=1e-6)
    untrained, _, _ = rows["untrained"].run(context, sample)
    fresh = DMDiff(DMDiffConfig(svda_dim=32, anchor_sigma_px=4.0, anchor_rl_iterations=3))
    fresh.set_anchor_psf(psf)
    expected = DMDiffPipeline.from_model(fresh)(sample.lr, sample.maps, 1.0).images[0]
    np.testing.assert_allclose(untrained, expected, atol=1e-5)
    trained = pipeline(sample.lr, sample.maps, 1.0).images[0]
    assert np.abs(trained - untrained).max() > 1e-3


def _means(**psnrs):
    return {"means": {k: {"psnr": v} for k, v in psnrs.items()}}


def test_quality_bar_pass_and_fail():
    ok = quality_bar(_means(input=20.0, wiener=21.5, richardson_lucy=22.0, dmdiff_a1=23.5))
    assert ok["pass"] is True and ok["best_baseline"] == "richardson_lucy"
    assert ok["over_input"] == {"gain_db": 3.5, "required_db": 3.0, "margin_db": 0.5, "pass": True}
    assert ok["over_baselines"]["gain_db"] == pytest.approx(1.5) and ok["over_baselines"]["margin_db"] == pytest.approx(0.5)
    exact = quality_bar(_means(input=20.0, wiener=22.0, richardson_lucy=21.0, dmdiff_a1=23.0))
    assert exact["pass"] is True and exact["best_baseline"] == "wiener"     # ≥, not >
    low = quality_bar(_means(input=20.0, wiener=21.0, richardson_lucy=21.0, dmdiff_a1=22.9))
    assert low["over_input"]["pass"] is False and low["over_input"]["margin_db"] == pytest.approx(-0.1)
    assert low["over_baselines"]["pass"] is True and low["pass"] is False
    close = quality_bar(_means(input=18.0, wiener=22.5, richardson_lucy=22.0, dmdiff_a1=23.0))
    assert close["over_input"]["pass"] is True and close["over_baselines"]["pass"] is False
    assert close["over_baselines"]["margin_db"] == pytest.approx(-0.5) and close["pass"] is False
    none = quality_bar(_means(input=18.0, dmdiff_a1=30.0))
    assert none["over_input"]["pass"] is True and none["over_baselines"]["pass"] is False
    assert "no baseline" in none["over_baselines"]["reason"] and none["pass"] is False
    strict = quality_bar(_means(input=20.0, wiener=21.0, dmdiff_a1=23.5), over_input_db=4.0)
    assert strict["over_input"]["pass"] is False and strict["over_baselines"]["pass"] is True


def test_cli_prints_the_table_and_replaces_only_reports(dataset, pipeline_dir, tmp_path, capsys):
    out = tmp_path / "cli-eval"
    args = ["evaluate", "--model", str(pipeline_dir), "--data", str(dataset), "--out", str(out), "--limit", "1",
            "--tune-pairs", "1", "--device", "cpu", "--threads", "1", "--no-progress"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "| method | vs | PSNR (dB)" in printed and "Quality bar" in printed and str(out) in printed
    first = json.loads((out / "metrics.json").read_text())
    assert first["count"] == 1 and DEGRADE not in first["methods"]
    assert cli_main(args) == 0                        # an earlier report is replaced
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli_main([*args[:5], "--out", str(foreign), *args[7:]]) == 2
    assert "not a dmdiff evaluation folder" in capsys.readouterr().err and (foreign / "notes.txt").is_file()


def test_resolve_model_and_default_out(tmp_path, pipeline_dir, dataset):
    run = tmp_path / "run"
    shutil.copytree(pipeline_dir, run / "pipeline")
    (run / "config.yaml").write_text("{}\n")
    assert resolve_model(run) == (run / "pipeline", run)
    assert resolve_model(run / "pipeline") == (run / "pipeline", run)
    recipe = tmp_path / "recipe"
    for stage in ("stage1", "stage2"):
        (recipe / stage).mkdir(parents=True)
        (recipe / stage / "pipeline").symlink_to(pipeline_dir, target_is_directory=True)
    assert resolve_model(recipe) == (recipe / "stage2" / "pipeline", recipe)
    assert resolve_model(recipe, "stage1") == (recipe / "stage1" / "pipeline", recipe)
    assert resolve_model(pipeline_dir) == (pipeline_dir, None)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("{}\n")
    with pytest.raises(DmdiffError, match="no final model"):
        resolve_model(unfinished)
    with pytest.raises(DmdiffError, match="neither"):
        resolve_model(tmp_path)
    metrics = evaluate(recipe, dataset, limit=1, tune_pairs=1, grids=GRIDS, device="cpu", progress=False)
    assert Path(metrics["out"]) == recipe / "eval" and (recipe / "eval" / "table.md").is_file()
    assert metrics["settings"]["stage1"]["pipeline"] == str(recipe / "stage1" / "pipeline")  # automatic
    no_test = tmp_path / "no-test"
    shutil.copytree(dataset / "gt_train", no_test / "gt_train")
    with pytest.raises(DmdiffError, match="test split"):
        evaluate(pipeline_dir, no_test, tmp_path / "x", progress=False)


def test_real_captures_without_lens_and_with_lpips(dataset, pipeline_dir, tmp_path, monkeypatch):
    """No lens.json: no true PSF, so no baselines (and the bar cannot pass); LPIPS fills its column
    when its weights exist (a stand-in metric here: the real weights are a download)."""
    import dmdiff.evaluation.job as job

    class FakeLPIPS:
        name = "lpips_alex"

        def __init__(self, net="alex", device="cpu"):
            pass

        def __call__(self, output, reference):
            return float(np.mean(np.abs(np.asarray(output, np.float64) - np.asarray(reference, np.float64))))

    monkeypatch.setattr(job, "lpips_status", lambda net="alex": (True, "stand-in"))
    monkeypatch.setattr(job, "LPIPSMetric", FakeLPIPS)
    real = tmp_path / "real"
    for folder in ("gt_test", "lr_test", "gt_train", "lr_train"):
        shutil.copytree(dataset / folder, real / folder)
    metrics = evaluate(pipeline_dir, real, tmp_path / "out", limit=1, device="cpu", progress=False)
    assert metrics["methods"] == ["input", "untrained", "dmdiff_a0", "dmdiff_arec", "dmdiff_a1", "dmdiff_a1_cc",
                                  "dmdiff_a1_x8", "vae_ceiling"]
    assert "no lens.json" in metrics["baselines"]["skipped"]
    assert "no lens.json" in metrics["baselines"]["richardson_lucy_sv"]["skipped"]
    assert metrics["field"]["zones_by"] == "radius"             # no lens: zones by distance from the centre
    assert metrics["quality_bar"]["pass"] is False and metrics["quality_bar"]["best_baseline"] is None
    assert metrics["per_image"][0]["maps"] is False
    row = metrics["per_image"][0]["methods"]["input"]
    name = metrics["names"][0]
    gt, lr = (read_image(real / f"{k}_test" / f"{name}.png") for k in ("gt", "lr"))
    assert row["lpips_alex"] == pytest.approx(np.mean(np.abs(lr.astype(np.float64) - gt)))
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Baselines skipped" in table and "LPIPS: unavailable" not in table
    assert f"| {row['lpips_alex']:.4f} |" in next(x for x in table.splitlines() if x.startswith("| capture"))
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["dmdiff_a0", "dmdiff_a1", "dmdiff_a1_cc",
                                                                                "dmdiff_a1_x8", "dmdiff_arec",
                                                                                "untrained", "vae_ceiling"]


# ---- ablation rows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation_run(pipeline_dir, tmp_path_factory):
    """A recipe-run layout whose stage 2 is the test model, with one ablation without SVDA."""
    run = tmp_path_factory.mktemp("abl-eval") / "run"
    (run / "stage2").mkdir(parents=True)
    (run / "stage2" / "pipeline").symlink_to(pipeline_dir, target_is_directory=True)
    plain = perturb_trainable(DMDiff(DMDiffConfig(svda=False)), seed=7)
    DMDiffPipeline.from_model(plain).save_pretrained(run / "ablations" / "no_svda" / "pipeline")
    (run / "ablations" / "unfinished").mkdir()                  # no pipeline/: not an ablation row
    return run


def test_ablation_rows_are_measured_like_the_positive_path(ablation_run, pipeline_dir, dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(ablation_run), "--data", str(dataset), "--out", str(out), "--limit", "1",
            "--tune-pairs", "1", "--ablation", f"again={pipeline_dir}", "--device", "cpu", "--no-progress"]
    assert cli_main(args) == 0
    assert "grid_ablations.png" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == ["input", "wiener", "richardson_lucy", "richardson_lucy_sv", "untrained", "dmdiff_a0",
                                  "dmdiff_arec", "dmdiff_a1", "dmdiff_a1_cc", "dmdiff_a1_x8", "ablation_no_svda",
                                  "ablation_again", "vae_ceiling"]
    assert metrics["labels"]["ablation_no_svda"] == "ablation: no SVDA (α=1)"
    assert metrics["labels"]["ablation_again"] == "ablation: again (α=1)"
    settings = metrics["settings"]["ablations"]
    assert settings["no_svda"]["model_config"]["svda"] is False and "automatic" in settings["no_svda"]["source"]
    assert settings["again"]["source"] == str(pipeline_dir) and settings["again"]["model_config"]["svda"] is True
    record = metrics["per_image"][0]
    name = record["name"]
    item = PairedFolderDataset(dataset, "test")[0]
    gt = read_image(dataset / "gt_test" / f"{name}.png")
    plain = DMDiffPipeline.from_pretrained(ablation_run / "ablations" / "no_svda" / "pipeline").model
    expected = quantize8(plain.restore(item["lr"][None], item["maps"][None], alpha=1.0)[0].permute(1, 2, 0).numpy())
    for method in ("ablation_no_svda", "ablation_again"):
        saved = read_image(out / "images" / method / f"{name}.png")
        values = record["methods"][method]
        for key, value in compute_metrics(saved, gt).items():
            assert values[key] == pytest.approx(value, abs=1e-9), (method, key)
        assert values["runtime_s"] > 0
    np.testing.assert_array_equal(read_image(out / "images" / "ablation_no_svda" / f"{name}.png"), expected)
    # and straight from the 8-bit files with scikit-image (Wang et al. SSIM settings), to 1e-6
    png, gt64 = _png(out / "images" / "ablation_no_svda" / f"{name}.png"), _png(dataset / "gt_test" / f"{name}.png")
    values = record["methods"]["ablation_no_svda"]
    assert values["psnr"] == pytest.approx(peak_signal_noise_ratio(gt64, png, data_range=1), abs=1e-6)
    assert values["ssim"] == pytest.approx(structural_similarity(png, gt64, data_range=1, channel_axis=-1,
                                                                 gaussian_weights=True, sigma=1.5,
                                                                 use_sample_covariance=False), abs=1e-6)
    # the same model as stage 2 under another name gives exactly stage 2's positive path
    np.testing.assert_array_equal(read_image(out / "images" / "ablation_again" / f"{name}.png"),
                                  read_image(out / "images" / "dmdiff_a1" / f"{name}.png"))
    assert record["methods"]["ablation_no_svda"]["psnr"] != record["methods"]["dmdiff_a1"]["psnr"]
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["method"].startswith("ablation_")]
    assert [(r["method"], r["reference"]) for r in rows] == [("ablation_no_svda", "gt"), ("ablation_again", "gt")]
    line = next(x for x in (out / "table.md").read_text().splitlines() if x.startswith("| ablation: no SVDA"))
    assert f"| gt | {metrics['means']['ablation_no_svda']['psnr']:.2f} |" in line
    with Image.open(out / "grid_ablations.png") as im:
        assert im.width > 5 * 100
    # a bare pipeline: no automatic ablations; bad --ablation values are refused before any work
    bare = evaluate(pipeline_dir, dataset, tmp_path / "bare", limit=1, tune_pairs=1, grids=GRIDS, device="cpu",
                    progress=False)
    assert not any(m.startswith("ablation_") for m in bare["methods"])
    assert not (tmp_path / "bare" / "grid_ablations.png").exists()
    for bad, message in (("no-equals", "expects NAME=PIPELINE_OR_RUN"), ("a/b=x", "letters, digits")):
        assert cli_main([*args[:5], "--out", str(tmp_path / "bad"), "--ablation", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _record(**psnrs):
    """A metrics.json-like record from per-image PSNRs (SSIM = PSNR / 100, so both agree)."""
    n = len(next(iter(psnrs.values())))
    return {"methods": list(psnrs), "labels": {m: m.upper() for m in psnrs},
            "means": {m: {"psnr": float(np.mean(v))} for m, v in psnrs.items()},
            "per_image": [{"methods": {m: {"psnr": v[i], "ssim": v[i] / 100} for m, v in psnrs.items()}}
                          for i in range(n)]}


def test_discussion_sentences_follow_the_numbers():
    from dmdiff.evaluation.discussion import discuss, paired_difference

    metrics = _record(input=[20.0, 25.0, 30.0, 22.0], dmdiff_a1=[21.0, 26.2, 30.9, 23.1],
                      dmdiff_a1_x8=[21.2, 26.3, 31.1, 23.2], ablation_no_svda=[21.3, 25.9, 31.0, 22.9], ablation_single_path=[19.0, 24.3, 28.9, 21.0])
    d = paired_difference(metrics, "dmdiff_a1", "input")
    assert d["n"] == 4 and d["wins"] == 4 and d["losses"] == 0
    assert d["mean"] == pytest.approx(1.05) and d["sd"] == pytest.approx(np.std([1.0, 1.2, 0.9, 1.1], ddof=1))
    assert d["consistent"] is True
    noisy = paired_difference(metrics, "ablation_no_svda", "dmdiff_a1")
    assert noisy["wins"] == 2 and noisy["losses"] == 2 and noisy["consistent"] is False
    text = discuss(metrics)
    assert text[0].startswith("DMDIFF_A1: 1.05 dB above INPUT in mean PSNR (higher on 4 of 4 images")
    assert "consistent (more than 2 standard errors" in text[0]
    x8 = next(s for s in text if s.startswith("DMDIFF_A1_X8"))
    assert "0.15 dB above DMDIFF_A1" in x8 and "higher on 4 of 4" in x8
    single = next(s for s in text if s.startswith("ABLATION_SINGLE_PATH"))
    assert "2.00 dB below DMDIFF_A1" in single and "higher on 0 of 4" in single and "consistent" in single
    no_svda = next(s for s in text if s.startswith("ABLATION_NO_SVDA"))
    assert "within the per-image spread" in no_svda
    assert any(s.startswith("Within the per-image spread of the main model") and "ABLATION_NO_SVDA" in s
               and "SINGLE_PATH" not in s for s in text)
    # flipped numbers flip the words; two images are too few to call anything
    flipped = _record(input=[22.0, 27.0], dmdiff_a1=[21.0, 26.0])
    first = discuss(flipped)[0]
    assert first.startswith("DMDIFF_A1: 1.00 dB below INPUT") and "too few to judge" in first
    assert discuss(_record(input=[1.0, 2.0])) == []


def test_quality_bar_lines_are_the_reports(report):
    out, metrics = report
    lines = quality_bar_lines(metrics["quality_bar"])
    assert "\n".join(lines) + "\n" in (out / TABLE_FILE).read_text()
    assert lines[0].endswith("PASS" if metrics["quality_bar"]["pass"] else "FAIL")
    assert lines[1].startswith("- over the input: ") and lines[2].startswith("- over ")
    bar = quality_bar({"means": {"dmdiff_a1": {"psnr": 30.0}, "input": {"psnr": 26.5}}})
    assert quality_bar_lines(bar) == ["Quality bar (positive path 30.00 dB): FAIL",
                                      "- over the input: PASS (gain +3.50 dB, needs +3.0, margin +0.50 dB)",
                                      "- over best baseline: FAIL (no baseline (Wiener / RL) was evaluated)"]
    bar = quality_bar({"means": {"dmdiff_a1": {"psnr": 30.0}, "input": {"psnr": 26.5}, "wiener": {"psnr": 28.0}}})
    assert quality_bar_lines(bar)[0].endswith("PASS")
    assert quality_bar_lines(bar)[2] == "- over Wiener: PASS (gain +2.00 dB, needs +1.0, margin +1.00 dB)"


def test_spread_figure(report):
    _, metrics = report
    shown = [m for m in metrics["methods"] if metrics["references"][m] == "gt"]
    assert DEGRADE in metrics["methods"] and DEGRADE not in shown      # measured against the capture
    fig = plot_spread(metrics)
    psnr_ax, gain_ax, time_ax = fig.axes
    rows = dict(zip(psnr_ax.get_yticks(), (t.get_text() for t in psnr_ax.get_yticklabels())))
    assert rows == {k + 1: metrics["labels"][m] for k, m in enumerate(shown)}
    per_image = {m: [r["methods"][m]["psnr"] for r in metrics["per_image"]] for m in shown}
    gains = {m: np.subtract(per_image[m], per_image["input"]) for m in shown}
    written = {t.get_text(): t.get_position()[1] for t in gain_ax.texts}     # rows kept off the gain axis
    assert any(m in OFF_GAIN_AXIS for m in shown) and written
    for ax, expected in ((psnr_ax, per_image), (gain_ax, gains)):
        dots = {round(float(np.mean(line.get_ydata()))): line for line in ax.get_lines() if line.get_marker() == "o"}
        for k, m in enumerate(shown):
            if ax is gain_ax and f"off this axis: mean {gains[m].mean():+.2f} dB" in written:
                assert m in OFF_GAIN_AXIS and k + 1 not in dots and written[f"off this axis: mean {gains[m].mean():+.2f} dB"] == k + 1
                continue                                                  # written, not drawn: never both
            np.testing.assert_allclose(dots[k + 1].get_xdata(), expected[m], rtol=0, atol=1e-12)
    lo, hi = gain_ax.get_xlim()
    assert all(lo <= g <= hi for m in shown if m not in OFF_GAIN_AXIS for g in gains[m])
    timed = [m for m in shown if "runtime_s" in metrics["means"][m]]
    assert "input" not in timed and len(time_ax.patches) == len(timed) > 0
    for bar, m in zip(time_ax.patches, timed):
        assert bar.get_width() == pytest.approx(np.mean([r["methods"][m]["runtime_s"] for r in metrics["per_image"]]))
    assert time_ax.get_xscale() == "log"
    plt.close(fig)


def test_an_external_set_gets_the_same_table(dataset, pipeline_dir, tmp_path):
    """The same dataset given as the external set: its figures equal the main split's (same
    methods but the ×8 self-ensemble, tuned parameters and PSF), in metrics.json and as a second table."""
    external = tmp_path / "external"
    for folder in ("gt_test", "lr_test", "maps"):
        shutil.copytree(dataset / folder, external / folder)
    shutil.copy(dataset / "lens.json", external / "lens.json")
    metrics = evaluate(pipeline_dir, dataset, tmp_path / "out", limit=1, tune_pairs=1,
                       grids={"wiener": [0.1], "richardson_lucy": [5]}, external=external, progress=False)
    ext = metrics["external"]
    assert "dmdiff_a1_x8" in metrics["methods"]
    assert ext["methods"] == [m for m in metrics["methods"] if m != "dmdiff_a1_x8"] and ext["count"] == len(PairedFolderDataset(dataset, "test"))
    first = metrics["names"][0]
    k = ext["names"].index(first)
    for method in ext["methods"]:
        assert ext["per_image"][k]["methods"][method]["psnr"] == pytest.approx(
            metrics["per_image"][0]["methods"][method]["psnr"], abs=1e-9), method
    for zone, scores in metrics["field"]["per_image"][first]["richardson_lucy_sv"].items():   # same lens, same grid
        assert ext["field"]["per_image"][first]["richardson_lucy_sv"][zone] == pytest.approx(scores)
    assert "quality_bar" in ext and (tmp_path / "out" / "external" / "images" / "dmdiff_a1" / f"{first}.png").is_file()
    assert ext["sources"][first] == metrics["sources"][first]       # the photos the intervals resample
    by_photo: dict[str, list] = {}
    for record in ext["per_image"]:
        scores = record["methods"]
        by_photo.setdefault(ext["sources"][record["name"]], []).append(scores["dmdiff_a0"]["psnr"] - scores["dmdiff_a1"]["psnr"])
    row = next(r for r in ext["differences"] if r["method"] == "dmdiff_a0" and r["zone"] is None)
    assert row["mean"] == pytest.approx(np.mean([np.mean(d) for d in by_photo.values()]))
    assert {(r["method"], r["zone"]) for r in ext["differences"]} == {(r["method"], r["zone"]) for r in metrics["differences"]
                                                                     if r["method"] != "dmdiff_a1_x8"}
    assert (tmp_path / "out" / "external" / GAIN_FILE).is_file()
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("## Held-out evaluation") == 2 and str(external) in table
    assert table.count("## Paired PSNR differences") == 2 and table.count("## PSNR / SSIM per field zone") == 2
    with pytest.raises(DmdiffError, match="test split"):
        evaluate(pipeline_dir, dataset, tmp_path / "o2", external=tmp_path, progress=False)


# ---- α rows and the perception columns ---------------------------------------------------------


def test_each_restore_runs_once_per_sample(dataset, pipeline_dir, tmp_path, monkeypatch):
    """α = 0, the recommended α and α = 1 are re-decodings of one restore call per image, and the ×8
    self-ensemble reuses that call as its unturned member: the UNet runs 1 + 7 times per test image
    (and once on the warm-up's stand-in), never twice on the same input."""
    restores, unet_calls = [], []
    real_latents, real_step = DMDiff.path_latents, Backbone.one_step

    def latents(self, lr, maps=None, paths=DECODED_PATHS):
        key = lr.numpy().tobytes() + (b"" if maps is None else maps.numpy().tobytes())
        restores.append((id(self), hashlib.sha256(key).hexdigest(), tuple(lr.shape)))
        return real_latents(self, lr, maps, paths)

    monkeypatch.setattr(DMDiff, "path_latents", latents)
    monkeypatch.setattr(Backbone, "one_step", lambda self, *a, **k: unet_calls.append(1) or real_step(self, *a, **k))
    metrics = evaluate(pipeline_dir, dataset, tmp_path / "out", limit=2, tune_pairs=1,
                       grids={"wiener": [0.1], "richardson_lucy": [2]}, progress=False)
    # the trained model: the warm-up stand-in and 2 test images; the untrained row's model: the same, unturned
    assert len(restores) == len(unet_calls) == 1 + 2 * (1 + 7) + (1 + 2)
    assert len(set(restores)) == len(restores)                   # each distinct restore once per model
    test = PairedFolderDataset(dataset, "test")
    for index in range(2):
        x = test[index]["lr"][None]
        turned = {hashlib.sha256(orient(x, k).numpy().tobytes() + orient(test[index]["maps"][None], k).numpy()
                                 .tobytes()).hexdigest() for k in range(8)}
        assert turned <= {key for _, key, _ in restores}           # every orientation restored, the identity once
    assert metrics["labels"]["dmdiff_arec"] == f"DMDiff α={RECOMMENDED_ALPHA:g} (recommended)"
    assert metrics["settings"]["alphas"]["dmdiff_arec"] == RECOMMENDED_ALPHA == metrics["settings"]["recommended_alpha"]
    order = metrics["methods"]
    assert order.index("dmdiff_a0") + 1 == order.index("dmdiff_arec") == order.index("dmdiff_a1") - 1
    line = next(x for x in (tmp_path / "out" / "table.md").read_text().splitlines()
                if x.startswith(f"| DMDiff α={RECOMMENDED_ALPHA:g} (recommended)"))
    assert "(α change: " in line


def test_no_recommended_alpha_no_row(dataset, tmp_path):
    plain = perturb_trainable(DMDiff(DMDiffConfig(svda_dim=32)), seed=5)
    pipe = DMDiffPipeline.from_model(plain).save_pretrained(tmp_path / "pipe")
    metrics = evaluate(pipe, dataset, tmp_path / "out", limit=1, tune_pairs=1,
                       grids={"wiener": [0.1], "richardson_lucy": [2]}, progress=False)
    assert "dmdiff_arec" not in metrics["methods"] and "dmdiff_arec" not in metrics["settings"]["alphas"]
    assert metrics["settings"]["recommended_alpha"] is None


def test_perception_columns_recompute_from_the_saved_images(report, dataset):
    """The set-level detail ratio from the 8-bit PNGs; NIQE is left out, and why, for 64-px frames."""
    out, metrics = report
    perception = metrics["perception"]
    assert perception["detail_band_cpp"] == list(DETAIL_BAND) and perception["count"] == 2
    assert set(perception["methods"]) == set(metrics["methods"])
    for method in metrics["methods"]:
        outputs, references = [], []
        for name in metrics["names"]:
            gt, lr = (read_image(dataset / f"{k}_test" / f"{name}.png") for k in ("gt", "lr"))
            outputs.append(lr if method == "input" else read_image(out / "images" / method / f"{name}.png"))
            references.append(lr if method == DEGRADE else gt)
        assert perception["methods"][method]["detail_ratio"] == pytest.approx(
            detail_ratio_set(outputs, references), rel=1e-9), method
        assert perception["methods"][method]["niqe_set"] is None
    assert perception["gt"] == {"niqe_set": None, "patches": 0}
    assert "smaller than one 96-px NIQE patch" in perception["niqe_unavailable"]
    assert perception["methods"]["input"]["detail_ratio"] < 1          # the capture lost fine detail
    table = (out / "table.md").read_text()
    header = next(x for x in table.splitlines() if x.startswith("| method |"))
    assert header.endswith(f"| {NIQE_COLUMN} | {detail_column(DETAIL_BAND)} |")
    assert "NIQE (set-level, lower is better)" in header and "detail ratio (band 0.08–0.25 cycles/px" in header
    assert f"NIQE: unavailable ({perception['niqe_unavailable']})" in table
    line = next(x for x in table.splitlines() if x.startswith("| capture (input)"))
    assert line.endswith(f"| – | {perception['methods']['input']['detail_ratio']:.3f} |")
    assert header.count("LPIPS") == 1                                   # only the LPIPS column says LPIPS
    assert "Neither is LPIPS" in table


def test_set_perception_pools_niqe_patches_over_the_images():
    """Frames large enough for NIQE (256 px: 4 patches each): the pooled figures and the table's lines."""
    rng = np.random.default_rng(0)
    astronaut = np.asarray(skimage.data.astronaut(), np.float32) / 255
    frames = [astronaut[:256, :256], astronaut[256:, 256:], astronaut[:256, 256:]]
    soft = [quantize8(scipy.ndimage.gaussian_filter(f, (1.5, 1.5, 0))) for f in frames]
    grainy = [quantize8(np.clip(f + rng.normal(0, 0.05, f.shape), 0, 1)) for f in frames]
    tally = SetPerception()
    for k, gt in enumerate(frames):
        tally.add_reference(gt)
        tally.add("soft", soft[k], gt)
        tally.add("grainy", grainy[k], gt)
    record = tally.record()
    assert record["niqe_unavailable"] is None and record["count"] == 3
    assert record["gt"] == {"niqe_set": pytest.approx(niqe_set(frames), abs=0), "patches": 12}
    assert record["methods"]["soft"]["niqe_set"] == pytest.approx(niqe_set(soft), abs=0)
    assert record["methods"]["soft"]["niqe_set"] > record["gt"]["niqe_set"] + 2
    assert record["methods"]["soft"]["detail_ratio"] == pytest.approx(detail_ratio_set(soft, frames), rel=1e-12)
    assert record["methods"]["soft"]["detail_ratio"] < 1
    assert record["methods"]["grainy"]["detail_ratio"] > 1
    assert "patches of all 3 images pooled" in record["niqe"]
    means = {m: {"psnr": 20.0} for m in ("input", "soft", "grainy")}
    table = format_table({"count": 3, "dataset": "d", "methods": ["soft", "grainy"], "means": means,
                          "labels": {"soft": "soft", "grainy": "grainy"}, "references": {"soft": "gt", "grainy": "gt"},
                          "perception": record})
    gt_line = f"| ground truth (NIQE reference) | – | – | – | – | – | – | – | {record['gt']['niqe_set']:.2f} | – |"
    assert gt_line in table
    soft_line = next(x for x in table.splitlines() if x.startswith("| soft |"))
    assert soft_line.endswith(f"| {record['methods']['soft']['niqe_set']:.2f} | "
                              f"{record['methods']['soft']['detail_ratio']:.3f} |")
    assert "(12 patches per method)" in table


def test_notebook_02_gets_the_trained_model_and_the_datasets_test_pairs(dataset, pipeline_dir, tmp_path):
    """held_out_pairs reads the dataset's test pairs as they are on disk, with their lens and noise;
    model_or_fresh loads the model behind a run path, or says how to train one and builds a fresh one."""
    pairs, spec = held_out_pairs(dataset, 2)
    test_set, meta = PairedFolderDataset(dataset, "test"), read_lens(dataset)
    assert [p["name"] for p in pairs] == test_set.names[:2] and spec.to_dict() == meta["spec"]
    first = test_set[0]
    assert np.array_equal(pairs[0]["lr"], first["lr"].permute(1, 2, 0).numpy())
    assert np.array_equal(pairs[0]["maps"], first["maps"].numpy())
    assert list(pairs[0]["noise"]) == meta["images"][pairs[0]["name"]]["noise"]
    model, note = model_or_fresh(pipeline_dir, grid_size=spec.grid_size)
    assert note is None and model.config.svda_dim == 32
    fresh, note = model_or_fresh(tmp_path / "no-run", grid_size=3, spatial=True)
    assert "UNTRAINED" in note and "03_multipath_training" in note and fresh.config.svda_spatial
    record = field_scores(model, pairs, spec).record()
    assert set(record["per_image"]) == {p["name"] for p in pairs}
    edge = {m: np.mean([record["per_image"][p["name"]][m]["edge"]["psnr"] for p in pairs])
            for m in (CAPTURE, WITH_MAPS)}
    assert zone_gains(record, WITH_MAPS, CAPTURE)["edge"] == pytest.approx(edge[WITH_MAPS] - edge[CAPTURE])
