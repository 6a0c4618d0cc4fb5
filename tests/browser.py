"""A headless Debian Chromium driven by Selenium, for tests that look at the hosts' real web pages.

Tests assert on what the page contains (elements, texts, an output image that loads); a screenshot
asserts nothing, it only illustrates the docs: with KDISTPP_SCREENSHOTS=<folder> set, `screenshot()`
saves PNGs there (`python tools/screenshots.py` runs the browser tests that way into docs/img).

Everything here skips with a reason when Chromium, chromedriver or Selenium is absent, since the
README's plain `pytest` collects the browser tests too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("KDISTPP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KDISTPP_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = "KDISTPP_SCREENSHOTS"
# No network here and none wanted: no first-run, sync, update or field-trial traffic, no GPU.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1000", "--hide-scrollbars")


def require_browser() -> None:
    """Skips unless Selenium imports and Chromium and its driver are installed."""
    try:
        import selenium  # noqa: F401
    except ImportError as err:
        pytest.skip(f"selenium is not installed here (.ci/run installs it in the host venvs): {err}")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.skip(f"{path} not found: install Debian's chromium and chromium-driver "
                        "(or set KDISTPP_CHROMIUM / KDISTPP_CHROMEDRIVER)")


@contextlib.contextmanager
def chromium(width: int = 1600, height: int = 1000):
    """A headless Chromium with a fresh profile; quit (and its profile removed) on exit."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="kdistpp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below: no Selenium Manager lookup
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Waits until `url` answers 200; fails with the server's log tail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s (exit code {process.poll() if process else None})"
                       f":\n{tail}")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stops a server started by a test (its whole process group), killing it if it does not exit."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout)


def spawn(argv: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server in its own process group (so `stop` takes its children too), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                     **(env or {})})


def screenshot(driver, name: str, box: tuple[float, float, float, float] | None = None,
               margin: int = 12) -> Path | None:
    """Saves `<KDISTPP_SCREENSHOTS>/<name>.png` when that variable is set: the window, or the part of it
    inside `box` = (left, top, right, bottom) in CSS pixels, widened by `margin`."""
    folder = os.environ.get(SCREENSHOTS)
    if not folder:
        return None
    path = Path(folder).resolve() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    if box is not None:
        from PIL import Image

        scale = driver.execute_script("return window.devicePixelRatio || 1")
        with Image.open(path) as image:
            left, top, right, bottom = box
            crop = (max(0, int((left - margin) * scale)), max(0, int((top - margin) * scale)),
                    min(image.width, int((right + margin) * scale)), min(image.height, int((bottom + margin) * scale)))
            image.crop(crop).save(path, optimize=True)
    return path


def union(*rects: dict) -> tuple[float, float, float, float]:
    """The box around Selenium/DOM rects ({x, y, width, height} dicts)."""
    return (min(r["x"] for r in rects), min(r["y"] for r in rects),
            max(r["x"] + r["width"] for r in rects), max(r["y"] + r["height"] for r in rects))


def hover(driver, x: float, y: float) -> None:
    """Moves the mouse to page coordinates (x, y): canvases read positions, not elements."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
    actions.perform()


def wait_for(driver, condition, timeout: float = 30, message: str = ""):
    """WebDriverWait(driver, timeout).until(condition), with the browser's console tail in the failure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        try:
            console = "\n".join(entry["message"] for entry in driver.get_log("browser")[-15:])
        except Exception:  # noqa: BLE001 - the log is only extra context for the failure
            console = ""
        raise AssertionError(f"{message or condition} not seen in {timeout} s; browser console:\n{console}") from None


def python() -> str:
    return sys.executable



def serve_webui(root: str, assets: str, *argv: str) -> None:
    """The body of a webui page server started by `start_webui` (run in that child process): `webui.py`
    as its launcher runs it, with the page's assets folder taken from `assets` when the tree lacks it
    (the launcher clones it: stable-diffusion-webui-assets, only fonts and css)."""
    import runpy

    os.chdir(root)
    sys.argv = [os.path.join(root, "webui.py"), *argv]
    if not os.path.isdir(os.path.join(root, "repositories", "stable-diffusion-webui-assets")):
        sys.path.insert(0, root)
        from modules import launch_utils

        repo_dir = launch_utils.repo_dir
        launch_utils.repo_dir = lambda name: assets if name == "stable-diffusion-webui-assets" else repo_dir(name)
    runpy.run_path(sys.argv[0], run_name="__main__")


def start_webui(root: Path, data: Path, tmp: Path, timeout: float = 300, env: dict | None = None):
    """The webui's page server (`webui.py`, gradio) on a free port with `--data-dir data`, on CPU; returns
    (url, process, log). Stop it with `stop(process)`."""
    port = free_port()
    log = tmp / "webui.log"
    assets = tmp / "webui-assets"
    assets.mkdir(exist_ok=True)
    flags = ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-download-sd-model", "--skip-prepare-environment",
             "--skip-version-check", "--no-half", "--data-dir", str(data), "--port", str(port)]
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import browser; "
            f"browser.serve_webui(*sys.argv[1:])")
    process = spawn([python(), "-c", code, str(root), str(assets), *flags], root, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/internal/ping", process, timeout, log)
    except BaseException:
        stop(process)
        raise
    return url, process, log
