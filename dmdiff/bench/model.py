"""``dmdiff bench model``: DMDiff restore latency and memory, and what tunable decoding saves.

One run prints:

- the ``tiny`` preset (``DMDiffConfig()`` with ``configs/tiny.yaml``'s colour anchor, as the default
  recipe's model has it; batch 1, fp32, CPU), restoring as ``dmdiff restore`` does
  (:class:`~dmdiff.model.pipeline.DMDiffPipeline`, 256-px blended tiles with 32 px of overlap by
  default): the latency of a full restore (both paths) and of an α-change re-decode
  (:meth:`~dmdiff.model.pipeline.DMDiffPipeline.decode`) at each size, their ratio (target ≤ 0.35
  at 512²), where the restore time goes (SVDA, VAE encoder, UNet, VAE decoder, colour anchor), and the peak memory
  of a restore, for the shipped backbone and, side by side in the same run, for the tiny layout
  shipped before it (:data:`PREVIOUS_TINY_LAYOUT`, random weights: the layout, not the weights,
  sets the time), with the speed-up and the targets of the current layout;
- ``sd-turbo-shape``: one plain UNet call at 512² (latent 64×64, batch 1, fp32, CPU), SD-Turbo's
  architecture with random weights;
- with CUDA: the ``sd-turbo-shape`` restore at 512² in fp16 on the GPU (a figure, not a test).

Times are medians over ``repeats`` calls (restore and re-decode interleaved, so both see the same
load; sizes above :data:`REPEAT_LIMIT` px are timed once), after a warm-up restore at 64². Each
measurement runs in a fresh process, so that memory freed by an earlier one and kept by the
allocator does not hide this one's. Peak memory is the resident set size (RSS) of that process
during its first restore at the size: the whole process's peak (what ``/usr/bin/time -v`` reports
for a ``dmdiff restore`` of that image, less the file reading) and the part above the RSS just
before the restore; the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) on Linux, else psutil RSS sampled every millisecond. On CUDA it is
``torch.cuda.max_memory_allocated`` above the memory allocated before. On a shared machine, one CPU
thread (the default) gives the most stable figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
from diffusers import UNet2DConditionModel

from dmdiff.bench.restore import gaussian_psf_grid, tiny_model_config
from dmdiff.device import synchronize, timed
from dmdiff.errors import DmdiffError
from dmdiff.model.backbone import SD_TURBO_UNET, TINY_TEXT, random_init
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.model.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX

RATIO_TARGET = 0.35
RATIO_SIZE = 512
WARMUP_SIZE = 64
REPEAT_LIMIT = 512               # larger sizes are timed once
#: Targets of the tiny layout, one thread: (image side px, seconds, peak RSS bytes or None).
SPEED_TARGETS = ((256, 0.5, None), (2048, 60.0, 1.5 * 2 ** 30))

#: The tiny layout shipped until December 2026: VAE ×2 with (32, 32) channels, UNet (32, 64) with its
#: attention on the second level and in the mid-block (a 64² token grid for a 256² image). The speed
#: baseline of this benchmark, built with random weights.
PREVIOUS_TINY_LAYOUT = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TINY_TEXT["hidden_size"],
                 attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, mid_block_add_attention=False, sample_size=128,
                scaling_factor=0.18215),
}
STAGES = ("svda", "vae encoder", "unet", "vae decoder")
_HWM_RESET = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak memory (bytes) used during a ``with`` block above the usage at entry: ``.bytes``.

    CPU: process RSS (kernel high-water mark reset at entry where Linux allows it, else sampled
    every millisecond in a thread), after collecting garbage at entry (a collection inside the block
    would free earlier work's memory and hide the block's). CUDA: ``torch.cuda.max_memory_allocated``
    of ``device``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0          # peak above the usage at entry
        self.peak = 0           # the peak itself (CPU: the process's RSS; CUDA: allocated memory)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        process = psutil.Process()
        self._start = process.memory_info().rss
        self._samples, self._stop = [self._start], threading.Event()
        try:
            _HWM_RESET.write_text("5")          # VmHWM := current RSS
            self._sampler = None
        except OSError:
            self._sampler = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._sampler.start()
        return self

    def _sample(self, process: psutil.Process) -> None:
        while not self._stop.wait(0.001):
            self._samples.append(process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is None:
            status = Path("/proc/self/status").read_text().splitlines()
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        else:
            self._stop.set()
            self._sampler.join()
            peak = max(self._samples)
        self.peak = peak
        self.bytes = max(peak - self._start, 0)


class StageTimes:
    """Wall time spent in each of ``modules`` (forward hooks), summed per call of the whole model:
    call :meth:`lap` after each model call; ``.laps`` is a list of ``{stage: seconds}``."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.modules, self.device = modules, device
        self.laps: list[dict[str, float]] = []
        self._current = dict.fromkeys(modules, 0.0)

    @contextlib.contextmanager
    def active(self) -> Iterator[StageTimes]:
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(lambda *_: self._start()))
            handles.append(module.register_forward_hook(lambda *_, name=name: self._stop(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _start(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _stop(self, name: str) -> None:
        synchronize(self.device)
        self._current[name] += time.perf_counter() - self._started

    def lap(self) -> None:
        self.laps.append(self._current)
        self._current = dict.fromkeys(self.modules, 0.0)


def restore_benchmark(preset: str, size: int, repeats: int, threads: int, device: str = "cpu",
                      half: bool = False, tile: int | None = DEFAULT_TILE_PX, layout: dict | None = None,
                      anchored: bool = False) -> dict:
    """Time DMDiff restore and α re-decode of one ``size × size`` image through the pipeline, as
    ``dmdiff restore`` runs it (run it in a fresh process).

    Args:
        tile: the pipeline's tile side in px (None: the whole image in one call); overlap 32 px.
        layout: ``{"unet": config, "vae": config}`` of a random-init tiny backbone to time instead of
            the preset's (e.g. :data:`PREVIOUS_TINY_LAYOUT`).
        anchored: with the colour anchor and deconvolved input of ``configs/tiny.yaml``'s model
            (:func:`dmdiff.bench.restore.tiny_model_config`, on a Gaussian stand-in grid of the default
            lens's shape), as the default recipe's model restores.

    Returns:
        ``{"backbone", "build_s", "restore_s", "decode_s", "ratio", "peak_bytes", "peak_rss_bytes",
        "stages_s", "anchor_s"}``: medians over ``repeats`` timed calls (seconds; one above
        :data:`REPEAT_LIMIT` px), the backbone's source, the peak memory of the first restore at this
        size (bytes above the usage before it, and the process's peak), the median time per stage of
        a restore, and the time in a restore of the colour anchor and the deconvolved network input
        (0 without them; their filter gains kept from the restore before, as in a folder of photos of
        one size). Each call restores another random photo, so none reuses a kept network input.
    """

    torch.set_num_threads(threads)
    device = torch.device(device)
    start = time.perf_counter()
    backbone = None if layout is None else random_init("tiny", 0, layout["unet"], layout["vae"])
    config = replace(tiny_model_config(), preset=preset) if anchored else DMDiffConfig(preset=preset)
    model = DMDiff(config, backbone)
    if anchored:
        model.set_anchor_psf(gaussian_psf_grid())
    model = model.to(device, torch.float16 if half else torch.float32)
    pipe = DMDiffPipeline.from_model(model)
    build_s = time.perf_counter() - start
    def photo(seed: int) -> torch.Tensor:      # another photo per call: no call reuses a kept network input
        return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device, model.dtype)

    pipe(photo(0)[..., :WARMUP_SIZE, :WARMUP_SIZE], tile=tile)
    stages = StageTimes({"svda": model.svda, "vae encoder": model.vae.encoder, "unet": model.unet,
                         "vae decoder": model.vae.decoder}, device)
    restore_s, decode_s = [], []

    def timed_restore(x: torch.Tensor) -> None:
        with stages.active():
            seconds, output = timed(lambda: pipe(x, tile=tile, overlap=DEFAULT_OVERLAP_PX, return_latents=True),
                                    device)
        stages.lap()
        restore_s.append(seconds)
        decode_s.append(timed(lambda: pipe.decode(output, 0.5, tile=tile, overlap=DEFAULT_OVERLAP_PX), device)[0])

    with PeakMemory(device) as memory:
        timed_restore(photo(1))
    calls = repeats if size <= REPEAT_LIMIT else 1
    for seed in range(2, calls + 1):
        timed_restore(photo(seed))
    restore, decode = statistics.median(restore_s), statistics.median(decode_s)
    x = photo(calls + 1)
    anchor_s = timed(lambda: (model.input_anchor(x), model.network_input(x)), device)[0] if anchored else 0.0
    return {"backbone": model.backbone.source, "build_s": build_s, "restore_s": restore, "decode_s": decode,
            "ratio": decode / restore, "peak_bytes": memory.bytes, "peak_rss_bytes": memory.peak,
            "stages_s": {s: statistics.median(lap[s] for lap in stages.laps) for s in STAGES}, "anchor_s": anchor_s}


def unet_benchmark(size: int, repeats: int, threads: int) -> dict:
    """One call of SD-Turbo's UNet (random init, fp32, CPU, batch 1) at image size ``size``
    (latent ``size / 8``); run it in a fresh process.

    Returns:
        ``{"params", "build_s", "first_s", "call_s", "peak_bytes"}``: parameter count, build time,
        the first call's time, the median of ``repeats`` later calls (seconds), and the peak RSS of
        the first call above the RSS after the build (bytes).
    """

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_config(SD_TURBO_UNET).eval()
    build_s = time.perf_counter() - start
    latent = torch.randn(1, 4, size // 8, size // 8)
    text = torch.randn(1, 77, SD_TURBO_UNET["cross_attention_dim"])
    with torch.no_grad():
        with PeakMemory(cpu) as memory:
            first_s, _ = timed(lambda: unet(latent, 999, text), cpu)
        calls = [timed(lambda: unet(latent, 999, text), cpu)[0] for _ in range(repeats)]
    return {"params": sum(p.numel() for p in unet.parameters()), "build_s": build_s, "first_s": first_s,
            "call_s": statistics.median(calls), "peak_bytes": memory.bytes}


def in_fresh_process(fn: Callable, *args) -> dict:
    """``fn(*args)`` in a new (spawned) Python process; its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MiB"


def _row(label: str, r: dict) -> str:
    parts = [f"{s} {r['stages_s'][s]:.2f}" for s in STAGES]
    if r["anchor_s"] > 0:
        parts.append(f"anchor and deconvolved input {r['anchor_s']:.2f}")
    stages = ", ".join(parts)
    return (f"{label:<10}{r['restore_s']:>9.2f}s{r['decode_s']:>10.3f}s{r['ratio']:>8.3f}"
            f"{'+' + _mib(r['peak_bytes']):>11}{_mib(r['peak_rss_bytes']):>11}   {stages} s")


def format_tiny(sizes: list[int], results: list[dict], previous: list[dict] | None, repeats: int, threads: int,
                tile: int | None) -> str:
    """The tiny-preset part of the report: per size the shipped backbone's row and, when measured,
    the previous layout's and the speed-up; then the targets."""
    tiles = f"{tile}-px tiles, {DEFAULT_OVERLAP_PX} px overlap" if tile else "untiled"
    lines = [f"tiny preset with configs/tiny.yaml's colour anchor and deconvolved input (a 7×7 stand-in PSF grid), "
             f"restored as `dmdiff restore` does ({tiles}); batch 1, fp32, "
             f"CPU, {threads} thread(s), medians of {repeats} (sizes above {REPEAT_LIMIT} px: one call)",
             f"  shipped:  {results[0]['backbone']}"]
    if previous:
        lines.append("  previous: the tiny layout shipped before (PREVIOUS_TINY_LAYOUT, random weights)")
    lines.append(f"  {'size':<11}{'backbone':<10}{'restore':>10}{'re-decode':>11}{'ratio':>8}{'peak RSS':>11}"
                 f"{'process':>11}   restore time by stage")
    for k, (size, r) in enumerate(zip(sizes, results)):
        lines.append(f"  {f'{size}×{size}':<11}" + _row("shipped", r))
        if previous:
            p = previous[k]
            lines.append(f"  {'':<11}" + _row("previous", p))
            lines.append(f"  {'':<11}{'speed-up':<10}{p['restore_s'] / r['restore_s']:>9.1f}×")
    if RATIO_SIZE in sizes:
        ratio = results[sizes.index(RATIO_SIZE)]["ratio"]
        verdict = "met" if ratio <= RATIO_TARGET else "NOT met"
        lines.append(f"  α re-decode / full restore at {RATIO_SIZE}²: {ratio:.3f} "
                     f"(target ≤ {RATIO_TARGET}: {verdict})")
    for size, seconds, peak in SPEED_TARGETS:
        if size in sizes:
            r = results[sizes.index(size)]
            met = r["restore_s"] <= seconds and (peak is None or r["peak_rss_bytes"] < peak)
            memory = "" if peak is None else f" at < {peak / 2 ** 30:.1f} GiB peak RSS ({r['peak_rss_bytes'] / 2 ** 30:.2f} GiB)"
            lines.append(f"  target: {size}² restore ≤ {seconds:g} s{memory}: {r['restore_s']:.2f} s, "
                         f"{'met' if met else 'NOT met'}")
    lines.append("  (peak RSS: first restore at that size in a fresh process, above the RSS before it; "
                 "process: that process's peak)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this benchmark."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 2048],
                        help="image sides of the tiny restore (px; default %(default)s)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE_PX,
                        help="tile side of the restore in px, 0 for none (default %(default)s, as dmdiff restore)")
    parser.add_argument("--no-previous", dest="previous", action="store_false",
                        help="skip the previous tiny layout's measurements")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median is kept)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: the most stable figures on a shared box)")
    parser.add_argument("--no-sd-turbo-shape", dest="sd_turbo_shape", action="store_false",
                        help="skip the SD-Turbo-shape measurements (a ~5 GB model)")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark: ``args.sizes`` (px), ``args.repeats``, ``args.threads``, ``args.sd_turbo_shape``."""
    if args.repeats < 1 or args.threads < 1:
        raise DmdiffError(f"--repeats and --threads must be at least 1, got {args.repeats} and {args.threads}")
    if min(args.sizes) < WARMUP_SIZE:
        raise DmdiffError(f"--sizes must be at least {WARMUP_SIZE} px, got {args.sizes}")
    tile = args.tile or None
    print(f"dmdiff bench model  (torch {torch.__version__}, {psutil.cpu_count()} CPUs)", flush=True)
    tiny, previous = [], []
    for size in args.sizes:
        tiny.append(in_fresh_process(restore_benchmark, "tiny", size, args.repeats, args.threads, "cpu", False, tile,
                                     None, True))
        if args.previous:
            previous.append(in_fresh_process(restore_benchmark, "tiny", size, args.repeats, args.threads, "cpu", False,
                                             tile, PREVIOUS_TINY_LAYOUT, True))
    print(format_tiny(args.sizes, tiny, previous, args.repeats, args.threads, tile), flush=True)
    if args.sd_turbo_shape:
        u = in_fresh_process(unet_benchmark, RATIO_SIZE, args.repeats, args.threads)
        latent = RATIO_SIZE // 8
        print(f"sd-turbo-shape UNet ({u['params'] / 1e6:.0f} M parameters, random init, built in {u['build_s']:.1f} s):"
              f" one call at {RATIO_SIZE}² (latent {latent}×{latent}), batch 1, fp32, CPU, {args.threads} thread(s): "
              f"{u['call_s']:.2f} s (median of {args.repeats}; first call {u['first_s']:.2f} s, "
              f"peak RSS +{_mib(u['peak_bytes'])})", flush=True)
    if not torch.cuda.is_available():
        print("CUDA: not available, so no sd-turbo-shape fp16 GPU restore figure")
    elif args.sd_turbo_shape:
        r = in_fresh_process(restore_benchmark, "sd-turbo-shape", RATIO_SIZE, args.repeats, args.threads, "cuda", True,
                             None)
        stages = ", ".join(f"{s} {1e3 * r['stages_s'][s]:.1f}" for s in STAGES)
        print(f"sd-turbo-shape restore at {RATIO_SIZE}², fp16, {torch.cuda.get_device_name()}: "
              f"{1e3 * r['restore_s']:.1f} ms, α re-decode {1e3 * r['decode_s']:.1f} ms (ratio {r['ratio']:.3f}), "
              f"peak +{_mib(r['peak_bytes'])} allocated; by stage: {stages} ms (median of {args.repeats})")
    return 0
