"""The papermill study runner: manifest, failure reporting, resume — on small synthetic notebooks."""

import json

import nbformat
import pytest
from notebook_checks import assert_ran_headless

from dmdiff.errors import DmdiffError
from dmdiff.repro import (metrics_differences, notebooks, parse_params, run_order, run_study, select_notebooks,
                          waits_for)


def _notebook(path, body: str, fail: bool = False, needs: list | None = None, extra: str = ""):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('seed: int = 0  # random seed\nout_dir: str = "out"  # outputs\n'
                                       'smoke: bool = False  # CI-sized run' + extra)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    if fail:
        nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('made to fail')"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if needs is not None:
        nb.metadata["dmdiff"] = {"needs": needs}
    nbformat.write(nb, str(path))
    return path


BODY = ("import json, pathlib\npathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(out_dir, 'metrics.json').write_text(json.dumps({'seed': seed, 'smoke': smoke}))")


def test_study_runs_in_order_and_writes_manifest(tmp_path):
    nbs = [_notebook(tmp_path / "00_a.ipynb", BODY), _notebook(tmp_path / "01_b.ipynb", BODY)]
    results = run_study(tmp_path / "run", seed=3, smoke=True, notebook_paths=nbs)
    assert [r.status for r in results] == ["ok", "ok"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["versions"]["torch"]
    assert [s["name"] for s in manifest["steps"]] == ["00_a", "01_b"]
    assert json.loads((tmp_path / "run" / "00_a" / "metrics.json").read_text()) == {"seed": 3, "smoke": True}
    assert "00_a" in (tmp_path / "run" / "report.md").read_text()


def test_failure_is_reported_with_cell_and_later_steps_not_run(tmp_path):
    nbs = [_notebook(tmp_path / "00_a.ipynb", BODY, fail=True), _notebook(tmp_path / "01_b.ipynb", BODY)]
    results = run_study(tmp_path / "run", notebook_paths=nbs)
    assert [r.status for r in results] == ["failed", "not run"]
    assert "made to fail" in results[0].error["error"]
    assert "raise RuntimeError" in results[0].error["cell_source"]
    assert (tmp_path / "run" / "00_a" / "metrics.json").exists()  # work done before the failure is kept


def test_resume_skips_done_steps_with_same_parameters(tmp_path):
    nbs = [_notebook(tmp_path / "00_a.ipynb", BODY)]
    run_study(tmp_path / "run", notebook_paths=nbs)
    again = run_study(tmp_path / "run", notebook_paths=nbs, resume=True)
    assert again[0].status == "skipped (resumed)"
    twice = run_study(tmp_path / "run", notebook_paths=nbs, resume=True)   # a step skipped before is still done
    assert twice[0].status == "skipped (resumed)"
    changed = run_study(tmp_path / "run", notebook_paths=nbs, resume=True, seed=1)
    assert changed[0].status == "ok"


def test_a_notebook_runs_after_the_ones_it_needs_and_resume_follows_them(tmp_path):
    """01 needs 02 (as notebook 02 needs 03's model): it runs after it; --until 01 brings 02 along;
    a resumed study redoes 01 when 02 ran with other parameters, though 01's own are unchanged."""
    nbs = [_notebook(tmp_path / "00_a.ipynb", BODY), _notebook(tmp_path / "01_b.ipynb", BODY, needs=["02"]),
           _notebook(tmp_path / "02_c.ipynb", BODY, extra="\nwidth: int = 1  # only 02 takes it")]
    assert [p.stem for p in run_order(nbs)] == ["00_a", "02_c", "01_b"]
    assert [p.stem for p in select_notebooks("01", tmp_path)] == ["00_a", "01_b", "02_c"]
    assert [p.stem for p in select_notebooks("00", tmp_path)] == ["00_a"]
    results = run_study(tmp_path / "run", notebook_paths=nbs)
    assert [(r.name, r.status) for r in results] == [("00_a", "ok"), ("02_c", "ok"), ("01_b", "ok")]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["00_a", "02_c", "01_b"]
    assert all(s["params_hash"] == r.params_hash for s, r in zip(manifest["steps"], results))
    again = run_study(tmp_path / "run", notebook_paths=nbs, resume=True)
    assert {r.status for r in again} == {"skipped (resumed)"}
    changed = run_study(tmp_path / "run", notebook_paths=nbs, resume=True, extra={"width": 2})
    assert [r.status for r in changed] == ["skipped (resumed)", "ok", "ok"]
    assert changed[2].parameters == results[2].parameters and changed[2].params_hash != results[2].params_hash


def test_needs_that_cannot_be_met_are_named(tmp_path):
    lone = [_notebook(tmp_path / "00_a.ipynb", BODY, needs=["07"])]
    with pytest.raises(DmdiffError, match="needs notebook 07"):
        run_order(lone)
    loop = [_notebook(tmp_path / "00_a.ipynb", BODY, needs=["01"]),
            _notebook(tmp_path / "01_b.ipynb", BODY, needs=["00"])]
    with pytest.raises(DmdiffError, match="cycle"):
        run_order(loop)
    bad = [_notebook(tmp_path / "00_a.ipynb", BODY, needs="03")]
    with pytest.raises(DmdiffError, match="00_a.ipynb: metadata dmdiff.needs"):
        run_order(bad)


def test_the_study_runs_notebook_02_after_03_whose_model_it_opens():
    order = [p.name[:2] for p in run_order(notebooks())]
    assert order.index("02") == order.index("03") + 1 and order.index("04") > order.index("03")


def test_the_lens_family_study_waits_for_no_other_notebook_and_03_waits_for_all_before_it():
    waits = waits_for(run_order(notebooks()))
    assert waits["06_lens_family"] == set()
    assert waits["03_multipath_training"] == {"00_tour", "01_metalens_degradation"}
    assert waits["05_evaluation"] == {"03_multipath_training"}


#: A notebook that marks its start, then waits (at most 60 s) until the notebook named ``other``
#: has started too: it fails unless both run at the same time.
MEETS = ("import pathlib, time\npathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
         "pathlib.Path(out_dir, 'started').touch()\nother = pathlib.Path(out_dir).parent / {other!r} / 'started'\n"
         "deadline = time.monotonic() + 60\nwhile not other.exists():\n"
         "    assert time.monotonic() < deadline, f'{{other}} did not start beside this notebook'\n"
         "    time.sleep(0.1)")


def test_notebooks_that_need_nothing_run_at_the_same_time_and_one_without_needs_waits_for_both(tmp_path):
    """00 and 01 need nothing: with two jobs they run at once (each waits for the other's start);
    02, without the key, waits for both: with two jobs it would otherwise start beside 00. The
    kernels talk over unix-domain sockets (kernels started at once cannot race for a TCP port)."""
    nbs = [_notebook(tmp_path / "00_a.ipynb", MEETS.format(other="01_b"), needs=[]),
           _notebook(tmp_path / "01_b.ipynb", MEETS.format(other="00_a"), needs=[]),
           _notebook(tmp_path / "02_c.ipynb", BODY + "\nfor d in ('00_a', '01_b'):\n"
                     "    assert (pathlib.Path(out_dir).parent / d / 'started').exists()\n"
                     "from ipykernel import get_connection_info\n"
                     "assert json.loads(get_connection_info())['transport'] == 'ipc'")]
    assert waits_for(nbs) == {"00_a": set(), "01_b": set(), "02_c": {"00_a", "01_b"}}
    results = run_study(tmp_path / "run", notebook_paths=nbs, jobs=2)
    assert [(r.name, r.status) for r in results] == [("00_a", "ok"), ("01_b", "ok"), ("02_c", "ok")]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["00_a", "01_b", "02_c"]


def test_after_a_failure_nothing_new_starts_and_the_notebook_running_beside_it_finishes(tmp_path):
    """00 fails while 01 (needing nothing) runs beside it: 01 finishes and is kept, 02 does not start."""
    nbs = [_notebook(tmp_path / "00_a.ipynb", BODY, fail=True, needs=[]),
           _notebook(tmp_path / "01_b.ipynb", BODY + "\nimport time\ntime.sleep(3)", needs=[]),
           _notebook(tmp_path / "02_c.ipynb", BODY, needs=["01"])]
    results = run_study(tmp_path / "run", notebook_paths=nbs, jobs=2)
    assert [(r.name, r.status) for r in results] == [("00_a", "failed"), ("01_b", "ok"), ("02_c", "not run")]
    with pytest.raises(DmdiffError, match="--jobs 0"):
        run_study(tmp_path / "other", notebook_paths=nbs, jobs=0)


def test_parse_params():
    assert parse_params(["a=3", "b=true", "c=hello"]) == {"a": 3, "b": True, "c": "hello"}
    with pytest.raises(DmdiffError):
        parse_params(["novalue"])


def _metrics(run, name, record):
    folder = run / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(record))


