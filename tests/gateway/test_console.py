"""The console in a real browser: Debian's chromium and chromedriver driven by selenium, against a real
gateway on the fake upstream. Skipped only when chromium or chromedriver is not installed (CI installs
them: .ci/run). Each tab's screenshot goes to $CONCILIUM_CONSOLE_SHOTS (default /tmp/console-shots)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from concilium.testing.fake_upstream import _split
from tests.gateway.test_admin import ADMIN, KEYS, USER, call, chat, policy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed "
                                "(apt-get install chromium chromium-driver)")
SHOTS = Path(os.environ.get("CONCILIUM_CONSOLE_SHOTS", "/tmp/console-shots"))
PROMPT = "Explain why the sky looks blue on a clear day"


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    from tests.support import start_gateway

    g = start_gateway(policy(fake_upstream.url, KEYS, learned=True), tmp_path_factory.mktemp("console") / "p.yaml",
                      timeout=120)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(driver, check, timeout: float = 20.0):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The live tabs re-render every 2 s: an element read mid-refresh is stale; look again.
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(lambda d: check())


def _fresh(read):
    """`read()`, again if the live tabs re-rendered the element between finding and reading it."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(50):
        try:
            return read()
        except StaleElementReferenceException:
            continue
    return read()


def text(driver, element_id: str) -> str:
    return _fresh(lambda: driver.find_element("id", element_id).text)


def rows(driver, selector: str) -> list[str]:
    """The text of each element matching `selector`, read together."""
    return _fresh(lambda: [r.text for r in driver.find_elements("css selector", selector)])


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def tab(driver, name: str) -> None:
    driver.find_element("css selector", f"#tabs button[data-tab='{name}']").click()


def sign_in(driver, key: str) -> None:
    box = driver.find_element("id", "login-key")
    box.clear()
    box.send_keys(key)
    driver.find_element("css selector", "#login button").click()


def test_the_console_needs_an_admin_key(gw, browser):
    browser.delete_all_cookies()
    browser.get(gw.base_url + "/console")
    assert browser.find_elements("id", "login-key") and not browser.find_elements("id", "tabs")
    sign_in(browser, USER)
    wait(browser, lambda: "admin: true" in text(browser, "login-error"))  # a valid key, but not an admin's
    sign_in(browser, "ck-wrong")
    wait(browser, lambda: "invalid API key" in text(browser, "login-error"))
    sign_in(browser, ADMIN)
    wait(browser, lambda: browser.find_elements("id", "tabs"))
    assert browser.execute_script("return document.cookie").startswith("concilium_admin=")


def test_playground_plans_and_streams(gw, browser):
    browser.get(gw.base_url + "/console")
    wait(browser, lambda: "concilium/auto" in text(browser, "pg-model"))
    browser.find_element("id", "pg-metadata").send_keys('{"user": "console-test"}')
    browser.find_element("id", "pg-prompt").send_keys(PROMPT)
    browser.find_element("id", "pg-send").click()
    wait(browser, lambda: browser.find_elements("css selector", "#plan-candidates .candidate"))
    cands = rows(browser, "#plan-candidates .candidate")
    assert cands[0].startswith("strong") and any(r.startswith("cheap") for r in cands)  # the fallback
    assert browser.find_elements("css selector", "#plan-prediction .category")  # the learned router's guess
    assert "main" in text(browser, "plan-summary")
    wait(browser, lambda: text(browser, "pg-status") == "done" or text(browser, "pg-error"))
    assert not text(browser, "pg-error")
    assert text(browser, "answer") == "".join(_split(PROMPT.split(), 13))  # the fake upstream's echo, streamed
    meta = text(browser, "answer-meta")
    assert "strong" in meta and "cost\n$" in meta and "1" in meta
    shot(browser, "playground")


def test_playground_cascade_plan(gw, browser):
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "pg-model")).select_by_visible_text("concilium/cascade")
    browser.find_element("id", "pg-plan").click()
    wait(browser, lambda: "cascade" in text(browser, "plan-summary"))
    steps = rows(browser, "#plan-strategy .step")
    assert steps and steps[0].startswith("cheap: score")
    Select(browser.find_element("id", "pg-model")).select_by_visible_text("concilium/auto")


def test_traffic_refreshes_live(gw, browser):
    tab(browser, "traffic")
    wait(browser, lambda: "strong" in text(browser, "traffic-models"))
    before = text(browser, "traffic-requests").count("/v1/chat/completions")
    assert chat(gw, USER)[0] == 200
    wait(browser, lambda: text(browser, "traffic-requests").count("/v1/chat/completions") > before, 10)
    assert "alice" in text(browser, "traffic-requests") and PROMPT not in text(browser, "traffic")  # no prompt text
    assert "closed" in text(browser, "traffic-circuits")
    shot(browser, "traffic")


def test_spend_updates_after_a_request(gw, browser):
    def alice_row() -> str:
        return next((r for r in rows(browser, "#spend-keys tr") if r.startswith("alice")), "")

    tab(browser, "spend")
    wait(browser, lambda: "alice" in text(browser, "spend-keys"))
    before = alice_row()
    assert "of $1.00" in before and "of $10.00" in before  # today and this month, against the budgets
    assert chat(gw, USER, text="spend a little more on this request")[0] == 200
    wait(browser, lambda: alice_row() != before, 30)
    assert "research" in text(browser, "spend-teams") and "strong" in text(browser, "spend-models")
    shot(browser, "spend")


def test_policy_tab(gw, browser):
    tab(browser, "policy")
    wait(browser, lambda: "version in force" in text(browser, "policy-summary"))
    assert "cheap, strong" in text(browser, "policy-summary")
    wait(browser, lambda: "concilium-router" in text(browser, "policy-router"))  # the shipped artifact
    curves = browser.find_elements("css selector", "#policy-curves img")
    if curves:  # benchmarks/results is in a checkout
        wait(browser, lambda: all(browser.execute_script("return arguments[0].naturalWidth", c) > 0 for c in curves))
    shot(browser, "policy")


def test_jobs_tab(gw, browser):
    status, job, _ = call(gw, "POST", "/v1/responses", ADMIN, {"model": "concilium/auto", "input": "a job",
                                                                "background": True})
    assert status == 200, job
    tab(browser, "jobs")
    wait(browser, lambda: job["id"] in text(browser, "jobs-ended"), 30)
    browser.find_element("id", "job-id").send_keys(job["id"])
    browser.find_element("id", "job-lookup").click()
    wait(browser, lambda: "completed" in text(browser, "job-detail"))
    assert "response.completed" in text(browser, "job-events")
    shot(browser, "jobs")
