"""The training loss: ``mse · MSE + lpips · LPIPS (+ spectral · S)`` (docs/method.md), per path, with an
honest fallback; ``S`` (:func:`spectral_log_l1`, off unless weighted) compares power spectra by band.

Each path may have its own weights (``loss_by_path``; :meth:`~dmdiff.train.config.TrainConfig.path_losses`).
LPIPS uses the published weights only (:class:`dmdiff.metrics.LPIPSMetric` loads them; its network
is frozen here and gradients flow to the images). When they are absent, the LPIPS weight goes to
the configured substitute and a warning says that LPIPS is **not** being used; the logged term is
then named after the substitute (``gradient_l1``), never ``lpips``. The adversarial term of the
perceptual paths is :mod:`dmdiff.train.adversarial`'s.
"""

from __future__ import annotations

import functools
import warnings
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmdiff.errors import DmdiffError
from dmdiff.metrics import LPIPSMetric, lpips_status
from dmdiff.train.config import PATHS, LossConfig, TrainWarning


def gradient_l1(output: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of two ``(B, C, H, W)``
    images (an edge-fidelity term; not a perceptual metric). Scalar, or ``(B,)`` with ``per_sample``."""
    dx = (output[..., :, 1:] - output[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (output[..., 1:, :] - output[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    if per_sample:
        return 0.5 * (dx.abs().mean(dim=(1, 2, 3)) + dy.abs().mean(dim=(1, 2, 3)))
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


#: Edges (cycles/pixel) of the radial frequency bands of :func:`spectral_log_l1`: octaves up to a
#: quarter of the sampling rate, then half-octaves to the corners of the spectrum (√2/2).
SPECTRAL_BANDS_CPP = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 2 ** -1.5, 1 / 2, 2 ** -0.5)
#: The energy floor of :func:`spectral_log_l1` (power per frequency sample, images in [0, 1]): the
#: variance of 8-bit quantisation noise, (1/255)² / 12; band energies below it are not told apart.
SPECTRAL_FLOOR = (1 / 255) ** 2 / 12


@functools.lru_cache(maxsize=8)
def _band_geometry(h: int, w: int, device: torch.device,
                   edges: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The ``(h, w)`` Hann window, its energy ``Σ window²`` (a 0-d tensor) and the boolean ``(h, w)``
    masks of the FFT samples in each band of ``edges`` that holds any (computed once per crop size:
    every micro-batch of a run has the same)."""
    window = torch.outer(torch.hann_window(h, periodic=False, device=device),
                         torch.hann_window(w, periodic=False, device=device))
    radius = torch.hypot(*torch.meshgrid(torch.fft.fftfreq(h, device=device),
                                         torch.fft.fftfreq(w, device=device), indexing="ij"))
    masks = [(radius >= low) & (radius < high) for low, high in zip(edges[:-1], edges[1:])]
    return window, window.pow(2).sum(), [m for m in masks if bool(m.any())]


def band_log_energy(images: torch.Tensor, edges: Sequence[float] = SPECTRAL_BANDS_CPP) -> torch.Tensor:
    """``(B, N)`` log mean power of ``(B, C, H, W)`` images in ``N = len(edges) − 1`` radial frequency
    bands: the channel mean, its own mean removed, Hann-windowed (no leakage from the crop's edges),
    ``|FFT|² / Σ window²`` averaged over the frequency samples of each band (a white noise of variance
    v gives v in every band), plus :data:`SPECTRAL_FLOOR`, logged. Bands holding no sample of an
    image this small are left out, so N may be smaller."""
    gray = images.float().mean(dim=1)
    gray = gray - gray.mean(dim=(1, 2), keepdim=True)
    window, energy, masks = _band_geometry(*gray.shape[-2:], gray.device, tuple(edges))
    power = torch.fft.fft2(gray * window).abs().pow(2) / energy
    return torch.log(torch.stack([power[:, m].mean(dim=1) for m in masks], dim=1) + SPECTRAL_FLOOR)


def spectral_log_l1(output: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean absolute difference of two ``(B, C, H, W)`` images' log band energies
    (:func:`band_log_energy`): how far the output's power spectrum is from the target's in shape,
    whatever the phases (a Fourier-space loss in the spirit of Fuoli, Van Gool & Timofte, ICCV 2021:
    it asks for detail of the right amount at each scale, not at the right place). Scalar, or
    ``(B,)`` with ``per_sample``."""
    value = (band_log_energy(output) - band_log_energy(target)).abs().mean(dim=1)
    return value if per_sample else value.mean()


class MultipathLoss(nn.Module):
    """``loss(output, target, paths) -> (total, terms)`` for ``(B, 3, H, W)`` images in ``[0, 1]``.

    Each image is weighted by its path's weights (``by_path``; ``cfg``'s for paths not given and
    when ``paths`` is None). A micro-batch whose images share their weights (always with
    ``path_sampling: batch``) gets ``w_mse · MSE + w_p · P + w_s · S`` over the whole batch (S:
    :func:`spectral_log_l1`); one that mixes weights gets the batch mean of each image's weighted
    terms. ``terms`` maps each term's name (``mse``, ``lpips_vgg`` / ``gradient_l1``, ``spectral``)
    to its unweighted batch mean (detached scalars); the perceptual and spectral terms are left out
    of micro-batches whose paths all weight them 0. Computed in float32 whatever the autocast dtype.

    Attributes:
        perceptual: name of the perceptual term in use (``"lpips_vgg"``, ``"lpips_alex"``,
            ``"gradient_l1"``) or None (no path weights one).
        note: why LPIPS is not in use (empty when it is, or when its weights are 0).
        weights: ``path → (mse weight, perceptual weight, spectral weight)``, the perceptual one
            after the substitution.
    """

    def __init__(self, cfg: LossConfig, device: torch.device | str = "cpu",
                 by_path: Mapping[str, LossConfig] | None = None):
        super().__init__()
        configs = {None: cfg, **{p: (by_path or {}).get(p, cfg) for p in PATHS}}
        self.lpips = None
        self.perceptual, self.note = None, ""
        wanted = {k: c.lpips for k, c in configs.items()}
        if any(w > 0 for w in wanted.values()):
            available, reason = lpips_status(cfg.lpips_net)
            if available:
                try:
                    self.lpips = LPIPSMetric(cfg.lpips_net, device=device).model.requires_grad_(False)
                    self.perceptual = f"lpips_{cfg.lpips_net}"
                except DmdiffError as e:
                    reason = str(e)
            if self.lpips is None:
                keep = cfg.lpips_substitute == "gradient-l1"
                wanted = {k: c.substitute_weight_value() if keep and c.lpips > 0 else 0.0 for k, c in configs.items()}
                by = {p: wanted[p] for p in PATHS if wanted[p] != wanted[None]}
                weight = f"weight {wanted[None]}" + "".join(f"; {p}: {w}" for p, w in by.items())
                use = {"gradient-l1": f"a gradient-L1 edge loss instead ({weight})", "none": "no perceptual term"}
                self.note = (f"LPIPS is NOT being used in the training loss ({reason}); the loss uses "
                             f"{use[cfg.lpips_substitute]}")
                warnings.warn(self.note, TrainWarning, stacklevel=2)
                self.perceptual = "gradient_l1" if keep else None
        self.weights = {k: (c.mse, wanted[k] if self.perceptual is not None else 0.0, c.spectral)
                        for k, c in configs.items()}
        if all(w == 0 for _, w, _ in self.weights.values()):
            self.perceptual = None
        for key, (mse, perceptual, _) in self.weights.items():
            if mse == 0 and perceptual == 0:
                name = "loss" if key is None else f"loss_by_path.{key}"
                raise DmdiffError(f"the loss is empty: {name}.mse is 0 and the LPIPS term is off ("
                                  f"{self.note or 'its weight is 0'}); set {name}.mse > 0 or "
                                  "loss.lpips_substitute: gradient-l1")

    @property
    def term_names(self) -> tuple[str, ...]:
        """The names of the terms a micro-batch may report (``mse``, the perceptual term when any path
        weights it, ``spectral`` when any path weights it), in a fixed order."""
        spectral = ("spectral",) if any(w > 0 for _, _, w in self.weights.values()) else ()
        return ("mse",) + ((self.perceptual,) if self.perceptual else ()) + spectral

    def _perceptual(self, output: torch.Tensor, target: torch.Tensor, per_sample: bool) -> torch.Tensor:
        """The perceptual term: a scalar batch mean, or ``(B,)`` with ``per_sample``."""
        if self.lpips is not None:
            with torch.autocast(output.device.type, enabled=False):
                value = self.lpips(output, target, normalize=True)
            return value.flatten() if per_sample else value.mean()
        return gradient_l1(output, target, per_sample)

    def forward(self, output: torch.Tensor, target: torch.Tensor,
                paths: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output, target = output.float(), target.float()
        weights = [self.weights[p] for p in paths] if paths is not None else [self.weights[None]]
        if len(set(weights)) == 1:
            w_mse, w_perceptual, w_spectral = weights[0]
            terms = {"mse": F.mse_loss(output, target)}
            total = w_mse * terms["mse"]
            if self.perceptual is not None and w_perceptual > 0:
                terms[self.perceptual] = self._perceptual(output, target, per_sample=False)
                total = total + w_perceptual * terms[self.perceptual]
            if w_spectral > 0:
                terms["spectral"] = spectral_log_l1(output, target)
                total = total + w_spectral * terms["spectral"]
        else:
            w = torch.tensor(weights, dtype=torch.float32, device=output.device)      # (B, 3)
            mse = (output - target).pow(2).mean(dim=(1, 2, 3))
            terms = {"mse": mse.mean()}
            total = (w[:, 0] * mse).mean()
            if self.perceptual is not None and bool((w[:, 1] > 0).any()):
                value = self._perceptual(output, target, per_sample=True)
                terms[self.perceptual] = value.mean()
                total = total + (w[:, 1] * value).mean()
            if bool((w[:, 2] > 0).any()):
                value = spectral_log_l1(output, target, per_sample=True)
                terms["spectral"] = value.mean()
                total = total + (w[:, 2] * value).mean()
        return total, {k: v.detach() for k, v in terms.items()}
