"""The training loss: ``mse · MSE + lpips · LPIPS`` (docs/method.md), with an honest fallback.

LPIPS uses the published weights only (:class:`dmdiff.metrics.LPIPSMetric` loads them; its network
is frozen here and gradients flow to the images). When they are absent, the LPIPS weight goes to
the configured substitute and a warning says that LPIPS is **not** being used; the logged term is
then named after the substitute (``gradient_l1``), never ``lpips``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dmdiff.errors import DmdiffError
from dmdiff.metrics import LPIPSMetric, lpips_status
from dmdiff.train.config import LossConfig, TrainWarning


def gradient_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of two ``(B, C, H, W)``
    images (an edge-fidelity term; not a perceptual metric). Scalar."""
    dx = (output[..., :, 1:] - output[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (output[..., 1:, :] - output[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


class MultipathLoss(nn.Module):
    """``loss(output, target) -> (total, terms)`` for ``(B, 3, H, W)`` images in ``[0, 1]``.

    ``terms`` maps each weighted term's name (``mse``, ``lpips_vgg`` / ``gradient_l1``) to its
    unweighted value (detached scalars). Computed in float32 whatever the autocast dtype.

    Attributes:
        perceptual: name of the perceptual term in use (``"lpips_vgg"``, ``"lpips_alex"``,
            ``"gradient_l1"``) or None.
        note: why LPIPS is not in use (empty when it is, or when its weight is 0).
    """

    def __init__(self, cfg: LossConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.mse_weight, self.perceptual_weight = cfg.mse, cfg.lpips
        self.lpips = None
        self.perceptual, self.note = None, ""
        if cfg.lpips > 0:
            available, reason = lpips_status(cfg.lpips_net)
            if available:
                try:
                    self.lpips = LPIPSMetric(cfg.lpips_net, device=device).model.requires_grad_(False)
                    self.perceptual = f"lpips_{cfg.lpips_net}"
                except DmdiffError as e:
                    reason = str(e)
            if self.lpips is None:
                self.perceptual_weight = cfg.substitute_weight_value()
                use = {"gradient-l1": f"a gradient-L1 edge loss instead (weight {self.perceptual_weight})",
                       "none": "no perceptual term"}
                self.note = (f"LPIPS is NOT being used in the training loss ({reason}); the loss uses "
                             f"{use[cfg.lpips_substitute]}")
                warnings.warn(self.note, TrainWarning, stacklevel=2)
                self.perceptual = "gradient_l1" if cfg.lpips_substitute == "gradient-l1" else None
        if self.perceptual is not None and self.perceptual_weight == 0:
            self.perceptual = None
        if self.perceptual is None and self.mse_weight == 0:
            raise DmdiffError("the loss is empty: loss.mse is 0 and the LPIPS term is off (" + self.note + "); "
                              "set loss.mse > 0 or loss.lpips_substitute: gradient-l1")

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output, target = output.float(), target.float()
        terms = {"mse": F.mse_loss(output, target)}
        total = self.mse_weight * terms["mse"]
        if self.perceptual is not None:
            if self.lpips is not None:
                with torch.autocast(output.device.type, enabled=False):
                    value = self.lpips(output, target, normalize=True).mean()
            else:
                value = gradient_l1(output, target)
            terms[self.perceptual] = value
            total = total + self.perceptual_weight * value
        return total, {k: v.detach() for k, v in terms.items()}
