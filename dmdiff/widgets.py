"""The tunable-decoder panel: move α and see the restoration change, live, in a notebook.

:func:`build_panel` restores one capture **once** (:meth:`DMDiff.restore
<dmdiff.model.dmdiff.DMDiff.restore>` with ``return_latents=True``: one VAE encoding, one UNet
call for both paths) and keeps the two x0 latents. Every α change then runs only
:meth:`DMDiff.decode <dmdiff.model.dmdiff.DMDiff.decode>` — the VAE decoder on
``(1 − α) · z_neutral + α · z_positive`` — bit-identical to a full restore at that α; changing the
view or the split position re-renders without decoding at all.

The panel is ipywidgets only (no matplotlib per update): images go to ``ipywidgets.Image`` as 8-bit
PNG bytes. Its state is plain numpy, so it is testable without a browser::

    panel = build_panel(model, capture, maps, gt)
    panel.widget                 # display this in JupyterLab
    panel.alpha.value = 0.3      # what dragging the slider does
    panel.restored               # (H, W, 3) float32 in [0, 1]: decode(latents, 0.3)
    panel.view_array             # (H, W', 3) uint8: the rendered view
    panel.metrics                # {"alpha": 0.3, "psnr": …, "ssim": …} (PSNR/SSIM only with a GT)

Views: ``"side by side"`` — capture | restored | ground truth (when given), separated by
:data:`GAP_PX` white columns; ``"split"`` — one ``(H, W)`` image, the capture left of the split
column and the restored image from it on (no marker line is drawn, so every pixel is one of the two).

Where the live widget cannot be drawn, ``panel.widget`` shows a still of its view instead of its
``repr``: JupyterLab draws a widget output (the ``application/vnd.jupyter.widget-view+json`` MIME
type) only in a *trusted* notebook, and a notebook executed elsewhere — e.g. by papermill in
``dmdiff repro`` — is not trusted until it is signed (``jupyter trust NOTEBOOK``) or its cells are
run again in JupyterLab. Its display bundle therefore also carries ``text/html`` (a PNG of the view
when it was displayed, with a note saying how to get the live panel), which JupyterLab renders,
sanitised, in untrusted notebooks too, as do nbconvert's HTML export and other viewers.
"""

from __future__ import annotations

import base64
import html
import time

import ipywidgets as widgets
import numpy as np

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.evaluation.tradeoff import model_of
from dmdiff.imageio import png_bytes, to_samples
from dmdiff.metrics import psnr, ssim
from dmdiff.model.dmdiff import ALPHA_RANGE, DMDiff, RestoreLatents, check_alpha
from dmdiff.model.pipeline import DMDiffPipeline, as_image, as_maps, to_numpy

#: The panel's views (the view selector's options).
VIEWS = ("side by side", "split")
#: White columns between the images of the side-by-side view, in pixels.
GAP_PX = 4
#: The α slider's step (any value in ``ALPHA_RANGE`` can still be set from code).
ALPHA_STEP = 0.05
#: Smaller images are shown enlarged by an integer factor to about this width (display pixels).
DISPLAY_PX = 512


def _contiguous(image) -> np.ndarray:
    """``(3, H, W)`` tensor → C-contiguous float32 ``(H, W, 3)`` (so metrics sum in a fixed order)."""
    return np.ascontiguousarray(to_numpy(image))


