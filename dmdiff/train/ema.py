"""Exponential moving average of the trained weights (float32 shadow copies)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn


class EMA:
    """``shadow ← decay · shadow + (1 − decay) · param`` after every optimizer step.

    Args:
        params: the trained parameters by name (``DMDiff.trainable_parameters()``).
        decay: e.g. 0.999 (an average over roughly ``1 / (1 − decay)`` steps).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: Mapping[str, nn.Parameter]) -> None:
        """One averaging step (call after ``optimizer.step()``)."""
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def load(self, shadow: Mapping[str, torch.Tensor]) -> None:
        """Replace the shadow weights (from a checkpoint); names and shapes must match."""
        if set(shadow) != set(self.shadow) or any(shadow[k].shape != v.shape for k, v in self.shadow.items()):
            raise ValueError("EMA weights do not fit the model's trained parameters")
        self.shadow = {k: shadow[k].float().to(v.device).clone() for k, v in self.shadow.items()}

    @contextlib.contextmanager
    def applied(self, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
        """Temporarily put the EMA weights into ``params`` (restored on exit)."""
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])
