"""A real-browser check of the notebooks' interactive part: start JupyterLab, open notebook 01 in headless
Chromium, run every cell, move a slider of the augmentation explorer and verify that its figure changes.

    make browser-check        # installs JupyterLab + Playwright into .venv; needs Chromium (apt install chromium)

Writes screenshots (before / after the slider moved) to runs/browser-check/ and exits 0 when the figure was drawn
on load and changed after the slider moved; exits 2 with one line saying what is missing when it cannot run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/01_augmentations.ipynb"
OUT = ROOT / "runs" / "browser-check"
EXPLORER_IMAGE = ".widget-output img"  # the explorer draws into an ipywidgets Output


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    print(f"browser check: {message}", file=sys.stderr)
    raise SystemExit(2)


def chromium() -> str:
    """Path of a Chromium binary (else exit 2 saying how to get one)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    fail("no Chromium found: install it (Debian/Ubuntu: apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, token: str) -> subprocess.Popen:
    """JupyterLab serving the project, without opening a browser of its own."""
    lab = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", f"--ServerApp.token={token}",
           f"--ServerApp.root_dir={ROOT}", "--ServerApp.ip=127.0.0.1", "--allow-root"]
    # Render every cell (JupyterLab 4 detaches cells scrolled out of view), no news pop-up over the page, and no
    # autosave: the committed notebook must stay without outputs.
    settings = OUT / "lab-settings"
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false"},
                           "docmanager-extension/plugin": {"autosave": False}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    log = open(OUT / "jupyterlab.log", "w")
    process = subprocess.Popen(lab, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings)})
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api?token={token}", timeout=1)
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    fail(f"JupyterLab did not start; see {OUT / 'jupyterlab.log'}")


def accept_kernel(page) -> None:
    """Accept the "Select Kernel" dialog (the default Python 3 kernel) when JupyterLab asks."""
    try:
        page.get_by_role("button", name="Select", exact=True).click(timeout=15_000)
    except Exception:  # no dialog: the kernel started by itself
        pass


def check(page, url: str) -> tuple[str, str]:
    """Run the notebook, then move the colour slider; the explorer image's data before and after."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    accept_kernel(page)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    image = page.wait_for_selector(EXPLORER_IMAGE, timeout=300_000)  # drawn on load, before any slider moves
    before = image.get_attribute("src")
    page.screenshot(path=str(OUT / "before.png"), full_page=False)
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(5):  # 0.5 -> 1.0: a much stronger colour distortion
        page.keyboard.press("ArrowRight")
    deadline = time.time() + 120
    after = before
    while after == before and time.time() < deadline:
        time.sleep(1)
        after = page.locator(EXPLORER_IMAGE).first.get_attribute("src")
    page.locator(EXPLORER_IMAGE).first.scroll_into_view_if_needed()
    page.screenshot(path=str(OUT / "after.png"), full_page=False)
    return before or "", after or ""


def main() -> int:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        fail("Playwright is not installed: `make browser-check` installs it")
    browser_path = chromium()
    OUT.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(port, token)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            before, after = check(page, f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}")
            browser.close()
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    drawn, changed = before.startswith("data:image"), after != before
    print(f"explorer drawn on load: {drawn}; figure changed after moving the slider: {changed}")
    print(f"screenshots: {OUT / 'before.png'}, {OUT / 'after.png'}")
    return 0 if drawn and changed else 1


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    sys.exit(main())
