"""`dmdiff train` / `dmdiff pseudo`: end-to-end tiny runs, exact resume, checkpoints, early errors."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dmdiff.cli import main as cli_main
from dmdiff.config import to_dict
from dmdiff.data.dataset import PairedFolderDataset
from dmdiff.data.sources import TEST_PHOTOS
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.imageio import write_png
from dmdiff.optics.sensor import srgb_to_linear
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import MARKER
from dmdiff.train import checkpoint as ckpt_io
from dmdiff.train.config import PATHS, PseudoConfig, load_train_config, stage_config
from dmdiff.train.data import StepBatches, open_train_sets
from dmdiff.train.loop import learning_rate, train
from dmdiff.train.pseudo import make_pseudo_pairs

SIZE = 48
SPEC = MetalensSpec(image_size_px=SIZE, psf_size_px=15, grid_size=3, wavelengths_per_channel=2)


def write_pairs(root: Path, split: str, names: list[str], seed: int, maps: bool = True, blur: bool = True) -> None:
    """Tiny aligned pairs: smooth random GT, a blurred + noisy LR, a slightly blurred gt_blur."""
    import scipy.ndimage

    rng = np.random.default_rng(seed)
    for name in names:
        gt = scipy.ndimage.gaussian_filter(rng.uniform(size=(SIZE, SIZE, 3)), (2, 2, 0))
        gt = (gt - gt.min()) / (gt.max() - gt.min())
        lr = np.clip(scipy.ndimage.gaussian_filter(gt, (1.5, 1.5, 0)) + rng.normal(0, 0.02, gt.shape), 0, 1)
        write_png(root / f"gt_{split}" / f"{name}.png", gt)
        write_png(root / f"lr_{split}" / f"{name}.png", lr)
        if blur:
            write_png(root / f"gt_blur_{split}" / f"{name}.png", scipy.ndimage.gaussian_filter(gt, (0.5, 0.5, 0)))
        if maps:
            (root / "maps").mkdir(exist_ok=True)
            np.save(root / "maps" / f"{name}.npy", rng.uniform(1, 3, (7, 3, 3)).astype(np.float32))


def write_dataset(root: Path) -> Path:
    """A small dataset at ``root``: 6 training pairs, 2 test pairs (no val split), a lens.json."""
    write_pairs(root, "train", [f"img_{i:02d}" for i in range(6)], seed=0)
    write_pairs(root, "test", ["val_00", "val_01"], seed=1)
    (root / "lens.json").write_text(json.dumps({"spec": SPEC.to_dict(), "camera": {"image_size_px": SIZE}}))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("train-data") / "data")


def tiny(data: Path, **changes) -> dict:
    """A training config mapping small enough for a few CPU seconds."""
    cfg = dict(data=str(data), crop_px=32, batch_size=2, grad_accum=2, steps=6, lr=1e-3, checkpoint_every=2,
               keep_last=2, validate_every=3, val_images=2, val_crop_px=32, log_every=2, seed=3,
               path_sampling="sample", ema_decay=0.9)
    cfg.update(changes)
    return cfg


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pipeline" / "dmdiff_trainable.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def run_a(dataset, tmp_path_factory, psf_cache):
    """One uninterrupted reference run (per-sample paths, grad accumulation, EMA)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = train(load_train_config(tiny(dataset)), out, progress=False)
    return out, report, [str(w.message) for w in caught]


