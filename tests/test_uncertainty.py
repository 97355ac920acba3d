"""Paired differences with bootstrap intervals over source photos (dmdiff.evaluation.uncertainty)."""

import json

import numpy as np
import pytest

from dmdiff.cli import main as cli_main
from dmdiff.errors import DmdiffError
from dmdiff.evaluation.uncertainty import differences_table, format_differences, paired_bootstrap, pooled_differences

PHOTOS = ["a", "b", "c", "d", "e", "f"]


def frames(per_photo_effect, crops=4, frame_noise=0.05, seed=0):
    """Differences of ``crops`` frames per photo: the photo's effect plus a little frame noise."""
    rng = np.random.default_rng(seed)
    d = np.repeat(per_photo_effect, crops) + frame_noise * rng.standard_normal(len(per_photo_effect) * crops)
    return d, np.repeat(PHOTOS[:len(per_photo_effect)], crops)


def test_a_consistent_gain_excludes_zero_and_a_mixed_one_includes_it():
    gain, groups = frames([0.5, 0.6, 0.4, 0.55, 0.45, 0.5])
    record = paired_bootstrap(gain, groups)
    assert record["excludes_zero"] and 0.4 < record["low"] < record["mean"] < record["high"] < 0.6
    mixed, groups = frames([0.9, -0.8, 0.2, -0.3, 0.6, -0.5])
    record = paired_bootstrap(mixed, groups)
    assert not record["excludes_zero"] and record["low"] < 0 < record["high"]
    assert record["per_group"]["a"] == pytest.approx(0.9, abs=0.1) and record["groups"] == 6


def test_resampling_photos_is_wider_than_resampling_correlated_frames():
    """Frames of one photo share its effect: treating them as independent understates the spread."""
    d, groups = frames([0.9, -0.8, 0.2, -0.3, 0.6, -0.5], crops=8)
    by_photo, by_frame = paired_bootstrap(d, groups), paired_bootstrap(d, None)
    assert by_photo["high"] - by_photo["low"] > 2 * (by_frame["high"] - by_frame["low"])
    assert not by_photo["excludes_zero"] and by_photo["mean"] == pytest.approx(by_frame["mean"])   # same estimate


def test_the_bootstrap_is_deterministic_and_seeded():
    d, groups = frames([0.3, -0.1, 0.2, 0.0, 0.45, -0.2])
    assert paired_bootstrap(d, groups, seed=3) == paired_bootstrap(d, groups, seed=3)
    assert paired_bootstrap(d, groups, seed=3)["low"] != paired_bootstrap(d, groups, seed=4)["low"]


def test_one_photo_gives_no_interval_and_bad_input_a_clear_error():
    record = paired_bootstrap([0.1, 0.2], ["a", "a"])
    assert record["low"] is None and not record["excludes_zero"]
    with pytest.raises(DmdiffError, match="finite"):
        paired_bootstrap([0.1, float("nan")], ["a", "b"])
    with pytest.raises(DmdiffError, match="group labels"):
        paired_bootstrap([0.1, 0.2], ["a"])


def report(scores_a, scores_b, names, zone_edge=None):
    """A minimal metrics.json record with two methods' per-image PSNR (and an edge zone)."""
    per_image = [{"name": n, "methods": {"dmdiff_a1": {"psnr": a}, "other": {"psnr": b}}}
                 for n, a, b in zip(names, scores_a, scores_b)]
    field = {"per_image": {n: {"dmdiff_a1": {"edge": {"psnr": a}}, "other": {"edge": {"psnr": e}}}
                           for n, a, e in zip(names, scores_a, zone_edge or scores_b)}}
    return {"dataset": "nowhere", "methods": ["dmdiff_a1", "other"], "references": {"dmdiff_a1": "gt", "other": "gt"},
            "per_image": per_image, "field": field, "labels": {}}


def test_seeds_are_paired_by_image_averaged_and_reported_each():
    names = [f"{p}_{k:03d}" for p in PHOTOS[:3] for k in range(2)]
    base = np.linspace(20, 25, 6)
    seed0 = report(base, base + 1.0, names)
    seed1 = report(base, base + 0.0, names)
    row = pooled_differences([seed0, seed1], "other", "dmdiff_a1")
    assert row["mean"] == pytest.approx(0.5) and row["per_run"] == pytest.approx([1.0, 0.0])
    assert set(row["per_group"]) == {"a", "b", "c"}                 # photos read from the names
    edge = pooled_differences([seed0], "other", "dmdiff_a1", zone="edge")
    assert edge["mean"] == pytest.approx(1.0) and edge["zone"] == "edge"
    with pytest.raises(DmdiffError, match="same test images"):
        pooled_differences([seed0, report(base[:4], base[:4], names[:4])], "other", "dmdiff_a1")
    table = format_differences(differences_table([seed0, seed1], zones=(None, "edge")))
    assert "| other | all | +0.50 |" in table and "+1.00, +0.00" in table


def test_dmdiff_intervals_prints_the_pooled_table(tmp_path, capsys):
    names = [f"{p}_{k:03d}" for p in PHOTOS[:3] for k in range(2)]
    base = np.linspace(20, 25, 6)
    paths = []
    for seed, shift in enumerate((1.0, 0.5)):
        path = tmp_path / f"seed{seed}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(report(base, base + shift, names)))
        paths.append(str(path.parent))
    assert cli_main(["intervals", *paths]) == 0
    out = capsys.readouterr().out
    assert "| other | all | +0.75 | [+0.75, +0.75] | yes |" in out
    assert cli_main(["intervals", str(tmp_path / "missing.json")]) == 2
    assert cli_main(["intervals", "--split", "external", *paths]) == 2          # no external set in them
    assert "no external set" in capsys.readouterr().err
    for seed, shift in enumerate((-1.0, -2.0)):                                 # now an external set, labelled
        path = tmp_path / f"seed{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        record["labels"] = {"other": "the other method"}
        record["external"] = {k: v for k, v in report(base, base + shift, names).items() if k not in ("labels", "references")}
        path.write_text(json.dumps(record))
    assert cli_main(["intervals", "--split", "external", *paths]) == 0
    assert "| the other method | all | -1.50 | [-1.50, -1.50] | yes |" in capsys.readouterr().out
