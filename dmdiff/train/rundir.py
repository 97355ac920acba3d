"""Writing a training run's folder (:mod:`dmdiff.runs` has the layout): the checks before a run
starts or resumes, its config and provenance records, and the metrics log.

``metrics.jsonl`` holds one JSON object per line: ``{"step", "kind": "train", "loss", terms, "lr",
"paths", "path_loss", "step_time_s"}`` and ``{"step", "kind": "val", "path", "psnr", "ssim",
"psnr_input", "ssim_input"}``; a train line averages the ``log_every`` steps before it: ``paths``
counts the images of each path, ``path_loss`` is the mean loss of the micro-batches that trained
that path alone (paths absent when none did; with ``path_sampling: sample``, mixed micro-batches
count in ``loss`` only). With an adversarial term (``adversarial.weight > 0``) ``terms`` include
``adv_g`` (the generator's hinge term, unweighted), ``adv_d`` (the discriminators' hinge loss),
``d_real`` / ``d_fake`` (their mean logits on targets and outputs) and, with an R1 penalty, ``r1``
(:data:`dmdiff.train.adversarial.TERMS`). :func:`dmdiff.runs.read_metrics` reads it.

The run's ``checkpoint-N/`` folders are :mod:`dmdiff.train.checkpoint`'s; with an adversarial term
each also holds ``discriminator.safetensors``, ``discriminator_optimizer.safetensors`` and
``discriminator_optimizer.json`` (the patch discriminators and their Adam state, never copied into
``pipeline/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmdiff.config import dump_yaml, to_dict
from dmdiff.errors import DmdiffError
from dmdiff.outputs import atomic_write_text, check_claimable, claim_folder, write_json
from dmdiff.runinfo import provenance
from dmdiff.runs import (
    CONFIG,
    METRICS,
    PIPELINE,
    RUN_INFO,
    RUN_KIND,
    read_metrics,
    run_folder_parts,
)
from dmdiff.train.checkpoint import list_checkpoints
from dmdiff.train.config import TrainConfig, load_train_config

#: Settings that may change when a run is resumed: they do not change the trained weights
#: (``steps`` extends or shortens the run; gradient checkpointing recomputes the same activations).
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "validate_every", "val_images", "val_crop_px",
                     "log_every", "num_workers", "threads", "recipe", "gradient_checkpointing"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "recipe":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs, except :data:`RESUMABLE_CHANGES`."""
    fa, fb = _flat(to_dict(a)), _flat(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys()
                  if fa.get(k) != fb.get(k) and k.split(".")[0] not in RESUMABLE_CHANGES)


def check_run(run: Path, cfg: TrainConfig, resume: str | None) -> None:
    """Check that ``run`` may be started or resumed with ``cfg`` (read-only; every process).

    Raises:
        DmdiffError: ``run`` is a file, or a folder holding files that are not a dmdiff training
            run's; it already holds checkpoints or a model and ``resume`` is None; or, when
            resuming, the run's config differs from ``cfg`` in settings that change the weights (the
            keys are listed).
    """
    check_claimable(run, RUN_KIND, run_folder_parts)
    if resume is None and (list_checkpoints(run) or (run / PIPELINE).exists()):
        raise DmdiffError(f"{run} already holds a training run; pass --resume latest to continue it, "
                          "or choose another --out")
    if resume is not None and (run / CONFIG).is_file():
        diff = config_differences(load_train_config(run / CONFIG), cfg)
        if diff:
            raise DmdiffError(f"{run}: the config differs from the run's {CONFIG} in {', '.join(diff)}; "
                              "these change the trained weights, so the run cannot be resumed with them "
                              "(choose another --out)")


def write_run_info(run: Path, cfg: TrainConfig, resume: str | None, command: str) -> None:
    """Write ``config.yaml`` and ``run.json`` (main process): a new provenance record, or, when
    resuming, one appended to the run's ``resumes`` list."""
    info = {}
    if resume is not None and (run / RUN_INFO).is_file():
        try:
            info = json.loads((run / RUN_INFO).read_text())
        except (OSError, ValueError):
            info = {}       # damaged (e.g. edited by hand): a new record replaces it
        info = info if isinstance(info, dict) else {}
    claim_folder(run, RUN_KIND, run_folder_parts)
    atomic_write_text(run / CONFIG, dump_yaml(to_dict(cfg)))
    record = provenance(config=to_dict(cfg), seed=cfg.seed, command=command)
    if info:
        info.setdefault("resumes", []).append(record)
    else:
        info = record
    write_json(run / RUN_INFO, info)


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer (main process); on resume, lines past the resumed step
    (written by the interrupted run after its last checkpoint) are dropped first."""

    def __init__(self, run: Path, resumed_step: int):
        self.path = run / METRICS
        if self.path.is_file():
            kept = [json.dumps(r, sort_keys=True) for r in read_metrics(run) if r.get("step", 0) <= resumed_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append one record as a JSON line."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
