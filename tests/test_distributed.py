"""`dmdiff train` as two processes under `accelerate launch` (gloo on the CPU, docs/scaling.md): the
same weights as one process with the same global batch, files written once, exact resume, and the
recipe with an ablation."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train import same_weights, tiny, weights, write_dataset  # noqa: E402

from dmdiff.train import checkpoint as ckpt_io  # noqa: E402
from dmdiff.train.config import load_train_config  # noqa: E402
from dmdiff.train.loop import train  # noqa: E402

pytestmark = pytest.mark.slow          # each launch starts two Python processes (~20 s on 2 cores)

ROOT = Path(__file__).resolve().parents[1]
#: Two processes cannot give one process's weights bit for bit: each sums the gradients of its own
#: images and gloo averages the two sums, where one process adds all images in one go (the same terms
#: in another order, ~1e-7 relative). Adam then divides every gradient by its running scale, so for
#: the few weights whose gradient is near zero such rounding moves the update by a sizeable part of
#: lr (1e-3) and later steps carry it on; measured 4.5e-6 after 4 steps of this config (2026-12-06),
#: 3.6e-7 without the adversarial term. 5e-5 leaves room for other CPUs' kernels and stays 40x
#: below what the last two steps change.
WEIGHT_ATOL = 5e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` two processes of ``python -m dmdiff.cli ARGS`` on the CPU (gloo; CUDA
    hidden), with this checkout first on PYTHONPATH; returns the finished process (output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "dmdiff.cli", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def per_process(**changes) -> dict:
    """The tiny config of test_train at 2 images per process (2 processes: a global batch of 4), with
    grad accumulation, per-image paths, EMA and the adversarial term from step 2."""
    return {"batch_size": 2, "grad_accum": 2, "steps": 4, "threads": 1,
            "adversarial": {"weight": 0.05, "start_step": 1}, **changes}


def write_config(path: Path, data: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(tiny(data, **per_process(**changes))))
    return path


def train_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dist-data") / "data")


@pytest.fixture(scope="module")
def two(dataset, tmp_path_factory):
    """A 4-step run as two processes: (run folder, the launcher's output)."""
    folder = tmp_path_factory.mktemp("two")
    config = write_config(folder / "c.yaml", dataset)
    done = launch("train", "--config", str(config), "--out", "run", "--no-progress", cwd=folder)
    return folder / "run", done


def test_two_processes_match_one_with_the_same_global_batch(two, dataset, tmp_path):
    run2, _ = two
    run1 = tmp_path / "one"
    train(load_train_config(tiny(dataset, **per_process(batch_size=4))), run1, progress=False)
    w1, w2 = weights(run1), weights(run2)                                # RUN/pipeline: the EMA weights
    raw1, raw2, before = (load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))
                          for run, step in ((run1, 4), (run2, 4), (run1, 2)))
    assert w1.keys() == w2.keys() and raw1.keys() == raw2.keys()
    diff = max(max((a[k] - b[k]).abs().max().item() for k in a) for a, b in ((w1, w2), (raw1, raw2)))
    moved = max((raw1[k] - before[k]).abs().max().item() for k in raw1)  # what steps 3 and 4 changed
    print(f"two processes vs one: max |Δw| = {diff:.3g} (steps 3-4 moved weights by up to {moved:.3g})")
    assert diff <= WEIGHT_ATOL < moved
    lines1, lines2 = train_lines(run1), train_lines(run2)
    assert [r["paths"] for r in lines1] == [r["paths"] for r in lines2]      # the same images, paths
    for a, b in zip(lines1, lines2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["adv_d"] == pytest.approx(a["adv_d"], rel=1e-4)
    report = json.loads((run2 / "train_report.json").read_text())
    assert report["processes"] == 2 and report["device"].startswith("cpu")


def test_files_are_written_once_by_the_main_process(two):
    run, done = two
    assert done.stdout.count("dmdiff train: 4 steps") == 1               # one summary line, not one per process
    assert sorted(p.name for p in run.iterdir()) == [".dmdiff-output.json", "checkpoint-2", "checkpoint-4",
                                                     "config.yaml", "metrics.jsonl", "pipeline", "run.json",
                                                     "train_report.json"]
    assert "resumes" not in json.loads((run / "run.json").read_text())   # written once, not rewritten
    assert [r["step"] for r in train_lines(run)] == [2, 4]                # each record once
    for step in (2, 4):
        folder = run / f"checkpoint-{step}"
        state = json.loads((folder / ckpt_io.STATE).read_text())
        assert state["world_size"] == 2 and state["samples_seen"] == step * 2 * 2 * 2
        assert sorted(p.name for p in folder.iterdir()) == sorted(state["files"]) + [ckpt_io.STATE]
        assert {f"rng-{rank}{suffix}" for rank in (0, 1) for suffix in (".json", ".safetensors")} <= set(state["files"])


def test_resume_latest_under_two_processes_is_exact(two, dataset, tmp_path):
    """2 steps, then `--resume latest` to 4 steps, both as two processes, equals the 4-step run."""
    write_config(tmp_path / "c2.yaml", dataset, steps=2)
    write_config(tmp_path / "c4.yaml", dataset)
    launch("train", "--config", "c2.yaml", "--out", "run", "--no-progress", cwd=tmp_path)
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "run")] == [2]
    launch("train", "--config", "c4.yaml", "--out", "run", "--resume", "latest", "--no-progress", cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "train_report.json").read_text())["resumed_from_step"] == 2
    assert same_weights(two[0], tmp_path / "run")
    strip = [{k: v for k, v in r.items() if k != "step_time_s"} for r in train_lines(two[0])]
    assert [{k: v for k, v in r.items() if k != "step_time_s"} for r in train_lines(tmp_path / "run")] == strip


def test_recipe_and_an_ablation_under_two_processes(dataset, tmp_path):
    recipe = tiny(dataset, steps=2, checkpoint_every=2, validate_every=2, val_images=1, grad_accum=1, batch_size=1,
                  ema_decay=None, threads=1, recipe={"stage1": {"steps": 2}, "pseudo": {"count": 2, "batch_size": 2}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = launch("train", "--recipe", "recipe.yaml", "--ablations", "no_svda", "--out", "r", "--no-progress",
                  cwd=tmp_path)
    out = tmp_path / "r"
    record = json.loads((out / "recipe.json").read_text())
    assert all(record["stages"][s]["processes"] == 2 and record["stages"][s]["completed"] for s in ("stage1", "stage2"))
    assert record["pseudo"]["settings"]["count"] == 2
    assert sorted(p.name for p in (out / "pseudo" / "gt_train").iterdir()) == sorted(
        f"{name}.png" for name in json.loads((out / "pseudo" / "pseudo.json").read_text())["names"])
    ablations = json.loads((out / "ablations" / "ablations.json").read_text())["ablations"]
    assert list(ablations) == ["no_svda"] and ablations["no_svda"]["report"]["processes"] == 2
    assert done.stdout.count("dmdiff train: ablation no_svda") == 1
    assert not [p for p in out.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
