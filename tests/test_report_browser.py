"""The report in a real browser: headless Chromium driven over the DevTools protocol (websocket-client).

Raw CDP rather than Playwright: nothing to download, and no coupling to a browser build — Debian's chromium
is whatever version it is. The page must load with no console error, no exception, no request that leaves
the file, and every image decoded; a full-page screenshot lands in tests/artifacts/report.png.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

ARTIFACTS = Path(__file__).parent / "artifacts"
START_TIMEOUT = 60.0
LOAD_TIMEOUT = 60.0


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """One websocket to the browser; commands to a page go through its flattened session id."""

    def __init__(self, url: str) -> None:
        import websocket

        # No Origin header: Chromium refuses DevTools websockets from unlisted origins, and we are no web page.
        self.ws = websocket.create_connection(url, timeout=LOAD_TIMEOUT, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"id": next(self.ids), "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {method} within {timeout:.0f} s")
            self.ws.settimeout(remaining)
            self.events.append(json.loads(self.ws.recv()))

    def drain(self, seconds: float) -> None:
        """Collect whatever the page still reports (late console errors, lazy requests) for a moment."""
        import websocket

        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.ws.settimeout(remaining)
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                return

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("MEDPRETRAIN_REQUIRE_BROWSER") == "1":
            pytest.fail("MEDPRETRAIN_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: install it (apt-get install chromium) to check the report in a browser")
    return path


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = (profile.parent / "chromium.log").open("wb")
    proc = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # containers run as root without user namespaces
            "--disable-gpu",
            "--window-size=1280,900",  # the report's layout width; the default 800 px would wrap its tables
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",  # no update or safe-browsing pings mixed into the page's requests
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    # Port 0 lets Chromium pick a free port; it writes "<port>\n<browser websocket path>" into the profile.
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail(f"chromium did not start: {(profile.parent / 'chromium.log').read_text()[-2000:]}")
        time.sleep(0.1)
    port, path = port_file.read_text().splitlines()[:2]
    tools = DevTools(f"ws://127.0.0.1:{port}{path}")
    try:
        yield tools
    finally:
        import websocket

        # The browser may already be gone; the process is ended below either way.
        with contextlib.suppress(OSError, RuntimeError, websocket.WebSocketException):
            tools.send("Browser.close")
        tools.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def loaded(browser: DevTools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Open the report in a fresh page and record everything the page reported while loading."""
    from test_report import built_run

    _, report = built_run(tmp_path_factory)
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Network", "Page"):
        browser.send(f"{domain}.enable", session=session)
    start = len(browser.events)
    navigation = browser.send("Page.navigate", {"url": report.resolve().as_uri()}, session=session)
    assert "errorText" not in navigation, navigation
    browser.wait_for("Page.loadEventFired", LOAD_TIMEOUT)
    browser.drain(1.0)

    def evaluate(expression: str) -> Any:
        result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    images = evaluate(
        "Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt}))"
    )
    sections = evaluate(
        "Array.from(document.querySelectorAll('section[id]')).map(s => [s.id, s.getBoundingClientRect().height])"
    )
    size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
    shot = browser.send(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
        session=session,
    )["data"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(base64.b64decode(shot))
    events = [e for e in browser.events[start:] if e.get("sessionId") == session]
    browser.send("Target.closeTarget", {"targetId": target})
    return {
        "events": events,
        "images": images,
        "sections": sections,
        "html": report.read_text(encoding="utf-8"),
        "screenshot": base64.b64decode(shot),
    }


def test_no_console_errors_or_exceptions(loaded: dict[str, Any]) -> None:
    problems = []
    for event in loaded["events"]:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            problems.append(("console.error", [a.get("value", a.get("description")) for a in params.get("args", [])]))
        elif method == "Runtime.exceptionThrown":
            problems.append(("exception", params.get("exceptionDetails", {}).get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            problems.append(("log", params["entry"].get("text"), params["entry"].get("url")))
    assert not problems


def test_no_request_leaves_the_file(loaded: dict[str, Any]) -> None:
    urls = [e["params"]["request"]["url"] for e in loaded["events"] if e.get("method") == "Network.requestWillBeSent"]
    assert any(u.startswith("file:") for u in urls)  # the recording worked: it saw the page itself
    assert [u for u in urls if not u.startswith(("file:", "data:"))] == []


def test_every_image_is_decoded(loaded: dict[str, Any]) -> None:
    images = loaded["images"]
    assert len(images) == loaded["html"].count("<img ")
    assert images and all(i["complete"] and i["width"] > 0 for i in images), images


def test_every_section_renders(loaded: dict[str, Any]) -> None:
    from medpretrain.report import SECTIONS

    heights = dict(loaded["sections"])
    assert list(heights) == [name for name, _ in SECTIONS]
    assert all(h > 0 for h in heights.values()), heights


def test_screenshot_shows_the_page(loaded: dict[str, Any]) -> None:
    shot = Image.open(io.BytesIO(loaded["screenshot"]))
    assert shot.format == "PNG" and shot.height > shot.width  # the full page, not just the viewport
    assert (ARTIFACTS / "report.png").stat().st_size == len(loaded["screenshot"])
    assert max(ImageStat.Stat(shot.convert("L")).stddev) > 10  # not a blank page
