"""The ``dmdiff`` command line: one subcommand per job, each a thin call into the package.

Exit status of every subcommand: 0 done; 1 done, but some items failed (they are listed); 2 bad
usage or input (nothing was changed); 3 the run was interrupted or faulted (Ctrl-C, SIGTERM, disk
full, out of memory...): what was finished is kept, and rerunning the command continues. Errors
are printed as one line naming the file, folder or key, never as a traceback (set
``DMDIFF_DEBUG=1`` to see the traceback of an internal error).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import warnings

from dmdiff.errors import EXIT_FAULT, EXIT_USAGE, NO_SPACE, DmdiffError

EXIT_STATUS_HELP = """exit status: 0 done; 1 some items failed (listed); 2 bad usage or input (nothing changed);
3 interrupted or faulted (disk full, out of memory, Ctrl-C): finished work is kept, rerun to continue"""


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a metalens dataset (DMDiff folder layout)")
    p.add_argument("--images", default=None, help="folder of clean images (default: bundled photos + procedural images)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="YAML file overriding the simulation/lens defaults")
    p.add_argument("--smoke", action="store_true", help="a tiny dataset for quick checks")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset in --out (only a dmdiff dataset that holds nothing else)")

    def run(a: argparse.Namespace) -> int:
        from dmdiff.data.simulate import main

        return main(a)

    p.set_defaults(func=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print ratios against a baseline run in the same process)")
    which = p.add_subparsers(dest="which", required=True)
    o = which.add_parser("optics", help="PSF-grid build time; spatially varying blur vs deepinv")
    o.add_argument("--size", type=int, default=1024, help="image side for the blur benchmark (px)")
    o.add_argument("--repeats", type=int, default=3)

    def run_optics(a: argparse.Namespace) -> int:
        from dmdiff.bench.optics import main

        return main(a)

    o.set_defaults(func=run_optics)

    m = which.add_parser("model", help="DMDiff restore latency/memory (tiny, CPU), α re-decode ratio, "
                                       "sd-turbo-shape UNet call; the fp16 GPU restore when CUDA is there")
    m.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides of the tiny restore (px)")
    m.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median is kept)")
    m.add_argument("--threads", type=int, default=1, help="CPU threads (1: the most stable figures on a shared box)")
    m.add_argument("--no-sd-turbo-shape", dest="sd_turbo_shape", action="store_false",
                   help="skip the SD-Turbo-shape measurements (a ~5 GB model)")

    def run_model(a: argparse.Namespace) -> int:
        from dmdiff.bench.model import main

        return main(a)

    m.set_defaults(func=run_model)


def _add_repro(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repro", help="run the notebook study headlessly through papermill")
    p.add_argument("--preset", default="tiny", choices=("tiny", "sd-turbo", "sd-turbo-shape"),
                   help="backbone preset of the study (default tiny: the 2-core CPU study)")
    p.add_argument("--smoke", action="store_true", help="CI-sized run")
    p.add_argument("--out", default="runs/repro", help="run folder (ignored by git)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra notebook parameter (repeatable)")
    p.add_argument("--resume", action="store_true", help="skip notebooks already done with the same parameters")
    p.add_argument("--until", default=None, metavar="NN",
                   help="stop after the notebook numbered NN (e.g. 01: the tour and the dataset only)")
    p.add_argument("--compare", metavar="OTHER_RUN", default=None,
                   help="afterwards, compare every notebook's metrics.json with those of an earlier run "
                        "folder (to 1e-6; timings left out); differences make the exit status non-zero")

    def run(a: argparse.Namespace) -> int:
        from dmdiff.repro import main

        return main(a)

    p.set_defaults(func=run)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-backbone",
                       help="pretrain the tiny backbone (VAE, then UNet as a one-step denoiser) on training images")
    p.add_argument("--out", default=None, help="backbone folder to write (default: the shipped dmdiff/assets/tiny_backbone)")
    p.add_argument("--vae-minutes", type=float, default=None, help="wall-clock budget of the VAE stage (default 10)")
    p.add_argument("--unet-minutes", type=float, default=None, help="wall-clock budget of the UNet stage (default 6)")
    p.add_argument("--timestep", type=int, default=250, metavar="T",
                   help="the UNet's one-step timestep, 0-999 (default 250; SD-Turbo's is 999; docs/tiny_backbone.md)")
    p.add_argument("--unet-only", action="store_true",
                   help="keep the VAE of the backbone in --out and retrain only the UNet (from random init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny crops, for quick checks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing backbone folder")

    def run(a: argparse.Namespace) -> int:
        from dmdiff.model.pretrain import main

        return main(a)

    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train DMDiff (multipath, on accelerate); --recipe runs the two-stage "
                                     "pseudo-data recipe")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", default=None, help="YAML training config (one training run)")
    what.add_argument("--recipe", default=None, metavar="NAME|FILE",
                      help="run stage 1 → pseudo pairs → stage 2 with configs/NAME.yaml (e.g. tiny) or a YAML file")
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of --out, or from a checkpoint folder "
                        "(--recipe always resumes)")
    p.add_argument("--ablations", nargs="*", default=None, metavar="NAME",
                   help="with --recipe: finish the recipe, then train these stage-2 ablations into "
                        "OUT/ablations/NAME (no names: all that apply; see dmdiff.train.ablations)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ablations: train N ablations at once, each in its own process (default: "
                        "CPU cores / the config's threads on a CPU, 1 on a GPU); with threads set, the weights do not "
                        "depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(a: argparse.Namespace) -> int:
        if a.workers is not None and a.ablations is None:
            raise DmdiffError("--workers needs --ablations (it sets how many ablations train at once)")
        if a.ablations is not None:
            if not a.recipe:
                raise DmdiffError("--ablations needs --recipe (ablations are variants of the recipe's stage 2)")
            from dmdiff.train.ablations import main
        else:
            from dmdiff.train.loop import main

        return main(a)

    p.set_defaults(func=run)


def _add_pseudo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pseudo", help="make pseudo pairs with a stage-1 (GT → capture) model")
    p.add_argument("--model", required=True, help="finished training run folder (stage 1)")
    p.add_argument("--out", required=True, help="folder to write (dataset layout: gt_train/, lr_train/, ...)")
    p.add_argument("--images", default=None,
                   help="folder of clean images (default: bundled dead leaves + training-photo crops)")
    p.add_argument("--dataset", default=None, help="real dataset whose lens maps/size to use (default: the run's data)")
    p.add_argument("--count", type=int, default=None, help="number of bundled clean images (default 64)")
    p.add_argument("--seed", type=int, default=None, help="seed of the clean images and the noise (default 1)")
    p.add_argument("--noise-strength", type=float, default=None, help="sensor-noise augmentation scale (default 1)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: the dataset's sensor size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing pseudo pairs in --out (only a pseudo-pair folder that holds nothing else)")

    def run(a: argparse.Namespace) -> int:
        from dmdiff.train.pseudo import main

        return main(a)

    p.set_defaults(func=run)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="held-out quality report: capture, Wiener, Richardson-Lucy, DMDiff α=0/1, "
                                        "the backbone VAE ceiling (and a stage-1 model's degradation) on the test split")
    p.add_argument("--model", required=True, metavar="RUN_OR_PIPELINE",
                   help="training run, recipe run (its stage2/) or pipeline folder")
    p.add_argument("--data", required=True, metavar="DATASET", help="dataset folder (its test split is evaluated)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval, or <PIPELINE>-eval)")
    p.add_argument("--stage1", default=None, metavar="RUN",
                   help="stage-1 (GT → capture) run or pipeline: PSNR of degrade(GT) vs the capture "
                        "(default: a recipe run's stage1/)")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=PIPELINE_OR_RUN",
                   help="also evaluate this model at α=1 as ablation_NAME (repeatable; a recipe run's "
                        "ablations/*/pipeline are added automatically)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N test images")
    p.add_argument("--tune-pairs", type=int, default=8, metavar="N",
                   help="train pairs that tune the Wiener/RL parameters (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--model-path", default=None, help="sd-turbo pipelines: the SD-Turbo folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(a: argparse.Namespace) -> int:
        from dmdiff.evaluate import main

        return main(a)

    p.set_defaults(func=run)


def _add_restore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore your own photos (any size, tiled) with a trained model")
    p.add_argument("--model", required=True, metavar="RUN_OR_PIPELINE",
                   help="training run, recipe run (its stage2/) or pipeline folder")
    p.add_argument("--input", required=True, metavar="FILE|DIR", help="an image, or a folder of images (not recursive)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: <name>.png per image and restore.json")
    p.add_argument("--alpha", type=float, default=1.0, help="0 fidelity (neutral path) … 1 perceptual (positive), up to 1.2")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in px, a multiple of the backbone's latent multiple (default 256)")
    p.add_argument("--overlap", type=int, default=None, help="minimum overlap of tiles in px, blended (default 32)")
    p.add_argument("--color-correct", default="auto", choices=("auto", "none", "meanstd", "lowpass"),
                   help="colour correction against the input (lowpass: the restored detail with the input's "
                        "large-scale colours; none: the model's own output; default auto: none for a model "
                        "with a colour anchor, which keeps the input's large-scale colours itself, else lowpass)")
    p.add_argument("--maps", default="auto", metavar="auto|none|FILE.npy",
                   help="optics maps: auto (DATA/maps/<name>.npy for DATA/lr_*/ inputs), none, or one .npy for all")
    p.add_argument("--bits", type=int, default=8, choices=(8, 16), help="bits per output sample (default 8)")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the restorations of the 8 rotations/mirrorings of each image (8× the time; "
                        "for lenses symmetric about the optical axis, see dmdiff.model.ensemble)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the output names that dmdiff did not write (default: refuse them; "
                        "outputs of earlier restores into --out are always replaced)")
    p.add_argument("--resume", action="store_true",
                   help="skip images an earlier restore into --out finished with the same model and settings")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--model-path", default=None, help="sd-turbo pipelines: the SD-Turbo folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from dmdiff.restore import main

        return main(a)

    p.set_defaults(func=run)


def _max_pixels_arg(text: str) -> int:
    """``--max-pixels``: a positive whole number of pixels (argparse reports anything else)."""
    from dmdiff.imageio import parse_max_pixels

    try:
        return parse_max_pixels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from dmdiff.imageio import DEFAULT_MAX_PIXELS

    parser = argparse.ArgumentParser(prog="dmdiff", description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-pixels", type=_max_pixels_arg, default=None, metavar="N",
                        help="refuse input images of more than N pixels (width × height), checked from the file "
                             "header before decoding; default: $DMDIFF_MAX_PIXELS if set, else "
                             f"{DEFAULT_MAX_PIXELS} ({DEFAULT_MAX_PIXELS / 1e6:g} megapixels)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_bench, _add_repro, _add_pretrain, _add_train, _add_pseudo,
                _add_evaluate, _add_restore):
        add(sub)
    for command in sub.choices.values():
        command.epilog = EXIT_STATUS_HELP
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _os_error(prog: str, e: OSError) -> int:
    """Print an operating-system error as one line; returns the exit status."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in NO_SPACE:
        print(f"{prog}: error: no space left to write{where} ({e.strerror}); what was finished is kept: free some "
              "space and rerun the command to continue", file=sys.stderr)
        return EXIT_FAULT
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        print(f"{prog}: error: cannot use{where}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{prog}: error: input/output error{where}: {e.strerror or e}; what was finished is kept: rerun the "
          "command to continue", file=sys.stderr)
    return EXIT_FAULT


