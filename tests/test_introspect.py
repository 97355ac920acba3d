"""Introspection helpers used by notebook 02: modulation strength, attention maps, and how the output
answers the optics maps (dmdiff.evaluation.map_response)."""

import numpy as np
import pytest
import torch
from conftest import perturb_trainable

from dmdiff.data.dataset import crop_maps
from dmdiff.evaluation.field import ZONES, field_angle_map, zone_gains, zone_masks
from dmdiff.evaluation.map_response import CAPTURE, MAPS_ZEROED, WITH_MAPS, field_scores, scaled_map_response
from dmdiff.evaluation.svda_probe import zone_crop_windows, zone_crops
from dmdiff.model.backbone import load_backbone
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.introspect import (
    attention_maps,
    attention_summary,
    block_modulation,
    cell_zone_fractions,
    modulation,
    modulation_distance,
    modulation_spread,
    modulation_strength,
    sensitivity,
    uniform_maps,
    zone_means,
)


def test_modulation_strength_is_zero_for_identity_and_scales():
    eye = torch.eye(4).expand(2, 3, 4, 4)
    assert torch.all(modulation_strength(eye) == 0)
    assert torch.allclose(modulation_strength(2 * eye), torch.ones(2, 3))   # ‖I‖/‖I‖
    spatial = eye[..., None, None].expand(2, 3, 4, 4, 5, 5).clone()
    spatial[0, 1, :, :, 2, 3] = 0                                             # M = 0 there: off
    strength = modulation_strength(spatial)
    assert strength.shape == (2, 3, 5, 5) and strength[0, 1, 2, 3] == 1 and strength.sum() == 1


def test_attention_maps_shapes_and_query_cell():
    g = 3
    weights = torch.softmax(torch.randn(1, 2, 4, g * g), -1)
    maps = attention_maps(weights, g)
    assert maps.shape == (4, g, g) and torch.allclose(maps.sum(dim=(1, 2)), torch.ones(4))
    spatial = torch.softmax(torch.randn(1, 2, 4, g * g, g * g), -1)
    assert torch.allclose(attention_maps(spatial, g, query_cell=0), spatial[0].mean(0)[:, 0].reshape(4, g, g))


