"""The adversarial term of the perceptual paths: patch discriminators, hinge losses, R1.

:class:`Adversary` holds one :class:`PatchDiscriminator` per path of
:meth:`~dmdiff.train.config.TrainConfig.adversarial_paths` and one Adam optimizer over all of them.
In each training micro-batch (:func:`dmdiff.train.loop.train_step`):

1. :meth:`Adversary.generator_loss` adds ``weight · hinge_G(D(output))`` to the generator's loss
   (from ``start_step`` on). The discriminators run frozen here (``requires_grad`` off, eval mode:
   no power iteration), so the generator's backward gives them no gradient and changes none of
   their parameters or buffers;
2. :meth:`Adversary.discriminator_step` then trains them one step on the batch's targets (real)
   and ``output.detach()`` (fake): nothing reaches the generator's parameters or gradients.

Every discriminator computation runs in float32 (autocast off inside :meth:`PatchDiscriminator.forward`),
whatever the mixed precision of the generator. A discriminator takes one Adam step per micro-batch
that holds its path, outside accelerate's gradient accumulation and grad scaler (both belong to the
generator's optimizer: its float32 losses need no scaling). Under DDP each discriminator is wrapped by
``accelerator.prepare`` and every process joins every step in which any process has images of the
path (an image-less process contributes a zero loss), so the all-reduce of its gradients never waits;
each process weights its loss by its share of the path's images, so the averaged gradient is that of
the mean over all of them, as one process with the whole batch would compute it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dmdiff.errors import DmdiffError, RunFault
from dmdiff.train.config import AdversarialConfig

#: Adam's betas for the discriminators (DCGAN / pix2pix; a short memory suits a moving target).
BETAS = (0.5, 0.999)
#: Names of the logged terms (``metrics.jsonl``): the generator's hinge term (unweighted), the
#: discriminator's hinge loss, its mean logits on real and fake images, and the R1 penalty (weighted).
TERMS = ("adv_g", "adv_d", "d_real", "d_fake", "r1")


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of all elements, 0 for an empty tensor (a DDP process with no image of a path)."""
    return x.sum() / max(x.numel(), 1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss ``mean relu(1 − D(real)) + mean relu(1 + D(fake))`` (scalar)."""
    return _mean(F.relu(1 - real_logits)) + _mean(F.relu(1 + fake_logits))


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss ``−mean D(fake)`` (scalar)."""
    return -_mean(fake_logits)


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``mean over images of ‖∇ₓ mean D(x)‖²`` for the real images ``real`` ``(B, 3, H, W)`` (which must
    require grad) and their logits ``(B, 1, h, w)``; differentiable (scalar; 0 without images)."""
    if real.shape[0] == 0:
        return real.sum()
    (grad,) = torch.autograd.grad(real_logits.mean(dim=(1, 2, 3)).sum(), real, create_graph=True)
    return grad.pow(2).sum(dim=(1, 2, 3)).mean()


class PatchDiscriminator(nn.Module):
    """A PatchGAN critic: ``(B, 3, H, W)`` sRGB in ``[0, 1]`` → logits ``(B, 1, ⌈H/8⌉, ⌈W/8⌉)``.

    Three 4×4 stride-2 convolutions (``channels``, 2×, 4× wide) with LeakyReLU(0.2) and a 3×3
    convolution to one logit per patch (receptive field 38 px). Spectral norm on every convolution
    (no batch norm: batches are small and split over processes). Runs in float32 with autocast off.
    """

    def __init__(self, channels: int = 32):
        super().__init__()
        widths = [3, channels, 2 * channels, 4 * channels]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(widths[-1], 1, 3, padding=1)))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self.layers(images.float() * 2 - 1)


class Adversary:
    """The discriminators of the adversarial paths and their optimizer (see the module docstring).

    Args:
        cfg: the ``adversarial`` settings.
        paths: the paths that get a discriminator (:meth:`TrainConfig.adversarial_paths`).
        seed: seeds the discriminators' initialisation, drawn from a forked generator so that the
            global torch generator (and with it the rest of the run) is the same with and without them.
        accelerator: places the discriminators on its device and wraps them for DDP; None: CPU, as is.

    Attributes:
        nets: the discriminators by path (their ``state_dict`` is what checkpoints hold).
        optimizer: Adam over all of them (a step skips the ones without gradients).
    """

    def __init__(self, cfg: AdversarialConfig, paths: Sequence[str], seed: int, accelerator=None):
        self.cfg, self.paths, self.accelerator = cfg, tuple(paths), accelerator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.nets = nn.ModuleDict({p: PatchDiscriminator(cfg.channels) for p in self.paths})
        self.wrapped: dict[str, nn.Module] = (
            {p: accelerator.prepare(net) for p, net in self.nets.items()} if accelerator is not None
            else dict(self.nets.items()))
        self.optimizer = torch.optim.Adam(self.nets.parameters(), lr=cfg.lr, betas=BETAS)

    @property
    def term_names(self) -> tuple[str, ...]:
        """The terms this adversary logs (``r1`` only with an R1 penalty)."""
        return TERMS if self.cfg.r1_weight > 0 else TERMS[:-1]

    def generator_active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) gets the generator term (``step >= start_step``)."""
        return step >= self.cfg.start_step

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The discriminators as fixed functions: eval mode (spectral norm's power iteration does not
        advance) and ``requires_grad`` off, restored on exit."""
        self.nets.eval().requires_grad_(False)
        try:
            yield
        finally:
            self.nets.train().requires_grad_(True)

    def generator_loss(self, output: torch.Tensor, paths: Sequence[str]) -> tuple[torch.Tensor | None, dict]:
        """The generator's adversarial term for the outputs ``(B, 3, H, W)`` of one micro-batch whose
        images have the paths ``paths``.

        Returns:
            ``(term, terms)``: ``weight · Σ_p (n_p / B) · hinge_G(D_p(outputs of p))`` over the
            adversarial paths present (``n_p`` images of path p; an image's share of the batch loss,
            as the other terms' batch means give it), and ``{"adv_g": the unweighted hinge term over
            those images}`` (detached); ``(None, {})`` when no image has an adversarial path.
        """
        term, values, counts = None, [], []
        with self.frozen():
            for path in self.paths:
                index = [i for i, p in enumerate(paths) if p == path]
                if not index:
                    continue
                fake = output if len(index) == len(paths) else output[index]
                value = hinge_g_loss(self.nets[path](fake))   # unwrapped: no DDP hooks on a frozen net
                share = self.cfg.weight * (len(index) / len(paths)) * value
                term = share if term is None else term + share
                values.append(value.detach() * len(index))
                counts.append(len(index))
        if term is None:
            return None, {}
        return term, {"adv_g": sum(values) / sum(counts)}

    @property
    def _world(self) -> int:
        """The number of processes training together."""
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def _counts(self, paths: Sequence[str], device: torch.device) -> dict[str, tuple[int, int]]:
        """``path → (images here, images on all processes)`` for the adversarial paths."""
        local = torch.tensor([sum(p == path for p in paths) for path in self.paths], device=device)
        total = local
        if self._world > 1:
            total = self.accelerator.reduce(local.clone(), "sum")
        return {path: (int(n), int(t)) for path, n, t in zip(self.paths, local.tolist(), total.tolist())}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, paths: Sequence[str],
                           step: int) -> dict[str, torch.Tensor]:
        """One Adam step of the discriminators of the paths present in the micro-batch (on any
        process): ``hinge_D`` (+ ``r1_weight / 2 · R1``) on its targets ``real`` and detached outputs
        ``fake``, both ``(B, 3, H, W)``, images of other paths left out.

        Args:
            step: the optimizer step (1-based), for the error message.

        Returns:
            The detached terms ``adv_d``, ``d_real``, ``d_fake`` (and ``r1``), averaged over the
            paths with images on this process; empty when it has none.

        Raises:
            RunFault: the discriminator's loss is NaN or infinite.
        """
        fake = fake.detach()
        counts = self._counts(paths, real.device)
        loss, terms = None, []
        for path, (n, total) in counts.items():
            if total == 0:
                continue
            index = [i for i, p in enumerate(paths) if p == path]
            real_p = (real if n == len(paths) else real[index]).detach().float()
            fake_p = fake if n == len(paths) else fake[index]
            real_p.requires_grad_(self.cfg.r1_weight > 0)
            logits = self.wrapped[path](torch.cat([real_p, fake_p]))
            real_logits, fake_logits = logits[:n], logits[n:]
            value = hinge_d_loss(real_logits, fake_logits)
            path_terms = {"adv_d": value.detach(), "d_real": _mean(real_logits.detach()),
                          "d_fake": _mean(fake_logits.detach())}
            if self.cfg.r1_weight > 0:
                r1 = 0.5 * self.cfg.r1_weight * r1_penalty(real_logits, real_p)
                value = value + r1
                path_terms["r1"] = r1.detach()
            # DDP averages the processes' gradients; weighting each process's mean over its own n
            # images by world · n / total makes that average the gradient of the mean over all
            # `total` images, as one process with the whole batch computes it (exactly 1 there).
            value = value * (self._world * n / total) if self._world > 1 else value
            loss = value if loss is None else loss + value
            if n:
                terms.append(path_terms)
        if loss is None:
            return {}
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k} {float(v):.4g}" for t in terms for k, v in t.items())
            raise RunFault(f"step {step}: the discriminator's loss is {loss.item()} ({detail}). Lower "
                           "adversarial.lr or set adversarial.r1_weight > 0, and check the data for NaN or "
                           "infinite pixels; the run's earlier checkpoints are kept (--resume latest)")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]} if terms else {}

    def state_dict(self) -> dict:
        """``{"weights": name → tensor, "optimizer": Adam's state_dict}`` (weights named
        ``<path>.<parameter or buffer>``, spectral norm's power-iteration vectors included)."""
        return {"weights": self.nets.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping, where: str = "the checkpoint") -> None:
        """Inverse of :meth:`state_dict`.

        Raises:
            DmdiffError: naming ``where``, when the weights or the optimizer state do not fit these
                discriminators (other ``adversarial.paths`` or ``adversarial.channels``).
        """
        try:
            self.nets.load_state_dict(state["weights"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            detail = " ".join(str(e).split())[:300]
            raise DmdiffError(f"{where}: its discriminator does not fit adversarial.paths = {list(self.paths)}, "
                              f"adversarial.channels = {self.cfg.channels} ({detail}); was it written with other "
                              "adversarial settings?") from None
