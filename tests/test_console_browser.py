"""The console in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against a real server: live task rows, cancel from the page, a run's DAG, the token
prompt. ``DSPY_INFRA_TEST_CONSOLE_SHOTS=DIR`` also saves screenshots of the main views there (the
ones in docs/images/ were made so); ``-s`` prints the measured figures."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _console_support import ThreadedServer, threaded_server
from engines import skip_or_fail

from dspy_infra.models import TaskSpec

TOKEN = "browser-token"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SERIAL = {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}
SLEEPER = {"command": ["sh", "-c", "echo sleeper up; exec sleep 300"], "health": {"kind": "engine"}}
WAIT = 30.0


def _driver() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[dev]')")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            skip_or_fail(f"{binary} is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1360,900",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    with threaded_server(
        tmp_path / "state", token=TOKEN, task_classes={"serial": SERIAL}, services={"sleeper": SLEEPER}
    ) as srv:
        yield srv


def _until(driver: Any, condition: Any, timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _signed_in(driver: Any, srv: ThreadedServer, route: str = "#/") -> None:
    """Open the page with the token already in this tab's sessionStorage."""
    driver.get(srv.base + "/console/style.css")  # same origin, and not the page: no prompt
    driver.execute_script("sessionStorage.setItem('dspy-infra-token', arguments[0])", TOKEN)
    driver.get(f"{srv.base}/{route}")
    _until(driver, lambda d: d.find_element("id", "view").get_attribute("data-view"))


