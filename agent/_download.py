"""The HTTP client of model deployments: documents and artifacts from the control plane this device was enrolled
with, nowhere else.

An artifact is streamed to a file in chunks (never held whole in memory) and resumed with HTTP Range after a
dropped connection; connection errors, 5xx and stalls are retried with exponential backoff. Every failure is a
:class:`agent._errors.DeployError` whose reason says what happened, with figures. Only the standard library:
``urllib.request`` and ``http.client`` are imported on the first download, not with this module.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from agent._errors import DeployError
from agent._settings import DownloadPolicy
from agent.logsetup import get_logger

__all__ = ["download", "fetch_small", "resolve_url"]

log = get_logger("edgefleet.agent.ota")


class _Transient(Exception):
    """A network failure worth retrying."""


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the scheme's default port filled in; None if it is not an http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def resolve_url(value: Any, base: str | None, what: str) -> str:
    """The absolute URL of a download; it must be on the control plane this device was enrolled with."""
    if not isinstance(value, str) or not value:
        raise DeployError("request", f"{what} is required (absolute, or relative to the control plane URL)")
    url: str = value
    if urlsplit(url).scheme and urlsplit(url).scheme not in ("http", "https"):
        raise DeployError("request", f"{what} {url!r}: only http:// and https:// are supported")
    home = _origin(base) if base else None
    if base is None or home is None:
        raise DeployError("request", f"no control plane URL is configured on this device (--controlplane): "
                                     f"refusing to download {what} {url!r} from anywhere")
    url = urljoin(base if base.endswith("/") else base + "/", url)
    if _origin(url) != home:
        raise DeployError("request", f"{what} {url!r} is not on the control plane this device was enrolled "
                                     f"with ({base}): refused")
    return url


def _same_origin_redirects(origin: tuple[str, str, int | None] | None) -> Any:
    import urllib.request

    class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
        """Follow a redirect only within the control plane's origin."""

        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> Any:
            if _origin(newurl) != origin:
                raise DeployError("download", f"{req.full_url} redirects to {newurl}, off the control plane: "
                                              f"refused")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return SameOriginRedirects()


def _request(url: str, bearer: str | None, headers: dict[str, str], timeout: float,
             ca_file: str | None = None) -> Any:
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    request.add_header("User-Agent", "edgefleet-agent")
    if bearer:
        request.add_unredirected_header("Authorization", f"Bearer {bearer}")  # not to redirect targets
    handlers: list[Any] = [_same_origin_redirects(_origin(url))]
    if ca_file is not None and url.startswith("https:"):
        import ssl

        # The control plane is verified against the fleet CA (what --ca-file names), not the system store.
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DeployError("download", f"CA file {ca_file}: {exc}") from None
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    return opener.open(request, timeout=timeout)  # the scheme and origin are checked in resolve_url


def _classify(exc: BaseException, policy: DownloadPolicy) -> str:
    """A transient network error, as words; raises DeployError for a permanent one."""
    import http.client
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (408, 425, 429) or exc.code >= 500:
            return f"HTTP {exc.code} {exc.reason}"
        detail = _http_detail(exc)
        raise DeployError("download", f"HTTP {exc.code} {exc.reason} from {exc.url}"
                                      + (f": {detail}" if detail else "")) from exc
    if isinstance(exc, TimeoutError):
        return f"stalled: no data for {policy.stall_timeout_s:g} s"
    if isinstance(exc, urllib.error.URLError):
        return f"connection failed: {exc.reason}"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection dropped mid-transfer"
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return f"{type(exc).__name__}: {exc}"
    raise exc


def _http_detail(exc: Any) -> str:
    """The control plane's reason in an error response (its JSON ``detail``, e.g. "deployment 4 is cancelled"),
    read from at most 2 KiB of the body, printable characters only, at most 300 of them; "" if there is none."""
    import json

    try:
        body = exc.read(2048)
        detail = json.loads(body).get("detail") if body else None
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(detail, str):
        return ""
    text = "".join(ch for ch in detail if ch.isprintable())
    return text[:300] + ("..." if len(text) > 300 else "")


