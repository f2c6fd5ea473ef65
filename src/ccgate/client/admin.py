"""The admin API seen from the command line: one small httpx client for ``/admin/v1``.

The client knows the routes of docs/protocol.md and nothing about rendering. Server errors arrive
in the gateway's error envelope; their message is already written for a person, so it is raised
as ``AdminClientError`` with the HTTP status in front. A 401 adds where the token comes from.
The admin token is never part of a message or a repr.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from ccgate import env
from ccgate._format import iso_utc
from ccgate.errors import CcgateError, ExitCode

if TYPE_CHECKING:
    # httpx costs 35 ms to import; `ccgate --help` imports this module for its constants.
    import httpx

CCGATE_SERVER_URL: Final = env.CCGATE_SERVER_URL
"""The ccgate server the admin CLI talks to."""

CCGATE_ADMIN_TOKEN: Final = env.CCGATE_ADMIN_TOKEN
"""The admin token `ccgate server init` printed."""

DEFAULT_SERVER_URL: Final = "http://127.0.0.1:8790"
ADMIN_PREFIX: Final = "/admin/v1"
_TIMEOUT_S: Final = 30.0


class AdminClientError(CcgateError):
    """The server refused an admin request, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnavailableError(AdminClientError):
    exit_code = ExitCode.UNAVAILABLE


class AdminClient:
    def __init__(
        self,
        *,
        base_url: str,
        token: str | None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not token:
            raise AdminClientError(
                f"No admin token: pass --admin-token or set {CCGATE_ADMIN_TOKEN} to the token "
                "`ccgate server init` printed."
            )
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url + ADMIN_PREFIX,
            headers={"authorization": f"Bearer {token}"},
            timeout=_TIMEOUT_S,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"AdminClient(base_url={self.base_url!r})"

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int | float] | None = None,
    ) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise ServerUnavailableError(
                f"Cannot reach the ccgate server at {self.base_url} ({type(exc).__name__}); "
                f"check --server / {CCGATE_SERVER_URL} and that `ccgate server run` is up."
            ) from None
        if response.is_success:
            return response.json()
        raise self._error(response)

    def _error(self, response: httpx.Response) -> AdminClientError:
        try:
            message = str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        if response.status_code == 401:
            message += f" (check --admin-token / {CCGATE_ADMIN_TOKEN})"
        return AdminClientError(
            f"The server answered {response.status_code}: {message}", status=response.status_code
        )

    # ------------------------------------------------------------ routes

    def providers(self) -> Any:
        return self.request("GET", "/providers")

    def add_provider(self, body: Mapping[str, Any]) -> Any:
        return self.request("POST", "/providers", json=dict(body))

    def remove_provider(self, name: str, *, provider_id: str | None = None) -> Any:
        params = {"id": provider_id} if provider_id else None
        return self.request("DELETE", f"/providers/{quote(name, safe='')}", params=params)

    def update_provider(
        self, name: str, body: Mapping[str, Any], *, provider_id: str | None = None
    ) -> Any:
        params = {"id": provider_id} if provider_id else None
        path = f"/providers/{quote(name, safe='')}"
        return self.request("PATCH", path, json=dict(body), params=params)

    def customers(self) -> Any:
        return self.request("GET", "/customers")

    def create_customer(self, body: Mapping[str, Any]) -> Any:
        return self.request("POST", "/customers", json=dict(body))

    def teams(self) -> Any:
        return self.request("GET", "/teams")

    def create_team(self, body: Mapping[str, Any]) -> Any:
        return self.request("POST", "/teams", json=dict(body))

    def update_team(self, name: str, body: Mapping[str, Any]) -> Any:
        return self.request("PATCH", f"/teams/{quote(name, safe='')}", json=dict(body))

    def seats(self) -> Any:
        return self.request("GET", "/seats")

    def keys(self) -> Any:
        return self.request("GET", "/keys")

    def key(self, name: str) -> Any:
        return self.request("GET", f"/keys/{quote(name, safe='')}")

    def create_key(self, body: Mapping[str, Any]) -> Any:
        return self.request("POST", "/keys", json=dict(body))

    def update_key(self, name: str, body: Mapping[str, Any]) -> Any:
        return self.request("PATCH", f"/keys/{quote(name, safe='')}", json=dict(body))

    def revoke_key(self, name: str) -> Any:
        return self.request("POST", f"/keys/{quote(name, safe='')}/revoke")

    def prices(self) -> Any:
        return self.request("GET", "/prices")

    def set_prices(self, table: Mapping[str, Any]) -> Any:
        return self.request("PUT", "/prices", json={"prices": dict(table)})

    def clear_prices(self) -> Any:
        return self.request("DELETE", "/prices")

    def usage(self, *, by: str, since: float) -> Any:
        data = self.request("GET", "/usage", params={"by": by, "since": since})
        epoch = data.get("since") if isinstance(data, dict) else None
        if isinstance(epoch, int | float):
            # ISO 8601 as the local `ccgate usage --json` writes it; the epoch stays beside it.
            data = {**data, "since": iso_utc(epoch), "since_epoch": epoch}
        return data

    def daily_usage(self, *, since: float, until: float) -> Any:
        return self.request("GET", "/usage/daily", params={"since": since, "until": until})

    def audit(self, *, limit: int) -> Any:
        return self.request("GET", "/audit", params={"limit": limit})

    def report(self, *, period: str, by: str) -> Any:
        return self.request("GET", "/report", params={"period": period, "by": by})

    def report_csv(self, *, period: str, by: str) -> str:
        import httpx

        params = {"period": period, "by": by, "format": "csv"}
        try:
            response = self._http.get("/report", params=params)
        except httpx.HTTPError as exc:
            raise ServerUnavailableError(
                f"Cannot reach the ccgate server at {self.base_url} ({type(exc).__name__})."
            ) from None
        if not response.is_success:
            raise self._error(response)
        return response.text

    def alerts(self) -> Any:
        return self.request("GET", "/alerts")

    def add_alert(self, body: Mapping[str, Any]) -> Any:
        return self.request("POST", "/alerts", json=dict(body))

    def remove_alert(self, alert_id: str) -> Any:
        return self.request("DELETE", f"/alerts/{quote(alert_id, safe='')}")

    def tokens(self) -> Any:
        return self.request("GET", "/tokens")

    def create_token(self, name: str, *, role: str) -> Any:
        return self.request("POST", "/tokens", json={"name": name, "role": role})

    def revoke_token(self, name: str) -> Any:
        return self.request("POST", f"/tokens/{quote(name, safe='')}/revoke")

    def devices(self, *, key: str | None = None, status: str | None = None) -> Any:
        params = {k: v for k, v in (("key", key), ("status", status)) if v is not None}
        return self.request("GET", "/devices", params=params or None)

    def approve_device(self, device_id: str) -> Any:
        return self.request("POST", f"/devices/{quote(device_id, safe='')}/approve")

    def revoke_device(self, device_id: str) -> Any:
        return self.request("POST", f"/devices/{quote(device_id, safe='')}/revoke")


