"""The daemon's and the CLI's client for a ccgate server's device endpoints.

Every failure becomes a ``ServerError`` whose message says what to do: ``ServerUnreachable``
when nothing answered (the daemon keeps working from its last bundle), ``KeyRefused`` when the
server says the virtual key is unknown, revoked or expired (the daemon then refuses requests).
The virtual key is sent as a Bearer token and never appears in a message.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx

from ccgate import __version__
from ccgate.errors import CcgateError

DEVICE_HEADER = "x-ccgate-device"


class ServerError(CcgateError):
    """The server answered with an error."""


class ServerUnreachable(ServerError):
    """Nothing answered at the server URL."""


class KeyRefused(ServerError):
    """401 from the server: the virtual key is unknown, revoked or expired."""


class ServerClient:
    def __init__(
        self,
        base_url: str,
        *,
        key: str | None = None,
        device_id: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"user-agent": f"ccgate/{__version__}"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        if device_id is not None:
            headers[DEVICE_HEADER] = device_id
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> ServerClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"Cannot reach the ccgate server at {self.base_url} ({type(exc).__name__})."
            ) from None
        if response.status_code in ok:
            return response
        message = _error_message(response)
        if response.status_code == 401:
            raise KeyRefused(f"The ccgate server refused the key: {message}")
        raise ServerError(
            f"The ccgate server at {self.base_url} answered {response.status_code}: {message}"
        )

    async def server_key(self) -> tuple[bytes, str]:
        data = (await self._request("GET", "/v1/server-key")).json()
        try:
            return base64.b64decode(data["public_key"]), str(data["fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise ServerError(
                f"{self.base_url} did not answer like a ccgate server (/v1/server-key)."
            ) from None

    async def register_device(self, *, public_key: bytes, name: str) -> tuple[str, str]:
        body = {"public_key": base64.b64encode(public_key).decode(), "name": name}
        data = (await self._request("POST", "/v1/devices", json=body, ok=(200, 201))).json()
        return str(data["device_id"]), str(data["key_id"])

    async def fetch_bundle(self, *, etag: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """The envelope and its ETag; ``(None, etag)`` when unchanged (304)."""
        headers = {"if-none-match": etag} if etag else {}
        response = await self._request("GET", "/v1/bundle", headers=headers, ok=(200, 304))
        if response.status_code == 304:
            return None, etag
        envelope: dict[str, Any] = response.json()
        return envelope, response.headers.get("etag")

    async def request_lease(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", "/v1/leases", json=body, ok=(200, 201))
        data: dict[str, Any] = response.json()
        return data

    async def return_lease(self, lease_id: str) -> None:
        await self._request("POST", f"/v1/leases/{lease_id}/return", json={}, ok=(200, 404))

    async def push_usage(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self._request("POST", "/v1/usage", json={"records": records})
        data: dict[str, Any] = response.json()
        return data


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
