"""Introspection helpers used by notebook 02: modulation strength and attention maps."""

import torch

from dmdiff.model.introspect import attention_maps, modulation_strength


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
