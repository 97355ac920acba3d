"""``dmdiff bench gpu``: the one-command check of a CUDA machine at SD-Turbo scale, into one JSON.

On a CUDA machine it measures, each part in a fresh process (so one part's cached allocations do not
hide the next one's), with ``sd-turbo-shape`` (SD-Turbo's architecture, random weights: nothing is
downloaded):

- ``restore_512``: a 512² restore in fp16 in one piece (:func:`dmdiff.bench.model.restore_benchmark`:
  latency, α re-decode, time by stage, peak allocated memory);
- ``restore_2048_tiled``: a 2048² restore in fp16 in 512-px tiles (timed once);
- ``train_512``: :func:`dmdiff.train.loop.train` with ``configs/sd-turbo.yaml`` (bf16 autocast, its
  batch size) on 512² crops of a small synthetic dataset, a few steps, with and without gradient
  checkpointing: the median step time after the first step and the peak allocated memory, and the
  memory checkpointing saves.

The JSON (``--out``, written atomically after each part, so a part that fails or runs out of time
leaves the others) holds ``format``, ``cuda``, the device, torch and package versions and each
part's figures (an ``error`` entry where a part failed, e.g. out of memory). Without CUDA the command
prints that it has nothing to measure, writes ``{"cuda": false, "reason": ...}`` when ``--out`` is
given, and exits with status 0: the check is for GPU machines, and a CPU machine running it is not
an error. :func:`train_benchmark` runs on the CPU too (docs/scaling.md measures the memory of the
switches with it at a small size).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dmdiff.bench.model import PeakMemory, in_fresh_process, restore_benchmark
from dmdiff.config import CONFIGS
from dmdiff.errors import DmdiffError
from dmdiff.imageio import write_png
from dmdiff.outputs import write_json, write_npy
from dmdiff.runinfo import provenance
from dmdiff.runs import REPORT
from dmdiff.train.config import load_train_config
from dmdiff.train.loop import train

FORMAT = "dmdiff-bench-gpu"
PRESET = "sd-turbo-shape"
RESTORE_PX, TILED_PX, TILE_PX = 512, 2048, 512
NO_CUDA = "CUDA is not available on this machine (torch.cuda.is_available() is False): nothing to measure"


def synthetic_dataset(root: Path, size: int, pairs: int, grid: int, seed: int = 0) -> Path:
    """A dataset folder of ``pairs`` random smooth ``size²`` training pairs (GT, a blurred noisy LR,
    gt_blur, degradation maps ``(7, grid, grid)``): data for timing, not for learning. Returns ``root``."""
    rng = np.random.default_rng(seed)
    coarse = max(size // 16, 1)
    for i in range(pairs):
        name = f"bench_{i:02d}"
        small = rng.uniform(size=(coarse, coarse, 3)).astype(np.float32)
        gt = np.kron(small, np.ones((size // coarse + 1, size // coarse + 1, 1), np.float32))[:size, :size]
        lr = np.clip(0.8 * gt + 0.1 + rng.normal(0, 0.02, gt.shape), 0, 1).astype(np.float32)
        for folder, image in (("gt_train", gt), ("lr_train", lr), ("gt_blur_train", gt)):
            write_png(root / folder / f"{name}.png", image)
        maps = np.concatenate([rng.uniform(1, 3, (6, grid, grid)), rng.uniform(0, 0.02, (1, grid, grid))])
        write_npy(root / "maps" / f"{name}.npy", maps.astype(np.float32))
    return root


def train_benchmark(device: str, size: int, steps: int, gradient_checkpointing: bool,
                    mixed_precision: str | None = None, batch_size: int | None = None, threads: int | None = None,
                    preset: str = PRESET) -> dict:
    """Train ``steps`` steps of ``configs/sd-turbo.yaml`` with ``preset`` on ``size²`` crops of a
    synthetic dataset on ``device`` (``"cuda"`` or ``"cpu"``; run it in a fresh process), no
    validation, one checkpoint at the end.

    Args:
        mixed_precision, batch_size: override the config's (None: ``bf16`` and 4 as shipped).
        threads: CPU torch threads (None: torch's default).

    Returns:
        ``{"step_s", "first_step_s", "wall_s", "peak_bytes", "device", "batch_size", "mixed_precision",
        "gradient_checkpointing", "size", "steps"}``: the median seconds per step after the first
        (with ``steps`` = 1: the first), the first step's and the whole run's seconds (model build
        included), the peak memory of the run above the memory before it (bytes; CUDA: allocated,
        CPU: resident set size) and the device trained on.
    """
    cfg = load_train_config(CONFIGS / "sd-turbo.yaml")
    cfg = replace(cfg, crop_px=size, steps=steps, grad_accum=1, warmup_steps=0, log_every=1, val_images=0,
                  checkpoint_every=steps, num_workers=0, threads=threads, gradient_checkpointing=gradient_checkpointing,
                  mixed_precision=mixed_precision or cfg.mixed_precision, batch_size=batch_size or cfg.batch_size,
                  model=replace(cfg.model, preset=preset, model_path=None))
    with tempfile.TemporaryDirectory(prefix="dmdiff-bench-gpu-") as tmp:
        cfg = replace(cfg, data=str(synthetic_dataset(Path(tmp) / "data", size, cfg.batch_size, cfg.model.grid_size)))
        with PeakMemory(torch.device(device)) as memory:
            started = time.perf_counter()
            train(cfg.validate(), Path(tmp) / "run", progress=False, command="dmdiff bench gpu")
            wall = time.perf_counter() - started
        times = [r["step_time_s"] for r in map(json.loads, (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines())
                 if r.get("kind") == "train"]
        device_name = json.loads((Path(tmp) / "run" / REPORT).read_text())["device"]
    return {"step_s": float(np.median(times[1:] or times)), "first_step_s": times[0], "wall_s": wall,
            "peak_bytes": memory.bytes, "batch_size": cfg.batch_size, "mixed_precision": cfg.mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "size": size, "steps": steps, "device": device_name}


def _part(record: dict, name: str, out: Path | None, fn, *args) -> None:
    """Run one measurement in a fresh process into ``record[name]`` (its error message when it
    fails), print it and rewrite ``out``."""
    started = time.perf_counter()
    try:
        record[name] = in_fresh_process(fn, *args)
    except Exception as e:  # noqa: BLE001 -- one part's failure (e.g. out of memory) must not lose the others
        record[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
    print(f"dmdiff bench gpu: {name} ({time.perf_counter() - started:.0f} s): {record[name]}", flush=True)
    if out is not None:
        write_json(out, record)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this benchmark."""
    parser.add_argument("--out", default=None, help="write the results to this JSON file (atomically)")
    parser.add_argument("--train-steps", type=int, default=4,
                        help="training steps per measurement (the first is warm-up; default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training images per step (default: configs/sd-turbo.yaml's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed 512² restores (the median is kept)")


def main(args: argparse.Namespace) -> int:
    """Run the check (``args.out``, ``args.train_steps``, ``args.batch_size``, ``args.repeats``)."""
    if args.train_steps < 1 or args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise DmdiffError(f"--train-steps, --repeats and --batch-size must be at least 1, got {args.train_steps}, "
                          f"{args.repeats} and {args.batch_size}")
    out = Path(args.out) if args.out else None
    record = {"format": FORMAT, "cuda": torch.cuda.is_available(), "preset": PRESET,
              "provenance": provenance(command="dmdiff bench gpu")}
    if not record["cuda"]:
        print(f"dmdiff bench gpu: {NO_CUDA}; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        if out is not None:
            write_json(out, {**record, "reason": NO_CUDA})
        return 0
    record["device"] = torch.cuda.get_device_name()
    print(f"dmdiff bench gpu: {record['device']}, torch {torch.__version__}, {PRESET} (random weights)", flush=True)
    threads = torch.get_num_threads()           # the CPU builds the random-weight model: use every core
    _part(record, "restore_512", out, restore_benchmark, PRESET, RESTORE_PX, args.repeats, threads, "cuda", True, None)
    _part(record, "restore_2048_tiled", out, restore_benchmark, PRESET, TILED_PX, 1, threads, "cuda", True, TILE_PX)
    for name, checkpointing in (("train_512_checkpointing", True), ("train_512_no_checkpointing", False)):
        _part(record, name, out, train_benchmark, "cuda", RESTORE_PX, args.train_steps, checkpointing, None,
              args.batch_size)
    with_ckpt, without = record["train_512_checkpointing"], record["train_512_no_checkpointing"]
    if "peak_bytes" in with_ckpt and "peak_bytes" in without:
        record["checkpointing_memory_ratio"] = with_ckpt["peak_bytes"] / without["peak_bytes"]
        record["checkpointing_time_ratio"] = with_ckpt["step_s"] / without["step_s"]
        print(f"dmdiff bench gpu: gradient checkpointing: memory ×{record['checkpointing_memory_ratio']:.2f}, "
              f"step time ×{record['checkpointing_time_ratio']:.2f}", flush=True)
    if out is not None:
        write_json(out, record)
        print(f"dmdiff bench gpu: wrote {out}")
    return 0
