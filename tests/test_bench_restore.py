"""``dmdiff bench restore``: the command at a small size (its figures are not tested, only its bookkeeping)."""

import torch

from dmdiff import cli
from dmdiff.bench import restore as bench


def test_command_prints_the_five_configurations(capsys):
    assert cli.main(["bench", "restore", "--images", "3", "--size", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| sequential") or line.startswith("| overlapped")]
    assert len(rows) == 5 and rows[0].startswith("| sequential, both paths | 1 | ") and "1.00× |" in rows[0]
    assert "| sequential | 1 | " in out
    assert "| overlapped, 1 compute thread | 1 | " in out
    assert f"| overlapped | {2 if torch.get_num_threads() >= 2 else 1} | " in out
    assert "overlapped vs sequential, both paths: " in out and "vs sequential at α = 1: " in out and "same images as the sequential run at the same thread count: True" in out


def test_bench_inputs_are_the_tiny_recipes_model(tmp_path):
    pipeline, photos = bench.make_inputs(tmp_path, images=2, size=24)
    assert sorted(p.name for p in photos.iterdir()) == ["photo_000.png", "photo_001.png"]
    assert (pipeline / "anchor_psf.safetensors").is_file()
    grid = bench.gaussian_psf_grid()
    assert grid.shape == (3, 7, 7, 63, 63) and abs(grid.sum(axis=(-2, -1)) - 1).max() < 1e-12
