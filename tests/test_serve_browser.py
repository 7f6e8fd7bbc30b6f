"""The web page in a real browser: Debian's chromium driven headless by playwright against a
`retain serve` started here on 127.0.0.1: classify, teach a new class, see it predicted, roll
back; teaching by loose images, by a zip and by a folder. Screenshots go to test-artifacts/
(serve-page.png, serve-page-rolled-back.png)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and
                 Path(p).is_file()), None)
if CHROMIUM is None:
    pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); .ci/run "
                "installs it where apt-get can", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install -e '.[test]')")
pytest.importorskip("uvicorn")

ARTEFACTS = Path(__file__).parents[1] / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shape(kind: str, i: int) -> np.ndarray:
    a = np.random.RandomState(i).randint(0, 20, (8, 8)).astype(np.uint8)
    if kind == "star":
        a[3:5, :], a[:, 3:5] = 250, 250
    elif kind == "moon":
        a[:, :4] = 250
    else:  # box
        a[0, :], a[-1, :], a[:, 0], a[:, -1] = 250, 250, 250, 250
    return a


def save(a: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).resize((64, 64), Image.NEAREST).save(path)  # big enough to look at
    return path


@pytest.fixture
def server(serve_run, tmp_path):
    port = free_port()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retain.cli", "serve", str(serve_run), "--state",
         str(tmp_path / "state"), "--port", str(port), "--token", "s3cret", "--learn-in",
         "thread"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 180:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode()[-3000:]) from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    log = proc.communicate(timeout=30)[0].decode()
    assert "POST /learn 202" in log and "POST /predict 200" in log, log[-3000:]


def test_page_classifies_teaches_and_rolls_back(server, tmp_path):
    from retain.datasets import create_dataset

    b = create_dataset("digits").load()
    digits = [save(b.test.data[i], tmp_path / "digits" / f"digit{i}.png") for i in range(3)]
    stars = [save(shape("star", i), tmp_path / "star" / f"{i}.png") for i in range(5)]
    probe = save(shape("star", 99), tmp_path / "probe" / "star-probe.png")
    moons = io.BytesIO()
    with zipfile.ZipFile(moons, "w") as z:
        for i in range(4):
            z.writestr(f"moon/{i}.png", save(shape("moon", i), tmp_path / "m" / f"{i}.png")
                       .read_bytes())
    (tmp_path / "moons.zip").write_bytes(moons.getvalue())
    for i in range(4):  # a folder of <class>/<image> folders
        save(shape("box", i), tmp_path / "shapes" / "box" / f"{i}.png")
    ARTEFACTS.mkdir(exist_ok=True)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(server)
        page.wait_for_function("document.getElementById('status').textContent"
                               ".includes('version 1')")
        page.fill("#token", "s3cret")
        page.dispatch_event("#token", "change")

        page.set_input_files("#predict-files", [str(d) for d in digits])  # classify
        page.wait_for_function("document.querySelectorAll('#results .card').length === 3")
        assert page.locator("#results .card").first.locator(".bar").count() == 5

        page.set_input_files("#teach-files", [str(s) for s in stars])  # teach "star"
        page.fill("#teach-label", "star")
        page.click("#teach")
        page.wait_for_function("document.getElementById('message').textContent"
                               ".startsWith('version 2 learned star')")

        page.evaluate("""async (bytes) => {  // drop the probe onto the classify zone
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "star-probe.png",
                                  {type: "image/png"}));
            document.getElementById("predict-drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        }""", list(probe.read_bytes()))
        page.wait_for_selector("#results .card[data-top='star']")

        page.set_input_files("#teach-zip", str(tmp_path / "moons.zip"))  # a zip of <class>/
        page.fill("#teach-label", "")
        page.click("#teach")
        page.wait_for_function("document.getElementById('message').textContent"
                               ".startsWith('version 3 learned moon')")
        page.set_input_files("#teach-folder", str(tmp_path / "shapes"))  # a folder
        page.click("#teach")
        page.wait_for_function("document.getElementById('message').textContent"
                               ".startsWith('version 4 learned box')")
        page.wait_for_function("document.querySelectorAll('#versions tr').length === 4")
        page.wait_for_function("document.getElementById('classes').textContent"
                               ".includes('box')")
        page.set_input_files("#predict-files", [str(probe), str(tmp_path / "m" / "0.png")])
        page.wait_for_selector("#results .card[data-top='moon']")
        page.screenshot(path=str(ARTEFACTS / "serve-page.png"), full_page=True)

        page.click("#versions button[data-version='1']")  # roll back to the run's model
        page.wait_for_function("document.getElementById('message').textContent"
                               ".startsWith('now serving version 5')")
        page.wait_for_function("!document.getElementById('classes').textContent"
                               ".includes('star')")
        page.set_input_files("#predict-files", str(probe))
        page.wait_for_function("document.querySelector('#results .card .meta').textContent"
                               ".includes('version 5')")
        assert page.locator("#results .card").first.get_attribute("data-top") != "star"
        page.screenshot(path=str(ARTEFACTS / "serve-page-rolled-back.png"), full_page=True)
        browser.close()
    print(f"screenshots: {ARTEFACTS}/serve-page.png, serve-page-rolled-back.png")
