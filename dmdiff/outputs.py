"""What dmdiff may write where: atomic files and folders, and never a file it did not write.

Three kinds of output, three rules:

* **Atomic folders** (a dataset, pseudo pairs, a pipeline or backbone folder) are built in a hidden
  sibling ``.NAME.partial-XXXX`` and renamed into place (:func:`atomic_directory`). Each carries
  ``.dmdiff-manifest.json``, the list of every file it was built with. An existing folder is
  replaced only when it is one of ours and holds nothing else (:func:`check_replaceable`): the
  user's files never go with it. The partial folder carries ``.dmdiff-partial.json`` (its process
  id and host) from its first moment, so a later run can tell a partial folder left by a killed run
  from one being built right now, and removes only the former (:func:`clean_stale_partials`).
* **Run folders** (a training run, a recipe run, an evaluation report, a ``repro`` study) are
  written piece by piece. :func:`claim_folder` makes a new or empty folder ours by writing
  ``.dmdiff-output.json`` (its kind) into it; a folder that already holds other files is refused.
  Folders written by earlier dmdiff versions, before the marker, are recognised by their own
  record file (``legacy``).
* **Files in the user's folders** (``dmdiff restore --out shots``) are checked one by one by the
  command itself against the record of what it wrote there (``restore.json``).

Files are written as ordinary files are: ``0666 & ~umask`` (``0644`` under umask 022), folders
``0777 & ~umask``, although the temporary files they start as are private.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import numpy.lib.format

from dmdiff.errors import DmdiffError

__all__ = ["MANIFEST", "MARKER", "PARTIAL_MARKER", "OutputWarning", "atomic_write_bytes", "atomic_write_text",
           "write_json", "write_npy", "atomic_directory", "check_replaceable", "clean_stale_partials", "claim_folder",
           "check_claimable", "clean_stale_temp_files", "folder_files", "describe_entries", "usual_file_mode", "unwritable"]

MANIFEST = ".dmdiff-manifest.json"        # every file an atomic folder was built with
PARTIAL_MARKER = ".dmdiff-partial.json"   # in a folder still being built: who builds it
MARKER = ".dmdiff-output.json"            # in a run folder dmdiff claimed: its kind
_PARTIAL = ".partial-"
_REPLACED = ".replaced-"

#: A function listing the files (relative POSIX paths) an older dmdiff version wrote in a folder
#: without a manifest, or None when the folder is not such a folder.
LegacyParts = Callable[[Path], "set[str] | None"]


class OutputWarning(UserWarning):
    """Something about an output folder the user should know (stale partial folders removed...)."""


# ---- permissions and atomic files ------------------------------------------------------------------


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _owner_tag() -> str:
    """``<host hash>-<pid>``: which process of which machine made a temporary file."""
    return f"{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}-{os.getpid()}"


_TEMP_FILE = re.compile(r"^\..+\.dmdiff-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^.]+\.tmp$")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file gets the usual permissions (:func:`usual_file_mode`). On any error the temporary file
    is removed and ``path`` is left as it was; one left by a killed process
    (``.NAME.dmdiff-<host>-<pid>-XXXX.tmp``) is removed by :func:`clean_stale_temp_files`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.dmdiff-{_owner_tag()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, usual_file_mode())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (keys sorted; unknown types as ``str``)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Atomically write ``array`` as a ``.npy`` file (no pickles: object arrays are refused).

    The bytes are made in memory by ``numpy.lib.format.write_array`` and written by
    :func:`atomic_write_bytes`, so an interrupted write leaves no truncated file behind."""
    buf = io.BytesIO()
    numpy.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _usual_permissions(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode a new one gets under the umask (libraries
    that write through private temporary files, such as safetensors, leave ``0600``)."""
    file_mode, dir_mode = usual_file_mode(), 0o777 & ~_umask()
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, dir_mode)
        for name in files:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, file_mode)


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- listing ------------------------------------------------------------------------------------


def folder_files(folder: Path) -> set[str]:
    """Every file and symlink under ``folder`` (relative POSIX paths; symlinks are not followed),
    except this module's own markers at the top."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            out.add((rel / name).as_posix())
    return out - {MANIFEST, MARKER, PARTIAL_MARKER}


def describe_entries(paths: Iterable[str], n: int = 5) -> str:
    """``"a.txt, thesis/c.tex, ... (3 more)"`` for a listing."""
    paths = sorted(paths)
    shown = ", ".join(paths[:n])
    return shown + (f", ... ({len(paths) - n} more)" if len(paths) > n else "")


# ---- atomic folders -----------------------------------------------------------------------------


def check_replaceable(folder: Path, kind: str, legacy: LegacyParts | None = None) -> None:
    """Raise unless the existing ``folder`` may be replaced by a new ``kind`` folder.

    It may when it holds no files at all, or when it is a ``kind`` folder dmdiff built (its
    manifest names ``kind``; or, for folders of older versions, ``legacy`` lists its parts) and it
    holds no file besides those.

    Raises:
        DmdiffError: ``folder`` is not a folder, not a ``kind`` folder, or holds other files (the
            message lists some of them; it never suggests forcing the replacement).
    """
    if not folder.is_dir() or folder.is_symlink():
        raise DmdiffError(f"{folder} exists and is not a folder; choose another path")
    present = folder_files(folder)
    if not present:
        return  # an empty folder (or empty subfolders only): nothing to lose
    manifest = _read_json(folder / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("kind") == kind and isinstance(manifest.get("files"), list):
        ours = set(manifest["files"])
    else:
        ours = legacy(folder) if legacy is not None else None
        if ours is None:
            raise DmdiffError(f"{folder} is not a dmdiff {kind} folder, and it holds other files "
                              f"({describe_entries(present)}); it is never replaced. Choose a new or empty folder.")
    extra = present - ours
    if extra:
        raise DmdiffError(f"{folder} is a dmdiff {kind} folder but also holds files dmdiff did not write there "
                          f"({describe_entries(extra)}); refusing to replace it, so that they are not lost. "
                          "Move them out, or choose another folder.")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(marker: Any) -> bool:
    """Whether a partial folder's marker names a process of this host that no longer runs."""
    if not isinstance(marker, dict) or not isinstance(marker.get("pid"), int):
        return False
    return marker.get("host") == socket.gethostname() and not _process_alive(marker["pid"])


def clean_stale_partials(folder: Path) -> list[Path]:
    """Tidy up after killed runs that were building or replacing ``folder``.

    Hidden siblings ``.NAME.partial-*`` (a folder being built) and ``.NAME.replaced-*`` (the old
    folder, moved aside during its replacement) are handled only when they carry
    :data:`PARTIAL_MARKER` naming a process of this host that no longer runs: a partial folder is
    removed; a replaced one is put back when ``folder`` itself is missing (the killed run moved it
    aside and never installed the new one), else removed. Anything else is left alone.

    Returns:
        The removed paths (a :class:`OutputWarning` lists them).
    """
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return []
    removed = []
    for p in sorted(parent.iterdir()):
        replaced = p.name.startswith(f".{folder.name}{_REPLACED}")
        if not (replaced or p.name.startswith(f".{folder.name}{_PARTIAL}")):
            continue
        if not p.is_dir() or p.is_symlink() or not _stale(_read_json(p / PARTIAL_MARKER)):
            continue
        if replaced and not folder.exists() and not folder.is_symlink():
            (p / PARTIAL_MARKER).unlink(missing_ok=True)
            os.replace(p, folder)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        warnings.warn(f"removed {len(removed)} unfinished folder(s) left by an interrupted run: "
                      f"{describe_entries(p.name for p in removed)}", OutputWarning, stacklevel=3)
    return removed


def clean_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write_bytes` that killed processes of this machine
    left in ``folder`` (nothing else: the name must carry this machine and a process that no longer
    runs). Returns the removed paths."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    host = _owner_tag().split("-")[0]
    for p in folder.iterdir():
        match = _TEMP_FILE.match(p.name)
        if match and match["host"] == host and not _process_alive(int(match["pid"])) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _mark_partial(folder: Path) -> None:
    (folder / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")


@contextlib.contextmanager
def atomic_directory(folder: str | Path, kind: str, replace: bool = False,
                     legacy: LegacyParts | None = None) -> Iterator[Path]:
    """Build a ``kind`` folder atomically: yields a hidden temporary sibling to fill, which is renamed
    to ``folder`` when the block ends without an error.

    Before the block, stale partial folders of killed runs are removed (:func:`clean_stale_partials`)
    and an existing ``folder`` is checked: with ``replace`` it must be replaceable
    (:func:`check_replaceable`), without it, it must not exist. After the block the manifest
    (:data:`MANIFEST`: ``kind`` and every file) is written; the old folder is moved aside, the new
    one renamed into place and the old one removed, so ``folder`` is never half-written. On any
    error the temporary folder is removed and ``folder`` is left as it was.

    Raises:
        DmdiffError: ``folder`` exists and ``replace`` is False, or it may not be replaced.
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(folder, e) from None
    clean_stale_partials(folder)
    if folder.exists() or folder.is_symlink():
        if not replace:
            raise DmdiffError(f"{folder} already exists; choose another path")
        check_replaceable(folder, kind, legacy)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{_PARTIAL}"))
    try:
        _mark_partial(tmp)
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        write_json(tmp / MANIFEST, {"format": "dmdiff-manifest", "kind": kind, "files": sorted(folder_files(tmp))})
        _usual_permissions(tmp)
        _install(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``, moving an existing ``folder`` aside first and removing it last."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{_REPLACED}"))
        os.rmdir(old)
        os.replace(folder, old)
        _mark_partial(old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            (old / PARTIAL_MARKER).unlink(missing_ok=True)
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- run folders ----------------------------------------------------------------------------------


def _claim_state(folder: Path, kind: str, legacy: LegacyParts | None) -> bool:
    """Whether ``folder`` is ours already (True) or new/empty (False); raise when it is neither."""
    if folder.is_symlink() and not folder.exists():
        raise DmdiffError(f"{folder} is a broken symbolic link; choose another folder")
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise DmdiffError(f"{folder} exists and is not a folder; choose another path")
    marker = _read_json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("format") == "dmdiff-output":
        if marker.get("kind") != kind:
            raise DmdiffError(f"{folder} is a dmdiff {marker.get('kind')} folder, not a {kind} folder; "
                              "choose another folder")
        return True
    try:
        entries = folder_files(folder) | {p.name + "/" for p in folder.iterdir() if p.is_dir()}
    except OSError as e:
        raise DmdiffError(f"cannot read {folder}: {e.strerror or e}") from None
    if not entries:
        return False
    if legacy is not None and legacy(folder) is not None:
        return True
    raise DmdiffError(f"{folder} already holds files dmdiff did not write ({describe_entries(entries)}); "
                      f"the {kind} output needs a new or empty folder, or one an earlier dmdiff {kind} wrote. "
                      "Choose another folder.")


def check_claimable(folder: str | Path, kind: str, legacy: LegacyParts | None = None) -> None:
    """Raise (without writing anything) unless :func:`claim_folder` would accept ``folder``."""
    _claim_state(Path(folder), kind, legacy)


def claim_folder(folder: str | Path, kind: str, legacy: LegacyParts | None = None) -> Path:
    """Make ``folder`` a ``kind`` output folder of dmdiff and return it.

    Accepted: a missing or empty folder (created; :data:`MARKER` written), a folder with the marker
    of the same ``kind``, or one ``legacy`` recognises (an earlier version's; the marker is added).

    Raises:
        DmdiffError: ``folder`` is a file, another kind's folder, holds files dmdiff did not write,
            or cannot be written (permissions, read-only file system).
    """
    folder = Path(folder)
    if _claim_state(folder, kind, legacy):
        clean_stale_temp_files(folder)
        if (folder / MARKER).is_file():
            return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MARKER, {"format": "dmdiff-output", "kind": kind})
    except OSError as e:
        raise unwritable(folder, e) from None
    return folder


def unwritable(path: Path, error: OSError) -> DmdiffError:
    """The error for an output path that cannot be created or written (permissions, a read-only file
    system, a file where a folder should be); names ``path`` and the part that failed."""
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        why = "a file stands where a folder is needed"
    else:
        why = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}.get(error.errno, error.strerror or str(error))
    return DmdiffError(f"cannot write to {path}{where}: {why}; choose a folder you can write to")
