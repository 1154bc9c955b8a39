"""Render an HTML file in headless Chromium as a person's browser would: a full-page PNG screenshot, how many
<img> elements the page has and which failed to load, and the page's visible text.

The browser is Debian's ``chromium`` package (launch/setup_env.sh installs it). It is driven through the
Chrome DevTools Protocol over ``--remote-debugging-pipe``: Chromium reads commands on fd 3 and writes
replies and events on fd 4, one JSON message per NUL-terminated chunk. That needs the standard library
only: no driver binary whose version must match the browser (Selenium's chromedriver), no Node runtime
or pinned browser build (Playwright), and no network. Where no Chromium is installed, the tests that
need it are skipped on a developer's machine and fail in CI (the ``CI`` environment variable set), as
tests/support/videos.py does for its wheel.
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import pathlib
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest

from tests.support.videos import in_ci

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT_WIDTH = 1200
MAX_HEIGHT = 20000
"""Longest screenshot taken (px); a longer page is cut there."""

PAGE_STATE_JS = """JSON.stringify({
  images: Array.from(document.images).map(i => ({
    alt: i.alt, src: i.src.slice(0, 40), loaded: i.complete && i.naturalWidth > 0})),
  text: document.body ? document.body.innerText : ""})"""


class BrowserError(RuntimeError):
    """Chromium could not start, answered with an error, or went quiet."""


@dataclass(frozen=True, kw_only=True)
class Rendered:
    """What the browser showed for one page."""

    screenshot: str
    """The full-page PNG."""
    images: int
    """<img> elements in the page."""
    broken: list[str]
    """alt text (else the start of src) of each image that did not load: not complete or naturalWidth 0."""
    text: str
    """The page's visible text (document.body.innerText)."""


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    """The browser's path; skips the test without one (fails it in CI)."""
    path = find_chromium()
    if path is None:
        message = f"no headless browser: none of {', '.join(BROWSERS)} on PATH (apt-get install chromium)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


class DevToolsPipe:
    """One Chromium process and its DevTools pipe; `call` sends a command and waits for its reply."""

    def __init__(self, browser: str, home: str, timeout: float):
        """``home``: a scratch folder holding the browser's profile, temporary files and log."""
        self.timeout, self._next_id, self._buffer, self.events = timeout, 0, b"", []
        to_browser_r, self._write_fd = os.pipe()
        self._read_fd, from_browser_w = os.pipe()
        # the child's ends at fds >= 10, so bash's 3<&N 4>&M cannot overwrite one with the other (and bash, not sh:
        # dash takes one-digit fds only)
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        flags = [
            "--headless",
            "--remote-debugging-pipe",
            f"--user-data-dir={os.path.join(home, 'profile')}",
            f"--window-size={VIEWPORT_WIDTH},900",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-gpu",
            "--hide-scrollbars",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        os.makedirs(os.path.join(home, "tmp"))
        self._log = open(os.path.join(home, "chromium.log"), "w+b")  # noqa: SIM115 (closed in close())
        script = f'exec "$0" "$@" 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, browser, *flags, "about:blank"],
            pass_fds=(child_r, child_w),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, "TMPDIR": os.path.join(home, "tmp")},  # its singleton socket and shm files too
        )
        for fd in (child_r, child_w):
            os.close(fd)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        reply = self._read_until(lambda m: m.get("id") == self._next_id, method)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self.events.pop(i)
        return self._read_until(lambda m: m.get("method") == method and m.get("sessionId") == session, method)

    def _read_until(self, wanted, what: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                if "method" in message:
                    self.events.append(message)
            left = deadline - time.monotonic()
            ready = select.select([self._read_fd], [], [], max(left, 0))[0] if left > 0 else []
            chunk = os.read(self._read_fd, 1 << 20) if ready else b""
            if not chunk:
                raise BrowserError(f"chromium gave no answer to {what} within {self.timeout:.0f} s{self._stderr()}")
            self._buffer += chunk

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace")[-1500:]
        return f" (it exited with code {self.proc.returncode}: {tail})"

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                os.write(self._write_fd, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._write_fd)
            os.close(self._read_fd)
            self._log.close()


def render(html_path: str, screenshot: str, browser: str | None = None, timeout: float = 60.0) -> Rendered:
    """Load ``html_path`` (file://) in a fresh headless Chromium, wait for its load event (every image loaded or
    failed), screenshot the whole page to ``screenshot`` and read its images and text. The browser's profile
    lives in a temporary folder removed afterwards."""
    browser = browser or find_chromium()
    if browser is None:
        raise BrowserError(f"no headless browser: none of {', '.join(BROWSERS)} on PATH")
    home = tempfile.mkdtemp(prefix="chromium-")
    pipe = DevToolsPipe(browser, home, timeout)
    try:
        state = _load_and_capture(pipe, pathlib.Path(html_path).resolve().as_uri(), screenshot)
    finally:
        pipe.close()
        shutil.rmtree(home, ignore_errors=True)
    return Rendered(
        screenshot=screenshot,
        images=len(state["images"]),
        broken=[i["alt"] or i["src"] for i in state["images"] if not i["loaded"]],
        text=state["text"],
    )


def _load_and_capture(pipe: DevToolsPipe, url: str, screenshot: str) -> dict:
    target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    pipe.call("Page.enable", session=session)
    navigated = pipe.call("Page.navigate", {"url": url}, session=session)
    if navigated.get("errorText"):
        raise BrowserError(f"{url}: {navigated['errorText']}")
    pipe.wait_event("Page.loadEventFired", session)
    value = pipe.call("Runtime.evaluate", {"expression": PAGE_STATE_JS, "returnByValue": True}, session=session)
    state = json.loads(value["result"]["value"])
    size = pipe.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
    height = min(math.ceil(size["height"]), MAX_HEIGHT)
    metrics = {"width": VIEWPORT_WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}
    pipe.call("Emulation.setDeviceMetricsOverride", metrics, session=session)
    shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
    with open(screenshot, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    return state


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.browser PAGE.html [SHOT.png]``: render a page; exit 1 if an image is broken."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.support.browser", description=main.__doc__)
    parser.add_argument("page")
    parser.add_argument("screenshot", nargs="?", help="PNG to write (default: the page's name with .png)")
    args = parser.parse_args(argv)
    shot = args.screenshot or os.path.splitext(args.page)[0] + ".png"
    rendered = render(args.page, shot)
    print(f"{args.page}: {rendered.images} images, {len(rendered.broken)} broken; screenshot {shot}")
    for alt in rendered.broken:
        print(f"  broken: {alt}")
    return 1 if rendered.broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