@contextlib.contextmanager
def _sigterm_interrupts():
    """Inside the block, SIGTERM (``kill``, a job scheduler's time limit) stops the run as Ctrl-C does,
    so temporary files are removed and the exit status says it was interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warning_printer(prog: str):
    """A ``warnings.showwarning`` printing dmdiff's own warnings as ``<prog>: warning: <message>``."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("dmdiff"):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    if args.max_pixels is not None:  # read by dmdiff.imageio.max_pixels(), here and in worker processes
        os.environ["DMDIFF_MAX_PIXELS"] = str(args.max_pixels)
    prog = f"dmdiff {args.command}"
    try:
        with _sigterm_interrupts(), warnings.catch_warnings():
            warnings.showwarning = _warning_printer(prog)
            return int(args.func(args) or 0)
    except DmdiffError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; what was finished is kept: rerun the command to continue", file=sys.stderr)
        return EXIT_FAULT
    except OSError as e:
        return _os_error(prog, e)
    except Exception as e:  # noqa: BLE001 - out of memory, or a bug: one line, the traceback on request
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":   # torch's (CUDA) one
            print(f"{prog}: error: out of memory ({type(e).__name__}); what was finished is kept: use smaller "
                  "images, tiles or batches and rerun", file=sys.stderr)
            return EXIT_FAULT
        if os.environ.get("DMDIFF_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e}. This is a bug in dmdiff; rerun with "
              "DMDIFF_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return EXIT_FAULT


if __name__ == "__main__":
    sys.exit(main())
