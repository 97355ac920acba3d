"""Geometric self-ensemble (dmdiff.model.ensemble) and `dmdiff restore --self-ensemble`."""

import json

import numpy as np
import pytest
import torch
from conftest import perturb_trainable  # noqa: E402

from dmdiff.cli import main as cli
from dmdiff.imageio import read_image, write_png
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.ensemble import ORIENTATIONS, orient, self_ensemble, unorient
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.restore import REPORT_FILE


def _coordinates(h, w, grid=5):
    """An image (1, 3, h, w) whose R holds the column and G the row (scaled to [0, 1]), B a constant,
    and maps (1, 7, G, G) whose channels 0 / 1 hold the node's column / row the same way."""
    rows, cols = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = torch.stack([cols, rows, torch.full_like(rows, 0.5)])[None]
    node = torch.linspace(0, 1, grid)
    maps = torch.zeros(1, 7, grid, grid)
    maps[0, 0], maps[0, 1] = node[None, :].expand(grid, grid), node[:, None].expand(grid, grid)
    return image, maps


def test_orientations_are_the_eight_symmetries_and_invert_exactly():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)      # not square
    turned = [orient(x, k) for k in range(ORIENTATIONS)]
    assert torch.equal(turned[0], x)
    assert len({t.numpy().tobytes() + bytes(t.shape) for t in turned}) == ORIENTATIONS
    assert {tuple(t.shape[-2:]) for t in turned} == {(4, 5), (5, 4)}
    for k, t in enumerate(turned):
        assert torch.equal(unorient(t, k), x)
    with pytest.raises(ValueError, match="orientation"):
        orient(x, 8)


def test_maps_turn_with_the_image():
    image, maps = _coordinates(12, 20)
    seen = []

    def check(x, m):
        # wherever the image's R (column) grows, the maps' channel 0 grows the same way
        for img_channel, map_channel in ((0, 0), (1, 1)):
            grad = [torch.sign(x[0, img_channel, -1, -1] - x[0, img_channel, 0, -1]),
                    torch.sign(x[0, img_channel, -1, -1] - x[0, img_channel, -1, 0])]
            want = [torch.sign(m[0, map_channel, -1, -1] - m[0, map_channel, 0, -1]),
                    torch.sign(m[0, map_channel, -1, -1] - m[0, map_channel, -1, 0])]
            assert grad == want
        seen.append(tuple(x.shape[-2:]))
        return x * 0.5

    out = self_ensemble(check, image, maps)
    assert len(seen) == ORIENTATIONS and set(seen) == {(12, 20), (20, 12)}
    torch.testing.assert_close(out, image * 0.5)                  # an equivariant map is unchanged


def test_a_position_dependent_output_is_averaged_over_the_orientations():
    image, _ = _coordinates(8, 8)

    def add_left_edge(x, m):
        out = x.clone()
        out[..., :, 0] += 1.0                                     # a fixed-position artefact
        return out

    out = self_ensemble(add_left_edge, image)
    # the artefact lands on each of the 4 borders twice (of 8): 1/4 of its size, corners twice that
    excess = (out - image)[0, 0]
    assert torch.allclose(excess[3:5, 0], torch.full((2,), 0.25))
    assert torch.allclose(excess[0, 0], torch.tensor(0.5))
    assert excess[2:6, 2:6].abs().max() < 1e-6


@pytest.fixture(scope="module")
def model():
    return perturb_trainable(DMDiff(DMDiffConfig()), seed=5)


def test_restore_cli_self_ensemble_matches_the_package_call(model, tmp_path):
    pipeline_dir = DMDiffPipeline.from_model(model).save_pretrained(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    image = np.clip(rng.random((1, 1, 3)) * 0.6 + 0.2 + 0.05 * rng.standard_normal((40, 56, 3)), 0, 1)
    write_png(tmp_path / "in" / "scene.png", image, bits=16)
    out = tmp_path / "out"
    assert cli(["restore", "--model", str(pipeline_dir), "--input", str(tmp_path / "in"), "--out", str(out),
                "--self-ensemble", "--color-correct", "none", "--bits", "16", "--no-progress"]) == 0
    assert json.loads((out / REPORT_FILE).read_text())["self_ensemble"] is True
    x = torch.from_numpy(read_image(tmp_path / "in" / "scene.png").transpose(2, 0, 1))[None]
    want = self_ensemble(lambda t, m: model.restore(t, m, alpha=1.0), x)[0].permute(1, 2, 0).numpy()
    single = model.restore(x, alpha=1.0)[0].permute(1, 2, 0).numpy()
    got = read_image(out / "scene.png")
    assert got.shape == (40, 56, 3)
    assert np.abs(got - want).max() < 2e-4                        # 16-bit rounding
    assert np.abs(got - single).max() > 1e-3                      # the ensemble is not the single pass
