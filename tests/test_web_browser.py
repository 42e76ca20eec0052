"""The inspector in a real headless Chromium (Debian's `chromium` and `chromium-driver`),
driven by Selenium with both binaries named (Selenium Manager never runs, nothing is
downloaded): the list and its search, a session whose texts are hostile markup (shown as
text, never run), a live session that advances and waits, approved from the page, and a
fork tree. One browser for the module; screenshots go to $LOOPSTREAM_TEST_ARTIFACTS (default
/tmp/loopstream-artifacts)/inspector."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.web_helpers import ASK_ADD, post, serving, sse, wait_for  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("LOOPSTREAM_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "loopstream-artifacts") \
    / "inspector"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> & </td>'

pytestmark = pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    os.environ["SE_MANAGER_PATH"] = "/nonexistent/selenium-manager"  # were it asked for anything, it would fail
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    finally:
        del os.environ["SE_MANAGER_PATH"]
    driver.set_page_load_timeout(20)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("inspector")
    (work / "reply.txt").write_text(HOSTILE)
    with serving(work / "log.db", model="slow:0.3", policy=ASK_ADD, tools=("add", "read_file"),
                 workdir=work, models=(f"reads:{work / 'reply.txt'}",)) as running:
        running.reply = work / "reply.txt"
        yield running


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url) as client:
        yield client


@pytest.fixture(scope="module")
def hostile_session(api, server):
    """A finished session whose goal, tool result and answer are all hostile markup."""
    sid = post(api, "/api/sessions", {"goal": HOSTILE, "model": f"reads:{server.reply}"}).json()["session_id"]
    assert sse(api, f"/api/sessions/{sid}/events")[-1] == ("end", {"status": "done"})
    return sid


def wait(driver, condition, timeout: float = 15.0, what: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / f"timeout-{what or 'wait'}.png"))
        raise


def shot(driver, name: str) -> None:
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 0


def status_of(driver) -> str:
    return driver.execute_script(
        "const b = document.querySelector('#session-status [data-status]'); return b ? b.dataset.status : '';")


def test_list_search_and_a_hostile_session_shown_as_text(browser, server, hostile_session):
    browser.get(f"{server.url}/#/s/{hostile_session}")
    wait(browser, lambda d: status_of(d) == "done", what="hostile")
    assert browser.find_element(By.ID, "session-goal").text == HOSTILE
    assert HOSTILE in browser.find_element(By.ID, "answer").text
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.event")
    assert [r.get_attribute("data-type") for r in rows][-1] == "SessionFinished"
    rows[-1].click()  # its payload, as JSON text
    assert HOSTILE.replace('"', '\\"') in browser.find_elements(By.CSS_SELECTOR, "tr.payload pre")[-1].text
    assert browser.execute_script("return window.__pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, #view script, aside script")
    wait(browser, lambda d: HOSTILE in d.find_element(By.CSS_SELECTOR, f'li[data-session="{hostile_session}"]').text,
         what="listed")
    search = browser.find_element(By.ID, "search")
    search.send_keys("no session has this")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#sessions li"), what="search-none")
    search.clear()
    search.send_keys("onerror")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sessions li")) == 1, what="search-one")
    shot(browser, "1-hostile-session")
    browser.find_element(By.ID, "feedback-comment").send_keys(HOSTILE)
    browser.find_element(By.CSS_SELECTOR, "#feedback button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr.event[data-type="FeedbackGiven"]'), what="feedback")
    assert browser.execute_script("return window.__pwned") is None


def test_a_live_session_advances_and_is_approved_from_the_page(browser, server, api):
    sid = post(api, "/api/sessions", {"goal": "add one, slowly"}).json()["session_id"]
    browser.get(f"{server.url}/#/s/{sid}")
    browser.execute_script("window.__same_page = true")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.event"), what="first-rows")
    first = len(browser.find_elements(By.CSS_SELECTOR, "tr.event"))
    button = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#waiting button.approve"), what="approve")[0]
    assert status_of(browser) == "awaiting approval"
    assert "null" not in browser.find_element(By.ID, "view").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.event")) > first or first >= 5
    assert "add(" in browser.find_element(By.ID, "waiting").text
    shot(browser, "2-waiting-for-approval")
    waiting = len(browser.find_elements(By.CSS_SELECTOR, "tr.event"))
    button.click()
    wait(browser, lambda d: status_of(d) == "done", what="approved")
    types = [r.get_attribute("data-type") for r in browser.find_elements(By.CSS_SELECTOR, "tr.event")]
    assert len(types) > waiting and types[-1] == "SessionFinished"
    assert types[types.index("ApprovalDecided") + 1] == "ToolCompleted"
    assert "The result is 1." in browser.find_element(By.ID, "answer").text
    assert browser.execute_script("return window.__same_page") is True  # live: never reloaded
    assert [e["type"] for e in api.get(f"/api/sessions/{sid}").json()["events"]] == types
    shot(browser, "3-approved-and-done")


def test_a_fork_tree_and_the_diff_with_its_parent(browser, server, api, hostile_session):
    child = post(api, f"/api/sessions/{hostile_session}/fork", {"at_seq": 1, "run": False,
                                                                 "message": "and now?"}).json()["session_id"]
    browser.get(f"{server.url}/#/s/{child}")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#tree li.current"), what="tree")
    root = browser.find_element(By.CSS_SELECTOR, "#tree > ul > li")
    assert root.get_attribute("data-session") == hostile_session
    current = browser.find_element(By.CSS_SELECTOR, "#tree li.current")
    assert current.get_attribute("data-session") == child and "fork at seq 1" in current.text
    assert status_of(browser) == "interrupted"
    shot(browser, "4-fork-tree")
    browser.find_element(By.LINK_TEXT, "diff with parent").click()
    wait(browser, lambda d: "fork of a at seq 1" in d.find_element(By.ID, "diff-text").text, what="diff")
    shot(browser, "5-diff")
    browser.get(f"{server.url}/#/s/{child}")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#tree li.current"), what="tree-again")
    browser.find_element(By.CSS_SELECTOR, f'#tree a[href="#/s/{hostile_session}"]').click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'#tree li.current[data-session="{hostile_session}"]'),
         what="tree-root")


def test_the_page_sends_the_token_it_was_opened_with(browser, tmp_path):
    token = "browser-token-0123456789abcdef"
    with serving(tmp_path / "log.db", token=token) as server, \
            httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {token}"}) as api:
        sid = post(api, "/api/sessions", {"goal": "count with a token"}).json()["session_id"]
        wait_for(lambda: api.get(f"/api/sessions/{sid}").json()["status"] == "done")
        browser.get(f"{server.url}/?token={token}#/s/{sid}")
        wait(browser, lambda d: status_of(d) == "done", what="token")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'#sessions li[data-session="{sid}"]'), what="token-list")
        assert token not in browser.current_url  # kept in the tab, not in the address bar or its history
        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        wait(browser, lambda d: "token is required" in d.find_element(By.ID, "view").text, what="no-token")
