"""``dmdiff restore``: restore your own photos, of any size, with a trained DMDiff model.

``dmdiff restore --model RUN --input FILE|DIR --out DIR`` reads one image or every image of a
folder (not recursive; names sorted; hidden files skipped), restores each with
:class:`~dmdiff.model.pipeline.DMDiffPipeline` in blended tiles (:mod:`dmdiff.model.tiling`:
bounded memory for any size and aspect ratio, exactly :meth:`DMDiff.restore` when the image fits in
one tile) and writes ``DIR/<name>.png``: this module is the file reading and writing around it.

* **Model.** ``RUN`` is a pipeline folder, a training run or a recipe run (its ``stage2/``), loaded
  by :func:`dmdiff.runs.load_pipeline`: safetensors only; a folder holding pickle files is refused
  before anything is loaded.
* **Inputs** go through :func:`dmdiff.imageio.read_image`: grayscale is replicated to RGB,
  palette images expanded, alpha composited over white, 16-bit PNG/TIFF read at full precision;
  NaN/Inf, corrupt or truncated files raise :class:`ImageReadError`. Images must be at least the
  SVDA grid (7 px) on each side.
* **Outputs** are 8-bit RGB PNGs (``bits=16``: 16-bit, e.g. to keep the precision of 16-bit
  inputs), written atomically. Inputs are never overwritten: ``--out`` may not be the input folder,
  nor may any output path be an input file; two inputs with the same name stem (``a.png``,
  ``a.jpg``) are refused up front. **No file dmdiff did not write is replaced**: ``restore.json``
  records every image written into ``--out`` with its sha256; an output name that holds any other
  file (the user's own ``IMG_1.png``, or an earlier output edited since) is refused before any
  work starts, unless ``--overwrite`` is given. A ``restore.json`` of another program is never
  overwritten.
* **Resume**: ``--resume`` skips the images that an earlier run into the same ``--out`` restored
  with the same model (its weights' sha256) and settings, whose outputs are unchanged. The report
  names each output (and its hash) before the file is written, so a run killed at any moment
  leaves nothing a later run refuses.
* **Maps** (the lens's optics maps, ``(7, G, G)`` in ``MAP_CHANNELS`` order, covering the full
  image): ``"auto"`` uses ``DATA/maps/<stem>.npy`` when the input is ``DATA/lr_<split>/<stem>.*``
  of a dmdiff dataset (:mod:`dmdiff.data.simulate`) and that file exists, else none (SVDA then
  sets its maps-missing flag: right for real captures); ``"none"`` never uses maps; a ``.npy``
  path uses that array for every input. Each tile gets the maps resampled to its own window.
* **Lens** (``lens=FILE``, ``--lens FILE``; not with ``--maps none`` or a ``.npy``): the maps are
  computed from the lens of each capture (:mod:`dmdiff.data.lens`): ``FILE`` is a YAML/JSON file of
  :class:`~dmdiff.optics.spec.MetalensSpec` fields with an optional ``noise: [shot, read]``, or a
  dataset's ``lens.json`` (a lens family's gives each image the lens recorded for its name stem, and
  its noise). Without noise levels the middle of the simulation's is assumed (a warning says so).
  Without ``--lens``, with ``--maps auto``, when every input is ``DATA/lr_<split>/<stem>.*`` of one
  dmdiff dataset, that dataset's ``lens.json`` is the lens file (:func:`dataset_lens_file`): its captures
  are restored with their own lens, as ``dmdiff evaluate`` restores them — not with the lens the
  model was trained on, which a dataset of another lens does not share.
  The PSF grid of each distinct lens is computed (progress bar; or loaded from the disk cache) once,
  before the first image. An image of another size than the lens's sensor is taken as the whole
  sensor at another resolution (a non-square one as its centred crop): the PSF widths are scaled
  (warned once). An image that a family's ``lens.json`` does not list fails alone. A model whose
  colour anchor deconvolves uses each capture's lens's PSF grid for it too, instead of the lens it
  was trained with (a model trained on a lens family stores no lens: it needs ``--lens``, or a dataset's
  captures whose ``lens.json`` is found as above).
* **Colour correction** against the input (:mod:`dmdiff.model.color`), ``"auto"`` by default:
  none for a model with a colour anchor, ``"lowpass"`` for one without.
* **Self-ensemble** (``self_ensemble=True``, ``--self-ensemble``): each image is restored in its 8
  orientations (rotations by 90° and mirrorings, maps turned alike) and the results averaged
  (:mod:`dmdiff.model.ensemble`: 8× the time; sound for lenses symmetric about the optical axis).
* **Failures** of one file (unreadable image, bad maps, too small, no lens) do not stop a folder run: the
  rest continue, the failures are listed at the end and the exit status is 1.
* **Throughput.** The model is loaded once per run. In a folder run the next image is read,
  decoded and prepared (its colour anchor computed) in a reader thread, and the previous one
  decoded by the VAE, colour-corrected, PNG-encoded and written in a writer thread, while compute
  threads run the encoder and UNet of the images between (:class:`_FolderRun`,
  :func:`dmdiff.overlap.run_stages`). On a CPU with two or more cores a small model restores two
  images at a time, each in its own thread with its own copy of the model's modules sharing its
  weights (:func:`default_workers`, :func:`worker_copy`; ``workers``, ``--workers``), and torch gets
  a share of its default threads (:func:`default_threads`): two images on two cores go faster than
  one image whose operators share two cores. At α = 0 or 1 the UNet runs only the path that α
  decodes (:func:`dmdiff.model.dmdiff.decoded_paths`; half its batch), so these outputs agree with
  :class:`~dmdiff.model.pipeline.DMDiffPipeline`'s, which keeps both paths' latents for
  re-decoding, to float round-off (at most one 16-bit level) rather than bit for bit.
  ``sequential=True`` (``--sequential``) does the same steps one after the other, with torch's
  default threads; the outputs are the same. ``dmdiff bench restore`` times them.
* ``DIR/restore.json`` (rewritten atomically after every image): the model, α, tile settings,
  colour correction, maps option (``"lens"`` with a lens file), lens file, device, ``settings``
  (what ``--resume`` compares: with a lens, its file), ``written`` (every output of dmdiff restore
  in the folder, of this run and earlier ones, with its sha256), and per file of this run its
  status, size, tile count, maps used, seconds and error; with a lens, its ``lens`` record (file,
  family lens name, spec cache key, noise and whether it was assumed: ``--resume`` redoes an image
  whose record changed) and the ``psf_scale`` applied to its PSF widths.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.data.dataset import images_by_stem
from dmdiff.data.lens import CaptureLens, LensFile, LensMaps, LensWarning
from dmdiff.device import resolve_device, torch_threads
from dmdiff.errors import (
    EXIT_PARTIAL,
    NO_SPACE,
    ConfigError,
    DmdiffError,
    ImageReadError,
)
from dmdiff.imageio import IMAGE_EXTENSIONS, check_min_size, png_bytes, read_image
from dmdiff.model.color import (
    COLOR_CORRECTIONS,
    DEFAULT_COLOR_CORRECTION,
    resolve_color_correction,
)
from dmdiff.model.dmdiff import RestoreLatents, check_alpha
from dmdiff.model.pipeline import CONFIG_FILE, TRAINABLE_FILE, PreparedImage
from dmdiff.model.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, check_tiling
from dmdiff.optics.sensor import noise_std
from dmdiff.outputs import (
    atomic_write_bytes,
    clean_stale_temp_files,
    unwritable,
    write_json,
)
from dmdiff.overlap import run_stages
from dmdiff.runinfo import provenance
from dmdiff.runs import load_pipeline

__all__ = ["REPORT_FILE", "list_inputs", "output_paths", "load_maps", "find_maps", "dataset_lens_file", "input_lenses",
           "previous_report", "written_outputs", "check_outputs", "model_digest", "restore", "main"]

REPORT_FILE = "restore.json"
REPORT_FORMAT = "dmdiff-restore"
N_MAP_CHANNELS = 7          # len(MAP_CHANNELS)
# What one image may raise without stopping a folder run (user-fixable problems, or running out of memory).
FILE_ERRORS = (DmdiffError, ValueError, OSError, RuntimeError, MemoryError)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def list_inputs(path: str | Path) -> list[Path]:
    """The images to restore: ``[path]`` for a file, else the folder's image files, sorted by name.

    Raises:
        DmdiffError: ``path`` missing, a folder without images (extensions ``IMAGE_EXTENSIONS``),
            or two images with the same name stem.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DmdiffError(f"--input {path}: no such file or folder")
    images = list(images_by_stem(path).values())
    if not images:
        raise DmdiffError(f"--input {path}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def output_paths(images: str | Path, inputs: list[Path], out: str | Path) -> list[Path]:
    """``out/<stem>.png`` for each of ``inputs`` (:func:`list_inputs` of ``images``), after checking
    that no input gets overwritten.

    Raises:
        DmdiffError: ``out`` is a file, or the ``images`` folder itself, or an output path is an
            input file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DmdiffError(f"--out {out} exists and is not a folder")
    if Path(images).is_dir() and out.resolve() == Path(images).resolve():
        raise DmdiffError(f"--out {out} is the input folder; choose another folder (inputs are never overwritten)")
    outputs = [out / f"{p.stem}.png" for p in inputs]
    sources = {p.resolve() for p in inputs}
    clash = [str(o) for o in outputs if o.resolve() in sources]
    if clash:
        raise DmdiffError(f"--out {out}: the output {clash[0]} would overwrite an input; choose another folder")
    return outputs


def load_maps(path: str | Path) -> np.ndarray:
    """Optics maps from a ``.npy`` file: float32 ``(7, G, G)`` (``MAP_CHANNELS`` order), finite.

    Raises:
        DmdiffError: missing or unreadable file (pickled arrays are refused), wrong shape, NaN/Inf.
    """
    path = Path(path)
    try:
        maps = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DmdiffError(f"{path}: unreadable map file ({e})") from None
    if maps.ndim != 3 or maps.shape[0] != N_MAP_CHANNELS or min(maps.shape[1:]) < 1:
        raise DmdiffError(f"{path}: maps must have shape ({N_MAP_CHANNELS}, G, G), got {maps.shape}")
    if not np.issubdtype(maps.dtype, np.number) or not np.all(np.isfinite(maps)):
        raise DmdiffError(f"{path}: maps must be finite numbers")
    return maps.astype(np.float32)


def find_maps(image: Path, option: str) -> Path | None:
    """The maps file for ``image`` under the ``--maps`` option (module docstring), or None.

    ``"auto"``: ``DATA/maps/<stem>.npy`` for ``DATA/lr_<split>/<stem>.*``, when it exists;
    ``"none"``: None; anything else: that path.
    """
    if option == "none":
        return None
    if option != "auto":
        return Path(option)
    root = _dataset_root(image)
    candidate = None if root is None else root / "maps" / f"{image.stem}.npy"
    return candidate if candidate is not None and candidate.is_file() else None


def _dataset_root(image: Path) -> Path | None:
    """``DATA`` for an input ``DATA/lr_<split>/<stem>.*`` (a dmdiff dataset's layout), else None."""
    return image.parent.parent if image.parent.name.startswith("lr_") else None


def _dataset_lens(inputs: list[Path]) -> LensFile | None:
    """The lens file of :func:`dataset_lens_file`, when it gives every input a lens; else None, with a
    warning when the file exists but cannot serve (the stored maps and the model's own lens then)."""
    found = dataset_lens_file(inputs)
    if found is None:
        return None
    try:
        lens_file = LensFile(found)
        for source in inputs:
            if lens_file.lens_of(source.stem).noise_assumed:
                raise DmdiffError(f"no noise recorded for {source.stem}")
    except DmdiffError as exc:
        warnings.warn(f"the inputs' dataset lens {found} is not used ({exc}): the stored maps are, and the model's "
                      "own lens for its colour anchor", LensWarning, stacklevel=3)
        return None
    return lens_file


def dataset_lens_file(inputs: list[Path]) -> Path | None:
    """``DATA/lens.json`` when every input is ``DATA/lr_<split>/<stem>.*`` of one dataset that has
    one (the lens ``--maps auto`` implies: the maps it finds are that lens's), else None."""
    roots = {_dataset_root(image) for image in inputs}
    if len(roots) != 1 or None in roots:
        return None
    lens = roots.pop() / "lens.json"
    return lens if lens.is_file() else None


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


def previous_report(out: str | Path) -> dict | None:
    """The ``restore.json`` an earlier ``dmdiff restore`` wrote into ``out`` (None when there is none).

    Raises:
        DmdiffError: ``out`` holds a ``restore.json`` that dmdiff did not write (it is never
            overwritten).
    """
    path = Path(out) / REPORT_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = None
    legacy = isinstance(report, dict) and isinstance(report.get("files"), list) and "provenance" in report
    if not isinstance(report, dict) or not (report.get("format") == REPORT_FORMAT or legacy) or path.is_symlink():
        raise DmdiffError(f"{path} exists and is not a report of dmdiff restore; it is never overwritten: "
                          "choose another --out")
    return report


def written_outputs(report: dict | None) -> dict[str, str | None]:
    """``{file name: sha256}`` of the images dmdiff restore wrote into a folder, from its report
    (``None`` digests for reports of versions that did not record them)."""
    if report is None:
        return {}
    if isinstance(report.get("written"), dict):
        return dict(report["written"])
    return {Path(e["output"]).name: None for e in report["files"]
            if isinstance(e, dict) and e.get("status") == "ok" and e.get("output")}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ours(path: Path, written: dict[str, str | None]) -> bool:
    """Whether ``path`` is an image dmdiff restore wrote and nobody changed since."""
    if path.name not in written or path.is_symlink() or not path.is_file():
        return False
    digest = written[path.name]
    return digest is None or _sha256(path.read_bytes()) == digest


def check_outputs(outputs: list[Path], written: dict[str, str | None], overwrite: bool) -> None:
    """Refuse outputs that would replace files dmdiff restore did not write (unless ``overwrite``).

    Raises:
        DmdiffError: some output paths hold other files (the first few are listed).
    """
    foreign = [o for o in outputs if (o.exists() or o.is_symlink()) and not _ours(o, written)]
    if foreign and not overwrite:
        names = ", ".join(str(o) for o in foreign[:5]) + (f", ... ({len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise DmdiffError(f"{len(foreign)} output(s) would replace file(s) that dmdiff restore did not write: "
                          f"{names}. Choose another --out, or pass --overwrite to replace them.")


@dataclass
class _InputMaps:
    """Where the inputs' optics maps come from: their lenses (``--lens``: ``lenses`` holds each input's
    lens, or the error saying why it has none; ``cameras`` computes the maps), else the ``--maps``
    ``option`` (``shared``: the array of a ``.npy`` file)."""

    option: str
    shared: np.ndarray | None = None
    lenses: dict[Path, CaptureLens | DmdiffError] | None = None
    cameras: LensMaps | None = None

    def of(self, source: Path, image_hw: tuple[int, int], entry: dict[str, Any]) -> np.ndarray | None:
        """The maps of the input ``source``, an image of ``image_hw`` px; what was used goes into its
        report ``entry``.

        Raises:
            DmdiffError: no lens for it, or an unreadable maps file.
        """
        if self.lenses is not None:
            lens = self.lenses[source]
            if isinstance(lens, DmdiffError):
                raise lens
            maps, scale = self.cameras.maps(lens, image_hw, source.name)
            entry.update(maps=lens.file, lens=lens.record(), psf_scale=scale)
            return maps
        maps_file = find_maps(source, self.option)
        entry["maps"] = None if maps_file is None else str(maps_file)
        return self.shared if self.shared is not None or maps_file is None else load_maps(maps_file)

    def lens_grid(self, source: Path) -> np.ndarray | None:
        """The PSF grid ``(3, G, G, K, K)`` of the input's lens (``--lens``), for the colour anchor;
        None without a lens file (the model's own lens then) or a lens for the input."""
        lens = None if self.lenses is None else self.lenses[source]
        return self.cameras.camera(lens.spec).grid.psfs if isinstance(lens, CaptureLens) else None


def input_lenses(lens: LensFile, inputs: list[Path]) -> dict[Path, CaptureLens | DmdiffError]:
    """Each input's lens from the lens file (by its name stem), or the DmdiffError saying why it has
    none (that input then fails alone)."""
    out: dict[Path, CaptureLens | DmdiffError] = {}
    for source in inputs:
        try:
            out[source] = lens.lens_of(source.stem)
        except DmdiffError as e:
            out[source] = e
    return out


@dataclass
class _Job:
    """One input on its way through the stages of a folder run: its report ``entry`` and what the
    stages made of it so far (``seconds``: the time they spent on it, summed)."""

    source: Path
    target: Path
    entry: dict[str, Any]
    resumed: bool = False
    prepared: PreparedImage | None = None
    latents: RestoreLatents | None = None
    restored: np.ndarray | None = None
    payload: bytes | None = None
    seconds: float = 0.0
    grid: np.ndarray | None = None

    @property
    def failed(self) -> bool:
        return self.entry["status"] == "failed"


class _FolderRun:
    """The three stages of restoring a folder (:func:`dmdiff.overlap.run_stages`):

    * ``read`` (reader thread): the file decoded, checked and prepared with its maps, and the colour
      anchor computed (:meth:`DMDiffPipeline.prepare`: no network), with the input's lens (``--lens``)
      when the anchor deconvolves;
    * ``compute`` (one or more compute threads, each with its own copy of the pipeline, the only
      thread using that copy's encoder and UNet): the latents (:meth:`DMDiffPipeline.latents`) of
      the paths the run's α needs (one at α = 0 or 1), or the whole restore with the self-ensemble;
    * ``write`` (writer thread): decoding and colour correction (:meth:`DMDiffPipeline.finish`:
      the VAE decoder, which carries no LoRA), PNG encoding, the report naming the file and its
      entry, the atomic write, the report again and the progress bar.

    A stage that fails on one file (:data:`FILE_ERRORS`) records it in the file's entry and the
    later stages pass it on; a full disk stops the run.
    """

    def __init__(self, pipe, settings: dict, maps: _InputMaps, record: dict, out: Path, bar):
        self.pipe, self.settings, self.maps = pipe, settings, maps
        self.record, self.out, self.bar = record, out, bar

    def read(self, job: tuple[Path, Path, dict | None]) -> _Job:
        source, target, done = job
        if done is not None:
            return _Job(source, target, {**done, "resumed": True}, resumed=True)
        item = _Job(source, target, {"input": str(source), "output": str(target), "status": "ok"})
        _step(item, lambda: self._prepare(item))
        return item

    def _prepare(self, job: _Job) -> None:
        image = read_image(job.source)
        check_min_size(image, self.pipe.model.config.grid_size, "SVDA grid", path=job.source)
        job.entry["size"] = list(image.shape[:2])
        maps = self.maps.of(job.source, image.shape[:2], job.entry)
        job.grid = self.maps.lens_grid(job.source)
        anchor_now = not self.settings["self_ensemble"]       # else the compute step anchors each turned copy
        if anchor_now:
            self.pipe.model.use_capture_lens(job.grid)        # read only here: the prepared anchor travels on
        job.prepared = self.pipe.prepare(image, maps, anchor=anchor_now)

    def compute(self, job: _Job, pipe) -> _Job:
        """The compute stage of ``job`` with ``pipe``, the calling thread's own copy of the pipeline."""
        if not (job.resumed or job.failed):
            self.bar.set_postfix_str(job.source.name)
            _step(job, lambda: self._latents(job, pipe))
        return job

    def _latents(self, job: _Job, pipe) -> None:
        s, name = self.settings, job.source.name

        def count_tiles(done: int, total: int) -> None:
            job.entry["tiles"] = total
            self.bar.set_postfix_str(f"{name}: tile {done}/{total}")

        if s["self_ensemble"]:
            prepared = job.prepared
            pipe.model.use_capture_lens(job.grid)
            job.restored = pipe(prepared.image, prepared.maps, s["alpha"], tile=s["tile"], overlap=s["overlap"],
                                self_ensemble=True, color_correct=s["color_correct"], on_tile=count_tiles).images[0]
        else:
            job.latents = pipe.latents(job.prepared, tile=s["tile"], overlap=s["overlap"], on_tile=count_tiles,
                                       alpha=s["alpha"])

    def write(self, job: _Job) -> None:
        if not (job.resumed or job.failed):
            _step(job, lambda: self._encode(job))
        self.record["files"].append(job.entry)
        if job.payload is not None:
            # the report names the file, its hash and its entry before the file exists: a run killed
            # in between leaves no output that a later run would take for a file dmdiff did not
            # write, and --resume skips the image only once its output is there, unchanged
            self.record["written"][job.target.name] = _sha256(job.payload)
            write_json(self.out / REPORT_FILE, self.record)
            _step(job, lambda: atomic_write_bytes(job.target, job.payload))
        if not job.resumed:
            job.entry["seconds"] = round(job.seconds, 3)
            self.record["failed"] += job.failed
        write_json(self.out / REPORT_FILE, self.record)
        self.bar.update(1)

    def _encode(self, job: _Job) -> None:
        s = self.settings
        if job.restored is None:
            job.restored = self.pipe.finish(job.prepared, job.latents, s["alpha"], tile=s["tile"],
                                            overlap=s["overlap"], color_correct=s["color_correct"])
        job.payload = png_bytes(job.restored, bits=s["bits"])


def _step(job: _Job, work) -> None:
    """Run one stage's ``work`` on ``job``, adding its seconds; a failure of the file (:data:`FILE_ERRORS`,
    except a full disk, which is raised) marks the entry failed with the reason."""
    start = time.perf_counter()
    try:
        work()
    except FILE_ERRORS as e:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise       # a full disk fails every later image too: stop (the CLI reports it)
        reason = e.reason if isinstance(e, ImageReadError) else str(e) or type(e).__name__
        job.entry.update(status="failed", output=None, error=reason)
        job.prepared = job.latents = job.restored = job.payload = None
    finally:
        job.seconds += time.perf_counter() - start


#: The largest model (parameters and buffers, bytes) that a folder restore gives a second compute
#: thread by default (:func:`worker_copy`): the tiny preset (about 10 MiB) gets one, SD-Turbo
#: (about 5 GB), whose operators are large enough to use torch's threads, does not.
COPY_MAX_BYTES = 256 * 2 ** 20


def worker_copy(pipe):
    """A copy of the pipeline for another compute thread: its own modules, LoRA modulation state and
    hooks (which a forward pass sets), sharing the parameter and buffer tensors, which inference only
    reads (no second copy of the weights in memory; 5× faster to make than a full deep copy)."""
    shared = {id(t): t for t in (*pipe.model.parameters(), *pipe.model.buffers())}
    return copy.deepcopy(pipe, shared)


def default_workers(device: torch.device, overlap: bool, model: torch.nn.Module) -> int:
    """Compute threads for a folder restore when ``--workers`` is not given: 2 on a CPU with two or
    more of torch's threads when the images overlap and ``model`` is at most :data:`COPY_MAX_BYTES`
    (each thread restores its own image with its own :func:`worker_copy`: the tiny networks'
    operators gain 1.2× from a second core, two images side by side about 1.8×, measured in
    docs/experiments.md); else 1."""
    if device.type != "cpu" or not overlap or torch.get_num_threads() < 2:
        return 1
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return 2 if size <= COPY_MAX_BYTES else 1


def default_threads(device: torch.device, overlap: bool, workers: int = 1) -> int | None:
    """torch's intra-op threads for a restore when ``--threads`` is not given: on a CPU, overlapped,
    torch's default divided by twice the compute threads (at least 1): the other half of the cores
    read and write, and the tiny networks gain little from more threads per operator and lose much
    when threads outnumber free cores; else None (torch's default)."""
    if device.type != "cpu" or not overlap:
        return None
    return max(1, torch.get_num_threads() // (2 * workers))


def model_digest(pipeline_dir: Path) -> str:
    """A sha256 of a pipeline folder's config and trained weights: what ``--resume`` compares."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, TRAINABLE_FILE):
        h.update((pipeline_dir / name).read_bytes())
    return h.hexdigest()


def _finished(report: dict | None, settings: dict, written: dict[str, str | None], out: Path,
              lenses: dict[str, dict]) -> dict[str, dict]:
    """``{input path: entry}`` of the images a previous run with the same ``settings`` restored, with the
    lens record ``lenses[input]`` (none without a lens file), and whose outputs are still as written
    (what ``--resume`` skips)."""
    if report is None or report.get("settings") != settings:
        return {}
    return {e["input"]: e for e in report["files"]
            if e.get("status") == "ok" and e.get("output") and written.get(Path(e["output"]).name)
            and e.get("lens") == lenses.get(e["input"]) and _ours(out / Path(e["output"]).name, written)}


def restore(model: str | Path, images: str | Path, out: str | Path, *, alpha: float | None = None,
            tile: int = DEFAULT_TILE_PX, overlap: int = DEFAULT_OVERLAP_PX, color: str = DEFAULT_COLOR_CORRECTION,
            maps: str = "auto", lens: str | Path | None = None, bits: int = 8, self_ensemble: bool = False,
            device: str | None = None, model_path: str | None = None, overwrite: bool = False, resume: bool = False,
            sequential: bool = False, threads: int | None = None, workers: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Restore one image or a folder of them into ``out`` (module docstring); returns the report.

    Args:
        model: pipeline folder, training run or recipe run.
        images: an image file or a folder of images.
        out: output folder (created if missing).
        alpha: in ``[0, 1.2]``: 0 fidelity (neutral path), 1 perceptual (positive path); None: the
            model's recommended α (chosen on the validation split by the recipe), else 1.
        tile, overlap: tile side and minimum overlap in pixels (:func:`dmdiff.model.tiling.check_tiling`).
        color: colour correction, one of :data:`COLOR_CORRECTIONS` (the report holds the resolved one).
        maps: ``"auto"``, ``"none"`` or a ``.npy`` file of maps (module docstring).
        lens: a lens file (spec YAML/JSON, or a dataset's ``lens.json``) to compute each input's maps
            from, instead of ``maps`` (which must then be ``"auto"``; module docstring). None with
            ``maps="auto"``: the inputs' dataset's ``lens.json`` when they are one dataset's captures.
        bits: 8 or 16 bits per output sample.
        self_ensemble: average the restorations of the 8 orientations of each image.
        device: torch device (default: CUDA when available, else CPU).
        model_path: ``sd-turbo`` pipelines: where SD-Turbo is.
        overwrite: replace existing files of the output names even when dmdiff did not write them.
        resume: skip the images an earlier run into ``out`` restored with the same model and settings
            (and whose outputs are unchanged).
        sequential: read, restore and write one image after the other in this thread, instead of
            overlapping the reading of the next image and the writing of the previous one with
            each restore (:mod:`dmdiff.overlap`; a single image is always restored sequentially).
        threads: torch's intra-op CPU threads during the run (None: :func:`default_threads`).
        workers: compute threads of an overlapped folder run, each restoring its own image with its
            own copy of the model (None: :func:`default_workers`; ignored when not overlapped).
        progress: a tqdm bar over the images (with the tile count of the current one), and one while
            a lens's PSF grid is computed.

    Returns:
        The ``restore.json`` record; ``record["failed"]`` counts the images that could not be restored.

    Raises:
        DmdiffError: bad arguments, model, inputs, lens file or output folder (nothing is written then).
    """
    if alpha is not None:
        alpha = check_alpha(alpha)
    if color not in COLOR_CORRECTIONS:
        raise ConfigError(f"--color-correct must be one of {', '.join(COLOR_CORRECTIONS)}, got {color!r}")
    if bits not in (8, 16):
        raise ConfigError(f"--bits must be 8 or 16, got {bits!r}")
    for name, value in (("threads", threads), ("workers", workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if lens is not None and maps != "auto":
        raise ConfigError(f"--lens and --maps {maps} both give the optics maps: use one of them "
                          "(--lens computes the maps from the lens)")
    inputs = list_inputs(images)
    outputs = output_paths(images, inputs, out)
    out = Path(out)
    report = previous_report(out)
    written = written_outputs(report)
    check_outputs(outputs, written, overwrite)
    lens_file = None if lens is None else LensFile(lens)
    if lens_file is None and maps == "auto":
        lens_file = _dataset_lens(inputs)
    shared_maps = load_maps(maps) if maps not in ("auto", "none") else None
    device = resolve_device(device)
    loaded = load_pipeline(model, device=device, model_path=model_path)
    pipe, net, pipeline_dir, run = loaded.pipeline, loaded.model, loaded.pipeline_dir, loaded.run_dir
    tile, overlap = check_tiling(net, tile, overlap)
    if net.config.anchor_deconvolves and net.anchor_psf is None and lens_file is None:
        raise ConfigError(f"{pipeline_dir} was trained on a lens family: its colour anchor deconvolves each capture "
                          "with the capture's own lens, so give the lens with --lens FILE (a spec YAML/JSON, or "
                          "the dataset's lens.json)")
    if alpha is None:
        alpha = 1.0 if net.config.recommended_alpha is None else net.config.recommended_alpha
    color = resolve_color_correction(color, net)
    settings = {"model": str(pipeline_dir.resolve()), "model_sha256": model_digest(pipeline_dir), "alpha": alpha,
                "tile": tile, "overlap": overlap, "color_correct": color, "maps": maps, "bits": bits,
                "self_ensemble": bool(self_ensemble)}
    lenses = None
    if lens_file is not None:
        settings.update(maps="lens", lens=str(lens_file.path.resolve()))
        lenses = input_lenses(lens_file, inputs)
    records = {str(s): v.record() for s, v in (lenses or {}).items() if isinstance(v, CaptureLens)}
    finished = _finished(report, settings, written, out, records) if resume else {}
    input_maps = _InputMaps(maps, shared_maps, lenses, None if lenses is None else LensMaps(progress=progress))
    if lenses is not None:                  # each distinct lens's PSF grid, before the first image
        todo = [v for s, v in lenses.items() if isinstance(v, CaptureLens) and str(s) not in finished]
        _warn_assumed_noise(lens_file, todo)
        input_maps.cameras.prepare(v.spec for v in todo)
    overlapped = not sequential and len(inputs) - len(finished) > 1
    if not overlapped:
        workers = 1
    elif workers is None:
        workers = default_workers(device, overlapped, net)
    if threads is None:
        threads = default_threads(device, overlapped, workers)

    record: dict[str, Any] = {
        "format": REPORT_FORMAT, "format_version": 1,
        "model": str(pipeline_dir), "run": None if run is None else str(run), "preset": net.config.preset,
        "alpha": alpha, "tile": tile, "overlap": overlap, "color_correct": color, "maps": settings["maps"],
        "lens": None if lens_file is None else str(lens_file.path), "bits": bits,
        "self_ensemble": bool(self_ensemble), "device": str(device), "overlapped": overlapped,
        "workers": workers, "torch_threads": torch.get_num_threads() if threads is None else threads,
        "settings": settings, "files": [], "failed": 0, "written": written, "provenance": provenance(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(out)
        write_json(out / REPORT_FILE, record)
    except OSError as e:
        raise unwritable(out, e) from None
    jobs = [(source, target, finished.get(str(source))) for source, target in zip(inputs, outputs)]
    bar = tqdm(total=len(jobs), desc="dmdiff restore", unit="image", disable=not progress)
    run = _FolderRun(pipe, settings, input_maps, record, out, bar)
    copies = [pipe] + [worker_copy(pipe) for _ in range(workers - 1)]
    with torch_threads(threads):
        run_stages(jobs, run.read, [functools.partial(run.compute, pipe=p) for p in copies], run.write,
                   overlap=overlapped)
    bar.close()
    return record


def _warn_assumed_noise(lens_file: LensFile, lenses: list[CaptureLens]) -> None:
    """Say which noise levels were assumed for the captures the lens file gives none for."""
    assumed = [v for v in lenses if v.noise_assumed]
    if assumed:
        shot, read = assumed[0].noise
        warnings.warn(f"--lens {lens_file.path}: no noise levels for {len(assumed)} image(s): assumed "
                      f"[shot, read] = [{shot:.3g}, {read:.3g}], the middle of the levels dmdiff simulate draws (a "
                      f"noise std of {noise_std(0.5, shot, read):.3g} at mid grey); a lens spec file may give "
                      "noise: [shot, read]. Recorded per image in restore.json", LensWarning, stacklevel=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    parser.add_argument("--model", required=True, metavar="RUN_OR_PIPELINE",
                        help="training run, recipe run (its stage2/) or pipeline folder")
    parser.add_argument("--input", required=True, metavar="FILE|DIR", help="an image, or a folder of images (not recursive)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: <name>.png per image and restore.json")
    parser.add_argument("--alpha", type=float, default=None,
                        help="0 fidelity (neutral path) … 1 perceptual (positive), up to 1.2 (default: the "
                             "model's recommended α, chosen on the validation split; 1 when it has none)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE_PX,
                        help="tile side in px, a multiple of the backbone's latent multiple (default %(default)s)")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP_PX,
                        help="minimum overlap of tiles in px, blended (default %(default)s)")
    parser.add_argument("--color-correct", default=DEFAULT_COLOR_CORRECTION, choices=COLOR_CORRECTIONS,
                        help="colour correction against the input (lowpass: the restored detail with the input's "
                             "large-scale colours; none: the model's own output; default auto: none for a model "
                             "with a colour anchor, which keeps the input's large-scale colours itself, else lowpass)")
    parser.add_argument("--maps", default="auto", metavar="auto|none|FILE.npy",
                        help="optics maps: auto (DATA/maps/<name>.npy for DATA/lr_*/ inputs), none, or one .npy for all")
    parser.add_argument("--lens", default=None, metavar="FILE",
                        help="compute the optics maps from the lens instead of --maps: a YAML/JSON file of "
                             "MetalensSpec fields with an optional noise: [shot, read] (else the middle of the "
                             "simulation's noise is assumed), or a dataset's lens.json (each image's lens and noise "
                             "by its name); images of another size are taken as the whole sensor, PSF widths scaled "
                             "(default with --maps auto: DATA/lens.json when the inputs are DATA/lr_*/ captures)")
    parser.add_argument("--bits", type=int, default=8, choices=(8, 16), help="bits per output sample (default %(default)s)")
    parser.add_argument("--self-ensemble", action="store_true",
                        help="average the restorations of the 8 rotations/mirrorings of each image (8× the time; "
                             "for lenses symmetric about the optical axis, see dmdiff.model.ensemble)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files of the output names that dmdiff did not write (default: refuse them; "
                             "outputs of earlier restores into --out are always replaced)")
    parser.add_argument("--resume", action="store_true",
                        help="skip images an earlier restore into --out finished with the same model and settings")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: on a CPU, when images are overlapped, torch's default "
                             "divided by twice the compute threads, the other cores reading and writing; torch's "
                             "default with --sequential)")
    parser.add_argument("--workers", type=int, default=None,
                        help="compute threads of a folder restore, each restoring its own image with its own copy "
                             "of the model (default: 2 on a CPU with 2+ cores for a model of at most 256 MiB, such "
                             "as the tiny preset; else 1); each holds one image's memory")
    parser.add_argument("--sequential", action="store_true",
                        help="read, restore and write one image after the other (default: a folder's next image "
                             "is read and its previous one written while one is restored, on threads)")
    parser.add_argument("--model-path", default=None, help="sd-turbo pipelines: the SD-Turbo folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    """Entry point of ``dmdiff restore`` (args: model, input, out, alpha, tile, overlap, color_correct,
    maps, lens, bits, self_ensemble, device, threads, workers, sequential, model_path, overwrite, resume,
    no_progress).
    Exit status 1 (:data:`~dmdiff.errors.EXIT_PARTIAL`) when an image failed."""
    record = restore(args.model, args.input, args.out, alpha=args.alpha, tile=args.tile, overlap=args.overlap,
                     color=args.color_correct, maps=args.maps, lens=args.lens, bits=args.bits,
                     self_ensemble=args.self_ensemble, device=args.device, model_path=args.model_path,
                     overwrite=args.overwrite, resume=args.resume, sequential=args.sequential,
                     threads=args.threads, workers=args.workers, progress=not args.no_progress)
    done = len(record["files"]) - record["failed"]
    resumed = sum(1 for e in record["files"] if e.get("resumed"))
    print(f"dmdiff restore: restored {done} of {len(record['files'])} image(s) into {args.out}"
          + (f" ({resumed} done by an earlier run, skipped)" if resumed else "")
          + f" (report: {Path(args.out) / REPORT_FILE})")
    if record["failed"]:
        print(f"dmdiff restore: {record['failed']} image(s) failed:", file=sys.stderr)
        for entry in record["files"]:
            if entry["status"] == "failed":
                print(f"  {entry['input']}: {entry['error']}", file=sys.stderr)
        return EXIT_PARTIAL
    return 0
