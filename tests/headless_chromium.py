"""Test helper: load a local HTML file in headless Chromium over the DevTools protocol and report what happened.

Chromium talks the protocol over a pipe (`--remote-debugging-pipe`: it reads commands on fd 3 and writes replies and
events on fd 4, each a JSON message ended by a NUL byte), so no websocket client is needed. `load_page` opens the
file in a fresh profile, waits for the load event, and returns every request the page made, every console or log
error, the boxes of the elements asked for, and a screenshot of the whole page.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT_WIDTH = 1280


def chromium_binary() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


@dataclass
class PageLoad:
    requests: list[str] = field(
        default_factory=list
    )  # every URL the page asked for, the file itself included
    errors: list[str] = field(
        default_factory=list
    )  # console errors, uncaught exceptions, log entries at error
    boxes: list[dict] = field(
        default_factory=list
    )  # the elements asked for: tag, x, y, width, height, naturalWidth
    screenshot: bytes = b""  # PNG of the whole page at VIEWPORT_WIDTH


class _Pipe:
    """The DevTools protocol over Chromium's pipe: numbered commands, replies matched by id, events kept."""

    def __init__(self, commands: int, replies: int):
        self.commands, self.replies = commands, replies
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def send(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0
    ):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event


def _launch(binary: str, profile: str) -> tuple[subprocess.Popen, _Pipe]:
    to_chromium_read, to_chromium_write = os.pipe()
    from_chromium_read, from_chromium_write = os.pipe()

    def wire_fds() -> None:  # in the child: its fd 3 reads our commands, its fd 4 carries its replies
        read_end, write_end = os.dup(to_chromium_read), os.dup(from_chromium_write)
        os.dup2(read_end, 3)
        os.dup2(write_end, 4)

    arguments = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe"]
    arguments += ["--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}"]
    arguments += [f"--window-size={VIEWPORT_WIDTH},900", "about:blank"]
    process = subprocess.Popen(
        arguments,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=False,
        preexec_fn=wire_fds,
    )
    os.close(to_chromium_read)
    os.close(from_chromium_write)
    return process, _Pipe(to_chromium_write, from_chromium_read)


_BOXES = """JSON.stringify([...document.querySelectorAll(%s)].map(element => {
  const box = element.getBoundingClientRect();
  return {tag: element.tagName.toLowerCase(), x: box.x + window.scrollX, y: box.y + window.scrollY,
          width: box.width, height: box.height, naturalWidth: element.naturalWidth || 0};
}))"""


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(
                "console: " + " ".join(str(arg.get("value", arg)) for arg in params.get("args", []))
            )
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + str(params.get("exceptionDetails", {}).get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append("log: " + str(params["entry"].get("text")))
    return errors


def load_page(binary: str, page: Path, selector: str = "table, img") -> PageLoad:
    """Open `page` (a local file), wait for its load event, and collect what happened (see PageLoad)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    process, pipe = _launch(binary, profile)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.events.clear()  # about:blank's own events
        pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        pipe.wait_for("Page.loadEventFired")
        metrics = pipe.send("Page.getLayoutMetrics", session=session)
        height = int(metrics["cssContentSize"]["height"]) + 1
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": VIEWPORT_WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        expression = _BOXES % json.dumps(selector)
        boxes = pipe.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
        )
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
        requests = [
            event["params"]["request"]["url"]
            for event in pipe.events
            if event.get("method") == "Network.requestWillBeSent"
        ]
        return PageLoad(
            requests=requests,
            errors=_errors(pipe.events),
            boxes=json.loads(boxes["result"]["value"]),
            screenshot=base64.b64decode(shot["data"]),
        )
    finally:
        try:
            pipe.send("Browser.close", timeout=10.0)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(pipe.commands)
        os.close(pipe.replies)
        shutil.rmtree(profile, ignore_errors=True)
