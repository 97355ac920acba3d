"""``dmdiff train``: one training run (``--config``), the two-stage recipe (``--recipe``) and its
ablations (``--recipe … --ablations``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dmdiff.errors import DmdiffError
from dmdiff.runs import PIPELINE, STAGE2
from dmdiff.train.ablations import run_ablations
from dmdiff.train.config import load_train_config
from dmdiff.train.loop import train
from dmdiff.train.processes import process_state
from dmdiff.train.recipe import recipe_config_path, run_recipe

__all__ = ["main"]


def _default_out(config: Path) -> Path:
    """``runs/<config file stem>``: where a run goes without ``--out``."""
    return Path("runs") / config.stem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", default=None, help="YAML training config (one training run)")
    what.add_argument("--recipe", default=None, metavar="NAME|FILE",
                      help="run stage 1 → pseudo pairs → stage 2 with configs/NAME.yaml (e.g. tiny) or a YAML file")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="continue from the newest checkpoint of --out, or from a checkpoint folder "
                             "(--recipe always resumes)")
    parser.add_argument("--ablations", nargs="*", default=None, metavar="NAME",
                        help="with --recipe: finish the recipe, then train these stage-2 ablations into "
                             "OUT/ablations/NAME (no names: all that apply; see dmdiff.train.ablations)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="with --ablations: train N ablations at once, each in its own process (default: "
                             "CPU cores / the config's threads on a CPU, 1 on a GPU); with threads set, the weights do not "
                             "depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``dmdiff train`` (args: config, recipe, out, resume, ablations, workers, no_progress)."""
    progress, main_process = not args.no_progress, process_state().is_main_process
    if args.workers is not None and args.ablations is None:
        raise DmdiffError("--workers needs --ablations (it sets how many ablations train at once)")
    if args.ablations is not None and not args.recipe:
        raise DmdiffError("--ablations needs --recipe (ablations are variants of the recipe's stage 2)")
    if args.recipe:
        path = recipe_config_path(args.recipe)
        out = Path(args.out or _default_out(path))
        cfg = load_train_config(path)
        if args.ablations is None:
            run_recipe(cfg, out, progress=progress)
            if main_process:
                print(f"dmdiff train: recipe done; final model in {out / STAGE2 / PIPELINE}")
            return 0
        record = run_ablations(cfg, out, args.ablations, progress=progress, workers=args.workers)
        for name, entry in record["ablations"].items() if main_process else ():
            val = entry["report"].get("val") or {}
            extra = f", val PSNR {val['psnr']:.2f} dB" if "psnr" in val else ""
            print(f"dmdiff train: ablation {name} ({entry['label']}): {entry['report']['steps']} steps{extra}; "
                  f"model in {out / entry['folder'] / PIPELINE}")
        return 0
    cfg = load_train_config(args.config)
    out = Path(args.out or _default_out(Path(args.config)))
    report = train(cfg, out, args.resume, progress=progress)
    val = report.get("val") or {}
    extra = f", val PSNR {val['psnr']:.2f} dB (input {val['psnr_input']:.2f} dB)" if val else ""
    if main_process:
        print(f"dmdiff train: {report['steps']} steps in {report['wall_s']:.0f} s{extra}; model in {out / PIPELINE}")
    return 0
