"""A real headless browser for tests: Debian's `chromium` driven by Playwright.

Nothing is downloaded: Playwright's own browser builds are never installed, the executable is the
system package (`apt-get install chromium`, done by `.ci/run`). The flags keep Chromium from
reaching for the network (this machine has none) and let it run as root in a container.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed: apt-get install chromium "
                           "(.ci/run installs it)")
    return path


@contextlib.contextmanager
def browser_page(viewport=(1280, 900)):
    """Yields a fresh Playwright page in headless Debian Chromium; closes everything after."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
