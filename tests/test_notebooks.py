"""Notebook hygiene and headless execution (papermill), plus JupyterLab serving them."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import papermill
import pytest

from notebook_checks import TEACHING_TAGS, assert_ran_headless, tagged

from dmdiff.repro import NOTEBOOK_DIR, notebooks, run_notebook

NOTEBOOKS = notebooks()
#: Notebooks that teach actively: a summary, 3–5 questions with collapsed answers, a "try this" cell.
TEACHING = [p for p in NOTEBOOKS if p.name[:2] in {"00", "01", "02", "03", "04", "05", "06"}]
#: Notebooks whose standalone run takes a path the smoke study (tests/test_repro.py, which runs every
#: notebook headless in study order and checks each like this) does not: 02 opens an untrained model
#: when no trained one is there, 04 trains its own smoke model. The others run in the study exactly
#: as they would alone (00, 01, 03, 06 need no other notebook; 05's own smoke model is trained the
#: way 04's is).
STANDALONE = [p for p in NOTEBOOKS if p.name[:2] in {"02", "04"}]


def test_the_tour_lists_every_notebook():
    """Notebook 00's series table names every notebook of notebooks/, each in its own row."""
    tour = nbformat.read(str(NOTEBOOK_DIR / "00_tour.ipynb"), as_version=4)
    rows = [line for line in tour.cells[0].source.splitlines() if line.startswith("| `")]
    listed = [row.split("`")[1] for row in rows]
    assert listed == [p.stem for p in NOTEBOOKS]
    assert "../docs/glossary.md" in tour.cells[0].source and (NOTEBOOK_DIR.parent / "docs" / "glossary.md").exists()


@pytest.mark.parametrize("path", TEACHING, ids=lambda p: p.name)
def test_notebook_teaches(path):
    """It ends with a summary, questions with collapsed answers and a papermill-safe "try this" cell."""
    nb = nbformat.read(str(path), as_version=4)
    assert all(tagged(nb, tag) for tag in TEACHING_TAGS), f"cells tagged {TEACHING_TAGS} expected"
    answers = tagged(nb, "answer")
    assert 3 <= len(answers) <= 5
    assert all(c.metadata.get("jupyter", {}).get("source_hidden") for c in answers), "answers must be collapsed"
    # every answer follows its question; the teaching cells come after the notebook's last figure
    for i, cell in enumerate(nb.cells):
        if "answer" in cell.metadata.get("tags", []):
            assert "question" in nb.cells[i - 1].metadata.get("tags", [])
    first = min(i for i, c in enumerate(nb.cells) if "summary" in c.metadata.get("tags", []))
    assert all(set(c.metadata.get("tags", [])) & set(TEACHING_TAGS) for c in nb.cells[first:])
    assert any(c.cell_type == "code" for c in tagged(nb, "try-this"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs (nbstripout)"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    declared = papermill.inspect_notebook(str(path))
    assert {"smoke", "out_dir", "seed"} <= set(declared)
    for name, info in declared.items():
        assert info["inferred_type_name"] != "None", f"parameter {name} has no type annotation"
        assert info["help"], f"parameter {name} has no comment"


@pytest.mark.slow
@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_notebook_runs_headless_on_its_own(path, tmp_path, psf_cache):
    out_dir = tmp_path / "out"
    params = {"smoke": True, "out_dir": str(out_dir)}
    declared = papermill.inspect_notebook(str(path))
    if "data_dir" in declared:
        params["data_dir"] = str(tmp_path / "data")
    if "run_dir" in declared:
        params["run_dir"] = str(tmp_path / "run")
    run_notebook(path, tmp_path / path.name, params, cwd=NOTEBOOK_DIR)
    assert_ran_headless(tmp_path / path.name, out_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _execute(port: int, token: str, kernel_id: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` on a kernel through the server's websocket channel; returns its stdout."""
    import uuid

    import websocket

    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={token}", timeout=timeout)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False}}))
    # The reply comes on the shell channel, the output on iopub: their order is not guaranteed, so
    # wait for both the reply and iopub's "idle" status, which follows every output of the request.
    stdout, replied, idle, deadline = "", False, False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                stdout += msg["content"]["text"]
            if msg["msg_type"] == "execute_reply":
                assert msg["content"]["status"] == "ok"
                replied = True
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if replied and idle:
                return stdout
    finally:
        ws.close()
    raise TimeoutError("the kernel did not answer")


def test_jupyter_lab_serves_notebooks_and_starts_a_kernel(tmp_path):
    port, token = _free_port(), "dmdiff-test-token"
    log = tmp_path / "jupyter.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={NOTEBOOK_DIR.parent}",
         "--ServerApp.open_browser=False", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    base = f"http://127.0.0.1:{port}/api"

    def call(path, method="GET", body=None):
        req = urllib.request.Request(base + path, method=method, data=body,
                                     headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    try:
        for _ in range(240):
            assert server.poll() is None, f"jupyter lab exited: {log.read_text()[-2000:]}"
            try:
                call("/status")
                break
            except OSError:
                time.sleep(0.5)
        listing = call("/contents/notebooks")
        names = {item["name"] for item in listing["content"]}
        assert {p.name for p in NOTEBOOKS} <= names
        kernel = call("/kernels", "POST", json.dumps({"name": "python3"}).encode())
        assert _execute(port, token, kernel["id"], "print(6 * 7)") == "42\n"
        call(f"/kernels/{kernel['id']}", "DELETE")
    finally:
        server.terminate()
        server.wait(timeout=30)
