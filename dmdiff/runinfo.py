"""Provenance written next to every run's outputs: resolved config, seed, package versions, git rev."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# the atomic writers moved to dmdiff.outputs; these names stay importable from here
from dmdiff.outputs import (  # noqa: F401
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    write_json,
)

PACKAGES = ("dmdiff", "torch", "torchvision", "numpy", "scipy", "scikit-image", "diffusers",
            "transformers", "peft", "accelerate", "safetensors", "deepinv", "lpips", "papermill")


def usable_cores() -> int:
    """How many CPU cores this process may run on (its affinity where the OS reports one), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that determine results (None when not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: str | Path | None = None) -> str | None:
    """The git commit of the checkout containing ``path`` (default: this package), '+dirty' if modified."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(config: dict | None = None, seed: int | None = None, **extra: Any) -> dict:
    """A JSON-serialisable record of what produced a run."""
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "config": config,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **extra,
    }
