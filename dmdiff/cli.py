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
import gc
import importlib
import os
import signal
import sys
import threading
import warnings

from dmdiff.errors import EXIT_FAULT, EXIT_USAGE, NO_SPACE, DmdiffError
from dmdiff.imageio import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, parse_max_pixels

EXIT_STATUS_HELP = """exit status: 0 done; 1 some items failed (listed); 2 bad usage or input (nothing changed);
3 interrupted or faulted (disk full, out of memory, Ctrl-C): finished work is kept, rerun to continue"""


#: The subcommands: name → (the module that declares their arguments beside its ``main``, one-line help).
#: Only the module of the command being run is imported (``dmdiff --help`` stays quick).
COMMANDS = {
    "simulate": ("dmdiff.data.simulate", "simulate a metalens dataset (DMDiff folder layout)"),
    "bench": ("dmdiff.bench", "benchmarks (print ratios against a baseline run in the same process)"),
    "repro": ("dmdiff.repro", "run the notebook study headlessly through papermill"),
    "pretrain-backbone": ("dmdiff.train.pretrain", "pretrain the tiny backbone (VAE, then UNet as a one-step "
                                                   "denoiser) on training images"),
    "train": ("dmdiff.train.command", "train DMDiff (multipath, on accelerate); --recipe runs the two-stage "
                                      "pseudo-data recipe"),
    "pseudo": ("dmdiff.train.pseudo", "make pseudo pairs with a stage-1 (GT → capture) model"),
    "evaluate": ("dmdiff.evaluation.job", "held-out quality report: capture, Wiener, Richardson-Lucy, DMDiff "
                                          "α=0/1, the backbone VAE ceiling (and a stage-1 model's degradation)"),
    "intervals": ("dmdiff.evaluation.uncertainty", "paired differences of evaluated methods with bootstrap "
                                                   "intervals over source photos, pooling several seeds' reports"),
    "maps-swap": ("dmdiff.evaluation.family", "a lens family: PSNR with each image's own optics maps, another "
                                              "lens's and none (does SVDA read its maps?)"),
    "restore": ("dmdiff.restore", "restore your own photos (any size, tiled) with a trained model"),
}


def _max_pixels_arg(text: str) -> int:
    """``--max-pixels``: a positive whole number of pixels (argparse reports anything else)."""
    try:
        return parse_max_pixels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dmdiff`` parser; ``command``'s own arguments are added (its module imported) when given."""
    parser = argparse.ArgumentParser(prog="dmdiff", description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-pixels", type=_max_pixels_arg, default=None, metavar="N",
                        help="refuse input images of more than N pixels (width × height), checked from the file "
                             "header before decoding; default: $DMDIFF_MAX_PIXELS if set, else "
                             f"{DEFAULT_MAX_PIXELS} ({DEFAULT_MAX_PIXELS / 1e6:g} megapixels)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_STATUS_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            if hasattr(module, "main"):
                p.set_defaults(func=module.main)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (nor ``--max-pixels``'s
    value); None when there is none or it is not a command (argparse then says so)."""
    words = iter(argv)
    for arg in words:
        if arg == "--max-pixels":
            next(words, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    if args.max_pixels is not None:  # read by dmdiff.imageio.max_pixels(), here and in worker processes
        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
    prog = f"dmdiff {args.command}"
    try:
        with _sigterm_interrupts(), warnings.catch_warnings():
            warnings.filterwarnings("always", module=r"dmdiff\.")     # each of dmdiff's own, every time
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


def entry() -> int:
    """The ``dmdiff`` console script and ``python -m dmdiff``: :func:`main`, with the garbage collector
    kept off the objects that live to the end. torch, diffusers and peft create half a million of
    them on import; the collector's passes over them took ~1.2 s of the imports and ~1.3 s of the
    interpreter's exit in a 10 s ``dmdiff restore`` of 20 small photos (docs/experiments.md). So the
    command's module is imported with the collector paused, and what is alive after the import and
    after the command is frozen (``gc.freeze``: never scanned again). Objects are still freed by
    reference counting, files are closed by then, and ``atexit`` handlers still run."""
    command = COMMANDS.get(_command(sys.argv[1:]))
    if command is not None:
        enabled = gc.isenabled()
        gc.disable()
        try:
            importlib.import_module(command[0])          # the module build_parser imports, loaded ahead
        finally:
            if enabled:
                gc.enable()
        gc.freeze()
    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(entry())