def _backoff(policy: DownloadPolicy, failures: int) -> float:
    return float(min(policy.backoff_max_s, policy.backoff_s * 2 ** max(0, failures - 1)))


def fetch_small(url: str, bearer: str | None, policy: DownloadPolicy, what: str) -> bytes:
    """GET a small document (at most ``policy.manifest_max_bytes``) into memory, with retries."""
    import http.client

    failures = 0
    while True:
        try:
            with _request(url, bearer, {}, policy.stall_timeout_s, policy.ca_file) as response:
                data: bytes = response.read(policy.manifest_max_bytes + 1)
            if len(data) > policy.manifest_max_bytes:
                raise DeployError("manifest", f"{what} is larger than {policy.manifest_max_bytes} bytes")
            return data
        except (OSError, http.client.HTTPException) as exc:
            error = _classify(exc, policy)
        failures += 1
        if failures >= policy.attempts:
            raise DeployError("download", f"{what} download failed after {failures} attempts: {error}")
        time.sleep(_backoff(policy, failures))


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None


def download(url: str, dest: Path, size: int, bearer: str | None, policy: DownloadPolicy) -> dict[str, Any]:
    """Download ``size`` bytes into ``dest``, resuming from what ``dest`` already holds (HTTP Range).

    Connection errors, 5xx and stalls are retried with exponential backoff; an attempt that made progress
    resets the failure count. Raises DeployError (with ``keep_partial`` so the next deployment can resume).
    Returns ``{"bytes", "resumed_from", "requests"}``.
    """
    import http.client
    import urllib.error

    deadline = time.monotonic() + policy.total_timeout_s
    resumed_from = dest.stat().st_size if dest.exists() else 0
    failures = requests = 0
    error = ""
    while True:
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return {"bytes": size, "resumed_from": resumed_from, "requests": requests}
        if time.monotonic() >= deadline:
            raise DeployError("download", f"artifact download did not finish within "
                                          f"{policy.total_timeout_s:g} s ({have}/{size} bytes; "
                                          f"{error or 'too slow'})", keep_partial=True)
        headers = {"Range": f"bytes={have}-"} if have else {}
        requests += 1
        start = have
        try:
            with _request(url, bearer, headers, policy.stall_timeout_s, policy.ca_file) as response:
                content_range = response.headers.get("Content-Range")
                if response.status == 206 and _content_range_start(content_range) == have:
                    mode = "ab"
                elif response.status == 200:
                    mode, have, start = "wb", 0, 0  # no range support (or a fresh start): from the beginning
                else:
                    dest.unlink(missing_ok=True)  # a range we did not ask for: start over
                    raise _Transient(f"unexpected HTTP {response.status} (Content-Range {content_range!r})")
                with open(dest, mode) as fh:
                    try:
                        while chunk := response.read(policy.chunk_bytes):
                            if have + len(chunk) > size:
                                raise DeployError("download", f"the server sent more than the manifest's "
                                                              f"{size} bytes")  # not resumable: deleted
                            fh.write(chunk)
                            have += len(chunk)
                            if time.monotonic() >= deadline:
                                break
                    finally:
                        fh.flush()
                        os.fsync(fh.fileno())
            if have < size and time.monotonic() < deadline:
                raise _Transient(f"connection closed after {have}/{size} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our range is past the end: whatever we have is wrong
                dest.unlink(missing_ok=True)
                error = "HTTP 416 (range not satisfiable): restarting"
            else:
                try:
                    error = _classify(exc, policy)
                except DeployError as permanent:
                    permanent.keep_partial = True
                    raise
        except _Transient as exc:
            error = str(exc)
        except (OSError, http.client.HTTPException) as exc:
            error = _classify(exc, policy)
        if have >= size:
            continue
        failures = 0 if have > start else failures + 1
        if failures >= policy.attempts:
            raise DeployError("download", f"artifact download failed after {requests} requests "
                                          f"({have}/{size} bytes received, resumable): {error}",
                              keep_partial=True)
        log.info("ota.download_retry", url=url, have=have, size=size, error=error)
        time.sleep(_backoff(policy, max(1, failures)))
