"""Bedrock and Vertex providers end to end: a real ccgate daemon (standalone, `--provider`) in
front of each fake, with the official anthropic SDK and the real Claude Code CLI as clients.

The fakes check what the real services check (a SigV4 signature recomputed with the secret; a
Google token issued by the token endpoint to a signed service-account assertion), so these runs
prove the request ccgate builds, the credentials it finds on the machine (the shared AWS
credentials file, GOOGLE_APPLICATION_CREDENTIALS), the stream it translates, and the ledger row
it writes: the provider, the model that served (a Bedrock regional profile priced +10%), the
cost to the micro-dollar.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from typer.testing import CliRunner

from ccgate import paths
from ccgate.cli import app
from ccgate.machine import config
from tests.support.fake_bedrock import ACCESS_KEY, REGION, SECRET_KEY, FakeBedrock
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.fake_vertex import LOCATION, PROJECT, FakeVertex
from tests.support.harness import (
    CLAUDE_BIN,
    UPSTREAM_KEY,
    Daemon,
    Isolated,
    ccgate,
    free_port,
    kill_pidfile_daemon,
    run_claude,
    run_daemon,
    run_server,
)

pytestmark = pytest.mark.e2e

USAGE = Usage(input_tokens=2000, output_tokens=300, cache_read_input_tokens=10000)
# Opus 5.5 per token: $4 in, $20 out, $0.20 cache read per MTok, in micro-dollars.
OPUS_COST = 2000 * 4 + 300 * 20 + 10000 * 0.2  # 16000
BEDROCK_FLAGS = (
    "--provider",
    "bedrock",
    "--provider-option",
    f"region={REGION}",
    "--provider-option",
    "profile_prefix=us",
)
VERTEX_FLAGS = (
    "--provider",
    "vertex",
    "--provider-option",
    f"project={PROJECT}",
    "--provider-option",
    f"location={LOCATION}",
)


@pytest.fixture(autouse=True)
def cloud_credentials(isolated: Isolated, monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's cloud credentials, where the standard chains look: ~/.aws/credentials."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws = isolated.home / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )


@pytest.fixture
def bedrock() -> Iterator[FakeBedrock]:
    with FakeBedrock() as fake:
        yield fake


@pytest.fixture
def vertex(isolated: Isolated, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVertex]:
    with FakeVertex() as fake:
        key = fake.service_account(isolated.home / "vertex-sa.json")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
        yield fake


def rows(count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        result = CliRunner().invoke(app, ["logs", "--json"])
        assert result.exit_code == 0, result.output
        found = [r for r in json.loads(result.stdout) if r["outcome"] != "pending"]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["started_at"])
        time.sleep(0.05)


def sdk(daemon: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=daemon.key, base_url=daemon.url, max_retries=0)


def ask(client: anthropic.Anthropic, *, stream: bool) -> tuple[str, anthropic.types.Usage]:
    kwargs: Any = {
        "model": "claude-opus-5-5",
        "max_tokens": 500,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    block = message.content[0]
    assert block.type == "text"
    return block.text, message.usage


# ---------------------------------------------------------------------------- Bedrock


def test_bedrock_serves_the_sdk_streamed_and_not_and_bills_the_regional_profile(
    bedrock: FakeBedrock,
) -> None:
    bedrock.default = Scenario(text="hello from bedrock", usage=USAGE, message_deltas=2)
    with run_daemon(upstream_url=bedrock.url, extra_args=BEDROCK_FLAGS, upstream_key=None) as d:
        client = sdk(d)
        for stream in (True, False):
            text, usage = ask(client, stream=stream)
            assert text == "hello from bedrock"
            assert (usage.input_tokens, usage.output_tokens) == (2000, 300)
        assert (
            client.messages.count_tokens(
                model="claude-opus-5-5", messages=[{"role": "user", "content": "hi"}]
            ).input_tokens
            == 12000
        )
        listed = {m.id for m in client.models.list()}
        assert "claude-opus-5-5" in listed
    paths = [r.path for r in bedrock.requests]
    assert paths == [
        "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream",
        "/model/us.anthropic.claude-opus-5-5/invoke",
        "/model/us.anthropic.claude-opus-5-5/count-tokens",
    ]
    messages = [r for r in rows(4) if r["path"] == "/v1/messages"]
    assert len(messages) == 2
    for row in messages:
        assert row["outcome"] == "ok" and row["status"] == 200
        assert row["provider"] == "bedrock"
        assert row["model"] == "us.anthropic.claude-opus-5-5"
        # A regional inference profile: Opus 5.5 list price + 10%.
        assert row["cost_micros"] == round(OPUS_COST * 1.1)


def test_bedrock_stream_exceptions_and_bad_frames_reach_the_client_as_anthropic_errors(
    bedrock: FakeBedrock,
) -> None:
    bedrock.enqueue(
        Scenario(stream_error_after=3, error_type="overloaded_error", error_message="busy"),
        Scenario(status=429),
        Scenario(),
    )
    with run_daemon(upstream_url=bedrock.url, extra_args=BEDROCK_FLAGS, upstream_key=None) as d:
        client = sdk(d)
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            ask(client, stream=True)
        assert "busy" in str(overloaded.value)
        with pytest.raises(anthropic.RateLimitError):
            ask(client, stream=True)
        bedrock.corrupt_frame = 4
        with pytest.raises(anthropic.APIStatusError, match="ChecksumMismatch"):
            ask(client, stream=True)
    found = rows(3)
    assert [r["outcome"] for r in found] == ["upstream_error"] * 3
    assert [r["status"] for r in found] == [200, 429, 200]
    assert all(r["provider"] == "bedrock" for r in found)


def test_bedrock_refuses_a_wrong_secret_and_ccgate_says_so(
    bedrock: FakeBedrock, isolated: Isolated
) -> None:
    (isolated.home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = not-the-secret\n"
    )
    with run_daemon(upstream_url=bedrock.url, extra_args=BEDROCK_FLAGS, upstream_key=None) as d:
        with pytest.raises(anthropic.AuthenticationError, match="signature we calculated"):
            ask(sdk(d), stream=False)
    (row,) = rows(1)
    assert (row["status"], row["outcome"]) == (401, "upstream_error")


def test_bedrock_without_aws_credentials_is_a_clear_502_and_a_row(
    bedrock: FakeBedrock, isolated: Isolated
) -> None:
    (isolated.home / ".aws" / "credentials").unlink()
    with run_daemon(upstream_url=bedrock.url, extra_args=BEDROCK_FLAGS, upstream_key=None) as d:
        with pytest.raises(anthropic.InternalServerError, match="found no AWS credentials"):
            ask(sdk(d), stream=True)
    assert bedrock.requests == []
    (row,) = rows(1)
    assert (row["status"], row["provider"]) == (502, "bedrock")


# ---------------------------------------------------------------------------- Vertex


def test_vertex_serves_the_sdk_streamed_and_not(vertex: FakeVertex) -> None:
    vertex.default = Scenario(text="hello from vertex", usage=USAGE)
    with run_daemon(upstream_url=vertex.url, extra_args=VERTEX_FLAGS, upstream_key=None) as d:
        client = sdk(d)
        for stream in (True, False):
            text, usage = ask(client, stream=stream)
            assert text == "hello from vertex"
            assert usage.cache_read_input_tokens == 10000
    base = (
        f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/anthropic/models/claude-opus-5-5"
    )
    api = [r for r in vertex.requests if r.path != "/token"]
    assert [r.path for r in api] == [f"{base}:streamRawPredict", f"{base}:rawPredict"]
    assert len(vertex.issued) == 1  # one token, reused
    found = rows(2)
    for row in found:
        assert (row["outcome"], row["provider"], row["model"]) == (
            "ok",
            "vertex",
            "claude-opus-5-5",
        )
        assert row["cost_micros"] == OPUS_COST


# ---------------------------------------------------------------------------- Claude Code


def claude_code_through(isolated: Isolated, upstream_url: str, flags: tuple[str, ...]) -> Any:
    """`ccgate up` with a cloud provider (no Anthropic key anywhere), then a real `claude -p`."""
    assert CLAUDE_BIN.exists(), "run scripts/test: it installs the Claude Code CLI"
    env = dict(os.environ)
    result = ccgate("up", "--port", str(free_port()), "--upstream", upstream_url, *flags, env=env)
    assert result.returncode == 0, result.stderr
    remembered = config.load(paths.resolve())  # for the next plain `ccgate up`
    assert (remembered.provider, remembered.upstream_url) == (flags[1], upstream_url)
    assert remembered.provider_options == dict(o.split("=") for o in flags[3::2])
    try:
        # status names the kind, and does not warn of a missing key: the machine's cloud
        # credentials sign.
        status = ccgate("status", env=env)
        assert f"({flags[1]})" in status.stdout and "no upstream key" not in status.stdout
        report = json.loads(ccgate("status", "--json", env=env).stdout)
        assert (report["provider_kind"], report["upstream_key"]) == (flags[1], True)
        return run_claude("say hi", model="claude-opus-5-5")
    finally:
        ccgate("down", env=env)
        kill_pidfile_daemon(isolated.ccgate_home)


def test_claude_code_runs_through_a_bedrock_provider(
    bedrock: FakeBedrock, isolated: Isolated
) -> None:
    bedrock.default = Scenario(text="hi from bedrock", usage=USAGE)
    code, result = claude_code_through(isolated, bedrock.url, BEDROCK_FLAGS)
    assert code == 0, result
    assert (result["is_error"], result["result"]) == (False, "hi from bedrock")
    invoked = [r for r in bedrock.requests if r.path.endswith("/invoke-with-response-stream")]
    assert (
        invoked
        and invoked[0].path == "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream"
    )
    sent = invoked[0].json
    assert sent is not None and "model" not in sent and "stream" not in sent
    assert sent["anthropic_version"] == "bedrock-2023-05-31"
    assert sent["anthropic_beta"]  # Claude Code's betas, moved from the header into the body
    assert invoked[0].headers["user-agent"].startswith("claude-cli/2.1.332")
    messages = [r for r in rows(1) if r["path"] == "/v1/messages"]
    assert len(messages) == len([r for r in bedrock.requests if "/invoke" in r.path])
    row = messages[0]
    assert (row["outcome"], row["provider"], row["model"]) == (
        "ok",
        "bedrock",
        "us.anthropic.claude-opus-5-5",
    )
    assert row["cost_micros"] == round(OPUS_COST * 1.1)


def test_claude_code_runs_through_a_vertex_provider(vertex: FakeVertex, isolated: Isolated) -> None:
    vertex.default = Scenario(text="hi from vertex", usage=USAGE)
    code, result = claude_code_through(isolated, vertex.url, VERTEX_FLAGS)
    assert code == 0, result
    assert (result["is_error"], result["result"]) == (False, "hi from vertex")
    api = [r for r in vertex.requests if r.path.endswith(":streamRawPredict")]
    assert (
        api and api[0].json is not None and api[0].json["anthropic_version"] == "vertex-2023-10-16"
    )
    assert "anthropic-beta" in api[0].headers
    messages = [r for r in rows(1) if r["path"] == "/v1/messages"]
    row = messages[0]
    assert (row["outcome"], row["provider"], row["model"]) == ("ok", "vertex", "claude-opus-5-5")
    assert row["cost_micros"] == OPUS_COST


def test_up_remembers_the_provider_and_refuses_bad_options(isolated: Isolated) -> None:
    result = ccgate("up", "--provider", "bedrock", env=dict(os.environ))
    assert result.returncode != 0
    assert "needs the option 'region'" in result.stderr
    result = ccgate(
        "up", "--provider", "bedrock", "--provider-option", "colour=blue", env=dict(os.environ)
    )
    assert "takes no option 'colour'" in result.stderr
    assert not paths.resolve().config_file.exists()  # nothing remembered


# ---------------------------------------------------------------------------- server mode


def test_server_mode_a_keyless_bedrock_provider_serves_claude_code(
    bedrock: FakeBedrock, developer: Isolated, tmp_path: Path
) -> None:
    """The admin adds Bedrock with flags and no key; the developer's daemon signs with the
    machine's AWS credentials and the row names the pool and the regional profile."""
    bedrock.default = Scenario(text="hi via the server's bedrock", usage=USAGE)
    with run_server(tmp_path / "server") as server:
        added = server.admin_json(
            "providers",
            "add",
            "aws",
            "--kind",
            "bedrock",
            "--region",
            REGION,
            "--profile-prefix",
            "us",
            "--base-url",
            bedrock.url,
        )
        assert added["options"] == {"region": REGION, "profile_prefix": "us"}
        key = server.admin_json("keys", "create", "ann")["key"]
        login = ccgate(
            "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
        )
        assert login.returncode == 0, login.stderr
        started = ccgate("up", "--port", str(free_port()))
        assert started.returncode == 0, started.stderr
        code, result = run_claude("say hi", model="claude-opus-5-5")
    assert code == 0, result
    assert result["result"] == "hi via the server's bedrock"
    assert (
        bedrock.requests[0].path
        == "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream"
    )
    row = next(r for r in rows(1) if r["path"] == "/v1/messages")
    assert (row["outcome"], row["provider"], row["model"]) == (
        "ok",
        "aws",
        "us.anthropic.claude-opus-5-5",
    )
    assert row["cost_micros"] == round(OPUS_COST * 1.1)


