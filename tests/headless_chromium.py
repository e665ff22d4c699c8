"""Test helper: load a local HTML file in headless Chromium over the DevTools protocol and report what happened.

Chromium talks the protocol over a pipe (`--remote-debugging-pipe`: it reads commands on fd 3 and writes replies and
events on fd 4, each a JSON message ended by a NUL byte), so no websocket client is needed. `load_page` opens the
file in a fresh profile, waits for the load event, and returns every request the page made, every console or log
error, the boxes of the elements asked for, and a screenshot of the whole page.
"""

from __future__ import annotations

import base64
import fcntl
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
    """Start Chromium with our command pipe on its fd 3 and its reply pipe on its fd 4. Bash moves the pipes onto 3
    and 4 just before exec'ing Chromium (a preexec_fn would run Python in a forked child of this multi-threaded
    process, which can deadlock; dash takes only one-digit descriptors); the pipes are first copied to 10 and above
    so that moving one cannot clobber the other. Chromium's own output goes to chromium.log in the profile."""
    to_chromium_read, to_chromium_write = os.pipe()
    from_chromium_read, from_chromium_write = os.pipe()
    commands_in = fcntl.fcntl(to_chromium_read, fcntl.F_DUPFD, 10)
    replies_out = fcntl.fcntl(from_chromium_write, fcntl.F_DUPFD, 10)
    for descriptor in (to_chromium_read, from_chromium_write):
        os.close(descriptor)
    arguments = ["--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe", "--no-first-run"]
    arguments += [
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        f"--window-size={VIEWPORT_WIDTH},900",
    ]
    wiring = f'exec "$@" 3<&{commands_in} 4>&{replies_out} {commands_in}<&- {replies_out}>&-'
    with open(Path(profile) / "chromium.log", "wb") as log:
        process = subprocess.Popen(
            ["bash", "-c", wiring, "bash", binary, *arguments, "about:blank"],
            stdout=log,
            stderr=log,
            pass_fds=(commands_in, replies_out),
        )
    os.close(commands_in)
    os.close(replies_out)
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
        return _visit(pipe, page, selector)
    except (OSError, RuntimeError, TimeoutError) as error:
        log = (Path(profile) / "chromium.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{error}; chromium's log ends:\n{log}") from error
    finally:
        _close(process, pipe, profile)


def _visit(pipe: _Pipe, page: Path, selector: str) -> PageLoad:
    """Navigate a fresh page to `page` and collect its requests, errors, element boxes and screenshot."""
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
    boxes = pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
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


def _close(process: subprocess.Popen, pipe: _Pipe, profile: str) -> None:
    try:
        pipe.send("Browser.close", timeout=10.0)
    except (RuntimeError, TimeoutError, OSError):
        pass  # already gone
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    os.close(pipe.commands)
    os.close(pipe.replies)
    shutil.rmtree(profile, ignore_errors=True)