# ------------------------------------------------------------ turning CLI text into API values


def budget_body(usd: str | None, *, period: str | None, rolling: bool) -> dict[str, Any] | None:
    """``--budget USD --period P [--rolling]`` as a Budget object; dollars to micros exactly."""
    from ccgate.accounting.periods import parse_period
    from ccgate.accounting.pricing import usd_micros

    if usd is None:
        if period is not None or rolling:
            raise AdminClientError("--period and --rolling need --budget USD.")
        return None
    if period is None:
        raise AdminClientError("--budget needs --period (1d, 1w or 1M).")
    micros = usd_micros(usd, option="--budget")
    return {"limit_micros": micros, "period": parse_period(period), "rolling": rolling}


def token_budget_body(tokens: str, *, period: str | None, rolling: bool) -> dict[str, Any]:
    """``--token-budget N --period P [--rolling]`` as a TokenBudget object."""
    from ccgate.accounting.periods import parse_period

    if period is None:
        raise AdminClientError("--token-budget needs --period (1d, 1w or 1M).")
    text = tokens.strip().replace("_", "").replace(",", "")
    if not text.isdigit():
        raise AdminClientError(
            f"--token-budget {tokens!r} must be a whole number of tokens, like 2000000."
        )
    return {"limit_tokens": int(text), "period": parse_period(period), "rolling": rolling}


def parse_expiry(text: str) -> float | None:
    """``YYYY-MM-DD`` or an ISO date-time (naive means UTC) as epoch seconds; ``never`` is None."""

    if text.strip().lower() in ("never", "none"):
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AdminClientError(
            f"Cannot read expiry {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC), or never."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def models_list(text: str) -> list[str]:
    """``m1,m2`` as a list; an empty string means every model."""
    return [m.strip() for m in text.split(",") if m.strip()]
