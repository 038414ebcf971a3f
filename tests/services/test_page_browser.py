"""The web page in a real headless Chromium: it loads, lists the caller's concepts, and composes.

One local Ray (2 CPUs on 127.0.0.1) and Serve with the tiny model, a storage root (so the batch
routes answer) and two published concepts. Debian's chromium and chromedriver drive the page through
selenium (the system driver; nothing is downloaded). ``PURECC_PAGE_SCREENSHOT=FILE`` saves a
screenshot of the page after the composition (docs/page.png is made that way).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from service_helpers import bearer, free_port, make_token, roomy_auth

pytestmark = [pytest.mark.ray, pytest.mark.service]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the page test needs Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By                          # noqa: E402
from selenium.webdriver.support import expected_conditions as EC     # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait              # noqa: E402

CONCEPTS = {"demo-star": "zqs", "demo-ring": "zqr"}
WAIT_S = 120
TRAIN = {"resolution": 64, "stage1": {"steps": 4, "checkpoint_every": 2, "grad_accum": 1, "lr": 2e-3},
         "stage2": {"steps": 3, "checkpoint_every": 2, "lr": 1e-3}}
TRAIN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def page_service(tiny_model_dir, adapter_factory, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from purecc.registry import AdapterRegistry
    from services.app import build_app
    from services.config import ServiceConfig

    storage = tmp_path_factory.mktemp("page") / "storage"
    registry = AdapterRegistry(str(storage))
    for seed, (cid, trigger) in enumerate(CONCEPTS.items()):
        adapter_factory.publish(registry, cid, seed=40 + seed, trigger=trigger)
    tokens_file = storage / "auth" / "tokens.json"
    tokens = {owner: make_token(tokens_file, owner) for owner in ("alice", "bob")}
    temp_dir = Path(f"/tmp/pcpage-{os.getpid()}")
    start_local_ray(2, temp_dir=temp_dir)
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServiceConfig(model=str(tiny_model_dir), storage=str(storage), cpus_per_replica=0.5,
                                          warmup=False, slots=2, auth=roomy_auth(tokens_file))),
                  name="page", route_prefix="/")
        yield f"http://127.0.0.1:{port}", tokens
    finally:
        serve.shutdown()
        import ray
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000", "--no-first-run", "--disable-extensions",
                 "--proxy-server=direct://", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _sign_in(browser, url: str, token: str) -> WebDriverWait:
    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear()")      # a fresh tab: no token from an earlier test
    browser.refresh()
    wait = WebDriverWait(browser, WAIT_S)
    box = wait.until(EC.presence_of_element_located((By.ID, "token")))
    box.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait.until(EC.visibility_of_element_located((By.ID, "app")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#concepts tbody tr[data-concept]"))
    return wait


def test_page_assets_are_served_and_bounded(page_service):
    url, _ = page_service
    page = requests.get(url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "page/app.js" in page.text and "Content-Security-Policy" in page.headers
    assert requests.get(url + "/page/app.js", timeout=30).headers["content-type"].startswith("text/javascript")
    for name in ("app.py", "..%2Fapp.py", "index.htm"):
        resp = requests.get(url + "/page/" + name, timeout=30)
        assert resp.status_code == 404 and "/" not in resp.json()["detail"], resp.text
    assert "/page/{asset}" not in requests.get(url + "/openapi.json", timeout=30).json()["paths"]


def test_page_lists_concepts_and_composes(page_service, browser):
    url, tokens = page_service
    wait = _sign_in(browser, url, tokens["alice"])
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#concepts tbody tr[data-concept]")) == 2)
    listed = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#concepts .concept-id")}
    assert listed == set(CONCEPTS)
    assert browser.execute_script("return sessionStorage.getItem('purecc-token')") == tokens["alice"]
    assert "no batches yet" in wait.until(
        lambda d: d.find_element(By.ID, "batches-status").text or None)

    browser.find_element(By.CSS_SELECTOR, "input.use[value='demo-star']").click()
    browser.find_element(By.CSS_SELECTOR, "input.use[value='demo-ring']").click()
    weight = browser.find_element(By.CSS_SELECTOR, "tr[data-concept='demo-ring'] input.weight")
    weight.clear()
    weight.send_keys("0.5")
    for field, value in (("prompt", "a <demo-star> star next to a <demo-ring> ring"), ("seed", "7"),
                         ("steps", "2")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images img.generated")))
    wait.until(lambda d: d.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0;", img))
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    status = browser.find_element(By.ID, "compose-status").text
    assert "a zqs star next to a zqr ring" in status, status


def _compose(browser, wait: WebDriverWait, concepts: dict[str, str], prompt: str) -> str:
    """Tick ``concepts`` (id -> weight) on the page, generate, and answer the first image's PNG bytes."""
    old = browser.find_elements(By.CSS_SELECTOR, "#images img.generated")
    for cid, weight in concepts.items():
        browser.find_element(By.CSS_SELECTOR, f"input.use[value='{cid}']").click()
        box = browser.find_element(By.CSS_SELECTOR, f"tr[data-concept='{cid}'] input.weight")
        box.clear()
        box.send_keys(weight)
    for field, value in (("prompt", prompt), ("seed", "7"), ("steps", "2")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    if old:
        wait.until(EC.staleness_of(old[0]))
    img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images img.generated")))
    wait.until(lambda d: d.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0;", img))
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    png = base64.b64decode(src.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return browser.find_element(By.ID, "compose-status").text


def test_uploaded_images_train_watched_on_the_page_and_compose(page_service, browser, sample_manifests, tmp_path,
                                                              capsys):
    """The issue's new user: `purecc submit --upload` sends 5 images over HTTP and submits a batch naming
    the dataset; the page shows it train (progress, loss) and composes the new concept with a demo one."""
    from purecc.cli import main as purecc_main

    url, tokens = page_service
    folder = tmp_path / "my-star"
    shutil.copytree(sample_manifests["checkered-star"].parent / "imgs", folder)       # 5 images, no manifest
    batch = tmp_path / "batch.yaml"
    batch.write_text(json.dumps({"name": "uploaded", "defaults": {**TRAIN, "validation_prompts": ["a [v] on grass"]},
                                 "validation": {"steps": 2},
                                 "resources": {"cpus_per_worker": 0.5, "max_concurrent": 1, "max_attempts": 1},
                                 "concepts": [{"id": "my-star", "trigger": "zqx"}]}))
    assert purecc_main(["submit", str(batch), "--url", url, "--token", tokens["alice"],
                        "--upload", f"my-star={folder}", "--class-word", "star"]) == 0
    out = capsys.readouterr().out
    assert "uploaded my-star: dataset " in out and "(5 images) -> data datasets/" in out, out
    assert "batch uploaded: 1 new" in out, out

    wait = _sign_in(browser, url, tokens["alice"])
    box = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".batch[data-batch='uploaded']")))
    assert box.find_element(By.CSS_SELECTOR, ".job[data-job='my-star'] canvas.loss")
    WebDriverWait(browser, TRAIN_TIMEOUT_S, poll_frequency=1).until(
        lambda d: "uploaded: done (1 published)" in d.find_element(By.ID, "batches").text)
    job = browser.find_element(By.CSS_SELECTOR, ".batch[data-batch='uploaded'] .job[data-job='my-star']")
    assert "my-star: published" in job.text, job.text
    # the curves the page draws are the service's (every step of both stages), not what polling happened to see
    series = browser.execute_script("return curveSeries('uploaded', 'my-star')")
    assert [(s["stage"], [p[0] for p in s["points"]]) for s in series] == [("1", [1, 2, 3, 4]), ("2", [1, 2, 3])]
    assert all(p[1] > 0 for s in series for p in s["points"]), series
    browser.refresh()                                   # the new concept is listed once published
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input.use[value='my-star']"))
    # with the validation images its stages rendered, fetched with the token and shown
    shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-concept='my-star'] figure.validation img"))
    assert len(shown) == 2
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                             for i in shown))
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "tr[data-concept='my-star'] figcaption")]
    assert captions == ["stage 1: a zqx on grass", "stage 2: a zqx on grass"], captions
    assert browser.find_element(By.CSS_SELECTOR, "tr[data-concept='demo-star'] td.gallery").text == "none"
    status = _compose(browser, wait, {"my-star": "1", "demo-ring": "0.8"}, "a <my-star> star in a <demo-ring> ring")
    assert "a zqx star in a zqr ring" in status, status
    if (shot := os.environ.get("PURECC_PAGE_SCREENSHOT")):
        browser.set_window_size(1200, 1500)            # the batches with their loss curves too
        time.sleep(0.5)
        browser.save_screenshot(shot)


def test_page_shows_errors_and_a_bad_token(page_service, browser):
    url, tokens = page_service
    wait = _sign_in(browser, url, tokens["bob"])
    browser.find_element(By.CSS_SELECTOR, "input.use[value='demo-star']").click()
    weight = browser.find_element(By.CSS_SELECTOR, "tr[data-concept='demo-star'] input.weight")
    browser.execute_script("arguments[0].value = '99'", weight)        # past the API's bound on weights
    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "steps").send_keys("2")
    browser.find_element(By.ID, "generate").click()
    status = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#compose-status.error").text or None)
    assert status.startswith("HTTP 422") and "concepts.0.weight" in status, status
    browser.find_element(By.ID, "logout").click()
    browser.find_element(By.ID, "token").send_keys("pcc_nope_nope")
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    message = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message.error").text or None)
    assert message.startswith("HTTP 401"), message
    assert browser.execute_script("return sessionStorage.getItem('purecc-token')") is None
    assert not browser.find_element(By.ID, "app").is_displayed()
