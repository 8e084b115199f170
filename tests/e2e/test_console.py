"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real gateway process.

Workers use the stub engine: the console is about the admin API and log transport, not text
generation. The page is first used without the admin key (its actions must be refused), then
with it: a worker launched from the page appears in the table, a kill -9 shows as a state
change without a reload, and the log view shows lines the worker printed after the page loaded.
Screenshots go to the test's temp dir; with ICHAT_CONSOLE_SCREENSHOTS=DIR the crash one also to DIR
(that is how docs/console-crashed.png is made).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from tests.gateway_proc import GatewayProc
from tests.procs import free_port, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ADMIN_KEY = "console-admin-key"
UI_TIMEOUT_S = 30

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} missing: `make system` (scripts/setup_system.sh) installs chromium and chromium-driver"
    return None


pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


@pytest.fixture(scope="module")
def gateway(e2e_tmp):
    tmp = e2e_tmp / "console"
    tmp.mkdir()
    proc = GatewayProc(
        tmp,
        {
            "auth": {"admin_key": ADMIN_KEY},
            "registry": {"probe_interval_s": 0.5},
            # a restart waits long enough for a 1 s poll to see the crash
            "supervisor": {"backoff_initial_s": 3, "stop_timeout_s": 10},
        },
        name="console-gateway",
    )
    proc.wait_up()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser(e2e_tmp):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(e2e_tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(UI_TIMEOUT_S)
    yield driver
    driver.quit()


def admin(gateway: GatewayProc, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, gateway.base_url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30, **kwargs)


def until(driver, predicate, what: str, timeout: float = UI_TIMEOUT_S):
    # the page re-renders every second: an element found a moment ago may be gone, so try again
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: predicate(d), message=f"waiting for {what}")


def message(driver) -> str:
    el = driver.find_element(By.ID, "message")
    return el.text if el.is_displayed() else ""


def screenshot(driver, tmp: Path, name: str, *, for_docs: bool = False) -> None:
    path = tmp / f"console-{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank
    target = os.environ.get("ICHAT_CONSOLE_SCREENSHOTS")
    if target and for_docs:  # for docs/: a 64-colour palette keeps the PNG small (the page has few colours)
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=64).save(Path(target) / path.name, optimize=True)


def worker_row_state(driver, worker_id: str) -> str | None:
    # one script, so that a row the page replaces meanwhile cannot go stale between find and read
    return driver.execute_script(
        "const row = document.querySelector(`#workers tbody tr[data-worker-id=\"${arguments[0]}\"]`);"
        "return row ? row.dataset.state : null;",
        worker_id,
    )


def test_actions_without_the_admin_key_are_refused(gateway, browser):
    # a worker exists, so that a refused stop has something to refuse
    port = free_port()
    resp = admin(gateway, "POST", "/v1/admin/workers/launch", json={"model_name": "guarded", "model_path": "m", "port": port, "backend": "stub"})
    assert resp.status_code == 201, resp.text
    guarded = resp.json()["worker_id"]

    browser.get(gateway.base_url + "/ui")
    until(browser, lambda d: "Refused (401)" in message(d), "the page to say the key is missing")
    assert browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr") == []  # nothing shown without the key

    browser.find_element(By.ID, "reload").click()
    until(browser, lambda d: d.switch_to.alert, "the confirmation").accept()
    until(browser, lambda d: "Refused (401)" in message(d) and "admin key" in message(d), "the refused reload")

    # the page's own script, calling DELETE without the key, is refused too: the worker stays
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/v1/admin/workers/{guarded}', {{method: 'DELETE'}}).then(r => done(r.status));"
    )
    assert status == 401
    assert guarded in {w["worker_id"] for w in admin(gateway, "GET", "/v1/admin/workers").json()["data"]}
    assert admin(gateway, "DELETE", f"/v1/admin/workers/{guarded}").status_code == 200


