"""`dmdiff repro`: the whole study, headless, through papermill.

Runs the numbered notebooks in ``notebooks/`` in number order with shared parameters (seed, preset,
smoke, data and run folders), each into ``RUN/notebooks/``, and gathers their figures and metrics
(each notebook writes into ``RUN/<notebook stem>/``) into one run folder with

* ``manifest.json`` — parameters, seed, package versions, git revision, per-step status, duration,
  and for a failed notebook the failing cell and error;
* ``report.md`` — every notebook's figures and metrics in one page.

A notebook names the notebooks whose outputs it reads in its metadata,
``{"dmdiff": {"needs": ["03"]}}`` (their numbers; ``[]``: none): it runs after them, and the
numbering stays the order readers meet the ideas in (notebook 02 looks inside the model notebook 03
trains). A notebook without the key reads what every notebook before it in :func:`run_order` wrote.
Up to ``jobs`` notebooks run at once (default: one per core), each as soon as those it waits for
have run: on two cores notebook 06's lens-family study, which needs no other notebook, runs beside
00–05 (each notebook's torch thread count is its own, so its numbers do not depend on what runs
beside it). A failing notebook stops the study: nothing new starts, the notebooks already running
finish; the job exits non-zero and keeps everything that succeeded. ``--resume`` skips steps already
done with the same parameters and the same results of the steps they need.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import nbformat.sign
import papermill
from jupyter_client import AsyncKernelManager
from tqdm.auto import tqdm
from traitlets import default

from dmdiff.errors import EXIT_PARTIAL, DmdiffError
from dmdiff.outputs import atomic_write_text, claim_folder, write_json
from dmdiff.runinfo import provenance, usable_cores

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


def needs(path: Path) -> list[str] | None:
    """The numbers (``"03"``) of the notebooks whose outputs ``path`` reads: its metadata's
    ``dmdiff.needs``; None when the notebook does not say (it then waits for every notebook before
    it, :func:`waits_for`).

    Raises:
        DmdiffError: the entry is not a list of notebook numbers.
    """
    ours = nbformat.read(str(path), as_version=4).metadata.get("dmdiff", {})
    if isinstance(ours, dict) and "needs" not in ours:
        return None
    declared = ours.get("needs") if isinstance(ours, dict) else ours
    if not isinstance(declared, list) or not all(isinstance(n, str) and n.isdigit() for n in declared):
        raise DmdiffError(f"{path}: metadata dmdiff.needs must be a list of notebook numbers like [\"03\"], "
                          f"got {declared!r}")
    return [n.zfill(2) for n in declared]


def run_order(paths: list[Path]) -> list[Path]:
    """``paths`` (in number order) reordered so that every notebook runs after those it
    :func:`needs`; otherwise number order is kept (each step runs the lowest-numbered notebook whose
    needs have all run).

    Raises:
        DmdiffError: a notebook needs one that is not among ``paths``, or the needs form a cycle.
    """
    by_number = {p.name[:2]: p for p in paths}
    pending = {number: needs(path) or [] for number, path in by_number.items()}
    for number, wanted in pending.items():
        missing = [n for n in wanted if n not in by_number]
        if missing:
            raise DmdiffError(f"{by_number[number].name} needs notebook {missing[0]}, which the study does not have")
    order: list[str] = []
    while pending:
        ready = [n for n in sorted(pending) if all(w in order for w in pending[n])]
        if not ready:
            raise DmdiffError(f"the notebooks' dmdiff.needs form a cycle among {', '.join(sorted(pending))}")
        order.append(ready[0])
        del pending[ready[0]]
    return [by_number[n] for n in order]


def waits_for(ordered: list[Path]) -> dict[str, set[str]]:
    """For each notebook of ``ordered`` (a :func:`run_order`), the stems of the notebooks it waits
    for: those its metadata :func:`needs` names, or, without the key, every notebook before it."""
    stems = {p.name[:2]: p.stem for p in ordered}
    waits: dict[str, set[str]] = {}
    for index, path in enumerate(ordered):
        declared = needs(path)
        waits[path.stem] = ({p.stem for p in ordered[:index]} if declared is None
                            else {stems[n] for n in declared})
    return waits


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


#: Statuses of a step whose work is in the run folder (a skipped step was done by an earlier run).
DONE = ("ok", "skipped (resumed)")


@dataclass
class StepResult:
    """What happened to one step of the study."""

    name: str
    status: str  # "ok", "failed", "skipped (resumed)", "not run"
    seconds: float = 0.0
    parameters: dict = field(default_factory=dict)
    error: dict | None = None
    #: Identifies what the step ran with: its parameters and the hashes of the steps it needs.
    params_hash: str | None = None


def _params_hash(params: dict, needed: dict[str, str | None] | None = None) -> str:
    """A short hash of a step's parameters and, when it needs other steps, their hashes
    (``{name: hash}``): a step is redone on ``--resume`` when a step it needs ran with other inputs."""
    key = params if not needed else {**params, "needs": needed}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


class LocalSocketKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel listens on unix-domain sockets of its own (in the temporary
    folder) instead of TCP ports: kernels that start at the same time in several processes (the
    study's notebooks, the test workers) cannot race for a free port, and nothing listens on the
    network."""

    @default("transport")
    def _transport_default(self) -> str:
        return "ipc"

    @default("ip")
    def _ip_default(self) -> str:
        return os.path.join(tempfile.gettempdir(), f"dmdiff-kernel-{uuid.uuid4().hex}")


