"""Screenshots of every console page from a running demo: `make demo-serve` (or `edgefleet demo --serve`), then
`.venv/bin/python docs/console/shoot.py URL TOKEN` writes docs/console/*.png (Debian's chromium, no download)."""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).parent


def main(url: str, token: str) -> None:
    url = url.rstrip("/")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(f"{url}/console/login")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/console/")

        def shot(name: str, path: str) -> None:
            page.goto(f"{url}{path}")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
            print(f"{name}: {path}")

        def first(list_path: str, prefix: str) -> str | None:
            page.goto(f"{url}{list_path}")
            links = [a.get_attribute("href") for a in page.locator(f'main a[href^="{prefix}"]').all()]
            return next((h for h in links if h and h.rstrip("/") != prefix.rstrip("/")), None)

        shot("fleet", "/console/")
        for name, list_path, prefix in (("device", "/console/", "/console/devices/"),
                                         ("round", "/console/rounds", "/console/rounds/"),
                                         ("deployment", "/console/deployments", "/console/deployments/")):
            target = first(list_path, prefix)
            if target:
                shot(name, target)
        for name in ("rounds", "models", "deployments", "jobs"):
            shot(name, f"/console/{name}")
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
