"""Issue #10, daemon side: access guards, slowloris, clocks, damaged state and secrets at rest."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ccgate.gateway._http import (
    HEADER_TIMEOUT_S,
    MAX_HEADER_BYTES,
    HeaderDeadlineProtocol,
    HttpToolsDeadlineProtocol,
    server_protocol,
)
from ccgate.gateway.governor import Governor
from ccgate.policy.bundle import BundleError, BundleStore, RollbackError, SigningKey
from ccgate.store.ledger import Ledger
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateways import standalone
from tests.support.harness import Isolated, ccgate, free_port, kill_pidfile_daemon, run_daemon
from tests.test_bundle import NOW, envelope_for

PORT = 7413
KEY = "sk-cg-" + "s" * 43
UPSTREAM_SECRET = "sk-ant-security-never-shown"

# --------------------------------------------------------------------------- keys and guards


def test_a_non_ascii_key_is_refused_by_the_server_mode_check_not_a_type_error() -> None:
    # hmac.compare_digest raises TypeError on a str with non-ASCII characters: the 500 of #10.
    me = types.SimpleNamespace(key="sk-cg-" + "v" * 43, key_id="k1")
    assert Governor.authenticate(me, "sk-cg-\xff\xfe") is None  # type: ignore[arg-type]
    assert Governor.authenticate(me, "sk-cg-wrong") is None  # type: ignore[arg-type]
    assert Governor.authenticate(me, me.key) == "k1"  # type: ignore[arg-type]


@pytest.fixture
async def client(tmp_path: Path) -> object:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_writer()
    gateway = standalone(
        port=PORT,
        ledger=ledger,
        upstream_url="http://127.0.0.1:9",
        upstream_key=UPSTREAM_SECRET,
        client_keys={KEY: "local"},
    )
    transport = httpx.ASGITransport(app=gateway.app())
    async with (
        gateway.lifespan(),
        httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as c,
    ):
        yield c
    ledger.close()


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/_ccgate/sync", "/_ccgate/health", "/v1/messages"])
@pytest.mark.parametrize(
    "headers",
    [
        {"host": "evil.example"},
        {"host": f"127.0.0.1:{PORT + 1}"},
        {"origin": "http://localhost:3000"},
        {"origin": "null"},
    ],
)
async def test_host_and_origin_guards_cover_the_local_endpoints(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    method = "GET" if path.endswith("health") else "POST"
    response = await client.request(method, path, headers={"x-api-key": KEY, **headers})
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


@pytest.mark.anyio
async def test_health_reveals_no_key_and_sync_is_harmless_without_one(
    client: httpx.AsyncClient,
) -> None:
    health = await client.get("/_ccgate/health")
    assert KEY not in health.text and UPSTREAM_SECRET not in health.text
    assert health.json()["ledger"]["ok"] is True
    sync = await client.post("/_ccgate/sync")
    assert sync.status_code == 200 and sync.json()["result"] == "nothing to sync"


# --------------------------------------------------------------------------- slowloris


class _FastDeadline(HeaderDeadlineProtocol):
    header_timeout_s = 1.0


class _FastDeadlineHttpTools(HttpToolsDeadlineProtocol):
    header_timeout_s = 1.0


def test_the_daemon_serves_with_httptools_where_it_is_installed() -> None:
    # httptools is a dependency; the h11 protocol is only the fallback without it.
    assert server_protocol() is HttpToolsDeadlineProtocol


@pytest.fixture(params=[_FastDeadline, _FastDeadlineHttpTools], ids=["h11", "httptools"])
def slow_server(request: pytest.FixtureRequest) -> Iterator[int]:
    async def hello(_request: Request) -> PlainTextResponse:
        await asyncio.sleep(1.5)  # a slow answer (a thinking pause) must not be cut
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(app, log_config=None, http=request.param, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _closed_by_peer(conn: socket.socket, *, within: float) -> bool:
    conn.settimeout(within)
    try:
        return conn.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slowloris_headers_are_cut_but_slow_answers_are_not(slow_server: int) -> None:
    dribbler = socket.create_connection(("127.0.0.1", slow_server))
    silent = socket.create_connection(("127.0.0.1", slow_server))
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
            try:
                dribbler.send(bytes([byte]))
            except OSError:
                break  # cut off mid-dribble, as it should be
            time.sleep(0.1)
        assert _closed_by_peer(dribbler, within=5)
        assert _closed_by_peer(silent, within=5)
        # A normal request whose answer takes longer than the header deadline is served.
        response = httpx.get(f"http://127.0.0.1:{slow_server}/", timeout=10)
        assert response.text == "hello"
    finally:
        dribbler.close()
        silent.close()


def test_the_deadline_rearms_for_the_next_request_on_a_kept_alive_connection(
    slow_server: int,
) -> None:
    with socket.create_connection(("127.0.0.1", slow_server)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.settimeout(10)
        answer = b""
        while not answer.endswith(b"hello"):
            answer += conn.recv(4096)
        # The 1.5 s answer outlived the 1 s deadline: it was not cut. Now dribble the next one.
        for byte in b"GET / HTTP/1.1\r\n":
            try:
                conn.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert _closed_by_peer(conn, within=5)


def test_oversized_headers_are_refused_and_the_connection_closed(slow_server: int) -> None:
    with socket.create_connection(("127.0.0.1", slow_server)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * (MAX_HEADER_BYTES + 1))
        conn.settimeout(5)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0] in (
        b"HTTP/1.1 431 Request Header Fields Too Large",  # httptools
        b"HTTP/1.1 400 Bad Request",  # h11: its incomplete-event limit
    )
    # A request with ordinary headers on a new connection is still served.
    assert httpx.get(f"http://127.0.0.1:{slow_server}/", timeout=10).text == "hello"


@pytest.mark.anyio
async def test_a_dribbled_body_gets_408_and_a_row(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ccgate.gateway import proxy

    monkeypatch.setattr(proxy, "_BODY_TIMEOUT_S", 0.5)

    async def dribble() -> AsyncIterator[bytes]:
        yield b'{"model": "claude-sonnet-4-6",'
        await asyncio.sleep(5)
        yield b'"max_tokens": 1}'

    response = await client.post("/v1/messages", content=dribble(), headers={"x-api-key": KEY})
    assert response.status_code == 408
    assert "did not arrive" in response.json()["error"]["message"]
    with Ledger(tmp_path / "ledger.db", readonly=True) as ledger:
        for _ in range(100):
            rows = ledger.records()
            if rows:
                break
            await asyncio.sleep(0.05)
    assert [(r.outcome, r.status) for r in rows] == [("rejected", 408)]


@pytest.mark.e2e
def test_the_real_daemon_drops_a_connection_that_never_finishes_its_headers(
    fake_upstream: FakeUpstream,
) -> None:
    with run_daemon(upstream_url=fake_upstream.url) as d:
        stalled = socket.create_connection(("127.0.0.1", d.port))
        try:
            stalled.sendall(b"GET /_ccgate/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert _closed_by_peer(stalled, within=HEADER_TIMEOUT_S + 10)
        finally:
            stalled.close()
        assert httpx.get(f"{d.url}/_ccgate/health", timeout=5).status_code == 200


# --------------------------------------------------------------------------- damaged bundle


def test_a_truncated_bundle_is_refused_clearly_and_keeps_the_rollback_floor(tmp_path: Path) -> None:
    key = SigningKey.generate()
    store = BundleStore(state_dir=tmp_path / "profiles" / "default", public_key=key.public_bytes)
    store.accept(envelope_for(key, version=42), now=NOW)
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as refused:
        store.load(now=NOW)
    assert str(store.path) in str(refused.value)
    with pytest.raises(RollbackError):  # the version record still holds the floor
        store.accept(envelope_for(key, version=41), now=NOW)
    assert store.accept(envelope_for(key, version=43), now=NOW).version == 43
    assert stat.S_IMODE((tmp_path / "profiles").stat().st_mode) == 0o700


def test_an_unreadable_version_record_does_not_advise_deleting_it(tmp_path: Path) -> None:
    key = SigningKey.generate()
    store = BundleStore(state_dir=tmp_path / "b", public_key=key.public_bytes)
    store.accept(envelope_for(key, version=42), now=NOW)
    store.version_path.write_bytes(b"{trunc")
    with pytest.raises(BundleError) as refused:
        store.load(now=NOW)
    message = str(refused.value)
    assert "Do not delete it" in message and "Delete it" not in message


# --------------------------------------------------------------------------- secrets at rest

OAUTH = "sk-ant-oat01-" + "r3st" * 20
PROVIDER_KEY = "sk-ant-api03-" + "pr0v" * 20


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _session(port: int, *extra: str, upstream: str, headers: dict[str, str]) -> None:
    result = ccgate("up", "--port", str(port), "--upstream", upstream, *extra)
    assert result.returncode == 0, result.stderr
    for stream in (False, True):
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={"model": "claude-sonnet-4-6", "max_tokens": 5, "stream": stream, "messages": []},
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 200, response.text
    assert ccgate("status").returncode == 0
    assert ccgate("down").returncode == 0


def test_secrets_at_rest_after_a_standalone_and_a_passthrough_session(
    isolated: Isolated,
) -> None:
    stored = ccgate("provider", "set", "anthropic", input=PROVIDER_KEY + "\n")
    assert stored.returncode == 0, stored.stderr
    settings = isolated.settings_file
    try:
        with FakeUpstream(api_key=PROVIDER_KEY) as provider:
            port = free_port()
            up = ccgate("up", "--port", str(port), "--upstream", provider.url)
            assert up.returncode == 0, up.stderr
            assert stat.S_IMODE(settings.stat().st_mode) == 0o600
            local_key = json.loads(settings.read_text())["env"]["ANTHROPIC_AUTH_TOKEN"]
            assert ccgate("down").returncode == 0
            _session(port, upstream=provider.url, headers={"authorization": f"Bearer {local_key}"})
        with FakeUpstream(api_key=OAUTH) as subscription:
            port = free_port()
            up = ccgate("up", "--passthrough", "--port", str(port), "--upstream", subscription.url)
            assert up.returncode == 0, up.stderr
            custom = json.loads(settings.read_text())["env"]["ANTHROPIC_CUSTOM_HEADERS"]
            ccgate_key = custom.split("x-ccgate-key:")[-1].strip().splitlines()[0].strip()
            assert ccgate("down").returncode == 0
            headers = {"authorization": f"Bearer {OAUTH}", "x-ccgate-key": ccgate_key}
            _session(port, "--passthrough", upstream=subscription.url, headers=headers)
    finally:
        ccgate("down")
        kill_pidfile_daemon(isolated.ccgate_home)
    secrets_file = isolated.ccgate_home / "secrets.json"
    leaks: dict[str, list[str]] = {}
    for path in _files_under(isolated.ccgate_home, isolated.home):
        if path.is_relative_to(isolated.home / ".config") or path == secrets_file:
            continue  # the keyring: here the 0600 fallback file, checked below
        data = path.read_bytes()
        for name, secret in (("provider", PROVIDER_KEY), ("local", local_key), ("oauth", OAUTH)):
            if secret.encode() in data:
                leaks.setdefault(name, []).append(str(path))
    assert leaks == {}
    # Where secrets do live by design: the keyring fallback, owner-only.
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert OAUTH.encode() not in secrets_file.read_bytes()
    # The state folder is 0700 and every file in it 0600.
    assert stat.S_IMODE(isolated.ccgate_home.stat().st_mode) == 0o700
    loose = {
        str(p): oct(stat.S_IMODE(p.stat().st_mode))
        for p in _files_under(isolated.ccgate_home)
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    }
    assert loose == {}
    written = {p.name for p in _files_under(isolated.ccgate_home)}
    assert {"daemon.log", "secrets-fallback-noticed", "ledger.db"} <= written  # all checked


UNUSUAL_SETTINGS = [
    pytest.param(b'\xef\xbb\xbf{\r\n  "theme": "dark"\r\n}\r\n', id="bom-crlf"),
    pytest.param(b'{\n\t"env": {\n\t\t"FOO": "b\\u00e4r"\n\t}\n}', id="tabs-escapes-no-newline"),
    pytest.param(
        (
            '{"env":{"ANTHROPIC_BASE_URL":"https://corp.example","ANTHROPIC_MODEL":"opus",'
            '"ANTHROPIC_CUSTOM_HEADERS":"X-Team: blue"},"permissions":{"allow":[]},'
            '"h\u00e9":"\u2603"}'
        ).encode(),
        id="our-variables-already-set-compact-unicode",
    ),
    pytest.param(b"   \n", id="blank"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("original", UNUSUAL_SETTINGS)
@pytest.mark.parametrize("passthrough", [False, True], ids=["standalone", "passthrough"])
def test_unusual_settings_files_round_trip_through_the_real_up_and_down(
    isolated: Isolated, fake_upstream: FakeUpstream, original: bytes, passthrough: bool
) -> None:
    settings = isolated.settings_file
    settings.parent.mkdir()
    settings.write_bytes(original)
    settings.chmod(0o644)
    extra = ["--passthrough"] if passthrough else []
    env = dict(os.environ)
    if not passthrough:  # passthrough refuses an API key in the environment, rightly
        env["ANTHROPIC_API_KEY"] = PROVIDER_KEY
    try:
        up = ccgate(
            "up", "--port", str(free_port()), "--upstream", fake_upstream.url, *extra, env=env
        )
        assert up.returncode == 0, up.stderr
        assert settings.read_bytes() != original
        assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    finally:
        down = ccgate("down", env=env)
        kill_pidfile_daemon(isolated.ccgate_home)
    assert down.returncode == 0, down.stderr
    assert settings.read_bytes() == original


def test_every_test_the_daemon_threat_model_names_exists() -> None:
    import ast
    import re

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "security.md").read_text(encoding="utf-8")
    section = text.split("## Threat model: the daemon and the laptop", 1)[1].split("\n## ", 1)[0]
    named: list[tuple[str, str]] = []
    current = ""
    for file, name in re.findall(r"`(test_\w+\.py)?::(\w+)`", section):
        current = file or current
        named.append((current, name))
    assert len(named) > 30
    missing = []
    for file, name in named:
        tree = ast.parse((repo / "tests" / file).read_text(encoding="utf-8"))
        functions = (ast.FunctionDef, ast.AsyncFunctionDef)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, functions)}
        if name not in defined:
            missing.append(f"{file}::{name}")
    assert missing == []
