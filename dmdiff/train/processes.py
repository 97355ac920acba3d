"""The processes of one training command: one, or several started by ``accelerate launch`` / ``torchrun``
(docs/scaling.md).

Every process runs the same command. Training itself (:func:`dmdiff.train.loop.train`) is collective:
each process trains its share of every global batch and DDP averages the gradients. Everything
else a command does — claiming a folder, simulating data, making pseudo pairs, choosing α, writing
records — is done by the main process alone while the others wait (:func:`on_main`), so no file
is written twice.

On a machine without CUDA the processes run on the CPU and talk over gloo. accelerate only does that
when told to (``ACCELERATE_USE_CPU``, which ``accelerate launch --cpu`` sets, but that launcher then
starts *one* process unless it is given an MPI host file); without it, processes started by
``torchrun`` or ``accelerate launch --multi_gpu`` on a CPU machine each trained alone into the same
folder. :func:`process_state` therefore asks for the CPU whenever there is no CUDA device.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from accelerate import PartialState

T = TypeVar("T")


def use_cpu() -> bool:
    """Whether accelerate must be told to run on the CPU (gloo between processes): no CUDA device."""
    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's state of this command's processes (set up once per process, then shared): the
    process count and index, the main process, the barrier."""
    return PartialState(cpu=use_cpu())


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn()`` on the main process while the others wait; returns its result there and None on
    the other processes. A single process just runs it. When ``fn`` raises on the main process the
    others stay waiting until the launcher stops them (``accelerate launch`` and ``torchrun`` stop
    all processes when one fails)."""
    state = process_state()
    result = fn() if state.is_main_process else None
    state.wait_for_everyone()
    return result
