"""Introspection helpers used by notebook 02: modulation strength, attention maps, and how the output
answers the optics maps (dmdiff.evaluation.map_response)."""

import numpy as np
import torch
from conftest import perturb_trainable

from dmdiff.evaluation.field import ZONES, zone_gains
from dmdiff.evaluation.map_response import CAPTURE, MAPS_ZEROED, WITH_MAPS, field_scores, scaled_map_response
from dmdiff.model.backbone import load_backbone
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.introspect import attention_maps, block_modulation, modulation_strength


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
