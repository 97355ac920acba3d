"""Choosing the torch device from a user's ``--device`` value, with errors that say what to do."""

from __future__ import annotations

import torch

from dmdiff.errors import DmdiffError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch device for ``name``: ``None`` → CUDA when available, else the CPU.

    Raises:
        DmdiffError: ``name`` is not a device torch knows (``"gpu"``, ``"cuda:x"``...), or names a
            CUDA device this machine does not have (no CUDA, or an index beyond the GPU count).
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DmdiffError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DmdiffError(f"--device {name}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DmdiffError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DmdiffError(f"--device {name}: Apple's MPS backend is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise DmdiffError(f"--device {name}: dmdiff runs on cpu, cuda or mps devices")
    return device
