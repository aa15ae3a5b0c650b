"""app.py served to a real browser (Debian's headless Chromium, driven by Playwright) as a user would meet it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import sync_playwright

from conftest import ROOT, run_script
from latexocr import render
from latexocr.data import read_csv, write_conversations

RUN_DIR = "output/Qwen2-VL-2B-LatexOCR"
# As root in a container: no sandbox, no GPU, and nothing that reaches for the network on its own.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_S = 300  # for app.py to load the model and answer; a busy 2-core machine is slow
ANSWER_MS = 120_000  # for one prediction, queue included


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium not found: .ci/run installs Debian's chromium package before the tests")
        pytest.skip("chromium not found: apt-get install -y chromium (Debian's package) to run the page tests")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(chromium, tmp_path_factory):
    """The learning test's recipe, cut to 150 steps (some formulas exact), served by app.py on a free port with the
    eight formulas as examples; an image the model reads right (example number `example`) and infer.py's
    prediction for it."""
    folder = tmp_path_factory.mktemp("app")
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=40", cwd=folder)
    rows = [(image, text) for _, image, text in read_csv(folder / "latex_ocr_train.csv") if len(text) <= 60]
    write_conversations(folder / "eight.json", rows[:8])
    run_script("train.py", "--model_id=tiny-random", "--train_json_path=eight.json", "--val_json_path=eight.json",
               "--batch_size=8", "--max_steps=150", "--learning_rate=3e-3", "--lr_scheduler_type=constant",
               "--logging_steps=50", "--save_steps=1000", "--swanlab_mode=disabled", "--num_workers=0", cwd=folder)
    evaluated = [json.loads(line) for line in (folder / RUN_DIR / "eval" / "predictions.jsonl").open()]
    exact = [i for i, row in enumerate(evaluated) if row["prediction"] == row["reference"]]
    assert exact, f"no formula read exactly after 150 steps: {[row['prediction'] for row in evaluated]}"
    image = evaluated[exact[0]]["image"]

    port = free_port()
    log = folder / "app.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(folder / "uploads"))
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), f"--output_dir={RUN_DIR}", f"--port={port}",
                                   f"--examples={len(evaluated)}"], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    try:
        run_script("infer.py", f"--image={image}", cwd=folder)  # while the server loads
        expected = json.loads((folder / RUN_DIR / "infer" / "predictions.jsonl").read_text())["prediction"]
        deadline = time.monotonic() + STARTUP_S
        while "page: http" not in log.read_text():
            assert server.poll() is None, f"app.py exited {server.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"app.py did not serve within {STARTUP_S} s:\n{log.read_text()}"
            time.sleep(0.5)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", image=image, example=exact[0], expected=expected,
                              server=server, log=log)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def browser(chromium, tmp_path):
    """A fresh Chromium profile per test."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 760})
        yield context
        context.close()


def open_page(browser, served):
    page = browser.new_page()
    page.goto(served.url)
    page.wait_for_selector("#read")
    return page


def read(page, path):
    """Upload the file, wait until the page shows it, press Read formula."""
    page.locator("#formula-image input[type=file]").set_input_files(path)
    page.wait_for_selector(f'#formula-image img[src$="/{os.path.basename(path)}"]')
    page.click("#read")


def answer(page) -> str:
    page.wait_for_function("document.querySelector('#latex textarea').value.length > 0", timeout=ANSWER_MS)
    return page.input_value("#latex textarea")


@pytest.mark.slow
def test_the_page_reads_an_uploaded_formula_as_infer_does(served, browser, tmp_path):
    page = browser.new_page()
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(served.url)
    page.wait_for_selector("#read")

    read(page, served.image)

    assert answer(page) == served.expected
    render.render(served.expected)  # the answer renders, so the page must show a picture of it
    page.wait_for_function("(() => { const img = document.querySelector('#rendered img');"
                           " return img !== null && img.complete && img.naturalWidth > 0; })()")
    assert "Read in " in page.inner_text("#status")
    page.screenshot(path=tmp_path / "app.png", full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000
    # Offline means offline: no font, script or analytics call leaves the server the page came from.
    outside = {urlsplit(url).netloc for url in requested if url.startswith("http")} - {urlsplit(served.url).netloc}
    assert not outside, outside


@pytest.mark.slow
def test_bad_input_gets_a_message_and_the_page_keeps_working(served, browser, tmp_path):
    page = open_page(browser, served)
    page.click("#read")
    page.get_by_text("No image yet: upload, drag or paste").wait_for()
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    read(page, tmp_path / "notes.png")
    page.get_by_text("notes.png is not an image (UnidentifiedImageError)").wait_for()

    read(page, served.image)

    assert answer(page) == served.expected
    assert served.server.poll() is None
    assert "Traceback" not in served.log.read_text()


@pytest.mark.slow
def test_two_visitors_at_once_are_queued_and_both_answered(served, browser):
    pages = [open_page(browser, served) for _ in range(2)]
    for page in pages:
        read(page, served.image)
    assert [answer(page) for page in pages] == [served.expected] * 2


@pytest.mark.slow
def test_an_example_from_the_val_set_reads_as_its_file_does(served, browser):
    page = open_page(browser, served)
    page.locator("button.gallery-item").nth(served.example).click()
    page.wait_for_selector('#formula-image img')
    page.click("#read")
    assert answer(page) == served.expected
