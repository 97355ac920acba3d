"""``dmdiff restore``: restore your own photos, of any size, with a trained DMDiff model.

``dmdiff restore --model RUN --input FILE|DIR --out DIR`` reads one image or every image of a
folder (not recursive; names sorted; hidden files skipped), restores each in blended tiles
(:mod:`dmdiff.model.tiling`: bounded memory for any size and aspect ratio, exactly
:meth:`DMDiff.restore` when the image fits in one tile) and writes ``DIR/<name>.png``.

* **Model.** ``RUN`` is a pipeline folder, a training run or a recipe run (its ``stage2/``), found by
  :func:`dmdiff.evaluate.resolve_model` and loaded by :meth:`DMDiffPipeline.from_pretrained`:
  safetensors only; a folder holding pickle weights (``.bin``/``.pt``/``.pth``/``.ckpt``/``.pkl``)
  is refused before anything is loaded.
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
* **Colour correction** against the input, ``"auto"`` by default (:data:`DEFAULT_COLOR_CORRECTION`
  says why; ``"none"`` writes the model's own output) (:data:`COLOR_CORRECTIONS`):
  ``"meanstd"`` matches each channel's mean and standard deviation to the input's (a global
  colour-cast fix); ``"lowpass"`` replaces the output's low-frequency part (Gaussian,
  σ = :data:`LOWPASS_SIGMA_PX`) by the input's, per channel, keeping the restored detail and the
  input's large-scale colours. Both also bring back some of the capture's haze: use them when the
  model shifts colours. ``"auto"`` (:func:`resolve_color_correction`) is ``"none"`` for a model
  with a colour anchor (``DMDiffConfig.anchor_sigma_px``: it keeps the large-scale colours of the
  input — deconvolved first with ``anchor_rl_iterations`` — itself, in training and inference) and
  ``"lowpass"`` for one without.
* **Self-ensemble** (``self_ensemble=True``, ``--self-ensemble``): each image is restored in its 8
  orientations (rotations by 90° and mirrorings, maps turned alike) and the results averaged
  (:mod:`dmdiff.model.ensemble`: 8× the time; sound for lenses symmetric about the optical axis).
* **Failures** of one file (unreadable image, bad maps, too small) do not stop a folder run: the
  rest continue, the failures are listed at the end and the exit status is 1.
* ``DIR/restore.json`` (rewritten atomically after every image): the model, α, tile settings,
  colour correction, maps option, device, ``settings`` (what ``--resume`` compares), ``written``
  (every output of dmdiff restore in the folder, of this run and earlier ones, with its sha256),
  and per file of this run its status, size, tile count, maps used, seconds and error.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdiff.device import resolve_device
from dmdiff.errors import EXIT_PARTIAL, NO_SPACE, ConfigError, DmdiffError, ImageReadError
from dmdiff.imageio import IMAGE_EXTENSIONS, check_min_size, png_bytes, read_image
from dmdiff.model.dmdiff import check_alpha
from dmdiff.model.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, check_tiling, tiled_restore
from dmdiff.outputs import atomic_write_bytes, clean_stale_temp_files, unwritable, write_json
from dmdiff.runinfo import provenance

__all__ = ["COLOR_CORRECTIONS", "DEFAULT_COLOR_CORRECTION", "LOWPASS_SIGMA_PX", "REPORT_FILE", "list_inputs",
           "output_paths", "load_maps", "find_maps", "resolve_color_correction", "color_correct", "previous_report",
           "written_outputs", "check_outputs", "model_digest", "restore", "main"]

#: What :func:`color_correct` does; ``"auto"`` is resolved to one of them per model.
CORRECTIONS = ("none", "meanstd", "lowpass")
COLOR_CORRECTIONS = ("auto", *CORRECTIONS)
#: The default colour correction: a tiny model trained without the colour anchor shifts colours by
#: an amount that depends on what each tile holds, which shows as soft colour steps between tiles
#: on large photos; ``lowpass`` keeps the restored detail and takes the large-scale colours from
#: the input (on the held-out test split it also adds PSNR: README, "Training and evaluation"). A
#: model with the anchor does this itself, so ``auto`` leaves its output as it is.
DEFAULT_COLOR_CORRECTION = "auto"
#: Gaussian σ (px) that separates "colour" from "detail" in the ``lowpass`` correction.
LOWPASS_SIGMA_PX = 12.0
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
    from dmdiff.data.dataset import images_by_stem

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
    folder = image.parent
    candidate = folder.parent / "maps" / f"{image.stem}.npy"
    return candidate if folder.name.startswith("lr_") and candidate.is_file() else None


# ---------------------------------------------------------------------------------------------
# colour correction
# ---------------------------------------------------------------------------------------------


def resolve_color_correction(method: str, model) -> str:
    """``method`` with ``"auto"`` replaced by what it means for ``model`` (a :class:`DMDiff`):
    ``"none"`` when it has a colour anchor (``config.anchor_sigma_px``), else ``"lowpass"``.

    Raises:
        ConfigError: ``method`` is not one of :data:`COLOR_CORRECTIONS`.
    """
    if method not in COLOR_CORRECTIONS:
        raise ConfigError(f"color correction must be one of {', '.join(COLOR_CORRECTIONS)}, got {method!r}")
    if method != "auto":
        return method
    return "none" if model.config.anchor_sigma_px is not None else "lowpass"


def color_correct(restored: np.ndarray, reference: np.ndarray, method: str,
                  sigma_px: float = LOWPASS_SIGMA_PX) -> np.ndarray:
    """Correct the colours of ``restored`` against ``reference`` (both float ``(H, W, 3)`` in ``[0, 1]``).

    ``"none"``: unchanged; ``"meanstd"``: per channel ``(o − mean_o) / std_o · std_r + mean_r``;
    ``"lowpass"``: per channel ``o − G_σ(o) + G_σ(r)`` with a Gaussian ``G_σ`` of ``sigma_px``
    (reflected edges). Returns float32 ``(H, W, 3)`` clipped to ``[0, 1]``.
    """
    if method not in CORRECTIONS:
        hint = " (resolve 'auto' for a model with resolve_color_correction)" if method == "auto" else ""
        raise ConfigError(f"color correction must be one of {', '.join(CORRECTIONS)}, got {method!r}{hint}")
    out = np.asarray(restored, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if method == "meanstd":
        mean_o, std_o = out.mean(axis=(0, 1)), out.std(axis=(0, 1))
        mean_r, std_r = ref.mean(axis=(0, 1)), ref.std(axis=(0, 1))
        gain = np.where(std_o > 1e-6, std_r / np.maximum(std_o, 1e-6), 1.0)
        out = (out - mean_o) * gain + mean_r
    elif method == "lowpass":
        from scipy.ndimage import gaussian_filter

        def low(a: np.ndarray) -> np.ndarray:
            return gaussian_filter(a, sigma=(sigma_px, sigma_px, 0), mode="reflect")

        out = out - low(out) + low(ref)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


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


def model_digest(pipeline_dir: Path) -> str:
    """A sha256 of a pipeline folder's config and trained weights: what ``--resume`` compares."""
    from dmdiff.model.pipeline import CONFIG_FILE, TRAINABLE_FILE

    h = hashlib.sha256()
    for name in (CONFIG_FILE, TRAINABLE_FILE):
        h.update((pipeline_dir / name).read_bytes())
    return h.hexdigest()