def run_notebook(path: Path, executed: Path, params: dict, cwd: Path) -> None:
    """Execute one notebook with papermill (kernel ``python3`` on :class:`LocalSocketKernelManager`),
    writing the executed copy."""

    executed.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(path), str(executed), parameters=params, kernel_name="python3", cwd=str(cwd),
        progress_bar=False, request_save_on_cell_execute=True, kernel_manager_class=LocalSocketKernelManager,
    )
    # Trust the output for the user who ran it (as `jupyter trust` does): JupyterLab draws widget
    # outputs (the α panel, progress bars) only in trusted notebooks, else their text fallback.
    nbformat.sign.NotebookNotary().sign(nbformat.read(executed, as_version=4))


def _run_step(name: str, path: Path, params: dict, digest: str, executed_dir: Path) -> StepResult:
    """Run one step of the study (:func:`run_notebook` into ``executed_dir``) and say how it went."""
    executed = executed_dir / path.name
    start = time.perf_counter()
    try:
        run_notebook(path, executed, params, cwd=path.parent)
        return StepResult(name, "ok", time.perf_counter() - start, params, None, digest)
    except Exception as exc:  # papermill raises PapermillExecutionError; anything else is a failure too
        return StepResult(name, "failed", time.perf_counter() - start, params, _failure_details(exc, executed), digest)


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


def _plan_steps(paths: list[Path], shared: dict, out: Path) -> dict[str, tuple[Path, dict, str]]:
    """For each notebook of ``paths`` (a :func:`run_order`): its path, the parameters it declares
    among ``shared`` (plus its ``out_dir``) and its ``params_hash``, keyed by stem."""
    names = {p.name[:2]: p.stem for p in paths}
    steps: dict[str, tuple[Path, dict, str]] = {}
    for path in paths:
        declared = declared_parameters(path)
        params = {k: v for k, v in shared.items() if k in declared}
        params["out_dir"] = str(out / path.stem)
        needed = {names[n]: steps[names[n]][2] for n in needs(path) or []}
        steps[path.stem] = (path, params, _params_hash(params, needed))
    return steps


