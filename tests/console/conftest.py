"""Fixtures for the console's browser tests: Debian's chromium driven by Playwright, a served control plane on the
shared mosquitto with a viewer, an operator and an admin token, and helpers to log in and save screenshots.

* ``chromium`` (module scope): a Playwright ``Browser`` on ``/usr/bin/chromium`` (``executable_path``; no browser
  is ever downloaded). Missing chromium or Playwright skips the module locally and fails it under ``CI=true``.
* ``console_server`` (module scope): a started :class:`~controlplane.wiring.Fleet` (SQLite, the shared
  mosquitto) served by uvicorn in a thread on a free port: ``.url``, ``.fleet``, ``.tokens[Role.X]``,
  ``.broker_url``. Tests in one module share it: give devices ids of your own; everything they left retained on
  the broker is cleared at the end.
* ``page``: a fresh browser context (its own cookies) on ``console_server``, ``base_url`` set: ``page.goto("/console/")``.
* :func:`login` (``login(page, token)``) and :func:`screenshot` (``screenshot(page, "fleet")`` writes
  ``docs/console/fleet.png`` only when ``EDGEFLEET_SCREENSHOTS=1``, so CI never rewrites the committed files).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests._services import (
    MOSQUITTO_HOST,
    MOSQUITTO_PORT,
    clear_retained,
    fleet_settings,
    free_port,
    port_open,
    purge_retained,
    service_missing,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from controlplane.auth import Role
    from controlplane.wiring import Fleet

__all__ = ["CHROMIUM", "SCREENSHOTS", "ConsoleServer", "login", "screenshot"]

CHROMIUM = Path(os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


@pytest.fixture(name="chromium", scope="module")
def fx_chromium() -> Iterator[Browser]:
    """One headless chromium per test module (starting one takes about a second)."""
    if not CHROMIUM.exists():
        service_missing(f"chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("playwright (pip install playwright; no browser download needed)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ConsoleServer:
    url: str
    fleet: Fleet
    broker_url: str
    tokens: dict[Role, str] = field(default_factory=dict)


@pytest.fixture(name="console_broker", scope="module")
def fx_console_broker() -> Iterator[str]:
    """The shared mosquitto for a whole module, with nothing retained under ``edgefleet/`` before and after."""
    if not port_open(MOSQUITTO_HOST, MOSQUITTO_PORT):
        service_missing(f"mosquitto on {MOSQUITTO_HOST}:{MOSQUITTO_PORT}")
    url = f"mqtt://{MOSQUITTO_HOST}:{MOSQUITTO_PORT}"
    purge_retained(url)
    yield url
    purge_retained(url)


@pytest.fixture(name="console_server", scope="module")
def fx_console_server(console_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleServer]:
    from controlplane.app import create_app
    from controlplane.auth import Role, create_token
    from controlplane.demo import AppServer
    from controlplane.wiring import Fleet

    data_dir = tmp_path_factory.mktemp(f"console-{uuid.uuid4().hex[:6]}")
    fleet = Fleet(fleet_settings(console_broker, data_dir / "cp")).start()
    port = free_port()
    try:
        tokens = {role: create_token(fleet.engine, role, f"console-{role}")[1] for role in Role}
        with AppServer(create_app(fleet=fleet), port):
            yield ConsoleServer(url=f"http://127.0.0.1:{port}", fleet=fleet, broker_url=console_broker,
                                tokens=tokens)
    finally:
        device_ids = [d.device_id for d in fleet.devices.find(limit=100_000)]
        fleet.stop()
        clear_retained(console_broker, device_ids)


@pytest.fixture(name="page")
def fx_page(chromium: Browser, console_server: ConsoleServer) -> Iterator[Page]:
    """A page in its own browser context (no cookies shared with other tests)."""
    context = chromium.new_context(base_url=console_server.url, viewport={"width": 1280, "height": 860})
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def login(page: Page, token: str, next_path: str = "") -> None:
    """Log in through the login form, as a person would; lands on ``next_path`` (default: the fleet page)."""
    page.goto("/console/login" + (f"?next={next_path}" if next_path else ""))
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button[type=submit]")


def screenshot(page: Page, name: str) -> Path | None:
    """Save ``docs/console/<name>.png`` when ``EDGEFLEET_SCREENSHOTS=1`` (full page); else nothing. The path."""
    if os.environ.get("EDGEFLEET_SCREENSHOTS") != "1":
        return None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
