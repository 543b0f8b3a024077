"""Headless Chromium driven over the DevTools protocol, for UI pages that need a click before the
part worth seeing shows (the Prefect UI's Resume form opens from a button): load a page, wait for
text, click a button by its label, wait for more text, save a screenshot and return the page's text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import time
from pathlib import Path

import httpx
from prefect_server import free_port

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars")


def screenshot_after_click(
    chromium: str,
    url: str,
    wait_for: str,
    click: str | None,
    then_wait_for: str,
    screenshot: Path,
    profile: Path,
    timeout: float = 90,
    local_storage: dict[str, str] | None = None,
) -> str:
    """The visible text of `url` once `wait_for` shows, the button labelled `click` is clicked (if
    any) and `then_wait_for` shows; the page as it then looks is saved to `screenshot` (PNG).
    `local_storage`: items set in the page's origin before it loads (the Prefect UI's password)."""
    port = free_port()
    command = [
        chromium,
        *FLAGS,
        f"--remote-debugging-port={port}",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "about:blank",
    ]
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = _page_socket(port, timeout)
        return asyncio.run(_drive(page, url, wait_for, click, then_wait_for, screenshot, timeout, local_storage))
    finally:
        browser.kill()
        browser.wait()


def _page_socket(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.3)
    raise TimeoutError("Chromium's DevTools endpoint did not come up")


async def _drive(page: str, url, wait_for, click, then_wait_for, screenshot: Path, timeout: float, storage) -> str:
    import websockets

    async with websockets.connect(page, max_size=None) as socket:
        calls = iter(range(1, 1_000_000))

        async def call(method: str, **params) -> dict:
            number = next(calls)
            await socket.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                message = json.loads(await socket.recv())
                if message.get("id") == number:
                    return message.get("result", {})

        async def text() -> str:
            result = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
            return result["result"].get("value", "")

        async def until_shown(wanted: str) -> str:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if wanted in (shown := await text()):
                    return shown
                await asyncio.sleep(0.5)
            raise TimeoutError(f"{wanted!r} never showed; the page reads:\n{(await text())[:2000]}")

        await call("Page.enable")
        if storage:
            await call("Page.navigate", url=url)
            for key, value in storage.items():
                item = f"{json.dumps(key)}, {json.dumps(value)}"
                await call("Runtime.evaluate", expression=f"localStorage.setItem({item})")
        await call("Page.navigate", url=url)
        await until_shown(wait_for)
        if click is not None:
            button = f"[...document.querySelectorAll('button')].find(b => b.innerText.trim() === {json.dumps(click)})"
            await call("Runtime.evaluate", expression=f"{button}.click()")
        shown = await until_shown(then_wait_for)
        await asyncio.sleep(1)  # let the modal finish its transition before the picture
        picture = await call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(picture["data"]))
        return shown
