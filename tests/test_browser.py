"""The quickstart and batch notebooks in a real browser: JupyterLab on 127.0.0.1 (random port,
token) and headless Chromium driven by Playwright.

Asserted from the DOM, quickstart: the first fit's widget drew points and reads "converged";
clicking Stop on the long fit ends it early with status "stopped" (its cell still running: the sync
fit blocks the kernel); user text (a model name, a parameter name and a message like
``<img src=x onerror=alert(1)>``) renders as literal text and creates no element.

Batch: the map's batch widget shows its batch view (title with the number of fits, the counts,
the converged-fits line and the cost-quantile band as SVG) and ends "failed" in red (two dead
pixels); clicking Stop on a long batch (``curve_fit_batch(verbose=2)`` blocking its cell) ends it
early with status "stopped", and the cell's result counts fits with status -2.

The screenshots are saved as ``quickstart.png`` and ``batch.png`` in the test's ``tmp_path`` and,
when the environment variable ``NLSQ_STREAM_ARTIFACTS`` names a directory, copied there (CI keeps
them as artefacts).

Needs Debian's ``chromium`` at /usr/bin/chromium (Playwright cannot download its own browser
here; ``.ci/run`` installs it), ``playwright``, ``jupyterlab`` and the notebook extra; skipped with
the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

CHROMIUM = Path(os.environ.get("NLSQ_STREAM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]
XSS = "<img src=x onerror=alert(1)>"
SERVER_START_S = 90
CELL_S = 150  # the slowest wait: kernel start, imports and the first compile, on a busy machine

# Appended to the test's copy of the quickstart: hostile user text, fed to a widget as events.
XSS_CELL = f"""
from nlsq_stream.events import FitFinished, FitStarted, Iteration
from nlsq_stream.notebook import FitWidget

XSS = {XSS!r}
xss_widget = FitWidget()
await xss_widget.send_batch([
    FitStarted("fit-xss", "trf", 1, 2, (XSS,), np.zeros(1), 0.0, 10, XSS),
    Iteration("fit-xss", 0, 1, 1.0, None, None, 0.1, np.ones(1), 0.5),
    FitFinished("fit-xss", {{"x": np.ones(1), "cost": 0.5, "optimality": 0.0, "nfev": 2,
                            "njev": 2, "nit": 1, "status": 1, "message": XSS,
                            "success": True}}, 1.0),
])
"""

# Appended to the test's copy of the batch notebook: a batch long enough to stop (unstopped, about
# a minute here: trials=1 and tolerances no fit reaches soon), blocking its cell.
LONG_BATCH_CELL = """
import json

