"""The web app in a real browser: Debian's headless Chromium driven by Selenium, with no network.

A missing browser, driver or package FAILS this test with what to install; set GAS_SKIP_BROWSER=1
to skip it on purpose. The screenshot goes to $GAS_ARTIFACTS_DIR (or the test's tmp folder);
GAS_UPDATE_SCREENSHOT=1 also refreshes docs/app.png, which the README shows.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image
from test_terminal import NOISE

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "gas_lightning" / "worlds" / "assets" / "example.png"
MODEL = ROOT / "gas_lightning" / "worlds" / "assets" / "shapes-model"
STEPS = int(os.environ.get("GAS_BROWSER_STEPS", "3"))  # docs/app.png was made with 60


def _requirements() -> tuple[str, str]:
    missing = []
    for module, how in (
        ("selenium", "pip install -e '.[test]'"),
        ("gradio", "pip install -e '.[app]'"),
        ("gradio_image_annotation", "pip install -e '.[app]'"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module} ({how})")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None:
        missing.append("Chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        message = f"the browser test needs {'; '.join(missing)}"
        if os.environ.get("GAS_SKIP_BROWSER") == "1":
            pytest.skip(f"GAS_SKIP_BROWSER=1: {message}")
        pytest.fail(
            f"{message}. Install them (.ci/run does), or set GAS_SKIP_BROWSER=1 to skip this test on purpose",
            pytrace=False,
        )
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, limit: float, proc=None):
    """Poll until `condition()` is truthy; fail with `what` (and the app's log) after `limit` seconds."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the app exited with status {proc.returncode} while waiting for {what}")
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"gave up waiting {limit:.0f} s for {what}")


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


@pytest.fixture()
def app_url(tmp_path):
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gas_lightning.cli",
            "app",
            "--port",
            str(port),
            "--output_dir",
            str(tmp_path / "edits"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return _fetch(url + "/config")
        except OSError:
            return None

    try:
        _wait(up, "the app to listen", 300, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        print((tmp_path / "app.log").read_text()[-3000:])


def test_edit_in_the_browser(app_url, tmp_path):
    browser, driver_path = _requirements()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1500",
        # no network: every request that is not to the app (loopback bypasses a proxy) fails
        "--proxy-server=http://127.0.0.1:9",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)  # no selenium-manager
    try:
        driver.get(app_url)
        find = lambda css: driver.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
        status = lambda: " ".join(e.text for e in find("#status"))  # noqa: E731
        upload = _wait(lambda: find("#upload input[type=file]"), "the upload box", 120)
        # issue 28, point 8: the page says what Find the boxes does
        assert "Find the boxes asks the detector" in " ".join(driver.find_element(By.TAG_NAME, "body").text.split())
        upload[0].send_keys(str(EXAMPLE))
        _wait(lambda: "objects found" in status(), "the detected boxes", 180)
        assert "4 objects found" in status()  # the bundled request names 4 objects
        # no title over the box editor: a box at the picture's top keeps its label in view
        canvas_top = find("#boxes canvas")[0].rect["y"]
        over = [
            e.text
            for e in find("#boxes label, #boxes [data-testid=block-label]")
            if e.is_displayed() and e.rect["y"] + e.rect["height"] > canvas_top and e.rect["y"] < canvas_top + 20
        ]
        assert not over, over

        # redo the red circle's box by drawing one over the 256-pixel example, from (20, 28) to (124, 132)
        canvas = find("#boxes canvas")[0]
        w, h = canvas.rect["width"], canvas.rect["height"]
        scale = min(w, h) / 256  # the editor fits the picture in its canvas, centred

        def at(x, y):  # from the canvas centre
            return round((w - 256 * scale) / 2 + x * scale - w / 2), round((h - 256 * scale) / 2 + y * scale - h / 2)

        (x0, y0), (x1, y1) = at(20, 28), at(124, 132)
        ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold().move_by_offset(
            (x1 - x0) // 2, (y1 - y0) // 2
        ).move_by_offset(x1 - x0 - (x1 - x0) // 2, y1 - y0 - (y1 - y0) // 2).release().perform()
        ok = _wait(
            lambda: [b for b in find("#model-box-edit button") if b.text.strip() == "OK"], "the label dialog", 30
        )
        ok[0].click()  # its label is the first object's, the red circle's

        steps = find("#steps input")[0]
        steps.clear()
        steps.send_keys(str(STEPS))
        find("#run")[0].click()
        _wait(lambda: "done:" in status() or find(".toast-body"), "the edit to finish", 900)
        assert f"done: {STEPS} steps" in status(), [e.text for e in find(".toast-body")]

        edited = _wait(lambda: [e for e in find("#edited img") if e.get_attribute("src")], "the edited image", 60)
        picture = Image.open(io.BytesIO(_fetch(edited[0].get_attribute("src")))).convert("RGB")
        side = json.loads((MODEL / "unet" / "config.json").read_text())["sample_size"]
        assert picture.size == (side, side)  # a square picture edits at the pixel model's own size

        links = {
            Path(urlparse(a.get_attribute("href")).path).name: a.get_attribute("href")
            for a in find("#downloads a")
            if a.get_attribute("href")
        }
        assert set(links) >= {"edited.png", "plan.json", "config.yaml"}, links
        download = Image.open(io.BytesIO(_fetch(links["edited.png"]))).convert("RGB")
        assert download.tobytes() == picture.tobytes()  # the file offered is the picture shown
        plan = json.loads(_fetch(links["plan.json"]))
        assert [s["source"] for s in plan["subtasks"]] == [
            "the red circle",
            "the blue square",
            "the snow",
            "the orange triangle",
        ]
        assert plan["subtasks"][0]["box"] == pytest.approx([20 / 256, 28 / 256, 124 / 256, 132 / 256], abs=1.01 / 256)
        # the other boxes went to the page and back in whole pixels of the example: within half a pixel
        from gas_lightning import plan_edit

        detected = plan_edit(str(EXAMPLE))  # the bundled preset's request, which the page starts with
        for s, d in zip(plan["subtasks"][1:], detected.subtasks[1:]):
            assert s["box"] == pytest.approx(list(d.box), abs=0.5 / 256 + 1e-6)
        assert detected.subtasks[0].box != pytest.approx(plan["subtasks"][0]["box"], abs=2 / 256)  # it did change
        assert f"max_steps: {STEPS}" in _fetch(links["config.yaml"]).decode()

        shot = Path(os.environ.get("GAS_ARTIFACTS_DIR") or tmp_path) / "app.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        if os.environ.get("GAS_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "app.png")

        # issue 28, point 8: after an upload was removed, the example button fills the Image box as an upload would
        find("#upload button[aria-label='Clear']")[0].click()
        _wait(lambda: "Drop File Here" in " ".join(e.text for e in find("#upload")), "the cleared Image box", 30)
        find("#example")[0].click()
        _wait(lambda: "objects found" in status(), "the example's boxes", 180)
        shown = " ".join(e.text for e in find("#upload"))
        assert "example.png" in "".join(shown.split()) and "Drop File Here" not in shown, shown

        requested = {
            json.loads(entry["message"])["message"].get("params", {}).get("request", {}).get("url")
            for entry in driver.get_log("performance")
        }
        outside = sorted(u for u in requested if u and not u.startswith((app_url, "data:", "blob:")))
        assert not outside, f"the page asked the network for {outside}"

        terminal = (tmp_path / "app.log").read_text()
        assert f"step {STEPS}/{STEPS}" in terminal
        assert [n for n in NOISE + ("environment=client",) if n in terminal] == [], terminal[-3000:]
    finally:
        driver.quit()
