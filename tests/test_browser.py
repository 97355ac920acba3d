"""Notebook 04's α panel in a real browser: JupyterLab + headless Chromium driven by Selenium.

The browser test (slow, about a minute): a smoke dataset and a small model are prepared here (no training), the
notebook is executed by papermill and opened as saved (untrusted, the way `dmdiff repro`'s output
is opened), then a fresh copy is run in the browser, the α slider is moved with the keyboard, and
the displayed image must change. Screenshots go to $DMDIFF_SCREENSHOTS (default: the test's tmp
folder). Needs Debian's `chromium` and `chromium-driver` (`apt-get install chromium
chromium-driver`) and the `selenium` of the dev extras; skipped without them. A fast test without
a browser checks the panel's display bundle (the still that untrusted notebooks show).
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import papermill
import pytest
from conftest import perturb_trainable

from dmdiff.repro import NOTEBOOK_DIR, LocalSocketKernelManager

NOTEBOOK = "04_tunable_decoding.ipynb"
INSTALL = "install with: apt-get install chromium chromium-driver (and pip install -e '.[dev]' for selenium)"
WAIT_S = 150  # the longest wait for the browser or the kernel (the notebook takes ~20 s on a quiet CPU)


def _browser() -> tuple[str, str]:
    """Chromium's and chromedriver's paths, or skip the test saying how to install them."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip(f"selenium is not installed; {INSTALL}")
    chromium = os.environ.get("DMDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("DMDIFF_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not chromium or not Path(chromium).is_file():
        pytest.skip(f"chromium not found; {INSTALL}")
    if not Path(driver).is_file():
        pytest.skip(f"chromedriver not found; {INSTALL}")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(root: Path) -> dict:
    """A smoke dataset and a small model with visibly different paths, and the notebook's parameters."""
    import torch

    from dmdiff.model.backbone import load_backbone
    from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
    from dmdiff.model.pipeline import DMDiffPipeline
    from dmdiff.study import ensure_dataset

    data, run = root / "data", root / "model"
    ensure_dataset(data, seed=0, smoke=True)
    torch.manual_seed(0)
    # untrained, the two paths decode to nearly the same image (α would change ≤ 1 grey level);
    # seeded noise on the trainable weights makes α = 0 and α = 1.2 differ by tens of levels
    model = perturb_trainable(DMDiff(DMDiffConfig(), load_backbone("tiny")), scale=0.1)
    DMDiffPipeline.from_model(model).save_pretrained(run)
    params = {"smoke": True, "data_dir": str(data), "run_dir": str(run), "threads": 1}
    declared = papermill.inspect_notebook(str(NOTEBOOK_DIR / NOTEBOOK))
    return {key: value for key, value in params.items() if key in declared}


@pytest.fixture
def lab(tmp_path, psf_cache):
    """A JupyterLab server on a free port with a random token, rooted in ``tmp_path / "lab"``,
    with its own config, data and runtime folders; yields ``(url, token, root)``."""
    root = tmp_path / "lab"
    root.mkdir()
    jupyter = tmp_path / "jupyter"
    for sub in ("config", "data", "runtime", "workspaces"):
        (jupyter / sub).mkdir(parents=True)
    # no "get notified about official Jupyter news?" toast over the notebook
    (jupyter / "config" / "labconfig").mkdir()
    (jupyter / "config" / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(jupyter / "config"), "JUPYTER_DATA_DIR": str(jupyter / "data"),
           "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces")}
    jupyter_bin = Path(sys.executable).with_name("jupyter")
    command = [str(jupyter_bin), "lab"] if jupyter_bin.is_file() else [sys.executable, "-m", "jupyterlab"]
    log = tmp_path / "jupyter.log"
    server = subprocess.Popen(
        command + ["--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--ServerApp.token={token}",
                   f"--ServerApp.root_dir={root}", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert server.poll() is None, f"jupyter lab exited: {log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"jupyter lab did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("DMDIFF_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _outputs(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [o.text for o in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]


def _status(driver) -> str:
    """The status bar's text, e.g. ``"… Python 3 (ipykernel) | Idle …"``."""
    return driver.execute_script("const bar = document.querySelector('#jp-main-statusbar');"
                                 "return bar ? bar.innerText : '';")


def _open(driver, url, token, name):
    """Open notebook ``name`` alone (``?reset``: a fresh workspace) and wait for its kernel to be idle."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/lab/tree/{name}?reset&token={token}")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
    WebDriverWait(driver, WAIT_S).until(lambda d: "| Idle" in _status(d),
                                        message=f"the kernel of {name} did not start")


def _prompts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]


def _run_all(driver):
    """Run ▸ Run All Cells; clicked again (up to 3 times) if no cell starts within 20 s."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    item = "li.lm-Menu-item[data-command='runmenu:run-all']"
    for _ in range(3):
        menus = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item"))
        next(m for m in menus if m.text.strip() == "Run").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, item))[0].click()
        try:
            WebDriverWait(driver, 20).until(lambda d: any(p not in ("", "[ ]:") for p in _prompts(d)))
            return
        except TimeoutException:
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    raise AssertionError(f"Run All Cells started no cell; status bar: {_status(driver)!r}")


def test_panel_display_bundle_has_a_still():
    """Without a widget manager (an untrusted notebook, an HTML export) the panel shows a still of its
    view and a note, not ``VBox(children=…)``; with one, the widget view is still there. No browser."""
    import numpy as np

    from dmdiff.model.backbone import load_backbone
    from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
    from dmdiff.widgets import build_panel

    rng = np.random.default_rng(0)
    capture, gt = rng.random((16, 20, 3), dtype=np.float32), rng.random((16, 20, 3), dtype=np.float32)
    panel = build_panel(DMDiff(DMDiffConfig(), load_backbone("tiny", pretrained=False)), capture, None, gt,
                        name="<scene>", alpha=0.5)
    bundle = panel.widget._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    assert bundle["text/plain"].startswith("a still of the α panel (<scene>, capture | restored (α = 0.50)")
    page = bundle["text/html"]
    assert '<img src="data:image/png;base64,' in page and "&lt;scene&gt;" in page and "<scene>" not in page
    assert "α = 0.50" in page


@pytest.mark.slow
def test_alpha_panel_in_jupyterlab(browser, lab, tmp_path):  # browser first: it skips without Chromium
    shots = _screenshots(tmp_path)
    try:
        _alpha_panel_in_jupyterlab(browser, lab, tmp_path, shots)
    except BaseException:
        browser.save_screenshot(str(shots / "04_failure.png"))
        print(f"screenshot of the failure: {shots / '04_failure.png'}; outputs: {_outputs(browser)}")
        raise


def _alpha_panel_in_jupyterlab(browser, lab, tmp_path, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, token, root = lab
    t0 = time.monotonic()

    def phase(name):  # timings in the captured stdout (pytest -s shows them)
        print(f"[{time.monotonic() - t0:6.1f} s] {name}")

    params = _prepare(tmp_path)
    phase("smoke data and model prepared")

    # 1. the notebook as `dmdiff repro` leaves it: executed by papermill, saved, not trusted here.
    # JupyterLab draws widget outputs only in trusted notebooks; the panel must show its still
    # (an image and a note), never its `VBox(children=…)` repr.
    executed = root / "04_executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK_DIR / NOTEBOOK), str(executed), kernel_name="python3",
                               parameters={**params, "out_dir": str(tmp_path / "out-papermill")},
                               cwd=str(root), progress_bar=False, kernel_manager_class=LocalSocketKernelManager)
    phase("notebook executed by papermill")
    _open(browser, url, token, executed.name)
    WebDriverWait(browser, WAIT_S).until(lambda d: any("a still of the α panel" in t for t in _outputs(d)))
    outputs = _outputs(browser)
    assert not any(t.startswith("VBox(children=") for t in outputs), outputs
    still = browser.find_element(By.XPATH, "//div[contains(@class, 'jp-OutputArea-output')]"
                                           "[.//*[contains(text(), 'a still of the α panel')]]//img")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", still)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", still) > 0)
    browser.save_screenshot(str(shots / "04_saved_untrusted.png"))
    phase("saved notebook checked in the browser")

    # 2. a fresh copy run in the browser: the live panel, moved with the keyboard
    nb = papermill.iorw.load_notebook_node(str(NOTEBOOK_DIR / NOTEBOOK))  # with the cells' tags normalised
    out_dir = tmp_path / "out-browser"
    nb = papermill.parameterize.parameterize_notebook(nb, {**params, "out_dir": str(out_dir)})
    nbformat.write(nb, str(root / NOTEBOOK))
    _open(browser, url, token, NOTEBOOK)
    _run_all(browser)
    phase("fresh copy opened, Run All Cells clicked")
    # done: no cell queued or running ([*]), the kernel idle (Run All stops at a cell that fails)
    WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
        lambda d: not any("*" in p for p in _prompts(d)) and "| Idle" in _status(d),
        message="the notebook did not finish")
    phase("notebook run in the browser")
    outputs = _outputs(browser)
    errors = [t for t in outputs if "Traceback" in t]
    assert not errors, f"the notebook failed in the browser: {errors}"
    assert (out_dir / "metrics.json").is_file(), f"the notebook did not save its metrics: {outputs}"
    assert not any(t.startswith("VBox(children=") for t in outputs), outputs
    slider = browser.find_element(By.XPATH, "//div[contains(@class, 'widget-slider')]"
                                            "[.//label[normalize-space()='α']]")
    panel = slider.find_element(By.XPATH, "ancestor::div[contains(@class, 'widget-vbox')][last()]")
    image = panel.find_elements(By.CSS_SELECTOR, "img.widget-image")[0]  # the main view; previews follow
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", panel)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
    start = readout.text  # the α the notebook's code left the panel at
    before_src, before_px = image.get_attribute("src"), image.screenshot_as_png
    browser.save_screenshot(str(shots / f"04_live_alpha_{start}.png"))

    # α → 0 (Home), or → 1.2 (End) if it is at 0 already; the slider re-decodes on release, and a
    # key press on its handle is one
    key, target = (Keys.HOME, "0.00") if start != "0.00" else (Keys.END, "1.20")
    slider.find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(key)
    WebDriverWait(browser, 60).until(lambda d: readout.text == target, message=f"α readout: {readout.text}")
    WebDriverWait(browser, 60).until(
        lambda d: f"α = {target}" in panel.text and image.get_attribute("src") != before_src,
        message="the image was not re-rendered")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].complete", image))
    after_px = image.screenshot_as_png
    browser.save_screenshot(str(shots / f"04_live_alpha_{target}.png"))
    phase(f"α moved from {start} to {target}; screenshots in {shots}")
    assert after_px != before_px, "moving α did not change the displayed image"
    from io import BytesIO

    import numpy as np
    from PIL import Image

    before = np.asarray(Image.open(BytesIO(before_px)).convert("RGB"), dtype=int)
    after = np.asarray(Image.open(BytesIO(after_px)).convert("RGB"), dtype=int)
    assert before.shape == after.shape
    changed = (np.abs(before - after).max(axis=2) > 2).mean()
    assert changed > 0.01, f"only {changed:.2%} of the image's pixels changed (screenshots in {shots})"
