"""Open an HTML file in headless Chromium over the DevTools protocol; report what a reader would see.

``render_page(path)`` returns the console errors, uncaught exceptions, failed loads, every
``<img>``'s load state and the ids of the page's sections; ``render_page(path, screenshot=png)`` also saves a
full-page PNG of it.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
  svgs: document.querySelectorAll('svg').length
})"""


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _wait_for_port(profile: Path, process: subprocess.Popen, timeout: float = 30) -> int:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


class _Session:
    def __init__(self, url: str):
        import websocket

        self.socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.counter = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.counter += 1
        self.socket.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.counter:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(json.loads(self.socket.recv()))


def _save_full_page(session: _Session, screenshot: Path) -> None:
    """The whole page, beyond the viewport, as a PNG at its CSS size."""
    metrics = session.call("Page.getLayoutMetrics")
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    data = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
    screenshot.write_bytes(base64.b64decode(data))


def render_page(path: str | Path, settle_seconds: float = 0.5, screenshot: Path | None = None,
                screenshot_width: int = 1280) -> dict:
    """The page's state (see the module's docstring); with ``screenshot``, a PNG of the whole page laid out in a
    window ``screenshot_width`` CSS pixels wide (without it, the browser's default window)."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found; install Debian's `chromium` (make setup does when missing)")
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                                    f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port = _wait_for_port(Path(profile), process)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in json.load(response) if t["type"] == "page"]
            session = _Session(pages[0]["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Log", "Network"):
                session.call(f"{domain}.enable")
            if screenshot is not None:
                session.call("Emulation.setDeviceMetricsOverride", width=screenshot_width, height=900,
                             deviceScaleFactor=1, mobile=False)
            session.call("Page.navigate", url=Path(path).resolve().as_uri())
            session.wait_for("Page.loadEventFired")
            time.sleep(settle_seconds)
            state = json.loads(session.call("Runtime.evaluate", expression=PAGE_STATE,
                                            returnByValue=True)["result"]["value"])
            if screenshot is not None:
                _save_full_page(session, Path(screenshot))
            session.socket.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    events = session.events
    state["console_errors"] = [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
                               and e["params"].get("type") in ("error", "assert")]
    state["exceptions"] = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    state["log_errors"] = [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
                           and e["params"]["entry"].get("level") == "error"]
    state["failed_loads"] = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    return state