def _display_width(width_px: int) -> str:
    """Display width of an image ``width_px`` wide: enlarged by an integer factor up to ~DISPLAY_PX."""
    return str(width_px * max(1, DISPLAY_PX // max(width_px, 1)))


#: What the still of the panel says where the live widget is not drawn.
STILL_NOTE = ("a still of the α panel ({what}). The live panel needs a trusted notebook and a running kernel: "
              "run this cell in JupyterLab, or trust the saved notebook (`jupyter trust NOTEBOOK`, or "
              "'Trust Notebook' in JupyterLab's command palette) to see its saved state.")


class PanelBox(widgets.VBox):
    """The panel's top-level ``VBox``; its display bundle adds a still of the panel's current view.

    ``application/vnd.jupyter.widget-view+json`` (the live widget) is what JupyterLab draws in a trusted
    notebook; ``text/html`` (the readout, an inline PNG of the view as it was when displayed, and
    :data:`STILL_NOTE`) is what an untrusted notebook, nbconvert's HTML export or another viewer
    without the widget manager show instead of the ``VBox(children=…)`` repr; ``text/plain`` is the note.
    """

    def __init__(self, children, panel: TunableDecoderPanel):
        super().__init__(children)
        self._panel = panel

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        panel = self._panel
        if panel.view_array is None:
            return data
        png = base64.b64encode(png_bytes(panel.view_array)).decode("ascii")
        width = _display_width(panel.view_array.shape[1])
        what = f"{panel.name}, {panel.caption.value}"
        note = STILL_NOTE.format(what=what)
        readout = html.escape(panel.readout.value.replace("<b>", "").replace("</b>", ""))
        data["text/html"] = (f'<div><p><b>{html.escape(panel.name)}</b>: {readout}</p>'
                             f'<img src="data:image/png;base64,{png}" width="{width}" '
                             f'style="image-rendering: pixelated" alt="{html.escape(what, quote=True)}">'
                             f'<p><i>{html.escape(note)}</i></p></div>')
        data["text/plain"] = note
        return data


class TunableDecoderPanel:
    """An α slider over one capture's cached latents, with a view, per-path previews and metrics.

    Build it with :func:`build_panel`. Attributes (numpy images are ``(H, W, 3)`` float32 sRGB in
    ``[0, 1]`` unless said otherwise):

    Widgets:
        alpha: ``FloatSlider`` over ``ALPHA_RANGE`` (0 fidelity/neutral … 1 perceptual/positive …
            1.2), step :data:`ALPHA_STEP`, updates on release. Setting its ``value`` re-decodes;
            out-of-range values are clamped by the slider, NaN is refused (ConfigError, value reverted).
        view: ``ToggleButtons`` over :data:`VIEWS`.
        split: ``FloatSlider`` in ``[0, 1]``: the split column as a fraction of the width (split view).
        image: ``Image`` of the rendered view; caption: ``HTML`` naming its parts.
        readout: ``HTML`` with α, PSNR and SSIM against the GT ("no ground truth" without one) and
            the decode time.
        previews: ``{"capture", "neutral (α = 0)", "positive (α = 1)"[, "ground truth"]}`` → ``Image``.
        widget: the top-level ``VBox`` to display (a :class:`PanelBox`: a still of the view where the
            live widget is not drawn).

    State:
        model: the :class:`~dmdiff.model.dmdiff.DMDiff`; latents: its :class:`RestoreLatents` (batch 1).
        name: the capture's name (title).
        capture, gt (or None), neutral (decode at α = 0), positive (decode at α = 1).
        restored: ``decode(latents, alpha.value)``.
        view_array: the rendered view, ``(H, W', 3)`` uint8 (``W' = 2W + GAP_PX`` or
            ``3W + 2·GAP_PX`` side by side, ``W`` split).
        metrics: ``{"alpha"}`` plus, with a GT, ``"psnr"`` (dB, RGB) and ``"ssim"`` (RGB, Wang et al.
            settings) of ``restored`` against it (:func:`dmdiff.metrics.psnr` / :func:`~dmdiff.metrics.ssim`).
        capture_metrics: the capture's own ``{"psnr", "ssim"}`` against the GT (empty without one).
        restore_s: wall time of the one full restore (both paths), seconds.
        decode_s: wall time of the latest re-decode, seconds.
    """

    def __init__(self, model: DMDiff, latents: RestoreLatents, capture: np.ndarray, gt: np.ndarray | None,
                 name: str, alpha: float, restore_s: float):
        self.model, self.latents, self.name = model, latents, name
        self.capture, self.gt, self.restore_s = capture, gt, restore_s
        self.neutral, self.positive = self._decode(0.0), self._decode(1.0)
        self.capture_metrics = {} if gt is None else {"psnr": psnr(capture, gt), "ssim": ssim(capture, gt)}
        self.restored, self.metrics, self.view_array, self.decode_s = None, {}, None, float("nan")

        self.alpha = widgets.FloatSlider(value=alpha, min=ALPHA_RANGE[0], max=ALPHA_RANGE[1], step=ALPHA_STEP,
                                         description="α", continuous_update=False, readout_format=".2f")
        self.view = widgets.ToggleButtons(options=VIEWS, value=VIEWS[0], description="view")
        self.split = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="split",
                                         continuous_update=True, readout_format=".0%", disabled=True)
        self.caption = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.readout = widgets.HTML()
        shown = {"capture": capture, "neutral (α = 0)": self.neutral, "positive (α = 1)": self.positive}
        if gt is not None:
            shown["ground truth"] = gt
        self.previews = {label: widgets.Image(value=png_bytes(to_samples(img)), format="png",
                                              width=str(min(int(_display_width(img.shape[1])), 192)))
                         for label, img in shown.items()}
        preview_row = widgets.HBox([widgets.VBox([widgets.HTML(self._preview_label(label, img)), self.previews[label]])
                                    for label, img in shown.items()])
        h, w = capture.shape[:2]
        title = widgets.HTML(f"<b>{html.escape(name)}</b> — {w}×{h} px; α mixes the cached latents, only the VAE "
                             f"decoder runs (full restore: {1e3 * restore_s:.0f} ms)")
        self.widget = PanelBox([title, widgets.HBox([self.alpha, self.view, self.split]), self.readout,
                                self.caption, self.image, widgets.HTML("<b>per-path previews</b>"), preview_row], self)

        self.alpha.observe(self._on_alpha, names="value")
        self.view.observe(self._on_view, names="value")
        self.split.observe(lambda _: self._render(), names="value")
        self._update(self.alpha.value)

    # ------------------------------------------------------------------ actions

    def set_alpha(self, alpha: float) -> None:
        """Set α from code, refusing anything outside ``ALPHA_RANGE`` (ConfigError) instead of clamping."""
        self.alpha.value = check_alpha(alpha)

    # ------------------------------------------------------------------ internals

    def _decode(self, alpha: float) -> np.ndarray:
        return _contiguous(self.model.decode(self.latents, alpha)[0])

    def _preview_label(self, label: str, image: np.ndarray) -> str:
        if self.gt is None or label == "ground truth":
            return label
        return f"{label}<br>{psnr(image, self.gt):.2f} dB, SSIM {ssim(image, self.gt):.3f}"

    def _on_alpha(self, change) -> None:
        try:
            alpha = check_alpha(change["new"])
        except ConfigError:
            self.alpha.value = change["old"]
            raise
        self._update(alpha)

    def _on_view(self, change) -> None:
        self.split.disabled = change["new"] != "split"
        self._render()

    def _update(self, alpha: float) -> None:
        """Re-decode at ``alpha``, recompute the metrics, re-render."""
        start = time.perf_counter()
        self.restored = self._decode(alpha)
        self.decode_s = time.perf_counter() - start
        self.metrics = {"alpha": alpha}
        if self.gt is None:
            scores = "no ground truth"
        else:
            self.metrics.update(psnr=psnr(self.restored, self.gt), ssim=ssim(self.restored, self.gt))
            cap = self.capture_metrics
            scores = (f"PSNR <b>{self.metrics['psnr']:.2f} dB</b>, SSIM <b>{self.metrics['ssim']:.3f}</b> "
                      f"against the ground truth (capture: {cap['psnr']:.2f} dB, {cap['ssim']:.3f})")
        self.readout.value = f"α = {alpha:.2f}: {scores}; re-decoded in {1e3 * self.decode_s:.0f} ms"
        self._render()

    def _render(self) -> None:
        """Compose the current view into ``view_array`` and the main image (no decoding)."""
        alpha = self.metrics["alpha"]
        capture, restored = to_samples(self.capture), to_samples(self.restored)
        if self.view.value == "split":
            column = int(round(self.split.value * capture.shape[1]))
            view = restored.copy()
            view[:, :column] = capture[:, :column]
            caption = f"capture | restored (α = {alpha:.2f}), split at column {column}"
        else:
            parts, names = [capture, restored], ["capture", f"restored (α = {alpha:.2f})"]
            if self.gt is not None:
                parts.append(to_samples(self.gt))
                names.append("ground truth")
            gap = np.full((capture.shape[0], GAP_PX, 3), 255, np.uint8)
            view = np.concatenate([p for part in parts for p in (gap, part)][1:], axis=1)
            caption = " | ".join(names)
        self.view_array = view
        self.caption.value = caption
        self.image.width = _display_width(view.shape[1])
        self.image.value = png_bytes(view)


def build_panel(model_or_pipeline: DMDiff | DMDiffPipeline, capture, maps=None, gt=None, *,
                name: str | None = None, alpha: float = 1.0) -> TunableDecoderPanel:
    """Restore ``capture`` once and return its :class:`TunableDecoderPanel` (display ``panel.widget``).

    Args:
        model_or_pipeline: a :class:`~dmdiff.model.dmdiff.DMDiff` or a
            :class:`~dmdiff.model.pipeline.DMDiffPipeline` (its model is used).
        capture: one image as :class:`DMDiffPipeline` takes it — numpy ``(H, W, 3)`` / ``(H, W)``
            (uint8, uint16 or float in ``[0, 1]``), a tensor ``(3, H, W)`` (float in ``[0, 1]`` or
            uint8), or a PIL image.
        maps: its optics maps ``(7, G, G)`` (numpy or tensor, ``MAP_CHANNELS`` order) or None.
        gt: its ground truth, same forms and size as ``capture``, or None (no PSNR/SSIM then).
        name: a title (default ``"capture"``).
        alpha: the starting α, in ``ALPHA_RANGE``.

    Raises:
        ConfigError: ``alpha`` outside ``[0, 1.2]``.
        ImageInputError: an image or the maps cannot be used (the message says why).
        DmdiffError: not a model or pipeline; ``gt`` of another size than ``capture``.
    """
    model = model_of(model_or_pipeline)
    alpha = check_alpha(alpha)
    lr = as_image(capture)
    image_maps = as_maps(maps, 1)[0]
    reference = None
    if gt is not None:
        reference = _contiguous(as_image(gt))
        if reference.shape[:2] != tuple(lr.shape[1:]):
            raise DmdiffError(f"gt is {reference.shape[1]}×{reference.shape[0]} px but the capture is "
                              f"{lr.shape[2]}×{lr.shape[1]} px")
    start = time.perf_counter()
    _, latents = model.restore(lr[None], None if image_maps is None else image_maps[None], alpha=alpha,
                               return_latents=True)
    restore_s = time.perf_counter() - start
    return TunableDecoderPanel(model, latents, _contiguous(lr), reference, name or "capture", alpha, restore_s)
