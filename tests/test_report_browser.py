"""The report in a real browser: headless Chromium opens report.html from disk, takes a
screenshot, and every section must have rendered, every image decoded, the layer tabs
must switch without any script of the page, and there must be no console error and no
request beyond the file itself and its data URIs.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages separated by NUL bytes, commands on the browser's fd 3, answers on its fd 4), so
no browser-driving library is needed. Without Debian's `chromium` the test skips.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import micro_comparison, run_cli

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe", "--window-size=1200,900",
]  # fmt: skip
TIMEOUT_S = 20.0

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium found (apt-get install chromium); browser test skipped",
    ),
]


class DevToolsPipe:
    """A minimal DevTools protocol client over the browser's debugging pipe.

    Args:
        user_data_dir: a fresh profile folder.
    """

    def __init__(self, user_data_dir: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Park the browser's ends above fd 10, so moving them to 3 and 4 in the child
        # cannot overwrite one with the other.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)

        def pipes_to_3_and_4():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=pipes_to_3_and_4,  # noqa: PLW1509 (only dup2 calls, async-signal-safe)
        )
        for fd in (to_browser_r, from_browser_w, high_r, high_w):
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send a command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        """Wait for an event (or return one already received)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while b"\0" not in self._buffer:
            ready, _, _ = select.select(
                [self._from_browser], [], [], max(0.0, deadline - time.monotonic())
            )
            chunk = os.read(self._from_browser, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError("no answer from chromium")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


CHECK = """JSON.stringify({
  sections: Array.from(document.querySelectorAll('section')).map(s => ({
    id: s.id, width: s.getBoundingClientRect().width, height: s.getBoundingClientRect().height})),
  images: Array.from(document.images).map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
  panels: Array.from(document.querySelectorAll('.panel')).map(p => p.getBoundingClientRect().height),
  tokens: document.querySelectorAll('#panel-0 .sample span').length,
})"""


def evaluate(browser: DevToolsPipe, session: str, expression: str):
    result = browser.send(
        "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
    )
    return result["result"].get("value")


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    comparison = micro_comparison(tmp_path_factory)
    code, _, stderr = run_cli("report", str(comparison), "--tokens-per-domain", "128")
    assert code == 0, stderr
    return comparison / "report.html"


def test_report_renders_in_headless_chromium(report_path, tmp_path):
    browser = DevToolsPipe(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": report_path.resolve().as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        page = json.loads(evaluate(browser, session, CHECK))
        # The tabs are CSS radio buttons: clicking the second label shows the second panel.
        evaluate(browser, session, "document.querySelector('label[for=tab-1]').click()")
        panels_after_click = json.loads(evaluate(browser, session, CHECK))["panels"]
        shot = browser.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session,
        )
    finally:
        browser.close()

    assert [s["id"] for s in page["sections"]] == [
        "summary", "tokens", "load", "specialisation", "curves", "params", "config"
    ]  # fmt: skip
    assert all(s["width"] > 0 and s["height"] > 0 for s in page["sections"]), page["sections"]
    assert len(page["images"]) >= 5
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in page["images"]), page[
        "images"
    ]
    assert page["tokens"] > 0
    assert page["panels"][0] > 0 and page["panels"][1] == 0
    assert panels_after_click[0] == 0 and panels_after_click[1] > 0

    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    (tmp_path / "report.png").write_bytes(png)

    errors = [
        e for e in browser.events
        if (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]  # fmt: skip
    assert errors == []
    requests = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
