"""Sentences generated from an evaluation's numbers (``dmdiff evaluate``'s ``metrics.json``).

Notebook 05 writes its discussion with these, so that no conclusion in the prose can contradict
the measurements it sits next to. Every comparison is **paired**: for methods ``a`` and ``b`` the
per-image differences ``d_i = a_i − b_i`` of the same test images (PSNR in dB, SSIM unitless)
give the mean difference, their standard deviation over images (``ddof=1``: the per-image
spread), the standard error ``sd / √n`` and how many images ``a`` wins. A difference is called
*consistent* when ``|mean| > 2·se`` (about a 95 % paired t-interval that excludes 0 for
moderate ``n``) and *within the per-image spread* otherwise; with fewer than 3 images it is never
called consistent.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from dmdiff.evaluation.methods import ABLATION_PREFIX

__all__ = ["paired_difference", "discuss", "CONSISTENT_SE"]

#: A mean paired difference is "consistent" when it exceeds this many standard errors.
CONSISTENT_SE = 2.0


def paired_difference(metrics: Mapping, a: str, b: str, key: str = "psnr") -> dict:
    """Per-image ``a − b`` of metric ``key`` over the images where both were measured.

    Args:
        metrics: a ``metrics.json`` record (``per_image[].methods[method][key]``).
        a, b: method keys.
        key: metric (``"psnr"``, ``"ssim"``, ``"runtime_s"`` …).

    Returns:
        ``{"mean", "sd", "se", "n", "wins", "losses", "consistent"}``: mean and sd (ddof=1; NaN for
        n < 2) of the differences, se = sd/√n, images where ``a`` is higher / lower, and whether
        ``|mean| > CONSISTENT_SE · se`` with n ≥ 3.
    """
    diffs = []
    for record in metrics["per_image"]:
        methods = record["methods"]
        if a in methods and b in methods and key in methods[a] and key in methods[b]:
            diffs.append(float(methods[a][key]) - float(methods[b][key]))
    d = np.array([x for x in diffs if math.isfinite(x)], dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    se = sd / math.sqrt(n) if n > 1 else math.nan
    consistent = bool(n >= 3 and math.isfinite(se) and abs(mean) > CONSISTENT_SE * se)
    return {"mean": mean, "sd": sd, "se": se, "n": n, "wins": int((d > 0).sum()), "losses": int((d < 0).sum()),
            "consistent": consistent}


def _verdict(diff: dict, unit: str) -> str:
    if diff["n"] < 3:
        return f"only {diff['n']} image(s): too few to judge"
    if diff["consistent"]:
        return f"consistent (more than {CONSISTENT_SE:g} standard errors of {diff['se']:.2f}{unit})"
    return f"within the per-image spread (standard error {diff['se']:.2f}{unit})"


def _compare(metrics: Mapping, a: str, b: str) -> str:
    labels = metrics["labels"]
    p, s = paired_difference(metrics, a, b, "psnr"), paired_difference(metrics, a, b, "ssim")
    if abs(p["mean"]) < 0.005:
        where = f"within 0.01 dB of {labels[b]}"
    else:
        where = f"{abs(p['mean']):.2f} dB {'above' if p['mean'] > 0 else 'below'} {labels[b]}"
    ssim = ""
    if s["n"]:
        ssim = f"; SSIM {s['mean']:+.4f}"
        if s["consistent"] and p["consistent"] and (s["mean"] > 0) != (p["mean"] > 0):
            ssim += ", consistently the other way: PSNR and SSIM disagree on which is better"
    return (f"{labels[a]}: {where} in mean PSNR (higher on {p['wins']} of {p['n']} images; per-image "
            f"differences spread ±{p['sd']:.2f} dB; {_verdict(p, ' dB')}){ssim}.")


def discuss(metrics: Mapping, main: str = "dmdiff_a1") -> list[str]:
    """Sentences (markdown) on what ``metrics`` shows; none states more than the numbers do.

    Covers, as far as ``metrics`` has them: the main method (default: DMDiff's positive path)
    against the capture, each classical baseline and DMDiff α = 0; its gap to the VAE ceiling; the
    ×8 self-ensemble against the positive path; each ablation against the main method; the runtime ratios; LPIPS availability and the quality bar.

    Returns:
        A list of sentences; empty when ``main`` was not evaluated.
    """
    methods = metrics["methods"]
    if main not in methods:
        return []
    labels = metrics["labels"]
    out = [_compare(metrics, main, other) for other in ("input", "wiener", "richardson_lucy", "dmdiff_a0")
           if other in methods and other != main]
    if "vae_ceiling" in methods:
        gap = paired_difference(metrics, "vae_ceiling", main)
        out.append(f"The backbone's own VAE reconstruction of the ground truth reaches {gap['mean']:.2f} dB more than "
                   f"{labels[main]}: what any output decoded by this VAE could still gain at most.")
    if "dmdiff_a1_x8" in methods and main == "dmdiff_a1":
        out.append(_compare(metrics, "dmdiff_a1_x8", main))
    ablations = [m for m in methods if m.startswith(ABLATION_PREFIX)]
    for method in ablations:
        out.append(_compare(metrics, method, main))
    if ablations:
        close = [labels[m] for m in ablations if not paired_difference(metrics, m, main)["consistent"]]
        out.append(("Within the per-image spread of the main model (not distinguishable on this test set): "
                    + ", ".join(close) + ".") if close else
                   "Every ablation differs consistently from the main model on this test set.")
    means = metrics["means"]
    runtime = {m: means[m].get("runtime_s") for m in methods if means[m].get("runtime_s")}
    if main in runtime:
        parts = [f"{labels[m]} {runtime[m]:.3f} s ({runtime[m] / runtime[main]:.2g}×)" for m in runtime
                 if m != main and not m.startswith(ABLATION_PREFIX)]
        out.append(f"Runtime per image: {labels[main]} {runtime[main]:.3f} s; " + "; ".join(parts) + ".")
    lpips = metrics.get("lpips", {})
    if not lpips.get("available"):
        out.append(f"LPIPS was not measured ({lpips.get('reason', 'no reason recorded')}), so perceptual quality "
                   "is judged here by PSNR/SSIM and by eye only.")
    bar = metrics.get("quality_bar")
    if bar:
        checks = []
        for name, what in (("over_input", "the capture"), ("over_baselines", "the best baseline")):
            check = bar[name]
            if check.get("gain_db") is None:
                checks.append(f"over {what}: cannot be shown ({check.get('reason')})")
            else:
                checks.append(f"over {what}: {check['gain_db']:+.2f} dB against the required "
                              f"{check['required_db']:+.1f} dB ({'met' if check['pass'] else 'missed'})")
        out.append(f"Quality bar: {'PASS' if bar['pass'] else 'FAIL'} — " + "; ".join(checks) + ".")
    return out
