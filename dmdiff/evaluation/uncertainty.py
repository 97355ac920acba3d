"""Paired differences between methods with bootstrap intervals that resample source photos.

The test frames of a simulated dataset are crops of a few photos (``dmdiff simulate``: 4 crops of
each of 3 test photos by default), and crops of one photo share its content, so their scores are
correlated: resampling *frames* would treat 12 correlated numbers as 12 independent ones and give
intervals that are too narrow. Here the unit of resampling is the **source photo**.

Definitions (:func:`paired_bootstrap`):

* per image ``i`` the paired difference ``d_i = score(method, i) − score(base, i)`` (PSNR in dB by
  default, whole frame or one field zone of :mod:`dmdiff.evaluation.field`);
* per photo ``p`` the mean ``d_p`` of its frames' differences; the **estimate** is the mean of the
  photo means (each photo weighs the same);
* the **interval** is the percentile interval of that estimate over ``resamples`` (default 2000)
  bootstrap samples, each drawing as many photos as there are, with replacement, from a
  ``numpy.random.default_rng(seed)`` (deterministic: the same inputs and seed give the same interval);
* an effect is **distinguishable from zero** when its 95 % interval excludes 0.

Few photos make coarse intervals: with the default 3 test photos there are only 10 distinct
resamples (multisets of 3 out of 3), so the 95 % interval is essentially the range of the per-photo
means and an effect excludes zero only when every photo agrees in sign. That is what 3 photos can
support; more test photos (or the external check set) narrow it.

**Several training seeds** (:func:`pooled_differences`): evaluations of models trained with
different seeds on the same test set are paired by image name; each image's difference is first
averaged over the seeds, then the photos are resampled as above. So the estimate is the effect
expected over training runs (as far as the seeds sample it) and the interval covers the
photo-to-photo variation; the seeds are not resampled as a second level, because with two or three
seeds a bootstrap over them has only 3–10 distinct outcomes and says little. The spread between
seeds is reported beside the interval instead (the mean difference of each seed alone), so a
reader sees when the seeds disagree more than the interval is wide.

With one photo (or no photo structure at all) the interval cannot be computed from photos: the
record says so (``low``/``high`` None) rather than fall back silently to frames.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dmdiff.data.dataset import image_source, read_lens
from dmdiff.errors import DmdiffError

__all__ = ["RESAMPLES", "LEVEL", "source_photos", "image_scores", "paired_bootstrap", "pooled_differences",
           "differences_table", "format_differences", "add_arguments", "main"]

#: Bootstrap samples per interval.
RESAMPLES = 2000
#: Coverage of the intervals.
LEVEL = 0.95


def source_photos(names: Sequence[str], dataset: str | Path | None = None) -> list[str]:
    """The source photo of each image: the dataset's ``lens.json`` record (``images[name].source``)
    when it has one, else read from the name (:func:`dmdiff.data.dataset.image_source`)."""
    lens = read_lens(dataset) if dataset is not None and Path(dataset).is_dir() else None
    images = (lens or {}).get("images") or {}
    return [str(images.get(n, {}).get("source") or image_source(n)) for n in names]


def image_scores(metrics: Mapping, method: str, key: str = "psnr", zone: str | None = None) -> dict[str, float]:
    """``{image name: score}`` of ``method`` in a ``metrics.json`` record: ``per_image`` for the whole
    frame, ``field.per_image`` for a ``zone``; DmdiffError naming what is missing."""
    if zone is None:
        found = {r["name"]: r["methods"][method][key] for r in metrics.get("per_image", [])
                 if method in r["methods"] and key in r["methods"][method]}
    else:
        per_image = (metrics.get("field") or {}).get("per_image", {})
        found = {n: m[method][zone][key] for n, m in per_image.items() if method in m and zone in m[method]}
    if not found:
        where = "per_image" if zone is None else f"field.per_image (zone {zone!r})"
        source = metrics.get("dataset", "the report")
        raise DmdiffError(f"no {key!r} scores of method {method!r} in {where} of {source}")
    return found


def _group_means(d: np.ndarray, groups: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The sorted group names and the mean of ``d`` within each."""
    names = sorted(set(groups))
    index = np.array([names.index(g) for g in groups])
    return names, np.bincount(index, weights=d, minlength=len(names)) / np.bincount(index, minlength=len(names))