# ---- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ({"stepz": 3}, "unknown config key 'stepz'"),
    ({"batch_size": "4"}, "batch_size: expected an integer"),
    ({"loss": {"lpips_substitute": "ssim"}}, "lpips_substitute"),
    ({"path_probs": {"positive": 0, "neutral": 0, "negative": 0}}, "path_probs"),
    ({"path_sampling": "image"}, "path_sampling"),
    ({"lr_schedule": "linear"}, "lr_schedule: 'linear' is not one of"),
    ({"exposure_range": [0, 1]}, "exposure_range must be"),
    ({"model": {"preset": "huge"}}, "preset"),
    ({"recipe": {"stage1": {"crop": 64}}}, "recipe.stage1: unknown config key 'crop'"),
    ({"recipe": {"stage2": {"lr": -1.0}}}, "recipe.stage2: lr must be a positive number"),
    ({"recipe": {"pseudo": {"count": 0}}}, "recipe.pseudo.count"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(bad)


def test_learning_rate_warms_up_then_stays_or_decays():
    constant = load_train_config({"lr": 1e-3, "steps": 100, "warmup_steps": 10})
    cosine = load_train_config({"lr": 1e-3, "steps": 100, "warmup_steps": 10, "lr_schedule": "cosine"})
    for cfg in (constant, cosine):
        assert learning_rate(cfg, 0) == pytest.approx(1e-4) and learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert {learning_rate(constant, s) for s in range(9, 100)} == {1e-3}
    decay = [learning_rate(cosine, s) for s in range(10, 100)]
    assert decay[0] == pytest.approx(1e-3) and decay[45] == pytest.approx(5e-4)
    assert all(a > b for a, b in zip(decay, decay[1:])) and 0 < decay[-1] < 1e-6


def test_config_file_errors_and_stages(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nmodel: {unet_rank: two}\n")
    with pytest.raises(ConfigError, match="model.unet_rank"):
        load_train_config(path)
    cfg = load_train_config({"recipe": {"stage1": {"steps": 7}, "stage2": {"path_probs": {"neutral": 0.0}}}})
    s1, s2 = stage_config(cfg, "stage1"), stage_config(cfg, "stage2")
    assert s1.path_probs.normalised() == (0, 0, 1) and s1.steps == 7
    assert s2.path_probs.normalised() == pytest.approx((0.7 / 0.8, 0, 0.1 / 0.8)) and s2.steps == cfg.steps
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


# ---- data -------------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_and_index(dataset):
    cfg = load_train_config(tiny(dataset, path_probs={"positive": 1, "neutral": 1, "negative": 1}))
    sets = open_train_sets(cfg)
    a, b = StepBatches(sets, cfg, 40), StepBatches(sets, cfg, 40)
    later, first = a[7], b[0]
    again = b[7]
    assert all(torch.equal(later[k], again[k]) for k in later)
    assert not torch.equal(first["input"], later["input"])
    # every pair once per epoch
    slots = np.arange(len(a.sets[0]))
    assert sorted(a.pair_index(p) for p in slots) == list(range(len(a.sets[0])))
    # per-sample paths, with the training targets of each path
    batches = [a[m] for m in range(40)]
    assert set(np.concatenate([b["path"].numpy() for b in batches])) == {0, 1, 2}
    for m, b in enumerate(batches[:6]):
        for k, (path, index) in enumerate(zip(b["path"].tolist(), b["index"].tolist())):
            pair = a.item(int(a.slots(m)[k]), index)
            source, target = {"positive": ("lr", "gt"), "neutral": ("lr", "gt_blur"), "negative": ("gt", "lr")}[PATHS[path]]
            assert torch.equal(b["input"][k], pair[source]) and torch.equal(b["target"][k], pair[target])


def test_exposure_scales_each_pair_by_one_gain_in_linear_light(dataset):
    plain = load_train_config(tiny(dataset))
    sets = open_train_sets(plain)
    base = StepBatches(sets, plain, 10)
    fixed = StepBatches(sets, load_train_config(tiny(dataset, exposure_range=[0.5, 0.5])), 10)
    for slot in range(4):
        index = base.pair_index(slot)
        a, b = base.item(slot, index), fixed.item(slot, index)
        for key in ("lr", "gt", "gt_blur"):   # half the light: linear values halve exactly
            assert torch.allclose(srgb_to_linear(b[key]), 0.5 * srgb_to_linear(a[key]), atol=1e-5)
        assert torch.equal(a["maps"], b["maps"])
    ranged = StepBatches(sets, load_train_config(tiny(dataset, exposure_range=[0.4, 1.6])), 10)
    gains = []
    for slot in range(12):
        index = base.pair_index(slot)
        a, b = base.item(slot, index), ranged.item(slot, index)
        assert torch.equal(b["lr"], ranged.item(slot, index)["lr"])          # a function of the slot
        lin_a, lin_b = srgb_to_linear(a["gt"]), srgb_to_linear(b["gt"])
        keep = (lin_a > 0.05) & (lin_b < 0.99)                              # not clipped
        gains.append(float((lin_b[keep] / lin_a[keep]).median()))
        lr_gain = srgb_to_linear(b["lr"])[keep] / srgb_to_linear(a["lr"])[keep].clamp_min(1e-3)
        assert abs(float(lr_gain.median()) - gains[-1]) < 0.02 * gains[-1]   # one gain for the pair
    assert all(0.4 - 1e-3 <= g <= 1.6 + 1e-3 for g in gains) and max(gains) / min(gains) > 1.5


def test_batch_path_sampling_is_shared_and_mixed_maps_dropped(dataset, tmp_path):
    nomaps = tmp_path / "nomaps"
    write_pairs(nomaps, "train", ["x_00", "x_01"], seed=5, maps=False, blur=False)
    cfg = load_train_config(tiny(dataset, path_sampling="batch", extra_data=[str(nomaps)]))
    with pytest.warns(UserWarning) as caught:
        sets = open_train_sets(cfg)
    text = " ".join(str(w.message) for w in caught)
    assert "without degradation maps" in text and "uses the GT image" in text
    batches = StepBatches(sets, cfg, 20)
    assert all(len(set(batches[m]["path"].tolist())) == 1 for m in range(20))
    assert "maps" not in batches[0]


@pytest.mark.parametrize("breakage, match", [
    ("missing", "dataset folder not found"),
    ("empty", "missing folder"),
    ("unpaired", "do not match"),
    ("no_test", "validation needs the test split"),
    ("small", "crop_px = 64 is larger"),
    ("grids", "maps have different shapes"),
    ("no_lens", "anchor_rl_iterations: .* no lens.json"),
    ("no_lens_wiener", "anchor_wiener_nsr: .* no lens.json"),
])
def test_bad_dataset_fails_before_training(dataset, tmp_path, breakage, match):
    root = tmp_path / "data"
    changes = {}
    if breakage == "empty":
        root.mkdir()
    elif breakage == "unpaired":
        shutil.copytree(dataset, root)
        (root / "lr_train" / "img_03.png").unlink()
    elif breakage == "no_test":
        write_pairs(root, "train", ["a", "b"], seed=2)
    elif breakage == "small":
        shutil.copytree(dataset, root)
        changes = {"crop_px": 64}
    elif breakage == "grids":
        shutil.copytree(dataset, root)
        write_pairs(tmp_path / "other", "train", ["o_00"], seed=4)
        np.save(tmp_path / "other" / "maps" / "o_00.npy", np.ones((7, 5, 5), np.float32))
        changes = {"extra_data": [str(tmp_path / "other")]}
    elif breakage.startswith("no_lens"):
        shutil.copytree(dataset, root)
        (root / "lens.json").unlink()
        deconvolution = {"anchor_wiener_nsr": 1e-3} if breakage.endswith("wiener") else {"anchor_rl_iterations": 3}
        changes = {"model": {"anchor_sigma_px": 4.0, **deconvolution}}
    out = tmp_path / "run"
    with pytest.raises(DmdiffError, match=match):
        train(load_train_config(tiny(root, **changes)), out, progress=False)
    assert not out.exists()


# ---- training runs ----------------------------------------------------------------------------


def test_tiny_run_writes_checkpoints_metrics_and_config(run_a, dataset):
    out, report, messages = run_a
    assert report["completed"] and report["steps"] == 6 and report["step_time_s"]["median"] > 0
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [4, 6]          # keep_last = 2
    state = json.loads((out / "checkpoint-6" / "state.json").read_text())
    assert state["step"] == 6 and state["samples_seen"] == 6 * 2 * 2
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "ema.safetensors",
            "rng-0.safetensors", "rng-0.json"} <= set(state["files"])
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and [p.name for p in out.glob(".*")] == [MARKER]
    cfg = load_train_config(out / "config.yaml")
    assert to_dict(cfg) == to_dict(load_train_config(tiny(dataset)))
    info = json.loads((out / "run.json").read_text())
    assert info["seed"] == 3 and info["versions"]["torch"] and info["versions"]["accelerate"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["kind"] == "train"]
    val_lines = [r for r in lines if r["kind"] == "val"]
    assert [r["step"] for r in train_lines] == [2, 4, 6] and [r["step"] for r in val_lines] == [3, 6]
    assert all(np.isfinite(r["loss"]) and sum(r["paths"].values()) == 2 * 2 * 2 for r in train_lines)
    assert val_lines[-1]["path"] == "positive" and np.isfinite(val_lines[-1]["psnr"])
    assert report["val"]["psnr"] == val_lines[-1]["psnr"]
    # the perceptual term: LPIPS with its real weights, or a loud substitute under its own name
    from dmdiff.metrics import lpips_status

    if lpips_status("vgg")[0]:
        assert report["perceptual_term"] == "lpips_vgg" and "lpips_vgg" in train_lines[0]
    else:
        assert report["perceptual_term"] == "gradient_l1" and "gradient_l1" in train_lines[0]
        assert "lpips_vgg" not in train_lines[0]
        assert any("LPIPS is NOT being used" in m for m in messages)
    # the exported pipeline loads, with the weights of the final EMA
    from dmdiff.model.pipeline import DMDiffPipeline

    model = DMDiffPipeline.from_pretrained(out / "pipeline").model
    ema = load_file(str(out / "checkpoint-6" / "ema.safetensors"))
    assert all(torch.equal(p.detach(), ema[k]) for k, p in model.trainable_parameters().items())


def test_on_log_gets_every_logged_record_and_path_losses(dataset, tmp_path):
    """The callback sees exactly the metrics.jsonl records; one path per micro-batch gives per-path losses."""
    from dmdiff.runs import read_metrics
    from dmdiff.viz import TrainingMonitor, plot_training

    calls = []
    cfg = load_train_config(tiny(dataset, steps=4, grad_accum=1, path_sampling="batch", log_every=1,
                                 checkpoint_every=4, validate_every=2, val_images=1, ema_decay=None))
    train(cfg, tmp_path / "run", progress=False, on_log=lambda step, record: calls.append((step, record)))
    records = read_metrics(tmp_path / "run")
    assert [step for step, _ in calls] == [r["step"] for r in records] and [r for _, r in calls] == records
    assert [r["kind"] for r in records] == ["train", "train", "val", "train", "train", "val"]
    for r in (r for r in records if r["kind"] == "train"):
        (path,) = [p for p, n in r["paths"].items() if n]          # one step of one micro-batch: one path
        assert r["path_loss"] == {path: pytest.approx(r["loss"])}
    monitor = TrainingMonitor(min_interval_s=0)
    for step, record in calls:
        monitor(step, {**record, "stage": "stage2"})
    monitor.close()
    assert list(monitor.records) == ["stage2"] and monitor.fig.axes[0].lines and monitor.fig.axes[1].lines
    fig = plot_training({"stage1": records, "stage2": records})
    labels = [line.get_label() for line in fig.axes[1].lines if not line.get_label().startswith("_")]
    assert labels == [f"{stage}: positive {kind}" for stage in ("stage1", "stage2") for kind in ("output", "input")]


def test_resume_after_stop_is_bit_identical(run_a, dataset, tmp_path):
    out_a = run_a[0]
    cfg = load_train_config(tiny(dataset))
    out = tmp_path / "b"
    assert train(cfg, out, progress=False, stop_at_step=5) == {"completed": False, "steps": 5}
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [2, 4] and not (out / "pipeline").exists()
    report = train(cfg, out, "latest", progress=False)
    assert report["resumed_from_step"] == 4
    assert same_weights(out_a, out)
    strip = [{k: v for k, v in json.loads(line).items() if k != "step_time_s"}
             for line in (out_a / "metrics.jsonl").read_text().splitlines()]
    again = [{k: v for k, v in json.loads(line).items() if k != "step_time_s"}
             for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert again == strip


def test_killed_process_resumes_bit_identical(run_a, dataset, tmp_path):
    """SIGKILL a CLI run once its first checkpoint exists; `--resume latest` ends where run A did."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(dataset, steps=6)))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dmdiff.cli", "train", "--config", str(config), "--out", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "pipeline").exists()
    report = train(load_train_config(config), out, "latest", progress=False)
    assert report["resumed_from_step"] in (2, 4)
    assert same_weights(run_a[0], out)


def test_broken_checkpoints_are_ignored(run_a, dataset, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(run_a[0], out)
    shutil.rmtree(out / "pipeline")
    (out / "train_report.json").unlink()
    (out / ".checkpoint-8.partial").mkdir()                           # an interrupted write
    (out / ".checkpoint-8.partial" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoint-9").mkdir()                                    # no state.json: not complete
    newest = out / "checkpoint-6" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])                     # corrupted after the fact
    (out / "checkpoint-4").rename(out / ".checkpoint-4.old")          # killed while replacing it
    ckpt_io.clean_partial(out)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6",
                                                                                "checkpoint-9"]
    with pytest.warns(ckpt_io.CheckpointWarning, match="checkpoint-6"):
        found = ckpt_io.find_checkpoint(out, "latest")
    assert found.step == 4
    with pytest.warns(ckpt_io.CheckpointWarning):
        report = train(load_train_config(tiny(dataset)), out, "latest", progress=False)
    assert report["resumed_from_step"] == 4
    assert same_weights(run_a[0], out)


def test_checkpoint_shape_mismatch_and_existing_run(run_a, dataset, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(run_a[0], out)
    with pytest.raises(DmdiffError, match="already holds a training run"):
        train(load_train_config(tiny(dataset)), out, progress=False)
    with pytest.raises(DmdiffError, match="differs from the run's config.yaml in lr"):
        train(load_train_config(tiny(dataset, lr=5e-4)), out, "latest", progress=False)
    with pytest.raises(DmdiffError, match="does not fit this model"):
        train(load_train_config(tiny(dataset, model={"unet_rank": 2}, steps=8)), tmp_path / "e",
              str(out / "checkpoint-6"), progress=False)
    with pytest.raises(DmdiffError, match="no such checkpoint folder"):
        ckpt_io.find_checkpoint(out, str(out / "checkpoint-99"))


def test_optimizer_and_rng_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    tensors, meta = ckpt_io.flatten_optimizer(opt.state_dict())
    json.dumps(meta)
    back = ckpt_io.unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(back)
    assert all(torch.equal(opt.state_dict()["state"][0][k], opt2.state_dict()["state"][0][k])
               for k in ("exp_avg", "exp_avg_sq", "step"))
    tensors, js = ckpt_io.rng_state()
    expected = (torch.rand(3), np.random.rand(), random.random())
    ckpt_io.restore_rng({"tensors": tensors, "json": json.loads(json.dumps(js))})
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1]
    assert random.random() == expected[2]


# ---- pseudo pairs and the recipe ------------------------------------------------------------------


def test_pseudo_pairs_layout(run_a, dataset, tmp_path, psf_cache):
    out = make_pseudo_pairs(run_a[0], tmp_path / "pseudo", settings=PseudoConfig(count=3, batch_size=2),
                            progress=False)
    names = sorted(p.stem for p in (out / "gt_train").iterdir())
    assert len(names) == 3 and all(n.startswith("pseudo_") for n in names)
    assert not any(photo in n for n in names for photo in TEST_PHOTOS)
    for folder in ("lr_train", "gt_blur_train"):
        assert sorted(p.stem for p in (out / folder).iterdir()) == names
    assert sorted(p.stem for p in (out / "maps").iterdir()) == names
    maps = np.load(out / "maps" / f"{names[0]}.npy", allow_pickle=False)
    assert maps.shape == (7, 3, 3)
    item = PairedFolderDataset(out, "train")[0]
    assert set(item) == {"lr", "gt", "gt_blur", "maps", "name"} and item["lr"].shape == (3, SIZE, SIZE)
    assert not torch.equal(item["lr"], item["gt"])
    record = json.loads((out / "pseudo.json").read_text())
    assert sorted(record["names"]) == names and record["settings"]["size_px"] == SIZE
    # pseudo images smaller than the lens's sensor (e.g. the training crop size): the ideal lens is
    # shift-invariant, so their gt_blur is made on the crop itself
    small = make_pseudo_pairs(run_a[0], tmp_path / "small", progress=False,
                              settings=PseudoConfig(count=2, batch_size=2, size_px=SIZE // 2))
    item = PairedFolderDataset(small, "train")[0]
    assert item["lr"].shape == item["gt_blur"].shape == (3, SIZE // 2, SIZE // 2)
    # a user image folder, through the CLI
    images = tmp_path / "clean"
    write_png(images / "a photo.png", np.full((20, 30, 3), 0.5))
    write_png(images / "b.png", np.random.default_rng(0).uniform(size=(64, 80, 3)))
    (images / "notes.txt").write_text("not an image")
    assert cli_main(["pseudo", "--model", str(run_a[0]), "--images", str(images), "--out", str(tmp_path / "p2")]) == 0
    assert sorted(p.name for p in (tmp_path / "p2" / "lr_train").iterdir()) == ["pseudo_a_photo.png", "pseudo_b.png"]
    assert cli_main(["pseudo", "--model", str(run_a[0]), "--out", str(tmp_path / "p2")]) == 2     # exists
    assert cli_main(["pseudo", "--model", str(tmp_path), "--out", str(tmp_path / "p3")]) == 2     # not a run


def test_recipe_runs_stages_and_skips_finished_ones(dataset, tmp_path, psf_cache):
    recipe = tiny(dataset, steps=2, checkpoint_every=2, validate_every=2, val_images=1, grad_accum=1,
                  ema_decay=None, recipe={"stage1": {"steps": 3}, "pseudo": {"count": 2, "batch_size": 2},
                                          "stage2_init": "stage1"})
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "r"
    assert cli_main(["train", "--recipe", str(config), "--out", str(out), "--no-progress"]) == 0
    s1 = load_train_config(out / "stage1" / "config.yaml")
    s2 = load_train_config(out / "stage2" / "config.yaml")
    assert s1.path_probs.normalised() == (0, 0, 1) and s1.steps == 3 and s2.steps == 2
    assert s2.extra_data == (str(out / "pseudo"),) and s2.init_weights == str(out / "stage1")
    val1 = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val1[-1]["path"] == "negative"
    lines2 = [json.loads(x) for x in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["paths"]["negative"] + r["paths"]["positive"] + r["paths"]["neutral"]
               for r in lines2 if r["kind"] == "train") == 2 * 2
    record = json.loads((out / "recipe.json").read_text())
    assert record["stages"]["stage1"]["completed"] and record["pseudo"]["settings"]["count"] == 2
    assert record["alpha"] is None                # no validation split here: no recommended α
    stamp = {p: p.stat().st_mtime_ns for p in (out / "stage1" / "train_report.json", out / "pseudo" / "pseudo.json",
                                                out / "stage2" / "train_report.json")}
    assert cli_main(["train", "--recipe", str(config), "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_substitute_term_has_its_own_weight():
    """Without LPIPS weights the gradient-L1 substitute is weighted by ``substitute_weight`` (the
    LPIPS weight when unset) and a zero weight drops the term."""
    from dmdiff.metrics import lpips_status
    from dmdiff.train.config import LossConfig
    from dmdiff.train.losses import MultipathLoss, gradient_l1

    if lpips_status("vgg")[0]:
        pytest.skip("LPIPS-vgg weights are on disk: the substitute is not used")
    out, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mse = torch.nn.functional.mse_loss(out, target)
    for substitute_weight, expected in ((None, 5.0), (0.5, 0.5), (0.0, 0.0)):
        with pytest.warns(UserWarning, match="LPIPS is NOT being used"):
            loss = MultipathLoss(LossConfig(mse=2.0, lpips=5.0, substitute_weight=substitute_weight))
        total, terms = loss(out, target)
        assert torch.allclose(total, 2.0 * mse + expected * gradient_l1(out, target))
        assert ("gradient_l1" in terms) == (expected > 0)


def test_deconvolved_anchor_takes_the_datas_central_psf(dataset, tmp_path, psf_cache):
    """A model with anchor_rl_iterations trains with its data's central lens PSF (normalised) and
    its pipeline folder carries it."""
    from dmdiff.model.pipeline import DMDiffPipeline
    from dmdiff.optics.deconvolution import central_psf
    from dmdiff.optics.grid import psf_grid

    out = tmp_path / "run"
    train(load_train_config(tiny(dataset, steps=2, model={"anchor_sigma_px": 4.0, "anchor_rl_iterations": 3})),
          out, progress=False)
    psf = central_psf(psf_grid(SPEC, progress=False))
    expected = torch.from_numpy(psf / psf.sum(axis=(1, 2), keepdims=True)).float()
    loaded = DMDiffPipeline.from_pretrained(out / "pipeline").model
    assert torch.allclose(loaded.anchor_psf, expected)
    assert load_file(str(out / "pipeline" / "anchor_psf.safetensors"))["psf"].shape == (3, 15, 15)


def test_wiener_anchor_trains_with_the_datas_grid_and_whole_frame_anchors(dataset, tmp_path, psf_cache):
    """A model with anchor_wiener_nsr trains with its data's whole PSF grid (normalised; its pipeline
    carries it), and each training crop's anchor is the crop of its whole frame's anchor (flips
    alike), not the anchor of the crop itself."""
    from dmdiff.data.dataset import LensGrids, dataset_psf_grid
    from dmdiff.model.dmdiff import colour_anchor
    from dmdiff.model.pipeline import DMDiffPipeline
    from dmdiff.optics.deconvolution import check_psf_grid
    from dmdiff.train.data import frame_products

    model = {"anchor_sigma_px": 4.0, "anchor_wiener_nsr": 1e-3}
    cfg = load_train_config(tiny(dataset, steps=2, model=model))
    grid = dataset_psf_grid(dataset)[0]
    assert set(frame_products(cfg.model, dataset)) == {"anchor"}
    sets = [ds.with_frame_products(frame_products(cfg.model, ds.root)) for ds in open_train_sets(cfg)]
    whole = PairedFolderDataset(dataset, "train")[1]
    full = colour_anchor(whole["lr"][None], cfg.model, torch.from_numpy(check_psf_grid(grid)).float())[0]
    item = sets[0][1]
    matches = [torch.equal(item["anchor"], f[:, y:y + 32, x:x + 32]) for f in (full, full.flip(-1))
               for y in range(SIZE - 31) for x in range(SIZE - 31)
               if torch.equal(item["lr"], (whole["lr"] if f is full else whole["lr"].flip(-1))[:, y:y + 32, x:x + 32])]
    assert matches and all(matches)
    assert not torch.allclose(item["anchor"], colour_anchor(item["lr"][None], cfg.model,
                                                            torch.from_numpy(check_psf_grid(grid)).float())[0])
    batch = StepBatches(sets, cfg, 2)[0]
    assert batch["anchor"].shape == batch["input"].shape
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    loaded = DMDiffPipeline.from_pretrained(out / "pipeline").model
    assert torch.allclose(loaded.anchor_psf, torch.from_numpy(check_psf_grid(grid)).float())
    assert load_file(str(out / "pipeline" / "anchor_psf.safetensors"))["psf"].shape == (3, 3, 3, 15, 15)
    # evaluate / restore --lens anchor with the capture's lens: for the training lens, the stored PSF exactly
    stored = loaded.anchor_psf.clone()
    loaded.use_capture_lens(LensGrids.of_dataset(dataset)(whole["name"]))
    assert torch.equal(loaded.anchor_psf, stored)
    with pytest.raises(ConfigError, match="exposure_range cannot be combined"):
        load_train_config(tiny(dataset, model=model, exposure_range=[0.5, 2.0]))


def test_deconvolved_input_is_cut_from_whole_frames_for_the_paths_that_read_the_capture(dataset, tmp_path, psf_cache):
    """With input_wiener_nsr every positive or neutral sample's network input is the crop of its whole
    frame's deconvolved capture (not the raw crop, not the deconvolution of the crop), the negative
    path's the scene; the trained pipeline keeps the setting and restores from the deconvolved photo."""
    from dmdiff.data.dataset import dataset_psf_grid
    from dmdiff.model.dmdiff import network_input
    from dmdiff.model.pipeline import DMDiffPipeline
    from dmdiff.optics.deconvolution import check_psf_grid
    from dmdiff.train.data import frame_products

    model = {"anchor_sigma_px": 4.0, "anchor_wiener_nsr": 1e-3, "input_wiener_nsr": 3e-3}
    cfg = load_train_config(tiny(dataset, steps=2, model=model,
                                 path_probs={"positive": 1.0, "neutral": 1.0, "negative": 1.0}))
    grid = torch.from_numpy(check_psf_grid(dataset_psf_grid(dataset)[0])).float()
    assert set(frame_products(cfg.model, dataset)) == {"anchor", "lr_input"}
    sets = [ds.with_frame_products(frame_products(cfg.model, ds.root)) for ds in open_train_sets(cfg)]
    whole = PairedFolderDataset(dataset, "train")[1]
    full = network_input(whole["lr"][None], cfg.model, grid)[0]
    item = sets[0][1]
    matches = [torch.equal(item["lr_input"], f[:, y:y + 32, x:x + 32]) for f in (full, full.flip(-1))
               for y in range(SIZE - 31) for x in range(SIZE - 31)
               if torch.equal(item["lr"], (whole["lr"] if f is full else whole["lr"].flip(-1))[:, y:y + 32, x:x + 32])]
    assert matches and all(matches)
    assert not torch.allclose(item["lr_input"], network_input(item["lr"][None], cfg.model, grid)[0], atol=1e-4)
    batches, seen = StepBatches(sets, cfg, 6), set()
    for m in range(6):
        batch = batches[m]
        for i, slot in enumerate(batches.slots(m)):
            pair, path = batches.item(int(slot), batches.pair_index(int(slot))), PATHS[int(batch["path"][i])]
            assert torch.equal(batch["input"][i], pair["gt"] if path == "negative" else pair["lr_input"]), path
            seen.add(path)
    assert seen == set(PATHS)
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    loaded = DMDiffPipeline.from_pretrained(out / "pipeline").model
    assert loaded.config.input_wiener_nsr == 3e-3
    x = whole["lr"][None]
    assert torch.equal(loaded.restore_latents(x).z_positive, loaded.path_latents(full[None]).z_positive)


def test_loss_weights_by_path():
    """Each image gets its path's weights; a batch of one path (or of paths with equal weights) gets
    the batch formula of a single-weight loss, bit for bit."""
    from dmdiff.train.config import LossConfig
    from dmdiff.train.losses import MultipathLoss, gradient_l1

    base = LossConfig(mse=2.0, lpips=0.0)
    loss = MultipathLoss(base, by_path={"positive": base, "neutral": LossConfig(mse=4.0, lpips=0.0),
                                        "negative": base})
    out, target = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    plain = MultipathLoss(base)
    assert torch.equal(loss(out, target, ["positive", "negative", "positive"])[0], plain(out, target)[0])
    total, terms = loss(out, target, ["positive", "neutral", "positive"])
    per_image = (out - target).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(total, (torch.tensor([2.0, 4.0, 2.0]) * per_image).mean())
    assert torch.allclose(terms["mse"], per_image.mean())
    # a path without the perceptual term: the substitute (or LPIPS) is left out of its batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = MultipathLoss(LossConfig(), by_path={"neutral": LossConfig(lpips=0.0)})
    assert set(mixed(out, target, ["neutral"] * 3)[1]) == {"mse"}
    assert set(mixed(out, target, ["positive"] * 3)[1]) == {"mse", mixed.perceptual}
    if mixed.perceptual == "gradient_l1":
        total, _ = mixed(out, target, ["positive", "neutral", "neutral"])
        g = gradient_l1(out, target, per_sample=True)
        assert torch.allclose(gradient_l1(out, target), g.mean())
        assert torch.allclose(total, 2.0 * per_image.mean() + (torch.tensor([5.0, 0, 0]) * g).mean())


def test_spectral_term_compares_band_energies_not_phases():
    """The spectral term (loss_by_path.<path>.spectral): a white noise's band energies are its
    variance in every band; an image and its negative (same spectrum, every pixel wrong) score 0;
    a blurred copy scores above 0; only the paths that weight it compute and log it."""
    from dmdiff.train.config import LossConfig
    from dmdiff.train.losses import SPECTRAL_FLOOR, MultipathLoss, band_log_energy, spectral_log_l1

    gen = torch.Generator().manual_seed(0)
    noise = (0.1 * torch.randn(8, 1, 64, 64, generator=gen)).expand(8, 3, 64, 64)
    energies = band_log_energy(noise).exp() - SPECTRAL_FLOOR
    assert energies.shape == (8, 6)
    assert torch.allclose(energies.mean(dim=0), torch.full((6,), 0.01), rtol=0.15)
    image = torch.rand(2, 3, 64, 64, generator=gen)
    flipped = 1.0 - image
    assert float(spectral_log_l1(flipped, image)) < 1e-5 < float((flipped - image).abs().mean())
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    assert float(spectral_log_l1(blurred, image)) > 0.5
    base = LossConfig(mse=1.0, lpips=0.0)
    loss = MultipathLoss(base, by_path={"positive": LossConfig(mse=1.0, lpips=0.0, spectral=0.5)})
    assert set(loss(blurred, image, ["neutral"] * 2)[1]) == {"mse"}
    total, terms = loss(blurred, image, ["positive"] * 2)
    assert torch.allclose(total, terms["mse"] + 0.5 * terms["spectral"])
    mixed, _ = loss(blurred, image, ["positive", "neutral"])
    per_image = spectral_log_l1(blurred, image, per_sample=True)
    assert torch.allclose(mixed, (blurred - image).pow(2).mean() + 0.5 * per_image[0] / 2)


def test_spectral_weight_is_checked_by_path():
    from dmdiff.errors import ConfigError
    from dmdiff.train.config import TrainConfig

    cfg = TrainConfig(loss_by_path={"positive": {"spectral": -1.0}})
    with pytest.raises(ConfigError, match=r"loss_by_path\.positive\.spectral"):
        cfg.path_losses()
