"""``dmdiff bench``: benchmarks that print ratios against a baseline run in the same process
(:mod:`~dmdiff.bench.optics`: the PSF grid and the spatially varying blur against deepinv;
:mod:`~dmdiff.bench.model`: restore latency and memory, the α re-decode, SD-Turbo's UNet;
:mod:`~dmdiff.bench.gpu`: the SD-Turbo-scale check of a CUDA machine)."""

from __future__ import annotations

import argparse

from dmdiff.bench import gpu, model, optics, restore

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dmdiff bench optics|model|gpu``: each benchmark's arguments and entry point."""
    which = parser.add_subparsers(dest="which", required=True)
    for name, module, help_text in (
            ("optics", optics, "PSF-grid build time; spatially varying blur vs deepinv"),
            ("model", model, "DMDiff restore latency/memory (tiny, CPU), α re-decode ratio, sd-turbo-shape UNet "
                             "call; the fp16 GPU restore when CUDA is there"),
            ("gpu", gpu, "SD-Turbo-scale check of a CUDA machine into one JSON: fp16 restores (512², tiled "
                         "2048²), training steps with and without gradient checkpointing; exits cleanly without CUDA"),
            ("restore", restore, "a folder restore (20 photos of 256²): sequential vs overlapped reading, "
                                 "restoring and writing")):
        sub = which.add_parser(name, help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.main)