def test_launched_worker_appears_and_a_kill_shows_as_a_state_change(gateway, browser, e2e_tmp):
    browser.get(gateway.base_url + "/ui")
    browser.find_element(By.ID, "admin-key").send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "key-save").click()
    until(browser, lambda d: d.find_element(By.ID, "workers-count").text == "(0)", "the empty workers table")

    port = free_port()
    worker_id = f"managed-console-demo-{port}"
    form = browser.find_element(By.ID, "launch-form")
    for name, value in (("model_name", "console-demo"), ("model_path", "stub-model"), ("port", str(port)),
                        ("backend", "stub"), ("flags", "--stub-log-interval 0.2")):  # fmt: skip
        form.find_element(By.NAME, name).send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    alert = until(browser, lambda d: d.switch_to.alert, "the launch confirmation")
    assert f"Launch console-demo (stub-model) on port {port}?" == alert.text
    alert.accept()
    until(browser, lambda d: f"Launched {worker_id}" in message(d), "the launch message")
    until(browser, lambda d: worker_row_state(d, worker_id) == "ready", "the launched worker to be ready in the table", 60)
    row = browser.find_element(By.CSS_SELECTOR, f'#workers tbody tr[data-worker-id="{worker_id}"]')
    assert row.find_element(By.CSS_SELECTOR, "td.model").text == "console-demo"
    assert row.find_element(By.CSS_SELECTOR, "td.restarts").text == "0"
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#models tbody tr[data-model="console-demo"] td.routable')
          and d.find_element(By.CSS_SELECTOR, '#models tbody tr[data-model="console-demo"] td.routable').text == "1", "replicas")

    # the log view follows the worker: a line printed after the page loaded shows up
    row.find_element(By.CSS_SELECTOR, "button[data-action=logs]").click()
    until(browser, lambda d: "stub engine line" in d.find_element(By.ID, "log-lines").text, "the log backlog")
    printed = int(re.findall(r"stub engine line (\d+)", admin_tail(gateway, worker_id))[-1])
    until(browser, lambda d: f"stub engine line {printed + 5}\n" in d.find_element(By.ID, "log-lines").text + "\n",
          f"line {printed + 5}, printed after the page loaded")
    for _ in range(3):  # a few requests, so the models panel has a rate and a latency to show
        httpx.post(gateway.base_url + "/v1/chat/completions", json={"model": "console-demo", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    until(browser, lambda d: d.find_element(By.CSS_SELECTOR, '#models tr[data-model="console-demo"] td.avg').text != "-", "a latency")
    rate = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, '#models tr[data-model="console-demo"] td.rps').text, "the rate")
    assert float(rate) > 0, rate
    screenshot(browser, e2e_tmp, "workers")

    # kill -9: the table changes state without a reload, then shows the restart
    pid = admin(gateway, "GET", f"/v1/admin/workers/{worker_id}").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    seen: set[str] = set()

    def changed(d) -> bool:
        state = worker_row_state(d, worker_id)
        if state:
            seen.add(state)
        return bool(seen & {"crashed", "backing_off", "starting"})

    until(browser, changed, "the crash to show in the table")
    screenshot(browser, e2e_tmp, "crashed", for_docs=True)
    until(browser, lambda d: worker_row_state(d, worker_id) == "ready" and d.find_element(
        By.CSS_SELECTOR, f'#workers tbody tr[data-worker-id="{worker_id}"] td.restarts').text == "1", "the restart", 60)

    # the gateway's own capture of the managed worker's output (kept across its restart)
    Select(browser.find_element(By.ID, "logs-source")).select_by_value("console")
    until(browser, lambda d: d.find_element(By.ID, "log-lines").get_attribute("data-source") == "console"
          and "stub engine line" in d.find_element(By.ID, "log-lines").text, "the console log")

    # stop from the page, behind its confirmation
    browser.find_element(By.CSS_SELECTOR, f'#workers tbody tr[data-worker-id="{worker_id}"] button[data-action=stop]').click()
    alert = until(browser, lambda d: d.switch_to.alert, "the stop confirmation")
    assert alert.text == f"Stop worker {worker_id}?"
    alert.accept()
    until(browser, lambda d: worker_row_state(d, worker_id) is None, "the stopped worker to leave the table")
    assert worker_id not in {w["worker_id"] for w in admin(gateway, "GET", "/v1/admin/workers").json()["data"]}


def admin_tail(gateway: GatewayProc, worker_id: str) -> str:
    resp = admin(gateway, "GET", f"/v1/logs/stream/{worker_id}", params={"tail": 20, "follow": "false"})
    assert resp.status_code == 200, resp.text
    return resp.text