n_long = 40_000
rng = np.random.default_rng(1)
heights, centers = rng.uniform(1, 3, (n_long, 1)), rng.uniform(-0.5, 0.5, (n_long, 1))
long_y = np.array(peak(wavelength, heights, centers, 0.8, 0.2))
long_y += 0.03 * rng.standard_normal(long_y.shape)
long_res = curve_fit_batch(
    peak, wavelength, long_y, p0=[1.0, 0.0, 1.0, 0.0], trials=1, ftol=1e-15, xtol=1e-15,
    gtol=None, verbose=2,
)
print("long batch " + json.dumps({str(k): v for k, v in long_res.counts().items()}))
"""

pytestmark = pytest.mark.timeout(420)


def _requirements() -> None:
    """Skip, saying what is missing -- except in CI (``CI`` set), where this test must run."""
    missing = [] if CHROMIUM.exists() else [f"{CHROMIUM} (apt-get install chromium)"]
    for mod in ("playwright.sync_api", "jupyterlab", "anywidget"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"python module {mod} (pip install -e '.[test]')")
    if missing:
        why = "missing: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test; {why} (.ci/run installs them)")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str, method: str = "GET") -> object:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


def _processes_under(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (our private runtime dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def jupyterlab(root: Path, home: Path) -> Iterator[str]:
    """JupyterLab serving ``root`` on 127.0.0.1, a random port and a token; yields the base URL
    with the token. Everything it writes (config, runtime, settings, workspaces) is under
    ``home``. On exit its kernels are shut down and the server and any kernel left are ended."""
    port, token = _free_port(), secrets.token_hex(16)
    runtime = home / "runtime"
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No news or update checks: the network is closed and their toasts cover the page.
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    spec = home / "data" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (test)", "language": "python"})
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(runtime),
        JUPYTER_PATH=str(home / "data"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
        JAX_PLATFORMS="cpu",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
        "--ServerApp.allow_remote_access=False",
        "--allow-root",  # CI runs as root
    ]
    log = (home / "jupyterlab.log").open("wb")
    server = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited: {(home / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                _get(f"{base}/api/status", token)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s")
                time.sleep(0.3)
        yield f"{base}?token={token}"
    finally:
        with contextlib.suppress(Exception):
            for k in _get(f"{base}/api/kernels", token) or []:  # type: ignore[union-attr]
                _get(f"{base}/api/kernels/{k['id']}", token, method="DELETE")
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
        left = _processes_under(str(runtime))  # kernels launched by this server
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind by JupyterLab: {left}"


def _save_artifact(src: Path) -> None:
    dest = os.environ.get("NLSQ_STREAM_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, Path(dest) / src.name)


def _run_all_cells(page: Any, url: str, notebook: str) -> None:
    """Open ``notebook`` in JupyterLab, wait for its kernel, and start running every cell."""
    page.goto(url.replace("?", f"/lab/tree/{notebook}?"))
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
        timeout=CELL_S * 1000,
    )
    # Not awaited: the command's promise settles only when every cell has run.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def test_quickstart_in_jupyterlab(tmp_path):
    _requirements()
    from playwright.sync_api import expect, sync_playwright

    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(XSS_CELL))
    nbformat.write(nb, root / "quickstart.ipynb")
    shot = tmp_path / "quickstart.png"

    with jupyterlab(root, tmp_path / "home") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2400})
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            _run_all_cells(page, url, "quickstart.ipynb")
            widgets = page.locator("[data-nlsq=root]")

            # 1. The first fit: points drawn, status converged.
            first = widgets.nth(0)
            expect(first).to_have_attribute("data-status", "converged", timeout=CELL_S * 1000)
            plot = first.locator("svg[data-nlsq=plot]")
            # (a fit that ends within one flush may show only its last point: policy latest)
            assert int(plot.get_attribute("data-npoints")) >= 1
            assert plot.locator("circle.nlsq-point").count() >= 1
            assert plot.locator("polyline.nlsq-line").count() == 1
            assert first.locator("[data-nlsq=status]").inner_text() == "converged"
            assert "amplitude" in first.locator("[data-nlsq=params]").inner_text()

            # 2. The long fit: Stop while its cell runs; it ends early, stopped.
            long = widgets.nth(1)
            expect(long).to_have_attribute("data-status", "running", timeout=CELL_S * 1000)
            page.wait_for_function(
                "el => /iteration ([0-9]+)/.exec(el.textContent) &&"
                " +/iteration ([0-9]+)/.exec(el.textContent)[1] >= 20",
                arg=long.locator("[data-nlsq=counts]").element_handle(),
                timeout=CELL_S * 1000,
            )
            long.locator("[data-nlsq=stop]").click()
            clicked = time.monotonic()
            expect(long).to_have_attribute("data-status", "stopped", timeout=60_000)
            stopped_after = time.monotonic() - clicked
            long_plot = long.locator("svg[data-nlsq=plot]")
            assert int(long_plot.get_attribute("data-npoints")) >= 3  # drawn live, 20 it/s
            assert long_plot.locator("circle.nlsq-point").count() >= 3
            assert long.locator("[data-nlsq=status]").inner_text() == "stopped"
            text = page.locator(".jp-OutputArea-output", has_text="evaluations; a =")
            expect(text).to_have_count(1, timeout=60_000)
            printed = text.inner_text()
            assert "stopped" in printed, printed
            nfev = int(re.search(r"after (\d+) evaluations", printed).group(1))
            assert nfev < 4000, printed  # unstopped: ~4900
            assert stopped_after < 30, stopped_after

            # 3. Hostile text renders as text.
            xss = widgets.nth(2)
            expect(xss).to_have_attribute("data-status", "converged", timeout=CELL_S * 1000)
            assert XSS in xss.locator("[data-nlsq=title]").inner_text()
            assert xss.locator(".nlsq-pname").inner_text() == XSS
            assert xss.locator("[data-nlsq=message]").inner_text() == XSS
            assert page.locator("img[src='x']").count() == 0
            assert xss.locator("img").count() == 0
            assert dialogs == []

            long.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            if not shot.exists():
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(shot), full_page=True)  # the state at failure
            if shot.exists():
                _save_artifact(shot)
            browser.close()
    assert shot.stat().st_size > 10_000


def test_batch_in_jupyterlab(tmp_path):
    _requirements()
    from playwright.sync_api import expect, sync_playwright

    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.read(REPO / "notebooks" / "batch.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(LONG_BATCH_CELL))
    nbformat.write(nb, root / "batch.ipynb")
    shot = tmp_path / "batch.png"

    with jupyterlab(root, tmp_path / "home") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2400})
            _run_all_cells(page, url, "batch.ipynb")
            widgets = page.locator("[data-nlsq=root]")

            # 1. The map: 400 fits, two dead pixels; the batch view, ending red.
            first = widgets.nth(0)
            expect(first).to_have_attribute("data-status", "failed", timeout=CELL_S * 1000)
            assert first.get_attribute("data-view") == "batch"
            assert "400 fits" in first.locator("[data-nlsq=title]").inner_text()
            status = first.locator("[data-nlsq=status]")
            assert status.inner_text() == "failed"
            assert "nlsq-danger" in status.get_attribute("class")
            counts = first.locator("[data-nlsq=counts]").inner_text()
            for part in ("converged 398/400", "failed 2", "running 0", "fits/s"):
                assert part in counts, counts
            expect(first.locator("[data-nlsq=fit-view]")).to_be_hidden()
            conv = first.locator("svg[data-nlsq=converged]")
            assert conv.is_visible() and conv.locator("polyline.nlsq-line").count() == 1
            band = first.locator("svg[data-nlsq=band]")
            assert band.is_visible() and int(band.get_attribute("data-npoints")) >= 1
            assert band.locator("polygon[data-nlsq=band-minmax]").count() == 1
            assert band.locator("polygon[data-nlsq=band-10-90]").count() == 1
            assert band.locator("polyline[data-nlsq=median]").count() == 1
            assert "398/400 converged" in first.locator("[data-nlsq=message]").inner_text()
            assert first.locator("[data-nlsq=stop]").is_hidden()

            # 2. The long batch: Stop while its cell blocks; every running fit ends stopped.
            long = widgets.nth(1)
            expect(long).to_have_attribute("data-status", "running", timeout=CELL_S * 1000)
            assert long.get_attribute("data-view") == "batch"
            assert "40000 fits" in long.locator("[data-nlsq=title]").inner_text()
            page.wait_for_function(
                "el => +el.getAttribute('data-npoints') >= 2",  # progress drawn live
                arg=long.locator("svg[data-nlsq=band]").element_handle(),
                timeout=CELL_S * 1000,
            )
            assert "running" in long.locator("[data-nlsq=counts]").inner_text()
            long.locator("[data-nlsq=stop]").click()
            clicked = time.monotonic()
            expect(long).to_have_attribute("data-status", "stopped", timeout=60_000)
            stopped_after = time.monotonic() - clicked
            status = long.locator("[data-nlsq=status]")
            assert status.inner_text() == "stopped"
            assert "nlsq-warning" in status.get_attribute("class")
            counts = long.locator("[data-nlsq=counts]").inner_text()
            assert re.search(r"stopped [1-9]", counts) and "running 0" in counts, counts
            text = page.locator(".jp-OutputArea-output", has_text="long batch ")
            expect(text).to_have_count(1, timeout=60_000)
            printed = text.inner_text()
            result = json.loads(printed.split("long batch ", 1)[1])
            assert result.get("-2", 0) > 0, printed
            assert sum(result.values()) == 40_000, printed
            assert stopped_after < 30, stopped_after

            long.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            if not shot.exists():
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(shot), full_page=True)  # the state at failure
            if shot.exists():
                _save_artifact(shot)
            browser.close()
    assert shot.stat().st_size > 10_000
