"""The daemon's and the CLI's client for a ccgate server's device endpoints.

Every failure becomes a ``ServerError`` whose message says what to do: ``ServerUnreachable``
when nothing answered (the daemon keeps working from its last bundle), ``KeyRefused`` when the
server says the virtual key is unknown, revoked or expired, ``DeviceRefused`` when this device
waits for approval or was revoked (the daemon then refuses requests, saying why).
The virtual key is sent as a Bearer token and never appears in a message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from typing import Any

import httpx

from ccgate import __version__
from ccgate.errors import CcgateError
from ccgate.policy.bundle import DeviceKey

DEVICE_HEADER = "x-ccgate-device"
TOKEN_HEADER = "x-ccgate-device-token"


class ServerError(CcgateError):
    """The server answered with an error."""


class ServerUnreachable(ServerError):
    """Nothing answered at the server URL."""


class KeyRefused(ServerError):
    """401 from the server: the virtual key is unknown, revoked or expired."""


class DeviceRefused(KeyRefused):
    """403 from the server: this device is pending approval, revoked, or not the key's."""


def device_token(device: DeviceKey) -> str:
    """This device's token for the server, derived from its private key so nothing new is
    stored: the server keeps its hash, and sends bundles, leases and usage only to a request
    that carries it, so the virtual key alone is not enough to act as this device."""
    mac = hmac.new(device.private_bytes, _TOKEN_LABEL, hashlib.sha256).digest()
    return "cgd_" + base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")


_TOKEN_LABEL = b"ccgate device token v1"


class ServerClient:
    def __init__(
        self,
        base_url: str,
        *,
        key: str | None = None,
        device_id: str | None = None,
        device: DeviceKey | None = None,
        timeout: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests pass ``httpx.ASGITransport`` over the
        server app); None is a real connection pool."""
        self.base_url = base_url.rstrip("/")
        headers = {"user-agent": f"ccgate/{__version__}"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        if device_id is not None:
            headers[DEVICE_HEADER] = device_id
        if device is not None:
            headers[TOKEN_HEADER] = device_token(device)
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

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
        if response.status_code == 403:
            raise DeviceRefused(f"The ccgate server refused this device: {message}")
        raise ServerError(
            f"The ccgate server at {self.base_url} answered {response.status_code}: {message}"
        )

    def _object(self, response: httpx.Response, what: str) -> dict[str, Any]:
        """The JSON object a 2xx answer must carry; anything else is the server misbehaving
        (a proxy's error page, a truncated body), never a crash of the caller's loop."""
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ServerError(
                f"The ccgate server at {self.base_url} answered {what} with something that is "
                "not a JSON object; nothing was taken from it."
            )
        return data

    async def server_key(self) -> tuple[bytes, str]:
        data = self._object(await self._request("GET", "/v1/server-key"), "/v1/server-key")
        try:
            return base64.b64decode(data["public_key"]), str(data["fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise ServerError(
                f"{self.base_url} did not answer like a ccgate server (/v1/server-key)."
            ) from None

    async def register_device(
        self, *, device: DeviceKey, name: str, code: str | None = None
    ) -> tuple[str, str, str]:
        """Enrol ``device``: its id, the key's id, and "approved" or "pending"."""
        body = {
            "public_key": base64.b64encode(device.public_bytes).decode(),
            "name": name,
            "device_token": device_token(device),
        }
        if code:
            body["enrolment_code"] = code
        response = await self._request("POST", "/v1/devices", json=body, ok=(200, 201, 202))
        data = self._object(response, "/v1/devices")
        try:
            return str(data["device_id"]), str(data["key_id"]), str(data.get("status", "approved"))
        except (ValueError, KeyError, TypeError):
            raise ServerError(
                f"{self.base_url} did not answer like a ccgate server (/v1/devices)."
            ) from None

    async def fetch_bundle(self, *, etag: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """The envelope and its ETag; ``(None, etag)`` when unchanged (304)."""
        headers = {"if-none-match": etag} if etag else {}
        response = await self._request("GET", "/v1/bundle", headers=headers, ok=(200, 304))
        if response.status_code == 304:
            return None, etag
        return self._object(response, "a bundle poll"), response.headers.get("etag")

    async def request_lease(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", "/v1/leases", json=body, ok=(200, 201))
        data = self._object(response, "a lease request")
        lease = data.get("lease")
        well_formed = isinstance(data.get("unlimited", False), bool) and (
            lease is None
            or (
                isinstance(lease, dict)
                and isinstance(lease.get("id"), str)
                and isinstance(lease.get("granted_micros"), int)
                and not isinstance(lease.get("granted_micros"), bool)
                and isinstance(lease.get("expires_at"), int | float)
                and math.isfinite(lease["expires_at"])
            )
        )
        if not well_formed:
            raise ServerError(
                f"The ccgate server at {self.base_url} answered a lease request with a lease "
                "it cannot have meant; none was taken."
            )
        return data

    async def return_lease(self, lease_id: str) -> None:
        await self._request("POST", f"/v1/leases/{lease_id}/return", json={}, ok=(200, 404))

    async def push_usage(
        self, records: list[dict[str, Any]], *, key_failures: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Push a batch; returns only when the server accounts for every record in it (stored
        now or before), so the caller can mark them synced without losing one. Provider keys
        the upstream refused since the last push ride along (``key_failures``)."""
        body: dict[str, Any] = {"records": records}
        if key_failures:
            body["key_failures"] = key_failures
        response = await self._request("POST", "/v1/usage", json=body)
        data = self._object(response, "a usage push")
        accepted, duplicates = data.get("accepted"), data.get("duplicates")
        if (
            not isinstance(accepted, int)
            or not isinstance(duplicates, int)
            or accepted + duplicates != len(records)
        ):
            raise ServerError(
                f"The ccgate server at {self.base_url} did not confirm the {len(records)} "
                "usage record(s) pushed; they stay unsynced and are pushed again."
            )
        return data


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
