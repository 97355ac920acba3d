"""Atomic training checkpoints in safetensors + JSON (no pickles anywhere).

Layout of ``RUN/checkpoint-N/`` (N = optimizer steps done)::

    model.safetensors       the trained parameters, by ``DMDiff.trainable_parameters()`` name
    optimizer.safetensors   the optimizer's per-parameter tensors, keys ``state.<param index>.<name>``
    optimizer.json          its param groups and any non-tensor per-parameter values
    ema.safetensors         the EMA weights (only with EMA)
    discriminator.safetensors, discriminator_optimizer.safetensors, discriminator_optimizer.json
                            the discriminators' weights (``<path>.<name>``, spectral norm's vectors
                            included) and their optimizer, stored as the model's (only with an
                            adversarial term)
    rng-<rank>.safetensors  torch CPU (and CUDA) generator states of process <rank>
    rng-<rank>.json         python ``random`` and numpy legacy generator states of process <rank>
    state.json              step, data position, world size, extra scalars (grad scaler) and the
                            list of files with their tensor shapes; written last

A checkpoint is written into ``RUN/.checkpoint-N.partial/`` and renamed into place only when
complete (files fsynced first), so killing the process at any moment leaves either the previous
checkpoints or the new one, never a half-written ``checkpoint-N``. Leftover ``.partial`` folders
are ignored and cleaned up by the next run. :func:`find_checkpoint` resolves ``latest`` to the
highest complete checkpoint whose files all load, warning about (and skipping) broken ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dmdiff.errors import DmdiffError
from dmdiff.weights import load_safetensors, save_safetensors

PREFIX = "checkpoint-"
STATE = "state.json"
FORMAT = "dmdiff-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
#: ``state.json``'s keys and their JSON types (``files``: file name → tensor shapes, or None for JSON files).
STATE_KEYS = {"step": int, "samples_seen": int, "world_size": int, "extra": dict, "files": dict}
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json")
#: The discriminators' files (:mod:`dmdiff.train.adversarial`): all three or none.
DISCRIMINATOR = "discriminator.safetensors"
DISCRIMINATOR_FILES = (DISCRIMINATOR, "discriminator_optimizer.safetensors", "discriminator_optimizer.json")
DAMAGED = "the checkpoint is damaged; resume from another one (--resume latest skips damaged ones)"


class CheckpointWarning(UserWarning):
    """A checkpoint folder was skipped (incomplete or unreadable)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    model, ema: name → tensor (CPU); ema None without EMA.
    optimizer: a ``torch.optim.Optimizer.state_dict()``-shaped dict (tensors on the CPU).
    discriminator, discriminator_optimizer: the discriminators' weights (name → tensor) and their
        optimizer's state dict; None when the run had no adversarial term.
    rng: the calling process's generator states (see :func:`restore_rng`), or None when the
        checkpoint has none for this rank.
    state: the ``state.json`` record (``step``, ``samples_seen``, ``world_size``, ``extra``).
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    ema: dict[str, torch.Tensor] | None
    rng: dict | None
    state: dict
    discriminator: dict[str, torch.Tensor] | None = None
    discriminator_optimizer: dict | None = None