def test_foundry_is_the_anthropic_wire_with_the_key_in_both_headers(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.default = Scenario(text="hello from foundry", usage=USAGE)
    flags = ("--provider", "foundry", "--model-map", "claude-opus-5-5=opus-prod-deployment")
    with run_daemon(upstream_url=fake_upstream.url, extra_args=flags) as d:
        text, _usage = ask(sdk(d), stream=True)
    assert text == "hello from foundry"
    (sent,) = [r for r in fake_upstream.requests if r.path == "/v1/messages"]
    assert sent.headers["x-api-key"] == sent.headers["api-key"] == UPSTREAM_KEY
    assert sent.json is not None and sent.json["model"] == "opus-prod-deployment"
    (row,) = rows(1)
    assert (row["outcome"], row["provider"]) == ("ok", "foundry")


def test_claude_code_falls_back_to_invoke_after_a_bedrock_stream_exception(
    bedrock: FakeBedrock, isolated: Isolated
) -> None:
    """A modelStreamErrorException mid-stream reaches Claude Code as Anthropic's error event, so
    it retries without streaming, which goes to InvokeModel; both rows are accounted."""
    bedrock.enqueue(
        Scenario(stream_error_after=2, error_type="api_error", error_message="boom"),
        Scenario(text="fallback answer", usage=USAGE),
    )
    code, result = claude_code_through(isolated, bedrock.url, BEDROCK_FLAGS)
    assert code == 0, result
    assert result["result"] == "fallback answer"
    assert [r.path.rsplit("/", 1)[-1] for r in bedrock.requests] == [
        "invoke-with-response-stream",
        "invoke",
    ]
    found = [r for r in rows(2) if r["path"] == "/v1/messages"]
    assert sorted(r["outcome"] for r in found) == ["ok", "upstream_error"]
    ok = next(r for r in found if r["outcome"] == "ok")
    assert ok["cost_micros"] == round(OPUS_COST * 1.1)
