"""Notebook hygiene and headless execution (papermill), plus JupyterLab serving them."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import papermill
import pytest

from dmdiff.repro import NOTEBOOK_DIR, notebooks

NOTEBOOKS = notebooks()


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


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2] in ("00", "01")], ids=lambda p: p.name)
def test_notebook_runs_headless_in_smoke_mode(path, tmp_path, psf_cache):
    out_dir = tmp_path / "out"
    params = {"smoke": True, "out_dir": str(out_dir)}
    if "data_dir" in papermill.inspect_notebook(str(path)):
        params["data_dir"] = str(tmp_path / "data")
    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=params,
                               kernel_name="python3", cwd=str(NOTEBOOK_DIR), progress_bar=False)
    assert list(out_dir.glob("*.png")), "the notebook saved no figure"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyter_lab_serves_notebooks_and_starts_a_kernel(tmp_path):
    port, token = _free_port(), "dmdiff-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={NOTEBOOK_DIR.parent}",
         "--ServerApp.open_browser=False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}/api"

    def call(path, method="GET", body=None):
        req = urllib.request.Request(base + path, method=method, data=body,
                                     headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    try:
        for _ in range(120):
            try:
                call("/status")
                break
            except OSError:
                time.sleep(0.5)
        listing = call("/contents/notebooks")
        names = {item["name"] for item in listing["content"]}
        assert {p.name for p in NOTEBOOKS} <= names
        kernel = call("/kernels", "POST", json.dumps({"name": "python3"}).encode())
        for _ in range(60):
            state = call(f"/kernels/{kernel['id']}")["execution_state"]
            if state in ("idle", "busy"):
                break
            time.sleep(0.5)
        assert state in ("idle", "busy")
        call(f"/kernels/{kernel['id']}", "DELETE")
    finally:
        server.terminate()
        server.wait(timeout=30)