# ---- generator states ----------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states: ``(tensors, json_dict)``.

    tensors: ``torch_cpu`` (uint8) and ``torch_cuda_<i>`` per visible CUDA device.
    json_dict: ``python`` (``random.getstate()`` as lists) and ``numpy`` (the legacy global
    generator's ``get_state(legacy=False)`` with its key as a list).
    """
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_json = {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}}
    return tensors, {"python": [version, list(internal), gauss], "numpy": np_json}


def restore_rng(rng: Mapping) -> None:
    """Inverse of :func:`rng_state` (``rng`` = ``{"tensors": ..., "json": ...}`` as in :class:`Checkpoint`)."""
    tensors, js = rng["tensors"], rng["json"]
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(js["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)


# ---- optimizer state <-> tensors + JSON --------------------------------------------------------


def flatten_optimizer(state_dict: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors tensors and a JSON-able dict."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- writing --------------------------------------------------------------------------------------


def partial_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The temporary folder a checkpoint of ``step`` is assembled in."""
    return Path(run_dir) / f".{PREFIX}{step}.partial"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(folder: Path, name: str, tensors: Mapping[str, torch.Tensor], files: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_safetensors(folder / name, tensors)
    files[name] = {k: list(v.shape) for k, v in tensors.items()}


def _dump(folder: Path, name: str, data: Any, files: dict) -> None:
    (folder / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    files[name] = None


def write_rng(folder: Path, rank: int) -> None:
    """Write this process's generator states into a checkpoint being assembled (every rank)."""
    tensors, js = rng_state()
    save_safetensors(folder / f"rng-{rank}.safetensors", tensors)
    (folder / f"rng-{rank}.json").write_text(json.dumps(js) + "\n")


def write_checkpoint(folder: Path, step: int, *, model: Mapping[str, torch.Tensor], optimizer: Mapping,
                     ema: Mapping[str, torch.Tensor] | None, samples_seen: int, world_size: int,
                     extra: Mapping[str, Any] | None = None,
                     discriminator: Mapping[str, torch.Tensor] | None = None,
                     discriminator_optimizer: Mapping | None = None) -> Path:
    """Complete the checkpoint assembled in ``folder`` (see :func:`partial_dir`; the ``rng-<rank>``
    files of every process are already there) and rename it to ``RUN/checkpoint-<step>``.

    Args:
        folder: ``RUN/.checkpoint-<step>.partial``.
        step: optimizer steps done.
        model, ema: trained weights and EMA weights (name → tensor).
        optimizer: ``optimizer.state_dict()``.
        samples_seen: training samples consumed by all processes together (the data position).
        world_size: number of processes (the data order depends on it).
        extra: JSON-able scalars to keep (e.g. the grad scaler's state).
        discriminator, discriminator_optimizer: the discriminators' ``state_dict()`` and their
            optimizer's (both or neither).

    Returns:
        The final ``RUN/checkpoint-<step>`` path. An existing one (a rerun from an earlier
        checkpoint) is replaced only after the new one is complete.
    """
    files: dict[str, Any] = {}
    _save(folder, "model.safetensors", model, files)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    _save(folder, "optimizer.safetensors", opt_tensors, files)
    _dump(folder, "optimizer.json", opt_meta, files)
    if ema is not None:
        _save(folder, "ema.safetensors", ema, files)
    if (discriminator is None) != (discriminator_optimizer is None):
        raise ValueError("write_checkpoint: give the discriminator's weights and its optimizer state together")
    if discriminator is not None:
        _save(folder, DISCRIMINATOR, discriminator, files)
        opt_tensors, opt_meta = flatten_optimizer(discriminator_optimizer)
        _save(folder, DISCRIMINATOR_FILES[1], opt_tensors, files)
        _dump(folder, DISCRIMINATOR_FILES[2], opt_meta, files)
    for rank in range(world_size):
        for suffix in (".safetensors", ".json"):
            name = f"rng-{rank}{suffix}"
            if not (folder / name).is_file():
                raise DmdiffError(f"{folder}: process {rank} did not write {name}")
            files[name] = None
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
             "samples_seen": int(samples_seen), "world_size": int(world_size), "extra": dict(extra or {}),
             "files": files}
    for name in files:
        _fsync(folder / name)
    (folder / STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    _fsync(folder / STATE)
    final = folder.parent / f"{PREFIX}{step}"
    old = None
    if final.exists():
        old = folder.parent / f".{PREFIX}{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(folder, final)
    _fsync(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- finding and reading ---------------------------------------------------------------------------


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder holding a ``state.json``, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        match = _NAME.match(p.name)
        if match and p.is_dir() and (p / STATE).is_file():
            out.append((int(match.group(1)), p))
    return sorted(out)


def clean_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Tidy up after interrupted checkpoint writes: delete ``.checkpoint-N.partial`` folders, and put
    a ``.checkpoint-N.old`` (a checkpoint being replaced) back as ``checkpoint-N`` when the
    replacement never arrived, else delete it. Returns the deleted paths."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if not p.name.startswith(f".{PREFIX}"):
                continue
            final = run_dir / p.name[1:].rsplit(".", 1)[0]
            if p.name.endswith(".old") and not final.exists():
                os.replace(p, final)
            elif p.name.endswith((".partial", ".old")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns what was deleted."""
    doomed = [p for _, p in list_checkpoints(run_dir)[:-keep_last]] if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _check_state(state_file: Path, state: Any) -> dict:
    """``state`` (the parsed ``state.json``) if it has the :data:`STATE_KEYS` with their types and
    lists the :data:`REQUIRED_FILES` (and all :data:`DISCRIMINATOR_FILES` or none) by plain file
    names; else a DmdiffError naming the file and key."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DmdiffError(f"{state_file}: not a dmdiff checkpoint")
    for key, kind in STATE_KEYS.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            wanted = "a non-negative integer" if kind is int else "a JSON object"
            raise DmdiffError(f"{state_file}: {key!r} must be {wanted}, got {value!r}; {DAMAGED}")
    names = state["files"]
    strange = [name for name in names if name in ("", "..") or Path(name).name != name]
    lacking = [name for name in REQUIRED_FILES if name not in names]
    if any(name in names for name in DISCRIMINATOR_FILES):
        lacking += [name for name in DISCRIMINATOR_FILES if name not in names]
    if strange or lacking:
        what = f"names no file of the folder: {strange}" if strange else f"lacks {lacking}"
        raise DmdiffError(f"{state_file}: 'files' {what}; {DAMAGED}")
    return state


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> Checkpoint:
    """Read and verify a checkpoint folder.

    Raises:
        DmdiffError: naming the file: no ``state.json``, an invalid one (see :func:`_check_state`),
            a listed file missing, unreadable, truncated or not safetensors, or tensor shapes that
            differ from those recorded.
    """
    path = Path(path)
    state_file = path / STATE
    if not state_file.is_file():
        raise DmdiffError(f"{path}: not a complete checkpoint (no {STATE})")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:       # ValueError: invalid JSON or UTF-8
        raise DmdiffError(f"{state_file}: unreadable ({e})") from None
    files = _check_state(state_file, state)["files"]
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise DmdiffError(f"{path}: incomplete checkpoint, missing {missing}")

    def tensors(name: str) -> dict[str, torch.Tensor] | None:
        if name not in files:
            return None
        out = load_safetensors(path / name)
        shapes = {k: list(v.shape) for k, v in out.items()}
        if files[name] is not None and shapes != files[name]:
            raise DmdiffError(f"{path / name}: tensors differ from those recorded in {STATE}")
        return out

    def json_file(name: str) -> Any:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError) as e:
            raise DmdiffError(f"{path / name}: unreadable ({e})") from None

    rng = None
    if f"rng-{rank}.safetensors" in files:
        rng = {"tensors": tensors(f"rng-{rank}.safetensors"), "json": json_file(f"rng-{rank}.json")}
    optimizer = unflatten_optimizer(tensors("optimizer.safetensors"), json_file("optimizer.json"))
    disc_optimizer = None
    if DISCRIMINATOR in files:
        disc_optimizer = unflatten_optimizer(tensors(DISCRIMINATOR_FILES[1]), json_file(DISCRIMINATOR_FILES[2]))
    return Checkpoint(path=path, step=state["step"], model=tensors("model.safetensors"), optimizer=optimizer,
                      ema=tensors("ema.safetensors"), rng=rng, state=state, discriminator=tensors(DISCRIMINATOR),
                      discriminator_optimizer=disc_optimizer)


def find_checkpoint(run_dir: str | os.PathLike, resume: str, rank: int = 0) -> Checkpoint | None:
    """Resolve ``--resume``: ``"latest"`` (None when the run has no checkpoint yet) or a path.

    ``latest`` is the highest-step complete checkpoint that loads; broken ones are skipped with a
    :class:`CheckpointWarning`. A path must be a loadable checkpoint folder.

    Raises:
        DmdiffError: a given path does not exist or fails to load.
    """
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise DmdiffError(f"--resume {resume}: no such checkpoint folder (use 'latest' or a "
                              f"{PREFIX}N folder of a run)")
        return load_checkpoint(path, rank)
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, rank)
        except DmdiffError as e:
            warnings.warn(f"skipping broken checkpoint: {e}", CheckpointWarning, stacklevel=2)
    return None