def test_metrics_differences_ignores_timings_and_run_paths_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _metrics(a, "05_x", {"psnr": 21.0, "runtime_s": 1.0, "model": f"{a.resolve()}/train", "rows": [{"ssim": 0.5}]})
    _metrics(b, "05_x", {"psnr": 21.0 + 5e-7, "runtime_s": 9.0, "model": f"{b.resolve()}/train",
                         "rows": [{"ssim": 0.5}]})
    assert metrics_differences(a, b) == []
    _metrics(b, "05_x", {"psnr": 21.0 + 5e-6, "runtime_s": 9.0, "model": f"{b.resolve()}/train",
                         "rows": [{"ssim": 0.6}]})
    diffs = metrics_differences(a, b)
    assert len(diffs) == 2 and any("psnr" in d for d in diffs) and any("rows[0].ssim" in d for d in diffs)
    _metrics(b, "06_y", {"psnr": 1.0})
    assert any("only in" in d for d in metrics_differences(a, b))


@pytest.mark.slow
def test_same_seed_gives_the_same_numbers_in_two_smoke_studies(tmp_path, psf_cache):
    """The whole smoke study (every notebook, real training included) twice with seed 0: every
    notebook runs headless and leaves its figures and teaching cells run (the smoke test of every
    notebook, tests/notebook_checks.py); every metrics.json agrees to 1e-6 (timings aside)."""
    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        assert all(r.status == "ok" for r in run_study(run, smoke=True, seed=0)), (run / "manifest.json").read_text()
    for path in notebooks():
        assert_ran_headless(runs[0] / "notebooks" / path.name, runs[0] / path.stem)
    compared = list(runs[0].glob("*/metrics.json"))
    assert len(compared) == len(notebooks()), "every notebook writes a metrics.json"
    assert metrics_differences(*runs) == []
