"""Anthropic's own gateway (``claude gateway`` in Claude Code) as a comparison target, offline.

It needs what a real deployment has, all on 127.0.0.1:

- a PostgreSQL for its device grants and spend counters (``bench.pg``: a throw-away cluster);
- an OpenID Connect provider: ``FakeOidc`` below serves discovery, JWKS, an authorize endpoint
  that approves at once, token and userinfo endpoints, and RS256 id_tokens signed with a key
  made for the run (``cryptography``). ``CLAUDE_GATEWAY_ALLOW_LOOPBACK=1`` lets the gateway
  talk to an issuer on loopback;
- ``gateway.yaml``: listen, oidc, session, store, one ``anthropic`` upstream at the fake, and an
  ``admin`` block (a write key) so its spend-limit API is on; the bench then sets an
  organization-wide monthly cap, so every request passes the spend check, as in production.

A developer token comes from the device flow with no browser: ``POST /oauth/device_authorization``,
``POST /device`` with the user code and ``sec-fetch-site: same-origin``, the redirects through the
provider to ``/oauth/callback`` keeping the cookie, then ``POST /oauth/token`` with the
device-code grant. Clients send that token as a Bearer, as Claude Code does after ``/login``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.processes import REPO, UPSTREAM_KEY, BenchError, Service, free_port, spawn, stop
from bench.processes import wait_http as _wait_http

# Where Claude Code is installed: tests/claude (scripts/test installs it there), or a copy the
# bench installed itself with `npm ci` from the same lock file (bench/.claude-code), or a path
# given in CCGATE_BENCH_CLAUDE.
_CANDIDATES = (
    REPO / "tests" / "claude" / "node_modules" / ".bin" / "claude",
    REPO / "bench" / ".claude-code" / "node_modules" / ".bin" / "claude",
)


def _claude() -> Path:
    given = os.environ.get("CCGATE_BENCH_CLAUDE")
    if given:
        return Path(given)
    for candidate in _CANDIDATES:
        if candidate.exists():  # follows the symlink; a dangling one does not count
            return candidate
    return _CANDIDATES[0]


CLAUDE = _claude()
CLIENT_ID = "ccgate-bench-gateway"
DEVICE_CLIENT_ID = "claude-code"  # the client id Claude Code itself uses in the device flow
USER_EMAIL = "dev@example.com"
SPEND_CAP_CENTS = "100000000"  # $1,000,000 a month: on, never reached


def installed() -> bool:
    return CLAUDE.exists()


def version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [str(CLAUDE), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() or None
    return None


# -- the fake identity provider -----------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class FakeOidc:
    """A minimal OpenID provider that signs in one user, with no questions asked."""

    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.client_secret = secrets.token_urlsafe(24)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(8)
        self._codes: dict[str, dict[str, Any]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOidc:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def discovery(self) -> dict[str, Any]:
        i = self.issuer
        return {
            "issuer": i,
            "authorization_endpoint": f"{i}/authorize",
            "token_endpoint": f"{i}/token",
            "userinfo_endpoint": f"{i}/userinfo",
            "jwks_uri": f"{i}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256", "plain"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid", "email", "profile", "groups"],
            "claims_supported": ["sub", "email", "email_verified", "groups", "name"],
        }

    def jwks(self) -> dict[str, Any]:
        numbers = self._key.public_key().public_numbers()
        jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self._kid}
        jwk.update(n=_int_b64(numbers.n), e=_int_b64(numbers.e))
        return {"keys": [jwk]}

    def _claims(self) -> dict[str, Any]:
        return {
            "sub": "bench-user-1",
            "email": USER_EMAIL,
            "email_verified": True,
            "name": "Bench Developer",
            "groups": ["engineering"],
        }

    def id_token(self, *, nonce: str | None, audience: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": audience, "iat": now, "exp": now + 3600}
        claims.update(self._claims())
        if nonce:
            claims["nonce"] = nonce
        header = {"alg": "RS256", "typ": "JWT", "kid": self._kid}
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64url(signature)}"

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        oidc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _json(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/.well-known/openid-configuration":
                    self._json(oidc.discovery())
                elif url.path == "/jwks":
                    self._json(oidc.jwks())
                elif url.path == "/authorize":
                    code = secrets.token_urlsafe(16)
                    oidc._codes[code] = query
                    back = {"code": code, "iss": oidc.issuer}
                    if "state" in query:
                        back["state"] = query["state"]
                    self.send_response(302)
                    self.send_header("location", f"{query['redirect_uri']}?{urlencode(back)}")
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif url.path == "/userinfo":
                    self._json(oidc._claims())
                else:
                    self._json({"error": "not_found"}, 404)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if urlsplit(self.path).path != "/token":
                    self._json({"error": "not_found"}, 404)
                    return
                asked = oidc._codes.pop(form.get("code", ""), None)
                if asked is None:
                    self._json({"error": "invalid_grant"}, 400)
                    return
                self._json(
                    {
                        "access_token": secrets.token_urlsafe(24),
                        "token_type": "Bearer",
                        "expires_in": 3600,
                        "id_token": oidc.id_token(
                            nonce=asked.get("nonce"), audience=asked.get("client_id", CLIENT_ID)
                        ),
                        "scope": asked.get("scope", "openid email"),
                    }
                )

        return Handler


# -- the gateway --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    service: Service
    token: str  # a developer's bearer token, from the device flow


def _config(
    *, port: int, oidc: FakeOidc, postgres_url: str, upstream_url: str, write_key: str
) -> str:
    base = f"http://127.0.0.1:{port}"
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "public_url": base},
        "oidc": {
            "issuer": oidc.issuer,
            "client_id": CLIENT_ID,
            "client_secret": oidc.client_secret,
        },
        "session": {"jwt_secret": secrets.token_urlsafe(48), "ttl_hours": 8},
        "store": {"postgres_url": postgres_url},
        "upstreams": [
            {"provider": "anthropic", "base_url": upstream_url, "auth": {"api_key": UPSTREAM_KEY}}
        ],
        "admin": {"write_keys": [{"id": "bench", "key": write_key}]},
    }
    return json.dumps(config, indent=2)  # JSON is YAML


@contextlib.contextmanager
def gateway(
    *,
    upstream_url: str,
    postgres_url: str,
    env: Mapping[str, str],
    work: Path,
    timeout: float = 90.0,
) -> Iterator[Gateway]:
    """A running ``claude gateway`` with spend limits on, and a signed-in developer's token."""
    if not installed():
        raise BenchError(f"No Claude Code binary at {CLAUDE}.")
    with FakeOidc() as oidc:
        port = free_port()
        write_key = secrets.token_hex(24)
        config = work / "gateway.yaml"
        config.write_text(
            _config(
                port=port,
                oidc=oidc,
                postgres_url=postgres_url,
                upstream_url=upstream_url,
                write_key=write_key,
            ),
            encoding="utf-8",
        )
        config.chmod(0o600)
        child = dict(env)
        child["CLAUDE_GATEWAY_ALLOW_LOOPBACK"] = "1"
        child.pop("ANTHROPIC_API_KEY", None)
        log = work / "claude-gateway.log"
        process = spawn(
            command=[str(CLAUDE), "gateway", "--config", str(config)], env=child, log=log
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_http(base + "/healthz", process, log, name="claude gateway", timeout=timeout)
            service = Service(name="claude gateway", url=base, process=process, log=log)
            try:
                _set_spend_limit(base, write_key)
                token = device_login(base)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                raise BenchError(
                    f"claude gateway sign-in failed: {exc!r}\n{service.log_tail(20)}"
                ) from None
            yield Gateway(service=service, token=token)
        finally:
            stop(process)


def _set_spend_limit(base: str, write_key: str) -> None:
    response = httpx.post(
        base + "/v1/organizations/spend_limits",
        headers={"x-api-key": write_key, "content-type": "application/json"},
        json={"scope": {"type": "organization"}, "amount": SPEND_CAP_CENTS, "period": "monthly"},
        timeout=10,
        trust_env=False,
    )
    if response.status_code >= 300:
        raise BenchError(f"Setting the spend limit: HTTP {response.status_code}: {response.text}")
    # Read it back: the cap must be live before any measured request, or the gateway would be
    # measured without its spend check.
    listed = httpx.get(
        base + "/v1/organizations/spend_limits",
        headers={"x-api-key": write_key},
        timeout=10,
        trust_env=False,
    ).json()
    caps = [c for c in listed.get("data", []) if c.get("amount") == SPEND_CAP_CENTS]
    if not caps:
        raise BenchError(f"The gateway does not list the spend limit it was given: {listed}")


def device_login(base: str) -> str:
    """The device flow of ``claude /login``, with the browser's part done here."""
    with httpx.Client(base_url=base, timeout=15, trust_env=False) as http:
        meta = http.get("/.well-known/oauth-authorization-server").json()
        grant = http.post(
            meta["device_authorization_endpoint"], data={"client_id": DEVICE_CLIENT_ID}
        )
        grant.raise_for_status()
        device_code, user_code = grant.json()["device_code"], grant.json()["user_code"]
        http.get("/device", params={"user_code": user_code})  # sets the page's cookie
        confirm = http.post(
            "/device",
            data={"user_code": user_code},
            headers={
                "origin": base,
                "referer": f"{base}/device?user_code={user_code}",
                "sec-fetch-site": "same-origin",
            },
        )
        location = confirm.headers.get("location")
        if confirm.status_code not in (302, 303) or not location:
            raise BenchError(f"POST /device did not redirect (HTTP {confirm.status_code}).")
        # Through the provider (auto-approving) and back to /oauth/callback, cookie kept: the
        # client's jar sends it to the gateway only, as a browser would.
        for _ in range(10):
            step = http.get(location)
            location = step.headers.get("location")
            if step.status_code not in (301, 302, 303, 307) or not location:
                break
        for _ in range(20):
            token = http.post(
                meta["token_endpoint"],
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                    "device_code": device_code,
                    "client_id": DEVICE_CLIENT_ID,
                },
            )
            body = token.json()
            if "access_token" in body:
                return str(body["access_token"])
            time.sleep(0.5)
        raise BenchError(f"The device-code grant never succeeded: {body}")
