"""The attention explorer in a real JupyterLab, driven through headless Chromium with Playwright.

JupyterLab is started on 127.0.0.1 (a free port, a fresh token, its settings, workspaces and
runtime files in a temporary folder), the notebook is opened from a clean copy (no stored outputs,
so everything seen comes from this run), all cells are run from the Run menu, and the explorer
panel's rendered image must change when the layer and then the digit change. The layer slider is
then moved several times and the median time from the key press to the new image is reported and
held to LATENCY_MEDIAN_MS. A stroke drawn with the mouse on the drawing pad must produce a 28 x 28
input and a prediction. No cell may show a traceback. Screenshots go to test-artifacts/ (page and
panel; on failure, failure.png).

Needs /usr/bin/chromium (Debian's package; a browser is never downloaded). Without it the test
is skipped, unless VITLAB_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "06_attention_explorer.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]

# Bounded waits, in seconds: generous for a busy two-core machine, short enough to stay under 3 minutes.
SERVER_START = 60
PAGE_LOAD = 60
RUN_ALL = 100
REDRAW = 30
LATENCY_MOVES = 7  # layer slider moves timed
LATENCY_MEDIAN_MS = 150.0  # slider to new image, median, on two CPU cores


def _require_browser() -> None:
    """Skip (or, with VITLAB_REQUIRE_BROWSER=1, fail) when Chromium or Playwright is missing."""
    missing = None
    if not CHROMIUM.is_file():
        missing = f"{CHROMIUM} not found (install Debian's chromium package: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the Python package playwright is not installed (pip install playwright)"
    if missing is None:
        return
    if os.environ.get("VITLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"VITLAB_REQUIRE_BROWSER=1 but {missing}")
    pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(url: str, token: str, path: str, method: str = "GET", timeout: float = 5.0):
    request = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def _write_settings(settings: Path) -> None:
    """User settings for this server only: render every cell (so outputs below the fold are in the page) and no news."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                             "checkForUpdates": False},
    }
    for name, values in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _clean_copy(folder: Path) -> Path:
    """The notebook without its stored outputs and widget state, so every output seen comes from this run."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    notebook.metadata.pop("widgets", None)
    path = folder / NOTEBOOK.name
    nbformat.write(notebook, path)
    return path


def _stop(process: subprocess.Popen, url: str, token: str) -> None:
    """Shut the server down through its API (which stops its kernels), then make sure the process is gone."""
    if process.poll() is None:
        try:
            for kernel in _api(url, token, "/api/kernels") or []:
                _api(url, token, f"/api/kernels/{kernel['id']}", method="DELETE", timeout=15)
        except (OSError, urllib.error.URLError, ValueError):
            pass
        try:
            _api(url, token, "/api/shutdown", method="POST")
        except (OSError, urllib.error.URLError, ValueError):
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """-> (base url, token) of a JupyterLab serving a clean copy of the notebook; always shut down afterwards."""
    _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "notebooks"  # the notebook's ../data is then home/data: empty, as on a fresh machine
    root.mkdir()
    _clean_copy(root)
    _write_settings(home / "settings")
    port, token = _free_port(), secrets.token_hex(24)
    url = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_CONFIG_DIR=str(home / "config"),  # ignore the user's own server config (passwords, ...)
        JUPYTER_DATA_DIR=str(home / "data"),  # the notebook-signing key goes here, not into ~/.local
        HF_HUB_OFFLINE="1",  # the notebook's pretrained-ViT section: no download attempt from a test
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    command = [
        sys.executable, "-m", "jupyterlab",  # this interpreter's JupyterLab, not the first jupyter-lab on PATH
        "--allow-root", "--no-browser",
        "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log_path = ARTIFACTS / "jupyterlab.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + SERVER_START
            while True:
                if process.poll() is not None:
                    pytest.fail(f"JupyterLab exited with code {process.returncode}; see {log_path}")
                try:
                    _api(url, token, "/api/status", timeout=2)
                    break
                except (OSError, urllib.error.URLError):
                    if time.monotonic() > deadline:
                        pytest.fail(f"JupyterLab did not answer on {url} within {SERVER_START} s; see {log_path}")
                    time.sleep(0.5)
            yield url, token
        finally:
            _stop(process, url, token)


def _errors(page) -> list[str]:
    """The text of every output that shows a traceback (error outputs render as stderr in JupyterLab 4)."""
    texts = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    return [text for text in texts if "Traceback" in text or re.search(r"^\w*Error\b", text, re.MULTILINE)]


def _wait_until_all_cells_ran(page, timeout: float) -> None:
    """Wait until every code cell has an execution count and the kernel is idle; fail at the first traceback."""
    deadline = time.monotonic() + timeout
    idle = page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\|\s*Idle"))
    while True:
        errors = _errors(page)
        assert not errors, "a cell failed:\n" + "\n\n".join(errors)
        prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()
        done = prompts and all(re.fullmatch(r"\s*\[\d+\]:\s*", text) for text in prompts)
        if done and idle.count() > 0:
            return
        if time.monotonic() > deadline:
            waiting = sum(not re.fullmatch(r"\s*\[\d+\]:\s*", text) for text in prompts)
            pytest.fail(f"after {timeout} s, {waiting} of {len(prompts)} code cells have not run")
        page.wait_for_timeout(500)


def _set_slider(page, name: str, value: int) -> None:
    """Type ``value`` into the editable readout of the explorer's slider ``name``, as a user can."""
    readout = page.locator(f".vitlab-explorer-{name} .widget-readout")
    readout.scroll_into_view_if_needed()
    readout.click()
    readout.fill(str(value))
    readout.press("Enter")
    readout.blur()


