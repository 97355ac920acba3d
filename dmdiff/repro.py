"""`dmdiff repro`: the whole study, headless, through papermill.

Runs the numbered notebooks in ``notebooks/`` in order with shared parameters (seed, preset, smoke,
data and run folders), each into ``RUN/notebooks/``, and gathers their figures and metrics (each
notebook writes into ``RUN/<notebook stem>/``) into one run folder with

* ``manifest.json`` — parameters, seed, package versions, git revision, per-step status, duration,
  and for a failed notebook the failing cell and error;
* ``report.md`` — every notebook's figures and metrics in one page.

A failing notebook stops the study (later notebooks depend on earlier outputs); the job exits
non-zero and keeps everything that succeeded. ``--resume`` skips steps already done with the same
parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import nbformat.sign
import papermill
from tqdm.auto import tqdm

from dmdiff.errors import EXIT_PARTIAL, DmdiffError
from dmdiff.outputs import atomic_write_text, claim_folder, write_json
from dmdiff.runinfo import provenance

#: The kind of output folder a study is (:mod:`dmdiff.outputs`).
STUDY_KIND = "study"
REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def study_folder_parts(folder: Path) -> set[str] | None:
    """Recognises a study folder of a dmdiff version before output markers (its ``manifest.json``):
    an empty set, else None."""
    return set() if (folder / "manifest.json").is_file() else None


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The study's notebooks in order: ``NN_name.ipynb`` sorted by number."""
    found = sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise DmdiffError(f"no notebooks found in {directory}")
    return found


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` → dict, values parsed as JSON when possible (``3``, ``true``, ``"x"``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise DmdiffError(f"-p expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def declared_parameters(path: Path) -> dict[str, dict]:
    """The parameters a notebook declares in its ``parameters`` cell (papermill's inspection)."""

    return papermill.inspect_notebook(str(path))


@dataclass
class StepResult:
    """What happened to one step of the study."""

    name: str
    status: str  # "ok", "failed", "skipped (resumed)", "not run"
    seconds: float = 0.0
    parameters: dict = field(default_factory=dict)
    error: dict | None = None


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _failure_details(exc: BaseException, executed: Path) -> dict:
    """The failing cell's source and the error, from papermill's exception and executed notebook."""
    details: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    ename = getattr(exc, "ename", None)
    if ename:
        details["error"] = f"{ename}: {getattr(exc, 'evalue', '')}"
    try:
        nb = nbformat.read(str(executed), as_version=4)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                details["cell_index"] = index
                details["cell_source"] = cell.source[:2000]
                break
    except Exception:  # the executed notebook may not exist if papermill failed before writing
        pass
    return details


def run_notebook(path: Path, executed: Path, params: dict, cwd: Path) -> None:
    """Execute one notebook with papermill (kernel ``python3``), writing the executed copy."""

    executed.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(path), str(executed), parameters=params, kernel_name="python3", cwd=str(cwd),
        progress_bar=False, request_save_on_cell_execute=True,
    )
    # Trust the output for the user who ran it (as `jupyter trust` does): JupyterLab draws widget
    # outputs (the α panel, progress bars) only in trusted notebooks, else their text fallback.
    nbformat.sign.NotebookNotary().sign(nbformat.read(executed, as_version=4))


def _report(run_dir: Path, results: list[StepResult]) -> str:
    """A markdown page with each step's status, figures and metrics."""
    lines = ["# dmdiff study report", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} |" for r in results]
    for r in results:
        folder = run_dir / r.name
        if not folder.is_dir():
            continue
        lines += ["", f"## {r.name}", ""]
        for metrics in sorted(folder.glob("*.md")):
            lines += [metrics.read_text().strip(), ""]
        for metrics in sorted(folder.glob("*.json")):
            lines += [f"`{metrics.name}`:", "", "```json", metrics.read_text().strip()[:4000], "```", ""]
        for fig in sorted(folder.glob("*.png")):
            lines.append(f"![{fig.stem}]({fig.relative_to(run_dir).as_posix()})")
        if r.error:
            lines += ["", f"**failed** in cell {r.error.get('cell_index')}: `{r.error['error']}`"]
    return "\n".join(lines) + "\n"


def run_study(out: Path, preset: str = "tiny", smoke: bool = False, seed: int = 0,
              extra: dict | None = None, resume: bool = False,
              notebook_paths: list[Path] | None = None) -> list[StepResult]:
    """Run every notebook in order; returns the per-step results (also written to the manifest).

    Raises:
        DmdiffError: ``out`` holds files that are not a dmdiff study's (:func:`dmdiff.outputs.claim_folder`).
    """
    out = claim_folder(Path(out).resolve(), STUDY_KIND, study_folder_parts)
    manifest_path = out / "manifest.json"
    previous = {}
    if resume and manifest_path.is_file():
        previous = {s["name"]: s for s in json.loads(manifest_path.read_text()).get("steps", [])}

    shared = {"seed": seed, "preset": preset, "smoke": smoke,
              "data_dir": str(out / "data"), "run_dir": str(out / "train"), **(extra or {})}
    paths = notebook_paths or notebooks()
    results: list[StepResult] = []
    failed = False
    for path in tqdm(paths, desc="dmdiff repro", unit="notebook"):
        name = path.stem
        if failed:
            results.append(StepResult(name, "not run"))
            continue
        declared = declared_parameters(path)
        params = {k: v for k, v in shared.items() if k in declared}
        params["out_dir"] = str(out / name)
        digest = _params_hash(params)
        done = previous.get(name)
        if done and done["status"] == "ok" and done.get("params_hash") == digest:
            results.append(StepResult(name, "skipped (resumed)", done.get("seconds", 0.0), params))
            continue
        executed = out / "notebooks" / path.name
        start = time.perf_counter()
        try:
            run_notebook(path, executed, params, cwd=path.parent)
            results.append(StepResult(name, "ok", time.perf_counter() - start, params))
        except Exception as exc:  # papermill raises PapermillExecutionError; anything else is a failure too
            results.append(StepResult(name, "failed", time.perf_counter() - start, params,
                                      _failure_details(exc, executed)))
            failed = True
        _write_manifest(out, shared, results)
    _write_manifest(out, shared, results)
    atomic_write_text(out / "report.md", _report(out, results))
    return results


#: Key tokens (``_``-separated, lower case) of metrics that describe the machine or the run, not
#: the study's results: timings, memory, dates, versions, paths, and generated prose (which quotes
#: runtimes; the numbers it is generated from are compared). Comparisons leave them out.
_VOLATILE_TOKENS = frozenset({"s", "ms", "sec", "second", "seconds", "runtime", "time", "timing", "duration",
                              "elapsed", "created", "utc", "speed", "rss", "mib", "memory", "path", "dir",
                              "folder", "file", "git", "revision", "platform", "python", "version", "versions",
                              "discussion", "sentences", "text"})


def _is_volatile(key: str) -> bool:
    return not _VOLATILE_TOKENS.isdisjoint(key.lower().split("_"))


def _numeric_leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b[0].c": leaf}`` for every number, string and bool in a JSON value; keys with a
    :data:`_VOLATILE_TOKENS` token are left out."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if not _is_volatile(str(key)):
                out.update(_numeric_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(_numeric_leaves(item, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def metrics_differences(run_a: str | Path, run_b: str | Path, tolerance: float = 1e-6) -> list[str]:
    """Compare every ``*/metrics.json`` of two study folders; returns the differences (empty: same).

    Numbers must agree within ``tolerance`` (absolute), everything else exactly, after each run's
    own folder in strings is replaced by ``RUN``. Timings, memory, dates, versions and paths
    differ between runs by nature and are not compared; a metrics file present in one run only is
    a difference.
    """
    run_a, run_b = Path(run_a).resolve(), Path(run_b).resolve()
    files_a = {p.relative_to(run_a) for p in run_a.glob("*/metrics.json")}
    files_b = {p.relative_to(run_b) for p in run_b.glob("*/metrics.json")}
    diffs = [f"{f}: only in {run_a if f in files_a else run_b}" for f in sorted(files_a ^ files_b)]
    for rel in sorted(files_a & files_b):
        a = _numeric_leaves(json.loads((run_a / rel).read_text().replace(str(run_a), "RUN")))
        b = _numeric_leaves(json.loads((run_b / rel).read_text().replace(str(run_b), "RUN")))
        for key in sorted(a.keys() | b.keys()):
            va, vb = a.get(key), b.get(key)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
            if (numbers and abs(va - vb) > tolerance) or (not numbers and va != vb):
                diffs.append(f"{rel}: {key}: {va!r} != {vb!r}")
    return diffs


def _write_manifest(out: Path, shared: dict, results: list[StepResult]) -> None:
    steps = [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2), "parameters": r.parameters,
              "params_hash": _params_hash(r.parameters) if r.parameters else None, "error": r.error}
             for r in results]
    write_json(out / "manifest.json", provenance(config=shared, seed=shared["seed"], steps=steps))


def select_notebooks(until: str | None, directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The study's notebooks up to the one numbered ``until`` (``"01"`` or ``"1"``; None: all).

    Raises:
        DmdiffError: no notebook has that number.
    """
    paths = notebooks(directory)
    if until is None:
        return paths
    numbers = [p.name[:2] for p in paths]
    wanted = until.strip().zfill(2)
    if wanted not in numbers:
        raise DmdiffError(f"--until {until}: no notebook with that number (the study has {', '.join(numbers)})")
    return paths[:numbers.index(wanted) + 1]


def check_params(extra: dict[str, Any], paths: list[Path]) -> int:
    """Check the ``-p`` parameters against what the notebooks declare; returns the seed.

    Raises:
        DmdiffError: a parameter no notebook declares (the declared ones are listed), or a seed that
            is not a non-negative integer.
    """
    declared = set().union(*(declared_parameters(p) for p in paths)) | {"seed"}
    unknown = sorted(set(extra) - declared)
    if unknown:
        raise DmdiffError(f"-p {unknown[0]}=…: no notebook of the study takes this parameter; they take "
                          f"{', '.join(sorted(declared - {'out_dir'}))}")
    seed = extra.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DmdiffError(f"-p seed={seed}: the seed must be a non-negative integer")
    return seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    parser.add_argument("--preset", default="tiny", choices=("tiny", "sd-turbo", "sd-turbo-shape"),
                        help="backbone preset of the study (default tiny: the 2-core CPU study)")
    parser.add_argument("--smoke", action="store_true", help="CI-sized run")
    parser.add_argument("--out", default="runs/repro", help="run folder (ignored by git)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="extra notebook parameter (repeatable)")
    parser.add_argument("--resume", action="store_true", help="skip notebooks already done with the same parameters")
    parser.add_argument("--until", default=None, metavar="NN",
                        help="stop after the notebook numbered NN (e.g. 01: the tour and the dataset only)")
    parser.add_argument("--compare", metavar="OTHER_RUN", default=None,
                        help="afterwards, compare every notebook's metrics.json with those of an earlier run "
                             "folder (to 1e-6; timings left out); differences make the exit status non-zero")


def main(args) -> int:
    """Entry point of ``dmdiff repro`` (args: out, preset, smoke, param, resume, until, compare)."""
    extra = parse_params(args.param)
    paths = select_notebooks(args.until)
    seed = check_params(extra, paths)
    extra.pop("seed", None)
    if args.compare is not None and not Path(args.compare).is_dir():
        raise DmdiffError(f"--compare {args.compare}: no such run folder")
    results = run_study(Path(args.out), preset=args.preset, smoke=args.smoke, seed=seed, extra=extra,
                        resume=args.resume, notebook_paths=paths)
    for r in results:
        print(f"{r.name:32s} {r.status:18s} {r.seconds:8.1f} s")
        if r.error:
            print(f"    failing cell {r.error.get('cell_index')}: {r.error['error']}")
    print(f"run folder: {Path(args.out).resolve()}  (manifest.json, report.md)")
    ok = all(r.status != "failed" for r in results)
    if args.compare:
        diffs = metrics_differences(args.out, args.compare)
        print(f"metrics vs {args.compare}: " + ("identical (to 1e-6)" if not diffs else f"{len(diffs)} differences"))
        for line in diffs[:50]:
            print(f"    {line}")
        ok = ok and not diffs
    return 0 if ok else EXIT_PARTIAL
