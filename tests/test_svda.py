"""SVDA (dmdiff.model.svda): degradation features, any input size, attention, spatial modulation."""

import pytest
import torch
import torch.nn.functional as F

from dmdiff.model.lora import ModulationMLP
from dmdiff.model.svda import (
    FEATURE_CHANNELS,
    MAP_CHANNELS,
    SVDA,
    degradation_features,
    image_statistics,
    positional_encoding,
)

BLOCKS = {"vae": 6, "unet": 10}


def _maps(batch=2, grid=7, fwhm_px=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = 1 + torch.rand(batch, len(MAP_CHANNELS), grid, grid, generator=g) * fwhm_px
    maps[:, 6] = 0.01
    return maps


def _radial_maps(batch=2, grid=7):
    """PSF widths growing from 1 px on axis to 16 px in the corners, as for a metalens."""
    c = torch.linspace(-1, 1, grid)
    radius = (c[:, None] ** 2 + c[None, :] ** 2).sqrt() / 2 ** 0.5
    maps = (1 + 15 * radius).expand(batch, len(MAP_CHANNELS), grid, grid).clone()
    maps[:, 6] = 0.01
    return maps


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
@pytest.mark.parametrize("maps", ["none", "grid7", "grid5"])
def test_any_size_and_missing_maps(spatial, hw, maps):
    torch.manual_seed(0)
    svda = SVDA(BLOCKS, dim=32, heads=2, spatial=spatial)
    maps = {"none": None, "grid7": _maps(grid=7), "grid5": _maps(grid=5)}[maps]
    out = svda(torch.rand(2, 3, *hw), maps)
    cells = (7, 7) if spatial else ()
    for part, n in BLOCKS.items():
        assert out.embeddings[part].shape == (2, n, *cells, 32)
        assert torch.isfinite(out.embeddings[part]).all()
    assert out.features.shape == (2, len(FEATURE_CHANNELS), 7, 7)
    assert out.features[:, FEATURE_CHANNELS.index("maps_missing")].eq(float(maps is None)).all()


@pytest.mark.parametrize("spatial", [False, True])
def test_attention_weights_sum_to_one_with_documented_shape(spatial):
    svda = SVDA(BLOCKS, dim=32, heads=4, spatial=spatial)
    out = svda(torch.rand(3, 3, 48, 80), _maps(batch=3))
    for part, n in BLOCKS.items():
        att = out.attention[part]
        assert att.shape == ((3, 4, n, 49, 49) if spatial else (3, 4, n, 49))
        assert (att >= 0).all()
        torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))


def test_missing_maps_are_zeros_plus_indicator_and_change_the_embedding():
    image = torch.rand(2, 3, 64, 64)
    missing = degradation_features(image, None)
    present = degradation_features(image, _maps())
    n_maps = len(MAP_CHANNELS)
    assert missing[:, :n_maps].eq(0).all() and missing[:, n_maps].eq(1).all()
    assert present[:, n_maps].eq(0).all()
    torch.testing.assert_close(missing[:, n_maps + 1:], present[:, n_maps + 1:])   # same image statistics
    svda = SVDA(BLOCKS, dim=32, heads=2)
    assert not torch.allclose(svda(image, None).embeddings["unet"], svda(image, _maps()).embeddings["unet"])


def test_maps_on_another_grid_are_resampled_between_nodes():
    image = torch.rand(1, 3, 64, 64)
    constant = torch.full((1, 7, 3, 3), 4.0)
    torch.testing.assert_close(degradation_features(image, constant),
                               degradation_features(image, torch.full((1, 7, 7, 7), 4.0)))
    with pytest.raises(ValueError, match="MAP_CHANNELS"):
        degradation_features(image, torch.ones(1, 6, 7, 7))
    with pytest.raises(ValueError, match="smaller than"):
        degradation_features(torch.rand(1, 3, 5, 64))


def test_spatial_modulation_varies_across_cells_with_the_maps():
    """Flat image (identical statistics in every cell): the change of the per-cell modulation caused by
    radially varying PSF maps (vs uniform maps) differs from cell to cell, and follows the radius."""
    torch.manual_seed(0)
    svda = SVDA(BLOCKS, dim=32, heads=2, spatial=True)
    mlp = ModulationMLP(10, 32, rank=4, hidden=32)
    with torch.no_grad():
        mlp.w2.normal_(0, 0.1)                                    # as after training (it starts at M = I)
    image = torch.full((2, 3, 64, 96), 0.4)
    radial, uniform = _radial_maps(), torch.full((2, 7, 7, 7), 8.5)
    uniform[:, 6] = 0.01
    delta = mlp(svda(image, radial).embeddings["unet"]) - mlp(svda(image, uniform).embeddings["unet"])
    assert delta.shape == (2, 10, 4, 4, 7, 7)
    per_cell = delta.abs().mean(dim=(0, 1, 2, 3))                 # (7, 7)
    assert per_cell.std() > 0.2 * per_cell.mean()
    centre, corner = per_cell[3, 3], per_cell[0, 0]
    assert not torch.isclose(centre, corner, rtol=0.1)
    # the same module in global mode: one matrix per image
    svda.spatial = False
    assert mlp(svda(image, radial).embeddings["unet"]).shape == (2, 10, 4, 4)


def test_image_statistics_measure_noise_and_sharpness():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 140, 140), 0.5)
    noisy = flat + 0.02 * torch.randn(flat.shape, generator=g)
    stats = image_statistics(noisy)
    luma_sigma = 0.02 * (0.299 ** 2 + 0.587 ** 2 + 0.114 ** 2) ** 0.5
    assert abs(stats[0, 6].mean() / luma_sigma - 1) < 0.05          # 400 pixels a cell: ±8 % per cell
    assert (stats[0, 6] / luma_sigma - 1).abs().max() < 0.3
    torch.testing.assert_close(stats[0, 0], torch.full((7, 7), 0.5), atol=2e-3, rtol=0)

    texture = torch.rand(1, 3, 140, 140, generator=g)
    blurred = F.avg_pool2d(F.pad(texture, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    sharp, blur = image_statistics(texture), image_statistics(blurred)
    assert (blur[:, 2:6] < 0.2 * sharp[:, 2:6]).all()             # gradient and Laplacian energies drop


def test_positional_encoding_distinguishes_cells():
    pe = positional_encoding(7, 32)
    assert pe.shape == (49, 32)
    distances = torch.cdist(pe, pe) + torch.eye(49)
    assert distances.min() > 0.1
