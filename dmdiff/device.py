"""How torch runs: choosing the device from a user's ``--device`` value (with errors that say what to
do), CPU thread counts for a block, eval mode for a block, and wall-clock timing that waits for the
device."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from typing import Callable, Iterator, TypeVar

import torch

from dmdiff.errors import DmdiffError

__all__ = ["resolve_device", "torch_threads", "eval_mode", "synchronize", "timed", "release_freed_memory",
           "by_plane"]

T = TypeVar("T")


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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged); restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode; the sub-modules that were in training mode are
    put back in it after.

    Costs one walk over the sub-modules when all are in eval mode already (an inference model: a
    restore calls this a few times per image, and a backbone with LoRA has ~1500 sub-modules)."""
    training = [m for m in module.modules() if m.training]
    if training:
        module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Wall time (seconds) of ``fn()``, the device synchronised before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def release_freed_memory() -> None:
    """Give the memory freed by the C allocator back to the operating system (glibc's
    ``malloc_trim(0)``; nothing elsewhere). After a large photo's temporary arrays: glibc keeps freed
    heap memory resident, and the next phase's differently sized arrays land beside it, so the
    process's peak RSS grows by what it kept (0.23 GiB for a 2048² colour anchor)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def by_plane(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, large: bool) -> torch.Tensor:
    """``fn(x)`` for images ``x`` ``(..., H, W)``; when ``large``, ``fn`` of each ``(1, 1, H, W)``
    plane in turn, stacked back to ``(..., H', W')``: the temporary arrays of one plane at a time
    (a third for RGB) instead of the whole batch's, for large photos."""
    if not large or x.dim() < 3:
        return fn(x)
    planes = [fn(plane[None, None]) for plane in x.reshape(-1, *x.shape[-2:])]
    return torch.cat(planes).reshape(*x.shape[:-2], *planes[0].shape[-2:])