def run_study(out: Path, preset: str = "tiny", smoke: bool = False, seed: int = 0,
              extra: dict | None = None, resume: bool = False,
              notebook_paths: list[Path] | None = None, jobs: int | None = None) -> list[StepResult]:
    """Run every notebook, up to ``jobs`` at once (None: one per core, :func:`~dmdiff.runinfo.usable_cores`), each when those it
    :func:`waits_for` have run; returns the per-step results in :func:`run_order` (also written to
    the manifest after every step).

    Raises:
        DmdiffError: ``out`` holds files that are not a dmdiff study's (:func:`dmdiff.outputs.claim_folder`),
            or ``jobs`` is not positive.
    """
    jobs = usable_cores() if jobs is None else jobs
    if jobs < 1:
        raise DmdiffError(f"--jobs {jobs}: at least one notebook must run at a time")
    out = claim_folder(Path(out).resolve(), STUDY_KIND, study_folder_parts)
    manifest_path = out / "manifest.json"
    previous = {}
    if resume and manifest_path.is_file():
        previous = {s["name"]: s for s in json.loads(manifest_path.read_text()).get("steps", [])}

    shared = {"seed": seed, "preset": preset, "smoke": smoke,
              "data_dir": str(out / "data"), "run_dir": str(out / "train"), **(extra or {})}
    paths = run_order(notebook_paths or notebooks())
    waits = waits_for(paths)
    steps = _plan_steps(paths, shared, out)

    results: dict[str, StepResult] = {}

    def record(result: StepResult) -> None:
        results[result.name] = result
        bar.update()
        _write_manifest(out, shared, [results[p.stem] for p in paths if p.stem in results])

    pending = [p.stem for p in paths]
    running: dict = {}
    # a process per running notebook: papermill changes the process's working directory while it runs one
    spawn = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(paths), desc="dmdiff repro", unit="notebook")
    with ProcessPoolExecutor(jobs, mp_context=spawn) as pool, bar:
        while True:
            failed = any(r.status == "failed" for r in results.values())
            ready = [] if failed else [n for n in pending
                                       if all(w in results and results[w].status in DONE for w in waits[n])]
            resumed = False
            for name in ready:
                if len(running) == jobs:
                    break
                pending.remove(name)
                _, params, digest = steps[name]
                done = previous.get(name)
                if done and done["status"] in DONE and done.get("params_hash") == digest:
                    record(StepResult(name, "skipped (resumed)", done.get("seconds", 0.0), params, None, digest))
                    resumed = True
                else:
                    running[pool.submit(_run_step, name, *steps[name], out / "notebooks")] = name
            if resumed:
                continue  # a skipped step may let others start
            if not running:
                break
            bar.set_postfix_str("running " + ", ".join(sorted(n[:2] for n in running.values())))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    record(future.result())
                except Exception as exc:  # the process running it died (killed, out of memory)
                    record(StepResult(name, "failed", 0.0, steps[name][1],
                                      {"error": f"the process running the notebook ended: {exc}"}, steps[name][2]))
    for name in pending:
        results[name] = StepResult(name, "not run")
    ordered = [results[p.stem] for p in paths]
    _write_manifest(out, shared, ordered)
    atomic_write_text(out / "report.md", _report(out, ordered))
    return ordered


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
              "params_hash": r.params_hash, "error": r.error}
             for r in results]
    write_json(out / "manifest.json", provenance(config=shared, seed=shared["seed"], steps=steps))


def select_notebooks(until: str | None, directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The study's notebooks up to the one numbered ``until`` (``"01"`` or ``"1"``; None: all), and
    the later ones these :func:`needs` (and theirs), in number order.

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
    chosen = set(numbers[:numbers.index(wanted) + 1])
    wanted_next = [n for p in paths if p.name[:2] in chosen for n in needs(p) or []]
    while wanted_next:
        number = wanted_next.pop()
        if number in numbers and number not in chosen:
            chosen.add(number)
            wanted_next += needs(paths[numbers.index(number)]) or []
    return [p for p in paths if p.name[:2] in chosen]


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
                        help="stop after the notebook numbered NN (e.g. 01: the tour and the dataset only); "
                             "later notebooks it needs run too (02 needs 03's trained model)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="notebooks run at once, each when those it needs have run (default: one per core; "
                             "the numbers do not depend on it)")
    parser.add_argument("--compare", metavar="OTHER_RUN", default=None,
                        help="afterwards, compare every notebook's metrics.json with those of an earlier run "
                             "folder (to 1e-6; timings left out); differences make the exit status non-zero")


def main(args) -> int:
    """Entry point of ``dmdiff repro`` (args: out, preset, smoke, param, resume, until, jobs, compare)."""
    extra = parse_params(args.param)
    paths = select_notebooks(args.until)
    seed = check_params(extra, paths)
    extra.pop("seed", None)
    if args.compare is not None and not Path(args.compare).is_dir():
        raise DmdiffError(f"--compare {args.compare}: no such run folder")
    results = run_study(Path(args.out), preset=args.preset, smoke=args.smoke, seed=seed, extra=extra,
                        resume=args.resume, notebook_paths=paths, jobs=args.jobs)
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