def _finished(report: dict | None, settings: dict, written: dict[str, str | None], out: Path) -> dict[str, dict]:
    """``{input path: entry}`` of the images a previous run with the same ``settings`` restored and
    whose outputs are still as written (what ``--resume`` skips)."""
    if report is None or report.get("settings") != settings:
        return {}
    return {e["input"]: e for e in report["files"]
            if e.get("status") == "ok" and e.get("output") and written.get(Path(e["output"]).name)
            and _ours(out / Path(e["output"]).name, written)}


def restore(model: str | Path, images: str | Path, out: str | Path, *, alpha: float = 1.0,
            tile: int | None = None, overlap: int | None = None, color: str = DEFAULT_COLOR_CORRECTION,
            maps: str = "auto", bits: int = 8, self_ensemble: bool = False, device: str | None = None,
            model_path: str | None = None, overwrite: bool = False, resume: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Restore one image or a folder of them into ``out`` (module docstring); returns the report.

    Args:
        model: pipeline folder, training run or recipe run.
        images: an image file or a folder of images.
        out: output folder (created if missing).
        alpha: in ``[0, 1.2]``: 0 fidelity (neutral path), 1 perceptual (positive path).
        tile, overlap: tile side and minimum overlap in pixels (:func:`dmdiff.model.tiling.check_tiling`;
            None: ``DEFAULT_TILE_PX`` = 256, ``DEFAULT_OVERLAP_PX`` = 32).
        color: colour correction, one of :data:`COLOR_CORRECTIONS` (the report holds the resolved one).
        maps: ``"auto"``, ``"none"`` or a ``.npy`` file of maps (module docstring).
        bits: 8 or 16 bits per output sample.
        self_ensemble: average the restorations of the 8 orientations of each image.
        device: torch device (default: CUDA when available, else CPU).
        model_path: ``sd-turbo`` pipelines: where SD-Turbo is.
        overwrite: replace existing files of the output names even when dmdiff did not write them.
        resume: skip the images an earlier run into ``out`` restored with the same model and settings
            (and whose outputs are unchanged).
        progress: a tqdm bar over the images (with the tile count of the current one).

    Returns:
        The ``restore.json`` record; ``record["failed"]`` counts the images that could not be restored.

    Raises:
        DmdiffError: bad arguments, model, inputs or output folder (nothing is written then).
    """
    from tqdm.auto import tqdm

    from dmdiff.evaluate import resolve_model
    from dmdiff.model.pipeline import DMDiffPipeline

    alpha = check_alpha(alpha)
    if color not in COLOR_CORRECTIONS:
        raise ConfigError(f"--color-correct must be one of {', '.join(COLOR_CORRECTIONS)}, got {color!r}")
    if bits not in (8, 16):
        raise ConfigError(f"--bits must be 8 or 16, got {bits!r}")
    inputs = list_inputs(images)
    outputs = output_paths(images, inputs, out)
    out = Path(out)
    report = previous_report(out)
    written = written_outputs(report)
    check_outputs(outputs, written, overwrite)
    shared_maps = load_maps(maps) if maps not in ("auto", "none") else None
    pipeline_dir, run = resolve_model(model, stage="stage2")
    device = resolve_device(device)
    net = DMDiffPipeline.from_pretrained(pipeline_dir, model_path=model_path, device=device).model
    tile, overlap = check_tiling(net, DEFAULT_TILE_PX if tile is None else tile,
                                 DEFAULT_OVERLAP_PX if overlap is None else overlap)
    color = resolve_color_correction(color, net)
    settings = {"model": str(pipeline_dir.resolve()), "model_sha256": model_digest(pipeline_dir), "alpha": alpha,
                "tile": tile, "overlap": overlap, "color_correct": color, "maps": maps, "bits": bits,
                "self_ensemble": bool(self_ensemble)}
    finished = _finished(report, settings, written, out) if resume else {}

    record: dict[str, Any] = {
        "format": REPORT_FORMAT, "format_version": 1,
        "model": str(pipeline_dir), "run": None if run is None else str(run), "preset": net.config.preset,
        "alpha": alpha, "tile": tile, "overlap": overlap, "color_correct": color, "maps": maps, "bits": bits,
        "self_ensemble": bool(self_ensemble), "device": str(device), "torch_threads": torch.get_num_threads(),
        "settings": settings, "files": [], "failed": 0, "written": written, "provenance": provenance(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(out)
        write_json(out / REPORT_FILE, record)
    except OSError as e:
        raise unwritable(out, e) from None
    bar = tqdm(list(zip(inputs, outputs)), desc="dmdiff restore", unit="image", disable=not progress)
    for source, target in bar:
        bar.set_postfix_str(source.name)
        if str(source) in finished:
            record["files"].append({**finished[str(source)], "resumed": True})
            continue
        entry: dict[str, Any] = {"input": str(source), "output": str(target), "status": "ok"}
        start = time.perf_counter()
        try:
            image = read_image(source)
            check_min_size(image, net.config.grid_size, "SVDA grid", path=source)
            entry["size"] = list(image.shape[:2])
            maps_file = find_maps(source, maps)
            entry["maps"] = None if maps_file is None else str(maps_file)
            if shared_maps is not None or maps_file is None:
                image_maps = shared_maps
            else:
                image_maps = load_maps(maps_file)
            tiles = []

            def on_tile(done: int, total: int) -> None:
                tiles[:] = [total]
                bar.set_postfix_str(f"{source.name}: tile {done}/{total}")

            restored = _restore_array(net, image, image_maps, alpha, tile, overlap, on_tile, self_ensemble)
            entry["tiles"] = tiles[0]
            payload = png_bytes(color_correct(restored, image, color), bits=bits)
            # the report names the file (and its hash) before it exists, so a run killed in between
            # leaves no output that a later run would take for a file dmdiff did not write
            record["written"][target.name] = _sha256(payload)
            write_json(out / REPORT_FILE, record)
            atomic_write_bytes(target, payload)
        except FILE_ERRORS as e:
            if isinstance(e, OSError) and e.errno in NO_SPACE:
                raise       # a full disk fails every later image too: stop (the CLI reports it)
            reason = e.reason if isinstance(e, ImageReadError) else str(e) or type(e).__name__
            entry.update(status="failed", output=None, error=reason)
            record["failed"] += 1
        entry["seconds"] = round(time.perf_counter() - start, 3)
        record["files"].append(entry)
        write_json(out / REPORT_FILE, record)
    bar.close()
    return record


def _restore_array(model, image: np.ndarray, maps: np.ndarray | None, alpha: float, tile: int, overlap: int,
                   on_tile, self_ensemble: bool = False) -> np.ndarray:
    """One image ``(H, W, 3)`` float32 → restored ``(H, W, 3)`` float32 in ``[0, 1]`` (tiled; with
    ``self_ensemble``, the mean over the 8 orientations)."""
    from dmdiff.model.ensemble import self_ensemble as ensemble
    from dmdiff.model.pipeline import as_image, to_numpy

    def run(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return tiled_restore(model, x, m, alpha=alpha, tile=tile, overlap=overlap, on_tile=on_tile)

    x = as_image(image)[None]
    m = None if maps is None else torch.from_numpy(maps)[None]
    return to_numpy((ensemble(run, x, m) if self_ensemble else run(x, m))[0])


def main(args) -> int:
    """Entry point of ``dmdiff restore`` (args: model, input, out, alpha, tile, overlap, color_correct,
    maps, bits, self_ensemble, device, threads, model_path, overwrite, resume, no_progress).
    Exit status 1 (:data:`~dmdiff.errors.EXIT_PARTIAL`) when an image failed."""
    if args.threads is not None:
        if args.threads < 1:
            raise DmdiffError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    record = restore(args.model, args.input, args.out, alpha=args.alpha, tile=args.tile, overlap=args.overlap,
                     color=args.color_correct, maps=args.maps, bits=args.bits,
                     self_ensemble=args.self_ensemble, device=args.device, model_path=args.model_path,
                     overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress)
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
