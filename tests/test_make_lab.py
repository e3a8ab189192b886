"""The README's first command, `make lab`, starts a JupyterLab that answers on HTTP, also for root.

The virtual environment is taken as set up (`make -o .venv/.installed lab`: the install step is not
rerun, so the test needs no network). The server runs in its own process group, which is ended,
whole, when the test ends; it may take at most STARTUP_SECONDS to answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = ".venv/.installed"
STARTUP_SECONDS = 120
URL = re.compile(r"(http://127\.0\.0\.1:\d+)/lab\?token=\w+")


def _stop(process: subprocess.Popen) -> None:
    """End the whole process group that `make lab` started (make, the shell, JupyterLab)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def test_make_lab_serves_jupyterlab_on_localhost(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    assert (ROOT / STAMP).exists(), "set up the virtual environment first (make setup)"
    env = os.environ | {
        "BROWSER": "true",  # the browser JupyterLab opens: the `true` command, which shows nothing
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),  # its server files, removed with tmp_path
    }
    log = tmp_path / "lab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["make", "-o", STAMP, "lab"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, url = time.monotonic() + STARTUP_SECONDS, None
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, f"make lab exited with {process.returncode}:\n{log.read_text()}"
            url = next(iter(URL.findall(log.read_text())), None)
            time.sleep(0.5)
        assert url is not None, f"no server URL after {STARTUP_SECONDS} s:\n{log.read_text()}"
        with urllib.request.urlopen(f"{url}/api", timeout=30) as response:  # /api needs no token
            assert response.status == 200
            assert "version" in json.loads(response.read())
        if os.getuid() == 0:
            assert "--allow-root" in log.read_text()  # make echoes the command it runs
    finally:
        _stop(process)
    assert process.poll() is not None
