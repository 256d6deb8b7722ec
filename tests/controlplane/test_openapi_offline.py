"""The API docs (/schema: Scalar and Swagger UI) work on an offline network: every script and stylesheet they load is
served by the control plane itself, without a token, and nothing points at a CDN."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from litestar.testing import TestClient

from controlplane.app import create_app
from controlplane.wiring import Fleet
from tests._services import fx_fleet  # noqa: F401 - fx_fleet

pytestmark = pytest.mark.integration

# src= and href= of <script> and <link> tags (the pages Litestar renders use both quote styles)
_ASSET = re.compile(r"<(script|link)\b[^>]*?\b(src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_TYPES = {".js": "javascript", ".css": "text/css"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("page", ["/schema", "/schema/swagger"])
def test_the_schema_pages_load_their_assets_from_the_control_plane(fleet: Fleet, page: str) -> None:
    # Prepare
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute: the page and each asset it references, with no Authorization header
        html = client.get(page)
        assets = [m.group(3) for m in _ASSET.finditer(html.text)]
        answers = {url: client.get(url) for url in assets}
    # Assert
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert len(assets) >= 2, html.text  # at least the script and the stylesheet
    assert "https://" not in html.text and "http://" not in html.text, html.text
    for url, answer in answers.items():
        assert url.startswith("/schema/assets/"), url
        assert answer.status_code == 200, (url, answer.status_code)
        assert _TYPES[Path(url).suffix] in answer.headers["content-type"], (url, answer.headers["content-type"])
        assert answer.content, url


def test_the_vendored_assets_ship_with_their_licences() -> None:
    # Prepare / Execute
    import controlplane

    root = Path(controlplane.__file__).parent / "static" / "openapi"
    # Assert: each vendored package keeps its licence beside its files
    for package in ("swagger-ui", "scalar"):
        assert (root / package / "LICENSE").read_text().strip(), package