def paired_bootstrap(differences: Sequence[float], groups: Sequence[str] | None = None, *,
                     resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """The mean of per-group mean differences and its bootstrap percentile interval over groups.

    Args:
        differences: ``(N,)`` paired differences, one per image.
        groups: ``(N,)`` the source photo of each image (None: every image its own group, i.e.
            resampling frames).
        resamples, seed, level: bootstrap samples, generator seed, interval coverage.

    Returns:
        ``{"mean", "low", "high", "excludes_zero", "per_group": {group: mean}, "groups": count,
        "images": N, "resamples", "seed", "level"}``; ``low``/``high`` None (and ``excludes_zero``
        False) with fewer than two groups.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise DmdiffError(f"paired_bootstrap needs a non-empty 1-D array of finite differences, got shape {d.shape}")
    groups = [str(i) for i in range(d.size)] if groups is None else [str(g) for g in groups]
    if len(groups) != d.size:
        raise DmdiffError(f"{d.size} differences but {len(groups)} group labels")
    names, means = _group_means(d, groups)
    record = {"mean": float(means.mean()), "low": None, "high": None, "excludes_zero": False,
              "per_group": {n: float(m) for n, m in zip(names, means)}, "groups": len(names), "images": int(d.size),
              "resamples": int(resamples), "seed": int(seed), "level": float(level)}
    if len(names) < 2:
        return record
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(int(resamples), len(names)))
    estimates = means[draws].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    record.update(low=float(low), high=float(high), excludes_zero=bool(low > 0 or high < 0))
    return record


def pooled_differences(runs: Sequence[Mapping], method: str, base: str, *, key: str = "psnr",
                       zone: str | None = None, photos: Mapping[str, str] | None = None,
                       resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``method − base`` over one or more evaluations (e.g. training seeds) of the same test images.

    Args:
        runs: ``metrics.json`` records (one per seed); they must score the same image names.
        method, base: method keys (e.g. ``"ablation_no_svda"`` and ``"dmdiff_a1"``).
        key: the per-image figure (``"psnr"``, ``"ssim"``, …).
        zone: a field zone (``"centre"``, ``"mid"``, ``"edge"``) or None for the whole frame.
        photos: ``{image name: source photo}`` (default: the first run's ``sources``, which
            ``dmdiff evaluate`` records, else :func:`source_photos` of its dataset).
        resamples, seed: as :func:`paired_bootstrap`.

    Returns:
        :func:`paired_bootstrap`'s record (images' differences averaged over the runs first; module
        docstring) plus ``"method"``, ``"base"``, ``"key"``, ``"zone"`` and ``"per_run"`` (each
        run's own mean difference over photos).
    """
    if not runs:
        raise DmdiffError("pooled_differences needs at least one evaluation")
    per_run = []
    for run in runs:
        a, b = image_scores(run, method, key, zone), image_scores(run, base, key, zone)
        per_run.append({n: a[n] - b[n] for n in sorted(set(a) & set(b))})
    names = sorted(per_run[0])
    if any(sorted(r) != names for r in per_run[1:]):
        raise DmdiffError(f"the evaluations do not score the same test images for {method} and {base}; pool only "
                          "runs evaluated on the same dataset")
    if photos is None:
        photos = runs[0].get("sources") or dict(zip(names, source_photos(names, runs[0].get("dataset"))))
    groups = [photos.get(n, image_source(n)) for n in names]
    pooled = [float(np.mean([r[n] for r in per_run])) for n in names]
    record = paired_bootstrap(pooled, groups, resamples=resamples, seed=seed)
    record["per_run"] = [float(_group_means(np.array([r[n] for n in names]), groups)[1].mean()) for r in per_run]
    return {"method": method, "base": base, "key": key, "zone": zone, **record}


def differences_table(runs: Sequence[Mapping], base: str = "dmdiff_a1", methods: Sequence[str] | None = None, *,
                      key: str = "psnr", zones: Sequence[str | None] = (None,), resamples: int = RESAMPLES,
                      seed: int = 0) -> list[dict]:
    """:func:`pooled_differences` of each method against ``base`` and for each zone (None: whole
    frame); ``methods`` default: every method of the first run scored against the GT, but ``base``
    and the VAE ceiling (a reconstruction of the GT, not a restoration)."""
    first = runs[0]
    if methods is None:
        methods = [m for m in first["methods"] if m not in (base, "vae_ceiling")
                   and first.get("references", {}).get(m, "gt") == "gt"]
    return [pooled_differences(runs, m, base, key=key, zone=z, resamples=resamples, seed=seed)
            for m in methods for z in zones]


def _interval(row: Mapping) -> str:
    if row["low"] is None:
        return "n/a (one photo)"
    return f"[{row['low']:+.2f}, {row['high']:+.2f}]"


def format_differences(rows: Sequence[Mapping], labels: Mapping[str, str] | None = None) -> str:
    """A markdown table of :func:`differences_table` rows: mean, 95 % interval over photos, whether it
    excludes 0, each photo's mean difference, each seed's mean."""
    labels = labels or {}
    if not rows:
        return ""
    base = labels.get(rows[0]["base"], rows[0]["base"])
    photos = sorted({p for r in rows for p in r["per_group"]})
    unit = " dB" if rows[0]["key"] == "psnr" else ""
    lines = [f"| method − {base} | zone | mean{unit} | 95 % CI (photos) | ≠ 0 | "
             + " | ".join(photos) + " | per seed |",
             "|---" * (6 + len(photos)) + "|"]
    for r in rows:
        per_photo = [f"{r['per_group'][p]:+.2f}" if p in r["per_group"] else "" for p in photos]
        seeds = ", ".join(f"{v:+.2f}" for v in r["per_run"])
        lines.append(f"| {labels.get(r['method'], r['method'])} | {r['zone'] or 'all'} | {r['mean']:+.2f} | "
                     f"{_interval(r)} | {'yes' if r['excludes_zero'] else 'no'} | " + " | ".join(per_photo)
                     + f" | {seeds} |")
    first = rows[0]
    note = (f"Paired {first['key']} differences, averaged over {len(first['per_run'])} run(s) per image, "
            f"mean of per-photo means; {int(100 * first['level'])} % percentile bootstrap over source photos "
            f"({first['resamples']} resamples, seed {first['seed']}); ≠ 0: the interval excludes zero.")
    return "\n".join(lines) + "\n\n" + note + "\n"


# ---------------------------------------------------------------------------------------------
# command line: dmdiff intervals
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dmdiff intervals``."""
    parser.add_argument("reports", nargs="+", metavar="METRICS_JSON_OR_EVAL_DIR",
                        help="metrics.json of `dmdiff evaluate` (or its folder), one per training seed")
    parser.add_argument("--base", default="dmdiff_a1", help="the method the others are compared with")
    parser.add_argument("--methods", nargs="*", default=None, help="methods to compare (default: all vs the GT)")
    parser.add_argument("--key", default="psnr", help="per-image figure (default psnr)")
    parser.add_argument("--zones", nargs="*", default=["all"], help="all, centre, mid, edge (default all)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--split", choices=("test", "external"), default="test",
                        help="the report's test split (default) or the set given to `dmdiff evaluate --external` "
                             "(e.g. a lens no training saw)")


def _read_report(path: str, split: str = "test") -> dict:
    """One evaluation's record of ``split``: the report itself, or its ``external`` section with
    the report's labels and references (the same methods)."""
    file = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DmdiffError(f"cannot read the evaluation report {file}: {exc}") from exc
    if not isinstance(record, dict) or "per_image" not in record:
        raise DmdiffError(f"{file} is not a `dmdiff evaluate` metrics.json (no per_image)")
    if split == "test":
        return record
    external = record.get("external")
    if not isinstance(external, dict) or "per_image" not in external:
        raise DmdiffError(f"{file} has no external set: evaluate with `dmdiff evaluate … --external DATASET`")
    return {"labels": record.get("labels", {}), "references": record.get("references", {}), **external}


def main(args: argparse.Namespace) -> int:
    """``dmdiff intervals``: print the paired-difference table of one or more evaluations."""
    if args.resamples < 1:
        raise DmdiffError(f"--resamples must be at least 1, got {args.resamples}")
    runs = [_read_report(p, args.split) for p in args.reports]
    zones = [None if z == "all" else z for z in args.zones]
    rows = differences_table(runs, args.base, args.methods, key=args.key, zones=zones, resamples=args.resamples,
                             seed=args.seed)
    print(format_differences(rows, runs[0].get("labels", {})))
    return 0 if all(math.isfinite(r["mean"]) for r in rows) else 1