def _new_src(image, old: str, timeout: float) -> str:
    """Wait until the panel's <img> shows another image than ``old`` (its src is a blob: URL of the PNG)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        src = image.get_attribute("src")
        if src and src != old:
            return src
        image.page.wait_for_timeout(50)
    pytest.fail(f"the explorer's image did not change within {timeout} s")


_WATCH_SRC = """selector => {
    const img = document.querySelector(selector);
    window.__vitlabChanged = null;
    new MutationObserver(() => { window.__vitlabChanged = performance.now(); })
        .observe(img, {attributes: true, attributeFilter: ["src"]});
}"""


def _slider_latency_ms(page, name: str, value: int, image_selector: str) -> float:
    """Type ``value`` into slider ``name``'s readout and return the ms from the Enter key to the image's new src."""
    readout = page.locator(f".vitlab-explorer-{name} .widget-readout")
    readout.click()
    readout.fill(str(value))
    page.evaluate(_WATCH_SRC, image_selector)
    start = page.evaluate("performance.now()")
    readout.press("Enter")
    page.wait_for_function("() => window.__vitlabChanged !== null", timeout=REDRAW * 1000, polling="raf")
    return page.evaluate("window.__vitlabChanged") - start


def test_explorer_panel_redraws_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    start = time.monotonic()

    def mark(step: str) -> None:  # progress, shown with pytest -s: where the time goes on a slow machine
        print(f"{time.monotonic() - start:6.1f} s  {step}", flush=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(PAGE_LOAD * 1000)
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?reset&token={token}")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell")
            mark("notebook shown")
            page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\|\s*Idle")).wait_for()
            mark("kernel idle")

            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-item", has_text=re.compile(r"^Run All Cells$")).click()
            _wait_until_all_cells_ran(page, RUN_ALL)
            mark("all cells ran")

            panel = page.locator(".vitlab-explorer").first
            image = page.locator("img.vitlab-explorer-out").first
            image.wait_for()
            panel.scroll_into_view_if_needed()
            first = image.get_attribute("src")
            assert first.startswith("blob:")
            panel.screenshot(path=ARTIFACTS / "explorer_panel_start.png")

            _set_slider(page, "layer", 1)
            second = _new_src(image, first, REDRAW)
            mark("redrawn for another layer")
            assert page.locator(".vitlab-explorer-layer .widget-readout").inner_text().strip() == "1"

            _set_slider(page, "digit", 7)
            third = _new_src(image, second, REDRAW)
            mark("redrawn for another digit")
            assert third != first
            assert page.locator(".vitlab-explorer-digit .widget-readout").inner_text().strip() == "7"

            latencies = [_slider_latency_ms(page, "layer", (2 + i) % 6, "img.vitlab-explorer-out")
                         for i in range(LATENCY_MOVES)]
            median = sorted(latencies)[len(latencies) // 2]
            mark(f"layer slider to new image: median {median:.0f} ms over {len(latencies)} moves "
                 f"({', '.join(f'{t:.0f}' for t in latencies)} ms)")
            (ARTIFACTS / "explorer_latency.txt").write_text(
                f"median {median:.1f} ms; moves {[round(t, 1) for t in latencies]}\n")
            assert median <= LATENCY_MEDIAN_MS, f"median slider-to-image {median:.0f} ms > {LATENCY_MEDIAN_MS} ms"

            pad = page.locator("canvas.vitlab-draw-canvas, .vitlab-draw-canvas canvas").first
            pad.scroll_into_view_if_needed()
            result = page.locator(".vitlab-draw-result").first
            before_text = result.inner_text()
            digit_image = page.locator("img.vitlab-draw-input-image").first
            before_src = digit_image.get_attribute("src") or ""
            box = pad.bounding_box()
            x, top, bottom = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2, box["y"] + box["height"] * 0.8
            page.mouse.move(x, top)
            page.mouse.down()
            page.mouse.move(x, bottom, steps=12)  # a vertical stroke down the middle: a 1
            page.mouse.up()
            deadline = time.monotonic() + REDRAW
            while "prediction:" not in result.inner_text() and time.monotonic() < deadline:
                page.wait_for_timeout(100)
            text = result.inner_text()
            mark(f"drawn: {text}")
            assert "prediction:" in text and text != before_text
            after_src = _new_src(digit_image, before_src, REDRAW)
            assert after_src != before_src
            page.locator(".vitlab-draw").first.screenshot(path=ARTIFACTS / "drawing_pad.png")

            errors = _errors(page)
            assert not errors, "a cell or the panel shows an error:\n" + "\n\n".join(errors)
            panel.screenshot(path=ARTIFACTS / "explorer_panel.png")
            page.screenshot(path=ARTIFACTS / "explorer_page.png", full_page=True)
        except BaseException:
            try:
                page.screenshot(path=ARTIFACTS / "failure.png", full_page=True)
            except Exception:  # noqa: BLE001 - keep the original failure, not the screenshot's
                pass
            raise
        finally:
            browser.close()
