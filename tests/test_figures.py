"""Figures a student reads: the perception–distortion plane (dmdiff.viz.plot_perception_distortion) and
the gain maps over the field (dmdiff.evaluation.field.plot_gain_maps) — axes, labels and titles that do
not hide each other."""

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmdiff.evaluation.field import plot_gain_maps  # noqa: E402
from dmdiff.viz import plot_perception_distortion  # noqa: E402

# An α sweep shaped like notebook 04's on the default preset: PSNR rises then falls, NIQE turns back
# on itself, so labels of points far apart in α land close together on the plane.
ALPHAS = [round(0.1 * i, 1) for i in range(13)]
SWEEP = {"alpha": ALPHAS,
         "psnr": [25.04, 25.12, 25.19, 25.24, 25.27, 25.29, 25.30, 25.29, 25.27, 25.23, 25.18, 25.13, 25.06],
         "niqe_set": [18.82, 19.18, 19.45, 19.80, 19.89, 19.99, 19.98, 19.54, 19.16, 18.83, 18.34, 18.07, 17.70],
         "detail_ratio": [0.21, 0.25, 0.30, 0.35, 0.41, 0.47, 0.54, 0.62, 0.69, 0.77, 0.86, 0.95, 1.04]}


def _alpha_labels(ax):
    return [t for t in ax.texts if t.get_text().startswith("α=")]


@pytest.mark.parametrize("capture, inside", [({"psnr": 21.0, "niqe_set": 12.25, "detail_ratio": 0.10}, False),
                                             ({"psnr": 25.1, "niqe_set": 19.0, "detail_ratio": 0.5}, True)])
def test_the_axes_frame_the_sweep_and_say_where_the_capture_is(capture, inside):
    fig = plot_perception_distortion(SWEEP, 1.0, capture)
    axes = fig.axes[:2]
    for ax, key in zip(axes, ("niqe_set", "detail_ratio")):
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert x0 <= min(SWEEP["psnr"]) and max(SWEEP["psnr"]) <= x1
        assert y0 <= min(SWEEP[key]) and max(SWEEP[key]) <= y1
        assert x1 - x0 < 1.0                                          # the 0.26 dB curve fills the panel
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        stars = [line for line in ax.lines if line.get_marker() == "*" and len(line.get_xdata())]
        if inside:
            assert "capture" in legend and len(stars) == 1
        else:
            assert not stars and any("off the axes" in t and f"{capture['psnr']:.2f} dB" in t for t in legend)
    assert y0 <= 1.0 <= y1                                             # the scene's detail level is shown
    plt.close(fig)


def test_alpha_labels_name_every_point_and_do_not_overlap():
    fig = plot_perception_distortion(SWEEP, 1.0, None)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        labels = _alpha_labels(ax)
        named = set()
        for text in labels:
            first, _, last = text.get_text()[2:].partition("…")
            lo, hi = float(first), float(last or first)
            named |= {a for a in ALPHAS if lo - 1e-9 <= a <= hi + 1e-9}
        assert named == set(ALPHAS)
        boxes = [t.get_window_extent(renderer) for t in labels]
        overlaps = [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in
                    itertools.combinations(zip(labels, boxes), 2) if ba.overlaps(bb)]
        assert not overlaps
    assert np.isfinite(fig.axes[0].get_xlim()).all()
    plt.close(fig)


@pytest.mark.parametrize("columns", [1, 2, 12])
def test_the_gain_maps_title_colour_bar_and_panels_do_not_overlap(columns):
    rng = np.random.default_rng(0)
    methods = [f"method_{k}" for k in range(columns)]
    field = {"mse_grid": {m: rng.uniform(0.001, 0.01, (8, 8)).tolist() for m in ["input", *methods]},
             "relative_field": np.hypot(*np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32))).tolist()}
    fig = plot_gain_maps(field, methods, ["input"])
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == columns and len(bar) == 1
    for ax in panels:
        assert not title.overlaps(ax.title.get_window_extent(renderer))
        assert not title.overlaps(ax.get_window_extent(renderer))
        assert not bar[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    assert title.width <= fig.bbox.width                                # wrapped to the figure
    plt.close(fig)
