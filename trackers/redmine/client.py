"""Redmine's REST API over HTTP, with every failure mapped to TrackerError in one place.

This is the choke point tests patch. It knows URLs, headers, status codes and JSON; what
an issue means is the adapter's business.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import urlsplit

import requests

from trackers.base import NotFound, TrackerError, TrackerUnavailable

logger = logging.getLogger(__name__)

# Redmine's own default upload limit is 5 MB; a download far above any sane limit is refused.
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
CHUNK_SIZE = 64 * 1024


class RedmineClient:
    """One Redmine, reached with one API key. Sessions are kept alive, one per thread.

    ``request_budget`` bounds how many HTTP requests this client makes until
    ``reset_budget()``; past it every call fails with a transient error, so that one pass
    of the sync cannot hammer the server without end.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: tuple[float, float] = (5, 30),
        max_retry_after: float = 30,
        request_budget: int | None = None,
    ):
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise TrackerError(f"the Redmine URL must be an http(s) URL, not {url!r}", permanent=True)
        if not isinstance(api_key, str) or not api_key.strip():
            raise TrackerError("the Redmine API key is missing", permanent=True)
        self.url = url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.max_retry_after = max_retry_after
        self.request_budget = request_budget
        self.requests_made = 0
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"RedmineClient(url={self.url!r})"

    def reset_budget(self) -> None:
        self.requests_made = 0

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["X-Redmine-API-Key"] = self._api_key
            session.headers["Accept"] = "application/json"
            self._local.session = session
        return session

    # --- JSON helpers ----------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._json(self.request("GET", path, params=params))

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._json(self.request("POST", path, json=body))

    def put(self, path: str, body: Mapping[str, Any]) -> None:
        # Redmine answers a successful PUT with 204 and no body.
        self.request("PUT", path, json=body)

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def upload(self, content: bytes | IO[bytes], filename: str) -> dict[str, Any]:
        """Store bytes on Redmine; returns ``{"id": ..., "token": ...}`` to attach them with."""
        response = self.request(
            "POST",
            "/uploads.json",
            params={"filename": filename},
            data=content,
            headers={"Content-Type": "application/octet-stream"},
        )
        upload = self._json(response).get("upload")
        if not isinstance(upload, dict) or not upload.get("token"):
            raise TrackerError("Redmine accepted an upload but returned no token", permanent=False)
        return upload

    def download(self, content_url: str, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
        """The bytes behind an attachment's ``content_url``, refused past ``max_bytes``."""
        # The API key goes with the request, so it must never leave this Redmine.
        if not content_url.startswith(self.url + "/"):
            raise TrackerError(f"attachment URL {content_url!r} is not on {self.url}", permanent=True)
        response = self.request("GET", content_url.removeprefix(self.url), stream=True)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(CHUNK_SIZE):
                size += len(chunk)
                if size > max_bytes:
                    raise TrackerError(f"attachment {content_url} is larger than {max_bytes} bytes", permanent=True)
                chunks.append(chunk)
        except requests.RequestException as e:
            raise TrackerError(f"Redmine broke off a download: {type(e).__name__}", permanent=False) from None
        finally:
            response.close()
        return b"".join(chunks)

    # --- the one place HTTP happens --------------------------------------------------------

    def request(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> requests.Response:
        """One call, retried once after a short Retry-After; failures become TrackerError."""
        response = self._send(method, path, stream=stream, **kwargs)
        if response.status_code in (429, 503):
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is not None and wait <= self.max_retry_after:
                response.close()
                logger.info("Redmine asked to wait %.1fs before %s %s", wait, method, path)
                self.sleep(wait)
                response = self._send(method, path, stream=stream, **kwargs)
        if response.status_code >= 400:
            raise self._error(method, path, response)
        return response

    # Separate so tests can stand in for the clock.
    sleep = staticmethod(time.sleep)

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        if self.request_budget is not None and self.requests_made >= self.request_budget:
            raise TrackerError(f"request budget spent ({self.request_budget} requests to Redmine)", permanent=False)
        self.requests_made += 1
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.Timeout:
            raise TrackerUnavailable(f"Redmine did not answer {method} {path} in time", permanent=False) from None
        except requests.RequestException as e:
            raise TrackerUnavailable(
                f"cannot reach Redmine at {self.url}: {type(e).__name__}", permanent=False
            ) from None
        logger.debug("%s %s -> %s", method, path, response.status_code)
        return response

    def _error(self, method: str, path: str, response: requests.Response) -> TrackerError:
        status = response.status_code
        where = f"{method} {path.split('?')[0]}"
        if status in (401, 403):
            return TrackerUnavailable(f"Redmine refused the API key (HTTP {status} on {where})", permanent=True)
        if status == 404:
            return NotFound(f"Redmine has no {path.split('?')[0]} (HTTP 404)")
        if status == 422:
            return TrackerError(f"Redmine rejected {where}: {'; '.join(_error_list(response))}", permanent=True)
        if status == 429 or status >= 500:
            return TrackerUnavailable(f"Redmine is unavailable (HTTP {status} on {where})", permanent=False)
        return TrackerError(f"Redmine refused {where} (HTTP {status})", permanent=True)

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        if response.status_code == 204 or not response.content:
            return {}
        try:
            body = response.json()
        except ValueError:
            raise TrackerError(
                f"Redmine answered {response.url} with something that is not JSON", permanent=True
            ) from None
        if not isinstance(body, dict):
            raise TrackerError(f"Redmine answered {response.url} with unexpected JSON", permanent=True)
        return body


def _error_list(response: requests.Response) -> list[str]:
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError):
        errors = None
    if isinstance(errors, list) and errors:
        return [str(error) for error in errors]
    return ["no reason given"]


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