def _shot(driver: Any, name: str) -> None:
    target = os.environ.get("DSPY_INFRA_TEST_CONSOLE_SHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(target) / f"{name}.png"))


def _row_attr(driver: Any, task_id: str, attr: str) -> str:
    value = driver.execute_script(
        "const r = document.querySelector(`#tasks tr[data-id='${arguments[0]}']`);"
        " return r ? r.dataset[arguments[1]] || '' : '';",
        task_id,
        attr,
    )
    return str(value or "")


# -- the token prompt -------------------------------------------------------------------------------


def test_token_prompt_signs_in_without_putting_the_token_in_urls(
    browser: Any, server: ThreadedServer
) -> None:
    browser.get(server.base + "/#/tasks")
    login = _until(
        browser, lambda d: d.find_element("id", "login").is_displayed() and d.find_element("id", "login")
    )
    _shot(browser, "console-login")
    browser.find_element("id", "token").send_keys("wrong")
    browser.find_element("css selector", "#login-form button").click()
    _until(browser, lambda d: "refused" in d.find_element("id", "login-error").text)
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("css selector", "#login-form button").click()
    _until(browser, lambda d: d.find_element("id", "view").get_attribute("data-view") == "tasks")
    assert not login.is_displayed()
    _until(browser, lambda d: d.find_element("id", "live").text == "live")
    assert TOKEN not in browser.current_url
    # Every request the page made carried the token in a header, none in its URL.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not any(TOKEN in url for url in urls)
    browser.refresh()  # the tab keeps it (sessionStorage); a new tab would ask again
    _until(browser, lambda d: d.find_element("id", "view").get_attribute("data-view") == "tasks")
    assert not browser.find_element("id", "login").is_displayed()
    browser.find_element("id", "logout").click()
    assert browser.find_element("id", "login").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('dspy-infra-token')") is None


# -- tasks live ---------------------------------------------------------------------------------------


def test_a_submitted_task_goes_queued_running_completed_without_reload(
    browser: Any, server: ThreadedServer
) -> None:
    _signed_in(browser, server, "#/tasks")
    _until(browser, lambda d: d.find_element("id", "live").text == "live")
    browser.execute_script("window.__sameDocument = true")
    # The serial class runs one task at a time: "watched" waits behind "blocker".
    server.call(server.infra.submit_task("blocker", "serial", {"handler": "sleep", "seconds": 1.0}))
    server.call(server.infra.submit_task("watched", "serial", {"handler": "sleep", "seconds": 1.0}))
    _until(browser, lambda d: _row_attr(d, "watched", "history").endswith("completed"))
    history = _row_attr(browser, "watched", "history").split(",")
    assert [s for i, s in enumerate(history) if i == 0 or history[i - 1] != s] == [
        "pending",
        "running",
        "completed",
    ]
    assert browser.execute_script("return window.__sameDocument") is True  # no reload happened
    result = server.call(server.infra.wait("watched"))
    latency_ms = int(_row_attr(browser, "watched", "updatedAt")) - result.completed_at * 1000
    print(f"\ncompletion -> row updated: {latency_ms:.1f} ms")
    _record("completion_to_row_ms", round(latency_ms, 1))
    assert latency_ms >= 0
    _shot(browser, "console-tasks")
    browser.find_element("css selector", "#tasks tr[data-id='watched'] a").click()
    detail = _until(browser, lambda d: d.find_element("id", "task-detail"))
    assert detail.get_attribute("data-status") == "completed"
    assert '"slept": 1' in browser.find_element("id", "view").text
    assert browser.current_url.endswith("#/tasks/watched")  # a shareable link
    _shot(browser, "console-task")


def test_cancel_a_task_from_the_page(browser: Any, server: ThreadedServer) -> None:
    server.call(server.infra.submit_task("long", "serial", {"handler": "sleep", "seconds": 60}))
    _signed_in(browser, server, "#/tasks")
    button = _until(browser, lambda d: d.find_element("css selector", "#tasks button[data-cancel='long']"))
    button.click()
    _until(browser, lambda d: _row_attr(d, "long", "history").endswith("cancelled"))
    assert str(server.call(server.infra.get_task("long")).status) == "cancelled"


# -- runs, services, overview -------------------------------------------------------------------------


def test_a_workflow_run_is_drawn_with_each_step_state(browser: Any, server: ThreadedServer) -> None:
    spec = {
        "steps": [
            {"name": "fetch", "payload": {"handler": "noop"}},
            {"name": "tokenize", "payload": {"handler": "noop"}, "depends_on": ["fetch"]},
            {"name": "embed", "payload": {"handler": "sleep", "seconds": 0.2}, "depends_on": ["fetch"]},
            {"name": "index", "payload": {"handler": "noop"}, "depends_on": ["tokenize", "embed"]},
            {"name": "broken", "payload": {"handler": "fail", "message": "no GPU"}, "depends_on": ["fetch"]},
        ],
        "continue_on_failure": True,
    }

    async def run_it() -> str:
        await server.infra.create_workflow("ingest", name="Ingest", spec=spec)
        run_id = await server.infra.start_run("ingest")
        async for update in server.infra.run_status(run_id):
            if update.status.terminal:
                break
        return run_id

    run_id = server.call(run_it())
    _signed_in(browser, server, "#/runs")
    _until(browser, lambda d: d.find_element("css selector", f"#runs tr[data-run='{run_id}'] a")).click()
    _until(browser, lambda d: d.find_element("id", "dag"))
    states = {
        g.get_attribute("data-step"): g.get_attribute("data-status")
        for g in browser.find_elements("css selector", "#dag g.step")
    }
    assert states == {
        "fetch": "completed",
        "tokenize": "completed",
        "embed": "completed",
        "index": "completed",
        "broken": "failed",
    }
    # Drawn in layers by depth: index (depth 2) right of embed (1) right of fetch (0).
    xs = {
        g.get_attribute("data-step"): float(g.get_attribute("transform").split("(")[1].split(",")[0])
        for g in browser.find_elements("css selector", "#dag g.step")
    }
    assert xs["fetch"] < xs["embed"] == xs["tokenize"] == xs["broken"] < xs["index"]
    assert len(browser.find_elements("css selector", "#dag path.edge")) == 5
    _shot(browser, "console-run")


def test_overview_and_service_detail(browser: Any, server: ThreadedServer) -> None:
    server.call(server.infra.ensure_services(["sleeper"]))
    server.call(server.infra.submit_task("oops", payload={"handler": "fail", "message": "disk full"}))
    server.call(server.infra.wait("oops"))
    _signed_in(browser, server, "#/")
    _until(browser, lambda d: d.find_element("css selector", "#failures a"))
    assert "oops" in browser.find_element("id", "failures").text
    row = browser.find_element("css selector", "#services tr[data-service='sleeper']")
    assert "healthy" in row.text
    _shot(browser, "console-overview")
    row.find_element("css selector", "a").click()
    _until(browser, lambda d: "sleeper up" in d.find_element("id", "service-detail").text)
    assert browser.current_url.endswith("#/services/sleeper")
    _shot(browser, "console-service")
    browser.get(f"{server.base}/#/events")
    _until(browser, lambda d: d.find_element("id", "event-feed"))
    server.call(server.infra.submit_task("ping", payload={"handler": "noop"}))
    _until(browser, lambda d: "task_completed" in d.find_element("id", "event-feed").text)
    _shot(browser, "console-events")


# -- first paint with 10,000 tasks --------------------------------------------------------------------


def test_first_paint_with_ten_thousand_tasks(browser: Any, server: ThreadedServer) -> None:
    async def fill() -> None:
        specs = [TaskSpec(id=f"bulk-{i:05d}", payload={"handler": "noop"}) for i in range(10_000)]
        await server.infra.scheduler.submit_many(specs)
        await asyncio.gather(*(server.infra.wait(s.id, timeout=120) for s in specs[-100:]))

    server.call(fill(), timeout=180)
    figures = {}
    for route, view in (("#/tasks", "tasks"), ("#/", "overview")):
        _signed_in(browser, server, route)
        timing = browser.execute_script(
            "const p = performance.getEntriesByName('first-contentful-paint')[0];"
            " const r = performance.getEntriesByName(arguments[0])[0];"
            " return {fcp: p ? p.startTime : null, rendered: r ? r.startTime : null};",
            f"rendered-{view}",
        )
        figures[view] = timing
    print(f"\nfirst paint with 10,000 tasks: {json.dumps(figures)}")
    _record("first_paint_10k", figures)
    _signed_in(browser, server, "#/tasks")
    assert len(browser.find_elements("css selector", "#tasks tbody tr")) == 50  # one page, not 10,000 rows
    assert figures["tasks"]["rendered"] is not None


def _record(key: str, value: Any) -> None:
    target = os.environ.get("DSPY_INFRA_TEST_CONSOLE_SHOTS")
    if target:
        path = Path(target) / "figures.json"
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc[key] = value
        doc["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        path.write_text(json.dumps(doc, indent=2) + "\n")
