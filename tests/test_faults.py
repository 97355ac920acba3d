"""Bad input and faults, through the real command line as a user meets them (subprocesses).

Every case asserts the exit status of the convention (0 done, 1 some items failed, 2 bad usage or
input, 3 interrupted or faulted), that the message names the file, folder or key, that no
traceback is printed, and that a tree of the user's own files is byte-identical before and after.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dmdiff.imageio import write_png
from dmdiff.outputs import MANIFEST, PARTIAL_MARKER

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_FAULT = 0, 1, 2, 3


# ---- helpers -------------------------------------------------------------------------------------


def dmdiff(*args, cwd: Path, preexec=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m dmdiff.cli ARGS`` in ``cwd``; fail the test on any traceback."""
    result = subprocess.run([sys.executable, "-m", "dmdiff.cli", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, preexec_fn=preexec,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def start(*args, cwd: Path) -> subprocess.Popen:
    """Start ``dmdiff ARGS`` in the background (for kill tests)."""
    return subprocess.Popen([sys.executable, "-m", "dmdiff.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the process ended early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def tree_hash(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (folders as ``"<dir>"``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def user_tree(root: Path) -> Path:
    """A folder of the user's own files, some named like dataset parts."""
    (root / "thesis").mkdir(parents=True)
    (root / "thesis" / "c.tex").write_text("\\section{Results}")
    (root / "maps").mkdir()
    (root / "maps" / "mine.npy").write_bytes(b"not a dmdiff map")
    (root / "notes.txt").write_text("do not delete")
    write_png(root / "IMG_1.png", np.full((16, 16, 3), 0.25))
    return root


def photos(folder: Path, n: int = 3, size=(80, 88)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_png(folder / f"p{i}.png", np.random.default_rng(i).random((*size, 3)))
    return folder


def refuses(result: subprocess.CompletedProcess, *names: str, code: int = EXIT_USAGE) -> str:
    """Assert the exit status and that the message names each of ``names``; returns stderr."""
    assert result.returncode == code, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    for name in names:
        assert name in result.stderr, (name, result.stderr[-2000:])
    return result.stderr


# ---- shared inputs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory, psf_cache):
    """A working folder with a smoke dataset (``data``), an untrained pipeline (``model``), a short
    training config (``tiny.yaml``) and a finished two-step training run (``run``)."""
    root = tmp_path_factory.mktemp("faults")
    assert dmdiff("simulate", "--out", "data", "--smoke", cwd=root).returncode == 0
    from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
    from dmdiff.model.pipeline import DMDiffPipeline

    DMDiffPipeline.from_model(DMDiff(DMDiffConfig())).save_pretrained(root / "model")
    config = {"data": "data", "crop_px": 32, "batch_size": 2, "steps": 4, "lr": 1e-3, "checkpoint_every": 2,
              "validate_every": 2, "val_images": 1, "val_crop_px": 32, "log_every": 2, "threads": 1}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert dmdiff("train", "--config", "tiny.yaml", "--out", "run", "--no-progress", cwd=root).returncode == 0
    return root


@pytest.fixture
def case(work, tmp_path):
    """A fresh folder for one case, with links to the shared inputs and a user tree ``mine/`` that
    must come out of the case byte-identical."""
    for name in ("data", "model", "run", "tiny.yaml"):
        (tmp_path / name).symlink_to(work / name)
    user_tree(tmp_path / "mine")
    before = tree_hash(tmp_path / "mine")
    yield tmp_path
    assert tree_hash(tmp_path / "mine") == before, "the user's files changed"


# ---- 1, 2: user files are never deleted or replaced ---------------------------------------------------


def test_simulate_overwrite_never_replaces_a_user_folder(case):
    photos(case / "imgs")
    stderr = refuses(dmdiff("simulate", "--images", "imgs", "--out", "mine", "--smoke", "--overwrite", cwd=case),
                     "mine", "thesis/c.tex")
    assert "--overwrite" not in stderr   # never steers the user to force it


def test_simulate_overwrite_keeps_a_dataset_holding_user_files(case):
    photos(case / "imgs")
    assert dmdiff("simulate", "--images", "imgs", "--out", "ds", "--smoke", cwd=case).returncode == 0
    (case / "ds" / "maps" / "extra.npy").write_bytes(b"mine")
    refuses(dmdiff("simulate", "--images", "imgs", "--out", "ds", "--smoke", "--overwrite", cwd=case),
            "maps/extra.npy")
    assert (case / "ds" / "maps" / "extra.npy").read_bytes() == b"mine"
    (case / "ds" / "maps" / "extra.npy").unlink()
    assert dmdiff("simulate", "--images", "imgs", "--out", "ds", "--smoke", "--overwrite", cwd=case).returncode == 0


def test_restore_never_replaces_a_file_it_did_not_write(case):
    Image.open(case / "mine" / "IMG_1.png").convert("RGB").save(case / "mine" / "IMG_1.jpg")
    before = tree_hash(case / "mine")
    refuses(dmdiff("restore", "--model", "model", "--input", "mine/IMG_1.jpg", "--out", "mine", "--no-progress",
                   cwd=case), "IMG_1.png", "--overwrite")
    assert tree_hash(case / "mine") == before
    (case / "mine" / "IMG_1.jpg").unlink()   # the case fixture checks the rest


@pytest.mark.slow
def test_restore_replaces_only_its_own_unchanged_outputs(case):
    photos(case / "in")
    assert dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", cwd=case).returncode == 0
    assert dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", cwd=case).returncode == 0
    (case / "out" / "p1.png").write_bytes(b"edited by the user")
    refuses(dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", cwd=case), "p1.png")
    assert (case / "out" / "p1.png").read_bytes() == b"edited by the user"
    result = dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", "--overwrite", cwd=case)
    assert result.returncode == 0 and (case / "out" / "p1.png").read_bytes() != b"edited by the user"
    (case / "own").mkdir()
    (case / "own" / "restore.json").write_text("{}")     # another program's report
    refuses(dmdiff("restore", "--model", "model", "--input", "in", "--out", "own", "--no-progress", cwd=case),
            "own/restore.json")
    assert (case / "own" / "restore.json").read_text() == "{}"


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "model", "--data", "data", "--out", "mine"],
    ["pseudo", "--model", "run", "--out", "mine", "--overwrite"],
    ["train", "--config", "tiny.yaml", "--out", "mine"],
    ["train", "--recipe", "tiny.yaml", "--out", "mine"],
    ["repro", "--smoke", "--until", "00", "--out", "mine"],
    ["pretrain-backbone", "--smoke", "--out", "mine", "--overwrite"],
], ids=["evaluate", "pseudo", "train", "recipe", "repro", "pretrain-backbone"])
def test_commands_refuse_an_output_folder_holding_user_files(case, command):
    stderr = refuses(dmdiff(*command, cwd=case), "mine")
    assert "notes.txt" in stderr or "thesis" in stderr or "IMG_1.png" in stderr


def bomb_png16(path: Path, side: int = 15000) -> Path:
    """A few hundred bytes declaring a 16-bit RGB PNG of side × side pixels (truncated data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(60000))))
    return path


# (the pixel bomb through `dmdiff simulate` under a 5 GB address-space limit:
#  tests/test_imageio.py::test_simulate_skips_an_oversized_image_and_goes_on; bombs in folders: below)


# ---- 5: ordinary mistakes -------------------------------------------------------------------------------


def test_unwritable_output_is_a_clear_error(case):
    photos(case / "in")
    (case / "afile").write_text("x")
    refuses(dmdiff("restore", "--model", "model", "--input", "in", "--out", "afile/sub", "--no-progress", cwd=case),
            "afile")
    refuses(dmdiff("simulate", "--images", "in", "--out", "afile/sub", "--smoke", cwd=case), "afile")
    refuses(dmdiff("train", "--config", "tiny.yaml", "--out", "afile/run", "--no-progress", cwd=case), "afile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "bogus"])
def test_devices_that_are_not_there(case, device):
    photos(case / "in", n=1)
    refuses(dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--device", device, cwd=case),
            f"--device {device}")
    refuses(dmdiff("evaluate", "--model", "model", "--data", "data", "--out", "ev", "--device", device, cwd=case),
            f"--device {device}")
    assert not (case / "out").exists() and not (case / "ev").exists()


@pytest.mark.parametrize("param, name", [("seed=abc", "seed"), ("sede=1", "sede"), ("seed=-1", "seed")])
def test_repro_parameters_are_checked(case, param, name):
    refuses(dmdiff("repro", "--smoke", "--out", "study", "-p", param, cwd=case), name)
    assert not (case / "study").exists()


def test_exit_status_convention_is_documented():
    from dmdiff.cli import build_parser

    text = build_parser().format_help()
    assert "exit status" in text and "1 some items failed" in text and "3 interrupted or faulted" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "exit status" in readme.lower()


# ---- 6: configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, key", [
    ({"loss": {"mse": float("nan")}}, "loss.mse"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"path_probs": {"positive": float("nan")}}, "path_probs.positive"),
])
def test_configs_that_cannot_work_name_the_key(case, change, key):
    config = yaml.safe_load((case / "tiny.yaml").read_text()) | change
    (case / "bad.yaml").write_text(yaml.safe_dump(config))
    refuses(dmdiff("train", "--config", "bad.yaml", "--out", "r", "--no-progress", cwd=case), key)
    assert not (case / "r").exists()


def test_yaml_exponent_floats_load_as_numbers(case):
    (case / "e.yaml").write_text((case / "tiny.yaml").read_text().replace("lr: 0.001", "lr: 1e-3")
                                 .replace("steps: 4", "steps: 1"))
    assert "lr: 1e-3" in (case / "e.yaml").read_text()
    assert dmdiff("train", "--config", "e.yaml", "--out", "r", "--no-progress", cwd=case).returncode == 0
    assert yaml.safe_load((case / "r" / "config.yaml").read_text())["lr"] == 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_on_a_cpu_is_refused(case):
    (case / "fp16.yaml").write_text((case / "tiny.yaml").read_text() + "mixed_precision: fp16\n")
    refuses(dmdiff("train", "--config", "fp16.yaml", "--out", "r", "--no-progress", cwd=case), "mixed_precision")


def test_non_finite_loss_names_the_step(case):
    (case / "nan.yaml").write_text((case / "tiny.yaml").read_text().replace("lr: 0.001", "lr: 1.0e+30"))
    stderr = refuses(dmdiff("train", "--config", "nan.yaml", "--out", "r", "--no-progress", cwd=case),
                     "step ", "learning rate", code=EXIT_FAULT)
    assert "nan" in stderr or "inf" in stderr


def test_nan_optics_maps_name_the_file(case):
    shutil.copytree(case / "data", case / "d2", symlinks=False)
    test_image = json.loads((case / "d2" / "lens.json").read_text())["splits"]["test"][0]
    name = case / "d2" / "maps" / f"{test_image}.npy"
    maps = np.load(name)
    maps[0, 0, 0] = np.nan
    np.save(name, maps)
    refuses(dmdiff("evaluate", "--model", "model", "--data", "d2", "--out", "ev", cwd=case), name.name)


def test_evaluate_without_lens_json_warns_that_the_baselines_cannot_run(case):
    shutil.copytree(case / "data", case / "d2", symlinks=False)
    (case / "d2" / "lens.json").unlink()
    result = dmdiff("evaluate", "--model", "model", "--data", "d2", "--out", "ev", "--limit", "1", "--no-progress",
                    cwd=case)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning" in result.stderr and "baselines cannot run" in result.stderr


# ---- disk full, interruptions -------------------------------------------------------------------------------


def test_disk_full_while_training_leaves_no_partial_checkpoint(case):
    """A 1 MB file-size limit lets the config and logs through but fails the first checkpoint
    (as a full disk does); the run stops with status 3, nothing half-written, and resumes later."""
    limit = 1_000_000
    result = dmdiff("train", "--config", "tiny.yaml", "--out", "r", "--no-progress", cwd=case,
                    preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    refuses(result, "checkpoint", "--resume latest", code=EXIT_FAULT)
    assert not [p.name for p in (case / "r").iterdir() if "partial" in p.name]
    result = dmdiff("train", "--config", "tiny.yaml", "--out", "r", "--no-progress", "--resume", "latest", cwd=case)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sigterm_stops_simulate_with_status_3_and_nothing_left(case):
    proc = start("simulate", "--out", "ds", "--smoke", cwd=case)
    wait_for(lambda: any(case.glob(".ds.partial-*/gt_train/*.png")), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_FAULT
    assert "interrupted" in proc.stderr.read().decode()
    assert sorted(p.name for p in case.iterdir() if p.name.startswith(".ds")) == []


def test_killed_simulate_is_cleaned_up_by_the_next_run(case):
    proc = start("simulate", "--out", "ds", "--smoke", cwd=case)
    wait_for(lambda: any(case.glob(".ds.partial-*/gt_train/*.png")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(case.glob(".ds.partial-*"))
    assert len(left) == 1 and (left[0] / PARTIAL_MARKER).is_file()
    (case / ".ds.partial-foreign").mkdir()          # no marker: not ours, left alone
    result = dmdiff("simulate", "--out", "ds", "--smoke", cwd=case)
    assert result.returncode == 0 and "removed 1 unfinished folder" in result.stderr
    assert not left[0].exists() and (case / ".ds.partial-foreign").is_dir()
    assert (case / "ds" / MANIFEST).is_file()


def test_killed_training_resumes_from_its_checkpoint(case):
    proc = start("train", "--config", "tiny.yaml", "--out", "r", "--no-progress", cwd=case)
    wait_for(lambda: (case / "r" / "checkpoint-2").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = dmdiff("train", "--config", "tiny.yaml", "--out", "r", "--no-progress", "--resume", "latest", cwd=case)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(str(case / "r" / "pipeline" / "dmdiff_trainable.safetensors"))
    b = load_file(str(case / "run" / "pipeline" / "dmdiff_trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_folder_restore_resumes(case):
    photos(case / "in", n=4)
    proc = start("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", cwd=case)
    wait_for(lambda: (case / "out" / "p0.png").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", "--resume", cwd=case)
    assert result.returncode == 0 and "done by an earlier run, skipped" in result.stdout, result.stdout
    assert dmdiff("restore", "--model", "model", "--input", "in", "--out", "whole", "--no-progress", cwd=case).returncode == 0
    assert tree_hash(case / "out").keys() == tree_hash(case / "whole").keys()
    for name in (f"p{i}.png" for i in range(4)):
        assert (case / "out" / name).read_bytes() == (case / "whole" / name).read_bytes()


@pytest.mark.slow
def test_killed_repro_resumes_after_the_finished_notebooks(case):
    proc = start("repro", "--smoke", "--until", "01", "--out", "study", cwd=case)

    def first_done() -> bool:
        try:
            steps = json.loads((case / "study" / "manifest.json").read_text())["steps"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(steps) and steps[0]["status"] == "ok"

    wait_for(first_done, proc, seconds=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = dmdiff("repro", "--smoke", "--until", "01", "--out", "study", "--resume", cwd=case, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    steps = json.loads((case / "study" / "manifest.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["skipped (resumed)", "ok"]


# ---- odd and broken inputs ---------------------------------------------------------------------------------


def odd_images(folder: Path) -> tuple[list[str], list[str]]:
    """Images of every odd mode and size, and broken files; returns (good names, bad names)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((24, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("1").save(folder / "bilevel.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(rgb).convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rgb).save(folder / "tall.bmp")
    write_png(folder / "wide16.png", rng.random((9, 70, 3)), bits=16)
    good = ["bilevel", "palette", "gray_alpha", "cmyk", "gray16", "tall", "wide16"]
    (folder / "random.png").write_bytes(rng.bytes(3000))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.png").write_bytes((folder / "wide16.png").read_bytes()[:60])
    (folder / "pgm_text.pgm").write_text("P2\n3 3\n255\n1 2")
    write_png(folder / "tiny.png", rng.random((3, 3, 3)))      # below the SVDA grid
    bomb_png16(folder / "bomb.png")
    return good, ["random", "empty", "truncated", "pgm_text", "tiny", "bomb"]


def test_restore_folder_of_odd_and_broken_images(case):
    good, bad = odd_images(case / "in")
    result = dmdiff("restore", "--model", "model", "--input", "in", "--out", "out", "--no-progress", cwd=case)
    stderr = refuses(result, *(f"{n}." for n in bad), code=EXIT_PARTIAL)
    assert "failed" in stderr
    assert sorted(p.stem for p in (case / "out").glob("*.png")) == sorted(good)


def test_simulate_lists_unreadable_inputs_in_lens_json(case):
    good, bad = odd_images(case / "in")
    result = dmdiff("simulate", "--images", "in", "--out", "ds", "--smoke", cwd=case)
    refuses(result, "random.png", "bomb.png", code=EXIT_PARTIAL)
    skipped = {s["file"] for s in json.loads((case / "ds" / "lens.json").read_text())["skipped"]}
    assert {"random.png", "empty.jpg", "truncated.png", "bomb.png", "tiny.png"} <= skipped


# ---- 7: permissions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(case, umask, file_mode, dir_mode):
    def with_umask():
        os.umask(umask)

    cache = case / "cache"
    env = {"DMDIFF_CACHE": str(cache)}
    assert dmdiff("simulate", "--out", "ds", "--smoke", cwd=case, preexec=with_umask, env=env).returncode == 0
    assert dmdiff("train", "--config", "tiny.yaml", "--out", "r", "--no-progress", cwd=case, preexec=with_umask,
                  env=env).returncode == 0
    files = [case / "ds" / "lens.json", *(case / "ds" / "maps").iterdir(), *cache.glob("*.safetensors"),
             *(case / "r").glob("checkpoint-*/*.safetensors"), *(case / "r" / "pipeline").rglob("*.safetensors")]
    assert len([f for f in files if f.suffix == ".safetensors"]) >= 6
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(file_mode) for f in files}
    for folder in (case / "ds", case / "ds" / "maps", case / "r", case / "r" / "pipeline"):
        assert oct(folder.stat().st_mode & 0o777) == oct(dir_mode), folder
