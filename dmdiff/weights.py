"""Weights on disk: safetensors only, read after a check and written atomically.

Pickle files (``torch.save``, ``pickle.dump``) can run arbitrary code when loaded, so dmdiff never
loads one: files whose names say they hold pickles are refused by name (:data:`PICKLE_SUFFIXES`),
and a ``.safetensors`` file that holds pickle bytes is recognised by its first bytes and refused
before anything reads it (:func:`check_safetensors`). Files are written with the usual permissions
(safetensors' own ``save_file`` makes ``0600`` files whatever the umask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as numpy_safetensors_bytes
from safetensors.torch import load_file
from safetensors.torch import save as torch_safetensors_bytes

from dmdiff.errors import DmdiffError
from dmdiff.outputs import atomic_write_bytes

__all__ = ["PICKLE_SUFFIXES", "PICKLE_MAGIC", "PICKLE_HELP", "check_safetensors", "load_safetensors",
           "save_safetensors"]

# Files that hold pickles, refused by name and never opened: torch.save's .bin/.pt/.pth/.ckpt, pickle's
# .pkl/.pickle, joblib's and dill's own pickle-based formats, and .tar for torch's legacy .pth.tar
# checkpoints (a tar of pickles); nothing dmdiff writes or reads is a tar archive. .npy/.npz stay
# allowed: dmdiff reads them with allow_pickle=False.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill", ".tar")
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")   # how pickle (protocol >= 2) and torch.save's zip files start
PICKLE_HELP = ("dmdiff loads safetensors only, because unpickling can run arbitrary code. Convert such files "
               "once, in a trusted environment, with safetensors.torch.save_file(torch.load(path, "
               "weights_only=True), new_path), or get the model's .safetensors files instead.")


def check_safetensors(path: str | Path) -> Path:
    """``path`` if it is a complete safetensors file (header and size checked, no tensor read).

    Raises:
        DmdiffError: naming the file: unreadable, truncated or damaged, or not a safetensors file at
            all; pickle content (``torch.save``, ``pickle.dump``) is named as such and never unpickled.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt"):
            return path
    except OSError as err:
        raise DmdiffError(f"{path}: cannot be read ({err.strerror or err})") from err
    except SafetensorError as err:
        with path.open("rb") as f:
            head = f.read(4)
        if head.startswith(PICKLE_MAGIC):
            raise DmdiffError(f"{path} is not a safetensors file: it holds pickle data (as written by "
                              f"torch.save or pickle.dump), which is never unpickled. {PICKLE_HELP}") from err
        raise DmdiffError(f"{path} is not a readable safetensors file: truncated, damaged or of another format "
                          f"({err}). Copy it again from where it was made, or save the model again.") from err


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (name → tensor on ``device``), after :func:`check_safetensors`."""
    return load_file(str(check_safetensors(path)), device=str(device))


def save_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (name → torch tensor, or name → numpy array) as a safetensors file,
    atomically and with the usual permissions. The file is assembled in memory first. Returns the path."""
    encode = numpy_safetensors_bytes if any(isinstance(v, np.ndarray) for v in tensors.values()) \
        else torch_safetensors_bytes
    return atomic_write_bytes(path, encode(dict(tensors), metadata=dict(metadata) if metadata else None))