def test_the_output_answers_the_maps_only_once_the_modulation_has_left_identity():
    """Untrained: M = I whatever the maps, so restoring with the maps scaled changes nothing, bit for
    bit. With modulation weights moved (as training does), zeroing the maps moves the output, and the
    zone rows and per-zone gains are computed over the field."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.2, 0.8, (32, 32, 3)).astype(np.float32)
    pair = {"name": "p", "gt": gt, "lr": np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1).astype(np.float32),
            "maps": rng.uniform(1, 4, (7, 3, 3)).astype(np.float32)}
    pair["maps"][6] = 0.01
    model = DMDiff(DMDiffConfig(grid_size=3), load_backbone("tiny", pretrained=False))
    fresh = scaled_map_response(model, pair, None, factors=(0.0, 2.0))
    assert list(fresh["rows"]) == [0.0, 1.0, 2.0]
    assert all(row["mean_abs_delta"] == 0 and row["psnr_change_db"] == 0 for row in fresh["rows"].values())
    x, maps = torch.from_numpy(pair["lr"]).permute(2, 0, 1)[None], torch.from_numpy(pair["maps"])[None]
    assert torch.all(block_modulation(model, x, maps) == 0)
    perturb_trainable(model, scale=0.1)
    assert block_modulation(model, x, maps).shape == (10,) and block_modulation(model, x, maps).min() > 0
    moved = scaled_map_response(model, pair, None, factors=(0.0,))
    assert moved["rows"][0.0]["mean_abs_delta"] > 1e-6 and set(moved["rows"][0.0]["zones"]) == set(ZONES)
    record = field_scores(model, [pair], None).record()
    gains = zone_gains(record, WITH_MAPS, CAPTURE)
    assert set(gains) == set(ZONES)
    assert gains["edge"] == record["means"][WITH_MAPS]["edge"]["psnr"] - record["means"][CAPTURE]["edge"]["psnr"]
    assert any(abs(v) > 0 for v in zone_gains(record, WITH_MAPS, MAPS_ZEROED).values())


# ---------------------------------------------------------------- the SVDA measurements (docs/svda.md)

HW = 48


def _zones(hw=HW):
    return {z: torch.as_tensor(m) for z, m in zone_masks(field_angle_map(hw, hw, None)).items()}


def test_modulation_spread_is_zero_for_a_constant_and_measures_the_rest():
    m = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    constant = m.expand(3, 2, 4, 4)
    assert torch.allclose(modulation_spread(constant), torch.zeros(3, 2), atol=1e-6)
    assert torch.allclose(modulation_distance(constant, constant + torch.eye(4)), torch.ones(3, 2))
    varied = constant.clone()
    varied[0, 1] += 0.5 * torch.eye(4)       # one sample of block 1 differs by half the identity
    spread = modulation_spread(varied)
    assert torch.all(spread[:, 0] < 1e-6) and torch.allclose(spread[:, 1], torch.tensor([1 / 3, 1 / 6, 1 / 6]))
    spatial = constant[..., None, None].expand(3, 2, 4, 4, 5, 5).clone()
    spatial[1, 0, :, :, 0, 0] += torch.eye(4)
    assert modulation_spread(spatial).shape == (3, 2, 5, 5) and modulation_spread(spatial)[1, 0, 0, 0] > 0.9


def test_cell_zone_fractions_split_every_cell_and_follow_the_field():
    g = 7
    fractions = cell_zone_fractions(_zones(), g)
    assert fractions.shape == (g, g, 3)
    assert torch.allclose(fractions.sum(-1), torch.ones(g, g, dtype=torch.float64))
    assert fractions[g // 2, g // 2, 0] == 1 and fractions[0, 0, 2] == 1       # centre cell, corner cell
    values = torch.zeros(g, g, dtype=torch.float64)
    values[g // 2, g // 2] = 1                              # only the centre cell: the centre zone sees it
    means = zone_means(values, fractions)
    in_cell = (torch.arange(HW) * g // HW == g // 2)
    pixels = values.new_zeros(HW, HW)
    pixels[in_cell[:, None] & in_cell[None, :]] = 1            # the same per-cell value, per pixel
    centre = _zones()["centre"]
    assert means.shape == (3,) and torch.isclose(means[0], pixels[centre].mean()) and means[1] == means[2] == 0
    assert torch.allclose(zone_means(torch.full((2, g, g), 5.0, dtype=torch.float64), fractions),
                          torch.full((2, 3), 5.0, dtype=torch.float64))


def test_attention_summary_uniform_and_one_cell():
    g = 7
    fractions = cell_zone_fractions(_zones(), g)
    uniform = torch.full((2, 4, 3, g * g), 1 / (g * g))
    summary = attention_summary(uniform, fractions)
    assert torch.allclose(summary["entropy"], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(summary["mass_per_area"], torch.ones(3, 3, dtype=torch.float64))
    corner = torch.zeros(2, 4, 3, g * g)
    corner[..., 0] = 1                                                         # every query on cell (0, 0)
    summary = attention_summary(corner, fractions)
    assert torch.allclose(summary["entropy"], torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(summary["mass"][:, 2], torch.ones(3, dtype=torch.float64))
    spatial = torch.full((1, 2, 3, g * g, g * g), 1 / (g * g))
    assert torch.allclose(attention_summary(spatial, fractions)["entropy"], torch.ones(3, dtype=torch.float64))


def test_uniform_maps_copy_one_node():
    maps = torch.rand(2, 7, 5, 5, generator=torch.Generator().manual_seed(1))
    centre = uniform_maps(maps, (2, 2))
    assert torch.equal(centre, maps[:, :, 2:3, 2:3].expand(2, 7, 5, 5)) and not torch.equal(centre, maps)


@pytest.fixture(scope="module")
def probe_model():
    """A random-init tiny DMDiff whose LoRA is trained-like (perturbed) but whose modulation MLPs
    still output exactly the identity (last layers zero)."""
    model = perturb_trainable(DMDiff(DMDiffConfig(seed=0), load_backbone("tiny", pretrained=False, seed=0)), 7)
    with torch.no_grad():
        for mlp in model.mlp.values():
            mlp.w2.zero_()
            mlp.b2.zero_()
    return model


def _probe_inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, HW, HW, generator=g)
    maps = torch.cat([1 + 10 * torch.rand(2, 6, 7, 7, generator=g), 0.02 * torch.rand(2, 1, 7, 7, generator=g)], 1)
    return image, maps


def test_identity_modulation_is_distance_zero_and_insensitive_then_not(probe_model):
    image, maps = _probe_inputs()
    _, matrices = modulation(probe_model, image, maps)
    assert all(float(modulation_strength(m).max()) == 0 for m in matrices.values())
    alternatives = {"none": None, "centre": uniform_maps(maps, (3, 3))}
    zones = _zones()
    flat = sensitivity(probe_model, image, maps, alternatives, zones, target=image.flip(-1))
    assert set(flat) == {"own", "none", "centre"} and set(flat["none"]) == set(zones)
    assert all(s["rms_change"] == 0 and s["psnr_change"] == 0 for alt in ("none", "centre") for s in flat[alt].values())
    with torch.no_grad():
        probe_model.mlp["unet"].w2.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    try:
        _, matrices = modulation(probe_model, image, maps)
        assert float(modulation_strength(matrices["unet"]).min()) > 0
        assert float(modulation_spread(matrices["unet"]).max()) > 0        # it now depends on the input
        moved = sensitivity(probe_model, image, maps, alternatives, zones, target=image.flip(-1))
        assert all(moved[alt][z]["rms_change"] > 0 and moved[alt][z]["relative_change"] > 0
                   for alt in ("none", "centre") for z in zones)
        assert all(np.isfinite(moved["own"][z]["psnr"]) and moved["own"][z]["psnr"] != flat["own"][z]["psnr"]
                   for z in zones)                                        # the own output changed too
    finally:
        with torch.no_grad():
            probe_model.mlp["unet"].w2.zero_()


def test_zone_crop_windows_sit_in_their_zones():
    H, W, c = 256, 256, 64
    field = field_angle_map(H, W, None)
    relative = field / field.max()
    windows = zone_crop_windows(H, W, c)
    for zone, (lo, hi) in {"centre": (0, 1 / 3), "mid": (1 / 3, 2 / 3), "edge": (2 / 3, 1)}.items():
        y0, x0, h, w = windows[zone]
        assert (h, w) == (c, c) and 0 <= y0 <= H - c and 0 <= x0 <= W - c
        centre = relative[y0 + c // 2, x0 + c // 2]
        assert lo <= centre <= hi, (zone, centre)


def test_zone_crops_carry_their_own_maps():
    g = torch.Generator().manual_seed(5)
    frames = {"lr": torch.rand(2, 3, 64, 64, generator=g), "gt": torch.rand(2, 3, 64, 64, generator=g),
              "maps": torch.rand(2, 7, 7, 7, generator=g)}
    crops = zone_crops(frames, 16)
    assert list(crops) == ["centre", "mid", "edge"]
    y0, x0, h, w = zone_crop_windows(64, 64, 16)["mid"]
    assert torch.equal(crops["mid"]["lr"], frames["lr"][..., y0:y0 + h, x0:x0 + w])
    expected = crop_maps(frames["maps"][1].numpy(), (64, 64), (y0, x0, h, w))
    assert np.allclose(crops["mid"]["maps"][1].numpy(), expected)
    assert not torch.allclose(crops["edge"]["maps"], crops["centre"]["maps"])   # other positions, other maps
